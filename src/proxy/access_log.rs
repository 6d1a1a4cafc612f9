//! The access log: one line per request that the config says to log (`access_log`), written
//! straight into the process log's background writer.
//!
//! The line is formatted here, into a reused per-thread buffer, rather than through a
//! `tracing` event: the event path visits every field through dynamic dispatch and formats
//! the timestamp from scratch, which made the access log cost about a third of a small
//! request's instructions. The line keeps the process log's shape (`text`: timestamp, level,
//! target and `key=value` pairs; `json`: one object), so the same parsers read both.
//!
//! Sampling: `sample` is the share of ordinary requests logged; the `always_log` classes
//! (responses spillway generated, 5xx, slow requests) are logged whatever the sample. The
//! `spillway::access` target of `RUST_LOG` still turns it off as before.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderName, HeaderValue};
use rand::rngs::SmallRng;
use rand::{Rng as _, SeedableRng as _};

use crate::config::{AccessLogFormat, AccessLogSettings};
use crate::metrics::ResponseSource;

/// The access log as one config snapshot has it.
#[derive(Debug)]
pub(crate) struct AccessLog {
    settings: AccessLogSettings,
    request_fields: Vec<HeaderName>,
    response_fields: Vec<HeaderName>,
}

/// Where lines go: set once by the binary to its log writer, in its log format.
struct Sink {
    writer: tracing_appender::non_blocking::NonBlocking,
    json: bool,
}

static SINK: OnceLock<Sink> = OnceLock::new();

/// Sends access-log lines to `writer` (the process log's background writer), in JSON when
/// `json` unless the config says otherwise. Without this (the library used on its own, tests)
/// lines are `tracing` events of target `spillway::access`.
pub(crate) fn install(writer: tracing_appender::non_blocking::NonBlocking, json: bool) {
    let _ = SINK.set(Sink { writer, json });
}

/// One line's content.
pub(crate) struct Line<'a> {
    pub(crate) request_id: &'a HeaderValue,
    pub(crate) trace_id: &'a str,
    pub(crate) route: &'a str,
    pub(crate) method: &'a str,
    pub(crate) path: &'a str,
    pub(crate) status: u16,
    pub(crate) source: ResponseSource,
    pub(crate) error: &'a str,
    pub(crate) outcome: &'a str,
    pub(crate) elapsed: Duration,
    /// Values of the configured request fields, in order (absent: empty).
    pub(crate) request_fields: &'a [HeaderValue],
    /// Values of the configured response fields, in order.
    pub(crate) response_fields: &'a [HeaderValue],
}

impl AccessLog {
    /// The access log of a config.
    pub(crate) fn new(settings: &AccessLogSettings) -> Self {
        let names = |list: &[String]| {
            list.iter()
                .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
                .collect()
        };
        AccessLog {
            request_fields: names(&settings.request_fields),
            response_fields: names(&settings.response_fields),
            settings: settings.clone(),
        }
    }

    /// Whether any line may be written (cheap: no line formatted otherwise).
    pub(crate) fn enabled(&self) -> bool {
        self.settings.enabled && tracing::enabled!(target: "spillway::access", tracing::Level::INFO)
    }

    /// The configured request fields' values in `headers` (nothing is kept when none are
    /// configured, which is the common case: no allocation).
    pub(crate) fn request_fields(&self, headers: &HeaderMap) -> Vec<HeaderValue> {
        pick(&self.request_fields, headers)
    }

    /// The configured response fields' values in `headers`.
    pub(crate) fn response_fields(&self, headers: &HeaderMap) -> Vec<HeaderValue> {
        pick(&self.response_fields, headers)
    }

    /// Whether this exchange gets a line: always for the `always_log` classes, else by sample.
    pub(crate) fn wants(&self, status: u16, source: ResponseSource, elapsed: Duration) -> bool {
        let s = &self.settings;
        if (s.always_proxy_errors && source == ResponseSource::Proxy)
            || (s.always_5xx && status >= 500)
            || s.always_slower_than.is_some_and(|t| elapsed >= t)
        {
            return true;
        }
        sampled(s.sample)
    }

    /// Writes one line.
    pub(crate) fn write(&self, line: &Line<'_>) {
        let sink = SINK.get();
        let json = match self.settings.format {
            Some(f) => f == AccessLogFormat::Json,
            None => sink.is_some_and(|s| s.json),
        };
        BUF.with(|buf| {
            let mut buf = buf.borrow_mut();
            buf.clear();
            if json {
                self.format_json(&mut buf, line);
            } else {
                self.format_text(&mut buf, line);
            }
            match sink {
                Some(sink) => {
                    buf.push('\n');
                    let _ = sink.writer.clone().write_all(buf.as_bytes());
                }
                None => tracing::info!(target: "spillway::access", "{}", buf.as_str()),
            }
        });
    }

    /// `2026-12-04T15:04:05.123456Z  INFO spillway::access: request_id="…" … duration_ms=1.857`
    fn format_text(&self, out: &mut String, l: &Line<'_>) {
        timestamp(out);
        out.push_str("  INFO spillway::access: ");
        let text = |out: &mut String, key: &str, value: &str| {
            out.push_str(key);
            out.push_str("=\"");
            escape(out, value);
            out.push_str("\" ");
        };
        text(out, "request_id", l.request_id.to_str().unwrap_or("-"));
        text(out, "trace_id", l.trace_id);
        text(out, "route", l.route);
        text(out, "method", l.method);
        text(out, "path", l.path);
        let _ = write!(out, "status={} ", l.status);
        text(out, "source", l.source.label());
        text(out, "error", l.error);
        text(out, "outcome", l.outcome);
        duration_ms(out, "duration_ms=", l.elapsed);
        self.extra(out, l, |out, key, value| {
            out.push(' ');
            out.push_str(key);
            out.push_str("=\"");
            escape(out, value);
            out.push('"');
        });
    }

    /// `{"timestamp":"…","level":"INFO","target":"spillway::access","request_id":"…",…}`
    fn format_json(&self, out: &mut String, l: &Line<'_>) {
        out.push_str("{\"timestamp\":\"");
        timestamp(out);
        out.push_str("\",\"level\":\"INFO\",\"target\":\"spillway::access\"");
        let text = |out: &mut String, key: &str, value: &str| {
            out.push_str(",\"");
            out.push_str(key);
            out.push_str("\":\"");
            escape(out, value);
            out.push('"');
        };
        text(out, "request_id", l.request_id.to_str().unwrap_or("-"));
        text(out, "trace_id", l.trace_id);
        text(out, "route", l.route);
        text(out, "method", l.method);
        text(out, "path", l.path);
        let _ = write!(out, ",\"status\":{}", l.status);
        text(out, "source", l.source.label());
        text(out, "error", l.error);
        text(out, "outcome", l.outcome);
        duration_ms(out, ",\"duration_ms\":", l.elapsed);
        self.extra(out, l, text);
        out.push('}');
    }

    /// The configured header fields: `req_<name>` and `resp_<name>` (dashes as underscores).
    fn extra(&self, out: &mut String, l: &Line<'_>, mut put: impl FnMut(&mut String, &str, &str)) {
        let mut key = String::new();
        let groups = [
            ("req_", &self.request_fields, l.request_fields),
            ("resp_", &self.response_fields, l.response_fields),
        ];
        for (prefix, names, values) in groups {
            for (name, value) in names.iter().zip(values) {
                key.clear();
                key.push_str(prefix);
                key.extend(
                    name.as_str()
                        .chars()
                        .map(|c| if c == '-' { '_' } else { c }),
                );
                put(out, &key, value.to_str().unwrap_or("-"));
            }
        }
    }
}

thread_local! {
    /// The line being formatted: reused, so a logged request allocates nothing for it.
    static BUF: RefCell<String> = RefCell::new(String::with_capacity(512));
    /// The second whose `YYYY-MM-DDTHH:MM:SS` is cached, and that text.
    static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    /// For sampling.
    static DICE: RefCell<SmallRng> = RefCell::new(SmallRng::from_os_rng());
}

/// Values of `names` in `headers`, absent ones empty (same order, so the line can pair them).
fn pick(names: &[HeaderName], headers: &HeaderMap) -> Vec<HeaderValue> {
    if names.is_empty() {
        return Vec::new();
    }
    names
        .iter()
        .map(|n| {
            headers
                .get(n)
                .cloned()
                .unwrap_or(HeaderValue::from_static(""))
        })
        .collect()
}

fn sampled(share: f64) -> bool {
    if share >= 1.0 {
        return true;
    }
    if share <= 0.0 {
        return false;
    }
    DICE.with(|d| d.borrow_mut().random::<f64>() < share)
}

/// RFC 3339 UTC with microseconds; the part up to the seconds is formatted once a second.
fn timestamp(out: &mut String) {
    let now = SystemTime::now();
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    SECOND.with(|s| {
        let mut s = s.borrow_mut();
        if s.0 != secs {
            let full = humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs))
                .to_string();
            s.1 = full.trim_end_matches('Z').to_owned();
            s.0 = secs;
        }
        out.push_str(&s.1);
    });
    let _ = write!(out, ".{:06}Z", since.subsec_micros());
}

/// Milliseconds with microsecond precision, as `1.857`.
fn duration_ms(out: &mut String, key: &str, d: Duration) {
    let micros = d.as_micros();
    let _ = write!(out, "{key}{}.{:03}", micros / 1000, micros % 1000);
}

/// Escapes a value for a double-quoted string (text and JSON alike): quotes, backslashes and
/// control characters.
fn escape(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> AccessLogSettings {
        AccessLogSettings {
            enabled: true,
            format: None,
            sample: 0.0,
            always_proxy_errors: true,
            always_5xx: true,
            always_slower_than: Some(Duration::from_secs(1)),
            request_fields: vec!["user-agent".into()],
            response_fields: vec!["content-type".into()],
        }
    }

    fn line<'a>(id: &'a HeaderValue, req: &'a [HeaderValue], resp: &'a [HeaderValue]) -> Line<'a> {
        Line {
            request_id: id,
            trace_id: "4bf92f3577b34da6a3ce929d0e0e4736",
            route: "default",
            method: "GET",
            path: "/a\"b",
            status: 200,
            source: ResponseSource::Upstream,
            error: "-",
            outcome: "complete",
            elapsed: Duration::from_micros(1857),
            request_fields: req,
            response_fields: resp,
        }
    }

    #[test]
    fn the_always_classes_are_logged_whatever_the_sample() {
        let log = AccessLog::new(&settings());
        let ms = Duration::from_millis;
        assert!(!log.wants(200, ResponseSource::Upstream, ms(5)), "sample 0");
        assert!(log.wants(404, ResponseSource::Proxy, ms(5)), "generated");
        assert!(log.wants(503, ResponseSource::Upstream, ms(5)), "5xx");
        assert!(log.wants(200, ResponseSource::Upstream, ms(1000)), "slow");
        let mut all = settings();
        all.sample = 1.0;
        assert!(AccessLog::new(&all).wants(200, ResponseSource::Upstream, ms(5)));
    }

    #[test]
    fn a_sample_logs_about_its_share() {
        let hits = (0..20_000).filter(|_| sampled(0.25)).count();
        assert!((4_000..6_000).contains(&hits), "{hits}");
    }

    #[test]
    fn lines_in_both_formats() {
        let log = AccessLog::new(&settings());
        let id = HeaderValue::from_static("id-1");
        let req = [HeaderValue::from_static("curl/8 \"x\"")];
        let resp = [HeaderValue::from_static("text/plain")];
        let mut text = String::new();
        log.format_text(&mut text, &line(&id, &req, &resp));
        let (ts, rest) = text.split_once("  ").unwrap();
        assert!(humantime::parse_rfc3339(ts).is_ok(), "{ts}");
        assert_eq!(
            rest,
            "INFO spillway::access: request_id=\"id-1\" trace_id=\"4bf92f3577b34da6a3ce929d0e0e4736\" route=\"default\" method=\"GET\" path=\"/a\\\"b\" status=200 source=\"upstream\" error=\"-\" outcome=\"complete\" duration_ms=1.857 req_user_agent=\"curl/8 \\\"x\\\"\" resp_content_type=\"text/plain\""
        );
        let mut json = String::new();
        log.format_json(&mut json, &line(&id, &req, &resp));
        let v: serde_json::Value = serde_json::from_str(&json).expect("valid JSON");
        assert_eq!(v["target"], "spillway::access");
        assert_eq!(v["path"], "/a\"b");
        assert_eq!(v["status"], 200);
        assert_eq!(v["duration_ms"], 1.857);
        assert_eq!(v["req_user_agent"], "curl/8 \"x\"");
        assert_eq!(v["resp_content_type"], "text/plain");
        assert!(humantime::parse_rfc3339(v["timestamp"].as_str().unwrap()).is_ok());
    }
}
