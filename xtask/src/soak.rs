//! `cargo xtask soak [--minutes N]`: runs the daemon for N minutes under connection churn, an
//! idle pool and repeated leaks (idle in transaction, close-wait) against a fake Postgres of
//! its own (the tracer treats any TCP peer on a watched port as Postgres), samples the
//! daemon's RSS every 10 s, and at the end checks that memory stopped growing after warm-up
//! (< 1 MB) and that the tracked connections equal the kernel's socket table (`ss`).

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::PathBuf,
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{cargo, free_port, is_root, root_dir, run};

const SAMPLE_EVERY: Duration = Duration::from_secs(10);
const POOL_SIZE: usize = 16;
const MAX_GROWTH_KB: i64 = 1024;

/// A fake server: answers every read with a ReadyForQuery frame, `T` after a read starting
/// with `B` (begin), `I` otherwise; closes on `X` (the client then sits in close-wait).
fn serve(listener: TcpListener, stop: Arc<AtomicBool>) {
    for stream in listener.incoming() {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let Ok(mut s) = stream else { continue };
        thread::spawn(move || {
            let mut buf = [0u8; 256];
            loop {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(_) if buf[0] == b'X' => return,
                    Ok(_) => {
                        let status = if buf[0] == b'B' { b'T' } else { b'I' };
                        if s.write_all(&[b'Z', 0, 0, 0, 5, status]).is_err() {
                            return;
                        }
                    }
                }
            }
        });
    }
}

fn request(s: &mut TcpStream, what: u8) -> std::io::Result<()> {
    s.write_all(&[what, 0, 0, 0, 4])?;
    let mut reply = [0u8; 6];
    s.read_exact(&mut reply)
}

fn rss_kb(pid: u32) -> Option<i64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn http_get(port: u16, path: &str) -> Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    Ok(text)
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Established and close-wait TCP sockets with `port` on either end (both ends of a local
/// connection are listed, as the tracer tracks both roles).
fn ss_count(port: u16) -> Result<usize> {
    let out = Command::new("ss")
        .args(["-tnH", "state", "established", "state", "close-wait"])
        .arg(format!("( sport = :{port} or dport = :{port} )"))
        .output()
        .context("ss")?;
    Ok(String::from_utf8_lossy(&out.stdout).lines().count())
}

fn tracer_bin() -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os("TRACER_BIN") {
        return Ok(PathBuf::from(bin));
    }
    run(cargo().args(["build", "--package", "tracer"]))?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root_dir().join("target"));
    Ok(target.join("debug/tracer"))
}

pub(crate) fn soak(minutes: u64) -> Result<()> {
    if !is_root() {
        bail!("the soak runs the daemon, which needs root");
    }
    let bin = tracer_bin()?;
    let dir = std::env::temp_dir().join(format!("tracer-soak-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let events = dir.join("events.jsonl");
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let metrics_port = free_port()?;
    let stop = Arc::new(AtomicBool::new(false));
    thread::spawn({
        let stop = stop.clone();
        move || serve(listener, stop)
    });

    let mut daemon = Command::new(&bin)
        .args(["run", "--port", &port.to_string(), "--events"])
        .arg(&events)
        .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
        .args([
            "--idle-in-transaction-after",
            "5s",
            "--close-wait-after",
            "5s",
        ])
        .args([
            "--stall-after",
            "2s",
            "--idle-after",
            "60s",
            "--log-level",
            "warn",
        ])
        // TCP only: other Postgres servers' Unix sockets on this host would count as tracked
        // connections that `ss` on the soak's port does not list.
        .args(["--unix-socket-glob", "/nonexistent-tracer-soak/*"])
        // Its own state directory: another daemon's leftovers would be closes it never opened.
        .arg("--state-dir")
        .arg(dir.join("state"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("stderr"))?)
        .spawn()
        .with_context(|| format!("spawning {}", bin.display()))?;
    let pid = daemon.id();
    let ready_by = Instant::now() + Duration::from_secs(30);
    while !http_get(metrics_port, "/healthz").is_ok_and(|r| r.starts_with("HTTP/1.1 200")) {
        if Instant::now() > ready_by || daemon.try_wait()?.is_some() {
            bail!("the daemon did not become ready");
        }
        thread::sleep(Duration::from_millis(100));
    }

    // The idle pool, pinged every 15 s (well under --idle-after).
    let mut pool = (0..POOL_SIZE)
        .map(|_| TcpStream::connect(("127.0.0.1", port)))
        .collect::<std::io::Result<Vec<_>>>()?;
    let churned = Arc::new(AtomicU64::new(0));
    let leaked = Arc::new(AtomicU64::new(0));
    let churn = thread::spawn({
        let (stop, churned) = (stop.clone(), churned.clone());
        move || {
            while !stop.load(Ordering::Relaxed) {
                if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port))
                    && request(&mut s, b'Q').is_ok()
                {
                    churned.fetch_add(1, Ordering::Relaxed);
                }
                thread::sleep(Duration::from_millis(20));
            }
        }
    });
    // Every 30 s: two connections left idle in a transaction and two in close-wait, for 15 s.
    let leaks = thread::spawn({
        let (stop, leaked) = (stop.clone(), leaked.clone());
        move || {
            while !stop.load(Ordering::Relaxed) {
                let mut held = Vec::new();
                for what in [b'B', b'B', b'X', b'X'] {
                    if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
                        let _ = s.write_all(&[what, 0, 0, 0, 4]);
                        if what == b'B' {
                            let mut reply = [0u8; 6];
                            let _ = s.read_exact(&mut reply);
                        }
                        held.push(s);
                        leaked.fetch_add(1, Ordering::Relaxed);
                    }
                }
                for _ in 0..150 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    thread::sleep(Duration::from_millis(100));
                }
                drop(held);
                for _ in 0..150 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    thread::sleep(Duration::from_millis(100));
                }
            }
        }
    });

    let started = Instant::now();
    let total = Duration::from_secs(minutes * 60);
    // Warm-up: the first fifth of the run, at least one minute (allocator arenas, tables and
    // label sets reach their working size).
    let warm_up = (total / 5).max(Duration::from_secs(60)).min(total / 2);
    let mut samples: Vec<(u64, i64)> = Vec::new();
    let mut last_ping = Instant::now();
    while started.elapsed() < total {
        thread::sleep(SAMPLE_EVERY);
        if daemon.try_wait()?.is_some() {
            stop.store(true, Ordering::Relaxed);
            bail!("the daemon exited during the soak; see {}", dir.display());
        }
        if last_ping.elapsed() >= Duration::from_secs(15) {
            for s in &mut pool {
                request(s, b'Q').context("pool ping")?;
            }
            last_ping = Instant::now();
        }
        let rss = rss_kb(pid).context("daemon RSS")?;
        let at = started.elapsed().as_secs();
        eprintln!(
            "soak: t={at:>4}s rss={rss} kB churned={} leaked={}",
            churned.load(Ordering::Relaxed),
            leaked.load(Ordering::Relaxed)
        );
        samples.push((at, rss));
    }
    stop.store(true, Ordering::Relaxed);
    churn.join().ok();
    leaks.join().ok();
    // Let the closes be seen, then compare with the kernel's table.
    thread::sleep(Duration::from_secs(3));
    let text = http_get(metrics_port, "/metrics")?;
    let tracked = metric(&text, "pgconn_tracer_tracked_connections").unwrap_or(-1.0) as i64;
    let truth = ss_count(port)? as i64;
    let lost: f64 = text
        .lines()
        .filter(|l| l.starts_with("pgconn_tracer_events_lost_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    terminate(pid);
    let _ = daemon.wait();
    drop(pool);

    let after: Vec<i64> = samples
        .iter()
        .filter(|(t, _)| *t >= warm_up.as_secs())
        .map(|&(_, r)| r)
        .collect();
    let avg = |v: &[i64]| v.iter().sum::<i64>() / v.len().max(1) as i64;
    let n = after.len().min(3);
    let growth = if after.len() >= 2 {
        avg(&after[after.len() - n..]) - avg(&after[..n])
    } else {
        0
    };
    let count = |kind: &str| {
        std::fs::read_to_string(&events)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(&format!("\"type\":\"{kind}\"")))
            .count()
    };
    eprintln!(
        "soak: {minutes} min, {} churned connections, {} leaky connections; events: open {} close {} leak {} leak_end {} lost {}; lost metric {lost}",
        churned.load(Ordering::Relaxed),
        leaked.load(Ordering::Relaxed),
        count("open"),
        count("close"),
        count("leak"),
        count("leak_end"),
        count("lost"),
    );
    eprintln!(
        "soak: RSS first {} kB, after warm-up ({} s) {} kB, end {} kB, max {} kB; growth after warm-up {growth} kB (limit {MAX_GROWTH_KB})",
        samples.first().map_or(0, |s| s.1),
        warm_up.as_secs(),
        after.first().copied().unwrap_or(0),
        samples.last().map_or(0, |s| s.1),
        samples.iter().map(|s| s.1).max().unwrap_or(0),
    );
    eprintln!("soak: tracked {tracked}, ss ground truth {truth}");
    let _ = std::fs::remove_dir_all(&dir);
    if growth >= MAX_GROWTH_KB {
        bail!("RSS grew {growth} kB after warm-up (limit {MAX_GROWTH_KB} kB)");
    }
    if tracked != truth {
        bail!("the daemon tracks {tracked} connections, the kernel has {truth}");
    }
    Ok(())
}

/// SIGTERM, so the daemon detaches its probes.
fn terminate(pid: u32) {
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
}
