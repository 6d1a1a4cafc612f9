//! The one place a route's policy stack is composed, outermost first, and where its state is
//! kept across reloads.

use std::sync::Arc;

use prometheus::Histogram;
use tower::ServiceBuilder;

use super::upstream::{ConnectionWait, Forward, Upstream};
use crate::config::{PolicySettings, RouteSettings};
use crate::metrics::RouteMetrics;
use crate::policy::{
    BreakerState, CircuitBreaker, CircuitBreakerLayer, Classifier, ConcurrencyLimit,
    ConcurrencyLimitLayer, LimiterState, Maintenance, MaintenanceLayer, Retry, RetryLayer,
    RetryState, Timeout, TimeoutLayer,
};

/// A route's composed service (a concrete type: no boxing on the request path).
pub(super) type RouteService =
    Maintenance<ConcurrencyLimit<CircuitBreaker<Timeout<Retry<Forward>>>>>;

/// Per-route policy state. Each part is kept across a reload while the settings it was built
/// from are unchanged (keyed by route name + those settings), and starts fresh otherwise.
pub struct PolicyState {
    /// The settings this state was built for.
    pub settings: PolicySettings,
    /// Concurrency limit, queue and (adaptive) limit estimate.
    pub limiter: Arc<LimiterState>,
    /// Circuit breaker window and state.
    pub breaker: Arc<BreakerState>,
    /// Retry budget.
    pub retry: Arc<RetryState>,
    /// Decides each request's class (stateless: rebuilt on every reload).
    pub classifier: Classifier,
}

impl PolicyState {
    /// State for `route`, reusing parts of `previous` (the same route's state before a reload)
    /// whose settings did not change.
    pub fn new(
        route: &RouteSettings,
        metrics: &RouteMetrics,
        previous: Option<&PolicyState>,
    ) -> Self {
        let p = &route.policy;
        // Only a route that reads a priority header sees requests of different classes.
        let by_class = p.priority_header.is_some();
        let limiter = previous
            .filter(|old| {
                old.settings.concurrency == p.concurrency
                    && old.settings.retry_after == p.retry_after
                    && old.settings.priority_header.is_some() == by_class
            })
            .map(|old| old.limiter.clone())
            .unwrap_or_else(|| {
                Arc::new(LimiterState::new(
                    &p.concurrency,
                    by_class,
                    p.retry_after,
                    metrics.concurrency_limit.clone(),
                ))
            });
        let breaker = previous
            .filter(|old| old.settings.circuit_breaker == p.circuit_breaker)
            .map(|old| old.breaker.clone())
            .unwrap_or_else(|| {
                Arc::new(BreakerState::new(
                    &route.name,
                    &p.circuit_breaker,
                    metrics.breaker_state.clone(),
                ))
            });
        let retry = previous
            .filter(|old| old.settings.retries == p.retries)
            .map(|old| old.retry.clone())
            .unwrap_or_else(|| Arc::new(RetryState::new(&p.retries, metrics.retries.clone())));
        PolicyState {
            settings: p.clone(),
            limiter,
            breaker,
            retry,
            classifier: Classifier::new(p),
        }
    }
}

/// How long a request of this route may wait for an upstream connection at the endpoint's
/// `max_connections`: as long as it may wait in the route's queue (no queue: not at all).
fn connection_wait(p: &PolicySettings) -> ConnectionWait {
    ConnectionWait {
        wait: if p.concurrency.queue > 0 {
            p.concurrency.queue_timeout
        } else {
            std::time::Duration::ZERO
        },
        retry_after: p.retry_after,
    }
}

/// Composes one route's stack; `upstream_duration` times each answer the upstream gives.
pub(super) fn route_service(
    state: &PolicyState,
    upstream: Arc<Upstream>,
    upstream_duration: Histogram,
) -> RouteService {
    ServiceBuilder::new()
        // Maintenance first: when the route is down on purpose nothing else should run.
        .layer(MaintenanceLayer::new(&state.settings.maintenance))
        // Then the limit: excess load is refused before it costs the upstream anything.
        .layer(ConcurrencyLimitLayer::new(state.limiter.clone()))
        // The breaker sees the final outcome of each admitted request (after retries and the
        // timeout), so it opens on what the client would have seen.
        .layer(CircuitBreakerLayer::new(state.breaker.clone()))
        // The route timeout bounds all attempts together.
        .layer(TimeoutLayer::new(state.settings.timeout))
        // Retries of idempotent, bodyless requests, within the budget.
        .layer(RetryLayer::new(state.retry.clone()))
        .service(Forward::new(
            upstream,
            connection_wait(&state.settings),
            upstream_duration,
        ))
}
