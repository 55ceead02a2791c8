//! The access log (`proxy.access_log`): one line per client connection, as HAProxy's
//! `option tcplog` gives, on the tracing target [`TARGET`] so it can be filtered apart from the
//! rest (`RUST_LOG=roleproxy::access=info`) and comes out in the log's own format, text or JSON.
//!
//! Every field is an address, a number, a configured name or a fixed label: nothing a client
//! or a backend sends reaches the line, so there is nothing to escape. The byte counts are the
//! ones the copy path keeps anyway; a line costs nothing per message, only one event per
//! connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use tokio::time::Instant;

/// The tracing target of access lines.
pub const TARGET: &str = "roleproxy::access";

/// Where and when a client connected: what its access line starts with.
#[derive(Debug, Clone)]
pub struct Opened {
    pub client: SocketAddr,
    /// The listening address it connected to, as bound (a wildcard stays a wildcard).
    pub listen: Arc<str>,
    pub at: SystemTime,
    pub since: Instant,
}

impl Opened {
    pub fn now(client: SocketAddr, listen: Arc<str>) -> Opened {
        Opened {
            client,
            listen,
            at: SystemTime::now(),
            since: Instant::now(),
        }
    }
}

/// How one connection ended: the backend it reached, if any, and the bytes each way.
#[derive(Debug, Clone, Copy)]
pub struct Ended {
    pub backend: Option<SocketAddr>,
    /// The `result` label of `roleproxy_sessions_total`.
    pub result: &'static str,
    pub client_to_backend: u64,
    pub backend_to_client: u64,
}

impl Ended {
    /// A client that never reached a backend (refused, silent, gone, a CancelRequest).
    pub fn unserved(result: &'static str) -> Ended {
        Ended {
            backend: None,
            result,
            client_to_backend: 0,
            backend_to_client: 0,
        }
    }
}

/// Writes the connection's access line.
pub fn log(listener: &str, opened: &Opened, ended: Ended) {
    let backend = ended
        .backend
        .map_or_else(|| "-".to_owned(), |addr| addr.to_string());
    tracing::info!(
        target: TARGET,
        client = %opened.client,
        listener,
        listen = %opened.listen,
        backend,
        start = %humantime::format_rfc3339_millis(opened.at),
        duration_ms = opened.since.elapsed().as_millis() as u64,
        bytes_client_to_backend = ended.client_to_backend,
        bytes_backend_to_client = ended.backend_to_client,
        result = ended.result,
        "connection"
    );
}
