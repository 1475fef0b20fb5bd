//! The autopilot: the one task that changes routing without a human (SPEC §3 `canary`).
//!
//! Every tick (at most a second) it copies every pool's request counters (a few hundred
//! relaxed loads; the request path is not touched), keeps one copy per bucket (a sixth of the
//! analysis window, at least 50 ms: seven copies whatever the window) for a window's length,
//! and subtracts the oldest kept copy from the current one: the pool's requests, 5xx answers
//! and p99 over the last window. A pool's copies start over when it gets weight again or a new
//! rollout starts, so a canary fixed and tried again is not judged on its last run's errors.
//! Then, per upstream:
//!
//! - the canary — the pool a live rollout is rolling out, else every pool with weight other
//!   than the base (the one that last had all the traffic) — is judged
//!   (`canary::analysis`); bad for `for` without a healthy verdict in between (a window with
//!   too few requests is no verdict either way), with `auto_rollback` on, it goes to 0 in one
//!   change, its rollout ends as rolled back, and the numbers go to the audit trail, `status`
//!   and `switchyard_rollbacks_total`;
//! - a running rollout whose step time is over advances to the next step if the canary passes
//!   the health gate and the analysis; otherwise it stays and says why ("waiting for traffic:
//!   7 of 20 requests").
//!
//! Changes go through the controller like any command (persisted before they take effect),
//! and only if the upstream is still at the generation they were decided on. A change that
//! fails (the state file cannot be written) is retried with a growing pause, and said at most
//! every 30 s. The live numbers and the reasons are published in [`Observations`] for `status`
//! and for `canary --wait`.

use super::Controller;
use crate::canary::analysis::{judge, pct, Reason, Verdict, Window};
use crate::canary::rollout::{unix_ms, Phase};
use crate::upstream::stats::Sample;
use crate::upstream::{Pool, UpstreamState};
use arc_swap::ArcSwap;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};
use switchyard_control::protocol::{LiveStats, RollbackInfo};

/// Shortest bucket (a sixth of the window, at least this) and shortest tick.
const MIN_TICK: Duration = Duration::from_millis(50);
/// Longest time between two looks: a canary going bad is seen within a second of having
/// enough requests, whatever the bucket.
const MAX_TICK: Duration = Duration::from_secs(1);
/// Longest pause after a change that could not be applied.
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// How often a change that keeps failing is said.
const WARN_EVERY: Duration = Duration::from_secs(30);

/// What the autopilot measured last, per upstream.
#[derive(Debug, Default)]
pub(crate) struct Observations {
    current: ArcSwap<BTreeMap<String, Observed>>,
    changed: tokio::sync::Notify,
}

/// One upstream's measurements.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Observed {
    /// Pool name -> its numbers over the window.
    pub(crate) pools: BTreeMap<String, LiveStats>,
    /// Why the running rollout (by id) does not take its next step now.
    pub(crate) waiting: Option<(u64, String)>,
}

impl Observations {
    /// The last measurements.
    pub(crate) fn get(&self) -> Arc<BTreeMap<String, Observed>> {
        self.current.load_full()
    }

    /// Resolves when a new reason to wait is published (create before reading).
    pub(crate) fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.changed.notified()
    }

    fn publish(&self, next: BTreeMap<String, Observed>) {
        let waiting = |m: &BTreeMap<String, Observed>| -> Vec<Option<(u64, String)>> {
            m.values().map(|o| o.waiting.clone()).collect()
        };
        let moved = waiting(&self.current.load()) != waiting(&next);
        self.current.store(Arc::new(next));
        if moved {
            self.changed.notify_waiters();
        }
    }
}

/// One pool's samples.
#[derive(Debug)]
struct Track {
    /// The pool sampled (a reload may replace a pool of the same name: start over then).
    pool: Arc<Pool>,
    /// One sample per bucket, oldest first, covering a window.
    samples: VecDeque<(Instant, Sample)>,
    /// Since when the pool, as a canary, has been judged bad without a healthy verdict.
    bad_since: Option<Instant>,
    /// The last bad verdict (a gap of a window without one restarts `bad_since`).
    last_bad: Option<Instant>,
    /// Whether the pool had weight at the last look.
    weighted: bool,
    /// The pool's epoch at the last look (bumped whenever it loses all its weight, so a
    /// 0 and back between two looks is still seen).
    epoch: u64,
    /// The live rollout of this pool at the last look.
    rollout: Option<u64>,
}

impl Track {
    fn new(pool: Arc<Pool>) -> Self {
        Track {
            pool,
            samples: VecDeque::new(),
            bad_since: None,
            last_bad: None,
            weighted: false,
            epoch: 0,
            rollout: None,
        }
    }

    /// Forget the verdicts (the pool is no canary now).
    fn start_over_verdicts(&mut self) {
        self.bad_since = None;
        self.last_bad = None;
    }

    /// Forget the samples and the verdicts: the pool starts a new run as a canary.
    fn start_over(&mut self) {
        self.samples.clear();
        self.bad_since = None;
        self.last_bad = None;
    }

    /// Take a verdict into account; the time the pool has been bad, if it is.
    fn judge(
        &mut self,
        bad: bool,
        healthy: bool,
        now: Instant,
        window: Duration,
    ) -> Option<Duration> {
        if healthy {
            self.bad_since = None;
            self.last_bad = None;
            return None;
        }
        if !bad {
            // Too few requests: no verdict, the clock neither stops nor restarts...
            return None;
        }
        // ... unless there was no bad verdict for a whole window.
        if self.last_bad.is_none_or(|l| now.duration_since(l) > window) {
            self.bad_since = Some(now);
        }
        self.last_bad = Some(now);
        self.bad_since.map(|since| now.duration_since(since))
    }

    /// Record this tick's sample (at most one per `bucket`) and return the numbers since the
    /// oldest sample within `window`.
    fn window(
        &mut self,
        current: Sample,
        now: Instant,
        window: Duration,
        bucket: Duration,
    ) -> Window {
        let due = self
            .samples
            .back()
            .is_none_or(|(t, _)| now.duration_since(*t) + MIN_TICK / 2 >= bucket);
        if due {
            self.samples.push_back((now, current.clone()));
        }
        while self
            .samples
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > window)
        {
            self.samples.pop_front();
        }
        let Some((since, oldest)) = self.samples.front() else {
            return Window::default();
        };
        let d = current.since(oldest);
        Window {
            requests: d.requests,
            errors: d.errors,
            p99: d.quantile(0.99),
            span: now.duration_since(*since),
        }
    }
}

/// A change the autopilot decided.
#[derive(Debug)]
enum Action {
    Rollback {
        upstream: String,
        /// The generation the decision was made on.
        generation: u64,
        info: RollbackInfo,
        reason: Reason,
    },
    Advance {
        upstream: String,
        /// The generation the analysis saw: a change since (pause and resume, a pool
        /// command) means the decision is stale.
        generation: u64,
        rollout: u64,
        from_step: usize,
    },
}

/// Run until the runtime stops.
pub(crate) async fn run(ctl: Arc<Controller>) {
    let mut tracks: HashMap<(String, String), Track> = HashMap::new();
    let mut failures: u32 = 0;
    let mut last_warn: Option<Instant> = None;
    loop {
        let changed = ctl.shared.changed();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let (actions, tick) = observe(&ctl, &mut tracks, Instant::now());
        let (mut applied, mut failed) = (false, false);
        for action in actions {
            match ctl.off_runtime(move |c| c.autopilot_act(action)).await {
                Ok(changed) => applied |= changed,
                // A binary upgrade is handing the state over: the change waits (and the
                // successor's autopilot takes it up if this process goes away).
                Err(e) if e.code == switchyard_control::ErrorCode::Busy => {
                    tracing::debug!(error = %e.message, "the autopilot waits for an upgrade");
                    failed = true;
                }
                Err(e) => {
                    failed = true;
                    if last_warn.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
                        last_warn = Some(Instant::now());
                        tracing::error!(error = %e.message, "the autopilot's change was not applied; retrying");
                    }
                }
            }
        }
        let pause = if failed {
            failures = failures.saturating_add(1);
            (MAX_TICK * failures).min(MAX_BACKOFF)
        } else {
            failures = 0;
            if applied {
                // Look again at once, at the state the change made.
                continue;
            }
            tick
        };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = changed, if !failed => {}
        }
    }
}

/// One look at every upstream: sample, judge, publish. Returns the changes to make and the
/// time until the next look.
fn observe(
    ctl: &Controller,
    tracks: &mut HashMap<(String, String), Track>,
    now: Instant,
) -> (Vec<Action>, Duration) {
    let snap = ctl.shared.load();
    let wall = unix_ms();
    let mut tick = MAX_TICK;
    let mut actions = Vec::new();
    let mut view = BTreeMap::new();
    let mut seen = std::collections::HashSet::new();
    for u in &snap.upstreams {
        let a = &u.config.canary.analysis;
        let bucket = (a.window / 6).max(MIN_TICK);
        tick = tick.min(bucket);
        let live_rollout = u.rollout.as_ref().filter(|r| r.is_live());
        let windows: Vec<Window> = u
            .pools
            .iter()
            .map(|p| {
                let key = (u.name().to_string(), p.pool.name.clone());
                seen.insert(key.clone());
                let t = tracks
                    .entry(key)
                    .or_insert_with(|| Track::new(p.pool.clone()));
                if !Arc::ptr_eq(&t.pool, &p.pool) {
                    *t = Track::new(p.pool.clone());
                }
                let weighted = p.weight > 0;
                let rollout = live_rollout.filter(|r| r.pool == p.pool.name).map(|r| r.id);
                // Judged afresh when it regains weight — also when it went to 0 and back
                // between two looks (the epoch moved) — or a new rollout of it begins.
                let regained = weighted && (!t.weighted || p.epoch != t.epoch);
                if regained || (rollout.is_some() && rollout != t.rollout) {
                    t.start_over();
                }
                t.weighted = weighted;
                t.epoch = p.epoch;
                t.rollout = rollout;
                // In a fleet, the pool's counts on every live proxy: a canary failing only
                // behind one proxy is judged on the fleet's traffic.
                let mut current = p.pool.stats.sample();
                if let Some(f) = &ctl.fleet {
                    f.add_remote_counts(u.name(), &p.pool.name, &mut current);
                }
                t.window(current, now, a.window, bucket)
            })
            .collect();
        let mut obs = Observed::default();
        let canaries = canaries(u);
        let mut verdicts: BTreeMap<usize, Verdict> = BTreeMap::new();
        for (i, p) in u.pools.iter().enumerate() {
            let w = windows[i];
            let mut live = LiveStats {
                window_ms: millis(w.span),
                requests: w.requests,
                rate: w.rate(),
                errors: w.errors,
                error_ratio: w.ratio(),
                p99_ms: w.p99.map(|d| d.as_secs_f64() * 1000.0),
                verdict: None,
                bad_for_ms: None,
            };
            let key = (u.name().to_string(), p.pool.name.clone());
            let Some(t) = tracks.get_mut(&key) else {
                continue;
            };
            if !canaries.contains(&i) {
                t.start_over_verdicts();
                obs.pools.insert(p.pool.name.clone(), live);
                continue;
            }
            let reference = windows[reference_pool(u, i)];
            let verdict = judge(a, &w, &reference);
            live.verdict = Some(describe(&verdict));
            let bad = matches!(verdict, Verdict::Bad { .. });
            let held = t.judge(bad, verdict == Verdict::Healthy, now, a.window);
            if let (Verdict::Bad { reason, detail }, Some(held)) = (&verdict, held) {
                live.bad_for_ms = Some(millis(held));
                if u.config.canary.auto_rollback {
                    if held >= a.hold_for {
                        actions.push(Action::Rollback {
                            upstream: u.name().to_string(),
                            generation: u.generation,
                            reason: *reason,
                            info: RollbackInfo {
                                pool: p.pool.name.clone(),
                                weight: p.weight,
                                reason: reason.label().to_string(),
                                detail: format!("{detail} for {}", humantime_ms(held)),
                                at: humantime::format_rfc3339_millis(std::time::SystemTime::now())
                                    .to_string(),
                                requests: w.requests,
                                errors: w.errors,
                                error_ratio: w.ratio(),
                                main_error_ratio: reference.ratio(),
                                p99_ms: w.p99.map(|d| d.as_secs_f64() * 1000.0),
                                window_ms: millis(w.span),
                                bad_for_ms: millis(held),
                            },
                        });
                    } else {
                        tick = tick.min((a.hold_for - held).max(MIN_TICK));
                    }
                }
            }
            verdicts.insert(i, verdict);
            obs.pools.insert(p.pool.name.clone(), live);
        }
        // The running rollout: its next step, or why not yet.
        if let Some(r) = u.rollout.as_ref().filter(|r| r.is_live()) {
            if let (Phase::Running { .. }, Some(i)) = (&r.phase, u.pool_index(&r.pool)) {
                if !r.due(wall) {
                    let left = r.left_ms(wall).unwrap_or(0);
                    tick = tick.min(Duration::from_millis(left).max(MIN_TICK));
                } else {
                    let why = match (ctl.gate(u, &r.pool, r.min_healthy), verdicts.get(&i)) {
                        (Err(e), _) => Some(format!(
                            "waiting for health: {}",
                            e.message.lines().next().unwrap_or_default()
                        )),
                        (Ok(()), Some(Verdict::TooFew { have, need })) => {
                            Some(format!("waiting for traffic: {have} of {need} requests"))
                        }
                        (Ok(()), Some(Verdict::Bad { detail, .. })) => {
                            Some(format!("holding: {detail}"))
                        }
                        (Ok(()), Some(Verdict::Healthy)) => {
                            actions.push(Action::Advance {
                                upstream: u.name().to_string(),
                                generation: u.generation,
                                rollout: r.id,
                                from_step: r.step,
                            });
                            None
                        }
                        (Ok(()), None) => Some("waiting: the pool has no weight".into()),
                    };
                    obs.waiting = why.map(|w| (r.id, w));
                }
            }
        }
        view.insert(u.name().to_string(), obs);
    }
    tracks.retain(|k, _| seen.contains(k));
    ctl.observed.publish(view);
    if ctl.fleet.as_ref().is_some_and(|f| !f.is_leader()) {
        // One proxy of a fleet decides (SPEC §9): the elected one. The others measure (for
        // `status`) and follow the desired state it writes.
        actions.clear();
    }
    (actions, tick)
}

/// The pools judged as canaries: every pool with weight other than the base (also after a
/// plain `proxyctl weight green 5`; past 50 % the canary is still the new version, see
/// `routing::decide`), and the pool of a live rollout while it has weight.
fn canaries(u: &UpstreamState) -> Vec<usize> {
    let rollout = u
        .rollout
        .as_ref()
        .filter(|r| r.is_live())
        .and_then(|r| u.pool_index(&r.pool));
    (0..u.pools.len())
        .filter(|i| u.pools[*i].weight > 0 && (*i != u.base() || Some(*i) == rollout))
        .collect()
}

/// What a canary is compared with (`relative_to_main`): the base pool, or — when the canary
/// is the base itself — the heaviest other pool.
fn reference_pool(u: &UpstreamState, canary: usize) -> usize {
    if canary != u.base() {
        return u.base();
    }
    (0..u.pools.len())
        .filter(|i| *i != canary)
        .max_by_key(|i| u.pools[*i].weight)
        .unwrap_or(canary)
}

fn describe(v: &Verdict) -> String {
    match v {
        Verdict::TooFew { have, need } => format!("too few requests: {have} of {need}"),
        Verdict::Healthy => "healthy".into(),
        Verdict::Bad { detail, .. } => format!("bad: {detail}"),
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// `2m`, `1.5s`.
fn humantime_ms(d: Duration) -> String {
    if d.as_secs() >= 60 && d.as_secs().is_multiple_of(60) {
        format!("{}m", d.as_secs() / 60)
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

impl Controller {
    /// Carry out a change the autopilot decided; whether anything changed.
    fn autopilot_act(&self, action: Action) -> Result<bool, switchyard_control::ControlError> {
        match action {
            Action::Rollback {
                upstream,
                generation,
                info,
                reason,
            } => {
                let pool = info.pool.clone();
                let ratio = pct(info.error_ratio);
                let change = self.auto_rollback(&upstream, generation, info)?;
                if change.changed {
                    self.metrics
                        .rollbacks
                        .with_label_values(&[upstream.as_str(), reason.label()])
                        .inc();
                    tracing::warn!(upstream = %upstream, pool = %pool, reason = reason.label(), error_ratio = %ratio, generation = change.generation, "canary rolled back automatically");
                }
                Ok(change.changed)
            }
            Action::Advance {
                upstream,
                generation,
                rollout,
                from_step,
            } => self
                .rollout_advance(&upstream, generation, rollout, from_step)
                .map(|c| c.changed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_covers_the_last_window_of_samples() {
        let pool = Arc::new(Pool::new("green"));
        let mut t = Track::new(pool.clone());
        let start = Instant::now();
        let bucket = Duration::from_millis(100);
        let window = Duration::from_millis(600);
        // 10 requests per 100 ms, the first 300 ms all 500s, then all 200s.
        let mut last = Window::default();
        for step in 0..20u32 {
            let now = start + bucket * step;
            for _ in 0..10 {
                let status = if step < 3 { 500 } else { 200 };
                pool.stats.observe(
                    status,
                    Duration::from_millis(2),
                    Some(Duration::from_millis(2)),
                );
            }
            last = t.window(pool.stats.sample(), now, window, bucket);
            if step == 2 {
                assert_eq!(
                    (last.requests, last.errors),
                    (20, 20),
                    "since the first sample"
                );
                assert_eq!(last.span, bucket * 2);
            }
        }
        // At the end the window holds the last 600 ms: 60 requests, no errors.
        assert_eq!(last.span, window);
        assert_eq!((last.requests, last.errors), (60, 0));
        assert!(t.samples.len() <= 7);
    }

    #[test]
    fn the_bad_clock_survives_too_few_requests_but_not_a_healthy_verdict_or_a_gap() {
        let mut t = Track::new(Arc::new(Pool::new("green")));
        let t0 = Instant::now();
        let window = Duration::from_secs(3);
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        assert_eq!(t.judge(true, false, at(0), window), Some(Duration::ZERO));
        assert_eq!(
            t.judge(true, false, at(500), window),
            Some(Duration::from_millis(500))
        );
        // Too few requests for a while: no verdict, the clock keeps running.
        assert_eq!(t.judge(false, false, at(1000), window), None);
        assert_eq!(
            t.judge(true, false, at(1500), window),
            Some(Duration::from_millis(1500))
        );
        // A healthy verdict stops it.
        assert_eq!(t.judge(false, true, at(2000), window), None);
        assert_eq!(t.judge(true, false, at(2500), window), Some(Duration::ZERO));
        // More than a window without a bad verdict (too few requests all along): it restarts.
        assert_eq!(t.judge(false, false, at(4000), window), None);
        assert_eq!(t.judge(true, false, at(6000), window), Some(Duration::ZERO));
        // Starting over (the pool regained weight) forgets the samples and the clock.
        let sample = t.pool.stats.sample();
        t.samples.push_back((at(6000), sample));
        t.start_over();
        assert!(t.samples.is_empty() && t.bad_since.is_none() && t.last_bad.is_none());
    }
}
