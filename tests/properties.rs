//! Property tests for the pure parts of roleproxy: the config parser with `${VAR}` expansion,
//! the role-answer mapping, the startup-phase Postgres wire parsing and the routing rules.
//!
//! Each property runs a fixed number of generated cases (the `CASES_*` constants) so the whole
//! file stays fast enough for every `cargo test`; `PROPTEST_CASES=N` overrides them for a longer
//! search, and the cargo-fuzz targets in `fuzz/` run for as long as you like (`docs/testing.md`, "Property
//! and fuzz tests"). A failing property prints its shrunk input.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

use roleproxy::check::role_from_answer;
use roleproxy::config::{Config, IpFamily};
use roleproxy::pgwire_io::read_startup;
use roleproxy_core::pgwire::{
    check_length, error_response, parse_startup, PgWireError, StartupPacket, MAX_STARTUP_LEN,
};
use roleproxy_core::route::{
    decide_with, least_loaded, BackendView, Claim, Hold, NoRoute, Role, RoleHistory, Route,
    SplitBrain, Standing, Target,
};

/// The routing rules with the default split-brain policy: several leaders mean no route.
fn decide(previous: &Route, backends: &[BackendView<'_>]) -> Route {
    decide_with(previous, backends, SplitBrain::None)
}

/// Cases per property; cheap pure functions get more.
const CASES_FAST: u32 = 1024;
const CASES_CONFIG: u32 = 256;
const CASES_IO: u32 = 256;

/// `PROPTEST_CASES=N` runs every property with N cases instead, for a longer search.
fn config(cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(cases);
    ProptestConfig {
        cases,
        // Failures print the shrunk input; nothing is written next to the sources.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// =============================================================================================
// Config: `Config::parse(text, env)`
// =============================================================================================

/// A TOML basic string holding `s` exactly.
fn toml_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                out.push_str(&format!("\\u{:04X}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn toml_list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| toml_str(s)).collect();
    format!("[{}]", quoted.join(", "))
}

/// One piece of a templated value. Variable names get a unique suffix when rendered, so pieces
/// never clash with each other or with the noise variables.
#[derive(Debug, Clone)]
enum Piece {
    /// Literal text.
    Lit(String),
    /// `${NAME}` with NAME set to the text (possibly empty).
    Var { name: String, value: String },
    /// `${NAME:-text}` with NAME unset.
    DefaultUnset { name: String, default: String },
    /// `${NAME:-text}` with NAME set but empty.
    DefaultEmpty { name: String, default: String },
    /// `${NAME:-other}` with NAME set to the (non-empty) text: the default is ignored.
    DefaultSet {
        name: String,
        value: String,
        other: String,
    },
}

/// A value as written in the file: pieces whose expansion is a known text.
#[derive(Debug, Clone)]
struct Tpl(Vec<Piece>);

/// The variables a generated file refers to, and a counter for unique names.
#[derive(Debug, Default)]
struct Env {
    vars: BTreeMap<String, String>,
    next: usize,
}

impl Env {
    fn fresh(&mut self, base: &str) -> String {
        self.next += 1;
        // Rendered names always contain "__"; noise names never do.
        format!("{base}__{}", self.next)
    }

    fn lookup(&self) -> impl Fn(&str) -> Option<String> + '_ {
        move |name| self.vars.get(name).cloned()
    }
}

impl Tpl {
    fn render(&self, env: &mut Env) -> String {
        let mut out = String::new();
        for piece in &self.0 {
            match piece {
                Piece::Lit(text) => out.push_str(text),
                Piece::Var { name, value } => {
                    let name = env.fresh(name);
                    env.vars.insert(name.clone(), value.clone());
                    out.push_str(&format!("${{{name}}}"));
                }
                Piece::DefaultUnset { name, default } => {
                    let name = env.fresh(name);
                    out.push_str(&format!("${{{name}:-{default}}}"));
                }
                Piece::DefaultEmpty { name, default } => {
                    let name = env.fresh(name);
                    env.vars.insert(name.clone(), String::new());
                    out.push_str(&format!("${{{name}:-{default}}}"));
                }
                Piece::DefaultSet { name, value, other } => {
                    let name = env.fresh(name);
                    env.vars.insert(name.clone(), value.clone());
                    out.push_str(&format!("${{{name}:-{other}}}"));
                }
            }
        }
        out
    }
}

fn var_base() -> impl Strategy<Value = String> {
    "[A-Za-z_][A-Za-z0-9_]{0,6}"
}

/// Splits `text` (ASCII, without `$`, `{` or `}`) at random points and writes each part either
/// literally or through one of the four substitution forms.
fn templated(text: String) -> impl Strategy<Value = Tpl> {
    assert!(
        text.is_ascii() && !text.contains(['$', '{', '}']),
        "{text:?}"
    );
    let len = text.len();
    vec((0..=len, 0..5u8, var_base(), "[a-z0-9.]{0,5}"), 0..=3).prop_map(move |mut cuts| {
        cuts.sort_by_key(|c| c.0);
        let mut pieces = Vec::new();
        let mut at = 0;
        let mut kind = 0u8;
        let mut name = String::new();
        let mut other = String::new();
        let bounds = cuts
            .into_iter()
            .map(|(pos, k, n, o)| (pos, Some((k, n, o))))
            .chain(std::iter::once((len, None)));
        for (pos, next) in bounds {
            let part = text[at..pos].to_string();
            pieces.push(match kind {
                0 => Piece::Lit(part),
                1 => Piece::Var {
                    name: name.clone(),
                    value: part,
                },
                2 => Piece::DefaultUnset {
                    name: name.clone(),
                    default: part,
                },
                3 => Piece::DefaultEmpty {
                    name: name.clone(),
                    default: part,
                },
                _ if part.is_empty() => Piece::DefaultUnset {
                    name: name.clone(),
                    default: part,
                },
                _ => Piece::DefaultSet {
                    name: name.clone(),
                    value: part,
                    other: other.clone(),
                },
            });
            at = pos;
            if let Some((k, n, o)) = next {
                kind = k;
                name = n;
                other = o;
            }
        }
        Tpl(pieces)
    })
}

/// A typed value, and a template that expands to text that parses to it.
#[derive(Debug, Clone)]
struct Valued<T> {
    value: T,
    tpl: Tpl,
}

fn valued<T: Clone + std::fmt::Debug + 'static>(
    s: impl Strategy<Value = (T, String)>,
) -> impl Strategy<Value = Valued<T>> {
    s.prop_flat_map(|(value, text)| {
        templated(text).prop_map(move |tpl| Valued {
            value: value.clone(),
            tpl,
        })
    })
}

fn pad() -> impl Strategy<Value = &'static str> {
    prop_oneof![4 => Just(""), 1 => Just(" "), 1 => Just("  ")]
}

fn ipv6() -> impl Strategy<Value = Ipv6Addr> {
    // Zero-heavy segments exercise the `::` forms.
    vec(prop_oneof![2 => Just(0u16), 1 => any::<u16>()], 8)
        .prop_map(|s| Ipv6Addr::new(s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]))
}

/// `1.2.3.4:5`, `[1.2.3.4]:5` (the Fly template with an IPv4 PG_LISTEN_ADDRESS) or `[::1]:5`;
/// never port 0, which an address that is connected to (a backup, a nameserver) may not have.
fn socket_addr() -> impl Strategy<Value = (SocketAddr, String)> {
    let v4 = (any::<[u8; 4]>(), 1..=u16::MAX, any::<bool>(), pad(), pad()).prop_map(
        |(ip, port, bracket, a, b)| {
            let ip = Ipv4Addr::from(ip);
            let text = if bracket {
                format!("{a}[{ip}]:{port}{b}")
            } else {
                format!("{a}{ip}:{port}{b}")
            };
            (SocketAddr::new(IpAddr::V4(ip), port), text)
        },
    );
    let v6 = (ipv6(), 1..=u16::MAX, pad(), pad()).prop_map(|(ip, port, a, b)| {
        (
            SocketAddr::new(IpAddr::V6(ip), port),
            format!("{a}[{ip}]:{port}{b}"),
        )
    });
    prop_oneof![v4, v6]
}

/// A humantime duration of 1–3 parts, at most 300 days in all.
fn duration() -> impl Strategy<Value = (Duration, String)> {
    let unit = prop_oneof![
        Just(("us", Duration::from_micros(1), 1_000_000u64)),
        Just(("ms", Duration::from_millis(1), 1_000_000)),
        Just(("s", Duration::from_secs(1), 1_000_000)),
        Just(("sec", Duration::from_secs(1), 1_000_000)),
        Just(("m", Duration::from_secs(60), 100_000)),
        Just(("min", Duration::from_secs(60), 100_000)),
        Just(("h", Duration::from_secs(3600), 2_000)),
        Just(("d", Duration::from_secs(86_400), 100)),
        Just(("days", Duration::from_secs(86_400), 100)),
    ];
    let part = unit.prop_flat_map(|(name, one, max)| (1..=max).prop_map(move |n| (n, name, one)));
    (vec(part, 1..=3), prop_oneof![Just(""), Just(" ")], pad())
        .prop_map(|(parts, sep, p)| {
            let total = parts.iter().map(|(n, _, one)| *one * (*n as u32)).sum();
            let text: Vec<String> = parts.iter().map(|(n, u, _)| format!("{n}{u}")).collect();
            (total, format!("{p}{}{p}", text.join(sep)))
        })
        // Shorter than a millisecond is refused (rightly), so it is never a valid value.
        .prop_filter("at least the 1 ms minimum", |(total, _)| {
            *total >= Duration::from_millis(1)
        })
}

/// A DNS name of at most 4 × 41 + 4 = 168 characters (DNS allows 253).
fn dns_name() -> impl Strategy<Value = (String, String)> {
    (
        vec("[a-z0-9][a-z0-9-]{0,40}", 1..=4),
        any::<bool>(),
        pad(),
        pad(),
    )
        .prop_map(|(labels, dot, a, b)| {
            let name = format!("{}{}", labels.join("."), if dot { "." } else { "" });
            (name.clone(), format!("{a}{name}{b}"))
        })
}

fn check_path() -> impl Strategy<Value = (String, String)> {
    "(/[A-Za-z0-9_.~-]{0,10}){1,4}(\\?[a-z]{1,5}=[a-z0-9]{1,5})?".prop_map(|p| (p.clone(), p))
}

fn leader_word() -> impl Strategy<Value = (String, String)> {
    ("[ \t]{0,2}", "[A-Za-z]{1,10}", "[ \t]{0,2}")
        .prop_map(|(a, w, b)| (w.to_ascii_lowercase(), format!("{a}{w}{b}")))
}

fn prefer() -> impl Strategy<Value = (IpFamily, String)> {
    prop_oneof![
        Just((IpFamily::Ipv6, "ipv6".to_string())),
        Just((IpFamily::Ipv4, "ipv4".to_string())),
    ]
}

/// Admin address: an address, or disabled with an empty value.
fn admin() -> impl Strategy<Value = (Option<SocketAddr>, String)> {
    prop_oneof![
        3 => socket_addr().prop_map(|(a, t)| (Some(a), t)),
        1 => pad().prop_map(|p| (None, p.to_string())),
    ]
}

const DURATION_KEYS: [(&str, &str); 13] = [
    ("backends", "resolve_interval"),
    ("backends", "resolve_timeout"),
    ("check", "interval"),
    ("check", "fast_interval"),
    ("check", "timeout"),
    ("check", "probe_timeout"),
    ("check", "unconfirmed_limit"),
    ("proxy", "connect_timeout"),
    ("proxy", "idle_timeout"),
    ("proxy", "silent_timeout"),
    ("proxy", "half_close_timeout"),
    ("proxy", "leader_wait"),
    ("proxy", "shutdown_grace"),
];

/// `[section] key` of a configuration, read back from its printed form, where each key is
/// written as the file writes it (so no key is listed twice here).
fn duration_of(c: &Config, section: &str, key: &str) -> Duration {
    let printed = toml::Table::try_from(c).expect("a configuration prints");
    let text = printed[section][key]
        .as_str()
        .expect("durations print as text");
    humantime::parse_duration(text).expect("printed durations parse")
}

/// backends.port, backends.max, check.port, check.rise, check.fall, proxy.connect_retries,
/// proxy.max_connections; `None` leaves the key out.
type Ints = (
    Option<u16>,
    Option<usize>,
    Option<u16>,
    Option<u32>,
    Option<u32>,
    Option<u32>,
    Option<usize>,
);

/// A whole valid file. `None` leaves the key out so the default applies.
#[derive(Debug, Clone)]
struct ValidFile {
    listen: Option<Vec<Valued<SocketAddr>>>,
    dns_names: Vec<Valued<String>>,
    backup: Vec<Valued<SocketAddr>>,
    nameservers: Option<Vec<Valued<SocketAddr>>>,
    prefer: Option<Valued<IpFamily>>,
    path: Option<Valued<String>>,
    leader: Option<Vec<Valued<String>>>,
    admin: Option<Valued<Option<SocketAddr>>>,
    durations: Vec<Option<Valued<Duration>>>,
    ints: Ints,
    /// Variables the file does not use.
    noise: Vec<(String, String)>,
}

fn valid_file() -> impl Strategy<Value = ValidFile> {
    let addrs = |min: usize| vec(valued(socket_addr()), min..=3);
    let ints = (
        option::of(1..=u16::MAX),
        option::of(1..=1000usize),
        option::of(1..=u16::MAX),
        option::of(1..=10u32),
        option::of(1..=10u32),
        option::of(0..=10u32),
        option::of(1..=100_000usize),
    );
    let names = (
        option::of(addrs(1)),
        vec(valued(dns_name()), 0..=3),
        addrs(0),
        option::of(addrs(0)),
    );
    let check = (
        option::of(valued(prefer())),
        option::of(valued(check_path())),
        option::of(vec(valued(leader_word()), 1..=3)),
        option::of(valued(admin())),
    );
    let durations = vec(option::of(valued(duration())), DURATION_KEYS.len());
    let noise = vec(("Z[A-Z0-9]{0,5}", "\\PC{0,8}"), 0..4);
    (names, check, durations, ints, noise)
        .prop_map(
            |(
                (listen, dns_names, backup, nameservers),
                (prefer, path, leader, admin),
                durations,
                ints,
                noise,
            )| {
                ValidFile {
                    listen,
                    dns_names,
                    backup,
                    nameservers,
                    prefer,
                    path,
                    leader,
                    admin,
                    durations,
                    ints,
                    noise,
                }
            },
        )
        .prop_filter("some name or backup", |f| {
            !f.dns_names.is_empty() || !f.backup.is_empty()
        })
        .prop_filter("no backup at the proxy's own listener", |f| {
            !f.backup_loops()
        })
}

impl ValidFile {
    /// A backup that is one of the proxy's own listeners is refused (rightly), so such files
    /// are not valid ones.
    fn backup_loops(&self) -> bool {
        use roleproxy::own_addresses::{covering, local_interfaces, Listening};
        let d = defaults();
        let listen = self
            .listen
            .as_deref()
            .map(values)
            .unwrap_or(d.listen.addresses);
        let mut listening: Vec<Listening> = listen
            .into_iter()
            .map(|addr| Listening {
                addr,
                dual_stack: false,
            })
            .collect();
        let admin = self.admin.as_ref().map_or(d.admin.address, |a| a.value);
        listening.extend(admin.map(|addr| Listening {
            addr,
            dual_stack: addr.is_ipv6(),
        }));
        let locals = local_interfaces();
        values(&self.backup)
            .into_iter()
            .any(|b| covering(b, &listening, &locals).is_some())
    }

    fn render(&self) -> (String, Env) {
        let mut env = Env::default();
        for (k, v) in &self.noise {
            env.vars.insert(k.clone(), v.clone());
        }
        let mut sections: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        let mut put = |section: &'static str, key: &str, value: String| {
            sections
                .entry(section)
                .or_default()
                .push(format!("{key} = {value}"));
        };
        fn list<T>(items: &[Valued<T>], env: &mut Env) -> String {
            let texts: Vec<String> = items.iter().map(|v| v.tpl.render(env)).collect();
            toml_list(&texts)
        }
        if let Some(l) = &self.listen {
            put("listen", "addresses", list(l, &mut env));
        }
        put("backends", "dns_names", list(&self.dns_names, &mut env));
        put("backends", "backup", list(&self.backup, &mut env));
        if let Some(n) = &self.nameservers {
            put("backends", "nameservers", list(n, &mut env));
        }
        if let Some(p) = &self.prefer {
            put("backends", "prefer", toml_str(&p.tpl.render(&mut env)));
        }
        if let Some(p) = &self.path {
            put("check", "path", toml_str(&p.tpl.render(&mut env)));
        }
        if let Some(l) = &self.leader {
            put("check", "leader", list(l, &mut env));
        }
        if let Some(a) = &self.admin {
            put("admin", "address", toml_str(&a.tpl.render(&mut env)));
        }
        for ((section, key), d) in DURATION_KEYS.iter().zip(&self.durations) {
            if let Some(d) = d {
                put(section, key, toml_str(&d.tpl.render(&mut env)));
            }
        }
        let (bport, max, cport, rise, fall, retries, maxconn) = self.ints;
        let ints: [(&'static str, &str, Option<u64>); 7] = [
            ("backends", "port", bport.map(u64::from)),
            ("backends", "max", max.map(|v| v as u64)),
            ("check", "port", cport.map(u64::from)),
            ("check", "rise", rise.map(u64::from)),
            ("check", "fall", fall.map(u64::from)),
            ("proxy", "connect_retries", retries.map(u64::from)),
            ("proxy", "max_connections", maxconn.map(|v| v as u64)),
        ];
        for (section, key, v) in ints {
            if let Some(v) = v {
                put(section, key, v.to_string());
            }
        }
        let mut text = String::new();
        for (section, lines) in sections {
            text.push_str(&format!("[{section}]\n"));
            for line in lines {
                text.push_str(&line);
                text.push('\n');
            }
        }
        (text, env)
    }
}

/// What the parser gives for every key a file leaves out.
fn defaults() -> Config {
    Config::parse("[backends]\ndns_names = [\"d\"]\nbackup = []\n", &|_| None)
        .expect("defaults are valid")
}

fn values<T: Clone>(v: &[Valued<T>]) -> Vec<T> {
    v.iter().map(|x| x.value.clone()).collect()
}

/// A valid file to break one key of. Everything is written out, so no variable is needed.
fn base_file() -> BTreeMap<(&'static str, &'static str), String> {
    let mut m = BTreeMap::new();
    let mut put = |s, k, v: &str| {
        m.insert((s, k), v.to_string());
    };
    put("listen", "addresses", r#"["0.0.0.0:5432", "[::]:5432"]"#);
    put(
        "backends",
        "dns_names",
        r#"["iad.app.internal", "app.internal"]"#,
    );
    put("backends", "port", "5433");
    put(
        "backends",
        "nameservers",
        r#"["[fdaa::3]:53", "127.0.0.1:53"]"#,
    );
    put("backends", "prefer", r#""ipv6""#);
    put("backends", "max", "10");
    put("backends", "resolve_interval", r#""1s""#);
    put("backends", "resolve_timeout", r#""2s""#);
    put(
        "backends",
        "backup",
        r#"["[fdaa::7]:5433", "[127.0.0.1]:5433"]"#,
    );
    put("check", "port", "5500");
    put("check", "path", r#""/flycheck/role""#);
    put("check", "interval", r#""2s""#);
    put("check", "fast_interval", r#""250ms""#);
    put("check", "timeout", r#""5s""#);
    put("check", "probe_timeout", r#""1s""#);
    put("check", "unconfirmed_limit", r#""60s""#);
    put("check", "leader", r#"["leader", "primary"]"#);
    put("check", "rise", "1");
    put("check", "fall", "2");
    put("proxy", "connect_timeout", r#""4s""#);
    put("proxy", "connect_retries", "2");
    put("proxy", "idle_timeout", r#""30m""#);
    put("proxy", "silent_timeout", r#""5s""#);
    put("proxy", "half_close_timeout", r#""10s""#);
    put("proxy", "max_connections", "1000");
    put("proxy", "leader_wait", r#""10s""#);
    put("proxy", "shutdown_grace", r#""10s""#);
    put("admin", "address", r#""[::]:8404""#);
    m
}

fn render_base(m: &BTreeMap<(&'static str, &'static str), String>) -> String {
    let mut text = String::new();
    let mut section = "";
    for ((s, k), v) in m {
        if *s != section {
            text.push_str(&format!("[{s}]\n"));
            section = s;
        }
        text.push_str(&format!("{k} = {v}\n"));
    }
    text
}

/// Variables the invalid-value files can use.
fn bad_env(name: &str) -> Option<String> {
    match name {
        "REGION" => Some("iad".into()),
        "EMPTY" => Some(String::new()),
        _ => name.strip_prefix("BAD_").map(|_| "not valid here".into()),
    }
}

/// Broken `${...}` forms; each is an error for any string key.
fn bad_expansion() -> impl Strategy<Value = String> {
    prop_oneof![
        "UNSET_[A-Z]{1,5}".prop_map(|n| format!("${{{n}}}")),
        "[a-z]{0,3}".prop_map(|p| format!("{p}${{REGION")),
        "[0-9][A-Z0-9_]{0,3}".prop_map(|n| format!("${{{n}}}")),
        "[A-Z]{1,3}[-. ][A-Z]{1,3}".prop_map(|n| format!("${{{n}}}")),
        Just("${}".to_string()),
        Just("${:-x}".to_string()),
    ]
}

fn bad_duration() -> impl Strategy<Value = String> {
    prop_oneof![
        "0(s|ms|m|h|d)?",
        "[a-z]{1,8}",
        "-[1-9][0-9]{0,3}(s|ms)",
        " {0,2}",
        "(36[6-9]|[4-9][0-9]{2}|[1-9][0-9]{3,5})(d|days)",
        "[2-9](y|years)",
        "[1-9][0-9]{20,24}s",
        "[1-9] parsecs",
        bad_expansion(),
    ]
}

fn bad_address() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z]{1,10}:[0-9]{1,4}",
        "[0-9]{1,3}(\\.[0-9]{1,3}){3}",
        "[0-9]{1,3}(\\.[0-9]{1,3}){3}:(6553[6-9]|[7-9][0-9]{4}|[1-9][0-9]{5,8})",
        "(25[6-9]|[3-9][0-9]{2})(\\.[0-9]{1,2}){3}:5432",
        Just("[::1]".to_string()),
        Just("[::1]:".to_string()),
        Just(":5432".to_string()),
        Just("[localhost]:5432".to_string()),
        "[a-z]{1,5}",
        bad_expansion(),
    ]
}

/// Non-empty after trimming, so `admin.address` does not read it as "disabled".
fn bad_admin_address() -> impl Strategy<Value = String> {
    bad_address().prop_filter("not blank", |s| !s.trim().is_empty())
}

fn bad_dns_name() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z]{1,5}\\.\\.[a-z]{1,5}",
        "[a-z]{64,70}(\\.internal)?",
        "[a-z]{1,5}[ \t][a-z]{1,5}",
        Just(".".to_string()),
        Just("..".to_string()),
        "\\.[a-z]{1,5}",
        " {0,2}",
        bad_expansion(),
    ]
}

fn bad_prefer() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9]{0,6}".prop_filter("not a family", |s| s != "ipv6" && s != "ipv4"),
        Just("IPv6".to_string()),
        Just(" ipv4".to_string()),
        bad_expansion(),
    ]
}

fn bad_path() -> impl Strategy<Value = String> {
    prop_oneof!["[a-z]{0,10}", "/[a-z]{1,5} [a-z]{1,5}", bad_expansion(),]
}

/// One broken key: the file's text, and what the error must contain.
#[derive(Debug, Clone)]
struct BadCase {
    what: &'static str,
    section: &'static str,
    key: &'static str,
    value: String,
    must_contain: String,
}

/// A list value of `len` good items with `bad` at `index`.
fn list_with_bad(good: &str, len: usize, index: usize, bad: &str) -> String {
    let mut items = vec![good.to_string(); len];
    items.insert(index.min(len), bad.to_string());
    toml_list(&items)
}

fn bad_case() -> impl Strategy<Value = BadCase> {
    let duration = (0..DURATION_KEYS.len(), bad_duration()).prop_map(|(i, v)| {
        let (section, key) = DURATION_KEYS[i];
        BadCase {
            what: "duration",
            section,
            key,
            value: toml_str(&v),
            must_contain: format!("{section}.{key}"),
        }
    });
    let address_list = (
        prop_oneof![
            Just(("listen", "addresses")),
            Just(("backends", "nameservers")),
            Just(("backends", "backup")),
        ],
        0..3usize,
        0..3usize,
        bad_address(),
    )
        .prop_map(|((section, key), len, index, v)| {
            // A backup may be NAME:PORT; such a value is made a name with no port.
            let v = match (key, v.split_once(':')) {
                ("backup", Some((host, port)))
                    if host.chars().all(|c| c.is_ascii_lowercase())
                        && !host.is_empty()
                        && port.parse::<u16>().is_ok_and(|p| p != 0) =>
                {
                    host.to_owned()
                }
                _ => v,
            };
            let index = index.min(len);
            BadCase {
                what: "address in a list",
                section,
                key,
                value: list_with_bad("127.0.0.1:1", len, index, &v),
                must_contain: format!("{section}.{key}[{index}]"),
            }
        });
    let admin = bad_admin_address().prop_map(|v| BadCase {
        what: "admin address",
        section: "admin",
        key: "address",
        value: toml_str(&v),
        must_contain: "admin.address".into(),
    });
    let dns = (0..3usize, 0..3usize, bad_dns_name()).prop_map(|(len, index, v)| {
        let index = index.min(len);
        BadCase {
            what: "DNS name",
            section: "backends",
            key: "dns_names",
            value: list_with_bad("app.internal", len, index, &v),
            must_contain: format!("backends.dns_names[{index}]"),
        }
    });
    let prefer = bad_prefer().prop_map(|v| BadCase {
        what: "prefer",
        section: "backends",
        key: "prefer",
        value: toml_str(&v),
        must_contain: "backends.prefer".into(),
    });
    let path = bad_path().prop_map(|v| BadCase {
        what: "check path",
        section: "check",
        key: "path",
        value: toml_str(&v),
        must_contain: "check.path".into(),
    });
    let leader = prop_oneof![
        Just(BadCase {
            what: "no leader words",
            section: "check",
            key: "leader",
            value: "[]".into(),
            must_contain: "check.leader".into(),
        }),
        (0..3usize, 0..3usize, "[ \t]{0,3}").prop_map(|(len, index, blank)| BadCase {
            what: "blank leader word",
            section: "check",
            key: "leader",
            value: list_with_bad("leader", len, index, &blank),
            must_contain: "check.leader".into(),
        }),
        (0..3usize, 0..3usize, bad_expansion()).prop_map(|(len, index, v)| {
            let index = index.min(len);
            BadCase {
                what: "leader word expansion",
                section: "check",
                key: "leader",
                value: list_with_bad("leader", len, index, &v),
                must_contain: format!("check.leader[{index}]"),
            }
        }),
    ];
    let zero = prop_oneof![
        Just(("backends", "max")),
        Just(("backends", "port")),
        Just(("check", "port")),
        Just(("check", "rise")),
        Just(("check", "fall")),
        Just(("proxy", "max_connections")),
    ]
    .prop_map(|(section, key)| BadCase {
        what: "zero",
        section,
        key,
        value: "0".into(),
        must_contain: format!("{section}.{key}"),
    });
    // Serde's messages name the field, and the TOML error shows the line.
    let out_of_range = prop_oneof![
        (
            prop_oneof![Just(("backends", "port")), Just(("check", "port"))],
            65_536u64..10_000_000
        )
            .prop_map(|((s, k), v)| (s, k, v.to_string())),
        (
            prop_oneof![
                Just(("check", "rise")),
                Just(("check", "fall")),
                Just(("proxy", "connect_retries")),
                Just(("backends", "max")),
                Just(("proxy", "max_connections")),
            ],
            -1_000i64..0
        )
            .prop_map(|((s, k), v)| (s, k, v.to_string())),
    ]
    .prop_map(|(section, key, value)| BadCase {
        what: "integer out of range",
        section,
        key,
        value,
        must_contain: key.into(),
    });
    let wrong_type = (0..base_file().len(), any::<bool>()).prop_map(|(i, list)| {
        let ((section, key), good) = base_file().into_iter().nth(i).expect("in range");
        let value = if good.starts_with('"') || good.starts_with('[') {
            if list && !good.starts_with('[') {
                "[1]".to_string()
            } else {
                "7".to_string()
            }
        } else {
            "\"7\"".to_string()
        };
        BadCase {
            what: "wrong type",
            section,
            key,
            value,
            must_contain: key.into(),
        }
    });
    prop_oneof![
        3 => duration,
        3 => address_list,
        1 => admin,
        2 => dns,
        1 => prefer,
        1 => path,
        2 => leader,
        1 => zero,
        1 => out_of_range,
        2 => wrong_type,
    ]
}

proptest! {
    #![proptest_config(config(CASES_CONFIG))]

    /// Any text at all: an error or a config, never a panic.
    #[test]
    fn config_parse_never_panics(text in any::<String>()) {
        let _ = Config::parse(&text, &bad_env);
    }

    /// Valid TOML with arbitrary values in every string key, full of `${`, `}` and `:-`.
    #[test]
    fn config_arbitrary_values_never_panic(
        picks in vec((0..base_file().len(), vec(prop_oneof![
            Just("${".to_string()),
            Just("}".to_string()),
            Just(":-".to_string()),
            Just("REGION".to_string()),
            Just("EMPTY".to_string()),
            Just("BAD_X".to_string()),
            "[0-9]{1,3}",
            "(ms|s|m|h|d|y|ns)",
            "[\\[\\]:. /]",
            "\\PC{0,4}",
        ], 0..10)), 1..6),
    ) {
        let mut file = base_file();
        for (i, parts) in picks {
            let key = *file.keys().nth(i).expect("in range");
            let value = parts.concat();
            let is_list = file[&key].starts_with('[');
            let rendered = if is_list { toml_list(&[value]) } else if file[&key].starts_with('"') {
                toml_str(&value)
            } else {
                continue;
            };
            file.insert(key, rendered);
        }
        match Config::parse(&render_base(&file), &bad_env) {
            Ok(c) => { let _ = c.cluster_name(); }
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }

    /// Generated valid files, with every value written through random `${VAR}` /
    /// `${VAR:-default}` substitutions, parse to exactly the values they were built from, and
    /// print as a file that parses to the same configuration.
    #[test]
    fn config_valid_files_round_trip(file in valid_file()) {
        let (text, env) = file.render();
        let lookup = env.lookup();
        let c = match Config::parse(&text, &lookup) {
            Ok(c) => c,
            Err(e) => return Err(TestCaseError::fail(format!("{e}\n--- file:\n{text}\n--- env: {:?}", env.vars))),
        };
        let d = defaults();
        let ctx = || format!("\n--- file:\n{text}\n--- env: {:?}", env.vars);
        prop_assert_eq!(&c.listen.addresses, &file.listen.as_deref().map(values).unwrap_or(d.listen.addresses.clone()), "{}", ctx());
        prop_assert_eq!(&c.backends.dns_names, &values(&file.dns_names).iter().map(|n| n.trim().to_string()).collect::<Vec<_>>(), "{}", ctx());
        prop_assert_eq!(&c.backends.backup, &values(&file.backup).into_iter().map(roleproxy::config::Endpoint::Addr).collect::<Vec<_>>(), "{}", ctx());
        prop_assert_eq!(&c.backends.nameservers, &file.nameservers.as_deref().map(values).unwrap_or(d.backends.nameservers.clone()), "{}", ctx());
        prop_assert_eq!(c.backends.prefer, file.prefer.as_ref().map(|p| p.value).unwrap_or(d.backends.prefer), "{}", ctx());
        prop_assert_eq!(&c.check.path, file.path.as_ref().map(|p| &p.value).unwrap_or(&d.check.path), "{}", ctx());
        prop_assert_eq!(&c.check.leader, &file.leader.as_deref().map(values).unwrap_or(d.check.leader.clone()), "{}", ctx());
        prop_assert_eq!(c.admin.address, file.admin.as_ref().map(|a| a.value).unwrap_or(d.admin.address), "{}", ctx());
        for ((section, key), want) in DURATION_KEYS.iter().zip(&file.durations) {
            let want = want.as_ref().map(|w| w.value).unwrap_or_else(|| duration_of(&d, section, key));
            prop_assert_eq!(duration_of(&c, section, key), want, "{}.{}{}", section, key, ctx());
        }
        let (bport, max, cport, rise, fall, retries, maxconn) = file.ints;
        prop_assert_eq!(c.backends.port, bport.unwrap_or(d.backends.port));
        prop_assert_eq!(c.backends.max, max.unwrap_or(d.backends.max));
        prop_assert_eq!(c.check.port, cport.unwrap_or(d.check.port));
        prop_assert_eq!(c.check.rise, rise.unwrap_or(d.check.rise));
        prop_assert_eq!(c.check.fall, fall.unwrap_or(d.check.fall));
        prop_assert_eq!(c.proxy.connect_retries, retries.unwrap_or(d.proxy.connect_retries));
        prop_assert_eq!(c.proxy.max_connections, maxconn.unwrap_or(d.proxy.max_connections));
        // What `roleproxy check` prints is a file that reads back to the same configuration.
        let printed = toml::to_string(&c).map_err(|e| TestCaseError::fail(e.to_string()))?;
        match Config::parse(&printed, &|_| None) {
            Ok(again) => prop_assert_eq!(again, c, "--- printed:\n{}{}", printed, ctx()),
            Err(e) => return Err(TestCaseError::fail(format!("{e}\n--- printed:\n{printed}{}", ctx()))),
        }
    }

    /// One bad value in an otherwise valid file: an error whose text names the key.
    #[test]
    fn config_invalid_values_name_the_key(bad in bad_case(), via_var in any::<bool>()) {
        let mut file = base_file();
        let mut value = bad.value.clone();
        // Some bad strings come through a variable: the expanded text is what is judged.
        let env_value = if via_var
            && value.starts_with('"')
            && !value.contains("${")
            && !value.contains('\\')
        {
            let raw = value.clone();
            value = "\"${BAD_VALUE}\"".into();
            Some(raw)
        } else {
            None
        };
        let env = |name: &str| match (&env_value, name) {
            (Some(raw), "BAD_VALUE") => {
                // The TOML string's content, unescaped the simple way (no escapes are generated
                // in the bad strings that take this path).
                Some(raw[1..raw.len() - 1].to_string())
            }
            _ => bad_env(name),
        };
        file.insert((bad.section, bad.key), value);
        let text = render_base(&file);
        match Config::parse(&text, &env) {
            Ok(_) => return Err(TestCaseError::fail(format!("{} accepted:\n{text}", bad.what))),
            Err(e) => {
                let message = e.to_string();
                prop_assert!(
                    message.contains(&bad.must_contain),
                    "{}: error should name {:?}: {}\n--- file:\n{}", bad.what, bad.must_contain, message, text
                );
            }
        }
    }

    /// A name longer than DNS allows (253 characters) cannot be resolved, so it should stop
    /// start-up like any other bad value instead of failing every lookup at run time.
    #[test]
    fn config_overlong_dns_names_are_refused(
        labels in vec("[a-z0-9]{40,63}", 5..=6),
        dot in any::<bool>(),
    ) {
        let name = format!("{}{}", labels.join("."), if dot { "." } else { "" });
        prop_assume!(name.trim_end_matches('.').len() > 253);
        let mut file = base_file();
        file.insert(("backends", "dns_names"), toml_list(std::slice::from_ref(&name)));
        match Config::parse(&render_base(&file), &bad_env) {
            Ok(_) => return Err(TestCaseError::fail(format!("accepted a {}-character name", name.len()))),
            Err(e) => prop_assert!(e.to_string().contains("backends.dns_names[0]"), "{e}"),
        }
    }

    /// A key the schema does not know, in any section: an error naming it with its section.
    #[test]
    fn config_unknown_keys_are_named(
        section in prop_oneof![Just("listen"), Just("backends"), Just("check"), Just("proxy"), Just("admin")],
        key in "[a-z][a-z_]{0,12}",
        new_section in any::<bool>(),
    ) {
        let file = base_file();
        let known = file.keys().any(|(s, k)| *k == key && (*s == section || new_section));
        let sections = ["listen", "backends", "check", "proxy", "admin"];
        prop_assume!(!known && !sections.contains(&key.as_str()));
        let text = if new_section {
            format!("{}[{key}]\nx = 1\n", render_base(&file))
        } else {
            render_base(&file).replace(&format!("[{section}]\n"), &format!("[{section}]\n{key} = 1\n"))
        };
        match Config::parse(&text, &bad_env) {
            Ok(_) => return Err(TestCaseError::fail(format!("unknown key {key} accepted:\n{text}"))),
            Err(e) => {
                let named = if new_section { key.clone() } else { format!("{section}.{key}") };
                let message = e.to_string();
                prop_assert!(message.starts_with(&format!("{named}: unknown key")), "{message}");
            }
        }
    }
}

/// A password full of what escaping, expansion and echoing get wrong: quotes, backslashes,
/// `${`, non-ASCII text and digits around eight letters that make it unique in any message.
fn password() -> impl Strategy<Value = String> {
    let piece = || {
        vec(
            prop_oneof![
                Just("\"".to_string()),
                Just("\\".to_string()),
                Just("'".to_string()),
                Just("${".to_string()),
                Just("}".to_string()),
                Just(":-".to_string()),
                "[0-9]{1,4}",
                "[a-zA-Z_]{1,4}",
                "[àéüßπ密码пароль]{1,3}",
            ],
            0..4,
        )
        .prop_map(|p| p.concat())
    };
    prop_oneof![
        (piece(), "[a-zA-Z]{8}", piece()).prop_map(|(a, core, b)| format!("{a}{core}{b}")),
        "[1-9][0-9]{7,15}",
    ]
}

/// The environment variable that holds the password when it is written as it must be.
const PASSWORD_VAR: &str = "CHECK_PASSWORD";

/// How the password is written: as a `${VAR}` reference to the environment (the one way it is
/// accepted), or, refused, as a basic string, a literal string, a bare number, or a basic
/// string with a bad escape (a syntax error on the password's own line).
fn written(password: &str, how: u8) -> String {
    let bare_number = password.chars().all(|c| c.is_ascii_digit());
    match how % 5 {
        0 => format!("\"${{{PASSWORD_VAR}}}\""),
        1 if !password.contains('\'') => format!("'{password}'"),
        2 if bare_number => password.to_string(),
        3 => format!("\"{password}\\q\""),
        _ => toml_str(password),
    }
}

/// Another mistake in the same file, as (lines in `[check]`, lines after it).
fn other_mistake(written: &str, which: u8) -> (String, String) {
    match which % 9 {
        0 => (String::new(), String::new()),
        1 => ("interval = \"fast\"\n".into(), String::new()),
        2 => (String::new(), "[proxy]\ncopy = \"zero\"\n".into()),
        3 => (String::new(), "[proxy]\nbogus = 1\n".into()),
        4 => (String::new(), "[proxy]\nidle_timeout = \n".into()),
        5 => (format!("pasword = {written}\n"), String::new()),
        6 => (format!("password = {written}\n"), String::new()),
        7 => ("user = \"\"\n".into(), String::new()),
        _ => (String::new(), "[admin]\naddress = \"nowhere\"\n".into()),
    }
}

proptest! {
    #![proptest_config(config(CASES_CONFIG))]

    /// `check.password` never appears, raw or escaped, in an error (the text logged, printed
    /// by `roleproxy check` and sent in the 400 answer to `POST /reload`) or in the printed
    /// configuration, however it is written and whatever else is wrong in the file; and it is
    /// accepted only from the environment.
    #[test]
    fn config_never_repeats_the_password(
        password in password(),
        how in any::<u8>(),
        which in any::<u8>(),
        postgres in any::<bool>(),
    ) {
        let value = written(&password, how);
        let (check_lines, tail) = other_mistake(&value, which);
        let kind = if postgres { "postgres" } else { "http-body" };
        let text = format!(
            "[listen]\naddresses = [\"127.0.0.1:0\"]\n[backends]\ndns_names = []\nbackup = [\"127.0.0.1:5433\"]\n\
             [check]\nkind = \"{kind}\"\npassword = {value}\n{check_lines}{tail}"
        );
        let debug = format!("{password:?}");
        let forms = [
            password.clone(),
            debug.trim_matches('"').to_string(),
            password.escape_default().to_string(),
            toml_str(&password).trim_matches('"').to_string(),
            // The variable's name is no secret.
            if value.contains(PASSWORD_VAR) { password.clone() } else { value.clone() },
        ];
        let env = |name: &str| match name {
            PASSWORD_VAR => Some(password.clone()),
            name => bad_env(name),
        };
        let parsed = Config::parse(&text, &env);
        if which % 9 == 0 {
            // With nothing else wrong, the one accepted way to write it is from the environment.
            let from_env = postgres && value.contains(PASSWORD_VAR);
            prop_assert_eq!(parsed.is_ok(), from_env, "{:?}", parsed.as_ref().err());
        }
        let shown = match parsed {
            Ok(config) => vec![
                toml::to_string(&config).map_err(|e| TestCaseError::fail(e.to_string()))?,
                format!("{config:?}"),
            ],
            Err(e) => vec![e.to_string(), format!("{e:?}")],
        };
        for out in &shown {
            for form in &forms {
                prop_assert!(!out.contains(form.as_str()), "{form:?} shown in {out}\nfile:\n{text}");
            }
        }
    }
}

// =============================================================================================
// Role answers: `check::role_from_answer`
// =============================================================================================

fn leader_words() -> impl Strategy<Value = Vec<String>> {
    prop_oneof![
        1 => Just(vec!["leader".to_string(), "primary".to_string()]),
        2 => vec("[a-z]{1,10}", 1..4),
    ]
}

fn is_2xx(status: u16) -> bool {
    (200..=299).contains(&status)
}

/// Any status: mostly real ones, some anywhere in u16.
fn status() -> impl Strategy<Value = u16> {
    prop_oneof![
        3 => 200..=299u16,
        1 => Just(404u16),
        2 => 100..=599u16,
        1 => any::<u16>(),
    ]
}

fn random_case(word: &str, flips: &[bool]) -> String {
    word.chars()
        .zip(flips.iter().chain(std::iter::repeat(&false)))
        .map(|(c, up)| if *up { c.to_ascii_uppercase() } else { c })
        .collect()
}

proptest! {
    #![proptest_config(config(CASES_FAST))]

    #[test]
    fn role_answer_never_panics(
        status in any::<u16>(),
        body in vec(any::<u8>(), 0..2048),
        leader in vec(".{0,12}", 0..4),
    ) {
        let role = role_from_answer(status, &body, &leader);
        match role {
            Role::Leader => prop_assert!(is_2xx(status)),
            Role::Maintenance => prop_assert_eq!(status, 404),
            Role::Replica | Role::Other(_) => prop_assert!(is_2xx(status)),
            Role::Down(detail) => {
                prop_assert!(!is_2xx(status) || String::from_utf8_lossy(&body).trim().is_empty());
                // The detail of an error body is shortened (200 chars + "HTTP nnn: " + "...").
                prop_assert!(detail.chars().count() <= 220, "{}", detail.len());
            }
            Role::Unknown => prop_assert!(false, "a check answer is never Unknown"),
        }
    }

    /// `Leader` iff 2xx and the trimmed, lower-cased body is one of the leader words.
    #[test]
    fn role_answer_leader_iff_2xx_and_word(
        status in status(),
        leader in leader_words(),
        pick in prop_oneof![
            // One of the leader words, in random case.
            2 => (any::<prop::sample::Index>(), vec(any::<bool>(), 10)).prop_map(|(i, f)| (Some(i), f, String::new())),
            // Some other word, or a leader word with something attached.
            1 => (vec(any::<bool>(), 10), prop_oneof!["[a-z]{0,12}", "(leader|primary) ?[a-z]{1,4}", "[a-z]{1,4}(leader|primary)"])
                .prop_map(|(f, w)| (None, f, w)),
        ],
        before in "[ \t\r\n]{0,3}",
        after in "[ \t\r\n]{0,3}",
    ) {
        let (index, flips, other) = pick;
        let word = match &index {
            Some(i) => i.get(&leader).clone(),
            None => other,
        };
        let body = format!("{before}{}{after}", random_case(&word, &flips));
        let role = role_from_answer(status, body.as_bytes(), &leader);
        let expect_leader = is_2xx(status) && leader.contains(&word);
        prop_assert_eq!(role == Role::Leader, expect_leader, "HTTP {} {:?} words {:?} -> {:?}", status, body, leader, role);
        if status == 404 {
            prop_assert_eq!(role, Role::Maintenance);
        } else if !is_2xx(status) {
            prop_assert!(matches!(role, Role::Down(_)), "HTTP {} -> {:?}", status, role);
        } else if !expect_leader {
            // A definite non-leader answer, or an empty body (a failed check).
            let expected = match word.as_str() {
                "replica" => Role::Replica,
                "" => Role::Down(format!("HTTP {status} with an empty body")),
                w => Role::Other(w.to_string()),
            };
            prop_assert_eq!(role, expected);
        }
    }

    /// Arbitrary bytes around and inside the body: still `Leader` only for an exact word.
    #[test]
    fn role_answer_arbitrary_bodies(
        status in status(),
        leader in leader_words(),
        body in vec(any::<u8>(), 0..64),
    ) {
        let role = role_from_answer(status, &body, &leader);
        let text = String::from_utf8_lossy(&body);
        let word = text.trim().to_ascii_lowercase();
        prop_assert_eq!(role == Role::Leader, is_2xx(status) && leader.contains(&word));
        prop_assert_eq!(role == Role::Maintenance, status == 404);
        prop_assert_eq!(matches!(role, Role::Down(_)), (!is_2xx(status) && status != 404) || (is_2xx(status) && word.is_empty()));
    }
}

// =============================================================================================
// Postgres startup packets: `pgwire::{parse_startup, check_length, read_startup, error_response}`
// =============================================================================================

const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;
const CANCEL_REQUEST: u32 = 80_877_102;
const PROTOCOL_3: u32 = 3 << 16;

fn body(code: u32, rest: &[u8]) -> Vec<u8> {
    let mut b = code.to_be_bytes().to_vec();
    b.extend_from_slice(rest);
    b
}

/// A packet on the wire: length (counting itself) and body.
fn frame(body: &[u8]) -> Vec<u8> {
    let mut f = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    f.extend_from_slice(body);
    f
}

fn startup_body(minor: u16, params: &[(String, String)]) -> Vec<u8> {
    let mut rest = Vec::new();
    for (name, value) in params {
        rest.extend_from_slice(name.as_bytes());
        rest.push(0);
        rest.extend_from_slice(value.as_bytes());
        rest.push(0);
    }
    rest.push(0);
    body(PROTOCOL_3 | u32::from(minor), &rest)
}

fn params() -> impl Strategy<Value = Vec<(String, String)>> {
    vec(("[^\0]{1,16}", "[^\0]{0,16}"), 0..8)
}

/// A code that is often one of the special ones.
fn code() -> impl Strategy<Value = u32> {
    prop_oneof![
        Just(SSL_REQUEST),
        Just(GSSENC_REQUEST),
        Just(CANCEL_REQUEST),
        any::<u16>().prop_map(|minor| PROTOCOL_3 | u32::from(minor)),
        any::<u32>(),
    ]
}

/// Bodies of every kind: valid, malformed, unsupported.
fn packet_body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(body(SSL_REQUEST, b"")),
        Just(body(GSSENC_REQUEST, b"")),
        (any::<u32>(), any::<u32>()).prop_map(|(p, k)| {
            let mut rest = p.to_be_bytes().to_vec();
            rest.extend_from_slice(&k.to_be_bytes());
            body(CANCEL_REQUEST, &rest)
        }),
        (any::<u16>(), params()).prop_map(|(minor, p)| startup_body(minor, &p)),
        (code(), vec(any::<u8>(), 0..32)).prop_map(|(c, rest)| body(c, &rest)),
    ]
}

/// Bytes a client might send before the proxy answers: packets, bad lengths, garbage, cut short.
fn client_bytes() -> impl Strategy<Value = Vec<u8>> {
    let chunk = prop_oneof![
        6 => packet_body().prop_map(|b| frame(&b)),
        // A length out of range, followed by as many bytes as it claims (up to 12000).
        1 => (prop_oneof![0u32..8, 10_001u32..12_000, 12_000u32..=u32::MAX], any::<u8>()).prop_map(|(len, fill)| {
            let mut f = len.to_be_bytes().to_vec();
            let follow = (len as usize).saturating_sub(4).min(12_000);
            f.extend(std::iter::repeat_n(fill, follow));
            f
        }),
        // A length in range with a random body.
        1 => vec(any::<u8>(), 4..64).prop_map(|b| frame(&b)),
        1 => vec(any::<u8>(), 0..16),
    ];
    (
        vec(chunk, 0..5),
        any::<prop::sample::Index>(),
        any::<bool>(),
    )
        .prop_map(|(chunks, cut, truncate)| {
            let mut bytes = chunks.concat();
            if truncate && !bytes.is_empty() {
                bytes.truncate(cut.index(bytes.len()));
            }
            bytes
        })
}

/// What `read_startup` must do with `input`, worked out packet by packet: the result, how many
/// bytes it may consume, and how many `N`s it must answer.
fn expected_read(input: &[u8]) -> (Result<StartupPacket, PgWireError>, usize, usize) {
    let mut at = 0;
    let mut answers = 0;
    for _ in 0..3 {
        let Some(len) = input.get(at..at + 4) else {
            return (Err(PgWireError::Closed), input.len(), answers);
        };
        let len = u32::from_be_bytes(len.try_into().expect("4 bytes"));
        if !(8..=MAX_STARTUP_LEN as u32).contains(&len) {
            return (Err(PgWireError::BadLength(len)), at + 4, answers);
        }
        let end = at + len as usize;
        let Some(packet) = input.get(at + 4..end) else {
            return (Err(PgWireError::Closed), input.len(), answers);
        };
        at = end;
        match parse_startup(packet) {
            Ok(StartupPacket::SslRequest | StartupPacket::GssEncRequest) => answers += 1,
            other => return (other, at, answers),
        }
    }
    (Err(PgWireError::TooManyRequests), at, answers)
}

/// Runs `read_startup` on the server end of an in-memory duplex whose client wrote `input` and
/// then closed its sending side. Returns the result, the bytes it consumed, and what it wrote.
fn run_read_startup(input: &[u8]) -> (Result<StartupPacket, PgWireError>, usize, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let (mut client, mut server) = tokio::io::duplex(input.len() + 64);
        client.write_all(input).await.expect("fits in the buffer");
        client.shutdown().await.expect("shutdown");
        let result = tokio::time::timeout(Duration::from_secs(10), read_startup(&mut server))
            .await
            .expect("read_startup never hangs on a closed stream");
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).await.expect("rest");
        drop(server);
        let mut written = Vec::new();
        client.read_to_end(&mut written).await.expect("answers");
        (result, input.len() - rest.len(), written)
    })
}

proptest! {
    #![proptest_config(config(CASES_FAST))]

    #[test]
    fn parse_startup_never_panics(bytes in vec(any::<u8>(), 0..128)) {
        let _ = parse_startup(&bytes);
    }

    /// Whatever it returns is consistent with the bytes.
    #[test]
    fn parse_startup_classifies_by_code(code in code(), rest in vec(any::<u8>(), 0..24)) {
        let b = body(code, &rest);
        let got = parse_startup(&b);
        match &got {
            Ok(StartupPacket::SslRequest) => prop_assert!(code == SSL_REQUEST && rest.is_empty()),
            Ok(StartupPacket::GssEncRequest) => prop_assert!(code == GSSENC_REQUEST && rest.is_empty()),
            Ok(StartupPacket::Cancel { process_id, secret_key }) => {
                prop_assert!(code == CANCEL_REQUEST && rest.len() == 8);
                prop_assert_eq!(*process_id, u32::from_be_bytes(rest[0..4].try_into().unwrap()));
                prop_assert_eq!(*secret_key, u32::from_be_bytes(rest[4..8].try_into().unwrap()));
            }
            Ok(StartupPacket::Startup { .. }) => {
                prop_assert_eq!(code >> 16, 3);
                prop_assert_eq!(rest.last(), Some(&0));
            }
            Err(PgWireError::UnsupportedProtocol { major, minor }) => {
                prop_assert!(code >> 16 != 3);
                prop_assert!(![SSL_REQUEST, GSSENC_REQUEST, CANCEL_REQUEST].contains(&code));
                prop_assert_eq!((u32::from(*major) << 16) | u32::from(*minor), code);
            }
            Err(PgWireError::Malformed) => {}
            Err(other) => prop_assert!(false, "parse_startup cannot return {other:?}"),
        }
        // A special code with the wrong size is malformed, never something else.
        if ([SSL_REQUEST, GSSENC_REQUEST].contains(&code) && !rest.is_empty())
            || (code == CANCEL_REQUEST && rest.len() != 8)
        {
            prop_assert_eq!(got, Err(PgWireError::Malformed));
        }
    }

    #[test]
    fn parse_startup_round_trips_params(minor in any::<u16>(), params in params()) {
        let got = parse_startup(&startup_body(minor, &params));
        prop_assert_eq!(got, Ok(StartupPacket::Startup { params }));
    }

    #[test]
    fn parse_startup_cancel(pid in any::<u32>(), key in any::<u32>()) {
        let mut rest = pid.to_be_bytes().to_vec();
        rest.extend_from_slice(&key.to_be_bytes());
        prop_assert_eq!(
            parse_startup(&body(CANCEL_REQUEST, &rest)),
            Ok(StartupPacket::Cancel { process_id: pid, secret_key: key })
        );
    }

    #[test]
    fn lengths_outside_8_to_10000_are_rejected(len in prop_oneof![0u32..=20, 9_990u32..=10_010, any::<u32>()]) {
        let got = check_length(len);
        if (8..=10_000).contains(&len) {
            prop_assert_eq!(got, Ok(len as usize - 4));
        } else {
            prop_assert_eq!(got, Err(PgWireError::BadLength(len)));
        }
    }

    /// The frame is well formed whatever the message holds, and carries all of it but NULs.
    #[test]
    fn error_response_is_well_formed(code in "[0-9A-Z]{5}", message in "\\PC{0,64}|.{0,16}") {
        let frame = error_response(&code, &message);
        prop_assert_eq!(frame[0], b'E');
        let len = u32::from_be_bytes(frame[1..5].try_into().unwrap()) as usize;
        prop_assert_eq!(len, frame.len() - 1);
        prop_assert_eq!(frame.last(), Some(&0));
        let fields: Vec<&[u8]> = frame[5..frame.len() - 1].split(|b| *b == 0).collect();
        // Four fields, each ended by a NUL, then the final NUL.
        prop_assert_eq!(fields.len(), 5);
        prop_assert!(fields[4].is_empty());
        let clean: Vec<u8> = message.bytes().filter(|b| *b != 0).collect();
        prop_assert_eq!(fields[0], &b"SFATAL"[..]);
        prop_assert_eq!(fields[1], &b"VFATAL"[..]);
        let c_field = [&b"C"[..], code.as_bytes()].concat();
        let m_field = [&b"M"[..], clean.as_slice()].concat();
        prop_assert_eq!(fields[2], c_field.as_slice());
        prop_assert_eq!(fields[3], m_field.as_slice());
    }
}

proptest! {
    #![proptest_config(config(CASES_IO))]

    /// Arbitrary, truncated and oversized input: `read_startup` never panics or hangs, gives the
    /// result the packets call for, answers `N` to each encryption request, and never reads
    /// beyond a bad length (it consumes exactly the 4 length bytes of the bad packet).
    #[test]
    fn read_startup_follows_the_packets(input in client_bytes()) {
        let (got, consumed, written) = run_read_startup(&input);
        let (want, want_consumed, answers) = expected_read(&input);
        prop_assert_eq!(&got, &want);
        prop_assert_eq!(consumed, want_consumed, "consumed bytes for {:?}", got);
        prop_assert_eq!(written, vec![b'N'; answers]);
    }

    /// Up to two SSLRequest/GSSENCRequest get exactly one `N` each, then the StartupMessage is
    /// returned; a third encryption request is refused.
    #[test]
    fn encryption_requests_get_exactly_n(
        requests in vec(prop_oneof![Just(SSL_REQUEST), Just(GSSENC_REQUEST)], 0..=4),
        minor in any::<u16>(),
        params in params(),
    ) {
        let mut input: Vec<u8> = requests.iter().flat_map(|c| frame(&body(*c, b""))).collect();
        input.extend(frame(&startup_body(minor, &params)));
        let (got, _, written) = run_read_startup(&input);
        if requests.len() <= 2 {
            prop_assert_eq!(got, Ok(StartupPacket::Startup { params }));
            prop_assert_eq!(written, vec![b'N'; requests.len()]);
        } else {
            prop_assert_eq!(got, Err(PgWireError::TooManyRequests));
            prop_assert_eq!(written, b"NNN".to_vec());
        }
    }

    /// A CancelRequest, after at most two encryption requests, comes back as itself.
    #[test]
    fn cancel_request_is_returned(
        requests in vec(prop_oneof![Just(SSL_REQUEST), Just(GSSENC_REQUEST)], 0..=2),
        pid in any::<u32>(),
        key in any::<u32>(),
    ) {
        let mut input: Vec<u8> = requests.iter().flat_map(|c| frame(&body(*c, b""))).collect();
        let mut rest = pid.to_be_bytes().to_vec();
        rest.extend_from_slice(&key.to_be_bytes());
        input.extend(frame(&body(CANCEL_REQUEST, &rest)));
        let (got, consumed, written) = run_read_startup(&input);
        prop_assert_eq!(got, Ok(StartupPacket::Cancel { process_id: pid, secret_key: key }));
        prop_assert_eq!(consumed, input.len());
        prop_assert_eq!(written, vec![b'N'; requests.len()]);
    }
}

// =============================================================================================
// Routing rules: `route::{decide_with, RoleHistory}`
// =============================================================================================

const POOL: usize = 5;

fn pool_addr(slot: usize) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 10 + slot as u8], 5433))
}

/// Roles as checks report them (never `Unknown`).
fn observed_role() -> impl Strategy<Value = Role> {
    prop_oneof![
        4 => Just(Role::Leader),
        2 => Just(Role::Replica),
        1 => prop_oneof![Just("zombie"), Just("readonly"), Just("witness")].prop_map(|w| Role::Other(w.into())),
        2 => Just(Role::Maintenance),
        2 => prop_oneof![Just("timed out"), Just("HTTP 500: no"), Just("connect: refused")].prop_map(|e| Role::Down(e.into())),
    ]
}

fn any_role() -> impl Strategy<Value = Role> {
    prop_oneof![8 => observed_role(), 1 => Just(Role::Unknown)]
}

/// One backend slot as routing sees it: (discovered, present, role).
type Slot = (bool, bool, Role);

fn slot(role: impl Strategy<Value = Role>) -> impl Strategy<Value = Slot> {
    (prop::bool::weighted(0.75), prop::bool::weighted(0.8), role)
}

/// A backend set evolving one change at a time: each step puts a slot in or out of the set,
/// or gives it a new source, presence or role.
fn evolution() -> impl Strategy<Value = Vec<(usize, Option<Slot>)>> {
    vec((0..POOL, option::weighted(0.85, slot(any_role()))), 1..60)
}

fn views(slots: &[Option<Slot>]) -> Vec<BackendView<'_>> {
    slots
        .iter()
        .enumerate()
        .filter_map(|(i, s)| {
            s.as_ref().map(|(discovered, present, role)| BackendView {
                addr: pool_addr(i),
                discovered: *discovered,
                present: *present,
                role,
                timeline: None,
                claim: Claim::default(),
                data_error: None,
            })
        })
        .collect()
}

fn describe(views: &[BackendView<'_>]) -> String {
    let rows: Vec<String> = views
        .iter()
        .map(|v| {
            format!(
                "{} {}{} {}",
                v.addr,
                if v.discovered { "dns" } else { "backup" },
                if v.present { "" } else { " (departed)" },
                v.role
            )
        })
        .collect();
    rows.join("; ")
}

/// The invariants of one `decide_with` step.
fn check_step(
    previous: &Route,
    views: &[BackendView<'_>],
    next: &Route,
) -> Result<(), TestCaseError> {
    let ctx = || {
        format!(
            "\nprevious {previous:?}\nbackends {}\nnext {next:?}",
            describe(views)
        )
    };
    let view = |addr: SocketAddr| views.iter().find(|v| v.addr == addr);
    let claims: Vec<&BackendView<'_>> = views.iter().filter(|v| *v.role == Role::Leader).collect();
    let discovered_claims: Vec<&&BackendView<'_>> =
        claims.iter().filter(|v| v.discovered).collect();
    let present_backup_claims: Vec<&&BackendView<'_>> = claims
        .iter()
        .filter(|v| !v.discovered && v.present)
        .collect();

    // Rule 5: the generation moves exactly when the sessions' backend changes, by one.
    let moved = next.target.backend() != previous.target.backend();
    prop_assert_eq!(
        next.generation,
        previous.generation + u64::from(moved),
        "generation{}",
        ctx()
    );

    match &next.target {
        // Rule 1: a new-session route only to a present backend that answered leader.
        Target::Leader(addr) => {
            let v = view(*addr);
            prop_assert!(
                v.is_some_and(|v| *v.role == Role::Leader && v.present),
                "route to a backend that is not a present leader{}",
                ctx()
            );
        }
        // Held never moves sessions anywhere new, and only a leader in maintenance or a leader
        // that left DNS is held.
        // The reason it gives is the one that applies.
        Target::Held(addr, why) => {
            prop_assert_eq!(
                previous.target.backend(),
                Some(*addr),
                "held a new backend{}",
                ctx()
            );
            let v = view(*addr);
            prop_assert!(
                v.is_some_and(|v| matches!(v.role, Role::Leader | Role::Maintenance)),
                "held a backend that is neither leader nor in maintenance{}",
                ctx()
            );
            let applies = v.is_some_and(|v| match why {
                Hold::Maintenance => *v.role == Role::Maintenance,
                Hold::LeftDns => !v.present,
                Hold::Unconfirmed => v.present && v.claim.standing == Standing::Expired,
            });
            prop_assert!(applies, "held for {:?}, which does not apply{}", why, ctx());
        }
        // A contested route keeps the leader it had, which is still a present leader.
        Target::Contested(addr) => {
            prop_assert_eq!(
                previous.target.backend(),
                Some(*addr),
                "contested a new backend{}",
                ctx()
            );
            prop_assert!(
                view(*addr).is_some_and(|v| *v.role == Role::Leader && v.present),
                "contested a backend that is not a present leader{}",
                ctx()
            );
        }
        Target::None(_) => {}
    }

    // Rule 3: two discovered leaders (present or not): no route at all, and it says why.
    if discovered_claims.len() >= 2 {
        let mut addrs: Vec<SocketAddr> = discovered_claims.iter().map(|v| v.addr).collect();
        addrs.sort();
        prop_assert_eq!(
            &next.target,
            &Target::None(NoRoute::SplitBrain(addrs)),
            "split brain{}",
            ctx()
        );
    }

    // Rule 4: a backup is never the target while a present discovered backend claims leader.
    if discovered_claims.iter().any(|v| v.present) {
        if let Some(addr) = next.target.backend() {
            prop_assert!(
                view(addr).is_some_and(|v| v.discovered),
                "backup routed while a discovered backend is leader{}",
                ctx()
            );
        }
    }

    // Rule 2: exactly one discovered leader, present: it is the route.
    if let [only] = discovered_claims.as_slice() {
        if only.present {
            prop_assert_eq!(
                &next.target,
                &Target::Leader(only.addr),
                "one leader{}",
                ctx()
            );
        }
    }

    // Rule 4: no discovered leader and one present backup leader: the backup is the route.
    if discovered_claims.is_empty() {
        if let [only] = present_backup_claims.as_slice() {
            prop_assert_eq!(&next.target, &Target::Leader(only.addr), "backup{}", ctx());
        }
        if present_backup_claims.len() >= 2 {
            prop_assert!(
                next.target.backend().is_none(),
                "two backup leaders{}",
                ctx()
            );
        }
    }

    // The input order does not matter.
    let mut reversed = views.to_vec();
    reversed.reverse();
    prop_assert_eq!(&decide(previous, &reversed), next, "order matters{}", ctx());
    Ok(())
}

/// Whether the confirmed role could be `Leader` given the raw answers: the answers since the last
/// definite non-leader answer hold `rise` leaders in a row. Failed checks after that never take
/// it down by themselves (rule 7: only a probe of its Postgres does), so `fall` plays no part.
fn leader_is_justified(answers: &[Role], rise: u32, _fall: u32) -> bool {
    let since = answers
        .iter()
        .rposition(|r| !matches!(r, Role::Leader | Role::Down(_)))
        .map_or(0, |i| i + 1);
    let tail = &answers[since..];
    let mut run = 0;
    let mut best = 0;
    for r in tail {
        run = if *r == Role::Leader { run + 1 } else { 0 };
        best = best.max(run);
    }
    best >= rise
}

fn kind(role: &Role) -> String {
    match role {
        Role::Other(w) => format!("other:{w}"),
        r => r.label().to_string(),
    }
}

proptest! {
    #![proptest_config(config(CASES_FAST))]

    /// Random backend sets and roles, changing one slot at a time from `Route::initial()`.
    #[test]
    fn routing_invariants_hold(
        start in vec(option::of(slot(any_role())), POOL),
        changes in evolution(),
    ) {
        let mut slots = start;
        let mut route = Route::initial();
        let mut ever_leader = false;
        for (i, change) in changes {
            slots[i] = change;
            let v = views(&slots);
            ever_leader |= v.iter().any(|v| *v.role == Role::Leader);
            let next = decide(&route, &v);
            check_step(&route, &v, &next)?;
            // Nothing is routed before the first positive answer.
            if !ever_leader {
                prop_assert_eq!(next.target.backend(), None);
            }
            route = next;
        }
    }

    /// Backend sets that change wholesale every step.
    #[test]
    fn routing_invariants_hold_for_any_sets(steps in vec(vec(option::of(slot(any_role())), POOL), 1..20)) {
        let mut route = Route::initial();
        for slots in steps {
            let v = views(&slots);
            let next = decide(&route, &v);
            check_step(&route, &v, &next)?;
            route = next;
        }
    }

    /// The rules fed by real hysteresis: each step every backend in the set gets one check
    /// answer, which goes through its `RoleHistory`. A route to a backend is always backed by the
    /// raw answers: `rise` leader answers in a row and no definite non-leader answer since.
    #[test]
    fn routing_through_hysteresis(
        rise in 1..4u32,
        fall in 1..4u32,
        membership in vec(vec(option::of((prop::bool::weighted(0.75), prop::bool::weighted(0.85))), POOL), 1..8),
        answers in vec(vec(observed_role(), POOL), 1..50),
    ) {
        let mut histories: Vec<RoleHistory> = vec![RoleHistory::default(); POOL];
        let mut raw: Vec<Vec<Role>> = vec![Vec::new(); POOL];
        let mut route = Route::initial();
        let per_set = answers.len().div_ceil(membership.len());
        for (step, row) in answers.into_iter().enumerate() {
            let set = &membership[(step / per_set).min(membership.len() - 1)];
            for (i, answer) in row.into_iter().enumerate() {
                if set[i].is_some() {
                    histories[i].observe(answer.clone(), rise, fall);
                    raw[i].push(answer);
                }
            }
            let slots: Vec<Option<Slot>> = set
                .iter()
                .enumerate()
                .map(|(i, m)| m.map(|(d, p)| (d, p, histories[i].role().clone())))
                .collect();
            let v = views(&slots);
            let next = decide(&route, &v);
            check_step(&route, &v, &next)?;
            if let Target::Leader(addr) = next.target {
                let i = (0..POOL).find(|i| pool_addr(*i) == addr).expect("pool");
                prop_assert!(
                    leader_is_justified(&raw[i], rise, fall),
                    "routed to {} with answers {:?} (rise {}, fall {})", addr, raw[i], rise, fall
                );
            }
            route = next;
        }
    }

    /// Becoming Leader takes `rise` consecutive Leader answers; a node that is not leader becomes
    /// Down after `fall` consecutive Down answers, a leader never on failed checks alone (rule 7);
    /// other answers count at once; the freshest detail is kept.
    #[test]
    fn role_history_rise_and_fall(
        rise in 1..5u32,
        fall in 1..5u32,
        answers in vec(observed_role(), 1..60),
    ) {
        let mut h = RoleHistory::default();
        prop_assert_eq!(h.role(), &Role::Unknown);
        for (i, answer) in answers.iter().enumerate() {
            let before = h.role().clone();
            let flipped = h.observe(answer.clone(), rise, fall);
            let after = h.role().clone();
            let last = |n: u32, f: &dyn Fn(&Role) -> bool| {
                i + 1 >= n as usize && answers[i + 1 - n as usize..=i].iter().all(f)
            };
            let ctx = || format!("answers {:?} step {i} rise {rise} fall {fall}: {before:?} -> {after:?}", &answers[..=i]);
            prop_assert_eq!(flipped, kind(&before) != kind(&after), "{}", ctx());
            // Safety: no flip to Leader or Down without the run.
            if after == Role::Leader && before != Role::Leader {
                prop_assert!(last(rise, &|r: &Role| *r == Role::Leader), "leader too early: {}", ctx());
            }
            if matches!(after, Role::Down(_)) && !matches!(before, Role::Down(_)) {
                prop_assert!(last(fall, &|r: &Role| matches!(r, Role::Down(_))), "down too early: {}", ctx());
            }
            // Liveness: the run is enough.
            if last(rise, &|r: &Role| *r == Role::Leader) {
                prop_assert_eq!(&after, &Role::Leader, "{}", ctx());
            }
            if last(fall, &|r: &Role| matches!(r, Role::Down(_))) && before != Role::Leader {
                prop_assert_eq!(&after, answer, "{}", ctx());
            }
            // Rule 7: failed checks leave a leader a leader (failing, for the probe to settle).
            if before == Role::Leader && matches!(answer, Role::Down(_)) {
                prop_assert_eq!(&after, &Role::Leader, "{}", ctx());
                prop_assert!(h.is_failing(), "{}", ctx());
            }
            // A definite non-leader answer counts at once.
            if matches!(answer, Role::Replica | Role::Maintenance | Role::Other(_)) {
                prop_assert_eq!(&after, answer, "{}", ctx());
            }
            // Same kind again: the detail is refreshed.
            if kind(answer) == kind(&before) {
                prop_assert_eq!(&after, answer, "{}", ctx());
            }
            // Only the answer just seen, or the role before it, can be the role now.
            prop_assert!(after == before || after == *answer || (before == Role::Leader && after == Role::Leader), "{}", ctx());
            if after == Role::Leader {
                prop_assert!(leader_is_justified(&answers[..=i], rise, fall), "{}", ctx());
            }
        }
    }
}

// Rule 7: claims with evidence (`Claim`: sequence numbers and standing)
// ---------------------------------------------------------------------------------------------

/// A leader claim: its first and latest `leader` answer numbers and its standing.
fn claim() -> impl Strategy<Value = Claim> {
    (
        0..10u64,
        0..6u64,
        prop_oneof![
            3 => Just(Standing::Confirmed),
            2 => Just(Standing::Unconfirmed),
            1 => Just(Standing::Expired),
        ],
    )
        .prop_map(|(first, more, standing)| Claim {
            first,
            last: first + more,
            standing,
            ..Claim::default()
        })
}

/// (discovered, present, role, claim) per pool slot.
type ClaimSlot = (bool, bool, Role, Claim);

fn claim_views(slots: &[Option<ClaimSlot>]) -> Vec<BackendView<'_>> {
    slots
        .iter()
        .enumerate()
        .filter_map(|(i, s)| {
            s.as_ref()
                .map(|(discovered, present, role, claim)| BackendView {
                    addr: pool_addr(i),
                    discovered: *discovered,
                    present: *present,
                    role,
                    timeline: None,
                    claim: *claim,
                    data_error: None,
                })
        })
        .collect()
}

fn claim_slots() -> impl Strategy<Value = Vec<Option<ClaimSlot>>> {
    vec(
        option::weighted(
            0.8,
            (
                prop::bool::weighted(0.8),
                prop::bool::weighted(0.85),
                prop_oneof![3 => Just(Role::Leader), 1 => observed_role()],
                claim(),
            ),
        ),
        POOL,
    )
}

fn any_route() -> impl Strategy<Value = Route> {
    (0..POOL, 0..3u8, 0..5u64).prop_map(|(i, kind, generation)| Route {
        generation,
        target: match kind {
            0 => Target::Leader(pool_addr(i)),
            1 => Target::Held(pool_addr(i), Hold::Maintenance),
            _ => Target::None(NoRoute::NoLeader),
        },
    })
}

proptest! {
    #![proptest_config(config(CASES_FAST))]

    /// A confirmed claim always beats an unconfirmed one: while any discovered, present node's
    /// claim is confirmed, the route never goes to an unconfirmed or expired claim.
    #[test]
    fn a_confirmed_claim_always_beats_an_unconfirmed_one(previous in any_route(), slots in claim_slots()) {
        let v = claim_views(&slots);
        let next = decide(&previous, &v);
        let confirmed_rival = v.iter().any(|b| b.discovered && b.present && *b.role == Role::Leader && b.claim.standing == Standing::Confirmed);
        if let (true, Some(addr)) = (confirmed_rival, next.target.backend()) {
            let chosen = v.iter().find(|b| b.addr == addr).expect("routed to a known backend");
            prop_assert!(
                *chosen.role != Role::Leader || chosen.claim.standing == Standing::Confirmed,
                "routed to {:?} over a confirmed claim: {:?}", chosen, v
            );
        }
    }

    /// A stale claim never yields split brain: every pair of claims named in a split brain has
    /// answered `leader` again since the other's claim began.
    #[test]
    fn a_stale_claim_never_yields_split_brain(previous in any_route(), slots in claim_slots()) {
        let v = claim_views(&slots);
        let next = decide(&previous, &v);
        if let Target::None(NoRoute::SplitBrain(addrs)) = &next.target {
            let claims: Vec<Claim> = addrs
                .iter()
                .map(|a| v.iter().find(|b| b.addr == *a).expect("known").claim)
                .collect();
            prop_assert!(claims.len() >= 2, "split brain with {} claims", claims.len());
            for a in &claims {
                for b in &claims {
                    prop_assert!(a.last >= b.first, "stale claim {:?} vs {:?} called split brain: {:?}", a, b, v);
                }
            }
        }
        // Verifying, like split brain, never routes anyone.
        if let Target::None(NoRoute::Verifying(addrs)) = &next.target {
            prop_assert!(addrs.len() >= 2);
        }
    }

    /// An unconfirmed leader that is the previous route, with no other claim, keeps the route
    /// and its generation: its sessions stay (held once past the bound).
    #[test]
    fn an_unconfirmed_leader_that_is_the_route_keeps_the_generation(
        generation in 0..100u64,
        standing in prop_oneof![Just(Standing::Unconfirmed), Just(Standing::Expired)],
        others in vec(prop_oneof![Just(Role::Replica), Just(Role::Maintenance), Just(Role::Down("x".into()))], 0..POOL - 1),
    ) {
        let previous = Route { generation, target: Target::Leader(pool_addr(0)) };
        let mut slots: Vec<Option<ClaimSlot>> = vec![Some((true, true, Role::Leader, Claim { first: 1, last: 3, standing, ..Claim::default() }))];
        slots.extend(others.into_iter().map(|r| Some((true, true, r, Claim::default()))));
        let v = claim_views(&slots);
        let next = decide(&previous, &v);
        prop_assert_eq!(next.generation, generation);
        prop_assert_eq!(next.target.backend(), Some(pool_addr(0)));
        prop_assert_eq!(next.leader().is_some(), standing == Standing::Unconfirmed);
    }
}

// ---------------------------------------------------------------------------------------------
// Split brain by timeline (`decide_with`), replica choice (`least_loaded`), replica usability
// ---------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config(CASES_FAST))]

    /// With `highest-timeline`, a route to a leader that is not the only one claiming is only
    /// ever to the claim on the strictly newest timeline; with every timeline equal (or unknown)
    /// it decides exactly as the default policy does.
    #[test]
    fn highest_timeline_only_picks_a_strictly_newest_claim(
        slots in vec(option::of(slot(any_role())), POOL),
        timelines in vec(option::weighted(0.85, 1..6u32), POOL),
        previous_slot in option::of(0..POOL),
        generation in 0..5u64,
    ) {
        let mut v = views(&slots);
        for view in v.iter_mut() {
            let i = (0..POOL).find(|i| pool_addr(*i) == view.addr).expect("pool");
            view.timeline = timelines[i];
        }
        let previous = Route {
            generation,
            target: previous_slot.map_or(Target::None(NoRoute::NoLeader), |i| Target::Leader(pool_addr(i))),
        };
        let next = decide_with(&previous, &v, SplitBrain::HighestTimeline);
        let default = decide(&previous, &v);
        check_step(&previous, &v, &next).or_else(|e| {
            // The only rule this policy may break on purpose: a route despite several claims.
            if matches!(default.target, Target::None(NoRoute::SplitBrain(_))) { Ok(()) } else { Err(e) }
        })?;
        if next.target != default.target {
            prop_assert!(
                matches!(default.target, Target::None(NoRoute::SplitBrain(_))),
                "the policy only settles split brains: {:?} vs {:?}", next, default
            );
            let chosen = next.target.backend().and_then(|c| v.iter().find(|b| b.addr == c));
            // A route to a node that does not claim leader can only be the previous leader held
            // (maintenance): the newest claim had left DNS, as if it were the only claim.
            if let Some(held) = chosen.filter(|b| *b.role != Role::Leader) {
                prop_assert_eq!(Some(held.addr), previous.target.backend());
                prop_assert!(matches!(next.target, Target::Held(..)), "{:?}", next);
            }
            if let Some(chosen) = chosen.filter(|b| *b.role == Role::Leader) {
                let rivals: Vec<&BackendView<'_>> = v
                    .iter()
                    .filter(|b| *b.role == Role::Leader && b.discovered == chosen.discovered && b.addr != chosen.addr)
                    .filter(|b| b.discovered || b.present)
                    .collect();
                // Chosen over rivals of its own kind (discovered or backup) only when newer than
                // each; with none, it was chosen as the only claim of its kind.
                prop_assert!(rivals.is_empty() || chosen.timeline.is_some());
                for rival in rivals {
                    prop_assert!(
                        rival.timeline.is_some() && rival.timeline < chosen.timeline,
                        "{} (timeline {:?}) chosen over {} (timeline {:?})",
                        chosen.addr, chosen.timeline, rival.addr, rival.timeline
                    );
                }
            }
        }
    }

    /// `least_loaded` picks a listed, not excluded replica with the fewest sessions, and finds
    /// one whenever one is left.
    #[test]
    fn least_loaded_picks_a_least_loaded_candidate(
        replicas in vec(0..POOL, 0..POOL),
        loads in vec(0..4u64, POOL),
        excluded in vec(0..POOL, 0..3),
        turn in 0..100usize,
    ) {
        let replicas: Vec<SocketAddr> = replicas.into_iter().map(pool_addr).collect();
        let excluded: Vec<SocketAddr> = excluded.into_iter().map(pool_addr).collect();
        let sessions: BTreeMap<SocketAddr, u64> =
            (0..POOL).map(|i| (pool_addr(i), loads[i])).collect();
        let candidates: Vec<SocketAddr> =
            replicas.iter().filter(|a| !excluded.contains(a)).copied().collect();
        match least_loaded(&replicas, |a| sessions[&a], &excluded, turn) {
            None => prop_assert!(candidates.is_empty()),
            Some(pick) => {
                prop_assert!(candidates.contains(&pick));
                let least = candidates.iter().map(|a| sessions[a]).min().expect("candidates");
                prop_assert_eq!(sessions[&pick], least);
            }
        }
    }

    /// A node usable as a replica is a confirmed replica whose latest definite answer was not
    /// `leader`: a node being promoted is never sent read-only sessions, whatever `rise` is.
    #[test]
    fn a_usable_replica_has_not_claimed_leader_since_its_last_replica_answer(
        rise in 1..5u32,
        fall in 1..5u32,
        answers in vec(observed_role(), 1..60),
    ) {
        let mut h = RoleHistory::default();
        for (i, answer) in answers.iter().enumerate() {
            h.observe(answer.clone(), rise, fall);
            let latest_definite = answers[..=i].iter().rev().find(|r| !matches!(r, Role::Down(_)));
            if h.is_replica() {
                prop_assert_eq!(h.role(), &Role::Replica);
                prop_assert_eq!(latest_definite, Some(&Role::Replica), "answers {:?}", &answers[..=i]);
            }
        }
    }
}
