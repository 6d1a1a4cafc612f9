//! A request's class under overload ([`Priority`]): decided once, where the service builds the
//! upstream request, from the route's `priority` and, when the route names one, the request's
//! priority header; carried to the policies in the request's extensions.
//!
//! The limiter admits each class up to its share of the limit and serves its queue by class;
//! every policy that refuses a request puts its class into the error, for the `priority` label
//! of `spillway_shed_total`.

use http::{HeaderMap, HeaderName, Request};

use crate::config::{PolicySettings, Priority};

/// Decides the class of a route's requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Classifier {
    default: Priority,
    header: Option<HeaderName>,
}

impl Classifier {
    /// The route's default class, and its priority header if it names one.
    pub fn new(policy: &PolicySettings) -> Self {
        Classifier {
            default: policy.priority,
            // Validated when the config was loaded; an unusable name reads no header.
            header: policy
                .priority_header
                .as_deref()
                .and_then(|h| HeaderName::from_bytes(h.as_bytes()).ok()),
        }
    }

    /// The class of a request with these headers: the priority header's value when it names a
    /// class (in any case), else the route's default. The header stays on the request.
    pub fn classify(&self, headers: &HeaderMap) -> Priority {
        self.header
            .as_ref()
            .and_then(|name| headers.get(name))
            .and_then(|v| Priority::parse(v.as_bytes().trim_ascii()))
            .unwrap_or(self.default)
    }
}

/// The class a request was given ([`Classifier::classify`], put in its extensions); `normal`
/// for a request that was not classified.
pub(crate) fn of<B>(req: &Request<B>) -> Priority {
    req.extensions()
        .get::<Priority>()
        .copied()
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::defaults;

    fn classifier(default: Priority, header: Option<&str>) -> Classifier {
        let mut policy = defaults::policy();
        policy.priority = default;
        policy.priority_header = header.map(str::to_owned);
        Classifier::new(&policy)
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn without_a_priority_header_every_request_gets_the_route_default() {
        let c = classifier(Priority::Sheddable, None);
        assert_eq!(c.classify(&headers(&[])), Priority::Sheddable);
        // A client cannot promote itself when the route names no header.
        assert_eq!(
            c.classify(&headers(&[("x-priority", "critical")])),
            Priority::Sheddable
        );
        assert_eq!(
            classifier(Priority::Normal, None).classify(&headers(&[])),
            Priority::Normal
        );
    }

    #[test]
    fn the_priority_header_names_a_class_in_any_case_else_the_default_holds() {
        let c = classifier(Priority::Normal, Some("x-priority"));
        let class = |v: &str| c.classify(&headers(&[("X-Priority", v)]));
        assert_eq!(class("critical"), Priority::Critical);
        assert_eq!(class("CRITICAL"), Priority::Critical);
        assert_eq!(class(" Sheddable "), Priority::Sheddable);
        assert_eq!(class("normal"), Priority::Normal);
        for other in ["", "high", "critical,sheddable", "0"] {
            assert_eq!(class(other), Priority::Normal, "{other:?}");
        }
        assert_eq!(c.classify(&headers(&[])), Priority::Normal);
        // Another header's value does not count.
        assert_eq!(
            c.classify(&headers(&[("x-class", "critical")])),
            Priority::Normal
        );
    }

    #[test]
    fn an_unclassified_request_is_normal() {
        let mut req = Request::new(());
        assert_eq!(of(&req), Priority::Normal);
        req.extensions_mut().insert(Priority::Critical);
        assert_eq!(of(&req), Priority::Critical);
    }
}
