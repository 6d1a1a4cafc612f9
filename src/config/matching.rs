//! The route-matching rules, in one place: the proxy's compiled matcher
//! ([`crate::proxy::route::Matcher`]) applies them to requests, and the config's shadowing check
//! compares routes with them, so the two can never disagree about what a route takes.

use super::settings::{HostMatch, MatchSettings};

/// Whether `path` lies within `prefix` on a segment boundary: `/api` takes `/api` and
/// `/api/...`, never `/apix`. `prefix` is written without a trailing `/` (see
/// [`MatchSettings::prefix`]); the empty prefix takes every path.
pub(crate) fn path_within(prefix: &str, path: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => prefix.is_empty() || rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

impl MatchSettings {
    /// The path prefix as it is matched: without trailing `/`, so `/api/` and `/api` take the
    /// same requests, and `/` is the empty prefix that takes all.
    pub fn prefix(&self) -> &str {
        self.path_prefix.trim_end_matches('/')
    }

    /// Whether every request `other` takes is also taken by this matcher (so a route with
    /// `other` after one with `self` can never match).
    pub fn covers(&self, other: &MatchSettings) -> bool {
        let host = match (&self.host, &other.host) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(a), Some(b)) => a.covers(b),
        };
        let methods = self.methods.is_empty()
            || (!other.methods.is_empty()
                && other.methods.iter().all(|m| self.methods.contains(m)));
        path_within(self.prefix(), other.prefix()) && host && methods
    }
}

impl HostMatch {
    /// Whether a request's host (without port) matches, ignoring ASCII case.
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostMatch::Exact(want) => want.eq_ignore_ascii_case(host),
            HostMatch::Suffix(suffix) => {
                host.len() > suffix.len()
                    && host.as_bytes()[host.len() - suffix.len()..]
                        .eq_ignore_ascii_case(suffix.as_bytes())
            }
        }
    }

    /// Whether every host `other` matches is matched by this pattern too.
    pub fn covers(&self, other: &HostMatch) -> bool {
        match (self, other) {
            (HostMatch::Exact(a), HostMatch::Exact(b)) => a == b,
            (HostMatch::Exact(_), HostMatch::Suffix(_)) => false,
            (HostMatch::Suffix(_), HostMatch::Exact(h)) => self.matches(h),
            (HostMatch::Suffix(s), HostMatch::Suffix(t)) => t.ends_with(s.as_str()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(prefix: &str, host: Option<&str>, methods: &[&str]) -> MatchSettings {
        MatchSettings {
            path_prefix: prefix.into(),
            host: host.map(|h| match h.strip_prefix('*') {
                Some(suffix) => HostMatch::Suffix(suffix.into()),
                None => HostMatch::Exact(h.into()),
            }),
            methods: methods.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn paths_match_on_segment_boundaries() {
        assert!(path_within("/api", "/api"));
        assert!(path_within("/api", "/api/v2"));
        assert!(!path_within("/api", "/apix"));
        assert!(!path_within("/api", "/"));
        assert!(path_within("", "/anything"));
        assert!(path_within("", "*"));
    }

    #[test]
    fn a_trailing_slash_changes_nothing_for_matching_or_shadowing() {
        assert_eq!(m("/api/", None, &[]).prefix(), "/api");
        assert_eq!(m("/", None, &[]).prefix(), "");
        // The runtime matcher takes `/api` for a `/api/` route, so `/api` after it is shadowed.
        assert!(m("/api/", None, &[]).covers(&m("/api", None, &[])));
        assert!(m("/api", None, &[]).covers(&m("/api/v2/", None, &[])));
        assert!(!m("/api", None, &[]).covers(&m("/apix", None, &[])));
        assert!(!m("/api/v2", None, &[]).covers(&m("/api", None, &[])));
        assert!(m("/", None, &[]).covers(&m("/anything", None, &[])));
    }

    #[test]
    fn host_and_method_coverage() {
        let any = m("/", None, &[]);
        let shop = m("/", Some("shop.example.com"), &[]);
        let wild = m("/", Some("*.example.com"), &[]);
        let deeper = m("/", Some("*.eu.example.com"), &[]);
        assert!(any.covers(&shop) && !shop.covers(&any));
        assert!(wild.covers(&shop) && !shop.covers(&wild));
        assert!(wild.covers(&deeper) && !deeper.covers(&wild));
        assert!(!wild.covers(&m("/", Some("example.com"), &[])));
        assert!(!shop.covers(&m("/", Some("other.example.com"), &[])));
        assert!(HostMatch::Suffix(".example.com".into()).matches("A.Example.COM"));
        let get = m("/", None, &["GET"]);
        let get_post = m("/", None, &["GET", "POST"]);
        assert!(get_post.covers(&get) && !get.covers(&get_post) && !get.covers(&any));
    }
}
