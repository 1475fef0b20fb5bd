//! The routing snapshot and its single writer.
//!
//! `Snapshot` is everything a request needs to be routed: the config-derived settings, the
//! route table, the deny list and each upstream's `UpstreamState`. It lives in one `ArcSwap`:
//! a request loads it once (one atomic load, no lock), a change builds a new snapshot and
//! stores it. Changes are serialized by `write`, so two concurrent commands cannot both build
//! on the same old state and lose one of the updates.

use crate::route::{DenyList, RouteTable};
use crate::upstream::{UpstreamState, Weights};
use arc_swap::ArcSwap;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use switchyard_config::{Config, InstanceAddr};

/// Everything a request is routed by.
#[derive(Debug)]
pub(crate) struct Snapshot {
    pub(crate) config: Arc<Config>,
    pub(crate) routes: RouteTable,
    pub(crate) deny: DenyList,
    /// In the order of `config.upstreams`.
    pub(crate) upstreams: Vec<Arc<UpstreamState>>,
}

/// Runtime state restored for one upstream (from the state file).
#[derive(Debug, Clone, Default)]
pub(crate) struct Restored {
    pub(crate) weights: Weights,
    pub(crate) instances: BTreeMap<String, Vec<InstanceAddr>>,
    pub(crate) generation: u64,
    pub(crate) previous: Option<Weights>,
}

impl Snapshot {
    /// Build from config. Per upstream, runtime state comes from `restored` when given
    /// (state file), else from `old` (a reload keeps weights and pools changed at run time
    /// where they still exist), else from the config's `active`.
    pub(crate) fn build(
        config: Arc<Config>,
        restored: &BTreeMap<String, Restored>,
        old: Option<&Snapshot>,
    ) -> Snapshot {
        let upstreams: Vec<Arc<UpstreamState>> = config
            .upstreams
            .iter()
            .map(|uc| {
                let ucfg = Arc::new(uc.clone());
                let old_state = old.and_then(|o| o.upstream(&uc.name));
                let initial: Weights = uc
                    .pools
                    .iter()
                    .map(|p| (p.name.clone(), u32::from(p.name == uc.active) * 100))
                    .collect();
                let state = if let Some(r) = restored.get(&uc.name) {
                    UpstreamState::build(
                        ucfg,
                        &r.weights,
                        &r.instances,
                        r.generation,
                        r.previous.clone(),
                        old_state.map(|a| &**a),
                    )
                } else if let Some(o) = old_state {
                    let weights = keep_weights(&o.weights(), &initial);
                    // Keep run-time instance lists (`pool set`) for pools whose list the
                    // operator did not edit in the file; an edited list wins.
                    let instances: BTreeMap<String, Vec<InstanceAddr>> = uc
                        .pools
                        .iter()
                        .filter(|p| {
                            o.config.pool(&p.name).map(|op| &op.instances) == Some(&p.instances)
                        })
                        .filter_map(|p| {
                            o.pool(&p.name).map(|ps| {
                                (
                                    p.name.clone(),
                                    ps.instances.iter().map(|i| i.addr.clone()).collect(),
                                )
                            })
                        })
                        .collect();
                    UpstreamState::build(
                        ucfg,
                        &weights,
                        &instances,
                        o.generation + 1,
                        o.previous.clone(),
                        Some(o),
                    )
                } else {
                    UpstreamState::build(ucfg, &initial, &BTreeMap::new(), 1, None, None)
                };
                Arc::new(state)
            })
            .collect();
        let routes = RouteTable::new(&config.routes, |name| {
            config
                .upstreams
                .iter()
                .position(|u| u.name == name)
                .unwrap_or(0)
        });
        let deny = DenyList::new(&config.deny);
        Snapshot {
            config,
            routes,
            deny,
            upstreams,
        }
    }

    pub(crate) fn upstream(&self, name: &str) -> Option<&Arc<UpstreamState>> {
        self.upstreams.iter().find(|u| u.name() == name)
    }

    /// A copy with one upstream replaced.
    fn with_upstream(&self, state: Arc<UpstreamState>) -> Snapshot {
        Snapshot {
            config: self.config.clone(),
            routes: self.routes.clone(),
            deny: self.deny.clone(),
            upstreams: self
                .upstreams
                .iter()
                .map(|u| {
                    if u.name() == state.name() {
                        state.clone()
                    } else {
                        u.clone()
                    }
                })
                .collect(),
        }
    }
}

/// Keep run-time weights across a reload when they still describe the new pool set (same
/// pools, summing to 100); otherwise start from the config's `active`.
fn keep_weights(old: &Weights, initial: &Weights) -> Weights {
    let same_pools = old.keys().eq(initial.keys());
    if same_pools && old.values().sum::<u32>() == 100 {
        old.clone()
    } else {
        initial.clone()
    }
}

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
