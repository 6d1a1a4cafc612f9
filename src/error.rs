//! The one error type of the request path, and the one place where an error becomes a status
//! code, a `Proxy-Status` error type and a metric label.
//!
//! Every failure is classified where it happens (connector, client, policy) into a typed variant;
//! nothing is turned into a string before it is classified, so 502 and 504 can never blur.

use std::time::Duration;

use http::StatusCode;

use crate::config::Priority;

/// Why spillway could not get a response from the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    /// The endpoint actively refused the TCP connection (nothing listening).
    #[error("upstream refused the connection")]
    ConnectRefused,
    /// The endpoint's network or host is unreachable.
    #[error("upstream is unreachable")]
    Unreachable,
    /// The endpoint's host name did not resolve.
    #[error("upstream host name did not resolve")]
    Dns,
    /// The TCP (or TLS) connection was not established within `connect_timeout`.
    #[error("upstream connect timed out")]
    ConnectTimeout,
    /// The upstream reset or closed the connection before a complete response head.
    #[error("upstream closed the connection before the response head")]
    ConnectionTerminated,
    /// The upstream sent something that is not a valid HTTP response.
    #[error("upstream sent a malformed response")]
    ProtocolError,
    /// The response head did not arrive within the route's timeout.
    #[error("upstream response head did not arrive in time")]
    ResponseTimeout,
    /// The TLS handshake with the upstream failed for a reason other than its certificate.
    #[error("TLS handshake with the upstream failed")]
    TlsProtocol,
    /// The upstream's certificate was not accepted (untrusted, expired, wrong name).
    #[error("upstream certificate was rejected")]
    TlsCertificate,
    /// The upstream stopped sending its response body for longer than its `body_timeout`
    /// (the head had gone out: the client's response is aborted, never presented).
    #[error("upstream body stalled")]
    BodyTimeout,
}

/// Why spillway refused a request on purpose (every one answers 503 with `Retry-After`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ShedReason {
    /// In-flight requests at the limit and the queue full.
    #[error("concurrency limit reached")]
    ConcurrencyLimit,
    /// The request waited in the queue longer than `queue_timeout`.
    #[error("timed out waiting in the queue")]
    QueueTimeout,
    /// The route's circuit breaker is open.
    #[error("circuit breaker open")]
    CircuitOpen,
    /// The route is in maintenance mode.
    #[error("maintenance mode")]
    Maintenance,
    /// The upstream endpoint has `max_connections` open and none came free in time.
    #[error("upstream connection limit reached")]
    UpstreamConnectionLimit,
    /// spillway's memory is above the hard mark.
    #[error("memory pressure")]
    MemoryPressure,
}

impl ShedReason {
    /// The `reason` label of `spillway_shed_total`.
    pub fn label(self) -> &'static str {
        match self {
            ShedReason::ConcurrencyLimit => "concurrency_limit",
            ShedReason::QueueTimeout => "queue_timeout",
            ShedReason::CircuitOpen => "circuit_open",
            ShedReason::Maintenance => "maintenance",
            ShedReason::UpstreamConnectionLimit => "upstream_connection_limit",
            ShedReason::MemoryPressure => "memory_pressure",
        }
    }

    /// All reasons, for resolving metric handles once.
    pub const ALL: [ShedReason; 6] = [
        ShedReason::ConcurrencyLimit,
        ShedReason::QueueTimeout,
        ShedReason::CircuitOpen,
        ShedReason::Maintenance,
        ShedReason::UpstreamConnectionLimit,
        ShedReason::MemoryPressure,
    ];
}

/// What is wrong with a request itself: the client's fault, answered by spillway and never
/// forwarded, counted as an upstream failure, or held against the app by the breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// Not a valid HTTP request: a malformed head, framing that could smuggle a second
    /// request (a length and chunked together, lengths that disagree), `Host` rules broken, or
    /// a request body that broke while it was being forwarded.
    #[error("bad request")]
    Malformed,
    /// The request head is over `max_request_header_bytes` or has more than
    /// `max_request_headers` fields.
    #[error("request head too large")]
    HeadTooLarge,
    /// The request line alone is over `max_request_header_bytes`.
    #[error("request target too long")]
    UriTooLong,
    /// The body uses a transfer coding spillway does not decode (anything but chunked).
    #[error("transfer coding not supported")]
    UnsupportedTransferCoding,
    /// `CONNECT` on a route that does not allow it.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// The route timeout passed while the client had stopped sending its request body.
    #[error("request body did not arrive in time")]
    Timeout,
}

impl RequestError {
    /// Every variant, for tables and tests.
    pub const ALL: [RequestError; 6] = [
        RequestError::Malformed,
        RequestError::HeadTooLarge,
        RequestError::UriTooLong,
        RequestError::UnsupportedTransferCoding,
        RequestError::MethodNotAllowed,
        RequestError::Timeout,
    ];
}

/// Every way the proxy itself answers instead of the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    /// Talking to the upstream failed.
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// The request was refused on purpose; `retry_after` is what the client is told.
    #[error("{reason}")]
    Shed {
        /// Which policy refused it.
        reason: ShedReason,
        /// How long the client should wait before trying again.
        retry_after: Duration,
        /// The class of the request refused (the `priority` label of the shed counter).
        priority: Priority,
    },
    /// The request's `Via` already names this proxy: it went round in a loop.
    #[error("routing loop detected")]
    LoopDetected,
    /// No route matches the request.
    #[error("no route matches")]
    NoRoute,
    /// The request itself is unusable (see [`RequestError`]).
    #[error(transparent)]
    Request(#[from] RequestError),
}

/// How a [`ProxyError`] is presented: status, Proxy-Status error type, short body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Presentation {
    /// HTTP status of the generated response.
    pub status: StatusCode,
    /// RFC 9209 error type for `Proxy-Status`, if the response carries one.
    pub proxy_status: Option<&'static str>,
    /// Short plain-text body: says what happened, never leaks addresses or OS errors.
    pub body: &'static str,
}

impl ProxyError {
    /// The single mapping from error to response shape. Pinned by a table-driven test.
    pub fn presentation(&self) -> Presentation {
        use UpstreamError::*;
        let (status, proxy_status, body) = match self {
            ProxyError::Upstream(e) => match e {
                ConnectRefused => (
                    StatusCode::BAD_GATEWAY,
                    "connection_refused",
                    "upstream refused the connection\n",
                ),
                Unreachable => (
                    StatusCode::BAD_GATEWAY,
                    "destination_unavailable",
                    "upstream is unreachable\n",
                ),
                Dns => (
                    StatusCode::BAD_GATEWAY,
                    "dns_error",
                    "upstream name did not resolve\n",
                ),
                ConnectTimeout => (
                    StatusCode::GATEWAY_TIMEOUT,
                    "connection_timeout",
                    "upstream connect timed out\n",
                ),
                ConnectionTerminated => (
                    StatusCode::BAD_GATEWAY,
                    "connection_terminated",
                    "upstream closed the connection before responding\n",
                ),
                ProtocolError => (
                    StatusCode::BAD_GATEWAY,
                    "http_protocol_error",
                    "upstream sent a malformed response\n",
                ),
                ResponseTimeout => (
                    StatusCode::GATEWAY_TIMEOUT,
                    "http_response_timeout",
                    "upstream did not respond in time\n",
                ),
                TlsProtocol => (
                    StatusCode::BAD_GATEWAY,
                    "tls_protocol_error",
                    "TLS handshake with upstream failed\n",
                ),
                TlsCertificate => (
                    StatusCode::BAD_GATEWAY,
                    "tls_certificate_error",
                    "upstream certificate rejected\n",
                ),
                // Only ever counted: the head was already sent when the body stalled.
                BodyTimeout => (
                    StatusCode::GATEWAY_TIMEOUT,
                    "http_response_timeout",
                    "upstream did not respond in time\n",
                ),
            },
            ProxyError::Shed { reason, .. } => match reason {
                ShedReason::ConcurrencyLimit
                | ShedReason::QueueTimeout
                | ShedReason::UpstreamConnectionLimit => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "connection_limit_reached",
                    "overloaded, retry later\n",
                ),
                ShedReason::CircuitOpen => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "destination_unavailable",
                    "upstream is failing, retry later\n",
                ),
                ShedReason::Maintenance => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "proxy_internal_response",
                    "down for maintenance, retry later\n",
                ),
                ShedReason::MemoryPressure => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "proxy_internal_response",
                    "proxy short of memory, retry later\n",
                ),
            },
            ProxyError::LoopDetected => (
                StatusCode::LOOP_DETECTED,
                "proxy_loop_detected",
                "routing loop detected\n",
            ),
            ProxyError::NoRoute => {
                return Presentation {
                    status: StatusCode::NOT_FOUND,
                    proxy_status: None,
                    body: "no route\n",
                }
            }
            ProxyError::Request(e) => match e {
                RequestError::Malformed => (
                    StatusCode::BAD_REQUEST,
                    "http_request_error",
                    "bad request\n",
                ),
                RequestError::HeadTooLarge => (
                    StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                    "http_request_error",
                    "request header fields too large\n",
                ),
                RequestError::UriTooLong => (
                    StatusCode::URI_TOO_LONG,
                    "http_request_error",
                    "request target too long\n",
                ),
                RequestError::UnsupportedTransferCoding => (
                    StatusCode::NOT_IMPLEMENTED,
                    "http_request_error",
                    "transfer coding not supported\n",
                ),
                RequestError::MethodNotAllowed => (
                    StatusCode::METHOD_NOT_ALLOWED,
                    "http_request_denied",
                    "method not allowed\n",
                ),
                RequestError::Timeout => (
                    StatusCode::REQUEST_TIMEOUT,
                    "http_request_error",
                    "request body did not arrive in time\n",
                ),
            },
        };
        Presentation {
            status,
            proxy_status: Some(proxy_status),
            body,
        }
    }

    /// The `kind` label of `spillway_upstream_errors_total`, for upstream failures only.
    pub fn upstream_kind(&self) -> Option<&'static str> {
        match self {
            ProxyError::Upstream(e) => Some(e.kind()),
            _ => None,
        }
    }

    /// One instance of every kind of error (sheds with a placeholder `retry_after` and
    /// priority), e.g. to precompute what each one is presented as.
    pub fn every_kind() -> impl Iterator<Item = ProxyError> {
        UpstreamError::ALL
            .into_iter()
            .map(ProxyError::Upstream)
            .chain(ShedReason::ALL.into_iter().map(|reason| ProxyError::Shed {
                reason,
                retry_after: Duration::ZERO,
                priority: Priority::Normal,
            }))
            .chain(RequestError::ALL.into_iter().map(ProxyError::Request))
            .chain([ProxyError::LoopDetected, ProxyError::NoRoute])
    }

    /// `Retry-After` for responses that carry one (all sheds).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ProxyError::Shed { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }

    /// A short label for the access log.
    pub fn log_kind(&self) -> &'static str {
        match self {
            ProxyError::Upstream(e) => e.kind(),
            ProxyError::Shed { reason, .. } => reason.label(),
            ProxyError::LoopDetected => "loop_detected",
            ProxyError::NoRoute => "no_route",
            ProxyError::Request(e) => match e {
                RequestError::Malformed => "bad_request",
                RequestError::HeadTooLarge => "head_too_large",
                RequestError::UriTooLong => "uri_too_long",
                RequestError::UnsupportedTransferCoding => "unsupported_transfer_coding",
                RequestError::MethodNotAllowed => "method_not_allowed",
                RequestError::Timeout => "client_timeout",
            },
        }
    }
}

impl UpstreamError {
    /// Metric label and Proxy-Status error type (they are the same words on purpose, except
    /// for a stalled body, which never becomes a response: `body_timeout`).
    pub fn kind(self) -> &'static str {
        if self == UpstreamError::BodyTimeout {
            return "body_timeout";
        }
        match ProxyError::Upstream(self).presentation().proxy_status {
            Some(k) => k,
            None => "unknown",
        }
    }

    /// Every variant, for resolving metric handles once per route.
    pub const ALL: [UpstreamError; 10] = [
        UpstreamError::ConnectRefused,
        UpstreamError::Unreachable,
        UpstreamError::Dns,
        UpstreamError::ConnectTimeout,
        UpstreamError::ConnectionTerminated,
        UpstreamError::ProtocolError,
        UpstreamError::ResponseTimeout,
        UpstreamError::TlsProtocol,
        UpstreamError::TlsCertificate,
        UpstreamError::BodyTimeout,
    ];

    /// Whether this failure happened before any byte of the request could reach the app,
    /// so that sending the request again cannot duplicate work.
    pub fn is_connect_failure(self) -> bool {
        matches!(
            self,
            UpstreamError::ConnectRefused
                | UpstreamError::Unreachable
                | UpstreamError::Dns
                | UpstreamError::ConnectTimeout
                | UpstreamError::TlsProtocol
                | UpstreamError::TlsCertificate
        )
    }
}

/// Retry-After as delay-seconds: an integer, rounded up, at least 1.
pub(crate) fn retry_after_secs(d: Duration) -> u64 {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    secs.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_maps_to_exactly_one_presentation() {
        use UpstreamError::*;
        let s = |reason| ProxyError::Shed {
            reason,
            retry_after: Duration::from_secs(5),
            priority: Priority::Sheddable,
        };
        let table: &[(ProxyError, u16, Option<&str>)] = &[
            (ConnectRefused.into(), 502, Some("connection_refused")),
            (Unreachable.into(), 502, Some("destination_unavailable")),
            (Dns.into(), 502, Some("dns_error")),
            (ConnectTimeout.into(), 504, Some("connection_timeout")),
            (
                ConnectionTerminated.into(),
                502,
                Some("connection_terminated"),
            ),
            (ProtocolError.into(), 502, Some("http_protocol_error")),
            (ResponseTimeout.into(), 504, Some("http_response_timeout")),
            (TlsProtocol.into(), 502, Some("tls_protocol_error")),
            (TlsCertificate.into(), 502, Some("tls_certificate_error")),
            (BodyTimeout.into(), 504, Some("http_response_timeout")),
            (
                s(ShedReason::ConcurrencyLimit),
                503,
                Some("connection_limit_reached"),
            ),
            (
                s(ShedReason::QueueTimeout),
                503,
                Some("connection_limit_reached"),
            ),
            (
                s(ShedReason::CircuitOpen),
                503,
                Some("destination_unavailable"),
            ),
            (
                s(ShedReason::Maintenance),
                503,
                Some("proxy_internal_response"),
            ),
            (
                s(ShedReason::UpstreamConnectionLimit),
                503,
                Some("connection_limit_reached"),
            ),
            (
                s(ShedReason::MemoryPressure),
                503,
                Some("proxy_internal_response"),
            ),
            (ProxyError::LoopDetected, 508, Some("proxy_loop_detected")),
            (ProxyError::NoRoute, 404, None),
            (
                RequestError::Malformed.into(),
                400,
                Some("http_request_error"),
            ),
            (
                RequestError::HeadTooLarge.into(),
                431,
                Some("http_request_error"),
            ),
            (
                RequestError::UriTooLong.into(),
                414,
                Some("http_request_error"),
            ),
            (
                RequestError::UnsupportedTransferCoding.into(),
                501,
                Some("http_request_error"),
            ),
            (
                RequestError::MethodNotAllowed.into(),
                405,
                Some("http_request_denied"),
            ),
            (
                RequestError::Timeout.into(),
                408,
                Some("http_request_error"),
            ),
        ];
        for (err, status, ps) in table {
            let p = err.presentation();
            assert_eq!(p.status.as_u16(), *status, "{err:?}");
            assert_eq!(p.proxy_status, *ps, "{err:?}");
            assert!(!p.body.is_empty());
        }
        assert_eq!(
            table.len(),
            UpstreamError::ALL.len() + ShedReason::ALL.len() + RequestError::ALL.len() + 2
        );
    }

    #[test]
    fn retry_after_is_whole_seconds_at_least_one() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(100)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1500)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(600)), 600);
    }
}
