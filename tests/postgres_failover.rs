//! End to end with real Postgres 15: a leader and a streaming replica on 127.0.0.11 and
//! 127.0.0.12 (port 5433), each with `roleproxy agent` on :5500, found through a DNS server on
//! loopback. A client writes through roleproxy; the leader dies, the replica is promoted, and
//! writes resume on the new leader through the same proxy.

use roleproxy_testkit as support;

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use support::dns::DnsServer;
use support::harness::{ConfigBuilder, RunningProxy};
use support::pg::PgCluster;
use support::writer::connect;
use tokio::sync::watch;

const NAME: &str = "iad.pg.internal";
const NODES: [Ipv4Addr; 2] = [Ipv4Addr::new(127, 0, 0, 11), Ipv4Addr::new(127, 0, 0, 12)];

/// Inserts one row through `conninfo`; returns the address of the server that took it.
async fn write_once(conninfo: &str, value: i32) -> Result<String, tokio_postgres::Error> {
    let client = connect(conninfo).await?;
    let row = client
        .query_one(
            "INSERT INTO writes (value) VALUES ($1) RETURNING host(inet_server_addr())",
            &[&value],
        )
        .await?;
    Ok(row.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_resume_on_the_promoted_replica() {
    let cluster = Arc::new(
        tokio::task::spawn_blocking(|| PgCluster::start(&NODES, 5433))
            .await
            .expect("cluster start task")
            .expect("cluster starts"),
    );

    let (stop_agents, agents_stopped) = watch::channel(false);
    for (i, ip) in NODES.iter().enumerate() {
        let listener = tokio::net::TcpListener::bind((*ip, 5500))
            .await
            .expect("agent port free");
        let mut stopped = agents_stopped.clone();
        let conninfo = cluster.conninfo(i);
        tokio::spawn(async move {
            roleproxy_agent::serve(listener, conninfo, async move {
                let _ = stopped.wait_for(|s| *s).await;
            })
            .await
        });
    }

    let dns = DnsServer::start(IpAddr::V4(Ipv4Addr::LOCALHOST)).await;
    dns.set(NAME, NODES.iter().map(|ip| IpAddr::V4(*ip)).collect());
    let config = ConfigBuilder::new("127.0.0.1", dns.addr(), NAME)
        .set("check.interval", "\"500ms\"")
        .set("check.timeout", "\"2s\"")
        .set("proxy.leader_wait", "\"20s\"")
        .config();
    let proxy = RunningProxy::start(config).await;
    let through_proxy = format!(
        "host={} port={} user=postgres dbname=postgres connect_timeout=30",
        proxy.addr.ip(),
        proxy.addr.port()
    );

    assert!(
        proxy
            .wait_route(Some("127.0.0.11:5433"), Duration::from_secs(30))
            .await
    );
    let session = connect(&through_proxy)
        .await
        .expect("connects through roleproxy");
    session
        .batch_execute("CREATE TABLE writes (value int PRIMARY KEY)")
        .await
        .expect("DDL on the leader");
    assert_eq!(
        write_once(&through_proxy, 1).await.expect("write"),
        "127.0.0.11"
    );

    // Wait until the replica has the row, so the promoted node's history includes it.
    let replica = connect(&cluster.conninfo(1))
        .await
        .expect("replica reachable");
    let replicated = support::harness::eventually(Duration::from_secs(30), || async {
        replica
            .query_one("SELECT count(*) FROM writes", &[])
            .await
            .is_ok_and(|row| row.get::<_, i64>(0) == 1)
    })
    .await;
    assert!(replicated, "the row reached the replica");
    drop(replica);
    // Process-wide, and this binary's only test moves a route: the change is this failover's.
    let changes = proxy.metric("roleproxy_leader_changes_total").await;

    // Hard failover.
    tokio::task::spawn_blocking({
        let cluster = Arc::clone(&cluster);
        move || {
            cluster.stop_immediate(0).expect("kill node 0");
            cluster.promote(1).expect("promote node 1");
        }
    })
    .await
    .expect("failover commands run");

    // The session that was on the old leader is gone, not silently kept.
    assert!(
        session.simple_query("SELECT 1").await.is_err(),
        "the old leader's session is closed"
    );

    // A new client waits for the new leader instead of failing.
    let server = write_once(&through_proxy, 2)
        .await
        .expect("the first write after failover succeeds without retry");
    assert_eq!(server, "127.0.0.12");
    assert_eq!(
        proxy.route_leader().await.as_deref(),
        Some("127.0.0.12:5433")
    );

    let leader = connect(&cluster.conninfo(1))
        .await
        .expect("new leader reachable");
    let rows = leader
        .query("SELECT value FROM writes ORDER BY value", &[])
        .await
        .expect("read back");
    let values: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(
        values,
        vec![1, 2],
        "every acknowledged write is on the new leader"
    );

    let moved = proxy.metric("roleproxy_leader_changes_total").await - changes;
    assert!(
        moved >= 1.0,
        "the move to the new leader is counted: {moved}"
    );
    proxy.stop().await;
    let _ = stop_agents.send(true);
}
