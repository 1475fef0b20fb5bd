//! DNS resolution of instance names, off the request path.
//!
//! Pingora's `HttpPeer::new` resolves names with blocking DNS on the calling (worker) thread,
//! and nginx OSS resolves once at start and keeps a stale IP when a container restarts. Here
//! every DNS-named instance is resolved by a background task every `resolve_interval`; the
//! request path only reads the last answer. A failed lookup keeps the previous addresses (a
//! DNS blip must not take an instance away) and is reported in the instance's status.

use crate::state::Shared;
use async_trait::async_trait;
use std::collections::HashSet;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use switchyard_config::Host;

use crate::upstream::{Instance, Resolved};

/// Something that turns a host name into addresses. Injectable so tests can change what a
/// name resolves to (a container restarted with a new IP) without touching real DNS.
#[async_trait]
pub trait Resolve: Send + Sync + std::fmt::Debug {
    /// Resolve `host:port`.
    async fn resolve(&self, host: &str, port: u16) -> io::Result<Vec<SocketAddr>>;
}

/// The system resolver (`getaddrinfo` on tokio's blocking pool).
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemResolver;

#[async_trait]
impl Resolve for SystemResolver {
    async fn resolve(&self, host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
        Ok(tokio::net::lookup_host((host, port)).await?.collect())
    }
}

/// Bound on one lookup, so a hanging resolver cannot stall the refresh loop.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// Resolve one instance and store the answer. Returns whether its address changed.
pub(crate) async fn refresh(resolver: &dyn Resolve, inst: &Instance) -> bool {
    let Host::Name(host) = &inst.addr.host else {
        return false;
    };
    let result = tokio::time::timeout(LOOKUP_TIMEOUT, resolver.resolve(host, inst.addr.port))
        .await
        .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "lookup timed out")));
    let old = inst.resolved.load_full();
    let new = match result {
        Ok(mut addrs) if !addrs.is_empty() => {
            // Prefer IPv4 first: docker networks are IPv4, and a stable order avoids churn.
            addrs.sort_by_key(|a| (a.is_ipv6(), *a));
            addrs.dedup();
            Resolved { addrs, error: None }
        }
        Ok(_) => Resolved {
            addrs: old.addrs.clone(),
            error: Some("no addresses".into()),
        },
        Err(e) => Resolved {
            addrs: old.addrs.clone(),
            error: Some(e.to_string()),
        },
    };
    let changed = new.addrs != old.addrs;
    if changed {
        tracing::info!(instance = %inst.label, old = ?old.addrs, new = ?new.addrs, "instance address changed");
    }
    if new.error.is_some() && new.error != old.error {
        tracing::warn!(instance = %inst.label, error = ?new.error, kept = ?new.addrs, "DNS lookup failed; keeping the last addresses");
    }
    if changed || new.error != old.error {
        inst.resolved.store(Arc::new(new));
    }
    changed
}

/// Resolve every DNS-named instance of every upstream once (all lookups concurrently).
pub(crate) async fn refresh_all(shared: &Shared, resolver: &dyn Resolve) {
    let snap = shared.load();
    let mut seen = HashSet::new();
    let named: Vec<Arc<Instance>> = snap
        .upstreams
        .iter()
        .flat_map(|u| u.pools.iter())
        .flat_map(|p| p.instances.iter())
        .filter(|i| matches!(i.addr.host, Host::Name(_)) && seen.insert(i.id))
        .cloned()
        .collect();
    let lookups = named.iter().map(|i| refresh(resolver, i));
    futures::future::join_all(lookups).await;
}

/// Re-resolve DNS-named instances forever, each upstream at its own `resolve_interval`.
pub(crate) async fn run(shared: Arc<Shared>, resolver: Arc<dyn Resolve>) {
    // One tick per upstream would need a task per upstream that follows reloads; a single
    // loop at the smallest interval is simpler, and an upstream is refreshed when its own
    // interval has passed.
    let mut last: std::collections::HashMap<String, tokio::time::Instant> = Default::default();
    loop {
        let snap = shared.load();
        let tick = snap
            .upstreams
            .iter()
            .map(|u| u.config.resolve_interval)
            .min()
            .unwrap_or(Duration::from_secs(5))
            .max(Duration::from_millis(50));
        tokio::time::sleep(tick).await;
        let now = tokio::time::Instant::now();
        for u in &snap.upstreams {
            let due = last.get(u.name()).is_none_or(|t| {
                now.duration_since(*t) + Duration::from_millis(5) >= u.config.resolve_interval
            });
            if !due {
                continue;
            }
            last.insert(u.name().to_string(), now);
            let mut seen = HashSet::new();
            let named: Vec<&Arc<Instance>> = u
                .pools
                .iter()
                .flat_map(|p| p.instances.iter())
                .filter(|i| matches!(i.addr.host, Host::Name(_)) && seen.insert(i.id))
                .collect();
            futures::future::join_all(named.into_iter().map(|i| refresh(&*resolver, i))).await;
        }
    }
}
