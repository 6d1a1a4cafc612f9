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
