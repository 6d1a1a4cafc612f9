//! Malformed responses: an oversized head, a bad status line, an invalid chunk size mid-body.

use super::*;

/// A response head just under the 64 KiB limit is passed on whole (the limit is not lower than
/// it says).
#[tokio::test]
async fn a_response_head_just_under_64_kib_is_passed_on() {
    let big = "a".repeat(60_000);
    let head = format!("HTTP/1.1 200 OK\r\nx-big: {big}\r\ncontent-length: 2\r\n\r\nok");
    let up = Script::always(Reply::keep(head.as_bytes())).await;
    let p = proxy(&up, "").await;
    let r = get(&p.url("/x")).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.status);
    assert_eq!(r.header("x-big"), big);
    assert_eq!(r.text(), "ok");
    assert_clean(&p, 200, "GET", 1.0).await;
}

/// A response head over the 64 KiB limit is 502 http_protocol_error, not passed on.
#[tokio::test]
async fn a_response_head_over_64_kib_is_502_http_protocol_error() {
    let mut huge = b"HTTP/1.1 200 OK\r\nx-big: ".to_vec();
    huge.extend_from_slice(&[b'a'; 70_000]);
    huge.extend_from_slice(b"\r\ncontent-length: 2\r\n\r\nok");
    let up = Script::always(Reply::keep(&huge)).await;
    let p = proxy(&up, "").await;
    let r = get(&p.url("/x")).await;
    assert!(r.headers.get("x-big").is_none(), "oversized head passed on");
    assert_protocol_error(&p, &r, 1.0).await;
}

/// Bytes that are not a status line are 502 http_protocol_error at once, even when no
/// end of head ever follows (the upstream keeps the connection open).
#[tokio::test]
async fn a_bad_status_line_is_502_http_protocol_error() {
    let up = Script::start(|h| match h.target.as_str() {
        "/banner" => Reply::hold(b"SSH-2.0-OpenSSH_9.6\r\n"),
        "/no-code" => Reply::hold(b"HTTP/1.1 OK\r\ncontent-length: 2\r\n\r\nok"),
        _ => Reply::hold(b"HTTP/1.1 99999 Huge\r\ncontent-length: 2\r\n\r\nok"),
    })
    .await;
    // Waiting for more instead of failing would end in a 504 at the route timeout.
    let p = proxy(&up, "    timeout: 5s\n").await;
    for (i, path) in ["/banner", "/no-code", "/bad-code"].into_iter().enumerate() {
        let r = get(&p.url(path)).await;
        assert_protocol_error(&p, &r, (i + 1) as f64).await;
    }
}

/// An invalid chunk size after the head was sent aborts the client's response: the chunk that
/// arrived is forwarded, then the connection closes without the terminating chunk, and the
/// abort is counted. The upstream connection is not reused.
#[tokio::test]
async fn an_invalid_chunk_size_mid_body_aborts_the_response() {
    const HEAD: &[u8] = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n";
    const BAD: &[u8] = b"zz\r\nmore\r\n";
    // Held open: only the bad chunk size, not a close, can end the body.
    let up = Script::always(Reply::hold(HEAD).then_send(BAD)).await;
    let p = proxy(&up, "").await;

    let r = send_partial(req(Method::GET, &p.url("/x"), "")).await;
    assert_eq!(r.status, StatusCode::OK, "the head was already sent");
    assert_eq!(r.headers["x-served-by"], SERVER_ID);
    assert!(
        r.body.is_err(),
        "a broken body must not be presented as complete: {:?}",
        r.body
    );

    let text = assert_chunked_abort_on_wire(p.addr).await;
    assert!(!text.contains("more"), "{text:?}");

    assert_eq!(up.accepted(), 2, "a failed body's connection is not reused");
    let s = requests_series(200, "GET", ROUTE, "upstream");
    assert_eq!(p.metric_at_least(&s, 2.0).await, 2.0);
    let e = upstream_errors_series("connection_terminated", ROUTE);
    assert_eq!(p.metric_at_least(&e, 2.0).await, 2.0);
    assert_eq!(
        p.metric(&requests_series(502, "GET", ROUTE, "proxy")).await,
        0.0
    );
}
