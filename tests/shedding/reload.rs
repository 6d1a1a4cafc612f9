//! Reload: a route's breaker and limiter state survive a reload that does not change that
//! route's policy, and start fresh when it does.

use super::*;

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
    let reloaded = p.server.reloader.reload().expect("reload accepted");
    assert!(reloaded.changed);
    assert_eq!(
        p.server.state.runtime.load().routes[1]
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
    assert!(p.server.reloader.reload().expect("reload accepted").changed);
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
    assert!(p.server.reloader.reload().expect("reload accepted").changed);
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
