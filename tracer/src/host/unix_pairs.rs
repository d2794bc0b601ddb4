//! Which Unix sockets are the two ends of a connection to a listening path, and which end is
//! the client: from the socket table `sock_diag` reports (names and peers).

use std::collections::{HashMap, HashSet};

use crate::host::sockdiag::{TCP_ESTABLISHED, TCP_LISTEN, UnixSocket};

const SOCK_STREAM: u8 = libc::SOCK_STREAM as u8;
const SOCK_SEQPACKET: u8 = libc::SOCK_SEQPACKET as u8;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnixRole {
    Client,
    Server,
}

/// One end of a connected Unix stream socket and the listening path it belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnixConnection {
    pub socket: UnixSocket,
    pub role: UnixRole,
    pub path: String,
}

/// Pairs each end of the connected Unix stream sockets in `sockets` with the listening path
/// it belongs to. An accepted (server) socket carries its listener's path; a client socket
/// is usually unnamed, and its peer is a named accepted socket. A client bound to a name of
/// its own is told apart by its peer's name being a listening path. Socketpairs (both ends
/// unnamed) and ends whose peer is not in the list are left out, except a named end whose
/// peer is missing, which is taken as a server (its listener may be closed).
pub fn unix_connections(sockets: &[UnixSocket]) -> Vec<UnixConnection> {
    let connected = |s: &&UnixSocket| {
        matches!(s.socket_type, SOCK_STREAM | SOCK_SEQPACKET)
            && s.state == TCP_ESTABLISHED
            && s.inode != 0
    };
    let by_inode: HashMap<u64, &UnixSocket> = sockets
        .iter()
        .filter(|s| s.inode != 0)
        .map(|s| (s.inode, s))
        .collect();
    let listening: HashSet<&str> = sockets
        .iter()
        .filter(|s| s.state == TCP_LISTEN)
        .filter_map(|s| s.path.as_deref())
        .collect();
    let peer_of = |s: &UnixSocket| {
        s.peer_inode
            .filter(|&ino| ino != 0)
            .and_then(|ino| by_inode.get(&ino).copied())
    };
    // The server-side path of `s`, if `s` is an accepted socket.
    let server_path = |s: &UnixSocket| -> Option<String> {
        let name = s.path.as_deref()?;
        let peer_named = peer_of(s).is_some_and(|p| p.path.is_some());
        (listening.contains(name) || !peer_named).then(|| name.to_owned())
    };
    sockets
        .iter()
        .filter(connected)
        .filter_map(|s| {
            if let Some(path) = server_path(s) {
                return Some((UnixRole::Server, path, s));
            }
            let peer = peer_of(s).filter(connected)?;
            server_path(peer).map(|path| (UnixRole::Client, path, s))
        })
        .map(|(role, path, s)| UnixConnection {
            socket: s.clone(),
            role,
            path,
        })
        .collect()
}
