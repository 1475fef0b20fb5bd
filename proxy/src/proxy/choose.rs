//! Reading a request for the pool decision (SPEC §4): the preview header from an allowed
//! address, the force header, the sticky bucket from the cookie or the named header. The
//! decision itself is `routing::decide`; this is the part that looks at the request, with
//! header names resolved when the upstream state was built, so nothing here allocates.

use crate::routing::decide::{Facts, Rule};
use crate::routing::sticky::{header_bucket, StickyBy, StickyKey};
use crate::upstream::UpstreamState;
use http::HeaderMap;
use std::net::IpAddr;

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
pub(crate) fn choose(
    up: &UpstreamState,
    key: &StickyKey,
    headers: &HeaderMap,
    client: Option<IpAddr>,
) -> Choice {
    let names = up.header_names();
    let mut facts = Facts::default();
    let mut preview_refused = false;
    if let Some(v) = names.preview.as_ref().and_then(|n| headers.get(n)) {
        let allowed = client.is_some_and(|ip| {
            let ip = canonical(ip);
            up.config.preview.allow_from.iter().any(|n| n.contains(&ip))
        });
        if allowed {
            // A name that is no pool of this upstream is ignored like an absent header.
            facts.preview = up.pool_named(v.as_bytes().trim_ascii());
        } else {
            preview_refused = true;
        }
    }
    let mut set_cookie = None;
    // Without a canary every rule below leads to the main pool: skip the work.
    if up.canary_active() {
        if let Some(v) = names.force.as_ref().and_then(|n| headers.get(n)) {
            let v = v.as_bytes().trim_ascii();
            if v.eq_ignore_ascii_case(b"true") {
                facts.force = Some(true);
            } else if v.eq_ignore_ascii_case(b"false") {
                facts.force = Some(false);
            }
        }
        match &names.sticky {
            StickyBy::None => {}
            StickyBy::Header(n) => {
                facts.bucket = headers.get(n).map(|v| header_bucket(v.as_bytes()));
            }
            StickyBy::Cookie => {
                let cookies = headers
                    .get_all(http::header::COOKIE)
                    .iter()
                    .map(|v| v.as_bytes());
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
