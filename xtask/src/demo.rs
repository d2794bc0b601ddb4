//! `cargo xtask demo`: the incident the tracer exists for, live, in about a minute.
//!
//! Starts a throwaway Postgres and PgBouncer (transaction pooling, pool of 3) in a temporary
//! directory, the tracer with thresholds of a few seconds, then a leaky "worker" (in a
//! Docker-named cgroup, three pooled connections left idle in a transaction) and a backend
//! whose queries starve behind it (pgbench through PgBouncer). The events scroll by as one
//! line each (`tracer run --format text`; a pooled leak names the client holding it, the
//! pooler and the backend it pins); then the worker is killed and the stalls and leaks end. Everything started is
//! stopped and removed at the end, also on error.

use std::{
    fs,
    hash::{Hash as _, Hasher as _},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread::sleep,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::free_port;

const POOL_SIZE: u32 = 3;
const CGROUP2_ROOT: &str = "/sys/fs/cgroup/unified";

/// Three pooled connections, each left inside a transaction, from inside a "container".
const WORKER: &str = r#"
import sys, time, psycopg2
procs, dsn = sys.argv[1], sys.argv[2]
with open(procs, "w") as f:
    f.write("0")
conns = []
for _ in range(3):
    c = psycopg2.connect(dsn)
    c.autocommit = True
    c.cursor().execute("BEGIN; SELECT 1")
    conns.append(c)
print("demo    worker: 3 connections idle in a transaction, never committed", flush=True)
time.sleep(3600)
"#;

const SELECT_ONLY: &str =
    "\\set aid random(1, 100000)\nSELECT abalance FROM pgbench_accounts WHERE aid = :aid;\n";

fn say(text: &str) {
    println!("demo    {text}");
}

/// Runs `cmd` to the end, its output kept for the error when it fails.
fn run_quiet(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("spawning {cmd:?}"))?;
    let said = [out.stdout, out.stderr].concat();
    let said = String::from_utf8_lossy(&said);
    ensure!(
        out.status.success(),
        "{cmd:?} failed: {}\n{said}",
        out.status
    );
    Ok(())
}

fn postgres_id(flag: &str) -> Result<u32> {
    let out = Command::new("id").args([flag, "postgres"]).output()?;
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .context("the postgres user is missing (run `cargo xtask setup`)")
}

fn as_postgres(program: impl AsRef<std::ffi::OsStr>) -> Result<Command> {
    let mut cmd = Command::new(program);
    cmd.uid(postgres_id("-u")?).gid(postgres_id("-g")?);
    Ok(cmd)
}

/// The newest installed server's binaries (`/usr/lib/postgresql/<major>/bin`).
fn postgres_bin() -> Result<PathBuf> {
    let installed = fs::read_dir("/usr/lib/postgresql")
        .context("Postgres is not installed (run `cargo xtask setup`)")?;
    let servers = installed.filter_map(|e| Some(e.ok()?.path().join("bin")));
    servers
        .filter(|bin| bin.join("postgres").exists())
        .max()
        .context("no Postgres binaries")
}

/// What the demo started, stopped in reverse order on drop.
struct Demo {
    dir: PathBuf,
    pg_bin: Option<PathBuf>,
    cgroup: Option<PathBuf>,
    children: Vec<(&'static str, Child)>,
}

impl Demo {
    fn stop(&mut self, name: &str) {
        while let Some(i) = self.children.iter().position(|(n, _)| *n == name) {
            let (_, mut child) = self.children.remove(i);
            // SIGINT first: the tracer and pgbench exit cleanly on it.
            let _ = Command::new("kill")
                .args(["-INT", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        let names: Vec<&'static str> = self.children.iter().rev().map(|(n, _)| *n).collect();
        for name in names {
            self.stop(name);
        }
        if let Some(bin) = &self.pg_bin {
            let _ = Command::new(bin.join("pg_ctl"))
                .args(["-m", "immediate", "-D"])
                .arg(self.dir.join("data"))
                .arg("stop")
                .uid(postgres_id("-u").unwrap_or(0))
                .gid(postgres_id("-g").unwrap_or(0))
                .output();
        }
        if let Some(cgroup) = &self.cgroup {
            for _ in 0..100 {
                if fs::remove_dir(cgroup).is_ok() || !cgroup.exists() {
                    break;
                }
                sleep(Duration::from_millis(50));
            }
        }
        let _ = fs::remove_dir_all(&self.dir);
        say("cleaned up");
    }
}

fn wait_port(port: u16, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("{what} is not listening on {port}");
        }
        sleep(Duration::from_millis(50));
    }
    Ok(())
}

pub(crate) fn demo(tracer: &Path) -> Result<()> {
    let stamp = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos();
    let mut demo = Demo {
        dir: std::env::temp_dir().join(format!("tracer-demo-{}", std::process::id())),
        pg_bin: None,
        cgroup: None,
        children: Vec::new(),
    };
    let dir = demo.dir.clone();
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(dir.join("sock"))?;

    // Postgres.
    let bin = postgres_bin()?;
    run_quiet(
        Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&dir),
    )?;
    run_quiet(
        as_postgres(bin.join("initdb"))?
            .args(["-A", "trust", "-U", "postgres", "-N", "-D"])
            .arg(dir.join("data")),
    )?;
    let pg_port = free_port()?;
    demo.pg_bin = Some(bin.clone());
    run_quiet(
        as_postgres(bin.join("pg_ctl"))?
            .args(["-w", "-D"])
            .arg(dir.join("data"))
            .arg("-l")
            .arg(dir.join("postgres.log"))
            .arg("-o")
            .arg(format!(
                "-p {pg_port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
                dir.join("sock").display()
            ))
            .arg("start"),
    )?;
    say(&format!("Postgres on 127.0.0.1:{pg_port}"));

    // PgBouncer.
    let bouncer_port = free_port()?;
    fs::write(dir.join("userlist.txt"), "\"postgres\" \"\"\n")?;
    fs::write(
        dir.join("pgbouncer.ini"),
        format!(
            "[databases]\n* = host=127.0.0.1 port={pg_port}\n[pgbouncer]\n\
             listen_addr = 127.0.0.1\nlisten_port = {bouncer_port}\n\
             unix_socket_dir = {d}/sock\nauth_type = trust\nauth_file = {d}/userlist.txt\n\
             pool_mode = transaction\ndefault_pool_size = {POOL_SIZE}\nreserve_pool_size = 0\n\
             max_client_conn = 200\nlogfile = {d}/pgbouncer.log\n",
            d = dir.display()
        ),
    )?;
    run_quiet(
        Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&dir),
    )?;
    let bouncer = as_postgres("/usr/sbin/pgbouncer")?
        .arg(dir.join("pgbouncer.ini"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting pgbouncer (run `cargo xtask setup`)")?;
    demo.children.push(("pgbouncer", bouncer));
    wait_port(bouncer_port, "PgBouncer")?;
    say(&format!(
        "PgBouncer on 127.0.0.1:{bouncer_port}, transaction pooling, pool of {POOL_SIZE}"
    ));
    let pgbench = |port: u16| {
        let mut cmd = Command::new("pgbench");
        cmd.args(["-U", "postgres", "-h", "127.0.0.1", "-p", &port.to_string()])
            .env("PGSSLMODE", "disable");
        cmd
    };
    run_quiet(pgbench(pg_port).args(["-i", "-q", "-s", "1", "postgres"]))?;

    // The tracer, one readable line per event (`--format text`), watching only the demo's
    // own servers (the host may have other Postgres Unix sockets).
    let tracer_child = Command::new(tracer)
        .args(["run", "--port", &format!("{pg_port},{bouncer_port}")])
        .args(["--format", "text"])
        .arg("--unix-socket-glob")
        .arg(format!("{}/*", dir.display()))
        .args(["--idle-in-transaction-after", "5s", "--stall-after", "3s"])
        .args(["--close-wait-after", "5s", "--metrics-addr", "off"])
        // Its own state directory: a state file another daemon left must not show up here.
        .arg("--state-dir")
        .arg(dir.join("state"))
        .spawn()
        .with_context(|| format!("starting {}", tracer.display()))?;
    demo.children.push(("tracer", tracer_child));
    say("tracer started: idle-in-transaction after 5s, stall after 3s");
    sleep(Duration::from_secs(3));

    // The leaky worker, in a Docker-named cgroup.
    let id: String = (0..4u64)
        .map(|i| {
            let mut h = std::hash::DefaultHasher::new();
            (stamp, std::process::id(), i).hash(&mut h);
            format!("{:016x}", h.finish())
        })
        .collect();
    let cgroup = Path::new(CGROUP2_ROOT)
        .join("system.slice")
        .join(format!("docker-{id}.scope"));
    fs::create_dir_all(&cgroup).with_context(|| format!("creating {}", cgroup.display()))?;
    demo.cgroup = Some(cgroup.clone());
    fs::write(dir.join("worker.py"), WORKER)?;
    let dsn =
        format!("host=127.0.0.1 port={bouncer_port} user=postgres dbname=postgres sslmode=disable");
    let worker = Command::new("/usr/bin/python3")
        .arg(dir.join("worker.py"))
        .arg(cgroup.join("cgroup.procs"))
        .arg(&dsn)
        .spawn()
        .context("starting the worker (python3-psycopg2)")?;
    demo.children.push(("worker", worker));
    say(&format!("worker started in container docker:{}", &id[..12]));
    sleep(Duration::from_secs(2));

    // The backend: its queries now wait for a server connection that never frees up.
    fs::write(dir.join("select.sql"), SELECT_ONLY)?;
    let backend = pgbench(bouncer_port)
        .args(["-n", "-c", "2", "-T", "120", "-R", "20", "-f"])
        .arg(dir.join("select.sql"))
        .arg("postgres")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    demo.children.push(("backend", backend));
    say("backend started: pgbench through PgBouncer, 2 clients (its queries queue up)");
    sleep(Duration::from_secs(12));

    say("killing the worker: the pool frees up");
    if let Some(i) = demo.children.iter().position(|(n, _)| *n == "worker") {
        let (_, mut worker) = demo.children.remove(i);
        worker.kill()?;
        worker.wait()?;
    }
    sleep(Duration::from_secs(6));
    say("stopping everything");
    demo.stop("backend");
    demo.stop("tracer");
    Ok(())
}
