//! Errors that name the offending field: every problem is reported as `path: message`, where
//! `path` is the YAML path (`upstreams.app.pools.green[1]`), so `switchyard check` and
//! `proxyctl reload` can print all problems at once and the user fixes them in one pass.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::PathBuf;

/// A path into the YAML document, displayed the way users write it: `routes[2].upstream`.
///
/// Map keys that are not plain identifiers are quoted (`upstreams."my.app"`), so a dot in a
/// name cannot be mistaken for nesting.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct FieldPath(String);

impl FieldPath {
    /// The document root (displays as an empty string).
    pub fn root() -> Self {
        FieldPath(String::new())
    }

    /// This path extended by a map key.
    pub fn key(&self, key: &str) -> Self {
        let plain = !key.is_empty()
            && key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        let mut s = self.0.clone();
        if !s.is_empty() {
            s.push('.');
        }
        if plain {
            s.push_str(key);
        } else {
            s.push_str(&format!("{key:?}"));
        }
        FieldPath(s)
    }

    /// This path extended by a sequence index.
    pub fn index(&self, i: usize) -> Self {
        FieldPath(format!("{}[{i}]", self.0))
    }

    /// The path as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<&str> for FieldPath {
    fn from(s: &str) -> Self {
        FieldPath(s.to_string())
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One problem in a config file: where, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldError {
    /// Where in the document (empty for the document as a whole).
    pub path: FieldPath,
    /// What is wrong, naming the offending value.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.as_str().is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Why a config could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The YAML could not be parsed into the schema (syntax error, wrong type, unknown key).
    /// serde stops at the first such error, so there is exactly one.
    #[error("{0}")]
    Parse(FieldError),
    /// The YAML parsed but its values are invalid; every problem found is listed.
    #[error("{}", display_lines(.0))]
    Invalid(Vec<FieldError>),
}

fn display_lines(errs: &[FieldError]) -> String {
    errs.iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

impl ConfigError {
    /// Every problem as a `FieldError` (a read error becomes one with an empty path).
    pub fn field_errors(&self) -> Vec<FieldError> {
        match self {
            ConfigError::Read { .. } => vec![FieldError {
                path: FieldPath::root(),
                message: self.to_string(),
            }],
            ConfigError::Parse(e) => vec![e.clone()],
            ConfigError::Invalid(errs) => errs.clone(),
        }
    }
}

/// Collects problems during validation instead of stopping at the first one.
#[derive(Debug, Default)]
pub(crate) struct Errors(Vec<FieldError>);

impl Errors {
    pub(crate) fn push(&mut self, path: FieldPath, message: impl Into<String>) {
        self.0.push(FieldError {
            path,
            message: message.into(),
        });
    }

    /// `Err(Invalid)` if anything was collected.
    pub(crate) fn finish(self) -> Result<(), ConfigError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(self.0))
        }
    }
}
