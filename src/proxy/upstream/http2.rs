//! HTTP/2 upstreams, through hyper-util's client: it multiplexes requests over one connection
//! per endpoint and coalesces concurrent connection attempts.

use http::uri::{Authority, PathAndQuery, Scheme};
use http::Extensions;
use http::{HeaderMap, Method, Request, Response, Uri, Version};
use http_body::Body as _;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::time::Instant;

use super::classify::classify;
use super::connector::{Connector, Established};
use super::{RequestBody, UpstreamBody};
use crate::config::UpstreamSettings;
use crate::error::{ProxyError, RequestError, UpstreamError};
use crate::policy::retry::is_idempotent;

type HttpClient = Client<Connector, RequestBody>;

/// The HTTP/2 transport of one upstream.
pub(super) struct Http2Clients {
    /// Keep-alive pool.
    pooled: HttpClient,
    /// Never reuses a connection: for the one resend after a stale connection failed.
    fresh: HttpClient,
}

impl Http2Clients {
    /// Clients that dial through `connector` (no connection is opened until the first request).
    pub(super) fn new(settings: &UpstreamSettings, connector: Connector) -> Self {
        let build = |max_idle: usize| {
            let mut b = Client::builder(TokioExecutor::new());
            b.pool_timer(TokioTimer::new())
                .timer(TokioTimer::new())
                .pool_idle_timeout(settings.idle_timeout)
                .pool_max_idle_per_host(max_idle)
                .http2_only(true);
            b.build(connector.clone())
        };
        Http2Clients {
            pooled: build(usize::MAX),
            fresh: build(0),
        }
    }

    /// Sends `req` to `authority`. A bodyless idempotent request whose pooled connection died
    /// under it before any answer is sent once more on a fresh connection (the keep-alive race,
    /// as for HTTP/1.1).
    pub(super) async fn send(
        &self,
        upstream: &str,
        scheme: &Scheme,
        authority: &Authority,
        mut req: Request<RequestBody>,
    ) -> Result<Response<UpstreamBody>, ProxyError> {
        *req.uri_mut() = Uri::builder()
            .scheme(scheme.clone())
            .authority(authority.clone())
            .path_and_query(path_and_query(&req))
            .build()
            .map_err(|_| ProxyError::from(RequestError::Malformed))?;
        *req.version_mut() = Version::HTTP_2;
        let resend = Resend::capture(&req);
        let sent_at = Instant::now();
        match self.pooled.request(req).await {
            Ok(resp) => Ok(resp.map(UpstreamBody::Http2)),
            Err(err) => {
                let kind = classify(&err);
                if kind == UpstreamError::ConnectionTerminated && was_reused(&err, sent_at) {
                    if let Some(again) = resend {
                        tracing::debug!(
                            upstream,
                            "stale pooled connection, resending on a fresh one"
                        );
                        return self
                            .fresh
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

/// Whether the failed request went out on a connection that existed before it was sent.
fn was_reused(err: &hyper_util::client::legacy::Error, sent_at: Instant) -> bool {
    let Some(info) = err.connect_info() else {
        return false;
    };
    let mut ext = Extensions::new();
    info.get_extras(&mut ext);
    ext.get::<Established>().is_some_and(|e| e.0 < sent_at)
}
