//! The user buffer of the syscall doing the current socket I/O, for the protocol reader.
//!
//! `sock_send_length` / `sock_recv_length` carry no buffer, but they run inside the syscall
//! that moves the data, so the syscall's own arguments (from the task's saved registers) say
//! where the bytes are. Only the syscalls Postgres clients and servers use are understood
//! (read/write, recvfrom/sendto, readv/writev, recvmsg/sendmsg; x86_64 numbers); anything
//! else (io_uring, sendfile, ...) leaves the reader without bytes, which it records.

use aya_ebpf::helpers::{bpf_get_current_task_btf, bpf_probe_read_user, bpf_task_pt_regs};
use core::ffi::c_void;

use crate::kernel::{load_at, offset};

const SYS_READ: u64 = 0;
const SYS_WRITE: u64 = 1;
const SYS_READV: u64 = 19;
const SYS_WRITEV: u64 = 20;
const SYS_SENDTO: u64 = 44;
const SYS_RECVFROM: u64 = 45;
const SYS_SENDMSG: u64 = 46;
const SYS_RECVMSG: u64 = 47;
/// iovecs looked at: Postgres peers use one or two.
const MAX_IOVECS: u32 = 8;

#[derive(Clone, Copy)]
pub(crate) enum Buffer {
    /// One contiguous buffer.
    Flat(u64),
    /// An array of `struct iovec` and its length.
    Vector(u64, u64),
}

#[inline(always)]
pub(crate) fn read_user<T>(address: u64) -> Option<T> {
    // SAFETY: bpf_probe_read_user checks the address; a bad one returns an error.
    unsafe { bpf_probe_read_user(address as *const T).ok() }
}

/// Where the data of the current syscall is, if it is a socket syscall we understand.
#[inline(always)]
pub(crate) fn current_syscall_buffer(sending: bool) -> Option<Buffer> {
    // SAFETY: helpers without preconditions; the result is a BTF `struct pt_regs *`.
    let regs = unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) } as *const c_void;
    if regs.is_null() {
        return None;
    }
    // Direct loads through the BTF pointer (checked by the verifier, fault-safe at run time):
    // this runs on every answer, where a helper call per register would cost more than the
    // rest of the step.
    let nr: u64 = load_at(regs, offset!(pt_regs_orig_ax));
    let arg1: u64 = load_at(regs, offset!(pt_regs_si));
    match (nr, sending) {
        (SYS_WRITE | SYS_SENDTO, true) | (SYS_READ | SYS_RECVFROM, false) => {
            Some(Buffer::Flat(arg1))
        }
        (SYS_WRITEV, true) | (SYS_READV, false) => {
            let count: u64 = load_at(regs, offset!(pt_regs_dx));
            Some(Buffer::Vector(arg1, count))
        }
        (SYS_SENDMSG, true) | (SYS_RECVMSG, false) => {
            // struct msghdr: msg_iov at 16, msg_iovlen at 24.
            let iov: u64 = read_user(arg1 + 16)?;
            let count: u64 = read_user(arg1 + 24)?;
            Some(Buffer::Vector(iov, count))
        }
        _ => None,
    }
}

/// The first `N` bytes of the data, when the first segment holds them.
#[inline(always)]
pub(crate) fn head<const N: usize>(buffer: Buffer, len: u64) -> Option<[u8; N]> {
    if len < N as u64 {
        return None;
    }
    let base = match buffer {
        Buffer::Flat(base) => base,
        Buffer::Vector(iov, count) => {
            if count == 0 {
                return None;
            }
            let seg_len: u64 = read_user(iov + 8)?;
            if seg_len < N as u64 {
                return None;
            }
            read_user(iov)?
        }
    };
    read_user(base)
}

/// The last bytes of the data (up to 8, from the segment holding the end), right-aligned
/// in the returned array, with their count.
#[inline(always)]
pub(crate) fn tail8(buffer: Buffer, len: u64) -> Option<([u8; 8], usize)> {
    let (base, used) = match buffer {
        Buffer::Flat(base) => (base, len),
        Buffer::Vector(iov, count) => {
            let mut seen: u64 = 0;
            let mut found = None;
            let mut i: u32 = 0;
            while i < MAX_IOVECS {
                if u64::from(i) >= count {
                    break;
                }
                let entry = iov + u64::from(i) * 16;
                let seg_len: u64 = read_user(entry + 8)?;
                if seen + seg_len >= len {
                    let seg_base: u64 = read_user(entry)?;
                    found = Some((seg_base, len - seen));
                    break;
                }
                seen += seg_len;
                i += 1;
            }
            found?
        }
    };
    read_tail(base, used)
}

macro_rules! tail_of {
    ($base:expr, $used:expr, $n:literal) => {{
        let bytes: [u8; $n] = read_user($base + $used - $n)?;
        let mut out = [0u8; 8];
        let mut i = 0;
        while i < $n {
            out[8 - $n + i] = bytes[i];
            i += 1;
        }
        Some((out, $n))
    }};
}

#[inline(always)]
fn read_tail(base: u64, used: u64) -> Option<([u8; 8], usize)> {
    // Constant-size reads keep the verifier's job trivial.
    match used {
        0 => None,
        1 => tail_of!(base, used, 1),
        2 => tail_of!(base, used, 2),
        3 => tail_of!(base, used, 3),
        4 => tail_of!(base, used, 4),
        5 => tail_of!(base, used, 5),
        6 => tail_of!(base, used, 6),
        7 => tail_of!(base, used, 7),
        _ => {
            let bytes: [u8; 8] = read_user(base + used - 8)?;
            Some((bytes, 8))
        }
    }
}
