//! Test support, shared by the integration-test binaries:
//!
//! - here: an in-process spillway on ephemeral loopback ports ([`TestProxy`]), reading and
//!   polling its metrics and the names of the series tests assert on, [`eventually`], and
//!   scratch files ([`TempDir`], [`write_by_rename`])
//! - [`client`]: a small HTTP client, raw exchanges, and request bodies the test feeds
//! - [`upstreams`]: upstreams that misbehave on purpose (mostly raw TCP, so every byte is under
//!   the test's control) and an echo upstream that records what it received
//! - [`gated`]: a steerable upstream for the shedding tests
//! - [`pki`]: certificates, TLS clients and an HTTPS upstream, made at test time
//!
//! A binary takes it in with `mod common;` (from `tests/<name>/main.rs`: `#[path =
//! "../common/mod.rs"] mod common;`) and `use common::*`. Each uses only part of it, hence
//! `dead_code` is allowed here.
#![allow(dead_code)]

mod client;
mod gated;
mod pki;
mod upstreams;

// Callers keep writing `common::X`. Each binary uses only some of these modules, so a glob can
// be unused in one of them.
#[allow(unused_imports)]
pub use client::*;
#[allow(unused_imports)]
pub use gated::*;
#[allow(unused_imports)]
pub use pki::*;
#[allow(unused_imports)]
pub use upstreams::*;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::StatusCode;
use spillway::config;
use spillway::metrics::Metrics;
use spillway::server::Server;

/// Upper bound for any single step of a test, so nothing can hang CI.
pub const STEP: Duration = Duration::from_secs(10);

/// The `server_id` of [`TestProxy::simple_config`]: what spillway stamps into `x-served-by`,
/// `Via` and `Proxy-Status`.
pub const SERVER_ID: &str = "spillway-test";

/// The name of the one route of [`TestProxy::simple_config`].
pub const DEFAULT_ROUTE: &str = "default";

/// A spillway started in this process from a YAML string.
pub struct TestProxy {
    /// First proxy listener.
    pub addr: SocketAddr,
    /// Admin listener.
    pub admin: SocketAddr,
    /// The running server.
    pub server: Server,
}

impl TestProxy {
    /// Starts spillway from `yaml`; listeners and admin should use port 0.
    pub async fn start(yaml: &str) -> TestProxy {
        let loaded = config::load_str(yaml).unwrap_or_else(|e| panic!("test config invalid:\n{e}"));
        let server = Server::start(&loaded, Metrics::new())
            .await
            .expect("server starts");
        TestProxy::of(server)
    }

    /// Starts spillway from the config file at `path`, so that it can be reloaded (with
    /// `server.reloader.reload()`, `POST /reload` or `server.watch_file()`).
    pub async fn start_file(path: &Path) -> TestProxy {
        let loaded =
            config::load_file(path).unwrap_or_else(|e| panic!("test config invalid:\n{e}"));
        let server = Server::start_with_file(path, &loaded, Metrics::new())
            .await
            .expect("server starts");
        TestProxy::of(server)
    }

    fn of(server: Server) -> TestProxy {
        TestProxy {
            addr: server.listen_addrs[0],
            admin: server.admin_addr.expect("admin configured"),
            server,
        }
    }

    /// A minimal config: one route `default` for `/` to upstream `app` at `upstream`, plus
    /// extra YAML appended to the route.
    pub fn simple_config(upstream: SocketAddr, route_extra: &str) -> String {
        format!(
            "server_id: {SERVER_ID}\n\
             listeners:\n  - name: http\n    address: 127.0.0.1:0\n\
             admin:\n  address: 127.0.0.1:0\n\
             upstreams:\n  app:\n    endpoints: [\"{upstream}\"]\n    connect_timeout: 500ms\n\
             routes:\n  - name: {DEFAULT_ROUTE}\n    match: {{ path_prefix: / }}\n    upstream: app\n{route_extra}"
        )
    }

    /// `http://<proxy>/<path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// The admin `/metrics` text.
    pub async fn metrics(&self) -> String {
        admin_metrics(self.admin).await
    }

    /// The value of one series, e.g. `spillway_requests_total{code="502",method="GET",route="default",source="proxy"}`
    /// (labels in alphabetical order, as the exposition format prints them); 0 when absent.
    pub async fn metric(&self, series: &str) -> f64 {
        admin_metric(self.admin, series).await
    }

    /// Waits (bounded by [`STEP`]) until `series` reaches at least `expected`, then returns its
    /// value, which the caller asserts exactly: a response is counted when its body ends, which
    /// can be just after the client has read it.
    pub async fn metric_at_least(&self, series: &str, expected: f64) -> f64 {
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            let v = self.metric(series).await;
            if v >= expected || tokio::time::Instant::now() >= deadline {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits (bounded by [`STEP`]) until `series` equals `expected`, then returns its value.
    pub async fn metric_settles_at(&self, series: &str, expected: f64) -> f64 {
        metric_settles(self.admin, series, expected).await
    }
}

/// The `/metrics` text of the admin listener at `admin` (of a [`TestProxy`] or of a spillway
/// process).
pub async fn admin_metrics(admin: SocketAddr) -> String {
    let r = get(&format!("http://{admin}/metrics")).await;
    assert_eq!(r.status, StatusCode::OK);
    r.text()
}

/// The value of one series on the admin listener at `admin`; 0 when absent.
pub async fn admin_metric(admin: SocketAddr, series: &str) -> f64 {
    metric_value(&admin_metrics(admin).await, series)
}

/// Waits (bounded by [`STEP`]) until `series` equals `expected` on the admin listener at
/// `admin`, then returns its value.
pub async fn metric_settles(admin: SocketAddr, series: &str, expected: f64) -> f64 {
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let v = admin_metric(admin, series).await;
        if v == expected || tokio::time::Instant::now() >= deadline {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Reads one series from exposition text; 0 when absent.
pub fn metric_value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .map(|v| v.trim().parse().expect("numeric sample"))
        .unwrap_or(0.0)
}

/// The sum of every series of the metric `name` in exposition text.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    let prefix = format!("{name}{{");
    text.lines()
        .filter(|l| l.starts_with(&prefix))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum()
}

/// `spillway_requests_total` for one status code, method, route and source (`upstream` for
/// answers passed through, `proxy` for the ones spillway generated).
pub fn requests_series(code: u16, method: &str, route: &str, source: &str) -> String {
    format!(
        r#"spillway_requests_total{{code="{code}",method="{method}",route="{route}",source="{source}"}}"#
    )
}

/// `spillway_upstream_errors_total` for one error kind and route.
pub fn upstream_errors_series(kind: &str, route: &str) -> String {
    format!(r#"spillway_upstream_errors_total{{kind="{kind}",route="{route}"}}"#)
}

/// `spillway_in_flight_requests` for one route.
pub fn in_flight_series(route: &str) -> String {
    format!(r#"spillway_in_flight_requests{{route="{route}"}}"#)
}

/// Waits (bounded by [`STEP`]) until `check` holds, polling every 20 ms; returns whether it did.
pub async fn eventually<F, Fut>(mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A directory under the temp dir, unique to this process and call; removed (recursively) on
/// drop.
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates it; `tag` goes into its name.
    pub fn new(tag: &str) -> TempDir {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let path = std::env::temp_dir().join(format!(
            "spillway-test-{}-{tag}-{n}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// The path of `name` in the directory.
    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// Writes `contents` to `name` in the directory; returns its path.
    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Replaces the file at `path` with `text` the way editors, config management and deploy tools
/// do: writes a sibling `<name>.tmp`, then renames it over `path`.
pub fn write_by_rename(path: &Path, text: &str) {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}
