//! The sockets that exist right now, as the kernel's socket diagnostics report them
//! (`NETLINK_SOCK_DIAG`): TCP over IPv4 and IPv6 with the times from `tcp_info`, and Unix
//! sockets with their names and peers.
//!
//! The daemon uses it at start-up to find connections older than itself, `tracer list` to
//! show them, and periodically to notice Unix connections that are gone (Unix sockets have
//! no close probe as cheap as TCP's state change). Requests are built and answers parsed as
//! plain bytes, bounds-checked, so that all of the parsing is testable without a kernel; one
//! netlink socket is the only system contact.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::Duration,
};

use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum DiagError {
    #[error("{op} on the sock_diag netlink socket failed: {}", os_error(.errno))]
    Sys { op: &'static str, errno: i32 },
    #[error("the kernel refused the sock_diag request: {}", os_error(.errno))]
    Kernel { errno: i32 },
    #[error("malformed sock_diag answer: {0}")]
    Malformed(&'static str),
    #[error("sock_diag datagram of {0} bytes does not fit the receive buffer")]
    Truncated(usize),
}

fn os_error(errno: &i32) -> std::io::Error {
    std::io::Error::from_raw_os_error(*errno)
}

fn last_errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// Kernel TCP state numbers; Unix sockets report the same ones.
pub use tracer_common::tcp_state::{
    CLOSE_WAIT as TCP_CLOSE_WAIT, ESTABLISHED as TCP_ESTABLISHED, LISTEN as TCP_LISTEN,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpInfoTimes {
    pub last_data_sent_ms: u32,
    pub last_data_recv_ms: u32,
    pub last_ack_recv_ms: u32,
    /// 0 when the kernel's `tcp_info` is too old to carry it (before 4.1).
    pub bytes_acked: u64,
    /// 0 when the kernel's `tcp_info` is too old to carry it (before 4.1).
    pub bytes_received: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpSocket {
    /// The socket cookie, the same value `bpf_get_socket_cookie` and `SO_COOKIE` give.
    pub cookie: u64,
    /// 0 for sockets without a file (time-wait and request sockets).
    pub inode: u64,
    pub uid: u32,
    pub state: u8,
    /// IPv4 for AF_INET sockets, IPv6 (v4-mapped addresses included) for AF_INET6 ones.
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// From `INET_DIAG_INFO`; absent for time-wait and request sockets.
    pub info: Option<TcpInfoTimes>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnixSocket {
    pub cookie: u64,
    pub inode: u64,
    /// `TCP_LISTEN`, `TCP_ESTABLISHED`, or 7 (`TCP_CLOSE`) for unconnected sockets.
    pub state: u8,
    /// `SOCK_STREAM` = 1, `SOCK_DGRAM` = 2, `SOCK_SEQPACKET` = 5.
    pub socket_type: u8,
    /// `UNIX_DIAG_NAME`: the bound path, abstract names with a leading `@` (and any NUL in
    /// them shown as `@`, like `ss`); `None` when unnamed.
    pub path: Option<String>,
    /// `UNIX_DIAG_PEER`: the peer's inode. `Some(0)` when there is a peer that has no
    /// inode: a connection not yet accepted, or a peer end already closed.
    pub peer_inode: Option<u64>,
}

/// All TCP sockets (IPv4 and IPv6, every state), with `tcp_info` times where there are any.
pub fn tcp_sockets() -> Result<Vec<TcpSocket>, DiagError> {
    DiagSocket::open()?.tcp_sockets()
}

/// All Unix sockets (every state, every type), with their names and peers.
pub fn unix_sockets() -> Result<Vec<UnixSocket>, DiagError> {
    DiagSocket::open()?.unix_sockets()
}

/// Exact lookup: is the Unix socket with this inode and cookie still there? The cookie
/// guards against a reused inode number.
pub fn unix_socket_exists(inode: u64, cookie: u64) -> Result<bool, DiagError> {
    DiagSocket::open()?.unix_socket_exists(inode, cookie)
}

/// A sock_diag netlink socket, kept open for repeated requests (the periodic Unix check).
pub struct DiagSocket {
    fd: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
    /// A request failed part-way: the kernel may still hold a dump in progress, which would
    /// make the next dump fail with EBUSY. Start over with a fresh socket.
    poisoned: bool,
}

/// Large enough for any dump datagram: the kernel caps them at 32 KiB.
const RECV_BUF_LEN: usize = 64 * 1024;
const RECV_TIMEOUT: Duration = Duration::from_secs(5);

impl DiagSocket {
    pub fn open() -> Result<Self, DiagError> {
        // SAFETY: socket(2) with constant arguments; the result is checked before use.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                libc::NETLINK_SOCK_DIAG,
            )
        };
        if raw < 0 {
            return Err(DiagError::Sys {
                op: "socket",
                errno: last_errno(),
            });
        }
        // SAFETY: `raw` is a descriptor just returned by socket(2) that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // The kernel always answers; the timeout only guards against a wedged dump.
        let tv = libc::timeval {
            tv_sec: RECV_TIMEOUT.as_secs() as libc::time_t,
            tv_usec: 0,
        };
        // SAFETY: `tv` is a valid timeval that outlives the call; the length matches it.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(DiagError::Sys {
                op: "setsockopt(SO_RCVTIMEO)",
                errno: last_errno(),
            });
        }
        Ok(Self {
            fd,
            seq: 0,
            buf: vec![0; RECV_BUF_LEN],
            poisoned: false,
        })
    }

    pub fn tcp_sockets(&mut self) -> Result<Vec<TcpSocket>, DiagError> {
        let mut out = self.dump(
            |seq| inet_dump_request(libc::AF_INET as u8, seq),
            parse_inet,
        )?;
        out.extend(self.dump(
            |seq| inet_dump_request(libc::AF_INET6 as u8, seq),
            parse_inet,
        )?);
        Ok(out)
    }

    pub fn unix_sockets(&mut self) -> Result<Vec<UnixSocket>, DiagError> {
        self.dump(unix_dump_request, parse_unix)
    }

    pub fn unix_socket_exists(&mut self, inode: u64, cookie: u64) -> Result<bool, DiagError> {
        // Socket inodes come from a 32-bit counter, and 0 is the kernel's "no inode".
        let Ok(ino) = u32::try_from(inode) else {
            return Ok(false);
        };
        if ino == 0 {
            return Ok(false);
        }
        self.guarded(|me| {
            let seq = me.next_seq();
            me.send(&unix_exact_request(seq, ino, cookie))?;
            loop {
                let n = me.recv()?;
                if let Some(found) = exact_answer(&me.buf[..n], seq)? {
                    return Ok(found);
                }
            }
        })
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    fn guarded<R>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<R, DiagError>,
    ) -> Result<R, DiagError> {
        if self.poisoned {
            *self = Self::open()?;
        }
        let result = f(self);
        if result.is_err() {
            self.poisoned = true;
        }
        result
    }

    fn dump<T>(
        &mut self,
        request: impl FnOnce(u32) -> Vec<u8>,
        parse: fn(&[u8]) -> Result<T, DiagError>,
    ) -> Result<Vec<T>, DiagError> {
        self.guarded(|me| {
            let seq = me.next_seq();
            me.send(&request(seq))?;
            let mut out = Vec::new();
            let mut skipped = 0;
            loop {
                let n = me.recv()?;
                if collect_dump(&me.buf[..n], seq, parse, &mut out, &mut skipped)? {
                    break;
                }
            }
            if skipped > 0 {
                log::warn!("sock_diag: skipped {skipped} malformed socket record(s)");
            }
            Ok(out)
        })
    }

    fn send(&self, msg: &[u8]) -> Result<(), DiagError> {
        // SAFETY: sockaddr_nl is plain integers, for which all-zero bytes are valid.
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        loop {
            // SAFETY: `msg` and `kernel` are valid for the lengths passed and outlive the
            // call; the kernel only reads them.
            let n = unsafe {
                libc::sendto(
                    self.fd.as_raw_fd(),
                    msg.as_ptr().cast(),
                    msg.len(),
                    0,
                    (&raw const kernel).cast(),
                    size_of::<libc::sockaddr_nl>() as libc::socklen_t,
                )
            };
            if n < 0 {
                let errno = last_errno();
                if errno == libc::EINTR {
                    continue;
                }
                return Err(DiagError::Sys {
                    op: "sendto",
                    errno,
                });
            }
            if n as usize != msg.len() {
                return Err(DiagError::Sys {
                    op: "sendto",
                    errno: libc::EMSGSIZE,
                });
            }
            return Ok(());
        }
    }

    /// Receives one datagram from the kernel into `self.buf`; returns its length.
    fn recv(&mut self) -> Result<usize, DiagError> {
        loop {
            // SAFETY: as in `send`, all-zero bytes are a valid sockaddr_nl.
            let mut from: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
            let mut from_len = size_of::<libc::sockaddr_nl>() as libc::socklen_t;
            // SAFETY: `buf` is writable for its length, `from`/`from_len` describe a valid
            // sockaddr_nl; all outlive the call. MSG_TRUNC makes the kernel return the real
            // datagram length, so a cut datagram is detected rather than parsed.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    self.buf.as_mut_ptr().cast(),
                    self.buf.len(),
                    libc::MSG_TRUNC,
                    (&raw mut from).cast(),
                    &raw mut from_len,
                )
            };
            if n < 0 {
                let errno = last_errno();
                if errno == libc::EINTR {
                    continue;
                }
                return Err(DiagError::Sys {
                    op: "recvfrom",
                    errno,
                });
            }
            let n = n as usize;
            if n > self.buf.len() {
                return Err(DiagError::Truncated(n));
            }
            // Only the kernel (port 0) answers sock_diag requests.
            if from.nl_pid != 0 {
                continue;
            }
            return Ok(n);
        }
    }
}

mod wire;
use wire::*;

#[cfg(test)]
mod tests;
