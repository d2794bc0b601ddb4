use super::*;
use crate::host::sockdiag::{TcpInfoTimes, UnixSocket};

fn tcp(local: &str, remote: &str, state: u8, inode: u64) -> TcpSocket {
    TcpSocket {
        cookie: inode * 10,
        inode,
        uid: 1000,
        state,
        local: local.parse().expect("addr"),
        remote: remote.parse().expect("addr"),
        info: Some(TcpInfoTimes {
            last_data_sent_ms: 2_000,
            last_data_recv_ms: 1_000,
            last_ack_recv_ms: 1_000,
            bytes_acked: 0,
            bytes_received: 0,
        }),
    }
}

#[test]
fn picks_watched_tcp_connections_with_roles_and_owners() {
    let sockets = vec![
        tcp("127.0.0.1:5432", "0.0.0.0:0", TCP_LISTEN, 1),
        tcp(
            "127.0.0.1:40000",
            "127.0.0.1:5432",
            sockdiag::TCP_ESTABLISHED,
            2,
        ),
        tcp(
            "127.0.0.1:5432",
            "127.0.0.1:40000",
            sockdiag::TCP_ESTABLISHED,
            3,
        ),
        tcp(
            "127.0.0.1:40001",
            "127.0.0.1:8080",
            sockdiag::TCP_ESTABLISHED,
            4,
        ),
        tcp("[::1]:40002", "[::1]:6432", TCP_CLOSE_WAIT, 5),
    ];
    let owners = HashMap::from([(2, vec![77]), (3, vec![88, 99]), (5, vec![55])]);
    let found = tcp_connections(&sockets, &[5432, 6432], &owners, &|_| Some(1.5));
    let summary: Vec<_> = found
        .iter()
        .map(|f| (f.inode, f.role, f.pid(), f.peer_closed))
        .collect();
    assert_eq!(
        summary,
        vec![
            (2, Role::Client, Some(77), false),
            (3, Role::Server, Some(88), false),
            (5, Role::Client, Some(55), true),
        ]
    );
    assert_eq!(found[2].remote.to_string(), "[::1]:6432");
    // Timings are capped at the owner's age (1.5 s) and mirrored for the server role.
    assert_eq!(found[0].to_server_ago_s, Some(1.5));
    assert_eq!(found[0].from_server_ago_s, Some(1.0));
    assert_eq!(found[1].to_server_ago_s, Some(1.0));
    assert_eq!(found[0].idle_s(), Some(1.0));
    assert_eq!(found[0].age_s, 1.5);
}

#[test]
fn picks_unix_connections_by_path() {
    let sock = |inode, path: Option<&str>| UnixSocket {
        cookie: inode,
        inode,
        state: 1,
        socket_type: 1,
        path: path.map(str::to_owned),
        peer_inode: None,
    };
    let conns = vec![
        UnixConnection {
            socket: sock(1, None),
            role: UnixRole::Client,
            path: "/run/postgresql/.s.PGSQL.5432".into(),
        },
        UnixConnection {
            socket: sock(2, Some("/run/postgresql/.s.PGSQL.5432")),
            role: UnixRole::Server,
            path: "/run/postgresql/.s.PGSQL.5432".into(),
        },
        UnixConnection {
            socket: sock(3, None),
            role: UnixRole::Client,
            path: "/run/dbus/system_bus_socket".into(),
        },
    ];
    let owners = HashMap::from([(1, vec![10]), (2, vec![20])]);
    let found = unix_found(&conns, &|p| p.contains(".s.PGSQL."), &owners, &|pid| {
        Some(pid + 1000)
    });
    assert_eq!(found.len(), 2);
    assert_eq!(
        (
            found[0].role,
            found[0].local.to_string().as_str(),
            found[0].uid
        ),
        (Role::Client, "", 1010)
    );
    assert_eq!(
        (found[1].role, found[1].local.to_string().as_str()),
        (Role::Server, "/run/postgresql/.s.PGSQL.5432")
    );
    assert!(
        found
            .iter()
            .all(|f| f.remote.to_string() == "/run/postgresql/.s.PGSQL.5432"
                && f.transport == Transport::Unix)
    );
}
