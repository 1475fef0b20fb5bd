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
