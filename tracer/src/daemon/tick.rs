//! The tick, once a second: the kernel's live state in, Unix listeners and missed closes
//! checked, the detectors run, gauges and the live table rebuilt; and losses reported.

use super::*;
use crate::model::detectors::{ConnState, ConnView, LeakReason};

impl Tracker {
    /// Looks for Postgres's listening Unix sockets; true when the set changed.
    pub(super) fn refresh_unix_listeners(&mut self) -> Option<Vec<String>> {
        let glob = self.unix_glob.clone();
        match watched_unix_listeners(&|p| glob.matches(p)) {
            Ok(paths) => {
                let mut changed = false;
                for path in &paths {
                    let hash = path_hash(path.as_bytes(), path.len());
                    if self.unix_paths.insert(hash, path.clone()).is_none() {
                        changed = true;
                    }
                }
                changed.then_some(paths)
            }
            Err(err) => {
                log::warn!("listing Unix sockets: {err}");
                None
            }
        }
    }

    pub(super) fn tick(&mut self, probes: &mut Probes) {
        // Owner details are read again from the next tick on (see `owner_details`).
        self.owner_details.clear();
        if self.backlog {
            // Kernel records are still queued: judge nothing until they are in, or a
            // connection whose close is queued would look idle (or, after losses, gone).
            return;
        }
        self.ticks += 1;
        let now = monotonic_ns();
        if self.last_tick_ns != 0
            && now.saturating_sub(self.last_tick_ns) > 3 * TICK.as_nanos() as u64
        {
            // The daemon did not run for a while (stopped, starved): check for missed closes.
            self.reconcile_needed = true;
        }
        self.last_tick_ns = now;

        self.housekeeping(probes, now);
        let live = match self.read_live(probes) {
            Ok(live) => live,
            Err(err) => {
                log::warn!("{err:#}");
                return;
            }
        };
        self.judge(&live, now);
        self.publish_live(now);
        self.save_state(now, false);
    }

    /// The kernel-side bookkeeping: the watched Unix paths, the end of start-up adoption, and
    /// closes the kernel could not report.
    fn housekeeping(&mut self, probes: &mut Probes, now: u64) {
        if self.ticks.is_multiple_of(UNIX_LISTENER_REFRESH_TICKS)
            && self.refresh_unix_listeners().is_some()
        {
            self.unix_generation += 1;
            let paths: Vec<String> = self.unix_paths.values().cloned().collect();
            if let Err(err) = probes.set_watched_unix(&paths, self.unix_generation) {
                log::warn!("updating watched Unix paths: {err:#}");
            }
        }
        if self.adopting && self.pending_adoption.is_empty() {
            self.adopting = false;
            if let Err(err) = probes.set_adopt_tcp(false) {
                log::warn!("{err:#}");
            }
        }
        self.close_gone_unix(probes, now);
        let after_closes = self.closes_since_reconcile
            && self.ticks >= self.reconciled_tick + RECONCILE_AFTER_CLOSES_TICKS;
        if self.reconcile_needed || after_closes || self.ticks.is_multiple_of(RECONCILE_TICKS) {
            self.reconcile_needed = false;
            self.closes_since_reconcile = false;
            self.reconciled_tick = self.ticks;
            self.close_gone_tcp(probes, now);
        }
    }

    /// The kernel's live state of the connections that changed since the last tick (the
    /// kernel lists them), or of every connection: on the first tick, every
    /// [`FULL_READ_TICKS`], when the list overflowed, or when the changed sockets are too
    /// many for one lookup each to be cheaper than one batched read of the table.
    fn read_live(&mut self, probes: &mut Probes) -> Result<LiveRead> {
        let ended = self.tick_generation;
        // Never 0 (a socket not yet listed has `seen_gen` 0), and the parity alternates.
        self.tick_generation = match ended.wrapping_add(1) {
            0 => 2,
            next => next,
        };
        let changed = probes.next_tick_generation(ended, self.tick_generation)?;
        let full_due = self.ticks == 1 || self.ticks.is_multiple_of(FULL_READ_TICKS);
        if let (Some(mut keys), false) = (changed, full_due) {
            // Connections the table has not had a live state for yet (just opened or seeded).
            keys.extend(
                self.table
                    .iter()
                    .filter(|c| c.sock_key != 0 && c.live.cookie == 0)
                    .map(|c| c.sock_key),
            );
            if keys.len() * 8 <= self.table.len().max(PARTIAL_READ_FLOOR) {
                return Ok(LiveRead {
                    states: probes.sock_states_of(&keys)?,
                    read: Some(keys.into_iter().collect()),
                });
            }
        }
        Ok(LiveRead {
            states: probes.sock_states(self.table.len())?,
            read: None,
        })
    }

    /// Takes in the kernel's live state of the connections read, runs the detectors on
    /// every connection, reports what they found and exports the gauges: one walk over the
    /// table.
    fn judge(&mut self, live: &LiveRead, now: u64) {
        let mut findings = Vec::new();
        let mut figures = Vec::with_capacity(self.table.len());
        let mut ended_unseen = false;
        let mut changed = false;
        for conn in self.table.iter_mut() {
            let mut gone = false;
            if conn.sock_key != 0 && live.covers(conn.sock_key) {
                match live
                    .states
                    .get(&conn.sock_key)
                    .copied()
                    .filter(|live| live.cookie == conn.cookie)
                {
                    Some(live) => {
                        changed |= conn.live != live;
                        conn.live = live;
                        if live.flags & SOCK_FLAG_PEER_CLOSED != 0 {
                            conn.peer_closed_ns.get_or_insert(now);
                        }
                    }
                    // The kernel has let go of it: it ended and its close record is queued
                    // or was lost. No verdict on it; the next check settles it.
                    None => gone = true,
                }
            }
            let view = conn.view();
            if !gone {
                for finding in conn.episodes.evaluate(&view, now, &self.limits) {
                    findings.push((conn.cookie, finding));
                }
            }
            ended_unseen |= gone;
            figures.push(Figures::of(conn, &view, now));
        }
        self.reconcile_needed |= ended_unseen;
        self.relations.refresh_proxies(&self.table);
        self.export_gauges(&figures);
        self.state_dirty |= changed || !findings.is_empty();
        for (cookie, finding) in findings {
            if let Some(conn) = self.table.get(cookie) {
                self.report(conn, now, finding);
            }
        }
    }

    /// Sets every gauge from this tick's figures of each connection.
    fn export_gauges(&self, figures: &[Figures]) {
        // Connections not announced yet (held until the start-up scan) have no shared labels.
        let unannounced: FxHashMap<u64, ConnLabels> = figures
            .iter()
            .filter(|f| self.labels.get(f.cookie).is_none())
            .filter_map(|f| Some((f.cookie, labels_of(self.table.get(f.cookie)?))))
            .collect();
        let snapshot: Vec<ConnSnapshot<'_>> = figures
            .iter()
            .filter_map(|f| {
                let labels = match self.labels.get(f.cookie) {
                    Some(shared) => &**shared,
                    None => unannounced.get(&f.cookie)?,
                };
                Some(ConnSnapshot {
                    labels,
                    state: f.state,
                    age_s: f.age_s,
                    idle_s: f.idle_s,
                    stalled: f.stalled,
                    leak_reason: f.leak_reason,
                })
            })
            .collect();
        self.metrics.set_open(&snapshot);
        self.metrics.set_pooler_servers(&self.pooler_servers());
    }

    /// `pgconn_pooler_server_connections`: each pooler's server connections by state and
    /// by the client holding them.
    pub(super) fn pooler_servers(&self) -> HashMap<PoolerServerLabels, i64> {
        let mut counts = HashMap::new();
        for (server, client, app) in self.relations.server_connections(&self.table) {
            let labels = PoolerServerLabels {
                comm: server.owner.comm.clone(),
                state: server.view().state().as_str(),
                client_comm: app.map(|a| a.owner.comm.clone()).unwrap_or_default(),
                client_container: short_container_id(
                    app.and_then(|a| a.details.container.container_id.as_deref()),
                ),
                client_ip: client
                    .and_then(|c| c.remote.ip())
                    .map(|ip| ip.to_string())
                    .unwrap_or_default(),
            };
            *counts.entry(labels).or_insert(0) += 1;
        }
        counts
    }

    /// Hands the HTTP worker this tick's rows (when wanted, see [`LiveTable::wanted`]); it
    /// serves them until the next publish.
    pub(super) fn publish_live(&self, now: u64) {
        if self.live.wanted(self.table.len(), now) {
            let rows = self
                .table
                .iter()
                .map(|c| LiveConn::new(self.fields(c), c, now))
                .collect();
            self.live.publish(rows, now);
        }
    }

    /// Unix sockets have no close hook: a tracked one missing from the socket table closed.
    pub(super) fn close_gone_unix(&mut self, probes: &mut Probes, now: u64) {
        if self.table.unix_count() == 0 {
            return;
        }
        let unix: Vec<u64> = self
            .table
            .iter()
            .filter(|c| c.transport == Transport::Unix)
            .map(|c| c.cookie)
            .collect();
        if unix.is_empty() {
            return;
        }
        if self.diag.is_none() {
            self.diag = DiagSocket::open()
                .map_err(|e| log::warn!("sock_diag: {e}"))
                .ok();
        }
        let Some(diag) = self.diag.as_mut() else {
            return;
        };
        let sockets = match diag.unix_sockets() {
            Ok(sockets) => sockets,
            Err(err) => {
                log::warn!("listing Unix sockets: {err}");
                return;
            }
        };
        let alive: HashSet<u64> = sockets.iter().map(|s| s.cookie).collect();
        // Both ends of a Unix connection on this host: sock_diag names each one's peer inode.
        let by_inode: HashMap<u64, u64> = sockets.iter().map(|s| (s.inode, s.cookie)).collect();
        let tracked: HashSet<u64> = unix.iter().copied().collect();
        let pairs: Vec<(u64, u64)> = sockets
            .iter()
            .filter(|s| tracked.contains(&s.cookie))
            .filter_map(|s| {
                let peer = *by_inode.get(&s.peer_inode?)?;
                tracked.contains(&peer).then_some((s.cookie, peer))
            })
            .collect();
        self.relations.set_unix_peers(pairs);
        for cookie in unix.into_iter().filter(|c| !alive.contains(c)) {
            let Some(mut conn) = self.table.remove(cookie) else {
                continue;
            };
            if conn.sock_key != 0 {
                if let Some(live) = probes
                    .sock_state(conn.sock_key)
                    .filter(|l| l.cookie == cookie)
                {
                    conn.live = live;
                }
                #[allow(
                    clippy::let_underscore_must_use,
                    reason = "the kernel may have let go of it already"
                )]
                let _ = probes.forget_sock(conn.sock_key, cookie);
            }
            let owner_alive = Path::new("/proc").join(conn.owner.pid.to_string()).exists();
            // No Unix close hook says who closed: the peer when we saw its end of file; the
            // owner when it still runs; otherwise it closed or exited, we cannot tell which.
            let closed_by =
                if conn.live.flags & SOCK_FLAG_PEER_CLOSED != 0 || conn.peer_closed_ns.is_some() {
                    ClosedBy::Peer
                } else if conn.owner.pid != 0 && owner_alive {
                    ClosedBy::Local
                } else {
                    ClosedBy::Unknown
                };
            let (sent, received) = (conn.live.bytes_sent, conn.live.bytes_received);
            self.closed(&mut conn, now, sent, received, closed_by);
        }
    }

    /// TCP connections whose close record was lost (ring full) would stay open forever and
    /// turn into false leaks: any that no process holds any more are closed here.
    ///
    /// The kernel's table says for sure that a socket it tracked has ended (it lets go of a
    /// socket only at its close). Otherwise one look is not enough: a dump of the socket
    /// tables taken while sockets come and go can miss some, so a connection the kernel
    /// never tracked (found at start-up) must be missing for [`MISSED_CLOSE_TICKS`]. So
    /// must one whose kernel entry stayed after its owner let go of it (no file, or not
    /// listed at all) once a FIN went either way: the kernel programs missed its close.
    pub(super) fn close_gone_tcp(&mut self, probes: &mut Probes, now: u64) {
        let tcp: Vec<(u64, u64)> = self
            .table
            .iter()
            .filter(|c| c.transport == Transport::Tcp)
            .map(|c| (c.cookie, c.sock_key))
            .collect();
        if tcp.is_empty() {
            self.close_suspects.clear();
            return;
        }
        // Sockets a process holds: time-wait sockets, orphans (closed by their owner, the
        // kernel finishing the goodbye) and sockets not yet accepted have no file.
        let held: HashSet<u64> = match sockets_in_every_netns(Path::new("/proc")) {
            Ok((sockets, _)) => sockets
                .into_iter()
                .filter(|s| s.inode != 0)
                .map(|s| s.cookie)
                .collect(),
            Err(err) => {
                log::warn!("listing TCP sockets: {err}");
                return;
            }
        };
        let mut suspects = FxHashMap::default();
        let mut missed = 0;
        for (cookie, key) in tcp {
            if held.contains(&cookie) {
                continue;
            }
            let kernel = (key != 0)
                .then(|| probes.sock_state(key))
                .flatten()
                .filter(|s| s.cookie == cookie);
            // With no FIN either way the connection is alive: not accepted yet, or where
            // the socket tables do not reach (a network namespace no process is in).
            if kernel.is_some_and(|s| s.closed_by == closed_by::UNKNOWN) {
                continue;
            }
            if key == 0 || kernel.is_some() {
                let since = self
                    .close_suspects
                    .get(&cookie)
                    .copied()
                    .unwrap_or(self.ticks);
                if self.ticks < since + MISSED_CLOSE_TICKS {
                    // Missing from one dump only, or its close record on its way: look
                    // again next tick.
                    suspects.insert(cookie, since);
                    continue;
                }
            }
            let mut ended_by = ClosedBy::Unknown;
            if let Some(state) = kernel {
                missed += 1;
                #[allow(
                    clippy::let_underscore_must_use,
                    reason = "its close may have come meanwhile and removed it already"
                )]
                let _ = probes.forget_sock(key, cookie);
                if let Some(conn) = self.table.get_mut(cookie) {
                    conn.live = state;
                }
                ended_by = ClosedBy::from_wire(state.closed_by);
            }
            let Some(mut conn) = self.table.remove(cookie) else {
                continue;
            };
            log::debug!("connection {cookie} is gone without a close record");
            let (sent, received) = (conn.live.bytes_sent, conn.live.bytes_received);
            self.closed(&mut conn, now, sent, received, ended_by);
        }
        if missed > 0 {
            log::info!("{missed} TCP connections closed whose close the kernel programs missed");
        }
        self.reconcile_needed |= !suspects.is_empty();
        self.close_suspects = suspects;
    }

    pub(super) fn report_lost(&self, count: u64, location: &'static str) {
        if count > 0 {
            self.metrics.events_lost(location, count);
            self.sink.send(&Event::at(
                SystemTime::now(),
                EventBody::Lost { count, location },
            ));
        }
    }
}

/// What the gauges take of one connection at a tick.
struct Figures {
    cookie: u64,
    state: ConnState,
    age_s: f64,
    idle_s: f64,
    stalled: bool,
    leak_reason: Option<LeakReason>,
}

impl Figures {
    fn of(conn: &Conn, view: &ConnView, now: u64) -> Self {
        Self {
            cookie: conn.cookie,
            state: view.state(),
            age_s: secs(now.saturating_sub(conn.born_ns)),
            idle_s: secs(now.saturating_sub(view.last_activity_ns())),
            stalled: conn.episodes.stalled(),
            leak_reason: conn.episodes.leak(),
        }
    }
}

/// What one tick read of the kernel's connection table.
struct LiveRead {
    states: FxHashMap<u64, tracer_common::SockState>,
    /// The keys looked up, when only some were; `None`: the whole table was read.
    read: Option<FxHashSet<u64>>,
}

impl LiveRead {
    /// Whether the read says anything of socket `key`: a socket read and missing has left
    /// the kernel's table; one not read is unchanged since it last was.
    fn covers(&self, key: u64) -> bool {
        self.read.as_ref().is_none_or(|read| read.contains(&key))
    }
}

/// Loss counters already reported, so each `lost` event carries only the new losses.
#[derive(Default)]
pub(super) struct Reported {
    kernel: KernelLosses,
    /// Queue drops carried by `lost` events so far.
    queue: u64,
    /// Queue drops added to the metric so far.
    queue_metric: u64,
    decode: u64,
}

pub(super) fn report_losses(probes: &Probes, tracker: &mut Tracker, reported: &mut Reported) {
    match probes.losses() {
        Ok(now) => {
            if now != reported.kernel {
                tracker.reconcile_needed = true;
            }
            tracker.report_lost(now.ring_full - reported.kernel.ring_full, "kernel_ring");
            tracker.report_lost(now.table_full - reported.kernel.table_full, "kernel_table");
            reported.kernel = now;
        }
        Err(err) => log::warn!("reading kernel loss counters: {err:#}"),
    }
    // The metric follows drops live; the `lost` event waits until the queue takes events
    // again and then carries every drop since the last one it reported (refused `lost`
    // events included: they are events lost too).
    let dropped = tracker.sink.dropped();
    if dropped > reported.queue_metric {
        tracker
            .metrics
            .events_lost("user_queue", dropped - reported.queue_metric);
        reported.queue_metric = dropped;
    }
    if dropped > reported.queue {
        let lost = Event::at(
            SystemTime::now(),
            EventBody::Lost {
                count: dropped - reported.queue,
                location: "user_queue",
            },
        );
        if tracker.sink.send(&lost) {
            reported.queue = dropped;
        }
    }
    tracker.report_lost(tracker.decode_errors - reported.decode, "decode");
    reported.decode = tracker.decode_errors;
}
