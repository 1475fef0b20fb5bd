//! `start()` and the `Handle`: the library face of the proxy (SPEC §2).
//!
//! `start` binds every listener (errors are returned, not logged from a task), builds the
//! routing snapshot, resolves DNS-named instances once, and starts two runtimes on their own
//! threads: the data plane (`threads` workers, Pingora's request path) and the control plane
//! (one thread: DNS refresh, and later health checks, the control socket and the admin
//! listener). Keeping them apart means a slow control task cannot delay requests, and heavy
//! traffic cannot starve a `proxyctl switch`.

use crate::resolve::{self, Resolve, SystemResolver};
use crate::server::{self, BoundListener, DrainReport};
use crate::service::Switchyard;
use crate::snapshot::{Shared, Snapshot};
use pingora::server::configuration::ServerConf;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use switchyard_config::Config;
use switchyard_control::protocol::{InstanceStatus, PoolPhase, PoolStatus, UpstreamStatus};
use switchyard_control::{Status, PROTOCOL_VERSION};
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
}

impl StartOptions {
    /// Use this resolver for DNS-named instances.
    pub fn with_resolver(mut self, resolver: Arc<dyn Resolve>) -> Self {
        self.resolver = resolver;
        self
    }
}

impl Default for StartOptions {
    fn default() -> Self {
        StartOptions {
            resolver: Arc::new(SystemResolver),
        }
    }
}

/// A running proxy. Every control operation is a method here; the control socket is a thin
/// adapter over it. Dropping the handle stops the proxy (gracefully, within `grace_period`).
#[derive(Debug)]
pub struct Handle {
    shared: Arc<Shared>,
    addrs: Vec<SocketAddr>,
    started: Instant,
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
            server::tls_acceptor(t, l.http2)
                .err()
                .map(|e| switchyard_config::FieldError {
                    path: root.index(i).key("tls"),
                    message: e.to_string(),
                })
        })
        .collect()
}

/// Start a proxy from a validated config.
pub fn start(config: Config, opts: StartOptions) -> Result<Handle, StartError> {
    let listeners: Vec<BoundListener> = config
        .listen
        .iter()
        .map(server::bind)
        .collect::<Result<_, _>>()?;
    let addrs = listeners.iter().map(|l| l.addr).collect();
    let config = Arc::new(config);
    let shared = Arc::new(Shared::new(Snapshot::build(
        config.clone(),
        &BTreeMap::new(),
        None,
    )));
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let mut threads = Vec::new();

    // Control plane.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
    {
        let shared = shared.clone();
        let resolver = opts.resolver.clone();
        let mut shutdown = shutdown_rx.clone();
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
                tokio::select! {
                    _ = resolve::run(shared.clone(), resolver) => {}
                    _ = shutdown.wait_for(|s| *s) => {}
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
            ..Default::default()
        };
        let app = pingora::proxy::http_proxy(
            &Arc::new(conf),
            Switchyard {
                shared: shared.clone(),
            },
        );
        let app = Arc::new(app);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.threads)
            .thread_name("switchyard-worker")
            .enable_all()
            .build()
            .map_err(|source| StartError::Runtime {
                what: "data-plane runtime",
                source,
            })?;
        let grace = config.grace_period;
        let shutdown = shutdown_rx.clone();
        threads.push(spawn_thread("switchyard-main", move || {
            let report = rt.block_on(server::serve(app, listeners, shutdown, grace));
            // Whatever is still running after the grace period is cancelled here.
            rt.shutdown_timeout(Duration::from_secs(1));
            let _ = done_tx.send(report);
        })?);
    }

    Ok(Handle {
        shared,
        addrs,
        started: Instant::now(),
        shutdown: shutdown_tx,
        data_done: Some(done_rx),
        threads,
    })
}

fn spawn_thread(
    name: &str,
    f: impl FnOnce() + Send + 'static,
) -> Result<std::thread::JoinHandle<()>, StartError> {
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
        let snap = self.shared.load();
        Status {
            protocol: PROTOCOL_VERSION,
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_secs: self.started.elapsed().as_secs(),
            upstreams: snap
                .upstreams
                .iter()
                .map(|u| UpstreamStatus {
                    name: u.name().to_string(),
                    generation: u.generation,
                    main: u.pools[u.main].pool.name.clone(),
                    weights: u.weights(),
                    previous: u.previous.clone(),
                    pools: u
                        .pools
                        .iter()
                        .map(|p| {
                            let inflight = p.pool.inflight.load(Ordering::Acquire);
                            PoolStatus {
                                name: p.pool.name.clone(),
                                weight: p.weight,
                                phase: match (p.weight, inflight) {
                                    (w, _) if w > 0 => PoolPhase::Active,
                                    (_, n) if n > 0 => PoolPhase::Draining,
                                    _ => PoolPhase::Drained,
                                },
                                inflight,
                                instances: p
                                    .instances
                                    .iter()
                                    .map(|i| {
                                        let r = i.resolved.load();
                                        InstanceStatus {
                                            addr: i.label.clone(),
                                            resolved: r.addrs.first().map(|a| a.to_string()),
                                            resolve_error: r.error.clone(),
                                            inflight: i.inflight.load(Ordering::Acquire),
                                        }
                                    })
                                    .collect(),
                            }
                        })
                        .collect(),
                })
                .collect(),
        }
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
