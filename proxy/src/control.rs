//! The control operations (SPEC §5), shared by the library `Handle` and the control socket.
//!
//! Every change follows one path: take the writer lock, build the new upstream state from the
//! current one, write the state file, store the new snapshot (one atomic swap — from here on
//! every new request is routed by it), log who did it, and only then acknowledge. Waiting
//! (drains) happens after the change and outside the lock; cancelling a wait never undoes the
//! change.

use crate::events::{self, EventLog};
use crate::persist;
use crate::resolve::{self, Resolve};
use crate::snapshot::{Shared, Snapshot};
use crate::upstream::health::now_ms;
use crate::upstream::{UpstreamState, Weights};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use switchyard_config::InstanceAddr;
use switchyard_control::protocol::{
    Change, ControlError, DrainResult, ErrorCode, Event, InstanceHealth, InstanceStatus, PoolPhase,
    PoolStatus, ReloadResult, Reply, Request, UpstreamStatus,
};
use switchyard_control::{EventSender, HealthState, MinHealthy, Peer, Status, PROTOCOL_VERSION};

/// Who asked for a change (for the audit log).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Actor {
    /// A control socket client.
    Socket(Peer),
    /// A call through the library `Handle`.
    Library,
    /// A signal (SIGHUP reload).
    Signal,
}

impl Actor {
    fn uid(&self) -> Option<u32> {
        match self {
            Actor::Socket(p) => Some(p.uid),
            _ => None,
        }
    }
    fn pid(&self) -> Option<i32> {
        match self {
            Actor::Socket(p) => p.pid,
            _ => None,
        }
    }
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Actor::Socket(_) => "socket",
            Actor::Library => "library",
            Actor::Signal => "signal",
        }
    }
}

/// Health gate of a change: how many instances must be healthy, or skip it.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Gate {
    pub(crate) min_healthy: MinHealthy,
    pub(crate) force: bool,
}

/// How often a drain wait looks at the in-flight counters.
const DRAIN_POLL: Duration = Duration::from_millis(20);
/// How often a drain wait reports progress when nothing changes.
const DRAIN_REPORT: Duration = Duration::from_secs(1);

/// The control side of a running proxy.
#[derive(Debug)]
pub(crate) struct Controller {
    pub(crate) shared: Arc<Shared>,
    pub(crate) state_file: PathBuf,
    pub(crate) control_socket: PathBuf,
    pub(crate) config_path: Option<PathBuf>,
    pub(crate) resolver: Arc<dyn Resolve>,
    pub(crate) events: Arc<EventLog>,
    pub(crate) metrics: Arc<crate::metrics::Metrics>,
    pub(crate) started: Instant,
}

fn err(code: ErrorCode, msg: impl Into<String>) -> ControlError {
    ControlError::new(code, msg)
}

fn fmt_weights(w: &Weights) -> String {
    w.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

impl Controller {
    /// The state of every upstream.
    pub(crate) fn status(&self) -> Status {
        let snap = self.shared.load();
        Status {
            protocol: PROTOCOL_VERSION,
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_secs: self.started.elapsed().as_secs(),
            upstreams: snap.upstreams.iter().map(|u| upstream_status(u)).collect(),
        }
    }

    /// The upstream a request means: named, or the only one.
    fn upstream(snap: &Snapshot, name: Option<&str>) -> Result<Arc<UpstreamState>, ControlError> {
        let known = || {
            snap.upstreams
                .iter()
                .map(|u| u.name())
                .collect::<Vec<_>>()
                .join(", ")
        };
        match name {
            Some(n) => snap.upstream(n).cloned().ok_or_else(|| {
                err(
                    ErrorCode::UnknownUpstream,
                    format!("unknown upstream {n:?} (known: {})", known()),
                )
            }),
            None if snap.upstreams.len() == 1 => Ok(snap.upstreams[0].clone()),
            None => Err(err(
                ErrorCode::UnknownUpstream,
                format!("several upstreams ({}): name one with --upstream", known()),
            )),
        }
    }

    fn check_pool(u: &UpstreamState, pool: &str) -> Result<(), ControlError> {
        if u.pool(pool).is_some() {
            return Ok(());
        }
        let known: Vec<&str> = u.pools.iter().map(|p| p.pool.name.as_str()).collect();
        Err(err(
            ErrorCode::UnknownPool,
            format!(
                "upstream {} has no pool {pool:?} (pools: {})",
                u.name(),
                known.join(", ")
            ),
        ))
    }

    /// The one path every change takes: lock, build, persist, store, log.
    fn apply(
        &self,
        upstream: Option<&str>,
        actor: Actor,
        cmd: &str,
        build: impl FnOnce(&UpstreamState) -> Result<Option<UpstreamState>, ControlError>,
    ) -> Result<Change, ControlError> {
        self.apply_gated(upstream, actor, cmd, |u, _| build(u))
    }

    /// `apply`, where `build` may set the flag when it skipped a failed health gate.
    fn apply_gated(
        &self,
        upstream: Option<&str>,
        actor: Actor,
        cmd: &str,
        build: impl FnOnce(&UpstreamState, &mut bool) -> Result<Option<UpstreamState>, ControlError>,
    ) -> Result<Change, ControlError> {
        let mut forced = false;
        let guard = self.shared.lock();
        let snap = self.shared.load();
        let cur = Self::upstream(&snap, upstream)?;
        let old_weights = cur.weights();
        let Some(next) = build(&cur, &mut forced)? else {
            // Nothing to change (e.g. switch to the pool that already has 100%).
            return Ok(Change {
                upstream: cur.name().to_string(),
                generation: cur.generation,
                old_weights: old_weights.clone(),
                new_weights: old_weights,
                changed: false,
                forced: false,
                instances: None,
                drain: None,
            });
        };
        let next = Arc::new(next);
        let new_snap = self.shared.with_upstream(&guard, next.clone());
        persist::save(&self.state_file, &new_snap).map_err(|e| {
            err(
                ErrorCode::Internal,
                format!(
                    "not applied: cannot write the state file {}: {e}",
                    self.state_file.display()
                ),
            )
        })?;
        self.shared.store(&guard, new_snap);
        drop(guard);
        let new_weights = next.weights();
        tracing::info!(
            target: "switchyard::audit",
            cmd,
            upstream = %next.name(),
            actor = actor.kind(),
            uid = ?actor.uid(),
            pid = ?actor.pid(),
            old = %fmt_weights(&old_weights),
            new = %fmt_weights(&new_weights),
            generation = next.generation,
            forced,
            "routing changed"
        );
        let mut r = events::record(
            cmd,
            actor.kind(),
            format!(
                "{}: {} -> {}",
                next.name(),
                fmt_weights(&old_weights),
                fmt_weights(&new_weights)
            ),
        );
        r.upstream = Some(next.name().to_string());
        r.uid = actor.uid();
        r.pid = actor.pid();
        r.generation = Some(next.generation);
        r.old_weights = Some(old_weights.clone());
        r.new_weights = Some(new_weights.clone());
        r.forced = forced;
        self.events.record(r);
        if old_weights != new_weights {
            self.metrics
                .switches
                .with_label_values(&[next.name()])
                .inc();
            if cmd == "rollback" {
                self.metrics
                    .rollbacks
                    .with_label_values(&[next.name(), "manual"])
                    .inc();
            }
        }
        Ok(Change {
            upstream: next.name().to_string(),
            generation: next.generation,
            old_weights,
            new_weights,
            changed: true,
            forced,
            instances: None,
            drain: None,
        })
    }

    /// Each instance of `pool` with its health.
    fn pool_health(u: &UpstreamState, pool: &str) -> (usize, Vec<InstanceHealth>) {
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
    fn gate(u: &UpstreamState, pool: &str, min: MinHealthy) -> Result<(), ControlError> {
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
    fn gate_new_traffic(
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
            if let Err(e) = Self::gate(u, pool, gate.min_healthy) {
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
            Ok(Some(u.with_changes(Some(&w), None)))
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
                return Err(err(ErrorCode::Invalid, format!("weight {weight} is above 100")));
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
            let others: u32 = w.iter().filter(|(k, _)| **k != main).map(|(_, v)| *v).sum();
            if others > 100 {
                return Err(err(
                    ErrorCode::Invalid,
                    format!("the other pools already have {}; {pool}={weight} would leave the main pool {main} below 0", others - weight),
                ));
            }
            w.insert(main, 100 - others);
            Self::check_targets(u, &w)?;
            if w == u.weights() {
                return Ok(None);
            }
            Self::gate_new_traffic(u, &w, gate, forced)?;
            Ok(Some(u.with_changes(Some(&w), None)))
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
            let sum: u32 = weights.values().sum();
            if sum != 100 {
                return Err(err(
                    ErrorCode::Invalid,
                    format!(
                        "weights must sum to 100, these sum to {sum} ({})",
                        fmt_weights(weights)
                    ),
                ));
            }
            let mut w: Weights = u.pools.iter().map(|p| (p.pool.name.clone(), 0)).collect();
            w.extend(weights.iter().map(|(k, v)| (k.clone(), *v)));
            Self::check_targets(u, &w)?;
            if w == u.weights() {
                return Ok(None);
            }
            Self::gate_new_traffic(u, &w, gate, forced)?;
            Ok(Some(u.with_changes(Some(&w), None)))
        })
    }

    /// A pool that gets weight must have instances.
    fn check_targets(u: &UpstreamState, w: &Weights) -> Result<(), ControlError> {
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
            Ok(Some(u.with_changes(Some(&prev), None)))
        })
    }

    /// Parse instance addresses given on the wire.
    fn parse_addrs(list: &[String]) -> Result<Vec<InstanceAddr>, ControlError> {
        let mut out: Vec<InstanceAddr> = Vec::new();
        for s in list {
            let a: InstanceAddr = s.parse().map_err(|e: switchyard_config::AddrParseError| {
                err(ErrorCode::Invalid, e.to_string())
            })?;
            if out.contains(&a) {
                return Err(err(ErrorCode::Invalid, format!("{s:?} is listed twice")));
            }
            out.push(a);
        }
        Ok(out)
    }

    /// Replace a pool's instances; `edit` computes the new list from the current one.
    pub(crate) async fn pool_change(
        &self,
        upstream: Option<&str>,
        pool: &str,
        actor: Actor,
        cmd: &str,
        edit: impl FnOnce(&[InstanceAddr]) -> Result<Vec<InstanceAddr>, ControlError>,
    ) -> Result<Change, ControlError> {
        let mut change = self.apply(upstream, actor, cmd, |u| {
            Self::check_pool(u, pool)?;
            let p = u
                .pool(pool)
                .ok_or_else(|| err(ErrorCode::UnknownPool, pool))?;
            let current: Vec<InstanceAddr> = p.instances.iter().map(|i| i.addr.clone()).collect();
            let next = edit(&current)?;
            if next.is_empty() && p.weight > 0 {
                return Err(err(
                    ErrorCode::Invalid,
                    format!(
                        "pool {pool} has weight {} and would be left without instances",
                        p.weight
                    ),
                ));
            }
            if next == current {
                return Ok(None);
            }
            Ok(Some(u.with_changes(None, Some((pool, next)))))
        })?;
        // New DNS-named instances get their first address now, not at the next refresh.
        let snap = self.shared.load();
        if let Some(u) = snap.upstream(&change.upstream) {
            let fresh: Vec<_> = u
                .pools
                .iter()
                .filter(|p| p.pool.name == pool)
                .flat_map(|p| p.instances.iter())
                .filter(|i| i.current_addr().is_none())
                .cloned()
                .collect();
            for i in fresh {
                let _ = tokio::time::timeout(
                    Duration::from_secs(3),
                    resolve::refresh(&*self.resolver, &i),
                )
                .await;
            }
            change.instances = Some(
                u.pools
                    .iter()
                    .map(|p| {
                        (
                            p.pool.name.clone(),
                            p.instances.iter().map(|i| i.label.clone()).collect(),
                        )
                    })
                    .collect(),
            );
        }
        Ok(change)
    }

    /// Wait until every pool in `pools` has nothing in flight, reporting progress.
    pub(crate) async fn wait_drained(
        &self,
        upstream: &str,
        pools: &[String],
        timeout: Duration,
        events: &EventSender,
    ) -> DrainResult {
        let start = tokio::time::Instant::now();
        let mut last: Option<BTreeMap<String, i64>> = None;
        let mut last_report = start;
        loop {
            let snap = self.shared.load();
            let counts: BTreeMap<String, i64> = snap
                .upstream(upstream)
                .map(|u| {
                    pools
                        .iter()
                        .filter_map(|p| {
                            u.pool(p)
                                .map(|ps| (p.clone(), ps.pool.inflight.load(Ordering::Acquire)))
                        })
                        .collect()
                })
                .unwrap_or_default();
            let waited = start.elapsed();
            let drained = counts.values().all(|n| *n == 0);
            let report_due =
                last.as_ref() != Some(&counts) || last_report.elapsed() >= DRAIN_REPORT;
            if (report_due && !drained)
                || (drained && last.is_some() && last.as_ref() != Some(&counts))
            {
                events
                    .send(Event::Draining {
                        upstream: upstream.to_string(),
                        inflight: counts.clone(),
                        waited_ms: waited.as_millis() as u64,
                    })
                    .await;
                last_report = tokio::time::Instant::now();
            }
            last = Some(counts.clone());
            if drained || waited >= timeout {
                return DrainResult {
                    upstream: upstream.to_string(),
                    inflight: counts,
                    drained,
                    waited_ms: waited.as_millis() as u64,
                };
            }
            tokio::time::sleep(DRAIN_POLL.min(timeout.saturating_sub(waited))).await;
        }
    }

    /// `drain POOL`: wait for a pool at weight 0 to have nothing in flight.
    pub(crate) async fn drain(
        &self,
        upstream: Option<&str>,
        pool: &str,
        timeout: Option<Duration>,
        events: &EventSender,
    ) -> Result<DrainResult, ControlError> {
        let u = Self::upstream(&self.shared.load(), upstream)?;
        Self::check_pool(&u, pool)?;
        if let Some(p) = u.pool(pool).filter(|p| p.weight > 0) {
            return Err(err(
                ErrorCode::Invalid,
                format!(
                    "pool {pool} still receives traffic (weight {}); switch away from it first",
                    p.weight
                ),
            ));
        }
        let timeout = timeout.unwrap_or(u.config.drain_timeout);
        let r = self
            .wait_drained(u.name(), &[pool.to_string()], timeout, events)
            .await;
        if r.drained {
            Ok(r)
        } else {
            Err(drain_timeout_error(&r, timeout, None))
        }
    }

    /// `reload`: re-read the config file; keep the running config on any problem.
    pub(crate) async fn reload(&self, actor: Actor) -> Result<ReloadResult, ControlError> {
        let Some(path) = self.config_path.clone() else {
            return Err(err(
                ErrorCode::Invalid,
                "this proxy was started without a config file; nothing to reload",
            ));
        };
        let result = self.reload_from(&path, actor).await;
        let label = if result.is_ok() { "ok" } else { "error" };
        self.metrics.reloads.with_label_values(&[label]).inc();
        if let Err(e) = &result {
            let mut r = events::record(
                "reload",
                actor.kind(),
                format!(
                    "reload refused, the running config stays: {}",
                    e.message.lines().next().unwrap_or("")
                ),
            );
            r.uid = actor.uid();
            r.pid = actor.pid();
            self.events.record(r);
        }
        result
    }

    async fn reload_from(
        &self,
        path: &std::path::Path,
        actor: Actor,
    ) -> Result<ReloadResult, ControlError> {
        let config = match switchyard_config::load(path) {
            Ok(c) => c,
            Err(e) => {
                let problems = e.field_errors();
                tracing::warn!(path = %path.display(), problems = problems.len(), "reload refused; the running config stays");
                return Err(err(
                    ErrorCode::Invalid,
                    format!(
                        "{} has {} problem(s); the running config stays:\n{}",
                        path.display(),
                        problems.len(),
                        problems
                            .iter()
                            .map(|p| p.to_string())
                            .collect::<Vec<_>>()
                            .join("\n")
                    ),
                )
                .with_details(serde_json::to_value(&problems).unwrap_or_default()));
            }
        };
        let problems = crate::handle::preflight(&config);
        if !problems.is_empty() {
            return Err(err(
                ErrorCode::Invalid,
                problems
                    .iter()
                    .map(|p| p.to_string())
                    .collect::<Vec<_>>()
                    .join("\n"),
            )
            .with_details(serde_json::to_value(&problems).unwrap_or_default()));
        }
        let summary = config.summary();
        let needs_restart = self.install_config(config)?;
        resolve::refresh_all(&self.shared, &*self.resolver).await;
        let mut r = events::record(
            "reload",
            actor.kind(),
            format!("config reloaded from {}: {summary}", path.display()),
        );
        r.uid = actor.uid();
        r.pid = actor.pid();
        self.events.record(r);
        tracing::info!(
            target: "switchyard::audit",
            cmd = "reload",
            actor = actor.kind(),
            uid = ?actor.uid(),
            pid = ?actor.pid(),
            path = %path.display(),
            ?needs_restart,
            "config reloaded"
        );
        Ok(ReloadResult {
            summary,
            needs_restart,
        })
    }

    /// Swap in a new config (under the writer lock, persisted). Returns the settings that
    /// changed but only take effect after a restart.
    fn install_config(
        &self,
        config: switchyard_config::Config,
    ) -> Result<Vec<String>, ControlError> {
        let guard = self.shared.lock();
        let old = self.shared.load();
        let o = &old.config;
        let needs_restart: Vec<String> = [
            ("listen", o.listen != config.listen),
            ("threads", o.threads != config.threads),
            ("control", o.control != config.control),
            ("admin", o.admin != config.admin),
            ("state_file", o.state_file != config.state_file),
        ]
        .into_iter()
        .filter(|(_, changed)| *changed)
        .map(|(k, _)| k.to_string())
        .collect();
        let new_snap = Snapshot::build(Arc::new(config), &BTreeMap::new(), Some(&old));
        persist::save(&self.state_file, &new_snap).map_err(|e| {
            err(
                ErrorCode::Internal,
                format!("not applied: cannot write the state file: {e}"),
            )
        })?;
        self.shared.store(&guard, new_snap);
        Ok(needs_restart)
    }

    /// Carry out one protocol request (the socket's and `Handle::execute`'s entry point).
    pub(crate) async fn execute(&self, req: Request, actor: Actor, events: &EventSender) -> Reply {
        fn reply<T: serde::Serialize>(r: Result<T, ControlError>) -> Reply {
            match r {
                Ok(v) => Reply::ok(v),
                Err(e) => Reply::err(e),
            }
        }
        let ms = Duration::from_millis;
        match req {
            Request::Status => Reply::ok(self.status()),
            Request::Switch {
                upstream,
                pool,
                drain,
                drain_ms,
                min_healthy,
                wait_healthy_ms,
                force,
            } => {
                if let (Some(ms), false) = (wait_healthy_ms, force) {
                    if let Err(e) = self
                        .wait_healthy(
                            upstream.as_deref(),
                            &pool,
                            min_healthy,
                            Duration::from_millis(ms),
                            events,
                        )
                        .await
                    {
                        return Reply::err(e);
                    }
                }
                let gate = Gate { min_healthy, force };
                let change = match self.switch(upstream.as_deref(), &pool, gate, actor) {
                    Ok(c) => c,
                    Err(e) => return Reply::err(e),
                };
                if !drain && drain_ms.is_none() {
                    return Reply::ok(change);
                }
                events
                    .send(Event::Applied {
                        change: change.clone(),
                    })
                    .await;
                let lost: Vec<String> = change
                    .old_weights
                    .iter()
                    .filter(|(p, w)| **w > 0 && change.new_weights.get(*p) == Some(&0))
                    .map(|(p, _)| p.clone())
                    .collect();
                let timeout = drain_ms.map(ms).unwrap_or_else(|| {
                    Self::upstream(&self.shared.load(), Some(&change.upstream))
                        .map(|u| u.config.drain_timeout)
                        .unwrap_or(Duration::from_secs(30))
                });
                let r = self
                    .wait_drained(&change.upstream, &lost, timeout, events)
                    .await;
                let mut change = change;
                change.drain = Some(r.clone());
                if r.drained {
                    Reply::ok(change)
                } else {
                    Reply::err(drain_timeout_error(&r, timeout, Some(&change)))
                }
            }
            Request::Rollback { upstream } => reply(self.rollback(upstream.as_deref(), actor)),
            Request::Weight {
                upstream,
                pool,
                weight,
                min_healthy,
                force,
            } => reply(self.set_weight(
                upstream.as_deref(),
                &pool,
                weight,
                Gate { min_healthy, force },
                actor,
            )),
            Request::Weights {
                upstream,
                weights,
                min_healthy,
                force,
            } => reply(self.set_weights(
                upstream.as_deref(),
                &weights,
                Gate { min_healthy, force },
                actor,
            )),
            Request::Drain {
                upstream,
                pool,
                timeout_ms,
            } => reply(
                self.drain(upstream.as_deref(), &pool, timeout_ms.map(ms), events)
                    .await,
            ),
            Request::PoolSet {
                upstream,
                pool,
                instances,
            } => {
                let list = match Self::parse_addrs(&instances) {
                    Ok(l) => l,
                    Err(e) => return Reply::err(e),
                };
                if list.is_empty() {
                    return Reply::err(err(
                        ErrorCode::Invalid,
                        "pool set needs at least one instance",
                    ));
                }
                reply(
                    self.pool_change(upstream.as_deref(), &pool, actor, "pool_set", |_| Ok(list))
                        .await,
                )
            }
            Request::PoolAdd {
                upstream,
                pool,
                instance,
            } => {
                let add = match Self::parse_addrs(std::slice::from_ref(&instance)) {
                    Ok(mut l) => l.remove(0),
                    Err(e) => return Reply::err(e),
                };
                reply(
                    self.pool_change(upstream.as_deref(), &pool, actor, "pool_add", |cur| {
                        if cur.contains(&add) {
                            return Err(err(
                                ErrorCode::Invalid,
                                format!("{add} is already in pool {pool}"),
                            ));
                        }
                        let mut next = cur.to_vec();
                        next.push(add.clone());
                        Ok(next)
                    })
                    .await,
                )
            }
            Request::PoolRemove {
                upstream,
                pool,
                instance,
            } => {
                let gone = match Self::parse_addrs(std::slice::from_ref(&instance)) {
                    Ok(mut l) => l.remove(0),
                    Err(e) => return Reply::err(e),
                };
                reply(
                    self.pool_change(upstream.as_deref(), &pool, actor, "pool_remove", |cur| {
                        if !cur.contains(&gone) {
                            return Err(err(
                                ErrorCode::Invalid,
                                format!("{gone} is not in pool {pool}"),
                            ));
                        }
                        Ok(cur.iter().filter(|a| **a != gone).cloned().collect())
                    })
                    .await,
                )
            }
            Request::Reload => reply(self.reload(actor).await),
            Request::Events { follow, limit } => {
                // Subscribe first so nothing falls between the history and the stream.
                let mut rx = self.events.subscribe();
                let history = self.events.recent(limit.unwrap_or(100));
                if !follow {
                    return Reply::ok(history);
                }
                for r in history {
                    if !events.send(Event::Record { record: r }).await {
                        return Reply::ok(Vec::<()>::new());
                    }
                }
                loop {
                    match rx.recv().await {
                        Ok(r) => {
                            if !events.send(Event::Record { record: r }).await {
                                return Reply::ok(Vec::<()>::new());
                            }
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                            return Reply::ok(Vec::<()>::new())
                        }
                    }
                }
            }
            _ => Reply::err(err(
                ErrorCode::BadRequest,
                "command not supported by this proxy",
            )),
        }
    }
}

fn drain_timeout_error(
    r: &DrainResult,
    timeout: Duration,
    change: Option<&Change>,
) -> ControlError {
    let pending: Vec<String> = r
        .inflight
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(p, n)| format!("{p} still has {n} request(s) in flight"))
        .collect();
    let prefix = change
        .map(|c| {
            format!(
                "switched {} (generation {}), but ",
                c.upstream, c.generation
            )
        })
        .unwrap_or_default();
    let e = err(
        ErrorCode::Timeout,
        format!(
            "{prefix}{} after {}",
            pending.join(", "),
            humantime_secs(timeout)
        ),
    );
    match change {
        Some(c) => e.with_details(serde_json::to_value(c).unwrap_or_default()),
        None => e.with_details(serde_json::to_value(r).unwrap_or_default()),
    }
}

fn humantime_secs(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

pub(crate) fn upstream_status(u: &UpstreamState) -> UpstreamStatus {
    let now = now_ms();
    UpstreamStatus {
        name: u.name().to_string(),
        generation: u.generation,
        main: u.pools[u.main].pool.name.clone(),
        weights: u.weights(),
        previous: u.previous.clone(),
        pools: u
            .pools
            .iter()
            .map(|p| {
                let inflight = p.pool.inflight.load(Ordering::Acquire);
                PoolStatus {
                    name: p.pool.name.clone(),
                    weight: p.weight,
                    phase: match (p.weight, inflight) {
                        (w, _) if w > 0 => PoolPhase::Active,
                        (_, n) if n > 0 => PoolPhase::Draining,
                        _ => PoolPhase::Drained,
                    },
                    inflight,
                    instances: p
                        .instances
                        .iter()
                        .map(|i| {
                            let r = i.resolved.load();
                            let d = i.health.detail();
                            InstanceStatus {
                                addr: i.label.clone(),
                                resolved: r.addrs.first().map(|a| a.to_string()),
                                resolve_error: r.error.clone(),
                                inflight: i.inflight.load(Ordering::Acquire),
                                health: i.health.reported(now),
                                last_check: d.last_check,
                                health_since_secs: d
                                    .since
                                    .elapsed()
                                    .map(|e| e.as_secs())
                                    .unwrap_or(0),
                                ejected_for_secs: i
                                    .health
                                    .ejected_for(now)
                                    .map(|d| d.as_secs().max(1)),
                                passive_failures: i.health.passive_failures(),
                            }
                        })
                        .collect(),
                }
            })
            .collect(),
    }
}

/// The control socket's handler: the controller, with the peer as the actor.
#[derive(Debug)]
pub(crate) struct SocketHandler(pub(crate) Arc<Controller>);

#[async_trait::async_trait]
impl switchyard_control::ControlHandler for SocketHandler {
    async fn handle(&self, req: Request, peer: Peer, events: EventSender) -> Reply {
        let name = req.name();
        let reply = self.0.execute(req, Actor::Socket(peer), &events).await;
        if let Some(e) = &reply.error {
            tracing::info!(cmd = name, uid = peer.uid, pid = ?peer.pid, code = ?e.code, error = %e.message, "control request refused");
        }
        reply
    }
}
