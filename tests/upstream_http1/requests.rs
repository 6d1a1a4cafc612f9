//! Request bodies on their way up (chunked, or broken mid-upload by the client), and upstreams
//! that answer before they have read the whole request.

use super::*;

/// A request body of unknown length (the client sent it chunked) goes to the upstream chunked,
/// with exactly one Transfer-Encoding and no Content-Length, and decodes to what the client
/// sent; the connection is reused afterwards.
#[tokio::test]
async fn a_chunked_request_body_reaches_the_upstream_chunked_and_intact() {
    let up = Script::always(Reply::keep(
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
    ))
    .await;
    let p = proxy(&up, "").await;

    let pieces = ["alpha-", "", "beta-", "gamma"]
        .into_iter()
        .map(Bytes::from)
        .collect();
    let (status, body) = post_streamed(&p.url("/upload"), pieces).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(&body[..], b"ok");

    let r = get(&p.url("/after")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.text(), "ok");

    let seen = up.seen();
    assert_eq!(seen.len(), 2);
    let upload = &seen[0];
    assert_eq!(upload.head.method, "POST");
    assert_eq!(upload.head.all("transfer-encoding"), ["chunked"]);
    assert!(upload.head.all("content-length").is_empty(), "{upload:?}");
    assert_eq!(upload.body, b"alpha-beta-gamma");
    assert_eq!(seen[1].head.method, "GET");
    assert!(seen[1].head.all("transfer-encoding").is_empty());
    assert_eq!(
        seen[1].conn, 1,
        "the connection is reused after a chunked upload"
    );
    assert_eq!(up.accepted(), 1);
    assert_clean(&p, 200, "POST", 1.0).await;
    assert_clean(&p, 200, "GET", 1.0).await;
}

/// A client body that breaks mid-upload (here a chunked body whose next size line is not hex)
/// is the client's fault, not the app's: the request is answered 400 by spillway, counted with
/// `source="proxy"`, and no upstream error is counted against the app.
#[tokio::test]
async fn a_request_body_that_breaks_mid_upload_is_400_not_an_upstream_error() {
    let up = Script::always(Reply::keep(
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
    ))
    .await;
    let p = proxy(&up, "").await;
    let raw = raw_exchange(
        p.addr,
        b"POST /upload HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\nZZ\r\n",
    )
    .await;
    let text = String::from_utf8_lossy(&raw);
    assert!(
        !text.starts_with("HTTP/1.1 200") && !text.starts_with("HTTP/1.1 502"),
        "{text}"
    );
    let s = requests_series(400, "POST", ROUTE, "proxy");
    assert_eq!(
        p.metric_at_least(&s, 1.0).await,
        1.0,
        "{}",
        p.metrics().await
    );
    assert_eq!(
        upstream_errors_total(&p).await,
        0.0,
        "{}",
        p.metrics().await
    );
}

// ---------------------------------------------------------------------------------------------
// Upstreams that answer before reading the whole request
// ---------------------------------------------------------------------------------------------

/// Reads one HTTP/1.1 response with a Content-Length body from a raw connection (bounded).
async fn read_raw_response(sock: &mut TcpStream) -> (String, Vec<u8>) {
    let fut = async {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let n = sock.read(&mut chunk).await.expect("response head");
            assert!(n > 0, "closed before the response head: {buf:?}");
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8(buf[..head_end].to_vec()).unwrap();
        let len: usize = head
            .lines()
            .find_map(|l| {
                let (n, v) = l.split_once(':')?;
                n.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().unwrap())
            })
            .expect("a content-length response");
        while buf.len() < head_end + len {
            let n = sock.read(&mut chunk).await.expect("response body");
            assert!(n > 0, "closed before the response body ended");
            buf.extend_from_slice(&chunk[..n]);
        }
        (head, buf[head_end..head_end + len].to_vec())
    };
    tokio::time::timeout(STEP, fut)
        .await
        .expect("response within the step bound")
}

/// An app that sends its response head at once and streams the request body back while it is
/// still arriving: 1 MiB with a Content-Length and 1 MiB chunked come back intact, and the
/// connection is reused afterwards (the request was sent whole by the time the response ended).
#[tokio::test]
async fn an_echo_that_answers_before_the_body_is_read_gets_it_all() {
    const SIZE: usize = 1024 * 1024;
    let up = EchoUpstream::start().await;
    let p = TestProxy::start(&TestProxy::simple_config(up.addr, "")).await;
    let data = pattern(SIZE);

    let r = send(
        Request::post(p.url("/echo"))
            .body(Full::new(data.clone()))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body.len(), SIZE);
    assert!(r.body == data, "echoed body corrupted");

    let pieces = (0..SIZE)
        .step_by(16 * 1024)
        .map(|off| data.slice(off..off + 16 * 1024))
        .collect();
    let (status, echoed) = post_streamed(&p.url("/echo-chunked"), pieces).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(echoed.len(), SIZE);
    assert!(echoed == data, "echoed chunked body corrupted");

    let seen = up.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].header("content-length"), SIZE.to_string());
    assert_eq!(seen[1].header("transfer-encoding"), "chunked");
    assert_eq!(up.connections(), 1);
    assert_clean(&p, 200, "POST", 2.0).await;
}

/// Sends the head of a 1 MiB upload and its first 256 KiB on a raw connection to the proxy,
/// then reads the response (the rest of the body is never sent).
async fn start_large_upload(p: &TestProxy) -> (TcpStream, String, Vec<u8>) {
    let mut sock = TcpStream::connect(p.addr).await.unwrap();
    sock.write_all(b"POST /upload HTTP/1.1\r\nhost: a\r\ncontent-length: 1048576\r\n\r\n")
        .await
        .unwrap();
    sock.write_all(&pattern(256 * 1024)).await.unwrap();
    let (head, body) = read_raw_response(&mut sock).await;
    (sock, head, body)
}

const TOO_LARGE: &[u8] =
    b"HTTP/1.1 413 Content Too Large\r\ncontent-length: 9\r\nconnection: close\r\n\r\ntoo large";

/// An app that refuses an upload after reading only its head, answers 413 and closes (which
/// resets the connection, unread body bytes pending): the client gets the 413, not a 502.
#[tokio::test]
async fn an_early_413_then_close_reaches_the_client() {
    let up = Script::start(|h| {
        if h.method == "POST" {
            Reply::close(TOO_LARGE).head_only()
        } else {
            Reply::keep(PLAIN_200)
        }
    })
    .await;
    let p = proxy(&up, "").await;
    let (_sock, head, body) = start_large_upload(&p).await;
    assert!(head.starts_with("HTTP/1.1 413 "), "{head:?}");
    assert!(
        !head.to_ascii_lowercase().contains("proxy-status"),
        "{head:?}"
    );
    assert_eq!(body, b"too large");

    let r = get(&p.url("/next")).await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(r.text(), "second");
    assert_eq!(up.accepted(), 2);
    assert_clean(&p, 413, "POST", 1.0).await;
    assert_eq!(
        p.metric(&requests_series(502, "POST", ROUTE, "proxy"))
            .await,
        0.0
    );
}

/// The same early 413 on a connection the app leaves open: the client gets it, and the
/// connection, with an unfinished request on it, is never reused.
#[tokio::test]
async fn an_early_413_on_an_open_connection_is_not_reused() {
    let up = Script::start(|h| {
        if h.method == "POST" {
            Reply::hold(b"HTTP/1.1 413 Content Too Large\r\ncontent-length: 9\r\n\r\ntoo large")
                .head_only()
        } else {
            Reply::keep(PLAIN_200)
        }
    })
    .await;
    // A reused (held) connection would never answer: the route timeout turns that into a 504.
    let p = proxy(&up, "    timeout: 3s\n").await;
    let (_sock, head, body) = start_large_upload(&p).await;
    assert!(head.starts_with("HTTP/1.1 413 "), "{head:?}");
    assert_eq!(body, b"too large");

    let r = get(&p.url("/next")).await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(r.text(), "second");
    let conns: Vec<usize> = up.seen().iter().map(|s| s.conn).collect();
    assert_eq!(conns, [1, 2]);
    assert_eq!(up.accepted(), 2);
    assert_clean(&p, 413, "POST", 1.0).await;
}
