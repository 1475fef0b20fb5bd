//! switchyard's control plane interface: the protocol spoken on the control socket, and the
//! `proxyctl` client.
//!
//! No Pingora here: the proxy implements the server side; this crate defines what travels on
//! the socket so that the proxy, `proxyctl` and tests agree on one set of types.
//!
//! # Layout
//! - [`protocol`]: request/response/status types and the protocol version.

#![deny(missing_docs)]

pub mod protocol;

pub use protocol::{Status, Weights, PROTOCOL_VERSION};
