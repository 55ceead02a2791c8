//! Client side: listeners, the connection limit, waiting for a leader, connecting with retries,
//! copying bytes both ways, and closing sessions when their route moves.
//!
//! A backend is connected only once the client has sent its first packet (clients speak
//! first), which is then forwarded ahead of everything else.
//!
//! Each session is one task that `select!`s on its copy (which also ends half-open sessions),
//! its route's generation, its idle timer and process shutdown; nothing scans sessions to kill
//! them.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use roleproxy_core::framing::{BackendKey, Framing};
use roleproxy_core::pgwire;
use roleproxy_core::route::{
    admitted_leader, leader_session_fate, open_replicas, replica_session_fate, Fate, Hold, Route,
    Target,
};

use crate::access::{self, Ended, Opened};
use crate::cancel::{CancelKeys, KeyRecorder};
use crate::config::{Endpoint, ProxyConfig, Serves, Switchover};
use crate::copy;
use crate::discovery::HostResolver;
use crate::metrics::{self as m, warning};
use crate::operator::{Operator, OperatorState};
use crate::own_addresses::OwnAddrs;
use crate::pgwire_io;
use crate::preconnect::Preconnect;
use crate::reserve::{self, Reserve};
use crate::startup::{Attempt, Started, Startup};
use crate::view::{BackendSet, Event, SessionGuard, ViewHandle};
use roleproxy_common::ratelimit;

/// How long a refused client gets to send its StartupMessage before it is simply closed.
const REFUSAL_DEADLINE: Duration = Duration::from_secs(5);
/// Refusals answered at once; beyond this, excess clients are closed without a message so a
/// flood cannot grow memory.
const MAX_REFUSALS_IN_FLIGHT: usize = 256;
/// Pause before a backend that failed is tried again; a leader's is cut short by a route change.
const RETRY_PAUSE: Duration = Duration::from_millis(100);
/// Pause after an accept error (EMFILE and friends) so the loop does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);
/// How long a session ended between transactions waits for its client to close after the
/// FATAL, so the close does not reset the connection before the client has read it.
const GOODBYE_WAIT: Duration = Duration::from_secs(1);
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

/// What to do when binding `addr` failed with `error`: a port below 1024 needs root or
/// `CAP_NET_BIND_SERVICE`, and "Permission denied" alone does not say so. Empty otherwise. Pure.
pub fn bind_hint(addr: SocketAddr, error: &io::Error) -> &'static str {
    if error.kind() == io::ErrorKind::PermissionDenied && addr.port() < 1024 {
        "; ports below 1024 need CAP_NET_BIND_SERVICE: `setcap cap_net_bind_service=+ep` on the \
         binary, or AmbientCapabilities=CAP_NET_BIND_SERVICE in its systemd unit"
    } else {
        ""
    }
}

/// What the sessions started under one configuration share: its `[proxy]` settings and cluster
/// name, and the process-wide parts they use. A reload makes a new one; a session keeps the one
/// it started with.
pub struct SessionSettings {
    pub config: ProxyConfig,
    /// Names the cluster in client error messages.
    pub cluster: String,
    /// Warm connections to the leader, when `proxy.preconnect` > 0.
    pub preconnect: Option<Arc<Preconnect>>,
    pub base: SessionBase,
    refusals: Arc<Semaphore>,
    /// Rotates ties between equally loaded replicas.
    turn: std::sync::atomic::AtomicUsize,
}

impl SessionSettings {
    pub fn new(
        base: SessionBase,
        config: ProxyConfig,
        cluster: String,
        preconnect: Option<Arc<Preconnect>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            refusals: Arc::new(Semaphore::new(MAX_REFUSALS_IN_FLIGHT)),
            preconnect,
            base,
            config,
            cluster,
            turn: Default::default(),
        })
    }
}

/// What every generation of [`SessionSettings`] is built on, kept across reloads.
#[derive(Clone)]
pub struct SessionBase {
    /// The route and the backend set sessions follow; connect failures are reported here.
    pub view: ViewHandle,
    /// The proxy's own addresses, which no session connects to.
    pub own: Arc<OwnAddrs>,
    /// Counts sessions against `max_connections`, whichever configuration they started under.
    pub limit: Arc<SessionLimit>,
    /// The descriptor held back for refusals; shared by every listener and backend connect.
    pub reserve: Arc<Reserve>,
    /// Each plaintext replica session's cancel key and backend, kept across reloads: a
    /// session started under an older configuration can still be cancelled.
    pub cancel_keys: Arc<CancelKeys>,
    /// Stops sessions once the shutdown grace period is over.
    pub hard_stop: CancellationToken,
    pub tracker: TaskTracker,
    /// The pause and each backend's drain or maintenance, kept across reloads.
    pub operator: Arc<Operator>,
}

/// `proxy.max_connections`: one atomic count of open sessions, so admitting a session and
/// ending it take no lock (a semaphore's permit takes its waiters' lock as it is dropped).
/// Nothing waits for a place: a client over the limit is refused at once.
#[derive(Debug)]
pub struct SessionLimit {
    open: AtomicUsize,
    max: AtomicUsize,
}

impl SessionLimit {
    pub fn new(max: usize) -> Arc<SessionLimit> {
        Arc::new(SessionLimit {
            open: AtomicUsize::new(0),
            max: AtomicUsize::new(max),
        })
    }

    /// A place for one more session, held until the [`Admitted`] is dropped; `None` at the limit.
    pub fn try_admit(self: &Arc<Self>) -> Option<Admitted> {
        let max = self.max.load(Ordering::Relaxed);
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
                (open < max).then_some(open + 1)
            })
            .ok()?;
        Some(Admitted(Arc::clone(self)))
    }

    /// A reload's new limit. Open sessions are not closed for it: a lower limit is reached as
    /// they end.
    pub fn set_max(&self, max: usize) {
        self.max.store(max, Ordering::Relaxed);
    }
}

/// One session's place under `max_connections`.
pub struct Admitted(Arc<SessionLimit>);

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What one listener does with its clients. A reload sends a new plan; sessions keep the plan
/// they started with.
pub struct ListenerPlan {
    /// Names the listener in logs and metric labels (shared, so labelling a session does not
    /// allocate).
    pub name: Arc<str>,
    pub serves: Serves,
    /// Resolves a fixed target given by name (`None` for any other listener, or when no
    /// resolver could be built).
    pub resolver: Option<Arc<HostResolver>>,
    pub settings: Arc<SessionSettings>,
}

/// Accepts clients until `stop_accepting` fires.
pub async fn accept_loop(
    listener: TcpListener,
    plan: watch::Receiver<Arc<ListenerPlan>>,
    stop_accepting: CancellationToken,
) {
    // For log lines: the bound address, as people read it.
    let local: Arc<str> = listener
        .local_addr()
        .map_or_else(|e| e.to_string(), |a| a.to_string())
        .into();
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop_accepting.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) if reserve::is_local_shortage(&e) => {
                    let plan = Arc::clone(&plan.borrow());
                    out_of_descriptors(&listener, &local, e, &plan).await;
                    continue;
                }
                Err(e) => {
                    tracing::warn!(listener = %local, error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
        };
        tune(&stream);
        let opened = Opened::now(peer, Arc::clone(&local));
        let plan = Arc::clone(&plan.borrow());
        let settings = &plan.settings;
        let span = tracing::info_span!("session", client = %peer, listener = %plan.name);
        match settings.base.limit.try_admit() {
            Some(permit) => {
                let plan = Arc::clone(&plan);
                settings
                    .base
                    .tracker
                    .spawn(serve_client(stream, plan, permit, opened).instrument(span));
            }
            None => {
                unserved(&plan, &opened, "limit");
                let Ok(slot) = Arc::clone(&settings.refusals).try_acquire_owned() else {
                    continue; // dropping the stream closes it
                };
                let message = format!(
                    "sorry, too many clients already: roleproxy for {} has max_connections = {} sessions open",
                    settings.cluster, settings.config.max_connections
                );
                settings.base.tracker.spawn(
                    async move {
                        if let Some(suppressed) = ratelimit::allow(warning::CLIENT_REFUSED, "limit")
                        {
                            tracing::warn!(suppressed, "connection limit reached; refusing client");
                        }
                        let mut stream = stream;
                        refuse(&mut stream, pgwire::TOO_MANY_CONNECTIONS, &message).await;
                        drop(slot);
                    }
                    .instrument(span),
                );
            }
        }
    }
}

/// Accept failed for want of a descriptor. A waiting client gets the reserved one, to be told
/// why; with nobody waiting, the loop pauses, since the listener stays "ready" while every
/// accept fails and a spinning loop would give the reserve up and take it back endlessly,
/// leaving it free for a connect to take for good.
async fn out_of_descriptors(
    listener: &TcpListener,
    local: &Arc<str>,
    error: io::Error,
    plan: &ListenerPlan,
) {
    let reserve = &plan.settings.base.reserve;
    if reserve::client_waiting(listener) {
        match reserve.accept(listener) {
            Some(Ok(stream)) => {
                if let Some(suppressed) = ratelimit::allow(warning::CLIENT_REFUSED, "descriptors") {
                    tracing::warn!(listener = %local, %error, suppressed, "out of descriptors; refusing client");
                }
                match stream.peer_addr() {
                    Ok(peer) => unserved(plan, &Opened::now(peer, Arc::clone(local)), "limit"),
                    Err(_) => m::session_result(&plan.name, "limit"),
                }
                let message = format!("sorry, too many clients already: roleproxy is out of file descriptors ({error})");
                let reserve = Arc::clone(reserve);
                // Tracked like the sessions, so shutdown waits for the refusal too.
                plan.settings.base.tracker.spawn(async move {
                    let mut stream = stream;
                    refuse(&mut stream, pgwire::TOO_MANY_CONNECTIONS, &message).await;
                    // Closed first, so its descriptor is the one taken back.
                    drop(stream);
                    reserve.refill();
                });
                return;
            }
            Some(Err(e)) => {
                tracing::warn!(listener = %local, error = %e, "out of descriptors; accepting with the reserved one failed")
            }
            None => {
                tracing::warn!(listener = %local, %error, "out of descriptors, none in reserve; the client waits")
            }
        }
    }
    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
    reserve.refill();
}

fn tune(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
    let keepalive = TcpKeepalive::new()
        .with_time(Duration::from_secs(60))
        .with_interval(Duration::from_secs(10));
    let _ = SockRef::from(stream).set_tcp_keepalive(&keepalive);
}

async fn refuse<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S, code: &str, message: &str) {
    match pgwire_io::refuse(stream, code, message, REFUSAL_DEADLINE).await {
        Ok(packet) => {
            tracing::debug!(packet = %packet.describe(), code, message, "client refused")
        }
        Err(e) => {
            tracing::debug!(error = %e, code, message, "client refused before a startup packet")
        }
    }
}

/// Why a client could not be given a backend.
#[derive(Debug, thiserror::Error)]
enum Unserved {
    #[error("{0}")]
    NoRoute(String),
    #[error("leader {0} {1}")]
    Held(SocketAddr, Hold),
    #[error("another node claims leader besides {0}; waiting for the claim to lapse or hold")]
    Contested(SocketAddr),
    #[error("leader {addr} unreachable: {error}")]
    Unreachable { addr: SocketAddr, error: String },
    #[error("no node checks as replica{0}")]
    NoReplica(String),
    #[error("{addr} unreachable: {error}")]
    BackendUnreachable { addr: SocketAddr, error: String },
    /// A fixed target given by name that does not resolve.
    #[error("cannot resolve {target}: {error}")]
    Unresolved { target: String, error: String },
    #[error("proxy is shutting down")]
    Shutdown,
    /// The route channel closed: the leader view ended, and the process is stopping.
    #[error("roleproxy is stopping: internal task ended")]
    Stopping,
    /// Replayed on a new leader, the client's SSLRequest or GSSENCRequest got another answer
    /// than the `N` the client was given: it must start over.
    #[error("the new leader {0} answered the client's encryption request differently from the leader that failed; reconnect")]
    Unreplayable(SocketAddr),
    /// The client left during its startup, or went silent.
    #[error("{0}")]
    Client(Silent),
    /// This host, not the leader, is out of descriptors or memory.
    #[error("roleproxy is out of resources: {0}")]
    OutOfResources(String),
    /// The backend is one of the proxy's own listening addresses (it became local after
    /// discovery last looked): connecting would bring the client back in, again and again.
    #[error(
        "{addr} is this proxy's own listening address ({listener}); refusing to connect to itself"
    )]
    Loop {
        addr: SocketAddr,
        listener: SocketAddr,
    },
}

impl SessionSettings {
    /// The last line of defence against a loop: refuses an address the proxy listens on.
    fn refuse_loop(&self, addr: SocketAddr) -> Result<(), Unserved> {
        match self.base.own.covering(addr) {
            Some(listener) => {
                tracing::error!(backend = %addr, %listener, "backend is this proxy's own listener; refusing to connect to itself");
                Err(Unserved::Loop { addr, listener })
            }
            None => Ok(()),
        }
    }
}

/// A connected backend, and what ends its session besides the client.
struct Connected {
    stream: TcpStream,
    addr: SocketAddr,
    /// Closes the session when the node stops being what this listener serves.
    drain: Drain,
    /// Counts the session against its backend.
    _counted: SessionGuard,
}

#[derive(Debug, Clone, Copy)]
enum Drain {
    /// The route moved off this generation.
    Route(u64),
    /// The node left the replica set (down, promoted, or gone from DNS).
    Replica,
    /// A fixed target is not checked; only the client, idling or shutdown ends it.
    Never,
}

/// Waits for the client's first packet, connects it to what its listener serves, then hands
/// the session to a task of its own; `permit` counts it against `max_connections` until it
/// ends.
async fn serve_client(
    mut client: TcpStream,
    plan: Arc<ListenerPlan>,
    permit: Admitted,
    opened: Opened,
) {
    let settings = &plan.settings;
    // Clients speak first (rule 8): Postgres forks a process for every connection it accepts,
    // so a client that says nothing must never cost the leader one.
    let first = tokio::select! {
        _ = settings.base.hard_stop.cancelled() => Err(Silent::Shutdown),
        read = tokio::time::timeout(
            settings.config.silent_timeout,
            pgwire_io::read_first_packet(&mut client),
        ) => match read {
            Ok(Ok(packet)) => Ok(packet),
            Ok(Err(e)) => Err(Silent::Gone(e)),
            Err(_) => Err(Silent::Timeout),
        },
    };
    let first = match first {
        Ok(packet) => packet,
        Err(silent) => {
            tracing::debug!(reason = %silent, "client closed before its first packet");
            unserved(&plan, &opened, silent.result());
            return;
        }
    };
    if let (&Serves::Replica { fallback_to_leader }, true) =
        (&plan.serves, pgwire::is_cancel_request(&first))
    {
        cancel(&first, fallback_to_leader, settings).await;
        unserved(&plan, &opened, "closed");
        return;
    }
    // Waiting for a leader counts from the client's request, not from its connect.
    let accepted = Instant::now();
    let mut route = settings.base.view.route.clone();
    let mut backends = settings.base.view.backends.clone();
    let mut startup = Startup::new(first);
    let follow = settings.config.switchover == Switchover::Transaction;
    let connecting = async {
        let pick = match &plan.serves {
            Serves::Leader => {
                return start_on_leader(
                    &mut client,
                    &mut startup,
                    &mut route,
                    settings,
                    accepted,
                    follow,
                )
                .await
            }
            &Serves::Replica { fallback_to_leader } => Pick::Replica {
                backends: &mut backends,
                operator: settings.base.operator.subscribe(),
                fallback_to_leader,
                failed: Vec::new(),
            },
            Serves::Target(target) => {
                Pick::Target(resolve_target(target, plan.resolver.as_deref()).await?)
            }
        };
        let mut connected = Connects::new(settings, &mut route, accepted, pick)
            .connect()
            .await?;
        // Sessions routed to a leader or a replica are followed, so a pause or a drain can
        // end them between transactions; a replica listener's always through their startup,
        // for the cancel key.
        let framing = match connected.drain {
            Drain::Route(_) | Drain::Replica if follow => Some(Framing::new()),
            _ if matches!(plan.serves, Serves::Replica { .. }) => Some(Framing::startup_only()),
            _ => None,
        };
        match startup.forward(&mut connected.stream, framing).await {
            Ok(started) => Ok((connected, started)),
            Err(e) => Err(Unserved::BackendUnreachable {
                addr: connected.addr,
                error: format!("closed before the client's first packet: {e}"),
            }),
        }
    };
    let connected = tokio::select! {
        _ = settings.base.hard_stop.cancelled() => Err(Unserved::Shutdown),
        c = connecting => c,
    };
    m::backend_wait(accepted.elapsed());
    match connected {
        // Its own function, so an open session's task holds only what copying needs, not
        // what connecting or refusing needed (idle sessions are most sessions).
        Ok((
            Connected {
                stream,
                addr,
                drain,
                _counted,
            },
            started,
        )) => {
            let drainer = Drainer {
                drain,
                route,
                backends,
                operator: settings.base.operator.subscribe(),
                addr,
            };
            let keys = matches!(plan.serves, Serves::Replica { .. })
                .then(|| KeyRecorder::new(Arc::clone(&settings.base.cancel_keys), addr));
            // A task of its own, so what connecting took is freed and an open session holds
            // only what copying needs: idle sessions are most sessions, and this is their memory.
            let session = run_session(
                client,
                stream,
                (started, keys),
                drainer,
                (_counted, permit),
                Arc::clone(&plan),
                opened,
            );
            settings
                .base
                .tracker
                .spawn(session.instrument(tracing::Span::current()));
        }
        Err(Unserved::Client(silent)) => {
            tracing::debug!(reason = %silent, "client left during its startup");
            unserved(&plan, &opened, silent.result());
        }
        Err(reason) => {
            let first = startup.unanswered();
            refuse_client(client, &first, reason, (accepted, &opened), &plan).await
        }
    }
}

/// Connects a leader listener's client and runs its startup there (rule 11). A leader that
/// closes, resets or answers 57P03 before answering it is reported to the view, which probes
/// it at once (the failure itself is no evidence), and the client's held packets go to the
/// next leader, within `leader_wait`: the client never meets a dying leader. So does a
/// startup the route leaves behind.
async fn start_on_leader(
    client: &mut TcpStream,
    startup: &mut Startup,
    route: &mut watch::Receiver<Route>,
    settings: &SessionSettings,
    accepted: Instant,
    follow: bool,
) -> Result<(Connected, Started), Unserved> {
    let mut connects = Connects::new(settings, route, accepted, Pick::Leader);
    loop {
        let mut connected = connects.connect().await?;
        let addr = connected.addr;
        let attempt = startup
            .attempt(
                client,
                &mut connected.stream,
                route_left(
                    connects.route.clone(),
                    settings.base.operator.subscribe(),
                    addr,
                    connects.generation,
                ),
                connects.deadline,
                settings.config.silent_timeout,
                follow,
            )
            .await;
        let failed = match attempt {
            Attempt::Started(started) => return Ok((connected, started)),
            Attempt::Abandoned => {
                tracing::info!(backend = %addr, "the route left the leader before it answered the client's startup; trying the next route");
                continue;
            }
            Attempt::Unreplayable => return Err(Unserved::Unreplayable(addr)),
            Attempt::ClientGone(e) if e.kind() == io::ErrorKind::TimedOut => {
                return Err(Unserved::Client(Silent::Timeout))
            }
            Attempt::ClientGone(e) => return Err(Unserved::Client(Silent::Gone(e))),
            Attempt::Failed(failed) => failed,
        };
        drop(connected);
        let error = failed.to_string();
        if let Some(suppressed) =
            ratelimit::allow(warning::CONNECT_FAILED, format_args!("startup {addr}"))
        {
            tracing::warn!(backend = %addr, %error, suppressed, "leader failed the client's startup; holding it for the next leader");
        }
        m::startup_retried(failed.label());
        let _ = settings.base.view.events.try_send(Event::StartupFailed {
            addr,
            error: error.clone(),
        });
        connects.failed(addr, error).await?;
    }
}

/// Why a client was closed before it sent its first packet.
#[derive(Debug, thiserror::Error)]
enum Silent {
    #[error("silent for proxy.silent_timeout")]
    Timeout,
    #[error("{0}")]
    Gone(io::Error),
    #[error("proxy is shutting down")]
    Shutdown,
}

impl Silent {
    fn result(&self) -> &'static str {
        match self {
            Silent::Timeout => "silent",
            Silent::Gone(e) if e.kind() == io::ErrorKind::UnexpectedEof => "closed",
            Silent::Gone(_) => "error",
            Silent::Shutdown => "shutdown",
        }
    }
}

/// Tells a client that could not be given a backend why, as a Postgres error; `first` is
/// the packet already read from it.
async fn refuse_client(
    mut client: TcpStream,
    first: &[u8],
    reason: Unserved,
    (accepted, opened): (Instant, &Opened),
    plan: &ListenerPlan,
) {
    let settings = &plan.settings;
    let (result, code) = match &reason {
        Unserved::OutOfResources(_) => ("limit", pgwire::TOO_MANY_CONNECTIONS),
        Unserved::Unreachable { .. }
        | Unserved::BackendUnreachable { .. }
        | Unserved::Unresolved { .. }
        | Unserved::Unreplayable(_) => ("unreachable", pgwire::CANNOT_CONNECT_NOW),
        Unserved::Shutdown | Unserved::Stopping => ("shutdown", pgwire::CANNOT_CONNECT_NOW),
        Unserved::Loop { .. } => ("loop", pgwire::CANNOT_CONNECT_NOW),
        _ => ("no_leader", pgwire::CANNOT_CONNECT_NOW),
    };
    let message = match (&reason, &plan.serves) {
        (Unserved::OutOfResources(_), _) => {
            format!("sorry, too many clients already: {reason}")
        }
        (_, Serves::Leader) => {
            format!("no leader available for {}: {reason}", settings.cluster)
        }
        (_, Serves::Replica { .. }) => {
            format!("no replica available for {}: {reason}", settings.cluster)
        }
        (_, Serves::Target(_)) => format!("cannot connect to {}: {reason}", plan.name),
    };
    unserved(plan, opened, result);
    if let Some(suppressed) = ratelimit::allow(warning::CLIENT_REFUSED, &plan.name) {
        tracing::warn!(waited_s = accepted.elapsed().as_secs_f64(), reason = %reason, suppressed, "client refused");
    }
    refuse(
        &mut pgwire_io::Prefixed::new(first, &mut client),
        code,
        &message,
    )
    .await;
    if let Unserved::OutOfResources(_) = reason {
        // Its descriptor goes back into reserve, if the reserve was what it lacked.
        drop(client);
        settings.base.reserve.refill();
    }
}

/// What ends a session besides its client: its node no longer being what the listener serves,
/// a pause, or its backend's drain.
struct Drainer {
    drain: Drain,
    route: watch::Receiver<Route>,
    backends: watch::Receiver<BackendSet>,
    operator: watch::Receiver<OperatorState>,
    addr: SocketAddr,
}

/// Why a session ends at its next transaction boundary: what it is told, and how long it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// Its leader stepped down while alive (rule 9): within `proxy.switchover_grace`.
    SteppedDown,
    /// The proxy is paused: within `proxy.pause_grace`, then cut and counted.
    Paused,
    /// Its replica is drained: as long as its transaction takes.
    Drained,
}

impl Ending {
    fn grace(self, config: &ProxyConfig) -> Option<Duration> {
        match self {
            Ending::SteppedDown => Some(config.switchover_grace),
            Ending::Paused => Some(config.pause_grace),
            Ending::Drained => None,
        }
    }

    fn farewell(self) -> &'static str {
        match self {
            Ending::SteppedDown => STEPPED_DOWN,
            Ending::Paused => PAUSED,
            Ending::Drained => DRAINED,
        }
    }
}

impl Drainer {
    /// The session's fate now, by the pure rules.
    fn fate(&self) -> Fate {
        let addr = self.addr;
        match self.drain {
            Drain::Route(generation) => leader_session_fate(
                &self.route.borrow(),
                generation,
                addr,
                self.operator.borrow().paused(),
            ),
            Drain::Replica => replica_session_fate(
                self.backends.borrow().replicas.contains(&addr),
                self.operator.borrow().mode(addr),
            ),
            Drain::Never => Fate::Stay,
        }
    }

    /// Why a session told to end at its boundary ends.
    fn ending(&self) -> Ending {
        match self.drain {
            Drain::Route(_) if self.operator.borrow().paused() => Ending::Paused,
            Drain::Route(_) | Drain::Never => Ending::SteppedDown,
            Drain::Replica => Ending::Drained,
        }
    }

    /// Waits until the session's fate differs from `now`, and returns it: the route holds again
    /// ([`Fate::Stay`]), contests its leader ([`Fate::Hold`]), ends it at its next transaction
    /// boundary ([`Fate::EndTransaction`]: a step-down, a pause, a drain) or at once
    /// ([`Fate::Close`]).
    async fn next_fate(&mut self, now: Fate) -> Fate {
        if let Drain::Never = self.drain {
            return std::future::pending().await;
        }
        let fate = loop {
            let fate = self.fate();
            if fate != now {
                break fate;
            }
            // A closed channel means the view or the process is stopping.
            let changed = tokio::select! {
                c = self.route.changed() => c,
                c = self.backends.changed() => c,
                c = self.operator.changed() => c,
            };
            if changed.is_err() {
                break Fate::Close;
            }
        };
        let addr = self.addr;
        match (self.drain, fate) {
            (Drain::Route(generation), Fate::Stay) => tracing::info!(
                generation,
                "the route holds again and the proxy is not paused; the session resumes"
            ),
            (Drain::Route(generation), Fate::Hold) => tracing::info!(
                generation,
                "another node claims leader; pausing the session at its next transaction boundary"
            ),
            (Drain::Route(generation), Fate::EndTransaction) if self.ending() == Ending::Paused => {
                tracing::info!(
                    generation,
                    "paused; ending the session at its next transaction boundary"
                )
            }
            (Drain::Route(generation), Fate::EndTransaction) => tracing::info!(
                generation,
                "leader stepped down; ending the session at its next transaction boundary"
            ),
            (Drain::Route(generation), Fate::Close) => {
                tracing::info!(generation, "route moved; closing session")
            }
            (_, Fate::Stay) => {
                tracing::info!(backend = %addr, "backend ready again; the session carries on")
            }
            (_, Fate::EndTransaction) => {
                tracing::info!(backend = %addr, "backend drained; ending the session at its next transaction boundary")
            }
            (_, Fate::Close) => {
                tracing::info!(backend = %addr, "no longer a replica; closing session")
            }
            (_, Fate::Hold) => {}
        }
        fate
    }
}

/// Copies a connected session until it ends. `_counted` holds its place in the backend's
/// session count and in `max_connections` until then.
async fn run_session(
    client: TcpStream,
    backend: TcpStream,
    (started, keys): (Started, Option<KeyRecorder>),
    mut drainer: Drainer,
    _counted: (SessionGuard, Admitted),
    plan: Arc<ListenerPlan>,
    opened: Opened,
) {
    tune(&backend);
    m::session_started(&plan.name);
    tracing::debug!(backend = %drainer.addr, "session started");
    let activity = copy::Activity::stamping(Some(_counted.0.heard()));
    let (result, up, down) = relay(
        client,
        backend,
        (started, keys),
        &activity,
        &mut drainer,
        &plan.settings,
    )
    .await;
    tracing::debug!(backend = %drainer.addr, result, bytes_up = up, bytes_down = down, "session ended");
    m::session_ended(&plan.name, result, up, down);
    if plan.settings.config.access_log {
        let ended = Ended {
            backend: Some(drainer.addr),
            result,
            client_to_backend: up,
            backend_to_client: down,
        };
        access::log(&plan.name, &opened, ended);
    }
}

/// Counts a client that never became a session, and writes its access line.
fn unserved(plan: &ListenerPlan, opened: &Opened, result: &'static str) {
    m::session_result(&plan.name, result);
    if plan.settings.config.access_log {
        access::log(&plan.name, opened, Ended::unserved(result));
    }
}

/// The address of a fixed target. A name is resolved at each connect, with the resolver of
/// `backends.dns_names`: the simplest way that follows a target that moves (a node replaced,
/// an address reassigned) without a reload, and a client that connects is the only one
/// waiting for the answer. The first address of the preferred family is used; the loop guard
/// checks it as it checks an address written in the file.
async fn resolve_target(
    target: &Endpoint,
    resolver: Option<&HostResolver>,
) -> Result<SocketAddr, Unserved> {
    let (host, port) = match target {
        Endpoint::Addr(addr) => return Ok(*addr),
        Endpoint::Name { host, port } => (host, *port),
    };
    let unresolved = |error: String| Unserved::Unresolved {
        target: target.to_string(),
        error,
    };
    let resolver = resolver.ok_or_else(|| unresolved("no DNS resolver".into()))?;
    match resolver.resolve(host, port).await {
        Ok(addrs) => addrs
            .first()
            .copied()
            .ok_or_else(|| unresolved("no address records".into())),
        Err(e) => {
            if let Some(suppressed) = ratelimit::allow(warning::DNS_FAILED, host) {
                tracing::warn!(target = %target, error = %e, suppressed, "fixed target does not resolve");
            }
            Err(unresolved(e.to_string()))
        }
    }
}

/// Whether `route` still sends new clients to `addr` under `generation`, the proxy `paused` or
/// not. A connect or a startup begun under it is abandoned the moment it does not: the leader
/// stepped down, died, is held, or is contested by another node's claim (the generation stays
/// the same then), or the proxy was paused.
fn sends_to(route: &Route, paused: bool, addr: SocketAddr, generation: u64) -> bool {
    route.generation == generation && admitted_leader(route, paused) == Some(addr)
}

/// Ends once `route` no longer sends new clients to `addr` under `generation`, or the proxy
/// is paused (or a channel closed).
async fn route_left(
    mut route: watch::Receiver<Route>,
    mut operator: watch::Receiver<OperatorState>,
    addr: SocketAddr,
    generation: u64,
) {
    tokio::select! {
        _ = route.wait_for(|r| !sends_to(r, false, addr, generation)) => {}
        _ = operator.wait_for(OperatorState::paused) => {}
    }
}

/// One client's connect, whatever its listener serves. [`Pick`] chooses the backend to try;
/// the rest is the same for all: a timed connect, its failure sorted out once ([`classify`])
/// and reported once, then a retry by the pick's rules.
struct Connects<'s, 'r> {
    settings: &'s SessionSettings,
    /// Followed to the leader, by a leader listener's client or a replica listener's fallback.
    route: &'r mut watch::Receiver<Route>,
    pick: Pick<'r>,
    /// When the client stops waiting: `leader_wait` after its request, restarted after a
    /// pause. A fixed target's client is bounded by its retries instead.
    deadline: Instant,
    /// The route generation the leader was last picked under.
    generation: u64,
    /// Failed attempts on the backend picked now: a leader's under `generation`, a fixed
    /// target's in all.
    failures: u32,
    last_error: Option<(SocketAddr, String)>,
}

/// What a listener's clients connect to: the one part of connecting that differs by listener.
enum Pick<'r> {
    /// The route's leader. Once `connect_retries` are spent on it under one route generation,
    /// only a new route helps. Its failures are reported to the view, which counts them against
    /// the leader and re-checks every backend.
    Leader,
    /// The open replica with the fewest sessions; one that failed is passed over until the set
    /// changes. With `fallback_to_leader`, the leader while no replica is open.
    Replica {
        backends: &'r mut watch::Receiver<BackendSet>,
        operator: watch::Receiver<OperatorState>,
        fallback_to_leader: bool,
        failed: Vec<SocketAddr>,
    },
    /// A fixed target's address, tried once and `connect_retries` more times.
    Target(SocketAddr),
}

impl<'s, 'r> Connects<'s, 'r> {
    fn new(
        settings: &'s SessionSettings,
        route: &'r mut watch::Receiver<Route>,
        accepted: Instant,
        pick: Pick<'r>,
    ) -> Self {
        Connects {
            settings,
            route,
            pick,
            deadline: accepted + settings.config.leader_wait,
            generation: 0,
            failures: 0,
            last_error: None,
        }
    }

    /// A connected backend: the one loop of picking, connecting and retrying.
    async fn connect(&mut self) -> Result<Connected, Unserved> {
        let settings = self.settings;
        loop {
            let (addr, counted) = self.next().await?;
            settings.refuse_loop(addr)?;
            let full = Instant::now() + settings.config.connect_timeout;
            let (drain, until) = match self.pick {
                Pick::Leader => (Drain::Route(self.generation), full.min(self.deadline)),
                Pick::Replica { .. } => (Drain::Replica, full.min(self.deadline)),
                Pick::Target(_) => (Drain::Never, full),
            };
            let connect = tokio::time::timeout_at(until, settings.base.reserve.connect(addr));
            let attempt = match drain {
                Drain::Route(generation) => {
                    let preconnect = settings.preconnect.as_ref();
                    match preconnect.and_then(|p| p.take(generation, addr)) {
                        // Opened ahead to this leader under this route.
                        Some(warm) => Ok(Ok(warm)),
                        None if Instant::now() >= self.deadline => return Err(self.gave_up()),
                        // A connect that outlives its route, or the client's patience, is
                        // abandoned.
                        None => tokio::select! {
                            a = connect => a,
                            _ = route_left(self.route.clone(), settings.base.operator.subscribe(), addr, generation) => {
                                tracing::info!(backend = %addr, "the route left the leader during the connect; connect abandoned");
                                continue;
                            }
                        },
                    }
                }
                _ => connect.await,
            };
            let failed = match classify(attempt)? {
                Ok(stream) if self.still_sends(addr, drain) => {
                    let counted =
                        counted.unwrap_or_else(|| settings.base.view.backends.borrow().count(addr));
                    return Ok(Connected {
                        stream,
                        addr,
                        drain,
                        _counted: counted,
                    });
                }
                Ok(_) => continue,
                // Cut short by the client's own deadline: that says nothing about the leader.
                Err(ConnectFailed::TimedOut)
                    if until < full && matches!(self.pick, Pick::Leader) =>
                {
                    return Err(self.gave_up())
                }
                Err(failed) => failed,
            };
            let error = self.report(addr, &failed);
            self.failed(addr, error).await?;
        }
    }

    /// Whether a connect to `addr` may become a session. The route may have moved since it was
    /// read, or while the handshake completed: never start one on a leader it has left.
    fn still_sends(&self, addr: SocketAddr, drain: Drain) -> bool {
        let paused = || self.settings.base.operator.paused();
        match drain {
            Drain::Route(generation) => sends_to(&self.route.borrow(), paused(), addr, generation),
            Drain::Replica | Drain::Never => true,
        }
    }

    /// The backend to try next, counted against it already for a replica. Waits, within the
    /// client's deadline, for one to try.
    async fn next(&mut self) -> Result<(SocketAddr, Option<SessionGuard>), Unserved> {
        let settings = self.settings;
        let (backends, operator, failed, fallback_to_leader) = match &mut self.pick {
            Pick::Leader => return Ok((self.next_leader().await?, None)),
            Pick::Target(addr) => return Ok((*addr, None)),
            Pick::Replica {
                backends,
                operator,
                failed,
                fallback_to_leader,
            } => (backends, operator, failed, *fallback_to_leader),
        };
        loop {
            let set = backends.borrow_and_update().clone();
            let turn = settings.turn.fetch_add(1, Ordering::Relaxed);
            // Drained and in-maintenance replicas take no new session.
            let open = {
                let state = operator.borrow_and_update();
                open_replicas(&set.replicas, |a| state.mode(a))
            };
            // Counted before connecting, so a burst of clients spreads over the replicas.
            if let Some(counted) = set.pick_replica(&open, failed, turn) {
                return Ok((counted.addr(), Some(counted)));
            }
            if fallback_to_leader && open.is_empty() && self.route.borrow().leader().is_some() {
                // No replica is open: the client goes to the leader, as a leader listener's.
                self.pick = Pick::Leader;
                self.failures = 0;
                self.last_error = None;
                return Ok((self.next_leader().await?, None));
            }
            // Every replica failed, or none is up: wait for the set (or the leader) to change.
            let retry = if failed.is_empty() {
                self.deadline
            } else {
                Instant::now() + RETRY_PAUSE
            };
            // A closed channel means the leader view ended: say so at once, never spin on it.
            let changed = tokio::select! {
                _ = tokio::time::sleep_until(retry.min(self.deadline)) => Ok(()),
                changed = backends.changed() => changed,
                changed = operator.changed() => changed,
                changed = self.route.changed(), if fallback_to_leader => changed,
            };
            if changed.is_err() {
                return Err(Unserved::Stopping);
            }
            failed.clear();
            if Instant::now() >= self.deadline {
                return Err(self.gave_up());
            }
        }
    }

    /// Waits for a route with a leader, the proxy not paused, within the client's deadline.
    async fn next_leader(&mut self) -> Result<SocketAddr, Unserved> {
        loop {
            self.wait_out_pause().await?;
            let mut operator = self.settings.base.operator.subscribe();
            let waited = tokio::select! {
                waited = tokio::time::timeout_at(self.deadline, self.route.wait_for(|r| r.leader().is_some())) => waited
                    .map(|found| found.map(|r| r.leader().map(|addr| (addr, r.generation)))),
                // Paused while waiting for a leader: held from now on.
                _ = operator.wait_for(OperatorState::paused) => continue,
            };
            let (addr, generation) = match waited {
                Ok(Ok(Some(found))) => found,
                Ok(Ok(None)) => continue,
                Ok(Err(_)) => return Err(Unserved::Stopping),
                Err(_) => return Err(self.gave_up()),
            };
            if self.settings.base.operator.paused() {
                continue;
            }
            if generation != self.generation {
                self.generation = generation;
                self.failures = 0;
            }
            return Ok(addr);
        }
    }

    /// Holds the client while the proxy is paused. Its `leader_wait` starts again when the
    /// pause lifts (by `POST /resume` or `proxy.pause_limit`), so the new leader has as long
    /// to appear as for any client.
    async fn wait_out_pause(&mut self) -> Result<(), Unserved> {
        let operator = &self.settings.base.operator;
        let mut state = operator.subscribe();
        if !state.borrow_and_update().paused() {
            return Ok(());
        }
        let _held = operator.hold();
        tracing::info!("paused; holding the client until the proxy resumes");
        if state.wait_for(|s| !s.paused()).await.is_err() {
            return Err(Unserved::Stopping);
        }
        self.deadline = self
            .deadline
            .max(Instant::now() + self.settings.config.leader_wait);
        tracing::info!("resumed; the held client goes on to the leader");
        Ok(())
    }

    /// Reports a failed connect to `addr` once, and returns it in words. Only a leader's own
    /// failures go to the view: this host's say nothing about it.
    fn report(&self, addr: SocketAddr, failed: &ConnectFailed) -> String {
        // A replica attempt's timer may be the client's deadline: no duration is named.
        let timeout = match self.pick {
            Pick::Replica { .. } => None,
            _ => Some(self.settings.config.connect_timeout),
        };
        let error = failed.describe(timeout);
        if let Some(suppressed) = ratelimit::allow(warning::CONNECT_FAILED, addr) {
            match self.pick {
                Pick::Leader => {
                    tracing::warn!(backend = %addr, %error, suppressed, "connect to leader failed")
                }
                Pick::Replica { .. } => {
                    tracing::warn!(backend = %addr, %error, suppressed, "connect to replica failed")
                }
                Pick::Target(_) => {
                    tracing::warn!(target = %addr, %error, suppressed, "connect failed")
                }
            }
        }
        m::connect_failed(addr);
        if matches!(self.pick, Pick::Leader) && failed.blames_backend() {
            let events = &self.settings.base.view.events;
            let _ = events.try_send(Event::ConnectFailed {
                addr,
                error: error.clone(),
            });
        }
        error
    }

    /// Counts a failed attempt on `addr` (a connect's, or a leader's startup: rule 11) and
    /// waits before the next as the pick's rules say. Errs once the client's time is up.
    async fn failed(&mut self, addr: SocketAddr, error: String) -> Result<(), Unserved> {
        self.last_error = Some((addr, error));
        self.failures += 1;
        let spent = self.failures > self.settings.config.connect_retries;
        match &mut self.pick {
            // The other replicas are tried at once.
            Pick::Replica { failed, .. } => failed.push(addr),
            Pick::Target(_) if spent => return Err(self.gave_up()),
            Pick::Target(_) => tokio::time::sleep(RETRY_PAUSE).await,
            // A short pause while this leader has retries left, else until the route moves;
            // either cut short by a new route.
            Pick::Leader => {
                let generation = self.generation;
                let pause_until = if spent {
                    self.deadline
                } else {
                    Instant::now() + RETRY_PAUSE
                };
                let moved = tokio::time::timeout_at(
                    pause_until.min(self.deadline),
                    self.route.wait_for(|r| r.generation != generation),
                )
                .await
                .is_ok();
                if !moved && Instant::now() >= self.deadline {
                    return Err(self.gave_up());
                }
            }
        }
        Ok(())
    }

    /// Why the client gives up now: for a leader, what the route says; else the last failure,
    /// or that no replica is up.
    fn gave_up(&mut self) -> Unserved {
        let route = self.route.borrow();
        match (&self.pick, self.last_error.take()) {
            (Pick::Leader, last_error) => no_leader_reason(&route, last_error),
            (_, Some((addr, error))) => Unserved::BackendUnreachable { addr, error },
            (
                Pick::Replica {
                    fallback_to_leader, ..
                },
                None,
            ) if *fallback_to_leader => {
                let leader = no_leader_reason(&route, None);
                Unserved::NoReplica(format!(" and {leader}"))
            }
            (_, None) => Unserved::NoReplica(String::new()),
        }
    }
}

/// Why a connect attempt failed, told apart in one place for leader, replica and fixed-target
/// connects. This host running out of descriptors or memory is not among them: [`classify`]
/// turns it into [`Unserved::OutOfResources`] at once.
#[derive(Debug)]
enum ConnectFailed {
    /// The backend, or the way to it, failed: refused, reset, unreachable.
    Remote(io::Error),
    /// Failed here for another reason; retried, but no evidence against the backend.
    Local(io::Error),
    /// No answer before the attempt's timer ran out.
    TimedOut,
}

impl ConnectFailed {
    /// Whether the failure is evidence against the backend, worth telling the view.
    fn blames_backend(&self) -> bool {
        matches!(self, ConnectFailed::Remote(_) | ConnectFailed::TimedOut)
    }

    /// The failure in words; `timeout` is named when the attempt's timer was the connect
    /// timeout, not possibly the client's deadline.
    fn describe(&self, timeout: Option<Duration>) -> String {
        match (self, timeout) {
            (ConnectFailed::Remote(e) | ConnectFailed::Local(e), _) => e.to_string(),
            (ConnectFailed::TimedOut, Some(timeout)) => {
                format!("connect timed out after {timeout:?}")
            }
            (ConnectFailed::TimedOut, None) => "connect timed out".to_string(),
        }
    }
}

/// Sorts out one timed connect attempt. A shortage of this host's is the outer `Err`: waiting
/// will not help a client while this host has no descriptors to give, so it is refused (53300).
fn classify(
    attempt: Result<io::Result<TcpStream>, tokio::time::error::Elapsed>,
) -> Result<Result<TcpStream, ConnectFailed>, Unserved> {
    match attempt {
        Ok(Ok(stream)) => Ok(Ok(stream)),
        Ok(Err(e)) if reserve::is_local_shortage(&e) => {
            m::local_shortage("session");
            Err(Unserved::OutOfResources(e.to_string()))
        }
        Ok(Err(e)) => Ok(Err(match e.kind() {
            io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::HostUnreachable
            | io::ErrorKind::NetworkUnreachable
            | io::ErrorKind::TimedOut => ConnectFailed::Remote(e),
            _ => ConnectFailed::Local(e),
        })),
        Err(_) => Ok(Err(ConnectFailed::TimedOut)),
    }
}

fn no_leader_reason(route: &Route, last_error: Option<(SocketAddr, String)>) -> Unserved {
    match (&route.target, last_error) {
        (Target::Leader(addr), Some((failed, error))) if *addr == failed => Unserved::Unreachable {
            addr: failed,
            error,
        },
        (Target::Leader(addr), _) => Unserved::Unreachable {
            addr: *addr,
            error: "no attempt succeeded in time".into(),
        },
        (Target::Held(addr, why), _) => Unserved::Held(*addr, *why),
        (Target::Contested(addr), _) => Unserved::Contested(*addr),
        (Target::None(reason), _) => Unserved::NoRoute(reason.to_string()),
    }
}

/// Copies both ways until both sides are done, the drainer says the node is no longer what
/// the listener serves, the session idles out, or the process stops. A session whose leader
/// stepped down while alive ends at its next transaction boundary instead (rule 9), within
/// `proxy.switchover_grace`; one whose leader is contested pauses there until the route
/// decides. `started` is what the client and the backend already said to each other. Returns
/// the result label and bytes copied (client→backend, backend→client).
async fn relay(
    client: TcpStream,
    backend: TcpStream,
    (started, mut keys): (Started, Option<KeyRecorder>),
    activity: &copy::Activity,
    drainer: &mut Drainer,
    settings: &SessionSettings,
) -> (&'static str, u64, u64) {
    let sockets = copy::Socket::new(client).and_then(|c| Ok((c, copy::Socket::new(backend)?)));
    let (client, backend) = match sockets {
        Ok(pair) => pair,
        Err(e) => {
            tracing::warn!(error = %e, "cannot register session sockets");
            return ("error", 0, 0);
        }
    };
    let config = &settings.config;
    let mut idle = std::pin::pin!(idle_timeout(activity, config.idle_timeout));
    let Started {
        mut framing,
        up,
        down,
    } = started;
    activity.up.fetch_add(up, Ordering::Relaxed);
    activity.down.fetch_add(down, Ordering::Relaxed);
    let mut copying = copy::bidirectional(
        &client,
        &backend,
        config.copy,
        activity,
        config.half_close_timeout,
        framing.as_mut(),
    );
    loop {
        let fate = tokio::select! {
            copied = keeping_key(&mut copying, keys.as_mut()) => return counted(ended(copied, settings), activity),
            fate = drainer.next_fate(Fate::Stay) => fate,
            _ = &mut idle => {
                tracing::info!(idle_timeout = %humantime::format_duration(config.idle_timeout), "idle timeout; closing session");
                return counted("idle_timeout", activity);
            }
            _ = settings.base.hard_stop.cancelled() => return counted("shutdown", activity),
        };
        if fate == Fate::Close || !copying.tracked() {
            if fate != Fate::Close && drainer.ending() == Ending::Paused {
                // Its boundaries cannot be seen (encrypted, or not Postgres): any moment may be
                // part-way through a transaction, and waiting would only hold up the switchover.
                tracing::info!("paused; a session whose transaction boundaries cannot be seen is closed at once");
                m::pause_cut_session();
            }
            return counted("drained", activity);
        }
        // Boxed: its timers and the goodbye would otherwise sit in every session's task for
        // its whole life, though only a drain or a contest ever runs it.
        let outcome = Box::pin(to_the_boundary(
            fate,
            &mut copying,
            (&client, &backend),
            drainer,
            settings,
            activity,
        ))
        .await;
        match outcome {
            Some(result) => return counted(result, activity),
            // The contest lapsed and the copy resumed where it paused.
            None => continue,
        }
    }
}

/// Polls `copying`, and gives `keys` the backend's cancel key once the framing has seen it:
/// at the start of the session, before its client can have sent a CancelRequest with it.
fn keeping_key<'c, 'a>(
    copying: &'c mut copy::Bidirectional<'a>,
    mut keys: Option<&'c mut KeyRecorder>,
) -> impl std::future::Future<Output = io::Result<copy::Ended>> + use<'c, 'a> {
    std::future::poll_fn(move |cx| {
        let polled = std::future::Future::poll(std::pin::Pin::new(&mut *copying), cx);
        if let Some(keys) = keys.as_deref_mut() {
            keys.saw(copying.backend_key());
        }
        polled
    })
}

/// Sends a replica listener's CancelRequest (`packet`, as the client sent it) to the replica
/// whose session got its key, or, when the key is not known here (the session was TLS, went
/// through another proxy, or its key was evicted), to every replica (and the leader, with
/// `fallback_to_leader`): Postgres ignores a key that is not its own. As Postgres does, the
/// client gets no answer but the close.
async fn cancel(packet: &[u8], fallback_to_leader: bool, settings: &SessionSettings) {
    let key = match pgwire::parse_startup(packet.get(4..).unwrap_or_default()) {
        Ok(pgwire::StartupPacket::Cancel {
            process_id,
            secret_key,
        }) => Some(BackendKey {
            process_id,
            secret_key,
        }),
        _ => None,
    };
    let known = key.and_then(|key| settings.base.cancel_keys.backend(key));
    let targets = match known {
        Some(addr) => vec![addr],
        None => {
            let mut every = settings.base.view.backends.borrow().replicas.clone();
            if fallback_to_leader {
                every.extend(settings.base.view.route.borrow().leader());
            }
            every
        }
    };
    let sent_to = match (known, targets.is_empty()) {
        (Some(_), _) => m::CANCEL_TO_SESSION_BACKEND,
        (None, false) => m::CANCEL_TO_EVERY_REPLICA,
        (None, true) => m::CANCEL_TO_NONE,
    };
    m::cancel_request(sent_to);
    tracing::debug!(sent_to, backends = targets.len(), "CancelRequest");
    let mut sends = tokio::task::JoinSet::new();
    for addr in targets {
        if settings.refuse_loop(addr).is_err() {
            continue;
        }
        let packet = packet.to_vec();
        let reserve = Arc::clone(&settings.base.reserve);
        let within = settings.config.connect_timeout;
        sends.spawn(async move {
            let sent = tokio::time::timeout(within, async {
                let mut stream = reserve.connect(addr).await?;
                tokio::io::AsyncWriteExt::write_all(&mut stream, &packet).await?;
                // Postgres reads the request, then closes: its close is its answer.
                let mut rest = [0u8; 64];
                while tokio::io::AsyncReadExt::read(&mut stream, &mut rest).await? > 0 {}
                io::Result::Ok(())
            })
            .await;
            if let Some(error) = match sent {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(_) => Some(format!("no answer within {within:?}")),
            } {
                if let Some(suppressed) = ratelimit::allow(warning::CONNECT_FAILED, format_args!("cancel {addr}")) {
                    tracing::warn!(backend = %addr, %error, suppressed, "cannot send a CancelRequest");
                }
            }
        });
    }
    while sends.join_next().await.is_some() {}
}

/// Follows a session whose leader is contested ([`Fate::Hold`]) or stepped down
/// ([`Fate::EndTransaction`]) to its next transaction boundary and on from there as the
/// route decides. Held, it pauses there (the client's next bytes stay in its socket) and
/// resumes if the route holds again (`None`); it ends with 57P01 if the route moves on. A
/// session still in a transaction when another node leads is closed at once: writes never
/// land on two leaders. Otherwise returns the session's result.
async fn to_the_boundary(
    mut fate: Fate,
    copying: &mut copy::Bidirectional<'_>,
    (client, backend): (&copy::Socket, &copy::Socket),
    drainer: &mut Drainer,
    settings: &SessionSettings,
    activity: &copy::Activity,
) -> Option<&'static str> {
    let config = &settings.config;
    let mut idle = std::pin::pin!(idle_timeout(activity, config.idle_timeout));
    let mut grace = std::pin::pin!(tokio::time::sleep(config.switchover_grace));
    let mut grace_running = false;
    // Why the session ends at its boundary: decided when it is first told to, as its grace.
    let mut ending = drainer.ending();
    loop {
        match fate {
            Fate::Stay => {
                copying.resume();
                return None;
            }
            Fate::Hold => copying.pause_when_idle(),
            Fate::EndTransaction => {
                copying.end_when_idle();
                if !grace_running {
                    ending = drainer.ending();
                    if let Some(within) = ending.grace(config) {
                        grace.as_mut().reset(Instant::now() + within);
                        grace_running = true;
                    }
                }
            }
            Fate::Close if copying.paused() => {
                say_goodbye(client, backend, CONTEST_LOST).await;
                return Some("contest_lost");
            }
            Fate::Close => return Some("drained"),
        }
        fate = tokio::select! {
            copied = &mut *copying => return Some(match copied {
                Ok(copy::Ended::Idle) => {
                    say_goodbye(client, backend, ending.farewell()).await;
                    "transaction_end"
                }
                other => ended(other, settings),
            }),
            next = drainer.next_fate(fate) => next,
            _ = &mut grace, if grace_running => {
                if ending == Ending::Paused {
                    tracing::info!(grace = %humantime::format_duration(config.pause_grace), "still in a transaction when the pause grace ran out; closing session");
                    m::pause_cut_session();
                } else {
                    tracing::info!(grace = %humantime::format_duration(config.switchover_grace), "still in a transaction when the switchover grace ran out; closing session");
                }
                return Some("grace_over");
            }
            _ = &mut idle => return Some("idle_timeout"),
            _ = settings.base.hard_stop.cancelled() => return Some("shutdown"),
        };
    }
}

/// Ends when the session has moved no byte for `timeout`.
async fn idle_timeout(activity: &copy::Activity, timeout: Duration) {
    loop {
        let due = activity.last() + timeout;
        if Instant::now() >= due {
            return;
        }
        tokio::time::sleep_until(due).await;
    }
}

/// The result label of a copy that ended by itself.
fn ended(copied: io::Result<copy::Ended>, settings: &SessionSettings) -> &'static str {
    match copied {
        Ok(copy::Ended::HalfOpen) => {
            tracing::info!(half_close_timeout = %humantime::format_duration(settings.config.half_close_timeout), "one side closed, the other silent; closing session");
            "half_closed"
        }
        Ok(_) => "closed",
        Err(e) => {
            tracing::debug!(error = %e, "session ended with an error");
            "error"
        }
    }
}

/// What a session ended at a transaction boundary because its leader stepped down is told.
const STEPPED_DOWN: &str = "terminating connection: the leader moved (planned switchover); reconnect to reach the new leader";
/// What a leader session ended at a transaction boundary because the proxy is paused is told.
const PAUSED: &str = "terminating connection: roleproxy is paused for a switchover; reconnect, and the new session starts once it resumes";
/// What a session ended at a transaction boundary because its replica is drained is told.
const DRAINED: &str =
    "terminating connection: this replica is being drained; reconnect to reach another";
/// What a session paused by a contest is told when the route moved on from its leader.
const CONTEST_LOST: &str =
    "terminating connection: another node became leader; reconnect to reach it";

/// Ends a session between transactions the way Postgres ends a terminated backend: the
/// client gets `FATAL 57P01` (drivers and pools take it as a lost connection to retry), the
/// backend gets Terminate (Postgres logs a clean disconnect).
async fn say_goodbye(client: &copy::Socket, backend: &copy::Socket, message: &str) {
    let farewell = pgwire::error_response(pgwire::ADMIN_SHUTDOWN, message);
    let words = async {
        if let Err(e) = client.send_all(&farewell).await {
            tracing::debug!(error = %e, "client gone before the switchover notice");
        }
        client.finish(GOODBYE_WAIT).await;
    };
    let terminate = async {
        if let Err(e) = backend.send_all(&pgwire::TERMINATE).await {
            tracing::debug!(error = %e, "backend gone before Terminate");
        }
    };
    // Bounded: a client that stopped reading must not hold the session.
    let _ = tokio::time::timeout(GOODBYE_WAIT, async { tokio::join!(words, terminate) }).await;
    tracing::info!(
        message,
        "ended between transactions: client told 57P01, backend sent Terminate"
    );
}

fn counted(result: &'static str, activity: &copy::Activity) -> (&'static str, u64, u64) {
    (
        result,
        activity.up.load(Ordering::Relaxed),
        activity.down.load(Ordering::Relaxed),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_privileged_port_refused_names_the_capability() {
        let denied = io::Error::from(io::ErrorKind::PermissionDenied);
        let in_use = io::Error::from(io::ErrorKind::AddrInUse);
        let rows: [(&str, &io::Error, bool); 4] = [
            ("0.0.0.0:443", &denied, true),
            ("[::]:1023", &denied, true),
            ("0.0.0.0:5432", &denied, false),
            ("0.0.0.0:443", &in_use, false),
        ];
        for (addr, error, hinted) in rows {
            let hint = bind_hint(addr.parse().expect("address"), error);
            assert_eq!(
                hint.contains("CAP_NET_BIND_SERVICE"),
                hinted,
                "{addr} {error}"
            );
        }
    }

    #[test]
    fn the_session_limit_admits_up_to_max_and_a_lowered_one_is_reached_as_sessions_end() {
        let limit = SessionLimit::new(2);
        let mut open: Vec<Admitted> = (0..2)
            .map(|_| limit.try_admit().expect("a place"))
            .collect();
        assert!(limit.try_admit().is_none(), "full at max_connections");
        drop(open.pop());
        open.push(
            limit
                .try_admit()
                .expect("a session ended, so a place is free"),
        );

        limit.set_max(1);
        assert!(
            limit.try_admit().is_none(),
            "lowered: open sessions stay, none is added"
        );
        drop(open.pop());
        assert!(limit.try_admit().is_none(), "still at the lowered limit");
        drop(open.pop());
        open.push(limit.try_admit().expect("below the lowered limit"));

        limit.set_max(3);
        open.push(limit.try_admit().expect("raised: admitted at once"));
        open.push(limit.try_admit().expect("raised: admitted at once"));
        assert!(limit.try_admit().is_none());
    }

    /// Most sessions are idle most of the time, and an idle session's memory is mostly its
    /// task: what only a drain needs must not be carried in it. (About 1.7 KB today; 4.7 KB
    /// when the switchover goodbye sat inline.)
    #[tokio::test]
    async fn an_open_sessions_task_stays_small() {
        let config = crate::config::Config::parse(
            "[backends]\ndns_names = []\nbackup = [\"127.0.0.1:9\"]",
            &|_| None,
        )
        .expect("valid");
        let (supervisor, _ended) = crate::supervise::Supervisor::new();
        let (_view, view, _events) = crate::view::ClusterView::new(
            crate::view::ViewSettings::from_config(&config.check),
            CancellationToken::new(),
            supervisor,
        );
        let base = SessionBase {
            view: view.clone(),
            own: Arc::new(OwnAddrs::new()),
            limit: SessionLimit::new(1),
            reserve: crate::reserve::Reserve::open(),
            cancel_keys: crate::cancel::CancelKeys::new(),
            hard_stop: CancellationToken::new(),
            tracker: TaskTracker::new(),
            operator: Operator::new(),
        };
        let settings = SessionSettings::new(base, config.proxy.clone(), "c".into(), None);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let client = TcpStream::connect(addr).await.expect("connect");
        let (backend, _) = listener.accept().await.expect("accept");
        let drainer = Drainer {
            drain: Drain::Route(1),
            route: view.route.clone(),
            backends: view.backends.clone(),
            operator: settings.base.operator.subscribe(),
            addr,
        };
        let plan = Arc::new(ListenerPlan {
            name: "leader".into(),
            serves: Serves::Leader,
            resolver: None,
            settings,
        });
        let permit = SessionLimit::new(1).try_admit().expect("a place");
        let counted = (view.backends.borrow().count(addr), permit);
        let started = Started {
            framing: Some(roleproxy_core::framing::Framing::new()),
            up: 0,
            down: 0,
        };
        let keys = KeyRecorder::new(CancelKeys::new(), addr);
        let session = run_session(
            client,
            backend,
            (started, Some(keys)),
            drainer,
            counted,
            plan,
            Opened::now(addr, "127.0.0.1:5432".into()),
        );
        let size = std::mem::size_of_val(&session);
        assert!(size <= 2560, "an open session's task holds {size} bytes");
    }
}
