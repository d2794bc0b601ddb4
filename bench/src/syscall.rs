//! Figure 1: the tax on processes that never touch Postgres, in ns per syscall.

use std::{path::Path, time::Instant};

use anyhow::{Result, bail};

use crate::util::{Mode, median, min_max, start_mode};

/// The loops timed in each block.
pub(crate) const LOOPS: [&str; 3] = ["getppid", "pipe", "unix"];

/// ns per `getppid()` (raw syscall).
fn getppid_ns(calls: u32) -> f64 {
    let start = Instant::now();
    for _ in 0..calls {
        // SAFETY: getppid has no arguments and no side effects.
        unsafe { libc::syscall(libc::SYS_getppid) };
    }
    start.elapsed().as_nanos() as f64 / f64::from(calls)
}

/// ns per syscall of a write(64 B) + read(64 B) loop on a pair of fds (pipe or socketpair).
fn write_read_ns(fds: [i32; 2], rounds: u32) -> f64 {
    let out = [7u8; 64];
    let mut buf = [0u8; 64];
    let start = Instant::now();
    for _ in 0..rounds {
        // SAFETY: valid fds and buffers of the given length.
        unsafe {
            libc::write(fds[1], out.as_ptr().cast(), out.len());
            libc::read(fds[0], buf.as_mut_ptr().cast(), buf.len());
        }
    }
    start.elapsed().as_nanos() as f64 / f64::from(rounds * 2)
}

struct Fds {
    pipe: [i32; 2],
    unix: [i32; 2],
}

impl Fds {
    fn open() -> Result<Self> {
        let mut pipe = [0i32; 2];
        let mut unix = [0i32; 2];
        // SAFETY: arrays of two ints, as pipe(2) and socketpair(2) want.
        let ok = unsafe {
            libc::pipe(pipe.as_mut_ptr()) == 0
                && libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, unix.as_mut_ptr()) == 0
        };
        if !ok {
            bail!("pipe/socketpair: {}", std::io::Error::last_os_error());
        }
        Ok(Self { pipe, unix })
    }
}

impl Drop for Fds {
    fn drop(&mut self) {
        for fd in self.pipe.iter().chain(&self.unix) {
            // SAFETY: fds this struct opened.
            unsafe { libc::close(*fd) };
        }
    }
}

/// Short runs per loop in one block.
pub(crate) const SUB_RUNS: usize = 9;

/// One block: the fastest of a few short runs of each loop, ns per syscall. Other load on
/// the machine only ever adds time (preemption, cache pollution), so the minimum of short
/// runs is the stable estimate of the syscall's own cost.
fn block(fds: &Fds, scale: u32) -> [f64; 3] {
    let mut best = [f64::INFINITY; 3];
    for _ in 0..SUB_RUNS {
        best[0] = best[0].min(getppid_ns(50_000 * scale));
        best[1] = best[1].min(write_read_ns(fds.pipe, 5_000 * scale));
        best[2] = best[2].min(write_read_ns(fds.unix, 5_000 * scale));
    }
    best
}

/// ns per syscall of each loop, per mode, per round.
pub(crate) struct Tax {
    pub rounds: Vec<Vec<(Mode, [f64; 3])>>,
    /// Per attached block: (mode, BPF run time ns, program runs) of the daemon's programs,
    /// fired by the socketpair loop (and whatever socket I/O the host did meanwhile).
    pub bpf: Vec<(Mode, u64, u64)>,
}

impl Tax {
    pub(crate) fn values(&self, mode: Mode, which: usize) -> Vec<f64> {
        self.rounds
            .iter()
            .flat_map(|r| r.iter().filter(|(m, _)| *m == mode).map(|(_, v)| v[which]))
            .collect()
    }

    /// Per-round difference `mode - off`.
    pub(crate) fn diffs(&self, mode: Mode, which: usize) -> Vec<f64> {
        self.rounds
            .iter()
            .filter_map(|r| {
                let on = r.iter().find(|(m, _)| *m == mode)?.1[which];
                let off = r.iter().find(|(m, _)| *m == Mode::Off)?.1[which];
                Some(on - off)
            })
            .collect()
    }

    /// Median per-round added ns per syscall of `mode` on the getppid loop (the figure used
    /// in the per-transaction cost).
    pub(crate) fn getppid_tax(&self, mode: Mode) -> f64 {
        median(&self.diffs(mode, 0))
    }

    /// ns per BPF program run of `mode` during the blocks, and runs per block.
    pub(crate) fn bpf_per_run(&self, mode: Mode) -> (f64, f64) {
        let of: Vec<_> = self.bpf.iter().filter(|b| b.0 == mode).collect();
        let ns: u64 = of.iter().map(|b| b.1).sum();
        let runs: u64 = of.iter().map(|b| b.2).sum();
        (
            ns as f64 / runs.max(1) as f64,
            runs as f64 / of.len().max(1) as f64,
        )
    }

    pub(crate) fn print(&self, modes: &[Mode]) {
        for (which, name) in LOOPS.iter().enumerate() {
            let off = median(&self.values(Mode::Off, which));
            let mut line = format!("    {name:8} off {off:7.1} ns/syscall");
            for &mode in modes.iter().filter(|m| **m != Mode::Off) {
                let on = median(&self.values(mode, which));
                let d = self.diffs(mode, which);
                let (lo, hi) = min_max(&d);
                line += &format!(
                    " | {} {on:7.1} (added {:+6.1} ns, per-round range {lo:+.1}..{hi:+.1})",
                    mode.name(),
                    median(&d)
                );
            }
            println!("{line}");
        }
    }
}

pub(crate) fn measure(
    modes: &[Mode],
    rounds: usize,
    scale: u32,
    tracer_bin: &Path,
    tracer_args: &[String],
) -> Result<Tax> {
    let fds = Fds::open()?;
    // Warm-up.
    let _ = block(&fds, 1);
    let mut all = Vec::new();
    let mut bpf = Vec::new();
    for round in 0..rounds {
        let mut this = Vec::new();
        for mode in Mode::rotation(modes, round) {
            let daemon = start_mode(mode, tracer_bin, tracer_args)?;
            let before = match (&daemon, mode) {
                (Some(d), Mode::Tracer | Mode::Tcplife) => Some(d.bpf_stats()?),
                _ => None,
            };
            let values = block(&fds, scale);
            if let Some(d) = daemon {
                if let Some(before) = before {
                    let after = d.bpf_stats()?;
                    bpf.push((
                        mode,
                        after.run_time_ns - before.run_time_ns,
                        after.run_cnt - before.run_cnt,
                    ));
                }
                d.stop()?;
            }
            this.push((mode, values));
        }
        all.push(this);
    }
    Ok(Tax { rounds: all, bpf })
}
