//! Canary releases (issue 11, SPEC §3 `canary`/`preview`, §4 decision order and invariant 5,
//! §5 `proxyctl canary`): the split over real requests, cookie stickiness while the canary
//! grows, `X-Canary`, the preview header, automatic rollback under load, progressive rollouts
//! to 100 and across a restart, and what `--wait` answers.

use bytes::Bytes;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use switchyard_control::protocol::{CanaryResult, ErrorCode, Event};
use switchyard_control::Request;
use switchyard_proxy::demo::upstream::Mode;
use switchyard_tests::*;

fn color(r: &Reply) -> String {
    r.json()["color"].as_str().unwrap_or("?").to_string()
}

fn weight(px: &TestProxy, pool: &str) -> u32 {
    px.handle().status().upstream("app").unwrap().weights[pool]
}

/// Poll (bounded by `limit`) until green's weight is 0: the automatic rollback happened.
async fn wait_rolled_back(px: &TestProxy, limit: Duration) {
    let deadline = Instant::now() + limit;
    while weight(px, "green") != 0 {
        assert!(
            Instant::now() < deadline,
            "never rolled back within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Latency alone judges the canary: `error_rate` 1.0 is never exceeded.
const LATENCY_ONLY: &str = "    canary:\n      sticky: none\n      auto_rollback: {error_rate: 1.0, latency_p99: 100ms, for: 1s, window: 3s, min_requests: 5}\n";

/// The live numbers `status` shows for `pool` of `app`.
fn live(px: &TestProxy, pool: &str) -> switchyard_control::protocol::LiveStats {
    let st = px.handle().status();
    let p = st.upstream("app").and_then(|u| u.pool(pool)).cloned();
    p.and_then(|p| p.live)
        .unwrap_or_else(|| panic!("no live numbers for {pool}"))
}

/// `Set-Cookie` value of the sticky cookie, if the response has one.
fn sticky_cookie(r: &Reply) -> Option<String> {
    r.headers
        .get_all(http::header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with("switchyard_pool="))
        .map(str::to_string)
}

/// Keep `clients` keep-alive connections busy with `GET /` until stopped; counts answers by
/// color and status.
struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    sent: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
}

impl Load {
    fn start(addr: std::net::SocketAddr, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let tasks = (0..clients)
            .map(|_| {
                let (stop, sent, failed) = (stop.clone(), sent.clone(), failed.clone());
                tokio::spawn(async move {
                    let mut c = Conn::open(addr).await.unwrap();
                    // Bounded: 10 minutes of requests at most.
                    let deadline = Instant::now() + Duration::from_secs(600);
                    while !stop.load(Ordering::Acquire) && Instant::now() < deadline {
                        match c.get("/").await {
                            Ok(r) if r.status < 500 || r.text().contains("fails") => {}
                            // The proxy's 504 for an app that does not answer closes the
                            // connection, as nginx's does: a new one, counted as failed.
                            Ok(r) => {
                                failed.fetch_add(1, Ordering::AcqRel);
                                if r.status == 504 {
                                    c = Conn::open(addr).await.unwrap();
                                }
                            }
                            Err(_) => {
                                failed.fetch_add(1, Ordering::AcqRel);
                                // A dead connection fails at once: reconnect, or this loop
                                // would spin without yielding.
                                c = Conn::open(addr).await.unwrap();
                            }
                        }
                        sent.fetch_add(1, Ordering::AcqRel);
                    }
                })
            })
            .collect();
        Load {
            stop,
            tasks,
            sent,
            failed,
        }
    }

    /// Stop; the number of requests sent, and how many failed other than by the app's 500s.
    async fn stop(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Release);
        for t in self.tasks {
            t.await.unwrap();
        }
        (
            self.sent.load(Ordering::Acquire),
            self.failed.load(Ordering::Acquire),
        )
    }
}

/// Shares within SPEC §4 invariant 5: max(0.5 points, 3 standard deviations).
fn within_invariant_5(share: f64, weight: u32, n: u64) -> bool {
    let p = f64::from(weight) / 100.0;
    let bound = (0.005f64).max(3.0 * (p * (1.0 - p) / n as f64).sqrt());
    (share - p).abs() <= bound
}

#[tokio::test]
async fn the_split_over_real_requests_is_within_invariant_5() {
    trace_init();
    let (_blue, _green, px) = blue_green(false, "    canary: {sticky: none}\n").await;
    let mut table = Vec::new();
    for w in [1u32, 5, 25, 50] {
        px.handle().set_weight(None, "green", w).unwrap();
        // 4 clients x 500 requests, concurrently, on keep-alive connections.
        let tasks: Vec<_> = (0..4)
            .map(|_| {
                let addr = px.addr;
                tokio::spawn(async move {
                    let mut c = Conn::open(addr).await.unwrap();
                    let mut green = 0u64;
                    for _ in 0..500 {
                        if color(&c.get("/").await.unwrap()) == "green" {
                            green += 1;
                        }
                    }
                    green
                })
            })
            .collect();
        let mut green = 0;
        for t in tasks {
            green += t.await.unwrap();
        }
        let share = green as f64 / 2000.0;
        table.push(format!(
            "green={w}: {green} of 2000 = {:.2}%",
            share * 100.0
        ));
        assert!(within_invariant_5(share, w, 2000), "{table:?}");
    }
    eprintln!("split without stickiness: {table:?}");
    px.shutdown().await;
}

#[tokio::test]
async fn a_client_on_the_canary_stays_there_as_it_grows_and_at_0_nobody_reaches_it() {
    trace_init();
    let (_blue, _green, px) = blue_green(false, "").await;
    // No canary: no cookie is handed out (a cacheable response must not carry one).
    let r = px.get("/").await;
    assert_eq!(sticky_cookie(&r), None);
    px.handle().set_weight(None, "green", 5).unwrap();
    // 1000 distinct clients (each its own cookie), over 4 keep-alive connections.
    let mut conns = Vec::new();
    for _ in 0..4 {
        conns.push(Conn::open(px.addr).await.unwrap());
    }
    let mut clients: Vec<(String, String)> = Vec::new(); // (cookie pair, color at 5%)
    for i in 0..1000 {
        let r = conns[i % 4].get("/").await.unwrap();
        let set = sticky_cookie(&r).expect("a new client gets a cookie while a canary runs");
        assert!(
            set.contains("; Path=/")
                && set.contains("; HttpOnly")
                && set.contains("; SameSite=Lax"),
            "{set}"
        );
        let pair = set.split(';').next().unwrap().to_string();
        clients.push((pair, color(&r)));
    }
    let on_green_at_5 = clients.iter().filter(|(_, c)| c == "green").count();
    // Random buckets: 4 standard deviations of 1000 draws at 5% is 2.8 points.
    assert!(
        (22..=78).contains(&on_green_at_5),
        "{on_green_at_5} of 1000 at 5%"
    );

    // A client keeps its pool while the weights do not move it.
    for (i, (pair, was)) in clients.iter().enumerate().take(200) {
        let r = conns[i % 4]
            .send("GET", "/", &[("cookie", pair)], Bytes::new())
            .await
            .unwrap();
        assert_eq!(&color(&r), was, "client {i} moved at the same weights");
        assert_eq!(sticky_cookie(&r), None, "a valid cookie is not replaced");
    }

    px.handle().set_weight(None, "green", 25).unwrap();
    let mut on_green_at_25 = 0;
    for (i, (pair, was)) in clients.iter().enumerate() {
        let r = conns[i % 4]
            .send("GET", "/", &[("cookie", pair)], Bytes::new())
            .await
            .unwrap();
        let now = color(&r);
        if was == "green" {
            assert_eq!(
                now, "green",
                "client {i} left the canary when it grew 5 -> 25"
            );
        }
        if now == "green" {
            on_green_at_25 += 1;
        }
    }
    // 4 standard deviations of 1000 draws at 25% is 5.5 points.
    assert!(
        (195..=305).contains(&on_green_at_25),
        "{on_green_at_25} of 1000 at 25%"
    );

    // A forged or garbled cookie is treated as absent: a new bucket and a new cookie.
    for bad in [
        "switchyard_pool=3.000000000000",
        "switchyard_pool=garbage",
        "switchyard_pool=",
        "switchyard_pool=1.2.3",
    ] {
        let r = conns[0]
            .send("GET", "/", &[("cookie", bad)], Bytes::new())
            .await
            .unwrap();
        assert_eq!(r.status, 200);
        assert!(sticky_cookie(&r).is_some(), "{bad}: no new cookie");
    }

    // At 0 nobody reaches the canary, cookie or not, and no cookie is set.
    px.handle().set_weight(None, "green", 0).unwrap();
    for (i, (pair, _)) in clients.iter().enumerate() {
        let r = conns[i % 4]
            .send("GET", "/", &[("cookie", pair)], Bytes::new())
            .await
            .unwrap();
        assert_eq!(color(&r), "blue", "client {i} reached a canary at 0");
        assert_eq!(sticky_cookie(&r), None);
    }
    let r = px.get("/").await;
    assert_eq!(sticky_cookie(&r), None);
    eprintln!(
        "stickiness: 1000 clients, {on_green_at_5} on green at 5%, {on_green_at_25} at 25%, 0 at 0"
    );
    px.shutdown().await;
}

#[tokio::test]
async fn a_sticky_header_puts_a_user_in_the_same_bucket_every_time() {
    trace_init();
    let (_blue, _green, px) = blue_green(false, "    canary: {sticky: \"header:X-User\"}\n").await;
    px.handle().set_weight(None, "green", 30).unwrap();
    let mut c = Conn::open(px.addr).await.unwrap();
    let mut green = 0;
    for u in 0..300 {
        let user = format!("user-{u}");
        let first = color(
            &c.send("GET", "/", &[("x-user", &user)], Bytes::new())
                .await
                .unwrap(),
        );
        for _ in 0..3 {
            let again = c
                .send("GET", "/", &[("x-user", &user)], Bytes::new())
                .await
                .unwrap();
            assert_eq!(color(&again), first, "{user}");
            assert_eq!(sticky_cookie(&again), None, "no cookie with sticky: header");
        }
        if first == "green" {
            green += 1;
        }
    }
    assert!((45..=135).contains(&green), "{green} of 300 users at 30%");
    px.shutdown().await;
}

#[tokio::test]
async fn x_canary_forces_the_pool_and_preview_needs_an_allowed_address() {
    trace_init();
    let (_blue, _green, px) = blue_green(false, "").await;
    let mut c = Conn::open(px.addr).await.unwrap();
    let c = &mut c;
    // No canary: `X-Canary: true` goes to the main pool.
    assert_eq!(get(c, &[("x-canary", "true")]).await, "blue");
    // Preview (from 127.0.0.1, allowed by default) names any pool, also one at weight 0.
    for _ in 0..20 {
        assert_eq!(get(c, &[("x-switchyard-pool", "green")]).await, "green");
    }
    // A name that is no pool is ignored.
    assert_eq!(get(c, &[("x-switchyard-pool", "purple")]).await, "blue");
    px.handle().set_weight(None, "green", 5).unwrap();
    for _ in 0..20 {
        assert_eq!(get(c, &[("x-canary", "true")]).await, "green");
        assert_eq!(get(c, &[("x-canary", "TRUE")]).await, "green");
        assert_eq!(get(c, &[("x-canary", "false")]).await, "blue");
        // Preview comes before the force header.
        assert_eq!(
            get(c, &[("x-canary", "true"), ("x-switchyard-pool", "blue")]).await,
            "blue"
        );
    }
    px.shutdown().await;

    // From an address not in allow_from the preview header is ignored and counted.
    let (_blue, _green, px) =
        blue_green(false, "    preview: {allow_from: [\"10.0.0.0/8\"]}\n").await;
    let mut c = Conn::open(px.addr).await.unwrap();
    for _ in 0..10 {
        let r = c
            .send("GET", "/", &[("x-switchyard-pool", "green")], Bytes::new())
            .await
            .unwrap();
        assert_eq!(color(&r), "blue");
    }
    let metrics = px.handle().metrics_text();
    assert!(
        metrics.contains("switchyard_preview_refused_total{upstream=\"app\"} 10"),
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("preview"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    px.shutdown().await;
}

/// `GET /` with headers on `c`; the color that answered.
async fn get(c: &mut Conn, h: &[(&str, &str)]) -> String {
    color(&c.send("GET", "/", h, Bytes::new()).await.unwrap())
}

/// Short windows for the rollback tests: a 3 s window measured every 500 ms.
const ANALYSIS: &str = "    canary:\n      sticky: none\n      auto_rollback: {error_rate: 0.05, for: 1s, window: 3s, min_requests: 20}\n";

#[tokio::test]
async fn a_canary_failing_10_percent_is_rolled_back_within_for_plus_one_bucket() {
    trace_init();
    let (_blue, green, px) = blue_green(false, ANALYSIS).await;
    green.set_mode(Mode::FailShare(10));
    let load = Load::start(px.addr, 4);
    // Let the load reach steady state before the canary gets weight.
    let warm = Instant::now();
    while load.sent.load(Ordering::Acquire) < 200 {
        assert!(warm.elapsed() < Duration::from_secs(10), "no load");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let errors_begin = Instant::now();
    px.handle().set_weight(None, "green", 20).unwrap();
    wait_rolled_back(&px, Duration::from_secs(15)).await;
    let rolled_back_after = errors_begin.elapsed();
    // Nothing reaches the canary once the rollback is in effect.
    let hits_at_rollback = green.hits();
    let sent_at_rollback = load.sent.load(Ordering::Acquire);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (sent, failed) = load.stop().await;
    assert!(
        sent - sent_at_rollback > 100,
        "load kept going after the rollback"
    );
    // A request already in flight at the moment may still finish there (it started before).
    let late = green.hits() - hits_at_rollback;
    assert!(
        late <= 4,
        "{late} requests reached the canary after its rollback"
    );
    assert_eq!(failed, 0, "the proxy failed requests");
    // for (1 s) + one bucket (window/6 = 0.5 s), and the first judgement needs 20 canary
    // requests; allow 1.5 s of scheduling slack on a loaded machine (2 cores, the whole suite
    // running), but never earlier than `for`.
    assert!(
        rolled_back_after >= Duration::from_secs(1),
        "rolled back after {rolled_back_after:?}, before `for`"
    );
    assert!(
        rolled_back_after <= Duration::from_millis(1000 + 500 + 1500),
        "rolled back after {rolled_back_after:?}"
    );
    let st = px.handle().status();
    let u = st.upstream("app").unwrap();
    let rb = u.last_rollback.as_ref().expect("status says why");
    assert_eq!(
        (rb.pool.as_str(), rb.reason.as_str()),
        ("green", "auto_error_rate")
    );
    assert!(rb.requests >= 20, "{rb:?}");
    assert!((0.05..=0.2).contains(&rb.error_ratio), "{rb:?}");
    assert!(rb.detail.contains("above 5.0% for"), "{rb:?}");
    let ev = px.handle().events(20);
    let e = ev
        .iter()
        .find(|e| e.kind == "auto_rollback")
        .expect("an audit record");
    assert_eq!(e.actor, "proxy");
    assert!(
        e.message.contains("green=0") && e.message.contains("5xx"),
        "{e:?}"
    );
    let m = px.handle().metrics_text();
    assert!(
        m.contains("switchyard_rollbacks_total{reason=\"auto_error_rate\",upstream=\"app\"} 1"),
        "{}",
        m.lines()
            .filter(|l| l.contains("rollbacks"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    eprintln!(
        "auto-rollback: errors began at 0 ms, rolled back at {} ms ({} canary requests, {:.1}% 5xx); {late} request(s) in flight on green finished after it, {} sent after, 0 reached green",
        rolled_back_after.as_millis(),
        rb.requests,
        rb.error_ratio * 100.0,
        sent - sent_at_rollback
    );
    px.shutdown().await;
}

#[tokio::test]
async fn a_healthy_canary_and_one_with_too_few_requests_are_not_rolled_back() {
    trace_init();
    // Healthy under the same load, for three times `for` + a bucket.
    let (_blue, _green, px) = blue_green(false, ANALYSIS).await;
    let load = Load::start(px.addr, 4);
    px.handle().set_weight(None, "green", 20).unwrap();
    // Observation window: three times `for` + a bucket with nothing happening.
    tokio::time::sleep(Duration::from_millis(4500)).await;
    let (sent, failed) = load.stop().await;
    assert!(sent > 500, "{sent}");
    assert_eq!(failed, 0);
    assert_eq!(weight(&px, "green"), 20, "a healthy canary was rolled back");
    let stats = live(&px, "green");
    assert_eq!(stats.verdict.as_deref(), Some("healthy"), "{stats:?}");
    px.shutdown().await;

    // Every canary request fails, but 10 requests are too few to judge (min_requests 20).
    let (_blue, green, px) = blue_green(false, ANALYSIS).await;
    green.set_mode(Mode::FailShare(100));
    px.handle().set_weight(None, "green", 1).unwrap();
    let mut c = Conn::open(px.addr).await.unwrap();
    for _ in 0..10 {
        let r = c
            .send("GET", "/", &[("x-canary", "true")], Bytes::new())
            .await
            .unwrap();
        assert_eq!(r.status, 500);
    }
    // Observation window (the thing under test is that nothing happens): 2.5 s is more than
    // `for` + a bucket, so a rollback would have happened by now.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(weight(&px, "green"), 1, "rolled back on 10 requests");
    let stats = live(&px, "green");
    // The 10 requests, or fewer once the oldest leave the window.
    let verdict = stats.verdict.clone().unwrap_or_default();
    let seen: u64 = verdict
        .strip_prefix("too few requests: ")
        .and_then(|rest| rest.strip_suffix(" of 20"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{stats:?}"));
    assert!(seen <= 10, "{stats:?}");
    px.shutdown().await;
}

fn canary_req(pool: &str, steps: &[u32], interval_ms: u64, wait: bool) -> Request {
    Request::Canary {
        upstream: None,
        pool: pool.into(),
        steps: Some(steps.to_vec()),
        interval_ms: Some(interval_ms),
        wait,
        min_healthy: Default::default(),
        wait_healthy_ms: None,
    }
}

#[tokio::test]
async fn a_rollout_waits_for_traffic_then_reaches_100_and_the_old_pool_drains() {
    trace_init();
    let extra = "    canary:\n      sticky: none\n      auto_rollback: {for: 1s, window: 1s, min_requests: 10}\n";
    let (blue, _green, px) = blue_green(false, extra).await;
    // No traffic: the first step is taken, the next waits and says why.
    let mut wait_task = {
        let px = &px;
        Box::pin(async move {
            let mut ctl = px.ctl().await;
            let mut seen = Vec::new();
            let r = ctl
                .call(&canary_req("green", &[10, 50, 100], 300, true), |ev| {
                    if let Event::Rollout { rollout, .. } = ev {
                        seen.push((rollout.step, rollout.state.clone(), rollout.waiting.clone()));
                    }
                })
                .await
                .unwrap();
            (r, seen)
        })
    };
    // Poll status while the wait runs.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut waiting_seen = None;
    while waiting_seen.is_none() {
        tokio::select! {
            _ = &mut wait_task => panic!("the rollout ended without traffic"),
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
        assert!(Instant::now() < deadline, "never said it waits");
        let st = px.handle().status();
        let r = st.upstream("app").unwrap().rollout.clone();
        waiting_seen = r.and_then(|r| r.waiting);
    }
    assert_eq!(
        waiting_seen.as_deref(),
        Some("waiting for traffic: 0 of 10 requests")
    );
    assert_eq!(weight(&px, "green"), 10, "still at the first step");
    // Traffic: the steps are taken and the rollout is promoted.
    let load = Load::start(px.addr, 2);
    let (reply, steps) = tokio::time::timeout(Duration::from_secs(20), &mut wait_task)
        .await
        .expect("the rollout finished");
    let (sent, failed) = load.stop().await;
    assert!(reply.ok, "{reply:?}");
    let result: CanaryResult = serde_json::from_value(reply.result.unwrap()).unwrap();
    assert_eq!(result.rollout.state, "promoted");
    // The change is the whole rollout's: from before it began to where it ended.
    assert_eq!(
        (
            result.change.old_weights["green"],
            result.change.new_weights["green"],
            result.change.new_weights["blue"]
        ),
        (0, 100, 0),
        "{result:?}"
    );
    assert!(result.change.changed);
    assert_eq!(
        result.change.generation,
        px.handle().status().upstream("app").unwrap().generation
    );
    assert_eq!(reply.error.map(|e| e.code.exit_code()).unwrap_or(0), 0);
    let steps_taken: Vec<usize> = {
        let mut v: Vec<usize> = steps.iter().map(|s| s.0).collect();
        v.dedup();
        v
    };
    assert_eq!(steps_taken, vec![0, 1, 2], "{steps:?}");
    assert!(steps
        .iter()
        .any(|s| s.2.as_deref() == Some("waiting for traffic: 0 of 10 requests")));
    assert_eq!(weight(&px, "green"), 100);
    assert_eq!(failed, 0, "{sent} sent");
    // The old pool drains: nothing new reaches blue, and its in-flight count reaches 0.
    eventually(|| px.inflight("blue") == 0).await;
    let before = blue.hits();
    for _ in 0..50 {
        assert_eq!(color(&px.get("/").await), "green");
    }
    assert_eq!(blue.hits(), before);
    drop(wait_task);
    px.shutdown().await;
}

#[tokio::test]
async fn a_restart_mid_rollout_resumes_at_the_same_step() {
    trace_init();
    let (_blue, _green, px) = blue_green(false, "").await;
    // Green already has 20: the rollout starts at the first step above, 50 (step 2 of 3).
    px.handle().set_weight(None, "green", 20).unwrap();
    let r = px
        .ctl_call(canary_req("green", &[10, 50, 100], 3_600_000, false))
        .await;
    assert!(r.ok, "{r:?}");
    let st = px.handle().status();
    let before = st.upstream("app").unwrap().rollout.clone().unwrap();
    assert_eq!(
        (before.step, before.weight, before.state.as_str()),
        (1, 50, "running")
    );
    let yaml = app_yaml(
        &[("blue", &[_blue.addr()]), ("green", &[_green.addr()])],
        "blue",
        "",
    );
    let dir = px.stop_keep_dir().await;
    let px = TestProxy::restart_in(dir, &yaml).await;
    let st = px.handle().status();
    let u = st.upstream("app").unwrap();
    let after = u.rollout.clone().expect("the rollout survived the restart");
    assert_eq!(
        (after.step, after.weight, after.state.as_str()),
        (1, 50, "running")
    );
    assert_eq!(after.id, before.id);
    assert_eq!(u.weights["green"], 50);
    assert!(after.step_left_ms.unwrap() <= before.step_left_ms.unwrap());
    assert!(after.step_left_ms.unwrap() > 3_500_000, "{after:?}");
    // Pause, restart, and it is still paused with the same time left; resume works.
    assert!(
        px.ctl_call(Request::CanaryPause { upstream: None })
            .await
            .ok
    );
    let paused = px
        .handle()
        .status()
        .upstream("app")
        .unwrap()
        .rollout
        .clone()
        .unwrap();
    let dir = px.stop_keep_dir().await;
    let px = TestProxy::restart_in(dir, &yaml).await;
    let again = px
        .handle()
        .status()
        .upstream("app")
        .unwrap()
        .rollout
        .clone()
        .unwrap();
    assert_eq!(again.state, "paused");
    assert_eq!(again.step_left_ms, paused.step_left_ms);
    assert!(
        px.ctl_call(Request::CanaryResume { upstream: None })
            .await
            .ok
    );
    // A second rollout is refused while this one runs.
    let r = px
        .ctl_call(canary_req("green", &[10, 100], 1000, false))
        .await;
    assert_eq!(r.error.unwrap().code, ErrorCode::Invalid);
    px.shutdown().await;
}

#[tokio::test]
async fn wait_answers_rolled_back_with_the_numbers_and_aborted_by_a_human() {
    trace_init();
    let (_blue, green, px) = blue_green(false, ANALYSIS).await;
    // Rolled back automatically: exit code 5, with the numbers.
    green.set_mode(Mode::FailShare(30));
    let load = Load::start(px.addr, 4);
    let r = tokio::time::timeout(
        Duration::from_secs(20),
        px.ctl_call(canary_req("green", &[20, 50, 100], 60_000, true)),
    )
    .await
    .expect("the wait ended");
    let e = r.error.clone().expect("not ok");
    assert_eq!(e.code, ErrorCode::RolledBack);
    assert_eq!(e.code.exit_code(), 5);
    assert!(
        e.message
            .contains("rolled back automatically at step 1 of 3 (20%)"),
        "{e:?}"
    );
    assert!(
        e.message.contains("5xx") && e.message.contains("above 5.0%"),
        "{e:?}"
    );
    let details = e.details.unwrap();
    assert_eq!(details["reason"], "auto_error_rate");
    assert!(details["requests"].as_u64().unwrap() >= 20);
    assert_eq!(weight(&px, "green"), 0);
    // Nothing but a human command gives it traffic again, however long one waits
    // (observation window: more than `for` + a bucket).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(weight(&px, "green"), 0);
    let st = px.handle().status();
    assert_eq!(
        st.upstream("app").unwrap().rollout.as_ref().unwrap().state,
        "rolled_back"
    );

    // Stopped by a human: `canary abort` while another client waits -> Aborted (exit 1).
    green.set_mode(Mode::Normal);
    let mut waiting = {
        let px = &px;
        Box::pin(async move {
            px.ctl_call(canary_req("green", &[10, 100], 3_600_000, true))
                .await
        })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while weight(&px, "green") != 10 {
        tokio::select! {
            _ = &mut waiting => panic!("the wait ended early"),
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
        assert!(Instant::now() < deadline, "the rollout did not start");
    }
    let abort = px.ctl_call(Request::CanaryAbort { upstream: None }).await;
    assert!(abort.ok, "{abort:?}");
    let r = tokio::time::timeout(Duration::from_secs(10), &mut waiting)
        .await
        .unwrap();
    let e = r.error.unwrap();
    assert_eq!(e.code, ErrorCode::Aborted);
    assert_eq!(e.code.exit_code(), 1);
    drop(waiting);
    assert_eq!(weight(&px, "green"), 0);
    // The abort took the canary's traffic back by hand: a manual rollback.
    let m = px.handle().metrics_text();
    assert!(
        m.contains("switchyard_rollbacks_total{reason=\"manual\",upstream=\"app\"} 1"),
        "{}",
        m.lines()
            .filter(|l| l.contains("rollbacks"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // A human weight change also stops a rollout, which then never moves the weights again.
    let r = px
        .ctl_call(canary_req("green", &[10, 50, 100], 200, false))
        .await;
    assert!(r.ok, "{r:?}");
    px.handle().set_weight(None, "green", 30).unwrap();
    let st = px.handle().status();
    let ro = st.upstream("app").unwrap().rollout.clone().unwrap();
    assert_eq!(
        (ro.state.as_str(), ro.ended_by.as_deref()),
        ("aborted", Some("weight"))
    );
    // Observation window: five step intervals in which the ended rollout must not act.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        weight(&px, "green"),
        30,
        "an ended rollout moved the weights"
    );
    let (_, failed) = load.stop().await;
    assert_eq!(failed, 0);
    let counts: BTreeMap<String, usize> =
        px.handle()
            .events(100)
            .iter()
            .fold(BTreeMap::new(), |mut m, e| {
                *m.entry(e.kind.clone()).or_default() += 1;
                m
            });
    assert_eq!(counts.get("auto_rollback"), Some(&1), "{counts:?}");
    assert_eq!(counts.get("canary_abort"), Some(&1), "{counts:?}");
    px.shutdown().await;
}

/// The demo's canary walkthrough does what it says: green told to fail 30% is rolled back
/// about 10 s (`for` in the demo config) after its rollout starts, with exit code 5.
#[tokio::test]
async fn the_demo_canary_walkthrough_rolls_green_back() {
    trace_init();
    let dir = tempfile::tempdir().unwrap();
    let demo = switchyard_proxy::demo::run("127.0.0.1:0".parse().unwrap(), dir.path().into())
        .await
        .unwrap();
    let proxy = demo.proxy.listen_addrs()[0];
    // Both colors healthy (the demo checks every second).
    let deadline = Instant::now() + Duration::from_secs(10);
    while demo
        .proxy
        .status()
        .upstreams
        .iter()
        .flat_map(|u| &u.pools)
        .flat_map(|p| &p.instances)
        .any(|i| i.health != switchyard_control::HealthState::Healthy)
    {
        assert!(Instant::now() < deadline, "demo upstreams not healthy");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let fail = request(
        demo.green.addr(),
        "GET",
        "/demo/fail?percent=30",
        &[],
        Bytes::new(),
    )
    .await
    .unwrap();
    assert_eq!(fail.json()["fail_percent"], 30);
    let load = Load::start(proxy, 2);
    let started = Instant::now();
    // The demo's analysis rolls back once the error rate has been over its limit for `for`
    // (10 s): not before that. A failing canary is never promoted (each later step waits for
    // the analysis to pass, and holds), so there is no natural upper bound; how long after
    // `for` it comes depends on the machine's load (30.6 s once under CI load), which this
    // test does not judge: it allows four times `for`.
    let (hold, limit) = (Duration::from_secs(10), Duration::from_secs(40));
    let r = tokio::time::timeout(
        limit + Duration::from_secs(20),
        demo.proxy.execute(Request::Canary {
            upstream: None,
            pool: "green".into(),
            steps: Some(vec![10, 50, 100]),
            interval_ms: None,
            wait: true,
            min_healthy: Default::default(),
            wait_healthy_ms: None,
        }),
    )
    .await
    .expect("the rollout ended");
    let took = started.elapsed();
    let (_, failed) = load.stop().await;
    let e = r.error.expect("rolled back");
    assert_eq!(e.code.exit_code(), 5, "{e:?}");
    assert!(e.message.contains("5xx 30.0%"), "{e:?}");
    assert!(
        took >= hold && took < limit,
        "rolled back after {took:?}: must be at least `for` ({hold:?}), and within {limit:?}"
    );
    assert_eq!(failed, 0);
    eprintln!("demo: rolled back after {took:?}: {}", e.message);
    demo.proxy.shutdown().await;
}

/// After an automatic rollback the canary is fixed and given weight again while the bad
/// numbers are still inside the window: it is judged on what it does from then on, not
/// rolled back again for the old failures.
#[tokio::test]
async fn a_healed_canary_given_weight_again_is_judged_afresh() {
    trace_init();
    let (_blue, green, px) = blue_green(false, ANALYSIS).await;
    green.set_mode(Mode::FailShare(30));
    let load = Load::start(px.addr, 4);
    px.handle().set_weight(None, "green", 20).unwrap();
    wait_rolled_back(&px, Duration::from_secs(15)).await;
    green.set_mode(Mode::Normal);
    px.handle().set_weight(None, "green", 10).unwrap();
    // Observation window: the 3 s window still holds the failures for most of it; `for` + a
    // bucket passes twice over.
    tokio::time::sleep(Duration::from_millis(3000)).await;
    let (sent, failed) = load.stop().await;
    assert_eq!(failed, 0, "{sent} sent");
    assert_eq!(
        weight(&px, "green"),
        10,
        "rolled back again for failures from before it was fixed"
    );
    let rollbacks = px
        .handle()
        .events(100)
        .iter()
        .filter(|e| e.kind == "auto_rollback")
        .count();
    assert_eq!(rollbacks, 1);
    let stats = live(&px, "green");
    assert_eq!(stats.verdict.as_deref(), Some("healthy"), "{stats:?}");
    px.shutdown().await;
}

/// Past 50% the new version has the most traffic but is still the canary: the pool that last
/// had it all stays `stable`, `X-Canary: true` still reaches the new one, and an abort returns
/// everything to the stable pool.
#[tokio::test]
async fn past_half_the_canary_is_still_the_new_pool() {
    trace_init();
    let (_blue, _green, px) = blue_green(false, "").await;
    // Clients placed on green at 10% (sticky cookies, the default).
    px.handle().set_weight(None, "green", 10).unwrap();
    let mut on_green = Vec::new();
    for _ in 0..200 {
        let r = request(px.addr, "GET", "/", &[], Bytes::new())
            .await
            .unwrap();
        let cookie = sticky_cookie(&r).expect("a cookie while green has weight");
        if color(&r) == "green" {
            on_green.push(cookie.split(';').next().unwrap().to_string());
        }
    }
    assert!(on_green.len() >= 5, "{} of 200 on green", on_green.len());
    // The rollout starts at the first step above 10: 60.
    let r = px
        .ctl_call(canary_req("green", &[60, 100], 3_600_000, false))
        .await;
    assert!(r.ok, "{r:?}");
    for pair in &on_green {
        let r = request(px.addr, "GET", "/", &[("cookie", pair)], Bytes::new())
            .await
            .unwrap();
        assert_eq!(color(&r), "green", "{pair} moved back to blue at 60%");
    }
    let st = px.handle().status();
    let u = st.upstream("app").unwrap();
    assert_eq!((u.weights["green"], u.main.as_str()), (60, "green"));
    assert_eq!(u.pool("blue").unwrap().role.as_deref(), Some("stable"));
    assert_eq!(u.pool("green").unwrap().role.as_deref(), Some("canary"));
    let mut c = Conn::open(px.addr).await.unwrap();
    for _ in 0..20 {
        assert_eq!(get(&mut c, &[("x-canary", "true")]).await, "green");
        assert_eq!(get(&mut c, &[("x-canary", "false")]).await, "blue");
    }
    let abort = px.ctl_call(Request::CanaryAbort { upstream: None }).await;
    assert!(abort.ok, "{abort:?}");
    assert_eq!((weight(&px, "blue"), weight(&px, "green")), (100, 0));
    px.shutdown().await;
}

/// A reload in the middle of a rollout keeps it at its step (same rollout, same weight); a
/// reload that removes the canary pool ends it and the traffic goes back to `active`.
#[tokio::test]
async fn a_reload_mid_rollout_keeps_it_and_removing_the_pool_ends_it() {
    trace_init();
    let blue = FakeUpstream::builder("blue").start().await.unwrap();
    let green = FakeUpstream::builder("green").start().await.unwrap();
    let both = |extra: &str| {
        app_yaml(
            &[("blue", &[blue.addr()]), ("green", &[green.addr()])],
            "blue",
            extra,
        )
    };
    let px = TestProxy::start_from_file(&both("")).await;
    let r = px
        .ctl_call(canary_req("green", &[10, 50, 100], 3_600_000, false))
        .await;
    assert!(r.ok, "{r:?}");
    let before = px.handle().status().upstream("app").unwrap().clone();
    let ro = before.rollout.clone().unwrap();
    // A change of the analysis settings only.
    px.write_config(&both(
        "    canary:\n      auto_rollback: {error_rate: 0.02, for: 30s}\n",
    ));
    let rr = px.handle().reload().await;
    assert!(rr.is_ok(), "{rr:?}");
    let after = px.handle().status().upstream("app").unwrap().clone();
    let ro2 = after
        .rollout
        .clone()
        .expect("the rollout survived the reload");
    assert_eq!(
        (ro2.id, ro2.step, ro2.state.as_str()),
        (ro.id, 0, "running")
    );
    assert_eq!(after.weights["green"], 10);
    assert!(ro2.step_left_ms.unwrap() > 3_500_000, "{ro2:?}");
    // Green leaves the file: the rollout cannot go on; blue (active) has it all.
    px.write_config(&app_yaml(&[("blue", &[blue.addr()])], "blue", ""));
    let rr = px.handle().reload().await;
    assert!(rr.is_ok(), "{rr:?}");
    let u = px.handle().status().upstream("app").unwrap().clone();
    assert_eq!(u.weights.get("blue"), Some(&100));
    assert!(
        u.rollout.as_ref().is_none_or(|r| r.state != "running"),
        "{:?}",
        u.rollout
    );
    for _ in 0..10 {
        assert_eq!(color(&px.get("/").await), "blue");
    }
    px.shutdown().await;
}

/// Proxies given the same `sticky_key_file` honor each other's cookies (a client behind a
/// load balancer keeps its bucket whichever proxy it reaches); a proxy with its own key
/// does not. A response a shared cache may keep never carries the cookie.
#[tokio::test]
async fn proxies_sharing_a_key_file_honor_each_others_cookies() {
    trace_init();
    let secret = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(secret.path(), "a shared secret of 32 characters\n").unwrap();
    let blue = FakeUpstream::builder("blue").start().await.unwrap();
    let green = FakeUpstream::builder("green").start().await.unwrap();
    let yaml = app_yaml(
        &[("blue", &[blue.addr()]), ("green", &[green.addr()])],
        "blue",
        "",
    );
    let shared = format!("{yaml}sticky_key_file: \"{}\"\n", secret.path().display());
    let a = TestProxy::start(&shared).await;
    let b = TestProxy::start(&shared).await;
    let own = TestProxy::start(&yaml).await;
    for px in [&a, &b, &own] {
        px.handle().set_weight(None, "green", 50).unwrap();
    }
    let mut reissued_by_own = 0;
    for _ in 0..20 {
        let first = request(a.addr, "GET", "/", &[], Bytes::new())
            .await
            .unwrap();
        let cookie = sticky_cookie(&first).expect("a cookie from a");
        let pair = cookie.split(';').next().unwrap().to_string();
        let at_b = request(b.addr, "GET", "/", &[("cookie", &pair)], Bytes::new())
            .await
            .unwrap();
        assert_eq!(sticky_cookie(&at_b), None, "b re-issued {pair}");
        assert_eq!(color(&at_b), color(&first), "{pair} moved between proxies");
        let at_own = request(own.addr, "GET", "/", &[("cookie", &pair)], Bytes::new())
            .await
            .unwrap();
        reissued_by_own += usize::from(sticky_cookie(&at_own).is_some());
    }
    assert_eq!(
        reissued_by_own, 20,
        "a proxy with its own key honored a foreign cookie"
    );
    // `Cache-Control: public` from the app: no cookie, however many times.
    for _ in 0..20 {
        let r = request(a.addr, "GET", "/public", &[], Bytes::new())
            .await
            .unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(
            sticky_cookie(&r),
            None,
            "a cookie on a shared-cacheable response"
        );
    }
    for px in [a, b, own] {
        px.shutdown().await;
    }
}

/// A canary that never answers is slow, not unmeasured: a request the app did not answer
/// (here cut by `read_timeout`) counts its whole wait in the p99, so `latency_p99` rolls it
/// back — with `error_rate` out of the way (1.0 is never exceeded).
#[tokio::test]
async fn a_canary_that_hangs_is_rolled_back_for_latency() {
    trace_init();
    let extra = format!("    read_timeout: 400ms\n    retries: 0\n    passive: {{consecutive_failures: 0}}\n{LATENCY_ONLY}");
    let (_blue, green, px) = blue_green(false, &extra).await;
    green.set_mode(Mode::Hang);
    let load = Load::start(px.addr, 8);
    px.handle().set_weight(None, "green", 20).unwrap();
    wait_rolled_back(&px, Duration::from_secs(20)).await;
    load.stop().await;
    let st = px.handle().status();
    let rb = st.upstream("app").unwrap().last_rollback.clone().unwrap();
    assert_eq!(rb.reason, "auto_latency", "{rb:?}");
    assert!(rb.p99_ms.unwrap() >= 300.0, "{rb:?}");
    px.shutdown().await;
}

/// The other side of the test above: uploads the *client* never finishes say nothing about
/// the app. Anyone can send `X-Canary: true`; stalled uploads forced onto a healthy canary
/// must not roll it back for latency.
#[tokio::test]
async fn stalled_uploads_forced_onto_a_healthy_canary_do_not_roll_it_back() {
    use tokio::io::AsyncWriteExt;
    trace_init();
    let extra = LATENCY_ONLY;
    let (_blue, _green, px) = blue_green(false, extra).await;
    px.handle().set_weight(None, "green", 20).unwrap();
    let load = Load::start(px.addr, 2);
    let addr = px.addr;
    let attackers: Vec<_> = (0..10)
        .map(|_| {
            tokio::spawn(async move {
                for _ in 0..6 {
                    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
                    s.write_all(b"POST /sha256 HTTP/1.1\r\nHost: x\r\nX-Canary: true\r\nContent-Length: 10\r\n\r\n")
                        .await
                        .unwrap();
                    // The body never comes; the client gives up after 500 ms (a deliberate
                    // stall, not a wait for readiness).
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    drop(s);
                }
            })
        })
        .collect();
    for a in attackers {
        a.await.unwrap();
    }
    // Observation window: the attack lasted 3 s (`for` + a bucket twice over); give the
    // autopilot one more second to act on it.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let (sent, failed) = load.stop().await;
    assert_eq!(failed, 0, "{sent} sent");
    assert_eq!(
        weight(&px, "green"),
        20,
        "stalled uploads rolled a healthy canary back: {:?}",
        px.handle().status().upstream("app").unwrap().last_rollback
    );
    px.shutdown().await;
}
