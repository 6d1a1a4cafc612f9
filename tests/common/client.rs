//! The test client: requests through a fresh hyper client, whole or with a body that may fail,
//! raw exchanges on a TCP connection, and one request over a connection the test set up.

use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::STEP;

/// A response read whole.
#[derive(Debug)]
pub struct Resp {
    /// Status.
    pub status: StatusCode,
    /// Headers.
    pub headers: HeaderMap,
    /// Whole body.
    pub body: Bytes,
}

impl Resp {
    /// One header as text ("" when absent).
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap())
            .unwrap_or("")
    }
    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends a request through a fresh client and reads the whole response.
pub async fn send(req: Request<Full<Bytes>>) -> Resp {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let fut = async {
        let resp = client.request(req).await.expect("request sent");
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.expect("body read").to_bytes();
        Resp {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    };
    tokio::time::timeout(STEP, fut)
        .await
        .expect("response within the step bound")
}

/// `GET url`.
pub async fn get(url: &str) -> Resp {
    send(Request::get(url).body(Full::new(Bytes::new())).unwrap()).await
}

/// `method url` with `body` (`""` for none).
pub fn req(method: Method, url: &str, body: &'static str) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(url)
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

/// Empty body helper for clients that want one.
pub fn empty() -> Empty<Bytes> {
    Empty::new()
}

/// Deterministic, non-repeating-ish bytes, so a dropped or reordered piece shows.
pub fn pattern(len: usize) -> Bytes {
    let mut data = Vec::with_capacity(len + 4);
    let mut x: u32 = 0x9e37_79b9;
    while data.len() < len {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        data.extend_from_slice(&x.to_le_bytes());
    }
    data.truncate(len);
    Bytes::from(data)
}

/// A request body the test feeds chunk by chunk through a channel, so it decides when each
/// chunk is sent; it ends when the sender is dropped.
pub struct ChannelBody(pub mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|c| Ok(Frame::data(c))))
    }
}

/// Head of a response whose body is read separately.
#[derive(Debug)]
pub struct PartialResp {
    /// Status.
    pub status: StatusCode,
    /// Headers.
    pub headers: HeaderMap,
    /// The body, or the error that ended it.
    pub body: Result<Bytes, String>,
}

/// Like [`send`], but a body that fails is returned as an error instead of panicking.
pub async fn send_partial(req: Request<Full<Bytes>>) -> PartialResp {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let fut = async {
        let resp = client.request(req).await.expect("request sent");
        let (parts, body) = resp.into_parts();
        let body = body
            .collect()
            .await
            .map(|c| c.to_bytes())
            .map_err(|e| format!("{e:?}"));
        PartialResp {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    };
    tokio::time::timeout(STEP, fut)
        .await
        .expect("response within the step bound")
}

/// `GET url` that reports failure instead of panicking (for polling and for checking that
/// something is refused).
pub async fn try_get(url: &str, bound: Duration) -> Result<Resp, String> {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let fut = async {
        let resp = client
            .request(Request::get(url).body(Full::new(Bytes::new())).unwrap())
            .await
            .map_err(|e| format!("request: {e:?}"))?;
        let (parts, body) = resp.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| format!("body: {e:?}"))?
            .to_bytes();
        Ok(Resp {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    };
    tokio::time::timeout(bound, fut)
        .await
        .map_err(|_| format!("no answer within {bound:?}"))?
}

/// Writes `request` on a new connection to `addr` and reads until the peer closes (bounded).
pub async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> Vec<u8> {
    let fut = async {
        let mut sock = TcpStream::connect(addr).await.unwrap();
        sock.write_all(request).await.unwrap();
        let mut out = Vec::new();
        // A reset after the data counts as the end too; what arrived is what is judged.
        let _ = sock.read_to_end(&mut out).await;
        out
    };
    tokio::time::timeout(STEP, fut)
        .await
        .expect("connection closed within the step bound")
}

/// `GET /x` on a raw connection whose upstream sends a chunked 200 with the chunk `hello` and
/// then fails: asserts that the head and that chunk reach the client and that the connection
/// ends without the terminating zero-length chunk (a failed body never looks complete).
/// Returns what arrived, for further checks.
pub async fn assert_chunked_abort_on_wire(addr: SocketAddr) -> String {
    let raw = raw_exchange(addr, b"GET /x HTTP/1.1\r\nhost: a\r\n\r\n").await;
    let text = String::from_utf8_lossy(&raw).into_owned();
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text:?}");
    assert!(
        text.to_ascii_lowercase()
            .contains("transfer-encoding: chunked\r\n"),
        "{text:?}"
    );
    assert!(text.contains("5\r\nhello\r\n"), "{text:?}");
    assert!(
        !text.ends_with("0\r\n\r\n"),
        "clean terminator sent for a failed body: {text:?}"
    );
    text
}

/// Sends one request over an established connection with HTTP/1.1 (`h2 == false`) or HTTP/2
/// and reads the whole response, trailers included (bounded by [`STEP`]).
pub async fn send_over<I>(io: I, h2: bool, req: Request<Full<Bytes>>) -> (Resp, Option<HeaderMap>)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let io = hyper_util::rt::TokioIo::new(io);
    let fut = async move {
        let resp = if h2 {
            let (mut sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .unwrap();
            tokio::spawn(conn);
            sender.send_request(req).await.expect("request sent")
        } else {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(conn);
            sender.send_request(req).await.expect("request sent")
        };
        let (parts, body) = resp.into_parts();
        let collected = body.collect().await.expect("body read");
        let trailers = collected.trailers().cloned();
        (
            Resp {
                status: parts.status,
                headers: parts.headers,
                body: collected.to_bytes(),
            },
            trailers,
        )
    };
    tokio::time::timeout(STEP, fut)
        .await
        .expect("response within the step bound")
}
