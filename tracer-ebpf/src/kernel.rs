//! Reading kernel structures and the current task.

use aya_ebpf::helpers::{
    bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_get_current_task_btf,
    bpf_get_current_uid_gid, bpf_probe_read_kernel, generated::bpf_get_current_comm,
};
use core::ffi::c_void;
use tracer_common::ProcInfo;

/// `PF_EXITING` in `task_struct.flags`: the task is in `do_exit()`.
const PF_EXITING: u32 = 0x4;

/// One member offset of the running kernel's structures (see `KernelOffsets`), read on its
/// own: a volatile read of the whole struct would copy all of it onto the 512-byte stack.
/// The verifier sees the value as a constant (the global lives in frozen, read-only data).
macro_rules! offset {
    ($field:ident) => {{
        let all =
            core::ptr::from_ref(&$crate::maps::OFFSETS).cast::<tracer_common::KernelOffsets>();
        // SAFETY: `Global<T>` is a transparent wrapper of an initialised `T`; the field is
        // read in place with a volatile load so that the compiler does not fold in the
        // compiled-in default the loader overrides.
        unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*all).$field)) }
    }};
}
pub(crate) use offset;

/// Reads a `T` at `base + offset` from kernel memory; `None` if the read faults.
#[inline(always)]
pub(crate) fn read_at<T>(base: *const c_void, offset: u32) -> Option<T> {
    // SAFETY: bpf_probe_read_kernel checks the address; a bad one returns an error.
    unsafe { bpf_probe_read_kernel(base.byte_add(offset as usize).cast::<T>()).ok() }
}

/// Loads a `T` at `base + offset` through a BTF pointer (`base` typed by the verifier, from a
/// hook argument or a helper returning one): no helper call, and a fault reads as zero.
#[inline(always)]
pub(crate) fn load_at<T>(base: *const c_void, offset: u32) -> T {
    let at = base.wrapping_byte_add(offset as usize);
    // SAFETY: the verifier checks the access against the pointer's BTF type and turns it
    // into a fault-safe load.
    unsafe { at.cast::<T>().read_volatile() }
}

/// Writes the current process, as seen from its own context, into `owner` (in place: a
/// `ProcInfo` built on the stack would cost 48 of the 512 bytes).
#[inline(always)]
pub(crate) fn fill_current_proc(owner: &mut ProcInfo) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let uid_gid = bpf_get_current_uid_gid();
    owner.tgid = (pid_tgid >> 32) as u32;
    owner.tid = pid_tgid as u32;
    owner.uid = uid_gid as u32;
    owner.gid = (uid_gid >> 32) as u32;
    // SAFETY: plain helper call without arguments.
    owner.cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: the helper writes at most 16 bytes into the 16-byte array (map memory).
    if unsafe { bpf_get_current_comm(owner.comm.as_mut_ptr().cast(), 16) } != 0 {
        owner.comm = [0; 16];
    }
    owner.start_boottime_ns = process_start_boottime();
}

/// Start time of the current process (its thread-group leader), ns since boot.
#[inline(always)]
fn process_start_boottime() -> u64 {
    // SAFETY: helper without arguments; the pointer is only used for checked reads.
    let task = unsafe { bpf_get_current_task_btf() } as *const c_void;
    let leader: u64 = read_at(task, offset!(task_group_leader)).unwrap_or(0);
    if leader == 0 {
        return 0;
    }
    read_at(leader as *const c_void, offset!(task_start_boottime)).unwrap_or(0)
}

#[inline(always)]
pub(crate) fn current_tgid() -> u32 {
    (bpf_get_current_pid_tgid() >> 32) as u32
}

/// True when the current task is exiting (its files are being closed by `do_exit()`).
#[inline(always)]
pub(crate) fn current_is_exiting() -> bool {
    // SAFETY: helper without arguments; the pointer is only used for a checked read.
    let task = unsafe { bpf_get_current_task_btf() } as *const c_void;
    let flags: u32 = read_at(task, offset!(task_flags)).unwrap_or(0);
    flags & PF_EXITING != 0
}
