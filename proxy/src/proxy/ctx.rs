//! Per-request state ([`RequestCtx`]) and the guards that keep a request counted while it
//! exists: in the proxy's `active` total (the shutdown drain waits for it) and in flight on its
//! pool and instance (SPEC §4.3: "pool blue has drained" is an observable fact). The guards are
//! dropped with the context on every exit path, client aborts included.

use crate::state::Snapshot;
use crate::upstream::{Instance, Pool, UpstreamState};
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::Arc;

/// Something with an in-flight counter: a pool or an instance.
pub(crate) trait Inflight {
    fn inflight(&self) -> &AtomicI64;
}

impl Inflight for Pool {
    fn inflight(&self) -> &AtomicI64 {
        &self.inflight
    }
}

impl Inflight for Instance {
    fn inflight(&self) -> &AtomicI64 {
        &self.inflight
    }
}

/// Counts one request in flight on a pool or an instance while it exists. SeqCst:
/// [`crate::state::Shared::bind`] relies on it for pools.
#[derive(Debug)]
pub(crate) struct Counted<T: Inflight>(Arc<T>);

impl<T: Inflight> Counted<T> {
    pub(crate) fn new(of: Arc<T>) -> Self {
        of.inflight().fetch_add(1, Ordering::SeqCst);
        Counted(of)
    }
}

impl<T: Inflight> Drop for Counted<T> {
    fn drop(&mut self) {
        self.0.inflight().fetch_sub(1, Ordering::SeqCst);
    }
}

/// Counts a request on its pool from the moment the pool is chosen until it ends.
pub(crate) type PoolGuard = Counted<Pool>;
/// Counts one attempt on an instance (least_requests, `status`).
pub(crate) type InstanceGuard = Counted<Instance>;

/// Counts a request in `Switchyard::active` while it exists.
#[derive(Debug)]
pub(crate) struct ActiveGuard(Arc<AtomicUsize>);

impl ActiveGuard {
    pub(crate) fn new(active: &Arc<AtomicUsize>) -> Self {
        active.fetch_add(1, Ordering::AcqRel);
        ActiveGuard(active.clone())
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Per-request state.
#[derive(Debug, Default)]
pub(crate) struct RequestCtx {
    /// Keeps the request counted as active.
    pub(crate) _active: Option<ActiveGuard>,
    /// When the request head had been read.
    pub(crate) started: Option<std::time::Instant>,
    /// When the upstream's final response head arrived (not a `100 Continue`): the canary
    /// analysis' latency.
    pub(crate) response_at: Option<std::time::Instant>,
    /// The whole request (its last body byte, or a head without body) went on to the app.
    pub(crate) request_sent: bool,
    /// `client_max_body_size` for this request (0 = unlimited), and the body bytes so far.
    pub(crate) body_limit: u64,
    pub(crate) body_bytes: u64,
    /// The request id header and its value (`request_id`): forwarded, returned, logged.
    /// The name is spelled as configured (HTTP/1 sends it so).
    pub(crate) request_id: Option<(bytes::Bytes, http::HeaderValue)>,
    /// The snapshot this request is routed by (loaded once).
    pub(crate) snapshot: Option<Arc<Snapshot>>,
    /// Index of the matched route.
    pub(crate) route: Option<usize>,
    /// The normalized path, when normalizing changed it (`routing::normalize`).
    pub(crate) normalized: Option<String>,
    /// The upstream state of the matched route (from `snapshot`).
    pub(crate) upstream: Option<Arc<UpstreamState>>,
    /// The pool this request is bound to.
    pub(crate) pool: Option<usize>,
    /// Instance ids already tried.
    pub(crate) tried: Vec<u64>,
    /// Attempts on distinct instances (connects or fresh-connection failures).
    pub(crate) attempts: u32,
    /// Retries caused by stale pooled connections (not counted in `attempts`).
    pub(crate) stale_retries: u32,
    /// Counts this request as in flight on its pool (from the moment the pool is chosen).
    pub(crate) pool_guard: Option<PoolGuard>,
    /// Counts the current attempt on its instance.
    pub(crate) guard: Option<InstanceGuard>,
    /// The instance of the current attempt.
    pub(crate) instance: Option<Arc<Instance>>,
    /// A sticky bucket assigned to this client now, sent back as a cookie.
    pub(crate) set_cookie: Option<u8>,
    /// A genuine upgrade request (`genuine_upgrade`): no timeouts once it is a tunnel.
    pub(crate) upgrade: bool,
    /// Why the last attempt failed, in words a client may see (never an address).
    pub(crate) cause: Option<&'static str>,
}
