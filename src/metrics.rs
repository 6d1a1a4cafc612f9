//! Prometheus metrics: names declared once, one explicit registry per process (never the global
//! one, so tests can run several proxies side by side), and per-route handles resolved when the
//! runtime is built so the request path never looks a series up by its labels.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::Method;
use prometheus::{
    Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry,
};

use crate::config::Priority;
use crate::error::{ShedReason, UpstreamError};

/// Counter: every response, by route, method, code and source (`upstream` or `proxy`).
pub const REQUESTS_TOTAL: &str = "spillway_requests_total";
/// Histogram: request duration (until the response body ended), by route and code.
pub const REQUEST_DURATION: &str = "spillway_request_duration_seconds";
/// Histogram: time to the upstream's response head, by route; upstream answers only.
pub const UPSTREAM_DURATION: &str = "spillway_upstream_duration_seconds";
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
/// Gauge: always 1, labelled with the version (hash) of the config serving.
pub const CONFIG_INFO: &str = "spillway_config_info";
/// Gauge: when the serving config was loaded (at start, or by the last successful reload), in
/// seconds since the Unix epoch.
pub const CONFIG_LAST_RELOAD_TIMESTAMP: &str = "spillway_config_last_reload_timestamp_seconds";
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

/// Latency buckets in seconds, shared by every route: 100 µs to 1 ms where a sidecar's own
/// overhead and a fast app's answers show, then a 1–2.5–5 step per decade up to 30 s, the
/// default route timeout. Each route adds its own `timeout` ([`route_buckets`]), so a request
/// the timeout cut lands exactly on a boundary instead of being smeared across the bucket
/// above it. 17 boundaries, at most 18 per route: every series of the two duration families
/// costs that many bucket lines.
pub const DURATION_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];

/// How late the route timeout's 504 may be counted and still be observed at exactly the
/// timeout: the timer fires a little after its deadline (timer resolution, a busy runtime). A
/// 504 later than this waited in the route's queue before its timeout started, and is observed
/// at its real duration.
pub const TIMEOUT_SLACK: Duration = Duration::from_millis(50);

/// The bucket boundaries of a route with this `timeout`: [`DURATION_BUCKETS`] and the timeout
/// itself, in order (once, if it is already one of them). `None`: the shared set alone.
pub fn route_buckets(timeout: Option<Duration>) -> Vec<f64> {
    let mut buckets = DURATION_BUCKETS.to_vec();
    if let Some(t) = timeout.map(|t| t.as_secs_f64()).filter(|t| *t > 0.0) {
        if !buckets.iter().any(|b| (b - t).abs() < 1e-9) {
            let at = buckets.partition_point(|b| *b < t);
            buckets.insert(at, t);
        }
    }
    buckets
}

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
    /// The two duration histograms of each route, by route name: their buckets differ per
    /// route (each has its timeout as a boundary), so each route has its own collectors.
    histograms: Arc<Mutex<HashMap<String, RouteHistograms>>>,
    upstream_errors: IntCounterVec,
    in_flight: IntGaugeVec,
    shed: IntCounterVec,
    concurrency_limit: IntGaugeVec,
    breaker_state: IntGaugeVec,
    retries: IntCounterVec,
    reloads: IntCounterVec,
    /// 1 if the last reload succeeded, else 0.
    pub last_reload_successful: IntGauge,
    config_info: IntGaugeVec,
    /// The version `config_info` names.
    config_version: Arc<Mutex<Option<String>>>,
    config_loaded_at: Gauge,
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
        let config_info = gauge(
            CONFIG_INFO,
            "Always 1; labelled with the version (hash) of the config serving.",
            &["version"],
        );
        let config_loaded_at = reg(
            &registry,
            Gauge::new(
                CONFIG_LAST_RELOAD_TIMESTAMP,
                "When the serving config was loaded (start or last successful reload), in Unix seconds.",
            )
            .expect("valid"),
        );
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
            histograms: Arc::default(),
            upstream_errors,
            in_flight,
            shed,
            concurrency_limit,
            breaker_state,
            retries,
            reloads,
            last_reload_successful,
            config_info,
            config_version: Arc::default(),
            config_loaded_at,
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

    /// Resolves every handle of one route whose `timeout` is unknown here (`unmatched`, tests):
    /// the route's duration histograms as they are, or with the shared buckets if it has none.
    pub fn route(&self, route: &str) -> Arc<RouteMetrics> {
        self.resolve(route, None)
    }

    /// Resolves every handle of one route with this `timeout`, which becomes one of its
    /// duration buckets. Cheap enough to call for each route on each reload; the same route
    /// name yields the same underlying series, so counts carry across reloads. A reload that
    /// changes the timeout changes the buckets: the route's two duration histograms then start
    /// over (Prometheus reads that as a counter reset).
    pub fn route_with_timeout(&self, route: &str, timeout: Duration) -> Arc<RouteMetrics> {
        self.resolve(route, Some(timeout))
    }

    fn resolve(&self, route: &str, timeout: Option<Duration>) -> Arc<RouteMetrics> {
        let r = [route];
        let histograms = self.histograms(route, timeout);
        Arc::new(RouteMetrics {
            name: route.into(),
            timeout,
            requests: std::array::from_fn(|_| [CodeTable::default(), CodeTable::default()]),
            duration: CodeTable::default(),
            duration_family: histograms.duration,
            upstream_duration: histograms.upstream,
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

    /// The duration histograms of `route`: kept while their buckets stay the same (or when no
    /// timeout is given), else replaced by new ones registered in the old ones' place.
    fn histograms(&self, route: &str, timeout: Option<Duration>) -> RouteHistograms {
        let mut all = self.histograms.lock().unwrap_or_else(|p| p.into_inner());
        let buckets = route_buckets(timeout);
        if let Some(existing) = all.get(route) {
            if timeout.is_none() || existing.buckets == buckets {
                return existing.clone();
            }
            let _ = self
                .registry
                .unregister(Box::new(existing.duration.clone()));
            let _ = self
                .registry
                .unregister(Box::new(existing.upstream.clone()));
        }
        let opts = |name: &str, help: &str| {
            HistogramOpts::new(name, help)
                .const_label("route", route)
                .buckets(buckets.clone())
        };
        let duration = HistogramVec::new(
            opts(
                REQUEST_DURATION,
                "Time from request received to response body finished, by route and code.",
            ),
            &["code"],
        )
        .expect("valid");
        let upstream = Histogram::with_opts(opts(
            UPSTREAM_DURATION,
            "Time from sending a request to the upstream's response head, by route; upstream answers only.",
        ))
        .expect("valid");
        self.registry
            .register(Box::new(duration.clone()))
            .expect("one duration histogram per route");
        self.registry
            .register(Box::new(upstream.clone()))
            .expect("one upstream histogram per route");
        let made = RouteHistograms {
            buckets,
            duration,
            upstream,
        };
        all.insert(route.to_owned(), made.clone());
        made
    }

    /// Records the config now serving: `spillway_config_info{version}` names it alone, and
    /// `spillway_config_last_reload_timestamp_seconds` is `at`.
    pub fn config_loaded(&self, version: &str, at: SystemTime) {
        // The new series first, then the old one goes: a scrape in between never finds none.
        self.config_info.with_label_values(&[version]).set(1);
        let mut serving = self
            .config_version
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(old) = serving.replace(version.to_owned()) {
            if old != version {
                let _ = self.config_info.remove_label_values(&[&old]);
            }
        }
        self.config_loaded_at.set(
            at.duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
        );
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

/// The two duration histograms of one route and the buckets they were made with.
#[derive(Clone)]
struct RouteHistograms {
    buckets: Vec<f64>,
    duration: HistogramVec,
    upstream: Histogram,
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
    /// The route's timeout, a boundary of its duration buckets.
    timeout: Option<Duration>,
    requests: [[CodeTable<IntCounter>; 2]; METHODS.len()],
    duration: CodeTable<Histogram>,
    duration_family: HistogramVec,
    /// Time to the upstream's response head, observed once per upstream answer.
    pub upstream_duration: Histogram,
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
            .get(code, || self.duration_family.with_label_values(&[code_str]))
            .observe(seconds);
    }

    /// The duration to observe for a response that took `elapsed`: itself, except for the
    /// route timeout's 504 (`error` is its kind) within [`TIMEOUT_SLACK`] of the timeout,
    /// which is observed at exactly the timeout, a bucket boundary.
    pub fn observed_seconds(&self, elapsed: Duration, code: u16, error: Option<&str>) -> f64 {
        if let (504, Some(timeout), Some(kind)) = (code, self.timeout, error) {
            if elapsed >= timeout
                && elapsed <= timeout + TIMEOUT_SLACK
                && kind == UpstreamError::ResponseTimeout.kind()
            {
                return timeout.as_secs_f64();
            }
        }
        elapsed.as_secs_f64()
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

    /// The `le` values of one route's `spillway_request_duration_seconds` series, in order.
    fn bounds(text: &str, route: &str) -> Vec<String> {
        text.lines()
            .filter(|l| l.starts_with(&format!("{REQUEST_DURATION}_bucket{{")))
            .filter(|l| l.contains(&format!("route=\"{route}\"")))
            .filter_map(|l| {
                l.split("le=\"")
                    .nth(1)?
                    .split('"')
                    .next()
                    .map(str::to_owned)
            })
            .collect()
    }

    #[test]
    fn buckets_start_at_100_microseconds_and_hold_the_route_timeout() {
        assert_eq!(DURATION_BUCKETS.first(), Some(&0.0001));
        assert!(DURATION_BUCKETS.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(route_buckets(None), DURATION_BUCKETS);
        let b = route_buckets(Some(Duration::from_millis(1500)));
        assert_eq!(b.len(), DURATION_BUCKETS.len() + 1);
        assert!(b.windows(2).all(|w| w[0] < w[1]), "{b:?}");
        assert!(b.contains(&1.5));
        // A timeout that is already a boundary is not added twice.
        assert_eq!(
            route_buckets(Some(Duration::from_secs(1))),
            DURATION_BUCKETS
        );
        assert_eq!(
            route_buckets(Some(Duration::from_secs(60))).last(),
            Some(&60.0)
        );
    }

    #[test]
    fn each_route_has_its_timeout_as_a_boundary() {
        let m = Metrics::new();
        let a = m.route_with_timeout("a", Duration::from_millis(1500));
        let b = m.route_with_timeout("b", Duration::from_millis(700));
        a.response(&Method::GET, 200, ResponseSource::Upstream, 0.01);
        b.response(&Method::GET, 200, ResponseSource::Upstream, 0.01);
        a.upstream_duration.observe(0.01);
        let text = m.render();
        let a_bounds = bounds(&text, "a");
        assert!(a_bounds.contains(&"1.5".to_owned()), "{a_bounds:?}");
        assert!(!a_bounds.contains(&"0.7".to_owned()));
        assert!(bounds(&text, "b").contains(&"0.7".to_owned()));
        assert_eq!(a_bounds.len(), DURATION_BUCKETS.len() + 2, "+Inf too");
        assert!(
            text.contains(r#"spillway_upstream_duration_seconds_bucket{route="a",le="1.5"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"spillway_upstream_duration_seconds_count{route="b"} 0"#));
    }

    #[test]
    fn a_changed_timeout_replaces_the_histograms_and_an_unchanged_one_keeps_them() {
        let m = Metrics::new();
        let first = m.route_with_timeout("a", Duration::from_secs(2));
        first.response(&Method::GET, 200, ResponseSource::Upstream, 0.01);
        // Same timeout (a reload that changed something else): the counts go on.
        let same = m.route_with_timeout("a", Duration::from_secs(2));
        same.response(&Method::GET, 200, ResponseSource::Upstream, 0.01);
        assert!(m
            .render()
            .contains(r#"spillway_request_duration_seconds_count{code="200",route="a"} 2"#));
        // `unmatched`-style resolution keeps whatever the route has.
        m.route("a");
        assert!(bounds(&m.render(), "a").contains(&"2".to_owned()));
        // A new timeout: new buckets, new series (exactly one set of them).
        let changed = m.route_with_timeout("a", Duration::from_secs(3));
        changed.response(&Method::GET, 200, ResponseSource::Upstream, 0.01);
        let text = m.render();
        let b = bounds(&text, "a");
        assert!(
            b.contains(&"3".to_owned()) && !b.contains(&"2".to_owned()),
            "{b:?}"
        );
        assert!(text.contains(r#"spillway_request_duration_seconds_count{code="200",route="a"} 1"#));
    }

    #[test]
    fn the_timeouts_504_lands_on_the_timeout_unless_it_queued_first() {
        let m = Metrics::new();
        let r = m.route_with_timeout("a", Duration::from_secs(1));
        let timeout = Some(UpstreamError::ResponseTimeout.kind());
        let late = Duration::from_millis(1003);
        assert_eq!(r.observed_seconds(late, 504, timeout), 1.0);
        // Queued first: its real duration.
        let queued = Duration::from_millis(1200);
        assert_eq!(r.observed_seconds(queued, 504, timeout), 1.2);
        // Other 504s (connect timeout), and other codes, as measured.
        assert_eq!(
            r.observed_seconds(late, 504, Some(UpstreamError::ConnectTimeout.kind())),
            1.003
        );
        assert_eq!(r.observed_seconds(late, 200, None), 1.003);
        // A route without a known timeout.
        assert_eq!(m.route("u").observed_seconds(late, 504, timeout), 1.003);
    }

    #[test]
    fn config_info_names_only_the_version_serving() {
        let m = Metrics::new();
        let at = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        m.config_loaded("aaaa", at);
        m.config_loaded("bbbb", at + Duration::from_secs(5));
        let text = m.render();
        assert!(
            text.contains(r#"spillway_config_info{version="bbbb"} 1"#),
            "{text}"
        );
        assert!(!text.contains(r#"version="aaaa""#));
        assert!(text.contains("spillway_config_last_reload_timestamp_seconds 1700000005"));
    }
}
