//! The control socket server: a Unix socket speaking newline-delimited JSON, generic over a
//! [`ControlHandler`] (the proxy implements it; tests can use a fake).
//!
//! The socket is a security boundary: it is created with the configured mode (0600 by default)
//! before it becomes visible (bound under a temporary name, chmod-ed, then renamed into place),
//! a stale socket left by a crashed run is replaced, and a socket a live proxy still answers on
//! is never taken over. Every connection is identified by its peer credentials
//! (`SO_PEERCRED`), which the handler logs with each change.
//!
//! Robustness: a line longer than [`MAX_LINE`] is refused and the connection closed; bad JSON
//! gets a `bad_request` error line and the connection stays usable; a client that disconnects
//! during a wait cancels the wait (never a change already applied); a connection waiting for
//! (or trickling) its next request line is closed after [`IDLE_TIMEOUT`]; at most
//! [`MAX_CONNECTIONS`] connections are served at once — when full, the longest-idle one is
//! closed to make room, and only when every one is running a command does a newcomer get
//! `busy`; commands that wait (drains, `--wait-healthy`, `events --follow`) may hold all but
//! [`RESERVED_FOR_SHORT`] of them. A client that stops reading its answer is dropped after
//! [`IDLE_TIMEOUT`] too. So neither idle nor stuck clients can lock `proxyctl status` or
//! `proxyctl switch` out.

use crate::protocol::{ControlError, ErrorCode, Event, EventLine, Reply, Request};
use async_trait::async_trait;
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, Semaphore};

/// Longest accepted request line (1 MiB); a request is a few hundred bytes.
pub const MAX_LINE: usize = 1 << 20;
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 256;
/// How long a connection may wait between requests (or take to send one line, or to read one
/// answer line) before it is closed. A client mid-command (a drain, `events --follow`) is not
/// idle.
pub const IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Connections that waiting commands (drains, health waits, `events --follow`) cannot take.
pub const RESERVED_FOR_SHORT: usize = 16;

/// Who is on the other end of a control connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
    /// Process id, when the OS reports it.
    pub pid: Option<i32>,
}

/// Sends progress events to the client of the current request.
#[derive(Debug, Clone)]
pub struct EventSender(mpsc::Sender<Event>);

impl EventSender {
    /// Queue an event; returns false when the client is gone.
    pub async fn send(&self, event: Event) -> bool {
        self.0.send(event).await.is_ok()
    }

    /// A sender whose events go nowhere (for calls that are not from a socket).
    pub fn discard() -> Self {
        let (tx, mut rx) = mpsc::channel(1);
        tokio::spawn(async move { while rx.recv().await.is_some() {} });
        EventSender(tx)
    }
}

/// What the server calls for each request.
#[async_trait]
pub trait ControlHandler: Send + Sync + 'static {
    /// Carry out `req` for `peer`, sending progress to `events`, and return the final reply.
    async fn handle(&self, req: Request, peer: Peer, events: EventSender) -> Reply;
}

/// Why the control socket could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlSocketError {
    /// Another process answers on the socket.
    #[error("control socket {} is in use by a running proxy; stop it first or configure another control.socket", path.display())]
    InUse {
        /// The socket path.
        path: PathBuf,
    },
    /// Something that is not a socket is in the way.
    #[error("{} exists and is not a socket; not replacing it", path.display())]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// An OS error.
    #[error("control socket {}: {source}", path.display())]
    Io {
        /// The socket path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

/// The directory of `path` and a temporary name beside it (`.NAME.PID.tmp`), for files made
/// complete there and then renamed into place, so the final name appears whole or not at all
/// (the control socket here; the proxy's state file).
pub fn temp_beside(path: &Path) -> (PathBuf, PathBuf) {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "switchyard".into());
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    (dir, tmp)
}

/// A bound control socket.
#[derive(Debug)]
pub struct ControlServer {
    listener: std::os::unix::net::UnixListener,
    path: PathBuf,
    /// Connections being served now.
    open: Arc<AtomicUsize>,
    idle_timeout: std::time::Duration,
    /// Whether dropping the server removes the socket file: not once the listening socket was
    /// handed to a successor process (a binary upgrade), which serves the same file.
    owns_path: Arc<AtomicBool>,
}

/// Connections waiting for their next request line, so a full server can close one to make
/// room for a new `proxyctl`.
#[derive(Debug)]
struct Idle {
    count: AtomicUsize,
    evict: tokio::sync::Notify,
    /// New connections waiting for a slot now. An eviction notice can outlive the moment it
    /// was sent (`Notify` keeps it for the next waiter when none waits): a connection woken
    /// by one closes only while a newcomer still waits.
    newcomers: AtomicUsize,
    /// Permits for commands that wait.
    waiters: Arc<Semaphore>,
}

impl Default for Idle {
    fn default() -> Self {
        Idle {
            count: AtomicUsize::new(0),
            evict: tokio::sync::Notify::new(),
            newcomers: AtomicUsize::new(0),
            waiters: Arc::new(Semaphore::new(MAX_CONNECTIONS - RESERVED_FOR_SHORT)),
        }
    }
}

/// Counts a connection as idle while it exists.
struct IdleGuard<'a>(&'a Idle);

impl<'a> IdleGuard<'a> {
    fn new(i: &'a Idle) -> Self {
        i.count.fetch_add(1, Ordering::AcqRel);
        IdleGuard(i)
    }
}

impl Drop for IdleGuard<'_> {
    fn drop(&mut self) {
        self.0.count.fetch_sub(1, Ordering::AcqRel);
    }
}

impl ControlServer {
    /// Bind `path` with file mode `mode`. Needs no runtime.
    pub fn bind(path: &Path, mode: u32) -> Result<Self, ControlSocketError> {
        let io_err = |source| ControlSocketError::Io {
            path: path.to_path_buf(),
            source,
        };
        match std::fs::symlink_metadata(path) {
            Ok(meta) if !meta.file_type().is_socket() => {
                return Err(ControlSocketError::NotASocket {
                    path: path.to_path_buf(),
                })
            }
            Ok(_) => match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => {
                    return Err(ControlSocketError::InUse {
                        path: path.to_path_buf(),
                    })
                }
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    // Left behind by a process that died without cleaning up.
                    std::fs::remove_file(path).map_err(io_err)?;
                }
                Err(e) => return Err(io_err(e)),
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(e)),
        }
        let (_, tmp) = temp_beside(path);
        let _ = std::fs::remove_file(&tmp);
        let listener = std::os::unix::net::UnixListener::bind(&tmp).map_err(io_err)?;
        let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
            .and_then(|_| std::fs::rename(&tmp, path));
        if let Err(e) = placed {
            let _ = std::fs::remove_file(&tmp);
            return Err(io_err(e));
        }
        Self::adopt(listener, path)
    }

    /// Serve a listening socket taken over from a predecessor process (binary upgrade): the
    /// socket file at `path` stays as it is, with its mode.
    pub fn adopt(
        listener: std::os::unix::net::UnixListener,
        path: &Path,
    ) -> Result<Self, ControlSocketError> {
        listener
            .set_nonblocking(true)
            .map_err(|source| ControlSocketError::Io {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(ControlServer {
            listener,
            path: path.to_path_buf(),
            open: Arc::new(AtomicUsize::new(0)),
            idle_timeout: IDLE_TIMEOUT,
            owns_path: Arc::new(AtomicBool::new(true)),
        })
    }

    /// The listening socket, to hand to a successor process.
    pub fn listener(&self) -> &std::os::unix::net::UnixListener {
        &self.listener
    }

    /// Set to false so that dropping the server leaves the socket file in place (a successor
    /// serves it now).
    pub fn owns_path(&self) -> Arc<AtomicBool> {
        self.owns_path.clone()
    }

    /// Close connections idle this long (default [`IDLE_TIMEOUT`]).
    pub fn with_idle_timeout(mut self, d: std::time::Duration) -> Self {
        self.idle_timeout = d;
        self
    }

    /// A live count of the connections being served (for a metric): a connection counts from
    /// its accept until it closes or its client goes away mid-wait.
    pub fn open_connections(&self) -> Arc<AtomicUsize> {
        self.open.clone()
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serve until `shutdown` resolves. Must run inside a tokio runtime.
    pub async fn serve<H: ControlHandler>(
        self,
        handler: Arc<H>,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        let listener = match self.listener.try_clone().and_then(UnixListener::from_std) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(path = %self.path.display(), error = %e, "control socket unusable");
                return;
            }
        };
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let idle = Arc::new(Idle::default());
        tokio::pin!(shutdown);
        loop {
            let stream = tokio::select! {
                _ = &mut shutdown => break,
                r = listener.accept() => match r {
                    Ok((s, _)) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "control accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let handler = handler.clone();
            let (slots, idle, open) = (slots.clone(), idle.clone(), self.open.clone());
            let idle_timeout = self.idle_timeout;
            tokio::spawn(async move {
                // Full: the longest-idle connection makes room for this one; only when every
                // connection is busy with a command is the newcomer told to come back.
                let permit = match slots.clone().try_acquire_owned() {
                    Ok(p) => Some(p),
                    Err(_) => {
                        idle.newcomers.fetch_add(1, Ordering::AcqRel);
                        if idle.count.load(Ordering::Acquire) > 0 {
                            idle.evict.notify_one();
                        }
                        let p = tokio::time::timeout(
                            std::time::Duration::from_secs(1),
                            slots.acquire_owned(),
                        )
                        .await
                        .ok()
                        .and_then(Result::ok);
                        idle.newcomers.fetch_sub(1, Ordering::AcqRel);
                        p
                    }
                };
                let Some(permit) = permit else {
                    let (_, mut w) = stream.into_split();
                    let _ = write_reply(
                        &mut w,
                        &Reply::err(ControlError::new(
                            ErrorCode::Busy,
                            format!("{MAX_CONNECTIONS} control connections are busy; try again"),
                        )),
                        idle_timeout,
                    )
                    .await;
                    return;
                };
                let counted = Counted::new(&open);
                connection(stream, handler, &idle, idle_timeout).await;
                drop((counted, permit));
            });
        }
    }
}

/// Counts a connection in `ControlServer::open` while it exists (also if its task panics).
struct Counted(Arc<AtomicUsize>);

impl Counted {
    fn new(open: &Arc<AtomicUsize>) -> Self {
        open.fetch_add(1, Ordering::AcqRel);
        Counted(open.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        if self.owns_path.load(Ordering::Acquire) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

async fn write_line(
    w: &mut OwnedWriteHalf,
    value: &impl serde::Serialize,
    limit: std::time::Duration,
) -> io::Result<()> {
    let mut line = serde_json::to_vec(value).map_err(io::Error::other)?;
    line.push(b'\n');
    let write = async {
        w.write_all(&line).await?;
        w.flush().await
    };
    tokio::time::timeout(limit, write)
        .await
        .unwrap_or_else(|_| Err(io::Error::from(io::ErrorKind::TimedOut)))
}

async fn write_reply(
    w: &mut OwnedWriteHalf,
    reply: &Reply,
    limit: std::time::Duration,
) -> io::Result<()> {
    write_line(w, reply, limit).await
}

fn bad_request(message: String) -> Reply {
    Reply::err(ControlError::new(ErrorCode::BadRequest, message))
}

async fn connection<H: ControlHandler>(
    stream: UnixStream,
    handler: Arc<H>,
    idle: &Idle,
    idle_timeout: std::time::Duration,
) {
    let peer = match stream.peer_cred() {
        Ok(c) => Peer {
            uid: c.uid(),
            gid: c.gid(),
            pid: c.pid(),
        },
        Err(e) => {
            tracing::warn!(error = %e, "control peer credentials unavailable; closing");
            return;
        }
    };
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    loop {
        let mut buf = Vec::new();
        // Waiting for a request line is idle: bounded, and the first to go when full.
        let n = {
            let _idle = IdleGuard::new(idle);
            let mut limited = (&mut r).take(MAX_LINE as u64 + 1);
            let read = tokio::time::timeout(idle_timeout, limited.read_until(b'\n', &mut buf));
            tokio::pin!(read);
            loop {
                let evicted = idle.evict.notified();
                tokio::pin!(evicted);
                evicted.as_mut().enable();
                tokio::select! {
                    got = &mut read => match got {
                        Ok(Ok(n)) => break n,
                        Ok(Err(_)) | Err(_) => return,
                    },
                    _ = evicted => {
                        if idle.newcomers.load(Ordering::Acquire) > 0 {
                            return;
                        }
                    }
                }
            }
        };
        if n == 0 {
            return;
        }
        let complete = buf.last() == Some(&b'\n');
        if !complete && buf.len() > MAX_LINE {
            let _ = write_reply(
                &mut w,
                &bad_request(format!("request line longer than {MAX_LINE} bytes")),
                idle_timeout,
            )
            .await;
            // Closing with unread input would reset the connection and could destroy the
            // error line before the client reads it: stop writing, swallow the rest (bounded),
            // then close.
            let _ = w.shutdown().await;
            let mut sink = tokio::io::sink();
            let _ = tokio::time::timeout(
                std::time::Duration::from_secs(2),
                tokio::io::copy(&mut (&mut r).take(64 * MAX_LINE as u64), &mut sink),
            )
            .await;
            return;
        }
        let line = buf.trim_ascii();
        if line.is_empty() {
            if complete {
                continue;
            }
            return;
        }
        let reply = match serde_json::from_slice::<Request>(line) {
            Err(e) => bad_request(format!("not a valid request: {e}")),
            Ok(req) => {
                // A command that waits holds its connection for long; keep a few connections
                // for the short ones.
                let waits = req.waits();
                let permit = waits.then(|| idle.waiters.clone().try_acquire_owned().ok());
                if permit.as_ref().is_some_and(Option::is_none) {
                    Reply::err(ControlError::new(
                        ErrorCode::Busy,
                        format!(
                            "{} control connections are already running commands that wait; try again",
                            MAX_CONNECTIONS - RESERVED_FOR_SHORT
                        ),
                    ))
                } else {
                    match run(&handler, req, peer, &mut r, &mut w, idle_timeout).await {
                        Some(reply) => reply,
                        None => return, // client gone
                    }
                }
            }
        };
        if write_reply(&mut w, &reply, idle_timeout).await.is_err() || !complete {
            return;
        }
    }
}

/// Run one request, forwarding its progress events. `None` if the client went away (the
/// handler's future is dropped, which cancels a wait; changes are applied before any wait).
async fn run<H: ControlHandler>(
    handler: &Arc<H>,
    req: Request,
    peer: Peer,
    r: &mut BufReader<tokio::net::unix::OwnedReadHalf>,
    w: &mut OwnedWriteHalf,
    limit: std::time::Duration,
) -> Option<Reply> {
    let (tx, mut rx) = mpsc::channel(16);
    let fut = handler.handle(req, peer, EventSender(tx));
    tokio::pin!(fut);
    let mut watch_peer = true;
    loop {
        tokio::select! {
            reply = &mut fut => {
                while let Ok(ev) = rx.try_recv() {
                    write_line(w, &EventLine { event: ev }, limit).await.ok()?;
                }
                return Some(reply);
            }
            Some(ev) = rx.recv() => {
                write_line(w, &EventLine { event: ev }, limit).await.ok()?;
            }
            peeked = r.fill_buf(), if watch_peer => match peeked {
                Ok([]) | Err(_) => return None,
                // The client already sent its next request; it is read after this one.
                Ok(_) => watch_peer = false,
            },
        }
    }
}
