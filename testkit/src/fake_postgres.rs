//! A fake Postgres node for what a real one will not do on demand: ask for a password in the
//! clear or as MD5, propose an absurd SCRAM iteration count, or stream a message forever. It
//! keeps every byte each connection sent it, so a test can show that a password never arrived.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use roleproxy_core::pgwire::message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::{accept_loop, bind_with_retry, lock, TaskGuard};

/// How long a connection is read after the fake's last word, waiting for the client to close.
const DRAIN_FOR: Duration = Duration::from_secs(10);
/// The most kept of what one connection sent.
const KEEP: usize = 1 << 20;
/// The most an endless answer sends on one connection before it gives up.
const STREAM_LIMIT: u64 = 1 << 30;
const CHUNK: usize = 64 * 1024;
/// An SSLRequest: its length and code.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 4, 0xd2, 0x16, 0x2f];
/// The length an endless message announces: just under 2 GiB.
pub const ENDLESS_LENGTH: u32 = 0x7fff_fff0;

/// What the fake answers a StartupMessage with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// AuthenticationCleartextPassword, as `password` in `pg_hba.conf` asks.
    Cleartext,
    /// AuthenticationMD5Password, with a salt.
    Md5,
    /// SCRAM-SHA-256, with this iteration count in its challenge.
    ScramIterations(u32),
    /// A message header announcing [`ENDLESS_LENGTH`] bytes, then bytes until the client
    /// closes (or [`STREAM_LIMIT`]).
    EndlessMessage,
    /// AuthenticationOk, then NoticeResponses of 8,000 bytes each until the client closes.
    EndlessNotices,
    /// `N` to an SSLRequest, as a server without TLS does; nothing to anything else.
    NoTls,
}

/// A fake Postgres node; stops when dropped.
pub struct FakePostgres {
    addr: SocketAddr,
    received: Arc<Mutex<Vec<Vec<u8>>>>,
    _task: TaskGuard,
}

impl FakePostgres {
    /// Listens on `addr` (port 0: any free port) and answers every connection with `answer`.
    pub async fn start(addr: SocketAddr, answer: Answer) -> FakePostgres {
        let listener = bind_with_retry("fake postgres", || TcpListener::bind(addr)).await;
        let addr = listener.local_addr().expect("bound address");
        let received = Arc::new(Mutex::new(Vec::new()));
        let kept = Arc::clone(&received);
        let task = TaskGuard::spawn(accept_loop(listener, move |stream| {
            let kept = Arc::clone(&kept);
            async move {
                let got = serve(stream, answer).await;
                lock(&kept).push(got);
            }
        }));
        FakePostgres {
            addr,
            received,
            _task: task,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Everything each finished connection sent, in the order they finished.
    pub fn received(&self) -> Vec<Vec<u8>> {
        lock(&self.received).clone()
    }

    /// Connections that have finished (the client closed, or the fake gave up on it).
    pub fn finished(&self) -> usize {
        lock(&self.received).len()
    }
}

/// Answers one connection; returns every byte it sent.
async fn serve(mut stream: TcpStream, answer: Answer) -> Vec<u8> {
    let mut got = Vec::new();
    if read_packet(&mut stream, None, &mut got).await.is_none() {
        return got;
    }
    let _ = match answer {
        Answer::NoTls if got == SSL_REQUEST => stream.write_all(b"N").await,
        Answer::NoTls => Ok(()),
        Answer::Cleartext => stream.write_all(&message(b'R', &3u32.to_be_bytes())).await,
        Answer::Md5 => {
            let mut body = 5u32.to_be_bytes().to_vec();
            body.extend_from_slice(b"salt");
            stream.write_all(&message(b'R', &body)).await
        }
        Answer::ScramIterations(iterations) => {
            scram_challenge(&mut stream, iterations, &mut got).await
        }
        Answer::EndlessMessage => {
            let mut header = vec![b'R'];
            header.extend_from_slice(&ENDLESS_LENGTH.to_be_bytes());
            match stream.write_all(&header).await {
                Ok(()) => stream_forever(&mut stream, &[0u8; CHUNK]).await,
                error => error,
            }
        }
        Answer::EndlessNotices => {
            let mut notices = Vec::with_capacity(CHUNK);
            while notices.len() < CHUNK {
                let mut fields = b"SNOTICE\0C00000\0M".to_vec();
                fields.extend(std::iter::repeat_n(b'x', 8000));
                fields.extend_from_slice(b"\0\0");
                notices.extend_from_slice(&message(b'N', &fields));
            }
            match stream.write_all(&message(b'R', &0u32.to_be_bytes())).await {
                Ok(()) => stream_forever(&mut stream, &notices).await,
                error => error,
            }
        }
    };
    drain(&mut stream, &mut got).await;
    got
}

/// AuthenticationSASL, the client's first message, and a challenge with `iterations`.
async fn scram_challenge(
    stream: &mut TcpStream,
    iterations: u32,
    got: &mut Vec<u8>,
) -> std::io::Result<()> {
    let mut body = 10u32.to_be_bytes().to_vec();
    body.extend_from_slice(b"SCRAM-SHA-256\0\0");
    stream.write_all(&message(b'R', &body)).await?;
    let Some(first) = read_packet(stream, Some(b'p'), got).await else {
        return Ok(());
    };
    // `n,,n=,r=NONCE` after the mechanism name and the data's length.
    let text = String::from_utf8_lossy(&first);
    let nonce = text.split("r=").nth(1).unwrap_or_default().to_owned();
    let mut body = 11u32.to_be_bytes().to_vec();
    body.extend_from_slice(format!("r={nonce}fake,s=c2FsdHNhbHQ=,i={iterations}").as_bytes());
    stream.write_all(&message(b'R', &body)).await
}

async fn stream_forever(stream: &mut TcpStream, chunk: &[u8]) -> std::io::Result<()> {
    let mut sent = 0u64;
    while sent < STREAM_LIMIT {
        stream.write_all(chunk).await?;
        sent += chunk.len() as u64;
    }
    Ok(())
}

/// Reads one packet (with a tag first when `tag` is given), keeping its bytes in `got`;
/// returns its body. `None`: the client closed or sent something else.
async fn read_packet(
    stream: &mut TcpStream,
    tag: Option<u8>,
    got: &mut Vec<u8>,
) -> Option<Vec<u8>> {
    if let Some(tag) = tag {
        let first = stream.read_u8().await.ok()?;
        got.push(first);
        if first != tag {
            return None;
        }
    }
    let len = stream.read_u32().await.ok()?;
    got.extend_from_slice(&len.to_be_bytes());
    let mut body = vec![0u8; (len as usize).checked_sub(4)?.min(KEEP)];
    stream.read_exact(&mut body).await.ok()?;
    got.extend_from_slice(&body);
    Some(body)
}

/// Keeps what the client sends until it closes, or [`DRAIN_FOR`] passes.
async fn drain(stream: &mut TcpStream, got: &mut Vec<u8>) {
    let mut buf = vec![0u8; CHUNK];
    let _ = tokio::time::timeout(DRAIN_FOR, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) if got.len() < KEEP => got.extend_from_slice(&buf[..n]),
                Ok(_) => {}
            }
        }
    })
    .await;
}
