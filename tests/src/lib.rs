//! Harness for the root tests: a real Postgres cluster, the real daemon, and helpers to wait
//! for its events. Every test in `tests/tests/` starts what it needs and stops it on drop.
use std::{
    collections::BTreeMap,
    ffi::CString,
    fs,
    net::{Ipv6Addr, TcpListener},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
pub use events::{Event, conn_events};
pub use serde_json::Value;

pub mod clients;
pub mod events;
pub mod hosts;
pub mod load;
pub mod pgbouncer;
pub mod prom;
pub mod schema;

/// True when the test can run. Without root it skips, unless the run requires root tests
/// (`cargo xtask test` and CI do): then a skip is a failure.
pub fn require_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var_os("TRACER_REQUIRE_ROOT_TESTS").is_some() {
        panic!("this root test cannot run: not root");
    }
    eprintln!("skipped: needs root (run `cargo xtask test` as root)");
    false
}

/// The start of most root tests: `None` (the test skips) where `require_root` says so, else
/// a fresh cluster.
pub fn root_postgres() -> Option<Postgres> {
    require_root().then(|| Postgres::start().expect("postgres"))
}

/// How long to wait for something that takes `timeout` on this machine: four times as long
/// in the VM tier (`cargo xtask vm-test` sets `TRACER_VM`), whose guests run on an emulated
/// CPU (TCG) several times slower. Only waits stretch; what a test measures does not.
pub fn patience(timeout: Duration) -> Duration {
    if std::env::var_os("TRACER_VM").is_some() {
        timeout * 4
    } else {
        timeout
    }
}

static UNIQUE: AtomicU32 = AtomicU32::new(0);

/// A fresh directory under /tmp, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Result<Self> {
        let n = UNIQUE.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("tracer-{tag}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path)?;
        Ok(Self(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A TCP port free on both 127.0.0.1 and ::1 right now.
pub fn free_port() -> Result<u16> {
    for _ in 0..50 {
        let v4 = TcpListener::bind("127.0.0.1:0")?;
        let port = v4.local_addr()?.port();
        if TcpListener::bind((Ipv6Addr::LOCALHOST, port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free port on both 127.0.0.1 and ::1")
}

/// Runs `cmd` to the end; its output, or an error with its status and output when it failed.
pub fn run_ok(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("spawning {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

pub fn postgres_bin_dir() -> Result<PathBuf> {
    let mut versions: Vec<PathBuf> = fs::read_dir("/usr/lib/postgresql")
        .context("Postgres is not installed (run `cargo xtask setup`)")?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("postgres").exists())
        .collect();
    versions.sort();
    versions
        .pop()
        .context("no Postgres server binaries under /usr/lib/postgresql")
}

/// A temporary Postgres cluster run as the `postgres` user on its own port and socket
/// directory, listening on 127.0.0.1 and ::1.
pub struct Postgres {
    pub port: u16,
    pub socket_dir: PathBuf,
    data_dir: PathBuf,
    bin: PathBuf,
    _dir: TempDir,
}

fn as_postgres(program: &Path) -> Command {
    let mut cmd = Command::new("runuser");
    cmd.args(["-u", "postgres", "--"]).arg(program);
    cmd
}

impl Postgres {
    /// The socket directory as a libpq host (`-h` / `host=`).
    pub fn unix_host(&self) -> &str {
        self.socket_dir.to_str().expect("a UTF-8 socket directory")
    }

    pub fn start() -> Result<Self> {
        Self::start_listening("127.0.0.1,::1")
    }

    /// A cluster listening on `listen_addresses` (Postgres's comma list; for example a veth
    /// address another network namespace reaches it on), trusting every client.
    pub fn start_listening(listen_addresses: &str) -> Result<Self> {
        let bin = postgres_bin_dir()?;
        let dir = TempDir::new("pg")?;
        run_ok(
            Command::new("chown")
                .args(["postgres:postgres"])
                .arg(&dir.0),
        )?;
        let data_dir = dir.0.join("data");
        let socket_dir = dir.0.join("sock");
        fs::create_dir_all(&socket_dir)?;
        run_ok(
            Command::new("chown")
                .args(["postgres:postgres"])
                .arg(&socket_dir),
        )?;
        run_ok(
            as_postgres(&bin.join("initdb"))
                .args(["-A", "trust", "-U", "postgres", "-N", "-D"])
                .arg(&data_dir),
        )?;
        // Trust from anywhere: the cluster only listens where the test says.
        let mut hba = fs::OpenOptions::new()
            .append(true)
            .open(data_dir.join("pg_hba.conf"))?;
        std::io::Write::write_all(&mut hba, b"host all all 0.0.0.0/0 trust\n")?;
        let port = free_port()?;
        let options = format!(
            "-p {port} -k {} -c listen_addresses='{listen_addresses}' -c fsync=off -c max_connections=300",
            socket_dir.display()
        );
        run_ok(
            as_postgres(&bin.join("pg_ctl"))
                .args(["-w", "-t", "60", "-D"])
                .arg(&data_dir)
                .arg("-l")
                .arg(dir.0.join("log"))
                .args(["-o", &options, "start"]),
        )?;
        Ok(Self {
            port,
            socket_dir,
            data_dir,
            bin,
            _dir: dir,
        })
    }

    /// `psql` against this cluster over TCP at `host`, unaligned tuples-only output.
    pub fn psql(&self, host: &str, sql: &str) -> Command {
        let mut cmd = Command::new("psql");
        cmd.args([
            "-X", "-A", "-t", "-U", "postgres", "-d", "postgres", "-h", host,
        ])
        .args(["-p", &self.port.to_string(), "-c", sql])
        .env("PGCONNECT_TIMEOUT", "10")
        .env("PGSSLMODE", "disable");
        cmd
    }

    /// `psql(host, sql)` started in the background, its output thrown away.
    pub fn psql_spawn(&self, host: &str, sql: &str) -> Child {
        let mut cmd = self.psql(host, sql);
        cmd.stdout(Stdio::null()).spawn().expect("psql")
    }

    /// `pg_stat_activity.state` of every other client backend, by pid: the server's own
    /// view, the oracle of what each connection is doing.
    pub fn client_states(&self) -> BTreeMap<u32, String> {
        let out = run_ok(&mut self.psql(
            "127.0.0.1",
            "SELECT pid, state FROM pg_stat_activity \
             WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()",
        ))
        .expect("pg_stat_activity");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let (pid, state) = l.split_once('|')?;
                Some((pid.trim().parse().ok()?, state.trim().to_owned()))
            })
            .collect()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = as_postgres(&self.bin.join("pg_ctl"))
            .args(["-m", "immediate", "-D"])
            .arg(&self.data_dir)
            .arg("stop")
            .output();
    }
}

/// Runs `cmd` (psql) and returns (its pid, the backend pid it printed first).
pub fn psql_backend(mut cmd: Command) -> (u32, u32) {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn psql");
    let pid = child.id();
    let out = child.wait_with_output().expect("psql");
    assert!(
        out.status.success(),
        "psql: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let backend = text
        .trim()
        .split('|')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no backend pid in {text:?}"));
    (pid, backend)
}

pub fn tracer_bin() -> PathBuf {
    std::env::var_os("TRACER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/tracer"))
}

/// The daemon, writing its events to a file the test reads.
pub struct Tracer {
    child: Option<Child>,
    events_path: PathBuf,
    _dir: TempDir,
}

impl Tracer {
    /// Starts `tracer run ARGS --events FILE` and waits for its `ready` event. Without a
    /// `--metrics-addr` in ARGS the endpoint is off, so tests never fight over a port; without
    /// a `--state-dir` the state file goes to the daemon's own temporary directory, so no
    /// daemon takes over what another test's left.
    pub fn start(args: &[&str]) -> Result<Self> {
        let dir = TempDir::new("tracer")?;
        let events_path = dir.0.join("events.jsonl");
        let stderr = fs::File::create(dir.0.join("stderr"))?;
        let own_state = dir.0.join("state");
        let child = Command::new(tracer_bin())
            .arg("run")
            .args(args)
            .arg("--events")
            .arg(&events_path)
            .args(if args.contains(&"--metrics-addr") {
                &[][..]
            } else {
                &["--metrics-addr", "off"][..]
            })
            .args(if args.contains(&"--state-dir") {
                Vec::new()
            } else {
                vec!["--state-dir".as_ref(), own_state.as_os_str()]
            })
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("spawning {}", tracer_bin().display()))?;
        let mut tracer = Self {
            child: Some(child),
            events_path,
            _dir: dir,
        };
        let ready = tracer.wait_for(Duration::from_secs(30), |evs| {
            evs.iter().any(|e| e.kind == "ready")
        });
        if ready.is_err() {
            let status = exit_status(&mut tracer.child);
            bail!(
                "tracer not ready within {:?} (exit: {status:?}); stderr:\n{}",
                patience(Duration::from_secs(30)),
                tracer.stderr()
            );
        }
        Ok(tracer)
    }

    /// `start` with the flags written as one command line, split at spaces (so no value may
    /// hold one): `Tracer::run(&format!("--port {port} --stall-after 1s"))`.
    pub fn run(flags: &str) -> Result<Self> {
        Self::start(&flags.split_whitespace().collect::<Vec<_>>())
    }

    /// The daemon with its defaults, watching `pg`'s port.
    pub fn watching(pg: &Postgres) -> Self {
        Self::start(&["--port", &pg.port.to_string()]).expect("tracer")
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    pub fn stderr(&self) -> String {
        fs::read_to_string(self._dir.0.join("stderr")).unwrap_or_default()
    }

    /// Every event written so far.
    pub fn events(&self) -> Vec<Event> {
        events::read_events(&self.events_path)
    }

    /// Polls the events until `done` holds, or fails after `timeout`.
    pub fn wait_for(
        &self,
        timeout: Duration,
        done: impl Fn(&[Event]) -> bool,
    ) -> Result<Vec<Event>> {
        let timeout = patience(timeout);
        let deadline = Instant::now() + timeout;
        loop {
            let events = self.events();
            if done(&events) {
                return Ok(events);
            }
            if Instant::now() >= deadline {
                bail!(
                    "condition not met within {timeout:?}; events so far:\n{}",
                    lines(&events)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends SIGTERM and waits up to `timeout`; returns the exit status and how long it took.
    pub fn terminate(mut self, timeout: Duration) -> Result<(ExitStatus, Duration)> {
        let mut child = self.child.take().context("already stopped")?;
        let started = Instant::now();
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok((status, started.elapsed()));
            }
            if started.elapsed() > timeout {
                let _ = child.kill();
                bail!("tracer still running {timeout:?} after SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Tracer {
    /// SIGKILL, the way a crash ends the daemon: no shutdown work at all.
    pub fn kill(mut self) -> Result<()> {
        sigkill(self.child.take())
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        // Already gone, or killed by a test on purpose: nothing left to do.
        let _ = sigkill(self.child.take());
    }
}

/// How a child still held has exited, if it has (`None` while it runs, or when none is held).
pub fn exit_status(child: &mut Option<Child>) -> Option<ExitStatus> {
    child.as_mut()?.try_wait().ok().flatten()
}

/// SIGKILLs a child still held and reaps it.
pub fn sigkill(child: Option<Child>) -> Result<()> {
    let mut child = child.context("already stopped")?;
    child.kill()?;
    child.wait()?;
    Ok(())
}

pub fn lines(events: &[Event]) -> String {
    events.iter().map(|e| format!("{e}\n")).collect()
}

/// Port part of `ip:port` / `[v6]:port`.
pub fn port_of(addr: &str) -> Option<u16> {
    addr.rsplit(':').next()?.parse().ok()
}

/// Names of the BPF programs loaded right now (`bpftool prog show`).
pub fn loaded_program_names() -> Result<Vec<String>> {
    Ok(loaded_programs()?
        .into_iter()
        .map(|(_, name)| name)
        .collect())
}

/// (id, name) of the BPF programs loaded right now.
pub fn loaded_programs() -> Result<Vec<(u64, String)>> {
    let out = run_ok(Command::new("bpftool").args(["-j", "prog", "show"]))?;
    let progs: Value = serde_json::from_slice(&out.stdout)?;
    Ok(progs
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| Some((p["id"].as_u64()?, p["name"].as_str()?.to_owned())))
                .collect()
        })
        .unwrap_or_default())
}

/// Runs of loaded `pgc_*` programs the kernel skipped because the same program was
/// already running on that CPU (`recursion_misses`, shown only when not 0), by name.
pub fn recursion_misses() -> BTreeMap<String, u64> {
    let Ok(out) = run_ok(Command::new("bpftool").args(["-j", "prog", "show"])) else {
        return BTreeMap::new();
    };
    let progs: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let mut misses = BTreeMap::new();
    for p in progs.as_array().into_iter().flatten() {
        let (Some(name), Some(n)) = (p["name"].as_str(), p["recursion_misses"].as_u64()) else {
            continue;
        };
        if name.starts_with("pgc_") {
            *misses.entry(name.to_owned()).or_default() += n;
        }
    }
    misses
}

/// Program ids the BPF links attached right now point at (`bpftool link show`).
pub fn linked_program_ids() -> Result<Vec<u64>> {
    let out = run_ok(Command::new("bpftool").args(["-j", "link", "show"]))?;
    let links: Value = serde_json::from_slice(&out.stdout)?;
    Ok(links
        .as_array()
        .map(|a| a.iter().filter_map(|l| l["prog_id"].as_u64()).collect())
        .unwrap_or_default())
}

/// Moves the child of `cmd` into `cgroup` (its cgroup v2 directory) between fork and exec,
/// so that its very first socket is already counted there.
pub fn join_cgroup_before_exec(cmd: &mut Command, cgroup: &Path) -> Result<()> {
    let procs = CString::new(cgroup.join("cgroup.procs").to_string_lossy().into_owned())?;
    // SAFETY: the hook only calls async-signal-safe functions (open, write, close) on memory
    // allocated before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let written = libc::write(fd, b"0".as_ptr().cast(), 1);
            let err = std::io::Error::last_os_error();
            libc::close(fd);
            if written != 1 {
                return Err(err);
            }
            Ok(())
        });
    }
    Ok(())
}

/// tracefs is not mounted at boot on these machines; classic-tracepoint tools (tcplife)
/// need it.
pub fn ensure_tracefs() -> Result<()> {
    if Path::new("/sys/kernel/tracing/events").exists() {
        return Ok(());
    }
    run_ok(Command::new("mount").args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"]))?;
    Ok(())
}
