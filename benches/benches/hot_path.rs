//! Criterion micro-benchmarks of per-request work: route matching and the deny check.
//!
//! Run: `cargo bench -p switchyard-benches --bench hot_path`.

#![allow(clippy::unwrap_used, missing_docs)]

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use switchyard_config::{DenyConfig, RouteConfig};
use switchyard_proxy::bench::{DenyList, RouteTable};

fn routes(n: usize) -> RouteTable {
    let mut cfg: Vec<RouteConfig> = (0..n)
        .map(|i| RouteConfig {
            path_prefix: format!("/svc{i}/"),
            upstream: "app".into(),
            strip_prefix: true,
        })
        .collect();
    cfg.push(RouteConfig {
        path_prefix: "/".into(),
        upstream: "app".into(),
        strip_prefix: false,
    });
    RouteTable::new(&cfg, |_| 0)
}

fn route_matching(c: &mut Criterion) {
    let mut g = c.benchmark_group("route_match");
    for n in [1usize, 10, 100] {
        let t = routes(n);
        let first = b"/svc0/users/42".as_slice();
        let last = b"/other/path".as_slice();
        g.bench_function(format!("{n}_routes_first"), |b| {
            b.iter(|| black_box(t.find(black_box(first)).map(|(i, _)| i)))
        });
        g.bench_function(format!("{n}_routes_fallthrough"), |b| {
            b.iter(|| black_box(t.find(black_box(last)).map(|(i, _)| i)))
        });
    }
    let t = routes(1);
    let (_, r) = t.find(b"/svc0/users?id=1").unwrap();
    g.bench_function("rewrite_strip_prefix", |b| {
        b.iter(|| black_box(r.rewrite(black_box(b"/svc0/users?id=1"))))
    });
    g.finish();
}

fn deny_check(c: &mut Criterion) {
    let deny = DenyList::new(&DenyConfig {
        status: 403,
        paths: vec![regex::Regex::new(
            "(?i)/(phpinfo|actuator|solr|portal|redlion|druid|manager|systembc|\\.aws|\\.docker)",
        )
        .unwrap()],
    });
    let mut g = c.benchmark_group("deny");
    g.bench_function("allowed_path", |b| {
        b.iter(|| black_box(deny.denies(black_box("/backend/api/v1/orders/12345"))))
    });
    g.bench_function("denied_path", |b| {
        b.iter(|| black_box(deny.denies(black_box("/backend/actuator/env"))))
    });
    g.bench_function("percent_encoded_path", |b| {
        b.iter(|| black_box(deny.denies(black_box("/backend/api/v1/orders%2F12345"))))
    });
    g.finish();
}

criterion_group!(benches, route_matching, deny_check);
criterion_main!(benches);
