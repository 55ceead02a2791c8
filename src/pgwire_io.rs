//! The Postgres messages the proxy reads and writes on a client's socket itself: a client's
//! first packet, read before a backend is connected and forwarded exactly as read, and the
//! refusal of a client that cannot be served (encryption declined with `N`, then a FATAL
//! ErrorResponse), so a client library shows a real error instead of "connection reset".
//! The messages themselves are [`roleproxy_core::pgwire`]'s.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use roleproxy_core::pgwire::{check_length, error_response, first_packet_len, parse_startup};
use roleproxy_core::pgwire::{PgWireError, StartupPacket};

/// Reads a client's first packet as raw bytes, to be forwarded untouched. It is everything a
/// Postgres client sends before the server answers (SSLRequest, GSSENCRequest,
/// CancelRequest or StartupMessage), however many writes it came in.
pub async fn read_first_packet<S: AsyncRead + Unpin>(stream: &mut S) -> io::Result<Vec<u8>> {
    let mut prefix = [0u8; 4];
    stream.read_exact(&mut prefix).await?;
    let mut packet = vec![0u8; first_packet_len(prefix)];
    packet[..4].copy_from_slice(&prefix);
    stream.read_exact(&mut packet[4..]).await?;
    Ok(packet)
}

/// A stream with bytes already read from it put back in front, so that a client whose first
/// packet was read before the proxy knew it could not be served is still answered in order.
pub struct Prefixed<'a, S> {
    prefix: &'a [u8],
    stream: &'a mut S,
}

impl<'a, S> Prefixed<'a, S> {
    pub fn new(prefix: &'a [u8], stream: &'a mut S) -> Self {
        Self { prefix, stream }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<'_, S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.prefix.is_empty() {
            return Pin::new(&mut *this.stream).poll_read(cx, buf);
        }
        let n = this.prefix.len().min(buf.remaining());
        buf.put_slice(&this.prefix[..n]);
        this.prefix = &this.prefix[n..];
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<'_, S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().stream).poll_shutdown(cx)
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use roleproxy_core::pgwire::{packet, PROTOCOL_3, SSL_REQUEST};

    /// The client side of a refusal: SSLRequest (expecting `N`), StartupMessage for user `u`,
    /// then everything the proxy sends until it closes.
    async fn ssl_then_startup(client: &mut tokio::io::DuplexStream) -> Vec<u8> {
        client.write_all(&packet(SSL_REQUEST, b"")).await.unwrap();
        let mut n = [0u8; 1];
        client.read_exact(&mut n).await.unwrap();
        assert_eq!(&n, b"N");
        client
            .write_all(&packet(PROTOCOL_3, b"user\0u\0\0"))
            .await
            .unwrap();
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).await.unwrap();
        reply
    }

    /// Refused directly, and refused after the first packet (the SSLRequest) was already read
    /// by the proxy: the same exchange either way.
    #[tokio::test]
    async fn refuse_answers_ssl_then_sends_the_error() {
        for first_packet_read in [false, true] {
            let (mut client, mut server) = tokio::io::duplex(1024);
            let task = tokio::spawn(async move {
                let deadline = Duration::from_secs(5);
                if first_packet_read {
                    let first = read_first_packet(&mut server).await.unwrap();
                    let mut prefixed = Prefixed::new(&first, &mut server);
                    refuse(&mut prefixed, "57P03", "no leader", deadline).await
                } else {
                    refuse(&mut server, "57P03", "no leader", deadline).await
                }
            });
            let reply = ssl_then_startup(&mut client).await;
            assert_eq!(reply, error_response("57P03", "no leader"));
            match task.await.unwrap().unwrap() {
                StartupPacket::Startup { params } => {
                    assert_eq!(params, [("user".to_owned(), "u".to_owned())])
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    /// A refusal written through [`Prefixed`] must reach the client whole and end with its
    /// EOF, whatever buffering the stream beneath has.
    #[tokio::test]
    async fn a_prefixed_stream_passes_flush_and_shutdown_through() {
        let (near, mut far) = tokio::io::duplex(64);
        let mut buffered = tokio::io::BufWriter::new(near);
        let mut prefixed = Prefixed::new(b"", &mut buffered);
        prefixed.write_all(b"answer").await.unwrap();
        prefixed.flush().await.unwrap();
        let mut got = [0u8; 6];
        let read = tokio::time::timeout(Duration::from_secs(5), far.read_exact(&mut got)).await;
        assert!(read.is_ok(), "flushed through to the client");
        assert_eq!(&got, b"answer");
        prefixed.write_all(b"bye").await.unwrap();
        prefixed.shutdown().await.unwrap();
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), far.read_to_end(&mut rest)).await;
        assert!(read.is_ok(), "shut down: the client reads EOF");
        assert_eq!(rest, b"bye");
    }

    #[tokio::test]
    async fn the_first_packet_is_read_whole_across_writes_and_nothing_after_it() {
        let (mut client, mut server) = tokio::io::duplex(64);
        let startup = packet(PROTOCOL_3, b"user\0app\0\0");
        let sent = startup.clone();
        let writer = tokio::spawn(async move {
            for piece in sent.chunks(3) {
                client.write_all(piece).await.unwrap();
                tokio::task::yield_now().await;
            }
            client.write_all(b"after").await.unwrap();
            client
        });
        assert_eq!(read_first_packet(&mut server).await.unwrap(), startup);
        let _client = writer.await.unwrap();
        let mut after = [0u8; 5];
        server.read_exact(&mut after).await.unwrap();
        assert_eq!(
            &after, b"after",
            "bytes after the first packet stay in the stream"
        );
    }

    #[tokio::test]
    async fn refuse_gives_up_on_a_silent_client() {
        let (_client, mut server) = tokio::io::duplex(64);
        let got = refuse(&mut server, "57P03", "x", Duration::from_millis(50)).await;
        assert_eq!(got, Err(PgWireError::Timeout));
    }
}
