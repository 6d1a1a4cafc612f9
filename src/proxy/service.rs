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
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use arc_swap::ArcSwap;
use http::header::{TE, UPGRADE};
use http::{HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
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
use super::upstream::{EndpointHint, RequestBody, UpstreamBody};
use crate::error::{ProxyError, UpstreamError};
use crate::metrics::ResponseSource;

/// The ingress service of one downstream connection.
#[derive(Clone)]
pub(crate) struct ProxyService {
    runtime: Arc<ArcSwap<Runtime>>,
    client_ip: HeaderValue,
    proto: &'static str,
}

impl ProxyService {
    /// A service for a connection from `client` (`proto` is `http` or `https`).
    pub(crate) fn new(
        runtime: Arc<ArcSwap<Runtime>>,
        client: std::net::SocketAddr,
        proto: &'static str,
    ) -> Self {
        let client_ip = HeaderValue::from_str(&client.ip().to_string())
            .unwrap_or(HeaderValue::from_static("unknown"));
        ProxyService {
            runtime,
            client_ip,
            proto,
        }
    }
}

impl hyper::service::Service<Request<Incoming>> for ProxyService {
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = Handling;

    fn call(&self, req: Request<Incoming>) -> Handling {
        // One snapshot per request, owned so it lives as long as the request.
        start(self.runtime.load_full(), req, &self.client_ip, self.proto)
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
    mut req: Request<Incoming>,
    client_ip: &HeaderValue,
    proto: &'static str,
) -> Handling {
    let start = Instant::now();
    let request_id = headers::request_id(req.headers());
    let style = ErrorStyle::of(req.headers());
    let route = rt.find_route(req.method(), req.uri(), req.headers());
    let metrics = route.map_or_else(|| rt.unmatched.clone(), |r| r.metrics.clone());
    let exchange = Exchange::start(
        metrics,
        start,
        req.method().clone(),
        req.uri().clone(),
        request_id.clone(),
    );
    let answer = |resp| Handling {
        state: State::Answered { resp: Some(resp) },
    };

    if rt.stamps.is_loop(req.headers()) {
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

    // An upgrade is only passed on to an HTTP/1.1 upstream; towards HTTP/2 it is stripped like
    // any hop-by-hop header and the upstream answers the plain request.
    let upgrade =
        headers::upgrade_request(req.version(), req.headers()).filter(|_| route.upstream_http1);
    // Taken out before the request is forwarded: it resolves once hyper has sent our 101.
    let upgrade = upgrade.map(|protocol| (protocol, hyper::upgrade::on(&mut req)));
    // gRPC servers may check `te: trailers` to detect proxies that drop trailers; spillway
    // passes trailers through, so it forwards that promise.
    let te_trailers = style.is_grpc()
        && req
            .headers()
            .get_all(TE)
            .iter()
            .any(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));

    let (mut parts, body) = req.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers);
    let overlay = Overlay::new(&rt.stamps, &Forwarded { client_ip, proto }, &request_id)
        .upgrade(upgrade.as_ref().map(|(protocol, _)| protocol.clone()))
        .te_trailers(te_trailers);
    if route.upstream_http1 {
        // Written into the request head by the HTTP/1.1 client, field by field.
        parts.extensions.insert(overlay);
    } else {
        overlay.apply(&mut parts.headers, parts.uri.authority());
    }
    if route.spread_retries {
        parts.extensions.insert(EndpointHint::default());
    }
    // The request's class under overload, for the limiter and the shed counter.
    parts
        .extensions
        .insert(route.policy.classifier.classify(&parts.headers));
    let upstream_req = Request::from_parts(parts, RequestBody::from_incoming(body));
    let stack = route.service.clone().oneshot(upstream_req);
    Handling {
        state: State::Forwarding {
            stack,
            after: Some(After {
                rt,
                exchange,
                style,
                request_id,
                upgrade,
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
    } = after;
    match outcome {
        Ok(resp) => {
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
            exchange.status = parts.status.as_u16();
            exchange.source = ResponseSource::Upstream;
            Response::from_parts(parts, ResponseBody::upstream(body, exchange))
        }
        Err(e) => rescue(&rt.stamps, e, exchange, style),
    }
}
