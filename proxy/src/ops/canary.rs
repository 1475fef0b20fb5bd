//! Progressive rollouts (SPEC §5 `proxyctl canary`): start, pause, resume, abort, promote and
//! `--wait`; and the two changes the autopilot makes, a rollout's next step and an automatic
//! rollback. Each is one change through [`Controller::apply_noted`]: the weights and the
//! rollout move together, persisted before they take effect.

use super::{err, Actor, Controller};
use crate::canary::rollout::{unix_ms, Phase, Rollout};
use crate::routing::weights::with_pool_at_via;
use crate::upstream::{UpstreamState, Weights};
use std::time::Duration;
use switchyard_control::protocol::{
    CanaryResult, Change, ControlError, ErrorCode, Event, RollbackInfo, RolloutStatus,
};
use switchyard_control::{EventSender, MinHealthy};

/// The longest step interval accepted (as for durations in the config).
const MAX_INTERVAL: Duration = Duration::from_millis(crate::canary::rollout::MAX_INTERVAL_MS);

/// The latest instant RFC 3339 can write (9999-12-31T23:59:59Z), in Unix milliseconds.
const LAST_RFC3339_MS: u64 = 253_402_300_799_000;

/// `ms` as an RFC 3339 time, clamped to the years RFC 3339 can write (a time from a damaged
/// state file must not panic the status command).
fn rfc3339(ms: u64) -> String {
    use std::fmt::Write;
    let at = std::time::UNIX_EPOCH + Duration::from_millis(ms.min(LAST_RFC3339_MS));
    let mut out = String::new();
    let _ = write!(out, "{}", humantime::format_rfc3339_seconds(at));
    out
}

/// How often `canary --wait` looks when nothing wakes it (the time left moves on).
const WAIT_POLL: Duration = Duration::from_secs(1);

/// What `abort`/`promote` answer when no rollout ran (a canary set by `weight`): the outcome
/// alone.
fn no_rollout(weight: u32, state: &str, ended_by: Option<&str>) -> RolloutStatus {
    RolloutStatus {
        pool: String::new(),
        steps: Vec::new(),
        step: 0,
        weight,
        interval_ms: 0,
        state: state.into(),
        step_left_ms: None,
        waiting: None,
        started: String::new(),
        ended: None,
        ended_by: ended_by.map(str::to_string),
        id: 0,
    }
}

/// A rollout as `status` shows it; `waiting` from the autopilot's observations.
pub(crate) fn rollout_status(r: &Rollout, now_ms: u64, waiting: Option<String>) -> RolloutStatus {
    let time = rfc3339;
    let (ended, ended_by) = match &r.phase {
        Phase::Promoted { at_ms } | Phase::RolledBack { at_ms } => (Some(time(*at_ms)), None),
        Phase::Aborted { at_ms, by } => (Some(time(*at_ms)), Some(by.clone())),
        _ => (None, None),
    };
    RolloutStatus {
        pool: r.pool.clone(),
        steps: r.steps.clone(),
        step: r.step,
        weight: r.weight(),
        interval_ms: r.interval_ms,
        state: r.state_name().to_string(),
        step_left_ms: r.left_ms(now_ms),
        waiting: waiting.filter(|_| matches!(r.phase, Phase::Running { .. })),
        started: time(r.started_ms),
        ended,
        ended_by,
        id: r.id,
    }
}

/// The live rollout of `u`, or a refusal naming what to do.
fn live(u: &UpstreamState) -> Result<&Rollout, ControlError> {
    u.rollout.as_ref().filter(|r| r.is_live()).ok_or_else(|| {
        err(
            ErrorCode::Invalid,
            format!(
                "{} has no rollout in progress{}",
                u.name(),
                u.rollout
                    .as_ref()
                    .map(|r| format!(" (the last one, of {}, {})", r.pool, r.state_name()))
                    .unwrap_or_default()
            ),
        )
    })
}

fn weights_err(u: &UpstreamState, what: &str) -> ControlError {
    err(
        ErrorCode::Invalid,
        format!(
            "{}: cannot {what} from {}",
            u.name(),
            crate::routing::weights::fmt_weights(&u.weights())
        ),
    )
}

impl Controller {
    /// The waiting reason the autopilot published for rollout `id` of `upstream`.
    fn waiting(&self, upstream: &str, id: u64) -> Option<String> {
        self.observed
            .get()
            .get(upstream)
            .and_then(|o| o.waiting.clone())
            .filter(|(rid, _)| *rid == id)
            .map(|(_, w)| w)
    }

    /// The rollout of `upstream` after a change, as `status` shows it.
    fn rollout_now(&self, upstream: &str) -> Option<RolloutStatus> {
        let snap = self.shared.load();
        let u = snap.upstream(upstream)?;
        let r = u.rollout.as_ref()?;
        Some(rollout_status(r, unix_ms(), self.waiting(upstream, r.id)))
    }

    /// `canary POOL`: the first step now (health-gated), then one step per interval.
    pub(crate) fn canary_start(
        &self,
        upstream: Option<&str>,
        pool: &str,
        steps: Option<Vec<u32>>,
        interval: Option<Duration>,
        min_healthy: MinHealthy,
        actor: Actor,
    ) -> Result<CanaryResult, ControlError> {
        let change = self.apply_gated(upstream, actor, "canary", |u, _| {
            Self::check_pool(u, pool)?;
            if let Some(r) = u.rollout.as_ref().filter(|r| r.is_live()) {
                return Err(err(
                    ErrorCode::Invalid,
                    format!(
                        "a rollout of {} is in progress (step {} of {}, {}%); `proxyctl canary promote` or `proxyctl canary abort` it first",
                        r.pool,
                        r.step + 1,
                        r.steps.len(),
                        r.weight()
                    ),
                ));
            }
            let steps = steps.clone().unwrap_or_else(|| u.config.steps.clone());
            switchyard_config::check_steps(&steps)
                .map_err(|e| err(ErrorCode::Invalid, format!("--steps: {e}")))?;
            let interval = interval.unwrap_or(u.config.step_interval);
            if interval.is_zero() || interval > MAX_INTERVAL {
                return Err(err(
                    ErrorCode::Invalid,
                    format!("--interval {interval:?} is not between 1ms and 365 days"),
                ));
            }
            let Some(p) = u.pool(pool) else {
                return Err(err(ErrorCode::UnknownPool, pool.to_string()));
            };
            if p.instances.is_empty() {
                return Err(err(
                    ErrorCode::Invalid,
                    format!("pool {pool} has no instances; `proxyctl pool set {pool} ADDR...` first"),
                ));
            }
            if p.weight >= 100 {
                return Err(err(
                    ErrorCode::Invalid,
                    format!("{pool} already has all the traffic of {}", u.name()),
                ));
            }
            self.gate(u, pool, min_healthy)?;
            // A pool that already has some traffic starts at the first step above it.
            let start = steps.iter().position(|s| *s > p.weight).unwrap_or(steps.len() - 1);
            let w = with_pool_at_via(&u.weights(), pool, steps[start], Some(u.base_name()))
                .ok_or_else(|| weights_err(u, "start the rollout"))?;
            let now = unix_ms();
            let mut rollout = Rollout::new(u.generation + 1, pool, steps, interval, start, now);
            rollout.min_healthy = min_healthy;
            if rollout.weight() >= 100 {
                rollout.phase = Phase::Promoted { at_ms: now };
            }
            Ok(Some(u.changed(|rt| {
                rt.weights = w;
                rt.rollout = Some(rollout);
            })))
        })?;
        let rollout = self
            .rollout_now(&change.upstream)
            .ok_or_else(|| err(ErrorCode::Internal, "the rollout disappeared"))?;
        Ok(CanaryResult { change, rollout })
    }

    /// `canary --wait`: report each step until rollout `id` ends. Promoted: the result;
    /// rolled back: `RolledBack` with the numbers (exit 5); stopped by a human: `Aborted`.
    pub(crate) async fn canary_wait(
        &self,
        start: CanaryResult,
        events: &EventSender,
    ) -> Result<CanaryResult, ControlError> {
        let upstream = start.change.upstream.clone();
        let id = start.rollout.id;
        let mut last: Option<(usize, String, Option<String>)> = None;
        loop {
            let changed = self.shared.changed();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let observed = self.observed.changed();
            tokio::pin!(observed);
            observed.as_mut().enable();
            let u = Self::upstream(&self.shared.load(), Some(&upstream))?;
            let Some(r) = u.rollout.as_ref().filter(|r| r.id == id) else {
                return Err(err(
                    ErrorCode::Aborted,
                    format!(
                        "the rollout of {} was replaced by another",
                        start.rollout.pool
                    ),
                ));
            };
            let status = rollout_status(r, unix_ms(), self.waiting(&upstream, id));
            let key = (status.step, status.state.clone(), status.waiting.clone());
            if last.as_ref() != Some(&key) {
                last = Some(key);
                let ev = Event::Rollout {
                    upstream: upstream.clone(),
                    rollout: status.clone(),
                };
                if !events.send(ev).await {
                    return Err(err(ErrorCode::Aborted, "the client went away"));
                }
            }
            match &r.phase {
                Phase::Promoted { .. } => {
                    // What the whole rollout did: from the weights before it began to the
                    // weights now, at the generation that promoted it.
                    let new_weights = u.weights();
                    let change = Change {
                        generation: u.generation,
                        changed: new_weights != start.change.old_weights,
                        new_weights,
                        ..start.change
                    };
                    return Ok(CanaryResult {
                        change,
                        rollout: status,
                    });
                }
                Phase::RolledBack { .. } => {
                    let info = u.last_rollback.clone();
                    let detail = info
                        .as_ref()
                        .map(|i| i.detail.clone())
                        .unwrap_or_else(|| "no numbers recorded".into());
                    let e = err(
                        ErrorCode::RolledBack,
                        format!(
                            "{upstream}: the canary {} was rolled back automatically at step {} of {} ({}%): {detail}",
                            r.pool,
                            r.step + 1,
                            r.steps.len(),
                            r.weight()
                        ),
                    );
                    return Err(match info.and_then(|i| serde_json::to_value(i).ok()) {
                        Some(d) => e.with_details(d),
                        None => e,
                    });
                }
                Phase::Aborted { by, .. } => {
                    return Err(err(
                        ErrorCode::Aborted,
                        format!(
                            "{upstream}: the rollout of {} was stopped by `{by}` at step {} of {}",
                            r.pool,
                            r.step + 1,
                            r.steps.len()
                        ),
                    ))
                }
                Phase::Running { .. } | Phase::Paused { .. } => {}
            }
            tokio::select! {
                _ = changed => {}
                _ = observed => {}
                _ = tokio::time::sleep(WAIT_POLL) => {}
            }
        }
    }

    /// `canary pause` / `canary resume`: stop or restart the step clock.
    pub(crate) fn canary_pause(
        &self,
        upstream: Option<&str>,
        pause: bool,
        actor: Actor,
    ) -> Result<RolloutStatus, ControlError> {
        let cmd = if pause {
            "canary_pause"
        } else {
            "canary_resume"
        };
        let change = self.apply(upstream, actor, cmd, |u| {
            let r = live(u)?;
            let now = unix_ms();
            let next = if pause { r.paused(now) } else { r.resumed(now) };
            let Some(next) = next else {
                return Err(err(
                    ErrorCode::Invalid,
                    format!("the rollout of {} is already {}", r.pool, r.state_name()),
                ));
            };
            Ok(Some(u.changed(|rt| rt.rollout = Some(next))))
        })?;
        self.rollout_now(&change.upstream)
            .ok_or_else(|| err(ErrorCode::Internal, "the rollout disappeared"))
    }

    /// `canary abort`: the canary back to 0; a live rollout ends as aborted. Without a
    /// rollout, every canary (every pool with weight besides the base) goes to 0.
    pub(crate) fn canary_abort(
        &self,
        upstream: Option<&str>,
        actor: Actor,
    ) -> Result<CanaryResult, ControlError> {
        let change = self.apply(upstream, actor, "canary_abort", |u| {
            let now = unix_ms();
            if let Some(r) = u.rollout.as_ref().filter(|r| r.is_live()) {
                let w = with_pool_at_via(&u.weights(), &r.pool, 0, Some(u.base_name()))
                    .ok_or_else(|| weights_err(u, &format!("set {} to 0", r.pool)))?;
                let ended = r.ended(Phase::Aborted {
                    at_ms: now,
                    by: "canary abort".into(),
                });
                return Ok(Some(u.changed(|rt| {
                    rt.weights = w;
                    rt.rollout = Some(ended);
                })));
            }
            let base = u.pools[u.base()].pool.name.clone();
            let w: Weights = u
                .pools
                .iter()
                .map(|p| (p.pool.name.clone(), u32::from(p.pool.name == base) * 100))
                .collect();
            if w == u.weights() {
                return Err(err(
                    ErrorCode::Invalid,
                    format!(
                        "{} has no canary to abort: {base} has all the traffic",
                        u.name()
                    ),
                ));
            }
            Ok(Some(u.changed(|rt| rt.weights = w)))
        })?;
        let rollout = self.rollout_now(&change.upstream);
        Ok(CanaryResult {
            rollout: rollout.unwrap_or_else(|| no_rollout(0, "aborted", Some("canary abort"))),
            change,
        })
    }

    /// `canary promote`: the canary (the rollout's pool, else the heaviest pool with weight
    /// besides the base) to 100, health-gated like `switch`; the old pool drains.
    pub(crate) fn canary_promote(
        &self,
        upstream: Option<&str>,
        force: bool,
        actor: Actor,
    ) -> Result<CanaryResult, ControlError> {
        let change = self.apply_gated(upstream, actor, "canary_promote", |u, forced| {
            let rollout = u.rollout.as_ref().filter(|r| r.is_live());
            let target = match rollout {
                Some(r) => r.pool.clone(),
                None => match u.canary() {
                    Some(i) => u.pools[i].pool.name.clone(),
                    None => {
                        return Err(err(
                            ErrorCode::Invalid,
                            format!("{} has no canary to promote", u.name()),
                        ))
                    }
                },
            };
            if let Err(e) = self.gate(u, &target, MinHealthy::All) {
                if !force {
                    return Err(e);
                }
                *forced = true;
            }
            let w: Weights = u
                .pools
                .iter()
                .map(|p| (p.pool.name.clone(), u32::from(p.pool.name == target) * 100))
                .collect();
            let promoted = rollout.map(|r| {
                let mut done = r.ended(Phase::Promoted { at_ms: unix_ms() });
                done.step = done.steps.len() - 1;
                done
            });
            Ok(Some(u.changed(|rt| {
                rt.weights = w;
                if promoted.is_some() {
                    rt.rollout = promoted;
                }
            })))
        })?;
        let rollout = self.rollout_now(&change.upstream);
        Ok(CanaryResult {
            rollout: rollout.unwrap_or_else(|| no_rollout(100, "promoted", None)),
            change,
        })
    }

    /// The autopilot: rollout `id`, still at `from_step`, running and due, in the state the
    /// analysis judged (`generation`) and still passing the health gate, takes its next step.
    pub(crate) fn rollout_advance(
        &self,
        upstream: &str,
        generation: u64,
        id: u64,
        from_step: usize,
    ) -> Result<Change, ControlError> {
        let mut note = String::new();
        let now = unix_ms();
        // The note is known only once the current state is seen; build it first from the
        // snapshot (the apply re-checks everything under the lock).
        if let Some(r) = Self::upstream(&self.shared.load(), Some(upstream))?
            .rollout
            .as_ref()
            .and_then(|r| r.advanced(now))
        {
            note = if matches!(r.phase, Phase::Promoted { .. }) {
                format!("rollout of {}: promoted", r.pool)
            } else {
                format!(
                    "rollout of {}: step {} of {}, {}%",
                    r.pool,
                    r.step + 1,
                    r.steps.len(),
                    r.weight()
                )
            };
        }
        self.apply_noted(
            Some(upstream),
            Actor::Proxy,
            "canary_step",
            Some(&note),
            |u, _| {
                let Some(r) = u.rollout.as_ref().filter(|r| {
                    u.generation == generation
                        && r.id == id
                        && r.step == from_step
                        && r.due(now)
                        && self.gate(u, &r.pool, r.min_healthy).is_ok()
                }) else {
                    // Moved on meanwhile (a human command, a rollback, pause and resume) or
                    // the canary turned unhealthy: the next look judges the new state.
                    return Ok(None);
                };
                let Some(next) = r.advanced(now) else {
                    return Ok(None);
                };
                let w =
                    with_pool_at_via(&u.weights(), &next.pool, next.weight(), Some(u.base_name()))
                        .ok_or_else(|| weights_err(u, "take the next step"))?;
                Ok(Some(u.changed(|rt| {
                    rt.weights = w;
                    rt.rollout = Some(next);
                })))
            },
        )
    }

    /// The autopilot: the canary `info.pool` goes to 0 (its weight to the stable pool), its
    /// rollout ends as rolled back, and the numbers are kept for `status`.
    pub(crate) fn auto_rollback(
        &self,
        upstream: &str,
        generation: u64,
        info: RollbackInfo,
    ) -> Result<Change, ControlError> {
        let note = format!("{} {}", info.pool, info.detail);
        self.apply_noted(
            Some(upstream),
            Actor::Proxy,
            "auto_rollback",
            Some(&note),
            |u, _| {
                if u.generation != generation || u.pool(&info.pool).is_none_or(|p| p.weight == 0) {
                    // Something changed since the numbers were taken (a human command, a
                    // step): the next look judges the new state.
                    return Ok(None);
                }
                let w = with_pool_at_via(&u.weights(), &info.pool, 0, Some(u.base_name()))
                    .ok_or_else(|| weights_err(u, &format!("set {} to 0", info.pool)))?;
                let now = unix_ms();
                let rollout = u.rollout.as_ref().map(|r| {
                    if r.is_live() && r.pool == info.pool {
                        r.ended(Phase::RolledBack { at_ms: now })
                    } else {
                        r.clone()
                    }
                });
                Ok(Some(u.changed(|rt| {
                    rt.weights = w;
                    rt.rollout = rollout;
                    rt.last_rollback = Some(info.clone());
                })))
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::rfc3339;

    #[test]
    fn times_from_a_damaged_state_file_are_written_without_a_panic() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_764_417_600_000), "2025-11-29T12:00:00Z");
        assert_eq!(rfc3339(u64::MAX), "9999-12-31T23:59:59Z");
    }
}
