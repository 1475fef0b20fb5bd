//! TLS termination with HTTP/2 by ALPN, HTTP/1.1 upstream.

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::sync::Arc;
use switchyard_tests::*;
use tokio_rustls::rustls;

#[tokio::test]
async fn tls_listener_speaks_h2_and_forwards_https_proto() {
    trace_init();
    let up = FakeUpstream::start("blue").await.unwrap();
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
    let px = TestProxy::start(&yaml).await;

    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.cert.der().clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(px.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .unwrap();
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
