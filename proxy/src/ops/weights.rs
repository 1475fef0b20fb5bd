//! Weight changes: `switch`, `weight`, `weights` and `rollback`. Each builds the new weights
//! from the current upstream state and goes through [`Controller::apply_gated`]. A human weight
//! change ends a live rollout (as aborted): from then on the weights are the human's.

use super::{err, Actor, Controller, Gate};
use crate::routing::weights;
use crate::upstream::{UpstreamState, Weights};
use switchyard_control::protocol::{Change, ControlError, ErrorCode};

impl Controller {
    /// `switch POOL`: POOL 100%, every other pool 0 — if POOL passes the health gate.
    pub(crate) fn switch(
        &self,
        upstream: Option<&str>,
        pool: &str,
        gate: Gate,
        actor: Actor,
    ) -> Result<Change, ControlError> {
        self.apply_gated(upstream, actor, "switch", |u, forced| {
            Self::check_pool(u, pool)?;
            if u.pool(pool).is_some_and(|p| p.weight == 100) {
                return Ok(None);
            }
            if u.pool(pool).is_some_and(|p| p.instances.is_empty()) {
                return Err(err(
                    ErrorCode::Invalid,
                    format!(
                        "pool {pool} has no instances; `proxyctl pool set {pool} ADDR...` first"
                    ),
                ));
            }
            if let Err(e) = self.gate(u, pool, gate.min_healthy) {
                if !gate.force {
                    return Err(e);
                }
                *forced = true;
            }
            let w: Weights = u
                .pools
                .iter()
                .map(|p| (p.pool.name.clone(), u32::from(p.pool.name == pool) * 100))
                .collect();
            Ok(Some(u.with_weights_by_human(&w, "switch")))
        })
    }

    /// `weight POOL W`: set one pool; the main pool absorbs the difference.
    pub(crate) fn set_weight(
        &self,
        upstream: Option<&str>,
        pool: &str,
        weight: u32,
        gate: Gate,
        actor: Actor,
    ) -> Result<Change, ControlError> {
        self.apply_gated(upstream, actor, "weight", |u, forced| {
            Self::check_pool(u, pool)?;
            if weight > 100 {
                return Err(err(
                    ErrorCode::InvalidWeights,
                    format!("weight {pool}={weight} is above 100 (weights are 0..=100)"),
                ));
            }
            let main = u.pools[u.main].pool.name.clone();
            let mut w = u.weights();
            if pool == main {
                if weight == 100 {
                    return Ok(None);
                }
                return Err(err(
                    ErrorCode::Invalid,
                    format!("{pool} is the main pool; give another pool weight (`weight OTHER N`), use `weights`, or `switch`"),
                ));
            }
            w.insert(pool.to_string(), weight);
            let others: u64 = w
                .iter()
                .filter(|(k, _)| **k != main)
                .map(|(_, v)| u64::from(*v))
                .sum();
            if others > 100 {
                return Err(err(
                    ErrorCode::InvalidWeights,
                    format!("the other pools already have {}; {pool}={weight} would leave the main pool {main} below 0", others - u64::from(weight)),
                ));
            }
            // `others` <= 100 here.
            w.insert(main, 100 - others as u32);
            Self::check_targets(u, &w)?;
            if w == u.weights() {
                return Ok(None);
            }
            self.gate_new_traffic(u, &w, gate, forced)?;
            Ok(Some(u.with_weights_by_human(&w, "weight")))
        })
    }

    /// `weights a=N b=M`: explicit split; unnamed pools get 0.
    pub(crate) fn set_weights(
        &self,
        upstream: Option<&str>,
        weights: &Weights,
        gate: Gate,
        actor: Actor,
    ) -> Result<Change, ControlError> {
        self.apply_gated(upstream, actor, "weights", |u, forced| {
            for p in weights.keys() {
                Self::check_pool(u, p)?;
            }
            weights::check(weights).map_err(|e| err(ErrorCode::InvalidWeights, e.to_string()))?;
            let mut w: Weights = u.pools.iter().map(|p| (p.pool.name.clone(), 0)).collect();
            w.extend(weights.iter().map(|(k, v)| (k.clone(), *v)));
            Self::check_targets(u, &w)?;
            if w == u.weights() {
                return Ok(None);
            }
            self.gate_new_traffic(u, &w, gate, forced)?;
            Ok(Some(u.with_weights_by_human(&w, "weights")))
        })
    }

    /// A pool that gets weight must have instances.
    pub(crate) fn check_targets(u: &UpstreamState, w: &Weights) -> Result<(), ControlError> {
        for (name, weight) in w {
            if *weight > 0 && u.pool(name).is_some_and(|p| p.instances.is_empty()) {
                return Err(err(
                    ErrorCode::Invalid,
                    format!("pool {name} has no instances and cannot take traffic"),
                ));
            }
        }
        Ok(())
    }

    /// `rollback`: the weights before the last weight change.
    pub(crate) fn rollback(
        &self,
        upstream: Option<&str>,
        actor: Actor,
    ) -> Result<Change, ControlError> {
        self.apply(upstream, actor, "rollback", |u| {
            let Some(prev) = u.previous.clone() else {
                return Err(err(
                    ErrorCode::Invalid,
                    format!(
                        "nothing to roll back: {} has had no weight change",
                        u.name()
                    ),
                ));
            };
            Self::check_targets(u, &prev)?;
            Ok(Some(u.with_weights_by_human(&prev, "rollback")))
        })
    }
}
