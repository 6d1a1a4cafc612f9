//! Why an exchange with an upstream failed, read from an error's cause chain (never from its
//! message), so each failure keeps its own name all the way to the response.

use std::error::Error as StdError;
use std::io;

use super::connector::ConnectError;
use crate::error::UpstreamError;
use crate::tls::client::classify_tls;

/// Classifies a hyper-util client error by walking its cause chain (never by its message).
pub(crate) fn classify(err: &hyper_util::client::legacy::Error) -> UpstreamError {
    classify_chain(err.source()).unwrap_or(if err.is_connect() {
        UpstreamError::ConnectRefused
    } else {
        UpstreamError::ConnectionTerminated
    })
}

/// Classifies an I/O failure on an established connection (a TLS error inside it included).
pub(crate) fn classify_io(err: &io::Error) -> UpstreamError {
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
