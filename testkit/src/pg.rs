//! A real Postgres streaming-replication cluster on loopback addresses for integration tests.
//!
//! Node 0 is created with `initdb`, the others are `pg_basebackup -R` copies streaming from it.
//! Every node listens only on its own address, with its unix socket in its own directory, so
//! clusters of parallel tests never meet. Postgres refuses to run as root, so when the tests
//! run as root every Postgres binary runs as the `postgres` user.
//!
//! Operations return [`PgError`] instead of panicking, so an interactive program survives a
//! failed command; tests call `.expect(..)`, and the error's `Debug` is its readable text.
//!
//! All calls block; from async code run them through `spawn_blocking`.

use std::fmt;
use std::fs;
use std::io;
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
max_wal_senders = 10
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

/// Lines of the node's server log quoted in a [`PgError`].
const LOG_TAIL_LINES: usize = 40;

/// Distinguishes clusters created by the same test process.
static NEXT_CLUSTER: AtomicUsize = AtomicUsize::new(0);

/// Why a cluster operation failed. The text names the command, what it printed and the tail
/// of the node's server log, which is usually where the real reason is.
pub enum PgError {
    /// The binary could not be run at all (missing, not executable).
    Spawn { command: String, source: io::Error },
    /// The command ran and exited unsuccessfully (boxed: errors are the rare path, and a
    /// small `Result` is cheap to pass around).
    Failed(Box<CommandFailure>),
    /// A file operation on the cluster's directories failed.
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    /// The request makes no sense for the cluster's current state (bad node index, ...).
    Invalid(String),
}

impl fmt::Display for PgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PgError::Spawn { command, source } if source.kind() == io::ErrorKind::NotFound => {
                write!(
                    f,
                    "cannot run {command}: {source} (Postgres 15 comes with the Debian packages \
                 `postgresql-15` and `postgresql-client-15`, `runuser` with `util-linux`; \
                 scripts/test installs what the tests need)"
                )
            }
            PgError::Spawn { command, source } => write!(f, "cannot run {command}: {source}"),
            PgError::Failed(failure) => write!(
                f,
                "{} failed on {} ({}): {}\n--- {} (tail) ---\n{}",
                failure.command,
                failure.node,
                failure.status,
                failure.output.trim_end(),
                failure.log.display(),
                failure.log_tail
            ),
            PgError::Io {
                action,
                path,
                source,
            } => write!(f, "cannot {action} {}: {source}", path.display()),
            PgError::Invalid(message) => f.write_str(message),
        }
    }
}

/// The same text as `Display`, so `.expect(..)` in a test prints the log tail readably.
impl fmt::Debug for PgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for PgError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            PgError::Spawn { source, .. } | PgError::Io { source, .. } => Some(source),
            PgError::Failed { .. } | PgError::Invalid(_) => None,
        }
    }
}

/// A Postgres command that exited unsuccessfully on one node.
#[derive(Debug)]
pub struct CommandFailure {
    /// Which node, with its address.
    pub node: String,
    pub command: String,
    pub status: std::process::ExitStatus,
    /// Its stdout and stderr.
    pub output: String,
    /// The node's server log, and its last lines.
    pub log: PathBuf,
    pub log_tail: String,
}

/// How [`PgCluster::start_with`] sets the nodes up.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Serve TLS (`ssl = on`) with a certificate signed by a test authority; plain connections
    /// still work.
    pub tls: bool,
}

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
    /// Certificate and key shared by every node when TLS is on.
    tls: Option<(PathBuf, PathBuf)>,
}

impl PgCluster {
    /// Creates node 0 with `initdb`, copies it to the other nodes with `pg_basebackup -R`
    /// and starts them all, each listening on `ips[i]:port` only.
    pub fn start(ips: &[Ipv4Addr], port: u16) -> Result<PgCluster, PgError> {
        Self::start_with(ips, port, Options::default())
    }

    /// [`PgCluster::start`] with options.
    pub fn start_with(ips: &[Ipv4Addr], port: u16, options: Options) -> Result<PgCluster, PgError> {
        if ips.is_empty() {
            return Err(PgError::Invalid("a cluster needs at least one node".into()));
        }
        if let Some(ip) = ips.iter().find(|ip| !ip.is_loopback()) {
            return Err(PgError::Invalid(format!("{ip} is not a loopback address")));
        }
        let root = std::env::temp_dir().join(format!(
            "roleproxy-pg-{}-{}",
            std::process::id(),
            NEXT_CLUSTER.fetch_add(1, Ordering::Relaxed)
        ));
        if root.exists() {
            fs::remove_dir_all(&root).map_err(io_error("remove the stale directory", &root))?;
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
        let tls = options
            .tls
            .then(|| (root.join("tls/server.crt"), root.join("tls/server.key")));
        // Built before anything runs so that an error below still stops and removes it all.
        let cluster = PgCluster { nodes, root, tls };
        for node in &cluster.nodes {
            fs::create_dir_all(&node.dir).map_err(io_error("create", &node.dir))?;
        }
        if let Some((cert, key)) = &cluster.tls {
            make_certificate(cert, key, ips)?;
        }
        give_to_postgres(&cluster.root)?;

        let primary = &cluster.nodes[0];
        cluster.run_checked(
            0,
            pg_command("initdb")
                .arg("-D")
                .arg(&primary.data_dir)
                .args(["-U", "postgres", "--auth=trust", "--no-sync"])
                .args(["--encoding=UTF8", "--locale=C", "--no-instructions"]),
        )?;
        append(&primary.data_dir.join("postgresql.conf"), COMMON_CONF)?;
        write(&primary.data_dir.join("pg_hba.conf"), PG_HBA)?;
        cluster.write_node_conf(0)?;
        cluster.start_node(0)?;

        for i in 1..cluster.nodes.len() {
            cluster.base_backup(i, 0)?;
            cluster.start_node(i)?;
        }
        Ok(cluster)
    }

    /// The certificate the nodes serve when TLS is on.
    pub fn tls_cert(&self) -> Option<&Path> {
        self.tls.as_ref().map(|(cert, _)| cert.as_path())
    }

    /// The certificate of the authority that signed [`PgCluster::tls_cert`], for clients that
    /// verify it (`sslrootcert`).
    pub fn tls_root_cert(&self) -> Option<PathBuf> {
        self.tls
            .as_ref()
            .map(|(cert, _)| cert.with_file_name(CA_CERT))
    }

    /// The directory holding every node; removed on drop.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Kills node `i` without a shutdown checkpoint, like a crash (`pg_ctl stop -m immediate`).
    pub fn stop_immediate(&self, i: usize) -> Result<(), PgError> {
        self.pg_ctl(i, &["stop", "-m", "immediate"])
    }

    /// Stops node `i` cleanly (`pg_ctl stop -m fast`).
    pub fn stop(&self, i: usize) -> Result<(), PgError> {
        self.pg_ctl(i, &["stop", "-m", "fast"])
    }

    /// Kills every running node; errors are ignored because this is teardown.
    pub fn stop_all(&self) {
        for i in 0..self.nodes.len() {
            if self.is_running(i) {
                let _ = self.stop_immediate(i);
            }
        }
    }

    /// Starts node `i` again, as the primary or a standby depending on its data directory.
    pub fn start_node(&self, i: usize) -> Result<(), PgError> {
        let node = self.node(i)?;
        let mut command = pg_command("pg_ctl");
        command.arg("-l").arg(&node.log_file);
        self.run_checked(i, pg_ctl_args(&mut command, node, &["start"]))
    }

    /// Promotes standby `i` and waits until it accepts writes (`pg_ctl promote -w`, which
    /// polls every 100 ms, so it returns up to that long after the promotion).
    pub fn promote(&self, i: usize) -> Result<(), PgError> {
        self.pg_ctl(i, &["promote"])
    }

    /// Whether node `i`'s postmaster is alive, from its pid file and `/proc`: cheap enough
    /// to call from async code.
    pub fn is_running(&self, i: usize) -> bool {
        let Some(pid) = self.postmaster_pid(i) else {
            return false;
        };
        // A crashed postmaster leaves its pid file behind, and may linger as a zombie.
        match fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(stat) => stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .is_some_and(|state| state != "Z" && state != "X"),
            Err(_) => false,
        }
    }

    /// Node `i`'s postmaster pid, from its `postmaster.pid` (left behind by a crash, so
    /// [`PgCluster::is_running`] says whether it is alive).
    pub fn postmaster_pid(&self, i: usize) -> Option<u32> {
        postmaster_pid(&self.nodes.get(i)?.data_dir)
    }

    /// Rebuilds node `i` as a streaming replica of `leader`: stops it if running, wipes its
    /// data directory, copies the leader with `pg_basebackup -R` and starts it. A fresh copy
    /// is fast for the small databases of tests and works whatever timeline `i` was on.
    pub fn rejoin_as_replica(&self, i: usize, leader: usize) -> Result<(), PgError> {
        self.node(leader)?;
        if i == leader {
            return Err(PgError::Invalid(format!(
                "{} cannot be a replica of itself",
                self.node(i)?.ip
            )));
        }
        if self.is_running(i) {
            self.stop_immediate(i)?;
        }
        let data_dir = &self.node(i)?.data_dir;
        if data_dir.exists() {
            fs::remove_dir_all(data_dir).map_err(io_error("remove", data_dir))?;
        }
        self.base_backup(i, leader)?;
        self.start_node(i)
    }

    /// Points running replica `i` at `leader`. Postgres 15 applies `primary_conninfo` on
    /// reload, and the default `recovery_target_timeline = latest` makes the replica follow
    /// the new leader's timeline, provided it has not replayed past the point where it forked.
    pub fn follow(&self, i: usize, leader: usize) -> Result<(), PgError> {
        let upstream = self.replication_conninfo(leader)?;
        self.set_primary_conninfo(i, &upstream)
    }

    /// Stops replica `i` from streaming (empty `primary_conninfo`), freezing what it has
    /// received, so that a switchover can compare replicas that no longer move.
    pub fn detach(&self, i: usize) -> Result<(), PgError> {
        self.set_primary_conninfo(i, "")
    }

    /// Makes every new transaction on node `i` read-only (`default_transaction_read_only`),
    /// so `SHOW transaction_read_only` says `on` while Postgres stays up; `false` undoes it.
    pub fn set_read_only(&self, i: usize, read_only: bool) -> Result<(), PgError> {
        let set = if read_only {
            "ALTER SYSTEM SET default_transaction_read_only = on"
        } else {
            "ALTER SYSTEM RESET default_transaction_read_only"
        };
        self.sql(i, &[set, "SELECT pg_reload_conf()"]).map(drop)
    }

    /// Runs each statement with `psql` over node `i`'s unix socket, one `-c` each so that
    /// statements like `ALTER SYSTEM` do not end up in a transaction block. Returns what the
    /// statements printed, unaligned and without headers.
    pub fn sql(&self, i: usize, statements: &[&str]) -> Result<String, PgError> {
        let node = self.node(i)?;
        let mut command = pg_command("psql");
        command
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .arg("-h")
            .arg(&node.dir)
            .args([
                "-p",
                &node.port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
            ]);
        for statement in statements {
            command.args(["-c", statement]);
        }
        let output = self.run_checked_output(i, &mut command)?;
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    }

    /// Puts `rules` in front of node `i`'s `pg_hba.conf` (the first matching rule applies; the
    /// trust rules follow them) and reloads it. `pg_hba.conf` is not replicated: set it on
    /// every node that needs it.
    pub fn set_hba(&self, i: usize, rules: &str) -> Result<(), PgError> {
        let path = self.node(i)?.data_dir.join("pg_hba.conf");
        write(&path, &format!("{}\n{PG_HBA}", rules.trim_end()))?;
        give_to_postgres(&path)?;
        self.sql(i, &["SELECT pg_reload_conf()"]).map(drop)
    }

    /// A libpq conninfo for node `i` over TCP.
    pub fn conninfo(&self, i: usize) -> String {
        let node = &self.nodes[i];
        format!(
            "host={} port={} user=postgres dbname=postgres",
            node.ip, node.port
        )
    }

    fn set_primary_conninfo(&self, i: usize, upstream: &str) -> Result<(), PgError> {
        let set = format!("ALTER SYSTEM SET primary_conninfo = '{upstream}'");
        self.sql(i, &[&set, "SELECT pg_reload_conf()"]).map(drop)
    }

    /// How a replica connects to `leader`; the same shape `pg_basebackup -R` writes.
    fn replication_conninfo(&self, leader: usize) -> Result<String, PgError> {
        let node = self.node(leader)?;
        Ok(format!("host={} port={} user=postgres", node.ip, node.port))
    }

    /// Copies `source` into node `i`'s (absent) data directory as a standby of it, and gives
    /// the copy `i`'s own listen address.
    fn base_backup(&self, i: usize, source: usize) -> Result<(), PgError> {
        let node = self.node(i)?;
        let source = self.node(source)?;
        self.run_checked(
            i,
            pg_command("pg_basebackup")
                .arg("-D")
                .arg(&node.data_dir)
                .args(["-h", &source.ip.to_string()])
                .args(["-p", &source.port.to_string()])
                .args(["-U", "postgres", "-R", "-X", "stream"])
                .args(["--checkpoint=fast", "--no-sync"]),
        )?;
        // A read-only source (the old leader of a switchover) must not pass that on: the
        // copy may be promoted one day.
        let auto_conf = node.data_dir.join("postgresql.auto.conf");
        if let Ok(text) = fs::read_to_string(&auto_conf) {
            let kept: String = text
                .lines()
                .filter(|line| {
                    !line
                        .trim_start()
                        .starts_with("default_transaction_read_only")
                })
                .map(|line| format!("{line}\n"))
                .collect();
            write(&auto_conf, &kept)?;
        }
        // The copy carries the source's node.conf; give the replica its own.
        self.write_node_conf(i)
    }

    fn node(&self, i: usize) -> Result<&PgNode, PgError> {
        self.nodes.get(i).ok_or_else(|| {
            PgError::Invalid(format!(
                "no node {i}: the cluster has nodes 0..{}",
                self.nodes.len()
            ))
        })
    }

    fn pg_ctl(&self, i: usize, action: &[&str]) -> Result<(), PgError> {
        let node = self.node(i)?;
        let mut command = pg_command("pg_ctl");
        self.run_checked(i, pg_ctl_args(&mut command, node, action))
    }

    /// Per-node settings, included by the shared `postgresql.conf`.
    fn write_node_conf(&self, i: usize) -> Result<(), PgError> {
        let node = self.node(i)?;
        // cluster_name names the node in `ps` and is the walreceiver's application_name.
        let mut conf = format!(
            "listen_addresses = '{}'\nport = {}\nunix_socket_directories = '{}'\ncluster_name = 'node{i}'\n",
            node.ip,
            node.port,
            node.dir.display()
        );
        if let Some((cert, key)) = &self.tls {
            conf.push_str(&format!(
                "ssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'\n",
                cert.display(),
                key.display()
            ));
        }
        let path = node.data_dir.join("node.conf");
        write(&path, &conf)?;
        give_to_postgres(&path)
    }

    fn run_checked(&self, i: usize, command: &mut Command) -> Result<(), PgError> {
        self.run_checked_output(i, command).map(drop)
    }

    /// Runs a Postgres binary; on failure the error carries its output and the tail of
    /// node `i`'s log.
    fn run_checked_output(&self, i: usize, command: &mut Command) -> Result<Output, PgError> {
        let description = describe(command);
        let output = command.output().map_err(|source| PgError::Spawn {
            command: description.clone(),
            source,
        })?;
        if output.status.success() {
            return Ok(output);
        }
        let node = self.node(i)?;
        Err(PgError::Failed(Box::new(CommandFailure {
            node: format!("node {i} ({}:{})", node.ip, node.port),
            command: description,
            status: output.status,
            output: output_text(&output),
            log: node.log_file.clone(),
            log_tail: log_tail(&node.log_file, LOG_TAIL_LINES),
        })))
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        // Best effort: a failure here must not turn a test failure into an abort.
        self.stop_all();
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

/// The test authority's certificate, beside the nodes' certificate.
const CA_CERT: &str = "ca.crt";

/// Writes a certificate for `localhost`, 127.0.0.1 and the nodes' addresses, signed by a test
/// authority made for this cluster (its certificate is [`CA_CERT`] in the same directory):
/// strict verifiers refuse an authority's certificate served as a server's own. Postgres
/// insists that the key is private to its owner.
fn make_certificate(cert: &Path, key: &Path, ips: &[Ipv4Addr]) -> Result<(), PgError> {
    use std::os::unix::fs::PermissionsExt;
    let dir = cert
        .parent()
        .ok_or_else(|| PgError::Invalid(format!("{} has no directory", cert.display())))?;
    fs::create_dir_all(dir).map_err(io_error("create", dir))?;
    let names: Vec<String> = ["DNS:localhost".to_owned(), "IP:127.0.0.1".to_owned()]
        .into_iter()
        .chain(ips.iter().map(|ip| format!("IP:{ip}")))
        .collect();
    let (ca_cert, ca_key) = (dir.join(CA_CERT), dir.join("ca.key"));
    let (request, extensions) = (dir.join("server.csr"), dir.join("server.ext"));
    write(
        &extensions,
        &format!(
            "basicConstraints = critical, CA:FALSE\nextendedKeyUsage = serverAuth\nsubjectAltName = {}\n",
            names.join(",")
        ),
    )?;
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    openssl(|c| {
        c.args(["req", "-x509", "-days", "2"])
            .args(ec)
            .args(["-subj", "/CN=roleproxy test authority"])
            .arg("-keyout")
            .arg(&ca_key)
            .arg("-out")
            .arg(&ca_cert)
    })?;
    openssl(|c| {
        c.arg("req")
            .args(ec)
            .args(["-subj", "/CN=localhost"])
            .arg("-keyout")
            .arg(key)
            .arg("-out")
            .arg(&request)
    })?;
    openssl(|c| {
        c.args(["x509", "-req", "-days", "2", "-set_serial", "1"])
            .arg("-in")
            .arg(&request)
            .arg("-CA")
            .arg(&ca_cert)
            .arg("-CAkey")
            .arg(&ca_key)
            .arg("-extfile")
            .arg(&extensions)
            .arg("-out")
            .arg(cert)
    })?;
    fs::set_permissions(key, fs::Permissions::from_mode(0o600)).map_err(io_error("chmod", key))
}

/// Runs `openssl` with the arguments `args` adds.
fn openssl(args: impl FnOnce(&mut Command) -> &mut Command) -> Result<(), PgError> {
    let openssl = crate::find_program("openssl", "openssl").map_err(PgError::Invalid)?;
    let mut command = Command::new(openssl);
    args(&mut command);
    let description = describe(&command);
    let output = command.output().map_err(|source| PgError::Spawn {
        command: description.clone(),
        source,
    })?;
    if !output.status.success() {
        return Err(PgError::Invalid(format!(
            "{description} failed ({}): {}",
            output.status,
            output_text(&output)
        )));
    }
    Ok(())
}

/// Path of a Postgres binary: in `pg_config --bindir` (Debian keeps the server binaries off
/// `PATH`), else the standard Debian location, else looked up on `PATH`.
/// TCP connections `addr` has accepted and holds open, read from this network namespace's
/// `/proc/net/tcp`. Postgres forks a process for each one it accepts, before any byte arrives,
/// and in Postgres 15 `pg_stat_activity` lists none of them until their startup packet.
pub fn accepted_connections(addr: std::net::SocketAddrV4) -> usize {
    let local = format!(
        "{:08X}:{:04X}",
        u32::from_le_bytes(addr.ip().octets()),
        addr.port()
    );
    fs::read_to_string("/proc/net/tcp")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter(|line| {
            let mut fields = line.split_whitespace().skip(1);
            // ESTABLISHED is state 01.
            fields.next() == Some(local.as_str()) && fields.nth(1) == Some("01")
        })
        .count()
}

/// The postmaster's pid: the first line of `postmaster.pid` in `data_dir`, if there is one.
pub fn postmaster_pid(data_dir: &Path) -> Option<u32> {
    fs::read_to_string(data_dir.join("postmaster.pid"))
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

pub fn pg_bin(name: &str) -> PathBuf {
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
                .or_else(|| {
                    let debian = PathBuf::from("/usr/lib/postgresql/15/bin");
                    debian.join("initdb").exists().then_some(debian)
                })
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
fn give_to_postgres(path: &Path) -> Result<(), PgError> {
    if !is_root() {
        return Ok(());
    }
    let mut command = Command::new("chown");
    command.arg("-R").arg("postgres:").arg(path);
    let description = describe(&command);
    let output = command.output().map_err(|source| PgError::Spawn {
        command: description.clone(),
        source,
    })?;
    if output.status.success() {
        Ok(())
    } else {
        Err(PgError::Invalid(format!(
            "{description} failed: {}",
            output_text(&output)
        )))
    }
}

/// A command line as one readable string, for error messages.
fn describe(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|part| part.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

fn io_error<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> PgError + 'a {
    move |source| PgError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

fn append(path: &Path, text: &str) -> Result<(), PgError> {
    use std::io::Write;
    fs::OpenOptions::new()
        .append(true)
        .open(path)
        .and_then(|mut file| file.write_all(text.as_bytes()))
        .map_err(io_error("append to", path))
}

fn write(path: &Path, text: &str) -> Result<(), PgError> {
    fs::write(path, text).map_err(io_error("write", path))
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
