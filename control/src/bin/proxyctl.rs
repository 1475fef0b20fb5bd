//! `proxyctl`: the control client (SPEC §5).
//!
//! Exit codes: 0 done; 1 refused by the proxy (unhealthy, unknown pool, invalid), or a
//! rollout stopped by a human; 2 usage error; 3 cannot reach the control socket; 4 timed out
//! waiting (what is still pending is printed); 5 the canary was rolled back automatically
//! (`canary --wait`; the numbers are printed). Human-readable output by default, `--json` prints the proxy's reply as one JSON
//! document. Progress of waiting commands goes to stderr: a live line on a terminal, plain
//! lines otherwise.

use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use switchyard_control::protocol::{
    AuditRecord, CanaryResult, Change, DrainResult, Event, FleetAck, FleetStatus, HealthState,
    LiveStats, PoolPhase, ReloadResult, Reply, Request, RolloutStatus, Status, UpstreamStatus,
};
use switchyard_control::{ClientError, ControlClient, MinHealthy, Weights};

/// Control a running switchyard proxy through its control socket.
#[derive(Debug, Parser)]
#[command(
    name = "proxyctl",
    version,
    about,
    after_help = "Exit codes: 0 done, 1 refused (or a rollout stopped by a human), 2 usage, 3 cannot reach the socket, 4 timed out waiting, 5 the canary was rolled back automatically."
)]
struct Cli {
    /// Control socket path.
    #[arg(
        long,
        env = "SWITCHYARD_SOCKET",
        default_value = "./switchyard.sock",
        global = true
    )]
    socket: PathBuf,
    /// Upstream to act on (may be left out when the proxy has only one).
    #[arg(long, global = true)]
    upstream: Option<String>,
    /// Print the proxy's reply as one JSON document.
    #[arg(long, global = true)]
    json: bool,
    /// Fleet (SPEC §9): `status` shows every proxy's generation and health view; a change
    /// returns when every live proxy reports it applied, printing each (exit 4 naming the
    /// proxies that did not within --timeout). A change on a fleet proxy waits like this
    /// anyway; --fleet also refuses to run against a proxy that is not in a fleet.
    #[arg(long, global = true)]
    fleet: bool,
    /// How long to wait: for `drain`, the drain (default: the upstream's drain_timeout); with
    /// --fleet, every proxy's report (default 10s).
    #[arg(long, global = true, value_name = "DURATION")]
    timeout: Option<humantime::Duration>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Pools, instances, weights, in-flight requests, generation.
    Status,
    /// Send 100% of the traffic to POOL.
    Switch {
        /// Target pool.
        pool: String,
        /// Then wait until the old pool has drained (default wait: the upstream's drain_timeout).
        #[arg(long, value_name = "DURATION", num_args = 0..=1)]
        drain: Option<Option<humantime::Duration>>,
        /// First wait up to DURATION for POOL to become healthy, showing each instance.
        #[arg(long, value_name = "DURATION")]
        wait_healthy: Option<humantime::Duration>,
        /// Healthy instances required: `all` (default), a count, or a percentage like `50%`.
        #[arg(long, value_name = "N|P%", default_value = "all")]
        min_healthy: MinHealthy,
        /// Switch even if POOL is not healthy (recorded as forced).
        #[arg(long)]
        force: bool,
    },
    /// Restore the weights from before the last change.
    Rollback,
    /// Give POOL PERCENT of the traffic; the rest stays on the main pool.
    Weight {
        /// Pool.
        pool: String,
        /// 0..=100.
        #[arg(value_parser = clap::value_parser!(u32).range(0..=100))]
        percent: u32,
        /// Healthy instances required when POOL gets traffic for the first time.
        #[arg(long, value_name = "N|P%", default_value = "all")]
        min_healthy: MinHealthy,
        /// Skip the health gate (recorded as forced).
        #[arg(long)]
        force: bool,
    },
    /// Set an explicit split, e.g. `weights blue=90 green=10` (must sum to 100).
    Weights {
        /// POOL=PERCENT pairs.
        #[arg(required = true, value_parser = parse_pair)]
        split: Vec<(String, u32)>,
        /// Healthy instances required for pools that get traffic for the first time.
        #[arg(long, value_name = "N|P%", default_value = "all")]
        min_healthy: MinHealthy,
        /// Skip the health gate (recorded as forced).
        #[arg(long)]
        force: bool,
    },
    /// Wait until POOL (at weight 0) has no request in flight (`--timeout`: how long,
    /// default the upstream's drain_timeout).
    Drain {
        /// Pool.
        pool: String,
    },
    /// Change a pool's instances.
    Pool {
        #[command(subcommand)]
        cmd: PoolCmd,
    },
    /// Re-read the config file; on error the running config stays and every problem is printed.
    Reload,
    /// Roll POOL out progressively (the proxy runs it: one step per interval while the
    /// canary's analysis passes, rolled back automatically when it fails), or act on the
    /// rollout in progress: status, pause, resume, abort, promote.
    Canary {
        /// POOL to roll out, or status | pause | resume | abort | promote.
        target: String,
        /// Weights of the steps, ending at 100 (default: the upstream's `steps`).
        #[arg(long, value_delimiter = ',', value_name = "5,25,50,100")]
        steps: Option<Vec<u32>>,
        /// Time at each step (default: the upstream's `step_interval`).
        #[arg(long, value_name = "DURATION")]
        interval: Option<humantime::Duration>,
        /// Print each step and wait until the rollout ends: exit 0 promoted, 5 rolled back
        /// automatically, 1 stopped by a human.
        #[arg(long)]
        wait: bool,
        /// Healthy instances required at each step: `all` (default), a count, or `50%`.
        #[arg(long, value_name = "N|P%", default_value = "all")]
        min_healthy: MinHealthy,
        /// `promote` even if the canary is not healthy (recorded as forced).
        #[arg(long)]
        force: bool,
        /// First wait up to DURATION for POOL to pass the health gate (a container just
        /// started), showing each instance; then start the rollout.
        #[arg(long, value_name = "DURATION")]
        wait_healthy: Option<humantime::Duration>,
    },
    /// The audit trail: switches, rollbacks (who, why), weight and pool changes, reloads,
    /// health changes, ejections.
    Events {
        /// Keep printing new records as they happen.
        #[arg(long, short)]
        follow: bool,
        /// How many of the latest records to show.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Print the completion script for SHELL (bash, zsh, fish, elvish, powershell), e.g.
    /// `proxyctl completions bash > /etc/bash_completion.d/proxyctl`.
    Completions {
        /// Shell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff), e.g. `proxyctl man > /usr/share/man/man1/proxyctl.1`.
    Man,
}

#[derive(Debug, Subcommand)]
enum PoolCmd {
    /// Replace POOL's instances.
    Set {
        /// Pool.
        pool: String,
        /// host:port ...
        #[arg(required = true)]
        instances: Vec<String>,
    },
    /// Add an instance to POOL.
    Add {
        /// Pool.
        pool: String,
        /// host:port
        instance: String,
    },
    /// Remove an instance from POOL (its in-flight requests finish).
    Remove {
        /// Pool.
        pool: String,
        /// host:port
        instance: String,
    },
}

fn parse_pair(s: &str) -> Result<(String, u32), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not POOL=PERCENT"))?;
    let v: u32 = v
        .parse()
        .map_err(|_| format!("{v:?} in {s:?} is not a number"))?;
    if v > 100 {
        return Err(format!("{s:?}: a weight is at most 100"));
    }
    Ok((k.to_string(), v))
}

fn ms(d: humantime::Duration) -> u64 {
    Duration::from(d).as_millis() as u64
}

/// The request line for the command line; `Err` is a usage error (exit 2).
fn request(cli: &Cli) -> Result<Request, String> {
    let req = command(cli)?;
    if !cli.fleet {
        if cli.timeout.is_some() && !matches!(cli.cmd, Cmd::Drain { .. }) {
            return Err("--timeout goes with `drain` or with --fleet".into());
        }
        return Ok(req);
    }
    if matches!(
        cli.cmd,
        Cmd::Drain { .. } | Cmd::Events { .. } | Cmd::Reload
    ) || matches!(&cli.cmd, Cmd::Canary { target, .. } if target == "status")
    {
        return Err(
            "--fleet goes with `status` and with changes; this command acts on one proxy".into(),
        );
    }
    Ok(Request::Fleet {
        timeout_ms: cli.timeout.map(ms),
        request: Box::new(req),
    })
}

/// The command itself.
fn command(cli: &Cli) -> Result<Request, String> {
    let upstream = cli.upstream.clone();
    if let Cmd::Canary {
        target,
        steps,
        interval,
        wait,
        min_healthy,
        force,
        wait_healthy,
    } = &cli.cmd
    {
        let verb = matches!(
            target.as_str(),
            "status" | "pause" | "resume" | "abort" | "promote"
        );
        if verb && (steps.is_some() || interval.is_some() || *wait || wait_healthy.is_some()) {
            return Err(format!(
                "--steps, --interval, --wait and --wait-healthy start a rollout: `proxyctl canary POOL ...`, not `canary {target}`"
            ));
        }
        if *force && target != "promote" {
            return Err("--force goes with `canary promote`".into());
        }
        return Ok(match target.as_str() {
            "status" => Request::CanaryStatus { upstream },
            "pause" => Request::CanaryPause { upstream },
            "resume" => Request::CanaryResume { upstream },
            "abort" => Request::CanaryAbort { upstream },
            "promote" => Request::CanaryPromote {
                upstream,
                force: *force,
            },
            pool => Request::Canary {
                upstream,
                pool: pool.to_string(),
                steps: steps.clone(),
                interval_ms: interval.map(ms),
                wait: *wait,
                min_healthy: *min_healthy,
                wait_healthy_ms: wait_healthy.map(ms),
            },
        });
    }
    Ok(match &cli.cmd {
        Cmd::Completions { .. } | Cmd::Man => {
            return Err("completions and man are answered without a proxy".into())
        }
        Cmd::Status => Request::Status,
        Cmd::Switch {
            pool,
            drain,
            wait_healthy,
            min_healthy,
            force,
        } => Request::Switch {
            upstream,
            pool: pool.clone(),
            drain: drain.is_some(),
            drain_ms: drain.flatten().map(ms),
            min_healthy: *min_healthy,
            wait_healthy_ms: wait_healthy.map(ms),
            force: *force,
        },
        Cmd::Rollback => Request::Rollback { upstream },
        Cmd::Weight {
            pool,
            percent,
            min_healthy,
            force,
        } => Request::Weight {
            upstream,
            pool: pool.clone(),
            weight: *percent,
            min_healthy: *min_healthy,
            force: *force,
        },
        Cmd::Weights {
            split,
            min_healthy,
            force,
        } => Request::Weights {
            upstream,
            weights: split.iter().cloned().collect::<Weights>(),
            min_healthy: *min_healthy,
            force: *force,
        },
        Cmd::Drain { pool } => Request::Drain {
            upstream,
            pool: pool.clone(),
            timeout_ms: cli.timeout.map(ms),
        },
        Cmd::Pool { cmd } => match cmd {
            PoolCmd::Set { pool, instances } => Request::PoolSet {
                upstream,
                pool: pool.clone(),
                instances: instances.clone(),
            },
            PoolCmd::Add { pool, instance } => Request::PoolAdd {
                upstream,
                pool: pool.clone(),
                instance: instance.clone(),
            },
            PoolCmd::Remove { pool, instance } => Request::PoolRemove {
                upstream,
                pool: pool.clone(),
                instance: instance.clone(),
            },
        },
        Cmd::Reload => Request::Reload,
        Cmd::Events { follow, limit } => Request::Events {
            follow: *follow,
            limit: Some(*limit),
        },
        // Handled above.
        Cmd::Canary { .. } => Request::Status,
    })
}

/// Shows progress events on stderr.
struct Progress {
    bar: Option<ProgressBar>,
    /// Last reported state per instance, to print only changes.
    health: std::cell::RefCell<std::collections::BTreeMap<String, HealthState>>,
    last_line: std::cell::RefCell<String>,
    json: bool,
}

impl Progress {
    fn new(enabled: bool) -> Self {
        let bar = (enabled && std::io::stderr().is_terminal()).then(|| {
            let b = ProgressBar::new_spinner();
            b.set_style(
                ProgressStyle::with_template("{spinner} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            b.enable_steady_tick(Duration::from_millis(120));
            b
        });
        Progress {
            bar,
            health: Default::default(),
            last_line: Default::default(),
            json: !enabled,
        }
    }

    fn println(&self, text: String) {
        match &self.bar {
            Some(b) => b.println(text),
            None => eprintln!("{text}"),
        }
    }

    fn line(&self, text: String) {
        match &self.bar {
            Some(b) => b.set_message(text),
            None => {
                // Plain lines: only when something changed.
                if self.last_line.replace(text.clone()) != text {
                    eprintln!("{text}");
                }
            }
        }
    }

    fn event(&self, ev: &Event) {
        match ev {
            Event::Applied { change } => self.println(describe_change(change)),
            Event::Health {
                upstream,
                pool,
                healthy,
                needed,
                instances,
            } => {
                for i in instances {
                    let prev = self.health.borrow_mut().insert(i.addr.clone(), i.health);
                    if prev != Some(i.health) {
                        self.println(format!(
                            "{upstream}/{pool} {}: {}{}",
                            i.addr,
                            i.health,
                            i.last_check
                                .as_ref()
                                .map(|c| format!(" ({c})"))
                                .unwrap_or_default()
                        ));
                    }
                }
                self.line(format!(
                    "{upstream}/{pool}: {healthy} of {needed} needed instances healthy"
                ));
            }
            Event::Record { record: r } => {
                if self.json {
                    println!("{}", serde_json::to_string(r).unwrap_or_default());
                } else {
                    println!("{}", describe_record(r));
                }
            }
            Event::Rollout { upstream, rollout } => {
                self.println(format!("{upstream}: {}", describe_rollout(rollout)));
            }
            Event::Draining {
                upstream,
                inflight,
                waited_ms,
            } => {
                let pools: Vec<String> = inflight
                    .iter()
                    .map(|(p, n)| format!("{p}: {n} in flight"))
                    .collect();
                self.line(format!(
                    "{upstream}: draining {} ({:.1}s)",
                    pools.join(", "),
                    *waited_ms as f64 / 1000.0
                ));
            }
            _ => {}
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

fn fmt_weights(w: &Weights) -> String {
    w.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn describe_change(c: &Change) -> String {
    if !c.changed {
        return format!(
            "{}: nothing to change ({}), generation {}",
            c.upstream,
            fmt_weights(&c.new_weights),
            c.generation
        );
    }
    let moves: Vec<String> = c
        .new_weights
        .iter()
        .filter(|(p, w)| c.old_weights.get(*p) != Some(*w))
        .map(|(p, w)| format!("{p} {} -> {w}", c.old_weights.get(p).copied().unwrap_or(0)))
        .collect();
    let mut s = format!("{}: generation {}", c.upstream, c.generation);
    if !moves.is_empty() {
        s.push_str(&format!(": {}", moves.join(", ")));
    }
    if let Some(inst) = &c.instances {
        for (pool, list) in inst {
            s.push_str(&format!("\n  {pool}: {}", list.join(" ")));
        }
    }
    s
}

fn describe_record(r: &AuditRecord) -> String {
    let who = match (r.uid, r.pid) {
        (Some(u), Some(p)) => format!(" by uid {u} pid {p}"),
        (Some(u), None) => format!(" by uid {u}"),
        _ => format!(" by {}", r.actor),
    };
    let generation = r
        .generation
        .map(|g| format!(" generation {g}"))
        .unwrap_or_default();
    format!(
        "{} {:<12} {}{}{}{}",
        r.time,
        r.kind,
        r.message,
        if r.forced { " [forced]" } else { "" },
        generation,
        who
    )
}

/// `8m12s`, `45s`, `1.5s`.
fn short_duration(ms: u64) -> String {
    let secs = ms / 1000;
    if secs >= 3600 {
        format!("{}h{:02}m", secs / 3600, secs % 3600 / 60)
    } else if secs >= 60 {
        format!("{}m{:02}s", secs / 60, secs % 60)
    } else if ms >= 10_000 {
        format!("{secs}s")
    } else {
        format!("{:.1}s", ms as f64 / 1000.0)
    }
}

/// One line about a rollout.
fn describe_rollout(r: &RolloutStatus) -> String {
    let steps: Vec<String> = r.steps.iter().map(|s| s.to_string()).collect();
    let mut s = format!(
        "rollout of {}: step {} of {} ({}%, steps {}), {}",
        r.pool,
        r.step + 1,
        r.steps.len(),
        r.weight,
        steps.join(","),
        r.state.replace('_', " ")
    );
    if let (Some(left), "running" | "paused") = (r.step_left_ms, r.state.as_str()) {
        if left > 0 {
            s.push_str(&format!(", {} left at this step", short_duration(left)));
        }
    }
    if let Some(w) = &r.waiting {
        s.push_str(&format!("; {w}"));
    }
    if let Some(by) = &r.ended_by {
        s.push_str(&format!(" by `{by}`"));
    }
    s
}

/// REQ/S, 5XX and P99 of a pool.
fn live_columns(l: Option<&LiveStats>) -> String {
    match l {
        Some(l) if l.requests > 0 => format!(
            "{:>8.1} {:>6} {:>8}",
            l.rate,
            format!("{:.1}%", l.error_ratio * 100.0),
            l.p99_ms
                .map(|ms| if ms >= 1000.0 {
                    format!("{:.2}s", ms / 1000.0)
                } else {
                    format!("{ms:.1}ms")
                })
                .unwrap_or_else(|| "-".into())
        ),
        _ => format!("{:>8} {:>6} {:>8}", "-", "-", "-"),
    }
}

fn print_upstream(u: &UpstreamStatus) {
    let canary = u.pools.iter().any(|p| p.role.as_deref() == Some("canary"));
    println!(
        "{}  generation {}  main {}  weights {}{}",
        u.name,
        u.generation,
        u.main,
        fmt_weights(&u.weights),
        if canary && !u.sticky.is_empty() {
            format!("  sticky {}", u.sticky)
        } else {
            String::new()
        }
    );
    if let Some(r) = &u.rollout {
        println!("  {}", describe_rollout(r));
    }
    if let Some(b) = &u.last_rollback {
        println!(
            "  last automatic rollback: {} at {} ({}): {}",
            b.pool, b.at, b.reason, b.detail
        );
    }
    println!(
        "  {:<12} {:>6}  {:<6} {:<9} {:>9} {:>8} {:>6} {:>8}  INSTANCES",
        "POOL", "WEIGHT", "ROLE", "STATE", "IN-FLIGHT", "REQ/S", "5XX", "P99"
    );
    for p in &u.pools {
        let phase = match p.phase {
            PoolPhase::Active => "active",
            PoolPhase::Draining => "draining",
            PoolPhase::Drained => "drained",
        };
        let inst: Vec<String> = p
            .instances
            .iter()
            .map(|i| {
                let mut t = i.addr.clone();
                if let Some(r) = &i.resolved {
                    if *r != i.addr {
                        t.push_str(&format!(" ({r})"));
                    }
                }
                if let Some(e) = &i.resolve_error {
                    t.push_str(&format!(" [dns: {e}]"));
                }
                t.push_str(&format!(" {}", i.health));
                if let Some(secs) = i.ejected_for_secs {
                    t.push_str(&format!(" for {secs}s more"));
                }
                if i.health != HealthState::Healthy {
                    if let Some(c) = &i.last_check {
                        t.push_str(&format!(" ({c})"));
                    }
                }
                if i.inflight > 0 {
                    t.push_str(&format!(" [{} in flight]", i.inflight));
                }
                t
            })
            .collect();
        println!(
            "  {:<12} {:>6}  {:<6} {:<9} {:>9} {}  {}",
            p.name,
            p.weight,
            p.role.as_deref().unwrap_or("-"),
            phase,
            p.inflight,
            live_columns(p.live.as_ref()),
            if inst.is_empty() {
                "-".to_string()
            } else {
                inst.join(", ")
            }
        );
        if let Some(v) = p.live.as_ref().and_then(|l| l.verdict.as_ref()) {
            let bad_for = p
                .live
                .as_ref()
                .and_then(|l| l.bad_for_ms)
                .map(|ms| format!(" for {}", short_duration(ms)))
                .unwrap_or_default();
            println!("  {:<12} canary analysis: {v}{bad_for}", "");
        }
    }
}

fn print_status(s: &Status) {
    for u in &s.upstreams {
        print_upstream(u);
    }
}

fn print_drain(d: &DrainResult) {
    let pools: Vec<&str> = d.inflight.keys().map(String::as_str).collect();
    println!(
        "{}: {} drained after {:.1}s",
        d.upstream,
        if pools.is_empty() {
            "nothing to drain,".to_string()
        } else {
            pools.join(", ")
        },
        d.waited_ms as f64 / 1000.0
    );
}

/// `status --fleet`: one line per proxy and upstream.
fn print_fleet(f: &FleetStatus) {
    println!(
        "fleet {}  seen from {}  link {}{}",
        f.prefix,
        f.name,
        if f.connected { "up" } else { "DOWN" },
        f.down_since
            .as_ref()
            .map(|t| format!(" since {t}"))
            .unwrap_or_default()
    );
    println!(
        "leader: {}",
        f.leader
            .as_deref()
            .unwrap_or("none (no automatic canary decisions)")
    );
    for d in &f.desired {
        println!(
            "desired {}: generation {}  weights {}",
            d.upstream,
            d.generation,
            fmt_weights(&d.weights)
        );
    }
    println!(
        "  {:<20} {:<10} {:>10}  {:<7} {:<24} SEES DOWN",
        "PROXY", "UPSTREAM", "GENERATION", "STATE", "WEIGHTS"
    );
    for p in &f.proxies {
        if p.upstreams.is_empty() {
            println!("  {:<20} {:<10} {:>10}  {:<7}", p.name, "-", "-", "gone");
        }
        for u in &p.upstreams {
            let state = match (&u.error, u.in_sync) {
                (Some(_), _) => "error",
                (None, true) => "in sync",
                (None, false) => "LAGGING",
            };
            println!(
                "  {:<20} {:<10} {:>10}  {:<7} {:<24} {}{}",
                p.name,
                u.upstream,
                u.generation,
                state,
                fmt_weights(&u.weights),
                if u.unhealthy.is_empty() {
                    "-".to_string()
                } else {
                    u.unhealthy.join(" ")
                },
                u.error
                    .as_ref()
                    .map(|e| format!("  ({e})"))
                    .unwrap_or_default()
            );
        }
    }
}

/// The proxies' answers to a fleet change.
fn print_acks(v: &serde_json::Value) {
    let Some(acks) = v
        .get("fleet")
        .and_then(|a| serde_json::from_value::<Vec<FleetAck>>(a.clone()).ok())
    else {
        return;
    };
    for a in &acks {
        println!(
            "  {}: generation {}{}",
            a.name,
            a.generation,
            a.after_ms
                .map(|ms| format!(", applied after {ms} ms"))
                .unwrap_or_default()
        );
    }
}

fn print_result(cmd: &Cmd, reply: &Reply, fleet: bool) {
    let Some(v) = reply.result.clone() else {
        return;
    };
    if fleet && matches!(cmd, Cmd::Status) {
        match serde_json::from_value::<FleetStatus>(v) {
            Ok(f) => print_fleet(&f),
            Err(e) => println!("unreadable fleet status: {e}"),
        }
        return;
    }
    let acks = v.clone();
    match cmd {
        Cmd::Status => match serde_json::from_value::<Status>(v) {
            Ok(s) => print_status(&s),
            Err(e) => println!("unreadable status: {e}"),
        },
        Cmd::Drain { .. } => {
            if let Ok(d) = serde_json::from_value::<DrainResult>(v) {
                print_drain(&d);
            }
        }
        Cmd::Events { .. } => {
            if let Ok(list) = serde_json::from_value::<Vec<AuditRecord>>(v) {
                for r in &list {
                    println!("{}", describe_record(r));
                }
            }
        }
        Cmd::Canary { target, .. } => match target.as_str() {
            "status" => {
                if let Ok(u) = serde_json::from_value::<UpstreamStatus>(v) {
                    print_upstream(&u);
                }
            }
            "pause" | "resume" => {
                if let Ok(r) = serde_json::from_value::<RolloutStatus>(v) {
                    println!("{}", describe_rollout(&r));
                }
            }
            _ => {
                if let Ok(r) = serde_json::from_value::<CanaryResult>(v) {
                    println!("{}", describe_change(&r.change));
                    if !r.rollout.pool.is_empty() {
                        println!("{}: {}", r.change.upstream, describe_rollout(&r.rollout));
                    }
                    if r.change.forced {
                        println!("forced: the pool did not pass the health gate");
                    }
                }
            }
        },
        Cmd::Reload => {
            if let Ok(r) = serde_json::from_value::<ReloadResult>(v) {
                println!("reloaded: {}", r.summary);
                for w in &r.warnings {
                    println!("warning: {w}");
                }
                if !r.needs_restart.is_empty() {
                    println!(
                        "changed but only applied after a restart: {}",
                        r.needs_restart.join(", ")
                    );
                }
            }
        }
        _ => {
            if let Ok(c) = serde_json::from_value::<Change>(v) {
                if matches!(cmd, Cmd::Switch { drain: Some(_), .. }) {
                    if let Some(d) = &c.drain {
                        print_drain(d);
                    }
                } else {
                    println!("{}", describe_change(&c));
                }
                if c.forced {
                    println!("forced: the pool did not pass the health gate");
                }
            }
        }
    }
    print_acks(&acks);
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Completions { shell } => {
            use clap::CommandFactory;
            switchyard_control::docs::completions(shell, Cli::command(), &mut std::io::stdout());
            return ExitCode::SUCCESS;
        }
        Cmd::Man => {
            use clap::CommandFactory;
            return match switchyard_control::docs::man(Cli::command(), &mut std::io::stdout()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("proxyctl: {e}");
                    ExitCode::from(1)
                }
            };
        }
        _ => {}
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("proxyctl: {e}");
            return ExitCode::from(1);
        }
    };
    let req = match request(&cli) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("proxyctl: {e}");
            return ExitCode::from(2);
        }
    };
    let progress = Progress::new(!cli.json);
    let result: Result<Reply, ClientError> = rt.block_on(async {
        let mut client = ControlClient::connect(&cli.socket).await?;
        client.call(&req, |ev| progress.event(ev)).await
    });
    progress.finish();
    match result {
        Err(e) => {
            eprintln!("proxyctl: {e}");
            if matches!(e, ClientError::Connect { .. }) {
                eprintln!("hint: is switchyard running? set --socket or SWITCHYARD_SOCKET to its control.socket");
            }
            ExitCode::from(3)
        }
        Ok(reply) => {
            if cli.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&reply).unwrap_or_else(|e| e.to_string())
                );
            } else if reply.ok {
                print_result(&cli.cmd, &reply, cli.fleet);
            }
            match &reply.error {
                None => ExitCode::SUCCESS,
                Some(e) => {
                    if !cli.json {
                        eprintln!("proxyctl: {}", e.message);
                    }
                    ExitCode::from(e.code.exit_code())
                }
            }
        }
    }
}
