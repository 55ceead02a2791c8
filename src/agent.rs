//! Role endpoint for nodes that have none: answers `GET /flycheck/role` the way Fly's
//! Postgres images do, so the proxy's checks work against plain Postgres (Patroni, repmgr,
//! hand-made replicas and the test clusters).
//!
//! Wire format: HTTP 200 with the bare word `leader` (read-write) or `replica` (read-only),
//! HTTP 500 with the error text when the node cannot tell, HTTP 404 for any other path.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio_postgres::{Config, NoTls, SimpleQueryMessage};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

/// The only path the agent answers.
pub const ROLE_PATH: &str = "/flycheck/role";

/// Upper bound for one role answer, connect included; below the proxy's default 5 s check
/// timeout so a hung Postgres shows up as a 500 rather than as a dead agent.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// How long a client may take to send its request headers before the connection is closed.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Pause after a failed `accept` (e.g. out of file descriptors) so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Shown in `pg_stat_activity` unless the conninfo names its own application.
const APPLICATION_NAME: &str = "roleproxy-agent";

/// Why the agent could not run at all; per-request failures are answered with HTTP 500 instead.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The Postgres conninfo does not parse; caught at start-up rather than on every check.
    #[error("invalid postgres conninfo: {0}")]
    Conninfo(String),
    /// The listener could not report its address.
    #[error("role agent listener has no local address: {0}")]
    LocalAddr(#[source] std::io::Error),
}

/// Why one role query failed; its text becomes the body of the HTTP 500.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// Postgres did not answer within [`REQUEST_TIMEOUT`].
    #[error("timed out after {0:?} waiting for postgres")]
    Timeout(Duration),
    /// Connecting or querying failed; the text carries the whole error chain.
    #[error("{0}")]
    Postgres(String),
    /// The server answered the query without a value.
    #[error("SHOW transaction_read_only returned no value")]
    NoValue,
}

impl From<tokio_postgres::Error> for QueryError {
    fn from(error: tokio_postgres::Error) -> Self {
        QueryError::Postgres(crate::error_chain(&error))
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
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    serve_with(listener, postgres, AgentOptions::default(), shutdown).await
}

/// Agent settings beyond the Postgres connection.
#[derive(Debug, Clone, Default)]
pub struct AgentOptions {
    /// While this file exists the agent answers `replica` without asking Postgres. A planned
    /// switchover creates it first, so every proxy stops sending writes here before the node
    /// is demoted and another is promoted: clients see a pause instead of read-only errors.
    pub fence_file: Option<PathBuf>,
}

/// [`serve`] with [`AgentOptions`].
pub async fn serve_with(
    listener: TcpListener,
    postgres: String,
    options: AgentOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    let mut config: Config = postgres
        .parse()
        .map_err(|e: tokio_postgres::Error| AgentError::Conninfo(crate::error_chain(&e)))?;
    if config.get_application_name().is_none() {
        config.application_name(APPLICATION_NAME);
    }
    let config = Arc::new(Node {
        postgres: config,
        fence_file: options.fence_file,
    });
    let local = listener.local_addr().map_err(AgentError::LocalAddr)?;
    info!(%local, "role agent listening");

    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                let config = Arc::clone(&config);
                let cancel = cancel.clone();
                tracker.spawn(serve_connection(stream, peer, config, cancel));
            }
            Err(error) => {
                warn!(%local, %error, "role agent accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }

    drop(listener);
    cancel.cancel();
    tracker.close();
    // In-flight requests are bounded by REQUEST_TIMEOUT, so this wait is too.
    if tokio::time::timeout(REQUEST_TIMEOUT + Duration::from_secs(1), tracker.wait())
        .await
        .is_err()
    {
        warn!(%local, "role agent connections still open at shutdown");
    }
    info!(%local, "role agent stopped");
    Ok(())
}

/// Maps the outcome of `SHOW transaction_read_only` to the HTTP status and body.
pub fn role_reply(outcome: Result<&str, &QueryError>) -> (StatusCode, String) {
    match outcome {
        Ok(value) if value.eq_ignore_ascii_case("off") => (StatusCode::OK, "leader".to_owned()),
        Ok(value) if value.eq_ignore_ascii_case("on") => (StatusCode::OK, "replica".to_owned()),
        Ok(value) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("unexpected transaction_read_only value {value:?}"),
        ),
        Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()),
    }
}

/// What one agent answers for.
struct Node {
    postgres: Config,
    fence_file: Option<PathBuf>,
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    config: Arc<Node>,
    cancel: CancellationToken,
) {
    let service = service_fn(move |request| {
        let config = Arc::clone(&config);
        async move { Ok::<_, Infallible>(handle(request, &config).await) }
    });
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = cancel.cancelled() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(error) = result {
        debug!(%peer, %error, "role agent connection ended with an error");
    }
}

async fn handle(request: Request<Incoming>, node: &Node) -> Response<Full<Bytes>> {
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
    if let Some(fence) = node.fence_file.as_deref().filter(|f| f.exists()) {
        debug!(fence = %fence.display(), "fenced: answering replica");
        return text_response(StatusCode::OK, "replica".to_owned());
    }
    let outcome = read_only(&node.postgres).await;
    let (status, body) = role_reply(outcome.as_deref());
    if status.is_success() {
        debug!(role = %body, "role check answered");
    } else {
        debug!(error = %body, "role check failed");
    }
    text_response(status, body)
}

/// Asks Postgres for `transaction_read_only` over a fresh connection, bounded by
/// [`REQUEST_TIMEOUT`].
async fn read_only(config: &Config) -> Result<String, QueryError> {
    // A connection per request: no pool to go stale, so each answer sees restarts and promotions.
    match tokio::time::timeout(REQUEST_TIMEOUT, show_read_only(config)).await {
        Ok(outcome) => outcome,
        Err(_) => Err(QueryError::Timeout(REQUEST_TIMEOUT)),
    }
}

async fn show_read_only(config: &Config) -> Result<String, QueryError> {
    let (client, connection) = config.connect(NoTls).await?;
    // The connection task drives the socket; its own bound keeps a hung server from pinning it.
    tokio::spawn(async move {
        match tokio::time::timeout(REQUEST_TIMEOUT, connection).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                debug!(error = %crate::error_chain(&error), "postgres connection failed")
            }
            Err(_) => debug!("postgres connection did not close in time"),
        }
    });
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
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
        let (status, body) = role_reply(Ok("maybe"));
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(body.contains("maybe"), "{body}");
    }

    #[test]
    fn errors_are_500_with_their_text() {
        let error = QueryError::Postgres("error connecting to server: refused".to_owned());
        assert_eq!(
            role_reply(Err(&error)),
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "error connecting to server: refused".to_owned()
            )
        );
        let (status, body) = role_reply(Err(&QueryError::Timeout(REQUEST_TIMEOUT)));
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(body.starts_with("timed out"), "{body}");
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
    ) -> (
        SocketAddr,
        oneshot::Sender<()>,
        tokio::task::JoinHandle<Result<(), AgentError>>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind agent");
        let addr = listener.local_addr().expect("agent address");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, postgres, async {
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
        let (addr, stop, task) = agent(format!("host=127.0.0.1 port={port} user=postgres")).await;
        assert_eq!(get(addr, "/").await.0, 404);
        assert_eq!(get(addr, "/flycheck/role/extra").await.0, 404);
        stop.send(()).expect("agent running");
        task.await.expect("agent task").expect("agent result");
    }

    #[tokio::test]
    async fn unreachable_postgres_is_500_with_the_error() {
        let port = closed_port().await;
        let (addr, stop, task) = agent(format!("host=127.0.0.1 port={port} user=postgres")).await;
        let (status, body) = get(addr, ROLE_PATH).await;
        assert_eq!(status, 500);
        assert!(body.contains("error connecting to server"), "{body}");
        stop.send(()).expect("agent running");
        task.await.expect("agent task").expect("agent result");
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
        let (addr, stop, task) = agent(format!("host=127.0.0.1 port={port} user=postgres")).await;
        let started = std::time::Instant::now();
        let (status, body) = get(addr, ROLE_PATH).await;
        assert_eq!(status, 500);
        assert!(body.starts_with("timed out"), "{body}");
        assert!(started.elapsed() < REQUEST_TIMEOUT + Duration::from_secs(2));
        stop.send(()).expect("agent running");
        task.await.expect("agent task").expect("agent result");
        holder.abort();
    }
}
