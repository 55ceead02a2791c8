//! A client that writes one row per new connection, as an app with no pool would, and records
//! what it saw. The failover tests and benchmarks judge a proxy by these records.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_postgres::NoTls;

use crate::lock;

/// The table every writer inserts into; create it on the leader with [`CREATE_TABLE`].
pub const CREATE_TABLE: &str = "CREATE TABLE IF NOT EXISTS writes (
    via text NOT NULL,
    seq bigint NOT NULL,
    server text NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (via, seq)
)";

/// A libpq conninfo for the `postgres` database at `addr`, as the tests and benchmarks connect.
pub fn conninfo(addr: std::net::SocketAddr) -> String {
    format!(
        "host={} port={} user=postgres dbname=postgres connect_timeout=30",
        addr.ip(),
        addr.port()
    )
}

/// Connects and drives the connection in the background.
pub async fn connect(conninfo: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(conninfo, NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// One attempt: a new connection and one INSERT.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub seq: i64,
    pub started: Instant,
    pub finished: Instant,
    /// The server address that acknowledged the row, or the error the client saw.
    pub result: Result<String, String>,
}

impl Attempt {
    pub fn ok(&self) -> bool {
        self.result.is_ok()
    }
}

/// A running writer; [`Writer::stop`] returns every attempt in order.
pub struct Writer {
    stop: watch::Sender<bool>,
    attempts: Arc<Mutex<Vec<Attempt>>>,
    task: JoinHandle<()>,
}

impl Writer {
    /// Starts writing through `conninfo` every `period` (the next attempt starts `period` after
    /// the previous one started, or at once if that one took longer). `via` labels the rows.
    pub fn start(conninfo: String, via: &str, period: Duration) -> Writer {
        let (stop, mut stopped) = watch::channel(false);
        let via = via.to_string();
        let attempts = Arc::new(Mutex::new(Vec::new()));
        let record = Arc::clone(&attempts);
        let task = tokio::spawn(async move {
            let mut seq = 0i64;
            loop {
                if *stopped.borrow() {
                    return;
                }
                seq += 1;
                let started = Instant::now();
                let result = write_one(&conninfo, &via, seq).await;
                lock(&record).push(Attempt {
                    seq,
                    started,
                    finished: Instant::now(),
                    result,
                });
                // Not a wait: paces the writes, one every `period`.
                tokio::select! {
                    _ = tokio::time::sleep_until(started + period) => {}
                    _ = stopped.changed() => {}
                }
            }
        });
        Writer {
            stop,
            attempts,
            task,
        }
    }

    /// Whether a write has been acknowledged by `server` so far: an event a test waits for.
    pub fn landed_on(&self, server: &str) -> bool {
        lock(&self.attempts)
            .iter()
            .any(|a| a.result.as_deref() == Ok(server))
    }

    /// How many writes have been acknowledged so far, by any server.
    pub fn acknowledged(&self) -> usize {
        lock(&self.attempts).iter().filter(|a| a.ok()).count()
    }

    pub async fn stop(self) -> Vec<Attempt> {
        let _ = self.stop.send(true);
        self.task.await.expect("writer task does not panic");
        std::mem::take(&mut *lock(&self.attempts))
    }
}

async fn write_one(conninfo: &str, via: &str, seq: i64) -> Result<String, String> {
    let (client, connection) = tokio_postgres::connect(conninfo, NoTls)
        .await
        .map_err(|e| format!("connect: {}", roleproxy::error_chain(&e)))?;
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    let row = client
        .query_one(
            "INSERT INTO writes (via, seq, server) VALUES ($1, $2, host(inet_server_addr())) RETURNING server",
            &[&via, &seq],
        )
        .await
        .map_err(|e| format!("insert: {}", roleproxy::error_chain(&e)));
    drop(client);
    let _ = driver.await;
    row.map(|r| r.get(0))
}

/// What one failover looked like to a writer.
#[derive(Debug, Clone)]
pub struct Outage {
    /// From `event` to the first acknowledged write that started after it.
    pub writes_down: Option<Duration>,
    /// Attempts that ended in an error, from `event` on.
    pub errors: usize,
    /// Attempts from `event` until writes resumed.
    pub attempts: usize,
}

/// Measures the outage a writer saw after `event` (a kill or a role change). Pure.
pub fn outage(attempts: &[Attempt], event: Instant) -> Outage {
    let after: Vec<&Attempt> = attempts.iter().filter(|a| a.finished >= event).collect();
    let resumed = after.iter().find(|a| a.ok() && a.started >= event);
    let until = resumed.map(|a| a.finished);
    Outage {
        writes_down: until.map(|t| t - event),
        errors: after
            .iter()
            .filter(|a| !a.ok() && until.is_none_or(|u| a.finished <= u))
            .count(),
        attempts: after
            .iter()
            .filter(|a| until.is_none_or(|u| a.finished <= u))
            .count(),
    }
}

/// The longest time between two acknowledged writes that finished within `window` around
/// `event` (from `before` ahead of it to `after` past it): the pause the application felt,
/// wherever in the failover it fell. Pure.
pub fn longest_pause(
    attempts: &[Attempt],
    event: Instant,
    before: Duration,
    after: Duration,
) -> Option<Duration> {
    let (from, to) = (event - before, event + after);
    let done: Vec<Instant> = attempts
        .iter()
        .filter(|a| a.ok() && a.finished >= from && a.finished <= to)
        .map(|a| a.finished)
        .collect();
    done.windows(2).map(|w| w[1] - w[0]).max()
}

/// (server address, in recovery) of a new session through `conninfo`: which node a client
/// reached, and whether it can take writes.
pub async fn served(conninfo: &str) -> Result<(String, bool), String> {
    let client = connect(conninfo)
        .await
        .map_err(|e| roleproxy::error_chain(&e))?;
    let row = client
        .query_one("SELECT host(inet_server_addr()), pg_is_in_recovery()", &[])
        .await
        .map_err(|e| roleproxy::error_chain(&e))?;
    Ok((row.get(0), row.get(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attempt(seq: i64, start_ms: u64, end_ms: u64, ok: bool, base: Instant) -> Attempt {
        Attempt {
            seq,
            started: base + Duration::from_millis(start_ms),
            finished: base + Duration::from_millis(end_ms),
            result: if ok { Ok("a".into()) } else { Err("e".into()) },
        }
    }

    #[test]
    fn outage_counts_from_the_event_to_the_first_new_write() {
        let base = Instant::now();
        let attempts = vec![
            attempt(1, 0, 5, true, base),
            attempt(2, 50, 60, false, base),
            attempt(3, 100, 900, true, base),
            attempt(4, 950, 960, true, base),
        ];
        let seen = outage(&attempts, base + Duration::from_millis(40));
        assert_eq!(seen.writes_down, Some(Duration::from_millis(860)));
        assert_eq!(seen.errors, 1);
        assert_eq!(seen.attempts, 2);
    }

    #[test]
    fn longest_pause_spans_the_gap_between_acknowledged_writes() {
        let base = Instant::now() + Duration::from_secs(10);
        let attempts = vec![
            attempt(1, 0, 5, true, base),
            attempt(2, 50, 55, true, base),
            attempt(3, 100, 600, false, base),
            attempt(4, 600, 1200, true, base),
            attempt(5, 1250, 1255, true, base),
        ];
        let pause = longest_pause(
            &attempts,
            base + Duration::from_millis(100),
            Duration::from_secs(1),
            Duration::from_secs(5),
        );
        assert_eq!(pause, Some(Duration::from_millis(1145)));
    }

    #[test]
    fn no_resumption_is_reported_as_none() {
        let base = Instant::now();
        let attempts = vec![attempt(1, 0, 5, false, base)];
        let seen = outage(&attempts, base);
        assert_eq!(seen.writes_down, None);
        assert_eq!(seen.errors, 1);
    }
}
