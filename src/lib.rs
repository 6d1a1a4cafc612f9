//! spillway: a reverse-proxy sidecar that observes and sheds load.
//!
//! The folders follow a request's path: [`server`] accepts it (terminating [`tls`]), [`proxy`]
//! routes it and runs the route's [`policy`] stack before forwarding it; every failure is one
//! [`error::ProxyError`], presented in exactly one place; [`metrics`] counts it; [`admin`]
//! shows it. [`config`] turns the file into typed settings, [`reload`] applies a new one, and
//! [`run`] is the process's life from start to drained exit. docs/architecture.md has the map.
#![warn(missing_docs, unreachable_pub)]

// The public surface is what the binary, the integration tests and the benchmarks use; the rest
// is the crate's own.
mod admin;
pub mod alloc;
pub mod cli;
pub mod config;
pub mod demo;
mod error;
mod http1;
pub mod metrics;
pub mod policy;
mod pressure;
pub mod proxy;
pub mod reload;
mod run;
pub mod server;
pub mod shared;
mod spare_timer;
mod systemd;
mod tls;
mod token;
