//! Reading a whole BPF hash map in batches (`BPF_MAP_LOOKUP_BATCH`, Linux 5.6+), which aya
//! does not offer: one system call per few thousand entries instead of two per entry.

use rustc_hash::FxHashMap;
use std::{
    hash::Hash,
    io,
    os::fd::{AsRawFd as _, BorrowedFd},
};

/// `BPF_MAP_LOOKUP_BATCH` (`enum bpf_cmd`).
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
/// Entries asked for per call.
const BATCH: usize = 4096;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Every entry of the hash map behind `fd`. `K` and `V` must be the map's exact key and
/// value types (plain `repr(C)` data, valid for any bit pattern: `aya::Pod`).
pub(super) fn read_all<K, V>(fd: BorrowedFd<'_>, expected: usize) -> io::Result<FxHashMap<K, V>>
where
    K: aya::Pod + Eq + Hash,
    V: aya::Pod,
{
    // Sized for the entries expected: growing a table of 20,000 every second was a tenth of
    // an idle daemon's time.
    let mut out = FxHashMap::with_capacity_and_hasher(expected, Default::default());
    let mut keys: Vec<K> = Vec::with_capacity(BATCH);
    let mut values: Vec<V> = Vec::with_capacity(BATCH);
    // The hash table's batch token is a bucket index (u32); 8 bytes leave room.
    let mut token = [0u64; 1];
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { token.as_ptr() as u64 },
            out_batch: token.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: BATCH as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        // SAFETY: `attr` describes buffers of BATCH keys and values of the map's types,
        // which the kernel fills up to `count`; the token buffer is 8 bytes.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &mut attr as *mut BatchAttr,
                size_of::<BatchAttr>() as u32,
            )
        };
        let err = (ret < 0).then(io::Error::last_os_error);
        let filled = (attr.count as usize).min(BATCH);
        // SAFETY: the kernel wrote `filled` entries into each buffer; both types accept any
        // bit pattern.
        unsafe {
            keys.set_len(filled);
            values.set_len(filled);
        }
        out.extend(keys.drain(..).zip(values.drain(..)));
        match err {
            None => first = false,
            // The end of the table (the last batch may still have carried entries).
            Some(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
            Some(e) => return Err(e),
        }
    }
}
