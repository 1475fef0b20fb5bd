//! Fleets on etcd (issue 13, SPEC §9): real etcd (single node and a 3-node cluster on loopback
//! ports chosen at run time), real proxies, real traffic.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use switchyard_control::protocol::{FleetAck, FleetStatus};
use switchyard_control::{ErrorCode, Request, Weights};
use switchyard_tests::etcd::{Etcd, Relay};
use switchyard_tests::*;

fn fleet_yaml(
    blue: std::net::SocketAddr,
    green: std::net::SocketAddr,
    name: &str,
    endpoints: &[String],
    ttl: &str,
    extra: &str,
) -> String {
    let list: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
    let mut y = app_yaml(&[("blue", &[blue]), ("green", &[green])], "blue", extra);
    y.push_str(&format!(
        "fleet:\n  etcd: [{}]\n  prefix: /test/\n  name: {name}\n  lease_ttl: {ttl}\n",
        list.join(", ")
    ));
    y
}

/// etcd with `members` members, and the blue and green fake upstreams.
async fn etcd_and_colors(members: usize) -> (Etcd, FakeUpstream, FakeUpstream) {
    (
        Etcd::start(members).await,
        quiet_upstream("blue").await,
        quiet_upstream("green").await,
    )
}

/// A fleet proxy named `name` in front of `blue` and `green` (settled).
async fn fleet_proxy(
    blue: &FakeUpstream,
    green: &FakeUpstream,
    name: &str,
    endpoints: &[String],
    ttl: &str,
    extra: &str,
) -> TestProxy {
    TestProxy::start(&fleet_yaml(
        blue.addr(),
        green.addr(),
        name,
        endpoints,
        ttl,
        extra,
    ))
    .await
}

fn fleet(req: Request, timeout_ms: u64) -> Request {
    Request::Fleet {
        timeout_ms: Some(timeout_ms),
        request: Box::new(req),
    }
}

async fn fleet_status(px: &TestProxy) -> FleetStatus {
    let r = px
        .handle()
        .execute(Request::Fleet {
            timeout_ms: None,
            request: Box::new(Request::Status),
        })
        .await;
    serde_json::from_value(r.result.expect("fleet status")).unwrap()
}

fn color(r: &Reply) -> String {
    r.json()["color"].as_str().unwrap_or("?").to_string()
}

fn weights_of(px: &TestProxy) -> (u64, Weights) {
    let st = px.handle().status();
    let u = st.upstream("app").unwrap();
    (u.generation, u.weights.clone())
}

/// Wait (bounded: 30 s) until every proxy's link is up, `n` proxies are live, every proxy
/// serves the desired generation, and every proxy sees every instance healthy.
async fn wait_in_sync(pxs: &[&TestProxy], n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut ok = true;
        let mut last = String::new();
        for px in pxs {
            let f = fleet_status(px).await;
            let live = f.proxies.iter().filter(|p| p.live).count();
            // Pools at 0 may be missing from a proxy whose config lacks them.
            let nonzero = |w: &Weights| -> Weights {
                w.iter()
                    .filter(|(_, v)| **v > 0)
                    .map(|(k, v)| (k.clone(), *v))
                    .collect()
            };
            let desired = f
                .desired
                .first()
                .map(|d| (d.generation, nonzero(&d.weights)));
            let synced = f.proxies.iter().filter(|p| p.live).all(|p| {
                p.upstreams
                    .iter()
                    .all(|u| u.in_sync && u.unhealthy.is_empty())
            });
            let local = weights_of(px);
            let local = (local.0, nonzero(&local.1));
            if !f.connected || live != n || !synced || desired != Some(local.clone()) {
                ok = false;
                last = format!("{f:?} local {local:?}");
            }
        }
        if ok {
            return;
        }
        assert!(Instant::now() < deadline, "fleet not in sync: {last}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn pct(sorted: &[u64], p: f64) -> u64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Three proxies, 50 fleet switches (alternately sent to each proxy) under keep-alive load on
/// all three: 0 failed requests; every switch is acknowledged by all three; right after each
/// acknowledgement every proxy sends new requests (also on old keep-alive connections) to the
/// new color. Prints the skew (first to last proxy reporting) and the switch latency.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_fleet_switches_under_load_on_three_proxies_fail_nothing_and_agree() {
    trace_init();
    let (etcd, blue, green) = etcd_and_colors(1).await;
    let mut pxs = Vec::new();
    for name in ["a", "b", "c"] {
        pxs.push(fleet_proxy(&blue, &green, name, &etcd.endpoints(), "3s", "").await);
    }
    let all: Vec<&TestProxy> = pxs.iter().collect();
    wait_in_sync(&all, 3).await;

    let stop = Arc::new(AtomicBool::new(false));
    // (proxy, started, color, finished)
    type Log = Vec<(usize, Instant, String, Instant)>;
    let log: Arc<Mutex<Log>> = Arc::default();
    let mut clients = Vec::new();
    for (p, px) in pxs.iter().enumerate() {
        for _ in 0..8 {
            let (stop, log, addr) = (stop.clone(), log.clone(), px.addr);
            clients.push(tokio::spawn(async move {
                let mut c = Conn::open(addr).await.unwrap();
                let (mut errors, mut mine) = (Vec::new(), Vec::new());
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) && n < 500_000 {
                    n += 1;
                    let started = Instant::now();
                    match c.get("/").await {
                        Ok(r) if r.status == 200 => {
                            mine.push((p, started, color(&r), Instant::now()))
                        }
                        Ok(r) => errors.push(format!("proxy {p}: status {}", r.status)),
                        Err(e) => errors.push(format!("proxy {p}: {e}")),
                    }
                }
                log.lock().unwrap().extend(mine);
                errors
            }));
        }
    }
    eventually(|| blue.hits() > 300).await;
    let mut switches: Vec<(Instant, Instant, &str)> = Vec::new();
    let (mut skews, mut latencies) = (Vec::new(), Vec::new());
    for i in 0..50 {
        let target = if i % 2 == 0 { "green" } else { "blue" };
        let via = &pxs[i % 3];
        let sent = Instant::now();
        let reply = via.ctl_call(fleet(switch_req(target, None), 10_000)).await;
        let acked = Instant::now();
        assert!(reply.ok, "switch {i} to {target}: {:?}", reply.error);
        let result = reply.result.unwrap();
        let acks: Vec<FleetAck> = serde_json::from_value(result["fleet"].clone()).unwrap();
        assert_eq!(acks.len(), 3, "{acks:?}");
        assert!(acks.iter().all(|a| a.applied), "{acks:?}");
        let after: Vec<u64> = acks.iter().filter_map(|a| a.after_ms).collect();
        assert_eq!(after.len(), 3);
        skews.push(after.iter().max().unwrap() - after.iter().min().unwrap());
        latencies.push(acked.duration_since(sent).as_millis() as u64);
        switches.push((sent, acked, target));
        // No proxy sends a request that starts now to the old color.
        for (p, px) in pxs.iter().enumerate() {
            let r = px.get("/").await;
            assert_eq!(color(&r), target, "proxy {p} after switch {i}");
        }
        let before = blue.hits() + green.hits();
        eventually(|| blue.hits() + green.hits() > before + 300).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut errors = Vec::new();
    for c in clients {
        errors.extend(c.await.unwrap());
    }
    assert!(
        errors.is_empty(),
        "{} failed requests, first: {:?}",
        errors.len(),
        errors.first()
    );
    let log = std::mem::take(&mut *log.lock().unwrap());
    let mut checked = 0;
    for (k, (_, acked, target)) in switches.iter().enumerate() {
        let next_sent = switches.get(k + 1).map(|s| s.0);
        for (p, started, got, done) in &log {
            if *started > *acked && next_sent.is_none_or(|n| *done < n) {
                checked += 1;
                assert_eq!(got, target, "proxy {p}: a request started after switch {k} to {target} was acknowledged went to the old color");
            }
        }
    }
    assert!(checked > 1_000, "only {checked} requests checked");
    skews.sort_unstable();
    latencies.sort_unstable();
    eprintln!(
        "fleet: 50 switches on 3 proxies under load: {} requests, 0 failed, {checked} checked after acknowledgements; skew (first to last proxy) ms p50 {} p90 {} p99 {} max {}; switch latency ms p50 {} p90 {} p99 {} max {}",
        log.len(),
        pct(&skews, 0.5),
        pct(&skews, 0.9),
        pct(&skews, 0.99),
        skews.last().unwrap(),
        pct(&latencies, 0.5),
        pct(&latencies, 0.9),
        pct(&latencies, 0.99),
        latencies.last().unwrap()
    );
    for px in pxs {
        px.shutdown().await;
    }
}

/// `switch green` on one proxy and `switch blue --fleet` on another, decided on the same state
/// at the same moment: exactly one wins, the other gets `conflict` and changes nothing; both
/// proxies end on the winner's state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_switches_on_two_proxies_exactly_one_wins() {
    trace_init();
    let (etcd, blue, green) = etcd_and_colors(1).await;
    let a = fleet_proxy(&blue, &green, "a", &etcd.endpoints(), "3s", "").await;
    let b = fleet_proxy(&blue, &green, "b", &etcd.endpoints(), "3s", "").await;
    wait_in_sync(&[&a, &b], 2).await;
    for round in 0..5 {
        // A split, so that both switches are changes.
        let r = a
            .ctl_call(fleet(weights_req(&[("blue", 50), ("green", 50)]), 10_000))
            .await;
        assert!(r.ok, "{r:?}");
        let (gen_before, _) = weights_of(&a);
        // Both read the revision they build on, then wait 300 ms before writing: the two
        // compare-and-swaps meet.
        a.handle().set_fleet_write_delay(Duration::from_millis(300));
        b.handle().set_fleet_write_delay(Duration::from_millis(300));
        let (ra, rb) = tokio::join!(
            a.ctl_call(switch_req("green", None)),
            b.ctl_call(fleet(switch_req("blue", None), 10_000))
        );
        a.handle().set_fleet_write_delay(Duration::ZERO);
        b.handle().set_fleet_write_delay(Duration::ZERO);
        let (winner, loser) = match (ra.ok, rb.ok) {
            (true, false) => ("green", rb),
            (false, true) => ("blue", ra),
            _ => panic!("round {round}: exactly one must win: {ra:?} {rb:?}"),
        };
        let e = loser.error.unwrap();
        assert_eq!(e.code, ErrorCode::Conflict, "{e:?}");
        assert!(
            e.message.contains("another change reached the fleet first"),
            "{}",
            e.message
        );
        wait_in_sync(&[&a, &b], 2).await;
        for px in [&a, &b] {
            let (generation, w) = weights_of(px);
            assert_eq!(w[winner], 100, "round {round}: {w:?}");
            assert_eq!(
                generation,
                gen_before + 1,
                "round {round}: one change only, the loser changed nothing"
            );
            assert_eq!(color(&px.get("/").await), winner);
        }
    }
    a.shutdown().await;
    b.shutdown().await;
}

/// A 3-node etcd cluster loses its leader while a switch is being written: the switch
/// completes or fails with a clear error, and the three proxies never end up disagreeing:
/// they all serve the desired state etcd holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_etcd_leader_killed_mid_switch_leaves_no_proxy_diverged() {
    trace_init();
    let (mut etcd, blue, green) = etcd_and_colors(3).await;
    let mut pxs = Vec::new();
    for name in ["a", "b", "c"] {
        pxs.push(fleet_proxy(&blue, &green, name, &etcd.endpoints(), "3s", "").await);
    }
    let all: Vec<&TestProxy> = pxs.iter().collect();
    wait_in_sync(&all, 3).await;
    let mut outcomes = Vec::new();
    for round in 0..3 {
        let target = if round % 2 == 0 { "green" } else { "blue" };
        let leader = {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if let Some(l) = etcd.leader().await {
                    break l;
                }
                assert!(Instant::now() < deadline, "no etcd leader");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        let via = &pxs[round % 3];
        let before = weights_of(via).1;
        // The change waits 200 ms between reading its base revision and writing; the leader
        // dies in that gap.
        via.handle()
            .set_fleet_write_delay(Duration::from_millis(200));
        let socket = via.socket();
        let req = fleet(switch_req(target, None), 8_000);
        let call = tokio::spawn(async move {
            switchyard_control::ControlClient::connect(&socket)
                .await
                .unwrap()
                .request(&req)
                .await
                .unwrap()
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        etcd.kill(leader);
        let reply = call.await.unwrap();
        via.handle().set_fleet_write_delay(Duration::ZERO);
        match &reply.error {
            None => outcomes.push(format!("round {round}: switched")),
            Some(e) => {
                assert!(
                    matches!(
                        e.code,
                        ErrorCode::FleetUnavailable | ErrorCode::Conflict | ErrorCode::Timeout
                    ),
                    "round {round}: {e:?}"
                );
                outcomes.push(format!("round {round}: {:?}: {}", e.code, e.message));
            }
        }
        etcd.restart(leader).await;
        wait_in_sync(&all, 3).await;
        let (_, w) = weights_of(&pxs[0]);
        for px in &pxs {
            assert_eq!(weights_of(px).1, w, "round {round}: the proxies disagree");
        }
        match reply.error.map(|e| e.code) {
            None => assert_eq!(w[target], 100, "round {round}: acknowledged but not served"),
            // "Not applied" must be true: nothing changed anywhere.
            Some(ErrorCode::FleetUnavailable | ErrorCode::Conflict) => {
                assert_eq!(w, before, "round {round}: refused, yet the fleet changed")
            }
            // Outcome unknown: either state, as long as all agree (checked above).
            Some(_) => {}
        }
    }
    eprintln!("fleet leader kill: {outcomes:?}");
    for px in pxs {
        px.shutdown().await;
    }
}

/// One proxy's link to etcd is cut: a fleet switch exits 4 naming it (the others switched; it
/// serves its last state); it converges once the link returns. Then etcd goes down entirely:
/// traffic goes on, changes are refused with a clear error, the link metric says so; and
/// once etcd is back, changes work again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_link_is_named_and_converges_and_etcd_down_refuses_changes_not_traffic() {
    trace_init();
    let mut etcd = Etcd::start(1).await;
    let member: std::net::SocketAddr = ([127, 0, 0, 1], etcd.members[0].client_port).into();
    let relay = Relay::start(member).await;
    let blue = quiet_upstream("blue").await;
    let green = quiet_upstream("green").await;
    let a = fleet_proxy(&blue, &green, "a", &etcd.endpoints(), "5s", "").await;
    let b = fleet_proxy(&blue, &green, "b", &etcd.endpoints(), "5s", "").await;
    let c = fleet_proxy(&blue, &green, "c", &[relay.url()], "5s", "").await;
    wait_in_sync(&[&a, &b, &c], 3).await;

    relay.cut();
    let r = a.ctl_call(fleet(switch_req("green", None), 1_500)).await;
    let e = r.error.expect("c cannot apply");
    assert_eq!(e.code, ErrorCode::Timeout, "{e:?}");
    assert_eq!(e.code.exit_code(), 4);
    assert!(e.message.contains("c (at generation"), "{}", e.message);
    assert!(!e.message.contains("a (at"), "{}", e.message);
    assert_eq!(color(&a.get("/").await), "green");
    assert_eq!(color(&b.get("/").await), "green");
    assert_eq!(
        color(&c.get("/").await),
        "blue",
        "c serves its last applied state"
    );
    let f = fleet_status(&a).await;
    let cs = f.proxies.iter().find(|p| p.name == "c").unwrap();
    assert!(cs.live && cs.upstreams.iter().all(|u| !u.in_sync), "{f:?}");

    relay.restore();
    wait_in_sync(&[&a, &b, &c], 3).await;
    assert_eq!(color(&c.get("/").await), "green", "c converged");

    // etcd down entirely.
    etcd.kill(0);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !a
        .handle()
        .metrics_text()
        .lines()
        .any(|l| l == "switchyard_fleet_connected 0")
    {
        assert!(Instant::now() < deadline, "the link metric never said down");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for px in [&a, &b, &c] {
        for _ in 0..20 {
            let r = px.get("/").await;
            assert_eq!(r.status, 200);
            assert_eq!(color(&r), "green");
        }
    }
    let r = a.ctl_call(switch_req("blue", None)).await;
    let e = r.error.expect("refused while etcd is down");
    assert_eq!(e.code, ErrorCode::FleetUnavailable, "{e:?}");
    assert!(e.message.contains("cannot be reached"), "{}", e.message);
    assert_eq!(color(&a.get("/").await), "green", "nothing applied locally");
    let f = fleet_status(&a).await;
    assert!(!f.connected && f.down_since.is_some(), "{f:?}");

    etcd.restart(0).await;
    wait_in_sync(&[&a, &b, &c], 3).await;
    let r = b.ctl_call(fleet(switch_req("blue", None), 10_000)).await;
    assert!(r.ok, "{r:?}");
    for px in [&a, &b, &c] {
        assert_eq!(color(&px.get("/").await), "blue");
    }
    for px in [a, b, c] {
        px.shutdown().await;
    }
}

/// A fleet canary whose errors only one proxy sees: the elected proxy — which gets no canary
/// traffic itself — rolls it back from the sum of every proxy's counts, once, for the whole
/// fleet; the other proxy, which saw the errors, does not decide.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_canary_failing_behind_one_proxy_is_rolled_back_by_the_leader() {
    trace_init();
    let (etcd, blue, green) = etcd_and_colors(1).await;
    green.set_mode(Mode::Status(500));
    let extra = "    canary:\n      sticky: none\n      auto_rollback: {error_rate: 0.05, for: 1s, window: 3s, min_requests: 20}\n";
    let a = fleet_proxy(&blue, &green, "a", &etcd.endpoints(), "3s", extra).await;
    let b = fleet_proxy(&blue, &green, "b", &etcd.endpoints(), "3s", extra).await;
    wait_in_sync(&[&a, &b], 2).await;
    let leader = fleet_status(&a).await.leader.expect("a leader is elected");
    let (lead, follow) = if leader == "a" { (&a, &b) } else { (&b, &a) };
    assert_eq!(
        fleet_status(follow).await.leader.as_deref(),
        Some(leader.as_str())
    );

    let r = follow
        .ctl_call(fleet(weights_req(&[("blue", 50), ("green", 50)]), 10_000))
        .await;
    assert!(r.ok, "{r:?}");
    // Traffic through the follower only, until the canary is gone (bounded: 20 s).
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut sent = 0;
    while weights_of(follow).1["green"] > 0 {
        assert!(
            Instant::now() < deadline,
            "not rolled back after {sent} requests"
        );
        let _ = follow.get("/").await;
        sent += 1;
    }
    wait_in_sync(&[&a, &b], 2).await;
    assert_eq!(weights_of(lead).1["green"], 0);
    let lead_events = lead.handle().events(200);
    let rollback = lead_events
        .iter()
        .find(|e| e.kind == "auto_rollback")
        .unwrap_or_else(|| panic!("the leader decided: {lead_events:?}"));
    assert!(rollback.message.contains("green"), "{}", rollback.message);
    let follow_events = follow.handle().events(200);
    assert!(
        !follow_events.iter().any(|e| e.kind == "auto_rollback"),
        "only the leader decides: {follow_events:?}"
    );
    assert!(
        follow_events
            .iter()
            .any(|e| e.kind == "fleet" && e.message.contains("written by")),
        "the follower applied the leader's rollback: {follow_events:?}"
    );
    // The leader saw no canary request itself: its decision came from the follower's counts.
    let lead_green: f64 = lead
        .handle()
        .metrics_text()
        .lines()
        .filter(|l| {
            l.starts_with("switchyard_http_requests_total{") && l.contains("pool=\"green\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(lead_green, 0.0, "the leader served no canary request");
    let info = lead
        .handle()
        .status()
        .upstream("app")
        .unwrap()
        .last_rollback
        .clone()
        .unwrap();
    assert!(info.requests >= 20 && info.errors >= 20, "{info:?}");
    eprintln!(
        "fleet canary: rolled back by {leader} after {sent} requests through the other proxy: {}",
        info.detail
    );
    a.shutdown().await;
    b.shutdown().await;
}

/// The health gate of a fleet switch is the union of every proxy's view: green healthy from
/// one proxy but unreachable from another is refused, naming the proxy and what it sees; with
/// `--wait-healthy` the switch goes through once every proxy sees it healthy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switch_needs_the_pool_healthy_from_every_proxy() {
    trace_init();
    let (etcd, blue, green) = etcd_and_colors(1).await;
    // The same instance name, resolved differently by each proxy: b cannot reach green.
    let yaml = |name: &str| {
        let mut y = app_yaml_pools(
            &format!(
                "      blue: [\"{}\"]\n      green: [\"green-app:{}\"]\n",
                blue.addr(),
                green.addr().port()
            ),
            "blue",
            "",
        );
        y.push_str(&format!(
            "fleet:\n  etcd: [\"{}\"]\n  prefix: /test/\n  name: {name}\n  lease_ttl: 3s\n",
            etcd.endpoints()[0]
        ));
        y
    };
    let dns_a = MapResolver::new();
    dns_a.set("green-app", green.addr());
    let dns_b = MapResolver::new();
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    dns_b.set("green-app", dead); // nothing listens there once the listener is dropped
    let a = TestProxy::start_with(
        &yaml("a"),
        switchyard_proxy::StartOptions::default().with_resolver(dns_a.clone()),
    )
    .await;
    let b = TestProxy::start_with(
        &yaml("b"),
        switchyard_proxy::StartOptions::default().with_resolver(dns_b.clone()),
    )
    .await;
    // Both live, b sees green down.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let f = fleet_status(&a).await;
        let b_sees = f
            .proxies
            .iter()
            .find(|p| p.name == "b")
            .and_then(|p| p.upstreams.first())
            .map(|u| u.unhealthy.clone())
            .unwrap_or_default();
        if f.connected
            && b_sees
                .iter()
                .any(|i| i.starts_with("green/green-app") && i.ends_with("(unhealthy)"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "b never reported green down: {f:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = a.ctl_call(fleet(switch_req("green", None), 5_000)).await;
    let e = r.error.expect("refused: b cannot reach green");
    assert_eq!(e.code, ErrorCode::Unhealthy, "{e:?}");
    assert!(
        e.message
            .contains("healthy from this proxy, unhealthy from b"),
        "{}",
        e.message
    );
    assert_eq!(color(&a.get("/").await), "blue");
    // b's DNS gets the right answer: with --wait-healthy the switch goes through as soon as
    // every proxy sees green healthy.
    let waiting = {
        let socket = a.socket();
        tokio::spawn(async move {
            switchyard_control::ControlClient::connect(&socket)
                .await
                .unwrap()
                .request(&fleet(switch_req("green", Some(20_000)), 10_000))
                .await
                .unwrap()
        })
    };
    dns_b.set("green-app", green.addr());
    let r = waiting.await.unwrap();
    assert!(r.ok, "{r:?}");
    assert_eq!(color(&a.get("/").await), "green");
    assert_eq!(color(&b.get("/").await), "green");
    a.shutdown().await;
    b.shutdown().await;
}

/// A proxy whose config lacks a pool the fleet gives weight to (a config change rolled out to
/// one host first): it keeps serving its last state, reports why, is named by the fleet
/// command (exit 4), refuses local changes of that upstream instead of overwriting the fleet;
/// once its config has the pool (reload), it serves the fleet's state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_whose_config_does_not_fit_is_named_refuses_changes_and_converges_after_reload() {
    trace_init();
    let (etcd, blue, green) = etcd_and_colors(1).await;
    let purple = quiet_upstream("purple").await;
    let fleet_part = |name: &str| {
        format!(
            "fleet:\n  etcd: [\"{}\"]\n  prefix: /test/\n  name: {name}\n  lease_ttl: 3s\n",
            etcd.endpoints()[0]
        )
    };
    let with_purple = |name: &str| {
        app_yaml(
            &[
                ("blue", &[blue.addr()]),
                ("green", &[green.addr()]),
                ("purple", &[purple.addr()]),
            ],
            "blue",
            "",
        ) + &fleet_part(name)
    };
    let without = app_yaml(
        &[("blue", &[blue.addr()]), ("green", &[green.addr()])],
        "blue",
        "",
    ) + &fleet_part("b");
    let a = TestProxy::start(&with_purple("a")).await;
    let b = TestProxy::start_from_file(&without).await;
    wait_in_sync(&[&a, &b], 2).await;

    let r = a
        .ctl_call(fleet(weights_req(&[("blue", 90), ("purple", 10)]), 1_500))
        .await;
    let e = r.error.expect("b cannot apply it");
    assert_eq!(e.code, ErrorCode::Timeout, "{e:?}");
    assert!(
        e.message.contains("b (at generation") && e.message.contains("no such pool"),
        "{}",
        e.message
    );
    assert_eq!(weights_of(&a).1["purple"], 10);
    assert_eq!(weights_of(&b).1["blue"], 100, "b keeps its last state");
    let f = fleet_status(&a).await;
    let bs = f.proxies.iter().find(|p| p.name == "b").unwrap();
    assert!(
        bs.upstreams[0].error.is_some() && !bs.upstreams[0].in_sync,
        "{f:?}"
    );
    // b refuses to overwrite the fleet with its own state.
    let r = b.ctl_call(switch_req("green", None)).await;
    let e = r.error.expect("refused");
    assert_eq!(e.code, ErrorCode::Invalid, "{e:?}");
    assert!(
        e.message.contains("cannot serve the fleet's desired state"),
        "{}",
        e.message
    );
    assert_eq!(
        weights_of(&a).1["purple"],
        10,
        "the fleet's state is untouched"
    );

    // b gets the pool: a reload, and it serves the fleet's state.
    let fixed = with_purple("b");
    b.write_config(&fixed);
    let r = b.ctl_call(Request::Reload).await;
    assert!(r.ok, "{r:?}");
    wait_in_sync(&[&a, &b], 2).await;
    assert_eq!(weights_of(&b).1["purple"], 10);
    // And a change from b reaches a.
    let r = b.ctl_call(fleet(switch_req("green", None), 10_000)).await;
    assert!(r.ok, "{r:?}");
    assert_eq!(color(&a.get("/").await), "green");
    // A reload that makes b unfit (purple has weight, b's config drops it): b says so and is
    // named, it does not pass for in sync.
    let r = a
        .ctl_call(fleet(weights_req(&[("green", 80), ("purple", 20)]), 10_000))
        .await;
    assert!(r.ok, "{r:?}");
    b.write_config(&without);
    assert!(b.ctl_call(Request::Reload).await.ok);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let f = fleet_status(&a).await;
        let bs = f.proxies.iter().find(|p| p.name == "b").unwrap();
        if bs
            .upstreams
            .first()
            .is_some_and(|u| u.error.is_some() && !u.in_sync)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "b never said it does not fit: {f:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = a
        .ctl_call(fleet(weights_req(&[("green", 70), ("purple", 30)]), 1_500))
        .await;
    let e = r.error.expect("b cannot apply it");
    assert_eq!(e.code, ErrorCode::Timeout, "{e:?}");
    assert!(e.message.contains("b (at generation"), "{}", e.message);
    a.shutdown().await;
    b.shutdown().await;
}

/// etcd lost for good and recreated empty (its revisions start over): the proxies keep
/// serving, seed the new cluster with their state, and fleet changes work again (none is
/// refused as a conflict against the old cluster's revisions).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recreated_empty_etcd_is_seeded_again_and_changes_work() {
    trace_init();
    let (mut etcd, blue, green) = etcd_and_colors(1).await;
    let a = fleet_proxy(&blue, &green, "a", &etcd.endpoints(), "3s", "").await;
    let b = fleet_proxy(&blue, &green, "b", &etcd.endpoints(), "3s", "").await;
    wait_in_sync(&[&a, &b], 2).await;
    // Push the old cluster's revisions well above what the new one will start with.
    for i in 0..10 {
        let target = if i % 2 == 0 { "green" } else { "blue" };
        let r = a.ctl_call(fleet(switch_req(target, None), 10_000)).await;
        assert!(r.ok, "{r:?}");
    }
    assert_eq!(color(&a.get("/").await), "blue");
    etcd.wipe_and_restart(0).await;
    wait_in_sync(&[&a, &b], 2).await;
    for (px, target) in [(&b, "green"), (&a, "blue"), (&b, "green")] {
        let r = px.ctl_call(fleet(switch_req(target, None), 10_000)).await;
        assert!(r.ok, "{r:?}");
        assert_eq!(color(&a.get("/").await), target);
        assert_eq!(color(&b.get("/").await), target);
    }
    a.shutdown().await;
    b.shutdown().await;
}

/// A binary upgrade of a fleet proxy, three times under a fleet that keeps changing: the new
/// process joins under the same name, serves the fleet's state, and fleet changes from it and
/// from the other proxy are applied everywhere (none refused as a conflict), with no failed
/// request on the upgraded proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_proxy_upgraded_in_place_rejoins_and_changes_keep_working() {
    trace_init();
    let (etcd, blue, green) = etcd_and_colors(1).await;
    // A long lease: leadership must pass at the handover, not when the lease runs out.
    let yaml = |name: &str| {
        fleet_yaml(
            blue.addr(),
            green.addr(),
            name,
            &etcd.endpoints(),
            "10s",
            "",
        )
    };
    // b starts first: it is the leader, and it is the one upgraded.
    let mut b = TestProxy::start(&yaml("b")).await;
    let a = TestProxy::start(&yaml("a")).await;
    wait_in_sync(&[&a, &b], 2).await;
    assert_eq!(fleet_status(&a).await.leader.as_deref(), Some("b"));
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (stop, addr) = (stop.clone(), b.addr);
        tokio::spawn(async move {
            let (mut ok, mut errors) = (0u64, Vec::new());
            while !stop.load(Ordering::Relaxed) && ok < 1_000_000 {
                match request(addr, "GET", "/", &[], bytes::Bytes::new()).await {
                    Ok(r) if r.status == 200 => ok += 1,
                    Ok(r) => errors.push(format!("status {}", r.status)),
                    Err(e) => errors.push(e),
                }
            }
            (ok, errors)
        })
    };
    for round in 0..3 {
        let (old, new) = match b.upgrade(&yaml("b")).await {
            Ok(x) => x,
            Err((_, e)) => panic!("round {round}: upgrade failed: {e}"),
        };
        b = new;
        let handed = Instant::now();
        // The old process left the fleet at the handover: a leader again well within the
        // 10 s lease (the new process or a).
        loop {
            let leader = fleet_status(&a).await.leader;
            let live_leaders = [a.handle().metrics_text(), b.handle().metrics_text()]
                .iter()
                .filter(|m| m.lines().any(|l| l == "switchyard_fleet_leader 1"))
                .count();
            if leader.is_some() && live_leaders == 1 {
                break;
            }
            assert!(
                handed.elapsed() < Duration::from_secs(5),
                "round {round}: no leader 5 s after the handover ({leader:?}, {live_leaders} live)"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        old.shutdown().await;
        wait_in_sync(&[&a, &b], 2).await;
        for (px, target) in [(&b, "green"), (&a, "blue")] {
            let r = px.ctl_call(fleet(switch_req(target, None), 10_000)).await;
            assert!(r.ok, "round {round}: {r:?}");
            assert_eq!(color(&a.get("/").await), target);
            assert_eq!(color(&b.get("/").await), target);
        }
    }
    stop.store(true, Ordering::Relaxed);
    let (ok, errors) = load.await.unwrap();
    assert!(
        errors.is_empty(),
        "{} failed of {}: {:?}",
        errors.len(),
        ok,
        errors.first()
    );
    assert!(ok > 100, "{ok} requests");
    a.shutdown().await;
    b.shutdown().await;
}
