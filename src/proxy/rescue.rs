//! The only place an error becomes a response: [`rescue`] gives it its status, `Proxy-Status`,
//! `Retry-After`, a short body and its metrics, in plain HTTP or, for gRPC clients, as a gRPC
//! status ([`ErrorStyle`]).

use http::header::{CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, HeaderName, HeaderValue, Response};

use super::body::ResponseBody;
use super::exchange::Exchange;
use super::headers::{Stamps, PROXY_STATUS, X_REQUEST_ID, X_SERVED_BY};
use crate::error::{retry_after_secs, ProxyError, RequestError, UpstreamError};
use crate::metrics::ResponseSource;

/// `grpc-status`: the gRPC status code of a response.
pub(super) const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
/// `grpc-message`: the percent-encoded text that goes with a non-zero `grpc-status`.
pub(super) const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");

/// How the errors spillway generates are expressed to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ErrorStyle {
    /// An HTTP status and a short plain-text body.
    Http,
    /// For gRPC clients (the request's `content-type` is `application/grpc…`): HTTP 200 with
    /// `grpc-status` and `grpc-message` and no body (a "Trailers-Only" response), answered with
    /// this `content-type`.
    Grpc {
        /// `application/grpc`, or the gRPC-Web variant the request used.
        content_type: &'static str,
    },
}

impl ErrorStyle {
    /// The style the request's `content-type` calls for.
    pub(super) fn of(headers: &HeaderMap) -> ErrorStyle {
        let Some(ct) = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()) else {
            return ErrorStyle::Http;
        };
        let ct = ct.trim_start().as_bytes();
        let starts =
            |p: &str| ct.len() >= p.len() && ct[..p.len()].eq_ignore_ascii_case(p.as_bytes());
        // Longest prefix first: `application/grpc` is a prefix of the gRPC-Web types.
        if starts("application/grpc-web-text") {
            ErrorStyle::Grpc {
                content_type: "application/grpc-web-text",
            }
        } else if starts("application/grpc-web") {
            ErrorStyle::Grpc {
                content_type: "application/grpc-web",
            }
        } else if starts("application/grpc") {
            ErrorStyle::Grpc {
                content_type: "application/grpc",
            }
        } else {
            ErrorStyle::Http
        }
    }

    pub(super) fn is_grpc(self) -> bool {
        matches!(self, ErrorStyle::Grpc { .. })
    }
}

/// The only place an error becomes a response: status, `Proxy-Status`, `Retry-After`, a short
/// body, and the error's metrics. Nothing internal (addresses, OS errors) reaches the client.
///
/// For gRPC requests (`style`), the same error is a gRPC status instead: HTTP 200,
/// `grpc-status` ([`grpc_status`]) and `grpc-message` (the body's text), no body. The other
/// headers stay, and metrics and the access log still record spillway's own status (e.g. 503).
pub(super) fn rescue(
    stamps: &Stamps,
    err: ProxyError,
    mut exchange: Exchange,
    style: ErrorStyle,
) -> Response<ResponseBody> {
    let p = err.presentation();
    match err {
        ProxyError::Upstream(e) => exchange.metrics.upstream_error(e),
        ProxyError::Shed {
            reason, priority, ..
        } => exchange.metrics.shed(reason, priority),
        _ => {}
    }
    exchange.status = p.status.as_u16();
    exchange.source = ResponseSource::Proxy;
    exchange.error = Some(err.log_kind());
    let request_id = exchange.request_id.clone();
    let mut resp = match style {
        ErrorStyle::Http => {
            let mut resp = Response::new(ResponseBody::full(p.body, Some(exchange)));
            *resp.status_mut() = p.status;
            resp.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            resp
        }
        ErrorStyle::Grpc { content_type } => {
            let mut resp = Response::new(ResponseBody::empty(Some(exchange)));
            let h = resp.headers_mut();
            h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
            h.insert(GRPC_STATUS, HeaderValue::from(u16::from(grpc_status(&err))));
            if let Ok(m) = HeaderValue::from_str(&grpc_message(p.body.trim_end())) {
                h.insert(GRPC_MESSAGE, m);
            }
            resp
        }
    };
    let h = resp.headers_mut();
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

/// The gRPC status a generated error is presented as, following gRPC's HTTP-to-gRPC mapping
/// with two refinements that tell a client more:
///
/// | spillway error | HTTP | gRPC status |
/// |---|---|---|
/// | upstream connect failures, terminated connection, bad response, TLS (502) | 502 | 14 `UNAVAILABLE` |
/// | connect timeout (504): the request never reached the app, safe to retry | 504 | 14 `UNAVAILABLE` |
/// | response timeout (504): the app may still be working on it | 504 | 4 `DEADLINE_EXCEEDED` |
/// | shed: concurrency limit, queue timeout, open breaker, maintenance | 503 | 14 `UNAVAILABLE` |
/// | no route | 404 | 12 `UNIMPLEMENTED` |
/// | routing loop (a misconfiguration; retrying cannot help) | 508 | 13 `INTERNAL` |
/// | malformed request, head too large, target too long (400, 431, 414) | 4xx | 13 `INTERNAL` |
/// | CONNECT refused, transfer coding not supported (405, 501) | 405, 501 | 12 `UNIMPLEMENTED` |
/// | the client stopped sending its body (408) | 408 | 4 `DEADLINE_EXCEEDED` |
pub(super) fn grpc_status(err: &ProxyError) -> u8 {
    match err {
        ProxyError::Upstream(UpstreamError::ResponseTimeout | UpstreamError::BodyTimeout) => 4,
        ProxyError::Upstream(_) | ProxyError::Shed { .. } => 14,
        ProxyError::NoRoute => 12,
        ProxyError::LoopDetected => 13,
        // The client's own mistakes; gRPC's mapping of HTTP 4xx (and 501).
        ProxyError::Request(RequestError::Timeout) => 4,
        ProxyError::Request(
            RequestError::MethodNotAllowed | RequestError::UnsupportedTransferCoding,
        ) => 12,
        ProxyError::Request(_) => 13,
    }
}

/// `grpc-message` encoding: percent-encodes everything outside printable ASCII, and `%`.
fn grpc_message(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ShedReason;
    use crate::metrics::Metrics;
    use http::StatusCode;
    use std::time::Duration;
    use tokio::time::Instant;

    fn exchange(metrics: &Metrics) -> Exchange {
        Exchange::start(
            metrics.route("r"),
            Instant::now(),
            http::Method::POST,
            "/pkg.Svc/Call".parse().unwrap(),
            HeaderValue::from_static("id-1"),
        )
    }

    #[test]
    fn grpc_requests_are_recognised_by_content_type() {
        let style = |ct: &str| {
            let mut h = HeaderMap::new();
            h.insert(CONTENT_TYPE, HeaderValue::from_str(ct).unwrap());
            ErrorStyle::of(&h)
        };
        assert_eq!(
            style("application/grpc"),
            ErrorStyle::Grpc {
                content_type: "application/grpc"
            }
        );
        assert_eq!(
            style("application/grpc+proto"),
            ErrorStyle::Grpc {
                content_type: "application/grpc"
            }
        );
        assert_eq!(
            style("Application/GRPC"),
            ErrorStyle::Grpc {
                content_type: "application/grpc"
            }
        );
        assert_eq!(
            style("application/grpc-web+proto"),
            ErrorStyle::Grpc {
                content_type: "application/grpc-web"
            }
        );
        assert_eq!(
            style("application/grpc-web-text"),
            ErrorStyle::Grpc {
                content_type: "application/grpc-web-text"
            }
        );
        assert_eq!(style("application/json"), ErrorStyle::Http);
        assert_eq!(ErrorStyle::of(&HeaderMap::new()), ErrorStyle::Http);
    }

    #[test]
    fn every_error_has_a_grpc_status() {
        use UpstreamError::*;
        let shed = |reason| ProxyError::Shed {
            reason,
            retry_after: Duration::from_secs(1),
            priority: crate::config::Priority::Normal,
        };
        let table: &[(ProxyError, u8)] = &[
            (ConnectRefused.into(), 14),
            (Unreachable.into(), 14),
            (Dns.into(), 14),
            (ConnectTimeout.into(), 14),
            (ConnectionTerminated.into(), 14),
            (ProtocolError.into(), 14),
            (ResponseTimeout.into(), 4),
            (TlsProtocol.into(), 14),
            (TlsCertificate.into(), 14),
            (BodyTimeout.into(), 4),
            (shed(ShedReason::ConcurrencyLimit), 14),
            (shed(ShedReason::QueueTimeout), 14),
            (shed(ShedReason::CircuitOpen), 14),
            (shed(ShedReason::Maintenance), 14),
            (shed(ShedReason::UpstreamConnectionLimit), 14),
            (shed(ShedReason::MemoryPressure), 14),
            (ProxyError::LoopDetected, 13),
            (ProxyError::NoRoute, 12),
            (RequestError::Malformed.into(), 13),
            (RequestError::HeadTooLarge.into(), 13),
            (RequestError::UriTooLong.into(), 13),
            (RequestError::UnsupportedTransferCoding.into(), 12),
            (RequestError::MethodNotAllowed.into(), 12),
            (RequestError::Timeout.into(), 4),
        ];
        for (err, code) in table {
            assert_eq!(grpc_status(err), *code, "{err:?}");
        }
        assert_eq!(
            table.len(),
            UpstreamError::ALL.len() + ShedReason::ALL.len() + RequestError::ALL.len() + 2
        );
    }

    #[test]
    fn grpc_rescue_is_a_trailers_only_200_that_keeps_the_proxy_headers() {
        let metrics = Metrics::new();
        let stamps = Stamps::new("edge-1");
        let err = ProxyError::Shed {
            reason: ShedReason::Maintenance,
            retry_after: Duration::from_secs(30),
            priority: crate::config::Priority::Normal,
        };
        let resp = rescue(
            &stamps,
            err,
            exchange(&metrics),
            ErrorStyle::Grpc {
                content_type: "application/grpc",
            },
        );
        assert_eq!(resp.status(), StatusCode::OK);
        let h = resp.headers();
        assert_eq!(h[CONTENT_TYPE], "application/grpc");
        assert_eq!(h[GRPC_STATUS], "14");
        assert_eq!(h[GRPC_MESSAGE], "down for maintenance, retry later");
        assert_eq!(h[X_SERVED_BY], "edge-1");
        assert_eq!(h[PROXY_STATUS], "edge-1; error=proxy_internal_response");
        assert_eq!(h[RETRY_AFTER], "30");
        assert_eq!(h[X_REQUEST_ID], "id-1");
        assert!(
            http_body::Body::is_end_stream(resp.body()),
            "no body: the stream ends with the headers"
        );
        drop(resp);
        // Metrics keep spillway's own status.
        assert!(metrics.render().contains(
            r#"spillway_requests_total{code="503",method="POST",route="r",source="proxy"} 1"#
        ));
    }

    #[test]
    fn plain_rescue_is_unchanged() {
        let metrics = Metrics::new();
        let resp = rescue(
            &Stamps::new("s"),
            UpstreamError::ConnectRefused.into(),
            exchange(&metrics),
            ErrorStyle::Http,
        );
        assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(resp.headers()[CONTENT_TYPE], "text/plain; charset=utf-8");
        assert!(!resp.headers().contains_key(GRPC_STATUS));
    }

    #[test]
    fn grpc_message_is_percent_encoded() {
        assert_eq!(
            grpc_message("upstream refused the connection"),
            "upstream refused the connection"
        );
        assert_eq!(grpc_message("100% sure\n"), "100%25 sure%0A");
    }
}
