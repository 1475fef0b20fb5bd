//! Starting and running a proxy: [`start`] and the [`Handle`], the library face of the proxy
//! (SPEC §2).
//!
//! `start` binds every listener (errors are returned, not logged from a task), builds the
//! routing snapshot, resolves DNS-named instances once, and starts two runtimes on their own
//! threads: the data plane (`threads` workers, Pingora's request path) and the control plane
//! (one thread: DNS refresh, and later health checks, the control socket and the admin
//! listener). Keeping them apart means a slow control task cannot delay requests, and heavy
//! traffic cannot starve a `proxyctl switch`.

mod handle;
pub(crate) mod upgrade;

pub use handle::Handle;
pub use upgrade::UpgradeError;

use crate::checks::dns::{self, Resolve, SystemResolver};
use crate::listen::{self, BoundListener, ListenError};
use crate::ops::Controller;
use crate::proxy::Switchyard;
use crate::routing::sticky::StickyKey;
use crate::state::{persist, Shared, Snapshot};
use crate::surfaces;
use crate::telemetry::events::EventLog;
use pingora::server::configuration::ServerConf;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use switchyard_config::Config;
use switchyard_control::{ControlServer, ControlSocketError};
use tokio::sync::{oneshot, watch};

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// A listener could not be bound, or its certificate loaded.
    #[error(transparent)]
    Listen(#[from] ListenError),
    /// The control socket could not be created.
    #[error(transparent)]
    Control(#[from] ControlSocketError),
    /// The admin listener could not be bound.
    #[error("cannot listen on {addr} (admin.listen): {source}")]
    Admin {
        /// The configured address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The access log could not be opened.
    #[error("cannot open the access log: {0}")]
    AccessLog(std::io::Error),
    /// Metrics could not be registered (a name clash in a registry passed in).
    #[error("cannot register metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The `sticky_key_file` could not be read or is too short.
    #[error("sticky_key_file: {0}")]
    StickyKey(String),
    /// The upgrade socket (for a later binary upgrade) could not be created.
    #[error("cannot create the upgrade socket {}: {source}", path.display())]
    UpgradeSocket {
        /// Its path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A runtime or thread could not be created.
    #[error("cannot start {what}: {source}")]
    Runtime {
        /// Which part.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Options for embedding: things that are not in the config file.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct StartOptions {
    /// Resolves DNS-named instances. Default: the system resolver.
    pub resolver: Arc<dyn Resolve>,
    /// The file the config came from, re-read by `reload` (SIGHUP, `proxyctl reload`).
    pub config_path: Option<PathBuf>,
    /// Registry for the metrics. Default: a fresh one per proxy (no process globals).
    pub registry: Option<prometheus::Registry>,
    /// Application log lines dropped so far (exported as `switchyard_log_dropped_total`);
    /// the binary's non-blocking log writer counts them.
    pub log_dropped: Option<LogDropped>,
}

/// Reads a count of dropped application log lines.
#[derive(Clone)]
pub struct LogDropped(pub(crate) Arc<dyn Fn() -> u64 + Send + Sync>);

impl std::fmt::Debug for LogDropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LogDropped({})", (self.0)())
    }
}

impl StartOptions {
    /// Use this resolver for DNS-named instances.
    pub fn with_resolver(mut self, resolver: Arc<dyn Resolve>) -> Self {
        self.resolver = resolver;
        self
    }

    /// Register the metrics on this registry.
    pub fn with_registry(mut self, registry: prometheus::Registry) -> Self {
        self.registry = Some(registry);
        self
    }

    /// Export this count of dropped application log lines as `switchyard_log_dropped_total`.
    pub fn with_log_dropped(mut self, count: impl Fn() -> u64 + Send + Sync + 'static) -> Self {
        self.log_dropped = Some(LogDropped(Arc::new(count)));
        self
    }

    /// Remember the config file for `reload`.
    pub fn with_config_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.config_path = Some(path.into());
        self
    }
}

impl Default for StartOptions {
    fn default() -> Self {
        StartOptions {
            resolver: Arc::new(SystemResolver),
            config_path: None,
            registry: None,
            log_dropped: None,
        }
    }
}

/// Bound on the first DNS pass at start-up: long enough for a resolver round trip, short
/// enough that an unresolvable name (a container not created yet) doesn't hold up the start.
const INITIAL_RESOLVE_BOUND: Duration = Duration::from_secs(3);

/// Idle upstream keep-alive connections kept (one pool shared by every worker thread), at
/// most. See the comment where it is used.
const UPSTREAM_POOL: usize = 4096;

/// File descriptors kept for the proxy's own use (listeners, control socket, logs, health
/// checks, DNS).
const FD_RESERVE: u64 = 64;

/// Start a proxy from a validated config.
pub fn start(config: Config, opts: StartOptions) -> Result<Handle, StartError> {
    start_on(config, opts, None)
}

/// Take over from the switchyard running with the same `control.socket` (binary upgrade, SPEC
/// §10; see `upgrade`): its listening sockets, its state, its instances' health. When this
/// returns `Ok`, the new proxy serves and the old one has been told to stop accepting and
/// drain. On an error the old one keeps serving.
pub fn upgrade(config: Config, opts: StartOptions) -> Result<Handle, UpgradeError> {
    upgrade_with(config, opts, |_| {})
}

/// Where an upgrade is, for [`upgrade_with`]'s observer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum UpgradeStep {
    /// The new proxy serves; the old one is about to be told (the binary tells systemd its
    /// new main pid here, before the old process can exit).
    Serving,
    /// The old one did not step down after all: it goes on serving (the binary gives systemd
    /// its pid back). This process drains what it accepted and stops.
    Aborted {
        /// The old process.
        predecessor: u32,
    },
}

/// [`upgrade`], telling `observe` where it is.
pub fn upgrade_with(
    config: Config,
    opts: StartOptions,
    mut observe: impl FnMut(UpgradeStep),
) -> Result<Handle, UpgradeError> {
    let mut t = upgrade::take_over(&config.control.socket)?;
    let predecessor = t.predecessor;
    // The state is handed over through the state file: both must use the same one.
    let ours = std::fs::canonicalize(&config.state_file).unwrap_or(config.state_file.clone());
    if ours != t.state_file {
        let why = format!(
            "state_file {} is not the running switchyard's ({}); a binary upgrade keeps the state file (change it with a restart)",
            config.state_file.display(),
            t.state_file.display()
        );
        let _ = t.answer(Err(why.clone()));
        return Err(UpgradeError::Incompatible(why));
    }
    let (control_path, control_mode) = (config.control.socket.clone(), config.control.mode);
    match start_on(config, opts, Some(&mut t)) {
        Ok(mut h) => {
            observe(UpgradeStep::Serving);
            if let Err(e) = t.answer(Ok(())) {
                // The old process did not step down: it goes on, and this one must not serve
                // next to it. Drain what was accepted meanwhile, then stop.
                observe(UpgradeStep::Aborted { predecessor });
                drain_blocking(h);
                return Err(e);
            }
            // Now the files are this process's: the upgrade socket moves into place, the
            // control socket takes the configured mode, changes are accepted.
            if let Some(p) = &h.upgrade_placement {
                if let Err(e) = p.place() {
                    tracing::warn!(error = %e, "cannot place the upgrade socket; a later binary upgrade will not find this process");
                }
            }
            h.control_owns_path
                .store(true, std::sync::atomic::Ordering::Release);
            {
                use std::os::unix::fs::PermissionsExt;
                let _ = std::fs::set_permissions(
                    &control_path,
                    std::fs::Permissions::from_mode(control_mode),
                );
            }
            h.controller.shared.thaw();
            h.predecessor = Some(predecessor);
            tracing::info!(
                predecessor,
                "upgrade: serving on the sockets taken over; the old process drains"
            );
            Ok(h)
        }
        Err(e) => {
            let _ = t.answer(Err(e.to_string()));
            Err(e.into())
        }
    }
}

/// Stop a proxy gracefully from synchronous code (which may run inside a runtime's blocking
/// pool: a thread of its own drives the drain).
fn drain_blocking(h: Handle) {
    let drain = std::thread::spawn(move || {
        if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            rt.block_on(h.shutdown());
        }
    });
    let _ = drain.join();
}

fn start_on(
    config: Config,
    opts: StartOptions,
    mut takeover: Option<&mut upgrade::Takeover>,
) -> Result<Handle, StartError> {
    let listeners: Vec<BoundListener> = config
        .listen
        .iter()
        .map(|l| {
            match takeover
                .as_deref_mut()
                .and_then(|t| t.take_listener(l.addr))
            {
                Some(socket) => listen::adopt(l, socket),
                None => listen::bind(l),
            }
        })
        .collect::<Result<_, _>>()?;
    let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.addr).collect();
    for a in &addrs {
        tracing::info!(addr = %a, "listening");
    }
    let admin_listener = match config.admin.listen {
        Some(addr) => match takeover.as_deref_mut().and_then(|t| t.take_admin(addr)) {
            Some(l) => {
                l.set_nonblocking(true)
                    .map_err(|source| StartError::Admin { addr, source })?;
                Some(l)
            }
            None => Some(
                surfaces::admin::bind(addr).map_err(|source| StartError::Admin { addr, source })?,
            ),
        },
        None => None,
    };
    let admin_addr = admin_listener.as_ref().and_then(|l| l.local_addr().ok());
    let control_socket = match takeover.as_deref_mut().and_then(|t| t.control.take()) {
        Some(l) => {
            let c = ControlServer::adopt(l, &config.control.socket)?;
            // Still the old process's file until it has our answer.
            c.owns_path()
                .store(false, std::sync::atomic::Ordering::Release);
            c
        }
        None => ControlServer::bind(&config.control.socket, config.control.mode)?,
    };
    let control_owns_path = control_socket.owns_path();
    // What a successor would take over: duplicates of every listening socket.
    let handover = {
        use upgrade::Offered;
        let io = |source| StartError::UpgradeSocket {
            path: upgrade::socket_path(&config.control.socket),
            source,
        };
        let mut sockets = Vec::new();
        for (l, cfg) in listeners.iter().zip(&config.listen) {
            sockets.push((
                Offered::Listen {
                    configured: cfg.addr,
                    bound: l.addr,
                },
                l.dup_fd().map_err(io)?,
            ));
        }
        if let (Some(l), Some(configured)) = (&admin_listener, config.admin.listen) {
            sockets.push((
                Offered::Admin { configured },
                l.try_clone().map_err(io)?.into(),
            ));
        }
        sockets.push((
            Offered::Control,
            control_socket.listener().try_clone().map_err(io)?.into(),
        ));
        // A new process of an upgrade moves its upgrade socket into place only once the old
        // one has its answer. One that cannot be created (a path too long for a Unix socket)
        // means no binary upgrade for this process, not no proxy.
        match upgrade::HandoverServer::bind(
            &config.control.socket,
            sockets,
            &config.state_file,
            takeover.is_none(),
        ) {
            Ok(h) => Some(h),
            Err(e) => {
                tracing::warn!(error = %io(e), "binary upgrades are off for this process");
                None
            }
        }
    };
    let upgrade_placement = handover.as_ref().map(|h| h.placement());
    let mut restored = persist::load(&config.state_file, &config);
    if let Some(path) = &config.sticky_key_file {
        // The shared secret wins over the key in the state file: every proxy given the same
        // file issues and honors the same cookies.
        restored.sticky = Some(StickyKey::from_file(path).map_err(StartError::StickyKey)?);
    }
    if !restored.upstreams.is_empty() {
        tracing::info!(path = %config.state_file.display(), upstreams = restored.upstreams.len(), "routing state restored from the state file");
    }
    let health_client = crate::checks::active::client().map_err(|e| StartError::Runtime {
        what: "health-check client",
        source: std::io::Error::other(e),
    })?;
    let config = Arc::new(config);
    let shared = Arc::new(Shared::new(Snapshot::build(
        config.clone(),
        &restored,
        None,
        StickyKey::generate,
    )));
    if let Some(t) = takeover.as_deref() {
        upgrade::seed_health(&shared, &t.health);
        // Nothing is acknowledged before the old process has our answer (`upgrade_with`).
        shared.hold();
    }
    if restored.sticky.is_none() && shared.load().upstreams.iter().any(|u| u.canary_active()) {
        // A canary runs (restored from an older state file) and cookies are about to be
        // issued with a new key: keep it, or a restart before the next change would move
        // every client again.
        if let Err(e) = persist::save(&config.state_file, &shared.load()) {
            tracing::warn!(path = %config.state_file.display(), error = %e, "cannot save the new sticky-cookie key; a restart will issue new cookies");
        }
    }
    let registry = opts.registry.clone().unwrap_or_default();
    let metrics = Arc::new(crate::telemetry::metrics::Metrics::register(
        &registry,
        shared.clone(),
        crate::telemetry::metrics::Probes {
            log_dropped: opts.log_dropped.clone().map(|d| d.0),
            control_connections: Some(control_socket.open_connections()),
        },
    )?);
    for u in &config.upstreams {
        metrics.touch_upstream(&u.name);
    }
    let events_path = config.state_file.with_extension("events.jsonl");
    let (events, events_writer) = EventLog::new(Some(&events_path), metrics.events_dropped.clone());
    let events = Arc::new(events);

    let access_log = Arc::new(
        crate::telemetry::access_log::AccessLog::start(
            &config.access_log,
            config.access_log_format,
            metrics.access_log_dropped.clone(),
        )
        .map_err(StartError::AccessLog)?,
    );
    let fleet = config
        .fleet
        .clone()
        .map(|f| crate::fleet::Fleet::new(f, &registry));
    let controller = Arc::new(Controller {
        shared: shared.clone(),
        state_file: config.state_file.clone(),
        control_socket: config.control.socket.clone(),
        config_path: opts.config_path.clone(),
        resolver: opts.resolver.clone(),
        events: events.clone(),
        metrics: metrics.clone(),
        access_log: access_log.clone(),
        started: Instant::now(),
        observed: Default::default(),
        fleet: fleet.clone(),
        tls: config
            .listen
            .iter()
            .zip(&listeners)
            .enumerate()
            .filter_map(|(i, (c, l))| Some((i, c.addr, l.certs.clone()?)))
            .collect(),
    });
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (handed_over_tx, handed_over_rx) = watch::channel(None);
    let lingering = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut threads = Vec::new();

    // Control plane.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
    let (data_stopped_tx, data_stopped_rx) = oneshot::channel::<()>();
    {
        let shared = shared.clone();
        let resolver = opts.resolver.clone();
        let handler = Arc::new(surfaces::control::SocketHandler(controller.clone()));
        let autopilot = controller.clone();
        let fleet_ctl = controller.clone();
        let fleet_stop = shutdown_rx.clone();
        let fleet_handed_over = handed_over_rx.clone();
        // Leaving the fleet (revoking the lease: its keys and leadership go at once) is
        // awaited where this runtime's work ends, so it is not cut short.
        let (fleet_on_handover, fleet_on_stop) = (fleet.clone(), fleet.clone());
        let shutdown = shutdown_rx.clone();
        let events = events.clone();
        let admin = surfaces::admin::Admin {
            controller: controller.clone(),
            registry: registry.clone(),
            shutdown: shutdown_rx.clone(),
        };
        let handover_ctx = upgrade::HandoverContext {
            shared: shared.clone(),
            control_owns_path: control_socket.owns_path(),
            lingering: lingering.clone(),
            shutdown: shutdown_tx.clone(),
            handed_over: handed_over_tx,
        };
        let handover_stop = shutdown_rx.clone();
        let handed_over = handed_over_rx.clone();
        let rt = current_thread_runtime("control runtime")?;
        threads.push(spawn_thread("switchyard-control", move || {
            rt.block_on(async move {
                let _ = tokio::time::timeout(
                    INITIAL_RESOLVE_BOUND,
                    dns::refresh_all(&shared, &*resolver),
                )
                .await;
                let _ = ready_tx.send(());
                if let Some(w) = events_writer {
                    tokio::spawn(w.run());
                }
                let mut stop = shutdown.clone();
                tokio::select! {
                    _ = dns::run(shared.clone(), resolver) => {}
                    _ = crate::checks::active::run(shared.clone(), events, health_client) => {}
                    _ = crate::ops::autopilot::run(autopilot) => {}
                    _ = async move {
                        match fleet {
                            Some(f) => {
                                crate::fleet::run(fleet_ctl, f, fleet_stop, fleet_handed_over).await
                            }
                            None => std::future::pending().await,
                        }
                    } => {}
                    _ = async move {
                        match admin_listener {
                            Some(l) => surfaces::admin::serve(l, admin).await,
                            None => std::future::pending().await,
                        }
                    } => {}
                    // The control socket stays up while the data plane drains, so `proxyctl
                    // status` can watch the drain; it closes when the runtime stops.
                    _ = control_socket.serve(handler, std::future::pending()) => {}
                    // After a handover the successor serves the control socket, the admin
                    // listener and the health checks: all of this ends here. After a shutdown
                    // the upgrade socket is closed and the rest stays until the drain ends.
                    _ = async move {
                        if let Some(h) = handover {
                            h.serve(handover_ctx, handover_stop).await;
                        }
                        if handed_over.borrow().is_none() {
                            std::future::pending::<()>().await;
                        }
                        if let Some(f) = fleet_on_handover {
                            let _ = tokio::time::timeout(Duration::from_secs(2), crate::fleet::leave(&f)).await;
                        }
                    } => {}
                    _ = async move {
                        let _ = stop.wait_for(|s| *s).await;
                        let _ = data_stopped_rx.await;
                        if let Some(f) = fleet_on_stop {
                            let _ = tokio::time::timeout(Duration::from_secs(2), crate::fleet::leave(&f)).await;
                        }
                    } => {}
                }
            });
        })?);
    }
    let _ = ready_rx.recv_timeout(INITIAL_RESOLVE_BOUND + Duration::from_secs(1));

    // Data plane.
    let (done_tx, done_rx) = oneshot::channel();
    // The fast path can be turned off (every request through Pingora's path), for a
    // comparison or should it misbehave: SWITCHYARD_FAST_PATH=off (or 0, false, no).
    let fast_path = !std::env::var("SWITCHYARD_FAST_PATH").is_ok_and(|v| {
        matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "off" | "0" | "false" | "no"
        )
    });
    if !fast_path {
        tracing::info!("fast path off (SWITCHYARD_FAST_PATH): every request through Pingora");
    }
    let fast_served = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let budget = fd_budget(config.max_connections);
    {
        let conf = ServerConf {
            threads: config.threads,
            // Our own retry accounting bounds attempts; this is only Pingora's outer ceiling.
            max_retries: 16,
            // Idle upstream connections kept. Pingora's default (128) makes every request
            // beyond 128 concurrent ones open and close its own upstream connection: at 1k
            // clients that tripled the CPU per request (BENCHMARKS.md).
            // Half the budget when the fast path keeps the other half (in lists of its own,
            // one per worker), all of it when the fast path is off.
            upstream_keepalive_pool_size: if fast_path {
                (budget.upstream_pool / 2).max(1)
            } else {
                budget.upstream_pool
            },
            ..Default::default()
        };
        let active = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let logic = Switchyard {
            active: active.clone(),
            fast_served: fast_served.clone(),
            shared: shared.clone(),
            events: events.clone(),
            metrics: metrics.clone(),
            access_log: access_log.clone(),
        };
        // The fast path keeps its idle upstream connections in lists of its own, one per
        // worker: the other half of the budget, shared out.
        crate::proxy::fast::set_capacity(budget.upstream_pool / 2 / config.threads.max(1));
        let mut app = pingora::proxy::http_proxy(&Arc::new(conf), logic.clone());
        // One current-thread runtime per worker thread, each accepting on every listener and
        // serving what it accepted (nginx's model; Pingora's "no steal" flavour): measured
        // cheaper per request than tokio's work-stealing scheduler (docs/BENCHMARKS.md).
        // h2 connections (TLS + ALPN) are Pingora's: close them when idle as long as an idle
        // HTTP/1 keep-alive connection would be kept.
        let mut h2 = pingora::apps::HttpServerOptions::default();
        h2.h2_idle_timeout = Some(config.keepalive_timeout.max(Duration::from_secs(1)));
        app.server_options = Some(h2);
        let app = Arc::new(listen::App::new(
            app,
            fast_path.then_some(logic),
            shared.clone(),
            metrics.unrouted.clone(),
            Arc::new(listen::Connections::new(budget.clients)),
            lingering,
        ));
        let listeners = Arc::new(listeners);
        let mut workers = Vec::new();
        for i in 0..config.threads {
            let rt = current_thread_runtime("data-plane runtime")?;
            let sockets = listeners
                .iter()
                .map(|l| l.try_clone())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|source| StartError::Runtime {
                    what: "listener clone",
                    source,
                })?;
            let (app, shutdown, active) = (app.clone(), shutdown_rx.clone(), active.clone());
            workers.push(spawn_thread(
                &format!("switchyard-worker-{i}"),
                move || {
                    let report = rt.block_on(listen::serve(app, sockets, shutdown, active));
                    // Whatever is still running after the grace period is cancelled here.
                    rt.shutdown_timeout(Duration::from_secs(1));
                    report
                },
            )?);
        }
        drop(listeners);
        threads.push(spawn_thread("switchyard-main", move || {
            let mut report = listen::DrainReport::default();
            for w in workers {
                if let Ok(r) = w.join() {
                    report.abandoned_requests = report.abandoned_requests.max(r.abandoned_requests);
                    report.elapsed = report.elapsed.max(r.elapsed);
                }
            }
            let _ = data_stopped_tx.send(());
            let _ = done_tx.send(report);
        })?);
    }

    Ok(Handle {
        controller,
        addrs,
        admin_addr,
        registry,
        access_log,
        shutdown: shutdown_tx,
        data_done: Some(done_rx),
        threads,
        handed_over: handed_over_rx,
        predecessor: None,
        upgrade_placement,
        control_owns_path,
        fast_served,
    })
}

/// How the open-file limit is shared out.
#[derive(Debug, Clone, Copy)]
struct FdBudget {
    /// Client connections at most: each may hold an upstream connection too.
    clients: usize,
    /// Idle upstream keep-alive connections kept at most.
    upstream_pool: usize,
}

/// Share the open-file limit: a few descriptors for the proxy itself, a quarter of the rest
/// (at most [`UPSTREAM_POOL`]) for idle upstream connections — after a switch, connections to
/// the old pool's epoch linger there until `idle_timeout` — and the rest for client
/// connections with one upstream connection each. Said once at start when the client share is
/// below `max_connections`.
fn fd_budget(max_connections: usize) -> FdBudget {
    let soft = match rlimit::getrlimit(rlimit::Resource::NOFILE) {
        Ok((soft, _)) => soft,
        Err(_) => u64::MAX,
    };
    let budget = soft.saturating_sub(FD_RESERVE);
    let pool = (budget / 4).min(UPSTREAM_POOL as u64);
    let clients = usize::try_from((budget - pool) / 2).unwrap_or(usize::MAX);
    if clients < max_connections {
        tracing::warn!(
            open_file_limit = soft,
            max_connections,
            effective = clients,
            "the open-file limit allows fewer client connections than max_connections; raise it (systemd LimitNOFILE, ulimit -n)"
        );
    }
    FdBudget {
        clients: clients.max(1),
        upstream_pool: usize::try_from(pool).unwrap_or(UPSTREAM_POOL).max(1),
    }
}

fn current_thread_runtime(what: &'static str) -> Result<tokio::runtime::Runtime, StartError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| StartError::Runtime { what, source })
}

fn spawn_thread<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<std::thread::JoinHandle<T>, StartError> {
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(f)
        .map_err(|source| StartError::Runtime {
            what: "thread",
            source,
        })
}
