//! Maps and load-time settings shared by the programs. User space finds them by the names in
//! `tracer_common::map_name`: a static renamed here must be renamed there.

use aya_ebpf::{
    Global,
    bindings::BPF_SK_STORAGE_GET_F_CREATE,
    btf_maps::SkStorage,
    helpers::generated::bpf_sk_storage_get,
    macros::{btf_map, map},
    maps::{Array, HashMap, PerCpuArray, RingBuf},
};
use core::ffi::c_void;
use tracer_common::{
    CHANGED_KEYS_MAX, ChangedKeys, EVENTS_RING_BYTES, KernelOffsets, SockState, loss, setting,
};

/// Watched TCP ports: index = port, value 1 = watched. Filled by user space.
#[map]
pub(crate) static PORTS: Array<u8> = Array::with_max_entries(65536, 0);

/// Per-socket state of tracked connections, keyed by `struct sock` address. The entry is
/// removed when the socket reaches TCP_CLOSE, so an address reused later starts afresh.
#[map]
pub(crate) static SOCKS: HashMap<u64, SockState> = HashMap::with_max_entries(65536, 0);

/// Records for user space.
#[map]
pub(crate) static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_RING_BYTES, 0);

/// Loss counters, indexed by [`tracer_common::loss`].
#[map]
pub(crate) static LOSSES: PerCpuArray<u64> = PerCpuArray::with_max_entries(loss::COUNT, 0);

/// Structure offsets of the running kernel, set by the loader from BTF.
#[unsafe(no_mangle)]
pub(crate) static OFFSETS: Global<KernelOffsets> = Global::new(KernelOffsets::DEFAULT);

#[inline(always)]
pub(crate) fn count_loss(index: u32) {
    if let Some(counter) = LOSSES.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *counter += 1 };
    }
}

#[inline(always)]
pub(crate) fn port_watched(port: u16) -> bool {
    matches!(PORTS.get(u32::from(port)), Some(&1))
}

/// Run-time settings, indexed by [`tracer_common::setting`].
#[map]
pub(crate) static SETTINGS: Array<u32> = Array::with_max_entries(setting::COUNT, 0);

/// Hashes ([`tracer_common::path_hash`]) of the Unix socket paths that count as Postgres,
/// filled by user space from the listening sockets that match the configured glob.
#[map]
pub(crate) static WATCHED_UNIX: HashMap<u64, u8> = HashMap::with_max_entries(1024, 0);

/// What the programs already know of a socket, kept on the socket itself (socket-local
/// storage, freed with the socket): most socket I/O on a host is not Postgres, and a socket
/// judged once must then cost one helper call, not a hash lookup, a path read and a hash.
#[btf_map]
pub(crate) static SOCK_MARKS: SkStorage<SockMark> = SkStorage::new();

#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct SockMark {
    /// One of [`mark`].
    pub verdict: u32,
    /// For [`mark::UNIX_UNWATCHED`]: the `UNIX_GENERATION` of watched paths it was judged
    /// against; a newer set of paths judges the socket again.
    pub generation: u32,
}

/// Verdicts of [`SockMark`].
pub(crate) mod mark {
    /// The socket is in `SOCKS`.
    pub(crate) const TRACKED: u32 = 1;
    /// A Unix socket that is never a Postgres connection (a socket pair, a datagram socket).
    pub(crate) const NOT_POSTGRES: u32 = 2;
    /// A Unix stream socket whose path is not watched (yet).
    pub(crate) const UNIX_UNWATCHED: u32 = 3;
}

/// The mark of socket `sk` (a BTF `struct sock *`), if it has one.
#[inline(always)]
pub(crate) fn sock_mark(sk: *const c_void) -> Option<&'static mut SockMark> {
    // SAFETY: the map pointer is the map's own definition (the loader relocates it) and `sk`
    // is a BTF socket pointer, as the helper requires; it returns null or the socket's value.
    let value = unsafe {
        bpf_sk_storage_get(
            core::ptr::from_ref(&SOCK_MARKS).cast_mut().cast(),
            sk.cast_mut(),
            core::ptr::null_mut(),
            0,
        )
    };
    // SAFETY: a non-null result points at this socket's `SockMark`, valid while the program
    // runs.
    unsafe { value.cast::<SockMark>().as_mut() }
}

/// Marks socket `sk`; a full map or an allocation failure leaves it unmarked (it is then
/// judged again on its next I/O, which costs time, not correctness).
#[inline(always)]
pub(crate) fn set_sock_mark(sk: *const c_void, verdict: u32, generation: u32) {
    // SAFETY: as in `sock_mark`; with F_CREATE the helper allocates a zeroed value.
    let value = unsafe {
        bpf_sk_storage_get(
            core::ptr::from_ref(&SOCK_MARKS).cast_mut().cast(),
            sk.cast_mut(),
            core::ptr::null_mut(),
            u64::from(BPF_SK_STORAGE_GET_F_CREATE),
        )
    };
    // SAFETY: as in `sock_mark`.
    if let Some(mark) = unsafe { value.cast::<SockMark>().as_mut() } {
        mark.verdict = verdict;
        mark.generation = generation;
    }
}

#[inline(always)]
pub(crate) fn setting_value(index: u32) -> u32 {
    SETTINGS.get(index).copied().unwrap_or(0)
}

/// Tracked sockets whose state changed, per CPU, in two slots picked by the parity of the
/// tick generation: the programs fill the current generation's slot while the daemon reads
/// the previous one (and empties it a tick later, before its reuse), so an idle tick reads
/// nothing from `SOCKS`.
#[map]
pub(crate) static CHANGED: PerCpuArray<ChangedKeys> = PerCpuArray::with_max_entries(2, 0);

/// Lists socket `key` (whose state is `state`) as changed in this tick generation, once.
#[inline(always)]
pub(crate) fn note_changed(key: u64, state: &mut SockState) {
    let generation = setting_value(setting::TICK_GENERATION);
    if state.seen_gen == generation {
        return;
    }
    state.seen_gen = generation;
    let Some(slot) = CHANGED.get_ptr_mut(generation & 1) else {
        return;
    };
    // SAFETY: per-CPU slot, only this CPU writes it while the program runs; the daemon
    // empties it only between generations of the other parity.
    let slot = unsafe { &mut *slot };
    let count = slot.count as usize;
    if let Some(entry) = slot.keys.get_mut(count) {
        *entry = key;
    }
    // One past the end marks an overflow: the daemon then reads the whole table.
    if count <= CHANGED_KEYS_MAX {
        slot.count += 1;
    }
}

/// The tracked socket the current CPU's last receive was on: a pooler receives on one
/// connection and sends what it got on the connection linked to it, in the same thread
/// (see `sock_io::relay`).
#[map]
pub(crate) static LAST_RECV: PerCpuArray<LastRecv> = PerCpuArray::with_max_entries(1, 0);

#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct LastRecv {
    /// The thread that received (0: none yet).
    pub tid: u32,
    /// The connection's role.
    pub role: u8,
    /// The read ended a server's answer with ReadyForQuery `I`.
    pub idle: u8,
    pub _pad: [u8; 2],
    pub cookie: u64,
}

/// Per-CPU scratch space for values too large for the 512-byte BPF stack.
#[map]
pub(crate) static SCRATCH_STATE: PerCpuArray<SockState> = PerCpuArray::with_max_entries(1, 0);
#[map]
pub(crate) static SCRATCH_PATH: PerCpuArray<[u8; 128]> = PerCpuArray::with_max_entries(1, 0);

/// A zeroed per-CPU `SockState` to fill and insert.
#[inline(always)]
pub(crate) fn scratch_state() -> Option<&'static mut SockState> {
    let state = SCRATCH_STATE.get_ptr_mut(0)?;
    // SAFETY: per-CPU slot owned by this program run; SockState is valid when zeroed.
    unsafe {
        state.write_bytes(0, 1);
        Some(&mut *state)
    }
}

/// Writes one record into the ring buffer in place (no stack copy); counts a loss when full.
#[inline(always)]
pub(crate) fn emit<T: 'static>(fill: impl FnOnce(*mut T)) {
    emit_with(0, fill);
}

/// `BPF_RB_NO_WAKEUP`: the record waits for the reader's next wake-up (another record, or
/// its tick). Waking the reader queues an irq_work, a self-IPI: microseconds on a virtual
/// machine, for records that come with every pooled transaction.
pub(crate) const NO_WAKEUP: u64 = 1;

/// [`emit`] with ring-buffer submit `flags`.
#[inline(always)]
pub(crate) fn emit_with<T: 'static>(flags: u64, fill: impl FnOnce(*mut T)) {
    match EVENTS.reserve::<T>(0) {
        Some(mut entry) => {
            fill(entry.as_mut_ptr());
            entry.submit(flags);
        }
        None => count_loss(loss::RING_FULL),
    }
}
