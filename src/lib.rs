//! spillway: a reverse-proxy sidecar that observes and sheds load.
//!
//! The folders follow a request's path: [`server`] accepts it, [`proxy`] routes it and runs the
//! route's [`policy`] stack before forwarding it; every failure is one [`error::ProxyError`],
//! presented in exactly one place; [`metrics`] counts it; [`admin`] shows it, and [`status`] draws
//! it as a page.
#![warn(missing_docs)]

pub mod admin;
pub mod alloc;
pub mod cli;
pub mod config;
pub mod demo;
pub mod demo_app;
pub mod error;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod reload;
pub mod server;
pub mod spare_timer;
pub mod status;
