//! Maps and load-time settings shared by the programs.

use aya_ebpf::{
    Global,
    macros::map,
    maps::{Array, HashMap, PerCpuArray, RingBuf},
};
use tracer_common::{KernelOffsets, SockState, loss};

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
