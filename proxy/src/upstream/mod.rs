//! Upstreams as the request path sees them: pools, their weights and instances, and the
//! generation, in one immutable [`UpstreamState`] per snapshot (SPEC §4).
//!
//! A request loads a snapshot once and uses it to the end, retries included; a change builds a
//! new `UpstreamState` and swaps it in. What must survive a swap — in-flight counters,
//! round-robin position, request counters, resolved addresses, health — lives in the
//! long-lived [`Pool`] and [`Instance`] objects, which successive snapshots share by `Arc`.
//!
//! - `instance`: one backend ([`Instance`]).
//! - `pool`: [`Pool`] (long-lived) and [`PoolState`] (per snapshot).
//! - `select`: choosing an instance within a pool.
//! - `health`: an instance's health as two atomics.
//! - `stats`: a pool's request counters.

pub(crate) mod health;
mod instance;
mod pool;
mod select;
pub(crate) mod stats;

pub(crate) use instance::{Instance, Resolved};
pub(crate) use pool::{Pool, PoolState};
pub(crate) use select::Candidates;

use crate::canary::rollout::Rollout;
use crate::routing::decide::{Facts, Rule, Split, BUCKETS};
use crate::routing::sticky::HeaderNames;
use std::collections::BTreeMap;
use std::sync::Arc;
use switchyard_config::{InstanceAddr, UpstreamConfig};
use switchyard_control::protocol::RollbackInfo;

pub(crate) use switchyard_control::Weights;

/// The run-time part of an upstream's state: what commands change and the state file keeps.
#[derive(Debug, Clone, Default)]
pub(crate) struct Runtime {
    pub(crate) weights: Weights,
    /// Instance lists changed at run time (`pool set`); other pools use the config's.
    pub(crate) instances: BTreeMap<String, Vec<InstanceAddr>>,
    pub(crate) generation: u64,
    /// Weights before the last weight change, for `rollback`.
    pub(crate) previous: Option<Weights>,
    /// The pool owning the highest sticky buckets (`routing::decide`); `None`: the main pool.
    pub(crate) base: Option<String>,
    /// The sticky bucket table as runs of (pool, buckets), to change as little as possible;
    /// `None`: packed in pool order.
    pub(crate) buckets: Option<Vec<(String, u32)>>,
    /// The progressive rollout, running or ended.
    pub(crate) rollout: Option<Rollout>,
    /// The last automatic rollback, with its numbers.
    pub(crate) last_rollback: Option<RollbackInfo>,
}

/// One upstream's routing snapshot.
#[derive(Debug)]
pub(crate) struct UpstreamState {
    /// Settings from the config (timeouts, retries, health...).
    pub(crate) config: Arc<UpstreamConfig>,
    /// Bumped by every change.
    pub(crate) generation: u64,
    /// Pools in name order.
    pub(crate) pools: Vec<PoolState>,
    /// Index of the main pool (largest weight; ties keep the previous main).
    pub(crate) main: usize,
    /// Weights before the last weight change, for `rollback`.
    pub(crate) previous: Option<Weights>,
    /// The progressive rollout, running or ended (`canary::rollout`).
    pub(crate) rollout: Option<Rollout>,
    /// The last automatic rollback, with its numbers.
    pub(crate) last_rollback: Option<RollbackInfo>,
    /// The weights compiled for the per-request decision.
    split: Split,
    /// The header names the decision reads.
    names: HeaderNames,
}

impl UpstreamState {
    /// Build from the run-time state `rt` (weights, instance lists...). Pools and instances
    /// are taken over from `old` where names/addresses match, so a change or a reload keeps
    /// counters and health.
    pub(crate) fn build(
        config: Arc<UpstreamConfig>,
        rt: &Runtime,
        old: Option<&UpstreamState>,
    ) -> Self {
        let pools: Vec<PoolState> = config
            .pools
            .iter()
            .map(|p| {
                let old_pool = old.and_then(|o| o.pool(&p.name));
                let addrs = rt.instances.get(&p.name).unwrap_or(&p.instances);
                let weight = rt.weights.get(&p.name).copied().unwrap_or(0);
                let epoch = match old_pool {
                    Some(op) if op.weight > 0 && weight == 0 => op.epoch + 1,
                    Some(op) => op.epoch,
                    None => 0,
                };
                PoolState {
                    pool: old_pool
                        .map(|op| op.pool.clone())
                        .unwrap_or_else(|| Arc::new(Pool::new(&p.name))),
                    weight,
                    epoch,
                    instances: addrs
                        .iter()
                        .map(|a| {
                            old_pool
                                .and_then(|op| op.instances.iter().find(|i| &i.addr == a))
                                .cloned()
                                .unwrap_or_else(|| Arc::new(Instance::new(a.clone())))
                        })
                        .collect(),
                }
            })
            .collect();
        let index = |name: &str| pools.iter().position(|p| p.pool.name == name);
        let old_main = old
            .map(|o| o.pools[o.main].pool.name.as_str())
            .and_then(index);
        let base = rt
            .base
            .as_deref()
            .or_else(|| old.map(|o| o.pools[o.split.base()].pool.name.as_str()))
            .and_then(index);
        let prev_buckets = rt.buckets.as_ref().and_then(|runs| {
            let mut table = [0u8; BUCKETS];
            let mut at = 0usize;
            for (name, n) in runs {
                // A pool that is gone becomes index 255 ("free"); the table is repaired.
                let idx = index(name)
                    .and_then(|i| u8::try_from(i).ok())
                    .unwrap_or(u8::MAX);
                let end = at.checked_add(usize::try_from(*n).ok()?)?;
                table.get_mut(at..end)?.fill(idx);
                at = end;
            }
            (at == BUCKETS).then_some(table)
        });
        let split = Split::new(
            pools.iter().map(|p| p.weight).collect(),
            old_main,
            base,
            prev_buckets.as_ref(),
        );
        let names = HeaderNames::new(&config);
        UpstreamState {
            config,
            generation: rt.generation,
            main: split.main(),
            pools,
            previous: rt.previous.clone(),
            rollout: rt.rollout.clone(),
            last_rollback: rt.last_rollback.clone(),
            split,
            names,
        }
    }

    /// The run-time state, to build a changed copy from (or to save).
    pub(crate) fn runtime(&self) -> Runtime {
        Runtime {
            weights: self.weights(),
            instances: self.instance_lists(),
            generation: self.generation,
            previous: self.previous.clone(),
            base: Some(self.pools[self.split.base()].pool.name.clone()),
            buckets: Some(self.bucket_runs()),
            rollout: self.rollout.clone(),
            last_rollback: self.last_rollback.clone(),
        }
    }

    /// A copy with the run-time state changed by `f`, generation + 1. When `f` changes the
    /// weights, the old ones become the `rollback` target.
    pub(crate) fn changed(&self, f: impl FnOnce(&mut Runtime)) -> Self {
        let mut rt = self.runtime();
        let current = rt.weights.clone();
        f(&mut rt);
        if rt.weights != current {
            rt.previous = Some(current);
        }
        rt.generation = self.generation + 1;
        UpstreamState::build(self.config.clone(), &rt, Some(self))
    }

    /// A copy with new weights and/or instance lists, generation + 1.
    pub(crate) fn with_changes(
        &self,
        weights: Option<&Weights>,
        instances: Option<(&str, Vec<InstanceAddr>)>,
    ) -> Self {
        self.changed(|rt| {
            if let Some(w) = weights {
                rt.weights = w.clone();
            }
            if let Some((pool, addrs)) = instances {
                rt.instances.insert(pool.to_string(), addrs);
            }
        })
    }

    /// A copy with weights set by a human command (`cmd`): a live rollout ends as aborted — a
    /// human took the weights over, and the autopilot must not move them again.
    pub(crate) fn with_weights_by_human(&self, weights: &Weights, cmd: &str) -> Self {
        let now = crate::canary::rollout::unix_ms();
        self.changed(|rt| {
            rt.weights = weights.clone();
            if let Some(r) = rt.rollout.as_mut().filter(|r| r.is_live()) {
                *r = r.ended(crate::canary::rollout::Phase::Aborted {
                    at_ms: now,
                    by: cmd.to_string(),
                });
            }
        })
    }

    pub(crate) fn name(&self) -> &str {
        &self.config.name
    }

    pub(crate) fn pool(&self, name: &str) -> Option<&PoolState> {
        self.pools.iter().find(|p| p.pool.name == name)
    }

    pub(crate) fn pool_index(&self, name: &str) -> Option<usize> {
        self.pools.iter().position(|p| p.pool.name == name)
    }

    /// Current weights of every pool.
    pub(crate) fn weights(&self) -> Weights {
        self.pools
            .iter()
            .map(|p| (p.pool.name.clone(), p.weight))
            .collect()
    }

    /// Current instance list of every pool.
    pub(crate) fn instance_lists(&self) -> BTreeMap<String, Vec<InstanceAddr>> {
        self.pools
            .iter()
            .map(|p| {
                (
                    p.pool.name.clone(),
                    p.instances.iter().map(|i| i.addr.clone()).collect(),
                )
            })
            .collect()
    }

    /// The pool for the next request by weight alone (see [`crate::routing::decide`]).
    #[cfg(any(test, feature = "test-util"))]
    pub(crate) fn pick_pool(&self) -> usize {
        self.split.pick()
    }

    /// The pool for a request (SPEC §4 order) and the rule that chose it.
    pub(crate) fn decide(&self, facts: &Facts) -> (usize, Rule) {
        self.split.decide(facts)
    }

    /// A first-seen client's sticky bucket (`routing::decide::Split::first_sight`).
    pub(crate) fn first_sight(&self, r: u32) -> u8 {
        self.split.first_sight(r)
    }

    /// Whether a pool other than the base has weight: stickiness matters only then.
    pub(crate) fn canary_active(&self) -> bool {
        self.split.canary().is_some()
    }

    /// The sticky bucket table as runs of (pool name, bucket count).
    pub(crate) fn bucket_runs(&self) -> Vec<(String, u32)> {
        let mut runs: Vec<(String, u32)> = Vec::new();
        for owner in self.split.buckets() {
            let name = &self.pools[usize::from(*owner)].pool.name;
            match runs.last_mut() {
                Some((n, c)) if n == name => *c += 1,
                _ => runs.push((name.clone(), 1)),
            }
        }
        runs
    }

    /// The pool that last had all the traffic (owner of the highest buckets); every other
    /// pool with weight is a canary.
    pub(crate) fn base(&self) -> usize {
        self.split.base()
    }

    /// The stable pool's name (see [`Self::base`]).
    pub(crate) fn base_name(&self) -> &str {
        self.pools
            .get(self.base())
            .map(|p| p.pool.name.as_str())
            .unwrap_or_default()
    }

    /// The header names the pool decision reads.
    pub(crate) fn header_names(&self) -> &HeaderNames {
        &self.names
    }

    /// The pool `X-Canary: true` goes to, if any.
    pub(crate) fn canary(&self) -> Option<usize> {
        self.split.canary()
    }

    /// The index of the pool named by `name` (a request header's bytes).
    pub(crate) fn pool_named(&self, name: &[u8]) -> Option<usize> {
        self.pools
            .iter()
            .position(|p| p.pool.name.as_bytes() == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;
    use switchyard_config::parse;

    fn state(weights: &[(&str, u32)]) -> UpstreamState {
        let cfg = parse(
            "listen: [{addr: '127.0.0.1:0'}]\nupstreams:\n  app:\n    pools:\n      blue: ['127.0.0.1:1', '127.0.0.1:2']\n      green: ['127.0.0.1:3']\n      canary: ['127.0.0.1:4']\n    active: blue\nroutes: [{path_prefix: /, upstream: app}]\n",
        )
        .unwrap();
        let up = Arc::new(cfg.upstreams[0].clone());
        let rt = Runtime {
            weights: weights.iter().map(|(n, w)| (n.to_string(), *w)).collect(),
            generation: 1,
            ..Runtime::default()
        };
        UpstreamState::build(up, &rt, None)
    }

    #[test]
    fn weights_split_the_picks() {
        let s = state(&[("blue", 95), ("green", 5)]);
        let mut counts = BTreeMap::new();
        for _ in 0..1000 {
            *counts
                .entry(s.pools[s.pick_pool()].pool.name.clone())
                .or_insert(0) += 1;
        }
        assert_eq!(counts["blue"], 950);
        assert_eq!(counts["green"], 50);
        assert_eq!(s.pools[s.main].pool.name, "blue");
        assert_eq!(s.pool_index("green"), Some(2), "pools in name order");
    }

    #[test]
    fn changes_keep_counters_and_bump_generation_and_epoch() {
        let s = state(&[("blue", 100)]);
        let blue = s.pool("blue").unwrap().clone();
        blue.pool.inflight.fetch_add(1, Ordering::Relaxed);
        let w: Weights = [("blue".to_string(), 0), ("green".to_string(), 100)].into();
        let s2 = s.with_changes(Some(&w), None);
        assert_eq!(s2.generation, 2);
        assert_eq!(s2.pools[s2.main].pool.name, "green");
        let blue2 = s2.pool("blue").unwrap();
        assert!(Arc::ptr_eq(&blue.pool, &blue2.pool));
        assert!(Arc::ptr_eq(&blue.instances[0], &blue2.instances[0]));
        assert_eq!(blue2.pool.inflight.load(Ordering::Relaxed), 1);
        assert_eq!(
            blue2.epoch,
            blue.epoch + 1,
            "losing all weight bumps the epoch"
        );
        assert_eq!(s2.previous.as_ref().unwrap()["blue"], 100);
        // Replacing instances keeps the unchanged ones.
        let s3 = s2.with_changes(
            None,
            Some((
                "blue",
                vec![
                    "127.0.0.1:2".parse().unwrap(),
                    "127.0.0.1:9".parse().unwrap(),
                ],
            )),
        );
        let b3 = s3.pool("blue").unwrap();
        assert!(Arc::ptr_eq(&b3.instances[0], &blue.instances[1]));
        assert_eq!(b3.instances[1].label, "127.0.0.1:9");
        assert_eq!(
            s3.previous, s2.previous,
            "an instance change is not a weight change"
        );
    }

    #[test]
    fn tie_keeps_previous_main() {
        let s = state(&[("blue", 100)]);
        let w: Weights = [("blue".to_string(), 50), ("green".to_string(), 50)].into();
        let s2 = s.with_changes(Some(&w), None);
        assert_eq!(s2.pools[s2.main].pool.name, "blue");
    }
}
