//! Names → addresses: resolves `backends.dns_names` and the backup addresses given by name
//! every `resolve_interval`, adds the backup addresses, and sends the backend set to the leader
//! view whenever it changes.
//!
//! A failed lookup keeps that name's last good answer: a DNS outage must not look like every
//! node leaving. Only [`DnsResolver`] touches hickory.
//!
//! Answers no node can have are dropped with a warning: the unspecified address (a connect to
//! `0.0.0.0` reaches this host), multicast and broadcast. A steady bad answer is warned about
//! once; changing ones, and failed lookups, at most once per name and reason every 10 s
//! ([`ratelimit`]), so a DNS server rotating bad answers cannot flood the log. Loopback stays allowed: a proxy may
//! front a node on its own host, and the tests' nodes are loopback addresses. An address that
//! is one of the proxy's own listeners is dropped too ([`crate::own_addresses`]).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::config::{
    ConnectionConfig, LookupIpStrategy, NameServerConfig, ResolverConfig,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::NetError;
use hickory_resolver::proto::op::Query;
use hickory_resolver::proto::rr::{Name, RData, RecordType};
use hickory_resolver::{Hosts, TokioResolver};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use roleproxy_core::route::Source;

use crate::config::{BackendsConfig, Config, Endpoint, IpFamily};
use crate::metrics::{self as m, warning};
use crate::own_addresses::OwnAddrs;
use roleproxy_common::ratelimit;

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("cannot build the DNS resolver: {0}")]
    Resolver(NetError),
    #[error("timed out")]
    Timeout,
    #[error("no such name (NXDOMAIN)")]
    NxDomain,
    #[error("no address records")]
    NoRecords,
    /// Any other failure, as text made printable: it can quote the DNS server's answer.
    #[error("{0}")]
    Lookup(String),
}

impl DiscoveryError {
    /// A short label for the `result` metric label.
    pub fn label(&self) -> &'static str {
        match self {
            DiscoveryError::Resolver(_) => "resolver",
            DiscoveryError::Timeout => "timeout",
            DiscoveryError::NxDomain => "nxdomain",
            DiscoveryError::NoRecords => "no_records",
            DiscoveryError::Lookup(_) => "error",
        }
    }
}

/// The one wrapper around hickory: asks for A and AAAA, never caches (every tick is a fresh
/// answer), and bounds each lookup.
pub struct DnsResolver {
    inner: TokioResolver,
    timeout: Duration,
    /// The system's hosts file, read once: a name it lists is answered from it alone.
    hosts: Option<Hosts>,
}

impl DnsResolver {
    pub fn new(nameservers: &[SocketAddr], timeout: Duration) -> Result<Self, DiscoveryError> {
        let provider = TokioRuntimeProvider::default();
        let mut builder = if nameservers.is_empty() {
            TokioResolver::builder(provider).map_err(DiscoveryError::Resolver)?
        } else {
            let servers = nameservers
                .iter()
                .map(|ns| {
                    let mut udp = ConnectionConfig::udp();
                    udp.port = ns.port();
                    let mut tcp = ConnectionConfig::tcp();
                    tcp.port = ns.port();
                    NameServerConfig::new(ns.ip(), true, vec![udp, tcp])
                })
                .collect();
            TokioResolver::builder_with_config(ResolverConfig::from_name_servers(servers), provider)
        };
        let opts = builder.options_mut();
        opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        opts.cache_size = 0;
        opts.timeout = timeout;
        opts.attempts = 1;
        opts.ndots = 0;
        let inner = builder.build().map_err(DiscoveryError::Resolver)?;
        Ok(Self {
            inner,
            timeout,
            hosts: Hosts::from_system().ok(),
        })
    }

    /// The addresses the hosts file gives `fqdn`, as the C library's `files` source answers
    /// before DNS is asked. Hickory asks DNS for the family the file leaves out, so a name
    /// listed with IPv4 only would wait on (and fail with) a slow or unreachable DNS server.
    fn in_hosts_file(&self, fqdn: &str) -> Option<Vec<IpAddr>> {
        let name = Name::from_ascii(fqdn).ok()?;
        let hosts = self.hosts.as_ref()?;
        let ips: Vec<IpAddr> = [RecordType::A, RecordType::AAAA]
            .into_iter()
            .filter_map(|kind| hosts.lookup_static_host(&Query::query(name.clone(), kind)))
            .flat_map(|lookup| {
                lookup
                    .answers()
                    .iter()
                    .filter_map(|record| match &record.data {
                        RData::A(a) => Some(IpAddr::V4(a.0)),
                        RData::AAAA(aaaa) => Some(IpAddr::V6(aaaa.0)),
                        _ => None,
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        (!ips.is_empty()).then_some(ips)
    }

    /// Every address of `name`, both families.
    pub async fn resolve(&self, name: &str) -> Result<Vec<IpAddr>, DiscoveryError> {
        // Absolute name: search domains must never turn `iad.app.internal` into something else.
        let fqdn = if name.ends_with('.') {
            name.to_string()
        } else {
            format!("{name}.")
        };
        if let Some(ips) = self.in_hosts_file(&fqdn) {
            return Ok(ips);
        }
        // The resolver's own timeout covers each query; this bounds the whole lookup.
        let lookup = tokio::time::timeout(self.timeout * 2, self.inner.lookup_ip(fqdn))
            .await
            .map_err(|_| DiscoveryError::Timeout)?;
        match lookup {
            Ok(found) => Ok(found.iter().collect()),
            Err(e) if e.is_nx_domain() => Err(DiscoveryError::NxDomain),
            Err(e) if e.is_no_records_found() => Err(DiscoveryError::NoRecords),
            Err(NetError::Timeout) => Err(DiscoveryError::Timeout),
            Err(e) => Err(DiscoveryError::Lookup(
                roleproxy_core::printable(&e.to_string()).into_owned(),
            )),
        }
    }
}

/// One name to connect to, resolved as discovery resolves `backends.dns_names`: the same
/// resolver, the same family preference, the same answers dropped.
pub struct HostResolver {
    resolver: DnsResolver,
    prefer: IpFamily,
}

impl HostResolver {
    pub fn new(config: &BackendsConfig) -> Result<Self, DiscoveryError> {
        Ok(Self {
            resolver: DnsResolver::new(&config.nameservers, config.resolve_timeout)?,
            prefer: config.prefer,
        })
    }

    /// The addresses of `host` to try, preferred family first, lowest first; at least one.
    pub async fn resolve(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, DiscoveryError> {
        let ips = self.resolver.resolve(host).await?;
        let (usable, _) = usable_addresses(&ips);
        let kept = select_addresses(&usable, self.prefer, usize::MAX);
        if kept.is_empty() {
            return Err(DiscoveryError::NoRecords);
        }
        Ok(kept
            .into_iter()
            .map(|ip| SocketAddr::new(ip, port))
            .collect())
    }
}

/// Every name discovery resolves: `dns_names`, then the hosts of backups given by name. Pure.
pub fn names(config: &BackendsConfig) -> Vec<String> {
    let mut names = config.dns_names.clone();
    for host in config.backup.iter().filter_map(Endpoint::host) {
        if !names.iter().any(|n| n == host) {
            names.push(host.to_owned());
        }
    }
    names
}

/// The names of `config` that do not resolve with its resolver, each with its key and why:
/// what `roleproxy check --resolve` warns about.
pub async fn unresolved(config: &Config) -> Vec<(String, String, DiscoveryError)> {
    let names = config.names();
    let resolver = match DnsResolver::new(
        &config.backends.nameservers,
        config.backends.resolve_timeout,
    ) {
        Ok(r) => r,
        Err(e) => {
            let why = e.to_string();
            return names
                .into_iter()
                .map(|(key, name)| (key, name.to_owned(), DiscoveryError::Lookup(why.clone())))
                .collect();
        }
    };
    let mut failed = Vec::new();
    for (key, name) in names {
        let usable = match resolver.resolve(name).await {
            Ok(ips) => usable_addresses(&ips).0,
            Err(e) => {
                failed.push((key, name.to_owned(), e));
                continue;
            }
        };
        if usable.is_empty() {
            failed.push((key, name.to_owned(), DiscoveryError::NoRecords));
        }
    }
    failed
}

/// Addresses for a log line: `127.0.0.11, 127.0.0.12`, or `none`.
fn list(ips: &[IpAddr]) -> String {
    if ips.is_empty() {
        return "none".to_owned();
    }
    ips.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Why an answer cannot be a node, or `None` when it can. Pure.
pub fn odd_address(ip: IpAddr) -> Option<&'static str> {
    let ip = ip.to_canonical();
    if ip.is_unspecified() {
        return Some("unspecified");
    }
    if ip.is_multicast() {
        return Some("multicast");
    }
    match ip {
        IpAddr::V4(v4) if v4.is_broadcast() => Some("broadcast"),
        _ => None,
    }
}

/// Splits one name's answer into the addresses that can be nodes and those dropped, each with
/// its reason. Pure.
pub fn usable_addresses(ips: &[IpAddr]) -> (Vec<IpAddr>, Vec<(IpAddr, &'static str)>) {
    let mut usable = Vec::new();
    let mut dropped = Vec::new();
    for ip in ips {
        match odd_address(*ip) {
            None => usable.push(*ip),
            Some(reason) => dropped.push((*ip, reason)),
        }
    }
    (usable, dropped)
}

/// Picks the addresses kept for one name: the preferred family when the name has it, sorted,
/// deduplicated, at most `max`. Pure.
pub fn select_addresses(ips: &[IpAddr], prefer: IpFamily, max: usize) -> Vec<IpAddr> {
    let is_preferred = |ip: &IpAddr| match prefer {
        IpFamily::Ipv6 => ip.is_ipv6(),
        IpFamily::Ipv4 => ip.is_ipv4(),
    };
    let has_preferred = ips.iter().any(is_preferred);
    let set: BTreeSet<IpAddr> = ips
        .iter()
        .copied()
        .filter(|ip| is_preferred(ip) == has_preferred)
        .collect();
    set.into_iter().take(max).collect()
}

/// A backend the discovery wants checked.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Backend {
    /// Where client connections go (`ip:backends.port`, or the backup address).
    pub addr: SocketAddr,
    pub sources: Vec<Source>,
}

/// What discovery reports.
#[derive(Debug)]
pub enum Discovered {
    /// The full current backend set.
    Backends(Vec<Backend>),
    /// The DNS names whose lookups fail right now (empty once they answer again).
    DnsFailing(Vec<String>),
}

/// Builds the backend set from each name's addresses (`resolved`, by name) and the backups.
/// A backup given by name has the addresses its name resolved to, at its own port. Pure.
pub fn backend_set(
    resolved: &BTreeMap<String, Vec<IpAddr>>,
    config: &BackendsConfig,
) -> Vec<Backend> {
    let mut set: BTreeMap<SocketAddr, Vec<Source>> = BTreeMap::new();
    for name in &config.dns_names {
        for ip in resolved.get(name).into_iter().flatten() {
            set.entry(SocketAddr::new(*ip, config.port))
                .or_default()
                .push(Source::Dns(name.clone()));
        }
    }
    for backup in &config.backup {
        let addrs: Vec<SocketAddr> = match backup {
            Endpoint::Addr(addr) => vec![*addr],
            Endpoint::Name { host, port } => resolved
                .get(host)
                .into_iter()
                .flatten()
                .map(|ip| SocketAddr::new(*ip, *port))
                .collect(),
        };
        for addr in addrs {
            let sources = set.entry(addr).or_default();
            if !sources.contains(&Source::Backup) {
                sources.push(Source::Backup);
            }
        }
    }
    set.into_iter()
        .map(|(addr, sources)| Backend { addr, sources })
        .collect()
}

/// Resolves every name each interval and reports changes to `events`, whatever type of event
/// the receiver takes, until cancelled.
pub async fn run<E: From<Discovered>>(
    mut configs: watch::Receiver<BackendsConfig>,
    events: mpsc::Sender<E>,
    own: Arc<OwnAddrs>,
    cancel: CancellationToken,
) {
    let mut config = configs.borrow_and_update().clone();
    names(&config)
        .iter()
        .for_each(|name| m::dns_name_configured(name));
    let mut resolver = resolver_for(&config);
    let mut last_good: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
    let mut last_sent: Option<Vec<Backend>> = None;
    let mut failing_sent: Vec<String> = Vec::new();
    // Dropped answers already warned about, so a steady bad answer logs once, not every tick.
    let mut warned: BTreeSet<(SocketAddr, &'static str)> = BTreeSet::new();
    let mut tick = tokio::time::interval(config.resolve_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
            changed = configs.changed() => {
                if changed.is_err() {
                    return;
                }
                // A reload: names that stay keep their last good answer, so a leader that is
                // still listed is not dropped while DNS is slow or down.
                let new = configs.borrow_and_update().clone();
                if (&new.nameservers, new.resolve_timeout) != (&config.nameservers, config.resolve_timeout) {
                    resolver = resolver_for(&new);
                }
                if new.resolve_interval != config.resolve_interval {
                    tick = tokio::time::interval(new.resolve_interval);
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                }
                let new_names = names(&new);
                last_good.retain(|name, _| new_names.contains(name));
                new_names.iter().for_each(|name| m::dns_name_configured(name));
                config = new;
            }
        }
        let mut failing: Vec<String> = Vec::new();
        let mut dropped: BTreeSet<(SocketAddr, &'static str)> = BTreeSet::new();
        if let Some(resolver) = &resolver {
            for name in &names(&config) {
                let result = tokio::select! {
                    _ = cancel.cancelled() => return,
                    r = resolver.resolve(name) => r,
                };
                match result {
                    Ok(ips) => {
                        m::dns_resolution(name, "ok");
                        let (ips, odd) = usable_addresses(&ips);
                        for (ip, reason) in odd {
                            m::discovery_dropped(reason);
                            let addr = SocketAddr::new(ip, config.port);
                            // A steady bad answer is warned about once; new ones at most
                            // once per name and reason every 10 s, however they rotate.
                            if !warned.contains(&(addr, reason)) {
                                if let Some(suppressed) = ratelimit::allow(
                                    warning::DNS_DROPPED,
                                    format_args!("{name} {reason}"),
                                ) {
                                    tracing::warn!(name = %name, address = %ip, reason, suppressed, "DNS answer dropped: no node has this address");
                                }
                            }
                            dropped.insert((addr, reason));
                        }
                        let kept = select_addresses(&ips, config.prefer, config.max);
                        if last_good.get(name) != Some(&kept) {
                            tracing::info!(name = %name, addresses = %list(&kept), "DNS answer changed");
                        }
                        last_good.insert(name.clone(), kept);
                    }
                    Err(e) => {
                        m::dns_resolution(name, e.label());
                        failing.push(format!("{} ({})", name.trim_end_matches('.'), e.label()));
                        if let Some(suppressed) = ratelimit::allow(warning::DNS_FAILED, name) {
                            tracing::warn!(name = %name, error = %e, kept = %list(last_good.get(name).map_or(&[], Vec::as_slice)), suppressed, "DNS lookup failed; keeping the last good answer");
                        }
                    }
                }
            }
        }
        if failing != failing_sent {
            if events
                .send(Discovered::DnsFailing(failing.clone()).into())
                .await
                .is_err()
            {
                return;
            }
            failing_sent = failing;
        }
        own.refresh_interfaces();
        let mut set = backend_set(&last_good, &config);
        set.retain(|backend| {
            let Some(listener) = own.covering(backend.addr) else {
                return true;
            };
            m::discovery_dropped(OWN_ADDRESS);
            let allowed = if warned.contains(&(backend.addr, OWN_ADDRESS)) {
                None
            } else {
                ratelimit::allow(warning::DNS_DROPPED, OWN_ADDRESS)
            };
            if let Some(suppressed) = allowed {
                tracing::warn!(backend = %backend.addr, sources = %backend.sources.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "), %listener, suppressed, "backend dropped: it is this proxy's own listener, and connecting to it would loop");
            }
            dropped.insert((backend.addr, OWN_ADDRESS));
            false
        });
        warned = dropped;
        if last_sent.as_ref() != Some(&set) {
            if events
                .send(Discovered::Backends(set.clone()).into())
                .await
                .is_err()
            {
                return;
            }
            last_sent = Some(set);
        }
    }
}

/// The `reason` of a backend dropped for being one of the proxy's own listeners.
pub const OWN_ADDRESS: &str = "own_address";

fn resolver_for(config: &BackendsConfig) -> Option<DnsResolver> {
    match DnsResolver::new(&config.nameservers, config.resolve_timeout) {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::error!(error = %e, "DNS discovery disabled; only backup addresses are used");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// (what, answer, prefer, max, kept)
    type Row = (&'static str, Vec<IpAddr>, IpFamily, usize, Vec<IpAddr>);

    #[test]
    fn address_selection() {
        let v4a = ip("10.0.0.2");
        let v4b = ip("10.0.0.1");
        let v6a = ip("fdaa::2");
        let v6b = ip("fdaa::1");
        let rows: Vec<Row> = vec![
            (
                "both families, prefer v6",
                vec![v4a, v6a, v6b],
                IpFamily::Ipv6,
                10,
                vec![v6b, v6a],
            ),
            (
                "both families, prefer v4",
                vec![v4a, v6a, v4b],
                IpFamily::Ipv4,
                10,
                vec![v4b, v4a],
            ),
            (
                "only v4 while v6 preferred",
                vec![v4a, v4b],
                IpFamily::Ipv6,
                10,
                vec![v4b, v4a],
            ),
            (
                "duplicates removed",
                vec![v6a, v6a, v6b],
                IpFamily::Ipv6,
                10,
                vec![v6b, v6a],
            ),
            (
                "at most max, lowest first",
                vec![v6a, v6b],
                IpFamily::Ipv6,
                1,
                vec![v6b],
            ),
            ("nothing", vec![], IpFamily::Ipv6, 10, vec![]),
        ];
        for (what, ips, prefer, max, expected) in rows {
            assert_eq!(select_addresses(&ips, prefer, max), expected, "{what}");
        }
    }

    #[test]
    fn odd_answers_are_dropped_and_loopback_stays() {
        // (answer, why it is dropped)
        let rows: &[(&str, Option<&str>)] = &[
            ("0.0.0.0", Some("unspecified")),
            ("::", Some("unspecified")),
            ("::ffff:0.0.0.0", Some("unspecified")),
            ("224.0.0.1", Some("multicast")),
            ("239.255.255.250", Some("multicast")),
            ("ff02::1", Some("multicast")),
            ("ff05::1:3", Some("multicast")),
            ("255.255.255.255", Some("broadcast")),
            ("::ffff:255.255.255.255", Some("broadcast")),
            ("127.0.0.1", None),
            ("127.9.0.11", None),
            ("::1", None),
            ("10.0.0.1", None),
            ("fdaa::3", None),
            ("169.254.1.1", None),
        ];
        for (answer, expected) in rows {
            assert_eq!(odd_address(ip(answer)), *expected, "{answer}");
        }
        let (usable, dropped) = usable_addresses(&[ip("0.0.0.0"), ip("127.0.0.11"), ip("ff02::1")]);
        assert_eq!(usable, vec![ip("127.0.0.11")]);
        assert_eq!(
            dropped,
            vec![(ip("0.0.0.0"), "unspecified"), (ip("ff02::1"), "multicast")]
        );
    }

    #[test]
    fn backend_set_merges_sources() {
        let mut resolved = BTreeMap::new();
        resolved.insert(
            "a.internal".to_string(),
            vec![ip("127.0.0.11"), ip("127.0.0.12")],
        );
        resolved.insert("b.internal".to_string(), vec![ip("127.0.0.12")]);
        // A backup by name: its answer, at its own port; an answer for a name no longer
        // configured is not used.
        resolved.insert("pg-a.test".to_string(), vec![ip("127.0.0.13")]);
        resolved.insert("gone.internal".to_string(), vec![ip("127.0.0.14")]);
        let config = BackendsConfig {
            dns_names: vec!["a.internal".into(), "b.internal".into()],
            port: 5433,
            backup: [
                "127.0.0.12:5433",
                "127.0.0.1:6000",
                "pg-a.test:6001",
                "nowhere.test:1",
            ]
            .iter()
            .map(|e| e.parse().unwrap())
            .collect(),
            ..BackendsConfig::default()
        };
        assert_eq!(
            names(&config),
            ["a.internal", "b.internal", "pg-a.test", "nowhere.test"]
        );
        let set = backend_set(&resolved, &config);
        let got: Vec<(String, Vec<String>)> = set
            .iter()
            .map(|b| {
                (
                    b.addr.to_string(),
                    b.sources.iter().map(ToString::to_string).collect(),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("127.0.0.1:6000".to_string(), vec!["backup".to_string()]),
                (
                    "127.0.0.11:5433".to_string(),
                    vec!["dns:a.internal".to_string()]
                ),
                (
                    "127.0.0.12:5433".to_string(),
                    vec![
                        "dns:a.internal".to_string(),
                        "dns:b.internal".to_string(),
                        "backup".to_string()
                    ]
                ),
                ("127.0.0.13:6001".to_string(), vec!["backup".to_string()]),
            ]
        );
    }
}
