//! Upstreams: pooled keep-alive clients per upstream, endpoint selection, and the forward
//! service at the bottom of every route's stack.

use std::error::Error as StdError;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use http::uri::{Authority, PathAndQuery, Scheme};
use http::Extensions;
use http::{Method, Request, Response, Uri, Version};
use http_body::Body as _;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::time::Instant;

use super::body::RequestBody;
use super::connector::{
    classify_tls, ConnectError, Connector, Established, TlsClient, UpstreamTls,
};
use crate::config::{UpstreamProtocol, UpstreamSettings};
use crate::error::{ProxyError, UpstreamError};

type HttpClient = Client<Connector, RequestBody>;

/// One upstream: its endpoints and connection pool. Shared by every route that uses it and
/// carried over a reload when its settings are unchanged, so pooled connections survive.
pub struct Upstream {
    name: Box<str>,
    endpoints: Box<[Authority]>,
    next: AtomicUsize,
    version: Version,
    /// `https` when the upstream speaks TLS (HTTP/2 sends it as `:scheme`), else `http`.
    scheme: Scheme,
    /// TLS setup shared by both clients' connectors, when the upstream speaks TLS.
    tls: Option<UpstreamTls>,
    /// Keep-alive pool.
    pooled: HttpClient,
    /// Never reuses a connection: for the one resend after a stale pooled connection failed.
    fresh: HttpClient,
    /// The settings it was built from.
    pub settings: UpstreamSettings,
}

impl Upstream {
    /// Builds the clients (no connection is opened until the first request).
    pub fn new(name: &str, settings: &UpstreamSettings) -> Self {
        let tls = settings
            .tls
            .as_ref()
            .map(|_| UpstreamTls::load(name, settings));
        let build = |max_idle: usize| {
            let mut b = Client::builder(TokioExecutor::new());
            b.pool_timer(TokioTimer::new())
                .timer(TokioTimer::new())
                .pool_idle_timeout(settings.idle_timeout)
                .pool_max_idle_per_host(max_idle)
                .http2_only(settings.protocol == UpstreamProtocol::Http2);
            b.build(Connector::new(settings.connect_timeout, tls.clone()))
        };
        let endpoints = settings
            .endpoints
            .iter()
            .filter_map(|e| e.parse::<Authority>().ok())
            .collect();
        Upstream {
            name: name.into(),
            endpoints,
            next: AtomicUsize::new(0),
            version: match settings.protocol {
                UpstreamProtocol::Http1 => Version::HTTP_11,
                UpstreamProtocol::Http2 => Version::HTTP_2,
            },
            scheme: if tls.is_some() {
                Scheme::HTTPS
            } else {
                Scheme::HTTP
            },
            pooled: build(usize::MAX),
            fresh: build(0),
            tls,
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
    fn pick(&self, hint: Option<&EndpointHint>) -> &Authority {
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
    type Response = Response<Incoming>;
    type Error = ProxyError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Incoming>, ProxyError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<RequestBody>) -> Self::Future {
        let up = self.upstream.clone();
        Box::pin(async move {
            if up.endpoints.is_empty() {
                return Err(UpstreamError::Dns.into());
            }
            let authority = up.pick(req.extensions().get::<EndpointHint>()).clone();
            let path = req
                .uri()
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/"));
            *req.uri_mut() = Uri::builder()
                .scheme(up.scheme.clone())
                .authority(authority)
                .path_and_query(path)
                .build()
                .map_err(|_| ProxyError::BadRequest)?;
            *req.version_mut() = up.version;
            // Kept for the one resend on a fresh connection (bodyless idempotent requests only).
            let resend = (is_idempotent(req.method()) && req.body().is_end_stream()).then(|| {
                (
                    req.method().clone(),
                    req.uri().clone(),
                    req.headers().clone(),
                    req.extensions().clone(),
                )
            });
            let sent_at = Instant::now();
            match up.pooled.request(req).await {
                Ok(resp) => Ok(resp),
                Err(err) => {
                    let kind = classify(&err);
                    // The keep-alive race: the app closed an idle pooled connection just as we
                    // reused it. Nothing of the response arrived, so the app did not act on it;
                    // send it once more on a connection opened for it.
                    if kind == UpstreamError::ConnectionTerminated && was_reused(&err, sent_at) {
                        if let Some((method, uri, headers, extensions)) = resend {
                            tracing::debug!(upstream = %up.name, "stale pooled connection, resending on a fresh one");
                            let mut again = Request::new(RequestBody::Empty);
                            *again.method_mut() = method;
                            *again.uri_mut() = uri;
                            *again.version_mut() = up.version;
                            *again.headers_mut() = headers;
                            *again.extensions_mut() = extensions;
                            return up
                                .fresh
                                .request(again)
                                .await
                                .map_err(|e| classify(&e).into());
                        }
                    }
                    Err(kind.into())
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

/// Classifies a client error by walking its cause chain (never by its message).
pub fn classify(err: &hyper_util::client::legacy::Error) -> UpstreamError {
    let mut source: Option<&(dyn StdError + 'static)> = err.source();
    while let Some(e) = source {
        if let Some(c) = e.downcast_ref::<ConnectError>() {
            return c.0;
        }
        if let Some(h) = e.downcast_ref::<hyper::Error>() {
            if h.is_parse() || h.is_parse_status() || h.is_parse_too_large() {
                return UpstreamError::ProtocolError;
            }
            if h.is_incomplete_message() || h.is_canceled() || h.is_closed() {
                return UpstreamError::ConnectionTerminated;
            }
        }
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return classify_tls(tls);
        }
        if let Some(io) = e.downcast_ref::<io::Error>() {
            // TLS 1.3 completes the client's side of the handshake before the upstream checks
            // our client certificate: its rejection arrives as an alert on the first read.
            if let Some(tls) = io
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            {
                return classify_tls(tls);
            }
            return match io.kind() {
                io::ErrorKind::ConnectionRefused => UpstreamError::ConnectRefused,
                io::ErrorKind::InvalidData => UpstreamError::ProtocolError,
                _ => UpstreamError::ConnectionTerminated,
            };
        }
        source = e.source();
    }
    if err.is_connect() {
        UpstreamError::ConnectRefused
    } else {
        UpstreamError::ConnectionTerminated
    }
}
