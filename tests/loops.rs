//! The proxy never connects to itself: a backup at its own listener is refused at load and
//! reload, a DNS answer at its own (wildcard) listener is dropped with the unspecified,
//! multicast and broadcast answers, and an address that became its own after discovery looked
//! is refused at connect with `57P03`. Real DNS server, role endpoints and sockets on loopback.

use roleproxy_testkit as support;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use support::fake_cluster::{FakeCluster as Cluster, NAME};
use support::harness::{eventually, postgres_refusal, process_metric, ConfigFile, RunningProxy};
use support::loopback;
use support::role::{RoleEndpoint, RoleReply};

const LONG: Duration = Duration::from_secs(20);

/// The session counters of these listeners that are not 0, as printed. Metrics are one per
/// process, so each test names its listeners apart.
/// Held by each test here: the count of dropped addresses has no label to tell proxies apart
/// and is one per process, so these tests take turns.
static DROPS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn sessions_counted(proxy: &RunningProxy, listeners: &[&str]) -> Vec<String> {
    let (_, metrics) = proxy.get("/metrics").await;
    metrics
        .lines()
        .filter(|l| {
            listeners.iter().any(|name| {
                l.starts_with(&format!("roleproxy_sessions_total{{listener=\"{name}\","))
            }) && !l.ends_with(" 0")
        })
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_at_the_proxys_own_listener_is_refused_at_load_and_reload() {
    let _turn = DROPS.lock().await;
    let cluster = Cluster::start(72, 1).await;
    cluster.nodes[0].role.set(RoleReply::leader());
    let base = cluster
        .config()
        .set("listen.addresses", "[\"127.72.0.1:25720\"]")
        .set("admin.allow_changes", "true");
    // (backup, listen addresses, the key of the listener it loops into)
    let rows = [
        (
            "127.72.0.1:25720",
            "[\"127.72.0.1:25720\"]",
            "listen.addresses[0]",
        ),
        (
            "127.72.0.9:25721",
            "[\"0.0.0.0:25721\"]",
            "listen.addresses[0]",
        ),
        (
            "[::1]:25722",
            "[\"127.72.0.1:25720\", \"[::]:25722\"]",
            "listen.addresses[1]",
        ),
    ];
    for (backup, listen, owner) in rows {
        let text = base
            .clone_with("backends.backup", &format!("[\"{backup}\"]"))
            .set("listen.addresses", listen)
            .toml();
        let config = roleproxy::Config::parse(&text, &|_| None).expect("valid as a file");
        let error = roleproxy::own_addresses::refuse_loops_here(&config)
            .expect_err("a backup at the proxy's own listener is refused")
            .to_string();
        for words in ["backends.backup[0]", owner, "loop"] {
            assert!(error.contains(words), "{words:?} in {error}");
        }
    }

    let file = ConfigFile::new("loops-backup");
    file.write(&base);
    let proxy = RunningProxy::start_from_file(&file.0).await;
    assert!(proxy.wait_route(Some(&cluster.nodes[0].addr()), LONG).await);
    file.write(&base.clone_with("backends.backup", "[\"127.72.0.1:25720\"]"));
    let (code, body) = proxy.post("/reload").await;
    assert_eq!(code, 400, "{body}");
    assert!(
        body.contains("backends.backup[0]") && body.contains("loop"),
        "{body}"
    );
    let status = proxy.status().await;
    assert_eq!(
        status["backends"].as_array().map(Vec::len),
        Some(1),
        "{status}"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dns_answer_at_the_proxys_own_wildcard_listener_is_dropped_with_odd_answers() {
    let _turn = DROPS.lock().await;
    let cluster = Cluster::start(73, 0).await;
    // The name answers the proxy's own host (covered by its 0.0.0.0 listener, on the port it
    // sends clients to) and addresses no node can have. The own address even says leader.
    let own = loopback(73, 0, 11);
    let role = RoleEndpoint::start(SocketAddr::new(own, 5500)).await;
    role.set(RoleReply::leader());
    let odd: [IpAddr; 5] = [
        "0.0.0.0".parse().unwrap(),
        "224.0.0.1".parse().unwrap(),
        "255.255.255.255".parse().unwrap(),
        "::".parse().unwrap(),
        "ff02::1".parse().unwrap(),
    ];
    let mut answer = vec![own];
    answer.extend(odd);
    cluster.dns.set(NAME, answer);
    let config = cluster
        .config()
        .listener("name = \"wild73\"\naddresses = [\"0.0.0.0:25730\"]")
        .set("backends.port", "25730")
        .set("proxy.leader_wait", "\"1s\"")
        .config();
    let reasons = ["own_address", "unspecified", "multicast", "broadcast"];
    let series = reasons.map(|r| format!("roleproxy_discovery_dropped_total{{reason=\"{r}\"}}"));
    let before = series.clone().map(|s| process_metric(&s));
    let proxy = RunningProxy::start(config).await;

    for (series, before) in series.iter().zip(before) {
        let (proxy, name) = (&proxy, series.as_str());
        assert!(
            eventually(
                LONG,
                move || async move { proxy.metric(name).await > before }
            )
            .await,
            "{series} counts"
        );
    }
    let status = proxy.status().await;
    assert_eq!(status["backends"], serde_json::json!([]), "{status}");

    // One client: refused once, with no session chained behind it.
    let wild = SocketAddr::new(own, 25730);
    let (code, message) = postgres_refusal(wild, false).await;
    assert_eq!(code, "57P03", "{message}");
    assert!(
        message.contains("DNS answered no usable address"),
        "{message}"
    );
    assert_eq!(
        sessions_counted(&proxy, &["wild73"]).await,
        ["roleproxy_sessions_total{listener=\"wild73\",result=\"no_leader\"} 1"]
    );
    assert_eq!(role.requests(), 0, "the own address is never even checked");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_became_the_proxys_own_address_is_refused_at_connect() {
    let _turn = DROPS.lock().await;
    let cluster = Cluster::start(74, 0).await;
    // A node that says leader, whose Postgres port nothing listens on yet.
    let node = loopback(74, 0, 12);
    let role = RoleEndpoint::start(SocketAddr::new(node, 5500)).await;
    role.set(RoleReply::leader());
    cluster.dns.set(NAME, vec![node]);
    let leader = SocketAddr::new(node, 5433).to_string();
    // Discovery looks once, then not for an hour: only the connect can notice what changes.
    let base = cluster
        .config()
        .listener("name = \"l74\"\naddresses = [\"127.74.0.1:0\"]")
        .set("backends.resolve_interval", "\"1h\"")
        .set("admin.allow_changes", "true");
    let file = ConfigFile::new("loops-connect");
    file.write(&base);
    let proxy = RunningProxy::start_from_file(&file.0).await;
    assert!(proxy.wait_route(Some(&leader), LONG).await);

    // The proxy now listens on the leader's address itself.
    file.write(
        &base
            .clone()
            .listener(&format!("name = \"self74\"\naddresses = [\"{leader}\"]")),
    );
    let (code, body) = proxy.post("/reload").await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(proxy.route_leader().await.as_deref(), Some(leader.as_str()));

    let (code, message) = postgres_refusal(proxy.listener("l74"), false).await;
    assert_eq!(code, "57P03", "{message}");
    for words in [
        leader.as_str(),
        "own listening address",
        "refusing to connect to itself",
    ] {
        assert!(message.contains(words), "{words:?} in {message}");
    }
    assert_eq!(
        sessions_counted(&proxy, &["l74", "self74"]).await,
        ["roleproxy_sessions_total{listener=\"l74\",result=\"loop\"} 1"],
        "one refusal, and no session on the proxy's own listener"
    );
    proxy.stop().await;
}

/// A name is checked when it is resolved: a backup by name that resolves to the proxy's own
/// listener is dropped as such a DNS answer is, and a fixed target by name that does is
/// refused at connect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_that_resolve_to_the_proxys_own_listener_are_refused_once_resolved() {
    let _turn = DROPS.lock().await;
    const SELF: &str = "self.loop.test";
    let cluster = Cluster::start(75, 0).await;
    let own = SocketAddr::new(loopback(75, 0, 11), 25750);
    cluster.dns.set(SELF, vec![own.ip()]);
    let config = cluster
        .config()
        .listener(&format!(
            "name = \"self75\"\naddresses = [\"{own}\"]\ntarget = \"{SELF}:{}\"",
            own.port()
        ))
        .set("backends.backup", &format!("[\"{SELF}:{}\"]", own.port()))
        .config();
    let series = "roleproxy_discovery_dropped_total{reason=\"own_address\"}";
    let dropped = process_metric(series);
    let proxy = RunningProxy::start(config).await;

    let proxy_ref = &proxy;
    assert!(
        eventually(LONG, move || async move {
            proxy_ref.metric(series).await > dropped
        })
        .await,
        "the backup by name is dropped once resolved"
    );
    let status = proxy.status().await;
    assert_eq!(status["backends"], serde_json::json!([]), "{status}");

    let (code, message) = postgres_refusal(own, false).await;
    assert_eq!(code, "57P03", "{message}");
    for words in [
        own.to_string().as_str(),
        "own listening address",
        "refusing to connect to itself",
    ] {
        assert!(message.contains(words), "{words:?} in {message}");
    }
    assert_eq!(
        sessions_counted(&proxy, &["self75"]).await,
        ["roleproxy_sessions_total{listener=\"self75\",result=\"loop\"} 1"],
        "one refusal, and no session chained behind it"
    );
    proxy.stop().await;
}
