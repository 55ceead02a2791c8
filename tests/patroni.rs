//! `check.kind = "http-status"` against a real Patroni cluster (Debian's `patroni`, raft DCS):
//! the leader listener reaches the node whose `GET /primary` says 200, the replica listener
//! spreads sessions over the nodes whose `GET /replica` says 200, and a Patroni switchover moves
//! the route, closes the old leader's sessions and never lets a write land on a replica.

use roleproxy_testkit as support;

use std::net::SocketAddr;
use std::time::Duration;

use support::harness::{eventually, ConfigBuilder, RunningProxy};
use support::patroni::{conninfo, PatroniCluster};
use support::writer::{connect, Writer, CREATE_TABLE};

const WAIT: Duration = Duration::from_secs(120);
const NET: u8 = 59;

/// (server address, in recovery) of a new session through `addr`.
async fn served(addr: SocketAddr) -> Result<(String, bool), String> {
    support::writer::served(&conninfo(addr)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patroni_rest_api_routes_leader_and_replicas_and_follows_a_switchover() {
    let cluster = PatroniCluster::start(NET, 3).await;
    let leader = cluster.wait_replicas_streaming(WAIT).await;
    let ip = format!("127.{NET}.0.1");
    // Patroni clusters rarely have one DNS name for every node: a static list, as in
    // examples/patroni.toml; DNS is pointed at nothing.
    let nodes: Vec<String> = (0..cluster.len())
        .map(|i| format!("\"{}\"", cluster.pg_addr(i)))
        .collect();
    let config = ConfigBuilder::new(&ip, "127.0.0.1:9".parse().unwrap(), "unused.internal")
        .set("backends.dns_names", "[]")
        .set("backends.backup", &format!("[{}]", nodes.join(", ")))
        .set("backends.port", "5432")
        .set("check.kind", "\"http-status\"")
        .set("check.port", "8008")
        .set("proxy.leader_wait", "\"30s\"")
        .set("proxy.connect_timeout", "\"4s\"")
        .listener(&format!(
            "name = \"replicas\"\naddresses = [\"{ip}:0\"]\nserves = \"replica\""
        ));
    let proxy = RunningProxy::start(config.config()).await;
    let leader_pg = cluster.pg_addr(leader).to_string();
    assert!(
        proxy.wait_route(Some(&leader_pg), WAIT).await,
        "{}",
        proxy.status().await
    );
    assert_eq!(
        served(proxy.addr).await,
        Ok((cluster.node_addr(leader).to_string(), false))
    );
    let mut on_replicas = Vec::new();
    for _ in 0..4 {
        let (server, in_recovery) = served(proxy.listener("replicas"))
            .await
            .expect("a replica serves");
        assert!(in_recovery, "{server} is a replica");
        on_replicas.push(server);
    }
    assert!(
        !on_replicas.contains(&cluster.node_addr(leader).to_string()),
        "{on_replicas:?}"
    );

    let setup = connect(&conninfo(proxy.addr))
        .await
        .expect("through the proxy");
    setup
        .batch_execute(CREATE_TABLE)
        .await
        .expect("create the table");
    let held = connect(&conninfo(proxy.addr)).await.expect("a session");
    let writer = Writer::start(conninfo(proxy.addr), "roleproxy", Duration::from_millis(50));
    let old_leader = cluster.node_addr(leader).to_string();
    assert!(
        eventually(WAIT, || async { writer.landed_on(&old_leader) }).await,
        "writes land on the leader before the switchover"
    );

    let to = (leader + 1) % cluster.len();
    cluster.switchover(to).await.expect("switchover");
    assert_eq!(cluster.wait_leader(WAIT).await, to);
    let new_leader = cluster.pg_addr(to).to_string();
    assert!(
        proxy.wait_route(Some(&new_leader), WAIT).await,
        "{}",
        proxy.status().await
    );
    // Writes reach the new leader before the writer stops.
    let to_addr = cluster.node_addr(to).to_string();
    assert!(
        eventually(WAIT, || async {
            served(proxy.addr).await == Ok((to_addr.clone(), false))
        })
        .await,
        "never served by the new leader"
    );
    assert!(
        eventually(WAIT, || async { writer.landed_on(&to_addr) }).await,
        "the writer reached the new leader"
    );
    let attempts = writer.stop().await;
    assert!(
        held.simple_query("SELECT 1").await.is_err(),
        "the session on the old leader was closed"
    );

    // Every acknowledged write came from a leader, and each is on the new leader now.
    let acked: Vec<(i64, String)> = attempts
        .iter()
        .filter_map(|a| a.result.as_ref().ok().map(|s| (a.seq, s.clone())))
        .collect();
    let leaders = [
        cluster.node_addr(leader).to_string(),
        cluster.node_addr(to).to_string(),
    ];
    assert!(
        acked.iter().all(|(_, server)| leaders.contains(server)),
        "{acked:?}"
    );
    assert!(
        acked.iter().any(|(_, server)| *server == leaders[1]),
        "writes resumed on the new leader"
    );
    let check = connect(&cluster.conninfo(to)).await.expect("new leader");
    for (seq, _) in &acked {
        let found: i64 = check
            .query_one(
                "SELECT count(*) FROM writes WHERE via = 'roleproxy' AND seq = $1",
                &[seq],
            )
            .await
            .expect("count")
            .get(0);
        assert_eq!(found, 1, "acknowledged write {seq} is on the new leader");
    }
    proxy.stop().await;
    cluster.shutdown().await;
}
