//! Listening sockets, the accept loop and graceful shutdown of the data plane.
//!
//! switchyard drives Pingora's `HttpProxy` from its own accept loop instead of Pingora's
//! `Server` (the pattern `pingora_proxy::http_proxy` documents for custom accept loops):
//! - sockets are bound by `start()` itself, so a port conflict is an error returned to the
//!   caller (Pingora only logs it from a service task, issues #667/#502), and port 0 works
//!   with the real port reported back (Pingora cannot report it, #988);
//! - graceful shutdown ends as soon as the last connection is done, bounded by
//!   `grace_period` (Pingora always sleeps the whole grace period, then cancels tasks).
//!
//! Each accepted connection is handed to Pingora's `ServerApp::process_new`, exactly what
//! Pingora's own listening service does, so HTTP/1.1 keep-alive, h2 over TLS ALPN, upgrades
//! and body streaming are Pingora's.

use crate::service::Switchyard;
use crate::StartError;
use pingora::apps::ServerApp;
use pingora::listeners::tls::Acceptor;
use pingora::protocols::l4::listener::Listener as L4Listener;
use pingora::protocols::Stream;
use pingora::proxy::HttpProxy;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use switchyard_config::ListenConfig;
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

/// A bound listening socket, not yet accepting.
pub(crate) struct BoundListener {
    /// The address actually bound (the real port when the config said 0).
    pub(crate) addr: SocketAddr,
    socket: std::net::TcpListener,
    tls: Option<Arc<Acceptor>>,
}

impl std::fmt::Debug for BoundListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BoundListener")
            .field("addr", &self.addr)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// Listen backlog: above the kernel default of 4096 is pointless (somaxconn caps it), and
/// nginx's 511 is too small for a burst of 10k connections.
const BACKLOG: i32 = 4096;

/// Bind one configured listener (and load its TLS certificate).
pub(crate) fn bind(cfg: &ListenConfig) -> Result<BoundListener, StartError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let err = |source: std::io::Error| StartError::Bind {
        addr: cfg.addr,
        source,
    };
    let socket = Socket::new(
        Domain::for_address(cfg.addr),
        Type::STREAM,
        Some(Protocol::TCP),
    )
    .map_err(err)?;
    socket.set_reuse_address(true).map_err(err)?;
    socket.set_nonblocking(true).map_err(err)?;
    socket.bind(&cfg.addr.into()).map_err(err)?;
    socket.listen(BACKLOG).map_err(err)?;
    let socket: std::net::TcpListener = socket.into();
    let addr = socket.local_addr().map_err(err)?;
    let tls = match &cfg.tls {
        Some(t) => Some(Arc::new(tls_acceptor(t, cfg.http2)?)),
        None => None,
    };
    Ok(BoundListener { addr, socket, tls })
}

/// Build a rustls acceptor, returning an error (Pingora's `TlsSettings::build` panics).
pub(crate) fn tls_acceptor(
    t: &switchyard_config::TlsConfig,
    http2: bool,
) -> Result<Acceptor, StartError> {
    use pingora::tls;
    tls::install_default_crypto_provider();
    let bad = |why: String| StartError::Tls {
        cert: t.cert.clone(),
        key: t.key.clone(),
        why,
    };
    for f in [&t.cert, &t.key] {
        if let Err(e) = std::fs::File::open(f) {
            return Err(bad(format!("cannot read {}: {e}", f.display())));
        }
    }
    let (certs, key) =
        tls::load_certs_and_key_files(&t.cert.to_string_lossy(), &t.key.to_string_lossy())
            .map_err(|e| bad(e.to_string()))?
            .ok_or_else(|| bad("no certificate or no private key found in the PEM files".into()))?;
    let mut config = tls::ServerConfig::builder_with_protocol_versions(&[
        &tls::version::TLS12,
        &tls::version::TLS13,
    ])
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| bad(e.to_string()))?;
    config.alpn_protocols = if http2 {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    Ok(Acceptor::from_server_config(Arc::new(config)))
}

/// How the data plane ended.
#[derive(Debug, Clone, Copy, Default)]
pub struct DrainReport {
    /// Connections still open when the grace period ran out (0 = clean drain).
    pub abandoned_connections: usize,
    /// How long the drain took.
    pub elapsed: Duration,
}

/// Accept and serve until `shutdown` becomes true, then stop accepting, let open connections
/// finish (idle keep-alive ones are closed at once, busy ones after their current request),
/// and return when none is left or `grace` has passed.
pub(crate) async fn serve(
    app: Arc<HttpProxy<Switchyard>>,
    listeners: Vec<BoundListener>,
    shutdown: watch::Receiver<bool>,
    grace: Duration,
) -> DrainReport {
    let tracker = TaskTracker::new();
    let mut accept_loops = Vec::new();
    for l in listeners {
        let tokio_listener = match tokio::net::TcpListener::from_std(l.socket) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(addr = %l.addr, error = %e, "cannot register listener");
                continue;
            }
        };
        accept_loops.push(tokio::spawn(accept_loop(
            L4Listener::from(tokio_listener),
            l.addr,
            l.tls,
            app.clone(),
            tracker.clone(),
            shutdown.clone(),
        )));
    }
    for a in accept_loops {
        let _ = a.await;
    }
    let start = tokio::time::Instant::now();
    // Wake idle keep-alive connections so they close now instead of at their timeout.
    app.cleanup().await;
    tracker.close();
    let open = tracker.len();
    if open > 0 {
        tracing::info!(connections = open, grace = ?grace, "draining connections");
    }
    let abandoned = match tokio::time::timeout(grace, tracker.wait()).await {
        Ok(()) => 0,
        Err(_) => tracker.len(),
    };
    if abandoned > 0 {
        tracing::warn!(
            connections = abandoned,
            "grace period over; closing connections still open"
        );
    }
    DrainReport {
        abandoned_connections: abandoned,
        elapsed: start.elapsed(),
    }
}

async fn accept_loop(
    listener: L4Listener,
    addr: SocketAddr,
    tls: Option<Arc<Acceptor>>,
    app: Arc<HttpProxy<Switchyard>>,
    tracker: TaskTracker,
    mut shutdown: watch::Receiver<bool>,
) {
    tracing::info!(%addr, tls = tls.is_some(), "listening");
    loop {
        if *shutdown.borrow() {
            break;
        }
        let accepted = tokio::select! {
            biased;
            _ = shutdown.changed() => continue,
            r = listener.accept() => r,
        };
        let mut stream = match accepted {
            Ok(s) => s,
            Err(e) => {
                // EMFILE/ENFILE return at once and forever until an fd is freed: back off
                // instead of spinning.
                tracing::warn!(%addr, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if let Err(e) = stream.set_nodelay() {
            tracing::debug!(error = %e, "set_nodelay failed");
        }
        let app = app.clone();
        let tls = tls.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            let stream: Stream = match tls {
                None => Box::new(stream),
                Some(acceptor) => {
                    match tokio::time::timeout(
                        Duration::from_secs(60),
                        acceptor.tls_handshake(stream),
                    )
                    .await
                    {
                        Ok(Ok(s)) => Box::new(s),
                        Ok(Err(e)) => {
                            tracing::debug!(error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!("TLS handshake timed out");
                            return;
                        }
                    }
                }
            };
            let mut next = app.process_new(stream, &shutdown).await;
            while let Some(s) = next {
                next = app.process_new(s, &shutdown).await;
            }
        });
    }
    tracing::info!(%addr, "stopped listening");
}
