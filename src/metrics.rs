//! Prometheus metrics: names declared once, one explicit registry per process (never the global
//! one, so tests can run several proxies side by side), and per-route handles resolved when the
//! runtime is built so the request path never looks a series up by its labels.

use std::sync::{Arc, OnceLock};

use http::Method;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

use crate::config::Priority;
use crate::error::{ShedReason, UpstreamError};

/// Counter: every response, by route, method, code and source (`upstream` or `proxy`).
pub const REQUESTS_TOTAL: &str = "spillway_requests_total";
/// Histogram: request duration (until the response body ended), by route and code.
pub const REQUEST_DURATION: &str = "spillway_request_duration_seconds";
/// Counter: failures talking to the upstream, by route and kind (Proxy-Status error type).
pub const UPSTREAM_ERRORS_TOTAL: &str = "spillway_upstream_errors_total";
/// Gauge: requests being served (including streaming bodies), by route.
pub const IN_FLIGHT: &str = "spillway_in_flight_requests";
/// Gauge: always 1, labelled with the version.
pub const BUILD_INFO: &str = "spillway_build_info";
/// Counter: requests refused on purpose, by route, reason and priority (the request's class).
pub const SHED_TOTAL: &str = "spillway_shed_total";
/// Gauge: the current concurrency limit, by route.
pub const CONCURRENCY_LIMIT: &str = "spillway_concurrency_limit";
/// Gauge: circuit breaker state by route: 0 closed, 1 half-open, 2 open.
pub const BREAKER_STATE: &str = "spillway_circuit_breaker_state";
/// Counter: retries sent, by route.
pub const RETRIES_TOTAL: &str = "spillway_retries_total";
/// Counter: config reloads by result (`success`, `failure`).
pub const CONFIG_RELOADS_TOTAL: &str = "spillway_config_reloads_total";
/// Gauge: 1 if the last config reload succeeded, else 0.
pub const CONFIG_LAST_RELOAD_SUCCESSFUL: &str = "spillway_config_last_reload_successful";
/// Counter: failed TLS handshakes by listener.
pub const TLS_HANDSHAKE_ERRORS_TOTAL: &str = "spillway_tls_handshake_errors_total";

/// Gauge: open client connections by listener.
pub const OPEN_CONNECTIONS: &str = "spillway_open_connections";
/// Counter: client connections refused at accept (listener at `max_connections`, or memory
/// pressure), by listener.
pub const CONNECTIONS_REFUSED_TOTAL: &str = "spillway_connections_refused_total";

/// Gauge: memory pressure, 0 ok, 1 above the soft mark, 2 above the hard mark.
pub const MEMORY_PRESSURE: &str = "spillway_memory_pressure";
/// Gauge: spillway's resident memory, in bytes, as the memory watch last read it.
pub const MEMORY_RESIDENT_BYTES: &str = "spillway_memory_resident_bytes";
/// Gauge: the memory limit spillway sheds against, in bytes (0: none).
pub const MEMORY_LIMIT_BYTES: &str = "spillway_memory_limit_bytes";

/// Route label of requests that matched no route.
pub const UNMATCHED_ROUTE: &str = "unmatched";

/// Latency buckets in seconds: fine below 10 ms, where a sidecar's own overhead shows, and up
/// to 30 s, the default route timeout.
const DURATION_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The `method` label values; anything else is `OTHER` so label values stay bounded.
const METHODS: [&str; 10] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE", "CONNECT", "OTHER",
];

fn method_index(m: &Method) -> usize {
    match *m {
        Method::GET => 0,
        Method::HEAD => 1,
        Method::POST => 2,
        Method::PUT => 3,
        Method::DELETE => 4,
        Method::OPTIONS => 5,
        Method::PATCH => 6,
        Method::TRACE => 7,
        Method::CONNECT => 8,
        _ => 9,
    }
}

/// Who produced a response: the app, or spillway itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseSource {
    /// The upstream answered; its status is passed through.
    Upstream = 0,
    /// spillway generated the response (an error or a shed).
    Proxy = 1,
}

impl ResponseSource {
    /// The `source` label value.
    pub fn label(self) -> &'static str {
        match self {
            ResponseSource::Upstream => "upstream",
            ResponseSource::Proxy => "proxy",
        }
    }
}

/// All metric families of one process.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    duration: HistogramVec,
    upstream_errors: IntCounterVec,
    in_flight: IntGaugeVec,
    shed: IntCounterVec,
    concurrency_limit: IntGaugeVec,
    breaker_state: IntGaugeVec,
    retries: IntCounterVec,
    reloads: IntCounterVec,
    /// 1 if the last reload succeeded, else 0.
    pub last_reload_successful: IntGauge,
    tls_handshake_errors: IntCounterVec,
    open_connections: IntGaugeVec,
    connections_refused: IntCounterVec,
    /// Memory pressure level.
    pub memory_pressure: IntGauge,
    /// Memory limit in force.
    pub memory_limit_bytes: IntGauge,
    /// Resident memory.
    pub memory_resident_bytes: IntGauge,
}

impl Metrics {
    /// Creates and registers every family in a fresh registry.
    pub fn new() -> Self {
        let registry = Registry::new();
        fn reg<C: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: C) -> C {
            r.register(Box::new(c.clone()))
                .expect("metric names are unique");
            c
        }
        let counter = |name: &str, help: &str, labels: &[&str]| {
            reg(
                &registry,
                IntCounterVec::new(Opts::new(name, help), labels).expect("valid"),
            )
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            reg(
                &registry,
                IntGaugeVec::new(Opts::new(name, help), labels).expect("valid"),
            )
        };
        let requests = counter(
            REQUESTS_TOTAL,
            "Responses sent, by route, method, status code and source (upstream or proxy).",
            &["route", "method", "code", "source"],
        );
        let duration = reg(
            &registry,
            HistogramVec::new(
                HistogramOpts::new(
                    REQUEST_DURATION,
                    "Time from request received to response body finished, by route and code.",
                )
                .buckets(DURATION_BUCKETS.to_vec()),
                &["route", "code"],
            )
            .expect("valid"),
        );
        let upstream_errors = counter(
            UPSTREAM_ERRORS_TOTAL,
            "Failures talking to the upstream, by route and kind (the Proxy-Status error type).",
            &["route", "kind"],
        );
        let in_flight = gauge(IN_FLIGHT, "Requests in flight, by route.", &["route"]);
        let build_info = gauge(
            BUILD_INFO,
            "Always 1; labelled with the spillway version.",
            &["version"],
        );
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let shed = counter(
            SHED_TOTAL,
            "Requests refused on purpose, by route, reason and priority (the request's class).",
            &["route", "reason", "priority"],
        );
        let concurrency_limit = gauge(
            CONCURRENCY_LIMIT,
            "Current concurrency limit, by route.",
            &["route"],
        );
        let breaker_state = gauge(
            BREAKER_STATE,
            "Circuit breaker state by route: 0 closed, 1 half-open, 2 open.",
            &["route"],
        );
        let retries = counter(
            RETRIES_TOTAL,
            "Retries sent to the upstream, by route.",
            &["route"],
        );
        let reloads = counter(
            CONFIG_RELOADS_TOTAL,
            "Config reloads by result.",
            &["result"],
        );
        let last_reload_successful = reg(
            &registry,
            IntGauge::new(
                CONFIG_LAST_RELOAD_SUCCESSFUL,
                "1 if the last config reload succeeded, else 0.",
            )
            .expect("valid"),
        );
        last_reload_successful.set(1);
        for result in ["success", "failure"] {
            reloads.with_label_values(&[result]);
        }
        let tls_handshake_errors = counter(
            TLS_HANDSHAKE_ERRORS_TOTAL,
            "Failed TLS handshakes on a listener.",
            &["listener"],
        );
        let open_connections = gauge(
            OPEN_CONNECTIONS,
            "Open client connections, by listener.",
            &["listener"],
        );
        let connections_refused = counter(
            CONNECTIONS_REFUSED_TOTAL,
            "Client connections refused at accept (max_connections reached, or memory pressure), by listener.",
            &["listener"],
        );
        let memory_pressure = reg(
            &registry,
            IntGauge::new(
                MEMORY_PRESSURE,
                "Memory pressure: 0 ok, 1 above limits.memory_soft, 2 above limits.memory_hard.",
            )
            .expect("valid"),
        );
        let memory_limit_bytes = reg(
            &registry,
            IntGauge::new(
                MEMORY_LIMIT_BYTES,
                "The memory limit spillway sheds against, in bytes (0: none).",
            )
            .expect("valid"),
        );
        let memory_resident_bytes = reg(
            &registry,
            IntGauge::new(
                MEMORY_RESIDENT_BYTES,
                "spillway's resident memory in bytes, read every 100 ms.",
            )
            .expect("valid"),
        );
        Metrics {
            registry,
            memory_resident_bytes,
            memory_pressure,
            memory_limit_bytes,
            open_connections,
            connections_refused,
            requests,
            duration,
            upstream_errors,
            in_flight,
            shed,
            concurrency_limit,
            breaker_state,
            retries,
            reloads,
            last_reload_successful,
            tls_handshake_errors,
        }
    }

    /// The registry, for `/metrics`.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Renders the Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        let encoder = prometheus::TextEncoder::new();
        // Encoding into a String cannot fail for well-formed families.
        let _ = encoder.encode_utf8(&self.registry.gather(), &mut out);
        out
    }

    /// Resolves every handle of one route. Cheap enough to call for each route on each reload;
    /// the same route name yields the same underlying series, so counts carry across reloads.
    pub fn route(&self, route: &str) -> Arc<RouteMetrics> {
        let r = [route];
        Arc::new(RouteMetrics {
            name: route.into(),
            requests: std::array::from_fn(|_| [CodeTable::default(), CodeTable::default()]),
            duration: CodeTable::default(),
            upstream_errors: UpstreamError::ALL
                .map(|k| self.upstream_errors.with_label_values(&[route, k.kind()])),
            shed: ShedReason::ALL.map(|s| {
                Priority::ALL.map(|p| self.shed.with_label_values(&[route, s.label(), p.label()]))
            }),
            in_flight: self.in_flight.with_label_values(&r),
            concurrency_limit: self.concurrency_limit.with_label_values(&r),
            breaker_state: self.breaker_state.with_label_values(&r),
            retries: self.retries.with_label_values(&r),
            families: self.clone(),
        })
    }

    /// Counts a config reload.
    pub fn reload(&self, ok: bool) {
        self.reloads
            .with_label_values(&[if ok { "success" } else { "failure" }])
            .inc();
        self.last_reload_successful.set(i64::from(ok));
    }

    /// The connection handles of one listener (resolved once, when it starts).
    pub fn listener(&self, listener: &str) -> ListenerMetrics {
        ListenerMetrics {
            open: self.open_connections.with_label_values(&[listener]),
            refused: self.connections_refused.with_label_values(&[listener]),
        }
    }

    /// The handshake error counter of one listener.
    pub fn tls_handshake_errors(&self, listener: &str) -> IntCounter {
        self.tls_handshake_errors.with_label_values(&[listener])
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The connection metrics of one listener.
#[derive(Clone)]
pub struct ListenerMetrics {
    /// Open client connections.
    pub open: IntGauge,
    /// Connections refused at accept.
    pub refused: IntCounter,
}

/// Lowest and highest status code with a pre-sized slot; others (rare) are looked up by label.
const FIRST_CODE: u16 = 100;
const CODES: usize = 500;

/// Lazily resolved handles indexed by status code: the slot array is only allocated once a
/// route actually sees that method/source, and each handle once per code.
struct CodeTable<T> {
    slots: OnceLock<Box<[OnceLock<T>]>>,
}

impl<T> Default for CodeTable<T> {
    fn default() -> Self {
        CodeTable {
            slots: OnceLock::new(),
        }
    }
}

impl<T: Clone> CodeTable<T> {
    fn get(&self, code: u16, resolve: impl FnOnce() -> T) -> T {
        let idx = usize::from(code.wrapping_sub(FIRST_CODE));
        if idx >= CODES {
            return resolve();
        }
        let slots = self
            .slots
            .get_or_init(|| (0..CODES).map(|_| OnceLock::new()).collect());
        slots[idx].get_or_init(resolve).clone()
    }
}

/// Every metric handle of one route.
pub struct RouteMetrics {
    name: Arc<str>,
    requests: [[CodeTable<IntCounter>; 2]; METHODS.len()],
    duration: CodeTable<Histogram>,
    upstream_errors: [IntCounter; UpstreamError::ALL.len()],
    /// By reason (in [`ShedReason::ALL`] order), then by priority ([`Priority::index`]).
    shed: [[IntCounter; Priority::ALL.len()]; ShedReason::ALL.len()],
    /// Requests in flight on this route.
    pub in_flight: IntGauge,
    /// Current concurrency limit.
    pub concurrency_limit: IntGauge,
    /// Breaker state gauge.
    pub breaker_state: IntGauge,
    /// Retries counter.
    pub retries: IntCounter,
    families: Metrics,
}

impl RouteMetrics {
    /// The route's name (the `route` label).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Counts one response and observes its duration.
    pub fn response(&self, method: &Method, code: u16, source: ResponseSource, seconds: f64) {
        let m = method_index(method);
        let text = CodeText::new(code);
        let code_str = text.as_str();
        self.requests[m][source as usize]
            .get(code, || {
                self.families.requests.with_label_values(&[
                    &self.name,
                    METHODS[m],
                    code_str,
                    source.label(),
                ])
            })
            .inc();
        self.duration
            .get(code, || {
                self.families
                    .duration
                    .with_label_values(&[&self.name, code_str])
            })
            .observe(seconds);
    }

    /// Counts one upstream failure.
    pub fn upstream_error(&self, e: UpstreamError) {
        let i = UpstreamError::ALL.iter().position(|k| *k == e).unwrap_or(0);
        self.upstream_errors[i].inc();
    }

    /// Counts one shed request of class `priority`.
    pub fn shed(&self, reason: ShedReason, priority: Priority) {
        let i = ShedReason::ALL
            .iter()
            .position(|k| *k == reason)
            .unwrap_or(0);
        self.shed[i][priority.index()].inc();
    }
}

/// A status code as label text without allocating (hyper allows codes up to 999).
struct CodeText([u8; 3]);

impl CodeText {
    fn new(code: u16) -> Self {
        let c = code.min(999);
        CodeText([
            b'0' + (c / 100) as u8,
            b'0' + (c / 10 % 10) as u8,
            b'0' + (c % 10) as u8,
        ])
    }

    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or("000")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_route_method_code_source() {
        let m = Metrics::new();
        let r = m.route("api");
        r.response(&Method::GET, 200, ResponseSource::Upstream, 0.01);
        r.response(&Method::GET, 200, ResponseSource::Upstream, 0.01);
        r.response(
            &Method::from_bytes(b"BREW").unwrap(),
            502,
            ResponseSource::Proxy,
            0.01,
        );
        let text = m.render();
        assert!(text.contains(
            r#"spillway_requests_total{code="200",method="GET",route="api",source="upstream"} 2"#
        ), "{text}");
        assert!(text.contains(
            r#"spillway_requests_total{code="502",method="OTHER",route="api",source="proxy"} 1"#
        ));
        assert!(
            text.contains(r#"spillway_request_duration_seconds_count{code="200",route="api"} 2"#)
        );
        assert!(text.contains(r#"spillway_build_info{version=""#));
    }

    #[test]
    fn sheds_are_counted_by_reason_and_priority_from_handles_resolved_up_front() {
        let m = Metrics::new();
        let r = m.route("api");
        // Every (reason, priority) series exists at 0 before the first shed.
        let text = m.render();
        for reason in ShedReason::ALL {
            for p in Priority::ALL {
                let series = format!(
                    r#"spillway_shed_total{{priority="{}",reason="{}",route="api"}} 0"#,
                    p.label(),
                    reason.label()
                );
                assert!(text.contains(&series), "{series} missing:\n{text}");
            }
        }
        r.shed(ShedReason::ConcurrencyLimit, Priority::Sheddable);
        r.shed(ShedReason::ConcurrencyLimit, Priority::Sheddable);
        r.shed(ShedReason::QueueTimeout, Priority::Critical);
        let text = m.render();
        assert!(text.contains(
            r#"spillway_shed_total{priority="sheddable",reason="concurrency_limit",route="api"} 2"#
        ));
        assert!(text.contains(
            r#"spillway_shed_total{priority="critical",reason="queue_timeout",route="api"} 1"#
        ));
        assert!(text.contains(
            r#"spillway_shed_total{priority="normal",reason="concurrency_limit",route="api"} 0"#
        ));
    }

    #[test]
    fn same_route_name_shares_series_across_rebuilds() {
        let m = Metrics::new();
        m.route("a")
            .response(&Method::GET, 204, ResponseSource::Upstream, 0.0);
        m.route("a")
            .response(&Method::GET, 204, ResponseSource::Upstream, 0.0);
        assert!(m.render().contains(
            r#"spillway_requests_total{code="204",method="GET",route="a",source="upstream"} 2"#
        ));
    }
}
