//! switchyard's control plane interface: the protocol spoken on the control socket, the
//! server adapter and the client behind `proxyctl`.
//!
//! No Pingora here: the proxy implements [`ControlHandler`] over its `Handle`; this crate owns
//! the wire (newline-delimited JSON, SPEC §5), the socket's safety rules and the client, so
//! the proxy, `proxyctl` and tests agree on one set of types.
//!
//! Commands (see [`protocol::Request`]): `status`, `switch`, `rollback`, `weight`, `weights`,
//! `drain`, `pool_set`, `pool_add`, `pool_remove`, `reload`, `events`.
//!
//! # Layout
//! - [`protocol`]: the wire format: requests, replies, events, status, error codes, [`PROTOCOL_VERSION`].
//! - [`server`]: the server, [`ControlServer`] (socket set-up, per-connection loop) and [`ControlHandler`].
//! - [`client`]: the client, [`ControlClient`].
//! - [`docs`]: shell completions and man pages of both binaries, from their clap definitions.

#![deny(missing_docs)]

pub mod client;
pub mod docs;
pub mod protocol;
pub mod server;

pub use client::{ClientError, ControlClient};
pub use protocol::{
    AuditRecord, Change, ControlError, DrainResult, ErrorCode, Event, HealthState, MinHealthy,
    Reply, Request, Status, Weights, PROTOCOL_VERSION,
};
pub use server::{ControlHandler, ControlServer, ControlSocketError, EventSender, Peer};
