//! TCP servers standing in for Postgres on a node's `:5433`.
//!
//! [`TaggedBackend`] tells a client which node it reached and echoes, which is
//! all most routing tests need; [`SinkSourceBackend`] moves large seeded
//! streams both ways so a test can prove the proxy neither loses, reorders
//! nor invents a byte.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{RngCore, SeedableRng};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::{accept_loop, bind_with_retry, eventually, lock, TaskGuard};

/// Read buffer size and the chunk size of [`random_chunks`].
const CHUNK: usize = 64 * 1024;
/// How long `stop` waits for aborted connections to be closed.
const STOP_WAIT: Duration = Duration::from_secs(5);

/// Connection counts shared between a backend handle and its tasks.
#[derive(Default)]
struct Counters {
    accepted: AtomicU64,
    open: AtomicU64,
}

/// Marks one connection open for as long as it lives; dropping it (also when
/// the task is aborted) marks the connection closed.
struct OpenGuard {
    counters: Arc<Counters>,
    /// This connection's number, 1 for the first accepted.
    number: u64,
}

impl OpenGuard {
    fn new(counters: &Arc<Counters>) -> Self {
        let number = counters.accepted.fetch_add(1, Ordering::SeqCst) + 1;
        counters.open.fetch_add(1, Ordering::SeqCst);
        Self {
            counters: Arc::clone(counters),
            number,
        }
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.counters.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A backend that greets each connection with `tag` and a newline, then
/// echoes. On EOF from the client it half-closes its side and closes.
///
/// Dropping it stops the listener and closes every open connection, like a
/// node dying; [`TaggedBackend::stop`] does the same and waits for it.
pub struct TaggedBackend {
    addr: SocketAddr,
    counters: Arc<Counters>,
    /// Whether it answers roleproxy's `pg_isready`-style probe as Postgres would.
    probes: Arc<AtomicBool>,
    task: TaskGuard,
}

impl TaggedBackend {
    /// Starts a backend on `addr` (port 0 picks a free port).
    ///
    /// Retries briefly while the address is still held by a backend that was
    /// just dropped, so a test can restart a node in place; panics if it
    /// cannot bind.
    pub async fn start(addr: SocketAddr, tag: &str) -> TaggedBackend {
        let listener = bind_with_retry("tagged backend", || TcpListener::bind(addr)).await;
        let addr = listener
            .local_addr()
            .expect("bound listener has an address");
        let counters = Arc::new(Counters::default());
        let greeting: Arc<[u8]> = format!("{tag}\n").into_bytes().into();
        let conn_counters = Arc::clone(&counters);
        let probes = Arc::new(AtomicBool::new(false));
        let conn_probes = Arc::clone(&probes);
        let task = TaskGuard::spawn(accept_loop(listener, move |stream| {
            // Counted at accept, before the task first runs, so `open()` is
            // right as soon as the connection exists.
            let guard = OpenGuard::new(&conn_counters);
            let greeting = Arc::clone(&greeting);
            let probes = conn_probes.load(Ordering::SeqCst);
            async move {
                let _guard = guard;
                // An error means the client reset or vanished: just close.
                let _ = if probes {
                    answer_probe_or_echo(stream, &greeting).await
                } else {
                    greet_and_echo(stream, &greeting).await
                };
            }
        }));
        TaggedBackend {
            addr,
            counters,
            probes,
            task,
        }
    }

    /// From now on, answers roleproxy's `pg_isready`-style probe as Postgres does (it asks
    /// for a password), so the probe finds Postgres here; other clients are greeted once
    /// their first bytes arrive, as Postgres clients speak first. By default it greets at
    /// once, and a probe finds no Postgres.
    pub fn answer_probes(&self) {
        self.probes.store(true, Ordering::SeqCst);
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted since start.
    pub fn connections(&self) -> u64 {
        self.counters.accepted.load(Ordering::SeqCst)
    }

    /// Connections currently open.
    pub fn open(&self) -> u64 {
        self.counters.open.load(Ordering::SeqCst)
    }

    /// Waits until exactly `n` connections are open (0 shows that the proxy
    /// has drained its connections); false on timeout.
    pub async fn wait_open(&self, n: u64, timeout: Duration) -> bool {
        eventually(timeout, || async { self.open() == n }).await
    }

    /// Stops the backend and waits until its listener and connections are
    /// closed, so the address can be rebound and clients have seen the close.
    pub async fn stop(mut self) {
        self.task.stop().await;
        // Aborting the accept task drops its connection set, which aborts the
        // connections; those are dropped a moment later.
        eventually(STOP_WAIT, || async { self.open() == 0 }).await;
    }
}

async fn greet_and_echo(mut stream: TcpStream, greeting: &[u8]) -> std::io::Result<()> {
    stream.write_all(greeting).await?;
    echo_until_eof(stream).await
}

/// Echoes until the client's EOF, then half-closes.
async fn echo_until_eof(mut stream: TcpStream) -> std::io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return stream.shutdown().await;
        }
        stream.write_all(&buf[..n]).await?;
    }
}

/// roleproxy's probe: a StartupMessage for this user.
const PROBE_USER: &[u8] = b"roleproxy_probe";
/// AuthenticationCleartextPassword: what Postgres answers a user it asks a password of.
const ASKS_PASSWORD: [u8; 9] = [b'R', 0, 0, 0, 8, 0, 0, 0, 3];

/// Answers a probe as Postgres would; greets and echoes anyone else, from their first bytes.
async fn answer_probe_or_echo(mut stream: TcpStream, greeting: &[u8]) -> std::io::Result<()> {
    let mut first = vec![0u8; CHUNK];
    let n = stream.read(&mut first).await?;
    if first[..n]
        .windows(PROBE_USER.len())
        .any(|w| w == PROBE_USER)
    {
        stream.write_all(&ASKS_PASSWORD).await?;
        return stream.shutdown().await;
    }
    stream.write_all(greeting).await?;
    stream.write_all(&first[..n]).await?;
    echo_until_eof(stream).await
}

/// A backend for integrity tests. On each connection it, at the same time,
/// reads everything the client sends until EOF and hashes it with SHA-256,
/// and writes the seeded stream `random_chunks(seed, len)` and then
/// half-closes.
///
/// The two directions are independent: the client's EOF does not cut the
/// outgoing stream short (that is the half-close the proxy must carry), and
/// nothing is ever written after it.
pub struct SinkSourceBackend {
    addr: SocketAddr,
    shared: Arc<SinkShared>,
    task: TaskGuard,
}

struct SinkShared {
    counters: Arc<Counters>,
    last: Mutex<LastReceived>,
}

/// What the most recent connection received.
#[derive(Default)]
struct LastReceived {
    /// Which connection this is (1 for the first accepted).
    connection: u64,
    /// Set once that connection's client reached EOF cleanly.
    digest: Option<[u8; 32]>,
}

impl SinkSourceBackend {
    /// Starts a backend on `addr` that sends each client `len` bytes of the
    /// stream seeded with `seed`. Panics if it cannot bind.
    pub async fn start(addr: SocketAddr, len: u64, seed: u64) -> SinkSourceBackend {
        let listener = bind_with_retry("sink/source backend", || TcpListener::bind(addr)).await;
        let addr = listener
            .local_addr()
            .expect("bound listener has an address");
        let shared = Arc::new(SinkShared {
            counters: Arc::new(Counters::default()),
            last: Mutex::new(LastReceived::default()),
        });
        let conn_shared = Arc::clone(&shared);
        let task = TaskGuard::spawn(accept_loop(listener, move |stream| {
            let guard = OpenGuard::new(&conn_shared.counters);
            let connection = guard.number;
            *lock(&conn_shared.last) = LastReceived {
                connection,
                digest: None,
            };
            let shared = Arc::clone(&conn_shared);
            async move {
                let _guard = guard;
                let digest = sink_and_source(stream, len, seed).await;
                let mut last = lock(&shared.last);
                if last.connection == connection {
                    last.digest = digest;
                }
            }
        }));
        SinkSourceBackend { addr, shared, task }
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted since start.
    pub fn connections(&self) -> u64 {
        self.shared.counters.accepted.load(Ordering::SeqCst)
    }

    /// Connections currently open.
    pub fn open(&self) -> u64 {
        self.shared.counters.open.load(Ordering::SeqCst)
    }

    /// The SHA-256 of everything the most recent connection's client sent,
    /// once it has reached EOF; `None` if that does not happen within
    /// `timeout` (no connection, still sending, or the connection failed).
    pub async fn received_digest(&self, timeout: Duration) -> Option<[u8; 32]> {
        eventually(timeout, || async { lock(&self.shared.last).digest }).await
    }

    /// Stops the backend and waits until its listener and connections are
    /// closed.
    pub async fn stop(mut self) {
        self.task.stop().await;
        eventually(STOP_WAIT, || async { self.open() == 0 }).await;
    }
}

/// Runs both directions of one connection; returns the digest of what was
/// received, or `None` if reading failed before EOF.
async fn sink_and_source(mut stream: TcpStream, len: u64, seed: u64) -> Option<[u8; 32]> {
    let (mut reader, mut writer) = stream.split();
    let sink = async {
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; CHUNK];
        loop {
            match reader.read(&mut buf).await {
                Ok(0) => return Some(<[u8; 32]>::from(hasher.finalize())),
                Ok(n) => hasher.update(&buf[..n]),
                Err(_) => return None,
            }
        }
    };
    let source = async {
        for chunk in random_chunks(seed, len) {
            writer.write_all(&chunk).await?;
        }
        writer.shutdown().await
    };
    // A failed write (the client reset) shows up on the read side as well;
    // the digest is what the test asks about.
    let (digest, _written) = tokio::join!(sink, source);
    digest
}

/// The deterministic stream of `len` bytes for `seed`, in 64 KiB chunks (the
/// last one shorter). Both ends of an integrity test generate it from the
/// same seed instead of keeping tens of MiB in memory.
pub fn random_chunks(seed: u64, len: u64) -> impl Iterator<Item = Vec<u8>> + Send {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut left = len;
    std::iter::from_fn(move || {
        if left == 0 {
            return None;
        }
        let size = left.min(CHUNK as u64);
        let mut chunk = vec![0u8; size as usize];
        rng.fill_bytes(&mut chunk);
        left -= size;
        Some(chunk)
    })
}

/// SHA-256 of `random_chunks(seed, len)`: what a client should receive from a
/// [`SinkSourceBackend`], or what the backend should report after the client
/// sent that stream.
pub fn sha256_of_stream(seed: u64, len: u64) -> [u8; 32] {
    let mut hasher = Sha256::new();
    for chunk in random_chunks(seed, len) {
        hasher.update(&chunk);
    }
    hasher.finalize().into()
}

/// Stands in for a Postgres whose slots are all taken, for tests that need a node's Postgres
/// to be alive without running one: every StartupMessage (such as roleproxy's liveness probe)
/// is answered with FATAL 53300, as a full Postgres does; anything else is echoed, so a test
/// can hold a session through the proxy by speaking first.
pub struct FullPostgres {
    _task: TaskGuard,
}

impl FullPostgres {
    pub async fn start(addr: SocketAddr) -> FullPostgres {
        let listener = bind_with_retry("full postgres", || TcpListener::bind(addr)).await;
        let task = TaskGuard::spawn(accept_loop(listener, |mut stream| async move {
            let mut first = [0u8; 8];
            if stream.read_exact(&mut first).await.is_err() {
                return;
            }
            let version = u32::from_be_bytes([first[4], first[5], first[6], first[7]]);
            if version >> 16 == 3 {
                let answer = roleproxy_core::pgwire::error_response(
                    roleproxy_core::pgwire::TOO_MANY_CONNECTIONS,
                    "sorry, too many clients already",
                );
                let _ = stream.write_all(&answer).await;
                return;
            }
            if stream.write_all(&first).await.is_ok() {
                let (mut read, mut write) = stream.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
            }
        }));
        FullPostgres { _task: task }
    }
}
