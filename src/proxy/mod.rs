//! The request's path through spillway: [`service`] takes it from a connection, [`route`]
//! picks the route, [`stack`] runs the route's policies, [`upstream`] forwards it over
//! [`pool`]ed connections made by the [`connector`] (HTTP/1.1 spoken by [`http1`]);
//! [`headers`] holds every header rule and [`body`] streams both ways.

pub mod body;
pub mod connector;
pub mod headers;
pub mod http1;
pub mod pool;
pub mod route;
pub mod runtime;
pub mod service;
pub mod stack;
pub mod upstream;

pub use runtime::Runtime;
pub use service::ProxyService;
