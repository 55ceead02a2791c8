//! Test kit: fakes for the outside world the proxy talks to, all on real loopback sockets,
//! a real Postgres cluster, and a harness that runs roleproxy in-process. The integration
//! tests, the `local_cluster` example and the benchmarks all build on it.
//!
//! The test topology mirrors a Fly cluster: node *i* lives on its own loopback
//! address with Postgres on `:5433` and its role endpoint on `:5500`, and a DNS
//! server answers the cluster name with the nodes' addresses. Each fake can be
//! changed while a test runs, so failovers, flapping checks and DNS outages are
//! driven from the test body.
//!
//! Every fake runs in tokio tasks and stops when its handle is dropped; the
//! `stop` methods additionally wait until the sockets are really closed, which
//! matters when a test rebinds the same address right away.

pub mod backend;
pub mod bulk;
pub mod cluster;
pub mod dns;
pub mod fake_cluster;
pub mod fake_postgres;
/// Network namespaces and iptables: Linux only.
#[cfg(target_os = "linux")]
pub mod fault;
pub mod haproxy;
pub mod harness;
pub mod patroni;
pub mod pg;
pub mod role;
pub mod transactions;
pub mod writer;

use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

/// How long `start` functions keep retrying a bind that fails with
/// `AddrInUse`: a fake that was just dropped closes its listener a moment
/// later, when the runtime gets to drop the aborted task.
const BIND_RETRY_FOR: Duration = Duration::from_secs(5);

/// Returns `127.a.b.c`; all of 127.0.0.0/8 answers on Linux, so tests can give
/// every node its own address and still use the real ports.
pub fn loopback(a: u8, b: u8, c: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, a, b, c))
}

/// The shortest pause between two looks of [`eventually`].
const POLL: Duration = Duration::from_millis(20);

/// What a condition given to [`eventually`] returns: whether the event it waits for has
/// happened. `bool` says so; `Option` and `Result` also carry what the event produced (or, on
/// a timeout, the last error seen, for the failure message).
pub trait Outcome {
    fn happened(&self) -> bool;
}

impl Outcome for bool {
    fn happened(&self) -> bool {
        *self
    }
}

impl<T> Outcome for Option<T> {
    fn happened(&self) -> bool {
        self.is_some()
    }
}

impl<T, E> Outcome for Result<T, E> {
    fn happened(&self) -> bool {
        self.is_ok()
    }
}

/// The one way tests wait: looks at `condition` until it reports the event
/// ([`Outcome::happened`]) or `timeout` passes, and returns its last answer (`true`, `Some` or
/// `Ok` when the event came; on a timeout, the answer of one last look taken after it).
/// Between looks it pauses 20 ms, or as long as the last look took if that was longer, so a
/// wait on a slow server (a query, a Patroni request) never keeps it busier than half the time.
/// Timeouts are generous: they bound a hang, they never measure a speed.
pub async fn eventually<O, F, Fut>(timeout: Duration, mut condition: F) -> O
where
    O: Outcome,
    F: FnMut() -> Fut,
    Fut: Future<Output = O>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let look = Instant::now();
        let outcome = condition().await;
        if outcome.happened() || Instant::now() >= deadline {
            return outcome;
        }
        tokio::time::sleep(POLL.max(look.elapsed())).await;
    }
}

/// [`eventually`] for code that cannot await: `#[test]` bodies that own a child process, and
/// `Drop`. Blocks the calling thread between looks.
pub fn eventually_blocking<O: Outcome>(timeout: Duration, mut condition: impl FnMut() -> O) -> O {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let look = std::time::Instant::now();
        let outcome = condition();
        if outcome.happened() || std::time::Instant::now() >= deadline {
            return outcome;
        }
        std::thread::sleep(POLL.max(look.elapsed()));
    }
}

/// A bounded observation window, for asserting that something does NOT happen ("the session
/// stays open", "no write lands"): no event can say that, so this looks at `condition` for
/// `window` as [`eventually`] would, and returns false as soon as it breaks, true if it held
/// at every look (the last one taken after the window).
pub async fn holds_for<F, Fut>(window: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let broke = eventually(window, || {
        let holds = condition();
        async move { !holds.await }
    })
    .await;
    !broke
}

/// Waits up to `timeout` for `child` to exit, and returns how it exited.
pub fn exit_status(
    child: &mut std::process::Child,
    timeout: Duration,
) -> Option<std::process::ExitStatus> {
    // `try_wait` keeps the status once reaped, so asking again after the wait is free.
    eventually_blocking(timeout, || child.try_wait().ok().flatten())
}

/// Runs `bind` until it succeeds, retrying `AddrInUse` for a few seconds.
pub(crate) async fn bind_with_retry<T, F, Fut>(what: &str, mut bind: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = io::Result<T>>,
{
    // `None` while the address is still in use (an event to wait for), `Some` for the answer.
    let bound = eventually(BIND_RETRY_FOR, || {
        let attempt = bind();
        async move {
            match attempt.await {
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => None,
                other => Some(other),
            }
        }
    })
    .await;
    match bound {
        Some(Ok(bound)) => bound,
        Some(Err(e)) => panic!("cannot bind {what}: {e}"),
        None => panic!("cannot bind {what}: still in use after {BIND_RETRY_FOR:?}"),
    }
}

/// Accepts connections forever, running `handle`'s future for each one.
///
/// The connection tasks live in a `JoinSet` owned by this future, so aborting
/// the accept task also aborts every open connection: dropping a fake closes
/// its sockets the way a dying node would.
pub(crate) async fn accept_loop<F, Fut>(listener: TcpListener, mut handle: F)
where
    F: FnMut(TcpStream) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut connections = JoinSet::new();
    loop {
        match listener.accept().await {
            Ok((stream, _peer)) => {
                // Reap finished connections so the set does not grow forever.
                while connections.try_join_next().is_some() {}
                connections.spawn(handle(stream));
            }
            // Per-connection failures (a peer resetting before accept, a
            // momentary fd shortage) must not end the listener. Not a wait: a
            // pause so a lasting shortage does not spin the loop.
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// A spawned task that is aborted when this guard is dropped, so a fake's
/// sockets never outlive its handle.
pub(crate) struct TaskGuard(JoinHandle<()>);

impl TaskGuard {
    pub(crate) fn spawn<F>(future: F) -> Self
    where
        F: Future<Output = ()> + Send + 'static,
    {
        Self(tokio::spawn(future))
    }

    /// Aborts the task and waits until the runtime has dropped it, which
    /// closes every socket the task owned.
    pub(crate) async fn stop(&mut self) {
        self.0.abort();
        // Cancellation is the expected outcome; a panic inside the fake has
        // already been printed by the runtime.
        let _ = (&mut self.0).await;
    }
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The absolute path of `program` on `PATH`, or an error naming the Debian `package` that
/// provides it. A missing tool must read as missing, not as a failure of the code under test
/// (a bare name run as another user fails with "Permission denied" when `PATH` has
/// directories that user cannot enter).
pub fn find_program(program: &str, package: &str) -> Result<PathBuf, String> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| {
            std::fs::metadata(candidate)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .ok_or_else(|| {
            format!(
                "`{program}` is not installed: it comes with the Debian package `{package}` \
                 (scripts/test installs what the tests need)"
            )
        })
}

/// Sends signal `sig` to process `pid` (that process only, never its group).
pub(crate) fn signal(pid: u32, sig: libc::c_int) -> io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::other("no such pid"))?;
    // SAFETY: kill(2) has no memory-safety preconditions.
    if unsafe { libc::kill(pid, sig) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Locks a fake's state, ignoring poisoning: a panicking test thread must not
/// turn every later request into a second, confusing panic.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A minimal HTTP/1.1 request returning `(status, body)`, or why it failed; it never panics,
/// for programs that must keep running.
pub async fn try_http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    json_body: Option<&str>,
    timeout: Duration,
) -> Result<(u16, String), String> {
    let what = format!("{method} http://{addr}{path}");
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        let mut request =
            format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
        if let Some(body) = json_body {
            request.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            ));
        } else {
            request.push_str("\r\n");
        }
        stream.write_all(request.as_bytes()).await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        Ok::<_, io::Error>(raw)
    };
    let raw = match tokio::time::timeout(timeout, exchange).await {
        Ok(Ok(raw)) => raw,
        Ok(Err(e)) => return Err(format!("{what}: {e}")),
        Err(_) => return Err(format!("{what}: no answer in {timeout:?}")),
    };
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("{what}: not an HTTP response: {head:?}"))?;
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    Ok((
        status,
        if chunked {
            dechunk(body)
        } else {
            body.to_owned()
        },
    ))
}

/// The payload of a `Transfer-Encoding: chunked` body (sizes in hex, each chunk followed by
/// CRLF, a zero-size chunk last).
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}
