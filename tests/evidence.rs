//! Rule 7 against real Postgres 15: leaving the route needs positive evidence. A leader whose
//! role endpoint fails while its Postgres answers (full, or the endpoint simply down) keeps the
//! route and its sessions; a leader whose Postgres is gone loses it at once; an idle hard
//! failover is never counted as a split brain. Each test waits for events, never for a time.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use roleproxy_testkit as support;
use support::cluster::{ClusterSpec, LocalCluster};
use support::dns::DnsServer;
use support::harness::{eventually, postgres_refusal, ConfigBuilder, RunningProxy};
use support::pg::PgCluster;
use support::role::{RoleEndpoint, RoleReply};
use support::writer::{connect, conninfo};
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

const WAIT: Duration = Duration::from_secs(60);
const NAME: &str = "iad.evidence.internal";
/// How long an open session must keep working while its leader is full (the bar).
const FULL_FOR: Duration = Duration::from_secs(30);

fn node_ip(net: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, net, 0, 11)
}

/// One real Postgres leader on 127.NET.0.11:5433, a role endpoint the test controls on :5500
/// answering `leader`, and DNS on 127.NET.0.1.
struct Single {
    pg: Arc<PgCluster>,
    role: RoleEndpoint,
    dns: DnsServer,
    net: u8,
}

impl Single {
    async fn start(net: u8) -> Single {
        let pg = tokio::task::spawn_blocking(move || PgCluster::start(&[node_ip(net)], 5433))
            .await
            .expect("cluster start task")
            .expect("postgres starts");
        let role = RoleEndpoint::start(SocketAddr::new(node_ip(net).into(), 5500)).await;
        role.set(RoleReply::leader());
        let dns = DnsServer::start(IpAddr::V4(Ipv4Addr::new(127, net, 0, 1))).await;
        dns.set(NAME, vec![node_ip(net).into()]);
        Single {
            pg: Arc::new(pg),
            role,
            dns,
            net,
        }
    }

    fn config(&self) -> ConfigBuilder {
        ConfigBuilder::new(&format!("127.{}.0.1", self.net), self.dns.addr(), NAME)
    }

    fn leader(&self) -> String {
        SocketAddr::new(node_ip(self.net).into(), 5433).to_string()
    }
}

/// A two-node `LocalCluster` (real role agents) on 127.NET.0.11–12 and a proxy with the
/// shipped check settings in front of it.
async fn cluster_and_proxy(net: u8) -> (LocalCluster, RunningProxy) {
    let spec = ClusterSpec {
        name: format!("iad.net{net}.internal"),
        dns_ip: Ipv4Addr::new(127, net, 0, 1).into(),
        ..ClusterSpec::demo().with_ips((11..=12).map(|d| Ipv4Addr::new(127, net, 0, d)))
    };
    let cluster = LocalCluster::start(spec).await.expect("cluster starts");
    let config = cluster.proxy_config(&format!("127.{net}.0.1")).config();
    (cluster, RunningProxy::start(config).await)
}

/// This proxy's route changes, as its `/status` keeps them (the split-brain counter is one per
/// process, which the other tests' proxies share).
async fn route_changes(proxy: &RunningProxy) -> Vec<String> {
    let status = proxy.status().await;
    let history = status["history"].as_array().cloned().unwrap_or_default();
    history
        .iter()
        .filter(|change| change["kind"] == "route")
        .filter_map(|change| change["text"].as_str().map(str::to_owned))
        .collect()
}

/// Asserts this proxy's route went to `leader` and never through a split brain.
async fn never_split(proxy: &RunningProxy, leader: &str) {
    let changes = route_changes(proxy).await;
    assert!(
        changes
            .iter()
            .any(|text| text.ends_with(&format!("sessions go to {leader}"))),
        "{changes:?}"
    );
    assert!(
        changes.iter().all(|text| !text.contains("split brain")),
        "{changes:?}"
    );
}

/// The leader's `/status` entry.
async fn backend(proxy: &RunningProxy, addr: &str) -> serde_json::Value {
    let status = proxy.status().await;
    status["backends"]
        .as_array()
        .and_then(|b| b.iter().find(|b| b["address"] == addr))
        .cloned()
        .unwrap_or_default()
}

async fn unconfirmed(proxy: &RunningProxy, addr: &str) -> bool {
    backend(proxy, addr).await["unconfirmed"].is_object()
}

fn is_full(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&SqlState::TOO_MANY_CONNECTIONS)
}

/// Takes every connection slot of the Postgres at `direct` (as a superuser, so the reserved
/// slots go too), then proves that a new client through `proxy` gets Postgres's own 53300:
/// slots a probe or check freed for a moment are taken as well.
async fn fill(direct: &str, proxy: &str) -> Vec<Client> {
    let mut held = Vec::new();
    loop {
        match connect(direct).await {
            Ok(client) => held.push(client),
            Err(e) if is_full(&e) => break,
            Err(e) => panic!("filling the leader: {e}"),
        }
        assert!(held.len() < 1000, "the leader never filled up");
    }
    loop {
        match connect(proxy).await {
            Ok(client) => held.push(client),
            Err(e) if is_full(&e) => return held,
            Err(e) => panic!("a client through the proxy got {e}, not Postgres's own 53300"),
        }
        assert!(held.len() < 1000, "the leader never filled up");
    }
}

/// Runs a query on `session` every second for [`FULL_FOR`]: an app that keeps working.
async fn keeps_working(session: &Client) {
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    for i in 0..FULL_FOR.as_secs() {
        ticks.tick().await;
        session
            .simple_query("SELECT 1")
            .await
            .unwrap_or_else(|e| panic!("the open session failed after {i} s: {e}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_leader_keeps_its_sessions_and_new_clients_get_its_own_53300() {
    // The real role agent: whether it answers 500 when Postgres is full or keeps a connection
    // and still answers `leader`, the open session must survive.
    let (cluster, proxy) = cluster_and_proxy(60).await;
    let leader = cluster.pg_addr(0).to_string();
    assert!(proxy.wait_route(Some(&leader), WAIT).await);
    let through_proxy = conninfo(proxy.addr);
    let session = connect(&through_proxy).await.expect("served");
    let before = proxy.generation().await;

    let fillers = fill(&cluster.conninfo(0), &through_proxy).await;
    keeps_working(&session).await;
    assert_eq!(proxy.generation().await, before, "the route never moved");
    never_split(&proxy, &leader).await;

    drop(fillers);
    assert!(
        eventually(WAIT, || async { connect(&through_proxy).await.is_ok() }).await,
        "new clients are served once slots free up"
    );
    session.simple_query("SELECT 1").await.expect("still open");
    assert_eq!(proxy.generation().await, before);
    proxy.stop().await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_leader_whose_role_endpoint_fails_keeps_its_sessions() {
    let node = Single::start(61).await;
    let proxy = RunningProxy::start(node.config().config()).await;
    assert!(proxy.wait_route(Some(&node.leader()), WAIT).await);
    let through_proxy = conninfo(proxy.addr);
    let session = connect(&through_proxy).await.expect("served");
    let before = proxy.generation().await;

    // As Fly's role endpoint does when Postgres is full.
    let fillers = fill(&node.pg.conninfo(0), &through_proxy).await;
    node.role
        .set(RoleReply::error(500, "sorry, too many clients already"));
    assert!(
        eventually(WAIT, || async { unconfirmed(&proxy, &node.leader()).await }).await,
        "the leader is shown unconfirmed"
    );
    // The leader shows as unconfirmed when its check fails; the probe's answer follows.
    assert!(
        eventually(WAIT, || async {
            backend(&proxy, &node.leader()).await["postgres"]
                .to_string()
                .contains("53300")
        })
        .await,
        "the probe found Postgres full: {}",
        backend(&proxy, &node.leader()).await
    );
    keeps_working(&session).await;
    assert_eq!(proxy.generation().await, before, "the route never moved");
    assert_eq!(proxy.route_leader().await, Some(node.leader()));

    drop(fillers);
    node.role.set(RoleReply::leader());
    assert!(
        eventually(WAIT, || async { connect(&through_proxy).await.is_ok() }).await,
        "new clients are served once slots free up"
    );
    assert!(
        eventually(WAIT, || async {
            !unconfirmed(&proxy, &node.leader()).await
        })
        .await,
        "confirmed again by its next leader answer"
    );
    session.simple_query("SELECT 1").await.expect("still open");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_endpoint_down_with_postgres_up_holds_the_route_until_the_bound() {
    let node = Single::start(62).await;
    let leader = node.leader();
    // Two proxies on the same node: one with the default bound, one with a bound short enough
    // to pass during the test.
    let proxy = RunningProxy::start(node.config().config()).await;
    let short = RunningProxy::start(
        node.config()
            .set("listen.addresses", "[\"127.62.0.2:0\"]")
            .set("admin.address", "\"127.62.0.2:0\"")
            .set("check.unconfirmed_limit", "\"1s\"")
            .config(),
    )
    .await;
    for p in [&proxy, &short] {
        assert!(p.wait_route(Some(&leader), WAIT).await);
    }
    let session = connect(&conninfo(proxy.addr)).await.expect("served");
    let short_session = connect(&conninfo(short.addr)).await.expect("served");
    let before = proxy.generation().await;
    let short_before = short.generation().await;
    assert_eq!(
        backend(&proxy, &leader).await["postgres"],
        serde_json::Value::Null,
        "a confirmed leader is not probed"
    );

    let Single {
        pg: _pg,
        role,
        dns: _dns,
        ..
    } = node;
    role.stop().await;
    assert!(
        eventually(WAIT, || async { unconfirmed(&proxy, &leader).await }).await,
        "the leader is shown unconfirmed"
    );
    // Held: same generation, the session alive, new clients served.
    assert_eq!(proxy.generation().await, before);
    session
        .simple_query("SELECT 1")
        .await
        .expect("session alive");
    let fresh = connect(&conninfo(proxy.addr))
        .await
        .expect("new clients are served");
    fresh.simple_query("SELECT 1").await.expect("and work");
    // This proxy's own probes found Postgres alive (the probe counters are per backend for
    // the whole process, which `short` probes too; the unlabelled gauge of an unconfirmed
    // leader is checked in a process of its own, tests/process_counters.rs).
    assert!(
        eventually(WAIT, || async {
            backend(&proxy, &leader).await["postgres"]
                .as_str()
                .is_some_and(|p| p.starts_with("Postgres answers"))
        })
        .await,
        "the failed checks were followed by probes that found Postgres alive: {}",
        backend(&proxy, &leader).await
    );
    // The server's document, read with the schema `roleproxy status` reads it with.
    let status: roleproxy::status::Status =
        serde_json::from_value(proxy.status().await).expect("/status fits the schema");
    let table = roleproxy::status_cli::render_status(
        &status,
        roleproxy::status::unix_ms(std::time::SystemTime::now()),
    );
    assert!(table.contains("leader, unconfirmed (since"), "{table}");
    assert!(table.contains("Postgres answers"), "{table}");
    let (_, page) = proxy.get("/").await;
    assert!(page.contains("leader, unconfirmed"), "{page}");

    // Past the bound: held. Open sessions stay, new clients wait (and are refused politely).
    assert!(
        eventually(WAIT, || async {
            short.status().await["route"]["target"]["state"] == "held"
        })
        .await,
        "past check.unconfirmed_limit the route is held"
    );
    assert_eq!(short.generation().await, short_before);
    short_session
        .simple_query("SELECT 1")
        .await
        .expect("a held route keeps its sessions");
    let (code, message) = postgres_refusal(short.addr, false).await;
    assert_eq!(code, "57P03");
    assert!(
        message.contains(
            "has been unconfirmed (its checks fail) for longer than check.unconfirmed_limit"
        ),
        "the refusal names the hold that applies: {message}"
    );

    // The endpoint comes back: confirmed, routed again.
    let role = RoleEndpoint::start(SocketAddr::new(node_ip(62).into(), 5500)).await;
    role.set(RoleReply::leader());
    assert!(short.wait_route(Some(&leader), WAIT).await);
    assert!(eventually(WAIT, || async { !unconfirmed(&proxy, &leader).await }).await);
    assert_eq!(proxy.generation().await, before);
    assert_eq!(short.generation().await, short_before);
    session
        .simple_query("SELECT 1")
        .await
        .expect("session alive");
    short.stop().await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_hard_failover_moves_the_route_and_is_not_a_split_brain() {
    let (cluster, proxy) = cluster_and_proxy(63).await;
    assert!(
        proxy
            .wait_route(Some(&cluster.pg_addr(0).to_string()), WAIT)
            .await
    );

    // Postgres killed (`pg_ctl stop -m immediate`) and the replica promoted, with no client
    // around: the promoted node may answer `leader` before the dead one's next check.
    let failover = cluster.failover().await.expect("failover");
    let new_leader = cluster.pg_addr(failover.new).to_string();
    assert!(
        proxy.wait_route(Some(&new_leader), WAIT).await,
        "the route moves"
    );
    let client = connect(&conninfo(proxy.addr))
        .await
        .expect("served by the new leader");
    let row = client
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .expect("query");
    assert!(!row.get::<_, bool>(0), "writes go to the promoted node");
    // An idle failover is not a split brain.
    never_split(&proxy, &new_leader).await;
    let old = cluster.pg_addr(failover.old).to_string();
    let role = backend(&proxy, &old).await["role"]["role"].clone();
    assert_eq!(role, "down", "the dead leader is down");
    proxy.stop().await;
    cluster.shutdown().await;
}
