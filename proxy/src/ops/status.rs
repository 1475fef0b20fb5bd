//! `status`: the state of every upstream, pool and instance, as `proxyctl status` and
//! `GET /status` show it.

use super::autopilot::Observed;
use super::canary::rollout_status;
use super::Controller;
use crate::canary::rollout::unix_ms;
use crate::upstream::health::now_ms;
use crate::upstream::UpstreamState;
use std::sync::atomic::Ordering;
use switchyard_config::Sticky;
use switchyard_control::protocol::{InstanceStatus, PoolPhase, PoolStatus, UpstreamStatus};
use switchyard_control::{Status, PROTOCOL_VERSION};

impl Controller {
    /// The state of every upstream.
    pub(crate) fn status(&self) -> Status {
        let snap = self.shared.load();
        let observed = self.observed.get();
        Status {
            protocol: PROTOCOL_VERSION,
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_secs: self.started.elapsed().as_secs(),
            pid: std::process::id(),
            upstreams: snap
                .upstreams
                .iter()
                .map(|u| upstream_status(u, observed.get(u.name())))
                .collect(),
        }
    }
}

pub(crate) fn upstream_status(u: &UpstreamState, observed: Option<&Observed>) -> UpstreamStatus {
    let now = now_ms();
    UpstreamStatus {
        name: u.name().to_string(),
        generation: u.generation,
        main: u.pools[u.main].pool.name.clone(),
        weights: u.weights(),
        previous: u.previous.clone(),
        sticky: match &u.config.canary.sticky {
            Sticky::None => "none".into(),
            Sticky::Cookie => "cookie".into(),
            Sticky::Header(h) => format!("header:{h}"),
        },
        rollout: u.rollout.as_ref().map(|r| {
            let waiting = observed
                .and_then(|o| o.waiting.clone())
                .filter(|(id, _)| *id == r.id)
                .map(|(_, w)| w);
            rollout_status(r, unix_ms(), waiting)
        }),
        last_rollback: u.last_rollback.clone(),
        pools: u
            .pools
            .iter()
            .map(|p| {
                let inflight = p.pool.inflight.load(Ordering::Acquire);
                // The base (the pool that last had all the traffic) is `stable`; every other
                // pool with weight is a `canary` (the new version also past 50 %).
                let index = u.pool_index(&p.pool.name);
                let role = if index == Some(u.base()) {
                    Some("stable".to_string())
                } else if p.weight > 0 {
                    Some("canary".to_string())
                } else {
                    None
                };
                PoolStatus {
                    role,
                    live: observed.and_then(|o| o.pools.get(&p.pool.name).cloned()),
                    name: p.pool.name.clone(),
                    weight: p.weight,
                    phase: match (p.weight, inflight) {
                        (w, _) if w > 0 => PoolPhase::Active,
                        (_, n) if n > 0 => PoolPhase::Draining,
                        _ => PoolPhase::Drained,
                    },
                    inflight,
                    instances: p
                        .instances
                        .iter()
                        .map(|i| {
                            let r = i.resolved.load();
                            let d = i.health.detail();
                            InstanceStatus {
                                addr: i.label.clone(),
                                resolved: r.addrs.first().map(|a| a.to_string()),
                                resolve_error: r.error.clone(),
                                inflight: i.inflight.load(Ordering::Acquire),
                                health: i.health.reported(now),
                                last_check: d.last_check,
                                health_since_secs: d.since.elapsed().as_secs(),
                                ejected_for_secs: i
                                    .health
                                    .ejected_for(now)
                                    .map(|d| d.as_secs().max(1)),
                                passive_failures: i.health.passive_failures(),
                            }
                        })
                        .collect(),
                }
            })
            .collect(),
    }
}
