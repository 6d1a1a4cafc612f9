//! The load-shedding contract, end to end over loopback: what the client sees when spillway
//! refuses a request on purpose (concurrency limit and queue, circuit breaker, maintenance), what
//! is counted, that a refused request never reaches the upstream, how retries behave, and that
//! policy state survives a reload that does not touch it.
//!
//! The upstream is a [`GatedUpstream`]: it records every request on arrival and can hold
//! requests at a gate the test opens, so "N in flight" is exact without sleeping. The only real
//! waits are the ones the contract is about (queue timeout, the breaker's `open_for`, the route
//! timeout), each short and bounded.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use http::{Method, StatusCode};
use spillway::policy::LimiterState;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// The route of [`TestProxy::simple_config`].
const ROUTE: &str = DEFAULT_ROUTE;

/// Route `retry_after` used by most tests, and the header it must produce.
const RETRY_AFTER_YAML: &str = "    retry_after: 7s\n";
const RETRY_AFTER_SECS: &str = "7";

fn shed_series(reason: &str, route: &str) -> String {
    format!(r#"spillway_shed_total{{reason="{reason}",route="{route}"}}"#)
}

fn limit_series(route: &str) -> String {
    format!(r#"spillway_concurrency_limit{{route="{route}"}}"#)
}

fn breaker_series(route: &str) -> String {
    format!(r#"spillway_circuit_breaker_state{{route="{route}"}}"#)
}

fn retries_series(route: &str) -> String {
    format!(r#"spillway_retries_total{{route="{route}"}}"#)
}

/// Sends `GET url` in its own task (its own connection).
fn spawn_get(url: String) -> JoinHandle<Resp> {
    tokio::spawn(async move { get(&url).await })
}

/// Awaits a spawned request (it is bounded by [`STEP`] inside `send`).
async fn join(h: JoinHandle<Resp>) -> Resp {
    h.await.expect("request task")
}

/// Every shed response: 503, the exact `Retry-After` and `Proxy-Status`, the generated body
/// and stamps.
fn assert_shed(r: &Resp, retry_after: &str, error_type: &str, body: &str) {
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{r:?}");
    assert_eq!(r.header("retry-after"), retry_after, "{r:?}");
    assert_eq!(
        r.header("proxy-status"),
        format!("{SERVER_ID}; error={error_type}"),
        "{r:?}"
    );
    assert_eq!(r.header("x-served-by"), SERVER_ID, "{r:?}");
    assert_eq!(
        r.header("content-type"),
        "text/plain; charset=utf-8",
        "{r:?}"
    );
    assert!(!r.header("x-request-id").is_empty(), "{r:?}");
    assert_eq!(r.text(), body, "{r:?}");
}

fn assert_overloaded(r: &Resp, retry_after: &str) {
    assert_shed(
        r,
        retry_after,
        "connection_limit_reached",
        "overloaded, retry later\n",
    );
}

fn assert_circuit_open(r: &Resp, retry_after: &str) {
    assert_shed(
        r,
        retry_after,
        "destination_unavailable",
        "upstream is failing, retry later\n",
    );
}

/// A response the upstream produced, passed through: its status and body, no `Proxy-Status`.
fn assert_from_upstream(r: &Resp, status: u16) {
    assert_eq!(r.status.as_u16(), status, "{r:?}");
    assert_eq!(r.text(), format!("upstream {status}\n"), "{r:?}");
    assert!(r.headers.get("proxy-status").is_none(), "{r:?}");
    assert!(r.headers.get("retry-after").is_none(), "{r:?}");
}

/// The limiter state of the proxy's first route (to see the queue, which has no metric).
fn limiter(p: &TestProxy) -> Arc<LimiterState> {
    p.server.shared.runtime.load().routes[0]
        .policy
        .limiter
        .clone()
}

/// Waits (bounded by [`STEP`]) until exactly `n` requests wait in the route's queue.
async fn wait_queued(p: &TestProxy, n: u32) -> u32 {
    let l = limiter(p);
    let deadline = Instant::now() + STEP;
    while l.queued() != n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    l.queued()
}

/// `n` copies of `s`, for comparing request logs.
fn times(s: &str, n: usize) -> Vec<String> {
    vec![s.to_owned(); n]
}

// ---------------------------------------------------------------------------------------------
// Concurrency limit and queue
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn over_the_limit_without_queue_exactly_the_excess_is_shed() {
    const N: usize = 4;
    const K: usize = 3;
    let up = GatedUpstream::start().await;
    let extra = format!("    concurrency: {{ max: {N}, queue: 0 }}\n{RETRY_AFTER_YAML}");
    let p = TestProxy::start(&TestProxy::simple_config(up.addr, &extra)).await;
    assert_eq!(p.metric(&limit_series(ROUTE)).await, N as f64);

    let held: Vec<_> = (0..N)
        .map(|i| spawn_get(p.url(&format!("/hold?i={i}"))))
        .collect();
    assert_eq!(up.wait_held(N).await, N, "the first {N} reach the upstream");
    assert_eq!(
        p.metric_settles_at(&in_flight_series(ROUTE), N as f64)
            .await,
        N as f64
    );

    // The excess goes to a path the upstream answers at once: if one were let through it would
    // show as a 200, not hang.
    let excess: Vec<_> = (0..K)
        .map(|i| spawn_get(p.url(&format!("/excess?i={i}"))))
        .collect();
    for h in excess {
        assert_overloaded(&join(h).await, RETRY_AFTER_SECS);
    }
    assert_eq!(
        p.metric(&shed_series("concurrency_limit", ROUTE)).await,
        K as f64
    );
    assert_eq!(p.metric(&shed_series("queue_timeout", ROUTE)).await, 0.0);
    let s = requests_series(503, "GET", ROUTE, "proxy");
    assert_eq!(p.metric_at_least(&s, K as f64).await, K as f64);
    assert_eq!(
        up.total(),
        N,
        "a shed request never reaches the upstream: {:?}",
        up.requests()
    );
    assert!(
        up.requests().iter().all(|r| r.starts_with("GET /hold?i=")),
        "{:?}",
        up.requests()
    );

    up.release(N);
    for h in held {
        assert_from_upstream(&join(h).await, 200);
    }
    assert_eq!(
        p.metric_settles_at(&in_flight_series(ROUTE), 0.0).await,
        0.0
    );
    assert_eq!(limiter(&p).in_flight(), 0);
    assert_eq!(p.metric(&limit_series(ROUTE)).await, N as f64);
    assert_eq!(
        p.metric(&shed_series("concurrency_limit", ROUTE)).await,
        K as f64
    );
    assert_eq!(up.total(), N);

    // Once the permits are back, requests flow again.
    assert_from_upstream(&get(&p.url("/after")).await, 200);
    assert_eq!(up.total(), N + 1);
}

const QUEUE_YAML: &str = "    concurrency: { max: 1, queue: 2, queue_timeout: 300ms }\n";
const QUEUE_TIMEOUT: Duration = Duration::from_millis(300);

#[tokio::test]
async fn queued_requests_are_served_first_in_first_out_and_the_queue_is_bounded() {
    let up = GatedUpstream::start().await;
    let p = TestProxy::start(&TestProxy::simple_config(
        up.addr,
        &format!("{QUEUE_YAML}{RETRY_AFTER_YAML}"),
    ))
    .await;

    let first = spawn_get(p.url("/hold?n=0"));
    assert_eq!(up.wait_held(1).await, 1);
    let second = spawn_get(p.url("/hold?n=1"));
    assert_eq!(wait_queued(&p, 1).await, 1);
    let third = spawn_get(p.url("/hold?n=2"));
    assert_eq!(wait_queued(&p, 2).await, 2);
    assert_eq!(
        up.total(),
        1,
        "queued requests wait in spillway, not at the upstream"
    );

    // The queue is full: one more is refused at once, not after the queue timeout.
    let t = Instant::now();
    let over = get(&p.url("/over")).await;
    assert!(
        t.elapsed() < QUEUE_TIMEOUT,
        "refused at once, took {:?}",
        t.elapsed()
    );
    assert_overloaded(&over, RETRY_AFTER_SECS);
    assert_eq!(
        p.metric(&shed_series("concurrency_limit", ROUTE)).await,
        1.0
    );

    // Open the gate one request at a time: each permit goes to the oldest waiter.
    up.release(1);
    assert_from_upstream(&join(first).await, 200);
    assert_eq!(up.wait_held(1).await, 1);
    assert_eq!(up.requests(), ["GET /hold?n=0", "GET /hold?n=1"]);
    up.release(1);
    assert_from_upstream(&join(second).await, 200);
    assert_eq!(up.wait_held(1).await, 1);
    assert_eq!(
        up.requests(),
        ["GET /hold?n=0", "GET /hold?n=1", "GET /hold?n=2"]
    );
    up.release(1);
    assert_from_upstream(&join(third).await, 200);

    assert_eq!(p.metric(&shed_series("queue_timeout", ROUTE)).await, 0.0);
    assert_eq!(
        p.metric(&shed_series("concurrency_limit", ROUTE)).await,
        1.0
    );
    assert_eq!(
        p.metric_settles_at(&in_flight_series(ROUTE), 0.0).await,
        0.0
    );
    let l = limiter(&p);
    assert_eq!((l.in_flight(), l.queued()), (0, 0));
}

#[tokio::test]
async fn queued_requests_give_up_with_503_after_queue_timeout() {
    let up = GatedUpstream::start().await;
    let p = TestProxy::start(&TestProxy::simple_config(
        up.addr,
        &format!("{QUEUE_YAML}{RETRY_AFTER_YAML}"),
    ))
    .await;

    let holder = spawn_get(p.url("/hold?n=0"));
    assert_eq!(up.wait_held(1).await, 1);
    let started = Instant::now();
    let queued: Vec<_> = (1..=2)
        .map(|i| spawn_get(p.url(&format!("/queued?n={i}"))))
        .collect();
    assert_eq!(wait_queued(&p, 2).await, 2);
    for h in queued {
        let r = join(h).await;
        let waited = started.elapsed();
        assert_overloaded(&r, RETRY_AFTER_SECS);
        assert!(
            waited >= QUEUE_TIMEOUT,
            "gave up before queue_timeout: {waited:?}"
        );
        assert!(
            waited <= Duration::from_secs(2),
            "waited far past queue_timeout: {waited:?}"
        );
    }
    assert_eq!(p.metric(&shed_series("queue_timeout", ROUTE)).await, 2.0);
    assert_eq!(
        p.metric(&shed_series("concurrency_limit", ROUTE)).await,
        0.0
    );
    assert_eq!(
        up.requests(),
        ["GET /hold?n=0"],
        "timed-out waiters never reach the upstream"
    );
    assert_eq!(limiter(&p).queued(), 0);

    up.release(1);
    assert_from_upstream(&join(holder).await, 200);
    assert_eq!(
        p.metric_settles_at(&in_flight_series(ROUTE), 0.0).await,
        0.0
    );
    assert_eq!(limiter(&p).in_flight(), 0);
    assert_from_upstream(&get(&p.url("/after")).await, 200);
    assert_eq!(up.total(), 2);
}

#[tokio::test]
async fn adaptive_limit_stays_within_bounds_and_in_flight_returns_to_zero() {
    let up = GatedUpstream::start().await;
    let extra = "    concurrency: { adaptive: { min: 2, max: 64 } }\n";
    let p = TestProxy::start(&TestProxy::simple_config(up.addr, extra)).await;
    assert_eq!(
        p.metric(&limit_series(ROUTE)).await,
        2.0,
        "an adaptive limit starts at min"
    );

    let (mut ok, mut shed) = (0usize, 0usize);
    let mut tally = |r: Resp| {
        if r.status == StatusCode::OK {
            assert_from_upstream(&r, 200);
            ok += 1;
        } else {
            // The only other answer allowed is a shed with the default Retry-After (5 s).
            assert_overloaded(&r, "5");
            shed += 1;
        }
    };
    for _ in 0..30 {
        tally(get(&p.url("/fast")).await);
    }
    for _ in 0..3 {
        let burst: Vec<_> = (0..16).map(|_| spawn_get(p.url("/fast"))).collect();
        for h in burst {
            tally(join(h).await);
        }
    }
    assert_eq!(ok + shed, 30 + 3 * 16);
    assert!(
        ok >= 30,
        "sequential requests are never over a limit of at least 2: {ok} ok"
    );
    assert_eq!(up.total(), ok, "shed requests never reach the upstream");
    assert_eq!(
        p.metric(&shed_series("concurrency_limit", ROUTE)).await,
        shed as f64
    );

    let limit = p.metric(&limit_series(ROUTE)).await;
    assert!(
        (2.0..=64.0).contains(&limit),
        "limit {limit} outside [2, 64]"
    );
    assert_eq!(
        limit,
        f64::from(limiter(&p).limit()),
        "the gauge follows the limit"
    );
    assert_eq!(
        p.metric_settles_at(&in_flight_series(ROUTE), 0.0).await,
        0.0
    );
    let l = limiter(&p);
    assert_eq!((l.in_flight(), l.queued()), (0, 0));
}

// ---------------------------------------------------------------------------------------------
// Circuit breaker
// ---------------------------------------------------------------------------------------------

const BREAKER_YAML: &str =
    "    circuit_breaker: { enabled: true, window: 10s, min_requests: 4, failure_ratio: 0.5, \
                            open_for: 1s, half_open_requests: 2 }\n";
const OPEN_FOR: Duration = Duration::from_secs(1);

/// Starts a proxy with the breaker above in front of `up` (answering 502), sends the four
/// failures that open it, and checks it is open. Returns the proxy and an instant at or after
/// which the breaker is half-open.
async fn open_breaker(up: &GatedUpstream) -> (TestProxy, Instant) {
    up.set_status(502);
    let p = TestProxy::start(&TestProxy::simple_config(
        up.addr,
        &format!("{BREAKER_YAML}{RETRY_AFTER_YAML}"),
    ))
    .await;
    assert_eq!(p.metric(&breaker_series(ROUTE)).await, 0.0);
    for i in 0..3 {
        assert_from_upstream(&get(&p.url(&format!("/fail?n={i}"))).await, 502);
        assert_eq!(
            p.metric(&breaker_series(ROUTE)).await,
            0.0,
            "closed below min_requests"
        );
    }
    assert_from_upstream(&get(&p.url("/fail?n=3")).await, 502);
    // The breaker settled before the response head was passed on, so it opened before now.
    let half_open_at = Instant::now() + OPEN_FOR + Duration::from_millis(20);
    assert_eq!(
        p.metric(&breaker_series(ROUTE)).await,
        2.0,
        "open after 4 failures of 4"
    );
    assert_eq!(up.total(), 4);

    let r = get(&p.url("/refused")).await;
    assert_circuit_open(&r, "1");
    assert_eq!(
        up.total(),
        4,
        "an open breaker does not call the upstream: {:?}",
        up.requests()
    );
    assert_eq!(p.metric(&shed_series("circuit_open", ROUTE)).await, 1.0);
    (p, half_open_at)
}

#[tokio::test]
async fn breaker_opens_on_failures_and_closes_after_successful_probes() {
    let up = GatedUpstream::start().await;
    let (p, half_open_at) = open_breaker(&up).await;
    assert_eq!(
        p.metric(&requests_series(502, "GET", ROUTE, "upstream"))
            .await,
        4.0
    );

    up.set_status(200);
    tokio::time::sleep_until(half_open_at).await;

    // Two probes are let through (held at the upstream); a third request meanwhile is refused
    // with Retry-After 1 without reaching the upstream.
    let probes: Vec<_> = (0..2)
        .map(|i| spawn_get(p.url(&format!("/hold?probe={i}"))))
        .collect();
    assert_eq!(up.wait_held(2).await, 2);
    assert_eq!(
        p.metric(&breaker_series(ROUTE)).await,
        1.0,
        "half-open while probing"
    );
    assert_circuit_open(&get(&p.url("/while-probing")).await, "1");
    assert_eq!(p.metric(&shed_series("circuit_open", ROUTE)).await, 2.0);
    assert_eq!(up.total(), 6);

    up.release(2);
    for h in probes {
        assert_from_upstream(&join(h).await, 200);
    }
    assert_eq!(
        p.metric(&breaker_series(ROUTE)).await,
        0.0,
        "closed after 2 successful probes"
    );
    for i in 0..5 {
        assert_from_upstream(&get(&p.url(&format!("/flowing?n={i}"))).await, 200);
    }
    assert_eq!(up.total(), 11);
    assert_eq!(p.metric(&shed_series("circuit_open", ROUTE)).await, 2.0);
    assert_eq!(p.metric(&breaker_series(ROUTE)).await, 0.0);
}

#[tokio::test]
async fn a_failed_probe_reopens_the_breaker() {
    let up = GatedUpstream::start().await;
    let (p, half_open_at) = open_breaker(&up).await;
    tokio::time::sleep_until(half_open_at).await;

    // Still failing: the first probe re-opens it at once.
    assert_from_upstream(&get(&p.url("/probe")).await, 502);
    assert_eq!(up.total(), 5);
    assert_eq!(
        p.metric(&breaker_series(ROUTE)).await,
        2.0,
        "re-opened by the failed probe"
    );
    assert_circuit_open(&get(&p.url("/refused-again")).await, "1");
    assert_eq!(up.total(), 5);
    assert_eq!(p.metric(&shed_series("circuit_open", ROUTE)).await, 2.0);
}

#[tokio::test]
async fn breaker_counts_connect_failures_too() {
    let nowhere = refusing_addr().await;
    let p = TestProxy::start(&TestProxy::simple_config(
        nowhere,
        &format!("{BREAKER_YAML}{RETRY_AFTER_YAML}"),
    ))
    .await;
    for _ in 0..4 {
        let r = get(&p.url("/")).await;
        assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{r:?}");
        assert_eq!(
            r.header("proxy-status"),
            format!("{SERVER_ID}; error=connection_refused")
        );
    }
    assert_eq!(p.metric(&breaker_series(ROUTE)).await, 2.0);
    assert_circuit_open(&get(&p.url("/")).await, "1");
    assert_eq!(
        p.metric(&upstream_errors_series("connection_refused", ROUTE))
            .await,
        4.0
    );
    assert_eq!(p.metric(&shed_series("circuit_open", ROUTE)).await, 1.0);
}

// ---------------------------------------------------------------------------------------------
// Maintenance
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn maintenance_answers_503_with_its_own_retry_after_and_never_calls_the_upstream() {
    let up = GatedUpstream::start().await;
    let extra =
        format!("    maintenance: {{ enabled: true, retry_after: 10m }}\n{RETRY_AFTER_YAML}");
    let p = TestProxy::start(&TestProxy::simple_config(up.addr, &extra)).await;
    for method in [Method::GET, Method::POST, Method::DELETE] {
        let r = send(req(method, &p.url("/anything"), "")).await;
        assert_shed(
            &r,
            "600",
            "proxy_internal_response",
            "down for maintenance, retry later\n",
        );
    }
    assert_eq!(p.metric(&shed_series("maintenance", ROUTE)).await, 3.0);
    for reason in ["concurrency_limit", "queue_timeout", "circuit_open"] {
        assert_eq!(p.metric(&shed_series(reason, ROUTE)).await, 0.0, "{reason}");
    }
    assert_eq!(up.total(), 0, "{:?}", up.requests());
    assert_eq!(
        p.metric_settles_at(&in_flight_series(ROUTE), 0.0).await,
        0.0
    );
}

#[tokio::test]
async fn maintenance_without_its_own_retry_after_uses_the_routes() {
    let up = GatedUpstream::start().await;
    let extra = format!("    maintenance: {{ enabled: true }}\n{RETRY_AFTER_YAML}");
    let p = TestProxy::start(&TestProxy::simple_config(up.addr, &extra)).await;
    let r = get(&p.url("/")).await;
    assert_shed(
        &r,
        RETRY_AFTER_SECS,
        "proxy_internal_response",
        "down for maintenance, retry later\n",
    );
    assert_eq!(up.total(), 0);
}

// ---------------------------------------------------------------------------------------------
// Retries
// ---------------------------------------------------------------------------------------------

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
    let extra = "    retries: { attempts: 2, backoff: 10ms, budget: 0.2 }\n";
    let p = TestProxy::start(&TestProxy::simple_config(up.addr, extra)).await;
    // The rule (src/policy/retry.rs): a retry is sent only if `retries + 1 ≤ budget × requests`
    // over the window, every request counting itself first. With 0.2 and sequential requests
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

// ---------------------------------------------------------------------------------------------
// Reload
// ---------------------------------------------------------------------------------------------

/// A config file with route `a` (`/a`, with `a_policy`: YAML lines indented by 4) to `up_a`
/// and route `b` (`/b`, with `b_timeout`) to `up_b`.
fn two_route_config(up_a: SocketAddr, up_b: SocketAddr, a_policy: &str, b_timeout: &str) -> String {
    format!(
        "server_id: {SERVER_ID}\n\
         listeners:\n  - name: http\n    address: 127.0.0.1:0\n\
         admin:\n  address: 127.0.0.1:0\n\
         upstreams:\n  a:\n    endpoints: [\"{up_a}\"]\n  b:\n    endpoints: [\"{up_b}\"]\n\
         routes:\n\
         \x20 - name: a\n    match: {{ path_prefix: /a }}\n    upstream: a\n{RETRY_AFTER_YAML}{a_policy}\
         \x20 - name: b\n    match: {{ path_prefix: /b }}\n    upstream: b\n    timeout: {b_timeout}\n"
    )
}

/// Route `a`'s breaker for the reload tests.
fn reload_breaker(open_for: &str) -> String {
    format!(
        "    circuit_breaker: {{ enabled: true, min_requests: 4, failure_ratio: 0.5, open_for: {open_for}, \
         half_open_requests: 1 }}\n"
    )
}

#[tokio::test]
async fn breaker_state_survives_a_reload_that_does_not_change_it() {
    let (up_a, up_b) = (GatedUpstream::start().await, GatedUpstream::start().await);
    up_a.set_status(502);
    let dir = TempDir::new("shedding-reload");
    let file = dir.write(
        "spillway.yaml",
        &two_route_config(up_a.addr, up_b.addr, &reload_breaker("30s"), "5s"),
    );
    let p = TestProxy::start_file(&file).await;

    for _ in 0..4 {
        assert_from_upstream(&get(&p.url("/a/x")).await, 502);
    }
    assert_eq!(p.metric(&breaker_series("a")).await, 2.0);
    assert_circuit_open(&get(&p.url("/a/x")).await, "30");
    assert_eq!(up_a.total(), 4);

    // Only route b changes: route a keeps its open breaker.
    dir.write(
        "spillway.yaml",
        &two_route_config(up_a.addr, up_b.addr, &reload_breaker("30s"), "6s"),
    );
    let reloaded = spillway::reload::reload(&p.server.shared).expect("reload accepted");
    assert!(reloaded.changed);
    assert_eq!(
        p.server.shared.runtime.load().routes[1]
            .settings
            .policy
            .timeout,
        Duration::from_secs(6)
    );
    let r = get(&p.url("/a/x")).await;
    assert_eq!(
        r.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "breaker lost on reload: {r:?}"
    );
    // Rounded up from just under 30 s: the same open period, not a new one.
    assert_circuit_open(&r, "30");
    assert_eq!(
        up_a.total(),
        4,
        "the kept breaker still keeps requests away from the upstream"
    );
    assert_eq!(p.metric(&breaker_series("a")).await, 2.0);
    assert_eq!(p.metric(&shed_series("circuit_open", "a")).await, 2.0);
    assert_from_upstream(&get(&p.url("/b/y")).await, 200);
    assert_eq!(up_b.requests(), ["GET /b/y"]);

    // Route a's breaker settings change: it starts fresh, closed.
    dir.write(
        "spillway.yaml",
        &two_route_config(up_a.addr, up_b.addr, &reload_breaker("31s"), "6s"),
    );
    assert!(
        spillway::reload::reload(&p.server.shared)
            .expect("reload accepted")
            .changed
    );
    assert_eq!(
        p.metric(&breaker_series("a")).await,
        0.0,
        "a new breaker starts closed"
    );
    assert_from_upstream(&get(&p.url("/a/x")).await, 502);
    assert_eq!(
        up_a.total(),
        5,
        "the fresh breaker lets the request through"
    );
    assert_eq!(p.metric(&shed_series("circuit_open", "a")).await, 2.0);
}

#[tokio::test]
async fn limiter_state_survives_a_reload_that_does_not_change_it() {
    let (up_a, up_b) = (GatedUpstream::start().await, GatedUpstream::start().await);
    let dir = TempDir::new("shedding-reload-limit");
    let limit = "    concurrency: { max: 1, queue: 0 }\n";
    let file = dir.write(
        "spillway.yaml",
        &two_route_config(up_a.addr, up_b.addr, limit, "5s"),
    );
    let p = TestProxy::start_file(&file).await;

    let held = spawn_get(p.url("/a/hold"));
    assert_eq!(up_a.wait_held(1).await, 1);
    assert_overloaded(&get(&p.url("/a/x")).await, RETRY_AFTER_SECS);

    // Only route b changes: the request in flight on route a still holds route a's only permit.
    dir.write(
        "spillway.yaml",
        &two_route_config(up_a.addr, up_b.addr, limit, "6s"),
    );
    assert!(
        spillway::reload::reload(&p.server.shared)
            .expect("reload accepted")
            .changed
    );
    assert_overloaded(&get(&p.url("/a/x")).await, RETRY_AFTER_SECS);
    assert_eq!(p.metric(&shed_series("concurrency_limit", "a")).await, 2.0);
    assert_eq!(up_a.requests(), ["GET /a/hold"]);
    assert_from_upstream(&get(&p.url("/b/y")).await, 200);

    up_a.release(1);
    assert_from_upstream(&join(held).await, 200);
    assert_from_upstream(&get(&p.url("/a/x")).await, 200);
    assert_eq!(up_a.requests(), ["GET /a/hold", "GET /a/x"]);
    assert_eq!(p.metric_settles_at(&in_flight_series("a"), 0.0).await, 0.0);
    assert_eq!(p.metric(&limit_series("a")).await, 1.0);
}
