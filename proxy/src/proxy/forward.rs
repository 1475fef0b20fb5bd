//! The request as it goes upstream: origin-form, on the path it was routed by (normalized, then
//! the route's prefix stripped), with the forwarding headers nginx users set by hand (`Host`
//! stays the client's; `X-Real-IP`, `X-Forwarded-For` appended, `X-Forwarded-Proto`,
//! `X-Forwarded-Host`; SPEC §3). What nginx drops is dropped: header names with underscores
//! (some app servers read `X_Forwarded_For` as `X-Forwarded-For`), and a `Content-Length`
//! sent twice (with one value; the door refuses differing ones) is forwarded once.

use super::ctx::RequestCtx;
use http::header::{self, HeaderName, HeaderValue};
use pingora::http::authority::{raw_target_authority, RawTargetAuthority};
use pingora::http::RequestHeader;
use pingora::prelude::*;
use pingora::proxy::Session;
use std::net::{IpAddr, Ipv4Addr};

/// Forwarding header names, built at compile time: `insert_header` with a name outside the
/// standard set parses it into a new `HeaderName` (a copy), keeps a clone of it in the
/// case-preserving map (another) and grows both maps, ~21 heap allocations per request for these
/// five headers (costbench, docs/PERFORMANCE.md).
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// The longest IPv4 address in dotted decimal (`255.255.255.255`).
pub(super) const IPV4_TEXT_MAX: usize = 15;

/// `ip` in dotted decimal, as its `Display` writes it, into `buf`. Written out because the
/// formatting machinery cost ~1,300 instructions and a `String` per request (costbench,
/// docs/PERFORMANCE.md), a tenth of this module's work.
pub(super) fn ipv4_text(ip: Ipv4Addr, buf: &mut [u8; IPV4_TEXT_MAX]) -> &[u8] {
    let mut n = 0;
    for (i, octet) in ip.octets().into_iter().enumerate() {
        if i > 0 {
            buf[n] = b'.';
            n += 1;
        }
        if octet >= 100 {
            buf[n] = b'0' + octet / 100;
            n += 1;
        }
        if octet >= 10 {
            buf[n] = b'0' + octet / 10 % 10;
            n += 1;
        }
        buf[n] = b'0' + octet % 10;
        n += 1;
    }
    &buf[..n]
}

/// Rewrite `req` (the copy of the client's request that goes upstream).
///
/// The header map is edited directly, without Pingora's case-preserving name map: header names
/// go to the app as Pingora writes a map without one (`Host`, `Content-Type`, `Content-Length`,
/// `Connection`, ... — its 12 titled names — and every other name lowercase, as HTTP/2 always
/// sends them) instead of the client's spelling. Header names are case-insensitive
/// (RFC 9110 §5.1) and Tomcat, Jetty and Undertow compare them so.
pub(crate) fn upstream_request(
    session: &Session,
    req: &mut RequestHeader,
    ctx: &RequestCtx,
) -> Result<()> {
    // Absolute-form (`GET http://host/path`): the authority is the Host (RFC 9112 §3.2.2), and
    // upstream gets origin-form. Pingora keeps the whole URL as the raw target and only its
    // path in `uri` (what the deny list and the routes saw), so take both from the raw target
    // with Pingora's own classifier: the path sent is then the path that was checked.
    let mut target: Option<Vec<u8>> = None;
    let mut host_from_target: Option<HeaderValue> = None;
    if let RawTargetAuthority::Absolute {
        authority,
        path_and_query,
        ..
    } = raw_target_authority(req.raw_path())
    {
        host_from_target = HeaderValue::from_bytes(authority).ok();
        let mut origin = Vec::with_capacity(path_and_query.len() + 1);
        if path_and_query.first() != Some(&b'/') {
            origin.push(b'/');
        }
        origin.extend_from_slice(path_and_query);
        target = Some(origin);
    }
    if let Some(norm) = &ctx.normalized {
        let query = req.uri.query();
        let mut t = norm.as_bytes().to_vec();
        if let Some(q) = query {
            t.push(b'?');
            t.extend_from_slice(q.as_bytes());
        }
        target = Some(t);
    }
    if let (Some(snap), Some(ri)) = (&ctx.snapshot, ctx.route) {
        if let Some(route) = snap.routes.get(ri) {
            let current = target.as_deref().unwrap_or(req.raw_path());
            if let Some(path) = route.rewrite(current) {
                target = Some(path);
            }
        }
    }
    // The raw target survives the round trip through `Parts` only when it is the URI's own
    // origin form; keep it otherwise (rare: bytes the URI normalizes).
    if target.is_none()
        && req.uri.path_and_query().map(|p| p.as_str().as_bytes()) != Some(req.raw_path())
    {
        target = Some(req.raw_path().to_vec());
    }
    let end_stream = req.send_end_stream();
    let (placeholder, ()) = http::Request::new(()).into_parts();
    let mut parts: http::request::Parts =
        std::mem::replace(req, RequestHeader::from(placeholder)).into();
    let headers = &mut parts.headers;
    // Room for what is added below: one growth at most.
    headers.reserve(5);
    if let Some(h) = host_from_target {
        headers.insert(header::HOST, h);
    }
    if headers.keys().any(|n| n.as_str().contains('_')) {
        let underscored: Vec<HeaderName> = headers
            .keys()
            .filter(|n| n.as_str().contains('_'))
            .cloned()
            .collect();
        for n in underscored {
            headers.remove(&n);
        }
    }
    if headers.get_all(header::CONTENT_LENGTH).iter().count() > 1 {
        if let Some(v) = headers.get(header::CONTENT_LENGTH).cloned() {
            headers.insert(header::CONTENT_LENGTH, v);
        }
    }
    if let Some(ip) = session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip())
    {
        let mut buf = [0u8; IPV4_TEXT_MAX];
        let v6_text;
        let text: &[u8] = match ip {
            IpAddr::V4(v4) => ipv4_text(v4, &mut buf),
            IpAddr::V6(v6) => {
                v6_text = v6.to_string();
                v6_text.as_bytes()
            }
        };
        let prior: Vec<&str> = session
            .req_header()
            .headers
            .get_all(&X_FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .collect();
        // Fail closed: never forward the client's own list unchanged.
        let xff = if prior.is_empty() {
            HeaderValue::from_bytes(text)
        } else {
            let mut list = prior.join(", ").into_bytes();
            list.extend_from_slice(b", ");
            list.extend_from_slice(text);
            HeaderValue::try_from(list)
        }
        .or_err(ErrorType::InvalidHTTPHeader, "cannot build X-Forwarded-For")?;
        headers.insert(X_FORWARDED_FOR, xff);
        if let Ok(v) = HeaderValue::from_bytes(text) {
            headers.insert(X_REAL_IP, v);
        }
    }
    let tls = session.digest().is_some_and(|d| d.ssl_digest.is_some());
    headers.insert(
        X_FORWARDED_PROTO,
        HeaderValue::from_static(if tls { "https" } else { "http" }),
    );
    match headers.get(header::HOST).cloned() {
        Some(h) => {
            headers.insert(X_FORWARDED_HOST, h);
        }
        None => {
            headers.remove(&X_FORWARDED_HOST);
        }
    }
    // The request id: the client's when well-formed (then this is the same value), else the
    // generated one in place of whatever the client sent.
    // (Lowercase to the app, like every name outside Pingora's titled set; the response keeps
    // the configured spelling.)
    if let (Some((_, value)), Some(snap)) = (&ctx.request_id, &ctx.snapshot) {
        headers.insert(snap.request_id.clone(), value.clone());
    }
    *req = RequestHeader::from(parts);
    if let Some(t) = target {
        req.set_raw_path(&t)?;
    }
    if let Some(e) = end_stream {
        req.set_send_end_stream(e);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_text_is_what_display_writes() {
        let mut rng = fastrand::Rng::with_seed(14);
        let edges = [
            [0, 0, 0, 0],
            [255, 255, 255, 255],
            [127, 0, 0, 1],
            [10, 0, 100, 9],
            [1, 20, 3, 199],
            [9, 10, 99, 100],
        ];
        let random = (0..10_000).map(|_| rng.u32(..).to_be_bytes());
        for octets in edges.into_iter().chain(random) {
            let ip = Ipv4Addr::from(octets);
            let mut buf = [0u8; IPV4_TEXT_MAX];
            assert_eq!(ipv4_text(ip, &mut buf), ip.to_string().as_bytes(), "{ip}");
        }
    }
}
