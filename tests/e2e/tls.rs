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
