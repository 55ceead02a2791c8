//! One role check → [`Role`]: one node asked once, and what it said. The loop that repeats it
//! belongs to the leader view, which owns every backend's state.
//!
//! Three kinds of check ([`Probe`]): Fly's `GET /flycheck/role` whose body is the role word,
//! Patroni's REST API where the status of `GET /primary` and `/replica` is the answer, and a
//! Postgres connection that asks `pg_is_in_recovery()` and the timeline.
//!
//! The node is untrusted input: the whole exchange has a deadline, an HTTP answer's head
//! ([`MAX_HEAD`]) and body ([`MAX_BODY`]) size caps, and a Postgres exchange caps of its own
//! ([`pgclient`]), so a hung or hostile endpoint costs one timeout, never memory or a stuck
//! loop. What it says is escaped ([`printable`]) before it is kept, so it cannot forge a log
//! line or drive a terminal. The Postgres check hands a node no credential but a SCRAM-SHA-256
//! proof.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use roleproxy_core::pgwire;
use roleproxy_core::printable;
use roleproxy_core::route::{Liveness, Role};

use crate::config::{CheckConfig, CheckKind, CheckTls};
use crate::http_client::{self, HttpError};
use crate::metrics::warning;
use crate::pgclient::{self, PgClientError, Tls};
use crate::reserve::is_local_shortage;
use roleproxy_common::ratelimit;

/// A role answer larger than this is not a role; it is an error.
pub const MAX_BODY: usize = 1024;
/// The largest response head (status line and headers) read from a role endpoint; a larger
/// one fails the check. Role endpoints send a handful of short headers; 8 KiB is the least
/// hyper reads with, where its default would buffer about 400 KiB per check.
pub const MAX_HEAD: usize = 8 * 1024;
/// The most headers a role endpoint's answer may have.
const MAX_HEADERS: usize = 32;

/// How every backend is checked.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckSettings {
    /// The role endpoint's port on each node; `None`: the backend's own address (Postgres).
    pub port: Option<u16>,
    pub timeout: Duration,
    /// Bound on a check's TCP handshake (`check.probe_timeout`, within `check.timeout`): a node
    /// that takes longer is treated as a failed check at once, so a black-holed leader's
    /// Postgres is probed without waiting out the whole check timeout.
    pub connect_timeout: Duration,
    pub interval: Duration,
    /// Used while there is no route, so a new leader is found quickly.
    pub fast_interval: Duration,
    pub probe: Probe,
}

/// What one check asks, by `check.kind`.
#[derive(Clone, PartialEq)]
pub enum Probe {
    HttpBody {
        path: String,
        /// Lower-case words that mean leader.
        leader: Vec<String>,
    },
    HttpStatus {
        leader_path: String,
        replica_path: String,
    },
    Postgres {
        user: String,
        password: String,
        database: String,
        /// `None`: unencrypted (`check.tls = "disable"`).
        tls: Option<Tls>,
    },
}

impl std::fmt::Debug for Probe {
    /// Leaves the password out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Probe::HttpBody { path, leader } => write!(f, "http-body GET {path} leader={leader:?}"),
            Probe::HttpStatus {
                leader_path,
                replica_path,
            } => write!(f, "http-status GET {leader_path} | {replica_path}"),
            Probe::Postgres {
                user,
                database,
                tls,
                ..
            } => {
                write!(f, "postgres user={user} dbname={database}")?;
                match tls {
                    Some(tls) => write!(f, " {tls:?}"),
                    None => f.write_str(" tls=disable"),
                }
            }
        }
    }
}

impl CheckSettings {
    /// Where a backend's role is asked.
    pub fn endpoint(&self, backend: SocketAddr) -> SocketAddr {
        self.port
            .map_or(backend, |port| SocketAddr::new(backend.ip(), port))
    }

    pub fn from_config(c: &CheckConfig) -> CheckSettings {
        let probe = match c.kind {
            CheckKind::HttpBody => Probe::HttpBody {
                path: c.path.clone(),
                leader: c.leader.clone(),
            },
            CheckKind::HttpStatus => Probe::HttpStatus {
                leader_path: c.leader_path.clone(),
                replica_path: c.replica_path.clone(),
            },
            CheckKind::Postgres => Probe::Postgres {
                user: c.user.clone(),
                password: c.password.0.clone(),
                database: c.database.clone(),
                tls: tls_of(c),
            },
        };
        CheckSettings {
            port: (c.kind != CheckKind::Postgres).then_some(c.port),
            timeout: c.timeout,
            connect_timeout: c.probe_timeout.min(c.timeout),
            interval: c.interval,
            fast_interval: c.fast_interval,
            probe,
        }
    }
}

/// The check's TLS, from settings the configuration has validated. A name it could not read
/// (it never is) would leave the node's address to be verified instead, never less.
fn tls_of(c: &CheckConfig) -> Option<Tls> {
    let name = (!c.tls_server_name.is_empty())
        .then(|| crate::config::server_name(&c.tls_server_name).ok())
        .flatten();
    match c.tls {
        CheckTls::Disable => None,
        CheckTls::Require => Some(Tls::require(name)),
        CheckTls::VerifyFull => Some(Tls::verify_full(c.tls_roots.clone(), name)),
    }
}

/// One check's answer: the role, and for Postgres checks of a leader, its timeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    pub role: Role,
    pub timeline: Option<u32>,
}

impl From<Role> for Observation {
    fn from(role: Role) -> Self {
        Observation {
            role,
            timeline: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum CheckError {
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("no TCP handshake within {0:?}")]
    ConnectTimeout(Duration),
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error(transparent)]
    Postgres(PgClientError),
    /// The node answered but is out of resources (Postgres SQLSTATE class 53, e.g. too many
    /// connections): it says nothing about its role.
    #[error("{0}")]
    Busy(String),
}

/// Maps an HTTP answer to a role (routing rule 1: positive evidence only). Pure.
///
/// The body is the node's own text, kept in the role for the log, `/status` and the stats
/// page: shortened, and its control characters written out, so a newline cannot start a
/// forged log line and an escape sequence cannot reach a terminal.
pub fn role_from_answer(status: u16, body: &[u8], leader: &[String]) -> Role {
    let text = String::from_utf8_lossy(body);
    let word = text.trim().to_ascii_lowercase();
    match status {
        200..=299 => {
            if leader.contains(&word) {
                Role::Leader
            } else if word == "replica" {
                Role::Replica
            } else if word.is_empty() {
                Role::Down(format!("HTTP {status} with an empty body"))
            } else {
                Role::Other(shorten(&word, 64))
            }
        }
        404 => Role::Maintenance,
        _ => Role::Down(format!("HTTP {status}: {}", shorten(text.trim(), 200))),
    }
}

/// `text` made [`printable`], then cut to at most `max` characters: escaping first keeps the
/// bound whatever control characters a node sends.
fn shorten(text: &str, max: usize) -> String {
    let text = printable(text);
    match text.char_indices().nth(max) {
        Some((i, _)) => format!("{}...", &text[..i]),
        None => text.into_owned(),
    }
}

/// Maps Patroni's answers to `GET /primary` and (when asked) `GET /replica` to a role. Pure.
/// 200 means yes and 503 means no; anything else is not Patroni answering.
pub fn role_from_statuses(leader: u16, replica: Option<u16>) -> Role {
    match (leader, replica) {
        (200, _) => Role::Leader,
        (503, Some(200)) => Role::Replica,
        (503, Some(503)) => Role::Other("neither primary nor replica".into()),
        (503, None) => Role::Other("not primary".into()),
        (503, Some(status)) | (status, _) => {
            Role::Down(format!("HTTP {status}, expected 200 or 503"))
        }
    }
}

/// Checks one node once. A failure of the node is `Role::Down` with the reason; `None`
/// means the check could not tell: this process is out of descriptors or memory, or the node
/// is too busy to answer (a full leader must not lose its sessions for it). Neither may move
/// the route.
pub async fn check_role(endpoint: SocketAddr, settings: &CheckSettings) -> Option<Observation> {
    let asked = probe(endpoint, settings.connect_timeout, &settings.probe);
    match tokio::time::timeout(settings.timeout, asked).await {
        Ok(Ok(observation)) => Some(observation),
        Ok(Err(CheckError::Connect(e))) if is_local_shortage(&e) => {
            if let Some(suppressed) = ratelimit::allow(warning::CHECK_SKIPPED, endpoint) {
                tracing::warn!(%endpoint, error = %e, suppressed, "check skipped: this host is short of descriptors, memory or ports");
            }
            crate::metrics::local_shortage("check");
            None
        }
        Ok(Err(CheckError::Busy(reason))) => {
            let reason = printable(&reason);
            if let Some(suppressed) = ratelimit::allow(warning::CHECK_SKIPPED, endpoint) {
                tracing::warn!(%endpoint, %reason, suppressed, "check skipped: the node is out of resources");
            }
            None
        }
        Ok(Err(CheckError::Postgres(
            e @ (PgClientError::Refused(_)
            | PgClientError::NoScram(_)
            | PgClientError::TooManyIterations(_)),
        ))) => {
            // Every time: a node that asks for a password in the clear may not be a node.
            let error = printable(&e.to_string()).into_owned();
            tracing::error!(%endpoint, %error, "check failed: no password was sent");
            Some(Role::Down(error).into())
        }
        // Errors can quote the node (a server's message, a malformed header).
        Ok(Err(e)) => Some(Role::Down(printable(&e.to_string()).into_owned()).into()),
        Err(_) => Some(Role::Down(CheckError::Timeout(settings.timeout).to_string()).into()),
    }
}

/// Connects to `endpoint` within `within`.
async fn connect(endpoint: SocketAddr, within: Duration) -> Result<TcpStream, CheckError> {
    let stream = tokio::time::timeout(within, TcpStream::connect(endpoint))
        .await
        .map_err(|_| CheckError::ConnectTimeout(within))?
        .map_err(CheckError::Connect)?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

async fn probe(
    endpoint: SocketAddr,
    connect_within: Duration,
    probe: &Probe,
) -> Result<Observation, CheckError> {
    let fetch =
        |path| async move { fetch(connect(endpoint, connect_within).await?, endpoint, path).await };
    match probe {
        Probe::HttpBody { path, leader } => {
            let (status, body) = fetch(path).await?;
            Ok(role_from_answer(status, &body, leader).into())
        }
        Probe::HttpStatus {
            leader_path,
            replica_path,
        } => {
            let (leader, _) = fetch(leader_path).await?;
            // Only a node that is not primary is asked whether it is a replica.
            let replica = match leader {
                503 => Some(fetch(replica_path).await?.0),
                _ => None,
            };
            Ok(role_from_statuses(leader, replica).into())
        }
        Probe::Postgres {
            user,
            password,
            database,
            tls,
        } => {
            let login = pgclient::Login {
                user,
                password,
                database,
            };
            let stream = connect(endpoint, connect_within).await?;
            ask_postgres(stream, tls.as_ref(), &login).await
        }
    }
}

/// The timeline of a primary is the first 8 hex digits of its current WAL file's name; a
/// standby has none that matters for routing.
const ROLE_QUERY: &str = "SELECT pg_is_in_recovery(), \
     CASE WHEN pg_is_in_recovery() THEN NULL \
     ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int8 END";

async fn ask_postgres(
    stream: TcpStream,
    tls: Option<&Tls>,
    login: &pgclient::Login<'_>,
) -> Result<Observation, CheckError> {
    let row = match pgclient::query_row(stream, tls, login, ROLE_QUERY).await {
        Ok(row) => row,
        Err(e) if e.code().is_some_and(|code| code.starts_with("53")) => {
            return Err(CheckError::Busy(e.to_string()))
        }
        Err(e) => return Err(CheckError::Postgres(e)),
    };
    observation_from_row(&row).ok_or_else(|| {
        CheckError::Postgres(PgClientError::Protocol(
            "the role query's row is not a boolean and a timeline".into(),
        ))
    })
}

/// `pg_is_in_recovery()` and the timeline, as the simple query protocol sends them: `t` or `f`,
/// and a number or NULL. Pure.
fn observation_from_row(row: &[Option<String>]) -> Option<Observation> {
    let role = match row.first()?.as_deref()? {
        "t" => Role::Replica,
        "f" => Role::Leader,
        _ => return None,
    };
    let timeline = match row.get(1)? {
        Some(text) => Some(text.parse::<i64>().ok()?),
        None => None,
    };
    Some(Observation {
        role,
        timeline: timeline.and_then(|t| u32::try_from(t).ok()),
    })
}

/// Asks the Postgres at `addr` whether it takes connections, as `pg_isready` does: a
/// StartupMessage for [`pgwire::PROBE_USER`], the first answer read, then Terminate. No
/// credentials are sent and no session stays open. A timeout says which half ran out: no TCP
/// handshake ([`Liveness::Silent`]) or no answer once connected ([`Liveness::Stalled`], a
/// stalled postmaster whose kernel still queues connections). `None`: this host is short of
/// descriptors, memory or ports, which says nothing about the node.
pub async fn probe_postgres(addr: SocketAddr, timeout: Duration) -> Option<Liveness> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut stream = match tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await {
        Err(_) => return Some(Liveness::Silent(format!("within {timeout:?}"))),
        Ok(Err(e)) if is_local_shortage(&e) => return None,
        Ok(Err(e)) => return Some(Liveness::Gone(format!("connect: {e}"))),
        Ok(Ok(stream)) => stream,
    };
    let _ = stream.set_nodelay(true);
    match tokio::time::timeout_at(deadline, ask_postmaster(&mut stream)).await {
        Ok(answer) => Some(answer),
        Err(_) => Some(Liveness::Stalled(format!("within {timeout:?}"))),
    }
}

async fn ask_postmaster(stream: &mut TcpStream) -> Liveness {
    if let Err(e) = stream.write_all(&pgwire::probe_startup()).await {
        return Liveness::Gone(format!("sending the startup: {e}"));
    }
    let mut received = Vec::with_capacity(256);
    let mut buf = [0u8; 1024];
    let answer = loop {
        match stream.read(&mut buf).await {
            Ok(0) => break Liveness::Gone("closed before answering".into()),
            Ok(n) => {
                received.extend_from_slice(&buf[..n]);
                if let Some(answer) = pgwire::read_liveness(&received) {
                    break answer;
                }
            }
            Err(e) => break Liveness::Gone(format!("reading the answer: {e}")),
        }
    };
    let _ = stream.write_all(&pgwire::TERMINATE).await;
    let _ = stream.shutdown().await;
    answer
}

async fn fetch(
    stream: TcpStream,
    endpoint: SocketAddr,
    path: &str,
) -> Result<(u16, Bytes), CheckError> {
    let host = endpoint.ip().to_string();
    let ask = http_client::Ask {
        method: hyper::Method::GET,
        path,
        host: &host,
        bearer: None,
    };
    let limits = http_client::Limits {
        head: MAX_HEAD,
        headers: MAX_HEADERS,
        body: MAX_BODY,
    };
    Ok(http_client::exchange(stream, ask, limits).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_map_to_roles() {
        let leader = vec!["leader".to_string(), "primary".to_string()];
        let rows: &[(u16, &[u8], Role)] = &[
            (200, b"leader", Role::Leader),
            (200, b"  Leader\n", Role::Leader),
            (200, b"PRIMARY", Role::Leader),
            (204, b"primary", Role::Leader),
            (200, b"replica", Role::Replica),
            (200, b"readonly", Role::Other("readonly".into())),
            (200, b"zombie", Role::Other("zombie".into())),
            (200, b"not the leader", Role::Other("not the leader".into())),
            (200, b"leaderboard", Role::Other("leaderboard".into())),
            (200, b"", Role::Down("HTTP 200 with an empty body".into())),
            (404, b"leader", Role::Maintenance),
            (
                500,
                b"failed to connect to local node",
                Role::Down("HTTP 500: failed to connect to local node".into()),
            ),
            (503, b"", Role::Down("HTTP 503: ".into())),
            (301, b"leader", Role::Down("HTTP 301: leader".into())),
            (
                500,
                b"down\n2024-01-01T00:00:00Z ERROR forged\x1b]0;t\x07\x1b[2J",
                Role::Down(
                    "HTTP 500: down\\u{a}2024-01-01T00:00:00Z ERROR forged\\u{1b}]0;t\\u{7}\\u{1b}[2J"
                        .into(),
                ),
            ),
            (
                200,
                b"odd\rword",
                Role::Other("odd\\u{d}word".into()),
            ),
        ];
        for (status, body, expected) in rows {
            assert_eq!(
                &role_from_answer(*status, body, &leader),
                expected,
                "HTTP {status} {:?}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn patroni_statuses_map_to_roles() {
        let rows: &[(u16, Option<u16>, Role)] = &[
            (200, None, Role::Leader),
            (200, Some(503), Role::Leader),
            (503, None, Role::Other("not primary".into())),
            (503, Some(200), Role::Replica),
            (
                503,
                Some(503),
                Role::Other("neither primary nor replica".into()),
            ),
            (
                503,
                Some(500),
                Role::Down("HTTP 500, expected 200 or 503".into()),
            ),
            (
                404,
                None,
                Role::Down("HTTP 404, expected 200 or 503".into()),
            ),
            (
                401,
                Some(200),
                Role::Down("HTTP 401, expected 200 or 503".into()),
            ),
        ];
        for (leader, replica, expected) in rows {
            assert_eq!(
                &role_from_statuses(*leader, *replica),
                expected,
                "{leader} {replica:?}"
            );
        }
    }

    #[test]
    fn role_query_rows_map_to_observations() {
        let text = |v: &str| Some(v.to_string());
        let rows: Vec<(Vec<Option<String>>, Option<Observation>)> = vec![
            (
                vec![text("f"), text("3")],
                Some(Observation {
                    role: Role::Leader,
                    timeline: Some(3),
                }),
            ),
            (vec![text("t"), None], Some(Role::Replica.into())),
            (vec![text("f"), text("-1")], Some(Role::Leader.into())),
            (vec![text("f"), text("x")], None),
            (vec![text("yes"), None], None),
            (vec![None, None], None),
            (vec![text("t")], None),
            (vec![], None),
        ];
        for (row, expected) in rows {
            assert_eq!(observation_from_row(&row), expected, "{row:?}");
        }
    }

    #[test]
    fn long_error_text_is_shortened() {
        let body = "x".repeat(5000);
        match role_from_answer(500, body.as_bytes(), &[]) {
            Role::Down(text) => assert!(text.len() < 220, "{}", text.len()),
            other => panic!("expected down, got {other:?}"),
        }
    }
}
