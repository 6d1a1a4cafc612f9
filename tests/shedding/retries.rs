//! Retries: which requests are retried and on which endpoint, the retry budget and its floor
//! on a quiet route, the route timeout bounding all attempts together, and never a retry once
//! the response head was sent.

use super::*;

/// `n` copies of `s`, for comparing request logs.
fn times(s: &str, n: usize) -> Vec<String> {
    vec![s.to_owned(); n]
}

const RETRIES_YAML: &str = "    retries: { attempts: 2, backoff: 10ms, budget: 1.0 }\n";

#[tokio::test]
async fn idempotent_bodyless_requests_are_retried_on_503_others_are_not() {
    let up = GatedUpstream::start().await;
    let p = TestProxy::start(&TestProxy::simple_config(up.addr, RETRIES_YAML)).await;

    // `/flaky…` answers 503 the first time each target is seen, then 200.
    assert_from_upstream(&get(&p.url("/flaky/get")).await, 200);
    assert_eq!(up.requests(), times("GET /flaky/get", 2));
    assert_eq!(p.metric(&retries_series(ROUTE)).await, 1.0);

    let r = send(req(Method::POST, &p.url("/flaky/post"), "")).await;
    assert_from_upstream(&r, 503);
    assert_eq!(up.requests()[2..], ["POST /flaky/post"]);
    assert_eq!(
        p.metric(&retries_series(ROUTE)).await,
        1.0,
        "POST is not retried"
    );

    let r = send(req(Method::GET, &p.url("/flaky/get-with-body"), "payload")).await;
    assert_from_upstream(&r, 503);
    assert_eq!(up.requests()[3..], ["GET /flaky/get-with-body"]);
    assert_eq!(
        p.metric(&retries_series(ROUTE)).await,
        1.0,
        "a request with a body is not retried"
    );

    // PUT and DELETE are idempotent.
    assert_from_upstream(&send(req(Method::PUT, &p.url("/flaky/put"), "")).await, 200);
    assert_from_upstream(
        &send(req(Method::DELETE, &p.url("/flaky/delete"), "")).await,
        200,
    );
    assert_eq!(
        up.requests()[4..],
        [
            "PUT /flaky/put",
            "PUT /flaky/put",
            "DELETE /flaky/delete",
            "DELETE /flaky/delete"
        ]
    );
    assert_eq!(p.metric(&retries_series(ROUTE)).await, 3.0);

    // Out of attempts: the last answer as the upstream gave it (1 + 2 attempts).
    up.set_status(503);
    assert_from_upstream(&get(&p.url("/always")).await, 503);
    assert_eq!(up.requests()[8..], times("GET /always", 3));
    assert_eq!(p.metric(&retries_series(ROUTE)).await, 5.0);
    // The app's 5xx are passed through, never counted as proxy errors or sheds.
    for reason in [
        "concurrency_limit",
        "queue_timeout",
        "circuit_open",
        "maintenance",
    ] {
        assert_eq!(p.metric(&shed_series(reason, ROUTE)).await, 0.0, "{reason}");
    }
}

#[tokio::test]
async fn a_connect_failure_is_retried_on_the_other_endpoint() {
    let up = GatedUpstream::start().await;
    let nowhere = refusing_addr().await;
    let yaml = format!(
        "server_id: {SERVER_ID}\n\
         listeners:\n  - name: http\n    address: 127.0.0.1:0\n\
         admin:\n  address: 127.0.0.1:0\n\
         upstreams:\n  app:\n    endpoints: [\"{nowhere}\", \"{}\"]\n    connect_timeout: 500ms\n\
         routes:\n  - name: {ROUTE}\n    match: {{ path_prefix: / }}\n    upstream: app\n{RETRIES_YAML}",
        up.addr
    );
    let p = TestProxy::start(&yaml).await;
    // First attempts go round robin over [refusing, good] (retries do not advance the round
    // robin): every other request starts at the refusing endpoint and its retry moves on to
    // the good one.
    const N: usize = 6;
    for i in 0..N {
        assert_from_upstream(&get(&p.url(&format!("/ok?n={i}"))).await, 200);
    }
    assert_eq!(
        up.total(),
        N,
        "each request reached the good endpoint exactly once"
    );
    assert_eq!(p.metric(&retries_series(ROUTE)).await, (N / 2) as f64);
    assert_eq!(
        p.metric(&upstream_errors_series("connection_refused", ROUTE))
            .await,
        0.0
    );
    let s = requests_series(200, "GET", ROUTE, "upstream");
    assert_eq!(p.metric_at_least(&s, N as f64).await, N as f64);
}

#[tokio::test]
async fn a_retry_avoids_the_failed_endpoint_under_concurrent_traffic() {
    // Endpoint `a` answers 503, endpoint `b` 200. While a request's first attempt is at `a`,
    // another request is sent (and lands on `b`). The retry of the first must still go to the
    // other endpoint, `b`, whatever other traffic did to the round robin in the meantime.
    let (a, b) = (GatedUpstream::start().await, GatedUpstream::start().await);
    a.set_status(503);
    // `a` lets its held requests through once released; `b` never holds (gate open).
    b.release(10);
    let yaml = format!(
        "server_id: {SERVER_ID}\n\
         listeners:\n  - name: http\n    address: 127.0.0.1:0\n\
         admin:\n  address: 127.0.0.1:0\n\
         upstreams:\n  app:\n    endpoints: [\"{}\", \"{}\"]\n\
         routes:\n  - name: {ROUTE}\n    match: {{ path_prefix: / }}\n    upstream: app\n\
         \x20   retries: {{ attempts: 1, backoff: 1ms, budget: 1.0 }}\n",
        a.addr, b.addr
    );
    let p = TestProxy::start(&yaml).await;

    let first = spawn_get(p.url("/hold?r=1"));
    assert_eq!(
        a.wait_held(1).await,
        1,
        "the first attempt goes to the first endpoint"
    );
    assert_from_upstream(&get(&p.url("/other")).await, 200);
    assert_eq!(b.requests(), ["GET /other"]);
    // Two permits, so that a retry wrongly sent to `a` again is answered (503), not held.
    a.release(2);
    let r = join(first).await;
    assert_eq!(p.metric(&retries_series(ROUTE)).await, 1.0);
    assert_eq!(
        (a.requests(), b.requests()),
        (
            times("GET /hold?r=1", 1),
            vec!["GET /other".to_owned(), "GET /hold?r=1".to_owned()]
        ),
        "the retry went back to the endpoint that had just failed"
    );
    assert_from_upstream(&r, 200);
}

#[tokio::test]
async fn the_retry_budget_caps_retries_exactly() {
    let up = GatedUpstream::start().await;
    up.set_status(503);
    let extra = "    retries: { attempts: 2, backoff: 10ms, budget: 0.2, min_per_second: 0 }\n";
    let p = TestProxy::start(&TestProxy::simple_config(up.addr, extra)).await;
    // The rule (src/policy/retry.rs), without a floor: a retry is sent only if
    // `retries + 1 ≤ budget × requests` over the window, every request counting itself first. With 0.2 and sequential requests
    // that all fail: the 5th, 10th, 15th and 20th may retry once each (their second retry would
    // need 2 ≤ 1, 3 ≤ 2, …): 4 retries for 20 requests, well within the 10 s window.
    let mut expected_retries = 0;
    for n in 1..=20u32 {
        assert_from_upstream(&get(&p.url(&format!("/fail?n={n}"))).await, 503);
        if n % 5 == 0 {
            expected_retries += 1;
        }
        assert_eq!(
            p.metric(&retries_series(ROUTE)).await,
            f64::from(expected_retries),
            "after request {n}"
        );
    }
    assert_eq!(expected_retries, 4);
    assert_eq!(
        up.total(),
        24,
        "20 requests + 4 retries: {:?}",
        up.requests()
    );
    for n in [5, 10, 15, 20] {
        let target = format!("GET /fail?n={n}");
        assert_eq!(
            up.requests().iter().filter(|r| **r == target).count(),
            2,
            "{target}"
        );
    }
}

#[tokio::test]
async fn the_route_timeout_bounds_all_attempts_together() {
    let up = GatedUpstream::start().await;
    up.set_status(503);
    let extra = format!("    timeout: 300ms\n{RETRIES_YAML}");
    let p = TestProxy::start(&TestProxy::simple_config(up.addr, &extra)).await;
    // Each attempt takes 200 ms and fails: the first ends at 200 ms, the retry (after at most
    // 10 ms) would end past 400 ms, but the route timeout ends everything at 300 ms.
    let t = Instant::now();
    let r = get(&p.url("/slow?ms=200")).await;
    let took = t.elapsed();
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT, "{r:?}");
    assert_eq!(
        r.header("proxy-status"),
        format!("{SERVER_ID}; error=http_response_timeout")
    );
    assert!(r.headers.get("retry-after").is_none(), "not a shed: {r:?}");
    assert!(
        took >= Duration::from_millis(300),
        "timed out early: {took:?}"
    );
    assert!(
        took < Duration::from_millis(600),
        "the timeout did not bound the retries: {took:?}"
    );
    assert_eq!(
        up.requests(),
        times("GET /slow?ms=200", 2),
        "one attempt and one retry"
    );
    assert_eq!(p.metric(&retries_series(ROUTE)).await, 1.0);
    assert_eq!(
        p.metric(&upstream_errors_series("http_response_timeout", ROUTE))
            .await,
        1.0
    );
}

#[tokio::test]
async fn a_response_whose_head_was_sent_is_never_retried() {
    // A 200 head, then the upstream dies mid-body: the client's response has started, so the
    // failure is passed on as an aborted body, never retried.
    let up = RawUpstream::start(Misbehaviour::DieMidBody).await;
    let p = TestProxy::start(&TestProxy::simple_config(up.addr, RETRIES_YAML)).await;
    let r = send_partial(req(Method::GET, &p.url("/"), "")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(
        r.body.is_err(),
        "a truncated body must not look complete: {:?}",
        r.body
    );
    assert_eq!(up.accepted(), 1);
    assert_eq!(p.metric(&retries_series(ROUTE)).await, 0.0);
}

/// A route over two endpoints, the first resetting every connection before any response, the
/// second `good`; its retries block is `retries`.
fn reset_then_good_config(reset: SocketAddr, good: SocketAddr, retries: &str) -> String {
    format!(
        "server_id: {SERVER_ID}\n\
         listeners:\n  - name: http\n    address: 127.0.0.1:0\n\
         admin:\n  address: 127.0.0.1:0\n\
         upstreams:\n  app:\n    endpoints: [\"{reset}\", \"{good}\"]\n\
         routes:\n  - name: {ROUTE}\n    match: {{ path_prefix: / }}\n    upstream: app\n\
         \x20   retries: {retries}\n"
    )
}

#[tokio::test]
async fn a_reset_before_the_response_is_retried_on_a_quiet_route() {
    let reset = RawUpstream::start(Misbehaviour::Reset).await;
    let good = GatedUpstream::start().await;
    // Only `attempts` is set: the default budget (0.2) alone would allow no retry among these
    // few requests (the first needs five in the window); the default floor (one a second)
    // allows each of them.
    let p = TestProxy::start(&reset_then_good_config(
        reset.addr,
        good.addr,
        "{ attempts: 1, backoff: 1ms }",
    ))
    .await;
    // Round robin: requests 1 and 3 go first to the resetting endpoint, and their retries to
    // the other one (connection_terminated is as safe to resend as a refused connect).
    for n in 1..=4 {
        assert_from_upstream(&get(&p.url(&format!("/r?n={n}"))).await, 200);
    }
    assert_eq!(reset.accepted(), 2);
    assert_eq!(
        good.requests(),
        ["GET /r?n=1", "GET /r?n=2", "GET /r?n=3", "GET /r?n=4"]
    );
    assert_eq!(p.metric(&retries_series(ROUTE)).await, 2.0);
    assert_eq!(
        p.metric(&upstream_errors_series("connection_terminated", ROUTE))
            .await,
        0.0,
        "a failed attempt that was retried is not an error the client saw"
    );
    // A POST is never resent: its reset is the client's 502.
    let r = send(req(Method::POST, &p.url("/post"), "")).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{r:?}");
    assert_eq!(
        r.header("proxy-status"),
        format!("{SERVER_ID}; error=connection_terminated")
    );
    assert_eq!(reset.accepted(), 3);
    assert_eq!(good.total(), 4);
    assert_eq!(p.metric(&retries_series(ROUTE)).await, 2.0);
}

#[tokio::test]
async fn without_the_floor_a_quiet_route_does_not_retry() {
    let reset = RawUpstream::start(Misbehaviour::Reset).await;
    let good = GatedUpstream::start().await;
    let p = TestProxy::start(&reset_then_good_config(
        reset.addr,
        good.addr,
        "{ attempts: 1, backoff: 1ms, min_per_second: 0 }",
    ))
    .await;
    // The first request's retry would need 1 ≤ 0.2 × 1.
    let r = get(&p.url("/r?n=1")).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{r:?}");
    assert_eq!(
        r.header("proxy-status"),
        format!("{SERVER_ID}; error=connection_terminated")
    );
    assert_eq!((reset.accepted(), good.total()), (1, 0));
    assert_eq!(p.metric(&retries_series(ROUTE)).await, 0.0);
}
