//! Shared measuring tools: the daemons under test, BPF run-time statistics, CPU clocks,
//! cgroup CPU accounting, and small statistics.

use std::{
    collections::HashSet,
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

/// Median of the values (NaN for none).
pub(crate) fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

pub(crate) fn min_max(values: &[f64]) -> (f64, f64) {
    values
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        })
}

/// What is being measured against: nothing, our daemon, or libbpf-tools' tcplife.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    Off,
    /// An idle child process started and stopped like the daemons: shows what the harness
    /// itself changes.
    Control,
    Tracer,
    Tcplife,
}

impl Mode {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Mode::Off => "off",
            Mode::Control => "control",
            Mode::Tracer => "tracer",
            Mode::Tcplife => "tcplife",
        }
    }

    /// The modes of round `round`, rotated so none is always first.
    pub(crate) fn rotation(modes: &[Mode], round: usize) -> Vec<Mode> {
        let n = modes.len();
        (0..n).map(|i| modes[(i + round) % n]).collect()
    }
}

/// A running tracer (`tracer run`), tcplife or control process, stopped on drop. Its output
/// goes to a file that is polled for the ready line: no reader thread, because a second
/// thread in this process would itself slow the fd syscalls being timed (a process whose
/// file table is shared takes atomic references on every fd lookup).
pub(crate) struct Daemon {
    child: Option<Child>,
    pub pid: u32,
    pub command: String,
    stop_signal: i32,
    output: PathBuf,
    _dir: tests::TempDir,
}

impl Daemon {
    /// `tracer run --metrics-addr off --events EVENTS ARGS`, ready when it logs `ready:`.
    pub(crate) fn tracer(bin: &Path, events: &str, args: &[String]) -> Result<Self> {
        let mut cmd = Command::new(bin);
        cmd.args(["run", "--metrics-addr", "off", "--events", events])
            .args(args);
        let command = format!(
            "{} run --metrics-addr off --events {events}{}",
            bin.display(),
            args.iter().map(|a| format!(" {a}")).collect::<String>()
        );
        Self::start(cmd, command, "ready:", libc::SIGTERM, false)
    }

    /// libbpf-tools' `tcplife` (line-buffered), ready once it prints its header.
    pub(crate) fn tcplife() -> Result<Self> {
        tests::ensure_tracefs()?;
        let mut cmd = Command::new("stdbuf");
        cmd.args(["-oL", "tcplife"]);
        Self::start(cmd, "tcplife".into(), "PID", libc::SIGINT, true)
    }

    /// An idle process (`sleep`) started and stopped the same way as the daemons.
    pub(crate) fn control() -> Result<Self> {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo ready; exec sleep 3600"]);
        Self::start(cmd, "sleep 3600".into(), "ready", libc::SIGINT, true)
    }

    fn start(
        mut cmd: Command,
        command: String,
        marker: &'static str,
        stop_signal: i32,
        ready_on_stdout: bool,
    ) -> Result<Self> {
        let dir = tests::TempDir::new("bench-daemon")?;
        let output = dir.0.join("output");
        let file = fs::File::create(&output)?;
        cmd.stdin(Stdio::null());
        if ready_on_stdout {
            cmd.stdout(file).stderr(Stdio::null());
        } else {
            cmd.stdout(Stdio::null()).stderr(file);
        }
        let child = cmd.spawn().with_context(|| format!("spawning {command}"))?;
        let pid = child.id();
        let mut daemon = Self {
            child: Some(child),
            pid,
            command,
            stop_signal,
            output,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let text = fs::read_to_string(&daemon.output).unwrap_or_default();
            if text.contains(marker) {
                return Ok(daemon);
            }
            let exited = tests::exit_status(&mut daemon.child);
            if exited.is_some() || Instant::now() > deadline {
                daemon.kill();
                bail!(
                    "{} not ready within 60 s (exit: {exited:?}); output:\n{text}",
                    daemon.command
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// CPU time of all its threads so far, ns (`/proc/PID/task/*/schedstat`).
    pub(crate) fn cpu_ns(&self) -> u64 {
        process_cpu_ns(self.pid)
    }

    /// Summed BPF run time and run count of the programs this process holds.
    pub(crate) fn bpf_stats(&self) -> Result<BpfStats> {
        let ids = held_bpf_ids(self.pid, "prog_id:");
        bpf_prog_stats(&ids)
    }

    /// Stops it (SIGTERM / SIGINT), up to 10 s, then kills it.
    pub(crate) fn stop(mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(child.id() as i32, self.stop_signal) };
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait()? {
                if !status.success() && self.stop_signal == libc::SIGTERM {
                    bail!("{} exited with {status}", self.command);
                }
                return Ok(());
            }
            if started.elapsed() > Duration::from_secs(10) {
                let _ = child.kill();
                let _ = child.wait();
                bail!("{} still running 10 s after the stop signal", self.command);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts the daemon of `mode` (None for `Mode::Off`).
pub(crate) fn start_mode(
    mode: Mode,
    tracer_bin: &Path,
    tracer_args: &[String],
) -> Result<Option<Daemon>> {
    Ok(match mode {
        Mode::Off => None,
        Mode::Control => Some(Daemon::control()?),
        Mode::Tracer => Some(Daemon::tracer(tracer_bin, "/dev/null", tracer_args)?),
        Mode::Tcplife => Some(Daemon::tcplife()?),
    })
}

/// CPU time of every thread of `pid`, ns.
pub(crate) fn process_cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(|t| t.ok())
        .filter_map(|t| fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// Ids of the BPF objects (`prog_id:` or `map_id:`) among the fds of `pid`.
pub(crate) fn held_bpf_ids(pid: u32, key: &str) -> HashSet<u64> {
    let mut ids = HashSet::new();
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return ids;
    };
    for fd in fds.filter_map(|f| f.ok()) {
        let Ok(info) = fs::read_to_string(fd.path()) else {
            continue;
        };
        for line in info.lines() {
            if let Some(id) = line.strip_prefix(key)
                && let Ok(id) = id.trim().parse()
            {
                ids.insert(id);
            }
        }
    }
    ids
}

fn bpftool_json(args: &[&str]) -> Result<Vec<Value>> {
    let out = Command::new("bpftool")
        .arg("-j")
        .args(args)
        .output()
        .context("running bpftool")?;
    if !out.status.success() {
        bail!("bpftool {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let value: Value = serde_json::from_slice(&out.stdout)?;
    Ok(value.as_array().cloned().unwrap_or_default())
}

#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct BpfStats {
    pub run_time_ns: u64,
    pub run_cnt: u64,
}

pub(crate) fn bpf_prog_stats(ids: &HashSet<u64>) -> Result<BpfStats> {
    let mut stats = BpfStats::default();
    for prog in bpftool_json(&["prog", "show"])? {
        if prog["id"].as_u64().is_some_and(|id| ids.contains(&id)) {
            stats.run_time_ns += prog["run_time_ns"].as_u64().unwrap_or(0);
            stats.run_cnt += prog["run_cnt"].as_u64().unwrap_or(0);
        }
    }
    Ok(stats)
}

/// (name, type, bytes_memlock, max_entries) of the maps `pid` holds.
pub(crate) fn held_maps(pid: u32) -> Result<Vec<(String, String, u64, u64)>> {
    let ids = held_bpf_ids(pid, "map_id:");
    Ok(bpftool_json(&["map", "show"])?
        .into_iter()
        .filter(|m| m["id"].as_u64().is_some_and(|id| ids.contains(&id)))
        .map(|m| {
            (
                m["name"].as_str().unwrap_or("?").to_owned(),
                m["type"].as_str().unwrap_or("?").to_owned(),
                m["bytes_memlock"].as_u64().unwrap_or(0),
                m["max_entries"].as_u64().unwrap_or(0),
            )
        })
        .collect())
}

/// Other processes holding BPF programs right now (concurrent tools skew the figures).
pub(crate) fn other_bpf_holders() -> Vec<String> {
    let me = std::process::id();
    let mut found = Vec::new();
    let Ok(procs) = fs::read_dir("/proc") else {
        return found;
    };
    for p in procs.filter_map(|p| p.ok()) {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let progs = held_bpf_ids(pid, "prog_id:");
        if !progs.is_empty() {
            let comm = fs::read_to_string(p.path().join("comm")).unwrap_or_default();
            found.push(format!(
                "{} (pid {pid}, {} programs)",
                comm.trim(),
                progs.len()
            ));
        }
    }
    found
}

/// `kernel.bpf_stats_enabled` on while alive, restored on drop.
pub(crate) struct BpfStatsEnabled(String);

impl BpfStatsEnabled {
    pub(crate) fn on() -> Result<Self> {
        let path = "/proc/sys/kernel/bpf_stats_enabled";
        let old = fs::read_to_string(path)?.trim().to_owned();
        fs::write(path, "1").context("enabling kernel.bpf_stats_enabled")?;
        Ok(Self(old))
    }
}

impl Drop for BpfStatsEnabled {
    fn drop(&mut self) {
        let _ = fs::write("/proc/sys/kernel/bpf_stats_enabled", &self.0);
    }
}

/// A cgroup2 directory whose `cpu.stat` sums the CPU of the workload (Postgres + pgbench).
pub(crate) struct WorkloadCgroup {
    pub path: PathBuf,
}

const CGROUP2: &str = "/sys/fs/cgroup/unified";

impl WorkloadCgroup {
    pub(crate) fn create() -> Result<Self> {
        let root = if Path::new(CGROUP2).join("cgroup.procs").exists() {
            PathBuf::from(CGROUP2)
        } else {
            PathBuf::from("/sys/fs/cgroup")
        };
        let path = root.join(format!("tracer-bench-{}", std::process::id()));
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path })
    }

    /// CPU used by everything in the cgroup so far, ns.
    pub(crate) fn usage_ns(&self) -> u64 {
        fs::read_to_string(self.path.join("cpu.stat"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("usage_usec "))
                    .and_then(|v| v.trim().parse::<u64>().ok())
            })
            .unwrap_or(0)
            * 1000
    }

    /// Runs `f` with this process inside the cgroup (processes it starts stay there).
    pub(crate) fn inside<T>(&self, f: impl FnOnce() -> T) -> Result<T> {
        let own = fs::read_to_string("/proc/self/cgroup")?
            .lines()
            .find_map(|l| l.strip_prefix("0::").map(str::to_owned))
            .unwrap_or_else(|| "/".into());
        let root = self.path.parent().expect("cgroup parent");
        let back = root.join(own.trim_start_matches('/')).join("cgroup.procs");
        fs::write(
            self.path.join("cgroup.procs"),
            std::process::id().to_string(),
        )?;
        let out = f();
        fs::write(&back, std::process::id().to_string())
            .with_context(|| format!("moving back to {}", back.display()))?;
        Ok(out)
    }

    /// A command whose process joins the cgroup before it executes.
    pub(crate) fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        tests::join_cgroup_before_exec(&mut cmd, &self.path).expect("no NUL in path");
        cmd
    }
}

impl Drop for WorkloadCgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            if fs::remove_dir(&self.path).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Raises the open-files soft limit to at least `n` (and the hard one when it must and may).
pub(crate) fn raise_nofile(n: u64) -> Result<()> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit / setrlimit with a valid struct.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    limit.rlim_cur = n;
    limit.rlim_max = limit.rlim_max.max(n);
    // SAFETY: as above.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        bail!(
            "setrlimit(NOFILE, {n}): {} (hard limit {})",
            std::io::Error::last_os_error(),
            limit.rlim_max
        );
    }
    Ok(())
}

/// `VmRSS` / `VmHWM` of a process, kB.
pub(crate) fn rss_kb(pid: u32, field: &str) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}
