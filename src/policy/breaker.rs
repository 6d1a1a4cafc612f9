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
use crate::config::settings::{BreakerSettings, Priority};
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
            shared: Mutex::new(Shared {
                mode: Mode::Closed,
                epoch: 0,
                window: SlidingWindow::new(settings.window),
            }),
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
        self.shared
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn admit(self: &Arc<Self>, priority: Priority) -> Result<Admission, ProxyError> {
        let mut shared = self.lock();
        if let Mode::Open { until } = shared.mode {
            // The clock is read only here: a closed breaker admits without it.
            let now = Instant::now();
            if now < until {
                let retry_after = Duration::from_secs(retry_after_secs(until - now));
                return Err(ProxyError::Shed {
                    reason: ShedReason::CircuitOpen,
                    retry_after,
                    priority,
                });
            }
            shared.mode = Mode::HalfOpen {
                admitted: 0,
                succeeded: 0,
            };
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
                return Err(ProxyError::Shed {
                    reason: ShedReason::CircuitOpen,
                    retry_after: HALF_OPEN_RETRY_AFTER,
                    priority,
                });
            }
        };
        Ok(Admission {
            state: self.clone(),
            epoch,
            probe,
            settled: false,
        })
    }

    fn verdict<RB>(&self, result: &Result<Response<RB>, ProxyError>) -> Verdict {
        match result {
            Ok(resp)
                if self
                    .settings
                    .failure_codes
                    .contains(&resp.status().as_u16()) =>
            {
                Verdict::Failure
            }
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
                if counts.total >= u64::from(self.settings.min_requests)
                    && ratio >= self.settings.failure_ratio
                {
                    shared.mode = Mode::Open {
                        until: now + self.settings.open_for,
                    };
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
                shared.mode = Mode::Open {
                    until: now + self.settings.open_for,
                };
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
            self.state
                .settle(self.epoch, self.probe, Verdict::NotCounted);
        }
    }
}

/// Builds [`CircuitBreaker`] services sharing one [`BreakerState`].
#[derive(Debug, Clone)]
pub(crate) struct CircuitBreakerLayer {
    state: Arc<BreakerState>,
}

impl CircuitBreakerLayer {
    /// A layer guarded by `state`.
    pub(crate) fn new(state: Arc<BreakerState>) -> Self {
        CircuitBreakerLayer { state }
    }
}

impl<S> Layer<S> for CircuitBreakerLayer {
    type Service = CircuitBreaker<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CircuitBreaker {
            inner,
            state: self.state.clone(),
        }
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
        match self.state.admit(super::priority::of(&req)) {
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
        ResponseFuture {
            state: State::Refused { error },
        }
    }

    fn admitted(future: F, admission: Option<Admission>) -> Self {
        ResponseFuture {
            state: State::Admitted { future, admission },
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::UpstreamError;
    use crate::policy::test_support::{request, CountingService, Manual, Reply};
    use tower::ServiceExt;

    const OPEN_FOR: Duration = Duration::from_secs(5);
    const WINDOW: Duration = Duration::from_secs(10);

    fn settings() -> BreakerSettings {
        BreakerSettings {
            enabled: true,
            window: WINDOW,
            min_requests: 10,
            failure_ratio: 0.5,
            open_for: OPEN_FOR,
            half_open_requests: 2,
            failure_codes: vec![502, 503, 504],
        }
    }

    struct Fixture {
        upstream: CountingService,
        state: Arc<BreakerState>,
        svc: CircuitBreaker<CountingService>,
    }

    fn fixture(settings: BreakerSettings) -> Fixture {
        let upstream = CountingService::ok();
        let gauge = IntGauge::new("spillway_circuit_breaker_state", "state").unwrap();
        let state = Arc::new(BreakerState::new("api", &settings, gauge));
        let svc = CircuitBreakerLayer::new(state.clone()).layer(upstream.clone());
        Fixture {
            upstream,
            state,
            svc,
        }
    }

    impl Fixture {
        async fn send(&self, reply: Reply) -> Result<Response<String>, ProxyError> {
            self.upstream.push(reply);
            self.svc.clone().oneshot(request("GET", "")).await
        }

        /// A request expected to be refused (no reply is scripted for it).
        async fn refused(&self) -> ProxyError {
            self.svc
                .clone()
                .oneshot(request("GET", ""))
                .await
                .unwrap_err()
        }

        fn gauge(&self) -> i64 {
            self.state.state_gauge.get()
        }

        /// Opens the breaker with ten failures.
        async fn trip(&self) {
            for _ in 0..10 {
                let _ = self.send(Reply::status(503)).await;
            }
            assert_eq!(self.state.state(), CircuitState::Open);
        }
    }

    fn open(retry_after_secs: u64) -> ProxyError {
        ProxyError::Shed {
            reason: ShedReason::CircuitOpen,
            retry_after: Duration::from_secs(retry_after_secs),
            priority: Priority::Normal,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn opens_at_min_requests_and_ratio_not_before() {
        let f = fixture(settings());
        for _ in 0..9 {
            assert!(f
                .send(Reply::error(UpstreamError::ConnectRefused))
                .await
                .is_err());
        }
        // Nine failures out of nine, but fewer than min_requests.
        assert_eq!((f.state.state(), f.gauge()), (CircuitState::Closed, 0));
        assert!(f
            .send(Reply::error(UpstreamError::ConnectRefused))
            .await
            .is_err());
        assert_eq!((f.state.state(), f.gauge()), (CircuitState::Open, 2));
        // Refused without reaching the upstream.
        assert_eq!(f.refused().await, open(5));
        assert_eq!(f.upstream.calls(), 10);
    }

    #[tokio::test(start_paused = true)]
    async fn opens_exactly_at_the_failure_ratio() {
        let f = fixture(settings());
        for _ in 0..6 {
            // 500 is not a failure code: the app answered.
            f.send(Reply::status(500)).await.unwrap();
        }
        for _ in 0..5 {
            f.send(Reply::status(502)).await.unwrap();
        }
        // 5 of 11 failed: below one half.
        assert_eq!(f.state.state(), CircuitState::Closed);
        f.send(Reply::status(504)).await.unwrap();
        // 6 of 12.
        assert_eq!(f.state.state(), CircuitState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_counts_down_to_half_open_in_whole_seconds() {
        let f = fixture(settings());
        f.trip().await;
        assert_eq!(f.refused().await, open(5));
        tokio::time::advance(Duration::from_millis(1500)).await;
        assert_eq!(f.refused().await, open(4));
        tokio::time::advance(Duration::from_millis(3400)).await;
        assert_eq!(f.refused().await, open(1));
        assert_eq!(f.upstream.calls(), 10);
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_after_open_for_lets_only_the_probes_through_then_closes() {
        let f = fixture(settings());
        f.trip().await;
        tokio::time::advance(OPEN_FOR - Duration::from_millis(1)).await;
        assert_eq!(f.refused().await, open(1));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(f.state.state(), CircuitState::HalfOpen);

        // Two probes, both slow; a third request meanwhile is refused.
        f.upstream.push(Reply::ok_after(Duration::from_millis(100)));
        f.upstream.push(Reply::ok_after(Duration::from_millis(100)));
        let mut probe1 = Manual::new(f.svc.clone().oneshot(request("GET", "")));
        let mut probe2 = Manual::new(f.svc.clone().oneshot(request("GET", "")));
        assert!(probe1.poll_once().is_none());
        assert!(probe2.poll_once().is_none());
        assert_eq!(f.gauge(), 1);
        assert_eq!(f.refused().await, open(1));
        assert_eq!(f.upstream.calls(), 12);

        tokio::time::advance(Duration::from_millis(100)).await;
        probe1.poll_once().unwrap().unwrap();
        assert_eq!(
            f.state.state(),
            CircuitState::HalfOpen,
            "one probe is not enough"
        );
        probe2.poll_once().unwrap().unwrap();
        assert_eq!((f.state.state(), f.gauge()), (CircuitState::Closed, 0));

        // The window was reset: nine failures now are below min_requests again.
        for _ in 0..9 {
            f.send(Reply::status(503)).await.unwrap();
        }
        assert_eq!(f.state.state(), CircuitState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_reopens_for_open_for() {
        let f = fixture(settings());
        f.trip().await;
        tokio::time::advance(OPEN_FOR).await;
        f.upstream.push(Reply::ok_after(Duration::from_millis(100)));
        let mut slow_probe = Manual::new(f.svc.clone().oneshot(request("GET", "")));
        assert!(slow_probe.poll_once().is_none());
        f.send(Reply::error(UpstreamError::ConnectionTerminated))
            .await
            .unwrap_err();
        assert_eq!((f.state.state(), f.gauge()), (CircuitState::Open, 2));
        assert_eq!(f.refused().await, open(5));
        // The other probe's late success belongs to the previous half-open period.
        tokio::time::advance(Duration::from_millis(100)).await;
        slow_probe.poll_once().unwrap().unwrap();
        assert_eq!(f.state.state(), CircuitState::Open);
        assert_eq!(f.upstream.calls(), 12);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_probe_gives_its_slot_back() {
        let f = fixture(BreakerSettings {
            half_open_requests: 1,
            ..settings()
        });
        f.trip().await;
        tokio::time::advance(OPEN_FOR).await;
        f.upstream.push(Reply::hang());
        let mut probe = Manual::new(f.svc.clone().oneshot(request("GET", "")));
        assert!(probe.poll_once().is_none());
        assert_eq!(f.refused().await, open(1));
        drop(probe);
        f.send(Reply::status(200)).await.unwrap();
        assert_eq!(f.state.state(), CircuitState::Closed);
        assert_eq!(f.upstream.calls(), 12);
    }

    #[tokio::test(start_paused = true)]
    async fn old_failures_slide_out_of_the_window() {
        let f = fixture(settings());
        for _ in 0..9 {
            f.send(Reply::status(503)).await.unwrap();
        }
        tokio::time::advance(WINDOW).await;
        f.send(Reply::status(503)).await.unwrap();
        assert_eq!(
            f.state.state(),
            CircuitState::Closed,
            "the first nine are out of the window"
        );
        for _ in 0..9 {
            f.send(Reply::status(503)).await.unwrap();
        }
        assert_eq!(f.state.state(), CircuitState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn sheds_from_further_in_are_not_counted() {
        let f = fixture(BreakerSettings {
            min_requests: 1,
            ..settings()
        });
        let shed = ProxyError::Shed {
            reason: ShedReason::QueueTimeout,
            retry_after: Duration::from_secs(1),
            priority: Priority::Normal,
        };
        let inner =
            tower::service_fn(
                |_req: Request<String>| async move { Err::<Response<String>, _>(shed) },
            );
        let svc = CircuitBreakerLayer::new(f.state.clone()).layer(inner);
        for _ in 0..5 {
            assert_eq!(
                svc.clone().oneshot(request("GET", "")).await.unwrap_err(),
                shed
            );
        }
        assert_eq!(f.state.state(), CircuitState::Closed);
        assert_eq!(f.state.lock().window.counts(Instant::now()).total, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn disabled_passes_everything_through() {
        let f = fixture(BreakerSettings {
            enabled: false,
            ..settings()
        });
        for _ in 0..30 {
            f.send(Reply::status(503)).await.unwrap();
        }
        assert_eq!((f.state.state(), f.gauge()), (CircuitState::Closed, 0));
        assert_eq!(f.upstream.calls(), 30);
    }
}
