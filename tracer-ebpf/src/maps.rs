//! Maps and load-time settings shared by the programs.

use aya_ebpf::{
    Global,
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use tracer_common::{KernelOffsets, SockState, loss, setting};

/// Watched TCP ports: index = port, value 1 = watched. Filled by user space.
#[map]
pub static PORTS: Array<u8> = Array::with_max_entries(65536, 0);

/// Per-socket state of tracked connections, keyed by `struct sock` address. The entry is
/// removed when the socket reaches TCP_CLOSE, so an address reused later starts afresh.
#[map]
pub static SOCKS: HashMap<u64, SockState> = HashMap::with_max_entries(65536, 0);

/// Records for user space.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(4 << 20, 0);

/// Loss counters, indexed by [`tracer_common::loss`].
#[map]
pub static LOSSES: PerCpuArray<u64> = PerCpuArray::with_max_entries(loss::COUNT, 0);

/// Structure offsets of the running kernel, set by the loader from BTF.
#[unsafe(no_mangle)]
pub static OFFSETS: Global<KernelOffsets> = Global::new(KernelOffsets::DEFAULT);

#[inline(always)]
pub fn count_loss(index: u32) {
    if let Some(counter) = LOSSES.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *counter += 1 };
    }
}

#[inline(always)]
pub fn port_watched(port: u16) -> bool {
    matches!(PORTS.get(u32::from(port)), Some(&1))
}

/// Run-time settings, indexed by [`tracer_common::setting`].
#[map]
pub static SETTINGS: Array<u32> = Array::with_max_entries(setting::COUNT, 0);

/// Hashes ([`tracer_common::path_hash`]) of the Unix socket paths that count as Postgres,
/// filled by user space from the listening sockets that match the configured glob.
#[map]
pub static WATCHED_UNIX: HashMap<u64, u8> = HashMap::with_max_entries(1024, 0);

/// Unix sockets already found not to be Postgres connections, keyed by `struct sock`
/// address: most Unix I/O on a host is not Postgres and must cost one lookup, not a path
/// read and hash. The verdict holds only for the same socket (cookie: addresses are reused
/// after a socket is freed) and the same `UNIX_GENERATION` of watched paths.
#[map]
pub static UNIX_CHECKED: LruHashMap<u64, UnixVerdict> = LruHashMap::with_max_entries(16384, 0);

#[repr(C)]
#[derive(Clone, Copy)]
pub struct UnixVerdict {
    pub cookie: u64,
    pub generation: u32,
    pub _pad: u32,
}

#[inline(always)]
pub fn setting_value(index: u32) -> u32 {
    SETTINGS.get(index).copied().unwrap_or(0)
}

/// Per-CPU scratch space for values too large for the 512-byte BPF stack.
#[map]
pub static SCRATCH_STATE: PerCpuArray<SockState> = PerCpuArray::with_max_entries(1, 0);
#[map]
pub static SCRATCH_PATH: PerCpuArray<[u8; 128]> = PerCpuArray::with_max_entries(1, 0);

/// A zeroed per-CPU `SockState` to fill and insert.
#[inline(always)]
pub fn scratch_state() -> Option<&'static mut SockState> {
    let state = SCRATCH_STATE.get_ptr_mut(0)?;
    // SAFETY: per-CPU slot owned by this program run; SockState is valid when zeroed.
    unsafe {
        state.write_bytes(0, 1);
        Some(&mut *state)
    }
}

/// Writes one record into the ring buffer in place (no stack copy); counts a loss when full.
#[inline(always)]
pub fn emit<T: 'static>(fill: impl FnOnce(*mut T)) {
    match EVENTS.reserve::<T>(0) {
        Some(mut entry) => {
            fill(entry.as_mut_ptr());
            entry.submit(0);
        }
        None => count_loss(loss::RING_FULL),
    }
}
