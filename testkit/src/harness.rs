//! Starts a real roleproxy in-process with a test config, and talks to it like a client would.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use crate::{eventually, holds_for};

/// Config values as `section.key` → TOML literal; [`ConfigBuilder::toml`] writes the file.
#[derive(Clone)]
pub struct ConfigBuilder {
    values: BTreeMap<String, String>,
    /// `[[listeners]]` tables, each as its body.
    listeners: Vec<String>,
}

impl ConfigBuilder {
    /// Fast-moving defaults for tests: everything on `ip`, short intervals, no backup.
    pub fn new(ip: &str, dns: SocketAddr, name: &str) -> Self {
        let mut values = BTreeMap::new();
        let mut set = |k: &str, v: String| {
            values.insert(k.to_string(), v);
        };
        set("listen.addresses", format!("[\"{ip}:0\"]"));
        set("admin.address", format!("\"{ip}:0\""));
        set("backends.dns_names", format!("[\"{name}\"]"));
        set("backends.nameservers", format!("[\"{dns}\"]"));
        set("backends.prefer", "\"ipv4\"".into());
        set("backends.port", "5433".into());
        set("backends.resolve_interval", "\"100ms\"".into());
        set("backends.resolve_timeout", "\"300ms\"".into());
        set("backends.backup", "[]".into());
        set("check.port", "5500".into());
        set("check.interval", "\"200ms\"".into());
        set("check.fast_interval", "\"50ms\"".into());
        set("check.timeout", "\"1s\"".into());
        set("proxy.leader_wait", "\"3s\"".into());
        set("proxy.connect_timeout", "\"1s\"".into());
        set("proxy.shutdown_grace", "\"1s\"".into());
        Self {
            values,
            listeners: Vec::new(),
        }
    }

    /// Leaves `section.key` out, so its default applies.
    pub fn unset(mut self, key: &str) -> Self {
        self.values.remove(key);
        self
    }

    /// A copy with one more value set.
    pub fn clone_with(&self, key: &str, literal: &str) -> Self {
        self.clone().set(key, literal)
    }

    /// Adds a `[[listeners]]` table, given as its body (`name = ...`, `addresses = ...`, ...).
    pub fn listener(mut self, body: &str) -> Self {
        self.listeners.push(body.to_string());
        self
    }

    /// Sets `section.key` to a TOML literal, e.g. `set("proxy.max_connections", "2")`.
    pub fn set(mut self, key: &str, literal: &str) -> Self {
        self.values.insert(key.to_string(), literal.to_string());
        self
    }

    pub fn toml(&self) -> String {
        let mut sections: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for (key, value) in &self.values {
            let (section, name) = key.split_once('.').expect("keys are section.key");
            sections
                .entry(section)
                .or_default()
                .push(format!("{name} = {value}"));
        }
        let mut text: String = sections
            .iter()
            .map(|(section, lines)| format!("[{section}]\n{}\n", lines.join("\n")))
            .collect();
        for body in &self.listeners {
            text.push_str(&format!("[[listeners]]\n{body}\n"));
        }
        text
    }

    pub fn config(&self) -> roleproxy::Config {
        self.config_with_env(&|_| None)
    }

    /// The configuration with `${VAR}` looked up in `env` instead of the process environment,
    /// which parallel tests share.
    pub fn config_with_env(&self, env: &dyn Fn(&str) -> Option<String>) -> roleproxy::Config {
        roleproxy::Config::parse(&self.toml(), env).expect("test config is valid")
    }
}

/// A config file in the temporary directory, removed when the test ends, however it ends.
pub struct ConfigFile(pub std::path::PathBuf);

impl ConfigFile {
    /// A file named after the test and this process, so parallel tests do not share one.
    pub fn new(name: &str) -> ConfigFile {
        ConfigFile(
            std::env::temp_dir().join(format!("roleproxy-{name}-{}.toml", std::process::id())),
        )
    }

    pub fn write(&self, config: &ConfigBuilder) {
        self.write_text(&config.toml());
    }

    pub fn write_text(&self, text: &str) {
        std::fs::write(&self.0, text).expect("write the config file");
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A proxy running in this process.
pub struct RunningProxy {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    /// Bound addresses by listener name (`leader` is `[listen]`), as started.
    pub listeners: BTreeMap<String, Vec<SocketAddr>>,
    /// Asks this proxy to reload, as `POST /reload` and SIGHUP do.
    pub reloader: roleproxy::Reloader,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), roleproxy::Error>>>,
}

impl RunningProxy {
    pub async fn start(config: roleproxy::Config) -> RunningProxy {
        let proxy = roleproxy::Proxy::bind(config.clone())
            .await
            .expect("proxy binds");
        Self::run(proxy, &config)
    }

    /// Starts from a file that reloads (`POST /reload`) read again.
    pub async fn start_from_file(path: &std::path::Path) -> RunningProxy {
        let config = roleproxy::Config::load(path).expect("test config is valid");
        let proxy = roleproxy::Proxy::bind(config.clone())
            .await
            .expect("proxy binds")
            .reload_from(path.to_path_buf());
        Self::run(proxy, &config)
    }

    fn run(proxy: roleproxy::Proxy, config: &roleproxy::Config) -> RunningProxy {
        let listeners = config
            .all_listeners()
            .into_iter()
            .map(|l| (l.name.clone(), proxy.listener_addrs(&l.name)))
            .collect();
        let addr = proxy.listen_addrs()[0];
        let admin = proxy.admin_addr().expect("admin enabled in tests");
        let reloader = proxy.reloader();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(proxy.run(async move {
            let _ = stopped.await;
        }));
        RunningProxy {
            addr,
            admin,
            listeners,
            reloader,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Signals shutdown and waits for `run` to return.
    pub async fn stop(mut self) {
        self.shutdown().await;
    }

    async fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let result = tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .expect("proxy stops within 30 s")
                .expect("proxy task did not panic");
            result.expect("proxy run returned Ok");
        }
    }

    /// The first bound address of a listener, by name.
    pub fn listener(&self, name: &str) -> SocketAddr {
        self.listeners
            .get(name)
            .and_then(|a| a.first().copied())
            .unwrap_or_else(|| panic!("no listener named {name}"))
    }

    /// GET on the admin port: (status, body).
    pub async fn get(&self, path: &str) -> (u16, String) {
        http_get(self.admin, path).await
    }

    /// POST (empty body) on the admin port: (status, body).
    pub async fn post(&self, path: &str) -> (u16, String) {
        http_request(self.admin, "POST", path).await
    }

    /// The `/status` document.
    pub async fn status(&self) -> serde_json::Value {
        let (code, body) = self.get("/status").await;
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).expect("/status is JSON")
    }

    /// The value of one series on `/metrics`, written as Prometheus prints it (e.g.
    /// `roleproxy_sessions_total{listener="leader",result="silent"}`). Panics when the series
    /// stays absent: every series is registered when the proxy starts (a backend's when it is
    /// discovered, which this waits a few seconds for), so a missing one is a misspelt name or
    /// label, which read as 0 would pass any "unchanged" check.
    pub async fn metric(&self, series: &str) -> f64 {
        let read = || self.series(series);
        if let Some(value) = eventually(Duration::from_secs(10), read).await {
            return value;
        }
        let (_, text) = self.get("/metrics").await;
        metric_value(&text, series).unwrap_or_else(|| {
            let name = series.split('{').next().unwrap_or(series);
            let same_name: Vec<&str> = text.lines().filter(|l| l.starts_with(name)).collect();
            panic!(
                "{series} is not on /metrics; the series named {name}:\n{}",
                same_name.join("\n")
            )
        })
    }

    /// Waits until one series reads `want`; false, with the value last read in the log, if
    /// it never does within `timeout` (an absent series never reads anything).
    pub async fn metric_reaches(&self, series: &str, want: f64, timeout: Duration) -> bool {
        let reached = eventually(timeout, || async {
            self.series(series).await == Some(want)
        })
        .await;
        if !reached {
            eprintln!("{series} is {:?}, not {want}", self.series(series).await);
        }
        reached
    }

    /// One series' value now, if it is on `/metrics`.
    async fn series(&self, series: &str) -> Option<f64> {
        metric_value(&self.get("/metrics").await.1, series)
    }

    /// The route's generation, as `/status` reports it.
    pub async fn generation(&self) -> u64 {
        self.status().await["route"]["generation"]
            .as_u64()
            .expect("/status has the route's generation")
    }

    /// The leader of the current route, as `/status` reports it.
    pub async fn route_leader(&self) -> Option<String> {
        let status = self.status().await;
        match status["route"]["target"]["state"].as_str() {
            Some("leader") => status["route"]["target"]["detail"]
                .as_str()
                .map(str::to_string),
            _ => None,
        }
    }

    /// Waits until there is no route for `reason`, as `/status` names it (`split_brain`,
    /// `dns_failing`, `stepped_down`, ...).
    pub async fn wait_no_route(&self, reason: &str, timeout: Duration) -> bool {
        eventually(timeout, || async {
            self.status().await["route"]["target"]["detail"]["reason"] == reason
        })
        .await
    }

    /// Waits until the route's leader is `leader` (`None`: no route).
    pub async fn wait_route(&self, leader: Option<&str>, timeout: Duration) -> bool {
        eventually(timeout, || async {
            self.route_leader().await.as_deref() == leader
        })
        .await
    }
}

impl Drop for RunningProxy {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// The value of one series in Prometheus text, given as it is printed (`name{label="v"}`).
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter_map(|line| line.strip_prefix(series))
        .find_map(|rest| rest.strip_prefix(' ')?.trim().parse().ok())
}

/// The value of one series in this process's recorder, read without a proxy (0 when absent,
/// also before any proxy has started): what a count was before a test's proxy starts.
pub fn process_metric(series: &str) -> f64 {
    metric_value(&roleproxy::metrics::render(), series).unwrap_or(0.0)
}

/// The `roleproxy_sessions_total` series of one listener and result. Metrics are one per
/// process, so a test that counts sessions names a listener of its own.
pub fn sessions_ended(listener: &str, result: &str) -> String {
    format!("roleproxy_sessions_total{{listener=\"{listener}\",result=\"{result}\"}}")
}

/// The `roleproxy_sessions_active` series of one listener.
pub fn sessions_active(listener: &str) -> String {
    format!("roleproxy_sessions_active{{listener=\"{listener}\"}}")
}

/// The series in Prometheus text: every line that is not a comment.
pub fn series(text: &str) -> Vec<&str> {
    text.lines()
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .filter_map(|line| line.rsplit_once(' ').map(|(series, _)| series))
        .collect()
}

/// A minimal HTTP/1.1 GET.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    http_request(addr, "GET", path).await
}

/// A minimal HTTP/1.1 request without a body.
pub async fn http_request(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    http_request_with(addr, method, path, &[]).await
}

/// [`http_request`] with more header lines (`("Authorization", "Bearer x")`).
pub async fn http_request_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.expect("admin port accepts");
    let extra: String = headers
        .iter()
        .map(|(name, value)| format!("{name}: {value}\r\n"))
        .collect();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\n{extra}Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut response = String::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        stream.read_to_string(&mut response),
    )
    .await
    .expect("admin answers in time")
    .expect("read");
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// A client connection through the proxy to a tagged backend.
pub struct Client {
    pub reader: BufReader<TcpStream>,
    pub tag: String,
}

/// A StartupMessage for user `app`: what a Postgres client sends first, before the server
/// says anything.
pub fn startup_packet() -> Vec<u8> {
    let mut body = (3u32 << 16).to_be_bytes().to_vec();
    body.extend_from_slice(b"user\0app\0database\0app\0\0");
    let mut packet = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    packet.extend_from_slice(&body);
    packet
}

impl Client {
    /// Connects, speaks first as a Postgres client would (a StartupMessage), and reads the
    /// backend's tag line and its echo of that packet; `None` if no backend answered in
    /// `wait` (a refusal is not an answer).
    pub async fn connect(proxy: SocketAddr, wait: Duration) -> Option<Client> {
        let mut stream = TcpStream::connect(proxy).await.expect("proxy accepts");
        let startup = startup_packet();
        stream.write_all(&startup).await.ok()?;
        let mut reader = BufReader::new(stream);
        let served = async {
            let mut tag = String::new();
            reader.read_line(&mut tag).await.ok()?;
            let mut echo = vec![0u8; startup.len()];
            reader.read_exact(&mut echo).await.ok()?;
            (tag.ends_with('\n') && echo == startup).then_some(tag)
        };
        match tokio::time::timeout(wait, served).await {
            Ok(Some(tag)) => Some(Client {
                reader,
                tag: tag.trim().to_string(),
            }),
            _ => None,
        }
    }

    /// Sends a line and expects it echoed.
    pub async fn echo(&mut self, line: &str) -> bool {
        let sent = format!("{line}\n");
        if self
            .reader
            .get_mut()
            .write_all(sent.as_bytes())
            .await
            .is_err()
        {
            return false;
        }
        let mut got = String::new();
        matches!(
            tokio::time::timeout(Duration::from_secs(5), self.reader.read_line(&mut got)).await,
            Ok(Ok(n)) if n > 0 && got == sent
        )
    }

    /// True once the proxy has closed this session (EOF or reset).
    pub async fn closed_within(&mut self, timeout: Duration) -> bool {
        let mut buf = [0u8; 64];
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.reader.read(&mut buf)).await {
                Err(_) => return false,
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
            }
        }
    }
}

/// Speaks just enough Postgres to be refused: optional SSLRequest, a StartupMessage, then reads
/// the ErrorResponse. Returns (SQLSTATE, message).
pub async fn postgres_refusal(proxy: SocketAddr, ssl_first: bool) -> (String, String) {
    let mut stream = TcpStream::connect(proxy).await.expect("proxy accepts");
    if ssl_first {
        let mut ssl = 8u32.to_be_bytes().to_vec();
        ssl.extend_from_slice(&80_877_103u32.to_be_bytes());
        stream.write_all(&ssl).await.expect("send SSLRequest");
        let mut answer = [0u8; 1];
        tokio::time::timeout(Duration::from_secs(30), stream.read_exact(&mut answer))
            .await
            .expect("SSLRequest answered in time")
            .expect("read SSL answer");
        assert_eq!(&answer, b"N", "the proxy declines SSL when refusing");
    }
    stream
        .write_all(&startup_packet())
        .await
        .expect("send StartupMessage");
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut reply))
        .await
        .expect("refusal arrives in time")
        .expect("read refusal");
    assert_eq!(reply.first(), Some(&b'E'), "an ErrorResponse: {reply:?}");
    let mut code = String::new();
    let mut message = String::new();
    for field in reply[5..].split(|&b| b == 0) {
        match field.split_first() {
            Some((b'C', v)) => code = String::from_utf8_lossy(v).into_owned(),
            Some((b'M', v)) => message = String::from_utf8_lossy(v).into_owned(),
            _ => {}
        }
    }
    (code, message)
}

/// roleproxy as its own process (its own memory, its own descriptor limit), killed and its
/// config file removed on drop, even when the test fails.
pub struct ProxyProcess {
    child: std::process::Child,
    config: std::path::PathBuf,
}

impl ProxyProcess {
    /// Runs `binary` (the caller's `env!("CARGO_BIN_EXE_roleproxy")`) with `toml` as its config,
    /// logging at `log` to this process's stderr; `nofile` caps its descriptors.
    pub fn start(
        binary: &str,
        toml: &str,
        name: &str,
        log: &str,
        nofile: Option<u64>,
    ) -> ProxyProcess {
        let config =
            std::env::temp_dir().join(format!("roleproxy-{name}-{}.toml", std::process::id()));
        std::fs::write(&config, toml).expect("write the proxy config");
        let mut command = std::process::Command::new(binary);
        command
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", log)
            .stdout(std::process::Stdio::null());
        if let Some(limit) = nofile {
            // SAFETY: the closure only calls setrlimit, which is async-signal-safe.
            unsafe {
                use std::os::unix::process::CommandExt;
                command.pre_exec(move || {
                    let limit = libc::rlimit {
                        rlim_cur: limit,
                        rlim_max: limit,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = command.spawn().expect("start roleproxy");
        ProxyProcess { child, config }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The process's resident memory in KiB (`VmRSS`), or `None` once it has exited.
    pub fn rss_kib(&self) -> Option<u64> {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .ok()?
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.config);
    }
}

/// Waits until a proxy process listens on `addr` and serves a client.
pub async fn wait_served(addr: SocketAddr) -> Client {
    eventually(Duration::from_secs(60), || async {
        TcpStream::connect(addr).await.ok()?;
        Client::connect(addr, Duration::from_secs(2)).await
    })
    .await
    .unwrap_or_else(|| panic!("the proxy at {addr} never served a client"))
}

/// A two-worker runtime, like `#[tokio::test(flavor = "multi_thread", worker_threads = 2)]`,
/// for tests that also need a plain `#[test]` body (processes, blocking calls).
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}
