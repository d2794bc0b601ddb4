//! The connections the daemon knows about: a pure state machine fed with kernel events.
//! It reads no clock and touches no kernel; `apply` says what changed.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use tracer_common::{
    AF_INET6, AF_UNIX, ConnClose, ConnOpen, OPEN_FLAG_PREEXISTING, ProcInfo, SockState, closed_by,
    proto, role,
};

use crate::{
    decode::KernelEvent,
    detectors::{ConnView, Episodes, Seeded},
    endpoint::Endpoint,
    owner::ProcessDetails,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Client,
    Server,
}

impl Role {
    /// The name in events (`role`) and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Client => "client",
            Self::Server => "server",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Tcp,
    Unix,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ClosedBy {
    Local,
    Peer,
    Reset,
    Exit,
    Unknown,
}

impl ClosedBy {
    pub const ALL: [ClosedBy; 5] = [
        Self::Local,
        Self::Peer,
        Self::Reset,
        Self::Exit,
        Self::Unknown,
    ];

    /// The name in events (`closed_by`) and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Peer => "peer",
            Self::Reset => "reset",
            Self::Exit => "exit",
            Self::Unknown => "unknown",
        }
    }

    pub fn from_wire(value: u8) -> Self {
        match value {
            closed_by::LOCAL => Self::Local,
            closed_by::PEER => Self::Peer,
            closed_by::RESET => Self::Reset,
            closed_by::EXIT => Self::Exit,
            _ => Self::Unknown,
        }
    }
}

/// The process serving a connection, as the kernel saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    pub pid: u32,
    pub uid: u32,
    pub cgroup_id: u64,
    pub comm: String,
    /// Process start (ns since boot), 0 when unknown: tells a reused pid from the owner.
    pub start_boottime_ns: u64,
}

impl Owner {
    pub fn from_wire(info: &ProcInfo) -> Self {
        let end = info
            .comm
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(info.comm.len());
        Self {
            pid: info.tgid,
            uid: info.uid,
            cgroup_id: info.cgroup_id,
            comm: String::from_utf8_lossy(&info.comm[..end]).into_owned(),
            start_boottime_ns: info.start_boottime_ns,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Conn {
    /// The socket cookie.
    pub cookie: u64,
    pub role: Role,
    pub transport: Transport,
    pub local: Endpoint,
    pub remote: Endpoint,
    pub owner: Owner,
    /// What `/proc` said of the owner (filled in by the daemon).
    pub details: ProcessDetails,
    /// When the kernel first saw the socket (monotonic ns).
    pub start_ns: u64,
    /// When the connection began, or a lower bound for one found at start-up.
    pub born_ns: u64,
    /// It existed before the daemon started.
    pub preexisting: bool,
    /// The kernel table key (`struct sock` address); 0 until the kernel tracks it.
    pub sock_key: u64,
    /// When the peer closed its side, while the local side stays open.
    pub peer_closed_ns: Option<u64>,
    /// The kernel's per-connection state, as last read.
    pub live: SockState,
    /// Timings known from the socket tables for a connection found at start-up (monotonic
    /// ns); the kernel's own timings take over once it sees traffic.
    pub found_to_server_ns: u64,
    pub found_from_server_ns: u64,
    /// The state learned at start-up (process title, state file) until the kernel reads one.
    pub seeded: Option<Seeded>,
    /// Open stall / leak episodes.
    pub episodes: Episodes,
}

impl Conn {
    /// The detectors' view: timings from the client's side whatever the role.
    pub fn view(&self) -> ConnView {
        let (to_server, from_server) = match self.role {
            Role::Client => (self.live.last_send_ns, self.live.last_recv_ns),
            Role::Server => (self.live.last_recv_ns, self.live.last_send_ns),
        };
        ConnView {
            born_ns: self.born_ns,
            to_server_ns: to_server.max(self.found_to_server_ns),
            from_server_ns: from_server.max(self.found_from_server_ns),
            tx_status: self.live.tx_status,
            encrypted: self.live.proto & proto::ENCRYPTED != 0,
            peer_closed_ns: self.peer_closed_ns,
            seeded: self.seeded,
        }
    }

    pub fn new(
        cookie: u64,
        role: Role,
        transport: Transport,
        local: Endpoint,
        remote: Endpoint,
        owner: Owner,
        start_ns: u64,
    ) -> Self {
        Self {
            cookie,
            role,
            transport,
            local,
            remote,
            owner,
            details: ProcessDetails::default(),
            start_ns,
            born_ns: start_ns,
            preexisting: false,
            sock_key: 0,
            peer_closed_ns: None,
            live: SockState::default(),
            found_to_server_ns: 0,
            found_from_server_ns: 0,
            seeded: None,
            episodes: Episodes::default(),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Closed {
    pub conn: Conn,
    pub end_ns: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub closed_by: ClosedBy,
}

/// What one kernel event changed (connections named by cookie; read them with `get`).
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    Opened(u64),
    OwnerChanged(u64),
    PeerClosed(u64),
    Closed(Box<Closed>),
    /// An event for a connection the table does not know (its open was lost): counted.
    Untracked,
    /// The owner's thread paired the connection with `linked` (0: it went idle): for the
    /// pooler model (`crate::pooler`).
    Linked {
        cookie: u64,
        linked: u64,
    },
    /// The kernel now tracks a connection already known (found at start-up): its table key
    /// and, when it did I/O, its owner were updated.
    Refreshed(u64),
}

#[derive(Default)]
pub struct ConnTable {
    conns: FxHashMap<u64, Conn>,
    /// Moves on whenever a connection comes, goes or changes owner (all of which go through
    /// the table's own methods): what is derived from the table's membership alone (which
    /// processes hold both roles) need not be worked out again while it stands still.
    membership: u64,
    /// How many of the connections are Unix ones (their closes are found by a socket-table
    /// check each tick, needless when there are none).
    unix: usize,
}

fn ip_from_wire(family: u16, raw: &[u8; 16]) -> IpAddr {
    if family == AF_INET6 {
        // An IPv6 socket talking IPv4 (Java does this) shows as the IPv4 address, as the
        // other end of the same connection does.
        let v6 = Ipv6Addr::from(*raw);
        v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
    } else {
        IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]))
    }
}

impl ConnTable {
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// How many connections are over Unix sockets.
    pub fn unix_count(&self) -> usize {
        self.unix
    }

    /// See [`ConnTable::membership`]: equal values mean the same connections and owners.
    pub fn membership(&self) -> u64 {
        self.membership
    }

    pub fn get(&self, cookie: u64) -> Option<&Conn> {
        self.conns.get(&cookie)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Conn> {
        self.conns.values()
    }

    pub fn get_mut(&mut self, cookie: u64) -> Option<&mut Conn> {
        self.conns.get_mut(&cookie)
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Conn> {
        self.conns.values_mut()
    }

    /// Adds a connection found outside the kernel (at start-up); false if already known.
    ///
    /// One the kernel adopted first, from I/O between the probes' attach and the scan, is
    /// also older than the daemon: it learns what the scan knows and the kernel cannot (how
    /// old it is, when data last moved, the state seeded from its process title).
    pub fn insert_found(&mut self, found: Conn) -> bool {
        let Some(known) = self.conns.get_mut(&found.cookie) else {
            self.add(found);
            return true;
        };
        if known.preexisting {
            known.born_ns = known.born_ns.min(found.born_ns);
            known.found_to_server_ns = found.found_to_server_ns;
            known.found_from_server_ns = found.found_from_server_ns;
            known.peer_closed_ns = known.peer_closed_ns.or(found.peer_closed_ns);
            known.seeded = known.seeded.or(found.seeded);
        }
        false
    }

    /// Removes a connection whose end was noticed outside the kernel (Unix sockets).
    pub fn remove(&mut self, cookie: u64) -> Option<Conn> {
        self.membership += 1;
        let conn = self.conns.remove(&cookie)?;
        if conn.transport == Transport::Unix {
            self.unix -= 1;
        }
        Some(conn)
    }

    fn add(&mut self, conn: Conn) {
        self.membership += 1;
        if conn.transport == Transport::Unix {
            self.unix += 1;
        }
        if let Some(old) = self.conns.insert(conn.cookie, conn)
            && old.transport == Transport::Unix
        {
            self.unix -= 1;
        }
    }

    /// Applies one kernel event. `unix_path` names the socket path a Unix path hash stands for.
    pub fn apply(
        &mut self,
        event: &KernelEvent,
        unix_path: &dyn Fn(u64) -> Option<String>,
    ) -> Change {
        let cookie = event.header().cookie;
        if matches!(
            event,
            KernelEvent::Open(_) | KernelEvent::Owner(_) | KernelEvent::Close(_)
        ) {
            self.membership += 1;
        }
        match event {
            KernelEvent::Open(open) => self.apply_open(open, unix_path),
            KernelEvent::Owner(owner) => match self.conns.get_mut(&cookie) {
                Some(conn) => {
                    conn.owner = Owner::from_wire(&owner.owner);
                    Change::OwnerChanged(cookie)
                }
                None => Change::Untracked,
            },
            KernelEvent::PeerClosed(peer) => match self.conns.get_mut(&cookie) {
                Some(conn) => {
                    conn.peer_closed_ns.get_or_insert(peer.header.ts_ns);
                    Change::PeerClosed(cookie)
                }
                None => Change::Untracked,
            },
            KernelEvent::Link(link) => {
                if self.conns.contains_key(&cookie) {
                    Change::Linked {
                        cookie,
                        linked: link.linked,
                    }
                } else {
                    Change::Untracked
                }
            }
            KernelEvent::Close(close) => self.apply_close(close),
        }
    }

    /// An open adds the connection, or refreshes one already known (seeded before the kernel
    /// saw it).
    fn apply_open(&mut self, open: &ConnOpen, unix_path: &dyn Fn(u64) -> Option<String>) -> Change {
        let cookie = open.header.cookie;
        if let Some(conn) = self.conns.get_mut(&cookie) {
            conn.sock_key = open.sock_key;
            if open.owner.tgid != 0 {
                conn.owner = Owner::from_wire(&open.owner);
            }
            return Change::Refreshed(cookie);
        }
        let role = if open.role == role::SERVER {
            Role::Server
        } else {
            Role::Client
        };
        let (transport, local, remote) = endpoints(open, role, unix_path);
        let mut conn = Conn::new(
            cookie,
            role,
            transport,
            local,
            remote,
            Owner::from_wire(&open.owner),
            open.start_ns,
        );
        conn.sock_key = open.sock_key;
        conn.preexisting = open.flags & OPEN_FLAG_PREEXISTING != 0;
        self.add(conn);
        Change::Opened(cookie)
    }

    fn apply_close(&mut self, close: &ConnClose) -> Change {
        let cookie = close.header.cookie;
        match self.remove(cookie) {
            Some(mut conn) => {
                conn.live.bytes_sent = close.bytes_sent;
                conn.live.bytes_received = close.bytes_received;
                Change::Closed(Box::new(Closed {
                    end_ns: close.header.ts_ns,
                    // A connection adopted mid-stream counts bytes from adoption on; the
                    // kernel's totals are then the better figure anyway.
                    bytes_sent: close.bytes_sent,
                    bytes_received: close.bytes_received,
                    closed_by: ClosedBy::from_wire(close.closed_by),
                    conn,
                }))
            }
            None => Change::Untracked,
        }
    }
}

/// Where a new connection runs: its transport and its local and remote addresses.
fn endpoints(
    open: &ConnOpen,
    role: Role,
    unix_path: &dyn Fn(u64) -> Option<String>,
) -> (Transport, Endpoint, Endpoint) {
    if open.family == AF_UNIX {
        let hash = u64::from_ne_bytes(open.local_addr[..8].try_into().expect("8 bytes"));
        let path = unix_path(hash).unwrap_or_else(|| format!("unix-path-hash:{hash:016x}"));
        let local = if role == Role::Server {
            Endpoint::Unix(path.clone())
        } else {
            Endpoint::None
        };
        (Transport::Unix, local, Endpoint::Unix(path))
    } else {
        let local = SocketAddr::new(ip_from_wire(open.family, &open.local_addr), open.local_port);
        let remote = SocketAddr::new(
            ip_from_wire(open.family, &open.remote_addr),
            open.remote_port,
        );
        (Transport::Tcp, local.into(), remote.into())
    }
}

#[cfg(test)]
mod tests;
