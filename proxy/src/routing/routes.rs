//! The route table: which upstream a request goes to, and how its path is rewritten.
//!
//! Routes match by host (if the route names one: nginx's `server_name`, exact or `*.suffix`)
//! and path prefix, in file order, first match wins (SPEC §3). Built once per config and kept
//! in the routing snapshot, so matching allocates nothing.

use switchyard_config::{HostMatch, RouteConfig};

/// One compiled route.
#[derive(Debug, Clone)]
pub struct Route {
    /// The host it is for (any when `None`).
    host: Option<HostMatch>,
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
    /// Whether any route names a host (else the request's host is not even looked at).
    by_host: bool,
}

impl RouteTable {
    /// Build from config routes; `upstream_index` maps an upstream name to its index (the
    /// config is validated, so every name resolves; an unknown one would route to index 0).
    pub fn new(routes: &[RouteConfig], upstream_index: impl Fn(&str) -> usize) -> Self {
        RouteTable {
            by_host: routes.iter().any(|r| r.host.is_some()),
            routes: routes
                .iter()
                .map(|r| Route {
                    host: r.host.clone(),
                    prefix: r.path_prefix.clone(),
                    upstream: upstream_index(&r.upstream),
                    strip: r
                        .strip_prefix
                        .then(|| r.path_prefix.trim_end_matches('/').len()),
                })
                .collect(),
        }
    }

    /// Whether any route names a host.
    pub fn by_host(&self) -> bool {
        self.by_host
    }

    /// The first route for `host` (see [`request_host`]; `None`: unknown, only routes without
    /// a host match) whose prefix matches `path` (the path without the query). A prefix
    /// ending in `/` also matches the path without that slash (`/backend` for `/backend/`),
    /// where nginx would answer with a redirect.
    pub fn find(&self, host: Option<&[u8]>, path: &[u8]) -> Option<(usize, &Route)> {
        self.routes.iter().enumerate().find(|(_, r)| {
            let host_ok = match (&r.host, host) {
                (None, _) => true,
                (Some(want), Some(h)) => want.matches(h),
                (Some(_), None) => false,
            };
            let p = r.prefix.as_bytes();
            host_ok
                && (path.starts_with(p)
                    || (p.len() > 1 && p.ends_with(b"/") && path == &p[..p.len() - 1]))
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

/// The host a request is for, as routes match it: the Host header's (or the request target's
/// authority, for absolute-form and h2) name without its port or a trailing dot, in lower case,
/// written into `buf`. `None` when there is none or it is longer than a host name can be.
pub(crate) fn request_host<'a>(authority: &[u8], buf: &'a mut [u8; 253]) -> Option<&'a [u8]> {
    let name = if authority.first() == Some(&b'[') {
        // An IPv6 literal: up to and including the bracket.
        let end = authority.iter().position(|b| *b == b']')?;
        &authority[..=end]
    } else {
        match authority.iter().position(|b| *b == b':') {
            Some(i) => &authority[..i],
            None => authority,
        }
    };
    let name = name.strip_suffix(b".").unwrap_or(name);
    if name.is_empty() || name.len() > buf.len() {
        return None;
    }
    let out = &mut buf[..name.len()];
    for (o, b) in out.iter_mut().zip(name) {
        *o = b.to_ascii_lowercase();
    }
    Some(out)
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
                host: None,
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
        let (i, r) = t.find(None, b"/backend/users").unwrap();
        assert_eq!(i, 0);
        assert_eq!(r.rewrite(b"/backend/users?id=1").unwrap(), b"/users?id=1");
        assert_eq!(r.rewrite(b"/backend/").unwrap(), b"/");
        assert_eq!(t.find(None, b"/backend").unwrap().0, 0);
        assert_eq!(r.rewrite(b"/backend").unwrap(), b"/");
        assert_eq!(r.rewrite(b"/backend?x=1").unwrap(), b"/?x=1");
        let (i, r) = t.find(None, b"/api/v1").unwrap();
        assert_eq!((i, r.upstream), (1, 1));
        assert_eq!(r.rewrite(b"/api/v1"), None);
        assert_eq!(t.find(None, b"/backendx").unwrap().0, 2);
        assert_eq!(t.find(None, b"/").unwrap().0, 2);
    }

    #[test]
    fn no_match_without_catch_all() {
        let t = table(&[("/backend/", "app", true)]);
        assert!(t.find(None, b"/other").is_none());
        assert!(t.find(None, b"/back").is_none());
    }

    #[test]
    fn hosts_exact_and_wildcard_then_any() {
        let route = |h: Option<&str>, p: &str, u: &str| RouteConfig {
            host: h.map(|h| HostMatch::parse(h).unwrap()),
            path_prefix: p.into(),
            upstream: u.into(),
            strip_prefix: false,
        };
        let t = RouteTable::new(
            &[
                route(Some("api.example.com"), "/", "api"),
                route(Some("*.example.com"), "/", "app"),
                route(None, "/static/", "app"),
            ],
            |name| if name == "api" { 1 } else { 0 },
        );
        assert!(t.by_host());
        let mut buf = [0u8; 253];
        let mut find = |authority: &str, path: &str| {
            let h = request_host(authority.as_bytes(), &mut buf).map(|h| h.to_vec());
            t.find(h.as_deref(), path.as_bytes()).map(|(i, _)| i)
        };
        assert_eq!(find("API.Example.com:8443", "/x"), Some(0));
        assert_eq!(find("api.example.com.", "/x"), Some(0));
        assert_eq!(find("www.example.com", "/x"), Some(1));
        assert_eq!(find("a.b.example.com", "/x"), Some(1));
        // The bare domain is not a subdomain; unknown hosts reach only host-less routes.
        assert_eq!(find("example.com", "/x"), None);
        assert_eq!(find("example.com", "/static/a"), Some(2));
        assert_eq!(find("[::1]:8080", "/static/a"), Some(2));
        assert_eq!(find("", "/x"), None);
        assert_eq!(
            request_host(b"[::1]:8080", &mut [0u8; 253]),
            Some(&b"[::1]"[..])
        );
        let long = "a".repeat(300);
        assert_eq!(request_host(long.as_bytes(), &mut [0u8; 253]), None);
    }
}
