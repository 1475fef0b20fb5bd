//! End-to-end tests: one binary (the ripgrep pattern), real proxies on port 0.

#![allow(clippy::unwrap_used)]

mod canary;
mod control_socket;
mod faults;
mod fleet;
mod health;
mod hostile;
mod lifecycle;
mod limits;
mod load;
mod observability;
mod reload;
mod routing;
mod switching;
mod tls;
mod upgrade;
mod upstreams;
