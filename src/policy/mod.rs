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

pub mod adaptive;
pub mod breaker;
pub mod concurrency;
pub mod maintenance;
pub mod retry;
pub mod timeout;
mod window;

#[cfg(test)]
mod test_support;

pub use breaker::{BreakerState, CircuitBreaker, CircuitBreakerLayer, CircuitState};
pub use concurrency::{ConcurrencyLimit, ConcurrencyLimitLayer, LimiterState};
pub use maintenance::{Maintenance, MaintenanceLayer};
pub use retry::{Retry, RetryLayer, RetryState};
pub use timeout::{Timeout, TimeoutLayer};
