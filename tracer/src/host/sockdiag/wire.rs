//! The sock_diag wire format: netlink requests built and answers parsed as plain bytes,
//! bounds-checked, so that all of it is testable without a kernel.

use super::*;

// Wire layout, checked against the uapi headers with offsetof (linux/netlink.h,
// linux/sock_diag.h, linux/inet_diag.h, linux/unix_diag.h, linux/tcp.h).
pub(super) const NLMSG_HDRLEN: usize = 16;
pub(super) const NLMSG_NOOP: u16 = 1;
pub(super) const NLMSG_ERROR: u16 = 2;
pub(super) const NLMSG_DONE: u16 = 3;
pub(super) const NLMSG_OVERRUN: u16 = 4;
pub(super) const NLM_F_REQUEST: u16 = 0x1;
pub(super) const NLM_F_DUMP: u16 = 0x300; // NLM_F_ROOT | NLM_F_MATCH
pub(super) const SOCK_DIAG_BY_FAMILY: u16 = 20;
pub(super) const RTA_HDRLEN: usize = 4;
/// Attribute types may carry NLA_F_NESTED / NLA_F_NET_BYTEORDER in their top bits.
pub(super) const NLA_TYPE_MASK: u16 = 0x3fff;

/// struct inet_diag_req_v2: family u8, protocol u8, ext u8, pad u8, states u32,
/// id inet_diag_sockid (48 bytes).
pub(super) const INET_DIAG_REQ_V2_LEN: usize = 56;
pub(super) const INET_DIAG_INFO: u16 = 2;

/// struct inet_diag_msg (72 bytes): family@0 state@1 timer@2 retrans@3,
/// id@4 { sport@4 (be16) dport@6 (be16) src@8 [16] dst@24 [16] if@40 cookie@44 [2 x u32] },
/// expires@52 rqueue@56 wqueue@60 uid@64 inode@68.
pub(super) const INET_DIAG_MSG_LEN: usize = 72;
pub(super) const INET_SPORT: usize = 4;
pub(super) const INET_DPORT: usize = 6;
pub(super) const INET_SRC: usize = 8;
pub(super) const INET_DST: usize = 24;
pub(super) const INET_IF: usize = 40;
pub(super) const INET_COOKIE: usize = 44;
pub(super) const INET_UID: usize = 64;
pub(super) const INET_INODE: usize = 68;

/// struct tcp_info (232 bytes in the 6.1 headers, longer in newer kernels):
/// tcpi_last_data_sent@44, tcpi_last_ack_sent@48 (unused by the kernel),
/// tcpi_last_data_recv@52, tcpi_last_ack_recv@56, tcpi_bytes_acked@120 (u64),
/// tcpi_bytes_received@128 (u64).
pub(super) const TCPI_LAST_DATA_SENT: usize = 44;
pub(super) const TCPI_LAST_DATA_RECV: usize = 52;
pub(super) const TCPI_LAST_ACK_RECV: usize = 56;
pub(super) const TCPI_BYTES_ACKED: usize = 120;
pub(super) const TCPI_BYTES_RECEIVED: usize = 128;

/// struct unix_diag_req (24 bytes): family@0 protocol@1 pad@2 states@4 ino@8 show@12
/// cookie@16 [2 x u32].
pub(super) const UNIX_DIAG_REQ_LEN: usize = 24;
pub(super) const UDIAG_SHOW_NAME: u32 = 0x1;
pub(super) const UDIAG_SHOW_PEER: u32 = 0x4;
/// struct unix_diag_msg (16 bytes): family@0 type@1 state@2 pad@3 ino@4 cookie@8 [2 x u32].
pub(super) const UNIX_DIAG_MSG_LEN: usize = 16;
pub(super) const UNIX_DIAG_NAME: u16 = 0;
pub(super) const UNIX_DIAG_PEER: u16 = 2;
/// "Any cookie" in an exact request (INET_DIAG_NOCOOKIE in both words).
pub(super) const NO_COOKIE: u64 = u64::MAX;

pub(super) fn align4(len: usize) -> usize {
    len.saturating_add(3) & !3
}

pub(super) fn array_at<const N: usize>(b: &[u8], at: usize) -> Option<[u8; N]> {
    b.get(at..at.checked_add(N)?)?.try_into().ok()
}

pub(super) fn u16_ne(b: &[u8], at: usize) -> Option<u16> {
    array_at(b, at).map(u16::from_ne_bytes)
}

pub(super) fn u16_be(b: &[u8], at: usize) -> Option<u16> {
    array_at(b, at).map(u16::from_be_bytes)
}

pub(super) fn u32_ne(b: &[u8], at: usize) -> Option<u32> {
    array_at(b, at).map(u32::from_ne_bytes)
}

pub(super) fn i32_ne(b: &[u8], at: usize) -> Option<i32> {
    array_at(b, at).map(i32::from_ne_bytes)
}

pub(super) fn u64_ne(b: &[u8], at: usize) -> Option<u64> {
    array_at(b, at).map(u64::from_ne_bytes)
}

/// The kernel writes a 64-bit cookie as two u32 words, low word first.
pub(super) fn cookie_at(b: &[u8], at: usize) -> Option<u64> {
    let lo = u32_ne(b, at)?;
    let hi = u32_ne(b, at.checked_add(4)?)?;
    Some(u64::from(lo) | (u64::from(hi) << 32))
}

pub(super) fn cookie_words(cookie: u64) -> [u8; 8] {
    let mut out = [0; 8];
    out[..4].copy_from_slice(&(cookie as u32).to_ne_bytes());
    out[4..].copy_from_slice(&((cookie >> 32) as u32).to_ne_bytes());
    out
}

pub(super) fn nl_message(kind: u16, flags: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
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
pub(super) fn inet_dump_request(family: u8, seq: u32) -> Vec<u8> {
    let mut req = [0u8; INET_DIAG_REQ_V2_LEN];
    req[0] = family;
    req[1] = libc::IPPROTO_TCP as u8;
    req[2] = 1 << (INET_DIAG_INFO - 1); // idiag_ext
    req[4..8].copy_from_slice(&u32::MAX.to_ne_bytes()); // idiag_states: all
    // id: zeroed, which a dump ignores.
    nl_message(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, seq, &req)
}

pub(super) fn unix_request(ino: u32, show: u32, cookie: u64) -> [u8; UNIX_DIAG_REQ_LEN] {
    let mut req = [0u8; UNIX_DIAG_REQ_LEN];
    req[0] = libc::AF_UNIX as u8;
    req[4..8].copy_from_slice(&u32::MAX.to_ne_bytes()); // udiag_states: all
    req[8..12].copy_from_slice(&ino.to_ne_bytes());
    req[12..16].copy_from_slice(&show.to_ne_bytes());
    req[16..24].copy_from_slice(&cookie_words(cookie));
    req
}

pub(super) fn unix_dump_request(seq: u32) -> Vec<u8> {
    let req = unix_request(0, UDIAG_SHOW_NAME | UDIAG_SHOW_PEER, NO_COOKIE);
    nl_message(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, seq, &req)
}

pub(super) fn unix_exact_request(seq: u32, ino: u32, cookie: u64) -> Vec<u8> {
    let req = unix_request(ino, 0, cookie);
    nl_message(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, seq, &req)
}

/// One netlink message out of a datagram.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct NlMsg<'a> {
    kind: u16,
    seq: u32,
    payload: &'a [u8],
}

/// The messages of one datagram. A header that does not fit ends the walk with an error:
/// nothing after it can be found again.
pub(super) struct NlMessages<'a> {
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
pub(super) struct Attrs<'a> {
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

pub(super) fn kernel_error(payload: &[u8]) -> Result<i32, DiagError> {
    // struct nlmsgerr starts with `int error`, 0 for an acknowledgement, else -errno.
    i32_ne(payload, 0)
        .map(i32::saturating_abs)
        .ok_or(DiagError::Malformed("NLMSG_ERROR without an error code"))
}

/// Adds one dump datagram's sockets to `out`; true once the dump is complete. Messages of
/// other requests are ignored; a socket record that does not parse is counted in `skipped`.
pub(super) fn collect_dump<T>(
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
pub(super) fn exact_answer(datagram: &[u8], seq: u32) -> Result<Option<bool>, DiagError> {
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

pub(super) fn parse_tcp_info(b: &[u8]) -> Option<TcpInfoTimes> {
    Some(TcpInfoTimes {
        last_data_sent_ms: u32_ne(b, TCPI_LAST_DATA_SENT)?,
        last_data_recv_ms: u32_ne(b, TCPI_LAST_DATA_RECV)?,
        last_ack_recv_ms: u32_ne(b, TCPI_LAST_ACK_RECV)?,
        bytes_acked: u64_ne(b, TCPI_BYTES_ACKED).unwrap_or(0),
        bytes_received: u64_ne(b, TCPI_BYTES_RECEIVED).unwrap_or(0),
    })
}

/// One `inet_diag_msg` with its attributes.
pub(super) fn parse_inet(b: &[u8]) -> Result<TcpSocket, DiagError> {
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
pub(super) fn unix_name(raw: &[u8]) -> Option<String> {
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
pub(super) fn parse_unix(b: &[u8]) -> Result<UnixSocket, DiagError> {
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
