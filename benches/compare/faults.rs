//! The fault matrix: each fault of routing rule 9 inflicted on the bench cluster while every
//! target's clients run through it at once, so all targets live through the same event.
//!
//! Per target, through each fault: `--fault-sessions` open sessions, each writing a small row
//! every 200 ms over its one connection (a session that fails is not reopened: it was cut),
//! and a new client writing one row every 100 ms. Rows carry the client and a sequence
//! number; afterwards every node's rows are read and compared with who led when. Every
//! client binds its own local port, so a port shortage hits only the proxies.
//!
//! Reported per fault and target (median over rounds): sessions cut, when the last one was
//! cut (from the fault), new clients' errors from the fault to the end of the window, the
//! longest time without a new client's write on the node leading then, for faults that move
//! the leader the time from the promotion to the first write on the new leader, writes a node
//! took while it was not the leader, and acknowledged rows the final leader does not have.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use roleproxy_testkit::cluster::LocalCluster;
use roleproxy_testkit::fault::{Blackhole, PortShortage, Siege, Stalled};
use roleproxy_testkit::harness::{eventually, ProxyProcess};
use roleproxy_testkit::role::RoleReply;
use roleproxy_testkit::writer::{
    self, conninfo, longest_gap, resumed_after, rows_on, Ack, LocalPort, Timeline, Trickle,
    TrickleLog, Writer,
};
use serde_json::json;
use tokio::time::Instant;

use super::{haproxy_pg_config, roleproxy_pg_toml, Args, Haproxy, PgBench, Results};

/// Each open session writes this often.
const SESSION_PERIOD: Duration = Duration::from_millis(200);
/// A new client comes this often.
const NEW_CLIENT_PERIOD: Duration = Duration::from_millis(100);
/// After a fault ends, how long its aftermath is watched (HAProxy needs `rise` checks to
/// take a node back; an unrouted proxy's clients wait `leader_wait`).
const SETTLE: Duration = Duration::from_secs(10);
/// Bounds every wait for the cluster or a target to be ready.
const READY: Duration = Duration::from_secs(60);
/// A stopped session still stuck in a write after this counts as hung.
const STOP_GRACE: Duration = Duration::from_secs(2);
/// `RLIMIT_NOFILE` (`ulimit-n` for HAProxy) of the targets of the descriptor fault.
const FD_LIMIT: u64 = 64;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    /// The leader's postmaster stopped (SIGSTOP) this long.
    Stall(Duration),
    /// The leader's role endpoint never answers.
    RoleHang,
    /// The leader's role endpoint answers 500.
    Role500,
    /// The DNS server is silent.
    DnsDown,
    /// The DNS server answers garbage.
    DnsGarbage,
    /// A replica's role endpoint says `leader`.
    Liar,
    /// The leader is black-holed and a replica promoted; the old leader is killed before
    /// the network heals.
    Blackhole,
    /// The leader is killed (`pg_ctl stop -m immediate`) and a replica promoted.
    Kill,
    /// A planned switchover ([`LocalCluster::switchover`]).
    Switchover,
    /// A replica promoted while the old leader stays up and writable (no fence); the old
    /// leader is made read-only when the fault ends.
    Unfenced,
    /// No ephemeral port left on this host.
    Ports,
    /// Each target out of descriptors (its own process, with a low limit).
    Descriptors,
}

impl Fault {
    fn name(self) -> String {
        match self {
            Fault::Stall(d) => format!("postmaster stalled {}s", d.as_secs()),
            Fault::RoleHang => "role endpoint hangs".into(),
            Fault::Role500 => "role endpoint 500".into(),
            Fault::DnsDown => "DNS down".into(),
            Fault::DnsGarbage => "DNS garbage".into(),
            Fault::Liar => "replica claims leader".into(),
            Fault::Blackhole => "leader black-holed + promotion".into(),
            Fault::Kill => "leader killed + promotion".into(),
            Fault::Switchover => "switchover".into(),
            Fault::Unfenced => "promotion, old leader unfenced".into(),
            Fault::Ports => "ephemeral ports exhausted".into(),
            Fault::Descriptors => "descriptors exhausted".into(),
        }
    }

    /// The rows' label: letters, digits and `-` only.
    fn slug(self) -> String {
        self.name()
            .chars()
            .map(|c| match c {
                'a'..='z' | '0'..='9' => c,
                'A'..='Z' => c.to_ascii_lowercase(),
                _ => '-',
            })
            .collect()
    }

    /// How long the fault is held, before `--fault-secs` caps it.
    fn nominal(self) -> Duration {
        let secs = match self {
            Fault::Stall(d) => return d,
            Fault::RoleHang | Fault::Role500 | Fault::DnsGarbage => 30,
            Fault::DnsDown => 60,
            Fault::Liar => 2,
            Fault::Blackhole | Fault::Ports | Fault::Descriptors => 15,
            Fault::Unfenced => 10,
            Fault::Kill | Fault::Switchover => 0,
        };
        Duration::from_secs(secs)
    }
}

/// The faults to run, in order, held no longer than `--fault-secs`.
fn faults(args: &Args) -> Vec<(Fault, Duration)> {
    let cap = args.fault_secs.map_or(Duration::MAX, Duration::from_secs);
    let all: Vec<Fault> = if args.per_node {
        vec![Fault::Kill, Fault::Blackhole, Fault::Switchover]
    } else {
        [2, 5, 10, 30]
            .map(|s| Fault::Stall(Duration::from_secs(s)))
            .into_iter()
            .chain([
                Fault::RoleHang,
                Fault::Role500,
                Fault::DnsDown,
                Fault::DnsGarbage,
                Fault::Liar,
                Fault::Blackhole,
                Fault::Kill,
                Fault::Switchover,
                Fault::Unfenced,
                Fault::Ports,
                Fault::Descriptors,
            ])
            .collect()
    };
    let mut seen = HashSet::new();
    all.into_iter()
        .map(|f| match f {
            // A capped stall is a shorter stall; the same length twice is run once.
            Fault::Stall(d) => Fault::Stall(d.min(cap)),
            other => other,
        })
        .filter(|f| {
            args.only_faults.is_empty() || args.only_faults.iter().any(|o| f.slug().contains(o))
        })
        .filter(|f| seen.insert(f.name()))
        .map(|f| (f, f.nominal().min(cap)))
        .collect()
}

/// The fault matrix's figures: samples per fault, column and target.
#[derive(Default)]
pub(crate) struct Matrix {
    results: Results,
    faults: Vec<String>,
    targets: Vec<String>,
    sessions: usize,
}

/// The matrix's columns: (metric, unit).
const COLUMNS: [(&str, &str); 7] = [
    ("sessions cut", "count"),
    ("last cut after", "s"),
    ("new-client errors", "count"),
    ("longest write gap", "s"),
    ("writes back after promotion", "s"),
    ("writes to a non-leader", "count"),
    ("acked rows missing on leader", "count"),
];

impl Matrix {
    fn add(&mut self, fault: &str, target: &str, column: &str, value: f64) {
        if !self.faults.iter().any(|f| f == fault) {
            self.faults.push(fault.to_owned());
        }
        if !self.targets.iter().any(|t| t == target) {
            self.targets.push(target.to_owned());
        }
        let unit = COLUMNS
            .iter()
            .find(|(c, _)| *c == column)
            .map_or("", |(_, u)| u);
        self.results
            .add(&format!("{fault} | {column}"), unit, target, value);
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.faults.is_empty()
    }

    /// A markdown table, fault × target.
    pub(crate) fn table(&self) -> String {
        let mut out = String::from("| fault | target |");
        for (column, unit) in COLUMNS {
            out.push_str(&format!(" {column} ({unit}) |"));
        }
        out.push_str(&format!("\n|---|---|{}\n", "---|".repeat(COLUMNS.len())));
        for fault in &self.faults {
            for target in &self.targets {
                let cells: Vec<String> = COLUMNS
                    .iter()
                    .map(|(column, unit)| {
                        let median = self.results.median(&format!("{fault} | {column}"), target);
                        match (median, *unit) {
                            (None, _) => "-".into(),
                            (Some(v), "s") => format!("{v:.2}"),
                            (Some(v), _) if *column == "sessions cut" => {
                                format!("{v:.0}/{}", self.sessions)
                            }
                            (Some(v), _) => format!("{v:.0}"),
                        }
                    })
                    .collect();
                if cells.iter().all(|c| c == "-") {
                    continue;
                }
                out.push_str(&format!("| {fault} | {target} | {} |\n", cells.join(" | ")));
            }
        }
        out
    }

    pub(crate) fn json(&self) -> serde_json::Value {
        json!({ "sessions": self.sessions, "metrics": self.results.json() })
    }
}

/// A proxy the clients go through.
#[derive(Clone)]
struct Target {
    name: String,
    addr: SocketAddr,
}

/// Processes started for one fault; stopped when dropped.
#[derive(Default)]
struct Started {
    _roleproxies: Vec<ProxyProcess>,
    _haproxies: Vec<Haproxy>,
}

/// Runs the matrix, `--rounds` times over.
pub(crate) async fn section(args: &Args, bench: &PgBench, matrix: &mut Matrix) {
    matrix.sessions = args.fault_sessions;
    let per_node = if args.per_node {
        Some(per_node_proxies(bench).await)
    } else {
        None
    };
    let listed = match &per_node {
        Some((targets, _)) => targets.clone(),
        None => bench
            .targets
            .iter()
            .filter(|(name, _)| args.targets.contains(name))
            .cloned()
            .collect(),
    };
    let shared: Vec<Target> = listed
        .into_iter()
        .map(|(name, addr)| Target { name, addr })
        .collect();
    for round in 0..args.rounds {
        for (fault, hold) in faults(args) {
            eprintln!("round {round}: {} for {hold:?}", fault.name());
            let (mut targets, _started) = if fault == Fault::Descriptors {
                limited_targets(args, bench).await
            } else {
                (shared.clone(), Started::default())
            };
            // The order the targets' clients start in rotates from round to round.
            let len = targets.len().max(1);
            targets.rotate_left(round % len);
            if let Err(e) = run_fault(args, bench, matrix, round, fault, hold, &targets).await {
                eprintln!("round {round}: {} not measured: {e}", fault.name());
            }
            repair(bench, &shared).await;
        }
    }
    if args.per_node {
        let total: Vec<String> = matrix
            .faults
            .iter()
            .map(|fault| {
                let sum: f64 = matrix
                    .targets
                    .iter()
                    .filter_map(|t| {
                        matrix
                            .results
                            .median(&format!("{fault} | writes to a non-leader"), t)
                    })
                    .sum();
                format!("{fault}: {sum:.0}")
            })
            .collect();
        eprintln!(
            "per-node roleproxies, writes to a non-leader across all proxies: {}",
            total.join(", ")
        );
    }
}

/// One round of one fault against every target at once.
async fn run_fault(
    args: &Args,
    bench: &PgBench,
    matrix: &mut Matrix,
    round: usize,
    fault: Fault,
    hold: Duration,
    targets: &[Target],
) -> Result<(), String> {
    let cluster = &bench.cluster;
    let leader = cluster
        .leader()
        .await
        .ok_or("no single leader to begin with")?;
    let host = |i: usize| cluster.pg_addr(i).ip().to_string();
    wait_writes_on(targets, &host(leader)).await?;
    let prefix = format!("r{round}-{}", fault.slug());
    let mut clients: Clients = Vec::new();
    for target in targets {
        let info = conninfo(target.addr);
        let via = format!("{prefix}/{}", target.name);
        let sessions = match Trickle::open(
            &info,
            &via,
            args.fault_sessions,
            SESSION_PERIOD,
            LocalPort::Pinned,
        )
        .await
        {
            Ok(sessions) => sessions,
            Err(e) => {
                abandon(clients).await;
                return Err(format!("{}: sessions: {e}", target.name));
            }
        };
        let new = Writer::start_with(
            info,
            &format!("{via}/new"),
            NEW_CLIENT_PERIOD,
            LocalPort::Pinned,
        );
        clients.push((target.name.clone(), via, sessions, new));
    }
    let opened = Instant::now();
    let moving = eventually(READY, || async {
        clients
            .iter()
            .all(|(_, _, s, w)| s.moving_since(opened) && w.acknowledged() > 0)
    })
    .await;
    if !moving {
        abandon(clients).await;
        return Err("the clients never all wrote before the fault".into());
    }

    let injected = match inject(fault, bench, leader, targets).await {
        Ok(injected) => injected,
        Err(e) => {
            abandon(clients).await;
            return Err(e);
        }
    };
    let at = injected.at;
    // Not a wait for an event: the fault lasts this long.
    tokio::time::sleep_until(at + hold).await;
    injected.held.heal(bench).await;
    // Not a wait for an event: the aftermath is watched this long.
    tokio::time::sleep(SETTLE).await;
    let end = Instant::now();

    let timeline = injected.timeline;
    let final_leader = cluster.leader().await.unwrap_or(injected.leader_after);
    let mut outcomes = Vec::new();
    for (name, via, sessions, new) in clients {
        let log = sessions.stop(STOP_GRACE).await;
        let attempts = new.stop().await;
        outcomes.push((name, via, log, attempts));
    }
    let rows = audit(cluster, final_leader, &prefix).await;
    let fault_name = fault.name();
    for (name, via, log, attempts) in outcomes {
        let new_acks = writer::acks(&format!("{via}/new"), &attempts);
        let figures = Figures::of(
            &via,
            &log,
            &attempts,
            &new_acks,
            &timeline,
            at,
            end,
            &rows,
            injected.promoted.map(|(t, i)| (t, host(i))),
        );
        eprintln!("round {round}: {fault_name} {name}: {figures:?}");
        figures.record(matrix, &fault_name, &name);
    }
    Ok(())
}

/// Each target's clients: (target, row label, sessions, new clients).
type Clients = Vec<(String, String, Trickle, Writer)>;

/// Stops clients whose round will not be measured.
async fn abandon(clients: Clients) {
    for (_, _, sessions, new) in clients {
        sessions.stop(STOP_GRACE).await;
        new.stop().await;
    }
}

/// What one target's clients saw through one fault.
#[derive(Debug)]
struct Figures {
    cut: usize,
    last_cut: Option<f64>,
    errors: usize,
    gap: f64,
    back_after_promotion: Option<f64>,
    strays: usize,
    missing: usize,
}

impl Figures {
    #[allow(clippy::too_many_arguments)]
    fn of(
        via: &str,
        log: &TrickleLog,
        attempts: &[writer::Attempt],
        new_acks: &[Ack],
        timeline: &Timeline,
        at: Instant,
        end: Instant,
        rows: &Rows,
        promoted: Option<(Instant, String)>,
    ) -> Figures {
        // A new client's write counts when the node that took it led by the time it said so.
        let on_leader: Vec<Instant> = new_acks
            .iter()
            .filter(|a| timeline.led(&a.server, a.finished))
            .map(|a| a.finished)
            .collect();
        let all_acks: Vec<Ack> = log.acks.iter().chain(new_acks).cloned().collect();
        let mut strays: HashSet<(String, i64)> = timeline
            .strays(&all_acks)
            .into_iter()
            .map(|a| (a.via.clone(), a.seq))
            .collect();
        // Rows (acknowledged or not) a node took while another led, as far as the running
        // nodes tell; for a node that cannot be read (killed), the acknowledgements tell.
        let mine = format!("{via}/");
        let rows_mine: Vec<writer::Row> = rows
            .all
            .iter()
            .filter(|r| r.via.starts_with(&mine))
            .cloned()
            .collect();
        strays.extend(
            timeline
                .stray_rows(&rows_mine)
                .into_iter()
                .map(|r| (r.via.clone(), r.seq)),
        );
        for ack in timeline.strays(&all_acks).iter().take(3) {
            eprintln!(
                "{via}: stray ack {} {} by {} sent {:.3} s after the fault",
                ack.via,
                ack.seq,
                ack.server,
                ack.started.saturating_duration_since(at).as_secs_f64()
            );
        }
        for row in timeline.stray_rows(&rows_mine).iter().take(3) {
            let taken = timeline.instant_of(row.at);
            eprintln!(
                "{via}: stray row {} {} on {} taken {:.3} s after the fault",
                row.via,
                row.seq,
                row.server,
                taken.saturating_duration_since(at).as_secs_f64()
            );
        }
        let early = log.cuts.iter().filter(|c| c.at < at).count();
        if early > 0 {
            eprintln!("{via}: {early} sessions were cut before the fault and are not counted");
        }
        Figures {
            cut: log.lost() - early,
            last_cut: log
                .cuts
                .iter()
                .filter(|c| c.at >= at)
                .map(|c| c.at.saturating_duration_since(at).as_secs_f64())
                .reduce(f64::max),
            errors: attempts
                .iter()
                .filter(|a| !a.ok() && a.finished >= at && a.finished <= end)
                .count(),
            gap: longest_gap(&on_leader, at, end).as_secs_f64(),
            back_after_promotion: promoted.and_then(|(t, server)| {
                resumed_after(attempts, t, Some(&server)).map(|d| d.as_secs_f64())
            }),
            strays: strays.len(),
            missing: all_acks
                .iter()
                .filter(|a| !rows.on_leader.contains(&(a.via.clone(), a.seq)))
                .count(),
        }
    }

    fn record(&self, matrix: &mut Matrix, fault: &str, target: &str) {
        let mut add = |column: &str, value: f64| matrix.add(fault, target, column, value);
        add("sessions cut", self.cut as f64);
        if let Some(last) = self.last_cut {
            add("last cut after", last);
        }
        add("new-client errors", self.errors as f64);
        add("longest write gap", self.gap);
        if let Some(back) = self.back_after_promotion {
            add("writes back after promotion", back);
        }
        add("writes to a non-leader", self.strays as f64);
        add("acked rows missing on leader", self.missing as f64);
    }
}

/// The rows of one round: the final leader's, and every row any running node has.
#[derive(Default)]
struct Rows {
    on_leader: HashSet<(String, i64)>,
    all: Vec<writer::Row>,
}

/// Reads every running node's rows of this round (over unix sockets).
async fn audit(cluster: &LocalCluster, leader: usize, prefix: &str) -> Rows {
    let mut rows = Rows::default();
    for i in 0..cluster.len() {
        if !cluster.pg().is_running(i) {
            continue;
        }
        match tokio::task::block_in_place(|| rows_on(cluster.pg(), i, prefix)) {
            Ok(found) => {
                if i == leader {
                    rows.on_leader = found.iter().map(|r| (r.via.clone(), r.seq)).collect();
                }
                rows.all.extend(found);
            }
            Err(e) => eprintln!("cannot read node {i}'s rows: {e}"),
        }
    }
    rows
}

/// A fault in force, and how it began.
struct Injected {
    at: Instant,
    /// Who led when, as far as the fault decided it.
    timeline: Timeline,
    /// When the new leader was promoted, for faults that promote one.
    promoted: Option<(Instant, usize)>,
    /// The leader once the fault is over.
    leader_after: usize,
    held: Held,
}

/// What undoes a fault.
enum Held {
    Nothing,
    Stall(Stalled),
    /// Node `i`'s checks relay its agent again.
    Relay(usize),
    Dns,
    /// The old leader dies before the network heals, so it never races the new one.
    Hole {
        hole: Blackhole,
        old: usize,
    },
    /// The old leader is made read-only.
    Unfenced {
        old: usize,
    },
    Ports(PortShortage),
    Siege(Vec<Siege>),
}

impl Held {
    /// Ends the fault.
    async fn heal(self, bench: &PgBench) {
        let cluster = &bench.cluster;
        match self {
            Held::Nothing => {}
            Held::Stall(stalled) => {
                stalled.resume();
            }
            Held::Relay(i) => {
                relays(bench).relay(i);
            }
            Held::Dns => {
                cluster
                    .dns()
                    .set_mode(roleproxy_testkit::dns::DnsMode::Answer);
            }
            Held::Hole { hole, old } => {
                if let Err(e) = cluster.kill(old).await {
                    eprintln!("cannot kill the black-holed leader: {e}");
                }
                drop(hole);
            }
            Held::Unfenced { old } => {
                let demoted = tokio::task::block_in_place(|| cluster.pg().set_read_only(old, true));
                if let Err(e) = demoted {
                    eprintln!("cannot make the old leader read-only: {e}");
                }
            }
            Held::Ports(shortage) => {
                drop(shortage);
            }
            Held::Siege(sieges) => {
                drop(sieges);
            }
        }
    }
}

fn relays(bench: &PgBench) -> &roleproxy_testkit::fault::CheckRelays {
    bench
        .relays
        .as_ref()
        .expect("the faults section starts the check relays")
}

/// Inflicts `fault` on a cluster led by `leader`.
async fn inject(
    fault: Fault,
    bench: &PgBench,
    leader: usize,
    targets: &[Target],
) -> Result<Injected, String> {
    let cluster = &bench.cluster;
    let host = |i: usize| cluster.pg_addr(i).ip().to_string();
    let replica = (leader + 1) % cluster.len();
    let now = Instant::now();
    let mut injected = Injected {
        at: now,
        timeline: Timeline::starting(&host(leader), now),
        promoted: None,
        leader_after: leader,
        held: Held::Nothing,
    };
    let error = |e: &dyn std::fmt::Display| format!("{}: {e}", fault.name());
    injected.held = match fault {
        Fault::Stall(_) => {
            Held::Stall(Stalled::postmaster(cluster.pg(), leader).map_err(|e| error(&e))?)
        }
        Fault::RoleHang => {
            relays(bench).set(leader, RoleReply::Hang);
            Held::Relay(leader)
        }
        Fault::Role500 => {
            relays(bench).set(
                leader,
                RoleReply::error(500, "could not connect to the local Postgres"),
            );
            Held::Relay(leader)
        }
        Fault::DnsDown | Fault::DnsGarbage => {
            let mode = if fault == Fault::DnsDown {
                roleproxy_testkit::dns::DnsMode::Silent
            } else {
                roleproxy_testkit::dns::DnsMode::Garbage
            };
            cluster.dns().set_mode(mode);
            Held::Dns
        }
        Fault::Liar => {
            relays(bench).set(replica, RoleReply::leader());
            Held::Relay(replica)
        }
        Fault::Blackhole => {
            let hole = Blackhole::node(cluster.pg_addr(leader).ip()).map_err(|e| error(&e))?;
            injected.at = Instant::now();
            promote(cluster, replica, &mut injected).await?;
            Held::Hole { hole, old: leader }
        }
        Fault::Unfenced => {
            promote(cluster, replica, &mut injected).await?;
            Held::Unfenced { old: leader }
        }
        Fault::Kill | Fault::Switchover => {
            let event = if fault == Fault::Kill {
                cluster.failover().await
            } else {
                cluster.switchover().await
            }
            .map_err(|e| error(&e))?;
            let killed = Instant::from_std(event.killed_at);
            let promoted = Instant::from_std(event.promoted_at);
            let (old, new) = (host(event.old), host(event.new));
            // `at` stays when the kill began: sessions die while `pg_ctl stop` runs.
            // The promotion began after the kill (or the fence), and the new leader took
            // writes before `pg_ctl promote -w` returned; the fenced old leader took writes
            // until it was made read-only.
            if fault == Fault::Kill {
                injected.timeline.then(killed, &[&new]);
            } else {
                injected.timeline.then(killed, &[&old, &new]);
            }
            injected.timeline.then(promoted, &[&new]);
            injected.promoted = Some((promoted, event.new));
            injected.leader_after = event.new;
            Held::Nothing
        }
        Fault::Ports => Held::Ports(PortShortage::start().map_err(|e| error(&e))?),
        Fault::Descriptors => Held::Siege(
            targets
                .iter()
                .map(|t| Siege::start(t.addr, FD_LIMIT as usize + 16))
                .collect(),
        ),
    };
    Ok(injected)
}

/// Promotes `new` (whatever the old leader is doing) and repoints the other replicas.
async fn promote(
    cluster: &LocalCluster,
    new: usize,
    injected: &mut Injected,
) -> Result<(), String> {
    let old = cluster.pg_addr(injected.leader_after).ip().to_string();
    let host = cluster.pg_addr(new).ip().to_string();
    // Both may take writes until the promotion reports that it is done.
    injected.timeline.then(Instant::now(), &[&old, &host]);
    cluster
        .promote(new)
        .await
        .map_err(|e| format!("promote: {e}"))?;
    let promoted = Instant::now();
    injected.timeline.then(promoted, &[&host]);
    injected.promoted = Some((promoted, new));
    injected.leader_after = new;
    if let Err(e) = cluster.repoint_replicas(new).await {
        eprintln!("cannot repoint the replicas: {e}");
    }
    Ok(())
}

/// After a fault: every node answers its agent again, DNS answers, one leader with streaming
/// replicas, and every target writing on it.
async fn repair(bench: &PgBench, targets: &[Target]) {
    let cluster = &bench.cluster;
    cluster
        .dns()
        .set_mode(roleproxy_testkit::dns::DnsMode::Answer);
    for i in 0..cluster.len() {
        relays(bench).relay(i);
    }
    if let Some(leader) = cluster.leader().await {
        // A switchover leaves its old leader read-only; the rebuild undoes that.
        if let Err(e) = cluster.restore().await {
            eprintln!("restore failed: {e}");
        }
        let _ = wait_writes_on(targets, &cluster.pg_addr(leader).ip().to_string()).await;
    } else {
        eprintln!(
            "no single leader after the fault: {:?}",
            cluster.nodes().await
        );
    }
}

/// Waits until ten writes in a row through each target land on `leader` (a freshly started
/// HAProxy sends some clients to replicas until its first checks fail them).
async fn wait_writes_on(targets: &[Target], leader: &str) -> Result<(), String> {
    for target in targets {
        let info = conninfo(target.addr);
        let streak = std::sync::atomic::AtomicUsize::new(0);
        let steady = eventually(READY, || async {
            let on_leader = writer::served(&info)
                .await
                .is_ok_and(|(server, in_recovery)| !in_recovery && server == leader);
            if on_leader {
                streak.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1 >= 10
            } else {
                streak.store(0, std::sync::atomic::Ordering::Relaxed);
                false
            }
        })
        .await;
        if !steady {
            return Err(format!("{} does not write on {leader}", target.name));
        }
    }
    Ok(())
}

/// Targets with [`FD_LIMIT`] descriptors, started for the descriptor fault: roleproxy
/// (`RLIMIT_NOFILE`) and HAProxy (`ulimit-n`), configured as the shared ones.
async fn limited_targets(args: &Args, bench: &PgBench) -> (Vec<Target>, Started) {
    let cluster = &bench.cluster;
    let local = cluster.pg_addr(0);
    let at = |port| super::pg_addr(port);
    let mut targets = Vec::new();
    let mut started = Started::default();
    for name in &args.targets {
        match name.as_str() {
            "roleproxy" => {
                let toml = roleproxy_pg_toml(
                    cluster,
                    at(26520),
                    at(26521),
                    local,
                    bench.check_port(),
                    "auto",
                );
                started._roleproxies.push(ProxyProcess::start(
                    env!("CARGO_BIN_EXE_roleproxy"),
                    &toml,
                    "bench-fds",
                    "warn",
                    Some(FD_LIMIT),
                ));
                targets.push(Target {
                    name: name.clone(),
                    addr: at(26520),
                });
            }
            "haproxy" | "haproxy-tuned" => {
                let tuned = name == "haproxy-tuned";
                let (port, stats) = if tuned {
                    (26524, 26525)
                } else {
                    (26522, 26523)
                };
                let mut config = haproxy_pg_config(
                    cluster,
                    at(port),
                    at(stats),
                    local,
                    bench.check_port(),
                    tuned,
                );
                config.ulimit_n = Some(FD_LIMIT);
                match Haproxy::start(&config).await {
                    Ok(haproxy) => started._haproxies.push(haproxy),
                    Err(e) => {
                        eprintln!("{name} with ulimit-n {FD_LIMIT} did not start: {e}");
                        continue;
                    }
                }
                targets.push(Target {
                    name: name.clone(),
                    addr: at(port),
                });
            }
            other => eprintln!("unknown target {other}"),
        }
    }
    (targets, started)
}

/// One roleproxy per node, as on Fly: each listens on its node's address and has its node's
/// Postgres as the backup. Clients spread over them.
async fn per_node_proxies(bench: &PgBench) -> (Vec<(String, SocketAddr)>, Vec<ProxyProcess>) {
    let cluster = &bench.cluster;
    let mut targets = Vec::new();
    let mut processes = Vec::new();
    for i in 0..cluster.len() {
        let ip: IpAddr = cluster.pg_addr(i).ip();
        let (listen, admin) = (SocketAddr::new(ip, 26530), SocketAddr::new(ip, 26531));
        let toml = roleproxy_pg_toml(
            cluster,
            listen,
            admin,
            cluster.pg_addr(i),
            bench.check_port(),
            "auto",
        );
        processes.push(ProxyProcess::start(
            env!("CARGO_BIN_EXE_roleproxy"),
            &toml,
            &format!("bench-node{i}"),
            "warn",
            None,
        ));
        targets.push((format!("roleproxy-n{}", i + 1), listen));
    }
    (targets, processes)
}
