//! The role agent against a real two-node streaming-replication cluster: it must report the
//! primary as `leader`, the standby as `replica`, follow a promotion, and answer 500 for a
//! node whose Postgres is down.

use roleproxy_testkit as support;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use roleproxy::agent::{serve, AgentError};
use support::pg::PgCluster;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const NODE0: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 61);
const NODE1: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 62);
const PG_PORT: u16 = 5433;

/// A running agent: its address and what it takes to stop it.
struct Agent {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), AgentError>>,
}

impl Agent {
    async fn start(ip: Ipv4Addr, postgres: String) -> Agent {
        let listener = TcpListener::bind((ip, 0))
            .await
            .expect("bind agent listener");
        let addr = listener.local_addr().expect("agent listener address");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, postgres, async {
            let _ = stopped.await;
        }));
        Agent { addr, stop, task }
    }

    /// `GET /flycheck/role` → (status, body).
    async fn role(&self) -> (u16, String) {
        let mut stream = TcpStream::connect(self.addr)
            .await
            .expect("connect to agent");
        stream
            .write_all(b"GET /flycheck/role HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n")
            .await
            .expect("send request to agent");
        let mut raw = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw))
            .await
            .expect("agent answers within 10 s")
            .expect("read agent response");
        let text = String::from_utf8(raw).expect("agent response is UTF-8");
        let (head, body) = text.split_once("\r\n\r\n").expect("agent response head");
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .expect("agent response status code");
        (status, body.to_owned())
    }

    async fn stop(self) {
        self.stop.send(()).expect("agent still running");
        self.task
            .await
            .expect("agent task")
            .expect("agent stops cleanly");
    }
}

async fn connect(conninfo: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(conninfo, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect to {conninfo}: {e}"));
    tokio::spawn(connection);
    client
}

/// Starts the cluster off the async threads; a panic inside keeps its message.
async fn start_cluster(ips: &[Ipv4Addr], port: u16) -> PgCluster {
    let ips = ips.to_vec();
    match tokio::task::spawn_blocking(move || PgCluster::start(&ips, port)).await {
        Ok(cluster) => cluster.expect("cluster starts"),
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => panic!("cluster start task: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_follows_a_real_failover() {
    let cluster = start_cluster(&[NODE0, NODE1], PG_PORT).await;
    let agent0 = Agent::start(NODE0, cluster.conninfo(0)).await;
    let agent1 = Agent::start(NODE1, cluster.conninfo(1)).await;

    assert_eq!(agent0.role().await, (200, "leader".to_owned()));
    assert_eq!(agent1.role().await, (200, "replica".to_owned()));

    // Writes on the primary reach the standby.
    let primary = connect(&cluster.conninfo(0)).await;
    primary
        .batch_execute(
            "CREATE TABLE failover (id int PRIMARY KEY); INSERT INTO failover VALUES (1)",
        )
        .await
        .expect("write on the primary");
    let standby = connect(&cluster.conninfo(1)).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let replicated = standby
            .query_opt("SELECT id FROM failover WHERE id = 1", &[])
            .await
            .map(|row| row.is_some())
            .unwrap_or(false);
        if replicated {
            break;
        }
        assert!(Instant::now() < deadline, "the write never reached node 1");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let refused = standby
        .batch_execute("INSERT INTO failover VALUES (2)")
        .await
        .expect_err("the standby refuses writes");
    assert!(
        refused.as_db_error().map(|e| e.code().code()) == Some("25006"),
        "expected read_only_sql_transaction, got {refused:?}"
    );
    drop(primary);
    drop(standby);

    // The primary crashes: its agent cannot tell, and the standby is still a standby.
    cluster.stop_immediate(0).expect("kill node 0");
    let (status, body) = agent0.role().await;
    assert_eq!(status, 500, "node 0 is down, got body {body:?}");
    assert!(!body.is_empty(), "a 500 carries the error text");
    assert_eq!(agent1.role().await, (200, "replica".to_owned()));

    // After promotion node 1 leads and takes writes.
    cluster.promote(1).expect("promote node 1");
    assert_eq!(agent1.role().await, (200, "leader".to_owned()));
    assert_eq!(agent0.role().await.0, 500);
    let new_primary = connect(&cluster.conninfo(1)).await;
    new_primary
        .batch_execute("INSERT INTO failover VALUES (2)")
        .await
        .expect("write on the promoted node");

    agent0.stop().await;
    agent1.stop().await;
}
