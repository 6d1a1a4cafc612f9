//! Validated, typed configuration: what the rest of spillway is built from.
//!
//! These are plain data (no sockets, no state), comparable with `==` so that a reload can tell
//! which route's policy changed and carry the state of unchanged ones over.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

/// The whole validated config.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Settings {
    /// Stamped into `x-served-by`, `Via` and `Proxy-Status`.
    pub server_id: String,
    /// Proxy listeners.
    pub listeners: Vec<ListenerSettings>,
    /// Admin endpoint address, if any.
    pub admin: Option<SocketAddr>,
    /// Extra host names allowed to call the admin's control endpoints (lower case).
    pub admin_allowed_hosts: Vec<String>,
    /// The metrics listener (`/metrics`, `/healthz`, `/readyz` only), if any.
    pub admin_metrics: Option<SocketAddr>,
    /// The file holding the full admin's bearer token, if any.
    pub admin_token_file: Option<PathBuf>,
    /// Upstreams by name.
    pub upstreams: BTreeMap<String, UpstreamSettings>,
    /// Routes in match order.
    pub routes: Vec<RouteSettings>,
    /// Graceful shutdown timings.
    pub shutdown: ShutdownSettings,
    /// spillway's own memory limit and marks.
    pub limits: LimitsSettings,
    /// `Retry-After` (`defaults.retry_after`) on 503s answered before any route is known: a
    /// connection refused at accept.
    #[serde(with = "humantime_serde_compat")]
    pub retry_after: Duration,
}

/// spillway's own memory limit and the marks it sheds at.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LimitsSettings {
    /// Configured limit in bytes; `None`: the cgroup's, if any.
    pub memory_bytes: Option<u64>,
    /// Soft mark, a share of the limit.
    pub memory_soft: f64,
    /// Hard mark, a share of the limit.
    pub memory_hard: f64,
}

/// One listener.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ListenerSettings {
    /// Unique name.
    pub name: String,
    /// Address to bind.
    pub address: SocketAddr,
    /// TLS termination, if configured.
    pub tls: Option<ListenerTlsSettings>,
    /// Most open client connections.
    pub max_connections: u32,
    /// Largest request head, in bytes.
    pub max_request_header_bytes: u32,
    /// Most fields in a request head.
    pub max_request_headers: u32,
    /// Deadline for a request head (and for a new connection's first one).
    #[serde(with = "humantime_serde_compat")]
    pub header_timeout: Duration,
    /// Longest idle time of a kept-alive connection between requests.
    #[serde(with = "humantime_serde_compat")]
    pub idle_timeout: Duration,
}

/// TLS termination files.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ListenerTlsSettings {
    /// PEM certificate chain.
    pub cert_file: PathBuf,
    /// PEM private key.
    pub key_file: PathBuf,
    /// ALPN protocols in preference order.
    pub alpn: Vec<String>,
}

/// Graceful shutdown timings.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ShutdownSettings {
    /// Readiness fails this long before listeners stop accepting.
    #[serde(with = "humantime_serde_compat")]
    pub drain_delay: Duration,
    /// In-flight requests get at most this long after that.
    #[serde(with = "humantime_serde_compat")]
    pub drain_timeout: Duration,
}

/// Upstream wire protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamProtocol {
    /// HTTP/1.1 with keep-alive.
    Http1,
    /// HTTP/2 with prior knowledge (gRPC).
    Http2,
}

/// One upstream.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UpstreamSettings {
    /// `host:port` of each endpoint.
    pub endpoints: Vec<String>,
    /// TCP connect timeout.
    #[serde(with = "humantime_serde_compat")]
    pub connect_timeout: Duration,
    /// Idle pooled connections are closed after this.
    #[serde(with = "humantime_serde_compat")]
    pub idle_timeout: Duration,
    /// Longest pause in a response body before the response is aborted.
    #[serde(with = "humantime_serde_compat")]
    pub body_timeout: Duration,
    /// Most idle pooled connections per endpoint.
    pub max_idle: u32,
    /// Most open connections per endpoint; `None`: no cap.
    pub max_connections: Option<u32>,
    /// Wire protocol.
    pub protocol: UpstreamProtocol,
    /// TLS towards the upstream.
    pub tls: Option<UpstreamTlsSettings>,
}

/// TLS towards an upstream.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UpstreamTlsSettings {
    /// SNI and verification name.
    pub server_name: Option<String>,
    /// PEM CA bundle; `None` means the system roots.
    pub ca_file: Option<PathBuf>,
    /// Client certificate for mTLS.
    pub cert_file: Option<PathBuf>,
    /// Client key for mTLS.
    pub key_file: Option<PathBuf>,
}

/// One route.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RouteSettings {
    /// Unique name; the `route` label.
    pub name: String,
    /// What it matches.
    pub matcher: MatchSettings,
    /// Upstream name (validated to exist).
    pub upstream: String,
    /// Protocols a client may upgrade to (lower case).
    pub upgrades: Vec<String>,
    /// Effective policy (defaults merged with the route's overrides).
    pub policy: PolicySettings,
}

/// Request matching rules.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MatchSettings {
    /// Path prefix on segment boundaries; `/` matches everything.
    pub path_prefix: String,
    /// Host pattern, lower-cased.
    pub host: Option<HostMatch>,
    /// Allowed methods; empty means all.
    pub methods: Vec<String>,
}

/// A host pattern.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HostMatch {
    /// Exactly this host (lower case, no port).
    Exact(String),
    /// `*.example.com`: holds `.example.com`; matches any host ending in it.
    Suffix(String),
}

/// Effective per-route policy.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PolicySettings {
    /// Response head deadline (covers all retry attempts together).
    #[serde(with = "humantime_serde_compat")]
    pub timeout: Duration,
    /// `Retry-After` on generated 503s.
    #[serde(with = "humantime_serde_compat")]
    pub retry_after: Duration,
    /// Concurrency limit and queue.
    pub concurrency: ConcurrencySettings,
    /// Circuit breaker.
    pub circuit_breaker: BreakerSettings,
    /// Maintenance mode.
    pub maintenance: MaintenanceSettings,
    /// Retries.
    pub retries: RetrySettings,
}

/// How the in-flight limit is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitSettings {
    /// A fixed limit.
    Fixed(u32),
    /// A limit that follows upstream latency, kept between `min` and `max`.
    Adaptive {
        /// Lowest limit.
        min: u32,
        /// Highest limit.
        max: u32,
    },
}

/// Concurrency limit and queue.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ConcurrencySettings {
    /// The limit.
    pub limit: LimitSettings,
    /// Bounded FIFO queue length; 0 sheds at once.
    pub queue: u32,
    /// Longest wait in the queue.
    #[serde(with = "humantime_serde_compat")]
    pub queue_timeout: Duration,
}

/// Circuit breaker.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BreakerSettings {
    /// Whether the breaker is active.
    pub enabled: bool,
    /// Sliding window for counting.
    #[serde(with = "humantime_serde_compat")]
    pub window: Duration,
    /// Fewest requests in the window before it may open.
    pub min_requests: u32,
    /// Failure ratio at which it opens.
    pub failure_ratio: f64,
    /// Open duration before probing.
    #[serde(with = "humantime_serde_compat")]
    pub open_for: Duration,
    /// Probes while half-open.
    pub half_open_requests: u32,
    /// Upstream codes that count as failures.
    pub failure_codes: Vec<u16>,
}

/// Maintenance mode.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MaintenanceSettings {
    /// Whether every request is answered 503.
    pub enabled: bool,
    /// `Retry-After` while in maintenance.
    #[serde(with = "humantime_serde_compat")]
    pub retry_after: Duration,
}

/// Retries.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RetrySettings {
    /// Extra attempts after the first (0 = off).
    pub attempts: u32,
    /// Base backoff, doubled per attempt, with full jitter.
    #[serde(with = "humantime_serde_compat")]
    pub backoff: Duration,
    /// Retries allowed as a share of requests over a sliding window.
    pub budget: f64,
}

/// Durations shown in `/config` the way they are written in the file ("250ms", "5s").
mod humantime_serde_compat {
    use std::time::Duration;

    pub(super) fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(*d))
    }
}
