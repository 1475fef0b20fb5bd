//! A pool's request counters: requests by status code and a latency histogram.
//!
//! The pool keeps them itself (a few relaxed atomic adds per request, no lock, no map lookup)
//! and readers copy them when they need them: telemetry when Prometheus scrapes, the canary
//! analysis every few seconds ([`PoolStats::sample`]). So the request path never touches a
//! metrics registry and `upstream` depends on neither.
//!
//! Two histograms, both finer than the Prometheus one: 63 bounds from 1 ms to 30 s, at most
//! 25 % apart (1, 1.25, 1.5, 1.75, 2, 2.5, 3, 3.5, 4, 5, 6, 7, 8, 9 per decade), so a p99
//! compared with `latency_p99: 800ms` is measured to within a bucket of 100 ms rather than
//! between 500 ms and 1 s. One holds the whole exchange (exported as
//! `switchyard_http_request_duration_seconds`; every Prometheus bound, [`LATENCY_BOUNDS`], is one
//! of the fine bounds, so it is exact); the other the time until the upstream's response head
//! arrived — what the canary analysis judges, since a slow client upload or download, a long
//! stream or a WebSocket's lifetime says nothing about the app.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the exported (Prometheus) latency buckets, in seconds: 1 ms .. 30 s.
pub(crate) const LATENCY_BOUNDS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The bounds within one decade, times 100: 1.00, 1.25, ... 9.00.
const DECADE: [u64; 14] = [
    100, 125, 150, 175, 200, 250, 300, 350, 400, 500, 600, 700, 800, 900,
];

/// Number of fine bounds: four decades (1 ms .. 9 s) and 10 s .. 30 s.
pub(crate) const FINE: usize = 4 * DECADE.len() + 7;

/// The fine bounds in microseconds, ascending.
const fn fine_bounds() -> [u64; FINE] {
    let mut out = [0u64; FINE];
    let mut unit = 10; // the first decade: 100 * 10 µs = 1 ms
    let mut d = 0;
    let mut i = 0;
    while d < 4 {
        let mut j = 0;
        while j < DECADE.len() {
            out[i] = DECADE[j] * unit;
            i += 1;
            j += 1;
        }
        unit *= 10;
        d += 1;
    }
    // 10 s .. 30 s
    let tail = [100, 125, 150, 175, 200, 250, 300];
    let mut j = 0;
    while j < tail.len() {
        out[i] = tail[j] * unit;
        i += 1;
        j += 1;
    }
    out
}

/// Upper bounds of the fine buckets, microseconds.
pub(crate) const FINE_BOUNDS_US: [u64; FINE] = fine_bounds();

/// Lowest status code counted (responses are clamped to 100..=599).
const FIRST_STATUS: u16 = 100;
const STATUSES: usize = 500;

/// Request counters of one pool (or of the requests no pool took).
#[derive(Debug)]
pub(crate) struct PoolStats {
    /// Requests by status code, index `status - 100`.
    by_status: Box<[AtomicU64]>,
    /// Requests per fine latency bucket; the last one is above the highest bound.
    latency: Box<[AtomicU64]>,
    /// Requests sent to this pool per fine bucket of the time from the request's start (its
    /// head read; a slow upload counts) to the app's final response head; a request the app
    /// never answered counts with its whole duration.
    ttfb: Box<[AtomicU64]>,
    /// Sum of the latencies, nanoseconds.
    latency_sum_ns: AtomicU64,
}

impl Default for PoolStats {
    fn default() -> Self {
        PoolStats {
            by_status: (0..STATUSES).map(|_| AtomicU64::new(0)).collect(),
            latency: (0..=FINE).map(|_| AtomicU64::new(0)).collect(),
            ttfb: (0..=FINE).map(|_| AtomicU64::new(0)).collect(),
            latency_sum_ns: AtomicU64::new(0),
        }
    }
}

/// The exported latency histogram as read at one moment.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct LatencySnapshot {
    /// Cumulative counts per bound of [`LATENCY_BOUNDS`].
    pub(crate) cumulative: Vec<u64>,
    /// All requests (the +Inf bucket).
    pub(crate) count: u64,
    /// Sum of the latencies in seconds.
    pub(crate) sum_secs: f64,
}

/// Cumulative counts at one moment, for the canary analysis: subtract an older sample from a
/// newer one to get what happened in between.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Sample {
    /// Finished requests.
    pub(crate) requests: u64,
    /// Of those, answered 5xx (by the app or by the proxy; a client abort is 499, not 5xx).
    pub(crate) errors: u64,
    /// Upstream responses per fine bucket of the time to their head (the last: above 30 s).
    pub(crate) latency: Box<[u64]>,
}

impl Sample {
    /// What happened between `older` and `self`. Saturating: counters only grow, but a pool
    /// recreated by a reload starts again at 0 (the caller drops older samples then).
    pub(crate) fn since(&self, older: &Sample) -> Sample {
        Sample {
            requests: self.requests.saturating_sub(older.requests),
            errors: self.errors.saturating_sub(older.errors),
            latency: self
                .latency
                .iter()
                .zip(older.latency.iter())
                .map(|(a, b)| a.saturating_sub(*b))
                .collect(),
        }
    }

    /// The `q` quantile (0..1) of the latencies, interpolated linearly within its bucket (as
    /// Prometheus' `histogram_quantile` does). `None` without requests.
    pub(crate) fn quantile(&self, q: f64) -> Option<Duration> {
        let total: u64 = self.latency.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = (q.clamp(0.0, 1.0) * total as f64).max(1.0);
        let mut below = 0u64;
        for (i, n) in self.latency.iter().enumerate() {
            if *n == 0 {
                continue;
            }
            if (below + n) as f64 >= rank {
                let lo = if i == 0 { 0 } else { FINE_BOUNDS_US[i - 1] };
                let Some(&hi) = FINE_BOUNDS_US.get(i) else {
                    // Above the highest bound: all that can be said is "more than 30 s".
                    return Some(Duration::from_micros(lo));
                };
                let frac = (rank - below as f64) / *n as f64;
                return Some(Duration::from_micros(lo + ((hi - lo) as f64 * frac) as u64));
            }
            below += n;
        }
        None
    }
}

impl PoolStats {
    /// Count one finished request: its status, how long it took, and — if an upstream
    /// answered — how long until the upstream's response head.
    pub(crate) fn observe(&self, status: u16, elapsed: Duration, ttfb: Option<Duration>) {
        let status = status.clamp(FIRST_STATUS, FIRST_STATUS + STATUSES as u16 - 1);
        self.by_status[usize::from(status - FIRST_STATUS)].fetch_add(1, Ordering::Relaxed);
        self.latency[fine_bucket(elapsed)].fetch_add(1, Ordering::Relaxed);
        if let Some(t) = ttfb {
            self.ttfb[fine_bucket(t)].fetch_add(1, Ordering::Relaxed);
        }
        let ns = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.latency_sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Status codes seen so far with their counts.
    pub(crate) fn statuses(&self) -> Vec<(u16, u64)> {
        self.by_status
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                let n = c.load(Ordering::Relaxed);
                (n > 0).then(|| (FIRST_STATUS + i as u16, n))
            })
            .collect()
    }

    /// The exported latency histogram.
    pub(crate) fn latency(&self) -> LatencySnapshot {
        let mut cumulative = Vec::with_capacity(LATENCY_BOUNDS.len());
        let mut total = 0;
        let mut next = 0;
        for (i, c) in self.latency.iter().enumerate() {
            total += c.load(Ordering::Relaxed);
            // Close every exported bound this fine bound reaches.
            while let (Some(b), Some(fine)) = (LATENCY_BOUNDS.get(next), FINE_BOUNDS_US.get(i)) {
                if (*b * 1e6).round() as u64 != *fine {
                    break;
                }
                cumulative.push(total);
                next += 1;
            }
        }
        LatencySnapshot {
            cumulative,
            count: total,
            sum_secs: self.latency_sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
        }
    }

    /// The cumulative counts now (latencies: the time to the upstream's response head).
    pub(crate) fn sample(&self) -> Sample {
        let errors = self.by_status[usize::from(500 - FIRST_STATUS)..]
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum();
        let latency: Box<[u64]> = self
            .ttfb
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        Sample {
            // From the duration histogram, bumped after the status counter: `errors` may run
            // one request ahead within a sample, never behind.
            requests: self.latency.iter().map(|c| c.load(Ordering::Relaxed)).sum(),
            errors,
            latency,
        }
    }
}

/// The fine bucket of a latency.
fn fine_bucket(d: Duration) -> usize {
    let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    FINE_BOUNDS_US.partition_point(|b| *b < us)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fine_bounds_ascend_and_contain_every_exported_bound() {
        assert!(FINE_BOUNDS_US.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(FINE_BOUNDS_US[0], 1_000);
        assert_eq!(FINE_BOUNDS_US[FINE - 1], 30_000_000);
        assert!(FINE_BOUNDS_US
            .windows(2)
            .all(|w| w[1] as f64 / w[0] as f64 <= 1.25 + 1e-9));
        for b in LATENCY_BOUNDS {
            let us = (b * 1e6).round() as u64;
            assert!(FINE_BOUNDS_US.contains(&us), "{b}");
        }
    }

    #[test]
    fn counts_statuses_and_buckets_latencies() {
        let s = PoolStats::default();
        s.observe(
            200,
            Duration::from_micros(500),
            Some(Duration::from_micros(500)),
        );
        s.observe(
            200,
            Duration::from_millis(3),
            Some(Duration::from_millis(3)),
        );
        s.observe(503, Duration::from_secs(60), Some(Duration::from_secs(60)));
        s.observe(42, Duration::ZERO, Some(Duration::ZERO)); // clamped to 100
        assert_eq!(s.statuses(), vec![(100, 1), (200, 2), (503, 1)]);
        let l = s.latency();
        assert_eq!(l.cumulative.len(), LATENCY_BOUNDS.len());
        assert_eq!(l.count, 4);
        assert_eq!(l.cumulative[0], 2, "<= 1 ms: 0.5 ms and 0");
        assert_eq!(l.cumulative[1], 2, "<= 2.5 ms");
        assert_eq!(l.cumulative[2], 3, "<= 5 ms");
        assert_eq!(*l.cumulative.last().unwrap(), 3, "60 s is above 30 s");
        assert!((l.sum_secs - 60.0035).abs() < 1e-9, "{}", l.sum_secs);
        // A latency exactly on a bound is in that bound's bucket (Prometheus: le).
        let s = PoolStats::default();
        s.observe(
            200,
            Duration::from_millis(5),
            Some(Duration::from_millis(5)),
        );
        assert_eq!(s.latency().cumulative[2], 1);
        assert_eq!(s.latency().cumulative[1], 0);
    }

    #[test]
    fn a_window_is_the_difference_of_two_samples_and_its_p99_is_within_a_bucket() {
        let s = PoolStats::default();
        for _ in 0..50 {
            s.observe(
                200,
                Duration::from_millis(2),
                Some(Duration::from_millis(2)),
            );
        }
        let before = s.sample();
        for i in 0..1000u64 {
            let status = if i % 10 == 0 { 500 } else { 200 };
            // 1% at 750 ms, the rest fast: p99 sits at the edge.
            let ms = if i % 100 == 0 { 750 } else { 10 };
            s.observe(
                status,
                Duration::from_millis(ms),
                Some(Duration::from_millis(ms)),
            );
        }
        // A client that went away before the upstream answered: counted, but no latency.
        s.observe(499, Duration::from_millis(1), None);
        let w = s.sample().since(&before);
        assert_eq!(w.requests, 1001);
        assert_eq!(w.errors, 100, "499 is not an error");
        let p99 = w.quantile(0.99).unwrap();
        assert!(p99 > Duration::from_millis(9), "{p99:?}");
        assert!(p99 <= Duration::from_millis(11), "{p99:?}");
        let p999 = w.quantile(0.999).unwrap();
        assert!(
            p999 > Duration::from_millis(700) && p999 <= Duration::from_millis(800),
            "{p999:?}"
        );
        assert_eq!(Sample::since(&before, &before).quantile(0.99), None);
    }
}
