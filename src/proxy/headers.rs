//! Header rules, declared once: what is stripped, what is stamped, and why.

use bytes::{BufMut, Bytes, BytesMut};
use http::header::Entry;
use http::header::{
    HeaderName, HeaderValue, CONNECTION, HOST, TE, TRAILER, TRANSFER_ENCODING, UPGRADE, VIA,
};
use http::{HeaderMap, Version};
use rand::rngs::SmallRng;

use crate::http1::encode::field;
use crate::proxy::trace::TRACEPARENT;
use rand::{Rng as _, SeedableRng as _};

/// Which layer answered: every response carries it, upstream responses get `, <server_id>`
/// appended to whatever the app set.
pub const X_SERVED_BY: HeaderName = HeaderName::from_static("x-served-by");
/// Correlates the access log line, the upstream's logs and the client: kept when the client
/// sent one, generated otherwise, echoed on the response.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// RFC 9209: on every response spillway generates, says which proxy and why.
pub const PROXY_STATUS: HeaderName = HeaderName::from_static("proxy-status");
/// The client address chain, appended.
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// The scheme the client used, set.
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// The host the client asked for, set.
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Header values derived from `server_id`, computed once per config snapshot.
#[derive(Debug, Clone)]
pub struct Stamps {
    /// The server id itself.
    pub server_id: Box<str>,
    /// `x-served-by` value for generated responses.
    pub served_by: HeaderValue,
    /// `1.1 <server_id>` for `Via`.
    via: HeaderValue,
    /// `<server_id>` as an RFC 8941 token or quoted sf-string, for `Proxy-Status`.
    proxy_status_id: Box<str>,
    /// `Proxy-Status` of every error spillway can generate, built once: a shed 503 should
    /// cost as little as possible.
    proxy_statuses: Box<[(&'static str, HeaderValue)]>,
}

impl Stamps {
    /// Precomputes every stamp. `server_id` is validated by config (visible ASCII, no commas).
    pub fn new(server_id: &str) -> Self {
        let served_by =
            HeaderValue::from_str(server_id).unwrap_or(HeaderValue::from_static("spillway"));
        let mut stamps = Stamps {
            server_id: server_id.into(),
            served_by,
            via: HeaderValue::from_str(&format!("1.1 {server_id}"))
                .unwrap_or(HeaderValue::from_static("1.1 spillway")),
            proxy_status_id: sf_item(server_id).into(),
            proxy_statuses: Box::new([]),
        };
        let mut types: Vec<&'static str> = crate::error::ProxyError::every_kind()
            .filter_map(|e| e.presentation().proxy_status)
            .collect();
        types.dedup();
        stamps.proxy_statuses = types
            .into_iter()
            .map(|t| (t, stamps.format_proxy_status(t)))
            .collect();
        stamps
    }

    /// The `Proxy-Status` value for a generated response: `<id>; error=<type>`.
    pub fn proxy_status(&self, error_type: &str) -> HeaderValue {
        if let Some((_, v)) = self.proxy_statuses.iter().find(|(t, _)| *t == error_type) {
            return v.clone();
        }
        self.format_proxy_status(error_type)
    }

    fn format_proxy_status(&self, error_type: &str) -> HeaderValue {
        let s = format!("{}; error={error_type}", self.proxy_status_id);
        HeaderValue::from_str(&s).unwrap_or(HeaderValue::from_static("spillway"))
    }

    /// Whether the request's `Via` already names this proxy: it has come round in a loop.
    pub fn is_loop(&self, headers: &HeaderMap) -> bool {
        headers.get_all(VIA).iter().any(|v| {
            v.to_str().is_ok_and(|v| {
                v.split(',').any(|hop| {
                    // `1.1 name` or `HTTP/1.1 name (comment)`: the second word is the receiver.
                    hop.split_whitespace().nth(1) == Some(&*self.server_id)
                })
            })
        })
    }

    /// Stamps `x-served-by` on an upstream response: appends `<id>` as the last entry (after
    /// every line the app sent), or sets `<id>`.
    pub fn stamp_upstream(&self, headers: &mut HeaderMap) {
        append_list(headers, X_SERVED_BY, &self.served_by);
    }
}

/// RFC 8941 item for a server id: a token when it is one, else a quoted string.
fn sf_item(id: &str) -> String {
    let mut chars = id.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '*');
    let rest_ok = id
        .chars()
        .skip(1)
        .all(|c| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~:/".contains(c));
    if first_ok && rest_ok {
        id.to_string()
    } else {
        let mut s = String::with_capacity(id.len() + 2);
        s.push('"');
        for c in id.chars() {
            if c == '"' || c == '\\' {
                s.push('\\');
            }
            s.push(c);
        }
        s.push('"');
        s
    }
}

/// Fields a `Connection` header may not make hop-by-hop: the ones spillway routes and frames
/// by, and the ones it relies on end to end. A client naming `Host` there would have the app
/// see another host than the one spillway routed on.
const PROTECTED: [HeaderName; 3] = [HOST, http::header::CONTENT_LENGTH, X_REQUEST_ID];

/// Applies RFC 9112 §3.2's Host rules before the request is routed, so that the app sees
/// exactly the authority spillway routed on: a request in absolute form gets the URI's
/// authority as its `Host` (§3.2.2); more than one `Host`, a `Host` that is not an authority,
/// an HTTP/1.1 request without one, or an HTTP/2 `host` that differs from `:authority` are
/// refused.
pub fn check_host(
    version: Version,
    uri: &http::Uri,
    headers: &mut HeaderMap,
) -> Result<(), crate::error::RequestError> {
    use crate::error::RequestError::Malformed;
    let mut hosts = headers.get_all(HOST).iter();
    let first = hosts.next();
    if hosts.next().is_some() {
        return Err(Malformed);
    }
    if let Some(host) = first {
        let valid = !host.is_empty()
            && !host.as_bytes().contains(&b'@')
            && http::uri::Authority::try_from(host.as_bytes()).is_ok();
        if !valid {
            return Err(Malformed);
        }
    }
    match (version, uri.authority(), first) {
        (Version::HTTP_2, Some(authority), Some(host))
            if !authority
                .as_str()
                .eq_ignore_ascii_case(host.to_str().unwrap_or("")) =>
        {
            return Err(Malformed);
        }
        (Version::HTTP_2, _, _) => {}
        (_, Some(authority), _) => {
            // Absolute form: the target's authority is the host (the Host field is ignored).
            let host = HeaderValue::from_str(authority.as_str()).map_err(|_| Malformed)?;
            headers.insert(HOST, host);
        }
        (Version::HTTP_11, None, None) => return Err(Malformed),
        _ => {}
    }
    Ok(())
}

/// Removes hop-by-hop headers (RFC 9110 §7.6.1): `Connection` and every header it names
/// (except the [`PROTECTED`] ones), plus the fixed set. Used in both directions.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most requests and responses carry none of them: one pass over the names (standard names
    // compare by tag) is much cheaper than seven hash lookups.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    // Headers named in Connection are hop-by-hop too. Almost always it only says `keep-alive`
    // or `close`, which name nothing extra to remove: skip those without allocating.
    if headers.contains_key(CONNECTION) {
        let mut named: Vec<HeaderName> = Vec::new();
        for v in headers.get_all(CONNECTION) {
            for token in v.to_str().unwrap_or("").split(',') {
                let token = token.trim();
                if token.is_empty()
                    || token.eq_ignore_ascii_case("close")
                    || token.eq_ignore_ascii_case("keep-alive")
                {
                    continue;
                }
                if let Ok(n) = HeaderName::from_bytes(token.as_bytes()) {
                    if !PROTECTED.contains(&n) {
                        named.push(n);
                    }
                }
            }
        }
        for n in named {
            headers.remove(n);
        }
        headers.remove(CONNECTION);
    }
    for h in [
        KEEP_ALIVE,
        PROXY_CONNECTION,
        TE,
        TRAILER,
        TRANSFER_ENCODING,
        UPGRADE,
    ] {
        headers.remove(h);
    }
}

/// The protocol an HTTP/1.1 request asks to switch to (its `Upgrade` value, e.g. `websocket`),
/// when its `Connection` header lists `upgrade`; `None` otherwise. HTTP/2 has no Upgrade
/// (RFC 9113 §8.6), and without the `Connection` token the `Upgrade` header is just a
/// hop-by-hop header to strip.
pub fn upgrade_request(version: Version, headers: &HeaderMap) -> Option<HeaderValue> {
    if version != Version::HTTP_11 || !lists_token(headers, &CONNECTION, "upgrade") {
        return None;
    }
    let mut lines = headers.get_all(UPGRADE).iter();
    let first = lines.next()?.clone();
    // Several lines are one list (RFC 9110 §5.3): fold them so none is lost.
    let rest: Vec<&HeaderValue> = lines.collect();
    if rest.is_empty() {
        return Some(first);
    }
    let mut b = BytesMut::from(first.as_bytes());
    for more in rest {
        b.put_slice(b", ");
        b.put_slice(more.as_bytes());
    }
    HeaderValue::from_maybe_shared(b.freeze()).ok()
}

/// Puts `Connection: upgrade` and `Upgrade: <protocol>` back after the hop-by-hop strip: an
/// upgrade is negotiated hop by hop, and spillway takes part by asking its own hop for the same
/// protocol (on the request) and confirming it (on the 101 response).
pub fn set_upgrade(headers: &mut HeaderMap, protocol: HeaderValue) {
    headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(UPGRADE, protocol);
}

/// Whether a comma-separated header lists `token` (case-insensitive), on any of its lines.
fn lists_token(headers: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == CONNECTION
        || name == TE
        || name == TRAILER
        || name == TRANSFER_ENCODING
        || name == UPGRADE
        || name == KEEP_ALIVE
        || name == PROXY_CONNECTION
}

/// What the upstream is told about the original request.
pub struct Forwarded<'a> {
    /// The client's IP address, already formatted.
    pub client_ip: &'a HeaderValue,
    /// `http` or `https`.
    pub proto: &'static str,
}

/// What spillway adds to a request it forwards to an HTTP/1.1 upstream, kept beside the
/// client's header map (as a request extension) instead of written into it: the upstream
/// client writes these fields straight into the request head ([`Overlay::write_fields`]),
/// which saves the map insertions, a rehash and the folded values' allocations on every
/// request. The result is field for field what [`Overlay::apply`] makes of the map (a unit
/// test holds the two together). Hop-by-hop fields are stripped from the map before.
#[derive(Debug, Clone)]
pub struct Overlay {
    via: HeaderValue,
    client_ip: HeaderValue,
    proto: &'static str,
    request_id: HeaderValue,
    /// The protocol of an upgrade passed on (`Connection: upgrade` and `Upgrade`).
    upgrade: Option<HeaderValue>,
    /// Whether to promise `TE: trailers` (gRPC).
    te_trailers: bool,
    /// The W3C `traceparent` with spillway's span, replacing the client's.
    traceparent: Option<HeaderValue>,
}

impl Overlay {
    /// The forwarding fields for one request.
    pub fn new(stamps: &Stamps, fwd: &Forwarded<'_>, request_id: &HeaderValue) -> Self {
        Overlay {
            via: stamps.via.clone(),
            client_ip: fwd.client_ip.clone(),
            proto: fwd.proto,
            request_id: request_id.clone(),
            upgrade: None,
            te_trailers: false,
            traceparent: None,
        }
    }

    /// Also sends this `traceparent` (the client's trace, spillway's span).
    pub fn traceparent(mut self, value: HeaderValue) -> Self {
        self.traceparent = Some(value);
        self
    }

    /// Also asks the upstream to switch to `protocol`.
    pub fn upgrade(mut self, protocol: Option<HeaderValue>) -> Self {
        self.upgrade = protocol;
        self
    }

    /// Also sends `TE: trailers`.
    pub fn te_trailers(mut self, yes: bool) -> Self {
        self.te_trailers = yes;
        self
    }

    /// Writes the request's header fields as HTTP/1.1 field lines with the overlay applied:
    /// `Via` and `X-Forwarded-For` folded onto one line each with ours last, the client's
    /// `X-Forwarded-Proto`, `X-Forwarded-Host` and `x-request-id` replaced, `Host` kept, else
    /// taken from the URI's authority, else `default_host` (which, like an HTTP/1.1 upstream's
    /// own name, is not reported as `X-Forwarded-Host`).
    pub fn write_fields(
        &self,
        buf: &mut Vec<u8>,
        headers: &HeaderMap,
        authority: Option<&http::uri::Authority>,
        default_host: &HeaderValue,
    ) {
        let mut host: Option<&HeaderValue> = None;
        let (mut via, mut xff) = (false, false);
        // The list header whose line is still open, waiting for more of its values and ours.
        let mut open: Option<&HeaderName> = None;
        for (name, value) in headers {
            let folded = *name == VIA || *name == X_FORWARDED_FOR;
            if open.is_some_and(|o| o == name) {
                buf.extend_from_slice(b", ");
                buf.extend_from_slice(value.as_bytes());
                continue;
            }
            if let Some(o) = open.take() {
                self.close_list(buf, o);
            }
            if folded {
                if *name == VIA {
                    via = true;
                } else {
                    xff = true;
                }
                open = Some(name);
                field_start(buf, name.as_str().as_bytes());
                buf.extend_from_slice(value.as_bytes());
                continue;
            }
            if *name == X_FORWARDED_PROTO
                || *name == X_FORWARDED_HOST
                || *name == X_REQUEST_ID
                || (*name == TRACEPARENT && self.traceparent.is_some())
            {
                continue;
            }
            if *name == HOST && host.is_none() {
                host = Some(value);
            }
            field(buf, name.as_str().as_bytes(), value.as_bytes());
        }
        if let Some(o) = open {
            self.close_list(buf, o);
        }
        if !via {
            field(buf, b"via", self.via.as_bytes());
        }
        if !xff {
            field(buf, b"x-forwarded-for", self.client_ip.as_bytes());
        }
        field(buf, b"x-forwarded-proto", self.proto.as_bytes());
        let forwarded_host = match host {
            Some(h) => Some(h.as_bytes()),
            None => {
                let from_uri = authority.map(|a| a.as_str().as_bytes());
                field(buf, b"host", from_uri.unwrap_or(default_host.as_bytes()));
                from_uri
            }
        };
        if let Some(h) = forwarded_host {
            field(buf, b"x-forwarded-host", h);
        }
        field(buf, b"x-request-id", self.request_id.as_bytes());
        if let Some(protocol) = &self.upgrade {
            field(buf, b"connection", b"upgrade");
            field(buf, b"upgrade", protocol.as_bytes());
        }
        if self.te_trailers {
            field(buf, b"te", b"trailers");
        }
        if let Some(tp) = &self.traceparent {
            field(buf, b"traceparent", tp.as_bytes());
        }
    }

    /// Ends the open line of list header `name` with our entry.
    fn close_list(&self, buf: &mut Vec<u8>, name: &HeaderName) {
        buf.extend_from_slice(b", ");
        let ours = if *name == VIA {
            &self.via
        } else {
            &self.client_ip
        };
        buf.extend_from_slice(ours.as_bytes());
        buf.extend_from_slice(b"\r\n");
    }

    /// Applies the overlay to the map itself, for upstreams that are not written field by
    /// field (HTTP/2, through hyper's client): `Via` and `X-Forwarded-For` appended (folded
    /// onto one line, ours last), `X-Forwarded-Proto`/`-Host` set, `Host` kept (or filled from
    /// an HTTP/2 `:authority`), `x-request-id` set. Hop-by-hop fields are stripped before.
    pub fn apply(&self, headers: &mut HeaderMap, authority: Option<&http::uri::Authority>) {
        // Room for what is added below, so the map grows (and rehashes) once at most.
        headers.reserve(7);
        append_list(headers, VIA, &self.via);
        append_list(headers, X_FORWARDED_FOR, &self.client_ip);
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(self.proto));
        let host = match headers.get(HOST) {
            Some(h) => Some(h.clone()),
            None => {
                let filled = authority.and_then(|a| HeaderValue::from_str(a.as_str()).ok());
                if let Some(h) = &filled {
                    headers.insert(HOST, h.clone());
                }
                filled
            }
        };
        if let Some(host) = host {
            headers.insert(X_FORWARDED_HOST, host);
        }
        // Always the id the client is told: an unusable client id was replaced by it.
        headers.insert(X_REQUEST_ID, self.request_id.clone());
        if let Some(protocol) = &self.upgrade {
            set_upgrade(headers, protocol.clone());
        }
        if self.te_trailers {
            headers.insert(TE, HeaderValue::from_static("trailers"));
        }
        if let Some(tp) = &self.traceparent {
            headers.insert(TRACEPARENT, tp.clone());
        }
    }
}

fn field_start(buf: &mut Vec<u8>, name: &[u8]) {
    buf.extend_from_slice(name);
    buf.extend_from_slice(b": ");
}

/// Appends `value` as the last entry of a comma-separated list header. Several lines are
/// folded into one first, so the new entry really is last: an app that trusts the right-most
/// `X-Forwarded-For` entry must get ours, not one a client sent on a second line.
fn append_list(headers: &mut HeaderMap, name: HeaderName, value: &HeaderValue) {
    // One hash of the name whether or not the header is there.
    let mut entry = match headers.entry(name) {
        Entry::Vacant(v) => {
            v.insert(value.clone());
            return;
        }
        Entry::Occupied(o) => o,
    };
    let len: usize = entry.iter().map(|line| line.len() + 2).sum::<usize>() + value.len();
    let mut b = BytesMut::with_capacity(len);
    for (i, line) in entry.iter().enumerate() {
        if i > 0 {
            b.put_slice(b", ");
        }
        b.put_slice(line.as_bytes());
    }
    b.put_slice(b", ");
    b.put_slice(value.as_bytes());
    if let Ok(v) = HeaderValue::from_maybe_shared(b.freeze()) {
        entry.insert(v);
    }
}

/// A request id: the client's when it sent a sane one, else a fresh random 128-bit hex id.
pub fn request_id(headers: &HeaderMap) -> HeaderValue {
    if let Some(v) = headers.get(X_REQUEST_ID) {
        if !v.is_empty() && v.len() <= 200 {
            return v.clone();
        }
    }
    new_request_id()
}

/// A fresh request id: 32 hex digits.
pub fn new_request_id() -> HeaderValue {
    // Ids need to be unique, not unpredictable: a small fast generator per thread, seeded from
    // the OS, instead of the cryptographic thread RNG.
    thread_local! {
        static IDS: std::cell::RefCell<SmallRng> = std::cell::RefCell::new(SmallRng::from_os_rng());
    }
    let n: u128 = IDS.with(|r| r.borrow_mut().random());
    let mut hex = [0u8; 32];
    for (pair, byte) in hex.chunks_exact_mut(2).zip(n.to_be_bytes()) {
        pair.copy_from_slice(&HEX_PAIRS[usize::from(byte)]);
    }
    // Owned by the Bytes itself: one allocation, and the three clones each request makes
    // (request, response, access log) only count references.
    HeaderValue::from_maybe_shared(Bytes::from_owner(hex)).expect("hex is a valid header value")
}

/// Every byte as two lowercase hex digits.
static HEX_PAIRS: [[u8; 2]; 256] = {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut table = [[0u8; 2]; 256];
    let mut i = 0;
    while i < 256 {
        table[i] = [DIGITS[i >> 4], DIGITS[i & 0xf]];
        i += 1;
    }
    table
};

#[cfg(test)]
mod tests {
    use super::*;

    fn hv(s: &str) -> HeaderValue {
        HeaderValue::from_str(s).unwrap()
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, hv("keep-alive, X-Secret"));
        h.insert("x-secret", hv("1"));
        h.insert("keep-alive", hv("timeout=5"));
        h.insert("proxy-connection", hv("keep-alive"));
        h.insert(TE, hv("trailers"));
        h.insert(TRAILER, hv("x"));
        h.insert(TRANSFER_ENCODING, hv("chunked"));
        h.insert(UPGRADE, hv("websocket"));
        h.insert("x-keep", hv("yes"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-keep"], "yes");
    }

    #[test]
    fn upgrade_needs_http11_the_connection_token_and_an_upgrade_header() {
        let mut h = HeaderMap::new();
        h.insert(UPGRADE, hv("websocket"));
        assert_eq!(
            upgrade_request(Version::HTTP_11, &h),
            None,
            "no Connection: upgrade"
        );
        h.insert(CONNECTION, hv("keep-alive, Upgrade"));
        assert_eq!(upgrade_request(Version::HTTP_11, &h), Some(hv("websocket")));
        assert_eq!(upgrade_request(Version::HTTP_2, &h), None);
        assert_eq!(upgrade_request(Version::HTTP_10, &h), None);
        h.append(UPGRADE, hv("foo/2"));
        assert_eq!(
            upgrade_request(Version::HTTP_11, &h),
            Some(hv("websocket, foo/2"))
        );
        h.remove(UPGRADE);
        assert_eq!(
            upgrade_request(Version::HTTP_11, &h),
            None,
            "no Upgrade header"
        );

        let mut fwd = HeaderMap::new();
        fwd.insert(CONNECTION, hv("upgrade, x-secret"));
        fwd.insert(UPGRADE, hv("websocket"));
        fwd.insert("x-secret", hv("1"));
        strip_hop_by_hop(&mut fwd);
        set_upgrade(&mut fwd, hv("websocket"));
        assert_eq!(fwd[CONNECTION], "upgrade");
        assert_eq!(fwd[UPGRADE], "websocket");
        assert!(!fwd.contains_key("x-secret"));
    }

    /// The fields `Overlay::write_fields` writes, parsed back into a map.
    fn written(
        overlay: &Overlay,
        h: &HeaderMap,
        authority: Option<&http::uri::Authority>,
    ) -> HeaderMap {
        let mut buf = Vec::new();
        overlay.write_fields(&mut buf, h, authority, &hv("upstream.internal"));
        buf.extend_from_slice(b"\r\n");
        let mut slots = [httparse::EMPTY_HEADER; 64];
        let httparse::Status::Complete((_, fields)) =
            httparse::parse_headers(&buf, &mut slots).unwrap()
        else {
            panic!("incomplete: {}", String::from_utf8_lossy(&buf));
        };
        let mut map = HeaderMap::new();
        for f in fields {
            map.append(
                HeaderName::from_bytes(f.name.as_bytes()).unwrap(),
                HeaderValue::from_bytes(f.value).unwrap(),
            );
        }
        map
    }

    /// Every name's values, in order, sorted by name: what the upstream can tell apart.
    fn fields(map: &HeaderMap) -> Vec<(String, Vec<String>)> {
        let mut out: Vec<(String, Vec<String>)> = map
            .keys()
            .map(|k| {
                let values = map
                    .get_all(k)
                    .iter()
                    .map(|v| v.to_str().unwrap().to_owned())
                    .collect();
                (k.as_str().to_owned(), values)
            })
            .collect();
        out.sort();
        out
    }

    #[test]
    fn overlay_writes_what_the_map_rewrite_makes() {
        let stamps = Stamps::new("edge-1");
        let ip = hv("10.1.2.3");
        let fwd = Forwarded {
            client_ip: &ip,
            proto: "https",
        };
        let plain = Overlay::new(&stamps, &fwd, &hv("id-1"));
        let upgrading = plain
            .clone()
            .upgrade(Some(hv("websocket")))
            .te_trailers(true)
            .traceparent(hv(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-b7ad6b7169203331-01",
            ));
        let authority: http::uri::Authority = "api.example.com:8443".parse().unwrap();
        let mut full = HeaderMap::new();
        full.append(HOST, hv("shop.example.com"));
        full.append("accept", hv("text/html"));
        full.append("accept", hv("*/*"));
        full.append(X_FORWARDED_FOR, hv("192.0.2.1"));
        full.append(X_FORWARDED_FOR, hv("192.0.2.2"));
        full.append(VIA, hv("1.1 lb"));
        full.append(X_FORWARDED_PROTO, hv("http"));
        full.append(X_FORWARDED_HOST, hv("spoofed.example"));
        full.append(X_REQUEST_ID, hv("client-id"));
        full.append("user-agent", hv("curl/8"));
        full.append(
            TRACEPARENT,
            hv("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        full.append("tracestate", hv("vendor=abc"));
        let mut via_only = HeaderMap::new();
        via_only.append(VIA, hv("1.0 old"));
        via_only.append("x-b", hv("2"));
        let cases: [(&str, HeaderMap, Option<&http::uri::Authority>); 4] = [
            ("nothing at all", HeaderMap::new(), None),
            ("every rewritten field present", full, None),
            (
                "HTTP/2 client: authority, no Host",
                via_only.clone(),
                Some(&authority),
            ),
            ("only Via, then another field", via_only, None),
        ];
        for (what, h, authority) in cases {
            for overlay in [&plain, &upgrading] {
                let mut expected = h.clone();
                overlay.apply(&mut expected, authority);
                if !expected.contains_key(HOST) {
                    // The upstream's own name, added by the HTTP/1.1 client.
                    expected.insert(HOST, hv("upstream.internal"));
                }
                let got = written(overlay, &h, authority);
                assert_eq!(fields(&got), fields(&expected), "{what}");
                // Folded lists really are one line each.
                assert!(got.get_all(VIA).iter().count() == 1, "{what}");
                assert!(got.get_all(X_FORWARDED_FOR).iter().count() == 1, "{what}");
            }
        }
    }

    #[test]
    fn request_rewrite_appends_and_sets() {
        let stamps = Stamps::new("edge-1");
        let mut h = HeaderMap::new();
        h.insert(VIA, hv("1.1 lb"));
        h.insert(X_FORWARDED_FOR, hv("10.0.0.1"));
        h.insert(X_FORWARDED_PROTO, hv("https"));
        h.insert(HOST, hv("shop.example.com"));
        let ip = hv("127.0.0.1");
        let id = hv("abc");
        Overlay::new(
            &stamps,
            &Forwarded {
                client_ip: &ip,
                proto: "http",
            },
            &id,
        )
        .apply(&mut h, None);
        assert_eq!(h[VIA], "1.1 lb, 1.1 edge-1");
        assert_eq!(h[X_FORWARDED_FOR], "10.0.0.1, 127.0.0.1");
        assert_eq!(h[X_FORWARDED_PROTO], "http");
        assert_eq!(h[X_FORWARDED_HOST], "shop.example.com");
        assert_eq!(h[X_REQUEST_ID], "abc");
    }

    #[test]
    fn h2_authority_becomes_host() {
        let stamps = Stamps::new("s");
        let mut h = HeaderMap::new();
        let ip = hv("::1");
        let a: http::uri::Authority = "api.example.com:8443".parse().unwrap();
        Overlay::new(
            &stamps,
            &Forwarded {
                client_ip: &ip,
                proto: "https",
            },
            &hv("x"),
        )
        .apply(&mut h, Some(&a));
        assert_eq!(h[HOST], "api.example.com:8443");
        assert_eq!(h[X_FORWARDED_HOST], "api.example.com:8443");
    }

    #[test]
    fn list_headers_on_several_lines_are_folded_with_ours_last() {
        let s = Stamps::new("edge");
        let mut h = HeaderMap::new();
        h.append(X_FORWARDED_FOR, hv("10.0.0.1"));
        h.append(X_FORWARDED_FOR, hv("10.0.0.2"));
        let ip = hv("127.0.0.1");
        Overlay::new(
            &s,
            &Forwarded {
                client_ip: &ip,
                proto: "http",
            },
            &hv("x"),
        )
        .apply(&mut h, None);
        assert_eq!(h.get_all(X_FORWARDED_FOR).iter().count(), 1);
        assert_eq!(h[X_FORWARDED_FOR], "10.0.0.1, 10.0.0.2, 127.0.0.1");
        let mut r = HeaderMap::new();
        r.append(X_SERVED_BY, hv("app-7"));
        r.append(X_SERVED_BY, hv("sidecar"));
        s.stamp_upstream(&mut r);
        assert_eq!(r[X_SERVED_BY], "app-7, sidecar, edge");
    }

    #[test]
    fn served_by_appends_or_sets() {
        let s = Stamps::new("spillway-1");
        let mut h = HeaderMap::new();
        s.stamp_upstream(&mut h);
        assert_eq!(h[X_SERVED_BY], "spillway-1");
        let mut h = HeaderMap::new();
        h.insert(X_SERVED_BY, hv("app-7"));
        s.stamp_upstream(&mut h);
        assert_eq!(h[X_SERVED_BY], "app-7, spillway-1");
    }

    #[test]
    fn loop_detection_reads_every_via_hop() {
        let s = Stamps::new("spillway-1");
        let mut h = HeaderMap::new();
        assert!(!s.is_loop(&h));
        h.append(VIA, hv("1.1 lb, HTTP/1.1 spillway-1 (spillway)"));
        assert!(s.is_loop(&h));
        let mut h = HeaderMap::new();
        h.insert(VIA, hv("1.1 spillway-10"));
        assert!(!s.is_loop(&h));
    }

    #[test]
    fn proxy_status_is_precomputed_for_every_generated_error() {
        let s = Stamps::new("edge");
        for e in crate::error::ProxyError::every_kind() {
            if let Some(t) = e.presentation().proxy_status {
                assert!(s.proxy_statuses.iter().any(|(k, _)| *k == t), "{t}");
                assert_eq!(s.proxy_status(t), format!("edge; error={t}"));
            }
        }
    }

    #[test]
    fn proxy_status_quotes_non_tokens() {
        assert_eq!(
            Stamps::new("spillway-1").proxy_status("dns_error"),
            "spillway-1; error=dns_error"
        );
        assert_eq!(
            Stamps::new("10.0.0.1").proxy_status("x"),
            "\"10.0.0.1\"; error=x"
        );
    }

    #[test]
    fn request_id_kept_or_generated() {
        let mut h = HeaderMap::new();
        let a = request_id(&h);
        let b = request_id(&h);
        assert_eq!(a.len(), 32);
        assert!(a
            .as_bytes()
            .iter()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c)));
        assert_ne!(a, b);
        h.insert(X_REQUEST_ID, hv("client-id"));
        assert_eq!(request_id(&h), "client-id");
    }
}
