//! switchyard's data plane: a Pingora reverse proxy for blue/green and canary deploys.
//!
//! Use it as a binary (`switchyard -c FILE`) or embed it: [`start`] takes a validated
//! [`switchyard_config::Config`] and returns a [`Handle`] through which every control
//! operation is available (the control socket is a thin adapter over the same handle).
//!
//! ```no_run
//! let config = switchyard_config::load("switchyard.yaml".as_ref())?;
//! let proxy = switchyard_proxy::start(config, Default::default())?;
//! println!("listening on {:?}", proxy.listen_addrs());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Layout
//! - `handle`: [`start`], [`Handle`], [`StartOptions`], [`StartError`].
//! - `server`: binding, the accept loop, graceful shutdown.
//! - `coalesce`: write coalescing for accepted streams (one send per small response).
//! - `service`: the `ProxyHttp` implementation (the request path).
//! - `control`: the control operations (switch, weights, drain, pools, reload) behind both
//!   the [`Handle`] and the control socket.
//! - `persist`: the state file.
//! - `health`: active health checks (Spring Actuator aware), one task per instance.
//! - `events`: the audit trail behind `proxyctl events`.
//! - `metrics`: Prometheus metrics (SPEC §6), lock-free on the request path.
//! - `access_log`: one line per request, combined or JSON, never blocking.
//! - `admin`: the admin listener (`/metrics`, `/healthz`, `/status`).
//! - `snapshot`: the `ArcSwap`ed routing snapshot and its single writer.
//! - `upstream`: pools, instances, weights, instance selection.
//! - `route`: route table and deny list.
//! - `resolve`: DNS resolution off the request path ([`Resolve`]).
//! - [`fake_upstream`]: a Spring-like origin used by the demo, the tests and the benchmarks.
//! - [`demo`]: `switchyard demo`.

mod access_log;
mod admin;
mod coalesce;
mod control;
mod events;
mod handle;
mod health;
mod metrics;
mod persist;
mod resolve;
mod route;
mod server;
mod service;
mod snapshot;
mod upstream;

pub mod demo;
pub mod fake_upstream;

/// Hot-path pieces exposed for the criterion benchmarks in `benches/`; not a stable API.
#[doc(hidden)]
pub mod bench {
    pub use crate::route::{DenyList, Route, RouteTable};
}

pub use handle::{preflight, start, Handle, StartError, StartOptions};
pub use resolve::{Resolve, SystemResolver};
pub use server::DrainReport;
