//! A new configuration tried against the live cluster before a reload applies it: a reload
//! that would unroute a healthy leader is refused unless forced, whatever section it changes.
//!
//! [`evaluate`] does what the new configuration would do, once: it resolves the new DNS names
//! with the new `[backends]` settings, checks every backend it would discover and every backup
//! address with the new `[check]` (all at once, each bounded by the new `check.timeout`), and
//! runs the routing rules on the answers. When that routes to a leader the live route does not
//! already go to, the leader's data address (`address:backends.port`, or the backup address)
//! is probed as `pg_isready` would: a role endpoint on `:5500` says `leader` whatever port
//! Postgres listens on.
//!
//! [`judge`] then compares with the live route, and is pure. A reload is worse when the live
//! leader would no longer be routed, when the route would move to another leader, or when the
//! leader it would route to does not answer on its data address. During an outage, a reload
//! that routes nothing, or routes to a leader that answers, is not worse.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinSet;

use roleproxy_core::route::{
    self, BackendView, Claim, Liveness, NoRoute, Role, Route, Source, SplitBrain, Standing, Target,
};

use crate::check::{self, CheckSettings, Observation};
use crate::config::{BackendsConfig, CheckConfig, Config};
use crate::discovery::{self, Backend, DnsResolver};
use crate::own_addresses::OwnAddrs;

/// How a refused reload is applied anyway; every refusal ends with it.
pub const FORCE_HINT: &str =
    "to apply it anyway, POST /reload?force=true or set reload.force = true in the file";

/// Why a new configuration would leave routing worse than it is now.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Worse {
    /// The new `[check]` could not even ask the current leader (wrong port, path, password):
    /// applied, it would take every node down and close every session.
    #[error(
        "check: the new settings cannot check the current leader {leader}: {error}; {FORCE_HINT}"
    )]
    CheckFails { leader: SocketAddr, error: String },
    /// The new `[check]` hears the current leader say something other than `leader` (a leader
    /// word it does not know, another path or port, another kind).
    #[error("check: with the new settings the current leader {leader} answers {role}, not leader; applied, this would close every session; {FORCE_HINT}")]
    NotLeader { leader: SocketAddr, role: Role },
    /// The new `[check]` could not tell (the leader or this host is out of resources).
    #[error("check: the new settings could not tell the current leader {leader}'s role (it or this host is out of resources); try again, or {FORCE_HINT}")]
    Undecided { leader: SocketAddr },
    /// No node the new configuration finds checks as leader.
    #[error("with the new configuration, no node checks as leader ({heard}); applied, this would unroute the current leader {leader} and close every session; {FORCE_HINT}")]
    NoLeader { leader: SocketAddr, heard: String },
    /// Several nodes the new configuration finds check as leader: no route.
    #[error("with the new configuration, several nodes check as leader ({claims}), which routes none; applied, this would unroute the current leader {leader} and close every session; {FORCE_HINT}")]
    SplitBrain { leader: SocketAddr, claims: String },
    /// The new configuration routes to another leader than the live route does.
    #[error("with the new configuration, the route would move from the current leader {from} to {to}; applied, this would close every session; {FORCE_HINT}")]
    Moves { from: SocketAddr, to: SocketAddr },
    /// The leader the new configuration routes to does not answer where clients would go.
    #[error("with the new configuration, the leader's data address {leader} does not answer: {error}; {FORCE_HINT}")]
    Silent { leader: SocketAddr, error: String },
    /// The probe of that data address could not run (this host is out of resources).
    #[error("with the new configuration, the leader's data address {leader} could not be probed (this host is out of resources); try again, or {FORCE_HINT}")]
    Unprobed { leader: SocketAddr },
}

/// One backend the new configuration would check, and what it answered.
#[derive(Debug, Clone, PartialEq)]
pub struct Heard {
    pub addr: SocketAddr,
    /// Found through a DNS name; a backup address counts only while no such node leads.
    pub discovered: bool,
    /// `None`: the check could not tell (this host or the node is out of resources).
    pub answer: Option<Observation>,
}

/// What the new configuration would find, as [`judge`] reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct Outlook {
    pub heard: Vec<Heard>,
    /// DNS names whose lookup failed, with why: `iad.app.internal (timeout)`.
    pub dns_failing: Vec<String>,
    /// Whether `[check]` changes. Unchanged, a live leader's failed or undecided check is no
    /// evidence against it (rule 7): one answer is not the view's history.
    pub check_changed: bool,
    pub split_brain: SplitBrain,
    /// The probe of the would-be leader's data address, when one ran (`Some(None)`: the probe
    /// could not run).
    pub probed: Option<Option<Liveness>>,
}

impl Outlook {
    /// Where the new configuration would route from a fresh start, by the routing rules, the
    /// live route's leader being `live`.
    pub fn target(&self, live: Option<SocketAddr>) -> Target {
        let roles: Vec<(Role, Standing)> = self
            .heard
            .iter()
            .map(
                |h| match (&h.answer, live == Some(h.addr) && !self.check_changed) {
                    (Some(o), _) if o.role == Role::Leader => (Role::Leader, Standing::Confirmed),
                    (
                        Some(Observation {
                            role: Role::Down(_),
                            ..
                        })
                        | None,
                        true,
                    ) => (Role::Leader, Standing::Unconfirmed),
                    (Some(o), _) => (o.role.clone(), Standing::Confirmed),
                    (None, false) => (Role::Unknown, Standing::Confirmed),
                },
            )
            .collect();
        let views: Vec<BackendView<'_>> = self
            .heard
            .iter()
            .zip(&roles)
            .map(|(h, (role, standing))| BackendView {
                addr: h.addr,
                discovered: h.discovered,
                present: true,
                role,
                timeline: h.answer.as_ref().and_then(|o| o.timeline),
                claim: Claim {
                    standing: *standing,
                    ..Claim::default()
                },
                data_error: None,
            })
            .collect();
        let route = route::decide_with(&Route::initial(), &views, self.split_brain);
        route::explain(route, &views, &self.dns_failing).target
    }

    /// The data address to probe: the would-be leader, unless the live route goes there already.
    pub fn to_probe(&self, live: Option<SocketAddr>) -> Option<SocketAddr> {
        match self.target(live) {
            Target::Leader(addr) if live != Some(addr) => Some(addr),
            _ => None,
        }
    }

    /// Every answer, for a refusal: `127.0.0.11:5433: replica; 127.0.0.12:5433: down (...)`.
    fn heard_text(&self) -> String {
        let mut parts: Vec<String> = self
            .heard
            .iter()
            .map(|h| match &h.answer {
                Some(o) => format!("{}: {}", h.addr, o.role),
                None => format!("{}: could not tell", h.addr),
            })
            .collect();
        if parts.is_empty() {
            parts.push("no node found".into());
        }
        if !self.dns_failing.is_empty() {
            parts.push(format!(
                "DNS lookups failing: {}",
                self.dns_failing.join(", ")
            ));
        }
        parts.join("; ")
    }
}

/// Whether the new configuration would leave routing worse than the live route, whose leader
/// is `live`. Pure.
pub fn judge(live: Option<SocketAddr>, outlook: &Outlook) -> Result<(), Worse> {
    let target = outlook.target(live);
    if matches!((live, &target), (Some(now), Target::Leader(to)) if now == *to) {
        return Ok(());
    }
    // A new `[check]` that unmakes the live leader: say what the leader answered.
    if let Some(leader) = live.filter(|_| outlook.check_changed) {
        if let Some(heard) = outlook.heard.iter().find(|h| h.addr == leader) {
            match heard.answer.as_ref().map(|o| &o.role) {
                None => return Err(Worse::Undecided { leader }),
                Some(Role::Leader) => {}
                Some(Role::Down(error)) => {
                    return Err(Worse::CheckFails {
                        leader,
                        error: error.clone(),
                    })
                }
                Some(role) => {
                    return Err(Worse::NotLeader {
                        leader,
                        role: role.clone(),
                    })
                }
            }
        }
    }
    match (target, live) {
        (Target::Leader(to), live) => match (&outlook.probed, live) {
            (Some(None), _) => Err(Worse::Unprobed { leader: to }),
            // Refusing (57P03) is Postgres at that address, starting up or in recovery: the
            // address is right.
            (Some(Some(liveness @ (Liveness::Gone(_) | Liveness::Silent(_)))), _) => {
                Err(Worse::Silent {
                    leader: to,
                    error: liveness.to_string(),
                })
            }
            (_, Some(from)) => Err(Worse::Moves { from, to }),
            (_, None) => Ok(()),
        },
        (_, None) => Ok(()),
        (Target::None(NoRoute::SplitBrain(claims) | NoRoute::Verifying(claims)), Some(leader)) => {
            Err(Worse::SplitBrain {
                leader,
                claims: claims
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
            })
        }
        (Target::None(_) | Target::Held(..) | Target::Contested(_), Some(leader)) => {
            Err(Worse::NoLeader {
                leader,
                heard: outlook.heard_text(),
            })
        }
    }
}

/// What the running proxy knows that a new configuration is compared with.
pub struct Live {
    pub route: watch::Receiver<Route>,
    pub check: CheckConfig,
    /// The running DNS names, and each backend the view knows with its sources (as `/status`
    /// names them): a name that stays keeps its last good answer while its lookup fails, as
    /// discovery keeps it.
    pub dns_names: Vec<String>,
    pub known: Vec<(SocketAddr, Vec<String>)>,
    pub own: Arc<OwnAddrs>,
}

/// Finds, checks and, when it would route somewhere new, probes what `new` would route to, and
/// judges it against the live route as it is once the answers are in.
pub async fn evaluate(new: &Config, live: &Live) -> Result<(), Worse> {
    let (backends, dns_failing) = discover(&new.backends, live).await;
    let mut outlook = Outlook {
        heard: check_all(backends, &new.check).await,
        dns_failing,
        check_changed: new.check != live.check,
        split_brain: new.check.split_brain,
        probed: None,
    };
    let now = live.route.borrow().leader();
    if let Some(addr) = outlook.to_probe(now) {
        outlook.probed = Some(check::probe_postgres(addr, new.check.probe_timeout).await);
    }
    judge(now, &outlook)
}

/// The backend set `config` would give, from one lookup of each name, and the names whose
/// lookup failed.
async fn discover(config: &BackendsConfig, live: &Live) -> (Vec<Backend>, Vec<String>) {
    let names = discovery::names(config);
    let answers: Vec<Result<Vec<IpAddr>, &'static str>> =
        match DnsResolver::new(&config.nameservers, config.resolve_timeout) {
            Ok(resolver) => {
                let resolver = Arc::new(resolver);
                all(names.iter().map(|name| {
                    let (resolver, name) = (Arc::clone(&resolver), name.clone());
                    async move { resolver.resolve(&name).await.map_err(|e| e.label()) }
                }))
                .await
                .into_iter()
                .map(|answer| answer.unwrap_or(Err("error")))
                .collect()
            }
            Err(e) => vec![Err(e.label()); names.len()],
        };
    let mut resolved: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
    let mut failing = Vec::new();
    for (name, answer) in names.iter().zip(answers) {
        let kept = match answer {
            Ok(ips) => {
                let (usable, _) = discovery::usable_addresses(&ips);
                discovery::select_addresses(&usable, config.prefer, config.max)
            }
            Err(label) => {
                failing.push(format!("{} ({label})", name.trim_end_matches('.')));
                if !live.dns_names.contains(name) {
                    continue;
                }
                let source = Source::Dns(name.clone()).to_string();
                live.known
                    .iter()
                    .filter(|(_, sources)| sources.contains(&source))
                    .map(|(addr, _)| addr.ip())
                    .collect()
            }
        };
        resolved.insert(name.clone(), kept);
    }
    let mut set = discovery::backend_set(&resolved, config);
    set.retain(|backend| live.own.covering(backend.addr).is_none());
    (set, failing)
}

/// Checks every backend once with `config`, all at once.
async fn check_all(backends: Vec<Backend>, config: &CheckConfig) -> Vec<Heard> {
    let settings = Arc::new(CheckSettings::from_config(config));
    let answers = all(backends.iter().map(|backend| {
        let (settings, addr) = (Arc::clone(&settings), backend.addr);
        async move { check::check_role(settings.endpoint(addr), &settings).await }
    }))
    .await;
    backends
        .into_iter()
        .zip(answers)
        .map(|(backend, answer)| Heard {
            addr: backend.addr,
            discovered: backend.sources.iter().any(|s| matches!(s, Source::Dns(_))),
            answer: answer.flatten(),
        })
        .collect()
}

/// Runs the futures at once, each in a task of its own, and gives their outputs in order
/// (`None` for one that panicked). Dropped, it aborts them: an evaluation cut short by
/// shutdown leaves nothing behind.
async fn all<F>(futures: impl IntoIterator<Item = F>) -> Vec<Option<F::Output>>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let mut tasks = JoinSet::new();
    let mut outputs = Vec::new();
    for (i, future) in futures.into_iter().enumerate() {
        tasks.spawn(async move { (i, future.await) });
        outputs.push(None);
    }
    while let Some(joined) = tasks.join_next().await {
        if let Ok((i, output)) = joined {
            outputs[i] = Some(output);
        }
    }
    outputs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(n: u8) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, n], 5433))
    }

    fn dns(n: u8, role: Option<Role>) -> Heard {
        Heard {
            addr: addr(n),
            discovered: true,
            answer: role.map(Observation::from),
        }
    }

    fn backup(n: u8, role: Option<Role>) -> Heard {
        Heard {
            discovered: false,
            ..dns(n, role)
        }
    }

    fn down() -> Option<Role> {
        Some(Role::Down("connect: Connection refused".into()))
    }

    fn leader() -> Option<Role> {
        Some(Role::Leader)
    }

    fn replica() -> Option<Role> {
        Some(Role::Replica)
    }

    fn gone() -> Option<Option<Liveness>> {
        Some(Some(Liveness::Gone("connect: Connection refused".into())))
    }

    fn alive() -> Option<Option<Liveness>> {
        Some(Some(Liveness::Alive("asks for authentication".into())))
    }

    /// What the judgement says, in a word, so each row reads as a sentence.
    fn verdict(result: Result<(), Worse>) -> &'static str {
        match result {
            Ok(()) => "apply",
            Err(Worse::CheckFails { .. }) => "check fails",
            Err(Worse::NotLeader { .. }) => "not leader",
            Err(Worse::Undecided { .. }) => "undecided",
            Err(Worse::NoLeader { .. }) => "no leader",
            Err(Worse::SplitBrain { .. }) => "split brain",
            Err(Worse::Moves { .. }) => "moves",
            Err(Worse::Silent { .. }) => "silent",
            Err(Worse::Unprobed { .. }) => "unprobed",
        }
    }

    /// (what, live leader, check changed, heard, probe of the would-be leader, verdict)
    type Row = (
        &'static str,
        Option<u8>,
        bool,
        Vec<Heard>,
        Option<Option<Liveness>>,
        &'static str,
    );

    #[test]
    fn a_reload_is_refused_only_when_it_leaves_routing_worse() {
        let rows: Vec<Row> = vec![
            (
                "the live leader stays the leader",
                Some(11),
                false,
                vec![dns(11, leader()), dns(12, replica())],
                None,
                "apply",
            ),
            (
                "new checks of the live leader fail",
                Some(11),
                true,
                vec![dns(11, down()), dns(12, replica())],
                None,
                "check fails",
            ),
            (
                "new checks hear the live leader say replica",
                Some(11),
                true,
                vec![dns(11, replica())],
                None,
                "not leader",
            ),
            (
                "new checks cannot tell",
                Some(11),
                true,
                vec![dns(11, None)],
                None,
                "undecided",
            ),
            (
                "unchanged checks fail once on the live leader: no evidence, it stays",
                Some(11),
                false,
                vec![dns(11, down()), dns(12, replica())],
                None,
                "apply",
            ),
            (
                "unchanged checks fail once, and another node is confirmed leader",
                Some(11),
                false,
                vec![dns(11, down()), dns(12, leader())],
                alive(),
                "moves",
            ),
            (
                "the live leader left the backend set; nobody else leads",
                Some(11),
                false,
                vec![dns(12, replica())],
                None,
                "no leader",
            ),
            (
                "no backend at all",
                Some(11),
                false,
                vec![],
                None,
                "no leader",
            ),
            (
                "another node also says leader",
                Some(11),
                false,
                vec![dns(11, leader()), dns(12, leader())],
                None,
                "split brain",
            ),
            (
                "a new port: the same node, another address, nothing listening",
                Some(11),
                false,
                vec![Heard {
                    addr: SocketAddr::from(([127, 0, 0, 11], 5999)),
                    ..dns(11, leader())
                }],
                gone(),
                "silent",
            ),
            (
                "the route would move to a leader that answers",
                Some(11),
                false,
                vec![dns(12, leader())],
                alive(),
                "moves",
            ),
            (
                "the route would move, and the probe could not run",
                Some(11),
                false,
                vec![dns(12, leader())],
                Some(None),
                "unprobed",
            ),
            (
                "a backup leads while DNS finds nobody: it is the live leader",
                Some(11),
                false,
                vec![backup(11, leader()), dns(12, replica())],
                None,
                "apply",
            ),
            (
                "a discovered leader beats the live backup leader",
                Some(11),
                false,
                vec![backup(11, leader()), dns(12, leader())],
                alive(),
                "moves",
            ),
            (
                "outage: still no leader",
                None,
                true,
                vec![dns(11, down()), dns(12, replica())],
                None,
                "apply",
            ),
            (
                "outage: still a split brain",
                None,
                false,
                vec![dns(11, leader()), dns(12, leader())],
                None,
                "apply",
            ),
            (
                "outage: a leader whose Postgres answers",
                None,
                false,
                vec![dns(11, leader())],
                alive(),
                "apply",
            ),
            (
                "outage: a leader whose Postgres refuses connections still answers",
                None,
                false,
                vec![dns(11, leader())],
                Some(Some(Liveness::Refusing("57P03".into()))),
                "apply",
            ),
            (
                "outage: a leader whose data address does not answer",
                None,
                false,
                vec![backup(11, leader())],
                gone(),
                "silent",
            ),
        ];
        for (what, live, check_changed, heard, probed, expected) in rows {
            let outlook = Outlook {
                heard,
                dns_failing: Vec::new(),
                check_changed,
                split_brain: SplitBrain::None,
                probed,
            };
            assert_eq!(verdict(judge(live.map(addr), &outlook)), expected, "{what}");
        }
    }

    #[test]
    fn only_a_new_leader_is_probed() {
        let outlook = |heard| Outlook {
            heard,
            dns_failing: Vec::new(),
            check_changed: false,
            split_brain: SplitBrain::None,
            probed: None,
        };
        let rows: &[(&str, Option<u8>, Outlook, Option<u8>)] = &[
            (
                "the live leader",
                Some(11),
                outlook(vec![dns(11, leader())]),
                None,
            ),
            (
                "another leader",
                Some(11),
                outlook(vec![dns(11, replica()), dns(12, leader())]),
                Some(12),
            ),
            (
                "a leader during an outage",
                None,
                outlook(vec![dns(12, leader())]),
                Some(12),
            ),
            (
                "two leaders",
                None,
                outlook(vec![dns(11, leader()), dns(12, leader())]),
                None,
            ),
            ("nobody", Some(11), outlook(vec![]), None),
        ];
        for (what, live, outlook, expected) in rows {
            assert_eq!(
                outlook.to_probe(live.map(addr)),
                expected.map(addr),
                "{what}"
            );
        }
    }

    #[test]
    fn refusals_name_what_would_break() {
        let outlook = Outlook {
            heard: vec![dns(11, replica()), backup(12, down())],
            dns_failing: vec!["iad.app.internal (timeout)".into()],
            check_changed: false,
            split_brain: SplitBrain::None,
            probed: None,
        };
        let text = judge(Some(addr(13)), &outlook).unwrap_err().to_string();
        for words in [
            "no node checks as leader",
            "127.0.0.11:5433: replica",
            "127.0.0.12:5433: down (connect: Connection refused)",
            "DNS lookups failing: iad.app.internal (timeout)",
            "the current leader 127.0.0.13:5433",
            FORCE_HINT,
        ] {
            assert!(text.contains(words), "{words:?} in {text}");
        }
        let silent = Worse::Silent {
            leader: SocketAddr::from(([127, 0, 0, 11], 5432)),
            error: "connect: Connection refused".into(),
        };
        assert!(silent
            .to_string()
            .contains("the leader's data address 127.0.0.11:5432 does not answer: connect: Connection refused"));
    }
}
