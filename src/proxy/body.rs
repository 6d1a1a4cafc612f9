//! The downstream response body: streamed, never buffered whole. It carries the request's
//! [`Exchange`], so metrics and the access log see the whole exchange (including a body that the
//! upstream cut off, or a client that went away). Upgraded connections are tunnelled here too.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use super::exchange::{Exchange, ExchangeOutcome};
use super::upstream::http1::Upgraded;
use super::upstream::{BoxError, UpstreamBody};
use crate::http1::server::upgrade::OnUpgrade;

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
                ex.finish(if ended { ExchangeOutcome::Complete } else { ExchangeOutcome::ClientGone });
            }
        }
    }
}

impl ResponseBody {
    /// Streams the upstream's body.
    pub(crate) fn upstream(inner: UpstreamBody, exchange: Exchange) -> Self {
        ResponseBody {
            source: SourceBody::Upstream { inner },
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
            SourceBodyProj::Upstream { inner } => match inner.poll_frame(cx) {
                Poll::Ready(Some(Err(e))) => {
                    if let Some(ex) = this.exchange.take() {
                        ex.finish(ExchangeOutcome::UpstreamAborted);
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
                ex.finish(ExchangeOutcome::Complete);
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
