//! Figure 8: the tracer's BPF run time per socket syscall of a process that never touches
//! Postgres, for the three kinds of socket a host is full of: TCP loopback on an unwatched
//! port (web servers, proxies, sidecars), an AF_UNIX socket pair, and a named Unix stream
//! socket outside the watched glob (docker.sock, D-Bus).
//!
//! Measured directly: the run time the kernel accounts to the daemon's programs
//! (`kernel.bpf_stats_enabled`) over a ping-pong loop, minus what the same programs ran for
//! the rest of the host during an idle interval of the same length right before.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    os::unix::net::{UnixListener, UnixStream},
    path::Path,
    thread,
    time::{Duration, Instant},
};

use anyhow::Result;

use crate::util::{BpfStats, bpf_prog_stats, held_bpf_ids, median, min_max};

/// The kinds measured, in print order.
pub(crate) const KINDS: [&str; 3] = ["tcp loopback", "unix socketpair", "unix named"];

/// A connected pair of one kind: (writer end, reader end).
struct Pair {
    a: Box<dyn ReadWrite>,
    b: Box<dyn ReadWrite>,
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

fn pairs(dir: &Path) -> Result<Vec<Pair>> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let tcp = TcpStream::connect(listener.local_addr()?)?;
    let (tcp_peer, _) = listener.accept()?;
    tcp.set_nodelay(true)?;
    tcp_peer.set_nodelay(true)?;
    let (u1, u2) = UnixStream::pair()?;
    let path = dir.join("other.sock");
    let unix_listener = UnixListener::bind(&path)?;
    let named = UnixStream::connect(&path)?;
    let (named_peer, _) = unix_listener.accept()?;
    Ok(vec![
        Pair {
            a: Box::new(tcp),
            b: Box::new(tcp_peer),
        },
        Pair {
            a: Box::new(u1),
            b: Box::new(u2),
        },
        Pair {
            a: Box::new(named),
            b: Box::new(named_peer),
        },
    ])
}

/// `rounds` ping-pongs of 64 bytes each way: 4 socket syscalls per round.
fn ping_pong(pair: &mut Pair, rounds: u32) -> Result<()> {
    let out = [7u8; 64];
    let mut buf = [0u8; 64];
    for _ in 0..rounds {
        pair.a.write_all(&out)?;
        pair.b.read_exact(&mut buf)?;
        pair.b.write_all(&out)?;
        pair.a.read_exact(&mut buf)?;
    }
    Ok(())
}

pub(crate) const SYSCALLS_PER_ROUND: u32 = 4;

/// Per kind: BPF ns per socket syscall, one value per repetition.
pub(crate) struct Untracked {
    pub per_syscall_ns: Vec<Vec<f64>>,
}

fn delta(after: BpfStats, before: BpfStats) -> (f64, f64) {
    (
        after.run_time_ns.saturating_sub(before.run_time_ns) as f64,
        after.run_cnt.saturating_sub(before.run_cnt) as f64,
    )
}

/// Where the programs whose run time counts are: a daemon, or this process (the empty
/// calibration programs it attached itself).
pub(crate) fn stats_of(pid: u32) -> impl Fn() -> Result<BpfStats> {
    move || bpf_prog_stats(&held_bpf_ids(pid, "prog_id:"))
}

pub(crate) fn measure(
    stats: impl Fn() -> Result<BpfStats>,
    repetitions: usize,
    rounds: u32,
) -> Result<Untracked> {
    let dir = tests::TempDir::new("bench-untracked")?;
    let mut pairs = pairs(&dir.0)?;
    // First I/O: each socket is judged once (and marked); that is not the steady state.
    for pair in &mut pairs {
        ping_pong(pair, 100)?;
    }
    let mut per_syscall_ns = vec![Vec::new(); KINDS.len()];
    for _ in 0..repetitions {
        for (kind, pair) in pairs.iter_mut().enumerate() {
            let start = Instant::now();
            let before = stats()?;
            ping_pong(pair, rounds)?;
            let after = stats()?;
            let busy = start.elapsed();
            // The host's own socket I/O runs the same programs: take it off, measured over
            // an idle interval of the same length.
            let idle_start = Instant::now();
            let idle_before = stats()?;
            thread::sleep(busy.min(Duration::from_secs(2)));
            let idle_after = stats()?;
            let idle = idle_start.elapsed();
            let (ns, _) = delta(after, before);
            let (background, _) = delta(idle_after, idle_before);
            let background = background * busy.as_secs_f64() / idle.as_secs_f64().max(1e-6);
            let syscalls = f64::from(rounds * SYSCALLS_PER_ROUND);
            per_syscall_ns[kind].push(((ns - background) / syscalls).max(0.0));
        }
    }
    Ok(Untracked { per_syscall_ns })
}

impl Untracked {
    /// Each kind's median.
    pub(crate) fn medians(&self) -> Vec<f64> {
        self.per_syscall_ns.iter().map(|v| median(v)).collect()
    }

    pub(crate) fn print(&self) {
        for (kind, values) in KINDS.iter().zip(&self.per_syscall_ns) {
            let (lo, hi) = min_max(values);
            println!(
                "    {kind:16} {:6.1} ns of BPF per socket syscall (median of {}, range {lo:.1}..{hi:.1})",
                median(values),
                values.len()
            );
        }
    }
}
