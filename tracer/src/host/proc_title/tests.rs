use super::*;

/// A parsed title as one short line: `CLIENT ACTIVITY`, where CLIENT is `local` or `HOST:PORT`.
fn brief(t: &BackendTitle) -> String {
    let client = match &t.client {
        TitleClient::Local => "local".to_owned(),
        TitleClient::Remote { host, port } => format!("{host}:{port}"),
    };
    format!("{client} {:?}", t.activity)
}

#[test]
fn parses_every_title_form() {
    // One case per line: the title, ` => `, then what `brief` makes of its parse.
    let cases = [
        "postgres: app shop 127.0.0.1(54321) idle in transaction => 127.0.0.1:54321 IdleInTransaction",
        "postgres: app shop 10.1.2.3(40000) idle in transaction (aborted) => 10.1.2.3:40000 IdleInTransactionAborted",
        "postgres: app shop 127.0.0.1(1) idle => 127.0.0.1:1 Idle",
        "postgres: app shop [local] SELECT => local Running",
        "postgres: app shop [local] UPDATE waiting => local Running",
        "postgres: app shop ::1(47758) idle in transaction (aborted) => ::1:47758 IdleInTransactionAborted",
        "postgres: app shop fe80::1%eth0(5000) idle => fe80::1%eth0:5000 Idle",
        "postgres: app shop db1.example.com(6000) idle => db1.example.com:6000 Idle",
        // cluster_name set (Debian's packaged clusters: `15/main`).
        "postgres: 15/main: app shop [local] idle in transaction => local IdleInTransaction",
        // update_process_title = off: the title stops after the client.
        "postgres: main19: postgres postgres 127.0.0.1(47162) => 127.0.0.1:47162 Unset",
        "postgres: app shop 127.0.0.1(47162) authentication => 127.0.0.1:47162 Other",
        "postgres: walsender repl 10.0.0.9(41000) streaming 0/3000148 => 10.0.0.9:41000 Other",
        "postgres: app shop 127.0.0.1(5) fastpath function call => 127.0.0.1:5 Running",
    ];
    for case in cases {
        let (text, expected) = case.split_once(" => ").expect("a case has ` => `");
        let parsed = parse(text).map(|t| brief(&t));
        assert_eq!(parsed.as_deref(), Some(expected), "{text}");
    }
}

#[test]
fn other_processes_and_garbage_are_not_backends() {
    for text in [
        "postgres",
        "/usr/lib/postgresql/15/bin/postgres -D /var/lib/postgresql/15/main",
        "postgres: checkpointer",
        "postgres: main19: autovacuum launcher",
        "postgres: logical replication launcher",
        "postgres: parallel worker for PID 4242",
        "postgres: app",
        "postgres: app shop 127.0.0.1(99999) idle",
        "postgres: app shop 127.0.0.1() idle",
        "postgres: app shop (5432) idle",
        "pgbouncer /etc/pgbouncer/pgbouncer.ini",
        "",
        "postgres: \u{fffd}\u{fffd} (((",
    ] {
        assert_eq!(parse(text), None, "{text:?}");
    }
}

#[test]
fn a_client_chosen_name_cannot_fake_the_state() {
    // The user name is the client's text, before authentication.
    let t = parse("postgres: x 1.2.3.4(99) idle in transaction shop 127.0.0.1(5000) idle")
        .expect("backend");
    assert_eq!(brief(&t), "127.0.0.1:5000 Idle");
    let t = parse("postgres: [local] idle in transaction [local] SELECT").expect("backend");
    assert_eq!(t.activity, Activity::Running);
}

#[test]
fn cmdline_padding_is_dropped() {
    let mut raw = b"postgres: a b [local] idle in transaction".to_vec();
    raw.extend([0u8; 40]);
    assert_eq!(
        title_of_cmdline(&raw),
        "postgres: a b [local] idle in transaction"
    );
    assert_eq!(
        title_of_cmdline(b"postgres: main: checkpointer \0\0"),
        "postgres: main: checkpointer"
    );
    assert_eq!(
        title_of_cmdline(b"/usr/bin/postgres\0-D\0/x\0"),
        "/usr/bin/postgres"
    );
    assert_eq!(title_of_cmdline(b"\xff\xfe"), "\u{fffd}\u{fffd}");
}

/// A found connection from one line: `COOKIE ROLE TRANSPORT LOCAL REMOTE PID`, with `-` for
/// an empty address (an unbound Unix client).
fn found(spec: &str) -> FoundConn {
    let [cookie, role, transport, local, remote, pid] = spec
        .split_whitespace()
        .collect::<Vec<_>>()
        .try_into()
        .expect("six fields");
    let cookie: u64 = cookie.parse().expect("cookie");
    let address = |a: &str| if a == "-" { "" } else { a }.into();
    FoundConn {
        cookie,
        inode: cookie + 1000,
        peer_inode: None,
        role: match role {
            "server" => Role::Server,
            "client" => Role::Client,
            _ => panic!("role {role}"),
        },
        transport: match transport {
            "tcp" => Transport::Tcp,
            "unix" => Transport::Unix,
            _ => panic!("transport {transport}"),
        },
        local: address(local),
        remote: address(remote),
        pids: vec![pid.parse().expect("pid")],
        uid: 0,
        peer_closed: false,
        age_s: 0.0,
        to_server_ago_s: None,
        from_server_ago_s: None,
    }
}

#[test]
fn the_backends_state_reaches_the_local_client_end() {
    use ConnState::*;
    let sock = "/run/postgresql/.s.PGSQL.5432";
    let mut unix_server = found(&format!("5 server unix {sock} {sock} 105"));
    let unix_client = found(&format!("6 client unix - {sock} 6"));
    unix_server.peer_inode = Some(unix_client.inode);
    let conns = vec![
        // psql -> Postgres over TCP, both ends here.
        found("1 server tcp 127.0.0.1:5432 127.0.0.1:40000 101"),
        found("2 client tcp 127.0.0.1:40000 127.0.0.1:5432 2"),
        // PgBouncer's server connection, over IPv6 (v4-mapped on the backend's side).
        found("3 server tcp [::ffff:127.0.0.1]:5432 [::ffff:127.0.0.1]:40001 103"),
        found("4 client tcp 127.0.0.1:40001 127.0.0.1:5432 4"),
        unix_server,
        unix_client,
        // A remote client: only the backend's view.
        found("7 server tcp 10.0.0.1:5432 10.0.0.2:50000 107"),
        // PgBouncer's own listening side: not a Postgres title.
        found("8 server tcp 127.0.0.1:6432 127.0.0.1:40002 108"),
        // A title that names another port: not this socket's.
        found("9 server tcp 127.0.0.1:5432 127.0.0.1:40003 109"),
        // update_process_title = off.
        found("10 server tcp 127.0.0.1:5432 127.0.0.1:40004 110"),
    ];
    let titles = |pid: u32| -> Option<String> {
        Some(match pid {
            101 => "postgres: u d 127.0.0.1(40000) idle in transaction".into(),
            103 => "postgres: u d ::ffff:127.0.0.1(40001) idle".into(),
            105 => "postgres: c: u d [local] idle in transaction (aborted)".into(),
            107 => "postgres: u d 10.0.0.2(50000) SELECT".into(),
            108 => "pgbouncer /etc/pgbouncer.ini".into(),
            109 => "postgres: u d 127.0.0.1(1234) idle in transaction".into(),
            110 => "postgres: u d 127.0.0.1(40004)".into(),
            _ => return None,
        })
    };
    let seeds = seeds(&conns, &titles, 77);
    let mut got: Vec<(u64, ConnState)> = seeds.iter().map(|(c, s)| (*c, s.state)).collect();
    got.sort_by_key(|(c, _)| *c);
    assert_eq!(
        got,
        vec![
            (1, IdleInTransaction),
            (2, IdleInTransaction),
            (3, Idle),
            (4, Idle),
            (5, IdleInTransactionAborted),
            (6, IdleInTransactionAborted),
            (7, Active),
        ]
    );
    assert!(seeds.values().all(|s| s.known_ns == 77));
}

#[test]
fn an_ambiguous_pair_seeds_only_the_backend() {
    // The same loopback addresses in two network namespaces.
    let conns = vec![
        found("1 server tcp 127.0.0.1:5432 127.0.0.1:40000 101"),
        found("2 client tcp 127.0.0.1:40000 127.0.0.1:5432 2"),
        found("3 client tcp 127.0.0.1:40000 127.0.0.1:5432 3"),
    ];
    let titles = |_| Some("postgres: u d 127.0.0.1(40000) idle in transaction".to_owned());
    let seeds = seeds(&conns, &titles, 1);
    assert_eq!(seeds.keys().copied().collect::<Vec<_>>(), vec![1]);
}
