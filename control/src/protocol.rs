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
