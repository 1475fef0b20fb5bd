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
//! Dependencies go one way: surfaces -> ops -> state -> routing/upstream; the request path
//! (`proxy`) reads state; telemetry reads upstream and state, never the reverse.
//!
//! - `runtime`: [`start`], [`Handle`], [`StartOptions`], [`StartError`]: threads and wiring.
//! - `listen`: binding (TLS), the accept loop, the shutdown drain, write coalescing.
//! - `proxy`: the Pingora `ProxyHttp` hooks (the request path).
//! - `routing`: pure decisions: route table, deny list, the per-request pool decision, sticky
//!   buckets.
//! - `canary`: pure canary logic: the rollout state machine and the analysis verdict.
//! - `upstream`: pools, instances, health atomics, instance selection, request counters.
//! - `state`: the `ArcSwap`ed routing snapshot, its single writer, the state file.
//! - `ops`: the operations (switch, weights, rollback, pools, drain, reload, status, canary)
//!   and the autopilot that advances rollouts and rolls bad canaries back.
//! - `checks`: active health checks and DNS resolution ([`Resolve`]).
//! - `telemetry`: metrics, access log, audit trail.
//! - `surfaces`: the admin listener and the control-socket handler.
//! - [`demo`]: `switchyard demo` and the Spring-like demo app.

mod canary;
mod checks;
mod fleet;
mod listen;
mod ops;
mod proxy;
mod routing;
mod runtime;
mod state;
mod surfaces;
mod telemetry;
mod upstream;

pub mod demo;

#[cfg(feature = "test-util")]
#[doc(hidden)]
pub mod bench;

pub use checks::{Resolve, SystemResolver};
pub use listen::{preflight, DrainReport, ListenError};
pub use runtime::{
    start, upgrade, upgrade_with, Handle, LogDropped, StartError, StartOptions, UpgradeError,
    UpgradeStep,
};
