//! Upstreams: endpoints, endpoint selection, the two transports (HTTP/1.1 over spillway's own
//! per-endpoint pools, HTTP/2 over hyper-util's multiplexing client), the keep-alive race
//! resend, and the forward service at the bottom of every route's stack.

use std::error::Error as StdError;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::Extensions;
use http::{HeaderMap, HeaderValue, Method, Request, Response, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::time::Instant;
use tower::Service as _;

use super::body::{BoxError, RequestBody};
use super::connector::{
    classify_tls, ConnectError, Connector, Established, TlsClient, UpstreamTls,
};
use super::http1::{Conn, Http1Body};
use super::pool::Http1Pool;
use crate::config::{UpstreamProtocol, UpstreamSettings};
use crate::error::{ProxyError, UpstreamError};

type HttpClient = Client<Connector, RequestBody>;

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

/// The HTTP/2 transport's clients.
struct Http2Clients {
    /// Keep-alive pool.
    pooled: HttpClient,
    /// Never reuses a connection: for the one resend after a stale connection failed.
    fresh: HttpClient,
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
                let build = |max_idle: usize| {
                    let mut b = Client::builder(TokioExecutor::new());
                    b.pool_timer(TokioTimer::new())
                        .timer(TokioTimer::new())
                        .pool_idle_timeout(settings.idle_timeout)
                        .pool_max_idle_per_host(max_idle)
                        .http2_only(true);
                    b.build(connector.clone())
                };
                Transport::Http2(Box::new(Http2Clients {
                    pooled: build(usize::MAX),
                    fresh: build(0),
                }))
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
                    pool: Http1Pool::new(settings.idle_timeout),
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

    /// Uses `client` for new TLS connections (a reload re-read the CA or client certificate);
    /// pooled connections stay as they are. Ignored for a plain-HTTP upstream.
    pub fn set_tls(&self, client: TlsClient) {
        if let Some(tls) = &self.tls {
            tls.set(client);
        }
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
    /// just as it was reused, so it cannot have acted on the request).
    async fn send_http1(
        &self,
        connector: &Connector,
        ep: &Endpoint,
        req: Request<RequestBody>,
    ) -> Result<Response<UpstreamBody>, ProxyError> {
        let (parts, body) = req.into_parts();
        let may_resend = is_idempotent(&parts.method) && matches!(body, RequestBody::Empty);
        let body = match ep.pool.checkout() {
            Some(conn) => match conn.send(&parts, body, &ep.host, &ep.pool).await {
                Ok(resp) => return Ok(resp.map(UpstreamBody::Http1)),
                Err(e) if e.stale && may_resend => {
                    tracing::debug!(upstream = %self.name, "stale pooled connection, resending on a fresh one");
                    RequestBody::Empty
                }
                Err(e) => return Err(e.error),
            },
            None => body,
        };
        let io = connector
            .clone()
            .call(ep.connect_uri.clone())
            .await
            .map_err(|ConnectError(kind)| ProxyError::from(kind))?;
        ep.pool.ensure_sweeper();
        Conn::new(io.into_stream())
            .send(&parts, body, &ep.host, &ep.pool)
            .await
            .map(|resp| resp.map(UpstreamBody::Http1))
            .map_err(|e| e.error)
    }

    /// HTTP/2 through hyper-util's multiplexing client.
    async fn send_http2(
        &self,
        pooled: &HttpClient,
        fresh: &HttpClient,
        ep: &Endpoint,
        mut req: Request<RequestBody>,
    ) -> Result<Response<UpstreamBody>, ProxyError> {
        *req.uri_mut() = Uri::builder()
            .scheme(self.scheme.clone())
            .authority(ep.authority.clone())
            .path_and_query(path_and_query(&req))
            .build()
            .map_err(|_| ProxyError::BadRequest)?;
        *req.version_mut() = Version::HTTP_2;
        let resend = Resend::capture(&req);
        let sent_at = Instant::now();
        match pooled.request(req).await {
            Ok(resp) => Ok(resp.map(UpstreamBody::Http2)),
            Err(err) => {
                let kind = classify(&err);
                // As for HTTP/1.1: a connection that died under a request it had not answered.
                if kind == UpstreamError::ConnectionTerminated && was_reused(&err, sent_at) {
                    if let Some(again) = resend {
                        tracing::debug!(upstream = %self.name, "stale pooled connection, resending on a fresh one");
                        return fresh
                            .request(again.into_request())
                            .await
                            .map(|resp| resp.map(UpstreamBody::Http2))
                            .map_err(|e| classify(&e).into());
                    }
                }
                Err(kind.into())
            }
        }
    }
}

/// The request's path and query (`/` when it has none), for the upstream request target.
fn path_and_query(req: &Request<RequestBody>) -> PathAndQuery {
    req.uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"))
}

/// What it takes to send a request again over HTTP/2 (hyper-util's client consumes the request):
/// only bodyless idempotent requests qualify (a body was consumed by the first attempt, and a
/// non-idempotent request must never be repeated).
struct Resend {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
    extensions: Extensions,
}

impl Resend {
    fn capture(req: &Request<RequestBody>) -> Option<Resend> {
        (is_idempotent(req.method()) && req.body().is_end_stream()).then(|| Resend {
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            headers: req.headers().clone(),
            extensions: req.extensions().clone(),
        })
    }

    fn into_request(self) -> Request<RequestBody> {
        let mut req = Request::new(RequestBody::Empty);
        *req.method_mut() = self.method;
        *req.uri_mut() = self.uri;
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers;
        *req.extensions_mut() = self.extensions;
        req
    }
}

/// An upstream response body: read straight from a pooled HTTP/1.1 connection, or from
/// hyper-util's HTTP/2 client.
#[derive(Debug)]
pub enum UpstreamBody {
    /// From spillway's HTTP/1.1 client.
    Http1(Http1Body),
    /// From an HTTP/2 stream.
    Http2(hyper::body::Incoming),
}

impl UpstreamBody {
    /// After a `101 Switching Protocols` from an HTTP/1.1 upstream: the connection, for the
    /// tunnel.
    pub fn into_upgraded(self) -> Option<super::http1::Upgraded> {
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
pub struct EndpointHint(Arc<AtomicUsize>);

impl Default for EndpointHint {
    fn default() -> Self {
        EndpointHint(Arc::new(AtomicUsize::new(usize::MAX)))
    }
}

/// The bottom of the stack: sends the request to one endpoint and classifies any failure.
#[derive(Clone)]
pub struct Forward {
    upstream: Arc<Upstream>,
}

impl Forward {
    /// Forwards to this upstream.
    pub fn new(upstream: Arc<Upstream>) -> Self {
        Forward { upstream }
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
        Box::pin(async move {
            if up.endpoints.is_empty() {
                return Err(UpstreamError::Dns.into());
            }
            let ep = up.pick(req.extensions().get::<EndpointHint>());
            match &up.transport {
                Transport::Http1 { connector } => up.send_http1(connector, ep, req).await,
                Transport::Http2(clients) => {
                    up.send_http2(&clients.pooled, &clients.fresh, ep, req)
                        .await
                }
            }
        })
    }
}

fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// Whether the failed request went out on a connection that existed before it was sent.
fn was_reused(err: &hyper_util::client::legacy::Error, sent_at: Instant) -> bool {
    let Some(info) = err.connect_info() else {
        return false;
    };
    let mut ext = Extensions::new();
    info.get_extras(&mut ext);
    ext.get::<Established>().is_some_and(|e| e.0 < sent_at)
}

/// Classifies a hyper-util client error by walking its cause chain (never by its message).
pub fn classify(err: &hyper_util::client::legacy::Error) -> UpstreamError {
    classify_chain(err.source()).unwrap_or(if err.is_connect() {
        UpstreamError::ConnectRefused
    } else {
        UpstreamError::ConnectionTerminated
    })
}

/// Classifies an I/O failure on an established connection (a TLS error inside it included).
pub fn classify_io(err: &io::Error) -> UpstreamError {
    classify_chain(Some(err)).unwrap_or(UpstreamError::ConnectionTerminated)
}

fn classify_chain(mut source: Option<&(dyn StdError + 'static)>) -> Option<UpstreamError> {
    while let Some(e) = source {
        if let Some(c) = e.downcast_ref::<ConnectError>() {
            return Some(c.0);
        }
        if let Some(h) = e.downcast_ref::<hyper::Error>() {
            if h.is_parse() || h.is_parse_status() || h.is_parse_too_large() {
                return Some(UpstreamError::ProtocolError);
            }
            if h.is_incomplete_message() || h.is_canceled() || h.is_closed() {
                return Some(UpstreamError::ConnectionTerminated);
            }
        }
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(classify_tls(tls));
        }
        if let Some(io) = e.downcast_ref::<io::Error>() {
            // TLS 1.3 completes the client's side of the handshake before the upstream checks
            // our client certificate: its rejection arrives as an alert on the first read.
            if let Some(tls) = io
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            {
                return Some(classify_tls(tls));
            }
            return Some(match io.kind() {
                io::ErrorKind::ConnectionRefused => UpstreamError::ConnectRefused,
                io::ErrorKind::InvalidData => UpstreamError::ProtocolError,
                _ => UpstreamError::ConnectionTerminated,
            });
        }
        source = e.source();
    }
    None
}
