//! A request body, read straight from the client connection by whoever forwards it.
//!
//! The connection's byte stream and read buffer sit behind one uncontended lock shared by the
//! connection's driver and the body of its current request: while the body is being read the
//! driver leaves the stream alone, and once the body has ended (or its reader is gone) the
//! driver reads the next request from the same buffer. The lock is only held inside a poll,
//! never across an await.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{ready, Context, Poll};

use bytes::{Bytes, BytesMut};
use http::header::{
    HeaderName, AUTHORIZATION, CACHE_CONTROL, CONNECTION, CONTENT_ENCODING, CONTENT_LENGTH,
    CONTENT_RANGE, CONTENT_TYPE, COOKIE, EXPECT, HOST, MAX_FORWARDS, PRAGMA, PROXY_AUTHORIZATION,
    RANGE, SET_COOKIE, TE, TRAILER, TRANSFER_ENCODING, UPGRADE,
};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use tokio::io::AsyncWrite;

use super::io::ClientIo;
use crate::http1::decode::{step, Chunk, Decoder, Step};
use crate::http1::request::BodyFraming;

/// The interim response sent when a client waits for one before its body.
const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";
/// Reads while a body is being received are at least this large.
const BODY_READ: usize = 8 * 1024;

/// What the connection's driver and the current request's body share.
#[derive(Debug)]
pub(super) struct Shared {
    /// The connection; `None` once it was handed over (an upgrade, HTTP/2).
    pub(super) io: Option<ClientIo>,
    /// Bytes read and not yet consumed (empty, and without capacity, while idle).
    pub(super) rbuf: BytesMut,
    /// Where the current request's body stands.
    pub(super) body: BodyState,
}

/// Where a request body stands.
#[derive(Debug)]
pub(super) enum BodyState {
    /// No body, or it was read to its end.
    Done,
    /// Being read.
    Reading {
        decoder: Decoder,
        /// Bytes of `100 Continue` still to write before the first read; 0 when none is due.
        continue_left: usize,
    },
    /// It broke (the client went away, or sent broken framing): the connection cannot serve
    /// another request.
    Failed,
}

pub(super) type SharedConn = Arc<Mutex<Shared>>;

pub(super) fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    // Nothing panics while holding it; a poisoned lock must not take the connection down.
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

impl BodyState {
    /// The state for a body framed as `framing`.
    pub(super) fn start(framing: BodyFraming, expect_continue: bool) -> BodyState {
        let decoder = match framing {
            BodyFraming::None => return BodyState::Done,
            BodyFraming::Length(n) => Decoder::Length(n),
            BodyFraming::Chunked => Decoder::Chunked(Chunk::Size),
        };
        BodyState::Reading {
            decoder,
            continue_left: if expect_continue { CONTINUE.len() } else { 0 },
        }
    }
}

/// The body of a request on an HTTP/1.1 connection.
#[derive(Debug)]
pub(crate) struct BodyReader {
    /// `None` for a request without a body.
    shared: Option<SharedConn>,
    /// The exact length, when `Content-Length` gave one.
    length: Option<u64>,
    /// Whether it has reached its end (or failed): no more frames.
    ended: bool,
}

impl BodyReader {
    pub(super) fn new(shared: Option<SharedConn>, framing: BodyFraming) -> Self {
        BodyReader {
            length: match framing {
                BodyFraming::Length(n) => Some(n),
                _ => None,
            },
            ended: shared.is_none(),
            shared,
        }
    }
}

impl Body for BodyReader {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        let Some(shared) = self.shared.clone() else {
            return Poll::Ready(None);
        };
        let mut guard = lock(&shared);
        let polled = guard.poll_body(cx);
        drop(guard);
        match &polled {
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => self.ended = true,
            Poll::Ready(Some(Ok(_))) | Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.length == Some(0)
    }

    fn size_hint(&self) -> SizeHint {
        match self.length {
            Some(n) if !self.ended => SizeHint::with_exact(n),
            _ if self.ended => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

impl Shared {
    /// The next frame of the request body, reading from the connection as needed.
    fn poll_body(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        loop {
            let Shared { io, rbuf, body } = self;
            let BodyState::Reading {
                decoder,
                continue_left,
            } = body
            else {
                return Poll::Ready(None);
            };
            let Some(io) = io.as_mut() else {
                *body = BodyState::Failed;
                return Poll::Ready(Some(Err(io::ErrorKind::NotConnected.into())));
            };
            // The client waits for this before it sends the body (RFC 9110 §10.1.1).
            while *continue_left > 0 {
                let from = CONTINUE.len() - *continue_left;
                match ready!(Pin::new(&mut *io).poll_write(cx, &CONTINUE[from..])) {
                    Ok(0) | Err(_) => {
                        *body = BodyState::Failed;
                        return Poll::Ready(Some(Err(io::ErrorKind::BrokenPipe.into())));
                    }
                    Ok(n) => *continue_left -= n,
                }
                if *continue_left == 0 {
                    let _ = Pin::new(&mut *io).poll_flush(cx);
                }
            }
            match step(decoder, rbuf) {
                Ok(Step::Frame(frame)) => {
                    let frame = match frame.into_trailers() {
                        Ok(trailers) => Frame::trailers(allowed_trailers(trailers)),
                        Err(frame) => frame,
                    };
                    if matches!(decoder, Decoder::Done | Decoder::Length(0)) {
                        *body = BodyState::Done;
                    }
                    return Poll::Ready(Some(Ok(frame)));
                }
                Ok(Step::End) => {
                    *body = BodyState::Done;
                    return Poll::Ready(None);
                }
                Ok(Step::NeedMore) => {}
                Err(e) => {
                    *body = BodyState::Failed;
                    return Poll::Ready(Some(Err(e)));
                }
            }
            if rbuf.capacity() - rbuf.len() < BODY_READ / 4 {
                rbuf.reserve(BODY_READ);
            }
            match ready!(tokio_util::io::poll_read_buf(Pin::new(io), cx, rbuf)) {
                Ok(0) => {
                    // The client closed before its body ended.
                    *body = BodyState::Failed;
                    return Poll::Ready(Some(Err(io::ErrorKind::UnexpectedEof.into())));
                }
                Ok(_) => {}
                Err(e) => {
                    *body = BodyState::Failed;
                    return Poll::Ready(Some(Err(e)));
                }
            }
        }
    }

    /// Reads and throws away what is left of a request body nobody read, so the connection can
    /// serve again. `Ready(true)`: the body ended; `Ready(false)`: it cannot (it broke).
    pub(super) fn poll_discard_body(&mut self, cx: &mut Context<'_>) -> Poll<bool> {
        loop {
            match ready!(self.poll_body(cx)) {
                Some(Ok(_)) => {}
                Some(Err(_)) => return Poll::Ready(false),
                None => return Poll::Ready(matches!(self.body, BodyState::Done)),
            }
        }
    }
}

/// Request trailers without the fields RFC 9110 §6.5.1 forbids there: framing, routing,
/// request modifiers, authentication, and content metadata. An app must not be made to act
/// on a `content-length` or `host` that arrived after the body.
fn allowed_trailers(mut trailers: HeaderMap) -> HeaderMap {
    const FORBIDDEN: [HeaderName; 20] = [
        CONTENT_LENGTH,
        TRANSFER_ENCODING,
        TRAILER,
        TE,
        CONNECTION,
        UPGRADE,
        HOST,
        AUTHORIZATION,
        PROXY_AUTHORIZATION,
        COOKIE,
        SET_COOKIE,
        CONTENT_TYPE,
        CONTENT_ENCODING,
        CONTENT_RANGE,
        RANGE,
        CACHE_CONTROL,
        EXPECT,
        MAX_FORWARDS,
        PRAGMA,
        HeaderName::from_static("keep-alive"),
    ];
    if trailers.keys().any(|k| FORBIDDEN.contains(k)) {
        for name in FORBIDDEN {
            trailers.remove(name);
        }
    }
    let conditionals: Vec<HeaderName> = trailers
        .keys()
        .filter(|k| k.as_str().starts_with("if-"))
        .cloned()
        .collect();
    for name in conditionals {
        trailers.remove(name);
    }
    trailers
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    #[test]
    fn forbidden_trailer_fields_are_dropped_and_the_rest_kept() {
        let mut t = HeaderMap::new();
        for (n, v) in [
            ("content-length", "5"),
            ("host", "evil"),
            ("if-match", "x"),
            ("x-checksum", "abc"),
            ("grpc-status", "0"),
        ] {
            t.insert(HeaderName::from_static(n), HeaderValue::from_static(v));
        }
        let kept = allowed_trailers(t);
        let mut names: Vec<&str> = kept.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["grpc-status", "x-checksum"]);
    }
}
