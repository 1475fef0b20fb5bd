//! `soak`: an hour (by default) of keep-alive load on switchyard with a blue/green switch every
//! second and a config reload every minute, reporting per minute the requests, failures,
//! p99, resident memory and open file descriptors — what must stay flat for a proxy that runs
//! for months. Writes docs/RELIABILITY.md's soak table.
//!
//! ```sh
//! cargo build --release --workspace && target/release/soak                 # 60 minutes
//! target/release/soak --minutes 5 --out /tmp/soak.md                      # a quick look
//! ```
//!
//! Load: wrk, 1 thread, 64 keep-alive connections, `/hello`, one run per minute (the p99 of each
//! minute is that run's); the upstreams are two `switchyard fake-upstream` processes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use anyhow::{bail, Context, Result};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use switchyard_benches::{
    free_port, spawn, switch_switchyard, wait_port, which, wrk, Proc, WRK_LUA,
};

fn conf(dir: &Path, port: u16, blue: u16, green: u16, minute: u64) -> String {
    // Each reload changes something real (the read timeout) so it is not a no-op.
    format!(
        "listen: [{{addr: \"127.0.0.1:{port}\"}}]\nthreads: 1\ngrace_period: 2s\ncontrol: {{socket: \"{d}/c.sock\"}}\nstate_file: \"{d}/state.json\"\nadmin: {{listen: \"off\"}}\naccess_log: \"off\"\nupstreams:\n  app:\n    pools:\n      blue: [\"127.0.0.1:{blue}\"]\n      green: [\"127.0.0.1:{green}\"]\n    active: blue\n    read_timeout: {}s\n    health: {{interval: 1s, timeout: 500ms}}\nroutes: [{{path_prefix: /, upstream: app}}]\n",
        30 + minute % 30,
        d = dir.display()
    )
}

fn open_fds(p: &Proc) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", p.child.id()))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn reload(socket: &Path) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut c = switchyard_control::ControlClient::connect(socket).await?;
        let r = c.request(&switchyard_control::Request::Reload).await?;
        if let Some(e) = r.error {
            bail!("{}", e.message);
        }
        Ok(())
    })
}

fn main() -> Result<()> {
    let mut minutes = 60u64;
    let mut out = PathBuf::from("docs/RELIABILITY.md");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--minutes" => minutes = args.next().context("--minutes N")?.parse()?,
            "--out" => out = PathBuf::from(args.next().context("--out FILE")?),
            other => bail!("unknown argument {other:?} (--minutes N, --out FILE)"),
        }
    }
    if which("wrk").is_none() {
        bail!("wrk is not installed: apt-get install -y wrk");
    }
    let exe = std::env::current_exe()?;
    let switchyard = exe.parent().context("exe dir")?.join("switchyard");
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let lua = dir.join("report.lua");
    std::fs::write(&lua, WRK_LUA)?;
    let (blue, green, port) = (free_port(), free_port(), free_port());
    let _ups: Vec<Proc> = [(blue, "blue"), (green, "green")]
        .iter()
        .map(|(p, name)| {
            spawn(Command::new(&switchyard).args([
                "fake-upstream",
                "--listen",
                &format!("127.0.0.1:{p}"),
                "--name",
                name,
            ]))
        })
        .collect::<Result<_>>()?;
    wait_port(blue, "blue")?;
    wait_port(green, "green")?;
    let cfg = dir.join("switchyard.yaml");
    std::fs::write(&cfg, conf(dir, port, blue, green, 0))?;
    let sy = spawn(
        Command::new(&switchyard)
            .arg("-c")
            .arg(&cfg)
            .env("RUST_LOG", "error"),
    )?;
    wait_port(port, "switchyard")?;
    std::thread::sleep(Duration::from_secs(3)); // first health checks

    // A switch every second, on its own thread, for the whole run.
    let stop = Arc::new(AtomicBool::new(false));
    let switches = Arc::new(AtomicU64::new(0));
    let switch_errors = Arc::new(AtomicU64::new(0));
    let socket = dir.join("c.sock");
    let switcher = {
        let (stop, switches, errors, socket) = (
            stop.clone(),
            switches.clone(),
            switch_errors.clone(),
            socket.clone(),
        );
        std::thread::spawn(move || {
            let mut green = true;
            while !stop.load(Ordering::Relaxed) {
                match switch_switchyard(&socket, if green { "green" } else { "blue" }) {
                    Ok(()) => switches.fetch_add(1, Ordering::Relaxed),
                    Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                };
                green = !green;
                std::thread::sleep(Duration::from_secs(1));
            }
        })
    };
    let mut table = String::new();
    let _ = writeln!(
        table,
        "| minute | requests | failed | req/s | p99 ms | RSS MiB | open fds | switches (total) |"
    );
    let _ = writeln!(table, "|---:|---:|---:|---:|---:|---:|---:|---:|");
    let start = Instant::now();
    let mut reload_errors = 0;
    for m in 1..=minutes {
        let (requests, rps, _, p99, _, errors) =
            wrk(&lua, port, "/hello", 64, Duration::from_secs(60), false)?;
        // A reload at every minute's end.
        std::fs::write(&cfg, conf(dir, port, blue, green, m))?;
        if reload(&socket).is_err() {
            reload_errors += 1;
        }
        let line = format!(
            "| {m} | {requests:.0} | {errors} | {rps:.0} | {p99:.2} | {:.1} | {} | {} |",
            sy.rss_mib(),
            open_fds(&sy),
            switches.load(Ordering::Relaxed)
        );
        eprintln!("{line}");
        let _ = writeln!(table, "{line}");
    }
    stop.store(true, Ordering::Relaxed);
    let _ = switcher.join();
    let _ = writeln!(
        table,
        "\n{minutes} minutes ({:.0} s): {} switches ({} refused), {minutes} reloads ({reload_errors} refused). Command: `target/release/soak --minutes {minutes}`.",
        start.elapsed().as_secs_f64(),
        switches.load(Ordering::Relaxed),
        switch_errors.load(Ordering::Relaxed)
    );
    println!("{table}");
    let doc = std::fs::read_to_string(&out).unwrap_or_default();
    let (begin, end) = ("<!-- soak:begin -->", "<!-- soak:end -->");
    let block = format!("{begin}\n{table}{end}");
    let doc = match (doc.find(begin), doc.find(end)) {
        (Some(a), Some(b)) if b > a => format!("{}{block}{}", &doc[..a], &doc[b + end.len()..]),
        _ => format!("{doc}\n{block}\n"),
    };
    std::fs::write(&out, doc)?;
    eprintln!("written to {}", out.display());
    Ok(())
}
