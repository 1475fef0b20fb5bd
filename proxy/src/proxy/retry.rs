//! The retry policy (SPEC §3 `retries`): what may be tried again on another instance of the
//! same pool — never on another color. A failed connect always may; after connecting, only
//! what nginx's `proxy_next_upstream error` would retry: an idempotent request whose upstream
//! connection broke before any response byte, with its body still fully buffered. Timeouts are
//! not retried (a slow instance would get the request twice). A stale pooled connection is
//! retried on a fresh one without spending a retry.

use super::ctx::RequestCtx;
use http::Method;
use pingora::prelude::*;
use pingora::proxy::Session;
use pingora::RetryType;

/// Bound on retries caused by stale pooled upstream connections: after an upstream restart
/// every idle connection to it is dead, and each retry may draw another one.
const MAX_STALE_RETRIES: u32 = 3;

pub(crate) fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

fn retries(ctx: &RequestCtx) -> u32 {
    ctx.upstream.as_ref().map_or(0, |u| u.config.retries)
}

/// A connect failed: nothing was sent, so another instance may always be tried.
pub(crate) fn after_connect_failure(ctx: &RequestCtx) -> bool {
    ctx.attempts <= retries(ctx)
}

/// The upstream connection broke before any response byte (closed, reset): on a reused
/// connection, what a pooled connection the app closed while idle looks like.
pub(crate) fn broke_before_response(session: &Session, e: &Error) -> bool {
    (matches!(e.retry, RetryType::ReusedOnly)
        || matches!(
            e.etype(),
            ErrorType::ConnectionClosed | ErrorType::ReadError | ErrorType::WriteError
        ))
        && session.response_written().is_none()
}

/// An upstream error after connecting (`client_reused`: on a pooled connection).
pub(crate) fn after_proxy_error(
    session: &Session,
    e: &Error,
    ctx: &mut RequestCtx,
    client_reused: bool,
) -> bool {
    let broke = broke_before_response(session, e);
    let safe =
        is_idempotent(&session.req_header().method) && !session.as_ref().retry_buffer_truncated();
    after_upstream_error(broke, safe, ctx, client_reused)
}

/// [`after_proxy_error`] with the request's side worked out: `broke`, the upstream connection
/// broke before any response byte; `safe`, the request may be sent again (idempotent, its
/// body still buffered). The fast path (`fast`) calls it directly.
pub(crate) fn after_upstream_error(
    broke: bool,
    safe: bool,
    ctx: &mut RequestCtx,
    client_reused: bool,
) -> bool {
    if !(broke && safe) {
        false
    } else if client_reused && ctx.stale_retries < MAX_STALE_RETRIES {
        // A pooled connection the instance had closed: the instance is fine, try it again
        // on a fresh connection without spending a retry.
        ctx.stale_retries += 1;
        ctx.tried.pop();
        ctx.attempts = ctx.attempts.saturating_sub(1);
        true
    } else {
        ctx.attempts <= retries(ctx)
    }
}
