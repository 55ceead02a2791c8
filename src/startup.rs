//! A client's startup, held until the backend answers it, so a failing leader's answer never
//! reaches the client (rule 11).
//!
//! A Postgres client opens with at most an SSLRequest and a GSSENCRequest, each answered by
//! one byte, then its StartupMessage (or a CancelRequest). Until the backend has sent anything
//! past an `N`, the client has learned nothing a different backend would not also tell it, so
//! the proxy keeps what the client sent ([`Startup`]): a backend that closes, resets or answers
//! `57P03` (shutting down, starting up, in recovery) then has failed only this attempt, and the
//! same packets are replayed to the next leader. The client sees one slower startup instead of
//! an error.
//!
//! What is never held: a CancelRequest (Postgres answers it with a close, which is its answer),
//! a packet that is not a startup packet (the backend judges it, as it would without a proxy),
//! an encryption request answered `S` or `G` (inside TLS or GSSAPI the proxy cannot see the
//! answer, so from there on the session is copied as it is). Memory stays bounded: at most
//! three packets, each at most [`pgwire::MAX_STARTUP_LEN`], and one first answer of at most
//! `FIRST_ANSWER_MAX` bytes.

use std::future::Future;
use std::io;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use roleproxy_core::framing::{Framing, Side};
use roleproxy_core::pgwire::{self, StartupPacket};
use roleproxy_core::route::Liveness;

use crate::pgwire_io;

/// A client asks for GSS and SSL encryption at most once each, then starts up.
const MAX_PACKETS: usize = 3;
/// Bytes read from a backend for its first answer: a postmaster's ErrorResponse is far
/// smaller, and an authentication request comes in its first bytes.
const FIRST_ANSWER_MAX: usize = 8192;

/// What the client and the backend said before the session's bytes were copied: the framing
/// that followed it (when the session is followed) and the bytes each way, for the counters.
pub struct Started {
    pub framing: Option<Framing>,
    /// Client → backend.
    pub up: u64,
    /// Backend → client.
    pub down: u64,
}

/// Why a backend failed a startup, in a way the next leader may not.
#[derive(Debug, thiserror::Error)]
pub enum Failed {
    /// Closed or reset before answering.
    #[error("closed the connection during the client's startup: {0}")]
    Closed(io::Error),
    /// Answered 57P03: shutting down, starting up, or in recovery.
    #[error("refused the client's startup: {0}")]
    Refusing(String),
    /// Did not answer a replayed packet within the client's `leader_wait`.
    #[error("did not answer the client's startup in time")]
    TimedOut,
}

impl Failed {
    /// The `reason` label of the retry counter.
    pub fn label(&self) -> &'static str {
        match self {
            Failed::Closed(_) => "closed",
            Failed::Refusing(_) => "refusing",
            Failed::TimedOut => "timed_out",
        }
    }
}

/// What one startup attempt on a backend came to.
pub enum Attempt {
    /// The backend answered, or the session can no longer be held (TLS, a CancelRequest, not a
    /// startup packet, or the client's time to be held is up): copy it from here.
    Started(Started),
    /// The backend failed the startup before the client learned anything from it.
    Failed(Failed),
    /// The route left this backend before it answered; nothing reached the client.
    Abandoned,
    /// Replayed, this backend answered an encryption request other than with the `N` the
    /// client was given: the client cannot be handed to it.
    Unreplayable,
    /// The client closed, or did not send its next packet within the silent timeout.
    ClientGone(io::Error),
}

/// The client's startup packets so far, to replay on the next backend.
pub struct Startup {
    /// In the order sent; every packet but the last was an encryption request answered `N`.
    packets: Vec<Vec<u8>>,
    /// How many packets the client has had answered (each with an `N`).
    answered: usize,
    /// The backend's first answer to the last packet, forwarded once the attempt succeeds.
    answer: Vec<u8>,
}

/// What kind of startup packet a client sent, as far as holding it goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// SSLRequest or GSSENCRequest: answered with one byte.
    Encryption,
    /// A StartupMessage: answered with authentication, or an error.
    Startup,
    /// A CancelRequest, or not a startup packet: never held.
    Other,
}

fn kind(packet: &[u8]) -> Kind {
    match packet.get(4..).map(pgwire::parse_startup) {
        Some(Ok(StartupPacket::SslRequest | StartupPacket::GssEncRequest)) => Kind::Encryption,
        Some(Ok(StartupPacket::Startup { .. })) => Kind::Startup,
        _ => Kind::Other,
    }
}

impl Startup {
    /// A client whose first packet is `first`.
    pub fn new(first: Vec<u8>) -> Startup {
        Startup {
            packets: vec![first],
            answered: 0,
            answer: Vec::new(),
        }
    }

    /// The bytes of the packets the client is still waiting to have answered: what the
    /// proxy reads again to refuse it in its own words.
    pub fn unanswered(&self) -> Vec<u8> {
        self.packets[self.answered..].concat()
    }

    /// Sends the client's first packet and nothing more: a session that is not held,
    /// followed by `framing` if it is given one.
    pub async fn forward<B: AsyncWrite + Unpin>(
        &self,
        backend: &mut B,
        framing: Option<Framing>,
    ) -> io::Result<Started> {
        backend.write_all(&self.packets[0]).await?;
        Ok(self.started(framing))
    }

    /// Runs the startup on `backend`: replays what the client sent before, then carries on
    /// with its next packets until the backend answers the last one. Gives up on the backend
    /// when `left` (the route left it) ends first; stops holding at `deadline` (the client's
    /// `leader_wait`); waits at most `silent` for each of the client's packets.
    pub async fn attempt<C, B>(
        &mut self,
        client: &mut C,
        backend: &mut B,
        left: impl Future<Output = ()>,
        deadline: Instant,
        silent: Duration,
        follow: bool,
    ) -> Attempt
    where
        C: AsyncRead + AsyncWrite + Unpin,
        B: AsyncRead + AsyncWrite + Unpin,
    {
        let mut left = std::pin::pin!(left);
        self.answer.clear();
        let mut next = 0;
        loop {
            if next == self.packets.len() {
                // The client has its `N` and speaks next.
                if self.packets.len() == MAX_PACKETS {
                    return Attempt::Started(self.started(follow.then(Framing::new)));
                }
                let packet =
                    tokio::time::timeout(silent, pgwire_io::read_first_packet(client)).await;
                match packet {
                    Ok(Ok(packet)) => self.packets.push(packet),
                    Ok(Err(e)) => return Attempt::ClientGone(e),
                    Err(_) => return Attempt::ClientGone(io::ErrorKind::TimedOut.into()),
                }
            }
            let packet = &self.packets[next];
            let kind = kind(packet);
            let written = backend.write_all(packet).await;
            if kind == Kind::Other {
                // Never held, so never retried: the copy meets a failed write next.
                return Attempt::Started(self.started(follow.then(Framing::new)));
            }
            if let Err(e) = written {
                return Attempt::Failed(Failed::Closed(e));
            }
            let replayed = next < self.answered;
            let read = tokio::select! {
                read = first_answer(backend, kind, &mut self.answer) => Some(read),
                _ = &mut left => return Attempt::Abandoned,
                _ = tokio::time::sleep_until(deadline) => None,
            };
            let Some(read) = read else {
                self.answer.clear();
                if replayed {
                    // The client has its answer to this packet already: past its time, this
                    // backend is given up, not handed over.
                    return Attempt::Failed(Failed::TimedOut);
                }
                // Held long enough: copied from here, whatever comes.
                return Attempt::Started(self.started(follow.then(Framing::new)));
            };
            if let Err(failed) = read {
                self.answer.clear();
                return Attempt::Failed(failed);
            }
            if kind == Kind::Encryption && self.answer == b"N" {
                self.answer.clear();
                if !replayed {
                    if let Err(e) = client.write_all(b"N").await {
                        return Attempt::ClientGone(e);
                    }
                    self.answered += 1;
                }
                next += 1;
                continue;
            }
            if replayed {
                return Attempt::Unreplayable;
            }
            if let Err(e) = client.write_all(&self.answer).await {
                return Attempt::ClientGone(e);
            }
            return Attempt::Started(self.started(follow.then(Framing::new)));
        }
    }

    /// What was said, read by `framing` (when the session is followed) in the order it was
    /// said.
    fn started(&self, mut framing: Option<Framing>) -> Started {
        let mut up = 0;
        for (i, packet) in self.packets.iter().enumerate() {
            up += packet.len() as u64;
            if let Some(framing) = framing.as_mut() {
                framing.observe(Side::Client, packet);
                if i < self.answered {
                    framing.observe(Side::Server, b"N");
                }
            }
        }
        if let Some(framing) = framing.as_mut() {
            framing.observe(Side::Server, &self.answer);
        }
        Started {
            framing,
            up,
            down: (self.answered + self.answer.len()) as u64,
        }
    }
}

/// Reads a backend's answer to an encryption request (its first read) or to a StartupMessage
/// (until its first message says what it is) into `answer`. A close or reset before any
/// answer, or 57P03, is a failure; anything else is the answer, to be forwarded as read.
async fn first_answer<B: AsyncRead + Unpin>(
    backend: &mut B,
    kind: Kind,
    answer: &mut Vec<u8>,
) -> Result<(), Failed> {
    answer.clear();
    let mut chunk = [0u8; 512];
    loop {
        let room = (FIRST_ANSWER_MAX - answer.len()).min(chunk.len());
        let n = match backend.read(&mut chunk[..room]).await {
            Ok(0) if answer.is_empty() => {
                return Err(Failed::Closed(io::ErrorKind::UnexpectedEof.into()))
            }
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if answer.is_empty() => return Err(Failed::Closed(e)),
            // What came before the error is still the answer; the copy meets the error next.
            Err(_) => return Ok(()),
        };
        answer.extend_from_slice(&chunk[..n]);
        if kind == Kind::Encryption || answer.len() == FIRST_ANSWER_MAX {
            return Ok(());
        }
        match pgwire::read_liveness(answer) {
            None => continue,
            Some(Liveness::Refusing(why)) => return Err(Failed::Refusing(why)),
            Some(_) => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use roleproxy_core::pgwire::{message, packet};
    use tokio::io::duplex;

    fn ssl() -> Vec<u8> {
        packet(80_877_103, b"")
    }

    fn startup() -> Vec<u8> {
        packet(3 << 16, b"user\0app\0\0")
    }

    fn cancel() -> Vec<u8> {
        packet(80_877_102, &[0, 0, 0, 1, 0, 0, 0, 2])
    }

    fn welcome() -> Vec<u8> {
        [message(b'R', &[0, 0, 0, 0]), message(b'Z', b"I")].concat()
    }

    /// One attempt with a route that never leaves and a client with all the time it needs.
    async fn try_on(
        state: &mut Startup,
        client: &mut tokio::io::DuplexStream,
        backend: &mut tokio::io::DuplexStream,
        follow: bool,
    ) -> Attempt {
        let far = Instant::now() + Duration::from_secs(600);
        let silent = Duration::from_secs(5);
        let left = std::future::pending();
        state
            .attempt(client, backend, left, far, silent, follow)
            .await
    }

    /// A backend that, for each step, reads that many bytes and then sends its answer (or
    /// closes, if the answer is empty); returns what it read.
    async fn backend(mut end: tokio::io::DuplexStream, steps: Vec<(usize, Vec<u8>)>) -> Vec<u8> {
        let mut got = Vec::new();
        for (expect, answer) in steps {
            let mut buf = vec![0u8; expect];
            if end.read_exact(&mut buf).await.is_err() {
                return got;
            }
            got.extend(buf);
            if answer.is_empty() {
                return got;
            }
            end.write_all(&answer).await.unwrap();
        }
        got
    }

    #[test]
    fn kinds() {
        assert_eq!(kind(&ssl()), Kind::Encryption);
        assert_eq!(kind(&startup()), Kind::Startup);
        assert_eq!(kind(&cancel()), Kind::Other);
        assert_eq!(kind(&[0x16, 3, 1, 0]), Kind::Other, "a TLS ClientHello");
    }

    /// SSLRequest (answered `N`), StartupMessage, then the backend shuts down (57P03): the
    /// client has its `N` and nothing else; replayed on the next backend, which answers `N`
    /// again, the client gets the new backend's welcome and a framing that followed it all.
    #[tokio::test]
    async fn a_refused_startup_is_replayed_on_the_next_backend() {
        let (mut client, mut client_end) = duplex(64 * 1024);
        let mut startup_state = Startup::new(ssl());
        let refusing = pgwire::error_response("57P03", "the database system is shutting down");

        let (mut first, first_end) = duplex(64 * 1024);
        let first_backend = tokio::spawn(backend(
            first_end,
            vec![(8, b"N".to_vec()), (startup().len(), refusing)],
        ));
        let client_side = async {
            let mut n = [0u8; 1];
            client.read_exact(&mut n).await.unwrap();
            assert_eq!(&n, b"N");
            client.write_all(&startup()).await.unwrap();
        };
        let (attempt, ()) = tokio::join!(
            try_on(&mut startup_state, &mut client_end, &mut first, true),
            client_side,
        );
        assert!(
            matches!(attempt, Attempt::Failed(Failed::Refusing(ref why)) if why == "57P03 (cannot connect now)")
        );
        assert_eq!(first_backend.await.unwrap(), [ssl(), startup()].concat());

        let (mut second, second_end) = duplex(64 * 1024);
        let second_backend = tokio::spawn(backend(
            second_end,
            vec![(8, b"N".to_vec()), (startup().len(), welcome())],
        ));
        let attempt = try_on(&mut startup_state, &mut client_end, &mut second, true).await;
        let Attempt::Started(started) = attempt else {
            panic!("served by the second backend");
        };
        assert_eq!(second_backend.await.unwrap(), [ssl(), startup()].concat());
        let framing = started.framing.expect("followed");
        assert!(framing.idle(), "the framing saw the whole startup");
        assert_eq!(started.up, (ssl().len() + startup().len()) as u64);
        assert_eq!(started.down, (1 + welcome().len()) as u64);
        drop(client_end);
        let mut seen = Vec::new();
        client.read_to_end(&mut seen).await.unwrap();
        assert_eq!(seen, welcome(), "one N (already read), then the welcome");
    }

    /// A replayed SSLRequest answered `S` cannot be handed to a client that was told `N`.
    #[tokio::test]
    async fn a_replay_answered_with_tls_is_not_handed_over() {
        let (_client, mut client_end) = duplex(1024);
        let mut state = Startup {
            packets: vec![ssl(), startup()],
            answered: 1,
            answer: Vec::new(),
        };
        let (mut backend_side, backend_end) = duplex(1024);
        let _backend = tokio::spawn(backend(backend_end, vec![(8, b"S".to_vec())]));
        let attempt = try_on(&mut state, &mut client_end, &mut backend_side, true).await;
        assert!(matches!(attempt, Attempt::Unreplayable));
        assert_eq!(
            state.unanswered(),
            startup(),
            "the client waits on its StartupMessage"
        );
    }

    /// A backend that closes before answering fails the attempt; one that answers anything
    /// else, or a CancelRequest, starts the session.
    #[tokio::test]
    async fn closes_fail_and_answers_start() {
        // (what, the client's first packet, what the backend reads and answers, outcome)
        type Case = (&'static str, Vec<u8>, Vec<(usize, Vec<u8>)>, &'static str);
        let cases: Vec<Case> = vec![
            (
                "closed",
                startup(),
                vec![(startup().len(), vec![])],
                "failed",
            ),
            (
                "too many clients",
                startup(),
                vec![(startup().len(), pgwire::error_response("53300", "full"))],
                "started",
            ),
            (
                "welcome",
                startup(),
                vec![(startup().len(), welcome())],
                "started",
            ),
            (
                "not postgres",
                startup(),
                vec![(startup().len(), b"hello\n".to_vec())],
                "started",
            ),
            (
                "cancel",
                cancel(),
                vec![(cancel().len(), vec![])],
                "started",
            ),
        ];
        for (what, first, steps, expected) in cases {
            let (_client, mut client_end) = duplex(64 * 1024);
            let (mut backend_side, backend_end) = duplex(64 * 1024);
            let _backend = tokio::spawn(backend(backend_end, steps));
            let attempt = try_on(
                &mut Startup::new(first),
                &mut client_end,
                &mut backend_side,
                false,
            )
            .await;
            let got = match attempt {
                Attempt::Started(_) => "started",
                Attempt::Failed(_) => "failed",
                _ => "other",
            };
            assert_eq!(got, expected, "{what}");
        }
    }

    /// The route leaving the backend abandons the attempt; nothing reaches the client.
    #[tokio::test]
    async fn an_attempt_is_abandoned_when_the_route_leaves() {
        let (mut client, mut client_end) = duplex(1024);
        let (mut backend_side, _silent) = duplex(1024);
        let attempt = Startup::new(startup())
            .attempt(
                &mut client_end,
                &mut backend_side,
                std::future::ready(()),
                Instant::now() + Duration::from_secs(600),
                Duration::from_secs(5),
                false,
            )
            .await;
        assert!(matches!(attempt, Attempt::Abandoned));
        drop(client_end);
        let mut seen = Vec::new();
        client.read_to_end(&mut seen).await.unwrap();
        assert!(seen.is_empty());
    }
}
