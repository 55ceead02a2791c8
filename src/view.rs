//! The leader view: the one task that owns every backend's state, feeds check results through
//! the rules of [`roleproxy_core::route`] and publishes, each on a `tokio::sync::watch` channel, what the
//! rest of the proxy reads: the route every session listens to, the backend set with its session
//! counters, and its part of `/status` ([`ViewHandle`]).

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use roleproxy_core::route::{
    decide_with, describe_route, explain, least_loaded, probe_verdict, BackendView, Claim,
    Liveness, NoRoute, Observed, Role, RoleHistory, Route, Source, SplitBrain, Standing, Target,
    Verdict,
};

use crate::check::{self, CheckSettings};
use crate::config::CheckConfig;
use crate::copy;
use crate::discovery::{Backend, Discovered};
use crate::metrics::{self as m, warning};
use crate::status::{
    unix_ms, BackendStatus, Change, DataPortStatus, UnconfirmedStatus, ViewStatus, HISTORY_LEN,
};
use crate::supervise::Supervisor;
use roleproxy_common::ratelimit;

/// Input to the leader view.
#[derive(Debug)]
pub enum Event {
    /// The backend set, or which DNS names fail (that names the cause when nothing can be
    /// routed).
    Discovered(Discovered),
    Checked {
        addr: SocketAddr,
        /// Which check loop sent it; results of a cancelled loop are ignored.
        loop_id: u64,
        role: Role,
        /// A Postgres check's reading of a leader's timeline.
        timeline: Option<u32>,
        latency: Duration,
    },
    /// A session could not connect to this backend (refused or timed out).
    ConnectFailed { addr: SocketAddr, error: String },
    /// A client's startup on this backend failed before it answered (closed, reset, 57P03):
    /// a reason to probe its Postgres at once, never by itself evidence that it is gone (rule
    /// 10). The client is meanwhile held for the next leader.
    StartupFailed { addr: SocketAddr, error: String },
    /// What a probe of this backend's Postgres found; `None`: this host could not tell.
    Probed {
        addr: SocketAddr,
        liveness: Option<Liveness>,
    },
    /// New check settings from a reload. Roles already known are kept; loops restart.
    Reconfigure(ViewSettings),
}

/// Discovery reports through the view's channel without knowing the view.
impl From<Discovered> for Event {
    fn from(discovered: Discovered) -> Event {
        Event::Discovered(discovered)
    }
}

/// How the view checks backends and decides, from `[check]`.
#[derive(Debug, Clone, PartialEq)]
pub struct ViewSettings {
    pub check: CheckSettings,
    pub rise: u32,
    pub fall: u32,
    pub split_brain: SplitBrain,
    pub probe_timeout: Duration,
    pub unconfirmed_limit: Duration,
    /// How long a rival's new `leader` claim contests the route before it counts (rule 10).
    pub contest_hold: Duration,
    /// How long a sign of life (bytes on a session, a completed handshake) postpones a verdict
    /// of death on a timeout (rule 10).
    pub liveness_window: Duration,
}

impl ViewSettings {
    pub fn from_config(c: &CheckConfig) -> ViewSettings {
        ViewSettings {
            check: CheckSettings::from_config(c),
            rise: c.rise,
            fall: c.fall,
            split_brain: c.split_brain,
            probe_timeout: c.probe_timeout,
            unconfirmed_limit: c.unconfirmed_limit,
            contest_hold: c.contest_hold,
            liveness_window: c.liveness_window,
        }
    }
}

/// How the rest of the proxy reads what the view publishes, and reports to it; cheap to clone.
#[derive(Clone)]
pub struct ViewHandle {
    pub route: watch::Receiver<Route>,
    /// Which backends are replicas, and every backend's session counter.
    pub backends: watch::Receiver<BackendSet>,
    /// The view's part of `/status`.
    pub status: watch::Receiver<ViewStatus>,
    /// Connect failures go here, and discovery's backend sets.
    pub events: mpsc::Sender<Event>,
}

/// The backend set as sessions see it: which backends are replicas, and a session counter for
/// every backend. Counting a session is one atomic add and ending it one atomic subtract, so
/// connects and disconnects take no lock of their own. A backend keeps its counter while the
/// view knows it, and after that while a session still counts against it, so a backend that
/// leaves and returns finds its count.
#[derive(Clone, Default)]
pub struct BackendSet {
    /// Backends that check as replica and are still in the backend set, in address order.
    pub replicas: Vec<SocketAddr>,
    counters: Arc<BTreeMap<SocketAddr, Arc<BackendCounters>>>,
}

/// What a backend's sessions tell the view without a message: how many are open, and when
/// one last received bytes from it.
#[derive(Debug, Default)]
pub struct BackendCounters {
    sessions: AtomicU64,
    /// [`copy::clock_ms`] when a session last received bytes from the backend (0: never):
    /// evidence that its host and Postgres live, which postpones a timeout verdict.
    heard: Arc<AtomicU64>,
}

impl BackendCounters {
    /// When a session last received bytes from the backend, if one ever did.
    fn heard_at(&self) -> Option<Instant> {
        match self.heard.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(copy::clock_instant(ms)),
        }
    }
}

impl BackendSet {
    /// Open sessions to `addr`.
    pub fn sessions(&self, addr: SocketAddr) -> u64 {
        self.counters
            .get(&addr)
            .map_or(0, |counters| counters.sessions.load(Ordering::Relaxed))
    }

    /// Counts a session against `addr` until the guard is dropped. An address the view does not
    /// know (a fixed target) gets a counter of its own that nothing reads.
    pub fn count(&self, addr: SocketAddr) -> SessionGuard {
        let counters = self.counters.get(&addr).cloned().unwrap_or_default();
        counters.sessions.fetch_add(1, Ordering::Relaxed);
        SessionGuard { counters, addr }
    }

    /// Picks the least loaded of the `open` replicas (see [`least_loaded`]) and counts a session against it at
    /// once, so clients arriving together spread out. Nothing locks between reading the counts
    /// and adding one: clients picking at the same instant may read the same counts. Each has
    /// its own `turn`, so equal counts still spread; otherwise a pick is off by the few clients
    /// that raced, and the next picks read the real counts and even it out. The pick balances,
    /// it limits nothing, so that costs nothing worth a lock on every connect.
    pub fn pick_replica(
        &self,
        open: &[SocketAddr],
        exclude: &[SocketAddr],
        turn: usize,
    ) -> Option<SessionGuard> {
        let addr = least_loaded(open, |a| self.sessions(a), exclude, turn)?;
        Some(self.count(addr))
    }
}

/// One session counted against its backend, until dropped.
pub struct SessionGuard {
    counters: Arc<BackendCounters>,
    addr: SocketAddr,
}

impl SessionGuard {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where the session stamps bytes received from its backend ([`copy::Activity::stamping`]).
    pub fn heard(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.counters.heard)
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.counters.sessions.fetch_sub(1, Ordering::Relaxed);
    }
}

struct BackendState {
    sources: Vec<Source>,
    present: bool,
    history: RoleHistory,
    timeline: Option<u32>,
    last_check: Option<(SystemTime, Duration)>,
    last_error: Option<String>,
    last_error_at: Option<SystemTime>,
    /// The running check loop: its id and its stop token.
    checker: Option<(u64, CancellationToken)>,
    /// Since when this leader's checks have failed (monotonic for the bound, wall for people).
    failing_since: Option<(Instant, SystemTime)>,
    /// The latest Postgres probe's answer.
    postgres: Option<Liveness>,
    /// A probe is running; another waits for it.
    probing: bool,
    /// When the latest probe started: at most one per `check.fast_interval`.
    last_probe: Option<Instant>,
    /// The latest check failed (timeout, refused, HTTP error): its last definite answer is
    /// not a current claim.
    check_failing: bool,
    /// Since when its answers have claimed leader: a rival's hold-down counts from here and
    /// is never reset while the claim lasts.
    claim_since: Option<Instant>,
    /// When one of its claims last lapsed within its hold-down: a node whose claims keep
    /// lapsing gets no new hold-down for [`LAPSED_CLAIM_MEMORY`].
    lapsed_at: Option<Instant>,
    /// When a probe last found its host alive (Postgres answered, or the handshake completed).
    alive_at: Option<Instant>,
    /// Its Postgres port failed a probe, and none has found it answering since (rule 10): the
    /// error, and since when.
    data_error: Option<(String, SystemTime)>,
    /// A silent probe's verdict was postponed by a recent sign of life: probe again then.
    probe_again_at: Option<Instant>,
}

/// How long a lapsed claim is remembered: a node claiming leader again within this gets no
/// hold-down, so a flapping or lying node cannot keep the route contested.
const LAPSED_CLAIM_MEMORY: Duration = Duration::from_secs(60);

/// While there is no route, the check loops run every `check.fast_interval` for this long,
/// then every four fast intervals: a failover is seen at once, a long outage costs each node
/// a quarter of the checks.
const FAST_CHECKS_FOR: Duration = Duration::from_secs(30);

impl BackendState {
    /// Keeps `error` for `/status` and the stats page; it may quote a node (a role body, a
    /// server's error), so its control characters are written out here, once for every reader.
    fn failed(&mut self, error: String) {
        self.last_error = Some(roleproxy_core::printable(&error).into_owned());
        self.last_error_at = Some(SystemTime::now());
    }

    fn stop_checking(&mut self) {
        if let Some((_, token)) = self.checker.take() {
            token.cancel();
        }
    }
}

/// Owns every backend's state; the only place where check results become a route.
pub struct ClusterView {
    settings: ViewSettings,
    /// The check settings the loops run with, shared so a loop need not copy them.
    check: Arc<CheckSettings>,
    backends: BTreeMap<SocketAddr, BackendState>,
    route_tx: watch::Sender<Route>,
    /// Bumped to make every check loop check now (rule 6).
    recheck_tx: watch::Sender<u64>,
    /// Rechecks are at most one per `fast_interval`, however many clients fail to connect.
    last_recheck: Option<Instant>,
    /// Numbers check results, so claims can be ordered without clocks.
    seq: u64,
    /// DNS names whose lookups fail, as discovery last said.
    dns_failing: Vec<String>,
    next_loop_id: u64,
    backends_tx: watch::Sender<BackendSet>,
    /// Every backend's session counters, and those of departed backends with sessions left.
    counters: BTreeMap<SocketAddr, Arc<BackendCounters>>,
    status_tx: watch::Sender<ViewStatus>,
    /// The latest role and route changes, oldest first, for people reading `/` and `/status`.
    history: Arc<VecDeque<Change>>,
    route_since: SystemTime,
    /// For the check loops and probes to report back.
    events: mpsc::Sender<Event>,
    /// Runs the check loops.
    supervisor: Supervisor,
    cancel: CancellationToken,
    /// Where check loops and probes run.
    sources: Sources,
}

/// Where the view's check loops and Postgres probes run: spawned as tasks doing real I/O, or,
/// in the simulation, only asked for, so the simulation answers them as events on its own
/// schedule and the view does no I/O at all.
enum Sources {
    Spawned,
    #[cfg(test)]
    Recorded(Vec<Request>),
}

/// What the view asked of [`Sources::Recorded`].
#[cfg(test)]
#[derive(Debug)]
enum Request {
    /// Start checking `addr`, reporting as `loop_id`, until `cancel` fires.
    Checks {
        addr: SocketAddr,
        loop_id: u64,
        cancel: CancellationToken,
    },
    /// Probe `addr`'s Postgres once.
    Probe { addr: SocketAddr },
}

impl ClusterView {
    /// Creates the view and the handle the rest of the proxy reads it by; call
    /// [`ClusterView::run`] to start it.
    pub fn new(
        settings: ViewSettings,
        cancel: CancellationToken,
        supervisor: Supervisor,
    ) -> (ClusterView, ViewHandle, mpsc::Receiver<Event>) {
        let (route_tx, route_rx) = watch::channel(Route::initial());
        let (backends_tx, backends_rx) = watch::channel(BackendSet::default());
        let now = SystemTime::now();
        let history = Arc::new(VecDeque::with_capacity(HISTORY_LEN));
        let (status_tx, status_rx) = watch::channel(ViewStatus {
            backends: Vec::new(),
            history: Arc::clone(&history),
            route_since: now,
        });
        let (events_tx, events_rx) = mpsc::channel(1024);
        let (recheck_tx, _) = watch::channel(0);
        let handle = ViewHandle {
            route: route_rx,
            backends: backends_rx,
            status: status_rx,
            events: events_tx.clone(),
        };
        let view = ClusterView {
            check: Arc::new(settings.check.clone()),
            settings,
            backends: BTreeMap::new(),
            route_tx,
            recheck_tx,
            last_recheck: None,
            seq: 0,
            dns_failing: Vec::new(),
            next_loop_id: 0,
            backends_tx,
            counters: BTreeMap::new(),
            status_tx,
            history,
            route_since: now,
            events: events_tx,
            supervisor,
            cancel,
            sources: Sources::Spawned,
        };
        (view, handle, events_rx)
    }

    pub async fn run(mut self, mut events: mpsc::Receiver<Event>) {
        m::set_route_generation(0);
        m::leader_unconfirmed(false);
        loop {
            let probe_due = self.next_probe_due();
            let event = tokio::select! {
                _ = self.cancel.cancelled() => break,
                event = events.recv() => match event {
                    Some(event) => Some(event),
                    None => break,
                },
                _ = sleep_until_some(probe_due) => None,
            };
            self.step(event);
        }
        for state in self.backends.values_mut() {
            state.stop_checking();
        }
    }

    /// One turn of the view: applies an event, or with none runs the postponed probes that
    /// are due; then publishes.
    fn step(&mut self, event: Option<Event>) {
        match event {
            Some(event) => self.apply(event),
            None => self.probe_postponed(),
        }
        self.publish();
    }

    fn apply(&mut self, event: Event) {
        match event {
            Event::Discovered(Discovered::Backends(set)) => self.set_backends(set),
            Event::Discovered(Discovered::DnsFailing(names)) => self.dns_failing = names,
            Event::Checked {
                addr,
                loop_id,
                role,
                timeline,
                latency,
            } => {
                if let Some(state) = self.backends.get_mut(&addr) {
                    if state.checker.as_ref().map(|(id, _)| *id) == Some(loop_id) {
                        // A failed check says nothing about the timeline: keep the last one
                        // read, so one lost answer does not turn a settled split brain back
                        // into no route.
                        if timeline.is_some() {
                            state.timeline = timeline;
                        }
                        self.observe(addr, role, Some(latency));
                    }
                }
            }
            Event::Reconfigure(settings) => self.reconfigure(settings),
            Event::ConnectFailed { addr, error } => {
                // Like HAProxy's `observe layer4`, the data path failing is a reason to look
                // at once; but only the probe's answer, not the failure itself, may take the
                // leader down (rule 7).
                if self.route_tx.borrow().leader() == Some(addr) {
                    if let Some(suppressed) =
                        ratelimit::allow(warning::CONNECT_FAILED, format_args!("view {addr}"))
                    {
                        tracing::warn!(backend = %addr, %error, suppressed, "connect to leader failed; probing its Postgres and re-checking every backend");
                    }
                    self.observe(addr, Role::Down(format!("connect: {error}")), None);
                }
            }
            Event::StartupFailed { addr, error } => {
                // Only the probe's answer may take the leader down (57P03, no Postgres);
                // meanwhile its checks and every rival's are asked again.
                if self.route_tx.borrow().target.backend() == Some(addr) {
                    if let Some(suppressed) = ratelimit::allow(
                        warning::CONNECT_FAILED,
                        format_args!("view startup {addr}"),
                    ) {
                        tracing::warn!(backend = %addr, %error, suppressed, "a client's startup failed on the leader; probing its Postgres and re-checking every backend");
                    }
                    self.probe(addr);
                    self.recheck_all();
                }
            }
            Event::Probed { addr, liveness } => self.probed(addr, liveness),
        }
    }

    fn set_backends(&mut self, set: Vec<Backend>) {
        let route_backend = self.route_tx.borrow().target.backend();
        let wanted: BTreeMap<SocketAddr, Vec<Source>> =
            set.into_iter().map(|b| (b.addr, b.sources)).collect();
        self.backends.retain(|addr, state| {
            if wanted.contains_key(addr) {
                return true;
            }
            if state.present {
                tracing::info!(backend = %addr, "backend left the backend set; no new sessions");
                m::backend_role(*addr, None);
            }
            state.present = false;
            // The route's backend is kept, and still checked, so its sessions can hold until
            // another leader appears and its answers still count toward split brain.
            let keep = Some(*addr) == route_backend;
            if !keep {
                state.stop_checking();
            }
            keep
        });
        for (addr, sources) in wanted {
            let state = self.backends.entry(addr).or_insert_with(|| BackendState {
                sources: Vec::new(),
                present: false,
                history: RoleHistory::default(),
                timeline: None,
                last_check: None,
                last_error: None,
                last_error_at: None,
                checker: None,
                failing_since: None,
                postgres: None,
                probing: false,
                last_probe: None,
                check_failing: false,
                claim_since: None,
                lapsed_at: None,
                alive_at: None,
                data_error: None,
                probe_again_at: None,
            });
            if !state.present {
                tracing::info!(backend = %addr, sources = %sources.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "), "backend joined the backend set");
                state.present = true;
                m::backend_joined(addr);
                m::backend_role(addr, Some(state.history.role()));
            }
            state.sources = sources;
        }
        self.start_checks();
    }

    /// Starts a check loop for every backend that has none.
    fn start_checks(&mut self) {
        let unchecked: Vec<SocketAddr> = self
            .backends
            .iter()
            .filter(|(_, state)| state.checker.is_none())
            .map(|(addr, _)| *addr)
            .collect();
        for addr in unchecked {
            let token = self.cancel.child_token();
            self.next_loop_id += 1;
            let loop_id = self.next_loop_id;
            match &mut self.sources {
                Sources::Spawned => self.spawn_check_loop(addr, loop_id, token.clone()),
                #[cfg(test)]
                Sources::Recorded(requests) => requests.push(Request::Checks {
                    addr,
                    loop_id,
                    cancel: token.clone(),
                }),
            }
            if let Some(state) = self.backends.get_mut(&addr) {
                state.checker = Some((loop_id, token));
            }
        }
    }

    /// Applies reloaded settings. Confirmed roles stay, so an unchanged leader keeps its route
    /// and its sessions; loops restart only when what they ask has changed.
    fn reconfigure(&mut self, settings: ViewSettings) {
        if settings == self.settings {
            return;
        }
        if settings.check != self.settings.check {
            tracing::info!(check = ?settings.check.probe, port = settings.check.port, "check settings changed; restarting checks");
            for state in self.backends.values_mut() {
                state.stop_checking();
            }
            self.check = Arc::new(settings.check.clone());
        }
        self.settings = settings;
        self.start_checks();
    }

    /// Feeds one observation through the backend's hysteresis.
    fn observe(&mut self, addr: SocketAddr, role: Role, latency: Option<Duration>) {
        let Some(state) = self.backends.get_mut(&addr) else {
            return;
        };
        if let Some(latency) = latency {
            state.last_check = Some((SystemTime::now(), latency));
        }
        if let Role::Down(error) = &role {
            state.failed(error.clone());
        }
        let failed = matches!(role, Role::Down(_));
        let before = state.history.role().clone();
        let claimed = state.history.claims_leader();
        state.check_failing = failed;
        self.seq += 1;
        let observed =
            state
                .history
                .observe_at(self.seq, role, self.settings.rise, self.settings.fall);
        match observed {
            Observed::Flipped => {
                let after = state.history.role().clone();
                tracing::info!(backend = %addr, from = %before, to = %after, "role changed");
                m::backend_role(addr, Some(&after));
                remember(
                    &mut self.history,
                    "role",
                    format!("{addr}: {before} → {after}"),
                );
            }
            Observed::Probe if state.failing_since.is_none() => {
                state.failing_since = Some((Instant::now(), SystemTime::now()));
                tracing::warn!(backend = %addr, error = state.last_error.as_deref().unwrap_or(""), "leader's check failed; asking its Postgres");
                remember(
                    &mut self.history,
                    "role",
                    format!("{addr}: leader, unconfirmed (check failing)"),
                );
            }
            Observed::Probe | Observed::Same => {}
        }
        let now = Instant::now();
        match (claimed, state.history.claims_leader()) {
            (false, true) => state.claim_since = Some(now),
            (true, false) => {
                if state
                    .claim_since
                    .is_some_and(|since| now.duration_since(since) < self.settings.contest_hold)
                {
                    state.lapsed_at = Some(now);
                }
                state.claim_since = None;
            }
            _ => {}
        }
        // A node whose Postgres port failed is routed again only once a probe finds it
        // answering: its role endpoint's word alone is what sent clients into the failure.
        let probe_data_port =
            !failed && state.data_error.is_some() && state.history.claims_leader();
        if !state.history.is_failing()
            && state.failing_since.take().is_some()
            && state.history.role() == &Role::Leader
        {
            tracing::info!(backend = %addr, "leader confirmed again");
            remember(
                &mut self.history,
                "role",
                format!("{addr}: leader, confirmed"),
            );
        }
        if observed == Observed::Probe || probe_data_port {
            self.probe(addr);
        }
        // Rule 6: a failing leader makes everyone check now, not at the next tick.
        if failed && self.route_tx.borrow().target.backend() == Some(addr) {
            self.recheck_all();
        }
    }

    /// Starts a probe of `addr`'s Postgres unless one is running or one started within
    /// `check.fast_interval`: a flood of failed connects costs the node one probe, not one each.
    fn probe(&mut self, addr: SocketAddr) {
        let Some(state) = self.backends.get_mut(&addr) else {
            return;
        };
        let now = Instant::now();
        if state.probing
            || state
                .last_probe
                .is_some_and(|at| now.duration_since(at) < self.check.fast_interval)
        {
            return;
        }
        state.probing = true;
        state.last_probe = Some(now);
        state.probe_again_at = None;
        #[cfg(test)]
        if let Sources::Recorded(requests) = &mut self.sources {
            requests.push(Request::Probe { addr });
            return;
        }
        let events = self.events.clone();
        let timeout = self.settings.probe_timeout;
        let cancel = self.cancel.clone();
        let probe = tokio::spawn(check::probe_postgres(addr, timeout));
        // The probe's own task, so a panic in it is reported as "could not tell" and the
        // backend is probed again later, never left `probing` for good.
        tokio::spawn(async move {
            let probe = tokio_util::task::AbortOnDropHandle::new(probe);
            let liveness = tokio::select! {
                _ = cancel.cancelled() => return,
                joined = probe => joined.unwrap_or_else(|e| {
                    tracing::error!(backend = %addr, error = %e, "probe task failed");
                    None
                }),
            };
            let _ = events.send(Event::Probed { addr, liveness }).await;
        });
    }

    /// The earliest postponed probe.
    fn next_probe_due(&self) -> Option<Instant> {
        self.backends
            .values()
            .filter_map(|state| state.probe_again_at)
            .min()
    }

    /// Runs the probes whose verdict was postponed and whose time has come.
    fn probe_postponed(&mut self) {
        let now = Instant::now();
        let due: Vec<SocketAddr> = self
            .backends
            .iter()
            .filter(|(_, state)| state.probe_again_at.is_some_and(|at| at <= now))
            .map(|(addr, _)| *addr)
            .collect();
        for addr in due {
            if let Some(state) = self.backends.get_mut(&addr) {
                state.probe_again_at = None;
                state.last_probe = None;
            }
            self.probe(addr);
        }
    }

    /// When the node last showed life: bytes on any of its sessions, or a probe that found its
    /// host alive.
    fn last_life(&self, addr: SocketAddr) -> Option<Instant> {
        let heard = self.counters.get(&addr).and_then(|c| c.heard_at());
        let probed = self.backends.get(&addr).and_then(|s| s.alive_at);
        heard.max(probed)
    }

    fn probed(&mut self, addr: SocketAddr, liveness: Option<Liveness>) {
        let now = Instant::now();
        let last_life = self.last_life(addr).map(|at| now.duration_since(at));
        let window = self.settings.liveness_window;
        let Some(state) = self.backends.get_mut(&addr) else {
            return;
        };
        state.probing = false;
        let Some(liveness) = liveness else {
            if let Some(suppressed) = ratelimit::allow(warning::PROBE, addr) {
                tracing::warn!(backend = %addr, suppressed, "probe skipped: this host is short of descriptors, memory or ports");
            }
            m::local_shortage("probe");
            return;
        };
        m::postgres_probe(addr, &liveness);
        match probe_verdict(&liveness, last_life, window) {
            Verdict::Lives => {
                state.alive_at = Some(now);
                if state.data_error.take().is_some() {
                    tracing::info!(backend = %addr, postgres = %liveness, "Postgres port answers again");
                    remember(
                        &mut self.history,
                        "role",
                        format!("{addr}: Postgres port answers again"),
                    );
                }
            }
            Verdict::ProbeAgainIn(wait) => {
                if let Some(suppressed) = ratelimit::allow(warning::PROBE, addr) {
                    tracing::warn!(backend = %addr, postgres = %liveness, last_life_ms = last_life.map_or(0, |d| d.as_millis() as u64), suppressed, "probe got no handshake, but the node showed life lately; probing again before any verdict");
                }
                state.probe_again_at = Some(now + wait);
                state.postgres = Some(liveness);
                return;
            }
            Verdict::Gone => {
                state.failed(liveness.to_string());
                if state.data_error.is_some() {
                    // Known already: it stays out of the route without flipping its role on
                    // every `leader` answer and probe.
                    state.postgres = Some(liveness);
                    return;
                }
                tracing::warn!(backend = %addr, postgres = %liveness, "Postgres port fails; not routed until a probe finds it answering");
                state.data_error = Some((liveness.to_string(), SystemTime::now()));
            }
        }
        let before = state.history.role().clone();
        let gone = state.history.probed(&liveness);
        if gone {
            let after = state.history.role().clone();
            state.failing_since = None;
            tracing::warn!(backend = %addr, from = %before, to = %after, "role changed: the leader's Postgres is gone");
            m::backend_role(addr, Some(&after));
            remember(
                &mut self.history,
                "role",
                format!("{addr}: {before} → {after}"),
            );
        } else if state.history.is_failing() && state.postgres.as_ref() != Some(&liveness) {
            tracing::warn!(backend = %addr, postgres = %liveness, "leader, unconfirmed: its check fails but its Postgres answers; it stays the route");
        }
        state.postgres = Some(liveness);
        if gone && self.route_tx.borrow().target.backend() == Some(addr) {
            self.recheck_all();
        }
    }

    fn recheck_all(&mut self) {
        let now = Instant::now();
        if self
            .last_recheck
            .is_some_and(|at| now.duration_since(at) < self.check.fast_interval)
        {
            return;
        }
        self.last_recheck = Some(now);
        self.recheck_tx.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn publish(&mut self) {
        // Before the route: a session that reads a new leader finds its counter.
        self.publish_backend_set();
        let previous = self.route_tx.borrow().clone();
        let views: Vec<BackendView<'_>> = self
            .backends
            .iter()
            .map(|(addr, state)| BackendView {
                addr: *addr,
                discovered: state.sources.iter().any(|s| matches!(s, Source::Dns(_))),
                present: state.present,
                role: state.history.role(),
                timeline: state.timeline,
                claim: claim_of(state, &self.settings),
                data_error: state.data_error.as_ref().map(|(error, _)| error.as_str()),
            })
            .collect();
        let route = decide_with(&previous, &views, self.settings.split_brain);
        let route = explain(route, &views, &self.dns_failing);
        drop(views);
        if route != previous {
            log_route_change(&previous, &route);
            remember(&mut self.history, "route", describe_route(&route));
            if route.generation != previous.generation {
                m::route_changed(route.generation);
            }
            if let Target::None(NoRoute::SplitBrain(_)) = &route.target {
                if !matches!(previous.target, Target::None(NoRoute::SplitBrain(_))) {
                    m::split_brain();
                }
            }
            // A stale claim is settled by evidence: recheck everyone now. A dead leader's check
            // then fails and its probe takes it down; a live one answers and is a split brain.
            let verifying = matches!(
                route.target,
                Target::None(NoRoute::Verifying(_)) | Target::Contested(_)
            );
            let lost_leader = previous.leader().is_some() && route.leader().is_none();
            self.route_since = SystemTime::now();
            self.route_tx.send_replace(route);
            if lost_leader || verifying {
                self.recheck_all();
            }
        }
        // Forget a departed leader once the route no longer holds it.
        let route_backend = self.route_tx.borrow().target.backend();
        self.backends.retain(|addr, state| {
            let keep = state.present || Some(*addr) == route_backend;
            if !keep {
                state.stop_checking();
            }
            keep
        });
        let route_backend = self.route_tx.borrow().target.backend();
        m::route_up(self.route_tx.borrow().leader().is_some());
        m::leader_unconfirmed(
            route_backend
                .and_then(|addr| self.backends.get(&addr))
                .is_some_and(|state| state.history.is_failing()),
        );
        self.publish_status();
    }

    /// Publishes the replicas and the session counters, when either changed. A counter stays
    /// while its backend is known or sessions still count against it.
    fn publish_backend_set(&mut self) {
        let known = &self.backends;
        let before = self.counters.len();
        self.counters.retain(|addr, counter| {
            known.contains_key(addr) || counter.sessions.load(Ordering::Relaxed) > 0
        });
        let mut counters_changed = self.counters.len() != before;
        for addr in known.keys() {
            if !self.counters.contains_key(addr) {
                self.counters.insert(*addr, Arc::default());
                counters_changed = true;
            }
        }
        let replicas: Vec<SocketAddr> = self
            .backends
            .iter()
            .filter(|(_, s)| s.present && s.history.is_replica())
            .map(|(addr, _)| *addr)
            .collect();
        let counters = &self.counters;
        self.backends_tx.send_if_modified(|current| {
            let replicas_changed = current.replicas != replicas;
            if replicas_changed {
                current.replicas = replicas;
            }
            if counters_changed {
                current.counters = Arc::new(counters.clone());
            }
            replicas_changed || counters_changed
        });
    }

    /// Session counts are left at 0 here; `/status` reads them from the counters.
    fn publish_status(&self) {
        let status = self
            .backends
            .iter()
            .map(|(addr, state)| BackendStatus {
                address: *addr,
                sources: state.sources.iter().map(ToString::to_string).collect(),
                present: state.present,
                role: state.history.role().clone(),
                last_check_unix_ms: state.last_check.map(|(at, _)| unix_ms(at)),
                last_check_latency_ms: state
                    .last_check
                    .map(|(_, latency)| latency.as_secs_f64() * 1000.0),
                last_error: state.last_error.clone(),
                last_error_unix_ms: state.last_error_at.map(unix_ms),
                unconfirmed: state
                    .failing_since
                    .filter(|_| state.history.is_failing())
                    .map(|(at, wall)| UnconfirmedStatus {
                        since_unix_ms: unix_ms(wall),
                        check_error: state.last_error.clone().unwrap_or_default(),
                        expired: at.elapsed() >= self.settings.unconfirmed_limit,
                    }),
                postgres: state.postgres.as_ref().map(ToString::to_string),
                data_port: state
                    .data_error
                    .as_ref()
                    .map(|(error, since)| DataPortStatus {
                        since_unix_ms: unix_ms(*since),
                        error: error.clone(),
                    }),
                sessions: 0,
                operator: Default::default(),
            })
            .collect();
        self.status_tx.send_replace(ViewStatus {
            backends: status,
            history: Arc::clone(&self.history),
            route_since: self.route_since,
        });
    }

    /// Starts the check loop of one backend, supervised: [`check::check_role`] every interval
    /// (every fast interval while there is no route, or sooner on a recheck), each result sent to
    /// the view. It stops when `cancel` fires or the view is gone.
    fn spawn_check_loop(&self, backend: SocketAddr, loop_id: u64, cancel: CancellationToken) {
        let settings = Arc::clone(&self.check);
        let mut recheck = self.recheck_tx.subscribe();
        let endpoint = settings.endpoint(backend);
        let events = self.events.clone();
        let route = self.route_tx.subscribe();
        self.supervisor.spawn("check", cancel.clone(), async move {
            recheck.mark_unchanged();
            let mut unrouted_since = None;
            loop {
                let started = Instant::now();
                let checked = tokio::select! {
                    _ = cancel.cancelled() => return,
                    observed = check::check_role(endpoint, &settings) => observed,
                };
                let latency = started.elapsed();
                let Some(check::Observation { role, timeline }) = checked else {
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(settings.interval) => continue,
                    }
                };
                m::check_result(backend, &role, latency);
                if let Role::Down(error) = &role {
                    tracing::debug!(backend = %backend, %error, "check failed");
                }
                let event = Event::Checked {
                    addr: backend,
                    loop_id,
                    role,
                    timeline,
                    latency,
                };
                if events.send(event).await.is_err() {
                    return;
                }
                let routed = route.borrow().leader().is_some();
                let wait = check_pause(&settings, routed, &mut unrouted_since, latency);
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                    changed = recheck.changed() => if changed.is_err() { return },
                }
                // However often a recheck is asked for, one endpoint is checked at most once per
                // fast interval, so `check.fall` still spans real time.
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep_until(started + settings.fast_interval) => {}
                }
            }
        });
    }
}

/// The evidence behind a backend's leader claim, for [`roleproxy_core::route::decide_with`].
fn claim_of(state: &BackendState, settings: &ViewSettings) -> Claim {
    let (first, last) = state.history.claim();
    let standing = match state.failing_since {
        Some((at, _))
            if state.history.is_failing() && at.elapsed() >= settings.unconfirmed_limit =>
        {
            Standing::Expired
        }
        _ if state.history.is_failing() => Standing::Unconfirmed,
        _ => Standing::Confirmed,
    };
    let held_down = state
        .claim_since
        .is_some_and(|since| since.elapsed() < settings.contest_hold)
        && state
            .lapsed_at
            .is_none_or(|at| at.elapsed() >= LAPSED_CLAIM_MEMORY);
    Claim {
        first,
        last,
        standing,
        claiming: state.history.claims_leader() && !state.check_failing,
        held_down,
    }
}

/// The pause before a backend's next check. With a route, `check.interval`. Without one,
/// `check.fast_interval` for [`FAST_CHECKS_FOR`], so a promotion is seen within one fast
/// interval, then four of them. Never shorter than the last check took: a slow node is never
/// asked more than half the time.
fn check_pause(
    settings: &CheckSettings,
    routed: bool,
    unrouted_since: &mut Option<Instant>,
    latency: Duration,
) -> Duration {
    let pause = if routed {
        *unrouted_since = None;
        settings.interval
    } else {
        let since = *unrouted_since.get_or_insert_with(Instant::now);
        if since.elapsed() < FAST_CHECKS_FOR {
            settings.fast_interval
        } else {
            (settings.fast_interval * 4).min(settings.interval)
        }
    };
    pause.max(latency)
}

/// Sleeps until `at`, or for ever when there is nothing to wait for.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Adds a change to the timeline, dropping the oldest beyond [`HISTORY_LEN`].
fn remember(history: &mut Arc<VecDeque<Change>>, kind: &'static str, text: String) {
    let history = Arc::make_mut(history);
    if history.len() == HISTORY_LEN {
        history.pop_front();
    }
    history.push_back(Change {
        unix_ms: unix_ms(SystemTime::now()),
        kind: kind.to_owned(),
        text,
    });
}

fn log_route_change(previous: &Route, route: &Route) {
    match &route.target {
        Target::Leader(addr) => {
            tracing::info!(generation = route.generation, leader = %addr, "route: sessions go to leader")
        }
        Target::Held(addr, why) => tracing::warn!(
            generation = route.generation,
            leader = %addr,
            held = %why,
            "route held: existing sessions stay, new ones wait"
        ),
        Target::Contested(addr) => tracing::warn!(
            generation = route.generation,
            leader = %addr,
            "route contested: another node claims leader; new clients wait, the leader's sessions pause at their next transaction boundary"
        ),
        Target::None(reason @ NoRoute::SplitBrain(_)) => tracing::error!(
            generation = route.generation,
            previous = %previous.target.backend().map_or_else(|| "none".to_owned(), |a| a.to_string()),
            reason = %reason,
            "no route: refusing to write to several leaders"
        ),
        Target::None(reason) => tracing::warn!(
            generation = route.generation,
            previous = %previous.target.backend().map_or_else(|| "none".to_owned(), |a| a.to_string()),
            reason = %reason,
            "no route"
        ),
    }
}

#[cfg(test)]
mod sim;

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(n: u8) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, n], 5433))
    }

    fn discovered(addrs: &[SocketAddr]) -> Event {
        let set = addrs
            .iter()
            .map(|&addr| Backend {
                addr,
                sources: vec![Source::Dns("c.internal".into())],
            })
            .collect();
        Event::Discovered(Discovered::Backends(set))
    }

    /// A view that runs no check loop and no probe: these tests feed it events by hand.
    fn view() -> (ClusterView, ViewHandle) {
        let (view, handle, _events) = view_cancelled_by(CancellationToken::new());
        (view, handle)
    }

    /// A view that records what it asks for, with the receiver of its handle's events.
    fn view_cancelled_by(
        cancel: CancellationToken,
    ) -> (ClusterView, ViewHandle, mpsc::Receiver<Event>) {
        view_checking("", cancel)
    }

    /// A recording view whose `[check]` table is `check`.
    fn view_checking(
        check: &str,
        cancel: CancellationToken,
    ) -> (ClusterView, ViewHandle, mpsc::Receiver<Event>) {
        let config = config_checking(check);
        let (supervisor, _ended) = Supervisor::new();
        let (mut view, handle, events) =
            ClusterView::new(ViewSettings::from_config(&config.check), cancel, supervisor);
        view.sources = Sources::Recorded(Vec::new());
        (view, handle, events)
    }

    /// A valid config whose `[check]` table is `check`.
    fn config_checking(check: &str) -> crate::config::Config {
        let text =
            format!("[backends]\ndns_names = []\nbackup = [\"127.0.0.1:9\"]\n[check]\n{check}");
        crate::config::Config::parse(&text, &|_| None).expect("valid")
    }

    /// A view of two nodes, the first routed as leader, the second a replica.
    fn leader_and_replica() -> (ClusterView, ViewHandle) {
        let (mut view, handle) = view();
        step(&mut view, discovered(&[addr(1), addr(2)]));
        answer(&mut view, [Role::Leader, Role::Replica]);
        (view, handle)
    }

    fn step(view: &mut ClusterView, event: Event) {
        view.step(Some(event));
    }

    #[tokio::test]
    async fn session_counts_survive_republishing_and_a_backend_that_leaves_and_returns() {
        let (mut view, handle) = view();
        let sessions = |a| handle.backends.borrow().sessions(a);
        step(&mut view, discovered(&[addr(1), addr(2)]));
        let first = handle.backends.borrow().count(addr(1));
        let second = handle.backends.borrow().count(addr(1));
        assert_eq!(sessions(addr(1)), 2);

        step(&mut view, discovered(&[addr(2), addr(1)]));
        assert_eq!(sessions(addr(1)), 2, "the same backend keeps its counter");

        step(&mut view, discovered(&[addr(2)]));
        assert_eq!(
            sessions(addr(1)),
            2,
            "gone from the set, its sessions still count"
        );
        drop(first);
        assert_eq!(sessions(addr(1)), 1);

        step(&mut view, discovered(&[addr(1), addr(2)]));
        assert_eq!(
            sessions(addr(1)),
            1,
            "back in the set, with the count it left with"
        );
        drop(second);
        assert_eq!(sessions(addr(1)), 0);

        step(&mut view, discovered(&[addr(2)]));
        assert!(
            !view.counters.contains_key(&addr(1)),
            "a departed backend with no sessions is forgotten"
        );
        assert!(view.counters.contains_key(&addr(2)));
    }

    /// What the view asked for since the last call: the addresses it started check loops for
    /// (with their tokens) and the addresses it probed.
    fn requests(view: &mut ClusterView) -> (Vec<(SocketAddr, CancellationToken)>, Vec<SocketAddr>) {
        let Sources::Recorded(requests) = &mut view.sources else {
            panic!("the test view records its requests");
        };
        let (mut checks, mut probes) = (Vec::new(), Vec::new());
        for request in std::mem::take(requests) {
            match request {
                Request::Checks { addr, cancel, .. } => checks.push((addr, cancel)),
                Request::Probe { addr } => probes.push(addr),
            }
        }
        (checks, probes)
    }

    /// A backend that joins is checked; one that leaves stops being checked, unless it is the
    /// route's leader, whose answers still count until another leader appears.
    #[tokio::test]
    async fn backends_are_checked_while_they_are_in_the_set_or_hold_the_route() {
        let (mut view, handle) = view();
        step(&mut view, discovered(&[addr(1), addr(2), addr(3)]));
        let (checks, _) = requests(&mut view);
        let checked: Vec<SocketAddr> = checks.iter().map(|(a, _)| *a).collect();
        assert_eq!(checked, [addr(1), addr(2), addr(3)]);
        view.observe(addr(1), Role::Leader, None);
        view.publish();
        assert_eq!(route(&handle).leader(), Some(addr(1)));

        step(&mut view, discovered(&[addr(2)]));
        let cancelled: Vec<bool> = checks.iter().map(|(_, c)| c.is_cancelled()).collect();
        assert_eq!(
            cancelled,
            [false, false, true],
            "the departed replica's loop ends; the leader's goes on"
        );
        step(&mut view, discovered(&[addr(2), addr(3)]));
        let (again, _) = requests(&mut view);
        let again: Vec<SocketAddr> = again.iter().map(|(a, _)| *a).collect();
        assert_eq!(again, [addr(3)], "a backend that returns is checked again");
    }

    /// The view runs as a task: events sent to its handle move the route, and cancelling it
    /// ends the task and every check loop.
    #[tokio::test]
    async fn the_view_task_follows_its_events_until_cancelled() {
        let cancel = CancellationToken::new();
        let (view, handle, events) = view_cancelled_by(cancel.clone());
        let task = tokio::spawn(view.run(events));
        handle.events.send(discovered(&[addr(1)])).await.unwrap();
        let checked = Event::Checked {
            addr: addr(1),
            loop_id: 1,
            role: Role::Leader,
            timeline: None,
            latency: Duration::from_millis(1),
        };
        handle.events.send(checked).await.unwrap();
        routed_then_cancelled(&handle, addr(1), cancel, task).await;
    }

    /// Waits for the running view to route `leader`, then cancels it and waits for it, and
    /// every loop it started, to end.
    async fn routed_then_cancelled(
        handle: &ViewHandle,
        leader: SocketAddr,
        cancel: CancellationToken,
        task: tokio::task::JoinHandle<()>,
    ) {
        let mut route = handle.route.clone();
        let routed = route.wait_for(|r| r.leader() == Some(leader));
        tokio::time::timeout(Duration::from_secs(10), routed)
            .await
            .expect("the view routed the leader its checks found")
            .unwrap();
        cancel.cancel();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("cancelled, the view ends")
            .unwrap();
    }

    /// A failed connect or startup on the leader makes the view ask at once (a probe of its
    /// Postgres, every backend rechecked); the same failure on any other backend is no evidence
    /// about the route and changes nothing.
    #[tokio::test(start_paused = true)]
    async fn a_failed_connect_is_evidence_only_about_the_leader() {
        let (mut view, handle) = leader_and_replica();
        requests(&mut view);
        let error = || "Connection refused".to_string();
        let status = |handle: &ViewHandle| handle.status.borrow().clone();
        let shown = |handle: &ViewHandle| format!("{:?}", status(handle));
        let quiet = (route(&handle), shown(&handle), *view.recheck_tx.borrow());

        step(
            &mut view,
            Event::ConnectFailed {
                addr: addr(2),
                error: error(),
            },
        );
        step(
            &mut view,
            Event::StartupFailed {
                addr: addr(2),
                error: error(),
            },
        );
        assert_eq!(requests(&mut view).1, [], "no probe of a replica");
        assert_eq!(
            (route(&handle), shown(&handle), *view.recheck_tx.borrow()),
            quiet,
            "nothing changed"
        );

        step(
            &mut view,
            Event::ConnectFailed {
                addr: addr(1),
                error: error(),
            },
        );
        assert_eq!(requests(&mut view).1, [addr(1)], "its Postgres is probed");
        assert_ne!(*view.recheck_tx.borrow(), quiet.2, "everyone is rechecked");
        let leader = &status(&handle).backends[0];
        assert!(
            leader
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("Connection refused")),
            "{leader:?}"
        );

        tokio::time::advance(view.check.fast_interval).await;
        step(
            &mut view,
            Event::Probed {
                addr: addr(1),
                liveness: Some(Liveness::Stalled("within 1s".into())),
            },
        );
        tokio::time::advance(view.check.fast_interval).await;
        let rechecks = *view.recheck_tx.borrow();
        step(
            &mut view,
            Event::StartupFailed {
                addr: addr(1),
                error: "57P03".into(),
            },
        );
        assert_eq!(
            requests(&mut view).1,
            [addr(1)],
            "its Postgres is probed again"
        );
        assert_ne!(
            *view.recheck_tx.borrow(),
            rechecks,
            "everyone is rechecked again"
        );
    }

    /// A reload keeps the route and its sessions. Check loops restart only when what they ask
    /// changed; other settings take effect in place; the same settings change nothing.
    #[tokio::test]
    async fn a_reload_restarts_checks_only_when_what_they_ask_changed() {
        let (mut view, handle) = view();
        step(&mut view, discovered(&[addr(1), addr(2)]));
        view.observe(addr(1), Role::Leader, None);
        view.publish();
        let routed = route(&handle);
        let (first, _) = requests(&mut view);
        let settings = |extra: &str| ViewSettings::from_config(&config_checking(extra).check);
        let cancelled = |loops: &[(SocketAddr, CancellationToken)]| {
            loops
                .iter()
                .map(|(_, c)| c.is_cancelled())
                .collect::<Vec<_>>()
        };

        step(&mut view, Event::Reconfigure(settings("")));
        assert!(
            requests(&mut view).0.is_empty(),
            "the same settings: no new loop"
        );
        assert_eq!(cancelled(&first), [false, false]);

        step(
            &mut view,
            Event::Reconfigure(settings("contest_hold = \"9s\"")),
        );
        assert_eq!(view.settings.contest_hold, Duration::from_secs(9));
        assert!(requests(&mut view).0.is_empty(), "the checks ask the same");
        assert_eq!(cancelled(&first), [false, false]);

        step(&mut view, Event::Reconfigure(settings("interval = \"3s\"")));
        assert_eq!(view.check.interval, Duration::from_secs(3));
        assert_eq!(cancelled(&first), [true, true], "the old loops end");
        let again: Vec<SocketAddr> = requests(&mut view).0.iter().map(|(a, _)| *a).collect();
        assert_eq!(again, [addr(1), addr(2)], "and new ones ask the new way");
        assert_eq!(
            route(&handle),
            routed,
            "the leader keeps its route and generation"
        );
    }

    /// A leader whose checks fail while its Postgres answers stays the route until
    /// `check.unconfirmed_limit`, counted from its first failed check; then its sessions are
    /// held and new clients wait, in the same generation.
    #[tokio::test(start_paused = true)]
    async fn an_unconfirmed_leader_is_routed_until_its_limit_from_the_first_failure() {
        let (mut view, handle) = view();
        step(&mut view, discovered(&[addr(1)]));
        view.observe(addr(1), Role::Leader, None);
        view.publish();
        let generation = route(&handle).generation;
        let limit = view.settings.unconfirmed_limit;
        let unconfirmed =
            |handle: &ViewHandle| handle.status.borrow().backends[0].unconfirmed.clone();

        let mut failed_for = Duration::ZERO;
        let mut since = None;
        while failed_for < limit {
            view.observe(addr(1), Role::Down("HTTP 500".into()), None);
            probed(&mut view, addr(1), Liveness::Alive("authentication".into()));
            assert_eq!(
                route(&handle).target,
                Target::Leader(addr(1)),
                "after {failed_for:?}"
            );
            let shown = unconfirmed(&handle).expect("shown as unconfirmed");
            assert!(!shown.expired);
            assert_eq!(
                *since.get_or_insert(shown.since_unix_ms),
                shown.since_unix_ms
            );
            tokio::time::advance(view.check.interval).await;
            failed_for += view.check.interval;
        }
        view.observe(addr(1), Role::Down("HTTP 500".into()), None);
        view.publish();
        assert_eq!(
            route(&handle),
            Route {
                generation,
                target: Target::Held(addr(1), roleproxy_core::route::Hold::Unconfirmed)
            }
        );
        assert!(unconfirmed(&handle).is_some_and(|u| u.expired));
    }

    /// What the view logs while `during` runs on this thread.
    fn logged(during: impl FnOnce()) -> String {
        #[derive(Clone, Default)]
        struct Lines(Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Lines {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let lines = Lines::default();
        let writer = lines.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, during);
        let bytes = lines.0.lock().unwrap().clone();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// An unconfirmed leader is logged once for each new answer of its Postgres, not on every
    /// probe: a long outage of the role endpoint does not flood the log.
    #[tokio::test]
    async fn an_unconfirmed_leader_is_logged_once_per_probe_answer() {
        let (mut view, _handle) = view();
        step(&mut view, discovered(&[addr(1)]));
        view.observe(addr(1), Role::Leader, None);
        view.publish();
        let mut probe = |liveness: Liveness| {
            logged(|| {
                view.observe(addr(1), Role::Down("HTTP 500".into()), None);
                probed(&mut view, addr(1), liveness);
            })
            .matches("leader, unconfirmed")
            .count()
        };
        let alive = || Liveness::Alive("authentication".into());
        assert_eq!(probe(alive()), 1);
        assert_eq!(probe(alive()), 0, "the same answer again");
        assert_eq!(probe(Liveness::Stalled("within 1s".into())), 1);
    }

    /// A healthy leader's checks never probe its Postgres: a probe is a login's worth of
    /// work on the node, asked for only on evidence.
    #[tokio::test(start_paused = true)]
    async fn a_healthy_leaders_checks_never_probe_its_postgres() {
        let (mut view, _handle) = view();
        step(&mut view, discovered(&[addr(1), addr(2)]));
        for _ in 0..5 {
            view.observe(addr(1), Role::Leader, None);
            view.observe(addr(2), Role::Replica, None);
            view.publish();
            tokio::time::advance(view.check.interval).await;
        }
        assert_eq!(requests(&mut view).1, []);
    }

    /// A failed check's error reaches `/status` with its time, and a node's control characters
    /// in it are written out, not passed to a terminal.
    #[tokio::test]
    async fn a_failed_check_is_shown_with_its_error_written_out() {
        let (mut view, handle) = view();
        step(&mut view, discovered(&[addr(1)]));
        view.observe(addr(1), Role::Down("HTTP 500: \u{1b}[2Jboom".into()), None);
        view.publish();
        let status = handle.status.borrow().clone();
        let backend = &status.backends[0];
        let error = backend.last_error.as_deref().expect("the error is kept");
        assert!(
            error.contains("HTTP 500") && error.contains("boom"),
            "{error:?}"
        );
        assert!(!error.contains('\u{1b}'), "{error:?}");
        assert!(backend.last_error_unix_ms.is_some_and(|ms| ms > 0));
    }

    fn route(handle: &ViewHandle) -> Route {
        handle.route.borrow().clone()
    }

    fn probed(view: &mut ClusterView, addr: SocketAddr, liveness: Liveness) {
        step(
            view,
            Event::Probed {
                addr,
                liveness: Some(liveness),
            },
        );
    }

    fn silent() -> Liveness {
        Liveness::Silent("within 1s".into())
    }

    /// Rule 10: a probe that got no handshake takes a leader down only when nothing else showed
    /// life lately; bytes on a session postpone the verdict to a probe a window later.
    #[tokio::test(start_paused = true)]
    async fn bytes_on_a_session_postpone_a_timeout_verdict() {
        let (mut view, handle) = view();
        step(&mut view, discovered(&[addr(1)]));
        view.observe(addr(1), Role::Leader, None);
        view.publish();
        assert_eq!(route(&handle).leader(), Some(addr(1)));
        let generation = route(&handle).generation;

        let session = handle.backends.borrow().count(addr(1));
        session.heard().store(copy::clock_ms(), Ordering::Relaxed);
        view.observe(addr(1), Role::Down("timed out".into()), None);
        probed(&mut view, addr(1), silent());
        assert_eq!(
            route(&handle),
            Route {
                generation,
                target: Target::Leader(addr(1))
            },
            "bytes just now: the leader stays"
        );
        let due = view.next_probe_due().expect("a probe is due later");
        assert!(due > Instant::now() && due <= Instant::now() + view.settings.liveness_window);
        requests(&mut view);
        view.step(None);
        assert_eq!(requests(&mut view).1, [], "not before it is due");
        tokio::time::advance(due - Instant::now()).await;
        view.step(None);
        assert_eq!(requests(&mut view).1, [addr(1)], "probed again when due");

        // A window later, nothing more heard: the same answer is death.
        tokio::time::advance(view.settings.liveness_window).await;
        probed(&mut view, addr(1), silent());
        assert_eq!(route(&handle).leader(), None, "silent, nothing heard: gone");
        assert_eq!(route(&handle).generation, generation + 1);
    }

    /// A stalled postmaster (handshake done, no answer) is alive; a refusal is death at once,
    /// whatever bytes came before.
    #[tokio::test(start_paused = true)]
    async fn a_stalled_postmaster_lives_and_a_refusal_does_not() {
        let (mut view, handle) = view();
        step(&mut view, discovered(&[addr(1)]));
        view.observe(addr(1), Role::Leader, None);
        view.publish();
        let session = handle.backends.borrow().count(addr(1));
        view.observe(addr(1), Role::Down("HTTP 500".into()), None);
        probed(&mut view, addr(1), Liveness::Stalled("within 1s".into()));
        assert_eq!(route(&handle).leader(), Some(addr(1)), "stalled: alive");
        session.heard().store(copy::clock_ms(), Ordering::Relaxed);
        probed(
            &mut view,
            addr(1),
            Liveness::Gone("connect: refused".into()),
        );
        assert_eq!(route(&handle).leader(), None, "refused: gone at once");
    }

    /// Rule 10: a node whose Postgres port fails is not routed on its role endpoint's word, and
    /// its `leader` answers do not rebuild the route; a probe that finds it answering does.
    #[tokio::test(start_paused = true)]
    async fn a_failing_data_port_keeps_a_leader_out_until_a_probe_finds_it() {
        let (mut view, handle) = view();
        step(&mut view, discovered(&[addr(1)]));
        view.observe(addr(1), Role::Leader, None);
        view.publish();
        step(
            &mut view,
            Event::ConnectFailed {
                addr: addr(1),
                error: "Connection refused".into(),
            },
        );
        probed(
            &mut view,
            addr(1),
            Liveness::Gone("connect: refused".into()),
        );
        let failing = route(&handle);
        assert!(
            matches!(failing.target, Target::None(NoRoute::DataPortFailing(a, _)) if a == addr(1)),
            "{failing:?}"
        );
        requests(&mut view);
        for _ in 0..3 {
            tokio::time::advance(view.check.fast_interval).await;
            view.observe(addr(1), Role::Leader, None);
            view.publish();
            assert_eq!(
                requests(&mut view).1,
                [addr(1)],
                "its `leader` answer asks a probe whether the port answers again"
            );
            probed(
                &mut view,
                addr(1),
                Liveness::Gone("connect: refused".into()),
            );
            assert_eq!(route(&handle), failing, "no new generation per answer");
        }
        assert!(handle.status.borrow().backends[0].data_port.is_some());
        probed(&mut view, addr(1), Liveness::Alive("authentication".into()));
        assert_eq!(route(&handle).leader(), Some(addr(1)));
        assert!(handle.status.borrow().backends[0].data_port.is_none());
    }

    /// Rule 10: another node's claim contests the route for the hold-down; a lapsed claim
    /// resumes it; a claimant that lapsed lately gets no second hold-down.
    #[tokio::test(start_paused = true)]
    async fn a_rival_claim_is_held_down_once_then_judged_at_once() {
        let (mut view, handle) = leader_and_replica();
        let at_1 = route(&handle);
        assert_eq!(at_1.leader(), Some(addr(1)));

        view.observe(addr(2), Role::Leader, None);
        view.publish();
        assert_eq!(route(&handle).target, Target::Contested(addr(1)));
        assert_eq!(route(&handle).generation, at_1.generation);
        view.observe(addr(1), Role::Leader, None);
        view.observe(addr(2), Role::Replica, None);
        view.publish();
        assert_eq!(
            route(&handle),
            at_1,
            "the claim lapsed: resumed, same generation"
        );

        // The same node claims again soon after: no hold-down this time.
        view.observe(addr(2), Role::Leader, None);
        view.observe(addr(1), Role::Leader, None);
        view.publish();
        assert!(
            matches!(route(&handle).target, Target::None(NoRoute::SplitBrain(_))),
            "{:?}",
            route(&handle)
        );
    }

    /// A claim that stood for its whole hold-down was judged, not a brief stray answer: the
    /// node's next claim is held down again.
    #[tokio::test(start_paused = true)]
    async fn a_claim_that_stood_its_hold_down_does_not_count_as_lapsed() {
        let (mut view, handle) = leader_and_replica();
        let at_1 = route(&handle);

        view.observe(addr(2), Role::Leader, None);
        view.publish();
        assert_eq!(route(&handle).target, Target::Contested(addr(1)));
        tokio::time::advance(view.settings.contest_hold).await;
        view.observe(addr(2), Role::Replica, None);
        view.observe(addr(1), Role::Leader, None);
        view.publish();
        assert_eq!(route(&handle), at_1);

        tokio::time::advance(Duration::from_secs(1)).await;
        view.observe(addr(2), Role::Leader, None);
        view.publish();
        assert_eq!(
            route(&handle).target,
            Target::Contested(addr(1)),
            "held down again, not a split brain at once"
        );
    }

    /// Rule 10: a contest, once begun, is not ended by the leader's own 404 or failed check:
    /// its paused sessions resume only once the rival's claim lapses.
    #[tokio::test(start_paused = true)]
    async fn a_contest_outlasts_the_leaders_own_404_and_failed_check() {
        use roleproxy_core::route::Hold;
        let (mut view, handle) = leader_and_replica();
        let generation = route(&handle).generation;
        let contested = Route {
            generation,
            target: Target::Contested(addr(1)),
        };

        view.observe(addr(2), Role::Leader, None);
        view.publish();
        assert_eq!(route(&handle), contested);
        view.observe(addr(1), Role::Down("timed out".into()), None);
        view.publish();
        assert_eq!(route(&handle), contested, "a failed check of its own");
        view.observe(addr(1), Role::Maintenance, None);
        view.publish();
        assert_eq!(route(&handle), contested, "a 404 of its own");

        view.observe(addr(2), Role::Replica, None);
        view.publish();
        assert_eq!(
            route(&handle),
            Route {
                generation,
                target: Target::Held(addr(1), Hold::Maintenance)
            },
            "the claim lapsed: its sessions stay, held by the 404"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_claim_that_outlasts_its_hold_down_is_a_split_brain() {
        let (mut view, handle) = leader_and_replica();
        view.observe(addr(2), Role::Leader, None);
        view.publish();
        assert_eq!(route(&handle).target, Target::Contested(addr(1)));
        tokio::time::advance(view.settings.contest_hold).await;
        view.observe(addr(1), Role::Leader, None);
        view.observe(addr(2), Role::Leader, None);
        view.publish();
        assert!(
            matches!(route(&handle).target, Target::None(NoRoute::SplitBrain(_))),
            "{:?}",
            route(&handle)
        );
    }

    /// Once an unconfirmed leader's check answers again, `/status`'s timeline says so, once; a
    /// healthy leader's answers add nothing to it.
    #[tokio::test]
    async fn a_leader_confirmed_again_is_told_once() {
        let (mut view, handle) = view();
        step(&mut view, discovered(&[addr(1)]));
        let confirmed = |handle: &ViewHandle| {
            let status = handle.status.borrow();
            let history = status.history.iter();
            history
                .filter(|c| c.text.ends_with("leader, confirmed"))
                .count()
        };
        let answers = |view: &mut ClusterView| {
            for _ in 0..3 {
                view.observe(addr(1), Role::Leader, None);
                view.publish();
            }
        };
        answers(&mut view);
        assert_eq!(confirmed(&handle), 0, "never unconfirmed");
        view.observe(addr(1), Role::Down("HTTP 500".into()), None);
        probed(&mut view, addr(1), Liveness::Alive("authentication".into()));
        answers(&mut view);
        assert_eq!(confirmed(&handle), 1);
    }

    /// `/status`'s timeline holds the latest changes, oldest first.
    #[test]
    fn the_timeline_keeps_the_latest_changes() {
        let mut history = Arc::new(VecDeque::new());
        for n in 0..HISTORY_LEN + 3 {
            remember(&mut history, "role", n.to_string());
        }
        let texts: Vec<String> = history.iter().map(|c| c.text.clone()).collect();
        let latest: Vec<String> = (3..HISTORY_LEN + 3).map(|n| n.to_string()).collect();
        assert_eq!(texts, latest);
    }

    /// One check answer from each node, the first `roles` from `addr(1)`, then a publish.
    fn answer<const N: usize>(view: &mut ClusterView, roles: [Role; N]) {
        for (n, role) in (1..).zip(roles) {
            view.observe(addr(n), role, None);
        }
        view.publish();
    }

    fn rechecks(view: &ClusterView) -> u64 {
        *view.recheck_tx.borrow()
    }

    /// Everyone is checked at once only on evidence about the route's leader (its failed
    /// check, a probe that finds it gone), and at most once per fast interval however much
    /// evidence comes: a replica's failure, a healthy answer, or a probe that finds the leader
    /// alive ask nothing more of the nodes.
    #[tokio::test(start_paused = true)]
    async fn everyone_is_rechecked_only_on_evidence_about_the_leader() {
        let (mut view, handle) = view();
        step(&mut view, discovered(&[addr(1), addr(2), addr(3)]));
        view.observe(addr(1), Role::Leader, None);
        view.observe(addr(2), Role::Replica, None);
        view.observe(addr(3), Role::Replica, None);
        view.publish();
        let fast = view.check.fast_interval;
        let failed = || Role::Down("HTTP 500".into());
        tokio::time::advance(fast).await;
        let quiet = rechecks(&view);
        view.observe(addr(2), failed(), None);
        view.observe(addr(1), Role::Leader, None);
        view.publish();
        assert_eq!(
            rechecks(&view),
            quiet,
            "a replica's failure, the leader's health"
        );

        view.observe(addr(1), failed(), None);
        assert_eq!(rechecks(&view), quiet + 1, "the leader's failed check");
        view.observe(addr(1), failed(), None);
        assert_eq!(
            rechecks(&view),
            quiet + 1,
            "again at once: no second recheck"
        );
        tokio::time::advance(fast).await;
        view.observe(addr(1), failed(), None);
        assert_eq!(rechecks(&view), quiet + 2, "a fast interval later");

        tokio::time::advance(fast).await;
        probed(&mut view, addr(1), Liveness::Alive("authentication".into()));
        assert_eq!(route(&handle).leader(), Some(addr(1)));
        assert_eq!(
            rechecks(&view),
            quiet + 2,
            "its Postgres answers: nothing to ask"
        );
        probed(&mut view, addr(1), Liveness::Refusing("refused".into()));
        assert_eq!(route(&handle).leader(), None);
        assert_eq!(rechecks(&view), quiet + 3, "its Postgres is gone");
    }

    /// A leader that steps down leaves no route, and everyone is checked at once, so the
    /// promoted node is found within a fast interval. A rival found dead ends its contest and
    /// asks nothing more.
    #[tokio::test(start_paused = true)]
    async fn losing_the_leader_rechecks_everyone_and_a_dead_rival_does_not() {
        let (mut view, handle) = leader_and_replica();
        let at_1 = route(&handle);
        view.observe(addr(2), Role::Leader, None);
        view.publish();
        assert_eq!(route(&handle).target, Target::Contested(addr(1)));

        tokio::time::advance(view.check.fast_interval).await;
        let before = rechecks(&view);
        view.observe(addr(2), Role::Down("timed out".into()), None);
        view.publish();
        probed(&mut view, addr(2), Liveness::Refusing("refused".into()));
        assert_eq!(route(&handle), at_1, "the contest ends; the leader resumes");
        assert_eq!(rechecks(&view), before, "nothing to ask about the route");

        view.observe(addr(1), Role::Replica, None);
        view.publish();
        assert_eq!(route(&handle).leader(), None);
        assert_eq!(rechecks(&view), before + 1, "the leader stepped down");
    }

    /// A flood of failed connects costs the leader's node one probe per fast interval, even
    /// when the first probe has already answered.
    #[tokio::test(start_paused = true)]
    async fn failed_connects_cost_the_leader_one_probe_per_fast_interval() {
        let (mut view, _handle) = view();
        step(&mut view, discovered(&[addr(1)]));
        view.observe(addr(1), Role::Leader, None);
        view.publish();
        let flood = |view: &mut ClusterView| {
            for _ in 0..3 {
                let error = "Connection refused".to_string();
                step(
                    view,
                    Event::ConnectFailed {
                        addr: addr(1),
                        error,
                    },
                );
            }
            requests(view).1
        };
        assert_eq!(flood(&mut view), [addr(1)]);
        probed(&mut view, addr(1), Liveness::Alive("authentication".into()));
        assert_eq!(
            flood(&mut view),
            [],
            "answered, but within the fast interval"
        );
        tokio::time::advance(view.check.fast_interval).await;
        assert_eq!(flood(&mut view), [addr(1)]);
    }

    /// What dashboards alert on: each new generation counted once (a contest keeps the
    /// generation and counts nothing), each split brain once, when it begins.
    #[tokio::test(start_paused = true)]
    async fn new_leaders_and_split_brains_are_counted_once_each() {
        use crate::metrics::{LEADER_CHANGES_TOTAL, SPLIT_BRAIN_TOTAL};
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let rendered = recorder.handle();
        let value = |series| {
            roleproxy_testkit::harness::metric_value(&rendered.render(), series).unwrap_or_default()
        };
        let (mut view, handle) = view();
        let answers = |view: &mut ClusterView, roles: [Role; 2]| {
            metrics::with_local_recorder(&recorder, || answer(view, roles));
            route(&handle)
        };
        step(&mut view, discovered(&[addr(1), addr(2)]));
        let routed = answers(&mut view, [Role::Leader, Role::Replica]);
        assert_eq!(routed.leader(), Some(addr(1)));
        assert_eq!(value(LEADER_CHANGES_TOTAL), 1.0);
        let contested = answers(&mut view, [Role::Leader, Role::Leader]);
        assert_eq!(contested.target, Target::Contested(addr(1)));
        assert_eq!(
            value(LEADER_CHANGES_TOTAL),
            1.0,
            "a contest keeps the generation"
        );

        tokio::time::advance(view.settings.contest_hold).await;
        for _ in 0..3 {
            let split = answers(&mut view, [Role::Leader, Role::Leader]);
            assert!(
                matches!(split.target, Target::None(NoRoute::SplitBrain(_))),
                "{split:?}"
            );
        }
        assert_eq!(value(SPLIT_BRAIN_TOTAL), 1.0);
    }

    /// Replica sessions are offered the present replicas only, and a session waiting for one
    /// is woken when they change. A departed backend with no sessions leaves the set.
    #[tokio::test]
    async fn the_replicas_offered_are_the_present_ones_and_waiters_are_woken() {
        let (mut view, handle) = view();
        let mut backends = handle.backends.clone();
        step(&mut view, discovered(&[addr(1), addr(2), addr(3)]));
        view.observe(addr(1), Role::Leader, None);
        view.observe(addr(2), Role::Replica, None);
        view.observe(addr(3), Role::Replica, None);
        backends.borrow_and_update();
        view.publish();
        assert!(backends.has_changed().unwrap(), "a waiter is woken");
        assert_eq!(backends.borrow_and_update().replicas, [addr(2), addr(3)]);

        step(&mut view, discovered(&[addr(1), addr(2)]));
        assert!(backends.has_changed().unwrap(), "a waiter is woken");
        assert_eq!(backends.borrow_and_update().replicas, [addr(2)]);
        assert!(!backends.borrow().counters.contains_key(&addr(3)));
    }

    /// A check's latency reaches `/status` in milliseconds.
    #[tokio::test]
    async fn a_checks_latency_is_shown_in_milliseconds() {
        let (mut view, handle) = view();
        step(&mut view, discovered(&[addr(1)]));
        view.observe(addr(1), Role::Replica, Some(Duration::from_millis(25)));
        view.publish();
        let status = handle.status.borrow().clone();
        assert_eq!(status.backends[0].last_check_latency_ms, Some(25.0));
    }

    /// Rule 7 in the view: once the leader's checks fail, a node that answers `leader` is
    /// routed at once, with no hold-down, whatever the old leader's Postgres still says.
    #[tokio::test(start_paused = true)]
    async fn a_promoted_node_takes_over_from_a_leader_whose_checks_fail() {
        let (mut view, handle) = leader_and_replica();
        let at_1 = route(&handle);
        view.observe(addr(1), Role::Down("timed out".into()), None);
        probed(&mut view, addr(1), Liveness::Alive("authentication".into()));
        assert_eq!(
            route(&handle).leader(),
            Some(addr(1)),
            "unconfirmed, still routed"
        );

        view.observe(addr(2), Role::Leader, None);
        view.publish();
        assert_eq!(
            route(&handle),
            Route {
                generation: at_1.generation + 1,
                target: Target::Leader(addr(2))
            }
        );
    }

    /// With `check.rise` above 1, a rival's first `leader` answer already stops new sessions
    /// (the route is contested); its next answer failing withdraws the claim, and the route
    /// resumes.
    #[tokio::test(start_paused = true)]
    async fn a_rivals_claim_contests_only_while_its_checks_answer() {
        let (mut view, handle, _events) = view_checking("rise = 2", CancellationToken::new());
        step(&mut view, discovered(&[addr(1), addr(2)]));
        for _ in 0..2 {
            view.observe(addr(1), Role::Leader, None);
            view.observe(addr(2), Role::Replica, None);
        }
        view.publish();
        let at_1 = route(&handle);
        assert_eq!(at_1.leader(), Some(addr(1)));

        view.observe(addr(2), Role::Leader, None);
        view.publish();
        assert_eq!(route(&handle).target, Target::Contested(addr(1)));
        view.observe(addr(2), Role::Down("timed out".into()), None);
        view.publish();
        assert_eq!(route(&handle), at_1);
    }

    /// The pause between checks: `check.interval` while routed; without a route, the fast
    /// interval for the first 30 s, then four of them (never beyond the interval); never
    /// shorter than the check took.
    #[tokio::test(start_paused = true)]
    async fn checks_pause_by_whether_there_is_a_route_and_since_when() {
        let config = config_checking("interval = \"2s\"\nfast_interval = \"100ms\"");
        let settings = CheckSettings::from_config(&config.check);
        let ms = Duration::from_millis;
        let mut unrouted_since = None;
        let mut pause =
            |routed, latency| check_pause(&settings, routed, &mut unrouted_since, latency);

        assert_eq!(pause(true, ms(5)), ms(2000));
        assert_eq!(pause(false, ms(5)), ms(100), "the route just lost");
        assert_eq!(pause(false, ms(300)), ms(300), "a slow node");
        tokio::time::advance(FAST_CHECKS_FOR - ms(1)).await;
        assert_eq!(pause(false, ms(5)), ms(100));
        tokio::time::advance(ms(1)).await;
        assert_eq!(pause(false, ms(5)), ms(400), "30 s without a route");
        assert_eq!(pause(true, ms(5)), ms(2000));
        assert_eq!(pause(false, ms(5)), ms(100), "a new loss starts over");
        assert_eq!(pause(true, ms(2500)), ms(2500), "a slow node");
    }

    /// The view checks what it discovers at its role endpoint, over real HTTP, and routes the
    /// node that answers `leader`.
    #[tokio::test]
    async fn a_discovered_node_is_checked_at_its_role_endpoint() {
        use roleproxy_testkit::role::{RoleEndpoint, RoleReply};
        let endpoint = RoleEndpoint::start("127.0.0.1:0".parse().unwrap()).await;
        let port = endpoint.addr().port();
        let cancel = CancellationToken::new();
        let check = format!("port = {port}\ninterval = \"100ms\"");
        let (mut view, handle, events) = view_checking(&check, cancel.clone());
        view.sources = Sources::Spawned;
        let task = tokio::spawn(view.run(events));
        let node = SocketAddr::from(([127, 0, 0, 1], 5433));
        handle.events.send(discovered(&[node])).await.unwrap();
        let mut backends = handle.backends.clone();
        let replica = backends.wait_for(|b| b.replicas == [node]);
        tokio::time::timeout(Duration::from_secs(10), replica)
            .await
            .expect("checked as a replica")
            .unwrap();
        endpoint.set(RoleReply::leader());
        routed_then_cancelled(&handle, node, cancel, task).await;
    }

    /// The route's changes are logged with what they mean for sessions.
    #[tokio::test(start_paused = true)]
    async fn route_changes_are_logged_with_their_meaning() {
        let (mut view, _handle) = view();
        step(&mut view, discovered(&[addr(1), addr(2)]));
        let mut answers = |roles: [Role; 2]| logged(|| answer(&mut view, roles));
        let routed = answers([Role::Leader, Role::Replica]);
        assert!(
            routed.contains("route: sessions go to leader") && routed.contains("127.0.0.1:5433"),
            "{routed}"
        );
        let same = answers([Role::Leader, Role::Replica]);
        assert!(!same.contains("route"), "{same}");
        let contested = answers([Role::Leader, Role::Leader]);
        assert!(contested.contains("route contested"), "{contested}");
    }

    #[test]
    fn clients_picking_a_replica_together_spread_out() {
        let counters = [addr(1), addr(2), addr(3)]
            .into_iter()
            .map(|a| (a, Arc::default()))
            .collect();
        let set = BackendSet {
            replicas: vec![addr(1), addr(2), addr(3)],
            counters: Arc::new(counters),
        };
        // The same turn every time: only counting at once spreads them.
        let picked: Vec<SessionGuard> = (0..6)
            .map(|_| set.pick_replica(&set.replicas, &[], 0).expect("a replica"))
            .collect();
        for a in [addr(1), addr(2), addr(3)] {
            assert_eq!(set.sessions(a), 2, "{a}");
        }
        drop(picked);
        for a in [addr(1), addr(2), addr(3)] {
            assert_eq!(set.sessions(a), 0, "{a}");
        }
        // An address the view does not know is counted apart, and reads as none.
        let target = set.count(addr(9));
        assert_eq!((target.addr(), set.sessions(addr(9))), (addr(9), 0));
    }
}
