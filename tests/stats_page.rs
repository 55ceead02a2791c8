//! The stats page as a person sees it: loaded in headless Chromium from a running proxy, and
//! checked for the route, every backend, the listeners and the timeline of changes.

use std::time::Duration;

use roleproxy_testkit::fake_cluster::FakeCluster;
use roleproxy_testkit::role::RoleReply;

/// The page's DOM after Chromium has loaded and rendered it.
fn dump_dom(url: &str) -> String {
    let profile = std::env::temp_dir().join(format!("roleproxy-chromium-{}", std::process::id()));
    let chromium =
        roleproxy_testkit::find_program("chromium", "chromium").unwrap_or_else(|e| panic!("{e}"));
    let output = std::process::Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=1000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("--dump-dom")
        .arg(url)
        .output()
        .expect("chromium runs");
    let _ = std::fs::remove_dir_all(profile);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// An error body that sets a terminal's title, clears its screen and turns it red.
const HOSTILE_ERROR: &str = "could not connect <to> server\u{1b}]0;pwned\u{7}\u{1b}[2J\u{1b}[31m";

#[test]
fn stats_page_shows_route_backends_and_changes() {
    let runtime = roleproxy_testkit::harness::runtime();
    runtime.block_on(async {
        let cluster = FakeCluster::start(49, 2).await;
        cluster.nodes[0].role.set(RoleReply::leader());
        cluster.nodes[1]
            .role
            .set(RoleReply::error(500, HOSTILE_ERROR));
        let proxy = roleproxy_testkit::harness::RunningProxy::start(
            cluster
                .config()
                .listener(
                    "name = \"replicas\"\naddresses = [\"127.49.0.1:0\"]\nserves = \"replica\"",
                )
                .config(),
        )
        .await;
        let leader = cluster.nodes[0].addr();
        assert!(
            proxy
                .wait_route(Some(&leader), Duration::from_secs(20))
                .await
        );
        let url = format!("http://{}/", proxy.admin);
        let dom = tokio::task::spawn_blocking(move || dump_dom(&url))
            .await
            .expect("chromium thread");

        assert!(dom.contains("roleproxy"), "{dom}");
        assert!(dom.contains("iad.test.internal"), "{dom}");
        assert!(dom.contains(&format!("sessions go to {leader}")), "{dom}");
        assert!(dom.contains("id=\"backends\""), "{dom}");
        assert!(
            dom.contains(&leader) && dom.contains(&cluster.nodes[1].addr()),
            "{dom}"
        );
        assert!(
            dom.contains(
                "could not connect &lt;to&gt; server\\u{1b}]0;pwned\\u{7}\\u{1b}[2J\\u{1b}[31m"
            ),
            "error text escaped, control characters written out: {dom}"
        );
        assert!(!dom.contains(['\u{1b}', '\u{7}']), "{dom}");
        // The timeline has the role changes and the route change that led here.
        assert!(
            dom.contains(&format!("{leader}: unknown → leader")),
            "{dom}"
        );
        assert!(dom.contains("generation 1: sessions go to"), "{dom}");
        let replicas = proxy.listener("replicas");
        assert!(
            dom.contains(&format!("replicas</td><td>{replicas}</td><td>replica</td>")),
            "the listeners table: {dom}"
        );
        assert!(
            dom.contains("http-equiv=\"refresh\""),
            "the page reloads itself: {dom}"
        );
        proxy.stop().await;
    });
}
