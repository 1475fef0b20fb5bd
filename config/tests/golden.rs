//! Golden tests: every file in `fixtures/valid` validates; every file in `fixtures/invalid`
//! fails with exactly the lines of its `.err` file. Run with `UPDATE_GOLDEN=1` to rewrite the
//! `.err` files after an intended change of wording (then review the diff).

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

fn fixtures(kind: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(kind);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no fixtures in {}", dir.display());
    files
}

#[test]
fn valid_fixtures_validate() {
    for f in fixtures("valid") {
        if let Err(e) = switchyard_config::load(&f) {
            panic!("{} should be valid:\n{e}", f.display());
        }
    }
}

#[test]
fn invalid_fixtures_fail_with_golden_errors() {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    for f in fixtures("invalid") {
        let err = switchyard_config::load(&f).expect_err(&format!("{} validated", f.display()));
        let got: String = err
            .field_errors()
            .iter()
            .map(|e| format!("{e}\n"))
            .collect();
        let golden = f.with_extension("err");
        if update {
            std::fs::write(&golden, &got).unwrap();
            continue;
        }
        let want = std::fs::read_to_string(&golden)
            .unwrap_or_else(|_| panic!("missing {} (run with UPDATE_GOLDEN=1)", golden.display()));
        assert_eq!(got, want, "errors of {} differ from golden", f.display());
    }
}

#[test]
fn spec_example_has_the_documented_values() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/valid/spec-example.yaml");
    let c = switchyard_config::load(&path).unwrap();
    assert_eq!(c.threads, 2);
    assert_eq!(c.client_max_body_size, 10 << 20);
    assert_eq!(c.listen.len(), 2);
    assert!(c.listen[1].http2 && c.listen[1].tls.is_some());
    assert!(!c.listen[0].http2);
    assert_eq!(c.control.mode, 0o600);
    let fleet = c.fleet.as_ref().unwrap();
    assert_eq!(fleet.prefix, "/switchyard/prod/");
    assert_eq!(fleet.name, "host-a");
    assert_eq!(fleet.lease_ttl, std::time::Duration::from_secs(10));
    let app = c.upstream("app").unwrap();
    assert_eq!(app.active, "blue");
    assert_eq!(app.pool("blue").unwrap().instances.len(), 2);
    assert_eq!(app.health.expect_json_status, vec!["UP".to_string()]);
    assert!(app.canary.auto_rollback);
    assert_eq!(app.canary.analysis.min_requests, 20);
    assert_eq!(
        app.canary.analysis.hold_for,
        std::time::Duration::from_secs(120)
    );
    assert_eq!(app.canary.analysis.latency_p99, None);
    assert!(!app.canary.analysis.relative_to_main);
    assert_eq!(app.steps, vec![5, 25, 50, 100]);
    assert_eq!(app.step_interval, std::time::Duration::from_secs(600));
    assert!(c.routes[0].strip_prefix);
    assert!(c.deny.paths[0].is_match("/ACTUATOR/env"));
}

#[test]
fn defaults_are_the_documented_ones() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/valid/minimal.yaml");
    let c = switchyard_config::load(&path).unwrap();
    let s = std::time::Duration::from_secs;
    assert_eq!(c.grace_period, s(30));
    assert_eq!(c.keepalive_timeout, s(75));
    assert_eq!(c.client_max_body_size, 10 * 1024 * 1024);
    assert_eq!(c.control.socket, PathBuf::from("./switchyard.sock"));
    assert_eq!(c.admin.listen, Some("127.0.0.1:9091".parse().unwrap()));
    assert_eq!(c.state_file, PathBuf::from("./switchyard.state.json"));
    assert_eq!(c.access_log, switchyard_config::AccessLog::Stdout);
    let u = &c.upstreams[0];
    assert_eq!(u.active, "blue");
    assert_eq!(
        (u.connect_timeout, u.read_timeout, u.idle_timeout),
        (s(2), s(60), s(15))
    );
    assert_eq!(
        (u.retries, u.drain_timeout, u.resolve_interval),
        (1, s(30), s(5))
    );
    assert_eq!(u.health.path, "/actuator/health");
    assert_eq!(
        (u.health.healthy_threshold, u.health.unhealthy_threshold),
        (2, 3)
    );
    assert_eq!(u.passive.consecutive_failures, 5);
    assert_eq!(u.canary.sticky, switchyard_config::Sticky::Cookie);
    assert_eq!(u.canary.cookie, "switchyard_pool");
    assert_eq!(u.canary.force_header, "X-Canary");
    assert!(u.canary.auto_rollback);
    assert_eq!(
        (u.canary.analysis.error_rate, u.canary.analysis.min_requests),
        (0.05, 20)
    );
    assert_eq!(u.canary.analysis.window, s(60));
    assert_eq!(u.steps, switchyard_config::DEFAULT_STEPS.to_vec());
    assert_eq!(u.step_interval, s(600));
    assert_eq!(u.preview.header, "X-Switchyard-Pool");
    assert!(u
        .preview
        .allow_from
        .iter()
        .any(|n| n.contains(&"127.0.0.1".parse::<std::net::IpAddr>().unwrap())));
    assert_eq!(c.deny.status, 403);
}
