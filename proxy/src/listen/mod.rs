//! Listening sockets: binding (with TLS), and the accept loop that feeds accepted connections
//! to the proxy.
//!
//! switchyard drives Pingora's `HttpProxy` from its own accept loop (the pattern
//! `pingora_proxy::http_proxy` documents for custom accept loops) instead of Pingora's
//! `Server`/listening `Service`:
//! - sockets are bound by `start()` itself, so a port conflict or an unreadable certificate is
//!   an error returned to the caller (Pingora only logs a bind failure from a service task,
//!   issues #667/#502), and port 0 works with the real port reported back (#988);
//! - a connection waiting for its next request holds a few hundred bytes, not Pingora's whole
//!   request state machine (~35 KiB) (see `accept`);
//! - graceful shutdown ends as soon as no request is in flight, bounded by `grace_period`.
//!
//! - `tls`: certificates and Pingora TLS settings; [`preflight`] for `switchyard check`.
//! - `accept`: the accept loop, the per-connection keep-alive loop, the shutdown drain.
//! - `conn`: an accepted connection as Pingora sees it: writes coalesced, reads framed per
//!   request (pipelining, one deadline per head).
//! - `head`: the checks a request head passes at the door (target form, Host, framing).
//! - `chunked`: where a chunked request body ends.

mod accept;
pub(crate) mod chunked;
mod conn;
pub(crate) mod head;
mod tls;

pub use accept::DrainReport;
pub(crate) use accept::{human_size, serve, App, Connections};
pub(crate) use conn::{BodyTooLarge, Conn};
pub use tls::preflight;
pub(crate) use tls::CertResolver;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use switchyard_config::ListenConfig;

/// Why a listener could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ListenError {
    /// The socket could not be bound.
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
}

/// A bound listening socket, not yet accepting.
pub(crate) struct BoundListener {
    /// The address actually bound (the real port when the config said 0).
    pub(crate) addr: SocketAddr,
    socket: std::net::TcpListener,
    tls: Option<Arc<pingora::listeners::tls::Acceptor>>,
    /// Its certificates, swapped by a reload.
    pub(crate) certs: Option<Arc<CertResolver>>,
    /// Answers 308 to https instead of proxying.
    redirect_https: bool,
}

/// One worker's handle on a listener: a duplicate of the socket.
pub(crate) struct WorkerSocket {
    addr: SocketAddr,
    socket: std::net::TcpListener,
    tls: Option<Arc<pingora::listeners::tls::Acceptor>>,
    redirect_https: bool,
}

impl BoundListener {
    /// A duplicate of the listening socket, to hand to a successor process (binary upgrade).
    pub(crate) fn dup_fd(&self) -> std::io::Result<std::os::fd::OwnedFd> {
        Ok(self.socket.try_clone()?.into())
    }

    /// A duplicate for one worker thread (every worker accepts on every listener).
    pub(crate) fn try_clone(&self) -> std::io::Result<WorkerSocket> {
        Ok(WorkerSocket {
            addr: self.addr,
            socket: self.socket.try_clone()?,
            tls: self.tls.clone(),
            redirect_https: self.redirect_https,
        })
    }
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

/// Serve a listening socket taken over from a predecessor process (binary upgrade) for this
/// configured listener (and load its TLS certificate): the same kernel queue, no new bind.
pub(crate) fn adopt(
    cfg: &ListenConfig,
    socket: std::net::TcpListener,
) -> Result<BoundListener, ListenError> {
    let err = |source: std::io::Error| ListenError::Bind {
        addr: cfg.addr,
        source,
    };
    socket.set_nonblocking(true).map_err(err)?;
    let addr = socket.local_addr().map_err(err)?;
    finish(cfg, addr, socket)
}

fn finish(
    cfg: &ListenConfig,
    addr: SocketAddr,
    socket: std::net::TcpListener,
) -> Result<BoundListener, ListenError> {
    let (tls, certs) = match &cfg.tls {
        Some(t) => {
            let (settings, certs) = tls::tls_settings(t, cfg.http2)?;
            (Some(Arc::new(settings.build())), Some(certs))
        }
        None => (None, None),
    };
    Ok(BoundListener {
        addr,
        socket,
        tls,
        certs,
        redirect_https: cfg.redirect_https,
    })
}

/// Bind one configured listener (and load its TLS certificate).
pub(crate) fn bind(cfg: &ListenConfig) -> Result<BoundListener, ListenError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let err = |source: std::io::Error| ListenError::Bind {
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
    finish(cfg, addr, socket)
}
