//! The `roleproxy` command: CLI, logging and signals around the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use roleproxy::own_addresses::refuse_loops_here;
use roleproxy::Config;
use tokio::signal::unix::{signal, SignalKind};

/// `roleproxy --version`: the release and the commit, so a bug report names the exact build.
const VERSION_LINE: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("ROLEPROXY_COMMIT"),
    ")"
);

#[derive(Parser)]
#[command(
    version = VERSION_LINE,
    about = "A role-aware TCP proxy for Postgres high-availability clusters"
)]
struct Cli {
    /// The configuration file.
    #[arg(long, short, global = true, default_value = "proxy.toml")]
    config: PathBuf,
    /// Log lines on stderr: `text` for people, or `json` (one object per line) for log
    /// shippers. `RUST_LOG` sets the level.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (the default).
    Run,
    /// Validate the configuration and print the effective values; warn on stderr when it
    /// cannot route.
    Check {
        /// Also resolve every name the configuration holds, with its resolver, and warn about
        /// each one that does not resolve.
        #[arg(long)]
        resolve: bool,
    },
    /// Show a running proxy's route and backends (from its admin port's `/status`).
    Status {
        /// Admin address, HOST:PORT (a name is resolved with the system resolver); defaults to
        /// `admin.address` of the config file, on loopback.
        #[arg(long)]
        admin: Option<String>,
    },
    /// Pause the proxies: leader sessions end at their next transaction boundary, new clients
    /// are held until `resume` (or `proxy.pause_limit`). Around a Patroni or repmgr
    /// switchover, like PgBouncer's PAUSE; sessions end here, they are not kept.
    Pause {
        #[command(flatten)]
        admins: Admins,
    },
    /// Resume paused proxies: held clients go on to whichever node leads now.
    Resume {
        #[command(flatten)]
        admins: Admins,
    },
    /// Set a backend's state for replica listeners, like HAProxy's `set server ... state`:
    /// `drain` (no new sessions; open ones end at their next transaction boundary),
    /// `maintenance` (no new sessions; open ones stay) or `ready`.
    Backend {
        /// The backend's address, as `roleproxy status` shows it.
        address: SocketAddr,
        #[arg(value_parser = ["drain", "maintenance", "ready"])]
        state: String,
        #[command(flatten)]
        admins: Admins,
    },
    /// Serve a Fly-style role endpoint (`GET /flycheck/role`) for a Postgres node.
    Agent {
        /// libpq-style connection string of the local node, e.g.
        /// "host=127.0.0.1 port=5433 user=postgres dbname=postgres".
        #[arg(long)]
        postgres: String,
        /// Address to serve on [default: port 5500 on PG_LISTEN_ADDRESS, where Postgres
        /// listens for the other nodes; 127.0.0.1:5500 when that is unset].
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// While this file exists, answer `replica` without asking Postgres (fence the node
        /// before a planned switchover).
        #[arg(long)]
        fence_file: Option<PathBuf>,
        /// A `~/.pgpass`-format file for the password [default: PGPASSFILE, then ~/.pgpass].
        /// PGPASSWORD, when set, comes first.
        #[arg(long)]
        passfile: Option<PathBuf>,
        /// How long one answer from Postgres is reused for every request [default: 50ms, half
        /// the proxy's check.fast_interval].
        #[arg(long, value_parser = humantime::parse_duration)]
        reuse_for: Option<std::time::Duration>,
    },
}

/// The admin ports a change goes to: every node runs its own proxy.
#[derive(clap::Args)]
struct Admins {
    /// Admin address; repeat it or give a comma-separated list to act on several proxies
    /// [default: `admin.address` of the config file, on loopback].
    /// Each is HOST:PORT; a name is resolved with the system resolver.
    #[arg(long, value_delimiter = ',')]
    admin: Vec<String>,
    /// A file with the token of `admin.token_file` [default: the ROLEPROXY_ADMIN_TOKEN
    /// environment variable, when set].
    #[arg(long)]
    token_file: Option<PathBuf>,
}

/// Where `roleproxy pause` and friends read the bearer token from when no `--token-file` is
/// given.
const TOKEN_VAR: &str = "ROLEPROXY_ADMIN_TOKEN";

fn main() -> ExitCode {
    ignore_sighup_until_handled();
    let cli = Cli::parse();
    raise_fd_limit();
    init_logging(cli.log_format);
    let command = cli.command.unwrap_or(Command::Run);
    // The proxy's thread count comes from its configuration; other commands use the default.
    let config = match command {
        Command::Run => match Config::load_with(&cli.config, refuse_loops_here) {
            Ok(config) => Some(config),
            Err(e) => return config_error(&cli.config, &e),
        },
        _ => None,
    };
    let threads = config.as_ref().map_or(0, |c| c.proxy.threads);
    let runtime = match runtime(threads) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("roleproxy: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match command {
        Command::Check { resolve } => runtime.block_on(check(&cli.config, resolve)),
        Command::Status { admin } => runtime.block_on(status(&cli.config, admin)),
        Command::Pause { admins } => {
            runtime.block_on(change(&cli.config, admins, "pause", "/pause".into()))
        }
        Command::Resume { admins } => {
            runtime.block_on(change(&cli.config, admins, "resume", "/resume".into()))
        }
        Command::Backend {
            address,
            state,
            admins,
        } => runtime.block_on(change(
            &cli.config,
            admins,
            "backend",
            // An IPv6 address's brackets are not allowed in a request path as they are.
            format!(
                "/backends/{}/{state}",
                address.to_string().replace('[', "%5B").replace(']', "%5D")
            ),
        )),
        Command::Run => match config {
            Some(config) => runtime.block_on(run(config, cli.config.clone())),
            None => ExitCode::FAILURE,
        },
        Command::Agent {
            postgres,
            listen,
            fence_file,
            passfile,
            reuse_for,
        } => {
            let options = roleproxy_agent::AgentOptions {
                fence_file,
                reuse_for: reuse_for.unwrap_or(roleproxy_agent::DEFAULT_REUSE_FOR),
                password: std::env::var("PGPASSWORD")
                    .ok()
                    .map(roleproxy_agent::Secret),
                passfile: passfile
                    .or_else(|| std::env::var_os("PGPASSFILE").map(PathBuf::from))
                    .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".pgpass"))),
            };
            runtime.block_on(agent(postgres, listen, options))
        }
    }
}

/// Logs go to stderr. Text has colours only on a terminal, and never when `NO_COLOR` is set
/// (no-color.org), so a log file or a journal gets plain lines.
fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    match format {
        LogFormat::Text => logs.with_ansi(roleproxy::wording::stderr_colours()).init(),
        LogFormat::Json => logs.json().init(),
    }
}

/// `proxy.threads`: 0 is one worker per CPU; 1 runs everything on this thread, with no
/// wake-ups between threads at all.
fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    match threads {
        0 => tokio::runtime::Runtime::new(),
        1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build(),
    }
}

fn config_error(path: &std::path::Path, e: &roleproxy::config::ConfigError) -> ExitCode {
    use roleproxy::config::ConfigError;
    match e {
        ConfigError::Invalid(errors) if errors.len() > 1 => {
            eprintln!(
                "roleproxy: invalid configuration {} ({} errors):",
                path.display(),
                errors.len()
            );
            for error in errors {
                eprintln!("  {error}");
            }
        }
        e => eprintln!("roleproxy: invalid configuration {}: {e}", path.display()),
    }
    ExitCode::from(2)
}

async fn check(path: &std::path::Path, resolve: bool) -> ExitCode {
    let config = match Config::load_with(path, refuse_loops_here) {
        Ok(c) => c,
        Err(e) => return config_error(path, &e),
    };
    if let Some(why) = config.cannot_route() {
        eprintln!("roleproxy: warning: {}: {why}", path.display());
    }
    if resolve {
        for (key, name, error) in roleproxy::discovery::unresolved(&config).await {
            eprintln!(
                "roleproxy: warning: {}: {key}: {name} does not resolve: {error}",
                path.display()
            );
        }
    }
    match toml::to_string(&config) {
        Ok(text) => {
            println!(
                "# {} is valid; effective configuration:\n{text}",
                path.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("roleproxy: cannot print the configuration: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config, path: PathBuf) -> ExitCode {
    if let Some(why) = config.cannot_route() {
        tracing::warn!(config = %path.display(), "{why}");
    }
    let shutdown = shutdown_signal();
    let proxy = match roleproxy::Proxy::bind(config).await {
        Ok(p) => p.reload_from(path),
        Err(e) => {
            eprintln!("roleproxy: {e}");
            return ExitCode::FAILURE;
        }
    };
    reload_on_sighup(proxy.reloader());
    match proxy.run(shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("roleproxy: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The admin address of the config file, reached on loopback when it is a wildcard.
fn configured_admin(config: &std::path::Path) -> SocketAddr {
    let configured = Config::load(config).ok().and_then(|c| c.admin.address);
    let addr = configured.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8404)));
    match addr.ip() {
        ip if ip.is_unspecified() && ip.is_ipv6() => {
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, addr.port()))
        }
        ip if ip.is_unspecified() => SocketAddr::from(([127, 0, 0, 1], addr.port())),
        _ => addr,
    }
}

/// Sends one change to every admin port given, prints each one's answer, and fails if any
/// failed.
async fn change(config: &std::path::Path, admins: Admins, name: &str, path: String) -> ExitCode {
    let token = match &admins.token_file {
        Some(file) => match std::fs::read_to_string(file) {
            Ok(text) => Some(text.trim().to_string()),
            Err(e) => {
                eprintln!(
                    "roleproxy {name}: cannot read --token-file {}: {e}",
                    file.display()
                );
                return ExitCode::FAILURE;
            }
        },
        None => std::env::var(TOKEN_VAR).ok().map(|t| t.trim().to_string()),
    };
    let admins = if admins.admin.is_empty() {
        vec![configured_admin(config).to_string()]
    } else {
        admins.admin
    };
    let answers = roleproxy::status_cli::post_change_to_all(&admins, &path, token.as_deref()).await;
    let mut failed = Vec::new();
    for (addr, answer) in answers {
        match answer {
            Ok(text) => println!("{addr}: {text}"),
            Err(e) => {
                eprintln!("roleproxy {name}: {addr}: {e}");
                failed.push(addr.to_string());
            }
        }
    }
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        eprintln!("roleproxy {name}: failed on {}", failed.join(", "));
        ExitCode::FAILURE
    }
}

async fn status(config: &std::path::Path, admin: Option<String>) -> ExitCode {
    let admin = match admin {
        Some(written) => match roleproxy::status_cli::admin_addresses(&written).await {
            Ok(addrs) => addrs,
            Err(e) => {
                eprintln!("roleproxy status: {e}");
                return ExitCode::FAILURE;
            }
        },
        None => vec![configured_admin(config)],
    };
    match roleproxy::status_cli::fetch_status_from(&admin).await {
        Ok(status) => {
            print!(
                "{}",
                roleproxy::status_cli::render_status(
                    &status,
                    roleproxy::status::unix_ms(std::time::SystemTime::now())
                )
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("roleproxy status: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn agent(
    postgres: String,
    listen: Option<SocketAddr>,
    options: roleproxy_agent::AgentOptions,
) -> ExitCode {
    let listen = listen.unwrap_or_else(|| {
        let pg_listen = std::env::var("PG_LISTEN_ADDRESS").ok();
        let addr = roleproxy_agent::default_listen(pg_listen.as_deref());
        if addr.ip().is_loopback() {
            tracing::warn!(%addr, "PG_LISTEN_ADDRESS is unset: serving on loopback, where other nodes' proxies cannot check this node (set --listen)");
        }
        addr
    });
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(e) => {
            let hint = roleproxy::sessions::bind_hint(listen, &e);
            eprintln!("roleproxy agent: cannot listen on {listen}: {e}{hint}");
            return ExitCode::FAILURE;
        }
    };
    let shutdown = shutdown_signal();
    ignore_sighup();
    match roleproxy_agent::serve_with(listener, postgres, options, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("roleproxy agent: {e}");
            ExitCode::FAILURE
        }
    }
}

/// SIGHUP's default action ends the process, and a reload sent to every process of a node can
/// come at any moment, also while this one starts. It is ignored from the first instruction of
/// `main`, before there is a runtime to handle it; the handler installed later takes over from
/// this disposition. A SIGHUP that comes before the handler asks to reload a configuration
/// that is being read for the first time anyway.
fn ignore_sighup_until_handled() {
    // SAFETY: SIG_IGN is a valid disposition for SIGHUP, set while this is the only thread.
    unsafe { libc::signal(libc::SIGHUP, libc::SIG_IGN) };
}

/// The agent has nothing to reload, and a SIGHUP (a reload sent to every process of a node)
/// must not kill it, as the default action would.
fn ignore_sighup() {
    match signal(SignalKind::hangup()) {
        Ok(mut hangups) => {
            tokio::spawn(async move {
                while hangups.recv().await.is_some() {
                    tracing::info!("SIGHUP: the agent has nothing to reload");
                }
            });
        }
        Err(e) => tracing::error!(error = %e, "cannot install the SIGHUP handler"),
    }
}

/// Each session holds two sockets: raise the soft descriptor limit as far as allowed, as
/// HAProxy does, so `max_connections` is not cut short by a default of 1024.
fn raise_fd_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    const WANTED: u64 = 1 << 20;
    let limit = getrlimit(Resource::Nofile);
    // `None` is no limit at all, which is never raised.
    let raise = |value: Option<u64>| value.map(|v| v.max(WANTED));
    let raised = Rlimit {
        current: raise(limit.current),
        maximum: raise(limit.maximum),
    };
    // Raising the hard limit needs privileges; the soft one may always go up to the hard one.
    if setrlimit(Resource::Nofile, raised).is_err() {
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: limit.maximum,
                maximum: limit.maximum,
            },
        );
    }
}

/// SIGHUP re-reads the configuration file, as HAProxy and PgBouncer users expect. The outcome
/// is logged by the proxy; signals that come while a reload is evaluated are answered together
/// by the next one.
fn reload_on_sighup(reloader: roleproxy::Reloader) {
    let mut hangups = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot install the SIGHUP handler; reload with POST /reload");
            return;
        }
    };
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading the configuration");
            if reloader.ask(false).await.is_err() {
                return;
            }
        }
    });
}

/// Resolves on the first SIGTERM or SIGINT. The handlers are installed when this is called, not
/// when the future is first polled, so a signal right after start-up is not lost.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    let handlers = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    );
    async move {
        let (Ok(mut term), Ok(mut int)) = handlers else {
            tracing::error!("cannot install signal handlers; stop with SIGKILL");
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
        // A second signal during the grace period means "now".
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            tracing::warn!("second signal: exiting without waiting for sessions");
            std::process::exit(0);
        });
    }
}
