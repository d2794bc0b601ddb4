//! The event model of the SPEC: the fields every connection event carries, the event bodies,
//! and their JSON form (one object per line). Writing them out is the daemon's job
//! (`tracer::export::events`).

use std::time::SystemTime;

use serde::Serialize;

use crate::{
    conn_table::{ClosedBy, Conn, Role, Transport},
    detectors::{ConnState, LeakReason},
    endpoint::Endpoint,
};

/// The fields every connection event carries.
#[derive(Clone, Debug, Serialize)]
pub struct ConnFields {
    pub conn_id: String,
    pub role: Role,
    pub transport: Transport,
    /// In its text form (`ip:port`, `[v6]:port`, a path, or `""`), written straight into
    /// the line.
    #[serde(serialize_with = "as_text")]
    pub local: Endpoint,
    #[serde(serialize_with = "as_text")]
    pub remote: Endpoint,
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

/// Written in one piece: `collect_str` would pass each octet and colon of an address
/// through the JSON escaper separately.
fn as_text<S: serde::Serializer>(end: &Endpoint, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&end.text())
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

#[cfg(test)]
mod tests;
