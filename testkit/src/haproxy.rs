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
}

impl FlyHaproxyConfig {
    /// The image's `haproxy.cfg`, with only the addresses changed.
    pub fn render(&self) -> String {
        format!(
            "global
    maxconn {maxconn}

defaults
    log global
    mode tcp
    retries 2
    timeout client 30m
    timeout connect 4s
    timeout server 30m
    timeout check 5s

resolvers flydns
    nameserver dns1 {nameserver}
    accepted_payload_size 8192

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
    balance roundrobin
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

    /// Writes the config and starts HAProxy in the foreground; waits until it accepts.
    pub async fn start(config: &FlyHaproxyConfig) -> std::io::Result<Haproxy> {
        let config_path = std::env::temp_dir().join(format!(
            "roleproxy-haproxy-{}-{}.cfg",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&config_path, config.render())?;
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

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.config_path);
    }
}
