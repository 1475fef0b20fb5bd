//! The operations on a running proxy (SPEC §5): where a change is decided and applied. Both the
//! library `Handle` and the control socket (`surfaces::control`) call into [`Controller`].
//!
//! Every change follows one path, [`Controller::apply_gated`]: take the writer lock, build the
//! new upstream state from the current one, write the state file, store the new snapshot (one
//! atomic swap — from here on every new request is routed by it), log who did it, and only then
//! acknowledge. Waiting (drains, health) happens outside the lock; cancelling a wait never
//! undoes the change.
//!
//! - `weights`: switch, weight, weights, rollback.
//! - `gate`: the health gate and `--wait-healthy`.
//! - `pools`: pool set/add/remove.
//! - `drain`: waiting for pools to drain.
//! - `reload`: re-reading the config file.
//! - `status`: the status document.
//! - `canary`: progressive rollouts (start, pause, resume, abort, promote, wait) and the
//!   changes the autopilot makes.
//! - `autopilot`: the task that samples every pool's counters, judges canaries, advances
//!   rollouts and rolls bad canaries back.

use crate::checks::dns::Resolve;
use crate::routing::weights::fmt_weights;
use crate::state::{CommitError, Shared, Snapshot};
use crate::telemetry::access_log::AccessLog;
use crate::telemetry::events::{self, EventLog};
use crate::telemetry::metrics::Metrics;
use crate::upstream::UpstreamState;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;
use switchyard_control::protocol::{Change, ControlError, ErrorCode};
use switchyard_control::{MinHealthy, Peer};

pub(crate) mod autopilot;
mod canary;
mod drain;
mod gate;
mod pools;
mod reload;
mod status;
mod weights;

pub(crate) use drain::drain_timeout_error;
pub(crate) use status::upstream_status;

/// Who asked for a change (for the audit log).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Actor {
    /// A control socket client.
    Socket(Peer),
    /// A call through the library `Handle`.
    Library,
    /// A signal (SIGHUP reload).
    Signal,
    /// The proxy itself (a rollout step, an automatic rollback).
    Proxy,
    /// The fleet's desired state, written by another proxy (SPEC §9).
    Fleet,
}

impl Actor {
    pub(crate) fn uid(&self) -> Option<u32> {
        match self {
            Actor::Socket(p) => Some(p.uid),
            _ => None,
        }
    }
    pub(crate) fn pid(&self) -> Option<i32> {
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
            Actor::Proxy => "proxy",
            Actor::Fleet => "fleet",
        }
    }
}

/// Health gate of a change: how many instances must be healthy, or skip it.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Gate {
    pub(crate) min_healthy: MinHealthy,
    pub(crate) force: bool,
}

/// The control side of a running proxy.
#[derive(Debug)]
pub(crate) struct Controller {
    pub(crate) shared: Arc<Shared>,
    pub(crate) state_file: PathBuf,
    pub(crate) control_socket: PathBuf,
    pub(crate) config_path: Option<PathBuf>,
    pub(crate) resolver: Arc<dyn Resolve>,
    pub(crate) events: Arc<EventLog>,
    pub(crate) metrics: Arc<Metrics>,
    /// Reconfigured by a reload.
    pub(crate) access_log: Arc<AccessLog>,
    pub(crate) started: Instant,
    /// What the autopilot last measured (live numbers, why a rollout waits).
    pub(crate) observed: Arc<autopilot::Observations>,
    /// Each TLS listener's certificates (by index in `listen` and configured address),
    /// reloaded by a reload.
    pub(crate) tls: Vec<(
        usize,
        std::net::SocketAddr,
        Arc<crate::listen::CertResolver>,
    )>,
    /// The fleet this proxy follows (SPEC §9), if any: every change is written to its desired
    /// state before it is committed here.
    pub(crate) fleet: Option<Arc<crate::fleet::Fleet>>,
}

pub(crate) fn err(code: ErrorCode, msg: impl Into<String>) -> ControlError {
    ControlError::new(code, msg)
}

impl Controller {
    /// Run `f` on tokio's blocking pool. A change writes and fsyncs the state file under the
    /// writer lock, and a reload reads the config and certificate files; neither may stall
    /// the control runtime, which also runs the health checks, DNS, the admin listener and the
    /// control socket (a slow disk must not make a pool look unhealthy or `status` hang).
    pub(crate) async fn off_runtime<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Controller) -> Result<T, ControlError> + Send + 'static,
    ) -> Result<T, ControlError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || f(&this))
            .await
            .unwrap_or_else(|e| {
                Err(err(
                    ErrorCode::Internal,
                    format!("the operation failed unexpectedly: {e}"),
                ))
            })
    }

    /// The upstream a request means: named, or the only one.
    pub(crate) fn upstream(
        snap: &Snapshot,
        name: Option<&str>,
    ) -> Result<Arc<UpstreamState>, ControlError> {
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

    pub(crate) fn check_pool(u: &UpstreamState, pool: &str) -> Result<(), ControlError> {
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
    pub(crate) fn apply(
        &self,
        upstream: Option<&str>,
        actor: Actor,
        cmd: &str,
        build: impl FnOnce(&UpstreamState) -> Result<Option<UpstreamState>, ControlError>,
    ) -> Result<Change, ControlError> {
        self.apply_gated(upstream, actor, cmd, |u, _| build(u))
    }

    /// `apply`, where `build` may set the flag when it skipped a failed health gate.
    pub(crate) fn apply_gated(
        &self,
        upstream: Option<&str>,
        actor: Actor,
        cmd: &str,
        build: impl FnOnce(&UpstreamState, &mut bool) -> Result<Option<UpstreamState>, ControlError>,
    ) -> Result<Change, ControlError> {
        self.apply_noted(upstream, actor, cmd, None, build)
    }

    fn commit_error(&self, e: CommitError) -> ControlError {
        let fleet = if self.fleet.is_some() {
            " here (the fleet's desired state has it: this proxy applies it when it can)"
        } else {
            ""
        };
        match e {
            CommitError::Frozen => err(ErrorCode::Busy, format!("not applied: {e}")),
            CommitError::Io(e) => err(
                ErrorCode::Internal,
                format!(
                    "not applied{fleet}: cannot write the state file {}: {e}",
                    self.state_file.display()
                ),
            ),
        }
    }

    /// Serve the fleet's desired state `d` (revision `rev`) for `upstream`: the same writer
    /// lock, state file and audit trail as a local change. Already served: nothing to do,
    /// unless `again`.
    pub(crate) fn apply_desired(
        &self,
        upstream: &str,
        rev: i64,
        d: &crate::fleet::Desired,
        again: bool,
    ) -> Result<(), ControlError> {
        let guard = self.shared.lock();
        self.apply_desired_locked(&guard, upstream, rev, d, again)
    }

    /// [`Self::apply_desired`] with the writer lock held.
    fn apply_desired_locked(
        &self,
        guard: &std::sync::MutexGuard<'_, ()>,
        upstream: &str,
        rev: i64,
        d: &crate::fleet::Desired,
        again: bool,
    ) -> Result<(), ControlError> {
        let Some(fleet) = &self.fleet else {
            return Ok(());
        };
        let served = fleet.served_revision(upstream);
        // `again` (after a reload): the revision served, on top of the new config.
        if rev < served || (rev == served && !again) {
            return Ok(());
        }
        let snap = self.shared.load();
        let cur = Self::upstream(&snap, Some(upstream))?;
        let rt = d.runtime(&cur).map_err(|e| err(ErrorCode::Invalid, e))?;
        let next = Arc::new(UpstreamState::build(cur.config.clone(), &rt, Some(&cur)));
        let old_weights = cur.weights();
        let new_snap = self.shared.with_upstream(guard, next.clone());
        self.shared
            .commit(guard, new_snap, &self.state_file)
            .map_err(|e| self.commit_error(e))?;
        fleet.mark_served(upstream, rev);
        let new_weights = next.weights();
        if cur.generation == next.generation && old_weights == new_weights {
            return Ok(());
        }
        let by = if d.by.is_empty() { "?" } else { d.by.as_str() };
        tracing::info!(
            target: "switchyard::audit",
            cmd = "fleet",
            upstream = %upstream,
            actor = "fleet",
            by,
            old = %fmt_weights(&old_weights),
            new = %fmt_weights(&new_weights),
            generation = next.generation,
            revision = rev,
            "routing changed by the fleet's desired state"
        );
        let mut r = events::record(
            "fleet",
            Actor::Fleet.kind(),
            format!(
                "{upstream}: {} -> {} (the fleet's desired state, written by {by})",
                fmt_weights(&old_weights),
                fmt_weights(&new_weights)
            ),
        );
        r.upstream = Some(upstream.to_string());
        r.generation = Some(next.generation);
        r.old_weights = Some(old_weights.clone());
        r.new_weights = Some(new_weights.clone());
        self.events.record(r);
        if old_weights != new_weights {
            self.metrics.switches.with_label_values(&[upstream]).inc();
        }
        Ok(())
    }

    /// `apply_gated` with a note for the audit trail (why the proxy made this change).
    pub(crate) fn apply_noted(
        &self,
        upstream: Option<&str>,
        actor: Actor,
        cmd: &str,
        note: Option<&str>,
        build: impl FnOnce(&UpstreamState, &mut bool) -> Result<Option<UpstreamState>, ControlError>,
    ) -> Result<Change, ControlError> {
        let mut forced = false;
        let guard = self.shared.lock();
        let mut snap = self.shared.load();
        if let Some(f) = &self.fleet {
            // A fleet proxy that has not applied the fleet's latest state yet (its watch is a
            // moment behind, or it just took over from an older process) catches up first:
            // the change is decided on the state the fleet serves, not refused as a conflict.
            let name = Self::upstream(&snap, upstream)?.name().to_string();
            if let Some((rev, d)) = f.newer_desired(&name) {
                self.apply_desired_locked(&guard, &name, rev, &d, false)
                    .map_err(|e| match e.code {
                        ErrorCode::Invalid => err(
                            ErrorCode::Invalid,
                            format!("not applied: this proxy cannot serve the fleet's desired state of {name} ({}); fix its config (then `proxyctl reload`) or change the fleet from a proxy that can", e.message),
                        ),
                        _ => e,
                    })?;
                snap = self.shared.load();
            }
        }
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
        // A fleet proxy: the change goes to the fleet's desired state first (compare-and-swap
        // on the revision this proxy serves); refused there, it is applied nowhere.
        let written = match &self.fleet {
            Some(f) => {
                if self.shared.is_frozen() {
                    return Err(self.commit_error(CommitError::Frozen));
                }
                let mut d = crate::fleet::Desired::from_state(&next, f.name());
                if let Some(current) = f.desired(next.name()) {
                    d.carry_unknown(&current);
                }
                Some((f, f.write(next.name(), &d)?))
            }
            None => None,
        };
        let new_snap = self.shared.with_upstream(&guard, next.clone());
        self.shared
            .commit(&guard, new_snap, &self.state_file)
            .map_err(|e| self.commit_error(e))?;
        if let Some((f, rev)) = written {
            f.mark_served(next.name(), rev);
        }
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
            note,
            "routing changed"
        );
        let mut message = format!(
            "{}: {} -> {}",
            next.name(),
            fmt_weights(&old_weights),
            fmt_weights(&new_weights)
        );
        if let Some(n) = note {
            message.push_str(&format!(" ({n})"));
        }
        let mut r = events::record(cmd, actor.kind(), message);
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
            // An abort puts the canary's traffic back on the stable pool by hand: a manual
            // rollback, as `rollback` is.
            if cmd == "rollback" || cmd == "canary_abort" {
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
}
