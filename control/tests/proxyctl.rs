//! `proxyctl` against a fake control server: every exit code (0/1/2/3/4/5), progress lines
//! when piped, `--json`, `$SWITCHYARD_SOCKET`, and the requests it sends.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use switchyard_control::protocol::{
    CanaryResult, DrainResult, FleetAck, FleetApplied, FleetDesired, FleetProxy, FleetStatus,
    LiveStats, RollbackInfo, RolloutStatus, Status,
};
use switchyard_control::{
    Change, ControlError, ControlHandler, ControlServer, ErrorCode, Event, EventSender, Peer,
    Reply, Request, PROTOCOL_VERSION,
};
use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_proxyctl");

/// Records requests; answers by pool name: `refused` -> 1, `slow` -> drain timeout.
#[derive(Default)]
struct Fake {
    seen: Mutex<Vec<(Request, Peer)>>,
}

fn weights(b: u32, g: u32) -> BTreeMap<String, u32> {
    [("blue".to_string(), b), ("green".to_string(), g)].into()
}

#[async_trait::async_trait]
impl ControlHandler for Fake {
    async fn handle(&self, req: Request, peer: Peer, events: EventSender) -> Reply {
        self.seen.lock().unwrap().push((req.clone(), peer));
        match req {
            Request::Status => Reply::ok(Status {
                protocol: PROTOCOL_VERSION,
                version: "test".into(),
                uptime_secs: 1,
                pid: 1,
                upstreams: vec![],
            }),
            Request::Switch { pool, drain, .. }
                if pool == "refused" || !drain && pool == "purple" =>
            {
                Reply::err(ControlError::new(
                    ErrorCode::UnknownPool,
                    format!("no pool {pool}"),
                ))
            }
            Request::Switch { drain, .. } => {
                let change = Change {
                    upstream: "app".into(),
                    generation: 2,
                    old_weights: weights(100, 0),
                    new_weights: weights(0, 100),
                    changed: true,
                    forced: false,
                    instances: None,
                    drain: None,
                };
                if !drain {
                    return Reply::ok(change);
                }
                events
                    .send(Event::Applied {
                        change: change.clone(),
                    })
                    .await;
                for n in [2, 1, 0] {
                    events
                        .send(Event::Draining {
                            upstream: "app".into(),
                            inflight: [("blue".to_string(), n)].into(),
                            waited_ms: 100 * (3 - n as u64),
                        })
                        .await;
                }
                let mut change = change;
                change.drain = Some(DrainResult {
                    upstream: "app".into(),
                    inflight: [("blue".to_string(), 0)].into(),
                    drained: true,
                    waited_ms: 300,
                });
                Reply::ok(change)
            }
            Request::Drain { .. } => {
                events
                    .send(Event::Draining {
                        upstream: "app".into(),
                        inflight: [("blue".to_string(), 1)].into(),
                        waited_ms: 0,
                    })
                    .await;
                Reply::err(ControlError::new(
                    ErrorCode::Timeout,
                    "blue still has 1 request(s) in flight after 1s",
                ))
            }
            // `canary good --wait` is promoted, `bad` rolled back, `stopped` aborted.
            Request::Canary { pool, .. } => {
                for (step, state) in [(0, "running"), (1, "running")] {
                    events
                        .send(Event::Rollout {
                            upstream: "app".into(),
                            rollout: rollout(&pool, step, state),
                        })
                        .await;
                }
                match pool.as_str() {
                    "bad" => Reply::err(ControlError::new(
                        ErrorCode::RolledBack,
                        "app: the canary bad was rolled back automatically at step 2 of 4 (25%): 5xx 10.2% (51 of 500 requests in 60s) above 5.0% for 2m",
                    )),
                    "stopped" => Reply::err(ControlError::new(
                        ErrorCode::Aborted,
                        "app: the rollout of stopped was stopped by `canary abort` at step 2 of 4",
                    )),
                    _ => Reply::ok(CanaryResult {
                        change: Change {
                            upstream: "app".into(),
                            generation: 3,
                            old_weights: weights(100, 0),
                            new_weights: weights(95, 5),
                            changed: true,
                            forced: false,
                            instances: None,
                            drain: None,
                        },
                        rollout: rollout(&pool, 3, "promoted"),
                    }),
                }
            }
            _ => Reply::err(ControlError::new(ErrorCode::Invalid, "not in this fake")),
        }
    }
}

fn rollout(pool: &str, step: usize, state: &str) -> RolloutStatus {
    let steps = vec![5, 25, 50, 100];
    RolloutStatus {
        pool: pool.into(),
        weight: steps[step],
        steps,
        step,
        interval_ms: 600_000,
        state: state.into(),
        step_left_ms: (state == "running").then_some(492_000),
        waiting: None,
        started: "2026-11-29T12:00:00Z".into(),
        ended: None,
        ended_by: None,
        id: 3,
    }
}

/// Serve `handler` on a new socket in a temporary directory (kept alive by the returned dir).
fn serve<H: ControlHandler>(handler: Arc<H>) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("ctl.sock");
    let server = ControlServer::bind(&sock, 0o600).unwrap();
    tokio::spawn(server.serve(handler, std::future::pending()));
    (dir, sock)
}

async fn run(socket: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .await
        .unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn every_exit_code_and_what_is_printed() {
    let fake = Arc::new(Fake::default());
    let (dir, sock) = serve(fake.clone());

    // 0: done.
    let (code, _, _) = run(&sock, &["status"]).await;
    assert_eq!(code, 0);
    let (code, out, _) = run(&sock, &["switch", "green"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("blue 100 -> 0, green 0 -> 100"), "{out}");

    // 0 with progress lines (stderr is a pipe here, so plain lines).
    let (code, out, err) = run(&sock, &["switch", "green", "--drain", "10s"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("blue: 2 in flight"), "{err}");
    assert!(err.contains("blue: 1 in flight"), "{err}");
    assert!(out.contains("blue drained after 0.3s"), "{out}");

    // 1: refused.
    let (code, _, err) = run(&sock, &["switch", "refused"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("no pool refused"), "{err}");

    // 2: usage.
    let (code, _, err) = run(&sock, &["weights", "blue"]).await;
    assert_eq!(code, 2);
    assert!(err.contains("is not POOL=PERCENT"), "{err}");
    let (code, _, _) = run(&sock, &["weight", "green", "101"]).await;
    assert_eq!(code, 2);
    let (code, _, _) = run(&sock, &["frobnicate"]).await;
    assert_eq!(code, 2);

    // 3: cannot reach the socket.
    let (code, _, err) = run(&dir.path().join("nope.sock"), &["status"]).await;
    assert_eq!(code, 3);
    assert!(err.contains("cannot reach the control socket"), "{err}");

    // 4: timed out waiting, with what is still pending.
    let (code, _, err) = run(&sock, &["drain", "blue", "--timeout", "1s"]).await;
    assert_eq!(code, 4);
    assert!(
        err.contains("blue still has 1 request(s) in flight after 1s"),
        "{err}"
    );

    // A rollout with --wait: each step on stderr; 0 promoted, 5 rolled back automatically
    // (with the numbers), 1 stopped by a human.
    let (code, out, err) = run(&sock, &["canary", "good", "--wait"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("app: rollout of good: step 1 of 4 (5%, steps 5,25,50,100), running, 8m12s left at this step"),
        "{err}"
    );
    assert!(err.contains("step 2 of 4 (25%"), "{err}");
    assert!(out.contains("rollout of good: step 4 of 4 (100%"), "{out}");
    assert!(out.contains("promoted"), "{out}");
    let (code, _, err) = run(&sock, &["canary", "bad", "--wait"]).await;
    assert_eq!(code, 5, "{err}");
    assert!(
        err.contains("5xx 10.2% (51 of 500 requests in 60s) above 5.0% for 2m"),
        "{err}"
    );
    let (code, _, err) = run(&sock, &["canary", "stopped", "--wait"]).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("stopped by `canary abort`"), "{err}");
    // Usage errors: rollout options with an action, --force without promote, bad steps.
    for args in [
        &["canary", "pause", "--wait"][..],
        &["canary", "status", "--steps", "5,100"],
        &["canary", "green", "--force"],
        &["canary", "green", "--steps", "5,x"],
        &["canary", "green", "--interval", "soon"],
    ] {
        let (code, _, err) = run(&sock, args).await;
        assert_eq!(code, 2, "{args:?}: {err}");
    }

    // --json: one JSON document on stdout, even for a refusal.
    let (code, out, _) = run(&sock, &["--json", "switch", "refused"]).await;
    assert_eq!(code, 1);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["ok"], false);
    assert_eq!(v["error"]["code"], "unknown_pool");

    // What went over the wire.
    let seen = fake.seen.lock().unwrap();
    let drain_req = seen
        .iter()
        .find_map(|(r, _)| match r {
            Request::Switch {
                drain_ms: Some(ms),
                drain,
                ..
            } => Some((*ms, *drain)),
            _ => None,
        })
        .unwrap();
    assert_eq!(drain_req, (10_000, true));
    let me = current_uid();
    assert!(seen.iter().all(|(_, p)| Some(p.uid) == me || me.is_none()));
}

/// The current uid from /proc (no libc needed).
fn current_uid() -> Option<u32> {
    std::fs::read_to_string("/proc/self/status")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[tokio::test]
async fn the_socket_comes_from_the_environment() {
    let (_dir, sock) = serve(Arc::new(Fake::default()));
    let out = Command::new(BIN)
        .env("SWITCHYARD_SOCKET", &sock)
        .arg("status")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
}

/// Answers every command with a plausible result of the right shape and records what came.
#[derive(Default)]
struct Recorder {
    seen: Mutex<Vec<Request>>,
}

fn sample_status() -> Status {
    use switchyard_control::protocol::{InstanceStatus, PoolPhase, PoolStatus, UpstreamStatus};
    use switchyard_control::HealthState;
    let inst = |addr: &str, health, inflight, extra: fn(&mut InstanceStatus)| {
        let mut i = InstanceStatus {
            addr: addr.into(),
            resolved: Some(addr.into()),
            resolve_error: None,
            inflight,
            health,
            last_check: Some("GET /actuator/health -> 200 {\"status\":\"UP\"}".into()),
            health_since_secs: 12,
            ejected_for_secs: None,
            passive_failures: 0,
        };
        extra(&mut i);
        i
    };
    Status {
        protocol: PROTOCOL_VERSION,
        version: "test".into(),
        uptime_secs: 60,
        pid: 1,
        upstreams: vec![UpstreamStatus {
            name: "app".into(),
            generation: 7,
            main: "blue".into(),
            weights: weights(90, 10),
            previous: Some(weights(100, 0)),
            sticky: "cookie".into(),
            rollout: Some(RolloutStatus {
                pool: "green".into(),
                steps: vec![5, 10, 50, 100],
                step: 1,
                weight: 10,
                interval_ms: 600_000,
                state: "running".into(),
                step_left_ms: Some(0),
                waiting: Some("waiting for traffic: 7 of 20 requests".into()),
                started: "2026-11-29T12:00:00Z".into(),
                ended: None,
                ended_by: None,
                id: 4,
            }),
            last_rollback: Some(RollbackInfo {
                pool: "green".into(),
                weight: 25,
                reason: "auto_error_rate".into(),
                detail: "5xx 10.2% (51 of 500 requests in 60s) above 5.0% for 2m".into(),
                at: "2026-11-29T11:00:00.000Z".into(),
                requests: 500,
                errors: 51,
                error_ratio: 0.102,
                main_error_ratio: 0.0,
                p99_ms: Some(12.5),
                window_ms: 60_000,
                bad_for_ms: 120_000,
            }),
            pools: vec![
                PoolStatus {
                    name: "blue".into(),
                    weight: 90,
                    phase: PoolPhase::Active,
                    inflight: 3,
                    role: Some("stable".into()),
                    live: None,
                    instances: vec![
                        inst("127.0.0.1:8081", HealthState::Healthy, 2, |_| {}),
                        inst("127.0.0.1:8083", HealthState::Ejected, 1, |i| {
                            i.ejected_for_secs = Some(25);
                        }),
                    ],
                },
                PoolStatus {
                    name: "green".into(),
                    weight: 10,
                    phase: PoolPhase::Active,
                    inflight: 0,
                    role: Some("canary".into()),
                    live: Some(LiveStats {
                        window_ms: 60_000,
                        requests: 7,
                        rate: 0.1,
                        errors: 0,
                        error_ratio: 0.0,
                        p99_ms: Some(12.5),
                        verdict: Some("too few requests: 7 of 20".into()),
                        bad_for_ms: None,
                    }),
                    instances: vec![inst("app_green:8080", HealthState::Unhealthy, 0, |i| {
                        i.resolved = Some("172.18.0.5:8080".into());
                        i.last_check =
                            Some("GET /actuator/health -> 503 {\"status\":\"DOWN\"}".into());
                    })],
                },
            ],
        }],
    }
}

#[async_trait::async_trait]
impl ControlHandler for Recorder {
    async fn handle(&self, req: Request, _peer: Peer, _events: EventSender) -> Reply {
        self.seen.lock().unwrap().push(req.clone());
        let change = Change {
            upstream: "app".into(),
            generation: 8,
            old_weights: weights(90, 10),
            new_weights: weights(80, 20),
            changed: true,
            forced: false,
            instances: None,
            drain: None,
        };
        match req {
            Request::Status => Reply::ok(sample_status()),
            Request::Drain { .. } => Reply::ok(DrainResult {
                upstream: "app".into(),
                inflight: [("blue".to_string(), 0)].into(),
                drained: true,
                waited_ms: 1200,
            }),
            Request::Reload => Reply::ok(switchyard_control::protocol::ReloadResult {
                summary: "configuration is valid: 1 listener(s)".into(),
                needs_restart: vec!["listen".into()],
                warnings: vec![],
            }),
            Request::Events { .. } => Reply::ok(Vec::<()>::new()),
            Request::Fleet { request, .. } if *request == Request::Status => {
                Reply::ok(FleetStatus {
                    name: "host-a".into(),
                    prefix: "/switchyard/prod/".into(),
                    connected: true,
                    down_since: None,
                    leader: Some("host-b".into()),
                    desired: vec![FleetDesired {
                        upstream: "app".into(),
                        generation: 8,
                        weights: weights(0, 100),
                    }],
                    proxies: vec![
                        FleetProxy {
                            name: "host-a".into(),
                            live: true,
                            upstreams: vec![FleetApplied {
                                upstream: "app".into(),
                                generation: 8,
                                in_sync: true,
                                weights: weights(0, 100),
                                unhealthy: vec![],
                                error: None,
                                age_ms: 200,
                            }],
                        },
                        FleetProxy {
                            name: "host-c".into(),
                            live: true,
                            upstreams: vec![FleetApplied {
                                upstream: "app".into(),
                                generation: 7,
                                in_sync: false,
                                weights: weights(100, 0),
                                unhealthy: vec!["green/10.0.0.3:8082 (unhealthy)".into()],
                                error: None,
                                age_ms: 4000,
                            }],
                        },
                        FleetProxy {
                            name: "host-d".into(),
                            live: false,
                            upstreams: vec![],
                        },
                    ],
                })
            }
            Request::Fleet { .. } => {
                let mut v = serde_json::to_value(change).unwrap();
                v["fleet"] = serde_json::to_value(vec![
                    FleetAck {
                        name: "host-a".into(),
                        generation: 8,
                        applied: true,
                        after_ms: Some(3),
                    },
                    FleetAck {
                        name: "host-b".into(),
                        generation: 8,
                        applied: true,
                        after_ms: Some(9),
                    },
                ])
                .unwrap();
                Reply {
                    ok: true,
                    result: Some(v),
                    error: None,
                }
            }
            _ => Reply::ok(change),
        }
    }
}

#[tokio::test]
async fn every_subcommand_sends_its_request_line() {
    use switchyard_control::MinHealthy;
    let rec = Arc::new(Recorder::default());
    let (_dir, sock) = serve(rec.clone());
    let s = |v: &str| v.to_string();
    let cases: Vec<(Vec<&str>, Request)> = vec![
        (vec!["status"], Request::Status),
        (
            vec![
                "switch",
                "green",
                "--wait-healthy",
                "30s",
                "--min-healthy",
                "50%",
                "--force",
                "--drain",
            ],
            Request::Switch {
                upstream: None,
                pool: s("green"),
                drain: true,
                drain_ms: None,
                min_healthy: MinHealthy::Percent(50),
                wait_healthy_ms: Some(30_000),
                force: true,
            },
        ),
        (
            vec!["--upstream", "api", "rollback"],
            Request::Rollback {
                upstream: Some(s("api")),
            },
        ),
        (
            vec!["weight", "green", "5", "--min-healthy", "1"],
            Request::Weight {
                upstream: None,
                pool: s("green"),
                weight: 5,
                min_healthy: MinHealthy::Count(1),
                force: false,
            },
        ),
        (
            vec!["weights", "blue=90", "green=10", "--force"],
            Request::Weights {
                upstream: None,
                weights: weights(90, 10),
                min_healthy: MinHealthy::All,
                force: true,
            },
        ),
        (
            vec!["drain", "blue", "--timeout", "2s"],
            Request::Drain {
                upstream: None,
                pool: s("blue"),
                timeout_ms: Some(2000),
            },
        ),
        (
            vec!["pool", "set", "green", "10.0.0.1:8080", "app_green:8080"],
            Request::PoolSet {
                upstream: None,
                pool: s("green"),
                instances: vec![s("10.0.0.1:8080"), s("app_green:8080")],
            },
        ),
        (
            vec!["pool", "add", "green", "10.0.0.2:8080"],
            Request::PoolAdd {
                upstream: None,
                pool: s("green"),
                instance: s("10.0.0.2:8080"),
            },
        ),
        (
            vec!["pool", "remove", "green", "10.0.0.2:8080"],
            Request::PoolRemove {
                upstream: None,
                pool: s("green"),
                instance: s("10.0.0.2:8080"),
            },
        ),
        (vec!["reload"], Request::Reload),
        (
            vec!["events", "--limit", "5"],
            Request::Events {
                follow: false,
                limit: Some(5),
            },
        ),
        (
            vec!["events", "--follow"],
            Request::Events {
                follow: true,
                limit: Some(100),
            },
        ),
        (
            vec!["canary", "green"],
            Request::Canary {
                upstream: None,
                pool: s("green"),
                steps: None,
                interval_ms: None,
                wait: false,
                min_healthy: MinHealthy::All,
                wait_healthy_ms: None,
            },
        ),
        (
            vec![
                "--upstream",
                "api",
                "canary",
                "green",
                "--steps",
                "5,50,100",
                "--interval",
                "90s",
                "--wait",
                "--min-healthy",
                "50%",
                "--wait-healthy",
                "2m",
            ],
            Request::Canary {
                upstream: Some(s("api")),
                pool: s("green"),
                steps: Some(vec![5, 50, 100]),
                interval_ms: Some(90_000),
                wait: true,
                min_healthy: MinHealthy::Percent(50),
                wait_healthy_ms: Some(120_000),
            },
        ),
        (
            vec!["canary", "status"],
            Request::CanaryStatus { upstream: None },
        ),
        (
            vec!["canary", "pause"],
            Request::CanaryPause { upstream: None },
        ),
        (
            vec!["canary", "resume"],
            Request::CanaryResume { upstream: None },
        ),
        (
            vec!["canary", "abort"],
            Request::CanaryAbort { upstream: None },
        ),
        (
            vec!["canary", "promote", "--force"],
            Request::CanaryPromote {
                upstream: None,
                force: true,
            },
        ),
    ];
    let cases: Vec<(Vec<&str>, Request)> = cases
        .into_iter()
        .chain([
            (
                vec!["status", "--fleet"],
                Request::Fleet {
                    timeout_ms: None,
                    request: Box::new(Request::Status),
                },
            ),
            (
                vec!["--fleet", "rollback", "--timeout", "2s"],
                Request::Fleet {
                    timeout_ms: Some(2000),
                    request: Box::new(Request::Rollback { upstream: None }),
                },
            ),
        ])
        .collect();
    for (args, expected) in &cases {
        let (code, out, err) = run(&sock, args).await;
        assert_eq!(code, 0, "{args:?}: {out}{err}");
        let got = rec.seen.lock().unwrap().pop().unwrap();
        assert_eq!(&got, expected, "{args:?}");
    }
    // Human output of the change commands names the moves and the generation; drain and reload
    // say what they did.
    let (_, out, _) = run(&sock, &["weight", "green", "20"]).await;
    assert_eq!(
        out.trim(),
        "app: generation 8: blue 90 -> 80, green 10 -> 20"
    );
    let (_, out, _) = run(&sock, &["drain", "blue"]).await;
    assert_eq!(out.trim(), "app: blue drained after 1.2s");
    // Fleet: every proxy's answer; the fleet's state with the lagging and the gone proxy.
    let (_, out, _) = run(&sock, &["weight", "green", "20", "--fleet"]).await;
    assert_eq!(
        out.trim(),
        "app: generation 8: blue 90 -> 80, green 10 -> 20\n  host-a: generation 8, applied after 3 ms\n  host-b: generation 8, applied after 9 ms"
    );
    let (_, out, _) = run(&sock, &["status", "--fleet"]).await;
    assert!(
        out.contains("fleet /switchyard/prod/  seen from host-a  link up"),
        "{out}"
    );
    assert!(out.contains("leader: host-b"), "{out}");
    assert!(
        out.contains("desired app: generation 8  weights blue=0 green=100"),
        "{out}"
    );
    let lagging = out.lines().find(|l| l.contains("host-c")).unwrap();
    assert!(
        lagging.contains("LAGGING") && lagging.contains("green/10.0.0.3:8082 (unhealthy)"),
        "{out}"
    );
    let gone = out.lines().find(|l| l.contains("host-d")).unwrap();
    assert!(gone.contains("gone"), "{out}");
    // Usage errors: --timeout without drain or --fleet; --fleet with a per-proxy command.
    for args in [
        &["switch", "green", "--timeout", "2s"][..],
        &["drain", "blue", "--fleet"],
        &["events", "--fleet"],
        &["canary", "status", "--fleet"],
    ] {
        let (code, _, err) = run(&sock, args).await;
        assert_eq!(code, 2, "{args:?}: {err}");
    }
    let (_, out, _) = run(&sock, &["reload"]).await;
    assert!(out.contains("reloaded: configuration is valid"), "{out}");
    assert!(
        out.contains("changed but only applied after a restart: listen"),
        "{out}"
    );
}

#[tokio::test]
async fn status_is_readable_for_humans_and_complete_in_json() {
    let (_dir, sock) = serve(Arc::new(Recorder::default()));
    let (code, out, _) = run(&sock, &["status"]).await;
    assert_eq!(code, 0);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0], "app  generation 7  main blue  weights blue=90 green=10  sticky cookie",
        "{out}"
    );
    assert_eq!(
        lines[1],
        "  rollout of green: step 2 of 4 (10%, steps 5,10,50,100), running; waiting for traffic: 7 of 20 requests",
        "{out}"
    );
    assert_eq!(
        lines[2],
        "  last automatic rollback: green at 2026-11-29T11:00:00.000Z (auto_error_rate): 5xx 10.2% (51 of 500 requests in 60s) above 5.0% for 2m",
        "{out}"
    );
    assert!(
        lines[3].contains("POOL") && lines[3].contains("IN-FLIGHT") && lines[3].contains("P99"),
        "{out}"
    );
    let blue = lines
        .iter()
        .find(|l| l.trim_start().starts_with("blue"))
        .unwrap();
    assert!(
        blue.contains("90") && blue.contains("active") && blue.contains(" 3 "),
        "{blue}"
    );
    assert!(
        blue.contains("127.0.0.1:8081 healthy [2 in flight]"),
        "{blue}"
    );
    assert!(
        blue.contains("127.0.0.1:8083 ejected for 25s more"),
        "{blue}"
    );
    let green = lines
        .iter()
        .find(|l| l.trim_start().starts_with("green"))
        .unwrap();
    assert!(
        green.contains("app_green:8080 (172.18.0.5:8080) unhealthy (GET /actuator/health -> 503 {\"status\":\"DOWN\"})"),
        "{green}"
    );
    assert!(
        green.contains(" canary ")
            && green.contains("0.1")
            && green.contains("0.0%")
            && green.contains("12.5ms"),
        "{green}"
    );
    assert!(
        out.contains("canary analysis: too few requests: 7 of 20"),
        "{out}"
    );
    let (code, out, _) = run(&sock, &["--json", "status"]).await;
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["ok"], true);
    let back: Status = serde_json::from_value(v["result"].clone()).unwrap();
    assert_eq!(back, sample_status(), "--json carries the whole document");
}
