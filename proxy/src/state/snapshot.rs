//! The routing snapshot: everything a request is routed by — the config-derived settings, the
//! route table, the deny list and each upstream's `UpstreamState` — built from a config, the
//! state file or the previous snapshot.

use crate::routing::sticky::StickyKey;
use crate::routing::weights;
use crate::routing::{DenyList, RouteTable};
use crate::upstream::{Runtime, UpstreamState, Weights};
use std::collections::BTreeMap;
use std::sync::Arc;
use switchyard_config::{Config, InstanceAddr};

/// Everything a request is routed by.
#[derive(Debug)]
pub(crate) struct Snapshot {
    pub(crate) config: Arc<Config>,
    pub(crate) routes: RouteTable,
    pub(crate) deny: DenyList,
    /// In the order of `config.upstreams`.
    pub(crate) upstreams: Vec<Arc<UpstreamState>>,
    /// The secret behind sticky cookies (kept in the state file, never changed).
    pub(crate) sticky: Arc<StickyKey>,
    /// The request-id header (`request_id`), parsed once (to find it in requests)...
    pub(crate) request_id: http::HeaderName,
    /// ... and spelled as configured (to return it on responses; the app gets the lowercase
    /// name, see `proxy/forward.rs`).
    pub(crate) request_id_spelled: bytes::Bytes,
    /// Set when the snapshot is stored: 1, 2, 3... (see [`super::Shared::bind`]).
    pub(crate) version: u64,
}

/// What the state file gave back.
#[derive(Debug, Clone, Default)]
pub(crate) struct Restored {
    /// Per upstream.
    pub(crate) upstreams: BTreeMap<String, Runtime>,
    /// The sticky-cookie key, if the file had one.
    pub(crate) sticky: Option<StickyKey>,
}

impl Snapshot {
    /// Build from config. Per upstream, runtime state comes from `restored` when given
    /// (state file), else from `old` (a reload keeps weights and pools changed at run time
    /// where they still exist), else from the config's `active`. The sticky key comes from
    /// `old`, else `restored`, else `sticky`.
    pub(crate) fn build(
        config: Arc<Config>,
        restored: &Restored,
        old: Option<&Snapshot>,
        sticky: impl FnOnce() -> StickyKey,
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
                let state = if let Some(r) = restored
                    .upstreams
                    .get(&uc.name)
                    .filter(|r| {
                        let ok = weighted_pools_have_instances(uc, &r.weights, &r.instances);
                        if !ok {
                            tracing::warn!(upstream = %uc.name, "the state file gives weight to a pool that now has no instances; using the config's active pool");
                        }
                        ok
                    })
                {
                    UpstreamState::build(ucfg, r, old_state.map(|a| &**a))
                } else if let Some(o) = old_state {
                    // Run-time weights survive while the pools that have weight exist (new
                    // pools get 0); a rollback target naming a removed pool is dropped.
                    let pools = || uc.pools.iter().map(|p| p.name.as_str());
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
                    // A pool keeping its weight must still have instances (the file may have
                    // emptied its list); otherwise the file's `active` takes over.
                    let kept = weights::carry_over(&o.weights(), pools())
                        .filter(|w| weighted_pools_have_instances(uc, w, &instances));
                    let reset = kept.is_none();
                    let weights = kept.unwrap_or(initial);
                    let previous = o
                        .previous
                        .as_ref()
                        .and_then(|p| weights::carry_over(p, pools()))
                        .filter(|p| weighted_pools_have_instances(uc, p, &instances));
                    // A rollout keeps going while its pool exists; the last rollback stays
                    // on record while its pool exists.
                    let pool_exists = |p: &str| uc.pool(p).is_some();
                    // The weights could not be kept: a live rollout cannot go on from them.
                    let rollout = o.rollout.clone().filter(|r| pool_exists(&r.pool)).map(|r| {
                        if reset && r.is_live() {
                            r.ended(crate::canary::rollout::Phase::Aborted {
                                at_ms: crate::canary::rollout::unix_ms(),
                                by: "reload".into(),
                            })
                        } else {
                            r
                        }
                    });
                    let last_rollback = o.last_rollback.clone().filter(|r| pool_exists(&r.pool));
                    let rt = Runtime {
                        weights,
                        instances,
                        generation: o.generation + 1,
                        previous,
                        base: None,
                        buckets: Some(o.bucket_runs()),
                        rollout,
                        last_rollback,
                    };
                    UpstreamState::build(ucfg, &rt, Some(o))
                } else {
                    let rt = Runtime {
                        weights: initial,
                        generation: 1,
                        ..Runtime::default()
                    };
                    UpstreamState::build(ucfg, &rt, None)
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
        let sticky = old
            .map(|o| o.sticky.clone())
            .or_else(|| restored.sticky.clone().map(Arc::new))
            .unwrap_or_else(|| Arc::new(sticky()));
        // Validated as a header name by the config; the default should anything slip through.
        let (request_id, request_id_spelled) =
            match http::HeaderName::from_bytes(config.request_id.as_bytes()) {
                Ok(n) => (n, bytes::Bytes::from(config.request_id.clone())),
                Err(_) => (
                    http::HeaderName::from_static("x-request-id"),
                    bytes::Bytes::from_static(b"X-Request-Id"),
                ),
            };
        Snapshot {
            config,
            routes,
            deny,
            upstreams,
            sticky,
            request_id,
            request_id_spelled,
            version: 0,
        }
    }

    pub(crate) fn upstream(&self, name: &str) -> Option<&Arc<UpstreamState>> {
        self.upstreams.iter().find(|u| u.name() == name)
    }

    /// A copy with one upstream replaced.
    pub(super) fn with_upstream(&self, state: Arc<UpstreamState>) -> Snapshot {
        Snapshot {
            version: 0,
            config: self.config.clone(),
            routes: self.routes.clone(),
            deny: self.deny.clone(),
            sticky: self.sticky.clone(),
            request_id: self.request_id.clone(),
            request_id_spelled: self.request_id_spelled.clone(),
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

/// Whether every pool with weight in `w` has an instance: from `instances` (run-time lists)
/// or else from the config. A pool without instances cannot take traffic (`check_targets`).
fn weighted_pools_have_instances(
    uc: &switchyard_config::UpstreamConfig,
    w: &Weights,
    instances: &BTreeMap<String, Vec<InstanceAddr>>,
) -> bool {
    w.iter().filter(|(_, v)| **v > 0).all(|(p, _)| {
        instances
            .get(p)
            .or_else(|| uc.pool(p).map(|pc| &pc.instances))
            .is_some_and(|l| !l.is_empty())
    })
}
