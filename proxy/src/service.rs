//! The Pingora `ProxyHttp` implementation: the request path.
//!
//! Per request: `request_filter` loads the routing snapshot once, answers denied paths and
//! unrouted requests itself, and binds the request to a pool by weight. `upstream_peer` picks
//! an instance of that pool (called again on each retry, with the same snapshot and pool), and
//! an `InflightGuard` in the context counts the request on the pool and instance until the
//! context is dropped — after `logging`, on every exit path, including client aborts.
//! `upstream_request_filter` rewrites the path and sets the forwarding headers.

use crate::access_log::{AccessLog, Entry};
use crate::events::{self, EventLog};
use crate::metrics::Metrics;
use crate::snapshot::{Shared, Snapshot};
use crate::upstream::health::now_ms;
use crate::upstream::{Candidates, Instance, Pool, PoolState, UpstreamState};
use async_trait::async_trait;
use bytes::Bytes;
use http::{header, Method};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::{ErrorSource, RetryType};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// The proxy logic, shared by every worker thread.
#[derive(Debug)]
pub(crate) struct Switchyard {
    /// Requests being processed (the shutdown drain waits for 0).
    pub(crate) active: Arc<std::sync::atomic::AtomicUsize>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) events: Arc<EventLog>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) access_log: Arc<AccessLog>,
}

/// Counts one request on a pool and an instance while it exists (SPEC §4.3: "pool blue has
/// drained" is an observable fact). Dropped with the request context on every exit path.
#[derive(Debug)]
pub(crate) struct InflightGuard {
    pool: Arc<Pool>,
    instance: Arc<Instance>,
}

impl InflightGuard {
    fn new(pool: Arc<Pool>, instance: Arc<Instance>) -> Self {
        pool.inflight.fetch_add(1, Ordering::AcqRel);
        instance.inflight.fetch_add(1, Ordering::AcqRel);
        InflightGuard { pool, instance }
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.pool.inflight.fetch_sub(1, Ordering::AcqRel);
        self.instance.inflight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Counts a request in `Switchyard::active` while it exists.
#[derive(Debug)]
pub(crate) struct ActiveGuard(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Per-request state.
#[derive(Debug, Default)]
pub(crate) struct RequestCtx {
    /// Keeps the request counted as active.
    _active: Option<ActiveGuard>,
    /// When the request head had been read.
    started: Option<std::time::Instant>,
    /// The snapshot this request is routed by (loaded once).
    snapshot: Option<Arc<Snapshot>>,
    /// Index of the matched route.
    route: Option<usize>,
    /// The upstream state of the matched route (from `snapshot`).
    upstream: Option<Arc<UpstreamState>>,
    /// The pool this request is bound to.
    pool: Option<usize>,
    /// Instance ids already tried.
    tried: Vec<u64>,
    /// Attempts on distinct instances (connects or fresh-connection failures).
    attempts: u32,
    /// Retries caused by stale pooled connections (not counted in `attempts`).
    stale_retries: u32,
    /// Counts this request as in flight on its pool/instance.
    guard: Option<InflightGuard>,
    /// The instance of the current attempt.
    instance: Option<Arc<Instance>>,
    /// Why the last attempt failed, in words a client may see (never an address).
    cause: Option<&'static str>,
}

/// Bound on retries caused by stale pooled upstream connections: after an upstream restart
/// every idle connection to it is dead, and each retry may draw another one.
const MAX_STALE_RETRIES: u32 = 3;

fn err_status(code: u16, why: &'static str) -> Box<Error> {
    Error::explain(ErrorType::HTTPStatus(code), why)
}

/// A short, address-free description of an upstream failure.
fn describe(e: &Error) -> &'static str {
    match e.etype() {
        ErrorType::ConnectRefused => "connection refused",
        ErrorType::ConnectTimedout => "connect timeout",
        ErrorType::ConnectNoRoute => "no route to host",
        ErrorType::ReadTimedout => "upstream read timeout",
        ErrorType::WriteTimedout => "upstream write timeout",
        ErrorType::ConnectionClosed | ErrorType::ReadError | ErrorType::WriteError => {
            "upstream closed the connection"
        }
        ErrorType::ConnectError | ErrorType::BindError | ErrorType::SocketError => "cannot connect",
        _ => "upstream error",
    }
}

fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

impl Switchyard {
    /// Log (once per transition) that a pool has no usable instance and is tried whole.
    fn note_fail_open(&self, up: &UpstreamState, pool: &PoolState, fail_open: bool) {
        let flag = &pool.pool.fail_open;
        if flag.load(Ordering::Relaxed) == fail_open
            || flag.swap(fail_open, Ordering::AcqRel) == fail_open
        {
            return;
        }
        let msg = if fail_open {
            tracing::warn!(upstream = %up.name(), pool = %pool.pool.name, "no healthy instance: failing open, trying all instances");
            format!(
                "{}/{}: no healthy instance, failing open (trying all instances)",
                up.name(),
                pool.pool.name
            )
        } else {
            tracing::info!(upstream = %up.name(), pool = %pool.pool.name, "healthy instances again: fail-open over");
            format!(
                "{}/{}: healthy instances again, fail-open over",
                up.name(),
                pool.pool.name
            )
        };
        let mut r = events::record("fail_open", "proxy", msg);
        r.upstream = Some(up.name().to_string());
        r.pool = Some(pool.pool.name.clone());
        self.events.record(r);
    }

    /// Passive health: the current attempt failed (connect error, broken connection, 502-504).
    /// Ejects the instance after `passive.consecutive_failures` in a row, unless it is the last
    /// usable instance of its pool.
    fn passive_failure(&self, ctx: &RequestCtx) {
        let (Some(up), Some(pi), Some(inst)) = (&ctx.upstream, ctx.pool, &ctx.instance) else {
            return;
        };
        let cfg = &up.config.passive;
        if cfg.consecutive_failures == 0 {
            return;
        }
        let n = inst.health.record_failure();
        if n < cfg.consecutive_failures {
            return;
        }
        let now = now_ms();
        let pool = &up.pools[pi];
        let others = pool
            .instances
            .iter()
            .any(|i| i.id != inst.id && i.current_addr().is_some() && i.health.usable(now));
        if !others {
            tracing::debug!(instance = %inst.label, "not ejecting the last usable instance of the pool");
            return;
        }
        let until = now + cfg.eject_for.as_millis() as u64;
        if inst.health.eject(until, now) {
            tracing::warn!(upstream = %up.name(), pool = %pool.pool.name, instance = %inst.label, failures = n, eject_for = ?cfg.eject_for, "instance ejected after failures in a row");
            let mut r = events::record(
                "eject",
                "proxy",
                format!(
                    "{}/{} {}: ejected for {}s after {n} failures in a row",
                    up.name(),
                    pool.pool.name,
                    inst.label,
                    cfg.eject_for.as_secs()
                ),
            );
            r.upstream = Some(up.name().to_string());
            r.pool = Some(pool.pool.name.clone());
            r.instance = Some(inst.label.clone());
            self.events.record(r);
        }
    }

    /// Answer a request ourselves (deny, no route, errors).
    async fn respond(session: &mut Session, status: u16, text: &str) -> Result<()> {
        if session.req_header().method != Method::HEAD && !session.is_body_empty() {
            // Don't drain an unread (possibly huge) upload just to keep the connection.
            session.set_keepalive(None);
        }
        let body = Bytes::from(format!("{text}\n"));
        let mut resp = ResponseHeader::build(status, Some(4))?;
        resp.insert_header(header::CONTENT_TYPE, "text/plain; charset=utf-8")?;
        resp.insert_header(header::CONTENT_LENGTH, body.len().to_string())?;
        resp.insert_header(header::CACHE_CONTROL, "no-store")?;
        let head_only = session.req_header().method == Method::HEAD;
        session
            .write_response_header(Box::new(resp), head_only)
            .await?;
        if !head_only {
            session.write_response_body(Some(body), true).await?;
        }
        Ok(())
    }
}

#[async_trait]
impl ProxyHttp for Switchyard {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> Self::CTX {
        self.active.fetch_add(1, Ordering::AcqRel);
        RequestCtx {
            _active: Some(ActiveGuard(self.active.clone())),
            started: Some(std::time::Instant::now()),
            ..Default::default()
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Self::CTX) -> Result<bool> {
        let snap = self.shared.load();
        let ka = snap.config.keepalive_timeout;
        session.set_keepalive((!ka.is_zero()).then(|| ka.as_secs().max(1)));

        let path = session.req_header().uri.path();
        if snap.deny.denies(path) {
            let status = snap.deny.status;
            let text = http::StatusCode::from_u16(status)
                .ok()
                .and_then(|s| s.canonical_reason())
                .unwrap_or("Denied");
            Self::respond(session, status, &format!("{status} {text}")).await?;
            return Ok(true);
        }
        let Some((route_idx, route)) = snap.routes.find(path.as_bytes()) else {
            Self::respond(session, 404, "404 Not Found: no route for this path").await?;
            return Ok(true);
        };
        let upstream = snap.upstreams[route.upstream].clone();
        ctx.pool = Some(upstream.pick_pool());
        ctx.route = Some(route_idx);
        ctx.upstream = Some(upstream);
        ctx.snapshot = Some(snap);

        if session.is_upgrade_req() {
            // An upgraded (WebSocket) connection may be quiet for long; it ends when either
            // side closes, not after the HTTP read timeout.
            session.set_read_timeout(None);
        }
        Ok(false)
    }

    async fn upstream_peer(
        &self,
        session: &mut Session,
        ctx: &mut Self::CTX,
    ) -> Result<Box<HttpPeer>> {
        let (Some(up), Some(pool_idx)) = (ctx.upstream.clone(), ctx.pool) else {
            return Err(err_status(500, "request was not routed"));
        };
        let pool = &up.pools[pool_idx];
        let inst = match pool.pick(up.config.balance, &ctx.tried, now_ms()) {
            Candidates::Found { inst, fail_open } => {
                self.note_fail_open(&up, pool, fail_open);
                inst.clone()
            }
            Candidates::Exhausted => {
                return Err(err_status(
                    502,
                    ctx.cause.unwrap_or("no instance reachable"),
                ))
            }
            Candidates::Unresolved => {
                ctx.cause = Some("upstream address could not be resolved");
                return Err(err_status(502, "upstream address could not be resolved"));
            }
            Candidates::Empty => {
                ctx.cause = Some("no instances configured");
                return Err(err_status(502, "pool has no instances"));
            }
        };
        let Some(addr) = inst.current_addr() else {
            ctx.cause = Some("upstream address could not be resolved");
            return Err(err_status(502, "upstream address could not be resolved"));
        };
        ctx.attempts += 1;
        ctx.tried.push(inst.id);
        ctx.guard = Some(InflightGuard::new(pool.pool.clone(), inst.clone()));
        ctx.instance = Some(inst.clone());

        let cfg = &up.config;
        let mut peer = Box::new(HttpPeer::new(addr, false, String::new()));
        // Connection-reuse key: the pool's epoch (bumped when it loses all weight) and the
        // instance's identity, so connections opened before a drain are never reused.
        peer.group_key = pool.epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ inst.id;
        let o = &mut peer.options;
        o.connection_timeout = Some(cfg.connect_timeout);
        o.idle_timeout = Some(cfg.idle_timeout);
        if session.is_upgrade_req() {
            o.read_timeout = None;
            o.write_timeout = None;
        } else {
            o.read_timeout = Some(cfg.read_timeout);
            o.write_timeout = Some(cfg.read_timeout);
        }
        Ok(peer)
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        req: &mut RequestHeader,
        ctx: &mut Self::CTX,
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

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        match resp.status.as_u16() {
            502..=504 => self.passive_failure(ctx),
            _ => {
                if let Some(i) = &ctx.instance {
                    i.health.record_success();
                }
            }
        }
        Ok(())
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Self::CTX,
        mut e: Box<Error>,
    ) -> Box<Error> {
        ctx.cause = Some(describe(&e));
        self.passive_failure(ctx);
        // Nothing was sent: always safe to try another instance of the same pool.
        let retries = ctx.upstream.as_ref().map_or(0, |u| u.config.retries);
        e.set_retry(ctx.attempts <= retries);
        e
    }

    fn error_while_proxy(
        &self,
        _peer: &HttpPeer,
        session: &mut Session,
        mut e: Box<Error>,
        ctx: &mut Self::CTX,
        client_reused: bool,
    ) -> Box<Error> {
        if *e.esource() == ErrorSource::Downstream {
            // The client went away (or broke its side): nothing to retry, and nothing to hold
            // against the instance.
            e.set_retry(false);
            return e;
        }
        ctx.cause = Some(describe(&e));
        if !client_reused {
            // A stale pooled connection says nothing about the instance.
            self.passive_failure(ctx);
        }
        // Retry only what nginx's `proxy_next_upstream error` would: an idempotent request
        // whose upstream connection broke before any response byte, with its body still fully
        // buffered. Timeouts are not retried (a slow instance would get the request twice).
        let broke = matches!(e.retry, RetryType::ReusedOnly)
            || matches!(
                e.etype(),
                ErrorType::ConnectionClosed | ErrorType::ReadError | ErrorType::WriteError
            );
        let safe = is_idempotent(&session.req_header().method)
            && session.response_written().is_none()
            && !session.as_ref().retry_buffer_truncated();
        let retries = ctx.upstream.as_ref().map_or(0, |u| u.config.retries);
        let retry = if !(broke && safe) {
            false
        } else if client_reused && ctx.stale_retries < MAX_STALE_RETRIES {
            // A pooled connection the instance had closed: the instance is fine, try it again
            // on a fresh connection without spending a retry.
            ctx.stale_retries += 1;
            ctx.tried.pop();
            ctx.attempts = ctx.attempts.saturating_sub(1);
            true
        } else {
            ctx.attempts <= retries
        };
        e.set_retry(retry);
        e
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut Self::CTX,
    ) -> FailToProxy {
        let code = match e.etype() {
            ErrorType::HTTPStatus(c) => *c,
            ErrorType::ReadTimedout | ErrorType::WriteTimedout
                if *e.esource() == ErrorSource::Upstream =>
            {
                504
            }
            _ => match e.esource() {
                ErrorSource::Upstream => 502,
                ErrorSource::Downstream => match e.etype() {
                    ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed => 0,
                    ErrorType::ReadTimedout => 408,
                    _ => 400,
                },
                ErrorSource::Internal | ErrorSource::Unset => 500,
            },
        };
        if code > 0 && session.response_written().is_none() {
            let text = match code {
                502 => format!(
                    "502 Bad Gateway: upstream unreachable ({})",
                    ctx.cause.unwrap_or_else(|| describe(e))
                ),
                504 => "504 Gateway Timeout: the upstream did not answer in time".to_string(),
                408 => "408 Request Timeout".to_string(),
                400 => "400 Bad Request".to_string(),
                c => format!(
                    "{c} {}",
                    http::StatusCode::from_u16(c)
                        .ok()
                        .and_then(|s| s.canonical_reason())
                        .unwrap_or("Error")
                ),
            };
            if let Err(we) = Self::respond(session, code, &text).await {
                tracing::debug!(error = %we, "could not send the error response");
            }
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Self::CTX) {
        // The response is complete (or failed): stop counting the request as in flight now,
        // not when Pingora finally drops the context after closing or recycling the
        // connection — least_requests and drains see the instance as free a little sooner.
        // (The context's drop still releases it on the paths that skip this hook.)
        drop(ctx.guard.take());
        // Nothing sent: the client went away first (nginx's 499).
        let status = session
            .response_written()
            .map(|r| r.status.as_u16())
            .filter(|s| *s > 0)
            .unwrap_or(499);
        let elapsed = ctx.started.map(|t| t.elapsed()).unwrap_or_default();
        let pool = ctx
            .upstream
            .as_ref()
            .zip(ctx.pool)
            .map(|(u, pi)| &u.pools[pi]);
        match pool {
            Some(p) => p.pool.metrics(&self.metrics),
            None => self.metrics.unrouted(),
        }
        .observe(status, elapsed.as_secs_f64());
        if !self.access_log.enabled() {
            return;
        }
        let req = session.req_header();
        let header =
            |name: http::header::HeaderName| req.headers.get(name).and_then(|v| v.to_str().ok());
        let target = std::str::from_utf8(req.raw_path()).unwrap_or("-");
        let error = e.map(|e| match e.esource() {
            ErrorSource::Downstream => "client_error".to_string(),
            _ => ctx.cause.unwrap_or_else(|| describe(e)).replace(' ', "_"),
        });
        let instance = ctx.instance.as_ref().map(|i| i.label.as_str());
        self.access_log.log(&Entry {
            time: std::time::SystemTime::now(),
            client: session
                .client_addr()
                .and_then(|a| a.as_inet())
                .map(|a| a.ip()),
            method: req.method.as_str(),
            target,
            version: match req.version {
                http::Version::HTTP_10 => "HTTP/1.0",
                http::Version::HTTP_2 => "HTTP/2.0",
                _ => "HTTP/1.1",
            },
            status,
            bytes: session.as_ref().body_bytes_sent(),
            referer: header(header::REFERER),
            user_agent: header(header::USER_AGENT),
            host: header(header::HOST),
            duration: elapsed,
            upstream: ctx.upstream.as_ref().map(|u| u.name()),
            pool: pool.map(|p| p.pool.name.as_str()),
            instance,
            error: error.as_deref(),
        });
    }

    fn suppress_error_log(&self, _session: &Session, _ctx: &Self::CTX, error: &Error) -> bool {
        // Client disconnects are routine; upstream failures are logged (with the upstream
        // address, which only the operator sees) at warn by Pingora.
        *error.esource() == ErrorSource::Downstream
    }
}
