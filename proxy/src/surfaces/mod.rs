//! The proxy's outside interfaces besides the data plane, both thin adapters over
//! [`crate::ops::Controller`]:
//!
//! - [`admin`]: the admin HTTP listener (`/metrics`, `/healthz`, `/status`).
//! - [`control`]: the control-socket handler (the protocol of SPEC §5).

pub(crate) mod admin;
pub(crate) mod control;
