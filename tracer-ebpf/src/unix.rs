//! Recognising Postgres Unix-socket connections: by the path of the socket they belong to.
//!
//! A server-side (accepted) socket shares its listener's address; a client socket is
//! unbound and its peer is the server-side socket. The path is hashed and looked up in the
//! set user space fills from the listening sockets matching `--unix-socket-glob`.

use core::ffi::c_void;
use tracer_common::{UNIX_PATH_MAX, path_hash};

use aya_ebpf::helpers::bpf_probe_read_kernel_buf;

use crate::{
    kernel::{offset, read_at},
    maps::SCRATCH_PATH,
};

/// The address a connected Unix socket belongs to: (its `struct unix_address`, true when
/// the socket itself is bound to it, i.e. the server side). Socket pairs and unconnected
/// sockets have none: they are rejected after two or three reads.
#[inline(always)]
pub(crate) fn unix_address(sk: *const c_void) -> Option<(u64, bool)> {
    let own: u64 = read_at(sk, offset!(unix_sock_addr))?;
    if own != 0 {
        return Some((own, true));
    }
    let peer: u64 = read_at(sk, offset!(unix_sock_peer))?;
    if peer == 0 {
        return None;
    }
    let peer_address: u64 = read_at(peer as *const c_void, offset!(unix_sock_addr))?;
    (peer_address != 0).then_some((peer_address, false))
}

/// Hash of the filesystem path of a `struct unix_address`; `None` for abstract names.
#[inline(always)]
pub(crate) fn address_path_hash(address: u64) -> Option<u64> {
    let address = address as *const c_void;
    // `len` counts sun_family (2 bytes) plus the path.
    let len: i32 = read_at(address, offset!(unix_address_len))?;
    let path = SCRATCH_PATH.get_ptr_mut(0)?;
    // SAFETY: per-CPU scratch buffer of 128 bytes, this program run owns it.
    let path = unsafe { &mut *path };
    let source = address.wrapping_byte_add(offset!(unix_address_name) as usize + 2);
    // SAFETY: bpf_probe_read_kernel_buf checks the source address.
    unsafe { bpf_probe_read_kernel_buf(source.cast::<u8>(), &mut path[..UNIX_PATH_MAX]) }.ok()?;
    if len <= 2 || path[0] == 0 {
        // Unnamed or abstract: libpq's sockets are filesystem paths.
        return None;
    }
    Some(path_hash(&path[..], (len - 2) as usize))
}
