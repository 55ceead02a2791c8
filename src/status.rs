//! The `/status` document, one schema for all who use it: the view fills in its parts, the admin
//! server serialises it, the stats page renders it, and `roleproxy status` deserialises it.
//!
//! Each part has one owner, which publishes it whole on a watch channel: the view its
//! [`ViewStatus`], the running proxy its [`ServingStatus`]. The admin server puts the document
//! together from them, the route and the session counters; nobody locks anything to write it.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use roleproxy_core::route::{Mode, Role, Route};

/// Milliseconds since the Unix epoch (0 for a clock before it).
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The `/status` document. Lists and counts a server leaves out read as empty, so a client
/// still shows what a server of another version sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub cluster: String,
    pub route: Route,
    /// The route in words.
    #[serde(default)]
    pub route_text: String,
    #[serde(default)]
    pub route_since_unix_ms: u64,
    #[serde(default)]
    pub backends: Vec<BackendStatus>,
    #[serde(default)]
    pub listeners: Vec<ListenerStatus>,
    /// Recent role and route changes, oldest first.
    #[serde(default)]
    pub history: Vec<Change>,
    /// Set while the proxy is paused (`POST /pause`).
    #[serde(default)]
    pub pause: Option<PauseStatus>,
}

/// A pause, as `/status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PauseStatus {
    pub since_unix_ms: u64,
    /// `proxy.pause_limit` when it began.
    pub limit_ms: u64,
    /// When it lifts by itself, unless resumed before.
    pub resumes_at_unix_ms: u64,
    /// New clients waiting for it to lift.
    pub held_clients: u64,
}

/// What `/status` shows for one backend.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackendStatus {
    pub address: SocketAddr,
    #[serde(default)]
    pub sources: Vec<String>,
    pub present: bool,
    pub role: Role,
    pub last_check_unix_ms: Option<u64>,
    pub last_check_latency_ms: Option<f64>,
    pub last_error: Option<String>,
    /// When `last_error` happened: an error older than the last check is history, not a
    /// current fault.
    pub last_error_unix_ms: Option<u64>,
    /// Set while this leader's checks fail but its Postgres answers (rule 7).
    pub unconfirmed: Option<UnconfirmedStatus>,
    /// The latest probe of its Postgres, if one ran.
    pub postgres: Option<String>,
    /// Set while its Postgres port fails (refused, reset, not Postgres, or silent with no sign
    /// of life): it is not routed, whatever its role endpoint says, until a probe finds it
    /// answering.
    #[serde(default)]
    pub data_port: Option<DataPortStatus>,
    #[serde(default)]
    pub sessions: u64,
    /// What an operator set: `ready`, `drain` or `maintenance`.
    #[serde(default)]
    pub operator: Mode,
}

/// A node whose Postgres port fails, as `/status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataPortStatus {
    pub since_unix_ms: u64,
    pub error: String,
}

/// A leader that leads on its Postgres's word only, as `/status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnconfirmedStatus {
    pub since_unix_ms: u64,
    /// Why its checks fail.
    pub check_error: String,
    /// `check.unconfirmed_limit` has passed: its sessions stay, new clients wait.
    pub expired: bool,
}

/// What `/status` shows for one listener.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListenerStatus {
    pub name: String,
    /// `leader`, `replica`, `replica, else leader`, or `target ADDR`.
    pub serves: String,
    /// Bound addresses (real ports where the configuration said 0).
    pub addresses: Vec<SocketAddr>,
}

/// Role and route changes kept for the timeline.
pub const HISTORY_LEN: usize = 50;

/// One role or route change, as the timeline shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Change {
    pub unix_ms: u64,
    /// `role` or `route`.
    pub kind: String,
    pub text: String,
}

/// The view's part of `/status`, as of its latest event.
#[derive(Debug, Clone)]
pub struct ViewStatus {
    /// Session counts are 0 here: the admin server reads them from the counters.
    pub backends: Vec<BackendStatus>,
    /// Shared with the view, which copies it only when it adds a change while a reader holds it.
    pub history: Arc<VecDeque<Change>>,
    /// When the current route was published.
    pub route_since: SystemTime,
}

/// The running configuration's part of `/status`: what the proxy serves.
#[derive(Debug, Clone, Default)]
pub struct ServingStatus {
    /// The cluster's name for people (`Config::cluster_name`).
    pub cluster: String,
    /// The listeners, in configuration order.
    pub listeners: Vec<ListenerStatus>,
}
