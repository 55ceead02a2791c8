//! Rule 10: a failed startup is retried. While a client is starting up and the backend has
//! sent nothing past an SSL `N`, the proxy holds what the client sent; a backend that closes
//! or answers 57P03 then is probed, and the client's packets go to the next leader within
//! `proxy.leader_wait`. A stand-in Postgres shows it step by step; real Postgres 15 shows it
//! under a clean shutdown of the leader while clients reconnect in a loop.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use roleproxy_core::pgwire::message;
use roleproxy_testkit as support;
use support::cluster::{ClusterSpec, LocalCluster};
use support::dns::DnsServer;
use support::harness::{eventually, startup_packet, ConfigBuilder, RunningProxy};
use support::role::{RoleEndpoint, RoleReply};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const WAIT: Duration = Duration::from_secs(60);
const NAME: &str = "iad.startup.internal";
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

fn ip(net: u8, node: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, net, 0, node))
}

/// A stand-in Postgres: declines SSL with `N`; answers a StartupMessage with FATAL 57P03 while
/// `refusing` (a Postgres shutting down), else with AuthenticationOk, a ParameterStatus naming
/// `node`, and ReadyForQuery. Counts the SSLRequests it declined.
struct FakePostgres {
    refusing: Arc<AtomicBool>,
    ssl_requests: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl FakePostgres {
    async fn start(addr: SocketAddr, node: &'static str, refusing: bool) -> FakePostgres {
        let listener = TcpListener::bind(addr).await.expect("bind fake postgres");
        let refusing = Arc::new(AtomicBool::new(refusing));
        let ssl_requests = Arc::new(AtomicU64::new(0));
        let (r, s) = (Arc::clone(&refusing), Arc::clone(&ssl_requests));
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (r, s) = (Arc::clone(&r), Arc::clone(&s));
                tokio::spawn(async move {
                    let _ = serve(stream, node, &r, &s).await;
                });
            }
        });
        FakePostgres {
            refusing,
            ssl_requests,
            task,
        }
    }
}

impl Drop for FakePostgres {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(
    mut stream: TcpStream,
    node: &str,
    refusing: &AtomicBool,
    ssl_requests: &AtomicU64,
) -> std::io::Result<()> {
    loop {
        let mut len = [0u8; 4];
        stream.read_exact(&mut len).await?;
        let mut body = vec![0u8; u32::from_be_bytes(len) as usize - 4];
        stream.read_exact(&mut body).await?;
        if body == SSL_REQUEST[4..] {
            ssl_requests.fetch_add(1, Ordering::SeqCst);
            stream.write_all(b"N").await?;
            continue;
        }
        if refusing.load(Ordering::SeqCst) {
            let refusal = roleproxy_core::pgwire::error_response(
                "57P03",
                "the database system is shutting down",
            );
            return stream.write_all(&refusal).await;
        }
        let mut answer = message(b'R', &[0, 0, 0, 0]);
        answer.extend(message(b'S', format!("node\0{node}\0").as_bytes()));
        answer.extend(message(b'Z', b"I"));
        stream.write_all(&answer).await?;
        let mut rest = Vec::new();
        return stream.read_to_end(&mut rest).await.map(drop);
    }
}

/// Startups held for the next leader, whatever the reason.
async fn startups_replayed(proxy: &RunningProxy) -> f64 {
    let mut total = 0.0;
    for reason in ["closed", "refusing", "timed_out"] {
        total += proxy
            .metric(&format!(
                "roleproxy_startup_retries_total{{reason=\"{reason}\"}}"
            ))
            .await;
    }
    total
}

/// Held by each test here that replays startups: the count of replays has no label to tell
/// proxies apart and is one per process, so these tests take turns.
static REPLAYS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The leader answers the client's startup with 57P03 (shutting down): the client, told `N`
/// by it already, waits unanswered while the probe takes that leader down, then gets the next
/// leader's welcome after its SSLRequest and StartupMessage were replayed there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_startup_refused_with_57p03_goes_to_the_next_leader() {
    let _turn = REPLAYS.lock().await;
    let net = 185;
    let dns = DnsServer::start(ip(net, 1)).await;
    dns.set(NAME, vec![ip(net, 11), ip(net, 12)]);
    let old_role = RoleEndpoint::start(SocketAddr::new(ip(net, 11), 5500)).await;
    old_role.set(RoleReply::leader());
    let new_role = RoleEndpoint::start(SocketAddr::new(ip(net, 12), 5500)).await;
    new_role.set(RoleReply::replica());
    let old = FakePostgres::start(SocketAddr::new(ip(net, 11), 5433), "old", false).await;
    let new = FakePostgres::start(SocketAddr::new(ip(net, 12), 5433), "new", false).await;
    let config = ConfigBuilder::new(&format!("127.{net}.0.1"), dns.addr(), NAME)
        .set("proxy.leader_wait", "\"60s\"")
        .config();
    let proxy = RunningProxy::start(config).await;
    let old_addr = format!("{}:5433", ip(net, 11));
    assert!(proxy.wait_route(Some(&old_addr), WAIT).await);
    let retries = r#"roleproxy_startup_retries_total{reason="refusing"}"#;
    let retried = proxy.metric(retries).await;

    // The leader starts shutting down: its role endpoint still says leader.
    old.refusing.store(true, Ordering::SeqCst);
    let mut client = TcpStream::connect(proxy.addr).await.expect("proxy accepts");
    client.write_all(&SSL_REQUEST).await.expect("SSLRequest");
    let mut n = [0u8; 1];
    client.read_exact(&mut n).await.expect("SSL answer");
    assert_eq!(&n, b"N");
    client
        .write_all(&startup_packet())
        .await
        .expect("StartupMessage");
    let answer = tokio::spawn(async move {
        let mut first = [0u8; 5];
        client.read_exact(&mut first).await.map(|_| (first, client))
    });

    assert!(
        proxy.wait_route(None, WAIT).await,
        "the probe found the leader refusing and took it down"
    );
    assert!(
        !answer.is_finished(),
        "the client has been told nothing meanwhile"
    );
    assert!(proxy.metric(retries).await > retried, "counted");
    new_role.set(RoleReply::leader());
    let answered = tokio::time::timeout(WAIT, answer).await;
    let Ok(Ok(Ok((first, mut client)))) = answered else {
        panic!("the client was answered: {answered:?}");
    };
    assert_eq!(first[0], b'R', "authentication, not an error: {first:?}");
    let mut rest = vec![0u8; 4 + message(b'S', b"node\0new\0").len()];
    client.read_exact(&mut rest).await.expect("the welcome");
    assert!(
        rest.ends_with(&message(b'S', b"node\0new\0")),
        "from the new leader"
    );
    assert_eq!(
        new.ssl_requests.load(Ordering::SeqCst),
        1,
        "the SSLRequest was replayed there, and its N not passed on twice"
    );
    proxy.stop().await;
}

/// Real Postgres 15: the leader is stopped with `pg_ctl stop -m fast` while clients
/// reconnect in a loop, then a replica is promoted. No client's connect meets the old
/// leader's shutdown: no 57P03 from it, no connection closed under it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_reconnecting_through_a_clean_shutdown_never_meet_the_dying_leader() {
    let _turn = REPLAYS.lock().await;
    let spec = ClusterSpec {
        name: "iad.net186.internal".into(),
        dns_ip: Ipv4Addr::new(127, 186, 0, 1).into(),
        ..ClusterSpec::demo().with_ips((11..=12).map(|d| Ipv4Addr::new(127, 186, 0, d)))
    };
    let cluster = LocalCluster::start(spec).await.expect("cluster starts");
    let config = cluster.proxy_config("127.186.0.1").config();
    let proxy = RunningProxy::start(config).await;
    let old = cluster.pg_addr(0).to_string();
    let new = cluster.pg_addr(1);
    assert!(proxy.wait_route(Some(&old), WAIT).await);
    let through_proxy = format!(
        "host={} port={} user=postgres dbname=postgres connect_timeout=60",
        proxy.addr.ip(),
        proxy.addr.port()
    );
    let retried = startups_replayed(&proxy).await;

    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let on_new = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (stop, errors, on_new) =
                (Arc::clone(&stop), Arc::clone(&errors), Arc::clone(&on_new));
            let conninfo = through_proxy.clone();
            let new_host = new.ip().to_string();
            tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    match tokio_postgres::connect(&conninfo, tokio_postgres::NoTls).await {
                        Ok((client, connection)) => {
                            tokio::spawn(connection);
                            // The session may be ended by the shutdown: that is Postgres's
                            // own doing once it is open, not a failed connect.
                            if let Ok(row) = client
                                .query_one("SELECT host(inet_server_addr())", &[])
                                .await
                            {
                                if row.get::<_, String>(0) == new_host {
                                    on_new.fetch_add(1, Ordering::SeqCst);
                                }
                            }
                        }
                        Err(e) => errors.lock().expect("errors").push(e.to_string()),
                    }
                }
            })
        })
        .collect();

    tokio::task::block_in_place(|| cluster.pg().stop(0)).expect("pg_ctl stop -m fast");
    cluster.promote(1).await.expect("promote the replica");
    let served = eventually(WAIT, || async { on_new.load(Ordering::SeqCst) >= 8 }).await;
    stop.store(true, Ordering::SeqCst);
    for client in clients {
        let _ = client.await;
    }
    assert!(served, "clients reach the promoted replica");
    let errors = errors.lock().expect("errors").clone();
    let met_the_dying_leader: Vec<&String> = errors
        .iter()
        .filter(|e| {
            e.contains("57P03")
                || e.contains("shutting down")
                || e.contains("closed")
                || e.contains("unexpected")
        })
        .collect();
    assert!(
        met_the_dying_leader.is_empty(),
        "no connect met the old leader's shutdown: {met_the_dying_leader:#?}"
    );
    eprintln!(
        "connect errors: {errors:?}; startups replayed: {}",
        startups_replayed(&proxy).await - retried
    );
    proxy.stop().await;
    cluster.shutdown().await;
}
