//! Where a session stands in the Postgres protocol, read from bytes the copy engine already
//! holds: between transactions or not.
//!
//! [`Framing`] follows both directions of an unencrypted session by message type and 4-byte
//! length, across any read boundaries. It looks at each message's header only (and at the one
//! status byte of ReadyForQuery), so bodies may pass without being seen: [`Framing::skippable`]
//! says how many bytes may be spliced before the next header must be read.
//!
//! It stops following, for good, when the stream is not one it can follow: an encrypted session
//! (SSLRequest or GSSENCRequest answered `S` or `G`), a CancelRequest, or bytes that do not frame
//! as Postgres (an unknown message type, an impossible length). Such a session is never "between
//! transactions", so it is closed as it was before this module existed.
//!
//! It also keeps the server's BackendKeyData (its process id and secret key, the key a
//! CancelRequest must carry), so a cancel can be sent to the backend that issued the key.
//! [`Framing::startup_only`] follows a session only that far: up to its first ReadyForQuery.
//!
//! Pure: no I/O, no clocks, no allocation.

use crate::pgwire::{GSSENC_REQUEST, PROTOCOL_3, SSL_REQUEST};

/// Postgres refuses larger messages (`MaxAllocSize`); a longer length means the stream is not
/// Postgres, or is out of step.
const MAX_MESSAGE: u32 = 1 << 30;
/// Postgres refuses startup packets larger than this.
const MAX_STARTUP: u32 = crate::pgwire::MAX_STARTUP_LEN as u32;

/// Message types a client sends once started (protocol 3).
const CLIENT_TYPES: &[u8] = b"BCdcDEHFfpPQSX";
/// Message types a server sends (protocol 3).
const SERVER_TYPES: &[u8] = b"RKSZTDCENAGHWdc123nstIVv";

/// The key a backend gives its client (BackendKeyData) for cancelling its queries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendKey {
    pub process_id: u32,
    pub secret_key: u32,
}

/// Length of a protocol 3.0 BackendKeyData (`K`): itself, a process id and a 4-byte secret.
/// Protocol 3.2 keys are longer; they are not kept, and a cancel for one is sent to every
/// backend it may be for.
const KEY_DATA_LEN: u32 = 12;

/// One direction of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Client → server.
    Client,
    /// Server → client.
    Server,
}

/// Where one direction's reader is: collecting a header, or passing a body.
#[derive(Debug, Clone, Copy, Default)]
struct Cursor {
    /// Header bytes so far: type and length (typed), or length and code (a startup packet);
    /// for ReadyForQuery, also its status byte; for BackendKeyData, also its key.
    header: [u8; 13],
    have: u8,
    /// Header bytes wanted before the message can be judged.
    need: u8,
    /// Body bytes of the current message still to pass.
    left: u32,
}

impl Cursor {
    fn new(need: u8) -> Cursor {
        Cursor {
            need,
            ..Cursor::default()
        }
    }

    fn at_boundary(&self) -> bool {
        self.have == 0 && self.left == 0
    }

    fn u32_at(&self, at: usize) -> u32 {
        u32::from_be_bytes([
            self.header[at],
            self.header[at + 1],
            self.header[at + 2],
            self.header[at + 3],
        ])
    }
}

/// Both directions of one session, and what they say about its transaction.
#[derive(Debug, Clone)]
pub struct Framing {
    client: Cursor,
    server: Cursor,
    /// The client has not finished its startup packets (they carry no type byte).
    client_startup: bool,
    /// The server's next byte answers an SSLRequest or GSSENCRequest.
    server_answers_encryption: bool,
    on: bool,
    /// Status of the last ReadyForQuery (`I`, `T` or `E`); 0 before the first.
    status: u8,
    /// Queries, Syncs and function calls the server has not yet answered with ReadyForQuery.
    unanswered: u32,
    /// An extended-protocol message has been sent since the last Sync.
    open_batch: bool,
    /// The server's BackendKeyData, once seen.
    backend_key: Option<BackendKey>,
    /// Stops following at the first ReadyForQuery: only the startup is wanted.
    startup_only: bool,
}

impl Default for Framing {
    fn default() -> Self {
        Self::new()
    }
}

impl Framing {
    /// A session before its first byte.
    pub fn new() -> Framing {
        Framing {
            client: Cursor::new(8),
            server: Cursor::new(5),
            client_startup: true,
            server_answers_encryption: false,
            on: true,
            status: 0,
            unanswered: 0,
            open_batch: false,
            backend_key: None,
            startup_only: false,
        }
    }

    /// A session followed through its startup only, for its BackendKeyData: from its first
    /// ReadyForQuery on it is not followed, so it splices freely and costs nothing more.
    pub fn startup_only() -> Framing {
        Framing {
            startup_only: true,
            ..Framing::new()
        }
    }

    /// The server's BackendKeyData (protocol 3.0), once it has sent it in the clear.
    pub fn backend_key(&self) -> Option<BackendKey> {
        self.backend_key
    }

    /// Still following the session (unencrypted, and every byte so far framed as Postgres).
    pub fn tracked(&self) -> bool {
        self.on
    }

    /// Status byte of the last ReadyForQuery seen (`I`, `T`, `E`), if any.
    #[cfg(any(test, fuzzing))]
    pub fn status(&self) -> Option<u8> {
        (self.status != 0).then_some(self.status)
    }

    /// Between transactions with nothing in flight: the client has finished its startup, the
    /// server said idle (`I`) in its last ReadyForQuery, has answered everything the client
    /// sent, and neither direction is inside a message. Closing the session here loses nothing.
    /// A server that says ready before the client's startup is over (out of turn) does not
    /// make the session idle: the client is still mid-startup, awaiting an answer.
    pub fn idle(&self) -> bool {
        self.on
            && !self.client_startup
            && !self.server_answers_encryption
            && self.status == b'I'
            && self.unanswered == 0
            && !self.open_batch
            && self.client.at_boundary()
            && self.server.at_boundary()
    }

    /// Bytes of `side` that may pass unseen (spliced) before the next header: the rest of the
    /// current message's body. Unlimited once the session is no longer followed.
    pub fn skippable(&self, side: Side) -> usize {
        if !self.on {
            return usize::MAX;
        }
        // While the server is to answer an SSLRequest its cursor is at a boundary (0 left), so
        // the answer byte is always seen.
        match side {
            Side::Client => self.client.left as usize,
            Side::Server => self.server.left as usize,
        }
    }

    /// Records `n` bytes of `side` that passed unseen; at most [`Framing::skippable`].
    pub fn skipped(&mut self, side: Side, n: usize) {
        if !self.on {
            return;
        }
        let cursor = self.cursor(side);
        match u32::try_from(n) {
            Ok(n) if n <= cursor.left => cursor.left -= n,
            // More than the body: the caller lost count, so this module can no longer follow.
            _ => self.on = false,
        }
    }

    /// Reads `bytes` that just arrived on `side`, in order.
    pub fn observe(&mut self, side: Side, mut bytes: &[u8]) {
        while self.on && !bytes.is_empty() {
            if side == Side::Server && self.server_answers_encryption {
                self.server_answers_encryption = false;
                // `N`: the session stays in the clear and the client sends its next packet.
                self.on = bytes[0] == b'N';
                bytes = &bytes[1..];
                continue;
            }
            let cursor = self.cursor(side);
            if cursor.left > 0 {
                let n = bytes.len().min(cursor.left as usize);
                cursor.left -= n as u32;
                bytes = &bytes[n..];
                continue;
            }
            let (have, need) = (cursor.have as usize, cursor.need as usize);
            let n = bytes.len().min(need - have);
            cursor.header[have..have + n].copy_from_slice(&bytes[..n]);
            cursor.have += n as u8;
            bytes = &bytes[n..];
            if cursor.have == cursor.need {
                self.header_read(side);
            }
        }
    }

    fn cursor(&mut self, side: Side) -> &mut Cursor {
        match side {
            Side::Client => &mut self.client,
            Side::Server => &mut self.server,
        }
    }

    /// Judges a complete header: counts what it means, and starts passing its body.
    fn header_read(&mut self, side: Side) {
        if side == Side::Client && self.client_startup {
            return self.startup_packet_read();
        }
        let cursor = self.cursor(side);
        let (kind, len) = (cursor.header[0], cursor.u32_at(1));
        let types = match side {
            Side::Client => CLIENT_TYPES,
            Side::Server => SERVER_TYPES,
        };
        if !types.contains(&kind) || !(4..=MAX_MESSAGE).contains(&len) {
            self.on = false;
            return;
        }
        if side == Side::Server && kind == b'Z' {
            if len != 5 {
                self.on = false;
                return;
            }
            if cursor.need == 5 {
                // One more byte: the transaction status.
                cursor.need = 6;
                return;
            }
            let status = cursor.header[5];
            *cursor = Cursor::new(5);
            if !matches!(status, b'I' | b'T' | b'E') {
                self.on = false;
                return;
            }
            self.status = status;
            self.unanswered = self.unanswered.saturating_sub(1);
            if self.startup_only {
                self.on = false;
            }
            return;
        }
        if side == Side::Server && kind == b'K' && len == KEY_DATA_LEN {
            if cursor.need == 5 {
                // The key itself: eight more bytes, the whole body.
                cursor.need = 13;
                return;
            }
            let key = BackendKey {
                process_id: cursor.u32_at(5),
                secret_key: cursor.u32_at(9),
            };
            *cursor = Cursor::new(5);
            self.backend_key = Some(key);
            return;
        }
        *cursor = Cursor {
            left: len - 4,
            ..Cursor::new(5)
        };
        if side == Side::Client {
            match kind {
                b'Q' | b'F' => self.unanswered += 1,
                b'S' => {
                    self.unanswered += 1;
                    self.open_batch = false;
                }
                b'P' | b'B' | b'E' | b'D' | b'C' | b'H' => self.open_batch = true,
                _ => {}
            }
        }
    }

    /// A StartupMessage, SSLRequest or GSSENCRequest; anything else is not followed.
    fn startup_packet_read(&mut self) {
        let (len, code) = (self.client.u32_at(0), self.client.u32_at(4));
        if !(8..=MAX_STARTUP).contains(&len) {
            self.on = false;
            return;
        }
        self.client = Cursor {
            left: len - 8,
            ..Cursor::new(8)
        };
        match code {
            // The answer is the server's next byte, unless the server is part-way through
            // something it sent out of turn: then no byte of it can be told for the answer.
            SSL_REQUEST | GSSENC_REQUEST if len == 8 => {
                self.server_answers_encryption = self.server.at_boundary();
                self.on = self.server_answers_encryption;
            }
            _ if code & 0xffff_0000 == PROTOCOL_3 => {
                self.client_startup = false;
                self.client.need = 5;
            }
            // CancelRequest (the connection carries nothing else) or an unknown protocol.
            _ => self.on = false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::pgwire::{message as msg, packet};

    fn startup() -> Vec<u8> {
        packet(PROTOCOL_3, b"user\0app\0database\0app\0\0")
    }

    fn ready(status: u8) -> Vec<u8> {
        msg(b'Z', &[status])
    }

    /// Server's answer to a StartupMessage: AuthenticationOk, a parameter, key data, ready.
    fn welcome() -> Vec<u8> {
        [
            msg(b'R', &0u32.to_be_bytes()),
            msg(b'S', b"server_version\x0015.4\0"),
            msg(b'K', &[0, 0, 0, 7, 1, 2, 3, 4]),
            ready(b'I'),
        ]
        .concat()
    }

    fn query(sql: &str) -> Vec<u8> {
        msg(b'Q', &[sql.as_bytes(), b"\0"].concat())
    }

    /// A command's result: row description, `rows` rows, command complete.
    fn result(rows: usize) -> Vec<u8> {
        let mut out = msg(
            b'T',
            b"\0\x01a\0\0\0\0\0\0\0\0\0\0\x17\0\x04\xff\xff\xff\xff\0\0",
        );
        for _ in 0..rows {
            out.extend(msg(b'D', b"\0\x01\0\0\0\x011"));
        }
        out.extend(msg(b'C', b"SELECT 1\0"));
        out
    }

    use Side::{Client as C, Server as S};

    /// (what happened, the session's steps, tracked after, status after, idle after)
    type Row = (&'static str, Vec<(Side, Vec<u8>)>, bool, Option<u8>, bool);

    fn table() -> Vec<Row> {
        let open = |rest: Vec<(Side, Vec<u8>)>| {
            let mut steps = vec![(C, startup()), (S, welcome())];
            steps.extend(rest);
            steps
        };
        vec![
            ("nothing yet", vec![], true, None, false),
            (
                "startup sent, not answered",
                vec![(C, startup())],
                true,
                None,
                false,
            ),
            ("started: idle", open(vec![]), true, Some(b'I'), true),
            (
                "SSLRequest answered N, then a startup",
                vec![
                    (C, packet(SSL_REQUEST, b"")),
                    (S, b"N".to_vec()),
                    (C, startup()),
                    (S, welcome()),
                ],
                true,
                Some(b'I'),
                true,
            ),
            (
                "GSSENCRequest answered N, then SSLRequest answered N",
                vec![
                    (C, packet(GSSENC_REQUEST, b"")),
                    (S, b"N".to_vec()),
                    (C, packet(SSL_REQUEST, b"")),
                    (S, b"N".to_vec()),
                    (C, startup()),
                    (S, welcome()),
                ],
                true,
                Some(b'I'),
                true,
            ),
            (
                "SSLRequest answered S: encrypted, not followed",
                vec![
                    (C, packet(SSL_REQUEST, b"")),
                    (S, b"S\x16\x03\x01\x02\x00".to_vec()),
                ],
                false,
                None,
                false,
            ),
            (
                "GSSENCRequest answered G: encrypted, not followed",
                vec![(C, packet(GSSENC_REQUEST, b"")), (S, b"G".to_vec())],
                false,
                None,
                false,
            ),
            (
                "ready out of turn, then an SSLRequest awaiting its answer: not idle",
                vec![(S, ready(b'I')), (C, packet(SSL_REQUEST, b""))],
                true,
                Some(b'I'),
                false,
            ),
            (
                "part of a message out of turn, then an SSLRequest: not followed",
                vec![(S, b"N".to_vec()), (C, packet(SSL_REQUEST, b""))],
                false,
                None,
                false,
            ),
            (
                "SSLRequest with a body, as no client sends it: not followed",
                vec![(C, packet(SSL_REQUEST, &[0, 0, 0, 0]))],
                false,
                None,
                false,
            ),
            (
                "GSSENCRequest with a body: not followed",
                vec![(C, packet(GSSENC_REQUEST, b"x"))],
                false,
                None,
                false,
            ),
            (
                "CancelRequest: not followed",
                vec![(C, packet(80_877_102, &[0, 0, 0, 7, 1, 2, 3, 4]))],
                false,
                None,
                false,
            ),
            (
                "query sent, not answered",
                open(vec![(C, query("SELECT 1"))]),
                true,
                Some(b'I'),
                false,
            ),
            (
                "query answered",
                open(vec![
                    (C, query("SELECT 1")),
                    (S, [result(3), ready(b'I')].concat()),
                ]),
                true,
                Some(b'I'),
                true,
            ),
            (
                "answer without its ReadyForQuery yet",
                open(vec![(C, query("SELECT 1")), (S, result(3))]),
                true,
                Some(b'I'),
                false,
            ),
            (
                "BEGIN answered: in a transaction",
                open(vec![
                    (C, query("BEGIN")),
                    (S, [msg(b'C', b"BEGIN\0"), ready(b'T')].concat()),
                ]),
                true,
                Some(b'T'),
                false,
            ),
            (
                "failed transaction",
                open(vec![
                    (C, query("BEGIN; SELECT 1/0")),
                    (S, [msg(b'E', b"SERROR\0C22012\0\0"), ready(b'E')].concat()),
                ]),
                true,
                Some(b'E'),
                false,
            ),
            (
                "COMMIT answered: idle again",
                open(vec![
                    (C, query("BEGIN")),
                    (S, [msg(b'C', b"BEGIN\0"), ready(b'T')].concat()),
                    (C, query("COMMIT")),
                    (S, [msg(b'C', b"COMMIT\0"), ready(b'I')].concat()),
                ]),
                true,
                Some(b'I'),
                true,
            ),
            (
                "two queries pipelined, one answered",
                open(vec![
                    (C, [query("SELECT 1"), query("SELECT 2")].concat()),
                    (S, [result(1), ready(b'I')].concat()),
                ]),
                true,
                Some(b'I'),
                false,
            ),
            (
                "two queries pipelined, both answered",
                open(vec![
                    (C, [query("SELECT 1"), query("SELECT 2")].concat()),
                    (S, [result(1), ready(b'I'), result(1), ready(b'I')].concat()),
                ]),
                true,
                Some(b'I'),
                true,
            ),
            (
                "extended batch without Sync",
                open(vec![(
                    C,
                    [
                        msg(b'P', b"\0SELECT 1\0\0\0"),
                        msg(b'B', b"\0\0\0\0\0\0\0\0"),
                    ]
                    .concat(),
                )]),
                true,
                Some(b'I'),
                false,
            ),
            (
                "extended batch flushed and answered, no Sync",
                open(vec![
                    (
                        C,
                        [
                            msg(b'P', b"\0SELECT 1\0\0\0"),
                            msg(b'B', b"\0\0\0\0\0\0\0\0"),
                            msg(b'E', b"\0\0\0\0\0"),
                            msg(b'H', b""),
                        ]
                        .concat(),
                    ),
                    (S, [msg(b'1', b""), msg(b'2', b""), result(1)].concat()),
                ]),
                true,
                Some(b'I'),
                false,
            ),
            (
                "extended batch with Sync, answered",
                open(vec![
                    (
                        C,
                        [
                            msg(b'P', b"\0SELECT 1\0\0\0"),
                            msg(b'B', b"\0\0\0\0\0\0\0\0"),
                            msg(b'E', b"\0\0\0\0\0"),
                            msg(b'S', b""),
                        ]
                        .concat(),
                    ),
                    (
                        S,
                        [msg(b'1', b""), msg(b'2', b""), result(1), ready(b'I')].concat(),
                    ),
                ]),
                true,
                Some(b'I'),
                true,
            ),
            (
                "COPY TO STDOUT answered",
                open(vec![
                    (C, query("COPY t TO STDOUT")),
                    (
                        S,
                        [
                            msg(b'H', b"\0\0\x01\0\0"),
                            msg(b'd', b"1\n"),
                            msg(b'd', b"2\n"),
                            msg(b'c', b""),
                            msg(b'C', b"COPY 2\0"),
                            ready(b'I'),
                        ]
                        .concat(),
                    ),
                ]),
                true,
                Some(b'I'),
                true,
            ),
            (
                "an asynchronous notice while idle",
                open(vec![(S, msg(b'N', b"SNOTICE\0Mhi\0\0"))]),
                true,
                Some(b'I'),
                true,
            ),
            (
                "garbage from the client instead of a startup packet",
                vec![(C, b"GET / HTTP/1.1\r\n\r\n".to_vec())],
                false,
                None,
                false,
            ),
            (
                "a startup packet that claims to be huge",
                vec![(C, packet(PROTOCOL_3, b"").iter().map(|_| 0xff).collect())],
                false,
                None,
                false,
            ),
            (
                "garbage from the server",
                open(vec![(S, b"HTTP/1.1 200 OK\r\n".to_vec())]),
                false,
                Some(b'I'),
                false,
            ),
            (
                "a server message with an impossible length",
                open(vec![(S, vec![b'D', 0, 0, 0, 3])]),
                false,
                Some(b'I'),
                false,
            ),
            (
                "a ReadyForQuery with a bad status",
                open(vec![(C, query("x")), (S, ready(b'Q'))]),
                false,
                Some(b'I'),
                false,
            ),
            (
                "an unknown client message type",
                open(vec![(C, msg(b'!', b""))]),
                false,
                Some(b'I'),
                false,
            ),
            (
                "an unknown protocol version",
                vec![(C, packet(2 << 16, b"user\0a\0\0"))],
                false,
                None,
                false,
            ),
        ]
    }

    fn run(steps: &[(Side, Vec<u8>)], split: impl Fn(&[u8]) -> Vec<&[u8]>) -> Framing {
        let mut framing = Framing::new();
        for (side, bytes) in steps {
            for piece in split(bytes) {
                framing.observe(*side, piece);
            }
        }
        framing
    }

    fn check(what: &str, framing: &Framing, tracked: bool, status: Option<u8>, idle: bool) {
        assert_eq!(framing.tracked(), tracked, "{what}: tracked");
        if tracked {
            assert_eq!(framing.status(), status, "{what}: status");
        }
        assert_eq!(framing.idle(), idle, "{what}: idle");
    }

    #[test]
    fn sequences_in_whole_reads() {
        for (what, steps, tracked, status, idle) in table() {
            let framing = run(&steps, |b| vec![b]);
            check(what, &framing, tracked, status, idle);
        }
    }

    #[test]
    fn sequences_split_at_every_offset() {
        for (what, steps, tracked, status, idle) in table() {
            let whole: usize = steps.iter().map(|(_, b)| b.len()).max().unwrap_or(0);
            for at in 0..=whole {
                let framing = run(&steps, |b| {
                    let at = at.min(b.len());
                    vec![&b[..at], &b[at..]]
                });
                check(
                    &format!("{what}, split at {at}"),
                    &framing,
                    tracked,
                    status,
                    idle,
                );
            }
        }
    }

    #[test]
    fn sequences_one_byte_at_a_time() {
        for (what, steps, tracked, status, idle) in table() {
            let framing = run(&steps, |b| b.chunks(1).collect());
            check(
                &format!("{what}, bytewise"),
                &framing,
                tracked,
                status,
                idle,
            );
        }
    }

    /// Bodies passed unseen (spliced) keep the count, as long as each header is seen.
    #[test]
    fn bodies_may_pass_unseen() {
        let mut framing = run(&[(C, startup()), (S, welcome())], |b| vec![b]);
        framing.observe(C, &query("SELECT big"));
        let row = msg(b'D', &vec![7u8; 100_000]);
        framing.observe(S, &row[..10]);
        assert_eq!(framing.skippable(S), 100_000 - 5);
        framing.skipped(S, 60_000);
        assert_eq!(framing.skippable(S), 100_000 - 5 - 60_000);
        framing.skipped(S, 100_000 - 5 - 60_000);
        assert_eq!(framing.skippable(S), 0, "the next header must be seen");
        framing.observe(S, &[msg(b'C', b"SELECT 1\0"), ready(b'I')].concat());
        assert!(framing.idle());
        assert_eq!(framing.skippable(C), 0);
    }

    #[test]
    fn skipping_past_a_body_stops_following() {
        let mut framing = run(&[(C, startup()), (S, welcome())], |b| vec![b]);
        framing.observe(S, &[b'D', 0, 0, 0, 10]);
        framing.skipped(S, 7);
        assert!(!framing.tracked());
        assert_eq!(framing.skippable(S), usize::MAX);
    }

    /// The key comes in the startup, split anywhere; a startup-only framing stops at the first
    /// ReadyForQuery, having kept it.
    #[test]
    fn the_backend_key_is_kept() {
        let key = BackendKey {
            process_id: 7,
            secret_key: 0x0102_0304,
        };
        let whole: usize = welcome().len();
        for at in 0..=whole {
            for startup_only in [false, true] {
                let mut framing = if startup_only {
                    Framing::startup_only()
                } else {
                    Framing::new()
                };
                framing.observe(C, &startup());
                let welcome = welcome();
                framing.observe(S, &welcome[..at]);
                framing.observe(S, &welcome[at..]);
                assert_eq!(framing.backend_key(), Some(key), "split at {at}");
                assert_eq!(framing.tracked(), !startup_only, "split at {at}");
                assert_eq!(framing.skippable(S) == usize::MAX, startup_only);
            }
        }
        let mut tls = Framing::startup_only();
        tls.observe(C, &packet(SSL_REQUEST, b""));
        tls.observe(S, b"S");
        tls.observe(S, &welcome());
        assert_eq!(tls.backend_key(), None, "inside TLS nothing is seen");
        let mut longer = Framing::new();
        longer.observe(C, &startup());
        longer.observe(S, &msg(b'K', &[0, 0, 0, 7, 1, 2, 3, 4, 5, 6, 7, 8]));
        longer.observe(S, &ready(b'I'));
        assert_eq!(longer.backend_key(), None, "a 3.2 key is not kept");
        assert!(longer.idle(), "but followed past");
    }

    #[test]
    fn the_encryption_answer_must_be_seen() {
        let mut framing = Framing::new();
        framing.observe(C, &packet(SSL_REQUEST, b""));
        assert_eq!(framing.skippable(S), 0);
    }
}
