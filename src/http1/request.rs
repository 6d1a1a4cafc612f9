//! Parsing a request head (RFC 9112 §3 and §6): the request line and fields, within the
//! listener's limits, and the framing of the body that follows. Everything a hostile client
//! could use to make spillway and the app read one message as two (a length and chunked
//! together, lengths that disagree, a coding not last) is refused here, before any of it is
//! forwarded.

use std::mem::MaybeUninit;

use bytes::{Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, EXPECT, TRANSFER_ENCODING, UPGRADE};
use http::{request, HeaderMap, HeaderName, HeaderValue, Method, Uri, Version};

use super::decode::parse_length;
use crate::error::RequestError;

/// Header slots on the stack; a limit above this parses into a heap array.
const STACK_HEADERS: usize = 128;
/// Room in each request's header map for what spillway adds before forwarding (`Via`,
/// `X-Forwarded-*`, `x-request-id`), so the map is allocated once.
const ADDED_FIELDS: usize = 6;

/// What a listener accepts in a request head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HeadLimits {
    /// The request line and all fields together, in bytes.
    pub max_bytes: usize,
    /// Number of fields.
    pub max_fields: usize,
}

/// How a request body is delimited on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyFraming {
    /// No body.
    None,
    /// `Content-Length`: exactly this many bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// A parsed request head.
#[derive(Debug)]
pub(crate) struct RequestHead {
    /// Method, target, version and fields.
    pub parts: request::Parts,
    /// How the body is delimited.
    pub framing: BodyFraming,
    /// Whether the client wants the connection kept open after this exchange.
    pub keep_alive: bool,
    /// `Expect: 100-continue`: the client waits for a `100 Continue` before sending the body.
    pub expect_continue: bool,
    /// Whether the connection may switch protocols after this request (an HTTP/1.1 `Upgrade`
    /// with `Connection: upgrade`, or `CONNECT`).
    pub upgrade: bool,
}

/// Parses a request head from the front of `buf`. `Ok(None)`: not complete yet (and within
/// the limits); the bytes stay in `buf`. On success the head's bytes are taken out of `buf`,
/// and the header values share them (no copy per field).
pub(crate) fn parse(
    buf: &mut BytesMut,
    limits: HeadLimits,
) -> Result<Option<RequestHead>, RequestError> {
    // Tolerate empty lines before a request line (RFC 9112 §2.2), as after a body that a
    // client ended with an extra CRLF.
    let blank = buf
        .iter()
        .take_while(|&&b| b == b'\r' || b == b'\n')
        .count();
    if blank > 0 {
        let _ = buf.split_to(blank);
    }
    if buf.is_empty() {
        return Ok(None);
    }
    let Some(line) = parse_line_and_fields(buf, limits)? else {
        return Ok(None);
    };
    let head: Bytes = buf.split_to(line.len).freeze();
    let method = line.method;
    let version = line.version;
    let fields = line.fields;
    let target = head.slice(line.target.0..line.target.0 + line.target.1);
    let uri = if method == Method::CONNECT {
        // Authority form (`host:port`) for CONNECT only (RFC 9112 §3.2.3).
        Uri::from_maybe_shared(target).map_err(|_| RequestError::Malformed)?
    } else if target.first() == Some(&b'/') || target.as_ref() == b"*" || target.contains(&b':') {
        Uri::from_maybe_shared(target).map_err(|_| RequestError::Malformed)?
    } else {
        return Err(RequestError::Malformed);
    };

    let mut headers = HeaderMap::with_capacity(fields.len() + ADDED_FIELDS);
    let mut framing = FramingScan::default();
    let mut keep_alive = version == Version::HTTP_11;
    let mut connection_upgrade = false;
    let mut expect_continue = false;
    for (name, (at, n)) in fields {
        let raw = &head[at..at + n];
        if name == CONTENT_LENGTH {
            framing.length(raw)?;
        } else if name == TRANSFER_ENCODING {
            framing.coding(raw)?;
        } else if name == CONNECTION {
            for token in raw.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                if token.eq_ignore_ascii_case(b"close") {
                    keep_alive = false;
                } else if token.eq_ignore_ascii_case(b"keep-alive") && version == Version::HTTP_10 {
                    keep_alive = true;
                } else if token.eq_ignore_ascii_case(b"upgrade") {
                    connection_upgrade = true;
                }
            }
        } else if name == EXPECT {
            expect_continue = raw.trim_ascii().eq_ignore_ascii_case(b"100-continue");
        }
        // Shares the head's bytes. httparse has already checked them; the checked constructor
        // repeats that cheaply and keeps this free of `unsafe`.
        let value = HeaderValue::from_maybe_shared(head.slice(at..at + n))
            .map_err(|_| RequestError::Malformed)?;
        headers.append(name, value);
    }
    let body = framing.finish(version)?;
    let upgrade = method == Method::CONNECT
        || (version == Version::HTTP_11 && connection_upgrade && headers.contains_key(UPGRADE));
    let mut parts = http::Request::new(()).into_parts().0;
    parts.method = method;
    parts.uri = uri;
    parts.version = version;
    parts.headers = headers;
    Ok(Some(RequestHead {
        parts,
        framing: body,
        keep_alive,
        expect_continue,
        upgrade,
    }))
}

/// The request line and fields, as offsets into the buffer they were parsed from.
struct Line {
    len: usize,
    method: Method,
    version: Version,
    target: (usize, usize),
    fields: Vec<(HeaderName, (usize, usize))>,
}

/// Parses the request line and fields without taking anything out of `buf`.
fn parse_line_and_fields(buf: &[u8], limits: HeadLimits) -> Result<Option<Line>, RequestError> {
    let mut stack = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; STACK_HEADERS];
    let mut heap = Vec::new();
    let slots: &mut [MaybeUninit<httparse::Header<'_>>] = if limits.max_fields <= STACK_HEADERS {
        &mut stack[..limits.max_fields]
    } else {
        heap.resize_with(limits.max_fields, MaybeUninit::uninit);
        &mut heap
    };
    let mut parsed = httparse::Request::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_request_with_uninit_headers(
        &mut parsed,
        buf,
        slots,
    ) {
        Ok(httparse::Status::Complete(len)) if len <= limits.max_bytes => len,
        Ok(httparse::Status::Complete(_)) => return Err(too_large(buf, limits)),
        Ok(httparse::Status::Partial) if buf.len() <= limits.max_bytes => return Ok(None),
        Ok(httparse::Status::Partial) => return Err(too_large(buf, limits)),
        Err(httparse::Error::TooManyHeaders) => return Err(RequestError::HeadTooLarge),
        Err(_) => return Err(RequestError::Malformed),
    };
    let method = Method::from_bytes(parsed.method.unwrap_or("").as_bytes())
        .map_err(|_| RequestError::Malformed)?;
    let version = match parsed.version {
        Some(0) => Version::HTTP_10,
        Some(1) => Version::HTTP_11,
        _ => return Err(RequestError::Malformed),
    };
    let base = buf.as_ptr() as usize;
    let span = |s: &[u8]| (s.as_ptr() as usize - base, s.len());
    let target = span(parsed.path.unwrap_or("").as_bytes());
    let mut fields = Vec::with_capacity(parsed.headers.len());
    for h in parsed.headers.iter() {
        let name =
            HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| RequestError::Malformed)?;
        fields.push((name, span(h.value)));
    }
    Ok(Some(Line {
        len,
        method,
        version,
        target,
        fields,
    }))
}

/// The head is over the byte limit: 414 when the request line alone is, 431 otherwise.
fn too_large(buf: &[u8], limits: HeadLimits) -> RequestError {
    match buf.iter().position(|&b| b == b'\n') {
        Some(end) if end < limits.max_bytes => RequestError::HeadTooLarge,
        _ => RequestError::UriTooLong,
    }
}

/// The body framing fields seen so far.
#[derive(Default)]
struct FramingScan {
    length: Option<u64>,
    chunked: bool,
    codings: usize,
}

impl FramingScan {
    /// A `Content-Length` field: every value, on every line, must be the same number.
    fn length(&mut self, raw: &[u8]) -> Result<(), RequestError> {
        for v in raw.split(|&b| b == b',') {
            let n = parse_length(v.trim_ascii()).ok_or(RequestError::Malformed)?;
            if self.length.is_some_and(|l| l != n) {
                return Err(RequestError::Malformed);
            }
            self.length = Some(n);
        }
        Ok(())
    }

    /// A `Transfer-Encoding` field: chunked must be the last coding; any other coding is one
    /// spillway does not decode.
    fn coding(&mut self, raw: &[u8]) -> Result<(), RequestError> {
        for token in raw.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
            if token.is_empty() {
                continue;
            }
            if self.chunked {
                // Something after chunked: the body's end cannot be known (RFC 9112 §6.3).
                return Err(RequestError::Malformed);
            }
            self.codings += 1;
            self.chunked = token.eq_ignore_ascii_case(b"chunked");
        }
        Ok(())
    }

    fn finish(self, version: Version) -> Result<BodyFraming, RequestError> {
        if self.codings == 0 {
            return Ok(self.length.map_or(BodyFraming::None, |n| {
                if n == 0 {
                    BodyFraming::None
                } else {
                    BodyFraming::Length(n)
                }
            }));
        }
        // A length beside a coding, or a coding in HTTP/1.0, is how requests are smuggled past
        // one reader and not the next: refused, not repaired (RFC 9112 §6.1, §6.3).
        if self.length.is_some() || version == Version::HTTP_10 || !self.chunked {
            return Err(RequestError::Malformed);
        }
        if self.codings > 1 {
            return Err(RequestError::UnsupportedTransferCoding);
        }
        Ok(BodyFraming::Chunked)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: HeadLimits = HeadLimits {
        max_bytes: 1024,
        max_fields: 8,
    };

    fn parse_str(raw: &str) -> Result<Option<RequestHead>, RequestError> {
        parse(&mut BytesMut::from(raw), LIMITS)
    }

    fn head(raw: &str) -> RequestHead {
        parse_str(raw).unwrap().expect("complete")
    }

    #[test]
    fn a_simple_request_and_what_is_left_behind_it() {
        let mut buf = BytesMut::from("GET /a?b=1 HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\nNEXT");
        let h = parse(&mut buf, LIMITS).unwrap().unwrap();
        assert_eq!(h.parts.method, Method::GET);
        assert_eq!(h.parts.uri, "/a?b=1");
        assert_eq!(h.parts.version, Version::HTTP_11);
        assert_eq!(h.parts.headers["host"], "x");
        assert_eq!(h.parts.headers["accept"], "*/*");
        assert_eq!(h.framing, BodyFraming::None);
        assert!(h.keep_alive && !h.expect_continue && !h.upgrade);
        assert_eq!(&buf[..], b"NEXT");
    }

    #[test]
    fn partial_heads_wait_and_leading_blank_lines_are_skipped() {
        assert!(parse_str("GET / HTTP/1.1\r\nHost: x\r\n")
            .unwrap()
            .is_none());
        assert!(parse_str("").unwrap().is_none());
        let h = head("\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(h.parts.uri, "/");
    }

    #[test]
    fn body_framing() {
        let f = |raw: &str| head(raw).framing;
        assert_eq!(
            f("POST / HTTP/1.1\r\ncontent-length: 5\r\n\r\n"),
            BodyFraming::Length(5)
        );
        assert_eq!(
            f("POST / HTTP/1.1\r\ncontent-length: 5, 5\r\n\r\n"),
            BodyFraming::Length(5)
        );
        assert_eq!(
            f("POST / HTTP/1.1\r\ncontent-length: 0\r\n\r\n"),
            BodyFraming::None
        );
        assert_eq!(
            f("POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n"),
            BodyFraming::Chunked
        );
    }

    #[test]
    fn smuggling_shapes_are_refused() {
        use RequestError::*;
        for (raw, want) in [
            (
                "POST / HTTP/1.1\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n",
                Malformed,
            ),
            ("POST / HTTP/1.1\r\ncontent-length: 5, 6\r\n\r\n", Malformed),
            ("POST / HTTP/1.1\r\ncontent-length: +5\r\n\r\n", Malformed),
            (
                "POST / HTTP/1.1\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n",
                Malformed,
            ),
            (
                "POST / HTTP/1.1\r\ntransfer-encoding: chunked, gzip\r\n\r\n",
                Malformed,
            ),
            (
                "POST / HTTP/1.1\r\ntransfer-encoding: gzip\r\n\r\n",
                Malformed,
            ),
            (
                "POST / HTTP/1.0\r\ntransfer-encoding: chunked\r\n\r\n",
                Malformed,
            ),
            (
                "POST / HTTP/1.1\r\ntransfer-encoding: gzip, chunked\r\n\r\n",
                UnsupportedTransferCoding,
            ),
            ("GET / HTTP/2.0\r\n\r\n", Malformed),
            ("GET nothing HTTP/1.1\r\n\r\n", Malformed),
            ("G\x01T / HTTP/1.1\r\n\r\n", Malformed),
            ("GET / HTTP/1.1\r\nbad header\r\n\r\n", Malformed),
        ] {
            assert_eq!(parse_str(raw).err(), Some(want), "{raw:?}");
        }
    }

    #[test]
    fn limits_answer_414_for_the_line_and_431_for_the_fields() {
        let long_target = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(2000));
        assert_eq!(
            parse_str(&long_target).err(),
            Some(RequestError::UriTooLong)
        );
        let partial_line = format!("GET /{}", "a".repeat(2000));
        assert_eq!(
            parse_str(&partial_line).err(),
            Some(RequestError::UriTooLong)
        );
        let big_field = format!("GET / HTTP/1.1\r\nx: {}\r\n\r\n", "b".repeat(2000));
        assert_eq!(
            parse_str(&big_field).err(),
            Some(RequestError::HeadTooLarge)
        );
        let many: String = (0..9).map(|i| format!("x{i}: y\r\n")).collect();
        assert_eq!(
            parse_str(&format!("GET / HTTP/1.1\r\n{many}\r\n")).err(),
            Some(RequestError::HeadTooLarge)
        );
        let eight: String = (0..8).map(|i| format!("x{i}: y\r\n")).collect();
        assert!(parse_str(&format!("GET / HTTP/1.1\r\n{eight}\r\n")).is_ok());
    }

    #[test]
    fn connection_semantics() {
        assert!(!head("GET / HTTP/1.1\r\nconnection: close\r\n\r\n").keep_alive);
        assert!(!head("GET / HTTP/1.0\r\n\r\n").keep_alive);
        assert!(head("GET / HTTP/1.0\r\nconnection: Keep-Alive\r\n\r\n").keep_alive);
        assert!(
            head("POST / HTTP/1.1\r\nexpect: 100-continue\r\ncontent-length: 1\r\n\r\n")
                .expect_continue
        );
        let ws =
            head("GET / HTTP/1.1\r\nconnection: keep-alive, Upgrade\r\nupgrade: websocket\r\n\r\n");
        assert!(ws.upgrade);
        assert!(!head("GET / HTTP/1.1\r\nupgrade: websocket\r\n\r\n").upgrade);
        let connect = head("CONNECT example.com:443 HTTP/1.1\r\nhost: example.com:443\r\n\r\n");
        assert!(connect.upgrade);
        assert_eq!(connect.parts.uri.authority().unwrap(), "example.com:443");
        let absolute = head("GET http://a.test/x HTTP/1.1\r\nhost: b.test\r\n\r\n");
        assert_eq!(absolute.parts.uri.host(), Some("a.test"));
    }
}
