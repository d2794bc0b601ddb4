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
    model::endpoint::Endpoint,
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

fn canonical(end: &Endpoint) -> Option<SocketAddr> {
    let Endpoint::Inet(addr) = end else {
        return None;
    };
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
    let tcp_pair = |local: &Endpoint, remote: &Endpoint| -> Option<Pair> {
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
mod tests;
