//! The few Postgres wire messages the proxy answers itself, when it cannot hand a client to a
//! leader: decline SSL/GSS encryption with `N`, read the StartupMessage, send a FATAL
//! ErrorResponse. A client library then shows a real error instead of "connection reset".
//!
//! Everything else passes through untouched; this module never sees a served session's bytes.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Postgres itself refuses startup packets larger than this.
pub const MAX_STARTUP_LEN: usize = 10_000;
const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;
const CANCEL_REQUEST: u32 = 80_877_102;
const PROTOCOL_3: u32 = 3 << 16;

/// SQLSTATE `cannot_connect_now`: no leader to send the client to.
pub const CANNOT_CONNECT_NOW: &str = "57P03";
/// SQLSTATE `too_many_connections`.
pub const TOO_MANY_CONNECTIONS: &str = "53300";

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
pub fn error_response(code: &str, message: &str) -> Vec<u8> {
    let mut fields = Vec::with_capacity(message.len() + 32);
    for (tag, value) in [
        (b'S', "FATAL"),
        (b'V', "FATAL"),
        (b'C', code),
        (b'M', message),
    ] {
        fields.push(tag);
        // A NUL inside a field would end it early; the client must see the whole message.
        fields.extend(value.bytes().filter(|&b| b != 0));
        fields.push(0);
    }
    fields.push(0);
    let mut out = Vec::with_capacity(fields.len() + 5);
    out.push(b'E');
    out.extend_from_slice(&((fields.len() + 4) as u32).to_be_bytes());
    out.extend_from_slice(&fields);
    out
}

/// Reads one startup-phase packet.
async fn read_packet<S: AsyncRead + Unpin>(stream: &mut S) -> Result<StartupPacket, PgWireError> {
    let mut len = [0u8; 4];
    stream
        .read_exact(&mut len)
        .await
        .map_err(|_| PgWireError::Closed)?;
    let body_len = check_length(u32::from_be_bytes(len))?;
    let mut body = vec![0u8; body_len];
    stream
        .read_exact(&mut body)
        .await
        .map_err(|_| PgWireError::Closed)?;
    parse_startup(&body)
}

/// Declines encryption until the client sends its StartupMessage (or a CancelRequest).
pub async fn read_startup<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
) -> Result<StartupPacket, PgWireError> {
    // A client asks for SSL and then GSS at most once each; anything beyond is not a client.
    for _ in 0..3 {
        match read_packet(stream).await? {
            StartupPacket::SslRequest | StartupPacket::GssEncRequest => {
                stream
                    .write_all(b"N")
                    .await
                    .map_err(|_| PgWireError::Closed)?;
            }
            other => return Ok(other),
        }
    }
    Err(PgWireError::TooManyRequests)
}

/// Tells a client it cannot be served, as Postgres would, within `deadline`.
///
/// Returns what the client sent, for logging; a CancelRequest gets no answer, as in Postgres.
pub async fn refuse<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    code: &str,
    message: &str,
    deadline: Duration,
) -> Result<StartupPacket, PgWireError> {
    let exchange = async {
        let packet = read_startup(stream).await;
        let answer = !matches!(
            packet,
            Ok(StartupPacket::Cancel { .. }) | Err(PgWireError::Closed)
        );
        if answer {
            let _ = stream.write_all(&error_response(code, message)).await;
            let _ = stream.flush().await;
        }
        let _ = stream.shutdown().await;
        packet
    };
    tokio::time::timeout(deadline, exchange)
        .await
        .unwrap_or(Err(PgWireError::Timeout))
}

/// The startup parameter `name`, if present.
pub fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(code: u32, rest: &[u8]) -> Vec<u8> {
        let mut body = code.to_be_bytes().to_vec();
        body.extend_from_slice(rest);
        body
    }

    #[test]
    fn startup_packets() {
        let rows: Vec<(&str, Vec<u8>, Result<StartupPacket, PgWireError>)> = vec![
            (
                "ssl",
                packet(SSL_REQUEST, b""),
                Ok(StartupPacket::SslRequest),
            ),
            (
                "gss",
                packet(GSSENC_REQUEST, b""),
                Ok(StartupPacket::GssEncRequest),
            ),
            (
                "cancel",
                packet(CANCEL_REQUEST, &[0, 0, 0, 7, 0, 0, 0, 9]),
                Ok(StartupPacket::Cancel {
                    process_id: 7,
                    secret_key: 9,
                }),
            ),
            (
                "startup",
                packet(PROTOCOL_3, b"user\0app\0database\0db\0\0"),
                Ok(StartupPacket::Startup {
                    params: vec![
                        ("user".into(), "app".into()),
                        ("database".into(), "db".into()),
                    ],
                }),
            ),
            (
                "startup 3.2",
                packet(PROTOCOL_3 | 2, b"\0"),
                Ok(StartupPacket::Startup { params: vec![] }),
            ),
            (
                "ssl with extra bytes",
                packet(SSL_REQUEST, b"x"),
                Err(PgWireError::Malformed),
            ),
            (
                "cancel too short",
                packet(CANCEL_REQUEST, &[0, 0]),
                Err(PgWireError::Malformed),
            ),
            (
                "params unterminated",
                packet(PROTOCOL_3, b"user\0app"),
                Err(PgWireError::Malformed),
            ),
            (
                "params missing final nul",
                packet(PROTOCOL_3, b"user\0app\0"),
                Err(PgWireError::Malformed),
            ),
            (
                "bytes after final nul",
                packet(PROTOCOL_3, b"\0junk"),
                Err(PgWireError::Malformed),
            ),
            (
                "protocol 2",
                packet(2 << 16, b""),
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

    #[tokio::test]
    async fn refuse_answers_ssl_then_sends_the_error() {
        let (mut client, mut server) = tokio::io::duplex(1024);
        let task = tokio::spawn(async move {
            refuse(&mut server, "57P03", "no leader", Duration::from_secs(5)).await
        });
        let mut ssl = 8u32.to_be_bytes().to_vec();
        ssl.extend_from_slice(&SSL_REQUEST.to_be_bytes());
        client.write_all(&ssl).await.unwrap();
        let mut n = [0u8; 1];
        client.read_exact(&mut n).await.unwrap();
        assert_eq!(&n, b"N");
        let body = packet(PROTOCOL_3, b"user\0u\0\0");
        client
            .write_all(&((body.len() + 4) as u32).to_be_bytes())
            .await
            .unwrap();
        client.write_all(&body).await.unwrap();
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).await.unwrap();
        assert_eq!(reply, error_response("57P03", "no leader"));
        let packet = task.await.unwrap().unwrap();
        match packet {
            StartupPacket::Startup { params } => assert_eq!(param(&params, "user"), Some("u")),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[tokio::test]
    async fn refuse_gives_up_on_a_silent_client() {
        let (_client, mut server) = tokio::io::duplex(64);
        let got = refuse(&mut server, "57P03", "x", Duration::from_millis(50)).await;
        assert_eq!(got, Err(PgWireError::Timeout));
    }
}
