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
mod tests {
    use super::*;
    use crate::model::conn_table::Owner;
    use std::sync::Mutex;

    fn conn() -> Conn {
        Conn::new(
            4242,
            Role::Server,
            Transport::Tcp,
            "127.0.0.1:5432".into(),
            "127.0.0.1:40000".into(),
            Owner {
                pid: 9,
                uid: 0,
                cgroup_id: 1,
                comm: "postgres".into(),
                start_boottime_ns: 0,
            },
            0,
        )
    }

    #[test]
    fn close_event_has_every_common_field() {
        let ev = Event::at(
            SystemTime::UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456),
            EventBody::Close {
                conn: ConnFields::new(&conn()),
                duration_s: 0.5,
                bytes_sent: 10,
                bytes_received: 20,
                closed_by: ClosedBy::Peer,
            },
        );
        let v: serde_json::Value = serde_json::from_str(&ev.to_line()).expect("json");
        assert_eq!(v["ts"], "2023-11-14T22:13:20.123456Z");
        assert_eq!(v["type"], "close");
        assert_eq!(v["conn_id"], "4242");
        assert_eq!(v["role"], "server");
        assert_eq!(v["transport"], "tcp");
        assert_eq!(v["closed_by"], "peer");
        assert_eq!(v["pid"], 9);
        assert_eq!(v["state"], "unknown");
        for key in [
            "peer_conn_id",
            "backend_pid",
            "linked",
            "exe",
            "cmdline",
            "cgroup",
            "container_id",
            "container_runtime",
            "pod_uid",
            "systemd_unit",
        ] {
            assert!(v.get(key).is_some_and(serde_json::Value::is_null), "{key}");
        }
        assert!(ev.to_line().ends_with("}\n"));
    }

    #[test]
    fn lost_event_uses_where() {
        let ev = Event::at(
            SystemTime::UNIX_EPOCH,
            EventBody::Lost {
                count: 3,
                location: "user_queue",
            },
        );
        let v: serde_json::Value = serde_json::from_str(&ev.to_line()).expect("json");
        assert_eq!(
            (v["count"].as_u64(), v["where"].as_str()),
            (Some(3), Some("user_queue"))
        );
    }

    /// A writer that blocks until released, like a stdout pipe nobody reads.
    struct Gate(Arc<Mutex<Vec<u8>>>, Arc<(Mutex<bool>, std::sync::Condvar)>);
    impl Write for Gate {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let (open, cv) = &*self.1;
            let mut g = open.lock().expect("lock");
            while !*g {
                g = cv.wait(g).expect("wait");
            }
            self.0.lock().expect("lock").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn full_queue_drops_and_counts_without_blocking() {
        let out = Arc::new(Mutex::new(Vec::new()));
        let gate = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        let sink = EventSink::start(
            Box::new(Gate(out.clone(), gate.clone())),
            4,
            EventFormat::Json,
        );
        let ev = Event::at(
            SystemTime::UNIX_EPOCH,
            EventBody::Lost {
                count: 1,
                location: "x",
            },
        );
        let accepted = (0..100).filter(|_| sink.send(&ev)).count();
        // The writer holds at most one line, the queue four.
        assert!(accepted <= 5, "accepted {accepted}");
        assert_eq!(sink.dropped(), 100 - accepted as u64);
        *gate.0.lock().expect("lock") = true;
        gate.1.notify_all();
        assert!(sink.finish(Duration::from_secs(5)));
        let written = out
            .lock()
            .expect("lock")
            .iter()
            .filter(|&&b| b == b'\n')
            .count();
        assert_eq!(written, accepted);
    }
}
