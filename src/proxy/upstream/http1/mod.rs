//! spillway's HTTP/1.1 client for upstream connections.
//!
//! A request's own task drives its upstream connection: it writes the request head (and body),
//! reads the response head, and later reads the response body as the downstream connection asks
//! for it. There is no connection task and no channel between the two (see
//! benches/RESULTS.md for what that saves). One connection carries one exchange at a time;
//! between exchanges it waits in its endpoint's pool (`pool.rs`).
//!
//! The parsing itself is httparse's (the parser hyper uses); `crate::http1::decode` adds the HTTP/1.1
//! message framing of RFC 9112 §6: which responses have no body, `Content-Length` (every value
//! must agree), `Transfer-Encoding: chunked` (with trailers), and bodies delimited by the
//! connection closing. [`encode`] writes the request; [`body`] reads the response body and
//! decides whether the connection can serve again: only when its response was framed, fully
//! read, nothing extra arrived after it, and neither side asked to close.

mod body;
mod encode;
pub(crate) mod pool;

use std::future::poll_fn;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::{request, HeaderValue, Method, Response};
use tokio::io::{AsyncRead, ReadBuf};

use super::classify::classify_io;
use super::connector::Stream;
use super::RequestBody;
use crate::error::{ProxyError, RequestError, UpstreamError};
use crate::http1::decode::{Chunk, Decoder, ResponseFraming, ResponseHead as Head};
pub(crate) use body::Http1Body;
use encode::{encode_head, request_framing, RequestFraming, Sending, WriteError};
use pool::{Http1Pool, OpenSlot};

/// Largest response head (status line and header fields) accepted.
const MAX_HEAD: usize = 64 * 1024;
/// Most header fields in a response head.
const MAX_HEADERS: usize = 100;
/// First read size. Reads that fill it double it (large bodies move in fewer, larger reads), up
/// to `MAX_READ`; a connection going back to its pool drops back to this size.
const MIN_READ: usize = 4 * 1024;
const MAX_READ: usize = 256 * 1024;

/// One HTTP/1.1 connection to an upstream endpoint, with its buffers.
#[derive(Debug)]
pub(crate) struct Http1Connection {
    io: Stream,
    /// Bytes read and not yet consumed.
    rbuf: BytesMut,
    read_size: usize,
    /// The request head (later a chunk's size line) being written.
    wbuf: Vec<u8>,
    /// Whether an exchange has already completed on it: a failure on a reused connection before
    /// any of the response arrived may be the keep-alive race.
    reused: bool,
    /// Its place under the endpoint's connection cap, given back when it closes.
    _slot: OpenSlot,
}

/// Why an exchange failed.
#[derive(Debug)]
pub(crate) struct SendError {
    /// What the client is told.
    pub error: ProxyError,
    /// The connection had served before and died before any byte of the response arrived: for
    /// a bodyless idempotent request the app cannot have acted on it, so it may be sent again
    /// on a fresh connection (the caller checks the request).
    pub stale: bool,
}

impl Http1Connection {
    /// A fresh connection over `io`. Boxed: it moves between pool, request and response
    /// body, and a pointer is cheaper to move than its buffers.
    pub(crate) fn new(io: Stream, slot: OpenSlot) -> Box<Self> {
        Box::new(Http1Connection {
            io,
            rbuf: BytesMut::new(),
            read_size: MIN_READ,
            wbuf: Vec::new(),
            reused: false,
            _slot: slot,
        })
    }

    /// Whether the connection still looks usable after sitting idle: nothing arrived on it (no
    /// close, no reset, no stray bytes such as an unsolicited 408). While nothing arrived this
    /// costs no system call: tokio's readiness state answers first.
    pub(crate) fn is_open(&mut self) -> bool {
        let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
        let mut probe = [0u8; 1];
        let mut buf = ReadBuf::new(&mut probe);
        matches!(
            Pin::new(&mut self.io).poll_read(&mut cx, &mut buf),
            Poll::Pending
        )
    }

    /// Sends one request (`parts` is only borrowed: a stale connection leaves it intact for
    /// another attempt) and reads the response head. The body follows in the returned
    /// [`Http1Body`], which hands the connection back to `home` when it ends cleanly.
    /// `default_host` is the `Host` sent when the request has none (an HTTP/1.0 client's):
    /// HTTP/1.1 requires one.
    pub(crate) async fn send(
        mut self: Box<Self>,
        parts: &request::Parts,
        body: RequestBody,
        default_host: &HeaderValue,
        home: &Arc<Http1Pool>,
    ) -> Result<Response<Http1Body>, SendError> {
        let framing = request_framing(&parts.headers, &body);
        encode_head(&mut self.wbuf, parts, framing, default_host);
        let mut sending = Sending {
            body,
            framing,
            body_done: framing == RequestFraming::None,
            written: 0,
            data: Bytes::new(),
            suffix: b"",
            flushed: false,
            received: false,
        };
        let head = poll_fn(|cx| self.poll_exchange(cx, &mut sending)).await;
        let stale = self.reused && !sending.received;
        let head = head.map_err(|error| SendError { error, stale })?;
        // An app may answer before it has read the whole request (an echo, an early 413): the
        // rest of the body goes on being sent while the response is read.
        let sending = (!sending.done(&self)).then(|| Box::new(sending));
        let Head {
            status,
            headers,
            framing,
            keep_alive,
        } = head;
        // A 2xx to CONNECT turns the connection into a tunnel, like a 101.
        let framing = if parts.method == Method::CONNECT && status.is_success() {
            ResponseFraming::Upgrade
        } else {
            framing
        };
        let decoder = match framing {
            _ if parts.method == Method::HEAD => Decoder::Length(0),
            ResponseFraming::Length(n) => Decoder::Length(n),
            ResponseFraming::Chunked => Decoder::Chunked(Chunk::Size),
            ResponseFraming::UntilClose => Decoder::UntilClose,
            ResponseFraming::Upgrade => Decoder::Length(0),
        };
        let upgraded = framing == ResponseFraming::Upgrade;
        let mut resp = Response::new(Http1Body {
            conn: Some(self),
            sending,
            decoder,
            keep_alive: keep_alive && !upgraded,
            upgraded,
            home: home.clone(),
        });
        *resp.status_mut() = status;
        *resp.headers_mut() = headers;
        Ok(resp)
    }

    /// Writes whatever of the request is ready and reads what has arrived, until the response
    /// head is complete. Reading goes on while writing, so an app that answers early (a 413 to
    /// a large upload) is heard.
    fn poll_exchange(
        &mut self,
        cx: &mut Context<'_>,
        s: &mut Sending,
    ) -> Poll<Result<Head, ProxyError>> {
        let mut write_failed = false;
        loop {
            // Write until done or blocked first, then read until blocked: polling the read side
            // again after each write step would only find it still pending.
            if !write_failed && !s.done(self) {
                match s.drive(self, cx) {
                    Poll::Ready(Ok(())) | Poll::Pending => {}
                    Poll::Ready(Err(WriteError::Upstream(e))) => {
                        tracing::debug!(error = %e, "upstream stopped taking the request; reading its answer");
                        write_failed = true;
                    }
                    Poll::Ready(Err(WriteError::RequestBody)) => {
                        return Poll::Ready(Err(ProxyError::from(RequestError::Malformed)))
                    }
                }
            }
            if let Some(head) = self.parse_head()? {
                return Poll::Ready(Ok(head));
            }
            // After a failed write the connection is dead, but an answer the app sent before
            // closing (an early 413) may still be waiting to be read: reading goes on until a
            // head, the end of the stream or a read error (the route timeout bounds it all).
            match ready!(self.poll_fill(cx)) {
                Ok(0) => return Poll::Ready(Err(UpstreamError::ConnectionTerminated.into())),
                Ok(_) => s.received = true,
                Err(e) => return Poll::Ready(Err(classify_io(&e).into())),
            }
        }
    }

    /// Reads more into the read buffer. `Ok(0)` is the end of the stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let want = self.read_size;
        if self.rbuf.capacity() - self.rbuf.len() < want / 4 {
            self.rbuf.reserve(want);
        }
        let spare = self.rbuf.capacity() - self.rbuf.len();
        let n = ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut self.io),
            cx,
            &mut self.rbuf
        ))?;
        if n == spare && n >= want && want < MAX_READ {
            self.read_size = want * 2;
        }
        Poll::Ready(Ok(n))
    }

    /// Parses a complete response head from the read buffer, skipping interim (1xx) responses
    /// other than 101. `None`: not complete yet.
    fn parse_head(&mut self) -> Result<Option<Head>, ProxyError> {
        loop {
            let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
            let mut parsed = httparse::Response::new(&mut []);
            let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
                &mut parsed,
                &self.rbuf,
                &mut slots,
            ) {
                Ok(httparse::Status::Complete(len)) if len <= MAX_HEAD => len,
                Ok(httparse::Status::Partial) if self.rbuf.len() <= MAX_HEAD => return Ok(None),
                _ => return Err(UpstreamError::ProtocolError.into()),
            };
            let code = parsed.code.unwrap_or(0);
            if (100..200).contains(&code) && code != 101 {
                // 100 Continue, 103 Early Hints: not the response.
                self.rbuf.advance(len);
                continue;
            }
            let head = Head::from_parsed(&parsed)?;
            self.rbuf.advance(len);
            return Ok(Some(head));
        }
    }
}

/// An upstream connection after `101 Switching Protocols`, for the tunnel.
#[derive(Debug)]
pub struct Upgraded {
    /// Bytes of the new protocol that arrived with the 101 (the tunnel sends them on first).
    pub read_ahead: Bytes,
    /// The connection.
    pub io: Stream,
}
