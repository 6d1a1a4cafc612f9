//! spillway's HTTP/1.1 client for upstream connections.
//!
//! A request's own task drives its upstream connection: it writes the request head (and body),
//! reads the response head, and later reads the response body as the downstream connection asks
//! for it. There is no connection task and no channel between the two: replacing hyper's
//! client connection with this took spillway from about 37,700 to 30,300 instructions per
//! proxied request (`benches/callgrind.sh`). One connection carries one exchange at a time;
//! between exchanges it waits in its endpoint's pool (`pool.rs`).
//!
//! The parsing itself is httparse's (the parser hyper uses); this module adds the HTTP/1.1
//! message framing of RFC 9112 §6: which responses have no body, `Content-Length` (every value
//! must agree), `Transfer-Encoding: chunked` (with trailers), and bodies delimited by the
//! connection closing. A connection is only reused when its response was framed, fully read,
//! nothing extra arrived after it, and neither side asked to close.

use std::future::poll_fn;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, HOST, TRANSFER_ENCODING};
use http::{request, HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::body::RequestBody;
use super::connector::Stream;
use super::headers::{self, Overlay};
use super::pool::Http1Pool;
use super::upstream::classify_io;
use crate::error::{ProxyError, UpstreamError};

/// Largest response head (status line and header fields) accepted.
const MAX_HEAD: usize = 64 * 1024;
/// Most header fields in a response head.
const MAX_HEADERS: usize = 100;
/// Largest trailer section accepted.
const MAX_TRAILERS: usize = 64 * 1024;
/// Smallest header map a response head is parsed into (see `Head::from_parsed`).
const RESPONSE_MAP_MIN: usize = 12;
/// Longest chunk-size line (size and extensions) accepted.
const MAX_CHUNK_LINE: usize = 4 * 1024;
/// First read size. Reads that fill it double it (large bodies move in fewer, larger reads), up
/// to `MAX_READ`; a connection going back to its pool drops back to this size.
const MIN_READ: usize = 8 * 1024;
const MAX_READ: usize = 256 * 1024;

/// One HTTP/1.1 connection to an upstream endpoint, with its buffers.
#[derive(Debug)]
pub struct Conn {
    io: Stream,
    /// Bytes read and not yet consumed.
    rbuf: BytesMut,
    read_size: usize,
    /// The request head (later a chunk's size line) being written.
    wbuf: Vec<u8>,
    /// Whether an exchange has already completed on it: a failure on a reused connection before
    /// any of the response arrived may be the keep-alive race.
    reused: bool,
}

/// Why an exchange failed.
#[derive(Debug)]
pub struct SendError {
    /// What the client is told.
    pub error: ProxyError,
    /// The connection had served before and died before any byte of the response arrived: for
    /// a bodyless idempotent request the app cannot have acted on it, so it may be sent again
    /// on a fresh connection (the caller checks the request).
    pub stale: bool,
}

impl Conn {
    /// A fresh connection over `io`. Boxed: it moves between pool, request and response
    /// body, and a pointer is cheaper to move than its buffers.
    pub fn new(io: Stream) -> Box<Self> {
        Box::new(Conn {
            io,
            rbuf: BytesMut::with_capacity(MIN_READ),
            read_size: MIN_READ,
            wbuf: Vec::with_capacity(512),
            reused: false,
        })
    }

    /// Whether the connection still looks usable after sitting idle: nothing arrived on it (no
    /// close, no reset, no stray bytes such as an unsolicited 408). While nothing arrived this
    /// costs no system call: tokio's readiness state answers first.
    pub fn is_open(&mut self) -> bool {
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
    pub async fn send(
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
                        return Poll::Ready(Err(ProxyError::BadRequest))
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

/// How the request body is framed on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RequestFraming {
    /// No body.
    None,
    /// `Content-Length` (the client's, forwarded): bytes as they come, this many of them.
    Length(u64),
    /// A body of unknown length: chunked.
    Chunked,
}

/// The framing a request needs: a `Content-Length` the client sent is kept (the downstream
/// server has already checked the body against it); a body without one goes chunked.
fn request_framing(headers: &HeaderMap, body: &RequestBody) -> RequestFraming {
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
fn encode_head(
    buf: &mut Vec<u8>,
    parts: &request::Parts,
    framing: RequestFraming,
    default_host: &HeaderValue,
) {
    buf.clear();
    buf.extend_from_slice(parts.method.as_str().as_bytes());
    buf.push(b' ');
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
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
                headers::field(buf, b"host", default_host.as_bytes());
            }
        }
    }
    if framing == RequestFraming::Chunked {
        buf.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    buf.extend_from_slice(b"\r\n");
}

/// Writes header (or trailer) fields, one `name: value` line each.
fn write_fields(buf: &mut Vec<u8>, fields: &HeaderMap) {
    for (name, value) in fields {
        headers::field(buf, name.as_str().as_bytes(), value.as_bytes());
    }
}

/// The request on its way out: the head (then each chunk-size line) in the connection's
/// `wbuf`, the current body frame, and the chunk terminator.
#[derive(Debug)]
struct Sending {
    body: RequestBody,
    framing: RequestFraming,
    body_done: bool,
    /// How much of `wbuf` is written.
    written: usize,
    data: Bytes,
    suffix: &'static [u8],
    flushed: bool,
    /// Whether any byte of a response arrived.
    received: bool,
}

#[derive(Debug)]
enum WriteError {
    Upstream(io::Error),
    RequestBody,
}

impl Sending {
    fn pending(&self) -> usize {
        self.data.len() + self.suffix.len()
    }

    /// Everything written and flushed.
    fn done(&self, conn: &Conn) -> bool {
        self.body_done && self.flushed && self.pending() == 0 && self.written == conn.wbuf.len()
    }

    /// Writes on until done or blocked. `Err`: the upload failed (the upstream stopped reading,
    /// or the client's body failed); the response may still be read.
    fn drive(&mut self, conn: &mut Conn, cx: &mut Context<'_>) -> Poll<Result<(), WriteError>> {
        while !self.done(conn) {
            ready!(self.poll_write(conn, cx))?;
        }
        Poll::Ready(Ok(()))
    }

    /// Makes one step: takes the next body frame when everything before it is written, writes,
    /// or flushes. `Ready(Ok)` when something happened.
    fn poll_write(
        &mut self,
        conn: &mut Conn,
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
    fn poll_body(&mut self, conn: &mut Conn, cx: &mut Context<'_>) -> Poll<Result<(), WriteError>> {
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

/// How a response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ResponseFraming {
    Length(u64),
    Chunked,
    UntilClose,
    /// 101 Switching Protocols: what follows is the upgraded protocol.
    Upgrade,
}

/// A parsed response head.
#[derive(Debug)]
struct Head {
    status: StatusCode,
    headers: HeaderMap,
    framing: ResponseFraming,
    keep_alive: bool,
}

impl Head {
    fn from_parsed(parsed: &httparse::Response<'_, '_>) -> Result<Head, ProxyError> {
        let bad = || ProxyError::from(UpstreamError::ProtocolError);
        let status = StatusCode::from_u16(parsed.code.unwrap_or(0)).map_err(|_| bad())?;
        let http11 = parsed.version == Some(1);
        // Room for what spillway adds on the way down (x-served-by, x-request-id), so the map
        // is allocated once. And at least RESPONSE_MAP_MIN: once hyper has written the response
        // it keeps this map (emptied) for the next request on the client connection, and
        // spillway adds up to six headers to that request: with room for them it never grows.
        let mut headers =
            HeaderMap::with_capacity((parsed.headers.len() + 3).max(RESPONSE_MAP_MIN));
        let mut length: Option<u64> = None;
        let mut chunked = None;
        let mut close = !http11;
        for h in parsed.headers.iter() {
            let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| bad())?;
            let value = HeaderValue::from_bytes(h.value).map_err(|_| bad())?;
            if name == CONTENT_LENGTH {
                // Repeated or listed values must all agree (RFC 9110 §8.6).
                for v in h.value.split(|&b| b == b',') {
                    let n = parse_length(v.trim_ascii()).ok_or_else(bad)?;
                    if length.is_some_and(|l| l != n) {
                        return Err(bad());
                    }
                    length = Some(n);
                }
            } else if name == TRANSFER_ENCODING {
                // Chunked only when it is the last coding applied (RFC 9112 §6.3).
                let last = h.value.rsplit(|&b| b == b',').next().unwrap_or(b"");
                chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
            } else if name == CONNECTION {
                for token in h.value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                    if token.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if token.eq_ignore_ascii_case(b"keep-alive") && !http11 {
                        close = false;
                    }
                }
            }
            headers.append(name, value);
        }
        let framing = if status == StatusCode::SWITCHING_PROTOCOLS {
            ResponseFraming::Upgrade
        } else if status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
            ResponseFraming::Length(0)
        } else {
            match (chunked, length) {
                (Some(true), _) => ResponseFraming::Chunked,
                (Some(false), _) => ResponseFraming::UntilClose,
                (None, Some(n)) => ResponseFraming::Length(n),
                (None, None) => ResponseFraming::UntilClose,
            }
        };
        if chunked.is_some() && length.is_some() {
            // Both: Transfer-Encoding wins, and the length must not travel on (RFC 9112 §6.3);
            // such a message may be an attempt at smuggling, so the connection is not reused.
            headers.remove(CONTENT_LENGTH);
            close = true;
        }
        Ok(Head {
            status,
            headers,
            keep_alive: !close && framing != ResponseFraming::UntilClose,
            framing,
        })
    }
}

/// A `Content-Length` value: digits only.
fn parse_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// Where a response body stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decoder {
    /// This many bytes still to come.
    Length(u64),
    Chunked(Chunk),
    /// Everything until the upstream closes.
    UntilClose,
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk's data.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailers, then the final CRLF.
    Trailers,
}

/// A response body read straight from its upstream connection. The connection goes back to
/// its pool the moment the body has ended cleanly; a body that fails or is dropped early closes
/// it (the rest of that response is still on the wire).
#[derive(Debug)]
pub struct Http1Body {
    conn: Option<Box<Conn>>,
    /// The rest of a request the upstream answered before reading all of it.
    sending: Option<Box<Sending>>,
    decoder: Decoder,
    keep_alive: bool,
    upgraded: bool,
    home: Arc<Http1Pool>,
}

/// What one decoding step found in the read buffer.
enum Step {
    Frame(Frame<Bytes>),
    End,
    NeedMore,
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
                if conn.rbuf.capacity() > 2 * MIN_READ {
                    conn.rbuf = BytesMut::with_capacity(MIN_READ);
                }
                conn.read_size = MIN_READ;
                self.home.put(conn);
            }
        }
    }

    fn ended(&self) -> bool {
        matches!(self.decoder, Decoder::Done | Decoder::Length(0))
    }
}

/// Decodes what the read buffer holds.
fn step(decoder: &mut Decoder, rbuf: &mut BytesMut) -> io::Result<Step> {
    let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
    loop {
        match decoder {
            Decoder::Done => return Ok(Step::End),
            Decoder::Length(0) => return Ok(Step::End),
            Decoder::Length(left) => {
                return Ok(take(left, rbuf).map_or(Step::NeedMore, |d| Step::Frame(Frame::data(d))));
            }
            Decoder::UntilClose => {
                if rbuf.is_empty() {
                    return Ok(Step::NeedMore);
                }
                return Ok(Step::Frame(Frame::data(rbuf.split().freeze())));
            }
            Decoder::Chunked(chunk) => match chunk {
                Chunk::Size => match httparse::parse_chunk_size(rbuf) {
                    Ok(httparse::Status::Complete((used, size))) => {
                        rbuf.advance(used);
                        *chunk = if size == 0 {
                            Chunk::Trailers
                        } else {
                            Chunk::Data(size)
                        };
                    }
                    Ok(httparse::Status::Partial) if rbuf.len() <= MAX_CHUNK_LINE => {
                        return Ok(Step::NeedMore)
                    }
                    _ => return Err(invalid("bad chunk size line")),
                },
                Chunk::Data(left) => {
                    let Some(data) = take(left, rbuf) else {
                        return Ok(Step::NeedMore);
                    };
                    if *left == 0 {
                        *chunk = Chunk::DataEnd;
                    }
                    return Ok(Step::Frame(Frame::data(data)));
                }
                Chunk::DataEnd => {
                    if rbuf.len() < 2 {
                        return Ok(Step::NeedMore);
                    }
                    if &rbuf[..2] != b"\r\n" {
                        return Err(invalid("chunk data not followed by CRLF"));
                    }
                    rbuf.advance(2);
                    *chunk = Chunk::Size;
                }
                Chunk::Trailers => {
                    let mut slots = [httparse::EMPTY_HEADER; 64];
                    match httparse::parse_headers(rbuf, &mut slots) {
                        Ok(httparse::Status::Complete((used, fields))) => {
                            let mut trailers = HeaderMap::new();
                            for f in fields {
                                let name = HeaderName::from_bytes(f.name.as_bytes())
                                    .map_err(|_| invalid("bad trailer name"))?;
                                let value = HeaderValue::from_bytes(f.value)
                                    .map_err(|_| invalid("bad trailer value"))?;
                                trailers.append(name, value);
                            }
                            rbuf.advance(used);
                            *decoder = Decoder::Done;
                            if !trailers.is_empty() {
                                return Ok(Step::Frame(Frame::trailers(trailers)));
                            }
                        }
                        Ok(httparse::Status::Partial) if rbuf.len() <= MAX_TRAILERS => {
                            return Ok(Step::NeedMore)
                        }
                        _ => return Err(invalid("bad trailer section")),
                    }
                }
            },
        }
    }
}

/// Up to `left` bytes of what the read buffer holds (`None` when it holds nothing).
fn take(left: &mut u64, rbuf: &mut BytesMut) -> Option<Bytes> {
    if rbuf.is_empty() {
        return None;
    }
    let n = (*left).min(rbuf.len() as u64) as usize;
    *left -= n as u64;
    Some(rbuf.split_to(n).freeze())
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

/// An upstream connection after `101 Switching Protocols`, for the tunnel.
#[derive(Debug)]
pub struct Upgraded {
    /// Bytes of the new protocol that arrived with the 101 (the tunnel sends them on first).
    pub read_ahead: Bytes,
    /// The connection.
    pub io: Stream,
}
