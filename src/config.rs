//! `proxy.toml`: file → TOML tree → `${VAR}` expansion over the tree → serde builds the runtime
//! [`Config`] → the checks that span several keys.
//!
//! Each key is declared once, on its field: the function that reads it (and refuses what it
//! cannot be) is its `deserialize_with`, and its default is in its section's `Default`. Every
//! error names the key it is about, so a bad deploy fails at start-up with a message an operator
//! can act on instead of a proxy that routes wrongly.

use std::borrow::Cow;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::RootCertStore;
use serde::de::value::{MapDeserializer, SeqDeserializer};
use serde::de::{Error as _, Expected, IntoDeserializer, Unexpected, Visitor};
use serde::ser::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use toml::de::{DeTable, DeValue};
use toml::Spanned;

use roleproxy_core::route::SplitBrain;

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Parse(String),
    /// Every key that is wrong, in the order of the file: fixing a file takes one run, not
    /// one per mistake.
    #[error("{}", KeyError::lines(.0))]
    Invalid(Vec<KeyError>),
}

impl From<KeyError> for ConfigError {
    fn from(e: KeyError) -> Self {
        ConfigError::Invalid(vec![e])
    }
}

/// One key's error: the key, why, and where the file writes it (none for a key left out).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {reason}{}", self.at.map(|a| a.to_string()).unwrap_or_default())]
pub struct KeyError {
    pub key: String,
    pub reason: String,
    pub at: Option<Position>,
}

impl KeyError {
    /// One error a line.
    fn lines(errors: &[KeyError]) -> String {
        errors
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Where in the file: ` (line 2, column 12)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    pub line: usize,
    pub column: usize,
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, " (line {}, column {})", self.line, self.column)
    }
}

fn invalid(key: &str, reason: impl Into<String>) -> KeyError {
    KeyError {
        key: key.to_string(),
        reason: reason.into(),
        at: None,
    }
}

/// The validated configuration the proxy runs with.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Config {
    pub listen: ListenConfig,
    /// Listeners besides `[listen]`, which always serves the leader.
    pub listeners: Vec<ListenerConfig>,
    pub backends: BackendsConfig,
    #[serde(serialize_with = "CheckConfig::serialize_own_keys")]
    pub check: CheckConfig,
    pub proxy: ProxyConfig,
    pub admin: AdminConfig,
    pub reload: ReloadConfig,
}

/// The file as read: the runtime sections, with `[[listeners]]` as written until the rules
/// that span their keys make them [`ListenerConfig`]s.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct File {
    listen: ListenConfig,
    listeners: Vec<WrittenListener>,
    backends: BackendsConfig,
    check: CheckConfig,
    proxy: ProxyConfig,
    admin: AdminConfig,
    reload: ReloadConfig,
}

/// How a reload of this file is applied.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReloadConfig {
    /// Apply a reload even when it would leave routing worse than now (the way to force a
    /// reload sent with SIGHUP; `POST /reload?force=true` is the other).
    pub force: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenConfig {
    #[serde(deserialize_with = "listen_addrs")]
    pub addresses: Vec<SocketAddr>,
}

impl Default for ListenConfig {
    fn default() -> Self {
        Self {
            addresses: vec![
                (Ipv4Addr::UNSPECIFIED, 5432).into(),
                (Ipv6Addr::UNSPECIFIED, 5432).into(),
            ],
        }
    }
}

/// A `[[listeners]]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(into = "WrittenListener")]
pub struct ListenerConfig {
    pub name: String,
    pub addresses: Vec<SocketAddr>,
    pub serves: Serves,
}

/// A `[[listeners]]` entry as written, read and printed (TOML leaves out a key that is `None`):
/// `serves`, `fallback` and `target` together say what it [`Serves`].
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WrittenListener {
    #[serde(default)]
    name: Option<String>,
    #[serde(deserialize_with = "listen_addrs")]
    addresses: Vec<SocketAddr>,
    #[serde(default, deserialize_with = "some_word")]
    serves: Option<ServesWritten>,
    #[serde(default, deserialize_with = "some_word")]
    fallback: Option<Fallback>,
    #[serde(default, deserialize_with = "some_endpoint")]
    target: Option<Endpoint>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum ServesWritten {
    Leader,
    Replica,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Fallback {
    None,
    Leader,
}

/// Printed with the keys it is written with, so the output of `roleproxy check` can be pasted
/// back into a file.
impl From<ListenerConfig> for WrittenListener {
    fn from(l: ListenerConfig) -> Self {
        let (serves, fallback, target) = match l.serves {
            Serves::Leader => (Some(ServesWritten::Leader), None, None),
            Serves::Replica { fallback_to_leader } => (
                Some(ServesWritten::Replica),
                Some(if fallback_to_leader {
                    Fallback::Leader
                } else {
                    Fallback::None
                }),
                None,
            ),
            Serves::Target(addr) => (None, None, Some(addr)),
        };
        WrittenListener {
            name: Some(l.name),
            addresses: l.addresses,
            serves,
            fallback,
            target,
        }
    }
}

/// What a listener's clients are sent to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Serves {
    /// The one leader; sessions close when it moves.
    Leader,
    /// The replica with the fewest sessions; with `fallback_to_leader`, the leader while no
    /// replica is up.
    Replica { fallback_to_leader: bool },
    /// One fixed address, no checks (postgres-ha's `*:5433` to the local Postgres).
    Target(Endpoint),
}

/// How people read it: `leader`, `replica`, `replica, else leader`, `target ADDR`.
impl std::fmt::Display for Serves {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Serves::Leader => f.write_str("leader"),
            Serves::Replica {
                fallback_to_leader: false,
            } => f.write_str("replica"),
            Serves::Replica {
                fallback_to_leader: true,
            } => f.write_str("replica, else leader"),
            Serves::Target(addr) => write!(f, "target {addr}"),
        }
    }
}

/// How a node's role is asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CheckKind {
    /// `GET check.path`; the body's word is the role (Fly's `/flycheck/role`).
    HttpBody,
    /// Patroni's REST API: `GET check.leader_path` / `check.replica_path`, 200 yes, 503 no.
    HttpStatus,
    /// A Postgres connection reading `pg_is_in_recovery()` and the timeline.
    Postgres,
}

impl CheckKind {
    /// The one kind that reads `check.KEY`, for a key only one kind reads.
    fn owner(key: &str) -> Option<CheckKind> {
        match key {
            "path" | "leader" => Some(CheckKind::HttpBody),
            "leader_path" | "replica_path" => Some(CheckKind::HttpStatus),
            "user" | "password" | "password_file" | "database" | "tls" | "tls_root_cert"
            | "tls_server_name" => Some(CheckKind::Postgres),
            _ => None,
        }
    }

    /// Whether this kind reads `check.KEY`. A key it does not read is refused rather than
    /// silently ignored, and left out of the printed configuration.
    fn reads(self, key: &str) -> bool {
        match key {
            // Asking another port could read the role of another server than the one routed to.
            "port" => self != CheckKind::Postgres,
            key => CheckKind::owner(key).is_none_or(|owner| owner == self),
        }
    }
}

/// Whether the Postgres check encrypts, and what it verifies (`check.tls`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CheckTls {
    Disable,
    /// Encrypted; the node's certificate is not verified.
    Require,
    /// Encrypted; the chain up to `check.tls_root_cert` and the name `check.tls_server_name`
    /// are verified.
    VerifyFull,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IpFamily {
    Ipv6,
    Ipv4,
}

/// An address to connect to as written: an IP address, or a name resolved (A and AAAA, as
/// `backends.prefer` says) with the resolver of `backends.dns_names`, so nodes listed by name
/// need no IP addresses in the file.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Endpoint {
    Addr(SocketAddr),
    Name { host: String, port: u16 },
}

impl Endpoint {
    /// The address, when written as one; a name has none until resolved.
    pub fn addr(&self) -> Option<SocketAddr> {
        match self {
            Endpoint::Addr(addr) => Some(*addr),
            Endpoint::Name { .. } => None,
        }
    }

    /// The name to resolve, if it is one.
    pub fn host(&self) -> Option<&str> {
        match self {
            Endpoint::Addr(_) => None,
            Endpoint::Name { host, .. } => Some(host),
        }
    }

    pub fn port(&self) -> u16 {
        match self {
            Endpoint::Addr(addr) => addr.port(),
            Endpoint::Name { port, .. } => *port,
        }
    }
}

/// Reads `IP:PORT`, `[IPv6]:PORT` or `NAME:PORT`. Pure.
impl std::str::FromStr for Endpoint {
    type Err = String;

    fn from_str(text: &str) -> Result<Endpoint, String> {
        if let Some(addr) = parse_socket_addr(text) {
            return Ok(Endpoint::Addr(addr));
        }
        let bad = || {
            format!(
                "bad address {text:?}; expected HOST:PORT, e.g. \"10.0.1.11:5432\", \"[fdaa::7]:5433\" or \"pg0.example.com:5432\""
            )
        };
        let (host, port) = text.trim().rsplit_once(':').ok_or_else(bad)?;
        if host.contains(':') || host.starts_with('[') {
            return Err(format!("{}; an IPv6 address is written in brackets", bad()));
        }
        let port: u16 = port.parse().map_err(|_| bad())?;
        let host = dns_name(host).map_err(|_| bad())?;
        // No top-level domain is all digits: this is a mistyped IP address, not a name.
        let top = host
            .trim_end_matches('.')
            .rsplit('.')
            .next()
            .unwrap_or_default();
        if top.chars().all(|c| c.is_ascii_digit()) {
            return Err(bad());
        }
        Ok(Endpoint::Name { host, port })
    }
}

/// As written: `10.0.0.1:5433`, `[fdaa::7]:5433`, `pg0.example.com:5432`.
impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Addr(addr) => write!(f, "{addr}"),
            Endpoint::Name { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

impl Serialize for Endpoint {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackendsConfig {
    #[serde(deserialize_with = "dns_names")]
    pub dns_names: Vec<String>,
    #[serde(deserialize_with = "port")]
    pub port: u16,
    #[serde(deserialize_with = "connect_addrs")]
    pub nameservers: Vec<SocketAddr>,
    #[serde(deserialize_with = "word")]
    pub prefer: IpFamily,
    #[serde(deserialize_with = "at_least_one")]
    pub max: usize,
    #[serde(with = "duration")]
    pub resolve_interval: Duration,
    #[serde(with = "duration")]
    pub resolve_timeout: Duration,
    /// Static backends, by address or by name (re-resolved as `dns_names` are).
    #[serde(deserialize_with = "endpoints")]
    pub backup: Vec<Endpoint>,
}

impl Default for BackendsConfig {
    fn default() -> Self {
        Self {
            // No default names the cluster: a file that sets neither this nor `backup` is
            // refused (see `File::validate`).
            dns_names: Vec::new(),
            port: 5433,
            // The system resolver (`/etc/resolv.conf`), which on Fly is `fdaa::3` anyway.
            nameservers: Vec::new(),
            prefer: IpFamily::Ipv6,
            max: 10,
            resolve_interval: Duration::from_secs(1),
            resolve_timeout: Duration::from_secs(2),
            backup: Vec::new(),
        }
    }
}

/// The least `proxy.switchover_grace` derived from the check interval.
const MIN_SWITCHOVER_GRACE: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckConfig {
    #[serde(deserialize_with = "word")]
    pub kind: CheckKind,
    /// 0 until [`CheckConfig::for_kind`] gives the kind's port (a written 0 is refused).
    #[serde(deserialize_with = "port")]
    pub port: u16,
    #[serde(deserialize_with = "url_path")]
    pub path: String,
    #[serde(deserialize_with = "url_path")]
    pub leader_path: String,
    #[serde(deserialize_with = "url_path")]
    pub replica_path: String,
    #[serde(deserialize_with = "not_blank")]
    pub user: String,
    /// Only from the environment (`${VAR}`), or read from `password_file` at load.
    #[serde(skip_serializing_if = "Secret::is_empty")]
    pub password: Secret,
    /// `""`: none.
    pub password_file: String,
    #[serde(deserialize_with = "not_blank")]
    pub database: String,
    #[serde(deserialize_with = "word")]
    pub tls: CheckTls,
    /// `""`: none; needed by `verify-full`, refused by the others.
    pub tls_root_cert: String,
    /// `""` until [`CheckConfig::for_kind`] makes it the first of `backends.dns_names`.
    pub tls_server_name: String,
    /// The certificates of `tls_root_cert`, read at load.
    #[serde(skip)]
    pub tls_roots: Vec<rustls::pki_types::CertificateDer<'static>>,
    #[serde(deserialize_with = "word")]
    pub split_brain: SplitBrain,
    #[serde(with = "duration")]
    pub interval: Duration,
    #[serde(with = "duration")]
    pub fast_interval: Duration,
    #[serde(with = "duration")]
    pub timeout: Duration,
    /// Deadline of the Postgres liveness probe that follows a leader's failed check.
    #[serde(with = "duration")]
    pub probe_timeout: Duration,
    /// How long a leader whose checks fail but whose Postgres answers stays the route.
    #[serde(with = "duration")]
    pub unconfirmed_limit: Duration,
    /// How long another node's new `leader` claim contests a confirmed leader's route (new
    /// clients wait, sessions pause at a boundary) before it counts as a promotion or split brain.
    #[serde(with = "duration")]
    pub contest_hold: Duration,
    /// How long bytes from a leader's sessions, or a completed handshake, postpone a verdict of
    /// death on a probe that timed out.
    #[serde(with = "duration")]
    pub liveness_window: Duration,
    #[serde(deserialize_with = "leader_words")]
    pub leader: Vec<String>,
    #[serde(deserialize_with = "at_least_one")]
    pub rise: u32,
    #[serde(deserialize_with = "at_least_one")]
    pub fall: u32,
}

impl Default for CheckConfig {
    fn default() -> Self {
        Self {
            kind: CheckKind::HttpBody,
            port: 0,
            path: "/flycheck/role".into(),
            leader_path: "/primary".into(),
            replica_path: "/replica".into(),
            user: "postgres".into(),
            password: Secret::default(),
            password_file: String::new(),
            database: "postgres".into(),
            tls: CheckTls::Disable,
            tls_root_cert: String::new(),
            tls_server_name: String::new(),
            tls_roots: Vec::new(),
            split_brain: SplitBrain::None,
            interval: Duration::from_secs(1),
            fast_interval: Duration::from_millis(100),
            timeout: Duration::from_secs(5),
            probe_timeout: Duration::from_secs(1),
            unconfirmed_limit: Duration::from_secs(60),
            contest_hold: Duration::from_secs(4),
            liveness_window: Duration::from_secs(2),
            leader: vec!["leader".into(), "primary".into()],
            rise: 1,
            fall: 2,
        }
    }
}

impl CheckConfig {
    /// The rules between `check.kind` and the other keys; `written` are the keys the file sets.
    fn for_kind(mut self, written: &[String], backends: &BackendsConfig) -> Result<Self, KeyError> {
        let kind = self.kind;
        if let Some(key) = written.iter().find(|key| !kind.reads(key)) {
            let reason = match CheckKind::owner(key) {
                Some(owner) => format!(
                    "only used with check.kind = {:?}, but check.kind is {:?}",
                    name_of(&owner),
                    name_of(&kind)
                ),
                None => format!(
                    "not used with check.kind = {:?}: each backend is asked at its own address",
                    name_of(&kind)
                ),
            };
            return Err(invalid(&format!("check.{key}"), reason));
        }
        if self.split_brain == SplitBrain::HighestTimeline && kind != CheckKind::Postgres {
            return Err(invalid(
                "check.split_brain",
                "\"highest-timeline\" needs check.kind = \"postgres\", the only check that reads timelines",
            ));
        }
        if self.port == 0 {
            self.port = match kind {
                CheckKind::HttpBody => 5500,
                // Patroni's REST API.
                CheckKind::HttpStatus => 8008,
                CheckKind::Postgres => backends.port,
            };
        }
        if kind == CheckKind::Postgres {
            self.read_password_file()?;
            self.read_tls(&backends.dns_names)?;
        }
        Ok(self)
    }

    /// `check.password_file` into `password`, at load: a file that cannot be read stops the
    /// start (or the reload) rather than a check failing later on every node.
    fn read_password_file(&mut self) -> Result<(), KeyError> {
        const KEY: &str = "check.password_file";
        if self.password_file.is_empty() {
            return Ok(());
        }
        if !self.password.is_empty() {
            return Err(invalid(
                KEY,
                "set check.password or check.password_file, not both",
            ));
        }
        let path = &self.password_file;
        let text = std::fs::read_to_string(path)
            .map_err(|e| invalid(KEY, format!("cannot read {path}: {e}")))?;
        let password = text.strip_suffix('\n').unwrap_or(&text);
        let password = password.strip_suffix('\r').unwrap_or(password);
        if password.is_empty() {
            return Err(invalid(KEY, format!("{path} is empty")));
        }
        self.password = Secret(password.to_owned());
        Ok(())
    }

    /// The rules between `check.tls` and the keys it reads; reads the root certificates.
    fn read_tls(&mut self, dns_names: &[String]) -> Result<(), KeyError> {
        let verify_full = name_of(&CheckTls::VerifyFull);
        if self.tls != CheckTls::VerifyFull && !self.tls_root_cert.is_empty() {
            return Err(invalid(
                "check.tls_root_cert",
                format!(
                    "only used with check.tls = {verify_full:?} (check.tls is {:?}, which verifies no certificate)",
                    name_of(&self.tls)
                ),
            ));
        }
        if self.tls == CheckTls::Disable {
            if !self.tls_server_name.is_empty() {
                return Err(invalid(
                    "check.tls_server_name",
                    "only used with check.tls = \"require\" or \"verify-full\"",
                ));
            }
            return Ok(());
        }
        if self.tls_server_name.is_empty() {
            if let Some(name) = dns_names.first() {
                self.tls_server_name = name.trim_end_matches('.').to_owned();
            }
        }
        if !self.tls_server_name.is_empty() {
            server_name(&self.tls_server_name).map_err(|e| invalid("check.tls_server_name", e))?;
        }
        if self.tls == CheckTls::VerifyFull {
            if self.tls_server_name.is_empty() {
                return Err(invalid(
                    "check.tls_server_name",
                    format!("needed with check.tls = {verify_full:?} when backends.dns_names is empty: the name the nodes' certificates hold"),
                ));
            }
            if self.tls_root_cert.is_empty() {
                return Err(invalid(
                    "check.tls_root_cert",
                    format!("needed with check.tls = {verify_full:?}: a PEM file with the certificate that signed the nodes' certificates"),
                ));
            }
            self.tls_roots = read_root_certs(&self.tls_root_cert)
                .map_err(|e| invalid("check.tls_root_cert", e))?;
        }
        Ok(())
    }

    /// Printed with only its kind's own keys (another kind's would be refused when read back),
    /// and never the password.
    fn serialize_own_keys<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut table = toml::Table::try_from(self).map_err(S::Error::custom)?;
        table.retain(|key, _| self.kind.reads(key));
        if !self.password_file.is_empty() {
            // Read from the file; printed as that file.
            table.remove("password");
        }
        table.serialize(s)
    }
}

/// The name a value is written with in the file: its serde name, so no name is spelt twice.
fn name_of<T: Serialize>(value: &T) -> String {
    match toml::Value::try_from(value) {
        Ok(toml::Value::String(name)) => name,
        _ => String::new(),
    }
}

/// A password: kept out of `Debug` output, logs and `roleproxy check`. Shared with the agent.
pub use roleproxy_common::Secret;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    #[serde(with = "duration")]
    pub connect_timeout: Duration,
    pub connect_retries: u32,
    #[serde(with = "duration")]
    pub idle_timeout: Duration,
    /// A client that has not sent its first packet this long after connecting is closed
    /// without a backend ever being connected for it.
    #[serde(with = "duration")]
    pub silent_timeout: Duration,
    /// A session with one side closed and the other silent this long is closed.
    #[serde(with = "duration")]
    pub half_close_timeout: Duration,
    #[serde(deserialize_with = "max_connections")]
    pub max_connections: usize,
    #[serde(with = "duration")]
    pub leader_wait: Duration,
    #[serde(with = "duration")]
    pub shutdown_grace: Duration,
    #[serde(deserialize_with = "word")]
    pub copy: CopyMode,
    #[serde(deserialize_with = "preconnect")]
    pub preconnect: usize,
    /// Worker threads; 0: one per CPU. Read at start-up only.
    #[serde(deserialize_with = "threads")]
    pub threads: usize,
    /// How sessions end when their leader steps down while alive.
    #[serde(deserialize_with = "word")]
    pub switchover: Switchover,
    /// How long a session whose leader stepped down may take to end its transaction. Zero
    /// (left out, or written `""`) until [`File::validate`] makes it half of `check.interval`.
    #[serde(
        serialize_with = "duration::serialize",
        deserialize_with = "duration::or_blank"
    )]
    pub switchover_grace: Duration,
    /// One log line per client connection (HAProxy's `option tcplog`), on the tracing target
    /// `roleproxy::access`.
    pub access_log: bool,
    /// How long a leader session still in a transaction after `POST /pause` may take to end
    /// it before it is cut.
    #[serde(with = "duration")]
    pub pause_grace: Duration,
    /// How long a pause holds new clients before it lifts by itself.
    #[serde(with = "duration")]
    pub pause_limit: Duration,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(4),
            connect_retries: 2,
            idle_timeout: Duration::from_secs(30 * 60),
            silent_timeout: Duration::from_secs(5),
            half_close_timeout: Duration::from_secs(10),
            max_connections: 1000,
            leader_wait: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(10),
            copy: CopyMode::Auto,
            preconnect: 0,
            threads: 0,
            switchover: Switchover::Transaction,
            switchover_grace: Duration::ZERO,
            access_log: false,
            // As long as `shutdown_grace`: ordinary transactions commit well within it, and a
            // stuck one must not hold up the switchover the pause is for.
            pause_grace: Duration::from_secs(10),
            // A Patroni or repmgr switchover (a checkpoint, a fast stop, a promotion) can
            // take longer than `leader_wait`; a forgotten pause must still lift.
            pause_limit: Duration::from_secs(60),
        }
    }
}

/// How a session's bytes are moved (`proxy.copy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CopyMode {
    /// Buffered for small messages (one `read` + one `send` is cheapest), `splice(2)` while a
    /// direction is moving bulk data (a read brought half a buffer or more).
    Auto,
    /// `splice(2)` through a pooled pipe (Linux), falling back to buffered.
    Splice,
    /// `read` into a pooled buffer, `write` out of it.
    Buffered,
}

/// How the sessions of a leader that stepped down while alive (fenced or demoted) end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Switchover {
    /// At each session's next transaction boundary, within `proxy.switchover_grace`.
    Transaction,
    /// At once, as when the leader is gone.
    Immediate,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// `None` when `admin.address = ""`: no admin listener.
    #[serde(with = "admin_address")]
    pub address: Option<SocketAddr>,
    /// Whether requests that change state (`POST /reload`) are served. The admin port is
    /// reachable by every node of the private network, so this is off unless asked for.
    pub allow_changes: bool,
    /// How long a per-backend metric series may stay unchanged before it is removed; the
    /// series of backends still known are kept fresh, so only departed ones go. Start-up only.
    #[serde(with = "duration")]
    pub metrics_expiry: Duration,
    /// `""`: none. Else the requests that change state need `Authorization: Bearer` with
    /// this file's content (trimmed).
    pub token_file: String,
    /// The token of `token_file`, read at load.
    #[serde(skip)]
    pub token: Option<Secret>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            address: Some((Ipv6Addr::UNSPECIFIED, 8404).into()),
            allow_changes: false,
            metrics_expiry: Duration::from_secs(120),
            token_file: String::new(),
            token: None,
        }
    }
}

impl AdminConfig {
    /// `admin.token_file` into `token`, at load: a file that cannot be read stops the start
    /// (or the reload) rather than every change being refused later.
    fn read_token_file(&mut self) -> Result<(), KeyError> {
        const KEY: &str = "admin.token_file";
        if self.token_file.is_empty() {
            self.token = None;
            return Ok(());
        }
        let path = &self.token_file;
        let text = std::fs::read_to_string(path)
            .map_err(|e| invalid(KEY, format!("cannot read {path}: {e}")))?;
        let token = text.trim();
        if token.is_empty() {
            return Err(invalid(KEY, format!("{path} is empty")));
        }
        self.token = Some(Secret(token.to_owned()));
        Ok(())
    }
}

/// More sessions than any descriptor limit allows; also keeps the limit's arithmetic small.
pub const MAX_CONNECTIONS: usize = 1_000_000;

/// Shorter durations would make loops spin.
const MIN_DURATION: Duration = Duration::from_millis(1);
/// Longer durations are surely typos, and would overflow deadline arithmetic.
const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

// ---- reading one value ----------------------------------------------------------------------
//
// Each function reads a value after `${VAR}` expansion and refuses what the key cannot be, in
// the words the error shows after the key.

/// Durations are written in quotes with a unit (`"2s"`) and printed in the same form.
mod duration {
    use super::*;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        d.deserialize_str(Visitor { blank: None })
    }

    /// Blank (`""`) reads as zero: "the default", for a default that depends on other keys.
    pub fn or_blank<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        d.deserialize_str(Visitor {
            blank: Some(Duration::ZERO),
        })
    }

    /// Its own visitor so that a bare number (`interval = 2`) gets a hint with the unit
    /// instead of "expected a string".
    struct Visitor {
        blank: Option<Duration>,
    }

    impl serde::de::Visitor<'_> for Visitor {
        type Value = Duration;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a duration in quotes, like \"2s\"")
        }

        fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Duration, E> {
            match self.blank {
                Some(blank) if text.trim().is_empty() => Ok(blank),
                _ => parse(text).map_err(E::custom),
            }
        }

        fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Duration, E> {
            Err(E::custom(format!(
                "a duration needs quotes and a unit: write \"{n}s\" for {n} seconds or \"{n}ms\" for {n} milliseconds"
            )))
        }

        fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Duration, E> {
            self.visit_i64(i64::try_from(n).unwrap_or(i64::MAX))
        }
    }

    fn parse(text: &str) -> Result<Duration, String> {
        let d = humantime::parse_duration(text.trim()).map_err(|e| {
            format!("bad duration {text:?} ({e}); use e.g. \"250ms\", \"2s\", \"30m\"")
        })?;
        if d.is_zero() {
            return Err("must be greater than zero".into());
        }
        if d < MIN_DURATION {
            return Err(format!("{text:?} is shorter than the minimum of 1ms"));
        }
        if d > MAX_DURATION {
            return Err(format!("{text:?} is longer than the limit of 365 days"));
        }
        Ok(d)
    }
}

/// A value of an enum, by its serde name. Read as text first, so a number is "expected text
/// in quotes", and an unknown name gets the list of known ones.
fn word<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<T, D::Error> {
    T::deserialize(String::deserialize(d)?.into_deserializer())
}

fn some_word<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    word(d).map(Some)
}

/// Text, checked by `check`; its error is the reason shown after the key.
fn text_with<'de, D: Deserializer<'de>, T>(
    d: D,
    check: impl FnOnce(String) -> Result<T, String>,
) -> Result<T, D::Error> {
    check(String::deserialize(d)?).map_err(D::Error::custom)
}

fn not_blank<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    text_with(d, |text| match text.trim() {
        "" => Err("must not be empty".into()),
        _ => Ok(text),
    })
}

fn url_path<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    text_with(d, |path| {
        if !path.starts_with('/') || path.parse::<hyper::http::uri::PathAndQuery>().is_err() {
            return Err(format!(
                "must be a URL path starting with '/', got {path:?}"
            ));
        }
        Ok(path)
    })
}

/// Words compared case-insensitively with what a role endpoint answers.
fn leader_words<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let words: Vec<String> = Vec::<String>::deserialize(d)?
        .iter()
        .map(|w| w.trim().to_ascii_lowercase())
        .collect();
    if words.is_empty() || words.iter().any(String::is_empty) {
        return Err(D::Error::custom("must list at least one non-empty word"));
    }
    Ok(words)
}

fn dns_names<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    struct DnsName(String);
    impl<'de> Deserialize<'de> for DnsName {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            text_with(d, |text| dns_name(&text).map(DnsName))
        }
    }
    let names = Vec::<DnsName>::deserialize(d)?;
    Ok(names.into_iter().map(|n| n.0).collect())
}

/// A DNS name, trimmed. Pure.
fn dns_name(text: &str) -> Result<String, String> {
    let name = text.trim();
    let bad_label = name
        .trim_end_matches('.')
        .split('.')
        .any(|label| label.is_empty() || label.len() > 63);
    // 253 characters is the most a DNS name can have (without the final dot).
    let too_long = name.trim_end_matches('.').len() > 253;
    if name.is_empty() || bad_label || too_long || name.contains(char::is_whitespace) {
        return Err(format!("bad DNS name {name:?}"));
    }
    Ok(name.to_string())
}

fn addr(text: String) -> Result<SocketAddr, String> {
    parse_socket_addr(&text).ok_or_else(|| {
        format!("bad address {text:?}; expected IP:PORT, e.g. \"0.0.0.0:5432\" or \"[::]:5432\"")
    })
}

/// An address to connect to: port 0 is never right there.
fn connect_addr(text: String) -> Result<SocketAddr, String> {
    let addr = addr(text)?;
    if addr.port() == 0 {
        return Err(format!("port 0 in {addr} cannot be connected to"));
    }
    Ok(addr)
}

/// An address read by `read`, as a list element (so its error names `key[i]`).
struct Addr<const CONNECT: bool>(SocketAddr);

impl<'de, const CONNECT: bool> Deserialize<'de> for Addr<CONNECT> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        text_with(d, if CONNECT { connect_addr } else { addr }).map(Addr)
    }
}

/// Addresses to listen on (port 0: any free port, as the tests use); at least one.
fn listen_addrs<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<SocketAddr>, D::Error> {
    let addrs = Vec::<Addr<false>>::deserialize(d)?;
    if addrs.is_empty() {
        return Err(D::Error::custom("must list at least one address"));
    }
    Ok(addrs.into_iter().map(|a| a.0).collect())
}

fn connect_addrs<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<SocketAddr>, D::Error> {
    let addrs = Vec::<Addr<true>>::deserialize(d)?;
    Ok(addrs.into_iter().map(|a| a.0).collect())
}

/// An address or a name to connect to: port 0 is never right there.
fn endpoint(text: String) -> Result<Endpoint, String> {
    let endpoint: Endpoint = text.parse()?;
    if endpoint.port() == 0 {
        return Err(format!("port 0 in {endpoint} cannot be connected to"));
    }
    Ok(endpoint)
}

fn endpoints<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Endpoint>, D::Error> {
    struct Read(Endpoint);
    impl<'de> Deserialize<'de> for Read {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            text_with(d, endpoint).map(Read)
        }
    }
    let read = Vec::<Read>::deserialize(d)?;
    Ok(read.into_iter().map(|r| r.0).collect())
}

fn some_endpoint<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Endpoint>, D::Error> {
    text_with(d, endpoint).map(Some)
}

/// `""` is no admin listener, and is printed so.
mod admin_address {
    use super::*;

    pub fn serialize<S: Serializer>(a: &Option<SocketAddr>, s: S) -> Result<S::Ok, S::Error> {
        match a {
            Some(addr) => addr.serialize(s),
            None => s.serialize_str(""),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
        text_with(d, |text| match text.trim() {
            "" => Ok(None),
            _ => addr(text).map(Some),
        })
    }
}

fn port<'de, D: Deserializer<'de>>(d: D) -> Result<u16, D::Error> {
    match u16::deserialize(d)? {
        0 => Err(D::Error::custom("must not be 0")),
        port => Ok(port),
    }
}

fn at_least_one<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default + PartialEq,
{
    let n = T::deserialize(d)?;
    if n == T::default() {
        return Err(D::Error::custom("must be at least 1"));
    }
    Ok(n)
}

/// `n`, unless above `max`; `why` follows the limit in the error.
fn at_most<E: serde::de::Error>(n: usize, max: usize, why: &str) -> Result<usize, E> {
    if n > max {
        return Err(E::custom(format!("at most {max}{why}")));
    }
    Ok(n)
}

fn max_connections<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    let n = at_least_one(d)?;
    at_most(n, MAX_CONNECTIONS, ": each session needs two descriptors")
}

fn preconnect<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    let n = usize::deserialize(d)?;
    at_most(n, 100, ": each one holds a Postgres backend on the leader")
}

fn threads<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    at_most(usize::deserialize(d)?, 1024, " (0 means one per CPU)")
}

// ---- loading --------------------------------------------------------------------------------

impl Config {
    /// Reads and validates a file, expanding variables from the process environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Self::load_with(path, |_| Ok(()))
    }

    /// [`Config::load`], then `applied`: the rules of the host the configuration is applied on
    /// (its interfaces), which no file can say. Their errors name keys and lines as the file's
    /// own do.
    pub fn load_with(
        path: &Path,
        applied: impl FnOnce(&Config) -> Result<(), ConfigError>,
    ) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let config = Self::parse(&text, &|name| std::env::var(name).ok())?;
        applied(&config).map_err(|e| locate(&text, e))?;
        Ok(config)
    }

    /// Parses TOML text; `env` looks up variables so tests need not touch the process environment.
    ///
    /// No error quotes `check.password` (errors reach logs, `roleproxy check` and the answer to
    /// `POST /reload`, which every node of the private network can send): a password written
    /// in the file is refused before anything reads its value, a TOML error gives no source
    /// line, and an error of `${VAR}` expansion quotes no value.
    pub fn parse(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let parsed = read(text, env).and_then(|(file, written)| file.validate(&written));
        parsed.map_err(|e| locate(text, e))
    }

    /// Every listener: `[listen]` first, named `leader`, then `[[listeners]]`.
    pub fn all_listeners(&self) -> Vec<ListenerConfig> {
        let mut all = vec![ListenerConfig {
            name: "leader".into(),
            addresses: self.listen.addresses.clone(),
            serves: Serves::Leader,
        }];
        all.extend(self.listeners.iter().cloned());
        all
    }

    /// How long a per-backend metric series may stay unchanged: `admin.metrics_expiry`, but at
    /// least twice `check.interval + check.timeout`. A live backend's latency histogram is
    /// refreshed only by its checks, so it must not expire between two of them.
    pub fn metrics_expiry(&self) -> Duration {
        let check_gap = self.check.interval.saturating_add(self.check.timeout);
        self.admin.metrics_expiry.max(check_gap.saturating_mul(2))
    }

    /// Why this configuration, though valid, cannot route a client: no name to discover
    /// backends by and no static backend (both written as empty lists). Pure.
    pub fn cannot_route(&self) -> Option<&'static str> {
        (self.backends.dns_names.is_empty() && self.backends.backup.is_empty()).then_some(
            "backends.dns_names and backends.backup are both empty: no backend will ever be found, and every client is refused",
        )
    }

    /// Every name this configuration resolves, with the key that writes it.
    pub fn names(&self) -> Vec<(String, &str)> {
        let mut names: Vec<(String, &str)> = Vec::new();
        for (i, name) in self.backends.dns_names.iter().enumerate() {
            names.push((format!("backends.dns_names[{i}]"), name));
        }
        for (i, backup) in self.backends.backup.iter().enumerate() {
            if let Some(host) = backup.host() {
                names.push((format!("backends.backup[{i}]"), host));
            }
        }
        for (i, spec) in self.listeners.iter().enumerate() {
            if let Serves::Target(Endpoint::Name { host, .. }) = &spec.serves {
                names.push((format!("listeners[{i}].target"), host));
            }
        }
        names
    }

    /// A name for the cluster in logs and client errors, e.g. `iad.app.internal`.
    pub fn cluster_name(&self) -> String {
        if self.backends.dns_names.is_empty() {
            "backup".to_string()
        } else {
            self.backends
                .dns_names
                .iter()
                .map(|n| n.trim_end_matches('.'))
                .collect::<Vec<_>>()
                .join(",")
        }
    }
}

/// The keys a file sets in the sections whose rules depend on what is left out.
#[derive(Default)]
struct Written {
    check: Vec<String>,
    backends: Vec<String>,
}

impl Written {
    fn in_tree(tree: &DeTable<'_>) -> Written {
        let keys = |section: &str| match tree.get(section).map(Spanned::get_ref) {
            Some(DeValue::Table(table)) => table.keys().map(|k| k.get_ref().to_string()).collect(),
            _ => Vec::new(),
        };
        Written {
            check: keys("check"),
            backends: keys("backends"),
        }
    }
}

/// The file's sections and the keys it sets, or every error in the user's terms: a TOML syntax
/// error with its line and column, or each value that cannot be expanded or read, and each
/// unknown key, under its dotted key (`check.timeout`) with its line.
fn read(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<(File, Written), ConfigError> {
    let mut tree = DeTable::parse(text).map_err(|e| ConfigError::Parse(parse_error(text, &e)))?;
    let written = Written::in_tree(tree.get_ref());
    let mut errors = Vec::new();
    if let Err(e) = refuse_written_password(tree.get_ref()) {
        remove_key(tree.get_mut(), &e.key);
        errors.push(e);
    }
    let mut unexpanded = Vec::new();
    expand_all(tree.get_mut(), "", env, &mut unexpanded);
    // A value that cannot be expanded is not read: its own error says why. `locate` gives
    // each its line.
    for e in &unexpanded {
        remove_key(tree.get_mut(), &e.key);
    }
    errors.extend(unexpanded);
    // Serde stops at the first error: each key found wrong is taken out and the rest read
    // again, so one run names them all. Every round removes a key, so this ends.
    let mut removed: Vec<String> = errors.iter().map(|e| e.key.clone()).collect();
    loop {
        let file = serde_path_to_error::deserialize(Node(DeValue::Table(tree.get_ref().clone())));
        let e = match file {
            Ok(file) if errors.is_empty() => return Ok((file, written)),
            Ok(_) => return Err(ConfigError::Invalid(errors)),
            Err(e) => e,
        };
        let key = e.path().to_string();
        let wrong = e.into_inner();
        // A required key taken out for its own error is not missing a second time.
        let taken_out = match wrong {
            Wrong::Missing(field) => {
                let missing = format!("{key}.{field}");
                let inside = format!("{missing}[");
                removed
                    .iter()
                    .any(|r| *r == missing || r.starts_with(&inside))
            }
            _ => false,
        };
        if !taken_out {
            // An unknown key is shown where it is written, any other error at its value.
            let name = matches!(wrong, Wrong::UnknownKey(_));
            errors.push(KeyError {
                reason: wrong.reason(&key),
                at: span_of(tree.get_ref(), &key, name).and_then(|span| position(text, span.start)),
                key: key.clone(),
            });
        }
        if !remove_key(tree.get_mut(), &key) {
            return Err(ConfigError::Invalid(errors));
        }
        removed.push(key);
    }
}

/// A dotted key as serde names it (`listeners[1].target`), split into table keys and list
/// indexes. Pure.
fn key_path(key: &str) -> Vec<Result<&str, usize>> {
    let mut path = Vec::new();
    for part in key.split('.') {
        let mut pieces = part.split('[');
        if let Some(name) = pieces.next().filter(|n| !n.is_empty()) {
            path.push(Ok(name));
        }
        for index in pieces {
            match index.trim_end_matches(']').parse() {
                Ok(i) => path.push(Err(i)),
                Err(_) => return Vec::new(),
            }
        }
    }
    path
}

/// Takes the table key that holds `key` out of the tree: the whole list for a key inside one
/// (`listen.addresses[1]` takes `listen.addresses`). Whether anything was taken out.
fn remove_key(root: &mut DeTable<'_>, key: &str) -> bool {
    let path = key_path(key);
    let Some(last) = path.iter().rposition(Result::is_ok) else {
        return false;
    };
    let (Some(table), Ok(name)) = (table_at(root, &path[..last]), path[last]) else {
        return false;
    };
    table.remove(name).is_some()
}

/// The table at `path`, which ends with a table key or a list index.
fn table_at<'t, 'i>(
    table: &'t mut DeTable<'i>,
    path: &[Result<&str, usize>],
) -> Option<&'t mut DeTable<'i>> {
    let Some((first, rest)) = path.split_first() else {
        return Some(table);
    };
    let Ok(name) = first else { return None };
    let mut value = table.get_mut(*name)?.get_mut();
    let mut rest = rest;
    while let Some((Err(i), more)) = rest.split_first() {
        let DeValue::Array(items) = value else {
            return None;
        };
        value = items.get_mut(*i)?.get_mut();
        rest = more;
    }
    match value {
        DeValue::Table(table) => table_at(table, rest),
        _ => None,
    }
}

/// The errors, each with the line of the value its key names when the file writes it, in the
/// order of the file.
fn locate(text: &str, error: ConfigError) -> ConfigError {
    let ConfigError::Invalid(mut errors) = error else {
        return error;
    };
    if let Ok(tree) = DeTable::parse(text) {
        for e in errors.iter_mut().filter(|e| e.at.is_none()) {
            e.at =
                span_of(tree.get_ref(), &e.key, false).and_then(|span| position(text, span.start));
        }
    }
    // Keys not written (no line) last.
    errors.sort_by_key(|e| (e.at.is_none(), e.at));
    errors.dedup();
    ConfigError::Invalid(errors)
}

/// Where the file writes the value of `key`, or with `name` the key itself, if it does.
fn span_of(root: &DeTable<'_>, key: &str, name: bool) -> Option<Range<usize>> {
    let mut at: Option<(Range<usize>, &Spanned<DeValue<'_>>)> = None;
    for step in key_path(key) {
        let next = match (step, at.as_ref().map(|(_, value)| value.get_ref())) {
            (Ok(k), None) => root.get_key_value(k).map(|(k, v)| (k.span(), v)),
            (Ok(k), Some(DeValue::Table(t))) => t.get_key_value(k).map(|(k, v)| (k.span(), v)),
            (Err(i), Some(DeValue::Array(items))) => items.get(i).map(|v| (v.span(), v)),
            _ => None,
        };
        at = Some(next?);
    }
    at.map(|(key, value)| if name { key } else { value.span() })
}

/// Refuses a `check.password` written in the file: the file is copied, backed up, diffed and
/// shown, and a password in it goes everywhere it goes. The value must come from the
/// environment, as `${VAR}` references and nothing else (an empty default, `${VAR:-}`, is
/// allowed; any other default is written in the file), or from `check.password_file`.
/// Any other value is refused too, before serde could quote it back (`password = 12345678`).
fn refuse_written_password(tree: &DeTable<'_>) -> Result<(), KeyError> {
    let Some(DeValue::Table(check)) = tree.get("check").map(Spanned::get_ref) else {
        return Ok(());
    };
    let reason = match check.get("password").map(Spanned::get_ref) {
        None => return Ok(()),
        Some(DeValue::String(written)) if only_variables(written) => return Ok(()),
        Some(DeValue::String(_)) => "a password written in the file is refused: write password = \"${VAR}\" to take it from the environment variable VAR, or set check.password_file to a file that holds it",
        Some(_) => "must be a quoted string, e.g. password = \"${PGPASSWORD}\"",
    };
    Err(invalid("check.password", reason))
}

/// Whether `text` is only `${VAR}` (or `${VAR:-}`) references, or empty. Pure.
fn only_variables(text: &str) -> bool {
    let mut rest = text;
    while !rest.is_empty() {
        let Some(after) = rest.strip_prefix("${") else {
            return false;
        };
        let Some(end) = after.find('}') else {
            return false;
        };
        if after[..end]
            .split_once(":-")
            .is_some_and(|(_, default)| !default.is_empty())
        {
            return false;
        }
        rest = &after[end + 1..];
    }
    true
}

/// Expands every string of the tree in place, `path` being its dotted key. A value that cannot
/// be expanded is left as written, and why is kept under its key.
fn expand_all(
    table: &mut DeTable<'_>,
    path: &str,
    env: &dyn Fn(&str) -> Option<String>,
    errors: &mut Vec<KeyError>,
) {
    for (key, value) in table.iter_mut() {
        let key = match path {
            "" => key.get_ref().to_string(),
            path => format!("{path}.{}", key.get_ref()),
        };
        expand_value(value, &key, env, errors);
    }
}

fn expand_value(
    value: &mut Spanned<DeValue<'_>>,
    key: &str,
    env: &dyn Fn(&str) -> Option<String>,
    errors: &mut Vec<KeyError>,
) {
    match value.get_mut() {
        DeValue::String(text) => match expand(text, env) {
            Ok(expanded) => *text = Cow::Owned(expanded),
            // The value is not quoted: its line and column say where it is, and it may be a
            // password, also under a misspelt key.
            Err(e) => errors.push(invalid(key, e.to_string())),
        },
        DeValue::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                expand_value(item, &format!("{key}[{i}]"), env, errors);
            }
        }
        DeValue::Table(table) => expand_all(table, key, env, errors),
        _ => {}
    }
}

/// A TOML error with its line, column and key but without the source line that `toml` quotes:
/// that line may hold a password, also one under a misspelt key.
fn parse_error(text: &str, error: &toml::de::Error) -> String {
    let message = error.message().trim_end().replace('\n', "; ");
    let at = error
        .span()
        .and_then(|span| position(text, span.start))
        .map(|p| p.to_string())
        .unwrap_or_default();
    format!("TOML parse error{at}: {message}")
}

/// The line and column of a byte offset into `text`; none past its end.
fn position(text: &str, offset: usize) -> Option<Position> {
    let before = text.get(..offset)?;
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    Some(Position { line, column })
}

/// The unknown key, and the known key it is most likely a misspelling of.
fn unknown_key(unknown: &str, known: &[&str]) -> String {
    let closest = known
        .iter()
        .map(|k| (strsim::damerau_levenshtein(unknown, k), *k))
        .min();
    match closest {
        Some((distance, k)) if distance <= (k.len() / 3).max(1) => {
            format!("unknown key; did you mean `{k}`?")
        }
        _ if known.is_empty() => "unknown key".to_owned(),
        _ if known.len() == 1 => format!("unknown key; the only key here is `{}`", known[0]),
        _ => format!("unknown key; the keys here are {}", known.join(", ")),
    }
}

// ---- errors in the file's words ---------------------------------------------------------------

/// What serde found wrong with a value, as it reports it (not as English text), so that
/// [`Wrong::reason`] can say it in the words of the file for the key it is about.
#[derive(Debug)]
enum Wrong {
    /// The reason a reading function gives.
    Said(String),
    /// A value of another kind than the key takes: `found` already in the file's words, and
    /// `text` when it is text.
    Type {
        found: String,
        text: Option<String>,
        expected: String,
    },
    /// A key that is not one of its table's, with the reason.
    UnknownKey(String),
    /// A word that is not one of the key's.
    UnknownWord {
        got: String,
        known: &'static [&'static str],
    },
    /// A required key left out.
    Missing(&'static str),
}

impl serde::de::Error for Wrong {
    fn custom<T: std::fmt::Display>(reason: T) -> Self {
        Wrong::Said(reason.to_string())
    }

    fn invalid_type(found: Unexpected<'_>, expected: &dyn Expected) -> Self {
        let text = match found {
            Unexpected::Str(text) => Some(text.to_owned()),
            _ => None,
        };
        let found = match found {
            Unexpected::Signed(n) => format!("the number {n}"),
            Unexpected::Unsigned(n) => format!("the number {n}"),
            Unexpected::Float(n) => format!("the number {n}"),
            Unexpected::Bool(b) => b.to_string(),
            Unexpected::Str(text) => format!("the text {text:?}"),
            Unexpected::Seq => "a list".to_owned(),
            Unexpected::Map => "a table".to_owned(),
            other => other.to_string(),
        };
        Wrong::Type {
            found,
            text,
            expected: expected.to_string(),
        }
    }

    fn invalid_value(found: Unexpected<'_>, expected: &dyn Expected) -> Self {
        Self::invalid_type(found, expected)
    }

    fn unknown_field(key: &str, known: &'static [&'static str]) -> Self {
        Wrong::UnknownKey(unknown_key(key, known))
    }

    fn unknown_variant(got: &str, known: &'static [&'static str]) -> Self {
        Wrong::UnknownWord {
            got: got.to_owned(),
            known,
        }
    }

    fn missing_field(key: &'static str) -> Self {
        Wrong::Missing(key)
    }
}

impl std::fmt::Display for Wrong {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason(""))
    }
}

impl std::error::Error for Wrong {}

impl Wrong {
    /// Why the value of `key` is refused, saying what to write rather than naming Rust types
    /// (`u16`, `struct CheckConfig`). Pure.
    fn reason(&self, key: &str) -> String {
        let name = key.rsplit(['.', ']']).next().unwrap_or(key);
        match self {
            Wrong::Said(reason) | Wrong::UnknownKey(reason) => reason.clone(),
            Wrong::Missing(field) => format!("is missing its key `{field}`"),
            Wrong::UnknownWord { got, known } => {
                let known: Vec<String> = known.iter().map(|k| format!("{k:?}")).collect();
                let all = match known.split_last() {
                    Some((last, [])) => last.clone(),
                    Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
                    None => String::new(),
                };
                // `serves` has a third answer that is not one of its words: a fixed `target`.
                let hint = if name == "serves" {
                    " (or set target)"
                } else {
                    ""
                };
                format!("expected {all}{hint}, got {got:?}")
            }
            Wrong::Type {
                found,
                text,
                expected,
            } => {
                let expected = match expected.as_str() {
                    "a string" => "text in quotes".to_owned(),
                    "a boolean" => "true or false, without quotes".to_owned(),
                    "u16" => "a whole number from 0 to 65535".to_owned(),
                    "u32" | "u64" | "usize" => "a whole number, 0 or more".to_owned(),
                    "a sequence" => match text {
                        Some(text) => format!("a list in brackets: write {name} = [\"{text}\"]"),
                        None => "a list in brackets, like [\"a\", \"b\"]".to_owned(),
                    },
                    table if table.starts_with("struct ") || table == "a map" => {
                        format!(
                            "a table: write [{key}] on a line of its own, with its keys below it"
                        )
                    }
                    other => other.to_owned(),
                };
                format!("found {found}; expected {expected}")
            }
        }
    }
}

/// A value of the file, read by serde with [`Wrong`] as its error.
struct Node<'i>(DeValue<'i>);

impl<'de> Deserializer<'de> for Node<'_> {
    type Error = Wrong;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Wrong> {
        match self.0 {
            DeValue::String(text) => visitor.visit_str(&text),
            DeValue::Integer(n) => match i64::from_str_radix(n.as_str(), n.radix()) {
                Ok(n) => visitor.visit_i64(n),
                Err(_) => visitor
                    .visit_u64(u64::from_str_radix(n.as_str(), n.radix()).map_err(Wrong::custom)?),
            },
            DeValue::Float(n) => visitor.visit_f64(n.as_str().parse().map_err(Wrong::custom)?),
            DeValue::Boolean(b) => visitor.visit_bool(b),
            DeValue::Datetime(_) => Err(Wrong::invalid_type(Unexpected::Other("a date"), &visitor)),
            DeValue::Array(items) => {
                let items = items.into_iter().map(|item| Node(item.into_inner()));
                SeqDeserializer::new(items).deserialize_any(visitor)
            }
            DeValue::Table(table) => {
                let entries = table
                    .into_iter()
                    .map(|(key, value)| (key.into_inner(), Node(value.into_inner())));
                MapDeserializer::new(entries).deserialize_any(visitor)
            }
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Wrong> {
        visitor.visit_some(self)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        unit unit_struct newtype_struct seq tuple tuple_struct map struct enum identifier
        ignored_any
    }
}

impl<'de, 'i> IntoDeserializer<'de, Wrong> for Node<'i> {
    type Deserializer = Self;

    fn into_deserializer(self) -> Self {
        self
    }
}

/// Accepts `1.2.3.4:5`, `[::1]:5` and also `[1.2.3.4]:5`, which the Fly template produces
/// when `PG_LISTEN_ADDRESS` holds an IPv4 address.
fn parse_socket_addr(text: &str) -> Option<SocketAddr> {
    let text = text.trim();
    if let Ok(addr) = text.parse() {
        return Some(addr);
    }
    let rest = text.strip_prefix('[')?;
    let (ip, port) = rest.split_once("]:")?;
    let ip: IpAddr = ip.parse().ok()?;
    Some(SocketAddr::new(ip, port.parse().ok()?))
}

/// Why a `${...}` could not be expanded. It never holds the value around it, so a password's
/// error can be shown.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
enum ExpandError {
    #[error("unterminated \"${{\"")]
    Unterminated,
    #[error("bad variable name after \"${{\"")]
    BadName,
    #[error("environment variable {0} is not set (write ${{{0}:-default}} to give a default)")]
    Unset(String),
}

/// Expands `${VAR}` and `${VAR:-default}` (default used when VAR is unset or empty).
fn expand(value: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, ExpandError> {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find('}').ok_or(ExpandError::Unterminated)?;
        let expr = &after[..end];
        let (name, default) = match expr.split_once(":-") {
            Some((name, default)) => (name, Some(default)),
            None => (expr, None),
        };
        let valid_name = !name.is_empty()
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !name.starts_with(|c: char| c.is_ascii_digit());
        if !valid_name {
            return Err(ExpandError::BadName);
        }
        match (env(name), default) {
            (Some(v), Some(d)) if v.is_empty() => out.push_str(d),
            (Some(v), _) => out.push_str(&v),
            (None, Some(d)) => out.push_str(d),
            (None, None) => return Err(ExpandError::Unset(name.to_owned())),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

// ---- rules that span several keys -----------------------------------------------------------

/// What an operator whose file relied on the Fly defaults, which no longer exist, adds.
const NO_BACKENDS: &str = "not set, nor backends.backup: there is no default. List the DNS names that resolve to the cluster's nodes, or the nodes in backends.backup (HOST:PORT). On Fly, add under [backends]: dns_names = [\"${PRIMARY_REGION}.${FLY_APP_NAME}.internal\"] and backup = [\"[${PG_LISTEN_ADDRESS}]:5433\"]";

impl File {
    /// `written` are the keys the file sets. Rules that do not depend on each other are all
    /// checked, so their errors come together.
    fn validate(self, written: &Written) -> Result<Config, ConfigError> {
        let File {
            listen,
            listeners,
            backends,
            check,
            mut proxy,
            mut admin,
            reload,
        } = self;
        let mut errors = Vec::new();
        let names_written = ["dns_names", "backup"]
            .iter()
            .any(|key| written.backends.iter().any(|k| k == key));
        if !names_written {
            errors.push(invalid("backends.dns_names", NO_BACKENDS));
        }
        let check = check
            .for_kind(&written.check, &backends)
            .map_err(|e| errors.push(e));
        let listeners = validate_listeners(listeners, &listen).map_err(|e| errors.push(e));
        if let Err(e) = admin.read_token_file() {
            errors.push(e);
        }
        let (Ok(check), Ok(listeners), true) = (check, listeners, errors.is_empty()) else {
            return Err(ConfigError::Invalid(errors));
        };
        if proxy.switchover_grace.is_zero() {
            // A planned switchover waits one check interval plus this grace between fencing
            // and demoting the leader (`docs/how-it-works.md`, "Planned switchovers"); at least a second,
            // so ordinary transactions finish however short the interval.
            proxy.switchover_grace = (check.interval / 2).max(MIN_SWITCHOVER_GRACE);
        }
        Ok(Config {
            listen,
            listeners,
            backends,
            check,
            proxy,
            admin,
            reload,
        })
    }
}

/// Names each listener, refuses an address bound twice, and reads `serves`, `fallback` and
/// `target` together.
fn validate_listeners(
    written: Vec<WrittenListener>,
    listen: &ListenConfig,
) -> Result<Vec<ListenerConfig>, KeyError> {
    // Every address is bound once; the first user of each is remembered for the message.
    let mut used: Vec<(SocketAddr, String)> = listen
        .addresses
        .iter()
        .enumerate()
        .map(|(i, a)| (*a, format!("listen.addresses[{i}]")))
        .collect();
    let mut names = vec!["leader".to_string()];
    let mut listeners = Vec::new();
    for (i, l) in written.into_iter().enumerate() {
        let key = |field: &str| format!("listeners[{i}].{field}");
        let name = match &l.name {
            Some(name) => name.trim().to_string(),
            None => format!("listener-{}", i + 1),
        };
        if name.is_empty() {
            return Err(invalid(&key("name"), "must not be empty"));
        }
        if names.contains(&name) {
            return Err(invalid(
                &key("name"),
                format!("{name:?} is already used (\"leader\" names [listen])"),
            ));
        }
        names.push(name.clone());
        for (j, addr) in l.addresses.iter().enumerate() {
            let here = format!("listeners[{i}].addresses[{j}]");
            if let Some((_, first)) = used.iter().find(|(a, _)| a == addr && addr.port() != 0) {
                return Err(invalid(&here, format!("{addr} is already used by {first}")));
            }
            used.push((*addr, here));
        }
        let serves = match (l.serves, l.fallback, l.target) {
            (Some(_), _, Some(_)) => {
                return Err(invalid(
                    &key("target"),
                    "a listener with a fixed target serves nothing else; remove serves",
                ))
            }
            (None | Some(ServesWritten::Leader), Some(_), _) => {
                return Err(invalid(
                    &key("fallback"),
                    "only used with serves = \"replica\"",
                ))
            }
            (None, None, Some(target)) => Serves::Target(target),
            (None | Some(ServesWritten::Leader), None, None) => Serves::Leader,
            (Some(ServesWritten::Replica), fallback, None) => Serves::Replica {
                fallback_to_leader: fallback == Some(Fallback::Leader),
            },
        };
        listeners.push(ListenerConfig {
            name,
            addresses: l.addresses,
            serves,
        });
    }
    Ok(listeners)
}

/// Reads the PEM certificates in `path` that a node's chain must end in. The error says why
/// in words for a configuration error.
pub fn read_root_certs(path: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {path}: {e}"))?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{path} is not a PEM certificate file: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{path} holds no PEM certificate"));
    }
    let mut store = RootCertStore::empty();
    for cert in &certs {
        store
            .add(cert.clone())
            .map_err(|e| format!("{path}: a certificate that cannot be a root: {e}"))?;
    }
    Ok(certs)
}

/// Whether `name` can be verified in a certificate: a DNS name or an IP address.
pub fn server_name(name: &str) -> Result<ServerName<'static>, String> {
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(ServerName::IpAddress(ip.into()));
    }
    ServerName::try_from(name.to_owned()).map_err(|_| format!("{name:?} is not a DNS name"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fly_env(name: &str) -> Option<String> {
        match name {
            "PRIMARY_REGION" => Some("iad".into()),
            "FLY_APP_NAME" => Some("app".into()),
            "PG_LISTEN_ADDRESS" => Some("fdaa::7".into()),
            "EMPTY" => Some(String::new()),
            "CHECK_PASSWORD" => Some("s3cret".into()),
            _ => None,
        }
    }

    /// The cluster's name, added to a fragment that names no backends (after the fragment,
    /// so its line numbers stay those of the fragment).
    const NAMES: &str = "dns_names = [\"iad.app.internal\"]";

    fn parse(text: &str) -> Result<Config, ConfigError> {
        let text = if text.contains("dns_names") || text.contains("backup") {
            text.to_owned()
        } else if text.contains("[backends]\n") {
            text.replacen("[backends]\n", &format!("[backends]\n{NAMES}\n"), 1)
        } else {
            format!("{text}\n[backends]\n{NAMES}\n")
        };
        Config::parse(&text, &fly_env)
    }

    fn error(text: &str) -> String {
        match parse(text) {
            Ok(_) => panic!("expected an error for {text:?}"),
            Err(e) => e.to_string(),
        }
    }

    /// A file that names no backends was the Fly configuration when its defaults named
    /// environment variables; now it is refused, with the lines to add.
    #[test]
    fn a_file_without_backends_is_refused_with_the_fly_lines_to_copy() {
        for text in ["", "[backends]\nport = 5433", "[check]\ninterval = \"2s\""] {
            let message = match Config::parse(text, &|_| None) {
                Ok(_) => panic!("{text:?} names no backends"),
                Err(e) => e.to_string(),
            };
            assert!(
                message.starts_with("backends.dns_names: not set, nor backends.backup"),
                "{text:?}: {message}"
            );
            for line in [
                "dns_names = [\"${PRIMARY_REGION}.${FLY_APP_NAME}.internal\"]",
                "backup = [\"[${PG_LISTEN_ADDRESS}]:5433\"]",
            ] {
                assert!(message.contains(line), "{text:?}: {message}");
            }
        }
    }

    /// The defaults name no environment variable and no Fly address: a file with one name
    /// runs anywhere, with nothing in the environment.
    #[test]
    fn the_defaults_work_anywhere() {
        let c = Config::parse("[backends]\ndns_names = [\"pg.cluster.test\"]", &|_| None)
            .expect("valid with no environment variable set");
        assert_eq!(c.listen.addresses.len(), 2);
        assert_eq!(c.backends.dns_names, vec!["pg.cluster.test"]);
        assert_eq!(c.backends.port, 5433);
        assert!(c.backends.nameservers.is_empty(), "the system resolver");
        assert!(c.backends.backup.is_empty());
        assert_eq!(c.backends.prefer, IpFamily::Ipv6);
        assert_eq!(c.backends.max, 10);
        assert_eq!(c.backends.resolve_interval, Duration::from_secs(1));
        assert_eq!(c.check.port, 5500);
        assert_eq!(c.check.path, "/flycheck/role");
        assert_eq!(c.check.interval, Duration::from_secs(1));
        assert_eq!(c.check.fast_interval, Duration::from_millis(100));
        assert_eq!(c.check.timeout, Duration::from_secs(5));
        assert_eq!(c.check.contest_hold, Duration::from_secs(4));
        assert_eq!(c.check.liveness_window, Duration::from_secs(2));
        assert_eq!(c.check.leader, vec!["leader", "primary"]);
        assert_eq!(c.proxy.connect_timeout, Duration::from_secs(4));
        assert_eq!(c.proxy.connect_retries, 2);
        assert_eq!(c.proxy.idle_timeout, Duration::from_secs(30 * 60));
        assert_eq!(c.proxy.silent_timeout, Duration::from_secs(5));
        assert_eq!(c.proxy.half_close_timeout, Duration::from_secs(10));
        assert_eq!(c.proxy.max_connections, 1000);
        assert_eq!(c.proxy.leader_wait, Duration::from_secs(10));
        assert_eq!(c.proxy.switchover, Switchover::Transaction);
        assert_eq!(c.proxy.switchover_grace, Duration::from_secs(1));
        assert_eq!(c.admin.address, Some("[::]:8404".parse().unwrap()));
        assert_eq!(c.cluster_name(), "pg.cluster.test");
        assert_eq!(c.cannot_route(), None);
        let printed = toml::to_string(&c).expect("serializes");
        for fly in ["${", "fdaa", "FLY"] {
            assert!(!printed.contains(fly), "{fly}: {printed}");
        }
    }

    /// Both lists written empty is valid (a file may be filled in later) but cannot route,
    /// which `roleproxy check` warns about.
    #[test]
    fn no_names_and_no_backups_cannot_route() {
        let c = parse("[backends]\ndns_names = []\nbackup = []").expect("valid");
        let why = c.cannot_route().expect("cannot route");
        assert!(
            why.contains("backends.dns_names") && why.contains("backends.backup"),
            "{why}"
        );
        let only_backup = parse("[backends]\ndns_names = []\nbackup = [\"pg-a.test:5432\"]");
        assert_eq!(only_backup.expect("valid").cannot_route(), None);
    }

    /// A missing variable, an unknown key and a bad value, in three sections: all three in one
    /// run, each with its key and line, in the order of the file.
    #[test]
    fn every_error_is_reported_at_once() {
        let text = "[backends]\ndns_names = [\"${PRIMARY_REGION}.${FLY_APP_NAME}.internal\"]\n\
                    backup = [\"[${PG_LISTEN_ADDRESS}]:5433\"]\n\
                    [check]\nintervall = \"2s\"\ntimeout = \"soon\"\n\
                    [[listeners]]\naddresses = [\"nowhere\"]\ntarget = \"pg-a.test:5432\"\n\
                    [proxy]\ncopy = \"zero\"\n";
        let errors = match Config::parse(text, &|_| None) {
            Err(ConfigError::Invalid(errors)) => errors,
            other => panic!("expected key errors, got {other:?}"),
        };
        let got: Vec<(&str, usize)> = errors
            .iter()
            .map(|e| (e.key.as_str(), e.at.map_or(0, |a| a.line)))
            .collect();
        assert_eq!(
            got,
            [
                ("backends.dns_names[0]", 2),
                ("backends.backup[0]", 3),
                ("check.intervall", 5),
                ("check.timeout", 6),
                ("listeners[0].addresses[0]", 8),
                ("proxy.copy", 11),
            ],
            "{errors:#?}"
        );
        let message = ConfigError::Invalid(errors).to_string();
        let lines: Vec<&str> = message.lines().collect();
        assert_eq!(lines.len(), 6, "one error a line: {message}");
        for (line, words) in lines.iter().zip([
            &[
                "PRIMARY_REGION is not set",
                "${PRIMARY_REGION:-default}",
                "(line 2, column",
            ][..],
            &["PG_LISTEN_ADDRESS is not set", "(line 3, column"],
            &["did you mean `interval`?", "(line 5, column"],
            &["bad duration", "(line 6, column"],
            &["bad address", "(line 8, column"],
            &["\"auto\"", "(line 11, column"],
        ]) {
            for word in words {
                assert!(line.contains(word), "{line:?} should say {word:?}");
            }
        }
        // The rules between keys come together too, each at its line.
        let text = "[check]\nkind = \"http-status\"\npath = \"/x\"\n\
                    [[listeners]]\naddresses = [\"0.0.0.0:5434\"]\nfallback = \"leader\"\n";
        let errors = match Config::parse(text, &|_| None) {
            Err(ConfigError::Invalid(errors)) => errors,
            other => panic!("expected key errors, got {other:?}"),
        };
        let got: Vec<(&str, Option<usize>)> = errors
            .iter()
            .map(|e| (e.key.as_str(), e.at.map(|a| a.line)))
            .collect();
        assert_eq!(
            got,
            [
                ("check.path", Some(3)),
                ("listeners[0].fallback", Some(6)),
                ("backends.dns_names", None),
            ],
            "{errors:#?}"
        );
    }

    #[test]
    fn addresses_to_connect_to_may_be_names() {
        // (written, read, or the words of its error)
        let rows: &[(&str, Result<&str, &str>)] = &[
            ("10.0.0.1:5433", Ok("10.0.0.1:5433")),
            ("[fdaa::7]:5433", Ok("[fdaa::7]:5433")),
            ("[10.0.0.1]:5433", Ok("10.0.0.1:5433")),
            ("pg-a.cluster.test:5432", Ok("pg-a.cluster.test:5432")),
            (" localhost:8404 ", Ok("localhost:8404")),
            ("pg-a.cluster.test", Err("expected HOST:PORT")),
            ("pg-a:port", Err("expected HOST:PORT")),
            ("pg a:5432", Err("expected HOST:PORT")),
            ("a..b:5432", Err("expected HOST:PORT")),
            ("fdaa::7:5433", Err("in brackets")),
            ("pg-a.test:70000", Err("expected HOST:PORT")),
            ("10.0.0.300:5432", Err("expected HOST:PORT")),
        ];
        for (written, expected) in rows {
            match (written.parse::<Endpoint>(), expected) {
                (Ok(e), Ok(shown)) => assert_eq!(e.to_string(), *shown, "{written}"),
                (Err(e), Err(words)) => assert!(e.contains(words), "{written}: {e}"),
                (got, _) => panic!("{written}: {got:?}"),
            }
        }
        let c = parse(
            "[backends]\nbackup = [\"pg-a.cluster.test:5432\", \"10.0.0.1:5432\"]\n\
             [[listeners]]\naddresses = [\"0.0.0.0:5434\"]\ntarget = \"localhost:5433\"",
        )
        .expect("valid");
        assert_eq!(
            c.backends.backup[0],
            Endpoint::Name {
                host: "pg-a.cluster.test".into(),
                port: 5432
            }
        );
        let printed = toml::to_string(&c).expect("serializes");
        assert!(printed.contains("\"pg-a.cluster.test:5432\""), "{printed}");
        let again = parse(&printed).expect("parses back");
        assert_eq!(
            (&again.backends, &again.listeners),
            (&c.backends, &c.listeners)
        );
        let keys: Vec<(String, &str)> = c.names();
        assert_eq!(
            keys,
            [
                ("backends.backup[0]".to_string(), "pg-a.cluster.test"),
                ("listeners[0].target".to_string(), "localhost"),
            ]
        );
        let message = error("[backends]\nbackup = [\"pg-a.cluster.test:0\"]");
        assert!(message.contains("backends.backup[0]: port 0"), "{message}");
    }

    #[test]
    fn switchover_grace_follows_the_check_interval_unless_set() {
        let c = parse("[check]\ninterval = \"5s\"").expect("valid");
        assert_eq!(c.proxy.switchover_grace, Duration::from_millis(2500));
        let c = parse("[check]\ninterval = \"5s\"\n[proxy]\nswitchover_grace = \"30s\"")
            .expect("valid");
        assert_eq!(c.proxy.switchover_grace, Duration::from_secs(30));
        let c = parse("[proxy]\nswitchover = \"immediate\"").expect("valid");
        assert_eq!(c.proxy.switchover, Switchover::Immediate);
    }

    /// The shipped file reproduces the Fly HAProxy setup, every Fly value written out.
    #[test]
    fn shipped_proxy_toml_is_valid() {
        let text = include_str!("../proxy.toml");
        let c = parse(text).expect("proxy.toml is valid");
        assert_eq!(c.backends.dns_names, vec!["iad.app.internal"]);
        assert_eq!(
            c.backends.nameservers,
            vec!["[fdaa::3]:53".parse::<SocketAddr>().unwrap()]
        );
        assert_eq!(c.backends.backup, vec!["[fdaa::7]:5433".parse().unwrap()]);
        assert!(
            c.proxy.shutdown_grace < Duration::from_secs(5),
            "within the Fly supervisor's 5 s"
        );
    }

    #[test]
    fn expansion() {
        let env = fly_env;
        assert_eq!(expand("a${PRIMARY_REGION}b", &env).unwrap(), "aiadb");
        assert_eq!(expand("${NOPE:-x}", &env).unwrap(), "x");
        assert_eq!(expand("${EMPTY:-x}", &env).unwrap(), "x");
        assert_eq!(expand("${EMPTY}", &env).unwrap(), "");
        assert_eq!(expand("${NOPE:-}", &env).unwrap(), "");
        assert_eq!(expand("no vars", &env).unwrap(), "no vars");
        assert_eq!(
            expand("${NOPE}", &env),
            Err(ExpandError::Unset("NOPE".into()))
        );
        assert_eq!(expand("${OPEN", &env), Err(ExpandError::Unterminated));
        assert_eq!(expand("${9X}", &env), Err(ExpandError::BadName));
    }

    #[test]
    fn bracketed_ipv4_is_accepted() {
        assert_eq!(
            parse_socket_addr("[127.0.0.1]:5433"),
            Some("127.0.0.1:5433".parse().unwrap())
        );
        assert_eq!(
            parse_socket_addr("[::1]:1"),
            Some("[::1]:1".parse().unwrap())
        );
        assert_eq!(parse_socket_addr("localhost:1"), None);
        assert_eq!(
            "localhost:1".parse::<Endpoint>(),
            Ok(Endpoint::Name {
                host: "localhost".into(),
                port: 1
            })
        );
    }

    /// Each row: a config fragment and words the error must contain (the key and the reason).
    #[test]
    fn errors_name_the_key() {
        let rows: &[(&str, &[&str])] = &[
            ("[listen]\nport = 1", &["listen.port", "unknown key"]),
            ("[bogus]\n", &["bogus", "unknown key", "check, proxy"]),
            (
                "[check]\nintervall = \"2s\"",
                &["check.intervall", "did you mean `interval`?"],
            ),
            (
                "[check]\ninterval = \"2 parsecs\"",
                &["check.interval", "bad duration"],
            ),
            (
                "[check]\ninterval = \"0s\"",
                &["check.interval", "greater than zero"],
            ),
            (
                "[check]\ntimeout = \"\"",
                &["check.timeout", "bad duration"],
            ),
            (
                "[proxy]\nleader_wait = \"soon\"",
                &["proxy.leader_wait", "bad duration"],
            ),
            (
                "[proxy]\nsilent_timeout = \"0s\"",
                &["proxy.silent_timeout", "greater than zero"],
            ),
            (
                "[proxy]\nsilent_timeout = \"a while\"",
                &["proxy.silent_timeout", "bad duration"],
            ),
            (
                "[proxy]\nhalf_close_timeout = \"0ms\"",
                &["proxy.half_close_timeout", "greater than zero"],
            ),
            (
                "[proxy]\nhalf_close_timeout = \"400days\"",
                &["proxy.half_close_timeout", "limit of 365 days"],
            ),
            (
                "[listen]\naddresses = []",
                &["listen.addresses", "at least one"],
            ),
            (
                "[listen]\naddresses = [\"nowhere\"]",
                &["listen.addresses[0]", "bad address"],
            ),
            (
                "[listen]\naddresses = [\"1.2.3.4:99999\"]",
                &["listen.addresses[0]"],
            ),
            (
                "[admin]\naddress = \"8404\"",
                &["admin.address", "bad address"],
            ),
            (
                "[backends]\nnameservers = [\"dns\"]",
                &["backends.nameservers[0]"],
            ),
            (
                "[backends]\nbackup = [\"[${NOPE}]:5433\"]",
                &["backends.backup[0]", "NOPE"],
            ),
            (
                "[backends]\ndns_names = [\"${MISSING}.x\"]",
                &["backends.dns_names[0]", "MISSING is not set"],
            ),
            (
                "[backends]\ndns_names = [\"a..b\"]",
                &["backends.dns_names[0]", "bad DNS name"],
            ),
            (
                "[backends]\nprefer = \"ipv5\"",
                &["backends.prefer", "ipv5"],
            ),
            ("[backends]\nmax = 0", &["backends.max"]),
            ("[backends]\nport = \"x\"", &["backends.port", "found the text \"x\"; expected a whole number from 0 to 65535"]),
            ("[check]\nleader = []", &["check.leader", "at least one"]),
            (
                "[check]\npath = \"flycheck\"",
                &["check.path", "starting with"],
            ),
            (
                "[check]\npath = \"/fly check\"",
                &["check.path", "URL path"],
            ),
            (
                "[proxy]\nidle_timeout = \"500000000000y\"",
                &["proxy.idle_timeout"],
            ),
            (
                "[check]\nfast_interval = \"1ns\"",
                &["check.fast_interval", "minimum"],
            ),
            (
                "[backends]\nbackup = [\"127.0.0.1:0\"]",
                &["backends.backup[0]", "port 0"],
            ),
            (
                "[proxy]\nidle_timeout = \"400days\"",
                &["proxy.idle_timeout", "limit of 365 days"],
            ),
            ("[check]\nrise = 0", &["check.rise"]),
            ("[check]\nfall = 0", &["check.fall"]),
            ("[proxy]\nmax_connections = 0", &["proxy.max_connections"]),
            ("[proxy]\nconnect_retries = -1", &["connect_retries"]),
            (
                "[proxy]\ncopy = \"zero\"",
                &["proxy.copy", "expected \"auto\", \"splice\" or \"buffered\""],
            ),
            (
                "[proxy]\nswitchover = \"later\"",
                &["proxy.switchover", "transaction", "immediate"],
            ),
            (
                "[proxy]\nswitchover_grace = \"soon\"",
                &["proxy.switchover_grace"],
            ),
            ("[proxy]\nthreads = 5000", &["proxy.threads", "at most 1024"]),
            ("not toml at all", &["TOML parse error"]),
            ("[check]\nkind = \"tcp\"", &["check.kind", "http-status"]),
            (
                "[check]\nkind = \"http-status\"\npath = \"/x\"",
                &["check.path", "only used with", "http-body"],
            ),
            (
                "[check]\nleader_path = \"/primary\"",
                &["check.leader_path", "only used with", "http-status"],
            ),
            (
                "[check]\nkind = \"http-status\"\nuser = \"x\"",
                &["check.user", "postgres"],
            ),
            (
                "[check]\nkind = \"http-status\"\nreplica_path = \"replica\"",
                &["check.replica_path", "starting with"],
            ),
            (
                "[check]\nsplit_brain = \"highest-timeline\"",
                &["check.split_brain", "check.kind = \"postgres\""],
            ),
            (
                "[check]\nkind = \"postgres\"\nsplit_brain = \"newest\"",
                &["check.split_brain", "newest"],
            ),
            (
                "[check]\nkind = \"postgres\"\npassword = \"${PGPASS}\"",
                &["check.password", "PGPASS is not set"],
            ),
            (
                "[check]\nkind = \"postgres\"\nport = 5432",
                &["check.port", "own address"],
            ),
            (
                "[check]\nkind = \"postgres\"\npassword = \"hunter22\"",
                &["check.password", "${VAR}", "check.password_file"],
            ),
            (
                "[check]\npassword_file = \"/x\"",
                &["check.password_file", "only used with", "postgres"],
            ),
            (
                "[check]\nkind = \"postgres\"\npassword_file = \"/nonexistent/pw\"",
                &["check.password_file", "cannot read /nonexistent/pw"],
            ),
            (
                "[check]\nkind = \"postgres\"\ntls = \"prefer\"",
                &["check.tls", "\"disable\", \"require\" or \"verify-full\""],
            ),
            (
                "[check]\nkind = \"postgres\"\ntls_root_cert = \"/ca.pem\"",
                &["check.tls_root_cert", "only used with check.tls = \"verify-full\""],
            ),
            (
                "[check]\nkind = \"postgres\"\ntls = \"require\"\ntls_root_cert = \"/ca.pem\"",
                &["check.tls_root_cert", "verifies no certificate"],
            ),
            (
                "[check]\nkind = \"postgres\"\ntls_server_name = \"db\"",
                &["check.tls_server_name", "only used with"],
            ),
            (
                "[check]\nkind = \"postgres\"\ntls = \"verify-full\"",
                &["check.tls_root_cert", "needed with check.tls = \"verify-full\""],
            ),
            (
                "[check]\nkind = \"postgres\"\ntls = \"verify-full\"\ntls_root_cert = \"/nonexistent/ca.pem\"",
                &["check.tls_root_cert", "cannot read /nonexistent/ca.pem"],
            ),
            (
                "[backends]\ndns_names = []\nbackup = [\"10.0.0.1:5433\"]\n[check]\nkind = \"postgres\"\ntls = \"verify-full\"\ntls_root_cert = \"/ca.pem\"",
                &["check.tls_server_name", "backends.dns_names is empty"],
            ),
            (
                "[check]\nkind = \"postgres\"\ntls = \"require\"\ntls_server_name = \"a b\"",
                &["check.tls_server_name", "not a DNS name"],
            ),
            (
                "[proxy]\nmax_connections = 4611686018427387904",
                &["proxy.max_connections", "at most 1000000"],
            ),
            (
                "[admin]\nallow_changes = \"yes\"",
                &["admin.allow_changes", "true or false"],
            ),
            (
                "[admin]\nmetrics_expiry = \"often\"",
                &["admin.metrics_expiry", "bad duration"],
            ),
            ("[reload]\nforce = \"yes\"", &["reload.force", "true or false"]),
            (
                "[[listeners]]\nname = \"r\"",
                &["listeners[0]", "missing its key `addresses`"],
            ),
            (
                "[[listeners]]\naddresses = []",
                &["listeners[0].addresses", "at least one"],
            ),
            (
                "[[listeners]]\naddresses = [\"0.0.0.0:5432\"]",
                &["listeners[0].addresses[0]", "already used by listen.addresses[0]"],
            ),
            (
                "[[listeners]]\nname = \"leader\"\naddresses = [\"0.0.0.0:5434\"]",
                &["listeners[0].name", "already used"],
            ),
            (
                "[[listeners]]\naddresses = [\"0.0.0.0:5434\"]\nserves = \"standby\"",
                &["listeners[0].serves", "(or set target), got \"standby\""],
            ),
            (
                "[[listeners]]\naddresses = [\"0.0.0.0:5434\"]\nfallback = \"leader\"",
                &["listeners[0].fallback", "replica"],
            ),
            (
                "[[listeners]]\naddresses = [\"0.0.0.0:5434\"]\nserves = \"replica\"\nfallback = \"primary\"",
                &["listeners[0].fallback", "primary"],
            ),
            (
                "[[listeners]]\naddresses = [\"0.0.0.0:5434\"]\ntarget = \"10.0.0.1:5433\"\nserves = \"leader\"",
                &["listeners[0].target", "remove serves"],
            ),
            (
                "[[listeners]]\naddresses = [\"0.0.0.0:5434\"]\ntarget = \"10.0.0.1:0\"",
                &["listeners[0].target", "port 0"],
            ),
            (
                "[[listeners]]\naddresses = [\"0.0.0.0:5434\"]\ntarget = \"[${NOPE}]:5433\"",
                &["listeners[0].target", "NOPE"],
            ),
            (
                "[[listeners]]\naddresses = [\"0.0.0.0:5434\"]\nport = 1",
                &["listeners[0].port", "unknown key", "target"],
            ),
            (
                "[check]\ninterval = 2",
                &["check.interval", "write \"2s\"", "line 2, column 12"],
            ),
            (
                "[proxy]\nmax_connections = \"ten\"",
                &["proxy.max_connections", "found the text \"ten\"; expected a whole number, 0 or more"],
            ),
            (
                "[check]\nfall = -1",
                &["check.fall", "found the number -1; expected a whole number, 0 or more"],
            ),
            (
                "[check]\nleader = \"leader\"",
                &["check.leader", "write leader = [\"leader\"]"],
            ),
            ("check = 3", &["check", "write [check] on a line of its own"]),
            (
                "[[listeners]]\nname = \"x\"",
                &["listeners[0]", "missing its key `addresses`"],
            ),
            (
                "[proxy]\nidle_timeout = 1.5",
                &["proxy.idle_timeout", "a duration in quotes"],
            ),
        ];
        for (text, words) in rows {
            let message = error(text);
            for word in *words {
                assert!(
                    message.contains(word),
                    "error for {text:?} should mention {word:?}: {message}"
                );
            }
        }
    }

    /// Every key of the printed defaults, given a value of another type, is named with its
    /// section, and the reason speaks of values as they are written, not of Rust types.
    #[test]
    fn wrong_types_are_explained_in_user_terms() {
        let defaults = toml::to_string(&parse("").expect("defaults are valid")).expect("printable");
        let defaults: toml::Table = toml::from_str(&defaults).expect("printed defaults parse");
        let jargon = [
            "usize",
            "u16",
            "u32",
            "u64",
            "struct ",
            "sequence",
            "invalid type",
            "invalid value",
            "unknown field",
            "a map",
        ];
        let mut checked = 0;
        for (section, keys) in &defaults {
            let Some(keys) = keys.as_table() else {
                continue;
            };
            for key in keys.keys() {
                for wrong in ["2", "\"x\"", "true", "1.5", "{ a = 1 }"] {
                    let text = format!("[{section}]\n{key} = {wrong}");
                    let Err(e) = parse(&text) else { continue };
                    let message = e.to_string();
                    assert!(
                        message.starts_with(&format!("{section}.{key}")),
                        "{text:?} should name {section}.{key}: {message}"
                    );
                    for word in jargon {
                        assert!(!message.contains(word), "{text:?} says {word:?}: {message}");
                    }
                    checked += 1;
                }
            }
        }
        assert!(checked > 50, "only {checked} wrong values were tried");
    }

    #[test]
    fn admin_can_be_disabled_and_values_override_defaults() {
        let c = parse(
            "[admin]\naddress = \"\"\n[backends]\ndns_names = [\"${X:-db}.internal\"]\nprefer = \"ipv4\"\n[check]\nleader = [\" Primary \"]",
        )
        .expect("valid");
        assert_eq!(c.admin.address, None);
        assert_eq!(c.backends.dns_names, vec!["db.internal"]);
        assert_eq!(c.backends.prefer, IpFamily::Ipv4);
        assert_eq!(c.check.leader, vec!["primary"]);
    }

    #[test]
    fn check_kinds_have_their_own_defaults() {
        let body = parse("").expect("valid");
        assert_eq!(body.check.kind, CheckKind::HttpBody);
        assert_eq!(body.check.split_brain, SplitBrain::None);
        let patroni = parse("[check]\nkind = \"http-status\"").expect("valid");
        assert_eq!(patroni.check.port, 8008, "Patroni's REST API port");
        assert_eq!(patroni.check.leader_path, "/primary");
        assert_eq!(patroni.check.replica_path, "/replica");
        let pg = parse(
            "[backends]\nport = 6432\n[check]\nkind = \"postgres\"\nsplit_brain = \"highest-timeline\"",
        )
        .expect("valid");
        assert_eq!(pg.check.port, 6432, "the Postgres port clients use");
        assert_eq!(
            (pg.check.user.as_str(), pg.check.database.as_str()),
            ("postgres", "postgres")
        );
        assert_eq!(pg.check.split_brain, SplitBrain::HighestTimeline);
        let text = toml::to_string(
            &parse("[check]\nkind = \"postgres\"\npassword = \"${CHECK_PASSWORD}\"")
                .expect("valid"),
        )
        .expect("serializes");
        assert!(
            !text.contains("s3cret"),
            "the password is never printed: {text}"
        );
        let refused = parse("[check]\nkind = \"postgres\"\npassword = \"s3cret${\"").map(|_| ());
        let message = refused.expect_err("unterminated").to_string();
        assert!(
            message.contains("check.password") && !message.contains("s3cret"),
            "{message}"
        );
        let forced = parse("[reload]\nforce = true").expect("valid");
        assert!(forced.reload.force && !parse("").expect("valid").reload.force);
        let debug = format!(
            "{:?}",
            parse("[check]\nkind = \"postgres\"\npassword = \"${CHECK_PASSWORD}\"").expect("valid")
        );
        assert!(!debug.contains("s3cret"), "{debug}");
    }

    /// The check's password is never written in the file: it comes from the environment, as
    /// `${VAR}` references and nothing else, or from `check.password_file`.
    #[test]
    fn the_check_password_comes_from_the_environment_or_a_file() {
        let postgres =
            |password: &str| format!("[check]\nkind = \"postgres\"\npassword = {password}");
        for written in [
            "\"hunter22\"",
            "'hunter22'",
            "\"${CHECK_PASSWORD:-hunter22}\"",
            "\"x${CHECK_PASSWORD}\"",
        ] {
            let message = error(&postgres(written));
            assert!(
                message.starts_with("check.password: a password written in the file is refused"),
                "{written}: {message}"
            );
            assert!(!message.contains("hunter22"), "{message}");
        }
        for (written, expected) in [
            ("\"${CHECK_PASSWORD}\"", "s3cret"),
            ("\"${CHECK_PASSWORD}${EMPTY}\"", "s3cret"),
            ("\"${NOPE:-}\"", ""),
            ("\"\"", ""),
        ] {
            let config = parse(&postgres(written)).expect(written);
            assert_eq!(config.check.password.0, expected, "{written}");
        }

        let dir = std::env::temp_dir().join(format!("roleproxy-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a temporary directory");
        let file = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).expect("write the password file");
            path.display().to_string()
        };
        let from_file = |path: &str| {
            parse(&format!(
                "[check]\nkind = \"postgres\"\npassword_file = {path:?}"
            ))
        };
        for (name, text, expected) in [
            ("lf", "s3cret\n", "s3cret"),
            ("crlf", "s3cret\r\n", "s3cret"),
            ("bare", "s3cret", "s3cret"),
            ("spaces", " s3 cret \n\n", " s3 cret \n"),
        ] {
            let config = from_file(&file(name, text)).expect(name);
            assert_eq!(config.check.password.0, expected, "{name}");
            let printed = toml::to_string(&config).expect("serializes");
            assert!(!printed.contains("s3"), "{printed}");
            let again = parse(&printed).expect("the printed configuration parses");
            assert_eq!(again.check, config.check, "{printed}");
        }
        let empty = file("empty", "\n");
        let message = from_file(&empty)
            .map(|_| ())
            .expect_err("empty")
            .to_string();
        assert!(
            message.starts_with("check.password_file") && message.contains("is empty"),
            "{message}"
        );
        let both = format!(
            "[check]\nkind = \"postgres\"\npassword = \"${{CHECK_PASSWORD}}\"\npassword_file = {:?}",
            file("both", "x")
        );
        let message = error(&both);
        assert!(
            message.starts_with("check.password_file") && message.contains("not both"),
            "{message}"
        );
        let not_pem = file("not-pem", "-----BEGIN CERTIFICATE-----\nnot base64\n");
        let message = error(&format!(
            "[check]\nkind = \"postgres\"\ntls = \"verify-full\"\ntls_root_cert = {not_pem:?}"
        ));
        assert!(
            message.starts_with("check.tls_root_cert") && message.contains("PEM"),
            "{message}"
        );
        let no_cert = file("no-cert", "hello\n");
        let message = error(&format!(
            "[check]\nkind = \"postgres\"\ntls = \"verify-full\"\ntls_root_cert = {no_cert:?}"
        ));
        assert!(message.contains("holds no PEM certificate"), "{message}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_check_tls_server_name_defaults_to_the_shared_dns_name() {
        let c = parse("[backends]\ndns_names = [\"iad.app.internal.\", \"app.internal\"]\n[check]\nkind = \"postgres\"\ntls = \"require\"")
            .expect("valid");
        assert_eq!(c.check.tls, CheckTls::Require);
        assert_eq!(c.check.tls_server_name, "iad.app.internal");
        let c = parse(
            "[check]\nkind = \"postgres\"\ntls = \"require\"\ntls_server_name = \"10.0.0.1\"",
        )
        .expect("valid");
        assert_eq!(c.check.tls_server_name, "10.0.0.1");
        let c = parse("[backends]\ndns_names = []\nbackup = [\"10.0.0.1:5433\"]\n[check]\nkind = \"postgres\"\ntls = \"require\"")
            .expect("require needs no name: it verifies nothing");
        assert_eq!(c.check.tls_server_name, "");
        assert_eq!(
            parse("[check]\nkind = \"postgres\"")
                .expect("valid")
                .check
                .tls,
            CheckTls::Disable
        );
    }

    #[test]
    fn listeners_by_role() {
        let c = parse(
            "[[listeners]]\nname = \"replicas\"\naddresses = [\"[::]:5001\"]\nserves = \"replica\"\nfallback = \"leader\"\n\
             [[listeners]]\naddresses = [\"0.0.0.0:5433\"]\ntarget = \"[${PG_LISTEN_ADDRESS}]:5433\"\n\
             [[listeners]]\nname = \"ro\"\naddresses = [\"0.0.0.0:5002\"]\nserves = \"replica\"",
        )
        .expect("valid");
        let all = c.all_listeners();
        let names: Vec<&str> = all.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["leader", "replicas", "listener-2", "ro"]);
        assert_eq!(all[0].serves, Serves::Leader);
        assert_eq!(
            all[1].serves,
            Serves::Replica {
                fallback_to_leader: true
            }
        );
        assert_eq!(
            all[2].serves,
            Serves::Target("[fdaa::7]:5433".parse().unwrap())
        );
        assert_eq!(
            all[3].serves,
            Serves::Replica {
                fallback_to_leader: false
            }
        );
        assert!(
            !c.admin.allow_changes,
            "state-changing admin requests are off by default"
        );
    }

    #[test]
    fn printed_listeners_parse_back_the_same() {
        let written = "[[listeners]]\nname = \"r\"\naddresses = [\"[::]:5001\"]\nserves = \"replica\"\nfallback = \"leader\"\n\
             [[listeners]]\nname = \"local\"\naddresses = [\"0.0.0.0:5433\"]\ntarget = \"10.0.0.7:5433\"\n";
        let c = parse(written).expect("valid");
        let printed = toml::to_string(&c).expect("serializes");
        let again = parse(&printed).expect("the printed configuration parses");
        assert_eq!(again.listeners, c.listeners, "{printed}");
        assert_eq!(again.check, c.check, "{printed}");
    }

    #[test]
    fn effective_config_serializes() {
        let c = parse("").expect("valid");
        let text = toml::to_string(&c).expect("serializes");
        assert!(text.contains("interval = \"1s\""), "{text}");
        assert!(text.contains("idle_timeout = \"30m\""), "{text}");
    }

    #[test]
    fn server_names() {
        assert!(matches!(
            server_name("127.0.0.1"),
            Ok(ServerName::IpAddress(_))
        ));
        assert!(matches!(server_name("::1"), Ok(ServerName::IpAddress(_))));
        assert!(matches!(
            server_name("iad.app.internal"),
            Ok(ServerName::DnsName(_))
        ));
        assert!(server_name("not a name").is_err());
    }
}
