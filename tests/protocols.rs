//! What real apps speak through spillway: HTTP/2 end to end for gRPC (streaming both ways,
//! trailers passed through), gRPC-shaped errors, and WebSocket upgrades tunnelled both ways.
//! Everything listens on 127.0.0.1 port 0 and every wait is bounded.

mod common;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{HeaderMap, Request, StatusCode, Version};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

// ---------------------------------------------------------------------------------------------
// Bodies and upstreams
// ---------------------------------------------------------------------------------------------

/// The gRPC-style upstream's response body: each request data frame is sent straight back,
/// and when the request ends, trailers `grpc-status: 0`, `grpc-message: all good`.
struct EchoThenTrailers {
    request: Incoming,
    done: bool,
}

impl Body for EchoThenTrailers {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        loop {
            if self.done {
                return Poll::Ready(None);
            }
            match std::task::ready!(Pin::new(&mut self.request).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    Err(_trailers) => continue,
                },
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => {
                    self.done = true;
                    let mut t = HeaderMap::new();
                    t.insert("grpc-status", "0".parse().unwrap());
                    t.insert("grpc-message", "all good".parse().unwrap());
                    return Poll::Ready(Some(Ok(Frame::trailers(t))));
                }
            }
        }
    }
}

/// An HTTP/2-only (prior knowledge) upstream shaped like a gRPC server; records the headers and
/// version of each request it gets.
struct GrpcUpstream {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<(Version, HeaderMap)>>>,
    task: JoinHandle<()>,
}

impl Drop for GrpcUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl GrpcUpstream {
    async fn start() -> GrpcUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let seen = seen2.clone();
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let seen = seen.clone();
                    async move {
                        seen.lock()
                            .unwrap()
                            .push((req.version(), req.headers().clone()));
                        let mut resp = http::Response::new(EchoThenTrailers {
                            request: req.into_body(),
                            done: false,
                        });
                        resp.headers_mut()
                            .insert("content-type", "application/grpc".parse().unwrap());
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                conns.spawn(async move {
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        GrpcUpstream { addr, seen, task }
    }
}

/// An h2c (prior knowledge) client connection to `addr`.
async fn h2c<B>(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<B>
where
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    sender
}

fn config_with(upstream: SocketAddr, protocol: &str, route: &str) -> String {
    format!(
        "server_id: spillway-test\n\
         listeners:\n  - name: http\n    address: 127.0.0.1:0\n\
         admin:\n  address: 127.0.0.1:0\n\
         upstreams:\n  app:\n    endpoints: [\"{upstream}\"]\n    connect_timeout: 500ms\n    protocol: {protocol}\n\
         routes:\n{route}"
    )
}

const GRPC_ROUTE: &str =
    "  - name: default\n    match: { path_prefix: /pkg.Echo }\n    upstream: app\n";

fn grpc_request<B>(uri: String, body: B) -> Request<B> {
    Request::post(uri)
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(body)
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// HTTP/2 and gRPC
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn grpc_streams_both_ways_over_h2_and_trailers_pass_through() {
    let up = GrpcUpstream::start().await;
    let p = TestProxy::start(&config_with(up.addr, "http2", GRPC_ROUTE)).await;
    let mut client = h2c(p.addr).await;
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    let fut = client.send_request(grpc_request(
        format!("http://{}/pkg.Echo/Chat", p.addr),
        ChannelBody(rx),
    ));
    let resp = tokio::time::timeout(STEP, fut)
        .await
        .unwrap()
        .expect("response head");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.version(), Version::HTTP_2);
    assert_eq!(resp.headers()["content-type"], "application/grpc");
    let mut body = resp.into_body();

    // Each message comes back before the next is sent: nothing is buffered whole either way.
    for msg in ["\0\0\0\0\x05ping1", "\0\0\0\0\x05ping2"] {
        tx.send(Bytes::from(msg)).await.unwrap();
        let frame = tokio::time::timeout(STEP, body.frame())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(frame.into_data().unwrap(), Bytes::from(msg));
    }
    drop(tx);
    let mut trailers = None;
    while let Some(frame) = tokio::time::timeout(STEP, body.frame()).await.unwrap() {
        if let Ok(t) = frame.unwrap().into_trailers() {
            trailers = Some(t);
        }
    }
    let trailers = trailers.expect("trailers arrived");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["grpc-message"], "all good");

    let seen = up.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].0,
        Version::HTTP_2,
        "prior-knowledge HTTP/2 to the upstream"
    );
    assert_eq!(
        seen[0].1["te"], "trailers",
        "the gRPC te: trailers promise is forwarded"
    );
    assert_eq!(seen[0].1["content-type"], "application/grpc");
    let ok =
        r#"spillway_requests_total{code="200",method="POST",route="default",source="upstream"}"#;
    assert_eq!(p.metric_at_least(ok, 1.0).await, 1.0);
}

#[tokio::test]
async fn grpc_errors_spillway_generates_are_grpc_statuses() {
    let refused = refusing_addr().await;
    let route = format!(
        "{GRPC_ROUTE}  - name: closed\n    match: {{ path_prefix: /pkg.Closed }}\n    upstream: app\n    maintenance: {{ enabled: true, retry_after: 10m }}\n"
    );
    let p = TestProxy::start(&config_with(refused, "http2", &route)).await;
    let mut client = h2c::<Full<Bytes>>(p.addr).await;
    let mut call = |path: &str| {
        let fut = client.send_request(grpc_request(
            format!("http://{}{path}", p.addr),
            Full::new(Bytes::from_static(b"\0\0\0\0\0")),
        ));
        async move {
            let resp = tokio::time::timeout(STEP, fut).await.unwrap().unwrap();
            let (parts, body) = resp.into_parts();
            let collected = tokio::time::timeout(STEP, body.collect())
                .await
                .unwrap()
                .unwrap();
            assert!(
                collected.trailers().is_none(),
                "Trailers-Only: the status is in the headers"
            );
            assert!(collected.to_bytes().is_empty());
            parts
        }
    };

    // The upstream refuses: UNAVAILABLE, with the proxy's own headers kept.
    let r = call("/pkg.Echo/Chat").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.headers["content-type"], "application/grpc");
    assert_eq!(r.headers["grpc-status"], "14");
    assert_eq!(r.headers["grpc-message"], "upstream refused the connection");
    assert_eq!(
        r.headers["proxy-status"],
        "spillway-test; error=connection_refused"
    );
    assert_eq!(r.headers["x-served-by"], "spillway-test");
    assert!(r.headers.contains_key("x-request-id"));
    // Metrics record what spillway decided, not the 200 the gRPC client saw.
    let refused_series =
        r#"spillway_requests_total{code="502",method="POST",route="default",source="proxy"}"#;
    assert_eq!(p.metric_at_least(refused_series, 1.0).await, 1.0);
    assert_eq!(
        p.metric(
            r#"spillway_requests_total{code="200",method="POST",route="default",source="proxy"}"#
        )
        .await,
        0.0
    );

    // Shed (maintenance): UNAVAILABLE with Retry-After.
    let r = call("/pkg.Closed/Call").await;
    assert_eq!(r.headers["grpc-status"], "14");
    assert_eq!(r.headers["retry-after"], "600");
    assert_eq!(
        r.headers["proxy-status"],
        "spillway-test; error=proxy_internal_response"
    );
    let shed = r#"spillway_requests_total{code="503",method="POST",route="closed",source="proxy"}"#;
    assert_eq!(p.metric_at_least(shed, 1.0).await, 1.0);

    // No route: UNIMPLEMENTED.
    let r = call("/other.Service/Call").await;
    assert_eq!(r.headers["grpc-status"], "12");
    assert_eq!(r.headers["grpc-message"], "no route");
    let unmatched =
        r#"spillway_requests_total{code="404",method="POST",route="unmatched",source="proxy"}"#;
    assert_eq!(p.metric_at_least(unmatched, 1.0).await, 1.0);

    // A plain HTTP request to the same place still gets a plain 502.
    let r = get(&p.url("/pkg.Echo/Chat")).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert!(r.headers.get("grpc-status").is_none());
}

// ---------------------------------------------------------------------------------------------
// WebSocket
// ---------------------------------------------------------------------------------------------

/// A raw WebSocket-ish upstream: reads the upgrade request, records its head, answers 101 and
/// echoes every byte until the client closes, then closes.
struct UpgradeUpstream {
    addr: SocketAddr,
    heads: Arc<Mutex<Vec<String>>>,
    task: JoinHandle<()>,
}

impl Drop for UpgradeUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl UpgradeUpstream {
    async fn start() -> UpgradeUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let heads2 = heads.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                let heads = heads2.clone();
                conns.spawn(async move {
                    let head = read_head_text(&mut sock).await;
                    heads.lock().unwrap().push(head);
                    let answer = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                                  Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
                    sock.write_all(answer.as_bytes()).await.unwrap();
                    let (mut r, mut w) = sock.split();
                    let _ = tokio::time::timeout(STEP, tokio::io::copy(&mut r, &mut w)).await;
                    let _ = w.shutdown().await;
                });
            }
        });
        UpgradeUpstream { addr, heads, task }
    }
}

/// Reads a message head (up to the blank line) byte by byte, so nothing after it is consumed.
async fn read_head_text(sock: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(STEP, sock.read(&mut byte))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            n,
            1,
            "peer closed mid-head: {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    String::from_utf8(head).unwrap()
}

const IN_FLIGHT: &str = r#"spillway_in_flight_requests{route="default"}"#;
const UPGRADED: &str =
    r#"spillway_requests_total{code="101",method="GET",route="default",source="upstream"}"#;

#[tokio::test]
async fn websocket_upgrade_is_tunnelled_both_ways_and_counted_while_open() {
    let up = UpgradeUpstream::start().await;
    let p = TestProxy::start(&TestProxy::simple_config(up.addr, "")).await;
    let mut ws = TcpStream::connect(p.addr).await.unwrap();
    ws.write_all(
        b"GET /chat HTTP/1.1\r\nHost: example.com\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await
    .unwrap();
    let head = read_head_text(&mut ws).await.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("\r\nupgrade: websocket\r\n"), "{head}");
    assert!(head.contains("\r\nconnection: upgrade\r\n"), "{head}");
    assert!(
        head.contains("\r\nsec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo=\r\n"),
        "{head}"
    );
    assert!(
        head.contains("\r\nx-served-by: spillway-test\r\n"),
        "{head}"
    );

    let seen = up.heads.lock().unwrap()[0].to_ascii_lowercase();
    assert!(seen.contains("\r\nconnection: upgrade\r\n"), "{seen}");
    assert!(seen.contains("\r\nupgrade: websocket\r\n"), "{seen}");
    assert!(
        seen.contains("\r\nsec-websocket-key: dghlihnhbxbszsbub25jzq==\r\n"),
        "{seen}"
    );
    assert!(seen.contains("\r\nvia: 1.1 spillway-test\r\n"), "{seen}");

    // A masked text frame "hello", then raw bytes: echoed back exactly, in both directions.
    let frame = [
        0x81u8, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
    ];
    for msg in [&frame[..], b"more bytes after the first frame"] {
        ws.write_all(msg).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        tokio::time::timeout(STEP, ws.read_exact(&mut back))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(back, msg);
    }
    assert_eq!(
        p.metric(IN_FLIGHT).await,
        1.0,
        "the open tunnel is in flight"
    );
    assert_eq!(p.metric(UPGRADED).await, 0.0, "counted when it ends");

    // The client closes its side: the close is passed on, the app closes, the tunnel ends.
    ws.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(STEP, ws.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert!(rest.is_empty());
    assert_eq!(p.metric_settles_at(IN_FLIGHT, 0.0).await, 0.0);
    assert_eq!(p.metric_at_least(UPGRADED, 1.0).await, 1.0);
}

#[tokio::test]
async fn an_upgrade_the_upstream_declines_is_an_ordinary_response() {
    let up = EchoUpstream::start().await;
    let p = TestProxy::start(&TestProxy::simple_config(up.addr, "")).await;
    let answer = raw_exchange(
        p.addr,
        b"GET /plain HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade, close\r\n\r\n",
    )
    .await;
    let text = String::from_utf8_lossy(&answer).to_ascii_lowercase();
    assert!(text.starts_with("http/1.1 200"), "{text}");
    let seen = up.seen();
    assert_eq!(seen[0].header("connection"), "upgrade");
    assert_eq!(seen[0].header("upgrade"), "websocket");
    let ok =
        r#"spillway_requests_total{code="200",method="GET",route="default",source="upstream"}"#;
    assert_eq!(p.metric_at_least(ok, 1.0).await, 1.0);
    assert_eq!(p.metric_settles_at(IN_FLIGHT, 0.0).await, 0.0);
}

#[tokio::test]
async fn h2c_prior_knowledge_on_a_plain_listener() {
    let up = EchoUpstream::start().await;
    let p = TestProxy::start(&TestProxy::simple_config(up.addr, "")).await;
    let mut client = h2c::<Full<Bytes>>(p.addr).await;
    let req = Request::post(p.url("/h2c"))
        .body(Full::new(Bytes::from_static(b"hi")))
        .unwrap();
    let resp = tokio::time::timeout(STEP, client.send_request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.version(), Version::HTTP_2);
    let body = tokio::time::timeout(Duration::from_secs(5), resp.into_body().collect())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(body.to_bytes(), Bytes::from_static(b"hi"));
    assert_eq!(up.seen()[0].header("x-forwarded-proto"), "http");
}
