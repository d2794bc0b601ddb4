//! The connections the daemon knows about: a pure state machine fed with kernel events.
//! It reads no clock and touches no kernel; `apply` says what changed.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use tracer_common::{
    AF_INET6, AF_UNIX, OPEN_FLAG_PREEXISTING, ProcInfo, SockState, closed_by, proto, role,
};

use crate::{
    host::process::ProcessDetails,
    kernel::decode::KernelEvent,
    model::detectors::{ConnView, Episodes, Seeded},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Client,
    Server,
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
    fn from_wire(value: u8) -> Self {
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
    pub local: String,
    pub remote: String,
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
        local: String,
        remote: String,
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
    /// pooler model (`crate::model::pooler`).
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
            self.conns.insert(found.cookie, found);
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
        self.conns.remove(&cookie)
    }

    /// Applies one kernel event. `unix_path` names the socket path a Unix path hash stands for.
    pub fn apply(
        &mut self,
        event: &KernelEvent,
        unix_path: &dyn Fn(u64) -> Option<String>,
    ) -> Change {
        let cookie = event.header().cookie;
        match event {
            KernelEvent::Open(open) => {
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
                let (transport, local, remote) = if open.family == AF_UNIX {
                    let hash =
                        u64::from_ne_bytes(open.local_addr[..8].try_into().expect("8 bytes"));
                    let path =
                        unix_path(hash).unwrap_or_else(|| format!("unix-path-hash:{hash:016x}"));
                    let local = if role == Role::Server {
                        path.clone()
                    } else {
                        String::new()
                    };
                    (Transport::Unix, local, path)
                } else {
                    let local = SocketAddr::new(
                        ip_from_wire(open.family, &open.local_addr),
                        open.local_port,
                    );
                    let remote = SocketAddr::new(
                        ip_from_wire(open.family, &open.remote_addr),
                        open.remote_port,
                    );
                    (Transport::Tcp, local.to_string(), remote.to_string())
                };
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
                self.conns.insert(cookie, conn);
                Change::Opened(cookie)
            }
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
            KernelEvent::Close(close) => match self.conns.remove(&cookie) {
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
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracer_common::{
        AF_INET, ConnClose, ConnOpen, ConnOwner, ConnPeerClosed, EventHeader, kind,
    };

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
        assert_eq!(conn.local, "127.0.0.1:40000");
        assert_eq!(conn.remote, "127.0.0.1:5432");
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
        assert_eq!(table.get(2).expect("v6").remote, "[::1]:5432");

        let mut unix = open_v4(3);
        unix.family = AF_UNIX;
        unix.role = role::SERVER;
        unix.local_addr = [0; 16];
        unix.local_addr[..8].copy_from_slice(&0xabc_u64.to_ne_bytes());
        table.apply(&KernelEvent::Open(unix), &paths);
        let conn = table.get(3).expect("unix");
        assert_eq!(conn.transport, Transport::Unix);
        assert_eq!(conn.local, "/run/postgresql/.s.PGSQL.5432");
        assert_eq!(conn.remote, "/run/postgresql/.s.PGSQL.5432");
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
                state: crate::model::detectors::ConnState::IdleInTransaction,
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
}
