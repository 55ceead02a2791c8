//! The `/status` document: built by the admin server from the view's state, read by the stats
//! page and, as JSON, by `roleproxy status`.

use serde::Serialize;

use crate::leader::{BackendStatus, Change, ListenerStatus};
use crate::route::Route;

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
