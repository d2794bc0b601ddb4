//! The kernel's protocol reader (`tracer_common::protocol`) on arbitrary server streams cut
//! into arbitrary reads, and on arbitrary first packets and first server bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tracer_common::{
    proto,
    protocol::{
        CANCEL_REQUEST_CODE, GSSENC_REQUEST_CODE, MAX_CANCEL_KEY_LEN, SSL_REQUEST_CODE,
        TLS_HANDSHAKE_RECORD, TX_FAILED, TX_IDLE, TX_IN_TRANSACTION, after_first_server_byte,
        classify_client_packet, ready_for_query_status, roll_chunk,
    },
};

/// Cuts `data` into chunks: each chunk's length is taken from the stream itself.
fn chunks(data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut rest = data;
    while let Some((&len, tail)) = rest.split_first() {
        let len = usize::from(len % 64).min(tail.len());
        let (chunk, next) = tail.split_at(len);
        out.push(chunk);
        rest = next;
    }
    out
}

fn valid_status(status: Option<u8>) -> bool {
    matches!(status, None | Some(TX_IDLE | TX_IN_TRANSACTION | TX_FAILED))
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 10 {
        return;
    }
    let (head, rest) = data.split_at(10);

    // First packet and first server byte.
    let packet: [u8; 8] = head[..8].try_into().expect("8 bytes");
    let bits = classify_client_packet(&packet);
    let len = u32::from_be_bytes(packet[..4].try_into().expect("4"));
    let code = u32::from_be_bytes(packet[4..].try_into().expect("4"));
    assert_ne!(bits & proto::FIRST_CLIENT_PACKET, 0);
    let tls_record = packet[0] == TLS_HANDSHAKE_RECORD && packet[1] == 3;
    assert_eq!(
        bits & proto::ENCRYPTED != 0,
        tls_record,
        "direct TLS (a ClientHello first)"
    );
    assert_eq!(
        bits & proto::ENCRYPTION_REQUESTED != 0,
        !tls_record && len == 8 && (code == SSL_REQUEST_CODE || code == GSSENC_REQUEST_CODE)
    );
    // CancelRequest: 12 bytes plus a key of up to MAX_CANCEL_KEY_LEN (protocol 3.2).
    assert_eq!(
        bits & proto::CANCEL != 0,
        !tls_record && code == CANCEL_REQUEST_CODE && len > 12 && len <= 12 + MAX_CANCEL_KEY_LEN
    );
    assert_eq!(
        bits & !(proto::FIRST_CLIENT_PACKET
            | proto::ENCRYPTION_REQUESTED
            | proto::CANCEL
            | proto::ENCRYPTED),
        0
    );
    let server_byte = head[8];
    let after = after_first_server_byte(bits, server_byte);
    if bits & proto::ENCRYPTION_REQUESTED == 0 {
        assert_eq!(after, bits | proto::FIRST_SERVER_BYTE);
    } else if server_byte == b'S' || server_byte == b'G' {
        assert_ne!(after & proto::ENCRYPTED, 0);
        assert_ne!(after & proto::FIRST_SERVER_BYTE, 0);
    } else {
        // Negotiation starts again: the next client packet is examined afresh.
        assert_eq!(
            after & (proto::ENCRYPTION_REQUESTED | proto::FIRST_CLIENT_PACKET),
            0
        );
        assert_eq!(after & proto::ENCRYPTED, 0);
    }

    // The window after any sequence of reads is the stream's last 8 bytes.
    let mut window = [0u8; 8];
    let mut stream = vec![0u8; 8];
    for chunk in chunks(rest) {
        roll_chunk(&mut window, chunk);
        stream.extend_from_slice(chunk);
        assert_eq!(&window[..], &stream[stream.len() - 8..]);
        assert!(valid_status(ready_for_query_status(&window)));
    }

    // Whatever came before, a stream that ends with a real ReadyForQuery, however it is
    // split across reads, yields its status.
    let status = [TX_IDLE, TX_IN_TRANSACTION, TX_FAILED][usize::from(head[9] % 3)];
    let rfq = [b'Z', 0, 0, 0, 5, status];
    let cut = usize::from(head[9] / 3) % (rfq.len() + 1);
    let cut2 = cut + usize::from(head[9] / 21) % (rfq.len() - cut + 1);
    for piece in [&rfq[..cut], &rfq[cut..cut2], &rfq[cut2..]] {
        roll_chunk(&mut window, piece);
    }
    assert_eq!(ready_for_query_status(&window), Some(status));
    // Bytes that follow in a later read without a new ReadyForQuery (a NotificationResponse,
    // say) never yield an invalid status.
    roll_chunk(&mut window, &rest[..rest.len().min(8)]);
    assert!(valid_status(ready_for_query_status(&window)));
});
