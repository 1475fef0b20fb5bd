//! The health gate of a change (SPEC §5): a pool that gets traffic for the first time must
//! have enough healthy instances, unless the change is forced; `--wait-healthy` waits for it,
//! reporting each instance's state as it changes.

use super::drain::humantime_secs;
use super::{err, Controller, Gate};
use crate::upstream::health::now_ms;
use crate::upstream::{UpstreamState, Weights};
use std::time::Duration;
use switchyard_control::protocol::{ControlError, ErrorCode, Event, InstanceHealth};
use switchyard_control::{EventSender, HealthState, MinHealthy};

impl Controller {
    /// Each instance of `pool` with its health.
    pub(crate) fn pool_health(u: &UpstreamState, pool: &str) -> (usize, Vec<InstanceHealth>) {
        let now = now_ms();
        let Some(p) = u.pool(pool) else {
            return (0, Vec::new());
        };
        let list: Vec<InstanceHealth> = p
            .instances
            .iter()
            .map(|i| InstanceHealth {
                addr: i.label.clone(),
                health: i.health.reported(now),
                last_check: i.health.detail().last_check,
            })
            .collect();
        let healthy = p
            .instances
            .iter()
            .filter(|i| i.current_addr().is_some() && i.health.usable(now))
            .count();
        (healthy, list)
    }

    /// The health gate (SPEC §5): enough instances of `pool` must be healthy.
    pub(crate) fn gate(u: &UpstreamState, pool: &str, min: MinHealthy) -> Result<(), ControlError> {
        let (healthy, list) = Self::pool_health(u, pool);
        let needed = min.needed(list.len());
        if healthy >= needed {
            return Ok(());
        }
        let why: Vec<String> = list
            .iter()
            .filter(|i| i.health != HealthState::Healthy)
            .map(|i| {
                format!(
                    "  {} {}{}",
                    i.addr,
                    i.health,
                    i.last_check
                        .as_ref()
                        .map(|c| format!(": {c}"))
                        .unwrap_or_else(|| ": not checked yet".into())
                )
            })
            .collect();
        Err(err(
            ErrorCode::Unhealthy,
            format!(
                "{}/{pool} is not healthy enough: {healthy} of {} instances healthy, {needed} needed (--min-healthy, --wait-healthy or --force)\n{}",
                u.name(),
                list.len(),
                why.join("\n")
            ),
        )
        .with_details(serde_json::to_value(&list).unwrap_or_default()))
    }

    /// Apply the gate to every pool that gets traffic for the first time under `new`.
    pub(crate) fn gate_new_traffic(
        u: &UpstreamState,
        new: &Weights,
        gate: Gate,
        forced: &mut bool,
    ) -> Result<(), ControlError> {
        for (pool, w) in new {
            let was = u.pool(pool).map_or(0, |p| p.weight);
            if *w > 0 && was == 0 {
                if let Err(e) = Self::gate(u, pool, gate.min_healthy) {
                    if !gate.force {
                        return Err(e);
                    }
                    *forced = true;
                }
            }
        }
        Ok(())
    }

    /// Wait until `pool` passes the health gate, reporting each instance's health.
    pub(crate) async fn wait_healthy(
        &self,
        upstream: Option<&str>,
        pool: &str,
        min: MinHealthy,
        timeout: Duration,
        events: &EventSender,
    ) -> Result<(), ControlError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last: Option<Vec<InstanceHealth>> = None;
        loop {
            let health_changed = self.shared.health_changed();
            let u = Self::upstream(&self.shared.load(), upstream)?;
            Self::check_pool(&u, pool)?;
            let (healthy, list) = Self::pool_health(&u, pool);
            let needed = min.needed(list.len());
            if last.as_ref() != Some(&list) {
                events
                    .send(Event::Health {
                        upstream: u.name().to_string(),
                        pool: pool.to_string(),
                        healthy,
                        needed,
                        instances: list.clone(),
                    })
                    .await;
                last = Some(list);
            }
            if healthy >= needed {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                let e = Self::gate(&u, pool, min)
                    .err()
                    .unwrap_or_else(|| err(ErrorCode::Unhealthy, format!("{pool} is not healthy")));
                return Err(ControlError {
                    code: ErrorCode::Timeout,
                    message: format!(
                        "waited {}, nothing was switched; {}",
                        humantime_secs(timeout),
                        e.message
                    ),
                    details: e.details,
                });
            }
            tokio::select! {
                _ = health_changed => {}
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                _ = tokio::time::sleep_until(deadline) => {}
            }
        }
    }
}
