//! Timeouts and shutdown (issue 2).

use bytes::Bytes;
use std::time::Duration;
use switchyard_tests::*;

#[tokio::test]
async fn idle_client_keepalive_is_closed_after_keepalive_timeout() {
    trace_init();
    let up = FakeUpstream::start("blue").await.unwrap();
    let yaml = app_yaml(&[("blue", &[up.addr()])], "blue", "").replace(
        "grace_period: 5s\n",
        "grace_period: 5s\nkeepalive_timeout: 1s\n",
    );
    let px = TestProxy::start(&yaml).await;
    let mut c = Conn::open(px.addr).await.unwrap();
    assert_eq!(c.get("/").await.unwrap().status, 200);
    assert!(!c.is_closed(), "kept alive right after the response");
    // Default 75s would keep it open far past this deadline.
    eventually_within(Duration::from_secs(10), &mut || c.is_closed()).await;
    px.shutdown().await;
}

#[tokio::test]
async fn idle_upstream_connections_are_closed_after_idle_timeout() {
    trace_init();
    let up = FakeUpstream::start("blue").await.unwrap();
    let px = TestProxy::start(&app_yaml(
        &[("blue", &[up.addr()])],
        "blue",
        "    idle_timeout: 300ms\n",
    ))
    .await;
    let mut c = Conn::open(px.addr).await.unwrap();
    assert_eq!(c.get("/").await.unwrap().status, 200);
    assert_eq!(c.get("/").await.unwrap().status, 200);
    let seen = up.seen();
    assert_eq!(
        seen[0].conn, seen[1].conn,
        "the upstream connection is reused"
    );
    let first = seen[0].conn;
    // (Health checks have their own connection; only the proxy's is watched.)
    eventually(|| !up.is_open(first)).await;
    assert_eq!(c.get("/").await.unwrap().status, 200);
    assert_ne!(
        up.seen()[2].conn,
        first,
        "a new connection after the idle one was closed"
    );
    px.shutdown().await;
}

/// An app that closes a keep-alive connection while it idles in the proxy's pool (its own
/// keep-alive timeout is shorter than the proxy's `idle_timeout`, as Tomcat's 20 s against 60 s):
/// the proxy closes its end too, without waiting for a request to find the connection dead
/// (no sockets left in CLOSE_WAIT: the pool's sweep, third_party/PATCHES.md 2), and the next
/// request goes over a new connection without an error.
#[tokio::test]
async fn a_pooled_connection_the_app_closed_is_closed_and_not_reused() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    trace_init();
    // (connection number, how long the proxy took to close its end after the app's FIN, or
    // what went wrong).
    let (closed_tx, mut closed_rx) =
        tokio::sync::mpsc::unbounded_channel::<(u32, Result<Duration, &'static str>)>();
    let (addr, server) = raw_app(move |id, mut s| {
        let closed_tx = closed_tx.clone();
        async move {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            loop {
                let Some(head) = read_request_head(&mut s, &mut buf).await else {
                    return;
                };
                if head.starts_with("GET /actuator/health ") {
                    let body = r#"{"status":"UP"}"#;
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if s.write_all(resp.as_bytes()).await.is_err() {
                        return;
                    }
                    continue;
                }
                // A keep-alive answer; after its own keep-alive timeout (300 ms: the
                // connection idles in the proxy's pool by then) the app closes its end,
                // and waits for the proxy to close the other.
                let resp = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{id:05}", 5);
                if s.write_all(resp.as_bytes()).await.is_err() {
                    return;
                }
                // The proxy keeps the connection (pooled) until then.
                match tokio::time::timeout(Duration::from_millis(300), s.read(&mut chunk)).await {
                    Err(_) => {}
                    Ok(_) => {
                        let _ = closed_tx.send((id, Err("the proxy did not keep it alive")));
                        return;
                    }
                }
                if s.shutdown().await.is_err() {
                    return;
                }
                let fin = std::time::Instant::now();
                let closed = tokio::time::timeout(Duration::from_secs(10), async {
                    loop {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(_) => {}
                        }
                    }
                })
                .await;
                let _ = closed_tx.send((
                    id,
                    closed
                        .map(|_| fin.elapsed())
                        .map_err(|_| "the proxy kept its end open for 10 s"),
                ));
                return;
            }
        }
    })
    .await;
    let px = TestProxy::start(&app_yaml(
        &[("blue", &[addr])],
        "blue",
        "    idle_timeout: 60s\n",
    ))
    .await;
    let mut c = Conn::open(px.addr).await.unwrap();
    let first = c.get("/").await.unwrap();
    assert_eq!(first.status, 200, "{}", first.text());
    // The proxy closes its end within its sweep interval (1 s), long before idle_timeout.
    let (conn, after) = tokio::time::timeout(Duration::from_secs(10), closed_rx.recv())
        .await
        .expect("the app saw the connection end")
        .expect("the app is running");
    let after = after.unwrap_or_else(|e| panic!("connection {conn}: {e}"));
    assert_eq!(
        first.text(),
        format!("{conn:05}"),
        "the proxied request's connection"
    );
    assert!(
        after < Duration::from_secs(5),
        "closed {after:?} after the app's FIN"
    );
    // The next request opens a new connection, and does not fail on the dead one.
    let second = c.get("/").await.unwrap();
    assert_eq!(second.status, 200, "{}", second.text());
    assert_ne!(second.text(), first.text(), "a new upstream connection");
    px.shutdown().await;
    server.abort();
}

#[tokio::test]
async fn shutdown_finishes_in_flight_requests_then_returns_early() {
    trace_init();
    let up = FakeUpstream::start("blue").await.unwrap();
    let yaml = app_yaml(&[("blue", &[up.addr()])], "blue", "")
        .replace("grace_period: 5s", "grace_period: 60s");
    let px = TestProxy::start(&yaml).await;
    let addr = px.addr;
    let slow =
        tokio::spawn(async move { request(addr, "GET", "/slow?ms=1500", &[], Bytes::new()).await });
    // An idle keep-alive client must not hold the shutdown up.
    let mut idle = Conn::open(px.addr).await.unwrap();
    assert_eq!(idle.get("/").await.unwrap().status, 200);
    eventually(|| up.hits() == 2).await;

    let report = px.shutdown().await;
    let r = slow.await.unwrap().expect("in-flight request completes");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["color"], "blue");
    assert_eq!(report.abandoned_requests, 0);
    assert!(
        report.elapsed < Duration::from_secs(30),
        "shutdown waited for the whole grace period: {report:?}"
    );
    assert!(idle.is_closed() || idle.get("/").await.is_err());
    // The listener is closed: new connections are refused.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn shutdown_is_bounded_by_the_grace_period() {
    trace_init();
    let up = FakeUpstream::start("blue").await.unwrap();
    up.set_mode(Mode::Hang);
    let yaml = app_yaml(&[("blue", &[up.addr()])], "blue", "")
        .replace("grace_period: 5s", "grace_period: 500ms");
    let px = TestProxy::start(&yaml).await;
    let addr = px.addr;
    let hung = tokio::spawn(async move { request(addr, "GET", "/", &[], Bytes::new()).await });
    eventually(|| up.hits() == 1).await;
    let report = px.shutdown().await;
    assert_eq!(report.abandoned_requests, 1);
    assert!(
        hung.await.unwrap().is_err(),
        "the hung request is cut at the deadline"
    );
}
