//! The text of the screen: the header, a line per group and per connection of an expanded
//! group, laid out for the terminal's width, and the summary line.

use super::*;

/// How a line is highlighted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Normal,
    /// Idle in a transaction, not (yet) a leak.
    Notice,
    /// A leak verdict.
    Leak,
    /// A stalled request.
    Stall,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LineKind {
    Group,
    /// The column names of an expanded group's connection lines.
    Columns,
    Conn,
    Held,
}

/// One line of the table, laid out for a terminal `width` columns wide.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScreenLine {
    pub kind: LineKind,
    /// The group the line belongs to (for expanding and collapsing).
    pub group: GroupKey,
    pub severity: Severity,
    pub text: String,
}

/// `4.2s`, `3m05s`, `2h13m`, `3d04h`; `-` for none. At most 6 characters below 100 days.
pub fn duration(seconds: Option<f64>) -> String {
    let Some(s) = seconds.filter(|s| s.is_finite() && *s >= 0.0) else {
        return "-".into();
    };
    let whole = s as u64;
    match whole {
        0..60 => format!("{s:.1}s"),
        60..3600 => format!("{}m{:02}s", whole / 60, whole % 60),
        3600..86_400 => format!("{}h{:02}m", whole / 3600, whole % 3600 / 60),
        _ => format!("{}d{:02}h", whole / 86_400, whole % 86_400 / 3600),
    }
}

/// Cut to `width` characters.
fn fit(text: &str, width: usize) -> String {
    text.chars().take(width).collect()
}

fn first_column(by: GroupBy) -> (&'static str, usize, usize) {
    // (header, first column width, comm width): a container id takes 12 characters.
    match by {
        GroupBy::Process => ("PID", 8, 12),
        GroupBy::Container => ("CONTAINER", 12, 8),
    }
}

/// The table's header line; the columns line up with [`lines`].
pub fn header(view: &View, width: usize) -> String {
    let (first, w, c) = first_column(view.group_by);
    fit(
        &format!(
            "  {first:<w$} {:<c$} {:>5} {:>3} {:>4} {:>5} {:>4} {:>3} {:>6} {:>6} ISSUES",
            "COMM", "CONNS", "ACT", "IDLE", "IN-TX", "CL-W", "UNK", "OLD-TX", "WAIT"
        ),
        width,
    )
}

/// Leaks, stalls and held pooler server connections, as `3L 1S 2P`; `-` for none.
fn issues(leaks: usize, stalls: usize, held: usize) -> String {
    let parts: Vec<String> = [(leaks, 'L'), (stalls, 'S'), (held, 'P')]
        .into_iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, tag)| format!("{n}{tag}"))
        .collect();
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(" ")
    }
}

fn conn_severity(row: &Row) -> Severity {
    if row.stalled {
        Severity::Stall
    } else if row.leak.is_some() {
        Severity::Leak
    } else if in_transaction(row.state()) {
        Severity::Notice
    } else {
        Severity::Normal
    }
}

/// Under an expanded group: the columns of its connection lines.
fn conn_header(by: GroupBy, width: usize) -> String {
    let who = match by {
        GroupBy::Process => String::new(),
        GroupBy::Container => format!("{:>7} {:<8} ", "PID", "COMM"),
    };
    fit(
        &format!(
            "    {who}{:<19} {:>6} {:>6} {:>6} {:<5} {:<6} REMOTE",
            "STATE", "AGE", "IDLE", "WAIT", "FLAG", "ROLE"
        ),
        width,
    )
}

fn conn_text(row: &Row, by: GroupBy, width: usize) -> String {
    let who = match by {
        GroupBy::Process => String::new(),
        GroupBy::Container => format!("{:>7} {:<8} ", row.pid, fit(&row.comm, 8)),
    };
    // The state says which leak it is.
    let flag = if row.stalled {
        "STALL"
    } else if row.leak.is_some() {
        "LEAK"
    } else {
        "-"
    };
    let backend = row
        .backend_pid
        .map(|p| format!(" backend {p}"))
        .unwrap_or_default();
    fit(
        &format!(
            "    {who}{:<19} {:>6} {:>6} {:>6} {flag:<5} {:<6} {}{backend}",
            row.state().as_str(),
            duration(Some(row.age_s)),
            duration(row.idle_s),
            duration(row.waiting_s),
            row.role,
            row.remote,
        ),
        width,
    )
}

fn held_text(row: &Row, width: usize) -> String {
    let verdict = if row.stalled {
        " STALL"
    } else if row.leak.is_some() {
        " LEAK"
    } else {
        ""
    };
    fit(
        &format!(
            "      => {} {}{} {} idle {} to {}{verdict}",
            row.comm,
            row.pid,
            row.backend_pid
                .map(|p| format!(" backend {p}"))
                .unwrap_or_default(),
            row.state().as_str(),
            duration(row.idle_s),
            row.remote,
        ),
        width,
    )
}

/// The lines of the table: a line per group, and under an expanded group the column names
/// and its connections, each followed by the pooler server connections it holds.
pub fn lines(groups: &[Group], view: &View, width: usize) -> Vec<ScreenLine> {
    let (_, w, c) = first_column(view.group_by);
    let mut out = Vec::new();
    for group in groups {
        let expanded = view.expanded.contains(&group.key);
        let first = match &group.key {
            GroupKey::Process(pid) => pid.to_string(),
            GroupKey::Container(Some(id)) => id.get(..12).unwrap_or(id).to_owned(),
            GroupKey::Container(None) => "(host)".to_owned(),
        };
        let severity = group
            .conns
            .iter()
            .map(|c| conn_severity(&c.row))
            .max()
            .unwrap_or(Severity::Normal);
        let n = group.counts;
        out.push(ScreenLine {
            kind: LineKind::Group,
            group: group.key.clone(),
            severity,
            text: fit(
                &format!(
                    "{} {first:<w$} {:<c$} {:>5} {:>3} {:>4} {:>5} {:>4} {:>3} {:>6} {:>6} {}",
                    if expanded { '-' } else { '+' },
                    fit(&group.comm, c),
                    group.conns.len(),
                    n.active,
                    n.idle,
                    n.in_tx,
                    n.close_wait,
                    n.unknown,
                    duration(group.oldest_tx_s),
                    duration(group.longest_wait_s),
                    issues(group.leaks, group.stalls, group.held_count()),
                ),
                width,
            ),
        });
        if !expanded {
            continue;
        }
        out.push(ScreenLine {
            kind: LineKind::Columns,
            group: group.key.clone(),
            severity: Severity::Normal,
            text: conn_header(view.group_by, width),
        });
        for conn in &group.conns {
            out.push(ScreenLine {
                kind: LineKind::Conn,
                group: group.key.clone(),
                severity: conn_severity(&conn.row),
                text: conn_text(&conn.row, view.group_by, width),
            });
            for held in &conn.held {
                out.push(ScreenLine {
                    kind: LineKind::Held,
                    group: group.key.clone(),
                    severity: conn_severity(held),
                    text: held_text(held, width),
                });
            }
        }
        for held in &group.held {
            out.push(ScreenLine {
                kind: LineKind::Held,
                group: group.key.clone(),
                severity: conn_severity(held),
                text: held_text(held, width),
            });
        }
    }
    out
}

/// Totals over the rows the filters let through, for the summary line.
pub fn summary(rows: &[Row], view: &View) -> String {
    let shown: Vec<&Row> = rows.iter().filter(|r| matches(r, view)).collect();
    let mut n = StateCounts::default();
    for row in &shown {
        n.add(row.state());
    }
    let leaks = shown.iter().filter(|r| r.leak.is_some()).count();
    let stalls = shown.iter().filter(|r| r.stalled).count();
    format!(
        "{} conns: {} active, {} idle, {} in tx, {} close_wait, {} unknown | {leaks} leaks, {stalls} stalls",
        shown.len(),
        n.active,
        n.idle,
        n.in_tx,
        n.close_wait,
        n.unknown
    )
}
