//! The JSON event stream: the event model of the SPEC, its serialization (one object per
//! line), and a bounded queue to a writer thread, so a slow reader never stalls the daemon;
//! whatever the queue cannot take is counted and reported as a `lost` event.

use std::{
    io::Write,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc::{self, Receiver, SyncSender, TrySendError},
    },
    thread::JoinHandle,
    time::{Duration, SystemTime},
};

use serde::Serialize;

use crate::{
    model::conn_table::{ClosedBy, Conn, Role, Transport},
    model::detectors::{ConnState, LeakReason},
};

/// The fields every connection event carries.
#[derive(Clone, Debug, Serialize)]
pub struct ConnFields {
    pub conn_id: String,
    pub role: Role,
    pub transport: Transport,
    pub local: String,
    pub remote: String,
    pub pid: u32,
    pub comm: String,
    pub exe: Option<String>,
    pub cmdline: Option<String>,
    pub uid: u32,
    pub cgroup: Option<String>,
    pub container_id: Option<String>,
    pub container_runtime: Option<&'static str>,
    pub pod_uid: Option<String>,
    pub systemd_unit: Option<String>,
    pub state: ConnState,
    /// The other end's `conn_id` when both ends are on this host.
    pub peer_conn_id: Option<String>,
    /// Client role: the pid the server announced in BackendKeyData (not a pooler's).
    pub backend_pid: Option<u32>,
    /// Through a pooler: the connection on its other side paired with this one right now.
    pub linked: Option<Linked>,
}

/// `linked`: what a connection through a pooler is paired with right now.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Linked {
    /// On a pooler's connection to Postgres: the client connection it serves (the pooler's
    /// accepted end), with the application behind it when that is on this host.
    Client {
        conn_id: String,
        pid: Option<u32>,
        comm: Option<String>,
        container_id: Option<String>,
        /// The client's address as the pooler sees it.
        remote: String,
    },
    /// On a pooler's client connection, or the application's own: the pooler's server
    /// connection it is linked to and the backend that one pins.
    Server {
        conn_id: String,
        backend_pid: Option<u32>,
        remote: String,
    },
}

impl ConnFields {
    pub fn new(conn: &Conn) -> Self {
        let details = &conn.details;
        Self {
            conn_id: conn.cookie.to_string(),
            role: conn.role,
            transport: conn.transport,
            local: conn.local.clone(),
            remote: conn.remote.clone(),
            pid: conn.owner.pid,
            comm: conn.owner.comm.clone(),
            exe: details.exe.clone(),
            cmdline: details.cmdline.clone(),
            uid: conn.owner.uid,
            cgroup: details.cgroup.clone(),
            container_id: details.container.container_id.clone(),
            container_runtime: details.container.container_runtime,
            pod_uid: details.container.pod_uid.clone(),
            systemd_unit: details.container.systemd_unit.clone(),
            state: conn.view().state(),
            peer_conn_id: None,
            backend_pid: None,
            linked: None,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventBody {
    Ready {
        version: &'static str,
        ports: Vec<u16>,
        probes: Vec<String>,
        unix_socket_glob: String,
    },
    Open {
        #[serde(flatten)]
        conn: ConnFields,
        preexisting: bool,
        /// 0 for a new connection; a lower bound for one found at start-up.
        age_s: f64,
    },
    Close {
        #[serde(flatten)]
        conn: ConnFields,
        duration_s: f64,
        bytes_sent: u64,
        bytes_received: u64,
        closed_by: ClosedBy,
    },
    Stall {
        #[serde(flatten)]
        conn: ConnFields,
        waiting_s: f64,
    },
    StallEnd {
        #[serde(flatten)]
        conn: ConnFields,
        waited_s: f64,
    },
    Leak {
        #[serde(flatten)]
        conn: ConnFields,
        reason: LeakReason,
        age_s: f64,
        idle_s: f64,
    },
    LeakEnd {
        #[serde(flatten)]
        conn: ConnFields,
        reason: LeakReason,
        lasted_s: f64,
    },
    Lost {
        count: u64,
        #[serde(rename = "where")]
        location: &'static str,
    },
}

#[derive(Clone, Debug, Serialize)]
pub struct Event {
    /// RFC 3339, UTC, microseconds.
    pub ts: String,
    #[serde(flatten)]
    pub body: EventBody,
}

impl Event {
    pub fn at(time: SystemTime, body: EventBody) -> Self {
        Self {
            ts: humantime::format_rfc3339_micros(time).to_string(),
            body,
        }
    }

    pub fn to_line(&self) -> String {
        let mut line = serde_json::to_string(self).unwrap_or_else(|e| {
            format!(r#"{{"type":"error","error":"serialization failed: {e}"}}"#)
        });
        line.push('\n');
        line
    }
}

/// How events are written (`--format`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EventFormat {
    /// One JSON object per line (the SPEC's event stream).
    #[default]
    Json,
    /// One readable line per event (`crate::export::text`).
    Text,
}

impl Event {
    pub fn line(&self, format: EventFormat) -> String {
        match format {
            EventFormat::Json => self.to_line(),
            EventFormat::Text => crate::export::text::line(self),
        }
    }
}

/// Where events go: the sending half of a bounded queue drained by a writer thread.
pub struct EventSink {
    queue: SyncSender<String>,
    format: EventFormat,
    dropped: Arc<AtomicU64>,
    writer: JoinHandle<()>,
}

impl EventSink {
    /// Starts the writer thread. `capacity` lines may wait in the queue.
    pub fn start(output: Box<dyn Write + Send>, capacity: usize, format: EventFormat) -> Self {
        let (queue, lines) = mpsc::sync_channel(capacity);
        let writer = std::thread::Builder::new()
            .name("event-writer".into())
            .spawn(move || write_lines(output, lines))
            .expect("spawning the event writer thread");
        Self {
            queue,
            format,
            dropped: Arc::new(AtomicU64::new(0)),
            writer,
        }
    }

    /// Queues an event; when the queue is full the event is dropped and counted.
    pub fn send(&self, event: &Event) -> bool {
        match self.queue.try_send(event.line(self.format)) {
            Ok(()) => true,
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Events dropped so far because the reader was too slow.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Closes the queue and waits up to `timeout` for the writer to flush what is queued.
    pub fn finish(self, timeout: Duration) -> bool {
        drop(self.queue);
        let deadline = std::time::Instant::now() + timeout;
        while !self.writer.is_finished() {
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.writer.join().is_ok()
    }
}

fn write_lines(mut output: Box<dyn Write + Send>, lines: Receiver<String>) {
    loop {
        // Flush only when the queue is empty: bursts go out in few writes.
        let line = match lines.try_recv() {
            Ok(line) => line,
            Err(mpsc::TryRecvError::Empty) => {
                if output.flush().is_err() {
                    return;
                }
                match lines.recv() {
                    Ok(line) => line,
                    Err(_) => return,
                }
            }
            Err(mpsc::TryRecvError::Disconnected) => break,
        };
        if output.write_all(line.as_bytes()).is_err() {
            log::error!("event output closed; dropping further events");
            return;
        }
    }
    let _ = output.flush();
}

#[cfg(test)]
mod tests;
