//! Kernel programs of the tracer.
//!
//! Hooks fire only on socket work (no `syscalls:*` tracepoint), so processes that never
//! touch a socket pay nothing. The TCP state hook is a BTF tracepoint everywhere; the I/O
//! hooks come in two sets, chosen at start-up by what the kernel has (see [`io_hooks`]).
//!
//! - [`sock_state`]: `inet_sock_set_state`, the TCP state machine: finds connections on
//!   watched ports, captures the client's owner at connect time, emits open / peer-closed /
//!   close records.
//! - [`io_hooks`] -> [`sock_io`]: every `sock_sendmsg` / `sock_recvmsg` (all of read, write,
//!   send*, recv*, readv, writev): counts payload bytes, reads the protocol, and attributes
//!   the connection to the process doing its I/O.
#![no_std]
#![no_main]

mod io_hooks;
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
