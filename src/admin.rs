//! The admin HTTP port: `/metrics` (Prometheus), `/status` (JSON), `/healthz` (process up),
//! `/ready` (a route exists), the stats page at `/`, and `POST /reload`.
//!
//! Every node of the private network can reach this port, so the one request that changes what
//! the proxy does, `POST /reload`, is refused unless `admin.allow_changes` is on.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::httpd::{self, Limits};
use crate::leader::{BackendStatus, Change, ListenerStatus, Shared};
use crate::metrics;
use crate::reload::Reloader;
use crate::route::{describe_route, Route};

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
    pub shared: Arc<Shared>,
    /// Fires when the proxy stops accepting clients; `/ready` then answers 503.
    pub stopping: CancellationToken,
    /// `admin.allow_changes`, as of the latest reload.
    pub allow_changes: watch::Receiver<bool>,
    pub reloader: Option<Reloader>,
}

/// The `/status` document.
#[derive(Debug, Serialize)]
pub struct Status {
    pub cluster: String,
    pub route: Route,
    /// The route in words.
    pub route_text: String,
    pub route_since_unix_ms: u64,
    pub backends: Vec<BackendStatus>,
    pub listeners: Vec<ListenerStatus>,
    /// Recent role and route changes, oldest first.
    pub history: Vec<Change>,
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
        let sessions = snapshot(&self.shared.sessions);
        let mut backends = snapshot(&self.shared.backends);
        for backend in &mut backends {
            backend.sessions = sessions.get(&backend.address).copied().unwrap_or(0);
        }
        let history = self
            .shared
            .history
            .lock()
            .map(|h| h.iter().cloned().collect())
            .unwrap_or_default();
        Status {
            listeners: snapshot(&self.shared.listeners),
            cluster: snapshot(&self.shared.cluster),
            route_text: describe_route(&route),
            route,
            route_since_unix_ms: unix_ms(since),
            backends,
            history,
        }
    }
}

pub use crate::leader::unix_ms;

/// A copy of shared state for one answer; a poisoned lock gives the empty value, not a panic.
fn snapshot<T: Clone + Default>(shared: &std::sync::Mutex<T>) -> T {
    shared.lock().map(|v| v.clone()).unwrap_or_default()
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
        "/healthz" => match state.shared.supervisor.failure() {
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
            let route = state.shared.route.borrow().clone();
            match route.leader() {
                Some(leader) => text(StatusCode::OK, format!("ready: leader {leader}\n")),
                None => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: {:?}\n", route.target),
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
/// `?force=true` applies a `[check]` that the current leader does not answer `leader` to.
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

/// How often the stats page reloads itself.
const PAGE_REFRESH_SECS: u32 = 2;

/// How long ago, for people: `0.4s ago`, `42s ago`, `3 min ago`, `2 h ago`, `5 days ago`.
pub fn ago(now_unix_ms: u64, then_unix_ms: u64) -> String {
    let secs = now_unix_ms.saturating_sub(then_unix_ms) as f64 / 1000.0;
    match secs {
        s if s < 10.0 => format!("{s:.1}s ago"),
        s if s < 120.0 => format!("{s:.0}s ago"),
        s if s < 7200.0 => format!("{:.0} min ago", s / 60.0),
        s if s < 172_800.0 => format!("{:.0} h ago", s / 3600.0),
        s => format!("{:.0} days ago", s / 86_400.0),
    }
}

/// [`ago`], or `never`.
fn when(now_unix_ms: u64, at: Option<u64>) -> String {
    at.map_or_else(|| "never".to_string(), |at| ago(now_unix_ms, at))
}

/// A backend's last error with its time. While it is the outcome of the latest check (or the
/// probe after it) it reads as current, `connection refused (4.0s ago)`; once a later check
/// has answered, as history, `recovered; 3 min ago: connection refused`, so a healthy node
/// never looks faulty for an error it had once.
pub fn error_text(
    error: Option<&str>,
    error_unix_ms: Option<u64>,
    last_check_unix_ms: Option<u64>,
    now_unix_ms: u64,
) -> String {
    let Some(error) = error else {
        return String::new();
    };
    match error_unix_ms {
        Some(at) if last_check_unix_ms.is_some_and(|check| check > at) => {
            format!("recovered; {}: {error}", ago(now_unix_ms, at))
        }
        Some(at) => format!("{error} ({})", ago(now_unix_ms, at)),
        None => error.to_string(),
    }
}

/// The stats page for people, like HAProxy's `/stats`: plain HTML that reloads itself. Pure.
pub fn render_page(status: &Status, now_unix_ms: u64) -> String {
    let state = match status.route.target {
        crate::route::Target::Leader(_) => "leader",
        crate::route::Target::Held(_) => "held",
        crate::route::Target::None(_) => "none",
    };
    let mut rows = String::new();
    for b in &status.backends {
        let mut role = match &b.unconfirmed {
            Some(u) => unconfirmed_text(
                u.since_unix_ms,
                &u.check_error,
                b.postgres.as_deref(),
                u.expired,
                now_unix_ms,
            ),
            None => b.role.to_string(),
        };
        if !b.present {
            role.push_str(" (left DNS)");
        }
        rows.push_str(&format!(
            "<tr class=\"{}\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>\n",
            b.role.label(),
            escape(&b.address.to_string()),
            escape(&b.sources.join(", ")),
            escape(&role),
            when(now_unix_ms, b.last_check_unix_ms),
            b.last_check_latency_ms
                .map(|ms| format!("{ms:.1} ms"))
                .unwrap_or_else(|| "-".into()),
            b.sessions,
            escape(&error_text(
                b.last_error.as_deref(),
                b.last_error_unix_ms,
                b.last_check_unix_ms,
                now_unix_ms
            )),
        ));
    }
    let mut listeners = String::new();
    for l in &status.listeners {
        let addresses: Vec<String> = l.addresses.iter().map(ToString::to_string).collect();
        listeners.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td></tr>\n",
            escape(&l.name),
            escape(&addresses.join(", ")),
            escape(&l.serves)
        ));
    }
    let mut changes = String::new();
    for change in status.history.iter().rev() {
        changes.push_str(&format!(
            "<li class=\"{}\"><time>{}</time> <b>{}</b> {}</li>\n",
            change.kind,
            clock(change.unix_ms),
            change.kind,
            escape(&change.text)
        ));
    }
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{PAGE_REFRESH_SECS}">
<title>roleproxy: {cluster}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; }} th, td {{ padding: .3em .8em; border-bottom: 1px solid #ddd; text-align: left; }}
#route {{ font-size: 1.2em; padding: .5em; }} #route.leader {{ background: #dfd; }} #route.held {{ background: #ffd; }} #route.none {{ background: #fdd; }}
tr.leader {{ background: #efe; }} tr.down {{ background: #fee; }} time {{ font-family: monospace; color: #666; }}
</style></head>
<body>
<h1>roleproxy <small>{cluster}</small></h1>
<p id="route" class="{state}">Route {route}, for {since}.</p>
<table id="backends">
<tr><th>backend</th><th>sources</th><th>role</th><th>last check</th><th>latency</th><th>sessions</th><th>last error</th></tr>
{rows}</table>
<h2>Listeners</h2>
<table id="listeners">
<tr><th>listener</th><th>addresses</th><th>serves</th></tr>
{listeners}</table>
<h2>Recent changes</h2>
<ol id="timeline" reversed>
{changes}</ol>
<p>Reloads every {PAGE_REFRESH_SECS} s. Also: <a href="/status">/status</a> (JSON), <a href="/metrics">/metrics</a>, <a href="/ready">/ready</a>.</p>
</body></html>
"#,
        cluster = escape(&status.cluster),
        route = escape(&status.route_text),
        since = when(now_unix_ms, Some(status.route_since_unix_ms)).replace(" ago", ""),
    )
}

/// "leader, unconfirmed (since …, check failing: …; Postgres answers (…))", for people (rule 7).
fn unconfirmed_text(
    since_unix_ms: u64,
    check_error: &str,
    postgres: Option<&str>,
    expired: bool,
    now_unix_ms: u64,
) -> String {
    format!(
        "leader, unconfirmed (since {}, check failing: {check_error}; {}){}",
        ago(now_unix_ms, since_unix_ms),
        postgres.unwrap_or("Postgres not asked yet"),
        if expired {
            ", past check.unconfirmed_limit: new clients wait"
        } else {
            ""
        }
    )
}

/// `HH:MM:SS.mmm UTC` of a Unix time in milliseconds.
fn clock(unix_ms: u64) -> String {
    let day_ms = unix_ms % 86_400_000;
    format!(
        "{:02}:{:02}:{:02}.{:03} UTC",
        day_ms / 3_600_000,
        day_ms / 60_000 % 60,
        day_ms / 1000 % 60,
        day_ms % 1000
    )
}

/// Text made safe to put in HTML: backend errors come from the network.
fn escape(text: &str) -> String {
    let text = printable(text);
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Text from the network with its control characters written out (`\u{1b}`), so an error body
/// cannot move a terminal's cursor, clear its screen or set its title, nor reorder a line with
/// bidirectional overrides.
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    let unsafe_char = |c: char| {
        // C0, DEL and C1; then the bidirectional embeddings, overrides and isolates.
        c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    if !text.chars().any(unsafe_char) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if unsafe_char(c) {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Every string in a JSON document made [`printable`].
fn printable_json(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::String(s) => {
            if let std::borrow::Cow::Owned(clean) = printable(s) {
                *s = clean;
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(printable_json),
        serde_json::Value::Object(fields) => fields.values_mut().for_each(printable_json),
        _ => {}
    }
}

/// Why `roleproxy status` could not show the status.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("cannot reach the admin port {addr}: {error}")]
    Unreachable { addr: SocketAddr, error: String },
    #[error("the admin port {addr} answered HTTP {status}")]
    Http { addr: SocketAddr, status: u16 },
    #[error("the admin port {addr} sent something that is not a status document: {error}")]
    Invalid { addr: SocketAddr, error: String },
}

/// Largest `/status` document `roleproxy status` accepts.
const MAX_STATUS_BYTES: usize = 4 * 1024 * 1024;

/// Fetches `/status` from a running proxy's admin port.
pub async fn fetch_status(addr: SocketAddr) -> Result<serde_json::Value, StatusError> {
    use http_body_util::{BodyExt, Empty, Limited};
    let unreachable = |error: String| StatusError::Unreachable { addr, error };
    let exchange = async {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
                .await
                .map_err(|e| unreachable(e.to_string()))?;
        let _connection = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(connection));
        let request = Request::get("/status")
            .header(hyper::header::HOST, addr.to_string())
            .body(Empty::new())
            .map_err(|e| unreachable(e.to_string()))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let status = response.status().as_u16();
        if status != 200 {
            return Err(StatusError::Http { addr, status });
        }
        let body = Limited::new(response.into_body(), MAX_STATUS_BYTES)
            .collect()
            .await
            .map_err(|e| unreachable(e.to_string()))?
            .to_bytes();
        serde_json::from_slice(&body).map_err(|e| StatusError::Invalid {
            addr,
            error: e.to_string(),
        })
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .unwrap_or_else(|_| Err(unreachable("timed out after 10s".into())))
}

/// The strings of a JSON array (none if it is not one).
fn strings(value: &serde_json::Value) -> Vec<&str> {
    value
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str())
        .collect()
}

/// `/status` as a table for a terminal, like `patronictl list`. Pure. Every string in it may
/// have come from the network (a role endpoint's error body), so each is made [`printable`].
pub fn render_status(status: &serde_json::Value, now_unix_ms: u64) -> String {
    let mut status = status.clone();
    printable_json(&mut status);
    let status = &status;
    // The server's own words for the route, as on the stats page and in client errors.
    let mut out = format!(
        "cluster {}  route {} (since {})\n",
        status["cluster"].as_str().unwrap_or("?"),
        status["route_text"].as_str().unwrap_or("?"),
        when(now_unix_ms, status["route_since_unix_ms"].as_u64())
    );
    let header = [
        "backend",
        "sources",
        "role",
        "last check",
        "latency",
        "sessions",
        "last error",
    ];
    let mut rows: Vec<[String; 7]> = vec![header.map(str::to_string)];
    for backend in status["backends"].as_array().into_iter().flatten() {
        let role = &backend["role"];
        let mut role_text = role["role"].as_str().unwrap_or("?").to_string();
        if role_text == "other" {
            role_text = format!("other ({})", role["detail"].as_str().unwrap_or("?"));
        }
        let unconfirmed = &backend["unconfirmed"];
        if let Some(since) = unconfirmed["since_unix_ms"].as_u64() {
            role_text = unconfirmed_text(
                since,
                unconfirmed["check_error"].as_str().unwrap_or("?"),
                backend["postgres"].as_str(),
                unconfirmed["expired"] == true,
                now_unix_ms,
            );
        }
        if backend["present"] == false {
            role_text.push_str(", left DNS");
        }
        let sources = strings(&backend["sources"]);
        rows.push([
            backend["address"].as_str().unwrap_or("?").to_string(),
            sources.join(","),
            role_text,
            when(now_unix_ms, backend["last_check_unix_ms"].as_u64()),
            backend["last_check_latency_ms"]
                .as_f64()
                .map(|ms| format!("{ms:.1} ms"))
                .unwrap_or_else(|| "-".into()),
            backend["sessions"].to_string(),
            error_text(
                backend["last_error"].as_str(),
                backend["last_error_unix_ms"].as_u64(),
                backend["last_check_unix_ms"].as_u64(),
                now_unix_ms,
            ),
        ]);
    }
    let widths: Vec<usize> = (0..7)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    for row in &rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    for listener in status["listeners"].as_array().into_iter().flatten() {
        let addresses = strings(&listener["addresses"]);
        out.push_str(&format!(
            "listener {} on {}: {}\n",
            listener["name"].as_str().unwrap_or("?"),
            addresses.join(", "),
            listener["serves"].as_str().unwrap_or("?")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_renders_as_a_table() {
        let status = serde_json::json!({
            "cluster": "iad.app.internal",
            "route": {"generation": 3, "target": {"state": "leader", "detail": "127.0.0.12:5433"}},
            "route_text": "generation 3: sessions go to 127.0.0.12:5433",
            "route_since_unix_ms": 10_000,
            "backends": [
                {"address": "127.0.0.11:5433", "sources": ["dns:iad.app.internal"], "present": true,
                 "role": {"role": "down", "detail": "HTTP 500: no"}, "last_check_unix_ms": 11_000,
                 "last_check_latency_ms": 0.52, "last_error": "HTTP 500: no",
                 "last_error_unix_ms": 11_000, "sessions": 0},
                {"address": "127.0.0.12:5433", "sources": ["dns:iad.app.internal", "backup"], "present": true,
                 "role": {"role": "leader"}, "last_check_unix_ms": 11_500,
                 "last_check_latency_ms": 1.25, "last_error": "connection refused",
                 "last_error_unix_ms": 5_000, "sessions": 7}
            ]
        });
        let text = render_status(&status, 12_000);
        assert!(text.starts_with("cluster iad.app.internal  route generation 3: sessions go to 127.0.0.12:5433 (since 2.0s ago)"), "{text}");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(lines[1].starts_with("backend"), "{text}");
        assert!(
            lines[2].contains("down")
                && lines[2].contains("1.0s ago")
                && lines[2].contains("HTTP 500: no (1.0s ago)"),
            "{text}"
        );
        // An error from before the latest good check reads as history.
        assert!(
            lines[3].contains("recovered; 7.0s ago: connection refused"),
            "{text}"
        );
        assert!(
            lines[3].contains("leader") && lines[3].contains("1.2 ms") && lines[3].contains("7"),
            "{text}"
        );
        assert!(lines[3].contains("dns:iad.app.internal,backup"), "{text}");
    }

    #[test]
    fn page_escapes_what_came_from_the_network() {
        let status = Status {
            cluster: "c<1>".into(),
            route: Route::initial(),
            route_text: "generation 0: no route".into(),
            route_since_unix_ms: 0,
            backends: vec![BackendStatus {
                address: "127.0.0.1:5433".parse().unwrap(),
                sources: vec!["backup".into()],
                present: true,
                role: crate::route::Role::Down("<script>x</script>".into()),
                last_check_unix_ms: Some(1_000),
                last_check_latency_ms: Some(1.0),
                last_error: Some("<script>x</script>".into()),
                last_error_unix_ms: Some(1_000),
                unconfirmed: None,
                postgres: None,
                sessions: 2,
            }],
            listeners: vec![ListenerStatus {
                name: "<ro>".into(),
                serves: "replica".into(),
                addresses: vec!["127.0.0.1:5001".parse().unwrap()],
            }],
            history: vec![Change {
                unix_ms: 3_723_004,
                kind: "route",
                text: "generation 1: sessions go to a&b".into(),
            }],
        };
        let page = render_page(&status, 2_000);
        assert!(!page.contains("<script>"), "{page}");
        assert!(page.contains("&lt;script&gt;x&lt;/script&gt;"));
        assert!(page.contains("c&lt;1&gt;"));
        assert!(page.contains("01:02:03.004 UTC"));
        assert!(page.contains("a&amp;b"));
        assert!(page.contains("http-equiv=\"refresh\""));
        assert!(page.contains("&lt;ro&gt;</td><td>127.0.0.1:5001</td><td>replica"));
    }

    #[test]
    fn an_unconfirmed_leader_says_why_and_what_its_postgres_said() {
        let status = serde_json::json!({
            "cluster": "c",
            "route": {"generation": 2, "target": {"state": "leader", "detail": "127.0.0.11:5433"}},
            "route_since_unix_ms": 0,
            "backends": [
                {"address": "127.0.0.11:5433", "sources": [], "present": true,
                 "role": {"role": "leader"}, "last_check_unix_ms": 9_000, "last_check_latency_ms": 1.0,
                 "last_error": "HTTP 500: sorry, too many clients already", "sessions": 3,
                 "unconfirmed": {"since_unix_ms": 7_000, "check_error": "HTTP 500: sorry, too many clients already", "expired": false},
                 "postgres": "Postgres answers (53300: sorry, too many clients already)"}
            ]
        });
        let text = render_status(&status, 10_000);
        assert!(
            text.contains("leader, unconfirmed (since 3.0s ago, check failing: HTTP 500: sorry, too many clients already; Postgres answers (53300: sorry, too many clients already))"),
            "{text}"
        );
    }

    #[test]
    fn control_characters_are_written_out() {
        assert_eq!(printable("HTTP 500: plain"), "HTTP 500: plain");
        assert_eq!(
            printable("a\u{1b}]0;title\u{7}b\u{7f}c\u{9b}2Jd\u{202e}e\nf"),
            "a\\u{1b}]0;title\\u{7}b\\u{7f}c\\u{9b}2Jd\\u{202e}e\\u{a}f"
        );
        let status = serde_json::json!({
            "cluster": "c\u{1b}[2J",
            "route": {"generation": 1, "target": {"state": "none", "detail": {"reason": "no_leader"}}},
            "route_text": "generation 1: no route\u{1b}[H",
            "backends": [{"address": "127.0.0.1:5433", "sources": ["dns\u{1b}[31m"],
                "role": {"role": "down", "detail": "x"}, "last_error": "HTTP 500: \u{1b}]0;pwned\u{7}\u{1b}[2J\r\n"}],
            "listeners": [{"name": "l\u{1b}[1m", "addresses": ["127.0.0.1:1"], "serves": "leader"}]
        });
        let text = render_status(&status, 0);
        assert!(
            !text.chars().any(|c| c.is_control() && c != '\n'),
            "{text:?}"
        );
        assert_eq!(text.lines().count(), 4, "one line per row: {text}");
        assert!(
            text.contains("HTTP 500: \\u{1b}]0;pwned\\u{7}\\u{1b}[2J\\u{d}\\u{a}"),
            "{text}"
        );
    }

    #[test]
    fn the_route_reads_the_same_in_the_terminal_as_on_the_page() {
        let addr = |n| SocketAddr::from(([127, 0, 0, n], 5433));
        let route = Route {
            generation: 4,
            target: crate::route::Target::None(crate::route::NoRoute::SplitBrain(vec![
                addr(11),
                addr(12),
            ])),
        };
        let status = Status {
            cluster: "c".into(),
            route_text: describe_route(&route),
            route,
            route_since_unix_ms: 0,
            backends: Vec::new(),
            listeners: Vec::new(),
            history: Vec::new(),
        };
        let words = "no route (split brain: 127.0.0.11:5433, 127.0.0.12:5433 all report leader)";
        let json = serde_json::to_value(&status).expect("serialises");
        assert!(render_status(&json, 0).contains(words));
        assert!(render_page(&status, 0).contains(words));
    }

    #[test]
    fn ages_read_in_units_people_use() {
        for (ms, text) in [
            (400, "0.4s ago"),
            (42_000, "42s ago"),
            (180_000, "3 min ago"),
            (7_200_000, "2 h ago"),
            (5 * 86_400_000, "5 days ago"),
        ] {
            assert_eq!(ago(10 * 86_400_000, 10 * 86_400_000 - ms), text);
        }
    }
}
