//! The rules every set of weights obeys (SPEC §4): each weight is 0..=100 and together they
//! sum to 100. Checked wherever weights come in — the control socket, the library, the state
//! file, a reload — in 64-bit arithmetic, so `4294967295 + 101` cannot wrap to 100.

use switchyard_control::Weights;

/// Why a set of weights is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum WeightsError {
    /// A weight above 100.
    Above100 { pool: String, weight: u32 },
    /// Weights not summing to 100.
    Sum { sum: u64, weights: String },
}

impl std::fmt::Display for WeightsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WeightsError::Above100 { pool, weight } => {
                write!(
                    f,
                    "weight {pool}={weight} is above 100 (weights are 0..=100)"
                )
            }
            WeightsError::Sum { sum, weights } => {
                write!(f, "weights must sum to 100, these sum to {sum} ({weights})")
            }
        }
    }
}

/// `blue=90 green=10`.
pub(crate) fn fmt_weights(w: &Weights) -> String {
    w.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Each weight 0..=100, summing to 100.
pub(crate) fn check(w: &Weights) -> Result<(), WeightsError> {
    if let Some((pool, weight)) = w.iter().find(|(_, v)| **v > 100) {
        return Err(WeightsError::Above100 {
            pool: pool.clone(),
            weight: *weight,
        });
    }
    let sum: u64 = w.values().map(|v| u64::from(*v)).sum();
    if sum != 100 {
        return Err(WeightsError::Sum {
            sum,
            weights: fmt_weights(w),
        });
    }
    Ok(())
}

/// Run-time weights carried over to a new set of pools (a reload, a restart with an edited
/// config): kept when they are valid and every pool that has weight still exists; pools that
/// are new get 0. `None` when they cannot be kept.
pub(crate) fn carry_over<'a>(
    old: &Weights,
    pools: impl IntoIterator<Item = &'a str>,
) -> Option<Weights> {
    check(old).ok()?;
    let mut next: Weights = pools.into_iter().map(|p| (p.to_string(), 0)).collect();
    for (pool, w) in old {
        match next.get_mut(pool) {
            Some(slot) => *slot = *w,
            None if *w == 0 => {}
            None => return None,
        }
    }
    Some(next)
}

/// `w` with `pool` at `value` (0..=100): the difference is taken from (or given to) the other
/// pools, heaviest first — for two pools, the other one simply gets `100 - value`. `None` when
/// `pool` is unknown, `value` is above 100, or the weight to give back has no pool to go to
/// (`pool` had everything and is set lower while every other pool is at 0 — the caller must
/// say where the traffic goes).
///
/// With `stable` (another pool with weight) the difference goes first to, or comes first
/// from, that pool: a canary's steps and rollbacks trade with the stable pool, not with
/// another canary that happens to be heavier.
pub(crate) fn with_pool_at_via(
    w: &Weights,
    pool: &str,
    value: u32,
    stable: Option<&str>,
) -> Option<Weights> {
    let old = *w.get(pool)?;
    if value > 100 {
        return None;
    }
    let mut out = w.clone();
    out.insert(pool.to_string(), value);
    // Others heaviest first; on a tie in name order (BTreeMap order, stable sort).
    let mut others: Vec<(String, u32)> = w
        .iter()
        .filter(|(k, _)| k.as_str() != pool)
        .map(|(k, v)| (k.clone(), *v))
        .collect();
    others.sort_by_key(|o| std::cmp::Reverse(o.1));
    if let Some(i) = stable.and_then(|s| others.iter().position(|o| o.0 == s && o.1 > 0)) {
        let s = others.remove(i);
        others.insert(0, s);
    }
    if value > old {
        let mut need = value - old;
        for (name, have) in &others {
            let take = need.min(*have);
            out.insert(name.clone(), have - take);
            need -= take;
        }
        if need > 0 {
            return None;
        }
    } else if value < old {
        let (name, have) = others.iter().find(|(_, v)| *v > 0)?;
        out.insert(name.clone(), have + (old - value));
    }
    check(&out).ok().map(|_| out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(list: &[(&str, u32)]) -> Weights {
        list.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    #[test]
    fn weights_are_0_to_100_and_sum_to_100_without_wrapping() {
        assert!(check(&w(&[("blue", 90), ("green", 10)])).is_ok());
        assert_eq!(
            check(&w(&[("blue", u32::MAX), ("green", 101)])),
            Err(WeightsError::Above100 {
                pool: "blue".into(),
                weight: u32::MAX
            })
        );
        // Each below 100 but a sum that would wrap a u32 twice over is still a wrong sum.
        let many: Weights = (0..100).map(|i| (format!("p{i}"), 100)).collect();
        assert!(matches!(
            check(&many),
            Err(WeightsError::Sum { sum: 10000, .. })
        ));
        assert!(matches!(
            check(&w(&[("blue", 50)])),
            Err(WeightsError::Sum { sum: 50, .. })
        ));
    }

    #[test]
    fn carry_over_keeps_weights_while_weighted_pools_exist() {
        let old = w(&[("blue", 90), ("green", 10)]);
        assert_eq!(
            carry_over(&old, ["blue", "canary", "green"]),
            Some(w(&[("blue", 90), ("canary", 0), ("green", 10)])),
            "a new pool gets 0"
        );
        assert_eq!(carry_over(&old, ["blue"]), None, "green had weight");
        let idle_gone = w(&[("blue", 100), ("green", 0)]);
        assert_eq!(
            carry_over(&idle_gone, ["blue", "canary"]),
            Some(w(&[("blue", 100), ("canary", 0)])),
            "a removed pool without weight does not matter"
        );
        assert_eq!(carry_over(&w(&[("blue", 200)]), ["blue"]), None);
    }

    #[test]
    fn a_pool_set_to_a_value_takes_from_the_heaviest_others() {
        let two = w(&[("blue", 95), ("green", 5)]);
        assert_eq!(
            with_pool_at_via(&two, "green", 25, None),
            Some(w(&[("blue", 75), ("green", 25)]))
        );
        assert_eq!(
            with_pool_at_via(&two, "green", 100, None),
            Some(w(&[("blue", 0), ("green", 100)]))
        );
        assert_eq!(
            with_pool_at_via(&two, "green", 0, None),
            Some(w(&[("blue", 100), ("green", 0)]))
        );
        let three = w(&[("blue", 80), ("canary", 5), ("green", 15)]);
        assert_eq!(
            with_pool_at_via(&three, "green", 0, None),
            Some(w(&[("blue", 95), ("canary", 5), ("green", 0)]))
        );
        assert_eq!(
            with_pool_at_via(&three, "green", 98, None),
            Some(w(&[("blue", 0), ("canary", 2), ("green", 98)]))
        );
        assert_eq!(with_pool_at_via(&three, "green", 101, None), None);
        assert_eq!(with_pool_at_via(&three, "nope", 1, None), None);
        let all = w(&[("blue", 100), ("green", 0)]);
        assert_eq!(
            with_pool_at_via(&all, "blue", 50, None),
            None,
            "nowhere to put 50"
        );
    }

    #[test]
    fn a_canary_trades_with_the_stable_pool_before_a_heavier_canary() {
        // blue stable at 40, purple a canary at 60: green's 5 come from blue, and go back.
        let before = w(&[("blue", 40), ("green", 0), ("purple", 60)]);
        let up = with_pool_at_via(&before, "green", 5, Some("blue")).unwrap();
        assert_eq!(up, w(&[("blue", 35), ("green", 5), ("purple", 60)]));
        assert_eq!(
            with_pool_at_via(&up, "green", 0, Some("blue")),
            Some(before.clone())
        );
        // More than the stable pool has: the rest from the heaviest other.
        assert_eq!(
            with_pool_at_via(&before, "green", 50, Some("blue")),
            Some(w(&[("blue", 0), ("green", 50), ("purple", 50)]))
        );
        // A stable pool at 0 (or unknown) is skipped.
        let gone = w(&[("blue", 0), ("green", 0), ("purple", 100)]);
        assert_eq!(
            with_pool_at_via(&gone, "green", 10, Some("blue")),
            Some(w(&[("blue", 0), ("green", 10), ("purple", 90)]))
        );
    }
}
