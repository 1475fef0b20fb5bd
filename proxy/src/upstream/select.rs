//! Choosing an instance within a pool: round robin or least requests, over the instances that
//! are healthy and not ejected, skipping those this request already tried. When none is usable
//! the pool fails open — every resolved instance is tried — because refusing all traffic is
//! worse than trying an instance the checks doubt (SPEC §4.4).

use super::{Instance, PoolState};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use switchyard_config::Balance;

/// Whether this request may use `inst`: it has an address, was not tried, and passes `ok`.
fn eligible(inst: &Instance, tried: &[u64], ok: &impl Fn(&Instance) -> bool) -> bool {
    inst.current_addr().is_some() && !tried.contains(&inst.id) && ok(inst)
}

/// Pools larger than this use "power of two choices" for least requests instead of a scan.
const P2C_ABOVE: usize = 16;

/// The outcome of looking for an instance.
#[derive(Debug)]
pub(crate) enum Candidates<'a> {
    /// Use this one. `fail_open`: no instance of the pool is usable, so health was ignored.
    Found {
        inst: &'a Arc<Instance>,
        fail_open: bool,
    },
    /// Every instance was tried already.
    Exhausted,
    /// The pool has no instance with an address.
    Unresolved,
    /// The pool has no instances at all.
    Empty,
}

impl PoolState {
    /// Pick an instance not in `tried` (instance ids); `now_ms` for ejection deadlines.
    pub(crate) fn pick(&self, balance: Balance, tried: &[u64], now_ms: u64) -> Candidates<'_> {
        let n = self.instances.len();
        if n == 0 {
            return Candidates::Empty;
        }
        let start = self.pool.rr.fetch_add(1, Ordering::Relaxed);
        if let Some(inst) = self.scan(balance, tried, start, |i| i.health.usable(now_ms)) {
            return Candidates::Found {
                inst,
                fail_open: false,
            };
        }
        let any_usable = self
            .instances
            .iter()
            .any(|i| i.current_addr().is_some() && i.health.usable(now_ms));
        if let Some(inst) = self.scan(balance, tried, start, |_| true) {
            return Candidates::Found {
                inst,
                fail_open: !any_usable,
            };
        }
        if self.instances.iter().any(|i| i.current_addr().is_some()) {
            Candidates::Exhausted
        } else {
            Candidates::Unresolved
        }
    }

    /// The instance to use among resolved, untried ones accepted by `ok`.
    fn scan(
        &self,
        balance: Balance,
        tried: &[u64],
        start: usize,
        ok: impl Fn(&Instance) -> bool,
    ) -> Option<&Arc<Instance>> {
        if balance == Balance::LeastRequests && self.instances.len() > P2C_ABOVE {
            if let Some(i) = self.two_choices(tried, start, &ok) {
                return Some(i);
            }
        }
        self.scan_all(balance, tried, start, ok)
    }

    /// Least requests for big pools: the less loaded of two instances drawn at random ("power of
    /// two choices"), O(1) instead of a scan of every instance, and nearly as well balanced.
    /// `None` when the draws found fewer than two eligible instances (the caller scans).
    fn two_choices(
        &self,
        tried: &[u64],
        start: usize,
        ok: &impl Fn(&Instance) -> bool,
    ) -> Option<&Arc<Instance>> {
        let n = self.instances.len();
        let mut picked: [Option<&Arc<Instance>>; 2] = [None, None];
        let mut found = 0;
        // A few draws: enough unless most of the pool is unusable.
        for k in 0..8usize {
            let i = &self.instances[start.wrapping_mul(0x9E37_79B9).wrapping_add(k * 7919) % n];
            if !eligible(i, tried, ok) {
                continue;
            }
            if picked[0].is_some_and(|p| p.id == i.id) {
                continue;
            }
            picked[found] = Some(i);
            found += 1;
            if found == 2 {
                break;
            }
        }
        match picked {
            [Some(a), Some(b)] => Some(
                if b.inflight.load(Ordering::Relaxed) < a.inflight.load(Ordering::Relaxed) {
                    b
                } else {
                    a
                },
            ),
            _ => None,
        }
    }

    /// Every instance in turn from `start`.
    fn scan_all(
        &self,
        balance: Balance,
        tried: &[u64],
        start: usize,
        ok: impl Fn(&Instance) -> bool,
    ) -> Option<&Arc<Instance>> {
        let n = self.instances.len();
        let mut best: Option<&Arc<Instance>> = None;
        for k in 0..n {
            let inst = &self.instances[(start + k) % n];
            if !eligible(inst, tried, &ok) {
                continue;
            }
            match balance {
                Balance::RoundRobin => return Some(inst),
                Balance::LeastRequests => {
                    let load = inst.inflight.load(Ordering::Relaxed);
                    if best.is_none_or(|b| load < b.inflight.load(Ordering::Relaxed)) {
                        best = Some(inst);
                    }
                }
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::super::health::now_ms;
    use super::super::Pool;
    use super::*;
    use std::collections::BTreeMap;
    use switchyard_control::HealthState;

    fn pool(addrs: &[&str]) -> PoolState {
        let p = PoolState {
            pool: Arc::new(Pool::new("blue")),
            weight: 100,
            epoch: 0,
            instances: addrs
                .iter()
                .map(|a| Arc::new(Instance::new(a.parse().unwrap())))
                .collect(),
        };
        for i in &p.instances {
            i.health.force(HealthState::Healthy);
        }
        p
    }

    fn found(c: Candidates<'_>) -> (String, bool) {
        match c {
            Candidates::Found { inst, fail_open } => (inst.label.clone(), fail_open),
            other => panic!("no instance: {other:?}"),
        }
    }

    #[test]
    fn round_robin_visits_every_instance() {
        let p = pool(&["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]);
        let mut seen = BTreeMap::new();
        for _ in 0..300 {
            *seen
                .entry(found(p.pick(Balance::RoundRobin, &[], now_ms())).0)
                .or_insert(0) += 1;
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
            p.pick(Balance::RoundRobin, &[first], now_ms()),
            Candidates::Exhausted
        ));
        let only_name = pool(&["app:2"]);
        assert!(matches!(
            only_name.pick(Balance::RoundRobin, &[], now_ms()),
            Candidates::Unresolved
        ));
        assert!(matches!(
            pool(&[]).pick(Balance::RoundRobin, &[], now_ms()),
            Candidates::Empty
        ));
    }

    #[test]
    fn least_requests_prefers_idle_instance() {
        let p = pool(&["127.0.0.1:1", "127.0.0.1:2"]);
        p.instances[0].inflight.store(5, Ordering::Relaxed);
        for _ in 0..10 {
            assert_eq!(
                found(p.pick(Balance::LeastRequests, &[], now_ms())).0,
                "127.0.0.1:2"
            );
        }
    }

    #[test]
    fn least_requests_on_a_big_pool_avoids_busy_instances() {
        let addrs: Vec<String> = (1..=100).map(|p| format!("127.0.0.1:{p}")).collect();
        let refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
        let p = pool(&refs);
        // Half the pool is busy: two choices must rarely land there.
        for i in &p.instances[..50] {
            i.inflight.store(10, Ordering::Relaxed);
        }
        let mut busy = 0;
        for _ in 0..1000 {
            let (label, _) = found(p.pick(Balance::LeastRequests, &[], now_ms()));
            let port: usize = label.rsplit(':').next().unwrap().parse().unwrap();
            if port <= 50 {
                busy += 1;
            }
        }
        // Both draws busy: 25% expected; a scan would give 0%, random 50%.
        assert!(busy < 400, "{busy} of 1000 picks went to a busy instance");
    }

    #[test]
    fn unhealthy_and_ejected_instances_are_skipped_then_the_pool_fails_open() {
        let p = pool(&["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]);
        let now = now_ms();
        p.instances[0].health.force(HealthState::Unhealthy);
        p.instances[1].health.eject(now + 60_000, now);
        for _ in 0..10 {
            assert_eq!(
                found(p.pick(Balance::RoundRobin, &[], now)),
                ("127.0.0.1:3".to_string(), false)
            );
        }
        // A retry after the only usable one failed: the others, but it is not a fail-open.
        let third = p.instances[2].id;
        assert!(!found(p.pick(Balance::RoundRobin, &[third], now)).1);
        p.instances[2].health.force(HealthState::Unknown);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..30 {
            let (label, fail_open) = found(p.pick(Balance::RoundRobin, &[], now));
            assert!(fail_open);
            seen.insert(label);
        }
        assert_eq!(seen.len(), 3, "fail open tries them all");
    }
}
