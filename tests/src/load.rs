//! Load and fault helpers for the root tests: client processes that hold many connections,
//! a TCP listener of the test's own on a watched port, the metrics endpoint, the kernel's
//! socket table (`ss`) as ground truth, and signals.

use std::{
    collections::HashSet,
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    os::fd::AsRawFd,
    process::{Child, ChildStdout, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

/// Raises this process's open-file limit (soft to hard, at least `want` when allowed).
pub fn raise_nofile(want: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid out-pointer for getrlimit.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    let target = want.max(lim.rlim_cur);
    lim.rlim_max = lim.rlim_max.max(target);
    lim.rlim_cur = target;
    // SAFETY: valid rlimit; as root raising the hard limit is allowed.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
}

pub fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) on a process the test started.
    unsafe { libc::kill(pid as i32, sig) };
}

pub fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks the process exists.
    unsafe { libc::kill(pid as i32, 0) == 0 }
}

/// Sets SO_LINGER 0: the close sends a reset and leaves no TIME_WAIT behind, so a tight
/// connect loop cannot run out of ephemeral ports.
pub fn reset_on_close(stream: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: valid socket fd and option value of the right size.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
}

/// Closes with RST (SO_LINGER 0).
pub fn close_with_reset(stream: TcpStream) {
    reset_on_close(&stream);
    drop(stream);
}

/// How a [`Listener`] treats what it accepts.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Serve {
    /// Keep every accepted connection open, without I/O, until `close_all`.
    Hold,
    /// Read until end of file, then close.
    Drain,
    /// Read once, then close (heavy churn: no thread per connection).
    ReadOnceThenClose,
    /// Answer every read with one ReadyForQuery frame (`Z 0 0 0 5 I`); close on EOF.
    ReadyForQuery,
}

/// A TCP listener of the test's own on 127.0.0.1, on a free port the tracer is told to watch:
/// the tracer treats any peer on a watched port as Postgres.
pub struct Listener {
    pub port: u16,
    /// Connections accepted so far.
    pub accepted: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    held: Arc<Mutex<Vec<TcpStream>>>,
    thread: Option<JoinHandle<()>>,
}

impl Listener {
    pub fn start(serve: Serve) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        Self::with(listener, serve)
    }

    pub fn with(listener: TcpListener, serve: Serve) -> Result<Self> {
        let port = listener.local_addr()?.port();
        let stop = Arc::new(AtomicBool::new(false));
        let held = Arc::new(Mutex::new(Vec::new()));
        let accepted = Arc::new(AtomicU64::new(0));
        let thread = std::thread::spawn({
            let (stop, held, accepted) = (stop.clone(), held.clone(), accepted.clone());
            move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let Ok(mut s) = stream else { continue };
                    accepted.fetch_add(1, Ordering::Relaxed);
                    match serve {
                        Serve::ReadOnceThenClose => {
                            let mut buf = [0u8; 64];
                            let _ = s.read(&mut buf);
                        }
                        Serve::Hold => held.lock().expect("lock").push(s),
                        Serve::Drain => {
                            std::thread::spawn(move || {
                                let mut buf = [0u8; 4096];
                                while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
                            });
                        }
                        Serve::ReadyForQuery => {
                            std::thread::spawn(move || {
                                let mut buf = [0u8; 4096];
                                while matches!(s.read(&mut buf), Ok(n) if n > 0) {
                                    if s.write_all(&[b'Z', 0, 0, 0, 5, b'I']).is_err() {
                                        return;
                                    }
                                }
                            });
                        }
                    }
                }
            }
        });
        Ok(Self {
            port,
            accepted,
            stop,
            held,
            thread: Some(thread),
        })
    }

    pub fn held(&self) -> usize {
        self.held.lock().expect("lock").len()
    }

    /// Closes every held connection.
    pub fn close_all(&self) {
        self.held.lock().expect("lock").clear();
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.close_all();
    }
}

/// A Python process holding `count` TCP connections to `host:port` (optionally after a
/// Postgres startup packet as `postgres`), printing `ready <pid> <local ports...>` once all are
/// open; it holds them until killed, or closes them all and exits on a line on stdin.
pub struct ConnHolder {
    pub child: Child,
    pub pid: u32,
    pub local_ports: Vec<u16>,
    _stdout: BufReader<ChildStdout>,
}

const HOLDER_PY: &str = r#"
import os, resource, socket, struct, sys
host, port, count, startup = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
want = count + 64
resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), max(hard, want)))
socks = []
params = b"user\0postgres\0database\0postgres\0\0"
packet = struct.pack("!II", 8 + len(params), 196608) + params
for _ in range(count):
    s = socket.create_connection((host, port), timeout=30)
    if startup:
        s.sendall(packet)
        got = b""
        while not got.endswith(b"Z\0\0\0\x05I"):
            chunk = s.recv(4096)
            if not chunk:
                sys.exit("server closed during startup: %r" % got[-64:])
            got += chunk
    socks.append(s)
ports = " ".join(str(s.getsockname()[1]) for s in socks)
print("ready %d %s" % (os.getpid(), ports), flush=True)
sys.stdin.readline()
for s in socks:
    s.close()
print("closed", flush=True)
"#;

impl ConnHolder {
    pub fn start(host: &str, port: u16, count: usize, postgres_startup: bool) -> Result<Self> {
        let mut child = Command::new("/usr/bin/python3")
            .args(["-c", HOLDER_PY, host, &port.to_string(), &count.to_string()])
            .arg(if postgres_startup { "1" } else { "0" })
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("python3")?;
        let pid = child.id();
        let mut stdout = BufReader::new(child.stdout.take().context("stdout")?);
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        let Some(rest) = line.trim().strip_prefix("ready ") else {
            let _ = child.kill();
            bail!("holder did not get its {count} connections: {line:?}");
        };
        let local_ports = rest
            .split_whitespace()
            .skip(1)
            .map(|p| p.parse().context("port"))
            .collect::<Result<Vec<u16>>>()?;
        Ok(Self {
            child,
            pid,
            local_ports,
            _stdout: stdout,
        })
    }

    /// Asks the holder to close its connections and exit, and waits for it.
    pub fn close(mut self) -> Result<()> {
        if let Some(stdin) = self.child.stdin.as_mut() {
            stdin.write_all(b"close\n")?;
        }
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for ConnHolder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// GET `path` on 127.0.0.1:`port`: (status code, body).
pub fn http_get(port: u16, path: &str) -> Result<(u16, String)> {
    let answer = crate::prom::http_get(&format!("127.0.0.1:{port}"), path, Duration::from_secs(5))?;
    Ok((answer.status, answer.body))
}

/// The sum of every sample of metric `name` whose labels contain each of `labels`.
pub fn metric_sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter(|l| labels.iter().all(|label| l.contains(label)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The daemon's metrics endpoint.
pub struct MetricsEndpoint(pub u16);

impl MetricsEndpoint {
    pub fn text(&self) -> Result<String> {
        let (code, body) = http_get(self.0, "/metrics")?;
        if code != 200 {
            bail!("/metrics answered {code}");
        }
        Ok(body)
    }

    pub fn tracked(&self) -> Result<i64> {
        Ok(metric_sum(&self.text()?, "pgconn_tracer_tracked_connections", &[]) as i64)
    }

    pub fn lost(&self, location: &str) -> Result<u64> {
        let filter = if location.is_empty() {
            String::new()
        } else {
            format!("where=\"{location}\"")
        };
        Ok(metric_sum(&self.text()?, "pgconn_tracer_events_lost_total", &[&filter]) as u64)
    }

    /// Polls until the tracked count equals `want`; returns the last value seen and when.
    pub fn wait_tracked(&self, want: i64, timeout: Duration) -> (i64, Duration) {
        let started = Instant::now();
        loop {
            let now = self.tracked().unwrap_or(-1);
            if now == want || started.elapsed() >= timeout {
                return (now, started.elapsed());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Established and close-wait TCP sockets with `port` on either end, as `local remote`
/// pairs; a connection between two local processes is listed once per end, as the tracer
/// tracks it once per role.
pub fn ss_connections(port: u16) -> Result<HashSet<(String, String)>> {
    let out = crate::run_ok(
        Command::new("ss")
            .args(["-tnH", "state", "established", "state", "close-wait"])
            .arg(format!("( sport = :{port} or dport = :{port} )")),
    )?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // With a single state filter ss drops the state column; with several it keeps it.
            let n = f.len();
            (n >= 2).then(|| (f[n - 2].to_owned(), f[n - 1].to_owned()))
        })
        .collect())
}
