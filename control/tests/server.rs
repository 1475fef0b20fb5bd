//! The control server's connection rules against a fake handler: idle connections are closed,
//! when the server is full an idle one makes room for a new client, waiting commands cannot
//! take the last connections, and a client that does not read is dropped.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};
use switchyard_control::protocol::{AuditRecord, Event};
use switchyard_control::server::{MAX_CONNECTIONS, RESERVED_FOR_SHORT};
use switchyard_control::{
    ControlClient, ControlHandler, ControlServer, ErrorCode, EventSender, Peer, Reply, Request,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// `status` answers at once; `drain` (a waiting command) and `rollback` (a short one) never
/// finish; `events --follow` streams records as fast as they can be written.
struct Fake;

#[async_trait::async_trait]
impl ControlHandler for Fake {
    async fn handle(&self, req: Request, _peer: Peer, events: EventSender) -> Reply {
        match req {
            Request::Drain { .. } | Request::Rollback { .. } => {
                std::future::pending::<()>().await;
            }
            Request::Events { follow: true, .. } => loop {
                let record = AuditRecord {
                    seq: 1,
                    time: "2026-11-29T00:00:00Z".into(),
                    kind: "switch".into(),
                    upstream: None,
                    pool: None,
                    instance: None,
                    actor: "socket".into(),
                    uid: None,
                    pid: None,
                    generation: None,
                    old_weights: None,
                    new_weights: None,
                    forced: false,
                    message: "x".repeat(1000),
                };
                if !events.send(Event::Record { record }).await {
                    return Reply::ok("gone");
                }
            },
            _ => {}
        }
        Reply::ok("ok")
    }
}

fn serve(
    idle: Duration,
) -> (
    tempfile::TempDir,
    std::path::PathBuf,
    Arc<std::sync::atomic::AtomicUsize>,
) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("c.sock");
    let server = ControlServer::bind(&sock, 0o600)
        .unwrap()
        .with_idle_timeout(idle);
    let open = server.open_connections();
    tokio::spawn(server.serve(Arc::new(Fake), std::future::pending()));
    (dir, sock, open)
}

/// How long until the server closes `s` (None: still open after 5 s).
async fn closed_after(s: &mut UnixStream) -> Option<Duration> {
    let start = Instant::now();
    let mut buf = [0u8; 256];
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .ok()?;
    Some(start.elapsed())
}

#[tokio::test]
async fn idle_and_trickling_connections_are_closed() {
    let (_dir, sock, _) = serve(Duration::from_millis(300));
    let mut idle = UnixStream::connect(&sock).await.unwrap();
    let t = closed_after(&mut idle).await.expect("closed");
    assert!(t >= Duration::from_millis(250), "{t:?}");
    // One byte every 100 ms, never a whole line: the line's deadline still holds.
    let mut slow = UnixStream::connect(&sock).await.unwrap();
    let start = Instant::now();
    let mut cut = false;
    for b in b"{\"cmd\":\"status\"".iter().cycle().take(50) {
        if slow.write_all(&[*b]).await.is_err() {
            cut = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        cut,
        "a trickled line kept the connection for {:?}",
        start.elapsed()
    );
    assert!(start.elapsed() < Duration::from_secs(2));
    // A connection between two requests is idle too, and a client that talks is served.
    let mut c = ControlClient::connect(&sock).await.unwrap();
    assert!(c.request(&Request::Status).await.unwrap().ok);
}

#[tokio::test]
async fn when_full_an_idle_connection_makes_room_and_busy_ones_do_not() {
    let (_dir, sock, _) = serve(Duration::from_secs(60));
    let mut idle = Vec::new();
    for _ in 0..MAX_CONNECTIONS {
        idle.push(UnixStream::connect(&sock).await.unwrap());
    }
    // Full of idle connections: a new client is still served.
    let mut c = ControlClient::connect(&sock).await.unwrap();
    let r = tokio::time::timeout(Duration::from_secs(5), c.request(&Request::Status))
        .await
        .unwrap()
        .unwrap();
    assert!(r.ok, "{r:?}");
    drop(c);
    drop(idle);

    // Commands that wait take all but RESERVED_FOR_SHORT connections; then the next one is
    // told to come back while a short command is still served.
    let (_dir2, sock, _) = serve(Duration::from_secs(60));
    let mut busy = Vec::new();
    for _ in 0..MAX_CONNECTIONS - RESERVED_FOR_SHORT {
        let mut s = UnixStream::connect(&sock).await.unwrap();
        s.write_all(b"{\"cmd\":\"drain\",\"pool\":\"blue\"}\n")
            .await
            .unwrap();
        busy.push(s);
    }
    // Let the server read every command (bounded poll on what it answers one more).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut c = ControlClient::connect(&sock).await.unwrap();
        let drain = Request::Drain {
            upstream: None,
            pool: "blue".into(),
            timeout_ms: None,
        };
        let r = tokio::time::timeout(Duration::from_millis(500), c.request(&drain)).await;
        if let Ok(Ok(r)) = r {
            assert!(!r.ok);
            assert_eq!(r.error.unwrap().code, ErrorCode::Busy);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "waiting commands took every connection"
        );
    }
    let mut c = ControlClient::connect(&sock).await.unwrap();
    assert!(c.request(&Request::Status).await.unwrap().ok);
    drop(c);
    // Full of connections running commands: a newcomer is told to come back.
    for _ in 0..RESERVED_FOR_SHORT {
        let mut s = UnixStream::connect(&sock).await.unwrap();
        s.write_all(b"{\"cmd\":\"rollback\"}\n").await.unwrap();
        busy.push(s);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut c = ControlClient::connect(&sock).await.unwrap();
        let r = c.request(&Request::Status).await.unwrap();
        if !r.ok {
            assert_eq!(r.error.unwrap().code, ErrorCode::Busy);
            break;
        }
        assert!(Instant::now() < deadline, "never busy");
    }
    drop(busy);
}

#[tokio::test]
async fn a_client_that_does_not_read_its_answer_is_dropped() {
    let (_dir, sock, open) = serve(Duration::from_millis(300));
    let mut s = UnixStream::connect(&sock).await.unwrap();
    s.write_all(b"{\"cmd\":\"events\",\"follow\":true}\n")
        .await
        .unwrap();
    // Never read: the socket buffer fills, a write stalls, and the connection is closed.
    let deadline = Instant::now() + Duration::from_secs(10);
    while open.load(std::sync::atomic::Ordering::Acquire) != 1 {
        assert!(Instant::now() < deadline, "never served");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    while open.load(std::sync::atomic::Ordering::Acquire) != 0 {
        assert!(
            Instant::now() < deadline,
            "a client that does not read kept its connection"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(s);
}
