//! The status contract: an upstream's own answers pass through unchanged, 5xx included; each
//! way an upstream can fail is an exact 502 or 504 with `Proxy-Status`, a proxy loop is 508 and
//! an unmatched request 404, every one generated without leaking internals and counted once;
//! and a body that fails after its head was sent is aborted, never made to look complete.

use super::*;

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
