//! The state file's format, merge rules and directory handling.
#![allow(
    clippy::let_underscore_must_use,
    reason = "clean-up of processes, sockets and files that may be gone already, and calls made only to show they do not panic: their results are ignored on purpose"
)]

use super::*;
use crate::model::detectors::{Finding, Thresholds};
use std::time::Duration;
use tracer_common::protocol::TX_IN_TRANSACTION;

const S: u64 = 1_000_000_000;

fn conn(cookie: u64, transport: Transport) -> Conn {
    let owner = Owner {
        pid: 42,
        uid: 1000,
        cgroup_id: 7,
        comm: "app".into(),
        start_boottime_ns: 5 * S,
    };
    let mut c = Conn::new(
        cookie,
        Role::Client,
        transport,
        "127.0.0.1:40000".into(),
        "127.0.0.1:5432".into(),
        owner,
        10 * S,
    );
    c.details.cmdline = Some("app --password=hunter2".into());
    c.details.container.container_runtime = Some("docker");
    c.details.container.container_id = Some("ab".repeat(32));
    c
}

/// A connection that sent at 20 s, was answered at 21 s and sits in a transaction since.
fn in_transaction(cookie: u64, transport: Transport) -> Conn {
    let mut c = conn(cookie, transport);
    c.live.last_send_ns = 20 * S;
    c.live.last_recv_ns = 21 * S;
    c.live.tx_status = TX_IN_TRANSACTION;
    c
}

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tracer-state-{tag}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    dir
}

#[test]
fn round_trip_keeps_state_times_and_verdicts_but_no_command_line() {
    let mut c = in_transaction(11, Transport::Tcp);
    c.live.bytes_sent = 100;
    let limits = Thresholds {
        idle_in_transaction_after: Duration::from_secs(5),
        ..Thresholds::default()
    };
    assert!(!c.episodes.evaluate(&c.view(), 30 * S, &limits).is_empty());
    let file = StateFile::of("boot-a", [&c].into_iter(), 30 * S);
    let bytes = serde_json::to_vec(&file).expect("encode");
    assert!(!String::from_utf8_lossy(&bytes).contains("hunter2"));
    let back = StateFile::decode(&bytes, "boot-a").expect("decode");
    assert_eq!(back, file);
    let saved = &back.connections[0];
    assert_eq!(
        (
            saved.state,
            saved.state_known_ns,
            saved.to_server_ns,
            saved.from_server_ns
        ),
        (Some(ConnState::IdleInTransaction), 30 * S, 20 * S, 21 * S)
    );
    assert_eq!(
        saved.leaks,
        vec![SavedLeak {
            reason: LeakReason::IdleInTransaction,
            since_ns: 21 * S
        }]
    );

    // A new daemon finds it alive, with no process title (a client-only host).
    let mut found = conn(11, Transport::Tcp);
    found.born_ns = 28 * S; // the socket tables' lower bound
    found.found_to_server_ns = 20 * S;
    found.found_from_server_ns = 21 * S;
    assert!(saved.restore_into(&mut found, 40 * S));
    assert_eq!(found.born_ns, 10 * S, "the true age");
    assert_eq!(found.view().state(), ConnState::IdleInTransaction);
    // The verdict is found again, on this daemon's stream, counted from the true onset.
    assert_eq!(
        found.episodes.evaluate(&found.view(), 40 * S, &limits),
        vec![Finding::Leak {
            reason: LeakReason::IdleInTransaction,
            age_s: 30.0,
            idle_s: 19.0
        }]
    );
}

#[test]
fn traffic_while_no_daemon_watched_voids_the_saved_state() {
    let c = in_transaction(12, Transport::Tcp);
    let saved = SavedConn::of(&c, 30 * S);
    // tcp_info says the client sent something at 35 s (COMMIT, say).
    let mut found = conn(12, Transport::Tcp);
    found.found_to_server_ns = 35 * S;
    found.found_from_server_ns = 35 * S;
    assert!(saved.restore_into(&mut found, 40 * S));
    assert_eq!(found.view().state(), ConnState::Unknown);
}

#[test]
fn a_title_that_disagrees_wins_and_unix_idle_counts_from_now() {
    let c = in_transaction(13, Transport::Unix);
    let saved = SavedConn::of(&c, 30 * S);

    let mut agreeing = conn(13, Transport::Unix);
    agreeing.born_ns = 40 * S;
    agreeing.seeded = Some(Seeded {
        state: ConnState::IdleInTransaction,
        known_ns: 40 * S,
    });
    assert!(saved.restore_into(&mut agreeing, 40 * S));
    assert_eq!(
        agreeing.view().last_activity_ns(),
        21 * S,
        "true idle onset"
    );

    let mut changed = conn(13, Transport::Unix);
    changed.born_ns = 40 * S;
    changed.seeded = Some(Seeded {
        state: ConnState::Idle,
        known_ns: 40 * S,
    });
    assert!(saved.restore_into(&mut changed, 40 * S));
    assert_eq!(changed.view().state(), ConnState::Idle);
    assert_eq!(changed.view().last_activity_ns(), 40 * S, "a lower bound");
    assert_eq!(changed.born_ns, 10 * S);
}

#[test]
fn a_record_of_another_connection_is_refused() {
    let saved = SavedConn::of(&conn(14, Transport::Tcp), 30 * S);
    let mut other = conn(15, Transport::Tcp);
    assert!(!saved.restore_into(&mut other, 40 * S));
    let mut other_role = conn(14, Transport::Tcp);
    other_role.role = Role::Server;
    assert!(!saved.restore_into(&mut other_role, 40 * S));
    assert_eq!(other_role.born_ns, 10 * S, "unchanged");
}

#[test]
fn a_dead_connection_comes_back_with_its_open_verdicts_to_end_them() {
    let mut c = conn(16, Transport::Tcp);
    c.peer_closed_ns = Some(20 * S);
    let limits = Thresholds::default();
    assert!(!c.episodes.evaluate(&c.view(), 31 * S, &limits).is_empty());
    let saved = SavedConn::of(&c, 31 * S);
    let mut dead = saved.to_closed_conn();
    assert_eq!(dead.details.cmdline, None);
    assert_eq!(dead.details.container.container_runtime, Some("docker"));
    assert_eq!(dead.owner.comm, "app");
    let ends = dead.episodes.close(&dead.view(), 50 * S);
    assert_eq!(
        ends,
        vec![Finding::LeakEnd {
            reason: LeakReason::CloseWait,
            lasted_s: 30.0
        }]
    );
}

#[test]
fn corrupt_foreign_and_other_boot_files_are_refused_with_a_reason() {
    let good = StateFile::of("boot-a", std::iter::empty(), 0);
    let bytes = serde_json::to_vec(&good).expect("encode");
    assert!(StateFile::decode(&bytes, "boot-a").is_ok());
    let other_boot = StateFile::decode(&bytes, "boot-b").unwrap_err();
    assert!(other_boot.contains("reboot"), "{other_boot}");
    for junk in [
        &b""[..],
        b"\x00\xff garbage",
        b"{\"format\":1}",
        b"[1,2,3]",
        b"{\"format\":1,\"boot_id\":\"boot-a\",\"connections\":[{\"cookie\":-1}]}",
    ] {
        let why = StateFile::decode(junk, "boot-a").unwrap_err();
        assert!(why.starts_with("not a tracer state file"), "{why}");
    }
    let mut future = good.clone();
    future.format = 99;
    let why =
        StateFile::decode(&serde_json::to_vec(&future).expect("encode"), "boot-a").unwrap_err();
    assert!(why.contains("format 99"), "{why}");
}

#[test]
fn the_directory_is_private_locked_and_replaced_atomically() {
    use std::os::unix::fs::PermissionsExt as _;
    let path = temp_dir("dir");
    let dir = StateDir::open(&path.join("nested")).expect("open");
    let mode = fs::metadata(path.join("nested"))
        .expect("dir")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700);
    assert!(dir.load("boot-a").is_none(), "no file yet");
    let second = StateDir::open(&path.join("nested")).err().expect("locked");
    assert_eq!(second.kind(), io::ErrorKind::WouldBlock);

    let file = StateFile::of("boot-a", [&conn(17, Transport::Tcp)].into_iter(), 1);
    let bytes = serde_json::to_vec(&file).expect("encode");
    dir.save(|out| out.write_all(&bytes)).expect("save");
    let meta = fs::metadata(dir.path()).expect("file");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(dir.load("boot-a"), Some(file));
    assert!(dir.load("boot-b").is_none(), "another boot");
    assert!(!path.join("nested").join(TEMP_NAME).exists());
    fs::write(dir.path(), b"{ half a file").expect("corrupt");
    assert!(dir.load("boot-a").is_none(), "corrupt: ignored");
    drop(dir);
    assert!(
        StateDir::open(&path.join("nested")).is_ok(),
        "unlocked on drop"
    );
    let _ = fs::remove_dir_all(&path);
}

#[test]
fn the_streamed_file_reads_back_as_the_table_it_was_written_from() {
    let path = temp_dir("stream");
    let mut kept = KeptState::open(&StateDirSetting::Dir(path.join("state")))
        .expect("open")
        .expect("kept");
    let conns = [conn(9, Transport::Tcp), conn(3, Transport::Unix)];
    kept.save(conns.iter(), 40 * S);
    let expected = StateFile::of(&kept.boot_id, conns.iter(), 40 * S);
    assert_eq!(kept.load(), Some(expected));
}
