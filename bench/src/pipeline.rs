//! Figure 5: the user-space pipeline (decode -> connection table -> detectors) on synthetic
//! kernel records, on one thread.

use std::{
    hint::black_box,
    path::Path,
    time::{Instant, SystemTime},
};

use tracer::{
    export::events::{ConnFields, Event, EventBody},
    kernel::decode::decode,
    model::conn_table::{Change, ConnTable},
    model::detectors::Thresholds,
};
use tracer_common::{
    AF_INET, ConnClose, ConnOpen, ConnOwner, EventHeader, ProcInfo, closed_by, kind, role,
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

/// Microseconds the daemon spends reading /proc for one new owner (exe, cmdline, cgroup):
/// done for every open and owner change.
pub fn proc_details_us(iterations: u32) -> f64 {
    let pid = std::process::id();
    let start = Instant::now();
    for _ in 0..iterations {
        black_box(tracer::host::process::read_details(
            Path::new("/proc"),
            pid,
            tracer::host::redact::CmdlineMode::Redacted,
        ));
    }
    start.elapsed().as_secs_f64() * 1e6 / f64::from(iterations)
}
