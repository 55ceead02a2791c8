//! Readiness tells the truth (rule 9) against real Postgres 15: a node whose role endpoint says
//! `leader` while its Postgres port refuses connections is not routed, and `/ready`,
//! `roleproxy_route_up` and `/status` say why, with the error and its time, until a probe finds
//! the port answering again. Each test waits for events, never for a time.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use roleproxy_testkit as support;
use support::dns::DnsServer;
use support::harness::{eventually, holds_for, postgres_refusal, ConfigBuilder, RunningProxy};
use support::pg::PgCluster;
use support::role::{RoleEndpoint, RoleReply};
use support::writer::{connect, conninfo};

const WAIT: Duration = Duration::from_secs(60);
const NAME: &str = "iad.readiness.internal";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_postgres_port_refuses_is_reported_not_ready_until_it_answers() {
    let ip = Ipv4Addr::new(127, 211, 0, 11);
    let pg = tokio::task::spawn_blocking(move || PgCluster::start(&[ip], 5433))
        .await
        .expect("cluster start task")
        .expect("postgres starts");
    let role = RoleEndpoint::start(SocketAddr::new(ip.into(), 5500)).await;
    role.set(RoleReply::leader());
    let dns = DnsServer::start(IpAddr::V4(Ipv4Addr::new(127, 211, 0, 1))).await;
    dns.set(NAME, vec![ip.into()]);
    let proxy =
        RunningProxy::start(ConfigBuilder::new("127.211.0.1", dns.addr(), NAME).config()).await;
    let leader = SocketAddr::new(ip.into(), 5433).to_string();
    assert!(proxy.wait_route(Some(&leader), WAIT).await);
    assert_eq!(proxy.get("/ready").await.0, 200);
    assert_eq!(proxy.metric("roleproxy_route_up").await, 1.0);

    // Postgres goes away; its role endpoint goes on saying leader (a broken agent, or a wrong
    // `backends.port` when the data port never answered).
    tokio::task::block_in_place(|| pg.stop_immediate(0)).expect("postgres stops");
    // A client meets the refusal; it is told why, with a Postgres error.
    let (code, message) = postgres_refusal(proxy.addr, false).await;
    assert_eq!(code, "57P03", "{message}");

    let not_ready = eventually(WAIT, || async {
        let (status, body) = proxy.get("/ready").await;
        (status == 503).then_some(body)
    })
    .await
    .expect("/ready says not ready");
    assert!(
        not_ready.contains("Postgres port fails") && not_ready.contains("refused"),
        "/ready names the failing data port and the error: {not_ready}"
    );
    assert_eq!(proxy.metric("roleproxy_route_up").await, 0.0);
    let status = proxy.status().await;
    let backend = &status["backends"][0];
    assert!(
        backend["data_port"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("refused"))
            && backend["data_port"]["since_unix_ms"].as_u64().is_some(),
        "/status gives the error and its time: {backend}"
    );
    // The role endpoint's `leader` answers do not rebuild the route after every refusal.
    let generation = status["route"]["generation"].as_u64();
    assert!(
        holds_for(Duration::from_secs(2), || async {
            proxy.status().await["route"]["generation"].as_u64() == generation
        })
        .await,
        "the route stays put while the port fails"
    );

    // The port answers again: the proxy's own probe finds it, with no client needed.
    tokio::task::block_in_place(|| pg.start_node(0)).expect("postgres starts again");
    assert!(
        eventually(WAIT, || async { proxy.get("/ready").await.0 == 200 }).await,
        "ready again once a probe finds Postgres answering"
    );
    assert_eq!(proxy.route_leader().await, Some(leader));
    assert_eq!(proxy.metric("roleproxy_route_up").await, 1.0);
    assert!(proxy.status().await["backends"][0]["data_port"].is_null());
    connect(&conninfo(proxy.addr))
        .await
        .expect("clients are served again");
    proxy.stop().await;
}
