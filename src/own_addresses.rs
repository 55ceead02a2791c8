//! The proxy's own addresses, so it never connects to itself.
//!
//! A backend address that is one of the proxy's listeners (given exactly, or covered by a
//! wildcard such as `0.0.0.0:5432` on a local interface) would send each client back into the
//! proxy, which would connect again: one client could chain sessions until `max_connections`
//! and the leader's own limit are spent. A configuration with such an address is not applied
//! (at start-up or reload), discovery drops them, and a session refuses to connect to one as a
//! last line of defence.
//!
//! [`covering`] and [`refuse_loops`] are pure; [`local_interfaces`] reads the host's addresses
//! (`getifaddrs`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::sync::watch;

use crate::config::{Config, ConfigError, Endpoint, KeyError, Serves};

/// One of the proxy's listening sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listening {
    pub addr: SocketAddr,
    /// An IPv6 socket that also accepts IPv4 (the admin port); client listeners are IPv6-only.
    pub dual_stack: bool,
}

/// An address of a local interface. For a loopback address the whole prefix is local (Linux
/// answers all of `127.0.0.0/8` on `lo`); for any other, only the address itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalNet {
    pub ip: IpAddr,
    pub prefix: u8,
    pub loopback: bool,
}

impl LocalNet {
    fn contains(&self, ip: IpAddr) -> bool {
        if !self.loopback {
            return self.ip == ip;
        }
        match (self.ip, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix.min(32)))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix.min(128)))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// Where a connect to `ip` really goes: an IPv4-mapped IPv6 address is IPv4, and the
/// unspecified address is the loopback address (Linux connects `0.0.0.0` to `127.0.0.1`).
fn destination(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        other => other,
    }
}

/// Whether `ip` belongs to this host: a loopback address or one of `locals`.
fn is_local(ip: IpAddr, locals: &[LocalNet]) -> bool {
    ip.is_loopback() || locals.iter().any(|net| net.contains(ip))
}

/// The listening socket a connect to `target` would reach, if any. Pure.
pub fn covering(
    target: SocketAddr,
    listening: &[Listening],
    locals: &[LocalNet],
) -> Option<SocketAddr> {
    let ip = destination(target.ip());
    listening
        .iter()
        .find(|l| {
            if l.addr.port() != target.port() {
                return false;
            }
            let listen = l.addr.ip().to_canonical();
            if !listen.is_unspecified() {
                return destination(listen) == ip;
            }
            let family = match listen {
                IpAddr::V4(_) => ip.is_ipv4(),
                IpAddr::V6(_) => ip.is_ipv6() || l.dual_stack,
            };
            family && is_local(ip, locals)
        })
        .map(|l| l.addr)
}

/// The host's interface addresses; empty when they cannot be read (then only exact and
/// loopback matches are found).
pub fn local_interfaces() -> Vec<LocalNet> {
    let Ok(interfaces) = if_addrs::get_if_addrs() else {
        return Vec::new();
    };
    interfaces
        .iter()
        .map(|interface| {
            let (ip, prefix, host) = match &interface.addr {
                if_addrs::IfAddr::V4(a) => (IpAddr::V4(a.ip), a.prefixlen, 32),
                if_addrs::IfAddr::V6(a) => (IpAddr::V6(a.ip), a.prefixlen, 128),
            };
            LocalNet {
                ip,
                // No netmask reads as a prefix of 0, which would make every address local.
                prefix: if prefix == 0 { host } else { prefix },
                loopback: interface.is_loopback(),
            }
        })
        .collect()
}

/// Refuses an address to connect to that is one of the proxy's own listening sockets (given
/// exactly, or covered by a wildcard on a local interface): every client sent there would come
/// back in and connect again. Listeners on port 0 are checked once bound, at connect.
/// Pure.
pub fn refuse_loops(config: &Config, locals: &[LocalNet]) -> Result<(), ConfigError> {
    let mut errors = Vec::new();
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
    // A name is checked when it is resolved: discovery drops a backend at the proxy's own
    // address, and a fixed target's session refuses it.
    let mut targets: Vec<(String, SocketAddr)> = config
        .backends
        .backup
        .iter()
        .enumerate()
        .filter_map(|(i, e)| Some((format!("backends.backup[{i}]"), e.addr()?)))
        .collect();
    for (i, spec) in config.listeners.iter().enumerate() {
        if let Serves::Target(Endpoint::Addr(addr)) = spec.serves {
            targets.push((format!("listeners[{i}].target"), addr));
        }
    }
    for (key, target) in targets {
        if let Some(listen) = covering(target, &listening, locals) {
            let owner = own
                .iter()
                .find(|(l, _)| l.addr == listen)
                .map_or("", |(_, key)| key.as_str());
            errors.push(KeyError {
                key,
                reason: format!(
                    "{target} is this proxy's own listening address ({owner} = {listen} covers it): clients would loop back into the proxy"
                ),
                at: None,
            });
        }
    }
    match errors.is_empty() {
        true => Ok(()),
        false => Err(ConfigError::Invalid(errors)),
    }
}

/// [`refuse_loops`] with this host's interfaces as they are now: for a configuration about to
/// be applied (at start-up and reload, and by `roleproxy check`).
pub fn refuse_loops_here(config: &Config) -> Result<(), ConfigError> {
    refuse_loops(config, &local_interfaces())
}

/// What the proxy listens on and which addresses are local, as last seen.
#[derive(Debug, Clone, Default)]
pub struct Own {
    pub listening: Vec<Listening>,
    pub locals: Vec<LocalNet>,
}

impl Own {
    /// The proxy's own socket that `target` would reach, if any.
    pub fn covering(&self, target: SocketAddr) -> Option<SocketAddr> {
        covering(target, &self.listening, &self.locals)
    }
}

/// The proxy's own addresses, shared by the listeners (which set them), discovery (which
/// refreshes the interfaces every resolve interval) and sessions (which read them at connect).
#[derive(Debug)]
pub struct OwnAddrs(watch::Sender<Own>);

impl OwnAddrs {
    pub fn new() -> OwnAddrs {
        OwnAddrs(watch::Sender::new(Own {
            listening: Vec::new(),
            locals: local_interfaces(),
        }))
    }

    pub fn set_listening(&self, listening: Vec<Listening>) {
        self.0.send_modify(|own| own.listening = listening);
    }

    /// Reads the host's interfaces again: an address added since start-up is local too.
    pub fn refresh_interfaces(&self) {
        let locals = local_interfaces();
        self.0.send_if_modified(|own| {
            let changed = own.locals != locals;
            if changed {
                own.locals = locals;
            }
            changed
        });
    }

    pub fn covering(&self, target: SocketAddr) -> Option<SocketAddr> {
        self.0.borrow().covering(target)
    }
}

impl Default for OwnAddrs {
    fn default() -> Self {
        OwnAddrs::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn listen(s: &str) -> Listening {
        Listening {
            addr: at(s),
            dual_stack: false,
        }
    }

    #[test]
    fn what_a_listener_covers() {
        let locals = [
            LocalNet {
                ip: "127.0.0.1".parse().unwrap(),
                prefix: 8,
                loopback: true,
            },
            LocalNet {
                ip: "fdaa::7".parse().unwrap(),
                prefix: 64,
                loopback: false,
            },
            LocalNet {
                ip: "10.1.2.3".parse().unwrap(),
                prefix: 24,
                loopback: false,
            },
            // An anycast range on `lo`: Linux answers every address of it locally.
            LocalNet {
                ip: "10.9.9.1".parse().unwrap(),
                prefix: 24,
                loopback: true,
            },
            LocalNet {
                ip: "fd00:1::1".parse().unwrap(),
                prefix: 64,
                loopback: true,
            },
        ];
        let admin = Listening {
            addr: at("[::]:8404"),
            dual_stack: true,
        };
        // (what, listening, target, covered by)
        let rows: &[(&str, &[Listening], &str, Option<&str>)] = &[
            (
                "exact address",
                &[listen("127.0.0.1:5432")],
                "127.0.0.1:5432",
                Some("127.0.0.1:5432"),
            ),
            (
                "another port",
                &[listen("127.0.0.1:5432")],
                "127.0.0.1:5433",
                None,
            ),
            (
                "another loopback address than the one listened on",
                &[listen("127.0.0.1:5432")],
                "127.0.0.2:5432",
                None,
            ),
            (
                "0.0.0.0 covers all of 127/8",
                &[listen("0.0.0.0:5432")],
                "127.9.0.11:5432",
                Some("0.0.0.0:5432"),
            ),
            (
                "0.0.0.0 covers an interface address",
                &[listen("0.0.0.0:5432")],
                "10.1.2.3:5432",
                Some("0.0.0.0:5432"),
            ),
            (
                "but not the rest of that interface's network",
                &[listen("0.0.0.0:5432")],
                "10.1.2.4:5432",
                None,
            ),
            (
                "0.0.0.0 as a target is localhost",
                &[listen("127.0.0.1:5432")],
                "0.0.0.0:5432",
                Some("127.0.0.1:5432"),
            ),
            (
                "an IPv4-mapped target is IPv4",
                &[listen("0.0.0.0:5432")],
                "[::ffff:127.0.0.1]:5432",
                Some("0.0.0.0:5432"),
            ),
            (
                "[::] covers ::1",
                &[listen("[::]:5432")],
                "[::1]:5432",
                Some("[::]:5432"),
            ),
            (
                "[::] covers a local IPv6 address",
                &[listen("[::]:5432")],
                "[fdaa::7]:5432",
                Some("[::]:5432"),
            ),
            (
                "[::] does not cover a remote node",
                &[listen("[::]:5432")],
                "[fdaa::8]:5432",
                None,
            ),
            (
                "an IPv6-only [::] does not cover IPv4",
                &[listen("[::]:5432")],
                "127.0.0.1:5432",
                None,
            ),
            (
                "a dual-stack [::] (the admin port) covers IPv4 too",
                &[admin],
                "10.1.2.3:8404",
                Some("[::]:8404"),
            ),
            (
                "0.0.0.0 does not cover IPv6",
                &[listen("0.0.0.0:5432")],
                "[::1]:5432",
                None,
            ),
            (
                "the first covering listener is named",
                &[listen("[::]:5432"), listen("0.0.0.0:5432")],
                "127.0.0.1:5432",
                Some("0.0.0.0:5432"),
            ),
            (
                "0.0.0.0 covers all of a range on lo",
                &[listen("0.0.0.0:5432")],
                "10.9.9.77:5432",
                Some("0.0.0.0:5432"),
            ),
            (
                "but not the next range",
                &[listen("0.0.0.0:5432")],
                "10.9.10.77:5432",
                None,
            ),
            (
                "[::] covers all of an IPv6 range on lo",
                &[listen("[::]:5432")],
                "[fd00:1::99:1]:5432",
                Some("[::]:5432"),
            ),
            (
                "but not the next one",
                &[listen("[::]:5432")],
                "[fd00:2::1]:5432",
                None,
            ),
            (
                "an IPv4 range on lo is not IPv6",
                &[listen("[::]:5432")],
                "[::ffff:10.9.9.77]:5432",
                None,
            ),
            (
                "[::] as a target is ::1",
                &[listen("[::1]:5432")],
                "[::]:5432",
                Some("[::1]:5432"),
            ),
            ("nothing listening", &[], "127.0.0.1:5432", None),
        ];
        for (what, listening, target, expected) in rows {
            assert_eq!(
                covering(at(target), listening, &locals),
                expected.map(at),
                "{what}"
            );
        }
    }

    /// Each row: a configuration fragment and words its error must contain: the key, the
    /// listener it loops into, and why. Loopback alone is local here, so no row depends on the
    /// host's interfaces.
    #[test]
    fn a_configuration_that_loops_into_the_proxy_is_refused() {
        let rows: &[(&str, &[&str])] = &[
                (
                    "[[listeners]]\naddresses = [\"127.0.0.1:5434\"]\ntarget = \"127.0.0.1:5434\"",
                    &["listeners[0].target", "loop"],
                ),
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
        ];
        for (text, words) in rows {
            let text = match text.contains("[backends]") {
                true => text.to_string(),
                false => format!("{text}\n[backends]\ndns_names = [\"iad.app.internal\"]"),
            };
            let config = Config::parse(&text, &|_| None).expect("valid as a file");
            let message = match refuse_loops(&config, &[]) {
                Ok(()) => panic!("{text:?} loops"),
                Err(e) => e.to_string(),
            };
            for word in *words {
                assert!(
                    message.contains(word),
                    "{text:?} should say {word:?}: {message}"
                );
            }
        }
        let fine = Config::parse("[backends]\nbackup = [\"127.0.0.1:5433\"]", &|_| None);
        assert!(refuse_loops(&fine.expect("valid"), &[]).is_ok());
    }

    /// Where the configuration is applied, the error has the line of the key, as the file's own
    /// errors do.
    #[test]
    fn a_loop_is_refused_at_load_with_its_line() {
        let path =
            std::env::temp_dir().join(format!("roleproxy-loops-{}.toml", std::process::id()));
        let text = "[listen]\naddresses = [\"127.0.0.1:6432\"]\n[backends]\nbackup = [\"127.0.0.1:6432\"]\n";
        std::fs::write(&path, text).expect("write the file");
        let loaded = Config::load_with(&path, refuse_loops_here).map(|_| ());
        let _ = std::fs::remove_file(&path);
        let message = loaded.expect_err("loops").to_string();
        assert!(
            message.starts_with(
                "backends.backup[0]: 127.0.0.1:6432 is this proxy's own listening address"
            ) && message.ends_with("(line 4, column 11)"),
            "{message}"
        );
    }

    /// The host's loopback interface is read with its netmask: `lo` holds all of 127.0.0.0/8,
    /// not only 127.0.0.1.
    #[test]
    fn this_host_has_a_loopback_interface() {
        let locals = local_interfaces();
        assert!(
            locals
                .iter()
                .any(|l| l.loopback && l.ip == Ipv4Addr::LOCALHOST && l.prefix == 8),
            "{locals:?}"
        );
    }

    /// What the listeners set is what a session's connect is checked against.
    #[test]
    fn the_shared_addresses_cover_what_the_listeners_set() {
        let own = OwnAddrs::new();
        assert_eq!(own.covering(at("127.0.0.1:5432")), None);
        own.set_listening(vec![listen("0.0.0.0:5432")]);
        own.refresh_interfaces();
        assert_eq!(own.covering(at("127.0.0.1:5432")), Some(at("0.0.0.0:5432")));
        assert_eq!(own.covering(at("127.0.0.1:5433")), None);
    }
}
