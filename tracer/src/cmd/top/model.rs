//! The screen model of `tracer top`: pure functions from the daemon's live-table rows and
//! the viewer's choices (grouping, sort, filters, expanded groups) to the groups and the
//! text lines to draw. No terminal, no clock: `draw` only styles what this returns.

use std::collections::{HashMap, HashSet};

use crate::{export::live::Row, model::detectors::ConnState};

mod lines;
pub use lines::*;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GroupBy {
    #[default]
    Process,
    Container,
}

impl GroupBy {
    pub fn next(self) -> Self {
        match self {
            Self::Process => Self::Container,
            Self::Container => Self::Process,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Self::Process => "process",
            Self::Container => "container",
        }
    }
}

/// Group order, most interesting first.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SortKey {
    /// Leaks and stalls, then connections idle in a transaction, then connections.
    #[default]
    Problems,
    Connections,
    InTransaction,
    OldestTransaction,
    LongestWait,
    Pid,
}

impl SortKey {
    pub fn next(self) -> Self {
        match self {
            Self::Problems => Self::Connections,
            Self::Connections => Self::InTransaction,
            Self::InTransaction => Self::OldestTransaction,
            Self::OldestTransaction => Self::LongestWait,
            Self::LongestWait => Self::Pid,
            Self::Pid => Self::Problems,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Self::Problems => "problems",
            Self::Connections => "conns",
            Self::InTransaction => "in-tx",
            Self::OldestTransaction => "oldest-tx",
            Self::LongestWait => "max-wait",
            Self::Pid => "pid",
        }
    }
}

/// What a group stands for.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GroupKey {
    Process(u32),
    /// Full container id; `None`: processes outside containers.
    Container(Option<String>),
}

/// The viewer's choices.
#[derive(Clone, Debug, Default)]
pub struct View {
    pub group_by: GroupBy,
    pub sort: SortKey,
    /// Case-insensitive text matched against pid, comm, container, addresses, state,
    /// command line.
    pub text: String,
    pub state: Option<ConnState>,
    /// Only connections under a leak or stall verdict.
    pub problems_only: bool,
    pub expanded: HashSet<GroupKey>,
}

/// State filter cycle of the `t` key.
pub fn next_state_filter(current: Option<ConnState>) -> Option<ConnState> {
    const CYCLE: [Option<ConnState>; 7] = [
        None,
        Some(ConnState::IdleInTransaction),
        Some(ConnState::IdleInTransactionAborted),
        Some(ConnState::Active),
        Some(ConnState::Idle),
        Some(ConnState::CloseWait),
        Some(ConnState::Unknown),
    ];
    let at = CYCLE.iter().position(|s| *s == current).unwrap_or(0);
    CYCLE[(at + 1) % CYCLE.len()]
}

/// Connections per state. `in_tx` counts both idle-in-transaction states.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StateCounts {
    pub active: usize,
    pub idle: usize,
    pub in_tx: usize,
    pub close_wait: usize,
    pub unknown: usize,
}

impl StateCounts {
    fn add(&mut self, state: ConnState) {
        match state {
            ConnState::Active => self.active += 1,
            ConnState::Idle => self.idle += 1,
            ConnState::IdleInTransaction | ConnState::IdleInTransactionAborted => self.in_tx += 1,
            ConnState::CloseWait => self.close_wait += 1,
            ConnState::Unknown => self.unknown += 1,
        }
    }
}

/// One connection of a group, with the pooler server connections it holds right now.
#[derive(Clone, Debug, PartialEq)]
pub struct ConnLine {
    pub row: Row,
    pub held: Vec<Row>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Group {
    pub key: GroupKey,
    /// The process's pid (process groups).
    pub pid: Option<u32>,
    /// The command(s) in the group.
    pub comm: String,
    pub conns: Vec<ConnLine>,
    /// Pooler server connections the group's process holds whose client connection is not
    /// among the rows shown (filtered out, or only the pid is known).
    pub held: Vec<Row>,
    pub counts: StateCounts,
    /// Longest silence of a connection idle in a transaction: how old that transaction is
    /// at least.
    pub oldest_tx_s: Option<f64>,
    pub longest_wait_s: Option<f64>,
    pub leaks: usize,
    pub stalls: usize,
}

impl Group {
    /// Pooler server connections held by the group, attached to a connection or not.
    pub fn held_count(&self) -> usize {
        self.held.len() + self.conns.iter().map(|c| c.held.len()).sum::<usize>()
    }
}

fn in_transaction(state: ConnState) -> bool {
    matches!(
        state,
        ConnState::IdleInTransaction | ConnState::IdleInTransactionAborted
    )
}

fn problem(row: &Row) -> bool {
    row.leak.is_some() || row.stalled
}

/// Does `row` pass the filters of `view`?
pub fn matches(row: &Row, view: &View) -> bool {
    if view.problems_only && !problem(row) {
        return false;
    }
    if view.state.is_some_and(|s| s != row.state()) {
        return false;
    }
    let needle = view.text.trim().to_lowercase();
    if needle.is_empty() {
        return true;
    }
    [
        row.pid.to_string().as_str(),
        &row.comm,
        row.container_id.as_deref().unwrap_or(""),
        &row.local,
        &row.remote,
        row.state().as_str(),
        row.cmdline.as_deref().unwrap_or(""),
    ]
    .iter()
    .any(|field| field.to_lowercase().contains(&needle))
}

/// Who holds a pooler's server connection right now: the holding process, and its own
/// connection when the rows show it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    pub conn_id: Option<String>,
}

/// Pooler server connections by `conn_id`, with their holders. From `linked`: a client's
/// connection linked to a server connection of another process (the app's own connection,
/// when the app is on this host), else a server connection whose `linked` names the client
/// process (`linked.pid`). A pooler's accepted connection links to its own process's server
/// connection and names no holder.
pub fn holders(rows: &[Row]) -> HashMap<String, Holder> {
    let by_id: HashMap<&str, &Row> = rows.iter().map(|r| (r.conn_id.as_str(), r)).collect();
    let mut held = HashMap::new();
    for row in rows {
        let Some(linked) = &row.linked else { continue };
        if let Some(server) = by_id.get(linked.conn_id.as_str())
            && server.pid != row.pid
            && server.linked.as_ref().is_none_or(|l| l.pid.is_some())
            && linked.pid.is_none()
        {
            held.insert(
                server.conn_id.clone(),
                Holder {
                    pid: row.pid,
                    conn_id: Some(row.conn_id.clone()),
                },
            );
        }
    }
    for row in rows {
        let Some(pid) = row.linked.as_ref().and_then(|l| l.pid) else {
            continue;
        };
        if pid == row.pid || held.contains_key(&row.conn_id) {
            continue;
        }
        let linked = row.linked.as_ref().map(|l| l.conn_id.as_str());
        // The client's connection: the one linked (the pooler's accepted end's peer), if shown.
        let conn_id = rows
            .iter()
            .find(|r| {
                r.pid == pid
                    && (Some(r.conn_id.as_str()) == linked || r.peer_conn_id.as_deref() == linked)
            })
            .map(|r| r.conn_id.clone());
        held.insert(row.conn_id.clone(), Holder { pid, conn_id });
    }
    held
}

fn key_of(row: &Row, by: GroupBy) -> GroupKey {
    match by {
        GroupBy::Process => GroupKey::Process(row.pid),
        GroupBy::Container => GroupKey::Container(row.container_id.clone()),
    }
}

fn state_rank(state: ConnState) -> u8 {
    match state {
        ConnState::IdleInTransaction => 0,
        ConnState::IdleInTransactionAborted => 1,
        ConnState::CloseWait => 2,
        ConnState::Active => 3,
        ConnState::Idle => 4,
        ConnState::Unknown => 5,
    }
}

fn longest(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

fn desc(a: Option<f64>, b: Option<f64>) -> std::cmp::Ordering {
    b.unwrap_or(-1.0).total_cmp(&a.unwrap_or(-1.0))
}

/// The groups `view` shows, in its order.
pub fn groups(rows: &[Row], view: &View) -> Vec<Group> {
    let holders = holders(rows);
    let mut groups: HashMap<GroupKey, Group> = HashMap::new();
    for row in rows.iter().filter(|r| matches(r, view)) {
        let key = key_of(row, view.group_by);
        let group = groups.entry(key.clone()).or_insert_with(|| Group {
            pid: matches!(key, GroupKey::Process(_)).then_some(row.pid),
            key,
            comm: String::new(),
            conns: Vec::new(),
            held: Vec::new(),
            counts: StateCounts::default(),
            oldest_tx_s: None,
            longest_wait_s: None,
            leaks: 0,
            stalls: 0,
        });
        let state = row.state();
        group.counts.add(state);
        if in_transaction(state) {
            group.oldest_tx_s = longest(group.oldest_tx_s, row.idle_s);
        }
        group.longest_wait_s = longest(group.longest_wait_s, row.waiting_s);
        group.leaks += usize::from(row.leak.is_some());
        group.stalls += usize::from(row.stalled);
        group.conns.push(ConnLine {
            row: row.clone(),
            held: Vec::new(),
        });
    }
    attach_held(&mut groups, rows, &holders, view.group_by);
    let mut groups: Vec<Group> = groups.into_values().collect();
    for group in &mut groups {
        let mut comms: Vec<&str> = group.conns.iter().map(|c| c.row.comm.as_str()).collect();
        comms.sort_unstable();
        comms.dedup();
        group.comm = comms.join(",");
        group.conns.sort_by(|a, b| {
            (!problem(&a.row), state_rank(a.row.state()))
                .cmp(&(!problem(&b.row), state_rank(b.row.state())))
                .then_with(|| desc(a.row.idle_s, b.row.idle_s))
                .then_with(|| a.row.conn_id.cmp(&b.row.conn_id))
        });
    }
    order(&mut groups, view.sort);
    groups
}

/// Puts held server connections under their holder, whether or not they pass the filters
/// themselves: they are part of what the holder pins.
fn attach_held(
    groups: &mut HashMap<GroupKey, Group>,
    rows: &[Row],
    holders: &HashMap<String, Holder>,
    group_by: GroupBy,
) {
    for server in rows {
        let Some(holder) = holders.get(&server.conn_id) else {
            continue;
        };
        let group = groups.values_mut().find(|g| match group_by {
            GroupBy::Process => g.key == GroupKey::Process(holder.pid),
            GroupBy::Container => g.conns.iter().any(|c| c.row.pid == holder.pid),
        });
        let Some(group) = group else { continue };
        let conn = holder
            .conn_id
            .as_ref()
            .and_then(|id| group.conns.iter_mut().find(|c| &c.row.conn_id == id));
        match conn {
            Some(conn) => conn.held.push(server.clone()),
            None => group.held.push(server.clone()),
        }
    }
}

/// Groups in the order of `sort`, ties by key.
fn order(groups: &mut [Group], sort: SortKey) {
    groups.sort_by(|a, b| {
        let conns = |g: &Group| g.conns.len();
        let problems = |g: &Group| g.leaks + g.stalls;
        match sort {
            SortKey::Problems => (problems(b), b.counts.in_tx, conns(b)).cmp(&(
                problems(a),
                a.counts.in_tx,
                conns(a),
            )),
            SortKey::Connections => conns(b).cmp(&conns(a)),
            SortKey::InTransaction => b.counts.in_tx.cmp(&a.counts.in_tx),
            SortKey::OldestTransaction => desc(a.oldest_tx_s, b.oldest_tx_s),
            SortKey::LongestWait => desc(a.longest_wait_s, b.longest_wait_s),
            SortKey::Pid => std::cmp::Ordering::Equal,
        }
        .then_with(|| a.key.cmp(&b.key))
    });
}

#[cfg(test)]
mod tests;
