//! Figure 5 of docs/performance.md: the user-space pipeline (decode -> connection table ->
//! detectors, and the JSON line of each open and close) on synthetic kernel records, on one
//! thread. It uses only `tracer-core`, so it builds and runs without the eBPF toolchain and
//! without root: `cargo run --release -p pipeline-bench`. `cargo xtask bench` prints it too.

use std::{
    hint::black_box,
    time::{Instant, SystemTime},
};

use tracer_common::{
    AF_INET, ConnClose, ConnOpen, ConnOwner, EventHeader, ProcInfo, closed_by, kind, role,
};
use tracer_core::{
    conn_table::{Change, ConnTable},
    decode::decode,
    detectors::Thresholds,
    events::{ConnFields, Event, EventBody},
};

fn bytes<T: Copy>(value: &T) -> Vec<u8> {
    // SAFETY: T is a plain repr(C) wire type; reading its bytes is always valid.
    unsafe { std::slice::from_raw_parts((value as *const T).cast::<u8>(), size_of::<T>()) }.to_vec()
}

fn header(kind: u32, size: usize, cookie: u64, ts_ns: u64) -> EventHeader {
    EventHeader {
        kind,
        size: size as u32,
        ts_ns,
        cookie,
    }
}

fn owner(pid: u32) -> ProcInfo {
    ProcInfo {
        tgid: pid,
        tid: pid,
        comm: *b"app-worker\0\0\0\0\0\0",
        ..ProcInfo::default()
    }
}

/// Records as the kernel writes them: per connection an open, an owner change and (LIVE
/// connections later) a close, so about LIVE connections are open at any time.
pub fn synthetic_records(connections: u64) -> Vec<Vec<u8>> {
    const LIVE: u64 = 1000;
    let mut records = Vec::with_capacity(connections as usize * 3);
    for i in 1..=connections {
        let ts = i * 10_000;
        let mut open = ConnOpen {
            header: header(kind::CONN_OPEN, size_of::<ConnOpen>(), i, ts),
            owner: owner(1000 + (i % 50) as u32),
            start_ns: ts,
            sock_key: 0xffff_0000_0000_0000 | i,
            family: AF_INET,
            local_port: 30000 + (i % 30000) as u16,
            remote_port: 5432,
            role: role::CLIENT,
            ..ConnOpen::default()
        };
        open.local_addr[..4].copy_from_slice(&[127, 0, 0, 1]);
        open.remote_addr[..4].copy_from_slice(&[10, 0, (i >> 8) as u8, i as u8]);
        records.push(bytes(&open));
        records.push(bytes(&ConnOwner {
            header: header(kind::CONN_OWNER, size_of::<ConnOwner>(), i, ts + 1),
            owner: owner(2000 + (i % 50) as u32),
        }));
        if i > LIVE {
            let c = i - LIVE;
            records.push(bytes(&ConnClose {
                header: header(kind::CONN_CLOSE, size_of::<ConnClose>(), c, ts + 2),
                start_ns: c * 10_000,
                bytes_sent: 1234,
                bytes_received: 5678,
                closed_by: closed_by::LOCAL,
                ..ConnClose::default()
            }));
        }
    }
    records
}

/// Events per second through decode -> table -> detectors (and, with `json`, the JSON
/// event line the daemon would write for each open and close).
pub fn events_per_second(records: &[Vec<u8>], json: bool) -> f64 {
    let mut table = ConnTable::default();
    let limits = Thresholds::default();
    let no_paths = |_: u64| None;
    let mut findings = 0usize;
    let mut out_bytes = 0usize;
    let now = SystemTime::now();
    let start = Instant::now();
    for record in records {
        let Ok(event) = decode(record) else {
            continue;
        };
        let ts = event.header().ts_ns;
        match table.apply(&event, &no_paths) {
            Change::Opened(cookie) => {
                if let Some(conn) = table.get_mut(cookie) {
                    let view = conn.view();
                    findings += conn.episodes.evaluate(&view, ts, &limits).len();
                    if json {
                        let body = EventBody::Open {
                            conn: ConnFields::new(conn),
                            preexisting: false,
                            age_s: 0.0,
                        };
                        out_bytes += Event::at(now, body).to_line().len();
                    }
                }
            }
            Change::Closed(closed) => {
                let mut conn = closed.conn;
                let view = conn.view();
                findings += conn.episodes.close(&view, closed.end_ns).len();
                if json {
                    let body = EventBody::Close {
                        conn: ConnFields::new(&conn),
                        duration_s: (closed.end_ns - conn.born_ns) as f64 / 1e9,
                        bytes_sent: closed.bytes_sent,
                        bytes_received: closed.bytes_received,
                        closed_by: closed.closed_by,
                    };
                    out_bytes += Event::at(now, body).to_line().len();
                }
            }
            other => {
                black_box(other);
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    black_box((findings, out_bytes, table.len()));
    records.len() as f64 / elapsed
}

/// The figure's heading in both reports.
pub const TITLE: &str =
    "5. user-space pipeline on synthetic records (decode -> table -> detectors), one thread";

/// Figure 5: records per second through the pipeline, bare and with the JSON lines, over
/// three runs each after a warm-up.
pub struct Figure {
    pub records: usize,
    pub bare: Vec<f64>,
    pub json: Vec<f64>,
}

impl Figure {
    pub fn measure(connections: u64) -> Self {
        let records = synthetic_records(connections);
        black_box(events_per_second(
            &records[..records.len().min(100_000)],
            false,
        ));
        let bare = (0..3).map(|_| events_per_second(&records, false)).collect();
        let json = (0..3).map(|_| events_per_second(&records, true)).collect();
        Self {
            records: records.len(),
            bare,
            json,
        }
    }

    /// Events per second, bare (the median of the runs).
    pub fn events_per_second(&self) -> f64 {
        middle(&self.bare)
    }

    /// Events per second with the JSON line of each open and close (the median of the runs).
    pub fn json_events_per_second(&self) -> f64 {
        middle(&self.json)
    }

    pub fn print(&self) {
        println!(
            "   {} records: {:.2} M events/s (median of {}); with the JSON line of each open/close: {:.2} M events/s",
            self.records,
            self.events_per_second() / 1e6,
            self.bare.len(),
            self.json_events_per_second() / 1e6
        );
    }
}

/// The middle value of an odd number of runs.
fn middle(runs: &[f64]) -> f64 {
    let mut sorted = runs.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN)
}
