//! Waiting for pools to drain: the in-flight counters of the pools that lost their weight are
//! watched until they reach 0 (SPEC §4 invariant 3), with progress events. A wait never undoes
//! a change; a client that disconnects cancels only the wait.

use super::{err, Controller};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Duration;
use switchyard_control::protocol::{Change, ControlError, DrainResult, ErrorCode, Event};
use switchyard_control::EventSender;

/// How often a drain wait looks at the in-flight counters.
const DRAIN_POLL: Duration = Duration::from_millis(20);
/// How often a drain wait reports progress when nothing changes.
const DRAIN_REPORT: Duration = Duration::from_secs(1);

impl Controller {
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
            // A snapshot whose version is not yet published may have requests about to count
            // themselves on the old pool (`Shared::bind`): wait for the publication.
            let mut snap = self.shared.load();
            while self.shared.published() < snap.version {
                tokio::task::yield_now().await;
                snap = self.shared.load();
            }
            let counts: BTreeMap<String, i64> = snap
                .upstream(upstream)
                .map(|u| {
                    pools
                        .iter()
                        .filter_map(|p| {
                            u.pool(p)
                                .map(|ps| (p.clone(), ps.pool.inflight.load(Ordering::SeqCst)))
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
}

pub(crate) fn drain_timeout_error(
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

pub(crate) fn humantime_secs(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}
