//! `start()` and the `Handle`: the library face of the proxy (SPEC §2).
//!
//! `start` binds every listener (errors are returned, not logged from a task), builds the
//! routing snapshot, resolves DNS-named instances once, and starts two runtimes on their own
//! threads: the data plane (`threads` workers, Pingora's request path) and the control plane
//! (one thread: DNS refresh, and later health checks, the control socket and the admin
//! listener). Keeping them apart means a slow control task cannot delay requests, and heavy
//! traffic cannot starve a `proxyctl switch`.

use crate::control::{Actor, Controller, Gate, SocketHandler};
use crate::events::EventLog;
use crate::resolve::{self, Resolve, SystemResolver};
use crate::server::{self, BoundListener, DrainReport};
use crate::service::Switchyard;
use crate::snapshot::{Shared, Snapshot};
use crate::{persist, upstream::Weights};
use pingora::server::configuration::ServerConf;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use switchyard_config::Config;
use switchyard_control::protocol::{ReloadResult, Reply, Request};
use switchyard_control::{
    Change, ControlError, ControlServer, ControlSocketError, DrainResult, EventSender, Status,
};
use tokio::sync::{oneshot, watch};

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The configured address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// A TLS certificate or key could not be loaded.
    #[error("cannot load TLS certificate {} / key {}: {why}", cert.display(), key.display())]
    Tls {
        /// Certificate file.
        cert: PathBuf,
        /// Key file.
        key: PathBuf,
        /// What went wrong.
        why: String,
    },
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
        }
    }
}

/// A running proxy. Every control operation is a method here; the control socket is a thin
/// adapter over it. Dropping the handle stops the proxy (gracefully, within `grace_period`).
#[derive(Debug)]
pub struct Handle {
    controller: Arc<Controller>,
    addrs: Vec<SocketAddr>,
    admin_addr: Option<SocketAddr>,
    registry: prometheus::Registry,
    access_log: Arc<crate::access_log::AccessLog>,
    shutdown: watch::Sender<bool>,
    data_done: Option<oneshot::Receiver<DrainReport>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// Bound on the first DNS pass at start-up: long enough for a resolver round trip, short
/// enough that an unresolvable name (a container not created yet) doesn't hold up the start.
const INITIAL_RESOLVE_BOUND: Duration = Duration::from_secs(3);

/// Checks that need the machine, not just the file (`switchyard check` runs them, like
/// `nginx -t`): TLS certificates and keys load. Each problem names its config path.
pub fn preflight(config: &Config) -> Vec<switchyard_config::FieldError> {
    let root = switchyard_config::FieldPath::root().key("listen");
    config
        .listen
        .iter()
        .enumerate()
        .filter_map(|(i, l)| {
            let t = l.tls.as_ref()?;
            server::check_tls(t)
                .err()
                .map(|e| switchyard_config::FieldError {
                    path: root.index(i).key("tls"),
                    message: e.to_string(),
                })
        })
        .collect()
}

/// See the comment where it is used.
const UPSTREAM_POOL_PER_THREAD: usize = 4096;

/// Start a proxy from a validated config.
pub fn start(config: Config, opts: StartOptions) -> Result<Handle, StartError> {
    let listeners: Vec<BoundListener> = config
        .listen
        .iter()
        .map(server::bind)
        .collect::<Result<_, _>>()?;
    let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.addr).collect();
    for a in &addrs {
        tracing::info!(addr = %a, "listening");
    }
    let admin_listener = match config.admin.listen {
        Some(addr) => {
            Some(crate::admin::bind(addr).map_err(|source| StartError::Admin { addr, source })?)
        }
        None => None,
    };
    let admin_addr = admin_listener.as_ref().and_then(|l| l.local_addr().ok());
    let control_socket = ControlServer::bind(&config.control.socket, config.control.mode)?;
    let restored = persist::load(&config.state_file, &config);
    if !restored.is_empty() {
        tracing::info!(path = %config.state_file.display(), upstreams = restored.len(), "routing state restored from the state file");
    }
    let health_client = crate::health::client().map_err(|e| StartError::Runtime {
        what: "health-check client",
        source: std::io::Error::other(e),
    })?;
    let config = Arc::new(config);
    let shared = Arc::new(Shared::new(Snapshot::build(
        config.clone(),
        &restored,
        None,
    )));
    let registry = opts.registry.clone().unwrap_or_default();
    let metrics = Arc::new(crate::metrics::Metrics::register(
        &registry,
        shared.clone(),
    )?);
    for u in &config.upstreams {
        metrics.touch_upstream(&u.name);
    }
    let events_path = config.state_file.with_extension("events.jsonl");
    let (events, events_writer) = EventLog::new(Some(&events_path), metrics.events_dropped.clone());
    let events = Arc::new(events);

    let access_log = Arc::new(
        crate::access_log::AccessLog::start(
            &config.access_log,
            config.access_log_format,
            metrics.access_log_dropped.clone(),
        )
        .map_err(StartError::AccessLog)?,
    );
    let controller = Arc::new(Controller {
        shared: shared.clone(),
        state_file: config.state_file.clone(),
        control_socket: config.control.socket.clone(),
        config_path: opts.config_path.clone(),
        resolver: opts.resolver.clone(),
        events: events.clone(),
        metrics: metrics.clone(),
        started: Instant::now(),
    });
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let mut threads = Vec::new();

    // Control plane.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
    let (data_stopped_tx, data_stopped_rx) = oneshot::channel::<()>();
    {
        let shared = shared.clone();
        let resolver = opts.resolver.clone();
        let handler = Arc::new(SocketHandler(controller.clone()));
        let shutdown = shutdown_rx.clone();
        let events = events.clone();
        let admin = crate::admin::Admin {
            controller: controller.clone(),
            registry: registry.clone(),
            shutdown: shutdown_rx.clone(),
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| StartError::Runtime {
                what: "control runtime",
                source,
            })?;
        threads.push(spawn_thread("switchyard-control", move || {
            rt.block_on(async move {
                let _ = tokio::time::timeout(
                    INITIAL_RESOLVE_BOUND,
                    resolve::refresh_all(&shared, &*resolver),
                )
                .await;
                let _ = ready_tx.send(());
                if let Some(w) = events_writer {
                    tokio::spawn(w.run());
                }
                let mut stop = shutdown.clone();
                tokio::select! {
                    _ = resolve::run(shared.clone(), resolver) => {}
                    _ = crate::health::run(shared.clone(), events, health_client) => {}
                    _ = async move {
                        match admin_listener {
                            Some(l) => crate::admin::serve(l, admin).await,
                            None => std::future::pending().await,
                        }
                    } => {}
                    // The control socket stays up while the data plane drains, so `proxyctl
                    // status` can watch the drain; it closes when the runtime stops.
                    _ = control_socket.serve(handler, std::future::pending()) => {}
                    _ = async move {
                        let _ = stop.wait_for(|s| *s).await;
                        let _ = data_stopped_rx.await;
                    } => {}
                }
            });
        })?);
    }
    let _ = ready_rx.recv_timeout(INITIAL_RESOLVE_BOUND + Duration::from_secs(1));

    // Data plane.
    let (done_tx, done_rx) = oneshot::channel();
    {
        let conf = ServerConf {
            threads: config.threads,
            // Our own retry accounting bounds attempts; this is only Pingora's outer ceiling.
            max_retries: 16,
            // Idle upstream connections kept per worker thread. Pingora's default (128) makes
            // every request beyond 128 concurrent ones open and close its own upstream
            // connection: at 1k clients that tripled the CPU per request (BENCHMARKS.md).
            upstream_keepalive_pool_size: UPSTREAM_POOL_PER_THREAD,
            ..Default::default()
        };
        let active = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let app = pingora::proxy::http_proxy(
            &Arc::new(conf),
            Switchyard {
                active: active.clone(),
                shared: shared.clone(),
                events: events.clone(),
                metrics: metrics.clone(),
                access_log: access_log.clone(),
            },
        );
        // One current-thread runtime per worker thread, each accepting on every listener and
        // serving what it accepted (nginx's model; Pingora's "no steal" flavour): measured
        // cheaper per request than tokio's work-stealing scheduler (docs/BENCHMARKS.md).
        let app = Arc::new(server::App::new(app, shared.clone()));
        let listeners = Arc::new(listeners);
        let mut workers = Vec::new();
        for i in 0..config.threads {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|source| StartError::Runtime {
                    what: "data-plane runtime",
                    source,
                })?;
            let sockets = listeners
                .iter()
                .map(|l| l.try_clone())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|source| StartError::Runtime {
                    what: "listener clone",
                    source,
                })?;
            let (app, shutdown, active) = (app.clone(), shutdown_rx.clone(), active.clone());
            let grace = config.grace_period;
            workers.push(spawn_thread(
                &format!("switchyard-worker-{i}"),
                move || {
                    let report = rt.block_on(server::serve(app, sockets, shutdown, grace, active));
                    // Whatever is still running after the grace period is cancelled here.
                    rt.shutdown_timeout(Duration::from_secs(1));
                    report
                },
            )?);
        }
        drop(listeners);
        threads.push(spawn_thread("switchyard-main", move || {
            let mut report = server::DrainReport::default();
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
    })
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

impl Handle {
    /// The addresses the listeners are bound to, in config order (real ports when the config
    /// said port 0).
    pub fn listen_addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// The current state of every upstream, pool and instance.
    pub fn status(&self) -> Status {
        self.controller.status()
    }

    /// Give `pool` 100% of `upstream` (`None`: the only upstream), if all its instances are
    /// healthy (error `unhealthy` otherwise). Every request that starts after this returns is
    /// routed by the new weights. [`Self::execute`] with `Request::Switch` offers
    /// `--min-healthy`, `--wait-healthy`, `--force` and `--drain`.
    pub fn switch(&self, upstream: Option<&str>, pool: &str) -> Result<Change, ControlError> {
        self.controller
            .switch(upstream, pool, Gate::default(), Actor::Library)
    }

    /// Set one pool's weight; the main pool absorbs the difference. A pool that gets traffic
    /// for the first time must be healthy.
    pub fn set_weight(
        &self,
        upstream: Option<&str>,
        pool: &str,
        weight: u32,
    ) -> Result<Change, ControlError> {
        self.controller
            .set_weight(upstream, pool, weight, Gate::default(), Actor::Library)
    }

    /// Set every pool's weight (unnamed pools get 0; the sum must be 100). Pools that get
    /// traffic for the first time must be healthy.
    pub fn set_weights(
        &self,
        upstream: Option<&str>,
        weights: &Weights,
    ) -> Result<Change, ControlError> {
        self.controller
            .set_weights(upstream, weights, Gate::default(), Actor::Library)
    }

    /// The latest `limit` audit records, oldest first.
    pub fn events(&self, limit: usize) -> Vec<switchyard_control::AuditRecord> {
        self.controller.events.recent(limit)
    }

    /// Restore the weights from before the last weight change.
    pub fn rollback(&self, upstream: Option<&str>) -> Result<Change, ControlError> {
        self.controller.rollback(upstream, Actor::Library)
    }

    /// Wait until `pool` (at weight 0) has no request in flight, at most `timeout` (default:
    /// the upstream's `drain_timeout`). A timeout is an error of code `timeout`.
    pub async fn drain(
        &self,
        upstream: Option<&str>,
        pool: &str,
        timeout: Option<Duration>,
    ) -> Result<DrainResult, ControlError> {
        self.controller
            .drain(upstream, pool, timeout, &EventSender::discard())
            .await
    }

    /// Replace a pool's instances (`host:port` each). In-flight requests on removed
    /// instances finish.
    pub async fn pool_set(
        &self,
        upstream: Option<&str>,
        pool: &str,
        instances: &[&str],
    ) -> Result<Change, ControlError> {
        self.execute_change(Request::PoolSet {
            upstream: upstream.map(str::to_string),
            pool: pool.to_string(),
            instances: instances.iter().map(|s| s.to_string()).collect(),
        })
        .await
    }

    /// Re-read the config file given in [`StartOptions::config_path`]; on any problem the
    /// running config stays and every problem is returned.
    pub async fn reload(&self) -> Result<ReloadResult, ControlError> {
        self.controller.reload(Actor::Library).await
    }

    /// Reload because of SIGHUP (logged as such).
    #[doc(hidden)]
    pub async fn reload_on_signal(&self) -> Result<ReloadResult, ControlError> {
        self.controller.reload(Actor::Signal).await
    }

    /// Carry out a control-protocol request, exactly as the control socket would.
    pub async fn execute(&self, req: Request) -> Reply {
        self.controller
            .execute(req, Actor::Library, &EventSender::discard())
            .await
    }

    async fn execute_change(&self, req: Request) -> Result<Change, ControlError> {
        let reply = self.execute(req).await;
        match (reply.error, reply.result) {
            (Some(e), _) => Err(e),
            (None, Some(v)) => serde_json::from_value(v).map_err(|e| {
                ControlError::new(switchyard_control::ErrorCode::Internal, e.to_string())
            }),
            (None, None) => Err(ControlError::new(
                switchyard_control::ErrorCode::Internal,
                "empty reply",
            )),
        }
    }

    /// Where the admin listener is bound (`None` with `admin.listen: off`).
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// The metrics in the Prometheus text format (what `GET /metrics` answers).
    pub fn metrics_text(&self) -> String {
        crate::metrics::render(&self.registry)
    }

    /// Reopen the access log file (SIGUSR1; logrotate's convention).
    pub fn reopen_logs(&self) {
        self.access_log.reopen();
    }

    /// The control socket path.
    pub fn control_socket(&self) -> &Path {
        &self.controller.control_socket
    }

    /// Stop accepting, let in-flight requests finish (bounded by `grace_period`), stop.
    /// Returns as soon as the last connection is done.
    pub async fn shutdown(mut self) -> DrainReport {
        let _ = self.shutdown.send(true);
        let report = match self.data_done.take() {
            Some(rx) => rx.await.unwrap_or_default(),
            None => DrainReport::default(),
        };
        for t in self.threads.drain(..) {
            // Both threads have finished or are finishing (the control loop exits on the
            // same signal); joining is immediate.
            let _ = t.join();
        }
        report
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}
