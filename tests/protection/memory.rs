//! Memory pressure: with the limit set (by a reload) far below what spillway uses, it sheds as
//! documented — idle connections closed, new connections refused, new requests on an open
//! HTTP/2 connection answered 503 `memory_pressure`, `/readyz` failing and `/healthz` not —
//! and serves normally again once the limit is back.

use super::*;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};

/// The route config with `limits.memory_bytes` set to `bytes`.
fn with_limit(upstream: SocketAddr, bytes: u64) -> String {
    format!("{}limits:\n  memory_bytes: {bytes}\n", config(upstream, ""))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_of_memory_spillway_sheds_and_recovers() {
    let up = EchoUpstream::start().await;
    let dir = TempDir::new("memory");
    let path = dir.join("spillway.yaml");
    std::fs::write(&path, with_limit(up.addr, 1 << 40)).unwrap();
    let p = TestProxy::start_file(&path).await;
    let pressure = "spillway_memory_pressure";

    // An idle HTTP/1.1 keep-alive connection, and an HTTP/2 one.
    let mut idle = Raw::connect(p.addr).await;
    idle.send(b"GET /a HTTP/1.1\r\nhost: a\r\n\r\n").await;
    assert_eq!(idle.response().await.status, 200);
    let tcp = TcpStream::connect(p.addr).await.unwrap();
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let h2_get = |path: &str| {
        http::Request::get(format!("http://{}{path}", p.addr))
            .body(Empty::<Bytes>::new())
            .unwrap()
    };
    let r = h2.send_request(h2_get("/h2")).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(p.metric(pressure).await, 0.0);

    // A limit of one byte: spillway is far above the hard mark at once.
    std::fs::write(&path, with_limit(up.addr, 1)).unwrap();
    p.server.reloader.reload().expect("reload accepted");
    assert_eq!(p.metric_settles_at(pressure, 2.0).await, 2.0);
    assert_eq!(p.metric("spillway_memory_limit_bytes").await, 1.0);

    // The idle connection is closed.
    let took = idle.closed_within().await;
    assert!(took < Duration::from_secs(2), "{took:?}");
    // A new connection is refused at once, as at the connection cap.
    let mut refused = Raw::connect(p.addr).await;
    let r = refused.response().await;
    assert_eq!(r.status, 503);
    assert_eq!(
        r.header("proxy-status"),
        format!("{SERVER_ID}; error=connection_limit_reached")
    );
    assert_eq!(
        p.metric(r#"spillway_connections_refused_total{listener="http"}"#)
            .await,
        1.0
    );
    // A new request on the open HTTP/2 connection: 503, memory pressure.
    let r = h2.send_request(h2_get("/h2-again")).await.unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        r.headers()["proxy-status"],
        format!("{SERVER_ID}; error=proxy_internal_response")
    );
    assert_eq!(r.headers()["retry-after"], "5");
    assert_eq!(
        r.into_body().collect().await.unwrap().to_bytes(),
        "proxy short of memory, retry later\n"
    );
    assert_eq!(
        p.metric(
            r#"spillway_shed_total{priority="normal",reason="memory_pressure",route="default"}"#
        )
        .await,
        1.0
    );
    assert_eq!(up.seen().len(), 2, "the app saw nothing new");
    let admin = |path: &str| format!("http://{}{path}", p.admin);
    assert_eq!(
        get(&admin("/readyz")).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(get(&admin("/healthz")).await.status, StatusCode::OK);

    // The limit back: served again.
    std::fs::write(&path, with_limit(up.addr, 1 << 40)).unwrap();
    p.server.reloader.reload().expect("reload accepted");
    assert_eq!(p.metric_settles_at(pressure, 0.0).await, 0.0);
    assert_eq!(get(&p.url("/back")).await.status, StatusCode::OK);
    assert_eq!(get(&admin("/readyz")).await.status, StatusCode::OK);
}
