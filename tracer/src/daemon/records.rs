//! Kernel records in: each one changes the table, and the events and metrics follow.

use super::*;

impl Tracker {
    pub(super) fn send(&self, ts_ns: u64, body: EventBody) {
        self.sink.send(&Event::at(self.clock.wall(ts_ns), body));
    }

    pub(super) fn handle_record(&mut self, bytes: &[u8]) {
        self.state_dirty = true;
        let event = match decode(bytes) {
            Ok(event) => event,
            Err(err) => {
                self.decode_errors += 1;
                log::warn!("dropping a kernel record: {err}");
                return;
            }
        };
        let ts = event.header().ts_ns;
        if let (Some(held), KernelEvent::Close(close)) = (&mut self.held_opens, &event) {
            // Ended before the scan: its open goes first, as the kernel knew it.
            let cookie = close.header.cookie;
            if let Some(i) = held.iter().position(|&c| c == cookie) {
                held.swap_remove(i);
                self.opened(cookie, ts);
            }
        }
        let paths = &self.unix_paths;
        match self.table.apply(&event, &|hash| paths.get(&hash).cloned()) {
            Change::Opened(cookie) => match &mut self.held_opens {
                Some(held) if self.table.get(cookie).is_some_and(|c| c.preexisting) => {
                    held.push(cookie)
                }
                _ => self.opened(cookie, ts),
            },
            Change::Refreshed(cookie) => {
                self.pending_adoption.remove(&cookie);
                self.refresh_owner(cookie);
            }
            Change::OwnerChanged(cookie) => self.refresh_owner(cookie),
            Change::Closed(closed) => {
                self.closes_since_reconcile = true;
                let mut conn = closed.conn;
                self.closed(
                    &mut conn,
                    closed.end_ns,
                    closed.bytes_sent,
                    closed.bytes_received,
                    closed.closed_by,
                );
            }
            Change::PeerClosed(_) => {}
            Change::Linked { cookie, linked } => self.linked(cookie, linked, ts),
            Change::Untracked => self.untracked += 1,
        }
    }

    pub(super) fn fields(&self, conn: &Conn) -> ConnFields {
        self.relations.fields(&self.table, conn)
    }

    /// A kernel link record; each change is logged (debug, target `tracer::links`) with
    /// the record's time, for whoever checks links against the pooler's own view.
    pub(super) fn linked(&mut self, cookie: u64, linked: u64, ts: u64) {
        if !self.relations.link_record(&self.table, cookie, linked) {
            return;
        }
        if log::log_enabled!(target: "tracer::links", log::Level::Debug) {
            let Some(conn) = self.table.get(cookie) else {
                return;
            };
            let server = match conn.role {
                Role::Client => cookie,
                Role::Server => linked,
            };
            let Some(server) = self.table.get(server) else {
                return;
            };
            let client = self
                .relations
                .client_of(server.cookie)
                .and_then(|c| self.table.get(c));
            log::debug!(
                target: "tracer::links",
                "link ts={} server={} server_local={} client={} client_remote={}",
                humantime::format_rfc3339_micros(self.clock.wall(ts)),
                server.cookie,
                server.local,
                client.map_or("-".to_owned(), |c| c.cookie.to_string()),
                client.map_or("-".to_owned(), |c| c.remote.to_string()),
            );
        }
    }

    /// What `/proc` says of `owner`, read once per owner per tick.
    fn details_of(&mut self, owner: &Owner) -> ProcessDetails {
        if owner.start_boottime_ns == 0 {
            // No start time to tell a reused pid apart: read it each time.
            return owner_details(owner, self.cmdline);
        }
        let cmdline = self.cmdline;
        self.owner_details
            .entry((owner.pid, owner.start_boottime_ns))
            .or_insert_with(|| owner_details(owner, cmdline))
            .clone()
    }

    /// Fills in connection `cookie`'s owner details.
    fn fill_details(&mut self, cookie: u64) {
        let Some(owner) = self.table.get(cookie).map(|c| c.owner.clone()) else {
            return;
        };
        let details = self.details_of(&owner);
        if let Some(conn) = self.table.get_mut(cookie) {
            conn.details = details;
        }
    }

    pub(super) fn opened(&mut self, cookie: u64, ts: u64) {
        self.fill_details(cookie);
        let Some(conn) = self.table.get(cookie) else {
            return;
        };
        self.relations.opened(conn);
        let labels = labels_of(conn);
        let body = EventBody::Open {
            conn: self.fields(conn),
            preexisting: conn.preexisting,
            age_s: if conn.preexisting {
                secs(ts.saturating_sub(conn.born_ns))
            } else {
                0.0
            },
        };
        self.metrics.connection_opened(&labels);
        self.labels.insert(cookie, labels);
        self.send(ts, body);
    }

    pub(super) fn refresh_owner(&mut self, cookie: u64) {
        self.fill_details(cookie);
    }

    pub(super) fn closed(
        &mut self,
        conn: &mut Conn,
        end_ns: u64,
        bytes_sent: u64,
        bytes_received: u64,
        closed_by: ClosedBy,
    ) {
        self.state_dirty = true;
        self.pending_adoption.remove(&conn.cookie);
        let view = conn.view();
        for finding in conn.episodes.close(&view, end_ns) {
            self.report(conn, end_ns, finding);
        }
        let labels = self
            .labels
            .remove(conn.cookie)
            .unwrap_or_else(|| Arc::new(labels_of(conn)));
        let duration_ns = end_ns.saturating_sub(conn.born_ns);
        let fields = self.fields(conn);
        self.relations.closed(conn);
        self.metrics.connection_closed(
            &labels,
            closed_by,
            secs(duration_ns),
            bytes_sent,
            bytes_received,
        );
        self.send(
            end_ns,
            EventBody::Close {
                conn: fields,
                duration_s: secs(duration_ns),
                bytes_sent,
                bytes_received,
                closed_by,
            },
        );
    }

    pub(super) fn report(&self, conn: &Conn, now: u64, finding: Finding) {
        let fields = self.fields(conn);
        let body = match finding {
            Finding::Stall { waiting_s } => {
                if let Some(labels) = self.labels.get(conn.cookie) {
                    self.metrics.stall_started(labels);
                }
                EventBody::Stall {
                    conn: fields,
                    waiting_s,
                }
            }
            Finding::StallEnd { waited_s } => EventBody::StallEnd {
                conn: fields,
                waited_s,
            },
            Finding::Leak {
                reason,
                age_s,
                idle_s,
            } => EventBody::Leak {
                conn: fields,
                reason,
                age_s,
                idle_s,
            },
            Finding::LeakEnd { reason, lasted_s } => EventBody::LeakEnd {
                conn: fields,
                reason,
                lasted_s,
            },
        };
        self.send(now, body);
    }
}
