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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// Bound on how often one request decides again because changes keep arriving (a change
/// takes a lock and an fsync, so more than one in a row is already rare).
const MAX_REBINDS: u32 = 8;

/// The snapshot cell plus the writer lock.
#[derive(Debug)]
pub(crate) struct Shared {
    current: ArcSwap<Snapshot>,
    /// The version of the last stored snapshot, published after it is stored.
    version: AtomicU64,
    write: Mutex<()>,
    /// Wakes the health supervisor (new instances) and health waiters.
    changes: tokio::sync::Notify,
    /// Wakes `--wait-healthy` waiters on any health transition.
    health: tokio::sync::Notify,
    /// A binary upgrade is handing the state to a successor: no change may be committed (it
    /// would be lost).
    frozen: AtomicBool,
}

/// Why a change was not committed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CommitError {
    /// The state file could not be written.
    #[error("cannot write the state file: {0}")]
    Io(#[from] std::io::Error),
    /// A binary upgrade is under way.
    #[error("a binary upgrade is handing this proxy's state to a new process; retry in a moment (the new process will answer)")]
    Frozen,
}

impl Shared {
    pub(crate) fn new(mut snapshot: Snapshot) -> Self {
        snapshot.version = 1;
        Shared {
            current: ArcSwap::from_pointee(snapshot),
            version: AtomicU64::new(1),
            write: Mutex::new(()),
            changes: tokio::sync::Notify::new(),
            health: tokio::sync::Notify::new(),
            frozen: AtomicBool::new(false),
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

    /// Commit a change: write `snapshot` to the state file (durably), then make it current —
    /// persisted before it is acknowledged (SPEC §4 invariant 6). Caller holds `lock()`. If
    /// the write fails nothing is applied. This is the one place a change takes effect; a
    /// desired-state source shared by several proxies (a fleet) plugs in before it.
    pub(crate) fn commit(
        &self,
        guard: &MutexGuard<'_, ()>,
        snapshot: Snapshot,
        state_file: &std::path::Path,
    ) -> Result<(), CommitError> {
        if self.frozen.load(Ordering::Acquire) {
            return Err(CommitError::Frozen);
        }
        persist::save(state_file, &snapshot)?;
        self.store(guard, snapshot);
        Ok(())
    }

    /// Refuse every change from now on, and write the current state to the state file: what a
    /// successor process reads is everything acknowledged (binary upgrade).
    pub(crate) fn freeze(&self, state_file: &std::path::Path) -> std::io::Result<()> {
        let _guard = self.lock();
        persist::save(state_file, &self.load())?;
        self.frozen.store(true, Ordering::Release);
        Ok(())
    }

    /// Whether changes are refused now (a binary upgrade is handing the state over).
    pub(crate) fn is_frozen(&self) -> bool {
        self.frozen.load(Ordering::Acquire)
    }

    /// Refuse every change until [`Self::thaw`] (a new process of a binary upgrade, until the
    /// old one has its answer).
    pub(crate) fn hold(&self) {
        self.frozen.store(true, Ordering::Release);
    }

    /// Accept changes again (the upgrade failed and this process goes on, or the new process
    /// has its answer). Wakes whoever waits for changes: what waited for the hold applies now.
    pub(crate) fn thaw(&self) {
        let _guard = self.lock();
        self.frozen.store(false, Ordering::Release);
        self.changes.notify_waiters();
    }

    /// Make `snapshot` current without persisting it. Caller holds `lock()`.
    pub(crate) fn store(&self, _guard: &MutexGuard<'_, ()>, mut snapshot: Snapshot) {
        let version = self.version.load(Ordering::SeqCst) + 1;
        snapshot.version = version;
        self.current.store(Arc::new(snapshot));
        // Published after the store: a request that reads this version and loads again is
        // sure to load this snapshot or a newer one.
        self.version.store(version, Ordering::SeqCst);
        self.changes.notify_waiters();
    }

    /// Route a request: load the snapshot and let `decide` bind the request, counting it on
    /// its pool (the guard it returns). A drain that starts after a change reads the old pool's
    /// counter once; a request that loaded the old snapshot but was not counted yet at that
    /// moment must not go on to the old pool. So after counting, the published version is
    /// compared with the snapshot's: if a change was stored in between, the decision is
    /// dropped (uncounting it) and made again on the new snapshot (SPEC §4 invariant 3).
    ///
    /// Why this suffices: the counter increment and the version load are SeqCst, as are the
    /// version store and the drain's counter load. If the drain read the counter before the
    /// increment, the version store precedes the version load, which then sees the new version.
    pub(crate) fn bind<T>(
        &self,
        mut decide: impl FnMut(&Arc<Snapshot>) -> T,
    ) -> (Arc<Snapshot>, T) {
        let mut rebinds = 0;
        loop {
            let snap = self.load();
            let decision = decide(&snap);
            if rebinds == MAX_REBINDS || self.version.load(Ordering::SeqCst) == snap.version {
                return (snap, decision);
            }
            drop(decision);
            rebinds += 1;
        }
    }

    /// The version of the last snapshot whose store is complete (published). A reader that
    /// must not see a snapshot before its version is published (a drain deciding "nothing is
    /// in flight", see [`Self::bind`]) waits until this reaches the snapshot's version.
    pub(crate) fn published(&self) -> u64 {
        self.version.load(Ordering::SeqCst)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::{Pool, Weights};
    use std::sync::atomic::AtomicBool;

    fn shared() -> Shared {
        let cfg = switchyard_config::parse(
            "listen: [{addr: '127.0.0.1:0'}]\nupstreams:\n  app:\n    pools:\n      blue: ['127.0.0.1:1']\n      green: ['127.0.0.1:2']\n    active: blue\nroutes: [{path_prefix: /, upstream: app}]\n",
        )
        .unwrap();
        Shared::new(Snapshot::build(
            Arc::new(cfg),
            &Restored::default(),
            None,
            crate::routing::sticky::StickyKey::generate,
        ))
    }

    /// What a switch does: store `pool`=100 (pools: 0 blue, 1 green).
    fn switch(s: &Shared, pool: &str) -> u64 {
        let guard = s.lock();
        let u = s.load().upstreams[0].clone();
        let w: Weights = u
            .pools
            .iter()
            .map(|p| (p.pool.name.clone(), u32::from(p.pool.name == pool) * 100))
            .collect();
        let snap = s.with_upstream(&guard, Arc::new(u.with_changes(Some(&w), None)));
        s.store(&guard, snap);
        s.load().version
    }

    /// A request's binding: pool chosen by weight and counted (the proxy's PoolGuard).
    struct Counted(Arc<Pool>, usize);
    impl Counted {
        fn new(snap: &Snapshot) -> Self {
            let u = &snap.upstreams[0];
            let i = u.pick_pool();
            let p = u.pools[i].pool.clone();
            p.inflight.fetch_add(1, Ordering::SeqCst);
            Counted(p, i)
        }
    }
    impl Drop for Counted {
        fn drop(&mut self) {
            self.0.inflight.fetch_sub(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_change_between_loading_and_counting_makes_the_request_decide_again() {
        let s = shared();
        let blue = s.load().upstreams[0].pools[0].pool.clone();
        let mut calls = 0;
        let mut drain_saw = None;
        let (snap, bound) = s.bind(|snap| {
            calls += 1;
            if calls == 1 {
                // The worst interleaving: the request has loaded the old snapshot (blue=100);
                // before it counts itself, a switch to green is stored and a drain of blue
                // looks at blue's counter.
                switch(&s, "green");
                drain_saw = Some(blue.inflight.load(Ordering::SeqCst));
            }
            Counted::new(snap)
        });
        assert_eq!(drain_saw, Some(0), "the drain saw blue empty ...");
        assert_eq!(calls, 2);
        assert_eq!(
            bound.1, 1,
            "... so the request must not go to blue: it went to green"
        );
        assert_eq!(snap.version, 2);
        assert_eq!(blue.inflight.load(Ordering::SeqCst), 0);
        drop(bound);
    }

    #[test]
    fn no_request_reaches_a_pool_after_its_drain_saw_it_empty() {
        // A writer switches back and forth and, after each store, reads the counter of the
        // pool that lost its weight (what `switch --drain` does); a reader keeps binding
        // requests. A request holding a pool that a later drain saw at 0 would be the race.
        let s = Arc::new(shared());
        let stop = Arc::new(AtomicBool::new(false));
        // Per pool: the highest snapshot version whose drain read 0.
        let drained: Arc<[AtomicU64; 2]> = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
        // The last version whose drain check is done.
        let checked = Arc::new(AtomicU64::new(1));
        let writer = {
            let (s, stop, drained, checked) =
                (s.clone(), stop.clone(), drained.clone(), checked.clone());
            std::thread::spawn(move || {
                for i in 0..4000 {
                    let (to, from) = if i % 2 == 0 {
                        ("green", 0)
                    } else {
                        ("blue", 1)
                    };
                    let v = switch(&s, to);
                    let pool = s.load().upstreams[0].pools[from].pool.clone();
                    if pool.inflight.load(Ordering::SeqCst) == 0 {
                        drained[from].fetch_max(v, Ordering::SeqCst);
                    }
                    checked.store(v, Ordering::SeqCst);
                    std::thread::sleep(std::time::Duration::from_micros(20));
                }
                stop.store(true, Ordering::SeqCst);
            })
        };
        let mut bound = 0u64;
        while !stop.load(Ordering::SeqCst) {
            let (snap, c) = s.bind(|snap| Counted::new(snap));
            // Hold the binding until the writer has made its drain check for every change
            // stored so far: a check that read 0 while this request was already bound to the
            // pool would then be recorded, whenever it happened.
            let target = s.published();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
            while checked.load(Ordering::SeqCst) < target
                && !stop.load(Ordering::SeqCst)
                && std::time::Instant::now() < deadline
            {
                std::thread::yield_now();
            }
            let later_drain = drained[c.1].load(Ordering::SeqCst);
            assert!(
                later_drain <= snap.version,
                "bound to pool {} by version {} while a drain at version {later_drain} saw it empty",
                c.1,
                snap.version
            );
            bound += 1;
        }
        writer.join().unwrap();
        assert!(bound > 500, "{bound} bindings");
    }
}
