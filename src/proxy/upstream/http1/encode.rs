//! Writing a request to an upstream connection: the head in origin form with the forwarding
//! headers, then the body as it arrives, with `Content-Length` kept or chunked framing added.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use http::header::{CONTENT_LENGTH, HOST};
use http::{request, HeaderMap, HeaderValue};
use http_body::Body;
use tokio::io::AsyncWrite;

use super::Http1Connection;
use crate::http1::decode::parse_length;
use crate::http1::encode::{field, fields as write_fields};
use crate::proxy::headers::Overlay;
use crate::proxy::upstream::RequestBody;

/// How the request body is framed on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RequestFraming {
    /// No body.
    None,
    /// `Content-Length` (the client's, forwarded): bytes as they come, this many of them.
    Length(u64),
    /// A body of unknown length: chunked.
    Chunked,
}

/// The framing a request needs: a `Content-Length` the client sent is kept (the downstream
/// server has already checked the body against it); a body without one goes chunked.
pub(super) fn request_framing(headers: &HeaderMap, body: &RequestBody) -> RequestFraming {
    if let Some(n) = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| parse_length(v.as_bytes().trim_ascii()))
    {
        RequestFraming::Length(n)
    } else if body.is_end_stream() {
        RequestFraming::None
    } else {
        RequestFraming::Chunked
    }
}

/// Writes the request head in origin form, with the forwarding [`Overlay`] when the request
/// carries one. Header names and values were validated by the `http` types on the way in (no
/// CR or LF can appear).
pub(super) fn encode_head(
    buf: &mut Vec<u8>,
    parts: &request::Parts,
    framing: RequestFraming,
    default_host: &HeaderValue,
) {
    buf.clear();
    buf.extend_from_slice(parts.method.as_str().as_bytes());
    buf.push(b' ');
    // CONNECT's target is the authority (RFC 9112 §3.2.3); everything else goes in origin form.
    let target = if parts.method == http::Method::CONNECT {
        parts.uri.authority().map_or("", |a| a.as_str())
    } else {
        parts.uri.path_and_query().map_or("/", |p| p.as_str())
    };
    buf.extend_from_slice(if target.is_empty() {
        b"/"
    } else {
        target.as_bytes()
    });
    buf.extend_from_slice(b" HTTP/1.1\r\n");
    match parts.extensions.get::<Overlay>() {
        Some(overlay) => {
            overlay.write_fields(buf, &parts.headers, parts.uri.authority(), default_host)
        }
        None => {
            write_fields(buf, &parts.headers);
            if !parts.headers.contains_key(HOST) {
                field(buf, b"host", default_host.as_bytes());
            }
        }
    }
    if framing == RequestFraming::Chunked {
        buf.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    buf.extend_from_slice(b"\r\n");
}

/// The request on its way out: the head (then each chunk-size line) in the connection's
/// `wbuf`, the current body frame, and the chunk terminator.
#[derive(Debug)]
pub(super) struct Sending {
    pub(super) body: RequestBody,
    pub(super) framing: RequestFraming,
    pub(super) body_done: bool,
    /// How much of `wbuf` is written.
    pub(super) written: usize,
    pub(super) data: Bytes,
    pub(super) suffix: &'static [u8],
    pub(super) flushed: bool,
    /// Whether any byte of a response arrived.
    pub(super) received: bool,
}

#[derive(Debug)]
pub(super) enum WriteError {
    Upstream(io::Error),
    RequestBody,
}

impl Sending {
    fn pending(&self) -> usize {
        self.data.len() + self.suffix.len()
    }

    /// Everything written and flushed.
    pub(super) fn done(&self, conn: &Http1Connection) -> bool {
        self.body_done && self.flushed && self.pending() == 0 && self.written == conn.wbuf.len()
    }

    /// Writes on until done or blocked. `Err`: the upload failed (the upstream stopped reading,
    /// or the client's body failed); the response may still be read.
    pub(super) fn drive(
        &mut self,
        conn: &mut Http1Connection,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), WriteError>> {
        while !self.done(conn) {
            ready!(self.poll_write(conn, cx))?;
        }
        Poll::Ready(Ok(()))
    }

    /// Makes one step: takes the next body frame when everything before it is written, writes,
    /// or flushes. `Ready(Ok)` when something happened.
    fn poll_write(
        &mut self,
        conn: &mut Http1Connection,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), WriteError>> {
        let head_left = conn.wbuf.len() - self.written;
        if head_left == 0 && self.pending() == 0 {
            if !self.body_done {
                return self.poll_body(conn, cx);
            }
            ready!(Pin::new(&mut conn.io).poll_flush(cx)).map_err(WriteError::Upstream)?;
            self.flushed = true;
            return Poll::Ready(Ok(()));
        }
        // The head goes out together with the first body frame when that is already here.
        if self.written == 0 && !self.body_done && self.data.is_empty() {
            if let Poll::Ready(r) = self.poll_body(conn, cx) {
                r?;
            }
        }
        let slices = [
            io::IoSlice::new(&conn.wbuf[self.written..]),
            io::IoSlice::new(&self.data),
            io::IoSlice::new(self.suffix),
        ];
        let mut n = ready!(Pin::new(&mut conn.io).poll_write_vectored(cx, &slices))
            .map_err(WriteError::Upstream)?;
        if n == 0 {
            return Poll::Ready(Err(WriteError::Upstream(io::ErrorKind::WriteZero.into())));
        }
        let from_head = n.min(conn.wbuf.len() - self.written);
        self.written += from_head;
        n -= from_head;
        let from_data = n.min(self.data.len());
        self.data.advance(from_data);
        n -= from_data;
        self.suffix = &self.suffix[n..];
        if self.written == conn.wbuf.len() && self.pending() == 0 {
            conn.wbuf.clear();
            self.written = 0;
        }
        self.flushed = false;
        Poll::Ready(Ok(()))
    }

    /// Takes the next frame of the request body and frames it (chunk-size line and terminator
    /// for a chunked body; the last chunk and any trailers at its end).
    fn poll_body(
        &mut self,
        conn: &mut Http1Connection,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), WriteError>> {
        let frame = ready!(Pin::new(&mut self.body).poll_frame(cx));
        let chunked = self.framing == RequestFraming::Chunked;
        match frame {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    if let RequestFraming::Length(left) = &mut self.framing {
                        *left = left
                            .checked_sub(data.len() as u64)
                            .ok_or(WriteError::RequestBody)?;
                    }
                    if chunked && !data.is_empty() {
                        use std::io::Write as _;
                        let _ = write!(conn.wbuf, "{:x}\r\n", data.len());
                        self.suffix = b"\r\n";
                    }
                    self.data = data;
                }
                Err(frame) => {
                    // Trailers end a chunked body; with a fixed length there is nowhere to put
                    // them (as in hyper), so they are dropped.
                    if let (true, Ok(trailers)) = (chunked, frame.into_trailers()) {
                        conn.wbuf.extend_from_slice(b"0\r\n");
                        write_fields(&mut conn.wbuf, &trailers);
                        conn.wbuf.extend_from_slice(b"\r\n");
                        self.framing = RequestFraming::None;
                        self.body_done = true;
                    }
                }
            },
            Some(Err(_)) => return Poll::Ready(Err(WriteError::RequestBody)),
            None => {
                match self.framing {
                    RequestFraming::Chunked => conn.wbuf.extend_from_slice(b"0\r\n\r\n"),
                    // Shorter than its Content-Length: the upstream would wait for the rest.
                    RequestFraming::Length(left) if left > 0 => {
                        return Poll::Ready(Err(WriteError::RequestBody))
                    }
                    _ => {}
                }
                self.body_done = true;
            }
        }
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(method: &str, uri: &str, headers: &[(&str, &str)]) -> request::Parts {
        let mut b = http::Request::builder().method(method).uri(uri);
        for (n, v) in headers {
            b = b.header(*n, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn encoded(p: &request::Parts, framing: RequestFraming) -> String {
        let mut buf = Vec::new();
        encode_head(&mut buf, p, framing, &HeaderValue::from_static("app:8080"));
        String::from_utf8(buf).unwrap()
    }

    #[test]
    fn the_head_is_origin_form_with_host_kept_or_supplied() {
        let p = parts(
            "GET",
            "http://a.test/x?y=1",
            &[("host", "a.test"), ("accept", "*/*")],
        );
        assert_eq!(
            encoded(&p, RequestFraming::None),
            "GET /x?y=1 HTTP/1.1\r\nhost: a.test\r\naccept: */*\r\n\r\n"
        );
        // An HTTP/1.0 client sent no Host: HTTP/1.1 needs one, the endpoint's.
        let p = parts("GET", "/", &[]);
        assert_eq!(
            encoded(&p, RequestFraming::None),
            "GET / HTTP/1.1\r\nhost: app:8080\r\n\r\n"
        );
    }

    #[test]
    fn a_body_without_length_goes_chunked_and_a_given_length_is_kept() {
        let p = parts("POST", "/up", &[("host", "a")]);
        assert_eq!(
            encoded(&p, RequestFraming::Chunked),
            "POST /up HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n"
        );
        let with_length = parts("POST", "/up", &[("content-length", " 12 ")]);
        assert_eq!(
            request_framing(&with_length.headers, &RequestBody::Empty),
            RequestFraming::Length(12)
        );
        let none = parts("GET", "/", &[]);
        assert_eq!(
            request_framing(&none.headers, &RequestBody::Empty),
            RequestFraming::None
        );
    }
}
