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
//! CancelRequest (no session at all); a TLS ClientHello instead is direct SSL negotiation
//! (encrypted from the first byte).

use crate::proto;

pub const SSL_REQUEST_CODE: u32 = 80_877_103;
pub const GSSENC_REQUEST_CODE: u32 = 80_877_104;
pub const CANCEL_REQUEST_CODE: u32 = 80_877_102;
/// Longest cancel key (protocol 3.2, PostgreSQL 18+); protocol 3.0 keys are 4 bytes.
pub const MAX_CANCEL_KEY_LEN: u32 = 256;

/// Transaction status bytes of ReadyForQuery.
pub const TX_IDLE: u8 = b'I';
pub const TX_IN_TRANSACTION: u8 = b'T';
pub const TX_FAILED: u8 = b'E';

/// First byte of a TLS handshake record: a client using direct SSL negotiation
/// (`sslnegotiation=direct`, PostgreSQL 17+) starts with its ClientHello, no SSLRequest.
pub const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Bits to add to `proto` given the first 8 bytes of a client packet (length, code).
#[inline(always)]
pub fn classify_client_packet(head: &[u8; 8]) -> u8 {
    let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
    let code = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
    if head[0] == TLS_HANDSHAKE_RECORD && head[1] == 3 {
        // A TLS record (version 3.x). No startup packet is that long (>= 0x16000000 bytes).
        proto::FIRST_CLIENT_PACKET | proto::ENCRYPTED
    } else if len == 8 && (code == SSL_REQUEST_CODE || code == GSSENC_REQUEST_CODE) {
        proto::FIRST_CLIENT_PACKET | proto::ENCRYPTION_REQUESTED
    } else if code == CANCEL_REQUEST_CODE && len > 12 && len <= 12 + MAX_CANCEL_KEY_LEN {
        // Length 12 + key: 16 with protocol 3.0's 4-byte keys, longer with 3.2 (32 from
        // PostgreSQL 18, up to 256).
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

/// Rolls a whole chunk into the window, as the kernel does for one read (its last 8
/// bytes): what the model test and the fuzz target drive the reader with.
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

/// Start-up answer messages looked at per read: AuthenticationOk, the ParameterStatus
/// messages (about 15), BackendKeyData and ReadyForQuery usually come in one read.
pub const STARTUP_MESSAGES_PER_READ: u32 = 32;
/// Longer than any start-up message: a bigger length means the scan lost its place.
const MAX_STARTUP_MESSAGE_LEN: u32 = 1 << 20;

/// What one read of the server's start-up answer told the BackendKeyData scan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartupScan {
    /// The read ended between messages, or inside one: the next read starts with this
    /// many bytes of it.
    Continue(u32),
    /// BackendKeyData: the process id the server announced.
    BackendPid(u32),
    /// No BackendKeyData to be found (ReadyForQuery or an error came first, or the scan
    /// lost its place: a message header split across reads, too many messages).
    Over,
}

/// Walks the message headers of one read of `len` bytes of the server's start-up answer,
/// the first message starting `skip` bytes in. `header(at)` reads the 5 bytes (type,
/// length) at offset `at` of the read, `word(at)` 4 bytes. BackendKeyData is `'K'`, length,
/// process id, cancel key (4 bytes in protocol 3.0, up to 256 in 3.2): only its pid is read.
/// Bounded (`STARTUP_MESSAGES_PER_READ`), for the kernel.
#[inline(always)]
pub fn scan_startup(
    skip: u32,
    len: u64,
    header: impl Fn(u64) -> Option<[u8; 5]>,
    word: impl Fn(u64) -> Option<[u8; 4]>,
) -> StartupScan {
    let mut at = u64::from(skip);
    let mut i = 0;
    while i < STARTUP_MESSAGES_PER_READ {
        if at >= len {
            return StartupScan::Continue((at - len) as u32);
        }
        if at + 5 > len {
            return StartupScan::Over;
        }
        let Some(h) = header(at) else {
            return StartupScan::Over;
        };
        let msg_len = u32::from_be_bytes([h[1], h[2], h[3], h[4]]);
        if !(4..=MAX_STARTUP_MESSAGE_LEN).contains(&msg_len) {
            return StartupScan::Over;
        }
        match h[0] {
            b'K' => {
                if msg_len < 12 || at + 9 > len {
                    return StartupScan::Over;
                }
                return match word(at + 5) {
                    Some(pid) => StartupScan::BackendPid(u32::from_be_bytes(pid)),
                    None => StartupScan::Over,
                };
            }
            b'Z' | b'E' => return StartupScan::Over,
            _ => {}
        }
        at += 1 + u64::from(msg_len);
        i += 1;
    }
    if at >= len {
        return StartupScan::Continue((at - len) as u32);
    }
    StartupScan::Over
}

#[cfg(test)]
mod tests;
