//! Faults and hostile input, each asserting what roleproxy did: backends that reset or never
//! answer, role endpoints that flap or trickle, DNS that changes on every query, clients that
//! send garbage, stop reading or vanish, and running out of file descriptors.

use std::net::SocketAddr;
use std::time::Duration;

use roleproxy_testkit as support;
use support::fake_cluster::{echo_session, echoes, served_by, FakeCluster, NAME};
use support::harness::{
    eventually, postgres_refusal, sessions_ended, wait_served, Client, ProxyProcess, RunningProxy,
};
use support::loopback;
use support::role::RoleReply;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const LONG: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_resets_mid_stream_ends_only_its_session() {
    // A node whose "Postgres" sends a few bytes and then resets the connection.
    let ip = loopback(40, 0, 11);
    let dns = support::dns::DnsServer::start(loopback(40, 0, 1)).await;
    dns.set(NAME, vec![ip]);
    let role = support::role::RoleEndpoint::start(SocketAddr::new(ip, 5500)).await;
    role.set(RoleReply::leader());
    let backend = TcpListener::bind(SocketAddr::new(ip, 5433)).await.unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = backend.accept().await {
            let _ = stream.write_all(b"partial").await;
            // Not a wait: the crash comes a moment after the bytes, as it would on a real
            // server, rather than racing them to the proxy.
            tokio::time::sleep(Duration::from_millis(100)).await;
            // Linger 0: close sends RST, as a crashing server's kernel would.
            let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
            drop(stream);
        }
    });
    // A listener of this test's own: session counts are per listener, for the whole process.
    let config = support::harness::ConfigBuilder::new("127.40.0.1", dns.addr(), NAME)
        .listener("name = \"reset\"\naddresses = [\"127.40.0.1:0\"]")
        .config();
    let proxy = RunningProxy::start(config).await;
    let ended = || async {
        proxy.metric(&sessions_ended("reset", "error")).await
            + proxy.metric(&sessions_ended("reset", "closed")).await
    };
    let before = ended().await;

    for _ in 0..3 {
        let mut client = TcpStream::connect(proxy.listener("reset")).await.unwrap();
        client
            .write_all(&support::harness::startup_packet())
            .await
            .unwrap();
        let mut got = Vec::new();
        let ended = tokio::time::timeout(LONG, async {
            let mut buf = [0u8; 64];
            loop {
                match client.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
        })
        .await;
        assert!(
            ended.is_ok(),
            "the client's session ends with the backend's"
        );
        assert_eq!(got, b"partial", "bytes before the reset were delivered");
    }
    assert!(
        eventually(LONG, || async { ended().await == before + 3.0 }).await,
        "each session ends as closed or error: {}",
        ended().await
    );
    assert_eq!(proxy.get("/healthz").await.0, 200, "the proxy carries on");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_black_holed_leader_gets_a_clear_error_and_is_not_routed_while_silent() {
    let cluster = FakeCluster::start(41, 0).await;
    // A "node" whose listener has a full accept queue: SYNs are dropped, so a connect hangs,
    // as to a host that vanished. Its role endpoint still says leader.
    let ip = loopback(41, 0, 11);
    let hole = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    hole.set_reuse_address(true).unwrap();
    hole.bind(&SocketAddr::new(ip, 5433).into()).unwrap();
    hole.listen(0).unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        let connect = TcpStream::connect(SocketAddr::new(ip, 5433));
        if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_millis(300), connect).await {
            fillers.push(s);
        }
    }
    let role = support::role::RoleEndpoint::start(SocketAddr::new(ip, 5500)).await;
    role.set(RoleReply::leader());
    cluster.dns.set(NAME, vec![ip]);
    let config = cluster
        .config()
        .set("proxy.connect_timeout", "\"300ms\"")
        .set("proxy.connect_retries", "1")
        .set("proxy.leader_wait", "\"2s\"")
        .set("check.probe_timeout", "\"700ms\"")
        .config();
    let proxy = RunningProxy::start(config).await;
    let black_holed = SocketAddr::new(ip, 5433).to_string();
    assert!(proxy.wait_route(Some(&black_holed), LONG).await);

    let (code, message) = postgres_refusal(proxy.addr, false).await;
    assert_eq!(code, "57P03");
    assert!(
        message.contains("timed out") || message.contains("Postgres port fails"),
        "{message}"
    );
    // A failed connect is followed by a probe of the leader's Postgres; the probe's own short
    // timeout gets no handshake, and with no bytes from any session to say it lives, the port
    // fails: the node is not routed, whatever its role endpoint says, and the route says why.
    let silent = |status: serde_json::Value| {
        status["backends"]
            .as_array()
            .and_then(|b| b.iter().find(|b| b["address"] == black_holed))
            .and_then(|b| b["data_port"]["error"].as_str())
            .is_some_and(|e| e.contains("no TCP handshake within 700ms"))
    };
    assert!(
        support::harness::eventually(LONG, || async { silent(proxy.status().await) }).await,
        "{}",
        proxy.status().await
    );
    let (code, message) = postgres_refusal(proxy.addr, false).await;
    assert_eq!(code, "57P03");
    assert!(
        message.contains("Postgres port fails")
            && message.contains("no TCP handshake within 700ms"),
        "{message}"
    );
    // Its `leader` answers do not route it again while the port stays silent: each one is
    // followed by a probe, and each probe counts.
    let silent_probes = || async {
        let (_, metrics) = proxy.get("/metrics").await;
        let series = format!(
            "roleproxy_postgres_probes_total{{backend=\"{black_holed}\",result=\"silent\"}} "
        );
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(series.as_str())?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let before = silent_probes().await;
    assert!(
        support::harness::eventually(LONG, || async { silent_probes().await > before }).await,
        "probed again"
    );
    assert_eq!(proxy.route_leader().await, None, "still not routed");
    drop(fillers);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_role_endpoint_does_not_move_the_route() {
    let cluster = FakeCluster::start(42, 2).await;
    // A leader whose Postgres is alive (full, answering 53300) and whose role endpoint fails
    // every other check. Rule 7: each failed check is followed by a probe that finds Postgres
    // alive, so nothing counts toward `fall` and the route stays.
    let node = cluster.full_node(13).await;
    let role = &node.role;
    cluster.dns.set(NAME, vec![node.ip, cluster.nodes[1].ip]);
    let config = cluster
        .config()
        .set("check.interval", "\"100ms\"")
        .set("check.fast_interval", "\"50ms\"")
        .set("check.fall", "2")
        .config();
    let proxy = RunningProxy::start(config).await;
    let leader = node.addr();
    assert!(proxy.wait_route(Some(&leader), LONG).await);
    let mut session = echo_session(proxy.addr).await.expect("served");
    let before = proxy.generation().await;
    let alive = format!("roleproxy_postgres_probes_total{{backend=\"{leader}\",result=\"alive\"}}");
    let alive_before = proxy.metric(&alive).await;

    let seen = role.requests();
    role.set(RoleReply::Cycle(vec![
        RoleReply::error(500, "flap"),
        RoleReply::leader(),
    ]));
    assert!(role.wait_requests(seen + 20, LONG).await);
    assert_eq!(
        proxy.generation().await,
        before,
        "the route held through the flapping"
    );
    assert!(echoes(&mut session, b"still here").await);
    assert!(
        proxy.metric(&alive).await > alive_before,
        "the failed checks were followed by probes that found Postgres alive"
    );

    // A node flapping leader/replica is never routed when two leader answers are required.
    role.set(RoleReply::replica());
    cluster.nodes[1].role.set(RoleReply::Cycle(vec![
        RoleReply::leader(),
        RoleReply::replica(),
    ]));
    proxy.stop().await;
    let config = cluster
        .config()
        .set("check.rise", "2")
        .set("check.interval", "\"100ms\"")
        .config();
    let proxy = RunningProxy::start(config).await;
    let seen = cluster.nodes[1].role.requests();
    let window = Duration::from_secs(3);
    let client = tokio::spawn(Client::connect(proxy.addr, window));
    assert!(
        support::harness::holds_for(window, || async { proxy.route_leader().await.is_none() })
            .await,
        "never two leader answers in a row, so never routed"
    );
    assert!(
        cluster.nodes[1].role.requests() >= seen + 20,
        "the node flapped through at least 20 checks"
    );
    let served = client.await.expect("the client task").map(|c| c.tag);
    assert_eq!(served, None, "the waiting client was never served");
    assert_eq!(cluster.nodes[1].backend.connections(), 0);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_endpoint_that_trickles_bytes_is_judged_by_the_whole_check_timeout() {
    let cluster = FakeCluster::start(43, 2).await;
    // ~100 bytes at 10 ms each: about a second for the whole answer.
    cluster.nodes[0]
        .role
        .set(RoleReply::SlowBytes(Duration::from_millis(10)));
    let patient = cluster.config().set("check.timeout", "\"5s\"").config();
    let proxy = RunningProxy::start(patient).await;
    assert!(proxy.wait_route(Some(&cluster.nodes[0].addr()), LONG).await);
    proxy.stop().await;

    let strict = cluster.config().set("check.timeout", "\"300ms\"").config();
    let checks = cluster.nodes[0].role.requests();
    let proxy = RunningProxy::start(strict).await;
    // Three checks have begun, so the first two have ended, each cut off mid-trickle.
    assert!(cluster.nodes[0].role.wait_requests(checks + 3, LONG).await);
    assert_eq!(
        proxy.route_leader().await,
        None,
        "a trickle past the timeout is not an answer"
    );
    let status = proxy.status().await;
    assert!(status.to_string().contains("timed out"), "{status}");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_answers_that_change_on_every_query_never_drain_the_leader() {
    let cluster = FakeCluster::start(44, 3).await;
    cluster.nodes[0].role.set(RoleReply::leader());
    let config = cluster
        .config()
        .set("backends.resolve_interval", "\"50ms\"")
        .config();
    let proxy = RunningProxy::start(config).await;
    let mut session = Client::connect(proxy.addr, LONG).await.expect("served");
    let before = proxy.generation().await;

    cluster
        .dns
        .set_rotating(NAME, cluster.nodes.iter().map(|n| n.ip).collect());
    let queries = cluster.dns.queries();
    assert!(
        support::harness::eventually(LONG, || async { cluster.dns.queries() > queries + 60 }).await,
        "DNS was asked 60 more times, each answer a different set"
    );
    // The leader came and went from the answers; its sessions held and nothing else was routed.
    assert_eq!(proxy.generation().await, before);
    assert!(session.echo("through the churn").await);
    assert_eq!(
        served_by(&proxy, LONG).await,
        Some(cluster.nodes[0].tag()),
        "a new client still reaches the leader"
    );
    for node in &cluster.nodes[1..] {
        assert_eq!(node.backend.connections(), 0, "nothing reached a replica");
    }
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_clients_do_not_hurt_others() {
    let cluster = FakeCluster::start(45, 1).await;
    let config = cluster
        .config()
        .set("proxy.leader_wait", "\"500ms\"")
        .config();
    let proxy = RunningProxy::start(config).await;

    // No route: garbage instead of a startup packet still gets an ErrorResponse.
    let mut garbage = TcpStream::connect(proxy.addr).await.unwrap();
    garbage.write_all(&[0xff; 64]).await.unwrap();
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(LONG, garbage.read_to_end(&mut reply)).await;
    assert_eq!(reply.first(), Some(&b'E'), "{reply:?}");

    // Clients that vanish mid-handshake.
    for _ in 0..20 {
        let mut c = TcpStream::connect(proxy.addr).await.unwrap();
        let _ = c.write_all(&[0, 0, 0, 8, 4]).await;
    }

    // Now a leader: a client that never reads while its backend echoes a flood.
    cluster.nodes[0].role.set(RoleReply::leader());
    let mut stalled = Client::connect(proxy.addr, LONG).await.expect("served");
    let flood = vec![b'x'; 1 << 20];
    let writer = tokio::spawn(async move {
        // Stops when the socket buffers on every hop are full: back-pressure, not memory.
        // Linux autotunes each receive buffer up to net.ipv4.tcp_rmem's maximum (32 MiB on
        // these machines), so the hops between here and the backend and back can hold well
        // over 100 MiB; 1 GiB without a stall would mean something grows without bound.
        for i in 0..1024 {
            let write = stalled.reader.get_mut().write_all(&flood);
            match tokio::time::timeout(Duration::from_secs(2), write).await {
                Err(_) => return Ok(i),
                Ok(Err(e)) => return Err(format!("the session broke after {i} MiB: {e}")),
                Ok(Ok(())) => {}
            }
        }
        Err("1 GiB went in without the writer ever waiting".to_string())
    });
    let accepted = writer.await.unwrap();
    assert!(
        accepted.is_ok(),
        "a client that stops reading is back-pressured: {accepted:?}"
    );
    for _ in 0..5 {
        assert_eq!(served_by(&proxy, LONG).await, Some(cluster.nodes[0].tag()));
    }
    proxy.stop().await;
}

#[test]
fn running_out_of_descriptors_refuses_new_clients_and_keeps_sessions() {
    let runtime = roleproxy_testkit::harness::runtime();
    runtime.block_on(async {
        let cluster = FakeCluster::start(46, 1).await;
        cluster.nodes[0].role.set(RoleReply::leader());
        let config = cluster
            .config()
            .set("listen.addresses", "[\"127.46.0.1:25460\"]")
            .set("admin.address", "\"127.46.0.1:25461\"")
            .toml();
        let _proxy = ProxyProcess::start(
            env!("CARGO_BIN_EXE_roleproxy"),
            &config,
            "fds",
            "error",
            Some(64),
        );
        let addr: SocketAddr = "127.46.0.1:25460".parse().unwrap();
        drop(wait_served(addr).await);

        // Fill it up like real clients that send their StartupMessage at once; each session
        // costs the proxy two descriptors. The first client it cannot serve is told why.
        let packet = support::harness::startup_packet();
        let mut sessions = Vec::new();
        let mut refusal = None;
        let mut waiting: Option<TcpStream> = None;
        for _ in 0..60 {
            let Ok(mut stream) = TcpStream::connect(addr).await else {
                // Not a wait: a connect the kernel refused is one of the attempts; pause as a
                // client would before the next.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            stream.write_all(&packet).await.unwrap();
            let mut first = [0u8; 1];
            let read =
                tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut first)).await;
            if !matches!(read, Ok(Ok(_))) {
                waiting = Some(stream);
                break;
            }
            if first[0] == b'n' {
                // The backend's tag line, then its echo of the startup packet: a session.
                let mut rest = vec![0u8; 3 + packet.len()];
                stream.read_exact(&mut rest).await.unwrap();
                sessions.push(stream);
            } else {
                let mut reply = first.to_vec();
                let _ = tokio::time::timeout(LONG, stream.read_to_end(&mut reply)).await;
                refusal = Some(reply);
                break;
            }
        }
        assert!(
            sessions.len() > 5,
            "some sessions were served: {}",
            sessions.len()
        );
        // The first client that could not be served is told why, as Postgres would.
        assert!(
            waiting.is_none(),
            "a client was left waiting without an answer"
        );
        let reply = refusal.expect("a client was refused once descriptors ran out");
        let text = String::from_utf8_lossy(&reply);
        assert_eq!(reply.first(), Some(&b'E'), "{text}");
        assert!(
            text.contains("C53300") && text.contains("too many clients"),
            "{text}"
        );

        // Existing sessions carry on.
        for s in sessions.iter_mut().take(3) {
            s.write_all(b"ping\n").await.unwrap();
            let mut echo = [0u8; 5];
            tokio::time::timeout(LONG, s.read_exact(&mut echo))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(&echo, b"ping\n");
        }
        // Descriptors free up: new clients are served again.
        sessions.truncate(sessions.len() / 2);
        assert!(
            support::harness::eventually(LONG, || async {
                Client::connect(addr, Duration::from_secs(2))
                    .await
                    .is_some()
            })
            .await,
            "recovered once descriptors were free"
        );
    });
}
