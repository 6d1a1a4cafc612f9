//! The proxy core contract, end to end over loopback:
//!
//! - [`status`]: what the client sees for every upstream outcome (status, `Proxy-Status`,
//!   `x-served-by`, body), and a body that fails after its head
//! - [`headers`]: how requests and responses are rewritten
//! - [`connections`]: pooling, the keep-alive race, HTTP/1.0 and h2c clients
//! - [`bodies`]: bodies stream both ways
//! - [`routing`]: route matching
//! - [`metrics`]: metrics and the admin endpoint

#[path = "../common/mod.rs"]
mod common;

mod bodies;
mod connections;
mod headers;
mod metrics;
mod routing;
mod status;

// What the modules share; each of them starts with `use super::*`.
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Method, Request, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use spillway::demo::DemoApp;
use tokio::sync::mpsc;

/// A config with one upstream `app` (with extra upstream YAML) and one route `default` for `/`.
fn config(upstream: SocketAddr, upstream_extra: &str, route_extra: &str) -> String {
    format!(
        "server_id: {SERVER_ID}\n\
         listeners:\n  - name: http\n    address: 127.0.0.1:0\n\
         admin:\n  address: 127.0.0.1:0\n\
         upstreams:\n  app:\n    endpoints: [\"{upstream}\"]\n{upstream_extra}\
         routes:\n  - name: {DEFAULT_ROUTE}\n    match: {{ path_prefix: / }}\n    upstream: app\n{route_extra}"
    )
}

fn duration_count_series(code: u16, route: &str) -> String {
    format!(r#"spillway_request_duration_seconds_count{{code="{code}",route="{route}"}}"#)
}
