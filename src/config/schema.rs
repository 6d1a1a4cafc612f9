//! The config file's JSON Schema, generated from the serde types the loader uses
//! ([`super::file`]), so it cannot drift from what is accepted; and the list of every key path
//! in it, which docs/configuration.md is checked against.
//!
//! schemars derives the structure and the descriptions (the types' doc comments). A post-pass
//! then puts in what the types alone do not say: each key's default, from the constants in
//! [`super::defaults`] the loader fills in (not schemars' own, which are the empty values
//! serde starts from), and the range of each integer key.

use std::sync::OnceLock;
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use super::defaults;
use super::file::FileConfig;

/// The JSON Schema (draft 2020-12) of the config file.
pub fn schema() -> Value {
    cached().clone()
}

/// The schema, generated once per process: the loader walks it on every load.
pub(crate) fn cached() -> &'static Value {
    static SCHEMA: OnceLock<Value> = OnceLock::new();
    SCHEMA.get_or_init(generate)
}

fn generate() -> Value {
    let mut schema = serde_json::to_value(schemars::schema_for!(FileConfig)).unwrap_or(Value::Null);
    for_each_schema(&mut schema, &mut |node| {
        // schemars' defaults are what serde starts from (`{"timeout": null, …}`), not what
        // the loader fills in; those come below.
        node.remove("default");
        integer_range(node);
    });
    for (path, value, _) in key_defaults() {
        if let Some(node) = pointer(&schema, path).and_then(|p| schema.pointer_mut(&p)) {
            node["default"] = value;
        }
    }
    if let Some(root) = schema.as_object_mut() {
        root.insert("title".into(), "spillway configuration".into());
    }
    schema
}

/// The default of every key that has one, as `(key path, value, constant)`: each from its
/// constant in defaults.rs, written as the file would write it. A route's policy keys inherit
/// `defaults.…` and share its definitions, so only `defaults.…` is listed; keys whose default
/// is another key (`maintenance.retry_after`) have none here.
fn key_defaults() -> Vec<(&'static str, Value, &'static str)> {
    macro_rules! table {
        ($($path:literal => $how:ident($name:ident),)*) => {
            vec![$(($path, $how(defaults::$name), stringify!($name)),)*]
        };
    }
    table![
        "server_id" => json(SERVER_ID),
        "listeners[].name" => json(LISTENER_NAME),
        "listeners[].tls.alpn" => json(TLS_ALPN),
        "listeners[].max_connections" => json(MAX_CONNECTIONS),
        "listeners[].max_request_header_bytes" => json(MAX_REQUEST_HEADER_BYTES),
        "listeners[].max_request_headers" => json(MAX_REQUEST_HEADERS),
        "listeners[].header_timeout" => duration(HEADER_TIMEOUT),
        "listeners[].idle_timeout" => duration(CLIENT_IDLE_TIMEOUT),
        "admin.address" => text(ADMIN_ADDRESS),
        "upstreams.<name>.connect_timeout" => duration(CONNECT_TIMEOUT),
        "upstreams.<name>.idle_timeout" => duration(IDLE_TIMEOUT),
        "upstreams.<name>.max_idle" => json(MAX_IDLE),
        "upstreams.<name>.body_timeout" => duration(BODY_TIMEOUT),
        "upstreams.<name>.protocol" => json(PROTOCOL),
        "routes[].match.path_prefix" => json(PATH_PREFIX),
        "routes[].upgrades" => json(UPGRADES),
        "defaults.timeout" => duration(TIMEOUT),
        "defaults.retry_after" => duration(RETRY_AFTER),
        "defaults.concurrency.max" => json(CONCURRENCY_MAX),
        "defaults.concurrency.adaptive.min" => json(ADAPTIVE_MIN),
        "defaults.concurrency.adaptive.max" => json(ADAPTIVE_MAX),
        "defaults.concurrency.queue" => json(QUEUE),
        "defaults.concurrency.queue_timeout" => duration(QUEUE_TIMEOUT),
        "defaults.concurrency.queue_target" => duration(QUEUE_TARGET),
        "defaults.concurrency.queue_interval" => duration(QUEUE_INTERVAL),
        "defaults.concurrency.shares.sheddable" => json(SHARE_SHEDDABLE),
        "defaults.concurrency.shares.normal" => json(SHARE_NORMAL),
        "defaults.priority" => json(PRIORITY),
        "defaults.circuit_breaker.enabled" => json(BREAKER_ENABLED),
        "defaults.circuit_breaker.window" => duration(BREAKER_WINDOW),
        "defaults.circuit_breaker.min_requests" => json(BREAKER_MIN_REQUESTS),
        "defaults.circuit_breaker.failure_ratio" => json(BREAKER_FAILURE_RATIO),
        "defaults.circuit_breaker.open_for" => duration(BREAKER_OPEN_FOR),
        "defaults.circuit_breaker.half_open_requests" => json(BREAKER_HALF_OPEN_REQUESTS),
        "defaults.circuit_breaker.failure_codes" => json(BREAKER_FAILURE_CODES),
        "defaults.maintenance.enabled" => json(MAINTENANCE_ENABLED),
        "defaults.retries.attempts" => json(RETRY_ATTEMPTS),
        "defaults.retries.backoff" => duration(RETRY_BACKOFF),
        "defaults.retries.budget" => json(RETRY_BUDGET),
        "defaults.retries.min_per_second" => json(RETRY_MIN_PER_SECOND),
        "access_log.enabled" => json(ACCESS_LOG_ENABLED),
        "access_log.sample" => json(ACCESS_LOG_SAMPLE),
        "access_log.always_log" => json(ACCESS_LOG_ALWAYS),
        "access_log.slow_threshold" => duration(ACCESS_LOG_SLOW),
        "limits.memory_soft" => json(MEMORY_SOFT),
        "limits.memory_hard" => json(MEMORY_HARD),
        "shutdown.drain_delay" => duration(DRAIN_DELAY),
        "shutdown.drain_timeout" => duration(DRAIN_TIMEOUT),
    ]
}

fn json(value: impl Serialize) -> Value {
    serde_json::to_value(value).unwrap_or(Value::Null)
}

fn text(value: impl std::fmt::Display) -> Value {
    Value::String(value.to_string())
}

/// As the file writes it: `30s`, `100ms`, `1m 30s`.
fn duration(value: Duration) -> Value {
    text(humantime::format_duration(value))
}

/// `minimum` and `maximum` from an integer's `format` (`uint32`: 0 to 4294967295), where
/// schemars leaves them out: serde refuses what does not fit, so the schema says so too.
fn integer_range(node: &mut serde_json::Map<String, Value>) {
    let range: (i128, i128) = match node.get("format").and_then(Value::as_str) {
        Some("uint8") => (0, u8::MAX.into()),
        Some("uint16") => (0, u16::MAX.into()),
        Some("uint32") => (0, u32::MAX.into()),
        Some("uint64") => (0, u64::MAX.into()),
        Some("int8") => (i8::MIN.into(), i8::MAX.into()),
        Some("int16") => (i16::MIN.into(), i16::MAX.into()),
        Some("int32") => (i32::MIN.into(), i32::MAX.into()),
        Some("int64") => (i64::MIN.into(), i64::MAX.into()),
        _ => return,
    };
    let number = |n: i128| {
        u64::try_from(n)
            .map(Value::from)
            .or_else(|_| i64::try_from(n).map(Value::from))
            .unwrap_or(Value::Null)
    };
    node.entry("minimum").or_insert_with(|| number(range.0));
    node.entry("maximum").or_insert_with(|| number(range.1));
}

/// Calls `f` on every schema object in `node`: itself and every subschema, through the
/// keywords that hold them.
fn for_each_schema(node: &mut Value, f: &mut impl FnMut(&mut serde_json::Map<String, Value>)) {
    let Some(object) = node.as_object_mut() else {
        return;
    };
    f(object);
    for (keyword, child) in object.iter_mut() {
        match keyword.as_str() {
            "properties" | "$defs" | "definitions" | "patternProperties" => {
                for sub in child
                    .as_object_mut()
                    .into_iter()
                    .flat_map(|m| m.values_mut())
                {
                    for_each_schema(sub, f);
                }
            }
            "anyOf" | "oneOf" | "allOf" | "prefixItems" => {
                for sub in child.as_array_mut().into_iter().flatten() {
                    for_each_schema(sub, f);
                }
            }
            "items" | "additionalProperties" | "not" | "if" | "then" | "else" => {
                for_each_schema(child, f)
            }
            _ => {}
        }
    }
}

/// The JSON pointer of the schema of a key path (`defaults.concurrency.max`,
/// `upstreams.<name>.tls`, `listeners[].name`) inside the schema: of the property itself, so
/// that what is set there sits beside its description.
pub(crate) fn pointer(root: &Value, path: &str) -> Option<String> {
    let mut at = String::new();
    for segment in path.split('.') {
        at = through_references(root, at)?;
        let (name, item) = match segment.strip_suffix("[]") {
            Some(name) => (name, true),
            None => (segment, false),
        };
        if name == "<name>" {
            at.push_str("/additionalProperties");
        } else {
            at.push_str("/properties/");
            at.push_str(&name.replace('~', "~0").replace('/', "~1"));
        }
        if item {
            at = through_references(root, at)?;
            at.push_str("/items");
        }
        root.pointer(&at)?;
    }
    Some(at)
}

/// Follows `$ref`s and the one non-null branch of an `anyOf` (an `Option`) from the schema at
/// `at` to the one that says what the value is.
fn through_references(root: &Value, mut at: String) -> Option<String> {
    loop {
        let node = root.pointer(&at)?;
        if let Some(target) = node.get("$ref").and_then(Value::as_str) {
            at = target.strip_prefix('#')?.to_owned();
            continue;
        }
        let branches = node.get("anyOf").and_then(Value::as_array);
        let mut non_null = branches
            .into_iter()
            .flatten()
            .enumerate()
            .filter(|(_, b)| b.get("type").and_then(Value::as_str) != Some("null"));
        match (non_null.next(), non_null.next()) {
            (Some((i, _)), None) => at = format!("{at}/anyOf/{i}"),
            _ => return Some(at),
        }
    }
}

/// Every key path the schema allows, written the way the docs write them: `[]` for list items,
/// `<name>` for map keys (`upstreams.<name>.tls.ca_file`, `routes[].match.host`).
pub fn key_paths() -> Vec<String> {
    let schema = cached();
    let mut out = Vec::new();
    walk(schema, schema, "", &mut out);
    out
}

/// Adds the keys below `node` (a schema object) to `out`, prefixed with `path`.
fn walk(root: &Value, node: &Value, path: &str, out: &mut Vec<String>) {
    let node = resolve(root, node);
    if let Some(props) = node.get("properties").and_then(Value::as_object) {
        for (key, sub) in props {
            let p = if path.is_empty() {
                key.clone()
            } else {
                format!("{path}.{key}")
            };
            out.push(p.clone());
            walk(root, sub, &p, out);
        }
    }
    if let Some(items) = node.get("items") {
        walk(root, items, &format!("{path}[]"), out);
    }
    if let Some(values) = node.get("additionalProperties").filter(|v| v.is_object()) {
        // The name itself is a key the user writes (`upstreams.app`).
        let p = format!("{path}.<name>");
        out.push(p.clone());
        walk(root, values, &p, out);
    }
    for key in ["anyOf", "oneOf", "allOf"] {
        for alt in node
            .get(key)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            walk(root, alt, path, out);
        }
    }
}

/// Follows a local `$ref` (`#/$defs/Name`).
fn resolve<'a>(root: &'a Value, node: &'a Value) -> &'a Value {
    match node.get("$ref").and_then(Value::as_str) {
        Some(r) => r
            .strip_prefix("#/")
            .map(|p| p.split('/').fold(root, |v, seg| &v[seg]))
            .filter(|v| !v.is_null())
            .unwrap_or(node),
        None => node,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use serde_json::json;

    use super::*;

    /// Every constant in defaults.rs is the default of a key in the schema, at that key.
    #[test]
    fn every_default_in_defaults_rs_is_in_the_schema() {
        let constants: BTreeSet<&str> = include_str!("defaults.rs")
            .lines()
            .filter_map(|l| l.strip_prefix("pub(crate) const "))
            .filter_map(|l| l.split_once(':'))
            .map(|(name, _)| name)
            .collect();
        let table = key_defaults();
        let listed: BTreeSet<&str> = table.iter().map(|(_, _, name)| *name).collect();
        assert_eq!(
            constants.difference(&listed).collect::<Vec<_>>(),
            Vec::<&&str>::new(),
            "constants of defaults.rs that are no key's default: give each its key in \
             key_defaults (src/config/schema.rs)"
        );
        let mut schema = schema();
        for (path, value, _) in &table {
            let at = pointer(&schema, path).unwrap_or_else(|| panic!("`{path}` is not a key"));
            assert_eq!(schema.pointer(&at).unwrap()["default"], *value, "{path}");
        }
        let mut shown = 0;
        for_each_schema(&mut schema, &mut |node| {
            shown += usize::from(node.contains_key("default"))
        });
        assert_eq!(
            shown,
            table.len(),
            "defaults other than defaults.rs's in the schema"
        );
    }

    #[test]
    fn defaults_are_written_as_the_file_writes_them() {
        let schema = schema();
        let default = |path: &str| {
            schema.pointer(&pointer(&schema, path).unwrap()).unwrap()["default"].clone()
        };
        assert_eq!(default("defaults.timeout"), json!("30s"));
        assert_eq!(
            default("defaults.concurrency.queue_timeout"),
            json!("100ms")
        );
        assert_eq!(default("admin.address"), json!("127.0.0.1:9901"));
        assert_eq!(default("upstreams.<name>.protocol"), json!("http1"));
        assert_eq!(default("listeners[].tls.alpn"), json!(["h2", "http/1.1"]));
        assert_eq!(
            default("defaults.circuit_breaker.failure_ratio"),
            json!(0.5)
        );
        // A route's policy keys share the definitions of `defaults`.
        assert_eq!(default("routes[].concurrency.max"), json!(1000));
    }

    /// Written into a config, each default is accepted: the schema does not show a value the
    /// loader would refuse (a protocol spelled differently, a duration it cannot parse).
    #[test]
    fn each_default_is_a_value_the_loader_accepts() {
        for (path, value, _) in key_defaults() {
            let mut doc = json!({
                "listeners": [{
                    "address": "127.0.0.1:0",
                    "tls": { "cert_file": "tls.crt", "key_file": "tls.key" },
                }],
                "upstreams": { "app": { "endpoints": ["127.0.0.1:3000"] } },
                "routes": [{ "name": "r", "upstream": "app" }],
            });
            set(&mut doc, path, value.clone());
            // JSON is YAML.
            let text = serde_json::to_string_pretty(&doc).unwrap();
            if let Err(e) = crate::config::load_str(&text) {
                panic!("`{path}: {value}` is refused:\n{e}\n{text}");
            }
        }
    }

    /// Validation reads as a duration exactly the keys the schema describes as one. A new
    /// duration key declared as a plain `String` fails here: declare it `DurationText`.
    #[test]
    fn the_schema_marks_every_duration_key_and_no_other() {
        let schema = cached();
        let mut doc = json!({});
        let mut marked = BTreeSet::new();
        for path in key_paths() {
            let at = pointer(schema, &path).unwrap();
            let node = schema
                .pointer(&through_references(schema, at).unwrap())
                .unwrap();
            let is_string = node["type"] == "string"
                || node["type"]
                    .as_array()
                    .is_some_and(|t| t.contains(&json!("string")));
            if !is_string {
                continue;
            }
            // `soon` in every string key: only the durations among them say it is no duration.
            set(&mut doc, &path, json!("soon"));
            if node["pattern"] == super::super::file::DURATION_PATTERN {
                marked.insert(path.replace("[]", "[0]").replace("<name>", "app"));
            }
        }
        let text = serde_json::to_string_pretty(&doc).unwrap();
        let errors = crate::config::load_str(&text).expect_err("`soon` everywhere is refused");
        let read_as_durations: BTreeSet<String> = errors
            .0
            .into_iter()
            .filter(|e| e.message.contains("is not a duration"))
            .map(|e| e.path)
            .collect();
        assert!(marked.len() > 10, "{marked:?}");
        assert_eq!(
            read_as_durations, marked,
            "left: read as durations, right: durations in the schema (declare a duration key \
             as `DurationText` in src/config/file.rs)"
        );
    }

    /// Sets `path` (`[]`: the first item, `<name>`: `app`) in `doc`, creating what is missing.
    fn set(doc: &mut Value, path: &str, value: Value) {
        let (parents, last) = path.rsplit_once('.').unwrap_or(("", path));
        let mut node = doc;
        for segment in parents.split('.').filter(|s| !s.is_empty()) {
            let (name, item) = match segment.strip_suffix("[]") {
                Some(name) => (name, true),
                None => (segment, false),
            };
            let name = if name == "<name>" { "app" } else { name };
            let child = node
                .as_object_mut()
                .unwrap()
                .entry(name)
                .or_insert_with(|| if item { json!([{}]) } else { json!({}) });
            node = if item { &mut child[0] } else { child };
        }
        node[last] = value;
    }

    /// The configuration reference shows each key's default as the schema does.
    #[test]
    fn the_configuration_reference_shows_the_same_defaults() {
        let doc = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/configuration.md"),
        )
        .expect("docs/configuration.md");
        let flow = |v: &Value| match v {
            Value::String(s) => s.clone(),
            Value::Array(items) => format!(
                "[{}]",
                items
                    .iter()
                    .map(|i| i.as_str().map_or_else(|| i.to_string(), str::to_owned))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            other => other.to_string(),
        };
        for (path, value, _) in key_defaults() {
            let row = doc
                .lines()
                .find(|l| l.starts_with(&format!("| `{path}` |")))
                .unwrap_or_else(|| panic!("docs/configuration.md has no row for `{path}`"));
            let cell = row.split('|').nth(2).unwrap_or("");
            let shown = format!("`{}`", flow(&value));
            assert!(
                cell.contains(&shown),
                "docs/configuration.md: the default of `{path}` is {shown}, the row says {cell:?}"
            );
        }
    }

    #[test]
    fn integer_keys_carry_their_range_and_durations_their_pattern() {
        let schema = schema();
        let at = |path: &str| {
            schema
                .pointer(&pointer(&schema, path).unwrap())
                .unwrap()
                .clone()
        };
        let queue = at("defaults.concurrency.queue");
        assert_eq!(
            (&queue["minimum"], &queue["maximum"]),
            (&json!(0), &json!(u32::MAX))
        );
        let codes = at("defaults.circuit_breaker.failure_codes");
        assert_eq!(codes["items"]["maximum"], json!(65535));
        assert_eq!(
            schema["$defs"]["Duration"]["pattern"],
            json!(super::super::file::DURATION_PATTERN)
        );
        assert_eq!(
            schema["$schema"],
            "https://json-schema.org/draft/2020-12/schema"
        );
        assert_eq!(schema["title"], "spillway configuration");
    }

    #[test]
    fn key_paths_cover_nested_lists_maps_and_options() {
        let paths = key_paths();
        for want in [
            "server_id",
            "listeners[].tls.alpn",
            "upstreams.<name>",
            "upstreams.<name>.tls.ca_file",
            "routes[].match.path_prefix",
            "routes[].concurrency.adaptive.max",
            "defaults.circuit_breaker.failure_codes",
            "shutdown.drain_timeout",
        ] {
            assert!(
                paths.iter().any(|p| p == want),
                "{want} missing from {paths:?}"
            );
        }
    }

    /// docs/configuration.md documents exactly the keys the loader accepts: every key is a row
    /// (its path in backticks, first cell), and every row names a key. A route's policy keys
    /// are documented once, as `defaults.…`.
    #[test]
    fn the_configuration_reference_lists_every_key_and_no_other() {
        let doc = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/configuration.md"),
        )
        .expect("docs/configuration.md");
        let documented: BTreeSet<String> = doc
            .lines()
            .filter_map(|l| l.strip_prefix("| `"))
            .filter_map(|l| l.split_once('`'))
            .map(|(key, _)| key.to_owned())
            .collect();
        let policy: BTreeSet<String> = key_paths()
            .into_iter()
            .filter_map(|p| p.strip_prefix("defaults.").map(str::to_owned))
            .collect();
        let expected: BTreeSet<String> = key_paths()
            .into_iter()
            .filter(|p| {
                // routes[].timeout and the like: documented as defaults.timeout.
                !p.strip_prefix("routes[].")
                    .is_some_and(|k| policy.contains(k))
            })
            .collect();
        let missing: Vec<_> = expected.difference(&documented).collect();
        let unknown: Vec<_> = documented.difference(&expected).collect();
        assert!(
            missing.is_empty() && unknown.is_empty(),
            "docs/configuration.md is out of date.\n  keys without a row: {missing:?}\n  rows that are no key: {unknown:?}"
        );
    }
}
