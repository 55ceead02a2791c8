//! A planned switchover costs no transaction (routing rule 9), against real Postgres 15
//! (`LocalCluster`): when the leader steps down while alive (fenced, then demoted), each of its
//! unencrypted sessions ends at its next transaction boundary with `FATAL 57P01`; a transaction
//! still open when another node leads is cut; encrypted sessions and raw TCP sessions close at
//! once, as before. Each test asserts outcomes, never how fast.

use std::net::Ipv4Addr;
use std::process::Stdio;
use std::time::Duration;

use roleproxy_testkit::cluster::{ClusterSpec, LocalCluster};
use roleproxy_testkit::fake_cluster::FakeCluster;
use roleproxy_testkit::harness::{eventually, sessions_ended, Client, RunningProxy};
use roleproxy_testkit::role::RoleReply;
use roleproxy_testkit::transactions::{create_table, Session, Transactions};
use roleproxy_testkit::writer::connect;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio_postgres::error::SqlState;

const WAIT: Duration = Duration::from_secs(60);

fn spec(net: u8) -> ClusterSpec {
    ClusterSpec {
        name: format!("iad.net{net}.internal"),
        dns_ip: Ipv4Addr::new(127, net, 0, 1).into(),
        ..ClusterSpec::demo().with_ips((11..=13).map(|d| Ipv4Addr::new(127, net, 0, d)))
    }
}

/// Starts the cluster and roleproxy (with `settings` on top of the cluster's), creates the
/// table through the proxy and waits until every replica has it.
async fn start(spec: ClusterSpec, settings: &[(&str, &str)]) -> (LocalCluster, RunningProxy) {
    let listen = spec.dns_ip.to_string();
    let cluster = LocalCluster::start(spec).await.expect("cluster starts");
    // Clients use a listener named after the test's network: session counts are per
    // listener, for the whole process.
    let own = format!("name = \"{listen}\"\naddresses = [\"{listen}:0\"]");
    let config = settings
        .iter()
        .fold(
            cluster.proxy_config(&listen).listener(&own),
            |c, (key, value)| c.set(key, value),
        )
        .config();
    let proxy = RunningProxy::start(config).await;
    let leader = cluster.pg_addr(0).to_string();
    assert!(
        proxy.wait_route(Some(&leader), WAIT).await,
        "routes to node 0"
    );
    create_table(&cluster, &conninfo(&proxy, "setup"), WAIT).await;
    (cluster, proxy)
}

fn conninfo(proxy: &RunningProxy, application: &str) -> String {
    let addr = own_listener(proxy);
    format!(
        "host={} port={} user=postgres dbname=postgres connect_timeout=60 application_name={application}",
        addr.ip(),
        addr.port()
    )
}

/// The listener [`start`] adds, named after the address it listens on.
fn own_listener(proxy: &RunningProxy) -> std::net::SocketAddr {
    proxy.listener(&proxy.addr.ip().to_string())
}

fn ip(cluster: &LocalCluster, i: usize) -> String {
    cluster.pg_addr(i).ip().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchover_under_transactions_costs_no_transaction() {
    // The switchover waits one check interval plus the grace (half an interval) between
    // fencing and demoting, as `docs/how-it-works.md` asks of a planned switchover.
    let spec = ClusterSpec {
        fence_wait: Duration::from_millis(1500),
        ..spec(130)
    };
    let (cluster, proxy) = start(spec, &[("check.interval", "\"1s\"")]).await;
    let at_boundary = sessions_ended(&proxy.addr.ip().to_string(), "transaction_end");
    let before = proxy.metric(&at_boundary).await;
    let clients = Transactions::start(&conninfo(&proxy, "tx"), 8, Duration::from_millis(300));
    let old = ip(&cluster, 0);
    let on = |server: String| {
        let clients = &clients;
        move || {
            let server = server.clone();
            async move { clients.outcome().committed_on(&server) >= 8 }
        }
    };
    assert!(eventually(WAIT, on(old)).await, "transactions on node 0");

    let switch = cluster.switchover().await.expect("switchover");
    let new = ip(&cluster, switch.new);
    assert!(
        eventually(WAIT, on(new)).await,
        "transactions on the new leader"
    );
    let outcome = clients.stop().await;

    outcome.assert_every_session_ended_between_transactions();
    let ended = outcome.between();
    assert!(
        !ended.is_empty(),
        "the sessions on the old leader were ended (8 clients were on it)"
    );
    let counted = proxy.metric(&at_boundary).await - before;
    assert!(
        counted >= ended.len() as f64,
        "each session ended between transactions is counted: {counted} of {}",
        ended.len()
    );

    // Every committed row is on the new leader.
    assert!(!outcome.committed.is_empty(), "transactions committed");
    let leader = connect(&cluster.conninfo(switch.new))
        .await
        .expect("new leader");
    let missing = outcome.missing_on(&leader).await;
    assert!(
        missing.is_empty(),
        "rows committed but not on the new leader: {missing:?}"
    );
    // The old leader is a read-only primary now: promoting it says to restore it first.
    let refused = cluster
        .promote(switch.old)
        .await
        .expect_err("only a replica can be promoted");
    assert!(
        refused.to_string().contains("run `restore` first"),
        "{refused}"
    );
    proxy.stop().await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_open_when_another_node_leads_is_cut() {
    let (cluster, proxy) = start(
        spec(131),
        &[
            ("proxy.switchover_grace", "\"10m\""),
            ("check.interval", "\"1s\""),
        ],
    )
    .await;
    let open = connect(&conninfo(&proxy, "open-tx"))
        .await
        .expect("session");
    open.batch_execute("BEGIN; INSERT INTO txs VALUES (99, 1, 'open')")
        .await
        .expect("transaction open on node 0");

    let switch = cluster.switchover().await.expect("switchover");
    let new = cluster.pg_addr(switch.new).to_string();
    assert!(
        proxy.wait_route(Some(&new), WAIT).await,
        "routes to the new leader"
    );
    let old_node = connect(&cluster.conninfo(0)).await.expect("old leader");
    let gone = eventually(WAIT, || async {
        old_node
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'open-tx'",
                &[],
            )
            .await
            .is_ok_and(|row| row.get::<_, i64>(0) == 0)
    })
    .await;
    assert!(
        gone,
        "the session was cut once another node led, grace or not"
    );
    assert!(
        open.batch_execute("COMMIT").await.is_err(),
        "its COMMIT cannot reach any node"
    );
    for i in [0, switch.new] {
        let node = connect(&cluster.conninfo(i)).await.expect("node");
        let row = node
            .query_one("SELECT count(*) FROM txs WHERE client = 99", &[])
            .await
            .expect("count");
        assert_eq!(row.get::<_, i64>(0), 0, "the cut transaction is on no node");
    }
    proxy.stop().await;
    cluster.shutdown().await;
}

/// While the leader is stepped down and nobody else leads: a plain session in a transaction
/// stays until its COMMIT, then ends with 57P01; a plain idle session ends at once with
/// 57P01; a TLS session cannot be followed and is closed at once, as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stepped_down_leader_keeps_transactions_to_their_end_but_not_tls_sessions() {
    let spec = ClusterSpec {
        tls: true,
        ..spec(132)
    };
    let (cluster, proxy) = start(spec, &[("proxy.switchover_grace", "\"10m\"")]).await;
    let in_tx = Session::open(&conninfo(&proxy, "plain-tx"))
        .await
        .expect("plain session");
    in_tx
        .client
        .batch_execute("BEGIN; INSERT INTO txs VALUES (7, 1, 'plain')")
        .await
        .expect("transaction open");
    let idle = Session::open(&conninfo(&proxy, "plain-idle"))
        .await
        .expect("idle session");
    idle.client.batch_execute("SELECT 1").await.expect("query");

    let mut psql = tokio::process::Command::new("psql")
        .arg(format!("{} sslmode=require", conninfo(&proxy, "tls-tx")))
        .args(["-X", "-q", "-At"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("psql runs");
    let mut stdin = psql.stdin.take().expect("psql stdin");
    let mut stdout = BufReader::new(psql.stdout.take().expect("psql stdout")).lines();
    stdin
        .write_all(b"BEGIN;\nSELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid();\n")
        .await
        .expect("psql input");
    let ssl = tokio::time::timeout(WAIT, stdout.next_line()).await;
    assert!(
        matches!(ssl, Ok(Ok(Some(ref line))) if line == "t"),
        "the psql session is TLS: {ssl:?}"
    );

    cluster.fence(0).expect("fence node 0");
    let stepped_down = proxy.wait_no_route("stepped_down", WAIT).await;
    assert!(stepped_down, "{}", proxy.status().await);

    let node = connect(&cluster.conninfo(0)).await.expect("node 0");
    let sessions = || async {
        node.query_one(
            "SELECT count(*) FILTER (WHERE application_name = 'plain-tx'),
                    count(*) FILTER (WHERE application_name = 'plain-idle'),
                    count(*) FILTER (WHERE application_name = 'tls-tx')
             FROM pg_stat_activity",
            &[],
        )
        .await
        .map(|row| {
            (
                row.get::<_, i64>(0),
                row.get::<_, i64>(1),
                row.get::<_, i64>(2),
            )
        })
        .unwrap_or((-1, -1, -1))
    };
    let closed = eventually(WAIT, || async { matches!(sessions().await, (_, 0, 0)) }).await;
    assert!(
        closed,
        "the idle and the TLS session are closed: {:?}",
        sessions().await
    );
    assert_eq!(
        sessions().await.0,
        1,
        "the session in a transaction is still open"
    );
    let route = proxy.status().await;
    assert_eq!(
        route["route"]["target"]["detail"]["reason"], "stepped_down",
        "and nobody else leads yet: {route}"
    );
    assert_eq!(idle.end().await, Some(SqlState::ADMIN_SHUTDOWN));

    in_tx
        .client
        .batch_execute("COMMIT")
        .await
        .expect("the transaction commits on the stepped-down leader");
    let tx_end = match tokio::time::timeout(WAIT, in_tx.connection).await {
        Ok(Ok(Err(e))) => e.code().cloned(),
        other => panic!("the session ended with an error: {other:?}"),
    };
    assert_eq!(
        tx_end,
        Some(SqlState::ADMIN_SHUTDOWN),
        "then ends with 57P01"
    );
    let row = node
        .query_one("SELECT count(*) FROM txs WHERE client = 7", &[])
        .await
        .expect("count");
    assert_eq!(row.get::<_, i64>(0), 1, "the committed row is on node 0");

    cluster.unfence(0).expect("unfence");
    let leader = cluster.pg_addr(0).to_string();
    assert!(
        proxy.wait_route(Some(&leader), WAIT).await,
        "node 0 leads again"
    );
    drop(stdin);
    let _ = psql.kill().await;
    proxy.stop().await;
    cluster.shutdown().await;
}

/// A raw TCP session (not Postgres) cannot be followed: when its leader steps down, it is
/// closed at once, as before, though nobody else leads yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_tcp_sessions_close_at_once_when_the_leader_steps_down() {
    let cluster = FakeCluster::start(135, 2).await;
    cluster.nodes[0].role.set(RoleReply::leader());
    let proxy = RunningProxy::start(
        cluster
            .config()
            .set("proxy.switchover_grace", "\"10m\"")
            .config(),
    )
    .await;
    let mut session = Client::connect(proxy.addr, WAIT).await.expect("served");
    assert!(session.echo("not postgres").await);

    cluster.nodes[0].role.set(RoleReply::replica());
    assert!(session.closed_within(WAIT).await, "closed at once");
    let status = proxy.status().await;
    assert_eq!(
        status["route"]["target"]["detail"]["reason"], "stepped_down",
        "nobody else leads: {status}"
    );
    proxy.stop().await;
}

/// Sessions already idle when the leader steps down (a fence-first switchover) end at once
/// with 57P01, not when `proxy.switchover_grace` runs out: with a 30 s grace, every one of them
/// is told before the switchover has even promoted the new leader. Idle here means a session
/// that never ran a statement, one that ran a simple and an extended query, and psql waiting
/// at its prompt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sessions_end_at_once_when_the_leader_steps_down() {
    let (cluster, proxy) = start(spec(133), &[("proxy.switchover_grace", "\"30s\"")]).await;
    let never = Session::open(&conninfo(&proxy, "never"))
        .await
        .expect("session");
    let queried = Session::open(&conninfo(&proxy, "queried"))
        .await
        .expect("session");
    queried
        .client
        .simple_query("SELECT 1")
        .await
        .expect("simple query");
    queried
        .client
        .query_one("SELECT $1::int", &[&1i32])
        .await
        .expect("extended query");
    let mut psql = tokio::process::Command::new("psql")
        .arg(conninfo(&proxy, "psql"))
        .args(["-X", "-q", "-At"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("psql runs");
    let mut stdin = psql.stdin.take().expect("psql stdin");
    let mut stdout = BufReader::new(psql.stdout.take().expect("psql stdout")).lines();
    let mut stderr = BufReader::new(psql.stderr.take().expect("psql stderr")).lines();
    stdin.write_all(b"SELECT 1;\n").await.expect("psql input");
    let one = tokio::time::timeout(WAIT, stdout.next_line()).await;
    assert!(matches!(one, Ok(Ok(Some(ref l))) if l == "1"), "{one:?}");

    let fenced = std::time::Instant::now();
    let switch = async {
        let switched = cluster.switchover().await.expect("switchover");
        (switched, std::time::Instant::now())
    };
    let told = |session: Session| async move {
        let code = session.end().await;
        (code, std::time::Instant::now())
    };
    let node = connect(&cluster.conninfo(0)).await.expect("node 0");
    let psql_told = async {
        // psql reads the server only when it runs a statement: wait for its backend to go,
        // then have it run one, which shows what it was told.
        let gone = eventually(WAIT, || async {
            node.query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'psql'",
                &[],
            )
            .await
            .is_ok_and(|row| row.get::<_, i64>(0) == 0)
        })
        .await;
        let at = std::time::Instant::now();
        assert!(gone, "psql's session ended");
        stdin.write_all(b"SELECT 2;\n").await.expect("psql input");
        let said = tokio::time::timeout(WAIT, stderr.next_line()).await;
        (said, at)
    };
    let ((switched, switched_at), (never, never_at), (queried, queried_at), (said, psql_at)) =
        tokio::join!(switch, told(never), told(queried), psql_told);
    assert_eq!(
        never,
        Some(SqlState::ADMIN_SHUTDOWN),
        "never queried: 57P01"
    );
    assert_eq!(queried, Some(SqlState::ADMIN_SHUTDOWN), "queried: 57P01");
    assert!(
        matches!(said, Ok(Ok(Some(ref line))) if line.contains("the leader moved")),
        "psql was told: {said:?}"
    );
    for (what, at) in [
        ("never", never_at),
        ("queried", queried_at),
        ("psql", psql_at),
    ] {
        assert!(
            at < switched_at,
            "{what}: told before the switchover promoted node {}",
            switched.new
        );
        eprintln!(
            "{what}: 57P01 {:.3} s after the fence",
            at.duration_since(fenced).as_secs_f64()
        );
    }
    drop(stdin);
    let _ = psql.kill().await;
    proxy.stop().await;
    cluster.shutdown().await;
}
