//! Priorities: under overload the least important requests are shed first. A route's class is
//! its `priority`; with a `priority_header`, a request's header names its own class. Refusals
//! are counted by class, and the `Retry-After` of the limit's refusals is spread so that
//! refused clients do not come back together.

use super::*;

const PRIORITY_HEADER_YAML: &str = "    priority_header: x-priority\n";

/// `GET url` with `x-priority: value`, in its own task.
fn spawn_get_as(url: String, value: &'static str) -> JoinHandle<Resp> {
    tokio::spawn(async move { send(get_as(&url, value)).await })
}

fn get_as(url: &str, value: &'static str) -> http::Request<http_body_util::Full<bytes::Bytes>> {
    let mut r = req(Method::GET, url, "");
    r.headers_mut().insert("x-priority", value.parse().unwrap());
    r
}

#[tokio::test]
async fn sheddable_requests_are_refused_first_and_critical_ones_still_get_in() {
    let up = GatedUpstream::start().await;
    let extra = format!(
        "    concurrency: {{ max: 4, queue: 0 }}\n{PRIORITY_HEADER_YAML}{RETRY_AFTER_YAML}"
    );
    let p = TestProxy::start(&TestProxy::simple_config(up.addr, &extra)).await;

    // Two sheddable requests in flight: half the limit, all that sheddable ones may fill.
    let held: Vec<_> = (0..2)
        .map(|i| spawn_get_as(p.url(&format!("/hold?i={i}")), "sheddable"))
        .collect();
    assert_eq!(up.wait_held(2).await, 2);

    // A third sheddable one is refused at once, without reaching the upstream.
    let r = send(get_as(&p.url("/third"), "sheddable")).await;
    assert_overloaded(&r, RETRY_AFTER_SECS);
    assert_eq!(
        p.metric(&shed_series_of("sheddable", "concurrency_limit", ROUTE))
            .await,
        1.0
    );
    // A critical one gets in (the upstream answers it at once), and so does a normal one
    // (up to 0.9 × 4, rounded up: 4).
    assert_from_upstream(&send(get_as(&p.url("/critical"), "critical")).await, 200);
    assert_from_upstream(&send(get_as(&p.url("/normal"), "normal")).await, 200);
    let mut reached = up.requests();
    reached.sort();
    assert_eq!(
        reached,
        [
            "GET /critical",
            "GET /hold?i=0",
            "GET /hold?i=1",
            "GET /normal"
        ],
        "the refused one never reached the upstream"
    );
    for priority in ["critical", "normal"] {
        for reason in ["concurrency_limit", "queue_timeout"] {
            assert_eq!(
                p.metric(&shed_series_of(priority, reason, ROUTE)).await,
                0.0,
                "{priority} {reason}"
            );
        }
    }
    // The response counter keeps its labels: one 503 among the GETs.
    let s = requests_series(503, "GET", ROUTE, "proxy");
    assert_eq!(p.metric_at_least(&s, 1.0).await, 1.0);

    up.release(2);
    for h in held {
        assert_from_upstream(&join(h).await, 200);
    }
    assert_eq!(
        p.metric_settles_at(&in_flight_series(ROUTE), 0.0).await,
        0.0
    );
}

#[tokio::test]
async fn the_route_priority_is_the_default_class() {
    let up = GatedUpstream::start().await;
    let extra = format!(
        "    concurrency: {{ max: 2, queue: 0 }}\n    priority: sheddable\n{PRIORITY_HEADER_YAML}{RETRY_AFTER_YAML}"
    );
    let p = TestProxy::start(&TestProxy::simple_config(up.addr, &extra)).await;
    // No header: the route's class, sheddable, which may fill 0.5 × 2 = 1.
    let held = spawn_get(p.url("/hold"));
    assert_eq!(up.wait_held(1).await, 1);
    assert_overloaded(&get(&p.url("/plain")).await, RETRY_AFTER_SECS);
    // A value that names no class leaves the route's.
    assert_overloaded(
        &send(get_as(&p.url("/bogus"), "urgent")).await,
        RETRY_AFTER_SECS,
    );
    assert_eq!(
        p.metric(&shed_series_of("sheddable", "concurrency_limit", ROUTE))
            .await,
        2.0
    );
    // The class is read in any case.
    assert_from_upstream(&send(get_as(&p.url("/vip"), "CRITICAL")).await, 200);
    assert_eq!(up.total(), 2, "{:?}", up.requests());
    up.release(1);
    assert_from_upstream(&join(held).await, 200);
}

#[tokio::test]
async fn without_a_priority_header_a_client_cannot_choose_its_class() {
    let up = GatedUpstream::start().await;
    // The route is sheddable and names no header: every request is sheddable, and since they
    // are all alike the whole limit is theirs.
    let extra = format!(
        "    concurrency: {{ max: 2, queue: 0 }}\n    priority: sheddable\n{RETRY_AFTER_YAML}"
    );
    let p = TestProxy::start(&TestProxy::simple_config(up.addr, &extra)).await;
    let held: Vec<_> = (0..2)
        .map(|i| spawn_get(p.url(&format!("/hold?i={i}"))))
        .collect();
    assert_eq!(up.wait_held(2).await, 2);
    let r = send(get_as(&p.url("/vip"), "critical")).await;
    assert_overloaded(&r, RETRY_AFTER_SECS);
    assert_eq!(
        p.metric(&shed_series_of("sheddable", "concurrency_limit", ROUTE))
            .await,
        1.0
    );
    assert_eq!(
        p.metric(&shed_series_of("critical", "concurrency_limit", ROUTE))
            .await,
        0.0
    );
    up.release(2);
    for h in held {
        assert_from_upstream(&join(h).await, 200);
    }
}

#[tokio::test]
async fn refusals_are_counted_under_the_class_the_request_was_given() {
    let up = GatedUpstream::start().await;
    let extra = format!(
        "    concurrency: {{ max: 1, queue: 0 }}\n    priority: sheddable\n{PRIORITY_HEADER_YAML}"
    );
    let p = TestProxy::start(&TestProxy::simple_config(up.addr, &extra)).await;
    let held = spawn_get(p.url("/hold"));
    assert_eq!(up.wait_held(1).await, 1);
    // No header, or one naming no class: the route's class.
    for r in [
        get(&p.url("/plain")).await,
        send(get_as(&p.url("/bogus"), "urgent")).await,
    ] {
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{r:?}");
    }
    // The header's class, in any case.
    for value in ["critical", "Critical", "NORMAL"] {
        let r = send(get_as(&p.url("/classed"), value)).await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{r:?}");
    }
    for (priority, n) in [("sheddable", 2.0), ("critical", 2.0), ("normal", 1.0)] {
        let series = shed_series_of(priority, "concurrency_limit", ROUTE);
        assert_eq!(p.metric(&series).await, n, "{priority}");
    }
    up.release(1);
    assert_from_upstream(&join(held).await, 200);

    // The header reaches the app as it was sent.
    let echo = EchoUpstream::start().await;
    let p = TestProxy::start(&TestProxy::simple_config(echo.addr, PRIORITY_HEADER_YAML)).await;
    let r = send(get_as(&p.url("/echo"), "Critical")).await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(echo.seen()[0].header("x-priority"), "Critical");
}

#[tokio::test]
async fn retry_after_of_the_limit_is_spread_over_the_upper_half_of_retry_after() {
    let up = GatedUpstream::start().await;
    let extra = format!("    concurrency: {{ max: 1, queue: 0 }}\n{RETRY_AFTER_YAML}");
    let p = TestProxy::start(&TestProxy::simple_config(up.addr, &extra)).await;
    let held = spawn_get(p.url("/hold"));
    assert_eq!(up.wait_held(1).await, 1);
    let mut seen = std::collections::BTreeMap::<u64, usize>::new();
    for i in 0..100 {
        let r = get(&p.url(&format!("/over?i={i}"))).await;
        // In [⌈7/2⌉, 7] = [4, 7], whole seconds.
        assert_overloaded(&r, RETRY_AFTER_SECS);
        *seen
            .entry(r.header("retry-after").parse().unwrap())
            .or_default() += 1;
    }
    assert!(seen.len() > 1, "100 refusals, one Retry-After: {seen:?}");
    assert_eq!(
        p.metric(&shed_series("concurrency_limit", ROUTE)).await,
        100.0
    );
    up.release(1);
    assert_from_upstream(&join(held).await, 200);
}
