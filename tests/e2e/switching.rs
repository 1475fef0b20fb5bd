//! Atomic switching, drain, weights, rollback, pool changes, persistence (issue 3).

use bytes::Bytes;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use switchyard_control::{ErrorCode, Request, Weights};
use switchyard_tests::*;

fn switch(pool: &str) -> Request {
    switch_req(pool, None)
}

fn color(r: &Reply) -> String {
    r.json()["color"].as_str().unwrap_or("?").to_string()
}

/// 64 keep-alive clients hammer the proxy while the control socket flips blue/green 60 times.
/// Zero failures, zero non-2xx; and every request that started after a switch was acknowledged
/// (and before the next switch was sent) was served by the new color — also on connections
/// opened long before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_switches_under_keepalive_load_fail_nothing_and_are_atomic() {
    trace_init();
    let (blue, green, px) = blue_green(false, "").await;
    let stop = Arc::new(AtomicBool::new(false));
    // (started, color, path, finished) per request.
    type Log = Vec<(Instant, String, String, Instant)>;
    let log: Arc<Mutex<Log>> = Arc::default();
    let mut clients = Vec::new();
    for cid in 0..64 {
        let (stop, log, addr) = (stop.clone(), log.clone(), px.addr);
        clients.push(tokio::spawn(async move {
            let mut c = Conn::open(addr).await.unwrap();
            let mut errors = Vec::new();
            let mut mine = Vec::new();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) && n < 200_000 {
                n += 1;
                let started = Instant::now();
                let path = format!("/?c={cid}&n={n}");
                match c.get(&path).await {
                    Ok(r) if r.status == 200 && r.json()["path"] == path.as_str() => {
                        mine.push((started, color(&r), path.clone(), Instant::now()))
                    }
                    Ok(r) if r.status == 200 => {
                        errors.push(format!("asked {path}, answered {}", r.text()))
                    }
                    Ok(r) => errors.push(format!("status {}", r.status)),
                    Err(e) => errors.push(e),
                }
            }
            log.lock().unwrap().extend(mine);
            errors
        }));
    }
    // Let the load build up, then switch 60 times, recording send and acknowledgement times.
    eventually(|| blue.hits() > 500).await;
    let mut ctl = px.ctl().await;
    let mut switches: Vec<(Instant, Instant, &str)> = Vec::new();
    for i in 0..60 {
        let target = if i % 2 == 0 { "green" } else { "blue" };
        let sent = Instant::now();
        let reply = ctl.request(&switch(target)).await.unwrap();
        let acked = Instant::now();
        assert!(reply.ok, "{reply:?}");
        switches.push((sent, acked, target));
        // Traffic between switches.
        let before = blue.hits() + green.hits();
        eventually(|| blue.hits() + green.hits() > before + 1000).await;
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
        for (started, got, path, done) in log.iter() {
            // Started after this switch was acknowledged and finished before the next one was
            // sent: routed by this switch's state, whatever connection it used.
            if *started > *acked && next_sent.is_none_or(|n| *done < n) {
                checked += 1;
                assert_eq!(
                    got,
                    target,
                    "{path} started {:?} after switch {k} to {target} was acknowledged and went to the old pool",
                    started.duration_since(*acked)
                );
            }
        }
    }
    assert!(checked > 5_000, "only {checked} requests checked");
    eprintln!(
        "switch under load: {} requests, 0 failed, {checked} checked for atomicity, 60 switches",
        log.len()
    );
    px.shutdown().await;
}

#[tokio::test]
async fn a_slow_request_on_blue_finishes_after_the_switch_and_drain_waits_for_it() {
    trace_init();
    let (_blue, _green, px) = blue_green(true, "").await;
    let addr = px.addr;
    let slow =
        tokio::spawn(async move { request(addr, "GET", "/slow?ms=3000", &[], Bytes::new()).await });
    eventually(|| px.inflight("blue") == 1).await;

    // switch green --drain 1s: switched, but exits with a timeout naming the pending request.
    let mut ctl = px.ctl().await;
    let mut events = Vec::new();
    let reply = ctl
        .call(&switch_drain_req("green", 1000), |e| events.push(e.clone()))
        .await
        .unwrap();
    let e = reply.error.expect("drain times out");
    assert_eq!(e.code, ErrorCode::Timeout);
    assert!(
        e.message
            .contains("blue still has 1 request(s) in flight after 1s"),
        "{}",
        e.message
    );
    assert!(!events.is_empty(), "progress was reported");
    assert_eq!(
        color(&px.get("/").await),
        "green",
        "the switch itself happened"
    );

    // drain blue: reports 1 in flight, then drained.
    let mut seen_inflight = Vec::new();
    let reply = ctl
        .call(
            &Request::Drain {
                upstream: None,
                pool: "blue".into(),
                timeout_ms: Some(10_000),
            },
            |e| {
                if let switchyard_control::Event::Draining { inflight, .. } = e {
                    seen_inflight.push(inflight["blue"]);
                }
            },
        )
        .await
        .unwrap();
    assert!(reply.ok, "{reply:?}");
    assert_eq!(seen_inflight.first(), Some(&1), "{seen_inflight:?}");
    assert_eq!(seen_inflight.last(), Some(&0), "{seen_inflight:?}");
    let r = slow.await.unwrap().unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(color(&r), "blue", "the in-flight request finished on blue");
    assert_eq!(px.inflight("blue"), 0);

    // switch back with --drain 10s: returns 0 only after the slow request completed.
    let slow =
        tokio::spawn(async move { request(addr, "GET", "/slow?ms=1500", &[], Bytes::new()).await });
    eventually(|| px.inflight("green") == 1).await;
    let reply = ctl
        .request(&switch_drain_req("blue", 10_000))
        .await
        .unwrap();
    assert!(reply.ok, "{reply:?}");
    assert!(slow.is_finished() || px.inflight("green") == 0);
    let r = slow.await.unwrap().unwrap();
    assert_eq!((r.status, color(&r)), (200, "green".to_string()));
    let change: switchyard_control::Change = serde_json::from_value(reply.result.unwrap()).unwrap();
    assert!(change.drain.unwrap().drained);

    // drain of a pool that still has weight is refused.
    let reply = px
        .ctl_call(Request::Drain {
            upstream: None,
            pool: "blue".into(),
            timeout_ms: None,
        })
        .await;
    assert_eq!(reply.error.unwrap().code, ErrorCode::Invalid);
    px.shutdown().await;
}

#[tokio::test]
async fn inflight_returns_to_zero_on_every_exit_path() {
    trace_init();
    let up = FakeUpstream::start("blue").await.unwrap();
    let px = TestProxy::start(&app_yaml(
        &[("blue", &[up.addr()])],
        "blue",
        "    read_timeout: 500ms\n    retries: 0\n",
    ))
    .await;
    let addr = px.addr;

    // Client abort: the client goes away while the upstream is still working.
    {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        use tokio::io::AsyncWriteExt;
        s.write_all(b"GET /slow?ms=400 HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .unwrap();
        // Wait until the app is working on it, not only until the proxy counted it. Otherwise
        // the request and the proxy's close can reach the app 0.3 ms apart, and the fake app
        // (hyper) may drop the request before its handler runs: `hits` stays 0 (seen in CI).
        eventually(|| px.inflight("blue") == 1 && up.hits() == 1).await;
        // ... and is still working on it: nothing has come back yet (else this would not be
        // a client abort at all).
        let mut b = [0u8; 64];
        assert!(
            matches!(s.try_read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "the answer came before the client left: the poll was too late"
        );
        drop(s);
    }
    eventually(|| px.inflight("blue") == 0).await;
    // A client abort is not retried and not held against the instance.
    assert_eq!(up.hits(), 1);
    let st = px.handle().status();
    assert_eq!(
        st.upstream("app").unwrap().pool("blue").unwrap().instances[0].passive_failures,
        0
    );

    // Upstream reset.
    // (The response can reach the client a moment before the request's context is dropped,
    // hence `eventually`.)
    up.set_mode(Mode::Reset);
    assert_eq!(px.get("/").await.status, 502);
    eventually(|| px.inflight("blue") == 0).await;

    // Upstream timeout.
    up.set_mode(Mode::Hang);
    assert_eq!(px.get("/").await.status, 504);
    eventually(|| px.inflight("blue") == 0).await;

    // 502 because the instance is gone.
    up.set_mode(Mode::Normal);
    up.stop();
    assert_eq!(px.get("/").await.status, 502);
    eventually(|| px.inflight("blue") == 0).await;

    let st = px.handle().status();
    let inst = &st.upstream("app").unwrap().pool("blue").unwrap().instances[0];
    assert_eq!(inst.inflight, 0, "per-instance count too");
    px.shutdown().await;
}

/// A client that leaves while its request (without a body) waits for the app ends that
/// request at once, not when the app answers or `read_timeout` runs out: the proxy watches the
/// client's connection while it waits (Pingora patch 5 proxies such requests in one loop; the
/// loop must keep that watch). Before the answer's head: logged as nginx logs it, 499; after
/// it (the app stalls mid-body): the head's status with the client's error. Neither is
/// retried nor held against the instance.
#[tokio::test]
async fn a_client_leaving_a_request_without_body_ends_it_at_once() {
    trace_init();
    let up = FakeUpstream::start("blue").await.unwrap();
    up.set_mode(Mode::Hang);
    let yaml = app_yaml(
        &[("blue", &[up.addr()])],
        "blue",
        // Far beyond `eventually`'s 10 s: only the client's close can end the request in time.
        "    read_timeout: 120s\n    retries: 0\n",
    )
    .replace(
        "access_log: \"off\"",
        "access_log: \"{dir}/access.log\"\naccess_log_format: json",
    );
    let px = TestProxy::start(&yaml).await;
    let log = px.dir.path().join("access.log");
    for (round, method) in ["GET", "HEAD", "DELETE"].into_iter().enumerate() {
        let fast_before = px.handle().fast_path_requests();
        let mut s = tokio::net::TcpStream::connect(px.addr).await.unwrap();
        use tokio::io::AsyncWriteExt;
        s.write_all(format!("{method} /wait HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let hits = round as u64 + 1;
        eventually(|| px.inflight("blue") == 1 && up.hits() == hits).await;
        drop(s);
        eventually(|| px.inflight("blue") == 0).await;
        eventually(|| log_lines(&log).len() == round + 1).await;
        let line: serde_json::Value = serde_json::from_str(&log_lines(&log)[round]).unwrap();
        assert_eq!(line["method"], method, "{line}");
        assert_eq!(line["status"], 499, "{line}");
        assert_eq!(line["error"], "client_error", "{line}");
        assert_eq!(up.hits(), hits, "a client abort is not retried");
        // GET and HEAD: switchyard's own forwarder; DELETE: Pingora's path. Both watch.
        assert_eq!(
            px.handle().fast_path_requests() - fast_before,
            u64::from(method != "DELETE"),
            "{method}: which path"
        );
    }
    let st = px.handle().status();
    assert_eq!(
        st.upstream("app").unwrap().pool("blue").unwrap().instances[0].passive_failures,
        0
    );
    px.shutdown().await;

    // Mid-response: the app sends a head promising 100,000 bytes and 4,096 of them, then
    // nothing. (On Pingora's path fewer than 1,460 bytes would wait in the proxy for more, as in
    // nginx with its `postpone_output`: the client would not see the head. The fast path passes
    // each read on.)
    let (addr, server) = raw_app(|_, mut s| async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut buf = Vec::new();
        while let Some(req) = read_request_head(&mut s, &mut buf).await {
            if req.contains(" /stall ") {
                let mut answer = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n".to_vec();
                answer.resize(answer.len() + 4096, b'x');
                let _ = s.write_all(&answer).await;
                // Until the proxy closes (bounded: the test's own deadlines end it first).
                let _ = tokio::time::timeout(
                    std::time::Duration::from_secs(300),
                    s.read(&mut [0u8; 1]),
                )
                .await;
                return;
            }
            // The health checks.
            let ok = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}";
            if s.write_all(ok.as_bytes()).await.is_err() {
                return;
            }
        }
    })
    .await;
    let px = TestProxy::start(&yaml.replace(&up.addr().to_string(), &addr.to_string())).await;
    let log = px.dir.path().join("access.log");
    // GET: the fast path; DELETE: Pingora's.
    for (round, method) in ["GET", "DELETE"].into_iter().enumerate() {
        let fast_before = px.handle().fast_path_requests();
        let mut s = tokio::net::TcpStream::connect(px.addr).await.unwrap();
        use tokio::io::AsyncWriteExt;
        s.write_all(format!("{method} /stall HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut buf = Vec::new();
        let head = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            read_request_head(&mut s, &mut buf),
        )
        .await
        .expect("the answer's head within 10 s")
        .expect("the answer's head before a close");
        assert!(head.starts_with("HTTP/1.1 200 "), "{method}: {head}");
        assert_eq!(
            px.inflight("blue"),
            1,
            "{method}: the body is still to come"
        );
        drop(s);
        eventually(|| px.inflight("blue") == 0).await;
        eventually(|| log_lines(&log).len() == round + 1).await;
        let line: serde_json::Value = serde_json::from_str(&log_lines(&log)[round]).unwrap();
        assert_eq!(line["status"], 200, "{line}");
        assert_eq!(line["error"], "client_error", "{line}");
        assert_eq!(
            px.handle().fast_path_requests() - fast_before,
            u64::from(method == "GET"),
            "{method}: which path"
        );
    }
    let st = px.handle().status();
    assert_eq!(
        st.upstream("app").unwrap().pool("blue").unwrap().instances[0].passive_failures,
        0
    );
    px.shutdown().await;
    server.abort();
}

#[tokio::test]
async fn a_websocket_counts_in_flight_until_it_closes() {
    trace_init();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_blue, _green, px) = blue_green(true, "").await;
    let mut s = tokio::net::TcpStream::connect(px.addr).await.unwrap();
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 1024];
    let n = s.read(&mut buf).await.unwrap();
    let head = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    s.write_all(b"ping").await.unwrap();
    let mut echo = [0u8; 4];
    s.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"ping");
    assert_eq!(px.inflight("blue"), 1);

    // Switching away leaves it open and counted: blue is draining, not drained.
    assert!(px.ctl_call(switch("green")).await.ok);
    let st = px.handle().status();
    let bluest = st.upstream("app").unwrap().pool("blue").unwrap().clone();
    assert_eq!(
        bluest.phase,
        switchyard_control::protocol::PoolPhase::Draining
    );
    s.write_all(b"pong").await.unwrap();
    s.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"pong");
    drop(s);
    eventually(|| px.inflight("blue") == 0).await;
    px.shutdown().await;
}

#[tokio::test]
async fn idle_keepalive_connections_to_the_old_pool_are_not_reused() {
    trace_init();
    let (blue, _green, px) = blue_green(true, "    idle_timeout: 60s\n").await;
    let mut c = Conn::open(px.addr).await.unwrap();
    for _ in 0..5 {
        assert_eq!(color(&c.get("/").await.unwrap()), "blue");
    }
    let before: std::collections::BTreeSet<u64> = blue.seen().iter().map(|s| s.conn).collect();
    assert_eq!(before.len(), 1, "one pooled upstream connection");
    assert!(px.ctl_call(switch("green")).await.ok);
    assert_eq!(color(&c.get("/").await.unwrap()), "green");
    // Blue's idle connection is still open at the TCP level, but must never carry a request
    // again: switching back uses a new one.
    assert!(before.iter().all(|c| blue.is_open(*c)));
    assert!(px.ctl_call(switch("blue")).await.ok);
    blue.clear_seen();
    for _ in 0..5 {
        assert_eq!(color(&c.get("/").await.unwrap()), "blue");
    }
    let after: Vec<u64> = blue.seen().iter().map(|s| s.conn).collect();
    assert!(
        after.iter().all(|c| !before.contains(c)),
        "a request reused a pre-switch connection: before {before:?}, after {after:?}"
    );
    px.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_split_is_within_bounds_and_rollback_restores() {
    trace_init();
    let (blue, green, px) = blue_green(false, "").await;
    let reply = px
        .ctl_call(weights_req(&[("blue", 95), ("green", 5)]))
        .await;
    assert!(reply.ok, "{reply:?}");
    let n = 20_000u64;
    let per = n / 20;
    let addr = px.addr;
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            tokio::spawn(async move {
                let mut c = Conn::open(addr).await.unwrap();
                for _ in 0..per {
                    assert_eq!(c.get("/hello").await.unwrap().status, 200);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let share = green.hits() as f64 / n as f64;
    // SPEC invariant 5: within max(0.5 pp, 3 standard deviations) of the weight.
    let sd = (0.05 * 0.95 / n as f64).sqrt();
    let bound = (0.005f64).max(3.0 * sd);
    assert!(
        (share - 0.05).abs() <= bound,
        "green share {share:.4}, bound {bound:.4}"
    );
    assert_eq!(blue.hits() + green.hits(), n);
    eprintln!(
        "weighted split 95/5 over {n}: green {:.3}% (bound ±{:.3} pp)",
        share * 100.0,
        bound * 100.0
    );

    let reply = px.ctl_call(Request::Rollback { upstream: None }).await;
    assert!(reply.ok, "{reply:?}");
    let st = px.handle().status();
    let u = st.upstream("app").unwrap();
    assert_eq!(
        u.weights,
        [("blue".to_string(), 100), ("green".to_string(), 0)].into()
    );
    let before = green.hits();
    for _ in 0..200 {
        px.get("/hello").await;
    }
    assert_eq!(green.hits(), before, "after rollback green gets nothing");
    px.shutdown().await;
}

#[tokio::test]
async fn weight_takes_from_the_main_pool_and_refuses_bad_splits() {
    trace_init();
    let a = FakeUpstream::start("blue").await.unwrap();
    let b = FakeUpstream::start("green").await.unwrap();
    let c = FakeUpstream::start("canary").await.unwrap();
    let px = TestProxy::start(&app_yaml(
        &[
            ("blue", &[a.addr()]),
            ("canary", &[c.addr()]),
            ("green", &[b.addr()]),
        ],
        "blue",
        "",
    ))
    .await;
    let h = px.handle();
    let ch = h.set_weight(None, "green", 5).unwrap();
    assert_eq!(
        ch.new_weights,
        [
            ("blue".into(), 95),
            ("canary".into(), 0),
            ("green".into(), 5)
        ]
        .into()
    );
    let ch = h.set_weight(None, "canary", 10).unwrap();
    assert_eq!(
        ch.new_weights,
        [
            ("blue".into(), 85),
            ("canary".into(), 10),
            ("green".into(), 5)
        ]
        .into()
    );
    let ch = h.set_weight(None, "green", 25).unwrap();
    assert_eq!(ch.new_weights["blue"], 65);
    assert_eq!(ch.generation, 4);
    let e = h.set_weight(None, "blue", 50).unwrap_err();
    assert_eq!(e.code, ErrorCode::Invalid);
    let e = h.set_weight(None, "purple", 5).unwrap_err();
    assert_eq!(e.code, ErrorCode::UnknownPool);
    assert!(
        e.message.contains("pools: blue, canary, green"),
        "{}",
        e.message
    );
    let e = h
        .set_weights(None, &[("blue".into(), 50), ("green".into(), 40)].into())
        .unwrap_err();
    assert!(e.message.contains("sum to 90"), "{}", e.message);
    let e = h.switch(Some("nope"), "blue").unwrap_err();
    assert_eq!(e.code, ErrorCode::UnknownUpstream);
    // A refused change leaves the state alone.
    assert_eq!(h.status().upstream("app").unwrap().generation, 4);
    // Switching to the pool that already has 100% changes nothing.
    h.switch(None, "green").unwrap();
    let ch = h.switch(None, "green").unwrap();
    assert!(!ch.changed);
    px.shutdown().await;
}

#[tokio::test]
async fn pool_set_moves_traffic_and_lets_removed_instances_finish() {
    trace_init();
    let old = FakeUpstream::start("green").await.unwrap();
    let new = FakeUpstream::start("green").await.unwrap();
    let blue = FakeUpstream::start("blue").await.unwrap();
    let px = TestProxy::start(&app_yaml(
        &[("blue", &[blue.addr()]), ("green", &[old.addr()])],
        "green",
        "",
    ))
    .await;
    let addr = px.addr;
    let slow =
        tokio::spawn(async move { request(addr, "GET", "/slow?ms=1000", &[], Bytes::new()).await });
    eventually(|| old.hits() == 1).await;
    let reply = px
        .ctl_call(Request::PoolSet {
            upstream: None,
            pool: "green".into(),
            instances: vec![new.addr().to_string()],
        })
        .await;
    assert!(reply.ok, "{reply:?}");
    for _ in 0..10 {
        assert_eq!(px.get("/").await.status, 200);
    }
    assert_eq!(new.hits(), 10);
    assert_eq!(old.hits(), 1);
    assert_eq!(
        slow.await.unwrap().unwrap().status,
        200,
        "the removed instance's request finished"
    );

    let add = px
        .ctl_call(Request::PoolAdd {
            upstream: None,
            pool: "green".into(),
            instance: old.addr().to_string(),
        })
        .await;
    assert!(add.ok);
    let remove_all = px
        .ctl_call(Request::PoolSet {
            upstream: None,
            pool: "green".into(),
            instances: vec!["10.0.0.5".into()],
        })
        .await;
    assert!(remove_all
        .error
        .unwrap()
        .message
        .contains("is not host:port"));
    let st = px.handle().status();
    let g = st.upstream("app").unwrap().pool("green").unwrap().clone();
    assert_eq!(g.instances.len(), 2);
    let rm = px
        .ctl_call(Request::PoolRemove {
            upstream: None,
            pool: "green".into(),
            instance: new.addr().to_string(),
        })
        .await;
    assert!(rm.ok);
    let rm_last = px
        .ctl_call(Request::PoolRemove {
            upstream: None,
            pool: "green".into(),
            instance: old.addr().to_string(),
        })
        .await;
    assert_eq!(
        rm_last.error.unwrap().code,
        ErrorCode::Invalid,
        "an active pool keeps an instance"
    );
    px.shutdown().await;
}

#[tokio::test]
async fn acknowledged_changes_survive_a_restart_and_a_corrupt_file_is_moved_aside() {
    trace_init();
    let blue = FakeUpstream::start("blue").await.unwrap();
    let green = FakeUpstream::start("green").await.unwrap();
    let green2 = FakeUpstream::start("green").await.unwrap();
    let yaml = app_yaml(
        &[("blue", &[blue.addr()]), ("green", &[green.addr()])],
        "blue",
        "",
    );
    let px = TestProxy::start(&yaml).await;
    let w: Weights = [("blue".to_string(), 90), ("green".to_string(), 10)].into();
    assert!(
        px.ctl_call(weights_req(&[("blue", 90), ("green", 10)]))
            .await
            .ok
    );
    assert!(
        px.ctl_call(Request::PoolSet {
            upstream: None,
            pool: "green".into(),
            instances: vec![green2.addr().to_string()],
        })
        .await
        .ok
    );
    let before = px.handle().status();
    let dir = px.stop_keep_dir().await;

    let px = TestProxy::restart_in(dir, &yaml).await;
    let after = px.handle().status();
    let (b, a) = (
        before.upstream("app").unwrap(),
        after.upstream("app").unwrap(),
    );
    assert_eq!(a.weights, w);
    assert_eq!(a.generation, b.generation);
    assert_eq!(
        a.pool("green").unwrap().instances[0].addr,
        green2.addr().to_string()
    );
    let dir = px.stop_keep_dir().await;

    std::fs::write(
        dir.path().join("state.json"),
        b"{\"version\":1,\"upstreams\":{\"app\":",
    )
    .unwrap();
    let px = TestProxy::restart_in(dir, &yaml).await;
    let st = px.handle().status();
    assert_eq!(
        st.upstream("app").unwrap().weights["blue"],
        100,
        "config's active pool"
    );
    let aside: Vec<String> = std::fs::read_dir(px.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("state.json.corrupt-"))
        .collect();
    assert_eq!(aside.len(), 1, "corrupt file kept aside");
    assert_eq!(color(&px.get("/").await), "blue");
    px.shutdown().await;
}

#[tokio::test]
async fn split_counts_match_weights_on_a_keepalive_connection() {
    trace_init();
    // Without stickiness the weights alone decide (SPEC §4 invariant 5); with the default
    // cookie stickiness each new client gets a random bucket (`canary.rs`).
    let (_blue, _green, px) = blue_green(false, "    canary: {sticky: none}\n").await;
    px.handle().set_weight(None, "green", 30).unwrap();
    let mut c = Conn::open(px.addr).await.unwrap();
    let mut counts: BTreeMap<String, u32> = BTreeMap::new();
    for _ in 0..1000 {
        *counts.entry(color(&c.get("/").await.unwrap())).or_default() += 1;
    }
    assert_eq!(
        counts["green"], 300,
        "the per-hundred schedule is exact: {counts:?}"
    );
    px.shutdown().await;
}
