//! Role endpoint for nodes that have none: answers `GET /flycheck/role` the way Fly's
//! Postgres images do, so the proxy's checks work against plain Postgres (Patroni, repmgr,
//! hand-made replicas and the test clusters).
//!
//! It runs on the database nodes as `roleproxy agent`, the proxy's binary calling
//! [`serve_with`]. It depends on nothing of the proxy: what the two share (the bounded HTTP
//! server, rate-limited warnings) is in `roleproxy-common`.
//!
//! Wire format: HTTP 200 with the bare word `leader` (read-write) or `replica` (read-only),
//! HTTP 500 with what failed when the node cannot tell, HTTP 404 for any other path.
//!
//! Every node's proxy checks every node's agent, and so can anything else on the private
//! network. However many requests arrive, the agent asks Postgres at most once per
//! [`AgentOptions::reuse_for`]:
//! - concurrent requests share one query, and its answer is reused for a short time;
//! - each query runs on a new connection, which sees the server's current settings;
//! - one connection is kept open besides, and asked only when Postgres has no connection slot
//!   left, which is when a busy node most needs to be told apart from a dead one. It holds one
//!   backend slot for as long as the agent runs. It is not asked every time because a session
//!   that lives on sees a configuration reload (a node made read-only) only once the
//!   postmaster has signalled it.
//!
//! Error bodies say what failed (timed out, login refused, no slot left, SQLSTATE) but never
//! quote the server: its messages can name users and `pg_hba.conf` lines. The full text goes
//! to the agent's log, its control characters written out so it cannot forge a line there.

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_postgres::{Client, Config, NoTls, SimpleQueryMessage};
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::{debug, info, warn};

use roleproxy_common::error_chain;
use roleproxy_common::httpd::{self, Limits};
use roleproxy_common::ratelimit::{self, warning};
use roleproxy_core::printable;

/// [`AgentOptions::password`]'s type, kept out of `Debug` output and logs.
pub use roleproxy_common::Secret;

/// The log target the agent always had, as a module of the proxy's crate: filters such as
/// `RUST_LOG=roleproxy::agent=debug` and the log lines themselves read as before.
const LOG: &str = "roleproxy::agent";

/// The only path the agent answers.
pub const ROLE_PATH: &str = "/flycheck/role";

/// Upper bound for one query, connect included; below the proxy's default 5 s check
/// timeout so a hung Postgres shows up as a 500 rather than as a dead agent.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// How long one answer is reused by default: half the proxy's default 100 ms fast interval, so
/// a promotion is seen within 0.2 s of it as without reuse, while a flood of requests costs at
/// most twenty queries a second.
pub const DEFAULT_REUSE_FOR: Duration = Duration::from_millis(50);

/// The agent's clients are the proxies of a handful of nodes, each checking every couple of
/// seconds; these bounds leave them ample room and keep a flood from holding more.
const LIMITS: Limits = Limits {
    max_connections: 64,
    max_requests: 16,
    header_read_timeout: Duration::from_secs(2),
    connection_timeout: Duration::from_secs(30),
    // A request waits at most for one query behind the lock, then runs one.
    shutdown_grace: Duration::from_secs(7),
};

/// Bound on one look at the fence file. A stat on a local file system takes microseconds; one
/// that takes longer is on a hung (network) file system, and the answer is unknown (503).
pub const FENCE_TIMEOUT: Duration = Duration::from_secs(1);

/// Shown in `pg_stat_activity` unless the conninfo names its own application.
pub const APPLICATION_NAME: &str = "roleproxy-agent";

/// Why the agent could not run at all; per-request failures are answered with HTTP 500 instead.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The Postgres conninfo does not parse; caught at start-up rather than on every check.
    #[error("invalid postgres conninfo: {0}")]
    Conninfo(String),
    /// The passfile named by `--passfile` or `PGPASSFILE` cannot be read.
    #[error("cannot read the passfile {path}: {source}")]
    Passfile {
        path: String,
        source: std::io::Error,
    },
    /// The listener could not report its address.
    #[error("role agent listener has no local address: {0}")]
    LocalAddr(#[source] std::io::Error),
}

/// Why one role query failed. Its text is the body of the HTTP 500 and never quotes the
/// server; [`QueryError::detail`] has the whole story for the log.
#[derive(Debug, Clone, thiserror::Error)]
pub enum QueryError {
    /// Postgres did not answer within [`REQUEST_TIMEOUT`].
    #[error("timed out after {0:?} waiting for postgres")]
    Timeout(Duration),
    /// Connecting or querying failed.
    #[error("{summary}")]
    Postgres {
        /// What failed, in the agent's own words.
        summary: String,
        /// The whole error chain, server messages included, made printable: the node's own
        /// Postgres is the operator's, and its words help them, but they are still bytes from
        /// a socket.
        detail: String,
    },
    /// The server answered the query without a value.
    #[error("SHOW transaction_read_only returned no value")]
    NoValue,
    /// The fence file's directory cannot be read: neither `leader` nor `replica` is safe.
    #[error("cannot tell whether the fence file exists")]
    Fence,
    /// The fence file's file system did not answer within [`FENCE_TIMEOUT`] (a hung network
    /// file system): unknown, as above.
    #[error("the fence file's file system did not answer within {0:?}")]
    FenceTimeout(Duration),
}

impl QueryError {
    /// Everything known about the failure, for the agent's own log.
    pub fn detail(&self) -> String {
        match self {
            QueryError::Postgres { detail, .. } => detail.clone(),
            other => other.to_string(),
        }
    }
}

impl From<tokio_postgres::Error> for QueryError {
    fn from(error: tokio_postgres::Error) -> Self {
        QueryError::Postgres {
            summary: summarise(&error),
            detail: printable(&error_chain(&error)).into_owned(),
        }
    }
}

/// What failed, without the server's text: the SQLSTATE, or the kind of I/O error.
fn summarise(error: &tokio_postgres::Error) -> String {
    if let Some(db) = error.as_db_error() {
        let code = db.code().code();
        let what = match code {
            "28000" | "28P01" => "postgres refused the login",
            "53300" => "postgres has no connection slot left",
            "57P03" => "postgres is not accepting connections yet or any more",
            "3D000" => "the database does not exist",
            _ => "postgres answered with an error",
        };
        return format!("{what} (SQLSTATE {code})");
    }
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            return format!("cannot reach postgres: {}", io.kind());
        }
        source = cause.source();
    }
    if error.is_closed() {
        "the connection to postgres closed".to_owned()
    } else {
        "cannot talk to postgres".to_owned()
    }
}

/// Serves `GET /flycheck/role` until `shutdown` resolves.
///
/// `postgres` is a libpq-style conninfo such as
/// `host=127.0.0.11 port=5433 user=postgres dbname=postgres`. On shutdown the listener is
/// closed, open connections finish their current request and the call returns.
pub async fn serve(
    listener: TcpListener,
    postgres: String,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), AgentError> {
    serve_with(listener, postgres, AgentOptions::default(), shutdown).await
}

/// Agent settings beyond the Postgres connection.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// While this file exists the agent answers `replica` without asking Postgres. A planned
    /// switchover creates it first, so every proxy stops sending writes here before the node
    /// is demoted and another is promoted: clients see a pause instead of read-only errors.
    pub fence_file: Option<PathBuf>,
    /// How long one answer from Postgres is reused for every request.
    pub reuse_for: Duration,
    /// The password when the conninfo has none (`PGPASSWORD`).
    pub password: Option<Secret>,
    /// A `~/.pgpass`-format file, read at start-up when neither the conninfo nor
    /// [`AgentOptions::password`] gives a password.
    pub passfile: Option<PathBuf>,
}

impl Default for AgentOptions {
    fn default() -> Self {
        AgentOptions {
            fence_file: None,
            reuse_for: DEFAULT_REUSE_FOR,
            password: None,
            passfile: None,
        }
    }
}

/// [`serve`] with [`AgentOptions`].
pub async fn serve_with(
    listener: TcpListener,
    postgres: String,
    options: AgentOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), AgentError> {
    let mut config: Config = postgres
        .parse()
        .map_err(|e: tokio_postgres::Error| AgentError::Conninfo(error_chain(&e)))?;
    if config.get_application_name().is_none() {
        config.application_name(APPLICATION_NAME);
    }
    if config.get_password().is_some() {
        warn!(target: LOG, "the conninfo holds a password, which other users can read in the process list; use PGPASSWORD or a passfile");
    } else if let Some(Secret(password)) = options.password.filter(|p| !p.0.is_empty()) {
        config.password(password);
    } else if let Some(path) = &options.passfile {
        if let Some(password) = read_passfile(path, &config)? {
            config.password(password);
        }
    }
    let node = Arc::new(Node {
        postgres: config,
        fence: options.fence_file.map(Fence::new),
        reuse_for: options.reuse_for,
        asked: tokio::sync::Mutex::new(Asked::default()),
    });
    let local = listener.local_addr().map_err(AgentError::LocalAddr)?;
    info!(target: LOG, %local, "role agent listening");

    let cancel = CancellationToken::new();
    let handler = move |request: Request<Incoming>| {
        let node = Arc::clone(&node);
        async move { handle(&request, &node).await }
    };
    let server = httpd::serve(listener, LIMITS, cancel.clone(), handler);
    tokio::pin!(server);
    tokio::select! {
        () = &mut server => {}
        () = shutdown => {
            cancel.cancel();
            server.await;
        }
    }
    info!(target: LOG, %local, "role agent stopped");
    Ok(())
}

/// Maps the outcome of `SHOW transaction_read_only` to the HTTP status and body.
pub fn role_reply(outcome: Result<&str, &QueryError>) -> (StatusCode, String) {
    match outcome {
        Ok(value) if value.eq_ignore_ascii_case("off") => (StatusCode::OK, "leader".to_owned()),
        Ok(value) if value.eq_ignore_ascii_case("on") => (StatusCode::OK, "replica".to_owned()),
        Ok(value) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!(
                "unexpected transaction_read_only value {:?}",
                printable(value)
            ),
        ),
        // The fence cannot be read: whether the node takes writes is unknown, not failed.
        Err(error @ (QueryError::Fence | QueryError::FenceTimeout(_))) => {
            (StatusCode::SERVICE_UNAVAILABLE, error.to_string())
        }
        Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()),
    }
}

/// What one agent answers for.
struct Node {
    postgres: Config,
    fence: Option<Fence>,
    reuse_for: Duration,
    /// Held by the one request asking Postgres; the others wait for its answer.
    asked: tokio::sync::Mutex<Asked>,
}

/// The connection kept for when Postgres is full, and the latest answer.
#[derive(Default)]
struct Asked {
    connection: Option<Held>,
    latest: Option<(Instant, Result<String, QueryError>)>,
    /// The last failure logged, so a node that stays down is logged once, not per request.
    logged_failure: Option<String>,
}

/// An open Postgres connection; dropping it closes the socket, also mid-query.
struct Held {
    client: Client,
    _driver: AbortOnDropHandle<()>,
}

async fn handle(request: &Request<Incoming>, node: &Node) -> Response<Full<Bytes>> {
    if request.uri().path() != ROLE_PATH {
        return text_response(StatusCode::NOT_FOUND, "not found".to_owned());
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = text_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed".to_owned(),
        );
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    let fenced = match &node.fence {
        Some(fence) => fence.exists().await,
        None => Ok(false),
    };
    let outcome = match fenced {
        Ok(true) => {
            debug!(target: LOG, "fenced: answering replica");
            return text_response(StatusCode::OK, "replica".to_owned());
        }
        Ok(false) => role(node).await,
        Err(error) => Err(error),
    };
    let (status, body) = role_reply(outcome.as_deref());
    text_response(status, body)
}

/// The fence file, looked at off the runtime threads: a stat can block on a slow or hung
/// file system. One stat runs at a time, and each request waits for its answer at most
/// [`FENCE_TIMEOUT`]: a hung file system costs one blocked thread, however many requests come,
/// and they answer 503 (unknown) meanwhile.
struct Fence {
    path: PathBuf,
    /// The latest stat: its answer once it has one (`None` while it runs). Requests that come
    /// while it runs wait for it instead of starting another.
    latest: std::sync::Mutex<Option<Stat>>,
    /// How the file is looked at; a test stands in a hung file system here.
    stat: fn(&Path) -> std::io::Result<bool>,
}

/// One stat's answer, `None` while it runs; the error as text.
type Stat = watch::Receiver<Option<Result<bool, String>>>;

impl Fence {
    fn new(path: PathBuf) -> Fence {
        Fence::with_stat(path, Path::try_exists)
    }

    fn with_stat(path: PathBuf, stat: fn(&Path) -> std::io::Result<bool>) -> Fence {
        Fence {
            path,
            latest: std::sync::Mutex::new(None),
            stat,
        }
    }

    /// Whether the fence file exists: the answer of the stat running now, or of a new one.
    async fn exists(&self) -> Result<bool, QueryError> {
        let mut answer = {
            let mut latest = self
                .latest
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            // Still running: its stat has no answer yet, and its thread has not gone.
            let running = latest
                .as_ref()
                .filter(|stat| stat.borrow().is_none() && stat.has_changed().is_ok());
            match running {
                Some(stat) => stat.clone(),
                None => {
                    let (tx, rx) = watch::channel(None);
                    let (path, stat) = (self.path.clone(), self.stat);
                    tokio::task::spawn_blocking(move || {
                        let _ = tx.send(Some(stat(&path).map_err(|e| e.to_string())));
                    });
                    *latest = Some(rx.clone());
                    rx
                }
            }
        };
        let outcome =
            match tokio::time::timeout(FENCE_TIMEOUT, answer.wait_for(Option::is_some)).await {
                Ok(Ok(answered)) => match answered.as_ref() {
                    Some(Ok(exists)) => return Ok(*exists),
                    Some(Err(error)) => Err((error.clone(), QueryError::Fence)),
                    None => Err(("no answer".to_owned(), QueryError::Fence)),
                },
                // The stat's thread ended without an answer (it panicked).
                Ok(Err(_)) => Err((
                    "the stat ended without an answer".to_owned(),
                    QueryError::Fence,
                )),
                Err(_) => Err((
                    format!("no answer within {FENCE_TIMEOUT:?}"),
                    QueryError::FenceTimeout(FENCE_TIMEOUT),
                )),
            };
        outcome.map_err(|(error, unknown)| {
            if let Some(suppressed) = ratelimit::allow(warning::FENCE, self.path.display()) {
                warn!(target: LOG, fence = %self.path.display(), %error, suppressed, "cannot check the fence file; answering 503");
            }
            unknown
        })
    }
}

/// `transaction_read_only`, from the latest answer while it is fresh, else asked once for
/// every request waiting.
async fn role(node: &Node) -> Result<String, QueryError> {
    // Behind the lock is at most one query, itself bounded by REQUEST_TIMEOUT.
    let wait = REQUEST_TIMEOUT + Duration::from_secs(1);
    let Ok(mut asked) = tokio::time::timeout(wait, node.asked.lock()).await else {
        return Err(QueryError::Timeout(wait));
    };
    if let Some((at, outcome)) = &asked.latest {
        if at.elapsed() < node.reuse_for {
            return outcome.clone();
        }
    }
    let outcome =
        match tokio::time::timeout(REQUEST_TIMEOUT, ask(&node.postgres, &mut asked.connection))
            .await
        {
            Ok(outcome) => outcome,
            Err(_) => {
                asked.connection = None;
                Err(QueryError::Timeout(REQUEST_TIMEOUT))
            }
        };
    match &outcome {
        Ok(value) => {
            if asked.logged_failure.take().is_some() {
                info!(target: LOG, transaction_read_only = %value, "postgres answers again");
            }
        }
        Err(error) => {
            let detail = error.detail();
            if asked.logged_failure.as_ref() != Some(&detail) {
                warn!(target: LOG, error = %detail, "role query failed");
                asked.logged_failure = Some(detail);
            }
        }
    }
    asked.latest = Some((Instant::now(), outcome.clone()));
    outcome
}

/// Asks over a new connection, and over the kept one only when Postgres has no slot left for
/// a new one. A session that lives on sees a reload (`ALTER SYSTEM SET
/// default_transaction_read_only = on`, a switchover's demotion) only once the postmaster has
/// signalled it, so right after the reload it can still say `off`; a new session cannot.
async fn ask(config: &Config, kept: &mut Option<Held>) -> Result<String, QueryError> {
    let fresh = match connect(config).await {
        Ok(fresh) => fresh,
        Err(error) if no_slot_left(&error) => {
            let Some(held) = kept.as_ref().filter(|h| !h.client.is_closed()) else {
                return Err(error.into());
            };
            debug!(target: LOG, "postgres has no slot left; asking over the kept connection");
            let outcome = show_read_only(&held.client).await;
            if outcome.is_err() {
                *kept = None;
            }
            return outcome;
        }
        Err(error) => return Err(error.into()),
    };
    let value = show_read_only(&fresh.client).await?;
    if kept.as_ref().is_none_or(|h| h.client.is_closed()) {
        *kept = Some(fresh);
    }
    Ok(value)
}

/// SQLSTATE 53300: every connection slot is taken.
fn no_slot_left(error: &tokio_postgres::Error) -> bool {
    error.code() == Some(&tokio_postgres::error::SqlState::TOO_MANY_CONNECTIONS)
}

async fn connect(config: &Config) -> Result<Held, tokio_postgres::Error> {
    let (client, connection) = config.connect(NoTls).await?;
    let driver = AbortOnDropHandle::new(tokio::spawn(async move {
        if let Err(error) = connection.await {
            debug!(target: LOG, error = %error_chain(&error), "postgres connection ended");
        }
    }));
    Ok(Held {
        client,
        _driver: driver,
    })
}

async fn show_read_only(client: &Client) -> Result<String, QueryError> {
    let messages = client.simple_query("SHOW transaction_read_only").await?;
    messages
        .iter()
        .find_map(|message| match message {
            SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
            _ => None,
        })
        .ok_or(QueryError::NoValue)
}

fn text_response(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// The password for `config` from a passfile, as libpq reads one: refused when group or
/// others may read it, absent when the file does not exist.
fn read_passfile(path: &Path, config: &Config) -> Result<Option<String>, AgentError> {
    let failed = |source| AgentError::Passfile {
        path: path.display().to_string(),
        source,
    };
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(failed(e)),
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)
            .map_err(failed)?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            warn!(target: LOG, passfile = %path.display(), "the passfile may be read by group or others; ignored, as libpq does (chmod 0600 it)");
            return Ok(None);
        }
    }
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
        // libpq matches a socket directory as "localhost".
        _ => "localhost".to_owned(),
    };
    let port = config
        .get_ports()
        .first()
        .copied()
        .unwrap_or(5432)
        .to_string();
    let user = config.get_user().unwrap_or_default();
    let database = config.get_dbname().unwrap_or(user);
    Ok(pgpass_lookup(&text, [&host, &port, database, user]))
}

/// The password of the first `host:port:database:user:password` line matching `wanted`
/// (`*` matches anything; `\:` and `\\` are a literal colon and backslash). Pure.
pub fn pgpass_lookup(text: &str, wanted: [&str; 4]) -> Option<String> {
    text.lines()
        .filter(|line| !line.trim_start().starts_with('#'))
        .find_map(|line| {
            let fields = pgpass_fields(line);
            let [host, port, database, user, password] = fields.as_slice() else {
                return None;
            };
            let matches = [host, port, database, user]
                .iter()
                .zip(wanted)
                .all(|(field, wanted)| field.as_str() == "*" || field.as_str() == wanted);
            matches.then(|| password.clone())
        })
}

/// A passfile line split at unescaped colons; the password keeps any further colons.
fn pgpass_fields(line: &str) -> Vec<String> {
    let mut fields = Vec::new();
    let mut field = String::new();
    let mut chars = line.trim_end_matches('\r').chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => field.extend(chars.next()),
            ':' if fields.len() < 4 => fields.push(std::mem::take(&mut field)),
            c => field.push(c),
        }
    }
    fields.push(field);
    fields
}

/// The default address to serve on: Postgres's own listen address (`PG_LISTEN_ADDRESS`, the
/// node's private address on Fly), where every node's proxy reaches it and nothing wider;
/// loopback when that is unset.
pub fn default_listen(pg_listen_address: Option<&str>) -> SocketAddr {
    const PORT: u16 = 5500;
    pg_listen_address
        .map(|a| a.trim().trim_start_matches('[').trim_end_matches(']'))
        .and_then(|a| a.parse::<std::net::IpAddr>().ok())
        .map_or_else(
            || SocketAddr::from(([127, 0, 0, 1], PORT)),
            |ip| SocketAddr::new(ip, PORT),
        )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    use tokio::sync::oneshot;

    #[test]
    fn read_write_is_leader() {
        assert_eq!(role_reply(Ok("off")), (StatusCode::OK, "leader".to_owned()));
    }

    #[test]
    fn read_only_is_replica() {
        assert_eq!(role_reply(Ok("on")), (StatusCode::OK, "replica".to_owned()));
    }

    #[test]
    fn unexpected_value_is_an_error() {
        let (status, body) = role_reply(Ok("maybe\u{1b}[2J"));
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(body.contains("maybe") && !body.contains('\u{1b}'), "{body}");
    }

    #[test]
    fn errors_are_500_with_the_summary_only() {
        let error = QueryError::Postgres {
            summary: "postgres refused the login (SQLSTATE 28000)".to_owned(),
            detail: "db error: FATAL: no pg_hba.conf entry for host \"10.0.0.1\", user \"alice\""
                .to_owned(),
        };
        assert_eq!(
            role_reply(Err(&error)),
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "postgres refused the login (SQLSTATE 28000)".to_owned()
            )
        );
        let (status, body) = role_reply(Err(&QueryError::Timeout(REQUEST_TIMEOUT)));
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(body.starts_with("timed out"), "{body}");
    }

    #[test]
    fn passfile_lines_match_like_libpq() {
        let text = "# comment\n\
                    other:5433:postgres:postgres:wrong\n\
                    127.0.0.1:5433:*:postgres:se\\:cr\\\\et:tail\n\
                    *:*:*:*:fallback\n";
        assert_eq!(
            pgpass_lookup(text, ["127.0.0.1", "5433", "postgres", "postgres"]),
            Some("se:cr\\et:tail".to_owned())
        );
        assert_eq!(
            pgpass_lookup(text, ["127.0.0.2", "5433", "postgres", "postgres"]),
            Some("fallback".to_owned())
        );
        assert_eq!(pgpass_lookup("a:b:c\n", ["a", "b", "c", "d"]), None);
    }

    #[test]
    fn default_listen_is_the_postgres_listen_address() {
        assert_eq!(
            default_listen(Some("fdaa::7")),
            "[fdaa::7]:5500".parse().unwrap()
        );
        assert_eq!(
            default_listen(Some("[fdaa::7]")),
            "[fdaa::7]:5500".parse().unwrap()
        );
        assert_eq!(
            default_listen(Some("10.0.0.7")),
            "10.0.0.7:5500".parse().unwrap()
        );
        assert_eq!(default_listen(None), "127.0.0.1:5500".parse().unwrap());
        assert_eq!(
            default_listen(Some("not an address")),
            "127.0.0.1:5500".parse().unwrap()
        );
    }

    #[tokio::test]
    async fn bad_conninfo_fails_at_start() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let result = serve(listener, "host='unterminated".to_owned(), async {}).await;
        assert!(matches!(result, Err(AgentError::Conninfo(_))), "{result:?}");
    }

    /// Starts an agent against `postgres` and returns its address and a shutdown handle.
    async fn agent(
        postgres: String,
        options: AgentOptions,
    ) -> (
        SocketAddr,
        oneshot::Sender<()>,
        tokio::task::JoinHandle<Result<(), AgentError>>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind agent");
        let addr = listener.local_addr().expect("agent address");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve_with(listener, postgres, options, async {
            let _ = stopped.await;
        }));
        (addr, stop, task)
    }

    async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        let mut stream = TcpStream::connect(addr).await.expect("connect to agent");
        let request = format!("GET {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .expect("send request");
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.expect("read response");
        let text = String::from_utf8(raw).expect("utf-8 response");
        let (head, body) = text.split_once("\r\n\r\n").expect("response head");
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("status code");
        (status, body.to_owned())
    }

    /// A loopback port with nothing listening on it.
    async fn closed_port() -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        listener.local_addr().expect("address").port()
    }

    #[tokio::test]
    async fn other_paths_are_404() {
        let port = closed_port().await;
        let (addr, stop, task) = agent(
            format!("host=127.0.0.1 port={port} user=postgres"),
            AgentOptions::default(),
        )
        .await;
        assert_eq!(get(addr, "/").await.0, 404);
        assert_eq!(get(addr, "/flycheck/role/extra").await.0, 404);
        stop.send(()).expect("agent running");
        task.await.expect("agent task").expect("agent result");
    }

    #[tokio::test]
    async fn unreachable_postgres_is_500_saying_so() {
        let port = closed_port().await;
        let (addr, stop, task) = agent(
            format!("host=127.0.0.1 port={port} user=postgres"),
            AgentOptions::default(),
        )
        .await;
        let (status, body) = get(addr, ROLE_PATH).await;
        assert_eq!(status, 500);
        assert_eq!(body, "cannot reach postgres: connection refused");
        stop.send(()).expect("agent running");
        task.await.expect("agent task").expect("agent result");
    }

    #[tokio::test]
    async fn a_fence_file_answers_replica_without_asking() {
        let fence = std::env::temp_dir().join(format!("roleproxy-fence-{}", std::process::id()));
        std::fs::write(&fence, "").expect("create the fence file");
        let port = closed_port().await;
        let options = AgentOptions {
            fence_file: Some(fence.clone()),
            ..AgentOptions::default()
        };
        let (addr, stop, task) =
            agent(format!("host=127.0.0.1 port={port} user=postgres"), options).await;
        assert_eq!(get(addr, ROLE_PATH).await, (200, "replica".to_owned()));
        std::fs::remove_file(&fence).expect("remove the fence file");
        assert_eq!(
            get(addr, ROLE_PATH).await.0,
            500,
            "unfenced: Postgres is asked"
        );
        stop.send(()).expect("agent running");
        task.await.expect("agent task").expect("agent result");
    }

    /// Stands in for a hung file system: each stat blocks until [`RELEASED`], counted in
    /// [`STATS`].
    static STATS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    static RELEASED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

    fn hung_stat(_: &Path) -> std::io::Result<bool> {
        use std::sync::atomic::Ordering;
        STATS.fetch_add(1, Ordering::SeqCst);
        while !RELEASED.load(Ordering::SeqCst) {
            // The hang itself, not a wait for an event.
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(false)
    }

    /// A hung file system: every request answers 503 (unknown) within the bound, and however
    /// many come, one stat is blocked, not one each; once the file system answers, so does the
    /// fence.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hung_fence_file_system_answers_unknown_with_one_stat_in_flight() {
        use std::sync::atomic::Ordering;
        let fence = Arc::new(Fence::with_stat(PathBuf::from("/hung/fence"), hung_stat));
        for _ in 0..3 {
            let asked: Vec<_> = (0..10)
                .map(|_| {
                    let fence = Arc::clone(&fence);
                    tokio::spawn(async move { fence.exists().await })
                })
                .collect();
            for request in asked {
                match request.await.expect("request task") {
                    Err(error @ QueryError::FenceTimeout(_)) => {
                        let (status, body) = role_reply(Err(&error));
                        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
                    }
                    other => panic!("unknown while the file system hangs: {other:?}"),
                }
            }
        }
        assert_eq!(STATS.load(Ordering::SeqCst), 1, "one stat in flight");
        RELEASED.store(true, Ordering::SeqCst);
        // The blocked stat returns now, within the bound, and its answer is shared.
        assert_eq!(
            fence.exists().await.ok(),
            Some(false),
            "the file system answers again"
        );
        assert_eq!(fence.exists().await.ok(), Some(false));
        assert_eq!(
            STATS.load(Ordering::SeqCst),
            2,
            "a new stat once the last one answered"
        );
    }

    #[tokio::test]
    async fn hung_postgres_times_out() {
        // Accepts the connection and never answers the startup message.
        let hung = TcpListener::bind("127.0.0.1:0").await.expect("bind hung");
        let port = hung.local_addr().expect("hung address").port();
        let holder = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = hung.accept().await {
                held.push(stream);
            }
        });
        let (addr, stop, task) = agent(
            format!("host=127.0.0.1 port={port} user=postgres"),
            AgentOptions::default(),
        )
        .await;
        let (status, body) = get(addr, ROLE_PATH).await;
        assert_eq!(status, 500);
        assert!(body.starts_with("timed out"), "{body}");
        stop.send(()).expect("agent running");
        task.await.expect("agent task").expect("agent result");
        holder.abort();
    }
}
