//! Hooks: `sock_send_length` / `sock_recv_length` (BTF tracepoints), fired by
//! `sock_sendmsg` / `sock_recvmsg`, which every send and receive path of a socket goes
//! through (write, writev, send, sendto, sendmsg, read, readv, recv*, ...).
//!
//! Why these hooks: they run in the context of the process doing the I/O, so they name the
//! real owner of a connection (the Postgres backend forked after the postmaster's accept, the
//! new holder after fork or fd passing), and they carry the byte count. Sockets that are not
//! tracked cost one hash lookup.

use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};
use core::ffi::c_void;
use tracer_common::{ConnOwner, SOCK_FLAG_HAS_OWNER, SOCK_FLAG_OPEN_SENT, SockState, kind, loss};

use crate::{
    kernel::{current_proc, current_tgid},
    maps::{EVENTS, SOCKS, count_loss},
    sock_state::{emit_open, header},
};

/// `MSG_PEEK`: the data stays queued and will be received (and counted) again.
const MSG_PEEK: i32 = 2;

#[btf_tracepoint(function = "sock_send_length")]
pub fn pgc_sock_send(ctx: BtfTracePointContext) -> i32 {
    let sk: *const c_void = ctx.arg(0);
    let ret: i32 = ctx.arg(1);
    on_io(sk, ret, Direction::Send);
    0
}

#[btf_tracepoint(function = "sock_recv_length")]
pub fn pgc_sock_recv(ctx: BtfTracePointContext) -> i32 {
    let sk: *const c_void = ctx.arg(0);
    let ret: i32 = ctx.arg(1);
    let flags: i32 = ctx.arg(2);
    let ret = if flags & MSG_PEEK != 0 { 0 } else { ret };
    on_io(sk, ret, Direction::Receive);
    0
}

enum Direction {
    Send,
    Receive,
}

#[inline(always)]
fn on_io(sk: *const c_void, ret: i32, direction: Direction) {
    let Some(state) = SOCKS.get_ptr_mut(&(sk as u64)) else {
        return;
    };
    // SAFETY: the map value stays valid while this program runs.
    let state = unsafe { &mut *state };
    if ret > 0 {
        let counter = match direction {
            Direction::Send => &mut state.bytes_sent,
            Direction::Receive => &mut state.bytes_received,
        };
        // Not atomic (the BPF target has no fetch-add in Rust's core): two threads writing
        // one socket at the same instant could lose an increment, which libpq-style clients
        // (one thread per connection) never do.
        *counter += ret as u64;
    }
    if state.flags & SOCK_FLAG_HAS_OWNER != 0 && state.owner.tgid == current_tgid() {
        return;
    }
    take_ownership(sk, state);
}

/// The current process does I/O on a connection it was not known to own.
#[inline(always)]
fn take_ownership(sk: *const c_void, state: &mut SockState) {
    state.owner = current_proc();
    state.flags |= SOCK_FLAG_HAS_OWNER;
    if state.flags & SOCK_FLAG_OPEN_SENT == 0 {
        // Server role: the first I/O names the process that serves the connection.
        emit_open(sk, state);
        return;
    }
    let record = ConnOwner {
        header: header(kind::CONN_OWNER, size_of::<ConnOwner>(), state.cookie),
        owner: state.owner,
    };
    if EVENTS.output::<ConnOwner>(&record, 0).is_err() {
        count_loss(loss::RING_FULL);
    }
}
