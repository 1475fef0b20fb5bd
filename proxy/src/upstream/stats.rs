//! A pool's request counters: requests by status code and the latency histogram.
//!
//! The pool keeps them itself (a few relaxed atomic adds per request, no lock, no map lookup)
//! and telemetry reads them when Prometheus scrapes, so the request path never touches a
//! metrics registry and `upstream` does not depend on `telemetry`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the latency buckets, in seconds: 1 ms .. 30 s.
pub(crate) const LATENCY_BOUNDS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The same bounds in nanoseconds (compared on the request path without floating point).
const BOUNDS_NS: [u64; 14] = [
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
    30_000_000_000,
];

/// Lowest status code counted (responses are clamped to 100..=599).
const FIRST_STATUS: u16 = 100;
const STATUSES: usize = 500;

/// Request counters of one pool (or of the requests no pool took).
#[derive(Debug)]
pub(crate) struct PoolStats {
    /// Requests by status code, index `status - 100`.
    by_status: Box<[AtomicU64]>,
    /// Requests per latency bucket; the last one is above the highest bound.
    latency: [AtomicU64; BOUNDS_NS.len() + 1],
    /// Sum of the latencies, nanoseconds.
    latency_sum_ns: AtomicU64,
}

impl Default for PoolStats {
    fn default() -> Self {
        PoolStats {
            by_status: (0..STATUSES).map(|_| AtomicU64::new(0)).collect(),
            latency: std::array::from_fn(|_| AtomicU64::new(0)),
            latency_sum_ns: AtomicU64::new(0),
        }
    }
}

/// The latency histogram as read at one moment.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct LatencySnapshot {
    /// Cumulative counts per bound of [`LATENCY_BOUNDS`].
    pub(crate) cumulative: Vec<u64>,
    /// All requests (the +Inf bucket).
    pub(crate) count: u64,
    /// Sum of the latencies in seconds.
    pub(crate) sum_secs: f64,
}

impl PoolStats {
    /// Count one finished request.
    pub(crate) fn observe(&self, status: u16, elapsed: Duration) {
        let status = status.clamp(FIRST_STATUS, FIRST_STATUS + STATUSES as u16 - 1);
        self.by_status[usize::from(status - FIRST_STATUS)].fetch_add(1, Ordering::Relaxed);
        let ns = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        let bucket = BOUNDS_NS
            .iter()
            .position(|b| ns <= *b)
            .unwrap_or(BOUNDS_NS.len());
        self.latency[bucket].fetch_add(1, Ordering::Relaxed);
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

    /// The latency histogram.
    pub(crate) fn latency(&self) -> LatencySnapshot {
        let mut cumulative = Vec::with_capacity(BOUNDS_NS.len());
        let mut total = 0;
        for (i, c) in self.latency.iter().enumerate() {
            total += c.load(Ordering::Relaxed);
            if i < BOUNDS_NS.len() {
                cumulative.push(total);
            }
        }
        LatencySnapshot {
            cumulative,
            count: total,
            sum_secs: self.latency_sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_statuses_and_buckets_latencies() {
        let s = PoolStats::default();
        s.observe(200, Duration::from_micros(500));
        s.observe(200, Duration::from_millis(3));
        s.observe(503, Duration::from_secs(60));
        s.observe(42, Duration::ZERO); // clamped to 100
        assert_eq!(s.statuses(), vec![(100, 1), (200, 2), (503, 1)]);
        let l = s.latency();
        assert_eq!(l.count, 4);
        assert_eq!(l.cumulative[0], 2, "<= 1 ms: 0.5 ms and 0");
        assert_eq!(l.cumulative[2], 3, "<= 5 ms");
        assert_eq!(*l.cumulative.last().unwrap(), 3, "60 s is above 30 s");
        assert!((l.sum_secs - 60.0035).abs() < 1e-9, "{}", l.sum_secs);
    }
}
