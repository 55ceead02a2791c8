//! A raw TCP backend for throughput and memory benchmarks, standing in for a node's Postgres.
//!
//! Each connection starts with one command: `D` + u64 (send that many bytes, then close the
//! write side), `U` + u64 (read that many bytes, then answer `K`), or [`IDLE`] (hold the
//! connection open, idle, until the client closes it). Clients speak first, as Postgres
//! clients do.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::TaskGuard;

const BLOCK: usize = 256 * 1024;

/// The command of a connection that stays idle until the client closes it.
pub const IDLE: [u8; 9] = *b"I\0\0\0\0\0\0\0\0";

pub struct BulkBackend {
    addr: SocketAddr,
    _task: TaskGuard,
}

impl BulkBackend {
    pub async fn start(addr: SocketAddr) -> BulkBackend {
        let listener = crate::bind_with_retry("bulk backend", || TcpListener::bind(addr)).await;
        let addr = listener.local_addr().expect("bound address");
        let task = TaskGuard::spawn(crate::accept_loop(listener, |stream| async move {
            let _ = serve(stream).await;
        }));
        BulkBackend { addr, _task: task }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

async fn serve(mut stream: TcpStream) -> std::io::Result<()> {
    let _ = stream.set_nodelay(true);
    let mut command = [0u8; 9];
    if stream.read_exact(&mut command).await.is_err() {
        return Ok(()); // idle connection closed by the client
    }
    let len = u64::from_be_bytes(command[1..].try_into().unwrap_or([0; 8]));
    let mut block = vec![0u8; BLOCK];
    match command[0] {
        b'D' => {
            let mut left = len;
            while left > 0 {
                let n = left.min(BLOCK as u64) as usize;
                stream.write_all(&block[..n]).await?;
                left -= n as u64;
            }
            stream.shutdown().await?;
            // Wait for the client's close so its last bytes are not reset.
            let _ = stream.read(&mut block).await;
        }
        b'U' => {
            let mut left = len;
            while left > 0 {
                let n = stream.read(&mut block).await?;
                if n == 0 {
                    break;
                }
                left = left.saturating_sub(n as u64);
            }
            stream.write_all(b"K").await?;
        }
        b'I' => {
            let _ = stream.read(&mut block).await;
        }
        _ => {}
    }
    Ok(())
}

/// Downloads `len` bytes through `addr`; returns the transfer time.
pub fn download(addr: SocketAddr, len: u64) -> std::io::Result<Duration> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.set_nodelay(true)?;
    let mut command = vec![b'D'];
    command.extend_from_slice(&len.to_be_bytes());
    let started = Instant::now();
    stream.write_all(&command)?;
    let mut block = vec![0u8; BLOCK];
    let mut got = 0u64;
    loop {
        let n = stream.read(&mut block)?;
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    if got != len {
        return Err(std::io::Error::other(format!("got {got} of {len} bytes")));
    }
    Ok(started.elapsed())
}

/// Uploads `len` bytes through `addr`; returns the time until the backend confirmed them.
pub fn upload(addr: SocketAddr, len: u64) -> std::io::Result<Duration> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.set_nodelay(true)?;
    let mut command = vec![b'U'];
    command.extend_from_slice(&len.to_be_bytes());
    let started = Instant::now();
    stream.write_all(&command)?;
    let block = vec![0u8; BLOCK];
    let mut left = len;
    while left > 0 {
        let n = left.min(BLOCK as u64) as usize;
        stream.write_all(&block[..n])?;
        left -= n as u64;
    }
    let mut ack = [0u8; 1];
    stream.read_exact(&mut ack)?;
    Ok(started.elapsed())
}
