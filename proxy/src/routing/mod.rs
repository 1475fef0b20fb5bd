//! Routing decisions, as pure code (no tokio, no Pingora, no I/O): which route and upstream a
//! path belongs to, whether the proxy answers it itself, and which pool of the upstream a
//! request goes to. Everything here is built once per configuration or weight change and
//! only read on the request path.
//!
//! - [`routes`]: the route table (path prefix -> upstream, prefix stripping).
//! - [`deny`]: the deny list.
//! - [`decide`]: the per-request pool decision ([`decide::Split`]).
//! - [`sticky`]: sticky buckets from cookies and headers.
//! - [`weights`]: the rules every set of weights obeys.
//! - [`normalize`]: the path the deny list and the routes see.

// Route table and deny list are `pub` for the benchmarks (`crate::bench`, feature test-util).
#![cfg_attr(not(feature = "test-util"), allow(unreachable_pub, unused_imports))]

pub(crate) mod decide;
pub(crate) mod deny;
pub(crate) mod normalize;
pub(crate) mod routes;
pub(crate) mod sticky;
pub(crate) mod weights;

pub use deny::DenyList;
pub use routes::{Route, RouteTable};
