//! The published event schema (`docs/events.schema.json`) accepts a well-formed event of every
//! type and rejects malformed ones. No root needed.
use serde_json::{Map, Value, json};
use tests::schema::{EVENT_TYPES, validate_event};

/// Every connection event's fields, and those of them that may be null (space-separated).
const CONN_FIELDS: &str = "conn_id role transport local remote pid comm exe cmdline uid cgroup container_id container_runtime pod_uid systemd_unit state peer_conn_id backend_pid linked";

const NULLABLE: &str = "exe cmdline cgroup container_id container_runtime pod_uid systemd_unit peer_conn_id backend_pid linked";

/// The fields of a connection event: a psql client inside a docker container on Kubernetes.
fn conn(kind: &str) -> Map<String, Value> {
    let v = json!({
        "ts": "2026-11-24T20:22:32.352316Z",
        "type": kind,
        "conn_id": "8589934601",
        "role": "client",
        "transport": "tcp",
        "local": "[::1]:51234",
        "remote": "[::1]:5432",
        "pid": 4242,
        "comm": "psql",
        "exe": "/usr/lib/postgresql/16/bin/psql",
        "cmdline": "psql -h ::1 -U app appdb",
        "uid": 1000,
        "cgroup": "/kubepods.slice/kubepods-pod0f1e2d3c.slice/docker-0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef.scope",
        "container_id": "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        "container_runtime": "docker",
        "pod_uid": "0f1e2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b",
        "systemd_unit": null,
        "state": "idle_in_transaction",
        "peer_conn_id": "8589934602",
        "backend_pid": 31337,
        "linked": {"conn_id": "8589934700", "backend_pid": 31338, "remote": "[::1]:34567"},
    });
    v.as_object().cloned().expect("object")
}

fn with(mut base: Map<String, Value>, extra: Value) -> Value {
    base.extend(extra.as_object().cloned().expect("object"));
    Value::Object(base)
}

/// A valid example of each event type.
fn example(kind: &str) -> Value {
    match kind {
        "ready" => json!({
            "ts": "2026-11-24T20:22:30.000001Z",
            "type": "ready",
            "version": "0.1.0",
            "ports": [5432, 6432],
            "probes": ["sock/inet_sock_set_state", "tcp/tcp_destroy_sock"],
            "unix_socket_glob": "*/.s.PGSQL.*",
        }),
        "open" => with(conn(kind), json!({"preexisting": true, "age_s": 12.5})),
        "close" => with(
            conn(kind),
            json!({
                "duration_s": 3.25,
                "bytes_sent": 1024,
                "bytes_received": 0,
                "closed_by": "peer",
            }),
        ),
        "stall" => with(conn(kind), json!({"waiting_s": 5.001})),
        "stall_end" => with(conn(kind), json!({"waited_s": 7})),
        "leak" => with(
            conn(kind),
            json!({"reason": "idle_in_transaction", "age_s": 95.0, "idle_s": 31.2}),
        ),
        "leak_end" => with(
            conn(kind),
            json!({"reason": "idle_in_transaction", "lasted_s": 0.0}),
        ),
        "lost" => json!({
            "ts": "2026-11-24T20:22:40.999999Z",
            "type": "lost",
            "count": 17,
            "where": "kernel_ring",
        }),
        other => panic!("no example for {other}"),
    }
}

fn assert_valid(event: &Value) {
    if let Err(e) = validate_event(event) {
        panic!("expected valid: {e}");
    }
}

fn assert_invalid(event: &Value, why: &str) {
    assert!(
        validate_event(event).is_err(),
        "expected the schema to reject ({why}): {event}"
    );
}

fn set(event: &Value, key: &str, value: Value) -> Value {
    let mut e = event.clone();
    e[key] = value;
    e
}

/// Each (type, field, value): the type's example with that field set is rejected.
fn assert_each_rejected(cases: &[(&str, &str, Value)]) {
    for (kind, key, value) in cases {
        assert_invalid(
            &set(&example(kind), key, value.clone()),
            &format!("{kind}.{key}={value}"),
        );
    }
}

fn is_conn_event(kind: &str) -> bool {
    !matches!(kind, "ready" | "lost")
}

#[test]
fn every_event_type_has_a_valid_example() {
    for kind in EVENT_TYPES {
        assert_valid(&example(kind));
    }
}

#[test]
fn new_connections_and_minimal_owners_validate() {
    // A fresh connection over a Unix socket, owner outside any container, nothing readable.
    let mut e = with(conn("open"), json!({"preexisting": false, "age_s": 0}));
    for key in NULLABLE.split(' ') {
        e[key] = Value::Null;
    }
    e["transport"] = json!("unix");
    e["role"] = json!("server");
    e["local"] = json!("/var/run/postgresql/.s.PGSQL.5432");
    e["remote"] = json!("/var/run/postgresql/.s.PGSQL.5432");
    e["state"] = json!("unknown");
    e["pid"] = json!(0);
    e["uid"] = json!(0);
    assert_valid(&e);
    // Each enum value is accepted.
    for state in [
        "active",
        "idle",
        "idle_in_transaction",
        "idle_in_transaction_aborted",
        "close_wait",
        "unknown",
    ] {
        assert_valid(&set(&e, "state", json!(state)));
    }
    for runtime in ["docker", "containerd", "cri-o", "podman"] {
        assert_valid(&set(&example("open"), "container_runtime", json!(runtime)));
    }
    for by in ["local", "peer", "reset", "exit", "unknown"] {
        assert_valid(&set(&example("close"), "closed_by", json!(by)));
    }
    for reason in ["close_wait", "idle_in_transaction", "idle"] {
        assert_valid(&set(&example("leak"), "reason", json!(reason)));
        assert_valid(&set(&example("leak_end"), "reason", json!(reason)));
    }
    for place in ["kernel_ring", "kernel_table", "user_queue", "decode"] {
        assert_valid(&set(&example("lost"), "where", json!(place)));
    }
    assert_valid(&set(&example("ready"), "ports", json!([])));
    assert_valid(&set(&example("ready"), "ports", json!([1, 65535])));
}

#[test]
fn every_field_is_required() {
    for kind in EVENT_TYPES {
        let event = example(kind);
        for key in event.as_object().expect("object").keys() {
            let mut e = event.clone();
            e.as_object_mut().expect("object").remove(key);
            assert_invalid(&e, &format!("{kind} without {key}"));
        }
        if is_conn_event(kind) {
            let keys = event.as_object().expect("object");
            for key in CONN_FIELDS.split(' ') {
                assert!(keys.contains_key(key), "{kind} example lacks {key}");
            }
        }
    }
}

#[test]
fn unknown_fields_and_types_are_rejected() {
    for kind in EVENT_TYPES {
        assert_invalid(
            &set(&example(kind), "query", json!("select 1")),
            &format!("{kind} with an extra field"),
        );
    }
    // Fields of another event type are extra fields too.
    assert_invalid(
        &set(&example("open"), "closed_by", json!("peer")),
        "open+closed_by",
    );
    assert_invalid(&set(&example("ready"), "pid", json!(1)), "ready+pid");
    assert_invalid(
        &set(&example("lost"), "conn_id", json!("1")),
        "lost+conn_id",
    );
    // A body of one type under another type's name.
    assert_invalid(
        &set(&example("stall"), "type", json!("stall_end")),
        "retyped",
    );
    assert_invalid(
        &set(&example("lost"), "type", json!("error")),
        "unknown type",
    );
    assert_invalid(&json!("not an object"), "string");
    assert_invalid(&json!({}), "empty object");
}

#[test]
fn wrong_types_are_rejected() {
    let cases = [
        ("open", "conn_id", json!(8589934601u64)),
        ("open", "pid", json!("4242")),
        ("open", "pid", json!(42.5)),
        ("open", "uid", json!(null)),
        ("open", "comm", json!(null)),
        ("open", "local", json!(5432)),
        ("open", "exe", json!(false)),
        ("open", "preexisting", json!("true")),
        ("open", "age_s", json!("12")),
        ("close", "bytes_sent", json!(1.5)),
        ("close", "bytes_received", json!("0")),
        ("close", "duration_s", json!(null)),
        ("stall", "waiting_s", json!([5])),
        ("leak", "idle_s", json!(null)),
        ("ready", "ports", json!("5432,6432")),
        ("ready", "ports", json!(["5432"])),
        ("ready", "probes", json!([1])),
        ("ready", "version", json!(1)),
        ("ready", "unix_socket_glob", json!(null)),
        ("lost", "count", json!("3")),
        ("lost", "ts", json!(1_700_000_000)),
    ];
    assert_each_rejected(&cases);
}

#[test]
fn out_of_range_values_are_rejected() {
    let cases = [
        ("open", "pid", json!(-1)),
        ("open", "uid", json!(-1)),
        ("open", "age_s", json!(-0.5)),
        ("open", "conn_id", json!("")),
        ("open", "conn_id", json!("0x2a")),
        ("open", "conn_id", json!("-1")),
        ("open", "container_id", json!("0123456789ab")),
        (
            "open",
            "container_id",
            json!("0123456789ABCDEF0123456789ABCDEF0123456789ABCDEF0123456789ABCDEF"),
        ),
        ("close", "bytes_sent", json!(-1)),
        ("close", "duration_s", json!(-1)),
        ("stall_end", "waited_s", json!(-0.001)),
        ("leak_end", "lasted_s", json!(-1)),
        ("ready", "ports", json!([0])),
        ("ready", "ports", json!([65536])),
        ("lost", "count", json!(0)),
    ];
    assert_each_rejected(&cases);
}

#[test]
fn bad_enum_values_are_rejected() {
    let cases = [
        ("open", "role", json!("peer")),
        ("open", "role", json!("Client")),
        ("open", "transport", json!("udp")),
        ("open", "state", json!("busy")),
        ("open", "state", json!(null)),
        ("open", "container_runtime", json!("lxc")),
        ("close", "closed_by", json!("timeout")),
        ("close", "closed_by", json!(null)),
        ("leak", "reason", json!("stall")),
        ("leak_end", "reason", json!(null)),
        ("lost", "where", json!("elsewhere")),
    ];
    assert_each_rejected(&cases);
}

#[test]
fn timestamps_must_be_utc_with_microseconds() {
    for ts in [
        "2026-11-24T20:22:32.352316Z",
        "1970-01-01T00:00:00.000000Z",
        "2026-12-31T23:59:59.999999Z",
    ] {
        for kind in EVENT_TYPES {
            assert_valid(&set(&example(kind), "ts", json!(ts)));
        }
    }
    for ts in [
        "2026-11-24T20:22:32Z",
        "2026-11-24T20:22:32.352Z",
        "2026-11-24T20:22:32.352316123Z",
        "2026-11-24T20:22:32.352316",
        "2026-11-24T20:22:32.352316+00:00",
        "2026-11-24 20:22:32.352316Z",
        "2026-11-24t20:22:32.352316z",
        "2026-13-24T20:22:32.352316Z",
        "2026-11-24T24:22:32.352316Z",
        "26-11-24T20:22:32.352316Z",
        " 2026-11-24T20:22:32.352316Z",
        "2026-11-24T20:22:32.352316Z\n",
        "",
    ] {
        for kind in EVENT_TYPES {
            assert_invalid(&set(&example(kind), "ts", json!(ts)), &format!("ts {ts:?}"));
        }
    }
}

#[test]
fn errors_name_the_offending_field() {
    let err = validate_event(&set(&example("close"), "closed_by", json!("timeout")))
        .expect_err("invalid");
    assert!(err.contains("closed_by"), "{err}");
}

#[test]
fn linked_is_a_server_link_or_a_client_link() {
    let leak = example("leak");
    let client = json!({
        "conn_id": "8589934800",
        "pid": 4242,
        "comm": "python3",
        "container_id": null,
        "remote": "10.0.0.7:51234",
    });
    assert_valid(&set(&leak, "linked", client.clone()));
    let mut no_pid = client.clone();
    no_pid.as_object_mut().expect("object").remove("pid");
    assert_invalid(&set(&leak, "linked", no_pid), "client link without pid");
    let mut extra = client;
    extra["backend_pid"] = json!(1);
    assert_invalid(&set(&leak, "linked", extra), "both kinds of link at once");
    assert_invalid(&set(&leak, "linked", json!("8589934800")), "a bare id");
    assert_invalid(&set(&leak, "backend_pid", json!(0)), "pid 0");
}
