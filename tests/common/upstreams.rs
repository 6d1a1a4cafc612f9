//! Upstreams for the proxy tests: raw TCP ones that misbehave on purpose (every byte under the
//! test's control), an echo upstream that records what it received, one that loses the
//! keep-alive race every time, one that cuts its response off, and one whose connects hang.

use std::net::SocketAddr;
use std::time::Duration;

use http::{HeaderMap, Request};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::task::AbortOnDropHandle;

use super::STEP;

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
