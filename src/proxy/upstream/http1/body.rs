//! The response body of an HTTP/1.1 upstream exchange, read straight from its connection; the
//! connection goes back to its pool the moment the body has ended cleanly.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use super::encode::Sending;
use super::pool::Http1Pool;
use super::{Http1Connection, Upgraded, MIN_READ};
use crate::http1::decode::{step, Decoder, Step};

/// A response body read straight from its upstream connection. The connection goes back to
/// its pool the moment the body has ended cleanly; a body that fails or is dropped early closes
/// it (the rest of that response is still on the wire).
#[derive(Debug)]
pub struct Http1Body {
    pub(super) conn: Option<Box<Http1Connection>>,
    /// The rest of a request the upstream answered before reading all of it.
    pub(super) sending: Option<Box<Sending>>,
    pub(super) decoder: Decoder,
    pub(super) keep_alive: bool,
    pub(super) upgraded: bool,
    pub(super) home: Arc<Http1Pool>,
}

impl Http1Body {
    /// After a `101 Switching Protocols`: the connection, now speaking the upgraded protocol,
    /// with any bytes of it already read. `None` for any other response.
    pub fn into_upgraded(mut self) -> Option<Upgraded> {
        if !self.upgraded {
            return None;
        }
        let conn = *self.conn.take()?;
        Some(Upgraded {
            read_ahead: conn.rbuf.freeze(),
            io: conn.io,
        })
    }

    /// The body has ended cleanly: the connection goes home if it can serve again.
    fn finish(&mut self) {
        self.decoder = Decoder::Done;
        if let Some(mut conn) = self.conn.take() {
            // Reusable only when the request went out whole and nothing came beyond the
            // response (extra bytes: the upstream is not speaking HTTP as we understand it).
            if self.keep_alive && self.sending.is_none() && conn.rbuf.is_empty() {
                conn.reused = true;
                conn.read_size = MIN_READ;
                self.home.put(conn);
            }
        }
    }

    fn ended(&self) -> bool {
        matches!(self.decoder, Decoder::Done | Decoder::Length(0))
    }
}

impl Body for Http1Body {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            if let Some(sending) = this.sending.as_mut() {
                match sending.drive(conn, cx) {
                    Poll::Ready(Ok(())) => this.sending = None,
                    Poll::Ready(Err(_)) => {
                        // The rest of the request is lost: the connection cannot serve again.
                        this.keep_alive = false;
                        this.sending = None;
                    }
                    Poll::Pending => {}
                }
            }
            match step(&mut this.decoder, &mut conn.rbuf) {
                Ok(Step::Frame(frame)) => {
                    // A length-delimited body is over with its last byte: hand the connection
                    // back now, before the end is even polled for.
                    if this.ended() {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(frame)));
                }
                Ok(Step::End) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(Step::NeedMore) => {}
                Err(e) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(e)));
                }
            }
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match ready!(conn.poll_fill(cx)) {
                Ok(0) if this.decoder == Decoder::UntilClose => {
                    this.keep_alive = false;
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(io::ErrorKind::UnexpectedEof.into())));
                }
                Ok(_) => {}
                Err(e) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(e)));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended()
    }

    fn size_hint(&self) -> SizeHint {
        match self.decoder {
            Decoder::Length(n) => SizeHint::with_exact(n),
            Decoder::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

impl Drop for Http1Body {
    fn drop(&mut self) {
        // Nothing left to read (HEAD, 204, 304, an empty body nobody polled): reusable.
        if self.ended() && !self.upgraded {
            self.finish();
        }
    }
}
