//! [`LocalCluster`]: a whole Fly-style Postgres cluster on loopback, and the actions that
//! break and repair it. The `local_cluster` example, the real-Postgres tests and the
//! benchmarks all drive this one fixture.
//!
//! It runs real Postgres 15 nodes in streaming replication ([`PgCluster`]), one role agent
//! per node (`roleproxy_agent::serve` on `ip:agent_port`, answering `GET /flycheck/role`
//! like a Fly node), and a DNS server answering the cluster name with the nodes' addresses.
//! Node indexes are 0-based here; messages name nodes by address so that a program with its
//! own numbering (the example counts from 1) can show them as they are.
//!
//! Blocking Postgres work (pg_ctl, psql, pg_basebackup) runs on `spawn_blocking`; actions
//! that change the cluster are serialized, so a status poll may run beside them but two
//! failovers never interleave.

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use roleproxy_agent::AgentError;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio_postgres::NoTls;

use crate::dns::DnsServer;
use crate::harness::ConfigBuilder;
use crate::pg::{Options, PgCluster, PgError};
use crate::{eventually, lock};

/// Bound on one status query to a node (connect included), so a hung node shows as an error.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// Bound on one GET to a role agent; above the agent's own 3 s bound on Postgres.
const AGENT_TIMEOUT: Duration = Duration::from_secs(4);
/// How long a switchover waits for the replicas to receive what the old leader wrote.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `restore` lets a repointed replica find its new leader before rebuilding it.
const FOLLOW_GRACE: Duration = Duration::from_secs(3);
/// How long `restore` waits for every replica to stream from the leader.
const STREAMING_TIMEOUT: Duration = Duration::from_secs(20);
/// How long binding an agent port retries while a just-stopped agent releases it.
const BIND_RETRY_FOR: Duration = Duration::from_secs(5);

/// What to start: the Fly topology with ports and addresses a test may change.
#[derive(Clone, Debug)]
pub struct ClusterSpec {
    /// The DNS name answering with every node, e.g. `iad.demo.internal`.
    pub name: String,
    /// One loopback address per node; node 0 is the first leader.
    pub ips: Vec<Ipv4Addr>,
    /// Postgres port on every node.
    pub pg_port: u16,
    /// Role agent port on every node.
    pub agent_port: u16,
    /// Where the DNS server listens (on a free port).
    pub dns_ip: IpAddr,
    /// Nodes serve TLS with a self-signed certificate.
    pub tls: bool,
    /// How long a switchover keeps the old leader fenced (its agent answering `replica`)
    /// before demoting it: at least one proxy check interval plus `proxy.switchover_grace`,
    /// so every proxy has stopped sending it new transactions and its sessions have ended the
    /// ones they were in.
    pub fence_wait: Duration,
}

impl ClusterSpec {
    /// The demo cluster: `iad.demo.internal` → 127.0.0.11–13, Postgres on :5433, agents on
    /// :5500, DNS on 127.0.0.1, no TLS. Tests pick their own addresses with
    /// `ClusterSpec { ips: .., ..ClusterSpec::demo() }` or [`ClusterSpec::with_ips`].
    pub fn demo() -> ClusterSpec {
        ClusterSpec {
            name: "iad.demo.internal".to_owned(),
            ips: (11..=13).map(|d| Ipv4Addr::new(127, 0, 0, d)).collect(),
            pg_port: 5433,
            agent_port: 5500,
            dns_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            tls: false,
            // check.interval 1 s + switchover_grace 1 s (the defaults), and slack.
            fence_wait: Duration::from_millis(2500),
        }
    }

    /// This spec with other node addresses.
    pub fn with_ips(mut self, ips: impl IntoIterator<Item = Ipv4Addr>) -> ClusterSpec {
        self.ips = ips.into_iter().collect();
        self
    }
}

impl Default for ClusterSpec {
    fn default() -> Self {
        Self::demo()
    }
}

/// Why a cluster action failed; the cluster itself keeps running.
#[derive(thiserror::Error)]
pub enum ClusterError {
    #[error(transparent)]
    Pg(#[from] PgError),
    #[error("cannot bind the role agent on {addr}: {source}")]
    AgentBind { addr: SocketAddr, source: io::Error },
    /// The action does not fit the cluster's state ("no leader", "not running", ...).
    #[error("{0}")]
    State(String),
    /// Several nodes are writable primaries (their Postgres addresses): no one leader to assume.
    #[error("there is no single leader: {} are all primaries (a split brain)", addresses(.0))]
    SplitBrain(Vec<SocketAddr>),
    #[error("a blocking cluster task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

fn addresses(addrs: &[SocketAddr]) -> String {
    addrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The same text as `Display`, so `.expect(..)` prints a Postgres log tail readably.
impl fmt::Debug for ClusterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A WAL position as Postgres prints it (`16/B374D848`), comparable.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

impl FromStr for Lsn {
    type Err = String;

    fn from_str(text: &str) -> Result<Lsn, String> {
        let bad = || format!("not an LSN: {text:?}");
        let (high, low) = text.trim().split_once('/').ok_or_else(bad)?;
        let high = u32::from_str_radix(high, 16).map_err(|_| bad())?;
        let low = u32::from_str_radix(low, 16).map_err(|_| bad())?;
        Ok(Lsn((u64::from(high) << 32) | u64::from(low)))
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

/// One node as seen right now, by Postgres and by its role agent.
#[derive(Clone, Debug)]
pub struct NodeStatus {
    pub index: usize,
    pub ip: Ipv4Addr,
    /// The postmaster is alive.
    pub running: bool,
    /// `pg_is_in_recovery()`; `None` when Postgres could not be asked.
    pub in_recovery: Option<bool>,
    /// `transaction_read_only` of a new session (on for replicas and demoted leaders).
    pub read_only: Option<bool>,
    /// `pg_current_wal_lsn()` on a primary.
    pub current_lsn: Option<Lsn>,
    /// `pg_last_wal_receive_lsn()` on a replica: what it has, even if not yet replayed.
    pub receive_lsn: Option<Lsn>,
    /// `pg_last_wal_replay_lsn()` on a replica.
    pub replay_lsn: Option<Lsn>,
    /// The host a replica is streaming from right now (`pg_stat_wal_receiver`).
    pub upstream: Option<String>,
    /// The host a replica is configured to stream from (`primary_conninfo`), which it may
    /// still be connecting to.
    pub configured_upstream: Option<String>,
    /// Why Postgres could not be asked, when running but unreachable.
    pub error: Option<String>,
    /// The role agent's answer, `(HTTP status, body)`, or why there was none.
    pub agent: Result<(u16, String), String>,
}

impl NodeStatus {
    /// A writable primary: what the role agent calls `leader`.
    pub fn is_leader(&self) -> bool {
        self.running && self.in_recovery == Some(false) && self.read_only == Some(false)
    }

    /// A running standby.
    pub fn is_replica(&self) -> bool {
        self.running && self.in_recovery == Some(true)
    }

    /// How far this node's WAL goes: the current position of a primary, what a replica has
    /// received (or replayed, if more). The most advanced replica is the one to promote.
    pub fn position(&self) -> Option<Lsn> {
        if self.in_recovery == Some(false) {
            self.current_lsn
        } else {
            self.receive_lsn.max(self.replay_lsn)
        }
    }

    /// The role according to Postgres, in a word or two.
    pub fn role(&self) -> &'static str {
        match (self.running, self.in_recovery, self.read_only) {
            (false, _, _) => "down",
            (true, None, _) => "unreachable",
            (true, Some(true), _) => "replica",
            (true, Some(false), Some(true)) => "primary (read-only)",
            (true, Some(false), _) => "primary",
        }
    }
}

/// What [`LocalCluster::start_node`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Started {
    /// Started from its own data directory, as whatever it was.
    AsItWas,
    /// Another node leads, so it was rebuilt as that node's replica.
    ReplicaOf(usize),
}

/// The outcome of [`LocalCluster::failover`] or [`LocalCluster::switchover`].
#[derive(Clone, Copy, Debug)]
pub struct Failover {
    /// The leader before.
    pub old: usize,
    /// The promoted replica.
    pub new: usize,
    /// When the old leader stopped leading: killed (failover) or fenced (switchover).
    pub killed_at: Instant,
    /// When the promotion had finished (`pg_ctl promote -w` returned, up to 100 ms after the
    /// node accepted writes); the other replicas are repointed after this.
    pub promoted_at: Instant,
}

/// A running cluster: Postgres nodes, their role agents and the DNS server. Dropping it stops
/// everything and removes every directory; [`LocalCluster::shutdown`] does the same without
/// blocking the async runtime.
pub struct LocalCluster {
    spec: ClusterSpec,
    pg: Arc<PgCluster>,
    dns: DnsServer,
    dns_nodes: Mutex<Vec<usize>>,
    agent_addrs: Vec<SocketAddr>,
    agent_stop: watch::Sender<bool>,
    agent_tasks: Vec<JoinHandle<Result<(), AgentError>>>,
    /// Serializes the actions that change the cluster.
    ops: tokio::sync::Mutex<()>,
}

impl LocalCluster {
    /// Starts the DNS server, the Postgres nodes (node 0 the leader, the others streaming
    /// from it), and one role agent per node, then publishes every node in DNS.
    pub async fn start(spec: ClusterSpec) -> Result<LocalCluster, ClusterError> {
        // The cheap parts first, so a busy port fails before Postgres is built.
        let mut listeners = Vec::with_capacity(spec.ips.len());
        for ip in &spec.ips {
            listeners.push(bind_agent(SocketAddr::new(IpAddr::V4(*ip), spec.agent_port)).await?);
        }
        let dns = DnsServer::start(spec.dns_ip).await;
        let (ips, port, options) = (spec.ips.clone(), spec.pg_port, Options { tls: spec.tls });
        let pg = tokio::task::spawn_blocking(move || PgCluster::start_with(&ips, port, options))
            .await??;
        let pg = Arc::new(pg);

        let (agent_stop, stopped) = watch::channel(false);
        let mut agent_addrs = Vec::new();
        let mut agent_tasks = Vec::new();
        for (i, listener) in listeners.into_iter().enumerate() {
            agent_addrs.push(
                listener
                    .local_addr()
                    .map_err(|source| ClusterError::AgentBind {
                        addr: SocketAddr::new(IpAddr::V4(spec.ips[i]), spec.agent_port),
                        source,
                    })?,
            );
            let mut stopped = stopped.clone();
            let options = roleproxy_agent::AgentOptions {
                fence_file: Some(fence_file(&pg, i)),
                ..roleproxy_agent::AgentOptions::default()
            };
            agent_tasks.push(tokio::spawn(roleproxy_agent::serve_with(
                listener,
                pg.conninfo(i),
                options,
                async move {
                    let _ = stopped.wait_for(|stop| *stop).await;
                },
            )));
        }

        let cluster = LocalCluster {
            spec,
            pg,
            dns,
            dns_nodes: Mutex::new(Vec::new()),
            agent_addrs,
            agent_stop,
            agent_tasks,
            ops: tokio::sync::Mutex::new(()),
        };
        let all: Vec<usize> = (0..cluster.len()).collect();
        cluster.set_dns(&all)?;
        Ok(cluster)
    }

    /// [`LocalCluster::start`], then waits up to `timeout` until every standby streams from
    /// node 0.
    pub async fn start_streaming(
        spec: ClusterSpec,
        timeout: Duration,
    ) -> Result<LocalCluster, ClusterError> {
        let cluster = LocalCluster::start(spec).await?;
        cluster.wait_replicas(timeout).await?;
        Ok(cluster)
    }

    /// Stops the agents and every Postgres node off the async threads, then removes the
    /// cluster's directories.
    pub async fn shutdown(mut self) {
        let _ = self.agent_stop.send(true);
        for task in &mut self.agent_tasks {
            if tokio::time::timeout(Duration::from_secs(5), &mut *task)
                .await
                .is_err()
            {
                task.abort();
            }
        }
        let pg = Arc::clone(&self.pg);
        let _ = tokio::task::spawn_blocking(move || pg.stop_all()).await;
        // Drop removes the directories (nothing is left running to stop).
    }

    pub fn spec(&self) -> &ClusterSpec {
        &self.spec
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.spec.ips.len()
    }

    pub fn is_empty(&self) -> bool {
        self.spec.ips.is_empty()
    }

    /// The Postgres processes, for what the actions here do not cover.
    pub fn pg(&self) -> &PgCluster {
        &self.pg
    }

    /// The DNS server, e.g. to make it silent; [`LocalCluster::set_dns`] is the usual way.
    pub fn dns(&self) -> &DnsServer {
        &self.dns
    }

    pub fn dns_addr(&self) -> SocketAddr {
        self.dns.addr()
    }

    /// The nodes DNS currently answers with, as last set through [`LocalCluster::set_dns`].
    pub fn dns_nodes(&self) -> Vec<usize> {
        lock(&self.dns_nodes).clone()
    }

    /// Node `i`'s Postgres address.
    pub fn pg_addr(&self, i: usize) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.spec.ips[i]), self.spec.pg_port)
    }

    /// Node `i`'s role agent address.
    pub fn agent_addr(&self, i: usize) -> SocketAddr {
        self.agent_addrs[i]
    }

    /// A libpq conninfo straight to node `i`, bypassing the proxy.
    pub fn conninfo(&self, i: usize) -> String {
        self.pg.conninfo(i)
    }

    /// A roleproxy configuration for this cluster, listening (client and admin ports) on
    /// `listen_ip` with ports chosen by the system. Everything that shapes a failover keeps
    /// roleproxy's shipped defaults (check interval 2 s, fast interval 250 ms, check timeout
    /// 5 s, leader_wait 10 s, connect timeout 4 s, DNS every 1 s), so a measurement means what
    /// it would in production; `backends.backup` is empty. Override with `.set(..)`.
    pub fn proxy_config(&self, listen_ip: &str) -> ConfigBuilder {
        ConfigBuilder::new(listen_ip, self.dns.addr(), &self.spec.name)
            .set("backends.port", &self.spec.pg_port.to_string())
            .set("backends.backup", "[]")
            .set("backends.resolve_interval", "\"1s\"")
            .set("backends.resolve_timeout", "\"2s\"")
            .set("check.port", &self.spec.agent_port.to_string())
            // The shipped check cadence: what the switchover's fence wait is sized for, and
            // what the bench compares with HAProxy.
            .unset("check.interval")
            .unset("check.fast_interval")
            .set("check.timeout", "\"5s\"")
            .set("proxy.connect_timeout", "\"4s\"")
            .set("proxy.leader_wait", "\"10s\"")
    }

    /// Every node as Postgres and its role agent see it now, asked in parallel.
    pub async fn nodes(&self) -> Vec<NodeStatus> {
        let mut probes = JoinSet::new();
        for i in 0..self.len() {
            let (pg, agent) = (Arc::clone(&self.pg), self.agent_addrs[i]);
            probes.spawn(async move {
                let (mut status, answer) = tokio::join!(
                    probe(&pg, i),
                    try_http_get(agent, roleproxy_agent::ROLE_PATH, AGENT_TIMEOUT)
                );
                status.agent = answer;
                status
            });
        }
        in_node_order(probes).await
    }

    /// The one writable primary, if there is exactly one (none during a failover or a
    /// split brain).
    pub async fn leader(&self) -> Option<usize> {
        self.require_leader().await.ok()
    }

    /// Kills node `i`'s Postgres like a crash (`pg_ctl stop -m immediate`); its agent stays
    /// up and answers 500, as on a real node.
    pub async fn kill(&self, i: usize) -> Result<(), ClusterError> {
        let _ops = self.ops.lock().await;
        self.require_running(i)?;
        self.blocking(move |pg| pg.stop_immediate(i)).await
    }

    /// Starts node `i`. When another node leads, `i` may have diverged from it (an old leader,
    /// or a replica of one), so it is rebuilt as that leader's replica; otherwise it starts
    /// from its own data as whatever it was.
    pub async fn start_node(&self, i: usize) -> Result<Started, ClusterError> {
        let _ops = self.ops.lock().await;
        self.check_index(i)?;
        if self.pg.is_running(i) {
            return Err(ClusterError::State(format!(
                "{} is already running",
                self.pg_addr(i)
            )));
        }
        match self.leader().await {
            Some(leader) if leader != i => {
                self.blocking(move |pg| pg.rejoin_as_replica(i, leader))
                    .await?;
                Ok(Started::ReplicaOf(leader))
            }
            _ => {
                self.blocking(move |pg| pg.start_node(i)).await?;
                Ok(Started::AsItWas)
            }
        }
    }

    /// Promotes replica `i` whatever the others are: with a live leader this is a split brain
    /// on purpose.
    pub async fn promote(&self, i: usize) -> Result<(), ClusterError> {
        let _ops = self.ops.lock().await;
        self.require_running(i)?;
        let status = probe(&self.pg, i).await;
        if status.in_recovery == Some(false) {
            // A switchover leaves the old leader a read-only primary, following nobody: only a
            // replica can be promoted, and `restore` makes it one again.
            let hint = if status.read_only == Some(true) {
                " (read-only, as a switchover leaves the old leader): run `restore` first to \
                 make it a streaming replica of the leader, then promote it"
            } else {
                ""
            };
            return Err(ClusterError::State(format!(
                "{} is already a primary{hint}",
                self.pg_addr(i)
            )));
        }
        self.blocking(move |pg| pg.promote(i)).await
    }

    /// Makes DNS answer the cluster name with exactly these nodes (none: a name without
    /// addresses).
    pub fn set_dns(&self, nodes: &[usize]) -> Result<(), ClusterError> {
        for &i in nodes {
            self.check_index(i)?;
        }
        let addrs = nodes
            .iter()
            .map(|&i| IpAddr::V4(self.spec.ips[i]))
            .collect();
        self.dns.set(&self.spec.name, addrs);
        *lock(&self.dns_nodes) = nodes.to_vec();
        Ok(())
    }

    /// A hard failover: kills the leader (`pg_ctl stop -m immediate`), promotes the running
    /// replica with the most WAL, and points the other running replicas at it.
    pub async fn failover(&self) -> Result<Failover, ClusterError> {
        let _ops = self.ops.lock().await;
        let old = self.require_leader().await?;
        self.blocking(move |pg| pg.stop_immediate(old)).await?;
        let killed_at = Instant::now();
        let new = self.most_advanced_replica().await?;
        self.blocking(move |pg| pg.promote(new)).await?;
        let promoted_at = Instant::now();
        self.repoint_replicas(new).await?;
        Ok(Failover {
            old,
            new,
            killed_at,
            promoted_at,
        })
    }

    /// Fences node `i`: its agent answers `replica` while its Postgres stays up and writable,
    /// as the first step of a planned switchover does. [`LocalCluster::unfence`] lifts it.
    pub fn fence(&self, i: usize) -> Result<(), ClusterError> {
        self.check_index(i)?;
        std::fs::write(fence_file(&self.pg, i), b"fenced\n").map_err(|source| {
            ClusterError::State(format!("cannot fence {}: {source}", self.pg_addr(i)))
        })
    }

    /// Lifts [`LocalCluster::fence`]: the agent speaks for Postgres again.
    pub fn unfence(&self, i: usize) -> Result<(), ClusterError> {
        self.check_index(i)?;
        match std::fs::remove_file(fence_file(&self.pg, i)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(ClusterError::State(format!(
                "cannot unfence {}: {e}",
                self.pg_addr(i)
            ))),
            _ => Ok(()),
        }
    }

    /// A planned switchover: the leader is fenced (its agent answers `replica` while its
    /// Postgres stays up and writable), and after `fence_wait`, when every proxy has stopped
    /// sending it writes, it turns read-only; the replicas receive what it wrote and stop
    /// streaming from it, the one with the most WAL is promoted and the others follow it.
    /// The old leader stays a read-only primary on its own timeline until
    /// [`LocalCluster::restore`].
    pub async fn switchover(&self) -> Result<Failover, ClusterError> {
        let _ops = self.ops.lock().await;
        let old = self.require_leader().await?;
        let fence = fence_file(&self.pg, old);
        std::fs::write(&fence, b"switchover\n").map_err(|source| {
            ClusterError::State(format!("cannot fence {}: {source}", self.pg_addr(old)))
        })?;
        let killed_at = Instant::now();
        // Not a wait for an event: a proxy's sessions on the fenced leader cannot be seen from
        // here, so like an operator's switchover this gives them a fixed time to drain.
        tokio::time::sleep(self.spec.fence_wait).await;
        let demoted = self.blocking(move |pg| pg.set_read_only(old, true)).await;
        // Read-only now (or failed): either way the agent must speak for Postgres again.
        let _ = std::fs::remove_file(&fence);
        demoted?;
        let replicas = self.running_replicas().await;
        let promoted = self.switch_to_a_replica(old, &replicas).await;
        let new = match promoted {
            Ok(new) => new,
            Err(error) => {
                // Nothing was promoted: hand the cluster back to the old leader.
                let _ = self
                    .blocking(move |pg| {
                        for &j in &replicas {
                            let _ = pg.follow(j, old);
                        }
                        pg.set_read_only(old, false)
                    })
                    .await;
                return Err(error);
            }
        };
        let promoted_at = Instant::now();
        self.repoint_replicas(new).await?;
        Ok(Failover {
            old,
            new,
            killed_at,
            promoted_at,
        })
    }

    /// Makes every node other than the current leader a replica streaming from it: a node
    /// that is down, a primary of its own (an old leader) or streaming from elsewhere is
    /// rebuilt from the leader. Returns the rebuilt nodes. Lets a benchmark run round after
    /// round, and repairs a split brain once one side has been killed.
    pub async fn restore(&self) -> Result<Vec<usize>, ClusterError> {
        self.restore_around(None).await
    }

    /// [`restore`](Self::restore) around node `leader`, which must be a running primary: the
    /// way out of a split brain. Every other node, including any other primary, is rebuilt
    /// from it, so whatever only the others wrote is gone.
    pub async fn restore_keeping(&self, leader: usize) -> Result<Vec<usize>, ClusterError> {
        self.restore_around(Some(leader)).await
    }

    async fn restore_around(&self, keep: Option<usize>) -> Result<Vec<usize>, ClusterError> {
        let _ops = self.ops.lock().await;
        let leader = match keep {
            None => self.require_leader().await?,
            Some(i) => {
                self.require_running(i)?;
                if !probe(&self.pg, i).await.is_leader() {
                    return Err(ClusterError::State(format!(
                        "{} is not a primary, so it cannot be kept as the leader",
                        self.pg_addr(i)
                    )));
                }
                i
            }
        };
        let leader_host = self.spec.ips[leader].to_string();
        // Every node not streaming from the leader, and whether it is settling: a replica
        // just repointed at it, perhaps still switching timelines.
        let not_streaming = |states: Vec<NodeStatus>| -> Vec<(usize, bool)> {
            states
                .iter()
                .filter(|node| {
                    node.index != leader && node.upstream.as_deref() != Some(&leader_host)
                })
                .map(|node| {
                    let following = node.configured_upstream.as_deref() == Some(&leader_host);
                    (node.index, node.is_replica() && following)
                })
                .collect()
        };
        let indexes = |nodes: Vec<(usize, bool)>| nodes.into_iter().map(|(i, _)| i).collect();
        let settled = eventually(FOLLOW_GRACE, || async {
            let nodes = not_streaming(self.pg_states().await);
            nodes
                .iter()
                .all(|&(_, settling)| !settling)
                .then(|| indexes(nodes))
        })
        .await;
        // Past the grace, a node still settling is rebuilt too.
        let rebuild: Vec<usize> = match settled {
            Some(rebuild) => rebuild,
            None => indexes(not_streaming(self.pg_states().await)),
        };
        for &i in &rebuild {
            self.blocking(move |pg| pg.rejoin_as_replica(i, leader))
                .await?;
        }
        self.wait_streaming(leader, STREAMING_TIMEOUT).await?;
        Ok(rebuild)
    }

    /// Waits until every node but the leader is a replica streaming from it.
    pub async fn wait_replicas(&self, timeout: Duration) -> Result<(), ClusterError> {
        let leader = self.require_leader().await?;
        self.wait_streaming(leader, timeout).await
    }

    async fn wait_streaming(&self, leader: usize, timeout: Duration) -> Result<(), ClusterError> {
        let leader_host = self.spec.ips[leader].to_string();
        eventually(timeout, || async {
            let lagging: Vec<String> = self
                .pg_states()
                .await
                .iter()
                .filter(|node| {
                    node.index != leader && node.upstream.as_deref() != Some(&leader_host)
                })
                .map(|node| node.ip.to_string())
                .collect();
            if lagging.is_empty() {
                Ok(())
            } else {
                Err(ClusterError::State(format!(
                    "after {timeout:?}, {} still not streaming from {}",
                    lagging.join(", "),
                    self.pg_addr(leader)
                )))
            }
        })
        .await
    }

    /// The switchover's middle: wait for the replicas to catch up with the (now read-only)
    /// old leader, detach them so none can receive more than the one promoted, promote the
    /// most advanced.
    async fn switch_to_a_replica(
        &self,
        old: usize,
        replicas: &[usize],
    ) -> Result<usize, ClusterError> {
        if replicas.is_empty() {
            return Err(ClusterError::State("no running replica to promote".into()));
        }
        if let Some(target) = probe(&self.pg, old).await.current_lsn {
            // Not caught up in time: the most advanced replica is promoted all the same.
            eventually(CATCH_UP_TIMEOUT, || async {
                let states = self.pg_states().await;
                replicas.iter().all(|&j| {
                    states
                        .iter()
                        .find(|node| node.index == j)
                        .and_then(NodeStatus::position)
                        .is_some_and(|lsn| lsn >= target)
                })
            })
            .await;
        }
        let detach = replicas.to_vec();
        self.blocking(move |pg| detach.iter().try_for_each(|&j| pg.detach(j)))
            .await?;
        let new = self.most_advanced_replica().await?;
        self.blocking(move |pg| pg.promote(new)).await?;
        Ok(new)
    }

    /// The running replica with the most WAL.
    async fn most_advanced_replica(&self) -> Result<usize, ClusterError> {
        self.pg_states()
            .await
            .iter()
            .filter(|node| node.is_replica())
            .max_by_key(|node| (node.position(), std::cmp::Reverse(node.index)))
            .map(|node| node.index)
            .ok_or_else(|| ClusterError::State("no running replica to promote".into()))
    }

    async fn running_replicas(&self) -> Vec<usize> {
        self.pg_states()
            .await
            .iter()
            .filter(|node| node.is_replica())
            .map(|node| node.index)
            .collect()
    }

    /// Points every running replica at `leader` (after a [`LocalCluster::promote`], say).
    pub async fn repoint_replicas(&self, leader: usize) -> Result<(), ClusterError> {
        let replicas = self.running_replicas().await;
        self.blocking(move |pg| replicas.iter().try_for_each(|&j| pg.follow(j, leader)))
            .await
    }

    /// Postgres' view of every node, without asking the agents.
    async fn pg_states(&self) -> Vec<NodeStatus> {
        let mut probes = JoinSet::new();
        for i in 0..self.len() {
            let pg = Arc::clone(&self.pg);
            probes.spawn(async move { probe(&pg, i).await });
        }
        in_node_order(probes).await
    }

    async fn require_leader(&self) -> Result<usize, ClusterError> {
        let leaders: Vec<usize> = self
            .pg_states()
            .await
            .iter()
            .filter(|node| node.is_leader())
            .map(|node| node.index)
            .collect();
        match leaders.as_slice() {
            [one] => Ok(*one),
            [] => Err(ClusterError::State("no node is a writable primary".into())),
            several => Err(ClusterError::SplitBrain(
                several.iter().map(|&i| self.pg_addr(i)).collect(),
            )),
        }
    }

    fn require_running(&self, i: usize) -> Result<(), ClusterError> {
        self.check_index(i)?;
        if self.pg.is_running(i) {
            Ok(())
        } else {
            Err(ClusterError::State(format!(
                "{} is not running",
                self.pg_addr(i)
            )))
        }
    }

    fn check_index(&self, i: usize) -> Result<(), ClusterError> {
        if i < self.len() {
            Ok(())
        } else {
            Err(ClusterError::State(format!(
                "no node {i}: the cluster has {} nodes",
                self.len()
            )))
        }
    }

    /// Runs blocking Postgres work off the async threads.
    async fn blocking<T, F>(&self, work: F) -> Result<T, ClusterError>
    where
        T: Send + 'static,
        F: FnOnce(&PgCluster) -> Result<T, PgError> + Send + 'static,
    {
        let pg = Arc::clone(&self.pg);
        Ok(tokio::task::spawn_blocking(move || work(&pg)).await??)
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        let _ = self.agent_stop.send(true);
        for task in &self.agent_tasks {
            task.abort();
        }
        // The DNS server stops with its own drop, and PgCluster's drop kills whatever still
        // runs and removes the directories once the last action holding it has finished.
    }
}

/// Asks node `i`'s Postgres for its role and WAL position over a fresh connection.
async fn probe(pg: &PgCluster, i: usize) -> NodeStatus {
    let mut status = NodeStatus {
        index: i,
        ip: pg.nodes[i].ip,
        running: pg.is_running(i),
        in_recovery: None,
        read_only: None,
        current_lsn: None,
        receive_lsn: None,
        replay_lsn: None,
        upstream: None,
        configured_upstream: None,
        error: None,
        agent: Err("not asked".into()),
    };
    if !status.running {
        return status;
    }
    let conninfo = format!(
        "{} connect_timeout=2 application_name=roleproxy-testkit",
        pg.conninfo(i)
    );
    match tokio::time::timeout(PROBE_TIMEOUT, query_state(&conninfo)).await {
        Ok(Ok(row)) => {
            let lsn = |text: Option<String>| text.and_then(|t| t.parse().ok());
            status.in_recovery = Some(row.0);
            status.read_only = Some(row.1);
            status.current_lsn = lsn(row.2);
            status.receive_lsn = lsn(row.3);
            status.replay_lsn = lsn(row.4);
            status.upstream = row.5;
            status.configured_upstream = conninfo_host(&row.6);
        }
        Ok(Err(error)) => status.error = Some(roleproxy_common::error_chain(&error)),
        Err(_) => status.error = Some(format!("no answer within {PROBE_TIMEOUT:?}")),
    }
    status
}

type StateRow = (
    bool,
    bool,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    String,
);

async fn query_state(conninfo: &str) -> Result<StateRow, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(conninfo, NoTls).await?;
    let driver = tokio::spawn(connection);
    let row = client
        .query_one(
            "SELECT pg_is_in_recovery(),
                    current_setting('transaction_read_only') = 'on',
                    CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_lsn()::text END,
                    pg_last_wal_receive_lsn()::text,
                    pg_last_wal_replay_lsn()::text,
                    (SELECT sender_host FROM pg_stat_wal_receiver WHERE status = 'streaming'),
                    current_setting('primary_conninfo')",
            &[],
        )
        .await;
    drop(client);
    // The connection ends once the client is gone; an error there changes nothing.
    let _ = driver.await;
    let row = row?;
    Ok((
        row.try_get(0)?,
        row.try_get(1)?,
        row.try_get(2)?,
        row.try_get(3)?,
        row.try_get(4)?,
        row.try_get(5)?,
        row.try_get(6)?,
    ))
}

/// The `host=` of a libpq conninfo in `key=value` form (what `pg_basebackup -R` and
/// [`PgCluster::follow`] write).
fn conninfo_host(conninfo: &str) -> Option<String> {
    conninfo.split_whitespace().find_map(|pair| {
        let (key, value) = pair.split_once('=')?;
        (key == "host").then(|| value.trim_matches('\'').to_owned())
    })
}

/// Every probe's status, by node index.
async fn in_node_order(mut probes: JoinSet<NodeStatus>) -> Vec<NodeStatus> {
    let mut nodes = Vec::with_capacity(probes.len());
    while let Some(joined) = probes.join_next().await {
        if let Ok(status) = joined {
            nodes.push(status);
        }
    }
    nodes.sort_by_key(|node| node.index);
    nodes
}

/// Binds an agent port, retrying briefly while an agent that just stopped releases it.
async fn bind_agent(addr: SocketAddr) -> Result<TcpListener, ClusterError> {
    // `None` while the port is still in use (an event to wait for), `Some` for the answer.
    let bound = eventually(BIND_RETRY_FOR, || async {
        match TcpListener::bind(addr).await {
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => None,
            other => Some(other),
        }
    })
    .await;
    match bound {
        Some(result) => result.map_err(|source| ClusterError::AgentBind { addr, source }),
        // One last try, for its error.
        None => TcpListener::bind(addr)
            .await
            .map_err(|source| ClusterError::AgentBind { addr, source }),
    }
}

/// A minimal HTTP/1.1 GET returning `(status, body)`, or why it failed; unlike
/// [`crate::harness::http_get`] it never panics, for programs that must keep running.
pub async fn try_http_get(
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> Result<(u16, String), String> {
    crate::try_http(addr, "GET", path, None, timeout).await
}

/// The file whose presence makes node `i`'s agent answer `replica` (see `AgentOptions`).
fn fence_file(pg: &PgCluster, i: usize) -> std::path::PathBuf {
    pg.nodes[i].dir.join("fence")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsns_parse_compare_and_print() {
        let low: Lsn = "0/3000148".parse().expect("valid LSN");
        let high: Lsn = "16/B374D848".parse().expect("valid LSN");
        assert_eq!(low, Lsn(0x0300_0148));
        assert_eq!(high, Lsn((0x16 << 32) | 0xB374_D848));
        assert!(high > low);
        assert_eq!(high.to_string(), "16/B374D848");
        assert!("3000148".parse::<Lsn>().is_err());
        assert!("0/xyz".parse::<Lsn>().is_err());
    }

    #[test]
    fn conninfo_hosts() {
        let written = "user=postgres passfile='/x/.pgpass' channel_binding=prefer host=127.0.0.11 port=5433 sslmode=prefer";
        assert_eq!(conninfo_host(written).as_deref(), Some("127.0.0.11"));
        assert_eq!(
            conninfo_host("host='127.0.0.12' port=5433").as_deref(),
            Some("127.0.0.12")
        );
        assert_eq!(conninfo_host(""), None);
    }

    #[test]
    fn most_wal_wins() {
        let node = |receive: Option<u64>, replay: Option<u64>| NodeStatus {
            index: 0,
            ip: Ipv4Addr::LOCALHOST,
            running: true,
            in_recovery: Some(true),
            read_only: Some(true),
            current_lsn: None,
            receive_lsn: receive.map(Lsn),
            replay_lsn: replay.map(Lsn),
            upstream: None,
            configured_upstream: None,
            error: None,
            agent: Err(String::new()),
        };
        assert_eq!(node(Some(5), Some(3)).position(), Some(Lsn(5)));
        // A replica that never streamed has only replayed what it copied.
        assert_eq!(node(None, Some(3)).position(), Some(Lsn(3)));
        assert_eq!(node(None, None).position(), None);
    }
}
