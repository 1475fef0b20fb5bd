//! Hot-path pieces exposed for the criterion benchmarks in `benches/` (feature `test-util`);
//! not a stable API. Set-up panics on a bad config: it is only ever given fixed test input.

pub use crate::routing::{DenyList, Route, RouteTable};
use crate::state::{Shared, Snapshot};
use crate::upstream::{Candidates, UpstreamState};
use std::sync::Arc;

fn config(pools: &[(&str, usize)], balance: &str) -> switchyard_config::Config {
    config_with(pools, balance, "")
}

fn config_with(pools: &[(&str, usize)], balance: &str, extra: &str) -> switchyard_config::Config {
    let mut port = 1000u32;
    let pools: String = pools
        .iter()
        .map(|(name, n)| {
            let list: Vec<String> = (0..*n)
                .map(|_| {
                    port += 1;
                    format!("\"127.0.{}.{}:{}\"", port / 250 % 250, port % 250 + 1, port)
                })
                .collect();
            format!("      {name}: [{}]\n", list.join(", "))
        })
        .collect();
    let active = pools_first(&pools);
    let yaml = format!(
        "listen: [{{addr: \"127.0.0.1:0\"}}]\nupstreams:\n  app:\n    pools:\n{pools}    active: {active}\n    balance: {balance}\n{extra}routes: [{{path_prefix: /, upstream: app}}]\n"
    );
    match switchyard_config::parse(&yaml) {
        Ok(c) => c,
        Err(e) => panic!("bench config: {e}"),
    }
}

fn pools_first(pools: &str) -> String {
    pools
        .trim_start()
        .split(':')
        .next()
        .unwrap_or("blue")
        .to_string()
}

/// One upstream whose pools have the given sizes, every instance healthy.
#[derive(Debug)]
pub struct Upstream(UpstreamState);

impl Upstream {
    /// `pools`: (name, instance count); `balance`: `round_robin` or `least_requests`.
    pub fn new(pools: &[(&str, usize)], balance: &str) -> Self {
        let cfg = config(pools, balance);
        let up = Arc::new(cfg.upstreams[0].clone());
        let rt = crate::upstream::Runtime {
            weights: up
                .pools
                .iter()
                .map(|p| (p.name.clone(), u32::from(p.name == up.active) * 100))
                .collect(),
            generation: 1,
            ..Default::default()
        };
        let state = UpstreamState::build(up, &rt, None);
        for p in &state.pools {
            for i in &p.instances {
                for _ in 0..2 {
                    i.health.record_check(true, String::new(), 2, 3);
                }
            }
        }
        Upstream(state)
    }

    /// Set the weights (must sum to 100).
    pub fn with_weights(self, weights: &[(&str, u32)]) -> Self {
        let w = weights.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        Upstream(self.0.with_changes(Some(&w), None))
    }

    /// The per-request choice of a pool by weight.
    pub fn pick_pool(&self) -> usize {
        self.0.pick_pool()
    }

    /// The per-request choice of an instance in the main pool.
    pub fn pick_instance(&self) -> bool {
        let pool = &self.0.pools[self.0.main];
        matches!(
            pool.pick(
                self.0.config.balance,
                &[],
                crate::upstream::health::now_ms()
            ),
            Candidates::Found { .. }
        )
    }
}

/// The routing snapshot cell, for load-under-contention benchmarks.
#[derive(Debug)]
pub struct Routing(Shared);

impl Routing {
    /// A snapshot with one upstream of two pools.
    pub fn new() -> Self {
        let cfg = Arc::new(config(&[("blue", 2), ("green", 2)], "round_robin"));
        Routing(Shared::new(Snapshot::build(
            cfg,
            &crate::state::Restored::default(),
            None,
            crate::routing::sticky::StickyKey::generate,
        )))
    }

    /// What a request does first: load the snapshot.
    pub fn load_generation(&self) -> u64 {
        self.0.load().upstreams[0].generation
    }

    /// What a switch does: build and store a new snapshot.
    pub fn swap(&self) {
        let guard = self.0.lock();
        let cur = self.0.load().upstreams[0].clone();
        let next = Arc::new(cur.with_changes(None, None));
        let snap = self.0.with_upstream(&guard, next);
        self.0.store(&guard, snap);
    }
}

impl Default for Routing {
    fn default() -> Self {
        Self::new()
    }
}

/// The per-request pool decision (`proxy::choose`: preview, force header, sticky bucket,
/// weights) on an upstream with pools blue and green.
pub struct Decide {
    up: UpstreamState,
    key: crate::routing::sticky::StickyKey,
}

impl std::fmt::Debug for Decide {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Decide")
    }
}

impl Decide {
    /// Green at `green` percent; `sticky` as in the config (`cookie`, `none`, `header:X-User`).
    pub fn new(green: u32, sticky: &str) -> Self {
        let cfg = config_with(
            &[("blue", 2), ("green", 2)],
            "round_robin",
            &format!("    canary: {{sticky: \"{sticky}\"}}\n"),
        );
        let up = Arc::new(cfg.upstreams[0].clone());
        let rt = crate::upstream::Runtime {
            weights: [
                ("blue".to_string(), 100 - green),
                ("green".to_string(), green),
            ]
            .into(),
            generation: 1,
            ..Default::default()
        };
        Decide {
            up: UpstreamState::build(up, &rt, None),
            key: crate::routing::sticky::StickyKey::new([7; 16]),
        }
    }

    /// A valid sticky cookie (`name=value`) of bucket `b`.
    pub fn cookie(&self, b: u8) -> String {
        format!("switchyard_pool={}", self.key.cookie_value(b))
    }

    /// The pool index for a request with these headers from 127.0.0.1.
    pub fn choose(&self, headers: &http::HeaderMap) -> usize {
        crate::proxy::choose::choose(
            &self.up,
            &self.key,
            headers,
            Some(std::net::IpAddr::from([127, 0, 0, 1])),
        )
        .pool
    }
}
