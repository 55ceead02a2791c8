//! A bounded soak on the local cluster: mixed clients through roleproxy while the cluster
//! switches over every 30 s and fails over hard every 90 s.
//!
//! ```sh
//! cargo bench --bench soak -- [--secs 300]
//! ```
//!
//! Clients: one that opens a new connection per row every 50 ms, four long sessions that write
//! a row every 100 ms (reconnecting when cut), and one that reads ~100 MB per query. At the end
//! it checks every acknowledged write against the final leader, and that roleproxy's memory and
//! open descriptors came back to their baseline.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use roleproxy_testkit::cluster::{ClusterSpec, LocalCluster};
use roleproxy_testkit::harness::ProxyProcess;
use roleproxy_testkit::writer::{connect, conninfo, Writer, CREATE_TABLE};
use tokio::sync::watch;

/// A write acknowledged this close before a hard kill may not have reached any replica
/// (asynchronous replication); it is not expected on the new leader.
const REPLICATION_WINDOW: Duration = Duration::from_secs(1);

fn secs() -> u64 {
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        if arg == "--secs" {
            return it.next().and_then(|v| v.parse().ok()).unwrap_or(300);
        }
    }
    300
}

/// One acknowledged write: which client, which row, which server, when.
#[derive(Clone, Debug)]
struct Ack {
    via: String,
    seq: i64,
    server: String,
    at: Instant,
}

/// A long session writing a row every 100 ms; reconnects when its session is cut.
async fn long_session(
    conninfo: String,
    via: String,
    acks: Arc<Mutex<Vec<Ack>>>,
    cuts: Arc<Mutex<u64>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut seq = 0i64;
    while !*stop.borrow() {
        let Ok(client) = connect(&conninfo).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        loop {
            if *stop.borrow() {
                return;
            }
            seq += 1;
            let row = client
                .query_one(
                    "INSERT INTO writes (via, seq, server) VALUES ($1, $2, host(inet_server_addr())) RETURNING server",
                    &[&via, &seq],
                )
                .await;
            match row {
                Ok(row) => acks.lock().unwrap().push(Ack {
                    via: via.clone(),
                    seq,
                    server: row.get(0),
                    at: Instant::now(),
                }),
                Err(_) => {
                    *cuts.lock().unwrap() += 1;
                    break;
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = stop.changed() => {}
            }
        }
    }
}

/// Reads ~100 MB per query, over and over; counts bytes.
async fn bulk_reader(conninfo: String, bytes: Arc<Mutex<u64>>, stop: watch::Receiver<bool>) {
    while !*stop.borrow() {
        let Ok(client) = connect(&conninfo).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        while !*stop.borrow() {
            match client
                .simple_query("SELECT repeat('x', 1000000) FROM generate_series(1, 100)")
                .await
            {
                Ok(_) => *bytes.lock().unwrap() += 100 * 1_000_000,
                Err(_) => break,
            }
        }
    }
}

fn rss_and_fds(pid: u32) -> (u64, usize) {
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    (rss, fds)
}

fn main() {
    // `cargo test --all-targets` builds and runs benches too, without `--bench`: only build.
    if !std::env::args().any(|a| a == "--bench") {
        eprintln!("benchmark: run it with `cargo bench --bench soak`");
        return;
    }
    let secs = secs();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let spec = ClusterSpec {
            name: "iad.soak.internal".into(),
            dns_ip: IpAddr::V4(Ipv4Addr::new(127, 0, 7, 1)),
            ..ClusterSpec::demo().with_ips((11..=13).map(|d| Ipv4Addr::new(127, 0, 7, d)))
        };
        let cluster = LocalCluster::start(spec).await.expect("cluster starts");
        let listen: SocketAddr = "127.0.7.1:26500".parse().expect("address");
        let toml = cluster
            .proxy_config("127.0.7.1")
            .set("listen.addresses", &format!("[\"{listen}\"]"))
            .set("admin.address", "\"127.0.7.1:26501\"")
            .set("proxy.shutdown_grace", "\"10s\"")
            .toml();
        let proxy = ProxyProcess::start(env!("CARGO_BIN_EXE_roleproxy"), &toml, "soak", "warn", None);
        let through = conninfo(listen);
        let leader = connect(&conninfo(cluster.pg_addr(0))).await.expect("leader");
        leader.batch_execute(CREATE_TABLE).await.expect("table");
        let deadline = Instant::now() + Duration::from_secs(60);
        while connect(&through).await.is_err() {
            assert!(Instant::now() < deadline, "roleproxy never routed");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        let baseline = rss_and_fds(proxy.pid());

        let (stop, stopped) = watch::channel(false);
        let acks = Arc::new(Mutex::new(Vec::new()));
        let cuts = Arc::new(Mutex::new(0u64));
        let bulk = Arc::new(Mutex::new(0u64));
        let short = Writer::start(through.clone(), "short", Duration::from_millis(50));
        let mut tasks = Vec::new();
        for i in 0..4 {
            tasks.push(tokio::spawn(long_session(
                through.clone(),
                format!("long{i}"),
                Arc::clone(&acks),
                Arc::clone(&cuts),
                stopped.clone(),
            )));
        }
        tasks.push(tokio::spawn(bulk_reader(through.clone(), Arc::clone(&bulk), stopped.clone())));

        let started = Instant::now();
        let mut kills = Vec::new();
        let mut history = Vec::new();
        let mut events = 0;
        let mut next = 30u64;
        while started.elapsed() < Duration::from_secs(secs) {
            let due = started + Duration::from_secs(next);
            tokio::time::sleep(due.saturating_duration_since(Instant::now())).await;
            if started.elapsed() >= Duration::from_secs(secs) {
                break;
            }
            let hard = next % 90 == 0;
            let outcome = if hard { cluster.failover().await } else { cluster.switchover().await };
            match outcome {
                Ok(event) => {
                    events += 1;
                    eprintln!(
                        "{:>4}s {} {} -> {}",
                        started.elapsed().as_secs(),
                        if hard { "hard failover" } else { "switchover" },
                        event.old,
                        event.new
                    );
                    if hard {
                        kills.push(event.killed_at);
                    }
                    history.push(event);
                }
                Err(e) => eprintln!("event failed: {e}"),
            }
            tokio::time::sleep(Duration::from_secs(8)).await;
            if let Err(e) = cluster.restore().await {
                eprintln!("restore failed: {e}");
            }
            next += 30;
        }
        let _ = stop.send(true);
        let short_attempts = short.stop().await;
        for task in tasks {
            let _ = task.await;
        }

        // Every acknowledged write is on the final leader, except those acknowledged just
        // before a hard kill, which asynchronous replication may have lost.
        let final_leader = cluster.leader().await.expect("a leader at the end");
        let check = connect(&cluster.conninfo(final_leader)).await.expect("final leader");
        let mut all: Vec<Ack> = acks.lock().unwrap().clone();
        all.extend(short_attempts.iter().filter_map(|a| {
            a.result.as_ref().ok().map(|server| Ack {
                via: "short".into(),
                seq: a.seq,
                server: server.clone(),
                at: a.finished.into_std(),
            })
        }));
        let mut missing = 0;
        let mut exempt = 0;
        for ack in &all {
            let near_kill = kills
                .iter()
                .any(|k| ack.at <= *k && *k - ack.at < REPLICATION_WINDOW);
            let found = check
                .query_opt("SELECT 1 FROM writes WHERE via = $1 AND seq = $2", &[&ack.via, &ack.seq])
                .await
                .ok()
                .flatten()
                .is_some();
            if !found {
                if near_kill {
                    exempt += 1;
                } else {
                    missing += 1;
                    eprintln!("missing: {ack:?}");
                }
            }
        }
        let short_errors = short_attempts.iter().filter(|a| a.result.is_err()).count();
        // Every write was acknowledged by the leader of its time: node 0 at first, then each
        // promoted node from its promotion on.
        let ip = |i: usize| cluster.spec().ips[i].to_string();
        let wrong_node = all
            .iter()
            .filter(|ack| {
                let mut leader = 0;
                for event in &history {
                    if ack.at >= event.promoted_at {
                        leader = event.new;
                    }
                }
                // `promoted_at` is taken when `pg_ctl promote -w` returns, a little after the
                // new leader takes writes: between the old leader's end and that moment,
                // either of the two is the leader of its time.
                let changing = history.iter().any(|e| {
                    ack.at >= e.killed_at
                        && ack.at < e.promoted_at
                        && (ack.server == ip(e.old) || ack.server == ip(e.new))
                });
                ack.server != ip(leader) && !changing
            })
            .count();

        tokio::time::sleep(Duration::from_secs(5)).await;
        let after = rss_and_fds(proxy.pid());
        println!("\nSoak: {secs} s, {events} failovers/switchovers\n");
        println!("| measure | value |\n|---|---|");
        println!("| acknowledged writes | {} |", all.len());
        println!("| missing on the final leader | {missing} |");
        println!("| acknowledged by a node that was not the leader of its time | {wrong_node} |");
        println!("| lost within {REPLICATION_WINDOW:?} before a hard kill (asynchronous replication) | {exempt} |");
        println!("| short-connection attempts / errors | {} / {short_errors} |", short_attempts.len());
        println!("| long sessions cut (and reconnected) | {} |", cuts.lock().unwrap());
        println!("| bulk bytes read | {} MB |", *bulk.lock().unwrap() / 1_000_000);
        println!("| roleproxy RSS baseline → after | {} KiB → {} KiB |", baseline.0, after.0);
        println!("| roleproxy open fds baseline → after | {} → {} |", baseline.1, after.1);
        // Each worker thread may keep a few pipes (two descriptors each) for the next transfer.
        let pooled = 2 * roleproxy::copy::PIPE_POOL_CAP * 2;
        println!("| (pipes kept for reuse: at most {pooled} descriptors) | |");
        drop(proxy);
        cluster.shutdown().await;
        assert_eq!(missing, 0, "acknowledged writes missing on the final leader");
        assert_eq!(wrong_node, 0, "writes acknowledged by a node that was not the leader");
        assert!(after.1 <= baseline.1 + pooled, "descriptors returned to baseline");
    });
}
