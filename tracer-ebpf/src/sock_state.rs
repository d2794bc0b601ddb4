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
    AF_INET, AF_INET6, AF_UNIX, ConnClose, ConnOpen, ConnPeerClosed, EventHeader,
    OPEN_FLAG_PREEXISTING, SOCK_FLAG_HAS_OWNER, SOCK_FLAG_OPEN_SENT, SOCK_FLAG_PEER_CLOSED,
    SOCK_FLAG_PREEXISTING, SockState, closed_by, kind, loss, role, setting, tcp_state,
};

use crate::{
    kernel::{current_is_exiting, current_tgid, fill_current_proc, load_at, offset, read_at},
    maps::{SOCKS, count_loss, emit, note_changed, port_watched, scratch_state, setting_value},
};

const TCP_ESTABLISHED: i32 = tcp_state::ESTABLISHED as i32;
const TCP_SYN_SENT: i32 = tcp_state::SYN_SENT as i32;
const TCP_SYN_RECV: i32 = tcp_state::SYN_RECV as i32;
const TCP_FIN_WAIT1: i32 = tcp_state::FIN_WAIT1 as i32;
const TCP_CLOSE: i32 = tcp_state::CLOSE as i32;
const TCP_CLOSE_WAIT: i32 = tcp_state::CLOSE_WAIT as i32;
const IPPROTO_TCP: u16 = 6;

#[btf_tracepoint(function = "inet_sock_set_state")]
pub(crate) fn pgc_sock_state(ctx: BtfTracePointContext) -> i32 {
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
        None => {
            if maybe_track(sk, key, new_state) {
                return;
            }
            // A connection that existed before start-up changes state (peer closes, ends).
            if (old_state == TCP_ESTABLISHED || old_state == TCP_CLOSE_WAIT)
                && setting_value(setting::ADOPT_TCP) == 1
            {
                if let Some(state) = adopt_preexisting(sk, key) {
                    // SAFETY: as above.
                    on_tracked_change(sk, key, unsafe { &mut *state }, old_state, new_state);
                }
            }
        }
    }
}

/// The role of a TCP socket on a watched port: client when the remote port is watched,
/// server when the local one is; `None` for other sockets and other protocols.
#[inline(always)]
pub(crate) fn tcp_role(sk: *const c_void) -> Option<u8> {
    // Direct loads through the BTF socket pointer: this runs on every I/O of every TCP
    // socket of the host, where a helper call per field would be most of the cost.
    let protocol: u16 = load_at(sk, offset!(sock_protocol));
    if protocol != IPPROTO_TCP {
        return None;
    }
    let dport: u16 = load_at(sk, offset!(sock_common_dport));
    if port_watched(u16::from_be(dport)) {
        return Some(role::CLIENT);
    }
    let num: u16 = load_at(sk, offset!(sock_common_num));
    if port_watched(num) {
        return Some(role::SERVER);
    }
    None
}

#[inline(never)]
fn adopt_preexisting(sk: *const c_void, key: u64) -> Option<*mut SockState> {
    let family: u16 = read_at(sk, offset!(sock_common_family))?;
    let state = preexisting_state(sk, family)?;
    if SOCKS.insert(&key, state, 0).is_err() {
        count_loss(loss::TABLE_FULL);
        return None;
    }
    let entry = SOCKS.get_ptr_mut(&key)?;
    // Softirq context possible: no owner here; user space knows it from its scan.
    // SAFETY: the map value stays valid while this program runs.
    emit_open(sk, unsafe { &mut *entry }, 0, OPEN_FLAG_PREEXISTING);
    Some(entry)
}

/// A new entry (in per-CPU scratch) for a TCP connection on a watched port that existed
/// before the probes were attached; `None` for other sockets.
#[inline(always)]
pub(crate) fn preexisting_state(sk: *const c_void, family: u16) -> Option<&'static mut SockState> {
    let sock_role = tcp_role(sk)?;
    let state = scratch_state()?;
    // SAFETY: `sk` is the tracepoint's `struct sock *` argument.
    state.cookie = unsafe { bpf_get_socket_cookie(sk as *mut c_void) };
    // SAFETY: helper without arguments.
    state.start_ns = unsafe { bpf_ktime_get_ns() };
    state.family = family;
    state.role = sock_role;
    state.flags = SOCK_FLAG_PREEXISTING;
    Some(state)
}

/// Starts tracking a socket whose connection begins on a watched port; true when the
/// transition was a connection start (tracked or not).
#[inline(always)]
fn maybe_track(sk: *const c_void, key: u64, new_state: i32) -> bool {
    let (sock_role, port) = match new_state {
        // Client: connect() in the caller's context; the remote port is already set.
        TCP_SYN_SENT => {
            let dport: u16 = read_at(sk, offset!(sock_common_dport)).unwrap_or(0);
            (role::CLIENT, u16::from_be(dport))
        }
        // Server: the child socket cloned from the listener carries the listening port.
        TCP_SYN_RECV => (
            role::SERVER,
            read_at(sk, offset!(sock_common_num)).unwrap_or(0),
        ),
        _ => return false,
    };
    if !port_watched(port) {
        return true;
    }
    let protocol: u16 = read_at(sk, offset!(sock_protocol)).unwrap_or(0);
    if protocol != IPPROTO_TCP {
        return true;
    }
    let Some(state) = scratch_state() else {
        return true;
    };
    // The server's child socket gets its cookie later: at SYN_RECV it is still being cloned
    // from the listener, and on some kernels (6.1) its cookie is overwritten right after
    // this transition (from the request socket's), so a cookie read now could be the
    // listener's, shared by every child. See `settle_cookie`.
    if sock_role == role::CLIENT {
        // SAFETY: `sk` is the tracepoint's `struct sock *` argument, as the helper requires.
        state.cookie = unsafe { bpf_get_socket_cookie(sk as *mut c_void) };
    }
    // SAFETY: helper without arguments.
    state.start_ns = unsafe { bpf_ktime_get_ns() };
    state.family = read_at(sk, offset!(sock_common_family)).unwrap_or(0);
    state.role = sock_role;
    if sock_role == role::CLIENT {
        fill_current_proc(&mut state.owner);
        state.flags |= SOCK_FLAG_HAS_OWNER;
    }
    if SOCKS.insert(&key, state, 0).is_err() {
        count_loss(loss::TABLE_FULL);
    }
    true
}

#[inline(always)]
fn on_tracked_change(
    sk: *const c_void,
    key: u64,
    state: &mut SockState,
    old_state: i32,
    new_state: i32,
) {
    settle_cookie(sk, state);
    // A close too: it leaves the table, and its close record may be lost (ring full), so
    // the next tick must look it up to find it gone.
    note_changed(key, state);
    match new_state {
        TCP_ESTABLISHED => {
            snapshot_addresses(sk, state);
            if state.role == role::CLIENT && state.flags & SOCK_FLAG_OPEN_SENT == 0 {
                emit_open(sk, state, 0, 0);
            }
        }
        TCP_CLOSE_WAIT => {
            state.flags |= SOCK_FLAG_PEER_CLOSED;
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

/// Takes the cookie of a server's child socket once it is final (any transition after
/// SYN_RECV, or its first I/O): every record carries it.
#[inline(always)]
pub(crate) fn settle_cookie(sk: *const c_void, state: &mut SockState) {
    if state.cookie == 0 {
        // SAFETY: `sk` is the hook's BTF socket argument.
        state.cookie = unsafe { bpf_get_socket_cookie(sk as *mut c_void) };
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
        emit_open(sk, state, 0, 0);
    }
    if state.closed_by == closed_by::UNKNOWN {
        // Straight to CLOSE without a FIN: an abortive close by the owner, or a reset.
        state.closed_by = if current_tgid() == state.owner.tgid {
            local_close_kind(state)
        } else {
            closed_by::RESET
        };
    }
    emit_close(state, old_state as u8);
    let _ = SOCKS.remove(&key);
}

/// Emits `CONN_CLOSE` with the connection's final counts.
#[inline(always)]
pub(crate) fn emit_close(state: &SockState, old_state: u8) {
    emit::<ConnClose>(|record| {
        // SAFETY: `record` points at a reserved, writable ring-buffer slot of this type;
        // every field is written.
        unsafe {
            (*record).header = header(kind::CONN_CLOSE, size_of::<ConnClose>(), state.cookie);
            (*record).start_ns = state.start_ns;
            (*record).bytes_sent = state.bytes_sent;
            (*record).bytes_received = state.bytes_received;
            (*record).closed_by = state.closed_by;
            (*record).old_state = old_state;
            (*record)._pad = [0; 6];
        }
    });
}

#[inline(always)]
pub(crate) fn header(record_kind: u32, size: usize, cookie: u64) -> EventHeader {
    EventHeader {
        kind: record_kind,
        size: size as u32,
        // SAFETY: helper without arguments.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        cookie,
    }
}

/// (local port, remote port, local address, remote address) as the socket holds them now;
/// ports in host order.
#[inline(always)]
fn read_addresses(sk: *const c_void, family: u16) -> (u16, u16, [u8; 16], [u8; 16]) {
    let num: u16 = read_at(sk, offset!(sock_common_num)).unwrap_or(0);
    let dport: u16 = read_at(sk, offset!(sock_common_dport)).unwrap_or(0);
    let mut local_addr = [0u8; 16];
    let mut remote_addr = [0u8; 16];
    if family == AF_INET6 {
        local_addr = read_at(sk, offset!(sock_common_v6_rcv_saddr)).unwrap_or([0; 16]);
        remote_addr = read_at(sk, offset!(sock_common_v6_daddr)).unwrap_or([0; 16]);
    } else if family == AF_INET {
        let local: [u8; 4] = read_at(sk, offset!(sock_common_rcv_saddr)).unwrap_or([0; 4]);
        let remote: [u8; 4] = read_at(sk, offset!(sock_common_daddr)).unwrap_or([0; 4]);
        local_addr[..4].copy_from_slice(&local);
        remote_addr[..4].copy_from_slice(&remote);
    }
    (num, u16::from_be(dport), local_addr, remote_addr)
}

#[inline(always)]
fn snapshot_addresses(sk: *const c_void, state: &mut SockState) {
    let (num, dport, local_addr, remote_addr) = read_addresses(sk, state.family);
    state.local_port = num;
    state.remote_port = dport;
    state.local_addr = local_addr;
    state.remote_addr = remote_addr;
}

/// Emits `CONN_OPEN` with the socket's addresses (for Unix, the path hash) and the owner
/// recorded in `state`.
#[inline(always)]
pub(crate) fn emit_open(sk: *const c_void, state: &mut SockState, unix_hash: u64, flags: u8) {
    let family = state.family;
    let (mut num, mut dport, mut local_addr, mut remote_addr) = (0, 0, [0u8; 16], [0u8; 16]);
    if family == AF_UNIX {
        local_addr[..8].copy_from_slice(&unix_hash.to_ne_bytes());
    } else {
        let live = read_addresses(sk, family);
        (num, dport, local_addr, remote_addr) = live;
        if num == 0 && state.local_port != 0 {
            // Closed before any I/O: the socket has already released its port.
            (num, dport, local_addr, remote_addr) = (
                state.local_port,
                state.remote_port,
                state.local_addr,
                state.remote_addr,
            );
        }
    }
    emit::<ConnOpen>(|record| {
        // SAFETY: `record` points at a reserved, writable ring-buffer slot of this type;
        // every field is written.
        unsafe {
            (*record).header = header(kind::CONN_OPEN, size_of::<ConnOpen>(), state.cookie);
            (*record).owner = state.owner;
            (*record).start_ns = state.start_ns;
            (*record).sock_key = sk as u64;
            (*record).family = family;
            (*record).role = state.role;
            (*record).flags = flags;
            (*record).local_port = 0;
            (*record).remote_port = 0;
            (*record).local_addr = local_addr;
            (*record).remote_addr = remote_addr;
            if family != AF_UNIX {
                (*record).local_port = num;
                (*record).remote_port = dport;
            }
        }
    });
    // Marked sent even when the ring was full: the loss is counted, and user space treats a
    // close for an unknown connection as a connection it missed.
    state.flags |= SOCK_FLAG_OPEN_SENT;
}

#[inline(always)]
pub(crate) fn emit_peer_closed(state: &SockState) {
    emit::<ConnPeerClosed>(|record| {
        // SAFETY: reserved, writable ring-buffer slot of this type; every field is written.
        unsafe {
            (*record).header = header(
                kind::CONN_PEER_CLOSED,
                size_of::<ConnPeerClosed>(),
                state.cookie,
            )
        };
    });
}
