//! Request heads spillway refuses itself, before anything reaches the app: over the size or
//! field limits (431, 414), framing that could smuggle a second request (400), a transfer
//! coding it does not decode (501). Each answer is stamped, closes the connection, and is
//! counted under route `unmatched`, method `OTHER`, source `proxy`.

use super::*;

/// Sends `head` on a fresh connection to a proxy with a 2 KiB, 8-field head limit and returns
/// the answer, what the app saw, and the proxy (for metrics).
async fn refused(head: &[u8]) -> (RawResponse, usize, TestProxy, Duration) {
    let up = EchoUpstream::start().await;
    let p = TestProxy::start(&config(
        up.addr,
        "    max_request_header_bytes: 2048\n    max_request_headers: 8\n",
    ))
    .await;
    let mut c = Raw::connect(p.addr).await;
    c.send(head).await;
    let r = c.response().await;
    let closed = c.closed_within().await;
    (r, up.seen().len(), p, closed)
}

async fn assert_refused(head: &[u8], status: u16) {
    let (r, forwarded, p, _) = refused(head).await;
    assert_generated(&r, status, "http_request_error", true);
    assert_eq!(forwarded, 0, "nothing reaches the app");
    assert_eq!(
        p.metric_settles_at(&requests_series(status, "OTHER", "unmatched", "proxy"), 1.0)
            .await,
        1.0
    );
    assert_eq!(
        metric_sum(&p.metrics().await, "spillway_requests_total"),
        1.0,
        "counted once, nowhere else"
    );
}

#[tokio::test]
async fn a_head_over_the_byte_limit_is_431() {
    let big = format!(
        "GET / HTTP/1.1\r\nhost: a\r\nx-big: {}\r\n\r\n",
        "b".repeat(3000)
    );
    assert_refused(big.as_bytes(), 431).await;
}

#[tokio::test]
async fn a_100_kib_header_never_reaches_the_app() {
    // The audit's case: one 100 KiB header was forwarded with the default limits.
    let up = EchoUpstream::start().await;
    let p = TestProxy::start(&config(up.addr, "")).await;
    let mut c = Raw::connect(p.addr).await;
    let big = format!(
        "GET / HTTP/1.1\r\nhost: a\r\nx-big: {}\r\n\r\n",
        "b".repeat(100 * 1024)
    );
    c.send(big.as_bytes()).await;
    let r = c.response().await;
    assert_generated(&r, 431, "http_request_error", true);
    assert_eq!(up.seen().len(), 0);
}

#[tokio::test]
async fn too_many_fields_is_431() {
    let fields: String = (0..9).map(|i| format!("x-{i}: y\r\n")).collect();
    let head = format!("GET / HTTP/1.1\r\n{fields}\r\n");
    assert_refused(head.as_bytes(), 431).await;
}

#[tokio::test]
async fn a_request_line_over_the_limit_is_414() {
    let head = format!("GET /{} HTTP/1.1\r\nhost: a\r\n\r\n", "a".repeat(3000));
    assert_refused(head.as_bytes(), 414).await;
}

#[tokio::test]
async fn smuggling_framing_is_400() {
    for head in [
        &b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\nabcd"[..],
        b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 4\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked, identity\r\n\r\n",
        b"POST / HTTP/1.0\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost: a\r\nbad header line\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
    ] {
        let (r, forwarded, _, _) = refused(head).await;
        assert_generated(&r, 400, "http_request_error", true);
        assert_eq!(forwarded, 0, "{:?}", String::from_utf8_lossy(head));
    }
}

#[tokio::test]
async fn a_coding_spillway_does_not_decode_is_501() {
    assert_refused(
        b"POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: gzip, chunked\r\n\r\n",
        501,
    )
    .await;
}

#[tokio::test]
async fn a_refusal_is_in_the_access_log_and_the_next_connection_is_served() {
    let up = EchoUpstream::start().await;
    let p = TestProxy::start(&config(up.addr, "    max_request_headers: 4\n")).await;
    let fields: String = (0..5).map(|i| format!("x-{i}: y\r\n")).collect();
    let mut c = Raw::connect(p.addr).await;
    c.send(format!("GET / HTTP/1.1\r\n{fields}\r\n").as_bytes())
        .await;
    assert_eq!(c.response().await.status, 431);
    let ok = get(&p.url("/fine")).await;
    assert_eq!(ok.status, StatusCode::OK);
    assert_eq!(up.seen().len(), 1);
}
