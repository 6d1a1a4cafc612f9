//! spillway's own HTTP/1.1 upstream client (`src/proxy/upstream/http1/`) against scripted upstreams
//! that send exact bytes ([`script`]):
//!
//! - [`framing`]: response framing (chunked with trailers, Content-Length, close delimited,
//!   bodiless responses, interim 1xx responses) and what makes a connection unfit for reuse
//! - [`malformed`]: malformed responses
//! - [`requests`]: request bodies on their way up, and requests the upstream answers before it
//!   has read them
//!
//! Reuse is judged by counting the TCP connections the upstream accepted. Upstreams that must
//! not see a connection reused keep it open and keep serving, so a proxy that wrongly reused
//! it would be answered on it and the count would show it. Everything listens on 127.0.0.1
//! port 0 and every wait is bounded.

#[path = "../common/mod.rs"]
mod common;

mod framing;
mod malformed;
mod requests;
mod script;

// What the modules share; each of them starts with `use super::*`.
use std::convert::Infallible;

use bytes::Bytes;
use common::*;
use http::{Method, Request, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use script::{Reply, Script};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The route of [`TestProxy::simple_config`].
const ROUTE: &str = DEFAULT_ROUTE;

/// A plain keep-alive answer: `200`, body `second`.
const PLAIN_200: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nsecond";

// ---------------------------------------------------------------------------------------------
// Helpers shared by the modules
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
