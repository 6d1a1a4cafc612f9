//! An admin plane that is not open to the cluster: the metrics listener serves only
//! `/metrics`, `/healthz` and `/readyz`; the full admin's control paths need the bearer token
//! when one is configured, and the token is re-read on reload. All on the wire.

use super::*;

/// A config with the full admin and the metrics listener on ephemeral ports, plus `admin_extra`
/// in the admin block.
fn config(app: SocketAddr, admin_extra: &str) -> String {
    TestProxy::simple_config(app, "").replace(
        "admin:\n  address: 127.0.0.1:0\n",
        &format!("admin:\n  address: 127.0.0.1:0\n  metrics_address: 127.0.0.1:0\n{admin_extra}"),
    )
}

/// The status line of a raw `method path` exchange with optional extra header lines.
async fn raw(addr: SocketAddr, method: &str, path: &str, headers: &str) -> String {
    let request = format!(
        "{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\n{headers}content-length: 0\r\nconnection: close\r\n\r\n"
    );
    String::from_utf8_lossy(&raw_exchange(addr, request.as_bytes()).await).into_owned()
}

fn status_line(response: &str) -> &str {
    response.split("\r\n").next().unwrap_or("")
}

/// The body of a raw response (after the head).
fn body(response: &str) -> &str {
    response.split_once("\r\n\r\n").map_or("", |(_, b)| b)
}

#[tokio::test]
async fn the_metrics_listener_serves_metrics_and_probes_only() {
    let app = DemoApp::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let p = TestProxy::start(&config(app.local_addr(), "")).await;
    let metrics = p.server.metrics_addr.expect("metrics listener bound");
    assert_ne!(metrics, p.admin);
    for path in ["/metrics", "/healthz", "/readyz"] {
        let r = raw(metrics, "GET", path, "").await;
        assert_eq!(status_line(&r), "HTTP/1.1 200 OK", "{path}: {r}");
    }
    assert!(body(&raw(metrics, "GET", "/metrics", "").await).contains("spillway_build_info"));
    for (method, path) in [
        ("GET", "/"),
        ("GET", "/status.json"),
        ("GET", "/config"),
        ("POST", "/reload"),
    ] {
        let r = raw(metrics, method, path, "").await;
        assert_eq!(
            status_line(&r),
            "HTTP/1.1 404 Not Found",
            "{method} {path}: {r}"
        );
    }
    // The full admin still has everything.
    for path in [
        "/",
        "/status.json",
        "/config",
        "/metrics",
        "/healthz",
        "/readyz",
    ] {
        let r = raw(p.admin, "GET", path, "").await;
        assert_eq!(status_line(&r), "HTTP/1.1 200 OK", "{path}: {r}");
    }
    // Draining: readiness fails on both.
    p.server
        .state
        .ready
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let r = raw(metrics, "GET", "/readyz", "").await;
    assert_eq!(status_line(&r), "HTTP/1.1 503 Service Unavailable", "{r}");
}

#[tokio::test]
async fn the_full_admin_needs_the_token_and_rereads_it_on_reload() {
    let app = DemoApp::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let dir = TempDir::new("admin-token");
    let token = dir.write("token", "first-Token-123\n");
    let yaml = config(
        app.local_addr(),
        &format!("  token_file: {}\n", token.display()),
    );
    let path = dir.write("spillway.yaml", &yaml);
    let p = TestProxy::start_file(&path).await;
    let admin = p.admin;

    // No token, a wrong one, the wrong scheme: 401 and nothing else, whatever the path.
    for (method, path) in [
        ("GET", "/"),
        ("GET", "/status.json"),
        ("GET", "/config"),
        ("POST", "/reload"),
    ] {
        for auth in [
            "",
            "authorization: Bearer first-Token-12\r\n",
            "authorization: first-Token-123\r\n",
        ] {
            let r = raw(admin, method, path, auth).await;
            assert_eq!(
                status_line(&r),
                "HTTP/1.1 401 Unauthorized",
                "{method} {path} {auth:?}: {r}"
            );
            let lower = r.to_ascii_lowercase();
            assert!(lower.contains("\r\ncontent-length: 0\r\n"), "no body: {r}");
            assert_eq!(body(&r), "", "{r}");
            assert!(
                lower.contains("\r\nwww-authenticate: basic realm=\"spillway admin\""),
                "{r}"
            );
            assert!(
                lower.contains("\r\nwww-authenticate: bearer realm=\"spillway admin\""),
                "{r}"
            );
        }
    }
    // Metrics and probes need none, on either listener.
    for path in ["/metrics", "/healthz", "/readyz"] {
        assert_eq!(
            status_line(&raw(admin, "GET", path, "").await),
            "HTTP/1.1 200 OK"
        );
    }
    // The token as a bearer token, or as a browser sends it (Basic, token as the password).
    let bearer = "authorization: Bearer first-Token-123\r\n";
    let r = raw(admin, "GET", "/config", bearer).await;
    assert_eq!(status_line(&r), "HTTP/1.1 200 OK", "{r}");
    assert!(body(&r).contains("\"version\""), "{r}");
    // `ops:first-Token-123`.
    let basic = "authorization: Basic b3BzOmZpcnN0LVRva2VuLTEyMw==\r\n";
    assert_eq!(
        status_line(&raw(admin, "GET", "/", basic).await),
        "HTTP/1.1 200 OK"
    );
    // The foreign-Host check still comes first.
    let r = raw(
        admin,
        "GET",
        "/config",
        "origin: http://evil.example\r\nauthorization: Bearer first-Token-123\r\n",
    )
    .await;
    assert_eq!(status_line(&r), "HTTP/1.1 403 Forbidden", "{r}");

    // A new token, applied by a reload: the old one stops working at once.
    std::fs::write(&token, "second-Token-456").unwrap();
    let r = raw(admin, "POST", "/reload", bearer).await;
    assert_eq!(status_line(&r), "HTTP/1.1 200 OK", "{r}");
    assert_eq!(
        status_line(&raw(admin, "GET", "/config", bearer).await),
        "HTTP/1.1 401 Unauthorized"
    );
    let second = "authorization: Bearer second-Token-456\r\n";
    assert_eq!(
        status_line(&raw(admin, "GET", "/config", second).await),
        "HTTP/1.1 200 OK"
    );

    // A token file that cannot be read refuses the reload; the token in force stays.
    std::fs::remove_file(&token).unwrap();
    let r = raw(admin, "POST", "/reload", second).await;
    assert_eq!(status_line(&r), "HTTP/1.1 422 Unprocessable Entity", "{r}");
    assert!(body(&r).contains("admin.token_file"), "{r}");
    assert_eq!(
        status_line(&raw(admin, "GET", "/config", second).await),
        "HTTP/1.1 200 OK"
    );
}
