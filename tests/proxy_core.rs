//! The proxy core contract, end to end over loopback: what the client sees for every upstream
//! outcome (status, `Proxy-Status`, `x-served-by`, body), how requests are rewritten, how
//! bodies stream, pooling and the keep-alive race, route matching, metrics and the admin
//! endpoint.

// `common` calls tokio's deprecated `TcpStream::set_linger` (Misbehaviour::Reset); the
// non-deprecated equivalent is `set_zero_linger()`. Allowed here until common is changed.
#[allow(deprecated)]
mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Method, Request, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use spillway::demo_app::DemoApp;
use tokio::sync::mpsc;

/// A config with one upstream `app` (with extra upstream YAML) and one route `default` for `/`.
fn config(upstream: SocketAddr, upstream_extra: &str, route_extra: &str) -> String {
    format!(
        "server_id: {SERVER_ID}\n\
         listeners:\n  - name: http\n    address: 127.0.0.1:0\n\
         admin:\n  address: 127.0.0.1:0\n\
         upstreams:\n  app:\n    endpoints: [\"{upstream}\"]\n{upstream_extra}\
         routes:\n  - name: {DEFAULT_ROUTE}\n    match: {{ path_prefix: / }}\n    upstream: app\n{route_extra}"
    )
}

fn duration_count_series(code: u16, route: &str) -> String {
    format!(r#"spillway_request_duration_seconds_count{{code="{code}",route="{route}"}}"#)
}

/// Everything a generated error response must be: exact status and `Proxy-Status`,
/// `x-served-by: <server_id>`, a short plain-text body, and nothing internal.
fn assert_generated(r: &Resp, status: u16, error_type: &str, upstream: SocketAddr) {
    assert_eq!(r.status.as_u16(), status, "{r:?}");
    assert_eq!(
        r.header("proxy-status"),
        format!("{SERVER_ID}; error={error_type}"),
        "{r:?}"
    );
    assert_eq!(r.header("x-served-by"), SERVER_ID, "{r:?}");
    assert_eq!(
        r.header("content-type"),
        "text/plain; charset=utf-8",
        "{r:?}"
    );
    assert!(!r.header("x-request-id").is_empty(), "{r:?}");
    assert_no_internals(r, upstream);
}

fn assert_no_internals(r: &Resp, upstream: SocketAddr) {
    let body = std::str::from_utf8(&r.body).expect("plain-text body");
    assert!(
        !body.is_empty() && body.len() <= 100,
        "short body expected: {body:?}"
    );
    for leak in [
        "127.0.0.1",
        &upstream.port().to_string(),
        "os error",
        "Connection refused",
    ] {
        assert!(!body.contains(leak), "body leaks {leak:?}: {body:?}");
    }
    for (name, value) in &r.headers {
        let v = value.to_str().unwrap_or("");
        assert!(
            !v.contains("127.0.0.1") && !v.contains(&upstream.port().to_string()),
            "header {name} leaks an internal address: {v:?}"
        );
    }
}

/// Asserts the counts of one generated error: the response once (source="proxy"), the upstream
/// error once, the duration observed once, nothing in flight.
async fn assert_error_counted(p: &TestProxy, status: u16, kind: Option<&str>) {
    let s = requests_series(status, "GET", DEFAULT_ROUTE, "proxy");
    assert_eq!(p.metric_at_least(&s, 1.0).await, 1.0, "{s}");
    assert_eq!(
        p.metric(&duration_count_series(status, DEFAULT_ROUTE))
            .await,
        1.0
    );
    if let Some(kind) = kind {
        assert_eq!(
            p.metric(&upstream_errors_series(kind, DEFAULT_ROUTE)).await,
            1.0,
            "{kind}"
        );
    }
    assert_eq!(
        p.metric(&requests_series(status, "GET", DEFAULT_ROUTE, "upstream"))
            .await,
        0.0
    );
    assert_eq!(
        p.metric_settles_at(&in_flight_series(DEFAULT_ROUTE), 0.0)
            .await,
        0.0
    );
}

// ---------------------------------------------------------------------------------------------
// The status contract
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn upstream_answers_pass_through_unchanged_including_its_5xx() {
    let app = DemoApp::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let p = TestProxy::start(&TestProxy::simple_config(app.local_addr(), "")).await;

    let ok = get(&p.url("/ok")).await;
    assert_eq!(ok.status, StatusCode::OK);
    assert_eq!(ok.text(), "ok\n");
    assert_eq!(ok.header("x-served-by"), "demo-app, spillway-test");
    assert!(ok.headers.get("proxy-status").is_none(), "{ok:?}");

    for code in [404u16, 500, 502, 503, 504] {
        let r = get(&p.url(&format!("/status/{code}"))).await;
        assert_eq!(r.status.as_u16(), code, "{r:?}");
        assert_eq!(r.header("x-served-by"), "demo-app, spillway-test");
        // The app's own error is not the proxy's: no Proxy-Status, no upstream error counted.
        assert!(r.headers.get("proxy-status").is_none(), "{r:?}");
        assert!(!r.body.is_empty());
    }

    for code in [200u16, 404, 500, 502, 503, 504] {
        let s = requests_series(code, "GET", DEFAULT_ROUTE, "upstream");
        assert_eq!(p.metric_at_least(&s, 1.0).await, 1.0, "{s}");
        assert_eq!(
            p.metric(&requests_series(code, "GET", DEFAULT_ROUTE, "proxy"))
                .await,
            0.0
        );
    }
    let text = p.metrics().await;
    for kind in [
        "connection_refused",
        "connection_terminated",
        "http_protocol_error",
        "http_response_timeout",
    ] {
        assert_eq!(
            metric_value(&text, &upstream_errors_series(kind, DEFAULT_ROUTE)),
            0.0,
            "{kind}"
        );
    }
}

#[tokio::test]
async fn connect_refused_is_502_connection_refused() {
    let nowhere = refusing_addr().await;
    let p = TestProxy::start(&TestProxy::simple_config(nowhere, "")).await;
    let r = get(&p.url("/ok")).await;
    assert_generated(&r, 502, "connection_refused", nowhere);
    assert_error_counted(&p, 502, Some("connection_refused")).await;
}

#[tokio::test]
async fn upstream_closing_before_the_head_is_502_connection_terminated() {
    let up = RawUpstream::start(Misbehaviour::CloseBeforeHead).await;
    let p = TestProxy::start(&TestProxy::simple_config(up.addr, "")).await;
    let r = get(&p.url("/x")).await;
    assert_generated(&r, 502, "connection_terminated", up.addr);
    assert_error_counted(&p, 502, Some("connection_terminated")).await;
    // Sent once: a request the app may have acted on is not resent on a fresh connection.
    assert_eq!(up.accepted(), 1);
}

#[tokio::test]
async fn upstream_reset_before_the_head_is_502_connection_terminated() {
    let up = RawUpstream::start(Misbehaviour::Reset).await;
    let p = TestProxy::start(&TestProxy::simple_config(up.addr, "")).await;
    let r = get(&p.url("/x")).await;
    assert_generated(&r, 502, "connection_terminated", up.addr);
    assert_error_counted(&p, 502, Some("connection_terminated")).await;
    assert_eq!(up.accepted(), 1);
}

#[tokio::test]
async fn malformed_upstream_response_is_502_http_protocol_error() {
    let up = RawUpstream::start(Misbehaviour::Garbage).await;
    let p = TestProxy::start(&TestProxy::simple_config(up.addr, "")).await;
    let r = get(&p.url("/x")).await;
    assert_generated(&r, 502, "http_protocol_error", up.addr);
    assert_error_counted(&p, 502, Some("http_protocol_error")).await;
}

#[tokio::test]
async fn connect_timeout_is_504_connection_timeout() {
    // A listener with a full accept queue: the kernel drops new SYNs, so connect hangs.
    let Some(hole) = BlackholeUpstream::start().await else {
        panic!("could not fill a listen(1) accept queue on this kernel: connect timeouts cannot be provoked");
    };
    let p = TestProxy::start(&config(hole.addr, "    connect_timeout: 200ms\n", "")).await;
    let started = tokio::time::Instant::now();
    let r = get(&p.url("/x")).await;
    let took = started.elapsed();
    assert_generated(&r, 504, "connection_timeout", hole.addr);
    assert_error_counted(&p, 504, Some("connection_timeout")).await;
    // The connect timeout answered, not the 30 s route timeout.
    assert!(
        took >= Duration::from_millis(200) && took < Duration::from_secs(5),
        "{took:?}"
    );
}

#[tokio::test]
async fn response_head_not_within_the_route_timeout_is_504_http_response_timeout() {
    let up = RawUpstream::start(Misbehaviour::Stall).await;
    let p = TestProxy::start(&TestProxy::simple_config(up.addr, "    timeout: 300ms\n")).await;
    let started = tokio::time::Instant::now();
    let r = get(&p.url("/x")).await;
    let took = started.elapsed();
    assert_generated(&r, 504, "http_response_timeout", up.addr);
    assert_error_counted(&p, 504, Some("http_response_timeout")).await;
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(5),
        "{took:?}"
    );
}

#[tokio::test]
async fn via_naming_this_server_is_508_and_never_reaches_the_upstream() {
    let up = EchoUpstream::start().await;
    let p = TestProxy::start(&TestProxy::simple_config(up.addr, "")).await;

    for via in [
        "1.1 spillway-test",
        "1.0 lb, 1.1 spillway-test",
        "HTTP/1.1 spillway-test (spillway)",
    ] {
        let r = send(
            Request::get(p.url("/x"))
                .header("via", via)
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await;
        assert_generated(&r, 508, "proxy_loop_detected", up.addr);
    }
    assert_eq!(
        up.seen().len(),
        0,
        "a looping request must not be forwarded"
    );
    let s = requests_series(508, "GET", DEFAULT_ROUTE, "proxy");
    assert_eq!(p.metric_at_least(&s, 3.0).await, 3.0);

    // A different id that merely starts with ours is not a loop.
    let r = send(
        Request::get(p.url("/x"))
            .header("via", "1.1 spillway-test-2")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(up.seen().len(), 1);
    assert_eq!(
        up.seen()[0].header("via"),
        "1.1 spillway-test-2, 1.1 spillway-test"
    );
}

#[tokio::test]
async fn unmatched_request_is_404_counted_as_unmatched() {
    let up = EchoUpstream::start().await;
    let yaml =
        TestProxy::simple_config(up.addr, "").replace("path_prefix: /", "path_prefix: /only");
    let p = TestProxy::start(&yaml).await;

    let r = get(&p.url("/elsewhere")).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.header("x-served-by"), SERVER_ID);
    assert!(!r.header("proxy-status").contains("error="), "{r:?}");
    assert!(!r.header("x-request-id").is_empty());
    assert_no_internals(&r, up.addr);
    assert_eq!(up.seen().len(), 0);

    let s = requests_series(404, "GET", "unmatched", "proxy");
    assert_eq!(p.metric_at_least(&s, 1.0).await, 1.0);
    assert_eq!(
        p.metric(&duration_count_series(404, "unmatched")).await,
        1.0
    );
    assert_eq!(
        p.metric(&requests_series(404, "GET", DEFAULT_ROUTE, "proxy"))
            .await,
        0.0
    );
    assert_eq!(
        p.metric_settles_at(&in_flight_series("unmatched"), 0.0)
            .await,
        0.0
    );
}

// ---------------------------------------------------------------------------------------------
// A body that fails after the head
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn upstream_body_failure_aborts_a_content_length_response() {
    let up = RawUpstream::start(Misbehaviour::DieMidBody).await;
    let p = TestProxy::start(&TestProxy::simple_config(up.addr, "")).await;
    let r = send_partial(
        Request::get(p.url("/x"))
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "the head was already sent");
    assert_eq!(r.headers["x-served-by"], SERVER_ID);
    assert!(
        r.body.is_err(),
        "a truncated body must not be presented as complete: {:?}",
        r.body
    );

    // Counted once, as the upstream's 200, plus the termination.
    let s = requests_series(200, "GET", DEFAULT_ROUTE, "upstream");
    assert_eq!(p.metric_at_least(&s, 1.0).await, 1.0);
    assert_eq!(
        p.metric(&upstream_errors_series(
            "connection_terminated",
            DEFAULT_ROUTE
        ))
        .await,
        1.0
    );
    assert_eq!(
        p.metric(&requests_series(200, "GET", DEFAULT_ROUTE, "proxy"))
            .await,
        0.0
    );
    assert_eq!(
        p.metric_settles_at(&in_flight_series(DEFAULT_ROUTE), 0.0)
            .await,
        0.0
    );
}

#[tokio::test]
async fn upstream_body_failure_aborts_a_chunked_response_without_a_terminator() {
    let up = ScriptedUpstream::start(
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n",
    )
    .await;
    let p = TestProxy::start(&TestProxy::simple_config(up.addr, "")).await;

    // Through a real client: the body read fails.
    let r = send_partial(
        Request::get(p.url("/x"))
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.body.is_err(), "{:?}", r.body);

    // On the wire: the chunk that arrived is forwarded, then the connection is closed without
    // the terminating zero-length chunk (even though the client asked for keep-alive).
    assert_chunked_abort_on_wire(p.addr).await;

    let s = requests_series(200, "GET", DEFAULT_ROUTE, "upstream");
    assert_eq!(p.metric_at_least(&s, 2.0).await, 2.0);
    assert_eq!(
        p.metric(&upstream_errors_series(
            "connection_terminated",
            DEFAULT_ROUTE
        ))
        .await,
        2.0
    );
}

#[tokio::test]
async fn upstream_body_failure_resets_the_h2_stream() {
    let up = ScriptedUpstream::start(
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n",
    )
    .await;
    let p = TestProxy::start(&TestProxy::simple_config(up.addr, "")).await;
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let fut = async {
        let resp = client
            .request(req(Method::GET, &p.url("/x"), ""))
            .await
            .unwrap();
        let status = resp.status();
        (
            status,
            resp.into_body().collect().await.map(|c| c.to_bytes()),
        )
    };
    let (status, body) = tokio::time::timeout(STEP, fut).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert!(
        body.is_err(),
        "a truncated body must not end cleanly over HTTP/2: {body:?}"
    );
    assert_eq!(
        p.metric_at_least(
            &upstream_errors_series("connection_terminated", DEFAULT_ROUTE),
            1.0
        )
        .await,
        1.0
    );
}

// ---------------------------------------------------------------------------------------------
// Request and response rewriting
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn forwarded_requests_lose_hop_by_hop_headers_and_gain_via_and_forwarded() {
    let up = EchoUpstream::start().await;
    let p = TestProxy::start(&TestProxy::simple_config(up.addr, "")).await;
    let r = send(
        Request::post(p.url("/echo/path?q=1&x=y"))
            .header("host", "shop.example.com:8080")
            .header("connection", "X-Hop-A, x-hop-b")
            .header("x-hop-a", "1")
            .header("x-hop-b", "2")
            .header("keep-alive", "timeout=5")
            .header("proxy-connection", "keep-alive")
            .header("te", "trailers")
            .header("trailer", "x-checksum")
            .header("upgrade", "websocket")
            .header("via", "1.0 lb")
            .header("x-forwarded-for", "10.1.1.1")
            .header("x-forwarded-proto", "https")
            .header("x-forwarded-host", "evil.example.net")
            .header("x-request-id", "req-abc-123")
            .header("x-end-to-end", "kept")
            .body(Full::new(Bytes::from_static(b"payload")))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(&r.body[..], b"payload");
    assert_eq!(r.header("x-request-id"), "req-abc-123");

    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    let s = &seen[0];
    assert_eq!(s.method, Method::POST);
    assert_eq!(s.uri, "/echo/path?q=1&x=y");
    for gone in [
        "connection",
        "x-hop-a",
        "x-hop-b",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
    ] {
        assert!(
            !s.headers.contains_key(gone),
            "{gone} was forwarded: {:?}",
            s.headers
        );
    }
    assert_eq!(s.header("via"), "1.0 lb, 1.1 spillway-test");
    assert_eq!(s.header("x-forwarded-for"), "10.1.1.1, 127.0.0.1");
    assert_eq!(s.header("x-forwarded-proto"), "http");
    assert_eq!(s.header("x-forwarded-host"), "shop.example.com:8080");
    assert_eq!(s.header("host"), "shop.example.com:8080");
    assert_eq!(s.header("x-request-id"), "req-abc-123");
    assert_eq!(s.header("x-end-to-end"), "kept");
}

/// All lines of a list header joined as RFC 9110 §5.3 defines (one list, in order).
fn joined(headers: &http::HeaderMap, name: &str) -> String {
    headers
        .get_all(name)
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect::<Vec<_>>()
        .join(", ")
}

#[tokio::test]
async fn list_headers_sent_on_several_lines_get_this_hop_appended_last() {
    let up = EchoUpstream::start().await;
    let p = TestProxy::start(&TestProxy::simple_config(up.addr, "")).await;
    let r = send(
        Request::get(p.url("/lists"))
            .header("x-forwarded-for", "10.0.0.1")
            .header("x-forwarded-for", "10.0.0.2")
            .header("via", "1.0 edge")
            .header("via", "1.1 lb")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    // The address that connected to spillway is the last hop: an upstream that trusts the
    // right-most entry must not be handed a client-supplied one there.
    assert_eq!(
        joined(&seen[0].headers, "x-forwarded-for"),
        "10.0.0.1, 10.0.0.2, 127.0.0.1"
    );
    assert_eq!(
        joined(&seen[0].headers, "via"),
        "1.0 edge, 1.1 lb, 1.1 spillway-test"
    );
}

#[tokio::test]
async fn forwarded_headers_are_created_when_absent_and_request_id_generated() {
    let up = EchoUpstream::start().await;
    let p = TestProxy::start(&TestProxy::simple_config(up.addr, "")).await;
    let r = get(&p.url("/plain")).await;
    assert_eq!(r.status, StatusCode::OK);

    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    let s = &seen[0];
    assert_eq!(s.header("via"), "1.1 spillway-test");
    assert_eq!(s.header("x-forwarded-for"), "127.0.0.1");
    assert_eq!(s.header("x-forwarded-proto"), "http");
    assert_eq!(s.header("x-forwarded-host"), p.addr.to_string());
    let id = s.header("x-request-id");
    assert_eq!(id.len(), 32, "{id:?}");
    assert!(id.chars().all(|c| c.is_ascii_hexdigit()), "{id:?}");
    // The upstream and the client see the same id.
    assert_eq!(r.header("x-request-id"), id);

    let r2 = get(&p.url("/plain")).await;
    assert_ne!(r2.header("x-request-id"), id, "ids must differ per request");
}

#[tokio::test]
async fn an_unusable_client_request_id_is_replaced_for_upstream_and_client_alike() {
    let up = EchoUpstream::start().await;
    let p = TestProxy::start(&TestProxy::simple_config(up.addr, "")).await;
    let too_long = "x".repeat(201);
    for sent in ["", too_long.as_str()] {
        let r = send(
            Request::get(p.url("/id"))
                .header("x-request-id", sent)
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK);
        let echoed = r.header("x-request-id");
        assert_eq!(
            echoed.len(),
            32,
            "a fresh id is generated for {sent:?}: {echoed:?}"
        );
        let seen = up.seen();
        let upstream_saw = seen.last().unwrap().header("x-request-id");
        // One id per request: the app's logs and the client must agree on it.
        assert_eq!(upstream_saw, echoed, "client sent {} chars", sent.len());
    }
}

#[tokio::test]
async fn served_by_is_appended_to_the_apps_value_or_set() {
    let app = EchoUpstream::with_headers(&[("x-served-by", "app-7")]).await;
    let p = TestProxy::start(&TestProxy::simple_config(app.addr, "")).await;
    let r = get(&p.url("/")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("x-served-by"), "app-7, spillway-test");

    let bare = EchoUpstream::start().await;
    let p = TestProxy::start(&TestProxy::simple_config(bare.addr, "")).await;
    let r = get(&p.url("/")).await;
    assert_eq!(r.header("x-served-by"), "spillway-test");
    assert!(r.headers.get("proxy-status").is_none());
}

#[tokio::test]
async fn served_by_goes_last_when_the_app_sent_several_lines() {
    let app =
        EchoUpstream::with_headers(&[("x-served-by", "app-7"), ("x-served-by", "sidecar-x")]).await;
    let p = TestProxy::start(&TestProxy::simple_config(app.addr, "")).await;
    let r = get(&p.url("/")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        joined(&r.headers, "x-served-by"),
        "app-7, sidecar-x, spillway-test"
    );
}

#[tokio::test]
async fn response_hop_by_hop_headers_are_removed() {
    let up = RawUpstream::start(Misbehaviour::Raw(
        "HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: X-Resp-Hop\r\nx-resp-hop: 1\r\n\
         keep-alive: timeout=5\r\nproxy-connection: keep-alive\r\nx-app: kept\r\n\r\nok",
    ))
    .await;
    let p = TestProxy::start(&TestProxy::simple_config(up.addr, "")).await;
    let r = get(&p.url("/")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.text(), "ok");
    for gone in ["connection", "x-resp-hop", "keep-alive", "proxy-connection"] {
        assert!(
            r.headers.get(gone).is_none(),
            "{gone} passed through: {:?}",
            r.headers
        );
    }
    assert_eq!(r.header("x-app"), "kept");
    assert_eq!(r.header("x-served-by"), SERVER_ID);
}

// ---------------------------------------------------------------------------------------------
// Connections
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn sequential_requests_share_one_pooled_upstream_connection() {
    let up = EchoUpstream::start().await;
    let p = TestProxy::start(&TestProxy::simple_config(up.addr, "")).await;
    for i in 0..20 {
        let r = get(&p.url(&format!("/n/{i}"))).await;
        assert_eq!(r.status, StatusCode::OK, "request {i}");
    }
    assert_eq!(up.seen().len(), 20);
    assert_eq!(
        up.connections(),
        1,
        "20 sequential requests should reuse one upstream connection"
    );
}

#[tokio::test]
async fn an_http10_request_without_host_reaches_the_upstream_with_one() {
    // HTTP/1.1 requires Host; an HTTP/1.0 client may send none. The upstream gets the
    // endpoint's authority, and no X-Forwarded-Host is invented.
    let up = EchoUpstream::start().await;
    let p = TestProxy::start(&TestProxy::simple_config(up.addr, "")).await;
    let out = raw_exchange(p.addr, b"GET /old HTTP/1.0\r\n\r\n").await;
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.0 200"), "{text}");
    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].header("host"), up.addr.to_string());
    assert_eq!(seen[0].header("x-forwarded-host"), "");
}

#[tokio::test]
async fn keep_alive_race_is_resent_on_a_fresh_connection() {
    // The app closes connections idle for 1 s; spillway keeps them for 10 s, so it reuses
    // connections the app has closed: only the resend on a fresh connection avoids a 502.
    let up = IdleClosingUpstream::start(Duration::from_secs(1)).await;
    let p = TestProxy::start(&config(up.addr, "    idle_timeout: 10s\n", "")).await;
    for i in 0..4 {
        if i > 0 {
            // The scenario itself: let the pooled connection sit idle past the app's limit.
            tokio::time::sleep(Duration::from_millis(1100)).await;
        }
        let r = get(&p.url("/race")).await;
        assert_eq!(r.status, StatusCode::OK, "request {i}: {r:?}");
        assert_eq!(r.text(), "ok");
    }
    assert!(
        up.closed_on_request() >= 1,
        "the race never happened: the test proves nothing"
    );
    assert_eq!(up.answered(), 4, "each request answered exactly once");
    let s = requests_series(200, "GET", DEFAULT_ROUTE, "upstream");
    assert_eq!(p.metric_at_least(&s, 4.0).await, 4.0);
    assert_eq!(
        p.metric(&requests_series(502, "GET", DEFAULT_ROUTE, "proxy"))
            .await,
        0.0
    );
    assert_eq!(
        p.metric(&upstream_errors_series(
            "connection_terminated",
            DEFAULT_ROUTE
        ))
        .await,
        0.0
    );
}

// ---------------------------------------------------------------------------------------------
// Bodies
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn bodies_stream_both_ways_without_buffering() {
    let up = EchoUpstream::start().await;
    let p = TestProxy::start(&TestProxy::simple_config(up.addr, "")).await;
    let client: Client<_, ChannelBody> = Client::builder(TokioExecutor::new()).build_http();
    let (tx, rx) = mpsc::channel(1);
    tx.send(Bytes::from_static(b"chunk-0;")).await.unwrap();
    let resp = tokio::time::timeout(
        STEP,
        client.request(
            Request::post(p.url("/stream"))
                .body(ChannelBody(rx))
                .unwrap(),
        ),
    )
    .await
    .expect("head while the request body is still open")
    .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    // Each chunk must come back before the next is sent: a proxy that buffered either body
    // whole would never answer.
    for i in 0..5 {
        if i > 0 {
            tx.send(Bytes::from(format!("chunk-{i};"))).await.unwrap();
        }
        let want = format!("chunk-{i};");
        let mut got = Vec::new();
        while got.len() < want.len() {
            let frame = tokio::time::timeout(STEP, body.frame())
                .await
                .expect("echoed chunk in time");
            let frame = frame.expect("body still open").expect("body ok");
            got.extend_from_slice(frame.data_ref().expect("data frame"));
        }
        assert_eq!(String::from_utf8(got).unwrap(), want);
    }
    drop(tx);
    let rest = tokio::time::timeout(STEP, body.collect())
        .await
        .expect("end in time")
        .expect("clean end");
    assert!(rest.to_bytes().is_empty());
}

#[tokio::test]
async fn eight_mib_body_streams_intact_both_ways() {
    const SIZE: usize = 8 * 1024 * 1024;
    const CHUNK: usize = 64 * 1024;
    let up = EchoUpstream::start().await;
    let p = TestProxy::start(&TestProxy::simple_config(up.addr, "")).await;
    let data = pattern(SIZE);

    let client: Client<_, ChannelBody> = Client::builder(TokioExecutor::new()).build_http();
    let (tx, rx) = mpsc::channel(4);
    let sender = {
        let data = data.clone();
        tokio::spawn(async move {
            for off in (0..SIZE).step_by(CHUNK) {
                if tx.send(data.slice(off..off + CHUNK)).await.is_err() {
                    return;
                }
            }
        })
    };
    let fut = async {
        let resp = client
            .request(
                Request::post(p.url("/upload"))
                    .body(ChannelBody(rx))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        resp.into_body()
            .collect()
            .await
            .expect("whole body")
            .to_bytes()
    };
    let echoed = tokio::time::timeout(Duration::from_secs(60), fut)
        .await
        .expect("8 MiB round trip in time");
    sender.await.unwrap();
    assert_eq!(echoed.len(), SIZE);
    assert!(echoed == data, "body corrupted in transit");
    let s = requests_series(200, "POST", DEFAULT_ROUTE, "upstream");
    assert_eq!(p.metric_at_least(&s, 1.0).await, 1.0);
}

// ---------------------------------------------------------------------------------------------
// Routing
// ---------------------------------------------------------------------------------------------

/// (method, path, Host or `None` for the default, `(route, upstream)` or `None` for unmatched)
type RouteCase = (
    Method,
    &'static str,
    Option<&'static str>,
    Option<(&'static str, &'static str)>,
);

#[tokio::test]
async fn routes_match_prefix_host_and_method_first_match_wins() {
    let a = EchoUpstream::with_headers(&[("x-which", "a")]).await;
    let b = EchoUpstream::with_headers(&[("x-which", "b")]).await;
    let c = EchoUpstream::with_headers(&[("x-which", "c")]).await;
    let yaml = format!(
        "server_id: {SERVER_ID}\n\
         listeners:\n  - name: http\n    address: 127.0.0.1:0\n\
         admin:\n  address: 127.0.0.1:0\n\
         upstreams:\n\
         \x20 a: {{ endpoints: [\"{}\"] }}\n\
         \x20 b: {{ endpoints: [\"{}\"] }}\n\
         \x20 c: {{ endpoints: [\"{}\"] }}\n\
         routes:\n\
         \x20 - {{ name: api, match: {{ path_prefix: /api }}, upstream: a }}\n\
         \x20 - {{ name: shop, match: {{ host: Shop.Example.com }}, upstream: b }}\n\
         \x20 - {{ name: wild, match: {{ host: \"*.example.com\", methods: [post, PUT] }}, upstream: c }}\n\
         \x20 - {{ name: first, match: {{ path_prefix: /dup/ }}, upstream: a }}\n\
         \x20 - {{ name: second, match: {{ path_prefix: /dup }}, upstream: b }}\n",
        a.addr, b.addr, c.addr
    );
    let p = TestProxy::start(&yaml).await;

    let cases: &[RouteCase] = &[
        (Method::GET, "/api", None, Some(("api", "a"))),
        (Method::GET, "/api/", None, Some(("api", "a"))),
        (Method::GET, "/api/x/y?z=1", None, Some(("api", "a"))),
        (Method::GET, "/apix", None, None),
        (
            Method::GET,
            "/apix",
            Some("SHOP.example.COM:8080"),
            Some(("shop", "b")),
        ),
        // Both api and shop match: the first in file order wins.
        (
            Method::GET,
            "/api/x",
            Some("shop.example.com"),
            Some(("api", "a")),
        ),
        (Method::GET, "/", Some("shopx.example.com"), None),
        (
            Method::POST,
            "/x",
            Some("a.b.example.com"),
            Some(("wild", "c")),
        ),
        (
            Method::PUT,
            "/x",
            Some("Deep.Example.COM:9999"),
            Some(("wild", "c")),
        ),
        (Method::GET, "/x", Some("a.example.com"), None),
        (Method::POST, "/x", Some("example.com"), None),
        (Method::POST, "/x", Some("badexample.com"), None),
        (Method::GET, "/dup", None, Some(("first", "a"))),
        (Method::GET, "/dup/z", None, Some(("first", "a"))),
    ];
    for (method, path, host, want) in cases {
        let mut b = Request::builder().method(method.clone()).uri(p.url(path));
        if let Some(h) = host {
            b = b.header("host", *h);
        }
        let r = send(b.body(Full::new(Bytes::new())).unwrap()).await;
        let what = format!("{method} {path} host={host:?}");
        match want {
            Some((_, upstream)) => {
                assert_eq!(r.status, StatusCode::OK, "{what}: {r:?}");
                assert_eq!(r.header("x-which"), *upstream, "{what}");
            }
            None => {
                assert_eq!(r.status, StatusCode::NOT_FOUND, "{what}: {r:?}");
                assert_eq!(r.header("x-which"), "", "{what}");
                assert_eq!(r.header("x-served-by"), SERVER_ID, "{what}");
            }
        }
    }
    assert_eq!(a.seen().len(), 6);
    assert_eq!(b.seen().len(), 1);
    assert_eq!(c.seen().len(), 2);

    let expect = [
        (requests_series(200, "GET", "api", "upstream"), 4.0),
        (requests_series(200, "GET", "shop", "upstream"), 1.0),
        (requests_series(200, "POST", "wild", "upstream"), 1.0),
        (requests_series(200, "PUT", "wild", "upstream"), 1.0),
        (requests_series(200, "GET", "first", "upstream"), 2.0),
        (requests_series(200, "GET", "second", "upstream"), 0.0),
        (requests_series(404, "GET", "unmatched", "proxy"), 3.0),
        (requests_series(404, "POST", "unmatched", "proxy"), 2.0),
    ];
    for (series, n) in &expect {
        assert_eq!(p.metric_at_least(series, *n).await, *n, "{series}");
    }
}

// ---------------------------------------------------------------------------------------------
// Metrics and admin
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn metrics_count_each_response_exactly_once() {
    let app = DemoApp::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let nowhere = refusing_addr().await;
    let yaml = format!(
        "server_id: {SERVER_ID}\n\
         listeners:\n  - name: http\n    address: 127.0.0.1:0\n\
         admin:\n  address: 127.0.0.1:0\n\
         upstreams:\n\
         \x20 app: {{ endpoints: [\"{}\"] }}\n\
         \x20 dead: {{ endpoints: [\"{nowhere}\"] }}\n\
         routes:\n\
         \x20 - {{ name: broken, match: {{ path_prefix: /broken }}, upstream: dead }}\n\
         \x20 - {{ name: app, match: {{ path_prefix: / }}, upstream: app }}\n",
        app.local_addr()
    );
    let p = TestProxy::start(&yaml).await;
    for _ in 0..3 {
        assert_eq!(get(&p.url("/ok")).await.status, StatusCode::OK);
    }
    assert_eq!(
        get(&p.url("/status/503")).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        send(req(Method::DELETE, &p.url("/ok"), "")).await.status,
        StatusCode::OK
    );
    let brew = Method::from_bytes(b"BREW").unwrap();
    assert_eq!(
        send(req(brew.clone(), &p.url("/ok"), "")).await.status,
        StatusCode::OK
    );
    assert_eq!(
        send(req(brew, &p.url("/broken"), "")).await.status,
        StatusCode::BAD_GATEWAY
    );
    for _ in 0..2 {
        assert_eq!(
            get(&p.url("/broken/x")).await.status,
            StatusCode::BAD_GATEWAY
        );
    }
    // A streamed body, to be sure accounting waits for its end.
    let r = get(&p.url("/stream?chunks=3&interval_ms=10")).await;
    assert_eq!(r.status, StatusCode::OK);

    let expect = [
        (requests_series(200, "GET", "app", "upstream"), 4.0),
        (requests_series(503, "GET", "app", "upstream"), 1.0),
        (requests_series(200, "DELETE", "app", "upstream"), 1.0),
        (requests_series(200, "OTHER", "app", "upstream"), 1.0),
        (requests_series(502, "OTHER", "broken", "proxy"), 1.0),
        (requests_series(502, "GET", "broken", "proxy"), 2.0),
        (duration_count_series(200, "app"), 6.0),
        (duration_count_series(503, "app"), 1.0),
        (duration_count_series(502, "broken"), 3.0),
        (upstream_errors_series("connection_refused", "broken"), 3.0),
    ];
    for (series, n) in &expect {
        assert_eq!(p.metric_at_least(series, *n).await, *n, "{series}");
    }
    let text = p.metrics().await;
    // Nothing else was counted: the totals over all series match the number of responses.
    let total = metric_sum(&text, "spillway_requests_total");
    assert_eq!(total, 10.0, "{text}");
    let errors = metric_sum(&text, "spillway_upstream_errors_total");
    assert_eq!(errors, 3.0, "{text}");
    assert_eq!(
        metric_value(&text, &requests_series(503, "GET", "app", "proxy")),
        0.0
    );
    assert_eq!(
        metric_value(
            &text,
            &format!(
                r#"spillway_build_info{{version="{}"}}"#,
                env!("CARGO_PKG_VERSION")
            )
        ),
        1.0
    );
    for route in ["app", "broken", "unmatched"] {
        assert_eq!(
            p.metric_settles_at(&in_flight_series(route), 0.0).await,
            0.0,
            "{route}"
        );
    }
    assert_eq!(
        metric_value(&text, "spillway_in_flight_requests{route=\"app\"}"),
        0.0
    );
    // No method label ever carries a raw non-standard method.
    assert!(!text.contains("BREW"), "{text}");
}

#[tokio::test]
async fn in_flight_counts_a_request_until_it_ends() {
    let app = DemoApp::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let p = TestProxy::start(&TestProxy::simple_config(app.local_addr(), "")).await;
    assert_eq!(p.metric(&in_flight_series(DEFAULT_ROUTE)).await, 0.0);
    let slow = tokio::spawn({
        let url = p.url("/slow?ms=1500");
        async move { get(&url).await }
    });
    // Observed while the app is still sleeping on it.
    assert_eq!(
        p.metric_at_least(&in_flight_series(DEFAULT_ROUTE), 1.0)
            .await,
        1.0
    );
    let r = slow.await.unwrap();
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        p.metric_settles_at(&in_flight_series(DEFAULT_ROUTE), 0.0)
            .await,
        0.0
    );
    let s = requests_series(200, "GET", DEFAULT_ROUTE, "upstream");
    assert_eq!(p.metric_at_least(&s, 1.0).await, 1.0);
}

#[tokio::test]
async fn admin_serves_health_readiness_config_and_metrics() {
    let up = EchoUpstream::start().await;
    let p = TestProxy::start(&TestProxy::simple_config(up.addr, "")).await;
    let base = format!("http://{}", p.admin);

    let h = get(&format!("{base}/healthz")).await;
    assert_eq!(h.status, StatusCode::OK);
    let r = get(&format!("{base}/readyz")).await;
    assert_eq!(r.status, StatusCode::OK);

    let c = get(&format!("{base}/config")).await;
    assert_eq!(c.status, StatusCode::OK);
    assert_eq!(c.header("content-type"), "application/json");
    let json: serde_json::Value = serde_json::from_slice(&c.body).expect("valid JSON");
    let version = json["version"].as_str().expect("version string");
    assert_eq!(version.len(), 12, "{version}");
    assert_eq!(json["config"]["server_id"], SERVER_ID, "{json}");
    assert!(json["config"].is_object(), "{json}");

    let m = get(&format!("{base}/metrics")).await;
    assert_eq!(m.status, StatusCode::OK);
    assert!(m.header("content-type").starts_with("text/plain"), "{m:?}");
    let line = format!(
        "spillway_build_info{{version=\"{}\"}} 1\n",
        env!("CARGO_PKG_VERSION")
    );
    assert!(m.text().contains(&line), "{}", m.text());

    // The admin port does not proxy.
    let x = get(&format!("{base}/ok")).await;
    assert_eq!(x.status, StatusCode::NOT_FOUND);
    assert_eq!(up.seen().len(), 0);
}

// ---------------------------------------------------------------------------------------------
// HTTP/2 downstream
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn h2c_downstream_reaches_an_http1_upstream() {
    let up = EchoUpstream::with_headers(&[("x-served-by", "app-7")]).await;
    let p = TestProxy::start(&TestProxy::simple_config(up.addr, "")).await;
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let fut = async {
        let resp = client
            .request(
                Request::post(p.url("/h2?x=1"))
                    .body(Full::new(Bytes::from_static(b"over h2")))
                    .unwrap(),
            )
            .await
            .unwrap();
        let (parts, body) = resp.into_parts();
        (parts, body.collect().await.unwrap().to_bytes())
    };
    let (parts, body) = tokio::time::timeout(STEP, fut).await.unwrap();
    assert_eq!(parts.status, StatusCode::OK);
    assert_eq!(parts.version, Version::HTTP_2);
    assert_eq!(&body[..], b"over h2");
    assert_eq!(parts.headers["x-served-by"], "app-7, spillway-test");

    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].version, Version::HTTP_11);
    assert_eq!(seen[0].method, Method::POST);
    assert_eq!(seen[0].uri, "/h2?x=1");
    // HTTP/2 has no Host header; the :authority becomes one.
    assert_eq!(seen[0].header("host"), p.addr.to_string());
    assert_eq!(seen[0].header("x-forwarded-host"), p.addr.to_string());
    assert_eq!(seen[0].header("via"), "1.1 spillway-test");
    let s = requests_series(200, "POST", DEFAULT_ROUTE, "upstream");
    assert_eq!(p.metric_at_least(&s, 1.0).await, 1.0);
}
