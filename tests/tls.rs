//! TLS on both sides: termination with ALPN, certificate rotation (on disk and on reload), and
//! upstream TLS with a private CA, server names, mTLS and the errors each failure becomes.
//! Every certificate is made at test time; everything listens on 127.0.0.1 port 0.

mod common;

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::Full;
use spillway::config;
use spillway::metrics::Metrics;
use spillway::server::Server;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const HANDSHAKE_ERRORS: &str = r#"spillway_tls_handshake_errors_total{listener="https"}"#;
const RELOAD_FAILURES: &str = r#"spillway_config_reloads_total{result="failure"}"#;

/// A config with one TLS listener `https` serving `cert`/`key`, routing everything to
/// `upstream`.
fn https_config(cert: &Path, key: &Path, upstream: std::net::SocketAddr) -> String {
    format!(
        "server_id: spillway-test\n\
         listeners:\n  - name: https\n    address: 127.0.0.1:0\n    tls:\n      cert_file: \"{}\"\n      key_file: \"{}\"\n\
         admin:\n  address: 127.0.0.1:0\n\
         upstreams:\n  app:\n    endpoints: [\"{upstream}\"]\n    connect_timeout: 500ms\n\
         routes:\n  - name: default\n    match: {{ path_prefix: / }}\n    upstream: app\n",
        cert.display(),
        key.display()
    )
}

/// A config with a plain listener and upstream `app` at `upstream` with this `tls:` block
/// (already indented by six spaces) and protocol.
fn upstream_tls_config(upstream: std::net::SocketAddr, protocol: &str, tls_block: &str) -> String {
    format!(
        "server_id: spillway-test\n\
         listeners:\n  - name: http\n    address: 127.0.0.1:0\n\
         admin:\n  address: 127.0.0.1:0\n\
         upstreams:\n  app:\n    endpoints: [\"{upstream}\"]\n    connect_timeout: 2s\n    protocol: {protocol}\n    tls:\n{tls_block}\
         routes:\n  - name: default\n    match: {{ path_prefix: / }}\n    upstream: app\n"
    )
}

/// The certificate a new TLS connection to `addr` is served.
async fn served_cert(pki: &TestPki, addr: std::net::SocketAddr) -> Vec<u8> {
    let tls = tls_connect(addr, pki.client_config(&["http/1.1"], None))
        .await
        .expect("handshake");
    peer_cert(&tls)
}

fn get_h1(path: &str) -> Request<Full<Bytes>> {
    Request::get(path)
        .header("host", "localhost")
        .body(Full::new(Bytes::new()))
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// Termination
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn https_listener_negotiates_h2_by_alpn_and_tells_the_upstream_https() {
    let pki = TestPki::new("ca");
    let leaf = pki.leaf("proxy", &[]);
    let (cert, key) = (
        pki.write("tls.crt", &leaf.cert_pem),
        pki.write("tls.key", &leaf.key_pem),
    );
    let up = EchoUpstream::start().await;
    let p = TestProxy::start(&https_config(&cert, &key, up.addr)).await;

    let tls = tls_connect(p.addr, pki.client_config(&["h2", "http/1.1"], None))
        .await
        .unwrap();
    assert_eq!(alpn_of(&tls), "h2");
    assert_eq!(peer_cert(&tls), leaf.der);
    let req = Request::post("https://localhost/echo")
        .body(Full::new(Bytes::from_static(b"over h2")))
        .unwrap();
    let (r, _) = send_over(tls, true, req).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(&r.body[..], b"over h2");
    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].header("x-forwarded-proto"), "https");
    assert_eq!(seen[0].header("host"), "localhost");
}

#[tokio::test]
async fn https_listener_serves_http11_by_alpn_or_without_alpn() {
    let pki = TestPki::new("ca");
    let leaf = pki.leaf("proxy", &[]);
    let (cert, key) = (
        pki.write("tls.crt", &leaf.cert_pem),
        pki.write("tls.key", &leaf.key_pem),
    );
    let up = EchoUpstream::start().await;
    let p = TestProxy::start(&https_config(&cert, &key, up.addr)).await;

    let tls = tls_connect(p.addr, pki.client_config(&["http/1.1"], None))
        .await
        .unwrap();
    assert_eq!(alpn_of(&tls), "http/1.1");
    let (r, _) = send_over(tls, false, get_h1("/one")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("x-served-by"), "spillway-test");

    let tls = tls_connect(p.addr, pki.client_config(&[], None))
        .await
        .unwrap();
    assert_eq!(alpn_of(&tls), "", "no ALPN offered, none chosen");
    let (r, _) = send_over(tls, false, get_h1("/two")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(up
        .seen()
        .iter()
        .all(|s| s.header("x-forwarded-proto") == "https"));
}

#[tokio::test]
async fn failed_handshakes_are_counted_and_the_listener_keeps_serving() {
    let pki = TestPki::new("ca");
    let leaf = pki.leaf("proxy", &[]);
    let (cert, key) = (
        pki.write("tls.crt", &leaf.cert_pem),
        pki.write("tls.key", &leaf.key_pem),
    );
    let up = EchoUpstream::start().await;
    let p = TestProxy::start(&https_config(&cert, &key, up.addr)).await;

    // A TCP probe that connects and closes is not a handshake.
    drop(TcpStream::connect(p.addr).await.unwrap());
    // Plain HTTP on the TLS port is.
    let answer = raw_exchange(p.addr, b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert!(
        !answer.starts_with(b"HTTP/"),
        "no HTTP answer on a TLS port"
    );
    // So is a client that does not trust the certificate (it aborts with an alert).
    let stranger = TestPki::new("other ca");
    assert!(tls_connect(p.addr, stranger.client_config(&["h2"], None))
        .await
        .is_err());

    assert_eq!(p.metric_at_least(HANDSHAKE_ERRORS, 2.0).await, 2.0);
    let tls = tls_connect(p.addr, pki.client_config(&["h2"], None))
        .await
        .unwrap();
    let (r, _) = send_over(
        tls,
        true,
        Request::get("https://localhost/")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(p.metric(HANDSHAKE_ERRORS).await, 2.0);
}

#[tokio::test]
async fn broken_certificate_files_stop_the_start_with_the_reason() {
    let pki = TestPki::new("ca");
    let a = pki.leaf("a", &[]);
    let b = pki.leaf("b", &[]);
    let cert = pki.write("tls.crt", &a.cert_pem);
    let other_key = pki.write("other.key", &b.key_pem);
    let loaded = config::load_str(&https_config(
        &cert,
        &other_key,
        "127.0.0.1:1".parse().unwrap(),
    ))
    .unwrap();
    let err = Server::start(&loaded, Metrics::new())
        .await
        .err()
        .expect("a key that does not match is refused");
    let msg = err.to_string();
    assert!(
        msg.contains("listeners[0].tls") && msg.contains("other.key"),
        "{msg}"
    );

    let missing = pki.dir.join("missing.crt");
    let loaded = config::load_str(&https_config(
        &missing,
        &other_key,
        "127.0.0.1:1".parse().unwrap(),
    ))
    .unwrap();
    let msg = Server::start(&loaded, Metrics::new())
        .await
        .err()
        .expect("missing file")
        .to_string();
    assert!(msg.contains("missing.crt"), "{msg}");
}

// ---------------------------------------------------------------------------------------------
// Rotation
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_rotated_certificate_is_served_to_new_connections_without_a_restart() {
    let pki = TestPki::new("ca");
    let old = pki.leaf("old", &[]);
    let (cert, key) = (
        pki.write("tls.crt", &old.cert_pem),
        pki.write("tls.key", &old.key_pem),
    );
    let up = EchoUpstream::start().await;
    let p = TestProxy::start(&https_config(&cert, &key, up.addr)).await;
    assert_eq!(served_cert(&pki, p.addr).await, old.der);

    // A connection opened before the rotation keeps working on the old certificate.
    let before = tls_connect(p.addr, pki.client_config(&["http/1.1"], None))
        .await
        .unwrap();

    let new = pki.leaf("new", &[]);
    write_by_rename(&key, &new.key_pem);
    write_by_rename(&cert, &new.cert_pem);
    let (pki_ref, want) = (&pki, &new.der);
    assert!(
        eventually(|| async move { served_cert(pki_ref, p.addr).await == *want }).await,
        "new certificate served"
    );

    let (r, _) = send_over(before, false, get_h1("/still")).await;
    assert_eq!(r.status, StatusCode::OK);
    // Half-replaced files (new key, old certificate) were not reported as a failure.
    assert_eq!(p.metric(RELOAD_FAILURES).await, 0.0);
}

#[tokio::test]
async fn a_bad_new_certificate_keeps_the_old_one_and_counts_a_failed_reload() {
    let pki = TestPki::new("ca");
    let old = pki.leaf("old", &[]);
    let (cert, key) = (
        pki.write("tls.crt", &old.cert_pem),
        pki.write("tls.key", &old.key_pem),
    );
    let up = EchoUpstream::start().await;
    let p = TestProxy::start(&https_config(&cert, &key, up.addr)).await;
    assert_eq!(served_cert(&pki, p.addr).await, old.der);

    write_by_rename(
        &cert,
        "-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n",
    );
    // The failure is reported once the files have been still for a moment (a writer may be
    // between the certificate and the key); new connections meanwhile get the old one.
    let (pki_ref, proxy, want) = (&pki, &p, &old.der);
    let reported = eventually(|| async move {
        assert_eq!(
            served_cert(pki_ref, proxy.addr).await,
            *want,
            "the old certificate keeps serving"
        );
        proxy.metric(RELOAD_FAILURES).await >= 1.0
    })
    .await;
    assert!(reported, "the bad certificate was reported");
    assert_eq!(
        p.metric(RELOAD_FAILURES).await,
        1.0,
        "reported once, not once per check"
    );
    assert_eq!(
        p.metric("spillway_config_last_reload_successful").await,
        0.0
    );
    assert_eq!(served_cert(&pki, p.addr).await, old.der);

    // Fixed files are picked up again.
    let fixed = pki.leaf("fixed", &[]);
    write_by_rename(&key, &fixed.key_pem);
    write_by_rename(&cert, &fixed.cert_pem);
    let want = &fixed.der;
    assert!(eventually(|| async move { served_cert(pki_ref, proxy.addr).await == *want }).await);
}

#[tokio::test]
async fn a_config_reload_rereads_certificates_and_refuses_broken_ones() {
    let pki = TestPki::new("ca");
    let first = pki.leaf("first", &[]);
    let (cert, key) = (
        pki.write("a.crt", &first.cert_pem),
        pki.write("a.key", &first.key_pem),
    );
    let up = EchoUpstream::start().await;
    let config_path = pki.write("spillway.yaml", &https_config(&cert, &key, up.addr));
    let TestProxy { server, .. } = TestProxy::start_file(&config_path).await;
    let addr = server.listen_addrs[0];
    assert_eq!(served_cert(&pki, addr).await, first.der);

    // New paths in the config: served as soon as the reload returns.
    let second = pki.leaf("second", &[]);
    let (cert2, key2) = (
        pki.write("b.crt", &second.cert_pem),
        pki.write("b.key", &second.key_pem),
    );
    std::fs::write(&config_path, https_config(&cert2, &key2, up.addr)).unwrap();
    let r = server.reloader.reload().expect("reload applies");
    assert!(r.changed);
    assert_eq!(served_cert(&pki, addr).await, second.der);

    // A config naming a key that does not match: refused whole, the previous one serves on.
    std::fs::write(&config_path, https_config(&cert2, &key, up.addr)).unwrap();
    let errors = server
        .reloader
        .reload()
        .expect_err("mismatched key refused");
    assert!(errors.to_string().contains("listeners[0].tls"), "{errors}");
    assert_eq!(served_cert(&pki, addr).await, second.der);
    assert_eq!(
        metric_value(&server.state.metrics.render(), RELOAD_FAILURES),
        1.0
    );

    // Same config text, files replaced in place, reload (as SIGHUP would): re-read at once.
    std::fs::write(&config_path, https_config(&cert2, &key2, up.addr)).unwrap();
    server.reloader.reload().unwrap();
    let third = pki.leaf("third", &[]);
    write_by_rename(&key2, &third.key_pem);
    write_by_rename(&cert2, &third.cert_pem);
    let r = server.reloader.reload().unwrap();
    assert!(!r.changed, "the config text did not change");
    assert_eq!(served_cert(&pki, addr).await, third.der);
    server.stop_now(Duration::from_secs(1)).await;
}

// ---------------------------------------------------------------------------------------------
// Upstream TLS
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn upstream_tls_with_a_private_ca_verifies_and_forwards() {
    let pki = TestPki::new("internal ca");
    let up = TlsUpstream::start(&pki.leaf("app", &[]), None).await;
    let ca = pki.ca_file();
    // No server_name: the endpoint's host (127.0.0.1, an IP SAN) is verified.
    let block = format!("      ca_file: \"{}\"\n", ca.display());
    let p = TestProxy::start(&upstream_tls_config(up.addr, "http1", &block)).await;
    let r = get(&p.url("/")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.text(), "tls ok");
    assert_eq!(r.header("x-client-cert"), "no");
    assert_eq!(r.header("x-upstream-version"), "HTTP/1.1");

    // With server_name: SNI and the name verified.
    let block = format!(
        "      server_name: localhost\n      ca_file: \"{}\"\n",
        ca.display()
    );
    let p = TestProxy::start(&upstream_tls_config(up.addr, "http1", &block)).await;
    assert_eq!(get(&p.url("/")).await.status, StatusCode::OK);
}

#[tokio::test]
async fn upstream_tls_speaks_h2_by_alpn_for_http2_upstreams() {
    let pki = TestPki::new("internal ca");
    let up = TlsUpstream::start(&pki.leaf("app", &[]), None).await;
    let block = format!(
        "      server_name: localhost\n      ca_file: \"{}\"\n",
        pki.ca_file().display()
    );
    let p = TestProxy::start(&upstream_tls_config(up.addr, "http2", &block)).await;
    let r = get(&p.url("/")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.header("x-upstream-version"), "HTTP/2.0");
}

#[tokio::test]
async fn a_wrong_server_name_is_a_certificate_error() {
    let pki = TestPki::new("internal ca");
    let up = TlsUpstream::start(&pki.leaf("app", &[]), None).await;
    let block = format!(
        "      server_name: wrong.example\n      ca_file: \"{}\"\n",
        pki.ca_file().display()
    );
    let p = TestProxy::start(&upstream_tls_config(up.addr, "http1", &block)).await;
    let r = get(&p.url("/")).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert_eq!(
        r.header("proxy-status"),
        "spillway-test; error=tls_certificate_error"
    );
    assert_eq!(
        p.metric(r#"spillway_upstream_errors_total{kind="tls_certificate_error",route="default"}"#)
            .await,
        1.0
    );
}

#[tokio::test]
async fn an_unknown_issuer_is_a_certificate_error_with_a_ca_file_or_the_system_roots() {
    let pki = TestPki::new("internal ca");
    let elsewhere = TestPki::new("some other ca");
    let up = TlsUpstream::start(&elsewhere.leaf("app", &[]), None).await;
    let block = format!(
        "      server_name: localhost\n      ca_file: \"{}\"\n",
        pki.ca_file().display()
    );
    let p = TestProxy::start(&upstream_tls_config(up.addr, "http1", &block)).await;
    let r = get(&p.url("/")).await;
    assert_eq!(
        r.header("proxy-status"),
        "spillway-test; error=tls_certificate_error"
    );

    // Without ca_file the system roots are used, and they do not know a test CA either.
    if rustls_native_certs::load_native_certs().certs.is_empty() {
        eprintln!("no system CA certificates on this machine: system-roots case skipped");
        return;
    }
    let p = TestProxy::start(&upstream_tls_config(
        up.addr,
        "http1",
        "      server_name: localhost\n",
    ))
    .await;
    let r = get(&p.url("/")).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert_eq!(
        r.header("proxy-status"),
        "spillway-test; error=tls_certificate_error"
    );
}

#[tokio::test]
async fn a_plain_http_server_behind_a_tls_upstream_is_a_protocol_error() {
    let pki = TestPki::new("internal ca");
    let plain = EchoUpstream::start().await;
    let block = format!(
        "      server_name: localhost\n      ca_file: \"{}\"\n",
        pki.ca_file().display()
    );
    let p = TestProxy::start(&upstream_tls_config(plain.addr, "http1", &block)).await;
    let r = get(&p.url("/")).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert_eq!(
        r.header("proxy-status"),
        "spillway-test; error=tls_protocol_error"
    );
    assert!(
        !r.text().contains("127.0.0.1"),
        "no address leaks: {}",
        r.text()
    );
}

#[tokio::test]
async fn mtls_upstream_accepts_our_client_certificate_and_refuses_us_without_one() {
    let pki = TestPki::new("internal ca");
    let up = TlsUpstream::start(&pki.leaf("app", &[]), Some(&pki)).await;
    let client = pki.leaf("spillway", &[]);
    let (cert, key) = (
        pki.write("client.crt", &client.cert_pem),
        pki.write("client.key", &client.key_pem),
    );
    let ca = pki.ca_file();
    let block = format!(
        "      server_name: localhost\n      ca_file: \"{}\"\n      cert_file: \"{}\"\n      key_file: \"{}\"\n",
        ca.display(),
        cert.display(),
        key.display()
    );
    let p = TestProxy::start(&upstream_tls_config(up.addr, "http1", &block)).await;
    let r = get(&p.url("/")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.header("x-client-cert"), "yes");

    let block = format!(
        "      server_name: localhost\n      ca_file: \"{}\"\n",
        ca.display()
    );
    let p = TestProxy::start(&upstream_tls_config(up.addr, "http1", &block)).await;
    let r = get(&p.url("/")).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert_eq!(
        r.header("proxy-status"),
        "spillway-test; error=tls_certificate_error"
    );
}

#[tokio::test]
async fn unreadable_upstream_tls_files_stop_the_start() {
    let pki = TestPki::new("ca");
    let block = format!(
        "      ca_file: \"{}\"\n",
        pki.dir.join("nope.pem").display()
    );
    let loaded = config::load_str(&upstream_tls_config(
        "127.0.0.1:1".parse().unwrap(),
        "http1",
        &block,
    ))
    .unwrap();
    let msg = Server::start(&loaded, Metrics::new())
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(
        msg.contains("upstreams.app.tls.ca_file") && msg.contains("nope.pem"),
        "{msg}"
    );
}

#[tokio::test]
async fn a_truncated_client_hello_is_a_failed_handshake() {
    let pki = TestPki::new("ca");
    let leaf = pki.leaf("proxy", &[]);
    let (cert, key) = (
        pki.write("tls.crt", &leaf.cert_pem),
        pki.write("tls.key", &leaf.key_pem),
    );
    let up = EchoUpstream::start().await;
    let p = TestProxy::start(&https_config(&cert, &key, up.addr)).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(&[0x16, 0x03, 0x01, 0x00, 0xff, 0x01])
        .await
        .unwrap();
    drop(s);
    assert_eq!(p.metric_at_least(HANDSHAKE_ERRORS, 1.0).await, 1.0);
}
