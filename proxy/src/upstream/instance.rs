//! One backend instance: its configured address, what that address resolves to now, its
//! in-flight count and its health. Shared by every snapshot that lists it, so these survive
//! switches and reloads; an instance removed and added again is a new `Instance`.

use super::health::Health;
use arc_swap::ArcSwap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use switchyard_config::InstanceAddr;

/// Source of unique instance ids (part of the connection-reuse key).
static NEXT_INSTANCE_ID: AtomicU64 = AtomicU64::new(1);

/// The addresses a configured `host:port` currently resolves to.
#[derive(Debug, Clone, Default)]
pub(crate) struct Resolved {
    /// Current addresses (first one is used); empty while unresolved.
    pub(crate) addrs: Vec<SocketAddr>,
    /// The last resolution error, if the last attempt failed.
    pub(crate) error: Option<String>,
}

/// One backend instance.
#[derive(Debug)]
pub(crate) struct Instance {
    /// As configured.
    pub(crate) addr: InstanceAddr,
    /// `addr` as text, for status and logs.
    pub(crate) label: String,
    /// Unique id, mixed into the connection-reuse key: a re-added instance (say, a restarted
    /// container on the same port) never gets connections pooled for its predecessor.
    pub(crate) id: u64,
    /// Current resolution (fixed for IP literals, refreshed by the resolver for names).
    pub(crate) resolved: ArcSwap<Resolved>,
    /// Requests in flight on this instance.
    pub(crate) inflight: AtomicI64,
    /// Active and passive health.
    pub(crate) health: Health,
}

impl Instance {
    pub(crate) fn new(addr: InstanceAddr) -> Self {
        let resolved = match addr.socket_addr() {
            Some(sa) => Resolved {
                addrs: vec![sa],
                error: None,
            },
            None => Resolved {
                addrs: vec![],
                error: Some("not resolved yet".into()),
            },
        };
        Instance {
            label: addr.to_string(),
            addr,
            id: NEXT_INSTANCE_ID.fetch_add(1, Ordering::Relaxed),
            resolved: ArcSwap::from_pointee(resolved),
            inflight: AtomicI64::new(0),
            health: Health::default(),
        }
    }

    /// The address to connect to now, if resolved.
    pub(crate) fn current_addr(&self) -> Option<SocketAddr> {
        self.resolved.load().addrs.first().copied()
    }
}
