//! The deny list: paths the proxy answers itself (SPEC §3 `deny`), never forwarded.
//!
//! Checked before routing, on the (normalized) path as sent, and on it fully percent-decoded
//! with dot segments resolved again — as nginx sees `/public/..%2Fadmin`: `/admin`.

use percent_encoding::percent_decode_str;
use switchyard_config::DenyConfig;

/// Paths answered by the proxy with `status`.
#[derive(Debug, Clone)]
pub struct DenyList {
    pub(crate) status: u16,
    set: Option<regex::RegexSet>,
}

impl DenyList {
    pub fn new(cfg: &DenyConfig) -> Self {
        // The patterns compiled one by one during validation, so the set compiles too; if it
        // somehow did not, deny nothing rather than panic, and say so.
        let set = if cfg.paths.is_empty() {
            None
        } else {
            match regex::RegexSet::new(cfg.paths.iter().map(|r| r.as_str())) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::error!(error = %e, "deny patterns failed to compile as a set; deny list disabled");
                    None
                }
            }
        };
        DenyList {
            status: cfg.status,
            set,
        }
    }

    /// Whether `path` (without query) is denied. The patterns are tried on the path as sent and
    /// percent-decoded, so `/%61ctuator` is caught by a pattern for `/actuator`.
    pub fn denies(&self, path: &str) -> bool {
        let Some(set) = &self.set else { return false };
        if set.is_match(path) {
            return true;
        }
        if path.contains('%') {
            let decoded = percent_decode_str(path).decode_utf8_lossy();
            if set.is_match(&decoded) {
                return true;
            }
            // Decoding `%2F` may make new dot segments (`/public/..%2Fadmin`).
            if let std::borrow::Cow::Owned(resolved) = super::normalize::normalize(&decoded) {
                return set.is_match(&resolved);
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deny_is_case_insensitive_and_sees_through_percent_encoding() {
        let d = DenyList::new(&DenyConfig {
            status: 403,
            paths: vec![regex::Regex::new("(?i)/(phpinfo|actuator|\\.aws)").unwrap()],
        });
        assert!(d.denies("/actuator/env"));
        assert!(d.denies("/ACTUATOR/env"));
        assert!(d.denies("/backend/actuator"));
        assert!(d.denies("/%61ctuator/env"));
        assert!(d.denies("/x/.aws/credentials"));
        assert!(!d.denies("/users"));
        assert!(!d.denies("/actuat%"));
        // An anchored pattern sees through an encoded slash that makes a dot segment.
        let anchored = DenyList::new(&DenyConfig {
            status: 403,
            paths: vec![regex::Regex::new("^/admin").unwrap()],
        });
        assert!(anchored.denies("/public/..%2Fadmin"));
        assert!(anchored.denies("/public/%2e%2e%2fadmin/x"));
        assert!(!anchored.denies("/public/admin"));
        let none = DenyList::new(&DenyConfig {
            status: 403,
            paths: vec![],
        });
        assert!(!none.denies("/actuator"));
    }
}
