//! The concurrency limit: exactly the excess is shed, the queue serves first in first out and
//! is bounded, queued requests give up after `queue_timeout`, and an adaptive limit stays within
//! its bounds.

use super::*;

/// The limiter state of the proxy's first route (to see the queue, which has no metric).
fn limiter(p: &TestProxy) -> Arc<LimiterState> {
    p.server.state.runtime.load().routes[0]
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
