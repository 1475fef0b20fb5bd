//! The per-request pool decision (SPEC §4): which pool of an upstream a request goes to.
//!
//! In order: the preview header (from an allowed address; any pool, also one at weight 0),
//! the force header (`true`: the canary, `false`: the stable pool — the base, which is the main
//! pool until a canary passes 50 %), the client's sticky bucket,
//! and the weights. The caller reads the request into [`Facts`]; [`Split::decide`] is pure:
//! no I/O, no lock, no allocation — an index into tables built when the weights change.
//!
//! - Weights: a schedule of 100 slots holding pool indices in proportion to the weights,
//!   interleaved by smooth weighted round robin (nginx's algorithm), so every 100 consecutive
//!   requests split exactly; picking is one relaxed atomic increment.
//! - Buckets: 100 buckets, each owned by one pool. The *base* pool is the one that last had all
//!   the traffic; every other pool with weight is a *canary* and owns as many buckets as its
//!   weight, the base the rest. Canaries own the lowest buckets (SPEC §4), and a new table is
//!   built from the previous one: a canary that shrinks gives up its highest buckets, one that
//!   grows takes free buckets first and then the base's lowest — so growing a canary only adds
//!   clients to it, a canary at 0 owns none, and one canary changing never moves the clients of
//!   another. While canaries are below half, the base is the main pool (the SPEC's words);
//!   when a canary passes 50 % (a step of 60, say) it becomes the main pool by weight but stays
//!   the canary — `X-Canary: true` still reaches the new version, and no client moves back.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Number of sticky buckets.
pub(crate) const BUCKETS: usize = 100;

/// What the request says about its pool, read by the caller.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Facts {
    /// The pool named by the preview header, when the client may use it.
    pub(crate) preview: Option<usize>,
    /// The force header: `Some(true)` canary, `Some(false)` the stable (base) pool.
    pub(crate) force: Option<bool>,
    /// The client's sticky bucket (0..100), from its cookie or header.
    pub(crate) bucket: Option<u8>,
}

/// Which rule decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rule {
    /// The preview header.
    Preview,
    /// The force header.
    Forced,
    /// The sticky bucket.
    Sticky,
    /// The weights.
    Weights,
}

/// One upstream's weights, compiled for the request path.
#[derive(Debug)]
pub(crate) struct Split {
    /// Weight per pool index.
    weights: Vec<u32>,
    /// Index of the main pool (largest weight; on a tie the previous main stays main).
    main: usize,
    /// The pool owning the highest buckets (see the module docs).
    base: usize,
    /// The heaviest pool with weight other than the base (`X-Canary: true`).
    canary: Option<usize>,
    /// Pool indices in proportion to the weights, interleaved.
    slots: Vec<u8>,
    /// Bucket -> pool index.
    buckets: [u8; BUCKETS],
    /// Pool index -> the buckets it owns (for a client's first request).
    by_pool: Vec<Vec<u8>>,
    /// Position in `slots`.
    counter: AtomicUsize,
}

impl Split {
    /// Compile `weights` (one per pool index). `prev_main` keeps its role on a tie;
    /// `prev_base` stays the base pool while it has weight; `prev_buckets` (bucket -> pool
    /// index) is the table to change as little as possible.
    pub(crate) fn new(
        weights: Vec<u32>,
        prev_main: Option<usize>,
        prev_base: Option<usize>,
        prev_buckets: Option<&[u8; BUCKETS]>,
    ) -> Split {
        let main = main_pool(&weights, prev_main);
        let base = base_pool(&weights, main, prev_base);
        let canary = weights
            .iter()
            .enumerate()
            .filter(|(i, w)| *i != base && **w > 0)
            // Heaviest; on a tie the first in pool order.
            .max_by_key(|(i, w)| (**w, std::cmp::Reverse(*i)))
            .map(|(i, _)| i);
        let slots = weighted_slots(&weights, main);
        let buckets = bucket_owners(&weights, base, prev_buckets);
        let mut by_pool = vec![Vec::new(); weights.len()];
        for (b, owner) in (0u8..).zip(buckets.iter()) {
            if let Some(list) = by_pool.get_mut(usize::from(*owner)) {
                list.push(b);
            }
        }
        Split {
            weights,
            main,
            base,
            canary,
            slots,
            buckets,
            by_pool,
            counter: AtomicUsize::new(0),
        }
    }

    /// The bucket for a client seen for the first time: its pool by the weights (exact over
    /// every 100 first requests, as [`Self::pick`]), then one of that pool's buckets chosen
    /// by `r` (random). So clients without the cookie — API clients, bots, the first request
    /// of everyone — split as exactly as the weights say, and each keeps its bucket after.
    pub(crate) fn first_sight(&self, r: u32) -> u8 {
        match self.by_pool.get(self.pick()) {
            Some(list) if !list.is_empty() => list[r as usize % list.len()],
            _ => (r % BUCKETS as u32) as u8,
        }
    }

    /// The main pool's index.
    pub(crate) fn main(&self) -> usize {
        self.main
    }

    /// The base pool's index (owner of the highest buckets).
    pub(crate) fn base(&self) -> usize {
        self.base
    }

    /// The pool `X-Canary: true` goes to, if any pool besides the main one has weight.
    pub(crate) fn canary(&self) -> Option<usize> {
        self.canary
    }

    /// The weight of pool `i`.
    pub(crate) fn weight(&self, i: usize) -> u32 {
        self.weights.get(i).copied().unwrap_or(0)
    }

    /// Bucket -> pool index.
    pub(crate) fn buckets(&self) -> &[u8; BUCKETS] {
        &self.buckets
    }

    /// The pool owning `bucket` (taken modulo 100).
    pub(crate) fn owner(&self, bucket: u8) -> usize {
        usize::from(self.buckets[usize::from(bucket) % BUCKETS])
    }

    /// The pool for a request, and the rule that chose it (SPEC §4 order).
    pub(crate) fn decide(&self, facts: &Facts) -> (usize, Rule) {
        if let Some(p) = facts.preview {
            return (p, Rule::Preview);
        }
        match facts.force {
            Some(true) => return (self.canary.unwrap_or(self.main), Rule::Forced),
            Some(false) => return (self.base, Rule::Forced),
            None => {}
        }
        if let Some(b) = facts.bucket {
            return (self.owner(b), Rule::Sticky);
        }
        (self.pick(), Rule::Weights)
    }

    /// The pool for the next request by weight. Exact over every 100 consecutive calls.
    pub(crate) fn pick(&self) -> usize {
        if self.weight(self.main) == 100 {
            return self.main;
        }
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        usize::from(self.slots[n % self.slots.len()])
    }

    /// The slot schedule (tests).
    #[cfg(test)]
    pub(crate) fn slots(&self) -> &[u8] {
        &self.slots
    }
}

/// Largest weight wins; on a tie, the previous main pool stays main.
fn main_pool(weights: &[u32], prev_main: Option<usize>) -> usize {
    let max = weights.iter().copied().max().unwrap_or(0);
    prev_main
        .filter(|&i| weights.get(i) == Some(&max))
        .or_else(|| weights.iter().position(|w| *w == max))
        .unwrap_or(0)
}

/// A pool with all the traffic is the base; otherwise the previous base while it has weight;
/// otherwise the main pool.
fn base_pool(weights: &[u32], main: usize, prev_base: Option<usize>) -> usize {
    if let Some(all) = weights.iter().position(|w| *w >= 100) {
        return all;
    }
    prev_base
        .filter(|&i| weights.get(i).is_some_and(|w| *w > 0))
        .unwrap_or(main)
}

/// Bucket owners: each weighted pool other than the base as many buckets as its weight, the
/// base the rest; changed from `prev` as little as possible (see the module docs), or packed
/// from bucket 0 in pool order without a previous table.
fn bucket_owners(weights: &[u32], base: usize, prev: Option<&[u8; BUCKETS]>) -> [u8; BUCKETS] {
    const FREE: u8 = u8::MAX;
    let n = weights.len();
    let Ok(base_idx) = u8::try_from(base) else {
        return [0; BUCKETS];
    };
    if base >= n || n >= usize::from(FREE) {
        return [base_idx; BUCKETS];
    }
    // Targets: the canaries in pool order (clamped so they fit), the base the rest.
    let mut target = vec![0usize; n];
    let mut used = 0;
    for (i, w) in weights.iter().enumerate() {
        if i != base {
            target[i] = (*w as usize).min(BUCKETS - used);
            used += target[i];
        }
    }
    target[base] = BUCKETS - used;
    let mut out = [FREE; BUCKETS];
    if let Some(p) = prev {
        for (o, owner) in out.iter_mut().zip(p) {
            if usize::from(*owner) < n {
                *o = *owner;
            }
        }
    }
    let mut count = vec![0usize; n];
    for o in out.iter().filter(|o| **o != FREE) {
        count[usize::from(*o)] += 1;
    }
    // A canary over its share gives up its highest buckets.
    for i in (0..n).filter(|i| *i != base) {
        for b in out.iter_mut().rev() {
            if count[i] <= target[i] {
                break;
            }
            if usize::from(*b) == i {
                *b = FREE;
                count[i] -= 1;
            }
        }
    }
    // A canary under its share takes free buckets, lowest first, then the base's lowest.
    for i in (0..n).filter(|i| *i != base) {
        for pass in [FREE, base_idx] {
            for b in out.iter_mut() {
                if count[i] >= target[i] {
                    break;
                }
                if *b == pass {
                    // n < 255, so every pool index fits a u8.
                    *b = i as u8;
                    count[i] += 1;
                }
            }
        }
    }
    // Whatever is left is the base's.
    for b in out.iter_mut().filter(|b| **b == FREE) {
        *b = base_idx;
    }
    out
}

/// Pool indices in proportion to the weights, spread out by smooth weighted round robin.
fn weighted_slots(weights: &[u32], main: usize) -> Vec<u8> {
    let total: i64 = weights.iter().map(|w| i64::from(*w)).sum();
    if !(1..=100).contains(&total) {
        // Weights are checked before they get here (`routing::weights`); should anything
        // else slip through, everything goes to the main pool instead of a schedule of
        // billions of slots.
        return vec![u8::try_from(main).unwrap_or(0)];
    }
    let mut current = vec![0i64; weights.len()];
    let mut slots = Vec::with_capacity(total as usize);
    for _ in 0..total {
        for (c, w) in current.iter_mut().zip(weights) {
            *c += i64::from(*w);
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

    #[test]
    fn weighted_split_is_exact_per_hundred_and_spread_out() {
        // blue, green, canary
        let s = Split::new(vec![95, 5, 0], None, None, None);
        let mut counts = [0u32; 3];
        for _ in 0..1000 {
            counts[s.pick()] += 1;
        }
        assert_eq!(counts, [950, 50, 0]);
        assert_eq!(s.main(), 0);
        let pos: Vec<usize> = s
            .slots()
            .iter()
            .enumerate()
            .filter(|(_, p)| **p == 1)
            .map(|(i, _)| i)
            .collect();
        assert!(pos.windows(2).all(|w| w[1] - w[0] >= 10), "{pos:?}");
    }

    #[test]
    fn weights_that_do_not_sum_to_100_never_build_a_huge_schedule() {
        let s = Split::new(vec![u32::MAX, 101], None, None, None);
        assert_eq!(s.slots(), &[0]);
        assert_eq!(s.pick(), 0);
        assert_eq!(Split::new(vec![0, 0], None, None, None).slots(), &[0]);
    }

    #[test]
    fn tie_keeps_previous_main() {
        assert_eq!(Split::new(vec![50, 50], Some(1), None, None).main(), 1);
        assert_eq!(Split::new(vec![50, 50], Some(0), None, None).main(), 0);
        assert_eq!(Split::new(vec![40, 60], Some(0), None, None).main(), 1);
    }

    /// The pools owning buckets 0..100.
    fn owners(s: &Split) -> Vec<usize> {
        (0..100).map(|b| s.owner(b)).collect()
    }

    #[test]
    fn canaries_own_the_lowest_buckets_and_growing_only_adds_clients() {
        // blue (main, base), green canary 5 -> 25 -> 50 -> 60 -> 100 -> 0.
        let mut prev_main = None;
        let mut prev_base = None;
        let mut prev_buckets: Option<[u8; BUCKETS]> = None;
        let mut on_green: Vec<u8> = Vec::new();
        for g in [5u32, 25, 50, 60, 100] {
            let s = Split::new(
                vec![100 - g, g],
                prev_main,
                prev_base,
                prev_buckets.as_ref(),
            );
            let now: Vec<u8> = (0..100u8).filter(|b| s.owner(*b) == 1).collect();
            assert_eq!(now.len(), g as usize, "green at {g}");
            assert!(
                on_green.iter().all(|b| now.contains(b)),
                "a client on green moved back at {g}"
            );
            assert_eq!(now.first().copied(), Some(0), "the lowest buckets");
            on_green = now;
            if g == 60 {
                assert_eq!((s.main(), s.base()), (1, 0), "green is main by weight ...");
                assert_eq!(s.canary(), Some(1), "... and still the canary");
            }
            prev_main = Some(s.main());
            prev_base = Some(s.base());
            prev_buckets = Some(*s.buckets());
        }
        assert_eq!(
            prev_base,
            Some(1),
            "green had all the traffic: it is the base now"
        );
        let s = Split::new(vec![0, 100], prev_main, prev_base, prev_buckets.as_ref());
        assert!(owners(&s).iter().all(|p| *p == 1));
        // A canary at 0 owns nothing.
        let s = Split::new(vec![100, 0], None, None, None);
        assert!(owners(&s).iter().all(|p| *p == 0));
        // Two canaries, in pool order, below the base.
        let s = Split::new(vec![80, 15, 5], None, None, None);
        let o = owners(&s);
        assert!(o[..15].iter().all(|p| *p == 1) && o[15..20].iter().all(|p| *p == 2));
        assert!(o[20..].iter().all(|p| *p == 0));
        assert_eq!(s.canary(), Some(1), "the heaviest canary");
    }

    /// The pools owning buckets of pool `p`.
    fn of(s: &Split, p: usize) -> Vec<u8> {
        (0..100u8).filter(|b| s.owner(*b) == p).collect()
    }

    /// With one canary at a time and up to 50 %, the table does not depend on the path taken:
    /// a proxy that went 5 → 25 → 0 → 10 → 50 → 30 agrees with one set to 30 in one command.
    #[test]
    fn one_canary_below_half_owns_the_same_buckets_whatever_the_history() {
        let mut s = Split::new(vec![100, 0], None, None, None);
        for w in [5u32, 25, 0, 10, 50, 30, 45, 1] {
            s = Split::new(
                vec![100 - w, w],
                Some(s.main),
                Some(s.base),
                Some(s.buckets()),
            );
            let fresh = Split::new(vec![100 - w, w], None, None, None);
            assert_eq!(s.buckets(), fresh.buckets(), "at {w}");
            assert_eq!(of(&s, 1), (0..w as u8).collect::<Vec<u8>>(), "at {w}");
        }
    }

    #[test]
    fn one_canary_changing_never_moves_another_canarys_clients() {
        // blue (base) 90, purple 10; then green gets 5, grows to 20, purple leaves.
        let s = Split::new(vec![90, 0, 10], None, None, None);
        let purple = of(&s, 2);
        assert_eq!(purple, (0..10).collect::<Vec<u8>>());
        let s = Split::new(vec![85, 5, 10], Some(0), Some(0), Some(s.buckets()));
        assert_eq!(
            of(&s, 2),
            purple,
            "purple's clients stay when green arrives"
        );
        let green = of(&s, 1);
        assert_eq!(green, (10..15).collect::<Vec<u8>>());
        let s = Split::new(vec![70, 20, 10], Some(0), Some(0), Some(s.buckets()));
        let green2 = of(&s, 1);
        assert!(green.iter().all(|b| green2.contains(b)) && green2.len() == 20);
        assert_eq!(of(&s, 2), purple);
        // Purple leaves; green grows to 30 into purple's buckets: its clients stay.
        let s = Split::new(vec![70, 30, 0], Some(0), Some(0), Some(s.buckets()));
        let green3 = of(&s, 1);
        assert!(green2.iter().all(|b| green3.contains(b)) && green3.len() == 30);
        // Green shrinks to 10: it keeps its lowest buckets.
        let s = Split::new(vec![90, 10, 0], Some(0), Some(0), Some(s.buckets()));
        let green4 = of(&s, 1);
        assert!(green4.iter().all(|b| green3.contains(b)) && green4.len() == 10);
        // A garbage previous table (indices past the pools) is repaired.
        let s = Split::new(vec![70, 30], Some(0), Some(0), Some(&[200; BUCKETS]));
        assert_eq!(of(&s, 1).len(), 30);
    }

    #[test]
    fn decision_order_is_preview_force_sticky_weights() {
        let s = Split::new(vec![95, 5, 0], None, None, None);
        let f = |preview, force, bucket| Facts {
            preview,
            force,
            bucket,
        };
        assert_eq!(
            s.decide(&f(Some(2), Some(true), Some(0))),
            (2, Rule::Preview)
        );
        assert_eq!(s.decide(&f(None, Some(true), Some(99))), (1, Rule::Forced));
        assert_eq!(s.decide(&f(None, Some(false), Some(0))), (0, Rule::Forced));
        assert_eq!(s.decide(&f(None, None, Some(4))), (1, Rule::Sticky));
        assert_eq!(s.decide(&f(None, None, Some(5))), (0, Rule::Sticky));
        assert_eq!(s.decide(&f(None, None, None)).1, Rule::Weights);
        // No canary: `X-Canary: true` goes to the main pool.
        let s = Split::new(vec![100, 0, 0], None, None, None);
        assert_eq!(s.decide(&f(None, Some(true), None)), (0, Rule::Forced));
        // Past 50 %: the new pool is main but still the canary; `false` is the stable base.
        let s = Split::new(vec![40, 60], Some(0), Some(0), None);
        assert_eq!(s.decide(&f(None, Some(true), None)), (1, Rule::Forced));
        assert_eq!(s.decide(&f(None, Some(false), None)), (0, Rule::Forced));
    }

    #[test]
    fn first_sights_split_exactly_by_weight_and_stay_in_their_pool() {
        let mut s = Split::new(vec![95, 5], None, None, None);
        s = Split::new(vec![75, 25], Some(s.main), Some(s.base), Some(s.buckets()));
        let mut green = 0;
        for r in 0..1000u32 {
            let b = s.first_sight(r.wrapping_mul(2_654_435_761));
            let facts = Facts {
                bucket: Some(b),
                ..Facts::default()
            };
            green += usize::from(s.decide(&facts).0 == 1);
        }
        assert_eq!(green, 250, "exactly 25% of 1000 first requests");
    }

    /// SPEC §4 invariant 5 over 100k decisions, without stickiness.
    #[test]
    fn split_accuracy_without_stickiness_over_100k_decisions() {
        for w in [1u32, 5, 25, 50] {
            let s = Split::new(vec![100 - w, w], None, None, None);
            let n = 100_000u32;
            let mut green = 0u32;
            for _ in 0..n {
                if s.decide(&Facts::default()).0 == 1 {
                    green += 1;
                }
            }
            let share = f64::from(green) / f64::from(n);
            let p = f64::from(w) / 100.0;
            let sd = (p * (1.0 - p) / f64::from(n)).sqrt();
            let bound = (0.005f64).max(3.0 * sd);
            assert!(
                (share - p).abs() <= bound,
                "weight {w}: share {share:.5}, bound {bound:.5}"
            );
        }
    }

    /// The same with uniformly random buckets (a client that sends a bucket of its choosing,
    /// or `sticky: header` over random user ids).
    #[test]
    fn split_accuracy_with_random_buckets() {
        for w in [1u32, 5, 25, 50] {
            let s = Split::new(vec![100 - w, w], None, None, None);
            let n = 100_000u32;
            let green = (0..n)
                .filter(|_| {
                    let f = Facts {
                        bucket: Some(fastrand::u8(0..100)),
                        ..Facts::default()
                    };
                    s.decide(&f).0 == 1
                })
                .count();
            let share = green as f64 / f64::from(n);
            let p = f64::from(w) / 100.0;
            // Random, so allow 4 standard deviations (a false alarm about once in 16,000 runs).
            let bound = (0.005f64).max(4.0 * (p * (1.0 - p) / f64::from(n)).sqrt());
            assert!((share - p).abs() <= bound, "weight {w}: share {share:.5}");
        }
    }
}
