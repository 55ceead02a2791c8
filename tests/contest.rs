//! Rule 9, the session side: a rival's new `leader` claim contests a confirmed leader's route
//! instead of cutting it. Against real Postgres 15, the leader's plaintext sessions pause at
//! their next transaction boundary (the client's next statement stays unread), new clients
//! wait, and then either everything resumes where it stopped (the claim lapsed) or paused
//! sessions end with `57P01` and an open transaction is cut (another node leads). A raw TCP
//! session cannot be followed and closes at once; a connect in progress to the contested
//! leader is abandoned at once. Each test waits for events, never for a time.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use roleproxy_testkit as support;
use support::dns::DnsServer;
use support::harness::{
    eventually, holds_for, sessions_ended, Client, ConfigBuilder, RunningProxy,
};
use support::pg::PgCluster;
use support::role::{RoleEndpoint, RoleReply};
use support::transactions::Session;
use support::writer::connect;
use tokio_postgres::error::SqlState;

const WAIT: Duration = Duration::from_secs(60);
/// How long a test watches for something that must not happen while the route is contested.
const WATCH: Duration = Duration::from_secs(2);
const NAME: &str = "iad.contest.internal";

fn ip(net: u8, node: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, net, 0, node))
}

/// A real Postgres leader on 127.NET.0.11:5433 behind a role endpoint the test controls, and
/// a rival node on 127.NET.0.12 that has only a role endpoint: its claim is what contests.
struct Contest {
    net: u8,
    pg: Arc<PgCluster>,
    leader: RoleEndpoint,
    rival: RoleEndpoint,
    _dns: DnsServer,
    proxy: RunningProxy,
}

impl Contest {
    async fn start(net: u8) -> Contest {
        let node = Ipv4Addr::new(127, net, 0, 11);
        let pg = tokio::task::spawn_blocking(move || PgCluster::start(&[node], 5433))
            .await
            .expect("cluster start task")
            .expect("postgres starts");
        let leader = RoleEndpoint::start(SocketAddr::new(ip(net, 11), 5500)).await;
        leader.set(RoleReply::leader());
        let rival = RoleEndpoint::start(SocketAddr::new(ip(net, 12), 5500)).await;
        rival.set(RoleReply::replica());
        let dns = DnsServer::start(ip(net, 1)).await;
        dns.set(NAME, vec![ip(net, 11), ip(net, 12)]);
        // The test decides how each contest ends: the hold-down outlasts it. Sessions go
        // through a listener of this test's own: they are counted per listener, per process.
        let config = ConfigBuilder::new(&format!("127.{net}.0.1"), dns.addr(), NAME)
            .listener(&format!(
                "name = \"{}\"\naddresses = [\"127.{net}.0.1:0\"]",
                Self::listener_name(net)
            ))
            .set("check.contest_hold", "\"10m\"")
            .set("proxy.leader_wait", "\"60s\"")
            .config();
        let proxy = RunningProxy::start(config).await;
        let contest = Contest {
            net,
            pg: Arc::new(pg),
            leader,
            rival,
            _dns: dns,
            proxy,
        };
        let leader = contest.leader_addr();
        assert!(contest.proxy.wait_route(Some(&leader), WAIT).await);
        let setup = contest.open("setup").await;
        setup
            .client
            .batch_execute("CREATE TABLE held (id int PRIMARY KEY)")
            .await
            .expect("create table");
        contest
    }

    fn leader_addr(&self) -> String {
        format!("{}:5433", ip(self.net, 11))
    }

    fn listener_name(net: u8) -> String {
        format!("contest{net}")
    }

    fn through_proxy(&self, application: &str) -> String {
        let addr = self.proxy.listener(&Self::listener_name(self.net));
        format!(
            "host={} port={} user=postgres dbname=postgres connect_timeout=60 application_name={application}",
            addr.ip(),
            addr.port()
        )
    }

    async fn open(&self, application: &str) -> Session {
        Session::open(&self.through_proxy(application))
            .await
            .expect("session through roleproxy")
    }

    /// Rows of `held` with these ids, read on the leader directly.
    async fn rows(&self, ids: &[i32]) -> i64 {
        let direct = connect(&self.pg.conninfo(0))
            .await
            .expect("leader directly");
        direct
            .query_one("SELECT count(*) FROM held WHERE id = ANY($1)", &[&ids])
            .await
            .expect("count")
            .get(0)
    }

    async fn state(&self) -> String {
        self.proxy.status().await["route"]["target"]["state"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    async fn wait_state(&self, state: &str) -> bool {
        eventually(WAIT, || async { self.state().await == state }).await
    }

    async fn sessions(&self, result: &str) -> f64 {
        self.proxy
            .metric(&sessions_ended(&Self::listener_name(self.net), result))
            .await
    }

    /// An idle session and one inside a transaction that inserted `id`, then the rival's
    /// claim: the route is contested when this returns.
    async fn idle_and_in_transaction(&self, id: i32) -> (Session, Session) {
        let idle = self.open("idle").await;
        let in_tx = self.open("in-tx").await;
        in_tx
            .client
            .batch_execute(&format!("BEGIN; INSERT INTO held VALUES ({id})"))
            .await
            .expect("transaction open");
        self.rival.set(RoleReply::leader());
        assert!(self.wait_state("contested").await);
        (idle, in_tx)
    }

    async fn stop(self) {
        self.proxy.stop().await;
    }
}

/// The claim lapses: the paused session's statement, kept unread meanwhile, runs where it
/// stopped; the transaction that was open finishes untouched; the waiting new client is
/// served. Nothing is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contested_leaders_sessions_pause_at_their_boundary_and_resume_when_the_claim_lapses() {
    let contest = Contest::start(180).await;
    let drained = contest.sessions("drained").await;
    let lost = contest.sessions("contest_lost").await;
    let (idle, in_tx) = contest.idle_and_in_transaction(1).await;

    // Inside a transaction, the session goes on to its end.
    in_tx
        .client
        .batch_execute("INSERT INTO held VALUES (2)")
        .await
        .expect("a transaction open when the claim came carries on");
    in_tx
        .client
        .batch_execute("COMMIT")
        .await
        .expect("and commits");
    // Between transactions, the next statement waits unread.
    let held_client = Arc::new(idle.client);
    let held = tokio::spawn({
        let client = Arc::clone(&held_client);
        async move { client.batch_execute("INSERT INTO held VALUES (3)").await }
    });
    let next = tokio::spawn({
        let client = Arc::new(in_tx.client);
        async move { client.batch_execute("INSERT INTO held VALUES (4)").await }
    });
    let newcomer = tokio::spawn(connect_owned(contest.through_proxy("new")));
    let waited = holds_for(WATCH, || async {
        !held.is_finished() && !next.is_finished() && !newcomer.is_finished()
    })
    .await;
    assert!(
        waited,
        "held statements and the new client wait while contested"
    );
    assert_eq!(
        contest.rows(&[1, 2]).await,
        2,
        "the open transaction committed"
    );
    assert_eq!(
        contest.rows(&[3, 4]).await,
        0,
        "no held statement reached the leader"
    );
    assert_eq!(contest.state().await, "contested");

    contest.rival.set(RoleReply::replica());
    assert!(
        contest
            .proxy
            .wait_route(Some(&contest.leader_addr()), WAIT)
            .await,
        "the claim lapsed: the route is the leader's again"
    );
    let resumed = tokio::time::timeout(WAIT, held).await;
    assert!(
        matches!(resumed, Ok(Ok(Ok(())))),
        "the paused session resumed: {resumed:?}"
    );
    let resumed = tokio::time::timeout(WAIT, next).await;
    assert!(matches!(resumed, Ok(Ok(Ok(())))), "{resumed:?}");
    let served = tokio::time::timeout(WAIT, newcomer).await;
    assert!(matches!(served, Ok(Ok(Ok(_)))), "the new client was served");
    assert_eq!(contest.rows(&[3, 4]).await, 2);
    held_client
        .batch_execute("SELECT 1")
        .await
        .expect("the session goes on");
    assert_eq!(contest.sessions("drained").await, drained, "nothing closed");
    assert_eq!(contest.sessions("contest_lost").await, lost);
    contest.stop().await;
}

async fn connect_owned(conninfo: String) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    connect(&conninfo).await
}

/// The contest resolves against the leader (it steps down and the rival leads): the paused
/// session ends with 57P01 and its held statement never ran; the session still inside a
/// transaction is cut at once and its writes are on no node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_contest_ends_paused_sessions_with_57p01_and_cuts_open_transactions() {
    let contest = Contest::start(181).await;
    let lost = contest.sessions("contest_lost").await;
    let (idle, in_tx) = contest.idle_and_in_transaction(11).await;
    let Session { client, connection } = idle;
    let held = tokio::spawn(async move {
        let result = client.batch_execute("INSERT INTO held VALUES (12)").await;
        (result, client)
    });
    let waited = holds_for(WATCH, || async { !held.is_finished() }).await;
    assert!(waited, "the statement waits while contested");

    contest.leader.set(RoleReply::replica());
    let rival = format!("{}:5433", ip(181, 12));
    assert!(
        contest.proxy.wait_route(Some(&rival), WAIT).await,
        "the rival leads"
    );
    let ended = tokio::time::timeout(WAIT, held).await;
    let Ok(Ok((Err(error), _client))) = ended else {
        panic!("the held statement failed: {ended:?}");
    };
    let code = match error.code() {
        Some(code) => Some(code.clone()),
        None => match tokio::time::timeout(WAIT, connection).await {
            Ok(Ok(Err(e))) => e.code().cloned(),
            _ => None,
        },
    };
    assert_eq!(
        code,
        Some(SqlState::ADMIN_SHUTDOWN),
        "the paused session ends with 57P01: {error}"
    );
    assert_eq!(
        contest.sessions("contest_lost").await,
        lost + 1.0,
        "counted as a lost contest"
    );
    let direct = connect(&contest.pg.conninfo(0))
        .await
        .expect("leader directly");
    let cut = eventually(WAIT, || async {
        direct
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'in-tx'",
                &[],
            )
            .await
            .is_ok_and(|row| row.get::<_, i64>(0) == 0)
    })
    .await;
    assert!(cut, "the open transaction's session was cut");
    assert!(in_tx.client.batch_execute("COMMIT").await.is_err());
    assert_eq!(
        contest.rows(&[11, 12]).await,
        0,
        "neither the cut transaction nor the held statement is on the leader"
    );
    contest.stop().await;
}

/// A raw TCP session cannot be followed to a boundary: it is closed at once when its leader
/// is contested, as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_tcp_session_closes_at_once_when_its_leader_is_contested() {
    let cluster = support::fake_cluster::FakeCluster::start(182, 2).await;
    cluster.nodes[0].role.set(RoleReply::leader());
    let proxy = RunningProxy::start(
        cluster
            .config()
            .set("check.contest_hold", "\"10m\"")
            .config(),
    )
    .await;
    let mut session = Client::connect(proxy.addr, WAIT).await.expect("served");
    assert!(session.echo("not postgres").await);
    cluster.nodes[1].role.set(RoleReply::leader());
    assert!(session.closed_within(WAIT).await, "closed at once");
    assert_eq!(
        proxy.status().await["route"]["target"]["state"],
        "contested",
        "while the contest is still on"
    );
    proxy.stop().await;
}

/// A socket in SYN_SENT from this host to `to`, read from `/proc/net/tcp`: a connect still in
/// progress.
fn connecting_to(to: SocketAddr) -> bool {
    let IpAddr::V4(v4) = to.ip() else {
        return false;
    };
    let [a, b, c, d] = v4.octets();
    let remote = format!("{d:02X}{c:02X}{b:02X}{a:02X}:{:04X}", to.port());
    std::fs::read_to_string("/proc/net/tcp")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            Some((fields.get(2)?.to_string(), fields.get(3)?.to_string()))
        })
        .any(|(rem, state)| rem == remote && state == "02")
}

/// A leader whose Postgres port never answers a SYN (a full accept queue: the kernel drops
/// the SYN, as a black-holed node does). A client's connect to it is in progress when
/// another node claims leader: the connect is abandoned at once, while the route is still
/// contested (the connect timeout is ten minutes), and the client is taken to the next route
/// once there is one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_in_progress_is_abandoned_when_its_leader_is_contested() {
    let net = 183;
    let cluster = support::fake_cluster::FakeCluster::start(net, 2).await;
    let hole_ip = ip(net, 20);
    let hole = SocketAddr::new(hole_ip, 5433);
    let hole_role = RoleEndpoint::start(SocketAddr::new(hole_ip, 5500)).await;
    hole_role.set(RoleReply::leader());
    let listener =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    listener.set_reuse_address(true).expect("reuse");
    listener.bind(&hole.into()).expect("bind the black hole");
    listener.listen(0).expect("listen");
    // Its accept queue holds one connection, never accepted: every later SYN is dropped.
    let _queued = std::net::TcpStream::connect(hole).expect("fills the queue");
    cluster.dns.set(
        support::fake_cluster::NAME,
        vec![hole_ip, cluster.nodes[1].ip],
    );
    let proxy = RunningProxy::start(
        cluster
            .config()
            .set("check.contest_hold", "\"10m\"")
            .set("proxy.connect_timeout", "\"10m\"")
            .set("proxy.leader_wait", "\"10m\"")
            .config(),
    )
    .await;
    assert!(proxy.wait_route(Some(&hole.to_string()), WAIT).await);

    let client = tokio::spawn(Client::connect(proxy.addr, Duration::from_secs(600)));
    assert!(
        eventually(WAIT, || async { connecting_to(hole) }).await,
        "the proxy is connecting to the black-holed leader"
    );
    cluster.nodes[1].role.set(RoleReply::leader());
    let abandoned = eventually(WAIT, || async { !connecting_to(hole) }).await;
    assert!(abandoned, "the connect was abandoned");
    assert_eq!(
        proxy.status().await["route"]["target"]["state"],
        "contested",
        "while the contest is still on"
    );
    assert!(!client.is_finished(), "the client waits for the route");

    hole_role.set(RoleReply::replica());
    let served = tokio::time::timeout(WAIT, client).await;
    let tag = match served {
        Ok(Ok(Some(client))) => client.tag,
        _ => panic!("the client was served once the route moved"),
    };
    assert_eq!(tag, cluster.nodes[1].tag(), "by the new leader");
    drop(listener);
    proxy.stop().await;
}
