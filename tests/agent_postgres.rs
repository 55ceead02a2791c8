//! The role agent against real Postgres 15: it must report the primary as `leader`, the
//! standby as `replica`, follow a promotion, and answer 500 for a node whose Postgres is down.
//! Under abuse it asks Postgres over one kept connection however many clients hammer it,
//! still answers when Postgres has no connection slot left, never quotes the server in an
//! error body, survives SIGHUP and takes its password from the environment or a passfile.

use roleproxy_testkit as support;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use roleproxy_agent::{serve_with, AgentError, AgentOptions, APPLICATION_NAME};
use support::exit_status;
use support::harness::{eventually, holds_for};
use support::pg::PgCluster;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const NODE0: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 61);
const NODE1: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 62);
const HAMMERED: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 63);
const FULL: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 64);
const REFUSING: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 65);
const BINARY: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 66);
const PG_PORT: u16 = 5433;

/// A running agent: its address and what it takes to stop it.
struct Agent {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), AgentError>>,
}

impl Agent {
    async fn start(ip: Ipv4Addr, postgres: String) -> Agent {
        Self::start_with(ip, postgres, AgentOptions::default()).await
    }

    async fn start_with(ip: Ipv4Addr, postgres: String, options: AgentOptions) -> Agent {
        let listener = TcpListener::bind((ip, 0))
            .await
            .expect("bind agent listener");
        let addr = listener.local_addr().expect("agent listener address");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve_with(listener, postgres, options, async {
            let _ = stopped.await;
        }));
        Agent { addr, stop, task }
    }

    /// `GET /flycheck/role` → (status, body).
    async fn role(&self) -> (u16, String) {
        role_at(self.addr).await
    }

    async fn stop(self) {
        self.stop.send(()).expect("agent still running");
        self.task
            .await
            .expect("agent task")
            .expect("agent stops cleanly");
    }
}

/// `GET /flycheck/role` from the agent at `addr` → (status, body).
async fn role_at(addr: SocketAddr) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.expect("connect to agent");
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
    assert!(
        eventually(Duration::from_secs(15), || async {
            standby
                .query_opt("SELECT id FROM failover WHERE id = 1", &[])
                .await
                .is_ok_and(|row| row.is_some())
        })
        .await,
        "the write never reached node 1"
    );
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

    // The primary crashes: its agent cannot tell, and the standby is still a standby. The
    // agent may give its answer from before the crash for `reuse_for`.
    cluster.stop_immediate(0).expect("kill node 0");
    assert!(
        eventually(Duration::from_secs(10), || async {
            agent0.role().await.0 == 500
        })
        .await,
        "node 0's agent never said it cannot tell"
    );
    let (status, body) = agent0.role().await;
    assert_eq!(status, 500, "node 0 is down, got body {body:?}");
    assert!(!body.is_empty(), "a 500 carries the error text");
    assert_eq!(agent1.role().await, (200, "replica".to_owned()));

    // After promotion node 1 leads and takes writes. The agent may give its answer from just
    // before for `reuse_for`.
    cluster.promote(1).expect("promote node 1");
    assert!(
        eventually(Duration::from_secs(10), || async {
            agent1.role().await == (200, "leader".to_owned())
        })
        .await,
        "node 1's agent never said leader"
    );
    assert_eq!(agent0.role().await.0, 500);
    let new_primary = connect(&cluster.conninfo(1)).await;
    new_primary
        .batch_execute("INSERT INTO failover VALUES (2)")
        .await
        .expect("write on the promoted node");

    agent0.stop().await;
    agent1.stop().await;
}

/// How many connections the agent holds on Postgres right now.
async fn agent_connections(monitor: &tokio_postgres::Client) -> i64 {
    monitor
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
            &[&APPLICATION_NAME],
        )
        .await
        .expect("count the agent's connections")
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forty_clients_hammering_cost_at_most_two_postgres_connections() {
    const CLIENTS: usize = 40;
    let cluster = start_cluster(&[HAMMERED], PG_PORT).await;
    let agent = Agent::start(HAMMERED, cluster.conninfo(0)).await;
    let monitor = connect(&cluster.conninfo(0)).await;
    assert_eq!(agent.role().await, (200, "leader".to_owned()));

    let hammering = Duration::from_secs(5);
    let started = Instant::now();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let addr = agent.addr;
            tokio::spawn(async move {
                let mut answers = 0u64;
                while started.elapsed() < hammering {
                    assert_eq!(role_at(addr).await, (200, "leader".to_owned()));
                    answers += 1;
                }
                answers
            })
        })
        .collect();
    // Watched for as long as the clients hammer: the count must never exceed two.
    let most = AtomicI64::new(0);
    holds_for(hammering.saturating_sub(started.elapsed()), || async {
        let now = agent_connections(&monitor).await;
        most.fetch_max(now, Ordering::Relaxed);
        now <= 2
    })
    .await;
    let most = most.into_inner();
    let mut answers = 0;
    for client in clients {
        answers += client.await.expect("client task");
    }
    println!(
        "{CLIENTS} clients got {answers} answers in {hammering:?}; the agent held at most {most} Postgres connection(s)"
    );
    assert!(answers >= CLIENTS as u64, "every client was answered");
    // The one kept for a full server, and the one asking.
    assert!(most <= 2, "{most} connections");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_answers_while_postgres_is_full() {
    let cluster = start_cluster(&[FULL], PG_PORT).await;
    // Every request asks Postgres, so the answer below is not one from before it filled up.
    let asks_every_time = || AgentOptions {
        reuse_for: Duration::from_millis(1),
        ..AgentOptions::default()
    };
    let kept = Agent::start_with(FULL, cluster.conninfo(0), asks_every_time()).await;
    assert_eq!(kept.role().await, (200, "leader".to_owned()));

    // Take every slot, the superusers' reserved ones included, until Postgres says so.
    let mut fillers = Vec::new();
    let refusal = loop {
        match tokio_postgres::connect(&cluster.conninfo(0), tokio_postgres::NoTls).await {
            Ok((client, connection)) => {
                tokio::spawn(connection);
                fillers.push(client);
                assert!(fillers.len() < 200, "Postgres never filled up");
            }
            Err(e) => break e,
        }
    };
    assert_eq!(
        refusal.as_db_error().map(|e| e.code().code()),
        Some("53300"),
        "{refusal}"
    );

    assert_eq!(
        kept.role().await,
        (200, "leader".to_owned()),
        "the kept connection still answers"
    );
    // An agent without a connection cannot get one, and says why without quoting the server.
    let fresh = Agent::start_with(FULL, cluster.conninfo(0), asks_every_time()).await;
    assert_eq!(
        fresh.role().await,
        (
            500,
            "postgres has no connection slot left (SQLSTATE 53300)".to_owned()
        )
    );
    drop(fillers);
    kept.stop().await;
    fresh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_bodies_do_not_quote_the_server() {
    let cluster = start_cluster(&[REFUSING], PG_PORT).await;
    // pg_hba.conf is read top down: this user is rejected before the trust lines.
    let hba = cluster.nodes[0].data_dir.join("pg_hba.conf");
    let rules = std::fs::read_to_string(&hba).expect("read pg_hba.conf");
    std::fs::write(
        &hba,
        format!("host all hba_rejected_user 127.0.0.0/8 reject\n{rules}"),
    )
    .expect("write pg_hba.conf");
    cluster
        .sql(0, &["SELECT pg_reload_conf()"])
        .expect("reload pg_hba.conf");
    let node = format!("host={REFUSING} port={PG_PORT} dbname=postgres");

    let rows = [
        (
            "no_such_user_here",
            "postgres refused the login (SQLSTATE 28000)",
        ),
        (
            "hba_rejected_user",
            "postgres refused the login (SQLSTATE 28000)",
        ),
    ];
    for (user, expected) in rows {
        let agent = Agent::start(REFUSING, format!("{node} user={user}")).await;
        let (status, body) = agent.role().await;
        assert_eq!((status, body.as_str()), (500, expected), "user {user}");
        for server_text in [
            user,
            "pg_hba",
            "does not exist",
            REFUSING.to_string().as_str(),
        ] {
            assert!(
                !body.contains(server_text),
                "{body:?} quotes {server_text:?}"
            );
        }
        agent.stop().await;
    }
}

/// The `roleproxy` binary running `agent`, its log lines streamed to a channel.
struct AgentProcess {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    /// Every line read from `lines` so far.
    seen: std::sync::Mutex<Vec<String>>,
}

impl AgentProcess {
    fn start(args: &[&str], env: &[(&str, &str)]) -> AgentProcess {
        use std::io::BufRead;
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_roleproxy"));
        command
            .arg("agent")
            .args(args)
            .env("RUST_LOG", "info")
            .env_remove("PGPASSWORD")
            .env_remove("PGPASSFILE")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        for (name, value) in env {
            command.env(name, value);
        }
        let mut child = command.spawn().expect("the agent starts");
        let logs = child.stderr.take().expect("stderr piped");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(logs).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        AgentProcess {
            child,
            lines,
            seen: std::sync::Mutex::default(),
        }
    }

    /// The first log line from now on that contains `words`.
    async fn wait_for(&self, words: &str) -> String {
        eventually(Duration::from_secs(30), || async {
            // Every line logged so far, until one has the words.
            let mut seen = self.seen.lock().expect("lines");
            self.lines.try_iter().find(|line| {
                seen.push(line.clone());
                line.contains(words)
            })
        })
        .await
        .unwrap_or_else(|| panic!("the agent never logged {words:?}"))
    }

    /// Every line the agent has logged so far.
    fn logged(&self) -> Vec<String> {
        let mut seen = self.seen.lock().expect("lines");
        seen.extend(self.lines.try_iter());
        seen.clone()
    }

    fn signal(&self, name: &str) {
        let status = std::process::Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
    }

    /// SIGTERM, and the exit status.
    async fn stop(mut self) -> std::process::ExitStatus {
        self.signal("TERM");
        tokio::task::block_in_place(|| exit_status(&mut self.child, Duration::from_secs(30)))
            .expect("the agent stops")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_binary_survives_sighup_and_reads_its_password_from_the_environment_or_a_passfile(
) {
    const PASSWORD: &str = "agent-pw-3x4mple";
    let cluster = start_cluster(&[BINARY], PG_PORT).await;
    cluster
        .sql(
            0,
            &[format!("CREATE ROLE pw_agent LOGIN PASSWORD '{PASSWORD}'").as_str()],
        )
        .expect("create a role with a password");
    let hba = cluster.nodes[0].data_dir.join("pg_hba.conf");
    let rules = std::fs::read_to_string(&hba).expect("read pg_hba.conf");
    std::fs::write(
        &hba,
        format!("host all pw_agent 127.0.0.0/8 scram-sha-256\n{rules}"),
    )
    .expect("write pg_hba.conf");
    cluster
        .sql(0, &["SELECT pg_reload_conf()"])
        .expect("reload pg_hba.conf");
    let postgres = format!("host={BINARY} port={PG_PORT} user=pw_agent dbname=postgres");
    let listen = SocketAddr::from((BINARY, 5500));
    let passfile = cluster.root().join("agent.pgpass");
    std::fs::write(
        &passfile,
        format!("{BINARY}:{PG_PORT}:*:pw_agent:{PASSWORD}\n"),
    )
    .expect("write the passfile");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&passfile, std::fs::Permissions::from_mode(0o600))
            .expect("chmod 0600 the passfile");
    }
    let passfile = passfile.display().to_string();

    let listen_text = listen.to_string();
    let args = [
        "--postgres",
        postgres.as_str(),
        "--listen",
        listen_text.as_str(),
    ];
    let with_passfile = [&args[..], &["--passfile", passfile.as_str()]].concat();
    let runs = [
        (args.to_vec(), vec![("PGPASSWORD", PASSWORD)]),
        (with_passfile, vec![]),
    ];
    for (args, env) in runs {
        let agent = AgentProcess::start(&args, &env);
        agent.wait_for("role agent listening").await;
        assert_eq!(
            role_at(listen).await,
            (200, "leader".to_owned()),
            "{args:?}"
        );

        agent.signal("HUP");
        agent.wait_for("nothing to reload").await;
        assert_eq!(
            role_at(listen).await,
            (200, "leader".to_owned()),
            "still answering after SIGHUP"
        );
        let logged = agent.logged();
        assert!(!logged.is_empty(), "the agent logs");
        assert!(
            logged.iter().all(|line| !line.contains(PASSWORD)),
            "the password is never logged:\n{}",
            logged.join("\n")
        );
        let status = agent.stop().await;
        assert!(status.success(), "SIGTERM after SIGHUP: {status:?}");
    }
}
