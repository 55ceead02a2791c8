//! Moves a session's bytes both ways with correct half-close.
//!
//! Two things keep it cheap. An idle session holds no buffer and no pipe: both are borrowed from
//! per-thread pools only while bytes are moving, so ten thousand idle sessions cost little more
//! than their sockets. And a read that returns less than was asked for drained the socket, so
//! readiness is cleared right there instead of by one more `read` that would only say EAGAIN.
//!
//! On Linux, [`CopyMode::Splice`] moves bytes socket → pipe → socket with `splice(2)` and never copies
//! them through user space; when a pipe cannot be made it falls back to the buffered path.
//!
//! A session may be followed by a [`Framing`]: every buffered read is shown to it, and a splice
//! never moves more than the rest of the current message's body, so each header passes through
//! user space and the framing never loses count. A followed session can then end between
//! transactions ([`Bidirectional::end_when_idle`]), or pause there and resume
//! ([`Bidirectional::pause_when_idle`], [`Bidirectional::resume`]).

use std::cell::RefCell;
use std::future::Future;
use std::io::{self, Read};
use std::net::{Shutdown, TcpStream as StdTcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::unix::{AsyncFd, AsyncFdReadyGuard, TryIoError};
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use roleproxy_core::framing::{Framing, Side};

use crate::config::CopyMode;

/// Bytes moved per read; also the size of a pooled buffer.
const CHUNK: usize = 64 * 1024;
/// In [`CopyMode::Auto`], a read of at least this many bytes starts splicing its direction.
const BULK_STARTS_AT: usize = CHUNK / 2;
/// In [`CopyMode::Auto`], a splice of fewer bytes stops splicing its direction. The messages of
/// an interactive Postgres session are far smaller than both thresholds.
const BULK_STOPS_BELOW: usize = 16 * 1024;
/// Buffers kept per thread for reuse; more are freed. Tasks move between threads, so a pool
/// can fill with what other threads allocated: the caps bound what stays after a burst.
const BUFFER_POOL_CAP: usize = 16;
/// Pipes (two descriptors each) kept per thread for reuse; more are closed.
pub const PIPE_POOL_CAP: usize = 4;

/// The instant [`clock_ms`] counts from: its first use.
fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Milliseconds on tokio's clock (paused in tests that pause it), from 1 on, so 0 can mean
/// "never": the clock of [`Activity`] and of the per-backend stamp of when bytes last came from
/// a backend, which sessions write and the leader view reads without a lock.
pub fn clock_ms() -> u64 {
    epoch().elapsed().as_millis() as u64 + 1
}

/// The instant a [`clock_ms`] reading stands for.
pub fn clock_instant(ms: u64) -> Instant {
    epoch() + Duration::from_millis(ms.saturating_sub(1))
}

/// When the session last moved a byte, and how many it moved each way.
pub struct Activity {
    /// [`clock_ms`] of the last byte moved (the session's start if none).
    last_ms: AtomicU64,
    /// Client → backend.
    pub up: AtomicU64,
    /// Backend → client.
    pub down: AtomicU64,
    /// Where bytes from the backend are also stamped: the backend's own "heard from" time,
    /// shared by all its sessions, which the leader view reads as evidence that it lives.
    heard: Option<Arc<AtomicU64>>,
}

impl Activity {
    pub fn new() -> Self {
        Self::stamping(None)
    }

    /// An activity that also stamps bytes from the backend into `heard`.
    pub fn stamping(heard: Option<Arc<AtomicU64>>) -> Self {
        Self {
            last_ms: AtomicU64::new(clock_ms()),
            up: AtomicU64::new(0),
            down: AtomicU64::new(0),
            heard,
        }
    }

    fn touch(&self, side: Side) {
        let ms = clock_ms();
        self.last_ms.store(ms, Ordering::Relaxed);
        if side == Side::Server {
            if let Some(heard) = &self.heard {
                heard.store(ms, Ordering::Relaxed);
            }
        }
    }

    /// When the session last moved a byte (its start if never).
    pub fn last(&self) -> Instant {
        clock_instant(self.last_ms.load(Ordering::Relaxed))
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

    fn shutdown_write(&self) {
        // The peer may already be gone; there is nothing left to tell it.
        let _ = self.0.get_ref().shutdown(Shutdown::Write);
    }

    /// Writes all of `bytes`, waiting for room: for the few bytes the proxy says itself.
    pub async fn send_all(&self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            let mut ready = self.0.writable().await?;
            match ready.try_io(|s| send(s.get_ref(), bytes)) {
                Ok(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(Ok(n)) => bytes = &bytes[n..],
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => {}
            }
        }
        Ok(())
    }

    /// Half-closes, then reads and drops what the peer still sends until it closes too (or
    /// `within` passes). Closing with unread input would reset the connection, and a reset
    /// can reach the peer before it has read the last words it was sent.
    pub async fn finish(&self, within: Duration) {
        self.shutdown_write();
        let discard = async {
            let mut sink = [0u8; 1024];
            loop {
                let Ok(mut ready) = self.0.readable().await else {
                    return;
                };
                match ready.try_io(|s| s.get_ref().read(&mut sink)) {
                    Ok(Ok(0)) => return,
                    Ok(Err(e)) if e.kind() != io::ErrorKind::Interrupted => return,
                    _ => {}
                }
            }
        };
        let _ = tokio::time::timeout(within, discard).await;
    }
}

/// Copies both ways until both directions have ended (each end's EOF is passed on as a
/// half-close), until either fails, or until one has ended and the other has been silent for
/// `half_close_timeout`. Counts bytes and activity in `activity` as it goes, so the counts
/// survive the future being dropped (drain, idle timeout, shutdown). With a `framing`, shows
/// it every byte it can see and splices no further than it allows.
pub fn bidirectional<'a>(
    client: &'a Socket,
    backend: &'a Socket,
    mode: CopyMode,
    activity: &'a Activity,
    half_close_timeout: Duration,
    framing: Option<&'a mut Framing>,
) -> Bidirectional<'a> {
    Bidirectional {
        down: Pump::new(
            backend,
            client,
            mode,
            &activity.down,
            activity,
            Side::Server,
        ),
        up: Pump::new(client, backend, mode, &activity.up, activity, Side::Client),
        error: None,
        half_close_timeout,
        half_closed: None,
        framing,
        at_idle: AtIdle::Copy,
    }
}

/// What a followed copy does at the session's next transaction boundary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AtIdle {
    /// Nothing: it copies on.
    Copy,
    /// Ends there ([`Ended::Idle`]).
    End,
    /// Stops reading the client there.
    Pause,
    /// Reached the boundary with a pause asked for: the client's bytes wait in its socket.
    Paused,
}

/// How a copy ended without failing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Both directions reached EOF.
    Closed,
    /// Asked to end between transactions, it did: every byte read so far was written, and no
    /// byte the client sent since has been read.
    Idle,
    /// One direction ended and the other moved nothing for the half-close timeout. Postgres
    /// never half-closes on purpose (a client sends Terminate, then closes), so the side that
    /// stays open is stuck or gone, and would otherwise hold the session until `idle_timeout`.
    HalfOpen,
}

/// The future of [`bidirectional`]. Hand-written rather than `async`: it waits with
/// `poll_read_ready`, which needs no stored waiter, so an idle session's copy state is two
/// small [`Pump`]s and nothing else.
pub struct Bidirectional<'a> {
    down: Pump<'a>,
    up: Pump<'a>,
    /// The first write failure, reported once the other direction has finished.
    error: Option<io::Error>,
    half_close_timeout: Duration,
    /// Armed once one direction has ended; boxed so that only half-closed sessions pay for a
    /// timer.
    half_closed: Option<Pin<Box<Sleep>>>,
    framing: Option<&'a mut Framing>,
    at_idle: AtIdle,
}

impl Bidirectional<'_> {
    /// Whether a framing follows the session, so it can end between transactions.
    pub fn tracked(&self) -> bool {
        self.framing.as_deref().is_some_and(Framing::tracked)
    }

    /// The backend's cancel key, once the framing has seen it.
    pub fn backend_key(&self) -> Option<roleproxy_core::framing::BackendKey> {
        self.framing.as_deref().and_then(Framing::backend_key)
    }

    /// From now on, ends ([`Ended::Idle`]) as soon as the session is between transactions with
    /// nothing in flight either way; at once if it already is.
    pub fn end_when_idle(&mut self) {
        self.at_idle = AtIdle::End;
    }

    /// From now on, stops reading the client as soon as the session is between transactions
    /// with nothing in flight (at once if it already is), until [`Bidirectional::resume`]: the
    /// client's next bytes wait in its socket, so none is lost or reordered, and none reaches
    /// the backend meanwhile. The backend's side still flows, so a notice, a notification or
    /// its close still reaches the client. The future never ends at the pause itself.
    pub fn pause_when_idle(&mut self) {
        if self.at_idle != AtIdle::Paused {
            self.at_idle = AtIdle::Pause;
        }
    }

    /// Copies on as before: reads the client again where it stopped. The caller polls the
    /// future again, which is what reads the bytes that waited.
    pub fn resume(&mut self) {
        self.at_idle = AtIdle::Copy;
    }

    /// Stopped at a transaction boundary by [`Bidirectional::pause_when_idle`]: the backend
    /// has answered everything the client sent, and nothing more was read from the client.
    pub fn paused(&self) -> bool {
        self.at_idle == AtIdle::Paused
    }

    /// Between transactions with nothing in flight either way.
    fn at_boundary(&self) -> bool {
        self.up.chunk.is_none()
            && self.down.chunk.is_none()
            && self.framing.as_deref().is_some_and(Framing::idle)
    }

    /// Whether to end here; pauses here if a pause was asked for. A pause stays until
    /// resumed, whatever the backend sends meanwhile (it has nothing left to answer).
    fn stops_here(&mut self) -> bool {
        match self.at_idle {
            AtIdle::End => self.at_boundary(),
            AtIdle::Pause if self.at_boundary() => {
                self.at_idle = AtIdle::Paused;
                false
            }
            _ => false,
        }
    }
}

impl Future for Bidirectional<'_> {
    type Output = io::Result<Ended>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<Ended>> {
        let this = self.get_mut();
        // Checked before each direction moves, server side first: once the server's
        // ReadyForQuery has reached the client, nothing the client sends next is read.
        if this.stops_here() {
            return Poll::Ready(Ok(Ended::Idle));
        }
        let mut pending = false;
        for side in [Side::Server, Side::Client] {
            if side == Side::Client && this.paused() {
                // Not polled, so not woken by it either: the client's bytes wait unread.
                pending = true;
                continue;
            }
            let Bidirectional {
                up,
                down,
                error,
                framing,
                ..
            } = this;
            let pump = match side {
                Side::Server => down,
                Side::Client => up,
            };
            let polled = pump.poll(cx, framing.as_deref_mut());
            let write_failed = pump.write_failed;
            match polled {
                Poll::Pending => pending = true,
                Poll::Ready(Ok(())) => {}
                // Its source failed: nothing more will come this way; end the session.
                Poll::Ready(Err(e)) if !write_failed => return Poll::Ready(Err(e)),
                // Its destination failed (say Postgres sent FATAL and closed): the other
                // direction still delivers what that side sent before it went, as a direct
                // connection would, and ends when it reads the close.
                Poll::Ready(Err(e)) => {
                    error.get_or_insert(e);
                }
            }
            if this.stops_here() {
                return Poll::Ready(Ok(Ended::Idle));
            }
        }
        if !pending {
            return Poll::Ready(this.error.take().map_or(Ok(Ended::Closed), Err));
        }
        if this.up.done == this.down.done {
            return Poll::Pending;
        }
        // One side has closed: the other gets `half_close_timeout` of silence, counted from
        // its last byte, so a direction still delivering its last answer is not cut.
        let timeout = this.half_close_timeout;
        let activity = this.up.activity;
        let timer = this
            .half_closed
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(activity.last() + timeout)));
        loop {
            ready!(timer.as_mut().poll(cx));
            let due = activity.last() + timeout;
            if Instant::now() >= due {
                return Poll::Ready(Ok(Ended::HalfOpen));
            }
            timer.as_mut().reset(due);
        }
    }
}

/// Bytes read but not yet written: borrowed from a pool only while they exist.
enum Chunk {
    Buffer {
        buffer: Box<[u8]>,
        start: usize,
        end: usize,
    },
    Pipe {
        pipe: Pipe,
        left: usize,
    },
}

/// One direction: read from `from`, write to `to`, until EOF (then half-close `to`).
struct Pump<'a> {
    from: &'a Socket,
    to: &'a Socket,
    mode: CopyMode,
    counter: &'a AtomicU64,
    activity: &'a Activity,
    chunk: Option<Chunk>,
    /// In [`CopyMode::Auto`]: this direction is moving bulk data, so it splices.
    bulk: bool,
    done: bool,
    /// It ended because writing to its destination failed.
    write_failed: bool,
    side: Side,
}

impl<'a> Pump<'a> {
    fn new(
        from: &'a Socket,
        to: &'a Socket,
        mode: CopyMode,
        counter: &'a AtomicU64,
        activity: &'a Activity,
        side: Side,
    ) -> Self {
        Self {
            from,
            to,
            mode,
            counter,
            activity,
            chunk: None,
            bulk: false,
            done: false,
            write_failed: false,
            side,
        }
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        mut framing: Option<&mut Framing>,
    ) -> Poll<io::Result<()>> {
        if self.done {
            return Poll::Ready(Ok(()));
        }
        loop {
            if self.chunk.is_some() {
                if let Err(e) = ready!(self.poll_flush(cx)) {
                    self.chunk = None;
                    self.done = true;
                    self.write_failed = true;
                    return Poll::Ready(Err(e));
                }
                continue;
            }
            let mut ready = match ready!(self.from.0.poll_read_ready(cx)) {
                Ok(ready) => ready,
                Err(e) => {
                    self.done = true;
                    return Poll::Ready(Err(e));
                }
            };
            // Bytes that may pass without being seen: the rest of a message's body.
            let unseen = framing
                .as_deref()
                .map_or(usize::MAX, |f| f.skippable(self.side));
            let splice = match self.mode {
                CopyMode::Splice => unseen > 0,
                CopyMode::Buffered => false,
                CopyMode::Auto => self.bulk && unseen >= BULK_STOPS_BELOW,
            };
            let read = match splice.then(Pipe::take) {
                Some(Ok(pipe)) => read_spliced(&mut ready, pipe, unseen),
                // Out of descriptors, or no splice(2) here: this chunk goes the buffered way.
                Some(Err(_)) | None => read_buffered(&mut ready),
            };
            let (n, chunk) = match read {
                Ok(Ok(read)) => read,
                Ok(Err(e))
                    if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error())
                        && splice =>
                {
                    // This pair of sockets cannot splice; the buffered path always works.
                    self.mode = CopyMode::Buffered;
                    continue;
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => {
                    self.done = true;
                    return Poll::Ready(Err(e));
                }
                // Readiness was stale and is now cleared; the next poll registers the waker.
                Err(_would_block) => continue,
            };
            if n == 0 {
                chunk.recycle();
                self.to.shutdown_write();
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            if let Some(framing) = framing.as_deref_mut() {
                match &chunk {
                    Chunk::Buffer { buffer, .. } => framing.observe(self.side, &buffer[..n]),
                    Chunk::Pipe { .. } => framing.skipped(self.side, n),
                }
            }
            if chunk.drained_by(n) {
                // A short read drained the socket: skip the read that would only say EAGAIN.
                ready.clear_ready();
            }
            self.bulk = moving_bulk(self.bulk, n);
            self.counter.fetch_add(n as u64, Ordering::Relaxed);
            self.activity.touch(self.side);
            self.chunk = Some(chunk);
        }
    }

    /// Writes the pending chunk to `to`; returns its buffer or pipe to the pool when done.
    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let to = self.to;
        let Some(chunk) = self.chunk.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        loop {
            let pending = match chunk {
                Chunk::Buffer { start, end, .. } => *end - *start,
                Chunk::Pipe { left, .. } => *left,
            };
            if pending == 0 {
                if let Some(chunk) = self.chunk.take() {
                    chunk.recycle();
                }
                return Poll::Ready(Ok(()));
            }
            // Optimistic: a socket usually has room, so write before asking for readiness.
            let written = match write_chunk(to.0.get_ref(), chunk) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let mut ready = ready!(to.0.poll_write_ready(cx))?;
                    match ready.try_io(|s| write_chunk(s.get_ref(), chunk)) {
                        Ok(result) => result,
                        Err(_would_block) => continue,
                    }
                }
                other => other,
            };
            match written {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => match chunk {
                    Chunk::Buffer { start, .. } => *start += n,
                    Chunk::Pipe { left, .. } => *left -= n,
                },
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // The chunk is dropped with the session; a half-written pipe is not reused.
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

/// Whether a direction moves bulk data after a read of `n` bytes. Bulk starts with a read of
/// half a buffer or more, not a full one: a loopback segment is 65,483 bytes, just short of a
/// buffer, so a proxy that keeps up would never see a full read. It stops with a small read,
/// not a short one: splices often stop short of a buffer's worth while bulk still flows.
fn moving_bulk(was_bulk: bool, n: usize) -> bool {
    n >= if was_bulk {
        BULK_STOPS_BELOW
    } else {
        BULK_STARTS_AT
    }
}

fn read_buffered(
    ready: &mut AsyncFdReadyGuard<'_, StdTcpStream>,
) -> Result<io::Result<(usize, Chunk)>, TryIoError> {
    let mut buffer = Buffers::take();
    match ready.try_io(|s| s.get_ref().read(&mut buffer)) {
        Ok(Ok(n)) => Ok(Ok((
            n,
            Chunk::Buffer {
                buffer,
                start: 0,
                end: n,
            },
        ))),
        Ok(Err(e)) => {
            Buffers::give(buffer);
            Ok(Err(e))
        }
        Err(would_block) => {
            Buffers::give(buffer);
            Err(would_block)
        }
    }
}

/// Splices at most `limit` bytes (and at most what the pipe holds) into `pipe`.
fn read_spliced(
    ready: &mut AsyncFdReadyGuard<'_, StdTcpStream>,
    pipe: Pipe,
    limit: usize,
) -> Result<io::Result<(usize, Chunk)>, TryIoError> {
    let len = pipe.capacity.min(limit);
    match ready.try_io(|s| splice(s.get_ref(), &pipe.write, len)) {
        Ok(Ok(n)) => Ok(Ok((n, Chunk::Pipe { pipe, left: n }))),
        Ok(Err(e)) => {
            pipe.give();
            Ok(Err(e))
        }
        Err(would_block) => {
            pipe.give();
            Err(would_block)
        }
    }
}

/// One write of a chunk's pending bytes to `to`.
fn write_chunk(to: impl AsFd, chunk: &Chunk) -> io::Result<usize> {
    match chunk {
        Chunk::Buffer { buffer, start, end } => send(to, &buffer[*start..*end]),
        Chunk::Pipe { pipe, left } => splice(&pipe.read, to, *left),
    }
}

/// One `send(2)`, without SIGPIPE when the peer has gone. (Where `MSG_NOSIGNAL` does not
/// exist, Rust's runtime has already set SIGPIPE to be ignored.)
fn send(to: impl AsFd, bytes: &[u8]) -> io::Result<usize> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let flags = rustix::net::SendFlags::NOSIGNAL;
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let flags = rustix::net::SendFlags::empty();
    Ok(rustix::net::send(to, bytes, flags)?)
}

impl Chunk {
    /// Whether reading `n` bytes into this chunk proves the socket was drained. A short
    /// `read` does; a short `splice` does not, as it can stop early when the pipe runs out of
    /// slots, and clearing readiness then could stall the session.
    fn drained_by(&self, n: usize) -> bool {
        match self {
            Chunk::Buffer { buffer, .. } => n < buffer.len(),
            Chunk::Pipe { .. } => false,
        }
    }

    /// Returns the buffer or (empty) pipe to its pool.
    fn recycle(self) {
        match self {
            Chunk::Buffer { buffer, .. } => Buffers::give(buffer),
            Chunk::Pipe { pipe, left: 0 } => pipe.give(),
            Chunk::Pipe { .. } => {}
        }
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
            if pool.len() < BUFFER_POOL_CAP {
                pool.push(buffer);
            }
        });
    }
}

/// A pipe used as the kernel-side buffer of `splice(2)`. Only empty pipes go back to the pool.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// Bytes one splice may move into it.
    capacity: usize,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let (read, write, capacity) = kernel::pipe()?;
        Ok(Pipe {
            read,
            write,
            capacity,
        })
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
            if pool.len() < PIPE_POOL_CAP {
                pool.push(self);
            }
        });
    }
}

/// One `splice(2)` call between descriptors, non-blocking.
fn splice(from: impl AsFd, to: impl AsFd, len: usize) -> io::Result<usize> {
    kernel::splice(from.as_fd(), to.as_fd(), len)
}

/// `splice(2)` and the pipes it moves bytes through: Linux's own calls.
#[cfg(any(target_os = "linux", target_os = "android"))]
mod kernel {
    use std::io;
    use std::os::fd::{BorrowedFd, OwnedFd};

    use rustix::pipe::{PipeFlags, SpliceFlags};

    /// Pipe size asked for; pipes are only held while bytes move, so this costs nothing idle.
    const PIPE_SIZE: usize = 1024 * 1024;
    /// Linux's default pipe size.
    const DEFAULT_PIPE_SIZE: usize = 64 * 1024;

    /// A non-blocking pipe (read end, write end) and the bytes one splice may move into it.
    pub fn pipe() -> io::Result<(OwnedFd, OwnedFd, usize)> {
        let (read, write) = rustix::pipe::pipe_with(PipeFlags::NONBLOCK | PipeFlags::CLOEXEC)?;
        // A bigger pipe moves more per pair of syscalls; the kernel may grant less.
        let capacity =
            rustix::pipe::fcntl_setpipe_size(&write, PIPE_SIZE).unwrap_or(DEFAULT_PIPE_SIZE);
        Ok((read, write, capacity))
    }

    pub fn splice(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
        let flags = SpliceFlags::MOVE | SpliceFlags::NONBLOCK;
        loop {
            match rustix::pipe::splice(from, None, to, None, len, flags) {
                Err(rustix::io::Errno::INTR) => {}
                moved => return Ok(moved?),
            }
        }
    }
}

/// Elsewhere there is no `splice(2)`: no pipe is ever made, so every chunk goes the buffered
/// way, whatever `proxy.copy` says.
#[cfg(not(any(target_os = "linux", target_os = "android")))]
mod kernel {
    use std::io;
    use std::os::fd::{BorrowedFd, OwnedFd};

    pub fn pipe() -> io::Result<(OwnedFd, OwnedFd, usize)> {
        Err(io::ErrorKind::Unsupported.into())
    }

    pub fn splice(_: BorrowedFd<'_>, _: BorrowedFd<'_>, _: usize) -> io::Result<usize> {
        Err(io::ErrorKind::Unsupported.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A copy that never ends, or never pauses, fails its test within 20 s instead of hanging
    /// it: a broken framing shows that way.
    async fn bounded<T>(test: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(20), test)
            .await
            .expect("the copy's test did not finish within 20 s")
    }

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (a.unwrap(), b.unwrap().0)
    }

    /// client ⇄ [proxy_client | proxy_backend] ⇄ backend, copied by `bidirectional`.
    async fn round_trip(mode: CopyMode) {
        let (mut client, proxy_client) = pair().await;
        let (proxy_backend, mut backend) = pair().await;
        let activity = Activity::new();
        let copier = async {
            let c = Socket::new(proxy_client).unwrap();
            let b = Socket::new(proxy_backend).unwrap();
            bidirectional(&c, &b, mode, &activity, Duration::from_secs(60), None).await
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
        let (copied, (back, echoed)) = bounded(async { tokio::join!(copier, peers) }).await;
        assert_eq!(copied.unwrap(), Ended::Closed);
        assert_eq!(echoed, expected.len());
        assert_eq!(back, expected, "{mode:?}: bytes intact and in order");
        assert_eq!(activity.up.load(Ordering::Relaxed), expected.len() as u64);
        assert_eq!(activity.down.load(Ordering::Relaxed), expected.len() as u64);
    }

    /// Every idle session holds one of these; it must stay small (no buffers, no waiters).
    #[test]
    fn idle_copy_state_is_small() {
        let size = std::mem::size_of::<Bidirectional<'static>>();
        assert!(size <= 256, "Bidirectional is {size} bytes");
    }

    #[tokio::test]
    async fn buffered_copies_both_ways_with_half_close() {
        round_trip(CopyMode::Buffered).await;
    }

    #[tokio::test]
    async fn splice_copies_both_ways_with_half_close() {
        round_trip(CopyMode::Splice).await;
    }

    /// A server that answers with an error and resets while the client is still sending (as
    /// Postgres does when it ends a session mid-COPY): the client still gets the answer.
    #[tokio::test]
    async fn the_last_words_of_a_failing_backend_reach_the_client() {
        let (mut client, proxy_client) = pair().await;
        let (proxy_backend, mut backend) = pair().await;
        let activity = Activity::new();
        let copier = async {
            let c = Socket::new(proxy_client).unwrap();
            let b = Socket::new(proxy_backend).unwrap();
            bidirectional(
                &c,
                &b,
                CopyMode::Auto,
                &activity,
                Duration::from_secs(60),
                None,
            )
            .await
        };
        let server = async move {
            let mut first = [0u8; 1024];
            let _ = backend.read(&mut first).await;
            backend
                .write_all(b"FATAL: terminating connection")
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
            // Unread input at close: the kernel resets the connection.
            let _ = socket2::SockRef::from(&backend).set_linger(Some(Duration::ZERO));
            drop(backend);
        };
        let client_side = async move {
            let (mut read, mut write) = client.split();
            let sender = async {
                let chunk = vec![b'x'; 64 * 1024];
                for _ in 0..256 {
                    if write.write_all(&chunk).await.is_err() {
                        break;
                    }
                }
            };
            let receiver = async {
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                while let Ok(n) = read.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    got.extend_from_slice(&buf[..n]);
                }
                got
            };
            tokio::join!(sender, receiver).1
        };
        let (_, _, got) = bounded(async { tokio::join!(copier, server, client_side) }).await;
        assert_eq!(got, b"FATAL: terminating connection");
    }

    /// After the client's half-close, the backend keeps answering with pauses shorter than
    /// the half-close timeout but longer in all: the session carries on until the backend
    /// closes too. Then the backend goes quiet without closing: the session ends half-open.
    #[tokio::test]
    async fn a_half_closed_session_lives_while_bytes_move_and_ends_when_they_stop() {
        let (mut client, proxy_client) = pair().await;
        let (proxy_backend, mut backend) = pair().await;
        let activity = Activity::new();
        let timeout = Duration::from_secs(2);
        let copier = async {
            let c = Socket::new(proxy_client).unwrap();
            let b = Socket::new(proxy_backend).unwrap();
            bidirectional(&c, &b, CopyMode::Auto, &activity, timeout, None).await
        };
        let peers = async move {
            client.shutdown().await.unwrap();
            for _ in 0..8 {
                backend.write_all(b"row").await.unwrap();
                tokio::time::sleep(timeout / 8).await;
            }
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            (got, backend)
        };
        let (ended, (got, _backend)) = bounded(async { tokio::join!(copier, peers) }).await;
        assert_eq!(ended.unwrap(), Ended::HalfOpen);
        assert_eq!(
            got,
            b"row".repeat(8),
            "every row arrived before the session ended"
        );
    }

    #[test]
    fn bulk_starts_with_big_reads_and_stops_with_small_ones() {
        let cases = [
            // (was bulk, bytes read, bulk after)
            (false, 200, false),   // a query
            (false, 8_192, false), // a row batch
            (false, 32_767, false),
            (false, 32_768, true),
            (false, 65_483, true), // one loopback segment
            (false, 65_536, true), // a full buffer
            (true, 65_483, true),
            (true, 29_696, true), // a splice cut short by the pipe
            (true, 16_384, true),
            (true, 16_383, false),
            (true, 212, false), // the stream went quiet
        ];
        for (was_bulk, n, expected) in cases {
            assert_eq!(
                moving_bulk(was_bulk, n),
                expected,
                "was {was_bulk}, read {n}"
            );
        }
    }

    fn pg_msg(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![kind];
        out.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    fn pg_startup() -> Vec<u8> {
        let body = b"\0\x03\0\0user\0app\0\0";
        let mut out = ((body.len() + 4) as u32).to_be_bytes().to_vec();
        out.extend_from_slice(body);
        out
    }

    fn pg_query(sql: &str) -> Vec<u8> {
        pg_msg(b'Q', &[sql.as_bytes(), b"\0"].concat())
    }

    /// A copy followed by `framing`, in auto mode.
    fn followed<'a>(
        c: &'a Socket,
        b: &'a Socket,
        activity: &'a Activity,
        framing: &'a mut Framing,
    ) -> Bidirectional<'a> {
        let half_close = Duration::from_secs(60);
        bidirectional(c, b, CopyMode::Auto, activity, half_close, Some(framing))
    }

    /// Reads from `stream` until `expected` bytes came, and returns them.
    async fn read_n(stream: &mut TcpStream, expected: usize) -> Vec<u8> {
        let mut got = vec![0u8; expected];
        stream.read_exact(&mut got).await.unwrap();
        got
    }

    /// A followed session asked to end between transactions waits for the transaction's end,
    /// ends right after the server's ReadyForQuery `I`, and never forwards what the client
    /// sends after it.
    #[tokio::test]
    async fn a_followed_session_ends_between_transactions() {
        let (mut client, proxy_client) = pair().await;
        let (proxy_backend, mut backend) = pair().await;
        let activity = Activity::new();
        let mut framing = Framing::new();
        let (in_transaction, mut told) = tokio::sync::oneshot::channel::<()>();
        let copier = async {
            let c = Socket::new(proxy_client).unwrap();
            let b = Socket::new(proxy_backend).unwrap();
            let mut copy = followed(&c, &b, &activity, &mut framing);
            tokio::select! {
                ended = &mut copy => panic!("ended early: {ended:?}"),
                _ = &mut told => {}
            }
            assert!(copy.tracked());
            copy.end_when_idle();
            let ended = (&mut copy).await.unwrap();
            drop(copy);
            (ended, c, b)
        };
        let ready_i = pg_msg(b'Z', b"I");
        let ready_t = pg_msg(b'Z', b"T");
        let peers = async {
            client.write_all(&pg_startup()).await.unwrap();
            read_n(&mut backend, pg_startup().len()).await;
            let welcome = [pg_msg(b'R', &[0, 0, 0, 0]), ready_i.clone()].concat();
            backend.write_all(&welcome).await.unwrap();
            read_n(&mut client, welcome.len()).await;
            let begin = [pg_query("BEGIN"), pg_query("INSERT")].concat();
            client.write_all(&begin).await.unwrap();
            read_n(&mut backend, begin.len()).await;
            let answer = [pg_msg(b'C', b"BEGIN\0"), ready_t.clone()].concat();
            backend.write_all(&answer).await.unwrap();
            read_n(&mut client, answer.len()).await;
            // In a transaction, with the INSERT unanswered: the session must not end here.
            in_transaction.send(()).unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
            let answer = [pg_msg(b'C', b"INSERT 0 1\0"), ready_t.clone()].concat();
            backend.write_all(&answer).await.unwrap();
            read_n(&mut client, answer.len()).await;
            client.write_all(&pg_query("COMMIT")).await.unwrap();
            read_n(&mut backend, pg_query("COMMIT").len()).await;
            let answer = [pg_msg(b'C', b"COMMIT\0"), ready_i.clone()].concat();
            backend.write_all(&answer).await.unwrap();
            read_n(&mut client, answer.len()).await;
            client.write_all(&pg_query("BEGIN")).await.unwrap();
        };
        let ((ended, c, b), ()) = bounded(async { tokio::join!(copier, peers) }).await;
        assert_eq!(ended, Ended::Idle);
        c.send_all(b"bye").await.unwrap();
        drop((c, b));
        let mut rest = Vec::new();
        backend.read_to_end(&mut rest).await.unwrap();
        assert!(
            rest.is_empty(),
            "the BEGIN sent after COMMIT was not forwarded: {rest:?}"
        );
        let mut rest = Vec::new();
        let _ = client.read_to_end(&mut rest).await;
        assert_eq!(rest, b"bye");
    }

    /// A followed session asked to pause waits for its transaction's end, then reads nothing
    /// more from the client: its next query stays in its socket while the backend's own
    /// messages (a notification) still reach the client. Resumed, the query goes through,
    /// whole and in order, and so does everything after it.
    #[tokio::test]
    async fn a_paused_session_keeps_the_clients_bytes_until_it_resumes() {
        let (mut client, proxy_client) = pair().await;
        let (proxy_backend, mut backend) = pair().await;
        let activity = Activity::new();
        let mut framing = Framing::new();
        let (in_transaction, mut told) = tokio::sync::oneshot::channel::<()>();
        let (paused_tx, paused_rx) = tokio::sync::oneshot::channel::<()>();
        let (resume_tx, mut resume_rx) = tokio::sync::oneshot::channel::<()>();
        let ready_i = pg_msg(b'Z', b"I");
        let ready_t = pg_msg(b'Z', b"T");
        let notification = pg_msg(b'A', b"\0\0\0\x07chan\0hi\0");
        let copier = async {
            let c = Socket::new(proxy_client).unwrap();
            let b = Socket::new(proxy_backend).unwrap();
            let mut copy = followed(&c, &b, &activity, &mut framing);
            tokio::select! {
                ended = &mut copy => panic!("ended early: {ended:?}"),
                _ = &mut told => {}
            }
            copy.pause_when_idle();
            let mut paused_tx = Some(paused_tx);
            loop {
                tokio::select! {
                    ended = &mut copy => panic!("a pause never ends the copy: {ended:?}"),
                    _ = tokio::time::sleep(Duration::from_millis(5)), if paused_tx.is_some() => {
                        if copy.paused() {
                            if let Some(tx) = paused_tx.take() {
                                tx.send(()).unwrap();
                            }
                        }
                    }
                    _ = &mut resume_rx => break,
                }
            }
            assert!(copy.paused());
            copy.resume();
            let ended = (&mut copy).await;
            assert!(!copy.paused());
            ended.unwrap()
        };
        let peers = async {
            client.write_all(&pg_startup()).await.unwrap();
            read_n(&mut backend, pg_startup().len()).await;
            backend.write_all(&ready_i).await.unwrap();
            read_n(&mut client, ready_i.len()).await;
            client.write_all(&pg_query("BEGIN")).await.unwrap();
            read_n(&mut backend, pg_query("BEGIN").len()).await;
            backend.write_all(&ready_t).await.unwrap();
            read_n(&mut client, ready_t.len()).await;
            // In a transaction: the pause waits for its end.
            in_transaction.send(()).unwrap();
            client.write_all(&pg_query("COMMIT")).await.unwrap();
            read_n(&mut backend, pg_query("COMMIT").len()).await;
            backend.write_all(&ready_i).await.unwrap();
            read_n(&mut client, ready_i.len()).await;
            paused_rx.await.unwrap();
            client.write_all(&pg_query("SELECT 1")).await.unwrap();
            backend.write_all(&notification).await.unwrap();
            assert_eq!(
                read_n(&mut client, notification.len()).await,
                notification,
                "the backend's side flows while paused"
            );
            let mut early = [0u8; 1];
            let held =
                tokio::time::timeout(Duration::from_millis(200), backend.read(&mut early)).await;
            assert!(
                held.is_err(),
                "nothing the client sent reached the backend: {held:?}"
            );
            resume_tx.send(()).unwrap();
            client.write_all(&pg_query("SELECT 2")).await.unwrap();
            let expected = [pg_query("SELECT 1"), pg_query("SELECT 2")].concat();
            assert_eq!(read_n(&mut backend, expected.len()).await, expected);
            client.shutdown().await.unwrap();
            backend.shutdown().await.unwrap();
        };
        let (ended, ()) = bounded(async { tokio::join!(copier, peers) }).await;
        assert_eq!(ended, Ended::Closed);
    }

    /// Splicing a followed session stops at each header, so the framing keeps count over a
    /// large result of messages of every size, and the bytes are intact.
    #[tokio::test]
    async fn splicing_a_followed_session_keeps_count() {
        for mode in [CopyMode::Splice, CopyMode::Auto] {
            let (mut client, proxy_client) = pair().await;
            let (proxy_backend, mut backend) = pair().await;
            let activity = Activity::new();
            let mut framing = Framing::new();
            let mut result = Vec::new();
            result.extend(pg_msg(b'R', &[0, 0, 0, 0]));
            result.extend(pg_msg(b'Z', b"I"));
            for i in 0..400usize {
                let size = [3, 70_000, 900, 300_000, 17][i % 5] + i;
                let body: Vec<u8> = (0..size).map(|j| (i + j) as u8).collect();
                result.extend(pg_msg(b'D', &body));
            }
            result.extend(pg_msg(b'C', b"SELECT 400\0"));
            result.extend(pg_msg(b'Z', b"I"));
            let expected = result.clone();
            let copier = async {
                let c = Socket::new(proxy_client).unwrap();
                let b = Socket::new(proxy_backend).unwrap();
                bidirectional(
                    &c,
                    &b,
                    mode,
                    &activity,
                    Duration::from_secs(60),
                    Some(&mut framing),
                )
                .await
            };
            let peers = async move {
                let send = async {
                    client.write_all(&pg_startup()).await.unwrap();
                    client.write_all(&pg_query("SELECT big")).await.unwrap();
                    client.shutdown().await.unwrap();
                    let mut back = Vec::new();
                    client.read_to_end(&mut back).await.unwrap();
                    back
                };
                let serve = async {
                    let mut got = Vec::new();
                    backend.read_to_end(&mut got).await.unwrap();
                    backend.write_all(&result).await.unwrap();
                    backend.shutdown().await.unwrap();
                };
                tokio::join!(send, serve).0
            };
            let (copied, back) = bounded(async { tokio::join!(copier, peers) }).await;
            assert_eq!(copied.unwrap(), Ended::Closed);
            assert!(back == expected, "{mode:?}: bytes intact");
            assert!(framing.tracked(), "{mode:?}: still followed");
            assert!(framing.idle(), "{mode:?}: idle after the result");
        }
    }

    #[tokio::test]
    async fn auto_copies_both_ways_with_half_close() {
        round_trip(CopyMode::Auto).await;
    }
}
