//! A node's role endpoint (`GET /flycheck/role` on `:5500`) that a test flips
//! at run time.
//!
//! Besides the well-formed answers of postgres-ha and postgres-flex it can
//! misbehave in the ways a real endpoint does under load or failure (hang,
//! garbage, oversized or trickling responses), which is what the proxy's
//! check limits exist for. It speaks just enough HTTP/1.1 by hand: read the
//! request head, write one response with `Connection: close`, close.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::RngCore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::{accept_loop, bind_with_retry, eventually, lock, TaskGuard};

/// Largest request head accepted; longer ones get the connection closed.
const MAX_HEAD: usize = 8 * 1024;
/// Size of the writes that make up a [`RoleReply::Huge`] body.
const HUGE_CHUNK: usize = 64 * 1024;
/// How long to wait for the client to close after a response, so our close
/// never turns into a reset that could destroy the response in flight.
const LINGER: Duration = Duration::from_secs(1);

/// What the endpoint does with each request, chosen when the request arrives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RoleReply {
    /// A well-formed response with this status and body.
    Body { status: u16, body: String },
    /// Read the request and never answer, keeping the socket open until the
    /// client gives up: a check timeout.
    Hang,
    /// Answer with random bytes that are not HTTP, then close.
    Garbage,
    /// HTTP 200 whose body is this many bytes: `leader` padded with spaces,
    /// so only a size limit (not trimming or matching) rejects it.
    Huge(usize),
    /// A valid `leader` response written one byte at a time with this delay
    /// between bytes: a check that limits only per-read time would pass it.
    SlowBytes(Duration),
    /// Each request gets the next reply of this list, round and round: a flapping node.
    Cycle(Vec<RoleReply>),
    /// Whatever the role endpoint at this address answers to `GET /flycheck/role` now
    /// (status and body); no answer from it (refused, reset, [`RELAY_TIMEOUT`]) closes the
    /// connection unanswered. Puts a switch in front of a real node's agent.
    Relay(SocketAddr),
}

/// How long a [`RoleReply::Relay`] waits for the endpoint it relays: the proxies' check
/// timeout (5 s by default) decides what a slow agent means, not the relay.
pub const RELAY_TIMEOUT: Duration = Duration::from_secs(6);

impl RoleReply {
    /// HTTP 200 `leader`, as postgres-ha reports the primary.
    pub fn leader() -> Self {
        Self::word("leader")
    }

    /// HTTP 200 `replica`.
    pub fn replica() -> Self {
        Self::word("replica")
    }

    /// HTTP 200 with `word` as the whole body (`primary`, `readonly`, ...).
    pub fn word(word: &str) -> Self {
        Self::Body {
            status: 200,
            body: word.to_owned(),
        }
    }

    /// `status` with an empty body, e.g. 404 for maintenance.
    pub fn status(status: u16) -> Self {
        Self::Body {
            status,
            body: String::new(),
        }
    }

    /// `status` with an error text body, e.g. 500 "could not connect" from a
    /// node whose Postgres is down.
    pub fn error(status: u16, body: &str) -> Self {
        Self::Body {
            status,
            body: body.to_owned(),
        }
    }
}

/// An HTTP role endpoint on one address. Dropping it stops the listener and
/// closes every open connection (including hanging ones).
pub struct RoleEndpoint {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: TaskGuard,
}

struct Shared {
    reply: Mutex<RoleReply>,
    requests: AtomicU64,
}

impl RoleEndpoint {
    /// Starts an endpoint on `addr` (port 0 picks a free port) that answers
    /// `replica` until told otherwise, so nothing is routed to a node before
    /// the test says it leads.
    ///
    /// Retries briefly while the address is still held by an endpoint that
    /// was just dropped; panics if it cannot bind.
    pub async fn start(addr: SocketAddr) -> RoleEndpoint {
        let listener = bind_with_retry("role endpoint", || TcpListener::bind(addr)).await;
        let addr = listener
            .local_addr()
            .expect("bound listener has an address");
        let shared = Arc::new(Shared {
            reply: Mutex::new(RoleReply::replica()),
            requests: AtomicU64::new(0),
        });
        let conn_shared = Arc::clone(&shared);
        let task = TaskGuard::spawn(accept_loop(listener, move |stream| {
            serve(stream, Arc::clone(&conn_shared))
        }));
        RoleEndpoint { addr, shared, task }
    }

    /// The bound address (with the real port when started on port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Changes the reply for requests that arrive from now on; responses
    /// already being written are not affected.
    pub fn set(&self, reply: RoleReply) {
        self.switch().set(reply);
    }

    /// A handle that changes this endpoint's reply, for a guard that must not borrow it.
    pub fn switch(&self) -> RoleSwitch {
        RoleSwitch(Arc::clone(&self.shared))
    }

    /// Number of complete request heads received so far.
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::SeqCst)
    }

    /// Waits until at least `n` requests have arrived; false on timeout.
    ///
    /// Each counted request has already had its reply chosen, so a test can
    /// wait for a check and only then change the reply for the next one.
    pub async fn wait_requests(&self, n: u64, timeout: Duration) -> bool {
        eventually(timeout, || async { self.requests() >= n }).await
    }

    /// Stops the endpoint and waits until its listener is closed.
    pub async fn stop(mut self) {
        self.task.stop().await;
    }
}

/// Changes a [`RoleEndpoint`]'s reply ([`RoleEndpoint::switch`]); does nothing once the
/// endpoint is gone.
#[derive(Clone)]
pub struct RoleSwitch(Arc<Shared>);

impl RoleSwitch {
    /// What [`RoleEndpoint::set`] does.
    pub fn set(&self, reply: RoleReply) {
        *lock(&self.0.reply) = reply;
    }
}

async fn serve(mut stream: TcpStream, shared: Arc<Shared>) {
    if !read_head(&mut stream).await {
        return;
    }
    let mut reply = lock(&shared.reply).clone();
    let n = shared.requests.fetch_add(1, Ordering::SeqCst);
    if let RoleReply::Cycle(replies) = &reply {
        if let Some(next) = replies.get(n as usize % replies.len().max(1)) {
            reply = next.clone();
        }
    }
    // Write errors below mean the client went away, which is the client's
    // business (a check that timed out); the connection just ends.
    match reply {
        RoleReply::Body { status, body } => {
            let mut response = head(status, body.len()).into_bytes();
            response.extend_from_slice(body.as_bytes());
            if stream.write_all(&response).await.is_ok() {
                finish(stream).await;
            }
        }
        // A cycle inside a cycle is not a reply; treat it as a hung endpoint.
        RoleReply::Hang | RoleReply::Cycle(_) => drain(&mut stream).await,
        RoleReply::Garbage => {
            if stream.write_all(&garbage()).await.is_ok() {
                finish(stream).await;
            }
        }
        RoleReply::Huge(len) => {
            if write_huge(&mut stream, len).await.is_ok() {
                finish(stream).await;
            }
        }
        RoleReply::Relay(agent) => {
            let path = roleproxy_agent::ROLE_PATH;
            if let Ok((status, body)) =
                crate::try_http(agent, "GET", path, None, RELAY_TIMEOUT).await
            {
                let mut response = head(status, body.len()).into_bytes();
                response.extend_from_slice(body.as_bytes());
                if stream.write_all(&response).await.is_ok() {
                    finish(stream).await;
                }
            }
        }
        RoleReply::SlowBytes(delay) => {
            if write_slowly(&mut stream, delay).await.is_ok() {
                finish(stream).await;
            }
        }
    }
}

/// Reads until the blank line ending the request head. False when the client
/// closes first or the head exceeds [`MAX_HEAD`].
async fn read_head(stream: &mut TcpStream) -> bool {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while head.len() < MAX_HEAD {
        let n = match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => n,
        };
        // Only the tail can complete the terminator; look a little back.
        let from = head.len().saturating_sub(3);
        head.extend_from_slice(&buf[..n]);
        if head[from..].windows(4).any(|w| w == b"\r\n\r\n") {
            return true;
        }
    }
    false
}

/// The status line and headers for a response with a `len`-byte body.
fn head(status: u16, len: usize) -> String {
    format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: text/plain\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n",
        reason(status)
    )
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        404 => "Not Found",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// Random bytes that cannot be mistaken for an HTTP status line.
fn garbage() -> Vec<u8> {
    let mut bytes = vec![0u8; 256];
    rand::rng().fill_bytes(&mut bytes);
    bytes[0] = 0;
    bytes
}

async fn write_huge(stream: &mut TcpStream, len: usize) -> std::io::Result<()> {
    stream.write_all(head(200, len).as_bytes()).await?;
    let mut chunk = vec![b' '; HUGE_CHUNK.min(len)];
    let word = b"leader";
    let prefix = word.len().min(chunk.len());
    chunk[..prefix].copy_from_slice(&word[..prefix]);
    let mut written = 0;
    while written < len {
        let n = (len - written).min(chunk.len());
        stream.write_all(&chunk[..n]).await?;
        // Only the first chunk carries the word.
        chunk[..prefix].fill(b' ');
        written += n;
    }
    Ok(())
}

async fn write_slowly(stream: &mut TcpStream, delay: Duration) -> std::io::Result<()> {
    // Without Nagle's delay each byte leaves in its own segment.
    stream.set_nodelay(true)?;
    let mut response = head(200, "leader".len()).into_bytes();
    response.extend_from_slice(b"leader");
    for (i, byte) in response.iter().enumerate() {
        if i > 0 {
            // Not a wait: this endpoint must be slow.
            tokio::time::sleep(delay).await;
        }
        stream.write_all(std::slice::from_ref(byte)).await?;
    }
    Ok(())
}

/// Ends a response: half-close, then wait briefly for the client to close so
/// that unread input never makes our close a reset.
async fn finish(mut stream: TcpStream) {
    if stream.shutdown().await.is_ok() {
        let _ = tokio::time::timeout(LINGER, drain(&mut stream)).await;
    }
}

/// Reads and discards until the client closes or the connection fails.
async fn drain(stream: &mut TcpStream) {
    let mut buf = [0u8; 1024];
    while let Ok(n) = stream.read(&mut buf).await {
        if n == 0 {
            return;
        }
    }
}
