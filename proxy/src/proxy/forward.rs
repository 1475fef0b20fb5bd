//! The request as it goes upstream: the route's path rewrite and the forwarding headers nginx
//! users set by hand (`Host` stays the client's; `X-Real-IP`, `X-Forwarded-For` appended,
//! `X-Forwarded-Proto`, `X-Forwarded-Host`; SPEC §3).

use super::ctx::RequestCtx;
use http::header;
use pingora::http::RequestHeader;
use pingora::prelude::*;
use pingora::proxy::Session;

/// Rewrite `req` (the copy of the client's request that goes upstream).
pub(crate) fn upstream_request(
    session: &Session,
    req: &mut RequestHeader,
    ctx: &RequestCtx,
) -> Result<()> {
    if let (Some(snap), Some(ri)) = (&ctx.snapshot, ctx.route) {
        if let Some(route) = snap.routes.get(ri) {
            if let Some(path) = route.rewrite(req.raw_path()) {
                req.set_raw_path(&path)?;
            }
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
    let host = session
        .req_header()
        .headers
        .get(header::HOST)
        .cloned()
        .or_else(|| {
            session
                .req_header()
                .uri
                .authority()
                .and_then(|a| http::HeaderValue::from_str(a.as_str()).ok())
        });
    match host {
        Some(h) => {
            req.insert_header("X-Forwarded-Host", h)?;
        }
        None => {
            req.remove_header("X-Forwarded-Host");
        }
    }
    Ok(())
}
