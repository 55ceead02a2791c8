//! `roleproxy status`: fetches `/status` from a running proxy's admin port and prints it as a
//! table for a terminal, like `patronictl list`.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;

use roleproxy_core::printable;

use crate::config::Endpoint;
use crate::discovery::DnsResolver;
use crate::http_client::{self, HttpError};
use crate::status::Status;
use crate::wording::{backend_row, pause_text, when, BACKEND_COLUMNS};

/// Why `roleproxy status` could not show the status, or a change sent to an admin port failed.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("cannot reach the admin port {addr}: {error}")]
    Unreachable { addr: SocketAddr, error: String },
    /// It answered, but not in HTTP: a Postgres port, say, given for the admin port.
    #[error("{addr} is not a roleproxy admin port ({error})")]
    NotAdmin { addr: SocketAddr, error: String },
    #[error("the admin port {addr} answered HTTP {status}")]
    Http { addr: SocketAddr, status: u16 },
    #[error("the admin port {addr} sent something that is not a status document: {error}")]
    Invalid { addr: SocketAddr, error: String },
    #[error("the admin port {addr} answered HTTP {status}: {answer}")]
    Refused {
        addr: SocketAddr,
        status: u16,
        answer: String,
    },
    #[error("--admin: {0}")]
    BadAddress(String),
    #[error("--admin: cannot resolve {host}: {error}")]
    Unresolved { host: String, error: String },
}

/// How long resolving `--admin` may take.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// `--admin HOST:PORT`: the address, or every address of the name, from the system resolver
/// (`/etc/hosts`, then `/etc/resolv.conf`), as the proxy resolves names with no
/// `backends.nameservers`.
pub async fn admin_addresses(written: &str) -> Result<Vec<SocketAddr>, StatusError> {
    let (host, port) = match written.parse().map_err(StatusError::BadAddress)? {
        Endpoint::Addr(addr) => return Ok(vec![addr]),
        Endpoint::Name { host, port } => (host, port),
    };
    let unresolved = |error: String| StatusError::Unresolved {
        host: host.clone(),
        error,
    };
    let resolver = DnsResolver::new(&[], RESOLVE_TIMEOUT).map_err(|e| unresolved(e.to_string()))?;
    let ips = resolver
        .resolve(&host)
        .await
        .map_err(|e| unresolved(e.to_string()))?;
    Ok(ips
        .into_iter()
        .map(|ip| SocketAddr::new(ip, port))
        .collect())
}

/// Fetches `/status` from the first of `addrs` that can be reached (a name's addresses: the
/// admin port may listen on only one family).
pub async fn fetch_status_from(addrs: &[SocketAddr]) -> Result<Status, StatusError> {
    let mut last = StatusError::BadAddress("no address".into());
    for addr in addrs {
        match fetch_status(*addr).await {
            Err(e @ StatusError::Unreachable { .. }) => last = e,
            answer => return answer,
        }
    }
    Err(last)
}

/// Largest `/status` document `roleproxy status` accepts.
const MAX_STATUS_BYTES: usize = 4 * 1024 * 1024;

/// How long one request to an admin port may take.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);

/// One request to an admin port: its HTTP status and body (at most [`MAX_STATUS_BYTES`]).
async fn exchange(
    addr: SocketAddr,
    method: hyper::Method,
    path: &str,
    token: Option<&str>,
) -> Result<(u16, Bytes), StatusError> {
    let unreachable = |error: String| StatusError::Unreachable { addr, error };
    let exchange = async {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let host = addr.to_string();
        let ask = http_client::Ask {
            method,
            path,
            host: &host,
            bearer: token,
        };
        let limits = http_client::Limits {
            head: 64 * 1024,
            headers: 64,
            body: MAX_STATUS_BYTES,
        };
        http_client::exchange(stream, ask, limits)
            .await
            .map_err(|e| match e {
                // Closed without an answer, as Postgres does, or answered in another protocol.
                HttpError::Http(e) if e.is_incomplete_message() || e.is_parse() => {
                    StatusError::NotAdmin {
                        addr,
                        error: e.to_string(),
                    }
                }
                HttpError::Http(e) => unreachable(e.to_string()),
                other => unreachable(other.to_string()),
            })
    };
    tokio::time::timeout(ADMIN_TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| Err(unreachable(format!("timed out after {ADMIN_TIMEOUT:?}"))))
}

/// Fetches `/status` from a running proxy's admin port.
pub async fn fetch_status(addr: SocketAddr) -> Result<Status, StatusError> {
    let (status, body) = exchange(addr, hyper::Method::GET, "/status", None).await?;
    if status != 200 {
        return Err(StatusError::Http { addr, status });
    }
    serde_json::from_slice(&body).map_err(|e| StatusError::Invalid {
        addr,
        error: e.to_string(),
    })
}

/// Sends a change (`POST path`, e.g. `/pause`) to one admin port, with `token` as a bearer
/// token; returns the port's answer, or why it failed (its answer, if it gave one).
pub async fn post_change(
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
) -> Result<String, StatusError> {
    let (status, body) = exchange(addr, hyper::Method::POST, path, token).await?;
    let answer = printable(String::from_utf8_lossy(&body).trim()).into_owned();
    if status == 200 {
        Ok(answer)
    } else {
        Err(StatusError::Refused {
            addr,
            status,
            answer,
        })
    }
}

/// Sends a change to the first of `addrs` that can be reached (a name's addresses: the admin
/// port may listen on only one family).
async fn post_change_first(
    addrs: &[SocketAddr],
    path: &str,
    token: Option<&str>,
) -> Result<String, StatusError> {
    let mut last = StatusError::BadAddress("no address".into());
    for addr in addrs {
        match post_change(*addr, path, token).await {
            Err(e @ StatusError::Unreachable { .. }) => last = e,
            answer => return answer,
        }
    }
    Err(last)
}

/// Sends the same change to every admin port at once (each node runs its own proxy), each as
/// written on the command line (`HOST:PORT`); the answers come back in the order given.
pub async fn post_change_to_all(
    admins: &[String],
    path: &str,
    token: Option<&str>,
) -> Vec<(String, Result<String, StatusError>)> {
    let mut sends = tokio::task::JoinSet::new();
    for (i, written) in admins.iter().enumerate() {
        let (written, path, token) = (written.clone(), path.to_string(), token.map(str::to_string));
        sends.spawn(async move {
            let answer = match admin_addresses(&written).await {
                Ok(addrs) => post_change_first(&addrs, &path, token.as_deref()).await,
                Err(e) => Err(e),
            };
            (i, answer)
        });
    }
    let mut answers: Vec<Option<Result<String, StatusError>>> =
        admins.iter().map(|_| None).collect();
    while let Some(joined) = sends.join_next().await {
        match joined {
            Ok((i, answer)) => {
                if let Some(slot) = answers.get_mut(i) {
                    *slot = Some(answer);
                }
            }
            Err(e) => tracing::error!(error = %e, "a request to an admin port panicked"),
        }
    }
    admins
        .iter()
        .zip(answers)
        .map(|(written, answer)| {
            // A panicked request is an answer missing: its port is named as failed.
            let answer = answer.unwrap_or_else(|| {
                Err(StatusError::BadAddress(format!(
                    "{written}: the request failed inside roleproxy"
                )))
            });
            (written.clone(), answer)
        })
        .collect()
}

/// `/status` as a table for a terminal, like `patronictl list`. Pure. Every string in it may
/// have come from the network (a role endpoint's error body), so each is made [`printable`].
pub fn render_status(status: &Status, now_unix_ms: u64) -> String {
    let clean = |text: &str| printable(text).into_owned();
    // The server's own words for the route, as on the stats page and in client errors.
    let mut out = format!(
        "cluster {}  route {} (since {})\n",
        clean(&status.cluster),
        clean(&status.route_text),
        when(now_unix_ms, Some(status.route_since_unix_ms))
    );
    if let Some(pause) = &status.pause {
        out.push_str(&pause_text(pause, now_unix_ms));
        out.push('\n');
    }
    let mut rows: Vec<[String; 7]> = vec![BACKEND_COLUMNS.map(str::to_string)];
    for backend in &status.backends {
        rows.push(backend_row(backend, now_unix_ms).map(|cell| clean(&cell)));
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
    for listener in &status.listeners {
        let addresses: Vec<String> = listener.addresses.iter().map(ToString::to_string).collect();
        out.push_str(&format!(
            "listener {} on {}: {}\n",
            clean(&listener.name),
            addresses.join(", "),
            clean(&listener.serves)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats_page::render_page;
    use roleproxy_core::route::{describe_route, Route};

    /// A port that reads the request and answers `reply` (nothing: closes, as Postgres does).
    async fn not_http(reply: &'static [u8]) -> SocketAddr {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.expect("accept");
            let mut request = [0u8; 1024];
            let _ = stream.read(&mut request).await;
            let _ = stream.write_all(reply).await;
        });
        addr
    }

    #[tokio::test]
    async fn a_port_that_does_not_speak_http_is_named_as_not_an_admin_port() {
        for reply in [&b""[..], b"SSH-2.0-OpenSSH_9.2\r\n"] {
            let addr = not_http(reply).await;
            let error = fetch_status(addr).await.expect_err("no status");
            assert!(
                matches!(error, StatusError::NotAdmin { .. }),
                "{reply:?}: {error:?}"
            );
            let text = error.to_string();
            assert!(
                text.starts_with(&format!("{addr} is not a roleproxy admin port (")),
                "{text}"
            );
        }
    }

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
                 "last_error_unix_ms": 5_000, "sessions": 42}
            ]
        });
        let text = render_status(&document(status), 12_000);
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
            lines[3].contains("leader") && lines[3].contains("1.2 ms"),
            "{text}"
        );
        // The sessions column: a cell of its own, not a digit of a time.
        assert!(
            lines[3].split_whitespace().any(|cell| cell == "42"),
            "{text}"
        );
        assert!(
            lines[2].split_whitespace().any(|cell| cell == "0"),
            "{text}"
        );
        assert!(lines[3].contains("dns:iad.app.internal,backup"), "{text}");
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
        let text = render_status(&document(status), 10_000);
        assert!(
            text.contains("leader, unconfirmed (since 3.0s ago, check failing: HTTP 500: sorry, too many clients already; Postgres answers (53300: sorry, too many clients already))"),
            "{text}"
        );
    }

    #[test]
    fn the_route_reads_the_same_in_the_terminal_as_on_the_page() {
        let addr = |n| SocketAddr::from(([127, 0, 0, n], 5433));
        let route = Route {
            generation: 4,
            target: roleproxy_core::route::Target::None(
                roleproxy_core::route::NoRoute::SplitBrain(vec![addr(11), addr(12)]),
            ),
        };
        let status = Status {
            cluster: "c".into(),
            route_text: describe_route(&route),
            route,
            route_since_unix_ms: 0,
            backends: Vec::new(),
            listeners: Vec::new(),
            history: Vec::new(),
            pause: None,
        };
        let words = "no route (split brain: 127.0.0.11:5433, 127.0.0.12:5433 all report leader)";
        assert!(render_status(&status, 0).contains(words));
        assert!(render_page(&status, 0).contains(words));
    }

    #[test]
    fn a_pause_and_an_operator_state_show_in_the_terminal() {
        let status = serde_json::json!({
            "cluster": "c",
            "route": {"generation": 2, "target": {"state": "leader", "detail": "127.0.0.11:5433"}},
            "route_since_unix_ms": 0,
            "backends": [
                {"address": "127.0.0.12:5433", "present": true, "role": {"role": "replica"},
                 "last_check_unix_ms": 9_000, "last_check_latency_ms": 1.0, "last_error": null,
                 "last_error_unix_ms": null, "unconfirmed": null, "postgres": null,
                 "operator": "maintenance"}
            ],
            "pause": {"since_unix_ms": 4_000, "limit_ms": 60_000, "resumes_at_unix_ms": 64_000,
                      "held_clients": 1}
        });
        let text = render_status(&document(status), 10_000);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[1],
            "PAUSED since 6.0s ago: leader sessions end at their next transaction boundary; 1 new client held; resumes by itself in 54s (proxy.pause_limit 60s) unless POST /resume comes first",
            "{text}"
        );
        assert!(
            lines[3].contains("replica, in maintenance by the operator"),
            "{text}"
        );
        // A server without pauses sends neither: nothing is shown.
        let quiet = serde_json::json!({
            "cluster": "c",
            "route": {"generation": 2, "target": {"state": "leader", "detail": "127.0.0.11:5433"}}
        });
        assert!(!render_status(&document(quiet), 0).contains("PAUSED"));
    }

    /// A JSON fixture read as `roleproxy status` reads what the server sends.
    fn document(json: serde_json::Value) -> Status {
        serde_json::from_value(json).expect("a /status document")
    }
}
