//! Upstream connections: sequential requests share one pooled connection, the keep-alive race
//! is resent on a fresh connection, an HTTP/1.0 request without Host gets one, and an h2c
//! client reaches an HTTP/1.1 upstream.

use super::*;

#[tokio::test]
async fn sequential_requests_share_one_pooled_upstream_connection() {
    let up = EchoUpstream::start().await;
    let p = TestProxy::start(&TestProxy::simple_config(up.addr, "")).await;
    for i in 0..20 {
        let r = get(&p.url(&format!("/n/{i}"))).await;
        assert_eq!(r.status, StatusCode::OK, "request {i}");
    }
    assert_eq!(up.seen().len(), 20);
    assert_eq!(
        up.connections(),
        1,
        "20 sequential requests should reuse one upstream connection"
    );
}

#[tokio::test]
async fn an_http10_request_without_host_reaches_the_upstream_with_one() {
    // HTTP/1.1 requires Host; an HTTP/1.0 client may send none. The upstream gets the
    // endpoint's authority, and no X-Forwarded-Host is invented.
    let up = EchoUpstream::start().await;
    let p = TestProxy::start(&TestProxy::simple_config(up.addr, "")).await;
    let out = raw_exchange(p.addr, b"GET /old HTTP/1.0\r\n\r\n").await;
    let text = String::from_utf8_lossy(&out);
    // Answered as HTTP/1.1 (RFC 9110 §2.5: the highest version spillway conforms to), and
    // closed: an HTTP/1.0 client did not ask for keep-alive.
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("\r\nconnection: close\r\n"), "{text}");
    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].header("host"), up.addr.to_string());
    assert_eq!(seen[0].header("x-forwarded-host"), "");
}

#[tokio::test]
async fn keep_alive_race_is_resent_on_a_fresh_connection() {
    // The app closes connections idle for 1 s; spillway keeps them for 10 s, so it reuses
    // connections the app has closed: only the resend on a fresh connection avoids a 502.
    let up = IdleClosingUpstream::start(Duration::from_secs(1)).await;
    let p = TestProxy::start(&config(up.addr, "    idle_timeout: 10s\n", "")).await;
    for i in 0..4 {
        if i > 0 {
            // The scenario itself: let the pooled connection sit idle past the app's limit.
            tokio::time::sleep(Duration::from_millis(1100)).await;
        }
        let r = get(&p.url("/race")).await;
        assert_eq!(r.status, StatusCode::OK, "request {i}: {r:?}");
        assert_eq!(r.text(), "ok");
    }
    assert!(
        up.closed_on_request() >= 1,
        "the race never happened: the test proves nothing"
    );
    assert_eq!(up.answered(), 4, "each request answered exactly once");
    let s = requests_series(200, "GET", DEFAULT_ROUTE, "upstream");
    assert_eq!(p.metric_at_least(&s, 4.0).await, 4.0);
    assert_eq!(
        p.metric(&requests_series(502, "GET", DEFAULT_ROUTE, "proxy"))
            .await,
        0.0
    );
    assert_eq!(
        p.metric(&upstream_errors_series(
            "connection_terminated",
            DEFAULT_ROUTE
        ))
        .await,
        0.0
    );
}

// ---------------------------------------------------------------------------------------------
// HTTP/2 downstream
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn h2c_downstream_reaches_an_http1_upstream() {
    let up = EchoUpstream::with_headers(&[("x-served-by", "app-7")]).await;
    let p = TestProxy::start(&TestProxy::simple_config(up.addr, "")).await;
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let fut = async {
        let resp = client
            .request(
                Request::post(p.url("/h2?x=1"))
                    .body(Full::new(Bytes::from_static(b"over h2")))
                    .unwrap(),
            )
            .await
            .unwrap();
        let (parts, body) = resp.into_parts();
        (parts, body.collect().await.unwrap().to_bytes())
    };
    let (parts, body) = tokio::time::timeout(STEP, fut).await.unwrap();
    assert_eq!(parts.status, StatusCode::OK);
    assert_eq!(parts.version, Version::HTTP_2);
    assert_eq!(&body[..], b"over h2");
    assert_eq!(parts.headers["x-served-by"], "app-7, spillway-test");

    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].version, Version::HTTP_11);
    assert_eq!(seen[0].method, Method::POST);
    assert_eq!(seen[0].uri, "/h2?x=1");
    // HTTP/2 has no Host header; the :authority becomes one.
    assert_eq!(seen[0].header("host"), p.addr.to_string());
    assert_eq!(seen[0].header("x-forwarded-host"), p.addr.to_string());
    assert_eq!(seen[0].header("via"), "1.1 spillway-test");
    let s = requests_series(200, "POST", DEFAULT_ROUTE, "upstream");
    assert_eq!(p.metric_at_least(&s, 1.0).await, 1.0);
}
