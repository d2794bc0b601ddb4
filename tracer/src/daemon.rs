//! `tracer run`: wires probes -> ring buffer -> decode -> connection table -> detectors ->
//! events and metrics, and shuts everything down on SIGINT / SIGTERM.
//!
//! Two paces: kernel records are handled as they arrive (opens, closes, owner changes), and
//! a tick reads each connection's live kernel state (bytes, I/O times, transaction status)
//! to run the detectors, notice Unix-socket closes and refresh the gauges. The kernel sends
//! nothing per query, so the cost does not grow with traffic.

pub mod state_file;

use std::{
    collections::{HashMap, HashSet},
    fs::OpenOptions,
    io::Write,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result};
use aya::maps::{MapData, RingBuf};
use rustc_hash::FxHashMap;
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
};
use tracer_common::{SOCK_FLAG_PEER_CLOSED, path_hash};

use crate::{
    config::Glob,
    config::cli::{EventsDest, RunArgs},
    daemon::state_file::{KeptState, SavedConn, StateFile},
    export::events::{ConnFields, Event, EventBody, EventSink},
    export::http,
    export::live::{LiveConn, LiveTable},
    export::metrics::{ConnLabels, ConnSnapshot, Metrics, PoolerServerLabels, short_container_id},
    export::web_config::Protection,
    host::discovery::{
        FoundConn, find_connections, sockets_in_every_netns, watched_unix_listeners,
    },
    host::owners::start_ticks,
    host::proc_title,
    host::process::{ProcessDetails, read_details},
    host::redact::CmdlineMode,
    host::sockdiag::{DiagSocket, TCP_CLOSE_WAIT, TCP_ESTABLISHED},
    kernel::decode::{KernelEvent, decode},
    kernel::probes::{KernelLosses, Probes},
    model::conn_table::{Change, ClosedBy, Conn, ConnTable, Owner, Role, Transport},
    model::detectors::{Finding, Thresholds},
    model::pooler::Relations,
};

/// Lines that may wait for a slow event reader before events are dropped (and counted).
const EVENT_QUEUE_CAPACITY: usize = 65_536;
/// How long shutdown waits for the event writer to flush.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);
/// Detector and gauge pace.
const TICK: Duration = Duration::from_secs(1);
/// How often TCP connections are checked against the socket tables even without losses.
const RECONCILE_TICKS: u64 = 10;
/// How often the listening Unix sockets are looked for again (Postgres may restart).
const UNIX_LISTENER_REFRESH_TICKS: u64 = 5;
/// The state file is written every tick up to this many connections, then every
/// `len / STATE_CONNS_PER_TICK` ticks, at most every `STATE_MAX_TICKS`.
const STATE_CONNS_PER_TICK: usize = 4096;
const STATE_MAX_TICKS: usize = 10;

/// Converts the kernel's CLOCK_MONOTONIC timestamps to wall-clock time.
#[derive(Clone, Copy)]
pub struct Clock {
    realtime_minus_monotonic_ns: i128,
}

fn clock_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}

/// CLOCK_MONOTONIC now, the clock of the kernel's timestamps.
pub fn monotonic_ns() -> u64 {
    u64::try_from(clock_ns(libc::CLOCK_MONOTONIC)).unwrap_or(0)
}

impl Clock {
    pub fn new() -> Self {
        Self {
            realtime_minus_monotonic_ns: clock_ns(libc::CLOCK_REALTIME)
                - clock_ns(libc::CLOCK_MONOTONIC),
        }
    }

    pub fn wall(&self, monotonic_ns: u64) -> SystemTime {
        let ns = i128::from(monotonic_ns) + self.realtime_minus_monotonic_ns;
        UNIX_EPOCH + Duration::from_nanos(u64::try_from(ns).unwrap_or(0))
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

pub fn open_events(dest: &EventsDest) -> Result<Box<dyn Write + Send>> {
    Ok(match dest {
        EventsDest::Stdout => Box::new(std::io::BufWriter::new(std::io::stdout())),
        EventsDest::File(path) => Box::new(std::io::BufWriter::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("cannot open events file {}", path.display()))?,
        )),
    })
}

fn secs(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// Clock ticks per second of `/proc/<pid>/stat`.
fn clock_ticks() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(ticks).ok().filter(|&t| t > 0).unwrap_or(100)
}

/// What `/proc` says of `owner` (its command line as `cmdline` allows), unless its pid now
/// names another process.
fn owner_details(owner: &Owner, cmdline: CmdlineMode) -> ProcessDetails {
    let proc_root = Path::new("/proc");
    if owner.pid == 0 {
        return ProcessDetails::default();
    }
    if owner.start_boottime_ns != 0 {
        let started = std::fs::read_to_string(proc_root.join(owner.pid.to_string()).join("stat"))
            .ok()
            .and_then(|stat| start_ticks(&stat));
        let expected = owner.start_boottime_ns / (1_000_000_000 / clock_ticks());
        match started {
            Some(ticks) if ticks.abs_diff(expected) <= 1 => {}
            // Gone, or the pid was reused by another process: no details rather than wrong ones.
            _ => return ProcessDetails::default(),
        }
    }
    read_details(proc_root, owner.pid, cmdline)
}

/// Metric labels of a connection. A server's `remote` drops the client's ephemeral port,
/// which would otherwise make a label set per connection.
fn labels_of(conn: &Conn) -> ConnLabels {
    let remote = match (conn.role, conn.transport) {
        (Role::Server, Transport::Tcp) => conn
            .remote
            .parse::<std::net::SocketAddr>()
            .map(|a| a.ip().to_string())
            .unwrap_or_else(|_| conn.remote.clone()),
        _ => conn.remote.clone(),
    };
    ConnLabels {
        role: match conn.role {
            Role::Client => "client",
            Role::Server => "server",
        },
        comm: conn.owner.comm.clone(),
        container: short_container_id(conn.details.container.container_id.as_deref()),
        remote,
    }
}

/// Everything the daemon knows, and how it reports.
struct Tracker {
    table: ConnTable,
    clock: Clock,
    sink: EventSink,
    metrics: Arc<Metrics>,
    /// What `GET /api/v1/connections` serves, republished every tick.
    live: Arc<LiveTable>,
    limits: Thresholds,
    ports: Vec<u16>,
    unix_glob: Glob,
    /// What of an owner's command line events carry.
    cmdline: CmdlineMode,
    /// Watched Unix socket paths by their hash.
    unix_paths: HashMap<u64, String>,
    unix_generation: u32,
    /// TCP connections found at start-up that the kernel has not adopted yet.
    pending_adoption: HashSet<u64>,
    /// Until the start-up scan: connections older than the daemon that the kernel adopted
    /// first. Their opens wait for what the scan knows of them (age, state).
    held_opens: Option<Vec<u64>>,
    adopting: bool,
    labels: FxHashMap<u64, ConnLabels>,
    diag: Option<DiagSocket>,
    decode_errors: u64,
    untracked: u64,
    ticks: u64,
    /// Kernel records were lost: some closes may be missing, check against the socket
    /// tables at the next tick.
    reconcile_needed: bool,
    /// Kernel records are still queued (the last drain stopped at its batch limit).
    backlog: bool,
    /// When the last tick ran (monotonic ns): a long gap means the daemon was stopped.
    last_tick_ns: u64,
    /// Where what the daemon knows is kept across restarts, if anywhere.
    state: Option<KeptState>,
    /// Both ends of connections on this host, and pooler links.
    relations: Relations,
    /// Something the state file holds changed since it was written (a record, the kernel's
    /// live state of a connection, a verdict): an idle table is not encoded again.
    state_dirty: bool,
}

impl Tracker {
    fn send(&self, ts_ns: u64, body: EventBody) {
        self.sink.send(&Event::at(self.clock.wall(ts_ns), body));
    }

    fn handle_record(&mut self, bytes: &[u8]) {
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

    fn fields(&self, conn: &Conn) -> ConnFields {
        self.relations.fields(&self.table, conn)
    }

    /// A kernel link record; each change is logged (debug, target `tracer::links`) with
    /// the record's time, for whoever checks links against the pooler's own view.
    fn linked(&mut self, cookie: u64, linked: u64, ts: u64) {
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
                client.map_or("-", |c| c.remote.as_str()),
            );
        }
    }

    fn opened(&mut self, cookie: u64, ts: u64) {
        let Some(conn) = self.table.get_mut(cookie) else {
            return;
        };
        conn.details = owner_details(&conn.owner, self.cmdline);
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

    fn refresh_owner(&mut self, cookie: u64) {
        if let Some(conn) = self.table.get_mut(cookie) {
            conn.details = owner_details(&conn.owner, self.cmdline);
        }
    }

    fn closed(
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
            .remove(&conn.cookie)
            .unwrap_or_else(|| labels_of(conn));
        let duration_ns = end_ns.saturating_sub(conn.born_ns);
        let fields = self.fields(conn);
        self.relations.closed(conn);
        let closed_by_str = match closed_by {
            ClosedBy::Local => "local",
            ClosedBy::Peer => "peer",
            ClosedBy::Reset => "reset",
            ClosedBy::Exit => "exit",
            ClosedBy::Unknown => "unknown",
        };
        self.metrics.connection_closed(
            &labels,
            closed_by_str,
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

    fn report(&self, conn: &Conn, now: u64, finding: Finding) {
        let fields = self.fields(conn);
        let body = match finding {
            Finding::Stall { waiting_s } => {
                if let Some(labels) = self.labels.get(&conn.cookie) {
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

    /// Seeds the table with the connections that existed before the probes: their state
    /// from Postgres's process titles, and what a previous daemon knew of them (`saved`).
    fn seed(&mut self, found: Vec<FoundConn>, now: u64, saved: Option<StateFile>) {
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
            if f.transport == Transport::Unix {
                self.unix_paths.insert(
                    path_hash(f.remote.as_bytes(), f.remote.len()),
                    f.remote.clone(),
                );
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
    fn close_saved_gone(&mut self, saved: Vec<SavedConn>, now: u64) {
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
    fn save_state(&mut self, now: u64, force: bool) {
        let every = (self.table.len() / STATE_CONNS_PER_TICK).clamp(1, STATE_MAX_TICKS) as u64;
        if !force && (!self.state_dirty || !self.ticks.is_multiple_of(every)) {
            return;
        }
        if let Some(state) = self.state.as_mut() {
            state.save(self.table.iter(), now);
        }
        self.state_dirty = false;
    }

    /// Looks for Postgres's listening Unix sockets; true when the set changed.
    fn refresh_unix_listeners(&mut self) -> Option<Vec<String>> {
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

    fn tick(&mut self, probes: &mut Probes) {
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
        if self.reconcile_needed || self.ticks.is_multiple_of(RECONCILE_TICKS) {
            self.reconcile_needed = false;
            self.close_gone_tcp(probes, now);
        }

        // Live state, detectors, gauges.
        let live_states = match probes.sock_states() {
            Ok(states) => states,
            Err(err) => {
                log::warn!("{err:#}");
                return;
            }
        };
        let mut findings = Vec::new();
        let mut ended_unseen = false;
        let mut changed = false;
        for conn in self.table.iter_mut() {
            if conn.sock_key != 0 {
                match live_states
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
                    None => {
                        // The kernel has let go of it: it ended and its close record is
                        // queued or was lost. No verdict on it; the next check settles it.
                        ended_unseen = true;
                        continue;
                    }
                }
            }
            for finding in conn.episodes.evaluate(&conn.view(), now, &self.limits) {
                findings.push((conn.cookie, finding));
            }
        }
        self.reconcile_needed |= ended_unseen;
        self.relations.refresh_proxies(&self.table);
        self.state_dirty |= changed || !findings.is_empty();
        for (cookie, finding) in findings {
            if let Some(conn) = self.table.get(cookie) {
                self.report(conn, now, finding);
            }
        }
        let mut fallback = HashMap::new();
        for conn in self.table.iter() {
            if !self.labels.contains_key(&conn.cookie) {
                fallback.insert(conn.cookie, labels_of(conn));
            }
        }
        let snapshot: Vec<ConnSnapshot<'_>> = self
            .table
            .iter()
            .filter_map(|conn| {
                let labels = self
                    .labels
                    .get(&conn.cookie)
                    .or_else(|| fallback.get(&conn.cookie))?;
                let view = conn.view();
                Some(ConnSnapshot {
                    labels,
                    state: view.state().as_str(),
                    age_s: secs(now.saturating_sub(conn.born_ns)),
                    idle_s: secs(now.saturating_sub(view.last_activity_ns())),
                    stalled: conn.episodes.stalled(),
                    leak_reason: conn.episodes.leak().map(|r| r.as_str()),
                })
            })
            .collect();
        self.metrics.set_open(&snapshot);
        self.metrics.set_pooler_servers(&self.pooler_servers());
        self.publish_live(now);
        self.save_state(now, false);
    }

    /// `pgconn_pooler_server_connections`: each pooler's server connections by state and
    /// by the client holding them.
    fn pooler_servers(&self) -> HashMap<PoolerServerLabels, i64> {
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
                    .and_then(|c| c.remote.parse::<std::net::SocketAddr>().ok())
                    .map(|a| a.ip().to_string())
                    .unwrap_or_default(),
            };
            *counts.entry(labels).or_insert(0) += 1;
        }
        counts
    }

    /// Hands the HTTP worker this tick's rows (when wanted, see [`LiveTable::wanted`]); it
    /// serves them until the next publish.
    fn publish_live(&self, now: u64) {
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
    fn close_gone_unix(&mut self, probes: &mut Probes, now: u64) {
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
    /// turn into false leaks: any that the socket tables no longer list are closed here.
    fn close_gone_tcp(&mut self, probes: &mut Probes, now: u64) {
        let tcp: Vec<(u64, u64)> = self
            .table
            .iter()
            .filter(|c| c.transport == Transport::Tcp)
            .map(|c| (c.cookie, c.sock_key))
            .collect();
        if tcp.is_empty() {
            return;
        }
        let alive: HashSet<u64> = match sockets_in_every_netns(Path::new("/proc")) {
            Ok((sockets, _)) => sockets.into_iter().map(|s| s.cookie).collect(),
            Err(err) => {
                log::warn!("listing TCP sockets: {err}");
                return;
            }
        };
        for (cookie, key) in tcp {
            if alive.contains(&cookie) {
                continue;
            }
            // Still in the kernel table: its close record is on its way, not lost.
            if key != 0 && probes.sock_state(key).is_some_and(|s| s.cookie == cookie) {
                continue;
            }
            let Some(mut conn) = self.table.remove(cookie) else {
                continue;
            };
            log::debug!("connection {cookie} is gone without a close record");
            let (sent, received) = (conn.live.bytes_sent, conn.live.bytes_received);
            self.closed(&mut conn, now, sent, received, ClosedBy::Unknown);
        }
    }

    fn report_lost(&self, count: u64, location: &'static str) {
        if count > 0 {
            self.metrics.events_lost(location, count);
            self.sink.send(&Event::at(
                SystemTime::now(),
                EventBody::Lost { count, location },
            ));
        }
    }
}

/// Loss counters already reported, so each `lost` event carries only the new losses.
#[derive(Default)]
struct Reported {
    kernel: KernelLosses,
    /// Queue drops carried by `lost` events so far.
    queue: u64,
    /// Queue drops added to the metric so far.
    queue_metric: u64,
    decode: u64,
}

/// Records handled per wake-up before other work (ticks, signals) gets a turn.
const DRAIN_BATCH: usize = 4096;

/// Handles queued kernel records, at most `limit`; true when the ring is empty.
fn drain(ring: &mut RingBuf<MapData>, tracker: &mut Tracker, limit: usize) -> bool {
    for _ in 0..limit {
        match ring.next() {
            Some(item) => tracker.handle_record(&item),
            None => return true,
        }
    }
    false
}

fn report_losses(probes: &Probes, tracker: &mut Tracker, reported: &mut Reported) {
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

pub async fn run(args: RunArgs) -> Result<()> {
    let ports = args.unique_ports();
    let unix_glob = Glob::compile(&args.unix_socket_glob).map_err(anyhow::Error::msg)?;
    let output = open_events(&args.events)?;
    let kept = KeptState::open(&args.state_dir)?;
    let metrics_listener = match args.metrics_addr {
        Some(addr) => Some(http::bind(addr).await?),
        None => None,
    };
    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;

    let mut probes = Probes::attach(&ports, args.max_connections)?;
    // SAFETY: the ring buffer owns its map fd, which stays open and unchanged until the
    // AsyncFd (and with it the RingBuf) is dropped.
    let mut ring =
        unsafe { AsyncFd::register_with_interest(probes.take_ring()?, Interest::READABLE) }
            .map_err(|e| e.into_parts().1)
            .context("polling the ring buffer")?;
    let metrics = Arc::new(Metrics::new(args.max_label_sets, env!("CARGO_PKG_VERSION")));
    let ready = Arc::new(AtomicBool::new(false));
    let live = Arc::new(LiveTable::default());
    let (stop_metrics, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
    let server = metrics_listener.map(|listener| {
        tokio::spawn(http::serve(
            listener,
            metrics.clone(),
            ready.clone(),
            Protection::new(args.web_config.as_deref()),
            live.clone(),
            async move {
                let _ = metrics_stopped.await;
            },
        ))
    });

    let mut tracker = Tracker {
        table: ConnTable::default(),
        clock: Clock::new(),
        sink: EventSink::start(output, EVENT_QUEUE_CAPACITY, args.format),
        metrics: metrics.clone(),
        live: live.clone(),
        limits: Thresholds {
            stall_after: args.stall_after,
            idle_in_transaction_after: args.idle_in_transaction_after,
            close_wait_after: args.close_wait_after,
            idle_after: args.idle_after,
        },
        ports: ports.clone(),
        unix_glob: unix_glob.clone(),
        cmdline: args.cmdline,
        unix_paths: HashMap::new(),
        unix_generation: 1,
        pending_adoption: HashSet::new(),
        held_opens: Some(Vec::new()),
        adopting: false,
        labels: FxHashMap::default(),
        diag: None,
        decode_errors: 0,
        untracked: 0,
        ticks: 0,
        reconcile_needed: false,
        backlog: false,
        last_tick_ns: 0,
        state: kept,
        relations: Relations::default(),
        state_dirty: true,
    };

    // Watch the Unix sockets Postgres listens on, then seed the connections that already
    // exist. Records the kernel produced meanwhile are handled first, so a connection opened
    // during start-up is reported once, by the kernel, and the scan skips it.
    tracker.refresh_unix_listeners();
    let paths: Vec<String> = tracker.unix_paths.values().cloned().collect();
    probes.set_watched_unix(&paths, tracker.unix_generation)?;
    probes.set_adopt_tcp(true)?;
    tracker.adopting = true;
    drain(ring.get_mut(), &mut tracker, usize::MAX);
    let found = find_connections(
        &tracker.ports,
        &|p| unix_glob.matches(p),
        Path::new("/proc"),
    )
    .context("listing existing sockets (sock_diag)")?;
    let saved = tracker.state.as_ref().and_then(KeptState::load);
    tracker.seed(found, monotonic_ns(), saved);
    tracker.send(
        monotonic_ns(),
        EventBody::Ready {
            version: env!("CARGO_PKG_VERSION"),
            ports: ports.clone(),
            probes: probes.hook_names(),
            unix_socket_glob: args.unix_socket_glob.clone(),
        },
    );
    tracker.publish_live(monotonic_ns());
    ready.store(true, Ordering::SeqCst);
    log::info!(
        "ready: watching TCP ports {ports:?} and Unix sockets {:?}; {} connections already open",
        tracker.unix_paths.values().collect::<Vec<_>>(),
        tracker.table.len()
    );

    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reported = Reported::default();
    loop {
        tokio::select! {
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            guard = ring.readable_mut() => {
                let mut guard = guard.context("waiting on the ring buffer")?;
                // Leave readiness set when records remain, so the loop comes straight back.
                let empty = drain(guard.get_inner_mut(), &mut tracker, DRAIN_BATCH);
                tracker.backlog = !empty;
                if empty {
                    guard.clear_ready();
                }
            }
            _ = tick.tick() => {
                // Records sent without waking the reader (pooler links) are in first, all
                // of them: while any wait, the kernel wakes the reader for no record (it
                // wakes only a reader that has caught up), so the tick is what keeps up with
                // a busy pooler's links (two per pooled transaction). The ring's size bounds
                // this work.
                drain(ring.get_mut(), &mut tracker, usize::MAX);
                tracker.backlog = false;
                // Losses first: they trigger the check for missed closes, which must run
                // before the detectors see the missed ones as idle.
                report_losses(&probes, &mut tracker, &mut reported);
                tracker.tick(&mut probes);
            }
        }
    }

    log::info!("shutting down");
    // A second signal during shutdown exits at once.
    tokio::spawn(async move {
        tokio::select! {
            _ = sigterm.recv() => {},
            _ = sigint.recv() => {},
        }
        log::warn!("second signal: exiting now");
        std::process::exit(0);
    });
    ready.store(false, Ordering::SeqCst);
    live.withdraw();
    // Whatever the kernel already queued is still reported.
    drain(ring.get_mut(), &mut tracker, usize::MAX);
    report_losses(&probes, &mut tracker, &mut reported);
    tracker.save_state(monotonic_ns(), true);
    drop(ring);
    drop(probes);
    let _ = stop_metrics.send(());
    if let Some(server) = server {
        let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
    }
    log::info!(
        "detached; {} connections still open, {} records for unknown connections",
        tracker.table.len(),
        tracker.untracked
    );
    if !tracker.sink.finish(FLUSH_TIMEOUT) {
        log::warn!("event output did not drain within {FLUSH_TIMEOUT:?}; exiting anyway");
    }
    Ok(())
}
