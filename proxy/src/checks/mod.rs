//! Background checks of the instances, on the control runtime and never on the request path:
//! the request path only reads what they leave in atomics.
//!
//! - [`active`]: active health checks, the Spring Boot way (one task per instance).
//! - [`dns`]: resolution of DNS-named instances ([`Resolve`]).

pub(crate) mod active;
pub(crate) mod dns;

pub use dns::{Resolve, SystemResolver};
