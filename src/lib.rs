//! roleproxy: a role-aware TCP proxy for Postgres high-availability clusters.
//!
//! It finds the cluster's nodes through DNS, asks each node's role endpoint who is leader, and
//! sends every client connection to that one leader, closing sessions when the leader moves.
//!
//! # Layout
//!
//! Data flows one way: names → addresses → roles → one route → sessions.
//!
//! The routing rules, the Postgres wire and the framing are pure, and live in their own crate,
//! [`roleproxy_core`]: start reading there, at [`roleproxy_core::route`]. This crate does the
//! sockets, the clock and the tasks around them.
//!
//! - [`config`]: `proxy.toml` schema, `${VAR}` expansion, validation naming every bad key.
//! - [`discovery`]: DNS names and backup addresses (or names) → the backend set; the resolver.
//! - [`check`]: one role check of one node (HTTP GET → [`roleproxy_core::route::Role`]) and the probe of its Postgres.
//! - [`view`]: the view: the task that owns every backend's state and check loop, runs the
//!   rules and publishes the route, the backend set with its session counters, and its part of
//!   `/status`.
//! - [`own_addresses`]: the proxy's own addresses, which it never connects to.
//! - [`sessions`]: listeners (leader, replica, fixed target), connection limit, wait for a
//!   backend, connect, copy, drain.
//! - [`cancel`]: where a CancelRequest goes: each plaintext replica session's key and backend.
//! - [`pgwire_io`]: a client's first packet read off its socket, and a client refused as
//!   Postgres would.
//! - [`http_client`]: the one HTTP/1 client, for role checks and the admin commands: one
//!   request, its answer's head and body read within bounds.
//! - [`pgclient`]: the Postgres check's own client: TLS, SCRAM-SHA-256 only, one query, every
//!   read bounded.
//! - [`access`]: the access log, one line per client connection (`proxy.access_log`).
//! - [`copy`]: moving a session's bytes (splice or pooled buffers; nothing held while idle).
//! - [`startup`]: a client's startup, held until the backend answers it and replayed on the
//!   next leader when a dying one fails it (rule 11).
//! - [`preconnect`]: connections to the leader opened ahead of demand (optional).
//! - [`reserve`]: the descriptor held back so a client is told when this process has none, and
//!   what counts as this host running short.
//! - [`running`]: the running proxy: its listeners, the session settings of each configuration,
//!   and reloading (SIGHUP, `POST /reload`).
//! - [`preflight`]: a new configuration tried against the live cluster before a reload applies
//!   it: refused if it would leave routing worse than now.
//! - [`operator`]: what an operator asked for: a pause with its limit, and each backend's drain
//!   or maintenance; kept across reloads and rediscovery.
//! - [`admin`]: the admin port's requests: `/metrics`, `/status`, `/healthz`, `/ready`, the stats
//!   page, and the changes (`POST /reload`, `/pause`, `/resume`, `/backends/ADDR/STATE`),
//!   behind `admin.allow_changes` and the token.
//! - [`status`]: the `/status` document, one schema for the server, the page and the client, and
//!   the parts of it that their owners publish.
//! - [`stats_page`]: the stats page's HTML.
//! - [`status_cli`]: `roleproxy status`, the terminal client of `/status`.
//! - [`wording`]: how times, errors and network text read for people, on the page and in the
//!   terminal.
//! - [`metrics`]: metric names and descriptions.
//! - [`supervise`]: the core tasks, watched; one that ends unexpectedly stops the process.
//!
//! Three crates of the workspace stand beside this one:
//!
//! - `roleproxy-core` (`core/`): the routing rules, the Postgres wire and the framing, pure
//!   (above).
//! - `roleproxy-agent` (`agent/`): a role endpoint for nodes that have none, run as
//!   `roleproxy agent`; it does not depend on this crate.
//! - `roleproxy-common` (`common/`): what the proxy and the agent share: the HTTP server under
//!   the admin port and the agent, bounded against idle and slow clients and against request
//!   heads of any size; repeated warnings, one line per key every 10 s with the count left out
//!   ([`roleproxy_common::ratelimit`]); and [`roleproxy_common::error_chain`] and
//!   [`config::Secret`].
//!
//! [`Proxy::bind`] then [`Proxy::run`] start it in-process, which is how the tests run it.

pub mod access;
pub mod admin;
pub mod cancel;
pub mod check;
pub mod config;
pub mod copy;
pub mod discovery;
pub mod http_client;
pub mod metrics;
pub mod operator;
pub mod own_addresses;
pub mod pgclient;
pub mod pgwire_io;
pub mod preconnect;
pub mod preflight;
pub mod reserve;
pub mod running;
pub mod sessions;
pub mod startup;
pub mod stats_page;
pub mod status;
pub mod status_cli;
pub mod supervise;
pub mod view;
pub mod wording;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::Config;
pub use running::{ReloadError, Reloader};

/// The crate version, as released.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The commit built from: git's short hash, `-dirty` with uncommitted changes; else
/// `ROLEPROXY_COMMIT` at build time, else `unknown` (see `build.rs`).
pub const COMMIT: &str = env!("ROLEPROXY_COMMIT");

/// Start-up failures.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on {addr}: {source}{}", sessions::bind_hint(*addr, source))]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// The configuration sends clients back to this proxy (read against this host's
    /// interfaces, so checked here and not when the file is parsed).
    #[error("{0}")]
    Loops(#[from] config::ConfigError),
    /// A core task ended while the proxy ran: the process should exit and be restarted.
    #[error("stopped because the {0}")]
    TaskEnded(supervise::TaskEnded),
}

/// A proxy whose sockets are bound; [`Proxy::run`] serves them.
pub struct Proxy {
    config: Config,
    listeners: Vec<running::Bound>,
    admin: Option<TcpListener>,
    source: Option<PathBuf>,
    reloader: Reloader,
    reloads: mpsc::Receiver<running::Request>,
}

impl Proxy {
    /// Binds every listener and the admin port, so that a bad address fails before anything runs;
    /// first refuses a configuration that would send clients back to this proxy.
    pub async fn bind(config: Config) -> Result<Proxy, Error> {
        own_addresses::refuse_loops_here(&config)?;
        let bind = |addr: SocketAddr, ipv6_only| {
            sessions::bind(addr, ipv6_only).map_err(|source| Error::Bind { addr, source })
        };
        let mut listeners = Vec::new();
        for spec in config.all_listeners() {
            for addr in &spec.addresses {
                listeners.push((spec.clone(), *addr, bind(*addr, true)?));
            }
        }
        let admin = config.admin.address.map(|a| bind(a, false)).transpose()?;
        let (reloader, reloads) = Reloader::channel();
        Ok(Proxy {
            config,
            listeners,
            admin,
            source: None,
            reloader,
            reloads,
        })
    }

    /// Where a reload (SIGHUP, `POST /reload`) reads the configuration from.
    pub fn reload_from(mut self, path: PathBuf) -> Proxy {
        self.source = Some(path);
        self
    }

    /// A handle that reloads the configuration of this proxy once it runs.
    pub fn reloader(&self) -> Reloader {
        self.reloader.clone()
    }

    /// The bound client addresses (with real ports when the config said `:0`).
    pub fn listen_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|(_, _, l)| l.local_addr().ok())
            .collect()
    }

    /// The bound addresses of one listener by name (`leader` is `[listen]`).
    pub fn listener_addrs(&self, name: &str) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter(|(spec, _, _)| spec.name == name)
            .filter_map(|(_, _, l)| l.local_addr().ok())
            .collect()
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Runs until `shutdown` resolves, then stops accepting, gives sessions
    /// `proxy.shutdown_grace` to finish, and closes the rest. Reload requests are applied
    /// meanwhile.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        let config = self.config;
        let expiry = config.metrics_expiry();
        metrics::install(expiry);
        let background = CancellationToken::new();
        let (supervisor, mut ended) = supervise::Supervisor::new();

        let (view, handle, events) = view::ClusterView::new(
            view::ViewSettings::from_config(&config.check),
            background.clone(),
            supervisor.clone(),
        );
        supervisor.spawn("leader_view", background.clone(), view.run(events));
        let own = Arc::new(own_addresses::OwnAddrs::new());
        let (backends, backend_configs) = watch::channel(config.backends.clone());
        let stop_accepting = CancellationToken::new();
        let (admin_settings, admin_settings_rx) =
            watch::channel(operator::AdminSettings::from_config(&config));
        let operator = operator::Operator::new();
        supervisor.spawn(
            "operator",
            background.clone(),
            Arc::clone(&operator).run(background.clone()),
        );
        let (serving, serving_rx) = watch::channel(status::ServingStatus::default());
        let admin = self.admin.as_ref().and_then(|l| l.local_addr().ok());
        let admin_server = self.admin.map(|listener| {
            let state = Arc::new(admin::AdminState {
                view: handle.clone(),
                serving: serving_rx,
                supervisor: supervisor.clone(),
                stopping: stop_accepting.clone(),
                settings: admin_settings_rx,
                operator: Arc::clone(&operator),
                reloader: Some(self.reloader.clone()),
            });
            (listener, state)
        });

        let hard_stop = CancellationToken::new();
        let tracker = TaskTracker::new();
        let reports = handle.events.clone();
        let mut running = running::Running::start(
            config,
            self.source,
            self.listeners,
            running::ProcessParts {
                view: handle,
                own: Arc::clone(&own),
                supervisor: supervisor.clone(),
                serving,
                backends,
                admin_settings,
                operator,
                stop_accepting,
                background: background.clone(),
                hard_stop: hard_stop.clone(),
                tracker: tracker.clone(),
                admin,
            },
        );
        // Only now that every listener's series is registered at 0: a scrape never finds a
        // listener missing. Requests that came meanwhile wait in the bound socket's backlog.
        if let Some((listener, state)) = admin_server {
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(address = %addr, "admin listening: /metrics /status /healthz /ready and the stats page on /");
            }
            supervisor.spawn(
                "admin",
                background.clone(),
                admin::serve(listener, state, background.clone()),
            );
        }
        // Only now that the listeners are published as the proxy's own: a first answer that
        // names one of them is dropped, never routed to.
        supervisor.spawn(
            "discovery",
            background.clone(),
            discovery::run(backend_configs, reports, own, background.clone()),
        );

        // Several times per expiry, so a live backend's series never expire between two.
        let mut keep_alive = tokio::time::interval(expiry / 4);
        keep_alive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut shutdown = std::pin::pin!(shutdown);
        let mut failure = None;
        // Evaluated off this loop: shutdown and a dead core task never wait for a reload.
        let mut reloads = running::Reloads::new(self.reloads);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                Some(task) = ended.recv() => {
                    failure = Some(task);
                    break;
                }
                _ = keep_alive.tick() => metrics::keep_alive(running.metered_backends()),
                step = reloads.next() => reloads.handle(step, &mut running).await,
            }
        }
        // The evaluation under way is aborted; it and any reload asked for from now on are
        // answered "stopped", not left waiting.
        drop(reloads);
        let grace = running.config.proxy.shutdown_grace;
        tracing::info!(grace = %humantime::format_duration(grace), "shutting down: no new clients");
        running.stop_listeners().await;
        tracker.close();
        if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
            tracing::info!(
                open = tracker.len(),
                "grace period over; closing remaining sessions"
            );
            hard_stop.cancel();
            tracker.wait().await;
        }
        background.cancel();
        match failure {
            Some(task) => {
                tracing::error!(task = task.task, reason = %task.reason, "stopped because a core task ended");
                Err(Error::TaskEnded(task))
            }
            None => {
                tracing::info!("stopped");
                Ok(())
            }
        }
    }
}
