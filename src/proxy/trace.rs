//! W3C Trace Context (`traceparent`): spillway joins the trace of a request that carries one
//! and starts one for a request that does not, so its answers, and the app's, belong to the
//! incident's trace.
//!
//! As a participating proxy (W3C Trace Context §3.2) spillway keeps the trace id and the flags
//! and puts its own span id in the `traceparent` it sends upstream; `tracestate` passes
//! unchanged. A new trace is started sampled (flags `01`): an app that samples by its parent
//! then samples as it did when it was the trace's root, rather than silently stopping.

use std::cell::RefCell;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use rand::rngs::SmallRng;
use rand::{Rng as _, SeedableRng as _};

/// `traceparent`.
pub(crate) const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// `tracestate`.
pub(crate) const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// Flags of a trace spillway starts: sampled.
const SAMPLED: u8 = 0x01;

/// The trace a request belongs to, with spillway's span in it.
#[derive(Debug, Clone)]
pub(crate) struct TraceContext {
    /// `00-<trace id>-<spillway's span id>-<flags>`: what goes upstream.
    pub(crate) traceparent: HeaderValue,
    /// Whether this continues the client's trace (else it is a new one).
    pub(crate) joined: bool,
}

impl TraceContext {
    /// The trace of a request: the one its valid `traceparent` names, or a new one.
    pub(crate) fn of(headers: &HeaderMap) -> TraceContext {
        let parent = headers.get(TRACEPARENT).and_then(|v| parse(v.as_bytes()));
        let joined = parent.is_some();
        let (trace_id, flags) = parent.unwrap_or_else(|| (random::<16>(), SAMPLED));
        let span_id = random::<8>();
        let mut text = [0u8; 55];
        text[..3].copy_from_slice(b"00-");
        hex(&trace_id, &mut text[3..35]);
        text[35] = b'-';
        hex(&span_id, &mut text[36..52]);
        text[52] = b'-';
        hex(&[flags], &mut text[53..55]);
        TraceContext {
            traceparent: HeaderValue::from_maybe_shared(Bytes::from_owner(text))
                .expect("hex is a valid header value"),
            joined,
        }
    }

    /// The trace id, as 32 hex digits (for the access log).
    pub(crate) fn trace_id(&self) -> &str {
        // The value is ASCII by construction.
        self.traceparent.to_str().map_or("-", |s| &s[3..35])
    }
}

/// A `traceparent` spillway can continue: version `00` (or a later version with the same
/// layout, whose extra fields are dropped), a trace id and a parent id that are not all zeros,
/// lower-case hex throughout (W3C Trace Context §3.2.2). Returns the trace id and the flags.
fn parse(v: &[u8]) -> Option<([u8; 16], u8)> {
    let v = v.trim_ascii();
    if v.len() < 55 || v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    let version = unhex::<1>(&v[0..2])?[0];
    if version == 0xff
        || (version == 0 && v.len() != 55)
        || (version > 0 && v.len() > 55 && v[55] != b'-')
    {
        return None;
    }
    let trace_id = unhex::<16>(&v[3..35])?;
    let parent_id = unhex::<8>(&v[36..52])?;
    let flags = unhex::<1>(&v[53..55])?[0];
    if trace_id == [0; 16] || parent_id == [0; 8] {
        return None;
    }
    Some((trace_id, flags))
}

fn unhex<const N: usize>(text: &[u8]) -> Option<[u8; N]> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    for (i, pair) in text.chunks_exact(2).enumerate() {
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

fn hex(bytes: &[u8], out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = DIGITS[usize::from(b >> 4)];
        pair[1] = DIGITS[usize::from(b & 0xf)];
    }
}

/// Random ids need to be unique, not unpredictable: a small fast generator per thread, seeded
/// from the OS. Never all zeros (an invalid id).
fn random<const N: usize>() -> [u8; N] {
    thread_local! {
        static IDS: RefCell<SmallRng> = RefCell::new(SmallRng::from_os_rng());
    }
    IDS.with(|r| {
        let mut r = r.borrow_mut();
        loop {
            let mut id = [0u8; N];
            r.fill(&mut id[..]);
            if id != [0; N] {
                return id;
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(tp: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT, HeaderValue::from_str(tp).unwrap());
        h
    }

    #[test]
    fn a_valid_traceparent_keeps_its_trace_and_flags_with_our_span() {
        let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let t = TraceContext::of(&with(incoming));
        let out = t.traceparent.to_str().unwrap();
        assert_eq!(&out[..36], "00-4bf92f3577b34da6a3ce929d0e0e4736-");
        assert_ne!(&out[36..52], "00f067aa0ba902b7", "spillway's own span id");
        assert_eq!(&out[52..], "-01");
        assert_eq!(t.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        let unsampled = TraceContext::of(&with(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
        ));
        assert!(unsampled.traceparent.to_str().unwrap().ends_with("-00"));
        // A later version with more fields: continued, extra fields dropped.
        let future = TraceContext::of(&with(
            "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-the-future-holds",
        ));
        assert_eq!(future.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert!(future.traceparent.to_str().unwrap().starts_with("00-"));
    }

    #[test]
    fn an_invalid_or_missing_traceparent_starts_a_new_sampled_trace() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            let t = if bad.is_empty() {
                TraceContext::of(&HeaderMap::new())
            } else {
                TraceContext::of(&with(bad))
            };
            let out = t.traceparent.to_str().unwrap().to_owned();
            assert_eq!(out.len(), 55, "{bad:?}");
            assert!(
                out.starts_with("00-") && out.ends_with("-01"),
                "{bad:?}: {out}"
            );
            assert_ne!(t.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736", "{bad:?}");
            assert!(
                parse(out.as_bytes()).is_some(),
                "what we send is valid: {out}"
            );
        }
        let a = TraceContext::of(&HeaderMap::new());
        let b = TraceContext::of(&HeaderMap::new());
        assert_ne!(a.trace_id(), b.trace_id());
    }
}
