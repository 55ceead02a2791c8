//! The fault matrix's roleproxy rows, against real Postgres 15 (`LocalCluster`) and roleproxy
//! with its shipped defaults (routing rule 9: only a death or a demotion cuts a session):
//! a postmaster stalled for 10 s, a black-holed leader, a replica claiming `leader` for 2 s
//! and a host out of ephemeral ports. The benchmark (`cargo bench --bench compare --
//! --sections faults`) runs the same faults, longer, against HAProxy too.
//!
//! Every test runs in a network namespace of its own: its cluster has the loopback to itself,
//! and its iptables rules and port range never touch the host's. Each reports what it
//! measured on stderr and asserts outcomes, with timeouts that bound a hang.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use roleproxy_testkit::cluster::{ClusterSpec, LocalCluster};
use roleproxy_testkit::fault::{self, Blackhole, CheckRelays, PortShortage, Stalled};
use roleproxy_testkit::harness::{eventually, holds_for, runtime, ConfigBuilder, RunningProxy};
use roleproxy_testkit::writer::{self, LocalPort, Trickle, CREATE_TABLE};
use tokio::time::Instant;

const WAIT: Duration = Duration::from_secs(60);
/// Sessions kept open through each fault, each writing a row every [`PERIOD`].
const SESSIONS: usize = 4;
const PERIOD: Duration = Duration::from_millis(200);
/// How long a stopped session may take to finish its write in flight before it counts as hung.
const GRACE: Duration = Duration::from_secs(3);

/// Runs `body` on a runtime of its own, in a network namespace of its own.
fn in_own_namespace<F: Future>(body: impl FnOnce() -> F) -> F::Output {
    fault::own_network_namespace().expect("a network namespace (the tests run as root)");
    runtime().block_on(body())
}

/// A cluster on this namespace's loopback (node 0 leads) with [`CheckRelays`] in front of its
/// agents, and roleproxy with `config`'s changes to the shipped defaults; the `writes` table
/// exists on every node.
async fn start(
    config: impl FnOnce(ConfigBuilder) -> ConfigBuilder,
) -> (LocalCluster, CheckRelays, RunningProxy) {
    let cluster = LocalCluster::start(ClusterSpec::demo())
        .await
        .expect("cluster starts");
    let relays = CheckRelays::start(&cluster, fault::RELAY_PORT).await;
    let proxy = RunningProxy::start(config(cluster.proxy_config("127.0.0.1")).config()).await;
    let leader = cluster.pg_addr(0).to_string();
    assert!(
        proxy.wait_route(Some(&leader), WAIT).await,
        "routes to node 0"
    );
    writer::connect(&cluster.conninfo(0))
        .await
        .expect("leader")
        .batch_execute(CREATE_TABLE)
        .await
        .expect("create table");
    cluster.wait_replicas(WAIT).await.expect("replicas stream");
    (cluster, relays, proxy)
}

/// Sessions through the proxy, once every one of them has written.
async fn trickle(proxy: &RunningProxy, via: &str, port: LocalPort) -> Trickle {
    let sessions = Trickle::open(&writer::conninfo(proxy.addr), via, SESSIONS, PERIOD, port)
        .await
        .expect("sessions open through the proxy");
    let opened = Instant::now();
    assert!(
        eventually(WAIT, || async { sessions.moving_since(opened) }).await,
        "every session writes"
    );
    assert_eq!(sessions.cut(), 0, "and none was cut");
    sessions
}

/// Waits until a new client through the proxy is served by `server`.
async fn served_on(proxy: &RunningProxy, server: &str, port: LocalPort) {
    let conninfo = writer::conninfo(proxy.addr);
    let served = eventually(WAIT, || async {
        let client = writer::connect_with(&conninfo, port).await.ok()?;
        let row = client
            .query_one("SELECT host(inet_server_addr())", &[])
            .await
            .ok()?;
        (row.get::<_, String>(0) == server).then_some(())
    })
    .await;
    assert!(served.is_some(), "a new client is served by {server}");
}

/// Keeps sessions writing through a fault that must cut none of them: `inflict` starts it
/// and returns what ends it when dropped, after `hold`; the sessions are watched for `watch`
/// from the start. Then a new client must be served by the leader, node 0, and every session
/// must write again. `port` is how the clients pick their local ports.
async fn cuts_no_session<Fault>(
    label: &str,
    config: impl FnOnce(ConfigBuilder) -> ConfigBuilder,
    port: LocalPort,
    (hold, watch): (Duration, Duration),
    inflict: impl FnOnce(&LocalCluster, &CheckRelays) -> Fault,
) {
    let (cluster, relays, proxy) = start(config).await;
    let sessions = trickle(&proxy, label, port).await;

    let fault = inflict(&cluster, &relays);
    let started = Instant::now();
    let (_, held) = tokio::join!(
        async {
            // Not a wait for an event: the fault lasts this long.
            tokio::time::sleep(hold).await;
            drop(fault);
        },
        holds_for(watch, || async { sessions.cut() == 0 })
    );
    let ended = started + hold;
    served_on(&proxy, "127.0.0.11", port).await;
    eprintln!(
        "{label}: a new client was served {:?} after the fault ended",
        ended.elapsed()
    );
    assert!(
        eventually(WAIT, || async { sessions.moving_since(ended) }).await,
        "the sessions write again"
    );
    let log = sessions.stop(GRACE).await;
    let cuts: Vec<String> = log
        .cuts
        .iter()
        .map(|c| {
            format!(
                "session {} {:?} into the fault: {}",
                c.session,
                c.at - started,
                c.error
            )
        })
        .collect();
    eprintln!(
        "{label}: {} of {SESSIONS} sessions cut: {cuts:#?}",
        log.lost()
    );
    assert!(held, "no session was cut during the fault: {cuts:#?}");
    assert_eq!(
        log.lost(),
        0,
        "no session was cut: {cuts:#?} ({} hung)",
        log.hung
    );
    proxy.stop().await;
    cluster.shutdown().await;
}

#[test]
fn a_stalled_postmaster_cuts_no_session() {
    const STALL: Duration = Duration::from_secs(10);
    in_own_namespace(|| {
        cuts_no_session(
            "stalled postmaster",
            |c| c,
            LocalPort::Ephemeral,
            (STALL, STALL),
            |cluster, _| Stalled::postmaster(cluster.pg(), 0).expect("stop the postmaster"),
        )
    });
}

#[test]
fn a_stray_leader_answer_cuts_no_session() {
    const CLAIM: Duration = Duration::from_secs(2);
    /// How long after the claim began the sessions are watched: the claim, the checks that
    /// see it lapse, and slack.
    const WATCH: Duration = Duration::from_secs(10);
    in_own_namespace(|| {
        cuts_no_session(
            "stray leader answer",
            |c| c.set("check.port", &fault::RELAY_PORT.to_string()),
            LocalPort::Ephemeral,
            (CLAIM, WATCH),
            |_, relays| relays.claim(1),
        )
    });
}

#[test]
fn running_out_of_ephemeral_ports_cuts_no_session() {
    const SHORTAGE: Duration = Duration::from_secs(10);
    in_own_namespace(|| {
        cuts_no_session(
            "ephemeral ports exhausted",
            |c| c,
            LocalPort::Pinned,
            (SHORTAGE, SHORTAGE),
            |_, _| PortShortage::start().expect("use up the ephemeral ports"),
        )
    });
}

#[test]
fn a_black_holed_leader_is_left_and_its_sessions_closed() {
    /// Generous: it bounds a hang. The time taken is reported.
    const LEFT_WITHIN: Duration = Duration::from_secs(15);
    in_own_namespace(|| async {
        let (cluster, _relays, proxy) = start(|c| c).await;
        let sessions = trickle(&proxy, "hole", LocalPort::Ephemeral).await;

        let hole = Blackhole::node(cluster.pg_addr(0).ip()).expect("black-hole node 0");
        let holed = Instant::now();
        // What an HA manager does once the leader is unreachable: promote a replica.
        cluster.promote(1).await.expect("promote node 1");
        cluster.pg().follow(2, 1).expect("node 2 follows node 1");
        let promoted = Instant::now();
        let closed = eventually(LEFT_WITHIN, || async { sessions.cut() == SESSIONS }).await;
        served_on(&proxy, "127.0.0.12", LocalPort::Ephemeral).await;
        // An upper bound: the new client is tried once the sessions are closed.
        let served_after = promoted.elapsed();
        // The old leader dies before the network heals, so it never races the new one.
        cluster.kill(0).await.expect("kill node 0");
        drop(hole);
        let log = sessions.stop(GRACE).await;
        let last_closed = log.cuts.iter().map(|c| c.at - holed).max();
        eprintln!(
            "black-holed leader: {} of {SESSIONS} sessions closed, the last {last_closed:?} \
             after the fault; a new client was served on the new leader by {served_after:?} \
             after the promotion",
            log.cuts.len(),
        );
        assert!(
            closed,
            "every session on the black-holed leader is closed within {LEFT_WITHIN:?}: \
             {} cut, {} hung",
            log.cuts.len(),
            log.hung
        );
        assert!(
            log.cuts.iter().all(|c| c.at >= holed),
            "no session was cut before the fault"
        );
        proxy.stop().await;
        cluster.shutdown().await;
    });
}

#[test]
fn a_blackhole_drops_loopback_syns_and_goes_away_even_on_a_panic() {
    in_own_namespace(|| async {
        let node: IpAddr = "127.0.0.21".parse().unwrap();
        let listener = tokio::net::TcpListener::bind(SocketAddr::new(node, 5433))
            .await
            .expect("bind");
        let addr = listener.local_addr().unwrap();
        let connects = || async {
            tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr)).await
        };
        assert!(matches!(connects().await, Ok(Ok(_))), "reachable before");

        let hole = Blackhole::node(node).expect("black-hole it");
        assert!(
            connects().await.is_err(),
            "a connect hangs (dropped, neither refused nor reset)"
        );
        let chain = hole.chain().to_owned();
        assert!(iptables_rules().contains(&chain));
        drop(hole);
        assert!(!iptables_rules().contains(&chain), "{}", iptables_rules());
        assert!(matches!(connects().await, Ok(Ok(_))), "reachable after");

        // A test that panics mid-fault unwinds through the hole's drop.
        let panicked = std::thread::spawn(move || {
            let _hole = Blackhole::node(node).expect("black-hole it");
            panic!("a test fails mid-fault");
        })
        .join();
        assert!(panicked.is_err());
        assert!(!iptables_rules().contains("RP-BH-"), "{}", iptables_rules());
        assert!(
            matches!(connects().await, Ok(Ok(_))),
            "reachable after the panic"
        );
    });
}

#[test]
fn a_port_shortage_fails_kernel_picked_ports_only_and_only_in_its_namespace() {
    assert!(
        PortShortage::start().is_err(),
        "refused in the host's namespace"
    );
    in_own_namespace(|| async {
        let listener = std::net::TcpListener::bind("127.0.0.21:5433").expect("bind");
        let addr = listener.local_addr().unwrap();
        let shortage = PortShortage::start().expect("shortage");
        let refused = std::net::TcpStream::connect(addr).expect_err("no port for the kernel");
        assert_eq!(refused.kind(), std::io::ErrorKind::AddrNotAvailable);
        drop(shortage);
        std::net::TcpStream::connect(addr).expect("ports again");
    });
}

fn iptables_rules() -> String {
    let out = std::process::Command::new("iptables")
        .args(["-w", "-S"])
        .output()
        .expect("iptables runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}
