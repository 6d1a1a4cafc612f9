//! The structural pass: the document (as a JSON value) walked against the config's JSON Schema
//! before serde reads it, so that every unknown key and every value of the wrong type is
//! reported at once, each where it stands, an unknown key with the closest valid key at its
//! place. serde would stop at the first. Nothing here names a config key: all of it comes from
//! the schema, which derives from the file types, so a key added there is checked here too.
//!
//! The pass also repairs what it reports, so that serde can read the rest and validation can
//! report the mistakes beyond: an unknown key is dropped, a value of the wrong type becomes
//! null (or an empty or zero value where null is not allowed). What validation then finds at
//! or below a repaired path is a consequence of the repair, not a mistake of its own
//! ([`Checked::explains`]).
//!
//! It is as lenient as serde_yaml, so that it never refuses a file serde_yaml reads: any
//! scalar may stand where a string goes (`name: 123`), and is then the text as written; an
//! empty value where a mapping or list goes (`defaults:` with everything below commented out)
//! is an empty one.

use serde_json::{Map, Value};

use super::locate::{Locations, Position};
use super::{suggest, yaml};

/// One structural mistake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Issue {
    /// Field path, as elsewhere: `routes[0].match.colour`.
    pub path: String,
    /// What is wrong, for a human.
    pub message: String,
    /// Where: the key of an unknown key, else the value.
    pub at: Option<Position>,
}

/// The outcome of the pass.
#[derive(Debug)]
pub(crate) struct Checked {
    /// Every unknown key and value of the wrong type, in no particular order.
    pub issues: Vec<Issue>,
    /// The document with each of them repaired, and every scalar typed as the schema wants
    /// it: what serde reads when there are issues.
    pub document: Value,
    /// The paths that were repaired.
    repaired: Vec<String>,
}

impl Checked {
    /// Whether an error found later at `path` follows from a repair (a value removed for its
    /// type is then missing, or empty), rather than being a mistake of its own.
    pub(crate) fn explains(&self, path: &str) -> bool {
        self.repaired.iter().any(|r| {
            r.is_empty()
                || path == r
                || path
                    .strip_prefix(r.as_str())
                    .is_some_and(|rest| rest.starts_with('.') || rest.starts_with('['))
        })
    }
}

/// Walks `document` against `schema` (a JSON Schema as `spillway schema` prints it), with
/// positions from `index`.
pub(crate) fn check(mut document: Value, schema: &Value, index: &Locations) -> Checked {
    let mut walk = Walk {
        root: schema,
        index,
        issues: Vec::new(),
        repaired: Vec::new(),
    };
    walk.value(schema, &mut document, "");
    Checked {
        issues: walk.issues,
        document,
        repaired: walk.repaired,
    }
}

/// How a value fits a schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fit {
    Exact,
    /// Only as serde_yaml reads it: a scalar as a string, an empty value as an empty mapping
    /// or list.
    Lenient,
    No,
}

/// Nesting deeper than this is not a config file (locate.rs stops there too).
const MAX_DEPTH: usize = 128;

struct Walk<'a> {
    root: &'a Value,
    index: &'a Locations,
    issues: Vec<Issue>,
    repaired: Vec<String>,
}

impl<'a> Walk<'a> {
    /// Checks `value`, found at `path`, against `schema`, and repairs what does not fit.
    fn value(&mut self, schema: &'a Value, value: &mut Value, path: &str) {
        if depth(path) > MAX_DEPTH {
            return;
        }
        let schema = self.resolve(schema);
        let branches: Vec<&'a Value> = ["anyOf", "oneOf"]
            .iter()
            .filter_map(|k| schema.get(*k).and_then(Value::as_array))
            .flatten()
            .map(|b| self.resolve(b))
            .collect();
        let schema = if branches.is_empty() {
            match self.fits(schema, value, path) {
                Fit::No => return self.mismatch(&[schema], value, path),
                _ => schema,
            }
        } else {
            // An `Option` is `anyOf: [T, null]`; an enum may be `oneOf` its constants.
            let fit = |f| branches.iter().find(|b| self.fits(b, value, path) == f);
            match fit(Fit::Exact).or_else(|| fit(Fit::Lenient)) {
                Some(branch) => self.resolve(branch),
                None => return self.mismatch(&branches, value, path),
            }
        };
        if self.fits(schema, value, path) == Fit::Lenient {
            self.lenient(schema, value, path);
        }
        for part in schema
            .get("allOf")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            self.value(part, value, path);
        }
        match value {
            Value::Object(map) => self.object(schema, map, path),
            Value::Array(items) => {
                if let Some(item) = schema.get("items").filter(|i| i.is_object()) {
                    for (i, v) in items.iter_mut().enumerate() {
                        self.value(item, v, &format!("{path}[{i}]"));
                    }
                }
            }
            _ => {}
        }
    }

    /// The keys of a mapping: known ones checked against their schemas, unknown ones reported
    /// (with the closest known one) and dropped, required ones present.
    fn object(&mut self, schema: &'a Value, map: &mut Map<String, Value>, path: &str) {
        let properties = schema.get("properties").and_then(Value::as_object);
        let additional = schema.get("additionalProperties");
        let keys: Vec<String> = map.keys().cloned().collect();
        for key in keys {
            let child = join(path, &key);
            if let Some(sub) = properties.and_then(|p| p.get(&key)) {
                if let Some(v) = map.get_mut(&key) {
                    self.value(sub, v, &child);
                }
                continue;
            }
            match additional {
                Some(Value::Bool(false)) => {
                    let valid = properties
                        .into_iter()
                        .flat_map(|p| p.keys().map(String::as_str));
                    let message = match suggest::closest(&key, valid.clone()) {
                        Some(near) => format!("unknown key; did you mean `{near}`?"),
                        None => format!("unknown key; expected one of {}", suggest::list(valid)),
                    };
                    let at = self.index.key(&child).or_else(|| self.index.nearest(path));
                    self.issue(&child, message, at);
                    map.remove(&key);
                }
                Some(sub) if sub.is_object() => {
                    if let Some(v) = map.get_mut(&key) {
                        self.value(sub, v, &child);
                    }
                }
                _ => {}
            }
        }
        for name in schema
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
        {
            if !map.contains_key(name) {
                let at = self.index.nearest(path);
                self.issue(&join(path, name), "this key is required".into(), at);
            }
        }
    }

    /// Follows `$ref`s (local ones, `#/$defs/Name`) to the schema they name.
    fn resolve(&self, mut schema: &'a Value) -> &'a Value {
        for _ in 0..MAX_DEPTH {
            let target = schema
                .get("$ref")
                .and_then(Value::as_str)
                .and_then(|r| r.strip_prefix('#'))
                .and_then(|pointer| self.root.pointer(pointer));
            match target {
                Some(t) => schema = t,
                None => break,
            }
        }
        schema
    }

    fn fits(&self, schema: &Value, value: &Value, path: &str) -> Fit {
        if let Some(allowed) = allowed(schema) {
            let text = self.text(value, path);
            let known = allowed
                .iter()
                .any(|a| *a == value || a.as_str() == text.as_deref());
            if !known {
                return Fit::No;
            }
        }
        let types = types(schema);
        if types.is_empty() {
            // No `type` (a constant alone, or any value at all).
            return Fit::Exact;
        }
        let has = |t: &str| types.contains(&t);
        match value {
            Value::Null if has("null") => Fit::Exact,
            Value::Bool(_) if has("boolean") => Fit::Exact,
            Value::Number(_) if has("number") => Fit::Exact,
            Value::Number(n) if has("integer") && in_range(schema, n) => Fit::Exact,
            Value::String(_) if has("string") => Fit::Exact,
            Value::Array(_) if has("array") => Fit::Exact,
            Value::Object(_) if has("object") => Fit::Exact,
            Value::Null | Value::Bool(_) | Value::Number(_) if has("string") => Fit::Lenient,
            Value::Null
                if (has("object") || has("array")) && self.index.scalar(path) == Some("") =>
            {
                Fit::Lenient
            }
            _ => Fit::No,
        }
    }

    /// Makes a leniently fitting value what serde_yaml would read it as.
    fn lenient(&self, schema: &Value, value: &mut Value, path: &str) {
        let types = types(schema);
        *value = match &*value {
            Value::Null if types.contains(&"object") => Value::Object(Map::new()),
            Value::Null if types.contains(&"array") => Value::Array(Vec::new()),
            other => Value::String(self.text(other, path).unwrap_or_default()),
        };
    }

    /// Reports `value` at `path` as fitting none of `schemas`, and repairs it.
    fn mismatch(&mut self, schemas: &[&Value], value: &mut Value, path: &str) {
        let constants: Vec<&Value> = schemas
            .iter()
            .filter_map(|s| allowed(s))
            .flatten()
            .collect();
        let only_constants = schemas
            .iter()
            .all(|s| allowed(s).is_some() || types(s) == ["null"]);
        let expected: Vec<String> = if only_constants && !constants.is_empty() {
            // An enum as alternatives of its constants: one list.
            vec![one_of(&constants)]
        } else {
            schemas.iter().filter_map(|s| describe(s)).collect()
        };
        let expected = match expected.len() {
            0 => "something else".to_owned(),
            _ => expected.join(" or "),
        };
        // Text that would read as what is wanted, had it not been quoted: `max: "5"`.
        let wanted = |t: &str| schemas.iter().any(|s| types(s).contains(&t));
        let quoted = match &*value {
            Value::String(s) => match yaml::parse_document(s) {
                Ok(Value::Number(_)) => wanted("number") || wanted("integer"),
                Ok(Value::Bool(_)) => wanted("boolean"),
                _ => false,
            },
            _ => false,
        };
        let found = match &*value {
            Value::Array(_) => "a list".to_owned(),
            Value::Object(_) => "a mapping".to_owned(),
            Value::Null if self.index.scalar(path) == Some("") => "nothing".to_owned(),
            Value::String(s) if quoted => format!("`\"{s}\"`"),
            other => format!("`{}`", self.text(other, path).unwrap_or_default()),
        };
        let mut message = format!("expected {expected}, found {found}");
        if quoted {
            message.push_str(": write it without quotes");
        }
        if let (Some(word), Value::String(_)) = (self.text(value, path), &*value) {
            let words = constants.iter().filter_map(|c| c.as_str());
            if let Some(near) = suggest::closest(&word, words) {
                message.push_str(&format!("; did you mean `{near}`?"));
            }
        }
        let at = self.index.get(path).or_else(|| self.index.nearest(path));
        self.issue(path, message, at);
        *value = placeholder(schemas);
    }

    fn issue(&mut self, path: &str, message: String, at: Option<Position>) {
        self.repaired.push(path.to_owned());
        self.issues.push(Issue {
            path: path.to_owned(),
            message,
            at,
        });
    }

    /// A scalar as written in the text when it is there (`0x10`, `1.50`), else as parsed.
    fn text(&self, value: &Value, path: &str) -> Option<String> {
        let parsed = match value {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            Value::Null => String::new(),
            Value::Array(_) | Value::Object(_) => return None,
        };
        Some(match (value, self.index.scalar(path)) {
            // A string is already as written (an alias to one is not indexed at all).
            (Value::String(_), _) | (_, None) => parsed,
            (_, Some(written)) => written.to_owned(),
        })
    }
}

/// The `type` of a schema, as a list.
fn types(schema: &Value) -> Vec<&str> {
    match schema.get("type") {
        Some(Value::String(t)) => vec![t.as_str()],
        Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    }
}

/// The values a schema allows (`enum`, `const`), when it lists them.
fn allowed(schema: &Value) -> Option<Vec<&Value>> {
    if let Some(values) = schema.get("enum").and_then(Value::as_array) {
        return Some(values.iter().collect());
    }
    schema.get("const").map(|c| vec![c])
}

/// Whether an integer is one, within `minimum` and `maximum`.
fn in_range(schema: &Value, n: &serde_json::Number) -> bool {
    let as_i128 = |n: &serde_json::Number| {
        n.as_u64()
            .map(i128::from)
            .or_else(|| n.as_i64().map(i128::from))
    };
    let Some(v) = as_i128(n) else {
        return false;
    };
    let bound = |key: &str| schema.get(key).and_then(Value::as_number).and_then(as_i128);
    bound("minimum").map_or(true, |min| v >= min) && bound("maximum").map_or(true, |max| v <= max)
}

/// What a schema wants, for a message: `a whole number from 0 to 65535`. None for null.
fn describe(schema: &Value) -> Option<String> {
    if let Some(values) = allowed(schema) {
        return Some(one_of(&values));
    }
    let kinds: Vec<String> = types(schema)
        .into_iter()
        .filter_map(|t| match t {
            "object" => Some("a mapping".to_owned()),
            "array" => Some("a list".to_owned()),
            "string" => Some("a string".to_owned()),
            "number" => Some("a number".to_owned()),
            "boolean" => Some("true or false".to_owned()),
            "integer" => Some(match (schema.get("minimum"), schema.get("maximum")) {
                (Some(min), Some(max)) => format!("a whole number from {min} to {max}"),
                (Some(min), None) => format!("a whole number of at least {min}"),
                (None, Some(max)) => format!("a whole number of at most {max}"),
                (None, None) => "a whole number".to_owned(),
            }),
            _ => None,
        })
        .collect();
    (!kinds.is_empty()).then(|| kinds.join(" or "))
}

/// `` one of `a`, `b` ``.
fn one_of(values: &[&Value]) -> String {
    let words: Vec<String> = values
        .iter()
        .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned))
        .collect();
    format!("one of {}", suggest::list(words.iter().map(String::as_str)))
}

/// What stands in for a value of the wrong type: null where allowed, else an empty or zero
/// value of the first type wanted.
fn placeholder(schemas: &[&Value]) -> Value {
    if schemas.iter().any(|s| types(s).contains(&"null")) {
        return Value::Null;
    }
    let Some(schema) = schemas.first() else {
        return Value::Null;
    };
    match types(schema).first().copied() {
        Some("object") => Value::Object(Map::new()),
        Some("array") => Value::Array(Vec::new()),
        Some("string") => Value::String(String::new()),
        Some("integer") => schema.get("minimum").cloned().unwrap_or(Value::from(0)),
        Some("number") => Value::from(0),
        Some("boolean") => Value::Bool(false),
        _ => Value::Null,
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

/// How deep a path is: its segments.
fn depth(path: &str) -> usize {
    path.matches(['.', '[']).count()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::file::FileConfig;
    use super::super::{locate, schema};
    use super::*;

    fn run(text: &str, schema: &Value) -> Checked {
        let document = yaml::parse_document(text).expect("parses");
        check(document, schema, &locate::index(text))
    }

    fn messages(checked: &Checked) -> Vec<String> {
        let mut out: Vec<_> = checked
            .issues
            .iter()
            .map(|i| format!("{}: {}", i.path, i.message))
            .collect();
        out.sort();
        out
    }

    /// The pass never refuses what serde_yaml reads into the file types, and lets nothing
    /// through that it would refuse; where both accept a file, serde reads the pass's
    /// document into the same config as the text.
    #[test]
    fn agrees_with_serde_yaml_on_what_the_file_types_accept() {
        let cases = [
            "defaults:\n",
            "defaults: ~\n",
            "defaults: null\n",
            "defaults: {}\n",
            "defaults: []\n",
            "upstreams:\n",
            "upstreams: ~\n",
            "upstreams: { app: }\n",
            "upstreams: { app: ~ }\n",
            "upstreams: { 1: { endpoints: [a] } }\n",
            "routes:\n",
            "routes: ~\n",
            "routes: [5]\n",
            "routes: [{ match: }]\n",
            "routes: [{ match: ~ }]\n",
            "listeners: [~]\n",
            "listeners: [{ tls: { alpn: [h2, ~, 1, true] } }]\n",
            "shutdown:\n",
            "shutdown: ~\n",
            "server_id: 123\n",
            "server_id: 1.50\n",
            "server_id: ~\n",
            "server_id: !tag x\n",
            "server_id: [x]\n",
            "defaults: { timeout: 30 }\n",
            "defaults: { timeout: [1] }\n",
            "defaults: { concurrency: { max: 0x10 } }\n",
            "defaults: { concurrency: { max: +5 } }\n",
            "defaults: { concurrency: { max: '5' } }\n",
            "defaults: { concurrency: { max: 1.0 } }\n",
            "defaults: { concurrency: { max: -1 } }\n",
            "defaults: { concurrency: { max: 4294967296 } }\n",
            "defaults: { concurrency: { max: 1_000 } }\n",
            "defaults: { circuit_breaker: { failure_ratio: 1 } }\n",
            "defaults: { circuit_breaker: { failure_ratio: '0.5' } }\n",
            "defaults: { circuit_breaker: { enabled: True } }\n",
            "defaults: { circuit_breaker: { enabled: yes } }\n",
            "defaults: { circuit_breaker: { failure_codes: [502, 65536] } }\n",
            "defaults: { <<: { timeout: 1s } }\n",
            "defaults: { timeout: &t 5s }\nshutdown: { drain_delay: *t }\n",
            "defaults: &d { timeout: 1s }\nroutes: [{ name: r, <<: *d }]\n",
            "colour: red\n",
            "- a\n",
            "5\n",
        ];
        for text in cases {
            let by_serde = yaml::parse::<FileConfig>(text);
            let checked = run(text, schema::cached());
            assert_eq!(
                checked.issues.is_empty(),
                by_serde.is_ok(),
                "{text:?}: serde says {by_serde:?}, the pass {:?}",
                checked.issues
            );
            if let Ok(file) = by_serde {
                let repaired: FileConfig = serde_json::from_value(checked.document)
                    .unwrap_or_else(|e| panic!("{text:?}: {e}"));
                assert_eq!(
                    serde_json::to_value(repaired).unwrap(),
                    serde_json::to_value(file).unwrap(),
                    "{text:?}"
                );
            }
        }
    }

    #[test]
    fn repairs_explain_what_is_found_at_and_below_them() {
        let checked = run("listeners: {}\nroutes: [{ name: [x] }]\n", schema::cached());
        assert!(checked.explains("listeners"));
        assert!(checked.explains("routes[0].name"));
        assert!(!checked.explains("routes[0].upstream"));
        assert!(!checked.explains("listeners_x"));
        assert_eq!(
            checked.document,
            json!({ "listeners": [], "routes": [{ "name": null }] })
        );
        let whole = run("[1]\n", schema::cached());
        assert!(
            whole.explains("routes[0].name"),
            "a repaired root explains all"
        );
    }

    /// Nothing in the pass is particular to spillway's config: any schema drives it, enums
    /// and required keys included (which the file types do not use today).
    #[test]
    fn any_schema_drives_it() {
        let schema = json!({
            "type": "object",
            "additionalProperties": false,
            "required": ["mode"],
            "properties": {
                "mode": { "type": "string", "enum": ["fast", "safe"] },
                "level": { "oneOf": [{ "const": "low" }, { "const": "high" }] },
                "sizes": { "type": "object", "additionalProperties": { "$ref": "#/$defs/Size" } },
            },
            "$defs": { "Size": { "type": "integer", "minimum": 1, "maximum": 9 } },
        });
        let checked = run("level: hihg\nsizes: { a: 3, b: 10 }\nmod: fast\n", &schema);
        assert_eq!(
            messages(&checked),
            [
                "level: expected one of `low`, `high`, found `hihg`; did you mean `high`?",
                "mod: unknown key; did you mean `mode`?",
                "mode: this key is required",
                "sizes.b: expected a whole number from 1 to 9, found `10`",
            ]
        );
        assert_eq!(
            messages(&run("mode: sfae\n", &schema)),
            ["mode: expected one of `fast`, `safe`, found `sfae`; did you mean `safe`?"]
        );
        assert!(run("mode: safe\nlevel: low\nsizes: { a: 9 }\n", &schema)
            .issues
            .is_empty());
    }
}
