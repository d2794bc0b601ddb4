//! Postgres backends' process titles (`/proc/<pid>/cmdline`), the one place a server
//! publishes each connection's transaction state without credentials:
//! `postgres: [CLUSTER: ]USER DB ADDR(PORT) idle in transaction`. Read at start-up, they seed
//! the state of connections older than the daemon, which would otherwise stay `unknown`
//! until their next answer (a leaked one never gets one).
//!
//! Owns the title parser, the pairing of a backend's state with the client end of the same
//! connection when that end is on this host too (a local app, or PgBouncer's server
//! connection), and the `tracer check` line about titles.

use std::{collections::HashMap, net::SocketAddr, path::Path};

use crate::{
    host::discovery::FoundConn,
    model::conn_table::{Role, Transport},
    model::detectors::{ConnState, Seeded},
};

const PREFIX: &str = "postgres: ";

/// Who the backend serves, as its title names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TitleClient {
    /// `[local]`: a Unix-socket client.
    Local,
    /// `ADDR(PORT)`; the address may be a host name (`log_hostname = on`).
    Remote { host: String, port: u16 },
}

/// What the backend is doing, the part of the title after the client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Activity {
    Idle,
    IdleInTransaction,
    IdleInTransactionAborted,
    /// A command tag (`SELECT`, `UPDATE waiting`, ...): a query is running.
    Running,
    /// Nothing after the client: `update_process_title = off` stops titles there.
    Unset,
    /// Anything else (`authentication`, a walsender's `streaming 0/...`).
    Other,
}

impl Activity {
    fn from_text(text: &str) -> Self {
        match text {
            "" => Self::Unset,
            "idle" => Self::Idle,
            "idle in transaction" => Self::IdleInTransaction,
            "idle in transaction (aborted)" => Self::IdleInTransactionAborted,
            "fastpath function call" => Self::Running,
            t if t.starts_with(|c: char| c.is_ascii_uppercase()) => Self::Running,
            _ => Self::Other,
        }
    }

    /// The connection state this activity means, when it means one.
    pub fn state(&self) -> Option<ConnState> {
        match self {
            Self::Idle => Some(ConnState::Idle),
            Self::IdleInTransaction => Some(ConnState::IdleInTransaction),
            Self::IdleInTransactionAborted => Some(ConnState::IdleInTransactionAborted),
            Self::Running => Some(ConnState::Active),
            Self::Unset | Self::Other => None,
        }
    }
}

/// A client backend's title.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendTitle {
    pub client: TitleClient,
    pub activity: Activity,
}

/// `ADDR(PORT)` as a client, or `[local]`.
fn client_token(token: &str) -> Option<TitleClient> {
    if token == "[local]" {
        return Some(TitleClient::Local);
    }
    let inner = token.strip_suffix(')')?;
    let open = inner.rfind('(')?;
    let (host, port) = (&inner[..open], &inner[open + 1..]);
    if host.is_empty() || port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(TitleClient::Remote {
        host: host.to_owned(),
        port: port.parse().ok()?,
    })
}

/// Parses a client backend's title; `None` for anything else (the postmaster, background
/// processes, other programs, garbage).
///
/// The user and database names come from the client, before authentication, and may hold
/// spaces or text that looks like a client: the client is therefore the *last* token that
/// looks like one, since everything after it is written by the server.
pub fn parse(title: &str) -> Option<BackendTitle> {
    let rest = title.strip_prefix(PREFIX)?;
    let mut tokens = Vec::new();
    let mut offset = 0;
    for token in rest.split(' ') {
        if !token.is_empty() {
            tokens.push((offset, token));
        }
        offset += token.len() + 1;
    }
    // At least a user name precedes the client.
    let (index, client) = tokens
        .iter()
        .enumerate()
        .skip(1)
        .rev()
        .find_map(|(i, (_, t))| client_token(t).map(|c| (i, c)))?;
    let (at, token) = tokens[index];
    let activity = rest[at + token.len()..].trim();
    Some(BackendTitle {
        client,
        activity: Activity::from_text(activity),
    })
}

/// The title in a `/proc/<pid>/cmdline`: Postgres overwrites its argument area and pads it
/// with NULs.
pub fn title_of_cmdline(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).trim_end().to_owned()
}

/// The process title of `pid`, if it can be read.
pub fn read_title(proc_root: &Path, pid: u32) -> Option<String> {
    std::fs::read(proc_root.join(pid.to_string()).join("cmdline"))
        .ok()
        .map(|bytes| title_of_cmdline(&bytes))
}

fn canonical(addr: &str) -> Option<SocketAddr> {
    let addr: SocketAddr = addr.parse().ok()?;
    Some(SocketAddr::new(addr.ip().to_canonical(), addr.port()))
}

/// The states the process titles give, by connection cookie, known at `now` (monotonic
/// ns): each Postgres backend's own connection, and the client end of it when that end is
/// one of `found` too (the client's local address is the backend's remote one; for a Unix
/// socket, its peer). A pairing that is not one-to-one (the same addresses in two network
/// namespaces) gives the client nothing.
pub fn seeds(
    found: &[FoundConn],
    title_of: &dyn Fn(u32) -> Option<String>,
    now: u64,
) -> HashMap<u64, Seeded> {
    type Pair = (SocketAddr, SocketAddr);
    let tcp_pair = |local: &str, remote: &str| -> Option<Pair> {
        Some((canonical(local)?, canonical(remote)?))
    };
    let mut clients_by_pair: HashMap<Pair, Vec<u64>> = HashMap::new();
    let mut servers_by_pair: HashMap<Pair, usize> = HashMap::new();
    let mut unix_clients_by_inode: HashMap<u64, Vec<u64>> = HashMap::new();
    for f in found {
        match (f.transport, f.role) {
            (Transport::Tcp, Role::Client) => {
                if let Some(pair) = tcp_pair(&f.local, &f.remote) {
                    clients_by_pair.entry(pair).or_default().push(f.cookie);
                }
            }
            (Transport::Tcp, Role::Server) => {
                if let Some(pair) = tcp_pair(&f.remote, &f.local) {
                    *servers_by_pair.entry(pair).or_default() += 1;
                }
            }
            (Transport::Unix, Role::Client) => {
                unix_clients_by_inode
                    .entry(f.inode)
                    .or_default()
                    .push(f.cookie);
            }
            (Transport::Unix, Role::Server) => {}
        }
    }

    let mut seeds = HashMap::new();
    for server in found.iter().filter(|f| f.role == Role::Server) {
        let Some(pid) = server.pid() else { continue };
        let Some(title) = title_of(pid).as_deref().and_then(parse) else {
            continue;
        };
        let Some(state) = title.activity.state() else {
            continue;
        };
        // The title must describe this socket: a backend serves exactly one client.
        let client = match (server.transport, &title.client) {
            (Transport::Tcp, TitleClient::Remote { port, .. })
                if canonical(&server.remote).is_some_and(|r| r.port() == *port) =>
            {
                tcp_pair(&server.remote, &server.local).and_then(|pair| {
                    match (
                        clients_by_pair.get(&pair).map(Vec::as_slice),
                        servers_by_pair.get(&pair),
                    ) {
                        (Some([client]), Some(1)) => Some(*client),
                        _ => None,
                    }
                })
            }
            (Transport::Unix, TitleClient::Local) => server.peer_inode.and_then(|peer| {
                match unix_clients_by_inode.get(&peer).map(Vec::as_slice) {
                    Some([client]) => Some(*client),
                    _ => None,
                }
            }),
            _ => continue,
        };
        let seeded = Seeded {
            state,
            known_ns: now,
        };
        seeds.insert(server.cookie, seeded);
        if let Some(client) = client {
            seeds.insert(client, seeded);
        }
    }
    seeds
}

/// What process titles this host offers: the `tracer check` line (always ok: without titles
/// the daemon still runs, connections found at start-up just start as `unknown`).
pub fn check_line(proc_root: &Path) -> (bool, String) {
    const FALLBACK: &str = "connections found at start-up stay unknown until their next answer";
    let (mut servers, mut unreadable, mut titled, mut backends, mut with_state) = (0, 0, 0, 0, 0);
    for entry in std::fs::read_dir(proc_root).into_iter().flatten().flatten() {
        let path = entry.path();
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        if comm.trim_end() != "postgres" {
            continue;
        }
        servers += 1;
        let Ok(cmdline) = std::fs::read(path.join("cmdline")) else {
            unreadable += 1;
            continue;
        };
        let title = title_of_cmdline(&cmdline);
        if title.starts_with(PREFIX) {
            titled += 1;
        }
        if let Some(parsed) = parse(&title) {
            backends += 1;
            with_state += usize::from(parsed.activity.state().is_some());
        }
    }
    let detail = if servers == 0 {
        format!("no Postgres server process on this host; {FALLBACK}")
    } else if unreadable == servers {
        format!("cannot read the titles of {servers} Postgres processes; {FALLBACK}")
    } else if titled == 0 || (backends > 0 && with_state == 0) {
        format!("Postgres shows no state in its titles (update_process_title = off?); {FALLBACK}")
    } else if backends == 0 {
        "readable (no client backend right now)".to_owned()
    } else {
        format!("readable: {with_state} of {backends} Postgres backends show their state")
    };
    (true, detail)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn title(client: TitleClient, activity: Activity) -> Option<BackendTitle> {
        Some(BackendTitle { client, activity })
    }

    fn remote(host: &str, port: u16) -> TitleClient {
        TitleClient::Remote {
            host: host.into(),
            port,
        }
    }

    #[test]
    fn parses_every_title_form() {
        use Activity::*;
        for (text, expected) in [
            (
                "postgres: app shop 127.0.0.1(54321) idle in transaction",
                title(remote("127.0.0.1", 54321), IdleInTransaction),
            ),
            (
                "postgres: app shop 10.1.2.3(40000) idle in transaction (aborted)",
                title(remote("10.1.2.3", 40000), IdleInTransactionAborted),
            ),
            (
                "postgres: app shop 127.0.0.1(1) idle",
                title(remote("127.0.0.1", 1), Idle),
            ),
            (
                "postgres: app shop [local] SELECT",
                title(TitleClient::Local, Running),
            ),
            (
                "postgres: app shop [local] UPDATE waiting",
                title(TitleClient::Local, Running),
            ),
            (
                "postgres: app shop ::1(47758) idle in transaction (aborted)",
                title(remote("::1", 47758), IdleInTransactionAborted),
            ),
            (
                "postgres: app shop fe80::1%eth0(5000) idle",
                title(remote("fe80::1%eth0", 5000), Idle),
            ),
            (
                "postgres: app shop db1.example.com(6000) idle",
                title(remote("db1.example.com", 6000), Idle),
            ),
            // cluster_name set (Debian's packaged clusters: `15/main`).
            (
                "postgres: 15/main: app shop [local] idle in transaction",
                title(TitleClient::Local, IdleInTransaction),
            ),
            // update_process_title = off: the title stops after the client.
            (
                "postgres: main19: postgres postgres 127.0.0.1(47162)",
                title(remote("127.0.0.1", 47162), Unset),
            ),
            (
                "postgres: app shop 127.0.0.1(47162) authentication",
                title(remote("127.0.0.1", 47162), Other),
            ),
            (
                "postgres: walsender repl 10.0.0.9(41000) streaming 0/3000148",
                title(remote("10.0.0.9", 41000), Other),
            ),
            (
                "postgres: app shop 127.0.0.1(5) fastpath function call",
                title(remote("127.0.0.1", 5), Running),
            ),
        ] {
            assert_eq!(parse(text), expected, "{text}");
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
        assert_eq!(t, title(remote("127.0.0.1", 5000), Activity::Idle).unwrap());
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

    fn found(
        cookie: u64,
        role: Role,
        transport: Transport,
        local: &str,
        remote: &str,
        pid: u32,
    ) -> FoundConn {
        FoundConn {
            cookie,
            inode: cookie + 1000,
            peer_inode: None,
            role,
            transport,
            local: local.into(),
            remote: remote.into(),
            pids: vec![pid],
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
        let mut unix_server = found(5, Role::Server, Transport::Unix, sock, sock, 105);
        let unix_client = found(6, Role::Client, Transport::Unix, "", sock, 6);
        unix_server.peer_inode = Some(unix_client.inode);
        let conns = vec![
            // psql -> Postgres over TCP, both ends here.
            found(
                1,
                Role::Server,
                Transport::Tcp,
                "127.0.0.1:5432",
                "127.0.0.1:40000",
                101,
            ),
            found(
                2,
                Role::Client,
                Transport::Tcp,
                "127.0.0.1:40000",
                "127.0.0.1:5432",
                2,
            ),
            // PgBouncer's server connection, over IPv6 (v4-mapped on the backend's side).
            found(
                3,
                Role::Server,
                Transport::Tcp,
                "[::ffff:127.0.0.1]:5432",
                "[::ffff:127.0.0.1]:40001",
                103,
            ),
            found(
                4,
                Role::Client,
                Transport::Tcp,
                "127.0.0.1:40001",
                "127.0.0.1:5432",
                4,
            ),
            unix_server,
            unix_client,
            // A remote client: only the backend's view.
            found(
                7,
                Role::Server,
                Transport::Tcp,
                "10.0.0.1:5432",
                "10.0.0.2:50000",
                107,
            ),
            // PgBouncer's own listening side: not a Postgres title.
            found(
                8,
                Role::Server,
                Transport::Tcp,
                "127.0.0.1:6432",
                "127.0.0.1:40002",
                108,
            ),
            // A title that names another port: not this socket's.
            found(
                9,
                Role::Server,
                Transport::Tcp,
                "127.0.0.1:5432",
                "127.0.0.1:40003",
                109,
            ),
            // update_process_title = off.
            found(
                10,
                Role::Server,
                Transport::Tcp,
                "127.0.0.1:5432",
                "127.0.0.1:40004",
                110,
            ),
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
            found(
                1,
                Role::Server,
                Transport::Tcp,
                "127.0.0.1:5432",
                "127.0.0.1:40000",
                101,
            ),
            found(
                2,
                Role::Client,
                Transport::Tcp,
                "127.0.0.1:40000",
                "127.0.0.1:5432",
                2,
            ),
            found(
                3,
                Role::Client,
                Transport::Tcp,
                "127.0.0.1:40000",
                "127.0.0.1:5432",
                3,
            ),
        ];
        let titles = |_| Some("postgres: u d 127.0.0.1(40000) idle in transaction".to_owned());
        let seeds = seeds(&conns, &titles, 1);
        assert_eq!(seeds.keys().copied().collect::<Vec<_>>(), vec![1]);
    }
}
