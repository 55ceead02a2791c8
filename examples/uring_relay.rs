//! A measurement, not a proxy: the cheapest way this machine can forward established TCP
//! sessions in user space with io_uring, to see how far that road can go before building it
//! into roleproxy (`benches/compare.rs --variants uring-relay` runs it beside the others;
//! docs/performance.md has what it measured).
//!
//! Each session is a client socket and a backend socket, with one buffer per direction: a receive on one side, when it completes, becomes a send of those bytes on
//! the other, and only once the send has completed is the next receive armed, so a reader that
//! stops reading stops its writer (back-pressure, as in a buffered copy). Completions are
//! reaped in batches: under concurrency one `io_uring_enter` serves many sessions, where an
//! epoll proxy pays a wake-up and a `read` and a `write` for each message. No routing, no
//! framing, no drain: an upper bound for the road, which a real session path can only reach
//! from below.
//!
//! One thread and one ring per worker (the third argument; 2 by default, one per CPU here, as
//! roleproxy's workers), each with its own listening socket on the same port (`SO_REUSEPORT`), and each
//! ring set up for a single issuer that runs the kernel's completion work only when it asks
//! for completions (`DEFER_TASKRUN`), so no completion interrupts the thread mid-batch.
//!
//!     cargo run --release --example uring_relay -- LISTEN BACKEND [WORKERS]

#[cfg(target_os = "linux")]
fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(backend)) = (args.next(), args.next()) else {
        eprintln!("usage: uring_relay LISTEN BACKEND");
        std::process::exit(2);
    };
    let parse = |text: String| {
        text.parse::<std::net::SocketAddr>()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
    };
    let workers: usize = args.next().and_then(|w| w.parse().ok()).unwrap_or(2);
    let (listen, backend) = (parse(listen)?, parse(backend)?);
    let threads: Vec<_> = (0..workers)
        .map(|_| std::thread::spawn(move || relay::run(listen, backend)))
        .collect();
    for thread in threads {
        thread
            .join()
            .map_err(|_| std::io::Error::other("a worker panicked"))??;
    }
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn main() {
    eprintln!("uring_relay: io_uring is Linux's");
    std::process::exit(2);
}

#[cfg(target_os = "linux")]
mod relay {
    use std::io;
    use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
    use std::os::fd::AsRawFd;

    use io_uring::{opcode, types, IoUring};

    /// Bytes one receive may bring: a pgbench `-S` exchange is far smaller.
    const BUFFER: usize = 16 * 1024;
    const ACCEPT: u64 = u64::MAX;

    /// One direction of a session: the socket it reads, the one it writes, and the bytes
    /// received and not yet sent.
    struct Direction {
        buffer: Box<[u8]>,
        sent: usize,
        received: usize,
        /// Its reader saw end of file (or an error): nothing more is armed.
        done: bool,
    }

    struct Session {
        sockets: [TcpStream; 2],
        directions: [Direction; 2],
        /// Operations the kernel still holds, which point into the buffers: the session is
        /// freed only once none is left.
        in_flight: u32,
    }

    /// `user_data`: the session's slot, the direction, and whether it is the send.
    fn tag(slot: usize, direction: usize, send: bool) -> u64 {
        ((slot as u64) << 2) | ((direction as u64) << 1) | u64::from(send)
    }

    pub fn run(listen: SocketAddr, backend: SocketAddr) -> io::Result<()> {
        let listener = reuse_port_listener(listen)?;
        let mut ring: IoUring = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .build(4096)?;
        let mut sessions: Vec<Option<Session>> = Vec::new();
        let mut queue: Vec<io_uring::squeue::Entry> = Vec::new();
        let accept = opcode::Accept::new(
            types::Fd(listener.as_raw_fd()),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        )
        .build()
        .user_data(ACCEPT);
        queue.push(accept.clone());
        loop {
            {
                let mut submission = ring.submission();
                for entry in queue.drain(..) {
                    // SAFETY: every entry points into a buffer of a session kept in
                    // `sessions` until its `in_flight` count is back to zero.
                    unsafe { submission.push(&entry) }
                        .map_err(|_| io::Error::other("submission queue full"))?;
                }
            }
            ring.submit_and_wait(1)?;
            let completions: Vec<(u64, i32)> = ring
                .completion()
                .map(|c| (c.user_data(), c.result()))
                .collect();
            for (data, result) in completions {
                if data == ACCEPT {
                    queue.push(accept.clone());
                    if result >= 0 {
                        start(result, backend, &mut sessions, &mut queue);
                    }
                    continue;
                }
                let slot = (data >> 2) as usize;
                let direction = ((data >> 1) & 1) as usize;
                let Some(session) = sessions.get_mut(slot).and_then(Option::as_mut) else {
                    continue;
                };
                session.in_flight -= 1;
                if data & 1 == 0 {
                    received(session, slot, direction, result, &mut queue);
                } else {
                    sent(session, slot, direction, result, &mut queue);
                }
                if session.in_flight == 0 {
                    sessions[slot] = None;
                }
            }
        }
    }

    /// A listening socket that shares its port with the other workers' (`SO_REUSEPORT`): the
    /// kernel spreads the connections between them.
    fn reuse_port_listener(listen: SocketAddr) -> io::Result<TcpListener> {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(listen),
            socket2::Type::STREAM,
            None,
        )?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.bind(&listen.into())?;
        socket.listen(1024)?;
        Ok(socket.into())
    }

    /// A client accepted as descriptor `fd`: connects its backend and arms both receives.
    fn start(
        fd: i32,
        backend: SocketAddr,
        sessions: &mut Vec<Option<Session>>,
        queue: &mut Vec<io_uring::squeue::Entry>,
    ) {
        use std::os::fd::FromRawFd;
        // SAFETY: the kernel just gave this descriptor to us alone, in the accept's result.
        let client = unsafe { TcpStream::from_raw_fd(fd) };
        let Ok(server) = TcpStream::connect(backend) else {
            return;
        };
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        let direction = || Direction {
            buffer: vec![0u8; BUFFER].into_boxed_slice(),
            sent: 0,
            received: 0,
            done: false,
        };
        let session = Session {
            sockets: [client, server],
            directions: [direction(), direction()],
            in_flight: 0,
        };
        let slot = match sessions.iter().position(Option::is_none) {
            Some(free) => free,
            None => {
                sessions.push(None);
                sessions.len() - 1
            }
        };
        let session = sessions[slot].insert(session);
        for d in 0..2 {
            arm_receive(session, slot, d, queue);
        }
    }

    fn arm_receive(
        session: &mut Session,
        slot: usize,
        d: usize,
        queue: &mut Vec<io_uring::squeue::Entry>,
    ) {
        let fd = session.sockets[d].as_raw_fd();
        let buffer = &mut session.directions[d].buffer;
        queue.push(
            opcode::Recv::new(types::Fd(fd), buffer.as_mut_ptr(), buffer.len() as u32)
                .build()
                .user_data(tag(slot, d, false)),
        );
        session.in_flight += 1;
    }

    fn arm_send(
        session: &mut Session,
        slot: usize,
        d: usize,
        queue: &mut Vec<io_uring::squeue::Entry>,
    ) {
        let fd = session.sockets[1 - d].as_raw_fd();
        let direction = &session.directions[d];
        let pending = &direction.buffer[direction.sent..direction.received];
        queue.push(
            opcode::Send::new(types::Fd(fd), pending.as_ptr(), pending.len() as u32)
                .flags(libc::MSG_NOSIGNAL)
                .build()
                .user_data(tag(slot, d, true)),
        );
        session.in_flight += 1;
    }

    fn received(
        session: &mut Session,
        slot: usize,
        d: usize,
        result: i32,
        queue: &mut Vec<io_uring::squeue::Entry>,
    ) {
        if result > 0 {
            session.directions[d].sent = 0;
            session.directions[d].received = result as usize;
            arm_send(session, slot, d, queue);
            return;
        }
        // End of file (or an error): pass the half-close on; both gone, close the session.
        session.directions[d].done = true;
        let _ = session.sockets[1 - d].shutdown(Shutdown::Write);
        if session.directions.iter().all(|dir| dir.done) {
            for socket in &session.sockets {
                let _ = socket.shutdown(Shutdown::Both);
            }
        }
    }

    fn sent(
        session: &mut Session,
        slot: usize,
        d: usize,
        result: i32,
        queue: &mut Vec<io_uring::squeue::Entry>,
    ) {
        if result <= 0 {
            // The peer is gone: end both directions; pending receives complete with 0.
            session.directions[d].done = true;
            for socket in &session.sockets {
                let _ = socket.shutdown(Shutdown::Both);
            }
            return;
        }
        let direction = &mut session.directions[d];
        direction.sent += result as usize;
        if direction.sent < direction.received {
            arm_send(session, slot, d, queue);
        } else {
            arm_receive(session, slot, d, queue);
        }
    }
}
