//! The accept loop, the per-connection keep-alive loop, and the graceful drain of a worker.
//!
//! A plain HTTP/1.1 request without a body is offered first to switchyard's own forwarder
//! (`proxy::fast`); every other request, and one it declines, is processed by Pingora's own
//! `HttpServerApp::process_new_http`, so h2 over TLS ALPN, upgrades and body streaming are
//! Pingora's. Around both:
//! - connections are capped at `max_connections` per process: at the cap the accept loops stop
//!   accepting and new connections wait in the listen backlog;
//! - each request head must arrive whole within `client_header_timeout` (one deadline, not per
//!   read): the loop reads it ahead into the connection's buffer before Pingora parses it,
//!   closes the connection when the deadline passes, and answers 431 to a head over
//!   [`HEAD_LIMIT`] — so a client trickling header bytes cannot hold a connection for long;
//! - between requests a connection waits in a small future of its own, not in Pingora's
//!   ~35 KiB request state machine: 10k idle keep-alive clients fit in well under 100 MiB
//!   (docs/BENCHMARKS.md).
//!
//! The drain ends as soon as no request is in flight, bounded by `grace_period` (Pingora's
//! `Server` always sleeps the whole grace period, then cancels tasks).

use super::conn::{Conn, Fill, Prebuffered, HEAD_LIMIT};
use super::head;
use super::WorkerSocket;
use crate::proxy::{fast, Switchyard};
use crate::runtime::upgrade::HANDOVER_LINGER;
use crate::state::Shared;
use crate::upstream::stats::PoolStats;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ServerApp};
use pingora::protocols::http::ServerSession;
use pingora::protocols::{GetSocketDigest, Ssl, Stream, ALPN, IO};
use pingora::proxy::HttpProxy;
use pingora::server::ShutdownWatch;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

/// Client connections open in this process, against `max_connections`, and the idle ones
/// that can be closed to make room.
#[derive(Debug)]
pub(crate) struct Connections {
    open: AtomicUsize,
    closed: Notify,
    /// Connections waiting for their next request (or their first), closable at once.
    idle: AtomicUsize,
    /// Wakes the longest-waiting idle connection, which then closes if a new connection is
    /// still waiting for a slot.
    evict: Notify,
    /// Accept loops waiting for a slot now.
    waiting: AtomicUsize,
    /// What the open-file limit allows, whatever `max_connections` says (each client
    /// connection may also hold an upstream connection).
    fd_cap: usize,
}

impl Connections {
    /// `fd_cap`: the most client connections the open-file limit allows.
    pub(crate) fn new(fd_cap: usize) -> Self {
        Connections {
            open: AtomicUsize::new(0),
            closed: Notify::new(),
            idle: AtomicUsize::new(0),
            evict: Notify::new(),
            waiting: AtomicUsize::new(0),
            fd_cap,
        }
    }

    /// Take a slot if fewer than `cap` connections are open.
    fn try_reserve(&self, cap: usize) -> bool {
        let cap = cap.min(self.fd_cap);
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < cap).then_some(n + 1)
            })
            .is_ok()
    }

    fn release(&self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
        self.closed.notify_waiters();
    }

    /// Ask the longest-idle connection, if any, to close (nginx frees reusable connections
    /// the same way when it runs out).
    fn evict_one(&self) {
        if self.idle.load(Ordering::Acquire) > 0 {
            self.evict.notify_one();
        }
    }

    /// Whether an eviction notice is still wanted. A notice sent when the last idle
    /// connection was just leaving is kept by `Notify` for the next one to go idle, possibly
    /// much later: that one must not close unless a new connection is waiting then.
    fn eviction_wanted(&self) -> bool {
        self.waiting.load(Ordering::Acquire) > 0
    }
}

/// Counts an accept loop waiting for a slot.
struct Waiting<'a>(&'a Connections);

impl<'a> Waiting<'a> {
    fn new(c: &'a Connections) -> Self {
        c.waiting.fetch_add(1, Ordering::AcqRel);
        Waiting(c)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Counts a connection as idle (evictable) while it exists.
struct Idle<'a>(&'a Connections);

impl<'a> Idle<'a> {
    fn new(c: &'a Connections) -> Self {
        c.idle.fetch_add(1, Ordering::AcqRel);
        Idle(c)
    }
}

impl Drop for Idle<'_> {
    fn drop(&mut self) {
        self.0.idle.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Holds a connection slot until the connection ends.
struct Slot(Arc<Connections>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.release();
    }
}

/// Bytes of the HTTP/2 client connection preface (`PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`).
const H2_PREFACE_LEN: usize = 24;

/// How long a refused connection drains what the client still sends before it closes.
const LINGER: Duration = Duration::from_secs(2);

/// The connection handler shared by a worker's accept loops.
pub(crate) struct App {
    proxy: Arc<HttpProxy<Switchyard>>,
    /// The same proxy logic, for the fast path (`proxy::fast`); `None` when it is turned off
    /// (`SWITCHYARD_FAST_PATH=off`: every request through Pingora).
    fast: Option<Switchyard>,
    shared: Arc<Shared>,
    /// Where requests the proxy refuses before parsing (431, 408) are counted.
    unrouted: Arc<PoolStats>,
    connections: Arc<Connections>,
    /// Set when a successor took over (binary upgrade): during the drain, an idle keep-alive
    /// connection stays open for [`HANDOVER_LINGER`] so a request already on its way is
    /// answered (with `Connection: close`) rather than meeting a closed connection.
    lingering: Arc<AtomicBool>,
    /// When the linger ends: one deadline for every connection, fixed at the first look after
    /// the handover (so the drain knows when to stop waiting for them).
    linger_until: std::sync::OnceLock<Instant>,
    /// Requests whose chunked body is being read ahead (not in flight in Pingora yet).
    reading_bodies: AtomicUsize,
}

/// Counts while it exists.
struct Counted<'a>(&'a AtomicUsize);

impl<'a> Counted<'a> {
    fn new(c: &'a AtomicUsize) -> Self {
        c.fetch_add(1, Ordering::AcqRel);
        Counted(c)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl App {
    pub(crate) fn new(
        proxy: HttpProxy<Switchyard>,
        fast: Option<Switchyard>,
        shared: Arc<Shared>,
        unrouted: Arc<PoolStats>,
        connections: Arc<Connections>,
        lingering: Arc<AtomicBool>,
    ) -> Self {
        App {
            proxy: Arc::new(proxy),
            fast,
            shared,
            unrouted,
            lingering,
            linger_until: std::sync::OnceLock::new(),
            reading_bodies: AtomicUsize::new(0),
            connections,
        }
    }

    /// Serve one accepted connection (after TLS, if any) until it closes.
    async fn serve_connection<S: IO + 'static>(
        self: &Arc<Self>,
        mut stream: Conn<S>,
        accepted: Instant,
        shutdown: &ShutdownWatch,
        redirect_https: bool,
    ) {
        let mut settings: Option<HttpPersistentSettings> = None;
        let mut first = true;
        let mut peer: Option<fast::Peer> = None;
        loop {
            let cfg = self.shared.load().config.clone();
            if !first && cfg.keepalive_timeout.is_zero() {
                return;
            }
            // Wait for the first byte: on a new connection within client_header_timeout of the
            // accept, on a keep-alive one within keepalive_timeout (meanwhile it is idle: at
            // max_connections the longest-idle one is closed to make room). Then the rest of
            // the head within client_header_timeout (from the accept for the first request,
            // from the first byte for later ones).
            let idle_until = if first {
                accepted + cfg.client_header_timeout
            } else {
                Instant::now() + cfg.keepalive_timeout
            };
            if !self
                .wait_first_byte(&mut stream, idle_until, !first, shutdown)
                .await
            {
                return;
            }
            let head_deadline = if first {
                accepted + cfg.client_header_timeout
            } else {
                Instant::now() + cfg.client_header_timeout
            };
            let head = tokio::time::timeout_at(head_deadline, stream.fill_head());
            match self.idle_until_shutdown(head, shutdown).await {
                Some(Ok(Ok(Fill::Complete))) => {}
                Some(Ok(Ok(Fill::TooLarge))) => {
                    let why = format!("the request head is larger than {} KiB", HEAD_LIMIT / 1024);
                    self.refuse(&mut stream, 431, &why, accepted).await;
                    return;
                }
                Some(Err(_elapsed)) => {
                    // nginx's client_header_timeout: the connection is closed (counted as a
                    // 408, nothing is sent).
                    if stream.buffered() > 0 {
                        self.unrouted.observe(408, accepted.elapsed(), None);
                    }
                    return;
                }
                // Closed or broken mid-head, or shutting down.
                Some(Ok(Err(_))) | None => return,
            }
            let h = match head::inspect(stream.unread()).and_then(|h| prescan(stream.unread(), h)) {
                Ok(h) => h,
                Err(r) => {
                    self.refuse(&mut stream, r.status, r.reason, accepted).await;
                    return;
                }
            };
            if redirect_https {
                // Never proxied: the same host, path and query over https.
                match head::https_location(stream.unread()) {
                    Some(to) => {
                        let reply = format!("308 Permanent Redirect: {to}\n");
                        let extra = format!("Location: {to}\r\n");
                        self.answer(&mut stream, 308, &extra, &reply, accepted)
                            .await;
                    }
                    None => {
                        self.refuse(&mut stream, 400, "no host to redirect to", accepted)
                            .await
                    }
                }
                return;
            }
            // client_max_body_size: a body announced larger, or a chunked one found larger
            // while it is read ahead, is refused before anything reaches the app.
            let limit = cfg.client_max_body_size;
            // A request with a body under way, not an idle connection: a shutdown does not cut
            // its read-ahead, and the drain waits for it until Pingora counts it in flight.
            let reading = (h.body != head::Body::None).then(|| Counted::new(&self.reading_bodies));
            let too_large = match h.body {
                head::Body::Length(n) => limit > 0 && n > limit,
                // (A client that waits for `100 Continue` sends no body yet: it streams.)
                head::Body::Chunked if h.expect_continue || limit == 0 => false,
                head::Body::Chunked => {
                    let ahead =
                        tokio::time::timeout_at(head_deadline, stream.prebuffer_chunked(&h, limit));
                    match ahead.await {
                        Ok(Prebuffered::TooLarge) => true,
                        Ok(Prebuffered::Malformed(why)) => {
                            self.refuse(&mut stream, 400, why, accepted).await;
                            return;
                        }
                        // Complete, too long to hold, or the client paused: it streams (and is
                        // cut at the limit).
                        Ok(Prebuffered::Forward) | Err(_) => false,
                    }
                }
                head::Body::None => false,
            };
            if too_large {
                let why = format!(
                    "the request body is larger than client_max_body_size ({})",
                    human_size(limit)
                );
                self.refuse(&mut stream, 413, &why, accepted).await;
                return;
            }
            if let Some(fast_path) = self
                .fast
                .as_ref()
                .filter(|_| h.body == head::Body::None && !h.upgrade && !h.expect_continue)
            {
                // Most requests: forwarded by switchyard itself (`proxy::fast`), in a box of
                // its own written in place, so the idle connection's future stays small.
                let peer = *peer.get_or_insert_with(|| fast::Peer {
                    client: stream
                        .get_socket_digest()
                        .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip())),
                    tls: stream.get_ssl_digest().is_some(),
                });
                let serve: Box<_> = Box::write(
                    Box::new_uninit(),
                    fast::serve(fast_path, &mut stream, &h, peer, shutdown),
                );
                match Box::into_pin(serve).await {
                    fast::Served::Declined => {}
                    fast::Served::KeepAlive => {
                        first = false;
                        if !stream.request_complete() {
                            return;
                        }
                        continue;
                    }
                    fast::Served::Close => {
                        // As Pingora does before it closes: the end of the stream (TLS:
                        // `close_notify`), so a body ended by the close reads as complete.
                        let _ = tokio::time::timeout(LINGER, stream.shutdown()).await;
                        return;
                    }
                }
            }
            stream.begin(&h, limit);
            first = false;
            let mut session = ServerSession::new_http1(Box::new(stream));
            // Pingora's default; request_filter sets the configured keepalive_timeout.
            session.set_keepalive(if *shutdown.borrow() { None } else { Some(60) });
            if let Some(s) = settings.take() {
                HttpPersistentSettings::apply_to_session(s, &mut session);
            }
            // Already boxed (in place: third_party/PATCHES.md 4).
            let served = self.proxy.process_new_http(session, shutdown).await;
            drop(reading);
            let Some(reused) = served else {
                return;
            };
            let (next, persistent) = reused.consume();
            settings = persistent;
            // We boxed it ourselves: the downcast gives our stream back.
            match next.into_any().downcast::<Conn<S>>() {
                Ok(s) => stream = *s,
                Err(_) => return,
            }
            // Pingora reused the connection without reading all of the request (an unread
            // body): what is buffered is not the next request. Close.
            if !stream.request_complete() {
                return;
            }
        }
    }

    /// Wait for the first byte of the next request, until `until`; false when the
    /// connection should close: timeout, peer gone, shutdown, or — a keep-alive connection
    /// between requests (`evictable`) — closed to make room at max_connections. A new
    /// connection is not evicted: its first request is usually already on the way.
    async fn wait_first_byte<S: IO>(
        &self,
        stream: &mut Conn<S>,
        until: Instant,
        evictable: bool,
        shutdown: &ShutdownWatch,
    ) -> bool {
        if stream.buffered() > 0 {
            return true; // a pipelined request is waiting
        }
        if !evictable {
            let wait = tokio::time::timeout_at(until, stream.first_byte());
            return matches!(
                self.idle_until_shutdown(wait, shutdown).await,
                Some(Ok(true))
            );
        }
        let _idle = Idle::new(&self.connections);
        let wait = async {
            let first = tokio::time::timeout_at(until, stream.first_byte());
            tokio::pin!(first);
            loop {
                let evicted = self.connections.evict.notified();
                tokio::pin!(evicted);
                evicted.as_mut().enable();
                tokio::select! {
                    got = &mut first => return matches!(got, Ok(true)),
                    _ = evicted => {
                        if self.connections.eviction_wanted() {
                            return false;
                        }
                    }
                }
            }
        };
        self.idle_until_shutdown(wait, shutdown)
            .await
            .unwrap_or(false)
    }

    /// [`until_shutdown`] for a connection waiting for its next request: after a handover it
    /// keeps waiting for [`HANDOVER_LINGER`] (bounded by `grace_period`) before giving up.
    async fn idle_until_shutdown<T>(
        &self,
        fut: impl std::future::Future<Output = T>,
        shutdown: &ShutdownWatch,
    ) -> Option<T> {
        tokio::pin!(fut);
        if let Some(v) = until_shutdown(&mut fut, shutdown).await {
            return Some(v);
        }
        let until = self.linger_until()?;
        tokio::time::timeout_at(until, fut).await.ok()
    }

    /// After a handover: until when idle connections linger (`HANDOVER_LINGER` from the first
    /// look, bounded by `grace_period`). `None` otherwise.
    fn linger_until(&self) -> Option<Instant> {
        if !self.lingering.load(Ordering::Acquire) {
            return None;
        }
        Some(*self.linger_until.get_or_init(|| {
            Instant::now() + HANDOVER_LINGER.min(self.shared.load().config.grace_period)
        }))
    }

    /// Answer a request the proxy refuses at the door (its head), and close.
    async fn refuse<S: IO>(&self, stream: &mut Conn<S>, status: u16, why: &str, accepted: Instant) {
        let reason = http::StatusCode::from_u16(status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("Error");
        let body = format!("{status} {reason}: {why}\n");
        self.answer(stream, status, "", &body, accepted).await;
    }

    /// Answer with `status`, `extra` header lines and a plain-text `body`, and close.
    async fn answer<S: IO>(
        &self,
        stream: &mut Conn<S>,
        status: u16,
        extra: &str,
        body: &str,
        accepted: Instant,
    ) {
        let reason = http::StatusCode::from_u16(status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("Error");
        let reply = format!(
            "HTTP/1.1 {status} {reason}\r\n{extra}Content-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\nCache-Control: no-store\r\n\r\n{body}",
            body.len()
        );
        let write = async {
            stream.write_all(reply.as_bytes()).await?;
            stream.flush().await?;
            stream.shutdown().await
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), write).await;
        self.unrouted.observe(status, accepted.elapsed(), None);
        // Lingering close (nginx's): read and drop what the client is still sending for a
        // moment, so closing with unread input does not reset the connection before the
        // client has read the answer.
        let linger = async {
            let mut sink = [0u8; 4096];
            let mut left: usize = 1 << 20;
            while left > 0 {
                match tokio::io::AsyncReadExt::read(&mut stream.raw(), &mut sink).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => left = left.saturating_sub(n),
                }
            }
        };
        let _ = tokio::time::timeout(LINGER, linger).await;
    }

    /// Handshake, then serve the connection as h2 (by ALPN) or HTTP/1.
    async fn serve_tls(
        self: &Arc<Self>,
        acceptor: &pingora::listeners::tls::Acceptor,
        stream: pingora::protocols::l4::stream::Stream,
        at: Instant,
        shutdown: &ShutdownWatch,
    ) {
        // The handshake counts against client_header_timeout, as in nginx before 1.25.
        // Boxed: its state must not stay in the connection's future.
        let limit = self.shared.load().config.client_header_timeout;
        let hs = Box::pin(tokio::time::timeout_at(
            at + limit,
            acceptor.tls_handshake(stream),
        ));
        let tls_stream = match hs.await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!("TLS handshake timed out");
                return;
            }
        };
        if matches!(tls_stream.selected_alpn_proto(), Some(ALPN::H2)) {
            // The client's connection preface within client_header_timeout of the accept,
            // like an HTTP/1 head; afterwards Pingora's h2_idle_timeout closes idle ones.
            let mut conn = Conn::new(tls_stream);
            let preface = tokio::time::timeout_at(at + limit, conn.fill(H2_PREFACE_LEN));
            if !matches!(
                self.idle_until_shutdown(preface, shutdown).await,
                Some(Ok(true))
            ) {
                return;
            }
            self.serve_h2(Box::new(conn), shutdown).await;
        } else {
            self.serve_connection(Conn::new(tls_stream), at, shutdown, false)
                .await;
        }
    }

    /// Serve an h2 connection with Pingora's own handling.
    async fn serve_h2(self: &Arc<Self>, stream: Stream, shutdown: &ShutdownWatch) {
        let _ = self.proxy.process_new(stream, shutdown).await;
    }

    async fn cleanup(&self) {
        self.proxy.http_cleanup().await;
    }
}

/// A chunked body that already arrived with its head is checked before anything is
/// forwarded: a broken one (a smuggling attempt, typically sent in one write) is refused and
/// never reaches the app. What arrives later is checked as it passes (`conn`).
fn prescan(buf: &[u8], h: head::Head) -> Result<head::Head, head::Refusal> {
    if h.body == head::Body::Chunked {
        let body = buf.get(h.skip + h.len..).unwrap_or_default();
        super::chunked::Chunked::default()
            .advance(body)
            .map_err(|m| head::Refusal {
                status: 400,
                reason: m.0,
            })?;
    }
    Ok(h)
}

/// `fut`, or `None` once shutdown has begun.
async fn until_shutdown<T>(
    fut: impl std::future::Future<Output = T>,
    shutdown: &ShutdownWatch,
) -> Option<T> {
    let mut sd = shutdown.clone();
    tokio::select! {
        // What is already there (a buffered request) is served.
        biased;
        v = fut => Some(v),
        _ = sd.wait_for(|s| *s) => None,
    }
}

/// `10m`, `512k`, or bytes: a size as an operator writes it.
pub(crate) fn human_size(n: u64) -> String {
    for (unit, shift) in [("g", 30), ("m", 20), ("k", 10)] {
        if n >= 1 << shift && n.is_multiple_of(1 << shift) {
            return format!("{}{unit}", n >> shift);
        }
    }
    format!("{n} bytes")
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
/// current response), and return when none is left or `grace_period` (as configured at that
/// moment: a reload applies) has passed.
pub(crate) async fn serve(
    app: Arc<App>,
    listeners: Vec<WorkerSocket>,
    shutdown: watch::Receiver<bool>,
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
            l.redirect_https,
            app.clone(),
            shutdown.clone(),
        )));
    }
    for l in loops {
        let _ = l.await;
    }
    // Wake connections waiting inside Pingora so they close now.
    app.cleanup().await;
    let grace = app.shared.load().config.grace_period;
    let start = tokio::time::Instant::now();
    let deadline = start + grace;
    let open = active.load(Ordering::Acquire);
    if open > 0 {
        tracing::info!(requests = open, grace = ?grace, "draining in-flight requests");
    }
    // After a handover, idle connections linger a moment (see `App::lingering`): wait for
    // them as well, or the runtime's end would cut them.
    let linger_until = app.linger_until().map(|t| t + Duration::from_millis(100));
    let busy = || {
        active.load(Ordering::Acquire) > 0
            || app.reading_bodies.load(Ordering::Acquire) > 0
            || linger_until.is_some_and(|t| {
                app.connections.open.load(Ordering::Acquire) > 0 && tokio::time::Instant::now() < t
            })
    };
    while busy() && tokio::time::Instant::now() < deadline {
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

/// A slot for a connection just accepted (`max_connections`, re-read from the config each
/// time so a reload applies). At the cap, the longest-idle connection is asked to close and
/// the new one waits for the slot it frees (meanwhile this loop accepts nothing more: further
/// clients wait in the backlog). `None` when shutdown began first.
async fn slot_for(app: &App, shutdown: &mut watch::Receiver<bool>) -> Option<Slot> {
    let cap = app.shared.load().config.max_connections;
    if app.connections.try_reserve(cap) {
        return Some(Slot(app.connections.clone()));
    }
    let _waiting = Waiting::new(&app.connections);
    loop {
        let cap = app.shared.load().config.max_connections;
        let closed = app.connections.closed.notified();
        tokio::pin!(closed);
        closed.as_mut().enable();
        if app.connections.try_reserve(cap) {
            return Some(Slot(app.connections.clone()));
        }
        app.connections.evict_one();
        tokio::select! {
            _ = closed => {}
            _ = shutdown.wait_for(|s| *s) => return None,
            // A reload may raise the cap while no connection closes.
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }
}

async fn accept_loop(
    listener: pingora::protocols::l4::listener::Listener,
    addr: SocketAddr,
    tls: Option<Arc<pingora::listeners::tls::Acceptor>>,
    redirect: bool,
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
        let Some(slot) = slot_for(&app, &mut shutdown).await else {
            break;
        };
        // The header deadline runs from when the connection is served, not from when the
        // kernel accepted it: a connection that waited for a slot still has its full time.
        let at = Instant::now();
        if let Err(e) = stream.set_nodelay() {
            tracing::debug!(error = %e, "set_nodelay failed");
        }
        let app = app.clone();
        let tls = tls.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _slot = slot;
            // Each kind of connection in a box of its own size: an idle plain connection must
            // not carry the ~5 KiB of a TLS stream's state (10k idle clients: 66 vs 190 MiB).
            // Written into a box allocated first, the future is built in place; `Box::pin(f)`
            // would build it on the stack and copy it (third_party/PATCHES.md 4).
            match tls {
                None => {
                    let serve: Box<_> = Box::write(
                        Box::new_uninit(),
                        app.serve_connection(Conn::new(stream), at, &shutdown, redirect),
                    );
                    Box::into_pin(serve).await
                }
                Some(acceptor) => {
                    let serve: Box<_> = Box::write(
                        Box::new_uninit(),
                        app.serve_tls(&acceptor, stream, at, &shutdown),
                    );
                    Box::into_pin(serve).await
                }
            }
        });
    }
    tracing::debug!(%addr, "stopped accepting");
}
