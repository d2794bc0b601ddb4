//! Queries over the daemon's events (one JSON object a line, docs/events.schema.json), the
//! same for every test file: one matcher, `Want`, instead of a filter per file, and the
//! accessors that fail with the event in the message when a field is missing.

use std::collections::BTreeSet;

use crate::{Value, port_of};

/// The fields an event must carry, each with the given value; fields not named match
/// anything. `Want::kind("leak").role("client").pid(pid)` selects one client's leaks.
#[derive(Clone, Debug, Default)]
pub struct Want {
    fields: Vec<(&'static str, Value)>,
}

impl Want {
    /// Events of `type` `kind`.
    pub fn kind(kind: &str) -> Self {
        Self::default().with("type", kind)
    }

    /// Events of `type` `kind` for `role` (client or server) owned by `pid`.
    pub fn of(kind: &str, role: &str, pid: u32) -> Self {
        Self::kind(kind).role(role).pid(pid)
    }

    /// Events of one connection, by `conn_id`, whatever their type.
    pub fn conn(conn_id: &str) -> Self {
        Self::default().with("conn_id", conn_id)
    }

    /// Also `field` equal to `value`.
    pub fn with(mut self, field: &'static str, value: impl Into<Value>) -> Self {
        self.fields.push((field, value.into()));
        self
    }

    pub fn role(self, role: &str) -> Self {
        self.with("role", role)
    }

    pub fn pid(self, pid: u32) -> Self {
        self.with("pid", pid)
    }

    pub fn reason(self, reason: &str) -> Self {
        self.with("reason", reason)
    }

    pub fn matches(&self, event: &Value) -> bool {
        self.fields
            .iter()
            .all(|(field, value)| event[*field] == *value)
    }

    /// Whether any of `events` matches.
    pub fn found_in(&self, events: &[Value]) -> bool {
        events.iter().any(|e| self.matches(e))
    }

    /// The events that match, in order.
    pub fn find<'e>(&self, events: &'e [Value]) -> Vec<&'e Value> {
        self.find_where(events, |_| true)
    }

    /// How many of `events` match.
    pub fn count(&self, events: &[Value]) -> usize {
        events.iter().filter(|e| self.matches(e)).count()
    }

    /// The `conn_id`s of the events that match, in order (events without one skipped).
    pub fn conn_ids_in<'e>(&self, events: &'e [Value]) -> impl Iterator<Item = &'e str> {
        self.find(events)
            .into_iter()
            .filter_map(|e| e["conn_id"].as_str())
    }

    /// The events that match and also satisfy `pred` (for what is not one field's value).
    pub fn find_where<'e>(
        &self,
        events: &'e [Value],
        pred: impl Fn(&Value) -> bool,
    ) -> Vec<&'e Value> {
        events
            .iter()
            .filter(|e| self.matches(e) && pred(e))
            .collect()
    }
}

/// The connection events touching `port` on either end.
pub fn conn_events(events: &[Value], port: u16) -> Vec<Value> {
    events
        .iter()
        .filter(|e| port_of(&e["local"]) == Some(port) || port_of(&e["remote"]) == Some(port))
        .cloned()
        .collect()
}

/// The connection events with the Unix socket `path` on either end.
pub fn path_events(events: &[Value], path: &str) -> Vec<Value> {
    events
        .iter()
        .filter(|e| e["remote"] == path || e["local"] == path)
        .cloned()
        .collect()
}

pub fn pid_of(event: &Value) -> u32 {
    event["pid"].as_u64().expect("pid") as u32
}

pub fn conn_id_of(event: &Value) -> String {
    event["conn_id"].as_str().expect("conn_id").to_owned()
}

/// The `conn_id`s of `events`.
pub fn conn_ids<'a>(events: impl IntoIterator<Item = &'a Value>) -> BTreeSet<String> {
    events.into_iter().map(conn_id_of).collect()
}

/// A numeric field, or a panic naming the field and the event.
pub fn f64_of(event: &Value, field: &str) -> f64 {
    event[field]
        .as_f64()
        .unwrap_or_else(|| panic!("{field} missing in {event}"))
}
