//! `status`: the state of every upstream, pool and instance, as `proxyctl status` and
//! `GET /status` show it.

use super::Controller;
use crate::upstream::health::now_ms;
use crate::upstream::UpstreamState;
use std::sync::atomic::Ordering;
use switchyard_control::protocol::{InstanceStatus, PoolPhase, PoolStatus, UpstreamStatus};
use switchyard_control::{Status, PROTOCOL_VERSION};

impl Controller {
    /// The state of every upstream.
    pub(crate) fn status(&self) -> Status {
        let snap = self.shared.load();
        Status {
            protocol: PROTOCOL_VERSION,
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_secs: self.started.elapsed().as_secs(),
            upstreams: snap.upstreams.iter().map(|u| upstream_status(u)).collect(),
        }
    }
}

pub(crate) fn upstream_status(u: &UpstreamState) -> UpstreamStatus {
    let now = now_ms();
    UpstreamStatus {
        name: u.name().to_string(),
        generation: u.generation,
        main: u.pools[u.main].pool.name.clone(),
        weights: u.weights(),
        previous: u.previous.clone(),
        pools: u
            .pools
            .iter()
            .map(|p| {
                let inflight = p.pool.inflight.load(Ordering::Acquire);
                PoolStatus {
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
