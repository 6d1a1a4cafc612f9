//! The runtime snapshot: everything a request needs, built from validated settings, swapped
//! atomically on reload. A request loads it once and finishes under it.

use std::collections::HashMap;
use std::sync::Arc;

use http::{HeaderMap, HeaderValue, Method, Uri};

use super::access_log::AccessLog;
use super::headers::Stamps;
use super::route::{request_host, Matcher};
use super::stack::{self, PolicyState, RouteService};
use super::upstream::Upstream;
use crate::config::{Loaded, RouteSettings, Settings, UpstreamProtocol};
use crate::metrics::{Metrics, RouteMetrics, UNMATCHED_ROUTE};

/// One route, ready to serve.
pub struct Route {
    /// Its validated settings.
    pub settings: RouteSettings,
    /// Compiled matcher.
    pub matcher: Matcher,
    /// Its metric handles.
    pub metrics: Arc<RouteMetrics>,
    /// Policy state (limiter, breaker, retry budget), carried over reloads when unchanged.
    pub policy: Arc<PolicyState>,
    /// The composed policy stack ending in the forward service.
    pub service: RouteService,
    /// Whether requests need an [`EndpointHint`](super::upstream::EndpointHint): the route
    /// retries and its upstream has several endpoints.
    pub spread_retries: bool,
    /// Whether its upstream speaks HTTP/1.1 (the only one an Upgrade is passed on to).
    pub upstream_http1: bool,
    /// Its upstream's `body_timeout`.
    pub body_timeout: std::time::Duration,
}

/// Everything that serves, as one immutable snapshot.
pub struct Runtime {
    /// The validated settings.
    pub settings: Settings,
    /// Version hash of the config text.
    pub version: String,
    /// When this snapshot was built (wall clock, for `/config`).
    pub loaded_at: std::time::SystemTime,
    /// Precomputed server-id headers.
    pub stamps: Stamps,
    /// Routes in match order.
    pub routes: Vec<Route>,
    /// Upstreams by name.
    pub upstreams: HashMap<String, Arc<Upstream>>,
    /// Handles for requests that matched no route.
    pub unmatched: Arc<RouteMetrics>,
    /// The access log, as this snapshot's config has it.
    pub(crate) access_log: Arc<AccessLog>,
    /// Whether any route matches on host: if none does, the host is never looked at.
    match_host: bool,
}

impl Route {
    /// Whether a client may switch to `protocol` (an `Upgrade` value, possibly a list) through
    /// this route: every protocol named must be one the route lists, by name, any version.
    pub(crate) fn allows_upgrade(&self, protocol: &HeaderValue) -> bool {
        let Ok(text) = protocol.to_str() else {
            return false;
        };
        text.split(',').all(|p| {
            let name = p.trim().split('/').next().unwrap_or("");
            !name.is_empty()
                && self
                    .settings
                    .upgrades
                    .iter()
                    .any(|allowed| allowed.eq_ignore_ascii_case(name))
        })
    }

    /// Whether the route takes `CONNECT`: only when its `match.methods` lists it.
    pub(crate) fn allows_connect(&self) -> bool {
        self.settings.matcher.methods.iter().any(|m| m == "CONNECT")
    }

    /// `Allow` for a method the route refuses: the methods it matches, or every common one.
    pub(crate) fn allow_header(&self) -> HeaderValue {
        let methods = &self.settings.matcher.methods;
        if methods.is_empty() {
            return HeaderValue::from_static("GET, HEAD, POST, PUT, DELETE, OPTIONS, PATCH");
        }
        HeaderValue::from_str(&methods.join(", ")).unwrap_or(HeaderValue::from_static("GET, HEAD"))
    }
}

impl Runtime {
    /// Builds a snapshot, reusing from `previous` every upstream (with its connection pool) and
    /// every route policy state whose settings did not change.
    pub fn build(loaded: &Loaded, metrics: &Metrics, previous: Option<&Runtime>) -> Runtime {
        let settings = loaded.settings.clone();
        let upstreams: HashMap<String, Arc<Upstream>> = settings
            .upstreams
            .iter()
            .map(|(name, s)| {
                let kept = previous
                    .and_then(|p| p.upstreams.get(name))
                    .filter(|u| u.settings == *s)
                    .cloned();
                (
                    name.clone(),
                    kept.unwrap_or_else(|| Arc::new(Upstream::new(name, s))),
                )
            })
            .collect();
        let routes = settings
            .routes
            .iter()
            .map(|r| {
                let route_metrics = metrics.route_with_timeout(&r.name, r.policy.timeout);
                let old = previous
                    .and_then(|p| p.routes.iter().find(|old| old.settings.name == r.name))
                    .map(|old| &*old.policy);
                let policy = Arc::new(PolicyState::new(r, &route_metrics, old));
                let upstream = upstreams[&r.upstream].clone();
                Route {
                    spread_retries: r.policy.retries.attempts > 0 && upstream.endpoint_count() > 1,
                    upstream_http1: upstream.settings.protocol == UpstreamProtocol::Http1,
                    body_timeout: upstream.settings.body_timeout,
                    settings: r.clone(),
                    matcher: Matcher::new(&r.matcher),
                    service: stack::route_service(
                        &policy,
                        upstream,
                        route_metrics.upstream_duration.clone(),
                    ),
                    metrics: route_metrics,
                    policy,
                }
            })
            .collect::<Vec<Route>>();
        let access_log = Arc::new(AccessLog::new(&settings.access_log));
        Runtime {
            match_host: settings.routes.iter().any(|r| r.matcher.host.is_some()),
            stamps: Stamps::new(&settings.server_id),
            settings,
            version: loaded.version.clone(),
            loaded_at: std::time::SystemTime::now(),
            routes,
            upstreams,
            unmatched: metrics.route(UNMATCHED_ROUTE),
            access_log,
        }
    }

    /// The first route that matches, in file order.
    pub fn find_route(&self, method: &Method, uri: &Uri, headers: &HeaderMap) -> Option<&Route> {
        let host = if self.match_host {
            request_host(uri, headers)
        } else {
            None
        };
        let path = uri.path();
        self.routes
            .iter()
            .find(|r| r.matcher.matches(host, path, method))
    }
}
