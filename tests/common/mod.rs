//! Test support: an in-process spillway on ephemeral loopback ports, a small HTTP client, and
//! upstreams that misbehave on purpose (raw TCP, so every byte is under the test's control).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use spillway::config;
use spillway::metrics::Metrics;
use spillway::server::Server;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Upper bound for any single step of a test, so nothing can hang CI.
pub const STEP: Duration = Duration::from_secs(10);

/// A spillway started in this process from a YAML string.
pub struct TestProxy {
    /// First proxy listener.
    pub addr: SocketAddr,
    /// Admin listener.
    pub admin: SocketAddr,
    /// The running server.
    pub server: Server,
}

impl TestProxy {
    /// Starts spillway from `yaml`. Every `@UPSTREAM@` is replaced by `upstream`; listeners
    /// and admin should use port 0.
    pub async fn start(yaml: &str) -> TestProxy {
        let loaded = config::load_str(yaml).unwrap_or_else(|e| panic!("test config invalid:\n{e}"));
        let server = Server::start(&loaded, Metrics::new()).await.expect("server starts");
        TestProxy { addr: server.listen_addrs[0], admin: server.admin_addr.expect("admin configured"), server }
    }

    /// A minimal config: one route `default` for `/` to upstream `app` at `upstream`, plus
    /// extra YAML appended to the route.
    pub fn simple_config(upstream: SocketAddr, route_extra: &str) -> String {
        format!(
            "server_id: spillway-test\n\
             listeners:\n  - name: http\n    address: 127.0.0.1:0\n\
             admin:\n  address: 127.0.0.1:0\n\
             upstreams:\n  app:\n    endpoints: [\"{upstream}\"]\n    connect_timeout: 500ms\n\
             routes:\n  - name: default\n    match: {{ path_prefix: / }}\n    upstream: app\n{route_extra}"
        )
    }

    /// `http://<proxy>/<path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// The admin `/metrics` text.
    pub async fn metrics(&self) -> String {
        let r = get(&format!("http://{}/metrics", self.admin)).await;
        assert_eq!(r.status, StatusCode::OK);
        r.text()
    }

    /// The value of one series, e.g. `spillway_requests_total{code="502",method="GET",route="default",source="proxy"}`
    /// (labels in alphabetical order, as the exposition format prints them); 0 when absent.
    pub async fn metric(&self, series: &str) -> f64 {
        metric_value(&self.metrics().await, series)
    }
}

/// Reads one series from exposition text; 0 when absent.
pub fn metric_value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .map(|v| v.trim().parse().expect("numeric sample"))
        .unwrap_or(0.0)
}

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
        self.headers.get(name).map(|v| v.to_str().unwrap()).unwrap_or("")
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
        Resp { status: parts.status, headers: parts.headers, body }
    };
    tokio::time::timeout(STEP, fut).await.expect("response within the step bound")
}

/// `GET url`.
pub async fn get(url: &str) -> Resp {
    send(Request::get(url).body(Full::new(Bytes::new())).unwrap()).await
}

/// Empty body helper for clients that want one.
pub fn empty() -> Empty<Bytes> {
    Empty::new()
}

/// How a raw upstream behaves once it has read a request head.
#[derive(Debug, Clone)]
pub enum Misbehaviour {
    /// Close the connection without answering.
    CloseBeforeHead,
    /// Reset the connection (RST) without answering.
    Reset,
    /// Answer with bytes that are not HTTP.
    Garbage,
    /// Read the request and never answer (the connection stays open).
    Stall,
    /// Send a head promising `Content-Length: 1000`, then 10 bytes, then close.
    DieMidBody,
    /// Answer this raw response verbatim, keep-alive, one per request.
    Raw(&'static str),
}

/// A raw TCP upstream with one behaviour; counts the connections it accepted.
pub struct RawUpstream {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Connections accepted so far.
    pub accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RawUpstream {
    /// Starts it on an ephemeral loopback port.
    pub async fn start(behaviour: Misbehaviour) -> RawUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = accepted.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else { return };
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let b = behaviour.clone();
                tokio::spawn(async move {
                    loop {
                        if !read_head(&mut sock).await {
                            return;
                        }
                        match &b {
                            Misbehaviour::CloseBeforeHead => return,
                            Misbehaviour::Reset => {
                                let _ = sock.set_linger(Some(Duration::ZERO));
                                return;
                            }
                            Misbehaviour::Garbage => {
                                let _ = sock.write_all(b"this is not http at all\r\n\r\n").await;
                                return;
                            }
                            Misbehaviour::Stall => {
                                tokio::time::sleep(Duration::from_secs(3600)).await;
                                return;
                            }
                            Misbehaviour::DieMidBody => {
                                let _ = sock
                                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n0123456789")
                                    .await;
                                let _ = sock.flush().await;
                                tokio::time::sleep(Duration::from_millis(50)).await;
                                return;
                            }
                            Misbehaviour::Raw(r) => {
                                if sock.write_all(r.as_bytes()).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });
        RawUpstream { addr, accepted, task }
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Reads until the end of a request head (bodies are not expected by these upstreams).
/// False when the peer closed first.
async fn read_head(sock: &mut TcpStream) -> bool {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        match sock.read(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    return true;
                }
            }
        }
    }
}

/// A loopback address where nothing listens (bound, then released).
pub async fn refusing_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    drop(l);
    a
}
