//! `proxy.toml`: file → raw serde structs → `${VAR}` expansion → validated runtime [`Config`].
//!
//! Every error names the key it is about, so a bad deploy fails at start-up with a message an
//! operator can act on instead of a proxy that routes wrongly.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize, Serializer};

use crate::route::SplitBrain;

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
    #[error("{key}: {reason}")]
    Invalid { key: String, reason: String },
}

fn invalid(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        reason: reason.into(),
    }
}

/// The validated configuration the proxy runs with.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Config {
    pub listen: ListenConfig,
    /// Listeners besides `[listen]`, which always serves the leader.
    pub listeners: Vec<ListenerConfig>,
    pub backends: BackendsConfig,
    pub check: CheckConfig,
    pub proxy: ProxyConfig,
    pub admin: AdminConfig,
    pub reload: ReloadConfig,
}

/// How a reload of this file is applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReloadConfig {
    /// Apply a `[check]` change even when the current leader does not answer `leader` to it
    /// (the way to force a reload sent with SIGHUP; `POST /reload?force=true` is the other).
    pub force: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ListenConfig {
    pub addresses: Vec<SocketAddr>,
}

/// A `[[listeners]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerConfig {
    pub name: String,
    pub addresses: Vec<SocketAddr>,
    pub serves: Serves,
}

/// Printed with the keys it is written with (`serves`, `fallback`, `target`), so the output of
/// `roleproxy check` can be pasted back into a file.
impl Serialize for ListenerConfig {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Written<'a> {
            name: &'a str,
            addresses: &'a [SocketAddr],
            #[serde(skip_serializing_if = "Option::is_none")]
            serves: Option<&'static str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            fallback: Option<&'static str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            target: Option<SocketAddr>,
        }
        let (serves, fallback, target) = match self.serves {
            Serves::Leader => (Some("leader"), None, None),
            Serves::Replica { fallback_to_leader } => (
                Some("replica"),
                Some(if fallback_to_leader { "leader" } else { "none" }),
                None,
            ),
            Serves::Target(addr) => (None, None, Some(addr)),
        };
        Written {
            name: &self.name,
            addresses: &self.addresses,
            serves,
            fallback,
            target,
        }
        .serialize(s)
    }
}

/// What a listener's clients are sent to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Serves {
    /// The one leader; sessions close when it moves.
    Leader,
    /// The replica with the fewest sessions; with `fallback_to_leader`, the leader while no
    /// replica is up.
    Replica { fallback_to_leader: bool },
    /// One fixed address, no checks (postgres-ha's `*:5433` to the local Postgres).
    Target(SocketAddr),
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CheckKind {
    /// `GET check.path`; the body's word is the role (Fly's `/flycheck/role`).
    HttpBody,
    /// Patroni's REST API: `GET check.leader_path` / `check.replica_path`, 200 yes, 503 no.
    HttpStatus,
    /// A Postgres connection reading `pg_is_in_recovery()` and the timeline.
    Postgres,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum IpFamily {
    Ipv6,
    Ipv4,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BackendsConfig {
    pub dns_names: Vec<String>,
    pub port: u16,
    pub nameservers: Vec<SocketAddr>,
    pub prefer: IpFamily,
    pub max: usize,
    #[serde(serialize_with = "human")]
    pub resolve_interval: Duration,
    #[serde(serialize_with = "human")]
    pub resolve_timeout: Duration,
    pub backup: Vec<SocketAddr>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CheckConfig {
    pub kind: CheckKind,
    pub port: u16,
    pub path: String,
    pub leader_path: String,
    pub replica_path: String,
    pub user: String,
    pub password: Secret,
    pub database: String,
    pub split_brain: SplitBrain,
    pub interval: Duration,
    pub fast_interval: Duration,
    pub timeout: Duration,
    /// Deadline of the Postgres liveness probe that follows a leader's failed check.
    pub probe_timeout: Duration,
    /// How long a leader whose checks fail but whose Postgres answers stays the route.
    pub unconfirmed_limit: Duration,
    pub leader: Vec<String>,
    pub rise: u32,
    pub fall: u32,
}

/// A password: kept out of `Debug` output, logs and `roleproxy check`.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_empty() {
            "\"\""
        } else {
            "(hidden)"
        })
    }
}

/// Printed with only its kind's own keys, and never the password.
impl Serialize for CheckConfig {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let human = |d: Duration| humantime::format_duration(d).to_string();
        let mut map = s.serialize_map(None)?;
        map.serialize_entry("kind", &self.kind)?;
        map.serialize_entry("port", &self.port)?;
        match self.kind {
            CheckKind::HttpBody => {
                map.serialize_entry("path", &self.path)?;
                map.serialize_entry("leader", &self.leader)?;
            }
            CheckKind::HttpStatus => {
                map.serialize_entry("leader_path", &self.leader_path)?;
                map.serialize_entry("replica_path", &self.replica_path)?;
            }
            CheckKind::Postgres => {
                map.serialize_entry("user", &self.user)?;
                if !self.password.0.is_empty() {
                    map.serialize_entry("password", "(hidden)")?;
                }
                map.serialize_entry("database", &self.database)?;
            }
        }
        map.serialize_entry("split_brain", &self.split_brain)?;
        map.serialize_entry("interval", &human(self.interval))?;
        map.serialize_entry("fast_interval", &human(self.fast_interval))?;
        map.serialize_entry("timeout", &human(self.timeout))?;
        map.serialize_entry("probe_timeout", &human(self.probe_timeout))?;
        map.serialize_entry("unconfirmed_limit", &human(self.unconfirmed_limit))?;
        map.serialize_entry("rise", &self.rise)?;
        map.serialize_entry("fall", &self.fall)?;
        map.end()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProxyConfig {
    #[serde(serialize_with = "human")]
    pub connect_timeout: Duration,
    pub connect_retries: u32,
    #[serde(serialize_with = "human")]
    pub idle_timeout: Duration,
    /// A client that has not sent its first packet this long after connecting is closed
    /// without a backend ever being connected for it.
    #[serde(serialize_with = "human")]
    pub silent_timeout: Duration,
    /// A session with one side closed and the other silent this long is closed.
    #[serde(serialize_with = "human")]
    pub half_close_timeout: Duration,
    pub max_connections: usize,
    #[serde(serialize_with = "human")]
    pub leader_wait: Duration,
    #[serde(serialize_with = "human")]
    pub shutdown_grace: Duration,
    pub copy: crate::copy::Mode,
    pub preconnect: usize,
    /// Worker threads; 0: one per CPU. Read at start-up only.
    pub threads: usize,
    /// How sessions end when their leader steps down while alive.
    pub switchover: Switchover,
    /// How long a session whose leader stepped down may take to end its transaction.
    #[serde(serialize_with = "human")]
    pub switchover_grace: Duration,
}

/// How the sessions of a leader that stepped down while alive (fenced or demoted) end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Switchover {
    /// At each session's next transaction boundary, within `proxy.switchover_grace`.
    Transaction,
    /// At once, as when the leader is gone.
    Immediate,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AdminConfig {
    /// `None` when `admin.address = ""`: no admin listener.
    pub address: Option<SocketAddr>,
    /// Whether requests that change state (`POST /reload`) are served. The admin port is
    /// reachable by every node of the private network, so this is off unless asked for.
    pub allow_changes: bool,
    /// How long a per-backend metric series may stay unchanged before it is removed; the
    /// series of backends still known are kept fresh, so only departed ones go. Start-up only.
    #[serde(serialize_with = "human")]
    pub metrics_expiry: Duration,
}

/// More sessions than any descriptor limit allows; also keeps the limit's arithmetic small.
pub const MAX_CONNECTIONS: usize = 1_000_000;

/// Shorter durations would make loops spin.
const MIN_DURATION: Duration = Duration::from_millis(1);
/// Longer durations are surely typos, and would overflow deadline arithmetic.
const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

fn human<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_duration(*d).to_string())
}

// ---- the file as written -------------------------------------------------------------------

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawConfig {
    listen: RawListen,
    listeners: Vec<RawListener>,
    backends: RawBackends,
    check: RawCheck,
    proxy: RawProxy,
    admin: RawAdmin,
    reload: RawReload,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawReload {
    force: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawListen {
    addresses: Vec<String>,
}

impl Default for RawListen {
    fn default() -> Self {
        Self {
            addresses: vec!["0.0.0.0:5432".into(), "[::]:5432".into()],
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    name: Option<String>,
    addresses: Vec<String>,
    serves: Option<String>,
    fallback: Option<String>,
    target: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawBackends {
    dns_names: Vec<String>,
    port: u16,
    nameservers: Vec<String>,
    prefer: String,
    max: usize,
    resolve_interval: RawDuration,
    resolve_timeout: RawDuration,
    backup: Vec<String>,
}

impl Default for RawBackends {
    fn default() -> Self {
        Self {
            dns_names: vec!["${PRIMARY_REGION}.${FLY_APP_NAME}.internal".into()],
            port: 5433,
            nameservers: vec!["[fdaa::3]:53".into()],
            prefer: "ipv6".into(),
            max: 10,
            resolve_interval: "1s".into(),
            resolve_timeout: "2s".into(),
            backup: vec!["[${PG_LISTEN_ADDRESS}]:5433".into()],
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawCheck {
    kind: String,
    /// The default depends on the kind.
    port: Option<u16>,
    // Each kind's own keys are options, so setting one for another kind is an error.
    path: Option<String>,
    leader: Option<Vec<String>>,
    leader_path: Option<String>,
    replica_path: Option<String>,
    user: Option<String>,
    password: Option<String>,
    database: Option<String>,
    split_brain: String,
    interval: RawDuration,
    fast_interval: RawDuration,
    timeout: RawDuration,
    probe_timeout: RawDuration,
    unconfirmed_limit: RawDuration,
    rise: u32,
    fall: u32,
}

impl Default for RawCheck {
    fn default() -> Self {
        Self {
            kind: "http-body".into(),
            port: None,
            path: None,
            leader: None,
            leader_path: None,
            replica_path: None,
            user: None,
            password: None,
            database: None,
            split_brain: "none".into(),
            interval: "2s".into(),
            fast_interval: "250ms".into(),
            timeout: "5s".into(),
            probe_timeout: "1s".into(),
            unconfirmed_limit: "60s".into(),
            rise: 1,
            fall: 2,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawProxy {
    connect_timeout: RawDuration,
    connect_retries: u32,
    idle_timeout: RawDuration,
    silent_timeout: RawDuration,
    half_close_timeout: RawDuration,
    max_connections: usize,
    leader_wait: RawDuration,
    shutdown_grace: RawDuration,
    copy: String,
    preconnect: usize,
    threads: usize,
    switchover: String,
    /// Empty: half of `check.interval`.
    switchover_grace: RawDuration,
}

impl Default for RawProxy {
    fn default() -> Self {
        Self {
            connect_timeout: "4s".into(),
            connect_retries: 2,
            idle_timeout: "30m".into(),
            silent_timeout: "5s".into(),
            half_close_timeout: "10s".into(),
            max_connections: 1000,
            leader_wait: "10s".into(),
            shutdown_grace: "10s".into(),
            copy: "auto".into(),
            preconnect: 0,
            threads: 0,
            switchover: "transaction".into(),
            switchover_grace: RawDuration::default(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawAdmin {
    address: String,
    allow_changes: bool,
    metrics_expiry: RawDuration,
}

impl Default for RawAdmin {
    fn default() -> Self {
        Self {
            address: "[::]:8404".into(),
            allow_changes: false,
            metrics_expiry: "2m".into(),
        }
    }
}

/// A duration as written, e.g. `"2s"`, read after `${VAR}` expansion. Its own type so that a
/// bare number (`interval = 2`) gets a hint with the unit instead of "expected a string".
#[derive(Default)]
struct RawDuration(String);

impl From<&str> for RawDuration {
    fn from(text: &str) -> Self {
        RawDuration(text.to_owned())
    }
}

impl<'de> Deserialize<'de> for RawDuration {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = RawDuration;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a duration in quotes, like \"2s\"")
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<RawDuration, E> {
                Ok(text.into())
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<RawDuration, E> {
                Err(E::custom(format!(
                    "a duration needs quotes and a unit: write \"{n}s\" for {n} seconds or \"{n}ms\" for {n} milliseconds"
                )))
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<RawDuration, E> {
                self.visit_i64(i64::try_from(n).unwrap_or(i64::MAX))
            }
        }
        deserializer.deserialize_str(Visitor)
    }
}

// ---- loading --------------------------------------------------------------------------------

impl Config {
    /// Reads and validates a file, expanding variables from the process environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &|name| std::env::var(name).ok())
    }

    /// Parses TOML text; `env` looks up variables so tests need not touch the process environment.
    ///
    /// No error repeats `check.password`: errors reach logs, `roleproxy check` and the answer
    /// to `POST /reload`, which every node of the private network can send.
    pub fn parse(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let secrets = Secrets::written_in(text);
        secrets.check_type()?;
        let parsed = read_raw(text).and_then(|raw| raw.validate(&Expander { env }));
        parsed.map_err(|e| secrets.hide_in(e))
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

/// The raw structs, or an error in the user's terms: TOML syntax errors with their line and
/// column, and errors in a value under the value's dotted key (`check.timeout`).
fn read_raw(text: &str) -> Result<RawConfig, ConfigError> {
    let document =
        toml::Deserializer::parse(text).map_err(|e| ConfigError::Parse(parse_error(text, &e)))?;
    serde_path_to_error::deserialize(document).map_err(|e| {
        let key = e.path().to_string();
        let error = e.into_inner();
        let at = error
            .span()
            .map(|span| at(text, span.start))
            .unwrap_or_default();
        ConfigError::Invalid {
            reason: format!("{}{at}", in_user_terms(&key, error.message())),
            key,
        }
    })
}

/// A TOML error with its line, column and key but without the source line that `toml` quotes:
/// that line may hold a password, also one under a misspelt key.
fn parse_error(text: &str, error: &toml::de::Error) -> String {
    let message = error.message().trim_end().replace('\n', "; ");
    let at = error
        .span()
        .map(|span| at(text, span.start))
        .unwrap_or_default();
    format!("TOML parse error{at}: {message}")
}

/// ` (line 2, column 12)` for a byte offset into `text`.
fn at(text: &str, offset: usize) -> String {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    format!(" (line {line}, column {column})")
}

/// Serde's messages name Rust types (`expected usize`, `struct RawCheck`); these say what to
/// write instead. A message of another form is kept as it is.
fn in_user_terms(key: &str, message: &str) -> String {
    let name = key.rsplit(['.', ']']).next().unwrap_or(key);
    if let Some(rest) = message.strip_prefix("unknown field `") {
        let (unknown, known) = rest.split_once('`').unwrap_or((rest, ""));
        let known: Vec<&str> = known.split('`').skip(1).step_by(2).collect();
        return unknown_key(unknown, &known);
    }
    if let Some(missing) = message.strip_prefix("missing field `") {
        return format!("is missing its key `{}`", missing.trim_end_matches('`'));
    }
    let found_wanted = message
        .strip_prefix("invalid type: ")
        .or_else(|| message.strip_prefix("invalid value: "))
        .and_then(|rest| rest.rsplit_once(", expected "));
    let Some((found, wanted)) = found_wanted else {
        return message.to_owned();
    };
    let found_text = found
        .strip_prefix("string ")
        .map(|s| s.trim_matches('"').to_owned());
    let found = match found.split_once(' ') {
        Some(("integer" | "floating", value)) => {
            format!(
                "the number {}",
                value.trim_start_matches("point ").trim_matches('`')
            )
        }
        Some(("boolean", value)) => value.trim_matches('`').to_owned(),
        Some(("string", value)) => format!("the text {value}"),
        _ if found == "sequence" => "a list".to_owned(),
        _ if found == "map" => "a table".to_owned(),
        _ => found.to_owned(),
    };
    let wanted = match wanted {
        "a string" => "text in quotes".to_owned(),
        "a boolean" => "true or false, without quotes".to_owned(),
        "u8" | "u16" => {
            format!(
                "a whole number from 0 to {}",
                if wanted == "u8" { 255 } else { 65535 }
            )
        }
        "u32" | "u64" | "usize" => "a whole number, 0 or more".to_owned(),
        "a sequence" => match found_text {
            Some(text) => format!("a list in brackets: write {name} = [\"{text}\"]"),
            None => "a list in brackets, like [\"a\", \"b\"]".to_owned(),
        },
        _ if wanted.starts_with("struct ") || wanted == "a map" => {
            format!("a table: write [{key}] on a line of its own, with its keys below it")
        }
        _ => wanted.to_owned(),
    };
    format!("found {found}; expected {wanted}")
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

/// Shorter values are not hidden: they turn up in ordinary words and numbers of a message.
const MIN_HIDDEN_LEN: usize = 4;

/// `check.password` in every form a message could show it in, read from the file even when it
/// has errors elsewhere.
struct Secrets {
    /// Whether the value is written as something other than a string (`password = 12345678`).
    not_a_string: bool,
    forms: Vec<String>,
}

impl Secrets {
    fn written_in(text: &str) -> Secrets {
        let mut values = Vec::new();
        let mut not_a_string = false;
        let (document, _) = toml::de::DeTable::parse_recoverable(text);
        let check = document
            .get_ref()
            .iter()
            .find(|(key, _)| key.get_ref().as_ref() == "check");
        if let Some((_, check)) = check {
            if let toml::de::DeValue::Table(check) = check.get_ref() {
                if let Some((_, value)) = check
                    .iter()
                    .find(|(key, _)| key.get_ref().as_ref() == "password")
                {
                    values.extend(text.get(value.span()).map(str::to_owned));
                    match value.get_ref() {
                        toml::de::DeValue::String(s) => values.push(s.to_string()),
                        toml::de::DeValue::Integer(i) => {
                            not_a_string = true;
                            values.push(i.as_str().to_owned());
                            values.push(i.to_string());
                        }
                        toml::de::DeValue::Float(f) => {
                            not_a_string = true;
                            values.push(f.to_string());
                        }
                        _ => not_a_string = true,
                    }
                }
            }
        }
        // A line the parser could not read (a bad escape inside the password itself).
        for line in text.lines() {
            let line = line.trim_start();
            let rest = line
                .strip_prefix("check.password")
                .or_else(|| line.strip_prefix("password"));
            if let Some(value) = rest.and_then(|r| r.trim_start().strip_prefix('=')) {
                let value = value.trim();
                values.push(value.to_owned());
                values.push(value.trim_matches(|c| c == '"' || c == '\'').to_owned());
            }
        }
        let mut forms = Vec::new();
        for value in values {
            let debug = format!("{value:?}");
            forms.push(debug.trim_matches('"').to_owned());
            forms.push(value.escape_default().to_string());
            forms.push(value);
        }
        forms.retain(|f| f.chars().count() >= MIN_HIDDEN_LEN);
        // Longest first, so a form inside another does not leave the rest of the longer one.
        forms.sort_by_key(|f| std::cmp::Reverse(f.len()));
        forms.dedup();
        Secrets {
            not_a_string,
            forms,
        }
    }

    /// A bare number would be echoed by the deserializer's "invalid type" message.
    fn check_type(&self) -> Result<(), ConfigError> {
        if self.not_a_string {
            return Err(invalid(
                "check.password",
                "must be a quoted string, e.g. password = \"${PGPASSWORD}\"",
            ));
        }
        Ok(())
    }

    /// The error with every form of the password replaced.
    fn hide_in(&self, error: ConfigError) -> ConfigError {
        let hide = |text: String| {
            self.forms
                .iter()
                .fold(text, |text, form| text.replace(form.as_str(), "(hidden)"))
        };
        match error {
            ConfigError::Parse(message) => ConfigError::Parse(hide(message)),
            ConfigError::Invalid { key, reason } => ConfigError::Invalid {
                key,
                reason: hide(reason),
            },
            read @ ConfigError::Read { .. } => read,
        }
    }
}

struct Expander<'a> {
    env: &'a dyn Fn(&str) -> Option<String>,
}

impl Expander<'_> {
    fn string(&self, key: &str, value: &str) -> Result<String, ConfigError> {
        expand(value, self.env).map_err(|e| invalid(key, format!("{e} in {value:?}")))
    }

    /// Like [`Self::string`], but the reason never quotes the value.
    fn secret(&self, key: &str, value: &str) -> Result<String, ConfigError> {
        expand(value, self.env).map_err(|e| invalid(key, e.to_string()))
    }

    fn duration(&self, key: &str, value: &RawDuration) -> Result<Duration, ConfigError> {
        let text = self.string(key, &value.0)?;
        let d = humantime::parse_duration(text.trim()).map_err(|e| {
            invalid(
                key,
                format!("bad duration {text:?} ({e}); use e.g. \"250ms\", \"2s\", \"30m\""),
            )
        })?;
        if d.is_zero() {
            return Err(invalid(key, "must be greater than zero"));
        }
        if d < MIN_DURATION {
            return Err(invalid(
                key,
                format!("{text:?} is shorter than the minimum of 1ms"),
            ));
        }
        if d > MAX_DURATION {
            return Err(invalid(
                key,
                format!("{text:?} is longer than the limit of 365 days"),
            ));
        }
        Ok(d)
    }

    fn addr(&self, key: &str, value: &str) -> Result<SocketAddr, ConfigError> {
        let text = self.string(key, value)?;
        parse_socket_addr(&text).ok_or_else(|| {
            invalid(
                key,
                format!("bad address {text:?}; expected IP:PORT, e.g. \"0.0.0.0:5432\" or \"[::]:5432\""),
            )
        })
    }

    /// An address to connect to: port 0 is never right there.
    fn connect_addr(&self, key: &str, value: &str) -> Result<SocketAddr, ConfigError> {
        let addr = self.addr(key, value)?;
        if addr.port() == 0 {
            return Err(invalid(
                key,
                format!("port 0 in {addr} cannot be connected to"),
            ));
        }
        Ok(addr)
    }

    /// Addresses to listen on (port 0: any free port, as the tests use).
    fn listen_addrs(&self, key: &str, values: &[String]) -> Result<Vec<SocketAddr>, ConfigError> {
        list(key, values, |key, v| self.addr(key, v))
    }

    fn connect_addrs(&self, key: &str, values: &[String]) -> Result<Vec<SocketAddr>, ConfigError> {
        list(key, values, |key, v| self.connect_addr(key, v))
    }
}

/// Each value of a list, read by `one` under its own key (`key[i]`).
fn list<T>(
    key: &str,
    values: &[String],
    one: impl Fn(&str, &str) -> Result<T, ConfigError>,
) -> Result<Vec<T>, ConfigError> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| one(&format!("{key}[{i}]"), v))
        .collect()
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

impl RawConfig {
    fn validate(self, x: &Expander) -> Result<Config, ConfigError> {
        let listen = ListenConfig {
            addresses: x.listen_addrs("listen.addresses", &self.listen.addresses)?,
        };
        if listen.addresses.is_empty() {
            return Err(invalid(
                "listen.addresses",
                "must list at least one address",
            ));
        }

        let b = self.backends;
        let mut dns_names = Vec::new();
        for (i, name) in b.dns_names.iter().enumerate() {
            let key = format!("backends.dns_names[{i}]");
            let name = x.string(&key, name)?;
            let name = name.trim();
            let bad_label = name
                .trim_end_matches('.')
                .split('.')
                .any(|label| label.is_empty() || label.len() > 63);
            // 253 characters is the most a DNS name can have (without the final dot).
            let too_long = name.trim_end_matches('.').len() > 253;
            if name.is_empty() || bad_label || too_long || name.contains(char::is_whitespace) {
                return Err(invalid(&key, format!("bad DNS name {name:?}")));
            }
            dns_names.push(name.to_string());
        }
        let prefer = match x.string("backends.prefer", &b.prefer)?.as_str() {
            "ipv6" => IpFamily::Ipv6,
            "ipv4" => IpFamily::Ipv4,
            other => {
                return Err(invalid(
                    "backends.prefer",
                    format!("expected \"ipv6\" or \"ipv4\", got {other:?}"),
                ))
            }
        };
        if b.max == 0 {
            return Err(invalid("backends.max", "must be at least 1"));
        }
        if b.port == 0 {
            return Err(invalid("backends.port", "must not be 0"));
        }
        let backends = BackendsConfig {
            port: b.port,
            nameservers: x.connect_addrs("backends.nameservers", &b.nameservers)?,
            prefer,
            max: b.max,
            resolve_interval: x.duration("backends.resolve_interval", &b.resolve_interval)?,
            resolve_timeout: x.duration("backends.resolve_timeout", &b.resolve_timeout)?,
            backup: x.connect_addrs("backends.backup", &b.backup)?,
            dns_names,
        };
        if backends.dns_names.is_empty() && backends.backup.is_empty() {
            return Err(invalid(
                "backends.dns_names",
                "must list at least one name when backends.backup is empty",
            ));
        }

        let check = validate_check(self.check, backends.port, x)?;

        let p = self.proxy;
        if p.max_connections == 0 {
            return Err(invalid("proxy.max_connections", "must be at least 1"));
        }
        if p.max_connections > MAX_CONNECTIONS {
            return Err(invalid(
                "proxy.max_connections",
                format!("at most {MAX_CONNECTIONS}: each session needs two descriptors"),
            ));
        }
        if p.preconnect > 100 {
            return Err(invalid(
                "proxy.preconnect",
                "at most 100: each one holds a Postgres backend on the leader",
            ));
        }
        if p.threads > 1024 {
            return Err(invalid(
                "proxy.threads",
                "at most 1024 (0 means one per CPU)",
            ));
        }
        let proxy = ProxyConfig {
            threads: p.threads,
            connect_timeout: x.duration("proxy.connect_timeout", &p.connect_timeout)?,
            connect_retries: p.connect_retries,
            idle_timeout: x.duration("proxy.idle_timeout", &p.idle_timeout)?,
            silent_timeout: x.duration("proxy.silent_timeout", &p.silent_timeout)?,
            half_close_timeout: x.duration("proxy.half_close_timeout", &p.half_close_timeout)?,
            max_connections: p.max_connections,
            leader_wait: x.duration("proxy.leader_wait", &p.leader_wait)?,
            shutdown_grace: x.duration("proxy.shutdown_grace", &p.shutdown_grace)?,
            preconnect: p.preconnect,
            copy: match x.string("proxy.copy", &p.copy)?.as_str() {
                "auto" => crate::copy::Mode::Auto,
                "splice" => crate::copy::Mode::Splice,
                "buffered" => crate::copy::Mode::Buffered,
                other => {
                    return Err(invalid(
                        "proxy.copy",
                        format!("expected \"auto\", \"splice\" or \"buffered\", got {other:?}"),
                    ))
                }
            },
            switchover: match x.string("proxy.switchover", &p.switchover)?.as_str() {
                "transaction" => Switchover::Transaction,
                "immediate" => Switchover::Immediate,
                other => {
                    return Err(invalid(
                        "proxy.switchover",
                        format!("expected \"transaction\" or \"immediate\", got {other:?}"),
                    ))
                }
            },
            // A planned switchover waits one check interval plus this grace between fencing
            // and demoting the leader (README, "Planned switchovers").
            switchover_grace: if p.switchover_grace.0.trim().is_empty() {
                check.interval / 2
            } else {
                x.duration("proxy.switchover_grace", &p.switchover_grace)?
            },
        };

        let admin_text = x.string("admin.address", &self.admin.address)?;
        let admin = AdminConfig {
            address: if admin_text.trim().is_empty() {
                None
            } else {
                Some(x.addr("admin.address", &admin_text)?)
            },
            allow_changes: self.admin.allow_changes,
            metrics_expiry: x.duration("admin.metrics_expiry", &self.admin.metrics_expiry)?,
        };
        let listeners = validate_listeners(self.listeners, &listen, x)?;

        let config = Config {
            listen,
            listeners,
            backends,
            check,
            proxy,
            admin,
            reload: ReloadConfig {
                force: self.reload.force,
            },
        };
        refuse_loops(&config, &crate::loops::local_interfaces())?;
        Ok(config)
    }
}

/// Refuses an address to connect to that is one of the proxy's own listening sockets (given
/// exactly, or covered by a wildcard on a local interface): every client sent there would come
/// back in and connect again. Listeners on port 0 are checked once bound, at connect.
fn refuse_loops(config: &Config, locals: &[crate::loops::LocalNet]) -> Result<(), ConfigError> {
    use crate::loops::{covering, Listening};
    let mut own: Vec<(Listening, String)> = Vec::new();
    for (i, spec) in config.all_listeners().iter().enumerate() {
        for (j, addr) in spec.addresses.iter().enumerate() {
            let key = if i == 0 {
                format!("listen.addresses[{j}]")
            } else {
                format!("listeners[{}].addresses[{j}]", i - 1)
            };
            let listening = Listening {
                addr: *addr,
                dual_stack: false,
            };
            own.push((listening, key));
        }
    }
    if let Some(addr) = config.admin.address {
        let listening = Listening {
            addr,
            dual_stack: addr.is_ipv6(),
        };
        own.push((listening, "admin.address".to_string()));
    }
    let listening: Vec<Listening> = own.iter().map(|(l, _)| *l).collect();
    let mut targets: Vec<(String, SocketAddr)> = config
        .backends
        .backup
        .iter()
        .enumerate()
        .map(|(i, a)| (format!("backends.backup[{i}]"), *a))
        .collect();
    for (i, spec) in config.listeners.iter().enumerate() {
        if let Serves::Target(addr) = spec.serves {
            targets.push((format!("listeners[{i}].target"), addr));
        }
    }
    for (key, target) in targets {
        if let Some(listen) = covering(target, &listening, locals) {
            let owner = own
                .iter()
                .find(|(l, _)| l.addr == listen)
                .map_or("", |(_, key)| key.as_str());
            return Err(invalid(
                &key,
                format!(
                    "{target} is this proxy's own listening address ({owner} = {listen} covers it): clients would loop back into the proxy"
                ),
            ));
        }
    }
    Ok(())
}

fn validate_check(
    c: RawCheck,
    backends_port: u16,
    x: &Expander,
) -> Result<CheckConfig, ConfigError> {
    let kind = match x.string("check.kind", &c.kind)?.as_str() {
        "http-body" => CheckKind::HttpBody,
        "http-status" => CheckKind::HttpStatus,
        "postgres" => CheckKind::Postgres,
        other => {
            return Err(invalid(
                "check.kind",
                format!("expected \"http-body\", \"http-status\" or \"postgres\", got {other:?}"),
            ))
        }
    };
    // A key of another kind would be silently ignored; say so instead.
    let owned_by = |key: &str| match key {
        "path" | "leader" => CheckKind::HttpBody,
        "leader_path" | "replica_path" => CheckKind::HttpStatus,
        _ => CheckKind::Postgres,
    };
    let set = [
        ("path", c.path.is_some()),
        ("leader", c.leader.is_some()),
        ("leader_path", c.leader_path.is_some()),
        ("replica_path", c.replica_path.is_some()),
        ("user", c.user.is_some()),
        ("password", c.password.is_some()),
        ("database", c.database.is_some()),
    ];
    for (key, present) in set {
        let owner = owned_by(key);
        if present && owner != kind {
            return Err(invalid(
                &format!("check.{key}"),
                format!(
                    "only used with check.kind = {:?}, but check.kind is {:?}",
                    kind_name(owner),
                    kind_name(kind)
                ),
            ));
        }
    }
    let url_path = |key: &str, value: Option<&String>, default: &str| {
        let path = x.string(key, value.map_or(default, String::as_str))?;
        if !path.starts_with('/') || path.parse::<hyper::http::uri::PathAndQuery>().is_err() {
            return Err(invalid(
                key,
                format!("must be a URL path starting with '/', got {path:?}"),
            ));
        }
        Ok(path)
    };
    let path = url_path("check.path", c.path.as_ref(), "/flycheck/role")?;
    let leader_path = url_path("check.leader_path", c.leader_path.as_ref(), "/primary")?;
    let replica_path = url_path("check.replica_path", c.replica_path.as_ref(), "/replica")?;
    let words = c
        .leader
        .unwrap_or_else(|| vec!["leader".into(), "primary".into()]);
    let leader: Vec<String> = words
        .iter()
        .enumerate()
        .map(|(i, w)| x.string(&format!("check.leader[{i}]"), w))
        .map(|w| w.map(|w| w.trim().to_ascii_lowercase()))
        .collect::<Result<_, _>>()?;
    if leader.is_empty() || leader.iter().any(String::is_empty) {
        return Err(invalid(
            "check.leader",
            "must list at least one non-empty word",
        ));
    }
    let user = x.string("check.user", c.user.as_deref().unwrap_or("postgres"))?;
    if user.trim().is_empty() {
        return Err(invalid("check.user", "must not be empty"));
    }
    let password = x.secret("check.password", c.password.as_deref().unwrap_or(""))?;
    let database = x.string(
        "check.database",
        c.database.as_deref().unwrap_or("postgres"),
    )?;
    if database.trim().is_empty() {
        return Err(invalid("check.database", "must not be empty"));
    }
    let split_brain = match x.string("check.split_brain", &c.split_brain)?.as_str() {
        "none" => SplitBrain::None,
        "highest-timeline" if kind == CheckKind::Postgres => SplitBrain::HighestTimeline,
        "highest-timeline" => {
            return Err(invalid(
                "check.split_brain",
                "\"highest-timeline\" needs check.kind = \"postgres\", the only check that reads timelines",
            ))
        }
        other => {
            return Err(invalid(
                "check.split_brain",
                format!("expected \"none\" or \"highest-timeline\", got {other:?}"),
            ))
        }
    };
    if c.rise == 0 {
        return Err(invalid("check.rise", "must be at least 1"));
    }
    if c.fall == 0 {
        return Err(invalid("check.fall", "must be at least 1"));
    }
    if kind == CheckKind::Postgres && c.port.is_some() {
        // Asking another port could read the role of another server than the one routed to.
        return Err(invalid(
            "check.port",
            "not used with check.kind = \"postgres\": each backend is asked at its own address",
        ));
    }
    let port = c.port.unwrap_or(match kind {
        CheckKind::HttpBody => 5500,
        // Patroni's REST API.
        CheckKind::HttpStatus => 8008,
        CheckKind::Postgres => backends_port,
    });
    if port == 0 {
        return Err(invalid("check.port", "must not be 0"));
    }
    Ok(CheckConfig {
        kind,
        port,
        path,
        leader_path,
        replica_path,
        user,
        password: Secret(password),
        database,
        split_brain,
        interval: x.duration("check.interval", &c.interval)?,
        fast_interval: x.duration("check.fast_interval", &c.fast_interval)?,
        timeout: x.duration("check.timeout", &c.timeout)?,
        probe_timeout: x.duration("check.probe_timeout", &c.probe_timeout)?,
        unconfirmed_limit: x.duration("check.unconfirmed_limit", &c.unconfirmed_limit)?,
        leader,
        rise: c.rise,
        fall: c.fall,
    })
}

fn kind_name(kind: CheckKind) -> &'static str {
    match kind {
        CheckKind::HttpBody => "http-body",
        CheckKind::HttpStatus => "http-status",
        CheckKind::Postgres => "postgres",
    }
}

fn validate_listeners(
    raw: Vec<RawListener>,
    listen: &ListenConfig,
    x: &Expander,
) -> Result<Vec<ListenerConfig>, ConfigError> {
    // Every address is bound once; the first user of each is remembered for the message.
    let mut used: Vec<(SocketAddr, String)> = listen
        .addresses
        .iter()
        .enumerate()
        .map(|(i, a)| (*a, format!("listen.addresses[{i}]")))
        .collect();
    let mut names = vec!["leader".to_string()];
    let mut listeners = Vec::new();
    for (i, l) in raw.into_iter().enumerate() {
        let key = |field: &str| format!("listeners[{i}].{field}");
        let name = match &l.name {
            Some(name) => x.string(&key("name"), name)?.trim().to_string(),
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
        let addresses = x.listen_addrs(&key("addresses"), &l.addresses)?;
        if addresses.is_empty() {
            return Err(invalid(&key("addresses"), "must list at least one address"));
        }
        for (j, addr) in addresses.iter().enumerate() {
            let here = format!("listeners[{i}].addresses[{j}]");
            if let Some((_, first)) = used.iter().find(|(a, _)| a == addr && addr.port() != 0) {
                return Err(invalid(&here, format!("{addr} is already used by {first}")));
            }
            used.push((*addr, here));
        }
        let serves = match (&l.serves, &l.target) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    &key("target"),
                    "a listener with a fixed target serves nothing else; remove serves",
                ))
            }
            (None, Some(target)) => {
                if l.fallback.is_some() {
                    return Err(invalid(
                        &key("fallback"),
                        "only used with serves = \"replica\"",
                    ));
                }
                Serves::Target(x.connect_addr(&key("target"), target)?)
            }
            (serves, None) => {
                let serves = x.string(&key("serves"), serves.as_deref().unwrap_or("leader"))?;
                let fallback = l
                    .fallback
                    .as_deref()
                    .map(|f| x.string(&key("fallback"), f))
                    .transpose()?;
                match (serves.as_str(), fallback.as_deref()) {
                    ("leader", None) => Serves::Leader,
                    ("leader", Some(_)) => {
                        return Err(invalid(
                            &key("fallback"),
                            "only used with serves = \"replica\"",
                        ))
                    }
                    ("replica", None | Some("none")) => Serves::Replica {
                        fallback_to_leader: false,
                    },
                    ("replica", Some("leader")) => Serves::Replica {
                        fallback_to_leader: true,
                    },
                    ("replica", Some(other)) => {
                        return Err(invalid(
                            &key("fallback"),
                            format!("expected \"none\" or \"leader\", got {other:?}"),
                        ))
                    }
                    (other, _) => {
                        return Err(invalid(
                            &key("serves"),
                            format!(
                                "expected \"leader\" or \"replica\" (or set target), got {other:?}"
                            ),
                        ))
                    }
                }
            }
        };
        listeners.push(ListenerConfig {
            name,
            addresses,
            serves,
        });
    }
    Ok(listeners)
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
            _ => None,
        }
    }

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, &fly_env)
    }

    fn error(text: &str) -> String {
        match parse(text) {
            Ok(_) => panic!("expected an error for {text:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn empty_file_gives_the_fly_defaults() {
        let c = parse("").expect("defaults are valid");
        assert_eq!(c.listen.addresses.len(), 2);
        assert_eq!(c.backends.dns_names, vec!["iad.app.internal"]);
        assert_eq!(c.backends.port, 5433);
        assert_eq!(
            c.backends.nameservers,
            vec!["[fdaa::3]:53".parse().unwrap()]
        );
        assert_eq!(c.backends.prefer, IpFamily::Ipv6);
        assert_eq!(c.backends.max, 10);
        assert_eq!(c.backends.resolve_interval, Duration::from_secs(1));
        assert_eq!(c.backends.backup, vec!["[fdaa::7]:5433".parse().unwrap()]);
        assert_eq!(c.check.port, 5500);
        assert_eq!(c.check.path, "/flycheck/role");
        assert_eq!(c.check.interval, Duration::from_secs(2));
        assert_eq!(c.check.timeout, Duration::from_secs(5));
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
        assert_eq!(c.cluster_name(), "iad.app.internal");
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

    #[test]
    fn shipped_proxy_toml_is_valid() {
        let text = include_str!("../proxy.toml");
        let c = parse(text).expect("proxy.toml is valid");
        assert_eq!(c.backends.dns_names, vec!["iad.app.internal"]);
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
                "[backends]\ndns_names = []\nbackup = []",
                &["backends.dns_names", "at least one"],
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
            ("[proxy]\ncopy = \"zero\"", &["proxy.copy", "splice"]),
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
                "[proxy]\nmax_connections = 4611686018427387904",
                &["proxy.max_connections", "at most 1000000"],
            ),
            (
                "[[listeners]]\naddresses = [\"127.0.0.1:5434\"]\ntarget = \"127.0.0.1:5434\"",
                &["listeners[0].target", "loop"],
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
                "[listen]\naddresses = [\"127.0.0.1:6432\"]\n[backends]\nbackup = [\"127.0.0.1:6432\"]",
                &[
                    "backends.backup[0]",
                    "listen.addresses[0] = 127.0.0.1:6432",
                    "loop",
                ],
            ),
            (
                "[backends]\nbackup = [\"127.0.0.1:5433\", \"127.3.2.1:5432\"]",
                &["backends.backup[1]", "listen.addresses[0] = 0.0.0.0:5432", "loop"],
            ),
            (
                "[backends]\nbackup = [\"0.0.0.0:5432\"]",
                &["backends.backup[0]", "0.0.0.0:5432", "loop"],
            ),
            (
                "[backends]\nbackup = [\"[::1]:5432\"]",
                &["backends.backup[0]", "listen.addresses[1] = [::]:5432", "loop"],
            ),
            (
                "[backends]\nbackup = [\"127.0.0.1:8404\"]",
                &["backends.backup[0]", "admin.address = [::]:8404", "loop"],
            ),
            (
                "[[listeners]]\naddresses = [\"0.0.0.0:5434\"]\n[[listeners]]\naddresses = [\"127.0.0.1:6000\"]\ntarget = \"127.0.0.1:5434\"",
                &["listeners[1].target", "listeners[0].addresses[0] = 0.0.0.0:5434", "loop"],
            ),
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
                &["listeners[0].serves", "standby"],
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
            &parse("[check]\nkind = \"postgres\"\npassword = \"s3cret\"").expect("valid"),
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
            parse("[check]\nkind = \"postgres\"\npassword = \"s3cret\"").expect("valid")
        );
        assert!(!debug.contains("s3cret"), "{debug}");
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
        assert!(text.contains("interval = \"2s\""), "{text}");
        assert!(text.contains("idle_timeout = \"30m\""), "{text}");
    }
}
