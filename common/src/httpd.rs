//! The small HTTP servers, the admin port and the role agent, and what keeps them answering
//! while a neighbour on the private network holds connections open or trickles its headers.
//!
//! - A connection must send its request headers within a short deadline, also between
//!   requests of a kept-alive connection.
//! - At most [`Limits::max_connections`] are held. One more is always accepted: it closes the
//!   oldest connection that is not inside a request, so a flood of idle connections pushes out
//!   its own oldest members, never the health check that just arrived.
//! - At most [`Limits::max_requests`] requests are handled at once; more wait their turn.
//! - A request head is at most [`MAX_HEAD`] bytes with at most [`MAX_HEADERS`] headers; a
//!   larger one is answered 431 and its connection closed. No handler reads a request body:
//!   hyper reads what arrived with the head, within the same buffer, and closes the
//!   connection rather than read more. A connection so buffers at most 8 KiB whatever its
//!   client streams: 256 clients each sending a 400 KiB head grow the process by a few MiB,
//!   where hyper's default buffer of about 400 KiB let them take over 80 MiB
//!   (`tests/bounds.rs`).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The largest request head (request line and headers) read. Health checks, scrapers and
/// proxies send a few hundred bytes; hyper cannot read with less than 8 KiB of buffer anyway.
pub const MAX_HEAD: usize = 8 * 1024;
/// The most headers one request may have; curl sends three, Prometheus five.
pub const MAX_HEADERS: usize = 32;

/// The log target these servers always had, before they left the proxy's crate: filters such
/// as `RUST_LOG=roleproxy::httpd=debug` keep working.
const LOG: &str = "roleproxy::httpd";

/// Pause after a failed `accept` (e.g. out of file descriptors) so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// How one server holds up against its clients.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections held at once.
    pub max_connections: usize,
    /// Requests handled at once.
    pub max_requests: usize,
    /// Time to send a request's headers, from connect or from the previous answer.
    pub header_read_timeout: Duration,
    /// Bound on one connection, however slowly its client reads.
    pub connection_timeout: Duration,
    /// At shutdown, how long a request being handled may take to finish.
    pub shutdown_grace: Duration,
}

/// Serves `handler` on `listener` until `shutdown` fires, then lets requests being handled
/// finish within [`Limits::shutdown_grace`].
pub async fn serve<H, F>(
    listener: TcpListener,
    limits: Limits,
    shutdown: CancellationToken,
    handler: H,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let held = Arc::new(Mutex::new(Held::default()));
    let requests = Arc::new(Semaphore::new(limits.max_requests.max(1)));
    let tracker = TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(target: LOG, %error, "HTTP accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        let mut admitted = lock(&held).admit(limits.max_connections);
        if admitted.is_none() {
            // Every held connection is inside a request or not read yet: give them a turn.
            tokio::task::yield_now().await;
            admitted = lock(&held).admit(limits.max_connections);
        }
        let Some(connection) = admitted else {
            tracing::debug!(target: LOG, %peer, "no HTTP connection can make room; closing the new one");
            continue;
        };
        tracker.spawn(serve_connection(
            stream,
            peer,
            connection,
            Arc::clone(&held),
            Arc::clone(&requests),
            limits,
            shutdown.clone(),
            handler.clone(),
        ));
    }
    drop(listener);
    tracker.close();
    if tokio::time::timeout(limits.shutdown_grace, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(target: LOG, "HTTP connections still open at shutdown");
    }
}

/// Accepted, and its task has not read from it yet: it may hold a request already, so it is
/// never closed to make room.
const FRESH: u8 = 0;
/// Waiting for a request (or for its client to read the answer): closed first to make room.
const IDLE: u8 = 1;
/// A request of it is being handled.
const BUSY: u8 = 2;

/// One held connection, as the accept loop sees it.
struct Connection {
    id: u64,
    state: Arc<AtomicU8>,
    close: CancellationToken,
}

/// The connections held, oldest first.
#[derive(Default)]
struct Held {
    next_id: u64,
    open: BTreeMap<u64, (Arc<AtomicU8>, CancellationToken)>,
}

impl Held {
    /// Room for one more connection: closes the oldest idle one when full; `None` when every
    /// held connection is inside a request or not read yet.
    fn admit(&mut self, max: usize) -> Option<Connection> {
        if self.open.len() >= max.max(1) {
            let oldest_idle = self
                .open
                .iter()
                .find(|(_, (state, _))| state.load(Ordering::Acquire) == IDLE)
                .map(|(id, _)| *id)?;
            if let Some((_, close)) = self.open.remove(&oldest_idle) {
                close.cancel();
            }
        }
        let id = self.next_id;
        self.next_id += 1;
        let state = Arc::new(AtomicU8::new(FRESH));
        let close = CancellationToken::new();
        self.open.insert(id, (Arc::clone(&state), close.clone()));
        Some(Connection { id, state, close })
    }

    fn len(&self) -> usize {
        self.open.len()
    }
}

/// Marks a connection busy for as long as it lives.
struct Busy(Arc<AtomicU8>);

impl Busy {
    fn new(state: &Arc<AtomicU8>) -> Busy {
        state.store(BUSY, Ordering::Release);
        Busy(Arc::clone(state))
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.store(IDLE, Ordering::Release);
    }
}

#[allow(clippy::too_many_arguments)]
async fn serve_connection<H, F>(
    stream: TcpStream,
    peer: SocketAddr,
    connection: Connection,
    held: Arc<Mutex<Held>>,
    requests: Arc<Semaphore>,
    limits: Limits,
    shutdown: CancellationToken,
    handler: H,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let state = Arc::clone(&connection.state);
    let service = service_fn(move |request| {
        let busy = Busy::new(&state);
        let requests = Arc::clone(&requests);
        let handler = handler.clone();
        async move {
            // The semaphore is never closed, so a permit always comes.
            let _permit = requests.acquire_owned().await;
            let response = handler(request).await;
            drop(busy);
            Ok::<_, Infallible>(response)
        }
    });
    let serving = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(MAX_HEAD)
        .max_header_size(MAX_HEAD)
        .max_headers(MAX_HEADERS)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(serving);
    // The first poll reads a request that is already there, and marks the connection busy.
    let first = std::future::poll_fn(|cx| Poll::Ready(serving.as_mut().poll(cx))).await;
    if let Poll::Ready(outcome) = first {
        finish(&held, &connection, peer, Some(outcome));
        return;
    }
    let _ = connection
        .state
        .compare_exchange(FRESH, IDLE, Ordering::AcqRel, Ordering::Acquire);
    let outcome = tokio::select! {
        outcome = serving.as_mut() => Some(outcome),
        () = connection.close.cancelled() => {
            tracing::debug!(target: LOG, %peer, "HTTP connection closed to make room for a newer one");
            None
        }
        () = tokio::time::sleep(limits.connection_timeout) => None,
        () = shutdown.cancelled() => {
            serving.as_mut().graceful_shutdown();
            tokio::time::timeout(limits.shutdown_grace, serving).await.ok()
        }
    };
    finish(&held, &connection, peer, outcome);
}

fn finish(
    held: &Mutex<Held>,
    connection: &Connection,
    peer: SocketAddr,
    outcome: Option<Result<(), hyper::Error>>,
) {
    if let Some(Err(error)) = outcome {
        tracing::debug!(target: LOG, %peer, %error, "HTTP connection ended with an error");
    }
    let mut held = lock(held);
    held.open.remove(&connection.id);
    tracing::trace!(target: LOG, open = held.len(), "HTTP connection closed");
}

/// Nothing panics while holding the lock, but a poisoned one is still usable: the map is
/// consistent after every statement.
fn lock(held: &Mutex<Held>) -> std::sync::MutexGuard<'_, Held> {
    held.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_house_closes_its_oldest_idle_connection() {
        let mut held = Held::default();
        let first = held.admit(3).expect("room");
        let second = held.admit(3).expect("room");
        let third = held.admit(3).expect("room");
        assert!(held.admit(3).is_none(), "none read yet: none closed");
        for c in [&first, &second, &third] {
            c.state.store(IDLE, Ordering::Release);
        }
        first.state.store(BUSY, Ordering::Release);
        let fourth = held.admit(3).expect("the oldest idle one makes room");
        assert!(!first.close.is_cancelled(), "inside a request: kept");
        assert!(second.close.is_cancelled(), "the oldest idle one");
        assert!(!third.close.is_cancelled() && !fourth.close.is_cancelled());
        assert_eq!(held.len(), 3);
        third.state.store(BUSY, Ordering::Release);
        assert!(
            held.admit(3).is_none(),
            "the rest busy or not read yet: the new one is refused"
        );
    }
}
