//! The live table: the daemon's open connections as `GET /api/v1/connections` serves them.
//! Owns the row the API serves ([`LiveConn`]: the event fields plus live figures and the
//! verdicts that hold), the snapshot the tick publishes for the HTTP worker ([`LiveTable`]),
//! and the reading side `tracer list` and `tracer top` use ([`Row`], [`fetch`]).
//!
//! The tick builds the rows once a second and swaps them in behind a mutex held only for the
//! swap; a request clones the `Arc` and serializes on the HTTP worker, so requests never
//! touch the connection table and never delay the main loop. Building costs about 1 us per
//! connection: above [`ALWAYS_PUBLISHED`] connections the tick rebuilds only while someone
//! reads the table, and a request that finds rows older than [`MAX_STALE`] waits for the
//! next tick's (see [`LiveTable::stale_at`]), so a table nobody reads costs nothing.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use http_body_util::{BodyExt as _, Empty};
use hyper::{
    Request, StatusCode,
    body::Bytes,
    header::{ACCEPT, HOST},
};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};

use crate::{
    export::events::ConnFields,
    model::conn_table::Conn,
    model::detectors::{ConnState, LeakReason},
};

/// Where the live table is served, on the metrics address.
pub const API_PATH: &str = "/api/v1/connections";

fn secs(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// `linked` as a reader sees it (the daemon writes [`crate::export::events::Linked`]): on the
/// pooler's server connection it names the client it serves (`pid`, `comm`, `container_id`
/// when that client is on this host); on a client connection, the server connection
/// (`backend_pid`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Linked {
    pub conn_id: String,
    #[serde(default)]
    pub pid: Option<u32>,
    #[serde(default)]
    pub comm: Option<String>,
    #[serde(default)]
    pub container_id: Option<String>,
    #[serde(default)]
    pub backend_pid: Option<u32>,
    #[serde(default)]
    pub remote: Option<String>,
}

/// One object of `GET /api/v1/connections`: the event field names, then what holds now.
#[derive(Clone, Debug, Serialize)]
pub struct LiveConn {
    /// The event fields, `peer_conn_id`, `backend_pid` and `linked` included.
    #[serde(flatten)]
    pub conn: ConnFields,
    /// Found open at start-up (then `age_s` is a lower bound).
    pub preexisting: bool,
    pub age_s: f64,
    /// Since any bytes last moved either way.
    pub idle_s: f64,
    /// How long the request in flight has waited for an answer; null when none is in flight.
    pub waiting_s: Option<f64>,
    /// The request in flight has waited `stall_after` (a `stall` event was sent).
    pub stalled: bool,
    /// The leak verdict that holds (a `leak` event was sent), or null.
    pub leak: Option<LeakReason>,
    /// Payload bytes so far, from the owner's point of view.
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

impl LiveConn {
    /// The row of `conn` at `now`, with its event fields as the daemon reports them
    /// (`fields`: the joins with other connections are the daemon's).
    pub fn new(fields: ConnFields, conn: &Conn, now: u64) -> Self {
        let view = conn.view();
        Self {
            conn: fields,
            preexisting: conn.preexisting,
            age_s: secs(now.saturating_sub(conn.born_ns)),
            idle_s: secs(now.saturating_sub(view.last_activity_ns())),
            waiting_s: view
                .outstanding()
                .then(|| secs(now.saturating_sub(view.to_server_ns))),
            stalled: conn.episodes.stalled(),
            leak: conn.episodes.leak(),
            bytes_sent: conn.live.bytes_sent,
            bytes_received: conn.live.bytes_received,
        }
    }
}

/// Up to this many connections the rows are rebuilt every tick (a few ms at most).
pub const ALWAYS_PUBLISHED: usize = 4096;
/// Above it, rows are rebuilt every tick while the table was read this recently.
pub const READ_RECENTLY: Duration = Duration::from_secs(30);
/// A request finding older rows (the first read in a while) waits for the next tick's: more
/// than a tick, so a reader polling every second never waits.
pub const MAX_STALE: Duration = Duration::from_secs(2);
/// How long such a request waits at most (a tick held up by a backlog of records) before
/// it gets the rows there are.
pub const FRESH_WAIT: Duration = Duration::from_secs(2);

/// The rows the last tick published; `None` until the daemon is ready.
#[derive(Default)]
pub struct LiveTable {
    rows: Mutex<Option<Published>>,
    /// When the table was last read (monotonic ns; 0: never).
    read_ns: AtomicU64,
}

struct Published {
    rows: Arc<Vec<LiveConn>>,
    at_ns: u64,
}

impl LiveTable {
    /// Whether the tick at `now` should rebuild the rows of `conns` connections.
    pub fn wanted(&self, conns: usize, now: u64) -> bool {
        let within = |since: u64, limit: Duration| {
            since != 0 && now.saturating_sub(since) < limit.as_nanos() as u64
        };
        let published = self
            .rows
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map_or(0, |p| p.at_ns);
        conns <= ALWAYS_PUBLISHED
            || published == 0
            || within(self.read_ns.load(Ordering::Relaxed), READ_RECENTLY)
    }

    /// When the rows a request at `now` would get were built, if they are older than
    /// [`MAX_STALE`]: the request then waits (at most [`FRESH_WAIT`]) for rows built after
    /// that. Counts as a read, so the next tick builds them.
    pub fn stale_at(&self, now: u64) -> Option<u64> {
        self.read_ns.store(now.max(1), Ordering::Relaxed);
        let published = self.published_ns()?;
        (now.saturating_sub(published) > MAX_STALE.as_nanos() as u64).then_some(published)
    }

    /// When the current rows were built; `None` before the first publish.
    pub fn published_ns(&self) -> Option<u64> {
        self.rows
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map(|p| p.at_ns)
    }

    pub fn publish(&self, rows: Vec<LiveConn>, now: u64) {
        let published = Published {
            rows: Arc::new(rows),
            at_ns: now,
        };
        // A holder that panicked leaves a whole value behind: keep going.
        *self.rows.lock().unwrap_or_else(PoisonError::into_inner) = Some(published);
    }

    /// Back to "not ready" (shutdown).
    pub fn withdraw(&self) {
        *self.rows.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }

    /// The last rows, read at `now`.
    pub fn snapshot(&self, now: u64) -> Option<Arc<Vec<LiveConn>>> {
        self.read_ns.store(now.max(1), Ordering::Relaxed);
        self.rows
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map(|p| Arc::clone(&p.rows))
    }

    /// The API's body at `now`, or `None` before the first publish.
    pub fn to_json(&self, now: u64) -> Option<Result<Vec<u8>, serde_json::Error>> {
        self.snapshot(now).map(|rows| serde_json::to_vec(&*rows))
    }
}

/// An API row as a reader sees it: what `tracer list` and `tracer top` show. Fields a
/// daemon does not send take their defaults, so an older or newer daemon still reads.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Row {
    pub conn_id: String,
    pub role: String,
    pub transport: String,
    pub local: String,
    pub remote: String,
    pub pid: u32,
    pub comm: String,
    pub cmdline: Option<String>,
    pub container_id: Option<String>,
    pub state: Option<ConnState>,
    pub age_s: f64,
    pub idle_s: Option<f64>,
    pub waiting_s: Option<f64>,
    pub stalled: bool,
    pub leak: Option<LeakReason>,
    pub peer_conn_id: Option<String>,
    pub backend_pid: Option<u32>,
    pub linked: Option<Linked>,
}

impl Row {
    /// One object of the live table; an object that does not read (a field of another type)
    /// reads as an empty row rather than hiding the others.
    pub fn read(object: &serde_json::Map<String, serde_json::Value>) -> Self {
        Self::deserialize(object).unwrap_or_default()
    }

    pub fn state(&self) -> ConnState {
        self.state.unwrap_or(ConnState::Unknown)
    }

    /// Short (12-hex) container id, as `docker ps` shows it.
    pub fn short_container(&self) -> Option<&str> {
        self.container_id
            .as_deref()
            .map(|id| id.get(..12).unwrap_or(id))
    }
}

/// Why the live table could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("no daemon answers at {addr}: {cause}")]
    Unreachable {
        addr: SocketAddr,
        cause: std::io::Error,
    },
    #[error("no answer from {addr} within {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
    #[error("{addr} does not answer HTTP/1: {cause}")]
    Http {
        addr: SocketAddr,
        cause: hyper::Error,
    },
    #[error("the daemon at {addr} answered {status} for {API_PATH}")]
    Status {
        addr: SocketAddr,
        status: StatusCode,
    },
    #[error("the daemon at {addr} sent a live table that is not a JSON array of objects: {cause}")]
    Body {
        addr: SocketAddr,
        cause: serde_json::Error,
    },
}

/// How long a reader waits for the daemon's answer: well past [`FRESH_WAIT`] plus the time
/// to send a large table.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// `GET /api/v1/connections` from the daemon at `addr`: the rows as sent (for `--json`).
pub async fn fetch(
    addr: SocketAddr,
) -> Result<Vec<serde_json::Map<String, serde_json::Value>>, FetchError> {
    match tokio::time::timeout(FETCH_TIMEOUT, fetch_now(addr)).await {
        Ok(result) => result,
        Err(_) => Err(FetchError::Timeout {
            addr,
            timeout: FETCH_TIMEOUT,
        }),
    }
}

async fn fetch_now(
    addr: SocketAddr,
) -> Result<Vec<serde_json::Map<String, serde_json::Value>>, FetchError> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|cause| FetchError::Unreachable { addr, cause })?;
    let http = |cause| FetchError::Http { addr, cause };
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(http)?;
    tokio::spawn(async move {
        // Ends when the response is read and `sender` is dropped.
        #[allow(
            clippy::let_underscore_must_use,
            reason = "a client that went away needs nothing more"
        )]
        let _ = connection.await;
    });
    let request = Request::get(API_PATH)
        .header(HOST, addr.to_string())
        .header(ACCEPT, "application/json")
        .body(Empty::<Bytes>::new())
        .expect("a static request is valid");
    let response = sender.send_request(request).await.map_err(http)?;
    let status = response.status();
    if status != StatusCode::OK {
        return Err(FetchError::Status { addr, status });
    }
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(http)?
        .to_bytes();
    serde_json::from_slice(&body).map_err(|cause| FetchError::Body { addr, cause })
}

/// Rows typed for display, from what [`fetch`] returned.
pub fn typed(rows: &[serde_json::Map<String, serde_json::Value>]) -> Vec<Row> {
    rows.iter().map(Row::read).collect()
}

#[cfg(test)]
mod tests;
