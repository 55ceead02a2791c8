//! [`PatroniCluster`]: a real Patroni cluster on loopback, so roleproxy can be tested against
//! Patroni's REST API (`GET /primary`, `GET /replica`) as well as against Fly's role agents.
//!
//! Every node runs Debian's `patroni` (3.0.2 in bookworm) with its built-in `raft` DCS
//! (`python3-pysyncobj`), so no etcd or Consul is needed. Node `i` of net `n` lives on
//! `127.n.0.(10+i)` with Patroni's usual ports: Postgres on `:5432`, the REST API on `:8008`
//! and raft on `:2222`. Which node bootstraps the cluster, and so leads first, is decided by
//! Patroni: ask [`PatroniCluster::wait_leader`] rather than assuming node 0.
//!
//! Patroni and its Postgres run as the `postgres` user when the tests run as root, in a
//! temporary directory owned by that user. Each node's Patroni log (with Postgres' own
//! server log, which goes to the same stderr) is `patroni.log` in the node's directory; every
//! wait that times out panics with the tail of all the logs.
//!
//! Connections need a password (scram-sha-256 over TCP, from `127.0.0.0/8` only): use
//! [`conninfo`] or [`PatroniCluster::conninfo`], which carry [`SUPERUSER`] and
//! [`SUPERUSER_PASSWORD`].
//!
//! # Timings
//!
//! The DCS timings are as short as Patroni allows, so that tests are quick: `loop_wait` 1 s,
//! `retry_timeout` 4 s, `ttl` 10 s, which keeps Patroni's rule `loop_wait + 2 * retry_timeout
//! <= ttl`. Patroni 3.0.2 checks only that they are integers; later Patronis document
//! minimums (`ttl` 20, `loop_wait` 1, `retry_timeout` 3), which would only make a failover
//! after [`PatroniCluster::kill_node`] slower. A switchover does not wait for the ttl.
//!
//! # Processes
//!
//! Patroni starts Postgres in a session of its own (so that Postgres survives a Patroni
//! restart), which makes the postmaster nobody's child. Every process of a node (Patroni, its
//! helpers such as `initdb` and `pg_basebackup`, Postgres) has its working directory inside
//! the node's directory, and that is how teardown finds them: [`PatroniCluster::kill_node`]
//! and `Drop` kill Patroni, stop Postgres with `SIGQUIT` (an immediate shutdown, which also
//! frees its shared memory) and `SIGKILL` whatever is left, and only ever signal processes
//! whose working directory is inside this cluster's directory. If the test process itself is
//! killed with `SIGKILL`, nothing runs its `Drop`: Patroni and Postgres keep running, and the
//! next [`PatroniCluster::start`] on the same net refuses to start, naming the busy address.

use std::fmt;
use std::fs::{self, OpenOptions};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::task::JoinSet;

use crate::pg::{pg_bin, postmaster_pid};
use crate::{eventually, eventually_blocking, exit_status, lock};

/// The Postgres superuser every connection may use, with [`SUPERUSER_PASSWORD`].
pub const SUPERUSER: &str = "postgres";
/// The superuser's password.
pub const SUPERUSER_PASSWORD: &str = "roleproxy-patroni-superuser";
/// The user replicas stream as, with [`REPLICATION_PASSWORD`].
pub const REPLICATION_USER: &str = "replicator";
/// The replication user's password.
pub const REPLICATION_PASSWORD: &str = "roleproxy-patroni-replication";

/// Patroni's conventional ports, on every node's own address.
pub const PG_PORT: u16 = 5432;
pub const REST_PORT: u16 = 8008;
pub const RAFT_PORT: u16 = 2222;

/// DCS timings (seconds); see the module documentation.
pub const TTL: u64 = 10;
pub const LOOP_WAIT: u64 = 1;
pub const RETRY_TIMEOUT: u64 = 4;

/// How long [`PatroniCluster::start`] waits for a leader and streaming replicas.
const START_TIMEOUT: Duration = Duration::from_secs(120);
/// Bound on one REST request that should answer at once.
const REST_TIMEOUT: Duration = Duration::from_secs(3);
/// Bound on `POST /switchover`, which Patroni answers only when it is over (it polls for
/// up to 20 s).
const SWITCHOVER_TIMEOUT: Duration = Duration::from_secs(40);
/// How long a `SIGTERM`ed Patroni may take to stop Postgres and exit before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a `SIGQUIT`ed Postgres may take to go away before it is killed.
const QUIT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long processes still left after `SIGKILL` may take to go away.
const KILL_TIMEOUT: Duration = Duration::from_secs(1);
/// Lines of each node's log quoted when something fails.
const LOG_TAIL_LINES: usize = 30;

/// Distinguishes clusters started by the same test process.
static NEXT_CLUSTER: AtomicUsize = AtomicUsize::new(0);

/// A libpq conninfo for the `postgres` database at `addr` as the superuser, password included.
pub fn conninfo(addr: SocketAddr) -> String {
    format!(
        "host={} port={} user={SUPERUSER} password={SUPERUSER_PASSWORD} dbname=postgres connect_timeout=30",
        addr.ip(),
        addr.port()
    )
}

/// Why a cluster action failed; the text includes the tail of every node's log.
pub struct PatroniError(String);

impl fmt::Display for PatroniError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The same text as `Display`, so `.expect(..)` prints the logs readably.
impl fmt::Debug for PatroniError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PatroniError {}

/// One node's files.
#[derive(Debug)]
pub struct PatroniNode {
    /// Patroni's member name, `node{i}`.
    pub name: String,
    pub ip: Ipv4Addr,
    /// The node's directory: its config, log, pgpass, raft journal and unix socket.
    pub dir: PathBuf,
    /// `PGDATA`, created by Patroni (`initdb` or `pg_basebackup`).
    pub data_dir: PathBuf,
    pub config_file: PathBuf,
    /// Patroni's log, with Postgres' server log mixed in.
    pub log_file: PathBuf,
}

/// The state of one node's Patroni process.
enum Process {
    Running(Child),
    /// Stopped or killed on purpose (or never started).
    Stopped,
    /// Exited by itself: a failure every later wait reports.
    Exited(ExitStatus),
}

/// Who the Patroni processes run as.
#[derive(Clone, Copy, Debug)]
struct Owner {
    uid: u32,
    gid: u32,
}

/// A running Patroni cluster; dropping it kills every process and removes every directory,
/// [`PatroniCluster::shutdown`] does the same without blocking the async runtime.
pub struct PatroniCluster {
    net: u8,
    root: PathBuf,
    nodes: Vec<PatroniNode>,
    processes: Arc<Vec<Mutex<Process>>>,
    owner: Option<Owner>,
}

impl PatroniCluster {
    /// Starts `nodes` Patroni nodes on `127.{net}.0.10`, `.11`, ... and waits (up to two
    /// minutes) until one of them leads and every other one is a replica streaming from it.
    /// Panics with the tail of the logs when that does not happen, or when a node's address is
    /// already in use.
    pub async fn start(net: u8, nodes: usize) -> PatroniCluster {
        assert!(
            (1..=200).contains(&nodes),
            "a Patroni cluster has 1 to 200 nodes, not {nodes}"
        );
        let ips: Vec<Ipv4Addr> = (0..nodes)
            .map(|i| Ipv4Addr::new(127, net, 0, 10 + i as u8))
            .collect();
        // A Patroni or Postgres left over from a killed run would otherwise show only as a
        // startup timeout.
        for ip in &ips {
            for port in [PG_PORT, REST_PORT, RAFT_PORT] {
                let addr = SocketAddr::new(IpAddr::V4(*ip), port);
                if let Err(e) = std::net::TcpListener::bind(addr) {
                    panic!(
                        "cannot start Patroni on {addr}: {e} (a Patroni or Postgres from an \
                         earlier run may still be running: look for processes in {}/roleproxy-patroni-*)",
                        std::env::temp_dir().display()
                    );
                }
            }
        }
        let started = Instant::now();
        let owner = postgres_owner().unwrap_or_else(|e| panic!("{e}"));
        let root = std::env::temp_dir().join(format!(
            "roleproxy-patroni-{}-{}",
            std::process::id(),
            NEXT_CLUSTER.fetch_add(1, Ordering::Relaxed)
        ));
        let nodes: Vec<PatroniNode> = ips
            .iter()
            .enumerate()
            .map(|(i, &ip)| {
                let dir = root.join(format!("node{i}"));
                PatroniNode {
                    name: format!("node{i}"),
                    ip,
                    data_dir: dir.join("data"),
                    config_file: dir.join("patroni.yml"),
                    log_file: dir.join("patroni.log"),
                    dir,
                }
            })
            .collect();
        let processes = Arc::new(nodes.iter().map(|_| Mutex::new(Process::Stopped)).collect());
        // Built before anything runs, so a panic below still cleans up.
        let cluster = PatroniCluster {
            net,
            root,
            nodes,
            processes,
            owner,
        };
        if cluster.root.exists() {
            fs::remove_dir_all(&cluster.root)
                .unwrap_or_else(|e| panic!("cannot remove {}: {e}", cluster.root.display()));
        }
        cluster.make_dir(&cluster.root);
        for i in 0..cluster.len() {
            let node = &cluster.nodes[i];
            cluster.make_dir(&node.dir);
            let config = serde_json::to_string_pretty(&cluster.config(i))
                .unwrap_or_else(|e| panic!("cannot serialize the Patroni config: {e}"));
            // YAML is a superset of JSON, so Patroni reads this as its YAML config.
            fs::write(&node.config_file, config)
                .unwrap_or_else(|e| panic!("cannot write {}: {e}", node.config_file.display()));
        }
        for i in 0..cluster.len() {
            if let Err(e) = cluster.spawn(i) {
                panic!("{e}");
            }
        }
        cluster.wait_replicas_streaming(START_TIMEOUT).await;
        report_ready(&cluster, started.elapsed());
        cluster
    }

    /// Stops every node (off the async threads) and removes the cluster's directory.
    pub async fn shutdown(self) {
        let _ = tokio::task::spawn_blocking(move || drop(self)).await;
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The net this cluster was started on (its addresses are `127.{net}.0.x`).
    pub fn net(&self) -> u8 {
        self.net
    }

    /// The directory holding every node; removed on drop.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Node `i`'s files and names.
    pub fn node(&self, i: usize) -> &PatroniNode {
        &self.nodes[i]
    }

    /// Node `i`'s Patroni member name.
    pub fn name(&self, i: usize) -> &str {
        &self.nodes[i].name
    }

    /// Node `i`'s own loopback address.
    pub fn node_addr(&self, i: usize) -> IpAddr {
        IpAddr::V4(self.nodes[i].ip)
    }

    /// Node `i`'s Patroni REST API.
    pub fn rest_addr(&self, i: usize) -> SocketAddr {
        SocketAddr::new(self.node_addr(i), REST_PORT)
    }

    /// Node `i`'s Postgres.
    pub fn pg_addr(&self, i: usize) -> SocketAddr {
        SocketAddr::new(self.node_addr(i), PG_PORT)
    }

    /// Node `i`'s raft port.
    pub fn raft_addr(&self, i: usize) -> SocketAddr {
        SocketAddr::new(self.node_addr(i), RAFT_PORT)
    }

    /// A libpq conninfo straight to node `i`'s Postgres, as the superuser.
    pub fn conninfo(&self, i: usize) -> String {
        conninfo(self.pg_addr(i))
    }

    /// Whether node `i`'s Patroni process is running (it may still be starting Postgres).
    pub fn is_running(&self, i: usize) -> bool {
        self.poll_process(i);
        matches!(*lock(&self.processes[i]), Process::Running(_))
    }

    /// `GET path` on node `i`'s REST API: `(status, body)`, or why there was no answer.
    pub async fn get(&self, i: usize, path: &str) -> Result<(u16, String), String> {
        crate::try_http(self.rest_addr(i), "GET", path, None, REST_TIMEOUT).await
    }

    /// The one node answering 200 on `GET /primary`, if exactly one does (none during a
    /// switchover or failover).
    pub async fn leader(&self) -> Option<usize> {
        let codes = self.status_codes("/primary").await;
        let leaders: Vec<usize> = (0..self.len()).filter(|&i| codes[i] == Some(200)).collect();
        match leaders.as_slice() {
            [one] => Some(*one),
            _ => None,
        }
    }

    /// The HTTP status every node answers on `path` (`None`: no answer), asked in parallel.
    pub async fn status_codes(&self, path: &str) -> Vec<Option<u16>> {
        let mut requests = JoinSet::new();
        for i in 0..self.len() {
            let (addr, path) = (self.rest_addr(i), path.to_owned());
            requests.spawn(async move {
                let answer = crate::try_http(addr, "GET", &path, None, REST_TIMEOUT).await;
                (i, answer.ok().map(|(status, _)| status))
            });
        }
        let mut codes = vec![None; self.len()];
        while let Some(joined) = requests.join_next().await {
            if let Ok((i, code)) = joined {
                codes[i] = code;
            }
        }
        codes
    }

    /// Waits until exactly one node answers 200 on `GET /primary` and returns it. Panics with
    /// the logs after `timeout`, or as soon as a Patroni exits by itself.
    pub async fn wait_leader(&self, timeout: Duration) -> usize {
        let leader = eventually(timeout, || async {
            self.panic_on_exits();
            self.leader().await
        })
        .await;
        match leader {
            Some(leader) => leader,
            None => {
                let codes = self.status_codes("/primary").await;
                self.fail(&format!(
                    "after {timeout:?}, no single node answers 200 on GET /primary: {codes:?}"
                ))
            }
        }
    }

    /// Waits until one node leads and every other running node answers 200 on `GET /replica`
    /// and streams from the leader (a wal sender with the node's name as `application_name`
    /// and `state: streaming` in the leader's `GET /patroni`; the senders' `client_addr` is
    /// 127.0.0.1 whatever the node, as the kernel picks that source address on loopback), and
    /// returns the leader. Nodes stopped through [`PatroniCluster::stop_node`] or
    /// [`PatroniCluster::kill_node`] are left out. Panics with the logs after `timeout`, or as
    /// soon as a Patroni exits by itself.
    pub async fn wait_replicas_streaming(&self, timeout: Duration) -> usize {
        let streaming = eventually(timeout, || async {
            self.panic_on_exits();
            match self.leader().await {
                Some(leader) => match self.not_streaming(leader).await {
                    Ok(missing) if missing.is_empty() => Ok(leader),
                    Ok(missing) => Err(format!(
                        "{} not streaming from {} ({})",
                        missing.join(", "),
                        self.name(leader),
                        self.nodes[leader].ip
                    )),
                    Err(e) => Err(e),
                },
                None => {
                    let codes = self.status_codes("/primary").await;
                    Err(format!(
                        "no single node answers 200 on GET /primary: {codes:?}"
                    ))
                }
            }
        })
        .await;
        streaming.unwrap_or_else(|missing| self.fail(&format!("after {timeout:?}, {missing}")))
    }

    /// Switches over from the current leader to node `to` with `POST /switchover` (leader and
    /// candidate named), which Patroni answers once `to` holds the leader key; returns
    /// Patroni's answer. `to`'s Postgres may take a moment longer to answer 200 on
    /// `GET /primary`, and the old leader to rejoin as a replica: follow with
    /// [`PatroniCluster::wait_leader`] or [`PatroniCluster::wait_replicas_streaming`].
    pub async fn switchover(&self, to: usize) -> Result<String, PatroniError> {
        self.check_index(to)?;
        let leader = self
            .leader()
            .await
            .ok_or_else(|| self.error("switchover: there is no single leader"))?;
        if leader == to {
            return Err(self.error(&format!("switchover: {} already leads", self.name(to))));
        }
        let body = json!({"leader": self.name(leader), "candidate": self.name(to)}).to_string();
        let answer = crate::try_http(
            self.rest_addr(leader),
            "POST",
            "/switchover",
            Some(&body),
            SWITCHOVER_TIMEOUT,
        )
        .await;
        match answer {
            // Patroni may also answer 200 "Switched over to X instead of Y".
            Ok((200, text)) if text.starts_with("Successfully") => Ok(text),
            Ok((status, text)) => Err(self.error(&format!(
                "POST /switchover {body} to {}: {status} {text}",
                self.name(leader)
            ))),
            Err(e) => Err(self.error(&e)),
        }
    }

    /// Stops node `i` cleanly: `SIGTERM` to Patroni, which stops Postgres (fast mode),
    /// releases the leader key if it holds it, and exits. A Patroni that takes longer than
    /// 30 s is killed, and so is anything it left (an error says so). A node whose Patroni
    /// exited by itself is cleaned up and counts as stopped.
    pub async fn stop_node(&self, i: usize) -> Result<(), PatroniError> {
        let child = self.take_running(i)?;
        let (processes, dir) = (Arc::clone(&self.processes), self.nodes[i].dir.clone());
        let data_dir = self.nodes[i].data_dir.clone();
        let outcome = tokio::task::spawn_blocking(move || {
            let exited = child.map(|mut child| {
                signal(child.id(), libc::SIGTERM);
                let exited = exit_status(&mut child, STOP_TIMEOUT);
                if exited.is_none() {
                    let _ = child.kill();
                    let _ = child.wait();
                }
                exited.is_some()
            });
            reap(&[(dir.as_path(), data_dir.as_path())]);
            *lock(&processes[i]) = Process::Stopped;
            exited
        })
        .await;
        match outcome {
            Ok(Some(true) | None) => Ok(()),
            Ok(Some(false)) => Err(self.error(&format!(
                "{} did not stop within {STOP_TIMEOUT:?} of SIGTERM and was killed",
                self.name(i)
            ))),
            Err(e) => Err(self.error(&format!("stopping {}: {e}", self.name(i)))),
        }
    }

    /// Kills node `i` like a crash: `SIGKILL` to Patroni (the leader key stays until the ttl
    /// runs out) and an immediate shutdown of Postgres (`SIGQUIT`, like
    /// `pg_ctl stop -m immediate`).
    pub async fn kill_node(&self, i: usize) -> Result<(), PatroniError> {
        let child = self.take_running(i)?;
        let (processes, dir) = (Arc::clone(&self.processes), self.nodes[i].dir.clone());
        let data_dir = self.nodes[i].data_dir.clone();
        tokio::task::spawn_blocking(move || {
            if let Some(mut child) = child {
                let _ = child.kill();
                let _ = child.wait();
            }
            reap(&[(dir.as_path(), data_dir.as_path())]);
            *lock(&processes[i]) = Process::Stopped;
        })
        .await
        .map_err(|e| self.error(&format!("killing {}: {e}", self.name(i))))
    }

    /// Starts node `i`'s Patroni again after [`PatroniCluster::stop_node`] or
    /// [`PatroniCluster::kill_node`]; it rejoins from its data directory (rewinding or
    /// recloning if it must).
    pub fn start_node(&self, i: usize) -> Result<(), PatroniError> {
        self.check_index(i)?;
        if self.is_running(i) {
            return Err(self.error(&format!("{} is already running", self.name(i))));
        }
        self.spawn(i)
    }

    /// The last lines of every node's log.
    pub fn log_tails(&self) -> String {
        self.nodes
            .iter()
            .map(|node| {
                format!(
                    "--- {} ({}) {} (tail) ---\n{}\n",
                    node.name,
                    node.ip,
                    node.log_file.display(),
                    log_tail(&node.log_file, LOG_TAIL_LINES)
                )
            })
            .collect()
    }

    /// Patroni's configuration for node `i`.
    fn config(&self, i: usize) -> Value {
        let node = &self.nodes[i];
        let rest = self.rest_addr(i).to_string();
        let pg = self.pg_addr(i).to_string();
        let raft = self.raft_addr(i).to_string();
        let partners: Vec<String> = (0..self.len())
            .filter(|&j| j != i)
            .map(|j| self.raft_addr(j).to_string())
            .collect();
        let bin_dir = pg_bin("pg_ctl")
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let superuser = json!({"username": SUPERUSER, "password": SUPERUSER_PASSWORD});
        json!({
            "scope": format!("roleproxy-{}", self.net),
            "name": node.name,
            "log": {"level": "INFO", "format": "%(asctime)s %(levelname)s: %(message)s"},
            "restapi": {"listen": rest, "connect_address": rest},
            "raft": {
                "data_dir": node.dir.join("raft"),
                "self_addr": raft,
                "bind_addr": raft,
                "partner_addrs": partners,
            },
            "bootstrap": {
                "dcs": {
                    "ttl": TTL,
                    "loop_wait": LOOP_WAIT,
                    "retry_timeout": RETRY_TIMEOUT,
                    "maximum_lag_on_failover": 1_048_576,
                    "postgresql": {
                        "use_pg_rewind": true,
                        "use_slots": true,
                        // Fast, not durable; pg_rewind needs full_page_writes, so it stays on.
                        "parameters": {
                            "fsync": "off",
                            "synchronous_commit": "off",
                            "shared_buffers": "32MB",
                            "max_connections": 50,
                            "wal_keep_size": "64MB",
                        },
                    },
                },
                "initdb": [{"encoding": "UTF8"}, {"locale": "C"}, "no-sync"],
            },
            "postgresql": {
                "listen": pg,
                "connect_address": pg,
                "data_dir": node.data_dir,
                "bin_dir": bin_dir,
                "pgpass": node.dir.join("pgpass"),
                "authentication": {
                    "superuser": superuser,
                    "replication": {"username": REPLICATION_USER, "password": REPLICATION_PASSWORD},
                },
                // Every node uses port 5432, so each needs its own socket directory.
                "parameters": {"unix_socket_directories": node.dir},
                "pg_hba": [
                    "local all all trust",
                    format!("host replication {REPLICATION_USER} 127.0.0.0/8 scram-sha-256"),
                    "host all all 127.0.0.0/8 scram-sha-256",
                ],
                "basebackup": [{"checkpoint": "fast"}],
            },
            "tags": {"nofailover": false, "noloadbalance": false, "clonefrom": false, "nosync": false},
        })
    }

    /// Starts node `i`'s Patroni, as `postgres` when we are root, logging to its log file.
    fn spawn(&self, i: usize) -> Result<(), PatroniError> {
        let node = &self.nodes[i];
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log_file)
            .and_then(|file| Ok((file.try_clone()?, file)))
            .map_err(|e| self.error(&format!("cannot open {}: {e}", node.log_file.display())))?;
        // Debian's own `patroni`, by absolute path: run as `postgres`, a bare name would be
        // looked up in directories of root's PATH that `postgres` may not enter.
        let program = crate::find_program("patroni", "patroni").map_err(|e| self.error(&e))?;
        let mut command = Command::new(program);
        command
            .arg(&node.config_file)
            .current_dir(&node.dir)
            .env("HOME", &node.dir)
            .env("PGPASSFILE", node.dir.join("pgpass"))
            .stdin(Stdio::null())
            .stdout(log.0)
            .stderr(log.1);
        if let Some(owner) = self.owner {
            use std::os::unix::process::CommandExt;
            command
                .uid(owner.uid)
                .gid(owner.gid)
                .env("USER", "postgres")
                .env("LOGNAME", "postgres");
        }
        let child = command.spawn().map_err(|e| {
            self.error(&format!(
                "cannot run patroni (Debian packages `patroni` and `python3-pysyncobj`; scripts/test installs them): {e}"
            ))
        })?;
        *lock(&self.processes[i]) = Process::Running(child);
        Ok(())
    }

    /// Notes a Patroni that has exited by itself.
    fn poll_process(&self, i: usize) {
        let mut process = lock(&self.processes[i]);
        if let Process::Running(child) = &mut *process {
            if let Ok(Some(status)) = child.try_wait() {
                *process = Process::Exited(status);
            }
        }
    }

    fn panic_on_exits(&self) {
        let exited: Vec<String> = (0..self.len())
            .filter_map(|i| {
                self.poll_process(i);
                match &*lock(&self.processes[i]) {
                    Process::Exited(status) => Some(format!("{} ({status})", self.name(i))),
                    _ => None,
                }
            })
            .collect();
        if !exited.is_empty() {
            self.fail(&format!("Patroni exited on {}", exited.join(", ")));
        }
    }

    /// The running nodes other than `leader` that are not yet replicas streaming from it.
    async fn not_streaming(&self, leader: usize) -> Result<Vec<String>, String> {
        let (status, body) = self.get(leader, "/patroni").await?;
        if status != 200 {
            return Err(format!("GET /patroni on the leader: {status} {body}"));
        }
        let state: Value = serde_json::from_str(&body)
            .map_err(|e| format!("GET /patroni on the leader: {e}: {body}"))?;
        let streaming: Vec<&str> = state["replication"]
            .as_array()
            .map(|senders| {
                senders
                    .iter()
                    .filter(|sender| sender["state"] == "streaming")
                    .filter_map(|sender| sender["application_name"].as_str())
                    .collect()
            })
            .unwrap_or_default();
        let codes = self.status_codes("/replica").await;
        Ok((0..self.len())
            .filter(|&j| j != leader && self.is_running(j))
            .filter(|&j| codes[j] != Some(200) || !streaming.contains(&self.name(j)))
            .map(|j| format!("{} ({})", self.name(j), self.nodes[j].ip))
            .collect())
    }

    /// Node `i`'s Patroni process to stop: `None` when it has exited by itself (what it left
    /// behind still needs reaping); an error when it was stopped already.
    fn take_running(&self, i: usize) -> Result<Option<Child>, PatroniError> {
        self.check_index(i)?;
        let mut process = lock(&self.processes[i]);
        match std::mem::replace(&mut *process, Process::Stopped) {
            Process::Running(child) => Ok(Some(child)),
            Process::Exited(_) => Ok(None),
            Process::Stopped => {
                drop(process);
                Err(self.error(&format!("{} is not running", self.name(i))))
            }
        }
    }

    fn check_index(&self, i: usize) -> Result<(), PatroniError> {
        if i < self.len() {
            Ok(())
        } else {
            Err(PatroniError(format!(
                "no node {i}: the cluster has {} nodes",
                self.len()
            )))
        }
    }

    fn make_dir(&self, dir: &Path) {
        fs::create_dir_all(dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        if let Some(owner) = self.owner {
            std::os::unix::fs::chown(dir, Some(owner.uid), Some(owner.gid))
                .unwrap_or_else(|e| panic!("cannot give {} to postgres: {e}", dir.display()));
        }
    }

    fn error(&self, message: &str) -> PatroniError {
        PatroniError(format!("{message}\n{}", self.log_tails()))
    }

    fn fail(&self, message: &str) -> ! {
        panic!("{}", self.error(message))
    }
}

impl Drop for PatroniCluster {
    fn drop(&mut self) {
        // Best effort, and quick: nothing here is worth a clean shutdown.
        for process in self.processes.iter() {
            let mut process = lock(process);
            if let Process::Running(child) = &mut *process {
                let _ = child.kill();
                let _ = child.wait();
            }
            *process = Process::Stopped;
        }
        let dirs: Vec<(&Path, &Path)> = self
            .nodes
            .iter()
            .map(|node| (node.dir.as_path(), node.data_dir.as_path()))
            .collect();
        reap(&dirs);
        let _ = fs::remove_dir_all(&self.root);
    }
}

/// Reports how long the start took on stderr, which the test harness shows only for a failing
/// test (or with `--nocapture`).
fn report_ready(cluster: &PatroniCluster, took: Duration) {
    eprintln!(
        "Patroni cluster of {} nodes on 127.{}.0.x ready in {:.1} s",
        cluster.len(),
        cluster.net,
        took.as_secs_f64()
    );
}

/// The `postgres` user's ids when we are root (Postgres refuses to run as root); `None`
/// otherwise, and Patroni runs as ourselves.
fn postgres_owner() -> Result<Option<Owner>, String> {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let root = status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        == Some("0");
    if !root {
        return Ok(None);
    }
    let id = |flag: &str| -> Result<u32, String> {
        let output = Command::new("id")
            .args([flag, "postgres"])
            .output()
            .map_err(|e| format!("cannot run id {flag} postgres: {e}"))?;
        String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .map_err(|_| {
                format!(
                    "no postgres user (id {flag} postgres: {})",
                    String::from_utf8_lossy(&output.stderr).trim()
                )
            })
    };
    Ok(Some(Owner {
        uid: id("-u")?,
        gid: id("-g")?,
    }))
}

/// Sends `sig` to `pid`; a process already gone is what the callers want anyway.
fn signal(pid: u32, sig: libc::c_int) {
    let _ = crate::signal(pid, sig);
}

/// Ends every process left in these node directories (`(dir, data_dir)`) once their Patroni
/// is gone: Postgres gets `SIGQUIT` (an immediate shutdown that frees its shared memory),
/// Patroni's helpers (`pg_basebackup`, `initdb`, ...) `SIGKILL`, and whatever is left after a
/// few seconds `SIGKILL` too.
fn reap(dirs: &[(&Path, &Path)]) {
    for (dir, data_dir) in dirs {
        if let Some(postmaster) = postmaster_pid(data_dir) {
            if processes_in(dir).contains(&postmaster) {
                signal(postmaster, libc::SIGQUIT);
            }
        }
        for pid in processes_in(dir) {
            let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.trim() != "postgres" {
                signal(pid, libc::SIGKILL);
            }
        }
    }
    let remaining = || -> Vec<u32> { dirs.iter().flat_map(|(dir, _)| processes_in(dir)).collect() };
    if eventually_blocking(QUIT_TIMEOUT, || remaining().is_empty()) {
        return;
    }
    eventually_blocking(KILL_TIMEOUT, || {
        let left = remaining();
        for &pid in &left {
            signal(pid, libc::SIGKILL);
        }
        left.is_empty()
    });
}

/// Live processes whose working directory is `dir` or inside it (zombies have none).
fn processes_in(dir: &Path) -> Vec<u32> {
    let me = std::process::id();
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd.starts_with(dir))
        })
        .collect()
}

/// The last `lines` lines of a Patroni log, without the "no action" line every HA loop
/// writes, which would otherwise be all there is.
fn log_tail(path: &Path, lines: usize) -> String {
    match fs::read_to_string(path) {
        Ok(log) => {
            let all: Vec<&str> = log
                .lines()
                .filter(|line| !line.contains("INFO: no action. "))
                .collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(no log: {e})"),
    }
}
