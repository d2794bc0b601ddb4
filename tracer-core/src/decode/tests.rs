#![allow(
    clippy::let_underscore_must_use,
    reason = "clean-up of processes, sockets and files that may be gone already, and calls made only to show they do not panic: their results are ignored on purpose"
)]
use super::*;
use tracer_common::{ProcInfo, role};

fn open() -> ConnOpen {
    ConnOpen {
        header: EventHeader {
            kind: kind::CONN_OPEN,
            size: size_of::<ConnOpen>() as u32,
            ts_ns: 42,
            cookie: 7,
        },
        owner: ProcInfo {
            tgid: 100,
            comm: *b"psql\0\0\0\0\0\0\0\0\0\0\0\0",
            ..ProcInfo::default()
        },
        family: tracer_common::AF_INET,
        local_port: 40000,
        remote_port: 5432,
        role: role::CLIENT,
        ..ConnOpen::default()
    }
}

#[test]
fn decodes_every_kind() {
    let o = open();
    // Every record shares the open's header but for its kind.
    let header = |kind| EventHeader { kind, ..o.header };
    assert_eq!(decode(&to_bytes(&o)), Ok(KernelEvent::Open(o)));
    let c = ConnClose {
        header: header(kind::CONN_CLOSE),
        bytes_sent: 9,
        ..ConnClose::default()
    };
    assert_eq!(decode(&to_bytes(&c)), Ok(KernelEvent::Close(c)));
    let w = ConnOwner {
        header: header(kind::CONN_OWNER),
        owner: o.owner,
    };
    assert_eq!(decode(&to_bytes(&w)), Ok(KernelEvent::Owner(w)));
    let p = ConnPeerClosed {
        header: header(kind::CONN_PEER_CLOSED),
    };
    assert_eq!(decode(&to_bytes(&p)), Ok(KernelEvent::PeerClosed(p)));
    let l = ConnLink {
        header: header(kind::CONN_LINK),
        linked: 99,
    };
    assert_eq!(decode(&to_bytes(&l)), Ok(KernelEvent::Link(l)));
}

#[test]
fn rejects_truncated_records_at_every_length() {
    let bytes = to_bytes(&open());
    for len in 0..bytes.len() {
        let err = decode(&bytes[..len]).expect_err("truncated");
        if len < size_of::<EventHeader>() {
            assert_eq!(err, DecodeError::NoHeader { len });
        } else {
            assert!(
                matches!(err, DecodeError::BadSize { kind: 1, .. }),
                "{err:?}"
            );
        }
    }
}

#[test]
fn rejects_oversized_and_unknown_records() {
    let mut bytes = to_bytes(&open());
    bytes.push(0);
    assert!(matches!(decode(&bytes), Err(DecodeError::BadSize { .. })));
    for unknown in [0u32, 6, 99, u32::MAX] {
        let mut b = to_bytes(&open());
        b[0..4].copy_from_slice(&unknown.to_ne_bytes());
        assert_eq!(decode(&b), Err(DecodeError::UnknownKind { kind: unknown }));
    }
}

#[test]
fn never_panics_on_garbage() {
    // A small deterministic generator: every length and many byte patterns.
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    for len in 0..200 {
        for _ in 0..50 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            let _ = decode(&bytes);
        }
    }
}
