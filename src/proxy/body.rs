//! Bodies: streamed both ways, never buffered whole. The response body carries the request's
//! completion guard, so metrics and the access log see the whole exchange (including a body that
//! the upstream cut off, or a client that went away).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderValue, Method};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use pin_project_lite::pin_project;
use tokio::time::Instant;

use super::http1::Upgraded;
use super::upstream::UpstreamBody;
use crate::error::UpstreamError;
use crate::metrics::{RouteMetrics, Source};
use std::sync::Arc;

/// Errors a body can end with, boxed for hyper.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A request body on its way to the upstream. `Empty` can be rebuilt at will, which is what
/// lets bodyless idempotent requests be sent again.
#[derive(Debug, Default)]
pub enum RequestBody {
    /// No body at all.
    #[default]
    Empty,
    /// The client's streaming body.
    Stream {
        /// The downstream body.
        inner: Incoming,
    },
}

impl RequestBody {
    /// Wraps a downstream body; one already at its end becomes `Empty`.
    pub fn from_incoming(inner: Incoming) -> Self {
        if inner.is_end_stream() {
            RequestBody::Empty
        } else {
            RequestBody::Stream { inner }
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            RequestBody::Empty => Poll::Ready(None),
            RequestBody::Stream { inner } => Pin::new(inner).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Empty => true,
            RequestBody::Stream { inner } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Empty => SizeHint::with_exact(0),
            RequestBody::Stream { inner } => inner.size_hint(),
        }
    }
}

pin_project! {
    /// What a response body streams from.
    #[project = SourceBodyProj]
    enum SourceBody {
        /// The upstream's body, passed through frame by frame (trailers included).
        Upstream { #[pin] inner: UpstreamBody },
        /// A short body spillway generated.
        Full { data: Option<Bytes> },
    }
}

/// How an exchange ended, for the access log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The whole body was sent.
    Complete,
    /// The upstream body failed after the head was sent; the downstream response was aborted.
    UpstreamAborted,
    /// The client went away before the body ended.
    ClientGone,
    /// An upgraded connection (WebSocket) ended because one side failed (a reset), or the
    /// upgrade itself could not be completed.
    TunnelAborted,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Complete => "complete",
            Outcome::UpstreamAborted => "upstream_aborted",
            Outcome::ClientGone => "client_gone",
            Outcome::TunnelAborted => "tunnel_aborted",
        }
    }
}

/// Everything needed to account for one exchange when it ends. Created when the request
/// arrives (it holds the in-flight slot), finished exactly once.
pub struct Exchange {
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
    pub source: Source,
    /// The error kind, for generated responses.
    pub error: Option<&'static str>,
}

impl Exchange {
    /// Starts accounting: counts the request in flight.
    pub fn start(
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
            source: Source::Proxy,
            error: None,
        }
    }

    fn finish(&self, outcome: Outcome) {
        let elapsed = self.start.elapsed();
        self.metrics.response(
            &self.method,
            self.status,
            self.source,
            elapsed.as_secs_f64(),
        );
        if outcome == Outcome::UpstreamAborted {
            self.metrics
                .upstream_error(UpstreamError::ConnectionTerminated);
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

pin_project! {
    /// The downstream response body: streams its source and finishes the exchange's accounting
    /// when the body ends, fails, or is dropped.
    pub struct ResponseBody {
        #[pin]
        source: SourceBody,
        exchange: Option<Exchange>,
    }

    impl PinnedDrop for ResponseBody {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(ex) = this.exchange.take() {
                let ended = match &*this.source {
                    SourceBody::Upstream { inner } => inner.is_end_stream(),
                    SourceBody::Full { data } => data.is_none(),
                };
                // A body nobody polled to the end: fine if there was nothing left to send
                // (HEAD, 204, an empty body), otherwise the client stopped reading.
                ex.finish(if ended { Outcome::Complete } else { Outcome::ClientGone });
            }
        }
    }
}

impl ResponseBody {
    /// Streams the upstream's body.
    pub fn upstream(inner: UpstreamBody, exchange: Exchange) -> Self {
        ResponseBody {
            source: SourceBody::Upstream { inner },
            exchange: Some(exchange),
        }
    }

    /// A short generated body.
    pub fn full(data: &'static str, exchange: Option<Exchange>) -> Self {
        ResponseBody {
            source: SourceBody::Full {
                data: Some(Bytes::from_static(data.as_bytes())),
            },
            exchange,
        }
    }

    /// No body at all: the end of the stream is known up front, so HTTP/2 ends the stream on
    /// the HEADERS frame (what a gRPC "Trailers-Only" response needs).
    pub fn empty(exchange: Option<Exchange>) -> Self {
        ResponseBody {
            source: SourceBody::Full { data: None },
            exchange,
        }
    }
}

/// Runs an upgraded connection (e.g. a WebSocket) once both sides have switched protocols:
/// bytes are copied both ways until each side has closed its direction (a close on one side is
/// passed on to the other as a close of that direction), or until either side fails, which
/// closes both. `exchange` is held for the tunnel's life, so the request stays in flight while
/// it is open and is counted (status 101, its whole duration) when it ends.
pub async fn tunnel(downstream: OnUpgrade, mut up: Upgraded, exchange: Exchange) {
    use tokio::io::AsyncWriteExt as _;
    let down = match downstream.await {
        Ok(down) => down,
        Err(e) => {
            tracing::debug!(request_id = exchange.request_id.to_str().unwrap_or("-"), error = %e, "upgrade not completed");
            exchange.finish(Outcome::TunnelAborted);
            return;
        }
    };
    let mut down = TokioIo::new(down);
    let copied = async {
        // What the upstream sent right behind its 101 goes first.
        down.write_all(&up.read_ahead).await?;
        tokio::io::copy_bidirectional(&mut down, &mut up.io).await
    };
    match copied.await {
        Ok((sent, received)) => {
            tracing::debug!(
                request_id = exchange.request_id.to_str().unwrap_or("-"),
                sent,
                received,
                "tunnel closed"
            );
            exchange.finish(Outcome::Complete);
        }
        Err(e) => {
            tracing::debug!(request_id = exchange.request_id.to_str().unwrap_or("-"), error = %e, "tunnel aborted");
            exchange.finish(Outcome::TunnelAborted);
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let polled = match this.source.project() {
            SourceBodyProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            SourceBodyProj::Upstream { inner } => match inner.poll_frame(cx) {
                Poll::Ready(Some(Err(e))) => {
                    if let Some(ex) = this.exchange.take() {
                        ex.finish(Outcome::UpstreamAborted);
                    }
                    // Returning the error makes hyper abort the downstream response (HTTP/1:
                    // close without the terminating chunk; HTTP/2: RST_STREAM), so a truncated
                    // body is never presented as complete.
                    return Poll::Ready(Some(Err(e)));
                }
                other => other,
            },
        };
        if let Poll::Ready(None) = polled {
            if let Some(ex) = this.exchange.take() {
                ex.finish(Outcome::Complete);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.source {
            SourceBody::Upstream { inner } => inner.is_end_stream(),
            SourceBody::Full { data } => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.source {
            SourceBody::Upstream { inner } => inner.size_hint(),
            SourceBody::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}
