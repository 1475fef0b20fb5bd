//! The routing state: one `ArcSwap` cell holding the current [`Snapshot`], and its single
//! writer.
//!
//! A request loads the snapshot once (one atomic load, no lock) and is routed by it to the
//! end. A change takes the writer lock, builds a new snapshot from the current one, persists
//! it (`persist`) and stores it; the lock serializes changes, so two concurrent commands
//! cannot both build on the same old state and lose one of the updates. Where a change is
//! decided (switch, weights, reload...) is `ops`; this module only keeps the state.
//!
//! - `snapshot`: [`Snapshot`] and how it is built.
//! - `persist`: the state file.

pub(crate) mod persist;
mod snapshot;

pub(crate) use snapshot::{Restored, Snapshot};

use crate::upstream::UpstreamState;
use arc_swap::ArcSwap;
use std::sync::{Arc, Mutex, MutexGuard};

/// The snapshot cell plus the writer lock.
#[derive(Debug)]
pub(crate) struct Shared {
    current: ArcSwap<Snapshot>,
    write: Mutex<()>,
    /// Wakes the health supervisor (new instances) and health waiters.
    changes: tokio::sync::Notify,
    /// Wakes `--wait-healthy` waiters on any health transition.
    health: tokio::sync::Notify,
}

impl Shared {
    pub(crate) fn new(snapshot: Snapshot) -> Self {
        Shared {
            current: ArcSwap::from_pointee(snapshot),
            write: Mutex::new(()),
            changes: tokio::sync::Notify::new(),
            health: tokio::sync::Notify::new(),
        }
    }

    /// The current snapshot (one atomic load).
    pub(crate) fn load(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Take the writer lock. Hold it across build + persist + store so changes are serialized.
    pub(crate) fn lock(&self) -> MutexGuard<'_, ()> {
        // A panic while holding the lock cannot leave the snapshot half-written (the store is
        // one atomic swap), so a poisoned lock is safe to take over.
        self.write.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The snapshot that would result from replacing one upstream's state. Caller holds
    /// `lock()`, persists the result, then [`Self::store`]s it.
    pub(crate) fn with_upstream(
        &self,
        _guard: &MutexGuard<'_, ()>,
        state: Arc<UpstreamState>,
    ) -> Snapshot {
        self.load().with_upstream(state)
    }

    /// Make `snapshot` current. Caller holds `lock()`.
    pub(crate) fn store(&self, _guard: &MutexGuard<'_, ()>, snapshot: Snapshot) {
        self.current.store(Arc::new(snapshot));
        self.changes.notify_waiters();
    }

    /// Resolves at the next snapshot change (create it before loading the snapshot).
    pub(crate) fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.changes.notified()
    }

    /// Announce a health transition.
    pub(crate) fn notify_health(&self) {
        self.health.notify_waiters();
    }

    /// Resolves at the next health transition.
    pub(crate) fn health_changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.health.notified()
    }
}
