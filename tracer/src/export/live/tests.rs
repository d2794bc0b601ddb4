use super::*;
use crate::model::conn_table::{Owner, Role};
use tracer_core::fixtures::{owner, tcp_conn};

fn conn() -> Conn {
    let app = Owner {
        uid: 1000,
        ..owner(1234, "python3")
    };
    let mut conn = tcp_conn(77, Role::Client, "127.0.0.1:40000", "127.0.0.1:5432", app);
    conn.start_ns = 1_000_000_000;
    conn.born_ns = 1_000_000_000;
    conn
}

#[test]
fn a_row_has_the_event_fields_links_and_live_figures() {
    let mut conn = conn();
    // Sent at 3 s, answered at 2 s: a request in flight since 3 s.
    conn.live.last_send_ns = 3_000_000_000;
    conn.live.last_recv_ns = 2_000_000_000;
    conn.live.bytes_sent = 10;
    let row = serde_json::to_value(LiveConn::new(ConnFields::new(&conn), &conn, 5_500_000_000))
        .expect("json");
    assert_eq!(row["conn_id"], "77");
    assert_eq!(row["pid"], 1234);
    assert_eq!(row["state"], "active");
    assert_eq!(row["age_s"], 4.5);
    assert_eq!(row["idle_s"], 2.5);
    assert_eq!(row["waiting_s"], 2.5);
    assert_eq!(row["stalled"], false);
    assert_eq!(row["bytes_sent"], 10);
    for key in ["leak", "peer_conn_id", "backend_pid", "linked"] {
        assert!(
            row.get(key).is_some_and(serde_json::Value::is_null),
            "{key}"
        );
    }

    // Answered: nothing waits.
    conn.live.last_recv_ns = 4_000_000_000;
    let row = serde_json::to_value(LiveConn::new(ConnFields::new(&conn), &conn, 5_500_000_000))
        .expect("json");
    assert!(row["waiting_s"].is_null());
    assert_eq!(row["idle_s"], 1.5);
}

#[test]
fn the_table_is_not_ready_until_published() {
    let table = LiveTable::default();
    assert!(table.to_json(1).is_none());
    table.publish(
        vec![LiveConn::new(
            ConnFields::new(&conn()),
            &conn(),
            2_000_000_000,
        )],
        2_000_000_000,
    );
    let body = table
        .to_json(2_000_000_000)
        .expect("published")
        .expect("json");
    let rows: Vec<serde_json::Map<String, serde_json::Value>> =
        serde_json::from_slice(&body).expect("an array of objects");
    let typed = typed(&rows);
    assert_eq!(typed.len(), 1);
    assert_eq!(
        (typed[0].pid, typed[0].comm.as_str(), typed[0].state()),
        (1234, "python3", ConnState::Unknown)
    );
    table.withdraw();
    assert!(table.to_json(3_000_000_000).is_none());
}

#[test]
fn large_tables_are_rebuilt_only_while_read() {
    const S: u64 = 1_000_000_000;
    let big = ALWAYS_PUBLISHED + 1;
    let table = LiveTable::default();
    assert!(table.wanted(big, 100 * S), "never published");
    assert_eq!(
        table.stale_at(100 * S),
        None,
        "nothing to wait for before a publish"
    );
    table.publish(Vec::new(), 100 * S);
    assert!(table.wanted(ALWAYS_PUBLISHED, 101 * S), "small: every tick");
    // The early read above counts; 30 s after it nobody reads any more.
    assert!(!table.wanted(big, 131 * S), "nobody reads it");
    assert!(
        !table.wanted(big, 500 * S),
        "nobody reads it, however old the rows"
    );
    // A first read finds the rows stale: it waits, and the next tick builds them.
    assert_eq!(table.stale_at(500 * S), Some(100 * S));
    assert!(table.wanted(big, 501 * S));
    table.publish(Vec::new(), 501 * S);
    assert_eq!(table.published_ns(), Some(501 * S));
    // Read every second: fresh enough, no wait, rebuilt every tick.
    assert_eq!(table.stale_at(502 * S), None);
    assert!(table.wanted(big, 502 * S));
    table.publish(Vec::new(), 502 * S);
    // READ_RECENTLY after the last read, the tick stops again.
    assert!(table.wanted(big, 531 * S));
    assert!(!table.wanted(big, 533 * S));
}

#[test]
fn rows_read_links_when_a_daemon_sends_them() {
    let row: Row = serde_json::from_str(
        r#"{"conn_id":"9","pid":5,"state":"idle_in_transaction","leak":"idle_in_transaction",
           "linked":{"conn_id":"3","pid":42,"comm":"worker","container_id":null,"remote":"127.0.0.1:5000"},
           "future_field":1}"#,
    )
    .expect("reads");
    assert_eq!(row.state(), ConnState::IdleInTransaction);
    assert_eq!(row.leak, Some(LeakReason::IdleInTransaction));
    let linked = row.linked.expect("linked");
    assert_eq!((linked.conn_id.as_str(), linked.pid), ("3", Some(42)));
}
