//! A reference reader for [`crate::framing`], and the check that compares the two: written
//! the plain way (whole messages out of a buffer), so a mistake in the incremental reader's
//! bookkeeping across read boundaries shows up as a disagreement.
//!
//! Built for the tests and the `framing` fuzz target only.

use crate::framing::{Framing, Side};
use crate::pgwire::{message, packet};

/// Message types a client sends once started; a server sends. Written out again here rather
/// than shared, so a wrong list in one is not a wrong list in both.
const CLIENT_TYPES: &[u8] = b"BCdcDEHFfpPQSX";
const SERVER_TYPES: &[u8] = b"RKSZTDCENAGHWdc123nstIVv";
const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;
const CANCEL_REQUEST: u32 = 80_877_102;
const MAX_MESSAGE: u32 = 1 << 30;

/// One direction's bytes not yet read as a whole message.
#[derive(Default)]
struct Buffer {
    bytes: Vec<u8>,
}

impl Buffer {
    fn u32_at(&self, at: usize) -> Option<u32> {
        let b = self.bytes.get(at..at + 4)?;
        Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
}

/// Follows both directions by reading whole messages only once every byte of them is there.
pub struct Reference {
    client: Buffer,
    server: Buffer,
    client_startup: bool,
    answer_pending: bool,
    on: bool,
    status: Option<u8>,
    unanswered: u32,
    open_batch: bool,
    key: Option<(u32, u32)>,
}

impl Default for Reference {
    fn default() -> Self {
        Reference {
            client: Buffer::default(),
            server: Buffer::default(),
            client_startup: true,
            answer_pending: false,
            on: true,
            status: None,
            unanswered: 0,
            open_batch: false,
            key: None,
        }
    }
}

impl Reference {
    /// Appends bytes that arrived on `side` and reads every message now complete.
    pub fn push(&mut self, side: Side, bytes: &[u8]) {
        match side {
            Side::Client => self.client.bytes.extend_from_slice(bytes),
            Side::Server => self.server.bytes.extend_from_slice(bytes),
        }
        while self.on && self.read_one(side) {}
    }

    /// Reads one whole unit from `side`'s buffer; false if none is complete yet.
    fn read_one(&mut self, side: Side) -> bool {
        if side == Side::Server && self.answer_pending {
            let Some(&answer) = self.server.bytes.first() else {
                return false;
            };
            self.server.bytes.remove(0);
            self.answer_pending = false;
            self.on = answer == b'N';
            return true;
        }
        if side == Side::Client && self.client_startup {
            return self.read_startup_packet();
        }
        let buffer = match side {
            Side::Client => &self.client,
            Side::Server => &self.server,
        };
        let (Some(&kind), Some(len)) = (buffer.bytes.first(), buffer.u32_at(1)) else {
            return false;
        };
        let types = match side {
            Side::Client => CLIENT_TYPES,
            Side::Server => SERVER_TYPES,
        };
        if !types.contains(&kind) || !(4..=MAX_MESSAGE).contains(&len) {
            self.on = false;
            return false;
        }
        if side == Side::Server && kind == b'Z' && len != 5 {
            self.on = false;
            return false;
        }
        let whole = 1 + len as usize;
        if buffer.bytes.len() < whole {
            return false;
        }
        let message: Vec<u8> = match side {
            Side::Client => self.client.bytes.drain(..whole).collect(),
            Side::Server => self.server.bytes.drain(..whole).collect(),
        };
        let body = &message[5..];
        match (side, kind) {
            (Side::Server, b'Z') => {
                if !matches!(body[0], b'I' | b'T' | b'E') {
                    self.on = false;
                    return false;
                }
                self.status = Some(body[0]);
                self.unanswered = self.unanswered.saturating_sub(1);
            }
            (Side::Server, b'K') if body.len() == 8 => {
                let word = |at: usize| {
                    u32::from_be_bytes([body[at], body[at + 1], body[at + 2], body[at + 3]])
                };
                self.key = Some((word(0), word(4)));
            }
            (Side::Client, b'Q' | b'F') => self.unanswered += 1,
            (Side::Client, b'S') => {
                self.unanswered += 1;
                self.open_batch = false;
            }
            (Side::Client, b'P' | b'B' | b'E' | b'D' | b'C' | b'H') => self.open_batch = true,
            _ => {}
        }
        true
    }

    fn read_startup_packet(&mut self) -> bool {
        let (Some(len), Some(code)) = (self.client.u32_at(0), self.client.u32_at(4)) else {
            return false;
        };
        if !(8..=crate::pgwire::MAX_STARTUP_LEN as u32).contains(&len) {
            self.on = false;
            return false;
        }
        match code {
            // Bytes the server sent out of turn that are not a whole message yet leave no
            // byte that could be told for the answer.
            SSL_REQUEST | GSSENC_REQUEST if len == 8 && !self.server.bytes.is_empty() => {
                self.on = false;
                false
            }
            SSL_REQUEST | GSSENC_REQUEST if len == 8 => {
                self.client.bytes.drain(..8);
                self.answer_pending = true;
                true
            }
            _ if code >> 16 == 3 && code != CANCEL_REQUEST => {
                if self.client.bytes.len() < len as usize {
                    return false;
                }
                self.client.bytes.drain(..len as usize);
                self.client_startup = false;
                true
            }
            _ => {
                self.on = false;
                false
            }
        }
    }

    /// Both directions end exactly where a message ends.
    pub fn at_boundaries(&self) -> bool {
        self.client.bytes.is_empty() && self.server.bytes.is_empty() && !self.answer_pending
    }

    /// Between transactions, by the reference's reading.
    pub fn idle(&self) -> bool {
        self.on
            && !self.client_startup
            && self.at_boundaries()
            && self.status == Some(b'I')
            && self.unanswered == 0
            && !self.open_batch
    }
}

/// What the byte program of [`events`] can send, by side.
fn client_event(op: u8, arg: &mut impl Iterator<Item = u8>) -> Vec<u8> {
    let mut body = |max: u8| -> Vec<u8> {
        let n = arg.next().unwrap_or(0) % max.max(1);
        arg.by_ref().take(n as usize).collect()
    };
    match op % 16 {
        0 => packet(3 << 16, b"user\0app\0database\0app\0\0"),
        1 => packet(SSL_REQUEST, b""),
        2 => packet(GSSENC_REQUEST, b""),
        3 => packet(CANCEL_REQUEST, &[0, 0, 0, 7, 1, 2, 3, 4]),
        4 => message(b'Q', b"SELECT 1\0"),
        5 => message(b'P', b"\0SELECT 1\0\0\0"),
        6 => message(b'B', &[0, 0, 0, 0, 0, 0, 0, 0]),
        7 => message(b'E', &[0, 0, 0, 0, 0]),
        8 => message(b'S', b""),
        9 => message(b'X', b""),
        10 => message(b'd', &body(64)),
        11 => body(32),
        12 => {
            let kind = body(2).first().copied().unwrap_or(b'Q');
            message(kind, &body(64))
        }
        13 => message(b'F', &[0, 0, 0, 1, 0, 0, 0, 0, 0, 0]),
        14 => message(b'H', b""),
        _ => {
            // A header whose length says anything at all.
            let len: Vec<u8> = (0..4).map(|_| arg.next().unwrap_or(0)).collect();
            [&[b'Q'][..], &len].concat()
        }
    }
}

fn server_event(op: u8, arg: &mut impl Iterator<Item = u8>) -> Vec<u8> {
    let mut body = |max: u8| -> Vec<u8> {
        let n = arg.next().unwrap_or(0) % max.max(1);
        arg.by_ref().take(n as usize).collect()
    };
    match op % 16 {
        0 => b"N".to_vec(),
        1 => b"S".to_vec(),
        2 => message(b'R', &0u32.to_be_bytes()),
        3 => message(b'S', b"server_version\x0015.4\0"),
        4 => message(b'K', &[0, 0, 0, 7, 1, 2, 3, 4]),
        5 => message(b'Z', b"I"),
        6 => message(b'Z', b"T"),
        7 => message(b'Z', b"E"),
        8 => message(
            b'T',
            b"\0\x01a\0\0\0\0\0\0\0\0\0\0\x17\0\x04\xff\xff\xff\xff\0\0",
        ),
        9 => message(b'D', b"\0\x01\0\0\0\x011"),
        10 => message(b'C', b"SELECT 1\0"),
        11 => body(32),
        12 => {
            let kind = body(2).first().copied().unwrap_or(b'D');
            message(kind, &body(64))
        }
        13 => message(b'E', b"SFATAL\0C57P01\0Mbye\0\0"),
        14 => message(b'K', &[0, 0, 0, 7, 1, 2, 3, 4, 5, 6, 7, 8]),
        _ => message(b'Z', &body(3)),
    }
}

/// A session's bytes, in the order they arrive, read from a byte program: each op byte picks a
/// side (high bit: server) and a message, well formed or not, or raw bytes; the bytes after
/// some ops are their arguments.
pub fn events(program: &[u8]) -> Vec<(Side, Vec<u8>)> {
    let mut bytes = program.iter().copied();
    let mut out = Vec::new();
    while let Some(op) = bytes.next() {
        if op & 0x80 == 0 {
            out.push((Side::Client, client_event(op, &mut bytes)));
        } else {
            out.push((Side::Server, server_event(op & 0x7f, &mut bytes)));
        }
    }
    out
}

/// The state of a [`Framing`] a caller can see.
fn seen(framing: &Framing) -> String {
    format!(
        "tracked {} idle {} status {:?} key {:?} skippable {}/{}",
        framing.tracked(),
        framing.idle(),
        framing.status(),
        framing.backend_key(),
        framing.skippable(Side::Client),
        framing.skippable(Side::Server),
    )
}

/// Feeds `events` to a [`Framing`] whole, and again cut into pieces by `cuts` (each cut byte:
/// a piece's length, and whether to pass it unseen as far as `skippable` allows), checking
/// against [`Reference`] after every piece. Ok: after how many pieces the session was idle
/// (so a caller can tell its inputs reach the interesting states). Err names the first
/// disagreement.
pub fn check(events: &[(Side, Vec<u8>)], cuts: &[u8]) -> Result<usize, String> {
    let mut idle_seen = 0;
    let mut whole = Framing::new();
    let mut pieces = Framing::new();
    let mut reference = Reference::default();
    let mut cuts = cuts.iter().copied().cycle();
    let has_cuts = cuts.clone().next().is_some();
    for (i, (side, bytes)) in events.iter().enumerate() {
        whole.observe(*side, bytes);
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            let cut = if has_cuts {
                cuts.next().unwrap_or(0)
            } else {
                0
            };
            let len = if has_cuts {
                (1 + (cut & 0x7f) as usize).min(rest.len())
            } else {
                rest.len()
            };
            let (piece, after) = rest.split_at(len);
            let skip = if cut & 0x80 != 0 {
                pieces.skippable(*side).min(piece.len())
            } else {
                0
            };
            pieces.skipped(*side, skip);
            pieces.observe(*side, &piece[skip..]);
            reference.push(*side, piece);
            rest = after;
            idle_seen += usize::from(pieces.idle());
            if pieces.idle() && !reference.idle() {
                return Err(format!(
                    "event {i}: idle claimed where the reference is not between transactions \
                     (at boundaries: {}, {})",
                    reference.at_boundaries(),
                    seen(&pieces)
                ));
            }
            if reference.at_boundaries() && pieces.tracked() != reference.on {
                return Err(format!(
                    "event {i}: followed {} where the reference says {}",
                    pieces.tracked(),
                    reference.on
                ));
            }
            let agree = pieces.idle() == reference.idle()
                && pieces.status() == reference.status
                && pieces.backend_key().map(|k| (k.process_id, k.secret_key)) == reference.key;
            if reference.at_boundaries() && reference.on && !agree {
                return Err(format!(
                    "event {i}: {} but the reference has idle {}, status {:?}, key {:?}",
                    seen(&pieces),
                    reference.idle(),
                    reference.status,
                    reference.key
                ));
            }
        }
        if seen(&whole) != seen(&pieces) {
            return Err(format!(
                "event {i}: whole {} but in pieces {}",
                seen(&whole),
                seen(&pieces)
            ));
        }
    }
    Ok(idle_seen)
}

/// The framing against the reference, on generated sessions.
#[cfg(test)]
mod tests {
    use super::*;
    use proptest::collection::vec;
    use proptest::prelude::*;
    use proptest::test_runner::{TestCaseError, TestRunner};

    /// A session's byte program (see `framing_model::events`): mostly well-formed messages in a
    /// plausible order, started or not, with some ops that may be anything.
    fn framing_program() -> impl Strategy<Value = Vec<u8>> {
        // Client ops (high bit clear) and server ops (high bit set) that frame as Postgres.
        let well_formed = prop_oneof![
            Just(4u8),
            Just(5),
            Just(6),
            Just(7),
            Just(8),
            Just(13),
            Just(14),
            (2u8..11).prop_map(|op| op | 0x80),
            Just(13 | 0x80),
            Just(14 | 0x80),
            Just(5 | 0x80),
        ];
        let op = prop_oneof![8 => well_formed, 1 => any::<u8>()];
        let opening = prop_oneof![
            Just(vec![0u8, 0x82, 0x83, 0x84, 0x85]),
            Just(vec![1u8, 0x80, 0, 0x82, 0x84, 0x85]),
            Just(vec![1u8, 0x81]),
            Just(vec![]),
        ];
        (opening, vec(op, 0..40)).prop_map(|(mut program, rest)| {
            program.extend(rest);
            program
        })
    }

    /// The framing never panics, never says "between transactions" inside a message or where the
    /// reference reader disagrees, and gives the same answer however the bytes are split and
    /// whichever body bytes pass unseen; enough cases reach idle for that to mean something.
    #[test]
    fn framing_agrees_with_the_reference_for_every_split() {
        // `PROPTEST_CASES=N` searches longer.
        let cases = std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(1024);
        let mut runner = TestRunner::new(ProptestConfig::with_cases(cases));
        let idle_cases = std::cell::Cell::new(0u32);
        let cases = std::cell::Cell::new(0u32);
        runner
            .run(
                &(
                    prop_oneof![4 => framing_program(), 1 => vec(any::<u8>(), 0..200)],
                    vec(any::<u8>(), 0..64),
                ),
                |(program, cuts)| {
                    let events = events(&program);
                    let idle = check(&events, &cuts).map_err(TestCaseError::fail)?;
                    cases.set(cases.get() + 1);
                    idle_cases.set(idle_cases.get() + u32::from(idle > 0));
                    Ok(())
                },
            )
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            idle_cases.get() * 10 >= cases.get(),
            "only {} of {} sessions ever reached idle: the inputs miss the interesting states",
            idle_cases.get(),
            cases.get()
        );
    }
}
