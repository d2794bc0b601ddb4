use super::*;
use crate::{
    export::events::{ConnFields, EventBody, Linked},
    model::conn_table::Role,
    model::detectors::LeakReason,
};
use std::time::{Duration, SystemTime};
use tracer_core::fixtures::{owner, tcp_conn};

fn fields(role: Role, comm: &str, pid: u32, local: &str, remote: &str) -> ConnFields {
    ConnFields::new(&tcp_conn(1, role, local, remote, owner(pid, comm)))
}

fn leak(conn: ConnFields) -> Event {
    Event::at(
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        EventBody::Leak {
            conn,
            reason: LeakReason::IdleInTransaction,
            age_s: 40.0,
            idle_s: 31.5,
        },
    )
}

#[test]
fn a_pooled_leak_names_the_client_the_pooler_and_the_backend() {
    let mut f = fields(
        Role::Client,
        "pgbouncer",
        700,
        "127.0.0.1:40100",
        "127.0.0.1:5432",
    );
    f.backend_pid = Some(9001);
    f.linked = Some(Linked::Client {
        conn_id: "5".into(),
        pid: Some(4242),
        comm: Some("python3".into()),
        container_id: Some("0123456789abcdef".repeat(4)),
        remote: "127.0.0.1:51000".into(),
    });
    let line = line(&leak(f));
    assert_eq!(line.lines().count(), 1);
    for part in [
        "LEAK",
        "pgbouncer[700]",
        "idle_in_transaction",
        "held by python3[4242] container:0123456789ab from 127.0.0.1:51000",
        "pins backend 9001",
    ] {
        assert!(line.contains(part), "{part:?} in {line}");
    }
}

#[test]
fn an_application_leak_through_a_pooler_names_the_backend() {
    let mut f = fields(
        Role::Client,
        "python3",
        4242,
        "127.0.0.1:51000",
        "127.0.0.1:6432",
    );
    f.linked = Some(Linked::Server {
        conn_id: "7".into(),
        backend_pid: Some(9001),
        remote: "127.0.0.1:5432".into(),
    });
    let line = line(&leak(f));
    assert!(line.contains("python3[4242]"), "{line}");
    assert!(
        line.contains("via pooler server conn 7, pins backend 9001"),
        "{line}"
    );
    // Not pooled: nothing about links.
    let plain = super::line(&leak(fields(
        Role::Client,
        "psql",
        1,
        "127.0.0.1:1",
        "127.0.0.1:5432",
    )));
    assert!(
        !plain.contains("held by") && !plain.contains("via"),
        "{plain}"
    );
    assert!(plain.ends_with("age 40.0s\n"), "{plain:?}");
}
