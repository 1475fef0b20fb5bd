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

    /// Keep the instance lists of pools this proxy does not know from `current` (the fleet's
    /// desired state), so a write from a proxy whose config lacks a pool does not drop it.
    pub(crate) fn carry_unknown(&mut self, current: &Desired) {
        for (pool, list) in &current.instances {
            self.instances
                .entry(pool.clone())
                .or_insert_with(|| list.clone());
        }
    }

    /// The run-time state to build this proxy's upstream from, checked as strictly as the
    /// state file: weights by the rules (each 0..=100, summing to 100), every pool with weight
    /// one of this proxy's pools, every pool with instances too, every address parseable, a
    /// rollout this version could have written.
    pub(crate) fn runtime(&self, u: &UpstreamState) -> Result<Runtime, String> {
        use crate::routing::weights;
        weights::check(&self.weights)
            .map_err(|e| format!("the fleet's weights for {}: {e}", u.name()))?;
        if let Some(p) = &self.previous {
            weights::check(p)
                .map_err(|e| format!("the fleet's previous weights for {}: {e}", u.name()))?;
        }
        for (pool, w) in &self.weights {
            if *w > 0 && u.pool(pool).is_none() {
                return Err(format!(
                    "the fleet gives pool {pool:?} weight {w}, but this proxy's config has no such pool in upstream {}",
                    u.name()
                ));
            }
        }
        let mut instances = BTreeMap::new();
        for (pool, list) in &self.instances {
            if u.pool(pool).is_none() {
                // A pool other proxies have (a config rolled out to them first): not served
                // here, and carried through this proxy's writes (`carry_unknown`).
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
        let names: Vec<&str> = u.pools.iter().map(|p| p.pool.name.as_str()).collect();
        if let Some(r) = &self.rollout {
            let pool_weight = Some(self.weights.get(&r.pool).copied().unwrap_or(0));
            if !r.is_valid_for(&names, pool_weight, crate::canary::rollout::unix_ms()) {
                return Err(format!(
                    "the fleet's rollout of {} does not fit (pool, steps, interval, times or weight)",
                    u.name()
                ));
            }
        }
        let previous = self
            .previous
            .as_ref()
            .and_then(|p| weights::carry_over(p, names.iter().copied()));
        Ok(Runtime {
            weights: self.weights.clone(),
            instances,
            generation: self.generation,
            previous,
            base: self.base.clone().filter(|b| names.contains(&b.as_str())),
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
    /// The revision of the desired state this proxy serves: what a fleet change waits for
    /// (generations are per proxy: a local reload bumps them).
    #[serde(default)]
    pub(crate) revision: i64,
    /// Random per process: counts from another boot are not continued but started over.
    #[serde(default)]
    pub(crate) boot: u64,
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
    pub(crate) fn of(
        u: &UpstreamState,
        revision: i64,
        boot: u64,
        error: Option<String>,
        with_counts: bool,
    ) -> Self {
        let now = now_ms();
        Applied {
            generation: u.generation,
            revision,
            boot,
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
            counts: if with_counts {
                u.pools
                    .iter()
                    .map(|p| (p.pool.name.clone(), Counts::from(p.pool.stats.sample())))
                    .collect()
            } else {
                BTreeMap::new()
            },
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
    /// What grew from `older` to `self`; `None` if anything went back (another process, or a
    /// pool recreated by a reload: start over from here).
    pub(crate) fn growth(&self, older: &Counts) -> Option<Counts> {
        if self.requests < older.requests
            || self.errors < older.errors
            || self.latency.len() != older.latency.len()
            || self.latency.iter().zip(&older.latency).any(|(a, b)| a < b)
        {
            return None;
        }
        Some(Counts {
            requests: self.requests - older.requests,
            errors: self.errors - older.errors,
            latency: self
                .latency
                .iter()
                .zip(&older.latency)
                .map(|(a, b)| a - b)
                .collect(),
        })
    }

    /// Add `other` into these counts (bucket by bucket).
    pub(crate) fn accumulate(&mut self, other: &Counts) {
        self.requests = self.requests.saturating_add(other.requests);
        self.errors = self.errors.saturating_add(other.errors);
        if self.latency.len() < other.latency.len() {
            self.latency.resize(other.latency.len(), 0);
        }
        for (a, b) in self.latency.iter_mut().zip(&other.latency) {
            *a = a.saturating_add(*b);
        }
    }

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
        assert!(
            d.runtime(&u).unwrap_err().contains("sum"),
            "{:?}",
            d.runtime(&u)
        );
        // Wrapping sums are not 100.
        d.weights = [("blue".to_string(), u32::MAX), ("green".to_string(), 101)].into();
        assert!(d.runtime(&u).is_err());
        // Instances of a pool this proxy does not have are not served here, and a write of
        // this proxy carries them through.
        d.weights = [("blue".to_string(), 100)].into();
        d.instances
            .insert("purple".into(), vec!["127.0.0.1:9".into()]);
        assert!(d.runtime(&u).is_ok());
        let mut mine = Desired::from_state(&u, "host-b");
        mine.carry_unknown(&d);
        assert_eq!(mine.instances["purple"], vec!["127.0.0.1:9".to_string()]);
        d.instances.remove("purple");
        d.weights = [("blue".to_string(), 100)].into();
        d.instances
            .insert("green".into(), vec!["not an address".into()]);
        assert!(d.runtime(&u).unwrap_err().contains("pool green"));
    }

    #[test]
    fn counts_grow_only_forward() {
        let a = Counts {
            requests: 10,
            errors: 2,
            latency: vec![5, 5],
        };
        let b = Counts {
            requests: 15,
            errors: 2,
            latency: vec![7, 8],
        };
        assert_eq!(
            b.growth(&a),
            Some(Counts {
                requests: 5,
                errors: 0,
                latency: vec![2, 3]
            })
        );
        assert_eq!(a.growth(&b), None, "a restart: start over");
        let mut total = Counts::default();
        total.accumulate(&b);
        total.accumulate(&a);
        assert_eq!((total.requests, total.latency.clone()), (25, vec![12, 13]));
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
