//! The per-request pool decision: which pool of an upstream a request goes to.
//!
//! Today the weights alone decide, through [`Split`]: a schedule of 100 slots holding pool
//! indices in proportion to the weights, interleaved by smooth weighted round robin (nginx's
//! algorithm), so every 100 consecutive requests split exactly. A `Split` is built when the
//! weights change, never per request: picking is one relaxed atomic increment and an index.

use std::sync::atomic::{AtomicUsize, Ordering};

/// One upstream's weights, compiled for the request path.
#[derive(Debug)]
pub(crate) struct Split {
    /// Weight per pool index.
    weights: Vec<u32>,
    /// Index of the main pool (largest weight; on a tie the previous main stays main).
    main: usize,
    /// Pool indices in proportion to the weights, interleaved.
    slots: Vec<u8>,
    /// Position in `slots`.
    counter: AtomicUsize,
}

impl Split {
    /// Compile `weights` (one per pool index). `prev_main` keeps its role on a tie.
    pub(crate) fn new(weights: Vec<u32>, prev_main: Option<usize>) -> Split {
        let main = main_pool(&weights, prev_main);
        let slots = weighted_slots(&weights, main);
        Split {
            weights,
            main,
            slots,
            counter: AtomicUsize::new(0),
        }
    }

    /// The main pool's index.
    pub(crate) fn main(&self) -> usize {
        self.main
    }

    /// The weight of pool `i`.
    pub(crate) fn weight(&self, i: usize) -> u32 {
        self.weights.get(i).copied().unwrap_or(0)
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
        let s = Split::new(vec![95, 5, 0], None);
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
        let s = Split::new(vec![u32::MAX, 101], None);
        assert_eq!(s.slots(), &[0]);
        assert_eq!(s.pick(), 0);
        assert_eq!(Split::new(vec![0, 0], None).slots(), &[0]);
    }

    #[test]
    fn tie_keeps_previous_main() {
        assert_eq!(Split::new(vec![50, 50], Some(1)).main(), 1);
        assert_eq!(Split::new(vec![50, 50], Some(0)).main(), 0);
        assert_eq!(Split::new(vec![40, 60], Some(0)).main(), 1);
    }
}
