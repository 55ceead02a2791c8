//! The route core: the vocabulary of routing and the pure rules that turn what each node said
//! into one route. It is the place to start reading: it stands on its own, and sits in a
//! crate that cannot import the proxy.
//!
//! The routing rules, numbered as in `docs/how-it-works.md`, each decided by [`decide_with`], [`RoleHistory`] or
//! [`session_fate`] and table-tested below:
//!
//! 1. **Positive evidence to enter.** A node is leader only after its role endpoint said one of
//!    `check.leader` (`check.rise` times). A 5xx, a timeout or a refused connection is not
//!    leader; 404 is maintenance.
//! 2. **Exactly one leader** among the discovered nodes is the route.
//! 3. **Several leaders** (split brain): no route, unless `check.split_brain =
//!    "highest-timeline"` names one on the strictly newest timeline.
//! 4. **No discovered leader:** a `backup` address that itself checks as leader may be the route.
//! 5. **Route moves:** the generation increments and older sessions close. A leader in
//!    maintenance or gone from DNS keeps its sessions but takes no new ones.
//! 6. **Fast failover:** a failed check or connect makes the view re-check every node at once
//!    (that loop is the view's; the rule here only says when a leader is down).
//! 7. **Positive evidence to leave.** A failing role endpoint while the node's Postgres answers
//!    ([`Liveness::Alive`]) is not evidence: the leader stays, *unconfirmed*, until another node
//!    is confirmed, its Postgres stops answering, or `check.unconfirmed_limit` passes (then the
//!    route is held). Two claims are a split brain only when each has answered `leader` again
//!    since the other's began; until then the route is *verifying*.
//!
//! (Rule 8, clients speak first, is about sessions, not the route: it lives in the proxy's
//! `sessions`.)
//!
//! 9. **Stepping down lets transactions finish.** A leader that stops claiming leader while
//!    alive has its sessions closed at their next transaction boundary; once another node leads,
//!    at once, so writes never land on two leaders.
//! 10. **Only a death or a demotion cuts a session.** A probe's timeout is death only with no
//!     sign of life within the window ([`probe_verdict`]); a rival's new claim *contests* a
//!     confirmed leader's route for its hold-down ([`Target::Contested`], sessions pause:
//!     [`Fate::Hold`]) before it counts; a node whose Postgres port fails is not routed, and the
//!     route says so ([`NoRoute::DataPortFailing`]).
//!
//! An operator's word comes on top of the rules: while the proxy is paused every leader session
//! ends at its next transaction boundary and new clients wait ([`leader_session_fate`],
//! [`admitted_leader`]); a replica set to drain or maintenance takes no new session, and a
//! drained one's sessions end at their boundary ([`replica_session_fate`], [`open_replicas`]).

use std::fmt;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// What a backend's role endpoint said, reduced to what routing needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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

    /// Its latest definite answer was `leader` (failed checks leave it as it was).
    pub fn claims_leader(&self) -> bool {
        self.claims_leader
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
    /// `fall` checks for, and a dead leader must never race a promoted one. A probe that timed
    /// out is passed here only once [`probe_verdict`] has judged it.
    pub fn probed(&mut self, liveness: &Liveness) -> bool {
        if self.confirmed != Role::Leader || liveness.lives() {
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
    /// The evidence behind a `leader` role, or behind a claim not yet risen to one.
    pub claim: Claim,
    /// Its Postgres port was found failing (refused, reset, not Postgres, or silent with no
    /// sign of life) and no probe has found it answering since: whatever its role endpoint
    /// says, no session can use it, so it is not routed. The error, for people.
    pub data_error: Option<&'a str>,
}

impl BackendView<'_> {
    /// Claims leader: confirmed as leader, or its latest definite answer was `leader` (a claim
    /// that has not reached `check.rise` yet still stops new sessions: it may take writes).
    fn claiming(&self) -> bool {
        *self.role == Role::Leader || self.claim.claiming
    }
}

/// The evidence behind one leader claim, as plain data: the view numbers check results, and
/// `decide_with` compares the numbers, never clocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Claim {
    /// The sequence number of the first `leader` answer of this claim.
    pub first: u64,
    /// The sequence number of its latest `leader` answer.
    pub last: u64,
    pub standing: Standing,
    /// Its latest definite answer was `leader`, whatever its confirmed role.
    pub claiming: bool,
    /// The claim began less than `check.contest_hold` ago, and the node has not had a claim
    /// lapse lately: as a rival's claim, it holds the route instead of cutting it.
    pub held_down: bool,
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
    /// No node leads, and the one that led or says it leads has a Postgres port that fails (a
    /// wrong `backends.port`, a firewall, a dead Postgres behind a live endpoint): the error.
    DataPortFailing(SocketAddr, String),
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
            NoRoute::DataPortFailing(addr, error) => {
                write!(f, "leader {addr}'s Postgres port fails: {error}")
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
/// reachable, every node a replica. [`decide_with`] says *that* there is no leader; this says *why*,
/// in the words clients, `/status`, the stats page and `roleproxy status` all show. Pure.
pub fn explain(route: Route, backends: &[BackendView<'_>], dns_failing: &[String]) -> Route {
    if !matches!(
        route.target,
        Target::None(NoRoute::NoBackends | NoRoute::NoLeader)
    ) {
        return route;
    }
    let present: Vec<&BackendView<'_>> = backends.iter().filter(|b| b.present).collect();
    // A node that said leader (or was leader when it went down) and whose port fails.
    let data_failing = present.iter().find_map(|b| {
        Some((b.addr, b.data_error?)).filter(|_| matches!(b.role, Role::Leader | Role::Down(_)))
    });
    let why = if let Some((addr, error)) = data_failing {
        NoRoute::DataPortFailing(addr, error.to_owned())
    } else if present.is_empty() {
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

/// Why a leader's route is held: its sessions stay, new clients wait. Carried by the route so a
/// refused client is told the one that applies, as `/status` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Hold {
    /// Its role endpoint answers 404.
    Maintenance,
    /// DNS no longer names it.
    LeftDns,
    /// Its checks have failed, while its Postgres answered, for longer than
    /// `check.unconfirmed_limit`.
    Unconfirmed,
}

/// Reads after the leader's address: "127.0.0.11:5433 is in maintenance".
impl fmt::Display for Hold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Hold::Maintenance => "is in maintenance",
            Hold::LeftDns => "has left DNS",
            Hold::Unconfirmed => {
                "has been unconfirmed (its checks fail) for longer than check.unconfirmed_limit"
            }
        })
    }
}

/// Where sessions go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", content = "detail", rename_all = "snake_case")]
pub enum Target {
    /// New sessions go to this leader.
    Leader(SocketAddr),
    /// The leader is in maintenance, left DNS, or has been unconfirmed for longer than
    /// `check.unconfirmed_limit` (which one: the [`Hold`]): its sessions stay, new ones wait.
    Held(SocketAddr, Hold),
    /// The leader is confirmed, but another node has just claimed leader too (rule 10): new
    /// clients wait and the leader's sessions pause at their next transaction boundary, until
    /// the rival's claim lapses (the sessions resume) or holds past `check.contest_hold` (a
    /// promotion or a split brain: the route moves on).
    Contested(SocketAddr),
    None(NoRoute),
}

impl Target {
    /// The backend that current sessions belong to.
    pub fn backend(&self) -> Option<SocketAddr> {
        match self {
            Target::Leader(a) | Target::Held(a, _) | Target::Contested(a) => Some(*a),
            Target::None(_) => None,
        }
    }
}

/// The route every session follows. Sessions bound to an older generation are shut down.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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

/// The routing rules with a split-brain policy. Pure, so every case is a table row.
pub fn decide_with(previous: &Route, backends: &[BackendView<'_>], policy: SplitBrain) -> Route {
    let claims = |b: &&BackendView<'_>| *b.role == Role::Leader && b.data_error.is_none();
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
        confirmed_first(previous, claims);
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
    let target = contested(previous, backends)
        .or_else(|| choose(&discovered))
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
        Target::Leader(addr)
        | Target::Held(addr, _)
        | Target::Contested(addr)
        | Target::None(NoRoute::SteppedDown(addr)) => addr,
        Target::None(_) => return None,
    };
    backends
        .iter()
        .find(|b| b.addr == old && b.present)
        .filter(|b| matches!(b.role, Role::Replica | Role::Other(_)))
        .map(|b| b.addr)
}

/// Rule 10: a new claim from another node while the route's leader is confirmed contests the
/// route instead of cutting it, while every rival's claim is within its hold-down and none
/// shows a newer timeline than the leader's. One stray answer is not evidence; a claim that
/// lasts, or a newer timeline, is a promotion or a split brain, judged by the other rules.
/// Once begun, a contest outlasts the leader's own failed checks, 404s and leaving DNS: they end
/// no rival's claim, so its paused sessions must not resume on them while a rival may take
/// writes.
fn contested(previous: &Route, backends: &[BackendView<'_>]) -> Option<Target> {
    let (current, ongoing) = match previous.target {
        Target::Leader(addr) => (addr, false),
        Target::Contested(addr) => (addr, true),
        _ => return None,
    };
    let leader = backends.iter().find(|b| b.addr == current)?;
    let standing = if ongoing {
        matches!(leader.role, Role::Leader | Role::Maintenance) && leader.data_error.is_none()
    } else {
        *leader.role == Role::Leader && leader.claim.standing == Standing::Confirmed
    };
    // Rule 4: a backup leads only while no discovered node does; a discovered claim
    // replaces it at once instead of contesting it. A leader leaving DNS ends no contest, as
    // its 404 does not.
    if !(leader.present || ongoing) || !leader.discovered || !standing {
        return None;
    }
    // A claim not risen to leader and not within a hold-down (its node's claims keep lapsing)
    // contests nothing, and ends no other node's contest.
    let mut rivals = backends
        .iter()
        .filter(|b| b.addr != current && b.discovered && b.claiming())
        .filter(|b| *b.role == Role::Leader || b.claim.held_down)
        .peekable();
    rivals.peek()?;
    let newer = |rival: &BackendView<'_>| match (rival.timeline, leader.timeline) {
        (Some(theirs), Some(ours)) => theirs > ours,
        _ => false,
    };
    // Only a claim that began after the leader's is new: the leader a promotion replaced is
    // no rival to hold down.
    rivals
        .all(|rival| {
            rival.claim.held_down && rival.claim.first > leader.claim.first && !newer(rival)
        })
        .then_some(Target::Contested(current))
}

/// What a session does when the route changes under it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Its route still holds: carry on.
    Stay,
    /// Its leader is contested (rule 10): pause at the next transaction boundary, forwarding
    /// nothing more the client sends, until the route says stay (resume) or end. A session
    /// whose boundaries cannot be seen (TLS, not Postgres) closes at once.
    Hold,
    /// Its leader stepped down while alive and nobody else leads yet: end at the next
    /// transaction boundary (rule 9).
    EndTransaction,
    /// Close now: its leader is gone, or another node leads (writes must never land on two).
    Close,
}

/// The fate of a session opened on `addr` under `generation`, given the route now. Pure.
pub fn session_fate(route: &Route, generation: u64, addr: SocketAddr) -> Fate {
    if route.generation == generation {
        if route.target == Target::Contested(addr) {
            Fate::Hold
        } else {
            Fate::Stay
        }
    } else if route.target == Target::None(NoRoute::SteppedDown(addr)) {
        Fate::EndTransaction
    } else {
        Fate::Close
    }
}

/// What an operator set for one backend, as HAProxy's `set server ... state` does. Separate
/// from a role endpoint's 404 ([`Role::Maintenance`]): this is the proxy's own word, kept by
/// address across rediscovery and reloads, and it applies to replica listeners.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Takes new sessions.
    #[default]
    Ready,
    /// No new sessions; open ones end at their next transaction boundary.
    Drain,
    /// No new sessions; open ones stay.
    Maintenance,
}

impl Mode {
    pub const ALL: [Mode; 3] = [Mode::Ready, Mode::Drain, Mode::Maintenance];

    pub fn label(self) -> &'static str {
        match self {
            Mode::Ready => "ready",
            Mode::Drain => "drain",
            Mode::Maintenance => "maintenance",
        }
    }

    /// The word an operator writes for it.
    pub fn from_label(word: &str) -> Option<Mode> {
        Mode::ALL.into_iter().find(|m| m.label() == word)
    }

    /// The gauge value of `roleproxy_backend_operator_state`: 0 ready, 1 drain, 2 maintenance.
    pub fn gauge(self) -> f64 {
        match self {
            Mode::Ready => 0.0,
            Mode::Drain => 1.0,
            Mode::Maintenance => 2.0,
        }
    }
}

/// The fate of a session on a leader listener: [`session_fate`], and while the proxy is
/// paused every session that would stay (or pause for a contest) ends at its next transaction
/// boundary instead. A paused proxy hands no leader session on. Pure.
pub fn leader_session_fate(route: &Route, generation: u64, addr: SocketAddr, paused: bool) -> Fate {
    match session_fate(route, generation, addr) {
        Fate::Stay | Fate::Hold if paused => Fate::EndTransaction,
        fate => fate,
    }
}

/// The leader a new client may start a session on now: none while the proxy is paused (the
/// client is held), else the route's. Pure.
pub fn admitted_leader(route: &Route, paused: bool) -> Option<SocketAddr> {
    if paused {
        None
    } else {
        route.leader()
    }
}

/// The fate of a session on a replica: closed once its node is no longer a replica, ended at
/// its next transaction boundary while drained, left alone otherwise (maintenance included).
/// Pure.
pub fn replica_session_fate(still_replica: bool, mode: Mode) -> Fate {
    match (still_replica, mode) {
        (false, _) => Fate::Close,
        (true, Mode::Drain) => Fate::EndTransaction,
        (true, Mode::Ready | Mode::Maintenance) => Fate::Stay,
    }
}

/// The replicas new sessions may go to: those the operator left ready. Pure.
pub fn open_replicas(
    replicas: &[SocketAddr],
    mode: impl Fn(SocketAddr) -> Mode,
) -> Vec<SocketAddr> {
    replicas
        .iter()
        .copied()
        .filter(|&a| mode(a) == Mode::Ready)
        .collect()
}

/// The replica a new read-only session goes to: the fewest open sessions, skipping `exclude`
/// (replicas that just failed to connect); `turn` rotates among equally loaded ones so they
/// share a burst. `sessions` gives a replica's open sessions and is asked once per replica, so
/// counts that move meanwhile cannot make the pick inconsistent. Pure.
pub fn least_loaded(
    replicas: &[SocketAddr],
    sessions: impl Fn(SocketAddr) -> u64,
    exclude: &[SocketAddr],
    turn: usize,
) -> Option<SocketAddr> {
    let loads: Vec<(SocketAddr, u64)> = replicas
        .iter()
        .filter(|a| !exclude.contains(a))
        .map(|&a| (a, sessions(a)))
        .collect();
    let least = loads.iter().map(|&(_, n)| n).min()?;
    let tied: Vec<SocketAddr> = loads
        .into_iter()
        .filter(|&(_, n)| n == least)
        .map(|(a, _)| a)
        .collect();
    tied.get(turn % tied.len()).copied()
}

/// Rule 7: a confirmed claim beats an unconfirmed one. A leader whose checks fail keeps the route
/// only while nobody else positively answers `leader`. When none is confirmed, a claim that has
/// not answered `leader` since the route's leader began its own was beaten by it then: the
/// leader's failed check is no evidence, and does not bring that claim back.
fn confirmed_first(previous: &Route, claims: &mut Vec<&BackendView<'_>>) {
    if claims
        .iter()
        .any(|b| b.claim.standing == Standing::Confirmed)
    {
        claims.retain(|b| b.claim.standing == Standing::Confirmed);
        return;
    }
    let leader = previous
        .leader()
        .and_then(|addr| claims.iter().find(|b| b.addr == addr).copied());
    if let Some(leader) = leader {
        claims.retain(|b| b.addr == leader.addr || b.claim.last >= leader.claim.first);
    }
}

/// The route for the only leader claim, if it may have one: a present claim is routed unless
/// its unconfirmed time is up; one that left DNS or ran out of time holds its sessions if it
/// was the route.
fn sole_claim(previous: &Route, one: &BackendView<'_>) -> Option<Target> {
    if one.present && one.claim.standing != Standing::Expired {
        Some(Target::Leader(one.addr))
    } else if previous.target.backend() == Some(one.addr) {
        let why = if one.present {
            Hold::Unconfirmed
        } else {
            Hold::LeftDns
        };
        Some(Target::Held(one.addr, why))
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
    (*view.role == Role::Maintenance).then_some(Target::Held(addr, Hold::Maintenance))
}

/// A route in words, e.g. `generation 3: sessions go to 127.0.0.12:5433`.
pub fn describe_route(route: &Route) -> String {
    let what = match &route.target {
        Target::Leader(addr) => format!("sessions go to {addr}"),
        Target::Held(addr, why) => {
            format!("held: {addr} {why}; it keeps its sessions, new clients wait")
        }
        Target::Contested(addr) => format!(
            "contested: another node claims leader; {addr}'s sessions pause at their next transaction boundary, new clients wait"
        ),
        Target::None(reason) => format!("no route ({reason})"),
    };
    format!("generation {}: {what}", route.generation)
}

/// What to do when several nodes claim leader.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SplitBrain {
    /// No route until only one claims leader.
    None,
    /// The leader on the strictly newest timeline (postgres checks only).
    HighestTimeline,
}

/// What a server's first answer to a StartupMessage says about it, read as `PQping` reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Liveness {
    /// The postmaster takes connections: it asked for authentication, or refused this user for
    /// a reason of its own (53300 too many clients, 28000 no such role, ...).
    Alive(String),
    /// It refuses every connection: starting up, shutting down or in recovery (57P03).
    Refusing(String),
    /// No Postgres answered: refused, reset, or something that does not speak its protocol.
    Gone(String),
    /// The TCP handshake completed but the postmaster did not answer in time (stalled by a
    /// stuck fork, a paused VM, an fsync storm): the kernel that queued the connection lives.
    Stalled(String),
    /// Not even a TCP handshake in time: a dead or black-holed host, or one so overloaded it
    /// drops connections. Evidence of death only when nothing else shows life
    /// ([`probe_verdict`]).
    Silent(String),
}

impl Liveness {
    /// A label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Liveness::Alive(_) => "alive",
            Liveness::Refusing(_) => "refusing",
            Liveness::Gone(_) => "gone",
            Liveness::Stalled(_) => "stalled",
            Liveness::Silent(_) => "silent",
        }
    }

    pub const LABELS: [&'static str; 5] = ["alive", "refusing", "gone", "stalled", "silent"];

    /// The node lives: its Postgres answered, or at least its kernel took the connection.
    pub fn lives(&self) -> bool {
        matches!(self, Liveness::Alive(_) | Liveness::Stalled(_))
    }
}

/// What a probe says of a leader, once weighed against other signs of life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// It lives (it may still be unconfirmed, if its checks fail).
    Lives,
    /// It is gone: refused, reset, shutting down, or silent with no other sign of life.
    Gone,
    /// It was silent, but showed life within the window: probe again after this long.
    ProbeAgainIn(std::time::Duration),
}

/// Rule 10: a timeout alone is not evidence of death while the node showed life lately. A
/// probe that got no TCP handshake is a verdict of death only once the latest sign of life
/// (bytes from the node on any session, a probe whose handshake completed), `last_life` ago,
/// is at least `window` old; until then it is probed again. Everything else is judged on its
/// own: refused, reset and 57P03 are death at once, whatever bytes came before. Pure.
pub fn probe_verdict(
    liveness: &Liveness,
    last_life: Option<std::time::Duration>,
    window: std::time::Duration,
) -> Verdict {
    match liveness {
        l if l.lives() => Verdict::Lives,
        Liveness::Silent(_) => match last_life {
            Some(age) if age < window => Verdict::ProbeAgainIn(window - age),
            _ => Verdict::Gone,
        },
        _ => Verdict::Gone,
    }
}

impl std::fmt::Display for Liveness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Liveness::Alive(detail) => write!(f, "Postgres answers ({detail})"),
            Liveness::Refusing(detail) => write!(f, "Postgres refuses connections ({detail})"),
            Liveness::Gone(detail) => write!(f, "Postgres does not answer ({detail})"),
            Liveness::Stalled(detail) => write!(
                f,
                "Postgres takes connections but does not answer (handshake done, no answer {detail})"
            ),
            Liveness::Silent(detail) => {
                write!(f, "Postgres does not answer (no TCP handshake {detail})")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::time::Duration;

    /// The rules with the default split-brain policy: several leaders mean no route.
    fn decide(previous: &Route, backends: &[BackendView<'_>]) -> Route {
        decide_with(previous, backends, SplitBrain::None)
    }

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
                data_error: None,
            })
            .collect()
    }

    fn run(previous: &Route, rows: &[Row]) -> Route {
        decide(previous, &views(rows))
    }

    /// What logs and the status page show for a role: the detail of a stray word or a failed
    /// check is what tells an operator why a node is not routed.
    #[test]
    fn a_role_is_shown_with_its_detail() {
        let cases = [
            (Role::Leader, "leader"),
            (Role::Replica, "replica"),
            (Role::Maintenance, "maintenance"),
            (Role::Unknown, "unknown"),
            (Role::Other("readonly".into()), "other (readonly)"),
            (Role::Down("timed out".into()), "down (timed out)"),
        ];
        for (role, shown) in cases {
            assert_eq!(role.to_string(), shown, "{role:?}");
        }
    }

    /// What `/status`, the logs and a refused client read for a route, where a node came from
    /// and why there is no route: the words an operator acts on.
    #[test]
    fn a_route_its_sources_and_its_absence_read_as_words() {
        let cases = [
            (
                describe_route(&route(3, Target::Leader(addr(12)))),
                "generation 3: sessions go to 127.0.0.12:5433",
            ),
            (
                describe_route(&route(4, Target::None(NoRoute::NoLeader))),
                "generation 4: no route (no node reports leader)",
            ),
            (
                Source::Dns("iad.app.internal.".into()).to_string(),
                "dns:iad.app.internal",
            ),
            (Source::Backup.to_string(), "backup"),
            (
                NoRoute::NoBackends.to_string(),
                "no nodes: DNS answered no usable address, and there is no backup",
            ),
            (
                NoRoute::SplitBrain(vec![addr(11), addr(12)]).to_string(),
                "split brain: 127.0.0.11:5433, 127.0.0.12:5433 all report leader",
            ),
        ];
        for (shown, expected) in cases {
            assert_eq!(shown, expected);
        }
    }

    /// A stray word is its own kind: `readonly` then `starting` is a change an operator sees,
    /// the same word twice is not.
    #[test]
    fn other_words_are_the_same_kind_only_when_they_are_the_same_word() {
        let mut history = RoleHistory::default();
        let word = |w: &str| Role::Other(w.into());
        assert!(history.observe(word("readonly"), 2, 2));
        assert!(!history.observe(word("readonly"), 2, 2));
        assert!(history.observe(word("starting"), 2, 2));
        assert_eq!(history.role(), &word("starting"));
    }

    /// `claims_leader` follows the latest definite answer: a failed check leaves it as it
    /// was, a `replica` answer ends it.
    #[test]
    fn a_leader_claim_lasts_through_failed_checks_and_ends_at_another_answer() {
        let mut history = RoleHistory::default();
        assert!(!history.claims_leader());
        history.observe(Role::Leader, 1, 2);
        assert!(history.claims_leader());
        history.observe(down(), 1, 2);
        assert!(history.claims_leader());
        history.observe(Role::Replica, 1, 2);
        assert!(!history.claims_leader());
    }

    /// A client refused while the route is held is told why, after the leader's address.
    #[test]
    fn a_held_route_says_why() {
        let cases = [
            (Hold::Maintenance, "127.0.0.11:5433 is in maintenance"),
            (Hold::LeftDns, "127.0.0.11:5433 has left DNS"),
            (
                Hold::Unconfirmed,
                "127.0.0.11:5433 has been unconfirmed (its checks fail) for longer than \
                 check.unconfirmed_limit",
            ),
        ];
        for (hold, shown) in cases {
            assert_eq!(format!("{} {hold}", addr(11)), shown);
        }
    }

    /// Operators write the word; dashboards and alerts read the number.
    #[test]
    fn an_operator_mode_reads_as_its_word_and_its_gauge_value() {
        let modes = [
            (Mode::Ready, "ready", 0.0),
            (Mode::Drain, "drain", 1.0),
            (Mode::Maintenance, "maintenance", 2.0),
        ];
        for (mode, word, gauge) in modes {
            assert_eq!(mode.label(), word);
            assert_eq!(Mode::from_label(word), Some(mode));
            assert_eq!(mode.gauge(), gauge, "{word}");
        }
        assert_eq!(Mode::from_label("drained"), None);
    }

    /// A probe's result: its metric label (one of the registered ones) and what `/status`
    /// and the logs say of it.
    #[test]
    fn a_probe_result_reads_as_its_label_and_its_words() {
        let cases = [
            (
                Liveness::Alive("53300".into()),
                "alive",
                "Postgres answers (53300)",
            ),
            (
                Liveness::Refusing("connection refused".into()),
                "refusing",
                "Postgres refuses connections (connection refused)",
            ),
            (
                Liveness::Gone("57P03".into()),
                "gone",
                "Postgres does not answer (57P03)",
            ),
            (
                Liveness::Stalled("in 1s".into()),
                "stalled",
                "Postgres takes connections but does not answer (handshake done, no answer in 1s)",
            ),
            (
                Liveness::Silent("in 1s".into()),
                "silent",
                "Postgres does not answer (no TCP handshake in 1s)",
            ),
        ];
        for (liveness, label, words) in cases {
            assert_eq!(liveness.label(), label);
            assert!(Liveness::LABELS.contains(&label), "{label} is registered");
            assert_eq!(liveness.to_string(), words);
        }
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
        let held_11 = route(4, Target::Held(addr(11), Hold::Maintenance));
        let left_11 = route(4, Target::Held(addr(11), Hold::LeftDns));
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
                "leader left DNS: held, saying so",
                at_11.clone(),
                vec![(11, true, false, Leader), (12, true, true, Replica)],
                left_11.clone(),
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
                route(4, Target::Held(addr(11), Hold::Maintenance)),
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
            (
                "its leader contested: pause at the next boundary",
                route(4, Target::Contested(addr(11))),
                (4, 11),
                Fate::Hold,
            ),
            (
                "contest over, the leader kept the route: resume",
                route(4, Target::Leader(addr(11))),
                (4, 11),
                Fate::Stay,
            ),
            (
                "contest over, the rival leads: close",
                route(5, Target::Leader(addr(12))),
                (4, 11),
                Fate::Close,
            ),
        ];
        for (what, now, (generation, node), fate) in cases {
            assert_eq!(session_fate(&now, generation, addr(node)), fate, "{what}");
        }
    }

    #[test]
    fn a_paused_proxy_hands_no_session_on() {
        let at_11 = route(4, Target::Leader(addr(11)));
        let contested_11 = route(4, Target::Contested(addr(11)));
        let stepped_11 = route(5, Target::None(NoRoute::SteppedDown(addr(11))));
        let at_12 = route(5, Target::Leader(addr(12)));
        // (what, route now, paused, fate of a session opened on 11 under generation 4)
        let cases = [
            ("not paused: stays", &at_11, false, Fate::Stay),
            (
                "paused: ends at its boundary",
                &at_11,
                true,
                Fate::EndTransaction,
            ),
            (
                "paused while contested: ends at its boundary",
                &contested_11,
                true,
                Fate::EndTransaction,
            ),
            (
                "not paused, contested: pauses",
                &contested_11,
                false,
                Fate::Hold,
            ),
            (
                "paused, stepped down: ends at its boundary",
                &stepped_11,
                true,
                Fate::EndTransaction,
            ),
            (
                "paused, another node leads: closed at once",
                &at_12,
                true,
                Fate::Close,
            ),
            (
                "not paused, another node leads: closed at once",
                &at_12,
                false,
                Fate::Close,
            ),
        ];
        for (what, now, paused, fate) in cases {
            assert_eq!(
                leader_session_fate(now, 4, addr(11), paused),
                fate,
                "{what}"
            );
        }
        // (what, route, paused, where a new client goes)
        let cases = [
            ("a leader, not paused", &at_11, false, Some(addr(11))),
            ("a leader, paused: held", &at_11, true, None),
            ("no leader, not paused", &stepped_11, false, None),
            ("no leader, paused", &stepped_11, true, None),
        ];
        for (what, now, paused, admitted) in cases {
            assert_eq!(admitted_leader(now, paused), admitted, "{what}");
        }
    }

    #[test]
    fn a_drained_replica_ends_its_sessions_at_their_boundary_and_takes_no_new_ones() {
        // (what, still a replica, mode, fate)
        let cases = [
            ("ready", true, Mode::Ready, Fate::Stay),
            (
                "drain: end at the boundary",
                true,
                Mode::Drain,
                Fate::EndTransaction,
            ),
            (
                "maintenance: sessions stay",
                true,
                Mode::Maintenance,
                Fate::Stay,
            ),
            ("no longer a replica", false, Mode::Ready, Fate::Close),
            (
                "no longer a replica, drained",
                false,
                Mode::Drain,
                Fate::Close,
            ),
            (
                "no longer a replica, in maintenance",
                false,
                Mode::Maintenance,
                Fate::Close,
            ),
        ];
        for (what, replica, mode, fate) in cases {
            assert_eq!(replica_session_fate(replica, mode), fate, "{what}");
        }
        let replicas = [addr(11), addr(12), addr(13)];
        let modes = |m11, m12, m13| {
            move |a: SocketAddr| match a.ip().to_string().as_str() {
                "127.0.0.11" => m11,
                "127.0.0.12" => m12,
                "127.0.0.13" => m13,
                _ => Mode::Ready,
            }
        };
        use Mode::*;
        // (what, modes of 11, 12, 13, open replicas)
        let cases = [
            (
                "all ready",
                (Ready, Ready, Ready),
                vec![addr(11), addr(12), addr(13)],
            ),
            (
                "one drained",
                (Drain, Ready, Ready),
                vec![addr(12), addr(13)],
            ),
            (
                "one in maintenance",
                (Ready, Ready, Maintenance),
                vec![addr(11), addr(12)],
            ),
            ("none ready", (Drain, Maintenance, Drain), vec![]),
        ];
        for (what, (a, b, c), open) in cases {
            assert_eq!(open_replicas(&replicas, modes(a, b, c)), open, "{what}");
        }
        for mode in Mode::ALL {
            assert_eq!(Mode::from_label(mode.label()), Some(mode));
        }
        assert_eq!(Mode::from_label("maint"), None);
    }

    /// Rule 10: another node's new claim contests a confirmed leader's route for its hold-down;
    /// it never keeps a leader past a rival's lasting claim or newer timeline.
    #[test]
    fn a_rival_claim_contests_the_route_within_its_hold_down() {
        use Standing::*;
        let at_11 = route(4, Target::Leader(addr(11)));
        let contested_11 = route(4, Target::Contested(addr(11)));
        let leader = |standing| Claim {
            standing,
            claiming: true,
            first: 1,
            last: 20,
            ..Claim::default()
        };
        let rival = |held_down| Claim {
            claiming: true,
            held_down,
            first: 10,
            last: 10,
            ..Claim::default()
        };
        // A risen claim that is the route's rival: (role, claim, timeline)
        type Node = (u8, Role, Claim, Option<u32>);
        // (what, previous, nodes, expected)
        let rows: Vec<(&str, Route, Vec<Node>, Route)> = vec![
            (
                "a new claim within its hold-down contests, same generation",
                at_11.clone(),
                vec![
                    (11, Role::Leader, leader(Confirmed), None),
                    (12, Role::Leader, rival(true), None),
                ],
                contested_11.clone(),
            ),
            (
                "a claim not yet risen to leader contests too: it may take writes",
                at_11.clone(),
                vec![
                    (11, Role::Leader, leader(Confirmed), None),
                    (12, Role::Replica, rival(true), None),
                ],
                contested_11.clone(),
            ),
            (
                "a claim whose latest check failed contests nothing, even within its hold-down",
                at_11.clone(),
                vec![
                    (11, Role::Leader, leader(Confirmed), None),
                    (
                        12,
                        Role::Replica,
                        Claim {
                            claiming: false,
                            ..rival(true)
                        },
                        None,
                    ),
                ],
                at_11.clone(),
            ),
            (
                "the claim lapses: the route is the leader's again, same generation",
                contested_11.clone(),
                vec![
                    (11, Role::Leader, leader(Confirmed), None),
                    (12, Role::Replica, Claim::default(), None),
                ],
                at_11.clone(),
            ),
            (
                "the hold-down runs out with both claiming: split brain",
                contested_11.clone(),
                vec![
                    (11, Role::Leader, leader(Confirmed), None),
                    (12, Role::Leader, rival(false), None),
                ],
                route(
                    5,
                    Target::None(NoRoute::SplitBrain(vec![addr(11), addr(12)])),
                ),
            ),
            (
                "a rival on a newer timeline is not held down",
                at_11.clone(),
                vec![
                    (11, Role::Leader, leader(Confirmed), Some(3)),
                    (12, Role::Leader, rival(true), Some(4)),
                ],
                route(
                    5,
                    Target::None(NoRoute::SplitBrain(vec![addr(11), addr(12)])),
                ),
            ),
            (
                "a rival on the leader's own timeline still contests: no promotion made it",
                at_11.clone(),
                vec![
                    (11, Role::Leader, leader(Confirmed), Some(3)),
                    (12, Role::Leader, rival(true), Some(3)),
                ],
                contested_11.clone(),
            ),
            (
                "a rival on an older timeline still contests",
                at_11.clone(),
                vec![
                    (11, Role::Leader, leader(Confirmed), Some(4)),
                    (12, Role::Leader, rival(true), Some(3)),
                ],
                contested_11.clone(),
            ),
            (
                "an unconfirmed leader does not contest: the confirmed rival leads",
                at_11.clone(),
                vec![
                    (11, Role::Leader, leader(Unconfirmed), None),
                    (12, Role::Leader, rival(true), None),
                ],
                route(5, Target::Leader(addr(12))),
            ),
            (
                "a liar's claim (no hold-down, not risen) ends no other node's contest",
                contested_11.clone(),
                vec![
                    (11, Role::Leader, leader(Confirmed), None),
                    (12, Role::Replica, rival(true), None),
                    (13, Role::Replica, rival(false), None),
                ],
                contested_11.clone(),
            ),
            (
                "a liar's claim alone contests nothing",
                at_11.clone(),
                vec![
                    (11, Role::Leader, leader(Confirmed), None),
                    (13, Role::Replica, rival(false), None),
                ],
                at_11.clone(),
            ),
            (
                "once contested, the leader leaving DNS ends no rival's claim",
                route(4, Target::Contested(addr(19))),
                vec![
                    (19, Role::Leader, leader(Confirmed), None),
                    (12, Role::Replica, rival(true), None),
                ],
                route(4, Target::Contested(addr(19))),
            ),
            (
                "a leader that left DNS is not contested: it is held",
                route(4, Target::Leader(addr(19))),
                vec![
                    (19, Role::Leader, leader(Confirmed), None),
                    (12, Role::Replica, rival(true), None),
                ],
                route(4, Target::Held(addr(19), Hold::LeftDns)),
            ),
            (
                "once contested, the leader's failed check ends no rival's claim",
                contested_11.clone(),
                vec![
                    (11, Role::Leader, leader(Unconfirmed), None),
                    (12, Role::Leader, rival(true), None),
                ],
                contested_11.clone(),
            ),
            (
                "once contested, the leader's 404 ends no rival's claim",
                contested_11.clone(),
                vec![
                    (
                        11,
                        Role::Maintenance,
                        Claim {
                            claiming: false,
                            ..leader(Confirmed)
                        },
                        None,
                    ),
                    (12, Role::Replica, rival(true), None),
                ],
                contested_11.clone(),
            ),
            (
                "the claim lapses while the leader is in maintenance: held, same generation",
                contested_11.clone(),
                vec![
                    (11, Role::Maintenance, Claim::default(), None),
                    (12, Role::Replica, Claim::default(), None),
                ],
                route(4, Target::Held(addr(11), Hold::Maintenance)),
            ),
            (
                "an unconfirmed leader's contest ends with the hold-down: the confirmed rival leads",
                contested_11.clone(),
                vec![
                    (11, Role::Leader, leader(Unconfirmed), None),
                    (12, Role::Leader, rival(false), None),
                ],
                route(5, Target::Leader(addr(12))),
            ),
            (
                "the leader steps down while contested: the rival leads",
                contested_11.clone(),
                vec![
                    (11, Role::Replica, Claim::default(), None),
                    (12, Role::Leader, rival(true), None),
                ],
                route(5, Target::Leader(addr(12))),
            ),
            (
                "the leader a promotion replaced still claims: no hold-down, its claim is older",
                route(5, Target::Leader(addr(12))),
                vec![
                    (
                        11,
                        Role::Leader,
                        Claim {
                            last: 50,
                            ..rival(true)
                        },
                        None,
                    ),
                    (
                        12,
                        Role::Leader,
                        Claim {
                            first: 30,
                            last: 40,
                            ..leader(Confirmed)
                        },
                        None,
                    ),
                ],
                route(
                    6,
                    Target::None(NoRoute::SplitBrain(vec![addr(11), addr(12)])),
                ),
            ),
            (
                "a backup leader is not held: a discovered leader takes over at once (rule 4)",
                route(4, Target::Leader(addr(50))),
                vec![
                    (50, Role::Leader, leader(Confirmed), None),
                    (12, Role::Leader, rival(true), None),
                ],
                route(5, Target::Leader(addr(12))),
            ),
            (
                "no route before: two claims are a split brain at once",
                route(4, Target::None(NoRoute::NoLeader)),
                vec![
                    (11, Role::Leader, leader(Confirmed), None),
                    (12, Role::Leader, rival(true), None),
                ],
                route(
                    4,
                    Target::None(NoRoute::SplitBrain(vec![addr(11), addr(12)])),
                ),
            ),
        ];
        for (what, previous, nodes, expected) in rows {
            let views: Vec<BackendView<'_>> = nodes
                .iter()
                .map(|(n, role, claim, timeline)| BackendView {
                    addr: addr(*n),
                    // Node 50 stands for a backup address, node 19 for a leader that left DNS.
                    discovered: *n != 50,
                    present: *n != 19,
                    role,
                    timeline: *timeline,
                    claim: *claim,
                    data_error: None,
                })
                .collect();
            assert_eq!(decide(&previous, &views), expected, "{what}");
        }
    }

    /// Rule 4 before rule 10: a discovered node's claim is no rival of a backup that leads; it
    /// takes the route at once.
    #[test]
    fn a_discovered_claim_replaces_a_backup_leader_without_a_contest() {
        let rival = Claim {
            claiming: true,
            held_down: true,
            first: 10,
            last: 10,
            ..Claim::default()
        };
        let backup = Claim {
            claiming: true,
            first: 1,
            last: 20,
            ..Claim::default()
        };
        let views = [
            BackendView {
                addr: addr(50),
                discovered: false,
                present: true,
                role: &Role::Leader,
                timeline: None,
                claim: backup,
                data_error: None,
            },
            BackendView {
                addr: addr(11),
                discovered: true,
                present: true,
                role: &Role::Leader,
                timeline: None,
                claim: rival,
                data_error: None,
            },
        ];
        assert_eq!(
            decide(&route(4, Target::Leader(addr(50))), &views),
            route(5, Target::Leader(addr(11)))
        );
    }

    /// Rule 10: a probe's timeout is death only with no sign of life within the window.
    #[test]
    fn a_timeout_is_death_only_without_signs_of_life() {
        let window = Duration::from_secs(2);
        let secs = Duration::from_secs;
        let silent = Liveness::Silent("within 1s".into());
        let cases = [
            (
                "answered",
                Liveness::Alive("auth".into()),
                None,
                Verdict::Lives,
            ),
            (
                "handshake completed, postmaster stalled",
                Liveness::Stalled("no answer".into()),
                None,
                Verdict::Lives,
            ),
            (
                "refused, even with bytes just now",
                Liveness::Gone("refused".into()),
                Some(secs(0)),
                Verdict::Gone,
            ),
            (
                "shutting down (57P03)",
                Liveness::Refusing("57P03".into()),
                Some(secs(0)),
                Verdict::Gone,
            ),
            (
                "silent, never heard from",
                silent.clone(),
                None,
                Verdict::Gone,
            ),
            (
                "silent, heard from long ago",
                silent.clone(),
                Some(secs(30)),
                Verdict::Gone,
            ),
            (
                "silent, heard from exactly a window ago",
                silent.clone(),
                Some(window),
                Verdict::Gone,
            ),
            (
                "silent, bytes half a second ago: probe again when they are a window old",
                silent.clone(),
                Some(Duration::from_millis(500)),
                Verdict::ProbeAgainIn(Duration::from_millis(1500)),
            ),
        ];
        for (what, liveness, last_life, verdict) in cases {
            assert_eq!(
                probe_verdict(&liveness, last_life, window),
                verdict,
                "{what}"
            );
        }
    }

    /// A node whose role endpoint says leader but whose Postgres port fails is not routed, and
    /// the route says why.
    #[test]
    fn a_failing_data_port_is_not_routed_and_named() {
        let role = Role::Leader;
        let view = BackendView {
            addr: addr(11),
            discovered: true,
            present: true,
            role: &role,
            timeline: None,
            claim: Claim::default(),
            data_error: Some("Postgres does not answer (connect: Connection refused)"),
        };
        let views = [view];
        let previous = route(3, Target::Leader(addr(11)));
        let decided = explain(decide(&previous, &views), &views, &[]);
        assert_eq!(
            decided,
            route(
                4,
                Target::None(NoRoute::DataPortFailing(
                    addr(11),
                    "Postgres does not answer (connect: Connection refused)".into()
                ))
            )
        );
        assert!(decided.leader().is_none());
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
            ..Claim::default()
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
                route(4, Target::Held(addr(11), Hold::Unconfirmed)),
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
                route(4, Target::Held(addr(11), Hold::Unconfirmed)),
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
                "the route's unconfirmed leader keeps it against an unconfirmed claim it beat",
                at_11.clone(),
                vec![
                    (11, true, Role::Leader, claim(7, 9, Unconfirmed)),
                    (12, true, Role::Leader, claim(1, 5, Unconfirmed)),
                ],
                at_11.clone(),
            ),
            (
                "a claim it beat that answers leader again is judged again: split brain",
                at_11.clone(),
                vec![
                    (11, true, Role::Leader, claim(7, 9, Unconfirmed)),
                    (12, true, Role::Leader, claim(1, 10, Unconfirmed)),
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
                route(4, Target::Held(addr(11), Hold::LeftDns)),
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
                    data_error: None,
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
                Target::Held(addr(1), Hold::LeftDns),
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
                    data_error: None,
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
                least_loaded(
                    replicas,
                    |a| counts.get(&a).copied().unwrap_or(0),
                    exclude,
                    *turn
                ),
                *expected,
                "{replicas:?} excluding {exclude:?}, turn {turn}"
            );
        }
    }
}
