//! The `roleproxy` binary: config validation, start-up errors, and a clean exit on SIGTERM.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use roleproxy_testkit::exit_status;

const BIN: &str = env!("CARGO_BIN_EXE_roleproxy");

fn write_config(name: &str, text: &str) -> PathBuf {
    let path =
        std::env::temp_dir().join(format!("roleproxy-cli-{}-{name}.toml", std::process::id()));
    std::fs::write(&path, text).expect("write config");
    path
}

/// The proxy started on a config file, with its log lines streamed to a channel.
struct Running {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Running {
    fn start(config: &std::path::Path) -> Running {
        Running::start_with(config, &[])
    }

    fn start_with(config: &std::path::Path, args: &[&str]) -> Running {
        Running::start_env(config, args, &[])
    }

    fn start_env(config: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> Running {
        let mut command = Command::new(BIN);
        command
            .args(args)
            .args(["--config"])
            .arg(config)
            .envs(env.iter().copied());
        Running::spawn(command)
    }

    /// Runs `command` (the binary with its arguments), logging at `info`.
    fn spawn(mut command: Command) -> Running {
        let mut child = command
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starts");
        let logs = child.stderr.take().expect("stderr piped");
        let (tx, lines) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(logs).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Running { child, lines }
    }

    /// The first log line from now on that contains `words`.
    fn wait_for(&self, words: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(words) => return line,
                Ok(_) => continue,
                Err(_) => break,
            }
        }
        panic!("the proxy never logged {words:?}");
    }

    /// Asserts the process still runs (`died` says what it means if not), then kills it.
    fn stop_running(mut self, died: &str) {
        assert!(self.child.try_wait().expect("wait").is_none(), "{died}");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
    }
}

#[test]
fn check_prints_the_effective_config_of_the_shipped_file() {
    let output = Command::new(BIN)
        .args(["check", "--config", "proxy.toml"])
        .env("PRIMARY_REGION", "iad")
        .env("FLY_APP_NAME", "app")
        .env("PG_LISTEN_ADDRESS", "fdaa::7")
        .output()
        .expect("runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("iad.app.internal"), "{stdout}");
    assert!(stdout.contains("\"[fdaa::7]:5433\""), "{stdout}");
    assert!(stdout.contains("leader_wait = \"10s\""), "{stdout}");
}

#[test]
fn bad_configs_stop_start_up_naming_the_key() {
    let rows = [
        (
            "missing-var",
            "[backends]\ndns_names = [\"${PRIMARY_REGION}.${FLY_APP_NAME}.internal\"]\n",
            "PRIMARY_REGION is not set",
        ),
        (
            "no-backends",
            "",
            "backends.dns_names: not set, nor backends.backup",
        ),
        (
            "unknown-key",
            "[proxy]\nleader_wiat = \"1s\"\n",
            "leader_wiat",
        ),
        (
            "bad-duration",
            "[check]\ninterval = \"fast\"\n",
            "check.interval",
        ),
        (
            "bare-number-password",
            "[check]\nkind = \"postgres\"\npassword = 12345678\n",
            "check.password",
        ),
    ];
    for (name, text, expected) in rows {
        let path = write_config(name, text);
        for command in ["check", "run"] {
            let mut cmd = Command::new(BIN);
            cmd.args([command, "--config"]).arg(&path);
            if name == "missing-var" {
                cmd.env_remove("PRIMARY_REGION");
            } else {
                cmd.env("PRIMARY_REGION", "iad");
            }
            let output = cmd
                .env("FLY_APP_NAME", "app")
                .env("PG_LISTEN_ADDRESS", "fdaa::7")
                .output()
                .expect("runs");
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert_eq!(output.status.code(), Some(2), "{name}/{command}: {stderr}");
            assert!(stderr.contains(expected), "{name}/{command}: {stderr}");
            assert!(!stderr.contains("12345678"), "{name}/{command}: {stderr}");
        }
        let _ = std::fs::remove_file(path);
    }
}

/// A missing variable, an unknown key and a bad value: all three in one run of `check` and of
/// `run`, one a line, each with its key and line.
#[test]
fn every_config_error_is_reported_in_one_run() {
    let path = write_config(
        "three-errors",
        "[backends]\ndns_names = [\"${NOT_SET_ANYWHERE}.internal\"]\n\
         [proxy]\nleader_wiat = \"1s\"\n\
         [check]\ninterval = \"fast\"\n",
    );
    for command in ["check", "run"] {
        let output = Command::new(BIN)
            .args([command, "--config"])
            .arg(&path)
            .env_remove("NOT_SET_ANYWHERE")
            .output()
            .expect("runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{command}: {stderr}");
        assert!(stderr.contains("(3 errors)"), "{command}: {stderr}");
        let expected = [
            "backends.dns_names[0]: environment variable NOT_SET_ANYWHERE is not set (write ${NOT_SET_ANYWHERE:-default}",
            "proxy.leader_wiat: unknown key; did you mean `leader_wait`?",
            "check.interval: bad duration",
        ];
        let lines: Vec<&str> = stderr.lines().skip(1).map(str::trim).collect();
        assert_eq!(lines.len(), 3, "{command}: one error a line: {stderr}");
        for ((line, words), number) in lines.iter().zip(expected).zip([2, 4, 6]) {
            assert!(
                line.starts_with(words),
                "{command}: {line:?} should start {words:?}"
            );
            assert!(
                line.contains(&format!("(line {number}, column")),
                "{command}: {line:?} should be at line {number}"
            );
        }
    }
    let _ = std::fs::remove_file(path);
}

#[test]
fn sigterm_stops_the_proxy_with_exit_zero() {
    let path = write_config(
        "sigterm",
        "[listen]\naddresses = [\"127.0.0.1:0\"]\n[admin]\naddress = \"\"\n\
         [backends]\ndns_names = []\nbackup = [\"127.0.0.1:1\"]\n[check]\nport = 1\n",
    );
    let mut proxy = Running::start(&path);
    // Once it says "listening", the signal handlers are installed.
    proxy.wait_for("listening");
    proxy.signal("TERM");
    let status = exit_status(&mut proxy.child, Duration::from_secs(30)).expect("proxy stops");
    assert!(status.success(), "exit status {status:?}");
    let _ = std::fs::remove_file(path);
}

#[test]
fn a_core_task_that_dies_makes_the_process_exit_non_zero_saying_why() {
    let path = write_config(
        "task-dies",
        "[listen]\naddresses = [\"127.0.0.1:0\"]\n[admin]\naddress = \"\"\n\
         [backends]\ndns_names = []\nbackup = [\"127.0.0.1:1\"]\n[check]\nport = 1\n",
    );
    for task in ["leader_view", "discovery", "check", "listener"] {
        let mut proxy =
            Running::start_env(&path, &[], &[(roleproxy::supervise::TEST_PANIC_VAR, task)]);
        let line = proxy.wait_for("core task ended");
        assert!(line.contains(task) && line.contains("panicked"), "{line}");
        let status = exit_status(&mut proxy.child, Duration::from_secs(30))
            .unwrap_or_else(|| panic!("the proxy kept running without its {task} task"));
        assert!(!status.success(), "{task}: exit status {status:?}");
    }
    let _ = std::fs::remove_file(path);
}

#[test]
fn status_prints_the_route_and_every_backend() {
    use roleproxy_testkit::fake_cluster::FakeCluster;
    use roleproxy_testkit::role::RoleReply;
    let runtime = roleproxy_testkit::harness::runtime();
    runtime.block_on(async {
        let cluster = FakeCluster::start(48, 2).await;
        cluster.nodes[0].role.set(RoleReply::leader());
        // A node whose error body would clear the terminal and set its title.
        cluster.nodes[1].role.set(RoleReply::error(
            500,
            "down\u{1b}]0;pwned\u{7}\u{1b}[2J\u{9b}31m",
        ));
        let proxy = cluster.proxy().await;
        let leader = cluster.nodes[0].addr();
        assert!(
            proxy
                .wait_route(Some(&leader), Duration::from_secs(20))
                .await
        );
        let down = cluster.nodes[1].addr();
        let checked = || async {
            proxy.status().await["backends"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|b| b["address"] == down.as_str() && b["last_error"].is_string())
        };
        assert!(
            roleproxy_testkit::harness::eventually(Duration::from_secs(20), checked).await,
            "node 1 checked"
        );
        let admin = proxy.admin.to_string();
        let output = tokio::task::spawn_blocking(move || {
            Command::new(BIN)
                .args(["status", "--admin", &admin])
                .output()
        })
        .await
        .expect("thread")
        .expect("runs");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{stdout}");
        assert!(
            stdout.contains(&format!("sessions go to {leader}")),
            "{stdout}"
        );
        let rows: Vec<&str> = stdout
            .lines()
            .skip(2)
            .filter(|l| !l.starts_with("listener "))
            .collect();
        assert_eq!(rows.len(), 2, "one row per backend: {stdout}");
        assert!(
            stdout.contains(&format!("listener leader on {}: leader", proxy.addr)),
            "{stdout}"
        );
        assert!(
            rows.iter()
                .any(|r| r.starts_with(&leader) && r.contains("leader")),
            "{stdout}"
        );
        assert!(
            rows.iter().any(|r| r.starts_with(&cluster.nodes[1].addr())
                && r.contains("down\\u{1b}]0;pwned\\u{7}\\u{1b}[2J\\u{9b}31m")),
            "the error body, its control characters written out: {stdout}"
        );
        assert!(
            !stdout.chars().any(|c| c.is_control() && c != '\n'),
            "{stdout:?}"
        );
        proxy.stop().await;
    });
    // Nothing listening: a clear error, not a hang.
    let output = Command::new(BIN)
        .args(["status", "--admin", "127.48.0.1:1"])
        .output()
        .expect("runs");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("cannot reach the admin port"));
}

/// `--admin` takes a name, resolved by the system resolver: `localhost` reaches an admin port
/// on loopback.
#[test]
fn status_takes_the_admin_port_by_name() {
    let path = write_config(
        "status-by-name",
        "[listen]\naddresses = [\"127.0.0.1:0\"]\n[admin]\naddress = \"127.0.0.1:0\"\n\
         [backends]\ndns_names = []\nbackup = [\"127.0.0.1:1\"]\n[check]\nport = 1\n",
    );
    let proxy = Running::start(&path);
    let line = proxy.wait_for("admin listening");
    let port = line
        .split("address=127.0.0.1:")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|port| port.parse::<u16>().ok())
        .unwrap_or_else(|| panic!("no admin port in {line:?}"));
    let status = |admin: &str| {
        Command::new(BIN)
            .args(["status", "--admin", admin])
            .output()
            .expect("runs")
    };
    let output = status(&format!("localhost:{port}"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.starts_with("cluster backup"), "{stdout}");
    assert!(stdout.contains("127.0.0.1:1"), "the backup's row: {stdout}");
    let output = status("localhost");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("--admin: bad address \"localhost\"; expected HOST:PORT"),
        "{stderr}"
    );
    proxy.stop_running("the proxy stopped");
    let _ = std::fs::remove_file(path);
}

#[test]
fn sighup_reloads_the_config_file_and_a_bad_file_changes_nothing() {
    let base = "[listen]\naddresses = [\"127.57.0.1:0\"]\n[admin]\naddress = \"\"\n\
         [backends]\ndns_names = []\nbackup = [\"127.57.0.1:1\"]\n[check]\nport = 1\n";
    let path = write_config("sighup", base);
    let mut proxy = Running::start(&path);
    proxy.wait_for("listening");

    // A new listener forwarding to a fixed target opens on SIGHUP.
    let target = std::net::TcpListener::bind("127.57.0.99:0").expect("bind the target");
    let added = format!(
        "{base}[[listeners]]\nname = \"local\"\naddresses = [\"127.57.0.1:6010\"]\ntarget = \"{}\"\n",
        target.local_addr().expect("target address")
    );
    std::fs::write(&path, &added).expect("rewrite config");
    proxy.signal("HUP");
    proxy.wait_for("opened local");
    let mut client =
        std::net::TcpStream::connect("127.57.0.1:6010").expect("the new listener accepts");
    // Clients speak first: only then is the target connected.
    std::io::Write::write_all(&mut client, &roleproxy_testkit::harness::startup_packet())
        .expect("send the first packet");
    target.set_nonblocking(false).expect("blocking accept");
    let (_forwarded, _) = target
        .accept()
        .expect("the client is forwarded to the target");

    // A bad file is refused in the log, every error on the one line; the process and its
    // listeners stay.
    std::fs::write(
        &path,
        format!("{added}[proxy]\ncopy = \"zero\"\nleader_wiat = \"1s\"\n"),
    )
    .expect("rewrite config");
    proxy.signal("HUP");
    let refused = proxy.wait_for("reload refused");
    assert!(
        refused.contains("proxy.copy") && refused.contains("; proxy.leader_wiat"),
        "{refused}"
    );
    assert!(
        proxy.child.try_wait().expect("wait").is_none(),
        "still running"
    );
    assert!(std::net::TcpStream::connect("127.57.0.1:6010").is_ok());

    let _ = proxy.child.kill();
    let _ = proxy.child.wait();
    let _ = std::fs::remove_file(path);
}

#[test]
fn logs_are_plain_text_or_json_and_name_every_listener_and_the_admin_port() {
    let config = "[listen]\naddresses = [\"127.58.0.1:0\"]\n[admin]\naddress = \"127.58.0.1:0\"\n\
         [backends]\ndns_names = []\nbackup = [\"127.58.0.1:1\"]\n[check]\nport = 1\n";
    let path = write_config("logs", config);

    // stderr is a pipe here, as with a log file or a journal: no colour codes.
    // The listeners start first, then the admin port (once their series are registered).
    let mut text = Running::start(&path);
    let listening = text.wait_for("listener=leader");
    assert!(!listening.contains('\u{1b}'), "{listening:?}");
    assert!(listening.contains("address=127.58.0.1:"), "{listening}");
    assert!(listening.contains("serves=leader"), "{listening}");
    let admin = text.wait_for("admin listening");
    assert!(admin.contains("address=127.58.0.1:"), "{admin}");
    let _ = text.child.kill();
    let _ = text.child.wait();

    let mut json = Running::start_with(&path, &["--log-format", "json"]);
    let line = json.wait_for("\"listening\"");
    let parsed: serde_json::Value = serde_json::from_str(&line).expect("one JSON object a line");
    assert_eq!(parsed["fields"]["message"], "listening", "{line}");
    assert_eq!(parsed["fields"]["serves"], "leader", "{line}");
    assert!(parsed["timestamp"].is_string(), "{line}");
    let _ = json.child.kill();
    let _ = json.child.wait();
    let _ = std::fs::remove_file(path);
}

/// Whether process `pid` ignores or handles SIGHUP, from `/proc`: from then on a SIGHUP cannot
/// kill it. Before that the process is still being loaded, and nothing in it can help.
fn sighup_taken_over(pid: u32) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let mask = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
            .unwrap_or(0)
    };
    let hup = 1 << (libc::SIGHUP - 1);
    (mask("SigIgn:") | mask("SigCgt:")) & hup != 0
}

fn send_sighup(pid: u32) {
    // SAFETY: kill with a valid signal number has no memory effects.
    let sent = unsafe { libc::kill(pid as libc::pid_t, libc::SIGHUP) };
    assert_eq!(sent, 0, "SIGHUP sent to {pid}");
}

/// A SIGHUP while the proxy is still reading its configuration, before there is a runtime to
/// handle signals: the configuration file is a FIFO, so start-up waits there until the test
/// writes it. The process survives and starts as usual.
#[test]
fn a_sighup_before_the_handler_is_installed_does_not_kill_the_proxy() {
    let config = "[listen]\naddresses = [\"127.161.0.1:0\"]\n[admin]\naddress = \"\"\n\
         [backends]\ndns_names = []\nbackup = [\"127.161.0.1:1\"]\n[check]\nport = 1\n";
    for attempt in 0..3 {
        let path = std::env::temp_dir().join(format!(
            "roleproxy-cli-{}-fifo-{attempt}.toml",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&path);
        let made = Command::new("mkfifo")
            .arg(&path)
            .status()
            .expect("mkfifo runs");
        assert!(made.success());
        let proxy = Running::start(&path);
        let pid = proxy.child.id();
        let waiting = roleproxy_testkit::eventually_blocking(Duration::from_secs(30), || {
            std::fs::read_to_string(format!("/proc/{pid}/wchan"))
                .is_ok_and(|wchan| wchan.trim() == "wait_for_partner")
        });
        assert!(waiting, "the proxy waits to read its configuration");
        send_sighup(pid);
        // Opening the FIFO for writing lets the proxy's read go on.
        std::fs::write(&path, config).expect("write the configuration into the FIFO");
        proxy.wait_for("listening");
        proxy.stop_running(&format!("attempt {attempt}: the SIGHUP killed the proxy"));
        let _ = std::fs::remove_file(&path);
    }
}

/// The agent, sent a SIGHUP as soon as it has taken the signal over, lives on and serves.
#[test]
fn a_sighup_at_start_up_does_not_kill_the_agent() {
    for attempt in 0..3 {
        let mut command = Command::new(BIN);
        command.args([
            "agent",
            "--postgres",
            "host=127.161.0.2 port=1 user=postgres",
            "--listen",
            "127.161.0.2:0",
        ]);
        let agent = Running::spawn(command);
        let pid = agent.child.id();
        assert!(
            roleproxy_testkit::eventually_blocking(Duration::from_secs(30), || {
                sighup_taken_over(pid)
            }),
            "the agent takes SIGHUP over"
        );
        send_sighup(pid);
        agent.wait_for("role agent listening");
        send_sighup(pid);
        agent.wait_for("nothing to reload");
        agent.stop_running(&format!("attempt {attempt}: a SIGHUP killed the agent"));
    }
}

/// A role endpoint whose error body carries a newline and a forged log line, a terminal title
/// sequence and a clear-screen sequence: the proxy logs it on one line, in text and in JSON,
/// with every control character written out.
#[test]
fn a_role_body_cannot_forge_a_log_line_or_reach_a_terminal() {
    use roleproxy_testkit::role::{RoleEndpoint, RoleReply};
    const FORGED: &str = "2026-01-01T00:00:00.000000Z ERROR roleproxy::view: forged";
    let runtime = roleproxy_testkit::harness::runtime();
    let endpoint = runtime.block_on(RoleEndpoint::start(
        "127.162.0.11:5500".parse().expect("address"),
    ));
    endpoint.set(RoleReply::error(
        500,
        &format!("down\n{FORGED}\u{1b}]0;pwned\u{7}\u{1b}[2J\r"),
    ));
    let path = write_config(
        "forged",
        "[listen]\naddresses = [\"127.162.0.1:0\"]\n[admin]\naddress = \"\"\n\
         [backends]\ndns_names = []\nbackup = [\"127.162.0.11:5433\"]\n\
         [check]\nport = 5500\ninterval = \"100ms\"\nfast_interval = \"50ms\"\n",
    );
    for format in ["text", "json"] {
        let mut proxy = Running::start_with(&path, &["--log-format", format]);
        let first = proxy.wait_for("forged");
        // Checked a few more times, each answer the same forged body.
        let asked = endpoint.requests();
        assert!(
            runtime.block_on(endpoint.wait_requests(asked + 5, Duration::from_secs(30))),
            "the proxy keeps checking"
        );
        let _ = proxy.child.kill();
        let _ = proxy.child.wait();
        // The log from that line on, to the end of the stream.
        let lines: Vec<String> = std::iter::once(first).chain(proxy.lines.iter()).collect();
        let forged: Vec<&String> = lines.iter().filter(|l| l.contains("forged")).collect();
        assert_eq!(
            forged.len(),
            1,
            "{format}: the body is logged on one line, once, when the role changed: {forged:#?}"
        );
        let shown = match format {
            "json" => serde_json::from_str::<serde_json::Value>(forged[0])
                .expect("one JSON object a line")["fields"]["to"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            _ => forged[0].clone(),
        };
        assert!(
            shown.contains("down\\u{a}2026-01-01") && shown.contains("\\u{1b}[2J"),
            "{format}: the body, its control characters written out: {shown}"
        );
        for line in &lines {
            assert!(
                !line.chars().any(char::is_control),
                "{format}: a control character reached the log: {line:?}"
            );
            assert!(
                !line.starts_with("2026-01-01"),
                "{format}: forged line {line:?}"
            );
            if format == "json" {
                serde_json::from_str::<serde_json::Value>(line)
                    .unwrap_or_else(|e| panic!("one JSON object a line: {e}: {line:?}"));
            }
        }
    }
    let _ = std::fs::remove_file(path);
}

/// The fields of the first JSON log line from now on whose target is `target` and whose
/// message is `message`.
fn wait_for_event(proxy: &Running, target: &str, message: &str) -> serde_json::Value {
    loop {
        let line = proxy.wait_for(&format!("\"{message}\""));
        let parsed: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        if parsed["target"] == target && parsed["fields"]["message"] == message {
            return parsed["fields"].clone();
        }
    }
}

/// The address a listener reports in its JSON `listening` line.
fn listening_on(proxy: &Running, listener: &str) -> std::net::SocketAddr {
    loop {
        let fields = wait_for_event(proxy, "roleproxy::running", "listening");
        if fields["listener"] == listener {
            let address = fields["address"].as_str().expect("address");
            return address.parse().expect("a socket address");
        }
    }
}

/// A Postgres message read whole: its type and body.
fn read_message(stream: &mut std::net::TcpStream) -> (u8, Vec<u8>) {
    use std::io::Read;
    let mut head = [0u8; 5];
    stream.read_exact(&mut head).expect("message head");
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    let mut body = vec![0u8; len - 4];
    stream.read_exact(&mut body).expect("message body");
    (head[0], body)
}

#[test]
fn the_access_log_has_one_line_per_connection_with_its_bytes_and_result() {
    use std::io::{Read, Write};
    let node = std::net::Ipv4Addr::new(127, 87, 0, 11);
    let pg = roleproxy_testkit::pg::PgCluster::start(&[node], 5433).expect("postgres starts");
    // A fixed target straight to Postgres, and a leader listener with no leader to refuse.
    let path = write_config(
        "access",
        "[listen]\naddresses = [\"127.87.0.1:0\"]\n[admin]\naddress = \"\"\n\
         [backends]\ndns_names = []\nbackup = [\"127.87.0.1:1\"]\n[check]\nport = 1\n\
         [proxy]\naccess_log = true\nleader_wait = \"100ms\"\n\
         [[listeners]]\nname = \"direct\"\naddresses = [\"127.87.0.1:0\"]\n\
         target = \"127.87.0.11:5433\"\n",
    );
    let proxy = Running::start_with(&path, &["--log-format", "json"]);
    let leader = listening_on(&proxy, "leader");
    let direct = listening_on(&proxy, "direct");

    let before = std::time::SystemTime::now();
    let began = Instant::now();
    let mut client = std::net::TcpStream::connect(direct).expect("proxy accepts");
    client
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut sent = 0u64;
    let mut received = 0u64;
    let mut body = (3u32 << 16).to_be_bytes().to_vec();
    body.extend_from_slice(b"user\0postgres\0database\0postgres\0\0");
    let mut startup = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    startup.extend_from_slice(&body);
    let mut query = b"Q".to_vec();
    let sql = b"SELECT repeat('x', 1000)\0";
    query.extend_from_slice(&((sql.len() + 4) as u32).to_be_bytes());
    query.extend_from_slice(sql);
    for packet in [startup, query] {
        client.write_all(&packet).expect("send");
        sent += packet.len() as u64;
        // Until ReadyForQuery: the startup's answer, then the query's.
        loop {
            let (kind, body) = read_message(&mut client);
            assert_ne!(kind, b'E', "{}", String::from_utf8_lossy(&body));
            received += 5 + body.len() as u64;
            if kind == b'Z' {
                break;
            }
        }
    }
    let terminate = [b'X', 0, 0, 0, 4];
    client.write_all(&terminate).expect("send Terminate");
    sent += terminate.len() as u64;
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).expect("closed by Postgres");
    received += rest.len() as u64;
    let client_addr = client.local_addr().expect("client address");
    drop(client);

    let line = wait_for_event(&proxy, "roleproxy::access", "connection");
    let elapsed = began.elapsed();
    assert_eq!(line["client"], client_addr.to_string(), "{line}");
    assert_eq!(line["listener"], "direct", "{line}");
    assert_eq!(line["listen"], direct.to_string(), "{line}");
    assert_eq!(line["backend"], "127.87.0.11:5433", "{line}");
    assert_eq!(line["bytes_client_to_backend"], sent, "{line}");
    assert_eq!(line["bytes_backend_to_client"], received, "{line}");
    assert_eq!(line["result"], "closed", "{line}");
    let start = humantime::parse_rfc3339(line["start"].as_str().expect("start")).expect("RFC 3339");
    // Whole milliseconds: the start is at most 1 ms before the client's clock read.
    assert!(
        start + Duration::from_millis(1) >= before && start <= before + elapsed,
        "{line}"
    );
    let duration_ms = line["duration_ms"].as_u64().expect("duration_ms");
    assert!(duration_ms as u128 <= elapsed.as_millis(), "{line}");

    // Refused for want of a leader: no backend, no bytes, the metrics' result label.
    let runtime = roleproxy_testkit::harness::runtime();
    let (code, _) = runtime.block_on(roleproxy_testkit::harness::postgres_refusal(leader, false));
    assert_eq!(code, "57P03");
    let line = wait_for_event(&proxy, "roleproxy::access", "connection");
    assert_eq!(line["listener"], "leader", "{line}");
    assert_eq!(line["listen"], leader.to_string(), "{line}");
    assert_eq!(line["backend"], "-", "{line}");
    assert_eq!(line["result"], "no_leader", "{line}");
    assert_eq!(line["bytes_client_to_backend"], 0, "{line}");
    assert_eq!(line["bytes_backend_to_client"], 0, "{line}");
    proxy.stop_running("the proxy died");
    drop(pg);
    let _ = std::fs::remove_file(path);
}

#[test]
fn access_lines_are_off_unless_asked_for() {
    let path = write_config(
        "access-off",
        "[listen]\naddresses = [\"127.87.0.2:0\"]\n[admin]\naddress = \"\"\n\
         [backends]\ndns_names = []\nbackup = [\"127.87.0.2:1\"]\n[check]\nport = 1\n\
         [proxy]\nleader_wait = \"100ms\"\n",
    );
    let proxy = Running::start_with(&path, &["--log-format", "json"]);
    let leader = listening_on(&proxy, "leader");
    let runtime = roleproxy_testkit::harness::runtime();
    let (code, _) = runtime.block_on(roleproxy_testkit::harness::postgres_refusal(leader, false));
    assert_eq!(code, "57P03");
    // Every line up to the refusal's own warning, which comes after its access line would.
    let mut lines = Vec::new();
    while !lines
        .last()
        .is_some_and(|l: &String| l.contains("client refused"))
    {
        let line = proxy
            .lines
            .recv_timeout(Duration::from_secs(30))
            .expect("the refusal is logged");
        lines.push(line);
    }
    assert!(
        lines.iter().all(|l| !l.contains("roleproxy::access")),
        "{lines:#?}"
    );
    proxy.stop_running("the proxy died");
    let _ = std::fs::remove_file(path);
}

#[test]
fn version_names_the_release_and_the_commit() {
    let output = Command::new(BIN).arg("--version").output().expect("runs");
    assert!(output.status.success());
    let stdout = String::from_utf8_lossy(&output.stdout);
    let expected = format!(
        "roleproxy {} (commit {})",
        roleproxy::VERSION,
        roleproxy::COMMIT
    );
    assert_eq!(stdout.trim(), expected);
    // The checkout's own commit, as git names it (the tests run from a git checkout).
    let head = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("git runs");
    let head = String::from_utf8_lossy(&head.stdout).trim().to_owned();
    assert!(!head.is_empty(), "a git checkout");
    assert!(
        roleproxy::COMMIT == head || roleproxy::COMMIT == format!("{head}-dirty"),
        "built from {head}: {expected}"
    );
}

#[test]
fn build_info_is_1_with_the_version_and_commit_labels() {
    let path = write_config(
        "build-info",
        "[listen]\naddresses = [\"127.87.0.3:0\"]\n[admin]\naddress = \"127.87.0.3:0\"\n\
         [backends]\ndns_names = []\nbackup = [\"127.87.0.3:1\"]\n[check]\nport = 1\n",
    );
    let proxy = Running::start_with(&path, &["--log-format", "json"]);
    let line = proxy.wait_for("admin listening");
    let parsed: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
    let admin: std::net::SocketAddr = parsed["fields"]["address"]
        .as_str()
        .expect("address")
        .parse()
        .expect("a socket address");
    let runtime = roleproxy_testkit::harness::runtime();
    let (status, metrics) =
        runtime.block_on(roleproxy_testkit::harness::http_get(admin, "/metrics"));
    assert_eq!(status, 200);
    let build_info: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("roleproxy_build_info{"))
        .collect();
    assert_eq!(build_info.len(), 1, "{metrics}");
    let version = format!("version=\"{}\"", env!("CARGO_PKG_VERSION"));
    let commit = format!("commit=\"{}\"", roleproxy::COMMIT);
    assert!(build_info[0].contains(&version), "{}", build_info[0]);
    assert!(build_info[0].contains(&commit), "{}", build_info[0]);
    assert!(build_info[0].ends_with("} 1"), "{}", build_info[0]);
    proxy.stop_running("the proxy died");
    let _ = std::fs::remove_file(path);
}

#[test]
fn a_privileged_port_without_the_capability_says_how_to_grant_it() {
    let path = write_config(
        "privileged",
        "[listen]\naddresses = [\"127.87.0.4:80\"]\n[admin]\naddress = \"\"\n\
         [backends]\ndns_names = []\nbackup = [\"127.87.0.4:1\"]\n[check]\nport = 1\n",
    );
    // Root may bind any port: the test runs the binary as nobody then.
    // SAFETY: geteuid has no preconditions.
    let mut command = if unsafe { libc::geteuid() } == 0 {
        let mut runuser = Command::new("runuser");
        runuser.args(["-u", "nobody", "--", BIN]);
        runuser
    } else {
        Command::new(BIN)
    };
    let output = command
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .expect("runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("cannot listen on 127.87.0.4:80: Permission denied"),
        "{stderr}"
    );
    assert!(stderr.contains("CAP_NET_BIND_SERVICE"), "{stderr}");
    let _ = std::fs::remove_file(path);
}

#[test]
fn status_against_a_postgres_port_says_it_is_not_an_admin_port() {
    let node = std::net::Ipv4Addr::new(127, 87, 0, 21);
    let pg = roleproxy_testkit::pg::PgCluster::start(&[node], 5433).expect("postgres starts");
    let output = Command::new(BIN)
        .args(["status", "--admin", "127.87.0.21:5433"])
        .output()
        .expect("runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("127.87.0.21:5433 is not a roleproxy admin port ("),
        "{stderr}"
    );
    drop(pg);
}
