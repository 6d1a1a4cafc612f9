//! The load-shedding contract, end to end over loopback: what the client sees when spillway
//! refuses a request on purpose, what is counted, that a refused request never reaches the
//! upstream, how retries behave, and that policy state survives a reload that does not touch
//! it:
//!
//! - [`concurrency`]: the concurrency limit, its queue, and the adaptive limit
//! - [`breaker`]: the circuit breaker
//! - [`maintenance`]: maintenance mode
//! - [`priorities`]: classes of requests, the least important shed first; the spread
//!   `Retry-After`
//! - [`retries`]: retries, their budget and its floor, and the route timeout over all attempts
//! - [`reload`]: breaker and limiter state across reloads
//!
//! The upstream is a [`GatedUpstream`]: it records every request on arrival and can hold
//! requests at a gate the test opens, so "N in flight" is exact without sleeping. The only real
//! waits are the ones the contract is about (queue timeout, the breaker's `open_for`, the route
//! timeout), each short and bounded.

#[path = "../common/mod.rs"]
mod common;

mod breaker;
mod concurrency;
mod maintenance;
mod priorities;
mod reload;
mod retries;

// What the modules share; each of them starts with `use super::*`.
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use http::{Method, StatusCode};
use spillway::policy::LimiterState;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// The route of [`TestProxy::simple_config`].
const ROUTE: &str = DEFAULT_ROUTE;

/// Route `retry_after` used by most tests, and the header it must produce.
const RETRY_AFTER_YAML: &str = "    retry_after: 7s\n";
const RETRY_AFTER_SECS: &str = "7";

/// The shed counter of `reason` on `route` for requests of the default class, `normal`.
fn shed_series(reason: &str, route: &str) -> String {
    shed_series_of("normal", reason, route)
}

fn shed_series_of(priority: &str, reason: &str, route: &str) -> String {
    format!(r#"spillway_shed_total{{priority="{priority}",reason="{reason}",route="{route}"}}"#)
}

fn limit_series(route: &str) -> String {
    format!(r#"spillway_concurrency_limit{{route="{route}"}}"#)
}

fn breaker_series(route: &str) -> String {
    format!(r#"spillway_circuit_breaker_state{{route="{route}"}}"#)
}

fn retries_series(route: &str) -> String {
    format!(r#"spillway_retries_total{{route="{route}"}}"#)
}

/// Sends `GET url` in its own task (its own connection).
fn spawn_get(url: String) -> JoinHandle<Resp> {
    tokio::spawn(async move { get(&url).await })
}

/// Awaits a spawned request (it is bounded by [`STEP`] inside `send`).
async fn join(h: JoinHandle<Resp>) -> Resp {
    h.await.expect("request task")
}

/// Every shed response: 503, the exact `Retry-After` and `Proxy-Status`, the generated body
/// and stamps.
fn assert_shed(r: &Resp, retry_after: &str, error_type: &str, body: &str) {
    assert_eq!(r.header("retry-after"), retry_after, "{r:?}");
    assert_shed_spread(r, error_type, body);
}

/// [`assert_shed`] without the exact `Retry-After`.
fn assert_shed_spread(r: &Resp, error_type: &str, body: &str) {
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{r:?}");
    assert_eq!(
        r.header("proxy-status"),
        format!("{SERVER_ID}; error={error_type}"),
        "{r:?}"
    );
    assert_eq!(r.header("x-served-by"), SERVER_ID, "{r:?}");
    assert_eq!(
        r.header("content-type"),
        "text/plain; charset=utf-8",
        "{r:?}"
    );
    assert!(!r.header("x-request-id").is_empty(), "{r:?}");
    assert_eq!(r.text(), body, "{r:?}");
}

/// A refusal by the concurrency limit or its queue, on a route whose `retry_after` is
/// `retry_after` seconds: its `Retry-After` is spread over `[⌈retry_after/2⌉, retry_after]`.
fn assert_overloaded(r: &Resp, retry_after: &str) {
    assert_shed_spread(r, "connection_limit_reached", "overloaded, retry later\n");
    let most: u64 = retry_after.parse().expect("whole seconds");
    let got: u64 = r.header("retry-after").parse().expect("delay-seconds");
    assert!(
        (most.div_ceil(2)..=most).contains(&got),
        "Retry-After {got} outside [{}, {most}]: {r:?}",
        most.div_ceil(2)
    );
}

fn assert_circuit_open(r: &Resp, retry_after: &str) {
    assert_shed(
        r,
        retry_after,
        "destination_unavailable",
        "upstream is failing, retry later\n",
    );
}

/// A response the upstream produced, passed through: its status and body, no `Proxy-Status`.
fn assert_from_upstream(r: &Resp, status: u16) {
    assert_eq!(r.status.as_u16(), status, "{r:?}");
    assert_eq!(r.text(), format!("upstream {status}\n"), "{r:?}");
    assert!(r.headers.get("proxy-status").is_none(), "{r:?}");
    assert!(r.headers.get("retry-after").is_none(), "{r:?}");
}
