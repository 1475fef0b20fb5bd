//! Prometheus metrics with the names of SPEC §6, on a `Registry` passed in (no process
//! globals: two proxies in one process keep separate metrics).
//!
//! The request path takes no lock: each pool caches its metric children (one counter per
//! status code, created on first use, then an atomic increment), and the gauges — in-flight,
//! weight, instance health — are not maintained at all but read from the routing snapshot
//! when Prometheus scrapes. Labels are bounded: upstream and pool names come from the config,
//! status is a 3-digit code; never the path, Host or client address.

use crate::snapshot::Shared;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry,
};
use std::sync::{Arc, Mutex, OnceLock};
use switchyard_control::HealthState;

/// Buckets for HTTP latencies: 1 ms .. 30 s.
const BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The proxy's metrics.
#[derive(Debug)]
pub(crate) struct Metrics {
    requests: IntCounterVec,
    duration: HistogramVec,
    pub(crate) switches: IntCounterVec,
    pub(crate) rollbacks: IntCounterVec,
    pub(crate) reloads: IntCounterVec,
    pub(crate) access_log_dropped: IntCounter,
    pub(crate) events_dropped: IntCounter,
    /// For requests that reached no pool (denied, no route).
    unrouted: PoolMetrics,
}

/// One pool's request-path handles.
#[derive(Debug)]
pub(crate) struct PoolMetrics {
    upstream: String,
    pool: String,
    requests: IntCounterVec,
    /// Children of `requests` by status code 100..=599, created on first use.
    by_status: Box<[OnceLock<IntCounter>]>,
    duration: Histogram,
}

impl PoolMetrics {
    fn new(requests: &IntCounterVec, duration: &HistogramVec, upstream: &str, pool: &str) -> Self {
        PoolMetrics {
            upstream: upstream.to_string(),
            pool: pool.to_string(),
            requests: requests.clone(),
            by_status: (100..=599).map(|_| OnceLock::new()).collect(),
            duration: duration.with_label_values(&[upstream, pool]),
        }
    }

    /// Count one finished request.
    pub(crate) fn observe(&self, status: u16, seconds: f64) {
        let status = status.clamp(100, 599);
        let counter = self.by_status[usize::from(status - 100)].get_or_init(|| {
            self.requests
                .with_label_values(&[&self.upstream, &self.pool, &status.to_string()])
        });
        counter.inc();
        self.duration.observe(seconds);
    }
}

impl Metrics {
    /// Create the metrics and register them, plus the snapshot gauges and the process
    /// metrics, on `registry`.
    pub(crate) fn register(
        registry: &Registry,
        shared: Arc<Shared>,
    ) -> Result<Metrics, prometheus::Error> {
        let requests = IntCounterVec::new(
            Opts::new(
                "switchyard_http_requests_total",
                "HTTP requests by upstream, pool and status",
            ),
            &["upstream", "pool", "status"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "switchyard_http_request_duration_seconds",
                "Request duration from the request head to the end of the response",
            )
            .buckets(BUCKETS.to_vec()),
            &["upstream", "pool"],
        )?;
        let switches = IntCounterVec::new(
            Opts::new(
                "switchyard_switches_total",
                "Weight changes (switch, weight, weights, rollback)",
            ),
            &["upstream"],
        )?;
        let rollbacks = IntCounterVec::new(
            Opts::new(
                "switchyard_rollbacks_total",
                "Rollbacks by reason (manual, auto_error_rate, auto_latency)",
            ),
            &["upstream", "reason"],
        )?;
        let reloads = IntCounterVec::new(
            Opts::new(
                "switchyard_config_reloads_total",
                "Config reloads by result (ok, error)",
            ),
            &["result"],
        )?;
        let access_log_dropped = IntCounter::new(
            "switchyard_access_log_dropped_total",
            "Access log lines dropped because the writer fell behind (logging never blocks requests)",
        )?;
        let events_dropped = IntCounter::new(
            "switchyard_events_dropped_total",
            "Audit records not written to the events file because its writer fell behind",
        )?;
        registry.register(Box::new(events_dropped.clone()))?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(switches.clone()))?;
        registry.register(Box::new(rollbacks.clone()))?;
        registry.register(Box::new(reloads.clone()))?;
        registry.register(Box::new(access_log_dropped.clone()))?;
        registry.register(Box::new(StateCollector::new(shared)?))?;
        #[cfg(target_os = "linux")]
        {
            // Already registered when two proxies share a registry: not an error worth failing for.
            let _ = registry.register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ));
        }
        for r in ["ok", "error"] {
            reloads.with_label_values(&[r]);
        }
        let unrouted = PoolMetrics::new(&requests, &duration, "none", "none");
        Ok(Metrics {
            requests,
            duration,
            switches,
            rollbacks,
            reloads,
            access_log_dropped,
            events_dropped,
            unrouted,
        })
    }

    /// Handles for one pool (cache them in the pool).
    pub(crate) fn pool(&self, upstream: &str, pool: &str) -> PoolMetrics {
        PoolMetrics::new(&self.requests, &self.duration, upstream, pool)
    }

    /// Handles for requests that reached no pool.
    pub(crate) fn unrouted(&self) -> &PoolMetrics {
        &self.unrouted
    }

    /// Make every upstream's counters visible at 0 (a dashboard should not have to wait for
    /// the first switch to see the series).
    pub(crate) fn touch_upstream(&self, upstream: &str) {
        self.switches.with_label_values(&[upstream]);
        for reason in ["manual", "auto_error_rate", "auto_latency"] {
            self.rollbacks.with_label_values(&[upstream, reason]);
        }
    }
}

/// Gauges read from the routing snapshot at scrape time.
struct StateCollector {
    shared: Arc<Shared>,
    gauges: Mutex<(GaugeVec, GaugeVec, GaugeVec)>,
    descs: Vec<Desc>,
}

impl StateCollector {
    fn new(shared: Arc<Shared>) -> Result<Self, prometheus::Error> {
        let inflight = GaugeVec::new(
            Opts::new(
                "switchyard_upstream_inflight",
                "Requests and upgraded connections in flight per pool",
            ),
            &["upstream", "pool"],
        )?;
        let weight = GaugeVec::new(
            Opts::new("switchyard_pool_weight", "Pool weight, 0..100"),
            &["upstream", "pool"],
        )?;
        let healthy = GaugeVec::new(
            Opts::new(
                "switchyard_instance_healthy",
                "1 when the instance is healthy and not ejected",
            ),
            &["upstream", "pool", "instance"],
        )?;
        let descs = [&inflight, &weight, &healthy]
            .iter()
            .flat_map(|g| g.desc().into_iter().cloned())
            .collect();
        Ok(StateCollector {
            shared,
            gauges: Mutex::new((inflight, weight, healthy)),
            descs,
        })
    }
}

impl Collector for StateCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let g = self.gauges.lock().unwrap_or_else(|p| p.into_inner());
        let (inflight, weight, healthy) = &*g;
        inflight.reset();
        weight.reset();
        healthy.reset();
        let now = crate::upstream::health::now_ms();
        for u in &self.shared.load().upstreams {
            for p in &u.pools {
                let labels = [u.name(), p.pool.name.as_str()];
                inflight
                    .with_label_values(&labels)
                    .set(p.pool.inflight.load(std::sync::atomic::Ordering::Relaxed) as f64);
                weight.with_label_values(&labels).set(f64::from(p.weight));
                for i in &p.instances {
                    let ok = i.health.reported(now) == HealthState::Healthy;
                    healthy
                        .with_label_values(&[u.name(), p.pool.name.as_str(), i.label.as_str()])
                        .set(if ok { 1.0 } else { 0.0 });
                }
            }
        }
        let mut out = inflight.collect();
        out.extend(weight.collect());
        out.extend(healthy.collect());
        out
    }
}

/// The registry's contents in the Prometheus text format (0.0.4).
pub(crate) fn render(registry: &Registry) -> String {
    use prometheus::Encoder;
    let mut buf = Vec::new();
    if let Err(e) = prometheus::TextEncoder::new().encode(&registry.gather(), &mut buf) {
        tracing::warn!(error = %e, "cannot encode metrics");
    }
    String::from_utf8(buf).unwrap_or_default()
}
