use super::*;
use crate::{export::live::Linked, model::detectors::LeakReason};

fn row(conn_id: &str, pid: u32, comm: &str, state: ConnState) -> Row {
    Row {
        conn_id: conn_id.into(),
        role: "client".into(),
        transport: "tcp".into(),
        local: format!("127.0.0.1:{}", 40000 + pid),
        remote: "127.0.0.1:5432".into(),
        pid,
        comm: comm.into(),
        state: Some(state),
        age_s: 100.0,
        idle_s: Some(1.0),
        ..Row::default()
    }
}

fn idle_tx(conn_id: &str, pid: u32, comm: &str, idle_s: f64) -> Row {
    Row {
        idle_s: Some(idle_s),
        ..row(conn_id, pid, comm, ConnState::IdleInTransaction)
    }
}

fn leaking(mut r: Row) -> Row {
    r.leak = Some(LeakReason::IdleInTransaction);
    r
}

/// A worker (pid 10) leaking 3 transactions, a web backend (pid 20) with one idle and one
/// stalled request, and a cron job (pid 30) idle.
fn incident() -> Vec<Row> {
    vec![
        leaking(idle_tx("1", 10, "worker", 40.0)),
        leaking(idle_tx("2", 10, "worker", 45.0)),
        idle_tx("3", 10, "worker", 5.0),
        row("4", 20, "web", ConnState::Idle),
        Row {
            waiting_s: Some(7.5),
            stalled: true,
            ..row("5", 20, "web", ConnState::Active)
        },
        row("6", 30, "cron", ConnState::Idle),
    ]
}

fn keys(groups: &[Group]) -> Vec<GroupKey> {
    groups.iter().map(|g| g.key.clone()).collect()
}

#[test]
fn groups_by_process_with_counts_oldest_transaction_and_longest_wait() {
    let groups = groups(&incident(), &View::default());
    assert_eq!(
        keys(&groups),
        // Problems first: the worker (2 leaks), the web backend (1 stall), then cron.
        vec![
            GroupKey::Process(10),
            GroupKey::Process(20),
            GroupKey::Process(30)
        ]
    );
    let worker = &groups[0];
    assert_eq!((worker.pid, worker.comm.as_str()), (Some(10), "worker"));
    assert_eq!(
        worker.counts,
        StateCounts {
            in_tx: 3,
            ..StateCounts::default()
        }
    );
    assert_eq!(worker.oldest_tx_s, Some(45.0));
    assert_eq!((worker.leaks, worker.stalls), (2, 0));
    // Leaks first, then the longest idle.
    let ids: Vec<&str> = worker
        .conns
        .iter()
        .map(|c| c.row.conn_id.as_str())
        .collect();
    assert_eq!(ids, ["2", "1", "3"]);

    let web = &groups[1];
    assert_eq!(
        web.counts,
        StateCounts {
            active: 1,
            idle: 1,
            ..StateCounts::default()
        }
    );
    assert_eq!(
        (web.longest_wait_s, web.oldest_tx_s, web.stalls),
        (Some(7.5), None, 1)
    );
    assert_eq!(web.conns[0].row.conn_id, "5", "the stalled one first");
}

#[test]
fn groups_by_container() {
    let mut rows = incident();
    let ctr = "a".repeat(64);
    for r in rows.iter_mut().filter(|r| r.pid != 30) {
        r.container_id = Some(ctr.clone());
    }
    let view = View {
        group_by: GroupBy::Container,
        ..View::default()
    };
    let groups = groups(&rows, &view);
    assert_eq!(
        keys(&groups),
        vec![
            GroupKey::Container(Some(ctr.clone())),
            GroupKey::Container(None)
        ]
    );
    assert_eq!(groups[0].conns.len(), 5);
    assert_eq!(groups[0].comm, "web,worker");
    assert_eq!(
        (groups[0].pid, groups[0].leaks, groups[0].stalls),
        (None, 2, 1)
    );
    assert_eq!(groups[1].comm, "cron");
}

/// The group keys of `rows` in the order of `sort`.
fn sorted(rows: &[Row], sort: SortKey) -> Vec<GroupKey> {
    keys(&groups(
        rows,
        &View {
            sort,
            ..View::default()
        },
    ))
}

#[test]
fn sort_keys_order_the_groups() {
    let rows = incident();
    let order = |sort| sorted(&rows, sort);
    let p = GroupKey::Process;
    assert_eq!(order(SortKey::Connections), vec![p(10), p(20), p(30)]);
    assert_eq!(order(SortKey::InTransaction), vec![p(10), p(20), p(30)]);
    assert_eq!(order(SortKey::OldestTransaction), vec![p(10), p(20), p(30)]);
    // Only the web backend waits; the others tie and follow by pid.
    assert_eq!(order(SortKey::LongestWait), vec![p(20), p(10), p(30)]);
    assert_eq!(order(SortKey::Pid), vec![p(10), p(20), p(30)]);

    // More connections, no problems: first by connections, after the leaker by problems.
    let mut rows = rows;
    for i in 0..5 {
        rows.push(row(&format!("c{i}"), 30, "cron", ConnState::Idle));
    }
    let order = |sort| sorted(&rows, sort);
    assert_eq!(order(SortKey::Connections), vec![p(30), p(10), p(20)]);
    assert_eq!(order(SortKey::Problems), vec![p(10), p(20), p(30)]);
    // The sort cycle visits every key and comes back.
    let mut key = SortKey::default();
    let mut seen = Vec::new();
    for _ in 0..6 {
        seen.push(key);
        key = key.next();
    }
    assert_eq!(key, SortKey::default());
    assert_eq!(seen.len(), 6);
}

#[test]
fn filters_by_text_state_and_problems() {
    let rows = incident();
    let pids = |view: View| -> Vec<(u32, usize)> {
        groups(&rows, &view)
            .iter()
            .map(|g| (g.pid.unwrap_or(0), g.conns.len()))
            .collect()
    };
    assert_eq!(
        pids(View {
            text: "WEB".into(),
            ..View::default()
        }),
        vec![(20, 2)]
    );
    // A pid matches too.
    assert_eq!(
        pids(View {
            text: "30".into(),
            ..View::default()
        }),
        vec![(30, 1)]
    );
    assert_eq!(
        pids(View {
            state: Some(ConnState::Idle),
            ..View::default()
        }),
        vec![(20, 1), (30, 1)]
    );
    assert_eq!(
        pids(View {
            problems_only: true,
            ..View::default()
        }),
        vec![(10, 2), (20, 1)]
    );
    assert_eq!(
        pids(View {
            text: "nothing".into(),
            ..View::default()
        }),
        vec![]
    );
    assert_eq!(
        summary(
            &rows,
            &View {
                text: "worker".into(),
                ..View::default()
            }
        ),
        "3 conns: 0 active, 0 idle, 3 in tx, 0 close_wait, 0 unknown | 2 leaks, 0 stalls"
    );
    // The state cycle visits every state and comes back to "all".
    let mut state = None;
    let mut seen = HashSet::new();
    for _ in 0..7 {
        state = next_state_filter(state);
        seen.insert(state);
    }
    assert_eq!((state, seen.len()), (None, 7));
}

/// A worker (pid 10) through PgBouncer (pid 50) to Postgres: the worker's connection p1 to
/// PgBouncer, PgBouncer's accepted end p2, PgBouncer's server connection p3 (held for the
/// worker), and an idle server connection p4 in the pool.
fn pooled() -> Vec<Row> {
    let mut app = leaking(idle_tx("p1", 10, "worker", 40.0));
    app.remote = "127.0.0.1:6432".into();
    app.peer_conn_id = Some("p2".into());
    app.linked = Some(Linked {
        conn_id: "p3".into(),
        backend_pid: Some(777),
        ..Linked::default()
    });
    let mut accepted = idle_tx("p2", 50, "pgbouncer", 40.0);
    accepted.role = "server".into();
    accepted.peer_conn_id = Some("p1".into());
    accepted.linked = app.linked.clone();
    let mut server = idle_tx("p3", 50, "pgbouncer", 40.0);
    server.backend_pid = Some(777);
    server.linked = Some(Linked {
        conn_id: "p2".into(),
        pid: Some(10),
        comm: Some("worker".into()),
        ..Linked::default()
    });
    let spare = row("p4", 50, "pgbouncer", ConnState::Idle);
    vec![app, accepted, server, spare]
}

#[test]
fn pooler_server_connections_show_under_the_client_that_holds_them() {
    let rows = pooled();
    let held = holders(&rows);
    assert_eq!(
        held,
        HashMap::from([(
            "p3".to_owned(),
            Holder {
                pid: 10,
                conn_id: Some("p1".into())
            }
        )])
    );
    let groups = groups(&rows, &View::default());
    let worker = groups
        .iter()
        .find(|g| g.key == GroupKey::Process(10))
        .expect("worker");
    assert_eq!(worker.conns[0].held.len(), 1);
    assert_eq!(worker.conns[0].held[0].conn_id, "p3");
    assert_eq!(worker.held_count(), 1);
    let pooler = groups
        .iter()
        .find(|g| g.key == GroupKey::Process(50))
        .expect("pooler");
    assert_eq!((pooler.conns.len(), pooler.held_count()), (3, 0));

    // Only the server side tells (the worker's own end is filtered out): the holder is named
    // by `linked.pid` and the server connection goes under the worker's group.
    let only_server: Vec<Row> = rows.iter().filter(|r| r.conn_id != "p1").cloned().collect();
    assert_eq!(
        holders(&only_server).get("p3"),
        Some(&Holder {
            pid: 10,
            conn_id: None
        })
    );
    // Filtering the worker's group out keeps nothing to hang it under.
    let view = View {
        text: "pgbouncer".into(),
        ..View::default()
    };
    let groups = super::groups(&rows, &view);
    assert_eq!(keys(&groups), vec![GroupKey::Process(50)]);

    // Without links nothing is held.
    let unlinked: Vec<Row> = rows
        .into_iter()
        .map(|r| Row { linked: None, ..r })
        .collect();
    assert!(holders(&unlinked).is_empty());
}

#[test]
fn lines_fit_80_columns_and_line_up_with_the_header() {
    let mut rows = incident();
    rows.extend(pooled());
    rows[0].remote = format!("/var/run/postgresql/{}/.s.PGSQL.5432", "x".repeat(80));
    let mut view = View::default();
    let collapsed = lines(&groups(&rows, &view), &view, 80);
    assert_eq!(collapsed.len(), 4, "one line per group");
    assert!(collapsed.iter().all(|l| l.kind == LineKind::Group));

    for key in [10, 20, 30, 50] {
        view.expanded.insert(GroupKey::Process(key));
    }
    let all = lines(&groups(&rows, &view), &view, 80);
    // 4 groups with their column names, 6 + 4 connections, 1 held server connection.
    assert_eq!(all.len(), 4 * 2 + 10 + 1);
    for line in &all {
        assert!(line.text.chars().count() <= 80, "{:?}", line.text);
    }
    let header = header(&view, 80);
    assert!(header.chars().count() <= 80);

    // The worker's line: pid and IN-TX where the header says.
    let worker = all
        .iter()
        .find(|l| l.kind == LineKind::Group && l.group == GroupKey::Process(10))
        .expect("worker line");
    let head: Vec<&str> = header.split_whitespace().collect();
    let cells: Vec<&str> = worker.text.split_whitespace().collect();
    let at = |name: &str| head.iter().position(|h| *h == name).expect(name) + 1;
    assert_eq!(cells[0], "-", "expanded");
    assert_eq!(cells[at("PID")], "10");
    assert_eq!(cells[at("IN-TX")], "4", "{header}\n{}", worker.text);
    assert_eq!(cells[at("OLD-TX")], "45.0s");
    assert_eq!(cells[at("ISSUES")..].join(" "), "3L 1P");
    assert_eq!(worker.severity, Severity::Leak);

    let web = all
        .iter()
        .find(|l| l.kind == LineKind::Group && l.group == GroupKey::Process(20))
        .expect("web line");
    assert_eq!(web.severity, Severity::Stall);
    assert!(web.text.ends_with("1S"), "{}", web.text);

    let held = all
        .iter()
        .position(|l| l.kind == LineKind::Held)
        .expect("held line");
    assert!(
        all[held].text.contains("=> pgbouncer 50"),
        "{}",
        all[held].text
    );
    assert!(all[held].text.contains("backend 777"), "{}", all[held].text);
    assert_eq!(all[held - 1].kind, LineKind::Conn, "right under its holder");
    let holder: Vec<&str> = all[held - 1].text.split_whitespace().collect();
    assert_eq!(
        holder[..5],
        ["idle_in_transaction", "1m40s", "40.0s", "-", "LEAK"],
        "{}",
        all[held - 1].text
    );
}

#[test]
fn durations_stay_short() {
    assert_eq!(duration(None), "-");
    assert_eq!(duration(Some(f64::NAN)), "-");
    assert_eq!(duration(Some(4.25)), "4.2s");
    assert_eq!(duration(Some(185.0)), "3m05s");
    assert_eq!(duration(Some(7980.0)), "2h13m");
    assert_eq!(duration(Some(3.0 * 86_400.0 + 4.0 * 3600.0)), "3d04h");
    assert!(duration(Some(1e9)).len() <= 9);
}
