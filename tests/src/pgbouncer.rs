//! A real PgBouncer (Debian's `/usr/sbin/pgbouncer`) in front of a harness Postgres: run as
//! the `postgres` user from a config in its own temporary directory, on 127.0.0.1 and a free
//! port, in transaction pooling (or as [`Options`] say: session pooling, a shared
//! `so_reuseport` port), stopped on drop. Its admin console ([`PgBouncer::show`]) is the
//! oracle for which client holds which server connection.

use std::{
    fs,
    net::TcpStream,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use std::os::unix::process::CommandExt as _;

use anyhow::{Context as _, Result, bail};

use crate::{Postgres, TempDir, free_port, run_ok};

pub const PGBOUNCER_BIN: &str = "/usr/sbin/pgbouncer";

pub struct PgBouncer {
    pub port: u16,
    /// Where its Unix socket (`.s.PGSQL.<port>`) lives.
    pub socket_dir: PathBuf,
    pub pool_size: u32,
    child: Option<Child>,
    dir: TempDir,
}

/// How to run a [`PgBouncer`].
#[derive(Clone, Debug)]
pub struct Options {
    pub pool_size: u32,
    /// `transaction` or `session`.
    pub pool_mode: &'static str,
    /// Listen on this port with `so_reuseport` (another PgBouncer may share it); `None`: a
    /// free port of its own.
    pub reuseport: Option<u16>,
}

/// One row of an admin console `SHOW` command, by column name.
pub type Row = std::collections::HashMap<String, String>;

impl PgBouncer {
    /// Starts PgBouncer in transaction pooling with `pool_size` server connections per
    /// database/user pair, every database forwarded to `pg` over TCP.
    pub fn start(pg: &Postgres, pool_size: u32) -> Result<Self> {
        Self::start_with(
            pg,
            &Options {
                pool_size,
                pool_mode: "transaction",
                reuseport: None,
            },
        )
    }

    pub fn start_with(pg: &Postgres, options: &Options) -> Result<Self> {
        let pool_size = options.pool_size;
        if !std::path::Path::new(PGBOUNCER_BIN).exists() {
            bail!("{PGBOUNCER_BIN} is missing (run `cargo xtask setup`)");
        }
        let dir = TempDir::new("pgbouncer")?;
        let socket_dir = dir.0.join("sock");
        fs::create_dir_all(&socket_dir)?;
        let port = match options.reuseport {
            Some(port) => port,
            None => free_port()?,
        };
        // trust still wants the user in the auth file.
        fs::write(dir.0.join("userlist.txt"), "\"postgres\" \"\"\n")?;
        let config = format!(
            "[databases]\n\
             * = host=127.0.0.1 port={pg_port}\n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\n\
             listen_port = {port}\n\
             unix_socket_dir = {sock}\n\
             auth_type = trust\n\
             auth_file = {dir}/userlist.txt\n\
             pool_mode = {pool_mode}\n\
             so_reuseport = {reuseport}\n\
             default_pool_size = {pool_size}\n\
             min_pool_size = 0\n\
             reserve_pool_size = 0\n\
             max_client_conn = 500\n\
             admin_users = postgres\n\
             ignore_startup_parameters = extra_float_digits,options\n\
             logfile = {dir}/pgbouncer.log\n\
             pidfile = {dir}/pgbouncer.pid\n",
            pg_port = pg.port,
            pool_mode = options.pool_mode,
            reuseport = u8::from(options.reuseport.is_some()),
            sock = socket_dir.display(),
            dir = dir.0.display(),
        );
        let ini = dir.0.join("pgbouncer.ini");
        fs::write(&ini, config)?;
        run_ok(
            Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir.0),
        )?;
        // Runs as postgres directly (not under runuser), so the child is PgBouncer itself.
        let (uid, gid) = postgres_ids()?;
        let child = Command::new(PGBOUNCER_BIN)
            .arg(&ini)
            .uid(uid)
            .gid(gid)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.0.join("stderr"))?)
            .spawn()
            .context("spawning pgbouncer")?;
        let mut bouncer = Self {
            port,
            socket_dir,
            pool_size,
            child: Some(child),
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = crate::exit_status(&mut bouncer.child) {
                bail!("pgbouncer exited ({status}):\n{}", bouncer.log());
            }
            if Instant::now() > deadline {
                bail!("pgbouncer not listening within 20 s:\n{}", bouncer.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(bouncer)
    }

    /// PgBouncer's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// Its log file and stderr, for failure messages.
    pub fn log(&self) -> String {
        let read = |name: &str| fs::read_to_string(self.dir.0.join(name)).unwrap_or_default();
        format!("{}{}", read("pgbouncer.log"), read("stderr"))
    }

    /// An admin console command (`SHOW SERVERS`, ...) on this very process (over its own
    /// Unix socket: the TCP port may be shared), as rows by column name.
    pub fn show(&self, what: &str) -> Result<Vec<Row>> {
        let out = run_ok(
            Command::new("psql")
                .args(["-X", "-A", "-F", "\t", "-P", "footer=off", "-U", "postgres"])
                .args(["-d", "pgbouncer", "-h"])
                .arg(&self.socket_dir)
                .args(["-p", &self.port.to_string(), "-c", &format!("SHOW {what}")])
                .env("PGCONNECT_TIMEOUT", "10"),
        )?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let mut lines = text.lines();
        let header: Vec<&str> = lines.next().context("no header")?.split('\t').collect();
        Ok(lines
            .map(|line| {
                header
                    .iter()
                    .zip(line.split('\t'))
                    .map(|(k, v)| ((*k).to_owned(), v.to_owned()))
                    .collect()
            })
            .collect())
    }

    /// `psql` through PgBouncer over TCP, unaligned tuples-only output.
    pub fn psql(&self, sql: &str) -> Command {
        let mut cmd = Command::new("psql");
        cmd.args(["-X", "-A", "-t", "-U", "postgres", "-d", "postgres"])
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-c", sql])
            .env("PGCONNECT_TIMEOUT", "10")
            .env("PGSSLMODE", "disable");
        cmd
    }
}

/// The `postgres` user's uid and gid.
fn postgres_ids() -> Result<(u32, u32)> {
    let id = |flag: &str| -> Result<u32> {
        let out = run_ok(Command::new("id").args([flag, "postgres"]))?;
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .context("id output")
    };
    Ok((id("-u")?, id("-g")?))
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on our own child. SIGTERM: immediate shutdown.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
