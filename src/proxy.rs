//! Client side: listeners, the connection limit, waiting for a leader, connecting with retries,
//! copying bytes both ways, and closing sessions when their route moves.
//!
//! Each session is one task that `select!`s on its copy, its route's generation, its idle timer
//! and process shutdown; nothing scans sessions to kill them.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::check::is_local_shortage;
use crate::config::ProxyConfig;
use crate::copy;
use crate::leader::{Event, Route, Shared, Target};
use crate::metrics as m;
use crate::pgwire;
use crate::preconnect::Preconnect;

/// How long a refused client gets to send its StartupMessage before it is simply closed.
const REFUSAL_DEADLINE: Duration = Duration::from_secs(5);
/// Refusals answered at once; beyond this, excess clients are closed without a message so a
/// flood cannot grow memory.
const MAX_REFUSALS_IN_FLIGHT: usize = 256;
/// Pause between connect attempts to the same leader, cut short by a route change.
const RETRY_PAUSE: Duration = Duration::from_millis(100);
/// Pause after an accept error (EMFILE and friends) so the loop does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// Binds one listening socket. Client listeners on IPv6 are IPv6-only so `0.0.0.0` and `[::]`
/// on the same port can coexist, as in the Fly HAProxy config; the admin port is dual-stack.
pub fn bind(addr: SocketAddr, ipv6_only: bool) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(ipv6_only)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// Everything a session needs, shared by all of them.
pub struct Sessions {
    pub shared: Arc<Shared>,
    pub config: ProxyConfig,
    /// Names the cluster in client error messages.
    pub cluster: String,
    limit: Arc<Semaphore>,
    refusals: Arc<Semaphore>,
    /// Warm connections to the leader, when `proxy.preconnect` > 0.
    pub preconnect: Option<Arc<Preconnect>>,
    /// Stops sessions once the shutdown grace period is over.
    pub hard_stop: CancellationToken,
    pub tracker: TaskTracker,
}

impl Sessions {
    pub fn new(
        shared: Arc<Shared>,
        config: ProxyConfig,
        cluster: String,
        hard_stop: CancellationToken,
        tracker: TaskTracker,
    ) -> Arc<Self> {
        Arc::new(Self {
            limit: Arc::new(Semaphore::new(config.max_connections)),
            refusals: Arc::new(Semaphore::new(MAX_REFUSALS_IN_FLIGHT)),
            preconnect: (config.preconnect > 0).then(|| Preconnect::new(config.preconnect)),
            shared,
            config,
            cluster,
            hard_stop,
            tracker,
        })
    }
}

/// Accepts clients until `stop_accepting` fires.
pub async fn accept_loop(
    listener: TcpListener,
    sessions: Arc<Sessions>,
    stop_accepting: CancellationToken,
) {
    let local = listener.local_addr().ok();
    let reserve = Reserve::open();
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop_accepting.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) if is_local_shortage(&e) && reserve.release() => {
                    // Out of descriptors: the one held in reserve lets this client in to hear
                    // why, instead of waiting unseen in the backlog.
                    if let Ok(stream) = accept_now(&listener) {
                        tracing::warn!(listener = ?local, error = %e, "out of descriptors; refusing client");
                        m::session_result("limit");
                        let message = format!("sorry, too many clients already: roleproxy is out of file descriptors ({e})");
                        let reserve = reserve.clone();
                        tokio::spawn(async move {
                            refuse(stream, pgwire::TOO_MANY_CONNECTIONS, &message).await;
                            // The refused socket is closed: take its descriptor back at once,
                            // before a check or a lookup can.
                            reserve.refill();
                        });
                    } else {
                        reserve.refill();
                    }
                    continue;
                }
                Err(e) => {
                    tracing::warn!(listener = ?local, error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    reserve.refill();
                    continue;
                }
            },
        };
        tune(&stream);
        let span = tracing::info_span!("session", client = %peer, listener = ?local);
        match Arc::clone(&sessions.limit).try_acquire_owned() {
            Ok(permit) => {
                let sessions2 = Arc::clone(&sessions);
                sessions.tracker.spawn(
                    async move {
                        serve_client(stream, &sessions2).await;
                        drop(permit);
                    }
                    .instrument(span),
                );
            }
            Err(_) => {
                m::session_result("limit");
                let Ok(slot) = Arc::clone(&sessions.refusals).try_acquire_owned() else {
                    continue; // dropping the stream closes it
                };
                let message = format!(
                    "sorry, too many clients already: roleproxy for {} has max_connections = {} sessions open",
                    sessions.cluster, sessions.config.max_connections
                );
                tokio::spawn(
                    async move {
                        tracing::warn!("connection limit reached; refusing client");
                        refuse(stream, pgwire::TOO_MANY_CONNECTIONS, &message).await;
                        drop(slot);
                    }
                    .instrument(span),
                );
            }
        }
    }
}

/// Accepts a pending connection at once, with no await between: right after the reserve is
/// released, any yield could let a check or a lookup take the descriptor first.
fn accept_now(listener: &TcpListener) -> io::Result<TcpStream> {
    use std::os::fd::{AsRawFd, FromRawFd};
    // SAFETY: accept4 on the listener's open descriptor, with null address pointers (allowed).
    let fd = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: accept4 returned a new descriptor that nothing else owns.
    let stream = unsafe { std::net::TcpStream::from_raw_fd(fd) };
    TcpStream::from_std(stream)
}

/// One descriptor kept in reserve, released when accept fails for want of descriptors, so
/// the client can be told why; shared with the refusal that uses it.
#[derive(Clone)]
struct Reserve(Arc<std::sync::Mutex<Option<std::fs::File>>>);

impl Reserve {
    fn open() -> Reserve {
        let reserve = Reserve(Arc::new(std::sync::Mutex::new(None)));
        reserve.refill();
        reserve
    }

    /// Takes a descriptor into reserve if none is held (and one is free).
    fn refill(&self) {
        if let Ok(mut slot) = self.0.lock() {
            if slot.is_none() {
                *slot = std::fs::File::open("/dev/null").ok();
            }
        }
    }

    /// Closes the reserved descriptor; false if there was none to close.
    fn release(&self) -> bool {
        self.0
            .lock()
            .map(|mut slot| slot.take().is_some())
            .unwrap_or(false)
    }
}

fn tune(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
    let keepalive = TcpKeepalive::new()
        .with_time(Duration::from_secs(60))
        .with_interval(Duration::from_secs(10));
    let _ = SockRef::from(stream).set_tcp_keepalive(&keepalive);
}

async fn refuse(mut stream: TcpStream, code: &str, message: &str) {
    match pgwire::refuse(&mut stream, code, message, REFUSAL_DEADLINE).await {
        Ok(packet) => tracing::debug!(?packet, code, message, "client refused"),
        Err(e) => {
            tracing::debug!(error = %e, code, message, "client refused before a startup packet")
        }
    }
}

/// Why a client could not be given a leader.
#[derive(Debug, thiserror::Error)]
enum NoLeader {
    #[error("{0}")]
    NoRoute(String),
    #[error("leader {0} is in maintenance or left DNS")]
    Held(SocketAddr),
    #[error("leader {addr} unreachable: {error}")]
    Unreachable { addr: SocketAddr, error: String },
    #[error("proxy is shutting down")]
    Shutdown,
    /// This host, not the leader, is out of descriptors or memory.
    #[error("roleproxy is out of resources: {0}")]
    OutOfResources(String),
}

async fn serve_client(client: TcpStream, sessions: &Sessions) {
    let accepted = Instant::now();
    let mut route = sessions.shared.route.clone();
    let connected = tokio::select! {
        _ = sessions.hard_stop.cancelled() => Err(NoLeader::Shutdown),
        c = connect_leader(&mut route, sessions, accepted) => c,
    };
    let (backend, addr, generation) = match connected {
        Ok(found) => found,
        Err(reason) => {
            m::leader_wait(accepted.elapsed());
            let (result, code, message) = match &reason {
                NoLeader::OutOfResources(_) => (
                    "limit",
                    pgwire::TOO_MANY_CONNECTIONS,
                    format!("sorry, too many clients already: {reason}"),
                ),
                NoLeader::Unreachable { .. } => (
                    "unreachable",
                    pgwire::CANNOT_CONNECT_NOW,
                    format!("no leader available for {}: {reason}", sessions.cluster),
                ),
                NoLeader::Shutdown => (
                    "shutdown",
                    pgwire::CANNOT_CONNECT_NOW,
                    format!("no leader available for {}: {reason}", sessions.cluster),
                ),
                _ => (
                    "no_leader",
                    pgwire::CANNOT_CONNECT_NOW,
                    format!("no leader available for {}: {reason}", sessions.cluster),
                ),
            };
            m::session_result(result);
            tracing::warn!(waited = ?accepted.elapsed(), reason = %reason, "client refused");
            refuse(client, code, &message).await;
            return;
        }
    };
    m::leader_wait(accepted.elapsed());
    tune(&backend);
    let _counted = sessions.shared.session_guard(addr);
    m::session_started();
    tracing::debug!(backend = %addr, generation, "session started");
    let (result, up, down) = splice(client, backend, &mut route, generation, sessions).await;
    tracing::debug!(backend = %addr, result, bytes_up = up, bytes_down = down, "session ended");
    m::session_ended(result, up, down);
}

/// Waits for a route with a leader and connects to it. Connect failures are reported to the
/// leader view (which counts them against the leader and re-checks every backend) and retried;
/// once `connect_retries` are spent on one leader, the client waits for the route to move,
/// within `leader_wait`.
async fn connect_leader(
    route: &mut watch::Receiver<Route>,
    sessions: &Sessions,
    accepted: Instant,
) -> Result<(TcpStream, SocketAddr, u64), NoLeader> {
    let config = &sessions.config;
    let deadline = accepted + config.leader_wait;
    let mut failures = 0u32;
    let mut failed_generation = None;
    let mut last_error: Option<(SocketAddr, String)> = None;
    loop {
        let waited = tokio::time::timeout_at(deadline, route.wait_for(|r| r.leader().is_some()))
            .await
            .map(|found| found.map(|r| r.leader().map(|addr| (addr, r.generation))));
        let (addr, generation) = match waited {
            Ok(Ok(Some(found))) => found,
            Ok(Ok(None)) => continue,
            Ok(Err(_)) => return Err(NoLeader::Shutdown),
            Err(_) => return Err(no_leader_reason(&route.borrow(), last_error)),
        };
        if failed_generation != Some(generation) {
            failures = 0;
        }
        if let Some(warm) = sessions
            .preconnect
            .as_ref()
            .and_then(|p| p.take(generation, addr))
        {
            return Ok((warm, addr, generation));
        }
        if Instant::now() >= deadline {
            return Err(no_leader_reason(&route.borrow(), last_error));
        }
        // A connect that outlives its route, or the client's patience, is abandoned.
        let full_attempt = Instant::now() + config.connect_timeout;
        let attempt_deadline = full_attempt.min(deadline);
        let attempt = tokio::select! {
            a = tokio::time::timeout_at(attempt_deadline, TcpStream::connect(addr)) => a,
            _ = route.wait_for(|r| r.generation != generation) => continue,
        };
        let error = match attempt {
            // The route may have moved while the handshake completed: never start a session
            // on a leader the route has already left.
            Ok(Ok(stream)) if route.borrow().generation == generation => {
                return Ok((stream, addr, generation))
            }
            Ok(Ok(_)) => continue,
            // Waiting will not help a client while this host has no descriptors to give.
            Ok(Err(e)) if is_local_shortage(&e) => {
                return Err(NoLeader::OutOfResources(e.to_string()))
            }
            Ok(Err(e)) => {
                let remote = matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionRefused
                        | io::ErrorKind::ConnectionReset
                        | io::ErrorKind::HostUnreachable
                        | io::ErrorKind::NetworkUnreachable
                        | io::ErrorKind::TimedOut
                );
                (e.to_string(), remote)
            }
            // Cut short by the client's own deadline: that says nothing about the leader.
            Err(_) if attempt_deadline < full_attempt => {
                return Err(no_leader_reason(&route.borrow(), last_error))
            }
            Err(_) => (
                format!("connect timed out after {:?}", config.connect_timeout),
                true,
            ),
        };
        let (error, remote) = error;
        tracing::warn!(backend = %addr, %error, "connect to leader failed");
        m::connect_failed(addr);
        // Local failures (no descriptors, no memory) say nothing about the leader.
        if remote {
            let _ = sessions.shared.events.try_send(Event::ConnectFailed {
                addr,
                error: error.clone(),
            });
        }
        last_error = Some((addr, error));
        failures += 1;
        failed_generation = Some(generation);
        // Once this leader's retries are spent, only a new route helps.
        let pause_until = if failures > config.connect_retries {
            deadline
        } else {
            Instant::now() + RETRY_PAUSE
        };
        let moved = tokio::time::timeout_at(
            pause_until.min(deadline),
            route.wait_for(|r| r.generation != generation),
        )
        .await
        .is_ok();
        if !moved && Instant::now() >= deadline {
            return Err(no_leader_reason(&route.borrow(), last_error));
        }
    }
}

fn no_leader_reason(route: &Route, last_error: Option<(SocketAddr, String)>) -> NoLeader {
    match (&route.target, last_error) {
        (Target::Leader(addr), Some((failed, error))) if *addr == failed => NoLeader::Unreachable {
            addr: failed,
            error,
        },
        (Target::Leader(addr), _) => NoLeader::Unreachable {
            addr: *addr,
            error: "no attempt succeeded in time".into(),
        },
        (Target::Held(addr), _) => NoLeader::Held(*addr),
        (Target::None(reason), _) => NoLeader::NoRoute(reason.to_string()),
    }
}

/// Copies both ways until both sides are done, the route moves, the session idles out, or the
/// process stops. Returns the result label and bytes copied (client→backend, backend→client).
async fn splice(
    client: TcpStream,
    backend: TcpStream,
    route: &mut watch::Receiver<Route>,
    generation: u64,
    sessions: &Sessions,
) -> (&'static str, u64, u64) {
    let activity = copy::Activity::new();
    let sockets = copy::Socket::new(client).and_then(|c| Ok((c, copy::Socket::new(backend)?)));
    let (client, backend) = match sockets {
        Ok(pair) => pair,
        Err(e) => {
            tracing::warn!(error = %e, "cannot register session sockets");
            return ("error", 0, 0);
        }
    };
    let idle_timeout = sessions.config.idle_timeout;
    let idle = async {
        loop {
            let due = activity.last() + idle_timeout;
            if Instant::now() >= due {
                return;
            }
            tokio::time::sleep_until(due).await;
        }
    };
    let result = tokio::select! {
        copied = copy::bidirectional(&client, &backend, sessions.config.copy, &activity) => match copied {
            Ok(()) => "closed",
            Err(e) => {
                tracing::debug!(error = %e, "session ended with an error");
                "error"
            }
        },
        _ = route.wait_for(|r| r.generation != generation) => {
            tracing::info!(generation, "route moved; closing session");
            "drained"
        }
        _ = idle => {
            tracing::info!(?idle_timeout, "idle timeout; closing session");
            "idle_timeout"
        }
        _ = sessions.hard_stop.cancelled() => "shutdown",
    };
    (
        result,
        activity.up.load(Ordering::Relaxed),
        activity.down.load(Ordering::Relaxed),
    )
}
