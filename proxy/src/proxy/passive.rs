//! Passive health seen from live traffic (SPEC §4.4): failures in a row eject an instance for a
//! while, and a pool with no usable instance fails open (announced once per transition, not
//! per request).

use super::ctx::RequestCtx;
use crate::telemetry::events::{self, EventLog};
use crate::upstream::health::now_ms;
use crate::upstream::{PoolState, UpstreamState};
use std::sync::atomic::Ordering;

/// Log (once per transition) that a pool has no usable instance and is tried whole.
pub(crate) fn note_fail_open(
    events: &EventLog,
    up: &UpstreamState,
    pool: &PoolState,
    fail_open: bool,
) {
    let flag = &pool.pool.fail_open;
    if flag.load(Ordering::Relaxed) == fail_open
        || flag.swap(fail_open, Ordering::AcqRel) == fail_open
    {
        return;
    }
    let msg = if fail_open {
        tracing::warn!(upstream = %up.name(), pool = %pool.pool.name, "no healthy instance: failing open, trying all instances");
        format!(
            "{}/{}: no healthy instance, failing open (trying all instances)",
            up.name(),
            pool.pool.name
        )
    } else {
        tracing::info!(upstream = %up.name(), pool = %pool.pool.name, "healthy instances again: fail-open over");
        format!(
            "{}/{}: healthy instances again, fail-open over",
            up.name(),
            pool.pool.name
        )
    };
    let mut r = events::record("fail_open", "proxy", msg);
    r.upstream = Some(up.name().to_string());
    r.pool = Some(pool.pool.name.clone());
    events.record(r);
}

/// The current attempt failed (connect error, broken connection, 502-504). Ejects the instance
/// after `passive.consecutive_failures` in a row, unless it is the last usable instance of its
/// pool.
pub(crate) fn failure(events: &EventLog, ctx: &RequestCtx) {
    let (Some(up), Some(pi), Some(inst)) = (&ctx.upstream, ctx.pool, &ctx.instance) else {
        return;
    };
    let cfg = &up.config.passive;
    if cfg.consecutive_failures == 0 {
        return;
    }
    let n = inst.health.record_failure();
    if n < cfg.consecutive_failures {
        return;
    }
    let now = now_ms();
    let pool = &up.pools[pi];
    let others = pool
        .instances
        .iter()
        .any(|i| i.id != inst.id && i.current_addr().is_some() && i.health.usable(now));
    if !others {
        tracing::debug!(instance = %inst.label, "not ejecting the last usable instance of the pool");
        return;
    }
    let until = now + cfg.eject_for.as_millis() as u64;
    if inst.health.eject(until, now) {
        tracing::warn!(upstream = %up.name(), pool = %pool.pool.name, instance = %inst.label, failures = n, eject_for = ?cfg.eject_for, "instance ejected after failures in a row");
        let mut r = events::record(
            "eject",
            "proxy",
            format!(
                "{}/{} {}: ejected for {}s after {n} failures in a row",
                up.name(),
                pool.pool.name,
                inst.label,
                cfg.eject_for.as_secs()
            ),
        );
        r.upstream = Some(up.name().to_string());
        r.pool = Some(pool.pool.name.clone());
        r.instance = Some(inst.label.clone());
        events.record(r);
    }
}

/// A response arrived: 502-504 count as failures, anything else resets the count.
pub(crate) fn response(events: &EventLog, ctx: &RequestCtx, status: u16) {
    match status {
        502..=504 => failure(events, ctx),
        _ => {
            if let Some(i) = &ctx.instance {
                i.health.record_success();
            }
        }
    }
}
