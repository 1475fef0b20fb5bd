//! switchyard's configuration: the YAML schema of SPEC §3, parsed and validated.
//!
//! Two layers, as in ripgrep's `LowArgs -> HiArgs`: [`raw`] mirrors the file (serde,
//! `deny_unknown_fields`), and [`validate`] turns it into the typed [`Config`] with defaults
//! filled in and every cross-reference checked. Validation collects *all* problems, each with
//! its field path (`upstreams.app.pools.green[1]: "10.0.0.5" is not host:port`), so
//! `switchyard check` and `proxyctl reload` can show everything that is wrong at once.
//!
//! This crate has no tokio and no Pingora: it compiles and tests in seconds.
//!
//! # Layout
//! - [`raw`]: the serde mirror of the file; its field docs are the reference manual.
//! - `model`: the validated [`Config`] and its parts.
//! - `validate`: raw -> typed, with defaults.
//! - `error`: [`FieldPath`], [`FieldError`], [`ConfigError`].
//! - [`nginx`]: `switchyard import-nginx`, nginx.conf to this schema.

#![deny(missing_docs)]

mod error;
mod model;
pub mod nginx;
pub mod raw;
mod validate;

pub use error::{ConfigError, FieldError, FieldPath};
pub use model::*;
pub use validate::{check_steps, validate, DEFAULT_STEPS};

use std::path::Path;

/// Parse YAML text into the raw schema. The YAML crate is used only here, so replacing the
/// deprecated `serde_yaml` with a maintained fork touches one function.
///
/// Type errors carry the field path and the YAML line/column:
/// `upstreams.app.retries: invalid type: string "two", expected u32 at line 7 column 14`.
pub fn from_yaml_str(text: &str) -> Result<raw::Config, ConfigError> {
    if text.trim().is_empty() {
        // An empty document is an empty mapping; validation then lists what is missing.
        return Ok(raw::Config::default());
    }
    let de = serde_yaml::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { String::new() } else { path };
        // serde_yaml prefixes its message with its own (shorter) path; keep only ours.
        let message = e.into_inner().to_string();
        let message = match message.split_once(": ") {
            Some((prefix, rest)) if !prefix.contains(' ') && path.starts_with(prefix) => {
                rest.to_string()
            }
            _ => message,
        };
        ConfigError::Parse(FieldError {
            path: FieldPath::from(path.as_str()),
            message,
        })
    })
}

/// Parse and validate YAML text.
pub fn parse(text: &str) -> Result<Config, ConfigError> {
    validate(from_yaml_str(text)?)
}

/// Read, parse and validate a config file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&text)
}

impl Config {
    /// A one-line summary for `switchyard check`.
    pub fn summary(&self) -> String {
        let pools: usize = self.upstreams.iter().map(|u| u.pools.len()).sum();
        let instances: usize = self
            .upstreams
            .iter()
            .flat_map(|u| &u.pools)
            .map(|p| p.instances.len())
            .sum();
        format!(
            "configuration is valid: {} listener(s), {} upstream(s), {} pool(s), {} instance(s), {} route(s), {} deny pattern(s)",
            self.listen.len(),
            self.upstreams.len(),
            pools,
            instances,
            self.routes.len(),
            self.deny.paths.len()
        )
    }
}
