//! TLS termination with HTTP/2 by ALPN, HTTP/1.1 upstream.

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::sync::Arc;
use switchyard_tests::*;
use tokio_rustls::rustls;

/// A proxy with a TLS listener (self-signed for localhost) in front of `up`, and the
/// certificate; `top` is YAML prepended at the top level.
async fn tls_proxy(
    up: &FakeUpstream,
    top: &str,
) -> (
    TestProxy,
    rcgen::CertifiedKey<rcgen::KeyPair>,
    tempfile::TempDir,
) {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (crt, key) = (dir.path().join("crt.pem"), dir.path().join("key.pem"));
    std::fs::write(&crt, cert.cert.pem()).unwrap();
    std::fs::write(&key, cert.signing_key.serialize_pem()).unwrap();
    let yaml = app_yaml(&[("blue", &[up.addr()])], "blue", "").replace(
        "  - addr: \"127.0.0.1:0\"\n",
        &format!(
            "  - addr: \"127.0.0.1:0\"\n    tls: {{cert: \"{}\", key: \"{}\"}}\n",
            crt.display(),
            key.display()
        ),
    );
    let px = TestProxy::start(&format!("{top}{yaml}")).await;
    (px, cert, dir)
}

/// A TLS client connection trusting `cert`, offering these ALPN protocols.
async fn tls_connect(
    px: &TestProxy,
    cert: &rcgen::CertifiedKey<rcgen::KeyPair>,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.cert.der().clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = tokio::net::TcpStream::connect(px.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .unwrap()
}

#[tokio::test]
async fn tls_listener_speaks_h2_and_forwards_https_proto() {
    trace_init();
    let up = FakeUpstream::start("blue").await.unwrap();
    let (px, cert, _dir) = tls_proxy(&up, "").await;
    let tls = tls_connect(&px, &cert, &[b"h2", b"http/1.1"]).await;
    assert_eq!(
        tls.get_ref().1.alpn_protocol(),
        Some(&b"h2"[..]),
        "h2 negotiated"
    );
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    for i in 0..3 {
        let req = http::Request::get(format!("https://localhost/x/{i}"))
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert!(String::from_utf8_lossy(&body).contains("\"color\":\"blue\""));
    }
    let seen = up.seen();
    assert_eq!(seen.len(), 3);
    assert_eq!(seen[0].headers["x-forwarded-proto"], "https");
    assert_eq!(seen[0].headers["host"], "localhost");
    assert_eq!(seen[0].path, "/x/0");
    px.shutdown().await;
}

#[tokio::test]
async fn silent_tls_clients_are_closed_after_client_header_timeout() {
    use tokio::io::AsyncReadExt;
    trace_init();
    let up = FakeUpstream::start("blue").await.unwrap();
    let (px, cert, _dir) = tls_proxy(&up, "client_header_timeout: 500ms\n").await;
    // h2 negotiated, then nothing (not even the connection preface); and HTTP/1.1, nothing.
    for alpn in [&b"h2"[..], b"http/1.1"] {
        let mut tls = tls_connect(&px, &cert, &[alpn]).await;
        let start = std::time::Instant::now();
        let mut buf = [0u8; 64];
        let closed = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            loop {
                match tls.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "{alpn:?}: still open after 5 s");
        assert!(start.elapsed() < std::time::Duration::from_secs(3));
    }
    px.shutdown().await;
}

#[test]
fn a_missing_certificate_is_a_start_error_not_a_panic() {
    let yaml = app_yaml(&[("blue", &["127.0.0.1:9".parse().unwrap()])], "blue", "").replace(
        "  - addr: \"127.0.0.1:0\"\n",
        "  - addr: \"127.0.0.1:0\"\n    tls: {cert: \"/nonexistent/crt.pem\", key: \"/nonexistent/key.pem\"}\n",
    );
    let dir = tempfile::tempdir().unwrap();
    let yaml = yaml.replace("{dir}", &dir.path().display().to_string());
    let cfg = switchyard_config::parse(&yaml).unwrap();
    let err = switchyard_proxy::start(cfg, Default::default()).unwrap_err();
    assert!(err.to_string().contains("/nonexistent/crt.pem"), "{err}");
}

#[test]
fn a_port_in_use_is_a_start_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let yaml = app_yaml(&[("blue", &["127.0.0.1:9".parse().unwrap()])], "blue", "")
        .replace("127.0.0.1:0", &addr.to_string())
        .replace("{dir}", &dir.path().display().to_string());
    let cfg = switchyard_config::parse(&yaml).unwrap();
    let err = switchyard_proxy::start(cfg, Default::default()).unwrap_err();
    assert!(
        err.to_string()
            .contains(&format!("cannot listen on {addr}")),
        "{err}"
    );
}

/// Connect with SNI `sni`, trusting `roots`; the stream and the leaf certificate presented.
async fn connect_sni(
    addr: std::net::SocketAddr,
    roots: &[&rcgen::CertifiedKey<rcgen::KeyPair>],
    sni: &str,
) -> (
    tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    Vec<u8>,
) {
    let mut store = rustls::RootCertStore::empty();
    for c in roots {
        store.add(c.cert.der().clone()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(store)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from(sni.to_string()).unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .unwrap_or_else(|e| panic!("TLS to {sni}: {e}"));
    let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    (tls, leaf)
}

/// One HTTP/1.1 GET on a TLS stream: the status.
async fn get_on(
    tls: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
) -> (hyper::client::conn::http1::SendRequest<Empty<Bytes>>, u16) {
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let status = again(&mut send).await;
    (send, status)
}

async fn again(send: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>) -> u16 {
    let req = http::Request::get("/")
        .header("host", "a.test")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let _ = resp.into_body().collect().await;
    status
}

#[tokio::test]
async fn certificates_are_chosen_by_sni_and_reloaded_without_dropping_connections() {
    trace_init();
    let up = FakeUpstream::start("blue").await.unwrap();
    let a = rcgen::generate_simple_self_signed(vec!["a.test".into()]).unwrap();
    let b =
        rcgen::generate_simple_self_signed(vec!["b.test".into(), "*.wild.test".into()]).unwrap();
    let files = tempfile::tempdir().unwrap();
    let write = |name: &str, c: &rcgen::CertifiedKey<rcgen::KeyPair>| {
        let (crt, key) = (
            files.path().join(format!("{name}.crt")),
            files.path().join(format!("{name}.key")),
        );
        std::fs::write(&crt, c.cert.pem()).unwrap();
        std::fs::write(&key, c.signing_key.serialize_pem()).unwrap();
        (crt.display().to_string(), key.display().to_string())
    };
    let (a_crt, a_key) = write("a", &a);
    let (b_crt, b_key) = write("b", &b);
    let yaml = app_yaml(&[("blue", &[up.addr()])], "blue", "").replace(
        "  - addr: \"127.0.0.1:0\"\n",
        &format!(
            "  - addr: \"127.0.0.1:0\"\n    http2: false\n    tls:\n      certs:\n        - {{cert: \"{a_crt}\", key: \"{a_key}\"}}\n        - {{cert: \"{b_crt}\", key: \"{b_key}\"}}\n"
        ),
    );
    let px = TestProxy::start_from_file(&yaml).await;
    let der = |c: &rcgen::CertifiedKey<rcgen::KeyPair>| c.cert.der().to_vec();
    assert_eq!(connect_sni(px.addr, &[&a, &b], "a.test").await.1, der(&a));
    assert_eq!(connect_sni(px.addr, &[&a, &b], "b.test").await.1, der(&b));
    assert_eq!(
        connect_sni(px.addr, &[&a, &b], "x.wild.test").await.1,
        der(&b)
    );
    // A connection open across the reload keeps working.
    let (open, _) = connect_sni(px.addr, &[&a, &b], "a.test").await;
    let (mut send, status) = get_on(open).await;
    assert_eq!(status, 200);
    // Renewed: new files at the same paths, then reload.
    let a2 = rcgen::generate_simple_self_signed(vec!["a.test".into()]).unwrap();
    write("a", &a2);
    let r = px.ctl_call(switchyard_control::Request::Reload).await;
    assert!(r.ok, "{:?}", r.error);
    assert_eq!(connect_sni(px.addr, &[&a2, &b], "a.test").await.1, der(&a2));
    assert_eq!(again(&mut send).await, 200, "the open connection goes on");
    // A key that does not belong to its certificate: the reload is refused, naming the
    // files, and the certificates in use stay.
    std::fs::write(files.path().join("a.key"), b.signing_key.serialize_pem()).unwrap();
    let r = px.ctl_call(switchyard_control::Request::Reload).await;
    assert!(!r.ok);
    let msg = r.error.unwrap().message;
    assert!(
        msg.contains("do not match") && msg.contains("a.key"),
        "{msg}"
    );
    assert_eq!(connect_sni(px.addr, &[&a2, &b], "a.test").await.1, der(&a2));
    px.shutdown().await;
}

#[tokio::test]
async fn redirect_https_answers_308_with_host_path_and_query() {
    trace_init();
    let up = FakeUpstream::start("blue").await.unwrap();
    let yaml = app_yaml(&[("blue", &[up.addr()])], "blue", "").replace(
        "  - addr: \"127.0.0.1:0\"\n",
        "  - addr: \"127.0.0.1:0\"\n    redirect_https: true\n",
    );
    let px = TestProxy::start(&yaml).await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    for (req, want) in [
        (
            "GET /p/x?q=1&r=%20 HTTP/1.1\r\nHost: Example.com:8080\r\n\r\n",
            "https://Example.com/p/x?q=1&r=%20",
        ),
        (
            "POST http://api.example.com:80/y HTTP/1.1\r\nHost: api.example.com:80\r\nContent-Length: 0\r\n\r\n",
            "https://api.example.com/y",
        ),
    ] {
        let mut s = tokio::net::TcpStream::connect(px.addr).await.unwrap();
        s.write_all(req.as_bytes()).await.unwrap();
        let mut got = Vec::new();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut got))
            .await;
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 308 Permanent Redirect\r\n"), "{text}");
        assert!(text.contains(&format!("\r\nLocation: {want}\r\n")), "{text}");
    }
    assert_eq!(up.hits(), 0, "never proxied");
    px.shutdown().await;
}

#[tokio::test]
async fn h2_bodies_over_client_max_body_size_are_413() {
    trace_init();
    let up = FakeUpstream::start("blue").await.unwrap();
    let (px, cert, _dir) = tls_proxy(&up, "client_max_body_size: 1k\n").await;
    let tls = tls_connect(&px, &cert, &[b"h2"]).await;
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    // A Content-Length over the limit: 413 before anything is forwarded.
    let req = http::Request::post("https://localhost/sha256")
        .header("content-length", "2048")
        .body(http_body_util::Full::new(Bytes::from(vec![b'x'; 2048])))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 413);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("client_max_body_size (1k)"));
    assert_eq!(up.hits(), 0, "nothing forwarded");
    // At the limit: forwarded.
    let req = http::Request::post("https://localhost/sha256")
        .body(http_body_util::Full::new(Bytes::from(vec![b'x'; 1024])))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("\"bytes\":1024"));
    px.shutdown().await;
}
