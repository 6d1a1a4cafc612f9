//! The route timeout: a deadline for the response head, covering every retry attempt together
//! (this layer sits outside [`Retry`](super::Retry)).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower::{Layer, Service};

use crate::error::{ProxyError, RequestError, UpstreamError};
use crate::spare_timer;

/// How a request body is arriving from the client, for the timeout's verdict: a request whose
/// body the client stopped sending must not be blamed on the app. The body sets it as it is
/// read (it travels in the request's extensions); only requests with a body carry one.
#[derive(Debug, Clone, Default)]
pub(crate) struct BodyProgress(Arc<AtomicU8>);

/// The body has ended.
const BODY_DONE: u8 = 1;
/// The last read of the body found nothing from the client yet.
const BODY_WAITING: u8 = 2;

impl BodyProgress {
    /// The last read found no data: spillway waits on the client.
    pub(crate) fn waiting(&self) {
        self.0.fetch_or(BODY_WAITING, Ordering::Relaxed);
    }

    /// Data arrived.
    pub(crate) fn arrived(&self) {
        self.0.fetch_and(!BODY_WAITING, Ordering::Relaxed);
    }

    /// The body ended (whole, or broken).
    pub(crate) fn ended(&self) {
        self.0.store(BODY_DONE, Ordering::Relaxed);
    }

    /// Whether the client is the one holding the request up: its body has not ended and
    /// spillway is waiting for more of it.
    fn stalled_by_client(&self) -> bool {
        self.0.load(Ordering::Relaxed) == BODY_WAITING
    }
}

/// Builds [`Timeout`] services for one route timeout.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TimeoutLayer {
    timeout: Duration,
}

impl TimeoutLayer {
    /// A layer giving every request `timeout` (the route's `timeout`) to get its response head.
    pub(crate) fn new(timeout: Duration) -> Self {
        TimeoutLayer { timeout }
    }
}

impl<S> Layer<S> for TimeoutLayer {
    type Service = Timeout<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Timeout {
            inner,
            timeout: self.timeout,
        }
    }
}

/// Fails a request with [`UpstreamError::ResponseTimeout`] when the inner service has not
/// produced a response head within the timeout, counted from the call — or with
/// [`RequestError::Timeout`] (408) when it is the client that stopped sending its body then.
/// The inner future is dropped, which cancels whatever it was doing (attempt, backoff).
#[derive(Debug, Clone)]
pub struct Timeout<S> {
    inner: S,
    timeout: Duration,
}

impl<S, B, RB> Service<Request<B>> for Timeout<S>
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
        let deadline = Instant::now() + self.timeout;
        let body = req.extensions().get::<BodyProgress>().cloned();
        ResponseFuture {
            inner: self.inner.call(req),
            timer: Some(spare_timer::take(deadline)),
            body,
        }
    }
}

pin_project! {
    /// Future of [`Timeout`].
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        // Taken (and given back) once the outcome is known.
        timer: Option<Pin<Box<Sleep>>>,
        // How the request's body is arriving, when it has one.
        body: Option<BodyProgress>,
    }

    impl<F> PinnedDrop for ResponseFuture<F> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(timer) = this.project().timer.take() {
                spare_timer::give_back(timer);
            }
        }
    }
}

impl<F, T> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, ProxyError>>,
{
    type Output = Result<T, ProxyError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        // The inner future first: a head that arrived by the deadline wins.
        if let Poll::Ready(result) = this.inner.poll(cx) {
            if let Some(timer) = this.timer.take() {
                spare_timer::give_back(timer);
            }
            return Poll::Ready(result);
        }
        let Some(timer) = this.timer.as_mut() else {
            // Already timed out; polled again only by mistake.
            return Poll::Ready(Err(ProxyError::Upstream(UpstreamError::ResponseTimeout)));
        };
        ready!(timer.as_mut().poll(cx));
        if let Some(timer) = this.timer.take() {
            spare_timer::give_back(timer);
        }
        if this
            .body
            .as_ref()
            .is_some_and(BodyProgress::stalled_by_client)
        {
            return Poll::Ready(Err(RequestError::Timeout.into()));
        }
        Poll::Ready(Err(ProxyError::Upstream(UpstreamError::ResponseTimeout)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::test_support::{request, CountingService, Manual, Reply};
    use tower::ServiceExt;

    const LIMIT: Duration = Duration::from_millis(500);

    /// Calls a request that never gets an answer and polls it to just before its deadline,
    /// then to it; `after_call` runs once the call is made. Returns the inner service's calls.
    async fn times_out_exactly_at_its_deadline(after_call: impl FnOnce()) -> usize {
        let inner = CountingService::new(Reply::hang());
        let svc = TimeoutLayer::new(LIMIT).layer(inner.clone());
        let mut call = Manual::new(svc.oneshot(request("GET", "")));
        // The first poll makes the call, which starts the clock.
        assert!(call.poll_once().is_none());
        after_call();
        tokio::time::advance(LIMIT - Duration::from_millis(1)).await;
        assert!(call.poll_once().is_none(), "fired before the deadline");
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(
            call.poll_once()
                .expect("did not fire at the deadline")
                .unwrap_err(),
            ProxyError::Upstream(UpstreamError::ResponseTimeout)
        );
        inner.calls()
    }

    #[tokio::test(start_paused = true)]
    async fn fires_at_exactly_the_deadline() {
        assert_eq!(times_out_exactly_at_its_deadline(|| {}).await, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_just_before_the_deadline_wins() {
        let inner = CountingService::new(Reply::ok_after(LIMIT - Duration::from_millis(1)));
        let svc = TimeoutLayer::new(LIMIT).layer(inner);
        let resp = svc.oneshot(request("GET", "")).await.unwrap();
        assert_eq!(resp.status(), 200);
    }

    use crate::spare_timer::has_spare as spare_is_set;

    /// A hanging request on a connection with a spare timer: it takes the spare, and gives it
    /// back once it has fired.
    async fn times_out_with_the_spare() {
        times_out_exactly_at_its_deadline(|| {
            assert!(!spare_is_set(), "the request did not take the spare timer")
        })
        .await;
        assert!(spare_is_set(), "a fired timer was not given back");
    }

    #[tokio::test(start_paused = true)]
    async fn a_connections_spare_timer_is_reused_at_each_requests_own_deadline() {
        spare_timer::scope(async {
            assert!(!spare_is_set());
            // A request answered in time gives its timer back...
            let quick = TimeoutLayer::new(LIMIT).layer(CountingService::new(Reply::ok_after(
                Duration::from_millis(100),
            )));
            quick.oneshot(request("GET", "")).await.unwrap();
            assert!(spare_is_set());
            // ...and the next one, reusing it, still gets its full time, from its own call.
            tokio::time::advance(Duration::from_millis(300)).await;
            times_out_with_the_spare().await;
            // A timer that already fired is reused just as well.
            times_out_with_the_spare().await;
            // A request dropped unanswered gives it back too.
            let svc = TimeoutLayer::new(LIMIT).layer(CountingService::new(Reply::hang()));
            let mut call = Manual::new(svc.oneshot(request("GET", "")));
            assert!(call.poll_once().is_none());
            drop(call);
            assert!(spare_is_set());
        })
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn inner_errors_pass_unchanged() {
        let inner = CountingService::new(Reply::error(UpstreamError::ConnectRefused));
        let svc = TimeoutLayer::new(LIMIT).layer(inner);
        let err = svc.oneshot(request("GET", "")).await.unwrap_err();
        assert_eq!(err, ProxyError::Upstream(UpstreamError::ConnectRefused));
    }
}
