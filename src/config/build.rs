//! From config text to validated [`Settings`]: expand the environment, parse, then check and
//! convert every field, collecting every mistake rather than stopping at the first, each with
//! its field path and its line and column in the file as written.
//!
//! Policy merging: a route's policy overrides `defaults` field by field, inside nested blocks
//! too, and the built-in [`defaults`] fill whatever neither sets. Within `concurrency`, `max` and
//! `adaptive` are one choice, the limit: whichever the route gives replaces whichever `defaults`
//! gives, except that two `adaptive` blocks merge field by field like everything else.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::env::{self, Expanded};
use super::file::{
    AccessLogFile, ConcurrencyFile, FileConfig, LimitsFile, ListenerFile, ListenerTlsFile,
    MatchFile, PolicyFile, RouteFile, ShutdownFile, UpstreamFile, UpstreamTlsFile,
};
use super::locate::{self, Locations, Position};
use super::settings::*;
use super::{defaults, schema, shape, suggest, yaml, ConfigError, ConfigErrors, Loaded};

/// Smallest request head limit accepted: a request line and a few fields.
const MIN_REQUEST_HEAD_BYTES: u32 = 1024;

/// Loads config text, expanding `${VAR}` with `lookup` (tests pass a table instead of touching
/// the process environment).
///
/// Every mistake is reported in one go, in file order: repeated keys, unknown keys and values
/// of the wrong type (the structural pass, [`shape`], driven by the JSON Schema), then every
/// invalid value, reference and range (validation, below). Only a YAML syntax error, or a
/// `${VAR}` that cannot be expanded, stops before the rest is looked at.
pub(crate) fn load_str_with_env(
    text: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<Loaded, ConfigErrors> {
    let expanded = env::expand(text, lookup).map_err(ConfigErrors)?;
    let index = locate::index(&expanded.text);
    let mut cx = Cx {
        index: &index,
        expanded: &expanded,
        errors: Vec::new(),
    };
    // serde_yaml stops at the first repeated key and locates it at the start of its mapping;
    // this names every repeat, where it stands.
    for dup in index.duplicates() {
        let key = dup.path.rsplit('.').next().unwrap_or(&dup.path);
        let first = expanded
            .original_position(dup.first.line, dup.first.column)
            .0;
        let message = format!("duplicate key `{key}` (first given on line {first})");
        cx.error_at(&dup.path, message, Some(dup.at));
    }
    let relocate = |mut e: ConfigError| {
        if let (Some(line), Some(column)) = (e.line, e.column) {
            (e.line, e.column) = located(expanded.original_position(line, column));
        }
        e
    };
    let document = match yaml::parse_document(&expanded.text) {
        Ok(document) => document,
        Err(e) => {
            cx.errors.push(relocate(e));
            return Err(in_file_order(cx.errors));
        }
    };
    let mut shape = shape::check(document, schema::cached(), &index);
    for issue in &shape.issues {
        cx.error_at(&issue.path, issue.message.clone(), issue.at);
    }
    let file: FileConfig = if cx.errors.is_empty() {
        // A sound document: serde reads the text itself, as it always has.
        yaml::parse(&expanded.text).map_err(|e| ConfigErrors(vec![relocate(e)]))?
    } else {
        // Read the repaired document, so that validation can report the mistakes beyond.
        // Should serde still refuse it, the structural errors are what there is to say.
        match serde_json::from_value(std::mem::take(&mut shape.document)) {
            Ok(file) => file,
            Err(_) => return Err(in_file_order(cx.errors)),
        }
    };
    let structural = cx.errors.len();
    let settings = cx.settings(&file);
    let mut errors = cx.errors;
    // A value dropped for its type is then missing or empty: not a second mistake.
    let validation = errors.split_off(structural);
    errors.extend(validation.into_iter().filter(|e| !shape.explains(&e.path)));
    if !errors.is_empty() {
        return Err(in_file_order(errors));
    }
    let warnings = warnings(&settings);
    Ok(Loaded {
        settings,
        version: version(&expanded.text),
        warnings,
    })
}

/// File order reads best; errors without a position (whole-file ones) go last, and errors at
/// the same place keep the order they were found in.
fn in_file_order(mut errors: Vec<ConfigError>) -> ConfigErrors {
    errors.sort_by_key(|e| (e.line.is_none(), e.line, e.column));
    ConfigErrors(errors)
}

/// A known position as `ConfigError` holds it.
fn located((line, column): (usize, usize)) -> (Option<usize>, Option<usize>) {
    (Some(line), Some(column))
}

/// First 12 hex digits of the SHA-256 of the expanded text: changes whenever the effective
/// config text does, including through an environment variable.
fn version(text: &str) -> String {
    Sha256::digest(text.as_bytes())[..6]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Validation state: where fields are, and the errors found so far.
struct Cx<'a> {
    index: &'a Locations,
    expanded: &'a Expanded,
    errors: Vec<ConfigError>,
}

impl Cx<'_> {
    /// Records an error at `path`, located at the field or its nearest present ancestor.
    fn error(&mut self, path: &str, message: impl Into<String>) {
        let at = self.index.nearest(path);
        self.error_at(path, message, at);
    }

    fn error_at(&mut self, path: &str, message: impl Into<String>, at: Option<Position>) {
        let (line, column) = match at {
            Some(p) => located(self.expanded.original_position(p.line, p.column)),
            None => (None, None),
        };
        self.errors
            .push(ConfigError::new(path, message).at(line, column));
    }

    /// Parses an optional duration; `positive` rejects zero where it makes no sense.
    fn duration<T: AsRef<str> + ?Sized>(
        &mut self,
        path: &str,
        value: Option<&T>,
        positive: bool,
    ) -> Option<Duration> {
        let value = value?.as_ref();
        match humantime::parse_duration(value.trim()) {
            Ok(d) if positive && d.is_zero() => {
                self.error(path, "must be greater than zero");
                None
            }
            Ok(d) => Some(d),
            Err(_) => {
                self.error(
                    path,
                    format!(
                        "`{value}` is not a duration: use a number and a unit, e.g. 250ms, 5s, 1m"
                    ),
                );
                None
            }
        }
    }

    /// A required bind address (`ip:port`; port 0 picks a free port).
    fn socket_addr(&mut self, path: &str, value: Option<&String>) -> Option<SocketAddr> {
        let Some(value) = value else {
            self.error(path, "address is required (ip:port, e.g. 0.0.0.0:8080)");
            return None;
        };
        match value.trim().parse() {
            Ok(addr) => Some(addr),
            Err(_) => {
                self.error(path, format!("invalid address `{value}`: expected ip:port, e.g. 127.0.0.1:8080 or [::]:8080"));
                None
            }
        }
    }

    /// Checks a name used as a metric label or reference; false when it is unusable.
    fn name(&mut self, path: &str, value: &str) -> bool {
        if value.is_empty() {
            self.error(path, "name must not be empty");
            return false;
        }
        if !value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        {
            self.error(
                path,
                format!("name `{value}` may only contain letters, digits, `_`, `.` and `-`"),
            );
            return false;
        }
        true
    }

    /// A file path that must not be empty.
    fn file_path(&mut self, path: &str, value: Option<&String>) -> Option<PathBuf> {
        let value = value?;
        if value.trim().is_empty() {
            self.error(path, "file path must not be empty");
            return None;
        }
        Some(PathBuf::from(value))
    }

    fn settings(&mut self, file: &FileConfig) -> Settings {
        let server_id = self.server_id(file.server_id.as_deref());
        let (listeners, mut bound) = self.listeners(&file.listeners);
        let admin = match file.admin.as_ref().and_then(|a| a.address.as_ref()) {
            Some(addr) => self.socket_addr("admin.address", Some(addr)),
            None => Some(defaults::ADMIN_ADDRESS),
        };
        if let Some(admin) = admin {
            bound.push(("admin.address".to_owned(), admin));
        }
        let admin_file = file.admin.clone().unwrap_or_default();
        let admin_metrics = admin_file
            .metrics_address
            .as_ref()
            .and_then(|addr| self.socket_addr("admin.metrics_address", Some(addr)));
        if let Some(metrics) = admin_metrics {
            bound.push(("admin.metrics_address".to_owned(), metrics));
        }
        let admin_token_file = self.file_path("admin.token_file", admin_file.token_file.as_ref());
        self.distinct_addresses(bound);
        let upstreams = self.upstreams(&file.upstreams);
        let defaults_part = self.policy_part("defaults", &file.defaults);
        // The defaults block is checked as a whole once here, so that a mistake in it is
        // reported at `defaults` rather than once per route that inherits it.
        self.resolve_policy("defaults", &defaults_part, &PolicyPart::default());
        let routes = self.routes(&file.routes, &defaults_part, &upstreams);
        let shutdown = self.shutdown(file.shutdown.as_ref());
        Settings {
            server_id,
            listeners,
            admin,
            admin_metrics,
            admin_token_file,
            upstreams,
            routes,
            shutdown,
            retry_after: defaults_part.retry_after.unwrap_or(defaults::RETRY_AFTER),
            admin_allowed_hosts: file
                .admin
                .as_ref()
                .and_then(|a| a.allowed_hosts.as_ref())
                .map(|hosts| {
                    hosts
                        .iter()
                        .map(|h| h.trim().to_ascii_lowercase())
                        .collect()
                })
                .unwrap_or_default(),
            limits: self.limits(file.limits.as_ref()),
            access_log: self.access_log(file.access_log.as_ref()),
        }
    }

    fn access_log(&mut self, file: Option<&AccessLogFile>) -> AccessLogSettings {
        let file = file.cloned().unwrap_or_default();
        let format = match file.format.as_deref() {
            None => None,
            Some("text") => Some(AccessLogFormat::Text),
            Some("json") => Some(AccessLogFormat::Json),
            Some(other) => {
                self.error(
                    "access_log.format",
                    format!("unknown format `{other}`: expected text or json"),
                );
                None
            }
        };
        let sample = match file.sample {
            Some(s) if !(0.0..=1.0).contains(&s) => {
                self.error(
                    "access_log.sample",
                    format!("must be a share from 0 to 1 (got {s})"),
                );
                defaults::ACCESS_LOG_SAMPLE
            }
            Some(s) => s,
            None => defaults::ACCESS_LOG_SAMPLE,
        };
        let always: Vec<String> = match &file.always_log {
            Some(list) => list.clone(),
            None => defaults::ACCESS_LOG_ALWAYS
                .iter()
                .map(|s| s.to_string())
                .collect(),
        };
        for (i, class) in always.iter().enumerate() {
            if !defaults::ACCESS_LOG_ALWAYS.contains(&class.as_str()) {
                self.error(
                    &format!("access_log.always_log[{i}]"),
                    format!("unknown class `{class}`: expected proxy_errors, 5xx or slow"),
                );
            }
        }
        let slow = self
            .duration(
                "access_log.slow_threshold",
                file.slow_threshold.as_ref(),
                true,
            )
            .unwrap_or(defaults::ACCESS_LOG_SLOW);
        let mut names = |key: &str, list: Option<&Vec<String>>| -> Vec<String> {
            let mut out = Vec::new();
            for (i, n) in list.into_iter().flatten().enumerate() {
                let lower = n.trim().to_ascii_lowercase();
                if http::HeaderName::from_bytes(lower.as_bytes()).is_err() {
                    self.error(
                        &format!("access_log.fields.{key}[{i}]"),
                        format!("`{n}` is not a header name"),
                    );
                } else {
                    out.push(lower);
                }
            }
            out
        };
        let fields = file.fields.unwrap_or_default();
        let request_fields = names("request", fields.request.as_ref());
        let response_fields = names("response", fields.response.as_ref());
        AccessLogSettings {
            enabled: file.enabled.unwrap_or(defaults::ACCESS_LOG_ENABLED),
            format,
            sample,
            always_proxy_errors: always.iter().any(|c| c == "proxy_errors"),
            always_5xx: always.iter().any(|c| c == "5xx"),
            always_slower_than: always.iter().any(|c| c == "slow").then_some(slow),
            request_fields,
            response_fields,
        }
    }

    fn limits(&mut self, file: Option<&LimitsFile>) -> LimitsSettings {
        let file = file.cloned().unwrap_or_default();
        let mut share = |key: &str, value: Option<f64>, default: f64| match value {
            Some(v) if !(v > 0.0 && v <= 1.0) => {
                self.error(
                    &format!("limits.{key}"),
                    format!("must be a share of the limit, above 0 and at most 1 (got {v})"),
                );
                default
            }
            Some(v) => v,
            None => default,
        };
        let soft = share("memory_soft", file.memory_soft, defaults::MEMORY_SOFT);
        let hard = share("memory_hard", file.memory_hard, defaults::MEMORY_HARD);
        if soft >= hard {
            self.error(
                "limits.memory_soft",
                format!("memory_soft ({soft}) must be below memory_hard ({hard})"),
            );
        }
        if file.memory_bytes == Some(0) {
            self.error("limits.memory_bytes", "must be greater than zero");
        }
        LimitsSettings {
            memory_bytes: file.memory_bytes,
            memory_soft: soft,
            memory_hard: hard,
        }
    }

    fn server_id(&mut self, value: Option<&str>) -> String {
        let Some(id) = value else {
            return defaults::SERVER_ID.to_owned();
        };
        // It is written into list-valued headers (`Via`, `Proxy-Status`), where a comma or
        // space would split or corrupt the entry.
        if id.is_empty() || !id.chars().all(|c| c.is_ascii_graphic() && c != ',') {
            self.error(
                "server_id",
                format!(
                    "server_id `{id}` must be non-empty visible ASCII without commas or whitespace"
                ),
            );
        }
        id.to_owned()
    }

    /// The valid listeners, and the path and address of each for [`Cx::distinct_addresses`].
    fn listeners(
        &mut self,
        files: &[ListenerFile],
    ) -> (Vec<ListenerSettings>, Vec<(String, SocketAddr)>) {
        if files.is_empty() {
            self.error("listeners", "at least one listener is required");
        }
        let mut seen: HashMap<String, usize> = HashMap::new();
        let mut out = Vec::new();
        let mut bound = Vec::new();
        for (i, l) in files.iter().enumerate() {
            let base = format!("listeners[{i}]");
            let name = match &l.name {
                Some(name) => {
                    if self.name(&format!("{base}.name"), name) {
                        if let Some(first) = seen.insert(name.clone(), i) {
                            self.error(
                                &format!("{base}.name"),
                                format!(
                                    "duplicate listener name `{name}` (also listeners[{first}])"
                                ),
                            );
                        }
                    }
                    name.clone()
                }
                None if files.len() == 1 => defaults::LISTENER_NAME.to_owned(),
                None => {
                    self.error(
                        &format!("{base}.name"),
                        "name is required when there are several listeners",
                    );
                    format!("listener-{i}")
                }
            };
            let address = self.socket_addr(&format!("{base}.address"), l.address.as_ref());
            let tls = l
                .tls
                .as_ref()
                .and_then(|t| self.listener_tls(&format!("{base}.tls"), t));
            let max_connections = self
                .at_least_one(&format!("{base}.max_connections"), l.max_connections)
                .unwrap_or(defaults::MAX_CONNECTIONS);
            let max_request_header_bytes = match l.max_request_header_bytes {
                Some(n) if n < MIN_REQUEST_HEAD_BYTES => {
                    self.error(
                        &format!("{base}.max_request_header_bytes"),
                        format!("must be at least {MIN_REQUEST_HEAD_BYTES} bytes"),
                    );
                    n
                }
                Some(n) => n,
                None => defaults::MAX_REQUEST_HEADER_BYTES,
            };
            let max_request_headers = self
                .at_least_one(
                    &format!("{base}.max_request_headers"),
                    l.max_request_headers,
                )
                .unwrap_or(defaults::MAX_REQUEST_HEADERS);
            let header_timeout = self
                .duration(
                    &format!("{base}.header_timeout"),
                    l.header_timeout.as_ref(),
                    true,
                )
                .unwrap_or(defaults::HEADER_TIMEOUT);
            let idle_timeout = self
                .duration(
                    &format!("{base}.idle_timeout"),
                    l.idle_timeout.as_ref(),
                    true,
                )
                .unwrap_or(defaults::CLIENT_IDLE_TIMEOUT);
            if let Some(address) = address {
                bound.push((format!("{base}.address"), address));
                out.push(ListenerSettings {
                    name,
                    address,
                    tls,
                    max_connections,
                    max_request_header_bytes,
                    max_request_headers,
                    header_timeout,
                    idle_timeout,
                });
            }
        }
        (out, bound)
    }

    fn listener_tls(&mut self, base: &str, t: &ListenerTlsFile) -> Option<ListenerTlsSettings> {
        let cert = self.file_path(&format!("{base}.cert_file"), t.cert_file.as_ref());
        let key = self.file_path(&format!("{base}.key_file"), t.key_file.as_ref());
        match (&t.cert_file, &t.key_file) {
            (Some(_), None) => self.error(
                &format!("{base}.key_file"),
                "key_file is required with cert_file",
            ),
            (None, Some(_)) => self.error(
                &format!("{base}.cert_file"),
                "cert_file is required with key_file",
            ),
            (None, None) => self.error(base, "tls needs cert_file and key_file"),
            (Some(_), Some(_)) => {}
        }
        let alpn = match &t.alpn {
            None => defaults::TLS_ALPN.iter().map(|s| s.to_string()).collect(),
            Some(list) => {
                if list.is_empty() {
                    self.error(
                        &format!("{base}.alpn"),
                        "alpn must list at least one protocol (h2, http/1.1)",
                    );
                }
                for (j, p) in list.iter().enumerate() {
                    let path = format!("{base}.alpn[{j}]");
                    if !matches!(p.as_str(), "h2" | "http/1.1") {
                        self.error(
                            &path,
                            format!("unsupported ALPN protocol `{p}`: expected h2 or http/1.1"),
                        );
                    } else if list[..j].contains(p) {
                        self.error(&path, format!("`{p}` is listed twice"));
                    }
                }
                list.clone()
            }
        };
        Some(ListenerTlsSettings {
            cert_file: cert?,
            key_file: key?,
            alpn,
        })
    }

    /// Two sockets cannot bind the same address; port 0 is exempt as each gets its own port.
    /// `bound` holds `(path of the address key, address)` in file order.
    fn distinct_addresses(&mut self, bound: Vec<(String, SocketAddr)>) {
        let mut seen: HashMap<SocketAddr, String> = HashMap::new();
        for (key, addr) in bound {
            if addr.port() == 0 {
                continue;
            }
            match seen.get(&addr) {
                Some(first) => {
                    // Named by what holds it: `listeners[0]`, `admin`, `admin.metrics_address`.
                    let owner = first.strip_suffix(".address").unwrap_or(first);
                    let message = format!("address {addr} is already used by {owner}");
                    self.error(&key, message);
                }
                None => {
                    seen.insert(addr, key);
                }
            }
        }
    }

    fn upstreams(
        &mut self,
        files: &BTreeMap<String, UpstreamFile>,
    ) -> BTreeMap<String, UpstreamSettings> {
        let mut out = BTreeMap::new();
        for (name, u) in files {
            let base = format!("upstreams.{name}");
            self.name(&base, name);
            if u.endpoints.is_empty() {
                self.error(
                    &format!("{base}.endpoints"),
                    "at least one endpoint (host:port) is required",
                );
            }
            for (j, e) in u.endpoints.iter().enumerate() {
                if let Err(message) = check_endpoint(e) {
                    self.error(&format!("{base}.endpoints[{j}]"), message);
                }
            }
            let connect_timeout = self.duration(
                &format!("{base}.connect_timeout"),
                u.connect_timeout.as_ref(),
                true,
            );
            let idle_timeout = self.duration(
                &format!("{base}.idle_timeout"),
                u.idle_timeout.as_ref(),
                true,
            );
            let protocol = match u.protocol.as_deref() {
                None => defaults::PROTOCOL,
                Some("http1") => UpstreamProtocol::Http1,
                Some("http2") => UpstreamProtocol::Http2,
                Some(other) => {
                    self.error(
                        &format!("{base}.protocol"),
                        format!("unknown protocol `{other}`: expected http1 or http2"),
                    );
                    defaults::PROTOCOL
                }
            };
            let tls = u
                .tls
                .as_ref()
                .map(|t| self.upstream_tls(&format!("{base}.tls"), t));
            let body_timeout = self
                .duration(
                    &format!("{base}.body_timeout"),
                    u.body_timeout.as_ref(),
                    true,
                )
                .unwrap_or(defaults::BODY_TIMEOUT);
            let max_connections =
                self.at_least_one(&format!("{base}.max_connections"), u.max_connections);
            if protocol == UpstreamProtocol::Http2 && max_connections.is_some() {
                self.error(
                    &format!("{base}.max_connections"),
                    "max_connections applies to http1 upstreams: HTTP/2 multiplexes over one connection per endpoint",
                );
            }
            out.insert(
                name.clone(),
                UpstreamSettings {
                    endpoints: u.endpoints.iter().map(|e| e.trim().to_owned()).collect(),
                    connect_timeout: connect_timeout.unwrap_or(defaults::CONNECT_TIMEOUT),
                    idle_timeout: idle_timeout.unwrap_or(defaults::IDLE_TIMEOUT),
                    body_timeout,
                    max_idle: u.max_idle.unwrap_or(defaults::MAX_IDLE),
                    max_connections,
                    protocol,
                    tls,
                },
            );
        }
        out
    }

    fn upstream_tls(&mut self, base: &str, t: &UpstreamTlsFile) -> UpstreamTlsSettings {
        if let Some(name) = &t.server_name {
            let ok = name.parse::<IpAddr>().is_ok() || check_dns_name(name, false).is_ok();
            if !ok {
                self.error(
                    &format!("{base}.server_name"),
                    format!("server_name `{name}` is neither a DNS name nor an IP address"),
                );
            }
        }
        match (&t.cert_file, &t.key_file) {
            (Some(_), None) => self.error(
                &format!("{base}.key_file"),
                "key_file is required with cert_file (client certificate)",
            ),
            (None, Some(_)) => self.error(
                &format!("{base}.cert_file"),
                "cert_file is required with key_file (client certificate)",
            ),
            _ => {}
        }
        UpstreamTlsSettings {
            server_name: t.server_name.clone(),
            ca_file: self.file_path(&format!("{base}.ca_file"), t.ca_file.as_ref()),
            cert_file: self.file_path(&format!("{base}.cert_file"), t.cert_file.as_ref()),
            key_file: self.file_path(&format!("{base}.key_file"), t.key_file.as_ref()),
        }
    }

    fn routes(
        &mut self,
        files: &[RouteFile],
        defaults_part: &PolicyPart,
        upstreams: &BTreeMap<String, UpstreamSettings>,
    ) -> Vec<RouteSettings> {
        if files.is_empty() {
            self.error("routes", "at least one route is required");
        }
        let mut seen: HashMap<String, usize> = HashMap::new();
        let mut out = Vec::new();
        for (i, r) in files.iter().enumerate() {
            let base = format!("routes[{i}]");
            let name = match &r.name {
                Some(name) => {
                    if self.name(&format!("{base}.name"), name) {
                        if let Some(first) = seen.insert(name.clone(), i) {
                            self.error(
                                &format!("{base}.name"),
                                format!("duplicate route name `{name}` (also routes[{first}])"),
                            );
                        }
                    }
                    name.clone()
                }
                None => {
                    self.error(
                        &format!("{base}.name"),
                        "name is required (it labels the route's metrics)",
                    );
                    format!("route-{i}")
                }
            };
            let matcher = self.matcher(&format!("{base}.match"), &r.match_);
            let upstream = match &r.upstream {
                None => {
                    self.error(&format!("{base}.upstream"), "upstream is required");
                    String::new()
                }
                Some(u) => {
                    if !upstreams.contains_key(u) {
                        let known = || upstreams.keys().map(String::as_str);
                        let message = if upstreams.is_empty() {
                            format!("unknown upstream `{u}`: no upstreams are defined")
                        } else if let Some(near) = suggest::closest(u, known()) {
                            format!("unknown upstream `{u}`; did you mean `{near}`?")
                        } else {
                            let known: Vec<&str> = known().collect();
                            format!(
                                "unknown upstream `{u}`; defined upstreams: {}",
                                known.join(", ")
                            )
                        };
                        self.error(&format!("{base}.upstream"), message);
                    }
                    u.clone()
                }
            };
            let own = self.policy_part(&base, &r.policy());
            let policy = self.resolve_policy(&base, &own, defaults_part);
            let upgrades = match &r.upgrades {
                None => defaults::UPGRADES.iter().map(|s| s.to_string()).collect(),
                Some(list) => {
                    for (j, p) in list.iter().enumerate() {
                        if p.is_empty() || !p.chars().all(is_tchar) {
                            self.error(
                                &format!("{base}.upgrades[{j}]"),
                                format!("`{p}` is not a protocol name (e.g. websocket)"),
                            );
                        }
                    }
                    list.iter().map(|p| p.to_ascii_lowercase()).collect()
                }
            };
            out.push(RouteSettings {
                name,
                matcher,
                upstream,
                upgrades,
                policy,
            });
        }
        out
    }

    fn matcher(&mut self, base: &str, m: &MatchFile) -> MatchSettings {
        let path_prefix = match &m.path_prefix {
            None => defaults::PATH_PREFIX.to_owned(),
            Some(p) => {
                if !p.starts_with('/') {
                    self.error(
                        &format!("{base}.path_prefix"),
                        format!("path_prefix `{p}` must start with `/`"),
                    );
                } else if p
                    .chars()
                    .any(|c| c.is_whitespace() || c.is_control() || c == '?' || c == '#')
                {
                    self.error(
                        &format!("{base}.path_prefix"),
                        format!(
                            "path_prefix `{p}` must be a plain path, without spaces, `?` or `#`"
                        ),
                    );
                }
                p.clone()
            }
        };
        let host = m.host.as_ref().and_then(|h| match parse_host_match(h) {
            Ok(h) => Some(h),
            Err(message) => {
                self.error(&format!("{base}.host"), message);
                None
            }
        });
        let mut methods: Vec<String> = Vec::new();
        for (j, method) in m.methods.iter().flatten().enumerate() {
            let upper = method.trim().to_ascii_uppercase();
            if upper.is_empty() || !upper.chars().all(is_tchar) {
                self.error(
                    &format!("{base}.methods[{j}]"),
                    format!("`{method}` is not an HTTP method"),
                );
            } else if !methods.contains(&upper) {
                methods.push(upper);
            }
        }
        MatchSettings {
            path_prefix,
            host,
            methods,
        }
    }

    fn shutdown(&mut self, file: Option<&ShutdownFile>) -> ShutdownSettings {
        let empty = ShutdownFile::default();
        let s = file.unwrap_or(&empty);
        // Zero is allowed for both: no delay, or no grace, is a legitimate choice (and what
        // tests want).
        ShutdownSettings {
            drain_delay: self
                .duration("shutdown.drain_delay", s.drain_delay.as_ref(), false)
                .unwrap_or(defaults::DRAIN_DELAY),
            drain_timeout: self
                .duration("shutdown.drain_timeout", s.drain_timeout.as_ref(), false)
                .unwrap_or(defaults::DRAIN_TIMEOUT),
        }
    }

    /// Parses one policy block (`defaults` or a route's own fields), checking each field on
    /// its own; unset and invalid fields are `None`.
    fn policy_part(&mut self, base: &str, p: &PolicyFile) -> PolicyPart {
        let mut part = PolicyPart {
            timeout: self.duration(&format!("{base}.timeout"), p.timeout.as_ref(), true),
            retry_after: self.duration(
                &format!("{base}.retry_after"),
                p.retry_after.as_ref(),
                true,
            ),
            ..PolicyPart::default()
        };
        if let Some(c) = &p.concurrency {
            self.concurrency_part(&format!("{base}.concurrency"), c, &mut part);
        }
        if let Some(word) = &p.priority {
            part.priority = Priority::parse(word.trim().as_bytes());
            if part.priority.is_none() {
                self.error(
                    &format!("{base}.priority"),
                    format!("unknown priority `{word}`: expected critical, normal or sheddable"),
                );
            }
        }
        if let Some(name) = &p.priority_header {
            part.priority_header = self.priority_header(&format!("{base}.priority_header"), name);
        }
        if let Some(b) = &p.circuit_breaker {
            let base = format!("{base}.circuit_breaker");
            part.breaker_enabled = b.enabled;
            part.window = self.duration(&format!("{base}.window"), b.window.as_ref(), true);
            part.open_for = self.duration(&format!("{base}.open_for"), b.open_for.as_ref(), true);
            part.min_requests = self.at_least_one(&format!("{base}.min_requests"), b.min_requests);
            part.half_open_requests =
                self.at_least_one(&format!("{base}.half_open_requests"), b.half_open_requests);
            part.failure_ratio = b.failure_ratio.filter(|&r| {
                let ok = r > 0.0 && r <= 1.0;
                if !ok {
                    self.error(
                        &format!("{base}.failure_ratio"),
                        format!("failure_ratio {r} must be greater than 0 and at most 1"),
                    );
                }
                ok
            });
            if let Some(codes) = &b.failure_codes {
                let mut valid = true;
                for (j, code) in codes.iter().enumerate() {
                    if !(100..=599).contains(code) {
                        self.error(
                            &format!("{base}.failure_codes[{j}]"),
                            format!("{code} is not an HTTP status code (100-599)"),
                        );
                        valid = false;
                    }
                }
                part.failure_codes = valid.then(|| codes.clone());
            }
        }
        if let Some(m) = &p.maintenance {
            part.maintenance_enabled = m.enabled;
            part.maintenance_retry_after = self.duration(
                &format!("{base}.maintenance.retry_after"),
                m.retry_after.as_ref(),
                true,
            );
        }
        if let Some(r) = &p.retries {
            let base = format!("{base}.retries");
            part.attempts = r.attempts;
            // Zero backoff is allowed: retry at once, e.g. after a refused connection.
            part.backoff = self.duration(&format!("{base}.backoff"), r.backoff.as_ref(), false);
            part.budget = r.budget.filter(|&b| {
                let ok = (0.0..=1.0).contains(&b);
                if !ok {
                    self.error(
                        &format!("{base}.budget"),
                        format!("budget {b} must be between 0 and 1"),
                    );
                }
                ok
            });
            part.min_per_second = r.min_per_second.filter(|&m| {
                let ok = m.is_finite() && m >= 0.0;
                if !ok {
                    self.error(
                        &format!("{base}.min_per_second"),
                        format!("min_per_second {m} must be 0 or more"),
                    );
                }
                ok
            });
        }
        part
    }

    /// A request header name for `priority_header`, lower-cased; `None` (with an error) when it
    /// is not a valid field name or one that is removed before forwarding.
    fn priority_header(&mut self, path: &str, name: &str) -> Option<String> {
        let lower = name.trim().to_ascii_lowercase();
        if http::HeaderName::from_bytes(lower.as_bytes()).is_err() {
            self.error(path, format!("`{name}` is not a valid header name"));
            return None;
        }
        // Hop-by-hop fields are removed before the request is classified and forwarded.
        const HOP_BY_HOP: [&str; 9] = [
            "connection",
            "keep-alive",
            "proxy-connection",
            "proxy-authenticate",
            "proxy-authorization",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
        ];
        if HOP_BY_HOP.contains(&lower.as_str()) {
            self.error(
                path,
                format!("`{name}` is a hop-by-hop header, removed before forwarding: name another"),
            );
            return None;
        }
        Some(lower)
    }

    /// A share of the concurrency limit: greater than 0, at most 1.
    fn share(&mut self, path: &str, value: Option<f64>) -> Option<f64> {
        value.filter(|&v| {
            let ok = v > 0.0 && v <= 1.0;
            if !ok {
                self.error(
                    path,
                    format!("share {v} must be greater than 0 and at most 1"),
                );
            }
            ok
        })
    }

    fn concurrency_part(&mut self, base: &str, c: &ConcurrencyFile, part: &mut PolicyPart) {
        if c.max.is_some() && c.adaptive.is_some() {
            self.error(&format!("{base}.adaptive"), "`max` and `adaptive` cannot both be set: give a fixed `max` or `adaptive: { min, max }`");
        }
        let max = self.at_least_one(&format!("{base}.max"), c.max);
        part.limit = match &c.adaptive {
            Some(a) => Some(LimitPart::Adaptive {
                min: self.at_least_one(&format!("{base}.adaptive.min"), a.min),
                max: self.at_least_one(&format!("{base}.adaptive.max"), a.max),
            }),
            None => max.map(LimitPart::Fixed),
        };
        part.queue = c.queue;
        part.queue_timeout = self.duration(
            &format!("{base}.queue_timeout"),
            c.queue_timeout.as_ref(),
            true,
        );
        part.queue_target = self.duration(
            &format!("{base}.queue_target"),
            c.queue_target.as_ref(),
            true,
        );
        part.queue_interval = self.duration(
            &format!("{base}.queue_interval"),
            c.queue_interval.as_ref(),
            true,
        );
        if let Some(shares) = &c.shares {
            part.share_sheddable =
                self.share(&format!("{base}.shares.sheddable"), shares.sheddable);
            part.share_normal = self.share(&format!("{base}.shares.normal"), shares.normal);
        }
    }

    fn at_least_one(&mut self, path: &str, value: Option<u32>) -> Option<u32> {
        match value {
            Some(0) => {
                self.error(path, "must be at least 1");
                None
            }
            v => v,
        }
    }

    /// The effective policy of `own` over `inherited` over the built-in defaults. Checks that
    /// span fields are reported at `base` only when `own` took part in them, so an inherited
    /// mistake is reported once, where it was written.
    fn resolve_policy(
        &mut self,
        base: &str,
        own: &PolicyPart,
        inherited: &PolicyPart,
    ) -> PolicySettings {
        let p = own.over(inherited);
        let limit = match p.limit {
            None => LimitSettings::Fixed(defaults::CONCURRENCY_MAX),
            Some(LimitPart::Fixed(n)) => LimitSettings::Fixed(n),
            Some(LimitPart::Adaptive { min, max }) => {
                let min = min.unwrap_or(defaults::ADAPTIVE_MIN);
                let max = max.unwrap_or(defaults::ADAPTIVE_MAX);
                if min > max && matches!(own.limit, Some(LimitPart::Adaptive { .. })) {
                    self.error(
                        &format!("{base}.concurrency.adaptive"),
                        format!("adaptive min ({min}) must not exceed adaptive max ({max})"),
                    );
                }
                LimitSettings::Adaptive { min, max }
            }
        };
        let shares = Shares {
            sheddable: p.share_sheddable.unwrap_or(defaults::SHARE_SHEDDABLE),
            normal: p.share_normal.unwrap_or(defaults::SHARE_NORMAL),
        };
        let own_shares = own.share_sheddable.is_some() || own.share_normal.is_some();
        if shares.sheddable > shares.normal && own_shares {
            self.error(
                &format!("{base}.concurrency.shares"),
                format!(
                    "shares.sheddable ({}) must not exceed shares.normal ({}): a sheddable request would get in where a normal one does not",
                    shares.sheddable, shares.normal
                ),
            );
        }
        let retry_after = p.retry_after.unwrap_or(defaults::RETRY_AFTER);
        PolicySettings {
            timeout: p.timeout.unwrap_or(defaults::TIMEOUT),
            retry_after,
            concurrency: ConcurrencySettings {
                limit,
                queue: p.queue.unwrap_or(defaults::QUEUE),
                queue_timeout: p.queue_timeout.unwrap_or(defaults::QUEUE_TIMEOUT),
                queue_target: p.queue_target.unwrap_or(defaults::QUEUE_TARGET),
                queue_interval: p.queue_interval.unwrap_or(defaults::QUEUE_INTERVAL),
                shares,
            },
            circuit_breaker: BreakerSettings {
                enabled: p.breaker_enabled.unwrap_or(defaults::BREAKER_ENABLED),
                window: p.window.unwrap_or(defaults::BREAKER_WINDOW),
                min_requests: p.min_requests.unwrap_or(defaults::BREAKER_MIN_REQUESTS),
                failure_ratio: p.failure_ratio.unwrap_or(defaults::BREAKER_FAILURE_RATIO),
                open_for: p.open_for.unwrap_or(defaults::BREAKER_OPEN_FOR),
                half_open_requests: p
                    .half_open_requests
                    .unwrap_or(defaults::BREAKER_HALF_OPEN_REQUESTS),
                failure_codes: p
                    .failure_codes
                    .unwrap_or_else(|| defaults::BREAKER_FAILURE_CODES.to_vec()),
            },
            maintenance: MaintenanceSettings {
                enabled: p
                    .maintenance_enabled
                    .unwrap_or(defaults::MAINTENANCE_ENABLED),
                // Unset: the same Retry-After as every other 503 of the route.
                retry_after: p.maintenance_retry_after.unwrap_or(retry_after),
            },
            retries: RetrySettings {
                attempts: p.attempts.unwrap_or(defaults::RETRY_ATTEMPTS),
                backoff: p.backoff.unwrap_or(defaults::RETRY_BACKOFF),
                budget: p.budget.unwrap_or(defaults::RETRY_BUDGET),
                min_per_second: p.min_per_second.unwrap_or(defaults::RETRY_MIN_PER_SECOND),
            },
            priority: p.priority.unwrap_or(defaults::PRIORITY),
            priority_header: p.priority_header,
        }
    }
}

/// One policy block with every field optional, flattened: the unit of field-by-field merging.
#[derive(Debug, Clone, Default)]
struct PolicyPart {
    timeout: Option<Duration>,
    retry_after: Option<Duration>,
    limit: Option<LimitPart>,
    queue: Option<u32>,
    queue_timeout: Option<Duration>,
    queue_target: Option<Duration>,
    queue_interval: Option<Duration>,
    share_sheddable: Option<f64>,
    share_normal: Option<f64>,
    breaker_enabled: Option<bool>,
    window: Option<Duration>,
    min_requests: Option<u32>,
    failure_ratio: Option<f64>,
    open_for: Option<Duration>,
    half_open_requests: Option<u32>,
    failure_codes: Option<Vec<u16>>,
    maintenance_enabled: Option<bool>,
    maintenance_retry_after: Option<Duration>,
    attempts: Option<u32>,
    backoff: Option<Duration>,
    budget: Option<f64>,
    min_per_second: Option<f64>,
    priority: Option<Priority>,
    priority_header: Option<String>,
}

/// The concurrency limit as one block gives it.
#[derive(Debug, Clone, Copy)]
enum LimitPart {
    Fixed(u32),
    Adaptive { min: Option<u32>, max: Option<u32> },
}

impl PolicyPart {
    /// `self` where set, else `base`.
    fn over(&self, base: &PolicyPart) -> PolicyPart {
        let limit = match (self.limit, base.limit) {
            (
                Some(LimitPart::Adaptive { min, max }),
                Some(LimitPart::Adaptive {
                    min: bmin,
                    max: bmax,
                }),
            ) => Some(LimitPart::Adaptive {
                min: min.or(bmin),
                max: max.or(bmax),
            }),
            (own, inherited) => own.or(inherited),
        };
        PolicyPart {
            timeout: self.timeout.or(base.timeout),
            retry_after: self.retry_after.or(base.retry_after),
            limit,
            queue: self.queue.or(base.queue),
            queue_timeout: self.queue_timeout.or(base.queue_timeout),
            queue_target: self.queue_target.or(base.queue_target),
            queue_interval: self.queue_interval.or(base.queue_interval),
            share_sheddable: self.share_sheddable.or(base.share_sheddable),
            share_normal: self.share_normal.or(base.share_normal),
            breaker_enabled: self.breaker_enabled.or(base.breaker_enabled),
            window: self.window.or(base.window),
            min_requests: self.min_requests.or(base.min_requests),
            failure_ratio: self.failure_ratio.or(base.failure_ratio),
            open_for: self.open_for.or(base.open_for),
            half_open_requests: self.half_open_requests.or(base.half_open_requests),
            failure_codes: self
                .failure_codes
                .clone()
                .or_else(|| base.failure_codes.clone()),
            maintenance_enabled: self.maintenance_enabled.or(base.maintenance_enabled),
            maintenance_retry_after: self
                .maintenance_retry_after
                .or(base.maintenance_retry_after),
            attempts: self.attempts.or(base.attempts),
            backoff: self.backoff.or(base.backoff),
            budget: self.budget.or(base.budget),
            min_per_second: self.min_per_second.or(base.min_per_second),
            priority: self.priority.or(base.priority),
            priority_header: self
                .priority_header
                .clone()
                .or_else(|| base.priority_header.clone()),
        }
    }
}

/// RFC 9110 `tchar`: what an HTTP method may be made of.
fn is_tchar(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c)
}

/// `host:port` with host a DNS name, an IPv4 address or a bracketed IPv6 address.
fn check_endpoint(value: &str) -> Result<(), String> {
    let e = value.trim();
    if e.contains("://") {
        return Err(format!(
            "endpoint `{e}` must be host:port without a scheme (TLS is set with `tls:`)"
        ));
    }
    let port = if let Some(rest) = e.strip_prefix('[') {
        let (ip, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("endpoint `{e}`: missing `]` after the IPv6 address"))?;
        ip.parse::<Ipv6Addr>()
            .map_err(|_| format!("endpoint `{e}`: `{ip}` is not an IPv6 address"))?;
        after
            .strip_prefix(':')
            .ok_or_else(|| format!("endpoint `{e}` needs a port, e.g. [{ip}]:3000"))?
    } else {
        let (host, port) = e.rsplit_once(':').ok_or_else(|| {
            format!("endpoint `{e}` needs a port: expected host:port, e.g. 127.0.0.1:3000")
        })?;
        if host.contains(':') {
            return Err(format!(
                "endpoint `{e}`: IPv6 addresses must be in brackets, e.g. [::1]:3000"
            ));
        }
        if host.parse::<Ipv4Addr>().is_err() {
            check_dns_name(host, true).map_err(|why| format!("endpoint `{e}`: {why}"))?;
        }
        port
    };
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(format!(
            "endpoint `{e}`: port must be a number from 1 to 65535"
        )),
    }
}

/// A DNS name: dot-separated labels of letters, digits, `-` and `_` (container runtimes allow
/// `_` in service names), 1-63 characters each, 253 in all. A last label of only digits is
/// refused, as such a name is a mistyped IPv4 address, never a host.
fn check_dns_name(name: &str, allow_trailing_dot: bool) -> Result<(), String> {
    let bare = match name.strip_suffix('.') {
        Some(bare) if allow_trailing_dot => bare,
        _ => name,
    };
    if bare.is_empty() || bare.len() > 253 {
        return Err(format!("`{name}` is not a valid host name"));
    }
    for label in bare.split('.') {
        let ok = (1..=63).contains(&label.len())
            && label
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(format!("`{name}` is not a valid host name"));
        }
    }
    if bare
        .rsplit('.')
        .next()
        .is_some_and(|l| l.chars().all(|c| c.is_ascii_digit()))
    {
        return Err(format!("`{name}` is not a valid IPv4 address"));
    }
    Ok(())
}

/// `shop.example.com`, `*.example.com` or an IP address, lower-cased; no port.
fn parse_host_match(value: &str) -> Result<HostMatch, String> {
    let host = value.trim().to_ascii_lowercase();
    if let Some(suffix) = host.strip_prefix("*.") {
        check_dns_name(suffix, false)
            .map_err(|_| format!("`{value}`: `*.` must be followed by a DNS name"))?;
        return Ok(HostMatch::Suffix(format!(".{suffix}")));
    }
    if host.contains('*') {
        return Err(format!(
            "`{value}`: a wildcard is only allowed as a leading `*.`, e.g. *.example.com"
        ));
    }
    if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return match inner.parse::<Ipv6Addr>() {
            Ok(_) => Ok(HostMatch::Exact(host)),
            Err(_) => Err(format!("`{value}` is not a bracketed IPv6 address")),
        };
    }
    if host.contains(':') {
        return Err(format!("host `{value}` must not include a port"));
    }
    if host.parse::<Ipv4Addr>().is_err() {
        check_dns_name(&host, false)?;
    }
    Ok(HostMatch::Exact(host))
}

/// Things that are allowed but probably wrong.
fn warnings(settings: &Settings) -> Vec<String> {
    let mut out = Vec::new();
    for (j, later) in settings.routes.iter().enumerate() {
        if let Some((i, earlier)) = settings.routes[..j]
            .iter()
            .enumerate()
            .find(|(_, e)| e.matcher.covers(&later.matcher))
        {
            out.push(format!(
                "routes[{j}] ({}) is shadowed by routes[{i}] ({}): it can never match",
                later.name, earlier.name
            ));
        }
    }
    for name in settings.upstreams.keys() {
        if !settings.routes.iter().any(|r| &r.upstream == name) {
            out.push(format!("upstream `{name}` is not used by any route"));
        }
    }
    if let Some(admin) = settings.admin {
        if !admin.ip().is_loopback() && settings.admin_token_file.is_none() {
            out.push(format!(
                "admin.address {admin} is reachable from other hosts and has no token_file: \
                 whoever reaches it can POST /reload and read /config; keep it on loopback \
                 (open admin.metrics_address for Prometheus and probes) or set admin.token_file"
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests;
