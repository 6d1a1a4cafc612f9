//! Reading HTTP/1.1 messages: a response head's framing (RFC 9112 §6), and the body decoder
//! (length, chunked with trailers, or until close) that reads response bodies in the upstream
//! client and request bodies in the downstream server alike.

use std::io;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use http_body::Frame;

use crate::error::{ProxyError, UpstreamError};

/// Largest trailer section accepted.
const MAX_TRAILERS: usize = 64 * 1024;
/// Smallest header map a response head is parsed into (see `ResponseHead::from_parsed`).
const RESPONSE_MAP_MIN: usize = 12;
/// Longest chunk-size line (size and extensions) accepted.
const MAX_CHUNK_LINE: usize = 4 * 1024;

/// How a response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ResponseFraming {
    Length(u64),
    Chunked,
    UntilClose,
    /// 101 Switching Protocols: what follows is the upgraded protocol.
    Upgrade,
}

/// A parsed response head.
#[derive(Debug)]
pub(crate) struct ResponseHead {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) framing: ResponseFraming,
    pub(crate) keep_alive: bool,
}

impl ResponseHead {
    pub(crate) fn from_parsed(
        parsed: &httparse::Response<'_, '_>,
    ) -> Result<ResponseHead, ProxyError> {
        let bad = || ProxyError::from(UpstreamError::ProtocolError);
        let status = StatusCode::from_u16(parsed.code.unwrap_or(0)).map_err(|_| bad())?;
        let http11 = parsed.version == Some(1);
        // Room for what spillway adds on the way down (x-served-by, x-request-id), so the map
        // is allocated once. And at least RESPONSE_MAP_MIN: once hyper has written the response
        // it keeps this map (emptied) for the next request on the client connection, and
        // spillway adds up to six headers to that request: with room for them it never grows.
        let mut headers =
            HeaderMap::with_capacity((parsed.headers.len() + 3).max(RESPONSE_MAP_MIN));
        let mut length: Option<u64> = None;
        let mut length_fields = 0;
        let mut chunked: Option<bool> = None;
        let mut close = !http11;
        for h in parsed.headers.iter() {
            let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| bad())?;
            let value = HeaderValue::from_bytes(h.value).map_err(|_| bad())?;
            if name == CONTENT_LENGTH {
                length_fields += 1 + h.value.iter().filter(|&&b| b == b',').count();
                // Repeated or listed values must all agree (RFC 9110 §8.6).
                for v in h.value.split(|&b| b == b',') {
                    let n = parse_length(v.trim_ascii()).ok_or_else(bad)?;
                    if length.is_some_and(|l| l != n) {
                        return Err(bad());
                    }
                    length = Some(n);
                }
            } else if name == TRANSFER_ENCODING {
                // spillway decodes chunked and nothing else: any other coding (gzip, chunked;
                // chunked, gzip) would reach the client as plain data it is not (RFC 9112 §6.1).
                if chunked.is_some() || !is_chunked_only(h.value) {
                    return Err(bad());
                }
                chunked = Some(true);
            } else if name == CONNECTION {
                for token in h.value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                    if token.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if token.eq_ignore_ascii_case(b"keep-alive") && !http11 {
                        close = false;
                    }
                }
            }
            headers.append(name, value);
        }
        let framing = if status == StatusCode::SWITCHING_PROTOCOLS {
            ResponseFraming::Upgrade
        } else if status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
            ResponseFraming::Length(0)
        } else {
            match (chunked, length) {
                (Some(_), _) => ResponseFraming::Chunked,
                (None, Some(n)) => ResponseFraming::Length(n),
                (None, None) => ResponseFraming::UntilClose,
            }
        };
        if chunked.is_some() && length.is_some() {
            // Both: Transfer-Encoding wins, and the length must not travel on (RFC 9112 §6.3);
            // such a message may be an attempt at smuggling, so the connection is not reused.
            headers.remove(CONTENT_LENGTH);
            close = true;
        } else if let (Some(n), true) = (length, length_fields > 1) {
            // `5, 5` or two identical fields: one value travels on (RFC 9110 §8.6).
            headers.insert(CONTENT_LENGTH, HeaderValue::from(n));
        }
        Ok(ResponseHead {
            status,
            headers,
            keep_alive: !close && framing != ResponseFraming::UntilClose,
            framing,
        })
    }
}

/// Whether a `Transfer-Encoding` value names exactly one coding, `chunked`.
pub(crate) fn is_chunked_only(value: &[u8]) -> bool {
    value.trim_ascii().eq_ignore_ascii_case(b"chunked")
}

/// A `Content-Length` value: digits only.
pub(crate) fn parse_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// Where a response body stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decoder {
    /// This many bytes still to come.
    Length(u64),
    Chunked(Chunk),
    /// Everything until the upstream closes.
    UntilClose,
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk's data.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailers, then the final CRLF.
    Trailers,
}

/// What one decoding step found in the read buffer.
pub(crate) enum Step {
    Frame(Frame<Bytes>),
    End,
    NeedMore,
}

/// Decodes what the read buffer holds.
pub(crate) fn step(decoder: &mut Decoder, rbuf: &mut BytesMut) -> io::Result<Step> {
    let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
    loop {
        match decoder {
            Decoder::Done => return Ok(Step::End),
            Decoder::Length(0) => return Ok(Step::End),
            Decoder::Length(left) => {
                return Ok(take(left, rbuf).map_or(Step::NeedMore, |d| Step::Frame(Frame::data(d))));
            }
            Decoder::UntilClose => {
                if rbuf.is_empty() {
                    return Ok(Step::NeedMore);
                }
                return Ok(Step::Frame(Frame::data(rbuf.split().freeze())));
            }
            Decoder::Chunked(chunk) => match chunk {
                Chunk::Size => match httparse::parse_chunk_size(rbuf) {
                    Ok(httparse::Status::Complete((used, size))) => {
                        rbuf.advance(used);
                        *chunk = if size == 0 {
                            Chunk::Trailers
                        } else {
                            Chunk::Data(size)
                        };
                    }
                    Ok(httparse::Status::Partial) if rbuf.len() <= MAX_CHUNK_LINE => {
                        return Ok(Step::NeedMore)
                    }
                    _ => return Err(invalid("bad chunk size line")),
                },
                Chunk::Data(left) => {
                    let Some(data) = take(left, rbuf) else {
                        return Ok(Step::NeedMore);
                    };
                    if *left == 0 {
                        *chunk = Chunk::DataEnd;
                    }
                    return Ok(Step::Frame(Frame::data(data)));
                }
                Chunk::DataEnd => {
                    if rbuf.len() < 2 {
                        return Ok(Step::NeedMore);
                    }
                    if &rbuf[..2] != b"\r\n" {
                        return Err(invalid("chunk data not followed by CRLF"));
                    }
                    rbuf.advance(2);
                    *chunk = Chunk::Size;
                }
                Chunk::Trailers => {
                    let mut slots = [httparse::EMPTY_HEADER; 64];
                    match httparse::parse_headers(rbuf, &mut slots) {
                        Ok(httparse::Status::Complete((used, fields))) => {
                            let mut trailers = HeaderMap::new();
                            for f in fields {
                                let name = HeaderName::from_bytes(f.name.as_bytes())
                                    .map_err(|_| invalid("bad trailer name"))?;
                                let value = HeaderValue::from_bytes(f.value)
                                    .map_err(|_| invalid("bad trailer value"))?;
                                trailers.append(name, value);
                            }
                            rbuf.advance(used);
                            *decoder = Decoder::Done;
                            if !trailers.is_empty() {
                                return Ok(Step::Frame(Frame::trailers(trailers)));
                            }
                        }
                        Ok(httparse::Status::Partial) if rbuf.len() <= MAX_TRAILERS => {
                            return Ok(Step::NeedMore)
                        }
                        _ => return Err(invalid("bad trailer section")),
                    }
                }
            },
        }
    }
}

/// Up to `left` bytes of what the read buffer holds (`None` when it holds nothing).
fn take(left: &mut u64, rbuf: &mut BytesMut) -> Option<Bytes> {
    if rbuf.is_empty() {
        return None;
    }
    let n = (*left).min(rbuf.len() as u64) as usize;
    *left -= n as u64;
    Some(rbuf.split_to(n).freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses a complete response head the way the client does.
    fn head(raw: &str) -> Result<ResponseHead, ProxyError> {
        let mut slots = [httparse::EMPTY_HEADER; 32];
        let mut parsed = httparse::Response::new(&mut slots);
        let status = parsed.parse(raw.as_bytes()).expect("valid HTTP");
        assert!(status.is_complete(), "{raw:?} is not a complete head");
        ResponseHead::from_parsed(&parsed)
    }

    fn framing(raw: &str) -> (ResponseFraming, bool) {
        let h = head(raw).unwrap();
        (h.framing, h.keep_alive)
    }

    #[test]
    fn framing_follows_rfc_9112() {
        use ResponseFraming::*;
        let cases = [
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n",
                (Length(5), true),
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 5, 5\r\n\r\n",
                (Length(5), true),
            ),
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
                (Chunked, true),
            ),
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding: Chunked \r\n\r\n",
                (Chunked, true),
            ),
            ("HTTP/1.1 200 OK\r\n\r\n", (UntilClose, false)),
            (
                "HTTP/1.1 204 No Content\r\ncontent-length: 7\r\n\r\n",
                (Length(0), true),
            ),
            ("HTTP/1.1 304 Not Modified\r\n\r\n", (Length(0), true)),
            (
                "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n",
                (Upgrade, true),
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 1\r\nconnection: close\r\n\r\n",
                (Length(1), false),
            ),
            (
                "HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\n",
                (Length(1), false),
            ),
            (
                "HTTP/1.0 200 OK\r\ncontent-length: 1\r\nconnection: keep-alive\r\n\r\n",
                (Length(1), true),
            ),
        ];
        for (raw, want) in cases {
            assert_eq!(framing(raw), want, "{raw:?}");
        }
    }

    #[test]
    fn a_repeated_length_travels_on_as_one_value() {
        for raw in [
            "HTTP/1.1 200 OK\r\ncontent-length: 5, 5\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 5\r\n\r\n",
        ] {
            let h = head(raw).unwrap();
            let values: Vec<_> = h.headers.get_all(CONTENT_LENGTH).iter().collect();
            assert_eq!(values, ["5"], "{raw:?}");
        }
    }

    #[test]
    fn chunked_wins_over_a_length_that_is_then_dropped_and_the_connection_retired() {
        let h = head("HTTP/1.1 200 OK\r\ncontent-length: 9\r\ntransfer-encoding: chunked\r\n\r\n")
            .unwrap();
        assert_eq!(h.framing, ResponseFraming::Chunked);
        assert!(!h.keep_alive);
        assert!(!h.headers.contains_key(CONTENT_LENGTH));
    }

    #[test]
    fn lengths_that_disagree_or_are_not_digits_are_protocol_errors() {
        for raw in [
            "HTTP/1.1 200 OK\r\ncontent-length: 5, 6\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 0x10\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: \r\n\r\n",
            // Codings spillway does not decode would reach the client as plain data.
            "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, gzip\r\n\r\n",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n\r\n",
            // Codings spillway does not decode would reach the client as plain data.
            "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, gzip\r\n\r\n",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n\r\n",
        ] {
            assert_eq!(
                head(raw).unwrap_err(),
                ProxyError::from(UpstreamError::ProtocolError),
                "{raw:?}"
            );
        }
        // Up to 19 digits (any such length fits in a u64); longer ones are refused outright.
        assert_eq!(
            parse_length(b"9999999999999999999"),
            Some(9_999_999_999_999_999_999)
        );
        assert_eq!(parse_length(b"18446744073709551615"), None);
        assert_eq!(parse_length(b"00012"), Some(12));
    }

    /// Runs the decoder over `wire` fed in pieces of `step_len` bytes; returns the body, the
    /// trailers and whether it ended.
    fn decode(
        mut decoder: Decoder,
        wire: &[u8],
        step_len: usize,
    ) -> io::Result<(Vec<u8>, Option<HeaderMap>, bool)> {
        let (mut rbuf, mut body, mut trailers) = (BytesMut::new(), Vec::new(), None);
        let mut fed = 0;
        loop {
            match step(&mut decoder, &mut rbuf)? {
                Step::Frame(f) => match f.into_data() {
                    Ok(d) => body.extend_from_slice(&d),
                    Err(f) => trailers = f.into_trailers().ok(),
                },
                Step::End => return Ok((body, trailers, true)),
                Step::NeedMore if fed < wire.len() => {
                    let n = step_len.min(wire.len() - fed);
                    rbuf.extend_from_slice(&wire[fed..fed + n]);
                    fed += n;
                }
                Step::NeedMore => return Ok((body, trailers, false)),
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_whatever_the_read_boundaries() {
        let wire = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-checksum: abc\r\n\r\n";
        for step_len in [1, 2, 3, 7, wire.len()] {
            let (body, trailers, ended) =
                decode(Decoder::Chunked(Chunk::Size), wire, step_len).unwrap();
            assert_eq!(body, b"hello world", "step {step_len}");
            assert!(ended);
            assert_eq!(trailers.unwrap()["x-checksum"], "abc");
        }
    }

    #[test]
    fn a_length_body_stops_at_its_length() {
        let (body, _, ended) = decode(Decoder::Length(5), b"helloEXTRA", 3).unwrap();
        assert_eq!(body, b"hello");
        assert!(ended);
        let (body, _, ended) = decode(Decoder::Length(5), b"hel", 3).unwrap();
        assert_eq!(
            (body.as_slice(), ended),
            (&b"hel"[..], false),
            "waits for the rest"
        );
    }

    #[test]
    fn broken_chunked_framing_is_an_error() {
        for wire in [
            &b"zz\r\nhello\r\n0\r\n\r\n"[..],
            &b"5\r\nhelloXX0\r\n\r\n"[..],
            &b"0\r\nbad trailer\r\n\r\n"[..],
        ] {
            let err = decode(Decoder::Chunked(Chunk::Size), wire, 4).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{wire:?}");
        }
        // A chunk-size line that never ends is cut off at the limit.
        let endless = vec![b'1'; MAX_CHUNK_LINE + 1];
        assert!(decode(Decoder::Chunked(Chunk::Size), &endless, 512).is_err());
    }
}
