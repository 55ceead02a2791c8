//! The metrics with no label to tell proxies apart (split brains, leader changes, the route
//! gauges, the unconfirmed leader) counted through one route's life. A test binary of its own with a single test: the
//! metrics recorder is one per process, so any other proxy in the process would count too.

use roleproxy_testkit as support;

use std::time::Duration;

use support::fake_cluster::{served_by, FakeCluster as Cluster, NAME};
use support::role::RoleReply;

const LONG: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_brains_and_leader_changes_are_counted_once_each() {
    let cluster = Cluster::start(231, 2).await;
    let proxy = cluster.proxy().await;
    let (split, changes, up) = (
        "roleproxy_split_brain_total",
        "roleproxy_leader_changes_total",
        "roleproxy_route_up",
    );
    let split_before = proxy.metric(split).await;
    let changes_before = proxy.metric(changes).await;
    let generation_before = proxy.generation().await as f64;
    assert_eq!(proxy.metric(up).await, 0.0, "no route while nobody leads");

    cluster.nodes[0].role.set(RoleReply::leader());
    assert!(proxy.wait_route(Some(&cluster.nodes[0].addr()), LONG).await);
    assert_eq!(served_by(&proxy, LONG).await, Some(cluster.nodes[0].tag()));
    assert_eq!(proxy.metric(up).await, 1.0);
    assert_eq!(
        proxy.metric("roleproxy_route_generation").await,
        proxy.generation().await as f64
    );

    cluster.nodes[1].role.set(RoleReply::leader());
    assert!(
        proxy.wait_no_route("split_brain", LONG).await,
        "{}",
        proxy.status().await
    );
    assert_eq!(proxy.metric(split).await, split_before + 1.0);
    assert_eq!(proxy.metric(up).await, 0.0, "no route during split brain");

    cluster.nodes[0].role.set(RoleReply::replica());
    assert!(proxy.wait_route(Some(&cluster.nodes[1].addr()), LONG).await);
    assert_eq!(served_by(&proxy, LONG).await, Some(cluster.nodes[1].tag()));
    assert_eq!(
        proxy.metric(split).await,
        split_before + 1.0,
        "one split brain, counted once however long it lasted"
    );
    let moved = proxy.generation().await as f64 - generation_before;
    assert!(moved >= 3.0, "to node 0, to none, to node 1: {moved}");
    assert_eq!(
        proxy.metric(changes).await - changes_before,
        moved,
        "each move of the route is counted once"
    );
    assert_eq!(proxy.metric(up).await, 1.0);

    // A leader whose checks fail while its Postgres answers (full): unconfirmed, and the gauge
    // says so until its next leader answer.
    let unconfirmed = "roleproxy_leader_unconfirmed";
    let full = cluster.full_node(13).await;
    cluster.nodes[1].role.set(RoleReply::replica());
    cluster.dns.set(NAME, vec![full.ip, cluster.nodes[1].ip]);
    assert!(proxy.wait_route(Some(&full.addr()), LONG).await);
    assert_eq!(proxy.metric(unconfirmed).await, 0.0, "a confirmed leader");
    full.role
        .set(RoleReply::error(500, "sorry, too many clients already"));
    assert!(proxy.metric_reaches(unconfirmed, 1.0, LONG).await);
    assert_eq!(
        proxy.route_leader().await,
        Some(full.addr()),
        "still the route"
    );
    full.role.set(RoleReply::leader());
    assert!(proxy.metric_reaches(unconfirmed, 0.0, LONG).await);
    proxy.stop().await;
}
