//! What an operator asked of the running proxy: a pause (`POST /pause`, as PgBouncer's
//! `PAUSE` around a Patroni or repmgr switchover), and each backend's drain or maintenance
//! (as HAProxy's `set server ... state`).
//!
//! It is one value on a watch channel, kept for the life of the process: across reloads and
//! rediscovery (modes are keyed by address), not across a restart. Sessions and new clients
//! read it through the pure rules in `route` ([`roleproxy_core::route::leader_session_fate`] and its
//! neighbours); nothing scans sessions to end them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use roleproxy_core::route::Mode;

use crate::config::Secret;
use crate::metrics as m;

/// What the operator set, as sessions and the admin port read it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OperatorState {
    /// Set while paused.
    pub pause: Option<Pause>,
    /// Backends not ready; a backend missing here is ready.
    pub modes: BTreeMap<SocketAddr, Mode>,
}

impl OperatorState {
    pub fn paused(&self) -> bool {
        self.pause.is_some()
    }

    pub fn mode(&self, addr: SocketAddr) -> Mode {
        self.modes.get(&addr).copied().unwrap_or_default()
    }
}

/// One pause.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pause {
    pub since: SystemTime,
    pub started: Instant,
    /// `proxy.pause_limit` when it began: it lifts by itself this long after `started`.
    pub limit: Duration,
}

impl Pause {
    pub fn ends_at(&self) -> Instant {
        self.started + self.limit
    }
}

/// The operator's state and the clients a pause holds. Shared by the admin port and every
/// session.
#[derive(Debug)]
pub struct Operator {
    state: watch::Sender<OperatorState>,
    held: AtomicU64,
}

impl Operator {
    pub fn new() -> Arc<Operator> {
        Arc::new(Operator {
            state: watch::Sender::new(OperatorState::default()),
            held: AtomicU64::new(0),
        })
    }

    pub fn subscribe(&self) -> watch::Receiver<OperatorState> {
        self.state.subscribe()
    }

    /// Whether the proxy is paused now.
    pub fn paused(&self) -> bool {
        self.state.borrow().paused()
    }

    /// A copy of the state now.
    pub fn state(&self) -> OperatorState {
        self.state.borrow().clone()
    }

    /// Pauses, for at most `limit`. Pausing again keeps the pause under way and its limit;
    /// returns it, and whether this call began it.
    pub fn pause(&self, limit: Duration) -> (Pause, bool) {
        let begun = Pause {
            since: SystemTime::now(),
            started: Instant::now(),
            limit,
        };
        let mut current = begun;
        let began = self.state.send_if_modified(|state| match state.pause {
            Some(under_way) => {
                current = under_way;
                false
            }
            None => {
                state.pause = Some(begun);
                true
            }
        });
        if began {
            m::paused(true);
            m::pause_event("pause");
            tracing::warn!(limit = %humantime::format_duration(limit), "paused: leader sessions end at their next transaction boundary, new clients are held");
        }
        (current, began)
    }

    /// Lifts the pause, if there is one, and returns it. `auto`: its limit ran out.
    pub fn resume(&self, auto: bool) -> Option<Pause> {
        let mut lifted = None;
        self.state.send_if_modified(|state| {
            lifted = state.pause.take();
            lifted.is_some()
        });
        let pause = lifted?;
        m::paused(false);
        let paused_for = humantime::format_duration(round_ms(pause.started.elapsed()));
        if auto {
            m::pause_event("auto_resume");
            tracing::warn!(%paused_for, held = self.held(), "proxy.pause_limit ran out: resumed by itself");
        } else {
            m::pause_event("resume");
            tracing::info!(%paused_for, held = self.held(), "resumed");
        }
        Some(pause)
    }

    /// Sets a backend's mode; returns the one it had.
    pub fn set_mode(&self, addr: SocketAddr, mode: Mode) -> Mode {
        let mut before = Mode::Ready;
        self.state.send_if_modified(|state| {
            before = state.mode(addr);
            match mode {
                Mode::Ready => state.modes.remove(&addr),
                _ => state.modes.insert(addr, mode),
            };
            before != mode
        });
        m::backend_operator_state(addr, mode);
        if before != mode {
            tracing::info!(backend = %addr, mode = mode.label(), was = before.label(), "backend operator state changed");
        }
        before
    }

    /// Counts a client held by the pause until the guard is dropped.
    pub fn hold(self: &Arc<Self>) -> Held {
        let held = self.held.fetch_add(1, Ordering::Relaxed) + 1;
        m::pause_held_clients(held);
        Held(Arc::clone(self))
    }

    /// Clients held by the pause now.
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }

    /// Lifts each pause when its limit runs out, until `cancel` fires.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        let mut state = self.subscribe();
        loop {
            let pause = state.borrow_and_update().pause;
            let lapse = async {
                match pause {
                    Some(pause) => tokio::time::sleep_until(pause.ends_at()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => return,
                changed = state.changed() => if changed.is_err() { return },
                _ = lapse => {
                    // Only the pause that ran out: one begun since has its own limit.
                    if self.state.borrow().pause == pause {
                        self.resume(true);
                    }
                }
            }
        }
    }
}

/// A client held by the pause.
pub struct Held(Arc<Operator>);

impl Drop for Held {
    fn drop(&mut self) {
        let held = self
            .0
            .held
            .fetch_sub(1, Ordering::Relaxed)
            .saturating_sub(1);
        m::pause_held_clients(held);
    }
}

/// What the admin port's changing requests read from the running configuration; a reload
/// sends a new one.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AdminSettings {
    /// `admin.allow_changes`.
    pub allow_changes: bool,
    /// The token of `admin.token_file`, if set.
    pub token: Option<Secret>,
    /// `proxy.pause_limit`.
    pub pause_limit: Duration,
    /// `proxy.pause_grace`, for the answer to `POST /pause`.
    pub pause_grace: Duration,
}

impl AdminSettings {
    pub fn from_config(config: &crate::Config) -> AdminSettings {
        AdminSettings {
            allow_changes: config.admin.allow_changes,
            token: config.admin.token.clone(),
            pause_limit: config.proxy.pause_limit,
            pause_grace: config.proxy.pause_grace,
        }
    }
}

fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}
