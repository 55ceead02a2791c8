//! The admin HTTP port: `/metrics` (Prometheus), `/status` (JSON), `/healthz` (process up) and
//! `/ready` (a route exists). Read-only: nothing here changes what the proxy does.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{CACHE_CONTROL, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::leader::{BackendStatus, Route, Shared};
use crate::metrics;

/// A slow client may not hold an admin connection open forever.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on one admin connection, however slowly its client reads.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// Admin connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 64;

/// What the admin handlers read.
pub struct AdminState {
    pub shared: Arc<Shared>,
    pub cluster: String,
    /// Fires when the proxy stops accepting clients; `/ready` then answers 503.
    pub stopping: CancellationToken,
}

/// The `/status` document.
#[derive(Debug, Serialize)]
pub struct Status {
    pub cluster: String,
    pub route: Route,
    pub route_since_unix_ms: u64,
    pub backends: Vec<BackendStatus>,
}

impl AdminState {
    pub fn status(&self) -> Status {
        let route = self.shared.route.borrow().clone();
        let since = self
            .shared
            .route_since
            .lock()
            .map(|t| *t)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let sessions = self
            .shared
            .sessions
            .lock()
            .map(|m| m.clone())
            .unwrap_or_default();
        let mut backends = self
            .shared
            .backends
            .lock()
            .map(|b| b.clone())
            .unwrap_or_default();
        for backend in &mut backends {
            backend.sessions = sessions.get(&backend.address).copied().unwrap_or(0);
        }
        Status {
            cluster: self.cluster.clone(),
            route,
            route_since_unix_ms: unix_ms(since),
            backends,
        }
    }
}

pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Serves admin requests until `cancel` fires.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>, cancel: CancellationToken) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        let stream = tokio::select! {
            _ = cancel.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let state = Arc::clone(&state);
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let state = Arc::clone(&state);
                async move { Ok::<_, Infallible>(respond(&state, &request)) }
            });
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = tokio::time::sleep(CONNECTION_TIMEOUT) => {}
                _ = connection => {}
            }
            drop(slot);
        });
    }
}

fn respond<B>(state: &AdminState, request: &Request<B>) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET is served here\n".into(),
        );
    }
    match request.uri().path() {
        "/metrics" => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics::render(),
        ),
        "/status" => match serde_json::to_string_pretty(&state.status()) {
            Ok(json) => reply(StatusCode::OK, "application/json", json),
            Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
        },
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/ready" if state.stopping.is_cancelled() => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: shutting down\n".into(),
        ),
        "/ready" => {
            let route = state.shared.route.borrow().clone();
            match route.leader() {
                Some(leader) => text(StatusCode::OK, format!("ready: leader {leader}\n")),
                None => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: {:?}\n", route.target),
                ),
            }
        }
        "/" => text(
            StatusCode::OK,
            format!(
                "roleproxy for {}\n/metrics  Prometheus metrics\n/status   route and backends (JSON)\n/healthz  process is up\n/ready    200 while a leader is routed\n",
                state.cluster
            ),
        ),
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    reply(status, "text/plain; charset=utf-8", body)
}

fn reply(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = content_type.parse() {
        response.headers_mut().insert(CONTENT_TYPE, value);
    }
    if let Ok(value) = "no-store".parse() {
        response.headers_mut().insert(CACHE_CONTROL, value);
    }
    response
}
