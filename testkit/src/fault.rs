//! Faults a test or benchmark inflicts on a cluster, each a value whose drop repairs it:
//!
//! - [`Blackhole`]: every packet to and from a node's address (or some of its ports) is
//!   dropped by iptables, with no reset: a host that vanished from the network.
//! - [`Stalled`]: a postmaster stopped with `SIGSTOP` (its children keep running), so the
//!   node's open sessions work while nothing new is accepted.
//! - [`CheckRelays`]: role endpoints in front of a [`LocalCluster`]'s agents that relay their
//!   answers until told to hang, fail or lie (a replica claiming `leader`).
//! - [`PortShortage`]: no ephemeral port left in this network namespace.
//! - [`Siege`]: silent connections that keep a server out of file descriptors (start the
//!   server with a low `RLIMIT_NOFILE`, see [`crate::harness::ProxyProcess::start`]).
//!
//! Faults that change the network ([`Blackhole`], [`PortShortage`]) are meant for a network
//! namespace of the caller's own ([`own_network_namespace`]): a whole cluster fits on its
//! loopback, and nothing it does reaches the host's rules or settings. [`PortShortage`]
//! refuses to run anywhere else; [`Blackhole`] works in any namespace and cleans up after
//! itself, including after a crash ([`sweep_stale_blackholes`]).

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;

use crate::cluster::LocalCluster;
use crate::pg::PgCluster;
use crate::role::{RoleEndpoint, RoleReply, RoleSwitch};
use crate::TaskGuard;

/// Prefix of every [`Blackhole`] chain: `RP-BH-<pid>-<n>`.
const CHAIN_PREFIX: &str = "RP-BH-";

static NEXT_CHAIN: AtomicUsize = AtomicUsize::new(0);

/// The network namespaces [`own_network_namespace`] made, by inode.
static OWN_NAMESPACES: std::sync::Mutex<Vec<u64>> = std::sync::Mutex::new(Vec::new());

/// Moves the calling thread into a new network namespace whose loopback is up, and returns
/// once it is there. Threads and processes it starts afterwards (a tokio runtime built on it,
/// Postgres, HAProxy, a proxy process) live there too; the rest of the process does not.
/// Call it before building the runtime, on the thread that builds it. Needs root and `ip`.
pub fn own_network_namespace() -> io::Result<()> {
    // SAFETY: unshare(2) with a flag has no memory-safety preconditions; CLONE_NEWNET only
    // changes this thread's namespace.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::other(format!(
            "cannot make a network namespace (root needed): {}",
            io::Error::last_os_error()
        )));
    }
    let inode = current_namespace()?;
    crate::lock(&OWN_NAMESPACES).push(inode);
    run(&tool("ip", "iproute2")?, &["link", "set", "lo", "up"])
}

/// Whether the calling thread is in a namespace [`own_network_namespace`] made: the only
/// place this module changes network settings.
pub fn in_own_network_namespace() -> bool {
    current_namespace().is_ok_and(|inode| crate::lock(&OWN_NAMESPACES).contains(&inode))
}

fn current_namespace() -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/thread-self/ns/net").map(|m| m.ino())
}

/// Drops every packet to and from one address, or to and from some of its TCP ports, with
/// iptables (ip6tables for IPv6): no reset, no ICMP, so a connect hangs and an open
/// connection stops moving, as when a host drops off the network. The rules live in a chain
/// of their own, `RP-BH-<pid>-<n>`, jumped to from `INPUT` and `OUTPUT` (loopback traffic
/// passes both); dropping the value removes the jumps and the chain, also while a panicking
/// test unwinds. Needs root and `iptables`.
pub struct Blackhole {
    chain: String,
    iptables: String,
}

impl Blackhole {
    /// Drops everything to and from `ip`.
    pub fn node(ip: IpAddr) -> io::Result<Blackhole> {
        let ip = ip.to_string();
        Blackhole::with_rules(
            &ip,
            vec![vec!["-d", &ip, "-j", "DROP"], vec!["-s", &ip, "-j", "DROP"]],
        )
    }

    /// Drops TCP to and from these ports of `ip` only.
    pub fn ports(ip: IpAddr, ports: &[u16]) -> io::Result<Blackhole> {
        let ip = ip.to_string();
        let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
        let mut rules = Vec::new();
        for port in &ports {
            rules.push(vec!["-p", "tcp", "-d", &ip, "--dport", port, "-j", "DROP"]);
            rules.push(vec!["-p", "tcp", "-s", &ip, "--sport", port, "-j", "DROP"]);
        }
        Blackhole::with_rules(&ip, rules)
    }

    fn with_rules(ip: &str, rules: Vec<Vec<&str>>) -> io::Result<Blackhole> {
        sweep_once();
        let iptables = iptables_for(ip)?;
        let chain = format!(
            "{CHAIN_PREFIX}{}-{}",
            std::process::id(),
            NEXT_CHAIN.fetch_add(1, Ordering::Relaxed)
        );
        run(&iptables, &["-w", "-N", &chain])?;
        // From here on, Drop removes whatever was added.
        let hole = Blackhole { chain, iptables };
        for rule in rules {
            let mut args = vec!["-w", "-A", hole.chain.as_str()];
            args.extend(rule);
            run(&hole.iptables, &args)?;
        }
        for hook in ["INPUT", "OUTPUT"] {
            run(&hole.iptables, &["-w", "-I", hook, "1", "-j", &hole.chain])?;
        }
        Ok(hole)
    }

    /// The chain holding the rules.
    pub fn chain(&self) -> &str {
        &self.chain
    }

    /// Lets packets through again (what dropping does, named).
    pub fn lift(self) {}
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        remove_chain(&self.iptables, &self.chain);
    }
}

/// Removes a chain and every jump to it; best effort, as teardown must not panic.
fn remove_chain(iptables: &str, chain: &str) {
    for hook in ["INPUT", "OUTPUT"] {
        // A hook may hold the jump more than once if a removal was interrupted.
        while run(iptables, &["-w", "-D", hook, "-j", chain]).is_ok() {}
    }
    let _ = run(iptables, &["-w", "-F", chain]);
    let _ = run(iptables, &["-w", "-X", chain]);
}

/// Removes the [`Blackhole`] chains (and their jumps) of processes that are gone, in this
/// network namespace, for iptables and ip6tables: what a test killed mid-fault leaves
/// behind. Returns the chains removed. [`Blackhole`] runs it once per process.
pub fn sweep_stale_blackholes() -> Vec<String> {
    let mut removed = Vec::new();
    for iptables in ["iptables", "ip6tables"] {
        let Ok(program) = tool(iptables, "iptables") else {
            continue;
        };
        let Ok(listing) = output(&program, &["-w", "-S"]) else {
            continue;
        };
        for chain in stale_chains(&listing, |pid| {
            std::path::Path::new(&format!("/proc/{pid}")).exists()
        }) {
            remove_chain(&program, &chain);
            removed.push(chain);
        }
    }
    removed
}

/// The `RP-BH-<pid>-<n>` chains declared (`-N`) in `iptables -S` output whose pid is not
/// alive.
fn stale_chains(listing: &str, alive: impl Fn(u32) -> bool) -> Vec<String> {
    listing
        .lines()
        .filter_map(|line| line.strip_prefix("-N "))
        .map(str::trim)
        .filter(|chain| {
            chain
                .strip_prefix(CHAIN_PREFIX)
                .and_then(|rest| rest.split('-').next())
                .and_then(|pid| pid.parse().ok())
                .is_some_and(|pid| pid != std::process::id() && !alive(pid))
        })
        .map(str::to_owned)
        .collect()
}

fn sweep_once() {
    static SWEPT: std::sync::Once = std::sync::Once::new();
    SWEPT.call_once(|| {
        sweep_stale_blackholes();
    });
}

fn iptables_for(ip: &str) -> io::Result<String> {
    let name = if ip.contains(':') {
        "ip6tables"
    } else {
        "iptables"
    };
    tool(name, "iptables")
}

/// A postmaster stopped with `SIGSTOP`, continued (`SIGCONT`) when this is dropped, also
/// while a panicking test unwinds. Only the postmaster stops: its children (the sessions'
/// backends, the WAL writer, the WAL senders) run on, so open sessions work while new
/// connections wait in the listen queue and nothing forks.
pub struct Stalled {
    pid: u32,
}

impl Stalled {
    /// Stops node `i`'s postmaster (its pid is the first line of `postmaster.pid`).
    pub fn postmaster(pg: &PgCluster, i: usize) -> io::Result<Stalled> {
        let pid = pg
            .postmaster_pid(i)
            .filter(|_| pg.is_running(i))
            .ok_or_else(|| io::Error::other(format!("node {i}'s postmaster is not running")))?;
        Stalled::pid(pid)
    }

    /// Stops process `pid`, not its group.
    pub fn pid(pid: u32) -> io::Result<Stalled> {
        crate::signal(pid, libc::SIGSTOP)?;
        Ok(Stalled { pid })
    }

    /// Lets it run again (what dropping does, named).
    pub fn resume(self) {}
}

impl Drop for Stalled {
    fn drop(&mut self) {
        let _ = crate::signal(self.pid, libc::SIGCONT);
    }
}

/// Stops process `pid` for `stall`, then continues it; continued also if this future is
/// dropped early.
pub async fn stall_postmaster(pid: u32, stall: Duration) -> io::Result<()> {
    let stalled = Stalled::pid(pid)?;
    // Not a wait for an event: the stall lasts this long.
    tokio::time::sleep(stall).await;
    stalled.resume();
    Ok(())
}

/// The port [`CheckRelays`] listen on by default, beside the agents' 5500.
pub const RELAY_PORT: u16 = 5501;

/// One role endpoint per node of a [`LocalCluster`], on `ip:port`, relaying what the node's
/// agent answers ([`RoleReply::Relay`]) until told otherwise. Proxies whose `check.port` is
/// this port see the cluster as it is, and a test can make one node's check hang, fail or lie
/// without touching its Postgres or its agent. Stops when dropped.
pub struct CheckRelays {
    endpoints: Vec<RoleEndpoint>,
    agents: Vec<SocketAddr>,
}

impl CheckRelays {
    pub async fn start(cluster: &LocalCluster, port: u16) -> CheckRelays {
        let mut endpoints = Vec::with_capacity(cluster.len());
        let mut agents = Vec::with_capacity(cluster.len());
        for i in 0..cluster.len() {
            let ip = cluster.pg_addr(i).ip();
            let endpoint = RoleEndpoint::start(SocketAddr::new(ip, port)).await;
            endpoint.set(RoleReply::Relay(cluster.agent_addr(i)));
            endpoints.push(endpoint);
            agents.push(cluster.agent_addr(i));
        }
        CheckRelays { endpoints, agents }
    }

    /// The port every relay listens on.
    pub fn port(&self) -> u16 {
        self.endpoints.first().map_or(0, |e| e.addr().port())
    }

    /// Node `i`'s checks get `reply` from now on.
    pub fn set(&self, i: usize, reply: RoleReply) {
        self.endpoints[i].set(reply);
    }

    /// Node `i`'s checks get its agent's answers again.
    pub fn relay(&self, i: usize) {
        self.endpoints[i].set(RoleReply::Relay(self.agents[i]));
    }

    /// Node `i` claims `leader` until the returned guard is dropped, then speaks for its
    /// Postgres again: a stray answer, as from an agent that read a stale state.
    pub fn claim(&self, i: usize) -> Claim {
        self.set(i, RoleReply::leader());
        Claim {
            switch: self.endpoints[i].switch(),
            agent: self.agents[i],
        }
    }

    /// Node `i` claims `leader` for `claim` ([`CheckRelays::claim`]).
    pub async fn lie(&self, i: usize, claim: Duration) {
        let _claim = self.claim(i);
        // Not a wait for an event: the lie lasts this long.
        tokio::time::sleep(claim).await;
    }

    /// Checks node `i`'s relay has answered so far.
    pub fn requests(&self, i: usize) -> u64 {
        self.endpoints[i].requests()
    }
}

/// A node's false claim to lead ([`CheckRelays::claim`]); it ends when dropped.
pub struct Claim {
    switch: RoleSwitch,
    agent: SocketAddr,
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.switch.set(RoleReply::Relay(self.agent));
    }
}

/// First port [`PortShortage`] tries for its range.
const SHORTAGE_FIRST_PORT: u16 = 40000;
const SHORTAGE_PAIRS_TRIED: u16 = 100;
const PORT_RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";

/// No ephemeral port left in this network namespace: `net.ipv4.ip_local_port_range` shrunk to
/// two ports, both held by bound TCP listeners and UDP sockets, so every `connect` (and UDP
/// send) that leaves the choice of port to the kernel fails with `EADDRNOTAVAIL`, as on a host
/// whose ports are all in `TIME_WAIT`. Sockets bound to an explicit port still work: clients
/// of the proxy under test connect with [`crate::writer::LocalPort::Pinned`]. Dropping it
/// restores the range.
///
/// Only in a network namespace of the caller's own ([`own_network_namespace`]): the host's
/// settings are never changed.
pub struct PortShortage {
    saved: String,
    _held: Vec<(TcpListener, UdpSocket)>,
}

impl PortShortage {
    pub fn start() -> io::Result<PortShortage> {
        if !in_own_network_namespace() {
            return Err(io::Error::other(
                "a port shortage is made only in a network namespace of the test's own \
                 (fault::own_network_namespace), never on the host",
            ));
        }
        let saved = std::fs::read_to_string(PORT_RANGE)?;
        let held = (0..SHORTAGE_PAIRS_TRIED)
            .map(|k| SHORTAGE_FIRST_PORT + 2 * k)
            .find_map(|first| Some(vec![hold_port(first)?, hold_port(first + 1)?]))
            .ok_or_else(|| io::Error::other("no two free ports to shrink the range to"))?;
        let first = held[0].0.local_addr()?.port();
        std::fs::write(PORT_RANGE, format!("{first} {}", first + 1))?;
        Ok(PortShortage { saved, _held: held })
    }
}

fn hold_port(port: u16) -> Option<(TcpListener, UdpSocket)> {
    let any = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port);
    Some((TcpListener::bind(any).ok()?, UdpSocket::bind(any).ok()?))
}

impl Drop for PortShortage {
    fn drop(&mut self) {
        let _ = std::fs::write(PORT_RANGE, self.saved.trim());
    }
}

/// How often a [`Siege`] looks for closed connections to replace.
const SIEGE_TICK: Duration = Duration::from_millis(100);
const SIEGE_CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// Keeps `n` TCP connections to a server open that never send a byte, opening a new one
/// whenever the server closes one, until dropped. Against a server that has fewer free
/// descriptors than `n`, it stays out of them: what a crowd of clients does to a process with
/// a low `RLIMIT_NOFILE`. (The kernel completes handshakes the server cannot accept, so a
/// connection counts as open once connected, accepted or not.)
pub struct Siege {
    open: Arc<AtomicUsize>,
    _task: TaskGuard,
}

impl Siege {
    pub fn start(addr: SocketAddr, n: usize) -> Siege {
        let open = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&open);
        let task = TaskGuard::spawn(async move {
            let mut held: Vec<TcpStream> = Vec::with_capacity(n);
            loop {
                held.retain(still_open);
                while held.len() < n {
                    match tokio::time::timeout(SIEGE_CONNECT_TIMEOUT, TcpStream::connect(addr))
                        .await
                    {
                        Ok(Ok(stream)) => held.push(stream),
                        _ => break,
                    }
                }
                count.store(held.len(), Ordering::SeqCst);
                // Not a wait for an event: the pace of the siege.
                tokio::time::sleep(SIEGE_TICK).await;
            }
        });
        Siege { open, _task: task }
    }

    /// Connections open at the last look.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }
}

/// False once the peer has closed or reset the connection.
fn still_open(stream: &TcpStream) -> bool {
    let mut byte = [0u8; 1];
    match stream.try_read(&mut byte) {
        Ok(0) => false,
        Ok(_) => true,
        Err(e) => e.kind() == io::ErrorKind::WouldBlock,
    }
}

/// The absolute path of a fault tool, or an error naming its Debian package.
fn tool(program: &str, package: &str) -> io::Result<String> {
    crate::find_program(program, package)
        .map(|path| path.to_string_lossy().into_owned())
        .map_err(io::Error::other)
}

fn run(program: &str, args: &[&str]) -> io::Result<()> {
    output(program, args).map(drop)
}

/// Runs a tool to completion; its stdout, or an error with what it printed.
fn output(program: &str, args: &[&str]) -> io::Result<String> {
    let out = Command::new(program).args(args).output()?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(io::Error::other(format!(
            "{program} {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_chains_of_dead_processes_are_stale() {
        let me = std::process::id();
        let listing = format!(
            "-P INPUT ACCEPT\n-N RP-BH-{me}-0\n-N RP-BH-1-3\n-N RP-BH-77-0\n-N OTHER-1\n\
             -A INPUT -j RP-BH-1-3\n"
        );
        let stale = stale_chains(&listing, |pid| pid == 77);
        assert_eq!(stale, vec!["RP-BH-1-3".to_owned()]);
    }
}
