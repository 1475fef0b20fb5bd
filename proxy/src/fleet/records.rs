//! What a fleet keeps in etcd, as JSON: the desired state of an upstream and what one proxy
//! serves.

use crate::canary::rollout::Rollout;
use crate::upstream::health::now_ms;
use crate::upstream::stats::Sample;
use crate::upstream::{Runtime, UpstreamState, Weights};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use switchyard_config::InstanceAddr;
use switchyard_control::protocol::RollbackInfo;
use switchyard_control::HealthState;

/// `<prefix>desired/<upstream>`: the routing state every proxy of the fleet serves — the same
/// run-time state a standalone proxy keeps in its state file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Desired {
    pub(crate) generation: u64,
    pub(crate) weights: Weights,
    #[serde(default)]
    pub(crate) previous: Option<Weights>,
    /// Every pool's instances (`host:port`).
    #[serde(default)]
    pub(crate) instances: BTreeMap<String, Vec<String>>,
    /// The pool owning the highest sticky buckets.
    #[serde(default)]
    pub(crate) base: Option<String>,
    /// The sticky bucket table as runs: every proxy maps a bucket to the same pool.
    #[serde(default)]
    pub(crate) buckets: Option<Vec<(String, u32)>>,
    #[serde(default)]
    pub(crate) rollout: Option<Rollout>,
    #[serde(default)]
    pub(crate) last_rollback: Option<RollbackInfo>,
    /// The proxy that wrote it.
    #[serde(default)]
    pub(crate) by: String,
}

impl Desired {
    pub(crate) fn from_state(u: &UpstreamState, by: &str) -> Self {
        let rt = u.runtime();
        Desired {
            generation: rt.generation,
            weights: rt.weights,
            previous: rt.previous,
            instances: rt
                .instances
                .iter()
                .map(|(p, list)| (p.clone(), list.iter().map(|a| a.to_string()).collect()))
                .collect(),
            base: rt.base,
            buckets: rt.buckets,
            rollout: rt.rollout,
            last_rollback: rt.last_rollback,
            by: by.to_string(),
        }
    }

    /// The run-time state to build this proxy's upstream from. Every pool with weight must be
    /// one of this proxy's pools, and every address must parse.
    pub(crate) fn runtime(&self, u: &UpstreamState) -> Result<Runtime, String> {
        for (pool, w) in &self.weights {
            if *w > 0 && u.pool(pool).is_none() {
                return Err(format!(
                    "the fleet gives pool {pool:?} weight {w}, but this proxy's config has no such pool in upstream {}",
                    u.name()
                ));
            }
        }
        if self.weights.values().sum::<u32>() != 100 {
            return Err(format!(
                "the fleet's weights for {} do not sum to 100",
                u.name()
            ));
        }
        let mut instances = BTreeMap::new();
        for (pool, list) in &self.instances {
            if u.pool(pool).is_none() {
                continue;
            }
            let addrs = list
                .iter()
                .map(|a| {
                    a.parse::<InstanceAddr>()
                        .map_err(|e| format!("pool {pool}: {a:?}: {e}"))
                })
                .collect::<Result<Vec<_>, _>>()?;
            instances.insert(pool.clone(), addrs);
        }
        Ok(Runtime {
            weights: self.weights.clone(),
            instances,
            generation: self.generation,
            previous: self.previous.clone(),
            base: self.base.clone(),
            buckets: self.buckets.clone(),
            rollout: self.rollout.clone(),
            last_rollback: self.last_rollback.clone(),
        })
    }
}

/// `<prefix>applied/<name>/<upstream>`: what one proxy serves, on its lease.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Applied {
    pub(crate) generation: u64,
    pub(crate) weights: Weights,
    /// Instances this proxy does not see healthy: `pool/host:port` -> what it sees.
    #[serde(default)]
    pub(crate) down: BTreeMap<String, HealthState>,
    /// Why it cannot apply the desired state, if it cannot.
    #[serde(default)]
    pub(crate) error: Option<String>,
    /// Per pool, cumulative since this proxy started.
    #[serde(default)]
    pub(crate) counts: BTreeMap<String, Counts>,
    /// Unix milliseconds.
    #[serde(default)]
    pub(crate) at_ms: u64,
}

impl Applied {
    pub(crate) fn of(u: &UpstreamState, error: Option<String>) -> Self {
        let now = now_ms();
        Applied {
            generation: u.generation,
            weights: u.weights(),
            down: u
                .pools
                .iter()
                .flat_map(|p| {
                    p.instances.iter().filter_map(move |i| {
                        let state = i.health.reported(now);
                        (state != HealthState::Healthy)
                            .then(|| (format!("{}/{}", p.pool.name, i.label), state))
                    })
                })
                .collect(),
            error,
            counts: u
                .pools
                .iter()
                .map(|p| (p.pool.name.clone(), Counts::from(p.pool.stats.sample())))
                .collect(),
            at_ms: crate::canary::rollout::unix_ms(),
        }
    }
}

/// A pool's cumulative request counts (the canary analysis' input).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Counts {
    pub(crate) requests: u64,
    pub(crate) errors: u64,
    /// Responses per latency bucket (`upstream::stats::FINE_BOUNDS_US`).
    #[serde(default)]
    pub(crate) latency: Vec<u64>,
}

impl From<Sample> for Counts {
    fn from(s: Sample) -> Self {
        Counts {
            requests: s.requests,
            errors: s.errors,
            latency: s.latency.to_vec(),
        }
    }
}

impl Counts {
    /// Add these counts into `s` (bucket by bucket; extra buckets are ignored).
    pub(crate) fn add_to(&self, s: &mut Sample) {
        s.requests = s.requests.saturating_add(self.requests);
        s.errors = s.errors.saturating_add(self.errors);
        for (a, b) in s.latency.iter_mut().zip(&self.latency) {
            *a = a.saturating_add(*b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn state() -> UpstreamState {
        let cfg = switchyard_config::parse(
            "listen: [{addr: '127.0.0.1:0'}]\nupstreams:\n  app:\n    pools:\n      blue: ['127.0.0.1:1']\n      green: ['127.0.0.1:2', 'app-green:8080']\n    active: blue\nroutes: [{path_prefix: /, upstream: app}]\n",
        )
        .unwrap();
        UpstreamState::build(
            Arc::new(cfg.upstreams[0].clone()),
            &Runtime {
                weights: [("blue".to_string(), 100)].into(),
                generation: 3,
                ..Runtime::default()
            },
            None,
        )
    }

    #[test]
    fn a_desired_state_round_trips_through_json_and_builds_the_same_routing() {
        let u = state();
        let w: Weights = [("blue".to_string(), 90), ("green".to_string(), 10)].into();
        let changed = u.with_changes(Some(&w), None);
        let d = Desired::from_state(&changed, "host-a");
        let back: Desired = serde_json::from_slice(&serde_json::to_vec(&d).unwrap()).unwrap();
        assert_eq!(back, d);
        let rt = back.runtime(&u).unwrap();
        let rebuilt = UpstreamState::build(u.config.clone(), &rt, Some(&u));
        assert_eq!(rebuilt.generation, 4);
        assert_eq!(rebuilt.weights(), w);
        assert_eq!(rebuilt.bucket_runs(), changed.bucket_runs());
        assert_eq!(rebuilt.instance_lists(), changed.instance_lists());
    }

    #[test]
    fn a_desired_state_that_does_not_fit_the_config_is_refused_with_the_reason() {
        let u = state();
        let mut d = Desired::from_state(&u, "host-a");
        d.weights = [("blue".to_string(), 50), ("purple".to_string(), 50)].into();
        let e = d.runtime(&u).unwrap_err();
        assert!(e.contains("\"purple\""), "{e}");
        d.weights = [("blue".to_string(), 50)].into();
        assert!(d.runtime(&u).unwrap_err().contains("sum to 100"));
        d.weights = [("blue".to_string(), 100)].into();
        d.instances
            .insert("green".into(), vec!["not an address".into()]);
        assert!(d.runtime(&u).unwrap_err().contains("pool green"));
    }

    #[test]
    fn counts_add_bucket_by_bucket() {
        let mut s = Sample {
            requests: 1,
            errors: 0,
            latency: vec![1, 0, 0].into_boxed_slice(),
        };
        Counts {
            requests: 5,
            errors: 2,
            latency: vec![0, 3, 1, 9],
        }
        .add_to(&mut s);
        assert_eq!((s.requests, s.errors), (6, 2));
        assert_eq!(&*s.latency, &[1, 3, 1]);
    }
}
