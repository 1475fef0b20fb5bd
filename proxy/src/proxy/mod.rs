//! The request path: switchyard's Pingora `ProxyHttp` implementation.
//!
//! Per request: `request_filter` loads the routing snapshot once, answers denied paths and
//! unrouted requests itself, and binds the request to a pool (the decision is
//! `routing::decide`), counting it in flight on that pool from that moment until the request
//! ends — on every exit path, client aborts included (`state::Shared::bind` closes the gap
//! between loading the snapshot and counting). `upstream_peer` picks an instance of that pool
//! (called again on each retry, with the same snapshot and pool). `upstream_request_filter`
//! rewrites the path and sets the forwarding headers. The hooks below only sequence the work;
//! each concern has its own module:
//!
//! - `ctx`: per-request state and the in-flight guards.
//! - `choose`: reading the request for the pool decision (preview, force, sticky bucket).
//! - `forward`: path rewrite and forwarding headers.
//! - `retry`: what may be retried.
//! - `passive`: passive ejection and fail-open notices.
//! - `reply`: answers the proxy writes itself, and failure statuses.
//! - `log`: the end of a request (stats, access log).
//! - `fast`: switchyard's own forwarder for plain requests without a body, which calls the same
//!   pieces (`Switchyard::route`, `retry`, `passive`, `reply`, `log::record`) without Pingora's
//!   session.

pub(crate) mod choose;
mod ctx;
pub(crate) mod fast;
mod forward;
mod log;
mod passive;
mod reply;
pub(crate) mod request_id;
mod retry;

use crate::routing::normalize::normalize;
use crate::routing::sticky;
use crate::state::{Shared, Snapshot};
use crate::telemetry::access_log::AccessLog;
use crate::telemetry::events::EventLog;
use crate::telemetry::metrics::Metrics;
use crate::upstream::health::now_ms;
use crate::upstream::{Candidates, UpstreamState};
use async_trait::async_trait;
use choose::{choose, Choice, ReqHeaders};
use ctx::{ActiveGuard, InstanceGuard, PoolGuard, RequestCtx};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::ErrorSource;
use reply::{describe, err_status};
use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

/// Bound on one write to a client (nginx's `send_timeout` default).
const SEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
/// Bound on one read of a client's request body (nginx's `client_body_timeout` default).
const BODY_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// What `request_filter` decided for a request.
enum Decision {
    /// Denied: answer with this status.
    Deny(u16),
    /// No route matches.
    NoRoute,
    /// Routed, and counted on its pool.
    Pool {
        route: usize,
        upstream: Arc<UpstreamState>,
        choice: Choice,
        guard: PoolGuard,
    },
}

/// Whether the `Connection` header(s) name `token`.
fn connection_has(h: &http::HeaderMap, token: &[u8]) -> bool {
    h.get_all(http::header::CONNECTION).iter().any(|v| {
        v.as_bytes()
            .split(|b| *b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
    })
}

/// A genuine upgrade request (WebSocket): HTTP/1.1 with `Upgrade`, `Connection: upgrade` and no
/// body. The connection layer applies the same rule (`listen::head`).
fn genuine_upgrade(req: &RequestHeader) -> bool {
    let h = &req.headers;
    req.version == http::Version::HTTP_11
        && h.contains_key(http::header::UPGRADE)
        && connection_has(h, b"upgrade")
        && !h.contains_key(http::header::TRANSFER_ENCODING)
        && h.get(http::header::CONTENT_LENGTH)
            .is_none_or(|v| v.as_bytes().iter().all(|b| *b == b'0'))
}

/// The proxy logic, shared by every worker thread.
#[derive(Debug, Clone)]
pub(crate) struct Switchyard {
    /// Requests being processed (the shutdown drain waits for 0).
    pub(crate) active: Arc<AtomicUsize>,
    /// Requests the fast path answered (tests look: `Handle::fast_path_requests`).
    pub(crate) fast_served: Arc<std::sync::atomic::AtomicU64>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) events: Arc<EventLog>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) access_log: Arc<AccessLog>,
}

impl Switchyard {
    /// The routing decision for a request (`request_filter`'s, and the fast path's): on the
    /// snapshot loaded once, the deny list, then the route (by `authority` when some route names
    /// a host), then the pool, counted in flight on it from this moment (`Shared::bind`).
    fn route<H: ReqHeaders + ?Sized>(
        &self,
        path: &str,
        authority: Option<&[u8]>,
        headers: &H,
        client: Option<IpAddr>,
    ) -> (Arc<Snapshot>, Decision) {
        let mut host_buf = [0u8; 253];
        self.shared.bind(|snap| {
            if snap.deny.denies(path) {
                return Decision::Deny(snap.deny.status);
            }
            let host = match authority {
                Some(a) if snap.routes.by_host() => {
                    crate::routing::routes::request_host(a, &mut host_buf)
                }
                _ => None,
            };
            let Some((route, r)) = snap.routes.find(host, path.as_bytes()) else {
                return Decision::NoRoute;
            };
            let upstream = snap.upstreams[r.upstream].clone();
            let choice = choose(&upstream, &snap.sticky, headers, client);
            let guard = PoolGuard::new(upstream.pools[choice.pool].pool.clone());
            Decision::Pool {
                route,
                upstream,
                choice,
                guard,
            }
        })
    }
}

#[async_trait]
impl ProxyHttp for Switchyard {
    type CTX = RequestCtx;

    /// No downstream modules. Pingora's default adds its response-compression module,
    /// disabled (level 0), and still builds its context and runs its filters on every request:
    /// five allocations and ~300 instructions a request for nothing (costbench). switchyard
    /// does not compress, as nginx with `gzip off` (its default): the app's
    /// `Content-Encoding` passes through untouched.
    fn init_downstream_modules(&self, _modules: &mut pingora::modules::http::HttpModules) {}

    fn new_ctx(&self) -> Self::CTX {
        RequestCtx {
            _active: Some(ActiveGuard::new(&self.active)),
            started: Some(std::time::Instant::now()),
            ..Default::default()
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Self::CTX) -> Result<bool> {
        let raw = session.req_header().uri.path();
        // Deny and route on the normalized path (`routing::normalize`); keep it when it
        // differs, it is what goes upstream.
        let normalized = match normalize(raw) {
            Cow::Owned(p) => Some(p),
            Cow::Borrowed(_) => None,
        };
        let path = normalized.as_deref().unwrap_or(raw);
        let client = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        let headers = &session.req_header().headers;
        // The host, for routes that name one: the target's authority (absolute-form, h2's
        // :authority), else the Host header.
        let authority = session
            .req_header()
            .uri
            .authority()
            .map(|a| a.host().as_bytes())
            .or_else(|| headers.get(http::header::HOST).map(|h| h.as_bytes()));
        let (snap, decision) = self.route(path, authority, headers, client);
        // An HTTP/1.0 client keeps its connection only when it asks (`Connection: keep-alive`),
        // as in nginx; Pingora's keep-alive override would keep any HTTP/1.0 connection open.
        // While draining (shutdown, or a successor took over) the answer says
        // `Connection: close`, as the accept loop set it: the client reconnects, to whoever
        // is accepting now.
        let req = session.req_header();
        if req.version == http::Version::HTTP_10 && !connection_has(&req.headers, b"keep-alive") {
            session.set_keepalive(None);
        } else if !session.is_process_shutting_down() {
            let ka = snap.config.keepalive_timeout;
            session.set_keepalive((!ka.is_zero()).then(|| ka.as_secs().max(1)));
        }
        // A client that stops reading its response holds a connection slot and keeps its
        // pool in flight (a drain would never end): each write to it must make progress within
        // SEND_TIMEOUT, as nginx's send_timeout; each read of its body within
        // BODY_READ_TIMEOUT, as nginx's client_body_timeout.
        session.set_write_timeout(Some(SEND_TIMEOUT));
        session.set_read_timeout(Some(BODY_READ_TIMEOUT));
        let id = request_id::of(session.req_header().headers.get(&snap.request_id));
        ctx.request_id = Some((snap.request_id_spelled.clone(), id));
        // client_max_body_size. HTTP/1 bodies are checked at the door (`listen`); this is for
        // h2, whose requests do not pass there: a larger Content-Length is 413 before anything
        // is forwarded, and a body without one is cut where it crosses the limit
        // (`request_body_filter`).
        ctx.body_limit = snap.config.client_max_body_size;
        if ctx.body_limit > 0
            && session
                .req_header()
                .headers
                .get(http::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .is_some_and(|n| n > ctx.body_limit)
        {
            let text = format!(
                "413 Content Too Large: the request body is larger than client_max_body_size ({})",
                crate::listen::human_size(ctx.body_limit)
            );
            session.set_keepalive(None);
            reply::respond(session, 413, &text, ctx.request_id.as_ref()).await?;
            return Ok(true);
        }
        match decision {
            Decision::Deny(status) => {
                let text = format!("{status} {}", reply::reason(status));
                reply::respond(session, status, &text, ctx.request_id.as_ref()).await?;
                return Ok(true);
            }
            Decision::NoRoute => {
                let text = "404 Not Found: no route for this path";
                reply::respond(session, 404, text, ctx.request_id.as_ref()).await?;
                return Ok(true);
            }
            Decision::Pool {
                route,
                upstream,
                choice,
                guard,
            } => {
                if choice.preview_refused {
                    self.metrics
                        .preview_refused
                        .with_label_values(&[upstream.name()])
                        .inc();
                }
                ctx.set_cookie = choice.set_cookie;
                ctx.normalized = normalized;
                ctx.pool = Some(choice.pool);
                ctx.pool_guard = Some(guard);
                ctx.route = Some(route);
                ctx.upstream = Some(upstream);
                ctx.snapshot = Some(snap);
            }
        }
        // Only a genuine upgrade may become a tunnel without timeouts. Pingora takes any
        // HTTP/1.1 request with an `Upgrade` header for one (and forwards a WebSocket
        // handshake for it), so strip the header from anything else: a POST with a body and
        // `Upgrade: x` is an ordinary POST, with the ordinary timeouts.
        ctx.upgrade = genuine_upgrade(session.req_header());
        if !ctx.upgrade
            && session
                .req_header()
                .headers
                .contains_key(http::header::UPGRADE)
        {
            session
                .req_header_mut()
                .remove_header(&http::header::UPGRADE);
        }
        if ctx.upgrade {
            // An upgraded (WebSocket) connection may be quiet for long; it ends when either
            // side closes, not after the HTTP read timeout.
            session.set_read_timeout(None);
        }
        Ok(false)
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut Self::CTX,
    ) -> Result<Box<HttpPeer>> {
        // Each attempt sends the body again (a retry replays Pingora's buffer through
        // `request_body_filter`): count it afresh.
        ctx.body_bytes = 0;
        let (Some(up), Some(pool_idx)) = (ctx.upstream.clone(), ctx.pool) else {
            return Err(err_status(500, "request was not routed"));
        };
        let pool = &up.pools[pool_idx];
        let inst = match pool.pick(up.config.balance, &ctx.tried, now_ms()) {
            Candidates::Found { inst, fail_open } => {
                passive::note_fail_open(&self.events, &up, pool, fail_open);
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
        ctx.guard = Some(InstanceGuard::new(inst.clone()));
        ctx.instance = Some(inst.clone());

        let cfg = &up.config;
        let mut peer = Box::new(HttpPeer::new(addr, false, String::new()));
        // Connection-reuse key: the pool's epoch (bumped when it loses all weight) and the
        // instance's identity, so connections opened before a drain are never reused.
        peer.group_key = pool.epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ inst.id;
        let o = &mut peer.options;
        o.connection_timeout = Some(cfg.connect_timeout);
        o.idle_timeout = Some(cfg.idle_timeout);
        if ctx.upgrade {
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
        forward::upstream_request(session, req, ctx)
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<bytes::Bytes>,
        end_of_stream: bool,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        // Pingora calls this with `end_of_stream` also for a request without body; a client
        // that stops mid-body ends with an error instead (the canary analysis tells the two
        // apart, `log::finish`).
        if let Some(b) = body {
            ctx.body_bytes = ctx.body_bytes.saturating_add(b.len() as u64);
            if ctx.body_limit > 0 && ctx.body_bytes > ctx.body_limit {
                return Error::e_explain(
                    ErrorType::HTTPStatus(413),
                    "the request body is larger than client_max_body_size",
                );
            }
        }
        if end_of_stream {
            ctx.request_sent = true;
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        if let Some((name, value)) = &ctx.request_id {
            resp.insert_header(name.clone(), value.clone())?;
        }
        if session.req_header().version == http::Version::HTTP_10
            && resp
                .headers
                .get(http::header::TRANSFER_ENCODING)
                .is_some_and(|te| te.as_bytes().trim_ascii().eq_ignore_ascii_case(b"chunked"))
        {
            // An HTTP/1.0 client cannot read a chunked body (Pingora chunks any answer without
            // a length, and forwards the app's chunking): it gets the body as it is, ended by
            // the end of the connection, as from nginx.
            resp.remove_header(&http::header::TRANSFER_ENCODING);
            session.set_keepalive(None);
        }
        if resp.version < http::Version::HTTP_11 {
            // An HTTP/1.0 app's answer: the client talks to this proxy, an HTTP/1.1 server,
            // so the status line says HTTP/1.1 (RFC 9110 §6.2; as nginx). Pingora forwards the
            // app's version, which with a chunked body gave HTTP/1.0 framing no client accepts.
            resp.set_version(http::Version::HTTP_11);
        }
        if session.is_process_shutting_down() && resp.status.as_u16() != 101 {
            // Draining since the request began: this answer says `Connection: close`, so the
            // client does not send its next request on a connection about to close.
            session.set_keepalive(None);
        }
        if ctx.upgrade && resp.status.as_u16() != 101 {
            // The app refused the upgrade: the connection layer already treats what follows
            // the head as a tunnel, so it must not carry another request.
            session.set_keepalive(None);
        }
        if let (Some(bucket), Some(snap), Some(up)) = (ctx.set_cookie, &ctx.snapshot, &ctx.upstream)
        {
            // The client's sticky bucket, assigned on this request (SPEC §4): only while a
            // canary has weight, which is when `choose` assigns one. Not on a response a
            // shared cache may keep: the cache would give this bucket to all its clients.
            let cc = resp.headers.get_all(http::header::CACHE_CONTROL);
            if !sticky::shared_cacheable(cc.iter().map(|v| v.as_bytes())) {
                let tls = session.digest().is_some_and(|d| d.ssl_digest.is_some());
                let cookie = snap
                    .sticky
                    .set_cookie(&up.config.canary.cookie, bucket, tls);
                resp.append_header(http::header::SET_COOKIE, cookie)?;
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
        passive::response(&self.events, ctx, resp.status.as_u16());
        // The app's answer, not an interim `100 Continue` (which an app may send at once
        // and then take seconds for the real head).
        let status = resp.status.as_u16();
        if status >= 200 || status == 101 {
            ctx.response_at.get_or_insert_with(std::time::Instant::now);
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
        passive::failure(&self.events, ctx);
        e.set_retry(retry::after_connect_failure(ctx));
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
        // A pooled connection the app had closed while idle says nothing about the instance;
        // anything else (a bad status line, a reset mid-body, a timeout) does, reused or not.
        if !(client_reused && retry::broke_before_response(session, &e)) {
            passive::failure(&self.events, ctx);
        }
        let retry = retry::after_proxy_error(session, &e, ctx, client_reused);
        e.set_retry(retry);
        e
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut Self::CTX,
    ) -> FailToProxy {
        let code = reply::failure_status(e);
        if code > 0 && session.response_written().is_none() {
            let text = reply::failure_text(code, ctx.cause.unwrap_or_else(|| describe(e)));
            if let Err(we) = reply::respond(session, code, &text, ctx.request_id.as_ref()).await {
                tracing::debug!(error = %we, "could not send the error response");
            }
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Self::CTX) {
        log::finish(session, e, ctx, &self.metrics.unrouted, &self.access_log);
    }

    fn suppress_error_log(&self, _session: &Session, _ctx: &Self::CTX, error: &Error) -> bool {
        // Client disconnects are routine; upstream failures are logged (with the upstream
        // address, which only the operator sees) at warn by Pingora.
        *error.esource() == ErrorSource::Downstream
    }
}
