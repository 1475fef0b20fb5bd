//! A progressive rollout (`proxyctl canary green --steps 5,25,50,100 --interval 10m`) and its
//! transitions.
//!
//! A rollout is part of its upstream's state: every transition is a change like a switch
//! (persisted, then stored, then acknowledged), so a restart mid-rollout resumes at the same
//! step. Times are wall-clock (Unix milliseconds) because they outlive the process: a step that
//! began before a restart has run for the time since it began, restart included. A paused
//! rollout keeps the time its step had left.
//!
//! ```text
//!   start ──> Running(step i) ── interval over, analysis passed ──> Running(step i+1)
//!               │   ▲                                      └─ the step is 100 ──> Promoted
//!         pause │   │ resume
//!               ▼   │
//!              Paused            promote ──> Promoted     abort, a human weight change ──> Aborted
//!                                automatic rollback ──> RolledBack
//! ```

use serde::{Deserialize, Serialize};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use switchyard_control::MinHealthy;

/// A day in milliseconds: how far ahead of now a restored time may be.
const DAY_MS: u64 = 24 * 3600 * 1000;

/// The longest step interval `proxyctl canary --interval` accepts (a year), in milliseconds.
pub(crate) const MAX_INTERVAL_MS: u64 = 365 * 24 * 3600 * 1000;

/// Milliseconds since the Unix epoch, now.
pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A rollout of one pool of an upstream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Rollout {
    /// Identifies this rollout among others of the upstream (the generation it began at).
    pub(crate) id: u64,
    /// The canary pool.
    pub(crate) pool: String,
    /// Its weights, strictly increasing, ending at 100.
    pub(crate) steps: Vec<u32>,
    /// Time at each step.
    pub(crate) interval_ms: u64,
    /// The health gate of each step.
    #[serde(default)]
    pub(crate) min_healthy: MinHealthy,
    /// Index into `steps` of the weight in effect.
    pub(crate) step: usize,
    /// Where it is.
    pub(crate) phase: Phase,
    /// When it began (Unix ms).
    pub(crate) started_ms: u64,
}

/// Where a rollout is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub(crate) enum Phase {
    /// At `step`, since `since_ms`.
    Running {
        /// When the step began (Unix ms).
        since_ms: u64,
    },
    /// Stopped by `pause` with this much of the step left.
    Paused {
        /// Time the step had left.
        remaining_ms: u64,
    },
    /// The canary took all the traffic.
    Promoted {
        /// When.
        at_ms: u64,
    },
    /// The canary was rolled back automatically (the upstream's `last_rollback` says why).
    RolledBack {
        /// When.
        at_ms: u64,
    },
    /// Stopped by a human: `abort`, or a weight change of the upstream.
    Aborted {
        /// When.
        at_ms: u64,
        /// The command that stopped it.
        by: String,
    },
}

impl Rollout {
    /// A rollout starting at `step` (its weight is applied by the caller in the same change).
    pub(crate) fn new(
        id: u64,
        pool: &str,
        steps: Vec<u32>,
        interval: Duration,
        step: usize,
        now_ms: u64,
    ) -> Self {
        Rollout {
            id,
            pool: pool.to_string(),
            steps,
            interval_ms: u64::try_from(interval.as_millis()).unwrap_or(u64::MAX),
            min_healthy: MinHealthy::All,
            step,
            phase: Phase::Running { since_ms: now_ms },
            started_ms: now_ms,
        }
    }

    /// The weight of the current step.
    pub(crate) fn weight(&self) -> u32 {
        self.steps.get(self.step).copied().unwrap_or(0)
    }

    /// Running or paused: still in charge of the canary's weight.
    pub(crate) fn is_live(&self) -> bool {
        matches!(self.phase, Phase::Running { .. } | Phase::Paused { .. })
    }

    /// Time left at this step (0 when due); `None` unless running or paused.
    pub(crate) fn left_ms(&self, now_ms: u64) -> Option<u64> {
        match self.phase {
            Phase::Running { since_ms } => Some(
                since_ms
                    .saturating_add(self.interval_ms)
                    .saturating_sub(now_ms),
            ),
            Phase::Paused { remaining_ms } => Some(remaining_ms),
            _ => None,
        }
    }

    /// Running and its step's time is over: the next step is due if the analysis passes.
    pub(crate) fn due(&self, now_ms: u64) -> bool {
        matches!(self.phase, Phase::Running { .. }) && self.left_ms(now_ms) == Some(0)
    }

    /// The rollout one step further: the next weight, and promoted when that is 100. `None`
    /// at the last step.
    pub(crate) fn advanced(&self, now_ms: u64) -> Option<Rollout> {
        let step = self.step + 1;
        let weight = *self.steps.get(step)?;
        let phase = if weight >= 100 {
            Phase::Promoted { at_ms: now_ms }
        } else {
            Phase::Running { since_ms: now_ms }
        };
        Some(Rollout {
            step,
            phase,
            ..self.clone()
        })
    }

    /// Paused, keeping the time left. `None` unless running.
    pub(crate) fn paused(&self, now_ms: u64) -> Option<Rollout> {
        let Phase::Running { .. } = self.phase else {
            return None;
        };
        Some(Rollout {
            phase: Phase::Paused {
                remaining_ms: self.left_ms(now_ms).unwrap_or(0),
            },
            ..self.clone()
        })
    }

    /// Running again with the time that was left. `None` unless paused.
    pub(crate) fn resumed(&self, now_ms: u64) -> Option<Rollout> {
        let Phase::Paused { remaining_ms } = self.phase else {
            return None;
        };
        let since_ms = now_ms
            .saturating_add(remaining_ms)
            .saturating_sub(self.interval_ms);
        Some(Rollout {
            phase: Phase::Running { since_ms },
            ..self.clone()
        })
    }

    /// Ended in `phase` (promoted, rolled back or aborted).
    pub(crate) fn ended(&self, phase: Phase) -> Rollout {
        Rollout {
            phase,
            ..self.clone()
        }
    }

    /// The phase's name: `running`, `paused`, `promoted`, `rolled_back`, `aborted`.
    pub(crate) fn state_name(&self) -> &'static str {
        match self.phase {
            Phase::Running { .. } => "running",
            Phase::Paused { .. } => "paused",
            Phase::Promoted { .. } => "promoted",
            Phase::RolledBack { .. } => "rolled_back",
            Phase::Aborted { .. } => "aborted",
        }
    }

    /// Whether a rollout read back from the state file is one this version could have
    /// written for this upstream: valid steps, a step within them, a known pool, an interval
    /// the command accepts, no time further than a day ahead of `now_ms` (a clock that jumped,
    /// or a hand-edited file, must not freeze a step for years), a pause that leaves no more
    /// than the interval, and — while live — the pool's saved weight (`pool_weight`) equal to
    /// the step's, since every transition stores both in one change.
    pub(crate) fn is_valid_for(
        &self,
        pools: &[&str],
        pool_weight: Option<u32>,
        now_ms: u64,
    ) -> bool {
        let ahead = now_ms.saturating_add(DAY_MS);
        let times_ok = self.started_ms <= ahead
            && match &self.phase {
                Phase::Running { since_ms } => *since_ms <= ahead,
                Phase::Paused { remaining_ms } => *remaining_ms <= self.interval_ms,
                Phase::Promoted { at_ms }
                | Phase::RolledBack { at_ms }
                | Phase::Aborted { at_ms, .. } => *at_ms <= ahead,
            };
        let weight_ok = !self.is_live() || pool_weight == Some(self.weight());
        switchyard_config::check_steps(&self.steps).is_ok()
            && self.step < self.steps.len()
            && pools.contains(&self.pool.as_str())
            && (1..=MAX_INTERVAL_MS).contains(&self.interval_ms)
            && times_ok
            && weight_ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rollout() -> Rollout {
        Rollout::new(
            7,
            "green",
            vec![5, 25, 50, 100],
            Duration::from_secs(600),
            0,
            1_000_000,
        )
    }

    #[test]
    fn steps_advance_after_the_interval_and_end_promoted() {
        let r = rollout();
        assert_eq!(r.weight(), 5);
        assert!(!r.due(1_000_000 + 599_999));
        assert_eq!(r.left_ms(1_000_000 + 599_000), Some(1_000));
        assert!(r.due(1_000_000 + 600_000));
        let r = r.advanced(1_600_000).unwrap();
        assert_eq!((r.step, r.weight()), (1, 25));
        assert_eq!(
            r.phase,
            Phase::Running {
                since_ms: 1_600_000
            }
        );
        let r = r.advanced(2_200_000).unwrap().advanced(2_800_000).unwrap();
        assert_eq!(r.weight(), 100);
        assert_eq!(r.phase, Phase::Promoted { at_ms: 2_800_000 });
        assert!(!r.is_live());
        assert!(r.advanced(3_000_000).is_none());
    }

    #[test]
    fn pause_keeps_the_time_left_and_resume_gives_it_back() {
        let r = rollout();
        let p = r.paused(1_000_000 + 100_000).unwrap();
        assert_eq!(
            p.phase,
            Phase::Paused {
                remaining_ms: 500_000
            }
        );
        assert!(!p.due(u64::MAX), "a paused rollout is never due");
        assert!(p.paused(0).is_none());
        // An hour later: still 500 s left.
        let q = p.resumed(5_000_000).unwrap();
        assert_eq!(q.left_ms(5_000_000), Some(500_000));
        assert!(q.due(5_500_000));
        assert!(q.resumed(0).is_none());
    }

    #[test]
    fn a_rollout_survives_the_state_file_and_bad_ones_are_recognised() {
        let r = rollout().paused(1_200_000).unwrap();
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains(r#""state":"paused""#), "{json}");
        let back: Rollout = serde_json::from_str(&json).unwrap();
        assert_eq!(back, r);
        let now = 1_000_000;
        assert!(r.is_valid_for(&["blue", "green"], Some(5), now));
        assert!(!r.is_valid_for(&["blue"], Some(5), now));
        // A live rollout whose pool weight differs from its step was not written by us.
        assert!(!r.is_valid_for(&["blue", "green"], Some(25), now));
        assert!(!r.is_valid_for(&["blue", "green"], None, now));
        // Times far ahead of now, an interval out of range, a pause longer than the step.
        let ahead = Rollout {
            phase: Phase::Running {
                since_ms: now + 2 * DAY_MS,
            },
            ..r.clone()
        };
        assert!(!ahead.is_valid_for(&["blue", "green"], Some(5), now));
        let zero = Rollout {
            interval_ms: 0,
            ..r.clone()
        };
        assert!(!zero.is_valid_for(&["blue", "green"], Some(5), now));
        let huge = Rollout {
            interval_ms: u64::MAX,
            ..r.clone()
        };
        assert!(!huge.is_valid_for(&["blue", "green"], Some(5), now));
        let long_pause = Rollout {
            phase: Phase::Paused {
                remaining_ms: r.interval_ms + 1,
            },
            ..r.clone()
        };
        assert!(!long_pause.is_valid_for(&["blue", "green"], Some(5), now));
        // An ended rollout no longer owns the weight.
        let ended = r.ended(Phase::Promoted { at_ms: now });
        assert!(ended.is_valid_for(&["blue", "green"], Some(100), now));
        let mut bad = r.clone();
        bad.step = 4;
        assert!(!bad.is_valid_for(&["blue", "green"], Some(5), now));
        bad.step = 0;
        bad.steps = vec![50, 25, 100];
        assert!(!bad.is_valid_for(&["blue", "green"], Some(5), now));
    }
}
