//! Any path: normalizing never panics, yields a path starting with `/`, is idempotent, and the
//! deny list and route table answer for it (the SPEC's deny patterns, three routes). The same
//! bytes as a Host: `request_host` never panics, and a host route matches only what it names.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "../../proxy/src/routing/deny.rs"]
#[allow(dead_code, unreachable_pub)]
mod deny;
#[path = "../../proxy/src/routing/normalize.rs"]
#[allow(dead_code, unreachable_pub)]
mod normalize;
#[path = "../../proxy/src/routing/routes.rs"]
#[allow(dead_code, unreachable_pub)]
mod routes;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let path = format!("/{s}");
    let norm = normalize::normalize(&path);
    assert!(norm.starts_with('/'), "{norm:?}");
    assert_eq!(normalize::normalize(&norm), norm, "idempotent");
    static DENY: std::sync::OnceLock<deny::DenyList> = std::sync::OnceLock::new();
    let d = DENY.get_or_init(|| {
        deny::DenyList::new(&switchyard_config::DenyConfig {
            status: 403,
            paths: vec![regex::Regex::new(
                "(?i)/(phpinfo|actuator|solr|portal|redlion|druid|manager|systembc|\\.aws|\\.docker)",
            )
            .expect("the SPEC's deny pattern")],
        })
    });
    let denied = d.denies(&norm);
    if norm.to_ascii_lowercase().contains("/actuator") {
        assert!(denied, "{norm:?} passed the deny list");
    }
    let mut routes: Vec<switchyard_config::RouteConfig> = vec![switchyard_config::RouteConfig {
        host: switchyard_config::HostMatch::parse("*.example.com").ok(),
        path_prefix: "/".into(),
        upstream: "api".into(),
        strip_prefix: false,
    }];
    routes.extend(
        [("/backend/", true), ("/api/", false), ("/", false)]
            .iter()
            .map(|(p, strip)| switchyard_config::RouteConfig {
                host: None,
                path_prefix: p.to_string(),
                upstream: "app".into(),
                strip_prefix: *strip,
            }),
    );
    let t = routes::RouteTable::new(&routes, |name| usize::from(name == "api"));
    let mut buf = [0u8; 253];
    let host = routes::request_host(data, &mut buf).map(|h| h.to_vec());
    let (i, _) = t
        .find(host.as_deref(), norm.as_bytes())
        .expect("the catch-all matches");
    if i == 0 {
        let h = host.unwrap_or_default();
        assert!(h.ends_with(b".example.com") && h.len() > 12, "{h:?}");
    }
    let (_, r) = t.find(None, norm.as_bytes()).expect("the catch-all matches");
    if let Some(out) = r.rewrite(norm.as_bytes()) {
        assert!(out.starts_with(b"/"));
    }
});
