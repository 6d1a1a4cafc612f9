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
use crate::error::ProxyError;

/// Span of the budget's sliding window: long enough to smooth bursts, short enough that the
/// budget reflects current traffic.
pub const BUDGET_WINDOW: Duration = Duration::from_secs(10);

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
            window: Mutex::new(SlidingWindow::new(BUDGET_WINDOW)),
            retries: retries_counter,
            jitter: full_jitter,
        }
    }

    fn lock(&self) -> MutexGuard<'_, SlidingWindow> {
        // Nothing panics under the lock; a poisoned one still holds consistent counts.
        self.window.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Every original request pays into the budget.
    fn deposit(&self) {
        self.lock().add(Instant::now(), 1, 0);
    }

    /// Takes one retry out of the budget if `retries + 1 ≤ budget × requests` over the window.
    fn try_withdraw(&self) -> bool {
        let now = Instant::now();
        let mut window = self.lock();
        let counts = window.counts(now);
        let allowed = (counts.marked + 1) as f64 <= self.budget * counts.total as f64 + BUDGET_EPSILON;
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

/// Methods whose repetition has the same effect as one request (RFC 9110 §9.2.2).
fn is_idempotent(method: &Method) -> bool {
    [Method::GET, Method::HEAD, Method::OPTIONS, Method::PUT, Method::DELETE, Method::TRACE].contains(method)
}

/// Whether an outcome is worth another attempt: a failure before the request could reach the
/// app, or the app (or a proxy in front of it) saying it could not serve right now.
fn is_retryable<RB>(result: &Result<Response<RB>, ProxyError>) -> bool {
    match result {
        Ok(resp) => matches!(
            resp.status(),
            StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT
        ),
        Err(ProxyError::Upstream(e)) => e.is_connect_failure(),
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
pub struct RetryLayer {
    state: Arc<RetryState>,
}

impl RetryLayer {
    /// A layer retrying within `state`'s settings and budget.
    pub fn new(state: Arc<RetryState>) -> Self {
        RetryLayer { state }
    }
}

impl<S> Layer<S> for RetryLayer {
    type Service = Retry<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Retry { inner, state: self.state.clone() }
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
        self.state.deposit();
        let replayable = self.state.attempts > 0 && is_idempotent(req.method()) && req.body().is_end_stream();
        if !replayable {
            let future = self.inner.call(req);
            return ResponseFuture { state: State::Calling { future }, retry: None };
        }
        let template = Template::of(&req);
        // `self.inner` is the instance that was polled ready: call it, keep a fresh clone
        // (readied again before each retry) for the attempts to come.
        let clone = self.inner.clone();
        let mut service = std::mem::replace(&mut self.inner, clone);
        let future = service.call(req);
        ResponseFuture {
            state: State::Calling { future },
            retry: Some(Retrying { service, template, state: self.state.clone(), done: 0 }),
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
                    let Some(retry) = this.retry.as_mut() else { return Poll::Ready(result) };
                    // The budget is asked last: it is only spent on a retry that will be sent.
                    if !is_retryable(&result) || retry.done >= retry.state.attempts || !retry.state.try_withdraw() {
                        return Poll::Ready(result);
                    }
                    drop(result);
                    retry.done += 1;
                    retry.state.retries.inc();
                    let delay = retry.state.delay(retry.done);
                    if delay.is_zero() {
                        this.state.set(State::Readying);
                    } else {
                        this.state.set(State::Backoff { sleep: tokio::time::sleep(delay) });
                    }
                }
                StateProj::Backoff { sleep } => {
                    ready!(sleep.poll(cx));
                    this.state.set(State::Readying);
                }
                StateProj::Readying => {
                    let retry = this.retry.as_mut().expect("only retryable requests get here");
                    ready!(retry.service.poll_ready(cx))?;
                    let future = retry.service.call(retry.template.build());
                    this.state.set(State::Calling { future });
                }
            }
        }
    }
}
