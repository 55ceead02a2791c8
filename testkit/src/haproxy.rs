//! HAProxy with the Fly Postgres image's configuration, pointed at a loopback cluster, so the
//! benchmarks can measure roleproxy against what it replaces in the same run.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// Where the Fly configuration is pointed.
#[derive(Debug, Clone)]
pub struct FlyHaproxyConfig {
    pub listen: SocketAddr,
    pub stats: SocketAddr,
    /// The DNS server standing in for `[fdaa::3]:53`.
    pub nameserver: SocketAddr,
    /// Stands in for `$PRIMARY_REGION.$FLY_APP_NAME.internal`.
    pub name: String,
    pub pg_port: u16,
    pub check_port: u16,
    /// Stands in for `[$PG_LISTEN_ADDRESS]:5433`.
    pub backup: SocketAddr,
    /// `leader` (postgres-ha) or `primary` (postgres-flex).
    pub expect: String,
    /// 1000 in the image.
    pub maxconn: usize,
    /// The image's config as a skilled operator tunes it for fast failover ([`TUNING`]).
    pub tuned: bool,
    /// HAProxy's descriptor limit (`ulimit-n`); `None` lets it size its own from `maxconn`.
    pub ulimit_n: Option<u64>,
}

/// What the tuned configuration changes, server by server: check every second, every 250 ms
/// while a server changes state; down after 2 failed checks or 1 failed connection of live
/// traffic, up after 1 good check; sessions to a server marked down are killed, and so are
/// those to the backup server once a real one is up.
pub const TUNING: &str = "default-server inter 1s fastinter 250ms downinter 1s fall 2 rise 1 \
observe layer4 error-limit 1 on-error mark-down on-marked-down shutdown-sessions \
on-marked-up shutdown-backup-sessions";

impl FlyHaproxyConfig {
    /// The image's `haproxy.cfg`, with only the addresses changed; when [`Self::tuned`],
    /// with [`TUNING`], `timeout check 2s`, `balance first` and DNS answers kept 1 s when the
    /// resolver fails.
    pub fn render(&self) -> String {
        let (timeout_check, hold, balance, tuning) = if self.tuned {
            (
                "2s",
                "\n    hold valid 1s",
                "first",
                format!("\n    {TUNING}"),
            )
        } else {
            ("5s", "", "roundrobin", String::new())
        };
        let ulimit = self
            .ulimit_n
            .map(|n| format!("\n    ulimit-n {n}"))
            .unwrap_or_default();
        format!(
            "global
    maxconn {maxconn}{ulimit}

defaults
    log global
    mode tcp
    retries 2
    timeout client 30m
    timeout connect 4s
    timeout server 30m
    timeout check {timeout_check}

resolvers flydns
    nameserver dns1 {nameserver}
    accepted_payload_size 8192{hold}

frontend ft_postgresql
    mode tcp
    bind {listen}
    default_backend bk_db

frontend stats
    mode http
    bind {stats}
    stats enable
    stats uri /stats
    stats refresh 10s

backend bk_db
    balance {balance}{tuning}
    option httpchk GET /flycheck/role
    http-check expect string {expect}
    http-check disable-on-404
    server-template pg 10 {name}:{pg_port} check port {check_port} resolvers flydns resolve-prefer ipv6 init-addr none on-marked-down shutdown-sessions
    server pg {backup} check backup port {check_port} on-marked-down shutdown-sessions
",
            maxconn = self.maxconn,
            nameserver = self.nameserver,
            listen = self.listen,
            stats = self.stats,
            expect = self.expect,
            name = self.name,
            pg_port = self.pg_port,
            check_port = self.check_port,
            backup = self.backup,
        )
    }
}

/// A running `haproxy` process; killed on drop.
pub struct Haproxy {
    child: Child,
    config_path: PathBuf,
    pub listen: SocketAddr,
}

impl Haproxy {
    /// Whether the `haproxy` binary is installed.
    pub fn available() -> bool {
        Command::new("haproxy")
            .arg("-v")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }

    /// What `haproxy -c` says of `config`: `Ok` when HAProxy accepts it, else its messages.
    pub fn check(config: &FlyHaproxyConfig) -> Result<(), String> {
        let path = write_config(config).map_err(|e| format!("cannot write the config: {e}"))?;
        let checked = Command::new("haproxy")
            .arg("-c")
            .arg("-f")
            .arg(&path)
            .output();
        let _ = std::fs::remove_file(&path);
        match checked {
            Ok(output) if output.status.success() => Ok(()),
            Ok(output) => Err(format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            )),
            Err(e) => Err(format!("cannot run haproxy -c: {e}")),
        }
    }

    /// Writes the config and starts HAProxy in the foreground; waits until it accepts.
    pub async fn start(config: &FlyHaproxyConfig) -> std::io::Result<Haproxy> {
        let config_path = write_config(config)?;
        let child = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&config_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let haproxy = Haproxy {
            child,
            config_path,
            listen: config.listen,
        };
        if crate::eventually(Duration::from_secs(10), || async {
            tokio::net::TcpStream::connect(config.stats).await.is_ok()
        })
        .await
        {
            return Ok(haproxy);
        }
        Err(std::io::Error::other("haproxy did not start listening"))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// `config` rendered into a file of its own in the temporary directory.
fn write_config(config: &FlyHaproxyConfig) -> std::io::Result<PathBuf> {
    let path = std::env::temp_dir().join(format!(
        "roleproxy-haproxy-{}-{}.cfg",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::write(&path, config.render())?;
    Ok(path)
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.config_path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(tuned: bool) -> FlyHaproxyConfig {
        let addr = |port| SocketAddr::from(([127, 0, 0, 1], port));
        FlyHaproxyConfig {
            listen: addr(15432),
            stats: addr(18404),
            nameserver: addr(10053),
            name: "iad.check.internal".into(),
            pg_port: 5433,
            check_port: 5500,
            backup: addr(5433),
            expect: "leader".into(),
            maxconn: 1000,
            tuned,
            ulimit_n: tuned.then_some(64),
        }
    }

    #[test]
    fn both_configurations_pass_haproxy_checks() {
        assert!(
            Haproxy::available(),
            "haproxy is not installed: it comes with the Debian package `haproxy` \
             (scripts/test installs what the tests need)"
        );
        for tuned in [false, true] {
            let text = config(tuned).render();
            assert_eq!(text.contains("balance first"), tuned, "{text}");
            assert_eq!(text.contains("fastinter 250ms"), tuned, "{text}");
            assert_eq!(text.contains("hold valid 1s"), tuned, "{text}");
            Haproxy::check(&config(tuned)).unwrap_or_else(|e| panic!("{text}\n{e}"));
        }
    }
}
