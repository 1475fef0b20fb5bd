//! The `switchyard` binary: parse the command line, set up logging, load the config, run.

use anyhow::Context;

/// mimalloc instead of glibc malloc: Pingora allocates and frees many small buffers per
/// request, and glibc's malloc/free were ~14% of the CPU per proxied request in the profile
/// (docs/BENCHMARKS.md has the measured before/after).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use clap::{Parser, Subcommand, ValueEnum};
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

/// switchyard: a reverse proxy for blue/green and canary deploys.
#[derive(Debug, Parser)]
#[command(
    name = "switchyard",
    version,
    about,
    args_conflicts_with_subcommands = false
)]
struct Cli {
    /// Config file.
    #[arg(short, long, global = true, default_value = "switchyard.yaml")]
    config: PathBuf,
    /// Log level (overridden by RUST_LOG).
    #[arg(long, global = true, default_value = "info")]
    log_level: String,
    /// Log line format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Zero-downtime binary upgrade: take the listening sockets, control socket, admin
    /// listener and state of the switchyard running with this config's control.socket, then
    /// run in its place (it stops accepting, drains and exits). Same as `switchyard upgrade`.
    #[arg(long, global = true)]
    upgrade: bool,
    /// With --upgrade: start the new process in the background and exit once it serves (0)
    /// or has failed (1, the running one keeps serving): what systemd's ExecReload needs.
    #[arg(long, global = true)]
    detach: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    /// Human-readable lines; colored only when stderr is a terminal. Under systemd (stderr
    /// connected to the journal, `$JOURNAL_STREAM`) the journald style below.
    Text,
    /// One JSON object per line.
    Json,
    /// For journald: no time stamp (the journal adds its own), no color, and each line starts
    /// with its syslog priority (`<3>` error ... `<7>` debug), so `journalctl -p warning` works.
    Journald,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the proxy (the default).
    Run,
    /// Validate the config file: print every problem and exit 1, or a summary and exit 0.
    Check,
    /// The same as `--upgrade`: take over from the running switchyard.
    Upgrade {
        /// As `--detach`.
        #[arg(long)]
        detach: bool,
    },
    /// Start two demo upstreams and a proxy in front of them, and print a walkthrough.
    Demo {
        /// Where the demo proxy listens.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
    },
    /// Convert an nginx configuration (upstreams, servers, locations with proxy_pass, the
    /// deny rules, timeouts, body size) into a switchyard config: the YAML on stdout (or -o),
    /// every directive that was not converted on stderr with its file and line. Exit 0 when
    /// the result passes `check`, 1 when it does not (its problems are printed).
    ImportNginx {
        /// The nginx.conf (includes are read relative to its directory).
        file: PathBuf,
        /// Write the YAML here instead of stdout.
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Exit 0 if the proxy of this config answers `GET /healthz` on its admin listener with
    /// 200 within 2 s, else 1 (the container image's HEALTHCHECK; no curl needed).
    Healthcheck,
    /// Print the completion script for SHELL (bash, zsh, fish, elvish, powershell).
    Completions {
        /// Shell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff).
    Man,
    /// Run only the built-in fake upstream (the benchmarks' origin server).
    #[command(hide = true)]
    FakeUpstream {
        /// Where it listens.
        #[arg(long, default_value = "127.0.0.1:8081")]
        listen: SocketAddr,
        /// Its name (color).
        #[arg(long, default_value = "blue")]
        name: String,
        /// Worker threads.
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Answer the health endpoint with 503 {"status":"DOWN"} for this long after start, like a
        /// booting Spring app.
        #[arg(long, value_name = "DURATION")]
        boot: Option<humantime::Duration>,
        /// Answer this share of requests (percent) with 500: a bad release, for canary tests.
        #[arg(long, value_name = "PERCENT", value_parser = clap::value_parser!(u8).range(0..=100))]
        fail_percent: Option<u8>,
    },
}

/// Application log lines queued for stderr before new ones are dropped (and counted).
const LOG_QUEUE_LINES: usize = 16 * 1024;

/// The application log. Lines go through a bounded queue to a writer thread: a stalled stderr
/// (a full pipe nobody reads, a stuck journald) drops lines — counted in
/// `switchyard_log_dropped_total` — instead of blocking the worker threads that log. The guard
/// flushes the queue when dropped at exit.
fn init_logging(
    level: &str,
    format: LogFormat,
) -> (
    tracing_appender::non_blocking::WorkerGuard,
    tracing_appender::non_blocking::ErrorCounter,
) {
    use tracing_subscriber::EnvFilter;
    // Pingora logs every failed proxy attempt at error level; keep its noise at warn unless
    // asked for.
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new(format!("{level},pingora_core=warn,pingora_proxy=warn"))
    });
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(LOG_QUEUE_LINES)
        .thread_name("switchyard-log")
        .finish(std::io::stderr());
    let dropped = writer.error_counter();
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    let format = match format {
        LogFormat::Text if stderr_is_journal() => LogFormat::Journald,
        f => f,
    };
    match format {
        LogFormat::Text => b.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => b.json().init(),
        LogFormat::Journald => b
            .with_ansi(false)
            .event_format(Journald(tracing_subscriber::fmt::format().without_time()))
            .init(),
    }
    (guard, dropped)
}

/// Whether stderr is the journal: systemd sets `$JOURNAL_STREAM` to `DEVICE:INODE` of the
/// stream it connected, and a process whose stderr was redirected since no longer matches
/// (systemd.exec(5)).
fn stderr_is_journal() -> bool {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    let Some(expected) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(fd) = std::io::stderr().as_fd().try_clone_to_owned() else {
        return false;
    };
    let Ok(meta) = std::fs::File::from(fd).metadata() else {
        return false;
    };
    expected.to_str() == Some(&format!("{}:{}", meta.dev(), meta.ino()))
}

/// A line format for journald: the syslog priority prefix journald reads
/// (`SyslogLevelPrefix=`, on by default), then the wrapped format's line.
struct Journald<F>(F);

impl<S, N, F> tracing_subscriber::fmt::FormatEvent<S, N> for Journald<F>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
    F: tracing_subscriber::fmt::FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let priority = match *event.metadata().level() {
            tracing::Level::ERROR => 3,
            tracing::Level::WARN => 4,
            tracing::Level::INFO => 6,
            tracing::Level::DEBUG | tracing::Level::TRACE => 7,
        };
        write!(writer, "<{priority}>")?;
        self.0.format_event(ctx, writer, event)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Commands that print something and exit: no log set-up, no file-limit line on stderr.
    match &cli.command {
        Some(Command::Completions { shell }) => {
            use clap::CommandFactory;
            switchyard_control::docs::completions(*shell, Cli::command(), &mut std::io::stdout());
            return ExitCode::SUCCESS;
        }
        Some(Command::Man) => {
            use clap::CommandFactory;
            return match switchyard_control::docs::man(Cli::command(), &mut std::io::stdout()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("switchyard: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        Some(Command::ImportNginx { file, output }) => {
            return import_nginx(file, output.as_deref())
        }
        Some(Command::Healthcheck) => return healthcheck(&cli.config),
        _ => {}
    }
    let (_log_guard, log_dropped) = init_logging(&cli.log_level, cli.log_format);
    raise_open_file_limit();
    let result = match cli.command {
        Some(Command::Check) => return check(&cli.config),
        Some(
            Command::Completions { .. }
            | Command::Man
            | Command::ImportNginx { .. }
            | Command::Healthcheck,
        ) => Ok(()), // answered above
        Some(Command::Demo { listen }) => demo(listen),
        Some(Command::FakeUpstream {
            listen,
            name,
            threads,
            boot,
            fail_percent,
        }) => fake_upstream(listen, &name, threads, boot.map(Into::into), fail_percent),
        Some(Command::Upgrade { detach }) if detach || cli.detach => detached_upgrade(&cli),
        Some(Command::Upgrade { .. }) => run(&cli.config, log_dropped, true),
        Some(Command::Run) | None if cli.detach && cli.upgrade => detached_upgrade(&cli),
        Some(Command::Run) | None if cli.detach => {
            eprintln!(
                "switchyard: --detach goes with --upgrade (or `switchyard upgrade --detach`)"
            );
            return ExitCode::from(2);
        }
        Some(Command::Run) | None => run(&cli.config, log_dropped, cli.upgrade),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("switchyard: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    match switchyard_config::load(path) {
        Ok(cfg) => {
            let problems = switchyard_proxy::preflight(&cfg);
            if !problems.is_empty() {
                for fe in problems {
                    println!("{}: {fe}", path.display());
                }
                return ExitCode::FAILURE;
            }
            println!("{}: {}", path.display(), cfg.summary());
            ExitCode::SUCCESS
        }
        Err(e) => {
            for fe in e.field_errors() {
                println!("{}: {fe}", path.display());
            }
            ExitCode::FAILURE
        }
    }
}

/// `switchyard import-nginx`: the YAML to stdout or a file, the notes to stderr, and the same
/// verdict as `check` on the result.
fn import_nginx(file: &std::path::Path, output: Option<&std::path::Path>) -> ExitCode {
    let import = match switchyard_config::nginx::import_file(file) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("switchyard: {e}");
            return ExitCode::FAILURE;
        }
    };
    let yaml = switchyard_config::nginx::to_yaml(&import, file);
    for n in &import.notes {
        eprintln!("{n}");
    }
    let written = match output {
        Some(path) => std::fs::write(path, &yaml)
            .map(|()| path.display().to_string())
            .map_err(|e| format!("cannot write {}: {e}", path.display())),
        None => {
            print!("{yaml}");
            Ok("stdout".to_string())
        }
    };
    if let Err(e) = written {
        eprintln!("switchyard: {e}");
        return ExitCode::FAILURE;
    }
    // The same verdict as `switchyard check` on the file written: certificates are read
    // relative to the current directory, like the proxy will.
    let problems: Vec<String> = match switchyard_config::parse(&yaml) {
        Ok(cfg) => switchyard_proxy::preflight(&cfg)
            .iter()
            .map(|p| p.to_string())
            .collect(),
        Err(e) => e.field_errors().iter().map(|p| p.to_string()).collect(),
    };
    let skipped = import.notes.len();
    if problems.is_empty() {
        eprintln!(
            "switchyard: converted {} ({skipped} note(s) above); the result passes `check`",
            file.display()
        );
        ExitCode::SUCCESS
    } else {
        for p in &problems {
            eprintln!("switchyard: the converted config: {p}");
        }
        eprintln!("switchyard: converted {} ({skipped} note(s) above), but the result does not pass `check`: fix the lines above", file.display());
        ExitCode::FAILURE
    }
}

/// `switchyard healthcheck`: `GET /healthz` on this config's admin listener, 200 within 2 s.
fn healthcheck(path: &std::path::Path) -> ExitCode {
    use std::io::{Read, Write};
    let addr = match switchyard_config::load(path) {
        Ok(cfg) => cfg.admin.listen,
        Err(e) => {
            eprintln!("switchyard: {e}");
            return ExitCode::FAILURE;
        }
    };
    let Some(mut addr) = addr else {
        eprintln!(
            "switchyard: admin.listen is off in {}: nothing to check",
            path.display()
        );
        return ExitCode::FAILURE;
    };
    // A wildcard admin address is reached on loopback.
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    let timeout = std::time::Duration::from_secs(2);
    let result = (|| -> std::io::Result<String> {
        let mut s = std::net::TcpStream::connect_timeout(&addr, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
        let mut head = [0u8; 64];
        let n = s.read(&mut head)?;
        Ok(String::from_utf8_lossy(&head[..n])
            .lines()
            .next()
            .unwrap_or("")
            .to_string())
    })();
    match result {
        Ok(line) if line.starts_with("HTTP/1.1 200") || line.starts_with("HTTP/1.0 200") => {
            println!("healthy: {addr} answered {line}");
            ExitCode::SUCCESS
        }
        Ok(line) => {
            eprintln!("unhealthy: {addr} answered {line:?}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("unhealthy: {addr}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Raise the soft open-file limit to the hard limit (1024 by default on most systems is far
/// below what a proxy in front of many clients needs), and say what it is.
fn raise_open_file_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::info!(open_file_limit = n, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot create the signal runtime")
}

/// The signals switchyard acts on, taken over from their default action (which for all four
/// is to end the process at once). Installed before anything listens: a SIGTERM from systemd or
/// a SIGHUP from a deploy script that arrives a moment after the listeners opened must drain or
/// reload, not kill the process with requests in flight. Call within a Tokio runtime.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    usr1: tokio::signal::unix::Signal,
}

/// What [`Signals::recv`] got.
enum Sig {
    Stop(&'static str),
    Reload,
    ReopenLogs,
}

impl Signals {
    fn install() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        let on = |k: SignalKind, name: &str| {
            signal(k).with_context(|| format!("cannot install the {name} handler"))
        };
        Ok(Signals {
            term: on(SignalKind::terminate(), "SIGTERM")?,
            int: on(SignalKind::interrupt(), "SIGINT")?,
            hup: on(SignalKind::hangup(), "SIGHUP")?,
            usr1: on(SignalKind::user_defined1(), "SIGUSR1")?,
        })
    }

    async fn recv(&mut self) -> Sig {
        tokio::select! {
            _ = self.term.recv() => Sig::Stop("SIGTERM"),
            _ = self.int.recv() => Sig::Stop("SIGINT"),
            _ = self.hup.recv() => Sig::Reload,
            _ = self.usr1.recv() => Sig::ReopenLogs,
        }
    }

    /// Wait for SIGTERM or SIGINT (SIGHUP and SIGUSR1 are ignored).
    async fn stopped(&mut self) -> &'static str {
        loop {
            if let Sig::Stop(name) = self.recv().await {
                return name;
            }
        }
    }
}

fn run(
    path: &std::path::Path,
    log_dropped: tracing_appender::non_blocking::ErrorCounter,
    upgrade: bool,
) -> anyhow::Result<()> {
    let cfg = match switchyard_config::load(path) {
        Ok(c) => c,
        Err(e) => {
            for fe in e.field_errors() {
                eprintln!("{}: {fe}", path.display());
            }
            anyhow::bail!("invalid config {}, not starting", path.display());
        }
    };
    let opts = switchyard_proxy::StartOptions::default()
        .with_config_path(path)
        .with_log_dropped(move || log_dropped.dropped_lines() as u64);
    let rt = runtime()?;
    let mut signals = {
        let _in_rt = rt.enter();
        Signals::install()?
    };
    use sd_notify::NotifyState;
    let handle = if upgrade {
        // Under systemd (NotifyAccess=all) this process is the service's main process from
        // before the old one is told to go (it may exit within milliseconds).
        let h = switchyard_proxy::upgrade_with(cfg, opts, |step| {
            let pid = match step {
                switchyard_proxy::UpgradeStep::Serving => std::process::id(),
                switchyard_proxy::UpgradeStep::Aborted { predecessor } => predecessor,
                _ => return,
            };
            let _ = sd_notify::notify(false, &[NotifyState::MainPid(pid), NotifyState::Ready]);
        })?;
        tracing::info!(listen = ?h.listen_addrs(), control = %h.control_socket().display(), predecessor = ?h.predecessor(), "switchyard upgraded: took over from the running process");
        tell_detached_parent();
        h
    } else {
        let h = switchyard_proxy::start(cfg, opts)?;
        tracing::info!(listen = ?h.listen_addrs(), control = %h.control_socket().display(), "switchyard started");
        let _ = sd_notify::notify(false, &[NotifyState::Ready]);
        h
    };
    rt.block_on(async {
        let sig = loop {
            let event = tokio::select! {
                // A handover first: after it, a SIGTERM is for the successor's service.
                biased;
                pid = handle.handed_over() => {
                    tracing::info!(successor = pid, "handed over to a new process; finishing in-flight requests, then exiting");
                    break "upgrade";
                }
                s = signals.recv() => s,
            };
            match event {
                Sig::Stop(name) => break name,
                Sig::ReopenLogs => handle.reopen_logs(),
                Sig::Reload => match handle.reload_on_signal().await {
                    Ok(r) => tracing::info!(summary = %r.summary, needs_restart = ?r.needs_restart, "SIGHUP: config reloaded"),
                    Err(e) => tracing::error!(error = %e.message, "SIGHUP: reload refused, the running config stays"),
                },
            }
        };
        if sig != "upgrade" {
            // Not after a handover: the service goes on, in the successor.
            let _ = sd_notify::notify(false, &[NotifyState::Stopping]);
        }
        tracing::info!(signal = sig, "finishing in-flight requests, then exiting");
        let report = handle.shutdown().await;
        tracing::info!(?report, "stopped");
        Ok(())
    })
}

/// Set by `upgrade --detach` for the process it starts: its stdin is a pipe to the parent,
/// which waits for one line there.
const READY_ON_STDIN: &str = "SWITCHYARD_UPGRADE_READY_ON_STDIN";

/// In a process started by `upgrade --detach`: say "ready" on the pipe (the old process has
/// our answer now), then let go of it.
fn tell_detached_parent() {
    use std::io::Write;
    use std::os::fd::AsFd;
    if std::env::var_os(READY_ON_STDIN).is_none() {
        return;
    }
    if let Ok(fd) = std::io::stdin().as_fd().try_clone_to_owned() {
        let mut pipe = std::fs::File::from(fd);
        let _ = writeln!(pipe, "ready {}", std::process::id());
    }
}

/// `switchyard upgrade --detach`: start `switchyard --upgrade` in the background (same config,
/// same log settings, same stdout/stderr) and report how it went: 0 once it has taken over
/// (the old process has its answer), 1 with the reason if it exited first — the running
/// switchyard then keeps serving. The new process says "ready" on a pipe given as its stdin,
/// written only after the old process got the answer.
fn detached_upgrade(cli: &Cli) -> anyhow::Result<()> {
    use std::io::BufRead;
    if let Err(e) = switchyard_config::load(&cli.config) {
        for fe in e.field_errors() {
            eprintln!("{}: {fe}", cli.config.display());
        }
        anyhow::bail!("invalid config {}, nothing changed", cli.config.display());
    }
    let exe = std::env::current_exe().context("cannot find the switchyard binary")?;
    let (reader, writer) = std::io::pipe().context("cannot create a pipe")?;
    let mut child = std::process::Command::new(exe)
        .arg("--upgrade")
        .arg("-c")
        .arg(&cli.config)
        .arg("--log-level")
        .arg(&cli.log_level)
        .arg("--log-format")
        .arg(match cli.log_format {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
            LogFormat::Journald => "journald",
        })
        .env(READY_ON_STDIN, "1")
        .stdin(writer)
        .spawn()
        .context("cannot start the new process")?;
    let pid = child.id();
    // Its answer, or the end of the pipe when it exits first; bounded (the old process gives
    // a new one 30 s to start).
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufReader::new(reader).read_line(&mut line);
        let _ = tx.send(line);
    });
    match rx.recv_timeout(std::time::Duration::from_secs(45)) {
        Ok(line) if line.starts_with("ready") => {
            println!("switchyard upgraded: pid {pid} serves; the old process drains and exits");
            Ok(())
        }
        Ok(_) => {
            let status = child.wait()?;
            anyhow::bail!("the new process (pid {pid}) exited ({status}) without taking over; the running switchyard keeps serving")
        }
        Err(_) => {
            let _ = child.kill();
            anyhow::bail!("the new process (pid {pid}) did not take over within 45 s; stopped it, the running switchyard keeps serving")
        }
    }
}

fn demo(listen: SocketAddr) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut signals = Signals::install()?;
        let dir = std::env::temp_dir().join(format!("switchyard-demo-{}", std::process::id()));
        let demo = switchyard_proxy::demo::run(listen, dir.clone())
            .await
            .with_context(|| format!("cannot start the demo on {listen}"))?;
        let bin_dir = std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(|d| d.to_path_buf()))
            .filter(|d| d.join("proxyctl").exists());
        println!(
            "{}",
            switchyard_proxy::demo::walkthrough(&demo, bin_dir.as_deref())
        );
        signals.stopped().await;
        let switchyard_proxy::demo::Demo { proxy, .. } = demo;
        proxy.shutdown().await;
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    })
}

fn fake_upstream(
    listen: SocketAddr,
    name: &str,
    threads: usize,
    boot: Option<std::time::Duration>,
    fail_percent: Option<u8>,
) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut signals = Signals::install()?;
        let up = switchyard_proxy::demo::upstream::FakeUpstream::builder(name)
            .addr(listen)
            .record(false)
            .start()
            .await
            .with_context(|| format!("cannot listen on {listen}"))?;
        println!("fake upstream {name} listening on {}", up.addr());
        if let Some(p) = fail_percent {
            up.set_mode(switchyard_proxy::demo::upstream::Mode::FailShare(p));
        }
        let up = std::sync::Arc::new(up);
        if let Some(boot) = boot {
            use switchyard_proxy::demo::upstream::HealthReply;
            up.set_health(HealthReply::down());
            let booting = up.clone();
            tokio::spawn(async move {
                tokio::time::sleep(boot).await;
                booting.set_health(HealthReply::up());
            });
        }
        signals.stopped().await;
        Ok(())
    })
}
