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

/// How a client's socket gets its local port.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LocalPort {
    /// The kernel picks one from the ephemeral range, as every client does.
    #[default]
    Ephemeral,
    /// Bound to an explicit port below the ephemeral range ([`PINNED_PORTS`]), so the client
    /// still connects while the kernel has no ephemeral port to give
    /// ([`crate::fault::PortShortage`]).
    Pinned,
}

/// The ports [`LocalPort::Pinned`] clients take in turn: below Linux's ephemeral range and
/// above the ports the tests and benchmarks listen on.
pub const PINNED_PORTS: std::ops::Range<u16> = 10_000..20_000;

/// [`connect`] with the local port chosen as `port` says. The connection is driven in the
/// background; its task ends when the session does.
pub async fn connect_with(
    conninfo: &str,
    port: LocalPort,
) -> Result<tokio_postgres::Client, String> {
    let error = |e: tokio_postgres::Error| roleproxy_common::error_chain(&e);
    if port == LocalPort::Ephemeral {
        return connect(conninfo).await.map_err(error);
    }
    let config: tokio_postgres::Config = conninfo.parse().map_err(error)?;
    let addr = match (config.get_hosts(), config.get_ports()) {
        ([tokio_postgres::config::Host::Tcp(host)], [port]) => host
            .parse::<std::net::IpAddr>()
            .map(|ip| std::net::SocketAddr::new(ip, *port))
            .map_err(|_| format!("a pinned client needs one IP host, not {host}"))?,
        _ => return Err("a pinned client needs one TCP host and port".into()),
    };
    let timeout = config
        .get_connect_timeout()
        .copied()
        .unwrap_or(Duration::from_secs(30));
    let stream = tokio::time::timeout(timeout, connect_pinned(addr))
        .await
        .map_err(|_| format!("connect to {addr}: no answer in {timeout:?}"))?
        .map_err(|e| format!("connect to {addr}: {e}"))?;
    let (client, connection) = tokio::time::timeout(timeout, config.connect_raw(stream, NoTls))
        .await
        .map_err(|_| format!("startup with {addr}: no answer in {timeout:?}"))?
        .map_err(error)?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// A TCP connection to `addr` from the next free port of [`PINNED_PORTS`].
async fn connect_pinned(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(PINNED_PORTS.start);
    let span = PINNED_PORTS.end - PINNED_PORTS.start;
    let mut last = None;
    // A port still held by an earlier connection (TIME_WAIT) fails to bind or to connect.
    for _ in 0..64 {
        let port = PINNED_PORTS.start + NEXT.fetch_add(1, Ordering::Relaxed) % span;
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        let local = match addr {
            std::net::SocketAddr::V4(_) => std::net::SocketAddr::from(([0u8; 4], port)),
            std::net::SocketAddr::V6(_) => std::net::SocketAddr::from(([0u16; 8], port)),
        };
        socket.set_reuseaddr(true)?;
        if let Err(e) = socket.bind(local) {
            last = Some(e);
            continue;
        }
        match socket.connect(addr).await {
            Ok(stream) => return Ok(stream),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::AddrInUse | std::io::ErrorKind::AddrNotAvailable
                ) =>
            {
                last = Some(e)
            }
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no pinned port free")))
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
        Self::start_with(conninfo, via, period, LocalPort::Ephemeral)
    }

    /// [`Writer::start`] with the clients' local ports chosen as `port` says.
    pub fn start_with(conninfo: String, via: &str, period: Duration, port: LocalPort) -> Writer {
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
                let result = write_one(&conninfo, &via, seq, port).await;
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

    pub async fn stop(mut self) -> Vec<Attempt> {
        let _ = self.stop.send(true);
        (&mut self.task).await.expect("writer task does not panic");
        std::mem::take(&mut *lock(&self.attempts))
    }
}

/// A writer dropped unstopped (a test that failed) stops writing.
impl Drop for Writer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Inserts row `(via, seq)` into `writes`; the server that took it.
const INSERT: &str = "INSERT INTO writes (via, seq, server) VALUES ($1, $2, host(inet_server_addr())) RETURNING server";

async fn write_one(conninfo: &str, via: &str, seq: i64, port: LocalPort) -> Result<String, String> {
    let client = connect_with(conninfo, port)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let row = insert(&client, via, seq).await;
    // Dropping the client ends the session (its connection task with it).
    drop(client);
    row
}

async fn insert(client: &tokio_postgres::Client, via: &str, seq: i64) -> Result<String, String> {
    client
        .query_one(INSERT, &[&via, &seq])
        .await
        .map(|row| row.get(0))
        .map_err(|e| format!("insert: {}", roleproxy_common::error_chain(&e)))
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
        .map_err(|e| roleproxy_common::error_chain(&e))?;
    let row = client
        .query_one("SELECT host(inet_server_addr()), pg_is_in_recovery()", &[])
        .await
        .map_err(|e| roleproxy_common::error_chain(&e))?;
    Ok((row.get(0), row.get(1)))
}

/// One acknowledged write: row `(via, seq)` taken by `server`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    pub via: String,
    pub seq: i64,
    pub server: String,
    pub started: Instant,
    pub finished: Instant,
}

/// A [`Writer`]'s acknowledged attempts as [`Ack`]s (`via` is the writer's label).
pub fn acks(via: &str, attempts: &[Attempt]) -> Vec<Ack> {
    attempts
        .iter()
        .filter_map(|a| {
            Some(Ack {
                via: via.to_owned(),
                seq: a.seq,
                server: a.result.clone().ok()?,
                started: a.started,
                finished: a.finished,
            })
        })
        .collect()
}

/// How one session of a [`Trickle`] ended before it was stopped: cut.
#[derive(Debug, Clone)]
pub struct Cut {
    pub session: usize,
    pub at: Instant,
    pub error: String,
}

/// What a [`Trickle`]'s sessions saw.
#[derive(Debug, Clone, Default)]
pub struct TrickleLog {
    pub acks: Vec<Ack>,
    pub cuts: Vec<Cut>,
    /// Sessions stuck in a write when stopped (a backend that stopped answering, a proxy
    /// that never closed them).
    pub hung: usize,
}

impl TrickleLog {
    /// Sessions that did not last: cut or hung.
    pub fn lost(&self) -> usize {
        self.cuts.len() + self.hung
    }
}

/// Open sessions, each writing one small row every `period` over its one connection, as an
/// app's pooled connections do. A session that fails is not reopened: it was cut, and the
/// count of cut sessions is what a fault is judged by. Row `via` is `<via>/s<k>`.
pub struct Trickle {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    log: Arc<Mutex<TrickleLog>>,
}

impl Trickle {
    /// Opens `sessions` sessions (all of them, or the first error) and starts their writes.
    pub async fn open(
        conninfo: &str,
        via: &str,
        sessions: usize,
        period: Duration,
        port: LocalPort,
    ) -> Result<Trickle, String> {
        let mut clients = Vec::with_capacity(sessions);
        for _ in 0..sessions {
            clients.push(connect_with(conninfo, port).await?);
        }
        let (stop, stopped) = watch::channel(false);
        let log = Arc::new(Mutex::new(TrickleLog::default()));
        let tasks = clients
            .into_iter()
            .enumerate()
            .map(|(session, client)| {
                let (log, mut stopped) = (Arc::clone(&log), stopped.clone());
                let via = format!("{via}/s{session}");
                tokio::spawn(async move {
                    let mut seq = 0;
                    while !*stopped.borrow() {
                        seq += 1;
                        let started = Instant::now();
                        match insert(&client, &via, seq).await {
                            Ok(server) => lock(&log).acks.push(Ack {
                                via: via.clone(),
                                seq,
                                server,
                                started,
                                finished: Instant::now(),
                            }),
                            Err(error) => {
                                let at = Instant::now();
                                lock(&log).cuts.push(Cut { session, at, error });
                                return;
                            }
                        }
                        // Not a wait: paces the writes, one every `period`.
                        tokio::select! {
                            _ = tokio::time::sleep_until(started + period) => {}
                            _ = stopped.changed() => {}
                        }
                    }
                })
            })
            .collect();
        Ok(Trickle { stop, tasks, log })
    }

    /// Sessions cut so far.
    pub fn cut(&self) -> usize {
        lock(&self.log).cuts.len()
    }

    /// Writes acknowledged so far, over all sessions.
    pub fn acknowledged(&self) -> usize {
        lock(&self.log).acks.len()
    }

    /// Whether every session still open, and at least one, has had a write acknowledged
    /// since `since`: the sessions are moving (none open is not moving).
    pub fn moving_since(&self, since: Instant) -> bool {
        let log = lock(&self.log);
        let open = self.tasks.len() - log.cuts.len();
        let mut fresh: Vec<&str> = log
            .acks
            .iter()
            .filter(|a| a.started >= since)
            .map(|a| a.via.as_str())
            .collect();
        fresh.sort_unstable();
        fresh.dedup();
        open > 0 && fresh.len() >= open
    }

    /// Stops the sessions after their write in flight; one still stuck after `grace` is
    /// counted as hung and abandoned.
    pub async fn stop(mut self, grace: Duration) -> TrickleLog {
        let _ = self.stop.send(true);
        let mut hung = 0;
        for task in &mut self.tasks {
            if tokio::time::timeout(grace, &mut *task).await.is_err() {
                task.abort();
                hung += 1;
            }
        }
        let mut log = std::mem::take(&mut *lock(&self.log));
        log.hung = hung;
        log
    }
}

/// Sessions dropped unstopped (a test that failed) end.
impl Drop for Trickle {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Who led when: each entry names the nodes (their addresses, as `inet_server_addr()` gives
/// them) that may take writes from that instant on. Two during a handover whose exact instant
/// is not known (a promotion takes a while to report that it is done), none while nobody leads.
#[derive(Debug, Clone)]
pub struct Timeline {
    entries: Vec<(Instant, Vec<String>)>,
    /// One instant on both clocks, to place a node's timestamps ([`Row::at`]).
    anchor: (Instant, std::time::SystemTime),
}

impl Timeline {
    /// `leader` leads from `at` on (and, for the record, before it too).
    pub fn starting(leader: &str, at: Instant) -> Timeline {
        Timeline {
            entries: vec![(at, vec![leader.to_owned()])],
            anchor: (Instant::now(), std::time::SystemTime::now()),
        }
    }

    /// The instant a wall-clock time of this machine stands for.
    pub fn instant_of(&self, wall: std::time::SystemTime) -> Instant {
        let (instant, system) = self.anchor;
        match wall.duration_since(system) {
            Ok(after) => instant + after,
            Err(before) => instant - before.duration(),
        }
    }

    /// Rows a node took while it was not the leader.
    pub fn stray_rows<'a>(&self, rows: &'a [Row]) -> Vec<&'a Row> {
        rows.iter()
            .filter(|r| !self.led(&r.server, self.instant_of(r.at)))
            .collect()
    }

    /// From `at` on, `leaders` may take writes.
    pub fn then(&mut self, at: Instant, leaders: &[&str]) {
        let leaders = leaders.iter().map(|l| (*l).to_owned()).collect();
        self.entries.push((at, leaders));
        self.entries.sort_by_key(|(at, _)| *at);
    }

    /// Whether `server` led at `t`.
    pub fn led(&self, server: &str, t: Instant) -> bool {
        let entry = self.entries.iter().rev().find(|(from, _)| *from <= t);
        entry
            .or(self.entries.first())
            .is_some_and(|(_, leaders)| leaders.iter().any(|l| l == server))
    }

    /// Writes acknowledged by a node that was not the leader when they were sent, nor when
    /// they were acknowledged (a client that waited for a route through a promotion was
    /// served by a leader). [`Timeline::stray_rows`] places a write exactly, by the node's
    /// own clock, where the node can still be read.
    pub fn strays<'a>(&self, acks: &'a [Ack]) -> Vec<&'a Ack> {
        acks.iter()
            .filter(|a| !self.led(&a.server, a.started) && !self.led(&a.server, a.finished))
            .collect()
    }
}

/// The longest stretch of `[from, to]` without an instant of `done` (the edges count: no
/// instant at all is the whole stretch). Pure.
pub fn longest_gap(done: &[Instant], from: Instant, to: Instant) -> Duration {
    let mut inside: Vec<Instant> = done
        .iter()
        .copied()
        .filter(|t| *t >= from && *t <= to)
        .collect();
    inside.sort();
    std::iter::once(from)
        .chain(inside)
        .chain(std::iter::once(to))
        .collect::<Vec<_>>()
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default()
}

/// From `event` to the first write sent at or after it that `server` acknowledged (any
/// server when `None`). Pure.
pub fn resumed_after(
    attempts: &[Attempt],
    event: Instant,
    server: Option<&str>,
) -> Option<Duration> {
    attempts
        .iter()
        .find(|a| {
            a.started >= event
                && a.result
                    .as_deref()
                    .is_ok_and(|s| server.is_none_or(|want| s == want))
        })
        .map(|a| a.finished.saturating_duration_since(event))
}

/// A row of `writes` as a node has it.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub via: String,
    pub seq: i64,
    /// The node that took it.
    pub server: String,
    /// When that node took it (its `clock_timestamp()`).
    pub at: std::time::SystemTime,
}

/// Every row in node `i`'s `writes` whose `via` starts with `prefix` (letters, digits, `-`,
/// `/` and `_` only), read over the node's unix socket, so it works whatever the network does.
pub fn rows_on(pg: &crate::pg::PgCluster, i: usize, prefix: &str) -> Result<Vec<Row>, String> {
    if !prefix
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-/_".contains(c))
    {
        return Err(format!("not a plain prefix: {prefix:?}"));
    }
    let query = format!(
        "SELECT via, seq, server, extract(epoch FROM at) FROM writes WHERE via LIKE '{prefix}%'"
    );
    let text = pg.sql(i, &[&query]).map_err(|e| e.to_string())?;
    Ok(text.lines().filter_map(parse_row).collect())
}

/// A row as `psql -A -t` prints it: `via|seq|server|epoch seconds`.
fn parse_row(line: &str) -> Option<Row> {
    let mut fields = line.split('|');
    let (via, seq, server, epoch) = (
        fields.next()?,
        fields.next()?,
        fields.next()?,
        fields.next()?,
    );
    let epoch: f64 = epoch.parse().ok()?;
    Some(Row {
        via: via.to_owned(),
        seq: seq.parse().ok()?,
        server: server.to_owned(),
        at: std::time::UNIX_EPOCH + Duration::from_secs_f64(epoch),
    })
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
    fn a_gap_counts_from_and_to_the_window_edges() {
        let base = Instant::now();
        let ms = |n| base + Duration::from_millis(n);
        let done = [ms(100), ms(150), ms(900), ms(5000)];
        assert_eq!(
            longest_gap(&done, ms(0), ms(1000)),
            Duration::from_millis(750)
        );
        assert_eq!(
            longest_gap(&done, ms(0), ms(2000)),
            Duration::from_millis(1100)
        );
        assert_eq!(longest_gap(&[], ms(0), ms(300)), Duration::from_millis(300));
    }

    #[test]
    fn strays_are_writes_a_node_took_while_another_led() {
        let base = Instant::now();
        let ack = |server: &str, at_ms: u64| Ack {
            via: "t".into(),
            seq: at_ms as i64,
            server: server.into(),
            started: base + Duration::from_millis(at_ms),
            finished: base + Duration::from_millis(at_ms + 5),
        };
        let mut timeline = Timeline::starting("old", base);
        timeline.then(base + Duration::from_millis(100), &[]);
        timeline.then(base + Duration::from_millis(200), &["old", "new"]);
        timeline.then(base + Duration::from_millis(280), &["new"]);
        let acks = vec![
            ack("old", 50),
            ack("old", 150),
            ack("new", 210),
            ack("old", 250),
            ack("old", 300),
            // Sent while nobody led, taken once "new" did.
            Ack {
                finished: base + Duration::from_millis(290),
                ..ack("new", 120)
            },
        ];
        let strays: Vec<i64> = timeline.strays(&acks).iter().map(|a| a.seq).collect();
        assert_eq!(strays, vec![150, 300]);
        assert!(timeline.led("old", base));
        assert!(!timeline.led("new", base));
        // A second from now, when "new" alone leads.
        let wall = std::time::SystemTime::now() + Duration::from_secs(1);
        let row = |server: &str| {
            parse_row(&format!(
                "t/s0|7|{server}|{}",
                wall.duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_secs_f64()
            ))
            .expect("a row")
        };
        let rows = [row("old"), row("new")];
        let then = timeline
            .instant_of(wall)
            .saturating_duration_since(Instant::now());
        assert!(then > Duration::from_millis(500) && then <= Duration::from_secs(1));
        let strays: Vec<&str> = timeline
            .stray_rows(&rows)
            .iter()
            .map(|r| r.server.as_str())
            .collect();
        assert_eq!(strays, vec!["old"], "{rows:?}");
    }

    #[test]
    fn resumption_is_on_the_named_server() {
        let base = Instant::now();
        let mut attempts = vec![
            attempt(1, 0, 5, true, base),
            attempt(2, 100, 120, true, base),
        ];
        attempts[1].result = Ok("b".into());
        let event = base + Duration::from_millis(1);
        assert_eq!(
            resumed_after(&attempts, event, Some("b")),
            Some(Duration::from_millis(119))
        );
        assert_eq!(resumed_after(&attempts, event, Some("a")), None);
        assert_eq!(
            resumed_after(&attempts, base, None),
            Some(Duration::from_millis(5))
        );
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
