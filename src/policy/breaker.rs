//! The circuit breaker: stops sending requests to an upstream that fails most of them, and lets
//! a few probes through after a pause to find out whether it recovered.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use pin_project_lite::pin_project;
use prometheus::IntGauge;
use tokio::time::Instant;
use tower::{Layer, Service};
use tracing::{info, warn};

use super::window::SlidingWindow;
use crate::config::settings::BreakerSettings;
use crate::error::{retry_after_secs, ProxyError, ShedReason};

/// `Retry-After` for requests refused while the half-open probes are out: the probes answer
/// within about one request's time, so the breaker is decided soon.
const HALF_OPEN_RETRY_AFTER: Duration = Duration::from_secs(1);

/// The breaker's position, as shown on the status page and in spillway_circuit_breaker_state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    /// Requests flow; outcomes are counted.
    Closed,
    /// A few probes are let through; the rest are refused.
    HalfOpen,
    /// Everything is refused.
    Open,
}

impl CircuitState {
    /// The gauge value: 0 closed, 1 half-open, 2 open.
    pub fn gauge_value(self) -> i64 {
        match self {
            CircuitState::Closed => 0,
            CircuitState::HalfOpen => 1,
            CircuitState::Open => 2,
        }
    }
}

/// The shared state of one route's breaker. Create one per route and keep it across reloads
/// while the settings stay equal.
#[derive(Debug)]
pub struct BreakerState {
    route: String,
    settings: BreakerSettings,
    probes: u32,
    shared: Mutex<Shared>,
    state_gauge: IntGauge,
}

#[derive(Debug)]
struct Shared {
    mode: Mode,
    /// Bumped on every transition, so that an outcome is only applied to the state its request
    /// was admitted under (a slow request from before the breaker opened does not count as a
    /// probe, nor an old probe's answer after it re-opened).
    epoch: u64,
    /// Requests (`total`) and failures (`marked`) while closed.
    window: SlidingWindow,
}

#[derive(Debug, Clone, Copy)]
enum Mode {
    Closed,
    Open { until: Instant },
    HalfOpen { admitted: u32, succeeded: u32 },
}

/// How a request admitted by the breaker ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Success,
    Failure,
    /// Not an answer from the upstream (shed further in, or abandoned).
    NotCounted,
}

impl BreakerState {
    /// A closed breaker for route `route_name` (named in its log lines), keeping `state_gauge`
    /// (spillway_circuit_breaker_state for the route) up to date.
    pub fn new(route_name: &str, settings: &BreakerSettings, state_gauge: IntGauge) -> Self {
        state_gauge.set(CircuitState::Closed.gauge_value());
        BreakerState {
            route: route_name.to_owned(),
            settings: settings.clone(),
            // Zero probes could never close the breaker again.
            probes: settings.half_open_requests.max(1),
            shared: Mutex::new(Shared { mode: Mode::Closed, epoch: 0, window: SlidingWindow::new(settings.window) }),
            state_gauge,
        }
    }

    /// Where the breaker stands now. An open breaker whose `open_for` has passed reports
    /// half-open: the next request will be a probe.
    pub fn state(&self) -> CircuitState {
        match self.lock().mode {
            Mode::Closed => CircuitState::Closed,
            Mode::Open { until } if Instant::now() < until => CircuitState::Open,
            Mode::Open { .. } | Mode::HalfOpen { .. } => CircuitState::HalfOpen,
        }
    }

    /// Whether the breaker is enabled at all.
    pub fn enabled(&self) -> bool {
        self.settings.enabled
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        // Nothing panics under the lock; a poisoned one still holds consistent counts.
        self.shared.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn admit(self: &Arc<Self>) -> Result<Admission, ProxyError> {
        let now = Instant::now();
        let mut shared = self.lock();
        if let Mode::Open { until } = shared.mode {
            if now < until {
                let retry_after = Duration::from_secs(retry_after_secs(until - now));
                return Err(ProxyError::Shed { reason: ShedReason::CircuitOpen, retry_after });
            }
            shared.mode = Mode::HalfOpen { admitted: 0, succeeded: 0 };
            shared.epoch += 1;
            self.state_gauge.set(CircuitState::HalfOpen.gauge_value());
            info!(route = %self.route, probes = self.probes, "circuit breaker half-open, probing the upstream");
        }
        let epoch = shared.epoch;
        let probe = match &mut shared.mode {
            Mode::Closed => false,
            Mode::HalfOpen { admitted, .. } if *admitted < self.probes => {
                *admitted += 1;
                true
            }
            Mode::HalfOpen { .. } | Mode::Open { .. } => {
                return Err(ProxyError::Shed { reason: ShedReason::CircuitOpen, retry_after: HALF_OPEN_RETRY_AFTER });
            }
        };
        Ok(Admission { state: self.clone(), epoch, probe, settled: false })
    }

    fn verdict<RB>(&self, result: &Result<Response<RB>, ProxyError>) -> Verdict {
        match result {
            Ok(resp) if self.settings.failure_codes.contains(&resp.status().as_u16()) => Verdict::Failure,
            Ok(_) => Verdict::Success,
            Err(ProxyError::Upstream(_)) => Verdict::Failure,
            Err(_) => Verdict::NotCounted,
        }
    }

    fn settle(&self, epoch: u64, probe: bool, verdict: Verdict) {
        let now = Instant::now();
        let mut shared = self.lock();
        if shared.epoch != epoch {
            return;
        }
        let shared = &mut *shared;
        match (&mut shared.mode, probe, verdict) {
            (_, _, Verdict::NotCounted) => {
                if let (Mode::HalfOpen { admitted, .. }, true) = (&mut shared.mode, probe) {
                    // The probe never reached the upstream: its slot goes to the next request.
                    *admitted -= 1;
                }
            }
            (Mode::Closed, false, verdict) => {
                let failed = verdict == Verdict::Failure;
                shared.window.add(now, 1, u64::from(failed));
                if !failed {
                    return;
                }
                let counts = shared.window.counts(now);
                let ratio = counts.marked as f64 / counts.total as f64;
                if counts.total >= u64::from(self.settings.min_requests) && ratio >= self.settings.failure_ratio {
                    shared.mode = Mode::Open { until: now + self.settings.open_for };
                    shared.epoch += 1;
                    self.state_gauge.set(CircuitState::Open.gauge_value());
                    warn!(
                        route = %self.route,
                        failures = counts.marked,
                        requests = counts.total,
                        open_for = ?self.settings.open_for,
                        "circuit breaker opened"
                    );
                }
            }
            (Mode::HalfOpen { succeeded, .. }, true, Verdict::Success) => {
                *succeeded += 1;
                if *succeeded >= self.probes {
                    shared.mode = Mode::Closed;
                    shared.epoch += 1;
                    shared.window.reset();
                    self.state_gauge.set(CircuitState::Closed.gauge_value());
                    info!(route = %self.route, "circuit breaker closed, the upstream recovered");
                }
            }
            (Mode::HalfOpen { .. }, true, Verdict::Failure) => {
                shared.mode = Mode::Open { until: now + self.settings.open_for };
                shared.epoch += 1;
                self.state_gauge.set(CircuitState::Open.gauge_value());
                warn!(
                    route = %self.route,
                    open_for = ?self.settings.open_for,
                    "circuit breaker re-opened, a probe failed"
                );
            }
            // The epoch matches, so the request was admitted under the current mode; other
            // combinations cannot occur.
            _ => {}
        }
    }
}

/// A request let through by the breaker; reports "not counted" if dropped unanswered, which
/// gives a probe's slot back.
#[derive(Debug)]
struct Admission {
    state: Arc<BreakerState>,
    epoch: u64,
    probe: bool,
    settled: bool,
}

impl Admission {
    fn settle(mut self, verdict: Verdict) {
        self.settled = true;
        self.state.settle(self.epoch, self.probe, verdict);
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        if !self.settled {
            self.state.settle(self.epoch, self.probe, Verdict::NotCounted);
        }
    }
}

/// Builds [`CircuitBreaker`] services sharing one [`BreakerState`].
#[derive(Debug, Clone)]
pub struct CircuitBreakerLayer {
    state: Arc<BreakerState>,
}

impl CircuitBreakerLayer {
    /// A layer guarded by `state`.
    pub fn new(state: Arc<BreakerState>) -> Self {
        CircuitBreakerLayer { state }
    }
}

impl<S> Layer<S> for CircuitBreakerLayer {
    type Service = CircuitBreaker<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CircuitBreaker { inner, state: self.state.clone() }
    }
}

/// Counts upstream failures (`Err(Upstream(_))` and responses with a `failure_codes` status)
/// over a sliding window; opens when at least `min_requests` were seen and the failure ratio
/// reaches `failure_ratio`. Open: refuses with `Shed { CircuitOpen }` without calling the inner
/// service. After `open_for`: lets `half_open_requests` probes through; all succeeding closes
/// it, any failing re-opens it. Disabled: passes everything through untouched.
#[derive(Debug, Clone)]
pub struct CircuitBreaker<S> {
    inner: S,
    state: Arc<BreakerState>,
}

impl<S, B, RB> Service<Request<B>> for CircuitBreaker<S>
where
    S: Service<Request<B>, Response = Response<RB>, Error = ProxyError>,
{
    type Response = Response<RB>;
    type Error = ProxyError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        if !self.state.settings.enabled {
            return ResponseFuture::admitted(self.inner.call(req), None);
        }
        match self.state.admit() {
            Ok(admission) => ResponseFuture::admitted(self.inner.call(req), Some(admission)),
            Err(error) => ResponseFuture::refused(error),
        }
    }
}

pin_project! {
    /// Future of [`CircuitBreaker`]: the refusal, or the inner future whose outcome is counted.
    pub struct ResponseFuture<F> {
        #[pin]
        state: State<F>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        // The breaker is open (or the probes are out).
        Refused { error: ProxyError },
        // Let through; `admission` is `None` when the breaker is disabled (nothing to count).
        Admitted { #[pin] future: F, admission: Option<Admission> },
    }
}

impl<F> ResponseFuture<F> {
    fn refused(error: ProxyError) -> Self {
        ResponseFuture { state: State::Refused { error } }
    }

    fn admitted(future: F, admission: Option<Admission>) -> Self {
        ResponseFuture { state: State::Admitted { future, admission } }
    }
}

impl<F, RB> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<RB>, ProxyError>>,
{
    type Output = Result<Response<RB>, ProxyError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Refused { error } => Poll::Ready(Err(*error)),
            StateProj::Admitted { future, admission } => {
                let result = ready!(future.poll(cx));
                if let Some(admission) = admission.take() {
                    let verdict = admission.state.verdict(&result);
                    admission.settle(verdict);
                }
                Poll::Ready(result)
            }
        }
    }
}
