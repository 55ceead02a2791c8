//! Everything read from the network is bounded: a client of the admin port or of the agent, or
//! a role endpoint the proxy checks, that streams forever or holds many unfinished requests
//! costs a real `roleproxy` process a bounded amount of memory, read from `/proc/PID/status`.
//! Each test asserts a bound on the growth of the process's peak resident set (`VmHWM`), never
//! a speed.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use roleproxy_testkit::harness::{eventually, http_get, ProxyProcess};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const BIN: &str = env!("CARGO_BIN_EXE_roleproxy");
const WAIT: Duration = Duration::from_secs(60);
/// What each unfinished request head tries to send: hyper's default buffer, the size the
/// audit used.
const HEAD: usize = 400 * 1024;

/// A field of `/proc/PID/status` in KiB (`VmRSS`, `VmHWM`).
fn memory_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("process status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Waits until `addr` answers `GET path` with any status.
async fn wait_answers(addr: SocketAddr, path: &str) {
    let up = eventually(WAIT, || async {
        if TcpStream::connect(addr).await.is_err() {
            return false;
        }
        http_get(addr, path).await.0 > 0
    })
    .await;
    assert!(up, "{addr} never answered {path}");
}

/// `count` connections to `addr` that each start a request and then send up to `HEAD` bytes of
/// one header's value without ever ending it, all at once; returns once every one has sent
/// it all or been closed by the server, with the connections still open.
async fn unfinished_heads(addr: SocketAddr, count: usize) -> Vec<TcpStream> {
    let tasks: Vec<_> = (0..count)
        .map(|_| {
            tokio::spawn(async move {
                let mut stream = TcpStream::connect(addr).await.expect("connect");
                let mut head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Long: ".to_vec();
                head.resize(HEAD, b'a');
                // The server may close first: what it read is what it holds.
                let _ = stream.write_all(&head).await;
                stream
            })
        })
        .collect();
    let mut streams = Vec::new();
    for task in tasks {
        streams.push(task.await.expect("client task"));
    }
    streams
}

/// A client that sends one request head forever: the server answers 431 and closes it.
async fn endless_head(addr: SocketAddr) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nX-Endless: ")
        .await
        .expect("send the request line");
    let chunk = vec![b'a'; 16 * 1024];
    let mut answer = Vec::new();
    let (mut reader, mut writer) = stream.split();
    let writing = async { while writer.write_all(&chunk).await.is_ok() {} };
    // Whatever the server says before it closes; writing stops when it has closed.
    let reading = async {
        let _ = tokio::time::timeout(WAIT, reader.read_to_end(&mut answer)).await;
    };
    tokio::join!(writing, reading);
    String::from_utf8_lossy(&answer).into_owned()
}

/// A `POST` whose chunked body never ends: nothing reads a body, so the server answers and
/// closes.
async fn endless_body(addr: SocketAddr, path: &str) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let head = format!("POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n");
    stream.write_all(head.as_bytes()).await.expect("send head");
    let mut chunk = format!("{:x}\r\n", 16 * 1024).into_bytes();
    chunk.resize(chunk.len() + 16 * 1024, b'a');
    chunk.extend_from_slice(b"\r\n");
    let (mut reader, mut writer) = stream.split();
    let writing = async { while writer.write_all(&chunk).await.is_ok() {} };
    let mut answer = Vec::new();
    // The server's answer, then its close, which also ends the writing.
    let closed = tokio::time::timeout(WAIT, async {
        let ((), _answered) = tokio::join!(writing, reader.read_to_end(&mut answer));
    })
    .await;
    assert!(closed.is_ok(), "the server never closed an endless body");
}

/// Sends `addr` 256 unfinished `HEAD`-byte request heads, one endless head (which must be
/// answered 431) and one endless body to `body_path`, then asserts that the peak resident set
/// of process `pid` grew less than `bound` MiB over `before_kib`. Returns the unfinished
/// connections, still open.
async fn flood(
    addr: SocketAddr,
    pid: u32,
    before_kib: u64,
    body_path: &str,
    what: &str,
    bound: f64,
) -> Vec<TcpStream> {
    let held = unfinished_heads(addr, 256).await;
    let answer = endless_head(addr).await;
    assert!(
        answer.contains(" 431 "),
        "{what}: an endless head is refused: {answer:?}"
    );
    endless_body(addr, body_path).await;
    let grew = growth_mib(pid, before_kib);
    println!(
        "{what}: 256 unfinished {} KiB heads, an endless head and an endless body: peak RSS grew {grew:.1} MiB",
        HEAD / 1024
    );
    assert!(
        grew < bound,
        "{what}: peak RSS grew {grew:.1} MiB, more than {bound} MiB"
    );
    held
}

/// Growth of the peak resident set since `before_kib`, in MiB.
fn growth_mib(pid: u32, before_kib: u64) -> f64 {
    memory_kib(pid, "VmHWM").saturating_sub(before_kib) as f64 / 1024.0
}

/// The admin port holds 256 connections. Each costs at most its 8 KiB read buffer however much
/// head it is sent, where hyper's default let each hold ~400 KiB (the audit measured
/// 8.8 → 115 MB for 256 of them).
const ADMIN_BOUND_MIB: f64 = 16.0;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_port_holds_a_bounded_request_head_however_much_is_sent() {
    let admin: SocketAddr = "127.163.0.1:18404".parse().expect("address");
    let config = format!(
        "[listen]\naddresses = [\"127.163.0.1:0\"]\n[admin]\naddress = \"{admin}\"\n\
         [backends]\ndns_names = []\nbackup = [\"127.163.0.1:1\"]\n[check]\nport = 1\n"
    );
    let proxy = ProxyProcess::start(BIN, &config, "bounds-admin", "warn", None);
    wait_answers(admin, "/healthz").await;
    let pid = proxy.pid();
    let before = memory_kib(pid, "VmRSS");

    let held = flood(admin, pid, before, "/reload", "admin port", ADMIN_BOUND_MIB).await;
    drop(held);
    let (status, body) = http_get(admin, "/healthz").await;
    assert_eq!((status, body.as_str()), (200, "ok\n"), "still healthy");
}

/// The agent as its own process, killed on drop.
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The agent holds 64 connections: at most 8 KiB of head each (the audit measured 7 → 34 MB
/// with hyper's default).
const AGENT_BOUND_MIB: f64 = 8.0;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_holds_a_bounded_request_head_however_much_is_sent() {
    let addr: SocketAddr = "127.163.0.2:15500".parse().expect("address");
    let agent = Agent(
        Command::new(BIN)
            .args([
                "agent",
                "--postgres",
                "host=127.163.0.2 port=1 user=postgres",
                "--listen",
                &addr.to_string(),
            ])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("the agent starts"),
    );
    wait_answers(addr, "/flycheck/role").await;
    let pid = agent.0.id();
    let before = memory_kib(pid, "VmRSS");

    let held = flood(
        addr,
        pid,
        before,
        "/flycheck/role",
        "agent",
        AGENT_BOUND_MIB,
    )
    .await;
    drop(held);
}

/// A role endpoint that answers every check with a response that never ends: an endless
/// chunked body, or an endless header. Counts the checks it was sent.
async fn streaming_endpoint(addr: SocketAddr, endless_header: bool) -> Arc<AtomicU64> {
    let listener = TcpListener::bind(addr)
        .await
        .expect("bind the role endpoint");
    let checks = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&checks);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                let mut request = [0u8; 4096];
                let _ = stream.read(&mut request).await;
                let (head, chunk): (&[u8], Vec<u8>) = if endless_header {
                    (b"HTTP/1.1 200 OK\r\nX-Endless: ", vec![b'a'; 16 * 1024])
                } else {
                    let mut chunk = format!("{:x}\r\n", 16 * 1024).into_bytes();
                    chunk.resize(chunk.len() + 16 * 1024, b' ');
                    chunk.extend_from_slice(b"\r\n");
                    (
                        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                        chunk,
                    )
                };
                if stream.write_all(head).await.is_err() {
                    return;
                }
                while stream.write_all(&chunk).await.is_ok() {}
            });
        }
    });
    checks
}

/// The HTTP check reads at most 8 KiB of head and 1 KiB of body from a role endpoint; one
/// streaming forever fails its check at that size, and the proxy's memory stays flat.
const CHECK_BOUND_MIB: f64 = 8.0;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_endpoint_streaming_forever_fails_its_check_at_the_size_caps() {
    let admin: SocketAddr = "127.163.0.1:18405".parse().expect("address");
    let body_checks =
        streaming_endpoint("127.163.0.11:5500".parse().expect("address"), false).await;
    let head_checks = streaming_endpoint("127.163.0.12:5500".parse().expect("address"), true).await;
    let config = format!(
        "[listen]\naddresses = [\"127.163.0.3:0\"]\n[admin]\naddress = \"{admin}\"\n\
         [backends]\ndns_names = []\nbackup = [\"127.163.0.11:5433\", \"127.163.0.12:5433\"]\n\
         [check]\nport = 5500\ninterval = \"100ms\"\nfast_interval = \"50ms\"\ntimeout = \"10s\"\n"
    );
    let proxy = ProxyProcess::start(BIN, &config, "bounds-check", "error", None);
    wait_answers(admin, "/healthz").await;
    let pid = proxy.pid();
    // Each endpoint checked once: the check's buffers exist.
    let checked = |checks: &Arc<AtomicU64>, n: u64| checks.load(Ordering::Relaxed) >= n;
    assert!(
        eventually(WAIT, || async {
            checked(&body_checks, 2) && checked(&head_checks, 2)
        })
        .await
    );
    let before = memory_kib(pid, "VmRSS");
    let (body_now, head_now) = (
        body_checks.load(Ordering::Relaxed),
        head_checks.load(Ordering::Relaxed),
    );
    // Twenty more checks each, every one given up at its cap long before the 10 s timeout.
    assert!(
        eventually(WAIT, || async {
            checked(&body_checks, body_now + 20) && checked(&head_checks, head_now + 20)
        })
        .await,
        "the checks go on"
    );
    let grew = growth_mib(pid, before);
    println!("HTTP checks of endless answers: peak RSS grew {grew:.1} MiB over 40 checks");
    assert!(
        grew < CHECK_BOUND_MIB,
        "peak RSS grew {grew:.1} MiB, more than {CHECK_BOUND_MIB} MiB"
    );
    let (status, text) = http_get(admin, "/status").await;
    assert_eq!(status, 200);
    let status: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    let error_of = |addr: &str| {
        status["backends"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|b| b["address"] == addr)
            .and_then(|b| b["last_error"].as_str())
            .unwrap_or_default()
            .to_owned()
    };
    let body_error = error_of("127.163.0.11:5433");
    assert!(body_error.contains("larger than 1024"), "{body_error}");
    let head_error = error_of("127.163.0.12:5433");
    assert!(head_error.contains("too large"), "{head_error}");
}
