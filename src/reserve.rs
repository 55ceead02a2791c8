//! One file descriptor held back, so a client that arrives while this process is out of
//! descriptors can still be accepted and told why (53300) instead of waiting unseen in the
//! listen backlog.
//!
//! The reserve is only worth anything if nothing else can take its descriptor. Every listener
//! and every backend connect share one: a listener gives it up only for a client that is
//! really waiting, and a backend connect never runs while the reserve is not held, since a
//! session would keep that descriptor for as long as it lasts and the next client would get
//! no answer until some session ended. Checks and DNS lookups may still take it for a moment;
//! they let go, and the next refill takes it back.
//!
//! Here too is what counts as this host running short ([`is_local_shortage`]): accepts, backend
//! connects, checks and probes all tell it apart from a failing peer the same way.

use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpSocket, TcpStream};

pub struct Reserve {
    file: Mutex<Option<File>>,
    /// Bumped whenever the descriptor is taken or given up, so a connect can tell the reserve
    /// was given up while it made its socket.
    turn: AtomicU64,
}

impl Reserve {
    pub fn open() -> Arc<Reserve> {
        let reserve = Reserve {
            file: Mutex::new(None),
            turn: AtomicU64::new(0),
        };
        reserve.refill();
        Arc::new(reserve)
    }

    /// Takes a descriptor into reserve if none is held; whether one is held now.
    pub fn refill(&self) -> bool {
        self.held_turn().is_some()
    }

    /// Takes a descriptor into reserve if none is held, and reads the turn under the same lock:
    /// `None` if none could be taken.
    fn held_turn(&self) -> Option<u64> {
        let mut slot = self.file.lock().ok()?;
        if slot.is_none() {
            *slot = Some(File::open("/dev/null").ok()?);
            self.turn.fetch_add(1, SeqCst);
        }
        Some(self.turn.load(SeqCst))
    }

    /// Gives the reserved descriptor to the client waiting on `listener`: `None` if none is
    /// held. The lock keeps backend connects from making a socket between the close and the
    /// accept.
    pub fn accept(&self, listener: &TcpListener) -> Option<io::Result<TcpStream>> {
        let mut slot = self.file.lock().ok()?;
        let file = slot.take()?;
        self.turn.fetch_add(1, SeqCst);
        drop(file);
        Some(accept_now(listener))
    }

    /// Connects to a backend, but never with the reserved descriptor: while the reserve is
    /// not held, or was given up while the socket was made, the connect fails as if this
    /// process were out of descriptors (it is, or nearly).
    pub async fn connect(&self, addr: SocketAddr) -> io::Result<TcpStream> {
        let turn = self.held_turn().ok_or_else(out_of_descriptors)?;
        let socket = match addr {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        if self.turn.load(SeqCst) != turn {
            // Dropping the socket frees what may be the reserve's descriptor.
            return Err(out_of_descriptors());
        }
        socket.connect(addr).await
    }
}

/// Errors that come from this host running short, not from the peer: out of descriptors,
/// memory, socket buffers or ephemeral ports (a connect's EADDRNOTAVAIL). They say nothing about
/// a backend, so sessions, checks and probes alike never count them against one, and a client
/// is told 53300 for them.
pub fn is_local_shortage(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::EADDRNOTAVAIL)
    )
}

fn out_of_descriptors() -> io::Error {
    io::Error::from_raw_os_error(libc::EMFILE)
}

/// Whether a client is waiting to be accepted. Once accept has failed for want of a
/// descriptor, the listener's readiness no longer says so: accept fails before it looks at
/// the queue, so it fails the same with nobody waiting.
pub fn client_waiting(listener: &TcpListener) -> bool {
    use rustix::event::{poll, PollFd, PollFlags};
    let mut fds = [PollFd::new(listener, PollFlags::IN)];
    // A zero timeout never blocks. An error says nothing either way: try to accept.
    poll(&mut fds, Some(&rustix::event::Timespec::default())) != Ok(0)
}

/// Accepts a pending connection at once, with no await between: right after the reserve is
/// released, any yield could let a check or a lookup take the descriptor first.
fn accept_now(listener: &TcpListener) -> io::Result<TcpStream> {
    // socket2 accepts with close-on-exec set atomically.
    let (client, _) = socket2::SockRef::from(listener).accept()?;
    client.set_nonblocking(true)?;
    TcpStream::from_std(client.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_reserve_goes_to_a_waiting_client_and_comes_back_before_a_connect() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let reserve = Reserve::open();
        assert!(!client_waiting(&listener));

        let _client = TcpStream::connect(addr).await.unwrap();
        assert!(client_waiting(&listener));
        let given = reserve.accept(&listener).expect("a descriptor was held");
        assert!(given.is_ok(), "the waiting client is accepted");
        assert!(!client_waiting(&listener));
        assert!(reserve.accept(&listener).is_none(), "given up: none left");

        // Not held: the connect takes a descriptor back into reserve first.
        let _backend = reserve.connect(addr).await.unwrap();
        assert!(client_waiting(&listener));
        assert!(reserve.accept(&listener).is_some(), "held again");
    }

    #[tokio::test]
    async fn the_reserve_comes_back_after_every_client_it_is_given_to() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let reserve = Reserve::open();
        let mut kept = Vec::new();
        for round in 0..5 {
            kept.push(TcpStream::connect(addr).await.unwrap());
            let given = reserve.accept(&listener).expect("a descriptor was held");
            kept.push(given.unwrap_or_else(|e| panic!("round {round}: {e}")));
            kept.push(
                reserve
                    .connect(addr)
                    .await
                    .unwrap_or_else(|e| panic!("round {round}: {e}")),
            );
        }
        assert!(
            reserve.accept(&listener).is_some(),
            "held after the last connect"
        );
    }

    #[tokio::test]
    async fn an_accepted_client_is_non_blocking_and_closed_on_exec() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let accepted = accept_now(&listener).unwrap();
        let status = rustix::fs::fcntl_getfl(&accepted).unwrap();
        let descriptor = rustix::io::fcntl_getfd(&accepted).unwrap();
        assert!(
            status.contains(rustix::fs::OFlags::NONBLOCK),
            "a blocking socket would stall a worker"
        );
        assert!(
            descriptor.contains(rustix::io::FdFlags::CLOEXEC),
            "a child process would inherit the client"
        );
    }

    #[tokio::test]
    async fn with_nobody_waiting_an_accept_would_block() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let e = accept_now(&listener).expect_err("nobody is waiting");
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn this_hosts_shortages_are_told_from_a_peers_failures() {
        let shortage = [
            libc::EMFILE,
            libc::ENFILE,
            libc::ENOBUFS,
            libc::ENOMEM,
            libc::EADDRNOTAVAIL,
        ];
        for code in shortage {
            assert!(
                is_local_shortage(&io::Error::from_raw_os_error(code)),
                "{code}"
            );
        }
        let peer = [
            libc::ECONNREFUSED,
            libc::ECONNRESET,
            libc::ETIMEDOUT,
            libc::EHOSTUNREACH,
        ];
        for code in peer {
            assert!(
                !is_local_shortage(&io::Error::from_raw_os_error(code)),
                "{code}"
            );
        }
        assert!(!is_local_shortage(&io::Error::other("no code")));
        assert!(is_local_shortage(&out_of_descriptors()));
    }
}
