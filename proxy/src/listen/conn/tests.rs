use super::*;
use futures::FutureExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Read what Pingora would get now (`None`: it would wait).
fn read_now<S: AsyncRead + Unpin>(c: &mut Conn<S>) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 64 * 1024];
    let n = c.read(&mut buf).now_or_never()?.expect("read");
    Some(buf[..n].to_vec())
}

/// Everything Pingora can read now, until it would wait.
fn read_all_now<S: AsyncRead + Unpin>(c: &mut Conn<S>) -> Vec<u8> {
    let mut all = Vec::new();
    while let Some(b) = read_now(c) {
        if b.is_empty() {
            break;
        }
        all.extend(b);
    }
    all
}

/// Fill and check the next head, and begin it.
async fn next_request<S: AsyncRead + Unpin>(c: &mut Conn<S>) -> head::Head {
    assert!(c.first_byte().await);
    assert_eq!(c.fill_head().await.unwrap(), Fill::Complete);
    let h = head::inspect(c.unread()).expect("a valid head");
    c.begin(&h, 0);
    h
}

#[tokio::test]
async fn pipelined_requests_are_handed_out_one_at_a_time() {
    let (a, mut b) = tokio::io::duplex(1 << 20);
    let mut c = Conn::new(a);
    let r1 = "GET /1 HTTP/1.1\r\nHost: x\r\n\r\n";
    let r2 = "POST /2 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello";
    let r3 =
        "POST /3 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
    let r4 = "\r\nGET /4 HTTP/1.1\r\nHost: x\r\n\r\n";
    b.write_all(format!("{r1}{r2}{r3}{r4}").as_bytes())
        .await
        .unwrap();
    for want in [r1, r2, r3, r4.trim_start()] {
        next_request(&mut c).await;
        assert_eq!(String::from_utf8(read_all_now(&mut c)).unwrap(), want);
        assert!(
            read_now(&mut c).is_none(),
            "nothing of the next request leaks"
        );
        assert!(c.request_complete());
    }
    assert_eq!(c.buffered(), 0);
}

#[tokio::test]
async fn a_body_that_arrives_later_is_handed_out_up_to_its_end() {
    let (a, mut b) = tokio::io::duplex(1 << 20);
    let mut c = Conn::new(a);
    b.write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n01234")
        .await
        .unwrap();
    next_request(&mut c).await;
    let got = read_all_now(&mut c);
    assert!(got.ends_with(b"01234"));
    assert!(!c.request_complete());
    b.write_all(b"56789GET /next HTTP/1.1\r\n").await.unwrap();
    assert_eq!(read_all_now(&mut c), b"56789");
    assert!(c.request_complete());
    assert_eq!(c.unread(), b"GET /next HTTP/1.1\r\n");
}

#[tokio::test]
async fn a_malformed_chunked_body_is_a_read_error() {
    let (a, mut b) = tokio::io::duplex(1 << 20);
    let mut c = Conn::new(a);
    b.write_all(
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5;x\nhello\r\n0\r\n\r\n",
    )
    .await
    .unwrap();
    next_request(&mut c).await;
    let mut buf = [0u8; 4096];
    let head = c.read(&mut buf).await.unwrap();
    assert!(head > 0);
    let e = c.read(&mut buf).await.unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidData);
}

#[tokio::test]
async fn queued_requests_are_answered_after_the_client_closed_its_side_and_the_last_is_not() {
    let (a, mut b) = tokio::io::duplex(1 << 20);
    let mut c = Conn::new(a);
    b.write_all(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\nGET /2 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    AsyncWriteExt::shutdown(&mut b).await.unwrap();
    next_request(&mut c).await;
    read_all_now(&mut c);
    // Pingora watching for the client going away must not see the end of the stream while
    // a request is queued.
    assert!(read_now(&mut c).is_none());
    assert!(c.request_complete());
    next_request(&mut c).await;
    read_all_now(&mut c);
    // The FIN was read while /2 was queued; /2 is the last request, so Pingora sees the client
    // gone now (nginx's 499), exactly as when the FIN arrives while /2 is in flight.
    assert_eq!(
        read_now(&mut c),
        Some(Vec::new()),
        "the end, for the last request"
    );
    assert!(c.request_complete());
    assert!(!c.first_byte().await, "then the connection ends");
}

#[tokio::test]
async fn the_end_of_the_stream_after_a_request_is_reported_when_nothing_is_queued() {
    let (a, mut b) = tokio::io::duplex(1 << 20);
    let mut c = Conn::new(a);
    b.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    next_request(&mut c).await;
    read_all_now(&mut c);
    drop(b);
    assert_eq!(read_now(&mut c), Some(Vec::new()), "the client left");
}

#[tokio::test]
async fn an_upgraded_request_becomes_a_tunnel() {
    let (a, mut b) = tokio::io::duplex(1 << 20);
    let mut c = Conn::new(a);
    b.write_all(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\nframe",
    )
    .await
    .unwrap();
    next_request(&mut c).await;
    assert!(read_all_now(&mut c).ends_with(b"frame"));
    b.write_all(b"more").await.unwrap();
    assert_eq!(read_all_now(&mut c), b"more");
}

#[tokio::test]
async fn the_queue_is_bounded() {
    let (a, mut b) = tokio::io::duplex(1 << 20);
    let mut c = Conn::new(a);
    let one = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    let flood: Vec<u8> = one
        .iter()
        .copied()
        .cycle()
        .take(one.len() * 10_000)
        .collect();
    let writer = tokio::spawn(async move {
        let _ = b.write_all(&flood).await;
        b
    });
    next_request(&mut c).await;
    read_all_now(&mut c);
    for _ in 0..100 {
        let _ = read_now(&mut c);
        tokio::task::yield_now().await;
    }
    assert!(c.buffered() <= QUEUE_LIMIT + READ_AHEAD, "{}", c.buffered());
    drop(writer);
}

#[tokio::test]
async fn a_peek_reads_ahead_and_the_next_reads_drain_it() {
    // Peek needs a Pingora stream: a real loopback socket pair.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let client = tokio::spawn(async move {
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        c
    });
    let (srv, _) = listener.accept().await.unwrap();
    let _c = client.await.unwrap();
    let stream: pingora::protocols::l4::stream::Stream = srv.into();
    let mut w = Conn::new(stream);
    let mut one = [0u8; 1];
    assert!(w.try_peek(&mut one).await.unwrap());
    assert_eq!(&one, b"G");
    let mut all = [0u8; 18];
    w.read_exact(&mut all).await.unwrap();
    assert_eq!(&all, b"GET / HTTP/1.1\r\n\r\n");
    assert!(w.rbuf.is_empty(), "freed once drained");
}

#[tokio::test]
async fn small_writes_wait_for_flush_and_big_ones_pass_through() {
    let (a, mut b) = tokio::io::duplex(1 << 20);
    let mut w = Conn::new(a);
    w.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.unwrap();
    w.write_all(b"hello").await.unwrap();
    assert_eq!(w.wbuf.len(), 24, "held until flush");
    w.flush().await.unwrap();
    let mut got = [0u8; 24];
    b.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"HTTP/1.1 200 OK\r\n\r\nhello");
    let big = vec![7u8; 10_000];
    w.write_all(b"x").await.unwrap();
    w.write_all(&big).await.unwrap();
    w.flush().await.unwrap();
    let mut got = vec![0u8; 10_001];
    b.read_exact(&mut got).await.unwrap();
    assert_eq!(got[0], b'x');
    assert!(got[1..].iter().all(|v| *v == 7));
}

#[tokio::test]
async fn fill_head_waits_for_the_empty_line_however_the_head_is_split() {
    let (a, mut b) = tokio::io::duplex(1 << 20);
    let mut w = Conn::new(a);
    let writer = tokio::spawn(async move {
        for part in [
            &b"\r\n\r\nGET / HT"[..],
            b"TP/1.1\r\nHost: x\r",
            b"\n\r",
            b"\nbody",
        ] {
            b.write_all(part).await.unwrap();
            tokio::task::yield_now().await;
        }
        b
    });
    assert_eq!(w.fill_head().await.unwrap(), Fill::Complete);
    drop(writer.await.unwrap());
    let mut all = String::new();
    w.read_to_string(&mut all).await.ok();
    assert!(
        all.starts_with("\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n"),
        "{all:?}"
    );
}

#[tokio::test]
async fn fill_head_accepts_bare_lf_and_refuses_endless_heads() {
    let (a, mut b) = tokio::io::duplex(1 << 20);
    let mut w = Conn::new(a);
    b.write_all(b"GET / HTTP/1.1\nHost: x\n\n").await.unwrap();
    assert_eq!(w.fill_head().await.unwrap(), Fill::Complete);

    let (a, mut b) = tokio::io::duplex(1 << 20);
    let mut w = Conn::new(a);
    b.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
    let line = vec![b'x'; 1000];
    tokio::spawn(async move {
        for _ in 0..100 {
            if b.write_all(&line).await.is_err() {
                break;
            }
        }
        b
    });
    assert_eq!(w.fill_head().await.unwrap(), Fill::TooLarge);
    assert!(w.buffered() >= HEAD_LIMIT);
}

#[tokio::test]
async fn a_peer_that_leaves_mid_head_is_an_error_and_an_idle_close_is_not() {
    let (a, mut b) = tokio::io::duplex(1024);
    let mut w = Conn::new(a);
    b.write_all(b"GET / HT").await.unwrap();
    drop(b);
    assert!(w.first_byte().await);
    assert!(w.fill_head().await.is_err());
    let (a, b) = tokio::io::duplex(1024);
    drop(b);
    assert!(!Conn::new(a).first_byte().await);
}
