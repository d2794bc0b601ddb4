//! Entry points of the I/O hook sets; each hands one socket send or receive to the
//! per-socket core (`sock_io::on_io`). User space attaches one set, chosen by what the
//! running kernel has (see `tracer::probes`):
//!
//! - tracepoints (kernels after 6.1; 6.12 and 6.18 have them): the BTF tracepoints `sock_send_length` / `sock_recv_length`,
//!   fired at the end of `sock_sendmsg` / `sock_recvmsg`, which every send and receive path
//!   of a socket goes through (write, writev, send*, read, readv, recv*).
//! - trampolines (kernels without those tracepoints: 6.1, 5.15, ...): fexit on the functions
//!   every send and receive of a TCP or Unix stream socket goes through: `tcp_sendmsg`,
//!   `unix_stream_sendmsg` and `sock_recvmsg`. Their signatures have been stable for years,
//!   so the return value sits right after the arguments (read from the context, which works
//!   before `bpf_get_func_ret` existed in 5.17).
//!
//! Both run in the context of the process doing the I/O; neither is a syscall tracepoint,
//! so no other syscall of the host pays anything.

use aya_ebpf::{
    macros::{btf_tracepoint, fexit},
    programs::{BtfTracePointContext, FExitContext},
};
use core::ffi::c_void;

use crate::{
    kernel::{load_at, offset},
    sock_io::on_io,
};

/// `MSG_PEEK`: the data stays queued and will be received (and counted) again.
const MSG_PEEK: i32 = 2;

#[btf_tracepoint(function = "sock_send_length")]
pub(crate) fn pgc_sock_send(ctx: BtfTracePointContext) -> i32 {
    let sk: *const c_void = ctx.arg(0);
    let ret: i32 = ctx.arg(1);
    on_io(sk, ret, true);
    0
}

#[btf_tracepoint(function = "sock_recv_length")]
pub(crate) fn pgc_sock_recv(ctx: BtfTracePointContext) -> i32 {
    let sk: *const c_void = ctx.arg(0);
    let ret: i32 = ctx.arg(1);
    let flags: i32 = ctx.arg(2);
    if flags & MSG_PEEK == 0 {
        on_io(sk, ret, false);
    }
    0
}

/// `int tcp_sendmsg(struct sock *sk, struct msghdr *msg, size_t size)`: TCP over IPv4 and
/// IPv6. Not `sock_sendmsg`: the compiler inlines that into the send syscalls (6.1's
/// `sendto` never reaches its trampoline), while `tcp_sendmsg` is reached through the
/// protocol's function pointer and so always called.
#[fexit(function = "tcp_sendmsg")]
pub(crate) fn pgc_tcp_sendmsg_exit(ctx: FExitContext) -> i32 {
    let sk: *const c_void = ctx.arg(0);
    let ret: i32 = ctx.arg(3);
    on_io(sk, ret, true);
    0
}

/// `int unix_stream_sendmsg(struct socket *sock, struct msghdr *msg, size_t len)`: Unix
/// stream sockets (libpq's default transport), reached through the socket's operations.
#[fexit(function = "unix_stream_sendmsg")]
pub(crate) fn pgc_unix_sendmsg_exit(ctx: FExitContext) -> i32 {
    let sock: *const c_void = ctx.arg(0);
    let ret: i32 = ctx.arg(3);
    on_io(socket_sk(sock), ret, true);
    0
}

/// `int sock_recvmsg(struct socket *sock, struct msghdr *msg, int flags)`.
#[fexit(function = "sock_recvmsg")]
pub(crate) fn pgc_recvmsg_exit(ctx: FExitContext) -> i32 {
    let sock: *const c_void = ctx.arg(0);
    let flags: i32 = ctx.arg(2);
    let ret: i32 = ctx.arg(3);
    if flags & MSG_PEEK == 0 {
        on_io(socket_sk(sock), ret, false);
    }
    0
}

/// `sock->sk`, read as a direct load through the BTF pointer so that the verifier types
/// the result as `struct sock *` (what `bpf_get_socket_cookie` requires); the offset is a
/// read-only constant it can follow.
#[inline(always)]
fn socket_sk(sock: *const c_void) -> *const c_void {
    load_at(sock, offset!(socket_sk))
}

/// Empty programs on the tracepoint set's hooks, never attached by the daemon: the
/// benchmark attaches them alone to measure what `kernel.bpf_stats_enabled` accounts to any
/// program on these hooks (its own clock reads), the floor under every per-call figure.
#[btf_tracepoint(function = "sock_send_length")]
pub(crate) fn pgc_floor_send(_ctx: BtfTracePointContext) -> i32 {
    0
}

#[btf_tracepoint(function = "sock_recv_length")]
pub(crate) fn pgc_floor_recv(_ctx: BtfTracePointContext) -> i32 {
    0
}
