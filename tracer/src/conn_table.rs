//! The connections the daemon knows about: a pure state machine fed with kernel events.
//! It reads no clock and touches no kernel; `apply` says what changed.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use serde::Serialize;
use tracer_common::{AF_INET6, ProcInfo, closed_by, role};

use crate::decode::KernelEvent;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Client,
    Server,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Tcp,
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
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conn {
    /// The socket cookie.
    pub cookie: u64,
    pub role: Role,
    pub transport: Transport,
    pub local: String,
    pub remote: String,
    pub owner: Owner,
    /// When the kernel first saw the socket (monotonic ns).
    pub start_ns: u64,
    /// The peer closed its side while the local side is open.
    pub peer_closed: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Closed {
    pub conn: Conn,
    pub end_ns: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub closed_by: ClosedBy,
}

/// What one kernel event changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Opened(Conn),
    OwnerChanged(Conn),
    PeerClosed(Conn),
    Closed(Closed),
    /// An event for a connection the table does not know (its open was lost): counted.
    Untracked,
    /// A second open for a connection already known: ignored.
    Duplicate,
}

#[derive(Default)]
pub struct ConnTable {
    conns: HashMap<u64, Conn>,
}

fn ip_from_wire(family: u16, raw: &[u8; 16]) -> IpAddr {
    if family == AF_INET6 {
        IpAddr::V6(Ipv6Addr::from(*raw))
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

    pub fn apply(&mut self, event: &KernelEvent) -> Change {
        let cookie = event.header().cookie;
        match event {
            KernelEvent::Open(open) => {
                if self.conns.contains_key(&cookie) {
                    return Change::Duplicate;
                }
                let local =
                    SocketAddr::new(ip_from_wire(open.family, &open.local_addr), open.local_port);
                let remote = SocketAddr::new(
                    ip_from_wire(open.family, &open.remote_addr),
                    open.remote_port,
                );
                let conn = Conn {
                    cookie,
                    role: if open.role == role::SERVER {
                        Role::Server
                    } else {
                        Role::Client
                    },
                    transport: Transport::Tcp,
                    local: local.to_string(),
                    remote: remote.to_string(),
                    owner: Owner::from_wire(&open.owner),
                    start_ns: open.start_ns,
                    peer_closed: false,
                };
                self.conns.insert(cookie, conn.clone());
                Change::Opened(conn)
            }
            KernelEvent::Owner(owner) => match self.conns.get_mut(&cookie) {
                Some(conn) => {
                    conn.owner = Owner::from_wire(&owner.owner);
                    Change::OwnerChanged(conn.clone())
                }
                None => Change::Untracked,
            },
            KernelEvent::PeerClosed(_) => match self.conns.get_mut(&cookie) {
                Some(conn) => {
                    conn.peer_closed = true;
                    Change::PeerClosed(conn.clone())
                }
                None => Change::Untracked,
            },
            KernelEvent::Close(close) => match self.conns.remove(&cookie) {
                Some(conn) => Change::Closed(Closed {
                    conn,
                    end_ns: close.header.ts_ns,
                    bytes_sent: close.bytes_sent,
                    bytes_received: close.bytes_received,
                    closed_by: ClosedBy::from_wire(close.closed_by),
                }),
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

    fn open_v4(cookie: u64) -> KernelEvent {
        let mut local_addr = [0; 16];
        local_addr[..4].copy_from_slice(&[127, 0, 0, 1]);
        KernelEvent::Open(ConnOpen {
            header: header(kind::CONN_OPEN, cookie, 1_000),
            owner: proc(10, "psql"),
            start_ns: 900,
            family: AF_INET,
            local_port: 40000,
            remote_port: 5432,
            role: role::CLIENT,
            local_addr,
            remote_addr: local_addr,
            ..ConnOpen::default()
        })
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
        let Change::Opened(conn) = table.apply(&open_v4(1)) else {
            panic!("not opened")
        };
        assert_eq!(conn.local, "127.0.0.1:40000");
        assert_eq!(conn.remote, "127.0.0.1:5432");
        assert_eq!(conn.owner.comm, "psql");
        assert_eq!(conn.role, Role::Client);
        assert_eq!(table.len(), 1);
        let Change::Closed(closed) = table.apply(&close(1, closed_by::PEER)) else {
            panic!("not closed")
        };
        assert_eq!((closed.bytes_sent, closed.bytes_received), (11, 22));
        assert_eq!(closed.closed_by, ClosedBy::Peer);
        assert_eq!(closed.end_ns, 5_000);
        assert!(table.is_empty());
    }

    #[test]
    fn ipv6_addresses_are_bracketed() {
        let mut table = ConnTable::default();
        let mut v6 = [0u8; 16];
        v6[15] = 1;
        let KernelEvent::Open(mut open) = open_v4(2) else {
            unreachable!()
        };
        open.family = AF_INET6;
        open.local_addr = v6;
        open.remote_addr = v6;
        let Change::Opened(conn) = table.apply(&KernelEvent::Open(open)) else {
            panic!()
        };
        assert_eq!(conn.remote, "[::1]:5432");
    }

    #[test]
    fn duplicate_and_untracked_events_change_nothing() {
        let mut table = ConnTable::default();
        table.apply(&open_v4(3));
        assert_eq!(table.apply(&open_v4(3)), Change::Duplicate);
        assert_eq!(table.apply(&close(99, closed_by::LOCAL)), Change::Untracked);
        let peer = KernelEvent::PeerClosed(ConnPeerClosed {
            header: header(kind::CONN_PEER_CLOSED, 98, 0),
        });
        assert_eq!(table.apply(&peer), Change::Untracked);
        assert_eq!(table.len(), 1);
    }

    #[test]
    fn owner_moves_with_the_io() {
        let mut table = ConnTable::default();
        table.apply(&open_v4(4));
        let moved = KernelEvent::Owner(ConnOwner {
            header: header(kind::CONN_OWNER, 4, 2_000),
            owner: proc(11, "worker"),
        });
        let Change::OwnerChanged(conn) = table.apply(&moved) else {
            panic!()
        };
        assert_eq!((conn.owner.pid, conn.owner.comm.as_str()), (11, "worker"));
        let Change::Closed(closed) = table.apply(&close(4, closed_by::EXIT)) else {
            panic!()
        };
        assert_eq!(closed.conn.owner.pid, 11);
        assert_eq!(closed.closed_by, ClosedBy::Exit);
    }

    #[test]
    fn peer_close_is_remembered_and_unknown_causes_map_to_unknown() {
        let mut table = ConnTable::default();
        table.apply(&open_v4(5));
        let peer = KernelEvent::PeerClosed(ConnPeerClosed {
            header: header(kind::CONN_PEER_CLOSED, 5, 0),
        });
        let Change::PeerClosed(conn) = table.apply(&peer) else {
            panic!()
        };
        assert!(conn.peer_closed);
        let Change::Closed(closed) = table.apply(&close(5, 200)) else {
            panic!()
        };
        assert_eq!(closed.closed_by, ClosedBy::Unknown);
    }
}
