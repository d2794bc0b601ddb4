//! `tracer run`: wires probes -> ring buffer -> decode -> connection table -> detectors ->
//! events and metrics, and shuts everything down on SIGINT / SIGTERM.
//!
//! Two paces: kernel records are handled as they arrive (opens, closes, owner changes), and
//! a tick reads each connection's live kernel state (bytes, I/O times, transaction status)
//! to run the detectors, notice Unix-socket closes and refresh the gauges. The kernel sends
//! nothing per query, so the cost does not grow with traffic.
//!
//! By job: `records` (each kernel record), `seeding` (start-up and what a previous daemon
//! kept, `state_file`), `tick` (the once-a-second work and loss reports); this file holds the
//! tracker's state and the main loop.

mod labels;
mod records;
mod seeding;
pub mod state_file;
mod tick;

use labels::LabelsByConn;
use tick::{Reported, report_losses};

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
use rustc_hash::{FxHashMap, FxHashSet};
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
};
use tracer_common::{EVENTS_RING_RECORDS_MAX, SOCK_FLAG_PEER_CLOSED, closed_by, path_hash};

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
    kernel::probes::{FIRST_TICK_GENERATION, KernelLosses, Probes},
    model::conn_table::{Change, ClosedBy, Conn, ConnTable, Owner, Role, Transport},
    model::detectors::{Finding, Thresholds},
    model::endpoint::Endpoint,
    model::pooler::Relations,
};

/// Lines that may wait for a slow event reader before events are dropped (and counted).
const EVENT_QUEUE_CAPACITY: usize = 65_536;
/// How long shutdown waits for the event writer to flush.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);
/// Detector and gauge pace.
const TICK: Duration = Duration::from_secs(1);
/// How often TCP connections are checked against the socket tables even without losses (a
/// loss, a stall of the daemon or a socket the kernel let go of triggers a check at once):
/// a safety net for closes lost some other way, and a dump of every socket of the host.
const RECONCILE_TICKS: u64 = 30;
/// After closes, the check comes within this many ticks: a close the kernel programs missed
/// (a tracing program never runs nested on one CPU: a state change in a softirq that
/// interrupts the same program is skipped) comes in a burst of closes it did see.
const RECONCILE_AFTER_CLOSES_TICKS: u64 = 3;
/// A connection no process holds any more is closed only when that is still so this many
/// ticks later (a dump of the socket tables under churn can miss a socket; a close record
/// may be on its way), unless the kernel's table says it ended.
const MISSED_CLOSE_TICKS: u64 = 2;
/// How often the listening Unix sockets are looked for again (Postgres may restart).
const UNIX_LISTENER_REFRESH_TICKS: u64 = 5;
/// The state file is written every tick up to this many connections, then every
/// `len / STATE_CONNS_PER_TICK` ticks, at most every `STATE_MAX_TICKS`.
const STATE_CONNS_PER_TICK: usize = 4096;
const STATE_MAX_TICKS: usize = 10;
/// Every this many ticks the tick reads the kernel's whole connection table, not only the
/// sockets the kernel listed as changed: whatever a listing could miss (a program that ran
/// across two tick switches) is made good within this many seconds.
const FULL_READ_TICKS: u64 = 30;
/// A partial read looks up each changed socket on its own; past an eighth of the table (or
/// this many sockets) one batched read of the whole table is cheaper.
const PARTIAL_READ_FLOOR: usize = 512;

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
    let remote = match (conn.role, conn.remote.ip()) {
        (Role::Server, Some(ip)) => ip.to_string(),
        _ => conn.remote.to_string(),
    };
    ConnLabels {
        role: conn.role.as_str(),
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
    /// Each open connection's metric labels.
    labels: LabelsByConn,
    /// `/proc` details by owner (pid, start time), kept for the current tick only: a burst
    /// of opens by one process reads `/proc` once (four files, tens of us), and a process
    /// that changes (exec, a new title, another cgroup) is read again within a second.
    owner_details: FxHashMap<(u32, u64), ProcessDetails>,
    diag: Option<DiagSocket>,
    decode_errors: u64,
    untracked: u64,
    ticks: u64,
    /// The kernel programs' current tick generation (see [`Probes::next_tick_generation`]).
    tick_generation: u32,
    /// Kernel records were lost: some closes may be missing, check against the socket
    /// tables at the next tick.
    reconcile_needed: bool,
    /// The tick of the last check against the socket tables, and whether closes came since.
    reconciled_tick: u64,
    closes_since_reconcile: bool,
    /// TCP connections gone from the socket tables whose kernel entry stayed, by cookie:
    /// the tick that first found them so (see [`MISSED_CLOSE_TICKS`]).
    close_suspects: FxHashMap<u64, u64>,
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

/// The HTTP endpoint's task and what stops it.
struct MetricsServer {
    task: tokio::task::JoinHandle<Result<()>>,
    stop: tokio::sync::oneshot::Sender<()>,
}

impl MetricsServer {
    /// Serves `/metrics`, the health endpoints and the live table on `listener` until
    /// [`Self::stop`].
    fn start(
        listener: tokio::net::TcpListener,
        metrics: &Arc<Metrics>,
        ready: &Arc<AtomicBool>,
        args: &RunArgs,
        live: &Arc<LiveTable>,
    ) -> Self {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(http::serve(
            listener,
            metrics.clone(),
            ready.clone(),
            Protection::new(args.web_config.as_deref()),
            live.clone(),
            async move {
                #[allow(
                    clippy::let_underscore_must_use,
                    reason = "a dropped sender means stop as well"
                )]
                let _ = stopped.await;
            },
        ));
        Self { task, stop }
    }

    async fn stop(self) {
        #[allow(
            clippy::let_underscore_must_use,
            reason = "the server may have stopped already; shutdown goes on"
        )]
        let _ = self.stop.send(());
        #[allow(
            clippy::let_underscore_must_use,
            reason = "a server that does not stop in time is dropped with the runtime"
        )]
        let _ = tokio::time::timeout(Duration::from_secs(2), self.task).await;
    }
}

pub async fn run(args: RunArgs) -> Result<()> {
    // Everything that can fail on bad input or a busy port fails here, before any probe.
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
    let server = metrics_listener
        .map(|listener| MetricsServer::start(listener, &metrics, &ready, &args, &live));
    let sink = EventSink::start(output, EVENT_QUEUE_CAPACITY, args.format);
    let mut tracker = Tracker::new(&args, unix_glob, sink, metrics, live.clone(), kept);

    tracker.start_up(&mut probes, ring.get_mut(), &args.unix_socket_glob)?;
    ready.store(true, Ordering::SeqCst);
    let mut reported = Reported::default();
    follow(
        &mut tracker,
        &mut probes,
        &mut ring,
        &mut reported,
        &mut sigterm,
        &mut sigint,
    )
    .await?;

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
    if let Some(server) = server {
        server.stop().await;
    }
    tracker.finish();
    Ok(())
}

/// The daemon at work until SIGTERM or SIGINT: kernel records as they come, the tick every
/// second.
async fn follow(
    tracker: &mut Tracker,
    probes: &mut Probes,
    ring: &mut AsyncFd<RingBuf<MapData>>,
    reported: &mut Reported,
    sigterm: &mut tokio::signal::unix::Signal,
    sigint: &mut tokio::signal::unix::Signal,
) -> Result<()> {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = sigterm.recv() => return Ok(()),
            _ = sigint.recv() => return Ok(()),
            guard = ring.readable_mut() => {
                let mut guard = guard.context("waiting on the ring buffer")?;
                // Leave readiness set when records remain, so the loop comes straight back.
                let empty = drain(guard.get_inner_mut(), tracker, DRAIN_BATCH);
                tracker.backlog = !empty;
                if empty {
                    guard.clear_ready();
                }
            }
            _ = tick.tick() => {
                // Losses first, as the kernel counts them now: after a stall the drain below
                // can take seconds, and an operator should see the losses at once. They also
                // trigger the check for missed closes, which must run before the detectors
                // see the missed ones as idle.
                report_losses(probes, tracker, reported);
                // Records sent without waking the reader (pooler links) are in first: while
                // any wait, the kernel wakes the reader for no record (it wakes only a reader
                // that has caught up), so the tick is what keeps up with a busy pooler's
                // links (two per pooled transaction). At most a full ring's worth: that is
                // every record queued when the tick came, and records that keep coming
                // faster than they are handled must not hold the tick off for ever.
                drain(ring.get_mut(), tracker, EVENTS_RING_RECORDS_MAX);
                tracker.backlog = false;
                tracker.tick(probes);
            }
        }
    }
}

impl Tracker {
    fn new(
        args: &RunArgs,
        unix_glob: Glob,
        sink: EventSink,
        metrics: Arc<Metrics>,
        live: Arc<LiveTable>,
        state: Option<KeptState>,
    ) -> Self {
        Self {
            table: ConnTable::default(),
            clock: Clock::new(),
            sink,
            metrics,
            live,
            limits: Thresholds {
                stall_after: args.stall_after,
                idle_in_transaction_after: args.idle_in_transaction_after,
                close_wait_after: args.close_wait_after,
                idle_after: args.idle_after,
            },
            ports: args.unique_ports(),
            unix_glob,
            cmdline: args.cmdline,
            unix_paths: HashMap::new(),
            unix_generation: 1,
            pending_adoption: HashSet::new(),
            held_opens: Some(Vec::new()),
            adopting: false,
            labels: LabelsByConn::default(),
            owner_details: FxHashMap::default(),
            diag: None,
            decode_errors: 0,
            untracked: 0,
            ticks: 0,
            tick_generation: FIRST_TICK_GENERATION,
            reconcile_needed: false,
            reconciled_tick: 0,
            closes_since_reconcile: false,
            close_suspects: FxHashMap::default(),
            backlog: false,
            last_tick_ns: 0,
            state,
            relations: Relations::default(),
            state_dirty: true,
        }
    }

    /// Watches the Unix sockets Postgres listens on, then seeds the connections that already
    /// exist, and says `ready`. Records the kernel produced meanwhile are handled first, so a
    /// connection opened during start-up is reported once, by the kernel, and the scan skips
    /// it.
    fn start_up(
        &mut self,
        probes: &mut Probes,
        ring: &mut RingBuf<MapData>,
        unix_socket_glob: &str,
    ) -> Result<()> {
        self.refresh_unix_listeners();
        let paths: Vec<String> = self.unix_paths.values().cloned().collect();
        probes.set_watched_unix(&paths, self.unix_generation)?;
        probes.set_adopt_tcp(true)?;
        self.adopting = true;
        drain(ring, self, usize::MAX);
        let glob = self.unix_glob.clone();
        let found = find_connections(&self.ports, &|p| glob.matches(p), Path::new("/proc"))
            .context("listing existing sockets (sock_diag)")?;
        let saved = self.state.as_ref().and_then(KeptState::load);
        self.seed(found, monotonic_ns(), saved);
        self.send(
            monotonic_ns(),
            EventBody::Ready {
                version: env!("CARGO_PKG_VERSION"),
                ports: self.ports.clone(),
                probes: probes.hook_names(),
                unix_socket_glob: unix_socket_glob.to_owned(),
            },
        );
        self.publish_live(monotonic_ns());
        log::info!(
            "ready: watching TCP ports {:?} and Unix sockets {:?}; {} connections already open",
            self.ports,
            self.unix_paths.values().collect::<Vec<_>>(),
            self.table.len()
        );
        Ok(())
    }

    /// The last words: what is left open, and the event output flushed.
    fn finish(self) {
        log::info!(
            "detached; {} connections still open, {} records for unknown connections",
            self.table.len(),
            self.untracked
        );
        if !self.sink.finish(FLUSH_TIMEOUT) {
            log::warn!("event output did not drain within {FLUSH_TIMEOUT:?}; exiting anyway");
        }
    }
}
