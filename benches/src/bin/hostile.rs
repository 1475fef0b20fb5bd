//! `hostile`: the same hostile requests sent to nginx and to switchyard, side by side, with what
//! the app behind each received. Writes docs/RELIABILITY.md's table.
//!
//! ```sh
//! cargo build --release --workspace && target/release/hostile          # needs nginx-light
//! ```
//!
//! Both proxies run on loopback ports chosen at run time, in front of their own recording
//! upstream (in this process, raw sockets: it logs every request line and header it gets),
//! with the same deny rule (`(?i)/(actuator|\.aws)`). Each case is raw bytes on a fresh
//! connection; the answer is every status line read within 3 s (or until the proxy closes).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use anyhow::{bail, Context, Result};
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use switchyard_benches::{free_port, spawn, wait_port};

/// What an upstream received: one entry per request (request line, then header lines).
type Log = Arc<Mutex<Vec<String>>>;

/// A recording upstream: answers `200 ok` to everything (after 300 ms for `/slow`).
fn upstream() -> Result<(SocketAddr, Log)> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let log: Log = Arc::default();
    let log2 = log.clone();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let log = log2.clone();
            std::thread::spawn(move || serve(s, &log));
        }
    });
    Ok((addr, log))
}

fn serve(mut s: TcpStream, log: &Log) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            match s.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end);
        let lower = head.to_ascii_lowercase();
        // Skip the body (Content-Length, or a chunked body up to its last chunk).
        if let Some(n) = lower
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<usize>().ok())
        {
            while buf.len() < n {
                match s.read(&mut chunk) {
                    Ok(0) | Err(_) => return,
                    Ok(k) => buf.extend_from_slice(&chunk[..k]),
                }
            }
            buf.drain(..n);
        } else if lower.contains("transfer-encoding: chunked") {
            loop {
                if let Some(i) = buf.windows(5).position(|w| w == b"0\r\n\r\n") {
                    buf.drain(..i + 5);
                    break;
                }
                match s.read(&mut chunk) {
                    Ok(0) | Err(_) => return,
                    Ok(k) => buf.extend_from_slice(&chunk[..k]),
                }
            }
        }
        // Health checks are not what a client sent.
        if !head.starts_with("GET /actuator/health ") {
            log.lock().unwrap().push(head.trim_end().to_string());
        }
        if head.contains(" /slow") {
            std::thread::sleep(Duration::from_millis(300));
        }
        if s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            .is_err()
        {
            return;
        }
    }
}

/// Send `bytes` (then, with `half_close`, shut the sending side), read for up to 3 s (or
/// until closed): the status codes seen.
fn exchange(addr: SocketAddr, bytes: &[u8], half_close: bool) -> Vec<u16> {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return vec![];
    };
    let _ = s.write_all(bytes);
    if half_close {
        let _ = s.shutdown(std::net::Shutdown::Write);
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut got = Vec::new();
    let mut chunk = [0u8; 8192];
    while Instant::now() < deadline {
        let _ = s.set_read_timeout(Some(
            deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1)),
        ));
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&chunk[..n]),
        }
    }
    let text = String::from_utf8_lossy(&got);
    text.match_indices("HTTP/1.1 ")
        .filter_map(|(i, _)| text.get(i + 9..i + 12)?.parse().ok())
        .collect()
}

struct Case {
    name: &'static str,
    bytes: String,
    /// The client shuts its sending side after the bytes.
    half_close: bool,
    /// What to look for in the app's log to say what reached it.
    probe: Probe,
}

enum Probe {
    /// How many requests the app received.
    Count,
    /// Whether the app saw a header with this name (lower case).
    Header(&'static str),
    /// How many Content-Length headers the app saw.
    ContentLengths,
}

fn cases() -> Vec<Case> {
    let h = "Host: t\r\n";
    let mut v = Vec::new();
    let mut add = |name: &'static str, bytes: String, probe: Probe| {
        let half_close = name.ends_with(", then FIN");
        v.push(Case {
            name,
            bytes,
            half_close,
            probe,
        })
    };
    for t in [
        "x:/actuator/env",
        "foo:bar:/actuator/env",
        "a:/.aws/credentials",
        "*/actuator/env",
        "actuator/env",
        "?/actuator/env",
        "/static/../actuator/env",
        "//actuator//env",
        "/%2e%2e/actuator",
        "/%61ctuator/env",
    ] {
        let name: &'static str = Box::leak(format!("GET {t}").into_boxed_str());
        add(name, format!("GET {t} HTTP/1.1\r\n{h}\r\n"), Probe::Count);
    }
    add(
        "HTTP/1.1 without Host",
        "GET / HTTP/1.1\r\n\r\n".into(),
        Probe::Count,
    );
    add(
        "empty Host",
        "GET / HTTP/1.1\r\nHost:\r\n\r\n".into(),
        Probe::Count,
    );
    add(
        "absolute-form without Host",
        "GET http://t/ HTTP/1.1\r\n\r\n".into(),
        Probe::Count,
    );
    add(
        "two Host headers",
        "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n".into(),
        Probe::Count,
    );
    add(
        "Content-Length: 5 twice",
        format!("POST / HTTP/1.1\r\n{h}Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello"),
        Probe::ContentLengths,
    );
    add(
        "Content-Length: 5, 5",
        format!("POST / HTTP/1.1\r\n{h}Content-Length: 5, 5\r\n\r\nhello"),
        Probe::Count,
    );
    add(
        "Content-Length + Transfer-Encoding",
        format!("POST / HTTP/1.1\r\n{h}Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
        Probe::Count,
    );
    for te in [
        "identity, chunked",
        "gzip, chunked",
        "\tchunked",
        "chunked, chunked",
    ] {
        let name: &'static str =
            Box::leak(format!("Transfer-Encoding: {}", te.replace('\t', "<TAB>")).into_boxed_str());
        add(
            name,
            format!("POST / HTTP/1.1\r\n{h}Transfer-Encoding: {te}\r\n\r\n0\r\n\r\n"),
            Probe::Count,
        );
    }
    add(
        "bare LF in a chunk extension",
        format!(
            "POST / HTTP/1.1\r\n{h}Transfer-Encoding: chunked\r\n\r\n5;ext\nhello\r\n0\r\n\r\n"
        ),
        Probe::Count,
    );
    add(
        "NUL in the path",
        format!("GET /a\0b HTTP/1.1\r\n{h}\r\n"),
        Probe::Count,
    );
    add(
        "control byte in the path",
        format!("GET /a\x01b HTTP/1.1\r\n{h}\r\n"),
        Probe::Count,
    );
    add(
        "space in the path",
        format!("GET /a b HTTP/1.1\r\n{h}\r\n"),
        Probe::Count,
    );
    add(
        "X_Forwarded_For (underscores)",
        format!("GET / HTTP/1.1\r\n{h}X_Forwarded_For: 6.6.6.6\r\n\r\n"),
        Probe::Header("x_forwarded_for"),
    );
    for n in [2, 20, 50] {
        let name: &'static str = Box::leak(format!("{n} pipelined GETs").into_boxed_str());
        add(
            name,
            format!("GET / HTTP/1.1\r\n{h}\r\n").repeat(n),
            Probe::Count,
        );
    }
    add(
        "POST /slow then a pipelined GET",
        format!("POST /slow HTTP/1.1\r\n{h}Content-Length: 2\r\n\r\nhiGET / HTTP/1.1\r\n{h}\r\n"),
        Probe::Count,
    );
    add(
        "2 pipelined GETs, then FIN",
        format!("GET /1 HTTP/1.1\r\n{h}\r\nGET /slow HTTP/1.1\r\n{h}\r\n"),
        Probe::Count,
    );
    add(
        "GET /slow, then FIN",
        format!("GET /slow HTTP/1.1\r\n{h}\r\n"),
        Probe::Count,
    );
    v
}

fn nginx_conf(dir: &Path, port: u16, up: SocketAddr) -> String {
    format!(
        "worker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\nevents {{ worker_connections 1024; }}\nhttp {{\n  access_log off;\n  upstream app {{ server {up}; keepalive 16; }}\n  server {{\n    listen 127.0.0.1:{port};\n    location ~* /(actuator|\\.aws) {{ return 403; }}\n    location / {{\n      proxy_pass http://app;\n      proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n      proxy_set_header Host $host;\n      proxy_set_header X-Real-IP $remote_addr;\n      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n    }}\n  }}\n}}\n",
        d = dir.display()
    )
}

fn switchyard_conf(dir: &Path, port: u16, up: SocketAddr) -> String {
    format!(
        "listen: [{{addr: \"127.0.0.1:{port}\"}}]\nthreads: 1\ncontrol: {{socket: \"{d}/c.sock\"}}\nstate_file: \"{d}/s.json\"\nadmin: {{listen: \"off\"}}\naccess_log: \"off\"\nupstreams:\n  app:\n    pools:\n      blue: [\"{up}\"]\n    active: blue\n    health: {{interval: 60s, timeout: 1s}}\nroutes: [{{path_prefix: /, upstream: app}}]\ndeny:\n  paths: [\"(?i)/(actuator|\\\\.aws)\"]\n",
        d = dir.display()
    )
}

fn what_reached(log: &Log, before: usize, probe: &Probe) -> String {
    let entries: Vec<String> = log.lock().unwrap()[before..].to_vec();
    match probe {
        Probe::Count => match entries.len() {
            0 => "nothing".into(),
            1 => format!("`{}`", entries[0].lines().next().unwrap_or("")),
            n => format!("{n} requests"),
        },
        Probe::Header(h) => {
            let seen = entries.iter().any(|e| {
                e.to_ascii_lowercase()
                    .lines()
                    .any(|l| l.starts_with(&format!("{h}:")))
            });
            if entries.is_empty() {
                "nothing".into()
            } else if seen {
                format!("the request, with `{h}`")
            } else {
                format!("the request, without `{h}`")
            }
        }
        Probe::ContentLengths => {
            let n = entries
                .iter()
                .map(|e| e.to_ascii_lowercase().matches("content-length:").count())
                .max()
                .unwrap_or(0);
            if entries.is_empty() {
                "nothing".into()
            } else {
                format!("the request, {n} Content-Length header(s)")
            }
        }
    }
}

fn main() -> Result<()> {
    let exe = std::env::current_exe()?;
    let switchyard = exe.parent().context("exe dir")?.join("switchyard");
    if !switchyard.exists() {
        bail!(
            "{} not found: cargo build --release --workspace",
            switchyard.display()
        );
    }
    let out = std::env::args()
        .skip_while(|a| a != "--out")
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("docs/RELIABILITY.md"));
    let tmp = tempfile::tempdir()?;
    let (sy_up, sy_log) = upstream()?;
    let (ng_up, ng_log) = upstream()?;
    let sy_port = free_port();
    std::fs::write(
        tmp.path().join("s.yaml"),
        switchyard_conf(tmp.path(), sy_port, sy_up),
    )?;
    let _sy = spawn(
        Command::new(&switchyard)
            .arg("-c")
            .arg(tmp.path().join("s.yaml"))
            .env("RUST_LOG", "error"),
    )?;
    wait_port(sy_port, "switchyard")?;
    let ng_port = free_port();
    let nginx = Command::new("nginx").arg("-v").output().is_ok();
    let _ng = if nginx {
        std::fs::write(
            tmp.path().join("nginx.conf"),
            nginx_conf(tmp.path(), ng_port, ng_up),
        )?;
        let c = spawn(
            Command::new("nginx")
                .args(["-p", &tmp.path().display().to_string(), "-c"])
                .arg(tmp.path().join("nginx.conf")),
        )?;
        wait_port(ng_port, "nginx")?;
        Some(c)
    } else {
        eprintln!("nginx not found: its column is left empty (apt-get install -y nginx-light)");
        None
    };
    let mut table = String::new();
    let _ = writeln!(
        table,
        "| case | nginx | app behind nginx got | switchyard | app behind switchyard got |"
    );
    let _ = writeln!(table, "|---|---|---|---|---|");
    for c in cases() {
        let fmt = |v: &[u16]| {
            if v.is_empty() {
                "closed, no answer".to_string()
            } else {
                v.iter()
                    .map(|s| s.to_string())
                    .collect::<Vec<_>>()
                    .join(" ")
            }
        };
        let (ng, ng_got) = if nginx {
            let before = ng_log.lock().unwrap().len();
            let r = exchange(
                SocketAddr::from(([127, 0, 0, 1], ng_port)),
                c.bytes.as_bytes(),
                c.half_close,
            );
            (fmt(&r), what_reached(&ng_log, before, &c.probe))
        } else {
            ("-".into(), "-".into())
        };
        let before = sy_log.lock().unwrap().len();
        let r = exchange(
            SocketAddr::from(([127, 0, 0, 1], sy_port)),
            c.bytes.as_bytes(),
            c.half_close,
        );
        let sy_got = what_reached(&sy_log, before, &c.probe);
        let _ = writeln!(
            table,
            "| {} | {ng} | {ng_got} | {} | {sy_got} |",
            c.name.replace('|', "\\|"),
            fmt(&r)
        );
    }
    println!("{table}");
    let doc = std::fs::read_to_string(&out).unwrap_or_default();
    let begin = "<!-- hostile:begin -->";
    let end = "<!-- hostile:end -->";
    let block = format!("{begin}\n{table}{end}");
    let doc = match (doc.find(begin), doc.find(end)) {
        (Some(a), Some(b)) if b > a => format!("{}{block}{}", &doc[..a], &doc[b + end.len()..]),
        _ => format!("{doc}\n{block}\n"),
    };
    std::fs::write(&out, doc)?;
    eprintln!("table written to {}", out.display());
    Ok(())
}
