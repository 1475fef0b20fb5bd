//! Criterion micro-benchmarks of per-request work: route matching, the deny check, instance
//! selection (1, 10, 1000 instances), weighted pool selection, the per-request pool decision
//! (canary stickiness, `X-Canary`, preview), and the routing-snapshot load while another
//! thread swaps the snapshot 1000 times a second.
//!
//! Run: `cargo bench -p switchyard-benches --bench hot_path`.

#![allow(clippy::unwrap_used, missing_docs)]

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use switchyard_config::{DenyConfig, RouteConfig};
use switchyard_proxy::bench::{Decide, DenyList, RouteTable, Routing, Upstream};

fn routes(n: usize) -> RouteTable {
    let mut cfg: Vec<RouteConfig> = (0..n)
        .map(|i| RouteConfig {
            host: None,
            path_prefix: format!("/svc{i}/"),
            upstream: "app".into(),
            strip_prefix: true,
        })
        .collect();
    cfg.push(RouteConfig {
        host: None,
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
            b.iter(|| black_box(t.find(None, black_box(first)).map(|(i, _)| i)))
        });
        g.bench_function(format!("{n}_routes_fallthrough"), |b| {
            b.iter(|| black_box(t.find(None, black_box(last)).map(|(i, _)| i)))
        });
    }
    let t = routes(1);
    let (_, r) = t.find(None, b"/svc0/users?id=1").unwrap();
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

fn selection(c: &mut Criterion) {
    let mut g = c.benchmark_group("select_instance");
    for n in [1usize, 10, 1000] {
        for balance in ["round_robin", "least_requests"] {
            let up = Upstream::new(&[("blue", n)], balance);
            g.bench_function(format!("{balance}_{n}"), |b| {
                b.iter(|| black_box(up.pick_instance()))
            });
        }
    }
    g.finish();
    let mut g = c.benchmark_group("select_pool");
    let single = Upstream::new(&[("blue", 2), ("green", 2)], "round_robin");
    g.bench_function("100_0", |b| b.iter(|| black_box(single.pick_pool())));
    let split = Upstream::new(&[("blue", 2), ("green", 2)], "round_robin")
        .with_weights(&[("blue", 95), ("green", 5)]);
    g.bench_function("95_5", |b| b.iter(|| black_box(split.pick_pool())));
    g.finish();
}

/// The pool decision of a request, next to the route match it follows.
fn decision(c: &mut Criterion) {
    let mut g = c.benchmark_group("decide_pool");
    let header = |pairs: &[(&str, &str)]| {
        let mut h = http::HeaderMap::new();
        h.insert("host", http::HeaderValue::from_static("app.example.com"));
        h.insert(
            "user-agent",
            http::HeaderValue::from_static("Mozilla/5.0 (X11; Linux x86_64)"),
        );
        h.insert("accept", http::HeaderValue::from_static("*/*"));
        for (k, v) in pairs {
            h.insert(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                http::HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    };
    let plain = header(&[]);
    let none = Decide::new(0, "cookie");
    g.bench_function("no_canary", |b| {
        b.iter(|| black_box(none.choose(black_box(&plain))))
    });
    let canary = Decide::new(5, "cookie");
    let with_cookie = header(&[(
        "cookie",
        &format!(
            "JSESSIONID=ABCDEF0123456789; {}; theme=dark",
            canary.cookie(42)
        ),
    )]);
    g.bench_function("canary5_cookie", |b| {
        b.iter(|| black_box(canary.choose(black_box(&with_cookie))))
    });
    g.bench_function("canary5_first_sight", |b| {
        b.iter(|| black_box(canary.choose(black_box(&plain))))
    });
    let forced = header(&[("x-canary", "true")]);
    g.bench_function("canary5_x_canary", |b| {
        b.iter(|| black_box(canary.choose(black_box(&forced))))
    });
    let by_header = Decide::new(5, "header:X-User");
    let user = header(&[("x-user", "user-12345")]);
    g.bench_function("canary5_sticky_header", |b| {
        b.iter(|| black_box(by_header.choose(black_box(&user))))
    });
    let weights = Decide::new(5, "none");
    g.bench_function("canary5_weights_only", |b| {
        b.iter(|| black_box(weights.choose(black_box(&plain))))
    });
    let preview = header(&[("x-switchyard-pool", "green")]);
    g.bench_function("preview_allowed", |b| {
        b.iter(|| black_box(none.choose(black_box(&preview))))
    });
    g.finish();
}

fn snapshot_load(c: &mut Criterion) {
    let routing = Arc::new(Routing::new());
    let mut g = c.benchmark_group("snapshot_load");
    g.bench_function("quiet", |b| b.iter(|| black_box(routing.load_generation())));
    // Two more threads load continuously while a third swaps 1000 times a second.
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for _ in 0..2 {
        let (r, stop) = (routing.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                black_box(r.load_generation());
            }
        }));
    }
    {
        let (r, stop) = (routing.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                r.swap();
                std::thread::sleep(Duration::from_millis(1));
            }
        }));
    }
    g.bench_function("2_loaders_1000_swaps_per_s", |b| {
        b.iter(|| black_box(routing.load_generation()))
    });
    g.finish();
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
}

criterion_group!(
    benches,
    route_matching,
    deny_check,
    selection,
    decision,
    snapshot_load
);
criterion_main!(benches);
