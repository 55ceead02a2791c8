//! The running proxy: its listeners, the session settings of each configuration it ran, and how
//! a new configuration is applied to them without a restart.
//!
//! A reload is all or nothing: the file is validated and every new listener is bound before
//! anything changes, so a bad file or a taken port leaves the old configuration running. What
//! survives a reload is what sessions depend on: the leader view keeps every backend's confirmed
//! role, discovery keeps its last good answers, so a leader that is still the leader keeps its
//! route generation and its sessions.
//!
//! A new `[check]` is first tried on the current leader: unless it answers `leader`, the reload
//! is refused, since applied it would move the route and close every session at once. An
//! operator who means it forces the reload (`POST /reload?force=true`, or `reload.force = true`
//! in the file for SIGHUP).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::check::{self, CheckSettings, Observation};
use crate::config::{BackendsConfig, Config, ConfigError, ListenerConfig, ProxyConfig, Serves};
use crate::leader::{Event, ViewHandle, ViewSettings};
use crate::loops::{Listening, OwnAddrs};
use crate::metrics as m;
use crate::preconnect::Preconnect;
use crate::proxy::{self, ListenerPlan, SessionBase, SessionLimit, SessionSettings};
use crate::reserve::Reserve;
use crate::route::Role;
use crate::status::{ListenerStatus, ServingStatus};
use crate::supervise::Supervisor;

/// Why a reload was refused. The old configuration stays in force.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("no configuration file to reload from (started without --config)")]
    NoSource,
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the proxy is shutting down")]
    Stopped,
    /// The new `[check]` could not even ask the current leader (wrong port, path, password):
    /// applied, it would take every node down and close every session.
    #[error(
        "check: the new settings cannot check the current leader {leader}: {error}; {FORCE_HINT}"
    )]
    CheckFails { leader: SocketAddr, error: String },
    /// The new `[check]` hears the current leader say something other than `leader` (a leader
    /// word it does not know, another path or port, another kind): applied, it would move the
    /// route and close every session.
    #[error("check: with the new settings the current leader {leader} answers {role}, not leader; applied, this would close every session; {FORCE_HINT}")]
    NotLeader { leader: SocketAddr, role: Role },
    /// The new `[check]` could not tell (the leader or this host is out of resources).
    #[error("check: the new settings could not tell the current leader {leader}'s role (it or this host is out of resources); try again, or {FORCE_HINT}")]
    Undecided { leader: SocketAddr },
}

const FORCE_HINT: &str =
    "to apply it anyway, POST /reload?force=true or set reload.force = true in the file";

impl ReloadError {
    /// The file or its settings were refused (as opposed to the proxy stopping).
    pub fn is_refusal(&self) -> bool {
        !matches!(self, ReloadError::NoSource | ReloadError::Stopped)
    }
}

type ListenerKey = (String, SocketAddr);

/// One configured address of a listener, bound.
pub(crate) type Bound = (ListenerConfig, SocketAddr, TcpListener);

type Reply = oneshot::Sender<Result<String, ReloadError>>;

/// A reload request: whether it is forced, and where the outcome goes.
pub(crate) type Request = (bool, Reply);

/// Asks the running proxy to reload its configuration file; cheap to clone.
#[derive(Clone)]
pub struct Reloader {
    requests: mpsc::Sender<Request>,
}

impl Reloader {
    pub(crate) fn channel() -> (Reloader, mpsc::Receiver<Request>) {
        let (requests, receiver) = mpsc::channel(8);
        (Reloader { requests }, receiver)
    }

    /// Reloads and waits for the outcome: what changed, or why nothing did.
    pub async fn reload(&self) -> Result<String, ReloadError> {
        self.reload_with(false).await
    }

    /// Reloads; `force` applies a `[check]` change even when the current leader does not
    /// answer `leader` to it.
    pub async fn reload_with(&self, force: bool) -> Result<String, ReloadError> {
        let (reply, outcome) = oneshot::channel();
        self.requests
            .send((force, reply))
            .await
            .map_err(|_| ReloadError::Stopped)?;
        outcome.await.map_err(|_| ReloadError::Stopped)?
    }
}

/// One bound address of one listener.
struct RunningListener {
    spec: ListenerConfig,
    local: Option<SocketAddr>,
    plan: watch::Sender<Arc<ListenerPlan>>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

/// Everything a running proxy is made of that a reload may change.
pub(crate) struct Running {
    pub config: Config,
    /// Where reloads read the configuration from.
    pub source: Option<PathBuf>,
    pub settings: Arc<SessionSettings>,
    /// By listener name and configured address, so a `:0` address stays the same socket
    /// across reloads.
    listeners: BTreeMap<ListenerKey, RunningListener>,
    backends: watch::Sender<BackendsConfig>,
    preconnect_stop: Option<CancellationToken>,
    /// What every generation of [`SessionSettings`] is built on, so `max_connections` counts
    /// them all.
    base: SessionBase,
    supervisor: Supervisor,
    /// The cluster's name and the listeners, for `/status`; published here, where the
    /// configuration is.
    serving: watch::Sender<ServingStatus>,
    stop_accepting: CancellationToken,
    background: CancellationToken,
    /// Whether the admin port serves `POST /reload`; read by the admin handlers.
    pub allow_changes: watch::Sender<bool>,
    /// The bound admin address, which counts as the proxy's own.
    admin: Option<SocketAddr>,
}

/// Parts that outlive every reload.
pub(crate) struct Fixed {
    pub view: ViewHandle,
    /// The proxy's own addresses, which this publishes.
    pub own: Arc<OwnAddrs>,
    pub supervisor: Supervisor,
    pub serving: watch::Sender<ServingStatus>,
    pub backends: watch::Sender<BackendsConfig>,
    pub allow_changes: watch::Sender<bool>,
    pub stop_accepting: CancellationToken,
    pub background: CancellationToken,
    pub hard_stop: CancellationToken,
    pub tracker: TaskTracker,
    /// The bound admin address, which counts as the proxy's own.
    pub admin: Option<SocketAddr>,
}

impl Running {
    pub fn start(
        config: Config,
        source: Option<PathBuf>,
        bound: Vec<Bound>,
        fixed: Fixed,
    ) -> Running {
        let base = SessionBase {
            view: fixed.view,
            own: fixed.own,
            limit: SessionLimit::new(config.proxy.max_connections),
            reserve: Reserve::open(),
            hard_stop: fixed.hard_stop,
            tracker: fixed.tracker,
        };
        let (settings, preconnect_stop) =
            new_settings(&config, &base, None, &fixed.background, &fixed.supervisor);
        let mut running = Running {
            config,
            source,
            settings,
            listeners: BTreeMap::new(),
            backends: fixed.backends,
            preconnect_stop,
            base,
            supervisor: fixed.supervisor,
            serving: fixed.serving,
            stop_accepting: fixed.stop_accepting,
            background: fixed.background,
            allow_changes: fixed.allow_changes,
            admin: fixed.admin,
        };
        for (spec, addr, listener) in bound {
            running.spawn_listener(spec, addr, listener);
        }
        running.publish_listeners();
        running.publish_own();
        running
    }

    /// Backends whose metric series are kept: every one the leader view still knows, and the
    /// fixed targets.
    pub fn metered_backends(&self) -> Vec<SocketAddr> {
        let mut backends: Vec<SocketAddr> = self
            .base
            .view
            .status
            .borrow()
            .backends
            .iter()
            .map(|b| b.address)
            .collect();
        for spec in &self.config.listeners {
            if let Serves::Target(addr) = spec.serves {
                backends.push(addr);
            }
        }
        backends
    }

    fn spawn_listener(&mut self, spec: ListenerConfig, addr: SocketAddr, listener: TcpListener) {
        let local = listener.local_addr().ok();
        tracing::info!(address = %local.unwrap_or(addr), listener = %spec.name, serves = %spec.serves, "listening");
        let first_plan = self.plan(&spec);
        m::listener_started(&first_plan.name);
        let (plan, plans) = watch::channel(first_plan);
        let stop = self.stop_accepting.child_token();
        let task = self.supervisor.spawn(
            "listener",
            stop.clone(),
            proxy::accept_loop(listener, plans, stop.clone()),
        );
        let key = (spec.name.clone(), addr);
        let running = RunningListener {
            spec,
            local,
            plan,
            stop,
            task,
        };
        if let Some(replaced) = self.listeners.insert(key, running) {
            replaced.stop.cancel();
        }
    }

    fn plan(&self, spec: &ListenerConfig) -> Arc<ListenerPlan> {
        Arc::new(ListenerPlan {
            name: spec.name.as_str().into(),
            serves: spec.serves,
            settings: Arc::clone(&self.settings),
        })
    }

    /// Runs one check of the current leader with the new settings: anything but `leader`
    /// refuses the reload, unless it is forced (then the refusal is only logged and returned
    /// as a note for the summary).
    async fn try_check(&self, new: &Config, force: bool) -> Result<Option<String>, ReloadError> {
        let Some(leader) = self.base.view.route.borrow().leader() else {
            return Ok(None);
        };
        let settings = CheckSettings::from_config(&new.check);
        let refusal = match check::check_role(settings.endpoint(leader), &settings).await {
            Some(Observation {
                role: Role::Leader, ..
            }) => return Ok(None),
            Some(Observation {
                role: Role::Down(error),
                ..
            }) => ReloadError::CheckFails { leader, error },
            Some(Observation { role, .. }) => ReloadError::NotLeader { leader, role },
            None => ReloadError::Undecided { leader },
        };
        if !force {
            return Err(refusal);
        }
        tracing::warn!(reason = %refusal, "reload forced");
        Ok(Some(format!("forced past: {refusal}")))
    }

    /// Tells sessions and discovery which addresses are the proxy's own.
    fn publish_own(&self) {
        let mut listening: Vec<Listening> = self
            .listeners
            .values()
            .filter_map(|l| l.local)
            .map(|addr| Listening {
                addr,
                dual_stack: false,
            })
            .collect();
        if let Some(addr) = self.admin {
            listening.push(Listening {
                addr,
                dual_stack: addr.is_ipv6(),
            });
        }
        self.base.own.set_listening(listening);
    }

    /// Tells `/status` and the stats page which listeners run, in configuration order, and the
    /// cluster's name.
    fn publish_listeners(&self) {
        m::set_max_connections(self.config.proxy.max_connections);
        let mut listeners: Vec<ListenerStatus> = Vec::new();
        for spec in self.config.all_listeners() {
            let addresses = self
                .listeners
                .iter()
                .filter(|((name, _), _)| *name == spec.name)
                .filter_map(|(_, l)| l.local)
                .collect();
            listeners.push(ListenerStatus {
                serves: spec.serves.to_string(),
                name: spec.name,
                addresses,
            });
        }
        self.serving.send_replace(ServingStatus {
            cluster: self.config.cluster_name(),
            listeners,
        });
    }

    /// Stops accepting on every listener and waits for the accept loops to end.
    pub async fn stop_listeners(&mut self) {
        self.stop_accepting.cancel();
        for (_, listener) in std::mem::take(&mut self.listeners) {
            let _ = listener.task.await;
        }
    }

    /// Reads the configuration file again and applies it; `force` as in [`Reloader::reload_with`].
    pub async fn reload(&mut self, force: bool) -> Result<String, ReloadError> {
        let path = self.source.clone().ok_or(ReloadError::NoSource)?;
        let config = Config::load(&path)?;
        self.apply(config, force).await
    }

    /// Applies a validated configuration; returns what changed, in words.
    pub async fn apply(&mut self, new: Config, force: bool) -> Result<String, ReloadError> {
        let forced = if new.check != self.config.check {
            self.try_check(&new, force || new.reload.force).await?
        } else {
            None
        };
        // Bind first: a taken port refuses the whole reload.
        let mut wanted: BTreeMap<ListenerKey, ListenerConfig> = BTreeMap::new();
        for spec in new.all_listeners() {
            for addr in &spec.addresses {
                wanted.insert((spec.name.clone(), *addr), spec.clone());
            }
        }
        // An address that moves to another listener keeps its socket under its new name.
        let moving: Vec<(ListenerKey, ListenerKey)> = self
            .listeners
            .keys()
            .filter(|key| !wanted.contains_key(*key))
            .filter_map(|old| {
                let new = wanted.keys().find(|key| {
                    key.1 == old.1 && key.1.port() != 0 && !self.listeners.contains_key(*key)
                })?;
                Some((old.clone(), new.clone()))
            })
            .collect();
        let mut fresh = Vec::new();
        for ((name, addr), spec) in &wanted {
            let running = self.listeners.contains_key(&(name.clone(), *addr));
            if running || moving.iter().any(|(_, to)| to.1 == *addr) {
                continue;
            }
            let listener = proxy::bind(*addr, true).map_err(|source| ReloadError::Bind {
                addr: *addr,
                source,
            })?;
            fresh.push((spec.clone(), *addr, listener));
        }

        let old = std::mem::replace(&mut self.config, new);
        let new = &self.config;
        let mut changes = Vec::new();

        if new.admin.address != old.admin.address {
            changes.push(format!(
                "admin.address needs a restart to change; still {}",
                old.admin
                    .address
                    .map_or_else(|| "off".to_string(), |a| a.to_string())
            ));
        }
        if new.proxy.threads != old.proxy.threads {
            changes.push(format!(
                "proxy.threads needs a restart to change; still {}",
                old.proxy.threads
            ));
        }
        if new.admin.metrics_expiry != old.admin.metrics_expiry {
            changes.push(format!(
                "admin.metrics_expiry needs a restart to change; still {}",
                humantime::format_duration(old.admin.metrics_expiry)
            ));
        }
        if new.admin.allow_changes != old.admin.allow_changes {
            self.allow_changes.send_replace(new.admin.allow_changes);
            changes.push(format!("admin.allow_changes = {}", new.admin.allow_changes));
        }
        if new.check != old.check {
            // Awaited, not tried: a queue full of connect failures must not lose it.
            let settings = ViewSettings::from_config(&new.check);
            if self
                .base
                .view
                .events
                .send(Event::Reconfigure(settings))
                .await
                .is_err()
            {
                return Err(ReloadError::Stopped);
            }
            changes.push(match forced {
                Some(note) => format!("check settings ({note})"),
                None => "check settings".to_string(),
            });
        }
        if new.backends != old.backends {
            self.backends.send_replace(new.backends.clone());
            changes.push("backends".to_string());
        }
        if new.proxy != old.proxy || new.cluster_name() != old.cluster_name() {
            self.base.limit.set_max(new.proxy.max_connections);
            let keep_pool = (new.proxy.preconnect, new.proxy.connect_timeout)
                == (old.proxy.preconnect, old.proxy.connect_timeout);
            let pool = if keep_pool {
                self.settings.preconnect.clone()
            } else {
                if let Some(stop) = self.preconnect_stop.take() {
                    stop.cancel();
                }
                None
            };
            let (settings, pool_stop) =
                new_settings(new, &self.base, pool, &self.background, &self.supervisor);
            self.settings = settings;
            if pool_stop.is_some() {
                self.preconnect_stop = pool_stop;
            }
            changes.push("proxy settings (for new sessions)".to_string());
        }

        for (from, to) in moving {
            if let Some(listener) = self.listeners.remove(&from) {
                changes.push(format!("{} moved from {} to {}", from.1, from.0, to.0));
                self.listeners.insert(to, listener);
            }
        }
        // Listeners: removed ones close, kept ones get the new plan, new ones open.
        let keys: Vec<ListenerKey> = self.listeners.keys().cloned().collect();
        for key in keys {
            match wanted.get(&key) {
                None => {
                    if let Some(gone) = self.listeners.remove(&key) {
                        tracing::info!(address = %key.1, listener = %key.0, "listener closed by reload");
                        changes.push(format!("closed {} on {}", key.0, key.1));
                        gone.stop.cancel();
                    }
                }
                Some(spec) => {
                    let plan = self.plan(spec);
                    if let Some(kept) = self.listeners.get_mut(&key) {
                        if kept.spec.serves != spec.serves {
                            changes.push(format!(
                                "{} on {} now serves {:?}",
                                key.0, key.1, spec.serves
                            ));
                        }
                        kept.spec = spec.clone();
                        kept.plan.send_replace(plan);
                    }
                }
            }
        }
        for (spec, addr, listener) in fresh {
            let at = listener
                .local_addr()
                .map_or_else(|_| "?".to_string(), |a| a.to_string());
            changes.push(format!("opened {} on {at}", spec.name));
            self.spawn_listener(spec, addr, listener);
        }

        self.publish_listeners();
        self.publish_own();
        let summary = if changes.is_empty() {
            "configuration reloaded; nothing changed".to_string()
        } else {
            format!("configuration reloaded: {}", changes.join("; "))
        };
        tracing::info!("{summary}");
        Ok(summary)
    }
}

/// A new generation of session settings; a new preconnect pool when none is carried over.
fn new_settings(
    config: &Config,
    base: &SessionBase,
    pool: Option<Arc<Preconnect>>,
    background: &CancellationToken,
    supervisor: &Supervisor,
) -> (Arc<SessionSettings>, Option<CancellationToken>) {
    let proxy: &ProxyConfig = &config.proxy;
    let mut stop = None;
    let pool = pool.or_else(|| {
        (proxy.preconnect > 0).then(|| {
            let pool = Preconnect::new(proxy.preconnect);
            let token = background.child_token();
            supervisor.spawn(
                "preconnect",
                token.clone(),
                Arc::clone(&pool).run(
                    base.view.route.clone(),
                    proxy.connect_timeout,
                    Arc::clone(&base.own),
                    Arc::clone(&base.reserve),
                    token.clone(),
                ),
            );
            stop = Some(token);
            pool
        })
    });
    let settings = SessionSettings::new(base.clone(), proxy.clone(), config.cluster_name(), pool);
    (settings, stop)
}
