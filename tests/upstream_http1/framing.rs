//! Response framing (chunked with trailers, Content-Length, close delimited, bodiless
//! responses, interim 1xx responses), and which connections go back to the pool.

use super::*;

/// A chunked response with chunk extensions and a trailer section reaches the client whole,
/// trailers included (over HTTP/2, which can carry them), and its connection serves the next
/// request.
#[tokio::test]
async fn chunked_response_with_trailers_arrives_whole_and_the_connection_is_reused() {
    const CHUNKED: &[u8] =
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-checksum\r\n\r\n\
        5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nx-checksum: abc123\r\nx-other: 1\r\n\r\n";
    let up = Script::always(Reply::keep(CHUNKED)).await;
    let p = proxy(&up, "").await;

    let r = get(&p.url("/first")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.text(), "hello, world");

    // Over h2c the trailer section is passed on as trailers.
    let tcp = TcpStream::connect(p.addr).await.unwrap();
    let (r2, trailers) = send_over(tcp, true, req(Method::GET, &p.url("/second"), "")).await;
    assert_eq!(r2.status, StatusCode::OK);
    assert_eq!(&r2.body[..], b"hello, world");
    let trailers = trailers.expect("the upstream's trailers");
    assert_eq!(trailers["x-checksum"], "abc123");
    assert_eq!(trailers["x-other"], "1");

    let conns: Vec<usize> = up.seen().iter().map(|s| s.conn).collect();
    assert_eq!(
        conns,
        [1, 1],
        "a cleanly ended chunked body leaves a reusable connection"
    );
    assert_eq!(up.accepted(), 1);
    assert_clean(&p, 200, "GET", 2.0).await;
}

/// Content-Length values that disagree (repeated or in a list) make the response's length
/// unknowable: 502 http_protocol_error, never a guess. Agreeing repeats are one length.
#[tokio::test]
async fn content_lengths_that_disagree_are_502_http_protocol_error() {
    let up = Script::start(|h| match h.target.as_str() {
        "/repeated" => {
            Reply::keep(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello!")
        }
        "/listed" => Reply::keep(b"HTTP/1.1 200 OK\r\ncontent-length: 5, 6\r\n\r\nhello!"),
        _ => Reply::keep(b"HTTP/1.1 200 OK\r\ncontent-length: 5, 5\r\n\r\nhello"),
    })
    .await;
    let p = proxy(&up, "").await;

    let r = get(&p.url("/repeated")).await;
    assert_protocol_error(&p, &r, 1.0).await;
    let r = get(&p.url("/listed")).await;
    assert_protocol_error(&p, &r, 2.0).await;

    let r = get(&p.url("/agreeing")).await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(r.text(), "hello");
    let s = requests_series(200, "GET", ROUTE, "upstream");
    assert_eq!(p.metric_at_least(&s, 1.0).await, 1.0);
    assert_eq!(upstream_errors_total(&p).await, 2.0);
}

/// Transfer-Encoding and Content-Length together (a smuggling pattern): chunked decides the
/// body, the upstream's Content-Length does not reach the client, and the connection is
/// retired.
#[tokio::test]
async fn transfer_encoding_wins_over_content_length_and_the_connection_is_retired() {
    let first = Reply::keep(
        b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\ntransfer-encoding: chunked\r\n\r\n\
          5\r\nhello\r\n0\r\n\r\n",
    );
    let (up, p, a) = first_then_second(first).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.text(), "hello");
    assert_ne!(a.header("content-length"), "100", "{a:?}");
    assert_connections(&up, false);

    // On the wire: no trace of the upstream's length.
    let raw = raw_exchange(
        p.addr,
        b"GET /first HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
    )
    .await;
    let text = String::from_utf8_lossy(&raw).to_ascii_lowercase();
    assert!(text.starts_with("http/1.1 200 ok\r\n"), "{text:?}");
    assert!(!text.contains("content-length: 100"), "{text:?}");
    assert!(
        text.ends_with("\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
        "{text:?}"
    );
    assert_clean(&p, 200, "GET", 3.0).await;
}

/// Interim responses (100 Continue, 103 Early Hints) are skipped: the client gets the final
/// response, without the interim response's fields, even when it arrives in a later read.
#[tokio::test]
async fn interim_responses_are_skipped_for_the_final_one() {
    let up = Script::start(|h| match h.target.as_str() {
        "/continue" => Reply::keep(b"HTTP/1.1 100 Continue\r\n\r\n")
            .then_send(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-final: 1\r\n\r\nfinal"),
        "/hints" => Reply::keep(
            b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload\r\n\r\n\
              HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-final: 1\r\n\r\nfinal",
        ),
        _ => Reply::keep(
            b"HTTP/1.1 100 Continue\r\n\r\n\
              HTTP/1.1 103 Early Hints\r\nlink: </a.js>; rel=preload\r\n\r\n",
        )
        .then_send(b"HTTP/1.1 201 Created\r\ncontent-length: 4\r\n\r\ndone"),
    })
    .await;
    let p = proxy(&up, "").await;

    for path in ["/continue", "/hints"] {
        let r = get(&p.url(path)).await;
        assert_eq!(r.status, StatusCode::OK, "{path}: {r:?}");
        assert_eq!(r.text(), "final", "{path}");
        assert_eq!(r.header("x-final"), "1", "{path}");
        assert!(r.headers.get("link").is_none(), "{path}: {r:?}");
    }
    let r = get(&p.url("/both")).await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    assert_eq!(r.text(), "done");
    assert!(r.headers.get("link").is_none(), "{r:?}");

    assert_eq!(
        up.accepted(),
        1,
        "interim responses do not spoil the connection"
    );
    assert_clean(&p, 200, "GET", 2.0).await;
    assert_clean(&p, 201, "GET", 1.0).await;
}

/// The answer to HEAD has no body whatever its Content-Length says; nothing is waited for, and
/// the connection serves the next request, whose own body is intact.
#[tokio::test]
async fn head_response_has_no_body_and_the_connection_is_reused() {
    let up = Script::start(|h| {
        if h.method == "HEAD" {
            Reply::keep(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\nx-head: yes\r\n\r\n")
        } else {
            Reply::keep(PLAIN_200)
        }
    })
    .await;
    let p = proxy(&up, "").await;

    let r = send(req(Method::HEAD, &p.url("/doc"), "")).await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(r.header("x-head"), "yes");
    assert_eq!(r.header("content-length"), "100", "{r:?}");
    assert!(r.body.is_empty());

    let r = get(&p.url("/doc")).await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(r.text(), "second");

    let seen: Vec<(String, usize)> = up
        .seen()
        .iter()
        .map(|s| (s.head.method.clone(), s.conn))
        .collect();
    assert_eq!(seen, [("HEAD".into(), 1), ("GET".into(), 1)]);
    assert_eq!(up.accepted(), 1);
    assert_clean(&p, 200, "HEAD", 1.0).await;
    assert_clean(&p, 200, "GET", 1.0).await;
}

/// 204 and 304 have no body, even with a Content-Length (a 304's describes the cached
/// representation): none is waited for and the connection is reused.
#[tokio::test]
async fn no_content_and_not_modified_have_no_body_and_the_connection_is_reused() {
    let up = Script::start(|h| match h.target.as_str() {
        "/204" => Reply::keep(b"HTTP/1.1 204 No Content\r\nx-kind: none\r\n\r\n"),
        "/304" => {
            Reply::keep(b"HTTP/1.1 304 Not Modified\r\netag: \"v1\"\r\ncontent-length: 5\r\n\r\n")
        }
        _ => Reply::keep(PLAIN_200),
    })
    .await;
    let p = proxy(&up, "").await;

    let r = get(&p.url("/204")).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{r:?}");
    assert_eq!(r.header("x-kind"), "none");
    assert!(r.body.is_empty());

    let r = get(&p.url("/304")).await;
    assert_eq!(r.status, StatusCode::NOT_MODIFIED, "{r:?}");
    assert_eq!(r.header("etag"), "\"v1\"");
    assert!(r.body.is_empty());

    let r = get(&p.url("/after")).await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(r.text(), "second");

    let conns: Vec<usize> = up.seen().iter().map(|s| s.conn).collect();
    assert_eq!(conns, [1, 1, 1]);
    assert_eq!(up.accepted(), 1);
    assert_clean(&p, 204, "GET", 1.0).await;
    assert_clean(&p, 304, "GET", 1.0).await;
    assert_clean(&p, 200, "GET", 1.0).await;
}

/// A body delimited by the upstream closing (no Content-Length, no Transfer-Encoding) is
/// delivered whole, across many reads, and the next request gets a new connection.
#[tokio::test]
async fn close_delimited_body_arrives_whole_and_the_next_request_connects_anew() {
    let body: Vec<u8> = (0..200_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let mut first = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\n".to_vec();
    first.extend_from_slice(&body);
    let (up, p, a) = first_then_second(Reply::close(&first)).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.body.len(), body.len());
    assert!(a.body == body, "close-delimited body corrupted");
    assert_connections(&up, false);
    assert_clean(&p, 200, "GET", 2.0).await;
}

// ---------------------------------------------------------------------------------------------
// Which connections go back to the pool
// ---------------------------------------------------------------------------------------------

/// `/first` gets `first` (a 200 with body `first`), `/second` a plain 200; asserts both
/// bodies, whether the second request reused the first one's connection, and that nothing was
/// counted as an upstream error.
async fn first_delivered_then_reused(first: &'static [u8], reused: bool) {
    let (up, p, a) = first_then_second(Reply::keep(first)).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.text(), "first");
    assert_connections(&up, reused);
    assert_clean(&p, 200, "GET", 2.0).await;
}

/// `Connection: close` on an HTTP/1.1 response retires the connection, even when the upstream
/// then leaves it open.
#[tokio::test]
async fn http11_connection_close_is_not_reused() {
    first_delivered_then_reused(
        b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 5\r\n\r\nfirst",
        false,
    )
    .await;
}

/// An HTTP/1.0 response without `Connection: keep-alive` means close (HTTP/1.0's default).
#[tokio::test]
async fn http10_response_without_keep_alive_is_not_reused() {
    first_delivered_then_reused(b"HTTP/1.0 200 OK\r\ncontent-length: 5\r\n\r\nfirst", false).await;
}

/// An HTTP/1.0 response with `Connection: keep-alive` and a Content-Length is reusable.
#[tokio::test]
async fn http10_response_with_keep_alive_is_reused() {
    first_delivered_then_reused(
        b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 5\r\n\r\nfirst",
        true,
    )
    .await;
}

/// Bytes after a complete response (no request was pending for them) mean the upstream is not
/// speaking HTTP as expected: the response is delivered, the connection is retired.
#[tokio::test]
async fn bytes_after_a_complete_response_retire_the_connection() {
    first_delivered_then_reused(
        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfirstGARBAGE\r\n",
        false,
    )
    .await;
}
