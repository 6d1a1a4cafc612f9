//! Priorities: under overload the least important requests are shed first. A route's class is
//! its `priority`; with a `priority_header`, a request's header names its own class. Refusals
//! are counted by class.

use super::*;

const PRIORITY_HEADER_YAML: &str = "    priority_header: x-priority\n";

/// `GET url` with `x-priority: value`.
fn get_as(url: &str, value: &'static str) -> http::Request<http_body_util::Full<bytes::Bytes>> {
    let mut r = req(Method::GET, url, "");
    r.headers_mut().insert("x-priority", value.parse().unwrap());
    r
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
