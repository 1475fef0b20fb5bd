//! Per-request state ([`RequestCtx`]) and the guards that keep a request counted while it
//! exists: in the proxy's `active` total (the shutdown drain waits for it) and in flight on its
//! pool and instance (SPEC §4.3: "pool blue has drained" is an observable fact). The guards are
//! dropped with the context on every exit path, client aborts included.

use crate::state::Snapshot;
use crate::upstream::{Instance, Pool, UpstreamState};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Counts one request on its pool from the moment the pool is chosen until the request ends.
/// SeqCst: [`crate::state::Shared::bind`] relies on it.
#[derive(Debug)]
pub(crate) struct PoolGuard(Arc<Pool>);

impl PoolGuard {
    pub(crate) fn new(pool: Arc<Pool>) -> Self {
        pool.inflight.fetch_add(1, Ordering::SeqCst);
        PoolGuard(pool)
    }
}

impl Drop for PoolGuard {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Counts one attempt on an instance (for least_requests and `status`).
#[derive(Debug)]
pub(crate) struct InstanceGuard(Arc<Instance>);

impl InstanceGuard {
    pub(crate) fn new(instance: Arc<Instance>) -> Self {
        instance.inflight.fetch_add(1, Ordering::AcqRel);
        InstanceGuard(instance)
    }
}

impl Drop for InstanceGuard {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::AcqRel);
    }
}

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
    /// The snapshot this request is routed by (loaded once).
    pub(crate) snapshot: Option<Arc<Snapshot>>,
    /// Index of the matched route.
    pub(crate) route: Option<usize>,
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
    /// Why the last attempt failed, in words a client may see (never an address).
    pub(crate) cause: Option<&'static str>,
}
