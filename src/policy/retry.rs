//! Retries of requests that are safe to send again, within a budget so that retries can never
//! multiply an outage.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http::{Extensions, HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use pin_project_lite::pin_project;
use prometheus::IntCounter;
use tokio::time::{Instant, Sleep};
use tower::{Layer, Service};

use super::window::SlidingWindow;
use crate::config::settings::RetrySettings;
use crate::error::{ProxyError, UpstreamError};

/// Span of the budget's sliding window: long enough to smooth bursts, short enough that the
/// budget reflects current traffic.
pub(crate) const BUDGET_WINDOW: Duration = Duration::from_secs(10);

/// Slack in the budget comparison, so that float rounding of `budget × requests` (0.29 × 100 =
/// 28.999…) does not refuse a retry the exact rule allows.
const BUDGET_EPSILON: f64 = 1e-9;

/// Largest exponent of the backoff doubling: beyond it the backoff stops growing (and cannot
/// overflow).
const MAX_DOUBLINGS: u32 = 16;

/// The shared state of one route's retries: settings, the budget window, the retry counter.
/// Create one per route and keep it across reloads while the settings stay equal.
#[derive(Debug)]
pub struct RetryState {
    attempts: u32,
    backoff: Duration,
    budget: f64,
    /// Retries allowed in any window whatever the traffic: `min_per_second` × the window.
    floor: f64,
    /// Original requests (`total`) and retries (`marked`) over [`BUDGET_WINDOW`].
    window: Mutex<SlidingWindow>,
    retries: IntCounter,
    jitter: fn(Duration) -> Duration,
}

impl RetryState {
    /// State for `settings`; `retries_counter` (spillway_retries_total for the route) is
    /// incremented once per retry sent.
    pub fn new(settings: &RetrySettings, retries_counter: IntCounter) -> Self {
        RetryState {
            attempts: settings.attempts,
            backoff: settings.backoff,
            budget: settings.budget,
            floor: settings.min_per_second * BUDGET_WINDOW.as_secs_f64(),
            window: Mutex::new(SlidingWindow::new(BUDGET_WINDOW)),
            retries: retries_counter,
            jitter: full_jitter,
        }
    }

    fn lock(&self) -> MutexGuard<'_, SlidingWindow> {
        // Nothing panics under the lock; a poisoned one still holds consistent counts.
        self.window
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Every original request pays into the budget.
    fn deposit(&self) {
        self.lock().add(Instant::now(), 1, 0);
    }

    /// Takes one retry out of the budget if `retries + 1 ≤ floor + budget × requests` over the
    /// window: retries within the floor are always allowed, more need requests to pay for them.
    fn try_withdraw(&self) -> bool {
        let now = Instant::now();
        let mut window = self.lock();
        let counts = window.counts(now);
        let allowed = (counts.marked + 1) as f64
            <= self.floor + self.budget * counts.total as f64 + BUDGET_EPSILON;
        if allowed {
            window.add(now, 0, 1);
        }
        allowed
    }

    /// Delay before retry number `n` (1-based): `backoff × 2^(n-1)`, jittered.
    fn delay(&self, n: u32) -> Duration {
        let doublings = n.saturating_sub(1).min(MAX_DOUBLINGS);
        (self.jitter)(self.backoff.saturating_mul(1 << doublings))
    }

    #[cfg(test)]
    fn with_jitter(mut self, jitter: fn(Duration) -> Duration) -> Self {
        self.jitter = jitter;
        self
    }
}

/// Full jitter: uniform in `[0, d]`, which spreads the retries of many clients that failed
/// together over the whole interval instead of bunching them at its end.
fn full_jitter(d: Duration) -> Duration {
    let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(rand::random_range(0..=nanos))
}

/// Methods whose repetition has the same effect as one request (RFC 9110 §9.2.2): the only
/// ones a retry, or the upstream client's resend after the keep-alive race, may send again.
pub(crate) fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// Whether an outcome is worth another attempt (of an idempotent request without a body, the
/// only kind retried): a failure before the request could reach the app; a connection reset or
/// closed before a response head (`connection_terminated`: for an idempotent request as safe
/// to send again as a refused connect, as nginx's `proxy_next_upstream error` and Envoy's
/// `retry_on: reset` treat it); or the app (or a proxy in front of it) saying it could not
/// serve right now. A response timeout is not retried: the app may still be working on it.
fn is_retryable<RB>(result: &Result<Response<RB>, ProxyError>) -> bool {
    match result {
        Ok(resp) => matches!(
            resp.status(),
            StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT
        ),
        Err(ProxyError::Upstream(e)) => {
            e.is_connect_failure() || *e == UpstreamError::ConnectionTerminated
        }
        Err(_) => false,
    }
}

/// What is needed to send a body-less request again.
#[derive(Debug)]
struct Template {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
    extensions: Extensions,
}

impl Template {
    fn of<B>(req: &Request<B>) -> Self {
        Template {
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            headers: req.headers().clone(),
            extensions: req.extensions().clone(),
        }
    }

    fn build<B: Default>(&self) -> Request<B> {
        let mut req = Request::new(B::default());
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers.clone();
        *req.extensions_mut() = self.extensions.clone();
        req
    }
}

/// Builds [`Retry`] services sharing one [`RetryState`].
#[derive(Debug, Clone)]
pub(crate) struct RetryLayer {
    state: Arc<RetryState>,
}

impl RetryLayer {
    /// A layer retrying within `state`'s settings and budget.
    pub(crate) fn new(state: Arc<RetryState>) -> Self {
        RetryLayer { state }
    }
}

impl<S> Layer<S> for RetryLayer {
    type Service = Retry<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Retry {
            inner,
            state: self.state.clone(),
        }
    }
}

/// Sends an idempotent request with an empty body again (up to `attempts` times, after a
/// jittered exponential backoff) when it failed to connect or got a 502/503/504, as long as the
/// budget allows; otherwise returns the last outcome as it is.
#[derive(Debug, Clone)]
pub struct Retry<S> {
    inner: S,
    state: Arc<RetryState>,
}

impl<S, B, RB> Service<Request<B>> for Retry<S>
where
    S: Service<Request<B>, Response = Response<RB>, Error = ProxyError> + Clone,
    B: http_body::Body + Default,
{
    type Response = Response<RB>;
    type Error = ProxyError;
    type Future = ResponseFuture<S, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        // With retries off there is no budget to keep: skip the window's lock entirely. (A
        // reload that turns retries on builds a fresh state, whose window starts empty.)
        if self.state.attempts > 0 {
            self.state.deposit();
        }
        let replayable =
            self.state.attempts > 0 && is_idempotent(req.method()) && req.body().is_end_stream();
        if !replayable {
            let future = self.inner.call(req);
            return ResponseFuture {
                state: State::Calling { future },
                retry: None,
            };
        }
        let template = Template::of(&req);
        // `self.inner` is the instance that was polled ready: call it, keep a fresh clone
        // (readied again before each retry) for the attempts to come.
        let clone = self.inner.clone();
        let mut service = std::mem::replace(&mut self.inner, clone);
        let future = service.call(req);
        ResponseFuture {
            state: State::Calling { future },
            retry: Some(Retrying {
                service,
                template,
                state: self.state.clone(),
                done: 0,
            }),
        }
    }
}

/// Everything a retryable request carries between attempts.
#[derive(Debug)]
struct Retrying<S> {
    service: S,
    template: Template,
    state: Arc<RetryState>,
    /// Retries sent so far.
    done: u32,
}

pin_project! {
    /// Future of [`Retry`]: the current attempt, the backoff before the next, or the wait for
    /// the inner service to be ready for it.
    pub struct ResponseFuture<S, B>
    where
        S: Service<Request<B>>,
    {
        #[pin]
        state: State<S::Future>,
        retry: Option<Retrying<S>>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Calling { #[pin] future: F },
        Backoff { #[pin] sleep: Sleep },
        Readying,
    }
}

impl<S, B, RB> Future for ResponseFuture<S, B>
where
    S: Service<Request<B>, Response = Response<RB>, Error = ProxyError>,
    B: Default,
{
    type Output = Result<Response<RB>, ProxyError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Calling { future } => {
                    let result = ready!(future.poll(cx));
                    let Some(retry) = this.retry.as_mut() else {
                        return Poll::Ready(result);
                    };
                    // The budget is asked last: it is only spent on a retry that will be sent.
                    if !is_retryable(&result)
                        || retry.done >= retry.state.attempts
                        || !retry.state.try_withdraw()
                    {
                        return Poll::Ready(result);
                    }
                    drop(result);
                    retry.done += 1;
                    retry.state.retries.inc();
                    let delay = retry.state.delay(retry.done);
                    if delay.is_zero() {
                        this.state.set(State::Readying);
                    } else {
                        this.state.set(State::Backoff {
                            sleep: tokio::time::sleep(delay),
                        });
                    }
                }
                StateProj::Backoff { sleep } => {
                    ready!(sleep.poll(cx));
                    this.state.set(State::Readying);
                }
                StateProj::Readying => {
                    let retry = this
                        .retry
                        .as_mut()
                        .expect("only retryable requests get here");
                    ready!(retry.service.poll_ready(cx))?;
                    let future = retry.service.call(retry.template.build());
                    this.state.set(State::Calling { future });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ShedReason;
    use crate::policy::test_support::{request, request_with_id, CountingService, Manual, Reply};
    use tower::ServiceExt;

    const MS: Duration = Duration::from_millis(1);

    struct Fixture {
        upstream: CountingService,
        state: Arc<RetryState>,
        svc: Retry<CountingService>,
    }

    /// Retries with `attempts`, 100 ms base backoff and `budget` (no floor); the jitter always
    /// picks the longest delay so that timings are exact.
    fn fixture(attempts: u32, budget: f64) -> Fixture {
        fixture_with_floor(attempts, budget, 0.0)
    }

    /// [`fixture`] with `min_per_second` retries always allowed.
    fn fixture_with_floor(attempts: u32, budget: f64, min_per_second: f64) -> Fixture {
        let upstream = CountingService::ok();
        let counter = IntCounter::new("spillway_retries_total", "retries").unwrap();
        let settings = RetrySettings {
            attempts,
            backoff: 100 * MS,
            budget,
            min_per_second,
        };
        let state = Arc::new(RetryState::new(&settings, counter).with_jitter(|d| d));
        let svc = RetryLayer::new(state.clone()).layer(upstream.clone());
        Fixture {
            upstream,
            state,
            svc,
        }
    }

    impl Fixture {
        fn retries(&self) -> u64 {
            self.state.retries.get()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retries_a_replayable_request_until_it_succeeds() {
        let f = fixture(2, 10.0);
        f.upstream
            .push(Reply::error(UpstreamError::ConnectRefused))
            .push(Reply::status(503));
        let mut req = request_with_id(7);
        req.extensions_mut().insert(42u32);
        let resp = f.svc.clone().oneshot(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(f.upstream.calls(), 3);
        assert_eq!(
            f.upstream.seen_ids(),
            ["7", "7", "7"],
            "replays carry the headers"
        );
        assert_eq!(f.retries(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn replays_keep_method_uri_and_extensions() {
        let f = fixture(1, 10.0);
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let first = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let inner = {
            let seen = seen.clone();
            tower::service_fn(move |req: Request<String>| {
                let seen = seen.clone();
                let first = first.clone();
                async move {
                    seen.lock().unwrap().push((
                        req.method().clone(),
                        req.uri().clone(),
                        req.version(),
                        req.extensions().get::<u32>().copied(),
                    ));
                    let status = if first.swap(false, std::sync::atomic::Ordering::SeqCst) {
                        502
                    } else {
                        200
                    };
                    let mut resp = Response::new(String::new());
                    *resp.status_mut() = StatusCode::from_u16(status).unwrap();
                    Ok::<_, ProxyError>(resp)
                }
            })
        };
        let svc = RetryLayer::new(f.state.clone()).layer(inner);
        let mut req = request("PUT", "");
        *req.version_mut() = Version::HTTP_2;
        req.extensions_mut().insert(42u32);
        assert_eq!(svc.oneshot(req).await.unwrap().status(), 200);
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[0], seen[1]);
        assert_eq!(seen[1].3, Some(42));
    }

    #[tokio::test(start_paused = true)]
    async fn only_idempotent_methods_with_empty_bodies_are_retried() {
        for (method, body, retried) in [
            ("GET", "", true),
            ("HEAD", "", true),
            ("OPTIONS", "", true),
            ("PUT", "", true),
            ("DELETE", "", true),
            ("TRACE", "", true),
            ("POST", "", false),
            ("PATCH", "", false),
            ("PUT", "payload", false),
        ] {
            let f = fixture(1, 10.0);
            f.upstream.push(Reply::status(503));
            let resp = f.svc.clone().oneshot(request(method, body)).await.unwrap();
            let expected = if retried { 200 } else { 503 };
            assert_eq!(resp.status(), expected, "{method} {body:?}");
            assert_eq!(
                f.upstream.calls(),
                1 + usize::from(retried),
                "{method} {body:?}"
            );
            assert_eq!(f.retries(), u64::from(retried), "{method} {body:?}");
            assert!(f.upstream.seen_methods().iter().all(|m| m == method));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn only_retryable_outcomes_are_retried() {
        let cases: [(Reply, bool); 9] = [
            (Reply::status(502), true),
            (Reply::status(503), true),
            (Reply::status(504), true),
            (Reply::error(UpstreamError::ConnectRefused), true),
            (Reply::error(UpstreamError::ConnectTimeout), true),
            // Reset or closed before any response: an idempotent request may go again.
            (Reply::error(UpstreamError::ConnectionTerminated), true),
            (Reply::status(500), false),
            (Reply::status(429), false),
            // The app may still be working on it.
            (Reply::error(UpstreamError::ResponseTimeout), false),
        ];
        for (reply, retried) in cases {
            let f = fixture(1, 10.0);
            f.upstream.push(reply);
            let result = f.svc.clone().oneshot(request("GET", "")).await;
            assert_eq!(f.upstream.calls(), 1 + usize::from(retried), "{reply:?}");
            assert_eq!(f.retries(), u64::from(retried), "{reply:?}");
            if !retried {
                match (result, reply.outcome) {
                    (Ok(resp), Ok(status)) => assert_eq!(resp.status().as_u16(), status),
                    (Err(e), Err(upstream)) => assert_eq!(e, ProxyError::Upstream(upstream)),
                    other => panic!("{other:?}"),
                }
            }
        }
        // Refusals from further in are not upstream failures.
        let f = fixture(1, 10.0);
        let shed = ProxyError::Shed {
            reason: ShedReason::CircuitOpen,
            retry_after: Duration::from_secs(1),
            priority: crate::config::Priority::Normal,
        };
        let svc = RetryLayer::new(f.state.clone()).layer(tower::service_fn(
            move |_req: Request<String>| async move { Err::<Response<String>, _>(shed) },
        ));
        assert_eq!(svc.oneshot(request("GET", "")).await.unwrap_err(), shed);
        assert_eq!(f.retries(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_doubles_per_attempt_and_the_last_result_is_returned() {
        let f = fixture(3, 10.0);
        f.upstream
            .push(Reply::status(503))
            .push(Reply::status(503))
            .push(Reply::status(503))
            .push(Reply::status(504));
        let mut call = Manual::new(f.svc.clone().oneshot(request("GET", "")));
        assert!(call.poll_once().is_none());
        assert_eq!(f.upstream.calls(), 1);
        // Delays 100, 200, 400 ms (the test jitter takes the full delay).
        for (delay, calls) in [(100, 2), (200, 3), (400, 4)] {
            tokio::time::advance((delay - 1) * MS).await;
            assert!(call.poll_once().is_none());
            assert_eq!(f.upstream.calls(), calls - 1, "not before {delay} ms");
            tokio::time::advance(MS).await;
            let done = call.poll_once();
            assert_eq!(f.upstream.calls(), calls, "after {delay} ms");
            assert_eq!(done.is_some(), calls == 4);
            if let Some(result) = done {
                // Out of attempts: the last response as it is.
                assert_eq!(result.unwrap().status(), 504);
            }
        }
        assert_eq!(f.retries(), 3);
    }

    #[test]
    fn full_jitter_stays_within_the_delay_and_varies() {
        let d = Duration::from_millis(100);
        let samples: Vec<Duration> = (0..1000).map(|_| full_jitter(d)).collect();
        assert!(samples.iter().all(|s| *s <= d));
        assert!(samples.iter().any(|s| *s < d / 4) && samples.iter().any(|s| *s > d * 3 / 4));
        assert_eq!(full_jitter(Duration::ZERO), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_stops_retries_exactly() {
        // retries + 1 ≤ 0.5 × requests: the 2nd, 4th, 6th… request may retry once.
        let f = fixture(1, 0.5);
        let f_always_503 = CountingService::new(Reply::status(503));
        let svc = RetryLayer::new(f.state.clone()).layer(f_always_503.clone());
        let mut expected_calls = 0;
        for n in 1..=6u64 {
            let resp = svc.clone().oneshot(request("GET", "")).await.unwrap();
            assert_eq!(resp.status(), 503);
            expected_calls += if n % 2 == 0 { 2 } else { 1 };
            assert_eq!(f_always_503.calls(), expected_calls, "request {n}");
            assert_eq!(f.retries(), n / 2, "request {n}");
        }
        // Once the window has slid past, the deposits are gone too: one request in the window
        // allows no retry.
        tokio::time::advance(BUDGET_WINDOW).await;
        svc.clone().oneshot(request("GET", "")).await.unwrap();
        assert_eq!(f_always_503.calls(), expected_calls + 1);
        assert_eq!(f.retries(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_terminated_before_the_response_is_retried_within_the_budget() {
        // One retry allowed per request (budget 1.0, no floor): the first request's reset is
        // retried; a second reset of the same request is not (attempts: 1).
        let f = fixture(1, 1.0);
        f.upstream
            .push(Reply::error(UpstreamError::ConnectionTerminated))
            .push(Reply::error(UpstreamError::ConnectionTerminated))
            .push(Reply::error(UpstreamError::ConnectionTerminated));
        let result = f.svc.clone().oneshot(request("GET", "")).await;
        assert_eq!(
            result.unwrap_err(),
            ProxyError::Upstream(UpstreamError::ConnectionTerminated)
        );
        assert_eq!((f.upstream.calls(), f.retries()), (2, 1));
        // Not for a request that cannot be replayed: its body went to the first attempt.
        let result = f.svc.clone().oneshot(request("POST", "")).await;
        assert!(result.is_err());
        assert_eq!((f.upstream.calls(), f.retries()), (3, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn retries_within_the_floor_are_always_allowed_and_more_need_the_ratio() {
        // min_per_second 1 over the 10 s window: ten retries whatever the traffic; budget 0.5
        // adds one per two requests.
        let f = fixture_with_floor(1, 0.5, 1.0);
        let always_503 = CountingService::new(Reply::status(503));
        let svc = RetryLayer::new(f.state.clone()).layer(always_503.clone());
        // After n requests, retry number k is allowed while k ≤ 10 + 0.5 × n: each of the
        // first 20 requests is retried (the first ten on the floor alone).
        for n in 1..=20u64 {
            svc.clone().oneshot(request("GET", "")).await.unwrap();
            assert_eq!(f.retries(), n, "request {n}");
        }
        // Then the ratio decides: 21 ≤ 20.5 no; 21 ≤ 21 yes; 22 ≤ 21.5 no; 22 ≤ 22 yes.
        for (n, retried) in [(21, 20), (22, 21), (23, 21), (24, 22)] {
            svc.clone().oneshot(request("GET", "")).await.unwrap();
            assert_eq!(f.retries(), retried, "request {n}");
        }
        assert_eq!(always_503.calls(), 24 + 22);
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_route_retries_on_the_default_floor() {
        // The defaults: budget 0.2, one retry a second. A route that sees one request every few
        // seconds retries each of them; the ratio alone would allow none.
        let defaults = crate::config::defaults::policy().retries;
        let counter = IntCounter::new("spillway_retries_total", "retries").unwrap();
        let settings = RetrySettings {
            attempts: 1,
            ..defaults
        };
        let state = Arc::new(RetryState::new(&settings, counter).with_jitter(|d| d));
        let upstream = CountingService::ok();
        let svc = RetryLayer::new(state.clone()).layer(upstream.clone());
        for n in 1..=5u64 {
            upstream.push(Reply::error(UpstreamError::ConnectionTerminated));
            let resp = svc.clone().oneshot(request("GET", "")).await.unwrap();
            assert_eq!(resp.status(), 200, "request {n}");
            assert_eq!(state.retries.get(), n);
            tokio::time::advance(Duration::from_secs(3)).await;
        }
        assert_eq!(upstream.calls(), 10);
        // Within one window, the floor holds ten retries and no more (with a 0.2 ratio, ten
        // more requests add two).
        tokio::time::advance(BUDGET_WINDOW).await;
        let always_503 = CountingService::new(Reply::status(503));
        let svc = RetryLayer::new(state.clone()).layer(always_503.clone());
        for _ in 0..15 {
            svc.clone().oneshot(request("GET", "")).await.unwrap();
        }
        // retries + 1 ≤ 10 + 0.2 × n: the 1st to 12th are retried (12 ≤ 10 + 2.4), then
        // 13 ≤ 10 + 0.2 × n needs n ≥ 15: the 15th is retried too.
        assert_eq!(state.retries.get(), 5 + 13);
    }

    #[tokio::test(start_paused = true)]
    async fn at_low_traffic_the_budget_without_a_floor_needs_five_requests_for_one_retry() {
        let f = fixture(1, 0.2);
        let always_503 = CountingService::new(Reply::status(503));
        let svc = RetryLayer::new(f.state.clone()).layer(always_503.clone());
        for n in 1..=4 {
            svc.clone().oneshot(request("GET", "")).await.unwrap();
            assert_eq!(f.retries(), 0, "request {n}");
        }
        svc.clone().oneshot(request("GET", "")).await.unwrap();
        assert_eq!(f.retries(), 1);
        assert_eq!(always_503.calls(), 6);
    }

    #[tokio::test(start_paused = true)]
    async fn zero_attempts_never_retries() {
        let f = fixture(0, 10.0);
        f.upstream.push(Reply::status(503));
        assert_eq!(
            f.svc
                .clone()
                .oneshot(request("GET", ""))
                .await
                .unwrap()
                .status(),
            503
        );
        assert_eq!((f.upstream.calls(), f.retries()), (1, 0));
    }
}
