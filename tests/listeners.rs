//! Listeners by role, end to end on real sockets: a replica listener balanced by least
//! sessions (with and without falling back to the leader), and a fixed-target listener.

use roleproxy_testkit as support;

use std::net::SocketAddr;
use std::time::Duration;

use support::backend::TaggedBackend;
use support::fake_cluster::FakeCluster as Cluster;
use support::harness::{eventually, postgres_refusal, Client};
use support::loopback;
use support::role::RoleReply;

const LONG: Duration = Duration::from_secs(20);

async fn tag_of(addr: SocketAddr) -> Option<String> {
    Client::connect(addr, LONG).await.map(|c| c.tag)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_listener_balances_by_least_sessions_and_never_reaches_the_leader() {
    let cluster = Cluster::start(51, 3).await;
    cluster.nodes[0].role.set(RoleReply::leader());
    let proxy = support::harness::RunningProxy::start(
        cluster
            .config()
            .listener("name = \"replicas\"\naddresses = [\"127.51.0.1:0\"]\nserves = \"replica\"")
            .config(),
    )
    .await;
    let replicas = proxy.listener("replicas");
    let (leader, r1, r2) = (
        cluster.nodes[0].tag(),
        cluster.nodes[1].tag(),
        cluster.nodes[2].tag(),
    );
    assert!(proxy.wait_route(Some(&cluster.nodes[0].addr()), LONG).await);
    // The route needs only the leader's answer; spreading needs both replicas' too.
    let p = &proxy;
    assert!(
        eventually(LONG, || async move {
            let status = p.status().await;
            let backends = status["backends"].as_array().cloned().unwrap_or_default();
            backends
                .iter()
                .filter(|b| b["role"]["role"] == "replica")
                .count()
                == 2
        })
        .await,
        "both replicas checked"
    );

    // Four sessions held open: two on each replica, none on the leader.
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(
            Client::connect(replicas, LONG)
                .await
                .expect("a replica serves"),
        );
    }
    let on = |tag: &str, held: &[Client]| held.iter().filter(|c| c.tag == tag).count();
    assert_eq!(
        (on(&r1, &held), on(&r2, &held)),
        (2, 2),
        "least sessions spreads them"
    );
    assert_eq!(cluster.nodes[0].backend.connections(), 0);

    // Close the two on the first replica: it now has the fewest, so it gets the next two.
    held.retain(|c| c.tag != r1);
    // Counted by the proxy, not only by the backend, before the next pick.
    let first = cluster.nodes[1].addr();
    assert!(
        eventually(LONG, || async {
            proxy.status().await["backends"]
                .as_array()
                .and_then(|b| b.iter().find(|b| b["address"] == first.as_str()))
                .and_then(|b| b["sessions"].as_u64())
                == Some(0)
        })
        .await,
        "the closed sessions are no longer counted: {}",
        proxy.status().await
    );
    let next: Vec<Client> = vec![
        Client::connect(replicas, LONG).await.expect("served"),
        Client::connect(replicas, LONG).await.expect("served"),
    ];
    assert!(
        next.iter().all(|c| c.tag == r1),
        "{:?}",
        next.iter().map(|c| &c.tag).collect::<Vec<_>>()
    );

    // The second replica goes down: its sessions close, and new ones go only to the first.
    cluster.nodes[2]
        .role
        .set(RoleReply::error(500, "postgres is down"));
    for client in held.iter_mut() {
        assert!(
            client.closed_within(LONG).await,
            "a session on a downed replica closes"
        );
    }
    for _ in 0..4 {
        assert_eq!(tag_of(replicas).await, Some(r1.clone()));
    }
    // The leader listener is untouched by all of this.
    assert_eq!(tag_of(proxy.addr).await, Some(leader));
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_replicas_a_replica_listener_refuses_or_falls_back_to_the_leader() {
    let cluster = Cluster::start(52, 2).await;
    cluster.nodes[0].role.set(RoleReply::leader());
    cluster.nodes[1].role.set(RoleReply::word("starting"));
    let proxy = support::harness::RunningProxy::start(
        cluster
            .config()
            .set("proxy.leader_wait", "\"700ms\"")
            .listener("name = \"ro\"\naddresses = [\"127.52.0.1:0\"]\nserves = \"replica\"")
            .listener(
                "name = \"ro-or-leader\"\naddresses = [\"127.52.0.1:0\"]\nserves = \"replica\"\nfallback = \"leader\"",
            )
            .config(),
    )
    .await;
    assert!(proxy.wait_route(Some(&cluster.nodes[0].addr()), LONG).await);
    let (code, message) = postgres_refusal(proxy.listener("ro"), true).await;
    assert_eq!(code, "57P03", "{message}");
    assert!(message.contains("no replica available"), "{message}");

    let mut fallback = Client::connect(proxy.listener("ro-or-leader"), LONG)
        .await
        .expect("the leader serves while no replica is up");
    assert_eq!(fallback.tag, cluster.nodes[0].tag());

    // A replica appears: both listeners use it; the fallback session stays on the leader.
    cluster.nodes[1].role.set(RoleReply::replica());
    let replica = cluster.nodes[1].tag();
    assert!(
        eventually(LONG, || async {
            tag_of(proxy.listener("ro-or-leader")).await.as_deref() == Some(replica.as_str())
        })
        .await,
        "the fallback listener moves to the replica"
    );
    assert_eq!(tag_of(proxy.listener("ro")).await, Some(replica));
    assert!(fallback.echo("still on the leader").await);

    // The leader stops being leader: the fallback session, bound to its route, closes.
    cluster.nodes[0].role.set(RoleReply::replica());
    assert!(fallback.closed_within(LONG).await);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_listener_forwards_to_its_address_whatever_the_roles() {
    let cluster = Cluster::start(53, 2).await;
    let local = TaggedBackend::start(SocketAddr::new(loopback(53, 0, 99), 5433), "local").await;
    let proxy = support::harness::RunningProxy::start(
        cluster
            .config()
            .set("proxy.leader_wait", "\"700ms\"")
            .set("proxy.connect_retries", "1")
            .listener(
                "name = \"local\"\naddresses = [\"127.53.0.1:0\"]\ntarget = \"127.53.0.99:5433\"",
            )
            .config(),
    )
    .await;
    // No node is leader, yet the fixed target serves at once.
    let mut session = Client::connect(proxy.listener("local"), LONG)
        .await
        .expect("the target serves with no leader anywhere");
    assert_eq!(session.tag, "local");
    let (code, _) = postgres_refusal(proxy.addr, false).await;
    assert_eq!(code, "57P03", "the leader listener has no leader");

    // Leaders come and go; the target's session is not theirs to close.
    cluster.nodes[0].role.set(RoleReply::leader());
    assert!(proxy.wait_route(Some(&cluster.nodes[0].addr()), LONG).await);
    cluster.nodes[0].role.set(RoleReply::replica());
    cluster.nodes[1].role.set(RoleReply::leader());
    assert!(proxy.wait_route(Some(&cluster.nodes[1].addr()), LONG).await);
    assert!(session.echo("still here").await);

    // The target going away is the one thing that ends it; new clients hear why.
    drop(session);
    local.stop().await;
    let (code, message) = postgres_refusal(proxy.listener("local"), false).await;
    assert_eq!(code, "57P03", "{message}");
    assert!(
        message.contains("cannot connect to local") && message.contains("127.53.0.99:5433"),
        "{message}"
    );
    proxy.stop().await;
}
