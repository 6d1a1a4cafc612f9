//! The ingress service: one per connection. It takes one runtime snapshot per request, finds
//! the route, runs the route's stack, and turns every outcome into a response: upstream
//! responses are passed through and stamped, errors are presented in exactly one place
//! ([`rescue`]). Its error type is `Infallible`: nothing escapes to hyper unanswered.
//!
//! Two protocols get special care here. HTTP/1.1 Upgrade requests (WebSocket) are forwarded
//! with their upgrade intact and, on a 101, tunnelled both ways. gRPC requests get the errors
//! spillway generates as gRPC statuses (see [`ErrorStyle`]).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use arc_swap::ArcSwap;
use http::header::{ALLOW, TE, UPGRADE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower::util::Oneshot;
use tower::ServiceExt;

use super::body::{self, ResponseBody};
use super::exchange::Exchange;
use super::headers::{self, Forwarded, Overlay, X_REQUEST_ID};
use super::rescue::{rescue, ErrorStyle};
use super::runtime::Runtime;
use super::stack::RouteService;
use super::trace::{TraceContext, TRACESTATE};
use super::upstream::{EndpointHint, RequestBody, UpstreamBody};
use crate::error::{ProxyError, RequestError, ShedReason, UpstreamError};
use crate::http1::server::upgrade::OnUpgrade;
use crate::http1::server::{BodyReader, Handler};
use crate::metrics::ResponseSource;
use crate::pressure::Pressure;

/// The ingress service of one downstream connection.
#[derive(Clone)]
pub(crate) struct ProxyService {
    runtime: Arc<ArcSwap<Runtime>>,
    client_ip: HeaderValue,
    proto: &'static str,
    /// Counts the requests an HTTP/2 connection started, for its idle rules.
    started: Option<Arc<AtomicU64>>,
    /// Above the hard memory mark, new requests are refused.
    pressure: Pressure,
}

impl ProxyService {
    /// A service for a connection from `client` (`proto` is `http` or `https`).
    pub(crate) fn new(
        runtime: Arc<ArcSwap<Runtime>>,
        client: std::net::SocketAddr,
        proto: &'static str,
        pressure: Pressure,
    ) -> Self {
        let client_ip = HeaderValue::from_str(&client.ip().to_string())
            .unwrap_or(HeaderValue::from_static("unknown"));
        ProxyService {
            runtime,
            client_ip,
            proto,
            started: None,
            pressure,
        }
    }

    /// The same service, counting the requests it is handed in `started`.
    pub(crate) fn counting(mut self, started: Arc<AtomicU64>) -> Self {
        self.started = Some(started);
        self
    }
}

/// HTTP/2 requests, from hyper's server.
impl hyper::service::Service<Request<Incoming>> for ProxyService {
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = Handling;

    fn call(&self, req: Request<Incoming>) -> Handling {
        if let Some(started) = &self.started {
            started.fetch_add(1, Ordering::Relaxed);
        }
        let (parts, body) = req.into_parts();
        // One snapshot per request, owned so it lives as long as the request.
        start(
            self.runtime.load_full(),
            parts,
            body.into(),
            None,
            &self.client_ip,
            self.proto,
            &self.pressure,
        )
    }
}

/// HTTP/1.1 requests, from spillway's own server.
impl Handler for ProxyService {
    type Body = ResponseBody;
    type Future = Handling;

    fn call(&self, req: Request<BodyReader>) -> Handling {
        let (mut parts, body) = req.into_parts();
        let upgrade = parts.extensions.remove::<OnUpgrade>();
        start(
            self.runtime.load_full(),
            parts,
            body.into(),
            upgrade,
            &self.client_ip,
            self.proto,
            &self.pressure,
        )
    }

    fn refuse(&self, error: RequestError) -> Response<ResponseBody> {
        let rt = self.runtime.load();
        // No request line could be trusted: the exchange is logged as method `-`, target `*`.
        let trace = TraceContext::of(&http::HeaderMap::new());
        let exchange = Exchange::start(
            rt.unmatched.clone(),
            Instant::now(),
            http::Method::from_bytes(b"-").expect("a token"),
            http::Uri::from_static("*"),
            headers::new_request_id(),
        )
        .logged(&rt.access_log, &trace, &http::HeaderMap::new());
        rescue(&rt.stamps, error.into(), exchange, ErrorStyle::Http)
    }
}

pin_project! {
    /// A request being handled: already answered, or waiting for its route's stack. A named
    /// future rather than a boxed `async` block: no allocation per request.
    pub struct Handling {
        #[pin]
        state: State,
    }
}

pin_project! {
    #[project = StateProj]
    enum State {
        // Answered without the upstream (no route, a loop); taken when polled.
        Answered { resp: Option<Response<ResponseBody>> },
        // Forwarded through the route's policy stack; `after` is taken when it is done.
        Forwarding {
            #[pin]
            stack: Oneshot<RouteService, Request<RequestBody>>,
            after: Option<After>,
        },
    }
}

/// What turning the stack's outcome into the response needs.
struct After {
    rt: Arc<Runtime>,
    exchange: Exchange,
    style: ErrorStyle,
    request_id: HeaderValue,
    /// The protocol of an Upgrade request passed on, and its downstream half.
    upgrade: Option<(HeaderValue, OnUpgrade)>,
    /// A CONNECT: a 2xx answer opens the tunnel.
    connect: bool,
    /// The upstream's `body_timeout`.
    body_timeout: std::time::Duration,
}

impl Future for Handling {
    type Output = Result<Response<ResponseBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Answered { resp } => {
                Poll::Ready(Ok(resp.take().expect("polled after completion")))
            }
            StateProj::Forwarding { stack, after } => {
                let outcome = ready!(stack.poll(cx));
                let after = after.take().expect("polled after completion");
                Poll::Ready(Ok(respond(after, outcome)))
            }
        }
    }
}

/// Everything before the upstream: route, loop check, header rules. Requests that need no
/// upstream are answered here.
fn start(
    rt: Arc<Runtime>,
    mut parts: http::request::Parts,
    body: RequestBody,
    downstream_upgrade: Option<OnUpgrade>,
    client_ip: &HeaderValue,
    proto: &'static str,
    pressure: &Pressure,
) -> Handling {
    let start = Instant::now();
    let request_id = headers::request_id(&parts.headers);
    let style = ErrorStyle::of(&parts.headers);
    // Route on exactly the authority that is forwarded.
    let host_ok = headers::check_host(parts.version, &parts.uri, &mut parts.headers);
    // A request whose host cannot be trusted is counted as routed nowhere.
    let route = host_ok
        .is_ok()
        .then(|| rt.find_route(&parts.method, &parts.uri, &parts.headers))
        .flatten();
    let metrics = route.map_or_else(|| rt.unmatched.clone(), |r| r.metrics.clone());
    let trace = TraceContext::of(&parts.headers);
    let exchange = Exchange::start(
        metrics,
        start,
        parts.method.clone(),
        parts.uri.clone(),
        request_id.clone(),
    )
    .logged(&rt.access_log, &trace, &parts.headers);
    let answer = |resp| Handling {
        state: State::Answered { resp: Some(resp) },
    };

    if let Err(e) = host_ok {
        return answer(rescue(&rt.stamps, e.into(), exchange, style));
    }
    if rt.stamps.is_loop(&parts.headers) {
        return answer(rescue(
            &rt.stamps,
            ProxyError::LoopDetected,
            exchange,
            style,
        ));
    }
    let Some(route) = route else {
        return answer(rescue(&rt.stamps, ProxyError::NoRoute, exchange, style));
    };
    if pressure.hard() {
        let shed = ProxyError::Shed {
            reason: ShedReason::MemoryPressure,
            retry_after: route.settings.policy.retry_after,
            priority: route.policy.classifier.classify(&parts.headers),
        };
        return answer(rescue(&rt.stamps, shed, exchange, style));
    }

    // CONNECT asks spillway to open a tunnel: only where a route lists it in `match.methods`.
    let connect = parts.method == Method::CONNECT;
    if connect && !(route.allows_connect() && route.upstream_http1) {
        let mut resp = rescue(
            &rt.stamps,
            RequestError::MethodNotAllowed.into(),
            exchange,
            style,
        );
        resp.headers_mut().insert(ALLOW, route.allow_header());
        return answer(resp);
    }
    // An upgrade is only passed on to an HTTP/1.1 upstream, and only to a protocol the route
    // allows (`upgrades`); otherwise it is stripped like any hop-by-hop header and the
    // upstream answers the plain request (an `h2c` upgrade cannot smuggle requests past the
    // route's policies).
    let upgrade = if connect {
        Some(HeaderValue::from_static("CONNECT"))
    } else {
        headers::upgrade_request(parts.version, &parts.headers)
            .filter(|protocol| route.upstream_http1 && route.allows_upgrade(protocol))
    }
    // Resolves once the server has switched the connection over.
    .zip(downstream_upgrade);
    // gRPC servers may check `te: trailers` to detect proxies that drop trailers; spillway
    // passes trailers through, so it forwards that promise.
    let te_trailers = style.is_grpc()
        && parts
            .headers
            .get_all(TE)
            .iter()
            .any(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));

    headers::strip_hop_by_hop(&mut parts.headers);
    if !trace.joined {
        parts.headers.remove(TRACESTATE);
    }
    let overlay = Overlay::new(&rt.stamps, &Forwarded { client_ip, proto }, &request_id)
        .upgrade(
            upgrade
                .as_ref()
                .filter(|_| !connect)
                .map(|(protocol, _)| protocol.clone()),
        )
        .te_trailers(te_trailers)
        .traceparent(trace.traceparent.clone());
    if route.upstream_http1 {
        // Written into the request head by the HTTP/1.1 client, field by field.
        parts.extensions.insert(overlay);
    } else {
        overlay.apply(&mut parts.headers, parts.uri.authority());
    }
    if route.spread_retries {
        parts.extensions.insert(EndpointHint::default());
    }
    if let Some(progress) = body.progress() {
        // For the route timeout: whether a late answer is the client's fault.
        parts.extensions.insert(progress.clone());
    }
    // The request's class under overload, for the limiter and the shed counter.
    parts
        .extensions
        .insert(route.policy.classifier.classify(&parts.headers));
    let upstream_req = Request::from_parts(parts, body);
    let stack = route.service.clone().oneshot(upstream_req);
    let body_timeout = route.body_timeout;
    Handling {
        state: State::Forwarding {
            stack,
            after: Some(After {
                rt,
                exchange,
                style,
                request_id,
                upgrade,
                connect,
                body_timeout,
            }),
        },
    }
}

/// Turns the stack's outcome into the response: an upstream response passed on and stamped
/// (a 101 starting the tunnel), or an error presented by [`rescue`].
fn respond(
    after: After,
    outcome: Result<Response<UpstreamBody>, ProxyError>,
) -> Response<ResponseBody> {
    let After {
        rt,
        mut exchange,
        style,
        request_id,
        upgrade,
        connect,
        body_timeout,
    } = after;
    match outcome {
        Ok(resp) => {
            if connect && resp.status().is_success() {
                let (mut parts, body) = resp.into_parts();
                let (Some((_, downstream)), Some(upstream)) = (upgrade, body.into_upgraded())
                else {
                    return rescue(
                        &rt.stamps,
                        UpstreamError::ProtocolError.into(),
                        exchange,
                        style,
                    );
                };
                headers::strip_hop_by_hop(&mut parts.headers);
                rt.stamps.stamp_upstream(&mut parts.headers);
                parts.headers.insert(X_REQUEST_ID, request_id);
                exchange.status = parts.status.as_u16();
                exchange.source = ResponseSource::Upstream;
                tokio::spawn(body::tunnel(downstream, upstream, exchange));
                return Response::from_parts(parts, ResponseBody::empty(None));
            }
            if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                let (mut parts, body) = resp.into_parts();
                let (Some((requested, downstream)), Some(upstream)) =
                    (upgrade, body.into_upgraded())
                else {
                    // Switching protocols nobody asked for (or over HTTP/2): not a response we
                    // can pass on.
                    return rescue(
                        &rt.stamps,
                        UpstreamError::ProtocolError.into(),
                        exchange,
                        style,
                    );
                };
                let protocol = parts.headers.get(UPGRADE).cloned().unwrap_or(requested);
                headers::strip_hop_by_hop(&mut parts.headers);
                headers::set_upgrade(&mut parts.headers, protocol);
                rt.stamps.stamp_upstream(&mut parts.headers);
                parts.headers.insert(X_REQUEST_ID, request_id);
                exchange.status = StatusCode::SWITCHING_PROTOCOLS.as_u16();
                exchange.source = ResponseSource::Upstream;
                tokio::spawn(body::tunnel(downstream, upstream, exchange));
                return Response::from_parts(parts, ResponseBody::empty(None));
            }
            let (mut parts, body) = resp.into_parts();
            headers::strip_hop_by_hop(&mut parts.headers);
            rt.stamps.stamp_upstream(&mut parts.headers);
            parts.headers.insert(X_REQUEST_ID, request_id);
            if let Some(log) = &exchange.log {
                exchange.response_fields = log.response_fields(&parts.headers);
            }
            exchange.status = parts.status.as_u16();
            exchange.source = ResponseSource::Upstream;
            Response::from_parts(parts, ResponseBody::upstream(body, exchange, body_timeout))
        }
        Err(e) => rescue(&rt.stamps, e, exchange, style),
    }
}
