//! Request and response rewriting: hop-by-hop headers are removed both ways; `Via`,
//! `X-Forwarded-*` and `x-request-id` are added or extended; `x-served-by` is stamped on
//! responses.

use super::*;

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

#[tokio::test]
async fn the_app_joins_the_callers_trace_under_a_new_span_or_a_new_sampled_trace() {
    let up = EchoUpstream::start().await;
    let p = TestProxy::start(&TestProxy::simple_config(up.addr, "")).await;
    let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
    let get = |traceparent: Option<&str>| {
        let mut b = Request::get(p.url("/t")).header("tracestate", "vendor=abc");
        if let Some(t) = traceparent {
            b = b.header("traceparent", t);
        }
        b.body(Full::new(Bytes::new())).unwrap()
    };
    for r in [
        send(get(Some(parent))).await,
        send(get(None)).await,
        // Upper-case hex and an all-zero trace id are invalid: a new trace, not a broken one.
        send(get(Some(
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        )))
        .await,
        send(get(Some(
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        )))
        .await,
    ] {
        assert_eq!(r.status, StatusCode::OK);
    }
    let seen = up.seen();
    assert_eq!(seen.len(), 4);
    let parts = |s: &str| -> Vec<String> { s.split('-').map(str::to_owned).collect() };

    // Joined: same trace id and flags, spillway's own span id.
    let joined = parts(seen[0].header("traceparent"));
    assert_eq!(joined.len(), 4, "{joined:?}");
    assert_eq!(joined[0], "00");
    assert_eq!(joined[1], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_ne!(
        joined[2], "00f067aa0ba902b7",
        "the caller's span passed unchanged"
    );
    assert_eq!(joined[2].len(), 16);
    assert_eq!(joined[3], "00", "the caller's sampling decision stands");
    assert_eq!(seen[0].header("tracestate"), "vendor=abc");

    // Started: a fresh, sampled trace for each request without a usable parent, without the
    // `tracestate` that belonged to no trace we know.
    let mut ids = std::collections::HashSet::new();
    for s in &seen[1..] {
        let started = parts(s.header("traceparent"));
        assert_eq!(started.len(), 4, "{started:?}");
        assert_eq!(started[1].len(), 32);
        assert!(started[1]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        assert_ne!(started[1], "0".repeat(32));
        assert_ne!(started[1], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(started[3], "01");
        assert!(ids.insert(started[1].clone()), "trace ids repeat");
        assert_eq!(s.header("tracestate"), "", "state of another trace went on");
    }
}
