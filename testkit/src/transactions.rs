//! Clients that run short write transactions in a loop, reconnecting when their session ends,
//! and record which statement failed and how each session ended. The switchover test and
//! benchmark judge a proxy by these records: a planned switchover must end sessions only
//! between transactions.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_postgres::error::SqlState;
use tokio_postgres::NoTls;

use crate::lock;

/// The table the clients insert into; create it on the leader first.
pub const CREATE_TABLE: &str = "CREATE TABLE IF NOT EXISTS txs (
    client int NOT NULL,
    seq int NOT NULL,
    server text NOT NULL,
    PRIMARY KEY (client, seq)
)";

/// Creates the table through `conninfo` (a proxy) and waits, within `wait`, until every
/// replica of `cluster` has it.
pub async fn create_table(cluster: &crate::cluster::LocalCluster, conninfo: &str, wait: Duration) {
    create_replicated(cluster, conninfo, CREATE_TABLE, "txs", wait).await;
}

/// Runs `sql`, which creates `table`, through `conninfo` (a proxy) and waits, within `wait`,
/// until every replica of `cluster` has the table.
pub async fn create_replicated(
    cluster: &crate::cluster::LocalCluster,
    conninfo: &str,
    sql: &str,
    table: &str,
    wait: Duration,
) {
    let client = crate::writer::connect(conninfo)
        .await
        .expect("connects through roleproxy");
    client.batch_execute(sql).await.expect("create table");
    wait_replicated(cluster, table, wait).await;
}

/// Waits, within `wait`, until every node of `cluster` but the leader has `table`: replication
/// is asynchronous, and a replica promoted before it has the table would not know it.
pub async fn wait_replicated(cluster: &crate::cluster::LocalCluster, table: &str, wait: Duration) {
    let leader = cluster.leader().await;
    for i in (0..cluster.len()).filter(|i| Some(*i) != leader) {
        let replicated = crate::harness::eventually(wait, || async {
            match crate::writer::connect(&cluster.conninfo(i)).await {
                Ok(replica) => replica
                    .query_one("SELECT to_regclass($1::text) IS NOT NULL", &[&table])
                    .await
                    .is_ok_and(|row| row.get::<_, bool>(0)),
                Err(_) => false,
            }
        })
        .await;
        assert!(replicated, "the table {table} never reached node {i}");
    }
}

/// A session whose connection task is kept, to read how the server ended it.
pub struct Session {
    pub client: tokio_postgres::Client,
    pub connection: JoinHandle<Result<(), tokio_postgres::Error>>,
}

impl Session {
    pub async fn open(conninfo: &str) -> Result<Session, tokio_postgres::Error> {
        let (client, connection) = tokio_postgres::connect(conninfo, NoTls).await?;
        Ok(Session {
            client,
            connection: tokio::spawn(connection),
        })
    }

    /// The SQLSTATE the session ended with: of `error` (the statement that failed) or of the
    /// connection itself (a FATAL that arrived while no statement was waiting).
    pub async fn ended_with(self, error: &tokio_postgres::Error) -> Option<SqlState> {
        if let Some(code) = error.code() {
            return Some(code.clone());
        }
        self.end().await
    }

    /// The SQLSTATE of the error the server ended the connection with, if it ends within a
    /// minute. The client is kept meanwhile: dropping it would end the connection cleanly.
    pub async fn end(self) -> Option<SqlState> {
        let Session {
            client: _kept,
            connection,
        } = self;
        match tokio::time::timeout(Duration::from_secs(60), connection).await {
            Ok(Ok(Err(e))) => e.code().cloned(),
            _ => None,
        }
    }
}

/// Which statement of a transaction failed, and how the session ended.
#[derive(Debug, Clone)]
pub enum Failure {
    /// The first statement (BEGIN), or the query after COMMIT, failed: the session ended
    /// between transactions, with this SQLSTATE.
    Between(Option<SqlState>, String),
    /// INSERT, the sleep or COMMIT failed: a transaction failed part-way.
    PartWay(&'static str, String),
    Connect(String),
}

/// What the clients saw.
#[derive(Debug, Default, Clone)]
pub struct Outcome {
    /// (client, seq, server that committed it; empty if the session ended right after).
    pub committed: Vec<(i32, i32, String)>,
    pub failures: Vec<Failure>,
}

impl Outcome {
    /// Transactions that failed part-way.
    pub fn part_way(&self) -> usize {
        self.failures
            .iter()
            .filter(|f| matches!(f, Failure::PartWay(..)))
            .count()
    }

    /// Failures other than a session ending between transactions: transactions that failed
    /// part-way, and connects that failed.
    pub fn not_between(&self) -> Vec<&Failure> {
        self.failures
            .iter()
            .filter(|f| !matches!(f, Failure::Between(..)))
            .collect()
    }

    /// Sessions that ended between transactions.
    pub fn between(&self) -> Vec<&Failure> {
        self.failures
            .iter()
            .filter(|f| matches!(f, Failure::Between(..)))
            .collect()
    }

    /// Whether every session that ended between transactions ended with a clean 57P01.
    pub fn all_ended_with_57p01(&self) -> bool {
        self.between().iter().all(
            |f| matches!(f, Failure::Between(Some(code), _) if *code == SqlState::ADMIN_SHUTDOWN),
        )
    }

    /// Panics unless every failure was a session ending between transactions, each with a
    /// clean `57P01`: no transaction cut part-way, no client that failed to connect.
    pub fn assert_every_session_ended_between_transactions(&self) {
        let part_way = self.not_between();
        assert!(
            part_way.is_empty(),
            "no transaction fails part-way, no client fails to connect: {part_way:#?}"
        );
        let ended = self.between();
        assert!(
            self.all_ended_with_57p01(),
            "sessions end between transactions with a clean 57P01: {ended:#?}"
        );
    }

    /// The committed rows `leader` does not have: (client, seq, server that committed it).
    pub async fn missing_on(&self, leader: &tokio_postgres::Client) -> Vec<(i32, i32, String)> {
        let mut missing = Vec::new();
        for (client, seq, server) in &self.committed {
            let row = leader
                .query_opt(
                    "SELECT server FROM txs WHERE client = $1 AND seq = $2",
                    &[client, seq],
                )
                .await
                .expect("query the leader");
            if row.is_none() {
                missing.push((*client, *seq, server.clone()));
            }
        }
        missing
    }

    /// Rows committed on `server`.
    pub fn committed_on(&self, server: &str) -> usize {
        self.committed
            .iter()
            .filter(|(_, _, s)| s == server)
            .count()
    }
}

/// `clients` clients, each running `BEGIN; INSERT; SELECT pg_sleep(sleep); COMMIT` (one
/// statement at a time) in a loop through `conninfo` until stopped.
pub struct Transactions {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    outcome: Arc<Mutex<Outcome>>,
}

impl Transactions {
    pub fn start(conninfo: &str, clients: i32, sleep: Duration) -> Transactions {
        Self::start_numbered(conninfo, 0..clients, sleep)
    }

    /// [`Transactions::start`] with the given client numbers, so that runs sharing the `txs`
    /// table (one per proxy, one per round) never write the same `(client, seq)` key.
    pub fn start_numbered(
        conninfo: &str,
        clients: std::ops::Range<i32>,
        sleep: Duration,
    ) -> Transactions {
        let (stop, stopped) = watch::channel(false);
        let outcome = Arc::new(Mutex::new(Outcome::default()));
        let tasks = clients
            .map(|c| {
                let client = Client {
                    conninfo: conninfo.to_owned(),
                    id: c,
                    sleep,
                    stopped: stopped.clone(),
                    outcome: Arc::clone(&outcome),
                };
                tokio::spawn(client.run())
            })
            .collect();
        Transactions {
            stop,
            tasks,
            outcome,
        }
    }

    /// What the clients saw so far.
    pub fn outcome(&self) -> Outcome {
        lock(&self.outcome).clone()
    }

    /// Stops after the transactions in flight and returns what the clients saw.
    pub async fn stop(self) -> Outcome {
        let Transactions {
            stop,
            tasks,
            outcome,
        } = self;
        let _ = stop.send(true);
        for task in tasks {
            let _ = task.await;
        }
        let seen = lock(&outcome).clone();
        seen
    }
}

struct Client {
    conninfo: String,
    id: i32,
    sleep: Duration,
    stopped: watch::Receiver<bool>,
    outcome: Arc<Mutex<Outcome>>,
}

impl Client {
    fn record(&self, failure: Failure) {
        lock(&self.outcome).failures.push(failure);
    }

    async fn run(self) {
        let mut seq = 0;
        let mut session = None;
        while !*self.stopped.borrow() {
            let current = match session.take() {
                Some(s) => s,
                None => match Session::open(&self.conninfo).await {
                    Ok(s) => s,
                    Err(e) => {
                        self.record(Failure::Connect(e.to_string()));
                        // Not a wait: paces this load client's reconnects while it is refused.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            seq += 1;
            if let Err(e) = current.client.batch_execute("BEGIN").await {
                let text = e.to_string();
                self.record(Failure::Between(current.ended_with(&e).await, text));
                continue;
            }
            if let Some(step) = self.transaction(&current, seq).await {
                self.record(step);
                continue;
            }
            // Between transactions: the session may end here too.
            match current
                .client
                .query_one("SELECT host(inet_server_addr())", &[])
                .await
            {
                Ok(row) => {
                    lock(&self.outcome)
                        .committed
                        .push((self.id, seq, row.get(0)));
                    session = Some(current);
                }
                Err(e) => {
                    lock(&self.outcome)
                        .committed
                        .push((self.id, seq, String::new()));
                    let text = e.to_string();
                    self.record(Failure::Between(current.ended_with(&e).await, text));
                }
            }
        }
    }

    /// The rest of one transaction after BEGIN; the failure if a statement failed.
    async fn transaction(&self, session: &Session, seq: i32) -> Option<Failure> {
        let insert = format!(
            "INSERT INTO txs VALUES ({}, {seq}, host(inet_server_addr()))",
            self.id
        );
        let sleep = format!("SELECT pg_sleep({})", self.sleep.as_secs_f64());
        for (step, sql) in [
            ("insert", &insert),
            ("sleep", &sleep),
            ("commit", &"COMMIT".to_owned()),
        ] {
            if let Err(e) = session.client.batch_execute(sql).await {
                return Some(Failure::PartWay(step, e.to_string()));
            }
        }
        None
    }
}
