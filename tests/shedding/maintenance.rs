//! Maintenance: every request is answered 503 with a `Retry-After` (its own, or the route's)
//! and the upstream is never called.

use super::*;

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
