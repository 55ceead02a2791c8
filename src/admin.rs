//! The admin HTTP port: `/metrics` (Prometheus), `/status` (JSON), `/healthz` (process up),
//! `/ready` (a route exists), the stats page at `/`, and `POST /reload`.
//!
//! Every node of the private network can reach this port, so the one request that changes what
//! the proxy does, `POST /reload`, is refused unless `admin.allow_changes` is on.
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::httpd::{self, Limits};
use crate::leader::ViewHandle;
use crate::metrics;
use crate::route::describe_route;
use crate::running::Reloader;
use crate::stats_page::render_page;
use crate::status::{unix_ms, ServingStatus, Status};
use crate::supervise::Supervisor;

/// The admin port is reachable from the whole private network, and a platform health check
/// restarts the machine when `/healthz` does not answer: a neighbour holding connections open
/// or trickling headers must not block it. Health checks and scrapers send their request at
/// once, so two seconds for the headers is ample.
const LIMITS: Limits = Limits {
    max_connections: 256,
    max_requests: 16,
    header_read_timeout: Duration::from_secs(2),
    connection_timeout: Duration::from_secs(30),
    shutdown_grace: Duration::from_secs(1),
};

/// What the admin handlers read.
pub struct AdminState {
    /// The route, the session counters and the view's part of `/status`.
    pub view: ViewHandle,
    /// The cluster's name and the listeners, as the running configuration publishes them.
    pub serving: watch::Receiver<ServingStatus>,
    /// Which core task ended, if one did, for `/healthz`.
    pub supervisor: Supervisor,
    /// Fires when the proxy stops accepting clients; `/ready` then answers 503.
    pub stopping: CancellationToken,
    /// `admin.allow_changes`, as of the latest reload.
    pub allow_changes: watch::Receiver<bool>,
    pub reloader: Option<Reloader>,
}

impl AdminState {
    /// The `/status` document, put together from what each owner last published; each part is
    /// copied out at once, so no owner waits on a reader.
    pub fn status(&self) -> Status {
        let route = self.view.route.borrow().clone();
        let view = self.view.status.borrow().clone();
        let counted = self.view.backends.borrow().clone();
        let serving = self.serving.borrow().clone();
        let mut backends = view.backends;
        for backend in &mut backends {
            backend.sessions = counted.sessions(backend.address);
        }
        Status {
            listeners: serving.listeners,
            cluster: serving.cluster,
            route_text: describe_route(&route),
            route,
            route_since_unix_ms: unix_ms(view.route_since),
            backends,
            history: view.history.iter().cloned().collect(),
        }
    }
}

/// Serves admin requests until `cancel` fires.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>, cancel: CancellationToken) {
    let handler = move |request: Request<Incoming>| {
        let state = Arc::clone(&state);
        async move { respond(&state, &request).await }
    };
    httpd::serve(listener, LIMITS, cancel, handler).await;
}

async fn respond<B>(state: &AdminState, request: &Request<B>) -> Response<Full<Bytes>> {
    if request.uri().path() == "/reload" {
        let force = request
            .uri()
            .query()
            .is_some_and(|q| q.split('&').any(|pair| pair == "force=true"));
        return reload(state, request.method(), force).await;
    }
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
        "/healthz" => match state.supervisor.failure() {
            Some(task) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("unhealthy: the {task}; the process is stopping\n"),
            ),
            None => text(StatusCode::OK, "ok\n".into()),
        },
        "/ready" if state.stopping.is_cancelled() => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: shutting down\n".into(),
        ),
        "/ready" => {
            let route = state.view.route.borrow().clone();
            match route.leader() {
                Some(leader) => text(StatusCode::OK, format!("ready: leader {leader}\n")),
                None => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: {}\n", describe_route(&route)),
                ),
            }
        }
        // `/stats` is where HAProxy's page was.
        "/" | "/stats" => reply(
            StatusCode::OK,
            "text/html; charset=utf-8",
            render_page(&state.status(), unix_ms(SystemTime::now())),
        ),
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

/// `POST /reload`: re-reads the configuration file; 200 with what changed, 400 with why the
/// file was refused (the running configuration stays), 403 while `admin.allow_changes` is off.
/// `?force=true` applies a configuration that would leave routing worse than now.
async fn reload(state: &AdminState, method: &Method, force: bool) -> Response<Full<Bytes>> {
    if method != Method::POST {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "reload with POST /reload\n".into(),
        );
    }
    if !*state.allow_changes.borrow() {
        return text(
            StatusCode::FORBIDDEN,
            "POST /reload is off: set admin.allow_changes = true to allow it (or send SIGHUP)\n"
                .into(),
        );
    }
    let Some(reloader) = &state.reloader else {
        return text(StatusCode::NOT_IMPLEMENTED, "no reload here\n".into());
    };
    match reloader.reload_with(force).await {
        Ok(summary) => text(StatusCode::OK, format!("{summary}\n")),
        Err(e) if e.is_refusal() => text(
            StatusCode::BAD_REQUEST,
            format!("reload refused, the running configuration stays: {e}\n"),
        ),
        Err(e) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
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
