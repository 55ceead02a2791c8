//! The running proxy: its listeners, the session settings of each configuration it ran, and how
//! a new configuration is applied to them without a restart.
//!
//! A reload is all or nothing: the file is validated and every new listener is bound before
//! anything changes, so a bad file or a taken port leaves the old configuration running. What
//! survives a reload is what sessions depend on: the leader view keeps every backend's confirmed
//! role, discovery keeps its last good answers, so a leader that is still the leader keeps its
//! route generation and its sessions.
//!
//! Before that, whatever sections it changes, the new configuration is evaluated against the
//! live cluster ([`crate::preflight`]): its DNS names resolved with its `[backends]`, every node
//! it would find checked with its `[check]`, and the leader it would route to probed on its data
//! address unless the live route already goes there. A reload that would leave routing worse
//! than now is refused: the live leader no longer routed, the route moved to another leader, or
//! a leader whose data address does not answer. An operator who means it forces the reload
//! (`POST /reload?force=true`, or `reload.force = true` in the file for SIGHUP); the summary
//! then says what it was forced past.
//!
//! The evaluation runs in a task of its own ([`Reloads`]), so shutdown and a dead core task
//! never wait for it; its result is applied on the main loop, which only binds and sends on
//! channels. Requests that come during an evaluation wait for the next one, which reads the
//! file as it is then and answers them all.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::{AbortOnDropHandle, TaskTracker};

use crate::config::{
    BackendsConfig, Config, ConfigError, Endpoint, ListenerConfig, ProxyConfig, Serves,
};
use crate::discovery::HostResolver;
use crate::metrics as m;
use crate::operator::{AdminSettings, Operator};
use crate::own_addresses::{self, Listening, OwnAddrs};
use crate::preconnect::Preconnect;
use crate::preflight::{self, Live, Worse};
use crate::reserve::Reserve;
use crate::sessions::{self, ListenerPlan, SessionBase, SessionLimit, SessionSettings};
use crate::status::{BackendStatus, ListenerStatus, ServingStatus};
use crate::supervise::Supervisor;
use crate::view::{Event, ViewHandle, ViewSettings};

/// Why a reload was refused. The old configuration stays in force.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ReloadError {
    #[error("no configuration file to reload from (started without --config)")]
    NoSource,
    #[error(transparent)]
    Config(Arc<ConfigError>),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: Arc<std::io::Error>,
    },
    /// Applied, the configuration would leave routing worse than it is now.
    #[error(transparent)]
    Worse(#[from] Worse),
    #[error("the proxy is shutting down")]
    Stopped,
    /// The evaluation itself failed (a bug); nothing was applied.
    #[error("the reload's evaluation failed: {0}")]
    Failed(String),
}

impl From<ConfigError> for ReloadError {
    fn from(e: ConfigError) -> Self {
        ReloadError::Config(Arc::new(e))
    }
}

impl ReloadError {
    /// The file or its settings were refused (as opposed to the proxy stopping).
    pub fn is_refusal(&self) -> bool {
        !matches!(
            self,
            ReloadError::NoSource | ReloadError::Stopped | ReloadError::Failed(_)
        )
    }
}

type ListenerKey = (String, SocketAddr);

/// One configured address of a listener, bound.
pub(crate) type Bound = (ListenerConfig, SocketAddr, TcpListener);

type Outcome = Result<String, ReloadError>;

type Reply = oneshot::Sender<Outcome>;

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

    /// Reloads; `force` applies the new configuration even when it would leave routing worse
    /// than now.
    pub async fn reload_with(&self, force: bool) -> Result<String, ReloadError> {
        self.ask(force).await?.await
    }

    /// Asks for a reload and returns once the proxy has the request, before it is evaluated;
    /// the future returned gives the outcome. Dropping it leaves the outcome to the log.
    pub async fn ask(
        &self,
        force: bool,
    ) -> Result<impl Future<Output = Outcome> + Send + 'static, ReloadError> {
        let (reply, outcome) = oneshot::channel();
        self.requests
            .send((force, reply))
            .await
            .map_err(|_| ReloadError::Stopped)?;
        Ok(async move { outcome.await.map_err(|_| ReloadError::Stopped)? })
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
    /// What the admin port's changing requests read (`admin.allow_changes`, the token, the
    /// pause limit).
    pub admin_settings: watch::Sender<AdminSettings>,
    /// The bound admin address, which counts as the proxy's own.
    admin: Option<SocketAddr>,
}

/// Parts that outlive every reload.
pub(crate) struct ProcessParts {
    pub view: ViewHandle,
    /// The proxy's own addresses, which this publishes.
    pub own: Arc<OwnAddrs>,
    pub supervisor: Supervisor,
    pub serving: watch::Sender<ServingStatus>,
    pub backends: watch::Sender<BackendsConfig>,
    pub admin_settings: watch::Sender<AdminSettings>,
    /// The pause and the backends' modes, kept across reloads.
    pub operator: Arc<Operator>,
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
        fixed: ProcessParts,
    ) -> Running {
        let base = SessionBase {
            view: fixed.view,
            own: fixed.own,
            limit: SessionLimit::new(config.proxy.max_connections),
            reserve: Reserve::open(),
            cancel_keys: crate::cancel::CancelKeys::new(),
            hard_stop: fixed.hard_stop,
            tracker: fixed.tracker,
            operator: fixed.operator,
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
            admin_settings: fixed.admin_settings,
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
        let mut backends: Vec<SocketAddr> =
            self.with_backends(|known| known.iter().map(|b| b.address).collect());
        for spec in &self.config.listeners {
            if let Serves::Target(Endpoint::Addr(addr)) = spec.serves {
                backends.push(addr);
            }
        }
        backends
    }

    /// Reads the backends the leader view knows, as it last published them.
    fn with_backends<T>(&self, read: impl FnOnce(&[BackendStatus]) -> T) -> T {
        read(&self.base.view.status.borrow().backends)
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
            sessions::accept_loop(listener, plans, stop.clone()),
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
            serves: spec.serves.clone(),
            resolver: self.target_resolver(&spec.serves),
            settings: Arc::clone(&self.settings),
        })
    }

    /// The resolver of a fixed target given by name, built with each plan so a reload that
    /// changes `backends.nameservers` or `backends.prefer` is followed.
    fn target_resolver(&self, serves: &Serves) -> Option<Arc<HostResolver>> {
        let Serves::Target(Endpoint::Name { host, .. }) = serves else {
            return None;
        };
        match HostResolver::new(&self.config.backends) {
            Ok(resolver) => Some(Arc::new(resolver)),
            Err(e) => {
                tracing::error!(target = %host, error = %e, "cannot resolve the fixed target: its clients are refused");
                None
            }
        }
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

    /// What an evaluation of a new configuration compares with.
    fn live(&self) -> Live {
        let known = self.with_backends(|known| {
            known
                .iter()
                .filter(|b| b.present)
                .map(|b| (b.address, b.sources.clone()))
                .collect()
        });
        Live {
            route: self.base.view.route.clone(),
            check: self.config.check.clone(),
            dns_names: self.config.backends.dns_names.clone(),
            known,
            own: Arc::clone(&self.base.own),
        }
    }

    /// Applies an evaluated configuration; returns what changed, in words.
    pub async fn apply(&mut self, ready: Ready) -> Result<String, ReloadError> {
        let Ready {
            config: new,
            forced,
        } = ready;
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
            let listener = sessions::bind(*addr, true).map_err(|source| ReloadError::Bind {
                addr: *addr,
                source: Arc::new(source),
            })?;
            fresh.push((spec.clone(), *addr, listener));
        }

        let old = std::mem::replace(&mut self.config, new);
        let new = &self.config;
        let mut changes = Vec::new();
        if let Some(worse) = forced {
            changes.push(format!("forced past: {worse}"));
        }

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
            changes.push(format!("admin.allow_changes = {}", new.admin.allow_changes));
        }
        if new.admin.token != old.admin.token || new.admin.token_file != old.admin.token_file {
            // The token itself is never written anywhere.
            changes.push(format!("admin.token_file = {:?}", new.admin.token_file));
        }
        self.admin_settings.send_if_modified(|settings| {
            let fresh = AdminSettings::from_config(new);
            let changed = *settings != fresh;
            *settings = fresh;
            changed
        });
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
            changes.push("check settings".to_string());
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

/// A configuration evaluated and ready to apply, with the refusal it was forced past, if any.
pub(crate) struct Ready {
    config: Config,
    forced: Option<Worse>,
}

/// What the main loop hears from [`Reloads::next`].
pub(crate) enum Step {
    Asked(Request),
    Evaluated(Result<Box<Ready>, ReloadError>),
}

/// An evaluation under way, and the requests its outcome answers.
struct Evaluation {
    task: AbortOnDropHandle<Result<Box<Ready>, ReloadError>>,
    replies: Vec<Reply>,
}

/// Reload requests, evaluated one at a time in a task of their own, so the main loop never
/// waits for an evaluation; dropped, it aborts the one under way and its requesters hear that
/// the proxy is stopping.
pub(crate) struct Reloads {
    requests: mpsc::Receiver<Request>,
    evaluating: Option<Evaluation>,
    /// Requests that came during it. The next evaluation answers them all: it reads the file
    /// as it is then, and the last request's `force` counts.
    waiting: Vec<Reply>,
    force: bool,
}

impl Reloads {
    pub fn new(requests: mpsc::Receiver<Request>) -> Reloads {
        Reloads {
            requests,
            evaluating: None,
            waiting: Vec::new(),
            force: false,
        }
    }

    /// Waits for a request or for the evaluation under way to end.
    pub async fn next(&mut self) -> Step {
        let Reloads {
            requests,
            evaluating,
            ..
        } = self;
        let evaluated = async {
            match evaluating {
                Some(evaluation) => (&mut evaluation.task).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            Some(request) = requests.recv() => Step::Asked(request),
            joined = evaluated => Step::Evaluated(
                joined.unwrap_or_else(|e| Err(ReloadError::Failed(e.to_string())))
            ),
        }
    }

    /// Queues a request, or applies an evaluated configuration and answers its requests; then
    /// starts the next evaluation if requests wait for one.
    pub async fn handle(&mut self, step: Step, running: &mut Running) {
        match step {
            Step::Asked(request) => self.wait(request),
            Step::Evaluated(evaluated) => {
                let replies = self
                    .evaluating
                    .take()
                    .map(|e| e.replies)
                    .unwrap_or_default();
                // Requests already sent came during this evaluation: the next one covers them.
                while let Ok(request) = self.requests.try_recv() {
                    self.wait(request);
                }
                let outcome = match evaluated {
                    Ok(ready) => running.apply(*ready).await,
                    Err(e) => Err(e),
                };
                answer(replies, outcome);
            }
        }
        if self.evaluating.is_none() && !self.waiting.is_empty() {
            self.start(running);
        }
    }

    fn wait(&mut self, (force, reply): Request) {
        self.waiting.push(reply);
        self.force = force;
    }

    /// Reads the file and evaluates it in a task of its own.
    fn start(&mut self, running: &Running) {
        let replies = std::mem::take(&mut self.waiting);
        let force = std::mem::take(&mut self.force);
        let loaded = running.source.as_deref().ok_or(ReloadError::NoSource);
        let applied =
            loaded.and_then(|path| Ok(Config::load_with(path, own_addresses::refuse_loops_here)?));
        let config = match applied {
            Ok(config) => config,
            Err(e) => return answer(replies, Err(e)),
        };
        tracing::info!("reload: evaluating the new configuration against the live cluster");
        let live = running.live();
        let task = tokio::spawn(async move {
            let force = force || config.reload.force;
            match preflight::evaluate(&config, &live).await {
                Ok(()) => Ok(Box::new(Ready {
                    config,
                    forced: None,
                })),
                Err(worse) if force => {
                    tracing::warn!(reason = %worse, "reload forced");
                    Ok(Box::new(Ready {
                        config,
                        forced: Some(worse),
                    }))
                }
                Err(worse) => Err(worse.into()),
            }
        });
        self.evaluating = Some(Evaluation {
            task: AbortOnDropHandle::new(task),
            replies,
        });
    }
}

/// Logs a reload's outcome and gives it to everyone who asked for it.
fn answer(replies: Vec<Reply>, outcome: Outcome) {
    if let Err(e) = &outcome {
        // Every error of the file, on the one line of this event.
        let error = e.to_string().replace('\n', "; ");
        tracing::error!(%error, "reload refused; the running configuration stays");
    }
    for reply in replies {
        let _ = reply.send(outcome.clone());
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
