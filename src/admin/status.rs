//! The admin status page: `GET /` is one self-contained HTML page (inline CSS and JS, nothing
//! fetched from elsewhere) and `GET /status.json` is what it shows, one object per route.
//!
//! The JSON holds cumulative counts only (plus the live limiter and breaker state); the page
//! polls it every 2 s and turns the difference between the newest sample and one up to 10 s
//! older into rates, shares and a p99 over that interval, the way Prometheus' `rate()` and
//! `histogram_quantile()` would. So the server keeps no history and every sample is cheap: one
//! registry gather and a few locks.
//!
//! Everything here except [`snapshot`] is a pure function of its arguments, so the JSON can be
//! tested without a server.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus::proto::{Metric, MetricFamily};
use serde::Serialize;

use crate::config::settings::{HostMatch, LimitSettings};
use crate::metrics::{
    CONFIG_LAST_RELOAD_SUCCESSFUL, CONFIG_RELOADS_TOTAL, CONNECTIONS_REFUSED_TOTAL, IN_FLIGHT,
    MEMORY_LIMIT_BYTES, MEMORY_PRESSURE, MEMORY_RESIDENT_BYTES, OPEN_CONNECTIONS, REQUESTS_TOTAL,
    REQUEST_DURATION, RETRIES_TOTAL, SHED_TOTAL, UNMATCHED_ROUTE, UPSTREAM_DURATION,
    UPSTREAM_ERRORS_TOTAL,
};
use crate::policy::CircuitState;
use crate::proxy::Runtime;
use crate::reload::ReloadFailure;
use crate::shared::ProcessState;

/// The page template. The server puts the first sample into it, so the page shows the routes
/// at once (and without JavaScript).
const PAGE_TEMPLATE: &str = include_str!("status.html");

/// Where [`page`] puts the first sample (inside a `<script type="application/json">`).
const INITIAL_MARK: &str = "__SPILLWAY_INITIAL_STATUS__";

/// Where [`page`] puts the server-rendered table rows.
const ROWS_MARK: &str = "<!--__SPILLWAY_ROWS__-->";

/// The `Content-Security-Policy` of the page: it may run its own inline script and style and
/// fetch from its own origin, nothing else.
pub(crate) const PAGE_CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// Everything the status page shows, as of one moment.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct Status {
    /// The `server_id` of the config serving.
    pub server_id: String,
    /// The spillway version.
    pub build_version: &'static str,
    /// Version hash of the config serving.
    pub config_version: String,
    /// When the config serving was loaded (RFC 3339, UTC).
    pub config_loaded_at: String,
    /// When this sample was taken, in milliseconds since the Unix epoch: the page divides
    /// count differences by the difference of these.
    pub sampled_at_ms: u64,
    /// False while draining (`/readyz` answers 503).
    pub ready: bool,
    /// Config reloads.
    pub reload: ReloadStatus,
    /// spillway's own memory and client connections.
    pub process: ProcessStatus,
    /// One entry per route in match order, then `unmatched` when any request matched no route.
    pub routes: Vec<RouteStatus>,
}

/// spillway protecting itself: its memory against its limit, and its client connections.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct ProcessStatus {
    /// Resident memory, in bytes.
    pub memory_resident_bytes: u64,
    /// The limit it sheds against (0: none).
    pub memory_limit_bytes: u64,
    /// 0 ok, 1 above the soft mark, 2 above the hard mark.
    pub memory_pressure: u8,
    /// Per listener: open connections, and connections refused at accept since start.
    pub listeners: BTreeMap<String, ListenerStatus>,
}

/// One listener's connections.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub(crate) struct ListenerStatus {
    /// Open now.
    pub open: u64,
    /// Refused at accept since start.
    pub refused: u64,
}

/// How config reloads went.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct ReloadStatus {
    /// Whether the last reload succeeded (true before any reload).
    pub last_successful: bool,
    /// Successful reloads since start.
    pub successes: u64,
    /// Refused reloads since start.
    pub failures: u64,
    /// The last refused reload since start, with its error lines (kept after a later success).
    pub last_error: Option<ReloadFailure>,
}

/// One route's counts and live policy state.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct RouteStatus {
    /// The route name (the `route` label).
    pub name: String,
    /// What it matches, e.g. `shop.example.com/checkout [GET, POST]`; empty for `unmatched`.
    pub matcher: String,
    /// The upstream it forwards to; empty for `unmatched`.
    pub upstream: String,
    /// Responses since start by source and status class.
    pub requests: Requests,
    /// Request durations since start, every status.
    pub latency: Latency,
    /// Durations of 2xx responses since start: what the page's p99 is computed from, as the
    /// dashboard's latency panel (sheds and failures do not pull it down).
    pub latency_2xx: Latency,
    /// Time to the upstream's response head since start, its answers only
    /// (`spillway_upstream_duration_seconds`): the app's own latency.
    pub upstream_latency: Latency,
    /// Requests being served now (`spillway_in_flight_requests`, streaming bodies included).
    pub in_flight: u64,
    /// The concurrency limiter; `None` for `unmatched`.
    pub limiter: Option<LimiterStatus>,
    /// `closed`, `half_open`, `open`, or `disabled` (also for `unmatched`).
    pub breaker: &'static str,
    /// Whether the route is in maintenance mode (every request refused on purpose).
    pub maintenance: bool,
    /// Requests refused on purpose since start, by reason (every reason, zeros included).
    pub shed: BTreeMap<&'static str, u64>,
    /// The same refusals by the class of the request refused (every class, zeros included).
    pub shed_by_priority: BTreeMap<&'static str, u64>,
    /// Retries sent since start.
    pub retries: u64,
    /// Failures talking to the upstream since start, by kind (only kinds that happened).
    pub upstream_errors: BTreeMap<String, u64>,
}

/// The concurrency limiter of a route, as it stands now.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct LimiterStatus {
    /// Requests holding a slot (sent to the upstream, response head not yet back).
    pub in_flight: u32,
    /// The current limit.
    pub limit: u32,
    /// Requests waiting in the queue.
    pub queued: u32,
    /// Whether the limit adapts to measured latency.
    pub adaptive: bool,
}

/// Responses by who produced them.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub(crate) struct Requests {
    /// Every response.
    pub total: u64,
    /// Responses the upstream produced (its status passed through).
    pub upstream: Classes,
    /// Responses spillway produced (errors and refusals).
    pub proxy: Classes,
    /// spillway's deliberate refusals: its 503s (load shed, open breaker, maintenance, memory).
    pub shed: u64,
    /// spillway's failures to get an answer from the app: its 502s and 504s.
    pub failed: u64,
}

/// Response counts by status class.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub(crate) struct Classes {
    /// 1xx.
    #[serde(rename = "1xx")]
    pub informational: u64,
    /// 2xx.
    #[serde(rename = "2xx")]
    pub success: u64,
    /// 3xx.
    #[serde(rename = "3xx")]
    pub redirection: u64,
    /// 4xx.
    #[serde(rename = "4xx")]
    pub client_error: u64,
    /// 5xx.
    #[serde(rename = "5xx")]
    pub server_error: u64,
}

impl Classes {
    fn add(&mut self, code: &str, n: u64) {
        let slot = match code.as_bytes().first() {
            Some(b'1') => &mut self.informational,
            Some(b'2') => &mut self.success,
            Some(b'3') => &mut self.redirection,
            Some(b'4') => &mut self.client_error,
            Some(b'5') => &mut self.server_error,
            // Codes 600-999 (hyper allows them) count in the total only.
            _ => return,
        };
        *slot += n;
    }
}

/// A route's duration histogram, all codes together.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub(crate) struct Latency {
    /// Observations.
    pub count: u64,
    /// Sum of observed seconds.
    pub sum: f64,
    /// Finite upper bounds of the buckets, in seconds, ascending.
    pub bounds: Vec<f64>,
    /// Cumulative count per finite bound (`count` is the `+Inf` bucket).
    pub cumulative: Vec<u64>,
    /// The 99th percentile since start, estimated like `histogram_quantile(0.99, …)`; `None`
    /// before the first request.
    pub p99_seconds: Option<f64>,
}

/// Takes a sample of a running spillway; `last_failure` is its reloader's last refused reload.
pub(crate) fn snapshot(state: &ProcessState, last_failure: Option<ReloadFailure>) -> Status {
    let runtime = state.runtime.load();
    let families = state.metrics.registry().gather();
    let mut status = build(
        &runtime,
        &families,
        state.ready.load(std::sync::atomic::Ordering::SeqCst),
        SystemTime::now(),
    );
    status.reload.last_error = last_failure;
    status
}

/// Builds a sample from the runtime snapshot (routes, limiter and breaker state) and gathered
/// metric families. Series of routes that a reload removed are left out.
pub(crate) fn build(
    runtime: &Runtime,
    families: &[MetricFamily],
    ready: bool,
    now: SystemTime,
) -> Status {
    let index = Index::new(families);
    let mut routes: Vec<RouteStatus> = runtime
        .routes
        .iter()
        .map(|r| {
            let name = r.settings.name.as_str();
            let limiter = &r.policy.limiter;
            let breaker = &r.policy.breaker;
            let mut status = index.route(name);
            status.matcher = describe_match(&r.settings.matcher);
            status.upstream = r.settings.upstream.clone();
            status.limiter = Some(LimiterStatus {
                in_flight: limiter.in_flight(),
                limit: limiter.limit(),
                queued: limiter.queued(),
                adaptive: matches!(
                    r.policy.settings.concurrency.limit,
                    LimitSettings::Adaptive { .. }
                ),
            });
            status.breaker = if breaker.enabled() {
                breaker_label(breaker.state())
            } else {
                "disabled"
            };
            status.maintenance = r.policy.settings.maintenance.enabled;
            status
        })
        .collect();
    // A configured route may be called `unmatched` too; then its row already holds the series.
    if !routes.iter().any(|r| r.name == UNMATCHED_ROUTE) {
        let unmatched = index.route(UNMATCHED_ROUTE);
        if unmatched.requests.total > 0 || unmatched.in_flight > 0 {
            routes.push(unmatched);
        }
    }
    Status {
        server_id: runtime.settings.server_id.clone(),
        build_version: env!("CARGO_PKG_VERSION"),
        config_version: runtime.version.clone(),
        config_loaded_at: humantime::format_rfc3339_seconds(runtime.loaded_at).to_string(),
        sampled_at_ms: now
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        ready,
        reload: ReloadStatus {
            last_successful: index.gauge(CONFIG_LAST_RELOAD_SUCCESSFUL, None) != Some(0.0),
            successes: index.counter_where(CONFIG_RELOADS_TOTAL, "result", "success"),
            failures: index.counter_where(CONFIG_RELOADS_TOTAL, "result", "failure"),
            last_error: None,
        },
        process: index.process(),
        routes,
    }
}

/// The status page with `status` as its first sample.
pub(crate) fn page(status: &Status) -> String {
    PAGE_TEMPLATE
        .replacen(INITIAL_MARK, &json_for_script(status), 1)
        .replacen(ROWS_MARK, &server_rows(status), 1)
}

/// `status` as JSON that is safe inside a `<script>` element: `<`, `>` and `&` (which JSON only
/// has inside strings) become `\u003c`, `\u003e`, `\u0026`, so no `</script>` or `<!--` can
/// appear.
fn json_for_script(status: &Status) -> String {
    let json = serde_json::to_string(status).unwrap_or_else(|_| "null".to_owned());
    let mut out = String::with_capacity(json.len() + 64);
    for c in json.chars() {
        match c {
            '<' => out.push_str("\\u003c"),
            '>' => out.push_str("\\u003e"),
            '&' => out.push_str("\\u0026"),
            c => out.push(c),
        }
    }
    out
}

/// Plain table rows for the first paint (and for a browser without JavaScript): the script
/// replaces them with the full rows as soon as it runs.
fn server_rows(status: &Status) -> String {
    let mut out = String::new();
    for r in &status.routes {
        let limit = match &r.limiter {
            Some(l) => format!("{} / {}", l.in_flight, l.limit),
            None => "—".to_owned(),
        };
        out.push_str(&format!(
            "<tr class=\"route\" data-route=\"{name}\"><td class=\"name\">{name}<div class=\"sub\">{matcher}</div></td>\
             <td>—</td><td>{total} since start</td><td class=\"num\">{shed} since start</td><td class=\"num\">{failed} since start</td>\
             <td>{p99}</td><td>{limit}</td><td>{breaker}</td></tr>\n",
            name = escape_html(&r.name),
            matcher = escape_html(&r.matcher),
            total = r.requests.total,
            shed = r.requests.shed,
            failed = r.requests.failed,
            p99 = r.latency_2xx.p99_seconds.map(format_seconds).unwrap_or_else(|| "—".to_owned()),
            breaker = r.breaker,
        ));
    }
    out
}

fn escape_html(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn format_seconds(s: f64) -> String {
    if s < 1.0 {
        format!("{:.1} ms", s * 1000.0)
    } else {
        format!("{s:.2} s")
    }
}

fn breaker_label(state: CircuitState) -> &'static str {
    match state {
        CircuitState::Closed => "closed",
        CircuitState::HalfOpen => "half_open",
        CircuitState::Open => "open",
    }
}

fn describe_match(m: &crate::config::settings::MatchSettings) -> String {
    let host = match &m.host {
        None => String::new(),
        Some(HostMatch::Exact(h)) => h.clone(),
        Some(HostMatch::Suffix(s)) => format!("*{s}"),
    };
    let mut out = format!("{host}{}", m.path_prefix);
    if !m.methods.is_empty() {
        out.push_str(&format!(" [{}]", m.methods.join(", ")));
    }
    out
}

/// Estimates quantile `q` (0..=1) from cumulative bucket counts the way Prometheus'
/// `histogram_quantile` does: find the bucket holding rank `q × count` and interpolate linearly
/// inside it (the first bucket starts at 0). A rank in the `+Inf` bucket yields the highest
/// finite bound. `None` when there are no observations.
pub(crate) fn quantile(q: f64, bounds: &[f64], cumulative: &[u64], count: u64) -> Option<f64> {
    if count == 0 || bounds.is_empty() || bounds.len() != cumulative.len() {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * count as f64;
    let mut lower_bound = 0.0;
    let mut lower_count = 0u64;
    for (&bound, &cum) in bounds.iter().zip(cumulative) {
        if cum as f64 >= rank && cum > lower_count {
            let in_bucket = (cum - lower_count) as f64;
            return Some(
                lower_bound + (bound - lower_bound) * ((rank - lower_count as f64) / in_bucket),
            );
        }
        if cum > lower_count {
            lower_count = cum;
        }
        lower_bound = bound;
    }
    bounds.last().copied()
}

/// The gathered families, looked up by name.
struct Index<'a> {
    families: BTreeMap<&'a str, &'a MetricFamily>,
}

fn label<'m>(m: &'m Metric, name: &str) -> Option<&'m str> {
    m.get_label()
        .iter()
        .find(|l| l.name() == name)
        .map(|l| l.value())
}

impl<'a> Index<'a> {
    fn new(families: &'a [MetricFamily]) -> Self {
        Index {
            families: families.iter().map(|f| (f.name(), f)).collect(),
        }
    }

    fn metrics(&self, family: &str) -> &'a [Metric] {
        self.families
            .get(family)
            .map(|f| f.get_metric())
            .unwrap_or(&[])
    }

    /// Metrics of `family` whose label `key` is `value`.
    fn with_label<'s>(
        &'s self,
        family: &str,
        key: &'s str,
        value: &'s str,
    ) -> impl Iterator<Item = &'a Metric> + 's {
        self.metrics(family)
            .iter()
            .filter(move |m| label(m, key) == Some(value))
    }

    fn counter_where(&self, family: &str, key: &str, value: &str) -> u64 {
        self.with_label(family, key, value)
            .map(|m| m.get_counter().get_value() as u64)
            .sum()
    }

    fn gauge(&self, family: &str, route: Option<&str>) -> Option<f64> {
        self.metrics(family)
            .iter()
            .find(|m| route.map_or(true, |r| label(m, "route") == Some(r)))
            .map(|m| m.get_gauge().get_value())
    }

    /// Memory and connections.
    fn process(&self) -> ProcessStatus {
        let gauge = |family: &str| self.gauge(family, None).unwrap_or(0.0).max(0.0);
        let mut listeners: BTreeMap<String, ListenerStatus> = BTreeMap::new();
        for m in self.metrics(OPEN_CONNECTIONS) {
            let name = label(m, "listener").unwrap_or("").to_owned();
            listeners.entry(name).or_default().open = m.get_gauge().get_value().max(0.0) as u64;
        }
        for m in self.metrics(CONNECTIONS_REFUSED_TOTAL) {
            let name = label(m, "listener").unwrap_or("").to_owned();
            listeners.entry(name).or_default().refused = m.get_counter().get_value() as u64;
        }
        ProcessStatus {
            memory_resident_bytes: gauge(MEMORY_RESIDENT_BYTES) as u64,
            memory_limit_bytes: gauge(MEMORY_LIMIT_BYTES) as u64,
            memory_pressure: gauge(MEMORY_PRESSURE) as u8,
            listeners,
        }
    }

    /// The series of a duration histogram `family` of one route that `keep` selects, added up
    /// (a route's series all have its buckets), with their p99 since start.
    fn latency(&self, family: &str, route: &str, keep: impl Fn(&Metric) -> bool) -> Latency {
        let mut latency = Latency::default();
        for m in self.with_label(family, "route", route).filter(|m| keep(m)) {
            let h = m.get_histogram();
            latency.count += h.get_sample_count();
            latency.sum += h.get_sample_sum();
            let buckets = h
                .get_bucket()
                .iter()
                .filter(|b| b.upper_bound().is_finite());
            if latency.bounds.is_empty() {
                latency.bounds = buckets.clone().map(|b| b.upper_bound()).collect();
                latency.cumulative = vec![0; latency.bounds.len()];
            }
            // A route's series share its buckets; skip any that would not line up.
            if buckets.clone().count() == latency.bounds.len() {
                for (slot, b) in latency.cumulative.iter_mut().zip(buckets) {
                    *slot += b.cumulative_count();
                }
            }
        }
        latency.p99_seconds = quantile(0.99, &latency.bounds, &latency.cumulative, latency.count);
        latency
    }

    /// Every count of one route; the policy fields are filled in by the caller.
    fn route(&self, route: &str) -> RouteStatus {
        let mut requests = Requests::default();
        for m in self.with_label(REQUESTS_TOTAL, "route", route) {
            let n = m.get_counter().get_value() as u64;
            let code = label(m, "code").unwrap_or("");
            requests.total += n;
            match label(m, "source") {
                Some("proxy") => {
                    requests.proxy.add(code, n);
                    match code {
                        "503" => requests.shed += n,
                        "502" | "504" => requests.failed += n,
                        _ => {}
                    }
                }
                _ => requests.upstream.add(code, n),
            }
        }
        let latency = self.latency(REQUEST_DURATION, route, |_| true);
        let latency_2xx = self.latency(REQUEST_DURATION, route, |m| {
            label(m, "code").is_some_and(|c| c.starts_with('2'))
        });
        let upstream_latency = self.latency(UPSTREAM_DURATION, route, |_| true);
        let shed = crate::error::ShedReason::ALL
            .iter()
            .map(|reason| {
                let n = self
                    .with_label(SHED_TOTAL, "route", route)
                    .filter(|m| label(m, "reason") == Some(reason.label()))
                    .map(|m| m.get_counter().get_value() as u64)
                    .sum();
                (reason.label(), n)
            })
            .collect();
        let shed_by_priority = crate::config::Priority::ALL
            .iter()
            .map(|p| {
                let n = self
                    .with_label(SHED_TOTAL, "route", route)
                    .filter(|m| label(m, "priority") == Some(p.label()))
                    .map(|m| m.get_counter().get_value() as u64)
                    .sum();
                (p.label(), n)
            })
            .collect();
        let mut upstream_errors = BTreeMap::new();
        for m in self.with_label(UPSTREAM_ERRORS_TOTAL, "route", route) {
            let n = m.get_counter().get_value() as u64;
            if n > 0 {
                *upstream_errors
                    .entry(label(m, "kind").unwrap_or("unknown").to_owned())
                    .or_insert(0) += n;
            }
        }
        RouteStatus {
            name: route.to_owned(),
            matcher: String::new(),
            upstream: String::new(),
            requests,
            latency,
            latency_2xx,
            upstream_latency,
            in_flight: self
                .gauge(IN_FLIGHT, Some(route))
                .map(|v| v.max(0.0) as u64)
                .unwrap_or(0),
            limiter: None,
            breaker: "disabled",
            maintenance: false,
            shed,
            shed_by_priority,
            retries: self.counter_where(RETRIES_TOTAL, "route", route),
            upstream_errors,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Priority;
    use crate::error::{ShedReason, UpstreamError};
    use crate::metrics::{Metrics, ResponseSource};
    use http::Method;

    const YAML: &str = "server_id: status-test\n\
        listeners:\n  - name: http\n    address: 127.0.0.1:0\n\
        admin:\n  address: 127.0.0.1:0\n\
        upstreams:\n  app:\n    endpoints: [\"127.0.0.1:1\"]\n\
        routes:\n\
        \x20 - name: api\n    match: { path_prefix: /api, host: \"*.example.com\", methods: [GET, POST] }\n    upstream: app\n\
        \x20   concurrency: { adaptive: { min: 2, max: 50 }, queue: 3 }\n\
        \x20   circuit_breaker: { enabled: true }\n\
        \x20 - name: web\n    match: { path_prefix: / }\n    upstream: app\n    concurrency: { max: 7 }\n";

    fn runtime(metrics: &Metrics) -> Runtime {
        let loaded = crate::config::load_str(YAML).expect("test config is valid");
        Runtime::build(&loaded, metrics, None)
    }

    fn at(ms: u64) -> SystemTime {
        UNIX_EPOCH + std::time::Duration::from_millis(ms)
    }

    fn route<'s>(s: &'s Status, name: &str) -> &'s RouteStatus {
        s.routes
            .iter()
            .find(|r| r.name == name)
            .unwrap_or_else(|| panic!("no row {name}: {s:?}"))
    }

    #[test]
    fn one_row_per_route_in_match_order_with_policy_state() {
        let metrics = Metrics::new();
        let rt = runtime(&metrics);
        let s = build(
            &rt,
            &metrics.registry().gather(),
            true,
            at(1_700_000_000_123),
        );
        assert_eq!(s.server_id, "status-test");
        assert_eq!(s.sampled_at_ms, 1_700_000_000_123);
        assert!(s.ready);
        assert_eq!(s.config_version, rt.version);
        let names: Vec<_> = s.routes.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            ["api", "web"],
            "no unmatched row before any unmatched request"
        );
        let api = route(&s, "api");
        assert_eq!(api.matcher, "*.example.com/api [GET, POST]");
        assert_eq!(api.upstream, "app");
        assert_eq!(api.breaker, "closed");
        assert_eq!(
            api.limiter,
            Some(LimiterStatus {
                in_flight: 0,
                limit: 2,
                queued: 0,
                adaptive: true
            })
        );
        let web = route(&s, "web");
        assert_eq!(web.matcher, "/");
        assert_eq!(web.breaker, "disabled");
        assert_eq!(
            web.limiter,
            Some(LimiterStatus {
                in_flight: 0,
                limit: 7,
                queued: 0,
                adaptive: false
            })
        );
        assert_eq!(web.requests, Requests::default());
        assert_eq!(web.latency.p99_seconds, None);
        assert_eq!(
            web.shed.len(),
            ShedReason::ALL.len(),
            "every reason listed, zeros included"
        );
        assert!(web.shed.values().all(|&n| n == 0));
        assert_eq!(
            web.shed_by_priority.keys().copied().collect::<Vec<_>>(),
            ["critical", "normal", "sheddable"],
            "every class listed, zeros included"
        );
        assert_eq!(
            s.reload,
            ReloadStatus {
                last_successful: true,
                successes: 0,
                failures: 0,
                last_error: None,
            }
        );
    }

    #[test]
    fn counts_split_by_route_source_and_class() {
        let metrics = Metrics::new();
        let rt = runtime(&metrics);
        let api = metrics.route("api");
        for _ in 0..97 {
            api.response(&Method::GET, 200, ResponseSource::Upstream, 0.002);
        }
        api.response(&Method::POST, 404, ResponseSource::Upstream, 0.002);
        api.response(&Method::GET, 500, ResponseSource::Upstream, 0.004);
        api.response(&Method::GET, 502, ResponseSource::Proxy, 0.001);
        api.response(&Method::GET, 503, ResponseSource::Proxy, 0.0001);
        api.shed(ShedReason::ConcurrencyLimit, Priority::Sheddable);
        api.shed(ShedReason::QueueTimeout, Priority::Sheddable);
        api.shed(ShedReason::QueueTimeout, Priority::Critical);
        api.upstream_error(UpstreamError::ALL[0]);
        api.retries.inc();
        metrics
            .route(UNMATCHED_ROUTE)
            .response(&Method::GET, 404, ResponseSource::Proxy, 0.0001);
        metrics.reload(false);
        metrics.reload(true);
        metrics.reload(false);

        let s = build(&rt, &metrics.registry().gather(), false, at(0));
        assert!(!s.ready);
        let r = route(&s, "api");
        assert_eq!(r.requests.total, 101);
        assert_eq!(
            r.requests.upstream,
            Classes {
                success: 97,
                client_error: 1,
                server_error: 1,
                ..Classes::default()
            }
        );
        assert_eq!(
            r.requests.proxy,
            Classes {
                server_error: 2,
                ..Classes::default()
            }
        );
        // The 503 was a shed, the 502 a failure: different columns on the page.
        assert_eq!((r.requests.shed, r.requests.failed), (1, 1));
        assert_eq!(r.latency.count, 101);
        assert_eq!(r.latency.cumulative.len(), r.latency.bounds.len());
        let p99 = r.latency.p99_seconds.expect("observations");
        // Rank 99.99 of 101 falls in the (1 ms, 2.5 ms] bucket, where 98 of them are.
        assert!(p99 > 0.001 && p99 <= 0.0025, "p99 {p99}");
        // The page's p99 is of the 97 2xx only: the fast shed and failure do not pull it down.
        assert_eq!(r.latency_2xx.count, 97);
        let p99_2xx = r.latency_2xx.p99_seconds.expect("2xx observations");
        assert!(p99_2xx > 0.001 && p99_2xx <= 0.0025, "p99 {p99_2xx}");
        assert_eq!(
            r.upstream_latency.count, 0,
            "no upstream answers observed here"
        );
        assert_eq!(r.shed["concurrency_limit"], 1);
        assert_eq!(r.shed["queue_timeout"], 2);
        assert_eq!(r.shed["circuit_open"], 0);
        assert_eq!(r.shed_by_priority["sheddable"], 2);
        assert_eq!(r.shed_by_priority["critical"], 1);
        assert_eq!(r.shed_by_priority["normal"], 0);
        assert_eq!(
            r.upstream_errors.get(UpstreamError::ALL[0].kind()),
            Some(&1)
        );
        assert_eq!(
            r.upstream_errors.len(),
            1,
            "kinds that never happened are left out"
        );
        assert_eq!(r.retries, 1);
        assert_eq!(
            route(&s, "web").requests.total,
            0,
            "counts stay with their route"
        );

        let unmatched = s.routes.last().expect("rows");
        assert_eq!(unmatched.name, UNMATCHED_ROUTE);
        assert_eq!(unmatched.requests.proxy.client_error, 1);
        assert_eq!(unmatched.limiter, None);

        assert_eq!(
            s.reload,
            ReloadStatus {
                last_successful: false,
                successes: 1,
                failures: 2,
                last_error: None,
            }
        );
    }

    /// The measured case from the issue: a route with a 1 s timeout whose 504s came a few
    /// milliseconds late. They land on the route's own 1 s boundary, so the p99 cannot read
    /// above the timeout (it read 2.27 s when they fell into (1, 2.5]); the 2xx p99 the page
    /// shows is the app's answers alone.
    #[test]
    fn the_p99_of_a_route_that_times_out_never_reads_above_its_timeout() {
        let metrics = Metrics::new();
        let rt = runtime(&metrics);
        let api = metrics.route_with_timeout("api", std::time::Duration::from_secs(1));
        for _ in 0..90 {
            api.response(&Method::GET, 200, ResponseSource::Upstream, 0.004);
        }
        let late = std::time::Duration::from_millis(1_004);
        let timeout = Some(UpstreamError::ResponseTimeout.kind());
        for _ in 0..10 {
            let seconds = api.observed_seconds(late, 504, timeout);
            api.response(&Method::GET, 504, ResponseSource::Proxy, seconds);
        }
        let s = build(&rt, &metrics.registry().gather(), true, at(0));
        let r = route(&s, "api");
        let p99 = r.latency.p99_seconds.unwrap();
        assert!(p99 > 0.5 && p99 <= 1.0, "p99 of every response {p99}");
        let p99_2xx = r.latency_2xx.p99_seconds.unwrap();
        assert!(p99_2xx > 0.0025 && p99_2xx <= 0.005, "p99 of 2xx {p99_2xx}");
        assert_eq!((r.requests.failed, r.requests.shed), (10, 0));
    }

    #[test]
    fn routes_removed_by_a_reload_are_left_out() {
        let metrics = Metrics::new();
        let rt = runtime(&metrics);
        metrics
            .route("gone")
            .response(&Method::GET, 200, ResponseSource::Upstream, 0.01);
        let s = build(&rt, &metrics.registry().gather(), true, at(0));
        assert!(s.routes.iter().all(|r| r.name != "gone"));
    }

    #[test]
    fn quantile_interpolates_like_prometheus() {
        let bounds = [0.1, 0.2, 0.4];
        // 50 in (0, 0.1], 40 in (0.1, 0.2], 10 in (0.2, 0.4].
        let cum = [50, 90, 100];
        assert_eq!(quantile(0.5, &bounds, &cum, 100), Some(0.1));
        let p = quantile(0.7, &bounds, &cum, 100).unwrap();
        assert!((p - 0.15).abs() < 1e-9, "{p}");
        let p = quantile(0.99, &bounds, &cum, 100).unwrap();
        assert!((p - 0.38).abs() < 1e-9, "{p}");
        // Ranks beyond the last finite bucket yield the highest finite bound.
        assert_eq!(quantile(0.99, &bounds, &[0, 0, 1], 10), Some(0.4));
        assert_eq!(quantile(0.99, &bounds, &[0, 0, 0], 0), None);
        assert_eq!(quantile(0.5, &[], &[], 3), None);
        // Empty leading buckets are skipped, not interpolated into.
        let p = quantile(0.5, &bounds, &[0, 0, 4], 4).unwrap();
        assert!((p - 0.3).abs() < 1e-9, "{p}");
    }

    #[test]
    fn page_embeds_the_sample_safely_and_loads_nothing_from_elsewhere() {
        let metrics = Metrics::new();
        let rt = runtime(&metrics);
        let mut s = build(&rt, &metrics.registry().gather(), true, at(0));
        s.server_id = "x</script><script>alert(1)</script>&".into();
        let html = page(&s);
        assert!(!html.contains(INITIAL_MARK) && !html.contains(ROWS_MARK));
        assert!(
            !html.contains("<script>alert"),
            "script end tag escaped in the embedded JSON"
        );
        assert_eq!(
            html.matches("</script>").count(),
            html.matches("<script").count()
        );
        assert!(html.contains(r#"data-route="api""#) && html.contains(r#"data-route="web""#));
        let lower = html.to_ascii_lowercase();
        for external in ["http://", "https://", "src=", "<link", "@import", "url("] {
            assert!(
                !lower.contains(external),
                "page must be self-contained, found {external}"
            );
        }
        // The embedded JSON parses back to the same sample.
        let start = html.find("id=\"initial\"").unwrap();
        let body_start = start + html[start..].find('>').unwrap() + 1;
        let body_end = body_start + html[body_start..].find("</script>").unwrap();
        let v: serde_json::Value = serde_json::from_str(&html[body_start..body_end]).unwrap();
        assert_eq!(v["server_id"], "x</script><script>alert(1)</script>&");
        assert_eq!(v["routes"][0]["name"], "api");
    }

    #[test]
    fn json_shape_is_what_the_page_reads() {
        let metrics = Metrics::new();
        let rt = runtime(&metrics);
        metrics
            .route("web")
            .response(&Method::GET, 204, ResponseSource::Upstream, 0.01);
        let v =
            serde_json::to_value(build(&rt, &metrics.registry().gather(), true, at(5))).unwrap();
        // The page's script reads these exact keys.
        for key in [
            "server_id",
            "build_version",
            "config_version",
            "config_loaded_at",
            "sampled_at_ms",
            "ready",
        ] {
            assert!(v.get(key).is_some(), "missing {key}");
        }
        assert_eq!(v["reload"]["last_successful"], true);
        let web = &v["routes"][1];
        assert_eq!(web["requests"]["upstream"]["2xx"], 1);
        assert_eq!(web["requests"]["proxy"]["5xx"], 0);
        assert_eq!(web["latency"]["count"], 1);
        assert_eq!(web["latency_2xx"]["count"], 1);
        assert_eq!(web["upstream_latency"]["count"], 0);
        assert_eq!(web["requests"]["shed"], 0);
        assert_eq!(web["requests"]["failed"], 0);
        assert!(
            v["reload"].get("last_error").is_some(),
            "null until a reload is refused"
        );
        assert!(web["latency"]["bounds"]
            .as_array()
            .unwrap()
            .iter()
            .all(|b| b.is_f64()));
        assert_eq!(web["limiter"]["limit"], 7);
        assert_eq!(web["breaker"], "disabled");
        assert_eq!(web["shed"]["queue_timeout"], 0);
    }
}
