#![allow(
    clippy::let_underscore_must_use,
    reason = "clean-up of processes, sockets and files that may be gone already, and calls made only to show they do not panic: their results are ignored on purpose"
)]
use super::*;
use crate::host::unix_pairs::*;
use std::collections::HashSet;

// ---- building answers the way the kernel does ----

fn attr(kind: u16, data: &[u8]) -> Vec<u8> {
    let mut a = Vec::new();
    a.extend_from_slice(&((RTA_HDRLEN + data.len()) as u16).to_ne_bytes());
    a.extend_from_slice(&kind.to_ne_bytes());
    a.extend_from_slice(data);
    a.resize(align4(a.len()), 0);
    a
}

fn datagram(msgs: &[Vec<u8>]) -> Vec<u8> {
    let mut d = Vec::new();
    for m in msgs {
        d.extend_from_slice(m);
        d.resize(align4(d.len()), 0);
    }
    d
}

fn tcp_info_bytes(len: usize) -> Vec<u8> {
    let mut info = vec![0u8; len];
    let mut put = |at: usize, v: &[u8]| {
        if at + v.len() <= len {
            info[at..at + v.len()].copy_from_slice(v);
        }
    };
    put(TCPI_LAST_DATA_SENT, &11u32.to_ne_bytes());
    put(48, &99u32.to_ne_bytes()); // tcpi_last_ack_sent: must not be read
    put(TCPI_LAST_DATA_RECV, &22u32.to_ne_bytes());
    put(TCPI_LAST_ACK_RECV, &33u32.to_ne_bytes());
    put(TCPI_BYTES_ACKED, &4444u64.to_ne_bytes());
    put(TCPI_BYTES_RECEIVED, &5555u64.to_ne_bytes());
    info
}

#[expect(
    clippy::too_many_arguments,
    reason = "one argument per wire field under test"
)]
fn inet_msg(
    family: u8,
    state: u8,
    src: &[u8],
    sport: u16,
    dst: &[u8],
    dport: u16,
    cookie: u64,
    inode: u32,
    info: Option<&[u8]>,
) -> Vec<u8> {
    let mut m = vec![0u8; INET_DIAG_MSG_LEN];
    m[0] = family;
    m[1] = state;
    m[INET_SPORT..INET_SPORT + 2].copy_from_slice(&sport.to_be_bytes());
    m[INET_DPORT..INET_DPORT + 2].copy_from_slice(&dport.to_be_bytes());
    m[INET_SRC..INET_SRC + src.len()].copy_from_slice(src);
    m[INET_DST..INET_DST + dst.len()].copy_from_slice(dst);
    m[INET_COOKIE..INET_COOKIE + 8].copy_from_slice(&cookie_words(cookie));
    m[INET_UID..INET_UID + 4].copy_from_slice(&1000u32.to_ne_bytes());
    m[INET_INODE..INET_INODE + 4].copy_from_slice(&inode.to_ne_bytes());
    if let Some(info) = info {
        m.extend(attr(1, &[7; 20])); // INET_DIAG_MEMINFO, ignored
        m.extend(attr(INET_DIAG_INFO, info));
    }
    m
}

fn unix_msg(
    ty: u8,
    state: u8,
    ino: u32,
    cookie: u64,
    name: Option<&[u8]>,
    peer: Option<u32>,
) -> Vec<u8> {
    let mut m = vec![libc::AF_UNIX as u8, ty, state, 0];
    m.extend_from_slice(&ino.to_ne_bytes());
    m.extend_from_slice(&cookie_words(cookie));
    if let Some(name) = name {
        m.extend(attr(UNIX_DIAG_NAME, name));
    }
    if let Some(peer) = peer {
        m.extend(attr(UNIX_DIAG_PEER, &peer.to_ne_bytes()));
    }
    m
}

fn done(seq: u32) -> Vec<u8> {
    nl_message(NLMSG_DONE, 0x2, seq, &0i32.to_ne_bytes())
}

fn error(seq: u32, err: i32) -> Vec<u8> {
    let mut p = err.to_ne_bytes().to_vec();
    p.extend_from_slice(&[0; NLMSG_HDRLEN]); // the request's header, echoed
    nl_message(NLMSG_ERROR, 0, seq, &p)
}

fn two_tcp_sockets(seq: u32) -> Vec<u8> {
    let v4 = inet_msg(
        libc::AF_INET as u8,
        TCP_ESTABLISHED,
        &[127, 0, 0, 1],
        5432,
        &[127, 0, 0, 2],
        40000,
        0x1122_3344_5566_7788,
        4242,
        Some(&tcp_info_bytes(232)),
    );
    let v6 = inet_msg(
        libc::AF_INET6 as u8,
        TCP_LISTEN,
        &Ipv6Addr::from([0, 0, 0, 0, 0, 0xffff, 0x7f00, 1]).octets(),
        6432,
        &[0; 16],
        0,
        7,
        0,
        Some(&tcp_info_bytes(104)), // a tcp_info from before bytes_acked
    );
    datagram(&[
        nl_message(SOCK_DIAG_BY_FAMILY, 0x2, seq, &v4),
        nl_message(SOCK_DIAG_BY_FAMILY, 0x2, seq, &v6),
    ])
}

fn collect_tcp(d: &[u8], seq: u32) -> (Result<bool, DiagError>, Vec<TcpSocket>, usize) {
    let mut out = Vec::new();
    let mut skipped = 0;
    let r = collect_dump(d, seq, parse_inet, &mut out, &mut skipped);
    (r, out, skipped)
}

// ---- requests ----

#[test]
fn requests_have_the_uapi_layout() {
    let r = inet_dump_request(libc::AF_INET6 as u8, 9);
    assert_eq!(r.len(), NLMSG_HDRLEN + INET_DIAG_REQ_V2_LEN);
    assert_eq!(u32_ne(&r, 0), Some(72));
    assert_eq!(u16_ne(&r, 4), Some(SOCK_DIAG_BY_FAMILY));
    assert_eq!(u16_ne(&r, 6), Some(0x301));
    assert_eq!(u32_ne(&r, 8), Some(9));
    assert_eq!(&r[16..20], &[libc::AF_INET6 as u8, 6, 0b10, 0]);
    assert_eq!(u32_ne(&r, 20), Some(u32::MAX));
    assert!(r[24..].iter().all(|&b| b == 0));

    let r = unix_exact_request(3, 0xabcd, 0x0000_0002_0000_0001);
    assert_eq!(r.len(), NLMSG_HDRLEN + UNIX_DIAG_REQ_LEN);
    assert_eq!(u16_ne(&r, 6), Some(NLM_F_REQUEST)); // no NLM_F_DUMP
    assert_eq!(r[16], libc::AF_UNIX as u8);
    assert_eq!(u32_ne(&r, 24), Some(0xabcd));
    assert_eq!(u32_ne(&r, 28), Some(0)); // udiag_show
    assert_eq!((u32_ne(&r, 32), u32_ne(&r, 36)), (Some(1), Some(2)));

    let r = unix_dump_request(4);
    assert_eq!(u16_ne(&r, 6), Some(NLM_F_REQUEST | NLM_F_DUMP));
    assert_eq!(u32_ne(&r, 28), Some(UDIAG_SHOW_NAME | UDIAG_SHOW_PEER));
    assert_eq!(&r[32..40], &[0xff; 8]);
}

// ---- TCP answers ----

#[test]
fn parses_a_two_socket_multipart_dump() {
    let d = datagram(&[two_tcp_sockets(5), done(5)]);
    let (r, out, skipped) = collect_tcp(&d, 5);
    assert_eq!(r, Ok(true));
    assert_eq!(skipped, 0);
    assert_eq!(
        out[0],
        TcpSocket {
            cookie: 0x1122_3344_5566_7788,
            inode: 4242,
            uid: 1000,
            state: TCP_ESTABLISHED,
            local: "127.0.0.1:5432".parse().unwrap(),
            remote: "127.0.0.2:40000".parse().unwrap(),
            info: Some(TcpInfoTimes {
                last_data_sent_ms: 11,
                last_data_recv_ms: 22,
                last_ack_recv_ms: 33,
                bytes_acked: 4444,
                bytes_received: 5555,
            }),
        }
    );
    // v4-mapped stays IPv6; a short tcp_info has no byte counts.
    assert_eq!(out[1].local, "[::ffff:127.0.0.1]:6432".parse().unwrap());
    assert_eq!(out[1].remote, "[::]:0".parse().unwrap());
    assert_eq!(out[1].state, TCP_LISTEN);
    let info = out[1].info.unwrap();
    assert_eq!(
        (info.last_ack_recv_ms, info.bytes_acked, info.bytes_received),
        (33, 0, 0)
    );
}

#[test]
fn a_dump_spans_datagrams_and_ignores_other_requests() {
    let mut out = Vec::new();
    let mut skipped = 0;
    let first = two_tcp_sockets(8);
    let stale = datagram(&[two_tcp_sockets(7), done(7)]);
    assert_eq!(
        collect_dump(&stale, 8, parse_inet, &mut out, &mut skipped),
        Ok(false)
    );
    assert_eq!(
        collect_dump(&first, 8, parse_inet, &mut out, &mut skipped),
        Ok(false)
    );
    let noop = nl_message(NLMSG_NOOP, 0, 8, &[]);
    let last = datagram(&[noop, done(8)]);
    assert_eq!(
        collect_dump(&last, 8, parse_inet, &mut out, &mut skipped),
        Ok(true)
    );
    assert_eq!(out.len(), 2);
}

#[test]
fn kernel_errors_end_the_dump() {
    let (r, out, _) = collect_tcp(&datagram(&[error(5, -libc::EPERM)]), 5);
    assert_eq!(r, Err(DiagError::Kernel { errno: libc::EPERM }));
    assert!(out.is_empty());
    let failed_done = nl_message(NLMSG_DONE, 2, 5, &(-libc::EINTR).to_ne_bytes());
    assert_eq!(
        collect_tcp(&failed_done, 5).0,
        Err(DiagError::Kernel { errno: libc::EINTR })
    );
    // An acknowledgement also ends it; a bare DONE without a payload too.
    assert_eq!(collect_tcp(&error(5, 0), 5).0, Ok(true));
    assert_eq!(
        collect_tcp(&nl_message(NLMSG_DONE, 2, 5, &[]), 5).0,
        Ok(true)
    );
    assert_eq!(
        collect_tcp(&nl_message(NLMSG_ERROR, 0, 5, &[1, 2]), 5).0,
        Err(DiagError::Malformed("NLMSG_ERROR without an error code"))
    );
    let extreme = error(5, i32::MIN);
    assert!(collect_tcp(&extreme, 5).0.is_err());
}

#[test]
fn truncation_at_every_length_never_panics() {
    let d = datagram(&[two_tcp_sockets(5), done(5)]);
    for len in 0..d.len() {
        let (r, out, skipped) = collect_tcp(&d[..len], 5);
        // A cut datagram never completes the dump, and never yields a made-up socket.
        assert_ne!(r, Ok(true), "cut at {len}");
        assert!(out.len() + skipped <= 2);
    }
    // Each record cut inside a well-framed message: an error, not a panic.
    let one = inet_msg(
        2,
        1,
        &[1, 2, 3, 4],
        1,
        &[4, 3, 2, 1],
        2,
        3,
        4,
        Some(&tcp_info_bytes(232)),
    );
    for len in 0..one.len() {
        let r = parse_inet(&one[..len]);
        if len < INET_DIAG_MSG_LEN {
            assert_eq!(
                r,
                Err(DiagError::Malformed("inet_diag_msg cut short")),
                "{len}"
            );
        }
    }
    let u = unix_msg(1, 1, 9, 9, Some(b"/tmp/x\0"), Some(3));
    for len in 0..u.len() {
        let _ = parse_unix(&u[..len]);
        let _ = exact_answer(&nl_message(SOCK_DIAG_BY_FAMILY, 0, 1, &u[..len]), 1);
    }
}

#[test]
fn tcp_info_shorter_than_the_times_is_absent() {
    for (len, some) in [
        (0, false),
        (59, false),
        (60, true),
        (128, true),
        (136, true),
    ] {
        let m = inet_msg(
            2,
            1,
            &[1; 4],
            1,
            &[2; 4],
            2,
            3,
            4,
            Some(&tcp_info_bytes(len)),
        );
        let info = parse_inet(&m).unwrap().info;
        assert_eq!(info.is_some(), some, "{len}");
        if len == 128 {
            // bytes_acked fits, bytes_received does not.
            assert_eq!(
                info.map(|i| (i.bytes_acked, i.bytes_received)),
                Some((4444, 0))
            );
        }
    }
}

#[test]
fn bad_attributes_and_families_skip_the_record() {
    let mut bad_len = inet_msg(2, 1, &[1; 4], 1, &[2; 4], 2, 3, 4, None);
    bad_len.extend_from_slice(&200u16.to_ne_bytes()); // longer than what is left
    bad_len.extend_from_slice(&INET_DIAG_INFO.to_ne_bytes());
    bad_len.extend_from_slice(&[0; 8]);
    let mut too_short = inet_msg(2, 1, &[1; 4], 1, &[2; 4], 2, 3, 4, None);
    too_short.extend_from_slice(&2u16.to_ne_bytes()); // shorter than its own header
    too_short.extend_from_slice(&INET_DIAG_INFO.to_ne_bytes());
    let mut padding = inet_msg(2, 1, &[1; 4], 1, &[2; 4], 2, 3, 4, None);
    padding.extend_from_slice(&[0; 3]); // not even a header: ignored
    let unknown_family = inet_msg(99, 1, &[1; 4], 1, &[2; 4], 2, 3, 4, None);
    let d = datagram(&[
        nl_message(SOCK_DIAG_BY_FAMILY, 2, 1, &bad_len),
        nl_message(SOCK_DIAG_BY_FAMILY, 2, 1, &too_short),
        nl_message(SOCK_DIAG_BY_FAMILY, 2, 1, &unknown_family),
        nl_message(SOCK_DIAG_BY_FAMILY, 2, 1, &padding),
        nl_message(SOCK_DIAG_BY_FAMILY, 2, 1, &[]),
        done(1),
    ]);
    let (r, out, skipped) = collect_tcp(&d, 1);
    assert_eq!(r, Ok(true));
    assert_eq!((out.len(), skipped), (1, 4));
    assert_eq!(out[0].info, None);
}

#[test]
fn bad_netlink_framing_is_an_error() {
    // Length below the header, beyond the datagram, and a header cut short.
    for bad in [
        vec![0u8; NLMSG_HDRLEN],
        {
            let mut m = done(1);
            m[0..4].copy_from_slice(&1000u32.to_ne_bytes());
            m
        },
        vec![20, 0, 0],
    ] {
        assert!(matches!(
            collect_tcp(&bad, 1).0,
            Err(DiagError::Malformed(_))
        ));
        assert!(matches!(
            exact_answer(&bad, 1),
            Err(DiagError::Malformed(_))
        ));
    }
    // An overrun is an error too.
    let overrun = nl_message(NLMSG_OVERRUN, 0, 1, &[]);
    assert!(collect_tcp(&overrun, 1).0.is_err());
}

#[test]
fn garbage_never_panics() {
    // A small deterministic generator: no dependency needed.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let base = datagram(&[
        two_tcp_sockets(1),
        nl_message(
            SOCK_DIAG_BY_FAMILY,
            2,
            1,
            &unix_msg(1, 1, 5, 6, Some(b"\0ab"), Some(7)),
        ),
        done(1),
    ]);
    for round in 0..5000 {
        let mut d = if round % 2 == 0 {
            (0..(next() % 300))
                .map(|_| next() as u8)
                .collect::<Vec<u8>>()
        } else {
            base.clone()
        };
        // Flip a few bytes, then maybe cut.
        for _ in 0..(next() % 6) {
            if !d.is_empty() {
                let i = (next() as usize) % d.len();
                d[i] = next() as u8;
            }
        }
        let cut = (next() as usize) % (d.len() + 1);
        let d = &d[..cut];
        let _ = collect_tcp(d, 1);
        let mut out = Vec::new();
        let mut skipped = 0;
        let _ = collect_dump(d, 1, parse_unix, &mut out, &mut skipped);
        let _ = exact_answer(d, 1);
        let _ = parse_inet(d);
        let _ = parse_unix(d);
    }
}

// ---- Unix answers ----

#[test]
fn parses_unix_records() {
    let d = datagram(&[
        nl_message(
            SOCK_DIAG_BY_FAMILY,
            2,
            4,
            &unix_msg(
                1,
                TCP_LISTEN,
                10,
                0x1_0000_0002,
                Some(b"/run/pg/.s.PGSQL.5432\0"),
                None,
            ),
        ),
        nl_message(
            SOCK_DIAG_BY_FAMILY,
            2,
            4,
            &unix_msg(1, 1, 11, 3, None, Some(12)),
        ),
        nl_message(
            SOCK_DIAG_BY_FAMILY,
            2,
            4,
            &unix_msg(2, 7, 13, 4, Some(b"\0sd\0x"), None),
        ),
        nl_message(
            SOCK_DIAG_BY_FAMILY,
            2,
            4,
            &unix_msg(1, 1, 14, 5, Some(b""), Some(0)),
        ),
        done(4),
    ]);
    let mut out = Vec::new();
    let mut skipped = 0;
    assert_eq!(
        collect_dump(&d, 4, parse_unix, &mut out, &mut skipped),
        Ok(true)
    );
    assert_eq!(skipped, 0);
    assert_eq!(
        out[0],
        UnixSocket {
            cookie: 0x1_0000_0002,
            inode: 10,
            state: TCP_LISTEN,
            socket_type: 1,
            path: Some("/run/pg/.s.PGSQL.5432".into()),
            peer_inode: None,
        }
    );
    assert_eq!(
        (out[1].path.as_deref(), out[1].peer_inode),
        (None, Some(12))
    );
    assert_eq!(
        (out[2].socket_type, out[2].path.as_deref()),
        (2, Some("@sd@x"))
    );
    assert_eq!((out[3].path.as_deref(), out[3].peer_inode), (None, Some(0)));

    let short_peer = unix_msg(1, 1, 11, 3, None, None)
        .into_iter()
        .chain(attr(UNIX_DIAG_PEER, &[1, 2]))
        .collect::<Vec<u8>>();
    assert!(parse_unix(&short_peer).is_err());
    let mut inet_family = unix_msg(1, 1, 11, 3, None, None);
    inet_family[0] = libc::AF_INET as u8;
    assert!(parse_unix(&inet_family).is_err());
}

#[test]
fn exact_answers() {
    let found = nl_message(SOCK_DIAG_BY_FAMILY, 0, 6, &unix_msg(1, 1, 9, 9, None, None));
    assert_eq!(exact_answer(&found, 6), Ok(Some(true)));
    assert_eq!(exact_answer(&found, 5), Ok(None)); // another request's
    assert_eq!(exact_answer(&error(6, -libc::ENOENT), 6), Ok(Some(false)));
    assert_eq!(exact_answer(&error(6, -libc::ESTALE), 6), Ok(Some(false)));
    assert_eq!(
        exact_answer(&error(6, -libc::EPERM), 6),
        Err(DiagError::Kernel { errno: libc::EPERM })
    );
    assert!(exact_answer(&error(6, 0), 6).is_err());
    assert!(exact_answer(&done(6), 6).is_err());
    assert_eq!(exact_answer(&[], 6), Ok(None));
}

fn us(inode: u64, state: u8, path: Option<&str>, peer: Option<u64>) -> UnixSocket {
    UnixSocket {
        cookie: inode + 1000,
        inode,
        state,
        socket_type: 1,
        path: path.map(str::to_owned),
        peer_inode: peer,
    }
}

#[test]
fn unix_connection_pairing_table() {
    const PG: &str = "/run/postgresql/.s.PGSQL.5432";
    const BOUNCER: &str = "@pgbouncer";
    let mut dgram = us(40, 7, None, None);
    dgram.socket_type = 2;
    let mut seqpacket_server = us(51, 1, Some("/run/sp"), Some(50));
    seqpacket_server.socket_type = 5;
    let mut seqpacket_client = us(50, 1, None, Some(51));
    seqpacket_client.socket_type = 5;
    let sockets = vec![
        us(1, TCP_LISTEN, Some(PG), None),
        us(2, 1, None, Some(3)),            // client of PG
        us(3, 1, Some(PG), Some(2)),        // accepted by PG
        us(4, 1, Some("/tmp/me"), Some(5)), // client bound to its own name
        us(5, 1, Some(PG), Some(4)),        // accepted by PG
        us(6, TCP_LISTEN, Some(BOUNCER), None),
        us(7, 1, None, Some(8)),
        us(8, 1, Some(BOUNCER), Some(7)),
        us(10, 1, None, Some(11)), // socketpair: left out
        us(11, 1, None, Some(10)),
        us(20, 1, Some("/old"), Some(21)), // listener closed: still a server
        us(21, 1, None, Some(20)),
        us(30, 1, None, Some(0)),             // not accepted yet: unknown
        us(31, 1, Some(PG), Some(999)),       // peer not in the list: server
        us(32, 1, None, Some(998)),           // peer not in the list: unknown
        us(33, 7, Some("/closed"), Some(34)), // not connected
        dgram,
        seqpacket_client,
        seqpacket_server,
    ];
    let got: Vec<(u64, UnixRole, String)> = unix_connections(&sockets)
        .into_iter()
        .map(|c| (c.socket.inode, c.role, c.path))
        .collect();
    use UnixRole::{Client, Server};
    let want: Vec<(u64, UnixRole, String)> = [
        (2, Client, PG),
        (3, Server, PG),
        (4, Client, PG),
        (5, Server, PG),
        (7, Client, BOUNCER),
        (8, Server, BOUNCER),
        (20, Server, "/old"),
        (21, Client, "/old"),
        (31, Server, PG),
        (50, Client, "/run/sp"),
        (51, Server, "/run/sp"),
    ]
    .into_iter()
    .map(|(i, r, p)| (i, r, p.to_owned()))
    .collect();
    assert_eq!(got, want);
    // The socket itself is carried over whole.
    assert_eq!(unix_connections(&sockets)[0].socket, sockets[1]);
}

// ---- the real kernel (no root needed) ----

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    os::{
        fd::{AsFd, AsRawFd},
        unix::{
            fs::MetadataExt,
            net::{UnixListener, UnixStream},
        },
    },
    time::Instant,
};

fn inode_of(fd: impl AsFd) -> u64 {
    let owned = fd.as_fd().try_clone_to_owned().expect("dup");
    std::fs::File::from(owned).metadata().expect("fstat").ino()
}

fn so_cookie(fd: impl AsFd) -> u64 {
    let mut cookie = 0u64;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` and `len` are valid for writes and describe an 8-byte buffer.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    assert_eq!(rc, 0, "SO_COOKIE: {}", std::io::Error::last_os_error());
    cookie
}

fn find_tcp(all: &[TcpSocket], local: SocketAddr, remote: SocketAddr) -> TcpSocket {
    let found: Vec<_> = all
        .iter()
        .filter(|s| s.local == local && s.remote == remote)
        .collect();
    assert_eq!(found.len(), 1, "{local} -> {remote} in {all:#?}");
    found[0].clone()
}

/// ss's state names, as kernel numbers.
fn ss_state(name: &str) -> Option<u8> {
    Some(match name {
        "ESTAB" => 1,
        "SYN-SENT" => 2,
        "SYN-RECV" => 3,
        "FIN-WAIT-1" => 4,
        "FIN-WAIT-2" => 5,
        "TIME-WAIT" => 6,
        "UNCONN" | "CLOSE" => 7,
        "CLOSE-WAIT" => 8,
        "LAST-ACK" => 9,
        "LISTEN" => 10,
        "CLOSING" => 11,
        _ => return None,
    })
}

/// `127.0.0.1:5432`, `[::1]:5432`, `[::ffff:127.0.0.1]:5432`, `0.0.0.0:*`, `[::]:*`,
/// `*:*`, `[fe80::1]%lo:22`.
fn ss_addr(text: &str) -> Option<SocketAddr> {
    let (host, port) = text.rsplit_once(':')?;
    let port = if port == "*" { 0 } else { port.parse().ok()? };
    let host = host.split('%').next()?;
    let ip: IpAddr = match host {
        "*" => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        h => h
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .ok()?,
    };
    Some(SocketAddr::new(ip, port))
}

fn ss_tcp() -> Option<HashSet<(SocketAddr, SocketAddr, u8)>> {
    let out = std::process::Command::new("ss")
        .arg("-tanH")
        .output()
        .ok()?;
    assert!(out.status.success(), "ss -tanH failed");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    Some(
        text.lines()
            .filter_map(|line| {
                let f: Vec<&str> = line.split_whitespace().collect();
                Some((
                    ss_addr(f.get(3)?)?,
                    ss_addr(f.get(4)?)?,
                    ss_state(f.first()?)?,
                ))
            })
            .collect(),
    )
}

#[test]
fn ss_parsing() {
    assert_eq!(
        ss_addr("[::ffff:127.0.0.1]:80"),
        "[::ffff:127.0.0.1]:80".parse().ok()
    );
    assert_eq!(ss_addr("0.0.0.0:*"), "0.0.0.0:0".parse().ok());
    assert_eq!(ss_addr("[fe80::1]%lo:22"), "[fe80::1]:22".parse().ok());
}

#[test]
fn real_tcp_sockets_match_fstat_so_cookie_proc_and_ss() {
    for host in ["127.0.0.1:0", "[::1]:0"] {
        let listener = TcpListener::bind(host).expect("bind");
        let server_addr = listener.local_addr().expect("local_addr");
        let mut client = TcpStream::connect(server_addr).expect("connect");
        let (mut server, _) = listener.accept().expect("accept");
        client.write_all(b"hello").expect("write");
        let mut got = [0u8; 5];
        server.read_exact(&mut got).expect("read");
        let client_addr = client.local_addr().expect("client addr");

        // The ACK of our 5 bytes may lag the read by a moment.
        let deadline = Instant::now() + Duration::from_secs(5);
        let all = loop {
            let all = tcp_sockets().expect("tcp_sockets");
            let c = find_tcp(&all, client_addr, server_addr);
            if c.info.is_some_and(|i| i.bytes_acked >= 5) || Instant::now() > deadline {
                break all;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let c = find_tcp(&all, client_addr, server_addr);
        let s = find_tcp(&all, server_addr, client_addr);
        let unspecified = match server_addr {
            SocketAddr::V4(_) => "0.0.0.0:0".parse().unwrap(),
            SocketAddr::V6(_) => "[::]:0".parse().unwrap(),
        };
        let l = find_tcp(&all, server_addr, unspecified);
        assert_eq!(
            (c.state, s.state, l.state),
            (TCP_ESTABLISHED, TCP_ESTABLISHED, TCP_LISTEN)
        );
        assert_eq!(c.inode, inode_of(&client));
        assert_eq!(s.inode, inode_of(&server));
        assert_eq!(l.inode, inode_of(&listener));
        assert_eq!(c.cookie, so_cookie(&client));
        assert_eq!(s.cookie, so_cookie(&server));
        // SAFETY: geteuid has no preconditions.
        assert_eq!(c.uid, unsafe { libc::geteuid() });
        let ci = c.info.expect("client tcp_info");
        let si = s.info.expect("server tcp_info");
        // bytes_acked counts the client's SYN too (snd_una - ISN), bytes_received does not.
        assert!((5..=6).contains(&ci.bytes_acked), "{ci:?}");
        assert_eq!(si.bytes_received, 5, "{si:?}");
        assert_eq!(si.bytes_acked, 0);
        assert!(ci.last_data_sent_ms < 5_000 && si.last_data_recv_ms < 5_000);
        assert!(ci.last_ack_recv_ms < 5_000);

        let owners = crate::host::owners::socket_owners(std::path::Path::new("/proc"));
        for inode in [c.inode, s.inode, l.inode] {
            assert!(
                owners
                    .get(&inode)
                    .is_some_and(|p| p.contains(&std::process::id()))
            );
        }

        let Some(ss) = ss_tcp() else {
            eprintln!("ss not installed: skipping the comparison with ss");
            continue;
        };
        // This connection's two ends and its listener: not every socket that shares an
        // address with them (another one of the host may reuse the client's port for
        // another peer, or linger in TIME_WAIT from an earlier test).
        let ours = |local: &SocketAddr, remote: &SocketAddr| {
            (*local, *remote) == (server_addr, client_addr)
                || (*local, *remote) == (client_addr, server_addr)
                || (*local == server_addr && remote.port() == 0)
        };
        let from_ss: HashSet<_> = ss.into_iter().filter(|(l, r, _)| ours(l, r)).collect();
        let from_diag: HashSet<_> = tcp_sockets()
            .expect("tcp_sockets")
            .into_iter()
            .filter(|t| ours(&t.local, &t.remote))
            .map(|t| (t.local, t.remote, t.state))
            .collect();
        assert_eq!(from_diag.len(), 3);
        assert_eq!(from_diag, from_ss);
    }
}

#[test]
fn real_unix_connection_and_exact_lookup() {
    let dir = std::env::temp_dir().join(format!("tracer-sockdiag-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("mkdir");
    let path = dir.join(".s.PGSQL.5999");
    let path_str = path.to_str().expect("utf-8 path").to_owned();
    let listener = UnixListener::bind(&path).expect("bind");
    let client = UnixStream::connect(&path).expect("connect");
    let (server, _) = listener.accept().expect("accept");
    let (ci, si, li) = (inode_of(&client), inode_of(&server), inode_of(&listener));

    let all = unix_sockets().expect("unix_sockets");
    let l = all.iter().find(|s| s.inode == li).expect("listener listed");
    assert_eq!(
        (l.state, l.socket_type, l.path.as_deref()),
        (TCP_LISTEN, 1, Some(&*path_str))
    );
    let c = all.iter().find(|s| s.inode == ci).expect("client listed");
    assert_eq!(
        (c.state, c.path.as_deref(), c.peer_inode),
        (TCP_ESTABLISHED, None, Some(si))
    );
    assert_eq!(c.cookie, so_cookie(&client));

    let mut ours: Vec<(u64, UnixRole, String)> = unix_connections(&all)
        .into_iter()
        .filter(|conn| conn.path == path_str)
        .map(|conn| (conn.socket.inode, conn.role, conn.path))
        .collect();
    ours.sort_by_key(|(inode, ..)| *inode);
    let mut want = vec![
        (ci, UnixRole::Client, path_str.clone()),
        (si, UnixRole::Server, path_str.clone()),
    ];
    want.sort_by_key(|(inode, ..)| *inode);
    assert_eq!(ours, want);

    let server_cookie = so_cookie(&server);
    let client_cookie = c.cookie;
    let mut diag = DiagSocket::open().expect("open");
    assert_eq!(diag.unix_socket_exists(ci, client_cookie), Ok(true));
    assert_eq!(diag.unix_socket_exists(si, server_cookie), Ok(true));
    assert_eq!(diag.unix_socket_exists(si, NO_COOKIE), Ok(true));
    // Right inode, wrong cookie: that is another socket (ESTALE).
    assert_eq!(diag.unix_socket_exists(si, server_cookie ^ 1), Ok(false));
    assert_eq!(diag.unix_socket_exists(0, 0), Ok(false));

    drop(client);
    drop(server);
    // Another thread of this process reading /proc/self/fd (the tests run in parallel)
    // can hold the last file reference for a moment, and the release follows it.
    let deadline = Instant::now() + Duration::from_secs(2);
    while diag.unix_socket_exists(ci, client_cookie) == Ok(true)
        || diag.unix_socket_exists(si, server_cookie) == Ok(true)
    {
        assert!(Instant::now() < deadline, "both ends closed, still listed");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(diag.unix_socket_exists(ci, client_cookie), Ok(false));
    assert_eq!(diag.unix_socket_exists(si, server_cookie), Ok(false));
    assert_eq!(unix_socket_exists(si, server_cookie), Ok(false));
    // The socket is reusable after all of that.
    assert!(
        diag.unix_sockets()
            .expect("dump")
            .iter()
            .any(|s| s.inode == li)
    );
    drop(listener);
    let _ = std::fs::remove_dir_all(&dir);
}
