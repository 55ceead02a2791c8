//! The Postgres check's own client: just enough of the protocol to ask a node one question as
//! one user, and nothing a node can use to take a credential or the memory.
//!
//! - With `check.tls`, an SSLRequest first; a node that answers `N` fails the check.
//! - A StartupMessage, then SCRAM-SHA-256 or no password at all (`trust`). A node that asks
//!   for a cleartext or MD5 password, or anything else, gets nothing: those would hand the
//!   password, or a hash as good as the password, to whatever address DNS named.
//! - SCRAM's key derivation runs on a blocking thread, and only for an iteration count of at
//!   most [`MAX_SCRAM_ITERATIONS`]: the node chooses it, and could make every check burn CPU.
//! - One simple Query, its first row read as text, then Terminate.
//! - Every message's length is checked before its body is read: at most [`MAX_MESSAGE`] bytes
//!   each and [`MAX_EXCHANGE`] in all, so a node that streams fails the check and never costs
//!   more memory than that.

use std::io;
use std::sync::Arc;

use bytes::{BufMut, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256};
use postgres_protocol::message::backend::{ErrorResponseBody, Message};
use postgres_protocol::message::frontend;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use roleproxy_core::pgwire;

/// The largest message the check reads. Postgres' answers to it are far smaller: an
/// authentication request is under 100 bytes, a ParameterStatus or an ErrorResponse a few
/// hundred, the one row under 50.
pub const MAX_MESSAGE: usize = 8 * 1024;

/// The most the check reads from a node in one exchange. A whole successful one is under
/// 1 KiB (about 15 ParameterStatus messages, the row, a few headers).
pub const MAX_EXCHANGE: usize = 64 * 1024;

/// The most SCRAM iterations the check computes. Postgres uses 4096 (`scram_iterations`, a
/// setting from Postgres 16 on); 100,000 takes tens of milliseconds of one core.
pub const MAX_SCRAM_ITERATIONS: u32 = 100_000;

/// Reads are buffered this much, within [`MAX_EXCHANGE`].
const READ_BUFFER: usize = 4096;

/// Shown in `pg_stat_activity` and the server's log.
const APPLICATION_NAME: &str = "roleproxy-check";

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum PgClientError {
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The node asked for a way of authenticating that the check refuses.
    #[error("node asked for {0}; the check answers SCRAM-SHA-256 only")]
    Refused(&'static str),
    #[error("node offers SASL mechanisms {0:?}, and the check answers SCRAM-SHA-256 only")]
    NoScram(Vec<String>),
    #[error("node asked for a password, and check.password is empty")]
    NoPassword,
    #[error(
        "node asks for {0} SCRAM iterations, more than the check's limit of {MAX_SCRAM_ITERATIONS}"
    )]
    TooManyIterations(u32),
    #[error("SCRAM: {0}")]
    Scram(String),
    #[error("node sent a message of {0} bytes; the check reads at most {MAX_MESSAGE}")]
    MessageTooLarge(usize),
    #[error("node sent more than {MAX_EXCHANGE} bytes")]
    TooMuch,
    #[error("node does not offer TLS, which check.tls requires")]
    NoTls,
    #[error("TLS: {0}")]
    Tls(io::Error),
    /// An ErrorResponse, named by its SQLSTATE and a reason of ours: the server's own message
    /// is not kept, since any node DNS names can send one, and it would reach the log and
    /// `/status`.
    #[error("{}", pgwire::server_error(code))]
    Server { code: String },
    #[error("not a Postgres answer: {0}")]
    Protocol(String),
}

impl PgClientError {
    /// The SQLSTATE of a server's error.
    pub fn code(&self) -> Option<&str> {
        match self {
            PgClientError::Server { code } => Some(code),
            _ => None,
        }
    }
}

/// Who the check connects as.
pub struct Login<'a> {
    pub user: &'a str,
    pub password: &'a str,
    pub database: &'a str,
}

/// Connects as `login` over `stream`, encrypted first when `tls` is given, runs `query` and
/// returns its first row as text (`None` for NULL).
pub async fn query_row(
    mut stream: TcpStream,
    tls: Option<&Tls>,
    login: &Login<'_>,
    query: &str,
) -> Result<Vec<Option<String>>, PgClientError> {
    let Some(tls) = tls else {
        return exchange(BufReader::with_capacity(READ_BUFFER, stream), login, query).await;
    };
    let mut request = BytesMut::new();
    frontend::ssl_request(&mut request);
    stream.write_all(&request).await?;
    // Exactly one byte before the handshake: anything a node sends with its `S` would otherwise
    // be read as if it came inside TLS.
    match stream.read_u8().await? {
        b'S' => {}
        b'N' => return Err(PgClientError::NoTls),
        other => {
            return Err(PgClientError::Protocol(format!(
                "answered the SSLRequest with 0x{other:02x}"
            )))
        }
    }
    // Without a name, the address: sent as no SNI, and what `verify-full` verifies.
    let name = match &tls.server_name {
        Some(name) => name.clone(),
        None => ServerName::IpAddress(stream.peer_addr()?.ip().into()),
    };
    let stream = tls
        .connector
        .connect(name, stream)
        .await
        .map_err(PgClientError::Tls)?;
    exchange(BufReader::with_capacity(READ_BUFFER, stream), login, query).await
}

async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    login: &Login<'_>,
    query: &str,
) -> Result<Vec<Option<String>>, PgClientError> {
    let mut conn = Conn {
        stream,
        read: 0,
        out: BytesMut::new(),
    };
    frontend::startup_message(
        [
            ("user", login.user),
            ("database", login.database),
            ("application_name", APPLICATION_NAME),
        ],
        &mut conn.out,
    )?;
    conn.send().await?;
    authenticate(&mut conn, login.password).await?;
    loop {
        match conn.next().await? {
            Message::ReadyForQuery(_) => break,
            Message::ParameterStatus(_)
            | Message::BackendKeyData(_)
            | Message::NoticeResponse(_) => {}
            Message::ErrorResponse(body) => return Err(server_error(&body)),
            other => return Err(unexpected(&other, "after authentication")),
        }
    }
    frontend::query(query, &mut conn.out)?;
    conn.send().await?;
    let (mut row, mut error) = (None, None);
    loop {
        match conn.next().await? {
            Message::ReadyForQuery(_) => break,
            Message::DataRow(body) if row.is_none() => {
                let buffer = body.buffer();
                let values = body
                    .ranges()
                    .map(
                        |range| Ok(range.map(|r| String::from_utf8_lossy(&buffer[r]).into_owned())),
                    )
                    .collect()
                    .map_err(|e| PgClientError::Protocol(format!("a malformed row: {e}")))?;
                row = Some(values);
            }
            Message::ErrorResponse(body) => error = Some(server_error(&body)),
            Message::RowDescription(_)
            | Message::DataRow(_)
            | Message::CommandComplete(_)
            | Message::EmptyQueryResponse
            | Message::NoticeResponse(_)
            | Message::ParameterStatus(_) => {}
            other => return Err(unexpected(&other, "answering the query")),
        }
    }
    frontend::terminate(&mut conn.out);
    // The answer is in; a node that does not take the goodbye changes nothing.
    let _ = conn.send().await;
    let _ = conn.stream.shutdown().await;
    match (error, row) {
        (Some(error), _) => Err(error),
        (None, Some(row)) => Ok(row),
        (None, None) => Err(PgClientError::Protocol("the query returned no row".into())),
    }
}

/// Authenticates with SCRAM-SHA-256, or not at all when the node asks for nothing.
async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<S>,
    password: &str,
) -> Result<(), PgClientError> {
    match conn.next().await? {
        Message::AuthenticationOk => return Ok(()),
        Message::AuthenticationSasl(body) => {
            let offered: Vec<String> = body
                .mechanisms()
                .map(|m| Ok(m.to_owned()))
                .collect()
                .map_err(|e| PgClientError::Protocol(format!("a malformed SASL request: {e}")))?;
            if !offered.iter().any(|m| m == SCRAM_SHA_256) {
                return Err(PgClientError::NoScram(offered));
            }
        }
        Message::AuthenticationCleartextPassword => {
            return Err(PgClientError::Refused("a cleartext password"))
        }
        Message::AuthenticationMd5Password(_) => {
            return Err(PgClientError::Refused("an MD5 password"))
        }
        Message::AuthenticationGss
        | Message::AuthenticationGssContinue(_)
        | Message::AuthenticationKerberosV5
        | Message::AuthenticationSspi
        | Message::AuthenticationScmCredential => {
            return Err(PgClientError::Refused("GSSAPI, SSPI or Kerberos"))
        }
        Message::ErrorResponse(body) => return Err(server_error(&body)),
        other => return Err(unexpected(&other, "instead of authentication")),
    }
    if password.is_empty() {
        return Err(PgClientError::NoPassword);
    }
    // No channel binding: without TLS there is none, and `n` tells a server offering
    // SCRAM-SHA-256-PLUS that the client does not support it, which it accepts.
    let mut scram = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
    frontend::sasl_initial_response(SCRAM_SHA_256, scram.message(), &mut conn.out)?;
    conn.send().await?;
    let server_first = match conn.next().await? {
        Message::AuthenticationSaslContinue(body) => body.data().to_vec(),
        Message::ErrorResponse(body) => return Err(server_error(&body)),
        other => return Err(unexpected(&other, "instead of a SCRAM challenge")),
    };
    let iterations = scram_iterations(&server_first)
        .ok_or_else(|| PgClientError::Scram("the challenge has no iteration count".into()))?;
    if iterations > MAX_SCRAM_ITERATIONS {
        return Err(PgClientError::TooManyIterations(iterations));
    }
    let scram = tokio::task::spawn_blocking(move || scram.update(&server_first).map(|()| scram))
        .await
        .map_err(|e| PgClientError::Scram(e.to_string()))?
        .map_err(|e| PgClientError::Scram(e.to_string()))?;
    frontend::sasl_response(scram.message(), &mut conn.out)?;
    conn.send().await?;
    let mut scram = scram;
    match conn.next().await? {
        Message::AuthenticationSaslFinal(body) => scram.finish(body.data()).map_err(|_| {
            PgClientError::Scram(
                "the node's signature is wrong: it does not know the password".into(),
            )
        })?,
        Message::ErrorResponse(body) => return Err(server_error(&body)),
        other => return Err(unexpected(&other, "instead of the SCRAM outcome")),
    }
    match conn.next().await? {
        Message::AuthenticationOk => Ok(()),
        Message::ErrorResponse(body) => Err(server_error(&body)),
        other => Err(unexpected(&other, "after SCRAM")),
    }
}

/// The `i=` attribute of a SCRAM server-first-message (`r=...,s=...,i=4096`). Pure.
pub fn scram_iterations(server_first: &[u8]) -> Option<u32> {
    std::str::from_utf8(server_first)
        .ok()?
        .split(',')
        .find_map(|attribute| attribute.strip_prefix("i="))?
        .parse()
        .ok()
}

/// A connection with its count of bytes read and a buffer for what is sent next.
struct Conn<S> {
    stream: S,
    read: usize,
    out: BytesMut,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    async fn send(&mut self) -> Result<(), PgClientError> {
        self.stream.write_all(&self.out).await?;
        self.stream.flush().await?;
        self.out.clear();
        Ok(())
    }

    /// Reads one message, refusing it from its header when it would pass a bound.
    async fn next(&mut self) -> Result<Message, PgClientError> {
        let mut header = [0u8; 5];
        self.stream.read_exact(&mut header).await?;
        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        if len < 4 {
            return Err(PgClientError::Protocol(format!("message length {len}")));
        }
        if len > MAX_MESSAGE {
            return Err(PgClientError::MessageTooLarge(len));
        }
        self.read += 1 + len;
        if self.read > MAX_EXCHANGE {
            return Err(PgClientError::TooMuch);
        }
        let mut message = BytesMut::with_capacity(1 + len);
        message.put_slice(&header);
        message.resize(1 + len, 0);
        self.stream.read_exact(&mut message[5..]).await?;
        match Message::parse(&mut message) {
            Ok(Some(message)) => Ok(message),
            Ok(None) => Err(PgClientError::Protocol("a truncated message".into())),
            Err(e) => Err(PgClientError::Protocol(e.to_string())),
        }
    }
}

fn server_error(body: &ErrorResponseBody) -> PgClientError {
    let mut code = String::new();
    let mut fields = body.fields();
    while let Ok(Some(field)) = fields.next() {
        if field.type_() == b'C' {
            code = String::from_utf8_lossy(field.value_bytes()).into_owned();
        }
    }
    PgClientError::Server { code }
}

fn unexpected(message: &Message, when: &str) -> PgClientError {
    let what = match message {
        Message::AuthenticationOk
        | Message::AuthenticationSasl(_)
        | Message::AuthenticationSaslContinue(_)
        | Message::AuthenticationSaslFinal(_) => "an authentication message",
        Message::ReadyForQuery(_) => "ReadyForQuery",
        Message::DataRow(_) | Message::RowDescription(_) => "a row",
        Message::CopyInResponse(_) | Message::CopyOutResponse(_) | Message::CopyData(_) => "COPY",
        _ => "a message",
    };
    PgClientError::Protocol(format!("{what} {when}"))
}

/// How the check's connections are encrypted (`check.tls` other than `disable`), ready to
/// connect with.
#[derive(Clone)]
pub struct Tls {
    connector: TlsConnector,
    /// Whether the certificate is verified (`verify-full`).
    verify: bool,
    /// Verified (with `verify-full`) and sent as SNI; `None`: the node's address instead.
    server_name: Option<ServerName<'static>>,
    /// The certificates verified against.
    roots: Vec<CertificateDer<'static>>,
}

impl Tls {
    /// Encrypts, and verifies nothing of the node's certificate (`require`): it keeps the
    /// password from a passive listener and lets `hostssl` rules match, but an impostor is
    /// still answered.
    pub fn require(server_name: Option<ServerName<'static>>) -> Tls {
        let provider = provider();
        let config = ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .expect("the ring provider supports the default TLS versions")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
            .with_no_client_auth();
        Tls {
            connector: TlsConnector::from(Arc::new(config)),
            verify: false,
            server_name,
            roots: Vec::new(),
        }
    }

    /// Verifies the node's certificate chain up to one of `roots`, and that it names
    /// `server_name`, or else the node's address (`verify-full`).
    pub fn verify_full(
        roots: Vec<CertificateDer<'static>>,
        server_name: Option<ServerName<'static>>,
    ) -> Tls {
        let mut store = RootCertStore::empty();
        // Each was added once already, when the configuration was read.
        store.add_parsable_certificates(roots.iter().cloned());
        let config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("the ring provider supports the default TLS versions")
            .with_root_certificates(store)
            .with_no_client_auth();
        Tls {
            connector: TlsConnector::from(Arc::new(config)),
            verify: true,
            server_name,
            roots,
        }
    }
}

/// Equal when built from the same settings, so a reload sees whether they changed.
impl PartialEq for Tls {
    fn eq(&self, other: &Tls) -> bool {
        (self.verify, &self.server_name, &self.roots)
            == (other.verify, &other.server_name, &other.roots)
    }
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = self.server_name.as_ref().map(|n| n.to_str());
        match self.verify {
            true => write!(f, "tls=verify-full server_name={name:?}"),
            false => write!(f, "tls=require server_name={name:?}"),
        }
    }
}

/// ring: it builds with nothing but a C compiler. It has no post-quantum key exchange, which
/// rustls now marks as deprecated; what a check sends (a SCRAM proof, one role query) is
/// worth little to an attacker who records it today to break it years later.
#[allow(deprecated)]
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// `check.tls = "require"`: any certificate is taken, but the handshake's signatures are still
/// checked, so the session key is the certificate holder's.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iteration_counts_are_read_from_the_challenge() {
        let rows: [(&[u8], Option<u32>); 6] = [
            (b"r=abc,s=c2FsdA==,i=4096", Some(4096)),
            (b"r=abc,s=c2FsdA==,i=4294967295", Some(u32::MAX)),
            (b"r=abc,s=c2FsdA==,i=4294967296", None),
            (b"r=abc,s=c2FsdA==", None),
            (b"r=abc,s=c2FsdA==,i=-1", None),
            (b"\xff,i=1", None),
        ];
        for (challenge, expected) in rows {
            assert_eq!(
                scram_iterations(challenge),
                expected,
                "{}",
                String::from_utf8_lossy(challenge)
            );
        }
    }
}
