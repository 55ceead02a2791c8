//! Scale: ten thousand concurrent sessions through one roleproxy process. In a file of its own
//! so no other test shares this process's descriptors.

use std::net::SocketAddr;
use std::time::Duration;

use roleproxy_testkit as support;
use support::fake_cluster::FakeCluster;
use support::harness::{wait_served, Client, ProxyProcess};
use support::role::RoleReply;

const LONG: Duration = Duration::from_secs(20);

/// Lifts this process's soft descriptor limit to its hard limit; returns the limit.
fn raise_own_fd_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit with a valid rlimit.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        limit.rlim_cur = limit.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
    }
    limit.rlim_cur
}

#[test]
fn ten_thousand_concurrent_sessions() {
    // Both ends of every session live in this process and the proxy holds two descriptors per
    // session: the machine's hard limit decides how close to 10k this gets.
    let sessions = 10_000.min((raise_own_fd_limit().saturating_sub(600) / 2) as usize);
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
            "10k",
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
        let active = metrics
            .lines()
            .find(|l| l.starts_with("roleproxy_sessions_active{listener=\"leader\"} "))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
        assert_eq!(
            active as usize,
            sessions + 1,
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
