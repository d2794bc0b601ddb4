//! Just enough of the PostgreSQL wire protocol to know a connection's transaction state,
//! written to run inside the kernel programs (bounded, no allocation, O(1) per read) and to
//! be tested from user space on byte streams.
//!
//! Why not a full message parser: the kernel would have to walk every message of every
//! read (a large result is thousands of DataRows) or copy all traffic to user space. The
//! state we need is in one place instead: a server's answer always ends with ReadyForQuery
//! (`'Z'`, length 5, status `I` / `T` / `E`) and the server then waits, so the last six bytes
//! of the server-to-client stream at a read boundary say the state. A rolling window of the
//! stream's last bytes makes that hold however messages are split across reads or merged in
//! one read, with pipelining (only the last answer counts), COPY (the answer still ends with
//! ReadyForQuery), the extended protocol (Sync ends with ReadyForQuery) and asynchronous
//! NotificationResponse (an idle connection gets `'A'` without a ReadyForQuery: the state is
//! unchanged), and it picks up connections first seen mid-stream at their next answer.
//!
//! The client's first packet tells a startup from an SSLRequest / GSSENCRequest (the server
//! answers one byte: `S`/`G` = encrypted from then on, `N` = negotiation again) or a
//! CancelRequest (no session at all).

use crate::proto;

pub const SSL_REQUEST_CODE: u32 = 80_877_103;
pub const GSSENC_REQUEST_CODE: u32 = 80_877_104;
pub const CANCEL_REQUEST_CODE: u32 = 80_877_102;

/// Transaction status bytes of ReadyForQuery.
pub const TX_IDLE: u8 = b'I';
pub const TX_IN_TRANSACTION: u8 = b'T';
pub const TX_FAILED: u8 = b'E';

/// Bits to add to `proto` given the first 8 bytes of a client packet (length, code).
#[inline(always)]
pub fn classify_client_packet(head: &[u8; 8]) -> u8 {
    let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
    let code = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
    if len == 8 && (code == SSL_REQUEST_CODE || code == GSSENC_REQUEST_CODE) {
        proto::FIRST_CLIENT_PACKET | proto::ENCRYPTION_REQUESTED
    } else if len == 16 && code == CANCEL_REQUEST_CODE {
        proto::FIRST_CLIENT_PACKET | proto::CANCEL
    } else {
        proto::FIRST_CLIENT_PACKET
    }
}

/// New `proto` bits after the server's first byte following the client's first packet.
#[inline(always)]
pub fn after_first_server_byte(current: u8, byte: u8) -> u8 {
    if current & proto::ENCRYPTION_REQUESTED == 0 {
        return current | proto::FIRST_SERVER_BYTE;
    }
    if byte == b'S' || byte == b'G' {
        current | proto::ENCRYPTED | proto::FIRST_SERVER_BYTE
    } else {
        // 'N': no encryption; the client's next packet is another request or the startup.
        current
            & !(proto::ENCRYPTION_REQUESTED | proto::FIRST_CLIENT_PACKET | proto::FIRST_SERVER_BYTE)
    }
}

/// Shifts the last `count` bytes of `tail` (right-aligned: `tail[8 - count..]`) into the
/// window. Constant indices only, so the kernel verifier sees no variable stack offsets.
#[inline(always)]
pub fn roll_window(window: &mut [u8; 8], tail: &[u8; 8], count: usize) {
    let mut i = 0;
    while i < 8 {
        if i + count >= 8 {
            let mut j = 0;
            while j < 7 {
                window[j] = window[j + 1];
                j += 1;
            }
            window[7] = tail[i];
        }
        i += 1;
    }
}

/// Rolls a whole chunk into the window, as the kernel does for one read (its last 8 bytes).
pub fn roll_chunk(window: &mut [u8; 8], chunk: &[u8]) {
    let count = chunk.len().min(8);
    let mut tail = [0u8; 8];
    tail[8 - count..].copy_from_slice(&chunk[chunk.len() - count..]);
    roll_window(window, &tail, count);
}

/// The status byte when the window ends with a complete ReadyForQuery message.
#[inline(always)]
pub fn ready_for_query_status(window: &[u8; 8]) -> Option<u8> {
    if window[2] == b'Z' && window[3] == 0 && window[4] == 0 && window[5] == 0 && window[6] == 5 {
        let status = window[7];
        if status == TX_IDLE || status == TX_IN_TRANSACTION || status == TX_FAILED {
            return Some(status);
        }
    }
    None
}
