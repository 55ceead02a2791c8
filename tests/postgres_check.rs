//! `check.kind = "postgres"` against real Postgres 15 in streaming replication: the proxy asks
//! each node `pg_is_in_recovery()` and its timeline itself, with no role endpoint. A promoted
//! standby beside a live primary is a real split brain: by default no route, and with
//! `split_brain = "highest-timeline"` the newly promoted node, whose timeline is newer.

use roleproxy_testkit as support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use support::cluster::{ClusterSpec, LocalCluster};
use support::harness::RunningProxy;
use support::writer::{connect, conninfo};

const LONG: Duration = Duration::from_secs(30);

/// (server address, in recovery) of a new session through `addr`.
async fn served(addr: SocketAddr) -> Result<(String, bool), String> {
    support::writer::served(&conninfo(addr)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_check_finds_roles_and_highest_timeline_settles_a_split_brain() {
    let spec = ClusterSpec {
        dns_ip: IpAddr::V4(Ipv4Addr::new(127, 58, 0, 1)),
        ..ClusterSpec::demo().with_ips((11..=12).map(|d| Ipv4Addr::new(127, 58, 0, d)))
    };
    let cluster = LocalCluster::start_streaming(spec, LONG)
        .await
        .expect("the cluster starts and its standby streams");
    let (primary, standby) = (cluster.pg_addr(0), cluster.pg_addr(1));
    let config = |policy: &str| {
        cluster
            .proxy_config("127.58.0.1")
            .set("check.kind", "\"postgres\"")
            .unset("check.port")
            .set("check.interval", "\"200ms\"")
            .set("check.fast_interval", "\"50ms\"")
            .set("check.split_brain", &format!("\"{policy}\""))
            // Rule 10: a rival on a newer timeline is never held down, however long the hold.
            .set("check.contest_hold", "\"120s\"")
            .listener("name = \"replicas\"\naddresses = [\"127.58.0.1:0\"]\nserves = \"replica\"")
            .config()
    };
    let strict = RunningProxy::start(config("none")).await;
    let newest = RunningProxy::start(config("highest-timeline")).await;
    for proxy in [&strict, &newest] {
        assert!(
            proxy.wait_route(Some(&primary.to_string()), LONG).await,
            "{:?}",
            proxy.status().await
        );
        assert_eq!(
            served(proxy.addr).await,
            Ok((primary.ip().to_string(), false))
        );
        assert_eq!(
            served(proxy.listener("replicas")).await,
            Ok((standby.ip().to_string(), true))
        );
    }
    let held = connect(&conninfo(newest.addr)).await.expect("a session");
    let strict_session = connect(&conninfo(strict.addr)).await.expect("a session");

    // Promote the standby while the primary lives on: two nodes accept writes.
    cluster.promote(1).await.expect("promote the standby");
    assert!(
        newest.wait_route(Some(&standby.to_string()), LONG).await,
        "highest-timeline routes to the promoted node: {:?}",
        newest.status().await
    );
    assert!(
        strict.wait_route(None, LONG).await,
        "the default policy gives no route"
    );
    // Rule 7: the promoted node's claim is newer than the primary's last answer, so the route
    // is "verifying" until the primary answers again, which makes it a split brain.
    assert!(
        strict.wait_no_route("split_brain", LONG).await,
        "{}",
        strict.status().await
    );
    let (code, message) = support::harness::postgres_refusal(strict.addr, false).await;
    assert_eq!(code, "57P03", "{message}");
    assert!(message.contains("split brain"), "{message}");
    assert_eq!(
        served(newest.addr).await,
        Ok((standby.ip().to_string(), false))
    );
    assert!(
        held.simple_query("SELECT 1").await.is_err(),
        "the session on the old timeline was closed when the route moved"
    );
    // Closed long before the 120 s hold-down could have run out: a held session would answer
    // nothing, so each try is bounded.
    assert!(
        support::eventually(LONG, || async {
            matches!(
                tokio::time::timeout(
                    Duration::from_secs(1),
                    strict_session.simple_query("SELECT 1")
                )
                .await,
                Ok(Err(_))
            )
        })
        .await,
        "the default policy ends the old leader's sessions at once too"
    );
    strict.stop().await;
    newest.stop().await;
    cluster.shutdown().await;
}
