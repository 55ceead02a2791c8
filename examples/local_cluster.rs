//! A real Postgres HA cluster on loopback with roleproxy in front, driven from the terminal.
//!
//! ```sh
//! cargo run --release --example local_cluster [-- --port 5432 --admin-port 8404 --tls]
//! ```
//!
//! It starts a DNS server answering `iad.demo.internal`, three Postgres 15 nodes in streaming
//! replication on 127.0.0.11–13:5433 (each with a role agent on :5500, as on a Fly node), and
//! roleproxy on 127.0.0.1:5432. Then it reads commands on stdin (`help` lists them) that kill,
//! promote, fail over and repair nodes while you watch a client through the proxy. Ctrl-C,
//! `quit` or the end of stdin stop everything and remove every directory it made.

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use roleproxy_testkit::cluster::{
    try_http_get, ClusterError, ClusterSpec, Failover, LocalCluster, NodeStatus, Started,
};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::{mpsc, oneshot};

/// The table the connection hint writes to; `node` shows which server took each row.
const CREATE_DEMO_TABLE: &str = "CREATE TABLE IF NOT EXISTS demo (
    id bigserial PRIMARY KEY,
    node inet NOT NULL DEFAULT inet_server_addr(),
    at timestamptz NOT NULL DEFAULT clock_timestamp()
)";

const HELP: &str = "\
commands (nodes are numbered from 1: node 1 is 127.0.0.11):
  status       each node's role per Postgres and per its agent, WAL position, and roleproxy's route
  failover     kill the leader (pg_ctl stop -m immediate), promote the most advanced replica,
               point the other replicas at it
  switchover   fence the leader (its agent says replica while it stays up) for one check
               interval, then make it read-only, promote the most advanced replica and point
               the other replicas at it
  kill N       stop node N like a crash (pg_ctl stop -m immediate)
  start N      start node N; rebuilt as a replica when another node leads
  promote N    promote node N (with a live leader: a split brain, on purpose)
  dns N..      make DNS answer with only these nodes, e.g. `dns 1 2` (none: no addresses)
  restore [N]  make every other node a streaming replica of the leader (after a failover);
               with N, of node N, which stays leader (the way out of a split brain)
  help         this text
  quit         stop everything (also Ctrl-C or end of input)";

#[derive(Parser)]
#[command(about = "A local Postgres HA cluster with roleproxy in front")]
struct Args {
    /// roleproxy's client port on 127.0.0.1.
    #[arg(long, default_value_t = 5432)]
    port: u16,
    /// roleproxy's admin port (/status, /metrics) on 127.0.0.1.
    #[arg(long, default_value_t = 8404)]
    admin_port: u16,
    /// Nodes serve TLS with a self-signed certificate; roleproxy passes it through.
    #[arg(long)]
    tls: bool,
}

/// SIGINT (Ctrl-C) and SIGTERM, installed before anything starts so that neither kills the
/// process before it has cleaned up.
struct Interrupts {
    int: Signal,
    term: Signal,
}

impl Interrupts {
    fn install() -> Result<Interrupts, String> {
        let install = |kind| signal(kind).map_err(|e| format!("cannot handle signals: {e}"));
        Ok(Interrupts {
            int: install(SignalKind::interrupt())?,
            term: install(SignalKind::terminate())?,
        })
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.int.recv() => {}
            _ = self.term.recv() => {}
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    // Colour codes only on a terminal: the demo's output piped to a file reads as plain text.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(roleproxy::wording::stderr_colours())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new("info,roleproxy::agent=warn")
            }),
        )
        .init();
    match run(&args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("local_cluster: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: &Args) -> Result<(), String> {
    let mut interrupts = Interrupts::install()?;
    check_ports(args)?;
    let spec = ClusterSpec {
        tls: args.tls,
        ..ClusterSpec::demo()
    };
    println!(
        "starting {} Postgres nodes on {}:{}, their role agents on :{} and DNS for {} ...",
        spec.ips.len(),
        spec.ips
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        spec.pg_port,
        spec.agent_port,
        spec.name
    );
    let started = Instant::now();
    let cluster = tokio::select! {
        cluster = LocalCluster::start(spec) => {
            cluster.map_err(|e| format!("cannot start the cluster: {e}"))?
        }
        () = interrupts.recv() => return Err("interrupted while starting".into()),
    };
    println!(
        "cluster up in {:.1} s (in {})",
        started.elapsed().as_secs_f64(),
        cluster.pg().root().display()
    );
    let outcome = with_proxy(&cluster, args, &mut interrupts).await;

    println!("stopping ...");
    let root = cluster.pg().root().to_path_buf();
    cluster.shutdown().await;
    if root.exists() {
        eprintln!("local_cluster: {} was not removed", root.display());
    } else {
        println!("stopped; {} removed", root.display());
    }
    outcome
}

/// Fails at once, with the flag to change, when roleproxy's ports are taken, rather than after
/// a cluster has been started and torn down for nothing.
fn check_ports(args: &Args) -> Result<(), String> {
    for (port, flag) in [(args.port, "--port"), (args.admin_port, "--admin-port")] {
        if let Err(e) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            let hint = if port == 5432 {
                " (a Postgres of this machine? `pg_lsclusters` lists Debian's)"
            } else {
                ""
            };
            return Err(format!(
                "127.0.0.1:{port} is not free: {e}{hint}; choose another port with \
                 `{flag} N`, e.g. `cargo run --release --example local_cluster -- {flag} {}`",
                port.saturating_add(1000)
            ));
        }
    }
    Ok(())
}

/// Runs roleproxy in-process in front of `cluster` while the commands run.
async fn with_proxy(
    cluster: &LocalCluster,
    args: &Args,
    interrupts: &mut Interrupts,
) -> Result<(), String> {
    let builder = cluster
        .proxy_config("127.0.0.1")
        .set(
            "listen.addresses",
            &format!("[\"127.0.0.1:{}\"]", args.port),
        )
        .set(
            "admin.address",
            &format!("\"127.0.0.1:{}\"", args.admin_port),
        );
    let config = roleproxy::Config::parse(&builder.toml(), &|_| None)
        .map_err(|e| format!("roleproxy configuration: {e}"))?;
    let proxy = roleproxy::Proxy::bind(config)
        .await
        .map_err(|e| format!("roleproxy: {e}"))?;
    let admin = proxy
        .admin_addr()
        .ok_or("roleproxy has no admin listener")?;
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(proxy.run(async move {
        let _ = stopped.await;
    }));

    if let Err(e) = create_demo_table(&cluster.conninfo(0)).await {
        println!("warning: cannot create the demo table: {e}");
    }
    wait_ready(admin, Duration::from_secs(10)).await;
    print_banner(cluster, args);
    status(cluster, admin).await;

    let outcome = commands(cluster, admin, interrupts).await;

    let _ = stop.send(());
    match tokio::time::timeout(Duration::from_secs(15), task).await {
        Ok(Ok(Ok(()))) => outcome,
        Ok(Ok(Err(e))) => Err(format!("roleproxy: {e}")),
        Ok(Err(e)) => Err(format!("roleproxy task: {e}")),
        Err(_) => Err("roleproxy did not stop within 15 s".into()),
    }
}

fn print_banner(cluster: &LocalCluster, args: &Args) {
    let ssl = if args.tls { " sslmode=require" } else { "" };
    println!();
    println!(
        "roleproxy listens on 127.0.0.1:{} (status: http://127.0.0.1:{}/status); DNS for {} on {}",
        args.port,
        args.admin_port,
        cluster.spec().name,
        cluster.dns_addr()
    );
    println!("connect through roleproxy from another terminal:");
    println!(
        "  psql \"host=127.0.0.1 port={} user=postgres dbname=postgres{ssl}\"",
        args.port
    );
    println!("  postgres=# INSERT INTO demo DEFAULT VALUES RETURNING *;   -- `node` is the server that took it");
    println!();
    println!("{HELP}");
    println!();
}

/// Reads and runs commands until `quit`, the end of stdin or a signal.
async fn commands(
    cluster: &LocalCluster,
    admin: SocketAddr,
    interrupts: &mut Interrupts,
) -> Result<(), String> {
    let interactive = std::io::stdin().is_terminal();
    let mut lines = stdin_lines();
    loop {
        if interactive {
            print!("> ");
            let _ = std::io::stdout().flush();
        }
        let line = tokio::select! {
            line = lines.recv() => line.transpose(),
            () = interrupts.recv() => {
                println!();
                return Ok(());
            }
        };
        let line = match line {
            Ok(Some(line)) => line,
            Ok(None) => return Ok(()),
            Err(e) => return Err(format!("cannot read stdin: {e}")),
        };
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.first() {
            None => continue,
            Some(&"quit") | Some(&"exit") => return Ok(()),
            Some(_) => {}
        }
        if !interactive {
            println!("> {line}");
        }
        tokio::select! {
            outcome = execute(cluster, admin, &words) => {
                if let Err(e) = outcome {
                    println!("error: {e}");
                }
            }
            () = interrupts.recv() => {
                println!("interrupted");
                return Ok(());
            }
        }
    }
}

/// Lines from stdin, read on a thread of their own: a read blocked on a terminal must not
/// keep the runtime from shutting down (tokio's stdin would wait for the next Enter).
fn stdin_lines() -> mpsc::Receiver<std::io::Result<String>> {
    let (send, receive) = mpsc::channel(1);
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let failed = line.is_err();
            if send.blocking_send(line).is_err() || failed {
                return;
            }
        }
    });
    receive
}

async fn execute(cluster: &LocalCluster, admin: SocketAddr, words: &[&str]) -> Result<(), String> {
    let node = |word: &str| parse_node(cluster, word);
    match words {
        ["status"] => status(cluster, admin).await,
        ["failover"] => {
            let done = cluster.failover().await.map_err(|e| e.to_string())?;
            report("failover", "killed", cluster, &done);
        }
        ["switchover"] => {
            let done = cluster.switchover().await.map_err(|e| e.to_string())?;
            report("switchover", "fenced", cluster, &done);
        }
        ["kill", n] => {
            let i = node(n)?;
            cluster.kill(i).await.map_err(|e| e.to_string())?;
            println!("killed {}", name(cluster, i));
        }
        ["start", n] => {
            let i = node(n)?;
            match cluster.start_node(i).await.map_err(|e| e.to_string())? {
                Started::AsItWas => println!("started {}", name(cluster, i)),
                Started::ReplicaOf(leader) => println!(
                    "rebuilt {} as a replica of {} and started it",
                    name(cluster, i),
                    name(cluster, leader)
                ),
            }
        }
        ["promote", n] => {
            let i = node(n)?;
            cluster.promote(i).await.map_err(|e| e.to_string())?;
            println!("promoted {}", name(cluster, i));
        }
        ["dns", ns @ ..] => {
            let nodes = ns.iter().map(|n| node(n)).collect::<Result<Vec<_>, _>>()?;
            cluster.set_dns(&nodes).map_err(|e| e.to_string())?;
            println!("DNS: {}", dns_text(cluster));
        }
        ["restore", keep @ ..] => {
            let started = Instant::now();
            let restored = match keep {
                [] => cluster.restore().await,
                [n] => cluster.restore_keeping(node(n)?).await,
                _ => return Err("`restore` takes at most one node: the leader to keep".into()),
            };
            let rebuilt = restored.map_err(|e| match e {
                ClusterError::SplitBrain(_) => format!(
                    "{e}; `restore N` keeps node N as the leader and rebuilds every other node \
                     from it (what only the others wrote is lost), or `kill N` the one to drop \
                     and then `restore`"
                ),
                e => e.to_string(),
            })?;
            let rebuilt: Vec<String> = rebuilt.iter().map(|&i| name(cluster, i)).collect();
            println!(
                "every node streams from the leader ({:.1} s); rebuilt: {}",
                started.elapsed().as_secs_f64(),
                if rebuilt.is_empty() {
                    "none".to_owned()
                } else {
                    rebuilt.join(", ")
                }
            );
        }
        ["help"] => println!("{HELP}"),
        _ => {
            return Err(format!(
                "unknown command `{}`; `help` lists them",
                words.join(" ")
            ))
        }
    }
    Ok(())
}

fn report(what: &str, verb: &str, cluster: &LocalCluster, done: &Failover) {
    println!(
        "{what}: {verb} {}, promoted {} {:.2} s later; replicas repointed {:.2} s after that",
        name(cluster, done.old),
        name(cluster, done.new),
        done.promoted_at
            .duration_since(done.killed_at)
            .as_secs_f64(),
        done.promoted_at.elapsed().as_secs_f64()
    );
}

/// A 1-based node number from the command line.
fn parse_node(cluster: &LocalCluster, word: &str) -> Result<usize, String> {
    match word.parse::<usize>() {
        Ok(n) if (1..=cluster.len()).contains(&n) => Ok(n - 1),
        _ => Err(format!(
            "`{word}` is not a node: nodes are numbered 1 to {}",
            cluster.len()
        )),
    }
}

/// How the example names node `i`: its 1-based number and address.
fn name(cluster: &LocalCluster, i: usize) -> String {
    format!("node {} ({})", i + 1, cluster.spec().ips[i])
}

fn dns_text(cluster: &LocalCluster) -> String {
    let nodes = cluster.dns_nodes();
    let list = if nodes.is_empty() {
        "no addresses".to_owned()
    } else {
        let numbers: Vec<String> = nodes.iter().map(|&i| (i + 1).to_string()).collect();
        format!("nodes {}", numbers.join(" "))
    };
    format!("{} -> {list}", cluster.spec().name)
}

async fn status(cluster: &LocalCluster, admin: SocketAddr) {
    let nodes = cluster.nodes().await;
    println!(
        "{:<5} {:<16} {:<8} {:<24} {:<22} wal",
        "node", "address", "running", "postgres", "agent"
    );
    for node in &nodes {
        println!(
            "{:<5} {:<16} {:<8} {:<24} {:<22} {}",
            node.index + 1,
            cluster.pg_addr(node.index),
            if node.running { "yes" } else { "no" },
            postgres_text(cluster, node),
            agent_text(node),
            wal_text(node)
        );
    }
    println!("dns   {}", dns_text(cluster));
    println!("route {}", route_text(cluster, admin).await);
}

fn postgres_text(cluster: &LocalCluster, node: &NodeStatus) -> String {
    if !node.is_replica() {
        return node.role().to_owned();
    }
    let upstream = node.upstream.as_deref().map(|host| {
        cluster
            .spec()
            .ips
            .iter()
            .position(|ip| ip.to_string() == host)
            .map_or_else(|| host.to_owned(), |i| format!("node {}", i + 1))
    });
    match upstream {
        Some(upstream) => format!("replica of {upstream}"),
        None => "replica (not streaming)".to_owned(),
    }
}

fn agent_text(node: &NodeStatus) -> String {
    match &node.agent {
        Ok((code, body)) => {
            let body: String = body.split_whitespace().collect::<Vec<_>>().join(" ");
            shorten(&format!("{code} {body}"), 22)
        }
        Err(_) => "no answer".to_owned(),
    }
}

fn wal_text(node: &NodeStatus) -> String {
    match (
        node.in_recovery,
        node.current_lsn,
        node.receive_lsn,
        node.replay_lsn,
    ) {
        (Some(false), Some(current), _, _) => current.to_string(),
        (Some(true), _, receive, replay) => format!(
            "received {}, replayed {}",
            receive.map_or("-".to_owned(), |l| l.to_string()),
            replay.map_or("-".to_owned(), |l| l.to_string())
        ),
        _ => node
            .error
            .as_deref()
            .map_or("-".to_owned(), |e| shorten(e, 50)),
    }
}

/// roleproxy's current route, from its `/status`.
async fn route_text(cluster: &LocalCluster, admin: SocketAddr) -> String {
    let body = match try_http_get(admin, "/status", Duration::from_secs(2)).await {
        Ok((200, body)) => body,
        Ok((code, _)) => return format!("unknown (/status answered {code})"),
        Err(e) => return format!("unknown ({e})"),
    };
    let Ok(status) = serde_json::from_str::<serde_json::Value>(&body) else {
        return "unknown (/status is not JSON)".to_owned();
    };
    let route = &status["route"];
    let generation = route["generation"].as_u64().unwrap_or_default();
    let detail = &route["target"]["detail"];
    let node_of = |addr: &serde_json::Value| {
        let addr = addr.as_str().unwrap_or("?");
        let node = (0..cluster.len()).find(|&i| cluster.pg_addr(i).to_string() == addr);
        match node {
            Some(i) => format!("{addr} (node {})", i + 1),
            None => addr.to_owned(),
        }
    };
    let target = match route["target"]["state"].as_str() {
        Some("leader") => format!("sessions go to {}", node_of(detail)),
        Some("held") => format!(
            "held on {}: its sessions stay, new ones wait",
            node_of(detail)
        ),
        Some("none") => match detail["reason"].as_str() {
            Some("split_brain") => format!(
                "none: split brain between {}; clients wait",
                detail["about"]
                    .as_array()
                    .map(|leaders| leaders
                        .iter()
                        .map(node_of)
                        .collect::<Vec<_>>()
                        .join(" and "))
                    .unwrap_or_default()
            ),
            Some(reason) => format!("none ({}); clients wait", reason.replace('_', " ")),
            None => "none; clients wait".to_owned(),
        },
        _ => format!("unknown ({})", route["target"]),
    };
    format!("generation {generation}: {target}")
}

/// Waits until roleproxy routes to a leader, so the first `status` shows it.
async fn wait_ready(admin: SocketAddr, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok((200, _)) = try_http_get(admin, "/ready", Duration::from_secs(1)).await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn create_demo_table(conninfo: &str) -> Result<(), tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(conninfo, tokio_postgres::NoTls).await?;
    let driver = tokio::spawn(connection);
    let created = client.batch_execute(CREATE_DEMO_TABLE).await;
    drop(client);
    let _ = driver.await;
    created
}

fn shorten(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_owned()
    } else {
        let cut: String = text.chars().take(max.saturating_sub(1)).collect();
        format!("{cut}…")
    }
}
