//! The circuit breaker: it opens on failures (connect failures too), lets probes through when
//! half-open, closes after successful probes and reopens on a failed one; while open, requests
//! are refused without reaching the upstream.

use super::*;

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
