//! The one place a route's policy stack is composed, outermost first.

use std::sync::Arc;

use http::{Request, Response};
use hyper::body::Incoming;
use tower::util::BoxCloneSyncService;
use tower::ServiceBuilder;

use super::body::RequestBody;
use super::upstream::{Forward, Upstream};
use crate::config::RouteSettings;
use crate::error::{ProxyError, UpstreamError};
use crate::metrics::RouteMetrics;

/// A route's composed service.
pub type RouteService = BoxCloneSyncService<Request<RequestBody>, Response<Incoming>, ProxyError>;

/// Per-route policy state, kept across reloads while the route's policy settings are unchanged.
pub struct PolicyState {
    timeout: std::time::Duration,
}

impl PolicyState {
    /// Fresh state for a route.
    pub fn new(route: &RouteSettings, _metrics: &RouteMetrics) -> Self {
        PolicyState { timeout: route.policy.timeout }
    }
}

/// Composes the stack for one route.
pub fn route_service(state: &Arc<PolicyState>, upstream: Arc<Upstream>) -> RouteService {
    let timeout = state.timeout;
    let svc = ServiceBuilder::new().service(Forward::new(upstream));
    let svc = tower::util::MapFuture::new(svc, move |fut| async move {
        tokio::time::timeout(timeout, fut)
            .await
            .unwrap_or(Err(ProxyError::Upstream(UpstreamError::ResponseTimeout)))
    });
    BoxCloneSyncService::new(svc)
}
