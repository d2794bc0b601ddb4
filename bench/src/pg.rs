//! Figures 2, 3, 4 and 7: pgbench against a real Postgres, tracer (or tcplife) on / off.

use std::{
    fs,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result};
use tests::{Event, Postgres, TempDir};

use crate::util::{BpfStats, Daemon, Mode, WorkloadCgroup, median, min_max, start_mode};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Transport {
    Tcp,
    Unix,
}

impl Transport {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Unix => "unix",
        }
    }
}

/// A Postgres cluster whose processes, and the pgbench runs, are in one cgroup.
pub(crate) struct Cluster {
    pub pg: Postgres,
    pub cgroup: WorkloadCgroup,
}

pub(crate) struct PgbenchResult {
    pub txns: u64,
    pub tps: f64,
}

/// One timed pgbench run.
pub(crate) struct Run {
    pub mode: Mode,
    pub txns: u64,
    pub tps: f64,
    pub workload_ns: u64,
    pub bpf: BpfStats,
    /// BPF run time and runs expected from the rest of the host over the run's duration,
    /// from an idle window of the same length just before it (other processes' socket I/O
    /// fires the same hooks).
    pub background_ns: f64,
    pub background_cnt: f64,
    pub daemon_ns: u64,
}

/// Idle window before each attached run, to estimate the host's background BPF work.
const BACKGROUND_WINDOW: Duration = Duration::from_secs(1);

impl Cluster {
    pub(crate) fn start() -> Result<Self> {
        let cgroup = WorkloadCgroup::create()?;
        let pg = cgroup.inside(Postgres::start)??;
        let cluster = Self { pg, cgroup };
        let (mut init, _) = cluster.pgbench(Transport::Unix, &["-i", "-s", "1", "-q"]);
        tests::run_ok(&mut init).context("pgbench -i")?;
        Ok(cluster)
    }

    fn host(&self, transport: Transport) -> String {
        match transport {
            Transport::Tcp => "127.0.0.1".into(),
            Transport::Unix => self.pg.socket_dir.display().to_string(),
        }
    }

    /// pgbench against this cluster, in the workload cgroup, and how to type it.
    pub(crate) fn pgbench(&self, transport: Transport, args: &[&str]) -> (Command, String) {
        let mut cmd = self.cgroup.command("pgbench");
        let host = self.host(transport);
        let port = self.pg.port.to_string();
        let common = ["-h", &host, "-p", &port, "-U", "postgres"];
        cmd.args(common)
            .args(args)
            .arg("postgres")
            .env("PGSSLMODE", "disable")
            .stdin(Stdio::null());
        let text = format!("pgbench {} {} postgres", common.join(" "), args.join(" "));
        (cmd, text)
    }

    pub(crate) fn run_pgbench(&self, mut cmd: Command) -> Result<PgbenchResult> {
        let out = tests::run_ok(&mut cmd)?;
        let text = String::from_utf8_lossy(&out.stdout);
        let txns = text
            .lines()
            .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
            .and_then(|v| v.split(['/', ' ']).next()?.trim().parse().ok())
            .with_context(|| format!("no transaction count in pgbench output:\n{text}"))?;
        let tps = text
            .lines()
            .find_map(|l| l.strip_prefix("tps = "))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .with_context(|| format!("no tps in pgbench output:\n{text}"))?;
        Ok(PgbenchResult { txns, tps })
    }

    /// One pgbench run of `secs` with `mode` attached; costs measured around the run only.
    pub(crate) fn timed_run(
        &self,
        mode: Mode,
        transport: Transport,
        args: &[&str],
        tracer_bin: &Path,
        tracer_args: &[String],
    ) -> Result<Run> {
        let daemon = start_mode(mode, tracer_bin, tracer_args)?;
        let (cmd, _) = self.pgbench(transport, args);
        let idle0 = daemon.as_ref().map(Daemon::bpf_stats).transpose()?;
        let idle_start = std::time::Instant::now();
        if daemon.is_some() {
            std::thread::sleep(BACKGROUND_WINDOW);
        }
        let idle_secs = idle_start.elapsed().as_secs_f64();
        let idle1 = daemon.as_ref().map(Daemon::bpf_stats).transpose()?;
        let bpf0 = daemon
            .as_ref()
            .map(Daemon::bpf_stats)
            .transpose()?
            .unwrap_or_default();
        let cpu0 = daemon.as_ref().map_or(0, Daemon::cpu_ns);
        let work0 = self.cgroup.usage_ns();
        let run_start = std::time::Instant::now();
        let result = self.run_pgbench(cmd)?;
        let run_secs = run_start.elapsed().as_secs_f64();
        // Backends finish their exit after pgbench returns.
        std::thread::sleep(Duration::from_millis(100));
        let work1 = self.cgroup.usage_ns();
        let cpu1 = daemon.as_ref().map_or(0, Daemon::cpu_ns);
        let bpf1 = daemon
            .as_ref()
            .map(Daemon::bpf_stats)
            .transpose()?
            .unwrap_or_default();
        if let Some(d) = daemon {
            d.stop()?;
        }
        Ok(Run {
            mode,
            txns: result.txns,
            tps: result.tps,
            workload_ns: work1 - work0,
            bpf: BpfStats {
                run_time_ns: bpf1.run_time_ns - bpf0.run_time_ns,
                run_cnt: bpf1.run_cnt - bpf0.run_cnt,
            },
            background_ns: match (idle0, idle1) {
                (Some(a), Some(b)) => (b.run_time_ns - a.run_time_ns) as f64 * run_secs / idle_secs,
                _ => 0.0,
            },
            background_cnt: match (idle0, idle1) {
                (Some(a), Some(b)) => (b.run_cnt - a.run_cnt) as f64 * run_secs / idle_secs,
                _ => 0.0,
            },
            daemon_ns: cpu1 - cpu0,
        })
    }

    /// The postmaster: the Postgres process in the cgroup whose parent is not one.
    fn postmaster(&self) -> Result<u32> {
        let pids: Vec<u32> = fs::read_to_string(self.cgroup.path.join("cgroup.procs"))?
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect();
        let ppid = |pid: u32| -> Option<u32> {
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            stat.rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        };
        pids.iter()
            .copied()
            .find(|&p| ppid(p).is_some_and(|pp| !pids.contains(&pp)))
            .context("postmaster not found in the workload cgroup")
    }

    /// Syscalls per select-only transaction (client + backend), counted with strace as the
    /// difference of two runs so connection start-up cancels out.
    pub(crate) fn syscalls_per_txn(&self, transport: Transport) -> Result<f64> {
        let dir = TempDir::new("bench-strace")?;
        let postmaster = self.postmaster()?;
        let mut totals = Vec::new();
        for per_client in [100u64, 600] {
            let server_out = dir.0.join(format!("server-{per_client}"));
            let client_out = dir.0.join(format!("client-{per_client}"));
            let mut strace = Command::new("strace")
                .args(["-f", "-c", "-o"])
                .arg(&server_out)
                .args(["-p", &postmaster.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("spawning strace")?;
            std::thread::sleep(Duration::from_millis(500));
            let t = per_client.to_string();
            let (client, _) =
                self.pgbench(transport, &["-n", "-S", "-c", "4", "-j", "2", "-t", &t]);
            let mut traced = Command::new("strace");
            traced
                .args(["-f", "-c", "-o"])
                .arg(&client_out)
                .arg(client.get_program())
                .args(client.get_args())
                .env("PGSSLMODE", "disable");
            tests::run_ok(&mut traced)?;
            std::thread::sleep(Duration::from_millis(300));
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(strace.id() as i32, libc::SIGINT) };
            strace.wait()?;
            totals.push(strace_total(&server_out)? + strace_total(&client_out)?);
        }
        Ok((totals[1] as f64 - totals[0] as f64) / (500.0 * 4.0))
    }
}

/// The `total` calls of an `strace -c` summary.
fn strace_total(path: &Path) -> Result<u64> {
    let text = fs::read_to_string(path)?;
    text.lines()
        .rev()
        .find(|l| l.trim_end().ends_with("total"))
        .and_then(|l| l.split_whitespace().nth(3)?.parse().ok())
        .with_context(|| format!("no total in strace summary {}:\n{text}", path.display()))
}

/// All runs of figures 2, 3 and 7 for one transport.
pub(crate) struct Workload {
    pub command: String,
    pub runs: Vec<Vec<Run>>,
}

impl Workload {
    fn of(&self, mode: Mode) -> impl Iterator<Item = &Run> {
        self.runs.iter().flatten().filter(move |r| r.mode == mode)
    }

    /// The median over the runs of `mode` of `per_run(run)` divided by its transactions.
    fn median_per_txn(&self, mode: Mode, per_run: impl Fn(&Run) -> f64) -> f64 {
        median(
            &self
                .of(mode)
                .map(|r| per_run(r) / r.txns as f64)
                .collect::<Vec<_>>(),
        )
    }

    /// Median workload CPU per transaction without any tracer, ns.
    pub(crate) fn workload_ns_per_txn(&self) -> f64 {
        self.median_per_txn(Mode::Off, |r| r.workload_ns as f64)
    }

    pub(crate) fn bpf_ns_per_txn(&self, mode: Mode) -> f64 {
        self.median_per_txn(mode, |r| r.bpf.run_time_ns as f64)
    }

    /// Host background BPF work during the run (estimated), per transaction.
    pub(crate) fn background_ns_per_txn(&self, mode: Mode) -> f64 {
        self.median_per_txn(mode, |r| r.background_ns)
    }

    pub(crate) fn background_runs_per_txn(&self, mode: Mode) -> f64 {
        self.median_per_txn(mode, |r| r.background_cnt)
    }

    /// BPF run time per transaction with the host's background removed, ns (>= 0).
    pub(crate) fn own_bpf_ns_per_txn(&self, mode: Mode) -> f64 {
        median(
            &self
                .of(mode)
                .map(|r| ((r.bpf.run_time_ns as f64 - r.background_ns) / r.txns as f64).max(0.0))
                .collect::<Vec<_>>(),
        )
    }

    pub(crate) fn runs_per_txn(&self, mode: Mode) -> f64 {
        self.median_per_txn(mode, |r| r.bpf.run_cnt as f64)
    }

    pub(crate) fn daemon_ns_per_txn(&self, mode: Mode) -> f64 {
        self.median_per_txn(mode, |r| r.daemon_ns as f64)
    }

    /// Per-round TPS ratio mode / off.
    pub(crate) fn tps_ratios(&self, mode: Mode) -> Vec<f64> {
        self.runs
            .iter()
            .filter_map(|round| {
                let on = round.iter().find(|r| r.mode == mode)?.tps;
                let off = round.iter().find(|r| r.mode == Mode::Off)?.tps;
                Some(on / off)
            })
            .collect()
    }

    pub(crate) fn tps(&self, mode: Mode) -> f64 {
        median(&self.of(mode).map(|r| r.tps).collect::<Vec<_>>())
    }
}

pub(crate) fn measure_workload(
    cluster: &Cluster,
    transport: Transport,
    modes: &[Mode],
    rounds: usize,
    secs: u32,
    tracer_bin: &Path,
    tracer_args: &[String],
) -> Result<Workload> {
    let t = secs.to_string();
    let args = ["-n", "-S", "-c", "4", "-j", "2", "-T", &t];
    let (_, command) = cluster.pgbench(transport, &args);
    // Warm the caches once.
    let (warm, _) = cluster.pgbench(transport, &["-n", "-S", "-c", "4", "-j", "2", "-T", "1"]);
    cluster.run_pgbench(warm)?;
    let mut runs = Vec::new();
    for round in 0..rounds {
        let mut this = Vec::new();
        for mode in Mode::rotation(modes, round) {
            this.push(cluster.timed_run(mode, transport, &args, tracer_bin, tracer_args)?);
        }
        runs.push(this);
    }
    Ok(Workload { command, runs })
}

pub(crate) fn print_ratio(label: &str, ratios: &[f64]) {
    let (lo, hi) = min_max(ratios);
    let list: Vec<String> = ratios.iter().map(|r| format!("{r:.3}")).collect();
    println!(
        "    {label}: median {:.3} (range {lo:.3}..{hi:.3}; pairs: {})",
        median(ratios),
        list.join(" ")
    );
}

/// Figure 4: connection churn with and without the tracer, and the events it wrote.
pub(crate) struct Churn {
    pub command: String,
    pub tracer_command: String,
    pub tps_off: Vec<f64>,
    pub tps_on: Vec<f64>,
    pub txns_on: u64,
    pub client_opens: u64,
    pub client_closes: u64,
    pub server_opens: u64,
    pub server_closes: u64,
    pub lost: u64,
}

pub(crate) fn measure_churn(
    cluster: &Cluster,
    transport: Transport,
    rounds: usize,
    secs: u32,
    tracer_bin: &Path,
    tracer_args: &[String],
) -> Result<Churn> {
    let t = secs.to_string();
    let args = ["-n", "-S", "-C", "-c", "4", "-j", "2", "-T", &t];
    let (_, command) = cluster.pgbench(transport, &args);
    let dir = TempDir::new("bench-churn")?;
    let mut churn = Churn {
        command,
        tracer_command: String::new(),
        tps_off: Vec::new(),
        tps_on: Vec::new(),
        txns_on: 0,
        client_opens: 0,
        client_closes: 0,
        server_opens: 0,
        server_closes: 0,
        lost: 0,
    };
    let port = cluster.pg.port;
    let socket_dir = cluster.pg.socket_dir.display().to_string();
    for round in 0..rounds {
        for on in if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        } {
            if !on {
                let (cmd, _) = cluster.pgbench(transport, &args);
                churn.tps_off.push(cluster.run_pgbench(cmd)?.tps);
                continue;
            }
            let events = dir.0.join(format!("events-{round}.jsonl"));
            let events_str = events.display().to_string();
            let daemon = Daemon::tracer(tracer_bin, &events_str, tracer_args)?;
            churn.tracer_command = daemon.command.clone();
            let (cmd, _) = cluster.pgbench(transport, &args);
            let result = cluster.run_pgbench(cmd)?;
            // Let the last closes reach the daemon before it stops: TCP closes come from the
            // kernel at once, Unix closes from the daemon's 1 s sock_diag sweep.
            std::thread::sleep(Duration::from_millis(2500));
            daemon.stop()?;
            churn.tps_on.push(result.tps);
            churn.txns_on += result.txns;
            let text = fs::read_to_string(&events)?;
            for line in text.lines() {
                let e = Event::parse(line).map_err(anyhow::Error::msg)?;
                if e.kind == "lost" {
                    churn.lost += e.count.unwrap_or(0);
                    continue;
                }
                let ours = match transport {
                    Transport::Tcp => {
                        tests::port_of(&e.local) == Some(port)
                            || tests::port_of(&e.remote) == Some(port)
                    }
                    Transport::Unix => e.remote.starts_with(&socket_dir),
                };
                if !ours || e.comm == "psql" || e.preexisting == Some(true) {
                    continue;
                }
                let client = e.role == "client";
                match (e.kind.as_str(), client) {
                    ("open", true) => churn.client_opens += 1,
                    ("open", false) => churn.server_opens += 1,
                    ("close", true) => churn.client_closes += 1,
                    ("close", false) => churn.server_closes += 1,
                    _ => {}
                }
            }
        }
    }
    Ok(churn)
}
