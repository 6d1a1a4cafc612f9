//! Operating spillway like infrastructure, end to end over loopback:
//!
//! - [`latency`]: the duration buckets (each route's timeout a boundary, a timed-out request
//!   on it) and the upstream histogram, on exact counts
//! - [`admin_plane`]: the metrics listener serves only metrics and probes; the full admin's
//!   bearer token, on the wire
//! - [`reload_errors`]: a refused reload's errors stay readable on `/config` and
//!   `/status.json`, and the config info metrics follow what serves
//! - [`startup`]: a config error at start is logged as JSON with `--log-format json`
//! - [`systemd`]: the real binary tells a notify socket READY, RELOADING and STOPPING, and
//!   serves listening sockets passed the way systemd passes them (LISTEN_FDS), which keeps new
//!   connections waiting across a restart
//!
//! Every test uses ephemeral loopback ports; loops are bounded by [`STEP`].

#[path = "../common/mod.rs"]
mod common;

mod admin_plane;
mod latency;
mod reload_errors;
mod startup;
mod systemd;

// What the modules share; each of them starts with `use super::*`.
use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use http::{Method, StatusCode};
use spillway::demo::DemoApp;

/// One bucket of `spillway_request_duration_seconds` (`le` as the exposition prints it).
fn duration_bucket(route: &str, code: u16, le: &str) -> String {
    format!(
        r#"spillway_request_duration_seconds_bucket{{code="{code}",route="{route}",le="{le}"}}"#
    )
}

/// One bucket of `spillway_upstream_duration_seconds`.
fn upstream_bucket(route: &str, le: &str) -> String {
    format!(r#"spillway_upstream_duration_seconds_bucket{{route="{route}",le="{le}"}}"#)
}

/// The observation count of `spillway_upstream_duration_seconds` for a route.
fn upstream_count(route: &str) -> String {
    format!(r#"spillway_upstream_duration_seconds_count{{route="{route}"}}"#)
}

/// The observation count of `spillway_request_duration_seconds` for a route and code.
fn duration_count(route: &str, code: u16) -> String {
    format!(r#"spillway_request_duration_seconds_count{{code="{code}",route="{route}"}}"#)
}
