//! The ingress service: one per connection. It takes one runtime snapshot per request, finds
//! the route, runs the route's stack, and turns every outcome into a response: upstream
//! responses are passed through and stamped, errors are presented in exactly one place
//! ([`rescue`]). Its error type is `Infallible`: nothing escapes to hyper unanswered.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::header::{CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderValue, Request, Response};
use hyper::body::Incoming;
use tokio::time::Instant;
use tower::ServiceExt;

use super::body::{Exchange, RequestBody, ResponseBody};
use super::headers::{self, Forwarded, Stamps, PROXY_STATUS, X_REQUEST_ID, X_SERVED_BY};
use super::runtime::Runtime;
use super::upstream::EndpointHint;
use crate::error::{retry_after_secs, ProxyError};
use crate::metrics::Source;

/// The ingress service of one downstream connection.
#[derive(Clone)]
pub struct ProxyService {
    runtime: Arc<ArcSwap<Runtime>>,
    client_ip: HeaderValue,
    proto: &'static str,
}

impl ProxyService {
    /// A service for a connection from `client` (`proto` is `http` or `https`).
    pub fn new(runtime: Arc<ArcSwap<Runtime>>, client: std::net::SocketAddr, proto: &'static str) -> Self {
        let client_ip = HeaderValue::from_str(&client.ip().to_string()).unwrap_or(HeaderValue::from_static("unknown"));
        ProxyService { runtime, client_ip, proto }
    }
}

impl hyper::service::Service<Request<Incoming>> for ProxyService {
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ResponseBody>, Infallible>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        // One snapshot per request, owned so it can live across the awaits below.
        let rt = self.runtime.load_full();
        let client_ip = self.client_ip.clone();
        let proto = self.proto;
        Box::pin(async move { Ok(handle(rt, req, client_ip, proto).await) })
    }
}

async fn handle(rt: Arc<Runtime>, req: Request<Incoming>, client_ip: HeaderValue, proto: &'static str) -> Response<ResponseBody> {
    let start = Instant::now();
    let request_id = headers::request_id(req.headers());
    let route = rt.find_route(req.method(), req.uri(), req.headers());
    let metrics = route.map_or_else(|| rt.unmatched.clone(), |r| r.metrics.clone());
    let mut exchange = Exchange::start(metrics, start, req.method().clone(), req.uri().clone(), request_id.clone());

    if rt.stamps.is_loop(req.headers()) {
        return rescue(&rt.stamps, ProxyError::LoopDetected, exchange);
    }
    let Some(route) = route else {
        return rescue(&rt.stamps, ProxyError::NoRoute, exchange);
    };

    let (mut parts, body) = req.into_parts();
    headers::rewrite_request(
        &mut parts.headers,
        parts.uri.authority(),
        &rt.stamps,
        &Forwarded { client_ip: &client_ip, proto },
        &request_id,
    );
    if route.spread_retries {
        parts.extensions.insert(EndpointHint::default());
    }
    let upstream_req = Request::from_parts(parts, RequestBody::from_incoming(body));

    match route.service.clone().oneshot(upstream_req).await {
        Ok(resp) => {
            let (mut parts, body) = resp.into_parts();
            headers::strip_hop_by_hop(&mut parts.headers);
            rt.stamps.stamp_upstream(&mut parts.headers);
            parts.headers.insert(X_REQUEST_ID, request_id);
            exchange.status = parts.status.as_u16();
            exchange.source = Source::Upstream;
            Response::from_parts(parts, ResponseBody::upstream(body, exchange))
        }
        Err(e) => rescue(&rt.stamps, e, exchange),
    }
}

/// The only place an error becomes a response: status, `Proxy-Status`, `Retry-After`, a short
/// body, and the error's metrics. Nothing internal (addresses, OS errors) reaches the client.
pub fn rescue(stamps: &Stamps, err: ProxyError, mut exchange: Exchange) -> Response<ResponseBody> {
    let p = err.presentation();
    match err {
        ProxyError::Upstream(e) => exchange.metrics.upstream_error(e),
        ProxyError::Shed { reason, .. } => exchange.metrics.shed(reason),
        _ => {}
    }
    exchange.status = p.status.as_u16();
    exchange.source = Source::Proxy;
    exchange.error = Some(err.log_kind());
    let request_id = exchange.request_id.clone();
    let mut resp = Response::new(ResponseBody::full(p.body, Some(exchange)));
    *resp.status_mut() = p.status;
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    h.insert(X_SERVED_BY, stamps.served_by.clone());
    if let Some(t) = p.proxy_status {
        h.insert(PROXY_STATUS, stamps.proxy_status(t));
    }
    if let Some(d) = err.retry_after() {
        h.insert(RETRY_AFTER, HeaderValue::from(retry_after_secs(d)));
    }
    h.insert(X_REQUEST_ID, request_id);
    resp
}
