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
    /// The access log.
    pub access_log: AccessLogSettings,
    /// `Retry-After` (`defaults.retry_after`) on 503s answered before any route is known: a
    /// connection refused at accept.
    #[serde(with = "humantime_serde_compat")]
    pub retry_after: Duration,
}

/// The access log's format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessLogFormat {
    /// `key=value` after a timestamp, level and target, like the process log.
    Text,
    /// One JSON object per line.
    Json,
}

/// The access log: which requests get a line, in what form, with which extra headers.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AccessLogSettings {
    /// Whether anything is logged.
    pub enabled: bool,
    /// The format; `None`: the process's `--log-format`.
    pub format: Option<AccessLogFormat>,
    /// Share of the other requests logged.
    pub sample: f64,
    /// Every response spillway generated is logged.
    pub always_proxy_errors: bool,
    /// Every 5xx is logged.
    pub always_5xx: bool,
    /// Every request at least this slow is logged.
    #[serde(with = "option_humantime")]
    pub always_slower_than: Option<Duration>,
    /// Request headers to log, lower case.
    pub request_fields: Vec<String>,
    /// Response headers to log, lower case.
    pub response_fields: Vec<String>,
}

/// `Option<Duration>` shown as written in the file.
mod option_humantime {
    use std::time::Duration;

    pub(super) fn serialize<S: serde::Serializer>(
        d: &Option<Duration>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.collect_str(&humantime::format_duration(*d)),
            None => s.serialize_none(),
        }
    }
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
    /// The class of the route's requests, unless `priority_header` says otherwise.
    pub priority: Priority,
    /// Request header whose value (`critical`, `normal`, `sheddable`, any case) sets a
    /// request's class; lower-case. `None`: clients do not choose.
    pub priority_header: Option<String>,
}

/// How important a request is when there is not room for all: under overload the least
/// important are shed first. Ordered from least to most important.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    /// Work that may wait or be dropped (prefetches, batch jobs): admitted only while the
    /// upstream is well below its limit.
    Sheddable,
    /// Everything else.
    #[default]
    Normal,
    /// Work that must get through (a checkout): admitted up to the whole limit.
    Critical,
}

impl Priority {
    /// Every class, most important first: the order the queue serves them in.
    pub const ALL: [Priority; 3] = [Priority::Critical, Priority::Normal, Priority::Sheddable];

    /// The word for it in the config, the priority header and the `priority` metric label.
    pub fn label(self) -> &'static str {
        match self {
            Priority::Critical => "critical",
            Priority::Normal => "normal",
            Priority::Sheddable => "sheddable",
        }
    }

    /// The class a header value or config word names, ignoring ASCII case; `None` for
    /// anything else.
    pub fn parse(value: &[u8]) -> Option<Priority> {
        Priority::ALL
            .into_iter()
            .find(|p| value.eq_ignore_ascii_case(p.label().as_bytes()))
    }

    /// Position in [`Priority::ALL`], for per-class tables.
    pub fn index(self) -> usize {
        match self {
            Priority::Critical => 0,
            Priority::Normal => 1,
            Priority::Sheddable => 2,
        }
    }
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
    /// Bounded queue length; 0 sheds at once.
    pub queue: u32,
    /// Longest wait in the queue.
    #[serde(with = "humantime_serde_compat")]
    pub queue_timeout: Duration,
    /// Queue delay that counts as standing when even the shortest wait of an interval stays
    /// above it.
    #[serde(with = "humantime_serde_compat")]
    pub queue_target: Duration,
    /// The interval over which the shortest wait is taken.
    #[serde(with = "humantime_serde_compat")]
    pub queue_interval: Duration,
    /// Share of the limit each lower class may fill.
    pub shares: Shares,
}

/// Share of the concurrency limit up to which each class below `critical` is admitted:
/// a `sheddable` request gets in while fewer than `sheddable × limit` are in flight.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Shares {
    /// Share for `sheddable` requests, in (0, 1], at most `normal`.
    pub sheddable: f64,
    /// Share for `normal` requests, in (0, 1].
    pub normal: f64,
}

impl Shares {
    /// The share of the limit `priority` may fill (1 for `critical`).
    pub fn of(&self, priority: Priority) -> f64 {
        match priority {
            Priority::Critical => 1.0,
            Priority::Normal => self.normal,
            Priority::Sheddable => self.sheddable,
        }
    }
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
    /// Retries per second allowed whatever the traffic, on top of the budget.
    pub min_per_second: f64,
}

/// Durations shown in `/config` the way they are written in the file ("250ms", "5s").
mod humantime_serde_compat {
    use std::time::Duration;

    pub(super) fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(*d))
    }
}
