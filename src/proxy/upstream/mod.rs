//! Upstreams, the client side of the proxy: endpoints and their selection, the two transports
//! (HTTP/1.1 over spillway's own [`http1`] client and its per-endpoint pools, HTTP/2 over [`http2`]),
//! connections opened by the [`connector`], failures named by [`classify`], the keep-alive race
//! resend, and [`Forward`], the service at the bottom of every route's stack.

pub(super) mod classify;
pub(super) mod connector;
pub(super) mod http1;
mod http2;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, Scheme};
use http::{HeaderValue, Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use prometheus::Histogram;
use tower::Service as _;

use crate::config::{Priority, UpstreamProtocol, UpstreamSettings};
use crate::error::{ProxyError, ShedReason, UpstreamError};
use crate::http1::server::BodyReader;
use crate::policy::retry::is_idempotent;
use crate::policy::timeout::BodyProgress;
use crate::tls::client::UpstreamTls;
use connector::{ConnectError, Connector};
use http1::pool::{Acquired, Http1Pool, OpenSlot};
use http1::{Http1Body, Http1Connection};
use http2::Http2Clients;

/// Errors a body can end with, boxed for hyper.
pub(super) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A request body on its way to the upstream. `Empty` can be rebuilt at will, which is what
/// lets bodyless idempotent requests be sent again. A client's body reports how it is arriving
/// ([`BodyProgress`]), so that a client that stops sending is not blamed on the app.
#[derive(Debug, Default)]
pub(crate) enum RequestBody {
    /// No body at all.
    #[default]
    Empty,
    /// The body of an HTTP/1.1 client, read from its connection.
    Http1(BodyReader, BodyProgress),
    /// The body of an HTTP/2 client's stream.
    Http2(Incoming, BodyProgress),
}

impl RequestBody {
    /// How the body is arriving, for a body that is still to come.
    pub(crate) fn progress(&self) -> Option<&BodyProgress> {
        match self {
            RequestBody::Empty => None,
            RequestBody::Http1(_, p) | RequestBody::Http2(_, p) => Some(p),
        }
    }
}

impl From<BodyReader> for RequestBody {
    fn from(body: BodyReader) -> Self {
        if body.is_end_stream() {
            RequestBody::Empty
        } else {
            RequestBody::Http1(body, BodyProgress::default())
        }
    }
}

impl From<Incoming> for RequestBody {
    fn from(body: Incoming) -> Self {
        if body.is_end_stream() {
            RequestBody::Empty
        } else {
            RequestBody::Http2(body, BodyProgress::default())
        }
    }
}

/// Polls a client's body, keeping its progress up to date.
fn poll_client<B>(
    body: Pin<&mut B>,
    progress: &BodyProgress,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Frame<Bytes>, BoxError>>>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let polled = body.poll_frame(cx);
    match &polled {
        Poll::Pending => progress.waiting(),
        Poll::Ready(Some(Ok(_))) => progress.arrived(),
        Poll::Ready(None) | Poll::Ready(Some(Err(_))) => progress.ended(),
    }
    polled.map_err(Into::into)
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            RequestBody::Empty => Poll::Ready(None),
            RequestBody::Http1(b, p) => poll_client(Pin::new(b), p, cx),
            RequestBody::Http2(b, p) => poll_client(Pin::new(b), p, cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Empty => true,
            RequestBody::Http1(b, _) => b.is_end_stream(),
            RequestBody::Http2(b, _) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Empty => SizeHint::with_exact(0),
            RequestBody::Http1(b, _) => b.size_hint(),
            RequestBody::Http2(b, _) => b.size_hint(),
        }
    }
}

/// One endpoint of an upstream.
struct Endpoint {
    /// `host:port`, for HTTP/2 request URIs.
    authority: Authority,
    /// What the connector dials.
    connect_uri: Uri,
    /// `Host` for a request that came without one (an HTTP/1.0 client).
    host: HeaderValue,
    /// Idle HTTP/1.1 connections (unused for HTTP/2 upstreams).
    pool: Arc<Http1Pool>,
}

/// How requests travel to an upstream.
enum Transport {
    /// HTTP/1.1: one request per connection at a time, connections kept in a pool per endpoint.
    Http1 { connector: Connector },
    /// HTTP/2: hyper-util's client, which multiplexes requests over one connection per
    /// endpoint and coalesces concurrent connection attempts.
    Http2(Box<Http2Clients>),
}

/// One upstream: its endpoints and connection pools. Shared by every route that uses it and
/// carried over a reload when its settings are unchanged, so pooled connections survive.
pub struct Upstream {
    name: Box<str>,
    endpoints: Box<[Endpoint]>,
    next: AtomicUsize,
    /// `https` when the upstream speaks TLS (HTTP/2 sends it as `:scheme`), else `http`.
    scheme: Scheme,
    /// TLS setup shared by the connectors, when the upstream speaks TLS.
    tls: Option<UpstreamTls>,
    transport: Transport,
    /// The settings it was built from.
    pub settings: UpstreamSettings,
}

impl Upstream {
    /// Builds the pools and clients (no connection is opened until the first request).
    pub fn new(name: &str, settings: &UpstreamSettings) -> Self {
        let tls = settings
            .tls
            .as_ref()
            .map(|_| UpstreamTls::load(name, settings));
        let scheme = if tls.is_some() {
            Scheme::HTTPS
        } else {
            Scheme::HTTP
        };
        let connector = Connector::new(settings.connect_timeout, tls.clone());
        let transport = match settings.protocol {
            UpstreamProtocol::Http1 => Transport::Http1 { connector },
            UpstreamProtocol::Http2 => {
                Transport::Http2(Box::new(Http2Clients::new(settings, connector)))
            }
        };
        let endpoints = settings
            .endpoints
            .iter()
            .filter_map(|e| {
                let authority = e.parse::<Authority>().ok()?;
                let connect_uri = Uri::builder()
                    .scheme(scheme.clone())
                    .authority(authority.clone())
                    .path_and_query("/")
                    .build()
                    .ok()?;
                let host = HeaderValue::from_str(authority.as_str()).ok()?;
                Some(Endpoint {
                    authority,
                    connect_uri,
                    host,
                    pool: Http1Pool::new(
                        settings.idle_timeout,
                        settings.max_idle as usize,
                        settings.max_connections.map(|n| n as usize),
                    ),
                })
            })
            .collect();
        Upstream {
            name: name.into(),
            endpoints,
            next: AtomicUsize::new(0),
            scheme,
            tls,
            transport,
            settings: settings.clone(),
        }
    }

    /// The upstream's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its TLS setup, which a reload replaces for new connections (pooled ones stay as they
    /// are); `None` for a plain-HTTP upstream.
    pub fn tls(&self) -> Option<&UpstreamTls> {
        self.tls.as_ref()
    }

    /// How many endpoints it has.
    pub fn endpoint_count(&self) -> usize {
        self.endpoints.len()
    }

    /// Round robin across endpoints; a request carrying an [`EndpointHint`] moves on from the
    /// endpoint its previous attempt used, whatever other requests picked in between.
    fn pick(&self, hint: Option<&EndpointHint>) -> &Endpoint {
        let n = self.endpoints.len().max(1);
        let i = match hint {
            Some(h) => {
                let prev = h.0.load(Ordering::Relaxed);
                let i = if prev == usize::MAX {
                    self.next.fetch_add(1, Ordering::Relaxed) % n
                } else {
                    (prev + 1) % n
                };
                h.0.store(i, Ordering::Relaxed);
                i
            }
            None => self.next.fetch_add(1, Ordering::Relaxed) % n,
        };
        &self.endpoints[i]
    }

    /// HTTP/1.1: a pooled connection when one is idle, else a new one. A bodyless idempotent
    /// request that failed on a reused connection before any of the response arrived is sent
    /// once more on a fresh connection (the keep-alive race: the app closed the idle connection
    /// just as it was reused, so it cannot have acted on the request). `sent` is set when a
    /// connection was had (a wait at `max_connections` is spillway's, not the app's time).
    async fn send_http1(
        &self,
        connector: &Connector,
        ep: &Endpoint,
        wait: &ConnectionWait,
        req: Request<RequestBody>,
        sent: &mut tokio::time::Instant,
    ) -> Result<Response<UpstreamBody>, ProxyError> {
        let (parts, body) = req.into_parts();
        let may_resend = is_idempotent(&parts.method) && matches!(body, RequestBody::Empty);
        let acquired = ep.pool.acquire(wait.wait).await;
        *sent = tokio::time::Instant::now();
        let body = match acquired {
            Some(Acquired::Idle(conn)) => match conn.send(&parts, body, &ep.host, &ep.pool).await {
                Ok(resp) => return Ok(resp.map(UpstreamBody::Http1)),
                Err(e) if e.stale && may_resend => {
                    tracing::debug!(upstream = %self.name, "stale pooled connection, resending on a fresh one");
                    RequestBody::Empty
                }
                Err(e) => return Err(e.error),
            },
            Some(Acquired::New(slot)) => {
                return self
                    .connect_and_send(connector, ep, slot, &parts, body)
                    .await
            }
            None => return Err(wait.refusal(&parts)),
        };
        // The stale connection closed, so its place is free (unless another request took it).
        let acquired = ep.pool.acquire(wait.wait).await;
        *sent = tokio::time::Instant::now();
        let slot = match acquired {
            Some(Acquired::New(slot)) => slot,
            Some(Acquired::Idle(conn)) => {
                return conn
                    .send(&parts, body, &ep.host, &ep.pool)
                    .await
                    .map(|resp| resp.map(UpstreamBody::Http1))
                    .map_err(|e| e.error)
            }
            None => return Err(wait.refusal(&parts)),
        };
        self.connect_and_send(connector, ep, slot, &parts, body)
            .await
    }

    /// Opens a new connection to `ep` (in the place `slot` holds) and sends the request on it.
    async fn connect_and_send(
        &self,
        connector: &Connector,
        ep: &Endpoint,
        slot: OpenSlot,
        parts: &http::request::Parts,
        body: RequestBody,
    ) -> Result<Response<UpstreamBody>, ProxyError> {
        let io = connector
            .clone()
            .call(ep.connect_uri.clone())
            .await
            .map_err(|ConnectError(kind)| ProxyError::from(kind))?;
        ep.pool.ensure_sweeper();
        Http1Connection::new(io.into_stream(), slot)
            .send(parts, body, &ep.host, &ep.pool)
            .await
            .map(|resp| resp.map(UpstreamBody::Http1))
            .map_err(|e| e.error)
    }
}

/// An upstream response body: read straight from a pooled HTTP/1.1 connection, or from
/// hyper-util's HTTP/2 client.
#[derive(Debug)]
pub enum UpstreamBody {
    /// From spillway's HTTP/1.1 client.
    Http1(Http1Body),
    /// From an HTTP/2 stream.
    Http2(Incoming),
}

impl UpstreamBody {
    /// After a `101 Switching Protocols` from an HTTP/1.1 upstream: the connection, for the
    /// tunnel.
    pub fn into_upgraded(self) -> Option<http1::Upgraded> {
        match self {
            UpstreamBody::Http1(b) => b.into_upgraded(),
            UpstreamBody::Http2(_) => None,
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            UpstreamBody::Http1(b) => Pin::new(b).poll_frame(cx).map_err(BoxError::from),
            UpstreamBody::Http2(b) => Pin::new(b).poll_frame(cx).map_err(BoxError::from),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Http1(b) => b.is_end_stream(),
            UpstreamBody::Http2(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Http1(b) => b.size_hint(),
            UpstreamBody::Http2(b) => b.size_hint(),
        }
    }
}

/// Shared by every attempt of one request (it travels in the request extensions, which
/// retries copy), so that a retry goes to a different endpoint than the attempt that failed.
/// Only attached when a route can retry and its upstream has several endpoints.
#[derive(Debug, Clone)]
pub(super) struct EndpointHint(Arc<AtomicUsize>);

impl Default for EndpointHint {
    fn default() -> Self {
        EndpointHint(Arc::new(AtomicUsize::new(usize::MAX)))
    }
}

/// How long a request may wait for a connection when its endpoint is at `max_connections`:
/// the route's queue timeout when it has a queue (a queued request would wait that long for a
/// concurrency slot too), else not at all; then it is refused as the limit's 503.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionWait {
    /// Longest wait.
    pub wait: Duration,
    /// `Retry-After` on the refusal.
    pub retry_after: Duration,
}

impl ConnectionWait {
    fn refusal(&self, parts: &http::request::Parts) -> ProxyError {
        ProxyError::Shed {
            reason: ShedReason::UpstreamConnectionLimit,
            retry_after: self.retry_after,
            priority: parts
                .extensions
                .get::<Priority>()
                .copied()
                .unwrap_or_default(),
        }
    }
}

/// The bottom of the stack: sends the request to one endpoint and classifies any failure.
#[derive(Clone)]
pub struct Forward {
    upstream: Arc<Upstream>,
    wait: ConnectionWait,
    /// The route's `spillway_upstream_duration_seconds`.
    duration: Histogram,
}

impl Forward {
    /// Forwards to this upstream, waiting for a connection as `wait` says, and observes in
    /// `duration` how long each answer took.
    pub fn new(upstream: Arc<Upstream>, wait: ConnectionWait, duration: Histogram) -> Self {
        Forward {
            upstream,
            wait,
            duration,
        }
    }
}

impl tower::Service<Request<RequestBody>> for Forward {
    type Response = Response<UpstreamBody>;
    type Error = ProxyError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<UpstreamBody>, ProxyError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<RequestBody>) -> Self::Future {
        let up = self.upstream.clone();
        let wait = self.wait;
        let duration = self.duration.clone();
        Box::pin(async move {
            if up.endpoints.is_empty() {
                return Err(UpstreamError::Dns.into());
            }
            // The app's own latency: from sending (connecting included, a wait for a
            // connection at max_connections not) to its response head. Only answers are
            // observed; a failure, or a timeout that dropped this attempt, is no answer.
            let mut sent = tokio::time::Instant::now();
            let ep = up.pick(req.extensions().get::<EndpointHint>());
            let result = match &up.transport {
                Transport::Http1 { connector } => {
                    up.send_http1(connector, ep, &wait, req, &mut sent).await
                }
                Transport::Http2(clients) => {
                    clients.send(&up.name, &up.scheme, &ep.authority, req).await
                }
            };
            if result.is_ok() {
                duration.observe(sent.elapsed().as_secs_f64());
            }
            result
        })
    }
}
