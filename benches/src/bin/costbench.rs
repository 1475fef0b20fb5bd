//! `costbench`: instructions and heap allocations per proxied request (issue 14), for
//! switchyard, the smallest Pingora proxy (`proxy/examples/minimal_pingora.rs`) and nginx,
//! counted exactly by valgrind's callgrind rather than timed (this machine is shared and noisy;
//! counts are not).
//!
//! ```sh
//! apt-get install -y valgrind nginx-light
//! cargo build --release --workspace --bins --examples && target/release/costbench   # ~2 min
//! target/release/costbench --requests 1000,3000 --out docs/BENCHMARKS-cost.md
//! ```
//!
//! Each proxy runs alone under `valgrind --tool=callgrind` (one worker thread, upstream
//! keep-alive, no access log) in front of the same fake upstream (not under valgrind). One
//! keep-alive client sends N small GETs one after the other; the proxy is stopped and
//! callgrind's totals read. The same for a second N: per request = difference / difference of
//! N, so start-up, the first connections and shutdown cancel out. Allocations are calls to the
//! allocator's entry points: mimalloc's `mi_malloc_aligned`, `mi_zalloc_aligned`,
//! `mi_realloc_aligned` (Rust's global allocator in both Rust proxies) and libc's `malloc`,
//! `calloc`, `realloc`, `posix_memalign`, `memalign`, `aligned_alloc` (nginx, and C code in the
//! Rust proxies). nginx's own pool allocations (`ngx_palloc` inside a pool) are not heap
//! allocations and are not counted, as in any heap profile of nginx.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use switchyard_benches::{free_port, which};

/// The allocator entry points counted.
const ALLOC_FNS: [&str; 9] = [
    "mi_malloc_aligned",
    "mi_zalloc_aligned",
    "mi_realloc_aligned",
    "malloc",
    "calloc",
    "realloc",
    "posix_memalign",
    "memalign",
    "aligned_alloc",
];

/// Totals of one callgrind run.
#[derive(Debug, Clone, Copy, Default)]
struct Counted {
    instructions: u64,
    allocations: u64,
}

/// Read a callgrind output written with `--compress-strings=no`: the total instructions and
/// the calls to the allocator's entry points.
fn parse_callgrind(path: &Path) -> Result<Counted> {
    let f = std::fs::File::open(path).with_context(|| format!("{}", path.display()))?;
    let mut out = Counted::default();
    let mut callee: Option<String> = None;
    let mut calls: HashMap<String, u64> = HashMap::new();
    for line in std::io::BufReader::new(f).lines() {
        let line = line?;
        if let Some(rest) = line.strip_prefix("cfn=") {
            callee = Some(rest.trim().to_string());
        } else if let Some(rest) = line.strip_prefix("calls=") {
            if let (Some(c), Some(n)) = (
                callee.as_ref(),
                rest.split_whitespace()
                    .next()
                    .and_then(|n| n.parse::<u64>().ok()),
            ) {
                *calls.entry(c.clone()).or_default() += n;
            }
        } else if let Some(rest) = line
            .strip_prefix("summary:")
            .or_else(|| line.strip_prefix("totals:"))
        {
            if let Some(n) = rest
                .split_whitespace()
                .next()
                .and_then(|n| n.parse::<u64>().ok())
            {
                out.instructions = out.instructions.max(n);
            }
        }
    }
    out.allocations = calls
        .iter()
        .filter(|(name, _)| {
            // "malloc" or "malloc'2" (callgrind's recursion suffix), not "malloc_consolidate".
            let base = name.split('\'').next().unwrap_or(name);
            ALLOC_FNS.contains(&base)
        })
        .map(|(_, n)| n)
        .sum();
    Ok(out)
}

/// `n` small GETs, one after the other, on one keep-alive connection.
fn drive(port: u16, n: usize) -> Result<()> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.set_nodelay(true)?;
    let req = b"GET /hello HTTP/1.1\r\nHost: bench\r\n\r\n";
    let mut buf = vec![0u8; 64 * 1024];
    for i in 0..n {
        s.write_all(req)?;
        // Read one whole response: head, then Content-Length bytes.
        let mut have = 0usize;
        loop {
            let r = s.read(&mut buf[have..])?;
            if r == 0 {
                bail!("connection closed after {i} responses");
            }
            have += r;
            if let Some(end) = buf[..have].windows(4).position(|w| w == b"\r\n\r\n") {
                let head = std::str::from_utf8(&buf[..end]).unwrap_or("");
                if !head.starts_with("HTTP/1.1 200") {
                    bail!("request {i}: {}", head.lines().next().unwrap_or(""));
                }
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse().ok())?
                    })
                    .context("no Content-Length")?;
                if have >= end + 4 + len {
                    break;
                }
            }
        }
    }
    Ok(())
}

fn wait_port(port: u16, child: &mut Child, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(st) = child.try_wait()? {
            bail!("{what} exited ({st}) before listening");
        }
        if Instant::now() > deadline {
            bail!("{what} did not listen on {port} within 120 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// One proxy under callgrind for `n` requests.
fn run_one(
    name: &str,
    cmd: &[String],
    port: u16,
    stop_signal: &str,
    n: usize,
    dir: &Path,
) -> Result<Counted> {
    let out = dir.join(format!("callgrind.{name}.{n}"));
    let mut child = Command::new("valgrind")
        .arg("--tool=callgrind")
        .arg(format!("--callgrind-out-file={}", out.display()))
        .args([
            "--compress-strings=no",
            "--compress-pos=no",
            "--dump-line=no",
        ])
        .args(cmd)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("valgrind (apt-get install valgrind)")?;
    wait_port(port, &mut child, name)?;
    // The first connection and request warm up (lazy initialisation, the upstream connect).
    drive(port, 1)?;
    drive(port, n)?;
    let _ = Command::new("kill")
        .args([stop_signal, &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("{name} did not exit");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // A multi-threaded program writes one file per thread with --separate-threads; without
    // it, one file.
    parse_callgrind(&out)
}

fn main() -> Result<()> {
    let mut requests = (1000usize, 3000usize);
    let mut out_path: Option<PathBuf> = Some(PathBuf::from("docs/BENCHMARKS-cost.md"));
    let mut keep: Option<PathBuf> = None;
    let mut switchyard_bin: Option<PathBuf> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--requests" => {
                let v = args.next().context("--requests N1,N2")?;
                let (a, b) = v.split_once(',').context("--requests N1,N2")?;
                requests = (a.parse()?, b.parse()?);
                if requests.1 <= requests.0 {
                    bail!("--requests: N2 must be larger than N1");
                }
            }
            "--out" => out_path = Some(PathBuf::from(args.next().context("--out FILE")?)),
            "--no-out" => out_path = None,
            // Keep the callgrind files (for `callgrind_annotate`).
            "--keep" => keep = Some(PathBuf::from(args.next().context("--keep DIR")?)),
            // Another switchyard build to count (e.g. one built with other profile settings).
            "--switchyard" => {
                switchyard_bin = Some(PathBuf::from(args.next().context("--switchyard PATH")?))
            }
            "-h" | "--help" => {
                println!(
                    "costbench [--requests 1000,3000] [--out docs/BENCHMARKS-cost.md | --no-out] [--keep DIR] [--switchyard PATH]"
                );
                return Ok(());
            }
            other => bail!("unknown argument {other:?}"),
        }
    }
    if which("valgrind").is_none() {
        bail!("valgrind not found: apt-get install -y valgrind");
    }
    let exe = std::env::current_exe()?;
    let bin = exe.parent().context("binary dir")?;
    let switchyard = switchyard_bin.unwrap_or_else(|| bin.join("switchyard"));
    let minimal = bin.join("examples/minimal_pingora");
    for b in [&switchyard, &minimal] {
        if !b.is_file() {
            bail!(
                "{} not found: cargo build --release --workspace --bins --examples",
                b.display()
            );
        }
    }
    let tmp = tempfile::tempdir()?;
    let dir = match &keep {
        Some(k) => {
            std::fs::create_dir_all(k)?;
            k.clone()
        }
        None => tmp.path().to_path_buf(),
    };
    let dir = dir.as_path();
    let up_port = free_port();
    let mut upstream = Command::new(&switchyard)
        .args(["fake-upstream", "--listen", &format!("127.0.0.1:{up_port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    wait_port(up_port, &mut upstream, "fake upstream")?;

    let mut rows: Vec<(String, Counted, Counted)> = Vec::new();
    // switchyard
    {
        let port = free_port();
        let d = dir.join("sy");
        std::fs::create_dir_all(&d)?;
        let yaml = format!(
            "listen: [{{addr: \"127.0.0.1:{port}\"}}]\nthreads: 1\ngrace_period: 1s\ncontrol: {{socket: \"{d}/control.sock\"}}\nadmin: {{listen: \"off\"}}\nstate_file: \"{d}/state.json\"\naccess_log: \"off\"\nupstreams:\n  app:\n    pools:\n      blue: [\"127.0.0.1:{up_port}\"]\n    health: {{interval: 10s}}\nroutes: [{{path_prefix: /, upstream: app}}]\n",
            d = d.display()
        );
        std::fs::write(d.join("switchyard.yaml"), yaml)?;
        let cmd = vec![
            switchyard.display().to_string(),
            "-c".into(),
            d.join("switchyard.yaml").display().to_string(),
            "--log-level".into(),
            "error".into(),
        ];
        let a = run_one("switchyard", &cmd, port, "-INT", requests.0, dir)?;
        let b = run_one("switchyard", &cmd, port, "-INT", requests.1, dir)?;
        rows.push(("switchyard".into(), a, b));
    }
    // the smallest Pingora proxy
    {
        let port = free_port();
        let cmd = vec![
            minimal.display().to_string(),
            format!("127.0.0.1:{port}"),
            format!("127.0.0.1:{up_port}"),
        ];
        let a = run_one("minimal-pingora", &cmd, port, "-INT", requests.0, dir)?;
        let b = run_one("minimal-pingora", &cmd, port, "-INT", requests.1, dir)?;
        rows.push(("minimal Pingora proxy".into(), a, b));
    }
    // nginx, one process (no master), the same forwarding headers as switchyard sends
    let nginx = which("nginx");
    if let Some(nginx) = &nginx {
        let port = free_port();
        let d = dir.join("ng");
        std::fs::create_dir_all(&d)?;
        let conf = format!(
            "master_process off;\ndaemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log error;\nevents {{ worker_connections 1024; }}\nhttp {{\n  access_log off;\n  upstream app {{ server 127.0.0.1:{up_port}; keepalive 128; }}\n  server {{\n    listen 127.0.0.1:{port};\n    keepalive_requests 1000000;\n    location / {{\n      proxy_pass http://app;\n      proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n      proxy_set_header Host $host;\n      proxy_set_header X-Real-IP $remote_addr;\n      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n      proxy_set_header X-Forwarded-Proto $scheme;\n      proxy_set_header X-Forwarded-Host $host;\n    }}\n  }}\n}}\n",
            d = d.display()
        );
        std::fs::write(d.join("nginx.conf"), conf)?;
        let cmd = vec![
            nginx.display().to_string(),
            "-p".into(),
            d.display().to_string(),
            "-c".into(),
            d.join("nginx.conf").display().to_string(),
        ];
        let a = run_one("nginx", &cmd, port, "-QUIT", requests.0, dir)?;
        let b = run_one("nginx", &cmd, port, "-QUIT", requests.1, dir)?;
        rows.push(("nginx".into(), a, b));
    }
    let _ = upstream.kill();
    let _ = upstream.wait();

    let n = (requests.1 - requests.0) as f64;
    let per = |a: &Counted, b: &Counted| {
        (
            (b.instructions.saturating_sub(a.instructions)) as f64 / n,
            (b.allocations.saturating_sub(a.allocations)) as f64 / n,
        )
    };
    let nginx_ins = rows
        .iter()
        .find(|r| r.0 == "nginx")
        .map(|r| per(&r.1, &r.2).0);
    let mut md = String::new();
    md.push_str("# Instructions and heap allocations per request\n\n");
    md.push_str(&format!(
        "Generated by `target/release/costbench --requests {},{}` (valgrind callgrind; counts, not timings). One small keep-alive GET at a time through each proxy (one worker, upstream keep-alive, no access log) to the same fake upstream; per request = (run of {} requests − run of {}) / {}.\n\n",
        requests.0, requests.1, requests.1, requests.0, requests.1 - requests.0
    ));
    md.push_str("| proxy | instructions / request | vs nginx | heap allocations / request |\n|---|---:|---:|---:|\n");
    for (name, a, b) in &rows {
        let (ins, allocs) = per(a, b);
        let ratio = nginx_ins
            .filter(|n| *n > 0.0)
            .map(|n| format!("{:.2}x", ins / n))
            .unwrap_or_else(|| "-".into());
        md.push_str(&format!(
            "| {name} | {:.0} | {ratio} | {:.1} |\n",
            ins, allocs
        ));
    }
    if nginx.is_none() {
        md.push_str("\nnginx not installed: no nginx row (apt-get install nginx-light).\n");
    }
    print!("{md}");
    if let Some(p) = out_path {
        std::fs::write(&p, &md)?;
        eprintln!("written to {}", p.display());
    }
    Ok(())
}
