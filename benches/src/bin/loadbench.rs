//! `loadbench`: switchyard against nginx and HAProxy, side by side, on one machine, in one run.
//!
//! ```sh
//! cargo build --release --workspace && target/release/loadbench            # full run (~10 min)
//! target/release/loadbench --duration 3s --rounds 1 --out /tmp/quick.md   # a quick look
//! # one change against another build, small responses only, side by side in one run:
//! target/release/loadbench --baseline /tmp/old/switchyard --only small --no-idle --no-switch
//! ```
//!
//! Every target runs on loopback on ports chosen at run time, in front of the same fake
//! upstream process (`switchyard fake-upstream`), configured equivalently: same worker count,
//! upstream keep-alive, the same forwarding headers. Scenarios run in interleaved rounds
//! (A B C D, A B C D) so drift on this shared machine hits every target alike. Reported per
//! target: requests/s, latency p50/p99/p99.9 (wrk), proxy CPU seconds per 100k requests (from
//! /proc, all processes of the proxy) and peak RSS; "direct" (no proxy) is the physical limit.
//! Then the switch scenario: 20 blue/green switches during a wrk run — switchyard through its
//! control socket, nginx by rewriting its config and `nginx -s reload`, HAProxy through its
//! runtime API — and the failed requests of each.
//!
//! `--canary` adds a switchyard with a 5% canary and cookie stickiness (the default): once
//! with clients that send no cookie (each response sets one: the first-sight path), once with
//! clients sending a valid cookie of a main-pool bucket (the path of a returning browser).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use anyhow::{bail, Context, Result};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::rc::Rc;
use std::time::Duration;
use switchyard_benches::{
    free_port, spawn, switch_switchyard, wait_port, weight_switchyard, which, wrk, wrk_with, Proc,
    WRK_LUA,
};

#[derive(Debug)]
struct Opts {
    duration: Duration,
    rounds: usize,
    threads: usize,
    out: PathBuf,
    switches: usize,
    /// Another switchyard binary measured next to this one (`switchyard-baseline`).
    baseline: Option<PathBuf>,
    /// Scenario keys to run (small, 64k, 1k, 10k, close); all when empty.
    only: Vec<String>,
    idle: bool,
    switch: bool,
    /// Also measure switchyard with a 5% sticky canary.
    canary: bool,
}

fn parse_opts() -> Result<Opts> {
    let mut o = Opts {
        duration: Duration::from_secs(10),
        rounds: 2,
        threads: 1,
        out: PathBuf::from("docs/BENCHMARKS.md"),
        switches: 20,
        baseline: None,
        only: Vec::new(),
        idle: true,
        switch: true,
        canary: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().context(format!("{a} needs a value"));
        match a.as_str() {
            "--duration" => o.duration = humantime::parse_duration(&val()?)?,
            "--rounds" => o.rounds = val()?.parse()?,
            "--threads" => o.threads = val()?.parse()?,
            "--out" => o.out = PathBuf::from(val()?),
            "--switches" => o.switches = val()?.parse()?,
            "--baseline" => o.baseline = Some(PathBuf::from(val()?)),
            "--only" => o.only = val()?.split(',').map(str::to_string).collect(),
            "--no-idle" => o.idle = false,
            "--no-switch" => o.switch = false,
            "--canary" => o.canary = true,
            "-h" | "--help" => {
                println!("loadbench [--duration 10s] [--rounds 2] [--threads 1] [--switches 20] [--out docs/BENCHMARKS.md]\n          [--baseline OTHER_SWITCHYARD] [--only small,64k,1k,10k,close] [--no-idle] [--no-switch] [--canary]");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (see --help)"),
        }
    }
    Ok(o)
}

/// One target: a name, its port, and its process (none for direct).
struct Target {
    name: &'static str,
    port: u16,
    /// Shared when two targets are one process measured two ways.
    proc_: Option<Rc<Proc>>,
    /// Extra request headers.
    headers: Vec<String>,
}

/// What one wrk run measured.
#[derive(Debug, Clone, Default)]
struct Run {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    requests: f64,
    errors: u64,
    cpu_per_100k: f64,
    peak_rss: f64,
}

fn measure(
    t: &Target,
    lua: &Path,
    path: &str,
    conns: usize,
    dur: Duration,
    close: bool,
) -> Result<Run> {
    let cpu0 = t.proc_.as_ref().map(|p| p.cpu_secs()).unwrap_or(0.0);
    let (requests, rps, p50, p99, p999, errors) =
        wrk_with(lua, t.port, path, conns, dur, close, &t.headers)?;
    let cpu1 = t.proc_.as_ref().map(|p| p.cpu_secs()).unwrap_or(0.0);
    Ok(Run {
        rps,
        p50_ms: p50,
        p99_ms: p99,
        p999_ms: p999,
        requests,
        errors,
        cpu_per_100k: if requests > 0.0 {
            (cpu1 - cpu0) * 100_000.0 / requests
        } else {
            0.0
        },
        peak_rss: t.proc_.as_ref().map(|p| p.peak_rss_mib()).unwrap_or(0.0),
    })
}

/// A sticky cookie the canary proxy on `port` issued for a bucket of the main pool (blue):
/// ask until one comes back with a blue answer.
fn main_pool_cookie(port: u16) -> Result<String> {
    use std::io::{Read, Write};
    for _ in 0..200 {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
        write!(
            s,
            "GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
        )?;
        let mut r = String::new();
        s.read_to_string(&mut r)?;
        let cookie = r
            .lines()
            .find_map(|l| {
                l.strip_prefix("set-cookie: ")
                    .or_else(|| l.strip_prefix("Set-Cookie: "))
            })
            .and_then(|v| v.split(';').next())
            .map(str::to_string);
        if let (Some(c), true) = (cookie, r.contains("\"color\":\"blue\"")) {
            return Ok(c);
        }
    }
    bail!("no sticky cookie for the main pool from 127.0.0.1:{port}")
}

fn nginx_conf(dir: &Path, port: u16, upstream: u16, threads: usize, conns: usize) -> String {
    let rlimit = conns * 2 + 100;
    format!(
        "worker_processes {threads};\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/nginx-error.log warn;\nworker_rlimit_nofile {rlimit};\nevents {{ worker_connections {conns}; }}\nhttp {{\n  access_log off;\n  upstream app {{ server 127.0.0.1:{upstream}; keepalive 128; }}\n  server {{\n    listen 127.0.0.1:{port} backlog=4096;\n    keepalive_requests 1000000;\n    location / {{\n      proxy_pass http://app;\n      proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n      proxy_set_header Host $host;\n      proxy_set_header X-Real-IP $remote_addr;\n      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n      proxy_set_header X-Forwarded-Proto $scheme;\n      proxy_set_header X-Forwarded-Host $host;\n    }}\n  }}\n}}\n",
        d = dir.display()
    )
}

fn haproxy_conf(
    dir: &Path,
    port: u16,
    blue: u16,
    green: u16,
    threads: usize,
    conns: usize,
) -> String {
    format!(
        "global\n  nbthread {threads}\n  maxconn {conns}\n  stats socket {d}/haproxy.sock mode 600 level admin\ndefaults\n  mode http\n  timeout connect 2s\n  timeout client 60s\n  timeout server 60s\n  timeout http-keep-alive 75s\n  option http-keep-alive\n  http-reuse always\nfrontend fe\n  bind 127.0.0.1:{port}\n  maxconn {conns}\n  option forwardfor\n  http-request set-header X-Real-IP %[src]\n  http-request set-header X-Forwarded-Proto http\n  http-request set-header X-Forwarded-Host %[req.hdr(host)]\n  default_backend be\nbackend be\n  server blue 127.0.0.1:{blue}\n  server green 127.0.0.1:{green} disabled\n",
        d = dir.display()
    )
}

fn switchyard_conf(dir: &Path, port: u16, blue: u16, green: u16, threads: usize) -> String {
    format!(
        "listen: [{{addr: \"127.0.0.1:{port}\"}}]\nthreads: {threads}\ngrace_period: 2s\ncontrol: {{socket: \"{d}/switchyard.sock\"}}\nstate_file: \"{d}/state.json\"\nadmin: {{listen: \"off\"}}\naccess_log: \"off\"\nupstreams:\n  app:\n    pools:\n      blue: [\"127.0.0.1:{blue}\"]\n      green: [\"127.0.0.1:{green}\"]\n    active: blue\n    health: {{interval: 500ms, timeout: 400ms}}\nroutes: [{{path_prefix: /, upstream: app}}]\n",
        d = dir.display()
    )
}

fn version(cmd: &str, arg: &str) -> String {
    Command::new(cmd)
        .arg(arg)
        .output()
        .map(|o| {
            let t = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            t.lines().next().unwrap_or("").trim().to_string()
        })
        .unwrap_or_else(|_| "not installed".into())
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
            })
        })
        .unwrap_or_else(|| "unknown".into())
}

/// Raise the open-file limit for the 10k-connection scenario (children inherit it).
fn raise_nofile() -> u64 {
    let _ = rlimit::increase_nofile_limit(65_536);
    rlimit::getrlimit(rlimit::Resource::NOFILE)
        .map(|(soft, _)| soft)
        .unwrap_or(0)
}

struct Scenario {
    /// Short name for `--only`.
    key: &'static str,
    name: &'static str,
    path: &'static str,
    conns: usize,
    close: bool,
}

fn main() -> Result<()> {
    let o = parse_opts()?;
    let exe = std::env::current_exe()?;
    let bin_dir = exe.parent().context("exe dir")?.to_path_buf();
    let switchyard = bin_dir.join("switchyard");
    if !switchyard.exists() {
        bail!(
            "{} not found: build it first with `cargo build --release --workspace`",
            switchyard.display()
        );
    }
    if which("wrk").is_none() {
        bail!(
            "wrk is not installed: apt-get install -y wrk (the load generator every scenario uses)"
        );
    }
    let have_nginx = which("nginx").is_some();
    let have_haproxy = which("haproxy").is_some();
    if !have_nginx {
        eprintln!("nginx not found: its columns are skipped (apt-get install -y nginx-light)");
    }
    if !have_haproxy {
        eprintln!("haproxy not found: its columns are skipped (apt-get install -y haproxy)");
    }
    let nofile = raise_nofile();
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let lua = dir.join("report.lua");
    std::fs::write(&lua, WRK_LUA)?;

    // The origin: the same fake upstream the demo and the tests use, in its own process.
    let (blue_port, green_port) = (free_port(), free_port());
    let _blue = spawn(Command::new(&switchyard).args([
        "fake-upstream",
        "--listen",
        &format!("127.0.0.1:{blue_port}"),
        "--name",
        "blue",
        "--threads",
        "1",
    ]))?;
    let _green = spawn(Command::new(&switchyard).args([
        "fake-upstream",
        "--listen",
        &format!("127.0.0.1:{green_port}"),
        "--name",
        "green",
        "--threads",
        "1",
    ]))?;
    wait_port(blue_port, "fake upstream")?;
    wait_port(green_port, "fake upstream")?;

    // Connection caps the proxies are configured with, within the open-file limit (HAProxy
    // needs two descriptors per connection and refuses to start otherwise).
    let conns_cap = (nofile.saturating_sub(200) / 2).clamp(1024, 20_000) as usize;
    let mut targets = vec![Target {
        name: "direct",
        port: blue_port,
        proc_: None,
        headers: Vec::new(),
    }];
    let sy_port = free_port();
    let sy_dir = dir.join("switchyard");
    std::fs::create_dir_all(&sy_dir)?;
    std::fs::write(
        sy_dir.join("switchyard.yaml"),
        switchyard_conf(&sy_dir, sy_port, blue_port, green_port, o.threads),
    )?;
    targets.push(Target {
        name: "switchyard",
        port: sy_port,
        proc_: Some(Rc::new(spawn(
            Command::new(&switchyard)
                .arg("-c")
                .arg(sy_dir.join("switchyard.yaml"))
                .env("RUST_LOG", "error"),
        )?)),
        headers: Vec::new(),
    });
    wait_port(sy_port, "switchyard")?;
    let base_dir = dir.join("switchyard-baseline");
    if let Some(bin) = &o.baseline {
        let port = free_port();
        std::fs::create_dir_all(&base_dir)?;
        std::fs::write(
            base_dir.join("switchyard.yaml"),
            switchyard_conf(&base_dir, port, blue_port, green_port, o.threads),
        )?;
        targets.push(Target {
            name: "switchyard-baseline",
            port,
            proc_: Some(Rc::new(spawn(
                Command::new(bin)
                    .arg("-c")
                    .arg(base_dir.join("switchyard.yaml"))
                    .env("RUST_LOG", "error"),
            )?)),
            headers: Vec::new(),
        });
        wait_port(port, "switchyard-baseline")?;
    }
    let canary_dir = dir.join("switchyard-canary");
    if o.canary {
        let port = free_port();
        std::fs::create_dir_all(&canary_dir)?;
        std::fs::write(
            canary_dir.join("switchyard.yaml"),
            switchyard_conf(&canary_dir, port, blue_port, green_port, o.threads),
        )?;
        let p = Rc::new(spawn(
            Command::new(&switchyard)
                .arg("-c")
                .arg(canary_dir.join("switchyard.yaml"))
                .env("RUST_LOG", "error"),
        )?);
        wait_port(port, "switchyard-canary5")?;
        // Green must be healthy before it can get weight.
        let sock = canary_dir.join("switchyard.sock");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while let Err(e) = weight_switchyard(&sock, "green", 5) {
            if std::time::Instant::now() > deadline {
                bail!("cannot give green 5%: {e:#}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let cookie = main_pool_cookie(port)?;
        targets.push(Target {
            name: "switchyard-canary5",
            port,
            proc_: Some(p.clone()),
            headers: Vec::new(),
        });
        targets.push(Target {
            name: "switchyard-canary5-cookie",
            port,
            proc_: Some(p),
            headers: vec![format!("Cookie: {cookie}")],
        });
    }
    let ng_dir = dir.join("nginx");
    if have_nginx {
        let port = free_port();
        std::fs::create_dir_all(&ng_dir)?;
        std::fs::write(
            ng_dir.join("nginx.conf"),
            nginx_conf(&ng_dir, port, blue_port, o.threads, conns_cap),
        )?;
        targets.push(Target {
            name: "nginx",
            port,
            proc_: Some(Rc::new(spawn(
                Command::new("nginx")
                    .arg("-p")
                    .arg(&ng_dir)
                    .arg("-c")
                    .arg(ng_dir.join("nginx.conf")),
            )?)),
            headers: Vec::new(),
        });
        wait_port(port, "nginx")?;
    }
    let hp_dir = dir.join("haproxy");
    if have_haproxy {
        let port = free_port();
        std::fs::create_dir_all(&hp_dir)?;
        std::fs::write(
            hp_dir.join("haproxy.cfg"),
            haproxy_conf(&hp_dir, port, blue_port, green_port, o.threads, conns_cap),
        )?;
        targets.push(Target {
            name: "haproxy",
            port,
            proc_: Some(Rc::new(spawn(
                Command::new("haproxy")
                    .arg("-f")
                    .arg(hp_dir.join("haproxy.cfg")),
            )?)),
            headers: Vec::new(),
        });
        wait_port(port, "haproxy")?;
    }
    // Give switchyard's health checks time to see blue and green.
    std::thread::sleep(Duration::from_secs(2));
    let idle_rss: Vec<(String, f64)> = targets
        .iter()
        .filter_map(|t| t.proc_.as_ref().map(|p| (t.name.to_string(), p.rss_mib())))
        .collect();
    // Memory with many open, idle keep-alive clients (each made one request), measured before
    // any load so earlier allocations don't blur it.
    let idle_conns = 10_000.min(nofile.saturating_sub(500) as usize);
    let mut idle_open_rss = Vec::new();
    for t in targets
        .iter()
        .filter(|t| t.proc_.is_some() && o.idle && t.name != "switchyard-canary5-cookie")
    {
        eprintln!("[{idle_conns} idle connections] {}", t.name);
        match open_idle(t.port, idle_conns) {
            Ok(conns) => {
                std::thread::sleep(Duration::from_secs(1));
                let rss = t.proc_.as_ref().map(|p| p.rss_mib()).unwrap_or(0.0);
                idle_open_rss.push((t.name.to_string(), conns.len(), rss));
            }
            Err(e) => eprintln!("  failed: {e:#}"),
        }
        // Connections close here; give the proxy a moment to notice.
        std::thread::sleep(Duration::from_secs(2));
    }

    let scenarios = [
        Scenario {
            key: "small",
            name: "small responses, 64 keep-alive connections",
            path: "/hello",
            conns: 64,
            close: false,
        },
        Scenario {
            key: "64k",
            name: "64 KiB responses, 64 keep-alive connections",
            path: "/bytes?n=65536",
            conns: 64,
            close: false,
        },
        Scenario {
            key: "1k",
            name: "1k keep-alive connections",
            path: "/hello",
            conns: 1000,
            close: false,
        },
        Scenario {
            key: "10k",
            name: "10k keep-alive connections",
            path: "/hello",
            conns: 10_000,
            close: false,
        },
        Scenario {
            key: "close",
            name: "new connection per request (64 clients)",
            path: "/hello",
            conns: 64,
            close: true,
        },
    ];
    let mut results: Vec<Vec<Vec<Run>>> = vec![vec![Vec::new(); targets.len()]; scenarios.len()];
    for (si, sc) in scenarios.iter().enumerate() {
        if !o.only.is_empty() && !o.only.iter().any(|k| k == sc.key) {
            continue;
        }
        if sc.conns as u64 + 100 > nofile {
            eprintln!("skipping {:?}: open-file limit {nofile}", sc.name);
            continue;
        }
        for round in 0..o.rounds {
            for (ti, t) in targets.iter().enumerate() {
                eprintln!("[{}] round {} {}", sc.name, round + 1, t.name);
                match measure(t, &lua, sc.path, sc.conns, o.duration, sc.close) {
                    Ok(r) => results[si][ti].push(r),
                    Err(e) => eprintln!("  failed: {e:#}"),
                }
            }
        }
    }

    // The switch scenario.
    let mut switch_rows = Vec::new();
    for t in targets.iter().filter(|_| o.switch) {
        if t.name == "direct" || t.name.starts_with("switchyard-canary") {
            continue;
        }
        eprintln!("[switch] {}", t.name);
        let gap = o.duration.max(Duration::from_secs(10)) / (o.switches as u32 + 2);
        let port = t.port;
        let dur = o.duration.max(Duration::from_secs(10));
        let lua2 = lua.clone();
        let load = std::thread::spawn(move || wrk(&lua2, port, "/hello", 64, dur, false));
        std::thread::sleep(gap);
        let mut done = 0;
        for i in 0..o.switches {
            let to_green = i % 2 == 0;
            let ok = match t.name {
                "switchyard" => switch_switchyard(
                    &sy_dir.join("switchyard.sock"),
                    if to_green { "green" } else { "blue" },
                ),
                "switchyard-baseline" => switch_switchyard(
                    &base_dir.join("switchyard.sock"),
                    if to_green { "green" } else { "blue" },
                ),
                "nginx" => switch_nginx(
                    &ng_dir,
                    t.port,
                    if to_green { green_port } else { blue_port },
                    o.threads,
                    conns_cap,
                ),
                "haproxy" => switch_haproxy(&hp_dir.join("haproxy.sock"), to_green),
                _ => Ok(()),
            };
            match ok {
                Ok(()) => done += 1,
                Err(e) => eprintln!("  switch failed: {e:#}"),
            }
            std::thread::sleep(gap);
        }
        let (requests, rps, _, _, _, errors) = load.join().expect("wrk thread")?;
        switch_rows.push((t.name, done, requests, rps, errors));
    }

    let report = render(
        &o,
        &targets,
        &scenarios,
        &results,
        &switch_rows,
        &idle_rss,
        &idle_open_rss,
    );
    println!("{report}");
    if let Some(parent) = o.out.parent() {
        std::fs::create_dir_all(parent).ok();
    }
    std::fs::write(&o.out, &report).with_context(|| format!("writing {}", o.out.display()))?;
    eprintln!("written to {}", o.out.display());
    Ok(())
}

/// Open `n` keep-alive connections, each sending one request and reading its answer.
fn open_idle(port: u16, n: usize) -> Result<Vec<std::net::TcpStream>> {
    use std::io::{Read, Write};
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(b"GET /hello HTTP/1.1\r\nHost: bench\r\n\r\n")?;
        let mut buf = [0u8; 512];
        let mut got = Vec::new();
        while !got.ends_with(b"hello") {
            let k = s.read(&mut buf)?;
            if k == 0 {
                bail!("connection closed");
            }
            got.extend_from_slice(&buf[..k]);
        }
        conns.push(s);
    }
    Ok(conns)
}

fn switch_nginx(dir: &Path, port: u16, upstream: u16, threads: usize, conns: usize) -> Result<()> {
    // What the deploy scripts do: rewrite the config, reload.
    std::fs::write(
        dir.join("nginx.conf"),
        nginx_conf(dir, port, upstream, threads, conns),
    )?;
    let st = Command::new("nginx")
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .args(["-s", "reload"])
        .stderr(Stdio::null())
        .status()?;
    if !st.success() {
        bail!("nginx -s reload failed");
    }
    Ok(())
}

fn switch_haproxy(socket: &Path, to_green: bool) -> Result<()> {
    use std::io::{Read, Write};
    let (on, off) = if to_green {
        ("green", "blue")
    } else {
        ("blue", "green")
    };
    let mut s = std::os::unix::net::UnixStream::connect(socket)?;
    writeln!(
        s,
        "set server be/{on} state ready; set server be/{off} state maint"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    if out.trim().is_empty() {
        Ok(())
    } else {
        bail!("haproxy: {}", out.trim())
    }
}

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn render(
    o: &Opts,
    targets: &[Target],
    scenarios: &[Scenario],
    results: &[Vec<Vec<Run>>],
    switch_rows: &[(&str, usize, f64, f64, u64)],
    idle_rss: &[(String, f64)],
    idle_open: &[(String, usize, f64)],
) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# switchyard benchmarks\n");
    let _ = writeln!(
        s,
        "Generated by `loadbench` (benches/src/bin/loadbench.rs). Command:\n"
    );
    let _ = writeln!(
        s,
        "```sh\ncargo build --release --workspace && target/release/loadbench --duration {}s --rounds {} --threads {}\n```\n",
        o.duration.as_secs(),
        o.rounds,
        o.threads
    );
    let _ = writeln!(
        s,
        "Machine: {} ({} cores), {}.",
        cpu_model(),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        version("uname", "-sr")
    );
    let _ = writeln!(
        s,
        "Versions: switchyard {} (Pingora 0.9.1 with third_party/PATCHES.md, mimalloc), {}, {}, {}.\n",
        env!("CARGO_PKG_VERSION"),
        version("nginx", "-v"),
        version("haproxy", "-v"),
        version("wrk", "-v")
    );
    let _ = writeln!(s, "Every proxy: {} worker thread(s)/process(es), upstream keep-alive, X-Real-IP/X-Forwarded-For/-Proto/-Host set, access log off, on loopback in front of one `switchyard fake-upstream` process (1 thread). wrk: 1 thread (2 for 1k/10k connections), values are the median of {} interleaved round(s) of {} s. CPU is the proxy's user+system time (all its processes) per 100k requests; RSS is the peak (VmHWM) so far. The machine is shared and noisy: compare within a table, not across runs.\n", o.threads, o.rounds, o.duration.as_secs());
    for (si, sc) in scenarios.iter().enumerate() {
        let _ = writeln!(s, "## {}\n", sc.name);
        let _ = writeln!(s, "| target | req/s | vs nginx | p50 ms | p99 ms | p99.9 ms | CPU s / 100k req | peak RSS MiB | errors |");
        let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|---:|");
        let nginx_rps = targets
            .iter()
            .position(|t| t.name == "nginx")
            .map(|i| median(&mut results[si][i].iter().map(|r| r.rps).collect::<Vec<_>>()));
        for (ti, t) in targets.iter().enumerate() {
            let runs = &results[si][ti];
            if runs.is_empty() {
                continue;
            }
            let m = |f: fn(&Run) -> f64| median(&mut runs.iter().map(f).collect::<Vec<_>>());
            let rps = m(|r| r.rps);
            let ratio = nginx_rps
                .map(|n| format!("{:.2}x", rps / n))
                .unwrap_or_else(|| "-".into());
            let cpu = if t.proc_.is_some() {
                format!("{:.2}", m(|r| r.cpu_per_100k))
            } else {
                "-".into()
            };
            let rss = if t.proc_.is_some() {
                format!("{:.1}", m(|r| r.peak_rss))
            } else {
                "-".into()
            };
            let errors: u64 = runs.iter().map(|r| r.errors).sum();
            let _ = writeln!(
                s,
                "| {} | {:.0} | {} | {:.2} | {:.2} | {:.2} | {} | {} | {} |",
                t.name,
                rps,
                ratio,
                m(|r| r.p50_ms),
                m(|r| r.p99_ms),
                m(|r| r.p999_ms),
                cpu,
                rss,
                errors
            );
            let _ = m(|r| r.requests);
        }
        let _ = writeln!(s);
    }
    let _ = writeln!(
        s,
        "## {} blue/green switches during a wrk run (64 keep-alive connections)\n",
        o.switches
    );
    let _ = writeln!(
        s,
        "| target | how | switches done | requests | req/s | failed requests |"
    );
    let _ = writeln!(s, "|---|---|---:|---:|---:|---:|");
    for (name, done, requests, rps, errors) in switch_rows {
        let how = match *name {
            "switchyard" => "`proxyctl switch` (control socket)",
            "nginx" => "rewrite nginx.conf + `nginx -s reload`",
            "haproxy" => "runtime API `set server ... state`",
            _ => "",
        };
        let _ = writeln!(
            s,
            "| {name} | {how} | {done} | {requests:.0} | {rps:.0} | {errors} |"
        );
    }
    let _ = writeln!(s, "\n## Memory\n");
    let _ = writeln!(
        s,
        "| target | RSS at start MiB | RSS with open idle keep-alive clients MiB | clients |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|");
    for (name, rss) in idle_rss {
        let open = idle_open.iter().find(|(n, _, _)| n == name);
        let _ = writeln!(
            s,
            "| {name} | {rss:.1} | {} | {} |",
            open.map(|o| format!("{:.1}", o.2))
                .unwrap_or_else(|| "-".into()),
            open.map(|o| o.1.to_string()).unwrap_or_else(|| "-".into())
        );
    }
    let _ = writeln!(s, "\nPeak RSS in the tables above is under load: with 10k busy clients every proxy also holds up to 10k upstream connections and 10k requests in progress.\n");
    s
}
