//! Hook: `inet_sock_set_state` (BTF tracepoint), every TCP state change on the host.
//!
//! Why this hook: it sees connect (CLOSE -> SYN_SENT, in the connecting process's context),
//! the server-side child socket (-> SYN_RECV), the peer's FIN (-> CLOSE_WAIT) and the end of
//! every socket (-> CLOSE), and fires only on TCP state changes, never on other syscalls.
//! Some transitions run in softirq, where the current task is not the owner: the owner is
//! taken only where the context is known to be the owner's (connect here, I/O in `sock_io`).

use aya_ebpf::{
    helpers::{bpf_get_socket_cookie, bpf_ktime_get_ns},
    macros::btf_tracepoint,
    programs::BtfTracePointContext,
};
use core::ffi::c_void;
use tracer_common::{
    AF_INET, AF_INET6, ConnClose, ConnOpen, ConnPeerClosed, EventHeader, SOCK_FLAG_HAS_OWNER,
    SOCK_FLAG_OPEN_SENT, SockState, closed_by, kind, loss, role,
};

use crate::{
    kernel::{current_is_exiting, current_proc, current_tgid, read_at},
    maps::{EVENTS, OFFSETS, SOCKS, count_loss, port_watched},
};

const TCP_ESTABLISHED: i32 = 1;
const TCP_SYN_SENT: i32 = 2;
const TCP_SYN_RECV: i32 = 3;
const TCP_FIN_WAIT1: i32 = 4;
const TCP_CLOSE: i32 = 7;
const TCP_CLOSE_WAIT: i32 = 8;
const IPPROTO_TCP: u16 = 6;

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn pgc_sock_state(ctx: BtfTracePointContext) -> i32 {
    let sk: *const c_void = ctx.arg(0);
    let old_state: i32 = ctx.arg(1);
    let new_state: i32 = ctx.arg(2);
    on_state_change(sk, old_state, new_state);
    0
}

#[inline(always)]
fn on_state_change(sk: *const c_void, old_state: i32, new_state: i32) {
    let key = sk as u64;
    match SOCKS.get_ptr_mut(&key) {
        // SAFETY: the map value stays valid while this program runs; only the programs
        // touch it and each field update is independent.
        Some(state) => on_tracked_change(sk, key, unsafe { &mut *state }, old_state, new_state),
        None => maybe_track(sk, key, new_state),
    }
}

/// Starts tracking a socket whose connection begins on a watched port.
#[inline(always)]
fn maybe_track(sk: *const c_void, key: u64, new_state: i32) {
    let offsets = OFFSETS.load();
    let (sock_role, port) = match new_state {
        // Client: connect() in the caller's context; the remote port is already set.
        TCP_SYN_SENT => {
            let dport: u16 = read_at(sk, offsets.sock_common_dport).unwrap_or(0);
            (role::CLIENT, u16::from_be(dport))
        }
        // Server: the child socket cloned from the listener carries the listening port.
        TCP_SYN_RECV => (
            role::SERVER,
            read_at(sk, offsets.sock_common_num).unwrap_or(0),
        ),
        _ => return,
    };
    if !port_watched(port) {
        return;
    }
    let protocol: u16 = read_at(sk, offsets.sock_protocol).unwrap_or(0);
    if protocol != IPPROTO_TCP {
        return;
    }
    let mut state = SockState {
        // SAFETY: `sk` is the tracepoint's `struct sock *` argument, as the helper requires.
        cookie: unsafe { bpf_get_socket_cookie(sk as *mut c_void) },
        // SAFETY: helper without arguments.
        start_ns: unsafe { bpf_ktime_get_ns() },
        role: sock_role,
        ..SockState::default()
    };
    if sock_role == role::CLIENT {
        state.owner = current_proc();
        state.flags |= SOCK_FLAG_HAS_OWNER;
    }
    if SOCKS.insert(&key, &state, 0).is_err() {
        count_loss(loss::TABLE_FULL);
    }
}

#[inline(always)]
fn on_tracked_change(
    sk: *const c_void,
    key: u64,
    state: &mut SockState,
    old_state: i32,
    new_state: i32,
) {
    match new_state {
        TCP_ESTABLISHED => {
            if state.role == role::CLIENT && state.flags & SOCK_FLAG_OPEN_SENT == 0 {
                emit_open(sk, state);
            }
        }
        TCP_CLOSE_WAIT => {
            if state.closed_by == closed_by::UNKNOWN {
                state.closed_by = closed_by::PEER;
            }
            if state.flags & SOCK_FLAG_OPEN_SENT != 0 {
                emit_peer_closed(state);
            }
        }
        TCP_FIN_WAIT1 => {
            if state.closed_by == closed_by::UNKNOWN {
                state.closed_by = local_close_kind(state);
            }
        }
        TCP_CLOSE => {
            on_close(sk, key, state, old_state);
        }
        _ => {}
    }
}

/// A close done by the owner itself: by `close()` / `shutdown()`, or by its exit.
#[inline(always)]
fn local_close_kind(state: &SockState) -> u8 {
    if current_tgid() == state.owner.tgid && current_is_exiting() {
        closed_by::EXIT
    } else {
        closed_by::LOCAL
    }
}

#[inline(always)]
fn on_close(sk: *const c_void, key: u64, state: &mut SockState, old_state: i32) {
    if state.flags & SOCK_FLAG_OPEN_SENT == 0 {
        // The handshake never completed: not a connection, nothing to report.
        if old_state == TCP_SYN_SENT || old_state == TCP_SYN_RECV {
            let _ = SOCKS.remove(&key);
            return;
        }
        // A server connection closed before any process did I/O on it.
        emit_open(sk, state);
    }
    if state.closed_by == closed_by::UNKNOWN {
        // Straight to CLOSE without a FIN: an abortive close by the owner, or a reset.
        state.closed_by = if current_tgid() == state.owner.tgid {
            local_close_kind(state)
        } else {
            closed_by::RESET
        };
    }
    let record = ConnClose {
        header: header(kind::CONN_CLOSE, size_of::<ConnClose>(), state.cookie),
        start_ns: state.start_ns,
        bytes_sent: state.bytes_sent,
        bytes_received: state.bytes_received,
        closed_by: state.closed_by,
        old_state: old_state as u8,
        _pad: [0; 6],
    };
    if EVENTS.output::<ConnClose>(&record, 0).is_err() {
        count_loss(loss::RING_FULL);
    }
    let _ = SOCKS.remove(&key);
}

#[inline(always)]
pub fn header(record_kind: u32, size: usize, cookie: u64) -> EventHeader {
    EventHeader {
        kind: record_kind,
        size: size as u32,
        // SAFETY: helper without arguments.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        cookie,
    }
}

/// Emits `CONN_OPEN` with the socket's addresses and the owner recorded in `state`.
#[inline(always)]
pub fn emit_open(sk: *const c_void, state: &mut SockState) {
    let offsets = OFFSETS.load();
    let family: u16 = read_at(sk, offsets.sock_common_family).unwrap_or(0);
    let dport: u16 = read_at(sk, offsets.sock_common_dport).unwrap_or(0);
    let mut record = ConnOpen {
        header: header(kind::CONN_OPEN, size_of::<ConnOpen>(), state.cookie),
        owner: state.owner,
        start_ns: state.start_ns,
        family,
        local_port: read_at(sk, offsets.sock_common_num).unwrap_or(0),
        remote_port: u16::from_be(dport),
        role: state.role,
        ..ConnOpen::default()
    };
    if family == AF_INET6 {
        record.local_addr = read_at(sk, offsets.sock_common_v6_rcv_saddr).unwrap_or([0; 16]);
        record.remote_addr = read_at(sk, offsets.sock_common_v6_daddr).unwrap_or([0; 16]);
    } else if family == AF_INET {
        let local: [u8; 4] = read_at(sk, offsets.sock_common_rcv_saddr).unwrap_or([0; 4]);
        let remote: [u8; 4] = read_at(sk, offsets.sock_common_daddr).unwrap_or([0; 4]);
        record.local_addr[..4].copy_from_slice(&local);
        record.remote_addr[..4].copy_from_slice(&remote);
    }
    if EVENTS.output::<ConnOpen>(&record, 0).is_err() {
        count_loss(loss::RING_FULL);
    }
    // Marked sent even when the ring was full: the loss is counted, and user space treats a
    // close for an unknown connection as a connection it missed.
    state.flags |= SOCK_FLAG_OPEN_SENT;
}

#[inline(always)]
fn emit_peer_closed(state: &SockState) {
    let record = ConnPeerClosed {
        header: header(
            kind::CONN_PEER_CLOSED,
            size_of::<ConnPeerClosed>(),
            state.cookie,
        ),
    };
    if EVENTS.output::<ConnPeerClosed>(&record, 0).is_err() {
        count_loss(loss::RING_FULL);
    }
}
