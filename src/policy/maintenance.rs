//! Maintenance mode: every request is answered with a 503 and `Retry-After`, and nothing reaches
//! the upstream.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use crate::config::settings::MaintenanceSettings;
use crate::error::{ProxyError, ShedReason};

/// Builds [`Maintenance`] services. The settings are the whole state: there is nothing to keep
/// across reloads.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MaintenanceLayer {
    enabled: bool,
    retry_after: Duration,
}

impl MaintenanceLayer {
    /// A layer that sheds everything when `settings.enabled`, and is transparent otherwise.
    pub(crate) fn new(settings: &MaintenanceSettings) -> Self {
        MaintenanceLayer {
            enabled: settings.enabled,
            retry_after: settings.retry_after,
        }
    }
}

impl<S> Layer<S> for MaintenanceLayer {
    type Service = Maintenance<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Maintenance {
            inner,
            enabled: self.enabled,
            retry_after: self.retry_after,
        }
    }
}

/// Answers `Shed { Maintenance, retry_after }` without calling the inner service while
/// maintenance is enabled; passes requests through otherwise.
#[derive(Debug, Clone)]
pub struct Maintenance<S> {
    inner: S,
    enabled: bool,
    retry_after: Duration,
}

impl<S, B, RB> Service<Request<B>> for Maintenance<S>
where
    S: Service<Request<B>, Response = Response<RB>, Error = ProxyError>,
{
    type Response = Response<RB>;
    type Error = ProxyError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if self.enabled {
            // The inner service will not be called, so its readiness does not matter.
            Poll::Ready(Ok(()))
        } else {
            self.inner.poll_ready(cx)
        }
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        if self.enabled {
            let error = ProxyError::Shed {
                reason: ShedReason::Maintenance,
                retry_after: self.retry_after,
                priority: super::priority::of(&req),
            };
            ResponseFuture {
                state: State::Shed { error },
            }
        } else {
            ResponseFuture {
                state: State::Inner {
                    future: self.inner.call(req),
                },
            }
        }
    }
}

pin_project! {
    /// Future of [`Maintenance`]: the refusal, or the inner service's future.
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        state: State<F>,
    }
}

pin_project! {
    #[project = StateProj]
    #[derive(Debug)]
    enum State<F> {
        Shed { error: ProxyError },
        Inner { #[pin] future: F },
    }
}

impl<F, T> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, ProxyError>>,
{
    type Output = Result<T, ProxyError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Shed { error } => Poll::Ready(Err(*error)),
            StateProj::Inner { future } => future.poll(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Priority;
    use crate::policy::test_support::{request, CountingService};
    use tower::ServiceExt;

    fn settings(enabled: bool) -> MaintenanceSettings {
        MaintenanceSettings {
            enabled,
            retry_after: Duration::from_secs(120),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn enabled_sheds_without_calling_the_upstream() {
        let inner = CountingService::ok();
        let svc = MaintenanceLayer::new(&settings(true)).layer(inner.clone());
        let mut req = request("GET", "");
        req.extensions_mut().insert(Priority::Critical);
        let err = svc.oneshot(req).await.unwrap_err();
        // The configured Retry-After as it is, and the request's class for the metric.
        assert_eq!(
            err,
            ProxyError::Shed {
                reason: ShedReason::Maintenance,
                retry_after: Duration::from_secs(120),
                priority: Priority::Critical,
            }
        );
        assert_eq!(inner.calls(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn disabled_passes_through() {
        let inner = CountingService::ok();
        let svc = MaintenanceLayer::new(&settings(false)).layer(inner.clone());
        let resp = svc.oneshot(request("GET", "")).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(inner.calls(), 1);
    }
}
