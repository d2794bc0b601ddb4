//! The per-socket I/O core: every send and receive of a socket, whichever hook saw it
//! (`io_hooks.rs` has the entry points of each hook set).
//!
//! Why I/O hooks: they run in the context of the process doing the I/O, so they name the
//! real owner of a connection (the Postgres backend forked after the postmaster's accept, the
//! new holder after fork or fd passing), and they carry the byte count; only socket I/O fires
//! them. Per tracked connection they keep bytes, I/O times and the protocol reader's state;
//! user space reads that state when it needs it instead of receiving an event per I/O.
//! A TCP socket is judged on every I/O by its ports (a few direct loads and the port map:
//! cheaper than any lookup); a Unix socket, whose path takes reads and a hash, is judged on
//! its first I/O, there being no Unix connect hook, and marked (socket-local storage,
//! `maps::SOCK_MARKS`): after that it costs one lookup of its mark.
//!
//! Stack: the kernels we support (6.1, 6.12) allow 512 bytes for the deepest chain of
//! calls, each frame rounded up to 32 bytes. The entry stays small and calls one
//! non-inlined step at a time (discovery, then the tracked-socket step), never nested.

use aya_ebpf::helpers::{bpf_get_current_pid_tgid, bpf_get_socket_cookie, bpf_ktime_get_ns};
use core::ffi::c_void;
use tracer_common::{
    AF_INET, AF_INET6, AF_UNIX, ConnLink, ConnOwner, OPEN_FLAG_PREEXISTING, SOCK_FLAG_HAS_OWNER,
    SOCK_FLAG_OPEN_SENT, SOCK_FLAG_PEER_CLOSED, SOCK_FLAG_PREEXISTING, SockState, closed_by, kind,
    loss, proto, protocol, role, setting, tcp_state,
};

use crate::{
    kernel::{fill_current_proc, load_at, offset, read_at},
    maps::{
        LAST_RECV, NO_WAKEUP, SOCKS, WATCHED_UNIX, count_loss, emit, emit_with, mark, note_changed,
        scratch_state, set_sock_mark, setting_value, sock_mark,
    },
    sock_state::{
        emit_close, emit_open, emit_peer_closed, header, preexisting_state, settle_cookie, tcp_role,
    },
    unix::{address_path_hash, unix_address},
    user_buf::{Buffer, current_syscall_buffer, head, read_user, tail8},
};

const SOCK_STREAM: u16 = 1;

/// One send (`sending`) or receive that returned `ret` on socket `sk` (a BTF
/// `struct sock *`), in the context of the process doing it. Most sockets of a host are
/// not Postgres and must cost next to nothing: a TCP socket is judged by its ports (a few
/// direct loads and the port map), a Unix socket by the mark its first I/O left on it.
#[inline(always)]
pub(crate) fn on_io(sk: *const c_void, ret: i32, sending: bool) {
    let family: u16 = load_at(sk, offset!(sock_common_family));
    let state = if family == AF_INET || family == AF_INET6 {
        if tcp_role(sk).is_none() {
            return;
        }
        match SOCKS.get_ptr_mut(&(sk as u64)) {
            Some(state) => state,
            // Before start-up adoption ends, a connection that existed before the probes.
            None if setting_value(setting::ADOPT_TCP) == 1 => match adopt_tcp(sk, family) {
                Some(state) => state,
                None => return,
            },
            None => return,
        }
    } else if family == AF_UNIX {
        match sock_mark(sk) {
            Some(mark) if mark.verdict == mark::TRACKED => match SOCKS.get_ptr_mut(&(sk as u64)) {
                Some(state) => state,
                // Forgotten by user space after its close: nothing to follow.
                None => return,
            },
            Some(mark) if mark.verdict == mark::NOT_POSTGRES => return,
            Some(mark) if mark.generation == setting_value(setting::UNIX_GENERATION) => return,
            _ => match discover_unix(sk, ret, sending) {
                Some(state) => state,
                None => return,
            },
        }
    } else {
        return;
    };
    on_tracked_io(sk, state, ret, sending);
}

/// I/O on a tracked socket.
#[inline(never)]
fn on_tracked_io(sk: *const c_void, state: *mut SockState, ret: i32, sending: bool) {
    // SAFETY: the map value stays valid while this program runs.
    let state = unsafe { &mut *state };
    settle_cookie(sk, state);
    note_changed(sk as u64, state);
    if state.family == AF_UNIX {
        if ret == 0 && !sending && state.flags & SOCK_FLAG_PEER_CLOSED == 0 {
            // End of file: the peer closed its end.
            state.flags |= SOCK_FLAG_PEER_CLOSED;
            if state.closed_by == closed_by::UNKNOWN {
                state.closed_by = closed_by::PEER;
            }
            emit_peer_closed(state);
        }
    }
    let mut went_idle = false;
    if ret > 0 {
        let len = ret as u64;
        // SAFETY: helper without arguments.
        let now = unsafe { bpf_ktime_get_ns() };
        // Not atomic (the BPF target has no fetch-add in Rust's core): two threads writing
        // one socket at the same instant could lose an increment, which libpq-style clients
        // (one thread per connection) never do.
        if sending {
            state.bytes_sent += len;
            state.last_send_ns = now;
        } else {
            state.bytes_received += len;
            state.last_recv_ns = now;
        }
        went_idle = read_protocol(state, len, sending);
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    relay(state, pid_tgid as u32, ret, sending, went_idle);
    if state.flags & SOCK_FLAG_HAS_OWNER != 0 && state.owner.tgid == (pid_tgid >> 32) as u32 {
        return;
    }
    take_ownership(sk, state);
}

/// Pairs connections relayed by one thread: a receive on a tracked connection followed, in
/// the same thread, by a send on a tracked one of the other role is a pooler (PgBouncer is
/// single-threaded per process) forwarding a client's request to the server connection it
/// is linked to, or a server's answer to the client. The pairing is kept on the sending
/// socket and reported only when it changes. A server connection's answer that ends with
/// ReadyForQuery `I` unlinks it (transaction pooling returns it to the pool then; user space
/// decides whether the pooler does that), and forwarding that answer links nothing.
/// Costs a per-CPU slot per tracked I/O and a record (no wake-up) per change.
#[inline(never)]
fn relay(state: &mut SockState, tid: u32, ret: i32, sending: bool, went_idle: bool) {
    let Some(last) = LAST_RECV.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU slot, only this CPU uses it while the program runs.
    let last = unsafe { &mut *last };
    if !sending {
        if went_idle && state.role == role::CLIENT && state.link != 0 {
            state.link = 0;
            emit_link(state.cookie, 0);
        }
        // Every receive, even one that found nothing (EAGAIN): PgBouncer reads a waiting
        // client's socket before it sends the client's queued request to its new server.
        last.tid = tid;
        last.role = state.role;
        last.idle = u8::from(went_idle);
        last.cookie = state.cookie;
        return;
    }
    if ret <= 0 || last.tid != tid || last.role == state.role || last.cookie == 0 {
        return;
    }
    if (last.idle != 0 && state.role == role::SERVER) || state.link == last.cookie {
        return;
    }
    state.link = last.cookie;
    emit_link(state.cookie, last.cookie);
}

/// Without waking the reader: a pooler makes a few per transaction, and the daemon picks
/// them up with the next record or at its tick.
#[inline(always)]
fn emit_link(cookie: u64, linked: u64) {
    emit_with::<ConnLink>(NO_WAKEUP, |record| {
        // SAFETY: reserved, writable ring-buffer slot of this type; every field is written.
        unsafe {
            (*record).header = header(kind::CONN_LINK, size_of::<ConnLink>(), cookie);
            (*record).linked = linked;
        }
    });
}

/// Follows the protocol (see `tracer_common::protocol`) on a read or write of `len` bytes;
/// true when it ended a server's answer with ReadyForQuery `I`.
/// Not inlined: its own stack frame keeps the program under the 512-byte stack limit.
#[inline(never)]
fn read_protocol(state: &mut SockState, len: u64, sending: bool) -> bool {
    if state.proto & (proto::ENCRYPTED | proto::CANCEL) != 0 {
        return false;
    }
    let to_server = sending == (state.role == role::CLIENT);
    if to_server
        && (state.proto & proto::FIRST_CLIENT_PACKET != 0
            || state.flags & SOCK_FLAG_PREEXISTING != 0)
    {
        // Requests need no reading once the first packet is classified: the cheap path.
        return false;
    }
    let Some(buffer) = current_syscall_buffer(sending) else {
        state.proto |= proto::UNREADABLE;
        return false;
    };
    if to_server {
        if let Some(head) = head::<8>(buffer, len) {
            state.proto |= protocol::classify_client_packet(&head);
        }
        return false;
    }
    let Some((tail, count)) = tail8(buffer, len) else {
        return false;
    };
    let mut skip_first = 0;
    if state.proto & proto::FIRST_CLIENT_PACKET != 0 && state.proto & proto::FIRST_SERVER_BYTE == 0
    {
        // The answer to an encryption request is a single byte; it starts this read.
        let requested = state.proto & proto::ENCRYPTION_REQUESTED != 0;
        if let Some([first]) = head::<1>(buffer, len) {
            state.proto = protocol::after_first_server_byte(state.proto, first);
        }
        if state.proto & proto::ENCRYPTED != 0 {
            return false;
        }
        // Refused ('N'): that byte is no message.
        skip_first = u32::from(requested);
    }
    if state.role == role::CLIENT
        && state.tx_status == 0
        && state.proto & proto::STARTUP_SCANNED == 0
        && state.flags & SOCK_FLAG_PREEXISTING == 0
    {
        // Still in the start-up answer: look for BackendKeyData.
        scan_startup(state, buffer, len, skip_first);
    }
    protocol::roll_window(&mut state.window, &tail, count);
    if let Some(status) = protocol::ready_for_query_status(&state.window) {
        state.tx_status = status;
        return status == protocol::TX_IDLE;
    }
    false
}

/// One read of a client's start-up answer, walked message by message for BackendKeyData
/// (only until the first ReadyForQuery: a few reads in a connection's life). Only the
/// first segment of a vectored read is walked. Not inlined, for the stack.
#[inline(never)]
fn scan_startup(state: &mut SockState, buffer: Buffer, len: u64, skip_first: u32) {
    let (base, seg_len) = match buffer {
        Buffer::Flat(base) => (base, len),
        Buffer::Vector(iov, count) => {
            let seg: Option<(u64, u64)> = if count == 0 {
                None
            } else {
                read_user::<u64>(iov).zip(read_user::<u64>(iov + 8))
            };
            match seg {
                Some((base, seg_len)) if seg_len >= len => (base, len),
                _ => {
                    state.proto |= proto::STARTUP_SCANNED;
                    return;
                }
            }
        }
    };
    let scan = protocol::scan_startup(
        state.startup_skip + skip_first,
        seg_len,
        |at| read_user::<[u8; 5]>(base + at),
        |at| read_user::<[u8; 4]>(base + at),
    );
    match scan {
        protocol::StartupScan::Continue(skip) => state.startup_skip = skip,
        protocol::StartupScan::BackendPid(pid) => {
            state.backend_pid = pid;
            state.proto |= proto::STARTUP_SCANNED;
        }
        protocol::StartupScan::Over => state.proto |= proto::STARTUP_SCANNED,
    }
}

/// A Unix socket without a mark, or judged against older watched paths: is it a Postgres
/// connection? Not inlined: this runs about once per socket and keeps its stack out of the
/// tracked-socket step's chain.
///
/// A connection on a watched path is tracked from its first I/O that moved bytes. There is
/// no Unix connect hook, so that I/O also tells a new connection from one that existed
/// before the probes: every new connection begins with the client's start-up packet
/// (start-up, encryption or cancel request), whose first byte is the high byte of its
/// length, 0; every later message begins with its type letter. An I/O that moved nothing
/// (a non-blocking read of an idle backend, woken by a signal) does not track it: the
/// start-up scan finds it as it is.
#[inline(never)]
fn discover_unix(sk: *const c_void, ret: i32, sending: bool) -> Option<*mut SockState> {
    let sock_type: u16 = read_at(sk, offset!(sock_type))?;
    // Socket pairs have no path (and connected stream sockets always have their peer).
    let address = (sock_type == SOCK_STREAM)
        .then(|| unix_address(sk))
        .flatten();
    let Some((address, is_server)) = address else {
        set_sock_mark(sk, mark::NOT_POSTGRES, 0);
        return None;
    };
    let generation = setting_value(setting::UNIX_GENERATION);
    let hash = address_path_hash(address).filter(|hash| {
        // SAFETY: read-only use of the map value.
        unsafe { WATCHED_UNIX.get(hash) }.is_some()
    });
    let Some(hash) = hash else {
        set_sock_mark(sk, mark::UNIX_UNWATCHED, generation);
        return None;
    };
    if ret <= 0 {
        // Unmarked: judged again at its next I/O, which only watched sockets pay.
        return None;
    }
    let preexisting = !starts_connection(ret, sending, is_server);
    // SAFETY: `sk` is the hook's BTF socket argument.
    let cookie = unsafe { bpf_get_socket_cookie(sk as *mut c_void) };
    let key = sk as u64;
    if let Some(entry) = SOCKS.get_ptr_mut(&key) {
        // SAFETY: the map value stays valid while this program runs.
        let old = unsafe { &*entry };
        if old.cookie == cookie {
            // This very socket, whose mark could not be stored before.
            set_sock_mark(sk, mark::TRACKED, 0);
            return Some(entry);
        }
        // Unix sockets have no close hook: user space notices a close later and removes
        // the entry, so an entry may outlive its socket and the address be reused. Report
        // the old connection's end with its final counts, then track this one.
        emit_close(old, 0);
        let _ = SOCKS.remove(&key);
    }
    let state = scratch_state()?;
    state.cookie = cookie;
    // SAFETY: helper without arguments.
    state.start_ns = unsafe { bpf_ktime_get_ns() };
    state.family = AF_UNIX;
    state.role = if is_server {
        role::SERVER
    } else {
        role::CLIENT
    };
    let open_flags = if preexisting {
        // Its start-up is behind it: the protocol reader picks up mid-stream.
        state.flags = SOCK_FLAG_PREEXISTING;
        OPEN_FLAG_PREEXISTING
    } else {
        0
    };
    let tracked = track(sk, key, state, hash, open_flags);
    if tracked.is_some() {
        set_sock_mark(sk, mark::TRACKED, 0);
    } else {
        // The table is full (counted once in `track`): judged again only with new watched
        // paths, so that its every I/O does not count the same loss again.
        set_sock_mark(sk, mark::UNIX_UNWATCHED, generation);
    }
    tracked
}

/// Whether the first I/O seen on a Unix connection (`ret` > 0 bytes) is its start: the
/// client's first packet, which begins with a zero byte (see `discover_unix`). An answer
/// seen first means the start-up is behind it; data that cannot be read counts as a start.
/// Not inlined: its buffer reads stay out of the discovery frame.
#[inline(never)]
fn starts_connection(ret: i32, sending: bool, is_server: bool) -> bool {
    let to_server = sending != is_server;
    if !to_server {
        // A new connection's first bytes go to the server.
        return false;
    }
    let Some(buffer) = current_syscall_buffer(sending) else {
        return true;
    };
    match head::<1>(buffer, ret as u64) {
        Some([first]) => first == 0,
        None => true,
    }
}

/// A TCP connection on a watched port that existed before the probes were attached. Not
/// inlined, for the same stack reason.
#[inline(never)]
fn adopt_tcp(sk: *const c_void, family: u16) -> Option<*mut SockState> {
    // Only a live connection: a read on one that has ended (it returns the reset or the end
    // of file) must not bring it back.
    let now: u8 = load_at(sk, offset!(sock_common_state));
    if now != tcp_state::ESTABLISHED && now != tcp_state::CLOSE_WAIT {
        return None;
    }
    let state = preexisting_state(sk, family)?;
    track(sk, sk as u64, state, 0, OPEN_FLAG_PREEXISTING)
}

/// Inserts the entry; the open record follows from the caller's ownership step.
#[inline(always)]
fn track(
    sk: *const c_void,
    key: u64,
    state: &SockState,
    unix_hash: u64,
    open_flags: u8,
) -> Option<*mut SockState> {
    if SOCKS.insert(&key, state, 0).is_err() {
        count_loss(loss::TABLE_FULL);
        return None;
    }
    let entry = SOCKS.get_ptr_mut(&key)?;
    // Owner first, then the open record carries it.
    // SAFETY: the map value stays valid while this program runs.
    let entry_ref = unsafe { &mut *entry };
    fill_current_proc(&mut entry_ref.owner);
    entry_ref.flags |= SOCK_FLAG_HAS_OWNER;
    emit_open(sk, entry_ref, unix_hash, open_flags);
    Some(entry)
}

/// The current process does I/O on a connection it was not known to own.
#[inline(never)]
fn take_ownership(sk: *const c_void, state: &mut SockState) {
    fill_current_proc(&mut state.owner);
    state.flags |= SOCK_FLAG_HAS_OWNER;
    if state.flags & SOCK_FLAG_OPEN_SENT == 0 {
        // Server role: the first I/O names the process that serves the connection.
        emit_open(sk, state, 0, 0);
        return;
    }
    emit::<ConnOwner>(|record| {
        // SAFETY: reserved, writable ring-buffer slot of this type; every field is written.
        unsafe {
            (*record).header = header(kind::CONN_OWNER, size_of::<ConnOwner>(), state.cookie);
            (*record).owner = state.owner;
        }
    });
}
