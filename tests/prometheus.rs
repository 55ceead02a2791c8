//! Prometheus, for real: Debian's `prometheus` scrapes a running roleproxy and follows its route
//! generation through a leader change, with the shipped alerting rules loaded; `promtool` accepts
//! `/metrics` and the rules; every metric the rules and the Grafana dashboard use is exported
//! from start-up.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use roleproxy_testkit::fake_cluster::FakeCluster;
use roleproxy_testkit::harness::eventually;
use roleproxy_testkit::role::RoleReply;
use roleproxy_testkit::{find_program, loopback, try_http};

const ALERTS: &str = "examples/prometheus/alerts.yml";
const DASHBOARD: &str = "examples/grafana/roleproxy-dashboard.json";
const WAIT: Duration = Duration::from_secs(60);

/// A Prometheus server, killed (and its data removed) on drop.
struct Prometheus {
    child: Child,
    dir: PathBuf,
    addr: SocketAddr,
}

impl Prometheus {
    fn start(addr: SocketAddr, scrape: SocketAddr) -> Prometheus {
        let binary = find_program("prometheus", "prometheus").unwrap_or_else(|e| panic!("{e}"));
        let dir = std::env::temp_dir().join(format!("roleproxy-prometheus-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the Prometheus directory");
        let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join(ALERTS);
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files: [\"{}\"]\n\
             scrape_configs:\n  - job_name: roleproxy\n    static_configs:\n      - targets: [\"{scrape}\"]\n",
            rules.display()
        );
        let config_file = dir.join("prometheus.yml");
        std::fs::write(&config_file, config).expect("write prometheus.yml");
        let log = std::fs::File::create(dir.join("prometheus.log")).expect("create the log");
        let child = Command::new(binary)
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("prometheus starts");
        Prometheus { child, dir, addr }
    }

    /// The single value of an instant query, if it has exactly one series.
    async fn query(&self, expr: &str) -> Option<String> {
        let (status, body) = self.get(&format!("/api/v1/query?query={expr}")).await?;
        if status != 200 {
            return None;
        }
        let answer: serde_json::Value = serde_json::from_str(&body).ok()?;
        match answer["data"]["result"].as_array()?.as_slice() {
            [one] => one["value"][1].as_str().map(str::to_owned),
            _ => None,
        }
    }

    /// A GET that may find Prometheus not listening yet.
    async fn get(&self, path: &str) -> Option<(u16, String)> {
        try_http(self.addr, "GET", path, None, Duration::from_secs(10))
            .await
            .ok()
    }

    /// Waits until Prometheus has scraped route generation `generation`.
    async fn wait_for_generation(&self, generation: &str) {
        assert!(
            eventually(WAIT, || async {
                self.query("roleproxy_route_generation").await.as_deref() == Some(generation)
            })
            .await,
            "Prometheus never read generation {generation}:\n{}",
            self.log()
        );
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `promtool ARGS` with `stdin`; its exit status and output.
fn promtool(args: &[&str], stdin: &str) -> (bool, String) {
    use std::io::Write;
    let binary = find_program("promtool", "prometheus").unwrap_or_else(|e| panic!("{e}"));
    let mut child = Command::new(binary)
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs");
    if let Some(mut input) = child.stdin.take() {
        input
            .write_all(stdin.as_bytes())
            .expect("write to promtool");
    }
    let output = child.wait_with_output().expect("promtool ends");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

/// Every `roleproxy_…` metric name a file uses, without the histogram suffixes.
fn metric_names(path: &str) -> Vec<String> {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path))
        .expect("read the shipped file");
    let mut names: Vec<String> = text
        .match_indices("roleproxy_")
        .map(|(at, _)| {
            text[at..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect::<String>()
        })
        .map(|name| {
            ["_bucket", "_count", "_sum"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .map_or(name.clone(), str::to_owned)
        })
        .collect();
    names.sort();
    names.dedup();
    assert!(!names.is_empty(), "{path} names no roleproxy_ metric");
    names
}

#[test]
fn prometheus_follows_the_route_and_the_shipped_rules_and_dashboard_fit_the_metrics() {
    let (ok, text) = promtool(&["check", "rules", ALERTS], "");
    assert!(ok, "promtool check rules: {text}");

    let runtime = roleproxy_testkit::harness::runtime();
    runtime.block_on(async {
        let cluster = FakeCluster::start(150, 2).await;
        cluster.nodes[0].role.set(RoleReply::leader());
        let proxy = cluster.proxy().await;
        let first = cluster.nodes[0].addr();
        assert!(proxy.wait_route(Some(&first), WAIT).await, "first route");

        let (status, metrics) = proxy.get("/metrics").await;
        assert_eq!(status, 200);
        let (ok, text) = promtool(&["check", "metrics"], &metrics);
        assert!(ok, "promtool check metrics: {text}\n{metrics}");
        for file in [ALERTS, DASHBOARD] {
            for name in metric_names(file) {
                // The whole series name, not a prefix: `roleproxy_pause` is not
                // `roleproxy_paused`.
                let exported = |series: &str| {
                    ["", "_bucket", "_count", "_sum"]
                        .iter()
                        .any(|suffix| series.strip_suffix(suffix) == Some(name.as_str()))
                };
                assert!(
                    metrics
                        .lines()
                        .filter(|line| !line.starts_with('#'))
                        .filter_map(|line| line.split(['{', ' ']).next())
                        .any(exported),
                    "{file} uses {name}, which /metrics does not export:\n{metrics}"
                );
            }
        }

        let prometheus = Prometheus::start(SocketAddr::new(loopback(150, 0, 2), 9090), proxy.admin);
        let generation = |status: serde_json::Value| status["route"]["generation"].to_string();
        let expected = generation(proxy.status().await);
        prometheus.wait_for_generation(&expected).await;

        // The leader moves: Prometheus sees the new generation.
        cluster.nodes[0].role.set(RoleReply::replica());
        cluster.nodes[1].role.set(RoleReply::leader());
        let second = cluster.nodes[1].addr();
        assert!(proxy.wait_route(Some(&second), WAIT).await, "second route");
        let moved = generation(proxy.status().await);
        assert_ne!(moved, expected);
        prometheus.wait_for_generation(&moved).await;

        // The shipped rules are loaded and evaluate without errors.
        let rules_healthy = || async {
            let (_, body) = prometheus.get("/api/v1/rules").await.unwrap_or_default();
            let rules: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            let all: Vec<serde_json::Value> = rules["data"]["groups"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
                .collect();
            let healthy = all.len() == 6 && all.iter().all(|r| r["health"] == "ok");
            (healthy, body)
        };
        assert!(
            eventually(WAIT, || async { rules_healthy().await.0 }).await,
            "the alerting rules did not all evaluate: {}\n{}",
            rules_healthy().await.1,
            prometheus.log()
        );
        proxy.stop().await;
    });
}
