//! Route matching: first match in file order wins.

use http::Method;

use crate::config::matching::path_within;
use crate::config::{HostMatch, MatchSettings};

/// A compiled route matcher.
#[derive(Debug, Clone)]
pub struct Matcher {
    /// Path prefix without a trailing slash ("" for `/`), so the boundary check is one compare.
    prefix: Box<str>,
    host: Option<HostMatch>,
    methods: Box<[Method]>,
}

impl Matcher {
    /// Compiles validated match settings.
    pub fn new(m: &MatchSettings) -> Self {
        Matcher {
            prefix: m.prefix().into(),
            host: m.host.clone(),
            methods: m
                .methods
                .iter()
                .filter_map(|s| Method::from_bytes(s.as_bytes()).ok())
                .collect(),
        }
    }

    /// Whether a request with this host (lower-case, no port), path and method matches.
    pub fn matches(&self, host: Option<&str>, path: &str, method: &Method) -> bool {
        self.path_matches(path) && self.host_matches(host) && self.method_matches(method)
    }

    fn path_matches(&self, path: &str) -> bool {
        path_within(&self.prefix, path)
    }

    fn host_matches(&self, host: Option<&str>) -> bool {
        match (&self.host, host) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(pattern), Some(h)) => pattern.matches(h),
        }
    }

    fn method_matches(&self, method: &Method) -> bool {
        self.methods.is_empty() || self.methods.contains(method)
    }
}

/// The request's host for matching: the `Host` header (HTTP/1) or the URI authority (HTTP/2),
/// without the port. IPv6 literals keep their brackets.
pub fn request_host<'a>(uri: &'a http::Uri, headers: &'a http::HeaderMap) -> Option<&'a str> {
    let raw = match headers
        .get(http::header::HOST)
        .and_then(|v| v.to_str().ok())
    {
        Some(h) => h,
        None => uri.authority()?.as_str(),
    };
    Some(strip_port(raw))
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return match host.find(']') {
            Some(end) => &host[..=end],
            None => host,
        };
    }
    match host.rfind(':') {
        Some(i) => &host[..i],
        None => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(prefix: &str, host: Option<HostMatch>, methods: &[&str]) -> Matcher {
        Matcher::new(&MatchSettings {
            path_prefix: prefix.into(),
            host,
            methods: methods.iter().map(|s| s.to_string()).collect(),
        })
    }

    #[test]
    fn prefix_matches_on_segment_boundaries() {
        let api = m("/api", None, &[]);
        assert!(api.matches(None, "/api", &Method::GET));
        assert!(api.matches(None, "/api/", &Method::GET));
        assert!(api.matches(None, "/api/v1/x", &Method::GET));
        assert!(!api.matches(None, "/apix", &Method::GET));
        assert!(!api.matches(None, "/", &Method::GET));
        let slash = m("/api/", None, &[]);
        assert!(slash.matches(None, "/api", &Method::GET));
        assert!(!slash.matches(None, "/apix", &Method::GET));
        let root = m("/", None, &[]);
        assert!(root.matches(None, "/", &Method::GET));
        assert!(root.matches(None, "/anything", &Method::GET));
    }

    #[test]
    fn host_exact_and_wildcard_case_insensitive() {
        let exact = m("/", Some(HostMatch::Exact("shop.example.com".into())), &[]);
        assert!(exact.matches(Some("Shop.Example.COM"), "/", &Method::GET));
        assert!(!exact.matches(Some("example.com"), "/", &Method::GET));
        assert!(!exact.matches(None, "/", &Method::GET));
        let wild = m("/", Some(HostMatch::Suffix(".example.com".into())), &[]);
        assert!(wild.matches(Some("a.example.com"), "/", &Method::GET));
        assert!(wild.matches(Some("A.B.EXAMPLE.com"), "/", &Method::GET));
        assert!(!wild.matches(Some("example.com"), "/", &Method::GET));
        assert!(!wild.matches(Some("badexample.com"), "/", &Method::GET));
    }

    #[test]
    fn methods_restrict() {
        let r = m("/", None, &["GET", "POST"]);
        assert!(r.matches(None, "/", &Method::POST));
        assert!(!r.matches(None, "/", &Method::DELETE));
    }

    #[test]
    fn host_header_port_is_ignored() {
        let mut h = http::HeaderMap::new();
        h.insert(http::header::HOST, "shop.example.com:8080".parse().unwrap());
        let uri: http::Uri = "/x".parse().unwrap();
        assert_eq!(request_host(&uri, &h), Some("shop.example.com"));
        h.insert(http::header::HOST, "[::1]:8080".parse().unwrap());
        assert_eq!(request_host(&uri, &h), Some("[::1]"));
        let uri: http::Uri = "https://h2.example.com:443/x".parse().unwrap();
        assert_eq!(
            request_host(&uri, &http::HeaderMap::new()),
            Some("h2.example.com")
        );
    }
}
