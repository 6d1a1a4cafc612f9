//! The route timeout: a deadline for the response head, covering every retry attempt together
//! (this layer sits outside [`Retry`](super::Retry)).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use crate::error::{ProxyError, UpstreamError};

/// Builds [`Timeout`] services for one route timeout.
#[derive(Debug, Clone, Copy)]
pub struct TimeoutLayer {
    timeout: Duration,
}

impl TimeoutLayer {
    /// A layer giving every request `timeout` (the route's `timeout`) to get its response head.
    pub fn new(timeout: Duration) -> Self {
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
/// produced a response head within the timeout, counted from the call. The inner future is
/// dropped then, which cancels whatever it was doing (attempt, backoff).
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
        ResponseFuture {
            inner: tokio::time::timeout(self.timeout, self.inner.call(req)),
        }
    }
}

pin_project! {
    /// Future of [`Timeout`].
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        inner: tokio::time::Timeout<F>,
    }
}

impl<F, T> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, ProxyError>>,
{
    type Output = Result<T, ProxyError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().inner.poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(result)) => Poll::Ready(result),
            Poll::Ready(Err(_elapsed)) => {
                Poll::Ready(Err(ProxyError::Upstream(UpstreamError::ResponseTimeout)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::test_support::{request, CountingService, Manual, Reply};
    use tower::ServiceExt;

    const LIMIT: Duration = Duration::from_millis(500);

    #[tokio::test(start_paused = true)]
    async fn fires_at_exactly_the_deadline() {
        let inner = CountingService::new(Reply::hang());
        let svc = TimeoutLayer::new(LIMIT).layer(inner.clone());
        let mut call = Manual::new(svc.oneshot(request("GET", "")));
        // The first poll makes the call, which starts the clock.
        assert!(call.poll_once().is_none());
        tokio::time::advance(LIMIT - Duration::from_millis(1)).await;
        assert!(call.poll_once().is_none(), "fired before the deadline");
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(
            call.poll_once()
                .expect("did not fire at the deadline")
                .unwrap_err(),
            ProxyError::Upstream(UpstreamError::ResponseTimeout)
        );
        assert_eq!(inner.calls(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_just_before_the_deadline_wins() {
        let inner = CountingService::new(Reply::ok_after(LIMIT - Duration::from_millis(1)));
        let svc = TimeoutLayer::new(LIMIT).layer(inner);
        let resp = svc.oneshot(request("GET", "")).await.unwrap();
        assert_eq!(resp.status(), 200);
    }

    #[tokio::test(start_paused = true)]
    async fn inner_errors_pass_unchanged() {
        let inner = CountingService::new(Reply::error(UpstreamError::ConnectRefused));
        let svc = TimeoutLayer::new(LIMIT).layer(inner);
        let err = svc.oneshot(request("GET", "")).await.unwrap_err();
        assert_eq!(err, ProxyError::Upstream(UpstreamError::ConnectRefused));
    }
}
