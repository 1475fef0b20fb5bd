//! Per-upstream routing state: pools, their weights and instances, and the generation.
//!
//! `UpstreamState` is an immutable snapshot (SPEC §4): a request loads it once and uses it to
//! the end, retries included; a change builds a new one and swaps it in. What must survive a
//! swap — in-flight counters, round-robin position, resolved addresses, health — lives in the
//! long-lived `Pool` and `Instance` objects, which successive snapshots share by `Arc`.

pub(crate) mod health;
mod select;

pub(crate) use select::Candidates;

use arc_swap::ArcSwap;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use switchyard_config::{InstanceAddr, UpstreamConfig};

pub(crate) use switchyard_control::Weights;

/// Source of unique instance ids (part of the connection-reuse key).
static NEXT_INSTANCE_ID: AtomicU64 = AtomicU64::new(1);

/// The addresses a configured `host:port` currently resolves to.
#[derive(Debug, Clone, Default)]
pub(crate) struct Resolved {
    /// Current addresses (first one is used); empty while unresolved.
    pub(crate) addrs: Vec<SocketAddr>,
    /// The last resolution error, if the last attempt failed.
    pub(crate) error: Option<String>,
}

/// One backend instance. Shared by every snapshot that lists it, so its counters and resolved
/// address persist across switches; removed and re-added means a new `Instance`.
#[derive(Debug)]
pub(crate) struct Instance {
    /// As configured.
    pub(crate) addr: InstanceAddr,
    /// `addr` as text, for status and logs.
    pub(crate) label: String,
    /// Unique id, mixed into the connection-reuse key: a re-added instance (say, a restarted
    /// container on the same port) never gets connections pooled for its predecessor.
    pub(crate) id: u64,
    /// Current resolution (fixed for IP literals, refreshed by the resolver for names).
    pub(crate) resolved: ArcSwap<Resolved>,
    /// Requests in flight on this instance.
    pub(crate) inflight: AtomicI64,
    /// Active and passive health.
    pub(crate) health: health::Health,
}

impl Instance {
    pub(crate) fn new(addr: InstanceAddr) -> Self {
        let resolved = match addr.socket_addr() {
            Some(sa) => Resolved {
                addrs: vec![sa],
                error: None,
            },
            None => Resolved {
                addrs: vec![],
                error: Some("not resolved yet".into()),
            },
        };
        Instance {
            label: addr.to_string(),
            addr,
            id: NEXT_INSTANCE_ID.fetch_add(1, Ordering::Relaxed),
            resolved: ArcSwap::from_pointee(resolved),
            inflight: AtomicI64::new(0),
            health: health::Health::default(),
        }
    }

    /// The address to connect to now, if resolved.
    pub(crate) fn current_addr(&self) -> Option<SocketAddr> {
        self.resolved.load().addrs.first().copied()
    }
}

/// A named pool's long-lived counters.
#[derive(Debug)]
pub(crate) struct Pool {
    pub(crate) name: String,
    /// The upstream it belongs to (metric labels).
    pub(crate) upstream: String,
    /// Metric handles, created on the first request.
    metrics: std::sync::OnceLock<crate::metrics::PoolMetrics>,
    /// Requests (and upgraded connections) in flight on this pool.
    pub(crate) inflight: AtomicI64,
    /// Round-robin position.
    pub(crate) rr: AtomicUsize,
    /// Whether the last pick found no usable instance and tried them all (logged once per
    /// transition, not per request).
    pub(crate) fail_open: std::sync::atomic::AtomicBool,
}

impl Pool {
    pub(crate) fn new(upstream: &str, name: &str) -> Self {
        Pool {
            name: name.to_string(),
            upstream: upstream.to_string(),
            metrics: std::sync::OnceLock::new(),
            inflight: AtomicI64::new(0),
            rr: AtomicUsize::new(0),
            fail_open: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// This pool's metric handles.
    pub(crate) fn metrics(&self, m: &crate::metrics::Metrics) -> &crate::metrics::PoolMetrics {
        self.metrics
            .get_or_init(|| m.pool(&self.upstream, &self.name))
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
    /// 100 slots holding pool indices in proportion to the weights, interleaved (smooth
    /// weighted round robin, as nginx does), so every 100 consecutive requests split exactly.
    slots: Vec<u8>,
    /// Position in `slots`.
    counter: AtomicUsize,
}

impl UpstreamState {
    /// The initial state from config: `active` has 100%, or `weights` when restoring persisted
    /// state. Pools and instances are taken over from `old` where names/addresses match, so a
    /// reload keeps counters and health.
    pub(crate) fn build(
        config: Arc<UpstreamConfig>,
        weights: &Weights,
        instances: &BTreeMap<String, Vec<InstanceAddr>>,
        generation: u64,
        previous: Option<Weights>,
        old: Option<&UpstreamState>,
    ) -> Self {
        let pools: Vec<PoolState> = config
            .pools
            .iter()
            .map(|p| {
                let old_pool = old.and_then(|o| o.pool(&p.name));
                let addrs = instances.get(&p.name).unwrap_or(&p.instances);
                let weight = weights.get(&p.name).copied().unwrap_or(0);
                let epoch = match old_pool {
                    Some(op) if op.weight > 0 && weight == 0 => op.epoch + 1,
                    Some(op) => op.epoch,
                    None => 0,
                };
                PoolState {
                    pool: old_pool
                        .map(|op| op.pool.clone())
                        .unwrap_or_else(|| Arc::new(Pool::new(&config.name, &p.name))),
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
        let old_main = old.map(|o| o.pools[o.main].pool.name.as_str());
        let main = main_pool(&pools, old_main);
        let slots = weighted_slots(&pools);
        UpstreamState {
            config,
            generation,
            pools,
            main,
            previous,
            slots,
            counter: AtomicUsize::new(0),
        }
    }

    /// A copy with new weights and/or instance lists, generation + 1.
    pub(crate) fn with_changes(
        &self,
        weights: Option<&Weights>,
        instances: Option<(&str, Vec<InstanceAddr>)>,
    ) -> Self {
        let current = self.weights();
        let w = weights.unwrap_or(&current);
        let mut lists = self.instance_lists();
        if let Some((pool, addrs)) = instances {
            lists.insert(pool.to_string(), addrs);
        }
        let previous = match weights {
            Some(new) if *new != current => Some(current.clone()),
            _ => self.previous.clone(),
        };
        UpstreamState::build(
            self.config.clone(),
            w,
            &lists,
            self.generation + 1,
            previous,
            Some(self),
        )
    }

    pub(crate) fn name(&self) -> &str {
        &self.config.name
    }

    pub(crate) fn pool(&self, name: &str) -> Option<&PoolState> {
        self.pools.iter().find(|p| p.pool.name == name)
    }

    #[cfg(test)]
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

    /// The pool for the next request by weight. Exact over every 100 consecutive calls.
    pub(crate) fn pick_pool(&self) -> usize {
        if self.pools[self.main].weight == 100 {
            return self.main;
        }
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        usize::from(self.slots[n % self.slots.len()])
    }
}

/// Largest weight wins; on a tie, the previous main pool stays main.
fn main_pool(pools: &[PoolState], old_main: Option<&str>) -> usize {
    let max = pools.iter().map(|p| p.weight).max().unwrap_or(0);
    pools
        .iter()
        .position(|p| p.weight == max && Some(p.pool.name.as_str()) == old_main)
        .or_else(|| pools.iter().position(|p| p.weight == max))
        .unwrap_or(0)
}

/// 100 pool indices in proportion to the weights, spread out by smooth weighted round robin.
fn weighted_slots(pools: &[PoolState]) -> Vec<u8> {
    let total: i64 = pools.iter().map(|p| i64::from(p.weight)).sum();
    if total == 0 {
        return vec![0];
    }
    let mut current = vec![0i64; pools.len()];
    let mut slots = Vec::with_capacity(total as usize);
    for _ in 0..total {
        for (c, p) in current.iter_mut().zip(pools) {
            *c += i64::from(p.weight);
        }
        let best = current
            .iter()
            .enumerate()
            .max_by_key(|(i, c)| (**c, std::cmp::Reverse(*i)))
            .map(|(i, _)| i)
            .unwrap_or(0);
        current[best] -= total;
        // At most 255 pools can be addressed by a slot; the config cannot realistically hold
        // more, and a larger index falls back to pool 0 rather than panicking.
        slots.push(u8::try_from(best).unwrap_or(0));
    }
    slots
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_config::parse;

    fn state(weights: &[(&str, u32)]) -> UpstreamState {
        let cfg = parse(
            "listen: [{addr: '127.0.0.1:0'}]\nupstreams:\n  app:\n    pools:\n      blue: ['127.0.0.1:1', '127.0.0.1:2']\n      green: ['127.0.0.1:3']\n      canary: ['127.0.0.1:4']\n    active: blue\nroutes: [{path_prefix: /, upstream: app}]\n",
        )
        .unwrap();
        let up = Arc::new(cfg.upstreams[0].clone());
        let w: Weights = weights.iter().map(|(n, w)| (n.to_string(), *w)).collect();
        UpstreamState::build(up, &w, &BTreeMap::new(), 1, None, None)
    }

    #[test]
    fn weighted_split_is_exact_per_hundred() {
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
        // Spread out: the 5 green slots are not adjacent.
        let green = s.pool_index("green").unwrap() as u8;
        let pos: Vec<usize> = s
            .slots
            .iter()
            .enumerate()
            .filter(|(_, p)| **p == green)
            .map(|(i, _)| i)
            .collect();
        assert!(pos.windows(2).all(|w| w[1] - w[0] >= 10), "{pos:?}");
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
