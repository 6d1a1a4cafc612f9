//! The one place serde_yaml is used: text in, typed value or one located [`ConfigError`] out.
//!
//! serde_yaml reports errors as `path: message at line L column C`; that is split into the
//! error's `path`, `message`, `line` and `column` so that every config error prints alike.

use serde::de::DeserializeOwned;

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
        }
    }
}
