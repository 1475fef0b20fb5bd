//! Fleets (SPEC §9): several proxies follow one desired state in etcd.
//!
//! Keys under the fleet's `prefix`:
//! - `desired/<upstream>`: the routing state every proxy must serve ([`Desired`]: weights,
//!   instance lists, sticky buckets, rollout, generation). Written only by a transaction that
//!   compares the key's `mod_revision` with the one the writer last applied, so two changes
//!   decided on the same state cannot both land: the second gets `conflict` and changes
//!   nothing.
//! - `applied/<name>/<upstream>`: what one proxy serves ([`Applied`]: generation, the instances
//!   it sees down, its per-pool request counts), on the proxy's lease, re-published every
//!   second and at every change: a proxy that is gone disappears after `lease_ttl`.
//! - `members/<name>`: every proxy that ever joined (no lease), so one that is gone is still
//!   listed by `status --fleet`.
//! - `leader`: the name of the proxy that runs fleet-wide rollouts and automatic rollbacks,
//!   created only when absent, on that proxy's lease (a lease-based election).
//!
//! A change on a fleet proxy (`ops::Controller::apply_noted`) is decided under the writer lock
//! as on a standalone proxy, written to etcd by that transaction, and only then committed
//! locally (state file, then the snapshot swap). Every proxy — the writer too — watches the
//! prefix; a desired revision newer than the one it serves is applied through the same writer
//! lock and state file as a local change. When etcd cannot be reached nothing is written
//! anywhere: changes are refused (`fleet_unavailable`), traffic goes on by the last applied
//! state, and on reconnect the latest desired state is applied. A proxy started while etcd is
//! down serves its state file.
//!
//! One task per proxy ([`run`], on the control runtime) owns the etcd session: connect, lease,
//! initial read, watch, publish, keep the lease alive, campaign for leadership; on any error it
//! marks the link down and starts over with a growing pause (at most 5 s).

mod records;

pub(crate) use records::{Applied, Counts, Desired};

use crate::ops::Controller;
use crate::upstream::stats::Sample;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp,
    TxnOpResponse, WatchOptions,
};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime};
use switchyard_config::FleetConfig;
use switchyard_control::protocol::{
    ControlError, ErrorCode, FleetAck, FleetApplied, FleetDesired, FleetProxy, FleetStatus,
};

/// Bound on every single etcd operation (a write, a read, a lease grant).
const OP_TIMEOUT: Duration = Duration::from_secs(3);
/// How often a proxy re-publishes what it serves (its counts feed the fleet's canary analysis).
const PUBLISH_EVERY: Duration = Duration::from_secs(1);
/// Longest pause between two connection attempts.
const MAX_RETRY: Duration = Duration::from_secs(5);
/// Default wait for every proxy to report a change.
pub(crate) const DEFAULT_ACK_TIMEOUT: Duration = Duration::from_secs(10);

/// A proxy's boot and its last published counts per pool.
type Baseline = (u64, BTreeMap<String, Counts>);

/// What this proxy knows of the fleet, from its watch.
#[derive(Debug, Default, Clone)]
struct View {
    /// Upstream -> (revision, desired state).
    desired: BTreeMap<String, (i64, Desired)>,
    /// (proxy, upstream) -> what it serves, and when that was seen here.
    applied: BTreeMap<(String, String), (Applied, Instant)>,
    /// Every proxy that ever joined.
    members: BTreeSet<String>,
    /// The elected proxy, if any.
    leader: Option<String>,
}

/// The etcd client of the current session (the client has no `Debug`).
#[derive(Clone)]
struct Session(Client);

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Session")
    }
}

/// The link to the fleet.
#[derive(Debug)]
pub(crate) struct Fleet {
    pub(crate) cfg: FleetConfig,
    /// The control runtime, where every etcd call runs.
    rt: OnceLock<tokio::runtime::Handle>,
    /// The session's client, while the link is up.
    client: Mutex<Option<Session>>,
    /// Connected and in sync (initial read done, watch running).
    up: AtomicBool,
    down_since: Mutex<Option<SystemTime>>,
    view: Mutex<View>,
    view_changed: tokio::sync::Notify,
    /// Upstream -> revision of the desired key this proxy serves.
    revs: Mutex<HashMap<String, i64>>,
    /// Upstream -> why the desired state cannot be applied here.
    errors: Mutex<HashMap<String, String>>,
    /// Other proxies' last published counts: (proxy, upstream) -> (boot, pool -> counts).
    baselines: Mutex<HashMap<(String, String), Baseline>>,
    /// What other proxies' counts grew by since first seen here: (upstream, pool) -> sum.
    /// Only growth within one boot of one proxy is added, so a proxy that restarts, leaves or
    /// joins does not make the fleet's window jump.
    grown: Mutex<HashMap<(String, String), Counts>>,
    /// Random per process (see [`Applied::boot`]).
    boot: u64,
    /// This proxy holds the `leader` key.
    leader: AtomicBool,
    /// A reload happened: serve the desired state again on the new config.
    resync: AtomicBool,
    /// The session's lease.
    lease: AtomicI64,
    /// Metric: the link is up (1) or down (0).
    connected_gauge: prometheus::IntGauge,
    /// Metric: this proxy is the fleet's leader.
    leader_gauge: prometheus::IntGauge,
    /// Tests: a pause between reading the expected revision and writing (makes two
    /// concurrent changes meet at the compare-and-swap).
    #[cfg(feature = "test-util")]
    pub(crate) cas_delay: Mutex<Duration>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn unavailable(msg: impl std::fmt::Display) -> ControlError {
    ControlError::new(
        ErrorCode::FleetUnavailable,
        format!("not applied: the fleet's desired state in etcd cannot be reached ({msg}); this proxy keeps serving its last applied state and applies no change on its own"),
    )
}

impl Fleet {
    pub(crate) fn new(cfg: FleetConfig, registry: &prometheus::Registry) -> Arc<Self> {
        let connected_gauge = prometheus::IntGauge::new(
            "switchyard_fleet_connected",
            "1 while this proxy's link to the fleet's etcd is up and in sync, else 0",
        )
        .expect("a valid metric name");
        let leader_gauge = prometheus::IntGauge::new(
            "switchyard_fleet_leader",
            "1 while this proxy is the fleet's leader (runs rollouts and automatic rollbacks)",
        )
        .expect("a valid metric name");
        // Two proxies sharing a registry (tests) keep the first one's gauges.
        let _ = registry.register(Box::new(connected_gauge.clone()));
        let _ = registry.register(Box::new(leader_gauge.clone()));
        Arc::new(Fleet {
            cfg,
            rt: OnceLock::new(),
            client: Mutex::new(None),
            up: AtomicBool::new(false),
            down_since: Mutex::new(Some(SystemTime::now())),
            view: Mutex::new(View::default()),
            view_changed: tokio::sync::Notify::new(),
            revs: Mutex::new(HashMap::new()),
            errors: Mutex::new(HashMap::new()),
            baselines: Mutex::new(HashMap::new()),
            grown: Mutex::new(HashMap::new()),
            boot: fastrand::u64(..),
            leader: AtomicBool::new(false),
            resync: AtomicBool::new(false),
            lease: AtomicI64::new(0),
            connected_gauge,
            leader_gauge,
            #[cfg(feature = "test-util")]
            cas_delay: Mutex::new(Duration::ZERO),
        })
    }

    pub(crate) fn name(&self) -> &str {
        &self.cfg.name
    }

    fn key(&self, rest: &str) -> String {
        format!("{}{rest}", self.cfg.prefix)
    }

    fn desired_key(&self, upstream: &str) -> String {
        self.key(&format!("desired/{upstream}"))
    }

    fn applied_key(&self, upstream: &str) -> String {
        self.key(&format!("applied/{}/{upstream}", self.cfg.name))
    }

    /// Whether the link is up and in sync.
    pub(crate) fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// Whether this proxy runs the fleet's rollouts and automatic rollbacks now.
    pub(crate) fn is_leader(&self) -> bool {
        self.is_up() && self.leader.load(Ordering::Acquire)
    }

    fn set_up(&self, client: Client) {
        *lock(&self.client) = Some(Session(client));
        *lock(&self.down_since) = None;
        self.up.store(true, Ordering::Release);
        self.connected_gauge.set(1);
        tracing::info!(fleet = %self.cfg.prefix, name = %self.cfg.name, "fleet link up: following the desired state in etcd");
    }

    fn set_down(&self, why: &str) {
        let was_up = self.up.swap(false, Ordering::AcqRel);
        self.leader.store(false, Ordering::Release);
        self.leader_gauge.set(0);
        self.connected_gauge.set(0);
        *lock(&self.client) = None;
        {
            let mut d = lock(&self.down_since);
            if d.is_none() {
                *d = Some(SystemTime::now());
            }
        }
        if was_up {
            tracing::error!(fleet = %self.cfg.prefix, error = %why, "FLEET LINK DOWN: serving the last applied state; changes are refused until etcd is back");
        } else {
            tracing::warn!(fleet = %self.cfg.prefix, error = %why, "cannot reach the fleet's etcd; retrying");
        }
        self.view_changed.notify_waiters();
    }

    /// The fleet's desired state of `upstream` if it is newer than the one served here.
    pub(crate) fn newer_desired(&self, upstream: &str) -> Option<(i64, Desired)> {
        let served = self.served_revision(upstream);
        lock(&self.view)
            .desired
            .get(upstream)
            .filter(|(rev, _)| *rev > served)
            .cloned()
    }

    /// The fleet's desired state of `upstream`, as last seen.
    pub(crate) fn desired(&self, upstream: &str) -> Option<Desired> {
        lock(&self.view)
            .desired
            .get(upstream)
            .map(|(_, d)| d.clone())
    }

    /// Serve the desired state again at the next tick (after a config reload).
    pub(crate) fn resync(&self) {
        self.resync.store(true, Ordering::Release);
    }

    /// The revision of the desired state this proxy serves for `upstream` (0: none yet).
    pub(crate) fn served_revision(&self, upstream: &str) -> i64 {
        lock(&self.revs).get(upstream).copied().unwrap_or(0)
    }

    /// Record that `rev` is served here whatever was before (a seed: a new history).
    fn set_served(&self, upstream: &str, rev: i64) {
        lock(&self.revs).insert(upstream.to_string(), rev);
        lock(&self.errors).remove(upstream);
    }

    /// Record that the desired revision `rev` of `upstream` is served here.
    pub(crate) fn mark_served(&self, upstream: &str, rev: i64) {
        let mut revs = lock(&self.revs);
        let r = revs.entry(upstream.to_string()).or_insert(0);
        *r = (*r).max(rev);
        lock(&self.errors).remove(upstream);
    }

    /// Record why the desired state of `upstream` cannot be applied here (published, shown by
    /// `status --fleet`, and every local change of it refused until it applies). Whether the
    /// reason is new.
    pub(crate) fn mark_error(&self, upstream: &str, why: String) -> bool {
        lock(&self.errors).insert(upstream.to_string(), why.clone()) != Some(why)
    }

    /// Write `desired` as the new desired state of `upstream`, if etcd still holds the
    /// revision this proxy serves (compare-and-swap). Returns the new revision. Blocks the
    /// calling thread (never a runtime worker: changes run on the blocking pool or a caller's
    /// thread), bounded by [`OP_TIMEOUT`].
    pub(crate) fn write(&self, upstream: &str, desired: &Desired) -> Result<i64, ControlError> {
        if !self.is_up() {
            let since = lock(&self.down_since)
                .map(|t| humantime::format_rfc3339_seconds(t).to_string())
                .unwrap_or_default();
            return Err(unavailable(format!("link down since {since}")));
        }
        let (Some(Session(client)), Some(rt)) =
            (lock(&self.client).clone(), self.rt.get().cloned())
        else {
            return Err(unavailable("no session"));
        };
        if let Some(why) = lock(&self.errors).get(upstream) {
            return Err(ControlError::new(
                ErrorCode::Invalid,
                format!("not applied: this proxy cannot serve the fleet's desired state of {upstream} ({why}); fix its config (then `proxyctl reload`) or change the fleet from a proxy that can"),
            ));
        }
        let expected = self.served_revision(upstream);
        let key = self.desired_key(upstream);
        let value = serde_json::to_vec(desired).map_err(|e| {
            ControlError::new(
                ErrorCode::Internal,
                format!("cannot encode the desired state: {e}"),
            )
        })?;
        #[cfg(feature = "test-util")]
        let delay = *lock(&self.cas_delay);
        #[cfg(not(feature = "test-util"))]
        let delay = Duration::ZERO;
        let (tx, rx) = std::sync::mpsc::channel();
        rt.spawn(async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    key.clone(),
                    CompareOp::Equal,
                    expected,
                )])
                .and_then([TxnOp::put(key.clone(), value, None)])
                .or_else([TxnOp::get(key, None)]);
            let mut client = client;
            let r = tokio::time::timeout(OP_TIMEOUT, client.txn(txn)).await;
            let _ = tx.send(r);
        });
        // No answer in time: the write may have landed or not. Not "not applied" (it may
        // be) but a wait that ran out (exit 4): whatever etcd holds, every proxy follows.
        let unknown = || {
            ControlError::new(
                ErrorCode::Timeout,
                format!(
                    "outcome unknown: etcd did not answer within {}s, so this change may or may not have reached the fleet; every proxy follows whatever etcd holds (`proxyctl status --fleet` shows it)",
                    OP_TIMEOUT.as_secs()
                ),
            )
        };
        let answer = rx
            .recv_timeout(OP_TIMEOUT + delay + Duration::from_secs(1))
            .map_err(|_| unknown())?;
        let resp = match answer {
            Err(_) => return Err(unknown()),
            // Sent, and failed on the way ("leader changed", a reset): the proposal may still
            // be committed. Only a link known down before sending is "not applied".
            Ok(Err(e)) => {
                let mut e2 = unknown();
                e2.message = format!(
                    "outcome unknown: etcd answered with an error ({e}) after the change was sent, so it may or may not have reached the fleet; every proxy follows whatever etcd holds (`proxyctl status --fleet` shows it)"
                );
                return Err(e2);
            }
            Ok(Ok(r)) => r,
        };
        if resp.succeeded() {
            let rev = resp.header().map(|h| h.revision()).unwrap_or(0);
            return Ok(rev);
        }
        // Someone else wrote first: say who and what.
        let current = resp.op_responses().into_iter().find_map(|op| match op {
            TxnOpResponse::Get(g) => g.kvs().first().map(|kv| {
                (
                    kv.mod_revision(),
                    serde_json::from_slice::<Desired>(kv.value()).ok(),
                )
            }),
            _ => None,
        });
        let what = match current {
            Some((_, Some(d))) => format!(
                "generation {} ({}) written by {}",
                d.generation,
                crate::routing::weights::fmt_weights(&d.weights),
                if d.by.is_empty() { "?" } else { &d.by }
            ),
            Some((rev, None)) => format!("revision {rev}"),
            None => "a deletion of the desired state".into(),
        };
        Err(ControlError::new(
            ErrorCode::Conflict,
            format!("not applied: another change reached the fleet first ({what}); nothing was changed. Check `proxyctl status --fleet` and run the command again if it still makes sense"),
        ))
    }

    /// Instances of `upstream`'s `pool` that other live proxies do not see healthy: address ->
    /// "state from proxy" for each.
    pub(crate) fn down_elsewhere(
        &self,
        upstream: &str,
        pool: &str,
    ) -> BTreeMap<String, Vec<String>> {
        let view = lock(&self.view);
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for ((proxy, u), (a, _)) in &view.applied {
            if u != upstream || proxy == &self.cfg.name {
                continue;
            }
            for (d, state) in &a.down {
                if let Some(addr) = d.strip_prefix(pool).and_then(|r| r.strip_prefix('/')) {
                    out.entry(addr.to_string())
                        .or_default()
                        .push(format!("{state} from {proxy}"));
                }
            }
        }
        out
    }

    /// The other live proxies' cumulative counts for `upstream`'s `pool`, summed into `local`
    /// (the fleet-wide canary analysis).
    pub(crate) fn add_remote_counts(&self, upstream: &str, pool: &str, local: &mut Sample) {
        if let Some(c) = lock(&self.grown).get(&(upstream.to_string(), pool.to_string())) {
            c.add_to(local);
        }
    }

    /// Take in another proxy's published counts: add what grew since its last publication
    /// (same boot) to the fleet's sums; anything else only sets the baseline.
    fn take_counts(&self, proxy: &str, upstream: &str, a: Option<&Applied>) {
        let key = (proxy.to_string(), upstream.to_string());
        let mut baselines = lock(&self.baselines);
        let Some(a) = a.filter(|a| !a.counts.is_empty()) else {
            // Gone, or not publishing counts (no canary): the next counts start over.
            baselines.remove(&key);
            return;
        };
        if let Some((boot, old)) = baselines.get(&key) {
            if *boot == a.boot {
                let mut grown = lock(&self.grown);
                for (pool, now) in &a.counts {
                    if let Some(g) = old.get(pool).and_then(|o| now.growth(o)) {
                        grown
                            .entry((upstream.to_string(), pool.clone()))
                            .or_default()
                            .accumulate(&g);
                    }
                }
            }
        }
        baselines.insert(key, (a.boot, a.counts.clone()));
    }

    /// Wait until every live proxy reports `generation` (or a later one) of `upstream`, at
    /// most `timeout`. `Err(timeout)` names the proxies that did not; the change stands.
    pub(crate) async fn wait_applied(
        &self,
        upstream: &str,
        generation: u64,
        revision: i64,
        timeout: Duration,
    ) -> Result<Vec<FleetAck>, ControlError> {
        let start = Instant::now();
        let deadline = tokio::time::Instant::now() + timeout;
        let mut seen: BTreeMap<String, u64> = BTreeMap::new();
        loop {
            let changed = self.view_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let acks: Vec<FleetAck> = {
                let view = lock(&self.view);
                // A revision above the desired one is from another etcd history (a restored
                // cluster): it proves nothing.
                let desired_rev = view.desired.get(upstream).map_or(i64::MAX, |(r, _)| *r);
                view.applied
                    .iter()
                    .filter(|((_, u), _)| u == upstream)
                    .map(|((proxy, _), (a, _))| {
                        let applied = a.revision >= revision
                            && a.revision <= desired_rev
                            && a.error.is_none();
                        if applied {
                            seen.entry(proxy.clone())
                                .or_insert_with(|| start.elapsed().as_millis() as u64);
                        }
                        FleetAck {
                            name: proxy.clone(),
                            generation: a.generation,
                            applied,
                            after_ms: seen.get(proxy).copied(),
                        }
                    })
                    .collect()
            };
            let me_listed = acks.iter().any(|a| a.name == self.cfg.name);
            if me_listed && acks.iter().all(|a| a.applied) {
                return Ok(acks);
            }
            if tokio::time::Instant::now() >= deadline {
                let mut lagging: Vec<String> = acks
                    .iter()
                    .filter(|a| !a.applied)
                    .map(|a| {
                        let why = lock(&self.view)
                            .applied
                            .get(&(a.name.clone(), upstream.to_string()))
                            .and_then(|(r, _)| r.error.clone())
                            .map(|e| format!(": {e}"))
                            .unwrap_or_default();
                        format!("{} (at generation {}{why})", a.name, a.generation)
                    })
                    .collect();
                if !me_listed {
                    lagging.push(format!("{} (this proxy: not published yet)", self.cfg.name));
                }
                return Err(ControlError::new(
                    ErrorCode::Timeout,
                    format!(
                        "{upstream} generation {generation} is the fleet's desired state and applied here, but not reported within {} by: {}",
                        humantime::format_duration(timeout),
                        lagging.join(", ")
                    ),
                )
                .with_details(serde_json::to_value(&acks).unwrap_or_default()));
            }
            tokio::select! {
                _ = changed => {}
                _ = tokio::time::sleep_until(deadline) => {}
            }
        }
    }

    /// The fleet as this proxy sees it.
    pub(crate) fn status(&self) -> FleetStatus {
        let view = lock(&self.view).clone();
        let now = Instant::now();
        let mut names: BTreeSet<String> = view.members.clone();
        names.extend(view.applied.keys().map(|(p, _)| p.clone()));
        let proxies = names
            .into_iter()
            .map(|name| {
                let upstreams: Vec<FleetApplied> = view
                    .applied
                    .iter()
                    .filter(|((p, _), _)| *p == name)
                    .map(|((_, u), (a, at))| FleetApplied {
                        upstream: u.clone(),
                        generation: a.generation,
                        in_sync: a.error.is_none()
                            && view
                                .desired
                                .get(u)
                                .is_some_and(|(rev, _)| *rev == a.revision),
                        weights: a.weights.clone(),
                        unhealthy: a.down.iter().map(|(i, s)| format!("{i} ({s})")).collect(),
                        error: a.error.clone(),
                        age_ms: now.duration_since(*at).as_millis() as u64,
                    })
                    .collect();
                FleetProxy {
                    live: !upstreams.is_empty(),
                    name,
                    upstreams,
                }
            })
            .collect();
        FleetStatus {
            name: self.cfg.name.clone(),
            prefix: self.cfg.prefix.clone(),
            connected: self.is_up(),
            down_since: lock(&self.down_since)
                .map(|t| humantime::format_rfc3339_seconds(t).to_string()),
            leader: view.leader.clone(),
            desired: view
                .desired
                .iter()
                .map(|(u, (_, d))| FleetDesired {
                    upstream: u.clone(),
                    generation: d.generation,
                    weights: d.weights.clone(),
                })
                .collect(),
            proxies,
        }
    }

    /// Take in one key's new value (`None`: deleted). Returns a desired state to apply.
    fn observe(
        &self,
        key: &[u8],
        value: Option<&[u8]>,
        rev: i64,
    ) -> Option<(String, i64, Desired)> {
        let key = std::str::from_utf8(key).ok()?;
        let rest = key.strip_prefix(&self.cfg.prefix)?;
        let mut view = lock(&self.view);
        let mut apply = None;
        if let Some(u) = rest.strip_prefix("desired/") {
            match value.map(serde_json::from_slice::<Desired>) {
                Some(Ok(d)) => {
                    view.desired.insert(u.to_string(), (rev, d.clone()));
                    apply = Some((u.to_string(), rev, d));
                }
                Some(Err(e)) => {
                    tracing::error!(key, error = %e, "the fleet's desired state is not readable; ignored (this proxy keeps its state)");
                    view.desired.remove(u);
                }
                None => {
                    view.desired.remove(u);
                }
            }
        } else if let Some(pu) = rest.strip_prefix("applied/") {
            let (proxy, u) = pu.split_once('/')?;
            let k = (proxy.to_string(), u.to_string());
            match value.map(serde_json::from_slice::<Applied>) {
                Some(Ok(a)) => {
                    if proxy != self.cfg.name {
                        self.take_counts(proxy, u, Some(&a));
                    }
                    view.applied.insert(k, (a, Instant::now()));
                }
                Some(Err(_)) | None => {
                    self.take_counts(proxy, u, None);
                    view.applied.remove(&k);
                }
            }
        } else if let Some(m) = rest.strip_prefix("members/") {
            if value.is_some() {
                view.members.insert(m.to_string());
            } else {
                view.members.remove(m);
            }
        } else if rest == "leader" {
            view.leader = value
                .and_then(|v| std::str::from_utf8(v).ok())
                .map(str::to_string);
        }
        drop(view);
        self.view_changed.notify_waiters();
        apply
    }
}

/// Run the fleet link: sessions, one after the other, until the proxy shuts down (then the
/// lease is revoked, so the fleet stops counting this proxy at once, and this returns... never:
/// it waits for the runtime to stop).
pub(crate) async fn run(
    ctl: Arc<Controller>,
    fleet: Arc<Fleet>,
    mut stop: tokio::sync::watch::Receiver<bool>,
    mut handed_over: tokio::sync::watch::Receiver<Option<u32>>,
) {
    let _ = fleet.rt.set(tokio::runtime::Handle::current());
    let mut pause = Duration::from_millis(200);
    loop {
        let started = Instant::now();
        let why = tokio::select! {
            r = session(&ctl, &fleet) => match r {
                Ok(()) => "session ended".to_string(),
                Err(e) => e,
            },
            // Shutting down, or a new process took over (binary upgrade): it is this proxy in
            // the fleet from now on; this one only drains.
            _ = async {
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => {}
                    _ = handed_over.wait_for(|p| p.is_some()) => {}
                }
            } => {
                leave(&fleet).await;
                return std::future::pending().await;
            }
        };
        fleet.set_down(&why);
        if started.elapsed() > MAX_RETRY * 2 {
            pause = Duration::from_millis(200);
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(MAX_RETRY);
    }
}

/// Revoke the lease (what this proxy published and its leadership go with it) and stop
/// accepting changes.
pub(crate) async fn leave(fleet: &Fleet) {
    let client = lock(&fleet.client).clone();
    fleet.set_down("this proxy is shutting down");
    if let Some(Session(mut c)) = client {
        let lease = fleet.lease.load(Ordering::Acquire);
        let _ = op("leave", c.lease_revoke(lease)).await;
    }
}

async fn op<T, E: std::fmt::Display>(
    what: &str,
    f: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match tokio::time::timeout(OP_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!(
            "{what}: no answer within {}s",
            OP_TIMEOUT.as_secs()
        )),
    }
}

/// One session: connect, lease, read, watch, publish — until something fails.
async fn session(ctl: &Arc<Controller>, fleet: &Arc<Fleet>) -> Result<(), String> {
    let cfg = &fleet.cfg;
    let opts = ConnectOptions::new()
        .with_connect_timeout(OP_TIMEOUT)
        // HTTP/2 pings: a watch on a dead connection is noticed within ~2 s, not at the
        // kernel's TCP timeout.
        .with_keep_alive(Duration::from_secs(1), Duration::from_secs(2))
        .with_keep_alive_while_idle(true)
        // A member cut off from the majority answers nothing instead of stale data.
        .with_require_leader(true);
    let mut client = op("connect", Client::connect(&cfg.etcd, Some(opts))).await?;
    let ttl = i64::try_from(cfg.lease_ttl.as_secs()).unwrap_or(10).max(2);
    let lease = op("lease", client.lease_grant(ttl, None)).await?.id();
    let previous = fleet.lease.swap(lease, Ordering::AcqRel);
    if previous != 0 {
        // The last session's lease may still be alive (a short blip): revoke it, so its
        // leadership passes on now rather than after lease_ttl (its keys are re-published on
        // this lease below).
        let _ = op("revoke the previous lease", client.lease_revoke(previous)).await;
    }
    // The lease is kept alive by its own task: a session busy applying a change (waiting for
    // the writer lock, an fsync) must not let it expire.
    let (keeper, kept) = op("lease keep-alive", client.lease_keep_alive(lease)).await?;
    let keepalive = tokio::spawn(keep_alive(keeper, kept, cfg.lease_ttl));
    let _stop_keepalive = AbortOnDrop(keepalive.abort_handle());
    op(
        "join",
        client.put(
            fleet.key(&format!("members/{}", cfg.name)),
            cfg.name.clone(),
            None,
        ),
    )
    .await?;
    // Everything under the prefix, then a watch from the next revision: nothing falls between.
    let all = op(
        "read",
        client.get(cfg.prefix.clone(), Some(GetOptions::new().with_prefix())),
    )
    .await?;
    let rev = all.header().map(|h| h.revision()).unwrap_or(0);
    {
        // Revisions never go back in one etcd cluster: a lower one is another (restored or
        // recreated) cluster, whose state is the fleet's now.
        let mut revs = lock(&fleet.revs);
        if revs.values().any(|served| *served > rev) {
            tracing::warn!(revision = rev, "etcd's revision is below the one this proxy serves: etcd was restored or recreated; following it");
            revs.clear();
        }
    }
    *lock(&fleet.view) = View::default();
    lock(&fleet.baselines).clear();
    let mut pending: BTreeMap<String, (i64, Desired)> = BTreeMap::new();
    for kv in all.kvs() {
        if let Some((u, rev, d)) = fleet.observe(kv.key(), Some(kv.value()), kv.mod_revision()) {
            pending.insert(u, (rev, d));
        }
    }
    for (u, (rev, _)) in &pending {
        if *rev < fleet.served_revision(u) {
            tracing::warn!(upstream = %u, revision = rev, served = fleet.served_revision(u), "the fleet's desired state has an older revision than the one served: etcd was restored; following it");
            lock(&fleet.revs).insert(u.clone(), 0);
        }
    }
    let (_watcher, mut stream) = op(
        "watch",
        client.watch(
            cfg.prefix.clone(),
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(rev + 1),
            ),
        ),
    )
    .await?;
    // Upstreams without a desired state: this proxy's state becomes the fleet's (the first
    // proxy of a new fleet), unless another proxy is faster.
    for u in local_upstreams(ctl) {
        if !pending.contains_key(&u) {
            seed(ctl, fleet, &mut client, &u).await?;
        }
    }
    // Registered before the first publication: nothing that happens from here is missed, and
    // renewed only when they fire.
    let mut changed = Box::pin(ctl.shared.changed());
    changed.as_mut().enable();
    let mut health = Box::pin(ctl.shared.health_changed());
    health.as_mut().enable();
    retry(ctl, fleet, &mut pending).await;
    fleet.set_up(client.clone());
    campaign(fleet, &mut client, lease).await?;
    let mut published: BTreeMap<String, Applied> = BTreeMap::new();
    publish(ctl, fleet, &mut client, lease, &mut published, true).await?;

    let mut tick = tokio::time::interval(PUBLISH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut keepalive = keepalive;
    loop {
        tokio::select! {
            msg = stream.message() => {
                let resp = match msg {
                    Ok(Some(r)) => r,
                    Ok(None) => return Err("the watch ended".into()),
                    Err(e) => return Err(format!("watch: {e}")),
                };
                if resp.canceled() {
                    return Err(format!("watch canceled: {}", resp.cancel_reason()));
                }
                let (mut leader_gone, mut reseed) = (false, Vec::new());
                for ev in resp.events() {
                    let Some(kv) = ev.kv() else { continue };
                    let value = (ev.event_type() == EventType::Put).then(|| kv.value());
                    if value.is_none() {
                        let key = kv.key_str().unwrap_or_default();
                        if key == fleet.key("leader") {
                            leader_gone = true;
                        } else if let Some(u) = key.strip_prefix(&fleet.key("desired/")) {
                            reseed.push(u.to_string());
                        } else if let Some(u) = key.strip_prefix(&fleet.key(&format!("applied/{}/", cfg.name))) {
                            // Gone with another lease (the previous process of an upgrade
                            // revoking its own): publish again.
                            published.remove(u);
                        }
                    }
                    if let Some((u, rev, d)) = fleet.observe(kv.key(), value, kv.mod_revision()) {
                        pending.insert(u, (rev, d));
                    }
                }
                let known = local_upstreams(ctl);
                for u in reseed.iter().filter(|u| known.contains(u)) {
                    pending.remove(u);
                    tracing::warn!(upstream = %u, "the fleet's desired state was deleted; seeding it again with this proxy's");
                    seed(ctl, fleet, &mut client, u).await?;
                }
                retry(ctl, fleet, &mut pending).await;
                publish(ctl, fleet, &mut client, lease, &mut published, false).await?;
                if leader_gone {
                    campaign(fleet, &mut client, lease).await?;
                }
            }
            ended = &mut keepalive => {
                return Err(match ended {
                    Ok(why) => why,
                    Err(e) => format!("lease keep-alive: {e}"),
                });
            }
            _ = tick.tick() => {
                if fleet.resync.swap(false, Ordering::AcqRel) {
                    // After a reload: serve the desired state again on the new config. What
                    // does not fit now is an error like any (published, retried, blocking
                    // local changes): the served revision is lowered so it is retried.
                    let desired = lock(&fleet.view).desired.clone();
                    let known = local_upstreams(ctl);
                    for (u, (rev, d)) in desired {
                        if !known.contains(&u) {
                            continue;
                        }
                        let (u2, d2) = (u.clone(), d.clone());
                        if let Err(e) = ctl.off_runtime(move |c| c.apply_desired(&u2, rev, &d2, true)).await {
                            if e.code != ErrorCode::Busy && e.code != ErrorCode::Internal {
                                fleet.mark_error(&u, e.message);
                            }
                            lock(&fleet.revs).insert(u.clone(), rev - 1);
                            pending.insert(u, (rev, d));
                        }
                    }
                }
                // Desired states not applied yet (an upgrade holds the state, the state file
                // cannot be written, the config does not fit) are tried again.
                retry(ctl, fleet, &mut pending).await;
                publish(ctl, fleet, &mut client, lease, &mut published, false).await?;
            }
            _ = &mut changed => {
                changed = Box::pin(ctl.shared.changed());
                changed.as_mut().enable();
                // Also wakes when an upgrade's hold ends: what waited is applied now.
                retry(ctl, fleet, &mut pending).await;
                publish(ctl, fleet, &mut client, lease, &mut published, false).await?;
            }
            _ = &mut health => {
                health = Box::pin(ctl.shared.health_changed());
                health.as_mut().enable();
                publish(ctl, fleet, &mut client, lease, &mut published, false).await?;
            }
        }
    }
}

/// The upstreams of this proxy's config now.
fn local_upstreams(ctl: &Controller) -> Vec<String> {
    ctl.shared
        .load()
        .upstreams
        .iter()
        .map(|u| u.name().to_string())
        .collect()
}

/// Aborts a task when dropped (the session's keep-alive ends with the session).
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Keep the lease alive every third of its TTL; returns why it could not (the session ends).
async fn keep_alive(
    mut keeper: etcd_client::LeaseKeeper,
    mut kept: etcd_client::LeaseKeepAliveStream,
    ttl: Duration,
) -> String {
    // Every sixth of the TTL; two thirds of it without an answer ends the session (and the
    // leadership) well before etcd lets the lease go, so two leaders do not overlap.
    let mut every = tokio::time::interval(ttl / 6);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_answer = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = every.tick() => {
                if last_answer.elapsed() >= ttl * 2 / 3 {
                    return format!("no lease keep-alive answer for {}: the lease has expired", humantime::format_duration(ttl));
                }
                if let Err(e) = op("lease keep-alive", keeper.keep_alive()).await {
                    return e;
                }
            }
            answer = kept.message() => match answer {
                Ok(Some(r)) if r.ttl() > 0 => last_answer = tokio::time::Instant::now(),
                Ok(Some(_)) => return "the lease expired (this proxy was silent longer than lease_ttl)".into(),
                Ok(None) => return "the lease keep-alive stream ended".into(),
                Err(e) => return format!("lease keep-alive: {e}"),
            },
        }
    }
}

/// Make this proxy's state of `upstream` the fleet's desired state if there is none (a
/// create-only transaction: another proxy may be first; its state then comes by the watch).
async fn seed(
    ctl: &Controller,
    fleet: &Fleet,
    client: &mut Client,
    upstream: &str,
) -> Result<(), String> {
    let snap = ctl.shared.load();
    let Some(u) = snap.upstream(upstream) else {
        return Ok(());
    };
    let d = Desired::from_state(u, &fleet.cfg.name);
    let key = fleet.desired_key(upstream);
    let value = serde_json::to_vec(&d).map_err(|e| e.to_string())?;
    let txn = Txn::new()
        .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
        .and_then([TxnOp::put(key, value, None)]);
    let r = op("seed", client.txn(txn)).await?;
    if r.succeeded() {
        let rev = r.header().map(|h| h.revision()).unwrap_or(0);
        fleet.set_served(upstream, rev);
        tracing::info!(
            upstream,
            generation = u.generation,
            "the fleet had no desired state for this upstream: seeded it with this proxy's"
        );
    }
    Ok(())
}

/// Apply what is pending; what cannot be applied now stays pending.
async fn retry(
    ctl: &Arc<Controller>,
    fleet: &Arc<Fleet>,
    pending: &mut BTreeMap<String, (i64, Desired)>,
) {
    for (u, (rev, d)) in std::mem::take(pending) {
        if !apply(ctl, fleet, &u, rev, d.clone()).await {
            pending.insert(u, (rev, d));
        }
    }
}

/// Apply a desired state through the controller (writer lock, state file). `false`: not
/// applied (an upgrade holds the state, the state file cannot be written, or it does not fit
/// this proxy's config — then the reason is published and local changes are refused); try
/// again later.
async fn apply(
    ctl: &Arc<Controller>,
    fleet: &Arc<Fleet>,
    upstream: &str,
    rev: i64,
    d: Desired,
) -> bool {
    if rev <= fleet.served_revision(upstream) {
        return true;
    }
    if !local_upstreams(ctl).iter().any(|u| u == upstream) {
        // An upstream only other proxies have (a config rolled out to them first): not
        // this proxy's business until a reload adds it.
        return true;
    }
    let u = upstream.to_string();
    match ctl
        .off_runtime(move |c| c.apply_desired(&u, rev, &d, false))
        .await
    {
        Ok(()) => true,
        Err(e) if e.code == ErrorCode::Busy || e.code == ErrorCode::Internal => {
            tracing::debug!(upstream, error = %e.message, "the fleet's desired state waits");
            false
        }
        Err(e) => {
            if fleet.mark_error(upstream, e.message.clone()) {
                tracing::error!(upstream, revision = rev, error = %e.message, "CANNOT APPLY THE FLEET'S DESIRED STATE: this proxy keeps its state, reports the error and refuses changes of this upstream until it can");
            }
            false
        }
    }
}

/// Become the leader if there is none: create the `leader` key on this proxy's lease.
async fn campaign(fleet: &Fleet, client: &mut Client, lease: i64) -> Result<(), String> {
    let key = fleet.key("leader");
    let txn = Txn::new()
        .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
        .and_then([TxnOp::put(
            key.clone(),
            fleet.cfg.name.clone(),
            Some(PutOptions::new().with_lease(lease)),
        )])
        .or_else([TxnOp::get(key, None)]);
    let r = op("election", client.txn(txn)).await?;
    let mine = if r.succeeded() {
        true
    } else {
        r.op_responses().into_iter().any(|op| match op {
            TxnOpResponse::Get(g) => g.kvs().first().is_some_and(|kv| kv.lease() == lease),
            _ => false,
        })
    };
    if mine && !fleet.leader.swap(true, Ordering::AcqRel) {
        tracing::info!(name = %fleet.cfg.name, "this proxy is the fleet's leader: it runs rollouts and automatic rollbacks");
    }
    fleet.leader.store(mine, Ordering::Release);
    fleet.leader_gauge.set(i64::from(mine));
    Ok(())
}

/// Publish what this proxy serves, per upstream, on its lease — when it changed (generation,
/// revision, health, error), and every second with the counts while the upstream has a canary
/// (the fleet's analysis needs them); otherwise the lease alone says this proxy is alive, and
/// etcd's history does not grow by a write per proxy per second.
async fn publish(
    ctl: &Controller,
    fleet: &Fleet,
    client: &mut Client,
    lease: i64,
    published: &mut BTreeMap<String, Applied>,
    all: bool,
) -> Result<(), String> {
    // Revisions before the snapshot: a change committed in between is published with its old
    // revision (acks wait for the next publication), never a new revision with old weights.
    let revs = lock(&fleet.revs).clone();
    let errors = lock(&fleet.errors).clone();
    let snap = ctl.shared.load();
    for u in &snap.upstreams {
        let canary = u.canary_active() || u.rollout.as_ref().is_some_and(|r| r.is_live());
        let a = Applied::of(
            u,
            revs.get(u.name()).copied().unwrap_or(0),
            fleet.boot,
            errors.get(u.name()).cloned(),
            canary,
        );
        let same = published.get(u.name()).is_some_and(|p| {
            p.generation == a.generation
                && p.revision == a.revision
                && p.down == a.down
                && p.error == a.error
                && p.weights == a.weights
        });
        if same && !canary && !all {
            continue;
        }
        let value = serde_json::to_vec(&a).map_err(|e| e.to_string())?;
        op(
            "publish",
            client.put(
                fleet.applied_key(u.name()),
                value,
                Some(PutOptions::new().with_lease(lease)),
            ),
        )
        .await?;
        published.insert(u.name().to_string(), a);
    }
    Ok(())
}
