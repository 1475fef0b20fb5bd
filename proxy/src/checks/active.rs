//! Active health checks, the Spring Boot way (SPEC §3 `health`, §4 invariant 4).
//!
//! Every instance of every pool is checked — idle pools too, so green's health is known before
//! anyone switches to it. Each instance has its own task on the control runtime, started at a
//! random offset within the interval and re-jittered by ±5% each round, so 100 instances do not
//! fire together. A check is `GET health.path` with keep-alive (reqwest), healthy when the status
//! is in `expect_status` and, unless `expect_json_status` is empty, the JSON body's `status` is
//! one of those values (`{"status":"UP","components":{...}}`). At most 4 KiB of body is read.
//! Checks never touch the request path: it only reads the atomics they set.

use crate::state::Shared;
use crate::telemetry::events::{self, EventLog};
use crate::upstream::Instance;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use switchyard_config::HealthConfig;
use switchyard_control::HealthState;

/// Body bytes read for the JSON check.
const BODY_LIMIT: usize = 4096;

/// Build the checker's HTTP client: keep-alive, no proxy from the environment (a
/// `HTTP_PROXY` meant for the app must not reroute health checks), no TLS.
pub(crate) fn client() -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(1)
        .pool_idle_timeout(Duration::from_secs(30))
        .user_agent(concat!("switchyard-health/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// Start and stop per-instance checkers as the snapshot changes. Runs until cancelled.
pub(crate) async fn run(shared: Arc<Shared>, events: Arc<EventLog>, client: reqwest::Client) {
    let mut tasks: HashMap<u64, tokio::task::JoinHandle<()>> = HashMap::new();
    loop {
        let changed = shared.changed();
        let snap = shared.load();
        let mut live = std::collections::HashSet::new();
        for u in &snap.upstreams {
            for p in &u.pools {
                for inst in &p.instances {
                    live.insert(inst.id);
                    tasks.entry(inst.id).or_insert_with(|| {
                        tokio::spawn(check_loop(
                            shared.clone(),
                            events.clone(),
                            client.clone(),
                            u.name().to_string(),
                            p.pool.name.clone(),
                            inst.clone(),
                        ))
                    });
                }
            }
        }
        tasks.retain(|id, t| {
            let keep = live.contains(id);
            if !keep {
                t.abort();
            }
            keep
        });
        tokio::select! {
            _ = changed => {}
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
}

/// The current health settings of `upstream` (reloads may change them).
fn settings(shared: &Shared, upstream: &str) -> Option<HealthConfig> {
    shared
        .load()
        .upstream(upstream)
        .map(|u| u.config.health.clone())
}

async fn check_loop(
    shared: Arc<Shared>,
    events: Arc<EventLog>,
    client: reqwest::Client,
    upstream: String,
    pool: String,
    inst: Arc<Instance>,
) {
    let Some(first) = settings(&shared, &upstream) else {
        return;
    };
    // Spread the first checks over one interval.
    let offset = first.interval.mul_f64(fastrand::f64());
    tokio::time::sleep(offset).await;
    loop {
        let Some(cfg) = settings(&shared, &upstream) else {
            return;
        };
        let (ok, outcome) = check_once(&client, &inst, &cfg).await;
        if let Some(t) = inst.health.record_check(
            ok,
            outcome.clone(),
            cfg.healthy_threshold,
            cfg.unhealthy_threshold,
        ) {
            let msg = format!(
                "{upstream}/{pool} {}: {} -> {} ({outcome})",
                inst.label, t.from, t.to
            );
            if t.to == HealthState::Healthy {
                tracing::info!(upstream = %upstream, pool = %pool, instance = %inst.label, from = %t.from, to = %t.to, check = %outcome, "instance health changed");
            } else {
                tracing::warn!(upstream = %upstream, pool = %pool, instance = %inst.label, from = %t.from, to = %t.to, check = %outcome, "instance health changed");
            }
            let mut r = events::record("health", "proxy", msg);
            r.upstream = Some(upstream.clone());
            r.pool = Some(pool.clone());
            r.instance = Some(inst.label.clone());
            events.record(r);
            shared.notify_health();
        }
        let jitter = 0.95 + 0.1 * fastrand::f64();
        tokio::time::sleep(cfg.interval.mul_f64(jitter)).await;
    }
}

fn fmt_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else if d < Duration::from_secs(1) {
        format!("{}ms", d.as_millis())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

/// One check: (passed, outcome in words).
pub(crate) async fn check_once(
    client: &reqwest::Client,
    inst: &Instance,
    cfg: &HealthConfig,
) -> (bool, String) {
    let Some(addr) = inst.current_addr() else {
        let why = inst
            .resolved
            .load()
            .error
            .clone()
            .unwrap_or_else(|| "no address".into());
        return (false, format!("unresolved ({why})"));
    };
    let url = format!("http://{addr}{}", cfg.path);
    let req = client
        .get(&url)
        .header(http::header::HOST, inst.label.as_str())
        .header(http::header::ACCEPT, "application/json")
        .timeout(cfg.timeout);
    let mut resp = match req.send().await {
        Ok(r) => r,
        Err(e) => return (false, describe_error(&e, cfg.timeout)),
    };
    let status = resp.status().as_u16();
    let mut body = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(c)) => {
                body.extend_from_slice(&c);
                if body.len() >= BODY_LIMIT {
                    body.truncate(BODY_LIMIT);
                    break;
                }
            }
            Ok(None) => break,
            Err(e) => return (false, describe_error(&e, cfg.timeout)),
        }
    }
    let snippet: String = String::from_utf8_lossy(&body)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        .take(120)
        .collect();
    let outcome = format!("GET {} -> {status} {snippet}", cfg.path)
        .trim_end()
        .to_string();
    if !cfg.expect_status.contains(&status) {
        return (false, outcome);
    }
    if cfg.expect_json_status.is_empty() {
        return (true, outcome);
    }
    let json_status = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("status").and_then(|s| s.as_str()).map(str::to_string));
    match json_status {
        Some(s) if cfg.expect_json_status.contains(&s) => (true, outcome),
        Some(_) => (false, outcome),
        None => (false, format!("{outcome} (no JSON \"status\")")),
    }
}

fn describe_error(e: &reqwest::Error, timeout: Duration) -> String {
    if e.is_timeout() {
        return format!("timeout after {}", fmt_duration(timeout));
    }
    let mut source: Option<&dyn std::error::Error> = Some(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return match io.kind() {
                std::io::ErrorKind::ConnectionRefused => "connect refused".into(),
                std::io::ErrorKind::ConnectionReset => "connection reset".into(),
                _ => format!("connect error: {io}"),
            };
        }
        source = s.source();
    }
    if e.is_connect() {
        "connect error".into()
    } else {
        format!("error: {e}")
    }
}
