//! Prometheus metrics with the names of SPEC §6, on a `Registry` passed in (no process
//! globals: two proxies in one process keep separate metrics).
//!
//! The request path touches no registry: each pool counts its finished requests in its own
//! atomics ([`crate::upstream::stats`]), and [`StateCollector`] turns those counters and the
//! routing snapshot (in-flight, weight, instance health) into metric families when Prometheus
//! scrapes. Labels are bounded: upstream and pool names come from the config, status is a
//! 3-digit code; never the path, Host or client address.

use crate::state::Shared;
use crate::upstream::stats::{PoolStats, LATENCY_BOUNDS};
use prometheus::core::{Collector, Desc};
use prometheus::proto::{self, LabelPair, MetricFamily, MetricType};
use prometheus::{IntCounter, IntCounterVec, Opts, Registry};
use std::collections::HashMap;
use std::sync::Arc;
use switchyard_control::HealthState;

/// The proxy's metrics (the counters written outside the request path, and the collector).
#[derive(Debug)]
pub(crate) struct Metrics {
    pub(crate) switches: IntCounterVec,
    pub(crate) rollbacks: IntCounterVec,
    pub(crate) reloads: IntCounterVec,
    pub(crate) preview_refused: IntCounterVec,
    pub(crate) access_log_dropped: IntCounter,
    pub(crate) events_dropped: IntCounter,
    /// Requests that reached no pool (denied, no route): `upstream="none",pool="none"`.
    pub(crate) unrouted: Arc<PoolStats>,
}

impl Metrics {
    /// Create the metrics and register them, plus the snapshot collector and the process
    /// metrics, on `registry`.
    pub(crate) fn register(
        registry: &Registry,
        shared: Arc<Shared>,
        probes: Probes,
    ) -> Result<Metrics, prometheus::Error> {
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
        let preview_refused = IntCounterVec::new(
            Opts::new(
                "switchyard_preview_refused_total",
                "Requests whose preview header was ignored: the client is not in preview.allow_from",
            ),
            &["upstream"],
        )?;
        let access_log_dropped = IntCounter::new(
            "switchyard_access_log_dropped_total",
            "Access log lines dropped because the writer fell behind (logging never blocks requests)",
        )?;
        let events_dropped = IntCounter::new(
            "switchyard_events_dropped_total",
            "Audit records not written to the events file because its writer fell behind",
        )?;
        let unrouted = Arc::new(PoolStats::default());
        registry.register(Box::new(events_dropped.clone()))?;
        registry.register(Box::new(switches.clone()))?;
        registry.register(Box::new(rollbacks.clone()))?;
        registry.register(Box::new(reloads.clone()))?;
        registry.register(Box::new(preview_refused.clone()))?;
        registry.register(Box::new(access_log_dropped.clone()))?;
        registry.register(Box::new(StateCollector::new(
            shared,
            unrouted.clone(),
            probes,
        )?))?;
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
        Ok(Metrics {
            switches,
            rollbacks,
            reloads,
            preview_refused,
            access_log_dropped,
            events_dropped,
            unrouted,
        })
    }

    /// Make every upstream's counters visible at 0 (a dashboard should not have to wait for
    /// the first switch to see the series).
    pub(crate) fn touch_upstream(&self, upstream: &str) {
        self.switches.with_label_values(&[upstream]);
        self.preview_refused.with_label_values(&[upstream]);
        for reason in ["manual", "auto_error_rate", "auto_latency"] {
            self.rollbacks.with_label_values(&[upstream, reason]);
        }
    }
}

/// One metric family this collector emits.
struct Family {
    name: &'static str,
    help: &'static str,
    kind: MetricType,
    labels: &'static [&'static str],
}

impl Family {
    const fn new(
        name: &'static str,
        help: &'static str,
        kind: MetricType,
        labels: &'static [&'static str],
    ) -> Family {
        Family {
            name,
            help,
            kind,
            labels,
        }
    }
}

const REQUESTS: Family = Family::new(
    "switchyard_http_requests_total",
    "HTTP requests by upstream, pool and status",
    MetricType::COUNTER,
    &["upstream", "pool", "status"],
);
const DURATION: Family = Family::new(
    "switchyard_http_request_duration_seconds",
    "Request duration from the request head to the end of the response",
    MetricType::HISTOGRAM,
    &["upstream", "pool"],
);
const INFLIGHT: Family = Family::new(
    "switchyard_upstream_inflight",
    "Requests and upgraded connections in flight per pool",
    MetricType::GAUGE,
    &["upstream", "pool"],
);
const WEIGHT: Family = Family::new(
    "switchyard_pool_weight",
    "Pool weight, 0..100",
    MetricType::GAUGE,
    &["upstream", "pool"],
);
const HEALTHY: Family = Family::new(
    "switchyard_instance_healthy",
    "1 when the instance is healthy and not ejected",
    MetricType::GAUGE,
    &["upstream", "pool", "instance"],
);
const LOG_DROPPED: Family = Family::new(
    "switchyard_log_dropped_total",
    "Application log lines dropped because stderr did not keep up (logging never blocks requests)",
    MetricType::COUNTER,
    &[],
);
const FAMILIES: [&Family; 7] = [
    &REQUESTS,
    &DURATION,
    &INFLIGHT,
    &WEIGHT,
    &HEALTHY,
    &LOG_DROPPED,
    &CONTROL_CONNECTIONS,
];

const CONTROL_CONNECTIONS: Family = Family::new(
    "switchyard_control_connections",
    "Control-socket connections being served",
    MetricType::GAUGE,
    &[],
);

/// Reads the count of dropped application log lines.
type LogDropped = Arc<dyn Fn() -> u64 + Send + Sync>;

/// Live values owned elsewhere, read at scrape time.
#[derive(Default)]
pub(crate) struct Probes {
    /// Application log lines dropped (the binary's log writer).
    pub(crate) log_dropped: Option<LogDropped>,
    /// Control connections being served (the control server).
    pub(crate) control_connections: Option<Arc<std::sync::atomic::AtomicUsize>>,
}

/// Reads the pools' counters and the routing snapshot at scrape time.
struct StateCollector {
    shared: Arc<Shared>,
    unrouted: Arc<PoolStats>,
    probes: Probes,
    descs: Vec<Desc>,
}

impl StateCollector {
    fn new(
        shared: Arc<Shared>,
        unrouted: Arc<PoolStats>,
        probes: Probes,
    ) -> Result<Self, prometheus::Error> {
        let descs = FAMILIES
            .iter()
            .map(|f| {
                Desc::new(
                    f.name.to_string(),
                    f.help.to_string(),
                    f.labels.iter().map(|l| l.to_string()).collect(),
                    HashMap::new(),
                )
            })
            .collect::<Result<_, _>>()?;
        Ok(StateCollector {
            shared,
            unrouted,
            probes,
            descs,
        })
    }
}

fn labels(names: &[&str], values: &[&str]) -> Vec<LabelPair> {
    names
        .iter()
        .zip(values)
        .map(|(n, v)| {
            let mut l = LabelPair::default();
            l.set_name(n.to_string());
            l.set_value(v.to_string());
            l
        })
        .collect()
}

fn gauge(f: &Family, values: &[&str], v: f64) -> proto::Metric {
    let mut g = proto::Gauge::default();
    g.set_value(v);
    let mut m = proto::Metric::from_gauge(g);
    m.set_label(labels(f.labels, values));
    m
}

/// The request counters and the latency histogram of one pool.
fn pool_metrics(
    stats: &PoolStats,
    upstream: &str,
    pool: &str,
    always_histogram: bool,
    requests: &mut Vec<proto::Metric>,
    duration: &mut Vec<proto::Metric>,
) {
    for (status, n) in stats.statuses() {
        let mut c = proto::Counter::default();
        c.set_value(n as f64);
        let mut m = proto::Metric::from_label(labels(
            REQUESTS.labels,
            &[upstream, pool, &status.to_string()],
        ));
        m.set_counter(c);
        requests.push(m);
    }
    let l = stats.latency();
    if l.count == 0 && !always_histogram {
        return;
    }
    let mut h = proto::Histogram::default();
    h.set_sample_count(l.count);
    h.set_sample_sum(l.sum_secs);
    h.set_bucket(
        LATENCY_BOUNDS
            .iter()
            .zip(&l.cumulative)
            .map(|(bound, n)| {
                let mut b = proto::Bucket::default();
                b.set_upper_bound(*bound);
                b.set_cumulative_count(*n);
                b
            })
            .collect(),
    );
    let mut m = proto::Metric::from_label(labels(DURATION.labels, &[upstream, pool]));
    m.set_histogram(h);
    duration.push(m);
}

fn family(f: &Family, metrics: Vec<proto::Metric>) -> MetricFamily {
    let mut mf = MetricFamily::default();
    mf.set_name(f.name.to_string());
    mf.set_help(f.help.to_string());
    mf.set_field_type(f.kind);
    mf.set_metric(metrics);
    mf
}

impl Collector for StateCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let (mut requests, mut duration) = (Vec::new(), Vec::new());
        let (mut inflight, mut weight, mut healthy) = (Vec::new(), Vec::new(), Vec::new());
        pool_metrics(
            &self.unrouted,
            "none",
            "none",
            true,
            &mut requests,
            &mut duration,
        );
        let now = crate::upstream::health::now_ms();
        for u in &self.shared.load().upstreams {
            for p in &u.pools {
                let names = [u.name(), p.pool.name.as_str()];
                pool_metrics(
                    &p.pool.stats,
                    names[0],
                    names[1],
                    false,
                    &mut requests,
                    &mut duration,
                );
                let n = p.pool.inflight.load(std::sync::atomic::Ordering::Relaxed);
                inflight.push(gauge(&INFLIGHT, &names, n as f64));
                weight.push(gauge(&WEIGHT, &names, f64::from(p.weight)));
                for i in &p.instances {
                    let ok = i.health.reported(now) == HealthState::Healthy;
                    healthy.push(gauge(
                        &HEALTHY,
                        &[names[0], names[1], i.label.as_str()],
                        if ok { 1.0 } else { 0.0 },
                    ));
                }
            }
        }
        let log_dropped = self
            .probes
            .log_dropped
            .as_ref()
            .map(|count| {
                let mut c = proto::Counter::default();
                c.set_value(count() as f64);
                let mut m = proto::Metric::default();
                m.set_counter(c);
                m
            })
            .into_iter()
            .collect();
        let control = self
            .probes
            .control_connections
            .as_ref()
            .map(|n| {
                gauge(
                    &CONTROL_CONNECTIONS,
                    &[],
                    n.load(std::sync::atomic::Ordering::Acquire) as f64,
                )
            })
            .into_iter()
            .collect();
        [
            (&REQUESTS, requests),
            (&DURATION, duration),
            (&INFLIGHT, inflight),
            (&WEIGHT, weight),
            (&HEALTHY, healthy),
            (&LOG_DROPPED, log_dropped),
            (&CONTROL_CONNECTIONS, control),
        ]
        .into_iter()
        .filter(|(_, m)| !m.is_empty())
        .map(|(f, m)| family(f, m))
        .collect()
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
