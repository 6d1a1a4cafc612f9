//! One downstream HTTP/1.1 connection, driven from its own task: read a request head, hand the
//! request to the handler, write its response, and again while the connection stays alive.
//!
//! Between requests a connection holds no read or write buffer: a head is read through a stack
//! buffer and only what arrived is kept, and both buffers are given up when the connection
//! goes idle. What a hostile or broken client sends is answered here, before anything is
//! forwarded: a head over the limits (431, 414), broken framing (400), an unknown transfer
//! coding (501), a connection that sends nothing (closed after `header_timeout`), one that
//! goes quiet between requests (closed after `idle_timeout`).

use std::future::{poll_fn, Future};
use std::io;
use std::mem::MaybeUninit;
use std::pin::{pin, Pin};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};

use bytes::{Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, DATE, TRANSFER_ENCODING};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::Body;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use super::body::{lock, BodyReader, BodyState, Shared, SharedConn};
use super::io::{ClientIo, Rewind};
use super::upgrade::{self, Upgraded};
use super::{Handler, Served, ServerSettings};
use crate::error::RequestError;
use crate::http1::request::{self, RequestHead};
use crate::http1::{date, encode};
use crate::spare_timer;

/// What an HTTP/2 client sends first (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The stack buffer a head is first read into: most heads fit, and then only what arrived is
/// copied to the heap.
const FIRST_READ: usize = 4096;
/// Longest a response may wait for the rest of a request body nobody read (an app answered
/// early), and how much of it is read and thrown away, before the connection is closed
/// instead: a close while the client is still sending can reset the connection before the
/// client has read its response.
const LINGER_BYTES: u64 = 1024 * 1024;

/// How one connection ended.
enum Next {
    /// Serve the next request.
    Again,
    /// Close the connection.
    Close,
    /// Hand the connection on.
    HandOff(Served),
}

/// Serves one connection until it closes, is handed to HTTP/2, or is upgraded.
pub(super) async fn serve<H: Handler>(
    io: ClientIo,
    handler: &H,
    settings: &ServerSettings,
    draining: &(dyn Fn() -> bool + Sync),
) -> Served {
    let shared: SharedConn = Arc::new(Mutex::new(Shared {
        io: Some(io),
        rbuf: BytesMut::new(),
        body: BodyState::Done,
    }));
    let mut first = true;
    loop {
        let next = one_exchange(&shared, handler, settings, draining, first).await;
        first = false;
        match next {
            Next::Again => {
                // Idle: give the buffers back. A pipelined request already read stays.
                let mut s = lock(&shared);
                if s.rbuf.is_empty() {
                    s.rbuf = BytesMut::new();
                }
            }
            Next::Close => {
                close(&shared).await;
                return Served::Closed;
            }
            Next::HandOff(served) => return served,
        }
    }
}

/// Reads one request, has it answered and writes the answer.
///
/// Only the wait for a head lives in the connection's task itself; everything after it (the
/// handler's future, the response body) is boxed per request. A connection spends most of its
/// life idle, and its task's size is that of its largest state: kept inline, the busy state
/// would make every idle connection several KiB larger.
async fn one_exchange<H: Handler>(
    shared: &SharedConn,
    handler: &H,
    settings: &ServerSettings,
    draining: &(dyn Fn() -> bool + Sync),
    first: bool,
) -> Next {
    match read_head(shared, settings, draining, first).await {
        HeadRead::Head(head) => Box::pin(exchange(shared, handler, settings, draining, head)).await,
        HeadRead::Closed => Next::Close,
        HeadRead::Http2 => {
            let mut s = lock(shared);
            let prefix = s.rbuf.split().freeze();
            match s.io.take() {
                Some(io) => Next::HandOff(Served::Http2(Rewind::new(prefix, io))),
                None => Next::Close,
            }
        }
        HeadRead::Refused(e) => {
            let resp = handler.refuse(e);
            let _ = Box::pin(write_response(
                shared,
                resp,
                &Method::GET,
                Version::HTTP_11,
                false,
            ))
            .await;
            Next::Close
        }
    }
}

/// Has one request answered and writes the answer.
async fn exchange<H: Handler>(
    shared: &SharedConn,
    handler: &H,
    settings: &ServerSettings,
    draining: &(dyn Fn() -> bool + Sync),
    head: Box<RequestHead>,
) -> Next {
    let RequestHead {
        parts,
        framing,
        keep_alive,
        expect_continue,
        upgrade,
    } = *head;
    let method = parts.method.clone();
    let version = parts.version;
    let body = BodyState::start(framing, expect_continue);
    let has_body = matches!(body, BodyState::Reading { .. });
    lock(shared).body = body;
    let reader = BodyReader::new(has_body.then(|| shared.clone()), framing);
    let mut req = Request::from_parts(parts, reader);
    let upgrade_tx = upgrade.then(|| {
        let (tx, on_upgrade) = upgrade::pair();
        req.extensions_mut().insert(on_upgrade);
        tx
    });

    // Wait for the answer; a client that goes away meanwhile cancels the request.
    let answer = pin!(handler.call(req));
    let Some(Ok(resp)) = answer_or_client_gone(shared, answer, settings).await else {
        return Next::Close;
    };

    let tunnel = resp.status() == StatusCode::SWITCHING_PROTOCOLS
        || (method == Method::CONNECT && resp.status().is_success());
    if tunnel {
        let Some(tx) = upgrade_tx else {
            // Nothing asked to switch: the handler must not answer 101 (it does not).
            return Next::Close;
        };
        if write_response(shared, resp, &method, version, true)
            .await
            .is_err()
        {
            return Next::Close;
        }
        let mut s = lock(shared);
        let read_ahead = s.rbuf.split().freeze();
        if let Some(io) = s.io.take() {
            let _ = tx.send(Upgraded::new(read_ahead, io));
        }
        return Next::HandOff(Served::Upgraded);
    }
    drop(upgrade_tx);

    let keep_alive = keep_alive && !draining();
    let Ok(framed) = write_response(shared, resp, &method, version, keep_alive).await else {
        return Next::Close;
    };
    if !keep_alive || !framed {
        return Next::Close;
    }
    if !finish_request_body(shared, settings).await {
        return Next::Close;
    }
    Next::Again
}

/// What waiting for a request head found.
enum HeadRead {
    Head(Box<RequestHead>),
    /// The client closed, sent nothing in time, or the connection is draining.
    Closed,
    /// The client speaks HTTP/2 (prior knowledge): its preface is in the read buffer.
    Http2,
    /// The head is refused: answer and close.
    Refused(RequestError),
}

/// Waits for the next request head. Before the first byte of a head the connection may wait
/// `idle_timeout` (`header_timeout` for a new connection: one that never sends anything is a
/// silent connection, not an idle one); from the first byte on, the whole head must arrive
/// within `header_timeout`.
async fn read_head(
    shared: &SharedConn,
    settings: &ServerSettings,
    draining: &(dyn Fn() -> bool + Sync),
    first: bool,
) -> HeadRead {
    let now = Instant::now();
    let mut started = !lock(shared).rbuf.is_empty();
    let wait = if first || started {
        settings.header_timeout
    } else {
        settings.idle_timeout
    };
    let mut timer = Deadline::new(now + wait);
    poll_fn(|cx| {
        let mut s = lock(shared);
        loop {
            if !s.rbuf.is_empty() {
                if first && is_h2_preface_start(&s.rbuf) {
                    if s.rbuf.len() >= H2_PREFACE.len() {
                        return Poll::Ready(HeadRead::Http2);
                    }
                } else {
                    match request::parse(&mut s.rbuf, settings.head) {
                        Ok(Some(head)) => return Poll::Ready(HeadRead::Head(Box::new(head))),
                        Ok(None) => {}
                        Err(e) => return Poll::Ready(HeadRead::Refused(e)),
                    }
                }
            } else if draining() {
                // Nothing started: close rather than take a new request.
                return Poll::Ready(HeadRead::Closed);
            }
            if timer.poll_elapsed(cx) {
                tracing::debug!(started, "no complete request head in time: closing");
                return Poll::Ready(HeadRead::Closed);
            }
            match ready!(poll_read_some(&mut s, cx)) {
                Ok(0) | Err(_) => return Poll::Ready(HeadRead::Closed),
                Ok(_) => {
                    if !started {
                        started = true;
                        timer.reset(Instant::now() + settings.header_timeout);
                    }
                }
            }
        }
    })
    .await
}

/// Whether the buffer holds the start of the HTTP/2 preface (or all of it).
fn is_h2_preface_start(buf: &[u8]) -> bool {
    let n = buf.len().min(H2_PREFACE.len());
    buf[..n] == H2_PREFACE[..n]
}

/// Reads what has arrived. With an empty buffer the read goes through the stack, so an idle
/// connection never holds a heap buffer waiting for bytes that may not come.
fn poll_read_some(s: &mut Shared, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
    let Some(io) = s.io.as_mut() else {
        return Poll::Ready(Ok(0));
    };
    if s.rbuf.capacity() - s.rbuf.len() >= FIRST_READ {
        return tokio_util::io::poll_read_buf(Pin::new(io), cx, &mut s.rbuf);
    }
    let mut stack = [MaybeUninit::<u8>::uninit(); FIRST_READ];
    let mut buf = ReadBuf::uninit(&mut stack);
    ready!(Pin::new(io).poll_read(cx, &mut buf))?;
    let got = buf.filled();
    if !got.is_empty() {
        if s.rbuf.capacity() - s.rbuf.len() < got.len() {
            s.rbuf.reserve(got.len().max(1024));
        }
        s.rbuf.extend_from_slice(got);
    }
    Poll::Ready(Ok(got.len()))
}

/// Polls the handler's answer; meanwhile, once the request body is done, watches the
/// connection: a client that closes (or resets) has gone away, and its request is cancelled.
/// Bytes of a pipelined next request are kept, up to the head limit.
async fn answer_or_client_gone<F: Future>(
    shared: &SharedConn,
    mut answer: Pin<&mut F>,
    settings: &ServerSettings,
) -> Option<F::Output> {
    let mut watching = true;
    poll_fn(|cx| {
        if let Poll::Ready(resp) = answer.as_mut().poll(cx) {
            return Poll::Ready(Some(resp));
        }
        if watching {
            let mut s = lock(shared);
            if matches!(s.body, BodyState::Done) {
                loop {
                    if s.rbuf.len() >= settings.head.max_bytes {
                        // Enough of the next request is waiting; look no further.
                        watching = false;
                        break;
                    }
                    match poll_read_some(&mut s, cx) {
                        Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(None),
                        Poll::Ready(Ok(_)) => continue,
                        Poll::Pending => break,
                    }
                }
            }
        }
        Poll::Pending
    })
    .await
}

/// How the response body goes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// No body bytes at all (HEAD, 204, 304, 101).
    None,
    /// `Content-Length`.
    Length,
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Until the connection closes (an HTTP/1.0 client, no length known).
    UntilClose,
}

/// Writes a response head and streams its body. `Ok(true)`: written whole and framed, so the
/// connection can serve again; `Ok(false)`: written, but only the close ends it; `Err`: the
/// client went away or the body failed (the connection must close).
async fn write_response<B>(
    shared: &SharedConn,
    resp: Response<B>,
    method: &Method,
    version: Version,
    keep_alive: bool,
) -> Result<bool, ()>
where
    B: Body<Data = Bytes>,
{
    let (parts, body) = resp.into_parts();
    let mut body = pin!(body);
    let status = parts.status;
    // No body, and no length or coding said of one (RFC 9110 §9.3.6 for CONNECT).
    let no_body = *method == Method::HEAD
        || (*method == Method::CONNECT && status.is_success())
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let length = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| crate::http1::decode::parse_length(v.as_bytes()));
    let framing = if no_body {
        Framing::None
    } else if length.is_some() || body.size_hint().exact().is_some() {
        Framing::Length
    } else if version == Version::HTTP_11 {
        Framing::Chunked
    } else {
        Framing::UntilClose
    };
    let keep_alive = keep_alive && framing != Framing::UntilClose;

    let mut w = Vec::with_capacity(256);
    encode::status_line(&mut w, status);
    encode::fields(&mut w, &parts.headers);
    if !parts.headers.contains_key(DATE) {
        w.extend_from_slice(b"date: ");
        date::append_now(&mut w);
        w.extend_from_slice(b"\r\n");
    }
    match framing {
        Framing::Length if length.is_none() => {
            let n = body.size_hint().exact().unwrap_or(0);
            encode::field(&mut w, b"content-length", n.to_string().as_bytes());
        }
        Framing::Chunked => encode::field(&mut w, b"transfer-encoding", b"chunked"),
        _ => {}
    }
    if status != StatusCode::SWITCHING_PROTOCOLS {
        if !keep_alive {
            encode::field(&mut w, b"connection", b"close");
        } else if version == Version::HTTP_10 {
            encode::field(&mut w, b"connection", b"keep-alive");
        }
    }
    debug_assert!(!parts.headers.contains_key(TRANSFER_ENCODING));
    debug_assert!(
        status == StatusCode::SWITCHING_PROTOCOLS || !parts.headers.contains_key(CONNECTION)
    );
    w.extend_from_slice(b"\r\n");

    let mut out = Out { shared, head: w };
    if framing == Framing::None {
        out.write(&[]).await?;
        out.flush().await?;
        // Nothing may follow the head, but the body is still read to its end (for accounting).
        while let Some(frame) = poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
            frame.map_err(|_| ())?;
        }
        return Ok(true);
    }
    let mut left = length.or(body.size_hint().exact());
    loop {
        let frame = match poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
            None => break,
            Some(Ok(frame)) => frame,
            // The body failed after the head went out: end the connection without a clean end,
            // so the client cannot take a truncated body for a whole one.
            Some(Err(_)) => return Err(()),
        };
        match frame.into_data() {
            Ok(data) => {
                if data.is_empty() {
                    continue;
                }
                match framing {
                    Framing::Chunked => {
                        encode::chunk_size(&mut out.head, data.len());
                        out.write(&[&data, b"\r\n"]).await?;
                    }
                    _ => {
                        if let Some(l) = left.as_mut() {
                            let n = data.len() as u64;
                            if n > *l {
                                // More than the length promised: the message would be misread.
                                return Err(());
                            }
                            *l -= n;
                        }
                        out.write(&[&data]).await?;
                    }
                }
            }
            Err(frame) => {
                if let (Framing::Chunked, Ok(trailers)) = (framing, frame.into_trailers()) {
                    out.head.extend_from_slice(b"0\r\n");
                    encode::fields(&mut out.head, &trailers);
                    out.head.extend_from_slice(b"\r\n");
                    out.write(&[]).await?;
                    out.flush().await?;
                    return Ok(keep_alive);
                }
            }
        }
    }
    match framing {
        Framing::Chunked => out.head.extend_from_slice(b"0\r\n\r\n"),
        Framing::Length if left.is_some_and(|l| l > 0) => {
            // Shorter than its length: the client would wait for the rest.
            out.write(&[]).await?;
            return Err(());
        }
        _ => {}
    }
    out.write(&[]).await?;
    out.flush().await?;
    Ok(keep_alive)
}

/// The connection's write side for one response: `head` holds framing bytes still to go out
/// before the next data.
struct Out<'a> {
    shared: &'a SharedConn,
    head: Vec<u8>,
}

impl Out<'_> {
    /// Writes whatever is in `head`, then `data`, all of it.
    async fn write(&mut self, data: &[&[u8]]) -> Result<(), ()> {
        let mut head_done = 0;
        let mut parts: [&[u8]; 3] = [&[], &[], &[]];
        for (slot, d) in parts.iter_mut().skip(1).zip(data) {
            *slot = d;
        }
        let mut skip = 0; // bytes of data parts already written
        let total: usize = data.iter().map(|d| d.len()).sum();
        poll_fn(|cx| {
            let mut s = lock(self.shared);
            let Some(io) = s.io.as_mut() else {
                return Poll::Ready(Err(()));
            };
            loop {
                if head_done == self.head.len() && skip == total {
                    return Poll::Ready(Ok(()));
                }
                parts[0] = &self.head[head_done..];
                let slices = slices_from(&parts, skip);
                let n =
                    match ready!(Pin::new(&mut *io).poll_write_vectored(cx, &slices.0[..slices.1]))
                    {
                        Ok(0) | Err(_) => return Poll::Ready(Err(())),
                        Ok(n) => n,
                    };
                let from_head = n.min(self.head.len() - head_done);
                head_done += from_head;
                skip += n - from_head;
            }
        })
        .await?;
        self.head.clear();
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), ()> {
        poll_fn(|cx| {
            let mut s = lock(self.shared);
            match s.io.as_mut() {
                Some(io) => Pin::new(io).poll_flush(cx).map_err(|_| ()),
                None => Poll::Ready(Err(())),
            }
        })
        .await
    }
}

/// The io slices still to write: the head remainder, then the data parts after skipping `skip`
/// bytes of them.
fn slices_from<'a>(parts: &[&'a [u8]; 3], mut skip: usize) -> ([io::IoSlice<'a>; 3], usize) {
    let mut out = [io::IoSlice::new(&[]); 3];
    let mut n = 0;
    if !parts[0].is_empty() {
        out[n] = io::IoSlice::new(parts[0]);
        n += 1;
    }
    for p in &parts[1..] {
        if skip >= p.len() {
            skip -= p.len();
            continue;
        }
        out[n] = io::IoSlice::new(&p[skip..]);
        skip = 0;
        n += 1;
    }
    (out, n)
}

/// After the response: the request body must have been read to its end before the next request
/// can be read. One nobody read (an app that answered early) is read and thrown away, within
/// bounds; `false` when the connection cannot serve again.
async fn finish_request_body(shared: &SharedConn, settings: &ServerSettings) -> bool {
    {
        let s = lock(shared);
        match s.body {
            BodyState::Done => return true,
            BodyState::Failed => return false,
            BodyState::Reading { decoder, .. } => {
                let small = match decoder {
                    crate::http1::decode::Decoder::Length(n) => n <= LINGER_BYTES,
                    _ => true,
                };
                if !small {
                    return false;
                }
            }
        }
    }
    let mut timer = Deadline::new(Instant::now() + settings.header_timeout);
    let mut read = 0u64;
    poll_fn(|cx| {
        if timer.poll_elapsed(cx) {
            return Poll::Ready(false);
        }
        let mut s = lock(shared);
        let before = s.rbuf.len() as u64;
        let done = s.poll_discard_body(cx);
        read += before.saturating_sub(s.rbuf.len() as u64);
        match done {
            Poll::Ready(ok) => Poll::Ready(ok),
            Poll::Pending if read > LINGER_BYTES => Poll::Ready(false),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

/// Closes the connection: shuts the write side down so the client sees a clean end.
async fn close(shared: &SharedConn) {
    let io = lock(shared).io.take();
    if let Some(mut io) = io {
        use tokio::io::AsyncWriteExt as _;
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), io.shutdown()).await;
    }
}

/// A deadline on the connection's spare timer ([`spare_timer`]), given back when dropped.
struct Deadline {
    sleep: Option<Pin<Box<Sleep>>>,
}

impl Deadline {
    fn new(at: Instant) -> Self {
        Deadline {
            sleep: Some(spare_timer::take(at)),
        }
    }

    fn reset(&mut self, at: Instant) {
        if let Some(s) = self.sleep.as_mut() {
            s.as_mut().reset(at);
        }
    }

    /// Whether it has passed; registers for a wake-up otherwise.
    fn poll_elapsed(&mut self, cx: &mut Context<'_>) -> bool {
        self.sleep
            .as_mut()
            .is_some_and(|s| s.as_mut().poll(cx).is_ready())
    }
}

impl Drop for Deadline {
    fn drop(&mut self) {
        if let Some(s) = self.sleep.take() {
            spare_timer::give_back(s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_skip_what_was_written() {
        let parts: [&[u8]; 3] = [b"", b"hello", b"\r\n"];
        let (s, n) = slices_from(&parts, 3);
        assert_eq!(n, 2);
        assert_eq!(&*s[0], b"lo");
        assert_eq!(&*s[1], b"\r\n");
        let (s, n) = slices_from(&[b"HEAD", b"xy", b""], 0);
        assert_eq!(n, 2);
        assert_eq!((&*s[0], &*s[1]), (&b"HEAD"[..], &b"xy"[..]));
        let (_, n) = slices_from(&[b"", b"xy", b"z"], 3);
        assert_eq!(n, 0);
    }

    #[test]
    fn the_h2_preface_is_recognised_from_its_first_bytes() {
        assert!(is_h2_preface_start(b"PRI"));
        assert!(is_h2_preface_start(H2_PREFACE));
        assert!(!is_h2_preface_start(b"GET / HTTP/1.1\r\n"));
        assert!(!is_h2_preface_start(b"PRX"));
    }
}
