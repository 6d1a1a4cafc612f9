//! The config file as written: serde types only, no validation.
//!
//! Every struct denies unknown keys. Values whose parsing can fail for a reason the user should
//! see together with every other mistake (durations, addresses, names) are kept as strings here
//! and parsed in [`super::build`], which collects all errors with their field paths.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The whole file.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Stamped into `x-served-by`, `Via` and `Proxy-Status`.
    pub server_id: Option<String>,
    /// Where spillway accepts proxied traffic.
    #[serde(default)]
    pub listeners: Vec<ListenerFile>,
    /// The admin endpoint (metrics, health, config).
    pub admin: Option<AdminFile>,
    /// Policy defaults that every route inherits field by field.
    #[serde(default)]
    pub defaults: PolicyFile,
    /// Named upstreams.
    #[serde(default)]
    pub upstreams: BTreeMap<String, UpstreamFile>,
    /// Routes, first match in file order wins.
    #[serde(default)]
    pub routes: Vec<RouteFile>,
    /// Graceful shutdown timings.
    pub shutdown: Option<ShutdownFile>,
}

/// One listener.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListenerFile {
    /// Unique name, used in logs and metrics.
    pub name: Option<String>,
    /// `ip:port` to bind.
    pub address: Option<String>,
    /// TLS termination for this listener.
    pub tls: Option<ListenerTlsFile>,
}

/// TLS termination settings for a listener.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListenerTlsFile {
    /// PEM certificate chain.
    pub cert_file: Option<String>,
    /// PEM private key.
    pub key_file: Option<String>,
    /// ALPN protocols offered, default `[h2, http/1.1]`.
    pub alpn: Option<Vec<String>>,
}

/// The admin endpoint.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AdminFile {
    /// `ip:port` to bind.
    pub address: Option<String>,
}

/// Graceful shutdown timings.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ShutdownFile {
    /// How long readiness fails before listeners stop accepting.
    pub drain_delay: Option<String>,
    /// How long in-flight requests get after that.
    pub drain_timeout: Option<String>,
}

/// One upstream (the app, possibly several endpoints of it).
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpstreamFile {
    /// `host:port` of each endpoint; requests are spread across them.
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// TCP connect timeout.
    pub connect_timeout: Option<String>,
    /// Pooled connections idle longer than this are closed.
    pub idle_timeout: Option<String>,
    /// `http1` (default) or `http2` (prior knowledge).
    pub protocol: Option<String>,
    /// TLS to the upstream.
    pub tls: Option<UpstreamTlsFile>,
}

/// TLS settings towards an upstream.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTlsFile {
    /// SNI and verification name.
    pub server_name: Option<String>,
    /// PEM CA bundle, default the system roots.
    pub ca_file: Option<String>,
    /// Client certificate for mTLS.
    pub cert_file: Option<String>,
    /// Client key for mTLS.
    pub key_file: Option<String>,
}

/// One route.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RouteFile {
    /// Unique name, the `route` label of every metric.
    pub name: Option<String>,
    /// What requests this route takes.
    #[serde(rename = "match", default)]
    pub match_: MatchFile,
    /// Name of an upstream.
    pub upstream: Option<String>,
    // The policy fields are spelled out rather than flattened from `PolicyFile`: serde cannot
    // combine `flatten` with `deny_unknown_fields`, and flattening loses error locations.
    /// Overrides `defaults.timeout`.
    pub timeout: Option<String>,
    /// Overrides `defaults.retry_after`.
    pub retry_after: Option<String>,
    /// Overrides `defaults.concurrency` field by field.
    pub concurrency: Option<ConcurrencyFile>,
    /// Overrides `defaults.circuit_breaker` field by field.
    pub circuit_breaker: Option<BreakerFile>,
    /// Overrides `defaults.maintenance` field by field.
    pub maintenance: Option<MaintenanceFile>,
    /// Overrides `defaults.retries` field by field.
    pub retries: Option<RetriesFile>,
    /// Overrides `defaults.priority`.
    pub priority: Option<String>,
    /// Overrides `defaults.priority_header`.
    pub priority_header: Option<String>,
}

impl RouteFile {
    /// The route's own policy fields, in the shape of `defaults`.
    pub fn policy(&self) -> PolicyFile {
        PolicyFile {
            timeout: self.timeout.clone(),
            retry_after: self.retry_after.clone(),
            concurrency: self.concurrency.clone(),
            circuit_breaker: self.circuit_breaker.clone(),
            maintenance: self.maintenance.clone(),
            retries: self.retries.clone(),
            priority: self.priority.clone(),
            priority_header: self.priority_header.clone(),
        }
    }
}

/// Request matching.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MatchFile {
    /// `/api` matches `/api` and `/api/...`, not `/apix`.
    pub path_prefix: Option<String>,
    /// Exact host or `*.example.com`, without port, case-insensitive.
    pub host: Option<String>,
    /// Allowed methods; empty means all.
    pub methods: Option<Vec<String>>,
}

/// Per-route policy settings; the same shape in `defaults` and in each route.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    /// Response head must arrive within this, else 504.
    pub timeout: Option<String>,
    /// `Retry-After` on 503s the proxy generates.
    pub retry_after: Option<String>,
    /// Concurrency limit and queue.
    pub concurrency: Option<ConcurrencyFile>,
    /// Circuit breaker.
    pub circuit_breaker: Option<BreakerFile>,
    /// Maintenance mode.
    pub maintenance: Option<MaintenanceFile>,
    /// Retries.
    pub retries: Option<RetriesFile>,
    /// The class of the route's requests under overload: `critical`, `normal` (default) or
    /// `sheddable`.
    pub priority: Option<String>,
    /// A request header whose value (`critical`, `normal`, `sheddable`) sets the class of that
    /// request; unset by default (clients do not choose).
    pub priority_header: Option<String>,
}

/// Concurrency limit settings.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ConcurrencyFile {
    /// Fixed limit on in-flight requests.
    pub max: Option<u32>,
    /// Adaptive limit; replaces `max` when present.
    pub adaptive: Option<AdaptiveFile>,
    /// Bounded queue length; 0 sheds at once.
    pub queue: Option<u32>,
    /// Longest wait in the queue.
    pub queue_timeout: Option<String>,
    /// Queue delay above which a queue whose waits stay there counts as standing.
    pub queue_target: Option<String>,
    /// Interval over which the shortest queue wait is taken.
    pub queue_interval: Option<String>,
    /// Share of the limit each class below `critical` may fill.
    pub shares: Option<SharesFile>,
}

/// Shares of the concurrency limit by class.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SharesFile {
    /// `sheddable` requests are admitted while fewer than this share of the limit are in flight.
    pub sheddable: Option<f64>,
    /// `normal` requests are admitted while fewer than this share of the limit are in flight.
    pub normal: Option<f64>,
}

/// Adaptive concurrency limit bounds.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AdaptiveFile {
    /// Lowest limit.
    pub min: Option<u32>,
    /// Highest limit.
    pub max: Option<u32>,
}

/// Circuit breaker settings.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BreakerFile {
    /// Whether the breaker is active.
    pub enabled: Option<bool>,
    /// Sliding window over which failures are counted.
    pub window: Option<String>,
    /// Fewest requests in the window before the breaker may open.
    pub min_requests: Option<u32>,
    /// Failure ratio (0..=1) at which it opens.
    pub failure_ratio: Option<f64>,
    /// How long it stays open before probing.
    pub open_for: Option<String>,
    /// Probes let through while half-open.
    pub half_open_requests: Option<u32>,
    /// Upstream status codes that count as failures.
    pub failure_codes: Option<Vec<u16>>,
}

/// Maintenance mode settings.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MaintenanceFile {
    /// Whether every request is answered 503.
    pub enabled: Option<bool>,
    /// `Retry-After` while in maintenance.
    pub retry_after: Option<String>,
}

/// Retry settings.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RetriesFile {
    /// Extra attempts after the first.
    pub attempts: Option<u32>,
    /// Base backoff between attempts (jittered, doubling).
    pub backoff: Option<String>,
    /// Retries allowed as a share of requests over a sliding window.
    pub budget: Option<f64>,
    /// Retries per second always allowed, on top of the budget.
    pub min_per_second: Option<f64>,
}
