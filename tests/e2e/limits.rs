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
    // Another request on the two newer ones: they go idle again after the first has long been
    // waiting. (Idle connections are woken in the order they began to wait; right after an
    // answer that order can lag the client's view by a scheduling slice on a busy machine.)
    for c in &mut idle[1..] {
        assert_eq!(c.get("/").await.unwrap().status, 200);
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

/// Send `bytes` (concurrently with reading, as the proxy may answer before it read them all)
/// and read the answer until the connection closes (bounded).
async fn send_and_read(addr: std::net::SocketAddr, bytes: Vec<u8>) -> String {
    let s = TcpStream::connect(addr).await.unwrap();
    let (mut r, mut w) = s.into_split();
    let writer = tokio::spawn(async move {
        let _ = w.write_all(&bytes).await;
        w
    });
    let mut got = Vec::new();
    let read = async {
        let mut buf = [0u8; 8192];
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(10), read).await;
    let _ = writer.await;
    String::from_utf8_lossy(&got).into_owned()
}

fn chunked(chunks: &[usize]) -> Vec<u8> {
    let mut b = b"POST /sha256 HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for n in chunks {
        b.extend_from_slice(format!("{n:x}\r\n").as_bytes());
        b.extend(std::iter::repeat_n(b'x', *n));
        b.extend_from_slice(b"\r\n");
    }
    b.extend_from_slice(b"0\r\n\r\n");
    b
}

#[tokio::test]
async fn a_body_over_client_max_body_size_is_413_and_the_app_gets_nothing() {
    trace_init();
    let (blue, px) = proxy("client_max_body_size: 1k\n").await;
    // Content-Length over the limit: refused at the door.
    let mut b = b"POST /sha256 HTTP/1.1\r\nHost: t\r\nContent-Length: 1025\r\n\r\n".to_vec();
    b.extend(std::iter::repeat_n(b'x', 1025));
    let text = send_and_read(px.addr, b).await;
    assert!(
        text.starts_with("HTTP/1.1 413 Payload Too Large")
            || text.starts_with("HTTP/1.1 413 Content Too Large"),
        "{text}"
    );
    assert!(text.contains("client_max_body_size (1k)"), "{text}");
    // A chunked body that grows past it: refused before the app sees a byte.
    let text = send_and_read(px.addr, chunked(&[600, 600])).await;
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert_eq!(blue.hits(), 0, "the app got nothing");
    // At the limit: forwarded, both ways.
    let mut b = b"POST /sha256 HTTP/1.1\r\nHost: t\r\nContent-Length: 1024\r\n\r\n".to_vec();
    b.extend(std::iter::repeat_n(b'x', 1024));
    let text = send_and_read(
        px.addr,
        [
            b,
            b"GET /bye HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".to_vec(),
        ]
        .concat(),
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("\"bytes\":1024"), "{text}");
    let text = send_and_read(
        px.addr,
        [
            chunked(&[1000, 24]),
            b"GET /bye HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".to_vec(),
        ]
        .concat(),
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("\"bytes\":1024"), "{text}");
    assert_eq!(blue.hits(), 4);
    // Counted under the proxy's own answers.
    let metrics = px.handle().metrics_text();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("switchyard_http_requests_total")
                && l.contains("status=\"413\"")
                && l.ends_with(" 2")),
        "{metrics}"
    );
    px.shutdown().await;
}

#[tokio::test]
async fn a_chunked_body_too_long_to_hold_is_cut_where_it_crosses_the_limit() {
    trace_init();
    let (_blue, px) = proxy("client_max_body_size: 200k\n").await;
    // 5 x 50000 bytes: past the 64 KiB read ahead within the limit, so it streams; the fifth
    // chunk crosses 200k and is never forwarded; the app never answers it.
    let text = send_and_read(px.addr, chunked(&[50_000; 5])).await;
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(!text.contains("\"bytes\""), "{text}");
    // 0 = unlimited.
    let (_b2, px2) = proxy("client_max_body_size: 0\n").await;
    let text = send_and_read(
        px2.addr,
        [
            chunked(&[50_000; 5]),
            b"GET /bye HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".to_vec(),
        ]
        .concat(),
    )
    .await;
    assert!(text.contains("\"bytes\":250000"), "{text}");
    px.shutdown().await;
    px2.shutdown().await;
}

#[tokio::test]
async fn a_chunked_body_that_pauses_is_forwarded_without_waiting_for_the_rest() {
    trace_init();
    // The head deadline is long: only the read-ahead's pause rule forwards this early.
    let (blue, px) = proxy("client_max_body_size: 1m\nclient_header_timeout: 60s\n").await;
    let s = TcpStream::connect(px.addr).await.unwrap();
    let (mut r, mut w) = s.into_split();
    w.write_all(
        b"POST /sha256 HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n",
    )
    .await
    .unwrap();
    // The app has the request while the client still holds the rest back.
    eventually(|| blue.hits() == 1).await;
    w.write_all(b"2\r\nde\r\n0\r\n\r\n").await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(10);
    while !String::from_utf8_lossy(&got).contains("\"bytes\"") {
        assert!(Instant::now() < deadline, "no answer");
        match tokio::time::timeout(Duration::from_secs(10), r.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    let text = String::from_utf8_lossy(&got);
    assert!(text.contains("\"bytes\":5"), "{text}");
    px.shutdown().await;
}
