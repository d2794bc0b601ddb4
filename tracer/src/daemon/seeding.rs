//! Start-up: connections older than the daemon (found by the socket tables, with their
//! process titles) and what a previous daemon kept of them; and keeping it for the next one.

use super::*;

impl Tracker {
    /// Seeds the table with the connections that existed before the probes: their state
    /// from Postgres's process titles, and what a previous daemon knew of them (`saved`).
    pub(super) fn seed(&mut self, found: Vec<FoundConn>, now: u64, saved: Option<StateFile>) {
        let proc_root = Path::new("/proc");
        let titles = proc_title::seeds(&found, &|pid| proc_title::read_title(proc_root, pid), now);
        let mut saved: HashMap<u64, SavedConn> = saved
            .map(|f| f.connections.into_iter().map(|c| (c.cookie, c)).collect())
            .unwrap_or_default();
        let (mut from_titles, mut restored) = (0, 0);
        for f in found {
            let mut conn = f.to_conn(now, proc_root, self.cmdline);
            conn.seeded = titles.get(&f.cookie).copied();
            from_titles += usize::from(conn.seeded.is_some());
            if let Endpoint::Unix(path) = &f.remote {
                self.unix_paths
                    .insert(path_hash(path.as_bytes(), path.len()), path.clone());
            } else if self.table.get(f.cookie).is_none() {
                self.pending_adoption.insert(f.cookie);
            }
            let cookie = conn.cookie;
            let new = self.table.insert_found(conn);
            let known = self.table.get_mut(cookie).filter(|c| c.preexisting);
            if let (Some(saved), Some(conn)) = (saved.remove(&cookie), known) {
                restored += usize::from(saved.restore_into(conn, now));
            }
            if new {
                self.opened(cookie, now);
            }
        }
        for cookie in self.held_opens.take().unwrap_or_default() {
            self.opened(cookie, now);
        }
        log::info!(
            "start-up: {from_titles} connection states from process titles, {restored} \
             connections carried over from the state file"
        );
        self.close_saved_gone(saved.into_values().collect(), now);
    }

    /// Connections a previous daemon left open that are gone now closed while no daemon ran:
    /// their open verdicts end and they close (`closed_by: unknown`, timed now). One still
    /// open but no longer watched (other ports or glob) is dropped without a word.
    pub(super) fn close_saved_gone(&mut self, saved: Vec<SavedConn>, now: u64) {
        if saved.is_empty() {
            return;
        }
        // A TCP socket the owner has closed lingers in FIN_WAIT / TIME_WAIT with its cookie:
        // open means what the seeding counts as open.
        let alive: HashSet<u64> = match sockets_in_every_netns(Path::new("/proc")) {
            Ok((tcp, unix)) => tcp
                .iter()
                .filter(|s| matches!(s.state, TCP_ESTABLISHED | TCP_CLOSE_WAIT))
                .map(|s| s.cookie)
                .chain(unix.iter().map(|s| s.cookie))
                .collect(),
            Err(err) => {
                log::warn!("listing sockets: {err}; not closing connections from the state file");
                return;
            }
        };
        for gone in saved.iter().filter(|s| !alive.contains(&s.cookie)) {
            let mut conn = gone.to_closed_conn();
            let (sent, received) = (conn.live.bytes_sent, conn.live.bytes_received);
            self.closed(&mut conn, now, sent, received, ClosedBy::Unknown);
        }
    }

    /// Keeps what the daemon knows for the next one: every tick, or less often for a large
    /// table (encoding costs about 2.5 us per connection), and always at shutdown (`force`).
    pub(super) fn save_state(&mut self, now: u64, force: bool) {
        let every = (self.table.len() / STATE_CONNS_PER_TICK).clamp(1, STATE_MAX_TICKS) as u64;
        if !force && (!self.state_dirty || !self.ticks.is_multiple_of(every)) {
            return;
        }
        if let Some(state) = self.state.as_mut() {
            state.save(self.table.iter(), now);
        }
        self.state_dirty = false;
    }
}
