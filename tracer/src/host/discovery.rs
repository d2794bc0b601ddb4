//! Postgres connections that exist right now, found without the kernel programs: the
//! sockets `sock_diag` lists, filtered by the watched ports and socket paths, with their
//! owners from `/proc`. The daemon seeds its table with them at start-up (they are the
//! connections opened before it ran); `tracer list` prints them.

use std::{collections::HashMap, path::Path};

use crate::{
    host::owners::{process_age_s, socket_owners},
    host::process::read_details,
    host::redact::CmdlineMode,
    host::sockdiag::{self, DiagError, TCP_CLOSE_WAIT, TCP_LISTEN, TcpSocket},
    host::unix_pairs::{UnixConnection, UnixRole, unix_connections},
    model::conn_table::{Conn, Owner, Role, Transport},
    model::endpoint::Endpoint,
};

/// One connection found in the socket tables.
#[derive(Clone, Debug, PartialEq)]
pub struct FoundConn {
    pub cookie: u64,
    pub inode: u64,
    /// Unix sockets: the inode of the other end (sock_diag's peer), to pair both ends.
    pub peer_inode: Option<u64>,
    pub role: Role,
    pub transport: Transport,
    pub local: Endpoint,
    pub remote: Endpoint,
    /// The processes holding the socket (sorted; several after fork or fd passing).
    pub pids: Vec<u32>,
    pub uid: u32,
    /// The peer has closed its side (TCP CLOSE_WAIT).
    pub peer_closed: bool,
    /// A lower bound of the connection's age, seconds.
    pub age_s: f64,
    /// Seconds since request bytes / answer bytes last moved (client's view), when known.
    pub to_server_ago_s: Option<f64>,
    pub from_server_ago_s: Option<f64>,
}

impl FoundConn {
    /// The owner: the lowest pid holding the socket (the parent, after a fork).
    pub fn pid(&self) -> Option<u32> {
        self.pids.first().copied()
    }

    /// The connection as the daemon tracks it, at monotonic time `now` (ns): owner from
    /// `/proc` (its command line as `cmdline` allows), timings and age turned into timestamps.
    pub fn to_conn(&self, now: u64, proc_root: &Path, cmdline: CmdlineMode) -> Conn {
        let pid = self.pid().unwrap_or(0);
        let comm = std::fs::read_to_string(proc_root.join(pid.to_string()).join("comm"))
            .map(|c| c.trim_end().to_owned())
            .unwrap_or_default();
        let owner = Owner {
            pid,
            uid: self.uid,
            cgroup_id: 0,
            comm,
            start_boottime_ns: 0,
        };
        let ago = |s: Option<f64>| s.map_or(0, |s| now.saturating_sub((s * 1e9) as u64));
        let mut conn = Conn::new(
            self.cookie,
            self.role,
            self.transport,
            self.local.clone(),
            self.remote.clone(),
            owner,
            now,
        );
        conn.preexisting = true;
        conn.born_ns = now.saturating_sub((self.age_s * 1e9) as u64);
        conn.found_to_server_ns = ago(self.to_server_ago_s);
        conn.found_from_server_ns = ago(self.from_server_ago_s);
        if self.peer_closed {
            conn.peer_closed_ns = Some(now);
        }
        if pid != 0 {
            conn.details = read_details(proc_root, pid, cmdline);
        }
        conn
    }

    /// Seconds since any bytes moved, when known.
    pub fn idle_s(&self) -> Option<f64> {
        match (self.to_server_ago_s, self.from_server_ago_s) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// The role of a TCP socket given the watched ports, or `None` when it is not one of ours.
pub fn tcp_role(socket: &TcpSocket, ports: &[u16]) -> Option<Role> {
    if socket.state == TCP_LISTEN {
        return None;
    }
    if ports.contains(&socket.remote.port()) {
        Some(Role::Client)
    } else if ports.contains(&socket.local.port()) {
        Some(Role::Server)
    } else {
        None
    }
}

/// Pure part: TCP sockets to found connections.
pub fn tcp_connections(
    sockets: &[TcpSocket],
    ports: &[u16],
    owners: &HashMap<u64, Vec<u32>>,
    process_age: &dyn Fn(u32) -> Option<f64>,
) -> Vec<FoundConn> {
    sockets
        .iter()
        .filter(|s| s.state == sockdiag::TCP_ESTABLISHED || s.state == TCP_CLOSE_WAIT)
        .filter_map(|s| {
            let role = tcp_role(s, ports)?;
            let pids = owners.get(&s.inode).cloned().unwrap_or_default();
            let owner_age = pids.first().and_then(|&p| process_age(p));
            // `tcp_info` counts from the last data; a socket that never sent reports the time
            // since boot, hence the cap at the owner's age.
            let cap = |ms: u32| {
                let s = f64::from(ms) / 1000.0;
                owner_age.map_or(s, |age| s.min(age))
            };
            let (sent, recv) = s
                .info
                .map(|i| {
                    (
                        Some(cap(i.last_data_sent_ms)),
                        Some(cap(i.last_data_recv_ms)),
                    )
                })
                .unwrap_or((None, None));
            let (to_server, from_server) = match role {
                Role::Client => (sent, recv),
                Role::Server => (recv, sent),
            };
            let age_s = [to_server, from_server]
                .into_iter()
                .flatten()
                .fold(0.0, f64::max);
            Some(FoundConn {
                cookie: s.cookie,
                inode: s.inode,
                peer_inode: None,
                role,
                transport: Transport::Tcp,
                local: s.local.into(),
                remote: s.remote.into(),
                pids,
                uid: s.uid,
                peer_closed: s.state == TCP_CLOSE_WAIT,
                age_s,
                to_server_ago_s: to_server,
                from_server_ago_s: from_server,
            })
        })
        .collect()
}

/// Pure part: Unix connections whose socket path matches `watched`.
pub fn unix_found(
    connections: &[UnixConnection],
    watched: &dyn Fn(&str) -> bool,
    owners: &HashMap<u64, Vec<u32>>,
    uid_of: &dyn Fn(u32) -> Option<u32>,
) -> Vec<FoundConn> {
    connections
        .iter()
        .filter(|c| watched(&c.path))
        .map(|c| {
            let pids = owners.get(&c.socket.inode).cloned().unwrap_or_default();
            let role = match c.role {
                UnixRole::Client => Role::Client,
                UnixRole::Server => Role::Server,
            };
            FoundConn {
                cookie: c.socket.cookie,
                inode: c.socket.inode,
                peer_inode: c.socket.peer_inode.filter(|&i| i != 0),
                role,
                transport: Transport::Unix,
                local: unix_local(role, &c.path),
                remote: Endpoint::Unix(c.path.clone()),
                uid: pids.first().and_then(|&p| uid_of(p)).unwrap_or(0),
                pids,
                peer_closed: false,
                age_s: 0.0,
                to_server_ago_s: None,
                from_server_ago_s: None,
            }
        })
        .collect()
}

/// `local` of a Unix connection: the server end is bound to the path, the client end is
/// unnamed.
pub fn unix_local(role: Role, path: &str) -> Endpoint {
    match role {
        Role::Server => Endpoint::Unix(path.to_owned()),
        Role::Client => Endpoint::None,
    }
}

/// Real uid of a process (`/proc/<pid>/status`).
pub fn process_uid(proc_root: &Path, pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(proc_root.join(pid.to_string()).join("status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().next())
        .and_then(|uid| uid.parse().ok())
}

/// Every watched connection open on this host now.
pub fn find_connections(
    ports: &[u16],
    unix_watched: &dyn Fn(&str) -> bool,
    proc_root: &Path,
) -> Result<Vec<FoundConn>, DiagError> {
    let (tcp, unix) = sockets_in_every_netns(proc_root)?;
    let owners = socket_owners(proc_root);
    let mut found = tcp_connections(&tcp, ports, &owners, &|pid| process_age_s(proc_root, pid));
    let pairs = unix_connections(&unix);
    found.extend(unix_found(&pairs, unix_watched, &owners, &|pid| {
        process_uid(proc_root, pid)
    }));
    Ok(found)
}

/// One process per network namespace other than ours (sock_diag answers for the
/// namespace of the asking socket; containers and pods have their own).
fn other_netns_pids(proc_root: &Path) -> Vec<u32> {
    let ns_of = |pid: &str| std::fs::read_link(proc_root.join(pid).join("ns/net")).ok();
    let own = ns_of("self");
    let mut seen = std::collections::HashSet::new();
    let mut pids = Vec::new();
    for entry in std::fs::read_dir(proc_root).into_iter().flatten().flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Some(ns) = ns_of(&pid.to_string()) else {
            continue;
        };
        if Some(&ns) != own.as_ref() && seen.insert(ns) {
            pids.push(pid);
        }
    }
    pids
}

/// Runs the TCP and Unix dumps inside `pid`'s network namespace, on a thread of its own
/// (setns changes only the calling thread).
fn sockets_in_netns_of(
    proc_root: &Path,
    pid: u32,
) -> Option<(Vec<TcpSocket>, Vec<sockdiag::UnixSocket>)> {
    let ns = std::fs::File::open(proc_root.join(pid.to_string()).join("ns/net")).ok()?;
    std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        // SAFETY: a valid namespace fd; only this short-lived thread changes namespace.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return None;
        }
        Some((
            sockdiag::tcp_sockets().ok()?,
            sockdiag::unix_sockets().ok()?,
        ))
    })
    .join()
    .ok()
    .flatten()
}

/// TCP and Unix sockets of this host's namespace and of every other network namespace in
/// use (a namespace that vanishes meanwhile is skipped).
pub fn sockets_in_every_netns(
    proc_root: &Path,
) -> Result<(Vec<TcpSocket>, Vec<sockdiag::UnixSocket>), DiagError> {
    let mut tcp = sockdiag::tcp_sockets()?;
    let mut unix = sockdiag::unix_sockets()?;
    for pid in other_netns_pids(proc_root) {
        if let Some((more_tcp, more_unix)) = sockets_in_netns_of(proc_root, pid) {
            tcp.extend(more_tcp);
            unix.extend(more_unix);
        }
    }
    let mut seen = std::collections::HashSet::new();
    tcp.retain(|s| seen.insert(s.cookie));
    seen.clear();
    unix.retain(|s| seen.insert(s.cookie));
    Ok((tcp, unix))
}

/// Paths of listening Unix sockets that match `watched`: the sockets Postgres and PgBouncer
/// accept on.
pub fn watched_unix_listeners(watched: &dyn Fn(&str) -> bool) -> Result<Vec<String>, DiagError> {
    let mut paths: Vec<String> = sockdiag::unix_sockets()?
        .into_iter()
        .filter(|s| s.state == TCP_LISTEN)
        .filter_map(|s| s.path)
        .filter(|p| !p.starts_with('@') && watched(p))
        .collect();
    paths.sort();
    paths.dedup();
    Ok(paths)
}

#[cfg(test)]
mod tests;
