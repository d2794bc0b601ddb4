//! `tracer run`: wires probes -> ring buffer -> decode -> connection table -> event stream,
//! and shuts everything down on SIGINT / SIGTERM.

use std::{
    fs::OpenOptions,
    io::Write,
    path::Path,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result};
use aya::maps::{MapData, RingBuf};
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
};

use crate::{
    cli::{EventsDest, RunArgs},
    conn_table::{Change, ConnTable},
    decode::decode,
    events::{ConnFields, Event, EventBody, EventSink},
    probes::{KernelLosses, Probes},
    process::read_details,
};

/// Lines that may wait for a slow event reader before events are dropped (and counted).
const EVENT_QUEUE_CAPACITY: usize = 65_536;
/// How long shutdown waits for the event writer to flush.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

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

/// Turns kernel records into SPEC events.
struct Pipeline {
    table: ConnTable,
    clock: Clock,
    sink: EventSink,
    decode_errors: u64,
    untracked: u64,
}

impl Pipeline {
    fn handle_record(&mut self, bytes: &[u8]) {
        let event = match decode(bytes) {
            Ok(event) => event,
            Err(err) => {
                self.decode_errors += 1;
                log::warn!("dropping a kernel record: {err}");
                return;
            }
        };
        let ts = self.clock.wall(event.header().ts_ns);
        let body = match self.table.apply(&event) {
            Change::Opened(conn) => {
                let details = read_details(Path::new("/proc"), conn.owner.pid);
                EventBody::Open {
                    conn: ConnFields::new(&conn, &details),
                    preexisting: false,
                }
            }
            Change::Closed(closed) => {
                let details = read_details(Path::new("/proc"), closed.conn.owner.pid);
                let duration_ns = closed.end_ns.saturating_sub(closed.conn.start_ns);
                EventBody::Close {
                    conn: ConnFields::new(&closed.conn, &details),
                    duration_s: duration_ns as f64 / 1e9,
                    bytes_sent: closed.bytes_sent,
                    bytes_received: closed.bytes_received,
                    closed_by: closed.closed_by,
                }
            }
            Change::Untracked => {
                self.untracked += 1;
                return;
            }
            Change::OwnerChanged(_) | Change::PeerClosed(_) | Change::Duplicate => return,
        };
        self.sink.send(&Event::at(ts, body));
    }

    fn report_lost(&self, count: u64, location: &'static str) {
        if count > 0 {
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
    queue: u64,
    decode: u64,
}

fn drain(ring: &mut RingBuf<MapData>, pipeline: &mut Pipeline) {
    while let Some(item) = ring.next() {
        pipeline.handle_record(&item);
    }
}

fn report_losses(probes: &Probes, pipeline: &Pipeline, reported: &mut Reported) {
    match probes.losses() {
        Ok(now) => {
            pipeline.report_lost(now.ring_full - reported.kernel.ring_full, "kernel_ring");
            pipeline.report_lost(now.table_full - reported.kernel.table_full, "kernel_table");
            reported.kernel = now;
        }
        Err(err) => log::warn!("reading kernel loss counters: {err:#}"),
    }
    // Events dropped by the queue itself are reported once the queue takes events again.
    let queue = pipeline.sink.dropped();
    if queue > reported.queue
        && pipeline.sink.send(&Event::at(
            SystemTime::now(),
            EventBody::Lost {
                count: queue - reported.queue,
                location: "user_queue",
            },
        ))
    {
        reported.queue = queue;
    }
    pipeline.report_lost(pipeline.decode_errors - reported.decode, "decode");
    reported.decode = pipeline.decode_errors;
}

pub async fn run(args: RunArgs) -> Result<()> {
    let ports = args.unique_ports();
    let output = open_events(&args.events)?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;

    let mut probes = Probes::attach(&ports)?;
    // SAFETY: the ring buffer owns its map fd, which stays open and unchanged until the
    // AsyncFd (and with it the RingBuf) is dropped.
    let mut ring =
        unsafe { AsyncFd::register_with_interest(probes.take_ring()?, Interest::READABLE) }
            .map_err(|e| e.into_parts().1)
            .context("polling the ring buffer")?;
    let mut pipeline = Pipeline {
        table: ConnTable::default(),
        clock: Clock::new(),
        sink: EventSink::start(output, EVENT_QUEUE_CAPACITY),
        decode_errors: 0,
        untracked: 0,
    };
    pipeline.sink.send(&Event::at(
        SystemTime::now(),
        EventBody::Ready {
            version: env!("CARGO_PKG_VERSION"),
            ports: ports.clone(),
            probes: Probes::hook_names(),
        },
    ));
    log::info!("ready: watching TCP ports {ports:?}");

    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut reported = Reported::default();
    loop {
        tokio::select! {
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            guard = ring.readable_mut() => {
                let mut guard = guard.context("waiting on the ring buffer")?;
                drain(guard.get_inner_mut(), &mut pipeline);
                guard.clear_ready();
            }
            _ = tick.tick() => report_losses(&probes, &pipeline, &mut reported),
        }
    }

    log::info!("shutting down");
    // Whatever the kernel already queued is still reported.
    drain(ring.get_mut(), &mut pipeline);
    report_losses(&probes, &pipeline, &mut reported);
    drop(ring);
    drop(probes);
    log::info!(
        "detached; {} connections still open, {} records for unknown connections",
        pipeline.table.len(),
        pipeline.untracked
    );
    if !pipeline.sink.finish(FLUSH_TIMEOUT) {
        log::warn!("event output did not drain within {FLUSH_TIMEOUT:?}; exiting anyway");
    }
    Ok(())
}
