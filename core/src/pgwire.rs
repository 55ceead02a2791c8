//! The few Postgres wire messages the proxy answers itself, when it cannot hand a client to a
//! leader: decline SSL/GSS encryption with `N`, read the StartupMessage, send a FATAL
//! ErrorResponse. A client library then shows a real error instead of "connection reset".
//!
//! It also reads a client's first packet, which must arrive before a backend is connected;
//! those bytes are forwarded exactly as read. Everything else passes through untouched.

use crate::printable;
use crate::route::Liveness;

/// Postgres itself refuses startup packets larger than this.
pub const MAX_STARTUP_LEN: usize = 10_000;
/// The codes a first packet starts with, after its length.
pub const SSL_REQUEST: u32 = 80_877_103;
pub const GSSENC_REQUEST: u32 = 80_877_104;
const CANCEL_REQUEST: u32 = 80_877_102;
/// Protocol 3.0, the major version in the high 16 bits.
pub const PROTOCOL_3: u32 = 3 << 16;

/// SQLSTATE `cannot_connect_now`: no leader to send the client to.
pub const CANNOT_CONNECT_NOW: &str = "57P03";
/// SQLSTATE `too_many_connections`.
pub const TOO_MANY_CONNECTIONS: &str = "53300";
/// SQLSTATE `admin_shutdown`: how Postgres ends a terminated backend's session.
pub const ADMIN_SHUTDOWN: &str = "57P01";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PgWireError {
    #[error("startup packet length {0} out of range")]
    BadLength(u32),
    #[error("unsupported protocol version {major}.{minor}")]
    UnsupportedProtocol { major: u16, minor: u16 },
    #[error("malformed startup packet")]
    Malformed,
    #[error("connection closed during startup")]
    Closed,
    #[error("timed out during startup")]
    Timeout,
    #[error("too many encryption requests")]
    TooManyRequests,
}

/// One packet a client may send before the proxy answers anything.
#[derive(Debug, PartialEq, Eq)]
pub enum StartupPacket {
    SslRequest,
    GssEncRequest,
    Cancel { process_id: u32, secret_key: u32 },
    Startup { params: Vec<(String, String)> },
}

impl StartupPacket {
    /// For the log: what the client asked for, its user, database and application name made
    /// printable (a client chooses them, control characters and all); other parameters are
    /// left out.
    pub fn describe(&self) -> String {
        match self {
            StartupPacket::SslRequest => "SSLRequest".to_owned(),
            StartupPacket::GssEncRequest => "GSSENCRequest".to_owned(),
            StartupPacket::Cancel { process_id, .. } => format!("CancelRequest pid={process_id}"),
            StartupPacket::Startup { params } => {
                let mut text = "StartupMessage".to_owned();
                for name in ["user", "database", "application_name"] {
                    if let Some(value) = param(params, name) {
                        text.push_str(&format!(" {name}=\"{}\"", printable(value)));
                    }
                }
                text
            }
        }
    }
}

/// Validates the 4-byte length prefix (it counts itself).
pub fn check_length(len: u32) -> Result<usize, PgWireError> {
    let len = len as usize;
    if (8..=MAX_STARTUP_LEN).contains(&len) {
        Ok(len - 4)
    } else {
        Err(PgWireError::BadLength(len as u32))
    }
}

/// Parses a startup-phase packet body (everything after the length). Pure.
pub fn parse_startup(body: &[u8]) -> Result<StartupPacket, PgWireError> {
    let code = u32_at(body, 0).ok_or(PgWireError::Malformed)?;
    match code {
        SSL_REQUEST if body.len() == 4 => Ok(StartupPacket::SslRequest),
        GSSENC_REQUEST if body.len() == 4 => Ok(StartupPacket::GssEncRequest),
        CANCEL_REQUEST if body.len() == 12 => Ok(StartupPacket::Cancel {
            process_id: u32_at(body, 4).ok_or(PgWireError::Malformed)?,
            secret_key: u32_at(body, 8).ok_or(PgWireError::Malformed)?,
        }),
        SSL_REQUEST | GSSENC_REQUEST | CANCEL_REQUEST => Err(PgWireError::Malformed),
        _ if code & 0xffff_0000 == PROTOCOL_3 => Ok(StartupPacket::Startup {
            params: parse_params(&body[4..])?,
        }),
        _ => Err(PgWireError::UnsupportedProtocol {
            major: (code >> 16) as u16,
            minor: (code & 0xffff) as u16,
        }),
    }
}

fn u32_at(body: &[u8], at: usize) -> Option<u32> {
    let bytes: [u8; 4] = body.get(at..at + 4)?.try_into().ok()?;
    Some(u32::from_be_bytes(bytes))
}

/// `name\0value\0 ... \0`
fn parse_params(mut rest: &[u8]) -> Result<Vec<(String, String)>, PgWireError> {
    let mut params = Vec::new();
    loop {
        let (name, after) = cstr(rest)?;
        if name.is_empty() {
            return if after.is_empty() {
                Ok(params)
            } else {
                Err(PgWireError::Malformed)
            };
        }
        let (value, after) = cstr(after)?;
        params.push((name, value));
        rest = after;
    }
}

fn cstr(bytes: &[u8]) -> Result<(String, &[u8]), PgWireError> {
    let end = bytes
        .iter()
        .position(|&b| b == 0)
        .ok_or(PgWireError::Malformed)?;
    let text = String::from_utf8_lossy(&bytes[..end]).into_owned();
    Ok((text, &bytes[end + 1..]))
}

/// A FATAL ErrorResponse ('E') with severity, SQLSTATE and message.
pub fn error_response(code: &str, text: &str) -> Vec<u8> {
    let mut fields = Vec::with_capacity(text.len() + 32);
    for (tag, value) in [(b'S', "FATAL"), (b'V', "FATAL"), (b'C', code), (b'M', text)] {
        fields.push(tag);
        // A NUL inside a field would end it early; the client must see the whole message.
        fields.extend(value.bytes().filter(|&b| b != 0));
        fields.push(0);
    }
    fields.push(0);
    message(b'E', &fields)
}

/// A message as either side sends it once started: its type, its length, its body.
pub fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(tag);
    out.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// A packet a client sends before it is started: its length, its code, the rest.
pub fn packet(code: u32, rest: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(rest.len() + 8);
    out.extend_from_slice(&((rest.len() + 8) as u32).to_be_bytes());
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(rest);
    out
}

/// How many bytes make up a client's first packet, judged by its 4-byte length prefix: the
/// whole packet when the length is one Postgres accepts, else just the prefix (whatever the
/// client is, its server answers it, not the proxy).
pub fn first_packet_len(prefix: [u8; 4]) -> usize {
    check_length(u32::from_be_bytes(prefix)).map_or(4, |body| body + 4)
}

/// Whether a client's first packet (with its length) is a CancelRequest: also one with a
/// protocol 3.2 key, longer than the 4 bytes [`parse_startup`] reads.
pub fn is_cancel_request(packet: &[u8]) -> bool {
    packet.len() >= 16 && u32_at(packet, 4) == Some(CANCEL_REQUEST)
}

/// The startup parameter `name`, if present.
fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// The user and database a liveness probe names. It needs no such role: any answer but 57P03
/// means the postmaster is up.
pub const PROBE_USER: &str = "roleproxy_probe";

/// A first server message larger than this is not one a postmaster sends before
/// authentication.
const MAX_FIRST_MESSAGE: usize = 8192;

/// Terminate (`X`), sent before closing so the server logs no "unexpected EOF".
pub const TERMINATE: [u8; 5] = [b'X', 0, 0, 0, 4];

/// The StartupMessage a liveness probe sends: protocol 3.0, no credentials.
pub fn probe_startup() -> Vec<u8> {
    let mut params = Vec::new();
    for (name, value) in [
        ("user", PROBE_USER),
        ("database", PROBE_USER),
        ("application_name", "roleproxy-probe"),
    ] {
        params.extend_from_slice(name.as_bytes());
        params.push(0);
        params.extend_from_slice(value.as_bytes());
        params.push(0);
    }
    params.push(0);
    packet(PROTOCOL_3, &params)
}

/// Reads the server's first message from the bytes received so far. Pure.
///
/// `None`: more bytes are needed. An authentication request (`R`), a protocol negotiation
/// (`v`) or an ErrorResponse with any SQLSTATE but 57P03 is [`Liveness::Alive`]; 57P03 is
/// [`Liveness::Refusing`]; anything else, or an error without a SQLSTATE (as `PQping`
/// treats it), is [`Liveness::Gone`]. An error is described by its SQLSTATE in our words
/// ([`server_error`]), never by the server's message: any node DNS names can send one, and it
/// goes to the log and `/status`.
pub fn read_liveness(received: &[u8]) -> Option<Liveness> {
    let tag = *received.first()?;
    if !matches!(tag, b'R' | b'v' | b'E') {
        return Some(Liveness::Gone(format!(
            "not a Postgres answer (first byte 0x{tag:02x})"
        )));
    }
    let len = u32_at(received, 1)? as usize;
    if !(4..=MAX_FIRST_MESSAGE).contains(&len) {
        return Some(Liveness::Gone(format!(
            "not a Postgres answer (message length {len})"
        )));
    }
    match tag {
        b'R' => return Some(Liveness::Alive("asks for authentication".into())),
        b'v' => return Some(Liveness::Alive("negotiates the protocol version".into())),
        _ => {}
    }
    let body = received.get(5..1 + len)?;
    let mut code = None;
    let mut rest = body;
    while let Some((&field, after)) = rest.split_first() {
        if field == 0 {
            break;
        }
        let Ok((value, after)) = cstr(after) else {
            return Some(Liveness::Gone("malformed ErrorResponse".into()));
        };
        if field == b'C' {
            code = Some(value);
        }
        rest = after;
    }
    Some(match code.filter(|code| is_sqlstate(code)) {
        Some(code) if code == CANNOT_CONNECT_NOW => Liveness::Refusing(server_error(&code)),
        Some(code) => Liveness::Alive(server_error(&code)),
        None => Liveness::Gone("ErrorResponse without a SQLSTATE".into()),
    })
}

/// Five digits or upper-case letters, as every SQLSTATE is.
fn is_sqlstate(code: &str) -> bool {
    code.len() == 5
        && code
            .bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_uppercase())
}

/// A server's error as the proxy tells it: its SQLSTATE and a short reason of ours,
/// `57P03 (cannot connect now)`. The server's own message is left out: it may come from any
/// node DNS names, and may carry anything, a forged log line or a terminal's escape codes. A
/// code that is no SQLSTATE (five digits or upper-case letters) is not repeated either.
pub fn server_error(code: &str) -> String {
    if is_sqlstate(code) {
        format!("{code} ({})", sqlstate_reason(code))
    } else {
        "an error without a SQLSTATE".to_owned()
    }
}

/// What a SQLSTATE means, in a few words: the codes a postmaster answers a startup with by
/// name, the others by their class.
pub fn sqlstate_reason(code: &str) -> &'static str {
    match code {
        CANNOT_CONNECT_NOW => "cannot connect now",
        TOO_MANY_CONNECTIONS => "too many connections",
        ADMIN_SHUTDOWN => "terminated by an administrator",
        "57P02" => "crash shutdown",
        "28000" => "login refused",
        "28P01" => "password refused",
        "3D000" => "no such database",
        "0A000" => "feature not supported",
        _ => match code.get(..2) {
            Some("08") => "connection exception",
            Some("28") => "authorization failed",
            Some("53") => "out of resources",
            Some("57") => "operator intervention",
            Some("58") => "system error",
            Some("XX") => "internal error",
            _ => "server error",
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A startup packet's body: what follows its length.
    fn body(code: u32, rest: &[u8]) -> Vec<u8> {
        packet(code, rest)[4..].to_vec()
    }

    fn error(code: &str, text: &str) -> Vec<u8> {
        let mut fields = Vec::new();
        for (tag, value) in [(b'S', "FATAL"), (b'C', code), (b'M', text)] {
            fields.push(tag);
            fields.extend_from_slice(value.as_bytes());
            fields.push(0);
        }
        fields.push(0);
        message(b'E', &fields)
    }

    #[test]
    fn first_answers_read_as_liveness() {
        use Liveness::*;
        let alive = |d: &str| Some(Alive(d.to_string()));
        let rows: Vec<(&str, Vec<u8>, Option<Liveness>)> = vec![
            ("nothing yet", vec![], None),
            (
                "md5 request",
                message(b'R', &[0, 0, 0, 5, 1, 2, 3, 4]),
                alive("asks for authentication"),
            ),
            (
                "trust: AuthenticationOk",
                message(b'R', &[0, 0, 0, 0]),
                alive("asks for authentication"),
            ),
            (
                "SASL, only the header so far",
                message(b'R', b"\0\0\0\x0aSCRAM-SHA-256\0\0")[..5].to_vec(),
                alive("asks for authentication"),
            ),
            (
                "protocol negotiation",
                message(b'v', &[0, 0, 0, 0, 0, 0, 0, 0]),
                alive("negotiates the protocol version"),
            ),
            (
                "full",
                error("53300", "sorry, too many clients already"),
                alive("53300 (too many connections)"),
            ),
            (
                "no such role",
                error("28000", "role \"roleproxy_probe\" does not exist"),
                alive("28000 (login refused)"),
            ),
            (
                "bad password",
                error("28P01", "password authentication failed"),
                alive("28P01 (password refused)"),
            ),
            (
                "no such database",
                error("3D000", "database does not exist"),
                alive("3D000 (no such database)"),
            ),
            (
                "starting up",
                error("57P03", "the database system is starting up"),
                Some(Refusing("57P03 (cannot connect now)".into())),
            ),
            (
                "shutting down",
                error("57P03", "the database system is shutting down"),
                Some(Refusing("57P03 (cannot connect now)".into())),
            ),
            ("half an error", error("53300", "sorry")[..9].to_vec(), None),
            (
                "the server's words stay out",
                error("XX000", "line one\n2024-01-01 ERROR forged\x1b[2J"),
                alive("XX000 (internal error)"),
            ),
            (
                "a SQLSTATE that is none",
                error("5\x1b[2J", "x"),
                Some(Gone("ErrorResponse without a SQLSTATE".into())),
            ),
            ("length only partly read", vec![b'E', 0, 0], None),
            (
                "error without SQLSTATE",
                message(b'E', b"Mhello\0\0"),
                Some(Gone("ErrorResponse without a SQLSTATE".into())),
            ),
            (
                "unterminated field",
                message(b'E', b"C53300"),
                Some(Gone("malformed ErrorResponse".into())),
            ),
            (
                "HTTP",
                b"HTTP/1.1 400 Bad Request\r\n".to_vec(),
                Some(Gone("not a Postgres answer (first byte 0x48)".into())),
            ),
            (
                "SSL answer is not a first message",
                b"N".to_vec(),
                Some(Gone("not a Postgres answer (first byte 0x4e)".into())),
            ),
            (
                "huge length",
                vec![b'E', 0x7f, 0, 0, 0],
                Some(Gone(format!(
                    "not a Postgres answer (message length {})",
                    0x7f00_0000u32
                ))),
            ),
            (
                "length below its own size",
                vec![b'R', 0, 0, 0, 3],
                Some(Gone("not a Postgres answer (message length 3)".into())),
            ),
        ];
        for (what, bytes, expected) in rows {
            assert_eq!(read_liveness(&bytes), expected, "{what}");
        }
    }

    /// A probe reads until the whole first message is in: any part of an ErrorResponse
    /// short of its last byte is no answer yet, whichever error it will turn out to be.
    #[test]
    fn an_error_response_is_read_only_once_whole() {
        let whole = error("57P03", "the database system is starting up");
        for cut in 5..whole.len() {
            assert_eq!(
                read_liveness(&whole[..cut]),
                None,
                "{cut} of {}",
                whole.len()
            );
        }
        assert_eq!(
            read_liveness(&whole),
            Some(Liveness::Refusing("57P03 (cannot connect now)".into()))
        );
    }

    /// A check ends its connection with a Terminate, as a client would, so Postgres logs no
    /// "unexpected EOF" for every check.
    #[test]
    fn terminate_is_the_terminate_message() {
        assert_eq!(&TERMINATE, b"X\0\0\0\x04");
    }

    #[test]
    fn server_errors_are_named_by_their_class_in_our_words() {
        // Every code with words of its own, then every class, then the rest.
        let rows = [
            ("57P03", "57P03 (cannot connect now)"),
            ("53300", "53300 (too many connections)"),
            ("57P01", "57P01 (terminated by an administrator)"),
            ("57P02", "57P02 (crash shutdown)"),
            ("28000", "28000 (login refused)"),
            ("28P01", "28P01 (password refused)"),
            ("3D000", "3D000 (no such database)"),
            ("0A000", "0A000 (feature not supported)"),
            ("08006", "08006 (connection exception)"),
            ("28001", "28001 (authorization failed)"),
            ("53400", "53400 (out of resources)"),
            ("57014", "57014 (operator intervention)"),
            ("58030", "58030 (system error)"),
            ("XX001", "XX001 (internal error)"),
            ("22012", "22012 (server error)"),
        ];
        for (code, words) in rows {
            assert_eq!(server_error(code), words);
        }
        assert_eq!(server_error("5\u{1b}[2J"), "an error without a SQLSTATE");
        assert_eq!(server_error(""), "an error without a SQLSTATE");
    }

    #[test]
    fn a_startup_is_described_printably() {
        let startup = StartupPacket::Startup {
            params: vec![
                ("user".into(), "app\n2024-01-01 ERROR forged".into()),
                ("options".into(), "-c secret".into()),
                ("application_name".into(), "\u{1b}]0;title\u{7}".into()),
            ],
        };
        assert_eq!(
            startup.describe(),
            "StartupMessage user=\"app\\u{a}2024-01-01 ERROR forged\" application_name=\"\\u{1b}]0;title\\u{7}\""
        );
    }

    #[test]
    fn the_probe_startup_names_the_probe_user_and_no_password() {
        let bytes = probe_startup();
        let len = u32::from_be_bytes(bytes[..4].try_into().unwrap()) as usize;
        assert_eq!(len, bytes.len());
        match parse_startup(&bytes[4..]) {
            Ok(StartupPacket::Startup { params }) => {
                assert_eq!(param(&params, "user"), Some(PROBE_USER));
                assert_eq!(param(&params, "application_name"), Some("roleproxy-probe"));
                assert_eq!(param(&params, "password"), None);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn startup_packets() {
        let rows: Vec<(&str, Vec<u8>, Result<StartupPacket, PgWireError>)> = vec![
            ("ssl", body(SSL_REQUEST, b""), Ok(StartupPacket::SslRequest)),
            (
                "gss",
                body(GSSENC_REQUEST, b""),
                Ok(StartupPacket::GssEncRequest),
            ),
            (
                "cancel",
                body(CANCEL_REQUEST, &[0, 0, 0, 7, 0, 0, 0, 9]),
                Ok(StartupPacket::Cancel {
                    process_id: 7,
                    secret_key: 9,
                }),
            ),
            (
                "startup",
                body(PROTOCOL_3, b"user\0app\0database\0db\0\0"),
                Ok(StartupPacket::Startup {
                    params: vec![
                        ("user".into(), "app".into()),
                        ("database".into(), "db".into()),
                    ],
                }),
            ),
            (
                "startup 3.2",
                body(PROTOCOL_3 | 2, b"\0"),
                Ok(StartupPacket::Startup { params: vec![] }),
            ),
            (
                "ssl with extra bytes",
                body(SSL_REQUEST, b"x"),
                Err(PgWireError::Malformed),
            ),
            (
                "gssenc with extra bytes",
                body(GSSENC_REQUEST, b"x"),
                Err(PgWireError::Malformed),
            ),
            (
                "cancel too short",
                body(CANCEL_REQUEST, &[0, 0]),
                Err(PgWireError::Malformed),
            ),
            (
                "cancel too long",
                body(CANCEL_REQUEST, &[0, 0, 0, 7, 0, 0, 0, 9, 0]),
                Err(PgWireError::Malformed),
            ),
            (
                "params unterminated",
                body(PROTOCOL_3, b"user\0app"),
                Err(PgWireError::Malformed),
            ),
            (
                "params missing final nul",
                body(PROTOCOL_3, b"user\0app\0"),
                Err(PgWireError::Malformed),
            ),
            (
                "bytes after final nul",
                body(PROTOCOL_3, b"\0junk"),
                Err(PgWireError::Malformed),
            ),
            (
                "protocol 2",
                body(2 << 16, b""),
                Err(PgWireError::UnsupportedProtocol { major: 2, minor: 0 }),
            ),
            (
                "too short for a code",
                vec![1, 2],
                Err(PgWireError::Malformed),
            ),
        ];
        for (what, body, expected) in rows {
            assert_eq!(parse_startup(&body), expected, "{what}");
        }
    }

    #[test]
    fn lengths() {
        assert_eq!(check_length(8), Ok(4));
        assert_eq!(check_length(10_000), Ok(9_996));
        assert_eq!(check_length(7), Err(PgWireError::BadLength(7)));
        assert_eq!(check_length(10_001), Err(PgWireError::BadLength(10_001)));
        assert_eq!(
            check_length(u32::MAX),
            Err(PgWireError::BadLength(u32::MAX))
        );
    }

    #[test]
    fn error_response_layout() {
        let msg = error_response("57P03", "no leader");
        let mut expected = vec![b'E'];
        let fields = b"SFATAL\0VFATAL\0C57P03\0Mno leader\0\0";
        expected.extend_from_slice(&((fields.len() + 4) as u32).to_be_bytes());
        expected.extend_from_slice(fields);
        assert_eq!(msg, expected);
        // A NUL in the message must not truncate the frame.
        assert_eq!(
            error_response("57P03", "a\0b"),
            error_response("57P03", "ab")
        );
    }

    #[test]
    fn first_packet_lengths() {
        let rows: [(&str, u32, usize); 5] = [
            ("SSLRequest", 8, 8),
            ("CancelRequest", 16, 16),
            ("the largest StartupMessage", 10_000, 10_000),
            ("too short for a packet", 7, 4),
            ("not Postgres (a TLS ClientHello, say)", 0x1603_0100, 4),
        ];
        for (what, len, expected) in rows {
            assert_eq!(first_packet_len(len.to_be_bytes()), expected, "{what}");
        }
    }

    /// A CancelRequest is passed on at once, never held for a leader: it must be told from
    /// every other first packet, whole packets with their length as the proxy reads them.
    #[test]
    fn cancel_requests_are_told_from_other_first_packets() {
        let whole = |code: u32, rest: &[u8]| {
            let body = body(code, rest);
            let mut out = ((body.len() + 4) as u32).to_be_bytes().to_vec();
            out.extend_from_slice(&body);
            out
        };
        let key = [7u8; 8];
        let rows = [
            ("a CancelRequest", whole(CANCEL_REQUEST, &key), true),
            (
                "a CancelRequest with a protocol 3.2 key (longer)",
                whole(CANCEL_REQUEST, &[7u8; 36]),
                true,
            ),
            (
                "the cancel code in a packet too short to carry a key",
                whole(CANCEL_REQUEST, &[]),
                false,
            ),
            ("an SSLRequest", whole(SSL_REQUEST, &[]), false),
            ("a GSSENCRequest", whole(GSSENC_REQUEST, &[]), false),
            (
                "a StartupMessage",
                whole(PROTOCOL_3, b"user\0app\0database\0app\0\0"),
                false,
            ),
            (
                "a StartupMessage whose parameters hold the cancel code",
                whole(PROTOCOL_3, &body(CANCEL_REQUEST, b"\0\0\0\0\0\0\0")),
                false,
            ),
        ];
        for (what, first, cancel) in rows {
            assert_eq!(is_cancel_request(&first), cancel, "{what}");
        }
    }
}
