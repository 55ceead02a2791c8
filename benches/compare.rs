//! roleproxy vs HAProxy (the Fly config) vs a direct connection, side by side in one run.
//!
//! ```sh
//! apt-get install -y haproxy
//! cargo bench --bench compare -- [--rounds 5] [--sections bulk,idle,pgbench,failover] [--json FILE]
//! ```
//!
//! Every section runs the targets in interleaved rounds (the order rotates each round), so drift
//! of this noisy machine hits all of them alike, and reports medians and the ratios
//! roleproxy/HAProxy and roleproxy/direct. Both proxies run as separate processes so their memory
//! can be read from `/proc`.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use roleproxy_testkit::bulk::{self, BulkBackend};
use roleproxy_testkit::dns::DnsServer;
use roleproxy_testkit::haproxy::{FlyHaproxyConfig, Haproxy};
use roleproxy_testkit::role::{RoleEndpoint, RoleReply};
use serde_json::json;

const NAME: &str = "iad.bench.internal";

struct Args {
    rounds: usize,
    sections: Vec<String>,
    json: PathBuf,
    bulk_mib: u64,
    idle: Vec<usize>,
}

fn args() -> Args {
    let mut args = Args {
        rounds: 5,
        sections: vec!["bulk".into(), "idle".into()],
        json: PathBuf::from("target/compare.json"),
        bulk_mib: 1024,
        idle: vec![1000, 5000, 10000],
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
        let mut v = self.samples.get(metric)?.get(target)?.clone();
        if v.is_empty() {
            return None;
        }
        v.sort_by(|a, b| a.total_cmp(b));
        Some(v[v.len() / 2])
    }

    fn table(&self) -> String {
        let mut out = String::from(
            "| metric | roleproxy | HAProxy | direct | roleproxy/HAProxy | roleproxy/direct |\n|---|---|---|---|---|---|\n",
        );
        let cell = |v: Option<f64>| v.map(|v| format!("{v:.3}")).unwrap_or_else(|| "-".into());
        for metric in self.samples.keys() {
            let r = self.median(metric, "roleproxy");
            let h = self.median(metric, "haproxy");
            let d = self.median(metric, "direct");
            let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
                (Some(a), Some(b)) if b != 0.0 => format!("{:.2}", a / b),
                _ => "-".into(),
            };
            out.push_str(&format!(
                "| {metric} ({}) | {} | {} | {} | {} | {} |\n",
                self.units[metric],
                cell(r),
                cell(h),
                cell(d),
                ratio(r, h),
                ratio(r, d)
            ));
        }
        out
    }

    fn json(&self) -> serde_json::Value {
        let mut metrics = serde_json::Map::new();
        for (metric, targets) in &self.samples {
            let mut m = serde_json::Map::new();
            for (target, values) in targets {
                m.insert(
                    target.clone(),
                    json!({ "samples": values, "median": self.median(metric, target) }),
                );
            }
            m.insert("unit".into(), json!(self.units[metric]));
            metrics.insert(metric.clone(), serde_json::Value::Object(m));
        }
        serde_json::Value::Object(metrics)
    }
}

/// roleproxy as its own process, so its memory is its own.
struct RoleproxyProcess {
    child: Child,
    config: PathBuf,
}

impl RoleproxyProcess {
    fn start(toml: &str, tag: &str) -> RoleproxyProcess {
        let config =
            std::env::temp_dir().join(format!("roleproxy-bench-{}-{tag}.toml", std::process::id()));
        std::fs::write(&config, toml).expect("write roleproxy config");
        let child = Command::new(env!("CARGO_BIN_EXE_roleproxy"))
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start roleproxy");
        RoleproxyProcess { child, config }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for RoleproxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.config);
    }
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
    }
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 9, 1)), port)
}

async fn bulk_section(args: &Args, results: &mut Results) {
    let cluster = raw_cluster().await;
    let rp = addr(26432);
    let _roleproxy = RoleproxyProcess::start(
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
        let roleproxy = RoleproxyProcess::start(
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
                match tokio::net::TcpStream::connect(a).await {
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

fn main() {
    let args = args();
    if !Haproxy::available() {
        eprintln!("haproxy is not installed: apt-get install -y haproxy");
        std::process::exit(1);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut results = Results::default();
    runtime.block_on(async {
        for section in &args.sections {
            match section.as_str() {
                "bulk" => bulk_section(&args, &mut results).await,
                "idle" => idle_section(&args, &mut results).await,
                other => eprintln!("unknown section {other}"),
            }
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
    let doc = json!({ "machine": machine, "rounds": args.rounds, "metrics": results.json() });
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
