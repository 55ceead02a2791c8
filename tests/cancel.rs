//! A CancelRequest on a replica listener reaches the backend running the query, against a real
//! three-node Postgres 15 cluster (two replicas): in a plaintext session, by the key the proxy
//! saw that backend send; in a TLS session, whose key the proxy cannot see, by sending it to
//! every replica.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use roleproxy_testkit::cluster::{ClusterSpec, LocalCluster};
use roleproxy_testkit::harness::{eventually, RunningProxy};
use roleproxy_testkit::writer::connect;
use tokio_postgres::NoTls;

const WAIT: Duration = Duration::from_secs(60);
const SLEEP: &str = "SELECT pg_sleep(60)";

/// Which node runs `SELECT pg_sleep(60)` now, and whether over TLS.
async fn sleeping_on(cluster: &LocalCluster) -> Option<(usize, bool)> {
    for i in 0..cluster.len() {
        let Ok(node) = connect(&cluster.conninfo(i)).await else {
            continue;
        };
        let found = node
            .query_opt(
                "SELECT coalesce(s.ssl, false) FROM pg_stat_activity a \
                 LEFT JOIN pg_stat_ssl s USING (pid) \
                 WHERE a.state = 'active' AND a.query = $1",
                &[&SLEEP],
            )
            .await;
        if let Ok(Some(row)) = found {
            return Some((i, row.get(0)));
        }
    }
    None
}

async fn cancels(proxy: &RunningProxy, sent_to: &str) -> f64 {
    proxy
        .metric(&format!(
            "roleproxy_cancel_requests_total{{sent_to=\"{sent_to}\"}}"
        ))
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_on_a_replica_listener_reaches_the_replica_running_the_query() {
    let spec = ClusterSpec {
        name: "iad.net164.internal".to_owned(),
        dns_ip: Ipv4Addr::new(127, 164, 0, 1).into(),
        tls: true,
        ..ClusterSpec::demo().with_ips((11..=13).map(|d| Ipv4Addr::new(127, 164, 0, d)))
    };
    let cluster = LocalCluster::start(spec).await.expect("cluster starts");
    let config = cluster
        .proxy_config("127.164.0.1")
        .listener("name = \"replicas\"\naddresses = [\"127.164.0.1:0\"]\nserves = \"replica\"")
        .config();
    let proxy = RunningProxy::start(config).await;
    let leader = cluster.pg_addr(0).to_string();
    assert!(
        proxy.wait_route(Some(&leader), WAIT).await,
        "routes to node 0"
    );
    for i in [1, 2] {
        let series = format!(
            "roleproxy_backend_role{{backend=\"{}\",role=\"replica\"}}",
            cluster.pg_addr(i)
        );
        assert!(
            eventually(WAIT, || async { proxy.metric(&series).await == 1.0 }).await,
            "node {i} checks as replica"
        );
    }
    let replicas: SocketAddr = proxy.listener("replicas");

    // Plaintext: the proxy saw the backend's key, and sends the cancel there alone. With one
    // session on one replica, the least-loaded replica is the other one.
    let before = cancels(&proxy, "session_backend").await;
    let conninfo = format!(
        "host={} port={} user=postgres dbname=postgres connect_timeout=60",
        replicas.ip(),
        replicas.port()
    );
    let client = connect(&conninfo).await.expect("a replica session");
    let token = client.cancel_token();
    let sleeping = tokio::spawn(async move { client.simple_query(SLEEP).await });
    let running = eventually(WAIT, || sleeping_on(&cluster)).await;
    let (node, tls) = running.expect("the query runs on a replica");
    assert!(node != 0 && !tls, "on replica {node}, in the clear");
    token
        .cancel_query(NoTls)
        .await
        .expect("cancel request sent to the proxy's replica listener");
    let ended = tokio::time::timeout(WAIT, sleeping)
        .await
        .expect("the query ends long before pg_sleep(60) would")
        .expect("query task");
    let error = ended.expect_err("the query was cancelled");
    assert_eq!(
        error.code(),
        Some(&tokio_postgres::error::SqlState::QUERY_CANCELED),
        "{error:?}"
    );
    assert_eq!(
        cancels(&proxy, "session_backend").await - before,
        1.0,
        "sent to the session's own backend"
    );

    // TLS: the key is inside the encryption; psql cancels on SIGINT with a plaintext
    // CancelRequest to the same listener, which sends it to every replica.
    let before = cancels(&proxy, "every_replica").await;
    let mut psql = std::process::Command::new("psql")
        .arg(format!(
            "host={} port={} user=postgres dbname=postgres sslmode=require",
            replicas.ip(),
            replicas.port()
        ))
        .args(["-Atc", SLEEP])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("psql runs");
    let running = eventually(WAIT, || sleeping_on(&cluster)).await;
    let (node, tls) = running.expect("the query runs on a replica");
    assert!(node != 0 && tls, "on replica {node}, over TLS");
    // SAFETY: kill with a valid signal number has no memory effects.
    let sent = unsafe { libc::kill(psql.id() as libc::pid_t, libc::SIGINT) };
    assert_eq!(sent, 0, "SIGINT to psql");
    let output = tokio::task::spawn_blocking(move || {
        let mut stderr = String::new();
        if let Some(mut pipe) = psql.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
        }
        (psql.wait(), stderr)
    });
    let (status, stderr) = tokio::time::timeout(WAIT, output)
        .await
        .expect("psql ends long before pg_sleep(60) would")
        .expect("psql thread");
    assert!(!status.expect("psql exit").success());
    assert!(
        stderr.contains("canceling statement due to user request"),
        "the query was cancelled: {stderr}"
    );
    assert_eq!(
        cancels(&proxy, "every_replica").await - before,
        1.0,
        "an unknown key goes to every replica"
    );
    proxy.stop().await;
    cluster.shutdown().await;
}
