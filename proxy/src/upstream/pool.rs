//! Pools: a named group of instances (blue, green, canary) of one upstream.
//!
//! [`Pool`] is the long-lived part (in-flight count, round-robin position, request counters),
//! shared by successive snapshots so a switch does not reset it; [`PoolState`] is the pool as
//! one snapshot sees it (weight, reuse epoch, instance list).

use super::instance::Instance;
use super::stats::PoolStats;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize};
use std::sync::Arc;

/// A named pool's long-lived counters.
#[derive(Debug)]
pub(crate) struct Pool {
    pub(crate) name: String,
    /// Requests (and upgraded connections) in flight on this pool.
    pub(crate) inflight: AtomicI64,
    /// Round-robin position.
    pub(crate) rr: AtomicUsize,
    /// Whether the last pick found no usable instance and tried them all (logged once per
    /// transition, not per request).
    pub(crate) fail_open: AtomicBool,
    /// Finished requests by status and latency.
    pub(crate) stats: PoolStats,
}

impl Pool {
    pub(crate) fn new(name: &str) -> Self {
        Pool {
            name: name.to_string(),
            inflight: AtomicI64::new(0),
            rr: AtomicUsize::new(0),
            fail_open: AtomicBool::new(false),
            stats: PoolStats::default(),
        }
    }
}

/// A pool as seen by one snapshot.
#[derive(Debug, Clone)]
pub(crate) struct PoolState {
    pub(crate) pool: Arc<Pool>,
    pub(crate) weight: u32,
    /// Bumped whenever the pool loses all its weight. It is part of the connection-reuse key,
    /// so idle keep-alive connections opened before can never be handed out again (SPEC §4.3).
    pub(crate) epoch: u64,
    pub(crate) instances: Vec<Arc<Instance>>,
}
