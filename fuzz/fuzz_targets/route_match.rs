//! Any path: normalizing never panics, yields a path starting with `/`, is idempotent, and the
//! deny list and route table answer for it (the SPEC's deny patterns, three routes).
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
    let routes: Vec<switchyard_config::RouteConfig> =
        [("/backend/", true), ("/api/", false), ("/", false)]
            .iter()
            .map(|(p, strip)| switchyard_config::RouteConfig {
                path_prefix: p.to_string(),
                upstream: "app".into(),
                strip_prefix: *strip,
            })
            .collect();
    let t = routes::RouteTable::new(&routes, |_| 0);
    let (_, r) = t.find(norm.as_bytes()).expect("the catch-all matches");
    if let Some(out) = r.rewrite(norm.as_bytes()) {
        assert!(out.starts_with(b"/"));
    }
});
