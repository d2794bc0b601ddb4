//! `cargo xtask bench`: the seven performance figures of docs/performance.md, each printed
//! with the command that made it. Needs root, Postgres, pgbench, bpftool, strace and tcplife
//! (`cargo xtask setup` installs them).
//!
//! These machines are noisy (shared cores, no hardware counters), so costs are measured
//! directly (BPF run time from `kernel.bpf_stats_enabled`, daemon CPU from schedstat,
//! workload CPU from a cgroup's `cpu.stat`) and on / off runs are interleaved, round by round,
//! with the order rotated; medians are printed with their spread.
#![allow(
    clippy::let_underscore_must_use,
    reason = "clean-up of processes, sockets and files that may be gone already, and calls made only to show they do not panic: their results are ignored on purpose"
)]

mod memory;
mod pg;
mod syscall;
mod untracked;
mod util;

use std::{path::PathBuf, time::Instant};

use anyhow::{Result, bail};
use clap::Parser;

use crate::{
    pg::{Cluster, Transport},
    util::{BpfStatsEnabled, Mode, median},
};

#[derive(Parser)]
#[command(name = "bench", about = "Performance figures of the tracer (root)")]
struct Args {
    /// The daemon binary (release build).
    #[arg(long, default_value = "target/release/tracer")]
    tracer: PathBuf,
    /// Interleaved rounds of figure 1 (each: off, tracer, tcplife blocks).
    #[arg(long, default_value_t = 15)]
    tax_rounds: usize,
    /// Interleaved rounds of figures 2/3/7 per transport (each: off, tracer, tcplife runs).
    #[arg(long, default_value_t = 7)]
    rounds: usize,
    /// Seconds per pgbench run.
    #[arg(long, default_value_t = 4)]
    secs: u32,
    /// Alternated pairs of the churn figure.
    #[arg(long, default_value_t = 3)]
    churn_rounds: usize,
    /// Open connections for the memory figure.
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    /// Synthetic connections for the pipeline figure (about 3 records each).
    #[arg(long, default_value_t = 1_000_000)]
    pipeline_connections: u64,
    /// Repetitions of figure 8 (each: every socket kind once).
    #[arg(long, default_value_t = 9)]
    untracked_reps: usize,
    /// Only these figures (comma list of 1-8); default all.
    #[arg(long, value_delimiter = ',')]
    only: Vec<u32>,
}

/// Microseconds the daemon spends reading /proc for one new owner (exe, cmdline, cgroup):
/// done for every open and owner change.
fn proc_details_us(iterations: u32) -> f64 {
    let pid = std::process::id();
    let start = Instant::now();
    for _ in 0..iterations {
        std::hint::black_box(tracer::host::process::read_details(
            std::path::Path::new("/proc"),
            pid,
            tracer::host::redact::CmdlineMode::Redacted,
        ));
    }
    start.elapsed().as_secs_f64() * 1e6 / f64::from(iterations)
}

fn verdict(met: bool) -> &'static str {
    if met { "MET" } else { "MISSED" }
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    format!(
        "{} CPUs ({cpu}), kernel {}, load average {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        kernel.trim(),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    )
}

fn main() -> Result<()> {
    let args = Args::parse();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the benchmark attaches BPF programs and runs Postgres: run it as root");
    }
    if !args.tracer.exists() {
        bail!(
            "{} not found: build it with `cargo build --release -p tracer`",
            args.tracer.display()
        );
    }
    let want = |n: u32| args.only.is_empty() || args.only.contains(&n);
    let started = Instant::now();
    let tracer = args.tracer.canonicalize()?;
    let no_args: Vec<String> = Vec::new();
    println!("tracer bench: {}", machine());
    let others = util::other_bpf_holders();
    if !others.is_empty() {
        println!(
            "note: other processes hold BPF programs during this run (their hooks and CPU add noise): {}",
            others.join(", ")
        );
    }
    let _stats = BpfStatsEnabled::on()?;
    let mut summary: Vec<String> = Vec::new();

    // 5. Pipeline (pure user space, first: nothing else of ours is running).
    if want(5) {
        println!("\n== {}", pipeline_bench::TITLE);
        println!(
            "   command: bench --only 5 (records: open + owner + close per connection, 1000 open at a time)"
        );
        let figure = pipeline_bench::Figure::measure(args.pipeline_connections);
        figure.print();
        let eps = figure.events_per_second();
        let proc_us = proc_details_us(2000);
        println!(
            "   the daemon also reads /proc (exe, cmdline, cgroup) per open and owner change: {proc_us:.1} us each, i.e. at most {:.0} opens/s",
            1e6 / proc_us
        );
        println!("   target >= 2 M events/s: {}", verdict(eps >= 2e6));
        summary.push(format!(
            "5. pipeline: {:.2} M events/s (with JSON: {:.2} M/s) [target >= 2 M: {}]",
            eps / 1e6,
            figure.json_events_per_second() / 1e6,
            verdict(eps >= 2e6)
        ));
    }

    // 1 and 7(1). Tax on unrelated processes.
    let modes = [Mode::Off, Mode::Tracer, Mode::Tcplife];
    let mut tax = None;
    if want(1) || want(7) || want(2) {
        println!(
            "\n== 1. tax on processes that never touch Postgres: ns per syscall, {} rounds, each round one block per mode in rotated order",
            args.tax_rounds
        );
        println!(
            "   command: bench --only 1 (loops: getppid via syscall(2), 50k calls; 64-byte write+read on a pipe, 5k rounds; same on an AF_UNIX socketpair; fastest of {} per block, median over rounds)",
            syscall::SUB_RUNS
        );
        println!(
            "   modes: off | control (an idle `sleep` child, started and stopped like the daemons) | {} run --metrics-addr off --events /dev/null | stdbuf -oL tcplife",
            tracer.display()
        );
        let tax_modes = [Mode::Off, Mode::Control, Mode::Tracer, Mode::Tcplife];
        let t = syscall::measure(&tax_modes, args.tax_rounds, 1, &tracer, &no_args)?;
        t.print(&tax_modes);
        for mode in [Mode::Tracer, Mode::Tcplife] {
            let (ns, runs) = t.bpf_per_run(mode);
            println!(
                "    {} BPF programs during its blocks (bpf_stats): {ns:.0} ns per run, {runs:.0} runs per block ({} socketpair syscalls per block)",
                mode.name(),
                syscall::SUB_RUNS * 10_000
            );
        }
        let added = t.getppid_tax(Mode::Tracer);
        let pipe = median(&t.diffs(Mode::Tracer, 1));
        let unix = median(&t.diffs(Mode::Tracer, 2));
        println!(
            "   target <= 5 ns added (getppid and pipe): {}",
            verdict(added <= 5.0 && pipe <= 5.0)
        );
        summary.push(format!(
            "1. syscall tax vs off, control (idle child): getppid {:+.1} ns, pipe {:+.1} ns, unix {:+.1} ns",
            t.getppid_tax(Mode::Control),
            median(&t.diffs(Mode::Control, 1)),
            median(&t.diffs(Mode::Control, 2)),
        ));
        summary.push(format!(
            "1. syscall tax vs off, tracer: getppid {added:+.1} ns, pipe {pipe:+.1} ns, unix socketpair {unix:+.1} ns; tcplife: getppid {:+.1} ns, pipe {:+.1} ns, unix {:+.1} ns [target <= 5 ns: {}]",
            t.getppid_tax(Mode::Tcplife),
            median(&t.diffs(Mode::Tcplife, 1)),
            median(&t.diffs(Mode::Tcplife, 2)),
            verdict(added <= 5.0 && pipe <= 5.0)
        ));
        tax = Some(t);
        println!("   ({:.0} s so far)", started.elapsed().as_secs_f64());
    }

    // 8. BPF run time on sockets that are not Postgres.
    if want(8) {
        let rounds = 20_000;
        println!(
            "\n== 8. BPF run time per socket syscall on sockets that are not Postgres (bpf_stats of the daemon's programs, host background over an idle interval of the same length subtracted)"
        );
        println!(
            "   command: bench --only 8 (64-byte ping-pong, {rounds} rounds = {} syscalls per kind per repetition, {} repetitions, after a warm-up that lets each socket be judged once)",
            rounds * untracked::SYSCALLS_PER_ROUND,
            args.untracked_reps
        );
        let mut ours = Vec::new();
        for mode in [Mode::Tracer, Mode::Tcplife] {
            let Some(daemon) = util::start_mode(mode, &tracer, &no_args)? else {
                continue;
            };
            let figure =
                untracked::measure(untracked::stats_of(daemon.pid), args.untracked_reps, rounds)?;
            daemon.stop()?;
            println!("   {}:", mode.name());
            figure.print();
            if mode == Mode::Tracer {
                ours = figure.medians();
            }
        }
        // What bpf_stats accounts to any program on these hooks, even an empty one: its own
        // two clock reads per run. The target is about what the tracer adds above it.
        let floor = match tracer::kernel::probes::Probes::attach_stats_floor() {
            Ok(attached) => {
                let figure = untracked::measure(
                    untracked::stats_of(std::process::id()),
                    args.untracked_reps,
                    rounds,
                )?;
                drop(attached);
                println!(
                    "   floor: empty programs alone on the same tracepoints (bpf_stats's own clock reads per run):"
                );
                figure.print();
                figure.medians()
            }
            Err(e) => {
                println!("   floor: not measured ({e:#})");
                vec![0.0; ours.len()]
            }
        };
        let net: Vec<f64> = ours
            .iter()
            .zip(&floor)
            .map(|(o, f)| (o - f).max(0.0))
            .collect();
        let worst = net.iter().copied().fold(0.0, f64::max);
        let kinds: Vec<String> = untracked::KINDS
            .iter()
            .zip(&net)
            .map(|(k, n)| format!("{k} {n:.1} ns"))
            .collect();
        println!("   tracer above the floor: {}", kinds.join(", "));
        println!(
            "   target <= 25 ns (aim < 10) above the floor, each kind: {}",
            verdict(worst <= 25.0)
        );
        summary.push(format!(
            "8. untracked socket I/O, BPF per syscall above the bpf_stats floor: {} [target <= 25 ns: {}]",
            kinds.join(", "),
            verdict(worst <= 25.0)
        ));
        println!("   ({:.0} s so far)", started.elapsed().as_secs_f64());
    }

    if want(2) || want(3) || want(4) || want(7) {
        let cluster = Cluster::start()?;
        // The cluster listens on a free port: the tracer watches it (and the defaults).
        let pg_args: Vec<String> = vec!["--port".into(), format!("5432,6432,{}", cluster.pg.port)];
        for transport in [Transport::Tcp, Transport::Unix] {
            if !(want(2) || want(3) || want(7)) {
                break;
            }
            let syscalls = cluster.syscalls_per_txn(transport)?;
            let w = pg::measure_workload(
                &cluster,
                transport,
                &modes,
                args.rounds,
                args.secs,
                &tracer,
                &pg_args,
            )?;
            let work = w.workload_ns_per_txn();
            println!(
                "\n== 2/3/7. pgbench select-only, 4 clients, over {} ({} rounds of off / tracer / tcplife, rotated)",
                transport.name(),
                args.rounds
            );
            println!("   command: {}", w.command);
            println!(
                "   syscalls per transaction (client + backend, strace -f -c, difference of two run lengths): {syscalls:.1}"
            );
            println!(
                "   workload CPU without tracer (cgroup cpu.stat of Postgres + pgbench): {:.1} us per transaction; tps off {:.0}",
                work / 1e3,
                w.tps(Mode::Off)
            );
            for mode in [Mode::Tracer, Mode::Tcplife] {
                let raw = w.bpf_ns_per_txn(mode);
                let bpf = w.own_bpf_ns_per_txn(mode);
                let daemon = w.daemon_ns_per_txn(mode);
                let added = tax.as_ref().map_or(0.0, |t| t.getppid_tax(mode).max(0.0));
                let tax_term = added * syscalls;
                let pct = (bpf + daemon + tax_term) / work * 100.0;
                println!(
                    "   {:8} BPF run time during the runs {raw:.0} ns/txn ({:.1} runs/txn), of which host background (other processes' socket I/O, from a 1 s idle window before each run) {:.0} ns/txn ({:.1} runs/txn)",
                    mode.name(),
                    w.runs_per_txn(mode),
                    w.background_ns_per_txn(mode),
                    w.background_runs_per_txn(mode),
                );
                println!(
                    "   {:8} BPF {bpf:7.0} ns/txn + daemon CPU {daemon:7.0} ns/txn + syscall tax {added:.1} ns x {syscalls:.1} = {tax_term:.0} ns/txn -> {pct:.3} % of the workload's CPU",
                    mode.name(),
                );
                pg::print_ratio(
                    &format!("{:8} TPS on/off", mode.name()),
                    &w.tps_ratios(mode),
                );
                let ratio = median(&w.tps_ratios(mode));
                if mode == Mode::Tracer {
                    println!("   target <= 1 % (aim 0.5 %): {}", verdict(pct <= 1.0));
                    summary.push(format!(
                        "2. cost per txn over {}: {pct:.3} % (BPF {bpf:.0} + daemon {daemon:.0} + tax {tax_term:.0} ns of {:.1} us) [target <= 1 %: {}]",
                        transport.name(),
                        work / 1e3,
                        verdict(pct <= 1.0)
                    ));
                    let (lo, hi) = util::min_max(&w.tps_ratios(mode));
                    summary.push(format!(
                        "3. TPS on/off over {}: median {ratio:.3} of {} pairs (range {lo:.3}..{hi:.3})",
                        transport.name(),
                        w.tps_ratios(mode).len()
                    ));
                } else {
                    summary.push(format!(
                        "7. tcplife over {}: {pct:.3} % per txn (BPF {bpf:.0} + its CPU {daemon:.0} ns), TPS on/off {ratio:.3}",
                        transport.name()
                    ));
                }
            }
            println!("   ({:.0} s so far)", started.elapsed().as_secs_f64());
        }

        if want(4) {
            for transport in [Transport::Tcp, Transport::Unix] {
                let c = pg::measure_churn(
                    &cluster,
                    transport,
                    args.churn_rounds,
                    args.secs,
                    &tracer,
                    &pg_args,
                )?;
                let off = median(&c.tps_off);
                let on = median(&c.tps_on);
                println!(
                    "\n== 4. connection churn over {} (connect / query / close), {} alternated pairs",
                    transport.name(),
                    args.churn_rounds
                );
                println!("   command: {}", c.command);
                println!("   tracer:  {}", c.tracer_command);
                println!(
                    "   connections/s: off {off:.0}, on {on:.0} (ratio {:.3}; off {:?}, on {:?})",
                    on / off,
                    c.tps_off.iter().map(|x| x.round()).collect::<Vec<_>>(),
                    c.tps_on.iter().map(|x| x.round()).collect::<Vec<_>>()
                );
                println!(
                    "   with the tracer: {} transactions (= connections); events: client open {} close {}, server open {} close {}; lost {}",
                    c.txns_on,
                    c.client_opens,
                    c.client_closes,
                    c.server_opens,
                    c.server_closes,
                    c.lost
                );
                let complete = c.lost == 0
                    && c.client_opens >= c.txns_on
                    && c.server_opens >= c.txns_on
                    && c.client_closes == c.client_opens
                    && c.server_closes == c.server_opens;
                println!(
                    "   zero lost events, every connection seen open and closed: {}",
                    verdict(complete)
                );
                summary.push(format!(
                    "4. churn over {}: {off:.0} -> {on:.0} conn/s (ratio {:.3}); {} conns, events {}/{} client, {}/{} server open/close, lost {} [{}]",
                    transport.name(),
                    on / off,
                    c.txns_on,
                    c.client_opens,
                    c.client_closes,
                    c.server_opens,
                    c.server_closes,
                    c.lost,
                    verdict(complete)
                ));
                println!("   ({:.0} s so far)", started.elapsed().as_secs_f64());
            }
        }
    }

    if want(6) {
        let m = memory::measure(&tracer, args.connections)?;
        println!(
            "\n== 6. memory with {} open loopback TCP connections on a watched port ({} tracked sockets: both ends are local)",
            m.connections, m.tracked
        );
        println!("   command: {} (bench opens the connections)", m.command);
        println!(
            "   daemon RSS: {:.1} MB idle before, {:.1} MB with them open (peak {:.1} MB); daemon CPU (/proc/PID/stat) in the 10 s after the opens: {:.1} ms/s, then while they sit idle (30 s): {:.1} ms/s; lost events: {}",
            m.rss_idle_kb as f64 / 1024.0,
            m.rss_kb as f64 / 1024.0,
            m.hwm_kb as f64 / 1024.0,
            m.settle_cpu_ms_per_s,
            m.idle_cpu_ms_per_s,
            m.lost
        );
        let total: u64 = m.maps.iter().map(|x| x.2).sum();
        let mut maps = m.maps.clone();
        maps.sort_by_key(|x| std::cmp::Reverse(x.2));
        println!(
            "   kernel maps (bpftool map show, bytes_memlock): {:.1} MB in total: {}",
            total as f64 / 1048576.0,
            maps.iter()
                .map(|(n, t, b, e)| format!(
                    "{n} ({t}, {e} entries) {:.2} MB",
                    *b as f64 / 1048576.0
                ))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let met = m.rss_kb <= 64 * 1024;
        let cpu_met = m.idle_cpu_ms_per_s <= 5.0;
        println!("   target RSS <= 64 MB: {}", verdict(met));
        println!("   target idle CPU <= 5 ms/s: {}", verdict(cpu_met));
        summary.push(format!(
            "6. memory: RSS {:.1} MB with {} tracked sockets (peak {:.1} MB), kernel maps {:.1} MB, idle CPU {:.1} ms/s ({:.1} ms/s in the 10 s after the opens) [targets <= 64 MB: {}, <= 5 ms/s: {}]",
            m.rss_kb as f64 / 1024.0,
            m.tracked,
            m.hwm_kb as f64 / 1024.0,
            total as f64 / 1048576.0,
            m.idle_cpu_ms_per_s,
            m.settle_cpu_ms_per_s,
            verdict(met),
            verdict(cpu_met)
        ));
    }

    println!(
        "\n== summary ({:.0} s in all)",
        started.elapsed().as_secs_f64()
    );
    summary.sort();
    for line in summary {
        println!("   {line}");
    }
    Ok(())
}
