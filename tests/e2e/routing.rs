//! Routing, path rewrite, forwarding headers, deny list (issue 2).

use bytes::Bytes;
use switchyard_tests::*;

fn routes_yaml(up: std::net::SocketAddr) -> String {
    format!(
        r#"listen: [{{addr: "127.0.0.1:0"}}]
threads: 2
admin: {{listen: "off"}}
access_log: "off"
control: {{socket: "{{dir}}/c.sock"}}
state_file: "{{dir}}/s.json"
upstreams:
  app:
    pools:
      blue: ["{up}"]
routes:
  - path_prefix: /backend/
    upstream: app
    strip_prefix: true
  - path_prefix: /static/
    upstream: app
deny:
  status: 403
  paths: ["(?i)/(phpinfo|actuator|solr|portal|redlion|druid|manager|systembc|\\.aws|\\.docker)"]
"#
    )
}

#[tokio::test]
async fn strip_prefix_rewrites_path_and_keeps_query() {
    trace_init();
    let up = FakeUpstream::start("blue").await.unwrap();
    let px = TestProxy::start(&routes_yaml(up.addr())).await;
    for (sent, seen) in [
        ("/backend/users?id=1", "/users?id=1"),
        ("/backend/users", "/users"),
        ("/backend/", "/"),
        ("/backend", "/"),
        ("/backend?x=%20y", "/?x=%20y"),
        ("/static/app.js?v=3", "/static/app.js?v=3"),
    ] {
        up.clear_seen();
        let r = px.get(sent).await;
        assert_eq!(r.status, 200, "{sent}: {}", r.text());
        let s = up.seen();
        assert_eq!(s.len(), 1, "{sent}");
        assert_eq!(s[0].path, seen, "{sent}");
    }
    px.shutdown().await;
}

#[tokio::test]
async fn unrouted_path_is_404_and_not_forwarded() {
    trace_init();
    let up = FakeUpstream::start("blue").await.unwrap();
    let px = TestProxy::start(&routes_yaml(up.addr())).await;
    let r = px.get("/elsewhere").await;
    assert_eq!(r.status, 404);
    assert!(r.text().contains("no route"), "{}", r.text());
    assert_eq!(up.hits(), 0);
    px.shutdown().await;
}

#[tokio::test]
async fn deny_paths_are_answered_by_the_proxy() {
    trace_init();
    let up = FakeUpstream::start("blue").await.unwrap();
    let px = TestProxy::start(&routes_yaml(up.addr())).await;
    for path in [
        "/backend/actuator/env",
        "/backend/ACTUATOR/env",
        "/backend/Actuator",
        "/backend/%61ctuator/env",
        "/backend/phpinfo.php",
        "/backend/x/.aws/credentials",
        "/static/.docker/config.json",
    ] {
        let r = px.get(path).await;
        assert_eq!(r.status, 403, "{path}");
        assert!(!r.text().contains("127.0.0.1"), "{path}: {}", r.text());
    }
    assert_eq!(up.hits(), 0, "a denied request reached the upstream");
    // A denied POST with a body is answered too, and the connection is closed rather than
    // draining an upload nobody wants.
    let r = request(
        px.addr,
        "POST",
        "/backend/actuator/shutdown",
        &[],
        Bytes::from(vec![b'x'; 100_000]),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 403);
    assert_eq!(up.hits(), 0);
    // Allowed paths still work on the same proxy.
    assert_eq!(px.get("/backend/users").await.status, 200);
    px.shutdown().await;
}

#[tokio::test]
async fn forwarding_headers_reach_the_upstream() {
    trace_init();
    let up = FakeUpstream::start("blue").await.unwrap();
    let px = TestProxy::start(&routes_yaml(up.addr())).await;

    let mut c = Conn::open(px.addr).await.unwrap();
    let r = c.get("/backend/h").await.unwrap();
    assert_eq!(r.status, 200);
    let r = c
        .send(
            "GET",
            "/backend/h2",
            &[
                ("X-Forwarded-For", "203.0.113.7, 10.0.0.1"),
                ("X-Real-IP", "6.6.6.6"),
            ],
            Bytes::new(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);

    let seen = up.seen();
    assert_eq!(seen.len(), 2);
    let host = format!("test.local:{}", px.addr.port());
    let h = &seen[0].headers;
    assert_eq!(h["host"], host.as_str(), "Host is the client's");
    assert_eq!(h["x-real-ip"], "127.0.0.1");
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], host.as_str());
    let h = &seen[1].headers;
    assert_eq!(
        h["x-forwarded-for"], "203.0.113.7, 10.0.0.1, 127.0.0.1",
        "appended to the client's list"
    );
    assert_eq!(
        h["x-real-ip"], "127.0.0.1",
        "a client cannot spoof X-Real-IP"
    );
    assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
    px.shutdown().await;
}

#[tokio::test]
async fn hosts_route_to_their_upstreams_exact_then_wildcard_then_any() {
    trace_init();
    let api = FakeUpstream::start("api").await.unwrap();
    let app = FakeUpstream::start("app").await.unwrap();
    let shop = FakeUpstream::start("shop").await.unwrap();
    let px = TestProxy::start(&format!(
        r#"listen: [{{addr: "127.0.0.1:0"}}]
admin: {{listen: "off"}}
access_log: "off"
control: {{socket: "{{dir}}/c.sock"}}
state_file: "{{dir}}/s.json"
upstreams:
  api:
    pools:
      blue: ["{api}"]
    health: {{interval: 100ms, timeout: 100ms}}
  app:
    pools:
      blue: ["{app}"]
    health: {{interval: 100ms, timeout: 100ms}}
  shop:
    pools:
      blue: ["{shop}"]
    health: {{interval: 100ms, timeout: 100ms}}
routes:
  - host: api.example.com
    path_prefix: /
    upstream: api
  - host: "*.shop.example"
    path_prefix: /
    upstream: shop
  - host: app.example.com
    path_prefix: /
    upstream: app
  - path_prefix: /public/
    upstream: app
"#,
        api = api.addr(),
        app = app.addr(),
        shop = shop.addr()
    ))
    .await;
    // Raw requests: the harness's client sets its own Host.
    let get = |host: &'static str, path: &'static str| {
        let addr = px.addr;
        async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(
                format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await
            .unwrap();
            let mut got = Vec::new();
            let _ =
                tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut got))
                    .await;
            let text = String::from_utf8_lossy(&got).into_owned();
            let status: u16 = text.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
            let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
            (status, body)
        }
    };
    let color = |r: &(u16, String)| {
        serde_json::from_str::<serde_json::Value>(&r.1)
            .ok()
            .and_then(|v| v["color"].as_str().map(String::from))
            .unwrap_or_else(|| format!("{} {}", r.0, r.1))
    };
    assert_eq!(color(&get("api.example.com", "/x").await), "api");
    assert_eq!(color(&get("API.EXAMPLE.COM:8080", "/x").await), "api");
    assert_eq!(color(&get("app.example.com.", "/x").await), "app");
    assert_eq!(color(&get("eu.shop.example", "/x").await), "shop");
    assert_eq!(color(&get("a.b.shop.example", "/x").await), "shop");
    // Not a subdomain; an unknown host reaches only the host-less route, else 404.
    assert_eq!(get("shop.example", "/x").await.0, 404);
    assert_eq!(get("other.example", "/x").await.0, 404);
    assert_eq!(color(&get("other.example", "/public/a").await), "app");
    assert_eq!(api.hits(), 2);
    assert_eq!(shop.hits(), 2);
    px.shutdown().await;
}
