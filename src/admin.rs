//! The admin HTTP port: `/metrics` (Prometheus), `/status` (JSON), `/healthz` (process up),
//! `/ready` (a route exists), the stats page at `/`, and the requests that change what the
//! proxy does: `POST /reload`, `POST /pause`, `POST /resume` and
//! `POST /backends/ADDR/drain|maintenance|ready`.
//!
//! Every node of the private network can reach this port, so the requests that change state are
//! refused unless `admin.allow_changes` is on, and, when `admin.token_file` is set, unless they
//! carry its token (`Authorization: Bearer`).
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE, WWW_AUTHENTICATE};
use hyper::{Method, Request, Response, StatusCode};
use roleproxy_common::httpd::{self, Limits};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use roleproxy_core::route::{describe_route, Mode};

use crate::metrics;
use crate::operator::{AdminSettings, Operator};
use crate::running::Reloader;
use crate::stats_page::render_page;
use crate::status::{unix_ms, PauseStatus, ServingStatus, Status};
use crate::supervise::Supervisor;
use crate::view::ViewHandle;

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
    /// `admin.allow_changes`, the token and the pause settings, as of the latest reload.
    pub settings: watch::Receiver<AdminSettings>,
    /// The pause and the backends' modes.
    pub operator: Arc<Operator>,
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
        let operator = self.operator.state();
        let mut backends = view.backends;
        for backend in &mut backends {
            backend.sessions = counted.sessions(backend.address);
            backend.operator = operator.mode(backend.address);
        }
        let pause = operator.pause.map(|pause| {
            let since_unix_ms = unix_ms(pause.since);
            PauseStatus {
                since_unix_ms,
                limit_ms: pause.limit.as_millis() as u64,
                resumes_at_unix_ms: since_unix_ms.saturating_add(pause.limit.as_millis() as u64),
                held_clients: self.operator.held(),
            }
        });
        Status {
            listeners: serving.listeners,
            cluster: serving.cluster,
            route_text: describe_route(&route),
            route,
            route_since_unix_ms: unix_ms(view.route_since),
            backends,
            history: view.history.iter().cloned().collect(),
            pause,
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
    let path = request.uri().path();
    let change = match path {
        "/reload" => Some(Change::Reload),
        "/pause" => Some(Change::Pause),
        "/resume" => Some(Change::Resume),
        _ => path
            .strip_prefix("/backends/")
            .map(|rest| Change::Backend(rest.to_string())),
    };
    if let Some(change) = change {
        if request.method() != Method::POST {
            return text(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{path} changes state: use POST\n"),
            );
        }
        if let Some(refused) = refusal(&state.settings.borrow(), request, &change) {
            return refused;
        }
        return match change {
            Change::Reload => {
                let force = request
                    .uri()
                    .query()
                    .is_some_and(|q| q.split('&').any(|pair| pair == "force=true"));
                reload(state, force).await
            }
            Change::Pause => pause(state),
            Change::Resume => resume(state),
            Change::Backend(rest) => set_backend(state, &rest),
        };
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

/// A request that changes what the proxy does.
enum Change {
    Reload,
    Pause,
    Resume,
    /// `POST /backends/ADDR/MODE`: the part after `/backends/`.
    Backend(String),
}

impl Change {
    fn request(&self) -> &'static str {
        match self {
            Change::Reload => "POST /reload",
            Change::Pause => "POST /pause",
            Change::Resume => "POST /resume",
            Change::Backend(_) => "POST /backends/...",
        }
    }
}

/// Why a change is refused, if it is: 403 while `admin.allow_changes` is off; 401 when `admin.token_file` is set and the request
/// does not carry its token. The token is compared in constant time and never written out.
fn refusal<B>(
    settings: &AdminSettings,
    request: &Request<B>,
    change: &Change,
) -> Option<Response<Full<Bytes>>> {
    let what = change.request();
    if !settings.allow_changes {
        let also = match change {
            Change::Reload => " (or send SIGHUP)",
            _ => "",
        };
        return Some(text(
            StatusCode::FORBIDDEN,
            format!("{what} is off: set admin.allow_changes = true to allow it{also}\n"),
        ));
    }
    let token = settings.token.as_ref()?;
    let given = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let reason = match given {
        Some(given) if same_token(given.as_bytes(), token.0.as_bytes()) => return None,
        Some(_) => "the bearer token is not admin.token_file's",
        None => "it needs Authorization: Bearer with the token of admin.token_file",
    };
    tracing::warn!(request = what, reason, "change refused: not authorized");
    let mut refused = text(
        StatusCode::UNAUTHORIZED,
        format!("{what} refused: {reason}\n"),
    );
    if let Ok(value) = "Bearer".parse() {
        refused.headers_mut().insert(WWW_AUTHENTICATE, value);
    }
    Some(refused)
}

/// Whether two tokens are equal, in time that depends on their lengths only, not on where
/// they differ.
fn same_token(given: &[u8], token: &[u8]) -> bool {
    let mut differ = given.len() ^ token.len();
    for i in 0..given.len().max(token.len()) {
        let a = given.get(i).copied().unwrap_or(0);
        let b = token.get(i).copied().unwrap_or(0);
        differ |= usize::from(a ^ b);
    }
    differ == 0
}

/// `POST /pause`: answers at once with the pause, its limit, and the leader's open sessions
/// (each ends at its next transaction boundary). Pausing again keeps the pause under way.
fn pause(state: &AdminState) -> Response<Full<Bytes>> {
    let settings = state.settings.borrow().clone();
    let (pause, began) = state.operator.pause(settings.pause_limit);
    let route = state.view.route.borrow().clone();
    let sessions = route
        .target
        .backend()
        .map(|leader| {
            let open = state.view.backends.borrow().sessions(leader);
            format!("{open} session(s) open on the leader {leader}")
        })
        .unwrap_or_else(|| "no leader".to_string());
    let state_now = if began {
        "paused".to_string()
    } else {
        let since = Duration::from_millis(pause.started.elapsed().as_millis() as u64);
        format!("already paused, for {}", humantime::format_duration(since))
    };
    text(
        StatusCode::OK,
        format!(
            "{state_now}; {sessions}: each ends at its next transaction boundary (cut if still in a transaction after proxy.pause_grace = {}); new clients are held until POST /resume, or for proxy.pause_limit = {}\n",
            humantime::format_duration(settings.pause_grace),
            humantime::format_duration(pause.limit),
        ),
    )
}

/// `POST /resume`: lifts the pause; held clients go on to whichever node leads now.
fn resume(state: &AdminState) -> Response<Full<Bytes>> {
    let held = state.operator.held();
    match state.operator.resume(false) {
        Some(pause) => {
            let paused = humantime::format_duration(Duration::from_millis(
                pause.started.elapsed().as_millis() as u64,
            ));
            let route = describe_route(&state.view.route.borrow());
            text(
                StatusCode::OK,
                format!("resumed after {paused}; {held} held client(s) go on: {route}\n"),
            )
        }
        None => text(StatusCode::OK, "not paused\n".into()),
    }
}

/// `POST /backends/ADDR/drain|maintenance|ready`: a backend's operator state, for replica
/// listeners (HAProxy's `set server ... state`).
fn set_backend(state: &AdminState, rest: &str) -> Response<Full<Bytes>> {
    let usage = "use POST /backends/ADDR/drain, /maintenance or /ready, ADDR as in /status";
    let Some((addr, word)) = rest.rsplit_once('/') else {
        return text(StatusCode::BAD_REQUEST, format!("{usage}\n"));
    };
    let addr = addr
        .replace("%5B", "[")
        .replace("%5D", "]")
        .replace("%3A", ":")
        .replace("%5b", "[")
        .replace("%5d", "]")
        .replace("%3a", ":");
    let Ok(addr) = addr.parse::<std::net::SocketAddr>() else {
        return text(
            StatusCode::BAD_REQUEST,
            format!("{addr:?} is not a backend address (IP:PORT); {usage}\n"),
        );
    };
    let Some(mode) = Mode::from_label(word) else {
        return text(
            StatusCode::BAD_REQUEST,
            format!("{word:?} is not a backend state; {usage}\n"),
        );
    };
    let known = state
        .view
        .status
        .borrow()
        .backends
        .iter()
        .any(|b| b.address == addr);
    if !known {
        return text(
            StatusCode::NOT_FOUND,
            format!("no backend {addr} is known (see /status)\n"),
        );
    }
    let was = state.operator.set_mode(addr, mode);
    let open = state.view.backends.borrow().sessions(addr);
    let effect = match mode {
        Mode::Ready => "takes new sessions on replica listeners",
        Mode::Drain => {
            "takes no new session; its open sessions end at their next transaction boundary"
        }
        Mode::Maintenance => "takes no new session; its open sessions stay",
    };
    let leads = if state.view.route.borrow().target.backend() == Some(addr) {
        " It is the route's leader: this applies to replica listeners only; POST /pause holds the leader's clients."
    } else {
        ""
    };
    text(
        StatusCode::OK,
        format!(
            "backend {addr}: {} (was {}); {effect}; {open} session(s) open.{leads}\n",
            mode.label(),
            was.label()
        ),
    )
}

/// `POST /reload`: re-reads the configuration file; 200 with what changed, 400 with why the
/// file was refused (the running configuration stays). `?force=true` applies a configuration
/// that would leave routing worse than now.
async fn reload(state: &AdminState, force: bool) -> Response<Full<Bytes>> {
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
