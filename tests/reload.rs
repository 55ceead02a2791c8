//! Live reload on real sockets: `POST /reload` is off unless the config allows it; a reload
//! opens and closes listeners, keeps sessions whose leader is unchanged, and an invalid file
//! (or a taken port) is refused with the reason while the old configuration keeps running.

use roleproxy_testkit as support;

use std::net::SocketAddr;
use std::time::Duration;

use support::fake_cluster::FakeCluster as Cluster;
use support::harness::{eventually, Client, ConfigFile, RunningProxy};
use support::role::{RoleEndpoint, RoleReply};

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

    file.write(&only(1));
    let (code, body) = proxy.post("/reload").await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("backends"), "{body}");
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
