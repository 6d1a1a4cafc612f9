//! The one-screen text `spillway check` prints for a valid config: what will listen where,
//! which route takes which request in what order, and what each route does differently from
//! the built-in defaults.

use std::fmt::Write;
use std::time::Duration;

use super::settings::*;
use super::{defaults, Loaded};

/// Renders a validated config for a human: server id, version, listeners, admin, routes in
/// match order (with their policies where they differ from the built-in defaults), upstreams,
/// then warnings.
pub fn summary(loaded: &Loaded) -> String {
    let s = &loaded.settings;
    let mut out = String::new();
    // Writing to a String cannot fail, so the results are ignored throughout.
    let _ = writeln!(out, "server_id  {}", s.server_id);
    let _ = writeln!(out, "version    {}", loaded.version);
    let mut admin = s.admin.map_or_else(|| "off".to_owned(), |a| a.to_string());
    if let Some(file) = &s.admin_token_file {
        let _ = write!(admin, " (token from {})", file.display());
    }
    if let Some(metrics) = s.admin_metrics {
        let _ = write!(admin, ", metrics and probes on {metrics}");
    }
    let _ = writeln!(out, "admin      {admin}");

    let _ = writeln!(out, "\nlisteners");
    let name_w = s.listeners.iter().map(|l| l.name.len()).max().unwrap_or(0);
    let addr_w = s
        .listeners
        .iter()
        .map(|l| l.address.to_string().len())
        .max()
        .unwrap_or(0);
    for l in &s.listeners {
        let tls = match &l.tls {
            Some(t) => format!("tls: yes ({})", t.alpn.join(", ")),
            None => "tls: no".to_owned(),
        };
        let addr = l.address.to_string();
        let _ = writeln!(out, "  {:name_w$}  {addr:addr_w$}  {tls}", l.name);
    }

    let _ = writeln!(out, "\nroutes (first match wins)");
    let rows: Vec<[String; 3]> = s
        .routes
        .iter()
        .enumerate()
        .map(|(i, r)| {
            [
                format!("[{i}] {}", r.name),
                matcher(&r.matcher),
                r.upstream.clone(),
            ]
        })
        .collect();
    let w0 = rows.iter().map(|r| r[0].len()).max().unwrap_or(0);
    let w1 = rows.iter().map(|r| r[1].len()).max().unwrap_or(0);
    let w2 = rows.iter().map(|r| r[2].len()).max().unwrap_or(0);
    for (row, r) in rows.iter().zip(&s.routes) {
        let _ = writeln!(
            out,
            "  {:w0$}  {:w1$}  -> {:w2$}  timeout {}",
            row[0],
            row[1],
            row[2],
            dur(r.policy.timeout)
        );
        for line in policy_lines(&r.policy) {
            let _ = writeln!(out, "      {line}");
        }
    }

    let _ = writeln!(out, "\nupstreams");
    let uw = s.upstreams.keys().map(String::len).max().unwrap_or(0);
    for (name, u) in &s.upstreams {
        let protocol = match u.protocol {
            UpstreamProtocol::Http1 => "http1",
            UpstreamProtocol::Http2 => "http2",
        };
        let tls = match &u.tls {
            Some(t) => match &t.server_name {
                Some(sni) => format!(", tls ({sni})"),
                None => ", tls".to_owned(),
            },
            None => String::new(),
        };
        let _ = writeln!(
            out,
            "  {name:uw$}  {}  {protocol}{tls}  connect {}, idle {}",
            u.endpoints.join(", "),
            dur(u.connect_timeout),
            dur(u.idle_timeout)
        );
    }

    let _ = writeln!(
        out,
        "\nshutdown   drain_delay {}, drain_timeout {}",
        dur(s.shutdown.drain_delay),
        dur(s.shutdown.drain_timeout)
    );

    if !loaded.warnings.is_empty() {
        let _ = writeln!(out, "\nwarnings");
        for w in &loaded.warnings {
            let _ = writeln!(out, "  - {w}");
        }
    }
    out
}

/// `host path_prefix methods`, with `*` for "any".
fn matcher(m: &MatchSettings) -> String {
    let host = match &m.host {
        None => "*".to_owned(),
        Some(HostMatch::Exact(h)) => h.clone(),
        Some(HostMatch::Suffix(s)) => format!("*{s}"),
    };
    let methods = if m.methods.is_empty() {
        "*".to_owned()
    } else {
        m.methods.join(",")
    };
    format!("{host} {} {methods}", m.path_prefix)
}

/// One line per policy block that differs from the built-in defaults, so a plain route shows
/// nothing but its timeout.
fn policy_lines(p: &PolicySettings) -> Vec<String> {
    let d = defaults::policy();
    let mut lines = Vec::new();
    if p.retry_after != d.retry_after {
        lines.push(format!("retry_after {}", dur(p.retry_after)));
    }
    if p.concurrency != d.concurrency {
        let c = &p.concurrency;
        let limit = match c.limit {
            LimitSettings::Fixed(n) => format!("max {n}"),
            LimitSettings::Adaptive { min, max } => format!("adaptive {min}..{max}"),
        };
        let mut line = format!(
            "concurrency {limit}, queue {} (wait up to {}",
            c.queue,
            dur(c.queue_timeout)
        );
        if c.queue > 0 {
            let _ = write!(
                line,
                "; standing above {} over {}",
                dur(c.queue_target),
                dur(c.queue_interval)
            );
        }
        line.push(')');
        if c.shares != d.concurrency.shares {
            let _ = write!(
                line,
                ", sheddable up to {} and normal up to {} of the limit",
                percent(c.shares.sheddable),
                percent(c.shares.normal)
            );
        }
        lines.push(line);
    }
    if p.priority != d.priority || p.priority_header.is_some() {
        let mut line = format!("priority {}", p.priority.label());
        if let Some(h) = &p.priority_header {
            let _ = write!(line, " (or the request's `{h}` header)");
        }
        lines.push(line);
    }
    if p.circuit_breaker != d.circuit_breaker {
        let b = &p.circuit_breaker;
        let codes: Vec<String> = b.failure_codes.iter().map(u16::to_string).collect();
        lines.push(format!(
            "circuit breaker {}: opens at {} failures ({}) of >= {} requests in {}, open {}, {} probes",
            if b.enabled { "on" } else { "off" },
            percent(b.failure_ratio),
            codes.join(","),
            b.min_requests,
            dur(b.window),
            dur(b.open_for),
            b.half_open_requests
        ));
    }
    // Maintenance's retry_after defaults to the route's own, not to a constant.
    if p.maintenance.enabled || p.maintenance.retry_after != p.retry_after {
        lines.push(format!(
            "maintenance {} (retry_after {})",
            if p.maintenance.enabled {
                "ON: every request gets 503"
            } else {
                "off"
            },
            dur(p.maintenance.retry_after)
        ));
    }
    if p.retries != d.retries {
        let r = &p.retries;
        lines.push(format!(
            "retries {} (backoff {}, budget {} + {}/s)",
            r.attempts,
            dur(r.backoff),
            percent(r.budget),
            r.min_per_second
        ));
    }
    lines
}

/// `0.5` -> `50%`, `0.333` -> `33.3%`: one decimal at most, so float noise never shows.
fn percent(ratio: f64) -> String {
    let s = format!("{:.1}", ratio * 100.0);
    format!("{}%", s.strip_suffix(".0").unwrap_or(&s))
}

fn dur(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::build::load_str_with_env;

    #[test]
    fn summary_lists_everything_in_order() {
        let text = "\
server_id: edge-1
listeners:
  - { name: http, address: 127.0.0.1:8080 }
  - name: https
    address: 0.0.0.0:8443
    tls: { cert_file: c.pem, key_file: k.pem }
upstreams:
  app: { endpoints: [\"127.0.0.1:3000\", \"127.0.0.1:3001\"], protocol: http2 }
  old: { endpoints: [\"127.0.0.1:4000\"] }
routes:
  - name: api
    match: { path_prefix: /api, host: \"*.example.com\", methods: [get] }
    upstream: app
    timeout: 2s
    concurrency: { adaptive: { min: 4, max: 256 }, queue: 64 }
    retries: { attempts: 2 }
  - name: all
    upstream: app
    maintenance: { enabled: true }
";
        let loaded = load_str_with_env(text, |_| None).unwrap();
        let s = summary(&loaded);
        let expected = format!(
            "\
server_id  edge-1
version    {}
admin      127.0.0.1:9901

listeners
  http   127.0.0.1:8080  tls: no
  https  0.0.0.0:8443    tls: yes (h2, http/1.1)

routes (first match wins)
  [0] api  *.example.com /api GET  -> app  timeout 2s
      concurrency adaptive 4..256, queue 64 (wait up to 100ms; standing above 5ms over 100ms)
      retries 2 (backoff 25ms, budget 20% + 1/s)
  [1] all  * / *                   -> app  timeout 30s
      maintenance ON: every request gets 503 (retry_after 5s)

upstreams
  app  127.0.0.1:3000, 127.0.0.1:3001  http2  connect 1s, idle 4s
  old  127.0.0.1:4000  http1  connect 1s, idle 4s

shutdown   drain_delay 5s, drain_timeout 30s

warnings
  - upstream `old` is not used by any route
",
            loaded.version
        );
        assert_eq!(s, expected, "\n{s}");
    }

    #[test]
    fn percentages_hide_float_noise() {
        assert_eq!(percent(0.3), "30%");
        assert_eq!(percent(0.2), "20%");
        assert_eq!(percent(1.0 / 3.0), "33.3%");
        assert_eq!(percent(0.0), "0%");
    }
}
