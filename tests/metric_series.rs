//! Metric series of departed backends are removed: 200 addresses churned through a real DNS
//! server leave `/metrics` with the series it had before. A test binary of its own, since the
//! metrics recorder (and its expiry) is one per process.

use roleproxy_testkit as support;

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::Duration;

use support::fake_cluster::{FakeCluster as Cluster, NAME};
use support::harness::{eventually, metric_value, series, RunningProxy};
use support::loopback;
use support::role::RoleReply;

const LONG: Duration = Duration::from_secs(60);

async fn all_series(proxy: &RunningProxy) -> BTreeSet<String> {
    let (code, text) = proxy.get("/metrics").await;
    assert_eq!(code, 200, "{text}");
    series(&text).into_iter().map(str::to_string).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn series_of_departed_backends_expire_and_churn_returns_to_the_baseline() {
    let cluster = Cluster::start(75, 1).await;
    let leader = &cluster.nodes[0];
    leader.role.set(RoleReply::leader());
    let config = cluster
        .config()
        .set("admin.metrics_expiry", "\"3s\"")
        .set("check.timeout", "\"300ms\"")
        .set("backends.max", "20")
        .config();
    assert_eq!(config.metrics_expiry(), Duration::from_secs(3));
    let proxy = RunningProxy::start(config).await;
    assert!(proxy.wait_route(Some(&leader.addr()), LONG).await);

    // The baseline: the leader's series, all registered (at 0 where nothing happened yet), and
    // the process's own series, which stay at 0 untouched through the churn and never expire.
    let leader_series = format!(
        "roleproxy_backend_connect_failures_total{{backend=\"{}\"}}",
        leader.addr()
    );
    let p = &proxy;
    let name = leader_series.as_str();
    assert!(
        eventually(LONG, move || async move {
            metric_value(&p.get("/metrics").await.1, name).is_some()
        })
        .await,
        "{leader_series}"
    );
    let baseline = all_series(&proxy).await;

    // 200 addresses, ten at a time beside the leader; each is checked (and fails) before the
    // next ten replace it.
    let mut peak = 0;
    for batch in 0..20u8 {
        let churned: Vec<IpAddr> = (0..10).map(|i| loopback(75, 1, batch * 10 + i)).collect();
        let mut answer = vec![leader.ip];
        answer.extend(&churned);
        cluster.dns.set(NAME, answer);
        let wanted: Vec<String> = churned
            .iter()
            .map(|ip| format!("roleproxy_checks_total{{backend=\"{ip}:5433\",result=\"down\"}}"))
            .collect();
        let wanted = &wanted;
        // A backend's series are registered at 0 when DNS names it: only a count of 1 or
        // more says it was checked.
        let checked = eventually(LONG, move || async move {
            let (_, text) = p.get("/metrics").await;
            wanted
                .iter()
                .all(|w| metric_value(&text, w).is_some_and(|n| n >= 1.0))
        })
        .await;
        if !checked {
            let (_, text) = proxy.get("/metrics").await;
            panic!("batch {batch} checked:\n{}\n{text}", proxy.status().await);
        }
        peak = peak.max(all_series(&proxy).await.len());
        // The expiring series come out sorted by label like every other family.
        let (_, text) = proxy.get("/metrics").await;
        let checks: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("roleproxy_checks_total{"))
            .collect();
        assert!(
            checks.is_sorted(),
            "sorted by label:\n{}",
            checks.join("\n")
        );
    }
    cluster.dns.set(NAME, vec![leader.ip]);

    let baseline = &baseline;
    let settled = eventually(
        LONG,
        move || async move { all_series(p).await == *baseline },
    )
    .await;
    let now = all_series(&proxy).await;
    assert!(
        settled,
        "series back to the baseline;\nextra: {:?}\nmissing: {:?}",
        now.difference(baseline).collect::<Vec<_>>(),
        baseline.difference(&now).collect::<Vec<_>>()
    );
    eprintln!(
        "series: baseline {}, peak during churn {}, after {}",
        baseline.len(),
        peak,
        now.len()
    );
    proxy.stop().await;
}
