//! Metrics count each response exactly once, in-flight follows a request until it ends, and the
//! admin endpoint serves health, readiness, config and metrics (and does not proxy).

use super::*;

#[tokio::test]
async fn metrics_count_each_response_exactly_once() {
    let app = DemoApp::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let nowhere = refusing_addr().await;
    let yaml = format!(
        "server_id: {SERVER_ID}\n\
         listeners:\n  - name: http\n    address: 127.0.0.1:0\n\
         admin:\n  address: 127.0.0.1:0\n\
         upstreams:\n\
         \x20 app: {{ endpoints: [\"{}\"] }}\n\
         \x20 dead: {{ endpoints: [\"{nowhere}\"] }}\n\
         routes:\n\
         \x20 - {{ name: broken, match: {{ path_prefix: /broken }}, upstream: dead }}\n\
         \x20 - {{ name: app, match: {{ path_prefix: / }}, upstream: app }}\n",
        app.local_addr()
    );
    let p = TestProxy::start(&yaml).await;
    for _ in 0..3 {
        assert_eq!(get(&p.url("/ok")).await.status, StatusCode::OK);
    }
    assert_eq!(
        get(&p.url("/status/503")).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        send(req(Method::DELETE, &p.url("/ok"), "")).await.status,
        StatusCode::OK
    );
    let brew = Method::from_bytes(b"BREW").unwrap();
    assert_eq!(
        send(req(brew.clone(), &p.url("/ok"), "")).await.status,
        StatusCode::OK
    );
    assert_eq!(
        send(req(brew, &p.url("/broken"), "")).await.status,
        StatusCode::BAD_GATEWAY
    );
    for _ in 0..2 {
        assert_eq!(
            get(&p.url("/broken/x")).await.status,
            StatusCode::BAD_GATEWAY
        );
    }
    // A streamed body, to be sure accounting waits for its end.
    let r = get(&p.url("/stream?chunks=3&interval_ms=10")).await;
    assert_eq!(r.status, StatusCode::OK);

    let expect = [
        (requests_series(200, "GET", "app", "upstream"), 4.0),
        (requests_series(503, "GET", "app", "upstream"), 1.0),
        (requests_series(200, "DELETE", "app", "upstream"), 1.0),
        (requests_series(200, "OTHER", "app", "upstream"), 1.0),
        (requests_series(502, "OTHER", "broken", "proxy"), 1.0),
        (requests_series(502, "GET", "broken", "proxy"), 2.0),
        (duration_count_series(200, "app"), 6.0),
        (duration_count_series(503, "app"), 1.0),
        (duration_count_series(502, "broken"), 3.0),
        (upstream_errors_series("connection_refused", "broken"), 3.0),
    ];
    for (series, n) in &expect {
        assert_eq!(p.metric_at_least(series, *n).await, *n, "{series}");
    }
    let text = p.metrics().await;
    // Nothing else was counted: the totals over all series match the number of responses.
    let total = metric_sum(&text, "spillway_requests_total");
    assert_eq!(total, 10.0, "{text}");
    let errors = metric_sum(&text, "spillway_upstream_errors_total");
    assert_eq!(errors, 3.0, "{text}");
    assert_eq!(
        metric_value(&text, &requests_series(503, "GET", "app", "proxy")),
        0.0
    );
    assert_eq!(
        metric_value(
            &text,
            &format!(
                r#"spillway_build_info{{version="{}"}}"#,
                env!("CARGO_PKG_VERSION")
            )
        ),
        1.0
    );
    for route in ["app", "broken", "unmatched"] {
        assert_eq!(
            p.metric_settles_at(&in_flight_series(route), 0.0).await,
            0.0,
            "{route}"
        );
    }
    assert_eq!(
        metric_value(&text, "spillway_in_flight_requests{route=\"app\"}"),
        0.0
    );
    // No method label ever carries a raw non-standard method.
    assert!(!text.contains("BREW"), "{text}");
}

#[tokio::test]
async fn in_flight_counts_a_request_until_it_ends() {
    let app = DemoApp::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let p = TestProxy::start(&TestProxy::simple_config(app.local_addr(), "")).await;
    assert_eq!(p.metric(&in_flight_series(DEFAULT_ROUTE)).await, 0.0);
    let slow = tokio::spawn({
        let url = p.url("/slow?ms=1500");
        async move { get(&url).await }
    });
    // Observed while the app is still sleeping on it.
    assert_eq!(
        p.metric_at_least(&in_flight_series(DEFAULT_ROUTE), 1.0)
            .await,
        1.0
    );
    let r = slow.await.unwrap();
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        p.metric_settles_at(&in_flight_series(DEFAULT_ROUTE), 0.0)
            .await,
        0.0
    );
    let s = requests_series(200, "GET", DEFAULT_ROUTE, "upstream");
    assert_eq!(p.metric_at_least(&s, 1.0).await, 1.0);
}

#[tokio::test]
async fn admin_serves_health_readiness_config_and_metrics() {
    let up = EchoUpstream::start().await;
    let p = TestProxy::start(&TestProxy::simple_config(up.addr, "")).await;
    let base = format!("http://{}", p.admin);

    let h = get(&format!("{base}/healthz")).await;
    assert_eq!(h.status, StatusCode::OK);
    let r = get(&format!("{base}/readyz")).await;
    assert_eq!(r.status, StatusCode::OK);

    let c = get(&format!("{base}/config")).await;
    assert_eq!(c.status, StatusCode::OK);
    assert_eq!(c.header("content-type"), "application/json");
    let json: serde_json::Value = serde_json::from_slice(&c.body).expect("valid JSON");
    let version = json["version"].as_str().expect("version string");
    assert_eq!(version.len(), 12, "{version}");
    assert_eq!(json["config"]["server_id"], SERVER_ID, "{json}");
    assert!(json["config"].is_object(), "{json}");

    let m = get(&format!("{base}/metrics")).await;
    assert_eq!(m.status, StatusCode::OK);
    assert!(m.header("content-type").starts_with("text/plain"), "{m:?}");
    let line = format!(
        "spillway_build_info{{version=\"{}\"}} 1\n",
        env!("CARGO_PKG_VERSION")
    );
    assert!(m.text().contains(&line), "{}", m.text());

    // The admin port does not proxy.
    let x = get(&format!("{base}/ok")).await;
    assert_eq!(x.status, StatusCode::NOT_FOUND);
    assert_eq!(up.seen().len(), 0);
}
