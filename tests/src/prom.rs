//! The Prometheus side of the root tests: a minimal HTTP GET (the daemon's `/metrics` and
//! `/healthz`, Prometheus's API) and its HTTPS twin with basic auth (the endpoint behind
//! `--web-config`), a real Prometheus server that scrapes the daemon, and
//! `promtool check metrics`.

use std::{
    fs,
    io::{ErrorKind, Read, Write},
    net::{SocketAddr, TcpStream},
    path::Path,
    process::{Child, Command, ExitStatus, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use base64::Engine as _;
use rustls::{
    ClientConfig, ClientConnection, RootCertStore, StreamOwned,
    pki_types::{CertificateDer, ServerName, pem::PemObject},
};
use serde_json::Value;

use crate::{TempDir, free_port};

/// One HTTP answer.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: String,
    pub body: String,
}

/// `GET path` on `addr` (`ip:port`) over HTTP/1.0; each connect, write and read is bounded by
/// `timeout`.
pub fn http_get(addr: &str, path: &str, timeout: Duration) -> Result<HttpResponse> {
    let sock: SocketAddr = addr
        .parse()
        .with_context(|| format!("bad address {addr}"))?;
    let mut stream = TcpStream::connect_timeout(&sock, timeout)
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .with_context(|| format!("reading the answer to GET {path} from {addr}"))?;
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> Result<HttpResponse> {
    let text = String::from_utf8_lossy(raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("no end of headers in {text:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status in {head:?}"))?;
    Ok(HttpResponse {
        status,
        headers: head.to_owned(),
        body: body.to_owned(),
    })
}

/// `GET path` on `addr` over HTTPS, verifying the server as `server_name` against the PEM
/// CA certificate `ca`, with basic auth when `auth` is (user, password); each read bounded
/// by `timeout`.
pub fn https_get(
    addr: &str,
    ca: &Path,
    server_name: &str,
    path: &str,
    auth: Option<(&str, &str)>,
    timeout: Duration,
) -> Result<HttpResponse> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).with_context(|| format!("{}", ca.display()))? {
        roots.add(cert?)?;
    }
    let config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
    let conn = ClientConnection::new(
        Arc::new(config),
        ServerName::try_from(server_name.to_owned())?,
    )?;
    let sock: SocketAddr = addr
        .parse()
        .with_context(|| format!("bad address {addr}"))?;
    let stream = TcpStream::connect_timeout(&sock, timeout)
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut tls = StreamOwned::new(conn, stream);
    let auth = auth.map_or(String::new(), |(user, password)| {
        let pair = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        format!("Authorization: Basic {pair}\r\n")
    });
    write!(
        tls,
        "GET {path} HTTP/1.1\r\nHost: {server_name}\r\n{auth}Connection: close\r\n\r\n"
    )
    .with_context(|| format!("TLS to {addr}"))?;
    let mut raw = Vec::new();
    match tls.read_to_end(&mut raw) {
        Ok(_) => {}
        // A peer that closes without close_notify after its whole answer.
        Err(e) if e.kind() == ErrorKind::UnexpectedEof && !raw.is_empty() => {}
        Err(e) => return Err(e).with_context(|| format!("reading GET {path} from {addr}")),
    }
    parse_response(&raw)
}

/// Percent-encodes a query-string value.
pub fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The value of one instant-vector sample of a `/api/v1/query` answer.
pub fn sample_value(sample: &Value) -> Option<f64> {
    sample["value"][1].as_str()?.parse().ok()
}

/// A real Prometheus server (`/usr/bin/prometheus`) scraping one target every second, with its
/// config and TSDB in a temporary directory; killed on drop.
pub struct Prometheus {
    child: Option<Child>,
    /// `127.0.0.1:port` of its web API.
    pub addr: String,
    dir: TempDir,
}

impl Prometheus {
    /// Starts Prometheus with one scrape job `job` on `target` (`ip:port`, path `/metrics`) and
    /// waits until `/-/ready` answers 200.
    pub fn start(job: &str, target: &str) -> Result<Self> {
        Self::start_with_config(&format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: '{job}'\n    static_configs:\n      - targets: ['{target}']\n"
        ))
    }

    /// Starts Prometheus with `config` as its prometheus.yml and waits until `/-/ready`
    /// answers 200.
    pub fn start_with_config(config_text: &str) -> Result<Self> {
        let dir = TempDir::new("prom")?;
        let config = dir.0.join("prometheus.yml");
        fs::write(&config, config_text)?;
        let addr = format!("127.0.0.1:{}", free_port()?);
        let log = fs::File::create(dir.0.join("log"))?;
        let child = Command::new("/usr/bin/prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.0.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning /usr/bin/prometheus")?;
        let mut prom = Self {
            child: Some(child),
            addr,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = http_get(&prom.addr, "/-/ready", Duration::from_secs(1))
                && r.status == 200
            {
                return Ok(prom);
            }
            let exited = crate::exit_status(&mut prom.child);
            if exited.is_some() || Instant::now() >= deadline {
                bail!(
                    "prometheus not ready within 30 s (exit: {exited:?}); log:\n{}",
                    prom.log()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Prometheus's own log.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.0.join("log")).unwrap_or_default()
    }

    /// The scrape targets Prometheus knows (`/api/v1/targets`, `data.activeTargets`).
    pub fn targets(&self) -> Result<Vec<Value>> {
        let r = http_get(&self.addr, "/api/v1/targets", Duration::from_secs(5))?;
        let v: Value = serde_json::from_str(&r.body)
            .with_context(|| format!("targets: not JSON: {}", r.body))?;
        Ok(v["data"]["activeTargets"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    /// Runs an instant PromQL query through `/api/v1/query`; returns `data.result`.
    pub fn query(&self, promql: &str) -> Result<Vec<Value>> {
        let path = format!("/api/v1/query?query={}", urlencode(promql));
        let r = http_get(&self.addr, &path, Duration::from_secs(5))?;
        let v: Value = serde_json::from_str(&r.body)
            .with_context(|| format!("query {promql}: not JSON: {}", r.body))?;
        if r.status != 200 || v["status"] != "success" {
            bail!("query {promql}: HTTP {}: {}", r.status, r.body);
        }
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }

    /// Repeats `query` until `done` holds for its result, or fails after `timeout` showing the
    /// last result.
    pub fn wait_for(
        &self,
        promql: &str,
        timeout: Duration,
        done: impl Fn(&[Value]) -> bool,
    ) -> Result<Vec<Value>> {
        let deadline = Instant::now() + timeout;
        loop {
            let result = self.query(promql)?;
            if done(&result) {
                return Ok(result);
            }
            if Instant::now() >= deadline {
                bail!(
                    "PromQL {promql}: condition not met within {timeout:?}; last result: {}",
                    Value::Array(result)
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Pipes `exposition` into `promtool check metrics`; returns its exit status and everything it
/// printed (stdout then stderr).
pub fn promtool_check_metrics(exposition: &str) -> Result<(ExitStatus, String)> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawning promtool")?;
    let mut stdin = child.stdin.take().context("promtool stdin")?;
    let text = exposition.to_owned();
    let writer = std::thread::spawn(move || stdin.write_all(text.as_bytes()));
    let out = child.wait_with_output()?;
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("writer panicked"))??;
    Ok((
        out.status,
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}
