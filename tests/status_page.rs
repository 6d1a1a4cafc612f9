//! The status page on the admin port: `GET /` is a self-contained HTML page with one row per
//! route, `GET /status.json` holds the counts and live policy state it draws, and both follow
//! the traffic spillway sends (upstream answers, its own 502s, refusals) and its readiness.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use serde_json::Value;

/// Routes: `api` (breaker on, adaptive limit) and `web` to a live upstream, `down` to a port
/// where nothing listens (502 from the proxy), `closed` in maintenance (503 refusals).
fn config(upstream: std::net::SocketAddr, refusing: std::net::SocketAddr) -> String {
    format!(
        "server_id: status-page-test\n\
         listeners:\n  - name: http\n    address: 127.0.0.1:0\n\
         admin:\n  address: 127.0.0.1:0\n\
         upstreams:\n\
         \x20 app:\n    endpoints: [\"{upstream}\"]\n\
         \x20 nowhere:\n    endpoints: [\"{refusing}\"]\n    connect_timeout: 500ms\n\
         routes:\n\
         \x20 - name: api\n    match: {{ path_prefix: /api }}\n    upstream: app\n\
         \x20   circuit_breaker: {{ enabled: true }}\n\
         \x20   concurrency: {{ adaptive: {{ min: 3, max: 40 }} }}\n\
         \x20 - name: down\n    match: {{ path_prefix: /down }}\n    upstream: nowhere\n\
         \x20 - name: closed\n    match: {{ path_prefix: /closed }}\n    upstream: app\n\
         \x20   maintenance: {{ enabled: true }}\n\
         \x20 - name: web\n    match: {{ path_prefix: / }}\n    upstream: app\n    concurrency: {{ max: 9 }}\n\
         shutdown: {{ drain_delay: 1s, drain_timeout: 1s }}\n"
    )
}

async fn status_json(p: &TestProxy) -> Value {
    let r = get(&format!("http://{}/status.json", p.admin)).await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(r.header("content-type"), "application/json");
    assert_eq!(r.header("cache-control"), "no-store");
    serde_json::from_slice(&r.body).expect("status.json is JSON")
}

fn row<'v>(status: &'v Value, name: &str) -> &'v Value {
    status["routes"]
        .as_array()
        .expect("routes array")
        .iter()
        .find(|r| r["name"] == name)
        .unwrap_or_else(|| panic!("no row for route {name}: {status:#}"))
}

/// Polls status.json (bounded by [`STEP`]) until `route` has a row whose total reaches `n`: a
/// response is counted when its body has ended, which can be just after the client read it.
async fn until_total(p: &TestProxy, route: &str, n: u64) -> Value {
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let s = status_json(p).await;
        let total = s["routes"]
            .as_array()
            .and_then(|rows| rows.iter().find(|r| r["name"] == route))
            .and_then(|r| r["requests"]["total"].as_u64());
        if total >= Some(n) || tokio::time::Instant::now() >= deadline {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn status_page_shows_every_route_with_its_traffic() {
    let upstream = EchoUpstream::start().await;
    let refusing = refusing_addr().await;
    let p = TestProxy::start(&config(upstream.addr, refusing)).await;

    for _ in 0..5 {
        assert_eq!(get(&p.url("/api/items")).await.status, StatusCode::OK);
    }
    for _ in 0..2 {
        assert_eq!(get(&p.url("/down")).await.status, StatusCode::BAD_GATEWAY);
    }
    assert_eq!(
        get(&p.url("/closed")).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(get(&p.url("/")).await.status, StatusCode::OK);

    until_total(&p, "api", 5).await;
    until_total(&p, "down", 2).await;
    until_total(&p, "closed", 1).await;
    let s = until_total(&p, "web", 1).await;

    assert_eq!(s["server_id"], "status-page-test");
    assert_eq!(s["ready"], true);
    assert_eq!(s["reload"]["last_successful"], true);
    assert_eq!(s["build_version"], env!("CARGO_PKG_VERSION"));
    // spillway's own state: no memory pressure; the listener's connections (the test's client
    // may keep some open), none refused.
    assert_eq!(s["process"]["memory_pressure"], 0);
    assert_eq!(s["process"]["listeners"]["http"]["refused"], 0);
    assert!(s["process"]["listeners"]["http"]["open"].as_u64().is_some());
    let names: Vec<&str> = s["routes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["api", "down", "closed", "web"],
        "match order, no unmatched row"
    );

    let api = row(&s, "api");
    assert_eq!(api["matcher"], "/api");
    assert_eq!(api["upstream"], "app");
    assert_eq!(api["requests"]["total"], 5);
    assert_eq!(api["requests"]["upstream"]["2xx"], 5);
    assert_eq!(api["requests"]["proxy"]["5xx"], 0);
    assert_eq!(api["latency"]["count"], 5);
    assert!(api["latency"]["p99_seconds"].as_f64().unwrap() > 0.0);
    assert_eq!(api["breaker"], "closed");
    assert_eq!(api["limiter"]["adaptive"], true);
    assert_eq!(api["limiter"]["in_flight"], 0);
    assert!(api["limiter"]["limit"].as_u64().unwrap() >= 3);

    let down = row(&s, "down");
    assert_eq!(
        down["requests"]["proxy"]["5xx"], 2,
        "502s are the proxy's: {down:#}"
    );
    assert_eq!(down["requests"]["upstream"]["5xx"], 0);
    assert_eq!(down["upstream_errors"]["connection_refused"], 2);
    assert_eq!(down["breaker"], "disabled");

    let closed = row(&s, "closed");
    assert_eq!(closed["maintenance"], true);
    assert_eq!(closed["shed"]["maintenance"], 1);
    assert_eq!(closed["shed"]["concurrency_limit"], 0);
    assert_eq!(closed["requests"]["proxy"]["5xx"], 1);

    let web = row(&s, "web");
    assert_eq!(web["limiter"]["limit"], 9);
    assert_eq!(web["limiter"]["adaptive"], false);

    // A request no route takes cannot happen here (`web` matches everything), so there is no
    // `unmatched` row; the page itself.
    let page = get(&format!("http://{}/", p.admin)).await;
    assert_eq!(page.status, StatusCode::OK);
    assert_eq!(page.header("content-type"), "text/html; charset=utf-8");
    assert_eq!(page.header("cache-control"), "no-store");
    assert!(page
        .header("content-security-policy")
        .starts_with("default-src 'none'"));
    let html = page.text();
    assert!(html.contains("<title>spillway status</title>"), "{html}");
    for name in ["api", "down", "closed", "web"] {
        assert!(
            html.contains(&format!(r#"<tr class="route" data-route="{name}">"#)),
            "server-rendered row for {name}"
        );
    }
    assert!(
        html.contains(r#"fetch("status.json""#),
        "the page refreshes itself"
    );
    assert!(
        html.contains(r#""server_id":"status-page-test""#),
        "first sample embedded"
    );
    let lower = html.to_ascii_lowercase();
    for external in ["http://", "https://", "src=", "<link"] {
        assert!(
            !lower.contains(external),
            "self-contained page, found {external}"
        );
    }

    // Samples move forward in time, so the page can turn differences into rates.
    let first = s["sampled_at_ms"].as_u64().unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let later = status_json(&p).await["sampled_at_ms"].as_u64().unwrap();
    assert!(later > first, "{later} > {first}");

    // Only GET.
    let post = send(
        Request::builder()
            .method(Method::POST)
            .uri(format!("http://{}/status.json", p.admin))
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(post.status, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn unmatched_requests_get_their_own_row() {
    let upstream = EchoUpstream::start().await;
    let yaml = format!(
        "listeners:\n  - address: 127.0.0.1:0\n\
         admin:\n  address: 127.0.0.1:0\n\
         upstreams:\n  app:\n    endpoints: [\"{}\"]\n\
         routes:\n  - name: only\n    match: {{ path_prefix: /only }}\n    upstream: app\n",
        upstream.addr
    );
    let p = TestProxy::start(&yaml).await;
    assert_eq!(
        get(&p.url("/elsewhere")).await.status,
        StatusCode::NOT_FOUND
    );
    let s = until_total(&p, "unmatched", 1).await;
    let unmatched = row(&s, "unmatched");
    assert_eq!(unmatched["requests"]["proxy"]["4xx"], 1);
    assert_eq!(unmatched["limiter"], Value::Null);
    assert_eq!(s["routes"][0]["name"], "only");
}

#[tokio::test]
async fn status_shows_draining_while_shutting_down() {
    let upstream = EchoUpstream::start().await;
    let refusing = refusing_addr().await;
    let TestProxy { server, admin, .. } = TestProxy::start(&config(upstream.addr, refusing)).await;
    let url = format!("http://{admin}/status.json");
    let before: Value = serde_json::from_slice(&get(&url).await.body).unwrap();
    assert_eq!(before["ready"], true);
    // drain_delay is 1 s: the admin endpoint keeps answering meanwhile, and says so.
    let draining = tokio::spawn(server.shutdown());
    let deadline = tokio::time::Instant::now() + STEP;
    let mut during = before;
    while during["ready"] == true && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
        during = serde_json::from_slice(&get(&url).await.body).unwrap();
    }
    assert_eq!(during["ready"], false);
    let html = get(&format!("http://{admin}/")).await.text();
    assert!(html.contains(r#""ready":false"#));
    tokio::time::timeout(STEP, draining)
        .await
        .expect("shutdown finishes")
        .expect("shutdown task");
}
