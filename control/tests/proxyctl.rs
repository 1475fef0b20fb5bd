//! `proxyctl` against a fake control server: every exit code (0/1/2/3/4), progress lines when
//! piped, `--json`, `$SWITCHYARD_SOCKET`, and the requests it sends.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use switchyard_control::protocol::{DrainResult, Status};
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
            _ => Reply::err(ControlError::new(ErrorCode::Invalid, "not in this fake")),
        }
    }
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
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("ctl.sock");
    let fake = Arc::new(Fake::default());
    let server = ControlServer::bind(&sock, 0o600).unwrap();
    tokio::spawn(server.serve(fake.clone(), std::future::pending()));

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
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("env.sock");
    let server = ControlServer::bind(&sock, 0o600).unwrap();
    tokio::spawn(server.serve(Arc::new(Fake::default()), std::future::pending()));
    let out = Command::new(BIN)
        .env("SWITCHYARD_SOCKET", &sock)
        .arg("status")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
}
