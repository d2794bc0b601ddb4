//! The daemon's events (one JSON object a line, docs/events.schema.json) as one typed
//! `Event` for every test file, one matcher, `Want`, instead of a filter per file, and the
//! selections by port and by Unix socket path.

use std::{
    collections::BTreeSet,
    fmt, fs,
    io::{BufRead as _, BufReader},
    path::Path,
};

use serde::Deserialize;

use crate::{Value, port_of};

/// One event line (or one line of `tracer list --json`, which has the connection fields
/// and `age_s`, `idle_s`, without `type` and `ts`). Connection fields are empty (`""`, 0)
/// on `ready` and `lost`, which have none; a field only some types carry is `None` on the
/// others, and so is a JSON `null`.
/// Unknown fields fail the parse: this is the tests' own reading of the schema.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Event {
    #[serde(rename = "type")]
    pub kind: String,
    pub ts: String,
    // `ready`: what the daemon watches.
    pub version: Option<String>,
    pub ports: Option<Vec<u16>>,
    pub probes: Option<Vec<String>>,
    pub unix_socket_glob: Option<String>,
    // Every connection event: which connection,
    pub conn_id: String,
    pub role: String,
    pub transport: String,
    pub local: String,
    pub remote: String,
    // its process,
    pub pid: u32,
    pub uid: u32,
    pub comm: String,
    pub exe: Option<String>,
    pub cmdline: Option<String>,
    // where that process runs,
    pub cgroup: Option<String>,
    pub container_id: Option<String>,
    pub container_runtime: Option<String>,
    pub pod_uid: Option<String>,
    pub systemd_unit: Option<String>,
    // its state, and the other ends that pair with it.
    pub state: String,
    pub peer_conn_id: Option<String>,
    pub backend_pid: Option<u32>,
    pub linked: Option<Linked>,
    // `open`; `leak` has `age_s` too.
    pub preexisting: Option<bool>,
    pub age_s: Option<f64>,
    // `close`.
    pub duration_s: Option<f64>,
    pub bytes_sent: Option<u64>,
    pub bytes_received: Option<u64>,
    pub closed_by: Option<String>,
    // `stall` and `stall_end`.
    pub waiting_s: Option<f64>,
    pub waited_s: Option<f64>,
    // `leak` and `leak_end`.
    pub reason: Option<String>,
    pub idle_s: Option<f64>,
    pub lasted_s: Option<f64>,
    // `lost`.
    pub count: Option<u64>,
    #[serde(rename = "where")]
    pub lost_where: Option<String>,
    /// The line as the daemon wrote it: what `Display` shows and what the schema checks.
    #[serde(skip)]
    pub line: String,
}

/// `linked` on a pooler's connections: the other side of the pooler (a client connection
/// with its application, or a server connection with the backend it pins).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Linked {
    pub conn_id: String,
    pub remote: String,
    // On a server connection: the application it serves, when on this host.
    pub pid: Option<u32>,
    pub comm: Option<String>,
    pub container_id: Option<String>,
    // On a client connection: the backend its server connection pins.
    pub backend_pid: Option<u32>,
}

impl Event {
    /// Parses one line, or says which line did not parse and why.
    pub fn parse(line: &str) -> Result<Self, String> {
        let mut event: Self =
            serde_json::from_str(line).map_err(|e| format!("bad event line {line}: {e}"))?;
        event.line = line.to_owned();
        Ok(event)
    }

    /// No container id, runtime or pod: a process of the host itself.
    pub fn in_no_container(&self) -> bool {
        self.container_id.is_none() && self.container_runtime.is_none() && self.pod_uid.is_none()
    }

    /// The line as JSON, for what is about the encoding itself (the schema, `null`s,
    /// which keys are present).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.line).expect("parsed once already")
    }
}

/// `e.idle_s()`: the seconds the field holds, or a panic naming the field and the event.
macro_rules! seconds {
    ($($field:ident),*) => {
        impl Event {
            $(
                pub fn $field(&self) -> f64 {
                    self.$field
                        .unwrap_or_else(|| panic!(concat!(stringify!($field), " missing in {}"), self))
                }
            )*
        }
    };
}
seconds!(age_s, idle_s, duration_s, waiting_s, waited_s, lasted_s);

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.line)
    }
}

/// What an event must be; what is not named matches anything.
/// `Want::kind("leak").role("client").pid(pid)` selects one client's leaks.
#[derive(Clone, Debug, Default)]
pub struct Want {
    kind: Option<String>,
    conn_id: Option<String>,
    role: Option<String>,
    pid: Option<u32>,
    reason: Option<String>,
    remote: Option<String>,
}

impl Want {
    /// Events of `type` `kind`.
    pub fn kind(kind: &str) -> Self {
        Self {
            kind: Some(kind.to_owned()),
            ..Self::default()
        }
    }

    /// Events of `type` `kind` for `role` (client or server) owned by `pid`.
    pub fn of(kind: &str, role: &str, pid: u32) -> Self {
        Self::kind(kind).role(role).pid(pid)
    }

    /// Events of one connection, by `conn_id`, whatever their type.
    pub fn conn(conn_id: &str) -> Self {
        Self {
            conn_id: Some(conn_id.to_owned()),
            ..Self::default()
        }
    }

    pub fn role(mut self, role: &str) -> Self {
        self.role = Some(role.to_owned());
        self
    }

    pub fn pid(mut self, pid: u32) -> Self {
        self.pid = Some(pid);
        self
    }

    pub fn reason(mut self, reason: &str) -> Self {
        self.reason = Some(reason.to_owned());
        self
    }

    pub fn remote(mut self, remote: &str) -> Self {
        self.remote = Some(remote.to_owned());
        self
    }

    pub fn matches(&self, e: &Event) -> bool {
        let same = |want: &Option<String>, have: &str| want.as_deref().is_none_or(|w| w == have);
        same(&self.kind, &e.kind)
            && same(&self.conn_id, &e.conn_id)
            && same(&self.role, &e.role)
            && same(&self.remote, &e.remote)
            && self.pid.is_none_or(|pid| pid == e.pid)
            && (self.reason.is_none() || self.reason == e.reason)
    }
    /// Whether any of `events` matches.
    pub fn found_in(&self, events: &[Event]) -> bool {
        events.iter().any(|e| self.matches(e))
    }

    /// The events that match, in order.
    pub fn find<'e>(&self, events: &'e [Event]) -> Vec<&'e Event> {
        self.find_where(events, |_| true)
    }

    /// How many of `events` match.
    pub fn count(&self, events: &[Event]) -> usize {
        events.iter().filter(|e| self.matches(e)).count()
    }

    /// The `conn_id`s of the events that match, in order (events without one skipped).
    pub fn conn_ids_in<'e>(&self, events: &'e [Event]) -> impl Iterator<Item = &'e str> {
        self.find(events)
            .into_iter()
            .map(|e| e.conn_id.as_str())
            .filter(|id| !id.is_empty())
    }

    /// The events that match and also satisfy `pred` (for what is not one field's value).
    pub fn find_where<'e>(
        &self,
        events: &'e [Event],
        pred: impl Fn(&Event) -> bool,
    ) -> Vec<&'e Event> {
        events
            .iter()
            .filter(|e| self.matches(e) && pred(e))
            .collect()
    }
}

/// Every complete event line in the file at `path` so far (none if it is not there yet).
pub fn read_events(path: &Path) -> Vec<Event> {
    let Ok(file) = fs::File::open(path) else {
        return Vec::new();
    };
    BufReader::new(file)
        .lines()
        .map_while(Result::ok)
        // A line the daemon is still writing has no closing brace yet.
        .filter(|l| l.ends_with('}'))
        .map(|l| Event::parse(&l).unwrap_or_else(|e| panic!("{e}")))
        .collect()
}

/// The connection events touching `port` on either end.
pub fn conn_events(events: &[Event], port: u16) -> Vec<Event> {
    events
        .iter()
        .filter(|e| port_of(&e.local) == Some(port) || port_of(&e.remote) == Some(port))
        .cloned()
        .collect()
}

/// The connection events with the Unix socket `path` on either end.
pub fn path_events(events: &[Event], path: &str) -> Vec<Event> {
    events
        .iter()
        .filter(|e| e.remote == path || e.local == path)
        .cloned()
        .collect()
}

/// The `conn_id`s of `events`.
pub fn conn_ids<'a>(events: impl IntoIterator<Item = &'a Event>) -> BTreeSet<String> {
    events.into_iter().map(|e| e.conn_id.clone()).collect()
}
