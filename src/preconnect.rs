//! Connections to the leader opened ahead of demand (`proxy.preconnect`).
//!
//! Postgres forks a backend when it accepts a connection, before any byte arrives; a client
//! that opens a connection per transaction waits for that fork every time. Keeping a few
//! connections already accepted by the leader hands each new client a forked backend. They are
//! tied to the route generation that opened them and dropped when the route moves, so a warm
//! connection never outlives its leader. Each one counts against the leader's
//! `max_connections`, and Postgres closes a connection that sends nothing within
//! `authentication_timeout` (60 s by default), so they are replaced well before that.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use roleproxy_core::route::Route;

use crate::reserve::Reserve;

/// A warm connection is replaced after this long, well inside Postgres's default
/// `authentication_timeout` of 60 s.
pub const MAX_AGE: Duration = Duration::from_secs(30);

struct Warm {
    generation: u64,
    addr: SocketAddr,
    opened: Instant,
    stream: TcpStream,
}

/// A small pool of connections to the current leader.
pub struct Preconnect {
    size: usize,
    pool: Mutex<VecDeque<Warm>>,
    /// Wakes the filler when a connection was taken.
    taken: Notify,
}

impl Preconnect {
    pub fn new(size: usize) -> Arc<Preconnect> {
        Arc::new(Preconnect {
            size,
            pool: Mutex::new(VecDeque::with_capacity(size)),
            taken: Notify::new(),
        })
    }

    /// A live warm connection to `addr` opened under `generation`, if there is one.
    pub fn take(&self, generation: u64, addr: SocketAddr) -> Option<TcpStream> {
        let mut found = None;
        if let Ok(mut pool) = self.pool.lock() {
            // Closed or aged connections go; others of another route stay for the filler to judge.
            pool.retain(|w| w.opened.elapsed() < MAX_AGE && alive(&w.stream));
            if let Some(i) = pool
                .iter()
                .position(|w| w.generation == generation && w.addr == addr)
            {
                found = pool.remove(i).map(|w| w.stream);
            }
        }
        self.taken.notify_one();
        found
    }

    fn len(&self) -> usize {
        self.pool.lock().map(|p| p.len()).unwrap_or(0)
    }

    /// Drops every connection not opened to `addr` under `generation`, and stale ones.
    fn prune(&self, generation: u64, addr: Option<SocketAddr>) {
        if let Ok(mut pool) = self.pool.lock() {
            pool.retain(|w| {
                Some(w.addr) == addr
                    && w.generation == generation
                    && w.opened.elapsed() < MAX_AGE
                    && alive(&w.stream)
            });
        }
    }

    /// Keeps the pool full of connections to the route's leader until cancelled.
    pub async fn run(
        self: Arc<Self>,
        mut route: watch::Receiver<Route>,
        connect_timeout: Duration,
        own: Arc<crate::own_addresses::OwnAddrs>,
        reserve: Arc<Reserve>,
        cancel: CancellationToken,
    ) {
        loop {
            let (generation, leader) = {
                let r = route.borrow_and_update();
                (r.generation, r.leader())
            };
            self.prune(generation, leader);
            // A leader at one of the proxy's own addresses would be a loop; sessions refuse it.
            if let Some(addr) = leader.filter(|addr| own.covering(*addr).is_none()) {
                while self.len() < self.size && route.borrow().generation == generation {
                    let connected =
                        tokio::time::timeout(connect_timeout, reserve.connect(addr)).await;
                    match connected {
                        Ok(Ok(stream)) => {
                            let _ = stream.set_nodelay(true);
                            if let Ok(mut pool) = self.pool.lock() {
                                pool.push_back(Warm {
                                    generation,
                                    addr,
                                    opened: Instant::now(),
                                    stream,
                                });
                            }
                        }
                        // The sessions' own connects report failures to the leader view.
                        _ => break,
                    }
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => {
                    // A reload or shutdown: warm connections hold Postgres backends; close them.
                    self.prune(u64::MAX, None);
                    return;
                }
                changed = route.changed() => if changed.is_err() { return },
                _ = self.taken.notified() => {}
                // Replace aged connections, and retry after a failed connect.
                _ = tokio::time::sleep(MAX_AGE / 4) => {}
            }
        }
    }
}

/// Postgres sends nothing before the startup packet, so a readable socket means closed (EOF)
/// or reset: not worth handing to a client.
fn alive(stream: &TcpStream) -> bool {
    let mut probe = [0u8; 1];
    matches!(stream.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;
    use tokio_util::task::AbortOnDropHandle;

    #[tokio::test]
    async fn hands_out_connections_of_the_current_generation_only() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _accepting = AbortOnDropHandle::new(tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                held.push(s);
            }
        }));
        let route = Route {
            generation: 3,
            target: roleproxy_core::route::Target::Leader(addr),
        };
        let (tx, rx) = watch::channel(route);
        let pool = Preconnect::new(2);
        let cancel = CancellationToken::new();
        let own = Arc::new(crate::own_addresses::OwnAddrs::new());
        let filler = AbortOnDropHandle::new(tokio::spawn(Arc::clone(&pool).run(
            rx,
            Duration::from_secs(1),
            own,
            Reserve::open(),
            cancel.clone(),
        )));
        for _ in 0..100 {
            if pool.len() == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(pool.len(), 2);
        assert!(
            pool.take(2, addr).is_none(),
            "an older generation gets nothing"
        );
        assert!(pool.take(3, addr).is_some());
        // The route moves: warm connections to the old leader are dropped.
        tx.send_replace(Route {
            generation: 4,
            target: roleproxy_core::route::Target::None(roleproxy_core::route::NoRoute::NoLeader),
        });
        for _ in 0..100 {
            if pool.len() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(pool.len(), 0);
        cancel.cancel();
        filler.await.expect("the filler stops when cancelled");
    }
}
