//! roleproxy vs HAProxy (the Fly config) vs a direct connection, side by side in one run.
//!
//! ```sh
//! apt-get install -y haproxy
//! cargo bench --bench compare -- [--rounds 5] [--sections bulk,idle,pgbench,copy,failover,transactions,busy,flood] [--json FILE]
//! cargo bench --bench compare -- --sections faults [--targets roleproxy,haproxy,haproxy-tuned] [--fault-secs N] [--faults stall,kill] [--topology per-node]
//! ```
//!
//! The `faults` section (not run by default) is the fault matrix of `compare/faults.rs`; it
//! moves the whole benchmark into a network namespace of its own first.
//!
//! Every section runs the targets in interleaved rounds (the order rotates each round), so drift
//! of this noisy machine hits all of them alike, and reports medians and the median over rounds
//! of the per-round ratios roleproxy/HAProxy and roleproxy/direct. Both proxies run as separate
//! processes so their memory, and their CPU time per `pgbench -S` transaction, can be read
//! from `/proc`.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use roleproxy_testkit::bulk::{self, BulkBackend};
use roleproxy_testkit::cluster::{ClusterSpec, LocalCluster};
use roleproxy_testkit::dns::DnsServer;
use roleproxy_testkit::fault::{self, CheckRelays};
use roleproxy_testkit::haproxy::{FlyHaproxyConfig, Haproxy};
use roleproxy_testkit::harness::ProxyProcess;
use roleproxy_testkit::role::{RoleEndpoint, RoleReply};
use roleproxy_testkit::transactions::{self, Transactions};
use roleproxy_testkit::writer::{self, connect, conninfo, Writer, CREATE_TABLE};
use serde_json::json;
use tokio::io::AsyncWriteExt;

#[path = "compare/faults.rs"]
mod faults;

const NAME: &str = "iad.bench.internal";

struct Args {
    rounds: usize,
    sections: Vec<String>,
    json: PathBuf,
    bulk_mib: u64,
    idle: Vec<usize>,
    /// Seconds per pgbench run.
    pgbench_secs: u64,
    /// Failovers of each kind.
    failovers: usize,
    /// Extra targets: another `proxy.copy` mode (`buffered`, `splice`), `preconnectN`,
    /// `threadsN` (pgbench section), `immediate` (`proxy.switchover = "immediate"`: no session
    /// is followed, as before transaction boundaries were), `tokio-copy` (the calibration
    /// proxy, pgbench and bulk), or `uring-relay` (`examples/uring_relay.rs` with 2 workers,
    /// `uring-relayN` with N; built first with `cargo build --release --example uring_relay`;
    /// pgbench section).
    variants: Vec<String>,
    /// Faults section: the targets (`roleproxy`, `haproxy`, `haproxy-tuned`).
    targets: Vec<String>,
    /// Faults section: no fault is held longer than this.
    fault_secs: Option<u64>,
    /// Faults section: sessions kept open through each fault, per target.
    fault_sessions: usize,
    /// Faults section: one roleproxy per node (`--topology per-node`) instead of the targets.
    per_node: bool,
    /// Faults section: only the faults whose label contains one of these (`--faults`).
    only_faults: Vec<String>,
}

impl Args {
    /// Whether the faults section runs against `target`.
    /// A target beyond roleproxy and HAProxy as Fly ships it: for the sections that compare
    /// failovers (`faults`, `failover`), when `--targets` names it.
    fn wants_target(&self, target: &str) -> bool {
        self.sections
            .iter()
            .any(|s| s == "faults" || s == "failover")
            && self.targets.iter().any(|t| t == target)
    }
}

/// A comma-separated option value as its items.
fn list(value: Option<String>) -> Vec<String> {
    value
        .unwrap_or_default()
        .split(',')
        .filter(|item| !item.is_empty())
        .map(str::to_string)
        .collect()
}

fn args() -> Args {
    let mut args = Args {
        rounds: 5,
        // The raw TCP sections first, before the Postgres cluster is started.
        sections: vec![
            "bulk".into(),
            "idle".into(),
            "pgbench".into(),
            "copy".into(),
            "failover".into(),
            "transactions".into(),
            "busy".into(),
            "flood".into(),
        ],
        json: PathBuf::from("target/compare.json"),
        bulk_mib: 1024,
        idle: vec![1000, 5000, 9000],
        pgbench_secs: 10,
        failovers: 10,
        variants: Vec::new(),
        targets: vec!["roleproxy".into(), "haproxy".into(), "haproxy-tuned".into()],
        fault_secs: None,
        fault_sessions: 4,
        per_node: false,
        only_faults: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--rounds" => args.rounds = it.next().and_then(|v| v.parse().ok()).unwrap_or(5),
            "--sections" => {
                args.sections = it
                    .next()
                    .unwrap_or_default()
                    .split(',')
                    .map(str::to_string)
                    .collect()
            }
            "--json" => args.json = it.next().map(PathBuf::from).unwrap_or(args.json),
            "--bulk-mib" => args.bulk_mib = it.next().and_then(|v| v.parse().ok()).unwrap_or(1024),
            "--idle" => {
                args.idle = it
                    .next()
                    .unwrap_or_default()
                    .split(',')
                    .filter_map(|v| v.parse().ok())
                    .collect()
            }
            "--pgbench-secs" => {
                args.pgbench_secs = it.next().and_then(|v| v.parse().ok()).unwrap_or(10)
            }
            "--failovers" => args.failovers = it.next().and_then(|v| v.parse().ok()).unwrap_or(10),
            "--variants" => args.variants = list(it.next()),
            "--targets" => args.targets = list(it.next()),
            "--fault-secs" => args.fault_secs = it.next().and_then(|v| v.parse().ok()),
            "--fault-sessions" => {
                args.fault_sessions = it.next().and_then(|v| v.parse().ok()).unwrap_or(4)
            }
            "--faults" => args.only_faults = list(it.next()),
            "--topology" => args.per_node = it.next().as_deref() == Some("per-node"),
            _ => {} // cargo bench passes --bench
        }
    }
    args
}

/// Samples per metric per target.
#[derive(Default)]
struct Results {
    samples: BTreeMap<String, BTreeMap<String, Vec<f64>>>,
    units: BTreeMap<String, &'static str>,
}

impl Results {
    fn add(&mut self, metric: &str, unit: &'static str, target: &str, value: f64) {
        self.units.insert(metric.to_string(), unit);
        self.samples
            .entry(metric.to_string())
            .or_default()
            .entry(target.to_string())
            .or_default()
            .push(value);
    }

    fn median(&self, metric: &str, target: &str) -> Option<f64> {
        median_of(self.samples.get(metric)?.get(target)?.clone())
    }

    /// The median over rounds of `target`'s sample divided by `base`'s sample of the same round
    /// (the issue's "median ratio"): drift between rounds cancels out within each ratio. When the
    /// sample counts differ, the ratio of the medians.
    fn median_ratio(&self, metric: &str, target: &str, base: &str) -> Option<f64> {
        let samples = self.samples.get(metric)?;
        let (t, b) = (samples.get(target)?, samples.get(base)?);
        if t.len() != b.len() || t.is_empty() {
            let b = self.median(metric, base)?;
            return (b != 0.0).then(|| self.median(metric, target).map(|t| t / b))?;
        }
        median_of(
            t.iter()
                .zip(b)
                .filter(|(_, b)| **b != 0.0)
                .map(|(t, b)| t / b)
                .collect(),
        )
    }

    /// One row per metric and roleproxy configuration: medians, and median ratios.
    fn table(&self) -> String {
        let mut out = String::from(
            "| metric | roleproxy | HAProxy | direct | roleproxy/HAProxy | roleproxy/direct |\n|---|---|---|---|---|---|\n",
        );
        let cell = |v: Option<f64>| v.map(|v| format!("{v:.3}")).unwrap_or_else(|| "-".into());
        let ratio = |v: Option<f64>| v.map(|v| format!("{v:.2}")).unwrap_or_else(|| "-".into());
        for (metric, targets) in &self.samples {
            for target in targets.keys().filter(|t| is_compared(t)) {
                let label = match target.as_str() {
                    "roleproxy" => metric.clone(),
                    other => {
                        let variant = other.strip_prefix("roleproxy-").unwrap_or(other);
                        format!("{metric} [{variant}]")
                    }
                };
                out.push_str(&format!(
                    "| {label} ({}) | {} | {} | {} | {} | {} |\n",
                    self.units[metric],
                    cell(self.median(metric, target)),
                    cell(self.median(metric, "haproxy")),
                    cell(self.median(metric, "direct")),
                    ratio(self.median_ratio(metric, target, "haproxy")),
                    ratio(self.median_ratio(metric, target, "direct")),
                ));
            }
        }
        out
    }

    /// min / median / p90 / max of every metric whose name starts with `prefix`.
    fn distribution(&self, prefix: &str) -> String {
        let mut out = String::from(
            "| metric | target | n | min | median | p90 | max |\n|---|---|---|---|---|---|---|\n",
        );
        for (metric, targets) in self.samples.iter().filter(|(m, _)| m.starts_with(prefix)) {
            for (target, values) in targets {
                let mut v = values.clone();
                v.sort_by(|a, b| a.total_cmp(b));
                if v.is_empty() {
                    continue;
                }
                let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
                out.push_str(&format!(
                    "| {metric} ({}) | {target} | {} | {:.2} | {:.2} | {:.2} | {:.2} |\n",
                    self.units[metric],
                    v.len(),
                    at(0.0),
                    at(0.5),
                    at(0.9),
                    at(1.0)
                ));
            }
        }
        out
    }

    fn json(&self) -> serde_json::Value {
        let mut metrics = serde_json::Map::new();
        for (metric, targets) in &self.samples {
            let mut m = serde_json::Map::new();
            for (target, values) in targets {
                let mut entry = json!({ "samples": values, "median": self.median(metric, target) });
                if is_compared(target) {
                    entry["median_ratio_haproxy"] =
                        json!(self.median_ratio(metric, target, "haproxy"));
                    entry["median_ratio_direct"] =
                        json!(self.median_ratio(metric, target, "direct"));
                }
                m.insert(target.clone(), entry);
            }
            m.insert("unit".into(), json!(self.units[metric]));
            metrics.insert(metric.clone(), serde_json::Value::Object(m));
        }
        serde_json::Value::Object(metrics)
    }
}

/// Targets reported as ratios to HAProxy and direct: roleproxy, its variants and the
/// calibration proxy.
fn is_compared(target: &str) -> bool {
    target != "haproxy" && target != "direct"
}

/// roleproxy as its own process, so its memory is its own.
fn roleproxy_process(toml: &str, name: &str) -> ProxyProcess {
    ProxyProcess::start(
        env!("CARGO_BIN_EXE_roleproxy"),
        toml,
        &format!("bench-{name}"),
        "warn",
        None,
    )
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Lifts this process's descriptor limit: the idle section holds both ends of 10k sessions.
fn raise_fd_limit() {
    let wanted = libc::rlimit {
        rlim_cur: 1 << 20,
        rlim_max: 1 << 20,
    };
    // SAFETY: a valid rlimit is passed; failure (no privilege) just leaves the limit as it was.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) };
}

fn roleproxy_toml(
    listen: SocketAddr,
    admin: SocketAddr,
    dns: SocketAddr,
    backup: SocketAddr,
    max: usize,
) -> String {
    format!(
        "[listen]\naddresses = [\"{listen}\"]\n\
         [backends]\ndns_names = [\"{NAME}\"]\nnameservers = [\"{dns}\"]\nbackup = [\"{backup}\"]\n\
         [proxy]\nmax_connections = {max}\n\
         [admin]\naddress = \"{admin}\"\n"
    )
}

/// Waits until one byte can be downloaded through `addr`.
async fn wait_routed(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if tokio::task::spawn_blocking(move || bulk::download(addr, 1))
            .await
            .map(|r| r.is_ok())
            .unwrap_or(false)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{addr} never routed to the backend");
}

/// A one-node raw TCP "cluster": DNS, a role endpoint saying leader, and the bulk backend.
struct RawCluster {
    dns: DnsServer,
    node: SocketAddr,
    _role: RoleEndpoint,
    _backend: BulkBackend,
}

async fn raw_cluster() -> RawCluster {
    let ip = IpAddr::V4(Ipv4Addr::new(127, 0, 9, 11));
    let dns = DnsServer::start(IpAddr::V4(Ipv4Addr::new(127, 0, 9, 1))).await;
    dns.set(NAME, vec![ip]);
    let role = RoleEndpoint::start(SocketAddr::new(ip, 5500)).await;
    role.set(RoleReply::leader());
    let backend = BulkBackend::start(SocketAddr::new(ip, 5433)).await;
    RawCluster {
        node: backend.addr(),
        dns,
        _role: role,
        _backend: backend,
    }
}

fn haproxy_config(
    listen: SocketAddr,
    stats: SocketAddr,
    dns: SocketAddr,
    backup: SocketAddr,
    maxconn: usize,
) -> FlyHaproxyConfig {
    FlyHaproxyConfig {
        listen,
        stats,
        nameserver: dns,
        name: NAME.into(),
        pg_port: 5433,
        check_port: 5500,
        backup,
        expect: "leader".into(),
        maxconn,
        tuned: false,
        ulimit_n: None,
    }
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 9, 1)), port)
}

async fn bulk_section(args: &Args, results: &mut Results) {
    let cluster = raw_cluster().await;
    let rp = addr(26432);
    let _roleproxy = roleproxy_process(
        &roleproxy_toml(rp, addr(26404), cluster.dns.addr(), cluster.node, 1000),
        "bulk",
    );
    let hp = addr(26433);
    let _haproxy = Haproxy::start(&haproxy_config(
        hp,
        addr(26405),
        cluster.dns.addr(),
        cluster.node,
        1000,
    ))
    .await
    .expect("start haproxy");
    let mut targets = vec![("roleproxy", rp), ("haproxy", hp), ("direct", cluster.node)];
    if args.variants.iter().any(|v| v == "tokio-copy") {
        let calibration = addr(26434);
        tokio_copy_proxy(calibration, cluster.node);
        targets.push(("tokio-copy", calibration));
    }
    for (_, a) in &targets {
        wait_routed(*a).await;
    }
    let len = args.bulk_mib * 1024 * 1024;
    for round in 0..args.rounds {
        targets.rotate_left(usize::from(round > 0));
        for (name, a) in &targets {
            let a = *a;
            let (down, up) =
                tokio::task::spawn_blocking(move || (bulk::download(a, len), bulk::upload(a, len)))
                    .await
                    .expect("transfer thread");
            let gbps = |d: Duration| len as f64 / d.as_secs_f64() / 1e9;
            let down = down.expect("download");
            let up = up.expect("upload");
            results.add("bulk download", "GB/s", name, gbps(down));
            results.add("bulk upload", "GB/s", name, gbps(up));
            eprintln!(
                "round {round} {name}: down {:.2} GB/s, up {:.2} GB/s",
                gbps(down),
                gbps(up)
            );
        }
    }
}

async fn idle_section(args: &Args, results: &mut Results) {
    raise_fd_limit();
    let cluster = raw_cluster().await;
    for &n in &args.idle {
        // Fresh processes per size, so memory kept by an earlier size does not hide growth.
        let max = n + 100;
        let rp = addr(26442);
        let roleproxy = roleproxy_process(
            &roleproxy_toml(rp, addr(26414), cluster.dns.addr(), cluster.node, max),
            "idle",
        );
        let hp = addr(26443);
        // The Fly config caps at maxconn 1000; raised here so the figure can be taken at all.
        let haproxy = Haproxy::start(&haproxy_config(
            hp,
            addr(26415),
            cluster.dns.addr(),
            cluster.node,
            max,
        ))
        .await
        .expect("start haproxy");
        let targets = [
            ("roleproxy", rp, roleproxy.pid()),
            ("haproxy", hp, haproxy.pid()),
        ];
        for (_, a, _) in &targets {
            wait_routed(*a).await;
        }
        for (name, a, pid) in targets {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let before = rss_kib(pid).unwrap_or(0);
            let mut streams = Vec::with_capacity(n);
            for _ in 0..n {
                let connected = async {
                    let mut s = tokio::net::TcpStream::connect(a).await?;
                    // Clients speak first; a silent one would never reach the backend.
                    s.write_all(&bulk::IDLE).await?;
                    Ok::<_, std::io::Error>(s)
                };
                match connected.await {
                    Ok(s) => streams.push(s),
                    Err(e) => panic!("{name}: connection {} failed: {e}", streams.len()),
                }
            }
            // Let every session reach its backend before reading memory.
            tokio::time::sleep(Duration::from_secs(2)).await;
            let after = rss_kib(pid).unwrap_or(0);
            let per_session = (after.saturating_sub(before)) as f64 * 1024.0 / n as f64;
            results.add(
                &format!("RSS per idle session, {n} sessions"),
                "bytes",
                name,
                per_session,
            );
            eprintln!("{name}: {n} idle sessions: RSS {before} KiB -> {after} KiB, {per_session:.0} B/session");
            drop(streams);
        }
        drop(roleproxy);
        drop(haproxy);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The real cluster used by the Postgres sections, with both proxies in front of it.
struct PgBench {
    cluster: LocalCluster,
    /// Role endpoints relaying the agents' answers, which the proxies check instead of the
    /// agents when the fault matrix runs, so it can make a node's check hang, fail or lie.
    relays: Option<CheckRelays>,
    _roleproxies: Vec<ProxyProcess>,
    _haproxies: Vec<Haproxy>,
    _uring_relays: Vec<ChildGuard>,
    targets: Vec<(String, SocketAddr)>,
    /// The process behind each target that is one, whose CPU time per transaction is read.
    pids: Vec<(String, u32)>,
}

/// The median; of an even count, the mean of the two middle values (the upper one alone would
/// flatter whichever side won the closer round).
fn median_of(mut values: Vec<f64>) -> Option<f64> {
    values.sort_by(|a, b| a.total_cmp(b));
    let middle = values.len() / 2;
    match values.len() {
        0 => None,
        n if n % 2 == 1 => Some(values[middle]),
        _ => Some((values[middle - 1] + values[middle]) / 2.0),
    }
}

/// A child process killed when dropped.
struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// CPU time (user and system) a process has used so far, in microseconds.
fn cpu_us(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command, which may hold spaces, closed by the last ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    let per_second = rustix::param::clock_ticks_per_second() as f64;
    Some(ticks * 1e6 / per_second)
}

impl PgBench {
    /// The port the proxies send role checks to.
    fn check_port(&self) -> u16 {
        self.relays
            .as_ref()
            .map_or(self.cluster.spec().agent_port, CheckRelays::port)
    }
}

fn pg_addr(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 8, 1)), port)
}

/// roleproxy's configuration for the bench cluster: the cluster's defaults, the node's own
/// Postgres as the backup like the Fly image, and a `variant`: a `proxy.copy` mode,
/// `preconnect` or `preconnectN` (auto copy, 4 or N warm connections), `threadsN` (auto copy,
/// `proxy.threads = N`) or `immediate` (auto copy, no session followed).
fn roleproxy_pg_toml(
    bench_cluster: &LocalCluster,
    listen: SocketAddr,
    admin: SocketAddr,
    backup: SocketAddr,
    check_port: u16,
    variant: &str,
) -> String {
    let threads = variant
        .strip_prefix("threads")
        .and_then(|n| n.parse::<usize>().ok());
    let warm = variant
        .strip_prefix("preconnect")
        .map(|n| n.parse::<usize>().unwrap_or(4));
    let (copy, preconnect) = match variant {
        _ if warm.is_some() => ("auto", warm.unwrap_or(4)),
        _ if threads.is_some() => ("auto", 0),
        "immediate" => ("auto", 0),
        mode => (mode, 0),
    };
    let switchover = if variant == "immediate" {
        "immediate"
    } else {
        "transaction"
    };
    bench_cluster
        .proxy_config(&listen.ip().to_string())
        .set("listen.addresses", &format!("[\"{listen}\"]"))
        .set("admin.address", &format!("\"{admin}\""))
        .set("backends.backup", &format!("[\"{backup}\"]"))
        .set("check.port", &check_port.to_string())
        .set("proxy.shutdown_grace", "\"10s\"")
        .set("proxy.copy", &format!("\"{copy}\""))
        .set("proxy.preconnect", &preconnect.to_string())
        .set("proxy.threads", &threads.unwrap_or(0).to_string())
        .set("proxy.switchover", &format!("\"{switchover}\""))
        .toml()
}

/// The Fly image's HAProxy (tuned or not) in front of the bench cluster.
fn haproxy_pg_config(
    bench_cluster: &LocalCluster,
    listen: SocketAddr,
    stats: SocketAddr,
    backup: SocketAddr,
    check_port: u16,
    tuned: bool,
) -> FlyHaproxyConfig {
    FlyHaproxyConfig {
        listen,
        stats,
        nameserver: bench_cluster.dns_addr(),
        name: bench_cluster.spec().name.clone(),
        pg_port: bench_cluster.spec().pg_port,
        check_port,
        backup,
        expect: "leader".into(),
        maxconn: 1000,
        tuned,
        ulimit_n: None,
    }
}

async fn pg_bench_setup(args: &Args) -> PgBench {
    let spec = ClusterSpec {
        name: "iad.bench.internal".into(),
        dns_ip: IpAddr::V4(Ipv4Addr::new(127, 0, 8, 1)),
        ..ClusterSpec::demo().with_ips((11..=13).map(|d| Ipv4Addr::new(127, 0, 8, d)))
    };
    let cluster = LocalCluster::start(spec).await.expect("cluster starts");
    let local = cluster.pg_addr(0);
    let relays = if args.sections.iter().any(|s| s == "faults") {
        Some(CheckRelays::start(&cluster, fault::RELAY_PORT).await)
    } else {
        None
    };
    let check_port = relays
        .as_ref()
        .map_or(cluster.spec().agent_port, CheckRelays::port);
    let mut targets = Vec::new();
    let mut roleproxies = Vec::new();
    let mut pids = Vec::new();
    let mut uring_relays = Vec::new();
    for (i, mode) in std::iter::once("auto")
        .chain(args.variants.iter().map(String::as_str))
        .enumerate()
    {
        let listen = pg_addr(26480 + i as u16);
        if mode == "tokio-copy" {
            tokio_copy_proxy(listen, local);
            targets.push((mode.to_string(), listen));
            continue;
        }
        if let Some(workers) = mode.strip_prefix("uring-relay") {
            let binary = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("target/release/examples/uring_relay");
            let workers = if workers.is_empty() { "2" } else { workers };
            let child = Command::new(&binary)
                .args([listen.to_string(), local.to_string(), workers.to_string()])
                .spawn()
                .unwrap_or_else(|e| {
                    panic!(
                        "{}: {e}; build it first: cargo build --release --example uring_relay",
                        binary.display()
                    )
                });
            pids.push((mode.to_string(), child.id()));
            uring_relays.push(ChildGuard(child));
            targets.push((mode.to_string(), listen));
            continue;
        }
        let admin = pg_addr(26490 + i as u16);
        roleproxies.push(roleproxy_process(
            &roleproxy_pg_toml(&cluster, listen, admin, local, check_port, mode),
            &format!("pg-{mode}"),
        ));
        let name = if mode == "auto" {
            "roleproxy".to_string()
        } else {
            format!("roleproxy-{mode}")
        };
        if let Some(process) = roleproxies.last() {
            pids.push((name.clone(), process.pid()));
        }
        targets.push((name, listen));
    }
    let mut haproxies = Vec::new();
    let mut flavours = vec![("haproxy", false, 26463, 26475)];
    if args.wants_target("haproxy-tuned") {
        flavours.push(("haproxy-tuned", true, 26464, 26476));
    }
    for (name, tuned, port, stats) in flavours {
        let config = haproxy_pg_config(
            &cluster,
            pg_addr(port),
            pg_addr(stats),
            local,
            check_port,
            tuned,
        );
        let haproxy = Haproxy::start(&config).await.expect("start haproxy");
        pids.push((name.to_string(), haproxy.pid()));
        haproxies.push(haproxy);
        targets.push((name.to_string(), pg_addr(port)));
    }
    let client = connect(&conninfo(local)).await.expect("leader");
    client
        .batch_execute(CREATE_TABLE)
        .await
        .expect("create table");
    targets.push(("direct".to_string(), local));
    for (name, a) in &targets {
        let deadline = Instant::now() + Duration::from_secs(60);
        while connect(&conninfo(*a)).await.is_err() {
            assert!(Instant::now() < deadline, "{name} never routed");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    PgBench {
        cluster,
        relays,
        _roleproxies: roleproxies,
        _haproxies: haproxies,
        _uring_relays: uring_relays,
        targets,
        pids,
    }
}

/// The issue's calibration point: a plain tokio `copy_bidirectional` proxy to the leader, on a
/// runtime of its own (one worker per CPU) so it does not share the benchmark's.
fn tokio_copy_proxy(listen: SocketAddr, backend: SocketAddr) {
    let listener = std::net::TcpListener::bind(listen).expect("bind tokio-copy");
    listener.set_nonblocking(true).expect("nonblocking");
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            while let Ok((mut client, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(backend).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                });
            }
        });
    });
}

fn pgbench_bin() -> PathBuf {
    roleproxy_testkit::pg::pg_bin("pgbench")
}

/// Runs pgbench against `a`; returns (tps, mean latency ms, p99 latency ms).
fn pgbench(a: SocketAddr, extra: &[&str], secs: u64) -> Option<(f64, f64, f64)> {
    let dir = std::env::temp_dir().join(format!(
        "roleproxy-pgbench-{}-{}",
        std::process::id(),
        a.port()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).ok()?;
    let output = Command::new(pgbench_bin())
        .current_dir(&dir)
        .args([
            "-h",
            &a.ip().to_string(),
            "-p",
            &a.port().to_string(),
            "-U",
            "postgres",
            "-n",
        ])
        .args(extra)
        .args(["-T", &secs.to_string(), "-l", "--log-prefix=tx", "postgres"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        eprintln!(
            "pgbench failed: {text}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        return None;
    }
    let tps = text
        .lines()
        .find(|l| l.starts_with("tps = "))?
        .split_whitespace()
        .nth(2)?
        .parse()
        .ok()?;
    // Per-transaction log: the third column is the latency in microseconds.
    let mut latencies: Vec<f64> = Vec::new();
    for entry in std::fs::read_dir(&dir).ok()?.flatten() {
        let log = std::fs::read_to_string(entry.path()).unwrap_or_default();
        latencies.extend(
            log.lines()
                .filter_map(|l| l.split_whitespace().nth(2))
                .filter_map(|v| v.parse::<f64>().ok())
                .map(|us| us / 1000.0),
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    if latencies.is_empty() {
        return None;
    }
    latencies.sort_by(|a, b| a.total_cmp(b));
    let mean = latencies.iter().sum::<f64>() / latencies.len() as f64;
    let p99 = latencies[(latencies.len() - 1) * 99 / 100];
    Some((tps, mean, p99))
}

async fn pgbench_section(args: &Args, results: &mut Results, bench: &PgBench) {
    let leader = bench.cluster.pg_addr(0);
    let init = Command::new(pgbench_bin())
        .args([
            "-h",
            &leader.ip().to_string(),
            "-p",
            &leader.port().to_string(),
            "-U",
            "postgres",
        ])
        .args(["-i", "-q", "-s", "1", "postgres"])
        .output()
        .expect("pgbench -i");
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let mut targets = bench.targets.clone();
    let secs = args.pgbench_secs;
    for round in 0..args.rounds {
        targets.rotate_left(usize::from(round > 0));
        for (name, a) in &targets {
            let a = *a;
            let pid = bench.pids.iter().find(|(n, _)| n == name).map(|(_, p)| *p);
            let cpu_before = pid.and_then(cpu_us);
            let select = tokio::task::spawn_blocking(move || {
                pgbench(a, &["-S", "-c", "8", "-j", "2"], secs)
            })
            .await
            .ok()
            .flatten();
            let cpu = cpu_before.zip(pid.and_then(cpu_us)).map(|(b, a)| a - b);
            if let Some((tps, mean, p99)) = select {
                if let Some(cpu) = cpu.filter(|_| tps > 0.0) {
                    let per_tx = cpu / (tps * secs as f64);
                    results.add(
                        "pgbench -S -c8 proxy CPU per transaction",
                        "µs",
                        name,
                        per_tx,
                    );
                    eprintln!("round {round} {name}: proxy CPU {per_tx:.1} µs per transaction");
                }
                results.add("pgbench -S -c8 TPS", "tx/s", name, tps);
                results.add("pgbench -S -c8 mean latency", "ms", name, mean);
                results.add("pgbench -S -c8 p99 latency", "ms", name, p99);
                eprintln!(
                    "round {round} {name}: -S {tps:.0} tps, mean {mean:.3} ms, p99 {p99:.3} ms"
                );
            }
            let connect = tokio::task::spawn_blocking(move || {
                pgbench(a, &["-S", "-C", "-c", "4", "-j", "2"], secs)
            })
            .await
            .ok()
            .flatten();
            if let Some((tps, _, _)) = connect {
                results.add("pgbench -S -C -c4 connections", "conn/s", name, tps);
                eprintln!("round {round} {name}: -C {tps:.0} tps");
            }
        }
    }
}

/// Bytes of `COPY bulk_rows TO STDOUT` read through `a` with psql, and the seconds it took.
fn copy_out(a: SocketAddr) -> Option<(u64, f64)> {
    use std::io::Read;
    let started = Instant::now();
    let mut psql = Command::new(roleproxy_testkit::pg::pg_bin("psql"))
        .args([
            "-X",
            "-q",
            "-h",
            &a.ip().to_string(),
            "-p",
            &a.port().to_string(),
        ])
        .args([
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-c",
            "COPY bulk_rows TO STDOUT",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .ok()?;
    let mut out = psql.stdout.take()?;
    let mut buffer = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        match out.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => total += n as u64,
            Err(_) => return None,
        }
    }
    let status = psql.wait().ok()?;
    status
        .success()
        .then(|| (total, started.elapsed().as_secs_f64()))
}

/// Bulk Postgres results: `COPY … TO STDOUT` of about `bulk_mib` MiB of 200-byte rows (one
/// CopyData message each, the worst case for following a session's messages: each header must
/// be seen, so followed sessions copy through user space instead of splicing).
async fn copy_section(args: &Args, results: &mut Results, bench: &PgBench) {
    let leader = connect(&conninfo(bench.cluster.pg_addr(0)))
        .await
        .expect("leader");
    let rows = args.bulk_mib * (1 << 20) / 200;
    leader
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS bulk_rows;
             CREATE TABLE bulk_rows AS SELECT g, repeat('x', 192) AS pad FROM generate_series(1, {rows}) g"
        ))
        .await
        .expect("create bulk_rows");
    // VACUUM refuses to run in the implicit transaction of a multi-statement batch.
    leader
        .batch_execute("VACUUM ANALYZE bulk_rows")
        .await
        .expect("vacuum bulk_rows");
    let mut targets = bench.targets.clone();
    for round in 0..args.rounds {
        targets.rotate_left(usize::from(round > 0));
        for (name, a) in &targets {
            let a = *a;
            match tokio::task::spawn_blocking(move || copy_out(a))
                .await
                .ok()
                .flatten()
            {
                Some((bytes, secs)) => {
                    let gbps = bytes as f64 / secs / 1e9;
                    results.add("COPY TO STDOUT, 200-byte rows", "GB/s", name, gbps);
                    eprintln!(
                        "round {round} {name}: COPY {bytes} bytes in {secs:.2} s, {gbps:.3} GB/s"
                    );
                }
                None => eprintln!("round {round} {name}: COPY failed"),
            }
        }
    }
    let _ = leader.batch_execute("DROP TABLE bulk_rows").await;
}

/// Planned switchovers while 8 clients per proxy run 300 ms write transactions: how many
/// transactions each proxy cut part-way, and how many sessions it ended between transactions.
async fn transactions_section(args: &Args, results: &mut Results, bench: &PgBench) {
    let leader = connect(&conninfo(bench.cluster.pg_addr(0)))
        .await
        .expect("leader");
    leader
        .batch_execute(transactions::CREATE_TABLE)
        .await
        .expect("create txs");
    let proxies: Vec<(&str, SocketAddr)> = bench
        .targets
        .iter()
        .filter(|(name, _)| name.starts_with("roleproxy") || name == "haproxy")
        .map(|(name, a)| (name.as_str(), *a))
        .collect();
    for round in 0..args.failovers {
        tokio::time::sleep(Duration::from_secs(3)).await;
        // Every proxy and round has its own client numbers: the rows share one table.
        let clients: Vec<(&str, Transactions)> = proxies
            .iter()
            .enumerate()
            .map(|(i, (name, a))| {
                let first = ((round * proxies.len() + i) * 100) as i32;
                (
                    *name,
                    Transactions::start_numbered(
                        &conninfo(*a),
                        first..first + 8,
                        Duration::from_millis(300),
                    ),
                )
            })
            .collect();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let switched = bench.cluster.switchover().await;
        // Let both proxies find the new leader and the clients reach it.
        tokio::time::sleep(Duration::from_secs(12)).await;
        for (name, c) in clients {
            let outcome = c.stop().await;
            if switched.is_err() {
                continue;
            }
            let between = outcome
                .failures
                .iter()
                .filter(|f| matches!(f, transactions::Failure::Between(..)))
                .count();
            results.add(
                "switchover: transactions cut",
                "count",
                name,
                outcome.part_way() as f64,
            );
            results.add(
                "switchover: sessions ended between transactions",
                "count",
                name,
                between as f64,
            );
            eprintln!(
                "round {round} {name}: {} committed, {} cut part-way, {between} ended between transactions",
                outcome.committed.len(),
                outcome.part_way()
            );
            if let Some(first) = outcome
                .failures
                .iter()
                .find(|f| matches!(f, transactions::Failure::PartWay(..)))
            {
                eprintln!("round {round} {name}: first transaction cut: {first:?}");
            }
        }
        match switched {
            Ok(event) => eprintln!("round {round}: switchover {} -> {}", event.old, event.new),
            Err(e) => eprintln!("round {round}: switchover failed: {e}"),
        }
        if let Err(e) = bench.cluster.restore().await {
            eprintln!("restore failed: {e}");
        }
    }
}

/// A session opened before a failover: when did the proxy (or Postgres) close it?
async fn watch_session(conninfo: String) -> Option<Instant> {
    let client = connect(&conninfo).await.ok()?;
    loop {
        if client.simple_query("SELECT 1").await.is_err() {
            return Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn failover_section(args: &Args, results: &mut Results, bench: &PgBench) {
    let proxies: Vec<(&str, SocketAddr)> = bench
        .targets
        .iter()
        .filter(|(name, _)| ["roleproxy", "haproxy", "haproxy-tuned"].contains(&name.as_str()))
        .map(|(name, a)| (name.as_str(), *a))
        .collect();
    let writers: Vec<(&str, Writer)> = proxies
        .iter()
        .map(|(name, a)| {
            (
                *name,
                Writer::start(conninfo(*a), name, Duration::from_millis(50)),
            )
        })
        .collect();
    let mut events = Vec::new();
    for round in 0..args.failovers * 2 {
        let kind = if round % 2 == 0 {
            "hard failover"
        } else {
            "switchover"
        };
        tokio::time::sleep(Duration::from_secs(3)).await;
        let watchers: Vec<_> = proxies
            .iter()
            .map(|(name, a)| (*name, tokio::spawn(watch_session(conninfo(*a)))))
            .collect();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let event = if kind == "hard failover" {
            bench.cluster.failover().await
        } else {
            bench.cluster.switchover().await
        };
        let event = match event {
            Ok(event) => event,
            Err(e) => {
                eprintln!("round {round}: {kind} failed: {e}");
                let _ = bench.cluster.restore().await;
                continue;
            }
        };
        // Let both proxies find the new leader before the old one is rebuilt.
        tokio::time::sleep(Duration::from_secs(12)).await;
        for (name, watcher) in watchers {
            let closed = tokio::time::timeout(Duration::from_secs(1), watcher).await;
            // After a kill Postgres itself ends the sessions; only a switchover tests the proxy.
            if kind == "hard failover" {
                continue;
            }
            if let Ok(Ok(Some(at))) = closed {
                let after = at.saturating_duration_since(event.killed_at).as_secs_f64();
                results.add(
                    &format!("{kind}: old session closed after role change"),
                    "s",
                    name,
                    after,
                );
            }
        }
        eprintln!("round {round}: {kind} {} -> {}", event.old, event.new);
        events.push((kind, event));
        if let Err(e) = bench.cluster.restore().await {
            eprintln!("restore failed: {e}");
        }
    }
    for (name, w) in writers {
        let attempts = w.stop().await;
        for (kind, event) in &events {
            let killed = tokio::time::Instant::from_std(event.killed_at);
            let promoted = tokio::time::Instant::from_std(event.promoted_at);
            let seen = writer::outage(&attempts, killed);
            if let Some(down) = seen.writes_down {
                results.add(
                    &format!("{kind}: writes down"),
                    "s",
                    name,
                    down.as_secs_f64(),
                );
            }
            results.add(
                &format!("{kind}: client errors"),
                "count",
                name,
                seen.errors as f64,
            );
            if let Some(resumed) = writer::resumed_after(&attempts, promoted, None) {
                let resumed = resumed.as_secs_f64();
                results.add(
                    &format!("{kind}: writes resumed after promotion"),
                    "s",
                    name,
                    resumed,
                );
            }
        }
    }
}

/// What happened to one proxy's open session, and to a new client, under one kind of overload.
struct Overload {
    target: String,
    /// Seconds from the overload starting to the open session failing a query; `None`: it
    /// survived.
    cut_after: Option<f64>,
    /// What a new client through the proxy saw during the overload.
    new_client: String,
    /// Postgres client backends the overload added on the leader (silent flood only).
    forked: Option<usize>,
}

/// A session through `a` that runs `SELECT 1` every 50 ms; returns when it first failed (or
/// could not be opened), or `None` once `until` passes without a failure.
async fn watch_until(a: SocketAddr, until: Instant) -> Option<Instant> {
    let Ok(client) = connect(&conninfo(a)).await else {
        return Some(Instant::now());
    };
    while Instant::now() < until {
        if client.simple_query("SELECT 1").await.is_err() {
            return Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// What a new client sees: "served", or the error's SQLSTATE and text.
async fn new_client_outcome(a: SocketAddr) -> String {
    let info = format!("{} connect_timeout=15", conninfo(a));
    let attempt = async {
        let client = connect(&info).await?;
        client.simple_query("SELECT 1").await
    };
    let started = Instant::now();
    match tokio::time::timeout(Duration::from_secs(20), attempt).await {
        Ok(Ok(_)) => format!("served after {:.1} s", started.elapsed().as_secs_f64()),
        Ok(Err(e)) => {
            let text = roleproxy_common::error_chain(&e);
            match e.code() {
                Some(code) => format!(
                    "{}: {}",
                    code.code(),
                    text.chars().take(70).collect::<String>()
                ),
                None => text.chars().take(70).collect(),
            }
        }
        Err(_) => "no answer in 20 s".into(),
    }
}

/// Opens connections straight to the leader until Postgres refuses one: the app has taken every
/// process slot.
async fn fill_leader(leader: SocketAddr) -> Vec<tokio_postgres::Client> {
    let mut held = Vec::new();
    while let Ok(client) = connect(&conninfo(leader)).await {
        held.push(client);
        if held.len() > 1000 {
            break;
        }
    }
    held
}

/// **busy leader:** the leader's Postgres `max_connections` is filled for `HOLD`; every
/// proxy's open session is watched, and a new client tries each proxy meanwhile.
async fn busy_section(
    results: &mut Results,
    bench: &PgBench,
    report: &mut Vec<(String, Overload)>,
) {
    const HOLD: Duration = Duration::from_secs(10);
    let leader = bench
        .cluster
        .pg_addr(bench.cluster.leader().await.unwrap_or(0));
    let proxies = compared_proxies(bench);
    let start = Instant::now() + Duration::from_secs(1);
    let until = start + HOLD + Duration::from_secs(5);
    let watchers: Vec<_> = proxies
        .iter()
        .map(|(name, a)| (name.clone(), tokio::spawn(watch_until(*a, until))))
        .collect();
    tokio::time::sleep_until(start.into()).await;
    let filled_at = Instant::now();
    let held = fill_leader(leader).await;
    eprintln!(
        "busy leader: {} connections hold every slot of {leader}",
        held.len()
    );
    let mut outcomes = Vec::new();
    for (name, a) in &proxies {
        outcomes.push((name.clone(), new_client_outcome(*a).await));
    }
    tokio::time::sleep_until((filled_at + HOLD).into()).await;
    drop(held);
    for ((name, watcher), (_, outcome)) in watchers.into_iter().zip(outcomes) {
        let cut = watcher.await.ok().flatten();
        let cut_after = cut.map(|at| at.saturating_duration_since(filled_at).as_secs_f64());
        results.add(
            "busy leader: open session survived",
            "0/1",
            &name,
            f64::from(u8::from(cut_after.is_none())),
        );
        report.push((
            "busy leader".into(),
            Overload {
                target: name,
                cut_after,
                new_client: outcome,
                forked: None,
            },
        ));
    }
    wait_all_routed(bench).await;
}

/// **silent flood:** more TCP connections that send nothing than the leader's postmaster has
/// process slots (twice `max_connections` plus its workers and WAL senders, as Postgres
/// counts them), held for 10 s against one proxy at a time, while that proxy's open session
/// is watched and a new client tries it.
async fn flood_section(
    results: &mut Results,
    bench: &PgBench,
    report: &mut Vec<(String, Overload)>,
) {
    const HOLD: Duration = Duration::from_secs(10);
    let leader = bench.cluster.leader().await.unwrap_or(0);
    let setting = |name: &str| -> usize {
        bench
            .cluster
            .pg()
            .sql(leader, &[&format!("SHOW {name}")])
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let slots = 2
        * (setting("max_connections")
            + setting("autovacuum_max_workers")
            + 1
            + setting("max_wal_senders")
            + setting("max_worker_processes"));
    let flood = slots + 50;
    for (name, a) in compared_proxies(bench) {
        let before = accepted(bench, leader);
        let start = Instant::now() + Duration::from_secs(1);
        let watcher = tokio::spawn(watch_until(a, start + HOLD + Duration::from_secs(5)));
        tokio::time::sleep_until(start.into()).await;
        let flooded_at = Instant::now();
        let mut silent = Vec::new();
        for _ in 0..flood {
            if let Ok(stream) = tokio::net::TcpStream::connect(a).await {
                silent.push(stream);
            }
        }
        eprintln!(
            "silent flood: {} silent connections to {name} (the postmaster has {slots} process slots)",
            silent.len()
        );
        let outcome = new_client_outcome(a).await;
        // Counted after the new client, which came after every silent one.
        let forked = accepted(bench, leader).saturating_sub(before);
        tokio::time::sleep_until((flooded_at + HOLD).into()).await;
        drop(silent);
        let cut_after = watcher
            .await
            .ok()
            .flatten()
            .map(|at| at.saturating_duration_since(flooded_at).as_secs_f64());
        results.add(
            "silent flood: open session survived",
            "0/1",
            &name,
            f64::from(u8::from(cut_after.is_none())),
        );
        report.push((
            "silent flood".into(),
            Overload {
                target: name,
                cut_after,
                new_client: outcome,
                forked: Some(forked),
            },
        ));
        wait_all_routed(bench).await;
    }
}

/// Connections node `i`'s Postgres has accepted, each with a process forked for it.
fn accepted(bench: &PgBench, i: usize) -> usize {
    match bench.cluster.pg_addr(i) {
        SocketAddr::V4(addr) => roleproxy_testkit::pg::accepted_connections(addr),
        SocketAddr::V6(_) => 0,
    }
}

/// roleproxy (default configuration) and HAProxy.
fn compared_proxies(bench: &PgBench) -> Vec<(String, SocketAddr)> {
    bench
        .targets
        .iter()
        .filter(|(name, _)| name == "roleproxy" || name == "haproxy")
        .cloned()
        .collect()
}

/// Waits until every proxy serves a new client again after an overload.
async fn wait_all_routed(bench: &PgBench) {
    for (name, a) in &bench.targets {
        let deadline = Instant::now() + Duration::from_secs(60);
        while connect(&conninfo(*a)).await.is_err() {
            if Instant::now() >= deadline {
                eprintln!("{name} still serves nobody 60 s after the overload");
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// The overload sections' table: did the open session survive, when was it cut, what did a
/// new client see.
fn overload_table(report: &[(String, Overload)]) -> String {
    let mut out = String::from(
        "| overload | target | open session survived? | cut after (s) | new client during it | Postgres processes forked for it |\n|---|---|---|---|---|---|\n",
    );
    for (what, o) in report {
        out.push_str(&format!(
            "| {what} | {} | {} | {} | {} | {} |\n",
            o.target,
            if o.cut_after.is_none() { "yes" } else { "no" },
            o.cut_after
                .map(|s| format!("{s:.2}"))
                .unwrap_or_else(|| "-".into()),
            o.new_client.replace('|', "/"),
            o.forked.map_or_else(|| "-".into(), |n| n.to_string()),
        ));
    }
    out
}

fn main() {
    // `cargo test --all-targets` builds and runs benches too, without `--bench`: only build.
    if !std::env::args().any(|a| a == "--bench") {
        eprintln!("benchmark: run it with `cargo bench --bench compare`");
        return;
    }
    let args = args();
    if !Haproxy::available() {
        eprintln!("haproxy is not installed: apt-get install -y haproxy");
        std::process::exit(1);
    }
    if args.sections.iter().any(|s| s == "faults") {
        // Still one thread: the whole process moves, and everything it starts lives there.
        if let Err(e) = fault::own_network_namespace() {
            eprintln!("the faults section needs a network namespace of its own: {e}");
            std::process::exit(1);
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut results = Results::default();
    let mut overloads = Vec::new();
    let mut matrix = faults::Matrix::default();
    runtime.block_on(async {
        // The Postgres cluster starts with the first section that needs it, so the raw TCP
        // sections do not share the machine with its checkpoints, replication and checks.
        let mut pg: Option<PgBench> = None;
        for section in &args.sections {
            let needs_pg = matches!(
                section.as_str(),
                "pgbench" | "copy" | "failover" | "transactions" | "busy" | "flood" | "faults"
            );
            if needs_pg && pg.is_none() {
                pg = Some(pg_bench_setup(&args).await);
            }
            match (section.as_str(), &pg) {
                ("bulk", _) => bulk_section(&args, &mut results).await,
                ("idle", _) => idle_section(&args, &mut results).await,
                ("pgbench", Some(pg)) => pgbench_section(&args, &mut results, pg).await,
                ("failover", Some(pg)) => failover_section(&args, &mut results, pg).await,
                ("copy", Some(pg)) => copy_section(&args, &mut results, pg).await,
                ("transactions", Some(pg)) => transactions_section(&args, &mut results, pg).await,
                ("busy", Some(pg)) => busy_section(&mut results, pg, &mut overloads).await,
                ("flood", Some(pg)) => flood_section(&mut results, pg, &mut overloads).await,
                ("faults", Some(pg)) => faults::section(&args, pg, &mut matrix).await,
                (other, _) => eprintln!("unknown section {other}"),
            }
        }
        if let Some(pg) = pg {
            pg.cluster.shutdown().await;
        }
    });
    let machine = format!(
        "{} cores, {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(
                |c| c.lines().find(|l| l.starts_with("model name")).map(|l| l
                    .split(':')
                    .nth(1)
                    .unwrap_or("")
                    .trim()
                    .to_string())
            )
            .unwrap_or_default()
    );
    println!("\nMachine: {machine}; rounds: {}\n", args.rounds);
    println!("{}", results.table());
    let failovers = results.distribution("hard failover");
    if failovers.lines().count() > 2 {
        println!(
            "Failovers, distribution over rounds:\n\n{failovers}\n{}",
            results.distribution("switchover")
        );
    }
    if !overloads.is_empty() {
        println!("Overload (one run each):\n\n{}", overload_table(&overloads));
    }
    if !matrix.is_empty() {
        println!("Fault matrix (median over rounds):\n\n{}", matrix.table());
    }
    let doc = json!({
        "machine": machine,
        "rounds": args.rounds,
        "metrics": results.json(),
        "faults": matrix.json(),
    });
    if let Some(parent) = args.json.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    match std::fs::write(
        &args.json,
        serde_json::to_string_pretty(&doc).unwrap_or_default(),
    ) {
        Ok(()) => eprintln!("wrote {}", args.json.display()),
        Err(e) => eprintln!("cannot write {}: {e}", args.json.display()),
    }
}
