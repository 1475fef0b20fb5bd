//! Choosing an instance within a pool: round robin or least requests, skipping instances this
//! request already tried and instances without a resolved address.

use super::{Instance, PoolState};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use switchyard_config::Balance;

/// The outcome of looking for an instance.
#[derive(Debug)]
pub(crate) enum Candidates<'a> {
    /// Use this one.
    Found(&'a Arc<Instance>),
    /// Every instance was tried already.
    Exhausted,
    /// The pool has no instance with an address.
    Unresolved,
    /// The pool has no instances at all.
    Empty,
}

impl PoolState {
    /// Pick an instance not in `tried` (instance ids).
    pub(crate) fn pick(&self, balance: Balance, tried: &[u64]) -> Candidates<'_> {
        let n = self.instances.len();
        if n == 0 {
            return Candidates::Empty;
        }
        let start = self.pool.rr.fetch_add(1, Ordering::Relaxed);
        let mut any_resolved = false;
        let mut best: Option<&Arc<Instance>> = None;
        for k in 0..n {
            let inst = &self.instances[(start + k) % n];
            if inst.current_addr().is_none() {
                continue;
            }
            any_resolved = true;
            if tried.contains(&inst.id) {
                continue;
            }
            match balance {
                Balance::RoundRobin => return Candidates::Found(inst),
                Balance::LeastRequests => {
                    let load = inst.inflight.load(Ordering::Relaxed);
                    if best.is_none_or(|b| load < b.inflight.load(Ordering::Relaxed)) {
                        best = Some(inst);
                    }
                }
            }
        }
        match (best, any_resolved) {
            (Some(i), _) => Candidates::Found(i),
            (None, true) => Candidates::Exhausted,
            (None, false) => Candidates::Unresolved,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::Pool;
    use super::*;
    use std::collections::BTreeMap;

    fn pool(addrs: &[&str]) -> PoolState {
        PoolState {
            pool: Arc::new(Pool::new("blue")),
            weight: 100,
            epoch: 0,
            instances: addrs
                .iter()
                .map(|a| Arc::new(Instance::new(a.parse().unwrap())))
                .collect(),
        }
    }

    #[test]
    fn round_robin_visits_every_instance() {
        let p = pool(&["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]);
        let mut seen = BTreeMap::new();
        for _ in 0..300 {
            let Candidates::Found(i) = p.pick(Balance::RoundRobin, &[]) else {
                panic!("no instance")
            };
            *seen.entry(i.label.clone()).or_insert(0) += 1;
        }
        assert_eq!(
            seen.values().copied().collect::<Vec<_>>(),
            vec![100, 100, 100]
        );
    }

    #[test]
    fn skips_tried_and_unresolved() {
        let p = pool(&["127.0.0.1:1", "app:2"]);
        let first = p.instances[0].id;
        assert!(matches!(
            p.pick(Balance::RoundRobin, &[first]),
            Candidates::Exhausted
        ));
        let only_name = pool(&["app:2"]);
        assert!(matches!(
            only_name.pick(Balance::RoundRobin, &[]),
            Candidates::Unresolved
        ));
        assert!(matches!(
            pool(&[]).pick(Balance::RoundRobin, &[]),
            Candidates::Empty
        ));
    }

    #[test]
    fn least_requests_prefers_idle_instance() {
        let p = pool(&["127.0.0.1:1", "127.0.0.1:2"]);
        p.instances[0].inflight.store(5, Ordering::Relaxed);
        for _ in 0..10 {
            let Candidates::Found(i) = p.pick(Balance::LeastRequests, &[]) else {
                panic!()
            };
            assert_eq!(i.label, "127.0.0.1:2");
        }
    }
}
