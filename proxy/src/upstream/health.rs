//! An instance's health, as the request path sees it (two atomics) and as the checker and
//! passive ejection update it.
//!
//! States: `Unknown` until `healthy_threshold` checks pass in a row (or `unhealthy_threshold`
//! fail), then `Healthy`/`Unhealthy`. Passive ejection is separate: an instance is usable when
//! it is healthy *and* its ejection has expired, so an ejected instance returns after
//! `eject_for` only if the active check still passes.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use switchyard_control::HealthState;

const UNKNOWN: u8 = 0;
const HEALTHY: u8 = 1;
const UNHEALTHY: u8 = 2;

/// The origin of [`now_ms`]: fixed at first use, never changed (not mutable shared state).
static ORIGIN: OnceLock<Instant> = OnceLock::new();

/// Milliseconds on the monotonic clock since the process first asked. Ejection deadlines are
/// compared with it on the request path: a step of the wall clock (NTP, a VM resumed) must not
/// end an ejection early or stretch it for hours.
pub(crate) fn now_ms() -> u64 {
    // +1: 0 is "never ejected" in `Health::ejected_until_ms`.
    ORIGIN.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// What the checker knows beyond the state.
#[derive(Debug, Clone)]
pub(crate) struct CheckDetail {
    /// The last check's outcome in words.
    pub(crate) last_check: Option<String>,
    /// When the state last changed.
    pub(crate) since: Instant,
    /// Passes in a row.
    pub(crate) passes: u32,
    /// Failures in a row.
    pub(crate) fails: u32,
    /// Checks recorded since start: `--wait-healthy` counts only checks made after it began.
    pub(crate) checks: u64,
}

/// A state transition, for logs and the audit trail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Transition {
    pub(crate) from: HealthState,
    pub(crate) to: HealthState,
}

#[derive(Debug)]
pub(crate) struct Health {
    state: AtomicU8,
    ejected_until_ms: AtomicU64,
    passive_failures: AtomicU32,
    detail: Mutex<CheckDetail>,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            state: AtomicU8::new(UNKNOWN),
            ejected_until_ms: AtomicU64::new(0),
            passive_failures: AtomicU32::new(0),
            detail: Mutex::new(CheckDetail {
                last_check: None,
                since: Instant::now(),
                passes: 0,
                fails: 0,
                checks: 0,
            }),
        }
    }
}

fn decode(v: u8) -> HealthState {
    match v {
        HEALTHY => HealthState::Healthy,
        UNHEALTHY => HealthState::Unhealthy,
        _ => HealthState::Unknown,
    }
}

impl Health {
    /// Active state only.
    pub(crate) fn state(&self) -> HealthState {
        decode(self.state.load(Ordering::Acquire))
    }

    /// Whether the request path may pick this instance now.
    pub(crate) fn usable(&self, now_ms: u64) -> bool {
        self.state.load(Ordering::Relaxed) == HEALTHY
            && self.ejected_until_ms.load(Ordering::Relaxed) <= now_ms
    }

    /// Remaining ejection, if ejected.
    pub(crate) fn ejected_for(&self, now_ms: u64) -> Option<Duration> {
        let until = self.ejected_until_ms.load(Ordering::Relaxed);
        (until > now_ms).then(|| Duration::from_millis(until - now_ms))
    }

    /// State as reported: `Ejected` wins while the ejection lasts.
    pub(crate) fn reported(&self, now_ms: u64) -> HealthState {
        if self.ejected_for(now_ms).is_some() {
            HealthState::Ejected
        } else {
            self.state()
        }
    }

    /// Copy of the checker's detail.
    pub(crate) fn detail(&self) -> CheckDetail {
        self.detail
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Record an active check. Returns the transition, if the state changed.
    pub(crate) fn record_check(
        &self,
        ok: bool,
        outcome: String,
        healthy_threshold: u32,
        unhealthy_threshold: u32,
    ) -> Option<Transition> {
        let mut d = self.detail.lock().unwrap_or_else(|p| p.into_inner());
        d.last_check = Some(outcome);
        d.checks = d.checks.saturating_add(1);
        if ok {
            d.passes = d.passes.saturating_add(1);
            d.fails = 0;
        } else {
            d.fails = d.fails.saturating_add(1);
            d.passes = 0;
        }
        let cur = self.state.load(Ordering::Acquire);
        let next = if ok && cur != HEALTHY && d.passes >= healthy_threshold {
            HEALTHY
        } else if !ok && cur != UNHEALTHY && d.fails >= unhealthy_threshold {
            UNHEALTHY
        } else {
            cur
        };
        if next == cur {
            return None;
        }
        self.state.store(next, Ordering::Release);
        d.since = Instant::now();
        Some(Transition {
            from: decode(cur),
            to: decode(next),
        })
    }

    /// Passive: a request to this instance failed (connect error, 502/503/504). Returns the
    /// failures in a row so far.
    pub(crate) fn record_failure(&self) -> u32 {
        self.passive_failures.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// Passive: a request succeeded.
    pub(crate) fn record_success(&self) {
        // Skip the write (and the cache-line bounce) in the common case.
        if self.passive_failures.load(Ordering::Relaxed) != 0 {
            self.passive_failures.store(0, Ordering::Release);
        }
    }

    pub(crate) fn passive_failures(&self) -> u32 {
        self.passive_failures.load(Ordering::Relaxed)
    }

    /// Take the instance out of rotation until `until_ms`. False if it already is.
    pub(crate) fn eject(&self, until_ms: u64, now_ms: u64) -> bool {
        let prev = self.ejected_until_ms.swap(until_ms, Ordering::AcqRel);
        self.passive_failures.store(0, Ordering::Release);
        prev <= now_ms
    }

    /// Set the state directly (tests, and instances whose state a predecessor process knew at
    /// a binary upgrade).
    pub(crate) fn force(&self, s: HealthState) {
        let v = match s {
            HealthState::Healthy => HEALTHY,
            HealthState::Unhealthy => UNHEALTHY,
            _ => UNKNOWN,
        };
        self.state.store(v, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_count_consecutive_results() {
        let h = Health::default();
        assert_eq!(h.state(), HealthState::Unknown);
        assert_eq!(h.record_check(true, "ok".into(), 2, 3), None);
        let t = h.record_check(true, "ok".into(), 2, 3).unwrap();
        assert_eq!((t.from, t.to), (HealthState::Unknown, HealthState::Healthy));
        assert!(h.usable(now_ms()));
        assert_eq!(h.record_check(false, "x".into(), 2, 3), None);
        assert_eq!(h.record_check(false, "x".into(), 2, 3), None);
        assert_eq!(
            h.record_check(true, "ok".into(), 2, 3),
            None,
            "a pass resets the failures"
        );
        assert_eq!(h.record_check(false, "x".into(), 2, 3), None);
        assert_eq!(h.record_check(false, "x".into(), 2, 3), None);
        let t = h.record_check(false, "x".into(), 2, 3).unwrap();
        assert_eq!(t.to, HealthState::Unhealthy);
        assert!(!h.usable(now_ms()));
        assert_eq!(h.detail().last_check.as_deref(), Some("x"));
    }

    #[test]
    fn ejection_deadlines_are_on_the_monotonic_clock() {
        // Milliseconds since the process started, not since 1970.
        let a = now_ms();
        assert!(a < 366 * 24 * 3600 * 1000, "{a} ms: wall-clock time?");
        std::thread::sleep(Duration::from_millis(20));
        let b = now_ms();
        assert!((20..1000).contains(&(b - a)), "{a} -> {b}");
    }

    #[test]
    fn ejection_expires_but_needs_a_healthy_state() {
        let h = Health::default();
        h.force(HealthState::Healthy);
        let now = now_ms();
        assert!(h.eject(now + 1000, now));
        assert!(!h.eject(now + 1000, now), "already ejected");
        assert!(!h.usable(now));
        assert_eq!(h.reported(now), HealthState::Ejected);
        assert!(h.usable(now + 1000));
        h.force(HealthState::Unhealthy);
        assert!(!h.usable(now + 1000));
    }
}
