//! Pause and resume (`POST /pause`, `POST /resume`) around a switchover done the Patroni way,
//! against real Postgres 15: leader sessions end at their transaction boundaries, new clients
//! are held and then served by the new leader, no transaction is cut. The pause limit lifts a
//! forgotten pause; the changing requests need `admin.allow_changes` and the token; a
//! replica's drain and maintenance steer new sessions and end (or keep) open ones, and outlive
//! reloads and rediscovery. Each test asserts outcomes, never how fast.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use roleproxy_testkit::cluster::{ClusterSpec, LocalCluster};
use roleproxy_testkit::fake_cluster::FakeCluster;
use roleproxy_testkit::harness::{
    eventually, http_request_with, metric_value, postgres_refusal, Client, ConfigFile, RunningProxy,
};
use roleproxy_testkit::role::RoleReply;
use roleproxy_testkit::transactions::{create_table, Session, Transactions};
use roleproxy_testkit::writer::connect;
use tokio::time::Instant;
use tokio_postgres::error::SqlState;

const WAIT: Duration = Duration::from_secs(60);

/// The pause's metrics are the process's, and every test here pauses a proxy: they take turns,
/// so each reads only its own proxy's changes.
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn spec(net: u8) -> ClusterSpec {
    ClusterSpec {
        name: format!("iad.net{net}.internal"),
        dns_ip: Ipv4Addr::new(127, net, 0, 1).into(),
        ..ClusterSpec::demo().with_ips((11..=13).map(|d| Ipv4Addr::new(127, net, 0, d)))
    }
}

fn conninfo(addr: SocketAddr, application: &str) -> String {
    format!(
        "host={} port={} user=postgres dbname=postgres connect_timeout=120 application_name={application}",
        addr.ip(),
        addr.port()
    )
}

/// The `/status` entry of one backend.
async fn backend_status(proxy: &RunningProxy, addr: SocketAddr) -> serde_json::Value {
    let status = proxy.status().await;
    status["backends"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|b| b["address"] == addr.to_string())
        .cloned()
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_around_a_patroni_style_switchover_cuts_no_transaction() {
    let _turn = TURN.lock().await;
    let spec = spec(223);
    let listen = spec.dns_ip.to_string();
    let cluster = LocalCluster::start(spec).await.expect("cluster starts");
    let config = cluster
        .proxy_config(&listen)
        .set("admin.allow_changes", "true")
        .set("check.interval", "\"1s\"")
        .set("proxy.pause_grace", "\"30s\"")
        .set("proxy.pause_limit", "\"5m\"")
        .config();
    let proxy = RunningProxy::start(config).await;
    let old = cluster.pg_addr(0);
    assert!(
        proxy.wait_route(Some(&old.to_string()), WAIT).await,
        "routes to node 0"
    );
    create_table(&cluster, &conninfo(proxy.addr, "setup"), WAIT).await;

    let clients = Arc::new(Transactions::start(
        &conninfo(proxy.addr, "tx"),
        8,
        Duration::from_millis(200),
    ));
    // When the count of commits changed: the longest stretch without one is the pause as the
    // clients saw it.
    let commits: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let sampler = {
        let (clients, commits) = (Arc::clone(&clients), Arc::clone(&commits));
        tokio::spawn(async move {
            let mut seen = 0;
            loop {
                let now = clients.outcome().committed.len();
                if now != seen {
                    seen = now;
                    commits.lock().expect("lock").push(Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let old_ip = old.ip().to_string();
    let committed_by_all_on = |server: String| {
        let clients = Arc::clone(&clients);
        move || {
            let (clients, server) = (Arc::clone(&clients), server.clone());
            async move {
                let outcome = clients.outcome();
                let by: BTreeSet<i32> = outcome
                    .committed
                    .iter()
                    .filter(|(_, _, s)| *s == server)
                    .map(|(c, _, _)| *c)
                    .collect();
                by.len() == 8
            }
        }
    };
    assert!(
        eventually(WAIT, committed_by_all_on(old_ip.clone())).await,
        "every client commits on node 0"
    );

    let paused = r#"roleproxy_paused"#;
    let pauses = r#"roleproxy_pause_events_total{event="pause"}"#;
    let resumes = r#"roleproxy_pause_events_total{event="resume"}"#;
    let cut = "roleproxy_pause_cut_sessions_total";
    let held = "roleproxy_pause_held_clients";
    let (paused_before, pauses_before, resumes_before, cut_before) = (
        proxy.metric(paused).await,
        proxy.metric(pauses).await,
        proxy.metric(resumes).await,
        proxy.metric(cut).await,
    );
    assert_eq!(paused_before, 0.0);

    let pause_at = Instant::now();
    let (code, body) = proxy.post("/pause").await;
    assert_eq!(code, 200, "{body}");
    assert!(body.starts_with("paused"), "{body}");
    assert_eq!(proxy.metric(paused).await, 1.0);
    assert_eq!(proxy.metric(pauses).await, pauses_before + 1.0);
    let (code, again) = proxy.post("/pause").await;
    assert_eq!(code, 200, "{again}");
    assert!(again.starts_with("already paused"), "{again}");
    assert_eq!(
        proxy.metric(pauses).await,
        pauses_before + 1.0,
        "pausing again is the same pause"
    );

    // What an operator waits for before the switchover: no session left on the leader, and
    // every client waiting in the proxy.
    let p = &proxy;
    assert!(
        eventually(WAIT, || async move {
            backend_status(p, old).await["sessions"] == 0
                && p.status().await["pause"]["held_clients"] == 8
        })
        .await,
        "the leader's sessions ended and the 8 clients are held: {}",
        proxy.status().await
    );
    assert_eq!(proxy.metric(held).await, 8.0);

    // The switchover as Patroni does it: a fast stop of the leader, the replica promoted, the
    // role endpoints following what Postgres says.
    tokio::task::block_in_place(|| cluster.pg().stop(0)).expect("pg_ctl stop -m fast");
    cluster.promote(1).await.expect("promote node 1");
    cluster.repoint_replicas(1).await.expect("node 2 follows");
    let new = cluster.pg_addr(1);
    assert!(
        proxy.wait_route(Some(&new.to_string()), WAIT).await,
        "routes to node 1"
    );
    assert_eq!(
        proxy.status().await["pause"]["held_clients"],
        8,
        "the route moved while paused: the clients are still held"
    );

    let resume_at = Instant::now();
    let (code, body) = proxy.post("/resume").await;
    assert_eq!(code, 200, "{body}");
    assert!(body.starts_with("resumed"), "{body}");
    assert_eq!(proxy.metric(paused).await, 0.0);
    assert_eq!(proxy.metric(resumes).await, resumes_before + 1.0);
    assert!(proxy.status().await["pause"].is_null());
    let new_ip = new.ip().to_string();
    assert!(
        eventually(WAIT, committed_by_all_on(new_ip.clone())).await,
        "every client is served again, by the new leader"
    );
    let all_back_at = Instant::now();
    sampler.abort();
    let _ = sampler.await;
    let clients = Arc::try_unwrap(clients).unwrap_or_else(|_| panic!("the sampler is stopped"));
    let outcome = clients.stop().await;

    outcome.assert_every_session_ended_between_transactions();
    let ended = outcome.between();
    assert_eq!(
        ended.len(),
        8,
        "each client's session on node 0 was ended once: {ended:#?}"
    );
    assert_eq!(proxy.metric(cut).await, cut_before, "no session was cut");

    // Every transaction that reported COMMIT is on the new leader, wherever it committed.
    let leader = connect(&cluster.conninfo(1)).await.expect("new leader");
    let missing = outcome.missing_on(&leader).await;
    assert!(
        missing.is_empty(),
        "rows committed but not on the new leader: {missing:?}"
    );
    assert!(
        outcome
            .committed
            .iter()
            .all(|(_, _, server)| [old_ip.as_str(), new_ip.as_str(), ""].contains(&server.as_str())),
        "every commit was on a leader"
    );

    let stamps = commits.lock().expect("lock").clone();
    let longest = stamps
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default();
    println!(
        "pause measured: POST /pause to POST /resume {:?}; longest stretch with no commit seen by the clients {:?}; POST /resume to every client committing on the new leader {:?}",
        resume_at - pause_at,
        longest,
        all_back_at - resume_at,
    );
    proxy.stop().await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_open_past_the_pause_grace_is_cut_and_counted() {
    let _turn = TURN.lock().await;
    let spec = spec(228);
    let listen = spec.dns_ip.to_string();
    let cluster = LocalCluster::start(spec).await.expect("cluster starts");
    let config = cluster
        .proxy_config(&listen)
        .set("admin.allow_changes", "true")
        .set("proxy.pause_grace", "\"1s\"")
        .config();
    let proxy = RunningProxy::start(config).await;
    let leader = cluster.pg_addr(0);
    assert!(proxy.wait_route(Some(&leader.to_string()), WAIT).await);
    create_table(&cluster, &conninfo(proxy.addr, "setup"), WAIT).await;
    let open = Session::open(&conninfo(proxy.addr, "open-tx"))
        .await
        .expect("session");
    open.client
        .batch_execute("BEGIN; INSERT INTO txs VALUES (77, 1, 'open')")
        .await
        .expect("a transaction open on the leader");
    let cut = "roleproxy_pause_cut_sessions_total";
    let before = proxy.metric(cut).await;

    let (code, body) = proxy.post("/pause").await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("proxy.pause_grace = 1s"), "{body}");
    let p = &proxy;
    assert!(
        eventually(WAIT, || async move { p.metric(cut).await == before + 1.0 }).await,
        "the session still in its transaction is cut at the pause grace, and counted"
    );
    assert!(
        open.client.batch_execute("COMMIT").await.is_err(),
        "its COMMIT reaches nothing"
    );
    let node = connect(&cluster.conninfo(0)).await.expect("leader");
    let row = node
        .query_one("SELECT count(*) FROM txs WHERE client = 77", &[])
        .await
        .expect("count");
    assert_eq!(
        row.get::<_, i64>(0),
        0,
        "the cut transaction committed nothing"
    );
    let (code, body) = proxy.post("/resume").await;
    assert_eq!(code, 200, "{body}");
    proxy.stop().await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pause_limit_lifts_the_pause_by_itself() {
    let _turn = TURN.lock().await;
    let cluster = FakeCluster::start(224, 1).await;
    let node = &cluster.nodes[0];
    node.role.set(RoleReply::leader());
    let proxy = RunningProxy::start(
        cluster
            .config()
            .set("admin.allow_changes", "true")
            .set("proxy.pause_limit", "\"2s\"")
            .set("proxy.leader_wait", "\"1s\"")
            .config(),
    )
    .await;
    assert!(proxy.wait_route(Some(&node.addr()), WAIT).await);
    let auto = r#"roleproxy_pause_events_total{event="auto_resume"}"#;
    let auto_before = proxy.metric(auto).await;

    let (code, body) = proxy.post("/pause").await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("proxy.pause_limit = 2s"), "{body}");
    let held = tokio::spawn(Client::connect(proxy.addr, WAIT));
    let p = &proxy;
    assert!(
        eventually(WAIT, || async move {
            p.status().await["pause"]["held_clients"] == 1
        })
        .await,
        "the client is held"
    );
    let served = held.await.expect("client task");
    assert_eq!(
        served.map(|c| c.tag),
        Some(node.tag()),
        "the pause lifted by itself and the held client reached the leader"
    );
    assert_eq!(proxy.metric(auto).await, auto_before + 1.0);
    assert_eq!(proxy.metric("roleproxy_paused").await, 0.0);
    assert!(proxy.status().await["pause"].is_null());

    // A held client whose hold ends with no leader is told why, as leader_wait's are.
    let (code, body) = proxy.post("/pause").await;
    assert_eq!(code, 200, "{body}");
    node.role.set(RoleReply::replica());
    let (sqlstate, message) = postgres_refusal(proxy.addr, false).await;
    assert_eq!(sqlstate, "57P03", "{message}");
    assert!(message.contains("no leader available"), "{message}");
    assert_eq!(proxy.metric(auto).await, auto_before + 2.0);
    proxy.stop().await;
}

/// A session that is not Postgres (as a TLS one is not, to the proxy) has no boundary to end
/// at: a pause closes it at once, and counts it as cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_whose_boundaries_cannot_be_seen_is_closed_at_once_by_a_pause() {
    let _turn = TURN.lock().await;
    let cluster = FakeCluster::start(229, 1).await;
    let node = &cluster.nodes[0];
    node.role.set(RoleReply::leader());
    let proxy = RunningProxy::start(
        cluster
            .config()
            .set("admin.allow_changes", "true")
            .set("proxy.pause_grace", "\"10m\"")
            .config(),
    )
    .await;
    assert!(proxy.wait_route(Some(&node.addr()), WAIT).await);
    let mut session = Client::connect(proxy.addr, WAIT).await.expect("served");
    assert!(session.echo("before").await);
    let cut = "roleproxy_pause_cut_sessions_total";
    let before = proxy.metric(cut).await;
    let (code, body) = proxy.post("/pause").await;
    assert_eq!(code, 200, "{body}");
    assert!(
        session.closed_within(WAIT).await,
        "closed at once, not after the 10 min grace"
    );
    assert_eq!(proxy.metric(cut).await, before + 1.0);
    let (code, body) = proxy.post("/resume").await;
    assert_eq!(code, 200, "{body}");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_need_allow_changes_and_the_token() {
    let _turn = TURN.lock().await;
    let cluster = FakeCluster::start(225, 1).await;
    let node = &cluster.nodes[0];
    node.role.set(RoleReply::leader());
    let backend = format!("/backends/{}/drain", node.addr());

    // Read-only unless allowed.
    let closed = RunningProxy::start(cluster.config().config()).await;
    assert!(closed.wait_route(Some(&node.addr()), WAIT).await);
    for path in ["/pause", "/resume", backend.as_str(), "/reload"] {
        let (code, body) = closed.post(path).await;
        assert_eq!(code, 403, "{path}: {body}");
        assert!(
            body.contains("admin.allow_changes = true"),
            "{path}: {body}"
        );
    }
    let (code, _) = closed.get("/pause").await;
    assert_eq!(code, 405, "a change is a POST");
    assert!(closed.status().await["pause"].is_null());
    closed.stop().await;

    // With a token file, only the token opens it; its trailing newline is not part of it.
    let token_file = ConfigFile::new("pause-token");
    token_file.write_text("s3cret-token\n");
    let file = ConfigFile::new("pause-token-config");
    file.write(
        &cluster
            .config()
            .set("admin.allow_changes", "true")
            .set("admin.token_file", &format!("{:?}", token_file.0)),
    );
    let proxy = RunningProxy::start_from_file(&file.0).await;
    assert!(proxy.wait_route(Some(&node.addr()), WAIT).await);
    let post = |path: &'static str, auth: Option<&'static str>| {
        let admin = proxy.admin;
        async move {
            let headers: Vec<(&str, &str)> =
                auth.map(|a| ("Authorization", a)).into_iter().collect();
            http_request_with(admin, "POST", path, &headers).await
        }
    };
    for (auth, why) in [
        (None, "no token"),
        (Some("Bearer wrong-token"), "a wrong token"),
        (Some("Bearer s3cret-toke"), "a prefix of the token"),
        (Some("Basic s3cret-token"), "not a bearer token"),
    ] {
        for path in ["/pause", "/reload"] {
            let (code, body) = post(path, auth).await;
            assert_eq!(code, 401, "{path} with {why}: {body}");
            assert!(
                !body.contains("s3cret"),
                "the token is never written: {body}"
            );
        }
    }
    assert!(
        proxy.status().await["pause"].is_null(),
        "no refused request paused the proxy"
    );
    let (code, body) = post("/pause", Some("Bearer s3cret-token")).await;
    assert_eq!(code, 200, "{body}");
    assert!(!proxy.status().await["pause"].is_null());
    let (code, body) = post("/resume", Some("Bearer s3cret-token")).await;
    assert_eq!(code, 200, "{body}");
    let (code, body) = post("/reload", Some("Bearer s3cret-token")).await;
    assert_eq!(code, 200, "{body}");
    proxy.stop().await;
}

#[test]
fn the_pause_keys_have_defaults_and_a_token_file_is_read_at_load() {
    let base = "[backends]\ndns_names = []\nbackup = [\"127.0.0.1:9\"]\n";
    let config = roleproxy::Config::parse(base, &|_| None).expect("valid");
    assert_eq!(config.proxy.pause_grace, Duration::from_secs(10));
    assert_eq!(config.proxy.pause_limit, Duration::from_secs(60));
    assert_eq!(config.admin.token, None);

    let bad =
        roleproxy::Config::parse(&format!("{base}[proxy]\npause_limit = \"soon\"\n"), &|_| {
            None
        })
        .expect_err("not a duration");
    assert!(bad.to_string().contains("proxy.pause_limit"), "{bad}");

    let missing = roleproxy::Config::parse(
        &format!("{base}[admin]\ntoken_file = \"/nonexistent/token\"\n"),
        &|_| None,
    )
    .expect_err("an unreadable token file stops the start");
    assert!(
        missing.to_string().contains("admin.token_file")
            && missing.to_string().contains("cannot read"),
        "{missing}"
    );
    let empty = ConfigFile::new("pause-empty-token");
    empty.write_text(" \n");
    let text = format!("{base}[admin]\ntoken_file = {:?}\n", empty.0);
    let refused = roleproxy::Config::parse(&text, &|_| None).expect_err("an empty token");
    assert!(
        refused.to_string().contains("admin.token_file") && refused.to_string().contains("empty"),
        "{refused}"
    );

    empty.write_text("  the-token\r\n");
    let config = roleproxy::Config::parse(&text, &|_| None).expect("valid");
    assert_eq!(
        config.admin.token.as_ref().map(|t| t.0.as_str()),
        Some("the-token"),
        "trimmed"
    );
    assert!(
        !format!("{config:?}").contains("the-token"),
        "never in Debug output"
    );
    let printed = toml::to_string(&config).expect("printable");
    assert!(
        !printed.contains("the-token"),
        "never printed by roleproxy check: {printed}"
    );
}

/// Which replica a session is on.
async fn server_of(session: &Session) -> String {
    session
        .client
        .query_one("SELECT host(inet_server_addr())", &[])
        .await
        .expect("query")
        .get(0)
}

/// Opens sessions through the replica listener until one more is on each of `servers`.
async fn sessions_on(replicas: SocketAddr, servers: &[String], app: &str) -> Vec<Session> {
    let mut found: Vec<Option<Session>> = servers.iter().map(|_| None).collect();
    for _ in 0..40 {
        if found.iter().all(Option::is_some) {
            break;
        }
        let session = Session::open(&conninfo(replicas, app))
            .await
            .expect("served");
        let on = server_of(&session).await;
        if let Some(slot) = servers.iter().position(|s| *s == on) {
            if found[slot].is_none() {
                found[slot] = Some(session);
            }
        }
    }
    found
        .into_iter()
        .map(|s| s.expect("a session on each replica"))
        .collect()
}

/// Where `n` new sessions through the replica listener land.
async fn new_sessions_land(replicas: SocketAddr, n: usize) -> BTreeSet<String> {
    let mut servers = BTreeSet::new();
    for _ in 0..n {
        let session = Session::open(&conninfo(replicas, "probe"))
            .await
            .expect("served");
        servers.insert(server_of(&session).await);
    }
    servers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_and_maintenance_steer_a_replica_listener_and_outlive_reloads_and_rediscovery() {
    let _turn = TURN.lock().await;
    let spec = spec(226);
    let listen = spec.dns_ip.to_string();
    let cluster = LocalCluster::start(spec).await.expect("cluster starts");
    let base = cluster
        .proxy_config(&listen)
        .set("admin.allow_changes", "true")
        .listener(&format!(
            "name = \"replicas\"\naddresses = [\"{listen}:0\"]\nserves = \"replica\""
        ));
    let file = ConfigFile::new("pause-drain");
    file.write(&base);
    let proxy = RunningProxy::start_from_file(&file.0).await;
    assert!(
        proxy
            .wait_route(Some(&cluster.pg_addr(0).to_string()), WAIT)
            .await
    );
    let replicas = proxy.listener("replicas");
    let (one, two) = (cluster.pg_addr(1), cluster.pg_addr(2));
    let ips = [one.ip().to_string(), two.ip().to_string()];
    let p = &proxy;
    assert!(
        eventually(WAIT, || async move {
            new_sessions_land(replicas, 4).await.len() == 2
        })
        .await,
        "both replicas take sessions"
    );

    let mut on_one = sessions_on(replicas, &ips[..1], "in-tx").await;
    let in_tx = on_one.remove(0);
    let idle = sessions_on(replicas, &ips[..1], "idle").await.remove(0);
    let on_two = sessions_on(replicas, &ips[1..], "on-two").await.remove(0);
    in_tx
        .client
        .batch_execute("BEGIN; SELECT 1")
        .await
        .expect("a transaction open on node 1");

    // Drain node 1.
    let gauge_one = format!("roleproxy_backend_operator_state{{backend=\"{one}\"}}");
    let gauge_two = format!("roleproxy_backend_operator_state{{backend=\"{two}\"}}");
    let registered = metric_value(&proxy.get("/metrics").await.1, &gauge_one);
    assert_eq!(
        registered,
        Some(0.0),
        "registered at 0 (ready) when it joined"
    );
    let (code, body) = proxy.post(&format!("/backends/{one}/drain")).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(proxy.metric(&gauge_one).await, 1.0);
    assert_eq!(backend_status(&proxy, one).await["operator"], "drain");
    assert_eq!(
        idle.end().await,
        Some(SqlState::ADMIN_SHUTDOWN),
        "an idle session on a drained replica ends with 57P01"
    );
    assert_eq!(
        new_sessions_land(replicas, 4).await,
        BTreeSet::from([ips[1].clone()]),
        "new sessions avoid the drained replica"
    );
    in_tx
        .client
        .batch_execute("SELECT 2; COMMIT")
        .await
        .expect("the open transaction runs to its end");
    let after = in_tx.client.batch_execute("SELECT 3").await;
    let error = after.expect_err("the session ended at the boundary");
    assert_eq!(
        in_tx.ended_with(&error).await,
        Some(SqlState::ADMIN_SHUTDOWN),
        "ended between transactions with 57P01"
    );

    // Node 1 ready again, node 2 in maintenance: its open session stays.
    let (code, body) = proxy.post(&format!("/backends/{one}/ready")).await;
    assert_eq!(code, 200, "{body}");
    let (code, body) = proxy.post(&format!("/backends/{two}/maintenance")).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(proxy.metric(&gauge_one).await, 0.0);
    assert_eq!(proxy.metric(&gauge_two).await, 2.0);
    assert_eq!(
        new_sessions_land(replicas, 4).await,
        BTreeSet::from([ips[0].clone()]),
        "new sessions avoid the replica in maintenance"
    );
    assert_eq!(server_of(&on_two).await, ips[1], "its open session stays");

    // A reload keeps it.
    file.write(&base.clone_with("check.timeout", "\"4s\""));
    let (code, body) = proxy.post("/reload").await;
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains("check"),
        "the reload changed something: {body}"
    );
    assert_eq!(backend_status(&proxy, two).await["operator"], "maintenance");
    assert_eq!(
        new_sessions_land(replicas, 4).await,
        BTreeSet::from([ips[0].clone()]),
        "still avoided after the reload"
    );

    // So does rediscovery: node 2 leaves DNS and comes back.
    cluster.set_dns(&[0, 1]).expect("dns");
    assert!(
        eventually(WAIT, || async move {
            backend_status(p, two).await["present"] != true
        })
        .await,
        "node 2 left"
    );
    cluster.set_dns(&[0, 1, 2]).expect("dns");
    assert!(
        eventually(WAIT, || async move {
            let b = backend_status(p, two).await;
            b["present"] == true && b["role"]["role"] == "replica"
        })
        .await,
        "node 2 is back as a replica"
    );
    assert_eq!(backend_status(&proxy, two).await["operator"], "maintenance");
    assert_eq!(proxy.metric(&gauge_two).await, 2.0);
    assert_eq!(
        new_sessions_land(replicas, 4).await,
        BTreeSet::from([ips[0].clone()]),
        "still avoided after rediscovery"
    );

    let (code, body) = proxy.post(&format!("/backends/{two}/ready")).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(proxy.metric(&gauge_two).await, 0.0);
    assert!(
        eventually(WAIT, || async move {
            new_sessions_land(replicas, 4).await.len() == 2
        })
        .await,
        "both replicas take sessions again"
    );
    let (code, body) = proxy.post("/backends/127.0.0.9:1/drain").await;
    assert_eq!(code, 404, "an unknown backend: {body}");
    let (code, body) = proxy.post(&format!("/backends/{one}/maint")).await;
    assert_eq!(code, 400, "an unknown state: {body}");
    drop(on_two);
    proxy.stop().await;
    cluster.shutdown().await;
}

/// Runs the binary with `args`; its exit success, stdout and stderr.
async fn roleproxy(args: &[String]) -> (bool, String, String) {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_roleproxy"))
        .args(args)
        .output()
        .await
        .expect("the binary runs");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_pauses_every_proxy_given_and_names_the_one_that_failed() {
    let _turn = TURN.lock().await;
    let cluster = FakeCluster::start(227, 1).await;
    let node = &cluster.nodes[0];
    node.role.set(RoleReply::leader());
    let config = cluster.config().set("admin.allow_changes", "true").config();
    let a = RunningProxy::start(config.clone()).await;
    let b = RunningProxy::start(config).await;
    // An address nothing listens on.
    let gone = {
        let listener = tokio::net::TcpListener::bind("127.227.0.1:0")
            .await
            .expect("bind");
        listener.local_addr().expect("address")
    };
    let admin = |addr: SocketAddr| ["--admin".to_string(), addr.to_string()];

    let mut args = vec!["pause".to_string()];
    args.extend(admin(a.admin));
    args.extend(admin(b.admin));
    let (ok, out, err) = roleproxy(&args).await;
    assert!(ok, "{out}{err}");
    for proxy in [&a, &b] {
        assert!(out.contains(&format!("{}: paused", proxy.admin)), "{out}");
        assert!(!proxy.status().await["pause"].is_null(), "{out}");
    }

    let args = vec![
        "resume".to_string(),
        "--admin".to_string(),
        format!("{},{},{}", a.admin, gone, b.admin),
    ];
    let (ok, out, err) = roleproxy(&args).await;
    assert!(
        !ok,
        "one admin port unreachable fails the command: {out}{err}"
    );
    assert!(err.contains(&format!("failed on {gone}")), "{err}");
    for proxy in [&a, &b] {
        assert!(out.contains(&format!("{}: resumed", proxy.admin)), "{out}");
        assert!(
            proxy.status().await["pause"].is_null(),
            "acted on the others"
        );
    }

    let mut args = vec![
        "backend".to_string(),
        node.addr(),
        "maintenance".to_string(),
    ];
    args.extend(admin(a.admin));
    let (ok, out, err) = roleproxy(&args).await;
    assert!(ok, "{out}{err}");
    assert!(out.contains("maintenance (was ready)"), "{out}");
    assert_eq!(
        backend_status(&a, node.addr().parse().expect("address")).await["operator"],
        "maintenance"
    );
    a.stop().await;
    b.stop().await;
}
