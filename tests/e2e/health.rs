//! Active health checks the Spring way, passive ejection, fail-open and health-gated
//! switching (issue 4).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use switchyard_control::{ErrorCode, Event, HealthState, Request};
use switchyard_tests::*;

fn switch(pool: &str, wait_ms: Option<u64>) -> Request {
    switch_req(pool, wait_ms)
}

/// Clients that keep sending requests until stopped; they record every failure.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(addr: std::net::SocketAddr, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failures: Arc<Mutex<Vec<String>>> = Arc::default();
        let tasks = (0..clients)
            .map(|_| {
                let (stop, ok, failures) = (stop.clone(), ok.clone(), failures.clone());
                tokio::spawn(async move {
                    let mut c = Conn::open(addr).await.unwrap();
                    let mut n = 0;
                    while !stop.load(Ordering::Relaxed) && n < 1_000_000 {
                        n += 1;
                        match c.get("/").await {
                            Ok(r) if r.status == 200 => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(r) => {
                                failures
                                    .lock()
                                    .unwrap()
                                    .push(format!("{} {}", r.status, r.text()))
                            }
                            Err(e) => {
                                failures.lock().unwrap().push(e);
                                c = Conn::open(addr).await.unwrap();
                            }
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            ok,
            failures,
            tasks,
        }
    }

    async fn wait_more(&self, n: u64) {
        let start = self.ok.load(Ordering::Relaxed);
        let ok = self.ok.clone();
        eventually(move || ok.load(Ordering::Relaxed) >= start + n).await;
    }

    fn failures(&self) -> Vec<String> {
        self.failures.lock().unwrap().clone()
    }

    async fn stop(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        let f = self.failures.lock().unwrap().clone();
        (self.ok.load(Ordering::Relaxed), f)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_booting_spring_app_is_waited_for_and_switching_fails_nothing() {
    trace_init();
    let blue = FakeUpstream::builder("blue")
        .record(false)
        .start()
        .await
        .unwrap();
    let green = Arc::new(
        FakeUpstream::builder("green")
            .record(false)
            .start()
            .await
            .unwrap(),
    );
    // Green boots: DOWN (503) for its first 3 s, then UP.
    green.set_health(HealthReply::down());
    let yaml = app_yaml(
        &[("blue", &[blue.addr()]), ("green", &[green.addr()])],
        "blue",
        "    health: {interval: 200ms, timeout: 200ms}\n",
    );
    let px = TestProxy::start(&yaml).await;
    let load = Load::start(px.addr, 8);
    load.wait_more(200).await;

    // Refused while booting, with the reason.
    let r = px.ctl_call(switch("green", None)).await;
    let e = r.error.expect("refused");
    assert_eq!(e.code, ErrorCode::Unhealthy);
    assert!(
        e.message.contains(r#"503 {"status":"DOWN"}"#),
        "{}",
        e.message
    );

    // A short wait runs out: exit 4 with the reason; nothing switched.
    let r = px.ctl_call(switch("green", Some(1000))).await;
    let e = r.error.expect("times out");
    assert_eq!(e.code, ErrorCode::Timeout);
    assert!(e.message.contains("nothing was switched"), "{}", e.message);
    assert!(e.message.contains("DOWN"), "{}", e.message);
    assert_eq!(
        px.handle().status().upstream("app").unwrap().weights["blue"],
        100
    );

    let booting = green.clone();
    tokio::spawn(async move {
        // The app's boot time: a deliberate delay of the fake upstream, not a readiness wait.
        tokio::time::sleep(Duration::from_secs(3)).await;
        booting.set_health(HealthReply::up());
    });
    let mut ctl = px.ctl().await;
    let mut seen = Vec::new();
    let reply = ctl
        .call(&switch("green", Some(10_000)), |e| {
            if let Event::Health { instances, .. } = e {
                seen.push(instances[0].health);
            }
        })
        .await
        .unwrap();
    assert!(reply.ok, "{reply:?}");
    assert_eq!(seen.first(), Some(&HealthState::Unhealthy), "{seen:?}");
    assert_eq!(seen.last(), Some(&HealthState::Healthy), "{seen:?}");
    let before = green.hits();
    // The 8 clients' requests in flight at the switch were bound to blue and may finish after
    // this point: wait for 8 more than green must see.
    load.wait_more(200 + 8).await;
    assert!(green.hits() >= before + 200, "traffic moved to green");
    let (ok, failures) = load.stop().await;
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        failures.first()
    );
    eprintln!("boot scenario: {ok} requests, 0 failed");
    let kinds: Vec<String> = px
        .handle()
        .events(100)
        .into_iter()
        .map(|r| r.kind)
        .collect();
    assert!(
        kinds.contains(&"health".to_string()) && kinds.contains(&"switch".to_string()),
        "{kinds:?}"
    );
    px.shutdown().await;
}

#[tokio::test]
async fn the_json_status_decides_and_a_hanging_endpoint_is_a_timeout() {
    trace_init();
    let down_200 = FakeUpstream::start("a").await.unwrap();
    down_200.set_health(HealthReply::Answer(200, r#"{"status":"DOWN"}"#.into()));
    let oos = FakeUpstream::start("b").await.unwrap();
    oos.set_health(HealthReply::Answer(
        503,
        r#"{"status":"OUT_OF_SERVICE","components":{}}"#.into(),
    ));
    let hang = FakeUpstream::start("c").await.unwrap();
    hang.set_health(HealthReply::Hang);
    let up = FakeUpstream::start("d").await.unwrap();
    up.set_health(HealthReply::Answer(
        200,
        r#"{"status":"UP","components":{"db":{"status":"UP"}}}"#.into(),
    ));
    let px = TestProxy::start(&app_yaml(
        &[(
            "blue",
            &[down_200.addr(), oos.addr(), hang.addr(), up.addr()],
        )],
        "blue",
        "",
    ))
    .await;
    let st = px.handle().status();
    let inst = |a: std::net::SocketAddr| {
        st.upstream("app")
            .unwrap()
            .pool("blue")
            .unwrap()
            .instances
            .iter()
            .find(|i| i.addr == a.to_string())
            .unwrap()
            .clone()
    };
    assert_eq!(inst(down_200.addr()).health, HealthState::Unhealthy);
    assert_eq!(
        inst(down_200.addr()).last_check.as_deref(),
        Some(r#"GET /actuator/health -> 200 {"status":"DOWN"}"#)
    );
    assert_eq!(inst(oos.addr()).health, HealthState::Unhealthy);
    assert!(inst(oos.addr())
        .last_check
        .unwrap()
        .contains("503 {\"status\":\"OUT_OF_SERVICE\""));
    assert_eq!(inst(hang.addr()).health, HealthState::Unhealthy);
    assert_eq!(
        inst(hang.addr()).last_check.as_deref(),
        Some("timeout after 100ms")
    );
    assert_eq!(inst(up.addr()).health, HealthState::Healthy);
    // The hanging endpoint does not stall the checker: checks keep coming.
    let n = hang.health_hits();
    eventually(|| hang.health_hits() >= n + 2).await;
    // Only the healthy instance gets traffic.
    for _ in 0..20 {
        assert_eq!(px.get("/").await.status, 200);
    }
    assert_eq!(up.hits(), 20);
    px.shutdown().await;

    // Non-JSON 200 with expect_json_status: [] is healthy; the same body with the default
    // ([UP]) is not.
    let plain = FakeUpstream::start("p").await.unwrap();
    plain.set_health(HealthReply::Answer(200, "ok".into()));
    let yaml = app_yaml(
        &[("blue", &[plain.addr()])],
        "blue",
        "    health: {interval: 100ms, timeout: 100ms, expect_json_status: []}\n",
    );
    let px = TestProxy::start(&yaml).await;
    assert_eq!(px.health("blue", plain.addr()), HealthState::Healthy);
    px.shutdown().await;
    let px = TestProxy::start(&app_yaml(&[("blue", &[plain.addr()])], "blue", "")).await;
    assert_eq!(px.health("blue", plain.addr()), HealthState::Unhealthy);
    let st = px.handle().status();
    let last = st.upstream("app").unwrap().pool("blue").unwrap().instances[0]
        .last_check
        .clone()
        .unwrap();
    assert!(last.contains("no JSON \"status\""), "{last}");
    px.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_instance_under_load_is_taken_out_and_comes_back() {
    trace_init();
    let a = FakeUpstream::builder("blue")
        .record(false)
        .start()
        .await
        .unwrap();
    let b = FakeUpstream::builder("blue")
        .record(false)
        .start()
        .await
        .unwrap();
    let px = TestProxy::start(&app_yaml(
        &[("blue", &[a.addr(), b.addr()])],
        "blue",
        "    health: {interval: 100ms, timeout: 100ms, healthy_threshold: 2, unhealthy_threshold: 3}\n    passive: {consecutive_failures: 5, eject_for: 1s}\n",
    ))
    .await;
    let load = Load::start(px.addr, 8);
    load.wait_more(300).await;
    assert!(b.hits() > 0);

    // 1. B crashes (connection refused): connect failures are retried on A, so no client sees
    //    an error; checks mark B unhealthy within unhealthy_threshold intervals.
    b.stop();
    eventually(|| px.health("blue", b.addr()) != HealthState::Healthy).await;
    load.wait_more(300).await;
    assert!(load.failures().is_empty(), "{:?}", load.failures());

    // 2. B restarts but is broken (503 everywhere, health DOWN): it gets no traffic at all.
    b.set_mode(Mode::Status(503));
    b.set_health(HealthReply::down());
    b.restart().await.unwrap();
    let hits = b.hits();
    load.wait_more(500).await;
    assert_eq!(b.hits(), hits, "an unhealthy instance gets no traffic");
    assert!(load.failures().is_empty());

    // 3. B recovers: back in rotation after healthy_threshold passes.
    b.set_mode(Mode::Normal);
    b.set_health(HealthReply::up());
    eventually(|| b.hits() > hits + 50).await;
    assert!(load.failures().is_empty());

    let (ok, failures) = load.stop().await;
    assert!(failures.is_empty(), "{failures:?}");
    eprintln!("crash, broken restart, recovery under load: {ok} requests, 0 failed");
    px.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passive_ejection_bounds_the_errors_of_an_instance_whose_checks_still_pass() {
    trace_init();
    let a = FakeUpstream::builder("blue")
        .record(false)
        .start()
        .await
        .unwrap();
    let b = FakeUpstream::builder("blue")
        .record(false)
        .start()
        .await
        .unwrap();
    let px = TestProxy::start(&app_yaml(
        &[("blue", &[a.addr(), b.addr()])],
        "blue",
        "    passive: {consecutive_failures: 5, eject_for: 30s}\n",
    ))
    .await;
    let load = Load::start(px.addr, 8);
    load.wait_more(300).await;
    // B answers 503 while its health endpoint still says UP: only passive ejection protects
    // the clients. Errors are bounded by the threshold (5), plus requests already in flight to
    // B when the 5th failure arrived (at most one per other client).
    b.set_mode(Mode::Status(503));
    eventually(|| px.health("blue", b.addr()) == HealthState::Ejected).await;
    // Requests already on their way to B when the 5th failure ejected it end with its 503 too:
    // let them finish (no new one goes to B) and reach their clients.
    let b_inflight = || {
        let st = px.handle().status();
        let pool = st.upstream("app").unwrap().pool("blue").unwrap().clone();
        pool.instances
            .iter()
            .find(|i| i.addr == b.addr().to_string())
            .map_or(0, |i| i.inflight)
    };
    eventually(|| b_inflight() == 0).await;
    load.wait_more(100).await;
    let at_ejection = load.failures().len();
    load.wait_more(500).await;
    let (_, failures) = load.stop().await;
    assert!(
        at_ejection >= 5,
        "ejected after 5 failures, saw {at_ejection}"
    );
    assert!(
        failures.len() <= 5 + 7,
        "{} client errors: {failures:?}",
        failures.len()
    );
    assert_eq!(failures.len(), at_ejection, "no errors after the ejection");
    let kinds: Vec<String> = px
        .handle()
        .events(200)
        .into_iter()
        .map(|r| r.kind)
        .collect();
    assert!(kinds.contains(&"eject".to_string()), "{kinds:?}");
    eprintln!(
        "passive ejection: {} client-visible errors (threshold 5, 8 clients)",
        failures.len()
    );
    px.shutdown().await;
}

#[tokio::test]
async fn the_last_instance_is_never_ejected_and_an_unhealthy_pool_fails_open() {
    trace_init();
    let only = FakeUpstream::start("blue").await.unwrap();
    only.set_mode(Mode::Status(503));
    let px = TestProxy::start(&app_yaml(
        &[("blue", &[only.addr()])],
        "blue",
        "    passive: {consecutive_failures: 2, eject_for: 30s}\n",
    ))
    .await;
    for _ in 0..10 {
        assert_eq!(px.get("/").await.status, 503);
    }
    assert_eq!(
        only.hits(),
        10,
        "the only instance keeps getting the requests"
    );
    assert_eq!(px.health("blue", only.addr()), HealthState::Healthy);
    px.shutdown().await;

    // Two instances failing their requests: one is ejected, never both.
    let a = FakeUpstream::start("blue").await.unwrap();
    let b = FakeUpstream::start("blue").await.unwrap();
    a.set_mode(Mode::Status(503));
    b.set_mode(Mode::Status(503));
    let px = TestProxy::start(&app_yaml(
        &[("blue", &[a.addr(), b.addr()])],
        "blue",
        "    passive: {consecutive_failures: 2, eject_for: 30s}\n",
    ))
    .await;
    for _ in 0..20 {
        px.get("/").await;
    }
    let ejected = [a.addr(), b.addr()]
        .iter()
        .filter(|x| px.health("blue", **x) == HealthState::Ejected)
        .count();
    assert_eq!(ejected, 1);
    px.shutdown().await;

    // Every instance unhealthy (health DOWN) but serving: fail open, log it once.
    a.set_mode(Mode::Normal);
    b.set_mode(Mode::Normal);
    a.set_health(HealthReply::down());
    b.set_health(HealthReply::down());
    let px = TestProxy::start(&app_yaml(&[("blue", &[a.addr(), b.addr()])], "blue", "")).await;
    assert_eq!(px.health("blue", a.addr()), HealthState::Unhealthy);
    for _ in 0..20 {
        assert_eq!(px.get("/").await.status, 200);
    }
    let fail_open: Vec<_> = px
        .handle()
        .events(100)
        .into_iter()
        .filter(|r| r.kind == "fail_open")
        .collect();
    assert_eq!(
        fail_open.len(),
        1,
        "logged once per transition: {fail_open:?}"
    );
    px.shutdown().await;
}

#[tokio::test]
async fn weight_is_gated_like_switch_and_force_is_recorded() {
    trace_init();
    let blue = FakeUpstream::start("blue").await.unwrap();
    let green = FakeUpstream::start("green").await.unwrap();
    green.set_health(HealthReply::down());
    let px = TestProxy::start(&app_yaml(
        &[("blue", &[blue.addr()]), ("green", &[green.addr()])],
        "blue",
        "",
    ))
    .await;
    let e = px.handle().set_weight(None, "green", 5).unwrap_err();
    assert_eq!(e.code, ErrorCode::Unhealthy);
    let r = px
        .ctl_call(Request::Weight {
            upstream: None,
            pool: "green".into(),
            weight: 5,
            min_healthy: Default::default(),
            force: true,
        })
        .await;
    assert!(r.ok, "{r:?}");
    let rec = px.handle().events(1).pop().unwrap();
    assert!(rec.forced && rec.kind == "weight", "{rec:?}");
    // Changing the weight of a pool that already has traffic is not gated again.
    px.handle().set_weight(None, "green", 10).unwrap();
    // --min-healthy 0 accepts an unhealthy pool without forcing.
    let r = px
        .ctl_call(Request::Switch {
            upstream: None,
            pool: "green".into(),
            drain: false,
            drain_ms: None,
            min_healthy: "0".parse().unwrap(),
            wait_healthy_ms: None,
            force: false,
        })
        .await;
    assert!(r.ok, "{r:?}");
    px.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_instances_are_checked_spread_over_the_interval() {
    trace_init();
    let mut ups = Vec::new();
    for _ in 0..100 {
        ups.push(FakeUpstream::start("blue").await.unwrap());
    }
    let addrs: Vec<std::net::SocketAddr> = ups.iter().map(|u| u.addr()).collect();
    let start = std::time::Instant::now();
    let px = TestProxy::start(&app_yaml(
        &[("blue", &addrs)],
        "blue",
        "    health: {interval: 1s, timeout: 500ms}\n",
    ))
    .await;
    eventually_within(Duration::from_secs(20), &mut || {
        ups.iter().all(|u| u.health_hits() >= 3)
    })
    .await;
    // First checks: spread over the first interval, not a thundering herd.
    let mut first: Vec<Duration> = ups
        .iter()
        .map(|u| u.health_seen()[0].duration_since(start))
        .collect();
    first.sort();
    let span = *first.last().unwrap() - first[0];
    assert!(
        span > Duration::from_millis(600),
        "first checks within {span:?}"
    );
    let busiest = first
        .iter()
        .map(|t| {
            first
                .iter()
                .filter(|u| **u >= *t && **u < *t + Duration::from_millis(50))
                .count()
        })
        .max()
        .unwrap();
    assert!(busiest <= 25, "{busiest} of 100 first checks within 50 ms");
    let st = px.handle().status();
    let healthy = st
        .upstream("app")
        .unwrap()
        .pool("blue")
        .unwrap()
        .instances
        .iter()
        .filter(|i| i.health == HealthState::Healthy)
        .count();
    assert_eq!(healthy, 100);
    px.shutdown().await;
}

/// `--wait-healthy` after a container was replaced at the same address: the instance is still
/// `healthy` from the old process's checks (3 failures are needed to turn it, 3 s here), but a
/// check made after the wait began fails, so the wait does not pass on the stale state; once a
/// new check passes, it does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_healthy_does_not_pass_on_the_state_of_a_replaced_container() {
    trace_init();
    let (_blue, green, px) = blue_green(
        false,
        "    health: {interval: 1s, timeout: 500ms, healthy_threshold: 1, unhealthy_threshold: 3}\n",
    )
    .await;
    let h = px.handle();
    eventually(move || {
        h.status().upstream("app").is_some_and(|u| {
            u.pools
                .iter()
                .all(|p| p.instances.iter().all(|i| i.health == HealthState::Healthy))
        })
    })
    .await;
    // "docker compose stop app_green; docker compose up -d app_green": the new one is booting.
    green.set_health(HealthReply::down());
    let r = px.ctl_call(switch("green", Some(1500))).await;
    let e = r
        .error
        .expect("the stale healthy state must not pass the wait");
    assert_eq!(e.code, ErrorCode::Timeout, "{}", e.message);
    let status = px.handle().status();
    let app = status.upstream("app").unwrap();
    assert_eq!(app.weights["blue"], 100);
    // The plain gate still sees the old state: that is what the wait protects against.
    let g = app.pools.iter().find(|p| p.name == "green").unwrap();
    assert_eq!(
        g.instances[0].health,
        HealthState::Healthy,
        "the test needs the stale state"
    );
    // Booted: the next check passes and the wait does.
    green.set_health(HealthReply::up());
    let r = px.ctl_call(switch("green", Some(5000))).await;
    assert!(r.ok, "{:?}", r.error);
    assert_eq!(
        px.handle().status().upstream("app").unwrap().weights["green"],
        100
    );
}
