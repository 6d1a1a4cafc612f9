//! One request's accounting, from arrival to the last byte of its response: in-flight gauge,
//! the response counter and histogram, upstream body failures, and the access-log line.

use std::sync::Arc;

use http::{HeaderValue, Method};
use tokio::time::Instant;

use super::access_log::{AccessLog, Line};
use super::trace::TraceContext;
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
    /// Where its line goes, when the access log is on.
    pub log: Option<Arc<AccessLog>>,
    /// The trace it belongs to, for the log line.
    pub trace: Option<TraceContext>,
    /// Values of the access log's request fields.
    pub request_fields: Vec<HeaderValue>,
    /// Values of the access log's response fields.
    pub response_fields: Vec<HeaderValue>,
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
            log: None,
            trace: None,
            request_fields: Vec::new(),
            response_fields: Vec::new(),
        }
    }

    /// Logs the exchange to `log` when it ends (a line if the access log's rules want one).
    pub(crate) fn logged(
        mut self,
        log: &Arc<AccessLog>,
        trace: &TraceContext,
        headers: &http::HeaderMap,
    ) -> Self {
        if log.enabled() {
            self.request_fields = log.request_fields(headers);
            self.log = Some(log.clone());
            self.trace = Some(trace.clone());
        }
        self
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
        let Some(log) = &self.log else { return };
        if !log.wants(self.status, self.source, elapsed) {
            return;
        }
        let trace_id = self.trace.as_ref().map_or("-", TraceContext::trace_id);
        log.write(&Line {
            request_id: &self.request_id,
            trace_id,
            route: self.metrics.name(),
            method: self.method.as_str(),
            path: self.uri.path(),
            status: self.status,
            source: self.source,
            error: self.error.unwrap_or("-"),
            outcome: outcome.label(),
            elapsed,
            request_fields: &self.request_fields,
            response_fields: &self.response_fields,
        });
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        self.metrics.in_flight.dec();
    }
}
