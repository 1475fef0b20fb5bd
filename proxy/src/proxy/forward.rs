//! The request as it goes upstream: origin-form, on the path it was routed by (normalized, then
//! the route's prefix stripped), with the forwarding headers nginx users set by hand (`Host`
//! stays the client's; `X-Real-IP`, `X-Forwarded-For` appended, `X-Forwarded-Proto`,
//! `X-Forwarded-Host`; SPEC §3). What nginx drops is dropped: header names with underscores
//! (some app servers read `X_Forwarded_For` as `X-Forwarded-For`), and a `Content-Length`
//! sent twice (with one value; the door refuses differing ones) is forwarded once.

use super::ctx::RequestCtx;
use http::header;
use pingora::http::authority::{raw_target_authority, RawTargetAuthority};
use pingora::http::RequestHeader;
use pingora::prelude::*;
use pingora::proxy::Session;

/// Rewrite `req` (the copy of the client's request that goes upstream).
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
    if let RawTargetAuthority::Absolute {
        authority,
        path_and_query,
        ..
    } = raw_target_authority(req.raw_path())
    {
        let host = http::HeaderValue::from_bytes(authority).ok();
        let mut origin = Vec::with_capacity(path_and_query.len() + 1);
        if path_and_query.first() != Some(&b'/') {
            origin.push(b'/');
        }
        origin.extend_from_slice(path_and_query);
        target = Some(origin);
        if let Some(h) = host {
            req.insert_header(header::HOST, h)?;
        }
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
    if let Some(t) = target {
        req.set_raw_path(&t)?;
    }
    let underscored: Vec<http::HeaderName> = req
        .headers
        .keys()
        .filter(|n| n.as_str().contains('_'))
        .cloned()
        .collect();
    for n in underscored {
        req.remove_header(&n);
    }
    if req.headers.get_all(header::CONTENT_LENGTH).iter().count() > 1 {
        if let Some(v) = req.headers.get(header::CONTENT_LENGTH).cloned() {
            req.insert_header(header::CONTENT_LENGTH, v)?;
        }
    }
    let ip = session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip().to_string());
    if let Some(ip) = ip {
        let prior: Vec<&str> = session
            .req_header()
            .headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .collect();
        let xff = if prior.is_empty() {
            ip.clone()
        } else {
            format!("{}, {ip}", prior.join(", "))
        };
        req.insert_header("X-Forwarded-For", xff)?;
        req.insert_header("X-Real-IP", ip)?;
    }
    let tls = session.digest().is_some_and(|d| d.ssl_digest.is_some());
    req.insert_header("X-Forwarded-Proto", if tls { "https" } else { "http" })?;
    let host = req.headers.get(header::HOST).cloned();
    match host {
        Some(h) => {
            req.insert_header("X-Forwarded-Host", h)?;
        }
        None => {
            req.remove_header("X-Forwarded-Host");
        }
    }
    // The request id: the client's when well-formed (then this is the same value), else the
    // generated one in place of whatever the client sent.
    if let Some((name, value)) = &ctx.request_id {
        req.insert_header(name.clone(), value.clone())?;
    }
    Ok(())
}
