//! What an audit found a hostile client could do, each reproduced on the wire: a stalled
//! upload blamed on the app, Host confusion, smuggled upgrades, CONNECT.

use super::*;

/// A route with a short timeout and a breaker that opens quickly, to the gated upstream.
fn breaker_config(upstream: SocketAddr) -> String {
    config(upstream, "")
        + "    timeout: 300ms\n    circuit_breaker: { enabled: true, min_requests: 3, failure_ratio: 0.5, window: 10s, open_for: 30s }\n"
}

#[tokio::test]
async fn a_stalled_upload_is_the_clients_408_not_the_apps_504() {
    let up = GatedUpstream::start().await;
    let p = TestProxy::start(&breaker_config(up.addr)).await;
    for _ in 0..6 {
        let mut c = Raw::connect(p.addr).await;
        // One byte of ten, then nothing.
        c.send(b"POST /upload HTTP/1.1\r\nhost: a\r\ncontent-length: 10\r\n\r\nx")
            .await;
        let r = c.response().await;
        assert_generated(&r, 408, "http_request_error", false);
    }
    assert_eq!(
        p.metric(&requests_series(408, "POST", DEFAULT_ROUTE, "proxy"))
            .await,
        6.0
    );
    let text = p.metrics().await;
    assert_eq!(metric_sum(&text, "spillway_upstream_errors_total"), 0.0);
    assert_eq!(
        metric_value(&text, r#"spillway_circuit_breaker_state{route="default"}"#),
        0.0,
        "the breaker stays closed"
    );
    // An innocent request to the healthy app is served.
    assert_eq!(get(&p.url("/fine")).await.status, StatusCode::OK);
}

#[tokio::test]
async fn a_slow_app_with_a_whole_upload_is_still_a_504() {
    let up = GatedUpstream::start().await;
    let p = TestProxy::start(&breaker_config(up.addr)).await;
    let mut c = Raw::connect(p.addr).await;
    c.send(b"POST /slow?ms=2000 HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\n\r\nabc")
        .await;
    let r = c.response().await;
    assert_generated(&r, 504, "http_response_timeout", false);
    assert_eq!(
        p.metric(&upstream_errors_series(
            "http_response_timeout",
            DEFAULT_ROUTE
        ))
        .await,
        1.0
    );
}

/// Two routes: `admin.internal` in maintenance, everything else to the echo upstream.
fn host_routes(upstream: SocketAddr) -> String {
    config(upstream, "").replace(
        "routes:\n",
        "routes:\n  - name: admin\n    match: { host: admin.internal }\n    upstream: app\n    maintenance: { enabled: true }\n",
    )
}

#[tokio::test]
async fn the_app_sees_the_host_spillway_routed_on() {
    let up = EchoUpstream::start().await;
    let p = TestProxy::start(&host_routes(up.addr)).await;
    let exchange = |raw: &'static [u8]| async move {
        let mut c = Raw::connect(p.addr).await;
        c.send(raw).await;
        c.response().await
    };
    // Absolute form: the target's authority is the host, whatever Host says.
    let r = exchange(b"GET http://admin.internal/secret HTTP/1.1\r\nhost: a.test\r\n\r\n").await;
    assert_eq!(r.status, 503, "routed to the admin route: {r:?}");
    // `Connection: host` cannot strip the Host that was routed on.
    let r = exchange(b"GET /x HTTP/1.1\r\nhost: a.test\r\nconnection: host\r\n\r\n").await;
    assert_eq!(r.status, 200, "{r:?}");
    let seen = up.seen();
    assert_eq!(seen.len(), 1, "only the second reached the app");
    assert_eq!(seen[0].header("host"), "a.test");
    // An absolute-form request to another host reaches the app with that host.
    let r = exchange(b"GET http://b.test/y HTTP/1.1\r\nhost: admin.internal\r\n\r\n").await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(up.seen()[1].header("host"), "b.test");
}

#[tokio::test]
async fn ambiguous_or_missing_hosts_are_400() {
    let up = EchoUpstream::start().await;
    let p = TestProxy::start(&host_routes(up.addr)).await;
    for raw in [
        &b"GET /secret HTTP/1.1\r\nhost: a.test\r\nhost: admin.internal\r\n\r\n"[..],
        b"GET /secret HTTP/1.1\r\n\r\n",
        b"GET /secret HTTP/1.1\r\nhost: user@admin.internal\r\n\r\n",
        b"GET /secret HTTP/1.1\r\nhost: a b\r\n\r\n",
        b"GET /secret HTTP/1.1\r\nhost: \r\n\r\n",
    ] {
        let mut c = Raw::connect(p.addr).await;
        c.send(raw).await;
        let r = c.response().await;
        assert_generated(&r, 400, "http_request_error", false);
    }
    assert_eq!(up.seen().len(), 0);
    assert_eq!(
        p.metric(&requests_series(400, "GET", "unmatched", "proxy"))
            .await,
        5.0
    );
}

#[tokio::test]
async fn an_http2_host_that_disagrees_with_the_authority_is_400() {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let up = EchoUpstream::start().await;
    let p = TestProxy::start(&host_routes(up.addr)).await;
    let tcp = TcpStream::connect(p.addr).await.unwrap();
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get("http://a.test/x")
        .header("host", "admin.internal")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let r = h2.send_request(req).await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let agree = http::Request::get("http://a.test/x")
        .header("host", "a.test")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    assert_eq!(
        h2.send_request(agree).await.unwrap().status(),
        StatusCode::OK
    );
    assert_eq!(up.seen().len(), 1);
}

#[tokio::test]
async fn only_allowed_upgrades_are_passed_on() {
    let up = EchoUpstream::start().await;
    let p = TestProxy::start(&config(up.addr, "")).await;
    // h2c is not in the default `upgrades: [websocket]`: the app gets a plain request.
    let mut c = Raw::connect(p.addr).await;
    c.send(b"GET /x HTTP/1.1\r\nhost: a\r\nconnection: Upgrade, HTTP2-Settings\r\nupgrade: h2c\r\nhttp2-settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n").await;
    let r = c.response().await;
    assert_eq!(r.status, 200, "{r:?}");
    let seen = &up.seen()[0];
    assert_eq!(seen.header("upgrade"), "", "no upgrade forwarded");
    assert!(
        !seen.header("connection").contains("pgrade"),
        "{:?}",
        seen.header("connection")
    );
    assert_eq!(seen.header("http2-settings"), "");
}

#[tokio::test]
async fn connect_is_405_unless_a_route_lists_it() {
    let up = EchoUpstream::start().await;
    let p = TestProxy::start(&config(up.addr, "")).await;
    let mut c = Raw::connect(p.addr).await;
    c.send(b"CONNECT example.com:443 HTTP/1.1\r\nhost: example.com:443\r\n\r\n")
        .await;
    let r = c.response().await;
    assert_generated(&r, 405, "http_request_denied", false);
    assert_eq!(
        r.header("allow"),
        "GET, HEAD, POST, PUT, DELETE, OPTIONS, PATCH"
    );
    assert_eq!(up.seen().len(), 0);
    assert_eq!(
        p.metric(&requests_series(405, "CONNECT", DEFAULT_ROUTE, "proxy"))
            .await,
        1.0
    );
}

#[tokio::test]
async fn a_route_that_lists_connect_tunnels_it() {
    use tokio::net::TcpListener;
    // An app that accepts CONNECT and then echoes the tunnel's bytes.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = listener.local_addr().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let seen2 = seen.clone();
    let task = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut b).await.unwrap();
            head.push(b[0]);
        }
        *seen2.lock().unwrap() = String::from_utf8_lossy(&head).into_owned();
        s.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        loop {
            let n = s.read(&mut buf).await.unwrap();
            if n == 0 {
                return;
            }
            s.write_all(&buf[..n]).await.unwrap();
        }
    });
    let yaml = config(app, "").replace(
        "    match: { path_prefix: / }\n",
        "    match: { methods: [CONNECT] }\n",
    );
    let p = TestProxy::start(&yaml).await;
    let mut c = Raw::connect(p.addr).await;
    c.send(b"CONNECT db.internal:5432 HTTP/1.1\r\nhost: db.internal:5432\r\n\r\n")
        .await;
    let r = c.response().await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("content-length"), "");
    assert!(seen
        .lock()
        .unwrap()
        .starts_with("CONNECT db.internal:5432 HTTP/1.1\r\n"));
    c.send(b"ping").await;
    let mut echoed = [0u8; 4];
    tokio::time::timeout(STEP, c.sock.read_exact(&mut echoed))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&echoed, b"ping");
    drop(c);
    let _ = tokio::time::timeout(STEP, task).await;
}

#[tokio::test]
async fn an_app_that_stalls_mid_body_is_cut_at_the_body_timeout() {
    use tokio::net::TcpListener;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = listener.local_addr().unwrap();
    let _app = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 1024];
        let _ = s.read(&mut buf).await.unwrap();
        s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nhello")
            .await
            .unwrap();
        // And nothing more, without closing.
        tokio::time::sleep(STEP * 2).await;
    });
    let yaml = config(app, "").replace(
        "    connect_timeout: 500ms\n",
        "    connect_timeout: 500ms\n    body_timeout: 300ms\n",
    );
    let p = TestProxy::start(&yaml).await;
    let mut c = Raw::connect(p.addr).await;
    c.send(b"GET /stream HTTP/1.1\r\nhost: a\r\n\r\n").await;
    let started = Instant::now();
    let took = c.closed_within().await;
    let text = String::from_utf8_lossy(&c.buf).into_owned();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.ends_with("\r\n\r\nhello"),
        "the body is cut, not completed: {text}"
    );
    assert!(
        took >= Duration::from_millis(250) && started.elapsed() < Duration::from_secs(3),
        "{took:?}"
    );
    assert_eq!(
        p.metric_settles_at(&upstream_errors_series("body_timeout", DEFAULT_ROUTE), 1.0)
            .await,
        1.0
    );
}

#[tokio::test]
async fn the_admin_control_endpoints_answer_only_their_own_host() {
    let up = EchoUpstream::start().await;
    let p = TestProxy::start(&config(up.addr, "    header_timeout: 300ms\n")).await;
    let ask = |raw: String| async move {
        let mut c = Raw::connect(p.admin).await;
        c.send(raw.as_bytes()).await;
        c.response().await.status
    };
    let admin = p.admin;
    for path in ["/", "/status.json", "/config"] {
        assert_eq!(
            ask(format!("GET {path} HTTP/1.1\r\nhost: {admin}\r\n\r\n")).await,
            200,
            "{path}"
        );
        assert_eq!(
            ask(format!(
                "GET {path} HTTP/1.1\r\nhost: localhost:9901\r\n\r\n"
            ))
            .await,
            200
        );
        // DNS rebinding: the attacker's name resolving to this address.
        assert_eq!(
            ask(format!("GET {path} HTTP/1.1\r\nhost: evil.example\r\n\r\n")).await,
            403,
            "{path}"
        );
    }
    // A cross-site POST from a page in the operator's browser.
    assert_eq!(
        ask(format!("POST /reload HTTP/1.1\r\nhost: {admin}\r\norigin: http://evil.example\r\ncontent-length: 0\r\n\r\n")).await,
        403
    );
    // Probes and scrapes come by any name (the pod's address).
    for path in ["/metrics", "/healthz", "/readyz"] {
        assert_eq!(
            ask(format!(
                "GET {path} HTTP/1.1\r\nhost: 10.1.2.3:9901\r\n\r\n"
            ))
            .await,
            200,
            "{path}"
        );
    }
    // Admin connections are timed like the listener's: a silent one is closed.
    let mut silent = Raw::connect(p.admin).await;
    let took = silent.closed_within().await;
    assert!(took < Duration::from_secs(3), "{took:?}");
}
