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
