//! `upgradebench`: upgrading the proxy binary under load, switchyard next to nginx.
//!
//! ```text
//! cargo build --release --workspace && target/release/upgradebench [--upgrades 5] [--duration 20s]
//!     [--out docs/BENCHMARKS-upgrade.md]
//! ```
//!
//! Each proxy runs in front of the fake upstream while two wrk loads run for `--duration`:
//! 64 keep-alive connections, and 8 clients opening a new connection for every request
//! (`Connection: close`), so refused connections show. Meanwhile the binary is upgraded
//! `--upgrades` times, evenly spread:
//! - switchyard: `switchyard --upgrade -c FILE` (socket handover, SPEC §10);
//! - nginx: its documented binary upgrade, `kill -USR2 <master>` (a new master from the binary
//!   on disk, sharing the listening sockets), then `kill -QUIT <old master>` once the new one
//!   runs.
//!
//! Reported per proxy: requests, failed requests by kind as wrk counts them (connect = refused
//! or reset while connecting; read/write/timeout; non-2xx), and the time from the upgrade
//! command to the old process's exit — under the load, and once more with a 3 s request in
//! flight on the old process. A separate binary from `loadbench`: an upgrade replaces the
//! measured process, which loadbench's per-process CPU accounting cannot follow.

use anyhow::{bail, Context, Result};
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use switchyard_benches::{free_port, spawn, wait_port, which, WRK_LUA};

struct Opts {
    upgrades: usize,
    duration: Duration,
    out: PathBuf,
}

fn parse_opts() -> Result<Opts> {
    let mut o = Opts {
        upgrades: 5,
        duration: Duration::from_secs(20),
        out: PathBuf::from("docs/BENCHMARKS-upgrade.md"),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--upgrades" => o.upgrades = args.next().context("--upgrades N")?.parse()?,
            "--duration" => {
                o.duration = humantime::parse_duration(&args.next().context("--duration D")?)?
            }
            "--out" => o.out = args.next().context("--out FILE")?.into(),
            _ => bail!("upgradebench [--upgrades 5] [--duration 20s] [--out FILE]"),
        }
    }
    Ok(o)
}

/// wrk's counts: requests, connect, read, write, timeout, non-2xx.
#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    requests: u64,
    connect: u64,
    read: u64,
    write: u64,
    timeout: u64,
    status: u64,
}

impl Counts {
    fn add(self, o: Counts) -> Counts {
        Counts {
            requests: self.requests + o.requests,
            connect: self.connect + o.connect,
            read: self.read + o.read,
            write: self.write + o.write,
            timeout: self.timeout + o.timeout,
            status: self.status + o.status,
        }
    }
    fn failed(&self) -> u64 {
        self.connect + self.read + self.write + self.timeout + self.status
    }
}

fn wrk(lua: &Path, port: u16, conns: usize, dur: Duration, close: bool) -> Result<Counts> {
    let f = switchyard_benches::wrk_fields(lua, port, "/hello", conns, dur, close, &[])?;
    Ok(Counts {
        requests: f[0] as u64,
        connect: f[5] as u64,
        read: f[6] as u64,
        write: f[7] as u64,
        timeout: f[8] as u64,
        status: f[9] as u64,
    })
}

fn alive(pid: u32) -> bool {
    // A zombie (exited, not yet reaped by its parent) counts as gone.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}

fn wait_gone(pid: u32, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    while alive(pid) {
        if Instant::now() > deadline {
            bail!("pid {pid} still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

fn kill(sig: &str, pid: u32) -> Result<()> {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()?
        .success();
    if !ok {
        bail!("kill {sig} {pid} failed");
    }
    Ok(())
}

/// A proxy whose binary can be upgraded: returns the old process's pid and how long it took
/// until it was gone.
trait Upgradable {
    fn upgrade(&mut self) -> Result<Duration>;
    fn stop(&mut self);
}

struct Switchyard {
    bin: PathBuf,
    cfg: PathBuf,
    current: std::process::Child,
}

impl Upgradable for Switchyard {
    fn upgrade(&mut self) -> Result<Duration> {
        let start = Instant::now();
        let new = Command::new(&self.bin)
            .arg("--upgrade")
            .arg("-c")
            .arg(&self.cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let mut old = std::mem::replace(&mut self.current, new);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = old.try_wait()? {
                if !status.success() {
                    bail!("the old switchyard exited with {status}");
                }
                return Ok(start.elapsed());
            }
            if let Some(status) = self.current.try_wait()? {
                bail!("the new switchyard exited with {status}");
            }
            if Instant::now() > deadline {
                bail!("the old switchyard did not exit");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    fn stop(&mut self) {
        let _ = kill("-TERM", self.current.id());
        let _ = self.current.wait();
    }
}

struct Nginx {
    dir: PathBuf,
}

impl Nginx {
    fn master(&self) -> Result<u32> {
        let pid = std::fs::read_to_string(self.dir.join("nginx.pid"))?;
        Ok(pid.trim().parse()?)
    }
}

impl Upgradable for Nginx {
    fn upgrade(&mut self) -> Result<Duration> {
        let old = self.master()?;
        let start = Instant::now();
        kill("-USR2", old)?;
        // The new master writes nginx.pid (the old one's moves to nginx.pid.oldbin).
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(new) = self.master() {
                if new != old && alive(new) {
                    break;
                }
            }
            if Instant::now() > deadline {
                bail!("no new nginx master");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        kill("-QUIT", old)?;
        wait_gone(old, Duration::from_secs(60))?;
        Ok(start.elapsed())
    }
    fn stop(&mut self) {
        if let Ok(pid) = self.master() {
            let _ = kill("-QUIT", pid);
            let _ = wait_gone(pid, Duration::from_secs(10));
        }
    }
}

/// A request that takes `ms` on the upstream, sent now on its own connection; the thread
/// returns its status line.
fn slow_request(port: u16, ms: u64) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
            return "connect failed".into();
        };
        let _ = s.write_all(
            format!("GET /slow?ms={ms} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        );
        let mut got = String::new();
        let _ = s.read_to_string(&mut got);
        got.lines().next().unwrap_or("no answer").to_string()
    })
}

struct Row {
    name: &'static str,
    upgrades: usize,
    counts: Counts,
    times: Vec<Duration>,
    with_inflight: Option<(Duration, String)>,
}

fn run(name: &'static str, p: &mut dyn Upgradable, port: u16, lua: &Path, o: &Opts) -> Result<Row> {
    let dur = o.duration;
    let (l1, l2) = (lua.to_path_buf(), lua.to_path_buf());
    let ka = std::thread::spawn(move || wrk(&l1, port, 64, dur, false));
    let fresh = std::thread::spawn(move || wrk(&l2, port, 8, dur, true));
    let gap = dur / (o.upgrades as u32 + 1);
    let mut times = Vec::new();
    for _ in 0..o.upgrades {
        std::thread::sleep(gap);
        match p.upgrade() {
            Ok(t) => times.push(t),
            Err(e) => eprintln!("  {name}: upgrade failed: {e:#}"),
        }
    }
    let counts = ka
        .join()
        .expect("wrk thread")?
        .add(fresh.join().expect("wrk thread")?);
    // Once more, idle but for one 3 s request on the old process.
    let slow = slow_request(port, 3000);
    std::thread::sleep(Duration::from_millis(300));
    let with_inflight = match p.upgrade() {
        Ok(t) => Some((t, slow.join().unwrap_or_default())),
        Err(e) => {
            eprintln!("  {name}: upgrade with a request in flight failed: {e:#}");
            None
        }
    };
    Ok(Row {
        name,
        upgrades: times.len(),
        counts,
        times,
        with_inflight,
    })
}

fn ms(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1000.0)
}

fn main() -> Result<()> {
    let o = parse_opts()?;
    let exe = std::env::current_exe()?;
    let switchyard = exe.parent().context("exe dir")?.join("switchyard");
    if !switchyard.exists() {
        bail!("build first: cargo build --release --workspace");
    }
    if which("wrk").is_none() {
        bail!("wrk is not installed: apt-get install -y wrk");
    }
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let lua = dir.join("report.lua");
    std::fs::write(&lua, WRK_LUA)?;
    let up = free_port();
    let _upstream = spawn(Command::new(&switchyard).args([
        "fake-upstream",
        "--listen",
        &format!("127.0.0.1:{up}"),
        "--threads",
        "1",
    ]))?;
    wait_port(up, "fake upstream")?;
    let mut rows = Vec::new();

    // switchyard
    {
        let port = free_port();
        let cfg = dir.join("switchyard.yaml");
        std::fs::write(
            &cfg,
            format!(
                "listen: [{{addr: \"127.0.0.1:{port}\"}}]\nthreads: 1\ngrace_period: 30s\ncontrol: {{socket: \"{d}/sy.sock\"}}\nstate_file: \"{d}/state.json\"\nadmin: {{listen: \"off\"}}\naccess_log: \"off\"\nupstreams:\n  app:\n    pools:\n      blue: [\"127.0.0.1:{up}\"]\n    active: blue\nroutes: [{{path_prefix: /, upstream: app}}]\n",
                d = dir.display()
            ),
        )?;
        let current = Command::new(&switchyard)
            .arg("-c")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        wait_port(port, "switchyard")?;
        let mut sy = Switchyard {
            bin: switchyard.clone(),
            cfg,
            current,
        };
        eprintln!("[switchyard] {} upgrades under load", o.upgrades);
        let row = run("switchyard", &mut sy, port, &lua, &o);
        sy.stop();
        rows.push(row?);
    }
    // nginx
    match which("nginx") {
        None => eprintln!("nginx not found: skipped (apt-get install -y nginx-light)"),
        Some(nginx) => {
            let port = free_port();
            let ndir = dir.join("nginx");
            std::fs::create_dir_all(&ndir)?;
            let conf = ndir.join("nginx.conf");
            std::fs::write(
                &conf,
                format!(
                    "worker_processes 1;\ndaemon on;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\nevents {{ worker_connections 4096; }}\nhttp {{\n  access_log off;\n  upstream app {{ server 127.0.0.1:{up}; keepalive 128; }}\n  server {{\n    listen 127.0.0.1:{port} backlog=4096;\n    keepalive_requests 1000000;\n    location / {{\n      proxy_pass http://app;\n      proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n    }}\n  }}\n}}\n",
                    d = ndir.display()
                ),
            )?;
            // The absolute path: USR2 re-executes argv[0].
            let ok = Command::new(&nginx)
                .arg("-c")
                .arg(&conf)
                .arg("-p")
                .arg(&ndir)
                .status()?
                .success();
            if !ok {
                bail!("nginx did not start");
            }
            wait_port(port, "nginx")?;
            let mut ng = Nginx { dir: ndir };
            eprintln!("[nginx] {} upgrades under load", o.upgrades);
            let row = run("nginx", &mut ng, port, &lua, &o);
            ng.stop();
            rows.push(row?);
        }
    }

    let mut md = String::new();
    let _ = writeln!(
        md,
        "# Upgrading the proxy binary under load\n\n`target/release/upgradebench --upgrades {} --duration {}s` ({}).\nLoad: wrk, 64 keep-alive connections plus 8 clients with a new connection per request,\nfor {} s, with the binary upgraded {} times, evenly spread. switchyard: `switchyard --upgrade`;\nnginx: `kill -USR2` then `kill -QUIT` the old master. Failed requests as wrk counts them\n(connect: refused or reset while connecting).\n",
        o.upgrades,
        o.duration.as_secs(),
        std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|c| c
                .lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string()))
            .unwrap_or_default(),
        o.duration.as_secs(),
        o.upgrades
    );
    let _ = writeln!(md, "| proxy | upgrades | requests | failed | connect | read | write | timeout | non-2xx | upgrade → old process gone, ms (each) | with a 3 s request in flight |");
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        let c = r.counts;
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.name,
            r.upgrades,
            c.requests,
            c.failed(),
            c.connect,
            c.read,
            c.write,
            c.timeout,
            c.status,
            r.times
                .iter()
                .map(|t| ms(*t))
                .collect::<Vec<_>>()
                .join(", "),
            r.with_inflight
                .as_ref()
                .map(|(t, s)| format!("{} ms ({s})", ms(*t)))
                .unwrap_or_else(|| "-".into())
        );
    }
    println!("{md}");
    if let Some(parent) = o.out.parent() {
        std::fs::create_dir_all(parent).ok();
    }
    std::fs::write(&o.out, &md).with_context(|| format!("writing {}", o.out.display()))?;
    eprintln!("written to {}", o.out.display());
    Ok(())
}
