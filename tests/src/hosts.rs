//! Where a client runs, for the attribution tests: a "container" (a cgroup2 directory named
//! the way a runtime names it), another network namespace joined to this host by a veth
//! pair, a Postgres listening on extra addresses, and a psycopg2 process that holds
//! connections (or keeps opening them) until told to stop.

use std::{
    fs,
    io::{BufRead, BufReader, Read, Write},
    path::PathBuf,
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

use crate::{TempDir, run_ok};

/// Root of the cgroup2 hierarchy: `/sys/fs/cgroup/unified` on these hybrid hosts,
/// `/sys/fs/cgroup` on unified ones (the VM tier's guests), from the mount table.
pub fn cgroup2_root() -> PathBuf {
    fs::read_to_string("/proc/self/mountinfo")
        .ok()
        .and_then(|table| {
            table.lines().find_map(|line| {
                let (mount, fs) = line.split_once(" - ")?;
                fs.starts_with("cgroup2 ")
                    .then(|| mount.split_whitespace().nth(4).map(PathBuf::from))
                    .flatten()
            })
        })
        .unwrap_or_else(|| PathBuf::from("/sys/fs/cgroup/unified"))
}

/// Debian's interpreter, the only one that can import psycopg2 here.
pub const PYTHON: &str = "/usr/bin/python3";

static UNIQUE: AtomicU32 = AtomicU32::new(0);

/// `n` random lowercase hex digits.
pub fn random_hex(n: usize) -> String {
    let mut bytes = vec![0u8; n.div_ceil(2)];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .expect("/dev/urandom");
    let mut hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    hex.truncate(n);
    hex
}

/// A random pod uid, `8-4-4-4-12` lowercase hex as Kubernetes writes them.
pub fn random_pod_uid() -> String {
    let h = random_hex(32);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// The cgroup2 path a process is in (`0::PATH` of `/proc/<pid>/cgroup`).
pub fn cgroup2_of(pid: u32) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("0::").map(str::to_owned))
}

/// `/proc/<pid>/cmdline` the way events render it: arguments joined by single spaces.
pub fn cmdline_of(pid: u32) -> Option<String> {
    let raw = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<String> = raw
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    Some(args.join(" "))
}

/// A cgroup2 directory named like a container runtime's (for example
/// `/system.slice/docker-<id>.scope`). The directories it created are removed on drop, once
/// the processes put in it have exited.
pub struct FakeContainer {
    /// The cgroup path as `/proc/<pid>/cgroup` shows it (leading `/`).
    pub path: String,
    created: Vec<PathBuf>,
}

impl FakeContainer {
    pub fn create(path: &str) -> Result<Self> {
        let mut created = Vec::new();
        let mut dir = cgroup2_root();
        for part in path.split('/').filter(|p| !p.is_empty()) {
            dir.push(part);
            if !dir.exists() {
                fs::create_dir(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
                created.push(dir.clone());
            }
        }
        Ok(Self {
            path: path.to_owned(),
            created,
        })
    }

    pub fn procs(&self) -> PathBuf {
        cgroup2_root()
            .join(self.path.trim_start_matches('/'))
            .join("cgroup.procs")
    }

    /// `sh -c` text that moves the shell into this cgroup, then execs `program args`: the
    /// process is in the container before it does anything, under the same pid.
    pub fn exec_in(&self, program: &str) -> String {
        format!(
            "echo $$ > {} && exec {program} \"$@\"",
            self.procs().display()
        )
    }
}

impl Drop for FakeContainer {
    fn drop(&mut self) {
        // A process that just exited may still be leaving the cgroup: retry a little.
        for dir in self.created.iter().rev() {
            for _ in 0..50 {
                if fs::remove_dir(dir).is_ok() || !dir.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

pub use crate::postgres_bin_dir;

/// Another network namespace joined to this host by a veth pair: `host_ip` on this side,
/// `ns_ip` inside. Deleted on drop (which deletes the pair too).
pub struct NetNs {
    pub name: String,
    pub host_if: String,
    pub host_ip: String,
    pub ns_ip: String,
}

impl NetNs {
    pub fn create() -> Result<Self> {
        let n = UNIQUE.fetch_add(1, Ordering::Relaxed);
        let id = std::process::id() % 100_000;
        let name = format!("tracer-attr-{id}-{n}");
        // Interface names have at most 15 bytes.
        let host_if = format!("pgt{id}h{n}");
        let ns_if = format!("pgt{id}n{n}");
        // A /30 in 10.213.0.0/16 picked from the pid, so concurrent runs do not collide.
        let block = (id * 4 + n * 4) % 65_536;
        let (hi, lo) = (block / 256, block % 256);
        let host_ip = format!("10.213.{hi}.{}", lo + 1);
        let ns_ip = format!("10.213.{hi}.{}", lo + 2);
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let _ = Command::new("ip").args(["link", "del", &host_if]).output();
        let ns = Self {
            name,
            host_if,
            host_ip,
            ns_ip,
        };
        let ip = |args: &[&str]| run_ok(Command::new("ip").args(args));
        ip(&["netns", "add", &ns.name])?;
        ip(&[
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &ns_if,
        ])?;
        ip(&["link", "set", &ns_if, "netns", &ns.name])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/30", ns.host_ip),
            "dev",
            &ns.host_if,
        ])?;
        ip(&["link", "set", &ns.host_if, "up"])?;
        let in_ns = |args: &[&str]| {
            run_ok(
                Command::new("ip")
                    .args(["netns", "exec", &ns.name, "ip"])
                    .args(args),
            )
        };
        in_ns(&["addr", "add", &format!("{}/30", ns.ns_ip), "dev", &ns_if])?;
        in_ns(&["link", "set", &ns_if, "up"])?;
        in_ns(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `program` run inside the namespace. `ip netns exec` execs it in place, so the child's
    /// pid is the program's.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
    }
}

/// libpq connection string for the harness's `postgres` superuser.
pub fn dsn(host: &str, port: u16) -> String {
    format!(
        "host={host} port={port} user=postgres dbname=postgres sslmode=disable connect_timeout=10"
    )
}

/// The psycopg2 program behind [`PyClient`]. It opens the connections of its spec (each
/// runs `select pg_backend_pid()`; with `in_tx` the transaction is left open), prints one
/// JSON line per connection and `{"ready": true}`; with `race` it then keeps opening one
/// connection every `interval` s until a line arrives on stdin, and prints
/// `{"stopped": true}`. The next line (or EOF) closes everything and it exits.
const CLIENT_PY: &str = r#"
import json, os, select, socket, sys, time
import psycopg2

spec = json.loads(sys.argv[1])
conns = []
if spec.get("comm"):
    import ctypes
    ctypes.CDLL(None).prctl(15, spec["comm"].encode(), 0, 0, 0)  # PR_SET_NAME

def local_of(conn):
    s = socket.socket(fileno=os.dup(conn.fileno()))
    try:
        addr = s.getsockname()
        family = s.family
    finally:
        s.close()
    if family == socket.AF_INET:
        return "%s:%d" % addr[:2]
    if family == socket.AF_INET6:
        return "[%s]:%d" % addr[:2]
    return addr if isinstance(addr, str) else ""

def open_one(dsn, in_tx):
    t_start = time.time()
    conn = psycopg2.connect(dsn)
    t_end = time.time()
    if not in_tx:
        conn.autocommit = True
    cur = conn.cursor()
    cur.execute("select pg_backend_pid()")
    backend = cur.fetchone()[0]
    conns.append(conn)
    print(json.dumps({"backend_pid": backend, "local": local_of(conn), "in_tx": in_tx,
                      "t_start": t_start, "t_end": t_end}), flush=True)

for c in spec.get("conns", []):
    open_one(c["dsn"], c.get("in_tx", False))
print(json.dumps({"ready": True}), flush=True)

race = spec.get("race")
if race:
    i = 0
    told = False
    while len(conns) < race["max"]:
        if select.select([sys.stdin], [], [], race["interval"])[0]:
            told = True
            break
        open_one(race["dsn"][i % len(race["dsn"])], False)
        i += 1
    if told or len(conns) >= race["max"]:
        sys.stdin.readline()
    print(json.dumps({"stopped": True}), flush=True)

sys.stdin.readline()
for conn in conns:
    conn.close()
"#;

/// One connection a [`PyClient`] opened, as it reported it.
#[derive(Clone, Debug)]
pub struct HeldConn {
    pub backend_pid: u32,
    /// `ip:port` / `[v6]:port` of a TCP client socket; empty for a Unix one.
    pub local: String,
    pub in_tx: bool,
    /// Wall-clock seconds around `connect`.
    pub t_start: f64,
    pub t_end: f64,
}

/// A psycopg2 process holding Postgres connections until told to close them.
pub struct PyClient {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    pub conns: Vec<HeldConn>,
    _dir: TempDir,
}

/// One connection of a [`PyClient`] spec.
pub fn conn_spec(dsn: &str, in_tx: bool) -> Value {
    json!({ "dsn": dsn, "in_tx": in_tx })
}

impl PyClient {
    /// Starts the client (inside `container` when given: in it before it connects) and
    /// waits until it holds every connection of `conns`.
    pub fn start(conns: &[Value], container: Option<&FakeContainer>) -> Result<Self> {
        Self::spawn(json!({ "conns": conns }), container)
    }

    /// Like [`PyClient::start`], with the command name `comm` (set before connecting), under
    /// exactly `pid` (through `ns_last_pid`; retried while other processes take it first).
    pub fn start_as(
        conns: &[Value],
        container: &FakeContainer,
        comm: &str,
        pid: u32,
    ) -> Result<Self> {
        let spec = json!({ "conns": conns, "comm": comm });
        for _ in 0..100 {
            fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string())?;
            // The shell leaves before connecting unless it got the pid.
            let wrapper = format!("[ $$ = {pid} ] || exit 3; {}", container.exec_in(PYTHON));
            if let Ok(client) = Self::spawn_with(
                spec.clone(),
                Command::new("sh").args(["-c", &wrapper, "sh"]),
            ) {
                return Ok(client);
            }
        }
        bail!("could not get pid {pid}")
    }

    /// Like [`PyClient::start`], then keeps opening a connection to `dsns` (in turn) every
    /// `interval`, up to `max` in all, until [`PyClient::stop_racing`].
    pub fn start_racing(
        conns: &[Value],
        dsns: &[String],
        interval: Duration,
        max: usize,
    ) -> Result<Self> {
        Self::spawn(
            json!({
                "conns": conns,
                "race": { "dsn": dsns, "interval": interval.as_secs_f64(), "max": max },
            }),
            None,
        )
    }

    fn spawn(spec: Value, container: Option<&FakeContainer>) -> Result<Self> {
        let mut cmd = match container {
            Some(c) => {
                let mut cmd = Command::new("sh");
                cmd.args(["-c", &c.exec_in(PYTHON), "sh"]);
                cmd
            }
            None => Command::new(PYTHON),
        };
        Self::spawn_with(spec, &mut cmd)
    }

    /// Like [`PyClient::start`], with `cmd` running (or exec'ing) the interpreter, for example
    /// [`NetNs::command`]`(PYTHON)`.
    pub fn start_with(conns: &[Value], cmd: &mut Command) -> Result<Self> {
        Self::spawn_with(json!({ "conns": conns }), cmd)
    }

    /// `cmd` runs (or execs) the interpreter; the script and its spec are appended.
    fn spawn_with(spec: Value, cmd: &mut Command) -> Result<Self> {
        let dir = TempDir::new("pyclient")?;
        let script = dir.0.join("pg_client.py");
        fs::write(&script, CLIENT_PY)?;
        let mut child = cmd
            .arg(&script)
            .arg(spec.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("spawning the psycopg2 client")?;
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().context("stdout")?);
        let mut client = Self {
            child,
            stdin,
            stdout,
            conns: Vec::new(),
            _dir: dir,
        };
        client.read_until("ready")?;
        Ok(client)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Reads connection lines until a line with `key`.
    fn read_until(&mut self, key: &str) -> Result<()> {
        loop {
            let mut line = String::new();
            if self.stdout.read_line(&mut line)? == 0 {
                let status = self.child.wait()?;
                bail!("psycopg2 client exited ({status}) before `{key}`");
            }
            let v: Value =
                serde_json::from_str(&line).with_context(|| format!("client line {line:?}"))?;
            if v.get(key).is_some() {
                return Ok(());
            }
            self.conns.push(HeldConn {
                backend_pid: v["backend_pid"].as_u64().context("backend_pid")? as u32,
                local: v["local"].as_str().unwrap_or_default().to_owned(),
                in_tx: v["in_tx"].as_bool().unwrap_or(false),
                t_start: v["t_start"].as_f64().context("t_start")?,
                t_end: v["t_end"].as_f64().context("t_end")?,
            });
        }
    }

    /// Waits until a racing client has opened at least `n` connections in all.
    pub fn wait_for_conns(&mut self, n: usize) -> Result<()> {
        while self.conns.len() < n {
            let before = self.conns.len();
            let mut line = String::new();
            if self.stdout.read_line(&mut line)? == 0 {
                bail!("psycopg2 client exited after {before} connections");
            }
            let v: Value = serde_json::from_str(&line)?;
            if v.get("stopped").is_some() {
                bail!("client stopped racing after {before} connections");
            }
            self.conns.push(HeldConn {
                backend_pid: v["backend_pid"].as_u64().context("backend_pid")? as u32,
                local: v["local"].as_str().unwrap_or_default().to_owned(),
                in_tx: false,
                t_start: v["t_start"].as_f64().context("t_start")?,
                t_end: v["t_end"].as_f64().context("t_end")?,
            });
        }
        Ok(())
    }

    /// Stops opening connections; afterwards `conns` lists every one it opened.
    pub fn stop_racing(&mut self) -> Result<()> {
        self.say()?;
        self.read_until("stopped")
    }

    fn say(&mut self) -> Result<()> {
        let stdin = self.stdin.as_mut().context("stdin closed")?;
        stdin.write_all(b"go\n")?;
        stdin.flush()?;
        Ok(())
    }

    /// Closes every connection and waits for the process to exit.
    pub fn close(mut self) -> Result<()> {
        self.say()?;
        drop(self.stdin.take());
        let status = self.child.wait()?;
        if !status.success() {
            bail!("psycopg2 client exited with {status}");
        }
        Ok(())
    }
}

impl Drop for PyClient {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Wall-clock seconds since the epoch (the clock of events' `ts` and of [`HeldConn`]).
pub fn wall_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// An event's `ts` (RFC 3339 UTC, `YYYY-MM-DDTHH:MM:SS.ffffffZ`) as epoch seconds.
pub fn ts_secs(ts: &str) -> Option<f64> {
    let ts = ts.strip_suffix('Z')?;
    let (date, time) = ts.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let mut t = time.split(':');
    let (h, min) = (
        t.next()?.parse::<i64>().ok()?,
        t.next()?.parse::<i64>().ok()?,
    );
    let s: f64 = t.next()?.parse().ok()?;
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + h * 3600 + min * 60) as f64 + s)
}

/// Polls `f` until it returns `Some`, or fails after `timeout`.
pub fn poll<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("{what}: not within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
