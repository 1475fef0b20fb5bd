//! The control socket as a security and robustness boundary (issue 3).

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;
use switchyard_control::{ErrorCode, Reply, Request};
use switchyard_tests::*;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

async fn raw_lines(px: &TestProxy, input: &[u8], replies: usize) -> Vec<Reply> {
    let s = UnixStream::connect(px.socket()).await.unwrap();
    let (r, mut w) = s.into_split();
    // Written from a task: the server may close before reading everything (a line too long),
    // and the write then fails, which is what a client would see.
    let input = input.to_vec();
    let writer = tokio::spawn(async move {
        let _ = w.write_all(&input).await;
        w
    });
    let mut r = BufReader::new(r);
    let mut out = Vec::new();
    for _ in 0..replies {
        let mut line = String::new();
        let n = tokio::time::timeout(Duration::from_secs(10), r.read_line(&mut line))
            .await
            .expect("an answer")
            .unwrap();
        if n == 0 {
            break;
        }
        out.push(serde_json::from_str(&line).unwrap());
    }
    drop(writer.await);
    out
}

#[tokio::test]
async fn bad_input_gets_error_lines_and_the_proxy_keeps_its_state() {
    trace_init();
    let (_blue, _green, px) = blue_green(true, "").await;
    px.handle().set_weight(None, "green", 10).unwrap();

    // Garbage, half-written JSON, wrong fields, unknown command: one error line each, and the
    // connection stays usable for a valid request afterwards.
    let replies = raw_lines(
        &px,
        b"hello\n{\"cmd\":\"switch\",\"pool\":\n{\"cmd\":\"explode\"}\n{\"cmd\":\"weight\",\"pool\":\"green\",\"weight\":\"x\"}\n\n{\"cmd\":\"status\"}\n",
        5,
    )
    .await;
    assert_eq!(replies.len(), 5);
    for r in &replies[..4] {
        let e = r.error.as_ref().unwrap();
        assert_eq!(e.code, ErrorCode::BadRequest, "{e:?}");
    }
    assert!(replies[4].ok, "{:?}", replies[4]);

    // A 10 MB line is refused and the connection closed.
    let mut big = vec![b'x'; 10 * 1024 * 1024];
    big.push(b'\n');
    let replies = raw_lines(&px, &big, 2).await;
    assert_eq!(replies.len(), 1);
    assert!(replies[0]
        .error
        .as_ref()
        .unwrap()
        .message
        .contains("longer than"));

    // A client that sends half a request and disconnects.
    {
        let mut s = UnixStream::connect(px.socket()).await.unwrap();
        s.write_all(b"{\"cmd\":\"switch\",\"po").await.unwrap();
    }

    let st = px.handle().status();
    let u = st.upstream("app").unwrap();
    assert_eq!(u.weights["green"], 10, "state untouched");
    assert_eq!(u.generation, 2);
    assert_eq!(px.get("/").await.status, 200, "still serving");
    px.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_status_clients_are_all_answered() {
    trace_init();
    let blue = FakeUpstream::start("blue").await.unwrap();
    let px = TestProxy::start(&app_yaml(&[("blue", &[blue.addr()])], "blue", "")).await;
    let socket = px.socket();
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let socket = socket.clone();
            tokio::spawn(async move {
                let mut c = switchyard_control::ControlClient::connect(&socket)
                    .await
                    .unwrap();
                let mut ok = 0;
                for _ in 0..5 {
                    if c.request(&Request::Status).await.unwrap().ok {
                        ok += 1;
                    }
                }
                ok
            })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    assert_eq!(total, 500);
    px.shutdown().await;
}

#[tokio::test]
async fn the_socket_is_0600_and_a_live_one_is_never_taken_over() {
    trace_init();
    let blue = FakeUpstream::start("blue").await.unwrap();
    let yaml = app_yaml(&[("blue", &[blue.addr()])], "blue", "");
    let px = TestProxy::start(&yaml).await;
    let mode = std::fs::metadata(px.socket()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let status = px.ctl_call(Request::Status).await;
    let v = status.result.unwrap();
    assert_eq!(v["protocol"], switchyard_control::PROTOCOL_VERSION);

    // A second proxy configured with the same socket refuses to start.
    let yaml2 = yaml.replace("{dir}", &px.dir.path().display().to_string());
    let cfg = switchyard_config::parse(&yaml2).unwrap();
    let err = switchyard_proxy::start(cfg, Default::default()).unwrap_err();
    assert!(
        err.to_string().contains("in use by a running proxy"),
        "{err}"
    );
    assert!(
        px.ctl_call(Request::Status).await.ok,
        "the first one still answers"
    );
    px.shutdown().await;
}

#[tokio::test]
async fn a_stale_socket_file_is_replaced_and_a_regular_file_is_not() {
    trace_init();
    let blue = FakeUpstream::start("blue").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let yaml = app_yaml(&[("blue", &[blue.addr()])], "blue", "")
        .replace(
            "  socket: \"{dir}/control.sock\"\n",
            "  socket: \"{dir}/custom.sock\"\n  mode: \"0660\"\n",
        )
        .replace("{dir}", &dir.path().display().to_string());
    let sock = dir.path().join("custom.sock");
    // A socket file nobody listens on, as a crashed proxy leaves behind.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let cfg = switchyard_config::parse(&yaml).unwrap();
    let h = switchyard_proxy::start(cfg, Default::default()).unwrap();
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660, "replaced, with the configured mode");
    let mut c = switchyard_control::ControlClient::connect(&sock)
        .await
        .unwrap();
    assert!(c.request(&Request::Status).await.unwrap().ok);
    h.shutdown().await;
    assert!(!sock.exists(), "removed on shutdown");

    std::fs::write(&sock, b"not a socket").unwrap();
    let cfg = switchyard_config::parse(&yaml).unwrap();
    let err = switchyard_proxy::start(cfg, Default::default()).unwrap_err();
    assert!(err.to_string().contains("is not a socket"), "{err}");
    assert_eq!(std::fs::read(&sock).unwrap(), b"not a socket");
}

#[tokio::test]
async fn control_mode_is_applied() {
    trace_init();
    let blue = FakeUpstream::start("blue").await.unwrap();
    let yaml = app_yaml(&[("blue", &[blue.addr()])], "blue", "").replace(
        "  socket: \"{dir}/control.sock\"\n",
        "  socket: \"{dir}/control.sock\"\n  mode: \"0660\"\n",
    );
    let px = TestProxy::start(&yaml).await;
    let mode = std::fs::metadata(px.socket()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
    px.shutdown().await;
}

#[tokio::test]
async fn weights_that_would_wrap_are_refused_and_nothing_changes() {
    trace_init();
    let (_blue, _green, px) = blue_green(false, "").await;
    let before = px.handle().status().upstream("app").unwrap().clone();
    // Summed in u32 these wrap to exactly 100; the proxy must not build a 4-billion-slot
    // schedule under its writer lock, nor persist them.
    let replies = raw_lines(
        &px,
        b"{\"cmd\":\"weights\",\"weights\":{\"blue\":4294967295,\"green\":101},\"force\":true}\n{\"cmd\":\"weight\",\"pool\":\"green\",\"weight\":4294967295,\"force\":true}\n{\"cmd\":\"weights\",\"weights\":{\"blue\":60,\"green\":60}}\n{\"cmd\":\"status\"}\n",
        4,
    )
    .await;
    assert_eq!(replies.len(), 4, "{replies:?}");
    for r in &replies[..3] {
        let e = r.error.as_ref().expect("refused");
        assert_eq!(e.code, ErrorCode::InvalidWeights, "{e:?}");
    }
    assert!(replies[0]
        .error
        .as_ref()
        .unwrap()
        .message
        .contains("blue=4294967295 is above 100"));
    assert!(replies[2]
        .error
        .as_ref()
        .unwrap()
        .message
        .contains("sum to 120"));
    assert!(replies[3].ok);
    let after = px.handle().status().upstream("app").unwrap().clone();
    assert_eq!(after.weights, before.weights);
    assert_eq!(after.generation, before.generation);
    let saved = std::fs::read_to_string(px.dir.path().join("state.json")).unwrap_or_default();
    assert!(!saved.contains("4294967295"), "{saved}");
    assert_eq!(px.get("/").await.status, 200);
    px.shutdown().await;
}

fn mkfifo(path: &std::path::Path) {
    let ok = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .unwrap()
        .success();
    assert!(ok, "mkfifo {}", path.display());
}

/// While `stuck` is stuck: the health checker keeps checking (3 rounds, which also gives the
/// stuck task ample time to reach its blocking call), and `status` over a fresh connection
/// answers within 2 s.
async fn control_plane_is_alive<T>(
    px: &TestProxy,
    blue: &FakeUpstream,
    stuck: &tokio::task::JoinHandle<T>,
) {
    let checks = blue.health_hits();
    eventually_within(Duration::from_secs(2), &mut || {
        blue.health_hits() >= checks + 3
    })
    .await;
    assert!(!stuck.is_finished(), "it should be stuck on the FIFO");
    let status = tokio::time::timeout(Duration::from_secs(2), px.ctl_call(Request::Status))
        .await
        .expect("status answered while a change is stuck on the disk");
    assert!(status.ok);
    assert!(!stuck.is_finished());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_disk_stalls_neither_health_checks_nor_status() {
    trace_init();
    let blue = FakeUpstream::start("blue").await.unwrap();
    let green = FakeUpstream::start("green").await.unwrap();
    let yaml = app_yaml(
        &[("blue", &[blue.addr()]), ("green", &[green.addr()])],
        "blue",
        "",
    );
    let px = TestProxy::start_from_file(&yaml).await;
    let generation = px.handle().status().upstream("app").unwrap().generation;

    // A state-file write that blocks: the temporary file the proxy creates is a FIFO nobody
    // reads yet (the name is the proxy's: `.state.json.<pid>.tmp`).
    let tmp = px
        .dir
        .path()
        .join(format!(".state.json.{}.tmp", std::process::id()));
    mkfifo(&tmp);
    let sock = px.socket();
    let switch = tokio::spawn(async move {
        let mut c = switchyard_control::ControlClient::connect(&sock)
            .await
            .unwrap();
        c.request(&switch_req("green", None)).await.unwrap()
    });
    control_plane_is_alive(&px, &blue, &switch).await;
    // Unstick it: read what was written. A FIFO cannot be fsync-ed, so the change fails —
    // and, persisted-before-acknowledged, nothing is applied.
    let drained = tokio::task::spawn_blocking(move || std::fs::read(&tmp).unwrap().len());
    let reply = tokio::time::timeout(Duration::from_secs(10), switch)
        .await
        .unwrap()
        .unwrap();
    assert!(drained.await.unwrap() > 0);
    let e = reply.error.expect("refused");
    assert_eq!(e.code, ErrorCode::Internal, "{e:?}");
    assert!(e.message.contains("not applied"), "{}", e.message);
    let st = px.handle().status();
    assert_eq!(st.upstream("app").unwrap().generation, generation);
    assert_eq!(px.get("/").await.json()["color"], "blue");

    // A config read that blocks: reload from a FIFO nobody writes yet.
    let file = px.dir.path().join("switchyard.yaml");
    std::fs::remove_file(&file).unwrap();
    mkfifo(&file);
    let sock = px.socket();
    let reload = tokio::spawn(async move {
        let mut c = switchyard_control::ControlClient::connect(&sock)
            .await
            .unwrap();
        c.request(&Request::Reload).await.unwrap()
    });
    control_plane_is_alive(&px, &blue, &reload).await;
    let text = yaml
        .replace("{dir}", &px.dir.path().display().to_string())
        .replace("    active: blue\n", "    active: blue\n    retries: 0\n");
    let writer = tokio::task::spawn_blocking(move || std::fs::write(&file, text).unwrap());
    let reply = tokio::time::timeout(Duration::from_secs(10), reload)
        .await
        .unwrap()
        .unwrap();
    writer.await.unwrap();
    assert!(reply.ok, "{reply:?}");
    px.shutdown().await;
}

/// Send `line` on a new control connection and read the first line of the answer; the
/// connection stays open (the command may still be running) until the halves are dropped.
async fn first_line(
    px: &TestProxy,
    line: &[u8],
) -> (
    String,
    BufReader<tokio::net::unix::OwnedReadHalf>,
    tokio::net::unix::OwnedWriteHalf,
) {
    let s = UnixStream::connect(px.socket()).await.unwrap();
    let (r, mut w) = s.into_split();
    w.write_all(line).await.unwrap();
    let mut r = BufReader::new(r);
    let mut first = String::new();
    r.read_line(&mut first).await.unwrap();
    (first, r, w)
}

/// `switchyard_control_connections` from the proxy's metrics.
fn control_connections(px: &TestProxy) -> u64 {
    px.handle()
        .metrics_text()
        .lines()
        .find_map(|l| l.strip_prefix("switchyard_control_connections "))
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v as u64)
        .expect("switchyard_control_connections")
}

#[tokio::test]
async fn a_client_that_leaves_mid_wait_cancels_the_wait_not_the_change() {
    trace_init();
    let (_blue, _green, px) = blue_green(false, "").await;
    // Something for the drain to wait for: a slow request on blue.
    let addr = px.addr;
    let slow = tokio::spawn(async move {
        request(addr, "GET", "/slow?ms=5000", &[], bytes::Bytes::new()).await
    });
    eventually(|| px.inflight("blue") == 1).await;

    let (first, r, w) = first_line(
        &px,
        b"{\"cmd\":\"switch\",\"pool\":\"green\",\"drain_ms\":60000}\n",
    )
    .await;
    assert!(first.contains("\"applied\""), "{first}");
    assert_eq!(
        px.handle().status().upstream("app").unwrap().weights["green"],
        100
    );
    // The command is now waiting for blue to drain (5 s away, bounded by 60 s).
    assert_eq!(control_connections(&px), 1);
    drop((r, w));
    // The client left: the wait ends at once, long before blue drains.
    eventually_within(Duration::from_secs(2), &mut || {
        control_connections(&px) == 0
    })
    .await;
    assert_eq!(
        px.inflight("blue"),
        1,
        "blue still busy: the wait was cancelled, not finished"
    );
    let st = px.handle().status();
    assert_eq!(
        st.upstream("app").unwrap().weights["green"],
        100,
        "the change stays"
    );
    assert_eq!(slow.await.unwrap().unwrap().status, 200);
    px.shutdown().await;
}

#[tokio::test]
async fn a_client_that_leaves_mid_health_wait_switches_nothing_later() {
    trace_init();
    let (_blue, green, px) = blue_green(false, "").await;
    green.set_health(HealthReply::down());
    eventually(|| px.health("green", green.addr()) == switchyard_control::HealthState::Unhealthy)
        .await;
    // This wait sends a progress line when an instance changes state, and nothing otherwise:
    // only watching the peer can notice that the client left.
    let (first, r, w) = first_line(
        &px,
        b"{\"cmd\":\"switch\",\"pool\":\"green\",\"wait_healthy_ms\":60000}\n",
    )
    .await;
    assert!(first.contains("\"health\""), "{first}");
    assert_eq!(control_connections(&px), 1);
    drop((r, w));
    eventually_within(Duration::from_secs(2), &mut || {
        control_connections(&px) == 0
    })
    .await;
    // Green turns healthy: a wait still running would switch now. Nothing may happen.
    green.set_health(HealthReply::up());
    eventually(|| px.health("green", green.addr()) == switchyard_control::HealthState::Healthy)
        .await;
    let st = px.handle().status();
    let u = st.upstream("app").unwrap();
    assert_eq!(u.weights["blue"], 100);
    assert_eq!(u.generation, 1);
    px.shutdown().await;
}

#[tokio::test]
async fn three_hundred_idle_connections_do_not_lock_proxyctl_out() {
    trace_init();
    let blue = FakeUpstream::start("blue").await.unwrap();
    let px = TestProxy::start(&app_yaml(&[("blue", &[blue.addr()])], "blue", "")).await;
    let mut idle = Vec::new();
    for _ in 0..300 {
        idle.push(UnixStream::connect(px.socket()).await.unwrap());
    }
    for _ in 0..3 {
        let r = tokio::time::timeout(Duration::from_secs(5), px.ctl_call(Request::Status))
            .await
            .expect("answered");
        assert!(r.ok, "{r:?}");
    }
    drop(idle);
    px.shutdown().await;
}

#[tokio::test]
async fn a_full_or_refusing_disk_refuses_the_change_and_traffic_goes_on() {
    trace_init();
    let (_blue, _green, px) = blue_green(false, "").await;
    let tmp = px
        .dir
        .path()
        .join(format!(".state.json.{}.tmp", std::process::id()));
    // The state file's temporary file written to a full disk (/dev/full: ENOSPC), then to a
    // place the file system refuses (a sysfs path: EACCES even for root).
    for (target, why) in [
        ("/dev/full", "No space left on device"),
        ("/sys/switchyard-state-test", "Permission denied"),
    ] {
        std::os::unix::fs::symlink(target, &tmp).unwrap();
        let r = px.ctl_call(switch_req("green", None)).await;
        let e = r.error.expect("refused");
        assert_eq!(e.code, ErrorCode::Internal);
        assert!(
            e.message
                .contains("not applied: cannot write the state file"),
            "{}",
            e.message
        );
        assert!(e.message.contains(why), "{}", e.message);
        let st = px.handle().status();
        let u = st.upstream("app").unwrap();
        assert_eq!(
            (u.weights["blue"], u.generation),
            (100, 1),
            "nothing applied"
        );
        for _ in 0..5 {
            assert_eq!(px.get("/").await.json()["color"], "blue");
        }
        let _ = std::fs::remove_file(&tmp);
    }
    // The disk is back: the same change goes through.
    assert!(px.ctl_call(switch_req("green", None)).await.ok);
    assert_eq!(px.get("/").await.json()["color"], "green");
    px.shutdown().await;
}

/// `--fleet` against a proxy without a fleet is refused and says why; a change inside it is
/// not carried out.
#[tokio::test]
async fn a_fleet_command_on_a_standalone_proxy_is_refused_and_changes_nothing() {
    trace_init();
    let (_blue, _green, px) = blue_green(false, "").await;
    for inner in [Request::Status, switch_req("green", None)] {
        let r = px
            .ctl_call(Request::Fleet {
                timeout_ms: Some(1000),
                request: Box::new(inner),
            })
            .await;
        let e = r.error.expect("refused");
        assert_eq!(e.code, ErrorCode::Invalid, "{e:?}");
        assert!(e.message.contains("not in a fleet"), "{}", e.message);
    }
    assert_eq!(px.get("/").await.json()["color"], "blue");
    // Nested and malformed fleet lines are errors, not crashes.
    let replies = raw_lines(
        &px,
        b"{\"cmd\":\"fleet\"}\n{\"cmd\":\"fleet\",\"request\":{\"cmd\":\"nope\"}}\n{\"cmd\":\"fleet\",\"timeout_ms\":-1,\"request\":{\"cmd\":\"status\"}}\n",
        3,
    )
    .await;
    for r in &replies {
        assert_eq!(
            r.error.as_ref().unwrap().code,
            ErrorCode::BadRequest,
            "{r:?}"
        );
    }
    px.shutdown().await;
}
