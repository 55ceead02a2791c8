//! Scale: nine thousand concurrent sessions through one roleproxy process. In a file of its own
//! so no other test shares this process's descriptors.
//!
//! Nine thousand, not ten: the proxy holds two descriptors per session, and a hard limit of
//! 20,000 (common in containers, where raising it takes `CAP_SYS_RESOURCE`) leaves room for
//! 9,700 at most. The count is fixed: the test gets the descriptors it needs or fails.

use std::net::SocketAddr;
use std::time::Duration;

use roleproxy_testkit as support;
use support::fake_cluster::FakeCluster;
use support::harness::{metric_value, sessions_active, wait_served, Client, ProxyProcess};
use support::role::RoleReply;

const LONG: Duration = Duration::from_secs(20);
const SESSIONS: usize = 9_000;
/// Descriptors beyond two per session: the runtime, the fakes, the admin port, the log.
const SPARE: u64 = 600;

fn nofile() -> std::io::Result<libc::rlimit> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the valid rlimit it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(limit)
}

/// Makes this process's descriptor limit at least `need`, soft and hard (the hard limit rises
/// only with privilege, and never past `fs.nr_open`), or says why it cannot. The proxy process
/// inherits the limit.
fn ensure_fd_limit(need: u64) -> Result<(), String> {
    let limit = nofile().map_err(|e| format!("getrlimit(RLIMIT_NOFILE): {e}"))?;
    if limit.rlim_cur >= need {
        return Ok(());
    }
    let raised = libc::rlimit {
        rlim_cur: need,
        rlim_max: limit.rlim_max.max(need),
    };
    // SAFETY: setrlimit reads the valid rlimit it is given.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
        return Ok(());
    }
    let error = std::io::Error::last_os_error();
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open").unwrap_or_default();
    let capability = match has_sys_resource() {
        Some(true) => "which this process has",
        Some(false) => "which this process lacks (root in a container may)",
        None => "which this process may lack",
    };
    Err(format!(
        "this test needs {need} file descriptors (two per session, both ends of each in this \
         process, and the proxy's two in its own) but has {} (hard limit {}), and raising it \
         failed: {error}. Raising the hard limit takes CAP_SYS_RESOURCE, {capability}, and \
         goes no higher than fs.nr_open ({}); or start the test under `ulimit -n {need}`",
        limit.rlim_cur,
        limit.rlim_max,
        nr_open.trim()
    ))
}

/// Whether this process may raise its hard limits (CAP_SYS_RESOURCE among its effective
/// capabilities); `None` if that cannot be read.
fn has_sys_resource() -> Option<bool> {
    const CAP_SYS_RESOURCE: u32 = 24;
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let effective = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    let bits = u64::from_str_radix(effective.trim(), 16).ok()?;
    Some(bits & (1 << CAP_SYS_RESOURCE) != 0)
}

#[test]
fn nine_thousand_concurrent_sessions() {
    // Both ends of every session live in this process, and the proxy process holds two
    // descriptors per session too.
    let need = 2 * SESSIONS as u64 + SPARE;
    if let Err(why) = ensure_fd_limit(need) {
        panic!("{why}");
    }
    let sessions = SESSIONS;
    let runtime = roleproxy_testkit::harness::runtime();
    runtime.block_on(async {
        let cluster = FakeCluster::start(47, 1).await;
        cluster.nodes[0].role.set(RoleReply::leader());
        let config = cluster
            .config()
            .set("listen.addresses", "[\"127.47.0.1:25470\"]")
            .set("admin.address", "\"127.47.0.1:25471\"")
            .set("proxy.max_connections", &(sessions + 100).to_string())
            .toml();
        let _proxy = ProxyProcess::start(
            env!("CARGO_BIN_EXE_roleproxy"),
            &config,
            "9k",
            "error",
            None,
        );
        let addr: SocketAddr = "127.47.0.1:25470".parse().unwrap();
        let first = wait_served(addr).await;

        let mut clients = Vec::with_capacity(sessions);
        for i in 0..sessions {
            let client = Client::connect(addr, LONG)
                .await
                .unwrap_or_else(|| panic!("session {i} of {sessions} was not served"));
            clients.push(client);
        }
        assert!(
            cluster.nodes[0]
                .backend
                .wait_open(sessions as u64 + 1, LONG)
                .await
        );
        // Every session still carries bytes both ways.
        for (i, client) in clients.iter_mut().enumerate().step_by(97) {
            assert!(client.echo(&format!("session {i}")).await, "session {i}");
        }
        let (code, metrics) =
            support::harness::http_get("127.47.0.1:25471".parse().unwrap(), "/metrics").await;
        assert_eq!(code, 200);
        // The proxy is a process of its own: its metrics are this test's alone.
        let active = metric_value(&metrics, &sessions_active("leader"));
        assert_eq!(
            active,
            Some((sessions + 1) as f64),
            "{sessions} sessions open at once"
        );
        drop(clients);
        drop(first);
        assert!(
            cluster.nodes[0].backend.wait_open(0, LONG).await,
            "all closed again"
        );
    });
}
