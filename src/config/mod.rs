//! Configuration: the file as written ([`file`]) is parsed, environment-expanded and validated
//! into typed [`Settings`]; every mistake is reported with its field path and, where known, the
//! line and column it stands on.

mod build;
pub(crate) mod defaults;
mod env;
pub mod file;
mod locate;
pub(crate) mod matching;
mod schema;
pub mod settings;
mod shape;
mod suggest;
mod summary;
mod yaml;

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

pub use schema::{key_paths, schema};
pub use settings::*;

/// The header timeout when no listener gives one.
pub(crate) const DEFAULT_HEADER_TIMEOUT: std::time::Duration = defaults::HEADER_TIMEOUT;
pub use summary::summary;

/// One problem found in a config file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ConfigError {
    /// Field path, e.g. `routes[1].upstream`; empty when the problem is the whole file.
    pub path: String,
    /// What is wrong, for a human.
    pub message: String,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// 1-based column, when known.
    pub column: Option<usize>,
    /// A suggestion (`did you mean `timeout`?`), printed after the location.
    pub hint: Option<String>,
}

/// How a suggestion is introduced in a message built as one string.
const HINT: &str = "; did you mean ";

impl ConfigError {
    /// An error at `path` (empty for the whole file), not yet located in the text. A message
    /// that ends in `; did you mean …?` keeps that part as the [`hint`](Self::hint), so the
    /// location comes first: `defaults.timout: unknown key (line 7, column 3); did you mean
    /// `timeout`?`.
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> ConfigError {
        let mut message = message.into();
        let hint = message.find(HINT).map(|at| {
            let hint = message[at + 2..].to_owned();
            message.truncate(at);
            hint
        });
        ConfigError {
            path: path.into(),
            message,
            line: None,
            column: None,
            hint,
        }
    }

    /// The same error, located at `line` and `column` (1-based) when they are known.
    pub fn at(self, line: Option<usize>, column: Option<usize>) -> ConfigError {
        ConfigError {
            line,
            column,
            ..self
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.message)?;
        } else {
            write!(f, "{}: {}", self.path, self.message)?;
        }
        match (self.line, self.column) {
            (Some(l), Some(c)) => write!(f, " (line {l}, column {c})")?,
            (Some(l), None) => write!(f, " (line {l})")?,
            _ => {}
        }
        match &self.hint {
            Some(hint) => write!(f, "; {hint}"),
            None => Ok(()),
        }
    }
}

/// Every problem found in a config file (never empty).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// A successfully validated config.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The typed settings.
    pub settings: Settings,
    /// Short hash of the expanded file text: the version shown by `/config` and reloads.
    pub version: String,
    /// Things that are allowed but probably wrong (e.g. a route shadowed by an earlier one).
    pub warnings: Vec<String>,
}

/// The variables `${VAR}` expands from: the process environment, with overrides on top (the
/// demo passes its sample app's address this way; the process environment is never written).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Env {
    overrides: BTreeMap<String, String>,
}

impl Env {
    /// The process environment, plus `name` set to `value`.
    pub fn with(mut self, name: &str, value: impl Into<String>) -> Env {
        self.overrides.insert(name.to_owned(), value.into());
        self
    }

    /// The value of `name`.
    fn lookup(&self, name: &str) -> Option<String> {
        match self.overrides.get(name) {
            Some(v) => Some(v.clone()),
            None => std::env::var(name).ok(),
        }
    }
}

/// Reads a config file's text.
pub fn read_file(path: &Path) -> Result<String, ConfigErrors> {
    std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError::new(
            "",
            format!("cannot read {}: {e}", path.display()),
        )])
    })
}

/// A hash of a config file's bytes, to tell whether the file changed since it was last read.
pub fn file_hash(text: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    h.finish()
}

/// Reads, expands, parses and validates a config file.
pub fn load_file(path: &Path) -> Result<Loaded, ConfigErrors> {
    load_str(&read_file(path)?)
}

/// Expands, parses and validates config text, expanding from the process environment.
pub fn load_str(text: &str) -> Result<Loaded, ConfigErrors> {
    load_str_with(text, &Env::default())
}

/// Expands (with `env`), parses and validates config text.
pub fn load_str_with(text: &str, env: &Env) -> Result<Loaded, ConfigErrors> {
    build::load_str_with_env(text, |name| env.lookup(name))
}
