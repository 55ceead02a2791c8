//! The admin port under abuse from the private network: a neighbour keeps a thousand
//! connections open, half of them idle and half trickling their headers a byte at a time, and
//! opens new ones as the old ones are closed. `/healthz`, `/ready` and `/metrics` must still
//! answer, since a platform health check that fails restarts the machine for nothing.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use roleproxy_testkit::fake_cluster::FakeCluster;
use roleproxy_testkit::harness::{eventually, http_get};
use roleproxy_testkit::role::RoleReply;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// Connections the neighbour keeps open.
const ABUSERS: usize = 1000;
/// How long a closed abuser waits before it connects again.
const RECONNECT_PAUSE: Duration = Duration::from_millis(200);
/// Rounds of `/healthz`, `/ready` and `/metrics` asked while the abuse goes on.
const ROUNDS: usize = 20;

/// Counts of what the abusers saw.
#[derive(Default)]
struct Seen {
    connected: AtomicU64,
    closed_by_server: AtomicU64,
}

/// Each abuse connection and the admin port's side of it take a descriptor of this process;
/// raise the soft limit so the test measures the admin port, not the test's own limit.
fn raise_descriptor_limit(wanted: u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid rlimit for getrlimit to fill in.
    assert_eq!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
        0
    );
    if limit.rlim_cur >= wanted {
        return;
    }
    assert!(
        limit.rlim_max >= wanted,
        "this test needs {wanted} descriptors; the hard limit is {}",
        limit.rlim_max
    );
    limit.rlim_cur = wanted;
    // SAFETY: a valid rlimit below the hard limit is passed.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) }, 0);
}

/// One abuser: connects, then idles or trickles a header until the server closes it, then
/// pauses and connects again, until `stop`.
async fn abuse(admin: SocketAddr, trickle: bool, seen: Arc<Seen>, stop: CancellationToken) {
    while !stop.is_cancelled() {
        let Ok(mut stream) = TcpStream::connect(admin).await else {
            // Not a wait: paces this abuser's reconnects.
            tokio::time::sleep(RECONNECT_PAUSE).await;
            continue;
        };
        seen.connected.fetch_add(1, Ordering::Relaxed);
        let held = async {
            if trickle {
                if stream
                    .write_all(b"GET /healthz HTTP/1.1\r\n")
                    .await
                    .is_err()
                {
                    return;
                }
                loop {
                    // Not a wait: the trickle's pace, a byte every 100 ms.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    if stream.write_all(b"X").await.is_err() {
                        return;
                    }
                }
            } else {
                let mut byte = [0u8; 1];
                let _ = stream.read(&mut byte).await;
            }
        };
        tokio::select! {
            () = held => { seen.closed_by_server.fetch_add(1, Ordering::Relaxed); }
            () = stop.cancelled() => return,
        }
        // Not a wait: paces this abuser's reconnects.
        tokio::time::sleep(RECONNECT_PAUSE).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_paths_answer_while_a_thousand_connections_idle_or_trickle() {
    raise_descriptor_limit(4 * ABUSERS as u64 + 512);
    let cluster = FakeCluster::start(73, 1).await;
    cluster.nodes[0].role.set(RoleReply::leader());
    let proxy = cluster.proxy().await;
    let leader = cluster.nodes[0].addr();
    assert!(
        proxy
            .wait_route(Some(&leader), Duration::from_secs(20))
            .await
    );
    let admin = proxy.admin;

    let seen = Arc::new(Seen::default());
    let stop = CancellationToken::new();
    let abusers: Vec<_> = (0..ABUSERS)
        .map(|i| tokio::spawn(abuse(admin, i % 2 == 1, Arc::clone(&seen), stop.clone())))
        .collect();
    // The abuse is in full swing: every abuser has connected, and the admin port has had to
    // close some of them (only some fit, and none may trickle for long).
    assert!(
        eventually(Duration::from_secs(60), || async {
            seen.connected.load(Ordering::Relaxed) >= 2 * ABUSERS as u64
                && seen.closed_by_server.load(Ordering::Relaxed) >= ABUSERS as u64
        })
        .await,
        "the abuse never got going: {} connects, {} closed by the admin port",
        seen.connected.load(Ordering::Relaxed),
        seen.closed_by_server.load(Ordering::Relaxed)
    );

    let mut times = Vec::new();
    for _ in 0..ROUNDS {
        for (path, expected) in [
            ("/healthz", "ok"),
            ("/ready", "ready: leader"),
            ("/metrics", "roleproxy_"),
        ] {
            let started = Instant::now();
            let (status, body) =
                tokio::time::timeout(Duration::from_secs(60), http_get(admin, path))
                    .await
                    .unwrap_or_else(|_| panic!("{path} never answered while abused"));
            times.push(started.elapsed());
            assert_eq!(status, 200, "{path}: {body}");
            assert!(body.contains(expected), "{path}: {body}");
        }
    }
    stop.cancel();
    for abuser in abusers {
        abuser.await.expect("abuser task");
    }
    times.sort();
    println!(
        "admin answers while {ABUSERS} connections idle or trickle: {} requests, median {:?}, \
         90th percentile {:?}, slowest {:?}; {} abuse connects, {} closed by the admin port",
        times.len(),
        times[times.len() / 2],
        times[times.len() * 9 / 10],
        times[times.len() - 1],
        seen.connected.load(Ordering::Relaxed),
        seen.closed_by_server.load(Ordering::Relaxed)
    );
    proxy.stop().await;
}
