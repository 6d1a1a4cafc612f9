//! The downstream response body: streamed, never buffered whole. It carries the request's
//! [`Exchange`], so metrics and the access log see the whole exchange (including a body that the
//! upstream cut off, or a client that went away). Upgraded connections are tunnelled here too.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use super::exchange::{Exchange, ExchangeOutcome};
use super::upstream::http1::Upgraded;
use super::upstream::{BoxError, UpstreamBody};
use crate::error::UpstreamError;
use crate::http1::server::upgrade::OnUpgrade;
use crate::spare_timer;

pin_project! {
    /// What a response body streams from.
    #[project = SourceBodyProj]
    enum SourceBody {
        /// The upstream's body, passed through frame by frame (trailers included). `idle` is
        /// the deadline for its next frame, set once the body first keeps the client waiting.
        Upstream {
            #[pin]
            inner: UpstreamBody,
            body_timeout: Duration,
            idle: Option<Pin<Box<Sleep>>>,
        },
        /// A short body spillway generated.
        Full { data: Option<Bytes> },
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
            let mut this = this.project();
            if let SourceBodyProj::Upstream { idle, .. } = this.source.as_mut().project() {
                if let Some(timer) = idle.take() {
                    spare_timer::give_back(timer);
                }
            }
            if let Some(ex) = this.exchange.take() {
                let ended = match &*this.source {
                    SourceBody::Upstream { inner, .. } => inner.is_end_stream(),
                    SourceBody::Full { data } => data.is_none(),
                };
                // A body nobody polled to the end: fine if there was nothing left to send
                // (HEAD, 204, an empty body), otherwise the client stopped reading.
                ex.finish(if ended { ExchangeOutcome::Complete } else { ExchangeOutcome::ClientGone });
            }
        }
    }
}

impl ResponseBody {
    /// Streams the upstream's body; one that sends nothing for `body_timeout` is aborted.
    pub(crate) fn upstream(
        inner: UpstreamBody,
        exchange: Exchange,
        body_timeout: Duration,
    ) -> Self {
        ResponseBody {
            source: SourceBody::Upstream {
                inner,
                body_timeout,
                idle: None,
            },
            exchange: Some(exchange),
        }
    }

    /// A short generated body.
    pub(crate) fn full(data: &'static str, exchange: Option<Exchange>) -> Self {
        ResponseBody {
            source: SourceBody::Full {
                data: Some(Bytes::from_static(data.as_bytes())),
            },
            exchange,
        }
    }

    /// No body at all: the end of the stream is known up front, so HTTP/2 ends the stream on
    /// the HEADERS frame (what a gRPC "Trailers-Only" response needs).
    pub(crate) fn empty(exchange: Option<Exchange>) -> Self {
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
pub(super) async fn tunnel(downstream: OnUpgrade, mut up: Upgraded, exchange: Exchange) {
    use tokio::io::AsyncWriteExt as _;
    let down = match downstream.await {
        Ok(down) => down,
        Err(e) => {
            tracing::debug!(request_id = exchange.request_id.to_str().unwrap_or("-"), error = %e, "upgrade not completed");
            exchange.finish(ExchangeOutcome::TunnelAborted);
            return;
        }
    };
    let mut down = down;
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
            exchange.finish(ExchangeOutcome::Complete);
        }
        Err(e) => {
            tracing::debug!(request_id = exchange.request_id.to_str().unwrap_or("-"), error = %e, "tunnel aborted");
            exchange.finish(ExchangeOutcome::TunnelAborted);
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
            SourceBodyProj::Upstream {
                inner,
                body_timeout,
                idle,
            } => match inner.poll_frame(cx) {
                Poll::Ready(Some(Err(e))) => {
                    if let Some(ex) = this.exchange.take() {
                        ex.finish(ExchangeOutcome::UpstreamAborted(
                            UpstreamError::ConnectionTerminated,
                        ));
                    }
                    // Returning the error makes the server abort the downstream response
                    // (HTTP/1: close without the terminating chunk; HTTP/2: RST_STREAM), so a
                    // truncated body is never presented as complete.
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Pending => {
                    // The client waits on the upstream: its next frame is due within the body
                    // timeout of the last one (the timer starts at the first wait).
                    let deadline = Instant::now() + *body_timeout;
                    let timer = idle.get_or_insert_with(|| spare_timer::take(deadline));
                    if timer.as_mut().poll(cx).is_ready() {
                        if let Some(ex) = this.exchange.take() {
                            ex.finish(ExchangeOutcome::UpstreamAborted(UpstreamError::BodyTimeout));
                        }
                        return Poll::Ready(Some(Err(Box::new(UpstreamError::BodyTimeout))));
                    }
                    Poll::Pending
                }
                ready => {
                    // A frame (or the end): the next one gets the whole timeout again.
                    if let Some(timer) = idle.as_mut() {
                        timer.as_mut().reset(Instant::now() + *body_timeout);
                    }
                    ready
                }
            },
        };
        if let Poll::Ready(None) = polled {
            if let Some(ex) = this.exchange.take() {
                ex.finish(ExchangeOutcome::Complete);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.source {
            SourceBody::Upstream { inner, .. } => inner.is_end_stream(),
            SourceBody::Full { data } => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.source {
            SourceBody::Upstream { inner, .. } => inner.size_hint(),
            SourceBody::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}
