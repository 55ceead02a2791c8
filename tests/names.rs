//! Configuration that works anywhere: the `roleproxy` binary, with no environment variable and
//! no Fly key, in front of a real Postgres cluster whose nodes are named in a hosts file and
//! found by the system resolver. The binary runs in a mount namespace of its own whose
//! `/etc/hosts` and `/etc/resolv.conf` are files of the test (the host's files are never
//! changed); the namespace keeps the host's network, so the loopback nodes are reachable. The
//! resolver it names answers nothing, so no name leaves the machine.

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use roleproxy_testkit::cluster::{ClusterSpec, LocalCluster};
use roleproxy_testkit::eventually;
use roleproxy_testkit::writer::connect;

const BIN: &str = env!("CARGO_BIN_EXE_roleproxy");
const WAIT: Duration = Duration::from_secs(60);
const NET: u8 = 213;

fn ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, NET, 0, last)
}

/// A file of this test, removed with it.
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str, text: &str) -> TempFile {
        let path =
            std::env::temp_dir().join(format!("roleproxy-names-{}-{name}", std::process::id()));
        std::fs::write(&path, text).expect("write a test file");
        TempFile(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The files the namespace sees as `/etc/hosts` and `/etc/resolv.conf`.
struct Names {
    hosts: TempFile,
    resolv: TempFile,
}

impl Names {
    fn new(hosts: &str) -> Names {
        Names {
            hosts: TempFile::new("hosts", hosts),
            // Nothing listens there: a name not in the hosts file does not resolve.
            resolv: TempFile::new("resolv.conf", &format!("nameserver {}\n", ip(53))),
        }
    }

    /// The binary with `args`, in a mount namespace with these files, and an environment
    /// holding only `PATH` (for `mount`) and the log level.
    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new("unshare");
        command
            .args([
                "--mount",
                "sh",
                "-c",
                r#"mount --bind "$1" /etc/hosts && mount --bind "$2" /etc/resolv.conf && shift 2 && exec "$@""#,
                "sh",
            ])
            .arg(&self.hosts.0)
            .arg(&self.resolv.0)
            .arg(BIN)
            .args(args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("RUST_LOG", "info");
        command
    }
}

/// A running proxy, killed when dropped; its log kept for failure messages.
struct Proxy {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl Proxy {
    fn start(names: &Names, config: &Path) -> Proxy {
        let config = config.to_str().expect("a UTF-8 path");
        let mut child = names
            .command(&["run", "--config", config])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("unshare starts");
        let stderr = child.stderr.take().expect("stderr piped");
        let log = Arc::new(Mutex::new(Vec::new()));
        let lines = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                lines.lock().expect("log").push(line);
            }
        });
        Proxy { child, log }
    }

    fn log(&self) -> String {
        self.log.lock().expect("log").join("\n")
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether the server a client reaches at `addr` is in recovery, and its address.
async fn served_by(addr: SocketAddr) -> Option<(bool, String)> {
    let conninfo = format!(
        "host={} port={} user=postgres dbname=postgres connect_timeout=10",
        addr.ip(),
        addr.port()
    );
    let client = connect(&conninfo).await.ok()?;
    let row = client
        .query_one("SELECT pg_is_in_recovery(), host(inet_server_addr())", &[])
        .await
        .ok()?;
    Some((row.get(0), row.get(1)))
}

/// Waits until clients of `addr` reach `expected`; the last answer otherwise.
async fn reaches(addr: SocketAddr, expected: (bool, String)) -> Option<(bool, String)> {
    eventually(WAIT, || {
        let expected = expected.clone();
        async move { served_by(addr).await.filter(|got| *got == expected) }
    })
    .await
}

/// Node 0 is the leader and node 1 its replica; the file names them only as
/// `pg-a.cluster.test` and `pg-b.cluster.test`, and `pg.cluster.test` lists both.
#[test]
fn a_file_with_no_fly_key_and_no_variable_routes_to_nodes_named_in_the_hosts_file() {
    let runtime = roleproxy_testkit::harness::runtime();
    let spec = ClusterSpec {
        name: "iad.names.internal".to_owned(),
        dns_ip: ip(1).into(),
        ..ClusterSpec::demo().with_ips([ip(11), ip(12)])
    };
    let (pg_port, agent_port) = (spec.pg_port, spec.agent_port);
    let cluster = runtime
        .block_on(LocalCluster::start(spec))
        .expect("cluster starts");
    let names = Names::new(&format!(
        "{a} pg-a.cluster.test pg.cluster.test\n{b} pg-b.cluster.test pg.cluster.test\n",
        a = ip(11),
        b = ip(12)
    ));
    let leader = (false, ip(11).to_string());
    let replica = (true, ip(12).to_string());

    // Discovery by a name of the hosts file, and a fixed target by name: nothing else set
    // about the cluster, no nameservers, no backup key.
    let (clients, local) = (
        SocketAddr::from((ip(1), 16432)),
        SocketAddr::from((ip(1), 16433)),
    );
    let by_dns = TempFile::new(
        "by-dns.toml",
        &format!(
            "[listen]\naddresses = [\"{clients}\"]\n\
             [[listeners]]\nname = \"node-b\"\naddresses = [\"{local}\"]\ntarget = \"pg-b.cluster.test:{pg_port}\"\n\
             [backends]\ndns_names = [\"pg.cluster.test\"]\nport = {pg_port}\n\
             [check]\nport = {agent_port}\n[admin]\naddress = \"\"\n"
        ),
    );
    let checked = names
        .command(&["check", "--resolve", "--config", path(&by_dns)])
        .output()
        .expect("check runs");
    let stderr = String::from_utf8_lossy(&checked.stderr);
    assert!(checked.status.success(), "{stderr}");
    assert!(
        !stderr.contains("warning"),
        "every name resolves from the hosts file: {stderr}"
    );
    let proxy = Proxy::start(&names, &by_dns.0);
    runtime.block_on(async {
        assert_eq!(
            reaches(clients, leader.clone()).await,
            Some(leader.clone()),
            "clients reach the leader found by name: {}",
            proxy.log()
        );
        assert_eq!(
            reaches(local, replica.clone()).await,
            Some(replica.clone()),
            "the fixed target by name is node b: {}",
            proxy.log()
        );
    });
    drop(proxy);

    // Static backends by name, and no DNS name at all.
    let by_backup = TempFile::new(
        "by-backup.toml",
        &format!(
            "[listen]\naddresses = [\"{clients}\"]\n\
             [backends]\ndns_names = []\nbackup = [\"pg-b.cluster.test:{pg_port}\", \"pg-a.cluster.test:{pg_port}\"]\n\
             [check]\nport = {agent_port}\n[admin]\naddress = \"\"\n"
        ),
    );
    let proxy = Proxy::start(&names, &by_backup.0);
    runtime.block_on(async {
        assert_eq!(
            reaches(clients, leader.clone()).await,
            Some(leader.clone()),
            "clients reach the leader listed by name: {}",
            proxy.log()
        );
    });
    drop(proxy);
    drop(cluster);
}

fn path(file: &TempFile) -> &str {
    file.0.to_str().expect("a UTF-8 path")
}

/// `roleproxy check` warns, and still says the file is valid (exit 0), about a file that
/// cannot route, and with `--resolve`, about each name that does not resolve.
#[test]
fn check_warns_about_a_file_that_cannot_route_or_a_name_that_does_not_resolve() {
    let names = Names::new(&format!("{} pg-a.cluster.test\n", ip(11)));
    let check = |text: &str, resolve: bool| {
        let file = TempFile::new("check.toml", text);
        let mut args = vec!["check", "--config", path(&file)];
        if resolve {
            args.push("--resolve");
        }
        let output = names.command(&args).output().expect("check runs");
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        assert!(output.status.success(), "{text}: {stderr}");
        assert!(
            String::from_utf8_lossy(&output.stdout).contains("is valid"),
            "{text}"
        );
        stderr
    };
    let empty = "[backends]\ndns_names = []\nbackup = []\n";
    let stderr = check(empty, false);
    assert!(
        stderr.contains("warning")
            && stderr.contains("backends.dns_names and backends.backup are both empty"),
        "{stderr}"
    );

    let named = "[backends]\ndns_names = [\"nowhere.cluster.test\"]\n\
                 backup = [\"pg-a.cluster.test:5433\", \"gone.cluster.test:5433\"]\n\
                 resolve_timeout = \"500ms\"\n\
                 [[listeners]]\naddresses = [\"127.0.0.1:0\"]\ntarget = \"pg-a.cluster.test:5433\"\n";
    assert_eq!(
        check(named, false),
        "",
        "nothing is resolved without --resolve"
    );
    let stderr = check(named, true);
    let warnings: Vec<&str> = stderr.lines().filter(|l| l.contains("warning")).collect();
    assert_eq!(warnings.len(), 2, "{stderr}");
    assert!(
        warnings[0].contains("backends.dns_names[0]: nowhere.cluster.test does not resolve"),
        "{stderr}"
    );
    assert!(
        warnings[1].contains("backends.backup[1]: gone.cluster.test does not resolve"),
        "{stderr}"
    );
}
