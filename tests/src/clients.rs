//! Real Postgres clients in other languages, as separate processes the tests steer through
//! stdin: psql, psycopg2 (Debian's python3), JDBC (Debian's driver on Java 17), node-postgres
//! (`pg` from npm, installed once into a cache) and pgbench.
//!
//! Every holding client follows one protocol: it opens its connections, runs `BEGIN; SELECT
//! pg_backend_pid()` on each (or only the SELECT when not asked to hold a transaction),
//! prints `ready <backend pid>...`, then waits. A `commit` line on stdin commits every
//! connection and answers `committed`; end of stdin closes the connections and exits.
//! Each library uses its own syscalls (sendto/recvfrom, read/write, writev), which is the
//! point of having them all.

use std::{
    fs,
    hash::{Hash as _, Hasher as _},
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::mpsc::{Receiver, channel},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{join_cgroup_before_exec, run_ok};

/// Where a client connects.
#[derive(Clone, Debug)]
pub enum Target {
    Tcp {
        host: String,
        port: u16,
    },
    /// A Unix-socket directory (libpq's `host=/dir`) and the port naming `.s.PGSQL.<port>`.
    Socket {
        dir: PathBuf,
        port: u16,
    },
}

impl Target {
    pub fn tcp(port: u16) -> Self {
        Self::Tcp {
            host: "127.0.0.1".into(),
            port,
        }
    }

    fn host(&self) -> String {
        match self {
            Self::Tcp { host, .. } => host.clone(),
            Self::Socket { dir, .. } => dir.display().to_string(),
        }
    }

    fn port(&self) -> u16 {
        match self {
            Self::Tcp { port, .. } | Self::Socket { port, .. } => *port,
        }
    }

    /// libpq key/value connection string.
    pub fn dsn(&self) -> String {
        format!(
            "host={} port={} user=postgres dbname=postgres sslmode=disable connect_timeout=10",
            self.host(),
            self.port()
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientKind {
    Psql,
    Psycopg2,
    Jdbc,
    NodePg,
    /// pgbench with a script that opens a transaction and sleeps inside it. It prints no
    /// backend pids: `ready` comes right after the spawn.
    Pgbench,
}

impl ClientKind {
    /// The `comm` the kernel reports for the thread doing the client's socket I/O.
    pub fn comm(self) -> &'static str {
        match self {
            Self::Psql => "psql",
            Self::Psycopg2 => "python3",
            Self::Jdbc => "java",
            Self::NodePg => "node",
            Self::Pgbench => "pgbench",
        }
    }
}

#[derive(Clone, Debug)]
pub struct ClientOptions {
    pub connections: usize,
    /// Open a transaction on each connection and hold it.
    pub in_transaction: bool,
    /// A cgroup2 directory to move the process into before it connects.
    pub cgroup: Option<PathBuf>,
    /// `sslmode=require` instead of `disable` (psql and psycopg2 only).
    pub tls: bool,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            connections: 1,
            in_transaction: true,
            cgroup: None,
            tls: false,
        }
    }
}

/// A running client process.
pub struct Client {
    pub kind: ClientKind,
    pub backend_pids: Vec<u32>,
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    counted: u64,
}

const READY_TIMEOUT: Duration = Duration::from_secs(60);

impl Client {
    /// Starts a client and waits for it to print `ready`.
    pub fn start(kind: ClientKind, target: &Target, opts: &ClientOptions) -> Result<Self> {
        let mut cmd = command(kind, target, opts)?;
        if let Some(cgroup) = &opts.cgroup {
            join_cgroup_before_exec(&mut cmd, cgroup)?;
        }
        Self::spawn(kind, cmd, opts)
    }

    /// A healthy psycopg2 client: one autocommit connection running `SELECT 1` (and
    /// `NOTIFY channel` when given) every second, printing `queries <n>`, until end of input.
    pub fn healthy_psycopg2(target: &Target, notify_channel: Option<&str>) -> Result<Self> {
        let mut cmd = Command::new(PYTHON);
        cmd.arg("-c").arg(PSYCOPG2_LOOP).args([
            &target.dsn(),
            notify_channel.unwrap_or(""),
            "query",
        ]);
        Self::spawn(ClientKind::Psycopg2, cmd, &ClientOptions::default())
    }

    /// A psycopg2 connection that runs `LISTEN channel` and waits for notifications,
    /// printing `notified <n>` for each, until end of input.
    pub fn listener_psycopg2(target: &Target, channel: &str) -> Result<Self> {
        let mut cmd = Command::new(PYTHON);
        cmd.arg("-c")
            .arg(PSYCOPG2_LOOP)
            .args([&target.dsn(), channel, "listen"]);
        Self::spawn(ClientKind::Psycopg2, cmd, &ClientOptions::default())
    }

    /// The number in the last `<prefix> <n>` line printed so far (0 if none).
    pub fn last_count(&mut self, prefix: &str) -> u64 {
        let mut last = 0;
        while let Ok(line) = self.lines.try_recv() {
            if let Some(n) = line
                .strip_prefix(prefix)
                .and_then(|rest| rest.trim().parse().ok())
            {
                last = n;
            }
        }
        self.counted = self.counted.max(last);
        self.counted
    }

    fn spawn(kind: ClientKind, mut cmd: Command, opts: &ClientOptions) -> Result<Self> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("spawning {kind:?}: {cmd:?}"))?;
        let stdout = child.stdout.take().context("stdout")?;
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut client = Self {
            kind,
            backend_pids: Vec::new(),
            stdin: child.stdin.take(),
            child: Some(child),
            lines,
            counted: 0,
        };
        if kind == ClientKind::Psql {
            let begin = if opts.in_transaction { "BEGIN;\n" } else { "" };
            client.send(&format!("{begin}SELECT 'ready', pg_backend_pid();\n"))?;
        }
        if kind != ClientKind::Pgbench {
            let line = client.expect_line("ready", READY_TIMEOUT)?;
            client.backend_pids = line
                .split([' ', '|'])
                .skip(1)
                .filter_map(|p| p.trim().parse().ok())
                .collect();
            if client.backend_pids.len() != opts.connections {
                bail!("{kind:?} said {line:?}, expected {} pids", opts.connections);
            }
        }
        Ok(client)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    fn send(&mut self, text: &str) -> Result<()> {
        let stdin = self.stdin.as_mut().context("stdin closed")?;
        stdin.write_all(text.as_bytes())?;
        stdin.flush()?;
        Ok(())
    }

    fn expect_line(&mut self, prefix: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.starts_with(prefix) => return Ok(line),
                Ok(_) => {}
                Err(_) => {
                    let status = crate::exit_status(&mut self.child);
                    bail!(
                        "{:?} printed no {prefix:?} within {timeout:?} (exit: {status:?})",
                        self.kind
                    );
                }
            }
        }
    }

    /// Commits the open transactions; the connections stay open.
    pub fn commit(&mut self) -> Result<()> {
        match self.kind {
            ClientKind::Psql => self.send("COMMIT;\nSELECT 'committed';\n")?,
            ClientKind::Pgbench => bail!("pgbench cannot be told to commit"),
            _ => self.send("commit\n")?,
        }
        self.expect_line("committed", Duration::from_secs(30))?;
        Ok(())
    }

    /// Makes the open transaction fail (`SELECT 1/0`), leaving the connection idle in an
    /// aborted transaction (psql only). Nothing answers on stdout: every statement fails
    /// until ROLLBACK, so the caller waits for the server to show it.
    pub fn fail_transaction(&mut self) -> Result<()> {
        match self.kind {
            ClientKind::Psql => self.send("SELECT 1/0;\n"),
            other => bail!("{other:?} cannot be told to fail its transaction"),
        }
    }

    /// Runs `SELECT pg_sleep(secs)` on the first connection and waits for the answer: a
    /// request the server sits on (psql and psycopg2 only).
    pub fn server_sleep(&mut self, secs: f64) -> Result<()> {
        match self.kind {
            ClientKind::Psql => {
                self.send(&format!("SELECT pg_sleep({secs});\nSELECT 'slept';\n"))?
            }
            ClientKind::Psycopg2 => self.send(&format!("sleep {secs}\n"))?,
            other => bail!("{other:?} cannot be told to sleep"),
        }
        self.expect_line("slept", Duration::from_secs_f64(secs + 30.0))?;
        Ok(())
    }

    /// Closes stdin (the client closes its connections and exits) and waits for the exit.
    pub fn stop(mut self) -> Result<()> {
        self.stdin.take();
        let mut child = self.child.take().context("already stopped")?;
        if self.kind == ClientKind::Pgbench {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if child.try_wait()?.is_some() {
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("{:?} did not exit within 15 s of end of input", self.kind);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, the way a crashing or OOM-killed process goes: the kernel closes its sockets.
    pub fn kill(mut self) -> Result<()> {
        crate::sigkill(self.child.take())
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        // Already gone, or killed by a test on purpose: nothing left to do.
        let _ = crate::sigkill(self.child.take());
    }
}

/// Debian's python3 (it has python3-psycopg2), never a pyenv shim.
pub const PYTHON: &str = "/usr/bin/python3";
pub const JDBC_JAR: &str = "/usr/share/java/postgresql.jar";

const PSYCOPG2_HOLD: &str = r#"
import sys, psycopg2
dsn, n, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
conns, pids = [], []
for _ in range(n):
    c = psycopg2.connect(dsn)
    c.autocommit = True
    cur = c.cursor()
    cur.execute(("BEGIN; " if mode == "tx" else "") + "SELECT pg_backend_pid()")
    pids.append(cur.fetchone()[0])
    conns.append(c)
print("ready", *pids, flush=True)
for line in sys.stdin:
    if line.strip() == "commit":
        for c in conns:
            c.cursor().execute("COMMIT")
        print("committed", flush=True)
    elif line.startswith("sleep "):
        conns[0].cursor().execute("SELECT pg_sleep(%s)", (float(line.split()[1]),))
        print("slept", flush=True)
for c in conns:
    c.close()
"#;

/// `query` mode: a query a second (and a NOTIFY when a channel is given), printing
/// `queries <n>`; `listen` mode: LISTEN on the channel, printing `notified <n>` per
/// notification. Both until end of input.
const PSYCOPG2_LOOP: &str = r#"
import sys, select, psycopg2
dsn, channel, mode = sys.argv[1], sys.argv[2], sys.argv[3]
c = psycopg2.connect(dsn)
c.autocommit = True
cur = c.cursor()
if mode == "listen":
    cur.execute("LISTEN " + channel)
cur.execute("SELECT pg_backend_pid()")
print("ready", cur.fetchone()[0], flush=True)
n = 0
while True:
    if mode == "listen":
        r, _, _ = select.select([sys.stdin, c], [], [], 5.0)
    else:
        r, _, _ = select.select([sys.stdin], [], [], 1.0)
    if sys.stdin in r and not sys.stdin.readline():
        break
    if mode == "listen":
        if c in r:
            c.poll()
            while c.notifies:
                c.notifies.pop(0)
                n += 1
                print("notified", n, flush=True)
        continue
    cur.execute("SELECT 1")
    cur.fetchone()
    if channel:
        cur.execute("NOTIFY " + channel + ", 'tick'")
    n += 1
    print("queries", n, flush=True)
c.close()
"#;

const JDBC_HOLD: &str = r#"
import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.ResultSet;
import java.util.ArrayList;
import java.util.List;

public class TracerHold {
    public static void main(String[] args) throws Exception {
        String url = args[0];
        int n = Integer.parseInt(args[1]);
        boolean tx = args[2].equals("tx");
        List<Connection> conns = new ArrayList<>();
        StringBuilder ready = new StringBuilder("ready");
        for (int i = 0; i < n; i++) {
            Connection c = DriverManager.getConnection(url, "postgres", "");
            c.setAutoCommit(!tx);
            ResultSet r = c.createStatement().executeQuery("SELECT pg_backend_pid()");
            r.next();
            ready.append(' ').append(r.getInt(1));
            conns.add(c);
        }
        System.out.println(ready);
        System.out.flush();
        BufferedReader in = new BufferedReader(new InputStreamReader(System.in));
        String line;
        while ((line = in.readLine()) != null) {
            if (line.trim().equals("commit")) {
                for (Connection c : conns) c.commit();
                System.out.println("committed");
                System.out.flush();
            }
        }
        for (Connection c : conns) c.close();
    }
}
"#;

const NODE_HOLD: &str = r#"
const { Client } = require('pg');
const readline = require('readline');
const [host, port, n, mode] = process.argv.slice(1);
(async () => {
  const conns = [], pids = [];
  for (let i = 0; i < Number(n); i++) {
    const c = new Client({ host, port: Number(port), user: 'postgres', database: 'postgres', ssl: false });
    await c.connect();
    if (mode === 'tx') await c.query('BEGIN');
    const r = await c.query('SELECT pg_backend_pid() AS p');
    pids.push(r.rows[0].p);
    conns.push(c);
  }
  console.log('ready ' + pids.join(' '));
  const rl = readline.createInterface({ input: process.stdin });
  let work = Promise.resolve();
  rl.on('line', (line) => {
    if (line.trim() === 'commit') {
      work = work.then(async () => {
        for (const c of conns) await c.query('COMMIT');
        console.log('committed');
      });
    }
  });
  rl.on('close', () => {
    work.then(async () => {
      for (const c of conns) await c.end();
      process.exit(0);
    });
  });
})().catch((e) => { console.error(e); process.exit(1); });
"#;

fn source_hash(text: &str) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    text.hash(&mut h);
    h.finish()
}

/// Shared between test runs: compiled classes and npm packages (installed once).
fn cache_dir() -> PathBuf {
    std::env::temp_dir().join("tracer-clients-cache")
}

/// Builds `final_dir` in a scratch directory with `build`, then renames it into place, so
/// concurrent tests never see half a cache entry.
fn cached(final_dir: &Path, build: impl FnOnce(&Path) -> Result<()>) -> Result<PathBuf> {
    if final_dir.exists() {
        return Ok(final_dir.to_path_buf());
    }
    fs::create_dir_all(cache_dir())?;
    let scratch = cache_dir().join(format!(
        ".build-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let _ = fs::remove_dir_all(&scratch);
    fs::create_dir_all(&scratch)?;
    build(&scratch)?;
    if fs::rename(&scratch, final_dir).is_err() {
        // Someone else finished first.
        let _ = fs::remove_dir_all(&scratch);
    }
    Ok(final_dir.to_path_buf())
}

/// The compiled `TracerHold` class directory.
pub fn jdbc_classes() -> Result<PathBuf> {
    let dir = cache_dir().join(format!("java-{:016x}", source_hash(JDBC_HOLD)));
    cached(&dir, |scratch| {
        let src = scratch.join("TracerHold.java");
        fs::write(&src, JDBC_HOLD)?;
        run_ok(Command::new("javac").arg("-d").arg(scratch).arg(&src))?;
        Ok(())
    })
}

/// A directory whose `node_modules` holds `pg` (npm install, once).
pub fn node_pg_dir() -> Result<PathBuf> {
    let dir = cache_dir().join("node-pg8");
    cached(&dir, |scratch| {
        run_ok(
            Command::new("npm")
                .args(["install", "--no-audit", "--no-fund", "--silent", "pg@8"])
                .current_dir(scratch),
        )?;
        Ok(())
    })
}

fn script_file(name: &str, text: &str) -> Result<PathBuf> {
    let dir = cache_dir().join(format!("scripts-{:016x}", source_hash(text)));
    let dir = cached(&dir, |scratch| {
        fs::write(scratch.join(name), text)?;
        Ok(())
    })?;
    Ok(dir.join(name))
}

fn command(kind: ClientKind, target: &Target, opts: &ClientOptions) -> Result<Command> {
    let n = opts.connections.to_string();
    let mode = if opts.in_transaction { "tx" } else { "idle" };
    let port = target.port().to_string();
    let sslmode = if opts.tls { "require" } else { "disable" };
    if opts.tls && !matches!(kind, ClientKind::Psql | ClientKind::Psycopg2) {
        bail!("TLS is wired for psql and psycopg2 only");
    }
    Ok(match kind {
        ClientKind::Psql => {
            if opts.connections != 1 {
                bail!("psql holds one connection");
            }
            let mut cmd = Command::new("psql");
            cmd.args(["-X", "-q", "-A", "-t", "-U", "postgres", "-d", "postgres"])
                .args(["-h", &target.host(), "-p", &port])
                .env("PGSSLMODE", sslmode);
            cmd
        }
        ClientKind::Psycopg2 => {
            let dsn = target
                .dsn()
                .replace("sslmode=disable", &format!("sslmode={sslmode}"));
            let mut cmd = Command::new(PYTHON);
            cmd.arg("-c").arg(PSYCOPG2_HOLD).args([&dsn, &n, mode]);
            cmd
        }
        ClientKind::Jdbc => {
            let Target::Tcp { host, port } = target else {
                bail!("the JDBC driver speaks TCP only");
            };
            let classes = jdbc_classes()?;
            let mut cmd = Command::new("java");
            cmd.args(["-Xshare:auto", "-XX:+UseSerialGC", "-Xmx64m", "-cp"])
                .arg(format!("{JDBC_JAR}:{}", classes.display()))
                .arg("TracerHold")
                .arg(format!(
                    "jdbc:postgresql://{host}:{port}/postgres?sslmode=disable"
                ))
                .args([&n, mode]);
            cmd
        }
        ClientKind::NodePg => {
            let dir = node_pg_dir()?;
            let mut cmd = Command::new("node");
            cmd.arg("-e")
                .arg(NODE_HOLD)
                .args([&target.host(), &port, &n, mode])
                .env("NODE_PATH", dir.join("node_modules"));
            cmd
        }
        ClientKind::Pgbench => {
            let script = script_file("hold.sql", "BEGIN;\nSELECT 1;\n\\sleep 3600 s\nEND;\n")?;
            let mut cmd = Command::new("pgbench");
            cmd.args(["-n", "-U", "postgres", "-h", &target.host(), "-p", &port])
                .args(["-c", &n, "-T", "3600", "-f"])
                .arg(script)
                .arg("postgres")
                .env("PGSSLMODE", "disable");
            cmd
        }
    })
}

/// A pgbench load run (`args` after the connection options, e.g. `-n -c 2 -T 20 -S`),
/// stopped on drop.
pub struct Pgbench {
    child: Option<Child>,
    log: PathBuf,
}

impl Pgbench {
    pub fn start(target: &Target, args: &[&str]) -> Result<Self> {
        let log = std::env::temp_dir().join(format!(
            "tracer-pgbench-{}-{}.log",
            std::process::id(),
            source_hash(&format!("{:?}{args:?}{:?}", Instant::now(), target))
        ));
        let child = Command::new("pgbench")
            .args([
                "-U",
                "postgres",
                "-h",
                &target.host(),
                "-p",
                &target.port().to_string(),
            ])
            .args(args)
            .arg("postgres")
            .env("PGSSLMODE", "disable")
            .stdin(Stdio::null())
            .stdout(fs::File::create(&log)?)
            .stderr(fs::File::create(log.with_extension("err"))?)
            .spawn()
            .context("spawning pgbench")?;
        Ok(Self {
            child: Some(child),
            log,
        })
    }

    /// `pgbench -i -s scale` (tables for `-S`), directly against Postgres.
    pub fn init(target: &Target, scale: u32) -> Result<()> {
        run_ok(
            Command::new("pgbench")
                .args(["-i", "-q", "-s", &scale.to_string(), "-U", "postgres"])
                .args(["-h", &target.host(), "-p", &target.port().to_string()])
                .arg("postgres")
                .env("PGSSLMODE", "disable"),
        )?;
        Ok(())
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// Waits for the run to end by itself; returns its report (stdout + stderr).
    pub fn wait(mut self, timeout: Duration) -> Result<String> {
        let mut child = self.child.take().context("already stopped")?;
        let deadline = Instant::now() + timeout;
        while child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("pgbench still running after {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(self.report())
    }

    pub fn report(&self) -> String {
        format!(
            "{}{}",
            fs::read_to_string(&self.log).unwrap_or_default(),
            fs::read_to_string(self.log.with_extension("err")).unwrap_or_default()
        )
    }
}

impl Drop for Pgbench {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = fs::remove_file(&self.log);
        let _ = fs::remove_file(self.log.with_extension("err"));
    }
}

/// A cgroup2 directory named the way Docker's systemd driver names a container's scope,
/// removed on drop (once its processes are gone).
pub struct DockerCgroup {
    pub id: String,
    pub path: PathBuf,
}

impl DockerCgroup {
    pub fn create() -> Result<Self> {
        let seed = format!(
            "{}-{:?}-{:?}",
            std::process::id(),
            std::time::SystemTime::now(),
            std::thread::current().id()
        );
        let id: String = (0..4u64)
            .map(|i| format!("{:016x}", source_hash(&format!("{seed}/{i}"))))
            .collect();
        let path = crate::hosts::cgroup2_root()
            .join("system.slice")
            .join(format!("docker-{id}.scope"));
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { id, path })
    }
}

impl Drop for DockerCgroup {
    fn drop(&mut self) {
        // The last process may still be exiting; the kernel refuses rmdir until it is gone.
        for _ in 0..100 {
            if fs::remove_dir(&self.path).is_ok() || !self.path.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
