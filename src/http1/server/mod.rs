//! spillway's downstream HTTP/1.1 server: one task per connection reads each request head
//! itself ([`crate::http1::request`]), hands the request to a [`Handler`], and writes the
//! response. HTTP/2 connections are recognised by their preface and handed back to the caller
//! (hyper serves those).
//!
//! Owning the HTTP/1.1 side lets spillway answer malformed and oversized input itself, stamped
//! and counted like every response it generates, bound what a connection holds while idle (no
//! buffers at all), and enforce the listener's header and idle timeouts exactly.

mod body;
mod conn;
pub(crate) mod io;
pub(crate) mod upgrade;

use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};

pub(crate) use body::BodyReader;
use io::{ClientIo, Rewind};

use crate::error::RequestError;
use crate::http1::request::HeadLimits;

/// A listener's settings for its HTTP/1.1 connections.
#[derive(Debug, Clone)]
pub(crate) struct ServerSettings {
    /// Limits on each request head.
    pub head: HeadLimits,
    /// How long a new connection may take to send its first head, and any head may take once
    /// its first byte arrived.
    pub header_timeout: Duration,
    /// How long a kept-alive connection may sit between requests.
    pub idle_timeout: Duration,
}

/// What the server asks of the application.
pub(crate) trait Handler {
    /// The response body.
    type Body: http_body::Body<Data = Bytes> + Send;
    /// The answer to one request (it cannot fail: every error is a response).
    type Future: Future<Output = Result<Response<Self::Body>, Infallible>> + Send;

    /// Answers a request.
    fn call(&self, req: Request<BodyReader>) -> Self::Future;

    /// The response to a request refused before it could be handled (a head over the limits,
    /// broken framing): stamped and counted like every response spillway generates.
    fn refuse(&self, error: RequestError) -> Response<Self::Body>;
}

/// How a connection left the HTTP/1.1 server.
#[derive(Debug)]
pub(crate) enum Served {
    /// It ended (closed by either side, timed out, drained).
    Closed,
    /// It switched protocols; the tunnel has it.
    Upgraded,
    /// It speaks HTTP/2: the stream, with what was read of it put back in front.
    Http2(Rewind<ClientIo>),
}

/// Serves HTTP/1.1 on `io` until the connection ends or is handed on. `draining` is asked
/// whenever the connection could close gracefully (between requests) or must say it will
/// (`Connection: close` on a response): true while spillway drains, or is short of memory.
pub(crate) async fn serve<H: Handler>(
    io: ClientIo,
    handler: &H,
    settings: &ServerSettings,
    draining: &(dyn Fn() -> bool + Sync),
) -> Served {
    conn::serve(io, handler, settings, draining).await
}
