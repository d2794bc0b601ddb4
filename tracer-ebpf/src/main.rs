//! Kernel programs of the tracer.
//!
//! All hooks are BTF tracepoints (`tp_btf`): they are stable kernel ABI, work where kprobes
//! and fentry do not, need no tracefs, and, unlike `syscalls:*` tracepoints, fire only on
//! socket work, so processes that never touch a socket pay nothing.
//!
//! - [`sock_state`]: `inet_sock_set_state`, the TCP state machine: finds connections on
//!   watched ports, captures the client's owner at connect time, emits open / peer-closed /
//!   close records.
//! - [`sock_io`]: `sock_send_length` / `sock_recv_length`, every `sock_sendmsg` /
//!   `sock_recvmsg` (all of read, write, send*, recv*, readv, writev): counts payload bytes
//!   and attributes the connection to the process doing its I/O.
#![no_std]
#![no_main]

mod kernel;
mod maps;
mod sock_io;
mod sock_state;
mod unix;
mod user_buf;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
