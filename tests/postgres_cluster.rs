//! roleproxy in front of a real three-node Postgres 15 cluster (`LocalCluster`): failovers,
//! switchovers, split brain, DNS changes, a whole-cluster outage and TLS. Each test asserts
//! outcomes (where writes landed, what clients saw), never how fast.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use roleproxy_testkit::cluster::{ClusterSpec, LocalCluster};
use roleproxy_testkit::harness::{eventually, holds_for, RunningProxy};
use roleproxy_testkit::transactions::create_replicated;
use roleproxy_testkit::writer::{connect, Attempt, Writer, CREATE_TABLE};
use tokio_postgres::NoTls;

const WAIT: Duration = Duration::from_secs(60);
const PERIOD: Duration = Duration::from_millis(50);

fn spec(net: u8) -> ClusterSpec {
    ClusterSpec {
        name: format!("iad.net{net}.internal"),
        dns_ip: Ipv4Addr::new(127, net, 0, 1).into(),
        ..ClusterSpec::demo().with_ips((11..=13).map(|d| Ipv4Addr::new(127, net, 0, d)))
    }
}

async fn start(spec: ClusterSpec, leader_wait: &str) -> (LocalCluster, RunningProxy, String) {
    let listen = spec.dns_ip.to_string();
    let cluster = LocalCluster::start(spec).await.expect("cluster starts");
    let config = cluster
        .proxy_config(&listen)
        .set("proxy.leader_wait", &format!("\"{leader_wait}\""))
        .config();
    let proxy = RunningProxy::start(config).await;
    let conninfo = format!(
        "host={} port={} user=postgres dbname=postgres connect_timeout=60",
        proxy.addr.ip(),
        proxy.addr.port()
    );
    let leader = cluster.pg_addr(0).to_string();
    assert!(
        proxy.wait_route(Some(&leader), WAIT).await,
        "routes to node 0"
    );
    create_replicated(&cluster, &conninfo, CREATE_TABLE, "writes", WAIT).await;
    (cluster, proxy, conninfo)
}

/// Waits until `writer`-style attempts have succeeded on `server` a few times.
async fn wait_writes_on(conninfo: &str, server: &str) {
    let seq = AtomicI64::new(1_000_000);
    let landed = eventually(WAIT, || async {
        let seq = seq.fetch_add(1, Ordering::Relaxed) + 1;
        let Ok(client) = connect(conninfo).await else {
            return false;
        };
        client
            .query_one(
                "INSERT INTO writes (via, seq, server) VALUES ('probe', $1, host(inet_server_addr())) RETURNING server",
                &[&seq],
            )
            .await
            .is_ok_and(|row| row.get::<_, String>(0) == server)
    })
    .await;
    assert!(landed, "writes never reached {server}");
}

fn servers(attempts: &[Attempt]) -> Vec<String> {
    let mut seen: Vec<String> = Vec::new();
    for a in attempts {
        if let Ok(server) = &a.result {
            if seen.last() != Some(server) {
                seen.push(server.clone());
            }
        }
    }
    seen
}

fn ip(cluster: &LocalCluster, i: usize) -> String {
    cluster.spec().ips[i].to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hard_failover_is_a_pause_and_every_write_lands_on_the_leader_of_its_time() {
    let (cluster, proxy, conninfo) = start(spec(30), "10s").await;
    let writer = Writer::start(conninfo.clone(), "app", PERIOD);
    wait_writes_on(&conninfo, &ip(&cluster, 0)).await;

    let failover = cluster.failover().await.expect("failover");
    let new = ip(&cluster, failover.new);
    wait_writes_on(&conninfo, &new).await;
    assert!(
        eventually(WAIT, || async { writer.landed_on(&new) }).await,
        "the writer reached the new leader"
    );
    let attempts = writer.stop().await;

    // Writes went to the old leader, then to the new one, and nowhere else.
    assert_eq!(
        servers(&attempts),
        vec![ip(&cluster, 0), new.clone()],
        "{attempts:#?}"
    );
    // Clients that came after the kill waited; none saw an error. An INSERT already running
    // on the old leader when it was killed can fail, and no proxy can prevent that.
    let killed = tokio::time::Instant::from_std(failover.killed_at);
    let errors: Vec<&Attempt> = attempts
        .iter()
        .filter(|a| a.started >= killed && a.result.is_err())
        .collect();
    assert!(errors.is_empty(), "errors after the kill: {errors:#?}");
    // Everything the new leader acknowledged is on it.
    let leader = connect(&cluster.conninfo(failover.new))
        .await
        .expect("new leader");
    for a in attempts
        .iter()
        .filter(|a| a.result.as_deref() == Ok(new.as_str()))
    {
        let row = leader
            .query_one(
                "SELECT server FROM writes WHERE via = 'app' AND seq = $1",
                &[&a.seq],
            )
            .await
            .expect("acknowledged write is on the new leader");
        assert_eq!(row.get::<_, String>(0), new);
    }
    proxy.stop().await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchover_closes_old_sessions_and_moves_new_ones_without_errors() {
    let (cluster, proxy, conninfo) = start(spec(31), "10s").await;
    let old_session = connect(&conninfo).await.expect("session on the old leader");
    let row = old_session
        .query_one("SELECT host(inet_server_addr())", &[])
        .await
        .expect("query");
    assert_eq!(row.get::<_, String>(0), ip(&cluster, 0));
    let writer = Writer::start(conninfo.clone(), "app", PERIOD);
    wait_writes_on(&conninfo, &ip(&cluster, 0)).await;

    let switch = cluster.switchover().await.expect("switchover");
    let new = ip(&cluster, switch.new);
    wait_writes_on(&conninfo, &new).await;
    assert!(
        eventually(WAIT, || async { writer.landed_on(&new) }).await,
        "the writer reached the new leader"
    );
    let attempts = writer.stop().await;

    assert!(
        old_session.simple_query("SELECT 1").await.is_err(),
        "the session on the old leader was closed"
    );
    assert_eq!(servers(&attempts), vec![ip(&cluster, 0), new.clone()]);
    // New connections wait, they never fail. The one thing that can fail is an INSERT already
    // running on the old leader when its role changed: its session must be closed.
    let errors: Vec<&Attempt> = attempts
        .iter()
        .filter(|a| match &a.result {
            Err(e) => {
                let cut_in_flight = e.starts_with("insert:")
                    && a.started < tokio::time::Instant::from_std(switch.promoted_at);
                !cut_in_flight
            }
            Ok(_) => false,
        })
        .collect();
    assert!(
        errors.is_empty(),
        "a switchover is a pause, not errors: {errors:#?}"
    );
    let fresh = connect(&conninfo).await.expect("new session");
    let row = fresh
        .query_one("SELECT host(inet_server_addr())", &[])
        .await
        .expect("query");
    assert_eq!(
        row.get::<_, String>(0),
        new,
        "new sessions go to the new leader"
    );
    proxy.stop().await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_brain_lands_no_write_until_resolved() {
    let (cluster, proxy, conninfo) = start(spec(32), "2s").await;
    wait_writes_on(&conninfo, &ip(&cluster, 0)).await;

    // Promote a replica while the leader still runs: two nodes say leader.
    cluster.promote(1).await.expect("promote node 1");
    assert!(
        proxy.wait_no_route("split_brain", WAIT).await,
        "split brain never detected: {}",
        proxy.status().await
    );
    let writer = Writer::start(conninfo.clone(), "during", Duration::from_millis(200));
    // No event says "no write landed": watch the writer for a bounded window (the loop below
    // names any write that landed).
    holds_for(Duration::from_secs(5), || async {
        writer.acknowledged() == 0
    })
    .await;
    let attempts = writer.stop().await;
    assert!(!attempts.is_empty());
    for a in &attempts {
        match &a.result {
            Ok(server) => panic!("a write landed on {server} during split brain"),
            Err(e) => assert!(
                e.contains("no leader available") && e.contains("split brain"),
                "{e}"
            ),
        }
    }
    for i in [0, 1] {
        let node = connect(&cluster.conninfo(i)).await.expect("node reachable");
        let row = node
            .query_one("SELECT count(*) FROM writes WHERE via = 'during'", &[])
            .await
            .expect("count");
        assert_eq!(row.get::<_, i64>(0), 0, "no write on {}", ip(&cluster, i));
    }

    // Resolve it: the old leader goes away, the promoted node is the only leader.
    cluster.kill(0).await.expect("kill node 0");
    wait_writes_on(&conninfo, &ip(&cluster, 1)).await;
    proxy.stop().await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_loses_and_regains_nodes() {
    let (cluster, proxy, conninfo) = start(spec(33), "2s").await;
    let leader = cluster.pg_addr(0).to_string();
    let session = connect(&conninfo).await.expect("session");

    // A replica leaves DNS: nothing changes for writers.
    cluster.set_dns(&[0, 2]).expect("dns");
    wait_writes_on(&conninfo, &ip(&cluster, 0)).await;

    // The leader leaves DNS: no new sessions, but its open session carries on.
    cluster.set_dns(&[1, 2]).expect("dns");
    assert!(proxy.wait_route(None, WAIT).await);
    let Err(refused) = connect(&conninfo).await else {
        panic!("no new session without a leader");
    };
    assert!(
        refused.to_string().contains("no leader available")
            || format!("{refused:?}").contains("no leader available"),
        "{refused:?}"
    );
    session
        .simple_query("SELECT 1")
        .await
        .expect("existing session still works");

    // It comes back: writes resume, on the same generation of the route.
    cluster.set_dns(&[0, 1, 2]).expect("dns");
    assert!(proxy.wait_route(Some(&leader), WAIT).await);
    wait_writes_on(&conninfo, &ip(&cluster, 0)).await;
    session
        .simple_query("SELECT 1")
        .await
        .expect("session survived the DNS change");
    proxy.stop().await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_down_then_back() {
    let (cluster, proxy, conninfo) = start(spec(34), "2s").await;
    wait_writes_on(&conninfo, &ip(&cluster, 0)).await;
    for i in [1, 2, 0] {
        cluster.kill(i).await.expect("kill");
    }
    assert!(proxy.wait_route(None, WAIT).await);
    let Err(refused) = connect(&conninfo).await else {
        panic!("nothing to connect to");
    };
    assert!(
        format!("{refused:?}").contains("no leader available"),
        "{refused:?}"
    );

    for i in [0, 1, 2] {
        cluster.start_node(i).await.expect("start");
    }
    wait_writes_on(&conninfo, &ip(&cluster, 0)).await;
    proxy.stop().await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_passes_through_untouched() {
    let spec = ClusterSpec {
        tls: true,
        ..spec(35)
    };
    let (cluster, proxy, _) = start(spec, "10s").await;
    let target = format!(
        "host={} port={} user=postgres dbname=postgres sslmode=require",
        proxy.addr.ip(),
        proxy.addr.port()
    );
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new("psql")
            .arg(target)
            .args([
                "-Atc",
                "SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            ])
            .output()
    })
    .await
    .expect("psql thread")
    .expect("psql runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.starts_with("t|TLS"),
        "the session is TLS end to end: {stdout}"
    );
    proxy.stop().await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_request_reaches_the_sessions_node() {
    let (cluster, proxy, conninfo) = start(spec(36), "10s").await;
    let client = connect(&conninfo).await.expect("session");
    let cancel = client.cancel_token();
    let sleeping = tokio::spawn(async move { client.simple_query("SELECT pg_sleep(60)").await });
    let leader = connect(&cluster.conninfo(0)).await.expect("node 0");
    assert!(
        eventually(WAIT, || async {
            leader
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query = 'SELECT pg_sleep(60)'",
                    &[],
                )
                .await
                .is_ok_and(|row| row.get::<_, i64>(0) == 1)
        })
        .await,
        "the query is running on node 0"
    );
    // The cancel travels on a new connection, through the proxy, carrying the backend key.
    cancel
        .cancel_query(NoTls)
        .await
        .expect("cancel request sent");
    let result = tokio::time::timeout(Duration::from_secs(30), sleeping)
        .await
        .expect("the query ends long before pg_sleep(60) would")
        .expect("task");
    let error = result.expect_err("the query was cancelled");
    assert_eq!(
        error.code(),
        Some(&tokio_postgres::error::SqlState::QUERY_CANCELED),
        "{error:?}"
    );
    proxy.stop().await;
    cluster.shutdown().await;
}

/// Connections node `i`'s Postgres has accepted (a process forked for each).
fn accepted(cluster: &LocalCluster, i: usize) -> usize {
    match cluster.pg_addr(i) {
        std::net::SocketAddr::V4(addr) => roleproxy_testkit::pg::accepted_connections(addr),
        other => panic!("{other} is not IPv4"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_flood_forks_no_postgres_process_and_is_closed_after_the_deadline() {
    let spec = spec(39);
    let listen = spec.dns_ip.to_string();
    let cluster = LocalCluster::start(spec).await.expect("cluster starts");
    let config = cluster
        .proxy_config(&listen)
        .set("proxy.silent_timeout", "\"3s\"")
        .config();
    let proxy = RunningProxy::start(config).await;
    let leader = cluster.pg_addr(0).to_string();
    assert!(proxy.wait_route(Some(&leader), WAIT).await);
    let conninfo = format!(
        "host={} port={} user=postgres dbname=postgres connect_timeout=60",
        proxy.addr.ip(),
        proxy.addr.port()
    );
    let open = connect(&conninfo)
        .await
        .expect("a session through the proxy");
    let max_connections: usize = cluster
        .pg()
        .sql(0, &["SHOW max_connections"])
        .expect("max_connections")
        .parse()
        .expect("a number");
    let before = accepted(&cluster, 0);
    let silent_series = "roleproxy_sessions_total{listener=\"leader\",result=\"silent\"}";
    let silent_before = proxy.metric(silent_series).await;

    // Twice as many clients as the leader has process slots, none of them saying a word.
    let mut silent = Vec::new();
    for _ in 0..2 * max_connections {
        silent.push(
            tokio::net::TcpStream::connect(proxy.addr)
                .await
                .expect("the proxy accepts"),
        );
    }
    // A real client, accepted after every silent one, is served, and so is the open session.
    let real = connect(&conninfo).await.expect("a real client is served");
    real.simple_query("SELECT 1").await.expect("query");
    open.simple_query("SELECT 1")
        .await
        .expect("the open session is unaffected");
    // The real client's connection, and perhaps a role check's in flight; not 100 more.
    let forked = accepted(&cluster, 0).saturating_sub(before);
    assert!(
        forked <= 2,
        "Postgres accepted {forked} connections during the flood"
    );
    drop(real);

    for stream in &mut silent {
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(WAIT, tokio::io::AsyncReadExt::read(stream, &mut buf))
            .await
            .expect("a silent client is closed after the deadline");
        assert!(matches!(read, Ok(0)), "closed without an answer: {read:?}");
    }
    let closed_silent = proxy.metric(silent_series).await - silent_before;
    assert_eq!(closed_silent as usize, 2 * max_connections);
    open.simple_query("SELECT 1")
        .await
        .expect("the open session still works");
    proxy.stop().await;
    cluster.shutdown().await;
}
