//! The routing rules: from each backend's role history to one [`Route`].
//!
//! [`decide`] and [`RoleHistory`] are pure and table-tested; [`LeaderView`] is the one task that
//! owns every backend's state, feeds check results through them and publishes the route on a
//! `tokio::sync::watch` channel that every session listens to.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::check::{self, CheckSettings};
use crate::config::{CheckConfig, SplitBrain};
use crate::metrics as m;
use crate::pgwire::Liveness;
use crate::supervise::Supervisor;

/// What a backend's role endpoint said, reduced to what routing needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "role", content = "detail", rename_all = "lowercase")]
pub enum Role {
    /// Not checked yet.
    Unknown,
    Leader,
    Replica,
    /// Any other answer (`readonly`, `zombie`, `witness`, ...): a live node that is not leader.
    Other(String),
    /// HTTP 404: the node is in maintenance; no new sessions, existing ones stay.
    Maintenance,
    /// The check failed: timeout, refused, HTTP error, oversized or unparsable answer.
    Down(String),
}

impl Role {
    /// A label for metrics and logs; the detail of `Other` and `Down` is left out.
    pub fn label(&self) -> &'static str {
        match self {
            Role::Unknown => "unknown",
            Role::Leader => "leader",
            Role::Replica => "replica",
            Role::Other(_) => "other",
            Role::Maintenance => "maintenance",
            Role::Down(_) => "down",
        }
    }

    pub const LABELS: [&'static str; 6] = [
        "unknown",
        "leader",
        "replica",
        "other",
        "maintenance",
        "down",
    ];

    fn same_kind(&self, other: &Role) -> bool {
        match (self, other) {
            (Role::Other(a), Role::Other(b)) => a == b,
            _ => self.label() == other.label(),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Role::Other(word) => write!(f, "other ({word})"),
            Role::Down(error) => write!(f, "down ({error})"),
            _ => f.write_str(self.label()),
        }
    }
}

/// Consecutive-answer hysteresis for one backend, in the manner of HAProxy's rise/fall.
///
/// Becoming leader takes `rise` consecutive `leader` answers; a node that is not leader goes
/// down after `fall` consecutive failed checks, so one lost packet does not count. Any definite
/// non-leader answer (`replica`, 404, another word) counts at once: a node that says it is not
/// leader must never get another write.
///
/// A confirmed leader's failed check does not count toward `fall` at all (rule 7): a busy leader
/// is not a dead one. [`Observed::Probe`] asks the view to probe its Postgres, and only that
/// probe ([`RoleHistory::probed`]) takes it down.
#[derive(Debug, Clone)]
pub struct RoleHistory {
    confirmed: Role,
    pending: Option<(Role, u32)>,
    /// The latest definite answer was `leader` (failed checks leave it as it was).
    claims_leader: bool,
    /// Sequence numbers of the first and the latest `leader` answer of the current claim.
    claim: (u64, u64),
    /// The latest check of this confirmed leader failed: it leads on its Postgres's word only.
    failing: bool,
}

impl Default for RoleHistory {
    fn default() -> Self {
        Self {
            confirmed: Role::Unknown,
            pending: None,
            claims_leader: false,
            claim: (0, 0),
            failing: false,
        }
    }
}

/// What one check result asks of the view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observed {
    /// The confirmed role kept its kind.
    Same,
    /// The confirmed role changed kind.
    Flipped,
    /// A confirmed leader's check failed: only its Postgres can tell whether it is gone.
    Probe,
}

impl RoleHistory {
    pub fn role(&self) -> &Role {
        &self.confirmed
    }

    /// A confirmed replica that has not started answering `leader`: the only kind a replica
    /// listener may use. A node being promoted leaves at its first `leader` answer, not after
    /// `rise` of them, since it may already take writes.
    pub fn is_replica(&self) -> bool {
        self.confirmed == Role::Replica && !self.claims_leader
    }

    /// A confirmed leader whose latest check failed (its Postgres may still answer).
    pub fn is_failing(&self) -> bool {
        self.failing && self.confirmed == Role::Leader
    }

    /// Sequence numbers of the first and latest `leader` answer of the current claim.
    pub fn claim(&self) -> (u64, u64) {
        self.claim
    }

    /// Records one check result; returns true when the confirmed role changed kind.
    /// Sequence numbers are all 0: for callers that do not compare claims.
    pub fn observe(&mut self, observed: Role, rise: u32, fall: u32) -> bool {
        self.observe_at(0, observed, rise, fall) == Observed::Flipped
    }

    /// Records one check result, numbered `seq` by the view (increasing).
    pub fn observe_at(&mut self, seq: u64, observed: Role, rise: u32, fall: u32) -> Observed {
        if matches!(observed, Role::Down(_)) && self.confirmed == Role::Leader {
            self.failing = true;
            self.pending = None;
            return Observed::Probe;
        }
        if !matches!(observed, Role::Down(_)) {
            let leader = observed == Role::Leader;
            if leader {
                if !self.claims_leader {
                    self.claim.0 = seq;
                }
                self.claim.1 = seq;
            }
            self.claims_leader = leader;
            self.failing = false;
        }
        if observed.same_kind(&self.confirmed) {
            // Keep the freshest detail (e.g. the latest error text) without counting a flip.
            self.confirmed = observed;
            self.pending = None;
            return Observed::Same;
        }
        let needed = match &observed {
            Role::Leader => rise,
            Role::Down(_) => fall,
            _ => 1,
        };
        let count = match &self.pending {
            Some((role, n)) if role.same_kind(&observed) => n + 1,
            _ => 1,
        };
        if count >= needed {
            self.confirmed = observed;
            self.pending = None;
            Observed::Flipped
        } else {
            self.pending = Some((observed, count));
            Observed::Same
        }
    }

    /// Applies a probe of the node's Postgres; returns true when the node went down. A leader
    /// whose Postgres does not answer, or refuses connections (57P03), is down at once, even if
    /// its role endpoint still says `leader`: clients cannot use it, there is nothing to wait
    /// `fall` checks for, and a dead leader must never race a promoted one.
    pub fn probed(&mut self, liveness: &Liveness) -> bool {
        if self.confirmed != Role::Leader || matches!(liveness, Liveness::Alive(_)) {
            return false;
        }
        self.confirmed = Role::Down(liveness.to_string());
        self.pending = None;
        self.failing = false;
        // Its next `leader` answer starts a new claim.
        self.claims_leader = false;
        true
    }
}

/// Where a backend address came from.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// Discovered from this DNS name.
    Dns(String),
    /// A configured `backends.backup` address.
    Backup,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Dns(name) => write!(f, "dns:{}", name.trim_end_matches('.')),
            Source::Backup => f.write_str("backup"),
        }
    }
}

/// One backend as routing sees it.
#[derive(Debug, Clone)]
pub struct BackendView<'a> {
    pub addr: SocketAddr,
    /// Discovered through DNS (as opposed to only a backup address).
    pub discovered: bool,
    /// Still in the current backend set. A leader that left keeps being checked while it holds
    /// its sessions.
    pub present: bool,
    pub role: &'a Role,
    /// The timeline a Postgres check last read from it, when it is a leader.
    pub timeline: Option<u32>,
    /// The evidence behind a `leader` role (ignored for other roles).
    pub claim: Claim,
}

/// The evidence behind one leader claim, as plain data: the view numbers check results, and
/// `decide` compares the numbers, never clocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Claim {
    /// The sequence number of the first `leader` answer of this claim.
    pub first: u64,
    /// The sequence number of its latest `leader` answer.
    pub last: u64,
    pub standing: Standing,
}

/// How well a leader claim is backed right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Standing {
    /// Its latest check answered `leader`.
    #[default]
    Confirmed,
    /// Its checks fail but its Postgres answers (or has not been asked yet): it stays the route
    /// until a confirmed claim, a dead Postgres or `check.unconfirmed_limit`.
    Unconfirmed,
    /// Unconfirmed for longer than `check.unconfirmed_limit`: its sessions stay, new clients
    /// wait.
    Expired,
}

/// Why there is no route.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "reason", content = "about", rename_all = "snake_case")]
pub enum NoRoute {
    /// Nothing discovered and no backup: DNS answered no address (or only dropped ones), or
    /// has not answered yet.
    NoBackends,
    /// Nothing to route to, and DNS lookups of these names fail: the cause is DNS.
    DnsFailing(Vec<String>),
    /// Every known node is down: checks fail and its Postgres does not answer.
    Unreachable,
    /// Every known node answers, and each says it is not leader.
    AllReplicas,
    /// Backends exist but none has positively answered `leader` (not checked yet, in
    /// maintenance, or a mix of down and replicas).
    NoLeader,
    /// Several backends claim leader; writes to any of them could be lost.
    SplitBrain(Vec<SocketAddr>),
    /// Several backends claim leader, but one claim is older than a rival's: the old leader
    /// has not answered `leader` since the new one began (an idle failover, usually). It is
    /// probed and rechecked before anything is called split brain.
    Verifying(Vec<SocketAddr>),
    /// The leader still answers, but no longer as leader (fenced or demoted: a planned
    /// switchover), and no other node leads yet. Its sessions may end their transactions.
    SteppedDown(SocketAddr),
}

impl fmt::Display for NoRoute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NoRoute::NoBackends => {
                f.write_str("no nodes: DNS answered no usable address, and there is no backup")
            }
            NoRoute::DnsFailing(names) => write!(
                f,
                "DNS lookups of {} are failing, and no node is known",
                names.join(", ")
            ),
            NoRoute::Unreachable => f.write_str("no node is reachable: every node's checks fail"),
            NoRoute::AllReplicas => f.write_str("every node is a replica: none reports leader"),
            NoRoute::NoLeader => f.write_str("no node reports leader"),
            NoRoute::SplitBrain(addrs) => {
                let list: Vec<String> = addrs.iter().map(ToString::to_string).collect();
                write!(f, "split brain: {} all report leader", list.join(", "))
            }
            NoRoute::Verifying(addrs) => {
                let list: Vec<String> = addrs.iter().map(ToString::to_string).collect();
                write!(
                    f,
                    "verifying: {} report leader, one claim predates the other; rechecking",
                    list.join(", ")
                )
            }
            NoRoute::SteppedDown(addr) => {
                write!(
                    f,
                    "leader {addr} stepped down; no other node reports leader yet"
                )
            }
        }
    }
}

/// Names the cause when nothing can be routed for want of a leader: DNS failing, no node
/// reachable, every node a replica. [`decide`] says *that* there is no leader; this says *why*,
/// in the words clients, `/status`, the stats page and `roleproxy status` all show. Pure.
pub fn explain(route: Route, backends: &[BackendView<'_>], dns_failing: &[String]) -> Route {
    if !matches!(
        route.target,
        Target::None(NoRoute::NoBackends | NoRoute::NoLeader)
    ) {
        return route;
    }
    let present: Vec<&BackendView<'_>> = backends.iter().filter(|b| b.present).collect();
    let why = if present.is_empty() {
        if dns_failing.is_empty() {
            NoRoute::NoBackends
        } else {
            NoRoute::DnsFailing(dns_failing.to_vec())
        }
    } else if present.iter().all(|b| matches!(b.role, Role::Down(_))) {
        NoRoute::Unreachable
    } else if present
        .iter()
        .all(|b| matches!(b.role, Role::Replica | Role::Other(_)))
    {
        NoRoute::AllReplicas
    } else {
        NoRoute::NoLeader
    };
    Route {
        target: Target::None(why),
        ..route
    }
}

/// Where sessions go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", content = "detail", rename_all = "snake_case")]
pub enum Target {
    /// New sessions go to this leader.
    Leader(SocketAddr),
    /// The leader is in maintenance, left DNS, or has been unconfirmed for longer than
    /// `check.unconfirmed_limit`: its sessions stay, new ones wait.
    Held(SocketAddr),
    None(NoRoute),
}

impl Target {
    /// The backend that current sessions belong to.
    pub fn backend(&self) -> Option<SocketAddr> {
        match self {
            Target::Leader(a) | Target::Held(a) => Some(*a),
            Target::None(_) => None,
        }
    }
}

/// The route every session follows. Sessions bound to an older generation are shut down.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Route {
    pub generation: u64,
    pub target: Target,
}

impl Route {
    pub fn initial() -> Self {
        Route {
            generation: 0,
            target: Target::None(NoRoute::NoBackends),
        }
    }

    /// The leader new sessions may connect to.
    pub fn leader(&self) -> Option<SocketAddr> {
        match self.target {
            Target::Leader(a) => Some(a),
            _ => None,
        }
    }
}

/// The routing rules (DESIGN.md, rules 1–5 and 7), with the default split-brain policy:
/// several leaders mean no route.
pub fn decide(previous: &Route, backends: &[BackendView<'_>]) -> Route {
    decide_with(previous, backends, SplitBrain::None)
}

/// The routing rules with a split-brain policy. Pure, so every case is a table row.
pub fn decide_with(previous: &Route, backends: &[BackendView<'_>], policy: SplitBrain) -> Route {
    let claims = |b: &&BackendView<'_>| *b.role == Role::Leader;
    // A discovered node that left DNS but still says leader counts toward split brain: writes
    // must never move from one live leader to another.
    let mut discovered: Vec<&BackendView<'_>> = backends
        .iter()
        .filter(|b| b.discovered)
        .filter(claims)
        .collect();
    discovered.sort_by_key(|b| b.addr);
    let mut backups: Vec<&BackendView<'_>> = backends
        .iter()
        .filter(|b| b.present && !b.discovered)
        .filter(claims)
        .collect();
    backups.sort_by_key(|b| b.addr);
    for claims in [&mut discovered, &mut backups] {
        confirmed_first(claims);
        if policy == SplitBrain::HighestTimeline {
            newest_timeline(claims);
        }
    }
    let choose = |claims: &[&BackendView<'_>]| match claims {
        [one] => sole_claim(previous, one),
        [_, _, ..] => Some(several(claims)),
        [] => None,
    };
    // Rule 4: a backup counts only while no discovered backend is leader.
    let target = choose(&discovered)
        .or_else(|| choose(&backups))
        .or_else(|| held(previous, backends))
        .unwrap_or_else(|| {
            if let Some(addr) = stepped_down(previous, backends) {
                Target::None(NoRoute::SteppedDown(addr))
            } else if backends.iter().any(|b| b.present) {
                Target::None(NoRoute::NoLeader)
            } else {
                Target::None(NoRoute::NoBackends)
            }
        });
    let generation = if target.backend() == previous.target.backend() {
        previous.generation
    } else {
        previous.generation + 1
    };
    Route { generation, target }
}

/// The leader the route had (or was waiting past), if it still answers as a live node that is
/// not leader: `replica` or another word. Down, gone or in maintenance do not count.
fn stepped_down(previous: &Route, backends: &[BackendView<'_>]) -> Option<SocketAddr> {
    let old = match previous.target {
        Target::Leader(addr) | Target::Held(addr) | Target::None(NoRoute::SteppedDown(addr)) => {
            addr
        }
        Target::None(_) => return None,
    };
    backends
        .iter()
        .find(|b| b.addr == old && b.present)
        .filter(|b| matches!(b.role, Role::Replica | Role::Other(_)))
        .map(|b| b.addr)
}

/// What a session does when the route changes under it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Its route still holds: carry on.
    Stay,
    /// Its leader stepped down while alive and nobody else leads yet: end at the next
    /// transaction boundary (rule 9).
    EndTransaction,
    /// Close now: its leader is gone, or another node leads (writes must never land on two).
    Close,
}

/// The fate of a session opened on `addr` under `generation`, given the route now. Pure.
pub fn session_fate(route: &Route, generation: u64, addr: SocketAddr) -> Fate {
    if route.generation == generation {
        Fate::Stay
    } else if route.target == Target::None(NoRoute::SteppedDown(addr)) {
        Fate::EndTransaction
    } else {
        Fate::Close
    }
}

/// The replica a new read-only session goes to: the fewest open sessions, skipping `exclude`
/// (replicas that just failed to connect); `turn` rotates among equally loaded ones so they
/// share a burst. Pure.
pub fn least_loaded(
    replicas: &[SocketAddr],
    sessions: &BTreeMap<SocketAddr, u64>,
    exclude: &[SocketAddr],
    turn: usize,
) -> Option<SocketAddr> {
    let load = |addr: &SocketAddr| sessions.get(addr).copied().unwrap_or(0);
    let candidates: Vec<SocketAddr> = replicas
        .iter()
        .filter(|a| !exclude.contains(a))
        .copied()
        .collect();
    let least = candidates.iter().map(load).min()?;
    let tied: Vec<SocketAddr> = candidates
        .into_iter()
        .filter(|a| load(a) == least)
        .collect();
    tied.get(turn % tied.len()).copied()
}

/// Rule 7: a confirmed claim beats an unconfirmed one. A leader whose checks fail keeps the route
/// only while nobody else positively answers `leader`.
fn confirmed_first(claims: &mut Vec<&BackendView<'_>>) {
    if claims
        .iter()
        .any(|b| b.claim.standing == Standing::Confirmed)
    {
        claims.retain(|b| b.claim.standing == Standing::Confirmed);
    }
}

/// The route for the only leader claim, if it may have one: a present claim is routed unless
/// its unconfirmed time is up; one that left DNS or ran out of time holds its sessions if it
/// was the route.
fn sole_claim(previous: &Route, one: &BackendView<'_>) -> Option<Target> {
    if one.present && one.claim.standing != Standing::Expired {
        Some(Target::Leader(one.addr))
    } else if previous.target.backend() == Some(one.addr) {
        Some(Target::Held(one.addr))
    } else {
        None
    }
}

/// Several leader claims are a split brain only when each has answered `leader` again since
/// every rival's claim began. Otherwise one claim may just be stale (an idle leader that died
/// before its next check): no route, but verifying, not split brain.
fn several(claims: &[&BackendView<'_>]) -> Target {
    let addrs = claims.iter().map(|b| b.addr).collect();
    let stale = claims
        .iter()
        .any(|a| claims.iter().any(|b| a.claim.last < b.claim.first));
    if stale {
        Target::None(NoRoute::Verifying(addrs))
    } else {
        Target::None(NoRoute::SplitBrain(addrs))
    }
}

/// Narrows several leader claims to the one on the strictly newest timeline: the node promoted
/// last is the one replicas can follow, and an old leader on an older timeline has diverged.
/// A tie, or a claim whose timeline is unknown, leaves the list as it is (split brain).
fn newest_timeline(claims: &mut Vec<&BackendView<'_>>) {
    let Some(timelines) = claims
        .iter()
        .map(|b| b.timeline)
        .collect::<Option<Vec<u32>>>()
    else {
        return;
    };
    let Some(newest) = timelines.iter().copied().max() else {
        return;
    };
    if timelines.iter().filter(|t| **t == newest).count() == 1 {
        claims.retain(|b| b.timeline == Some(newest));
    }
}

/// The previous leader keeps its sessions while it is in maintenance, as long as nothing else
/// claims leader.
fn held(previous: &Route, backends: &[BackendView<'_>]) -> Option<Target> {
    let addr = previous.target.backend()?;
    let view = backends.iter().find(|b| b.addr == addr)?;
    (*view.role == Role::Maintenance).then_some(Target::Held(addr))
}

// ---- the task that owns backend state -------------------------------------------------------

/// A backend the discovery wants checked.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Backend {
    /// Where client connections go (`ip:backends.port`, or the backup address).
    pub addr: SocketAddr,
    pub sources: Vec<Source>,
}

/// Input to the leader view.
#[derive(Debug)]
pub enum Event {
    /// The full current backend set, from discovery.
    Backends(Vec<Backend>),
    /// The DNS names whose lookups fail right now (empty once they answer again), from
    /// discovery; it names the cause when nothing can be routed.
    DnsFailing(Vec<String>),
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
    /// What a probe of this backend's Postgres found; `None`: this host could not tell.
    Probed {
        addr: SocketAddr,
        liveness: Option<Liveness>,
    },
    /// New check settings from a reload. Roles already known are kept; loops restart.
    Reconfigure(ViewSettings),
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
        }
    }
}

/// What `/status` shows for one backend.
#[derive(Debug, Clone, Serialize)]
pub struct BackendStatus {
    pub address: SocketAddr,
    pub sources: Vec<String>,
    pub present: bool,
    pub role: Role,
    pub last_check_unix_ms: Option<u64>,
    pub last_check_latency_ms: Option<f64>,
    pub last_error: Option<String>,
    /// When `last_error` happened: an error older than the last check is history, not a
    /// current fault.
    pub last_error_unix_ms: Option<u64>,
    /// Set while this leader's checks fail but its Postgres answers (rule 7).
    pub unconfirmed: Option<UnconfirmedStatus>,
    /// The latest probe of its Postgres, if one ran.
    pub postgres: Option<String>,
    pub sessions: u64,
}

/// A leader that leads on its Postgres's word only, as `/status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct UnconfirmedStatus {
    pub since_unix_ms: u64,
    /// Why its checks fail.
    pub check_error: String,
    /// `check.unconfirmed_limit` has passed: its sessions stay, new clients wait.
    pub expired: bool,
}

/// State shared with the proxy and the admin server.
pub struct Shared {
    pub route: watch::Receiver<Route>,
    /// Backends that check as replica and are still in the backend set, in address order.
    pub replicas: watch::Receiver<Vec<SocketAddr>>,
    /// When the current route was published.
    pub route_since: Mutex<SystemTime>,
    pub backends: Mutex<Vec<BackendStatus>>,
    /// Open sessions per backend, maintained by the proxy.
    pub sessions: Mutex<BTreeMap<SocketAddr, u64>>,
    pub events: mpsc::Sender<Event>,
    /// The latest role and route changes, oldest first, for people reading `/` and `/status`.
    pub history: Mutex<std::collections::VecDeque<Change>>,
    /// The listeners as last started or reloaded.
    pub listeners: Mutex<Vec<ListenerStatus>>,
    /// The cluster's name for people (`Config::cluster_name`), as last started or reloaded.
    pub cluster: Mutex<String>,
    /// Starts the core tasks (check loops, listeners) and knows whether one has ended.
    pub supervisor: Supervisor,
    /// The proxy's own addresses, which nothing connects to.
    pub own: Arc<crate::loops::OwnAddrs>,
}

/// What `/status` shows for one listener.
#[derive(Debug, Clone, Serialize)]
pub struct ListenerStatus {
    pub name: String,
    /// `leader`, `replica`, `replica, else leader`, or `target ADDR`.
    pub serves: String,
    /// Bound addresses (real ports where the configuration said 0).
    pub addresses: Vec<SocketAddr>,
}

/// Role and route changes kept for the timeline.
pub const HISTORY_LEN: usize = 50;

/// One role or route change, as the timeline shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Change {
    pub unix_ms: u64,
    /// `role` or `route`.
    pub kind: &'static str,
    pub text: String,
}

impl Shared {
    /// Picks the least loaded replica (see [`least_loaded`]) and counts a session against it,
    /// under one lock, so clients arriving together spread out.
    pub fn pick_replica(
        self: &Arc<Self>,
        replicas: &[SocketAddr],
        exclude: &[SocketAddr],
        turn: usize,
    ) -> Option<SessionGuard> {
        let mut map = self.sessions.lock().ok()?;
        let addr = least_loaded(replicas, &map, exclude, turn)?;
        *map.entry(addr).or_default() += 1;
        Some(SessionGuard {
            shared: Arc::clone(self),
            addr,
        })
    }

    /// Counts a session against its backend until the guard is dropped.
    pub fn session_guard(self: &Arc<Self>, addr: SocketAddr) -> SessionGuard {
        if let Ok(mut map) = self.sessions.lock() {
            *map.entry(addr).or_default() += 1;
        }
        SessionGuard {
            shared: Arc::clone(self),
            addr,
        }
    }
}

pub struct SessionGuard {
    shared: Arc<Shared>,
    addr: SocketAddr,
}

impl SessionGuard {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        if let Ok(mut map) = self.shared.sessions.lock() {
            if let Some(n) = map.get_mut(&self.addr) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    map.remove(&self.addr);
                }
            }
        }
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
    failing_since: Option<(std::time::Instant, SystemTime)>,
    /// The latest Postgres probe's answer.
    postgres: Option<Liveness>,
    /// A probe is running; another waits for it.
    probing: bool,
    /// When the latest probe started: at most one per `check.fast_interval`.
    last_probe: Option<std::time::Instant>,
}

impl BackendState {
    fn failed(&mut self, error: String) {
        self.last_error = Some(error);
        self.last_error_at = Some(SystemTime::now());
    }

    fn stop_checking(&mut self) {
        if let Some((_, token)) = self.checker.take() {
            token.cancel();
        }
    }
}

/// Owns every backend's state; the only place where check results become a route.
pub struct LeaderView {
    settings: ViewSettings,
    /// The check settings the loops run with, shared so a loop need not copy them.
    check: Arc<CheckSettings>,
    backends: BTreeMap<SocketAddr, BackendState>,
    route_tx: watch::Sender<Route>,
    replicas_tx: watch::Sender<Vec<SocketAddr>>,
    /// Bumped to make every check loop check now (rule 6).
    recheck_tx: watch::Sender<u64>,
    /// Rechecks are at most one per `fast_interval`, however many clients fail to connect.
    last_recheck: Option<std::time::Instant>,
    /// Numbers check results, so claims can be ordered without clocks.
    seq: u64,
    /// DNS names whose lookups fail, as discovery last said.
    dns_failing: Vec<String>,
    next_loop_id: u64,
    shared: Arc<Shared>,
    cancel: CancellationToken,
}

impl LeaderView {
    /// Creates the view and the shared state; call [`LeaderView::run`] to start it.
    pub fn new(
        settings: ViewSettings,
        cancel: CancellationToken,
        supervisor: Supervisor,
    ) -> (LeaderView, Arc<Shared>, mpsc::Receiver<Event>) {
        let (route_tx, route_rx) = watch::channel(Route::initial());
        let (replicas_tx, replicas_rx) = watch::channel(Vec::new());
        let (events_tx, events_rx) = mpsc::channel(1024);
        let (recheck_tx, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            route: route_rx,
            replicas: replicas_rx,
            route_since: Mutex::new(SystemTime::now()),
            backends: Mutex::new(Vec::new()),
            sessions: Mutex::new(BTreeMap::new()),
            history: Mutex::new(std::collections::VecDeque::with_capacity(HISTORY_LEN)),
            listeners: Mutex::new(Vec::new()),
            cluster: Mutex::new(String::new()),
            own: Arc::new(crate::loops::OwnAddrs::new()),
            events: events_tx,
            supervisor,
        });
        let view = LeaderView {
            check: Arc::new(settings.check.clone()),
            settings,
            backends: BTreeMap::new(),
            route_tx,
            replicas_tx,
            recheck_tx,
            last_recheck: None,
            seq: 0,
            dns_failing: Vec::new(),
            next_loop_id: 0,
            shared: Arc::clone(&shared),
            cancel,
        };
        (view, shared, events_rx)
    }

    pub async fn run(mut self, mut events: mpsc::Receiver<Event>) {
        m::set_route_generation(0);
        m::leader_unconfirmed(false);
        loop {
            let event = tokio::select! {
                _ = self.cancel.cancelled() => break,
                event = events.recv() => match event {
                    Some(event) => event,
                    None => break,
                },
            };
            self.apply(event);
            self.publish();
        }
        for state in self.backends.values_mut() {
            state.stop_checking();
        }
    }

    fn apply(&mut self, event: Event) {
        match event {
            Event::Backends(set) => self.set_backends(set),
            Event::DnsFailing(names) => self.dns_failing = names,
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
                    tracing::warn!(backend = %addr, %error, "connect to leader failed; probing its Postgres and re-checking every backend");
                    self.observe(addr, Role::Down(format!("connect: {error}")), None);
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
        for (addr, state) in &mut self.backends {
            if state.checker.is_some() {
                continue;
            }
            let token = self.cancel.child_token();
            self.next_loop_id += 1;
            check::spawn_loop(
                &self.shared,
                *addr,
                self.next_loop_id,
                Arc::clone(&self.check),
                self.recheck_tx.subscribe(),
                token.clone(),
            );
            state.checker = Some((self.next_loop_id, token));
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
                remember(&self.shared, "role", format!("{addr}: {before} → {after}"));
            }
            Observed::Probe if state.failing_since.is_none() => {
                state.failing_since = Some((std::time::Instant::now(), SystemTime::now()));
                tracing::warn!(backend = %addr, error = state.last_error.as_deref().unwrap_or(""), "leader's check failed; asking its Postgres");
                remember(
                    &self.shared,
                    "role",
                    format!("{addr}: leader, unconfirmed (check failing)"),
                );
            }
            Observed::Probe | Observed::Same => {}
        }
        if !state.history.is_failing()
            && state.failing_since.take().is_some()
            && state.history.role() == &Role::Leader
        {
            tracing::info!(backend = %addr, "leader confirmed again");
            remember(&self.shared, "role", format!("{addr}: leader, confirmed"));
        }
        if observed == Observed::Probe {
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
        let now = std::time::Instant::now();
        if state.probing
            || state
                .last_probe
                .is_some_and(|at| now.duration_since(at) < self.check.fast_interval)
        {
            return;
        }
        state.probing = true;
        state.last_probe = Some(now);
        let events = self.shared.events.clone();
        let timeout = self.settings.probe_timeout;
        let cancel = self.cancel.clone();
        tokio::spawn(async move {
            let liveness = tokio::select! {
                _ = cancel.cancelled() => return,
                liveness = check::probe_postgres(addr, timeout) => liveness,
            };
            let _ = events.send(Event::Probed { addr, liveness }).await;
        });
    }

    fn probed(&mut self, addr: SocketAddr, liveness: Option<Liveness>) {
        let Some(state) = self.backends.get_mut(&addr) else {
            return;
        };
        state.probing = false;
        let Some(liveness) = liveness else {
            tracing::warn!(backend = %addr, "probe skipped: out of local resources (descriptors or memory)");
            return;
        };
        m::postgres_probe(addr, &liveness);
        let before = state.history.role().clone();
        let gone = state.history.probed(&liveness);
        if gone {
            let after = state.history.role().clone();
            state.failing_since = None;
            state.failed(liveness.to_string());
            tracing::warn!(backend = %addr, from = %before, to = %after, "role changed: the leader's Postgres is gone");
            m::backend_role(addr, Some(&after));
            remember(&self.shared, "role", format!("{addr}: {before} → {after}"));
        } else if state.history.is_failing() && state.postgres.as_ref() != Some(&liveness) {
            tracing::warn!(backend = %addr, postgres = %liveness, "leader, unconfirmed: its check fails but its Postgres answers; it stays the route");
        }
        state.postgres = Some(liveness);
        if gone && self.route_tx.borrow().target.backend() == Some(addr) {
            self.recheck_all();
        }
    }

    fn recheck_all(&mut self) {
        let now = std::time::Instant::now();
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
        let previous = self.route_tx.borrow().clone();
        let limit = self.settings.unconfirmed_limit;
        let views: Vec<BackendView<'_>> = self
            .backends
            .iter()
            .map(|(addr, state)| BackendView {
                addr: *addr,
                discovered: state.sources.iter().any(|s| matches!(s, Source::Dns(_))),
                present: state.present,
                role: state.history.role(),
                timeline: state.timeline,
                claim: claim_of(state, limit),
            })
            .collect();
        let route = decide_with(&previous, &views, self.settings.split_brain);
        let route = explain(route, &views, &self.dns_failing);
        drop(views);
        if route != previous {
            log_route_change(&previous, &route);
            remember(&self.shared, "route", describe_route(&route));
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
            let verifying = matches!(route.target, Target::None(NoRoute::Verifying(_)));
            let lost_leader = previous.leader().is_some() && route.leader().is_none();
            if let Ok(mut since) = self.shared.route_since.lock() {
                *since = SystemTime::now();
            }
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
        self.publish_replicas();
        self.publish_status();
    }

    fn publish_replicas(&self) {
        let replicas: Vec<SocketAddr> = self
            .backends
            .iter()
            .filter(|(_, s)| s.present && s.history.is_replica())
            .map(|(addr, _)| *addr)
            .collect();
        self.replicas_tx.send_if_modified(|current| {
            let changed = *current != replicas;
            if changed {
                *current = replicas;
            }
            changed
        });
    }

    /// Session counts are left at 0 here; `/status` reads them live.
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
                sessions: 0,
            })
            .collect();
        if let Ok(mut backends) = self.shared.backends.lock() {
            *backends = status;
        }
    }
}

/// The evidence behind a backend's leader role, for [`decide`].
fn claim_of(state: &BackendState, limit: Duration) -> Claim {
    let (first, last) = state.history.claim();
    let standing = match state.failing_since {
        Some((at, _)) if state.history.is_failing() && at.elapsed() >= limit => Standing::Expired,
        _ if state.history.is_failing() => Standing::Unconfirmed,
        _ => Standing::Confirmed,
    };
    Claim {
        first,
        last,
        standing,
    }
}

/// Adds a change to the timeline, dropping the oldest beyond [`HISTORY_LEN`].
fn remember(shared: &Shared, kind: &'static str, text: String) {
    if let Ok(mut history) = shared.history.lock() {
        if history.len() == HISTORY_LEN {
            history.pop_front();
        }
        history.push_back(Change {
            unix_ms: unix_ms(SystemTime::now()),
            kind,
            text,
        });
    }
}

/// A route in words, e.g. `generation 3: sessions go to 127.0.0.12:5433`.
pub fn describe_route(route: &Route) -> String {
    let what = match &route.target {
        Target::Leader(addr) => format!("sessions go to {addr}"),
        Target::Held(addr) => format!("held: {addr} keeps its sessions, new clients wait"),
        Target::None(reason) => format!("no route ({reason})"),
    };
    format!("generation {}: {what}", route.generation)
}

/// Milliseconds since the Unix epoch (0 for a clock before it).
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn log_route_change(previous: &Route, route: &Route) {
    match &route.target {
        Target::Leader(addr) => {
            tracing::info!(generation = route.generation, leader = %addr, "route: sessions go to leader")
        }
        Target::Held(addr) => tracing::warn!(
            generation = route.generation,
            leader = %addr,
            "route held: leader in maintenance, left DNS or unconfirmed too long; existing sessions stay, new ones wait"
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
mod tests {
    use super::*;

    fn addr(n: u8) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, n], 5433))
    }

    fn down() -> Role {
        Role::Down("timed out".into())
    }

    fn route(generation: u64, target: Target) -> Route {
        Route { generation, target }
    }

    /// (node, discovered, present, role)
    type Row = (u8, bool, bool, Role);

    fn views(rows: &[Row]) -> Vec<BackendView<'_>> {
        rows.iter()
            .map(|(n, discovered, present, role)| BackendView {
                addr: addr(*n),
                discovered: *discovered,
                present: *present,
                role,
                timeline: None,
                claim: Claim::default(),
            })
            .collect()
    }

    fn run(previous: &Route, rows: &[Row]) -> Route {
        decide(previous, &views(rows))
    }

    #[test]
    fn no_route_names_its_cause() {
        use Role::*;
        let dns = vec!["iad.app.internal (timeout)".to_string()];
        let cases: Vec<(&str, Vec<Row>, &[String], NoRoute)> = vec![
            (
                "nothing known, DNS fine: no nodes",
                vec![],
                &[],
                NoRoute::NoBackends,
            ),
            (
                "nothing known, DNS failing: DNS is the cause",
                vec![],
                &dns,
                NoRoute::DnsFailing(dns.clone()),
            ),
            (
                "a node that left DNS does not count as known",
                vec![(11, true, false, down())],
                &dns,
                NoRoute::DnsFailing(dns.clone()),
            ),
            (
                "every node down: unreachable, whatever DNS does",
                vec![(11, true, true, down()), (12, true, true, down())],
                &dns,
                NoRoute::Unreachable,
            ),
            (
                "every node a replica or another word",
                vec![
                    (11, true, true, Replica),
                    (12, true, true, Other("zombie".into())),
                ],
                &[],
                NoRoute::AllReplicas,
            ),
            (
                "a mix, or nodes not checked yet: no leader",
                vec![(11, true, true, Replica), (12, true, true, Unknown)],
                &[],
                NoRoute::NoLeader,
            ),
            (
                "maintenance is not a replica",
                vec![(11, true, true, Maintenance)],
                &[],
                NoRoute::NoLeader,
            ),
        ];
        let previous = route(2, Target::None(NoRoute::NoBackends));
        for (name, rows, failing, expected) in cases {
            let views = views(&rows);
            let explained = explain(decide(&previous, &views), &views, failing);
            assert_eq!(explained, route(2, Target::None(expected)), "{name}");
        }
        // A route, a split brain or a held leader is left as it is.
        let rows = vec![(11, true, true, Leader), (12, true, true, Leader)];
        let views = views(&rows);
        let split = decide(&previous, &views);
        assert_eq!(explain(split.clone(), &views, &dns), split);
    }

    #[test]
    fn routing_rules() {
        use Role::*;
        let none = route(0, Target::None(NoRoute::NoBackends));
        let at_11 = route(4, Target::Leader(addr(11)));
        let held_11 = route(4, Target::Held(addr(11)));
        let stepped_11 = route(5, Target::None(NoRoute::SteppedDown(addr(11))));
        let cases: Vec<(&str, Route, Vec<Row>, Route)> = vec![
            (
                "nothing discovered: no route",
                none.clone(),
                vec![],
                none.clone(),
            ),
            (
                "nodes not checked yet: nothing is routed before a positive answer",
                none.clone(),
                vec![(11, true, true, Unknown), (12, true, true, Unknown)],
                route(0, Target::None(NoRoute::NoLeader)),
            ),
            (
                "one leader: it is the route, and the generation moves",
                none.clone(),
                vec![(11, true, true, Leader), (12, true, true, Replica)],
                route(1, Target::Leader(addr(11))),
            ),
            (
                "same leader again: generation stays",
                at_11.clone(),
                vec![(11, true, true, Leader), (12, true, true, Replica)],
                at_11.clone(),
            ),
            (
                "leader moves: new generation",
                at_11.clone(),
                vec![(11, true, true, Replica), (12, true, true, Leader)],
                route(5, Target::Leader(addr(12))),
            ),
            (
                "leader goes down: no route, new generation",
                at_11.clone(),
                vec![(11, true, true, down()), (12, true, true, Replica)],
                route(5, Target::None(NoRoute::NoLeader)),
            ),
            (
                "two leaders: split brain, no route",
                at_11.clone(),
                vec![(11, true, true, Leader), (12, true, true, Leader)],
                route(
                    5,
                    Target::None(NoRoute::SplitBrain(vec![addr(11), addr(12)])),
                ),
            ),
            (
                "HTTP 500 / other words are not leader",
                none.clone(),
                vec![
                    (11, true, true, down()),
                    (12, true, true, Other("zombie".into())),
                ],
                route(0, Target::None(NoRoute::NoLeader)),
            ),
            (
                "backup used while no discovered node is leader",
                none.clone(),
                vec![(11, true, true, Replica), (1, false, true, Leader)],
                route(1, Target::Leader(addr(1))),
            ),
            (
                "backup ignored once a discovered node is leader",
                route(1, Target::Leader(addr(1))),
                vec![(11, true, true, Leader), (1, false, true, Leader)],
                route(2, Target::Leader(addr(11))),
            ),
            (
                "backup that is not leader is no route",
                none.clone(),
                vec![(1, false, true, Replica)],
                route(0, Target::None(NoRoute::NoLeader)),
            ),
            (
                "leader in maintenance: held, same generation",
                at_11.clone(),
                vec![(11, true, true, Maintenance), (12, true, true, Replica)],
                held_11.clone(),
            ),
            (
                "maintenance ends: leader again, same generation",
                held_11.clone(),
                vec![(11, true, true, Leader)],
                at_11.clone(),
            ),
            (
                "another leader while held: it takes over",
                held_11.clone(),
                vec![(11, true, true, Maintenance), (12, true, true, Leader)],
                route(5, Target::Leader(addr(12))),
            ),
            (
                "a replica in maintenance is simply not leader",
                none.clone(),
                vec![(11, true, true, Maintenance)],
                route(0, Target::None(NoRoute::NoLeader)),
            ),
            (
                "leader left DNS: held",
                at_11.clone(),
                vec![(11, true, false, Leader), (12, true, true, Replica)],
                held_11.clone(),
            ),
            (
                "a departed leader still claiming leader counts toward split brain",
                at_11.clone(),
                vec![(11, true, false, Leader), (12, true, true, Leader)],
                route(
                    5,
                    Target::None(NoRoute::SplitBrain(vec![addr(11), addr(12)])),
                ),
            ),
            (
                "a departed leader that stops claiming leader lets the new one in",
                held_11.clone(),
                vec![(11, true, false, Replica), (12, true, true, Leader)],
                route(5, Target::Leader(addr(12))),
            ),
            (
                "a departed leader that goes down loses the route",
                held_11.clone(),
                vec![(11, true, false, down()), (12, true, true, Replica)],
                route(5, Target::None(NoRoute::NoLeader)),
            ),
            (
                "two backups claiming leader: split brain",
                none.clone(),
                vec![(1, false, true, Leader), (2, false, true, Leader)],
                route(0, Target::None(NoRoute::SplitBrain(vec![addr(1), addr(2)]))),
            ),
            (
                "a departed node is never a new route",
                none.clone(),
                vec![(11, true, false, Leader)],
                route(0, Target::None(NoRoute::NoBackends)),
            ),
            (
                "split brain resolves: route, generation moves",
                route(
                    5,
                    Target::None(NoRoute::SplitBrain(vec![addr(11), addr(12)])),
                ),
                vec![(11, true, true, down()), (12, true, true, Leader)],
                route(6, Target::Leader(addr(12))),
            ),
            (
                "no route stays no route: generation stays",
                route(5, Target::None(NoRoute::NoLeader)),
                vec![(11, true, true, Replica)],
                route(5, Target::None(NoRoute::NoLeader)),
            ),
            (
                "leader answers replica, nobody else leads: it stepped down",
                at_11.clone(),
                vec![(11, true, true, Replica), (12, true, true, Replica)],
                stepped_11.clone(),
            ),
            (
                "leader answers another word: stepped down",
                at_11.clone(),
                vec![(11, true, true, Other("readonly".into()))],
                stepped_11.clone(),
            ),
            (
                "stepped down, still answering replica: same route, same generation",
                stepped_11.clone(),
                vec![(11, true, true, Replica), (12, true, true, Replica)],
                stepped_11.clone(),
            ),
            (
                "stepped down, then another node leads: it is the route",
                stepped_11.clone(),
                vec![(11, true, true, Replica), (12, true, true, Leader)],
                route(6, Target::Leader(addr(12))),
            ),
            (
                "stepped down, then down: no route, the transactions' wait is over",
                stepped_11.clone(),
                vec![(11, true, true, down()), (12, true, true, Replica)],
                route(5, Target::None(NoRoute::NoLeader)),
            ),
            (
                "held leader answers replica: stepped down",
                held_11.clone(),
                vec![(11, true, true, Replica)],
                stepped_11.clone(),
            ),
            (
                "a departed leader answering replica has not stepped down, it left",
                held_11.clone(),
                vec![(11, true, false, Replica), (12, true, true, Replica)],
                route(5, Target::None(NoRoute::NoLeader)),
            ),
            (
                "a replica that was never the route has not stepped down",
                route(5, Target::None(NoRoute::NoLeader)),
                vec![(11, true, true, Replica)],
                route(5, Target::None(NoRoute::NoLeader)),
            ),
        ];
        for (what, previous, rows, expected) in cases {
            assert_eq!(run(&previous, &rows), expected, "{what}");
        }
    }

    #[test]
    fn session_fates() {
        let stepped_11 = route(5, Target::None(NoRoute::SteppedDown(addr(11))));
        // (what, route now, session's generation and node, fate)
        let cases = [
            (
                "route unchanged",
                route(4, Target::Leader(addr(11))),
                (4, 11),
                Fate::Stay,
            ),
            (
                "held (maintenance, left DNS)",
                route(4, Target::Held(addr(11))),
                (4, 11),
                Fate::Stay,
            ),
            (
                "its leader stepped down",
                stepped_11.clone(),
                (4, 11),
                Fate::EndTransaction,
            ),
            (
                "another node stepped down",
                stepped_11,
                (4, 12),
                Fate::Close,
            ),
            (
                "another node leads",
                route(6, Target::Leader(addr(12))),
                (4, 11),
                Fate::Close,
            ),
            (
                "its leader went down",
                route(5, Target::None(NoRoute::NoLeader)),
                (4, 11),
                Fate::Close,
            ),
            (
                "split brain",
                route(
                    5,
                    Target::None(NoRoute::SplitBrain(vec![addr(11), addr(12)])),
                ),
                (4, 11),
                Fate::Close,
            ),
        ];
        for (what, now, (generation, node), fate) in cases {
            assert_eq!(session_fate(&now, generation, addr(node)), fate, "{what}");
        }
    }

    #[test]
    fn hysteresis() {
        use Role::*;
        // (rise, fall, answers, confirmed role after each answer)
        let cases: Vec<(u32, u32, Vec<Role>, Vec<&str>)> = vec![
            (1, 1, vec![Leader], vec!["leader"]),
            (2, 1, vec![Leader, Leader], vec!["unknown", "leader"]),
            (
                2,
                1,
                vec![Leader, Replica, Leader],
                vec!["unknown", "replica", "replica"],
            ),
            (
                1,
                2,
                vec![Leader, down(), Leader],
                vec!["leader", "leader", "leader"],
            ),
            // Rule 7: a leader's failed checks never count toward `fall`; only its Postgres
            // probe takes it down.
            (
                1,
                2,
                vec![Leader, down(), down(), down()],
                vec!["leader", "leader", "leader", "leader"],
            ),
            // A node that is not leader still goes down after `fall` failed checks.
            (
                1,
                2,
                vec![Replica, down(), down()],
                vec!["replica", "replica", "down"],
            ),
            (1, 3, vec![Leader, Replica], vec!["leader", "replica"]),
            (
                1,
                3,
                vec![Leader, Maintenance],
                vec!["leader", "maintenance"],
            ),
            (
                1,
                1,
                vec![Other("zombie".into()), Other("witness".into())],
                vec!["other", "other"],
            ),
        ];
        for (rise, fall, answers, expected) in cases {
            let mut history = RoleHistory::default();
            let got: Vec<&str> = answers
                .iter()
                .map(|a| {
                    history.observe(a.clone(), rise, fall);
                    history.role().label()
                })
                .collect();
            assert_eq!(got, expected, "rise {rise} fall {fall} answers {answers:?}");
        }
    }

    #[test]
    fn a_replica_that_answers_leader_leaves_the_replica_set_at_its_first_answer() {
        let (rise, fall) = (3, 2);
        // (answer, confirmed role afterwards, usable as a replica)
        let steps: &[(Role, &str, bool)] = &[
            (Role::Replica, "replica", true),
            (down(), "replica", true),
            (Role::Leader, "replica", false),
            (down(), "replica", false),
            (Role::Leader, "replica", false),
            (Role::Replica, "replica", true),
            (Role::Leader, "replica", false),
            (Role::Leader, "replica", false),
            (Role::Leader, "leader", false),
        ];
        let mut history = RoleHistory::default();
        for (i, (answer, role, usable)) in steps.iter().enumerate() {
            history.observe(answer.clone(), rise, fall);
            assert_eq!(
                (history.role().label(), history.is_replica()),
                (*role, *usable),
                "after step {i} ({answer})"
            );
        }
    }

    #[test]
    fn observe_reports_flips_only() {
        let mut h = RoleHistory::default();
        assert!(h.observe(Role::Replica, 1, 2));
        assert!(!h.observe(Role::Replica, 1, 2));
        assert!(!h.observe(down(), 1, 2));
        assert!(h.observe(down(), 1, 2));
        assert!(!h.observe(Role::Down("refused".into()), 1, 2));
        assert_eq!(h.role(), &Role::Down("refused".into()));
    }

    #[test]
    fn a_failing_leader_is_taken_down_only_by_its_postgres() {
        let gone = Liveness::Gone("connect: connection refused".into());
        let refusing = Liveness::Refusing("57P03: the database system is shutting down".into());
        let alive = Liveness::Alive("53300: sorry, too many clients already".into());
        // (what happens, observed outcome or probe result, role after, failing after)
        enum Step {
            Check(Role, Observed),
            Probe(Liveness, bool),
        }
        use Step::*;
        let rows: Vec<(&str, Vec<Step>, &str, bool)> = vec![
            (
                "a failed check asks for a probe and changes nothing yet",
                vec![
                    Check(Role::Leader, Observed::Flipped),
                    Check(down(), Observed::Probe),
                ],
                "leader",
                true,
            ),
            (
                "Postgres answers 53300: leader, unconfirmed, however many checks fail",
                vec![
                    Check(Role::Leader, Observed::Flipped),
                    Check(down(), Observed::Probe),
                    Probe(alive.clone(), false),
                    Check(down(), Observed::Probe),
                    Check(down(), Observed::Probe),
                    Probe(alive.clone(), false),
                ],
                "leader",
                true,
            ),
            (
                "its next leader answer confirms it again",
                vec![
                    Check(Role::Leader, Observed::Flipped),
                    Check(down(), Observed::Probe),
                    Probe(alive.clone(), false),
                    Check(Role::Leader, Observed::Same),
                ],
                "leader",
                false,
            ),
            (
                "Postgres gone: down at once, no fall wait",
                vec![
                    Check(Role::Leader, Observed::Flipped),
                    Check(down(), Observed::Probe),
                    Probe(gone.clone(), true),
                ],
                "down",
                false,
            ),
            (
                "Postgres refusing (57P03): down at once",
                vec![
                    Check(Role::Leader, Observed::Flipped),
                    Check(down(), Observed::Probe),
                    Probe(refusing.clone(), true),
                ],
                "down",
                false,
            ),
            (
                "a definite answer still counts at once",
                vec![
                    Check(Role::Leader, Observed::Flipped),
                    Check(down(), Observed::Probe),
                    Check(Role::Replica, Observed::Flipped),
                ],
                "replica",
                false,
            ),
            (
                "a Postgres that does not answer takes a leader down even if its endpoint says leader",
                vec![
                    Check(Role::Leader, Observed::Flipped),
                    Check(down(), Observed::Probe),
                    Check(Role::Leader, Observed::Same),
                    Probe(gone.clone(), true),
                ],
                "down",
                false,
            ),
            (
                "a probe says nothing about a node that is not leader",
                vec![
                    Check(Role::Replica, Observed::Flipped),
                    Probe(gone.clone(), false),
                ],
                "replica",
                false,
            ),
        ];
        for (what, steps, role, failing) in rows {
            let mut h = RoleHistory::default();
            for (i, step) in steps.into_iter().enumerate() {
                match step {
                    Check(answer, expected) => {
                        assert_eq!(
                            h.observe_at(i as u64, answer, 1, 2),
                            expected,
                            "{what}: step {i}"
                        )
                    }
                    Probe(liveness, down) => {
                        assert_eq!(h.probed(&liveness), down, "{what}: step {i}")
                    }
                }
            }
            assert_eq!(
                (h.role().label(), h.is_failing()),
                (role, failing),
                "{what}"
            );
        }
    }

    #[test]
    fn a_claim_is_numbered_from_its_first_leader_answer() {
        let mut h = RoleHistory::default();
        let answers = [
            (1, Role::Replica),
            (2, Role::Leader),
            (3, down()),
            (4, Role::Leader),
            (5, Role::Leader),
        ];
        for (seq, answer) in answers {
            h.observe_at(seq, answer, 1, 2);
        }
        assert_eq!(h.claim(), (2, 5), "failed checks do not end a claim");
        h.observe_at(6, Role::Replica, 1, 2);
        h.observe_at(7, Role::Leader, 1, 2);
        assert_eq!(h.claim(), (7, 7), "a replica answer ends it");
        h.observe_at(8, down(), 1, 2);
        h.probed(&Liveness::Gone("refused".into()));
        h.observe_at(9, Role::Leader, 1, 2);
        assert_eq!(h.claim(), (9, 9), "a dead Postgres ends it");
    }

    #[test]
    fn leaving_the_route_needs_positive_evidence() {
        use Standing::*;
        let at_11 = route(4, Target::Leader(addr(11)));
        let claim = |first, last, standing| Claim {
            first,
            last,
            standing,
        };
        let ok = |first, last| claim(first, last, Confirmed);
        // (what, previous, [(node, present, role, claim)], expected)
        type ClaimRow = (u8, bool, Role, Claim);
        let rows: Vec<(&str, Route, Vec<ClaimRow>, Route)> = vec![
            (
                "an unconfirmed leader that is the route keeps it and its generation",
                at_11.clone(),
                vec![
                    (11, true, Role::Leader, claim(1, 5, Unconfirmed)),
                    (12, true, Role::Replica, Claim::default()),
                ],
                at_11.clone(),
            ),
            (
                "an unconfirmed leader past the bound holds: sessions stay, new clients wait",
                at_11.clone(),
                vec![(11, true, Role::Leader, claim(1, 5, Expired))],
                route(4, Target::Held(addr(11))),
            ),
            (
                "an expired claim that is not the route is no route",
                route(4, Target::None(NoRoute::NoLeader)),
                vec![(11, true, Role::Leader, claim(1, 5, Expired))],
                route(4, Target::None(NoRoute::NoLeader)),
            ),
            (
                "a confirmed claim beats an unconfirmed one: the route moves",
                at_11.clone(),
                vec![
                    (11, true, Role::Leader, claim(1, 5, Unconfirmed)),
                    (12, true, Role::Leader, ok(7, 9)),
                ],
                route(5, Target::Leader(addr(12))),
            ),
            (
                "a confirmed claim beats an expired one",
                route(4, Target::Held(addr(11))),
                vec![
                    (11, true, Role::Leader, claim(1, 5, Expired)),
                    (12, true, Role::Leader, ok(7, 9)),
                ],
                route(5, Target::Leader(addr(12))),
            ),
            (
                "a stale claim (last answer before the rival's first) is verifying, not split brain",
                at_11.clone(),
                vec![
                    (11, true, Role::Leader, ok(1, 5)),
                    (12, true, Role::Leader, ok(7, 7)),
                ],
                route(
                    5,
                    Target::None(NoRoute::Verifying(vec![addr(11), addr(12)])),
                ),
            ),
            (
                "the old leader answers leader again after the rival began: split brain",
                route(
                    5,
                    Target::None(NoRoute::Verifying(vec![addr(11), addr(12)])),
                ),
                vec![
                    (11, true, Role::Leader, ok(1, 8)),
                    (12, true, Role::Leader, ok(7, 7)),
                ],
                route(
                    5,
                    Target::None(NoRoute::SplitBrain(vec![addr(11), addr(12)])),
                ),
            ),
            (
                "the old leader's Postgres is gone: the new leader is routed",
                route(
                    5,
                    Target::None(NoRoute::Verifying(vec![addr(11), addr(12)])),
                ),
                vec![
                    (11, true, Role::Down("gone".into()), ok(1, 5)),
                    (12, true, Role::Leader, ok(7, 7)),
                ],
                route(6, Target::Leader(addr(12))),
            ),
            (
                "the old leader alive but failing its checks: beaten by the confirmed rival",
                route(
                    5,
                    Target::None(NoRoute::Verifying(vec![addr(11), addr(12)])),
                ),
                vec![
                    (11, true, Role::Leader, claim(1, 5, Unconfirmed)),
                    (12, true, Role::Leader, ok(7, 7)),
                ],
                route(6, Target::Leader(addr(12))),
            ),
            (
                "two unconfirmed claims, both re-confirmed since the other began: split brain",
                at_11.clone(),
                vec![
                    (11, true, Role::Leader, claim(1, 9, Unconfirmed)),
                    (12, true, Role::Leader, claim(2, 8, Unconfirmed)),
                ],
                route(
                    5,
                    Target::None(NoRoute::SplitBrain(vec![addr(11), addr(12)])),
                ),
            ),
            (
                "an unconfirmed leader that left DNS holds",
                at_11.clone(),
                vec![
                    (11, false, Role::Leader, claim(1, 5, Unconfirmed)),
                    (12, true, Role::Replica, Claim::default()),
                ],
                route(4, Target::Held(addr(11))),
            ),
        ];
        for (what, previous, backends, expected) in rows {
            let views: Vec<BackendView<'_>> = backends
                .iter()
                .map(|(n, present, role, claim)| BackendView {
                    addr: addr(*n),
                    discovered: true,
                    present: *present,
                    role,
                    timeline: None,
                    claim: *claim,
                })
                .collect();
            assert_eq!(decide(&previous, &views), expected, "{what}");
        }
    }

    #[test]
    fn highest_timeline_settles_split_brain_only_when_one_is_newest() {
        use Role::*;
        let previous = route(3, Target::Leader(addr(1)));
        // (node, discovered, present, role, timeline) → expected target
        type TimelineRow = (u8, bool, bool, Role, Option<u32>);
        let rows: &[(&[TimelineRow], SplitBrain, Target)] = &[
            (
                &[
                    (1, true, true, Leader, Some(3)),
                    (2, true, true, Leader, Some(4)),
                ],
                SplitBrain::HighestTimeline,
                Target::Leader(addr(2)),
            ),
            (
                &[
                    (1, true, true, Leader, Some(3)),
                    (2, true, true, Leader, Some(4)),
                ],
                SplitBrain::None,
                Target::None(NoRoute::SplitBrain(vec![addr(1), addr(2)])),
            ),
            // A tie is still split brain.
            (
                &[
                    (1, true, true, Leader, Some(4)),
                    (2, true, true, Leader, Some(4)),
                ],
                SplitBrain::HighestTimeline,
                Target::None(NoRoute::SplitBrain(vec![addr(1), addr(2)])),
            ),
            // An unknown timeline cannot be compared.
            (
                &[
                    (1, true, true, Leader, Some(3)),
                    (2, true, true, Leader, None),
                ],
                SplitBrain::HighestTimeline,
                Target::None(NoRoute::SplitBrain(vec![addr(1), addr(2)])),
            ),
            // The old leader, still on the route, is newest but left DNS: it holds.
            (
                &[
                    (1, true, false, Leader, Some(5)),
                    (2, true, true, Leader, Some(4)),
                ],
                SplitBrain::HighestTimeline,
                Target::Held(addr(1)),
            ),
            // Three claims, one newest.
            (
                &[
                    (1, true, true, Leader, Some(2)),
                    (2, true, true, Leader, Some(7)),
                    (3, true, true, Leader, Some(6)),
                ],
                SplitBrain::HighestTimeline,
                Target::Leader(addr(2)),
            ),
            // Backups are narrowed the same way.
            (
                &[
                    (1, false, true, Leader, Some(2)),
                    (2, false, true, Leader, Some(3)),
                ],
                SplitBrain::HighestTimeline,
                Target::Leader(addr(2)),
            ),
        ];
        for (backends, policy, expected) in rows {
            let views: Vec<BackendView<'_>> = backends
                .iter()
                .map(|(n, discovered, present, role, timeline)| BackendView {
                    addr: addr(*n),
                    discovered: *discovered,
                    present: *present,
                    role,
                    timeline: *timeline,
                    claim: Claim::default(),
                })
                .collect();
            let got = decide_with(&previous, &views, *policy);
            assert_eq!(&got.target, expected, "{backends:?} {policy:?}");
        }
    }

    #[test]
    fn least_loaded_replica() {
        let counts: BTreeMap<SocketAddr, u64> = [(addr(1), 3), (addr(2), 1), (addr(3), 1)].into();
        let all = [addr(1), addr(2), addr(3)];
        // (replicas, excluded, turn) → pick
        type PickRow<'a> = (
            &'a [SocketAddr],
            &'a [SocketAddr],
            usize,
            Option<SocketAddr>,
        );
        let rows: &[PickRow] = &[
            (&all, &[], 0, Some(addr(2))),
            (&all, &[], 1, Some(addr(3))),
            (&all, &[], 2, Some(addr(2))),
            (&all, &[addr(2)], 0, Some(addr(3))),
            (&all, &[addr(2), addr(3)], 0, Some(addr(1))),
            (&all, &all, 0, None),
            (&[], &[], 0, None),
            // A replica with no sessions yet is least loaded.
            (&[addr(1), addr(4)], &[], 7, Some(addr(4))),
        ];
        for (replicas, exclude, turn, expected) in rows {
            assert_eq!(
                least_loaded(replicas, &counts, exclude, *turn),
                *expected,
                "{replicas:?} excluding {exclude:?}, turn {turn}"
            );
        }
    }
}
