//! Per-route policies, each a tower `Layer` + `Service`.
//!
//! A route's stack, outermost first: [`Maintenance`] → [`ConcurrencyLimit`] →
//! [`CircuitBreaker`] → [`Timeout`] → [`Retry`] → the forwarder. Every layer answers
//! `poll_ready` at once (or by asking its inner service) and does its waiting and refusing inside
//! the returned future, so one shared stack can be cloned per request. A refusal is always
//! [`ProxyError::Shed`](crate::error::ProxyError::Shed) and costs no waiting and no allocation.
//!
//! Policy state (counters, windows, the current limit) lives in an `Arc<…State>` built from the
//! route's settings, so a config reload can keep the state of a route whose settings did not
//! change.

mod adaptive;
mod breaker;
mod codel;
mod concurrency;
mod maintenance;
pub(crate) mod priority;
pub(crate) mod retry;
pub(crate) mod timeout;
mod window;

#[cfg(test)]
mod test_support;

pub use concurrency::LimiterState;
pub use priority::Classifier;

pub(crate) use breaker::{BreakerState, CircuitBreaker, CircuitBreakerLayer, CircuitState};
pub(crate) use concurrency::{ConcurrencyLimit, ConcurrencyLimitLayer};
pub(crate) use maintenance::{Maintenance, MaintenanceLayer};
pub(crate) use retry::{Retry, RetryLayer, RetryState};
pub(crate) use timeout::{Timeout, TimeoutLayer};
