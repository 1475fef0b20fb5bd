//! Binary upgrade (issue 12, SPEC §10): a new proxy takes over the running one's sockets,
//! state and health; under load nothing fails and nothing is refused.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use switchyard_control::Request;
use switchyard_tests::*;

/// Keep-alive clients that reconnect when told to (`Connection: close`, as a draining proxy
/// says), plus one client opening a new connection for every request; every failure —
/// refused connection, reset, non-200 — is recorded.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    fresh_ok: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(addr: std::net::SocketAddr, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let fresh_ok = Arc::new(AtomicU64::new(0));
        let failures: Arc<Mutex<Vec<String>>> = Arc::default();
        let mut tasks: Vec<_> = (0..clients)
            .map(|i| {
                let (stop, ok, failures) = (stop.clone(), ok.clone(), failures.clone());
                tokio::spawn(async move {
                    let mut c = None;
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) && n < 10_000_000 {
                        n += 1;
                        let conn = match c.take() {
                            Some(c) => c,
                            None => match Conn::open(addr).await {
                                Ok(c) => c,
                                Err(e) => {
                                    record(&failures, format!("client {i}: {e}"));
                                    tokio::time::sleep(Duration::from_millis(10)).await;
                                    continue;
                                }
                            },
                        };
                        let mut conn: Conn = conn;
                        match conn.get(&format!("/c/{i}/{n}")).await {
                            Ok(r) if r.status == 200 => {
                                ok.fetch_add(1, Ordering::Relaxed);
                                let closing = r
                                    .headers
                                    .get("connection")
                                    .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
                                if !closing && !conn.is_closed() {
                                    c = Some(conn);
                                }
                            }
                            Ok(r) => {
                                record(&failures, format!("client {i}: {} {}", r.status, r.text()))
                            }
                            Err(e) => {
                                record(&failures, format!("client {i}: {e}"));
                                tokio::time::sleep(Duration::from_millis(10)).await;
                            }
                        }
                    }
                })
            })
            .collect();
        // New connections all the time: one request each, every 2 ms.
        {
            let (stop, ok, failures) = (stop.clone(), fresh_ok.clone(), failures.clone());
            tasks.push(tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) && n < 1_000_000 {
                    n += 1;
                    match request(addr, "GET", "/fresh", &[], bytes::Bytes::new()).await {
                        Ok(r) if r.status == 200 => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(r) => record(&failures, format!("fresh: {} {}", r.status, r.text())),
                        Err(e) => record(&failures, format!("fresh: {e}")),
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }));
        }
        Load {
            stop,
            ok,
            fresh_ok,
            failures,
            tasks,
        }
    }

    async fn wait_more(&self, n: u64) {
        let start = self.ok.load(Ordering::Relaxed);
        let ok = self.ok.clone();
        eventually(move || ok.load(Ordering::Relaxed) >= start + n).await;
    }

    async fn stop(self) -> (u64, u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        let f = self.failures.lock().unwrap().clone();
        (
            self.ok.load(Ordering::Relaxed),
            self.fresh_ok.load(Ordering::Relaxed),
            f,
        )
    }
}

/// Keep a failure (the first 1000: a proxy that is down must not fill the memory).
fn record(failures: &Mutex<Vec<String>>, what: String) {
    let mut f = failures.lock().unwrap();
    if f.len() < 1000 {
        f.push(what);
    }
}

/// blue and green in upstream `app`, and a route `/slow` to upstream `slow` (its own fake
/// upstream, so a test can tell when its request arrived). Health checks every 100 ms, five
/// passes to be healthy: a new process that did not take the health over could not call
/// anything healthy within 400 ms of its start.
fn two_pools(blue: &FakeUpstream, green: &FakeUpstream, slow: &FakeUpstream) -> String {
    app_yaml(
        &[("blue", &[blue.addr()]), ("green", &[green.addr()])],
        "blue",
        "    health: {interval: 100ms, timeout: 100ms, healthy_threshold: 5}\n",
    )
    .replace("grace_period: 5s", "grace_period: 10s")
    .replace("  listen: \"off\"", "  listen: \"127.0.0.1:0\"")
    .replace(
        "routes:\n",
        &format!("  slow:\n    pools:\n      blue: [\"{}\"]\n    health: {{interval: 100ms, timeout: 100ms, healthy_threshold: 5}}\nroutes:\n  - path_prefix: /slow\n    upstream: slow\n", slow.addr()),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_upgrades_under_load_fail_nothing_and_keep_state_and_in_flight_work() {
    trace_init();
    let blue = quiet_upstream("blue").await;
    let green = quiet_upstream("green").await;
    let slow_up = quiet_upstream("slow").await;
    let yaml = two_pools(&blue, &green, &slow_up);
    let mut px = TestProxy::start(&yaml).await;
    assert!(
        px.ctl_call(on_app(weights_req(&[("blue", 70), ("green", 30)])))
            .await
            .ok
    );
    let before = px.handle().status();
    let app = before.upstream("app").unwrap().clone();
    let addr = px.addr;
    let load = Load::start(addr, 64);
    load.wait_more(500).await;
    for round in 0..5 {
        // Work in flight on the old process when it is told to stop: it has reached the app.
        let slow = tokio::spawn(async move {
            request(addr, "GET", "/slow?ms=700", &[], bytes::Bytes::new()).await
        });
        let before = round as u64;
        eventually(|| slow_up.hits() > before).await;
        let (old, new) = match px.upgrade(&yaml).await {
            Ok(x) => x,
            Err((_, e)) => panic!("round {round}: upgrade failed: {e}"),
        };
        px = new;
        // Health carried over: right after the start, with checks needing five passes (500 ms),
        // every instance is already healthy.
        let st = px.handle().status();
        let unhealthy: Vec<_> = st
            .upstreams
            .iter()
            .flat_map(|u| &u.pools)
            .flat_map(|p| &p.instances)
            .filter(|i| i.health != switchyard_control::HealthState::Healthy)
            .map(|i| (i.addr.clone(), i.health))
            .collect();
        assert!(unhealthy.is_empty(), "round {round}: {unhealthy:?}");
        assert_eq!(
            tokio::time::timeout(Duration::from_secs(5), old.handed_over())
                .await
                .map(|pid| pid == std::process::id()),
            Ok(true),
            "round {round}: the old proxy knows it was taken over"
        );
        let report = old.shutdown().await;
        assert_eq!(report.abandoned_requests, 0, "round {round}");
        let r = slow.await.unwrap().expect("the slow request completes");
        assert_eq!(r.status, 200, "round {round}: {}", r.text());
        // The same listening socket (same port), state and generation; the control socket
        // and the admin listener answer from the new proxy.
        assert_eq!(px.addr, addr);
        let st = px.handle().status();
        let now = st.upstream("app").unwrap();
        assert_eq!(now.generation, app.generation, "round {round}");
        assert_eq!(
            now.pools
                .iter()
                .map(|p| (p.name.clone(), p.weight))
                .collect::<Vec<_>>(),
            app.pools
                .iter()
                .map(|p| (p.name.clone(), p.weight))
                .collect::<Vec<_>>(),
            "round {round}"
        );
        let over_socket = px.ctl_call(Request::Status).await;
        assert!(over_socket.ok, "round {round}");
        load.wait_more(200).await;
    }
    let admin = px.handle().admin_addr().unwrap();
    let metrics = request(admin, "GET", "/metrics", &[], bytes::Bytes::new())
        .await
        .unwrap();
    assert_eq!(metrics.status, 200);
    let (ok, fresh, failures) = load.stop().await;
    assert!(
        failures.is_empty(),
        "{} failed of {}: {:?}",
        failures.len(),
        ok + fresh,
        &failures[..failures.len().min(10)]
    );
    assert!(fresh > 10, "new connections were made throughout ({fresh})");
    // Changes work on the new proxy and persist.
    assert!(px.ctl_call(on_app(switch_req("green", None))).await.ok);
    px.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_that_cannot_start_leaves_the_old_proxy_serving_and_changeable() {
    trace_init();
    let blue = FakeUpstream::start("blue").await.unwrap();
    let green = FakeUpstream::start("green").await.unwrap();
    let slow = FakeUpstream::start("slow").await.unwrap();
    let yaml = two_pools(&blue, &green, &slow);
    let px = TestProxy::start(&yaml).await;
    // The new config adds a listener on a port someone else holds: the new proxy cannot start.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let bad = yaml.replace(
        "listen:\n",
        &format!("listen:\n  - addr: \"127.0.0.1:{port}\"\n"),
    );
    let (px, e) = match px.upgrade(&bad).await {
        Ok(_) => panic!("the upgrade should fail"),
        Err(x) => x,
    };
    assert!(e.to_string().contains(&port.to_string()), "{e}");
    assert!(e.to_string().contains("keeps serving"), "{e}");
    // Still serving, on its control socket too, and not frozen.
    assert_eq!(px.get("/").await.status, 200);
    let r = px.ctl_call(on_app(switch_req("green", None))).await;
    assert!(r.ok, "{:?}", r.error);
    assert_eq!(color(&px.get("/").await), "green");
    // Nothing running at another control socket: a clear error.
    let lonely = yaml.replace("{dir}/control.sock", "{dir}/nobody.sock");
    let (px, e) = match px.upgrade(&lonely).await {
        Ok(_) => panic!("nobody to take over from"),
        Err(x) => x,
    };
    assert!(e.to_string().contains("no running switchyard"), "{e}");
    // A new process that fails late in its start (an access log it cannot open, after it took
    // the control socket over): the running one keeps its control socket and upgrade socket
    // files, and is not frozen.
    let bad_log = yaml.replace(
        "access_log: \"off\"",
        "access_log: \"/nonexistent/dir/access.log\"",
    );
    let (px, e) = match px.upgrade(&bad_log).await {
        Ok(_) => panic!("the upgrade should fail"),
        Err(x) => x,
    };
    assert!(e.to_string().contains("access log"), "{e}");
    assert!(px.socket().exists());
    assert!(px.dir.path().join("control.sock.upgrade").exists());
    let r = px.ctl_call(on_app(switch_req("blue", None))).await;
    assert!(r.ok, "{:?}", r.error);
    // Another state file: refused before anything starts.
    let other_state = yaml.replace("{dir}/state.json", "{dir}/other.json");
    let (px, e) = match px.upgrade(&other_state).await {
        Ok(_) => panic!("the upgrade should fail"),
        Err(x) => x,
    };
    assert!(e.to_string().contains("state_file"), "{e}");
    // Garbage (a hello with a forged "ready" behind it), an oversized hello and a silent peer
    // on the upgrade socket change nothing; the silent one stays connected across the next
    // upgrade, which goes through once its hello deadline (5 s) has passed.
    let _silent = {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let path = px.dir.path().join("control.sock.upgrade");
        let mut g = tokio::net::UnixStream::connect(&path).await.unwrap();
        g.write_all(b"{\"upgrade\":1,\"pid\":1}\n{\"ready\":true}\n")
            .await
            .unwrap();
        let mut answer = String::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), g.read_to_string(&mut answer)).await;
        assert!(answer.contains("refused"), "{answer}");
        let mut big = tokio::net::UnixStream::connect(&path).await.unwrap();
        let _ = big.write_all(&[b'x'; 4096]).await;
        let _ =
            tokio::time::timeout(Duration::from_secs(10), big.read_to_string(&mut answer)).await;
        tokio::net::UnixStream::connect(&path).await.unwrap()
    };
    assert_eq!(px.get("/").await.status, 200);
    let r = px.ctl_call(on_app(switch_req("green", None))).await;
    assert!(r.ok, "{:?}", r.error);
    // And a later upgrade still works (after the silent peer's hello deadline).
    let (old, px) = match px.upgrade(&yaml).await {
        Ok(x) => x,
        Err((_, e)) => panic!("{e}"),
    };
    old.shutdown().await;
    assert_eq!(color(&px.get("/").await), "green");
    let r = px.ctl_call(Request::Status).await;
    assert!(r.ok);
    px.shutdown().await;
}

fn color(r: &Reply) -> String {
    r.json()["color"].as_str().unwrap_or("?").to_string()
}

/// The request, for upstream `app` (these configs have two upstreams).
fn on_app(mut r: Request) -> Request {
    match &mut r {
        Request::Switch { upstream, .. } | Request::Weights { upstream, .. } => {
            *upstream = Some("app".into())
        }
        _ => {}
    }
    r
}
