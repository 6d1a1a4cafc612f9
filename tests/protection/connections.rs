//! Connections: the ones that send nothing or too little are closed after `header_timeout`,
//! idle keep-alive ones after `idle_timeout`; beyond `max_connections` a new one gets an
//! immediate 503; and the HTTP/1.1 details a proxy must get right (pipelining, HTTP/1.0,
//! 100-continue, an early answer to an upload, trailers).

use super::*;

const TIMEOUTS: &str = "    header_timeout: 300ms\n    idle_timeout: 600ms\n";

#[tokio::test]
async fn a_silent_connection_is_closed_after_the_header_timeout() {
    let up = EchoUpstream::start().await;
    let p = TestProxy::start(&config(up.addr, TIMEOUTS)).await;
    let mut silent = Raw::connect(p.addr).await;
    let took = silent.closed_within().await;
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert!(silent.buf.is_empty(), "closed without an answer");
    // A partial head, then silence: the same.
    let mut partial = Raw::connect(p.addr).await;
    partial.send(b"GET / HTTP/1.1\r\nhost: a\r\n").await;
    let took = partial.closed_within().await;
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(3),
        "{took:?}"
    );
    // Only the HTTP/2 preface, then nothing: closed too (a GOAWAY, then the close).
    let mut preface = Raw::connect(p.addr).await;
    preface.send(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
    let took = preface.closed_within().await;
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert_eq!(up.seen().len(), 0);
}

#[tokio::test]
async fn a_slow_head_is_cut_at_the_header_timeout_from_its_first_byte() {
    let up = EchoUpstream::start().await;
    let p = TestProxy::start(&config(up.addr, TIMEOUTS)).await;
    let mut c = Raw::connect(p.addr).await;
    let started = Instant::now();
    // One byte every 100 ms: the head would take seconds.
    let dripping = async {
        for b in b"GET / HTTP/1.1\r\nhost: a\r\nx-long: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" {
            if c.sock.write_all(&[*b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let _ = tokio::time::timeout(STEP, dripping).await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(2), "cut after {took:?}");
    assert_eq!(up.seen().len(), 0);
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    let up = EchoUpstream::start().await;
    let p = TestProxy::start(&config(up.addr, TIMEOUTS)).await;
    let mut c = Raw::connect(p.addr).await;
    c.send(b"GET /a HTTP/1.1\r\nhost: a\r\n\r\n").await;
    assert_eq!(c.response().await.status, 200);
    // Idle longer than the header timeout but within the idle timeout: still served.
    tokio::time::sleep(Duration::from_millis(400)).await;
    c.send(b"GET /b HTTP/1.1\r\nhost: a\r\n\r\n").await;
    assert_eq!(c.response().await.status, 200);
    let took = c.closed_within().await;
    assert!(
        took >= Duration::from_millis(550) && took < Duration::from_secs(3),
        "{took:?}"
    );
}

#[tokio::test]
async fn beyond_max_connections_a_new_connection_gets_an_immediate_503() {
    let up = EchoUpstream::start().await;
    let p = TestProxy::start(&config(up.addr, "    max_connections: 2\n")).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = Raw::connect(p.addr).await;
        c.send(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n").await;
        assert_eq!(c.response().await.status, 200);
        held.push(c);
    }
    assert_eq!(
        p.metric(r#"spillway_open_connections{listener="http"}"#)
            .await,
        2.0
    );
    let mut third = Raw::connect(p.addr).await;
    let r = third.response().await;
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.header("x-served-by"), SERVER_ID);
    assert_eq!(
        r.header("proxy-status"),
        format!("{SERVER_ID}; error=connection_limit_reached")
    );
    assert_eq!(r.header("retry-after"), "5");
    assert_eq!(r.header("connection"), "close");
    third.closed_within().await;
    assert_eq!(
        up.seen().len(),
        2,
        "no request was read from the refused connection"
    );
    assert_eq!(
        p.metric(r#"spillway_connections_refused_total{listener="http"}"#)
            .await,
        1.0
    );
    // Once one closes, new connections are served again.
    drop(held.pop());
    assert_eq!(
        p.metric_settles_at(r#"spillway_open_connections{listener="http"}"#, 1.0)
            .await,
        1.0
    );
    assert_eq!(get(&p.url("/again")).await.status, StatusCode::OK);
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let up = EchoUpstream::start().await;
    let p = TestProxy::start(&config(up.addr, "")).await;
    let mut c = Raw::connect(p.addr).await;
    c.send(b"GET /1 HTTP/1.1\r\nhost: a\r\n\r\nPOST /2 HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\n\r\nabcGET /3 HTTP/1.1\r\nhost: a\r\n\r\n").await;
    for _ in 0..3 {
        assert_eq!(c.response().await.status, 200);
    }
    let paths: Vec<String> = up.seen().iter().map(|s| s.uri.path().to_owned()).collect();
    assert_eq!(paths, ["/1", "/2", "/3"]);
}

#[tokio::test]
async fn http10_keep_alive_is_honoured_and_announced() {
    let up = EchoUpstream::start().await;
    let p = TestProxy::start(&config(up.addr, "")).await;
    let mut c = Raw::connect(p.addr).await;
    for _ in 0..2 {
        c.send(b"GET / HTTP/1.0\r\nconnection: keep-alive\r\n\r\n")
            .await;
        let r = c.response().await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("connection"), "keep-alive");
    }
}

#[tokio::test]
async fn expect_100_continue_gets_its_interim_answer_when_the_body_is_wanted() {
    let up = EchoUpstream::start().await;
    let p = TestProxy::start(&config(up.addr, "")).await;
    let mut c = Raw::connect(p.addr).await;
    c.send(b"POST /up HTTP/1.1\r\nhost: a\r\ncontent-length: 5\r\nexpect: 100-continue\r\n\r\n")
        .await;
    let interim = c.response().await;
    assert_eq!(interim.status, 100);
    c.send(b"hello").await;
    let r = c.response().await;
    assert_eq!((r.status, r.body.as_slice()), (200, &b"hello"[..]));
}

#[tokio::test]
async fn an_early_answer_drains_the_upload_and_the_connection_serves_on() {
    // The route is in maintenance: spillway answers 503 without reading the body. The rest of
    // the upload is read and dropped, and the next request on the connection is served.
    let up = EchoUpstream::start().await;
    let yaml = config(up.addr, "").replace(
        "    upstream: app\n",
        "    upstream: app\n  - name: closed\n    match: { path_prefix: /closed }\n    upstream: app\n    maintenance: { enabled: true }\n",
    );
    // The maintenance route must come first to match.
    let yaml = yaml.replacen(
        "  - name: default\n    match: { path_prefix: / }\n    upstream: app\n  - name: closed\n    match: { path_prefix: /closed }\n    upstream: app\n    maintenance: { enabled: true }\n",
        "  - name: closed\n    match: { path_prefix: /closed }\n    upstream: app\n    maintenance: { enabled: true }\n  - name: default\n    match: { path_prefix: / }\n    upstream: app\n",
        1,
    );
    let p = TestProxy::start(&yaml).await;
    let mut c = Raw::connect(p.addr).await;
    c.send(b"POST /closed HTTP/1.1\r\nhost: a\r\ncontent-length: 10\r\n\r\nhello")
        .await;
    let r = c.response().await;
    assert_eq!(r.status, 503);
    assert_eq!(r.header("connection"), "", "kept alive: {r:?}");
    c.send(b"world").await;
    c.send(b"GET /next HTTP/1.1\r\nhost: a\r\n\r\n").await;
    assert_eq!(c.response().await.status, 200);
    assert_eq!(up.seen().len(), 1);
}

#[tokio::test]
async fn response_trailers_reach_an_http11_client() {
    let up = ScriptedUpstream::start(
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nx-checksum: abc\r\n\r\n",
    )
    .await;
    let p = TestProxy::start(&config(up.addr, "")).await;
    let mut c = Raw::connect(p.addr).await;
    c.send(b"GET / HTTP/1.1\r\nhost: a\r\nte: trailers\r\n\r\n")
        .await;
    let r = c.response().await;
    assert_eq!(r.status, 200);
    assert_eq!(
        String::from_utf8_lossy(&r.body),
        "hello--trailers--\nx-checksum: abc"
    );
}

/// A config whose upstream allows one connection, with `route_extra` on the route.
fn one_connection(upstream: SocketAddr, route_extra: &str) -> String {
    config(upstream, "").replace(
        "    connect_timeout: 500ms\n",
        "    connect_timeout: 500ms\n    max_connections: 1\n",
    ) + route_extra
}

#[tokio::test]
async fn at_the_upstreams_connection_cap_a_request_is_refused_without_a_queue() {
    let up = GatedUpstream::start().await;
    let p = TestProxy::start(&one_connection(up.addr, "")).await;
    let url = p.url("/hold");
    let held = tokio::spawn(async move { get(&url).await });
    assert_eq!(up.wait_held(1).await, 1);
    let r = get(&p.url("/second")).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        r.header("proxy-status"),
        format!("{SERVER_ID}; error=connection_limit_reached")
    );
    assert_eq!(r.header("retry-after"), "5");
    assert_eq!(
        p.metric(r#"spillway_shed_total{priority="normal",reason="upstream_connection_limit",route="default"}"#)
            .await,
        1.0
    );
    up.release(1);
    assert_eq!(held.await.unwrap().status, StatusCode::OK);
    assert_eq!(
        up.requests(),
        ["GET /hold"],
        "the app never saw the second request"
    );
}

#[tokio::test]
async fn at_the_upstreams_connection_cap_a_queued_request_waits_for_the_connection() {
    let up = GatedUpstream::start().await;
    let p = TestProxy::start(&one_connection(
        up.addr,
        "    concurrency: { queue: 4, queue_timeout: 5s }\n",
    ))
    .await;
    let url = p.url("/hold");
    let held = tokio::spawn(async move { get(&url).await });
    assert_eq!(up.wait_held(1).await, 1);
    let url = p.url("/second");
    let second = tokio::spawn(async move { get(&url).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        up.requests(),
        ["GET /hold"],
        "waiting for the one connection"
    );
    up.release(1);
    assert_eq!(held.await.unwrap().status, StatusCode::OK);
    assert_eq!(second.await.unwrap().status, StatusCode::OK);
    assert_eq!(up.requests(), ["GET /hold", "GET /second"]);
    assert_eq!(
        metric_sum(&p.metrics().await, "spillway_shed_total"),
        0.0,
        "nothing refused"
    );
}
