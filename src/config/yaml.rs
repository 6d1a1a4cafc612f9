//! The one place serde_yaml is used: text in, typed value or one located [`ConfigError`] out;
//! or text in and the document as a JSON value out, for a pass that looks at all of it.
//!
//! serde_yaml reports errors as `path: message at line L column C`; that is split into the
//! error's `path`, `message`, `line` and `column` so that every config error prints alike.

use std::fmt;

use serde::de::{DeserializeOwned, EnumAccess, MapAccess, SeqAccess, VariantAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::{Map, Number, Value};

use super::ConfigError;

/// Parses YAML text into `T`, turning a serde_yaml error into a located [`ConfigError`].
///
/// A document with no content (blank, only comments, or `null`) is the error "config is empty"
/// rather than serde_yaml's less helpful "EOF while parsing a value".
pub(crate) fn parse<T: DeserializeOwned>(text: &str) -> Result<T, ConfigError> {
    // Parsed into a `Value` first only to tell "empty" apart; the typed parse below is the one
    // whose errors carry field paths.
    match serde_yaml::from_str::<serde_yaml::Value>(text) {
        Ok(serde_yaml::Value::Null) => return Err(empty()),
        Ok(_) => {}
        Err(e) => return Err(convert(&e)),
    }
    serde_yaml::from_str(text).map_err(|e| convert(&e))
}

/// Parses YAML text into a JSON value, as serde_yaml reads it: its rules decide what a plain
/// scalar is (`~` is null, `0x10` a number, `yes` a string), tags are dropped, and a
/// non-string key is written out (`1` -> `"1"`). Unlike [`parse`], a key given twice is no
/// error: the last is kept, as the caller reports every repeated key itself. A float that JSON
/// cannot hold (`.inf`, `.nan`) becomes the string YAML writes for it.
///
/// Empty documents and syntax errors are errors as in [`parse`].
pub(crate) fn parse_document(text: &str) -> Result<Value, ConfigError> {
    match serde_yaml::from_str::<Document>(text) {
        Ok(Document(Value::Null)) => Err(empty()),
        Ok(Document(value)) => Ok(value),
        Err(e) => Err(convert(&e)),
    }
}

/// A YAML node as a JSON value, built by serde_yaml's `deserialize_any`.
struct Document(Value);

impl<'de> Deserialize<'de> for Document {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(DocumentVisitor).map(Document)
    }
}

struct DocumentVisitor;

impl<'de> Visitor<'de> for DocumentVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_i128<E>(self, v: i128) -> Result<Value, E> {
        Ok(i64::try_from(v).map_or_else(|_| Value::String(v.to_string()), Value::from))
    }

    fn visit_u128<E>(self, v: u128) -> Result<Value, E> {
        Ok(u64::try_from(v).map_or_else(|_| Value::String(v.to_string()), Value::from))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(match Number::from_f64(v) {
            Some(n) => Value::Number(n),
            None if v.is_nan() => Value::String(".nan".into()),
            None if v > 0.0 => Value::String(".inf".into()),
            None => Value::String("-.inf".into()),
        })
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        Document::deserialize(deserializer).map(|d| d.0)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(Document(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some((Document(key), Document(value))) = map.next_entry()? {
            let key = match key {
                Value::String(s) => s,
                // A collection as a key: never a config field (locate.rs calls it `?` too).
                Value::Array(_) | Value::Object(_) => "?".to_owned(),
                other => other.to_string(),
            };
            out.insert(key, value);
        }
        Ok(Value::Object(out))
    }

    /// A tagged value (`!tag value`): the value.
    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<Value, A::Error> {
        let (_tag, value): (serde::de::IgnoredAny, _) = data.variant()?;
        value.newtype_variant::<Document>().map(|d| d.0)
    }
}

fn empty() -> ConfigError {
    ConfigError::new("", "config is empty")
}

/// Splits serde_yaml's rendering of an error into path, message and location.
fn convert(err: &serde_yaml::Error) -> ConfigError {
    let location = err.location();
    let mut text = err.to_string();
    if let Some(loc) = &location {
        // serde_yaml appends the location it also returns; keep it only in line/column.
        let suffix = format!(" at line {} column {}", loc.line(), loc.column());
        if let Some(at) = text.find(&suffix) {
            text.replace_range(at..at + suffix.len(), "");
        }
    }
    let (path, message) = split_path(&text);
    ConfigError::new(path, message).at(
        location.as_ref().map(|l| l.line()),
        location.as_ref().map(|l| l.column()),
    )
}

/// `routes[0].match: unknown field ...` -> (`routes[0].match`, `unknown field ...`).
///
/// Only a leading run of path characters counts as a path, so messages that merely contain a
/// colon ("invalid type: string ...") are left whole.
fn split_path(text: &str) -> (&str, &str) {
    if let Some((head, rest)) = text.split_once(": ") {
        let is_path = !head.is_empty()
            && head
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '[' | ']'));
        if is_path {
            return (head, rest);
        }
    }
    ("", text)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Doc {
        #[allow(dead_code)]
        items: Vec<Item>,
        #[allow(dead_code)]
        #[serde(default)]
        named: BTreeMap<String, Item>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Item {
        #[allow(dead_code)]
        size: Option<u32>,
    }

    #[test]
    fn nested_unknown_field_is_split_into_path_message_and_location() {
        let text = "items:\n  - size: 1\n  - size: 2\n    colour: red\n";
        let err = parse::<Doc>(text).unwrap_err();
        assert_eq!(err.path, "items[1]");
        assert_eq!(err.message, "unknown field `colour`, expected `size`");
        assert_eq!((err.line, err.column), (Some(4), Some(5)));
        assert_eq!(
            err.to_string(),
            "items[1]: unknown field `colour`, expected `size` (line 4, column 5)"
        );
    }

    #[test]
    fn map_keys_appear_in_the_path() {
        let text = "items: []\nnamed:\n  app: { size: -1 }\n";
        let err = parse::<Doc>(text).unwrap_err();
        assert_eq!(err.path, "named.app.size");
        assert_eq!(err.message, "invalid type: integer `-1`, expected u32");
        assert_eq!(err.line, Some(3));
    }

    #[test]
    fn top_level_errors_have_an_empty_path() {
        let err = parse::<Doc>("items: []\nextra: 1\n").unwrap_err();
        assert_eq!(err.path, "");
        assert!(
            err.message.starts_with("unknown field `extra`"),
            "{}",
            err.message
        );
        assert!(!err.message.contains(" at line "), "{}", err.message);
        assert_eq!(err.line, Some(2));

        let err = parse::<Doc>("named: {}\n").unwrap_err();
        assert_eq!(err.path, "");
        assert!(
            err.message.starts_with("missing field `items`"),
            "{}",
            err.message
        );
    }

    #[test]
    fn syntax_errors_are_located() {
        let err = parse::<Doc>("items: [\n  { size: 1 }\n").unwrap_err();
        assert_eq!(err.path, "");
        assert!(err.line.is_some());
        assert!(!err
            .message
            .contains(&format!(" at line {} column", err.line.unwrap())));
    }

    #[test]
    fn empty_documents_are_an_error() {
        for text in ["", "\n\n", "# only a comment\n", "---\n", "null\n"] {
            let err = parse::<Doc>(text).unwrap_err();
            assert_eq!(err.message, "config is empty", "{text:?}");
            assert_eq!(err.path, "");
            let err = parse_document(text).unwrap_err();
            assert_eq!(err.message, "config is empty", "{text:?}");
        }
    }

    #[test]
    fn documents_read_scalars_as_serde_yaml_does() {
        let text = "\
a: ~
b:
c: 0x10
d: '5'
e: 1.50
f: yes
g: true
h: [1, -2, .inf, .nan]
i: !custom tagged
j: !!str 7
1: numeric key
k: { x: 1 }
";
        let doc = parse_document(text).unwrap();
        let expected = serde_json::json!({
            "a": null, "b": null, "c": 16, "d": "5", "e": 1.5, "f": "yes", "g": true,
            "h": [1, -2, ".inf", ".nan"], "i": "tagged", "j": "7", "1": "numeric key",
            "k": { "x": 1 },
        });
        assert_eq!(doc, expected);
    }

    #[test]
    fn documents_keep_the_last_of_a_repeated_key() {
        let doc = parse_document("a: 1\nb: 2\na: 3\n").unwrap();
        assert_eq!(doc, serde_json::json!({ "a": 3, "b": 2 }));
        // `parse` refuses the same text.
        assert!(parse::<serde_json::Value>("a: 1\na: 3\n").is_err());
    }

    #[test]
    fn document_syntax_errors_are_located() {
        let err = parse_document("items: [\n  { size: 1 }\n").unwrap_err();
        assert!(err.line.is_some(), "{err}");
    }
}
