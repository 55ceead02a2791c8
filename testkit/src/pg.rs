//! A real Postgres streaming-replication cluster on loopback addresses for integration tests.
//!
//! Node 0 is created with `initdb`, the others are `pg_basebackup -R` copies streaming from it.
//! Every node listens only on its own address, with its unix socket in its own directory, so
//! clusters of parallel tests never meet. Postgres refuses to run as root, so when the tests
//! run as root every Postgres binary runs as the `postgres` user.
//!
//! All calls block; from async tests use them directly (short) or through `spawn_blocking`.

use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Settings shared by every node: fast (no durability) and ready for streaming replication.
const COMMON_CONF: &str = "
fsync = off
synchronous_commit = off
full_page_writes = off
wal_level = replica
max_wal_senders = 5
hot_standby = on
shared_buffers = 32MB
max_connections = 50
wal_keep_size = 64MB
include 'node.conf'
";

/// Trust everything from loopback, replication included; nothing else can reach the nodes.
const PG_HBA: &str = "\
local all all trust
local replication all trust
host all all 127.0.0.0/8 trust
host replication all 127.0.0.0/8 trust
";

/// How long `pg_ctl -w` waits for start, stop and promote.
const PG_CTL_TIMEOUT_SECS: &str = "60";

/// Distinguishes clusters created by the same test process.
static NEXT_CLUSTER: AtomicUsize = AtomicUsize::new(0);

/// One Postgres server of a [`PgCluster`].
#[derive(Debug)]
pub struct PgNode {
    pub ip: Ipv4Addr,
    pub port: u16,
    /// The node's own directory: holds its unix socket and `postgres.log`.
    pub dir: PathBuf,
    /// `PGDATA`.
    pub data_dir: PathBuf,
    pub log_file: PathBuf,
}

/// A primary (node 0 at start) and streaming replicas; stopped and removed on drop.
#[derive(Debug)]
pub struct PgCluster {
    pub nodes: Vec<PgNode>,
    root: PathBuf,
}

impl PgCluster {
    /// Creates node 0 with `initdb`, copies it to the other nodes with `pg_basebackup -R`
    /// and starts them all, each listening on `ips[i]:port` only.
    pub fn start(ips: &[Ipv4Addr], port: u16) -> PgCluster {
        assert!(!ips.is_empty(), "a cluster needs at least one node");
        for ip in ips {
            assert!(ip.is_loopback(), "{ip} is not a loopback address");
        }
        let root = std::env::temp_dir().join(format!(
            "roleproxy-pg-{}-{}",
            std::process::id(),
            NEXT_CLUSTER.fetch_add(1, Ordering::Relaxed)
        ));
        if root.exists() {
            fs::remove_dir_all(&root).expect("remove a stale cluster directory");
        }
        let nodes = ips
            .iter()
            .enumerate()
            .map(|(i, &ip)| {
                let dir = root.join(format!("node{i}"));
                PgNode {
                    ip,
                    port,
                    data_dir: dir.join("data"),
                    log_file: dir.join("postgres.log"),
                    dir,
                }
            })
            .collect();
        // Built before anything runs so that a panic below still stops and removes it all.
        let cluster = PgCluster { nodes, root };
        for node in &cluster.nodes {
            fs::create_dir_all(&node.dir).expect("create the node directory");
        }
        give_to_postgres(&cluster.root);

        let primary = &cluster.nodes[0];
        cluster.run_checked(
            0,
            pg_command("initdb")
                .arg("-D")
                .arg(&primary.data_dir)
                .args(["-U", "postgres", "--auth=trust", "--no-sync"])
                .args(["--encoding=UTF8", "--locale=C", "--no-instructions"]),
        );
        append(&primary.data_dir.join("postgresql.conf"), COMMON_CONF);
        write(&primary.data_dir.join("pg_hba.conf"), PG_HBA);
        cluster.write_node_conf(0);
        cluster.start_node(0);

        for i in 1..cluster.nodes.len() {
            let node = &cluster.nodes[i];
            cluster.run_checked(
                i,
                pg_command("pg_basebackup")
                    .arg("-D")
                    .arg(&node.data_dir)
                    .args(["-h", &primary.ip.to_string()])
                    .args(["-p", &primary.port.to_string()])
                    .args(["-U", "postgres", "-R", "-X", "stream"])
                    .args(["--checkpoint=fast", "--no-sync"]),
            );
            // The copy carries node 0's listen address; give the replica its own.
            cluster.write_node_conf(i);
            cluster.start_node(i);
        }
        cluster
    }

    /// Kills node `i` without a shutdown checkpoint, like a crash (`pg_ctl stop -m immediate`).
    pub fn stop_immediate(&self, i: usize) {
        self.pg_ctl(i, &["stop", "-m", "immediate"]);
    }

    /// Stops node `i` cleanly (`pg_ctl stop -m fast`).
    pub fn stop(&self, i: usize) {
        self.pg_ctl(i, &["stop", "-m", "fast"]);
    }

    /// Starts node `i` again, as the primary or a standby depending on its data directory.
    pub fn start_node(&self, i: usize) {
        let log = self.nodes[i].log_file.clone();
        let mut command = pg_command("pg_ctl");
        command.arg("-l").arg(&log);
        self.run_checked(i, pg_ctl_args(&mut command, &self.nodes[i], &["start"]));
    }

    /// Promotes standby `i` and waits until it accepts writes (`pg_ctl promote -w`).
    pub fn promote(&self, i: usize) {
        self.pg_ctl(i, &["promote"]);
    }

    /// A libpq conninfo for node `i` over TCP.
    pub fn conninfo(&self, i: usize) -> String {
        let node = &self.nodes[i];
        format!(
            "host={} port={} user=postgres dbname=postgres",
            node.ip, node.port
        )
    }

    fn pg_ctl(&self, i: usize, action: &[&str]) {
        let mut command = pg_command("pg_ctl");
        self.run_checked(i, pg_ctl_args(&mut command, &self.nodes[i], action));
    }

    /// Per-node settings, included by the shared `postgresql.conf`.
    fn write_node_conf(&self, i: usize) {
        let node = &self.nodes[i];
        let conf = format!(
            "listen_addresses = '{}'\nport = {}\nunix_socket_directories = '{}'\n",
            node.ip,
            node.port,
            node.dir.display()
        );
        let path = node.data_dir.join("node.conf");
        write(&path, &conf);
        give_to_postgres(&path);
    }

    /// Runs a Postgres binary and panics with its output and the
    /// tail of node `i`'s log when it fails.
    fn run_checked(&self, i: usize, command: &mut Command) {
        let description = format!("{command:?}");
        let output = command
            .output()
            .unwrap_or_else(|e| panic!("cannot run {description}: {e}"));
        if !output.status.success() {
            panic!(
                "{description} failed on node {i} ({}): {}\n--- {} (tail) ---\n{}",
                output.status,
                output_text(&output),
                self.nodes[i].log_file.display(),
                log_tail(&self.nodes[i].log_file, 40)
            );
        }
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        for node in &self.nodes {
            if node.data_dir.join("postmaster.pid").exists() {
                let mut command = pg_command("pg_ctl");
                // Best effort: a failure here must not turn a test failure into an abort.
                let _ = pg_ctl_args(&mut command, node, &["stop", "-m", "immediate"]).output();
            }
        }
        let _ = fs::remove_dir_all(&self.root);
    }
}

fn pg_ctl_args<'a>(command: &'a mut Command, node: &PgNode, action: &[&str]) -> &'a mut Command {
    command
        .arg("-D")
        .arg(&node.data_dir)
        .args(["-w", "-t", PG_CTL_TIMEOUT_SECS])
        .args(action)
}

/// Path of a Postgres server binary: in `pg_config --bindir` (Debian keeps them off `PATH`),
/// else looked up on `PATH`.
fn pg_bin(name: &str) -> PathBuf {
    use std::sync::OnceLock;
    static BINDIR: OnceLock<PathBuf> = OnceLock::new();
    BINDIR
        .get_or_init(|| {
            Command::new("pg_config")
                .arg("--bindir")
                .output()
                .ok()
                .filter(|output| output.status.success())
                .and_then(|output| String::from_utf8(output.stdout).ok())
                .map(|dir| PathBuf::from(dir.trim()))
                .unwrap_or_default()
        })
        .join(name)
}

/// Whether this process runs as root (effective uid 0), read from `/proc` to stay libc-free.
fn is_root() -> bool {
    use std::sync::OnceLock;
    static ROOT: OnceLock<bool> = OnceLock::new();
    *ROOT.get_or_init(|| {
        let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
        status
            .lines()
            .find_map(|line| line.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1))
            == Some("0")
    })
}

/// A command for the Postgres binary `name`, run as the `postgres` user when we are root.
fn pg_command(name: &str) -> Command {
    if !is_root() {
        return Command::new(pg_bin(name));
    }
    let mut command = Command::new("runuser");
    command.args(["-u", "postgres", "--"]).arg(pg_bin(name));
    command
}

/// Hands `path` (recursively) to the `postgres` user when running as root.
fn give_to_postgres(path: &Path) {
    if !is_root() {
        return;
    }
    let output = Command::new("chown")
        .arg("-R")
        .arg("postgres:")
        .arg(path)
        .output()
        .expect("run chown");
    assert!(
        output.status.success(),
        "chown -R postgres: {} failed: {}",
        path.display(),
        output_text(&output)
    );
}

fn append(path: &Path, text: &str) {
    use std::io::Write;
    let mut file = fs::OpenOptions::new()
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    file.write_all(text.as_bytes())
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

fn write(path: &Path, text: &str) {
    fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

fn output_text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn log_tail(path: &Path, lines: usize) -> String {
    match fs::read_to_string(path) {
        Ok(log) => {
            let all: Vec<&str> = log.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(no log: {e})"),
    }
}
