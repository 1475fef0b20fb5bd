//! Metrics, the admin listener, the access log and the audit trail (issue 5).

use bytes::Bytes;
use std::collections::BTreeMap;
use std::time::Duration;
use switchyard_control::{Event, Request};
use switchyard_tests::*;

/// GET on the admin listener.
async fn admin_get(px: &TestProxy, path: &str) -> Reply {
    let addr = px.handle().admin_addr().expect("admin listener");
    request(addr, "GET", path, &[], Bytes::new()).await.unwrap()
}

/// Parse the exposition format; every line must parse.
fn parse(text: &str) -> prometheus_parse::Scrape {
    let lines = text.lines().map(|l| Ok(l.to_string()));
    prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text format")
}

fn value(s: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    s.samples
        .iter()
        .find(|x| x.metric == name && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .map(|x| match &x.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => *v,
            prometheus_parse::Value::Histogram(h) => h.iter().map(|b| b.count).fold(0.0, f64::max),
            prometheus_parse::Value::Summary(_) => f64::NAN,
        })
}

fn admin_yaml(pools: &[(&str, &[std::net::SocketAddr])], extra: &str) -> String {
    app_yaml(pools, "blue", extra).replace(
        "admin:\n  listen: \"off\"",
        "admin:\n  listen: \"127.0.0.1:0\"",
    )
}

#[tokio::test]
async fn counters_are_exact_and_gauges_follow_a_switch() {
    trace_init();
    let blue = FakeUpstream::start("blue").await.unwrap();
    let green = FakeUpstream::start("green").await.unwrap();
    let yaml = admin_yaml(&[("blue", &[blue.addr()]), ("green", &[green.addr()])], "")
        .replace("routes:", "deny:\n  paths: [\"(?i)/actuator\"]\nroutes:");
    let px = TestProxy::start(&yaml).await;
    for _ in 0..30 {
        assert_eq!(px.get("/").await.status, 200);
    }
    for _ in 0..3 {
        assert_eq!(px.get("/actuator/env").await.status, 403);
    }
    px.handle().switch(None, "green").unwrap();
    for _ in 0..20 {
        assert_eq!(px.get("/").await.status, 200);
    }
    for _ in 0..4 {
        assert_eq!(px.get("/status/503").await.status, 503);
    }

    // Counted in the logging phase, a moment after each response reached the client.
    eventually(|| {
        parse(&px.handle().metrics_text()).samples.iter().any(|x| {
            x.metric == "switchyard_http_requests_total"
                && x.labels.get("status") == Some("503")
                && matches!(x.value, prometheus_parse::Value::Counter(v) if v == 4.0)
        })
    })
    .await;
    let r = admin_get(&px, "/metrics").await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.headers["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let s = parse(&r.text());
    let req = "switchyard_http_requests_total";
    assert_eq!(
        value(
            &s,
            req,
            &[("upstream", "app"), ("pool", "blue"), ("status", "200")]
        ),
        Some(30.0)
    );
    assert_eq!(
        value(
            &s,
            req,
            &[("upstream", "app"), ("pool", "green"), ("status", "200")]
        ),
        Some(20.0)
    );
    assert_eq!(
        value(
            &s,
            req,
            &[("upstream", "app"), ("pool", "green"), ("status", "503")]
        ),
        Some(4.0)
    );
    assert_eq!(
        value(
            &s,
            req,
            &[("upstream", "none"), ("pool", "none"), ("status", "403")]
        ),
        Some(3.0)
    );
    assert_eq!(
        value(
            &s,
            "switchyard_http_request_duration_seconds_count",
            &[("pool", "blue")]
        ),
        Some(30.0)
    );
    assert_eq!(
        value(&s, "switchyard_switches_total", &[("upstream", "app")]),
        Some(1.0)
    );
    assert_eq!(
        value(
            &s,
            "switchyard_rollbacks_total",
            &[("upstream", "app"), ("reason", "manual")]
        ),
        Some(0.0)
    );
    assert_eq!(
        value(&s, "switchyard_pool_weight", &[("pool", "green")]),
        Some(100.0)
    );
    assert_eq!(
        value(&s, "switchyard_pool_weight", &[("pool", "blue")]),
        Some(0.0)
    );
    assert_eq!(
        value(
            &s,
            "switchyard_instance_healthy",
            &[("pool", "blue"), ("instance", &blue.addr().to_string())]
        ),
        Some(1.0)
    );
    assert!(value(&s, "process_resident_memory_bytes", &[]).is_some_and(|v| v > 0.0));

    // In-flight: the gauge and `status` agree while a slow request runs.
    let addr = px.addr;
    let slow =
        tokio::spawn(async move { request(addr, "GET", "/slow?ms=800", &[], Bytes::new()).await });
    eventually(|| px.inflight("green") == 1).await;
    let s = parse(&admin_get(&px, "/metrics").await.text());
    assert_eq!(
        value(&s, "switchyard_upstream_inflight", &[("pool", "green")]),
        Some(1.0)
    );
    assert_eq!(slow.await.unwrap().unwrap().status, 200);

    // Rollback: counted as manual; weights gauge back.
    px.handle().rollback(None).unwrap();
    let s = parse(&admin_get(&px, "/metrics").await.text());
    assert_eq!(
        value(
            &s,
            "switchyard_rollbacks_total",
            &[("upstream", "app"), ("reason", "manual")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(&s, "switchyard_pool_weight", &[("pool", "blue")]),
        Some(100.0)
    );
    assert_eq!(
        value(&s, "switchyard_switches_total", &[("upstream", "app")]),
        Some(2.0)
    );
    px.shutdown().await;
}

#[tokio::test]
async fn metric_types_are_the_contract_and_labels_stay_bounded() {
    trace_init();
    let blue = FakeUpstream::builder("blue")
        .record(false)
        .start()
        .await
        .unwrap();
    let px = TestProxy::start(&admin_yaml(&[("blue", &[blue.addr()])], "")).await;
    let mut c = Conn::open(px.addr).await.unwrap();
    for i in 0..10_000 {
        c.get(&format!("/item/{i}?q={i}")).await.unwrap();
    }
    // The last response reaches the client a moment before its logging phase counts it.
    eventually(|| {
        let s = parse(&px.handle().metrics_text());
        value(
            &s,
            "switchyard_http_requests_total",
            &[("pool", "blue"), ("status", "200")],
        ) == Some(10_000.0)
    })
    .await;
    let text = px.handle().metrics_text();
    let s = parse(&text);
    let types: BTreeMap<&str, &str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .collect();
    for (name, t) in [
        ("switchyard_http_requests_total", "counter"),
        ("switchyard_http_request_duration_seconds", "histogram"),
        ("switchyard_upstream_inflight", "gauge"),
        ("switchyard_pool_weight", "gauge"),
        ("switchyard_instance_healthy", "gauge"),
        ("switchyard_switches_total", "counter"),
        ("switchyard_rollbacks_total", "counter"),
        ("switchyard_config_reloads_total", "counter"),
    ] {
        assert_eq!(types.get(name), Some(&t), "{name}");
    }
    let series = s
        .samples
        .iter()
        .filter(|x| x.metric == "switchyard_http_requests_total")
        .count();
    assert!(
        series <= 2,
        "{series} request series after 10k distinct paths"
    );
    assert!(!text.contains("/item/"), "a path leaked into a label");
    assert_eq!(
        value(
            &s,
            "switchyard_http_requests_total",
            &[("pool", "blue"), ("status", "200")]
        ),
        Some(10_000.0)
    );
    px.shutdown().await;
}

#[tokio::test]
async fn admin_answers_healthz_status_and_404() {
    trace_init();
    let blue = FakeUpstream::start("blue").await.unwrap();
    let px = TestProxy::start(&admin_yaml(&[("blue", &[blue.addr()])], "")).await;
    let admin = px.handle().admin_addr().unwrap();
    assert!(admin.ip().is_loopback());
    let r = admin_get(&px, "/healthz").await;
    assert_eq!((r.status, r.text().as_str()), (200, "ok\n"));
    let r = admin_get(&px, "/status").await;
    assert_eq!(r.status, 200);
    let st: switchyard_control::Status = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(st.upstreams, px.handle().status().upstreams);
    assert_eq!(admin_get(&px, "/").await.status, 404);
    assert_eq!(admin_get(&px, "/metrics/x").await.status, 404);
    let r = request(admin, "POST", "/metrics", &[], Bytes::new())
        .await
        .unwrap();
    assert_eq!(r.status, 405);
    px.shutdown().await;
}

#[tokio::test]
async fn access_log_lines_have_the_documented_fields_and_reopen_works() {
    trace_init();
    let blue = FakeUpstream::start("blue").await.unwrap();
    let hang = FakeUpstream::start("blue").await.unwrap();
    hang.set_mode(Mode::Hang);
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let yaml = format!(
        r#"listen: [{{addr: "127.0.0.1:0"}}]
admin: {{listen: "off"}}
control: {{socket: "{{dir}}/control.sock"}}
state_file: "{{dir}}/state.json"
access_log: "{{dir}}/access.log"
upstreams:
  app:
    pools: {{blue: ["{blue}"]}}
  dead:
    pools: {{blue: ["{dead}"]}}
  slow:
    pools: {{blue: ["{hang}"]}}
    read_timeout: 300ms
routes:
  - {{path_prefix: /dead/, upstream: dead}}
  - {{path_prefix: /slow/, upstream: slow}}
  - {{path_prefix: /, upstream: app}}
deny:
  paths: ["(?i)/actuator"]
"#,
        blue = blue.addr(),
        hang = hang.addr()
    );
    let px = TestProxy::start(&yaml).await;
    let log = px.dir.path().join("access.log");
    let mut c = Conn::open(px.addr).await.unwrap();
    let ok = c
        .send(
            "GET",
            "/users?id=1",
            &[("user-agent", "test-agent/1.0"), ("referer", "http://ref/")],
            Bytes::new(),
        )
        .await
        .unwrap();
    assert_eq!(ok.status, 200);
    assert_eq!(px.get("/actuator/env").await.status, 403);
    assert_eq!(px.get("/dead/x").await.status, 502);
    assert_eq!(px.get("/slow/x").await.status, 504);
    eventually(|| log_lines(&log).len() == 4).await;
    let lines = log_lines(&log);
    let find = |needle: &str| {
        lines
            .iter()
            .find(|l| l.contains(needle))
            .cloned()
            .unwrap_or_default()
    };

    let l = find("/users?id=1");
    assert!(l.starts_with("127.0.0.1 - - ["), "{l}");
    assert!(l.contains("\"GET /users?id=1 HTTP/1.1\" 200 "), "{l}");
    assert!(l.contains("\"http://ref/\" \"test-agent/1.0\" rt="), "{l}");
    assert!(
        l.contains(&format!(
            "upstream=app pool=blue instance={} error=-",
            blue.addr()
        )),
        "{l}"
    );

    let l = find("/actuator/env");
    assert!(
        l.contains("\" 403 ") && l.contains("upstream=- pool=- instance=- error=-"),
        "{l}"
    );
    let l = find("/dead/x");
    assert!(
        l.contains("\" 502 ")
            && l.contains("upstream=dead pool=blue")
            && l.contains("error=connection_refused"),
        "{l}"
    );
    let l = find("/slow/x");
    assert!(
        l.contains("\" 504 ")
            && l.contains("upstream=slow")
            && l.contains("error=upstream_read_timeout"),
        "{l}"
    );

    // logrotate: move the file away, signal, and the next line goes to a new file.
    let rotated = px.dir.path().join("access.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    px.handle().reopen_logs();
    // The writer reopens at its next wake-up; keep logging until a line lands in the new file.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while log_lines(&log).is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no new access.log after reopen"
        );
        px.get("/after-rotate").await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(log_lines(&log)[0].contains("/after-rotate"));
    let old = log_lines(&rotated);
    // The four lines from before stay in the rotated file. Not necessarily in request order:
    // a line is queued after its response went out, and two worker threads race to queue.
    assert!(old.len() >= 4, "{old:?}");
    for needle in ["/users?id=1", "/actuator/env", "/dead/x", "/slow/x"] {
        assert!(old.iter().any(|l| l.contains(needle)), "{needle}: {old:?}");
    }
    px.shutdown().await;
}

#[tokio::test]
async fn json_access_log() {
    trace_init();
    let blue = FakeUpstream::start("blue").await.unwrap();
    let yaml = app_yaml(&[("blue", &[blue.addr()])], "blue", "").replace(
        "access_log: \"off\"",
        "access_log: \"{dir}/access.log\"\naccess_log_format: json",
    );
    let px = TestProxy::start(&yaml).await;
    assert_eq!(px.get("/x?y=1").await.status, 200);
    let log = px.dir.path().join("access.log");
    eventually(|| !log_lines(&log).is_empty()).await;
    let v: serde_json::Value = serde_json::from_str(&log_lines(&log)[0]).unwrap();
    for key in [
        "time",
        "client",
        "method",
        "path",
        "status",
        "bytes",
        "duration_ms",
        "upstream",
        "pool",
        "instance",
        "error",
    ] {
        assert!(v.get(key).is_some(), "missing {key}: {v}");
    }
    assert_eq!(v["path"], "/x?y=1");
    assert_eq!(v["status"], 200);
    assert_eq!(v["pool"], "blue");
    px.shutdown().await;
}

#[tokio::test]
async fn events_list_a_switch_with_uid_and_generation_and_follow_streams_new_ones() {
    trace_init();
    let (_blue, _green, px) = blue_green(true, "").await;
    let switch = |pool: &str| switch_req(pool, None);
    assert!(px.ctl_call(switch("green")).await.ok);
    let r = px
        .ctl_call(Request::Events {
            follow: false,
            limit: Some(50),
        })
        .await;
    let records: Vec<switchyard_control::AuditRecord> =
        serde_json::from_value(r.result.unwrap()).unwrap();
    let sw = records
        .iter()
        .rev()
        .find(|r| r.kind == "switch")
        .expect("a switch record");
    assert_eq!(sw.generation, Some(2));
    assert_eq!(sw.actor, "socket");
    let me = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix("Uid:")
                .map(|v| v.split_whitespace().next().unwrap().parse::<u32>().unwrap())
        });
    assert_eq!(sw.uid, me);
    assert_eq!(sw.pid, Some(std::process::id() as i32));
    assert_eq!(sw.new_weights.as_ref().unwrap()["green"], 100);

    // --follow: a new switch shows up on an open stream.
    let socket = px.socket();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let follower = tokio::spawn(async move {
        let mut c = switchyard_control::ControlClient::connect(&socket)
            .await
            .unwrap();
        let _ = c
            .call(
                &Request::Events {
                    follow: true,
                    limit: Some(0),
                },
                |e| {
                    if let Event::Record { record: r } = e {
                        let _ = tx.send(r.clone());
                    }
                },
            )
            .await;
    });
    // Wait until the follower is subscribed: a record it receives proves it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let got = loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "follow streamed nothing"
        );
        px.handle().set_weight(None, "blue", 5).ok();
        px.handle().rollback(None).ok();
        match tokio::time::timeout(Duration::from_millis(200), rx.recv()).await {
            Ok(Some(r)) => break r,
            _ => continue,
        }
    };
    assert!(
        ["weight", "rollback"].contains(&got.kind.as_str()),
        "{got:?}"
    );
    assert_eq!(got.actor, "library");
    follower.abort();
    px.shutdown().await;
}

/// The dashboard and the alert rules only use metrics the proxy exports.
#[test]
fn docs_use_only_exported_metric_names() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dash = std::fs::read_to_string(root.join("docs/grafana-dashboard.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&dash).expect("dashboard is JSON");
    assert!(v["panels"].as_array().unwrap().len() >= 6);
    let alerts = std::fs::read_to_string(root.join("docs/prometheus-alerts.yml")).unwrap();
    let known = [
        "switchyard_http_requests_total",
        "switchyard_http_request_duration_seconds_bucket",
        "switchyard_upstream_inflight",
        "switchyard_pool_weight",
        "switchyard_instance_healthy",
        "switchyard_switches_total",
        "switchyard_rollbacks_total",
        "switchyard_config_reloads_total",
        "switchyard_access_log_dropped_total",
    ];
    for text in [&dash, &alerts] {
        let mut rest = text.as_str();
        let mut found = 0;
        while let Some(i) = rest.find("switchyard_") {
            let name: String = rest[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest = &rest[i + name.len()..];
            if name == "switchyard_" || name.starts_with("switchyard_proxy") {
                continue;
            }
            found += 1;
            assert!(known.contains(&name.as_str()), "unknown metric {name}");
        }
        assert!(found > 5);
    }
}

/// SPEC §3 `request_id`: a well-formed client id is kept, anything else replaced by a UUID v4;
/// the id reaches the app, comes back on the response (also on the proxy's own replies) and is
/// in the access log; the header name is configurable.
#[tokio::test]
async fn request_ids_are_kept_or_generated_forwarded_returned_and_logged() {
    trace_init();
    let blue = FakeUpstream::builder("blue")
        .record(true)
        .start()
        .await
        .unwrap();
    let yaml = app_yaml(&[("blue", &[blue.addr()])], "blue", "")
        .replace("access_log: \"off\"", "access_log: \"{dir}/access.log\"")
        + "deny:\n  paths: [\"(?i)/actuator\"]\n";
    let px = TestProxy::start(&yaml).await;
    let id_of = |r: &Reply| {
        r.headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let is_uuid_v4 = |s: &str| {
        s.len() == 36
            && s.as_bytes()[14] == b'4'
            && s.chars().enumerate().all(|(i, c)| {
                matches!(i, 8 | 13 | 18 | 23) == (c == '-') && (c == '-' || c.is_ascii_hexdigit())
            })
    };
    // Kept.
    let r = request(
        px.addr,
        "GET",
        "/kept",
        &[("x-request-id", "abc-123")],
        Bytes::new(),
    )
    .await
    .unwrap();
    assert_eq!(id_of(&r), "abc-123");
    // Generated, and a different one per request.
    let r1 = request(px.addr, "GET", "/new", &[], Bytes::new())
        .await
        .unwrap();
    let r2 = request(px.addr, "GET", "/new", &[], Bytes::new())
        .await
        .unwrap();
    let (g1, g2) = (id_of(&r1), id_of(&r2));
    assert!(is_uuid_v4(&g1) && is_uuid_v4(&g2) && g1 != g2, "{g1} {g2}");
    // Ill-formed (a space that would forge a log field; too long): replaced.
    let long = "a".repeat(129);
    for bad in ["bad id=forged", long.as_str()] {
        let r = request(
            px.addr,
            "GET",
            "/bad",
            &[("x-request-id", bad)],
            Bytes::new(),
        )
        .await
        .unwrap();
        assert!(is_uuid_v4(&id_of(&r)), "{bad} -> {}", id_of(&r));
    }
    // What the app saw is what the client got back.
    let seen: Vec<(String, String)> = blue
        .seen()
        .iter()
        .map(|s| {
            let id = s
                .headers
                .get_all("x-request-id")
                .iter()
                .map(|v| v.to_str().unwrap_or_default().to_string())
                .collect::<Vec<_>>()
                .join(",");
            (s.path.clone(), id)
        })
        .collect();
    assert_eq!(seen[0], ("/kept".to_string(), "abc-123".to_string()));
    assert_eq!(seen[1], ("/new".to_string(), g1.clone()));
    assert_eq!(seen[2], ("/new".to_string(), g2.clone()));
    assert!(seen[3..].iter().all(|(_, id)| is_uuid_v4(id)), "{seen:?}");
    // The proxy's own reply carries one too.
    let denied = request(
        px.addr,
        "GET",
        "/actuator/env",
        &[("x-request-id", "t-1")],
        Bytes::new(),
    )
    .await
    .unwrap();
    assert_eq!((denied.status, id_of(&denied).as_str()), (403, "t-1"));
    // In the access log.
    let log = px.dir.path().join("access.log");
    eventually(|| log_lines(&log).len() >= 6).await;
    let lines = log_lines(&log);
    for (path, id) in [
        ("/kept", "abc-123"),
        ("/new", g1.as_str()),
        ("/actuator/env", "t-1"),
    ] {
        assert!(
            lines
                .iter()
                .any(|l| l.contains(&format!("GET {path} ")) && l.ends_with(&format!(" rid={id}"))),
            "{path} {id}: {lines:#?}"
        );
    }
    px.shutdown().await;

    // Another header name.
    let yaml = app_yaml(&[("blue", &[blue.addr()])], "blue", "") + "request_id: X-Correlation-Id\n";
    let px = TestProxy::start(&yaml).await;
    let r = request(
        px.addr,
        "GET",
        "/",
        &[("x-correlation-id", "c-9")],
        Bytes::new(),
    )
    .await
    .unwrap();
    assert_eq!(
        r.headers
            .get("x-correlation-id")
            .and_then(|v| v.to_str().ok()),
        Some("c-9")
    );
    assert!(r.headers.get("x-request-id").is_none());
    let last = blue.seen().pop().unwrap();
    assert_eq!(
        last.headers
            .get("x-correlation-id")
            .and_then(|v| v.to_str().ok()),
        Some("c-9")
    );
    // Two ids from the client: the first is the request's, and the app sees only it.
    let r = request(
        px.addr,
        "GET",
        "/twice",
        &[("x-correlation-id", "d-1"), ("x-correlation-id", "d-2")],
        Bytes::new(),
    )
    .await
    .unwrap();
    assert_eq!(
        r.headers
            .get("x-correlation-id")
            .and_then(|v| v.to_str().ok()),
        Some("d-1")
    );
    let last = blue.seen().pop().unwrap();
    let ids: Vec<_> = last.headers.get_all("x-correlation-id").iter().collect();
    assert_eq!(ids, ["d-1"]);
    px.shutdown().await;
}
