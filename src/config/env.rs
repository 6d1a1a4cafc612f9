//! `${VAR}` and `${VAR:-default}` expansion of the raw config text, before YAML parsing.
//!
//! Expanding text rather than parsed values lets a variable stand anywhere a value can (a port
//! inside an address, a whole list), at the price that a value is inserted verbatim: one holding
//! YAML syntax (`: `, `#`) should be quoted in the file. `$${` is a literal `${`; any other `$`
//! is left alone. Whole-line comments are copied untouched, so a commented-out line may name
//! a variable that is not set.
//!
//! Positions found later in the expanded text are mapped back to the file with [`Expanded`],
//! so that an error after `${HOST}` on the same line still points at the right column.

use super::ConfigError;

/// The expanded text and what is needed to map its positions back to the original.
#[derive(Debug, Clone)]
pub(crate) struct Expanded {
    /// The text with every reference replaced.
    pub text: String,
    /// Replaced spans in order: `(expanded start, expanded end, original start, original end)`
    /// in bytes.
    spans: Vec<(usize, usize, usize, usize)>,
    original: String,
}

impl Expanded {
    /// Maps a 1-based line and column (in chars) of the expanded text to the original text.
    /// A position inside a substituted value maps to the `$` of its reference.
    pub(crate) fn original_position(&self, line: usize, column: usize) -> (usize, usize) {
        if self.spans.is_empty() {
            return (line, column);
        }
        let Some(offset) = byte_offset(&self.text, line, column) else {
            return (line, column);
        };
        let idx = self.spans.partition_point(|s| s.0 <= offset);
        let original = match idx.checked_sub(1).map(|i| self.spans[i]) {
            None => offset,
            Some((_, exp_end, orig_start, _)) if offset < exp_end => orig_start,
            Some((_, exp_end, _, orig_end)) => orig_end + (offset - exp_end),
        };
        line_column(&self.original, original)
    }
}

/// The byte offset of a 1-based line and char column, if it lies within `text`.
fn byte_offset(text: &str, line: usize, column: usize) -> Option<usize> {
    let mut start = 0;
    for _ in 1..line {
        start += text[start..].find('\n')? + 1;
    }
    let rest = &text[start..];
    let line_text = &rest[..rest.find('\n').unwrap_or(rest.len())];
    // A column one past the end is where "end of line" errors point.
    let within = line_text
        .char_indices()
        .map(|(i, _)| i)
        .chain(std::iter::once(line_text.len()))
        .nth(column.checked_sub(1)?)?;
    Some(start + within)
}

/// 1-based line and char column of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

/// Expands every reference in `text`, looking variables up with `lookup` (the process
/// environment in production, a fixed table in tests). Every unset variable without a
/// default, and every malformed reference, is reported, each with its line and column.
pub(crate) fn expand(
    text: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<Expanded, Vec<ConfigError>> {
    let mut out = String::with_capacity(text.len());
    let mut spans = Vec::new();
    let mut errors = Vec::new();
    let mut line_start = 0;
    for line in text.split_inclusive('\n') {
        if line.trim_start().starts_with('#') {
            out.push_str(line);
        } else {
            expand_line(
                line,
                line_start,
                text,
                &lookup,
                &mut out,
                &mut spans,
                &mut errors,
            );
        }
        line_start += line.len();
    }
    if errors.is_empty() {
        Ok(Expanded {
            text: out,
            spans,
            original: text.to_owned(),
        })
    } else {
        Err(errors)
    }
}

fn expand_line(
    line: &str,
    line_start: usize,
    text: &str,
    lookup: &impl Fn(&str) -> Option<String>,
    out: &mut String,
    spans: &mut Vec<(usize, usize, usize, usize)>,
    errors: &mut Vec<ConfigError>,
) {
    let mut rest = line;
    let mut pos = line_start;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        pos += i;
        rest = &rest[i..];
        let (consumed, replacement) = if rest.starts_with("$${") {
            (3, Ok("${".to_owned()))
        } else if let Some(body) = rest.strip_prefix("${") {
            match body.find('}') {
                Some(end) => (end + 3, resolve(&body[..end], lookup)),
                None => (
                    rest.len(),
                    Err("unterminated `${`: expected `}` on the same line".into()),
                ),
            }
        } else {
            out.push('$');
            pos += 1;
            rest = &rest[1..];
            continue;
        };
        match replacement {
            Ok(value) => {
                spans.push((out.len(), out.len() + value.len(), pos, pos + consumed));
                out.push_str(&value);
            }
            Err(message) => {
                let (line, column) = line_column(text, pos);
                errors.push(ConfigError::new("", message).at(Some(line), Some(column)));
            }
        }
        pos += consumed;
        rest = &rest[consumed..];
    }
    out.push_str(rest);
}

/// The value of one reference body (`VAR` or `VAR:-default`).
fn resolve(body: &str, lookup: &impl Fn(&str) -> Option<String>) -> Result<String, String> {
    let (name, default) = match body.split_once(":-") {
        Some((name, default)) => (name, Some(default)),
        None => (body, None),
    };
    let valid = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        return Err(format!(
            "`${{{body}}}` is not a valid reference: write ${{NAME}} or ${{NAME:-default}}, \
             NAME made of letters, digits and _ (use $${{ for a literal ${{)"
        ));
    }
    // An empty variable counts as unset when a default is given, as in the shell's `:-`.
    match (lookup(name), default) {
        (Some(v), Some(d)) if v.is_empty() => Ok(d.to_owned()),
        (Some(v), _) => Ok(v),
        (None, Some(d)) => Ok(d.to_owned()),
        (None, None) => Err(format!(
            "environment variable {name} is not set (use ${{{name}:-default}})"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "HOST" => Some("10.0.0.7".into()),
            "PORT" => Some("8080".into()),
            "EMPTY" => Some(String::new()),
            "LONG_VALUE" => Some("abcdefghijklmnopqrstuvwxyz".into()),
            _ => None,
        }
    }

    fn ok(text: &str) -> String {
        expand(text, env).unwrap().text
    }

    #[test]
    fn set_variables_are_substituted() {
        assert_eq!(ok("address: ${HOST}:${PORT}\n"), "address: 10.0.0.7:8080\n");
        assert_eq!(ok("a: ${PORT:-9}"), "a: 8080");
    }

    #[test]
    fn defaults_apply_to_unset_and_empty_variables() {
        assert_eq!(ok("id: ${POD_NAME:-spillway}"), "id: spillway");
        assert_eq!(ok("id: ${EMPTY:-fallback}"), "id: fallback");
        assert_eq!(ok("id: ${POD_NAME:-}"), "id: ");
        assert_eq!(ok("id: '${EMPTY}'"), "id: ''");
        assert_eq!(ok("u: ${POD_NAME:-http://a:1/x}"), "u: http://a:1/x");
    }

    #[test]
    fn dollars_that_are_not_references_are_kept() {
        assert_eq!(ok("a: $${HOST} $HOST $ $$ x$"), "a: ${HOST} $HOST $ $$ x$");
        // Scanning is left to right: a lone `$`, then an escaped `${`.
        assert_eq!(ok("a: $$${HOST}"), "a: $${HOST}");
    }

    #[test]
    fn whole_line_comments_are_not_expanded() {
        assert_eq!(ok("  # old: ${GONE}\na: 1\n"), "  # old: ${GONE}\na: 1\n");
    }

    #[test]
    fn every_unset_variable_is_reported_with_its_position() {
        let errors = expand("a: 1\nid: ${POD_NAME}\nx: [${A}, ${HOST}, ${B}]\n", env).unwrap_err();
        let got: Vec<_> = errors
            .iter()
            .map(|e| (e.path.as_str(), e.message.as_str(), e.line, e.column))
            .collect();
        assert_eq!(
            got,
            [
                (
                    "",
                    "environment variable POD_NAME is not set (use ${POD_NAME:-default})",
                    Some(2),
                    Some(5)
                ),
                (
                    "",
                    "environment variable A is not set (use ${A:-default})",
                    Some(3),
                    Some(5)
                ),
                (
                    "",
                    "environment variable B is not set (use ${B:-default})",
                    Some(3),
                    Some(20)
                ),
            ]
        );
    }

    #[test]
    fn malformed_references_are_errors() {
        let errors = expand("a: ${}\nb: ${1X}\nc: ${OPEN\n", env).unwrap_err();
        assert_eq!(errors.len(), 3);
        assert!(
            errors[0].message.contains("not a valid reference"),
            "{}",
            errors[0].message
        );
        assert_eq!((errors[1].line, errors[1].column), (Some(2), Some(4)));
        assert!(
            errors[2].message.starts_with("unterminated"),
            "{}",
            errors[2].message
        );
    }

    #[test]
    fn positions_map_back_to_the_original_text() {
        let text = "a: ${LONG_VALUE} b: x\nc: ${POD:-\u{e9}} d\ne: f\n";
        let expanded = expand(text, env).unwrap();
        assert_eq!(
            expanded.text,
            "a: abcdefghijklmnopqrstuvwxyz b: x\nc: \u{e9} d\ne: f\n"
        );
        // `x` after the long value.
        assert_eq!(expanded.original_position(1, 34), (1, 21));
        // Inside the substituted value: the reference itself.
        assert_eq!(expanded.original_position(1, 10), (1, 4));
        // Before any substitution on the line, and on untouched lines.
        assert_eq!(expanded.original_position(1, 1), (1, 1));
        assert_eq!(expanded.original_position(2, 6), (2, 14));
        assert_eq!(expanded.original_position(3, 4), (3, 4));
    }
}
