//! Figure 6: daemon memory with many open tracked connections, and the kernel maps' memory.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::TcpStream,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use tests::TempDir;

use crate::util::{Daemon, held_maps, raise_nofile, rss_kb};

pub(crate) struct Memory {
    pub command: String,
    pub connections: usize,
    pub tracked: usize,
    pub rss_idle_kb: u64,
    pub rss_kb: u64,
    pub hwm_kb: u64,
    /// Daemon CPU over the ten seconds after every open was reported (the state file catches
    /// up with the burst), then over the next thirty (nothing happens).
    pub settle_cpu_ms_per_s: f64,
    pub idle_cpu_ms_per_s: f64,
    pub maps: Vec<(String, String, u64, u64)>,
    pub lost: usize,
}

fn count(path: &Path, needle: &str) -> usize {
    std::fs::read_to_string(path)
        .map(|t| t.matches(needle).count())
        .unwrap_or(0)
}

/// The server end, in its own process (the fd limit is per process and may not be raised
/// past its hard limit without CAP_SYS_RESOURCE): accepts n connections, reads one byte
/// from each, holds them until its stdin closes.
const SERVER: &str = r#"
import socket, sys
n = int(sys.argv[1])
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen(4096)
print(s.getsockname()[1], flush=True)
held = []
for _ in range(n):
    c, _ = s.accept()
    c.recv(1)
    held.append(c)
print("done", flush=True)
sys.stdin.read()
"#;

/// Opens `n` loopback TCP connections to a listener on a watched port (both ends are local,
/// so the daemon tracks 2n sockets: n client, n server), each with one byte of traffic.
pub(crate) fn measure(tracer_bin: &Path, n: usize) -> Result<Memory> {
    raise_nofile((n + 1024) as u64)?;
    let mut server = Command::new("python3")
        .args(["-c", SERVER, &n.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the python3 listener")?;
    let mut lines = BufReader::new(server.stdout.take().expect("piped")).lines();
    let port: u16 = lines
        .next()
        .context("listener exited")??
        .trim()
        .parse()
        .context("listener port")?;
    let dir = TempDir::new("bench-mem")?;
    let events = dir.0.join("events.jsonl");
    let daemon = Daemon::tracer(
        tracer_bin,
        &events.display().to_string(),
        &["--port".into(), port.to_string()],
    )?;
    std::thread::sleep(Duration::from_millis(1500));
    let rss_idle_kb = rss_kb(daemon.pid, "VmRSS:");

    let mut clients = Vec::with_capacity(n);
    for _ in 0..n {
        let mut s = TcpStream::connect(("127.0.0.1", port)).context("connecting")?;
        s.write_all(b"x")?;
        clients.push(s);
    }
    if lines.next().context("listener exited")?? != "done" {
        bail!("listener did not accept every connection");
    }

    let deadline = Instant::now() + Duration::from_secs(60);
    let mut tracked = 0;
    while Instant::now() < deadline {
        tracked = count(&events, "\"type\":\"open\"");
        if tracked >= 2 * n {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    // A few ticks with everything open.
    std::thread::sleep(Duration::from_secs(2));
    let rss = rss_kb(daemon.pid, "VmRSS:");
    let hwm = rss_kb(daemon.pid, "VmHWM:");
    let cpu_ms_per_s = |secs: u64| {
        let cpu0 = daemon.cpu_ns();
        let t0 = Instant::now();
        std::thread::sleep(Duration::from_secs(secs));
        (daemon.cpu_ns() - cpu0) as f64 / 1e6 / t0.elapsed().as_secs_f64()
    };
    let settle_cpu_ms_per_s = cpu_ms_per_s(10);
    // Thirty ticks: one whole cycle of the work done every thirtieth tick (the whole-table
    // read, the sock_diag reconciliation), so the figure does not depend on where the window
    // falls.
    let idle_cpu_ms_per_s = cpu_ms_per_s(30);
    let maps = held_maps(daemon.pid)?;
    drop(clients);
    drop(server.stdin.take());
    server.wait()?;
    std::thread::sleep(Duration::from_millis(500));
    let command = daemon.command.clone();
    daemon.stop()?;
    let lost = count(&events, "\"type\":\"lost\"");
    if tracked == 0 {
        bail!("the daemon reported no open connection");
    }
    Ok(Memory {
        command,
        connections: n,
        tracked,
        rss_idle_kb,
        rss_kb: rss,
        hwm_kb: hwm,
        settle_cpu_ms_per_s,
        idle_cpu_ms_per_s,
        maps,
        lost,
    })
}
