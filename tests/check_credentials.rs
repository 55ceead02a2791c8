//! `check.kind = "postgres"` hands a node no credential and no memory. Fake nodes do what a real
//! one will not on demand: ask for a cleartext or MD5 password (they get none, and the test
//! reads everything they received), propose an absurd SCRAM iteration count (no proof is sent),
//! stream an endless message (the proxy process's memory stays flat). Real Postgres 15 with
//! `scram-sha-256` in `pg_hba.conf` is checked with a password from the environment, over
//! plain TCP, `require` and `verify-full` TLS, and the route forms.

use roleproxy_testkit as support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use roleproxy::check::{check_role, CheckSettings, Observation};
use roleproxy::Config;
use roleproxy_core::route::Role;
use support::cluster::{ClusterSpec, LocalCluster};
use support::fake_postgres::{Answer, FakePostgres, ENDLESS_LENGTH};
use support::harness::{eventually, ConfigBuilder, ProxyProcess, RunningProxy};

const LONG: Duration = Duration::from_secs(30);
/// What the check role's password is, in the environment the configurations are read with.
const PASSWORD: &str = "pw-never-sent-7f3a";
/// Growth of the proxy's resident memory that a node streaming at it may cause: the check
/// reads at most 64 KiB per exchange, so this is slack for the allocator, not for the node.
const RSS_BOUND_KIB: u64 = 20 * 1024;

fn env(name: &str) -> Option<String> {
    match name {
        "CHECK_PASSWORD" => Some(PASSWORD.into()),
        "WRONG_PASSWORD" => Some("not-the-password".into()),
        _ => None,
    }
}

fn ip(c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 163, c, d))
}

/// A Postgres check as `user`, password from `${CHECK_PASSWORD}`, with more `[check]` lines.
fn settings(user: &str, check_lines: &str) -> CheckSettings {
    settings_with("[\"localhost.\"]", user, check_lines)
}

fn settings_with(dns_names: &str, user: &str, check_lines: &str) -> CheckSettings {
    let text = format!(
        "[listen]\naddresses = [\"127.163.0.1:0\"]\n[admin]\naddress = \"\"\n\
         [backends]\ndns_names = {dns_names}\nbackup = []\n\
         [check]\nkind = \"postgres\"\nuser = \"{user}\"\npassword = \"${{CHECK_PASSWORD}}\"\n{check_lines}"
    );
    let config = Config::parse(&text, &env).expect("the check configuration is valid");
    CheckSettings::from_config(&config.check)
}

fn down(reason: &str) -> Option<Observation> {
    Some(Role::Down(reason.to_string()).into())
}

/// Why checking `addr` failed; panics when it did not.
async fn failure(addr: SocketAddr, settings: &CheckSettings) -> String {
    match check_role(addr, settings).await {
        Some(Observation {
            role: Role::Down(reason),
            ..
        }) => reason,
        other => panic!("{settings:?}: expected a failed check, got {other:?}"),
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// What `fake` received on its one connection, once the check closed it.
async fn only_connection(fake: &FakePostgres) -> Vec<u8> {
    assert!(
        eventually(LONG, || async { fake.finished() == 1 }).await,
        "the check closed its connection"
    );
    fake.received().remove(0)
}

/// The StartupMessage's length, from its first four bytes.
fn startup_len(received: &[u8]) -> usize {
    u32::from_be_bytes(received[..4].try_into().expect("a length")) as usize
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_asks_for_a_cleartext_or_md5_password_gets_none() {
    let rows = [
        (Answer::Cleartext, "a cleartext password", ip(0, 11)),
        (Answer::Md5, "an MD5 password", ip(0, 12)),
    ];
    for (answer, asked, ip) in rows {
        let node = FakePostgres::start(SocketAddr::new(ip, 0), answer).await;
        let observed = check_role(node.addr(), &settings("roleproxy_check", "")).await;
        assert_eq!(
            observed,
            down(&format!(
                "node asked for {asked}; the check answers SCRAM-SHA-256 only"
            ))
        );
        let received = only_connection(&node).await;
        assert!(!contains(&received, PASSWORD.as_bytes()), "{answer:?}");
        assert_eq!(
            received.len(),
            startup_len(&received),
            "{answer:?}: nothing was sent after the StartupMessage: {:?}",
            String::from_utf8_lossy(&received)
        );
    }

    // A running proxy counts each of these as a failed check and routes nothing.
    let node = FakePostgres::start(SocketAddr::new(ip(0, 13), 5433), Answer::Cleartext).await;
    let config = ConfigBuilder::new("127.163.0.2", "127.163.0.2:53".parse().unwrap(), "x")
        .set("backends.dns_names", "[]")
        .set("backends.backup", &format!("[\"{}\"]", node.addr()))
        .set("check.kind", "\"postgres\"")
        .unset("check.port")
        .set("check.password", "\"${CHECK_PASSWORD}\"")
        .set("check.interval", "\"100ms\"")
        .config_with_env(&env);
    let proxy = RunningProxy::start(config).await;
    let series = format!(
        "roleproxy_checks_total{{backend=\"{}\",result=\"down\"}}",
        node.addr()
    );
    assert!(
        eventually(LONG, || async { proxy.metric(&series).await >= 3.0 }).await,
        "{series}"
    );
    assert_eq!(proxy.route_leader().await, None);
    proxy.stop().await;
    let received = node.received();
    assert!(received.len() >= 3);
    for connection in received {
        assert!(!contains(&connection, PASSWORD.as_bytes()));
        assert_eq!(connection.len(), startup_len(&connection));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_proposes_too_many_scram_iterations_gets_no_proof() {
    let node = FakePostgres::start(
        SocketAddr::new(ip(0, 21), 0),
        Answer::ScramIterations(10_000_000),
    )
    .await;
    let observed = check_role(node.addr(), &settings("roleproxy_check", "")).await;
    assert_eq!(
        observed,
        down("node asks for 10000000 SCRAM iterations, more than the check's limit of 100000")
    );
    let received = only_connection(&node).await;
    let after_startup = &received[startup_len(&received)..];
    // SASLInitialResponse: `p`, its length, the mechanism, then `n,,n=,r=NONCE`.
    assert_eq!(after_startup.first(), Some(&b'p'));
    let initial_len = 1 + u32::from_be_bytes(after_startup[1..5].try_into().unwrap()) as usize;
    assert!(contains(&after_startup[..initial_len], b"n,,n=,r="));
    assert_eq!(
        &after_startup[initial_len..],
        b"",
        "no client-final message, so no proof"
    );
    assert!(!contains(&received, PASSWORD.as_bytes()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_declines_tls_fails_a_check_that_requires_it() {
    let node = FakePostgres::start(SocketAddr::new(ip(0, 31), 0), Answer::NoTls).await;
    let observed = check_role(
        node.addr(),
        &settings("roleproxy_check", "tls = \"require\""),
    )
    .await;
    assert_eq!(
        observed,
        down("node does not offer TLS, which check.tls requires")
    );
    let received = only_connection(&node).await;
    assert_eq!(received.len(), 8, "an SSLRequest and nothing after it");
}

/// The real binary, its memory read from `/proc`: two nodes stream at every check, one an
/// endless message, one endless notices, for at least 30 checks each.
#[test]
fn a_node_streaming_forever_costs_the_proxy_no_memory() {
    support::harness::runtime().block_on(async {
        let endless =
            FakePostgres::start(SocketAddr::new(ip(2, 11), 5433), Answer::EndlessMessage).await;
        let notices =
            FakePostgres::start(SocketAddr::new(ip(2, 12), 5433), Answer::EndlessNotices).await;
        assert_eq!(
            check_role(endless.addr(), &settings("roleproxy_check", "")).await,
            down(&format!(
                "node sent a message of {ENDLESS_LENGTH} bytes; the check reads at most 8192"
            ))
        );
        assert_eq!(
            check_role(notices.addr(), &settings("roleproxy_check", "")).await,
            down("node sent more than 65536 bytes")
        );
        let toml = ConfigBuilder::new("127.163.2.1", "127.163.2.1:53".parse().unwrap(), "x")
            .set("backends.dns_names", "[]")
            .set(
                "backends.backup",
                &format!("[\"{}\", \"{}\"]", endless.addr(), notices.addr()),
            )
            .set("check.kind", "\"postgres\"")
            .unset("check.port")
            .set("check.interval", "\"100ms\"")
            .set("check.fast_interval", "\"50ms\"")
            .toml();
        let proxy = ProxyProcess::start(
            env!("CARGO_BIN_EXE_roleproxy"),
            &toml,
            "check-streams",
            "error",
            None,
        );
        let checked = |n: usize| {
            let (endless, notices) = (&endless, &notices);
            async move {
                eventually(LONG, || async {
                    endless.finished() >= n && notices.finished() >= n
                })
                .await
            }
        };
        // The first two checks of each: the proxy is up and has built what it keeps.
        assert!(checked(3).await, "the proxy checks both nodes");
        let before = proxy.rss_kib().expect("the proxy runs");
        assert!(checked(33).await, "30 more checks of each");
        let after = proxy.rss_kib().expect("the proxy still runs");
        assert!(
            after <= before + RSS_BOUND_KIB,
            "resident memory grew from {before} KiB to {after} KiB"
        );
    });
}

/// A role with no rights beyond LOGIN reads the role and timeline of a primary and a standby,
/// with SCRAM-SHA-256 from `pg_hba.conf`, with or without TLS; a cleartext rule gets no
/// password; `verify-full` takes the nodes' certificate and name, and refuses another name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_postgres_is_checked_with_scram_over_tcp_and_tls() {
    let spec = ClusterSpec {
        dns_ip: ip(1, 1),
        tls: true,
        ..ClusterSpec::demo().with_ips((11..=12).map(|d| Ipv4Addr::new(127, 163, 1, d)))
    };
    let cluster = LocalCluster::start_streaming(spec, LONG)
        .await
        .expect("the cluster starts and its standby streams");
    let (primary, standby) = (cluster.pg_addr(0), cluster.pg_addr(1));
    let pg = cluster.pg();
    tokio::task::block_in_place(|| {
        let create = |role: &str| format!("CREATE ROLE {role} LOGIN PASSWORD '{PASSWORD}'");
        pg.sql(
            0,
            &[
                &create("roleproxy_check"),
                &create("roleproxy_tls"),
                &create("roleproxy_clear"),
            ],
        )
        .expect("create the check roles");
        for node in 0..2 {
            pg.set_hba(
                node,
                "hostssl all roleproxy_tls 127.0.0.0/8 scram-sha-256\n\
                 host all roleproxy_tls 127.0.0.0/8 reject\n\
                 host all roleproxy_check 127.0.0.0/8 scram-sha-256\n\
                 host all roleproxy_clear 127.0.0.0/8 password",
            )
            .expect("pg_hba.conf");
        }
    });
    let cert = pg.tls_root_cert().expect("TLS is on").display().to_string();
    let verify_full = |name: &str| {
        format!("tls = \"verify-full\"\ntls_root_cert = {cert:?}\ntls_server_name = \"{name}\"")
    };
    let leader = Some(Observation {
        role: Role::Leader,
        timeline: Some(1),
    });
    let replica = Some(Observation::from(Role::Replica));
    let rows: Vec<(&str, CheckSettings, SocketAddr, Option<Observation>)> = vec![
        (
            "SCRAM",
            settings("roleproxy_check", ""),
            primary,
            leader.clone(),
        ),
        (
            "SCRAM, standby",
            settings("roleproxy_check", ""),
            standby,
            replica.clone(),
        ),
        (
            "SCRAM inside TLS (require)",
            settings("roleproxy_tls", "tls = \"require\""),
            primary,
            leader.clone(),
        ),
        (
            "verify-full",
            settings("roleproxy_tls", &verify_full("localhost")),
            primary,
            leader.clone(),
        ),
        (
            "verify-full, standby",
            settings("roleproxy_tls", &verify_full("127.163.1.12")),
            standby,
            replica,
        ),
        (
            "verify-full, the name from backends.dns_names without its final dot",
            settings_with(
                "[\"localhost.\"]",
                "roleproxy_tls",
                &format!("tls = \"verify-full\"\ntls_root_cert = {cert:?}"),
            ),
            primary,
            leader.clone(),
        ),
    ];
    for (what, settings, addr, expected) in rows {
        let observed = eventually(LONG, || async {
            let observed = check_role(addr, &settings).await;
            (observed == expected).then_some(()).ok_or(observed)
        })
        .await;
        assert_eq!(observed, Ok(()), "{what}");
    }

    assert_eq!(
        failure(primary, &settings("roleproxy_clear", "")).await,
        "node asked for a cleartext password; the check answers SCRAM-SHA-256 only"
    );
    let reason = failure(primary, &settings("roleproxy_tls", "")).await;
    assert!(reason.contains("28000"), "hostssl only: {reason}");
    let reason = failure(
        primary,
        &settings("roleproxy_tls", &verify_full("wrong.example")),
    )
    .await;
    assert!(
        reason.starts_with("TLS: ") && reason.contains("wrong.example"),
        "{reason}"
    );
    let wrong_password = {
        let text = format!(
            "[listen]\naddresses = [\"127.163.0.1:0\"]\n[admin]\naddress = \"\"\n\
             [backends]\ndns_names = []\nbackup = [\"{primary}\"]\n\
             [check]\nkind = \"postgres\"\nuser = \"roleproxy_check\"\npassword = \"${{WRONG_PASSWORD}}\""
        );
        CheckSettings::from_config(&Config::parse(&text, &env).expect("valid").check)
    };
    let reason = failure(primary, &wrong_password).await;
    assert!(reason.contains("28P01"), "a wrong password: {reason}");

    // The route forms through the check alone: SCRAM inside verified TLS.
    let config = cluster
        .proxy_config("127.163.1.1")
        .set("check.kind", "\"postgres\"")
        .unset("check.port")
        .set("check.user", "\"roleproxy_tls\"")
        .set("check.password", "\"${CHECK_PASSWORD}\"")
        .set("check.tls", "\"verify-full\"")
        .set("check.tls_root_cert", &format!("{cert:?}"))
        .set("check.tls_server_name", "\"localhost\"")
        .set("check.interval", "\"200ms\"")
        .set("check.fast_interval", "\"50ms\"")
        .config_with_env(&env);
    let proxy = RunningProxy::start(config).await;
    assert!(
        proxy.wait_route(Some(&primary.to_string()), LONG).await,
        "{:?}",
        proxy.status().await
    );
    assert_eq!(
        support::writer::served(&support::writer::conninfo(proxy.addr)).await,
        Ok((primary.ip().to_string(), false))
    );
    proxy.stop().await;
    cluster.shutdown().await;
}
