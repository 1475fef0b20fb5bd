//! The control server's connection rules against a fake handler: idle connections are closed,
//! and when the server is full an idle one makes room for a new client.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};
use switchyard_control::server::MAX_CONNECTIONS;
use switchyard_control::{
    ControlClient, ControlHandler, ControlServer, ErrorCode, EventSender, Peer, Reply, Request,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// `status` answers at once; `drain` never finishes (a busy connection).
struct Fake;

#[async_trait::async_trait]
impl ControlHandler for Fake {
    async fn handle(&self, req: Request, _peer: Peer, _events: EventSender) -> Reply {
        if matches!(req, Request::Drain { .. }) {
            std::future::pending::<()>().await;
        }
        Reply::ok("ok")
    }
}

fn serve(idle: Duration) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("c.sock");
    let server = ControlServer::bind(&sock, 0o600)
        .unwrap()
        .with_idle_timeout(idle);
    tokio::spawn(server.serve(Arc::new(Fake), std::future::pending()));
    (dir, sock)
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
    let (_dir, sock) = serve(Duration::from_millis(300));
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
    let (_dir, sock) = serve(Duration::from_secs(60));
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

    // Full of connections running a command: a newcomer is told to come back.
    let (_dir2, sock) = serve(Duration::from_secs(60));
    let mut busy = Vec::new();
    for _ in 0..MAX_CONNECTIONS {
        let mut s = UnixStream::connect(&sock).await.unwrap();
        s.write_all(b"{\"cmd\":\"drain\",\"pool\":\"blue\"}\n")
            .await
            .unwrap();
        busy.push(s);
    }
    // Let the server read every command (bounded poll on what it answers a newcomer).
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
