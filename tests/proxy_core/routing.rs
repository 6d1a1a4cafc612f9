//! Route matching by path prefix, host (wildcards; case and port ignored) and method, the first
//! match in file order winning, each request counted under its route.

use super::*;

/// (method, path, Host or `None` for the default, `(route, upstream)` or `None` for unmatched)
type RouteCase = (
    Method,
    &'static str,
    Option<&'static str>,
    Option<(&'static str, &'static str)>,
);

#[tokio::test]
async fn routes_match_prefix_host_and_method_first_match_wins() {
    let a = EchoUpstream::with_headers(&[("x-which", "a")]).await;
    let b = EchoUpstream::with_headers(&[("x-which", "b")]).await;
    let c = EchoUpstream::with_headers(&[("x-which", "c")]).await;
    let yaml = format!(
        "server_id: {SERVER_ID}\n\
         listeners:\n  - name: http\n    address: 127.0.0.1:0\n\
         admin:\n  address: 127.0.0.1:0\n\
         upstreams:\n\
         \x20 a: {{ endpoints: [\"{}\"] }}\n\
         \x20 b: {{ endpoints: [\"{}\"] }}\n\
         \x20 c: {{ endpoints: [\"{}\"] }}\n\
         routes:\n\
         \x20 - {{ name: api, match: {{ path_prefix: /api }}, upstream: a }}\n\
         \x20 - {{ name: shop, match: {{ host: Shop.Example.com }}, upstream: b }}\n\
         \x20 - {{ name: wild, match: {{ host: \"*.example.com\", methods: [post, PUT] }}, upstream: c }}\n\
         \x20 - {{ name: first, match: {{ path_prefix: /dup/ }}, upstream: a }}\n\
         \x20 - {{ name: second, match: {{ path_prefix: /dup }}, upstream: b }}\n",
        a.addr, b.addr, c.addr
    );
    let p = TestProxy::start(&yaml).await;

    let cases: &[RouteCase] = &[
        (Method::GET, "/api", None, Some(("api", "a"))),
        (Method::GET, "/api/", None, Some(("api", "a"))),
        (Method::GET, "/api/x/y?z=1", None, Some(("api", "a"))),
        (Method::GET, "/apix", None, None),
        (
            Method::GET,
            "/apix",
            Some("SHOP.example.COM:8080"),
            Some(("shop", "b")),
        ),
        // Both api and shop match: the first in file order wins.
        (
            Method::GET,
            "/api/x",
            Some("shop.example.com"),
            Some(("api", "a")),
        ),
        (Method::GET, "/", Some("shopx.example.com"), None),
        (
            Method::POST,
            "/x",
            Some("a.b.example.com"),
            Some(("wild", "c")),
        ),
        (
            Method::PUT,
            "/x",
            Some("Deep.Example.COM:9999"),
            Some(("wild", "c")),
        ),
        (Method::GET, "/x", Some("a.example.com"), None),
        (Method::POST, "/x", Some("example.com"), None),
        (Method::POST, "/x", Some("badexample.com"), None),
        (Method::GET, "/dup", None, Some(("first", "a"))),
        (Method::GET, "/dup/z", None, Some(("first", "a"))),
    ];
    for (method, path, host, want) in cases {
        let mut b = Request::builder().method(method.clone()).uri(p.url(path));
        if let Some(h) = host {
            b = b.header("host", *h);
        }
        let r = send(b.body(Full::new(Bytes::new())).unwrap()).await;
        let what = format!("{method} {path} host={host:?}");
        match want {
            Some((_, upstream)) => {
                assert_eq!(r.status, StatusCode::OK, "{what}: {r:?}");
                assert_eq!(r.header("x-which"), *upstream, "{what}");
            }
            None => {
                assert_eq!(r.status, StatusCode::NOT_FOUND, "{what}: {r:?}");
                assert_eq!(r.header("x-which"), "", "{what}");
                assert_eq!(r.header("x-served-by"), SERVER_ID, "{what}");
            }
        }
    }
    assert_eq!(a.seen().len(), 6);
    assert_eq!(b.seen().len(), 1);
    assert_eq!(c.seen().len(), 2);

    let expect = [
        (requests_series(200, "GET", "api", "upstream"), 4.0),
        (requests_series(200, "GET", "shop", "upstream"), 1.0),
        (requests_series(200, "POST", "wild", "upstream"), 1.0),
        (requests_series(200, "PUT", "wild", "upstream"), 1.0),
        (requests_series(200, "GET", "first", "upstream"), 2.0),
        (requests_series(200, "GET", "second", "upstream"), 0.0),
        (requests_series(404, "GET", "unmatched", "proxy"), 3.0),
        (requests_series(404, "POST", "unmatched", "proxy"), 2.0),
    ];
    for (series, n) in &expect {
        assert_eq!(p.metric_at_least(series, *n).await, *n, "{series}");
    }
}
