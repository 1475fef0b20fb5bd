//! Per-request state ([`RequestCtx`]) and the guards that keep a request counted while it
//! exists: in the proxy's `active` total (the shutdown drain waits for it) and in flight on its
//! pool and instance (SPEC §4.3: "pool blue has drained" is an observable fact). The guards are
//! dropped with the context on every exit path, client aborts included.

use crate::state::Snapshot;
use crate::upstream::{Instance, Pool, UpstreamState};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Counts one request on a pool and an instance while it exists.
#[derive(Debug)]
pub(crate) struct InflightGuard {
    pool: Arc<Pool>,
    instance: Arc<Instance>,
}

impl InflightGuard {
    pub(crate) fn new(pool: Arc<Pool>, instance: Arc<Instance>) -> Self {
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
    /// Counts this request as in flight on its pool/instance.
    pub(crate) guard: Option<InflightGuard>,
    /// The instance of the current attempt.
    pub(crate) instance: Option<Arc<Instance>>,
    /// Why the last attempt failed, in words a client may see (never an address).
    pub(crate) cause: Option<&'static str>,
}
