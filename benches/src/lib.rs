//! switchyard benchmarks. `cargo bench -p switchyard-benches` runs the criterion
//! micro-benchmarks of the request hot path (`benches/hot_path.rs`); the binaries compare
//! switchyard with nginx and HAProxy (`loadbench`), send hostile requests to both (`hostile`),
//! and run an hour of load with switches and reloads (`soak`). This library holds what they
//! share: processes under test, wrk runs, a switch over the control socket.

#![allow(clippy::unwrap_used, missing_docs, unreachable_pub)]

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

pub fn wait_port(port: u16, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("{what} did not listen on {port}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// A process (tree) under test.
#[derive(Debug)]
pub struct Proc {
    pub child: Child,
}

impl Proc {
    pub fn pids(&self) -> Vec<u32> {
        let mut pids = vec![self.child.id()];
        let mut i = 0;
        while i < pids.len() {
            if let Ok(children) =
                std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", pids[i]))
            {
                pids.extend(
                    children
                        .split_whitespace()
                        .filter_map(|p| p.parse::<u32>().ok()),
                );
            }
            i += 1;
        }
        pids
    }

    /// utime + stime of the whole tree, in seconds.
    pub fn cpu_secs(&self) -> f64 {
        let tick = 100.0; // USER_HZ on Linux
        self.pids()
            .iter()
            .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
            .map(|s| {
                let after = s.rsplit_once(')').map(|x| x.1).unwrap_or("");
                let f: Vec<&str> = after.split_whitespace().collect();
                let u: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0);
                let k: f64 = f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
                (u + k) / tick
            })
            .sum()
    }

    /// Sum of VmHWM over the tree, MiB.
    pub fn peak_rss_mib(&self) -> f64 {
        self.pids()
            .iter()
            .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
            .filter_map(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmHWM:"))
                    .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            })
            .sum::<f64>()
            / 1024.0
    }

    /// Current VmRSS sum, MiB.
    pub fn rss_mib(&self) -> f64 {
        self.pids()
            .iter()
            .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
            .filter_map(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            })
            .sum::<f64>()
            / 1024.0
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn spawn(cmd: &mut Command) -> Result<Proc> {
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    Ok(Proc { child })
}

pub const WRK_LUA: &str = r#"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %d %.3f %.3f %.3f %.3f %d %d %d %d %d\n",
    summary.requests, summary.duration / 1e6,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, latency:percentile(99.9) / 1000,
    e.connect, e.read, e.write, e.timeout, e.status))
end
"#;

pub fn wrk(
    lua: &Path,
    port: u16,
    path: &str,
    conns: usize,
    dur: Duration,
    close: bool,
) -> Result<(f64, f64, f64, f64, f64, u64)> {
    wrk_with(lua, port, path, conns, dur, close, &[])
}

/// [`wrk`] with extra request headers (`Name: value`).
pub fn wrk_with(
    lua: &Path,
    port: u16,
    path: &str,
    conns: usize,
    dur: Duration,
    close: bool,
    headers: &[String],
) -> Result<(f64, f64, f64, f64, f64, u64)> {
    let f = wrk_fields(lua, port, path, conns, dur, close, headers)?;
    let errors = f[5..10].iter().sum::<f64>() as u64;
    Ok((f[0], f[0] / f[1].max(1e-9), f[2], f[3], f[4], errors))
}

/// One wrk run, as [`WRK_LUA`] reports it: requests, seconds, p50/p99/p99.9 ms, then errors by
/// kind — connect, read, write, timeout, non-2xx status.
pub fn wrk_fields(
    lua: &Path,
    port: u16,
    path: &str,
    conns: usize,
    dur: Duration,
    close: bool,
    headers: &[String],
) -> Result<[f64; 10]> {
    let mut cmd = Command::new("wrk");
    for h in headers {
        cmd.args(["-H", h]);
    }
    cmd.args(["-t", if conns >= 1000 { "2" } else { "1" }])
        .args(["-c", &conns.to_string()])
        .args(["-d", &format!("{}s", dur.as_secs().max(1))])
        .args(["--timeout", "10s"])
        .args(["-s", &lua.display().to_string()]);
    if close {
        cmd.args(["-H", "Connection: close"]);
    }
    cmd.arg(format!("http://127.0.0.1:{port}{path}"));
    let out = cmd.output().context("wrk")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("RESULT "))
        .with_context(|| format!("no wrk result: {text}"))?;
    let f: Vec<f64> = line[7..]
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    match <[f64; 10]>::try_from(f.get(..10).unwrap_or_default()) {
        Ok(a) => Ok(a),
        Err(_) => bail!("short wrk result: {line}"),
    }
}

/// `proxyctl weight POOL PERCENT` on a switchyard control socket.
pub fn weight_switchyard(socket: &Path, pool: &str, weight: u32) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut c = switchyard_control::ControlClient::connect(socket).await?;
        let r = c
            .request(&switchyard_control::Request::Weight {
                upstream: None,
                pool: pool.into(),
                weight,
                min_healthy: Default::default(),
                force: false,
            })
            .await?;
        if let Some(e) = r.error {
            bail!("{}", e.message);
        }
        Ok(())
    })
}

pub fn switch_switchyard(socket: &Path, pool: &str) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut c = switchyard_control::ControlClient::connect(socket).await?;
        let r = c
            .request(&switchyard_control::Request::Switch {
                upstream: None,
                pool: pool.into(),
                drain: false,
                drain_ms: None,
                min_healthy: Default::default(),
                wait_healthy_ms: None,
                force: false,
            })
            .await?;
        if let Some(e) = r.error {
            bail!("{}", e.message);
        }
        Ok(())
    })
}
