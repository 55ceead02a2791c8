//! The one HTTP/1 client: one request on a connected stream, its answer's head and body read
//! within bounds, so an endpoint that answers too much costs no more memory than it is allowed.
//! Role checks (`check.rs`) and the admin commands (`status_cli.rs`) both use it.

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::header::{AUTHORIZATION, CONNECTION, HOST, USER_AGENT};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_util::task::AbortOnDropHandle;

/// How much of an answer is read before it is refused.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The status line and headers, in bytes.
    pub head: usize,
    pub headers: usize,
    pub body: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("bad request: {0}")]
    Request(#[from] hyper::http::Error),
    #[error("answer larger than {0} bytes")]
    TooLarge(usize),
    #[error("reading answer: {0}")]
    Body(String),
}

/// One request: the method, the path, the `Host` header and an optional bearer token.
pub struct Ask<'a> {
    pub method: Method,
    pub path: &'a str,
    pub host: &'a str,
    pub bearer: Option<&'a str>,
}

/// Sends `ask` on `stream` and reads the answer: its status and body. The connection is closed
/// after it.
pub async fn exchange(
    stream: TcpStream,
    ask: Ask<'_>,
    limits: Limits,
) -> Result<(u16, Bytes), HttpError> {
    let (mut sender, connection) = hyper::client::conn::http1::Builder::new()
        .max_buf_size(limits.head)
        .max_header_size(limits.head)
        .max_headers(limits.headers)
        .handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
        .await?;
    // The connection is driven by its own task, dropped (aborted) with this exchange.
    let _connection = AbortOnDropHandle::new(tokio::spawn(connection));
    let mut request = Request::builder()
        .method(ask.method)
        .uri(ask.path)
        .header(HOST, ask.host)
        .header(USER_AGENT, concat!("roleproxy/", env!("CARGO_PKG_VERSION")))
        .header(CONNECTION, "close");
    if let Some(token) = ask.bearer {
        request = request.header(AUTHORIZATION, format!("Bearer {token}"));
    }
    let response = sender.send_request(request.body(Empty::new())?).await?;
    let status = response.status().as_u16();
    let body = Limited::new(response.into_body(), limits.body)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                HttpError::TooLarge(limits.body)
            } else {
                HttpError::Body(e.to_string())
            }
        })?
        .to_bytes();
    Ok((status, body))
}
