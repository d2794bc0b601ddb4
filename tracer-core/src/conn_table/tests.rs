use super::*;
use tracer_common::{AF_INET, ConnClose, ConnOpen, ConnOwner, ConnPeerClosed, EventHeader, kind};

fn paths(hash: u64) -> Option<String> {
    (hash == 0xabc).then(|| "/run/postgresql/.s.PGSQL.5432".to_owned())
}

fn header(k: u32, cookie: u64, ts_ns: u64) -> EventHeader {
    EventHeader {
        kind: k,
        size: 0,
        ts_ns,
        cookie,
    }
}

fn proc(tgid: u32, comm: &str) -> ProcInfo {
    let mut c = [0u8; 16];
    c[..comm.len()].copy_from_slice(comm.as_bytes());
    ProcInfo {
        tgid,
        comm: c,
        ..ProcInfo::default()
    }
}

fn open_v4(cookie: u64) -> ConnOpen {
    let mut local_addr = [0; 16];
    local_addr[..4].copy_from_slice(&[127, 0, 0, 1]);
    ConnOpen {
        header: header(kind::CONN_OPEN, cookie, 1_000),
        owner: proc(10, "psql"),
        start_ns: 900,
        sock_key: 0xffff_0000 + cookie,
        family: AF_INET,
        local_port: 40000,
        remote_port: 5432,
        role: role::CLIENT,
        local_addr,
        remote_addr: local_addr,
        ..ConnOpen::default()
    }
}

fn close(cookie: u64, by: u8) -> KernelEvent {
    KernelEvent::Close(ConnClose {
        header: header(kind::CONN_CLOSE, cookie, 5_000),
        start_ns: 900,
        bytes_sent: 11,
        bytes_received: 22,
        closed_by: by,
        ..ConnClose::default()
    })
}

#[test]
fn open_then_close_reports_bytes_and_cause() {
    let mut table = ConnTable::default();
    assert_eq!(
        table.apply(&KernelEvent::Open(open_v4(1)), &paths),
        Change::Opened(1)
    );
    let conn = table.get(1).expect("tracked");
    assert_eq!(conn.local.to_string(), "127.0.0.1:40000");
    assert_eq!(conn.remote.to_string(), "127.0.0.1:5432");
    assert_eq!(conn.owner.comm, "psql");
    assert_eq!(
        (conn.role, conn.transport, conn.sock_key),
        (Role::Client, Transport::Tcp, 0xffff_0001)
    );
    assert!(!conn.preexisting);
    let Change::Closed(closed) = table.apply(&close(1, closed_by::PEER), &paths) else {
        panic!("not closed")
    };
    assert_eq!((closed.bytes_sent, closed.bytes_received), (11, 22));
    assert_eq!(closed.closed_by, ClosedBy::Peer);
    assert_eq!(closed.end_ns, 5_000);
    assert!(table.is_empty());
}

#[test]
fn ipv6_addresses_are_bracketed_and_unix_paths_resolved() {
    let mut table = ConnTable::default();
    let mut v6 = [0u8; 16];
    v6[15] = 1;
    let mut open = open_v4(2);
    open.family = AF_INET6;
    open.local_addr = v6;
    open.remote_addr = v6;
    table.apply(&KernelEvent::Open(open), &paths);
    assert_eq!(table.get(2).expect("v6").remote.to_string(), "[::1]:5432");

    let mut unix = open_v4(3);
    unix.family = AF_UNIX;
    unix.role = role::SERVER;
    unix.local_addr = [0; 16];
    unix.local_addr[..8].copy_from_slice(&0xabc_u64.to_ne_bytes());
    table.apply(&KernelEvent::Open(unix), &paths);
    let conn = table.get(3).expect("unix");
    assert_eq!(conn.transport, Transport::Unix);
    assert_eq!(conn.local.to_string(), "/run/postgresql/.s.PGSQL.5432");
    assert_eq!(conn.remote.to_string(), "/run/postgresql/.s.PGSQL.5432");
}

#[test]
fn known_connections_are_refreshed_not_duplicated() {
    let mut table = ConnTable::default();
    let found = Conn::new(
        7,
        Role::Client,
        Transport::Tcp,
        "a".into(),
        "b".into(),
        Owner::from_wire(&proc(5, "worker")),
        0,
    );
    assert!(table.insert_found(found.clone()));
    assert!(!table.insert_found(found));
    let mut adopted = open_v4(7);
    adopted.flags = OPEN_FLAG_PREEXISTING;
    adopted.owner = ProcInfo::default(); // seen in softirq: no owner
    assert_eq!(
        table.apply(&KernelEvent::Open(adopted), &paths),
        Change::Refreshed(7)
    );
    let conn = table.get(7).expect("kept");
    assert_eq!(
        (conn.owner.pid, conn.sock_key),
        (5, 0xffff_0007),
        "owner kept, key learned"
    );
    assert_eq!(table.len(), 1);
}

#[test]
fn events_for_unknown_connections_change_nothing() {
    let mut table = ConnTable::default();
    table.apply(&KernelEvent::Open(open_v4(3)), &paths);
    assert_eq!(
        table.apply(&close(99, closed_by::LOCAL), &paths),
        Change::Untracked
    );
    let peer = KernelEvent::PeerClosed(ConnPeerClosed {
        header: header(kind::CONN_PEER_CLOSED, 98, 0),
    });
    assert_eq!(table.apply(&peer, &paths), Change::Untracked);
    assert_eq!(table.len(), 1);
}

#[test]
fn found_connections_complete_the_ones_the_kernel_adopted_first() {
    let mut table = ConnTable::default();
    let mut adopted = open_v4(8);
    adopted.flags = OPEN_FLAG_PREEXISTING;
    adopted.header.ts_ns = 9_000;
    adopted.start_ns = 9_000;
    let mut fresh = open_v4(9);
    fresh.start_ns = 9_500;
    table.apply(&KernelEvent::Open(adopted), &paths);
    table.apply(&KernelEvent::Open(fresh), &paths);
    let found = |cookie| {
        let mut conn = Conn::new(
            cookie,
            Role::Client,
            Transport::Tcp,
            "127.0.0.1:40000".into(),
            "127.0.0.1:5432".into(),
            Owner::from_wire(&proc(5, "worker")),
            10_000,
        );
        conn.preexisting = true;
        conn.born_ns = 1_000;
        conn.found_to_server_ns = 2_000;
        conn.seeded = Some(Seeded {
            state: crate::detectors::ConnState::IdleInTransaction,
            known_ns: 2_000,
        });
        conn
    };
    assert!(!table.insert_found(found(8)));
    assert!(!table.insert_found(found(9)));
    let adopted = table.get(8).expect("adopted");
    assert_eq!(
        (adopted.born_ns, adopted.found_to_server_ns),
        (1_000, 2_000),
        "the scan's age and timings"
    );
    assert!(adopted.seeded.is_some(), "the process title's state");
    assert_eq!(adopted.sock_key, 0xffff_0008, "still the kernel's");
    // Opened after the probes: the kernel's account stands.
    let fresh = table.get(9).expect("fresh");
    assert!(!fresh.preexisting);
    assert_eq!((fresh.born_ns, fresh.seeded), (9_500, None));
}

#[test]
fn owner_moves_with_the_io() {
    let mut table = ConnTable::default();
    table.apply(&KernelEvent::Open(open_v4(4)), &paths);
    let moved = KernelEvent::Owner(ConnOwner {
        header: header(kind::CONN_OWNER, 4, 2_000),
        owner: proc(11, "worker"),
    });
    assert_eq!(table.apply(&moved, &paths), Change::OwnerChanged(4));
    let Change::Closed(closed) = table.apply(&close(4, closed_by::EXIT), &paths) else {
        panic!()
    };
    assert_eq!(closed.conn.owner.pid, 11);
    assert_eq!(closed.closed_by, ClosedBy::Exit);
}

#[test]
fn peer_close_is_remembered_and_views_follow_the_role() {
    let mut table = ConnTable::default();
    table.apply(&KernelEvent::Open(open_v4(5)), &paths);
    let peer = KernelEvent::PeerClosed(ConnPeerClosed {
        header: header(kind::CONN_PEER_CLOSED, 5, 3_000),
    });
    assert_eq!(table.apply(&peer, &paths), Change::PeerClosed(5));
    let conn = table.get_mut(5).expect("open");
    assert_eq!(conn.peer_closed_ns, Some(3_000));
    conn.live.last_send_ns = 10;
    conn.live.last_recv_ns = 20;
    assert_eq!(
        (conn.view().to_server_ns, conn.view().from_server_ns),
        (10, 20)
    );
    conn.role = Role::Server;
    assert_eq!(
        (conn.view().to_server_ns, conn.view().from_server_ns),
        (20, 10)
    );
    let Change::Closed(closed) = table.apply(&close(5, 200), &paths) else {
        panic!()
    };
    assert_eq!(closed.closed_by, ClosedBy::Unknown);
}

/// The metrics index their per-reason counts by discriminant.
#[test]
fn closed_by_lists_every_value_in_declaration_order() {
    let names: Vec<_> = ClosedBy::ALL.map(|c| c.as_str()).to_vec();
    assert_eq!(names, ["local", "peer", "reset", "exit", "unknown"]);
}

#[test]
fn the_unix_count_and_the_membership_follow_every_way_in_and_out() {
    let mut table = ConnTable::default();
    let unix_open = |cookie| {
        let mut unix = open_v4(cookie);
        unix.family = AF_UNIX;
        KernelEvent::Open(unix)
    };
    let before = table.membership();
    table.apply(&unix_open(1), &paths);
    table.apply(&unix_open(2), &paths);
    table.apply(&KernelEvent::Open(open_v4(3)), &paths);
    // A second open of a known connection refreshes it: still one.
    table.apply(&unix_open(1), &paths);
    assert_eq!((table.len(), table.unix_count()), (3, 2));
    let opened = table.membership();
    assert_ne!(opened, before);
    // Nothing that leaves membership alone moves it.
    table.apply(
        &KernelEvent::PeerClosed(ConnPeerClosed {
            header: header(kind::CONN_PEER_CLOSED, 3, 2_000),
        }),
        &paths,
    );
    assert_eq!(table.membership(), opened);

    table.apply(&close(1, closed_by::LOCAL), &paths);
    assert!(table.remove(2).is_some());
    assert!(table.remove(2).is_none());
    assert_eq!((table.len(), table.unix_count()), (1, 0));
    assert_ne!(table.membership(), opened);
    let mut found = table.get(3).expect("tcp").clone();
    found.cookie = 4;
    found.transport = Transport::Unix;
    assert!(table.insert_found(found));
    assert_eq!(table.unix_count(), 1);
}
