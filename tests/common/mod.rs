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
use tokio_util::task::AbortOnDropHandle;

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
        let server = Server::start(&loaded, Metrics::new())
            .await
            .expect("server starts");
        TestProxy {
            addr: server.listen_addrs[0],
            admin: server.admin_addr.expect("admin configured"),
            server,
        }
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
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
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
    /// The accept task, aborted on drop.
    _task: AbortOnDropHandle<()>,
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
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
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
                                // SO_LINGER 0 makes the close send RST: exactly what a reset is.
                                #[allow(deprecated)]
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
        RawUpstream {
            addr,
            accepted,
            _task: AbortOnDropHandle::new(task),
        }
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

/// Serves HTTP/1.1 on `listener` until the returned task is aborted; `make` is called once per
/// accepted connection (a place to count connections) and returns that connection's service.
pub fn spawn_http1<F, S, B>(listener: TcpListener, make: F) -> JoinHandle<()>
where
    F: Fn() -> S + Send + 'static,
    S: hyper::service::Service<Request<hyper::body::Incoming>, Response = http::Response<B>>
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            while conns.try_join_next().is_some() {}
            let svc = make();
            conns.spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    })
}

/// A loopback address where nothing listens (bound, then released).
pub async fn refusing_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    drop(l);
    a
}

// ---------------------------------------------------------------------------------------------
// Upstreams and clients for the proxy-core tests.
// ---------------------------------------------------------------------------------------------

/// One request as an [`EchoUpstream`] received it.
#[derive(Debug, Clone)]
pub struct SeenRequest {
    /// Method.
    pub method: http::Method,
    /// Request target as received (origin-form for HTTP/1).
    pub uri: http::Uri,
    /// HTTP version spoken to the upstream.
    pub version: http::Version,
    /// Headers as received.
    pub headers: HeaderMap,
}

impl SeenRequest {
    /// One header as text ("" when absent); panics if it appears more than once, so a test never
    /// reads only the first of several lines by accident.
    pub fn header(&self, name: &str) -> &str {
        let mut all = self.headers.get_all(name).iter();
        let first = all.next().map(|v| v.to_str().unwrap()).unwrap_or("");
        assert!(
            all.next().is_none(),
            "header {name} appears more than once: {:?}",
            self.headers
        );
        first
    }
}

/// An HTTP/1.1 upstream (hyper, keep-alive) that records every request's method, URI, version
/// and headers and streams the request body back as the response body, with optional extra
/// response headers (e.g. its own `x-served-by`).
pub struct EchoUpstream {
    /// Where it listens.
    pub addr: SocketAddr,
    seen: std::sync::Arc<std::sync::Mutex<Vec<SeenRequest>>>,
    connections: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// The accept task, aborted on drop.
    _task: AbortOnDropHandle<()>,
}

impl EchoUpstream {
    /// Starts an echo upstream on an ephemeral loopback port.
    pub async fn start() -> EchoUpstream {
        Self::with_headers(&[]).await
    }

    /// Starts one that adds these headers to every response.
    pub async fn with_headers(headers: &[(&str, &str)]) -> EchoUpstream {
        use std::sync::atomic::Ordering;
        let extra: std::sync::Arc<Vec<(http::HeaderName, http::HeaderValue)>> = std::sync::Arc::new(
            headers
                .iter()
                .map(|(k, v)| {
                    (
                        http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                        http::HeaderValue::from_str(v).unwrap(),
                    )
                })
                .collect(),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let connections = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (seen2, connections2) = (seen.clone(), connections.clone());
        let task = spawn_http1(listener, move || {
            connections2.fetch_add(1, Ordering::SeqCst);
            let (seen, extra) = (seen2.clone(), extra.clone());
            hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let (seen, extra) = (seen.clone(), extra.clone());
                async move {
                    let (parts, body) = req.into_parts();
                    // The lock is taken and released here, never held across an await.
                    seen.lock().unwrap().push(SeenRequest {
                        method: parts.method,
                        uri: parts.uri,
                        version: parts.version,
                        headers: parts.headers,
                    });
                    let mut resp = http::Response::new(body);
                    for (k, v) in extra.iter() {
                        resp.headers_mut().append(k.clone(), v.clone());
                    }
                    Ok::<_, std::convert::Infallible>(resp)
                }
            })
        });
        EchoUpstream {
            addr,
            seen,
            connections,
            _task: AbortOnDropHandle::new(task),
        }
    }

    /// Every request received so far, in arrival order.
    pub fn seen(&self) -> Vec<SeenRequest> {
        self.seen.lock().unwrap().clone()
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// A raw keep-alive upstream that closes connections idle for `idle`, written so that the
/// keep-alive race happens every time rather than by luck: a real app's idle close races the
/// proxy's reuse of the pooled connection within microseconds, so here the close takes effect
/// when the next request arrives on a connection that has been idle for at least `idle` — the
/// request is read and the connection closed without an answer, exactly what the proxy sees
/// when its request and the app's FIN cross on the wire. Requests on a connection idle for less
/// than `idle` get `200` with body `ok`, keep-alive.
pub struct IdleClosingUpstream {
    /// Where it listens.
    pub addr: SocketAddr,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    answered: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    closed_on_request: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// The accept task, aborted on drop.
    _task: AbortOnDropHandle<()>,
}

impl IdleClosingUpstream {
    /// Starts it on an ephemeral loopback port.
    pub async fn start(idle: Duration) -> IdleClosingUpstream {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (accepted, answered, closed) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
        );
        let (a, b, c) = (accepted.clone(), answered.clone(), closed.clone());
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                while conns.try_join_next().is_some() {}
                a.fetch_add(1, Ordering::SeqCst);
                let (answered, closed) = (b.clone(), c.clone());
                conns.spawn(async move {
                    let mut idle_since = tokio::time::Instant::now();
                    loop {
                        // Bounded so an abandoned connection cannot linger past a test step.
                        match tokio::time::timeout(STEP, read_head(&mut sock)).await {
                            Ok(true) => {}
                            Ok(false) | Err(_) => return,
                        }
                        if idle_since.elapsed() >= idle {
                            closed.fetch_add(1, Ordering::SeqCst);
                            return;
                        }
                        let resp = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if sock.write_all(resp).await.is_err() {
                            return;
                        }
                        answered.fetch_add(1, Ordering::SeqCst);
                        idle_since = tokio::time::Instant::now();
                    }
                });
            }
        });
        IdleClosingUpstream {
            addr,
            accepted,
            answered,
            closed_on_request: closed,
            _task: AbortOnDropHandle::new(task),
        }
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Requests answered so far.
    pub fn answered(&self) -> usize {
        self.answered.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Requests that arrived on an idle-expired connection and were dropped with it.
    pub fn closed_on_request(&self) -> usize {
        self.closed_on_request
            .load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// A raw upstream that, for each connection, reads one request head, writes `bytes`, waits a
/// moment (so the proxy acts on what it got) and closes. For responses cut off in the middle.
pub struct ScriptedUpstream {
    /// Where it listens.
    pub addr: SocketAddr,
    /// The accept task, aborted on drop.
    _task: AbortOnDropHandle<()>,
}

impl ScriptedUpstream {
    /// Starts it on an ephemeral loopback port.
    pub async fn start(bytes: &'static [u8]) -> ScriptedUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                while conns.try_join_next().is_some() {}
                conns.spawn(async move {
                    if !read_head(&mut sock).await {
                        return;
                    }
                    let _ = sock.write_all(bytes).await;
                    let _ = sock.flush().await;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                });
            }
        });
        ScriptedUpstream {
            addr,
            _task: AbortOnDropHandle::new(task),
        }
    }
}

/// A listener whose accept queue is full, so that a new connection attempt to it hangs (Linux
/// drops the SYN): bound with `listen(1)`, never accepted, and filled with connections until one
/// no longer completes. `None` when the kernel kept completing connections (then a connect
/// timeout cannot be provoked this way).
pub struct BlackholeUpstream {
    /// Where it listens.
    pub addr: SocketAddr,
    _listener: TcpListener,
    _fillers: Vec<TcpStream>,
}

impl BlackholeUpstream {
    /// Binds and fills the accept queue.
    pub async fn start() -> Option<BlackholeUpstream> {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(1).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut fillers = Vec::new();
        for _ in 0..32 {
            match tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(addr)).await {
                Ok(Ok(s)) => fillers.push(s),
                Ok(Err(e)) => panic!("filler connect failed: {e}"),
                // This attempt hung: the queue is full.
                Err(_) => {
                    return Some(BlackholeUpstream {
                        addr,
                        _listener: listener,
                        _fillers: fillers,
                    })
                }
            }
        }
        None
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

impl TestProxy {
    /// Waits (bounded by [`STEP`]) until `series` reaches at least `expected`, then returns its
    /// value, which the caller asserts exactly: a response is counted when its body ends, which
    /// can be just after the client has read it.
    pub async fn metric_at_least(&self, series: &str, expected: f64) -> f64 {
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            let v = self.metric(series).await;
            if v >= expected || tokio::time::Instant::now() >= deadline {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits (bounded by [`STEP`]) until `series` equals `expected`, then returns its value.
    pub async fn metric_settles_at(&self, series: &str, expected: f64) -> f64 {
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            let v = self.metric(series).await;
            if v == expected || tokio::time::Instant::now() >= deadline {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A steerable upstream for the shedding tests.
// ---------------------------------------------------------------------------------------------

/// An HTTP/1.1 upstream (hyper, keep-alive) the test steers while it runs. Every request is
/// recorded on arrival (before any waiting) as `"METHOD /path?query"`, and answered by what its
/// path contains (anywhere, so that `/a/hold` behind a route prefix works too):
///
/// - `/hold…`: waits at a gate until the test lets it through with [`GatedUpstream::release`]
///   (bounded by [`STEP`]), then answers the current status. [`GatedUpstream::held`] is how many
///   wait right now, so "N in flight" is exact without sleeping.
/// - `/slow?ms=N`: waits N ms (at most [`STEP`]), then answers the current status.
/// - `/flaky…`: the first request for a given path and query answers 503, every later one 200.
/// - anything else: the current status ([`GatedUpstream::set_status`]; 200 at start).
///
/// Request bodies are read and dropped; the response body is `upstream <status>\n`.
pub struct GatedUpstream {
    /// Where it listens.
    pub addr: SocketAddr,
    state: std::sync::Arc<GatedState>,
    /// The accept task, aborted on drop.
    _task: AbortOnDropHandle<()>,
}

struct GatedState {
    requests: std::sync::Mutex<Vec<String>>,
    status: std::sync::atomic::AtomicU16,
    held: std::sync::atomic::AtomicUsize,
    gate: tokio::sync::Semaphore,
}

/// Counts one request waiting at the gate, also when the proxy gives up on it.
struct HeldGuard<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for HeldGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl GatedUpstream {
    /// Starts one on an ephemeral loopback port.
    pub async fn start() -> GatedUpstream {
        use std::sync::atomic::{AtomicU16, AtomicUsize};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = std::sync::Arc::new(GatedState {
            requests: std::sync::Mutex::new(Vec::new()),
            status: AtomicU16::new(200),
            held: AtomicUsize::new(0),
            gate: tokio::sync::Semaphore::new(0),
        });
        let shared = state.clone();
        let task = spawn_http1(listener, move || {
            let state = shared.clone();
            hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                gated_answer(state.clone(), req)
            })
        });
        GatedUpstream {
            addr,
            state,
            _task: AbortOnDropHandle::new(task),
        }
    }

    /// Status of every later answer that is not `/flaky…`.
    pub fn set_status(&self, status: u16) {
        self.state
            .status
            .store(status, std::sync::atomic::Ordering::SeqCst);
    }

    /// Lets `n` held requests (present or future) through the gate.
    pub fn release(&self, n: usize) {
        self.state.gate.add_permits(n);
    }

    /// Requests waiting at the gate right now.
    pub fn held(&self) -> usize {
        self.state.held.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Waits (bounded by [`STEP`]) until exactly `n` requests wait at the gate; returns how many
    /// do, which the caller asserts.
    pub async fn wait_held(&self, n: usize) -> usize {
        let deadline = tokio::time::Instant::now() + STEP;
        while self.held() != n && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        self.held()
    }

    /// Every request received so far, `"METHOD /path?query"`, in arrival order.
    pub fn requests(&self) -> Vec<String> {
        self.state.requests.lock().unwrap().clone()
    }

    /// Number of requests received so far.
    pub fn total(&self) -> usize {
        self.state.requests.lock().unwrap().len()
    }

    /// Waits (bounded by [`STEP`]) until at least `n` requests arrived; returns how many did.
    pub async fn wait_total(&self, n: usize) -> usize {
        let deadline = tokio::time::Instant::now() + STEP;
        while self.total() < n && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        self.total()
    }
}

async fn gated_answer(
    state: std::sync::Arc<GatedState>,
    req: Request<hyper::body::Incoming>,
) -> Result<http::Response<Full<Bytes>>, std::convert::Infallible> {
    use std::sync::atomic::Ordering::SeqCst;
    let target = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    let path = req.uri().path().to_owned();
    let line = format!("{} {target}", req.method());
    let first_sighting = {
        // Taken and released here, never held across an await.
        let mut requests = state.requests.lock().unwrap();
        let first = !requests
            .iter()
            .any(|r| r.split_once(' ').is_some_and(|(_, t)| t == target));
        requests.push(line);
        first
    };
    let _ = tokio::time::timeout(STEP, req.into_body().collect()).await;
    let status = if path.contains("/hold") {
        state.held.fetch_add(1, SeqCst);
        let _guard = HeldGuard(&state.held);
        if let Ok(Ok(permit)) = tokio::time::timeout(STEP, state.gate.acquire()).await {
            permit.forget();
        }
        state.status.load(SeqCst)
    } else if path.contains("/slow") {
        let ms = target
            .split_once("ms=")
            .and_then(|(_, v)| v.split('&').next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(ms).min(STEP)).await;
        state.status.load(SeqCst)
    } else if path.contains("/flaky") {
        if first_sighting {
            503
        } else {
            200
        }
    } else {
        state.status.load(SeqCst)
    };
    let mut resp = http::Response::new(Full::new(Bytes::from(format!("upstream {status}\n"))));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap();
    Ok(resp)
}

// ---------------------------------------------------------------------------------------------
// TLS and protocol support (tests/tls.rs, tests/protocols.rs): certificates made at test time,
// TLS clients, and TLS upstreams.
// ---------------------------------------------------------------------------------------------

/// A private CA in a scratch directory (removed on drop) that issues leaf certificates.
pub struct TestPki {
    /// The scratch directory.
    pub dir: std::path::PathBuf,
    /// The CA certificate, PEM.
    pub ca_pem: String,
    ca: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

/// A leaf certificate and its key.
pub struct Leaf {
    /// Certificate, PEM.
    pub cert_pem: String,
    /// Private key, PKCS#8 PEM.
    pub key_pem: String,
    /// Certificate, DER: what a client sees as the peer certificate.
    pub der: Vec<u8>,
}

impl Drop for TestPki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl TestPki {
    /// A new CA named `name`, in a fresh scratch directory.
    pub fn new(name: &str) -> TestPki {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "spillway-pki-{}-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::SeqCst),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let ca = rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap())
            .unwrap();
        TestPki {
            dir,
            ca_pem: ca.pem(),
            ca,
        }
    }

    /// A leaf for `localhost` and `127.0.0.1` (plus `names`), common name `cn`, signed by the CA.
    pub fn leaf(&self, cn: &str, names: &[&str]) -> Leaf {
        let mut sans = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        sans.extend(names.iter().map(|s| s.to_string()));
        let mut params = rcgen::CertificateParams::new(sans).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        }
    }

    /// Writes `contents` to `name` in the scratch directory; returns its path.
    pub fn write(&self, name: &str, contents: &str) -> std::path::PathBuf {
        let path = self.dir.join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }

    /// Writes the CA certificate as `ca.pem`; returns its path.
    pub fn ca_file(&self) -> std::path::PathBuf {
        self.write("ca.pem", &self.ca_pem.clone())
    }

    /// A rustls client config trusting only this CA, offering `alpn`, optionally presenting a
    /// client certificate.
    pub fn client_config(
        &self,
        alpn: &[&str],
        client_cert: Option<&Leaf>,
    ) -> std::sync::Arc<rustls::ClientConfig> {
        use rustls_pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pki_types::CertificateDer::pem_slice_iter(self.ca_pem.as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        let builder = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
        let mut config = match client_cert {
            Some(leaf) => builder
                .with_client_auth_cert(
                    rustls_pki_types::CertificateDer::pem_slice_iter(leaf.cert_pem.as_bytes())
                        .map(|c| c.unwrap())
                        .collect(),
                    rustls_pki_types::PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes())
                        .unwrap(),
                )
                .unwrap(),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        std::sync::Arc::new(config)
    }
}

/// A TLS client connection to `addr`, verifying the name `localhost` (bounded by [`STEP`]).
pub async fn tls_connect(
    addr: SocketAddr,
    config: std::sync::Arc<rustls::ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let fut = async {
        let tcp = TcpStream::connect(addr).await?;
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
    };
    tokio::time::timeout(STEP, fut)
        .await
        .expect("TLS handshake within the step bound")
}

/// The end-entity certificate (DER) a TLS client connection sees.
pub fn peer_cert(tls: &tokio_rustls::client::TlsStream<TcpStream>) -> Vec<u8> {
    tls.get_ref()
        .1
        .peer_certificates()
        .expect("server sent a certificate")[0]
        .to_vec()
}

/// The ALPN protocol negotiated on a TLS client connection ("" for none).
pub fn alpn_of(tls: &tokio_rustls::client::TlsStream<TcpStream>) -> String {
    String::from_utf8_lossy(tls.get_ref().1.alpn_protocol().unwrap_or_default()).into_owned()
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

/// An HTTPS upstream (HTTP/1.1 or HTTP/2 by ALPN or preface) answering every request with 200
/// and body `tls ok`. With `client_ca`, it requires a client certificate issued by that CA.
/// Every answer says in `x-client-cert` whether the client presented one.
pub struct TlsUpstream {
    /// Where it listens.
    pub addr: SocketAddr,
    /// The accept task, aborted on drop.
    _task: AbortOnDropHandle<()>,
}

impl TlsUpstream {
    /// Starts it on an ephemeral loopback port with `leaf` as its certificate.
    pub async fn start(leaf: &Leaf, client_ca: Option<&TestPki>) -> TlsUpstream {
        use rustls_pki_types::pem::PemObject;
        use std::sync::Arc;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = match client_ca {
            Some(pki) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in rustls_pki_types::CertificateDer::pem_slice_iter(pki.ca_pem.as_bytes()) {
                    roots.add(c.unwrap()).unwrap();
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                )
                .build()
                .unwrap();
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(
                rustls_pki_types::CertificateDer::pem_slice_iter(leaf.cert_pem.as_bytes())
                    .map(|c| c.unwrap())
                    .collect(),
                rustls_pki_types::PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap(),
            )
            .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                while conns.try_join_next().is_some() {}
                let acceptor = acceptor.clone();
                conns.spawn(async move {
                    let Ok(Ok(tls)) = tokio::time::timeout(STEP, acceptor.accept(stream)).await
                    else {
                        return;
                    };
                    let presented = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .is_some_and(|c| !c.is_empty());
                    let svc = hyper::service::service_fn(
                        move |req: Request<hyper::body::Incoming>| async move {
                            let version = format!("{:?}", req.version());
                            let _ = req.into_body().collect().await;
                            let mut resp =
                                http::Response::new(Full::new(Bytes::from_static(b"tls ok")));
                            let h = resp.headers_mut();
                            h.insert(
                                "x-client-cert",
                                http::HeaderValue::from_static(if presented {
                                    "yes"
                                } else {
                                    "no"
                                }),
                            );
                            h.insert(
                                "x-upstream-version",
                                http::HeaderValue::from_str(&version).unwrap(),
                            );
                            Ok::<_, std::convert::Infallible>(resp)
                        },
                    );
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        TlsUpstream {
            addr,
            _task: AbortOnDropHandle::new(task),
        }
    }
}

/// Waits (bounded by [`STEP`]) until `check` holds, polling every 20 ms; returns whether it did.
pub async fn eventually<F, Fut>(mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
