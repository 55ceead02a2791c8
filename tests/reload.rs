//! Live reload on real sockets: `POST /reload` is off unless the config allows it; a reload
//! opens and closes listeners, keeps sessions whose leader is unchanged, and an invalid file
//! (or a taken port) is refused with the reason while the old configuration keeps running.
//! Whatever section it changes, a reload that would leave routing worse than now (the leader
//! unrouted, the route moved, a leader whose data address does not answer) is refused unless
//! forced; it is evaluated off the main loop, so shutdown never waits for it, and requests that
//! come during an evaluation are answered together by the next one.

use roleproxy_testkit as support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use support::backend::TaggedBackend;
use support::cluster::{ClusterSpec, LocalCluster};
use support::fake_cluster::FakeCluster as Cluster;
use support::harness::{eventually, Client, ConfigBuilder, ConfigFile, RunningProxy};
use support::role::{RoleEndpoint, RoleReply};
use support::writer::{connect, conninfo};

const LONG: Duration = Duration::from_secs(20);

async fn refused(addr: SocketAddr) -> bool {
    tokio::net::TcpStream::connect(addr).await.is_err()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_over_http_is_off_unless_the_config_turns_it_on() {
    let cluster = Cluster::start(54, 1).await;
    let file = ConfigFile::new("reload-off");
    file.write(&cluster.config());
    let proxy = RunningProxy::start_from_file(&file.0).await;
    let (code, body) = proxy.post("/reload").await;
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("admin.allow_changes"), "{body}");
    let (code, _) = proxy.get("/reload").await;
    assert_eq!(code, 405, "reload is a POST");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_opens_and_closes_listeners_and_keeps_sessions_on_an_unchanged_leader() {
    let cluster = Cluster::start(55, 2).await;
    cluster.nodes[0].role.set(RoleReply::leader());
    let base = cluster.config().set("admin.allow_changes", "true");
    let file = ConfigFile::new("reload-listeners");
    file.write(&base);
    let proxy = RunningProxy::start_from_file(&file.0).await;
    let mut session = Client::connect(proxy.addr, LONG).await.expect("served");
    assert_eq!(session.tag, cluster.nodes[0].tag());
    let generation = proxy.status().await["route"]["generation"].clone();

    // Add a replica listener and change how checks run.
    let replicas: SocketAddr = "127.55.0.1:6001".parse().unwrap();
    let with_replicas = cluster
        .config()
        .set("admin.allow_changes", "true")
        .set("check.interval", "\"300ms\"")
        .set("check.rise", "2")
        .listener("name = \"replicas\"\naddresses = [\"127.55.0.1:6001\"]\nserves = \"replica\"");
    file.write(&with_replicas);
    let (code, body) = proxy.post("/reload").await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("opened replicas"), "{body}");
    assert!(body.contains("check settings"), "{body}");
    let replica = Client::connect(replicas, LONG)
        .await
        .expect("the new listener serves");
    assert_eq!(replica.tag, cluster.nodes[1].tag());
    assert!(session.echo("across the reload").await);
    assert_eq!(
        proxy.status().await["route"]["generation"],
        generation,
        "the route did not move"
    );

    // A bad file is refused with its key; everything keeps running as it was.
    let refusals = [
        (
            with_replicas.clone_with("proxy.max_conections", "5").toml(),
            "max_conections",
        ),
        (
            with_replicas
                .clone_with("proxy.leader_wait", "\"soon\"")
                .toml(),
            "proxy.leader_wait",
        ),
        ("[listen\naddresses = ".to_string(), "TOML parse error"),
    ];
    for (text, reason) in refusals {
        file.write_text(&text);
        let (code, body) = proxy.post("/reload").await;
        assert_eq!(code, 400, "{body}");
        assert!(body.contains(reason), "{body}");
    }
    // The answer never repeats the password, even from a line the parser could not read.
    file.write_text("[check]\nkind = \"postgres\"\npassword = \"hunter2-\\\"x\\q\"\n");
    let (code, body) = proxy.post("/reload").await;
    assert_eq!(code, 400, "{body}");
    assert!(
        body.contains("line 3") && !body.contains("hunter2"),
        "{body}"
    );
    // Settings that cannot even ask the leader (nothing answers on port 1) would take every
    // node down: refused before anything changes.
    file.write(&with_replicas.clone_with("check.port", "1"));
    let (code, body) = proxy.post("/reload").await;
    assert_eq!(code, 400, "{body}");
    assert!(
        body.contains("cannot check the current leader") && body.contains(&cluster.nodes[0].addr()),
        "{body}"
    );
    assert!(Client::connect(replicas, LONG).await.is_some());
    assert!(session.echo("after a refused reload").await);

    // A listener on a port something else holds refuses the whole reload.
    let squatter = std::net::TcpListener::bind("127.55.0.1:6002").expect("bind the squatter");
    file.write(
        &base
            .clone_with("check.interval", "\"300ms\"")
            .listener("name = \"taken\"\naddresses = [\"127.55.0.1:6002\"]"),
    );
    let (code, body) = proxy.post("/reload").await;
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("127.55.0.1:6002"), "{body}");
    assert!(
        Client::connect(replicas, LONG).await.is_some(),
        "the replica listener was not closed by the refused reload"
    );
    drop(squatter);

    // Back to the first file: the replica listener closes, the leader session stays.
    file.write(&base);
    let (code, body) = proxy.post("/reload").await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("closed replicas"), "{body}");
    assert!(
        eventually(LONG, || refused(replicas)).await,
        "the removed listener stops accepting"
    );
    assert!(session.echo("after the listener closed").await);
    let (code, body) = proxy.post("/reload").await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("nothing changed"), "{body}");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_that_moves_the_backends_drains_the_old_leader() {
    let cluster = Cluster::start(56, 2).await;
    cluster.nodes[0].role.set(RoleReply::leader());
    cluster.nodes[1].role.set(RoleReply::leader());
    cluster.nodes[1].backend.answer_probes();
    let file = ConfigFile::new("reload-backends");
    // Only node 0 is in the backend set at first (as a backup address, no DNS name).
    let only = |node: usize| {
        cluster
            .config()
            .set("admin.allow_changes", "true")
            .set("backends.dns_names", "[]")
            .set(
                "backends.backup",
                &format!("[\"{}\"]", cluster.nodes[node].addr()),
            )
    };
    file.write(&only(0));
    let proxy = RunningProxy::start_from_file(&file.0).await;
    let mut session = Client::connect(proxy.addr, LONG).await.expect("served");
    assert_eq!(session.tag, cluster.nodes[0].tag());

    let generation = proxy.status().await["route"]["generation"].clone();

    // Moving the route closes every session: refused unless forced.
    file.write(&only(1));
    let (code, body) = proxy.post("/reload").await;
    assert_eq!(code, 400, "{body}");
    let moves = format!(
        "the route would move from the current leader {} to {}",
        cluster.nodes[0].addr(),
        cluster.nodes[1].addr()
    );
    assert!(body.contains(&moves), "{body}");
    assert!(session.echo("after the refused reload").await);
    assert_eq!(proxy.status().await["route"]["generation"], generation);

    let (code, body) = proxy.post("/reload?force=true").await;
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains("backends") && body.contains("forced past") && body.contains(&moves),
        "{body}"
    );
    assert!(
        session.closed_within(LONG).await,
        "a session whose leader left the configuration is closed"
    );
    assert_eq!(
        Client::connect(proxy.addr, LONG).await.map(|c| c.tag),
        Some(cluster.nodes[1].tag())
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_whose_checks_would_unmake_the_leader_is_refused_unless_forced() {
    let cluster = Cluster::start(71, 1).await;
    let node = &cluster.nodes[0];
    node.role.set(RoleReply::leader());
    // With no route, a reload that routes to it again probes its Postgres first.
    node.backend.answer_probes();
    // The same node asked elsewhere: another port says replica, a Patroni-like one says 503.
    let replica_port = RoleEndpoint::start(SocketAddr::new(node.ip, 5501)).await;
    replica_port.set(RoleReply::replica());
    let patroni_port = RoleEndpoint::start(SocketAddr::new(node.ip, 5502)).await;
    patroni_port.set(RoleReply::status(503));
    let base = cluster.config().set("admin.allow_changes", "true");
    let file = ConfigFile::new("reload-unmake");
    file.write(&base);
    let proxy = RunningProxy::start_from_file(&file.0).await;
    let mut session = Client::connect(proxy.addr, LONG).await.expect("served");
    let generation = proxy.status().await["route"]["generation"].clone();

    // (new check settings, what the refusal says the leader answered)
    let unmaking = [
        (
            base.clone_with("check.leader", "[\"primary\"]"),
            "other (leader)",
        ),
        (base.clone_with("check.port", "5501"), "replica"),
        (
            base.clone_with("check.kind", "\"http-status\"")
                .set("check.port", "5502"),
            "neither primary nor replica",
        ),
    ];
    for (config, answered) in &unmaking {
        file.write(config);
        let (code, body) = proxy.post("/reload").await;
        assert_eq!(code, 400, "{body}");
        for words in [
            node.addr().as_str(),
            answered,
            "not leader",
            "POST /reload?force=true",
            "reload.force = true",
        ] {
            assert!(body.contains(words), "{words:?} in {body}");
        }
        assert!(session.echo("after a refused reload").await);
    }
    assert_eq!(proxy.status().await["route"]["generation"], generation);

    // Forced over HTTP: applied, and the leader's sessions close as the settings say.
    file.write(&unmaking[0].0);
    let (code, body) = proxy.post("/reload?force=true").await;
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains("forced past") && body.contains("other (leader)"),
        "{body}"
    );
    assert!(
        session.closed_within(LONG).await,
        "the forced settings unmade the leader"
    );

    // Back to the first settings (with no route there is no leader to protect), then forced
    // from the file, as a SIGHUP reload would be.
    file.write(&base);
    let (code, body) = proxy.post("/reload").await;
    assert_eq!(code, 200, "{body}");
    let mut session = Client::connect(proxy.addr, LONG)
        .await
        .expect("served again");
    file.write(&unmaking[1].0.clone_with("reload.force", "true"));
    let (code, body) = proxy.post("/reload").await;
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains("forced past") && body.contains("replica"),
        "{body}"
    );
    assert!(session.closed_within(LONG).await);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backends_reload_that_would_unroute_the_leader_is_refused_and_sessions_survive() {
    let spec = ClusterSpec {
        dns_ip: IpAddr::V4(Ipv4Addr::new(127, 81, 0, 1)),
        ..ClusterSpec::demo().with_ips((11..=12).map(|d| Ipv4Addr::new(127, 81, 0, d)))
    };
    let cluster = LocalCluster::start(spec).await.expect("cluster starts");
    let leader = cluster.pg_addr(0);
    let base = cluster
        .proxy_config("127.81.0.1")
        .set("admin.allow_changes", "true")
        .set("check.interval", "\"200ms\"")
        .set("check.fast_interval", "\"50ms\"");
    let file = ConfigFile::new("reload-unroute");
    file.write(&base);
    let proxy = RunningProxy::start_from_file(&file.0).await;
    assert!(proxy.wait_route(Some(&leader.to_string()), LONG).await);
    let session = connect(&conninfo(proxy.addr)).await.expect("a session");
    session.simple_query("SELECT 1").await.expect("served");
    let generation = proxy.status().await["route"]["generation"].clone();
    let backup_only = |addr: &str| {
        base.clone_with("backends.dns_names", "[]")
            .set("backends.backup", &format!("[\"{addr}\"]"))
    };
    // (new configuration, the data address the refusal names; none: applied)
    let reloads = [
        // Postgres on another port, where nothing listens: the role agent on :5500 still says
        // leader, so only the probe of the data address can tell.
        (
            base.clone_with("backends.port", "5999"),
            Some("127.81.0.11:5999"),
        ),
        // No DNS name, the leader as the backup: the same leader, so applied.
        (backup_only(&leader.to_string()), None),
        // Then the backup's port changed to a wrong one.
        (backup_only("127.81.0.11:5999"), Some("127.81.0.11:5999")),
    ];
    for (config, silent) in &reloads {
        file.write(config);
        let (code, body) = proxy.post("/reload").await;
        match silent {
            Some(address) => {
                assert_eq!(code, 400, "{body}");
                for words in [
                    format!("the leader's data address {address} does not answer"),
                    "POST /reload?force=true".to_string(),
                    "reload.force = true".to_string(),
                ] {
                    assert!(body.contains(&words), "{words:?} in {body}");
                }
            }
            None => assert_eq!(code, 200, "{body}"),
        }
        session
            .simple_query("SELECT 1")
            .await
            .expect("the session survives the reload");
        assert_eq!(proxy.status().await["route"]["generation"], generation);
    }

    // The last one, forced: applied.
    let (code, body) = proxy.post("/reload?force=true").await;
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains("forced past") && body.contains("127.81.0.11:5999 does not answer"),
        "{body}"
    );
    assert!(
        eventually(LONG, || async {
            session.simple_query("SELECT 1").await.is_err()
        })
        .await,
        "the forced reload moved the route, closing the session"
    );
    assert_ne!(proxy.status().await["route"]["generation"], generation);
    proxy.stop().await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_during_an_outage_is_applied_unless_its_leader_does_not_answer() {
    let cluster = Cluster::start(82, 1).await;
    let base = cluster.config().set("admin.allow_changes", "true");
    let file = ConfigFile::new("reload-outage");
    file.write(&base);
    let proxy = RunningProxy::start_from_file(&file.0).await;
    assert!(proxy.wait_no_route("all_replicas", LONG).await);

    // Nothing gets worse: applied.
    let extra: SocketAddr = "127.82.0.1:6001".parse().unwrap();
    let more = base
        .clone_with("check.interval", "\"300ms\"")
        .listener("name = \"extra\"\naddresses = [\"127.82.0.1:6001\"]");
    file.write(&more);
    let (code, body) = proxy.post("/reload").await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("opened extra"), "{body}");
    assert!(tokio::net::TcpStream::connect(extra).await.is_ok());

    // A backup whose role endpoint says leader, with nothing on its data address: routed, it
    // would turn waiting clients into failed connects.
    let ip = support::loopback(82, 0, 20);
    let role = RoleEndpoint::start(SocketAddr::new(ip, 5500)).await;
    role.set(RoleReply::leader());
    let with_backup = more.clone_with("backends.backup", "[\"127.82.0.20:5433\"]");
    file.write(&with_backup);
    let (code, body) = proxy.post("/reload").await;
    assert_eq!(code, 400, "{body}");
    assert!(
        body.contains("the leader's data address 127.82.0.20:5433 does not answer"),
        "{body}"
    );
    assert_eq!(proxy.route_leader().await, None);

    // Once Postgres answers there, the same file is applied and routes.
    let backend = TaggedBackend::start(SocketAddr::new(ip, 5433), "n20").await;
    backend.answer_probes();
    let (code, body) = proxy.post("/reload").await;
    assert_eq!(code, 200, "{body}");
    assert!(proxy.wait_route(Some("127.82.0.20:5433"), LONG).await);
    proxy.stop().await;
}

/// A proxy routing to the leader of a one-node cluster on `127.NET.0.0/24`, while it evaluates
/// a reload that adds a backup whose role endpoint never answers (`check.timeout = "1h"`).
struct Evaluating {
    cluster: Cluster,
    base: ConfigBuilder,
    file: ConfigFile,
    proxy: RunningProxy,
    hanging: RoleEndpoint,
}

async fn evaluating(
    net: u8,
) -> (
    Evaluating,
    impl std::future::Future<Output = Result<String, roleproxy::ReloadError>>,
) {
    let cluster = Cluster::start(net, 1).await;
    cluster.nodes[0].role.set(RoleReply::leader());
    let base = cluster.config();
    let file = ConfigFile::new(&format!("reload-evaluating-{net}"));
    file.write(&base);
    let proxy = RunningProxy::start_from_file(&file.0).await;
    assert!(proxy.wait_route(Some(&cluster.nodes[0].addr()), LONG).await);

    let ip = support::loopback(net, 0, 20);
    let hanging = RoleEndpoint::start(SocketAddr::new(ip, 5500)).await;
    hanging.set(RoleReply::Hang);
    file.write(
        &base
            .clone_with("backends.backup", &format!("[\"{ip}:5433\"]"))
            .set("check.timeout", "\"1h\""),
    );
    let outcome = proxy.reloader.ask(false).await.expect("asked");
    assert!(hanging.wait_requests(1, LONG).await, "the evaluation runs");
    let evaluating = Evaluating {
        cluster,
        base,
        file,
        proxy,
        hanging,
    };
    (evaluating, outcome)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_does_not_wait_for_a_reload_being_evaluated() {
    let (evaluating, outcome) = evaluating(83).await;

    // Stopped while the check still hangs: the evaluation was not waited for.
    evaluating.proxy.stop().await;
    assert!(
        matches!(outcome.await, Err(roleproxy::ReloadError::Stopped)),
        "the requester hears that the proxy stopped"
    );
    assert_eq!(evaluating.hanging.requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_asked_during_an_evaluation_are_answered_by_the_next_one() {
    let (
        Evaluating {
            cluster: _cluster,
            base,
            file,
            proxy,
            hanging,
        },
        first,
    ) = evaluating(84).await;

    // Two more, each with its own file, while the first is evaluated.
    let listener = |name: &str| {
        base.clone().listener(&format!(
            "name = \"{name}\"\naddresses = [\"127.84.0.1:0\"]"
        ))
    };
    file.write(&listener("early"));
    let second = proxy.reloader.ask(false).await.expect("asked");
    file.write(&listener("late"));
    let third = proxy.reloader.ask(false).await.expect("asked");

    // The hanging node goes away: its check fails, the first evaluation ends.
    hanging.stop().await;
    let first = first.await.expect("the first reload is applied");
    assert!(first.contains("backends"), "{first}");
    let (second, third) = (second.await, third.await);
    let second = second.expect("applied");
    assert_eq!(Ok(second.clone()), third.map_err(|e| e.to_string()));
    assert!(
        second.contains("opened late") && !second.contains("early"),
        "{second}"
    );
    let listeners = proxy.status().await["listeners"].clone();
    let names: Vec<&str> = listeners
        .as_array()
        .expect("listeners")
        .iter()
        .filter_map(|l| l["name"].as_str())
        .collect();
    assert_eq!(names, ["leader", "late"]);
    proxy.stop().await;
}
