//! The control protocol: newline-delimited JSON over a Unix socket (SPEC §5).
//!
//! A client writes one request per line; the server answers with zero or more
//! `{"event":...}` progress lines and exactly one final line, `{"ok":true,...}` or
//! `{"ok":false,"error":{"code":...,"message":...}}`. The types here are shared by the server
//! (inside the proxy), the client library and `proxyctl`.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Version of this protocol, reported by `status`. Bumped on incompatible changes.
pub const PROTOCOL_VERSION: u32 = 1;

/// Pool name -> weight (0..=100, summing to 100).
pub type Weights = BTreeMap<String, u32>;

/// The state of the whole proxy, as `proxyctl status` and `GET /status` show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// [`PROTOCOL_VERSION`] of the server.
    pub protocol: u32,
    /// switchyard version.
    pub version: String,
    /// Seconds since the proxy started.
    pub uptime_secs: u64,
    /// The serving process (after a binary upgrade, the new one's).
    #[serde(default)]
    pub pid: u32,
    /// Every upstream.
    pub upstreams: Vec<UpstreamStatus>,
}

/// One upstream's state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpstreamStatus {
    /// Name.
    pub name: String,
    /// Bumped by every change.
    pub generation: u64,
    /// The pool with the largest weight.
    pub main: String,
    /// Current weights.
    pub weights: Weights,
    /// Weights a `rollback` would restore, if any.
    pub previous: Option<Weights>,
    /// Pools in name order.
    pub pools: Vec<PoolStatus>,
    /// What keeps a client on its pool: `cookie`, `header:<Name>` or `none`.
    #[serde(default)]
    pub sticky: String,
    /// The progressive rollout, running or ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutStatus>,
    /// The last automatic rollback, with the numbers that triggered it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_rollback: Option<RollbackInfo>,
}

/// A progressive rollout (`proxyctl canary POOL`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutStatus {
    /// The canary pool.
    pub pool: String,
    /// Its weights.
    pub steps: Vec<u32>,
    /// Index into `steps` of the weight in effect.
    pub step: usize,
    /// The weight of the step.
    pub weight: u32,
    /// Time at each step, milliseconds.
    pub interval_ms: u64,
    /// `running`, `paused`, `promoted`, `rolled_back` or `aborted`.
    pub state: String,
    /// Time left at this step (running or paused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_left_ms: Option<u64>,
    /// Why the next step is not taken now, e.g. `waiting for traffic: 7 of 20 requests`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<String>,
    /// When it began (RFC 3339).
    pub started: String,
    /// When it ended (RFC 3339), if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended: Option<String>,
    /// The command that stopped it (aborted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_by: Option<String>,
    /// Identifies the rollout (the generation it began at).
    pub id: u64,
}

/// An automatic rollback and the numbers that triggered it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RollbackInfo {
    /// The canary pool rolled back.
    pub pool: String,
    /// Its weight before.
    pub weight: u32,
    /// `auto_error_rate` or `auto_latency`.
    pub reason: String,
    /// In words, e.g. `5xx 10.2% (51 of 500 requests in 60s) above 5.0% for 2m`.
    pub detail: String,
    /// When (RFC 3339).
    pub at: String,
    /// Canary requests in the window.
    pub requests: u64,
    /// Of those, 5xx.
    pub errors: u64,
    /// The canary's 5xx share.
    pub error_ratio: f64,
    /// The main pool's 5xx share over the same window.
    pub main_error_ratio: f64,
    /// The canary's p99, milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p99_ms: Option<f64>,
    /// The time the numbers cover, milliseconds.
    pub window_ms: u64,
    /// How long the canary had been bad, milliseconds.
    pub bad_for_ms: u64,
}

/// A pool's live numbers over the analysis window (`canary.auto_rollback.window`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LiveStats {
    /// The time the numbers cover, milliseconds.
    pub window_ms: u64,
    /// Finished requests.
    pub requests: u64,
    /// Requests per second.
    pub rate: f64,
    /// 5xx answers.
    pub errors: u64,
    /// 5xx share.
    pub error_ratio: f64,
    /// 99th percentile latency, milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p99_ms: Option<f64>,
    /// For a canary: the analysis' verdict in words (`healthy`, `too few requests: 7 of 20`,
    /// `bad: ...`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict: Option<String>,
    /// For a canary judged bad: for how long, milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bad_for_ms: Option<u64>,
}

/// Whether a pool takes new requests, is finishing old ones, or is empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PoolPhase {
    /// Weight > 0: receives new requests.
    Active,
    /// Weight 0 with requests still in flight.
    Draining,
    /// Weight 0 and nothing in flight.
    Drained,
}

/// One pool's state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolStatus {
    /// Name.
    pub name: String,
    /// Weight 0..=100.
    pub weight: u32,
    /// Phase derived from weight and in-flight count.
    pub phase: PoolPhase,
    /// Requests (and upgraded connections) in flight.
    pub inflight: i64,
    /// Instances in config order.
    pub instances: Vec<InstanceStatus>,
    /// `stable` (the pool that last had all the traffic), `canary` (any other pool with
    /// weight), or absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// Live numbers (sampled by the canary analysis), once there are some.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live: Option<LiveStats>,
}

/// One instance's state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceStatus {
    /// As configured (`host:port`).
    pub addr: String,
    /// The address connected to, when resolved.
    pub resolved: Option<String>,
    /// Last DNS error, if the last lookup failed.
    pub resolve_error: Option<String>,
    /// Requests in flight on this instance.
    pub inflight: i64,
    /// Active health: `unknown` (not checked enough yet), `healthy`, `unhealthy`; `ejected`
    /// when passive ejection has taken it out of rotation.
    pub health: HealthState,
    /// The last check's outcome in words, e.g. `GET /actuator/health -> 503 {"status":"DOWN"}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_check: Option<String>,
    /// Seconds since `health` last changed.
    pub health_since_secs: u64,
    /// Seconds of ejection left, when ejected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ejected_for_secs: Option<u64>,
    /// Failures in a row seen on live traffic (resets on success).
    #[serde(default)]
    pub passive_failures: u32,
}

/// An instance's health as reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthState {
    /// Not yet checked `healthy_threshold` times.
    Unknown,
    /// Passing its checks.
    Healthy,
    /// Failing its checks.
    Unhealthy,
    /// Taken out of rotation by passive ejection (its active state may be healthy).
    Ejected,
}

impl std::fmt::Display for HealthState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HealthState::Unknown => "unknown",
            HealthState::Healthy => "healthy",
            HealthState::Unhealthy => "unhealthy",
            HealthState::Ejected => "ejected",
        })
    }
}

/// How many instances of a pool must be healthy for a switch: all (default), a count, or a
/// percentage. Written `all`, `2` or `50%`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(try_from = "String", into = "String")]
pub enum MinHealthy {
    /// Every instance.
    #[default]
    All,
    /// At least this many.
    Count(u32),
    /// At least this percentage (rounded up).
    Percent(u32),
}

impl MinHealthy {
    /// Instances needed out of `n`.
    pub fn needed(self, n: usize) -> usize {
        match self {
            MinHealthy::All => n,
            MinHealthy::Count(c) => (c as usize).min(n),
            MinHealthy::Percent(p) => (n * p as usize).div_ceil(100),
        }
    }
}

impl std::str::FromStr for MinHealthy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not all, a count (2) or a percentage (50%)");
        if s == "all" {
            return Ok(MinHealthy::All);
        }
        if let Some(p) = s.strip_suffix('%') {
            let p: u32 = p.parse().map_err(|_| bad())?;
            if p > 100 {
                return Err(bad());
            }
            return Ok(MinHealthy::Percent(p));
        }
        s.parse().map(MinHealthy::Count).map_err(|_| bad())
    }
}

impl TryFrom<String> for MinHealthy {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<MinHealthy> for String {
    fn from(m: MinHealthy) -> String {
        match m {
            MinHealthy::All => "all".into(),
            MinHealthy::Count(c) => c.to_string(),
            MinHealthy::Percent(p) => format!("{p}%"),
        }
    }
}

/// The fleet as one proxy sees it (`proxyctl status --fleet`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetStatus {
    /// The proxy answering.
    pub name: String,
    /// The fleet's key space.
    pub prefix: String,
    /// Whether this proxy's link to etcd is up.
    pub connected: bool,
    /// Since when the link is down (RFC 3339), when it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub down_since: Option<String>,
    /// The proxy that runs fleet-wide rollouts and automatic rollbacks, if one is elected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,
    /// The desired state per upstream: generation and weights.
    pub desired: Vec<FleetDesired>,
    /// Every proxy known to the fleet, live or not, by name.
    pub proxies: Vec<FleetProxy>,
}

/// One upstream's desired state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetDesired {
    /// Upstream.
    pub upstream: String,
    /// Generation.
    pub generation: u64,
    /// Weights.
    pub weights: Weights,
}

/// One proxy of a fleet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetProxy {
    /// Its name.
    pub name: String,
    /// Whether its lease is alive (it published within `lease_ttl`).
    pub live: bool,
    /// What it serves, per upstream (empty when not live).
    pub upstreams: Vec<FleetApplied>,
}

/// What one proxy serves for one upstream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetApplied {
    /// Upstream.
    pub upstream: String,
    /// The generation it serves.
    pub generation: u64,
    /// Whether that is the desired generation.
    pub in_sync: bool,
    /// Its weights.
    pub weights: Weights,
    /// Instances it sees down, as `pool/host:port`.
    #[serde(default)]
    pub unhealthy: Vec<String>,
    /// Why it cannot apply the desired state, if it cannot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Milliseconds since it published.
    pub age_ms: u64,
}

/// One proxy's answer to a fleet change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetAck {
    /// The proxy.
    pub name: String,
    /// The generation it reported last.
    pub generation: u64,
    /// Whether it applied the change (or a later one).
    pub applied: bool,
    /// Milliseconds from the change being written to this proxy's report of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after_ms: Option<u64>,
}

impl Status {
    /// The upstream named `name`.
    pub fn upstream(&self, name: &str) -> Option<&UpstreamStatus> {
        self.upstreams.iter().find(|u| u.name == name)
    }
}

impl UpstreamStatus {
    /// The pool named `name`.
    pub fn pool(&self, name: &str) -> Option<&PoolStatus> {
        self.pools.iter().find(|p| p.name == name)
    }
}

/// One request line. `upstream` may be left out when the proxy has exactly one upstream.
/// Durations travel as milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
#[non_exhaustive]
pub enum Request {
    /// Pools, instances, weights, in-flight counts, generation.
    Status,
    /// Give `pool` 100% (every other pool 0).
    Switch {
        /// Upstream name.
        #[serde(default)]
        upstream: Option<String>,
        /// Target pool.
        pool: String,
        /// Then wait for the pools that lost their weight to drain.
        #[serde(default)]
        drain: bool,
        /// How long to wait for the drain (default: the upstream's `drain_timeout`). Implies
        /// `drain`.
        #[serde(default)]
        drain_ms: Option<u64>,
        /// Health gate: how many of the pool's instances must be healthy (default all).
        #[serde(default)]
        min_healthy: MinHealthy,
        /// Wait this long for the pool to pass the health gate before switching.
        #[serde(default)]
        wait_healthy_ms: Option<u64>,
        /// Switch even if the pool is not healthy (recorded as forced).
        #[serde(default)]
        force: bool,
    },
    /// Restore the weights from before the last weight change.
    Rollback {
        /// Upstream name.
        #[serde(default)]
        upstream: Option<String>,
    },
    /// Set one pool's weight; the difference is taken from (or given to) the main pool.
    Weight {
        /// Upstream name.
        #[serde(default)]
        upstream: Option<String>,
        /// Pool to set.
        pool: String,
        /// 0..=100.
        weight: u32,
        /// Health gate for a pool that gets traffic for the first time.
        #[serde(default)]
        min_healthy: MinHealthy,
        /// Skip the health gate (recorded as forced).
        #[serde(default)]
        force: bool,
    },
    /// Set every pool's weight (pools not named get 0; the sum must be 100).
    Weights {
        /// Upstream name.
        #[serde(default)]
        upstream: Option<String>,
        /// The split.
        weights: Weights,
        /// Health gate for pools that get traffic for the first time.
        #[serde(default)]
        min_healthy: MinHealthy,
        /// Skip the health gate (recorded as forced).
        #[serde(default)]
        force: bool,
    },
    /// Wait until `pool` (at weight 0) has nothing in flight.
    Drain {
        /// Upstream name.
        #[serde(default)]
        upstream: Option<String>,
        /// Pool to wait for.
        pool: String,
        /// How long to wait (default: the upstream's `drain_timeout`).
        #[serde(default)]
        timeout_ms: Option<u64>,
    },
    /// Replace a pool's instances.
    PoolSet {
        /// Upstream name.
        #[serde(default)]
        upstream: Option<String>,
        /// Pool to change.
        pool: String,
        /// New instances (`host:port`).
        instances: Vec<String>,
    },
    /// Add one instance to a pool.
    PoolAdd {
        /// Upstream name.
        #[serde(default)]
        upstream: Option<String>,
        /// Pool to change.
        pool: String,
        /// Instance (`host:port`).
        instance: String,
    },
    /// Remove one instance from a pool (its in-flight requests finish).
    PoolRemove {
        /// Upstream name.
        #[serde(default)]
        upstream: Option<String>,
        /// Pool to change.
        pool: String,
        /// Instance (`host:port`).
        instance: String,
    },
    /// Re-read the config file; on error keep the running config and list every problem.
    Reload,
    /// Start a progressive rollout of `pool`: its first step now, then one step per interval
    /// while the analysis passes; promoted at 100.
    Canary {
        /// Upstream name.
        #[serde(default)]
        upstream: Option<String>,
        /// The canary pool.
        pool: String,
        /// Weights (default: the upstream's `steps`).
        #[serde(default)]
        steps: Option<Vec<u32>>,
        /// Time at each step (default: the upstream's `step_interval`).
        #[serde(default)]
        interval_ms: Option<u64>,
        /// Stream each step and answer when the rollout ends.
        #[serde(default)]
        wait: bool,
        /// Health gate of each step (default all instances).
        #[serde(default)]
        min_healthy: MinHealthy,
        /// First wait up to this long for the pool to pass the health gate (a container just
        /// started), with `health` progress events, as `switch --wait-healthy`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        wait_healthy_ms: Option<u64>,
    },
    /// The upstream's rollout, canary and live numbers (an [`UpstreamStatus`]).
    CanaryStatus {
        /// Upstream name.
        #[serde(default)]
        upstream: Option<String>,
    },
    /// Stop the rollout's clock (the weights stay).
    CanaryPause {
        /// Upstream name.
        #[serde(default)]
        upstream: Option<String>,
    },
    /// Start the clock again with the time the step had left.
    CanaryResume {
        /// Upstream name.
        #[serde(default)]
        upstream: Option<String>,
    },
    /// The canary back to 0; the rollout ends as aborted.
    CanaryAbort {
        /// Upstream name.
        #[serde(default)]
        upstream: Option<String>,
    },
    /// The canary to 100 now (the old main pool drains as after a switch).
    CanaryPromote {
        /// Upstream name.
        #[serde(default)]
        upstream: Option<String>,
        /// Even if the canary does not pass the health gate.
        #[serde(default)]
        force: bool,
    },
    /// A command for the whole fleet (SPEC §9, `proxyctl --fleet`): `status` answers every
    /// proxy's applied generation and health view ([`FleetStatus`]); a change returns when
    /// every live proxy reports it applied, or fails with `timeout` naming the ones that did
    /// not within `timeout_ms` (the change itself stands). Refused by a proxy without a fleet.
    Fleet {
        /// How long to wait for every live proxy (default 10 s).
        #[serde(default)]
        timeout_ms: Option<u64>,
        /// The command.
        request: Box<Request>,
    },
    /// The audit trail: switches, weight changes, rollbacks, pool changes, reloads, health
    /// changes, ejections. With `follow`, new records are streamed as event lines until the
    /// client disconnects.
    Events {
        /// Stream new records after the existing ones.
        #[serde(default)]
        follow: bool,
        /// At most this many of the latest records (default 100).
        #[serde(default)]
        limit: Option<usize>,
    },
}

impl Request {
    /// Whether the command waits for something after any change (a drain, health, new
    /// events): it may hold its connection for long.
    pub fn waits(&self) -> bool {
        match self {
            Request::Switch {
                drain,
                drain_ms,
                wait_healthy_ms,
                ..
            } => *drain || drain_ms.is_some() || wait_healthy_ms.is_some(),
            Request::Drain { .. } => true,
            Request::Events { follow, .. } => *follow,
            Request::Canary {
                wait,
                wait_healthy_ms,
                ..
            } => *wait || wait_healthy_ms.is_some(),
            Request::Fleet { request, .. } => !matches!(**request, Request::Status),
            _ => false,
        }
    }

    /// The command name, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Status => "status",
            Request::Switch { .. } => "switch",
            Request::Rollback { .. } => "rollback",
            Request::Weight { .. } => "weight",
            Request::Weights { .. } => "weights",
            Request::Drain { .. } => "drain",
            Request::PoolSet { .. } => "pool_set",
            Request::PoolAdd { .. } => "pool_add",
            Request::PoolRemove { .. } => "pool_remove",
            Request::Reload => "reload",
            Request::Canary { .. } => "canary",
            Request::CanaryStatus { .. } => "canary_status",
            Request::CanaryPause { .. } => "canary_pause",
            Request::CanaryResume { .. } => "canary_resume",
            Request::CanaryAbort { .. } => "canary_abort",
            Request::CanaryPromote { .. } => "canary_promote",
            Request::Events { .. } => "events",
            Request::Fleet { .. } => "fleet",
        }
    }
}

/// Why a request was refused. The code decides `proxyctl`'s exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorCode {
    /// The line is not a valid request (bad JSON, unknown command, too long).
    BadRequest,
    /// No such upstream, or the upstream must be named.
    UnknownUpstream,
    /// No such pool.
    UnknownPool,
    /// The request is well-formed but not acceptable (a pool without instances, ...).
    Invalid,
    /// Weights out of 0..=100, or not summing to 100.
    InvalidWeights,
    /// The target pool is not healthy enough.
    Unhealthy,
    /// A wait (drain, health) ran out; the change itself, if any, was applied.
    Timeout,
    /// The proxy failed to carry it out (e.g. the state file could not be written).
    Internal,
    /// Too many control connections at once.
    Busy,
    /// The canary was rolled back automatically (`canary --wait`); the details carry the
    /// numbers.
    RolledBack,
    /// The rollout was stopped by a human (`canary abort`, or a weight change).
    Aborted,
    /// Fleet: another change was written to the desired state first (compare-and-swap on
    /// its revision); nothing was changed. Look at the state again and retry.
    Conflict,
    /// Fleet: the desired state in etcd cannot be reached; nothing was changed (a fleet proxy
    /// never applies a change locally only). Traffic goes on by the last applied state.
    FleetUnavailable,
    /// A code this client does not know (a newer proxy): treated as a refusal.
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    /// `proxyctl` exit status for this refusal: 4 for timeouts, 5 for an automatic rollback,
    /// 1 otherwise.
    pub fn exit_code(self) -> u8 {
        match self {
            ErrorCode::Timeout => 4,
            ErrorCode::RolledBack => 5,
            _ => 1,
        }
    }
}

/// A refusal: code, human message, and optional structured details.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ControlError {
    /// Machine-readable reason.
    pub code: ErrorCode,
    /// What happened, for humans.
    pub message: String,
    /// Extra data (e.g. the config problems of a failed reload, what is still pending).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<serde_json::Value>,
}

impl ControlError {
    /// An error without details.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ControlError {
            code,
            message: message.into(),
            details: None,
        }
    }

    /// The same error with details attached.
    pub fn with_details(mut self, details: serde_json::Value) -> Self {
        self.details = Some(details);
        self
    }
}

/// The final line of an answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    /// Whether the request was carried out.
    pub ok: bool,
    /// The result (shape depends on the command).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    /// The refusal, when `ok` is false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ControlError>,
}

impl Reply {
    /// A success with a result.
    pub fn ok(result: impl Serialize) -> Self {
        Reply {
            ok: true,
            result: serde_json::to_value(result).ok(),
            error: None,
        }
    }

    /// A refusal.
    pub fn err(e: ControlError) -> Self {
        Reply {
            ok: false,
            result: None,
            error: Some(e),
        }
    }
}

/// A progress line sent before the final reply of a waiting command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventLine {
    /// The event.
    pub event: Event,
}

/// Progress of a waiting command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Event {
    /// A change was applied; waiting continues.
    Applied {
        /// What changed.
        change: Change,
    },
    /// Health of a pool being waited for (`switch --wait-healthy`).
    Health {
        /// Upstream.
        upstream: String,
        /// Pool.
        pool: String,
        /// Healthy instances now.
        healthy: usize,
        /// Healthy instances needed.
        needed: usize,
        /// Each instance.
        instances: Vec<InstanceHealth>,
    },
    /// One audit record (`events --follow`).
    Record {
        /// The record.
        record: AuditRecord,
    },
    /// A rollout moved: a step, a pause, its end, or a new reason it is waiting.
    Rollout {
        /// Upstream.
        upstream: String,
        /// The rollout now.
        rollout: RolloutStatus,
    },
    /// Requests still in flight on pools being drained.
    Draining {
        /// Upstream.
        upstream: String,
        /// Pool -> requests in flight.
        inflight: BTreeMap<String, i64>,
        /// Milliseconds waited so far.
        waited_ms: u64,
    },
}

/// One instance's health in a health-gate report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceHealth {
    /// `host:port` as configured.
    pub addr: String,
    /// Its state.
    pub health: HealthState,
    /// The last check's outcome in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_check: Option<String>,
}

/// One entry of the audit trail.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Increasing number (per process run).
    pub seq: u64,
    /// RFC 3339 time.
    pub time: String,
    /// What happened: `switch`, `weight`, `weights`, `rollback`, `pool_set`, `pool_add`,
    /// `pool_remove`, `reload`, `health`, `eject`, `fail_open`, `auto_rollback`.
    pub kind: String,
    /// Upstream concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
    /// Pool concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// Instance concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// Who: `socket`, `library`, `signal`, `proxy` (automatic).
    pub actor: String,
    /// Peer uid (socket changes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// Peer pid (socket changes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<i32>,
    /// Generation after the change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    /// Weights before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old_weights: Option<Weights>,
    /// Weights after.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_weights: Option<Weights>,
    /// The health gate was skipped.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub forced: bool,
    /// Human summary.
    pub message: String,
}

/// The result of a state change (switch, weights, rollback, pool changes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Change {
    /// Upstream changed.
    pub upstream: String,
    /// Generation after the change.
    pub generation: u64,
    /// Weights before.
    pub old_weights: Weights,
    /// Weights after.
    pub new_weights: Weights,
    /// Whether anything changed (a switch to the pool that already has 100% changes nothing).
    pub changed: bool,
    /// The health gate was skipped (`--force`) for a pool that did not pass it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub forced: bool,
    /// Instances per pool after the change (pool commands only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instances: Option<BTreeMap<String, Vec<String>>>,
    /// The drain that followed (`switch --drain`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain: Option<DrainResult>,
}

/// The outcome of waiting for pools to drain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DrainResult {
    /// Upstream.
    pub upstream: String,
    /// Pools waited for -> requests still in flight at the end (all 0 when drained).
    pub inflight: BTreeMap<String, i64>,
    /// Whether every pool reached 0.
    pub drained: bool,
    /// Milliseconds waited.
    pub waited_ms: u64,
}

/// The result of `canary`, `canary abort` and `canary promote`: the weight change and the
/// rollout after it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CanaryResult {
    /// The weight change.
    pub change: Change,
    /// The rollout.
    pub rollout: RolloutStatus,
}

/// The result of a reload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReloadResult {
    /// One-line summary of the new config.
    pub summary: String,
    /// Settings that changed in the file but need a restart to take effect.
    pub needs_restart: Vec<String>,
    /// What the reload changed that the operator did not ask for explicitly (e.g. run-time
    /// weights that could not be kept because a pool with weight left the file).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip<T: Serialize + for<'de> Deserialize<'de> + PartialEq + std::fmt::Debug>(v: &T) {
        let json = serde_json::to_string(v).unwrap();
        let back: T = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{json}: {e}"));
        assert_eq!(&back, v, "{json}");
    }

    fn record() -> AuditRecord {
        AuditRecord {
            seq: 1,
            time: "2026-11-28T06:00:00.000Z".into(),
            kind: "switch".into(),
            upstream: Some("app".into()),
            pool: None,
            instance: None,
            actor: "socket".into(),
            uid: Some(1000),
            pid: Some(42),
            generation: Some(2),
            old_weights: None,
            new_weights: None,
            forced: true,
            message: "x".into(),
        }
    }

    #[test]
    fn every_event_survives_the_wire() {
        let change = Change {
            upstream: "app".into(),
            generation: 2,
            old_weights: Weights::new(),
            new_weights: Weights::new(),
            changed: true,
            forced: false,
            instances: None,
            drain: None,
        };
        for ev in [
            Event::Applied { change },
            Event::Health {
                upstream: "app".into(),
                pool: "green".into(),
                healthy: 0,
                needed: 1,
                instances: vec![InstanceHealth {
                    addr: "a:1".into(),
                    health: HealthState::Unknown,
                    last_check: None,
                }],
            },
            Event::Record { record: record() },
            Event::Draining {
                upstream: "app".into(),
                inflight: [("blue".to_string(), 1)].into(),
                waited_ms: 5,
            },
            Event::Rollout {
                upstream: "app".into(),
                rollout: RolloutStatus {
                    pool: "green".into(),
                    steps: vec![5, 25, 50, 100],
                    step: 1,
                    weight: 25,
                    interval_ms: 600_000,
                    state: "running".into(),
                    step_left_ms: Some(12),
                    waiting: Some("waiting for traffic: 7 of 20 requests".into()),
                    started: "2026-11-29T12:00:00Z".into(),
                    ended: None,
                    ended_by: None,
                    id: 3,
                },
            },
        ] {
            roundtrip(&EventLine { event: ev });
        }
    }

    #[test]
    fn requests_parse_from_the_documented_json_and_reject_unknown_fields() {
        let r: Request = serde_json::from_str(
            r#"{"cmd":"switch","pool":"green","drain_ms":30000,"min_healthy":"50%"}"#,
        )
        .unwrap();
        assert_eq!(
            r,
            Request::Switch {
                upstream: None,
                pool: "green".into(),
                drain: false,
                drain_ms: Some(30000),
                min_healthy: MinHealthy::Percent(50),
                wait_healthy_ms: None,
                force: false,
            }
        );
        roundtrip(&r);
        roundtrip(&Request::Events {
            follow: true,
            limit: Some(3),
        });
        let r: Request = serde_json::from_str(
            r#"{"cmd":"canary","pool":"green","steps":[5,50,100],"interval_ms":60000,"wait":true}"#,
        )
        .unwrap();
        assert!(r.waits());
        roundtrip(&r);
        for cmd in [
            "canary_status",
            "canary_pause",
            "canary_resume",
            "canary_abort",
            "canary_promote",
        ] {
            let r: Request = serde_json::from_str(&format!(r#"{{"cmd":"{cmd}"}}"#)).unwrap();
            assert_eq!(r.name(), cmd);
            assert!(!r.waits());
        }
        assert!(
            serde_json::from_str::<Request>(r#"{"cmd":"canary"}"#).is_err(),
            "pool needed"
        );
        assert_eq!(ErrorCode::RolledBack.exit_code(), 5);
        assert_eq!(ErrorCode::Aborted.exit_code(), 1);
        assert!(
            serde_json::from_str::<Request>(r#"{"cmd":"switch","pool":"g","drian":1}"#).is_err()
        );
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"explode"}"#).is_err());
        assert_eq!("all".parse::<MinHealthy>().unwrap().needed(3), 3);
        assert_eq!("50%".parse::<MinHealthy>().unwrap().needed(3), 2);
        assert_eq!("5".parse::<MinHealthy>().unwrap().needed(3), 3);
        assert!("150%".parse::<MinHealthy>().is_err());
    }
}
