//! Canary releases as pure code (no tokio, no I/O): the progressive rollout's state machine and
//! the analysis that judges a canary from its live counters. The driver that samples the
//! counters, advances rollouts and rolls bad canaries back is `ops::autopilot`; the commands
//! are `ops::canary`; the per-request decision (stickiness, `X-Canary`, preview) is
//! `routing::decide`.
//!
//! - [`rollout`]: a rollout (steps, interval, where it is) and its transitions; it is part of
//!   the upstream's state, so it is persisted and survives a restart.
//! - [`analysis`]: a window's numbers and the verdict on them.

pub(crate) mod analysis;
pub(crate) mod rollout;
