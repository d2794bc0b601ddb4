use super::*;
use std::time::Duration;

use crate::fixtures::{owner, tcp_conn};

fn conn() -> Conn {
    let (local, remote) = ("127.0.0.1:5432", "127.0.0.1:40000");
    tcp_conn(4242, Role::Server, local, remote, owner(9, "postgres"))
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
    for key in "peer_conn_id backend_pid linked exe cmdline cgroup container_id container_runtime pod_uid systemd_unit".split(' ') {
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
