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
    /// Each instance of `pool` with its health, and how many are usable. In a fleet an
    /// instance counts only if every live proxy sees it healthy (the union of the views): an
    /// instance one proxy cannot reach is reported unhealthy, naming that proxy.
    pub(crate) fn pool_health(
        &self,
        u: &UpstreamState,
        pool: &str,
    ) -> (usize, Vec<InstanceHealth>) {
        let now = now_ms();
        let Some(p) = u.pool(pool) else {
            return (0, Vec::new());
        };
        let elsewhere = self
            .fleet
            .as_ref()
            .map(|f| f.down_elsewhere(u.name(), pool))
            .unwrap_or_default();
        let list: Vec<InstanceHealth> = p
            .instances
            .iter()
            .map(|i| {
                let here = i.health.reported(now);
                match elsewhere.get(&i.label) {
                    Some(proxies) if here == HealthState::Healthy => InstanceHealth {
                        addr: i.label.clone(),
                        health: HealthState::Unhealthy,
                        last_check: Some(format!(
                            "healthy from this proxy, {}",
                            proxies.join(", ")
                        )),
                    },
                    _ => InstanceHealth {
                        addr: i.label.clone(),
                        health: here,
                        last_check: i.health.detail().last_check,
                    },
                }
            })
            .collect();
        let healthy = p
            .instances
            .iter()
            .filter(|i| {
                i.current_addr().is_some()
                    && i.health.usable(now)
                    && !elsewhere.contains_key(&i.label)
            })
            .count();
        (healthy, list)
    }

    /// The health gate (SPEC §5): enough instances of `pool` must be healthy (in a fleet:
    /// from every live proxy).
    pub(crate) fn gate(
        &self,
        u: &UpstreamState,
        pool: &str,
        min: MinHealthy,
    ) -> Result<(), ControlError> {
        let (healthy, list) = self.pool_health(u, pool);
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
        &self,
        u: &UpstreamState,
        new: &Weights,
        gate: Gate,
        forced: &mut bool,
    ) -> Result<(), ControlError> {
        for (pool, w) in new {
            let was = u.pool(pool).map_or(0, |p| p.weight);
            if *w > 0 && was == 0 {
                if let Err(e) = self.gate(u, pool, gate.min_healthy) {
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
        // Checks each instance had when the wait began. The container at an address may have
        // been replaced a moment ago (deploy.sh stops blue, a later deploy starts blue again):
        // its state is still the old process's until the thresholds catch up, so an instance
        // counts only once a check recorded after this point passed and the last check passed.
        // By instance id: an instance removed and added again is a new one with a new count.
        let baseline: std::collections::HashMap<u64, u64> = {
            let u = Self::upstream(&self.shared.load(), upstream)?;
            Self::check_pool(&u, pool)?;
            u.pool(pool)
                .map(|p| {
                    p.instances
                        .iter()
                        .map(|i| (i.id, i.health.detail().checks))
                        .collect()
                })
                .unwrap_or_default()
        };
        loop {
            let health_changed = self.shared.health_changed();
            let u = Self::upstream(&self.shared.load(), upstream)?;
            Self::check_pool(&u, pool)?;
            let (mut healthy, mut list) = self.pool_health(&u, pool);
            if let Some(p) = u.pool(pool) {
                for (i, shown) in p.instances.iter().zip(list.iter_mut()) {
                    let d = i.health.detail();
                    let since = baseline.get(&i.id).copied().unwrap_or(0);
                    let fresh = d.checks > since && d.passes > 0;
                    let counted =
                        shown.health == HealthState::Healthy && i.current_addr().is_some();
                    if counted && !fresh {
                        healthy = healthy.saturating_sub(1);
                        shown.health = HealthState::Unknown;
                        shown.last_check = Some(format!(
                            "healthy before the wait; waiting for a new check ({})",
                            d.last_check.as_deref().unwrap_or("none yet")
                        ));
                    }
                }
            }
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
                let e = self
                    .gate(&u, pool, min)
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
