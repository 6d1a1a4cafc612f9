//! Latency numbers that cannot lie: a request the route timeout cut is counted exactly at the
//! timeout (a bucket boundary of that route), and the upstream histogram holds the app's
//! answers only, never spillway's own refusals and failures.

use super::*;

/// A config with four routes on the demo app `app` and a port nothing listens on.
fn config(app: SocketAddr, nowhere: SocketAddr) -> String {
    format!(
        "server_id: {SERVER_ID}\n\
         listeners:\n  - name: http\n    address: 127.0.0.1:0\n\
         admin:\n  address: 127.0.0.1:0\n\
         upstreams:\n\
         \x20 app: {{ endpoints: [\"{app}\"] }}\n\
         \x20 dead: {{ endpoints: [\"{nowhere}\"] }}\n\
         routes:\n\
         \x20 - {{ name: slow, match: {{ path_prefix: /slow }}, upstream: app, timeout: 300ms }}\n\
         \x20 - {{ name: closed, match: {{ path_prefix: /closed }}, upstream: app, maintenance: {{ enabled: true }} }}\n\
         \x20 - {{ name: dead, match: {{ path_prefix: /dead }}, upstream: dead }}\n\
         \x20 - {{ name: app, match: {{ path_prefix: / }}, upstream: app }}\n"
    )
}

#[tokio::test]
async fn a_timed_out_request_lands_exactly_on_its_routes_timeout() {
    let app = DemoApp::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let p = TestProxy::start(&config(app.local_addr(), refusing_addr().await)).await;
    for _ in 0..3 {
        let r = get(&p.url("/slow?ms=2000")).await;
        assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT);
    }
    assert_eq!(
        p.metric_at_least(&duration_count("slow", 504), 3.0).await,
        3.0
    );
    let m = p.metrics().await;
    // 300 ms is no shared boundary: the route's own. Every 504 is on it, none below it.
    assert_eq!(
        metric_value(&m, &duration_bucket("slow", 504, "0.3")),
        3.0,
        "{m}"
    );
    assert_eq!(metric_value(&m, &duration_bucket("slow", 504, "0.25")), 0.0);
    let sum = metric_value(
        &m,
        r#"spillway_request_duration_seconds_sum{code="504",route="slow"}"#,
    );
    assert!(
        (sum - 0.9).abs() < 1e-9,
        "observed at exactly 300 ms each: {sum}"
    );
    // The app never answered: nothing in the upstream histogram.
    assert_eq!(metric_value(&m, &upstream_count("slow")), 0.0);
    // Other routes keep the shared boundaries only.
    assert!(!m.contains(r#"route="app",le="0.3""#));
    assert!(m.contains(r#"spillway_upstream_duration_seconds_bucket{route="app",le="0.0001"} 0"#));
}

#[tokio::test]
async fn the_upstream_histogram_counts_the_apps_answers_only() {
    let app = DemoApp::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let p = TestProxy::start(&config(app.local_addr(), refusing_addr().await)).await;
    for _ in 0..4 {
        assert_eq!(get(&p.url("/ok")).await.status, StatusCode::OK);
    }
    assert_eq!(
        get(&p.url("/status/500")).await.status,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    for _ in 0..2 {
        assert_eq!(
            get(&p.url("/closed")).await.status,
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(get(&p.url("/dead")).await.status, StatusCode::BAD_GATEWAY);
    }
    // An answer within the timeout, on the route that has one of its own.
    assert_eq!(get(&p.url("/slow?ms=150")).await.status, StatusCode::OK);

    assert_eq!(
        p.metric_at_least(&duration_count("app", 200), 4.0).await,
        4.0
    );
    assert_eq!(
        p.metric_at_least(&duration_count("slow", 200), 1.0).await,
        1.0
    );
    let m = p.metrics().await;
    // The app's answers, whatever their status: 4 × 200 and the 500.
    assert_eq!(metric_value(&m, &upstream_count("app")), 5.0, "{m}");
    assert_eq!(metric_value(&m, &upstream_bucket("app", "+Inf")), 5.0);
    // Spillway's 503 sheds and 502 failures are requests, not the app's latency.
    assert_eq!(metric_value(&m, &duration_count("closed", 503)), 2.0);
    assert_eq!(metric_value(&m, &duration_count("dead", 502)), 2.0);
    assert_eq!(metric_value(&m, &upstream_count("closed")), 0.0);
    assert_eq!(metric_value(&m, &upstream_count("dead")), 0.0);
    // 150 ms: above 100 ms, within the route's 300 ms.
    assert_eq!(metric_value(&m, &upstream_count("slow")), 1.0);
    assert_eq!(metric_value(&m, &upstream_bucket("slow", "0.1")), 0.0);
    assert_eq!(metric_value(&m, &upstream_bucket("slow", "0.3")), 1.0);
}
