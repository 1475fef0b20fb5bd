//! Balancing, retries, upstream failures and DNS re-resolution (issue 2).

use bytes::Bytes;
use std::net::SocketAddr;
use switchyard_proxy::StartOptions;
use switchyard_tests::*;

/// An address nobody listens on (bound, then closed).
fn dead_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

#[tokio::test]
async fn round_robin_spreads_over_the_active_pool() {
    trace_init();
    let a = FakeUpstream::start("blue").await.unwrap();
    let b = FakeUpstream::start("blue").await.unwrap();
    let idle = FakeUpstream::start("green").await.unwrap();
    let px = TestProxy::start(&app_yaml(
        &[("blue", &[a.addr(), b.addr()]), ("green", &[idle.addr()])],
        "blue",
        "",
    ))
    .await;
    let mut c = Conn::open(px.addr).await.unwrap();
    for _ in 0..100 {
        assert_eq!(c.get("/").await.unwrap().status, 200);
    }
    assert_eq!(a.hits() + b.hits(), 100);
    assert_eq!((a.hits(), b.hits()), (50, 50), "round robin alternates");
    assert_eq!(idle.hits(), 0, "the idle pool gets nothing");
    px.shutdown().await;
}

#[tokio::test]
async fn a_dead_instance_costs_no_client_error() {
    trace_init();
    let a = FakeUpstream::start("blue").await.unwrap();
    let dead = dead_addr();
    let px = TestProxy::start(&app_yaml(&[("blue", &[dead, a.addr()])], "blue", "")).await;
    let mut c = Conn::open(px.addr).await.unwrap();
    for i in 0..60 {
        let method = if i % 2 == 0 { "GET" } else { "POST" };
        let r = c
            .send(method, "/", &[], Bytes::from_static(b"{}"))
            .await
            .unwrap();
        assert_eq!(r.status, 200, "request {i} ({method}): {}", r.text());
    }
    assert_eq!(a.hits(), 60, "connect failures are retried, POST included");
    px.shutdown().await;
}

#[tokio::test]
async fn all_instances_down_is_502_with_a_cause_and_no_address() {
    trace_init();
    let (d1, d2) = (dead_addr(), dead_addr());
    let px = TestProxy::start(&app_yaml(&[("blue", &[d1, d2])], "blue", "")).await;
    let r = px.get("/").await;
    assert_eq!(r.status, 502);
    let body = r.text();
    assert!(body.contains("connection refused"), "{body}");
    for leak in [d1.to_string(), d2.to_string(), d1.port().to_string()] {
        assert!(!body.contains(&leak), "body leaks {leak}: {body}");
    }
    for (k, v) in r.headers.iter() {
        let v = v.to_str().unwrap_or("");
        assert!(!v.contains(&d1.port().to_string()), "header {k} leaks: {v}");
    }
    px.shutdown().await;
}

#[tokio::test]
async fn hanging_upstream_is_504_after_read_timeout() {
    trace_init();
    let up = FakeUpstream::start("blue").await.unwrap();
    up.set_mode(Mode::Hang);
    let px = TestProxy::start(&app_yaml(
        &[("blue", &[up.addr()])],
        "blue",
        "    read_timeout: 300ms\n",
    ))
    .await;
    let r = px.get("/").await;
    assert_eq!(r.status, 504, "{}", r.text());
    assert!(r.text().contains("did not answer in time"));
    assert_eq!(up.hits(), 1, "a timeout is not retried");
    px.shutdown().await;
}

#[tokio::test]
async fn broken_connection_retries_idempotent_requests_only() {
    trace_init();
    let reset = FakeUpstream::start("blue").await.unwrap();
    reset.set_mode(Mode::Reset);
    let good = FakeUpstream::start("blue").await.unwrap();
    // Passive ejection off: this test is about retries, and would otherwise see the resetting
    // instance ejected after 5 failures.
    let px = TestProxy::start(&app_yaml(
        &[("blue", &[reset.addr(), good.addr()])],
        "blue",
        "    passive: {consecutive_failures: 0}\n",
    ))
    .await;
    for i in 0..20 {
        let r = request(px.addr, "GET", "/", &[], Bytes::new())
            .await
            .unwrap();
        assert_eq!(r.status, 200, "GET {i}: {}", r.text());
        let r = request(px.addr, "PUT", "/", &[], Bytes::from_static(b"x"))
            .await
            .unwrap();
        assert_eq!(r.status, 200, "PUT {i}: {}", r.text());
    }
    let mut post_502 = 0;
    for _ in 0..20 {
        let r = request(px.addr, "POST", "/", &[], Bytes::from_static(b"x"))
            .await
            .unwrap();
        match r.status {
            200 => {}
            502 => {
                post_502 += 1;
                assert!(r.text().contains("closed the connection"), "{}", r.text());
            }
            s => panic!("unexpected {s}"),
        }
    }
    assert_eq!(post_502, 10, "round robin sends every other POST to the resetting instance, and a sent POST is never retried");
    px.shutdown().await;
}

#[tokio::test]
async fn retries_zero_means_one_attempt() {
    trace_init();
    let reset = FakeUpstream::start("blue").await.unwrap();
    reset.set_mode(Mode::Reset);
    let good = FakeUpstream::start("blue").await.unwrap();
    let px = TestProxy::start(&app_yaml(
        &[("blue", &[reset.addr(), good.addr()])],
        "blue",
        "    retries: 0\n    passive: {consecutive_failures: 0}\n",
    ))
    .await;
    let mut statuses = Vec::new();
    for _ in 0..10 {
        statuses.push(px.get("/").await.status);
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 502).count(),
        5,
        "{statuses:?}"
    );
    px.shutdown().await;
}

#[tokio::test]
async fn least_requests_avoids_the_busy_instance() {
    trace_init();
    let a = FakeUpstream::start("blue").await.unwrap();
    let b = FakeUpstream::start("blue").await.unwrap();
    let px = TestProxy::start(&app_yaml(
        &[("blue", &[a.addr(), b.addr()])],
        "blue",
        "    balance: least_requests\n",
    ))
    .await;
    // Occupy one instance with a slow request, then the fast ones must go to the other.
    let addr = px.addr;
    let slow =
        tokio::spawn(
            async move { request(addr, "GET", "/slow?ms=20000", &[], Bytes::new()).await },
        );
    eventually(|| a.hits() + b.hits() == 1).await;
    let busy_is_a = a.hits() == 1;
    let (busy, free) = if busy_is_a { (&a, &b) } else { (&b, &a) };
    let inflight = |addr: std::net::SocketAddr| {
        let st = px.handle().status();
        let p = st.upstream("app").unwrap().pool("blue").unwrap().clone();
        p.instances
            .iter()
            .find(|i| i.addr == addr.to_string())
            .unwrap()
            .inflight
    };
    for _ in 0..20 {
        assert_eq!(px.get("/").await.status, 200);
        // The client can see the response a moment before the proxy counts the request as
        // finished; this test is about the choice, so let the count settle.
        eventually(|| inflight(free.addr()) == 0).await;
    }
    assert_eq!(inflight(busy.addr()), 1);
    assert_eq!(busy.hits(), 1);
    assert_eq!(free.hits(), 20);
    assert!(
        !slow.is_finished(),
        "the slow request was still running throughout"
    );
    slow.abort();
    px.shutdown().await;
}

#[tokio::test]
async fn dns_names_are_re_resolved_off_the_request_path() {
    trace_init();
    let first = FakeUpstream::start("blue").await.unwrap();
    let second = FakeUpstream::start("blue").await.unwrap();
    let dns = MapResolver::new();
    dns.set("app-blue", first.addr());
    let yaml = app_yaml_pools(
        "      blue: [\"app-blue:8080\"]\n",
        "blue",
        "    resolve_interval: 100ms\n",
    );
    let px = TestProxy::start_with(&yaml, StartOptions::default().with_resolver(dns.clone())).await;
    let r = px.get("/").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(first.hits(), 1);
    let status = px.handle().status();
    let inst = &status
        .upstream("app")
        .unwrap()
        .pool("blue")
        .unwrap()
        .instances[0];
    assert_eq!(inst.addr, "app-blue:8080");
    assert_eq!(
        inst.resolved.as_deref(),
        Some(first.addr().to_string().as_str())
    );

    // The container is restarted with a new address: no reload needed.
    dns.set("app-blue", second.addr());
    let mut c = Conn::open(px.addr).await.unwrap();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while second.hits() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "new address never used"
        );
        assert_eq!(c.get("/").await.unwrap().status, 200);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // A failing lookup keeps the last good address (a DNS blip must not remove an instance).
    dns.remove("app-blue");
    eventually(|| {
        let st = px.handle().status();
        st.upstream("app").unwrap().pool("blue").unwrap().instances[0]
            .resolve_error
            .is_some()
    })
    .await;
    let before = second.hits();
    assert_eq!(c.get("/").await.unwrap().status, 200);
    assert_eq!(second.hits(), before + 1);
    px.shutdown().await;
}

#[tokio::test]
async fn unresolvable_name_is_a_502_not_a_hang() {
    trace_init();
    let dns = MapResolver::new();
    let yaml = app_yaml_pools("      blue: [\"nowhere:8080\"]\n", "blue", "");
    let px = TestProxy::start_with(&yaml, StartOptions::default().with_resolver(dns)).await;
    let r = px.get("/").await;
    assert_eq!(r.status, 502);
    assert!(r.text().contains("could not be resolved"), "{}", r.text());
    let status = px.handle().status();
    let inst = &status
        .upstream("app")
        .unwrap()
        .pool("blue")
        .unwrap()
        .instances[0];
    assert!(inst
        .resolve_error
        .as_deref()
        .unwrap_or("")
        .contains("no such host"));
    px.shutdown().await;
}

/// The request head as the app receives it, byte for byte (a raw-socket upstream): the
/// forwarding headers and the request id are set, names outside Pingora's titled set are
/// lowercase (README, "Behaviour where the spec is silent"), values are the client's; the
/// response returns the request id spelled as configured.
#[tokio::test]
async fn the_request_head_on_the_wire_to_the_app() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    trace_init();
    let up = RawUpstream::start().await;
    let yaml = format!(
        "request_id: X-Correlation-Id\n{}",
        app_yaml(&[("blue", &[up.addr])], "blue", "")
    );
    let px = TestProxy::start(&yaml).await;
    let mut s = tokio::net::TcpStream::connect(px.addr).await.unwrap();
    s.write_all(
        b"GET /x?q=1 HTTP/1.1\r\nHost: Shop.Example:8080\r\nX-Custom-Tenant: Acme\r\nX-Correlation-Id: abc-123\r\nX-Forwarded-For: 10.9.8.7\r\nX_Forwarded_For: forged\r\n\r\n",
    )
    .await
    .unwrap();
    let mut resp = Vec::new();
    let mut buf = [0u8; 4096];
    let read = async {
        while !resp.ends_with(b"hello") {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => resp.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), read)
        .await
        .expect("an answer");
    let resp = String::from_utf8_lossy(&resp);
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains("\r\nX-Correlation-Id: abc-123\r\n"), "{resp}");
    let head = up.last_head();
    assert!(head.starts_with("GET /x?q=1 HTTP/1.1\r\n"), "{head}");
    for line in [
        "Host: Shop.Example:8080",
        "x-custom-tenant: Acme",
        "x-correlation-id: abc-123",
        "x-forwarded-for: 10.9.8.7, 127.0.0.1",
        "x-real-ip: 127.0.0.1",
        "x-forwarded-proto: http",
        "x-forwarded-host: Shop.Example:8080",
    ] {
        assert!(
            head.contains(&format!("\r\n{line}\r\n")),
            "{line:?} missing:\n{head}"
        );
    }
    assert!(
        !head.to_ascii_lowercase().contains("x_forwarded_for"),
        "{head}"
    );
    assert_eq!(
        head.matches("\r\n").count(),
        9,
        "exactly 7 headers:\n{head}"
    );
    // The same request without the underscored header is one switchyard forwards itself (the
    // fast path, `proxy::fast`); the underscored one went through Pingora. The app sees the
    // same head either way, line for line (the order may differ).
    let before = px.handle().fast_path_requests();
    s.write_all(
        b"GET /x?q=1 HTTP/1.1\r\nHost: Shop.Example:8080\r\nX-Custom-Tenant: Acme\r\nX-Correlation-Id: abc-123\r\nX-Forwarded-For: 10.9.8.7\r\n\r\n",
    )
    .await
    .unwrap();
    let mut again = Vec::new();
    let read = async {
        while !again.ends_with(b"hello") {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => again.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), read)
        .await
        .expect("an answer");
    let again = String::from_utf8_lossy(&again);
    assert!(again.starts_with("HTTP/1.1 200"), "{again}");
    assert!(
        again.contains("\r\nX-Correlation-Id: abc-123\r\n"),
        "{again}"
    );
    assert_eq!(
        px.handle().fast_path_requests(),
        before + 1,
        "not the fast path"
    );
    let fast_head = up.last_head();
    let lines = |h: &str| {
        let mut v: Vec<String> = h.split("\r\n").map(str::to_string).collect();
        v.sort();
        v
    };
    assert_eq!(
        lines(&fast_head),
        lines(&head),
        "fast path:\n{fast_head}\nPingora:\n{head}"
    );
    px.shutdown().await;
}

/// The answers of [`the_apps_answer_decides_whether_its_connection_is_reused`]: method, the
/// app's answer up to its body, its body, whether the proxy may keep the connection, and the
/// status the client gets. `{id}` is the connection's number, `{seq}` the answer's number on
/// it (two digits), in the body too where there is one.
const KEEPALIVE_CASES: [(&str, &str, &str, bool, u16); 13] = [
    ("GET", "HTTP/1.1 200 OK\r\nX-Conn: {id}\r\nX-Seq: {seq}\r\nContent-Length: 2\r\n\r\n", "{seq}", true, 200),
    ("GET", "HTTP/1.1 200 OK\r\nConnection: close\r\nX-Conn: {id}\r\nX-Seq: {seq}\r\nContent-Length: 2\r\n\r\n", "{seq}", false, 200),
    ("GET", "HTTP/1.0 200 OK\r\nX-Conn: {id}\r\nX-Seq: {seq}\r\nContent-Length: 2\r\n\r\n", "{seq}", false, 200),
    ("GET", "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nX-Conn: {id}\r\nX-Seq: {seq}\r\nContent-Length: 2\r\n\r\n", "{seq}", true, 200),
    ("GET", "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nX-Conn: {id}\r\nX-Seq: {seq}\r\nTransfer-Encoding: chunked\r\n\r\n", "2\r\n{seq}\r\n0\r\n\r\n", false, 200),
    // (Reused either way: the pool's idle timeout is the proxy's own. The case shows that a
    // `Keep-Alive` header does not stop reuse.)
    ("GET", "HTTP/1.1 200 OK\r\nKeep-Alive: timeout=30, max=100\r\nX-Conn: {id}\r\nX-Seq: {seq}\r\nContent-Length: 2\r\n\r\n", "{seq}", true, 200),
    ("GET", "HTTP/1.1 200 OK\r\nX-Conn: {id}\r\nX-Seq: {seq}\r\nTransfer-Encoding: chunked\r\n\r\n", "2\r\n{seq}\r\n0\r\n\r\n", true, 200),
    // No body by the request (HEAD) or by the status (204, 304), whatever the headers say.
    ("HEAD", "HTTP/1.1 200 OK\r\nX-Conn: {id}\r\nX-Seq: {seq}\r\nContent-Length: 2\r\n\r\n", "", true, 200),
    ("GET", "HTTP/1.1 204 No Content\r\nX-Conn: {id}\r\nX-Seq: {seq}\r\n\r\n", "", true, 204),
    ("GET", "HTTP/1.1 304 Not Modified\r\nX-Conn: {id}\r\nX-Seq: {seq}\r\nContent-Length: 2\r\n\r\n", "", true, 304),
    // An informational answer first: the final one decides, either way.
    ("GET", "HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\nHTTP/1.1 200 OK\r\nX-Conn: {id}\r\nX-Seq: {seq}\r\nContent-Length: 2\r\n\r\n", "{seq}", true, 200),
    ("GET", "HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\nHTTP/1.1 200 OK\r\nConnection: close\r\nX-Conn: {id}\r\nX-Seq: {seq}\r\nContent-Length: 2\r\n\r\n", "{seq}", false, 200),
    ("GET", "HTTP/1.1 103 Early Hints\r\nConnection: close\r\n\r\nHTTP/1.1 200 OK\r\nX-Conn: {id}\r\nX-Seq: {seq}\r\nContent-Length: 2\r\n\r\n", "{seq}", true, 200),
];

/// Whether the proxy keeps an upstream connection for the next request is the app's answer's
/// to decide (RFC 9112 §9.3): HTTP/1.1 unless `Connection: close`, HTTP/1.0 only with
/// `Connection: keep-alive`, never after a `Transfer-Encoding` in HTTP/1.0; and the body's
/// framing must be read right (HEAD, 204, 304, chunked, a 1xx before the answer), or the next
/// answer on the connection is misread. The app here keeps every connection open and names
/// it in `X-Conn`, so a second request on the same connection shows that the proxy kept it.
/// (Pingora decides this after the response header has been handed on, from facts it keeps of
/// it: third_party/PATCHES.md 3.)
#[tokio::test]
async fn the_apps_answer_decides_whether_its_connection_is_reused() {
    use tokio::io::AsyncWriteExt;
    trace_init();
    let (addr, server) = raw_app(|id, mut s| async move {
        let mut buf = Vec::new();
        let mut seq = 0u32;
        while let Some(req) = read_request_head(&mut s, &mut buf).await {
            seq += 1;
            // "GET /case/N HTTP/1.1..."
            let case = req
                .split(' ')
                .nth(1)
                .and_then(|p| p.strip_prefix("/case/"))
                .and_then(|n| n.parse::<usize>().ok())
                .and_then(|n| KEEPALIVE_CASES.get(n));
            let resp = match case {
                Some((_, head, body, _, _)) => {
                    let seq = format!("{:02}", seq % 100);
                    format!("{head}{body}")
                        .replace("{id}", &id.to_string())
                        .replace("{seq}", &seq)
                }
                // Health checks.
                None => "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}".to_string(),
            };
            if s.write_all(resp.as_bytes()).await.is_err() {
                return;
            }
        }
    })
    .await;
    // One worker: idle upstream connections are kept per worker (as nginx's are), and two
    // client connections could be accepted by two.
    let px = TestProxy::start(
        &app_yaml(&[("blue", &[addr])], "blue", "").replace("threads: 2", "threads: 1"),
    )
    .await;
    // Each request on a client connection of its own (read to its end), so only the
    // upstream side can connect the two.
    let ask = |method: &'static str, path: String| async move {
        use tokio::io::AsyncReadExt;
        let mut s = tokio::net::TcpStream::connect(px.addr).await.unwrap();
        let req = format!("{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(std::time::Duration::from_secs(10), s.read_to_end(&mut out))
            .await
            .expect("the answer ends within 10 s")
            .unwrap();
        String::from_utf8_lossy(&out).into_owned()
    };
    for (i, (method, head, _, reused, status)) in KEEPALIVE_CASES.iter().enumerate() {
        let mut conns = Vec::new();
        for _ in 0..2 {
            let answer = ask(method, format!("/case/{i}")).await;
            // The final answer, after any informational ones (forwarded as they came).
            let mut rest = answer.as_str();
            let (resp_head, body) = loop {
                let (h, b) = rest.split_once("\r\n\r\n").unwrap_or((rest, ""));
                if h.get(8..11).is_some_and(|s| s.starts_with(" 1")) {
                    rest = b;
                    continue;
                }
                break (h, b);
            };
            // HTTP/1.1, whatever the app's version (an HTTP/1.0 app's answer included).
            assert!(
                resp_head.starts_with("HTTP/1.1 ")
                    && resp_head
                        .get(8..)
                        .is_some_and(|r| r.starts_with(&format!(" {status} "))),
                "{head:?}: {answer:?}"
            );
            // Each answer's own body: a misread length would shift them.
            let seq = resp_head
                .lines()
                .find_map(|l| l.strip_prefix("x-seq: ").or(l.strip_prefix("X-Seq: ")));
            assert!(seq.is_some(), "{head:?}: no X-Seq in {answer:?}");
            if *method == "GET" && *status == 200 {
                assert!(
                    seq.is_some_and(|seq| body.contains(seq)),
                    "{head:?}: {answer:?}"
                );
            }
            let conn = resp_head
                .lines()
                .find_map(|l| l.strip_prefix("x-conn: ").or(l.strip_prefix("X-Conn: ")))
                .map(str::to_string);
            assert!(conn.is_some(), "{head:?}: no X-Conn in {answer:?}");
            conns.push(conn);
        }
        assert_eq!(
            conns[0] == conns[1],
            *reused,
            "{head:?}: upstream connections {conns:?}"
        );
    }
    px.shutdown().await;
    server.abort();
}

/// An app answering `hello world` three ways: `/chunked` chunked, `/old` as HTTP/1.0 without a
/// length (the end of the connection ends the body), anything else (`/len`, the health checks)
/// with a `Content-Length`.
async fn hello_world_app() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    use tokio::io::AsyncWriteExt;
    raw_app(|_, mut s| async move {
        let mut buf = Vec::new();
        while let Some(req) = read_request_head(&mut s, &mut buf).await {
            let (resp, close) = if req.starts_with("GET /chunked ") {
                ("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n", false)
            } else if req.starts_with("GET /old ") {
                ("HTTP/1.0 200 OK\r\n\r\nhello world", true)
            } else {
                ("HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nhello world", false)
            };
            if s.write_all(resp.as_bytes()).await.is_err() || close {
                return;
            }
        }
    })
    .await
}

/// An HTTP/1.1 client on one keep-alive connection, through the fast path: a body the app sends
/// without a length (HTTP/1.0, ended by its close) arrives chunked, a chunked one as it was
/// sent, one with a length as it is — and the connection carries all of them, in any order.
#[tokio::test]
async fn bodies_by_length_chunked_and_by_close_reach_an_http11_client_on_one_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    trace_init();
    let (addr, server) = hello_world_app().await;
    let px = TestProxy::start(&app_yaml(&[("blue", &[addr])], "blue", "")).await;
    let mut s = tokio::net::TcpStream::connect(px.addr).await.unwrap();
    let mut pending: Vec<u8> = Vec::new();
    let before = px.handle().fast_path_requests();
    let paths = [
        "/old", "/chunked", "/len", "/old", "/len", "/chunked", "/old",
    ];
    for path in paths {
        let req = format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        // Read until this answer is complete: its head, then its body by its framing.
        let mut chunk = [0u8; 4096];
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        let (head, body) = loop {
            if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&pending[..end]).to_ascii_lowercase();
                let rest = &pending[end + 4..];
                if head.contains("transfer-encoding: chunked") {
                    // Decode; complete when the last chunk and the final CRLF are here.
                    let mut body = Vec::new();
                    let mut at = 0;
                    let mut done = None;
                    while let Some(eol) = rest[at..].windows(2).position(|w| w == b"\r\n") {
                        let size = usize::from_str_radix(
                            std::str::from_utf8(&rest[at..at + eol]).unwrap(),
                            16,
                        )
                        .unwrap();
                        let data = at + eol + 2;
                        if rest.len() < data + size + 2 {
                            break;
                        }
                        body.extend_from_slice(&rest[data..data + size]);
                        at = data + size + 2;
                        if size == 0 {
                            done = Some(end + 4 + at);
                            break;
                        }
                    }
                    if let Some(used) = done {
                        pending.drain(..used);
                        break (head, body);
                    }
                } else if let Some(len) = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .and_then(|v| v.trim().parse::<usize>().ok())
                {
                    if rest.len() >= len {
                        let body = rest[..len].to_vec();
                        pending.drain(..end + 4 + len);
                        break (head, body);
                    }
                } else {
                    panic!("{path}: an answer framed by the end of the connection: {head}");
                }
            }
            let n = tokio::time::timeout_at(deadline, s.read(&mut chunk))
                .await
                .unwrap_or_else(|_| panic!("{path}: no complete answer within 10 s: {pending:?}"))
                .unwrap();
            assert!(n > 0, "{path}: the proxy closed the connection");
            pending.extend_from_slice(&chunk[..n]);
        };
        assert!(head.starts_with("http/1.1 200 "), "{path}: {head}");
        assert!(head.contains("connection: keep-alive"), "{path}: {head}");
        assert_eq!(body, b"hello world", "{path}: {head}");
        if path == "/old" {
            assert!(
                head.contains("transfer-encoding: chunked"),
                "{path}: {head}"
            );
        }
    }
    assert_eq!(
        px.handle().fast_path_requests() - before,
        paths.len() as u64
    );
    px.shutdown().await;
    server.abort();
}

/// An HTTP/1.0 client gets what HTTP/1.0 can read, as from nginx: a body the app chunks, or
/// sends without a length, arrives as it is and the end of the connection ends it (chunked is
/// HTTP/1.1's, RFC 9112 §7); and its connection is kept only when it asks for it
/// (`Connection: keep-alive`), and only when the answer has a length.
#[tokio::test]
async fn an_http10_client_gets_a_body_it_can_read_and_keep_alive_only_when_it_asks() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    trace_init();
    let (addr, server) = hello_world_app().await;
    let px = TestProxy::start(&app_yaml(&[("blue", &[addr])], "blue", "")).await;
    let limit = std::time::Duration::from_secs(10);
    // One HTTP/1.0 request; the client never closes its side (that would be an abort).
    async fn send(s: &mut tokio::net::TcpStream, path: &str, keep_alive: bool) {
        let ka = if keep_alive {
            "Connection: keep-alive\r\n"
        } else {
            ""
        };
        let req = format!("GET {path} HTTP/1.0\r\nHost: t\r\n{ka}\r\n");
        s.write_all(req.as_bytes()).await.unwrap()
    }
    let check = |answer: &str, what: &str| {
        let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((answer, ""));
        assert!(head.starts_with("HTTP/1.1 200 "), "{what}: {answer:?}");
        assert!(
            !head.to_ascii_lowercase().contains("transfer-encoding"),
            "{what}: chunked to an HTTP/1.0 client: {answer:?}"
        );
        assert_eq!(body, "hello world", "{what}: {answer:?}");
        head.to_ascii_lowercase()
    };
    // Without a length, or without asking: the proxy ends the connection after the answer.
    for (path, keep_alive) in [
        ("/chunked", false),
        ("/chunked", true),
        ("/old", false),
        ("/old", true),
        ("/len", false),
    ] {
        let what = format!("{path}, keep-alive asked: {keep_alive}");
        let mut s = tokio::net::TcpStream::connect(px.addr).await.unwrap();
        send(&mut s, path, keep_alive).await;
        let mut out = Vec::new();
        tokio::time::timeout(limit, s.read_to_end(&mut out))
            .await
            .unwrap_or_else(|_| panic!("{what}: the proxy kept the connection open"))
            .unwrap();
        let head = check(&String::from_utf8_lossy(&out), &what);
        assert!(head.contains("connection: close"), "{what}: {head:?}");
    }
    // Asked for, with a length: kept, and a second request is answered on it.
    let mut s = tokio::net::TcpStream::connect(px.addr).await.unwrap();
    for round in 0..2 {
        send(&mut s, "/len", true).await;
        let mut out = Vec::new();
        let mut chunk = [0u8; 4096];
        let answer = loop {
            let text = String::from_utf8_lossy(&out).into_owned();
            if text
                .split_once("\r\n\r\n")
                .is_some_and(|(_, body)| body.len() >= 11)
            {
                break text;
            }
            let n = tokio::time::timeout(limit, s.read(&mut chunk))
                .await
                .expect("the answer within 10 s")
                .unwrap();
            assert!(n > 0, "round {round}: closed after {out:?}");
            out.extend_from_slice(&chunk[..n]);
        };
        let head = check(&answer, &format!("/len kept, round {round}"));
        assert!(head.contains("connection: keep-alive"), "{head:?}");
    }
    px.shutdown().await;
    server.abort();
}
