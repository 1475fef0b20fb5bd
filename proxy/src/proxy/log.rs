//! The end of a request (Pingora's `logging` hook, which runs on every exit path): stop
//! counting it in flight, count it in its pool's stats, write its access-log line.

use super::ctx::RequestCtx;
use super::reply::describe;
use crate::telemetry::access_log::{AccessLog, Entry};
use crate::upstream::stats::PoolStats;
use http::header;
use pingora::prelude::*;
use pingora::proxy::Session;
use pingora::ErrorSource;

/// What the end of a request records, however it was proxied (Pingora's session, or the fast
/// path's own).
pub(crate) struct Finished<'a> {
    /// The status sent, 499 when nothing was.
    pub(crate) status: u16,
    /// Response body bytes sent.
    pub(crate) bytes: usize,
    /// How it failed, as the access log's `error` field (`client_error`, or the cause with
    /// underscores); `None` when it did not.
    pub(crate) error: Option<&'a str>,
    /// The app had the whole request (or failed it): a missing response head counts in full.
    pub(crate) app_had_it: bool,
    pub(crate) client: Option<std::net::IpAddr>,
    pub(crate) method: &'a str,
    pub(crate) target: &'a str,
    pub(crate) version: &'a str,
    pub(crate) referer: Option<&'a str>,
    pub(crate) user_agent: Option<&'a str>,
    pub(crate) host: Option<&'a str>,
}

/// Account for a finished request. `unrouted` counts requests no pool took.
pub(crate) fn finish(
    session: &Session,
    e: Option<&Error>,
    ctx: &mut RequestCtx,
    unrouted: &PoolStats,
    access_log: &AccessLog,
) {
    // Nothing sent: the client went away first (nginx's 499).
    let status = session
        .response_written()
        .map(|r| r.status.as_u16())
        .filter(|s| *s > 0)
        .unwrap_or(499);
    let app_had_it = e.is_some_and(|e| *e.esource() == ErrorSource::Upstream) || ctx.request_sent;
    if !access_log.enabled() {
        let f = Finished {
            status,
            bytes: 0,
            error: None,
            app_had_it,
            client: None,
            method: "",
            target: "",
            version: "",
            referer: None,
            user_agent: None,
            host: None,
        };
        record(&f, ctx, unrouted, access_log);
        return;
    }
    let req = session.req_header();
    let header =
        |name: http::header::HeaderName| req.headers.get(name).and_then(|v| v.to_str().ok());
    let error = e.map(|e| match e.esource() {
        ErrorSource::Downstream => "client_error".to_string(),
        _ => ctx.cause.unwrap_or_else(|| describe(e)).replace(' ', "_"),
    });
    let f = Finished {
        status,
        bytes: session.as_ref().body_bytes_sent(),
        error: error.as_deref(),
        app_had_it,
        client: session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip()),
        method: req.method.as_str(),
        target: std::str::from_utf8(req.raw_path()).unwrap_or("-"),
        version: match req.version {
            http::Version::HTTP_10 => "HTTP/1.0",
            http::Version::HTTP_2 => "HTTP/2.0",
            _ => "HTTP/1.1",
        },
        referer: header(header::REFERER),
        user_agent: header(header::USER_AGENT),
        host: header(header::HOST),
    };
    record(&f, ctx, unrouted, access_log);
}

/// Account for a finished request described by `f`: stop counting it in flight, count it in
/// its pool's stats (or `unrouted`), write its access-log line.
pub(crate) fn record(
    f: &Finished,
    ctx: &mut RequestCtx,
    unrouted: &PoolStats,
    access_log: &AccessLog,
) {
    // The response is complete (or failed): stop counting the request as in flight now,
    // not when Pingora finally drops the context after closing or recycling the
    // connection — least_requests and drains see the instance as free a little sooner.
    // (The context's drop still releases it on the paths that skip this hook.)
    drop(ctx.guard.take());
    drop(ctx.pool_guard.take());
    let status = f.status;
    let elapsed = ctx.started.map(|t| t.elapsed()).unwrap_or_default();
    let pool = ctx
        .upstream
        .as_ref()
        .zip(ctx.pool)
        .map(|(u, pi)| &u.pools[pi]);
    // Time to the app's response head. A request the app had in full and never answered
    // (the read timed out, or the client gave up waiting) waited all its time for that head:
    // it counts in full, or a canary that hangs would look fast. One the *client* did not
    // finish sending (a stalled upload, a malformed body) says nothing about the app and is
    // left out, or anyone could send `X-Canary: true` with a body that never comes and roll
    // a healthy canary back for latency.
    let ttfb = match (ctx.started, ctx.response_at) {
        (Some(s), Some(r)) => Some(r.saturating_duration_since(s)),
        _ if pool.is_some() && f.app_had_it => Some(elapsed),
        _ => None,
    };
    match pool {
        Some(p) => &p.pool.stats,
        None => unrouted,
    }
    .observe(status, elapsed, ttfb);
    if !access_log.enabled() {
        return;
    }
    let instance = ctx.instance.as_ref().map(|i| i.label.as_str());
    access_log.log(&Entry {
        time: std::time::SystemTime::now(),
        client: f.client,
        method: f.method,
        target: f.target,
        version: f.version,
        status,
        bytes: f.bytes,
        referer: f.referer,
        user_agent: f.user_agent,
        host: f.host,
        duration: elapsed,
        upstream: ctx.upstream.as_ref().map(|u| u.name()),
        pool: pool.map(|p| p.pool.name.as_str()),
        instance,
        error: f.error,
        request_id: ctx.request_id.as_ref().and_then(|(_, v)| v.to_str().ok()),
    });
}
