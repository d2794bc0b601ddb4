//! Reading kernel structures and the current task.

use aya_ebpf::helpers::{
    bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
    bpf_get_current_task_btf, bpf_get_current_uid_gid, bpf_probe_read_kernel,
};
use core::ffi::c_void;
use tracer_common::ProcInfo;

use crate::maps::OFFSETS;

/// `PF_EXITING` in `task_struct.flags`: the task is in `do_exit()`.
const PF_EXITING: u32 = 0x4;

/// Reads a `T` at `base + offset` from kernel memory; `None` if the read faults.
#[inline(always)]
pub fn read_at<T>(base: *const c_void, offset: u32) -> Option<T> {
    // SAFETY: bpf_probe_read_kernel checks the address; a bad one returns an error.
    unsafe { bpf_probe_read_kernel(base.byte_add(offset as usize).cast::<T>()).ok() }
}

/// The current process, as seen from its own context.
#[inline(always)]
pub fn current_proc() -> ProcInfo {
    let pid_tgid = bpf_get_current_pid_tgid();
    let uid_gid = bpf_get_current_uid_gid();
    ProcInfo {
        tgid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        uid: uid_gid as u32,
        gid: (uid_gid >> 32) as u32,
        // SAFETY: plain helper call without arguments.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
        start_boottime_ns: process_start_boottime(),
    }
}

/// Start time of the current process (its thread-group leader), ns since boot.
#[inline(always)]
fn process_start_boottime() -> u64 {
    let offsets = OFFSETS.load();
    // SAFETY: helper without arguments; the pointer is only used for checked reads.
    let task = unsafe { bpf_get_current_task_btf() } as *const c_void;
    let leader: u64 = read_at(task, offsets.task_group_leader).unwrap_or(0);
    if leader == 0 {
        return 0;
    }
    read_at(leader as *const c_void, offsets.task_start_boottime).unwrap_or(0)
}

#[inline(always)]
pub fn current_tgid() -> u32 {
    (bpf_get_current_pid_tgid() >> 32) as u32
}

/// True when the current task is exiting (its files are being closed by `do_exit()`).
#[inline(always)]
pub fn current_is_exiting() -> bool {
    // SAFETY: helper without arguments; the pointer is only used for a checked read.
    let task = unsafe { bpf_get_current_task_btf() } as *const c_void;
    let flags: u32 = read_at(task, OFFSETS.load().task_flags).unwrap_or(0);
    flags & PF_EXITING != 0
}
