//! spillway's own HTTP/1.1 upstream client (`src/proxy/http1.rs`) against scripted upstreams
//! that send exact bytes: response framing (chunked with trailers, Content-Length, close
//! delimited, bodiless responses, interim 1xx responses), what makes a connection unfit for
//! reuse, malformed responses, and requests the upstream answers before it has read them.
//!
//! Reuse is judged by counting the TCP connections the upstream accepted. Upstreams that must
//! not see a connection reused keep it open and keep serving, so a proxy that wrongly reused
//! it would be answered on it and the count would show it. Everything listens on 127.0.0.1
//! port 0 and every wait is bounded.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Method, Request, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::task::AbortOnDropHandle;

/// The route of [`TestProxy::simple_config`].
const ROUTE: &str = DEFAULT_ROUTE;

/// A plain keep-alive answer: `200`, body `second`.
const PLAIN_200: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nsecond";

// ---------------------------------------------------------------------------------------------
// The scripted upstream
// ---------------------------------------------------------------------------------------------

/// What the scripted upstream does once its reply is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Then {
    /// Keep serving requests on the connection.
    KeepOpen,
    /// Close the connection (a FIN; a reset if request bytes were left unread).
    Close,
    /// Keep the connection open but never read from or write to it again.
    Hold,
}

/// One scripted answer.
#[derive(Debug, Clone)]
struct Reply {
    /// Written in order, with a short pause between segments so they arrive in separate reads.
    segments: Vec<Vec<u8>>,
    then: Then,
    /// Whether the request body is read (by its framing) before answering.
    read_body: bool,
}

impl Reply {
    fn new(bytes: &[u8], then: Then) -> Reply {
        Reply {
            segments: vec![bytes.to_vec()],
            then,
            read_body: true,
        }
    }

    fn keep(bytes: &[u8]) -> Reply {
        Reply::new(bytes, Then::KeepOpen)
    }

    fn close(bytes: &[u8]) -> Reply {
        Reply::new(bytes, Then::Close)
    }

    fn hold(bytes: &[u8]) -> Reply {
        Reply::new(bytes, Then::Hold)
    }

    /// Answers after reading only the request head.
    fn head_only(mut self) -> Reply {
        self.read_body = false;
        self
    }

    /// Another segment, written after a pause.
    fn then_send(mut self, bytes: &[u8]) -> Reply {
        self.segments.push(bytes.to_vec());
        self
    }
}

/// One request head as it arrived at the scripted upstream.
#[derive(Debug, Clone)]
struct Head {
    method: String,
    target: String,
    /// Names lowercased, values as sent, in order.
    headers: Vec<(String, String)>,
}

impl Head {
    /// Every value of header `name`.
    fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// One request as the scripted upstream received it.
#[derive(Debug, Clone)]
struct Seen {
    /// Which accepted connection it came on (1 = the first).
    conn: usize,
    head: Head,
    /// The body, decoded from its framing (empty when not read).
    body: Vec<u8>,
}

type Answer = dyn Fn(&Head) -> Reply + Send + Sync;

struct ScriptState {
    accepted: AtomicUsize,
    seen: Mutex<Vec<Seen>>,
    answer: Box<Answer>,
}

/// A raw TCP upstream that answers each request with the bytes `answer` picks for it.
struct Script {
    addr: SocketAddr,
    state: Arc<ScriptState>,
    _task: AbortOnDropHandle<()>,
}

impl Script {
    async fn start(answer: impl Fn(&Head) -> Reply + Send + Sync + 'static) -> Script {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(ScriptState {
            accepted: AtomicUsize::new(0),
            seen: Mutex::new(Vec::new()),
            answer: Box::new(answer),
        });
        let shared = state.clone();
        let task = tokio::spawn(async move {
            // Dropped with the accept task: every connection task ends with the upstream.
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    return;
                };
                while conns.try_join_next().is_some() {}
                let conn = shared.accepted.fetch_add(1, Ordering::SeqCst) + 1;
                conns.spawn(serve(sock, conn, shared.clone()));
            }
        });
        Script {
            addr,
            state,
            _task: AbortOnDropHandle::new(task),
        }
    }

    /// A scripted upstream that answers every request the same way.
    async fn always(reply: Reply) -> Script {
        Script::start(move |_| reply.clone()).await
    }

    /// Connections accepted so far.
    fn accepted(&self) -> usize {
        self.state.accepted.load(Ordering::SeqCst)
    }

    /// Requests received so far, in arrival order.
    fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }
}

async fn serve(sock: TcpStream, conn: usize, state: Arc<ScriptState>) {
    let mut io = BufReader::new(sock);
    loop {
        let Ok(Ok(Some(head))) = tokio::time::timeout(STEP, read_request_head(&mut io)).await
        else {
            return;
        };
        let reply = (state.answer)(&head);
        let body = if reply.read_body {
            match tokio::time::timeout(STEP, read_request_body(&mut io, &head)).await {
                Ok(Ok(body)) => body,
                _ => return,
            }
        } else {
            Vec::new()
        };
        // Recorded before answering: once the client has the answer, the request is on record.
        state.seen.lock().unwrap().push(Seen { conn, head, body });
        for (i, segment) in reply.segments.iter().enumerate() {
            if i > 0 {
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
            if io.get_mut().write_all(segment).await.is_err() {
                return;
            }
            let _ = io.get_mut().flush().await;
        }
        match reply.then {
            Then::KeepOpen => {}
            Then::Close => {
                let _ = io.get_mut().shutdown().await;
                return;
            }
            Then::Hold => {
                tokio::time::sleep(STEP).await;
                return;
            }
        }
    }
}

/// Reads one line, CRLF included. `None` at the end of the stream.
async fn read_line(io: &mut BufReader<TcpStream>) -> std::io::Result<Option<Vec<u8>>> {
    let mut line = Vec::new();
    if io.read_until(b'\n', &mut line).await? == 0 {
        return Ok(None);
    }
    if !line.ends_with(b"\r\n") {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    line.truncate(line.len() - 2);
    Ok(Some(line))
}

async fn read_request_head(io: &mut BufReader<TcpStream>) -> std::io::Result<Option<Head>> {
    let Some(first) = read_line(io).await? else {
        return Ok(None);
    };
    let first = String::from_utf8_lossy(&first).into_owned();
    let mut parts = first.split(' ');
    let method = parts.next().unwrap_or("").to_owned();
    let target = parts.next().unwrap_or("").to_owned();
    let mut headers = Vec::new();
    loop {
        let line = read_line(io)
            .await?
            .ok_or(std::io::ErrorKind::UnexpectedEof)?;
        if line.is_empty() {
            break;
        }
        let line = String::from_utf8_lossy(&line).into_owned();
        let (name, value) = line
            .split_once(':')
            .ok_or(std::io::ErrorKind::InvalidData)?;
        headers.push((name.to_ascii_lowercase(), value.trim().to_owned()));
    }
    Ok(Some(Head {
        method,
        target,
        headers,
    }))
}

/// Reads the request body by its framing and returns it decoded (chunked bodies strictly:
/// a malformed chunk is an error, which ends the connection unanswered).
async fn read_request_body(io: &mut BufReader<TcpStream>, head: &Head) -> std::io::Result<Vec<u8>> {
    let invalid = || std::io::Error::from(std::io::ErrorKind::InvalidData);
    let chunked = head
        .all("transfer-encoding")
        .last()
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
    let mut body = Vec::new();
    if chunked {
        loop {
            let line = read_line(io).await?.ok_or_else(invalid)?;
            let line = String::from_utf8(line).map_err(|_| invalid())?;
            let size = line.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size, 16).map_err(|_| invalid())?;
            if size == 0 {
                // Trailer fields, then the empty line.
                while !read_line(io).await?.ok_or_else(invalid)?.is_empty() {}
                return Ok(body);
            }
            let start = body.len();
            body.resize(start + size, 0);
            io.read_exact(&mut body[start..]).await?;
            let mut crlf = [0u8; 2];
            io.read_exact(&mut crlf).await?;
            if &crlf != b"\r\n" {
                return Err(invalid());
            }
        }
    }
    if let Some(len) = head.all("content-length").first() {
        let len: usize = len.parse().map_err(|_| invalid())?;
        body.resize(len, 0);
        io.read_exact(&mut body).await?;
    }
    Ok(body)
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Sum of every `spillway_upstream_errors_total` series.
async fn upstream_errors_total(p: &TestProxy) -> f64 {
    metric_sum(&p.metrics().await, "spillway_upstream_errors_total")
}

/// `n` responses passed through from the upstream with `code`, and no upstream error at all.
async fn assert_clean(p: &TestProxy, code: u16, method: &str, n: f64) {
    let s = requests_series(code, method, ROUTE, "upstream");
    assert_eq!(p.metric_at_least(&s, n).await, n, "{s}");
    assert_eq!(upstream_errors_total(p).await, 0.0, "{}", p.metrics().await);
}

/// A generated 502 `http_protocol_error`, counted as such (`n` of them so far).
async fn assert_protocol_error(p: &TestProxy, r: &Resp, n: f64) {
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{r:?}");
    assert_eq!(
        r.header("proxy-status"),
        format!("{SERVER_ID}; error=http_protocol_error"),
        "{r:?}"
    );
    assert_eq!(r.header("x-served-by"), SERVER_ID, "{r:?}");
    assert_eq!(r.text(), "upstream sent a malformed response\n");
    let s = requests_series(502, "GET", ROUTE, "proxy");
    assert_eq!(p.metric_at_least(&s, n).await, n, "{s}");
    assert_eq!(
        p.metric(&upstream_errors_series("http_protocol_error", ROUTE))
            .await,
        n
    );
}

/// A proxy in front of `up` (with extra route YAML).
async fn proxy(up: &Script, route_extra: &str) -> TestProxy {
    TestProxy::start(&TestProxy::simple_config(up.addr, route_extra)).await
}

/// A scripted upstream that answers `/first` with `first` and everything else with
/// [`PLAIN_200`], keep-alive; a proxy in front of it; and two GETs through it, `/first` and
/// then `/second`, one after the other. Returns the first response for the caller to judge,
/// after checking that the second one was answered correctly.
async fn first_then_second(first: Reply) -> (Script, TestProxy, Resp) {
    let up = Script::start(move |h| {
        if h.target == "/first" {
            first.clone()
        } else {
            Reply::keep(PLAIN_200)
        }
    })
    .await;
    let p = proxy(&up, "").await;
    let a = get(&p.url("/first")).await;
    let b = get(&p.url("/second")).await;
    assert_eq!(b.status, StatusCode::OK, "{b:?}");
    assert_eq!(b.text(), "second", "{b:?}");
    let seen = up.seen();
    let targets: Vec<&str> = seen.iter().map(|s| s.head.target.as_str()).collect();
    assert_eq!(targets, ["/first", "/second"]);
    (up, p, a)
}

/// POSTs `pieces` as a streamed body of unknown length (so it goes chunked) and returns the
/// status and the whole response body, within [`STEP`].
async fn post_streamed(url: &str, pieces: Vec<Bytes>) -> (StatusCode, Bytes) {
    let client: Client<_, StreamBody<_>> = Client::builder(TokioExecutor::new()).build_http();
    let frames = pieces
        .into_iter()
        .map(|b| Ok::<_, Infallible>(Frame::data(b)));
    let fut = async {
        let resp = client
            .request(
                Request::post(url)
                    .body(StreamBody::new(futures_util::stream::iter(frames)))
                    .unwrap(),
            )
            .await
            .unwrap();
        let status = resp.status();
        (status, resp.into_body().collect().await.unwrap().to_bytes())
    };
    tokio::time::timeout(STEP, fut).await.expect("in time")
}

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

/// Asserts on which upstream connections `/first` and `/second` arrived.
fn assert_connections(up: &Script, reused: bool) {
    let conns: Vec<usize> = up.seen().iter().map(|s| s.conn).collect();
    if reused {
        assert_eq!(conns, [1, 1], "the connection should have been reused");
        assert_eq!(up.accepted(), 1);
    } else {
        assert_eq!(
            conns,
            [1, 2],
            "the connection must not be reused: the second request needs a fresh one"
        );
        assert_eq!(up.accepted(), 2);
    }
}

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

// ---------------------------------------------------------------------------------------------
// Framing
// ---------------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------------
// Upstreams that answer before reading the whole request
// ---------------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------------
// Malformed responses
// ---------------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------------
// Request framing
// ---------------------------------------------------------------------------------------------

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
