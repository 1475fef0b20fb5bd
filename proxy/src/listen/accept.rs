//! The accept loop, the per-connection keep-alive loop, and the graceful drain of a worker.
//!
//! Each request is processed by Pingora's own `HttpServerApp::process_new_http`, so HTTP/1.1
//! keep-alive, h2 over TLS ALPN, upgrades and body streaming are Pingora's. Between requests
//! a connection waits in a small future of its own ([`App`]): 10k idle keep-alive clients fit
//! in well under 100 MiB (docs/BENCHMARKS.md). The drain ends as soon as no request is in
//! flight, bounded by `grace_period` (Pingora's `Server` always sleeps the whole grace period,
//! then cancels tasks).

use super::coalesce::Coalesced;
use super::WorkerSocket;
use crate::proxy::Switchyard;
use crate::state::Shared;
use async_trait::async_trait;
use pingora::apps::{HttpServerApp, ServerApp};
use pingora::protocols::http::ServerSession;
use pingora::protocols::{Stream, ALPN};
use pingora::proxy::HttpProxy;
use pingora::server::ShutdownWatch;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// How long a new connection may take to send its first byte (Pingora's default header read
/// timeout).
const FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// The connection handler: Pingora's HTTP/1 keep-alive loop, except that a connection waiting
/// for its next request waits in a small future of its own. Pingora's per-connection future
/// (the whole proxy state machine) is about 35 KiB and lives as long as the connection; here it
/// is boxed for the duration of one request only, so 10k idle keep-alive clients cost their
/// sockets and buffers, not 10k request state machines (BENCHMARKS.md: RSS with 10k idle
/// connections). h2 connections (TLS + ALPN) are handed to Pingora's own handling.
pub(crate) struct App {
    proxy: Arc<HttpProxy<Switchyard>>,
    shared: Arc<Shared>,
}

impl App {
    pub(crate) fn new(proxy: HttpProxy<Switchyard>, shared: Arc<Shared>) -> Self {
        App {
            proxy: Arc::new(proxy),
            shared,
        }
    }
}

/// Wait until the client sends something, the connection closes, `limit` passes or shutdown
/// begins. True when there is something to read (or the stream cannot tell, as TLS).
async fn wait_for_data(stream: &mut Stream, limit: Duration, shutdown: &ShutdownWatch) -> bool {
    let mut byte = [0u8; 1];
    let mut sd = shutdown.clone();
    tokio::select! {
        r = stream.try_peek(&mut byte) => r.is_ok(),
        _ = tokio::time::sleep(limit) => false,
        _ = sd.wait_for(|s| *s) => false,
    }
}

#[async_trait]
impl ServerApp for App {
    async fn process_new(
        self: &Arc<Self>,
        mut stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        if matches!(stream.selected_alpn_proto(), Some(ALPN::H2)) {
            return self.proxy.process_new(stream, shutdown).await;
        }
        let mut wait = FIRST_REQUEST_TIMEOUT;
        let mut settings = None;
        loop {
            if !wait_for_data(&mut stream, wait, shutdown).await {
                return None;
            }
            let mut session = ServerSession::new_http1(stream);
            // Pingora's default; request_filter sets the configured keepalive_timeout.
            session.set_keepalive(if *shutdown.borrow() { None } else { Some(60) });
            if let Some(s) = settings.take() {
                pingora::apps::HttpPersistentSettings::apply_to_session(s, &mut session);
            }
            let reused = Box::pin(self.proxy.process_new_http(session, shutdown)).await?;
            let (next, persistent) = reused.consume();
            stream = next;
            settings = persistent;
            let ka = self.shared.load().config.keepalive_timeout;
            if ka.is_zero() {
                return None;
            }
            wait = ka;
        }
    }

    async fn cleanup(&self) {
        self.proxy.http_cleanup().await;
    }
}

/// How the data plane ended.
#[derive(Debug, Clone, Copy, Default)]
pub struct DrainReport {
    /// Requests still in flight when the grace period ran out (0 = clean drain).
    pub abandoned_requests: usize,
    /// How long the drain took.
    pub elapsed: Duration,
}

/// Accept and serve until `shutdown` becomes true, then stop accepting, let in-flight
/// requests finish (idle keep-alive connections are closed at once, busy ones after their
/// current response), and return when none is left or `grace` has passed.
pub(crate) async fn serve(
    app: Arc<App>,
    listeners: Vec<WorkerSocket>,
    shutdown: watch::Receiver<bool>,
    grace: Duration,
    active: Arc<AtomicUsize>,
) -> DrainReport {
    use pingora::protocols::l4::listener::Listener as L4Listener;
    let mut loops = Vec::new();
    for l in listeners {
        let listener = match tokio::net::TcpListener::from_std(l.socket) {
            Ok(t) => L4Listener::from(t),
            Err(e) => {
                tracing::error!(addr = %l.addr, error = %e, "cannot register listener");
                continue;
            }
        };
        let tls = l.tls;
        tracing::debug!(addr = %l.addr, tls = tls.is_some(), "accepting");
        loops.push(tokio::spawn(accept_loop(
            listener,
            l.addr,
            tls,
            app.clone(),
            shutdown.clone(),
        )));
    }
    for l in loops {
        let _ = l.await;
    }
    // Wake connections waiting inside Pingora so they close now.
    app.cleanup().await;
    let start = tokio::time::Instant::now();
    let deadline = start + grace;
    let open = active.load(Ordering::Acquire);
    if open > 0 {
        tracing::info!(requests = open, grace = ?grace, "draining in-flight requests");
    }
    while active.load(Ordering::Acquire) > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let abandoned = active.load(Ordering::Acquire);
    if abandoned > 0 {
        tracing::warn!(
            requests = abandoned,
            "grace period over; cutting requests still in flight"
        );
    }
    DrainReport {
        abandoned_requests: abandoned,
        elapsed: start.elapsed(),
    }
}

async fn accept_loop(
    listener: pingora::protocols::l4::listener::Listener,
    addr: SocketAddr,
    tls: Option<Arc<pingora::listeners::tls::Acceptor>>,
    app: Arc<App>,
    mut shutdown: watch::Receiver<bool>,
) {
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
        tokio::spawn(async move {
            let stream: Stream = match tls {
                None => Box::new(Coalesced::new(stream)),
                Some(acceptor) => {
                    // Boxed: the handshake's state must not stay in every connection's task.
                    let hs = Box::pin(tokio::time::timeout(
                        TLS_HANDSHAKE_TIMEOUT,
                        acceptor.tls_handshake(stream),
                    ));
                    match hs.await {
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
            let _ = app.process_new(stream, &shutdown).await;
        });
    }
    tracing::debug!(%addr, "stopped accepting");
}

/// Bound on a TLS handshake (Pingora's value).
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);
