//! Model-based tests: a full reference parser of the server-to-client stream against
//! the kernel's rolling-window reader, on generated realistic conversations split into
//! reads every which way. Deterministic (fixed seeds, tiny PRNG), no dependencies.

use super::*;

/// [`scan_startup`] over a byte stream split into `reads`, as the kernel sees it: the pid,
/// if BackendKeyData was found.
fn backend_pid_of(reads: &[&[u8]]) -> Option<u32> {
    let mut skip = 0;
    for read in reads {
        let bytes = *read;
        let at = |at: u64, n: usize| bytes.get(at as usize..at as usize + n);
        let scan = scan_startup(
            skip,
            bytes.len() as u64,
            |a| at(a, 5).map(|b| [b[0], b[1], b[2], b[3], b[4]]),
            |a| at(a, 4).map(|b| [b[0], b[1], b[2], b[3]]),
        );
        match scan {
            StartupScan::Continue(next) => skip = next,
            StartupScan::BackendPid(pid) => return Some(pid),
            StartupScan::Over => return None,
        }
    }
    None
}
use crate::proto;

// ---------------------------------------------------------------------------------------
// Deterministic PRNG (SplitMix64).

struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ 0x9E37_79B9_7F4A_7C15)
    }
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next_u64() % (hi - lo + 1) as u64) as usize
    }
    /// True with probability `num / den`.
    fn chance(&mut self, num: u64, den: u64) -> bool {
        self.next_u64() % den < num
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.range(0, items.len() - 1)]
    }
    fn byte(&mut self) -> u8 {
        self.next_u64() as u8
    }
    /// Log-uniform size in `1..=max`: as many tiny reads as huge ones.
    fn log_size(&mut self, max: usize) -> usize {
        let bits = usize::BITS - max.leading_zeros();
        let top = 1usize << self.range(0, bits as usize - 1);
        self.range(1, (top * 2 - 1).min(max))
    }
}

// ---------------------------------------------------------------------------------------
// Reference implementation: a full message parser of the server-to-client stream.

/// One parsed unit of the server-to-client stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Unit {
    /// The message type, or the answer byte of an encryption request.
    kind: u8,
    start: usize,
    end: usize,
    /// True for the single-byte answer to SSLRequest / GSSENCRequest.
    answer: bool,
}

/// Parses `stream`: first `answers` single-byte answers to encryption requests (parsing
/// stops after an `S` / `G`, the rest is ciphertext), then type byte + be32 length framed
/// messages. Stops at the first incomplete message (a truncated stream). Returns the
/// parsed units and the offset parsing stopped at.
fn reference_parse(stream: &[u8], answers: usize) -> (Vec<Unit>, usize) {
    let mut units = Vec::new();
    let mut at = 0;
    for _ in 0..answers {
        let Some(&byte) = stream.get(at) else {
            return (units, at);
        };
        units.push(Unit {
            kind: byte,
            start: at,
            end: at + 1,
            answer: true,
        });
        at += 1;
        if byte == b'S' || byte == b'G' {
            return (units, at);
        }
    }
    while at + 5 <= stream.len() {
        let kind = stream[at];
        let len = u32::from_be_bytes([
            stream[at + 1],
            stream[at + 2],
            stream[at + 3],
            stream[at + 4],
        ]) as usize;
        assert!(len >= 4, "bad length {len} at {at}");
        if at + 1 + len > stream.len() {
            break;
        }
        if kind == b'Z' {
            assert_eq!(len, 5, "ReadyForQuery length at {at}");
        }
        units.push(Unit {
            kind,
            start: at,
            end: at + 1 + len,
            answer: false,
        });
        at += 1 + len;
    }
    (units, at)
}

/// The reference's ReadyForQuery statuses in order, with the offset each ends at.
fn reference_statuses(stream: &[u8], answers: usize) -> Vec<(usize, u8)> {
    let (units, _) = reference_parse(stream, answers);
    units
        .iter()
        .filter(|u| !u.answer && u.kind == b'Z')
        .map(|u| (u.end, stream[u.start + 5]))
        .collect()
}

/// `at_end[i]` = status of the ReadyForQuery ending exactly at offset `i`, else 0.
fn rfq_end_map(stream: &[u8], answers: usize) -> Vec<u8> {
    let mut map = vec![0u8; stream.len() + 1];
    for (end, status) in reference_statuses(stream, answers) {
        map[end] = status;
    }
    map
}

/// Offsets `i` where `stream[..i]` ends with bytes shaped like a ReadyForQuery.
fn pattern_ends(stream: &[u8]) -> Vec<usize> {
    (6..=stream.len())
        .filter(|&i| {
            let s = &stream[i - 6..i];
            s[..5] == [b'Z', 0, 0, 0, 5] && matches!(s[5], TX_IDLE | TX_IN_TRANSACTION | TX_FAILED)
        })
        .collect()
}

/// The last 8 bytes of `stream[..end]`, zero-padded on the left.
fn last8(stream: &[u8], end: usize) -> [u8; 8] {
    let mut out = [0u8; 8];
    let n = end.min(8);
    out[8 - n..].copy_from_slice(&stream[end - n..end]);
    out
}

// ---------------------------------------------------------------------------------------
// The kernel reader, mirrored from tracer-ebpf `read_protocol` (client role).

#[derive(Clone, Copy, Debug, Default)]
struct Reader {
    proto: u8,
    window: [u8; 8],
    tx_status: u8,
    preexisting: bool,
}

impl Reader {
    /// A connection first seen mid-stream: no negotiation tracking, window only.
    fn preexisting() -> Self {
        Reader {
            preexisting: true,
            ..Reader::default()
        }
    }
    /// One write by the client (a whole packet or part of one).
    fn client_writes(&mut self, data: &[u8]) {
        if self.proto & (proto::ENCRYPTED | proto::CANCEL) != 0 {
            return;
        }
        if self.proto & proto::FIRST_CLIENT_PACKET == 0 && !self.preexisting && data.len() >= 8 {
            let head: [u8; 8] = data[..8].try_into().unwrap();
            self.proto |= classify_client_packet(&head);
        }
    }
    /// One read by the client of `data` from the server.
    fn client_reads(&mut self, data: &[u8]) {
        if self.proto & (proto::ENCRYPTED | proto::CANCEL) != 0 || data.is_empty() {
            return;
        }
        if self.proto & proto::FIRST_CLIENT_PACKET != 0
            && self.proto & proto::FIRST_SERVER_BYTE == 0
        {
            self.proto = after_first_server_byte(self.proto, data[0]);
            if self.proto & proto::ENCRYPTED != 0 {
                return;
            }
        }
        roll_chunk(&mut self.window, data);
        if let Some(status) = ready_for_query_status(&self.window) {
            self.tx_status = status;
        }
    }
}

// ---------------------------------------------------------------------------------------
// Realistic server streams.

fn message(out: &mut Vec<u8>, kind: u8, body: &[u8]) {
    out.push(kind);
    out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    out.extend_from_slice(body);
}

fn cstr(body: &mut Vec<u8>, s: &[u8]) {
    body.extend_from_slice(s);
    body.push(0);
}

const TYPE_OIDS: [u32; 8] = [16, 20, 23, 25, 1043, 1082, 1184, 1700];

/// Random text: printable ASCII and some UTF-8, never NUL and never `Z` (a `Z` is the one
/// byte data would need to forge a ReadyForQuery, see `documented_false_positive`).
fn text(rng: &mut Rng, max: usize) -> Vec<u8> {
    const WORDS: [&str; 10] = [
        "Ivan", "Teo", "Eve", "id", "é", "日本", "42", " ", "\n", "ok",
    ];
    let len = if rng.chance(1, 20) {
        rng.range(0, max)
    } else {
        rng.range(0, max.min(24))
    };
    let mut s = Vec::with_capacity(len);
    while s.len() < len {
        if rng.chance(1, 4) {
            s.extend_from_slice(rng.pick(&WORDS).as_bytes());
        } else {
            let c = rng.range(0x20, 0x7e) as u8;
            s.push(if c == b'Z' { b'z' } else { c });
        }
    }
    s
}

fn command_complete(out: &mut Vec<u8>, tag: &str) {
    let mut body = Vec::new();
    cstr(&mut body, tag.as_bytes());
    message(out, b'C', &body);
}

fn ready(out: &mut Vec<u8>, status: u8) {
    message(out, b'Z', &[status]);
}

fn error_or_notice(rng: &mut Rng, out: &mut Vec<u8>, kind: u8) {
    let mut body = Vec::new();
    let severity: &[u8] = if kind == b'E' { b"ERROR" } else { b"NOTICE" };
    for (field, value) in [(b'S', severity), (b'V', severity)] {
        body.push(field);
        cstr(&mut body, value);
    }
    body.push(b'C');
    let code: [u8; 5] = *rng.pick(&[*b"42P01", *b"23505", *b"25P02", *b"00000", *b"57014"]);
    cstr(&mut body, &code);
    body.push(b'M');
    cstr(&mut body, &text(rng, 300));
    if rng.chance(1, 2) {
        body.push(b'D');
        cstr(&mut body, &text(rng, 100));
    }
    body.push(b'F');
    cstr(&mut body, b"parse_relation.c");
    body.push(b'L');
    cstr(&mut body, b"1392");
    body.push(0);
    message(out, kind, &body);
}

fn row_description(rng: &mut Rng, out: &mut Vec<u8>, columns: usize) {
    let mut body = Vec::new();
    body.extend_from_slice(&(columns as u16).to_be_bytes());
    for column in 0..columns {
        cstr(&mut body, &text(rng, 30));
        let from_table = rng.chance(3, 4);
        let table: u32 = if from_table {
            16_384 + rng.range(0, 5000) as u32
        } else {
            0
        };
        let attnum: u16 = if from_table { column as u16 + 1 } else { 0 };
        body.extend_from_slice(&table.to_be_bytes());
        body.extend_from_slice(&attnum.to_be_bytes());
        body.extend_from_slice(&rng.pick(&TYPE_OIDS).to_be_bytes());
        body.extend_from_slice(&(-1i16).to_be_bytes());
        body.extend_from_slice(&(-1i32).to_be_bytes());
        body.extend_from_slice(&0u16.to_be_bytes());
    }
    message(out, b'T', &body);
}

fn data_rows(rng: &mut Rng, out: &mut Vec<u8>, columns: usize, rows: usize) {
    for _ in 0..rows {
        let mut body = Vec::new();
        body.extend_from_slice(&(columns as u16).to_be_bytes());
        for _ in 0..columns {
            if rng.chance(1, 10) {
                body.extend_from_slice(&(-1i32).to_be_bytes());
            } else {
                let value = text(rng, 400);
                body.extend_from_slice(&(value.len() as u32).to_be_bytes());
                body.extend_from_slice(&value);
            }
        }
        message(out, b'D', &body);
    }
}

/// Rows of a result: mostly a few, sometimes a large result (> 64 KiB) in few columns.
fn rows_count(rng: &mut Rng, columns: &mut usize, big: bool) -> usize {
    match rng.range(0, if big { 39 } else { 38 }) {
        0..=3 => 0,
        4..=27 => rng.range(1, 5),
        28..=37 => rng.range(5, 60),
        38 => rng.range(60, 300),
        _ => {
            *columns = (*columns).min(3);
            rng.range(1000, 1500)
        }
    }
}

fn parameter_status(out: &mut Vec<u8>, name: &str, value: &str) {
    let mut body = Vec::new();
    cstr(&mut body, name.as_bytes());
    cstr(&mut body, value.as_bytes());
    message(out, b'S', &body);
}

fn notification(rng: &mut Rng, out: &mut Vec<u8>) {
    let mut body = Vec::new();
    body.extend_from_slice(&(rng.range(100, 4_000_000) as u32).to_be_bytes());
    cstr(&mut body, &text(rng, 20));
    cstr(&mut body, &text(rng, 200));
    message(out, b'A', &body);
}

/// The server's side of a session: tracks the transaction status like a real backend.
struct Server<'r> {
    rng: &'r mut Rng,
    out: Vec<u8>,
    status: u8,
    /// Allow large results (> 64 KiB).
    big: bool,
}

impl Server<'_> {
    fn startup(&mut self) {
        let rng = &mut *self.rng;
        let out = &mut self.out;
        match rng.range(0, 3) {
            0 => {}
            1 => {
                let mut body = 5u32.to_be_bytes().to_vec();
                body.extend((0..4).map(|_| rng.byte()));
                message(out, b'R', &body);
            }
            2 => message(out, b'R', &3u32.to_be_bytes()),
            _ => {
                let mut body = 10u32.to_be_bytes().to_vec();
                cstr(&mut body, b"SCRAM-SHA-256-PLUS");
                cstr(&mut body, b"SCRAM-SHA-256");
                body.push(0);
                message(out, b'R', &body);
                let mut body = 11u32.to_be_bytes().to_vec();
                body.extend_from_slice(
                    b"r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096",
                );
                message(out, b'R', &body);
                let mut body = 12u32.to_be_bytes().to_vec();
                body.extend_from_slice(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=");
                message(out, b'R', &body);
            }
        }
        message(out, b'R', &0u32.to_be_bytes());
        if rng.chance(1, 8) {
            let mut body = 0x0003_0000u32.to_be_bytes().to_vec();
            body.extend_from_slice(&1u32.to_be_bytes());
            cstr(&mut body, b"_pq_.unknown_option");
            message(out, b'v', &body);
        }
        let params = [
            ("application_name", "psql"),
            ("client_encoding", "UTF8"),
            ("DateStyle", "ISO, MDY"),
            ("default_transaction_read_only", "off"),
            ("in_hot_standby", "off"),
            ("integer_datetimes", "on"),
            ("IntervalStyle", "postgres"),
            ("is_superuser", "off"),
            ("scram_iterations", "4096"),
            ("server_encoding", "UTF8"),
            ("server_version", "17.2 (Debian 17.2-1.pgdg120+1)"),
            ("session_authorization", "app"),
            ("standard_conforming_strings", "on"),
            ("TimeZone", "Etc/UTC"),
        ];
        for (name, value) in params.iter().take(rng.range(3, params.len())) {
            parameter_status(out, name, value);
        }
        // Protocol 3.0 keys are 4 bytes; 3.2 keys are longer (PostgreSQL 18: 32).
        let key_len = if rng.chance(1, 4) { 32 } else { 4 };
        let mut body = (rng.range(100, 4_000_000) as u32).to_be_bytes().to_vec();
        body.extend((0..key_len).map(|_| rng.byte()));
        message(out, b'K', &body);
        if rng.chance(1, 10) {
            error_or_notice(rng, out, b'N');
        }
        ready(out, TX_IDLE);
        self.status = TX_IDLE;
    }

    /// The status after a statement that succeeded (`tag`) or failed.
    fn transition(&mut self, tag: &str, failed: bool) -> u8 {
        self.status = match (self.status, tag, failed) {
            (TX_FAILED, "ROLLBACK", _) | (TX_FAILED, "COMMIT", _) => TX_IDLE,
            (TX_FAILED, _, _) => TX_FAILED,
            (TX_IN_TRANSACTION, _, true) => TX_FAILED,
            (_, "BEGIN", false) => TX_IN_TRANSACTION,
            (_, "COMMIT", false) | (_, "ROLLBACK", false) => TX_IDLE,
            (status, _, _) => status,
        };
        self.status
    }

    /// The answer to one statement, without ReadyForQuery; returns false on error.
    fn statement(&mut self, extended: bool) -> bool {
        let aborted = self.status == TX_FAILED;
        let choice = self.rng.range(0, 9);
        let (tag, failed) = if aborted && choice < 7 {
            ("SELECT", true)
        } else {
            match choice {
                0 => ("BEGIN", false),
                1 => ("COMMIT", false),
                2 => ("ROLLBACK", false),
                3 => ("INSERT", self.rng.chance(1, 4)),
                4 => ("UPDATE", self.rng.chance(1, 6)),
                _ => ("SELECT", self.rng.chance(1, 8)),
            }
        };
        let out = &mut self.out;
        let rng = &mut *self.rng;
        if extended {
            message(out, b'1', &[]);
            message(out, b'2', &[]);
        }
        if failed {
            if rng.chance(1, 3) && tag == "SELECT" {
                let columns = rng.range(1, 6);
                if !extended {
                    row_description(rng, out, columns);
                }
                let rows = rng.range(0, 20);
                data_rows(rng, out, columns, rows);
            }
            error_or_notice(rng, out, b'E');
        } else {
            if rng.chance(1, 12) {
                error_or_notice(rng, out, b'N');
            }
            match tag {
                "SELECT" => {
                    let mut columns = rng.range(1, 8);
                    let rows = rows_count(rng, &mut columns, self.big);
                    if !extended || rng.chance(1, 2) {
                        row_description(rng, out, columns);
                    }
                    data_rows(rng, out, columns, rows);
                    command_complete(out, &format!("SELECT {rows}"));
                }
                "INSERT" => command_complete(out, &format!("INSERT 0 {}", rng.range(0, 99))),
                "UPDATE" => command_complete(out, &format!("UPDATE {}", rng.range(0, 99))),
                _ => {
                    // COMMIT of an aborted transaction reports ROLLBACK.
                    let shown = if aborted && tag == "COMMIT" {
                        "ROLLBACK"
                    } else {
                        tag
                    };
                    command_complete(out, shown);
                }
            }
        }
        self.transition(tag, failed);
        !failed
    }

    /// A simple Query: one or more statements, then ReadyForQuery.
    fn simple_query(&mut self) {
        match self.rng.range(0, 9) {
            0 => message(&mut self.out, b'I', &[]),
            _ => {
                for _ in 0..self.rng.range(1, 3) {
                    if !self.statement(false) {
                        // An error ends a multi-statement query (implicit block).
                        if self.status == TX_IDLE
                            || self.status == TX_FAILED && self.rng.chance(1, 2)
                        {
                            break;
                        }
                    }
                }
            }
        }
        let status = self.status;
        ready(&mut self.out, status);
    }

    /// Parse / Bind / Describe / Execute / Sync.
    fn extended_query(&mut self) {
        if self.rng.chance(1, 5) {
            let mut body = Vec::new();
            let params = self.rng.range(0, 4);
            body.extend_from_slice(&(params as u16).to_be_bytes());
            for _ in 0..params {
                body.extend_from_slice(&self.rng.pick(&TYPE_OIDS).to_be_bytes());
            }
            message(&mut self.out, b't', &body);
            message(&mut self.out, b'n', &[]);
        }
        self.statement(true);
        if self.rng.chance(1, 6) {
            message(&mut self.out, b'3', &[]);
        }
        let status = self.status;
        ready(&mut self.out, status);
    }

    /// Several answers back to back, as a pipelining client reads them.
    fn pipeline(&mut self) {
        for _ in 0..self.rng.range(2, 8) {
            if self.rng.chance(1, 2) {
                self.extended_query();
            } else {
                self.simple_query();
            }
        }
    }

    fn copy_response(&mut self, kind: u8) {
        let columns = self.rng.range(1, 5);
        let mut body = vec![0u8];
        body.extend_from_slice(&(columns as u16).to_be_bytes());
        for _ in 0..columns {
            body.extend_from_slice(&0u16.to_be_bytes());
        }
        message(&mut self.out, kind, &body);
    }

    fn copy_out(&mut self) {
        self.copy_response(b'H');
        let rows = rows_count(self.rng, &mut 1, self.big);
        for _ in 0..rows {
            let mut line = text(self.rng, 300);
            line.retain(|&b| b != b'\n');
            line.push(b'\n');
            message(&mut self.out, b'd', &line);
        }
        message(&mut self.out, b'c', &[]);
        command_complete(&mut self.out, &format!("COPY {rows}"));
        let status = self.status;
        ready(&mut self.out, status);
    }

    fn copy_in(&mut self) {
        self.copy_response(b'G');
        // The client streams CopyData now; the server answers once at the end.
        if self.rng.chance(1, 5) {
            error_or_notice(self.rng, &mut self.out, b'E');
            if self.status == TX_IN_TRANSACTION {
                self.status = TX_FAILED;
            }
        } else {
            command_complete(
                &mut self.out,
                &format!("COPY {}", self.rng.range(0, 10_000)),
            );
        }
        let status = self.status;
        ready(&mut self.out, status);
    }

    fn error(&mut self) {
        error_or_notice(self.rng, &mut self.out, b'E');
        if self.status == TX_IN_TRANSACTION {
            self.status = TX_FAILED;
        }
        let status = self.status;
        ready(&mut self.out, status);
    }

    /// Asynchronous messages while the connection is idle: no ReadyForQuery after them.
    fn asynchronous(&mut self) {
        for _ in 0..self.rng.range(1, 3) {
            match self.rng.range(0, 3) {
                0 => error_or_notice(self.rng, &mut self.out, b'N'),
                1 => parameter_status(&mut self.out, "in_hot_standby", "off"),
                _ => notification(self.rng, &mut self.out),
            }
        }
    }

    fn session(&mut self, answers: usize) {
        for _ in 0..answers {
            match self.rng.range(0, 15) {
                0..=4 => self.simple_query(),
                5..=7 => self.extended_query(),
                8 => self.pipeline(),
                9 => self.copy_out(),
                10 => self.copy_in(),
                11 => self.error(),
                _ => self.asynchronous(),
            }
        }
    }
}

/// A generated server-to-client stream, plus how many single-byte encryption answers
/// (`N`s) precede it and the client packets to replay for the negotiation.
struct Conversation {
    /// Leading single-byte answers to encryption requests (all `N`).
    answers: usize,
    /// The client's packets sent before each answer, then the startup packet.
    requests: Vec<Vec<u8>>,
    stream: Vec<u8>,
}

fn startup_packet(version: u32) -> Vec<u8> {
    let mut body = version.to_be_bytes().to_vec();
    for (k, v) in [
        ("user", "app"),
        ("database", "app"),
        ("application_name", "psql"),
    ] {
        cstr(&mut body, k.as_bytes());
        cstr(&mut body, v.as_bytes());
    }
    body.push(0);
    let mut packet = (body.len() as u32 + 4).to_be_bytes().to_vec();
    packet.extend_from_slice(&body);
    packet
}

fn request_packet(code: u32) -> Vec<u8> {
    let mut packet = 8u32.to_be_bytes().to_vec();
    packet.extend_from_slice(&code.to_be_bytes());
    packet
}

fn conversation(seed: u64, answers: usize) -> Conversation {
    let mut rng = Rng::new(seed);
    let mut requests = Vec::new();
    let mut stream = Vec::new();
    let negotiation = rng.range(0, 3);
    for i in 0..negotiation.min(2) {
        let code = if i == 0 && negotiation == 2 {
            GSSENC_REQUEST_CODE
        } else {
            SSL_REQUEST_CODE
        };
        requests.push(request_packet(code));
        stream.push(b'N');
    }
    requests.push(startup_packet(if rng.chance(1, 4) {
        0x0003_0002
    } else {
        0x0003_0000
    }));
    let big = seed.is_multiple_of(8);
    let mut server = Server {
        rng: &mut rng,
        out: stream,
        status: 0,
        big,
    };
    server.startup();
    server.session(answers);
    let answers = requests.len() - 1;
    Conversation {
        answers,
        requests,
        stream: server.out,
    }
}

// ---------------------------------------------------------------------------------------
// Ways to split a stream into reads.

const SPLITS: usize = 9;

/// Read sizes covering `stream[from..]`, strategy `how` (see the match).
fn split(rng: &mut Rng, stream: &[u8], from: usize, answers: usize, how: usize) -> Vec<usize> {
    let total = stream.len() - from;
    let mut sizes = Vec::new();
    let cut = |sizes: &mut Vec<usize>, ends: &mut dyn Iterator<Item = usize>| {
        let mut at = from;
        for end in ends {
            if end > at && end <= stream.len() {
                sizes.push(end - at);
                at = end;
            }
        }
        if at < stream.len() {
            sizes.push(stream.len() - at);
        }
    };
    match how {
        // Everything in one read.
        0 => sizes.push(total),
        // One byte per read: a boundary at every offset.
        1 => sizes.resize(total, 1),
        // Tiny reads.
        2 => {
            let mut left = total;
            while left > 0 {
                let n = rng.range(1, 16).min(left);
                sizes.push(n);
                left -= n;
            }
        }
        // Log-uniform 1 B .. 64 KiB.
        3 => {
            let mut left = total;
            while left > 0 {
                let n = rng.log_size(65_536).min(left);
                sizes.push(n);
                left -= n;
            }
        }
        // libpq-like fixed buffers.
        4 => {
            let size = *rng.pick(&[8192, 16_384, 65_536, 7, 6, 5]);
            let mut left = total;
            while left > 0 {
                let n = size.min(left);
                sizes.push(n);
                left -= n;
            }
        }
        // Exactly at message boundaries.
        5 => {
            let (units, _) = reference_parse(stream, answers);
            cut(&mut sizes, &mut units.iter().map(|u| u.end));
        }
        // Inside every ReadyForQuery (k = 1..5 bytes in) and right after it.
        6 => {
            let (units, _) = reference_parse(stream, answers);
            let mut ends = Vec::new();
            for u in units.iter().filter(|u| !u.answer && u.kind == b'Z') {
                let k = rng.range(1, 5);
                ends.extend([u.start + k, u.end]);
            }
            cut(&mut sizes, &mut ends.into_iter());
        }
        // Inside message headers (1..4 bytes after the type byte), random otherwise.
        7 => {
            let (units, _) = reference_parse(stream, answers);
            let mut ends = Vec::new();
            for u in &units {
                if rng.chance(1, 2) {
                    ends.push(u.start + rng.range(0, 4).min(u.end - u.start));
                }
            }
            cut(&mut sizes, &mut ends.into_iter());
        }
        // Message-aware mix: each read ends 0..8 bytes around a random message end.
        _ => {
            let (units, _) = reference_parse(stream, answers);
            let mut ends = Vec::new();
            for u in &units {
                if rng.chance(1, 3) {
                    ends.push((u.end + rng.range(0, 16)).saturating_sub(8));
                }
            }
            cut(&mut sizes, &mut ends.into_iter());
        }
    }
    debug_assert_eq!(sizes.iter().sum::<usize>(), total);
    sizes
}

/// Feeds `stream[from..]` in reads of `sizes` and checks the reader after every read
/// against the reference: the status of the ReadyForQuery ending exactly at the boundary
/// (and fully seen by this reader), otherwise unchanged. Returns the final status.
fn check_reads(
    reader: &mut Reader,
    stream: &[u8],
    from: usize,
    at_end: &[u8],
    starts: &[usize],
    sizes: &[usize],
) -> u8 {
    let mut at = from;
    let mut expected = reader.tx_status;
    for &size in sizes {
        reader.client_reads(&stream[at..at + size]);
        at += size;
        // A reader that started mid-stream cannot see a ReadyForQuery it joined inside.
        if at_end[at] != 0 && starts.binary_search(&(at - 6)).is_ok() && at - 6 >= from {
            expected = at_end[at];
        }
        assert_eq!(
            reader.tx_status, expected,
            "status after read ending at {at} (size {size}, from {from})"
        );
    }
    expected
}

/// Runs the negotiation of `conv` into a fresh reader, returning it and the stream offset
/// the session (startup answer) begins at.
fn negotiated_reader(conv: &Conversation) -> (Reader, usize) {
    let mut reader = Reader::default();
    for i in 0..conv.answers {
        reader.client_writes(&conv.requests[i]);
        assert_eq!(
            reader.proto,
            proto::FIRST_CLIENT_PACKET | proto::ENCRYPTION_REQUESTED
        );
        reader.client_reads(&conv.stream[i..i + 1]);
        assert_eq!(reader.proto, 0, "after N");
        assert_eq!(reader.tx_status, 0);
    }
    reader.client_writes(&conv.requests[conv.answers]);
    assert_eq!(reader.proto, proto::FIRST_CLIENT_PACKET);
    (reader, conv.answers)
}

fn rfq_starts(stream: &[u8], answers: usize) -> Vec<usize> {
    let (units, _) = reference_parse(stream, answers);
    units
        .iter()
        .filter(|u| !u.answer && u.kind == b'Z')
        .map(|u| u.start)
        .collect()
}

// ---------------------------------------------------------------------------------------
// The tests.

#[test]
fn reference_parser_frames_generated_streams_exactly() {
    for seed in 0..150 {
        let conv = conversation(seed, 10);
        let (units, stopped) = reference_parse(&conv.stream, conv.answers);
        assert_eq!(stopped, conv.stream.len(), "seed {seed}: trailing bytes");
        let mut at = 0;
        for u in &units {
            assert_eq!(u.start, at);
            at = u.end;
        }
        // The startup answer ends with ReadyForQuery(I); no generated byte run forges one.
        let statuses = reference_statuses(&conv.stream, conv.answers);
        assert_eq!(statuses[0].1, TX_IDLE);
        let real: Vec<usize> = statuses.iter().map(|s| s.0).collect();
        assert_eq!(
            pattern_ends(&conv.stream),
            real,
            "seed {seed}: forged ReadyForQuery"
        );
    }
}

#[test]
fn every_read_split_reports_exactly_the_reference_status() {
    let mut cases = 0;
    let mut statuses_seen = [0usize; 3];
    for seed in 0..300u64 {
        let conv = conversation(seed, 1 + (seed as usize % 25));
        let at_end = rfq_end_map(&conv.stream, conv.answers);
        let starts = rfq_starts(&conv.stream, conv.answers);
        let reference = reference_statuses(&conv.stream, conv.answers);
        for (_, s) in &reference {
            statuses_seen[[TX_IDLE, TX_IN_TRANSACTION, TX_FAILED]
                .iter()
                .position(|x| x == s)
                .unwrap()] += 1;
        }
        let mut rng = Rng::new(seed ^ 0x5EED);
        for how in 0..SPLITS {
            if how == 1 && conv.stream.len() > 40_000 {
                continue;
            }
            let (mut reader, from) = negotiated_reader(&conv);
            let sizes = split(&mut rng, &conv.stream, from, conv.answers, how);
            let last = check_reads(&mut reader, &conv.stream, from, &at_end, &starts, &sizes);
            // A stream that ends with an answer ends with its status, whatever the split.
            let &(end, status) = reference.last().unwrap();
            if end == conv.stream.len() {
                assert_eq!(last, status, "seed {seed} split {how}");
            }
            assert_eq!(
                reader.proto,
                proto::FIRST_CLIENT_PACKET | proto::FIRST_SERVER_BYTE
            );
            cases += 1;
        }
    }
    assert!(cases >= 2500, "{cases}");
    assert!(statuses_seen.iter().all(|&n| n > 100), "{statuses_seen:?}");
}

/// Exhaustive over splits: whatever the previous boundary, one more read leaves the
/// window holding the stream's last 8 bytes, so by induction every split of the stream
/// gives window = last 8 bytes at every boundary; and at every offset the window's
/// verdict equals the reference's.
#[test]
fn window_is_the_streams_last_bytes_at_every_boundary_of_every_split() {
    for seed in (1000..1040u64).filter(|seed| seed % 8 != 0) {
        let conv = conversation(seed, 8);
        let s = &conv.stream[..conv.stream.len().min(12_000)];
        let at_end = rfq_end_map(s, conv.answers);
        for b in 0..=s.len() {
            let window = last8(s, b);
            let verdict = ready_for_query_status(&window).unwrap_or(0);
            assert_eq!(verdict, at_end[b], "seed {seed} offset {b}");
            for a in b.saturating_sub(10)..b {
                let mut rolled = last8(s, a);
                roll_chunk(&mut rolled, &s[a..b]);
                assert_eq!(rolled, window, "seed {seed} {a}..{b}");
            }
            if b > 0 {
                // A read from the very start (any length) too.
                let mut rolled = [0u8; 8];
                roll_chunk(&mut rolled, &s[..b]);
                assert_eq!(rolled, window);
            }
        }
    }
}

#[test]
fn truncated_streams_never_report_a_wrong_status() {
    let mut cases = 0;
    for seed in 2000..2100u64 {
        let conv = conversation(seed, 6);
        let full = &conv.stream;
        let mut rng = Rng::new(seed);
        let starts = rfq_starts(full, conv.answers);
        // Cuts: around every ReadyForQuery, and random ones.
        let mut cuts: Vec<usize> = starts.iter().flat_map(|&s| s..=s + 6).collect();
        cuts.extend((0..20).map(|_| rng.range(conv.answers, full.len())));
        for cut in cuts {
            let stream = &full[..cut];
            let (_, stopped) = reference_parse(stream, conv.answers);
            assert!(stopped <= cut);
            let at_end = rfq_end_map(stream, conv.answers);
            let starts = rfq_starts(stream, conv.answers);
            let how = rng.range(0, SPLITS - 1);
            let (mut reader, from) = negotiated_reader(&conv);
            let sizes = split(&mut rng, stream, from, conv.answers, how);
            let last = check_reads(&mut reader, stream, from, &at_end, &starts, &sizes);
            // Only a status the reference saw complete, and the last one when the cut
            // falls right after it.
            let reference = reference_statuses(stream, conv.answers);
            assert!(
                last == 0 || reference.iter().any(|r| r.1 == last),
                "seed {seed} cut {cut}"
            );
            if let Some(&(end, status)) = reference.last()
                && end == cut
            {
                assert_eq!(last, status);
            }
            cases += 1;
        }
    }
    assert!(cases > 1000, "{cases}");
}

#[test]
fn mid_stream_pickup_reports_the_next_complete_answer() {
    for seed in 3000..3300u64 {
        let conv = conversation(seed, 10);
        let s = &conv.stream;
        let mut rng = Rng::new(seed);
        let at_end = rfq_end_map(s, conv.answers);
        let starts = rfq_starts(s, conv.answers);
        let from = rng.range(0, s.len() - 1);
        let mut reader = Reader::preexisting();
        let how = rng.range(0, SPLITS - 1);
        let sizes = split(&mut rng, s, from, conv.answers, how);
        let last = check_reads(&mut reader, s, from, &at_end, &starts, &sizes);
        // Picked up at the first answer it sees whole, if the stream ends with one.
        if let Some(&st) = starts.last()
            && st + 6 == s.len()
            && st >= from
        {
            assert_eq!(last, s[st + 5], "seed {seed} from {from}");
        }
    }
}

#[test]
fn asynchronous_messages_while_idle_leave_the_status_alone() {
    let mut rng = Rng::new(7);
    for status in [TX_IDLE, TX_IN_TRANSACTION, TX_FAILED] {
        let mut stream = Vec::new();
        ready(&mut stream, status);
        let answer_end = stream.len();
        for _ in 0..50 {
            notification(&mut rng, &mut stream);
            error_or_notice(&mut rng, &mut stream, b'N');
            parameter_status(&mut stream, "TimeZone", "UTC");
        }
        for how in 0..SPLITS {
            let mut reader = Reader::preexisting();
            let sizes = split(&mut rng, &stream, 0, 0, how);
            let mut at = 0;
            let mut expected = 0;
            for size in sizes {
                reader.client_reads(&stream[at..at + size]);
                at += size;
                if at == answer_end {
                    expected = status;
                }
                assert_eq!(reader.tx_status, expected, "split {how} at {at}");
            }
        }
    }
}

#[test]
fn pipelined_answers_in_one_read_report_the_last() {
    let mut stream = Vec::new();
    for status in [TX_IN_TRANSACTION, TX_FAILED, TX_IDLE, TX_IN_TRANSACTION] {
        message(&mut stream, b'1', &[]);
        message(&mut stream, b'2', &[]);
        command_complete(&mut stream, "SELECT 0");
        ready(&mut stream, status);
    }
    let mut reader = Reader::preexisting();
    reader.client_reads(&stream);
    assert_eq!(reader.tx_status, TX_IN_TRANSACTION);
    // Same with the last answer alone in a read of 1 byte past a merged read.
    let mut reader = Reader::preexisting();
    reader.client_reads(&stream[..stream.len() - 1]);
    assert_eq!(
        reader.tx_status, 0,
        "stream ends inside the last ReadyForQuery"
    );
    reader.client_reads(&stream[stream.len() - 1..]);
    assert_eq!(reader.tx_status, TX_IN_TRANSACTION);
}

/// The documented limitation: a read that ends right after data bytes shaped like a
/// ReadyForQuery (`Z`, 0, 0, 0, 5, `I`/`T`/`E`) is taken for one. Text values can only
/// produce it with a `Z` before a column length of 5 (the NULs come from the length).
#[test]
fn documented_false_positive_on_forged_bytes_at_a_read_end() {
    // A binary DataRow whose value holds the pattern, read so the read ends after it.
    let mut stream = Vec::new();
    ready(&mut stream, TX_IDLE);
    let mut body = 1u16.to_be_bytes().to_vec();
    let value = [0xde, 0xad, b'Z', 0, 0, 0, 5, b'E', 0xbe, 0xef];
    body.extend_from_slice(&(value.len() as u32).to_be_bytes());
    body.extend_from_slice(&value);
    let row_start = stream.len();
    message(&mut stream, b'D', &body);
    let forged_end = row_start + 1 + 4 + 2 + 4 + 8;
    assert_eq!(pattern_ends(&stream), vec![6, forged_end]);
    assert_eq!(
        rfq_end_map(&stream, 0)[forged_end],
        0,
        "the reference sees no ReadyForQuery"
    );

    let mut reader = Reader::preexisting();
    reader.client_reads(&stream[..forged_end]);
    assert_eq!(
        reader.tx_status, TX_FAILED,
        "false positive: forged status reported"
    );
    reader.client_reads(&stream[forged_end..]);
    assert_eq!(
        reader.tx_status, TX_FAILED,
        "and it sticks until the next real answer"
    );

    // The same bytes are harmless when the read does not end right after them.
    let mut reader = Reader::preexisting();
    reader.client_reads(&stream[..6]);
    reader.client_reads(&stream[6..forged_end + 1]);
    reader.client_reads(&stream[forged_end + 1..]);
    assert_eq!(reader.tx_status, TX_IDLE);

    // Text data: a value ending in `Z` followed by a 5-byte value starting with I/T/E.
    let mut body = 2u16.to_be_bytes().to_vec();
    for v in [&b"FOOZ"[..], b"Italy"] {
        body.extend_from_slice(&(v.len() as u32).to_be_bytes());
        body.extend_from_slice(v);
    }
    let mut stream = Vec::new();
    message(&mut stream, b'D', &body);
    let forged_end = stream.len() - 4;
    assert_eq!(pattern_ends(&stream), vec![forged_end]);
    let mut reader = Reader::preexisting();
    reader.client_reads(&stream[..forged_end]);
    assert_eq!(reader.tx_status, TX_IDLE, "false positive from text data");
}

#[test]
fn garbage_never_panics_and_only_reports_i_t_e_like_the_window_oracle() {
    let mut cases = 0;
    for seed in 4000..6000u64 {
        let mut rng = Rng::new(seed);
        let len = rng.log_size(4096);
        // Uniform bytes, or bytes from the alphabet of a ReadyForQuery to hit the pattern.
        let biased = seed % 2 == 0;
        let stream: Vec<u8> = (0..len)
            .map(|_| {
                if biased {
                    *rng.pick(&[b'Z', 0, 0, 0, 5, b'I', b'T', b'E', b'N', b'S', b'G'])
                } else {
                    rng.byte()
                }
            })
            .collect();
        // Random starting negotiation state, including garbage client packets.
        let mut reader = Reader {
            preexisting: rng.chance(1, 3),
            ..Reader::default()
        };
        if rng.chance(1, 2) {
            let head: Vec<u8> = (0..rng.range(0, 16)).map(|_| rng.byte()).collect();
            reader.client_writes(&head);
        } else {
            reader.client_writes(&request_packet(
                *rng.pick(&[SSL_REQUEST_CODE, GSSENC_REQUEST_CODE]),
            ));
        }
        let encrypted_from = if reader.proto & proto::ENCRYPTION_REQUESTED != 0 {
            matches!(stream[0], b'S' | b'G')
        } else {
            false
        };
        let mut at = 0;
        let mut expected = 0;
        let mut window = [0u8; 8];
        while at < stream.len() {
            let n = rng.log_size(300).min(stream.len() - at);
            let chunk = &stream[at..at + n];
            reader.client_reads(chunk);
            at += n;
            assert!(matches!(
                reader.tx_status,
                0 | TX_IDLE | TX_IN_TRANSACTION | TX_FAILED
            ));
            roll_chunk(&mut window, chunk);
            if let Some(s) = ready_for_query_status(&window) {
                assert!(matches!(s, TX_IDLE | TX_IN_TRANSACTION | TX_FAILED));
            }
            if !encrypted_from {
                // The window oracle: the stream's last 6 bytes at this boundary.
                if pattern_ends(&stream[at.saturating_sub(6)..at]).contains(&at.min(6)) {
                    expected = stream[at - 1];
                }
            }
            assert_eq!(reader.tx_status, expected, "seed {seed} at {at}");
        }
        cases += 1;
    }
    assert_eq!(cases, 2000);
}

#[test]
fn ready_for_query_status_exact_shape() {
    for status in 0..=255u8 {
        let window = [0xff, b'Z', b'Z', 0, 0, 0, 5, status];
        let expected = matches!(status, b'I' | b'T' | b'E').then_some(status);
        assert_eq!(ready_for_query_status(&window), expected);
    }
    // The two bytes before the message do not matter; every other byte does.
    let good = [0, 0, b'Z', 0, 0, 0, 5, b'T'];
    let mut rng = Rng::new(11);
    for _ in 0..200 {
        let mut w = good;
        w[0] = rng.byte();
        w[1] = rng.byte();
        assert_eq!(ready_for_query_status(&w), Some(b'T'));
        let i = rng.range(2, 6);
        let b = rng.byte();
        w[i] = b;
        let same = b == good[i];
        assert_eq!(ready_for_query_status(&w).is_some(), same, "byte {i} = {b}");
    }
    assert_eq!(ready_for_query_status(&[0; 8]), None);
    // Not at the end of the window: a ReadyForQuery followed by anything is not one.
    assert_eq!(
        ready_for_query_status(&[b'Z', 0, 0, 0, 5, b'I', b'A', 0]),
        None
    );
}

#[test]
fn roll_window_chunk_at_once_equals_byte_by_byte() {
    let mut rng = Rng::new(99);
    for _ in 0..3000 {
        let mut start = [0u8; 8];
        start.iter_mut().for_each(|b| *b = rng.byte());
        let chunk: Vec<u8> = (0..rng.log_size(64).saturating_sub(1))
            .map(|_| rng.byte())
            .collect();
        let mut at_once = start;
        roll_chunk(&mut at_once, &chunk);
        let mut one_by_one = start;
        for b in &chunk {
            roll_chunk(&mut one_by_one, core::slice::from_ref(b));
        }
        assert_eq!(at_once, one_by_one);
        // Also equal to the last 8 bytes of (start ++ chunk).
        let mut all = start.to_vec();
        all.extend_from_slice(&chunk);
        assert_eq!(at_once, last8(&all, all.len()));
        // roll_window reads only the right-aligned `count` bytes of `tail`.
        let count = chunk.len().min(8);
        let mut tail = [0u8; 8];
        tail.iter_mut().for_each(|b| *b = rng.byte());
        tail[8 - count..].copy_from_slice(&chunk[chunk.len() - count..]);
        let mut direct = start;
        roll_window(&mut direct, &tail, count);
        assert_eq!(direct, at_once, "garbage left of the tail must be ignored");
    }
    // count 0 leaves the window alone; counts past 8 act as 8.
    let mut w = *b"abcdefgh";
    roll_window(&mut w, b"ABCDEFGH", 0);
    assert_eq!(&w, b"abcdefgh");
    roll_window(&mut w, b"ABCDEFGH", 3);
    assert_eq!(&w, b"defghFGH");
    roll_window(&mut w, b"ABCDEFGH", 100);
    assert_eq!(&w, b"ABCDEFGH");
}

fn head(len: u32, code: u32) -> [u8; 8] {
    let mut h = [0u8; 8];
    h[..4].copy_from_slice(&len.to_be_bytes());
    h[4..].copy_from_slice(&code.to_be_bytes());
    h
}

#[test]
fn client_packet_classifier_table() {
    use proto::{CANCEL, ENCRYPTED, ENCRYPTION_REQUESTED as ENC, FIRST_CLIENT_PACKET as FIRST};
    let startup = startup_packet(0x0003_0000);
    let startup32 = startup_packet(0x0003_0002);
    let table: &[([u8; 8], u8, &str)] = &[
        (startup[..8].try_into().unwrap(), FIRST, "startup v3.0"),
        (startup32[..8].try_into().unwrap(), FIRST, "startup v3.2"),
        (head(8, SSL_REQUEST_CODE), FIRST | ENC, "SSLRequest"),
        (head(8, GSSENC_REQUEST_CODE), FIRST | ENC, "GSSENCRequest"),
        (
            head(16, CANCEL_REQUEST_CODE),
            FIRST | CANCEL,
            "CancelRequest 3.0 (4-byte key)",
        ),
        (
            head(12 + 32, CANCEL_REQUEST_CODE),
            FIRST | CANCEL,
            "CancelRequest 3.2 (32-byte key)",
        ),
        (
            head(12 + 256, CANCEL_REQUEST_CODE),
            FIRST | CANCEL,
            "CancelRequest 3.2 (max key)",
        ),
        (
            head(12, CANCEL_REQUEST_CODE),
            FIRST,
            "CancelRequest without key",
        ),
        (
            head(12 + 257, CANCEL_REQUEST_CODE),
            FIRST,
            "CancelRequest, key too long",
        ),
        (head(16, SSL_REQUEST_CODE), FIRST, "SSL code, wrong length"),
        (
            head(9, GSSENC_REQUEST_CODE),
            FIRST,
            "GSS code, wrong length",
        ),
        (
            head(8, CANCEL_REQUEST_CODE),
            FIRST,
            "cancel code, too short",
        ),
        (head(8, 80_877_105), FIRST, "unknown request code"),
        (head(8, 0x0002_0000), FIRST, "protocol 2 startup"),
        ([0; 8], FIRST, "zeros"),
        ([0xff; 8], FIRST, "ones"),
        (*b"GET / HT", FIRST, "not postgres"),
        (
            [0x16, 3, 1, 0x02, 0x00, 1, 0, 1],
            FIRST | ENCRYPTED,
            "direct SSL: TLS ClientHello",
        ),
        (
            [0x16, 3, 3, 0x00, 0xf4, 1, 0, 0],
            FIRST | ENCRYPTED,
            "direct SSL: TLS 1.2 record",
        ),
        ([0x16, 2, 0, 0, 0, 0, 0, 0], FIRST, "0x16 but not TLS"),
    ];
    for (h, expected, what) in table {
        assert_eq!(classify_client_packet(h), *expected, "{what}");
    }
    let mut rng = Rng::new(5);
    for _ in 0..2000 {
        let mut h = [0u8; 8];
        h.iter_mut().for_each(|b| *b = rng.byte());
        let bits = classify_client_packet(&h);
        assert_ne!(bits & FIRST, 0);
        assert_eq!(bits & !(FIRST | ENC | CANCEL | ENCRYPTED), 0);
        assert!(
            (u8::from(bits & ENC != 0)
                + u8::from(bits & CANCEL != 0)
                + u8::from(bits & ENCRYPTED != 0))
                <= 1
        );
    }
}

#[test]
fn encryption_negotiation_sequences() {
    use proto::{
        ENCRYPTED, ENCRYPTION_REQUESTED as ENC, FIRST_CLIENT_PACKET as FIRST,
        FIRST_SERVER_BYTE as SERVER,
    };
    let ssl = request_packet(SSL_REQUEST_CODE);
    let gss = request_packet(GSSENC_REQUEST_CODE);
    let startup = startup_packet(0x0003_0000);
    let mut session = Vec::new();
    message(&mut session, b'R', &0u32.to_be_bytes());
    message(&mut session, b'K', &[1, 2, 3, 4, 5, 6, 7, 8]);
    ready(&mut session, TX_IDLE);
    // Ciphertext that happens to end like a ReadyForQuery: never read.
    let ciphertext = [0x17, 3, 3, 0, 9, b'Z', 0, 0, 0, 5, b'T'];

    // Plain startup: first server byte noted, session followed.
    let mut r = Reader::default();
    r.client_writes(&startup);
    assert_eq!(r.proto, FIRST);
    r.client_reads(&session);
    assert_eq!((r.proto, r.tx_status), (FIRST | SERVER, TX_IDLE));

    // SSL 'S' -> encrypted, nothing more is read.
    let mut r = Reader::default();
    r.client_writes(&ssl);
    assert_eq!(r.proto, FIRST | ENC);
    r.client_reads(b"S");
    assert_eq!(r.proto, FIRST | ENC | ENCRYPTED | SERVER);
    r.client_writes(&startup);
    r.client_reads(&ciphertext);
    assert_eq!(
        (r.proto, r.tx_status, r.window),
        (FIRST | ENC | ENCRYPTED | SERVER, 0, [0; 8])
    );

    // GSS 'G' -> encrypted.
    let mut r = Reader::default();
    r.client_writes(&gss);
    r.client_reads(b"G");
    assert_ne!(r.proto & ENCRYPTED, 0);
    r.client_reads(&ciphertext);
    assert_eq!(r.tx_status, 0);

    // SSL 'N' -> plaintext startup follows.
    let mut r = Reader::default();
    r.client_writes(&ssl);
    r.client_reads(b"N");
    assert_eq!(r.proto, 0);
    r.client_writes(&startup);
    assert_eq!(r.proto, FIRST);
    r.client_reads(&session);
    assert_eq!((r.proto, r.tx_status), (FIRST | SERVER, TX_IDLE));

    // GSS 'N', then SSL 'S' -> encrypted.
    let mut r = Reader::default();
    r.client_writes(&gss);
    r.client_reads(b"N");
    assert_eq!(r.proto, 0);
    r.client_writes(&ssl);
    assert_eq!(r.proto, FIRST | ENC);
    r.client_reads(b"S");
    assert_ne!(r.proto & ENCRYPTED, 0);
    r.client_reads(&ciphertext);
    assert_eq!(r.tx_status, 0);

    // GSS 'N', SSL 'N' -> plaintext.
    let mut r = Reader::default();
    for request in [&gss, &ssl] {
        r.client_writes(request);
        r.client_reads(b"N");
        assert_eq!(r.proto, 0);
    }
    r.client_writes(&startup);
    r.client_reads(&session[..3]);
    r.client_reads(&session[3..]);
    assert_eq!((r.proto, r.tx_status), (FIRST | SERVER, TX_IDLE));

    // An ErrorResponse instead of the one-byte answer (old server): not encrypted.
    let mut r = Reader::default();
    r.client_writes(&ssl);
    let mut error = Vec::new();
    error_or_notice(&mut Rng::new(1), &mut error, b'E');
    r.client_reads(&error);
    assert_eq!(r.proto & ENCRYPTED, 0);

    // Direct SSL (no SSLRequest, the ClientHello first): encrypted, nothing read.
    let mut r = Reader::default();
    r.client_writes(&[0x16, 3, 1, 0x02, 0x00, 1, 0, 1, 0xfc, 3, 3]);
    assert_eq!(r.proto, FIRST | ENCRYPTED);
    r.client_reads(&ciphertext);
    r.client_reads(&session);
    assert_eq!((r.tx_status, r.window), (0, [0; 8]));

    // CancelRequest: no session, nothing read.
    let mut r = Reader::default();
    r.client_writes(&head(16, CANCEL_REQUEST_CODE));
    r.client_reads(&session);
    assert_eq!((r.proto, r.tx_status), (FIRST | proto::CANCEL, 0));

    // after_first_server_byte, directly, for every byte.
    for byte in 0..=255u8 {
        let plain = after_first_server_byte(FIRST, byte);
        assert_eq!(plain, FIRST | SERVER);
        let answered = after_first_server_byte(FIRST | ENC, byte);
        if byte == b'S' || byte == b'G' {
            assert_eq!(answered, FIRST | ENC | ENCRYPTED | SERVER);
        } else {
            assert_eq!(answered, 0);
        }
        // Bits it does not own are kept.
        assert_eq!(
            after_first_server_byte(FIRST | proto::UNREADABLE, byte) & proto::UNREADABLE,
            proto::UNREADABLE
        );
        assert_eq!(
            after_first_server_byte(FIRST | ENC | proto::UNREADABLE, byte) & proto::UNREADABLE,
            proto::UNREADABLE
        );
    }
}

/// Negotiation replayed inside generated conversations: the `N` answers are read on their
/// own and never disturb the session's statuses.
#[test]
fn generated_conversations_with_negotiation() {
    let mut with_answers = 0;
    for seed in 0..300u64 {
        let conv = conversation(seed, 3);
        with_answers += usize::from(conv.answers > 0);
        let (reader, from) = negotiated_reader(&conv);
        assert_eq!(from, conv.answers);
        assert_eq!(reader.tx_status, 0);
    }
    assert!(with_answers > 100, "{with_answers}");
}

/// A start-up answer as PostgreSQL sends it after authentication, with a cancel key of
/// `key_len` bytes (4 in protocol 3.0, 32 from PostgreSQL 18 in 3.2).
fn startup_answer(pid: u32, key_len: usize, sasl: bool) -> Vec<u8> {
    let mut out = Vec::new();
    if sasl {
        message(&mut out, b'R', &[0, 0, 0, 12, b'v', b'=', b'x', b'y']);
    }
    message(&mut out, b'R', &[0, 0, 0, 0]);
    for (name, value) in [
        ("application_name", "app"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("server_version", "16.4 (Debian 16.4-1)"),
        ("TimeZone", "Etc/UTC"),
    ] {
        parameter_status(&mut out, name, value);
    }
    let mut key = pid.to_be_bytes().to_vec();
    key.extend((0..key_len).map(|i| i as u8 ^ 0x5a));
    message(&mut out, b'K', &key);
    ready(&mut out, TX_IDLE);
    out
}

#[test]
fn backend_pid_found_however_the_answer_is_split() {
    let mut rng = Rng::new(14);
    for key_len in [4, 32, 256] {
        for sasl in [false, true] {
            let answer = startup_answer(0x0012_3456, key_len, sasl);
            let k = answer.iter().position(|&b| b == b'K').expect("K");
            for _ in 0..300 {
                // Split anywhere except inside a message header (the scan gives up
                // there, which the next test covers).
                let mut cuts: Vec<usize> = (0..3)
                    .map(|_| 1 + rng.next_u64() as usize % (answer.len() - 1))
                    .collect();
                cuts.sort_unstable();
                cuts.dedup();
                let reads: Vec<&[u8]> = std::iter::once(0)
                    .chain(cuts.iter().copied())
                    .zip(cuts.iter().copied().chain(std::iter::once(answer.len())))
                    .map(|(a, b)| &answer[a..b])
                    .collect();
                let headers = message_starts(&answer);
                let splits_header = cuts
                    .iter()
                    .any(|&c| headers.iter().any(|&h| c > h && c < h + 5))
                    || cuts.iter().any(|&c| c > k && c < k + 9);
                let found = backend_pid_of(&reads);
                if splits_header {
                    assert!(found.is_none() || found == Some(0x0012_3456));
                } else {
                    assert_eq!(found, Some(0x0012_3456), "cuts {cuts:?}");
                }
            }
        }
    }
}

fn message_starts(stream: &[u8]) -> Vec<usize> {
    let mut starts = Vec::new();
    let mut at = 0;
    while at + 5 <= stream.len() {
        starts.push(at);
        let len = u32::from_be_bytes([
            stream[at + 1],
            stream[at + 2],
            stream[at + 3],
            stream[at + 4],
        ]);
        at += 1 + len as usize;
    }
    starts
}

#[test]
fn no_backend_pid_without_backend_key_data() {
    let mut out = Vec::new();
    message(&mut out, b'R', &[0, 0, 0, 0]);
    ready(&mut out, TX_IDLE);
    message(&mut out, b'K', &[0, 0, 0, 9, 1, 2, 3, 4]);
    assert_eq!(backend_pid_of(&[&out]), None);
    // An error instead of a session, and garbage, end the scan without a pid.
    let mut err = Vec::new();
    message(&mut err, b'E', b"SFATAL\0\0");
    assert_eq!(backend_pid_of(&[&err]), None);
    assert_eq!(
        backend_pid_of(&[&[b'K', 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 1]]),
        None
    );
    assert_eq!(backend_pid_of(&[&[b'K', 0, 0, 0, 12, 0, 0]]), None);
}
