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
    collections::{HashMap, HashSet},
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

// Wire layout, checked against the uapi headers with offsetof (linux/netlink.h,
// linux/sock_diag.h, linux/inet_diag.h, linux/unix_diag.h, linux/tcp.h).
const NLMSG_HDRLEN: usize = 16;
const NLMSG_NOOP: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSG_OVERRUN: u16 = 4;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300; // NLM_F_ROOT | NLM_F_MATCH
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const RTA_HDRLEN: usize = 4;
/// Attribute types may carry NLA_F_NESTED / NLA_F_NET_BYTEORDER in their top bits.
const NLA_TYPE_MASK: u16 = 0x3fff;

/// struct inet_diag_req_v2: family u8, protocol u8, ext u8, pad u8, states u32,
/// id inet_diag_sockid (48 bytes).
const INET_DIAG_REQ_V2_LEN: usize = 56;
const INET_DIAG_INFO: u16 = 2;

/// struct inet_diag_msg (72 bytes): family@0 state@1 timer@2 retrans@3,
/// id@4 { sport@4 (be16) dport@6 (be16) src@8 [16] dst@24 [16] if@40 cookie@44 [2 x u32] },
/// expires@52 rqueue@56 wqueue@60 uid@64 inode@68.
const INET_DIAG_MSG_LEN: usize = 72;
const INET_SPORT: usize = 4;
const INET_DPORT: usize = 6;
const INET_SRC: usize = 8;
const INET_DST: usize = 24;
const INET_IF: usize = 40;
const INET_COOKIE: usize = 44;
const INET_UID: usize = 64;
const INET_INODE: usize = 68;

/// struct tcp_info (232 bytes in the 6.1 headers, longer in newer kernels):
/// tcpi_last_data_sent@44, tcpi_last_ack_sent@48 (unused by the kernel),
/// tcpi_last_data_recv@52, tcpi_last_ack_recv@56, tcpi_bytes_acked@120 (u64),
/// tcpi_bytes_received@128 (u64).
const TCPI_LAST_DATA_SENT: usize = 44;
const TCPI_LAST_DATA_RECV: usize = 52;
const TCPI_LAST_ACK_RECV: usize = 56;
const TCPI_BYTES_ACKED: usize = 120;
const TCPI_BYTES_RECEIVED: usize = 128;

/// struct unix_diag_req (24 bytes): family@0 protocol@1 pad@2 states@4 ino@8 show@12
/// cookie@16 [2 x u32].
const UNIX_DIAG_REQ_LEN: usize = 24;
const UDIAG_SHOW_NAME: u32 = 0x1;
const UDIAG_SHOW_PEER: u32 = 0x4;
/// struct unix_diag_msg (16 bytes): family@0 type@1 state@2 pad@3 ino@4 cookie@8 [2 x u32].
const UNIX_DIAG_MSG_LEN: usize = 16;
const UNIX_DIAG_NAME: u16 = 0;
const UNIX_DIAG_PEER: u16 = 2;
/// "Any cookie" in an exact request (INET_DIAG_NOCOOKIE in both words).
const NO_COOKIE: u64 = u64::MAX;

const SOCK_STREAM: u8 = libc::SOCK_STREAM as u8;
const SOCK_SEQPACKET: u8 = libc::SOCK_SEQPACKET as u8;

fn align4(len: usize) -> usize {
    len.saturating_add(3) & !3
}

fn array_at<const N: usize>(b: &[u8], at: usize) -> Option<[u8; N]> {
    b.get(at..at.checked_add(N)?)?.try_into().ok()
}

fn u16_ne(b: &[u8], at: usize) -> Option<u16> {
    array_at(b, at).map(u16::from_ne_bytes)
}

fn u16_be(b: &[u8], at: usize) -> Option<u16> {
    array_at(b, at).map(u16::from_be_bytes)
}

fn u32_ne(b: &[u8], at: usize) -> Option<u32> {
    array_at(b, at).map(u32::from_ne_bytes)
}

fn i32_ne(b: &[u8], at: usize) -> Option<i32> {
    array_at(b, at).map(i32::from_ne_bytes)
}

fn u64_ne(b: &[u8], at: usize) -> Option<u64> {
    array_at(b, at).map(u64::from_ne_bytes)
}

/// The kernel writes a 64-bit cookie as two u32 words, low word first.
fn cookie_at(b: &[u8], at: usize) -> Option<u64> {
    let lo = u32_ne(b, at)?;
    let hi = u32_ne(b, at.checked_add(4)?)?;
    Some(u64::from(lo) | (u64::from(hi) << 32))
}

fn cookie_words(cookie: u64) -> [u8; 8] {
    let mut out = [0; 8];
    out[..4].copy_from_slice(&(cookie as u32).to_ne_bytes());
    out[4..].copy_from_slice(&((cookie >> 32) as u32).to_ne_bytes());
    out
}

fn nl_message(kind: u16, flags: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
    let len = NLMSG_HDRLEN + payload.len();
    let mut msg = Vec::with_capacity(len);
    msg.extend_from_slice(&(len as u32).to_ne_bytes());
    msg.extend_from_slice(&kind.to_ne_bytes());
    msg.extend_from_slice(&flags.to_ne_bytes());
    msg.extend_from_slice(&seq.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_pid: the kernel fills in ours
    msg.extend_from_slice(payload);
    msg
}

/// A dump of every TCP socket of one address family, every state, with `tcp_info`.
fn inet_dump_request(family: u8, seq: u32) -> Vec<u8> {
    let mut req = [0u8; INET_DIAG_REQ_V2_LEN];
    req[0] = family;
    req[1] = libc::IPPROTO_TCP as u8;
    req[2] = 1 << (INET_DIAG_INFO - 1); // idiag_ext
    req[4..8].copy_from_slice(&u32::MAX.to_ne_bytes()); // idiag_states: all
    // id: zeroed, which a dump ignores.
    nl_message(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, seq, &req)
}

fn unix_request(ino: u32, show: u32, cookie: u64) -> [u8; UNIX_DIAG_REQ_LEN] {
    let mut req = [0u8; UNIX_DIAG_REQ_LEN];
    req[0] = libc::AF_UNIX as u8;
    req[4..8].copy_from_slice(&u32::MAX.to_ne_bytes()); // udiag_states: all
    req[8..12].copy_from_slice(&ino.to_ne_bytes());
    req[12..16].copy_from_slice(&show.to_ne_bytes());
    req[16..24].copy_from_slice(&cookie_words(cookie));
    req
}

fn unix_dump_request(seq: u32) -> Vec<u8> {
    let req = unix_request(0, UDIAG_SHOW_NAME | UDIAG_SHOW_PEER, NO_COOKIE);
    nl_message(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, seq, &req)
}

fn unix_exact_request(seq: u32, ino: u32, cookie: u64) -> Vec<u8> {
    let req = unix_request(ino, 0, cookie);
    nl_message(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, seq, &req)
}

/// One netlink message out of a datagram.
#[derive(Debug, PartialEq, Eq)]
struct NlMsg<'a> {
    kind: u16,
    seq: u32,
    payload: &'a [u8],
}

/// The messages of one datagram. A header that does not fit ends the walk with an error:
/// nothing after it can be found again.
struct NlMessages<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for NlMessages<'a> {
    type Item = Result<NlMsg<'a>, DiagError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let buf = std::mem::take(&mut self.rest);
        let (Some(len), Some(kind), Some(seq)) = (u32_ne(buf, 0), u16_ne(buf, 4), u32_ne(buf, 8))
        else {
            return Some(Err(DiagError::Malformed("netlink header cut short")));
        };
        let len = len as usize;
        if !(NLMSG_HDRLEN..=buf.len()).contains(&len) {
            return Some(Err(DiagError::Malformed(
                "netlink message length out of bounds",
            )));
        }
        let payload = &buf[NLMSG_HDRLEN..len];
        self.rest = &buf[align4(len).min(buf.len())..];
        Some(Ok(NlMsg { kind, seq, payload }))
    }
}

/// The route attributes (`struct rtattr`) after a fixed header: (type, payload).
struct Attrs<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Attrs<'a> {
    type Item = Result<(u16, &'a [u8]), DiagError>;

    fn next(&mut self) -> Option<Self::Item> {
        // Fewer bytes than a header can only be padding.
        if self.rest.len() < RTA_HDRLEN {
            return None;
        }
        let buf = std::mem::take(&mut self.rest);
        let (Some(len), Some(kind)) = (u16_ne(buf, 0), u16_ne(buf, 2)) else {
            return Some(Err(DiagError::Malformed("attribute header cut short")));
        };
        let len = usize::from(len);
        if !(RTA_HDRLEN..=buf.len()).contains(&len) {
            return Some(Err(DiagError::Malformed("attribute length out of bounds")));
        }
        self.rest = &buf[align4(len).min(buf.len())..];
        Some(Ok((kind & NLA_TYPE_MASK, &buf[RTA_HDRLEN..len])))
    }
}

fn kernel_error(payload: &[u8]) -> Result<i32, DiagError> {
    // struct nlmsgerr starts with `int error`, 0 for an acknowledgement, else -errno.
    i32_ne(payload, 0)
        .map(i32::saturating_abs)
        .ok_or(DiagError::Malformed("NLMSG_ERROR without an error code"))
}

/// Adds one dump datagram's sockets to `out`; true once the dump is complete. Messages of
/// other requests are ignored; a socket record that does not parse is counted in `skipped`.
fn collect_dump<T>(
    datagram: &[u8],
    seq: u32,
    parse: fn(&[u8]) -> Result<T, DiagError>,
    out: &mut Vec<T>,
    skipped: &mut usize,
) -> Result<bool, DiagError> {
    for msg in (NlMessages { rest: datagram }) {
        let msg = msg?;
        if msg.seq != seq {
            continue;
        }
        match msg.kind {
            NLMSG_DONE => {
                // A dump's DONE carries the dump's result (0, or -errno).
                return match i32_ne(msg.payload, 0) {
                    Some(err) if err < 0 => Err(DiagError::Kernel {
                        errno: err.saturating_abs(),
                    }),
                    _ => Ok(true),
                };
            }
            NLMSG_ERROR => {
                return match kernel_error(msg.payload)? {
                    0 => Ok(true),
                    errno => Err(DiagError::Kernel { errno }),
                };
            }
            NLMSG_OVERRUN => return Err(DiagError::Malformed("netlink overrun")),
            SOCK_DIAG_BY_FAMILY => match parse(msg.payload) {
                Ok(sock) => out.push(sock),
                Err(err) => {
                    *skipped += 1;
                    log::debug!("sock_diag: skipping a socket record: {err}");
                }
            },
            NLMSG_NOOP => {}
            _ => {}
        }
    }
    Ok(false)
}

/// The answer to an exact Unix lookup, once the datagram holds it: the socket's record
/// (there) or ENOENT / ESTALE (gone, or its inode now names another socket).
fn exact_answer(datagram: &[u8], seq: u32) -> Result<Option<bool>, DiagError> {
    for msg in (NlMessages { rest: datagram }) {
        let msg = msg?;
        if msg.seq != seq {
            continue;
        }
        match msg.kind {
            SOCK_DIAG_BY_FAMILY => {
                parse_unix(msg.payload)?;
                return Ok(Some(true));
            }
            NLMSG_ERROR => {
                return match kernel_error(msg.payload)? {
                    libc::ENOENT | libc::ESTALE => Ok(Some(false)),
                    0 => Err(DiagError::Malformed("acknowledgement without an answer")),
                    errno => Err(DiagError::Kernel { errno }),
                };
            }
            NLMSG_DONE => return Err(DiagError::Malformed("end of dump without an answer")),
            _ => {}
        }
    }
    Ok(None)
}

fn parse_tcp_info(b: &[u8]) -> Option<TcpInfoTimes> {
    Some(TcpInfoTimes {
        last_data_sent_ms: u32_ne(b, TCPI_LAST_DATA_SENT)?,
        last_data_recv_ms: u32_ne(b, TCPI_LAST_DATA_RECV)?,
        last_ack_recv_ms: u32_ne(b, TCPI_LAST_ACK_RECV)?,
        bytes_acked: u64_ne(b, TCPI_BYTES_ACKED).unwrap_or(0),
        bytes_received: u64_ne(b, TCPI_BYTES_RECEIVED).unwrap_or(0),
    })
}

/// One `inet_diag_msg` with its attributes.
fn parse_inet(b: &[u8]) -> Result<TcpSocket, DiagError> {
    const SHORT: DiagError = DiagError::Malformed("inet_diag_msg cut short");
    let head = b.get(..INET_DIAG_MSG_LEN).ok_or(SHORT)?;
    let family = i32::from(head[0]);
    let state = head[1];
    let sport = u16_be(head, INET_SPORT).ok_or(SHORT)?;
    let dport = u16_be(head, INET_DPORT).ok_or(SHORT)?;
    let (local, remote) = match family {
        libc::AF_INET => {
            let src: [u8; 4] = array_at(head, INET_SRC).ok_or(SHORT)?;
            let dst: [u8; 4] = array_at(head, INET_DST).ok_or(SHORT)?;
            (
                SocketAddr::new(IpAddr::V4(Ipv4Addr::from(src)), sport),
                SocketAddr::new(IpAddr::V4(Ipv4Addr::from(dst)), dport),
            )
        }
        libc::AF_INET6 => {
            let src = Ipv6Addr::from(array_at::<16>(head, INET_SRC).ok_or(SHORT)?);
            let dst = Ipv6Addr::from(array_at::<16>(head, INET_DST).ok_or(SHORT)?);
            let ifindex = u32_ne(head, INET_IF).ok_or(SHORT)?;
            // The interface only means something to a link-local address.
            let scoped = |ip: Ipv6Addr, port| {
                let scope = if ip.is_unicast_link_local() {
                    ifindex
                } else {
                    0
                };
                SocketAddr::V6(SocketAddrV6::new(ip, port, 0, scope))
            };
            (scoped(src, sport), scoped(dst, dport))
        }
        _ => return Err(DiagError::Malformed("inet_diag_msg of an unknown family")),
    };
    let mut info = None;
    for attr in (Attrs {
        rest: &b[INET_DIAG_MSG_LEN..],
    }) {
        let (kind, data) = attr?;
        if kind == INET_DIAG_INFO {
            info = parse_tcp_info(data);
        }
    }
    Ok(TcpSocket {
        cookie: cookie_at(head, INET_COOKIE).ok_or(SHORT)?,
        inode: u64::from(u32_ne(head, INET_INODE).ok_or(SHORT)?),
        uid: u32_ne(head, INET_UID).ok_or(SHORT)?,
        state,
        local,
        remote,
        info,
    })
}

/// A Unix socket name as `ss` shows it: abstract names start with `@`.
fn unix_name(raw: &[u8]) -> Option<String> {
    match raw.split_first()? {
        (0, abstract_name) => {
            let shown: Vec<u8> = abstract_name
                .iter()
                .map(|&c| if c == 0 { b'@' } else { c })
                .collect();
            Some(format!("@{}", String::from_utf8_lossy(&shown)))
        }
        _ => {
            // Path names carry their terminating NUL.
            let end = raw.iter().position(|&c| c == 0).unwrap_or(raw.len());
            Some(String::from_utf8_lossy(&raw[..end]).into_owned())
        }
    }
}

/// One `unix_diag_msg` with its attributes.
fn parse_unix(b: &[u8]) -> Result<UnixSocket, DiagError> {
    const SHORT: DiagError = DiagError::Malformed("unix_diag_msg cut short");
    let head = b.get(..UNIX_DIAG_MSG_LEN).ok_or(SHORT)?;
    if i32::from(head[0]) != libc::AF_UNIX {
        return Err(DiagError::Malformed("unix_diag_msg of another family"));
    }
    let mut sock = UnixSocket {
        cookie: cookie_at(head, 8).ok_or(SHORT)?,
        inode: u64::from(u32_ne(head, 4).ok_or(SHORT)?),
        state: head[2],
        socket_type: head[1],
        path: None,
        peer_inode: None,
    };
    for attr in (Attrs {
        rest: &b[UNIX_DIAG_MSG_LEN..],
    }) {
        match attr? {
            (UNIX_DIAG_NAME, data) => sock.path = unix_name(data),
            (UNIX_DIAG_PEER, data) => {
                let peer = u32_ne(data, 0)
                    .ok_or(DiagError::Malformed("UNIX_DIAG_PEER shorter than 4 bytes"))?;
                sock.peer_inode = Some(u64::from(peer));
            }
            _ => {}
        }
    }
    Ok(sock)
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

#[cfg(test)]
mod tests;
