//! The config file as written: serde types only, no validation.
//!
//! Every struct denies unknown keys. Values whose parsing can fail for a reason the user should
//! see together with every other mistake (durations, addresses, names) are kept as strings here
//! and parsed in [`super::build`], which collects all errors with their field paths.

use std::borrow::Cow;
use std::collections::BTreeMap;

use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Serialize};

/// What a duration may look like, as a JSON Schema (ECMA-262) pattern: what humantime (the
/// parser in [`super::build`], after trimming) accepts, less oddities such as spaces inside a
/// number. `0`, or one or more of a whole or decimal number and a unit, with or without spaces
/// between: `250ms`, `5s`, `1.5m`, `1h 30m`, `1h30m`. A value holding a `${VAR}` reference is
/// let through: it is expanded before the file is read, and editors see it unexpanded.
pub const DURATION_PATTERN: &str = concat!(
    r"^\s*(?:0|(?:[0-9]+(?:\.[0-9]+)?\s*",
    r"(?:nanos|nsec|ns|usec|us|µs|millis|msec|ms|seconds|second|secs|sec|s",
    r"|minutes|minute|mins|min|m|hours|hour|hrs|hr|h|days|day|d",
    r"|weeks|week|wks|wk|w|months|month|M|years|year|yrs|yr|y)\s*)+)\s*$",
    r"|\$\{",
);

/// A duration as written, e.g. `250ms`, `5s`, `1m` or `1h 30m`; parsed (with humantime) in
/// [`super::build`], which reports a bad one together with every other mistake. A type of its
/// own so that the schema says what a duration looks like at every key that holds one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(transparent)]
pub struct DurationText(pub String);

impl AsRef<str> for DurationText {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl JsonSchema for DurationText {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": DURATION_PATTERN,
            "description": "A duration: a number and a unit (ns, us, ms, s, m, h, d), e.g. \
                250ms, 5s, 1.5m; several add up: 1h 30m.",
        })
    }
}

/// spillway's config file; docs/configuration.md describes every key.
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
    /// spillway's own memory: the limit it sheds against, and the marks.
    pub limits: Option<LimitsFile>,
    /// The access log: one line per request, which ones, in what form.
    pub access_log: Option<AccessLogFile>,
}

/// The access log.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AccessLogFile {
    /// Whether requests are logged at all.
    pub enabled: Option<bool>,
    /// `text` or `json`; default: the process's `--log-format`.
    pub format: Option<String>,
    /// Share of the requests not in an `always_log` class that are logged (0 to 1).
    pub sample: Option<f64>,
    /// Classes logged whatever the sample: `proxy_errors` (every response spillway generated),
    /// `5xx`, `slow` (took at least `slow_threshold`).
    pub always_log: Option<Vec<String>>,
    /// What counts as `slow`.
    pub slow_threshold: Option<DurationText>,
    /// Extra headers to log, by name.
    pub fields: Option<AccessLogFieldsFile>,
}

/// Extra headers in each access-log line.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AccessLogFieldsFile {
    /// Request headers (logged as `req_<name>`).
    pub request: Option<Vec<String>>,
    /// Response headers (logged as `resp_<name>`).
    pub response: Option<Vec<String>>,
}

/// spillway's own resource limits.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LimitsFile {
    /// Memory limit in bytes; default: the cgroup's limit (what the kubelet or systemd would
    /// kill spillway at), none without one.
    pub memory_bytes: Option<u64>,
    /// Share of the limit above which spillway refuses new connections, stops keep-alive
    /// reuse and closes idle connections.
    pub memory_soft: Option<f64>,
    /// Share of the limit above which spillway also refuses new requests (503).
    pub memory_hard: Option<f64>,
}

/// One listener.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListenerFile {
    /// Unique name, used in logs and metrics; required when there are several listeners.
    pub name: Option<String>,
    /// `ip:port` to bind.
    pub address: Option<String>,
    /// TLS termination for this listener.
    pub tls: Option<ListenerTlsFile>,
    /// Most open client connections; beyond it a new connection is answered 503 and closed.
    pub max_connections: Option<u32>,
    /// Largest request head (request line and all fields), in bytes; over it: 431 (414 when
    /// the request line alone is over).
    pub max_request_header_bytes: Option<u32>,
    /// Most fields in a request head; over it: 431.
    pub max_request_headers: Option<u32>,
    /// How long a new connection may take to send its first request head, and any head may
    /// take once its first byte arrived; the connection is closed after it.
    pub header_timeout: Option<DurationText>,
    /// How long a kept-alive client connection may sit idle between requests.
    pub idle_timeout: Option<DurationText>,
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
    /// `ip:port` to bind the full admin endpoint (status page, `/config`, `/reload`, and the
    /// metrics and probes).
    pub address: Option<String>,
    /// `ip:port` of a second listener that serves only `/metrics`, `/healthz` and `/readyz`:
    /// the one to open to Prometheus and the kubelet, while `address` stays on loopback.
    pub metrics_address: Option<String>,
    /// A file holding a bearer token that the full admin's `/`, `/status.json`, `/config` and
    /// `/reload` then require (`Authorization: Bearer <token>`); re-read on every reload.
    pub token_file: Option<String>,
    /// Host names (besides the admin address, `localhost` and loopback addresses) that may
    /// call the control endpoints (`/`, `/status.json`, `/config`, `/reload`).
    pub allowed_hosts: Option<Vec<String>>,
}

/// Graceful shutdown timings.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ShutdownFile {
    /// How long readiness fails before listeners stop accepting.
    pub drain_delay: Option<DurationText>,
    /// How long in-flight requests get after that.
    pub drain_timeout: Option<DurationText>,
}

/// One upstream (the app, possibly several endpoints of it).
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpstreamFile {
    /// `host:port` of each endpoint; requests are spread across them.
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// TCP connect timeout.
    pub connect_timeout: Option<DurationText>,
    /// Pooled connections idle longer than this are closed.
    pub idle_timeout: Option<DurationText>,
    /// Longest the upstream may pause while sending a response body; the client's response is
    /// then aborted.
    pub body_timeout: Option<DurationText>,
    /// Most idle connections kept per endpoint; more are closed as they come back.
    pub max_idle: Option<u32>,
    /// Most open connections per endpoint (busy and idle); beyond it a request waits (as long
    /// as the route's queue_timeout when the route has a queue) or is refused with 503.
    pub max_connections: Option<u32>,
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
    /// The protocols a client may switch to through this route (HTTP/1.1 `Upgrade`); other
    /// upgrades are removed from the forwarded request. Default `[websocket]`.
    pub upgrades: Option<Vec<String>>,
    // The policy fields are spelled out rather than flattened from `PolicyFile`: serde cannot
    // combine `flatten` with `deny_unknown_fields`, and flattening loses error locations.
    /// Overrides `defaults.timeout`.
    pub timeout: Option<DurationText>,
    /// Overrides `defaults.retry_after`.
    pub retry_after: Option<DurationText>,
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
    pub timeout: Option<DurationText>,
    /// `Retry-After` on 503s the proxy generates.
    pub retry_after: Option<DurationText>,
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
    pub queue_timeout: Option<DurationText>,
    /// Queue delay above which a queue whose waits stay there counts as standing.
    pub queue_target: Option<DurationText>,
    /// Interval over which the shortest queue wait is taken.
    pub queue_interval: Option<DurationText>,
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
    pub window: Option<DurationText>,
    /// Fewest requests in the window before the breaker may open.
    pub min_requests: Option<u32>,
    /// Failure ratio (0..=1) at which it opens.
    pub failure_ratio: Option<f64>,
    /// How long it stays open before probing.
    pub open_for: Option<DurationText>,
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
    pub retry_after: Option<DurationText>,
}

/// Retry settings.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RetriesFile {
    /// Extra attempts after the first.
    pub attempts: Option<u32>,
    /// Base backoff between attempts (jittered, doubling).
    pub backoff: Option<DurationText>,
    /// Retries allowed as a share of requests over a sliding window.
    pub budget: Option<f64>,
    /// Retries per second always allowed, on top of the budget.
    pub min_per_second: Option<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The schema's duration pattern and the loader agree: what one accepts, so does the other.
    #[test]
    fn the_duration_pattern_accepts_what_humantime_parses() {
        let pattern = regex::Regex::new(DURATION_PATTERN).unwrap();
        let parses = |s: &str| humantime::parse_duration(s.trim()).is_ok();
        let good = [
            "0",
            "0s",
            "250ms",
            "5s",
            " 5s ",
            "1m",
            "1.5m",
            "1h 30m",
            "1h30m",
            "5 s",
            "10 minutes",
            "2hours",
            "3d",
            "1w",
            "1M",
            "1y",
            "100us",
            "100\u{b5}s",
            "7ns",
            "1sec",
            "30secs",
            "2hrs",
        ];
        for s in good {
            assert!(pattern.is_match(s), "the pattern refuses {s:?}");
            assert!(parses(s), "humantime refuses {s:?}");
        }
        let bad = [
            "",
            "soon",
            "30",
            "5S",
            "1.s",
            ".5s",
            "5s5",
            "-5s",
            "5 parsecs",
            "00",
            "5ms!",
            "1h,30m",
            "five s",
            "s",
        ];
        for s in bad {
            assert!(!pattern.is_match(s), "the pattern accepts {s:?}");
            assert!(!parses(s), "humantime accepts {s:?}");
        }
        // Every unit the pattern names is one humantime knows.
        let start = DURATION_PATTERN.find("nanos").unwrap();
        let end = start + DURATION_PATTERN[start..].find(')').unwrap();
        for unit in DURATION_PATTERN[start..end].split('|') {
            assert!(parses(&format!("2{unit}")), "humantime refuses 2{unit}");
        }
        // A reference is expanded before parsing; editors see it as written.
        assert!(pattern.is_match("${SPILLWAY_DRAIN_DELAY:-5s}"));
    }
}
