//! `proxyctl reload` / SIGHUP: a good file takes effect, a bad one changes nothing, and run-time
//! state (weights, rollback target) survives as long as it still makes sense.

use switchyard_control::ErrorCode;
use switchyard_tests::*;

fn two_pools(blue: &FakeUpstream, green: &FakeUpstream, extra: &str) -> String {
    app_yaml(
        &[("blue", &[blue.addr()]), ("green", &[green.addr()])],
        "blue",
        extra,
    )
}

/// Blue and green upstreams, and a proxy started from a config file (blue active).
async fn from_file() -> (FakeUpstream, FakeUpstream, String, TestProxy) {
    let blue = FakeUpstream::start("blue").await.unwrap();
    let green = FakeUpstream::start("green").await.unwrap();
    let yaml = two_pools(&blue, &green, "");
    let px = TestProxy::start_from_file(&yaml).await;
    (blue, green, yaml, px)
}

#[tokio::test]
async fn a_good_file_takes_effect_and_a_bad_one_keeps_the_old_config() {
    trace_init();
    let (_blue, _green, yaml, px) = from_file().await;
    let h = px.handle();
    h.set_weight(None, "green", 20).unwrap();

    px.write_config(&yaml.replace(
        "    active: blue\n",
        "    active: blue\n    retries: 99\n    balance: fancy\n",
    ));
    let e = h.reload().await.unwrap_err();
    assert_eq!(e.code, ErrorCode::Invalid);
    assert!(
        e.message
            .contains("upstreams.app.retries: 99 is out of range"),
        "{}",
        e.message
    );
    assert!(e.message.contains("upstreams.app.balance"), "{}", e.message);
    assert_eq!(e.details.unwrap().as_array().unwrap().len(), 2);

    // The running read timeout is 60 s: a 1.5 s answer gets through.
    assert_eq!(px.get("/slow?ms=1500").await.status, 200);
    px.write_config(&yaml.replace(
        "    active: blue\n",
        "    active: blue\n    read_timeout: 300ms\n    retries: 0\n",
    ));
    let r = h.reload().await.unwrap();
    assert!(r.needs_restart.is_empty(), "{r:?}");
    assert_eq!(
        h.status().upstream("app").unwrap().weights["green"],
        20,
        "run-time weights survive a reload"
    );
    // ... and the new one is in effect.
    assert_eq!(px.get("/slow?ms=1500").await.status, 504);
    px.shutdown().await;
}

#[tokio::test]
async fn a_reload_that_adds_a_pool_keeps_the_run_time_weights() {
    trace_init();
    let (blue, green, _yaml, px) = from_file().await;
    let canary = FakeUpstream::start("canary").await.unwrap();
    let h = px.handle();
    h.switch(None, "green").unwrap();
    let before = h.status().upstream("app").unwrap().generation;

    px.write_config(&app_yaml(
        &[
            ("blue", &[blue.addr()]),
            ("canary", &[canary.addr()]),
            ("green", &[green.addr()]),
        ],
        "blue",
        "",
    ));
    h.reload().await.unwrap();
    let st = h.status();
    let u = st.upstream("app").unwrap();
    assert_eq!(
        u.weights,
        [
            ("blue".to_string(), 0),
            ("canary".to_string(), 0),
            ("green".to_string(), 100)
        ]
        .into(),
        "the new pool gets 0, traffic stays on green (not the file's active blue)"
    );
    assert!(u.generation > before);
    for _ in 0..20 {
        assert_eq!(px.get("/").await.json()["color"], "green");
    }
    // The rollback target (blue) still exists, so rollback still works.
    let ch = h.rollback(None).unwrap();
    assert_eq!(ch.new_weights["blue"], 100);
    px.shutdown().await;
}

#[tokio::test]
async fn a_rollback_target_naming_a_removed_pool_is_dropped() {
    trace_init();
    let (_blue, green, _yaml, px) = from_file().await;
    let canary = FakeUpstream::start("canary").await.unwrap();
    let h = px.handle();
    h.switch(None, "green").unwrap(); // rollback target: blue=100
                                      // blue leaves the file; green keeps its 100.
    px.write_config(&app_yaml(
        &[("canary", &[canary.addr()]), ("green", &[green.addr()])],
        "green",
        "",
    ));
    let r = h.reload().await.unwrap();
    assert!(r.warnings.is_empty(), "green kept its weight: {r:?}");
    let st = h.status();
    let u = st.upstream("app").unwrap();
    assert_eq!(u.weights["green"], 100);
    assert_eq!(u.previous, None);
    let e = h.rollback(None).unwrap_err();
    assert_eq!(e.code, ErrorCode::Invalid);
    assert!(e.message.contains("nothing to roll back"), "{}", e.message);
    for _ in 0..20 {
        assert_eq!(px.get("/").await.json()["color"], "green");
    }
    // Now green (all the weight) leaves the file too: that reload must say it moved traffic.
    px.write_config(&app_yaml(&[("canary", &[canary.addr()])], "canary", ""));
    let r = h.reload().await.unwrap();
    assert_eq!(r.warnings.len(), 1, "{r:?}");
    assert!(r.warnings[0].contains("green=100"), "{r:?}");
    assert_eq!(px.get("/").await.json()["color"], "canary");
    px.shutdown().await;
}

#[tokio::test]
async fn a_reload_applies_the_access_log_its_format_and_the_grace_period() {
    trace_init();
    let (_blue, _green, yaml, px) = from_file().await;
    let h = px.handle();
    let log = px.dir.path().join("access.log");
    assert_eq!(px.get("/before").await.status, 200);
    assert!(!log.exists());

    // access_log off -> a file, in JSON; grace_period 5s -> 300ms.
    let json = yaml
        .replace(
            "access_log: \"off\"",
            "access_log: \"{dir}/access.log\"\naccess_log_format: json",
        )
        .replace("grace_period: 5s", "grace_period: 300ms");
    px.write_config(&json);
    let r = h.reload().await.unwrap();
    assert!(r.needs_restart.is_empty(), "{r:?}");
    assert_eq!(px.get("/as-json").await.status, 200);
    let line = |path: &'static str| {
        let log = log.clone();
        move || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .lines()
                .any(|l| l.contains(path))
        }
    };
    eventually(line("/as-json")).await;
    let text = std::fs::read_to_string(&log).unwrap();
    let v: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(v["path"], "/as-json");
    assert!(!text.contains("/before"));

    // Same file, combined format.
    px.write_config(&json.replace("access_log_format: json", "access_log_format: combined"));
    h.reload().await.unwrap();
    assert_eq!(px.get("/combined").await.status, 200);
    eventually(line("/combined")).await;
    let last = std::fs::read_to_string(&log).unwrap();
    let last = last.lines().last().unwrap();
    assert!(last.contains("\"GET /combined HTTP/1.1\" 200"), "{last}");

    // A log file that cannot be opened is a reload error naming the key; nothing changes.
    px.write_config(&json.replace("{dir}/access.log", "/nonexistent-dir/access.log"));
    let e = h.reload().await.unwrap_err();
    assert!(
        e.message.contains("access_log: cannot open it"),
        "{}",
        e.message
    );
    assert_eq!(px.get("/after-refused").await.status, 200);
    eventually(line("/after-refused")).await;
    let last = std::fs::read_to_string(&log).unwrap();
    let last = last.lines().last().unwrap();
    assert!(
        last.contains("\"GET /after-refused HTTP/1.1\" 200"),
        "same file, same format: {last}"
    );

    // The reloaded grace period bounds the shutdown: a 5 s request is cut after ~300 ms.
    let addr = px.addr;
    let slow = tokio::spawn(async move {
        request(addr, "GET", "/slow?ms=5000", &[], bytes::Bytes::new()).await
    });
    eventually(|| px.inflight("blue") == 1).await;
    let started = std::time::Instant::now();
    let report = px.shutdown().await;
    assert_eq!(report.abandoned_requests, 1);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    let _ = slow.await;
}

#[tokio::test]
async fn a_reload_that_empties_the_weighted_pool_falls_back_and_says_so() {
    trace_init();
    let (blue, _green, _yaml, px) = from_file().await;
    let h = px.handle();
    h.switch(None, "green").unwrap();
    // green keeps its name but the file empties its list.
    px.write_config(&app_yaml(
        &[("blue", &[blue.addr()]), ("green", &[])],
        "blue",
        "",
    ));
    let r = h.reload().await.unwrap();
    assert_eq!(r.warnings.len(), 1, "{r:?}");
    assert!(r.warnings[0].contains("has no instances left"), "{r:?}");
    let st = h.status();
    assert_eq!(st.upstream("app").unwrap().weights["blue"], 100);
    for _ in 0..10 {
        assert_eq!(px.get("/").await.json()["color"], "blue", "no 502s");
    }
    px.shutdown().await;
}
