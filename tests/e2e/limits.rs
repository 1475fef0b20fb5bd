//! Limits on what a client may hold: the whole request head within `client_header_timeout`
//! (one deadline, not per read), at most `max_connections` open (the rest wait in the backlog),
//! request heads up to 64 KiB (431 above).

use std::time::{Duration, Instant};
use switchyard_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn proxy(top: &str) -> (FakeUpstream, TestProxy) {
    let blue = FakeUpstream::builder("blue")
        .record(false)
        .start()
        .await
        .unwrap();
    let px = TestProxy::start(&format!(
        "{top}{}",
        app_yaml(&[("blue", &[blue.addr()])], "blue", "")
    ))
    .await;
    (blue, px)
}

/// Read until the server closes the connection (or `limit` passes); what was read.
async fn read_until_closed(s: &mut TcpStream, limit: Duration) -> Option<Vec<u8>> {
    let mut got = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(limit, read).await.ok()?;
    Some(got)
}

/// Send a request head one byte every `gap` until the server closes; when it closed.
async fn trickle(s: &mut TcpStream, gap: Duration, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    let head = b"GET / HTTP/1.1\r\nHost: test\r\nX-Slow: "
        .iter()
        .chain([b'a'; 10_000].iter());
    for b in head {
        if start.elapsed() > limit {
            return None;
        }
        if s.write_all(&[*b]).await.is_err() {
            return Some(start.elapsed());
        }
        // A closed connection also shows as a readable end of stream.
        let mut probe = [0u8; 1];
        if let Ok(r) = tokio::time::timeout(gap, s.read(&mut probe)).await {
            if matches!(r, Ok(0) | Err(_)) {
                return Some(start.elapsed());
            }
        }
    }
    None
}

#[tokio::test]
async fn a_head_trickled_past_client_header_timeout_is_cut_off() {
    trace_init();
    let (_blue, px) = proxy("client_header_timeout: 600ms\n").await;
    // A new connection trickling its first head.
    let mut s = TcpStream::connect(px.addr).await.unwrap();
    let closed = trickle(&mut s, Duration::from_millis(50), Duration::from_secs(10))
        .await
        .expect("closed by the server");
    assert!(
        closed >= Duration::from_millis(550) && closed < Duration::from_secs(3),
        "closed after {closed:?}"
    );
    // A keep-alive connection whose second head trickles.
    let mut s = TcpStream::connect(px.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = s.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    let closed = trickle(&mut s, Duration::from_millis(50), Duration::from_secs(10))
        .await
        .expect("closed by the server");
    assert!(closed < Duration::from_secs(3), "closed after {closed:?}");
    // A head sent in pieces, but within the deadline, is served.
    let mut s = TcpStream::connect(px.addr).await.unwrap();
    for part in [&b"GET /hello HTT"[..], b"P/1.1\r\nHost: te", b"st\r\n\r\n"] {
        s.write_all(part).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await; // a slow but honest client
    }
    let n = s.read(&mut buf).await.unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    px.shutdown().await;
}

#[tokio::test]
async fn a_head_over_64_kib_is_431_and_never_forwarded() {
    trace_init();
    let (blue, px) = proxy("").await;
    let mut s = TcpStream::connect(px.addr).await.unwrap();
    let mut head = b"GET / HTTP/1.1\r\nHost: test\r\nCookie: ".to_vec();
    head.extend(std::iter::repeat_n(b'c', 70 * 1024));
    head.extend_from_slice(b"\r\n\r\n");
    let _ = s.write_all(&head).await;
    let got = read_until_closed(&mut s, Duration::from_secs(5))
        .await
        .expect("answered and closed");
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.starts_with("HTTP/1.1 431 Request Header Fields Too Large"),
        "{text}"
    );
    assert!(text.contains("larger than 64 KiB"), "{text}");
    assert_eq!(blue.hits(), 0);
    // 60 KiB of headers is fine.
    let big = "v".repeat(60 * 1024);
    let r = request(px.addr, "GET", "/", &[("x-big", &big)], bytes::Bytes::new())
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    px.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_holds_further_clients_in_the_backlog() {
    trace_init();
    let (_blue, px) = proxy("max_connections: 4\n").await;
    // Four connections busy with a slow request each: none is idle, none can be closed.
    let mut busy = Vec::new();
    for _ in 0..4 {
        let addr = px.addr;
        busy.push(tokio::spawn(async move {
            let mut c = Conn::open(addr).await.unwrap();
            let r = c.get("/slow?ms=1500").await.unwrap();
            (r.status, c)
        }));
    }
    eventually(|| px.inflight("blue") == 4).await;
    // The fifth connects (the kernel's backlog takes it) but is not served meanwhile.
    let addr = px.addr;
    let fifth = tokio::spawn(async move {
        let mut c = Conn::open(addr).await.unwrap();
        c.get("/").await.map(|r| r.status)
    });
    tokio::time::sleep(Duration::from_millis(500)).await; // a bounded "nothing happens"
    assert!(!fifth.is_finished(), "served beyond max_connections");
    let mut held = Vec::new();
    for b in busy {
        let (status, c) = b.await.unwrap();
        assert_eq!(status, 200);
        held.push(c); // now idle keep-alive connections
    }
    let status = tokio::time::timeout(Duration::from_secs(5), fifth)
        .await
        .expect("served once a connection is idle and can be closed")
        .unwrap()
        .unwrap();
    assert_eq!(status, 200);
    px.shutdown().await;
}

#[tokio::test]
async fn at_max_connections_the_longest_idle_connection_makes_room() {
    trace_init();
    let (_blue, px) = proxy("max_connections: 3\n").await;
    let mut idle = Vec::new();
    for _ in 0..3 {
        let mut c = Conn::open(px.addr).await.unwrap();
        assert_eq!(c.get("/").await.unwrap().status, 200);
        idle.push(c);
    }
    // A new client is served at once: the oldest idle keep-alive connection is closed.
    let mut fourth = Conn::open(px.addr).await.unwrap();
    let r = tokio::time::timeout(Duration::from_secs(3), fourth.get("/"))
        .await
        .expect("served without waiting for an idle client")
        .unwrap();
    assert_eq!(r.status, 200);
    eventually(|| idle[0].is_closed()).await;
    assert!(!idle[2].is_closed(), "the newest idle one stays");
    px.shutdown().await;
}
