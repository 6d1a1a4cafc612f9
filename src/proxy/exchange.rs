//! One request's accounting, from arrival to the last byte of its response: in-flight gauge,
//! the response counter and histogram, upstream body failures, and the access-log line.

use std::sync::Arc;

use http::{HeaderValue, Method};
use tokio::time::Instant;

use crate::error::UpstreamError;
use crate::metrics::{ResponseSource, RouteMetrics};

/// How an exchange ended, for the access log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ExchangeOutcome {
    /// The whole body was sent.
    Complete,
    /// The upstream body failed after the head was sent; the downstream response was aborted.
    UpstreamAborted(UpstreamError),
    /// The client went away before the body ended.
    ClientGone,
    /// An upgraded connection (WebSocket) ended because one side failed (a reset), or the
    /// upgrade itself could not be completed.
    TunnelAborted,
}

impl ExchangeOutcome {
    fn label(self) -> &'static str {
        match self {
            ExchangeOutcome::Complete => "complete",
            ExchangeOutcome::UpstreamAborted(_) => "upstream_aborted",
            ExchangeOutcome::ClientGone => "client_gone",
            ExchangeOutcome::TunnelAborted => "tunnel_aborted",
        }
    }
}

/// Everything needed to account for one exchange when it ends. Created when the request
/// arrives (it holds the in-flight slot), finished exactly once.
pub(crate) struct Exchange {
    /// Route handles (`unmatched` for requests that matched none).
    pub metrics: Arc<RouteMetrics>,
    /// When the request arrived.
    pub start: Instant,
    /// The request's method.
    pub method: Method,
    /// The request's URI (path and query are logged).
    pub uri: http::Uri,
    /// The request id.
    pub request_id: HeaderValue,
    /// Status sent, once known.
    pub status: u16,
    /// Who produced the response.
    pub source: ResponseSource,
    /// The error kind, for generated responses.
    pub error: Option<&'static str>,
}

impl Exchange {
    /// Starts accounting: counts the request in flight.
    pub(crate) fn start(
        metrics: Arc<RouteMetrics>,
        start: Instant,
        method: Method,
        uri: http::Uri,
        request_id: HeaderValue,
    ) -> Self {
        metrics.in_flight.inc();
        Exchange {
            metrics,
            start,
            method,
            uri,
            request_id,
            status: 0,
            source: ResponseSource::Proxy,
            error: None,
        }
    }

    pub(super) fn finish(&self, outcome: ExchangeOutcome) {
        let elapsed = self.start.elapsed();
        self.metrics.response(
            &self.method,
            self.status,
            self.source,
            self.metrics
                .observed_seconds(elapsed, self.status, self.error),
        );
        if let ExchangeOutcome::UpstreamAborted(kind) = outcome {
            self.metrics.upstream_error(kind);
        }
        tracing::info!(
            target: "spillway::access",
            request_id = self.request_id.to_str().unwrap_or("-"),
            route = self.metrics.name(),
            method = self.method.as_str(),
            path = self.uri.path(),
            status = self.status,
            source = self.source.label(),
            error = self.error.unwrap_or("-"),
            outcome = outcome.label(),
            // Whole microseconds: prints as e.g. 1.857, not 1.8570200000000001.
            duration_ms = elapsed.as_micros() as f64 / 1000.0,
        );
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        self.metrics.in_flight.dec();
    }
}
