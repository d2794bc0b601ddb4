//! Wire types shared by the kernel programs (`tracer-ebpf`) and the daemon (`tracer`).
//!
//! Everything here crosses the kernel/user boundary as raw bytes, so every type is
//! `#[repr(C)]`, `Copy`, has explicit padding, and carries no `bool`, `enum` or `Option`.
//! Sizes are asserted at compile time: a layout change that is not mirrored on both sides
//! fails the build instead of corrupting events.
#![cfg_attr(not(test), no_std)]

/// Record kinds in the ring buffer. Stable numbers: the decoder rejects anything else.
pub mod kind {
    /// A connection is established and its owner is known ([`super::ConnOpen`]).
    pub const CONN_OPEN: u32 = 1;
    /// A connection ended ([`super::ConnClose`]).
    pub const CONN_CLOSE: u32 = 2;
    /// A different process now does the connection's I/O ([`super::ConnOwner`]).
    pub const CONN_OWNER: u32 = 3;
    /// The peer closed its side (TCP CLOSE_WAIT) ([`super::ConnPeerClosed`]).
    pub const CONN_PEER_CLOSED: u32 = 4;
    /// The owner's thread now relays between this connection and another tracked one of
    /// the other role (a pooler), or stopped (`linked` = 0) ([`super::ConnLink`]).
    pub const CONN_LINK: u32 = 5;
}

/// Connection roles, as in the SPEC.
pub mod role {
    pub const CLIENT: u8 = 1;
    pub const SERVER: u8 = 2;
}

/// Who ended the connection (SPEC `closed_by`).
pub mod closed_by {
    pub const UNKNOWN: u8 = 0;
    pub const LOCAL: u8 = 1;
    pub const PEER: u8 = 2;
    pub const RESET: u8 = 3;
    pub const EXIT: u8 = 4;
}

/// The names user space finds the kernel programs' maps and globals by: the `static`s of
/// `tracer-ebpf/src/maps.rs` are named the same (aya names a map after its static).
pub mod map_name {
    pub const PORTS: &str = "PORTS";
    pub const SOCKS: &str = "SOCKS";
    pub const EVENTS: &str = "EVENTS";
    pub const LOSSES: &str = "LOSSES";
    pub const OFFSETS: &str = "OFFSETS";
    pub const SETTINGS: &str = "SETTINGS";
    pub const WATCHED_UNIX: &str = "WATCHED_UNIX";
    pub const CHANGED: &str = "CHANGED";
}

/// TCP states (`include/net/tcp_states.h`), as `inet_sock_set_state`, `skc_state` and
/// sock_diag report them; Unix sockets report the same numbers to sock_diag.
pub mod tcp_state {
    pub const ESTABLISHED: u8 = 1;
    pub const SYN_SENT: u8 = 2;
    pub const SYN_RECV: u8 = 3;
    pub const FIN_WAIT1: u8 = 4;
    pub const CLOSE: u8 = 7;
    pub const CLOSE_WAIT: u8 = 8;
    pub const LISTEN: u8 = 10;
}

/// Address families, as the kernel numbers them.
pub const AF_UNIX: u16 = 1;
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// Bytes of the ring buffer that carries records to user space.
pub const EVENTS_RING_BYTES: u32 = 4 << 20;

/// The most records the ring holds at once: each takes at least a header and the ring's own
/// 8-byte record header.
pub const EVENTS_RING_RECORDS_MAX: usize =
    EVENTS_RING_BYTES as usize / (size_of::<EventHeader>() + 8);

/// Every record starts with this header.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventHeader {
    /// One of [`kind`].
    pub kind: u32,
    /// Size of the whole record in bytes, header included.
    pub size: u32,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) when the record was made.
    pub ts_ns: u64,
    /// The socket cookie: the connection's identity, the same one `sock_diag` reports.
    pub cookie: u64,
}

/// The process that owns a connection, taken in that process's own context.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcInfo {
    /// Process id (thread group id); 0 when no process context was seen yet.
    pub tgid: u32,
    /// Thread id that did the work.
    pub tid: u32,
    pub uid: u32,
    pub gid: u32,
    /// cgroup v2 id (the cgroup directory's inode number).
    pub cgroup_id: u64,
    /// `task->comm`, NUL-padded.
    pub comm: [u8; 16],
    /// `task->group_leader->start_boottime` (ns since boot): with `tgid`, identifies the
    /// process across pid reuse (it is what `/proc/<pid>/stat` reports as `starttime`).
    pub start_boottime_ns: u64,
}

/// `CONN_OPEN`: a connection on a watched port is established and has an owner.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnOpen {
    pub header: EventHeader,
    pub owner: ProcInfo,
    /// When the kernel first saw the socket (SYN sent or SYN received), monotonic ns; for a
    /// connection found mid-stream, when it was found.
    pub start_ns: u64,
    /// The `SOCKS` key (`struct sock` address), for reading the connection's live state.
    pub sock_key: u64,
    /// [`AF_INET`], [`AF_INET6`] or [`AF_UNIX`].
    pub family: u16,
    /// Local port, host byte order (TCP).
    pub local_port: u16,
    /// Remote port, host byte order (TCP).
    pub remote_port: u16,
    /// One of [`role`].
    pub role: u8,
    /// Bit set of `OPEN_FLAG_*`.
    pub flags: u8,
    /// TCP: IPv4 addresses use the first 4 bytes; network byte order.
    /// Unix: the first 8 bytes hold the socket path's [`path_hash`] (native order).
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
}

/// The connection was found mid-stream (it existed before the probes were attached).
pub const OPEN_FLAG_PREEXISTING: u8 = 1;

/// `CONN_CLOSE`: the socket reached TCP_CLOSE.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnClose {
    pub header: EventHeader,
    pub start_ns: u64,
    /// Payload bytes the owner sent / received (sum of `sock_sendmsg` / `sock_recvmsg`).
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// One of [`closed_by`].
    pub closed_by: u8,
    /// TCP state before TCP_CLOSE.
    pub old_state: u8,
    pub _pad: [u8; 6],
}

/// `CONN_OWNER`: I/O on the connection now comes from another process (fork, fd passing).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnOwner {
    pub header: EventHeader,
    pub owner: ProcInfo,
}

/// `CONN_PEER_CLOSED`: the peer sent FIN while the local side is still open.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnPeerClosed {
    pub header: EventHeader,
}

/// `CONN_LINK`: the owner's thread received on the tracked connection `linked` (of the
/// other role) and then sent on this one: a pooler relaying between a client and a server
/// connection. `linked` = 0: a server connection went idle (ReadyForQuery `I`), which
/// returns it to the pool in transaction pooling. Sent only when the pairing changes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnLink {
    pub header: EventHeader,
    /// Cookie of the other connection; 0: unlinked.
    pub linked: u64,
}

/// Per-socket state kept by the kernel programs, keyed by the `struct sock` address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockState {
    pub cookie: u64,
    pub start_ns: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Monotonic ns of the owner's last send / receive with data (0: none yet).
    pub last_send_ns: u64,
    pub last_recv_ns: u64,
    pub owner: ProcInfo,
    /// [`AF_INET`], [`AF_INET6`] or [`AF_UNIX`].
    pub family: u16,
    pub role: u8,
    /// Bit set of `SOCK_FLAG_*`.
    pub flags: u8,
    pub closed_by: u8,
    /// Bit set of `PROTO_*`: what the protocol reader learned.
    pub proto: u8,
    /// Transaction status of the last ReadyForQuery: `b'I'`, `b'T'`, `b'E'`, or 0 (none yet).
    pub tx_status: u8,
    pub _pad: u8,
    /// The last bytes of the server-to-client stream (see [`protocol`]).
    pub window: [u8; 8],
    /// Ports and addresses taken when the connection was established (TCP): a socket closed
    /// before any I/O has lost them by the time its records are made.
    pub local_port: u16,
    pub remote_port: u16,
    /// The tick generation ([`setting::TICK_GENERATION`]) in which this socket was last
    /// listed in [`ChangedKeys`]: one listing per socket per tick, however much I/O it does.
    pub seen_gen: u32,
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
    /// Cookie of the connection this one was last paired with (see [`ConnLink`]); 0: none.
    pub link: u64,
    /// Client role: the process id the server announced in BackendKeyData at start-up
    /// (0: not seen).
    pub backend_pid: u32,
    /// Client role, during start-up: bytes of the current server message that the next
    /// read starts with (the start-up scan walks message headers across reads).
    pub startup_skip: u32,
}

/// The `CONN_OPEN` record was sent.
pub const SOCK_FLAG_OPEN_SENT: u8 = 1;
/// The owner was captured in process context.
pub const SOCK_FLAG_HAS_OWNER: u8 = 2;
/// The peer closed its side (TCP CLOSE_WAIT, or end-of-file read on a Unix socket).
pub const SOCK_FLAG_PEER_CLOSED: u8 = 4;
/// Found mid-stream rather than seen from its first packet.
pub const SOCK_FLAG_PREEXISTING: u8 = 8;

/// Kernel structure offsets the programs need, read by user space from the running kernel's
/// BTF and handed in as a global at load time (Rust eBPF has no CO-RE relocations).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelOffsets {
    pub sock_common_daddr: u32,
    pub sock_common_rcv_saddr: u32,
    pub sock_common_dport: u32,
    pub sock_common_num: u32,
    pub sock_common_family: u32,
    pub sock_common_v6_daddr: u32,
    pub sock_common_v6_rcv_saddr: u32,
    pub sock_protocol: u32,
    pub sock_type: u32,
    pub task_flags: u32,
    pub task_group_leader: u32,
    pub task_start_boottime: u32,
    pub unix_sock_addr: u32,
    pub unix_sock_peer: u32,
    pub unix_address_len: u32,
    pub unix_address_name: u32,
    pub pt_regs_orig_ax: u32,
    pub pt_regs_di: u32,
    pub pt_regs_si: u32,
    pub pt_regs_dx: u32,
    /// `struct socket.sk`: the trampoline hooks get a `struct socket *`.
    pub socket_sk: u32,
    /// `sock_common.skc_state`: the TCP state.
    pub sock_common_state: u32,
}

impl KernelOffsets {
    /// x86_64 layout of recent kernels (6.x); used only as the compiled-in default, the
    /// daemon always overrides it with offsets read from BTF.
    pub const DEFAULT: Self = Self {
        sock_common_daddr: 0,
        sock_common_rcv_saddr: 4,
        sock_common_dport: 12,
        sock_common_num: 14,
        sock_common_family: 16,
        sock_common_v6_daddr: 56,
        sock_common_v6_rcv_saddr: 72,
        sock_protocol: 532,
        sock_type: 534,
        task_flags: 44,
        task_group_leader: 1328,
        task_start_boottime: 1560,
        unix_sock_addr: 784,
        unix_sock_peer: 872,
        unix_address_len: 4,
        unix_address_name: 8,
        pt_regs_orig_ax: 120,
        pt_regs_di: 112,
        pt_regs_si: 104,
        pt_regs_dx: 96,
        socket_sk: 24,
        sock_common_state: 18,
    };
}

/// Index of the per-CPU loss counters (`LOSSES` map).
pub mod loss {
    /// A ring-buffer reservation failed: the record was dropped.
    pub const RING_FULL: u32 = 0;
    /// The socket table was full: a connection could not be tracked.
    pub const TABLE_FULL: u32 = 1;
    pub const COUNT: u32 = 2;
}

/// `PROTO_*` bits of [`SockState::proto`].
pub mod proto {
    /// The client's first packet was examined.
    pub const FIRST_CLIENT_PACKET: u8 = 1;
    /// The client asked for TLS or GSS encryption; the server's one-byte answer decides.
    pub const ENCRYPTION_REQUESTED: u8 = 2;
    /// The server's first byte was examined.
    pub const FIRST_SERVER_BYTE: u8 = 4;
    /// The stream is encrypted: the protocol cannot be read.
    pub const ENCRYPTED: u8 = 8;
    /// A CancelRequest connection: no session.
    pub const CANCEL: u8 = 16;
    /// The reader saw a syscall it cannot read buffers of (io_uring, sendfile, ...).
    pub const UNREADABLE: u8 = 32;
    /// The start-up scan for BackendKeyData is over (found, ReadyForQuery seen, or lost
    /// its place in the stream).
    pub const STARTUP_SCANNED: u8 = 64;
}

const _: () = {
    assert!(size_of::<EventHeader>() == 24);
    assert!(size_of::<ProcInfo>() == 48);
    assert!(size_of::<ConnOpen>() == 24 + 48 + 8 + 8 + 8 + 32);
    assert!(size_of::<ConnClose>() == 24 + 32);
    assert!(size_of::<ConnOwner>() == 72);
    assert!(size_of::<ConnPeerClosed>() == 24);
    assert!(size_of::<ConnLink>() == 32);
    assert!(size_of::<SockState>() == 168);
    assert!(size_of::<KernelOffsets>() == 88);
    assert!(size_of::<ChangedKeys>() == 8 + 8 * CHANGED_KEYS_MAX);
};

/// Indexes of the `SETTINGS` array map (u32 values), which user space may change while the
/// programs run.
pub mod setting {
    /// 1 while connections that existed before start-up may still be adopted on first sight.
    pub const ADOPT_TCP: u32 = 0;
    /// Bumped whenever the set of watched Unix socket paths changes; cached "not a Postgres
    /// socket" verdicts from older generations are re-checked.
    pub const UNIX_GENERATION: u32 = 1;
    /// The daemon's tick counter (never 0): a tracked socket whose I/O or state changes lists
    /// itself once per generation in the `CHANGED` slot of the generation's parity, so the
    /// tick reads only those sockets instead of the whole table.
    pub const TICK_GENERATION: u32 = 2;
    pub const COUNT: u32 = 3;
}

/// Keys a [`ChangedKeys`] slot holds per CPU per tick; past that the slot overflows and the
/// tick reads the whole table.
pub const CHANGED_KEYS_MAX: usize = 1024;

/// One slot of the per-CPU `CHANGED` array: the keys of the tracked sockets whose state
/// changed during one tick generation, on one CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ChangedKeys {
    /// Keys written; [`CHANGED_KEYS_MAX`] + 1 marks an overflow (some keys were not written).
    pub count: u32,
    pub _pad: u32,
    pub keys: [u64; CHANGED_KEYS_MAX],
}

impl ChangedKeys {
    pub const EMPTY: Self = Self {
        count: 0,
        _pad: 0,
        keys: [0; CHANGED_KEYS_MAX],
    };

    /// The listed keys, or `None` when the slot overflowed and the list is incomplete.
    pub fn listed(&self) -> Option<&[u64]> {
        let count = self.count as usize;
        if count > CHANGED_KEYS_MAX {
            None
        } else {
            Some(&self.keys[..count])
        }
    }
}

/// FNV-1a over a socket path (its first `max_len` bytes, up to the first NUL): the key of
/// the watched-Unix-path map. Shared by the kernel programs and user space so both hash
/// identically.
#[inline(always)]
pub fn path_hash(path: &[u8], max_len: usize) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < path.len() && i < max_len && i < UNIX_PATH_MAX {
        let b = path[i];
        if b == 0 {
            break;
        }
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    hash
}

/// `sizeof(sockaddr_un.sun_path)`.
pub const UNIX_PATH_MAX: usize = 108;

pub mod protocol;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are repr(C), Copy, made only of integers and byte arrays with
    // explicit padding, so every bit pattern is a valid value.
    unsafe impl aya::Pod for super::SockState {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::KernelOffsets {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ChangedKeys {}
}
