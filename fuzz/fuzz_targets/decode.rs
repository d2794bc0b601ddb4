//! Ring-buffer records from arbitrary bytes: `decode` never panics, accepts only records of
//! exactly their kind's size, and the connection table stays consistent whatever sequence of
//! decoded events it is fed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tracer_common::{ConnClose, ConnLink, ConnOpen, ConnOwner, ConnPeerClosed, EventHeader, kind};
use tracer_core::{
    conn_table::{Change, ConnTable},
    decode::{DecodeError, KernelEvent, decode},
};

fn expected_size(record_kind: u32) -> Option<usize> {
    match record_kind {
        kind::CONN_OPEN => Some(size_of::<ConnOpen>()),
        kind::CONN_CLOSE => Some(size_of::<ConnClose>()),
        kind::CONN_OWNER => Some(size_of::<ConnOwner>()),
        kind::CONN_PEER_CLOSED => Some(size_of::<ConnPeerClosed>()),
        kind::CONN_LINK => Some(size_of::<ConnLink>()),
        _ => None,
    }
}

fuzz_target!(|data: &[u8]| {
    // The whole input as one record.
    check_one(data);

    // The input as a sequence of records: a length byte, then that many bytes. Cookies are
    // folded into a small range so that opens, closes and owner changes hit the same
    // connections.
    let mut table = ConnTable::default();
    let mut open: std::collections::HashSet<u64> = Default::default();
    let mut rest = data;
    while let Some((&len, tail)) = rest.split_first() {
        let len = usize::from(len).min(tail.len());
        let (record, next) = tail.split_at(len);
        rest = next;
        let mut record = record.to_vec();
        if record.len() >= size_of::<EventHeader>() {
            record[16] &= 7;
            record[17..24].fill(0);
        }
        let Ok(event) = decode(&record) else { continue };
        let cookie = event.header().cookie;
        let paths = |_hash: u64| None;
        let before = table.len();
        match table.apply(&event, &paths) {
            Change::Opened(c) => {
                assert_eq!(c, cookie);
                assert!(open.insert(c), "opened twice without a close");
                assert_eq!(table.len(), before + 1);
            }
            Change::Refreshed(c) | Change::OwnerChanged(c) | Change::PeerClosed(c) => {
                assert_eq!(c, cookie);
                assert!(open.contains(&c));
                assert_eq!(table.len(), before);
            }
            Change::Closed(closed) => {
                assert_eq!(closed.conn.cookie, cookie);
                assert!(open.remove(&cookie));
                assert_eq!(table.len(), before - 1);
                let KernelEvent::Close(c) = event else {
                    panic!("closed by a non-close event")
                };
                assert_eq!(closed.bytes_sent, c.bytes_sent);
            }
            Change::Linked { cookie: c, .. } => {
                assert_eq!(c, cookie);
                assert!(open.contains(&c));
                assert_eq!(table.len(), before);
            }
            Change::Untracked => {
                assert!(!open.contains(&cookie));
                assert_eq!(table.len(), before);
            }
        }
        assert_eq!(table.len(), open.len());
        for conn in table.iter() {
            assert!(open.contains(&conn.cookie));
            let _ = conn.view().state();
        }
    }
});

fn check_one(data: &[u8]) {
    match decode(data) {
        Ok(event) => {
            let record_kind = event.header().kind;
            assert_eq!(Some(data.len()), expected_size(record_kind));
        }
        Err(DecodeError::NoHeader { len }) => {
            assert_eq!(len, data.len());
            assert!(len < size_of::<EventHeader>());
        }
        Err(DecodeError::UnknownKind { kind }) => assert!(expected_size(kind).is_none()),
        Err(DecodeError::BadSize {
            kind,
            len,
            expected,
        }) => {
            assert_eq!(len, data.len());
            assert_eq!(Some(expected), expected_size(kind));
            assert_ne!(len, expected);
        }
    }
}
