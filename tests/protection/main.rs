//! spillway protects itself and refuses hostile input on the wire: raw sockets send the exact
//! bytes an attacker or a broken client would, and each test asserts the exact answer, what the
//! app received, and the counts.
//!
//! - `heads`: request heads over the limits, broken framing, answered and counted by spillway
//! - `connections`: silent, slow and idle connections, the connection cap, keep-alive details
//!   (pipelining, 100-continue, HTTP/1.0, early answers, trailers), the upstream connection cap
//! - `memory`: shedding when spillway is short of memory

#[path = "../common/mod.rs"]
mod common;

mod connections;
mod heads;
mod hostile;
mod memory;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// A config with one listener (with `listener_extra` YAML lines, indented for the listener),
/// admin, and one route to `upstream`.
fn config(upstream: SocketAddr, listener_extra: &str) -> String {
    format!(
        "server_id: {SERVER_ID}\n\
         listeners:\n  - name: http\n    address: 127.0.0.1:0\n{listener_extra}\
         admin:\n  address: 127.0.0.1:0\n\
         upstreams:\n  app:\n    endpoints: [\"{upstream}\"]\n    connect_timeout: 500ms\n\
         routes:\n  - name: {DEFAULT_ROUTE}\n    match: {{ path_prefix: / }}\n    upstream: app\n"
    )
}

/// One response read off a raw connection: status, header lines (lower-cased names) and body.
#[derive(Debug)]
struct RawResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl RawResponse {
    /// The value of `name`; "" when absent.
    fn header(&self, name: &str) -> &str {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map_or("", |(_, v)| v.as_str())
    }
}

/// A raw client connection that keeps what it read beyond one response.
struct Raw {
    sock: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    async fn connect(addr: SocketAddr) -> Raw {
        Raw {
            sock: TcpStream::connect(addr).await.unwrap(),
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.sock.write_all(bytes).await.unwrap();
    }

    /// Reads one complete response (framed by content-length or chunked; a HEAD's has no
    /// body), bounded by [`STEP`].
    async fn response(&mut self) -> RawResponse {
        self.response_for(false).await
    }

    async fn response_for(&mut self, head_request: bool) -> RawResponse {
        tokio::time::timeout(STEP, self.read_response(head_request))
            .await
            .expect("a response within the step bound")
    }

    async fn read_response(&mut self, head_request: bool) -> RawResponse {
        loop {
            let mut slots = [httparse::EMPTY_HEADER; 64];
            let mut r = httparse::Response::new(&mut slots);
            if let httparse::Status::Complete(n) = r.parse(&self.buf).expect("a valid response") {
                let status = r.code.unwrap();
                let headers: Vec<(String, String)> = r
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_ascii_lowercase(),
                            String::from_utf8_lossy(h.value).into_owned(),
                        )
                    })
                    .collect();
                let mut resp = RawResponse {
                    status,
                    headers,
                    body: Vec::new(),
                };
                self.buf.drain(..n);
                if (100..200).contains(&status) {
                    return resp;
                }
                if head_request || status == 204 || status == 304 {
                    return resp;
                }
                if resp.header("transfer-encoding") == "chunked" {
                    resp.body = self.read_chunked().await;
                } else {
                    let len: usize = resp.header("content-length").parse().unwrap_or(0);
                    while self.buf.len() < len {
                        self.fill().await;
                    }
                    resp.body = self.buf.drain(..len).collect();
                }
                return resp;
            }
            self.fill().await;
        }
    }

    /// Decodes a chunked body; trailers (if any) are left as header-like lines in the body's
    /// place at the end, after a `--trailers--` marker.
    async fn read_chunked(&mut self) -> Vec<u8> {
        let mut body = Vec::new();
        loop {
            let line = self.line().await;
            let size = usize::from_str_radix(line.split(';').next().unwrap().trim(), 16).unwrap();
            if size == 0 {
                let mut trailers = Vec::new();
                loop {
                    let l = self.line().await;
                    if l.is_empty() {
                        break;
                    }
                    trailers.push(l);
                }
                if !trailers.is_empty() {
                    body.extend_from_slice(b"--trailers--\n");
                    body.extend_from_slice(trailers.join("\n").as_bytes());
                }
                return body;
            }
            while self.buf.len() < size + 2 {
                self.fill().await;
            }
            body.extend(self.buf.drain(..size));
            self.buf.drain(..2);
        }
    }

    async fn line(&mut self) -> String {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let l = String::from_utf8_lossy(&self.buf[..i]).into_owned();
                self.buf.drain(..i + 2);
                return l;
            }
            self.fill().await;
        }
    }

    async fn fill(&mut self) {
        let mut chunk = [0u8; 4096];
        let n = self.sock.read(&mut chunk).await.unwrap();
        assert!(
            n > 0,
            "connection closed mid-response; got so far: {:?}",
            String::from_utf8_lossy(&self.buf)
        );
        self.buf.extend_from_slice(&chunk[..n]);
    }

    /// Waits (bounded by [`STEP`]) for the server to close the connection; returns how long it
    /// took. Bytes still arriving are kept.
    async fn closed_within(&mut self) -> Duration {
        let started = Instant::now();
        let read_to_end = async {
            let mut chunk = [0u8; 1024];
            loop {
                match self.sock.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                }
            }
        };
        tokio::time::timeout(STEP, read_to_end)
            .await
            .expect("closed within the step bound");
        started.elapsed()
    }
}

/// Asserts the stamps every response spillway generates carries: `x-served-by`, a
/// `Proxy-Status` naming `error`, a request id, and `Connection: close` when `closes`.
fn assert_generated(r: &RawResponse, status: u16, error: &str, closes: bool) {
    assert_eq!(r.status, status, "{r:?}");
    assert_eq!(r.header("x-served-by"), SERVER_ID, "{r:?}");
    assert_eq!(
        r.header("proxy-status"),
        format!("{SERVER_ID}; error={error}"),
        "{r:?}"
    );
    assert_eq!(r.header("x-request-id").len(), 32, "{r:?}");
    assert!(!r.header("date").is_empty(), "{r:?}");
    if closes {
        assert_eq!(r.header("connection"), "close", "{r:?}");
    }
}
