//! Reading a request for the pool decision (SPEC §4): the preview header from an allowed
//! address, the force header, the sticky bucket from the cookie or the named header. The
//! decision itself is `routing::decide`; this is the part that looks at the request, with
//! header names resolved when the upstream state was built, so nothing here allocates.

use crate::routing::decide::{Facts, Rule};
use crate::routing::sticky::{header_bucket, StickyBy, StickyKey};
use crate::upstream::UpstreamState;
use http::{HeaderMap, HeaderName};
use std::net::IpAddr;

/// A request's headers as the decision reads them: Pingora's header map, or the fast path's
/// parsed head (`fast`), which has no map (building one costs allocations per header).
pub(crate) trait ReqHeaders {
    /// The first value of `name`.
    fn value(&self, name: &HeaderName) -> Option<&[u8]>;
    /// Every value of `name`, in order.
    fn values<'a>(&'a self, name: &'a HeaderName) -> impl Iterator<Item = &'a [u8]> + 'a;
}

impl ReqHeaders for HeaderMap {
    fn value(&self, name: &HeaderName) -> Option<&[u8]> {
        self.get(name).map(|v| v.as_bytes())
    }

    fn values<'a>(&'a self, name: &'a HeaderName) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.get_all(name).iter().map(|v| v.as_bytes())
    }
}

impl ReqHeaders for [httparse::Header<'_>] {
    fn value(&self, name: &HeaderName) -> Option<&[u8]> {
        self.iter()
            .find(|h| h.name.eq_ignore_ascii_case(name.as_str()))
            .map(|h| h.value)
    }

    fn values<'a>(&'a self, name: &'a HeaderName) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name.as_str()))
            .map(|h| h.value)
    }
}

/// The pool a request goes to, and what else the decision implies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Choice {
    /// Pool index.
    pub(crate) pool: usize,
    /// The rule that decided.
    pub(crate) rule: Rule,
    /// A bucket assigned now (no valid cookie): send it as a cookie with the response.
    pub(crate) set_cookie: Option<u8>,
    /// The preview header came from an address not in `preview.allow_from` (ignored).
    pub(crate) preview_refused: bool,
}

/// Decide the pool of a request to `up` from its headers and the client's address.
pub(crate) fn choose<H: ReqHeaders + ?Sized>(
    up: &UpstreamState,
    key: &StickyKey,
    headers: &H,
    client: Option<IpAddr>,
) -> Choice {
    let names = up.header_names();
    let mut facts = Facts::default();
    let mut preview_refused = false;
    if let Some(v) = names.preview.as_ref().and_then(|n| headers.value(n)) {
        let allowed = client.is_some_and(|ip| {
            let ip = canonical(ip);
            up.config.preview.allow_from.iter().any(|n| n.contains(&ip))
        });
        if allowed {
            // A name that is no pool of this upstream is ignored like an absent header.
            facts.preview = up.pool_named(v.trim_ascii());
        } else {
            preview_refused = true;
        }
    }
    let mut set_cookie = None;
    // Without a canary every rule below leads to the main pool: skip the work.
    if up.canary_active() {
        if let Some(v) = names.force.as_ref().and_then(|n| headers.value(n)) {
            let v = v.trim_ascii();
            if v.eq_ignore_ascii_case(b"true") {
                facts.force = Some(true);
            } else if v.eq_ignore_ascii_case(b"false") {
                facts.force = Some(false);
            }
        }
        match &names.sticky {
            StickyBy::None => {}
            StickyBy::Header(n) => {
                facts.bucket = headers.value(n).map(header_bucket);
            }
            StickyBy::Cookie => {
                let cookies = headers.values(&http::header::COOKIE);
                facts.bucket = key.bucket_in_cookies(&up.config.canary.cookie, cookies);
                if facts.bucket.is_none() {
                    let b = up.first_sight(fastrand::u32(..));
                    facts.bucket = Some(b);
                    set_cookie = Some(b);
                }
            }
        }
    }
    let (pool, rule) = up.decide(&facts);
    Choice {
        pool,
        rule,
        set_cookie,
        preview_refused,
    }
}

/// An IPv4 client seen on a dual-stack socket (`::ffff:10.0.0.1`) is matched as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}
