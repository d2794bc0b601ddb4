//! Ring-buffer records (bytes) to typed kernel events. A pure function: every malformed
//! record is an error value, never a panic.

use thiserror::Error;
use tracer_common::{ConnClose, ConnLink, ConnOpen, ConnOwner, ConnPeerClosed, EventHeader, kind};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelEvent {
    Open(ConnOpen),
    Close(ConnClose),
    Owner(ConnOwner),
    PeerClosed(ConnPeerClosed),
    Link(ConnLink),
}

impl KernelEvent {
    pub fn header(&self) -> &EventHeader {
        match self {
            Self::Open(e) => &e.header,
            Self::Close(e) => &e.header,
            Self::Owner(e) => &e.header,
            Self::PeerClosed(e) => &e.header,
            Self::Link(e) => &e.header,
        }
    }
}

#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {len} bytes is shorter than its header")]
    NoHeader { len: usize },
    #[error("unknown record kind {kind}")]
    UnknownKind { kind: u32 },
    #[error("record kind {kind}: {len} bytes, expected {expected}")]
    BadSize {
        kind: u32,
        len: usize,
        expected: usize,
    },
}

/// Copies a `T` out of `bytes` when the record has exactly `T`'s size.
fn read_exact<T: Copy>(kind: u32, bytes: &[u8]) -> Result<T, DecodeError> {
    let expected = size_of::<T>();
    if bytes.len() != expected {
        return Err(DecodeError::BadSize {
            kind,
            len: bytes.len(),
            expected,
        });
    }
    // SAFETY: the length was checked above; T is one of the tracer-common wire types, which
    // are repr(C) plain integers and byte arrays, valid for any bit pattern; the read is
    // unaligned-safe.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

pub fn decode(bytes: &[u8]) -> Result<KernelEvent, DecodeError> {
    if bytes.len() < size_of::<EventHeader>() {
        return Err(DecodeError::NoHeader { len: bytes.len() });
    }
    let record_kind = u32::from_ne_bytes(bytes[0..4].try_into().expect("4 bytes"));
    match record_kind {
        kind::CONN_OPEN => read_exact(record_kind, bytes).map(KernelEvent::Open),
        kind::CONN_CLOSE => read_exact(record_kind, bytes).map(KernelEvent::Close),
        kind::CONN_OWNER => read_exact(record_kind, bytes).map(KernelEvent::Owner),
        kind::CONN_PEER_CLOSED => read_exact(record_kind, bytes).map(KernelEvent::PeerClosed),
        kind::CONN_LINK => read_exact(record_kind, bytes).map(KernelEvent::Link),
        kind => Err(DecodeError::UnknownKind { kind }),
    }
}

#[cfg(test)]
pub(crate) fn to_bytes<T: Copy>(value: &T) -> Vec<u8> {
    // SAFETY: T is a plain repr(C) wire type; reading its bytes is always valid.
    unsafe { std::slice::from_raw_parts((value as *const T).cast::<u8>(), size_of::<T>()) }.to_vec()
}

#[cfg(test)]
mod tests;
