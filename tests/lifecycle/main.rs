//! The lifecycle contract: hot reload (file watch for in-place writes, atomic renames and
//! Kubernetes' ConfigMap symlink swap; SIGHUP; `POST /reload`), what a refused reload leaves
//! serving, reloads under load, and graceful shutdown (in-process and with the real binary on
//! SIGTERM).
//!
//! - [`watch`]: the file watch picks up each kind of change within the contract, refuses a bad
//!   file, and goes quiet
//! - [`reload_api`]: `POST /reload` applies good configs and refuses bad ones whole; requests in
//!   flight finish under their snapshot
//! - [`binary`]: the real binary on SIGHUP, SIGTERM and a second signal
//! - [`shutdown`]: in-process drain of idle, busy and every listener's connections, and
//!   `stop_now`'s grace period
//! - [`soak`]: reloads under keep-alive load, and shutdowns under load
//!
//! Tests here are serialized (see [`SERIAL`]): several measure timings and run sustained load,
//! and the machine they run on may have only two cores.

#[path = "../common/mod.rs"]
mod common;

mod binary;
mod reload_api;
mod shutdown;
mod soak;
mod watch;

// What the modules share; each of them starts with `use super::*`.
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use spillway::config;
use spillway::demo::DemoApp;
use tokio::net::TcpStream;

/// One test at a time in this binary: timing bounds and load figures mean little when the
/// tests compete for two cores.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const SUCCESS: &str = r#"spillway_config_reloads_total{result="success"}"#;
const FAILURE: &str = r#"spillway_config_reloads_total{result="failure"}"#;
const LAST_OK: &str = "spillway_config_last_reload_successful";

/// The contract: a change of the config file is serving within this long.
const PICKUP: Duration = Duration::from_secs(2);
/// How long a test polls for a pickup before giving up (longer than [`PICKUP`], so a slow
/// pickup is reported with its actual delay).
const PICKUP_POLL_BOUND: Duration = Duration::from_secs(3);

// ---------------------------------------------------------------------------------------------
// Helpers shared by the modules
// ---------------------------------------------------------------------------------------------

/// A config with upstreams `app` (the demo app) and `nowhere` (refuses connections), the
/// `extra_routes` YAML (route items, indented by two spaces) before a catch-all route
/// `default` to `app` with the given timeout, then `shutdown` (top-level YAML, or empty).
/// Listener and admin on `listener`/`admin`.
fn config_at(
    listener: &str,
    admin: &str,
    app: SocketAddr,
    nowhere: SocketAddr,
    extra_routes: &str,
    timeout: &str,
    shutdown: &str,
) -> String {
    format!(
        "server_id: spillway-lifecycle\n\
         listeners:\n  - name: http\n    address: {listener}\n\
         admin:\n  address: {admin}\n\
         upstreams:\n  app:\n    endpoints: [\"{app}\"]\n    connect_timeout: 500ms\n\
         \x20 nowhere:\n    endpoints: [\"{nowhere}\"]\n    connect_timeout: 500ms\n\
         routes:\n{extra_routes}\
         \x20 - name: default\n    match: {{ path_prefix: / }}\n    upstream: app\n    timeout: {timeout}\n\
         {shutdown}"
    )
}

/// [`config_at`] on ephemeral loopback ports, without shutdown settings.
fn config(app: SocketAddr, nowhere: SocketAddr, extra_routes: &str, timeout: &str) -> String {
    config_at(
        "127.0.0.1:0",
        "127.0.0.1:0",
        app,
        nowhere,
        extra_routes,
        timeout,
        "",
    )
}

/// Route `x` (`/x`) to the refusing upstream: `GET /x` answers 502.
const X_REFUSED: &str = "  - name: x\n    match: { path_prefix: /x }\n    upstream: nowhere\n";
/// Route `x` (`/x`) in maintenance: `GET /x` answers 503.
const X_MAINTENANCE: &str =
    "  - name: x\n    match: { path_prefix: /x }\n    upstream: app\n    maintenance: { enabled: true }\n";

/// The version spillway reports for this config text.
fn version_of(text: &str) -> String {
    config::load_str(text)
        .unwrap_or_else(|e| panic!("test config invalid:\n{e}"))
        .version
}

/// The admin calls of the reload tests.
impl TestProxy {
    /// `(version, loaded_at)` from `GET /config`.
    async fn serving(&self) -> (String, String) {
        serving(self.admin).await
    }

    /// `POST /reload`: the status and the JSON answer.
    async fn post_reload(&self) -> (StatusCode, serde_json::Value) {
        let r = send(
            Request::post(format!("http://{}/reload", self.admin))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await;
        let json = serde_json::from_slice(&r.body)
            .unwrap_or_else(|e| panic!("reload answer not JSON ({e}): {}", r.text()));
        (r.status, json)
    }
}

/// `(version, loaded_at)` from `GET /config` on `admin`.
async fn serving(admin: SocketAddr) -> (String, String) {
    let r = get(&format!("http://{admin}/config")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let v: serde_json::Value = serde_json::from_slice(&r.body).expect("/config is JSON");
    (
        v["version"]
            .as_str()
            .expect("/config has a version")
            .to_string(),
        v["loaded_at"]
            .as_str()
            .expect("/config has loaded_at")
            .to_string(),
    )
}

/// Polls `/config` every 50 ms (bounded by [`PICKUP_POLL_BOUND`]) until `expected` serves;
/// returns how long that took, or `None`.
async fn wait_for_version(admin: SocketAddr, expected: &str, since: Instant) -> Option<Duration> {
    let deadline = since + PICKUP_POLL_BOUND;
    loop {
        if serving(admin).await.0 == expected {
            return Some(since.elapsed());
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `GET path` with `addr` as its `Host`.
fn get_request(addr: SocketAddr, path: &str) -> Request<Full<Bytes>> {
    Request::get(path)
        .header("host", addr.to_string())
        .body(Full::new(Bytes::new()))
        .unwrap()
}

/// A connect that failed because the listener is closed or closing: refused, or reset while
/// the handshake was queued on the listener being closed.
fn refused_at_connect(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::ConnectionReset
    )
}

/// Connects to `addr` every 20 ms until the listener refuses; returns how long after `since`
/// that was. Fails if it still accepts 3 s after `since`, or on any other connect error.
async fn wait_until_refused(addr: SocketAddr, since: Instant) -> Duration {
    loop {
        match TcpStream::connect(addr).await {
            Err(e) if refused_at_connect(&e) => return since.elapsed(),
            Err(e) => panic!(
                "unexpected connect error: {e} ({:?}, {:?})",
                e.kind(),
                e.raw_os_error()
            ),
            Ok(_) => {}
        }
        assert!(
            since.elapsed() < Duration::from_secs(3),
            "listener still accepting after 3 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
