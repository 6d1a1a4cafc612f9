//! Criterion micro-benchmarks of the per-request hot path: route matching, the request and
//! response header rewrite, request ids and metric recording.
//!
//! `cargo bench --bench hot_path`

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use http::{HeaderMap, HeaderValue, Method, Uri};
use spillway::config::{HostMatch, MatchSettings};
use spillway::metrics::{Metrics, ResponseSource};
use spillway::proxy::headers::{self, Forwarded, Stamps};
use spillway::proxy::route::{request_host, Matcher};

fn matchers() -> Vec<Matcher> {
    // Ten routes, the catch-all last, as a typical sidecar config looks.
    let mut v: Vec<Matcher> = (0..8)
        .map(|i| {
            Matcher::new(&MatchSettings {
                path_prefix: format!("/api/v{i}/orders"),
                host: Some(HostMatch::Suffix(".example.com".into())),
                methods: vec!["GET".into(), "POST".into()],
            })
        })
        .collect();
    v.push(Matcher::new(&MatchSettings {
        path_prefix: "/static".into(),
        host: None,
        methods: vec![],
    }));
    v.push(Matcher::new(&MatchSettings {
        path_prefix: "/".into(),
        host: None,
        methods: vec![],
    }));
    v
}

fn bench_route_match(c: &mut Criterion) {
    let routes = matchers();
    let mut h = HeaderMap::new();
    h.insert(
        http::header::HOST,
        HeaderValue::from_static("shop.example.com:8080"),
    );
    let hit_last: Uri = "/checkout/cart?id=7".parse().unwrap();
    let hit_first: Uri = "/api/v0/orders/42".parse().unwrap();
    c.bench_function("route_match/10_routes_catch_all", |b| {
        b.iter(|| {
            let host = request_host(black_box(&hit_last), &h);
            routes
                .iter()
                .position(|r| r.matches(host, hit_last.path(), &Method::GET))
        })
    });
    c.bench_function("route_match/10_routes_first", |b| {
        b.iter(|| {
            let host = request_host(black_box(&hit_first), &h);
            routes
                .iter()
                .position(|r| r.matches(host, hit_first.path(), &Method::GET))
        })
    });
}

fn bench_headers(c: &mut Criterion) {
    let stamps = Stamps::new("spillway-1");
    let ip = HeaderValue::from_static("10.1.2.3");
    let mut base = HeaderMap::new();
    base.insert(
        http::header::HOST,
        HeaderValue::from_static("shop.example.com"),
    );
    base.insert(
        http::header::USER_AGENT,
        HeaderValue::from_static("curl/8.0"),
    );
    base.insert(http::header::ACCEPT, HeaderValue::from_static("*/*"));
    base.insert(
        http::header::CONNECTION,
        HeaderValue::from_static("keep-alive"),
    );
    let id = HeaderValue::from_static("0123456789abcdef0123456789abcdef");
    let overlay = headers::Overlay::new(
        &stamps,
        &Forwarded {
            client_ip: &ip,
            proto: "http",
        },
        &id,
    );
    // Towards an HTTP/2 upstream: the forwarding fields go into the header map.
    c.bench_function("headers/overlay_apply", |b| {
        b.iter_batched(
            || base.clone(),
            |mut h| {
                headers::strip_hop_by_hop(&mut h);
                overlay.apply(&mut h, None);
                h
            },
            criterion::BatchSize::SmallInput,
        )
    });
    // Towards an HTTP/1.1 upstream: the same fields written straight into the request head.
    let upstream_host = HeaderValue::from_static("app.internal");
    let mut head = Vec::with_capacity(1024);
    c.bench_function("headers/overlay_write_fields", |b| {
        b.iter_batched(
            || base.clone(),
            |mut h| {
                headers::strip_hop_by_hop(&mut h);
                head.clear();
                overlay.write_fields(&mut head, &h, None, &upstream_host);
                h
            },
            criterion::BatchSize::SmallInput,
        )
    });
    let mut resp = HeaderMap::new();
    resp.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain"),
    );
    resp.insert(http::header::CONTENT_LENGTH, HeaderValue::from_static("64"));
    c.bench_function("headers/response_strip_and_stamp", |b| {
        b.iter_batched(
            || resp.clone(),
            |mut h| {
                headers::strip_hop_by_hop(&mut h);
                stamps.stamp_upstream(&mut h);
                h
            },
            criterion::BatchSize::SmallInput,
        )
    });
    c.bench_function("headers/generate_request_id", |b| {
        b.iter(|| headers::request_id(black_box(&resp)))
    });
}

fn bench_metrics(c: &mut Criterion) {
    let m = Metrics::new();
    let r = m.route("default");
    c.bench_function("metrics/record_response", |b| {
        b.iter(|| {
            r.response(
                black_box(&Method::GET),
                black_box(200),
                ResponseSource::Upstream,
                0.000_5,
            )
        })
    });
}

criterion_group!(benches, bench_route_match, bench_headers, bench_metrics);
criterion_main!(benches);
