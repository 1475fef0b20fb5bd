//! The route table: which upstream a request goes to, and how its path is rewritten.
//!
//! Routes match by path prefix in file order, first match wins (SPEC §3). Built once per
//! config and kept in the routing snapshot, so matching allocates nothing.

use switchyard_config::RouteConfig;

/// One compiled route.
#[derive(Debug, Clone)]
pub struct Route {
    /// The prefix as configured, e.g. `/backend/`.
    pub(crate) prefix: String,
    /// Index of the upstream in the snapshot.
    pub(crate) upstream: usize,
    /// Bytes to cut from the front of the path when `strip_prefix` is set: the prefix without
    /// its trailing slash, so `/backend/x` keeps `/x`.
    strip: Option<usize>,
}

/// Routes in file order.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    routes: Vec<Route>,
}

impl RouteTable {
    /// Build from config routes; `upstream_index` maps an upstream name to its index (the
    /// config is validated, so every name resolves; an unknown one would route to index 0).
    pub fn new(routes: &[RouteConfig], upstream_index: impl Fn(&str) -> usize) -> Self {
        RouteTable {
            routes: routes
                .iter()
                .map(|r| Route {
                    prefix: r.path_prefix.clone(),
                    upstream: upstream_index(&r.upstream),
                    strip: r
                        .strip_prefix
                        .then(|| r.path_prefix.trim_end_matches('/').len()),
                })
                .collect(),
        }
    }

    /// The first route whose prefix matches `path` (the path without the query). A prefix
    /// ending in `/` also matches the path without that slash (`/backend` for `/backend/`),
    /// where nginx would answer with a redirect.
    pub fn find(&self, path: &[u8]) -> Option<(usize, &Route)> {
        self.routes.iter().enumerate().find(|(_, r)| {
            let p = r.prefix.as_bytes();
            path.starts_with(p) || (p.len() > 1 && p.ends_with(b"/") && path == &p[..p.len() - 1])
        })
    }

    /// The route at `index`.
    pub(crate) fn get(&self, index: usize) -> Option<&Route> {
        self.routes.get(index)
    }

    /// Number of routes.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.routes.len()
    }
}

impl Route {
    /// The path+query to send upstream, or `None` if it is unchanged. `raw` is the request
    /// target as sent (`/backend/users?id=1`); the result keeps the query and always starts
    /// with `/` (`/users?id=1`, `/backend` -> `/`, `/backend?x` -> `/?x`).
    pub fn rewrite(&self, raw: &[u8]) -> Option<Vec<u8>> {
        let n = self.strip?;
        let rest = raw.get(n..)?;
        let mut out = Vec::with_capacity(rest.len() + 1);
        if rest.first() != Some(&b'/') {
            out.push(b'/');
        }
        out.extend_from_slice(rest);
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(routes: &[(&str, &str, bool)]) -> RouteTable {
        let cfg: Vec<RouteConfig> = routes
            .iter()
            .map(|(p, u, s)| RouteConfig {
                path_prefix: p.to_string(),
                upstream: u.to_string(),
                strip_prefix: *s,
            })
            .collect();
        RouteTable::new(&cfg, |name| if name == "api" { 1 } else { 0 })
    }

    #[test]
    fn first_match_wins_and_strip_keeps_query() {
        let t = table(&[
            ("/backend/", "app", true),
            ("/api/", "api", false),
            ("/", "app", false),
        ]);
        assert_eq!(t.len(), 3);
        let (i, r) = t.find(b"/backend/users").unwrap();
        assert_eq!(i, 0);
        assert_eq!(r.rewrite(b"/backend/users?id=1").unwrap(), b"/users?id=1");
        assert_eq!(r.rewrite(b"/backend/").unwrap(), b"/");
        assert_eq!(t.find(b"/backend").unwrap().0, 0);
        assert_eq!(r.rewrite(b"/backend").unwrap(), b"/");
        assert_eq!(r.rewrite(b"/backend?x=1").unwrap(), b"/?x=1");
        let (i, r) = t.find(b"/api/v1").unwrap();
        assert_eq!((i, r.upstream), (1, 1));
        assert_eq!(r.rewrite(b"/api/v1"), None);
        assert_eq!(t.find(b"/backendx").unwrap().0, 2);
        assert_eq!(t.find(b"/").unwrap().0, 2);
    }

    #[test]
    fn no_match_without_catch_all() {
        let t = table(&[("/backend/", "app", true)]);
        assert!(t.find(b"/other").is_none());
        assert!(t.find(b"/back").is_none());
    }
}
