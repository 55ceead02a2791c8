//! Moves a session's bytes both ways with correct half-close.
//!
//! Two things keep it cheap. An idle session holds no buffer and no pipe: both are borrowed from
//! per-thread pools only while bytes are moving, so ten thousand idle sessions cost little more
//! than their sockets. And a read that returns less than was asked for drained the socket, so
//! readiness is cleared right there instead of by one more `read` that would only say EAGAIN.
//!
//! On Linux, [`Mode::Splice`] moves bytes socket → pipe → socket with `splice(2)` and never copies
//! them through user space; when a pipe cannot be made it falls back to the buffered path.

use std::cell::RefCell;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream as StdTcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Bytes moved per read; also the size of a pooled buffer.
const CHUNK: usize = 64 * 1024;
/// Buffers or pipes kept per thread for reuse; more are freed.
const POOL_CAP: usize = 64;

/// How bytes are moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// `read` into a pooled buffer, `write` out of it.
    Buffered,
    /// `splice(2)` through a pooled pipe (Linux), falling back to buffered.
    Splice,
}

/// When the session last moved a byte, and how many it moved each way.
pub struct Activity {
    start: Instant,
    last_ms: AtomicU64,
    /// Client → backend.
    pub up: AtomicU64,
    /// Backend → client.
    pub down: AtomicU64,
}

impl Activity {
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            up: AtomicU64::new(0),
            down: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// When the session last moved a byte (its start if never).
    pub fn last(&self) -> Instant {
        self.start + std::time::Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

impl Default for Activity {
    fn default() -> Self {
        Self::new()
    }
}

/// A connected socket registered for both directions.
pub struct Socket(AsyncFd<StdTcpStream>);

impl Socket {
    pub fn new(stream: TcpStream) -> io::Result<Socket> {
        let std = stream.into_std()?;
        // SAFETY: the std stream owns a valid descriptor, and the AsyncFd owns the stream: the
        // descriptor is neither replaced nor closed while registered.
        let fd = unsafe {
            AsyncFd::register_with_interest(std, Interest::READABLE | Interest::WRITABLE)?
        };
        Ok(Socket(fd))
    }

    fn fd(&self) -> RawFd {
        self.0.get_ref().as_raw_fd()
    }

    fn shutdown_write(&self) {
        // The peer may already be gone; there is nothing left to tell it.
        let _ = self.0.get_ref().shutdown(Shutdown::Write);
    }

    /// Writes all of `bytes`, waiting for room as needed.
    async fn write_all(&self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            // Optimistic: a socket usually has room, so try before waiting.
            match self.0.get_ref().write(bytes) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => bytes = &bytes[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let mut ready = self.0.writable().await?;
                    match ready.try_io(|s| s.get_ref().write(bytes)) {
                        Ok(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                        Ok(Ok(n)) => bytes = &bytes[n..],
                        Ok(Err(e)) => return Err(e),
                        Err(_would_block) => {}
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Copies both ways until both directions have ended (each end's EOF is passed on as a
/// half-close), or until either fails. Counts bytes and activity in `activity` as it goes, so
/// the counts survive the future being dropped (drain, idle timeout, shutdown).
pub async fn bidirectional(
    client: &Socket,
    backend: &Socket,
    mode: Mode,
    activity: &Activity,
) -> io::Result<()> {
    let up = pump(client, backend, mode, activity, &activity.up);
    let down = pump(backend, client, mode, activity, &activity.down);
    tokio::try_join!(up, down).map(|_| ())
}

async fn pump(
    from: &Socket,
    to: &Socket,
    mode: Mode,
    activity: &Activity,
    counter: &AtomicU64,
) -> io::Result<()> {
    let mut mode = mode;
    loop {
        let moved = match mode {
            Mode::Splice => match splice_once(from, to).await {
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    // This pair of sockets cannot splice; the buffered path always works.
                    mode = Mode::Buffered;
                    continue;
                }
                other => other?,
            },
            Mode::Buffered => buffered_once(from, to).await?,
        };
        if moved == 0 {
            to.shutdown_write();
            return Ok(());
        }
        counter.fetch_add(moved as u64, Ordering::Relaxed);
        activity.touch();
    }
}

/// Waits until `from` is readable, then moves what one read returns. 0 means EOF.
async fn buffered_once(from: &Socket, to: &Socket) -> io::Result<usize> {
    loop {
        let mut ready = from.0.readable().await?;
        let mut buffer = Buffers::take();
        let read = ready.try_io(|s| s.get_ref().read(&mut buffer));
        let n = match read {
            Ok(Ok(n)) => n,
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => {
                Buffers::give(buffer);
                continue;
            }
        };
        if n < buffer.len() {
            // A short read drained the socket: skip the read that would only say EAGAIN.
            ready.clear_ready();
        }
        drop(ready);
        let written = to.write_all(&buffer[..n]).await;
        Buffers::give(buffer);
        written?;
        return Ok(n);
    }
}

/// Per-thread pool of copy buffers, so idle sessions hold none.
struct Buffers;

thread_local! {
    static BUFFERS: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
    static PIPES: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

impl Buffers {
    fn take() -> Box<[u8]> {
        BUFFERS
            .with(|pool| pool.borrow_mut().pop())
            .unwrap_or_else(|| vec![0u8; CHUNK].into_boxed_slice())
    }

    fn give(buffer: Box<[u8]>) {
        BUFFERS.with(|pool| {
            let mut pool = pool.borrow_mut();
            if pool.len() < POOL_CAP {
                pool.push(buffer);
            }
        });
    }
}

/// A pipe used as the kernel-side buffer of `splice(2)`. Only empty pipes go back to the pool.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: `fds` is a valid array of two ints for pipe2 to fill in.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Ok(Pipe { read, write })
    }

    fn take() -> io::Result<Pipe> {
        match PIPES.with(|pool| pool.borrow_mut().pop()) {
            Some(pipe) => Ok(pipe),
            None => Pipe::new(),
        }
    }

    fn give(self) {
        PIPES.with(|pool| {
            let mut pool = pool.borrow_mut();
            if pool.len() < POOL_CAP {
                pool.push(self);
            }
        });
    }
}

/// One `splice(2)` call between descriptors, non-blocking.
fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    loop {
        // SAFETY: both descriptors are open for the duration of the call (borrowed from live
        // owners), and null offsets are valid for sockets and pipes.
        let n = unsafe {
            libc::splice(
                from,
                std::ptr::null_mut(),
                to,
                std::ptr::null_mut(),
                len,
                libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Waits until `from` is readable, then moves one pipeful to `to` without copying it through
/// user space. 0 means EOF.
async fn splice_once(from: &Socket, to: &Socket) -> io::Result<usize> {
    let pipe = match Pipe::take() {
        Ok(pipe) => pipe,
        // Out of descriptors: this chunk goes the buffered way.
        Err(_) => return buffered_once(from, to).await,
    };
    let moved = loop {
        let mut ready = from.0.readable().await?;
        match ready.try_io(|s| splice(s.get_ref().as_raw_fd(), pipe.write.as_raw_fd(), CHUNK)) {
            Ok(Ok(n)) => {
                if n > 0 && n < CHUNK {
                    ready.clear_ready();
                }
                break n;
            }
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => continue,
        }
    };
    let mut left = moved;
    while left > 0 {
        match splice(pipe.read.as_raw_fd(), to.fd(), left) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => left -= n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let mut ready = to.0.writable().await?;
                match ready.try_io(|s| splice(pipe.read.as_raw_fd(), s.get_ref().as_raw_fd(), left))
                {
                    Ok(Ok(n)) => left -= n,
                    Ok(Err(e)) => return Err(e),
                    Err(_would_block) => {}
                }
            }
            Err(e) => return Err(e),
        }
    }
    // Only an empty pipe is reused; on an error above it is simply closed.
    pipe.give();
    Ok(moved)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (a.unwrap(), b.unwrap().0)
    }

    /// client ⇄ [proxy_client | proxy_backend] ⇄ backend, copied by `bidirectional`.
    async fn round_trip(mode: Mode) {
        let (mut client, proxy_client) = pair().await;
        let (proxy_backend, mut backend) = pair().await;
        let activity = Activity::new();
        let copier = async {
            let c = Socket::new(proxy_client).unwrap();
            let b = Socket::new(proxy_backend).unwrap();
            bidirectional(&c, &b, mode, &activity).await
        };
        let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let expected = payload.clone();
        let peers = async move {
            // Client sends everything then half-closes; backend echoes back and half-closes.
            let send = async {
                client.write_all(&payload).await.unwrap();
                client.shutdown().await.unwrap();
                let mut back = Vec::new();
                client.read_to_end(&mut back).await.unwrap();
                back
            };
            let echo = async {
                let mut got = Vec::new();
                backend.read_to_end(&mut got).await.unwrap();
                backend.write_all(&got).await.unwrap();
                backend.shutdown().await.unwrap();
                got.len()
            };
            tokio::join!(send, echo)
        };
        let (copied, (back, echoed)) = tokio::join!(copier, peers);
        copied.unwrap();
        assert_eq!(echoed, expected.len());
        assert_eq!(back, expected, "{mode:?}: bytes intact and in order");
        assert_eq!(activity.up.load(Ordering::Relaxed), expected.len() as u64);
        assert_eq!(activity.down.load(Ordering::Relaxed), expected.len() as u64);
    }

    #[tokio::test]
    async fn buffered_copies_both_ways_with_half_close() {
        round_trip(Mode::Buffered).await;
    }

    #[tokio::test]
    async fn splice_copies_both_ways_with_half_close() {
        round_trip(Mode::Splice).await;
    }
}
