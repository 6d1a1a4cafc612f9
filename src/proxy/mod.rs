//! The request's path through spillway, downstream side: [`service`] takes it from a
//! connection, [`runtime`] holds the snapshot it is served under and [`route`] picks its route,
//! [`stack`] runs the route's policies, and the [`upstream`] client forwards it. [`rescue`]
//! turns every error into a response, [`headers`] holds every header rule, [`body`] streams
//! the response, and [`exchange`] accounts for the request from arrival to its last byte.

pub(crate) mod access_log;
mod body;
mod exchange;
pub mod headers;
mod rescue;
pub mod route;
pub mod runtime;
mod service;
mod stack;
mod trace;
mod upstream;

pub use runtime::Runtime;
pub(crate) use service::ProxyService;
