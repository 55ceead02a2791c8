//! The proxy end to end on real sockets: a DNS server, role endpoints and TCP backends on
//! loopback, each test on its own `127.N.0.0/24` so tests run in parallel.

use roleproxy_testkit as support;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use sha2::{Digest, Sha256};
use support::backend::{random_chunks, sha256_of_stream, SinkSourceBackend, TaggedBackend};
use support::dns::{DnsMode, DnsServer};
use support::fake_cluster::{
    echo_session, echoes, served_by, FakeCluster as Cluster, FakeNode as Node, NAME,
};
use support::harness::{
    eventually, holds_for, metric_value, postgres_refusal, sessions_active as active,
    sessions_ended as ended, Client, ConfigBuilder, RunningProxy,
};
use support::loopback;
use support::role::{RoleEndpoint, RoleReply};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LONG: Duration = Duration::from_secs(20);
/// The observation window of a test that asserts a client is NOT served: long enough that a
/// wrongly routed client would have been.
const SETTLE: Duration = Duration::from_millis(800);

/// Whether `/status` lists `count` backends, each with `role` (`leader`, `replica`, `down`).
async fn all_judged(proxy: &RunningProxy, count: usize, role: &str) -> bool {
    let status = proxy.status().await;
    let backends = status["backends"].as_array().cloned().unwrap_or_default();
    backends.len() == count && backends.iter().all(|b| b["role"]["role"] == role)
}

/// The lookups of DNS name `name` the proxy counted as failed, whatever the reason. Metrics
/// are one per process, so a test that counts lookups resolves a name of its own.
async fn failed_lookups(proxy: &RunningProxy, name: &str) -> f64 {
    let (_, metrics) = proxy.get("/metrics").await;
    let series = format!("roleproxy_dns_resolutions_total{{name=\"{name}\",");
    metrics
        .lines()
        .filter(|line| line.starts_with(&series))
        .filter(|line| !line.contains("result=\"ok\""))
        .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_leader_gets_connections_and_nothing_before_a_positive_check() {
    let cluster = Cluster::start(1, 3).await;
    let proxy = cluster.proxy().await;

    // Every node says replica: a client waits instead of landing anywhere.
    let waiting = tokio::spawn({
        let addr = proxy.addr;
        async move { Client::connect(addr, LONG).await.map(|c| c.tag) }
    });
    assert!(
        eventually(LONG, || all_judged(&proxy, 3, "replica")).await,
        "every node checked: {}",
        proxy.status().await
    );
    assert!(
        holds_for(SETTLE, || async {
            !waiting.is_finished() && cluster.nodes.iter().all(|n| n.backend.connections() == 0)
        })
        .await,
        "no client is served before a node says leader"
    );

    cluster.nodes[1].role.set(RoleReply::leader());
    assert_eq!(waiting.await.unwrap(), Some(cluster.nodes[1].tag()));
    for _ in 0..20 {
        assert_eq!(served_by(&proxy, LONG).await, Some(cluster.nodes[1].tag()));
    }
    assert_eq!(cluster.nodes[0].backend.connections(), 0);
    assert_eq!(cluster.nodes[2].backend.connections(), 0);
    assert_eq!(cluster.nodes[1].backend.connections(), 21);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_flip_closes_old_sessions_and_moves_new_ones() {
    let cluster = Cluster::start(2, 3).await;
    cluster.nodes[0].role.set(RoleReply::leader());
    let proxy = RunningProxy::start(own_listener(cluster.config(), 2, "flip").config()).await;
    let drained = ended("flip", "drained");
    let before = proxy.metric(&drained).await;
    let mut old = Client::connect(proxy.listener("flip"), LONG)
        .await
        .expect("served");
    assert_eq!(old.tag, cluster.nodes[0].tag());
    assert!(old.echo("before the flip").await);

    cluster.nodes[0].role.set(RoleReply::replica());
    cluster.nodes[1].role.set(RoleReply::leader());
    assert!(
        old.closed_within(LONG).await,
        "the old leader's session is shut down"
    );
    assert!(
        cluster.nodes[0].backend.wait_open(0, LONG).await,
        "backend side closed too"
    );
    assert_eq!(served_by(&proxy, LONG).await, Some(cluster.nodes[1].tag()));
    assert!(
        proxy.metric_reaches(&drained, before + 1.0, LONG).await,
        "the session is counted as drained"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_brain_means_no_route_until_resolved() {
    let cluster = Cluster::start(3, 3).await;
    cluster.nodes[0].role.set(RoleReply::leader());
    let proxy = cluster.proxy().await;
    let mut session = Client::connect(proxy.addr, LONG).await.expect("served");
    assert_eq!(session.tag, cluster.nodes[0].tag());

    cluster.nodes[1].role.set(RoleReply::leader());
    assert!(
        session.closed_within(LONG).await,
        "sessions are drained on split brain"
    );
    assert!(proxy.wait_route(None, LONG).await);
    // Rule 7: the second claim is newer than the first leader's last answer, so the route is
    // first "verifying"; the old leader's next `leader` answer makes it a split brain.
    assert!(
        proxy.wait_no_route("split_brain", LONG).await,
        "{}",
        proxy.status().await
    );

    let waiting = tokio::spawn({
        let addr = proxy.addr;
        async move { Client::connect(addr, LONG).await.map(|c| c.tag) }
    });
    assert!(
        holds_for(SETTLE, || async { !waiting.is_finished() }).await,
        "no client is served during split brain"
    );
    let before = cluster.nodes[0].backend.connections() + cluster.nodes[1].backend.connections();
    assert_eq!(before, 1, "only the first session ever reached a leader");

    cluster.nodes[0].role.set(RoleReply::word("zombie"));
    assert_eq!(waiting.await.unwrap(), Some(cluster.nodes[1].tag()));
    // Split brains are counted for the whole process, which other tests here share:
    // tests/process_counters.rs checks the count.
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_leader_gets_a_postgres_error_after_leader_wait() {
    let cluster = Cluster::start(4, 2).await;
    let config = cluster
        .config()
        .set("proxy.leader_wait", "\"500ms\"")
        .config();
    let proxy = RunningProxy::start(config).await;
    assert!(proxy.wait_route(None, LONG).await);

    for ssl_first in [true, false] {
        let (code, message) = postgres_refusal(proxy.addr, ssl_first).await;
        assert_eq!(code, "57P03");
        assert!(
            message.contains("no leader available for iad.test.internal")
                && message.contains("every node is a replica"),
            "{message}"
        );
    }

    // psql itself prints the message.
    let psql =
        support::find_program("psql", "postgresql-client-15").unwrap_or_else(|e| panic!("{e}"));
    let output = std::process::Command::new(psql)
        .arg(format!(
            "host={} port={} user=app dbname=app sslmode=prefer connect_timeout=30",
            proxy.addr.ip(),
            proxy.addr.port()
        ))
        .arg("-c")
        .arg("select 1")
        .env("PGPASSWORD", "x")
        .output()
        .expect("psql runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("no leader available for iad.test.internal"),
        "psql prints the proxy's error: {stderr}"
    );
    let (code, body) = proxy.get("/ready").await;
    assert_eq!(code, 503, "{body}");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_down_at_start_then_up() {
    let cluster = Cluster::start(5, 2).await;
    cluster.nodes[0].role.set(RoleReply::leader());
    // A name of this test's own: lookups are counted by name, for the whole process.
    let name = "dns5.test.internal";
    cluster
        .dns
        .set(name, cluster.nodes.iter().map(|n| n.ip).collect());
    cluster.dns.set_mode(DnsMode::Silent);
    let config = cluster
        .config()
        .set("backends.dns_names", &format!("[\"{name}\"]"));
    let proxy = RunningProxy::start(config.config()).await;
    let timeouts = format!("roleproxy_dns_resolutions_total{{name=\"{name}\",result=\"timeout\"}}");

    let waiting = tokio::spawn({
        let addr = proxy.addr;
        async move { Client::connect(addr, LONG).await.map(|c| c.tag) }
    });
    assert!(
        proxy.wait_no_route("dns_failing", LONG).await,
        "DNS named as the cause: {}",
        proxy.status().await
    );
    assert!(!waiting.is_finished());
    assert!(
        eventually(LONG, || async { proxy.metric(&timeouts).await > 0.0 }).await,
        "the silent lookups are counted as timeouts"
    );

    cluster.dns.set_mode(DnsMode::Answer);
    assert_eq!(waiting.await.unwrap(), Some(cluster.nodes[0].tag()));

    // A later outage keeps the last good answer: the route stays.
    let failed = failed_lookups(&proxy, name).await;
    cluster.dns.set_mode(DnsMode::ServFail);
    assert!(
        eventually(LONG, || async {
            failed_lookups(&proxy, name).await >= failed + 2.0
        })
        .await,
        "the proxy met the outage"
    );
    assert_eq!(proxy.route_leader().await, Some(cluster.nodes[0].addr()));
    assert_eq!(served_by(&proxy, LONG).await, Some(cluster.nodes[0].tag()));
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_added_to_and_removed_from_dns() {
    let cluster = Cluster::start(6, 2).await;
    cluster.dns_nodes(&[0]);
    cluster.nodes[1].role.set(RoleReply::leader());
    let config = cluster
        .config()
        .set("proxy.leader_wait", "\"500ms\"")
        .config();
    let proxy = RunningProxy::start(config).await;

    // The leader is not in DNS, so it is not a backend.
    assert!(
        eventually(LONG, || all_judged(&proxy, 1, "replica")).await,
        "node 0 resolved and checked: {}",
        proxy.status().await
    );
    let (code, _) = postgres_refusal(proxy.addr, false).await;
    assert_eq!(code, "57P03");
    assert_eq!(cluster.nodes[1].backend.connections(), 0);

    cluster.dns_nodes(&[0, 1]);
    assert!(proxy.wait_route(Some(&cluster.nodes[1].addr()), LONG).await);
    let mut session = Client::connect(proxy.addr, LONG).await.expect("served");
    assert_eq!(session.tag, cluster.nodes[1].tag());

    // The leader leaves DNS: no new sessions, but its open session is not cut.
    cluster.dns_nodes(&[0]);
    assert!(proxy.wait_route(None, LONG).await);
    let (code, message) = postgres_refusal(proxy.addr, false).await;
    assert_eq!(code, "57P03");
    assert!(message.contains(" has left DNS"), "{message}");
    assert!(
        !message.contains("maintenance"),
        "only the reason that applies: {message}"
    );
    assert!(session.echo("still here").await);
    proxy.stop().await;
}

/// A backup given by name is resolved with the resolver of `dns_names`, on its cadence: when
/// the name moves to another node the route follows, and when it stops resolving its last
/// answer is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_by_name_is_re_resolved_like_a_dns_name() {
    const BACKUP: &str = "pg.backup.test";
    let cluster = Cluster::start(214, 2).await;
    cluster.dns_nodes(&[]);
    cluster.dns.set(BACKUP, vec![cluster.nodes[0].ip]);
    for node in &cluster.nodes {
        node.role.set(RoleReply::leader());
    }
    let config = cluster
        .config()
        .set("backends.dns_names", "[]")
        .set("backends.backup", &format!("[\"{BACKUP}:5433\"]"))
        .config();
    let proxy = RunningProxy::start(config).await;
    assert_eq!(served_by(&proxy, LONG).await, Some(cluster.nodes[0].tag()));

    cluster.dns.set(BACKUP, vec![cluster.nodes[1].ip]);
    assert!(
        proxy.wait_route(Some(&cluster.nodes[1].addr()), LONG).await,
        "the route follows the name"
    );
    assert_eq!(served_by(&proxy, LONG).await, Some(cluster.nodes[1].tag()));

    cluster.dns.remove(BACKUP);
    let asked = cluster.dns.queries();
    assert!(
        support::eventually(LONG, || async { cluster.dns.queries() >= asked + 6 }).await,
        "the name is asked again"
    );
    assert_eq!(
        served_by(&proxy, LONG).await,
        Some(cluster.nodes[1].tag()),
        "a name that stops resolving keeps its last answer"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_is_used_only_while_no_discovered_node_is_leader() {
    let cluster = Cluster::start(7, 1).await;
    let backup_ip = loopback(7, 0, 50);
    let backup_role = RoleEndpoint::start(SocketAddr::new(backup_ip, 5500)).await;
    let backup = TaggedBackend::start(SocketAddr::new(backup_ip, 5433), "backup").await;
    backup_role.set(RoleReply::leader());
    let config = cluster
        .config()
        .set("backends.backup", &format!("[\"[{backup_ip}]:5433\"]"))
        .config();
    let proxy = RunningProxy::start(config).await;

    let mut on_backup = Client::connect(proxy.addr, LONG).await.expect("served");
    assert_eq!(on_backup.tag, "backup");

    cluster.nodes[0].role.set(RoleReply::leader());
    assert!(
        on_backup.closed_within(LONG).await,
        "backup sessions move to the discovered leader"
    );
    assert_eq!(served_by(&proxy, LONG).await, Some(cluster.nodes[0].tag()));
    assert_eq!(backup.connections(), 1);

    let status = proxy.status().await;
    let sources: Vec<String> = status["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["sources"][0].as_str().unwrap_or_default().to_string())
        .collect();
    assert!(sources.contains(&"backup".to_string()), "{status}");
    assert!(sources.contains(&format!("dns:{NAME}")), "{status}");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_keeps_sessions_but_takes_no_new_ones() {
    let cluster = Cluster::start(8, 2).await;
    cluster.nodes[0].role.set(RoleReply::leader());
    let config = cluster
        .config()
        .set("proxy.leader_wait", "\"500ms\"")
        .config();
    let proxy = RunningProxy::start(config).await;
    let mut session = Client::connect(proxy.addr, LONG).await.expect("served");

    cluster.nodes[0].role.set(RoleReply::status(404));
    assert!(proxy.wait_route(None, LONG).await);
    assert!(
        session.echo("during maintenance").await,
        "existing session stays"
    );
    let (code, message) = postgres_refusal(proxy.addr, false).await;
    assert_eq!(code, "57P03");
    assert!(message.contains(" is in maintenance"), "{message}");
    assert!(
        !message.contains("DNS"),
        "only the reason that applies: {message}"
    );

    cluster.nodes[0].role.set(RoleReply::leader());
    assert_eq!(served_by(&proxy, LONG).await, Some(cluster.nodes[0].tag()));
    assert!(
        session.echo("after maintenance").await,
        "same generation: never drained"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_role_endpoints_are_down_not_leader() {
    let cluster = Cluster::start(9, 4).await;
    cluster.nodes[0].role.set(RoleReply::leader());
    cluster.nodes[1].role.set(RoleReply::Hang);
    cluster.nodes[2].role.set(RoleReply::Garbage);
    cluster.nodes[3].role.set(RoleReply::Huge(5 * 1024 * 1024));
    let proxy = cluster.proxy().await;
    assert!(proxy.wait_route(Some(&cluster.nodes[0].addr()), LONG).await);

    // Wait until every hostile node has been judged down, then look at the reasons.
    let judged = eventually(LONG, || async {
        let status = proxy.status().await;
        let all_down = status["backends"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|b| b["address"] != cluster.nodes[0].addr())
            .all(|b| b["role"]["role"] == "down");
        all_down.then_some(status)
    })
    .await;
    // Not all down in time: the asserts below say which reason is missing.
    let status = match judged {
        Some(status) => status,
        None => proxy.status().await,
    };
    let error_of = |node: &Node| {
        status["backends"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["address"] == node.addr())
            .map(|b| b["last_error"].as_str().unwrap_or_default().to_string())
            .unwrap_or_default()
    };
    assert!(
        error_of(&cluster.nodes[1]).contains("timed out"),
        "{status}"
    );
    assert!(error_of(&cluster.nodes[2]).contains("HTTP"), "{status}");
    assert!(
        error_of(&cluster.nodes[3]).contains("larger than 1024"),
        "{status}"
    );
    for _ in 0..5 {
        assert_eq!(served_by(&proxy, LONG).await, Some(cluster.nodes[0].tag()));
    }
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_refuses_with_53300() {
    let cluster = Cluster::start(10, 1).await;
    cluster.nodes[0].role.set(RoleReply::leader());
    let config = cluster.config().set("proxy.max_connections", "2").config();
    let proxy = RunningProxy::start(config).await;
    let first = Client::connect(proxy.addr, LONG).await.expect("served");
    let _second = Client::connect(proxy.addr, LONG).await.expect("served");
    let (code, message) = postgres_refusal(proxy.addr, true).await;
    assert_eq!(code, "53300");
    assert!(message.contains("too many clients"), "{message}");

    drop(first);
    assert!(cluster.nodes[0].backend.wait_open(1, LONG).await);
    let third = eventually(LONG, || Client::connect(proxy.addr, Duration::from_secs(2))).await;
    assert!(third.is_some(), "a freed slot is reused");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sessions_are_closed() {
    let cluster = Cluster::start(11, 1).await;
    cluster.nodes[0].role.set(RoleReply::leader());
    let config = cluster.config().set("proxy.idle_timeout", "\"700ms\"");
    let proxy = RunningProxy::start(own_listener(config, 11, "idle").config()).await;
    let timed_out = ended("idle", "idle_timeout");
    let before = proxy.metric(&timed_out).await;
    let addr = proxy.listener("idle");
    let mut busy = Client::connect(addr, LONG).await.expect("served");
    let mut idle = Client::connect(addr, LONG).await.expect("served");
    // The busy session keeps talking, a line at least every 200 ms (the wait for the idle
    // one to close paces it), until the idle one is closed; then it is still open.
    let deadline = tokio::time::Instant::now() + LONG;
    let mut i = 0;
    loop {
        assert!(
            busy.echo(&format!("ping {i}")).await,
            "an active session is not idle"
        );
        i += 1;
        if idle.closed_within(Duration::from_millis(200)).await {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the idle session was never closed"
        );
    }
    assert!(busy.echo("after the idle one closed").await);
    assert!(
        proxy.metric_reaches(&timed_out, before + 1.0, LONG).await,
        "the idle session is counted as timed out"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_mib_each_way_arrive_intact_with_half_close_spliced() {
    sixty_four_mib_each_way(12, "splice").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_mib_each_way_arrive_intact_with_half_close_buffered() {
    sixty_four_mib_each_way(17, "buffered").await;
}

async fn sixty_four_mib_each_way(net: u8, copy: &str) {
    const LEN: u64 = 64 * 1024 * 1024;
    let ip = loopback(net, 0, 11);
    let dns = DnsServer::start(loopback(net, 0, 1)).await;
    dns.set(NAME, vec![ip]);
    let role = RoleEndpoint::start(SocketAddr::new(ip, 5500)).await;
    role.set(RoleReply::leader());
    let backend = SinkSourceBackend::start(SocketAddr::new(ip, 5433), LEN, 7).await;
    // The stand-in backend does not speak Postgres, so a probe after a check that timed out
    // while this machine copies flat out would find it "gone"; the checks get time to answer.
    let config = ConfigBuilder::new(&loopback(net, 0, 1).to_string(), dns.addr(), NAME)
        .set("proxy.copy", &format!("\"{copy}\""))
        .set("check.timeout", "\"10s\"")
        .config();
    let proxy = RunningProxy::start(config).await;

    let stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let (mut read, mut write) = stream.into_split();
    let sender = tokio::spawn(async move {
        for chunk in random_chunks(11, LEN) {
            write.write_all(&chunk).await.expect("send");
        }
        // Half-close: the backend sees EOF while its own stream is still flowing to us.
        write.shutdown().await.expect("half-close");
    });
    let receiver = tokio::spawn(async move {
        let mut hash = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0u64;
        loop {
            let n = read.read(&mut buf).await.expect("receive");
            if n == 0 {
                break;
            }
            total += n as u64;
            hash.update(&buf[..n]);
        }
        (total, <[u8; 32]>::from(hash.finalize()))
    });
    tokio::time::timeout(Duration::from_secs(120), sender)
        .await
        .expect("send finishes")
        .unwrap();
    let (total, digest) = tokio::time::timeout(Duration::from_secs(120), receiver)
        .await
        .expect("receive finishes")
        .unwrap();
    assert_eq!(total, LEN);
    assert_eq!(
        digest,
        sha256_of_stream(7, LEN),
        "backend→client bytes intact"
    );
    assert_eq!(
        backend.received_digest(LONG).await,
        Some(sha256_of_stream(11, LEN)),
        "client→backend bytes intact"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_report_route_and_backends() {
    let cluster = Cluster::start(13, 2).await;
    let proxy = RunningProxy::start(own_listener(cluster.config(), 13, "admin").config()).await;
    assert_eq!(proxy.get("/healthz").await.0, 200);
    assert_eq!(proxy.get("/ready").await.0, 503);
    cluster.nodes[0].role.set(RoleReply::leader());
    assert!(proxy.wait_route(Some(&cluster.nodes[0].addr()), LONG).await);
    assert_eq!(proxy.get("/ready").await.0, 200);
    let _session = Client::connect(proxy.listener("admin"), LONG)
        .await
        .expect("served");

    let status = proxy.status().await;
    assert_eq!(status["cluster"], NAME);
    let backends = status["backends"].as_array().unwrap();
    assert_eq!(backends.len(), 2, "{status}");
    let leader = backends
        .iter()
        .find(|b| b["address"] == cluster.nodes[0].addr())
        .expect("leader listed");
    assert_eq!(leader["role"]["role"], "leader");
    assert_eq!(leader["sessions"], 1);
    assert!(leader["last_check_unix_ms"].as_u64().is_some());
    assert!(leader["last_check_latency_ms"].as_f64().is_some());

    // Metrics are one per process: only series labelled with this test's listener or
    // backends are its own (tests/process_counters.rs checks the unlabelled ones). The client
    // may have its first answer a moment before its session is counted as active.
    assert!(proxy.metric_reaches(&active("admin"), 1.0, LONG).await);
    let (code, metrics) = proxy.get("/metrics").await;
    assert_eq!(code, 200, "{metrics}");
    let leader = cluster.nodes[0].addr();
    let replica = cluster.nodes[1].addr();
    let value = |series: String| metric_value(&metrics, &series);
    assert_eq!(value(active("admin")), Some(1.0), "{metrics}");
    for (backend, role) in [(&leader, "leader"), (&replica, "replica")] {
        let checks = value(format!(
            "roleproxy_checks_total{{backend=\"{backend}\",result=\"{role}\"}}"
        ));
        assert!(checks.is_some_and(|n| n > 0.0), "{backend}: {metrics}");
        let timed = value(format!(
            "roleproxy_check_duration_seconds_count{{backend=\"{backend}\"}}"
        ));
        assert!(timed.is_some_and(|n| n > 0.0), "{backend}: {metrics}");
        let is_role = value(format!(
            "roleproxy_backend_role{{backend=\"{backend}\",role=\"{role}\"}}"
        ));
        assert_eq!(is_role, Some(1.0), "{backend}: {metrics}");
    }
    assert_eq!(proxy.get("/nope").await.0, 404);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_sessions_finish_within_the_grace_period() {
    let cluster = Cluster::start(14, 1).await;
    cluster.nodes[0].role.set(RoleReply::leader());
    let config = cluster
        .config()
        .set("proxy.shutdown_grace", "\"1500ms\"")
        .config();
    let proxy = RunningProxy::start(config).await;
    let addr = proxy.addr;
    let mut session = Client::connect(addr, LONG).await.expect("served");
    let stopping = tokio::spawn(proxy.stop());
    assert!(
        eventually(LONG, || async {
            tokio::net::TcpStream::connect(addr).await.is_err()
        })
        .await,
        "no new clients once stopping"
    );
    assert!(
        session.echo("during grace").await,
        "sessions run during the grace period"
    );
    assert!(
        session.closed_within(LONG).await,
        "closed when the grace period ends"
    );
    tokio::time::timeout(LONG, stopping)
        .await
        .expect("run returns")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_backends_from_aaaa_records() {
    // Fly's private network is IPv6: the name has AAAA records and `prefer = "ipv6"` picks them.
    let v6 = IpAddr::V6(std::net::Ipv6Addr::LOCALHOST);
    let role = RoleEndpoint::start(SocketAddr::new(v6, 0)).await;
    role.set(RoleReply::leader());
    let backend = TaggedBackend::start(SocketAddr::new(v6, 0), "v6").await;
    // The IPv4 twin of the node says replica: were it chosen, nothing would be served.
    let v4 = loopback(15, 0, 11);
    let v4_role = RoleEndpoint::start(SocketAddr::new(v4, role.addr().port())).await;
    let dns = DnsServer::start(loopback(15, 0, 1)).await;
    dns.set(NAME, vec![v4, v6]);
    let config = ConfigBuilder::new("[::1]", dns.addr(), NAME)
        .set("backends.prefer", "\"ipv6\"")
        .set("backends.port", &backend.addr().port().to_string())
        .set("check.port", &role.addr().port().to_string())
        .config();
    let proxy = RunningProxy::start(config).await;
    assert!(proxy.addr.is_ipv6());
    assert_eq!(served_by(&proxy, LONG).await.as_deref(), Some("v6"));
    assert_eq!(v4_role.requests(), 0, "the IPv4 address is not a backend");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_failed_check_does_not_drop_the_leader() {
    let cluster = Cluster::start(16, 0).await;
    // A leader whose Postgres answers (full, 53300), as a real one would while its role
    // endpoint fails for load.
    let node = cluster.full_node(11).await;
    cluster.dns.set(NAME, vec![node.ip]);
    // Slow checks, so the test can answer exactly one of them with an error.
    let config = cluster
        .config()
        .set("check.interval", "\"1s\"")
        .set("check.fast_interval", "\"600ms\"")
        .set("check.fall", "2")
        .config();
    let proxy = RunningProxy::start(config).await;
    assert!(proxy.wait_route(Some(&node.addr()), LONG).await);
    let mut session = echo_session(proxy.addr).await.expect("served");
    let generation = proxy.status().await["route"]["generation"].clone();

    let seen = node.role.requests();
    node.role
        .set(RoleReply::error(500, "too many clients already"));
    assert!(node.role.wait_requests(seen + 1, LONG).await);
    node.role.set(RoleReply::leader());
    // The failure made every node re-check; give those checks time to land.
    assert!(node.role.wait_requests(seen + 3, LONG).await);

    assert!(
        echoes(&mut session, b"still routed").await,
        "one failed check drains nothing"
    );
    let status = proxy.status().await;
    assert_eq!(status["route"]["generation"], generation, "{status}");
    assert_eq!(status["route"]["target"]["state"], "leader", "{status}");
    proxy.stop().await;
}

/// A client refused for want of a leader is told the cause, in the words `/status` uses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_client_is_told_why() {
    let cluster = Cluster::start(151, 2).await;
    let config = || {
        cluster
            .config()
            .set("proxy.leader_wait", "\"300ms\"")
            .config()
    };
    let proxy = RunningProxy::start(config()).await;
    let every_node = |reply: fn() -> RoleReply| {
        for node in &cluster.nodes {
            node.role.set(reply());
        }
    };
    every_node(RoleReply::replica);
    assert_told(&proxy, "every node is a replica").await;
    every_node(|| RoleReply::error(500, "boom"));
    assert_told(&proxy, "no node is reachable").await;
    every_node(RoleReply::leader);
    assert_told(&proxy, "split brain").await;
    proxy.stop().await;

    // Before DNS has ever answered (a proxy that has no answer to keep).
    cluster.dns.set_mode(DnsMode::ServFail);
    let fresh = RunningProxy::start(config()).await;
    assert_told(&fresh, "DNS lookups of iad.test.internal").await;
    fresh.stop().await;
}

async fn assert_told(proxy: &RunningProxy, words: &str) {
    assert!(
        eventually(LONG, || async {
            proxy.status().await["route_text"]
                .as_str()
                .is_some_and(|text| text.contains(words))
        })
        .await,
        "/status never said {words:?}: {}",
        proxy.status().await
    );
    let (code, message) = postgres_refusal(proxy.addr, false).await;
    assert_eq!(code, "57P03", "{message}");
    assert!(message.contains(words), "{message}");
}

/// Metrics are process-wide and tests run in parallel: a test that counts sessions gives its
/// clients a leader listener of its own, named `name`.
fn own_listener(config: ConfigBuilder, net: u8, name: &str) -> ConfigBuilder {
    config.listener(&format!(
        "name = \"{name}\"\naddresses = [\"{}:0\"]",
        loopback(net, 0, 1)
    ))
}

/// A leader at `127.net.0.11` whose "Postgres" runs `backend` on each connection and then
/// holds it open without a word, and a proxy in front of it with `max_connections = 1`,
/// `half_close_timeout = 500ms` and a listener named `name`, whose address is returned.
async fn one_slot_proxy<F, Fut>(
    net: u8,
    name: &str,
    backend: F,
) -> (DnsServer, RoleEndpoint, RunningProxy, SocketAddr)
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = tokio::net::TcpStream> + Send,
{
    let ip = loopback(net, 0, 11);
    let listener = tokio::net::TcpListener::bind(SocketAddr::new(ip, 5433))
        .await
        .unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(backend(stream).await);
        }
    });
    let dns = DnsServer::start(loopback(net, 0, 1)).await;
    dns.set(NAME, vec![ip]);
    let role = RoleEndpoint::start(SocketAddr::new(ip, 5500)).await;
    role.set(RoleReply::leader());
    let config = ConfigBuilder::new(&loopback(net, 0, 1).to_string(), dns.addr(), NAME)
        .set("proxy.max_connections", "1")
        .set("proxy.half_close_timeout", "\"500ms\"");
    let proxy = RunningProxy::start(own_listener(config, net, name).config()).await;
    let addr = proxy.listener(name);
    (dns, role, proxy, addr)
}

/// A client that has spoken first, as Postgres clients do.
async fn speaking_client(addr: SocketAddr) -> tokio::net::TcpStream {
    let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
    client
        .write_all(&support::harness::startup_packet())
        .await
        .unwrap();
    client
}

/// Waits until `rounds` sessions of listener `name` ended half-open and none is open.
async fn half_open_sessions_freed(proxy: &RunningProxy, name: &str, rounds: u32) {
    let (half_closed, active) = (ended(name, "half_closed"), active(name));
    assert!(
        eventually(LONG, || async {
            proxy.metric(&half_closed).await == f64::from(rounds)
                && proxy.metric(&active).await == 0.0
        })
        .await,
        "round {rounds}: the half-open session is closed and its slot freed: {}",
        proxy.get("/metrics").await.1
    );
}

/// Reads until EOF (true) or a reset or `LONG` (false).
async fn reads_eof(stream: &mut tokio::net::TcpStream) -> bool {
    let mut buf = [0u8; 256];
    loop {
        match tokio::time::timeout(LONG, stream.read(&mut buf)).await {
            Ok(Ok(0)) => return true,
            Ok(Ok(_)) => continue,
            _ => return false,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_clients_never_reach_a_backend_and_are_closed_after_silent_timeout() {
    let cluster = Cluster::start(21, 1).await;
    cluster.nodes[0].role.set(RoleReply::leader());
    let config = cluster.config().set("proxy.silent_timeout", "\"1s\"");
    let proxy = RunningProxy::start(own_listener(config, 21, "silent").config()).await;
    let addr = proxy.listener("silent");
    let silent_series = ended("silent", "silent");
    let (_, metrics) = proxy.get("/metrics").await;
    assert_eq!(
        metric_value(&metrics, &silent_series),
        Some(0.0),
        "registered at 0 from the start: {metrics}"
    );
    let mut served = Client::connect(addr, LONG).await.expect("served");

    let mut silent = Vec::new();
    for _ in 0..20 {
        silent.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    // Accepted after every silent one, and served meanwhile.
    let mut real = Client::connect(addr, LONG)
        .await
        .expect("a real client is served");
    assert!(real.echo("real").await);
    for stream in &mut silent {
        assert!(reads_eof(stream).await, "a silent client is closed");
    }
    assert_eq!(proxy.metric(&silent_series).await, 20.0);
    assert_eq!(
        cluster.nodes[0].backend.connections(),
        2,
        "only the two clients that spoke reached the backend"
    );
    assert!(
        served.echo("still here").await,
        "an open session is unaffected"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_half_closes_while_the_client_stays_frees_the_slot() {
    let name = "backend-half-closes";
    // Answers, then closes its sending side only.
    let (_dns, _role, proxy, addr) = one_slot_proxy(22, name, |mut stream| async move {
        let mut first = [0u8; 64];
        let _ = stream.read(&mut first).await;
        let _ = stream.write_all(b"bye\n").await;
        let _ = stream.shutdown().await;
        stream
    })
    .await;
    let mut clients = Vec::new();
    for round in 1..=2 {
        // With max_connections = 1, a second round is served only if the first freed its slot.
        let mut client = speaking_client(addr).await;
        let mut got = [0u8; 4];
        tokio::time::timeout(LONG, client.read_exact(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&got, b"bye\n", "round {round}: served");
        // The backend's half-close is passed on; the client keeps its own side open.
        assert!(reads_eof(&mut client).await);
        half_open_sessions_freed(&proxy, name, round).await;
        clients.push(client);
    }
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_half_closes_while_the_backend_stays_frees_the_slot() {
    let name = "client-half-closes";
    // Reads up to the client's EOF, and stays.
    let (_dns, _role, proxy, addr) = one_slot_proxy(23, name, |mut stream| async move {
        let mut buf = [0u8; 256];
        while let Ok(n) = stream.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
        stream
    })
    .await;
    for round in 1..=2 {
        let mut client = speaking_client(addr).await;
        client.shutdown().await.unwrap();
        // Served (a refusal would have sent an ErrorResponse), then closed by the proxy.
        let mut got = Vec::new();
        tokio::time::timeout(LONG, client.read_to_end(&mut got))
            .await
            .expect("the proxy closes the half-open session")
            .unwrap();
        assert!(
            got.is_empty(),
            "round {round}: served, not refused: {got:?}"
        );
        half_open_sessions_freed(&proxy, name, round).await;
    }
    proxy.stop().await;
}
