//! What the proxy tells the outside: metrics, the access log and the audit trail. Telemetry
//! reads the routing state and the pools' counters; nothing on the request path depends on it
//! beyond handing over a finished request.
//!
//! - [`metrics`]: Prometheus metrics (SPEC §6).
//! - [`access_log`]: one line per request, combined or JSON, never blocking.
//! - [`events`]: the audit trail behind `proxyctl events`.

pub(crate) mod access_log;
pub(crate) mod events;
pub(crate) mod metrics;
