use std::{io::Write as _, process::Stdio};

use super::*;
use crate::model::{
    conn_table::ClosedBy,
    detectors::{ConnState, LeakReason},
};

fn labels(role: &'static str, comm: &str, remote: &str) -> ConnLabels {
    ConnLabels {
        role,
        comm: comm.to_owned(),
        container: String::new(),
        remote: remote.to_owned(),
    }
}

pub(crate) fn psql() -> ConnLabels {
    labels("client", "psql", "127.0.0.1:5432")
}

fn snap<'a>(labels: &'a ConnLabels, state: ConnState) -> ConnSnapshot<'a> {
    ConnSnapshot {
        labels,
        state,
        age_s: 0.0,
        idle_s: 0.0,
        stalled: false,
        leak_reason: None,
    }
}

pub(crate) const PSQL: &str = r#"comm="psql",container="",remote="127.0.0.1:5432",role="client""#;

/// The exposition sorts label names, so `reason` lands between `container` and `remote`.
fn psql_leak(reason: &str, value: u32) -> String {
    format!(
        "pgconn_leak_suspected_connections{{comm=\"psql\",container=\"\",reason=\"{reason}\",remote=\"127.0.0.1:5432\",role=\"client\"}} {value}"
    )
}

#[track_caller]
pub(crate) fn assert_line(text: &str, line: &str) {
    assert!(
        text.lines().any(|l| l == line),
        "missing line {line:?} in:\n{text}"
    );
}

/// `assert_line` for a series of the psql label set: `series` is `NAME VALUE`.
fn assert_psql(text: &str, series: &str) {
    let (name, value) = series.split_once(' ').expect("NAME VALUE");
    assert_line(text, &format!("{name}{{{PSQL}}} {value}"));
}

fn lines_starting<'t>(text: &'t str, prefix: &str) -> Vec<&'t str> {
    text.lines().filter(|l| l.starts_with(prefix)).collect()
}

#[test]
fn open_connection_exports_every_state_and_reason() {
    let metrics = Metrics::new(100, "1.2.3");
    let psql = psql();
    metrics.connection_opened(&psql);
    metrics.set_open(&[ConnSnapshot {
        age_s: 12.5,
        idle_s: 3.0,
        ..snap(&psql, ConnState::Idle)
    }]);
    let text = metrics.render();

    for state in ConnState::ALL.map(ConnState::as_str) {
        let value = if state == "idle" { 1 } else { 0 };
        assert_line(
            &text,
            &format!("pgconn_open_connections{{{PSQL},state=\"{state}\"}} {value}"),
        );
    }
    assert_eq!(lines_starting(&text, "pgconn_open_connections{").len(), 6);
    for reason in LeakReason::ALL.map(LeakReason::as_str) {
        assert_line(&text, &psql_leak(reason, 0));
    }
    assert_psql(&text, "pgconn_connections_opened_total 1");
    assert_psql(&text, "pgconn_oldest_connection_age_seconds 12.5");
    assert_psql(&text, "pgconn_max_idle_seconds 3");
    assert_psql(&text, "pgconn_stalled_connections 0");
    assert_psql(&text, "pgconn_stalls_total 0");
    assert_psql(&text, "pgconn_bytes_sent_total 0");
    assert_line(&text, "pgconn_tracer_tracked_connections 1");
    assert_line(&text, r#"pgconn_tracer_build_info{version="1.2.3"} 1"#);
    assert_line(&text, "# TYPE pgconn_open_connections gauge");
    assert_line(&text, "# TYPE pgconn_connections_opened_total counter");
    assert_line(&text, "# TYPE pgconn_tracer_build_info gauge");
}

#[test]
fn gauges_follow_ticks_and_disappear_after_close_while_counters_stay() {
    let metrics = Metrics::new(100, "1.2.3");
    let psql = psql();
    let app = labels("client", "app", "10.0.0.5:6432");
    metrics.connection_opened(&psql);
    metrics.connection_opened(&psql);
    metrics.connection_opened(&app);
    metrics.stall_started(&psql);
    metrics.set_open(&[
        ConnSnapshot {
            age_s: 100.0,
            idle_s: 40.0,
            leak_reason: Some(LeakReason::IdleInTransaction),
            ..snap(&psql, ConnState::IdleInTransaction)
        },
        ConnSnapshot {
            age_s: 7.0,
            idle_s: 6.0,
            stalled: true,
            ..snap(&psql, ConnState::Active)
        },
        snap(&app, ConnState::Idle),
    ]);
    let text = metrics.render();
    let psql_state =
        |state: &str, n: u32| format!("pgconn_open_connections{{{PSQL},state=\"{state}\"}} {n}");
    assert_line(&text, &psql_state("idle_in_transaction", 1));
    assert_line(&text, &psql_state("active", 1));
    assert_line(&text, &psql_state("idle", 0));
    assert_line(&text, &psql_leak("idle_in_transaction", 1));
    assert_line(&text, &psql_leak("idle", 0));
    assert_psql(&text, "pgconn_oldest_connection_age_seconds 100");
    assert_psql(&text, "pgconn_max_idle_seconds 40");
    assert_psql(&text, "pgconn_stalled_connections 1");
    assert_psql(&text, "pgconn_stalls_total 1");
    assert_psql(&text, "pgconn_connections_opened_total 2");
    assert_line(&text, "pgconn_tracer_tracked_connections 3");
    assert_eq!(lines_starting(&text, "pgconn_open_connections{").len(), 12);

    // Both psql connections close; app stays open.
    metrics.connection_closed(&psql, ClosedBy::Peer, 42.0, 100, 200);
    metrics.connection_closed(&psql, ClosedBy::Unknown, 0.005, 1, 2);
    metrics.set_open(&[snap(&app, ConnState::Idle)]);
    let text = metrics.render();
    for gauge in [
        "pgconn_open_connections{",
        "pgconn_leak_suspected_connections{",
        "pgconn_oldest_connection_age_seconds{",
        "pgconn_max_idle_seconds{",
        "pgconn_stalled_connections{",
    ] {
        let psql_lines: Vec<_> = lines_starting(&text, gauge)
            .into_iter()
            .filter(|l| l.contains(r#"comm="psql""#))
            .collect();
        assert!(psql_lines.is_empty(), "psql gauge left: {psql_lines:?}");
    }
    assert_eq!(lines_starting(&text, "pgconn_open_connections{").len(), 6);
    assert_line(
        &text,
        r#"pgconn_open_connections{comm="app",container="",remote="10.0.0.5:6432",role="client",state="idle"} 1"#,
    );
    assert_line(&text, "pgconn_tracer_tracked_connections 1");
    assert_psql(&text, "pgconn_connections_opened_total 2");
    assert_psql(&text, "pgconn_stalls_total 1");
    assert_line(
        &text,
        &format!("pgconn_connections_closed_total{{closed_by=\"peer\",{PSQL}}} 1"),
    );
    // A close whose cause is unknown has its own series.
    assert_line(
        &text,
        &format!("pgconn_connections_closed_total{{closed_by=\"unknown\",{PSQL}}} 1"),
    );
    assert_psql(&text, "pgconn_bytes_sent_total 101");
    assert_psql(&text, "pgconn_bytes_received_total 202");
    assert_psql(&text, "pgconn_connection_duration_seconds_count 2");
    assert_psql(&text, "pgconn_connection_duration_seconds_sum 42.005");
    assert_line(
        &text,
        &format!("pgconn_connection_duration_seconds_bucket{{{PSQL},le=\"0.01\"}} 1"),
    );
    assert_line(
        &text,
        &format!("pgconn_connection_duration_seconds_bucket{{{PSQL},le=\"30\"}} 1"),
    );
    assert_line(
        &text,
        &format!("pgconn_connection_duration_seconds_bucket{{{PSQL},le=\"60\"}} 2"),
    );
    assert_line(
        &text,
        &format!("pgconn_connection_duration_seconds_bucket{{{PSQL},le=\"86400\"}} 2"),
    );
    assert_line(
        &text,
        &format!("pgconn_connection_duration_seconds_bucket{{{PSQL},le=\"+Inf\"}} 2"),
    );

    // Nothing open: no gauge series of any connection label set.
    metrics.set_open(&[]);
    let text = metrics.render();
    assert!(lines_starting(&text, "pgconn_open_connections{").is_empty());
    assert!(lines_starting(&text, "pgconn_max_idle_seconds{").is_empty());
    assert_line(&text, "pgconn_tracer_tracked_connections 0");
}

#[test]
fn label_sets_beyond_the_cap_fold_into_other_and_are_counted() {
    let metrics = Metrics::new(2, "1.2.3");
    let a = labels("client", "a", "db:5432");
    let b = labels("client", "b", "db:5432");
    let c = labels("client", "c", "db:5432");
    let d = labels("server", "postgres", "10.0.0.9:40000");
    for l in [&a, &b, &c, &d, &a, &c] {
        metrics.connection_opened(l);
    }
    // c and d arrive once the cap is reached: c twice, d once.
    metrics.stall_started(&c);
    metrics.set_open(&[
        snap(&a, ConnState::Idle),
        snap(&c, ConnState::Active),
        snap(&c, ConnState::Idle),
        snap(&d, ConnState::Idle),
    ]);
    metrics.connection_closed(&c, ClosedBy::Local, 1.0, 10, 20);
    let text = metrics.render();

    const OTHER_CLIENT: &str = r#"comm="~other",container="",remote="",role="client""#;
    const OTHER_SERVER: &str = r#"comm="~other",container="",remote="",role="server""#;
    assert_line(&text, "pgconn_tracer_label_sets_overflow_total 3");
    assert_line(
        &text,
        r#"pgconn_connections_opened_total{comm="a",container="",remote="db:5432",role="client"} 2"#,
    );
    assert_line(
        &text,
        r#"pgconn_connections_opened_total{comm="b",container="",remote="db:5432",role="client"} 1"#,
    );
    assert_line(
        &text,
        &format!("pgconn_connections_opened_total{{{OTHER_CLIENT}}} 2"),
    );
    assert_line(
        &text,
        &format!("pgconn_connections_opened_total{{{OTHER_SERVER}}} 1"),
    );
    assert_line(&text, &format!("pgconn_stalls_total{{{OTHER_CLIENT}}} 1"));
    assert_line(
        &text,
        &format!("pgconn_connections_closed_total{{closed_by=\"local\",{OTHER_CLIENT}}} 1"),
    );
    assert_line(
        &text,
        &format!("pgconn_bytes_sent_total{{{OTHER_CLIENT}}} 10"),
    );
    for state in ["active", "idle"] {
        assert_line(
            &text,
            &format!("pgconn_open_connections{{{OTHER_CLIENT},state=\"{state}\"}} 1"),
        );
    }
    assert_line(
        &text,
        &format!("pgconn_open_connections{{{OTHER_SERVER},state=\"idle\"}} 1"),
    );
    assert!(!text.contains(r#"comm="c""#), "c must be folded:\n{text}");
    assert!(
        !text.contains(r#"comm="postgres""#),
        "d must be folded:\n{text}"
    );
    // a, ~other/client, ~other/server: 3 label sets with gauges.
    assert_eq!(lines_starting(&text, "pgconn_open_connections{").len(), 18);

    // An admitted label set stays admitted after all its connections are gone.
    metrics.set_open(&[]);
    metrics.connection_opened(&b);
    let text = metrics.render();
    assert_line(
        &text,
        r#"pgconn_connections_opened_total{comm="b",container="",remote="db:5432",role="client"} 2"#,
    );
    assert_line(&text, "pgconn_tracer_label_sets_overflow_total 3");
}

#[test]
fn zero_cap_folds_everything() {
    let metrics = Metrics::new(0, "1.2.3");
    metrics.connection_opened(&psql());
    let text = metrics.render();
    assert_line(
        &text,
        r#"pgconn_connections_opened_total{comm="~other",container="",remote="",role="client"} 1"#,
    );
    assert_line(&text, "pgconn_tracer_label_sets_overflow_total 1");
    assert!(!text.contains("psql"));
}

fn weird() -> ConnLabels {
    labels("client", "we\"ird\\na\nme", "/run/post\"gres/.s.PGSQL.5432")
}

#[test]
fn label_values_are_escaped() {
    let metrics = Metrics::new(10, "1.2.3");
    let weird = weird();
    metrics.connection_opened(&weird);
    metrics.set_open(&[ConnSnapshot {
        age_s: f64::INFINITY,
        idle_s: f64::NAN,
        ..snap(&weird, ConnState::Idle)
    }]);
    let text = metrics.render();
    assert_line(
        &text,
        r#"pgconn_connections_opened_total{comm="we\"ird\\na\nme",container="",remote="/run/post\"gres/.s.PGSQL.5432",role="client"} 1"#,
    );
    // Non-finite inputs never reach the exposition (`inf`/`NaN` there are invalid).
    assert_line(
        &text,
        r#"pgconn_oldest_connection_age_seconds{comm="we\"ird\\na\nme",container="",remote="/run/post\"gres/.s.PGSQL.5432",role="client"} 0"#,
    );
    // The raw newline inside comm must not split a sample line.
    for line in text.lines() {
        assert!(
            line.starts_with("# ") || line.starts_with("pgconn_"),
            "broken line {line:?}"
        );
    }
}

#[test]
fn losses_start_at_zero_and_accumulate() {
    let metrics = Metrics::new(10, "1.2.3");
    let text = metrics.render();
    for location in LOSS_WHERE {
        assert_line(
            &text,
            &format!("pgconn_tracer_events_lost_total{{where=\"{location}\"}} 0"),
        );
    }
    metrics.events_lost("kernel_ring", 5);
    metrics.events_lost("kernel_ring", 7);
    metrics.events_lost("decode", 1);
    let text = metrics.render();
    assert_line(
        &text,
        r#"pgconn_tracer_events_lost_total{where="kernel_ring"} 12"#,
    );
    assert_line(
        &text,
        r#"pgconn_tracer_events_lost_total{where="decode"} 1"#,
    );
    assert_line(
        &text,
        r#"pgconn_tracer_events_lost_total{where="user_queue"} 0"#,
    );
}

#[test]
fn short_container_ids() {
    let full = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    assert_eq!(short_container_id(Some(full)), "0123456789ab");
    assert_eq!(short_container_id(Some("abc")), "abc");
    assert_eq!(short_container_id(None), "");
}

const PROMTOOL: &str = "/usr/bin/promtool";

#[test]
fn promtool_accepts_the_exposition() {
    if !std::path::Path::new(PROMTOOL).exists() {
        eprintln!("skipped: {PROMTOOL} missing (apt-get install prometheus)");
        return;
    }
    let metrics = Metrics::new(3, "1.2.3");
    let (psql, weird) = (psql(), weird());
    let server = labels("server", "postgres", "[::1]:51000");
    let extra = labels("client", "extra", "db:5432");
    for l in [&psql, &weird, &server, &extra] {
        metrics.connection_opened(l);
    }
    metrics.stall_started(&psql);
    metrics.set_open(&[
        ConnSnapshot {
            age_s: 30.0,
            idle_s: 29.5,
            stalled: true,
            leak_reason: Some(LeakReason::Idle),
            ..snap(&psql, ConnState::Active)
        },
        snap(&weird, ConnState::Unknown),
        snap(&extra, ConnState::CloseWait),
    ]);
    metrics.connection_closed(&server, ClosedBy::Reset, 3.5, 10, 20);
    metrics.events_lost("user_queue", 3);
    let text = metrics.render();

    let mut child = std::process::Command::new(PROMTOOL)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    child
        .stdin
        .take()
        .expect("promtool stdin")
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("wait for promtool");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && report.trim().is_empty(),
        "promtool: {}\n{report}\n--- input:\n{text}",
        out.status
    );
}
