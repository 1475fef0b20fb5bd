//! Binary upgrade (SPEC §10): a running switchyard hands its listening sockets to a new one.
//!
//! Every running proxy listens on a second Unix socket next to the control socket
//! (`<control.socket>.upgrade`, mode 0600 whatever `control.mode` says; only a peer with the
//! same user id, or root, is listened to: it is handed the listening sockets).
//! `switchyard --upgrade -c FILE`:
//!
//! 1. validates its config — a bad one never reaches the running process;
//! 2. connects to that socket and says hello;
//! 3. the running ("old") process freezes its routing state (commands that would change it are
//!    refused with `busy` while the handover runs, so nothing acknowledged can be lost), writes
//!    the state file, and sends one message: a JSON description of its listening sockets and of
//!    each instance's health, with the sockets attached (SCM_RIGHTS) — every data listener, the
//!    admin listener and the control socket;
//! 4. the new process starts on those very sockets (the same kernel accept queues: no
//!    connection is refused at any moment, there is no second bind), restores the routing
//!    state from the state file, seeds instance health so a healthy pool does not fail open
//!    for its first checks, binds its own upgrade socket in place of the old one, and answers
//!    "ready";
//! 5. the old process stops accepting, closes its copies of the control and admin sockets
//!    (the new process serves them now), and drains its in-flight requests within
//!    `grace_period` like on SIGTERM — except that an idle keep-alive connection is kept for a
//!    moment ([`HANDOVER_LINGER`]) so a client's next request on it is still answered (with
//!    `Connection: close`, so the client reconnects — to the new process) instead of meeting a
//!    closed socket.
//!
//! If the new process fails before "ready" (a certificate it cannot read, a crash, a timeout),
//! the old one unfreezes and serves on; the new process prints why. Between 4 and 5 both
//! processes accept from the same queues, which is harmless.
//!
//! Who owns the socket files: from the moment the sockets are offered until the answer, the
//! old process removes neither the control socket's file nor the upgrade socket's (a SIGTERM
//! in between must not delete what the successor will serve); the new process removes neither
//! unless its "ready" got through: it binds its upgrade socket under a temporary name and
//! moves it into place only after the answer, and starts with its routing state frozen (no
//! change is acknowledged by a process that may still fail to take over).
//!
//! The sockets are passed with `rustix` (safe `sendmsg`/`recvmsg`, descriptors arrive as
//! `OwnedFd`) over a blocking std `UnixStream`: the exchange is three messages long and runs
//! off the request path.

use crate::state::Shared;
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use switchyard_control::HealthState;
use tokio::sync::watch;

/// Version of the exchange: both sides must speak the same one.
const PROTOCOL: u32 = 1;

/// How long an idle keep-alive connection of the old process stays open after the handover:
/// a busy client sends its next request well within it and gets its answer (with
/// `Connection: close`); a connection idle for longer is closed, as a keep-alive timeout would.
pub(crate) const HANDOVER_LINGER: Duration = Duration::from_secs(1);

/// Most sockets one handover carries (every `listen` entry, admin, control).
const MAX_SOCKETS: usize = 64;

/// Longest message either side sends (the socket list and every instance's health).
const MAX_MESSAGE: usize = 4 << 20;

/// How long the old process waits for a whole hello after a connection (one deadline, not per
/// read: a peer trickling bytes cannot hold the upgrade socket for long).
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest hello or answer line accepted.
const MAX_LINE: usize = 1024;

/// How long the old process waits for the new one to start serving: start-up resolves DNS
/// names (bounded at 3 s) and loads certificates.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// The upgrade socket next to `control`: `<control>.upgrade`.
pub(crate) fn socket_path(control: &Path) -> PathBuf {
    let mut p = control.as_os_str().to_owned();
    p.push(".upgrade");
    PathBuf::from(p)
}

#[derive(Debug, Serialize, Deserialize)]
struct Hello {
    upgrade: u32,
    pid: u32,
}

/// The old process's answer to the hello.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Offer {
    /// The sockets (attached, in this order), the health to start from, and the state file
    /// the old process wrote (canonical path).
    Sockets {
        pid: u32,
        sockets: Vec<Offered>,
        health: Vec<HealthRecord>,
        state_file: PathBuf,
    },
    /// Not now, and why.
    Refused(String),
}

/// What one handed-over descriptor is.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(crate) enum Offered {
    /// A data-plane listener: its `listen[].addr` as configured, and as bound.
    Listen {
        configured: SocketAddr,
        bound: SocketAddr,
    },
    /// The admin listener, by its configured `admin.listen`.
    Admin { configured: SocketAddr },
    /// The control socket's listener.
    Control,
}

/// One instance's health at the handover.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct HealthRecord {
    pub(crate) upstream: String,
    pub(crate) pool: String,
    pub(crate) instance: String,
    pub(crate) healthy: bool,
    /// Passive ejection left, in milliseconds (0: not ejected).
    #[serde(default)]
    pub(crate) ejected_ms: u64,
}

/// The new process's verdict.
#[derive(Debug, Serialize, Deserialize)]
struct Ready {
    ready: bool,
    #[serde(default)]
    error: Option<String>,
}

/// The old process's last word after "ready": it stops accepting now. Only with it does the
/// new process consider the handover done (a "ready" that arrives as the old one gives up
/// must not leave both serving, or both owning the socket files).
#[derive(Debug, Serialize, Deserialize)]
struct Bye {
    bye: bool,
}

/// Why `--upgrade` could not take over.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpgradeError {
    /// No running switchyard answers on the upgrade socket.
    #[error("no running switchyard to take over at {} ({source}); is one running with this control.socket?", path.display())]
    NotRunning {
        /// The upgrade socket tried.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The running switchyard said no.
    #[error("the running switchyard refused the upgrade: {0}")]
    Refused(String),
    /// The exchange broke off or was garbled.
    #[error("upgrade handshake with the running switchyard failed: {0}")]
    Handshake(String),
    /// The new config cannot take over (a setting a binary upgrade cannot change); nothing
    /// changed.
    #[error("{0}; the running switchyard keeps serving")]
    Incompatible(String),
    /// The sockets were received but the new proxy could not start; the old one keeps serving.
    #[error("{0}; the running switchyard keeps serving")]
    Start(#[from] super::StartError),
}

/// What a new process received: sockets to adopt, health to seed, and the connection on which
/// it tells the old process it is ready.
#[derive(Debug)]
pub(crate) struct Takeover {
    stream: UnixStream,
    pub(crate) predecessor: u32,
    pub(crate) listeners: Vec<(SocketAddr, std::net::TcpListener)>,
    pub(crate) admin: Option<(SocketAddr, std::net::TcpListener)>,
    pub(crate) control: Option<UnixListener>,
    pub(crate) health: Vec<HealthRecord>,
    /// The old process's state file (canonical).
    pub(crate) state_file: PathBuf,
}

impl Takeover {
    /// The listener handed over for this configured `listen[].addr`, if any (in order:
    /// several `127.0.0.1:0` listeners keep their own sockets).
    pub(crate) fn take_listener(
        &mut self,
        configured: SocketAddr,
    ) -> Option<std::net::TcpListener> {
        let i = self.listeners.iter().position(|(a, _)| *a == configured)?;
        Some(self.listeners.remove(i).1)
    }

    /// The admin listener, if it was bound to this configured address.
    pub(crate) fn take_admin(&mut self, configured: SocketAddr) -> Option<std::net::TcpListener> {
        match self.admin.take() {
            Some((a, l)) if a == configured => Some(l),
            other => {
                self.admin = other;
                None
            }
        }
    }

    /// Tell the old process how the start went. `Ok` (after `Ok`): the old process said it
    /// stops accepting; only then is the handover done.
    pub(crate) fn answer(mut self, result: Result<(), String>) -> Result<(), UpgradeError> {
        let ok = result.is_ok();
        let ready = match result {
            Ok(()) => Ready {
                ready: true,
                error: None,
            },
            Err(e) => Ready {
                ready: false,
                error: Some(e),
            },
        };
        write_line(&mut self.stream, &ready)
            .map_err(|e| UpgradeError::Handshake(format!("cannot answer: {e}")))?;
        if !ok {
            // Wait (bounded) for the running process to close the connection, which it does
            // after it unfroze: when this process exits with its failure, the running one
            // accepts changes again, and a deploy script's next `proxyctl` is not told `busy`.
            let deadline = Instant::now() + READY_TIMEOUT;
            let mut sink = [0u8; 64];
            while let Some(left) = deadline.checked_duration_since(Instant::now()) {
                if self
                    .stream
                    .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                    .is_err()
                {
                    break;
                }
                match self.stream.read(&mut sink) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
            return Ok(());
        }
        let mut r = BufReader::new(
            self.stream
                .try_clone()
                .map_err(|e| UpgradeError::Handshake(e.to_string()))?,
        );
        let line = read_line(&mut r, Instant::now() + READY_TIMEOUT, MAX_LINE, &|| false).map_err(
            |e| UpgradeError::Handshake(format!("the running switchyard did not step down: {e}")),
        )?;
        match serde_json::from_slice::<Bye>(&line) {
            Ok(Bye { bye: true }) => Ok(()),
            _ => Err(UpgradeError::Handshake(
                "the running switchyard did not step down".into(),
            )),
        }
    }
}

fn write_line(stream: &mut UnixStream, value: &impl Serialize) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(value).map_err(std::io::Error::other)?;
    line.push(b'\n');
    stream.write_all(&line)
}

/// Read one line of at most `max` bytes before `deadline` (one deadline for the whole line),
/// giving up early when `stop()` says so.
fn read_line(
    r: &mut BufReader<UnixStream>,
    deadline: Instant,
    max: usize,
    stop: &dyn Fn() -> bool,
) -> std::io::Result<Vec<u8>> {
    use std::io::ErrorKind;
    let mut line = Vec::new();
    loop {
        // What has arrived counts, even if told to stop meanwhile.
        if let Some(i) = r.buffer().iter().position(|b| *b == b'\n') {
            line.extend_from_slice(&r.buffer()[..i]);
            r.consume(i + 1);
            if line.len() > max {
                return Err(std::io::Error::new(
                    ErrorKind::InvalidData,
                    format!("a message over {max} bytes"),
                ));
            }
            return Ok(line);
        }
        if stop() {
            return Err(std::io::Error::new(ErrorKind::Interrupted, "shutting down"));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(ErrorKind::TimedOut, "timed out"));
        }
        r.get_ref()
            .set_read_timeout(Some(left.min(Duration::from_millis(200))))?;
        let buf = match r.fill_buf() {
            Ok(b) => b,
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(e) => return Err(e),
        };
        if buf.is_empty() {
            return Err(std::io::Error::new(
                ErrorKind::UnexpectedEof,
                "the other side closed the connection",
            ));
        }
        let (take, done) = match buf.iter().position(|b| *b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        line.extend_from_slice(&buf[..take]);
        r.consume(take);
        if line.len() > max + 1 {
            return Err(std::io::Error::new(
                ErrorKind::InvalidData,
                format!("a message over {max} bytes"),
            ));
        }
        if done {
            line.pop();
            return Ok(line);
        }
    }
}

/// New process: connect to the running switchyard's upgrade socket, and receive its sockets.
pub(crate) fn take_over(control_socket: &Path) -> Result<Takeover, UpgradeError> {
    let path = socket_path(control_socket);
    let mut stream = UnixStream::connect(&path).map_err(|source| UpgradeError::NotRunning {
        path: path.clone(),
        source,
    })?;
    let shake = |e: std::io::Error| UpgradeError::Handshake(e.to_string());
    let deadline = Instant::now() + READY_TIMEOUT;
    stream
        .set_read_timeout(Some(READY_TIMEOUT))
        .and_then(|_| stream.set_write_timeout(Some(HELLO_TIMEOUT)))
        .map_err(shake)?;
    write_line(
        &mut stream,
        &Hello {
            upgrade: PROTOCOL,
            pid: std::process::id(),
        },
    )
    .map_err(shake)?;
    // The descriptors ride on the first bytes of the offer: receive those with room for them,
    // then read the rest of the line normally.
    let mut first = vec![0u8; 64 * 1024];
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_SOCKETS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = rustix::net::recvmsg(
        &stream,
        &mut [IoSliceMut::new(&mut first)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )
    .map_err(|e| UpgradeError::Handshake(format!("receiving the sockets: {e}")))?;
    let mut fds: Vec<OwnedFd> = Vec::new();
    for msg in control.drain() {
        if let RecvAncillaryMessage::ScmRights(it) = msg {
            fds.extend(it);
        }
    }
    first.truncate(got.bytes);
    if first.is_empty() {
        return Err(UpgradeError::Handshake(
            "the running switchyard closed the connection".into(),
        ));
    }
    let offer = if first.ends_with(b"\n") {
        first.pop();
        first
    } else {
        let mut rest = BufReader::new(stream.try_clone().map_err(shake)?);
        let mut tail = read_line(&mut rest, deadline, MAX_MESSAGE, &|| false).map_err(shake)?;
        first.append(&mut tail);
        first
    };
    let offer: Offer = serde_json::from_slice(&offer)
        .map_err(|e| UpgradeError::Handshake(format!("unreadable offer: {e}")))?;
    let (predecessor, sockets, health, state_file) = match offer {
        Offer::Refused(why) => return Err(UpgradeError::Refused(why)),
        Offer::Sockets {
            pid,
            sockets,
            health,
            state_file,
        } => (pid, sockets, health, state_file),
    };
    if sockets.len() != fds.len() {
        return Err(UpgradeError::Handshake(format!(
            "{} sockets described but {} received",
            sockets.len(),
            fds.len()
        )));
    }
    let mut t = Takeover {
        stream,
        predecessor,
        listeners: Vec::new(),
        admin: None,
        control: None,
        health,
        state_file,
    };
    for (what, fd) in sockets.into_iter().zip(fds) {
        match what {
            Offered::Listen { configured, .. } => t
                .listeners
                .push((configured, std::net::TcpListener::from(fd))),
            Offered::Admin { configured } => {
                t.admin = Some((configured, std::net::TcpListener::from(fd)))
            }
            Offered::Control => t.control = Some(UnixListener::from(fd)),
        }
    }
    Ok(t)
}

/// Where the upgrade socket's file is, and whether this process may remove it.
#[derive(Debug)]
pub(crate) struct Placement {
    /// Bound here first.
    tmp: PathBuf,
    /// Moved here by [`Self::place`].
    path: PathBuf,
    placed: AtomicBool,
    /// Whether dropping the server removes the file: not while a successor may be taking it
    /// over, nor after one did.
    owns: AtomicBool,
}

impl Placement {
    /// Move the socket file to its path (replacing a predecessor's).
    pub(crate) fn place(&self) -> std::io::Result<()> {
        std::fs::rename(&self.tmp, &self.path)?;
        self.placed.store(true, Ordering::Release);
        self.owns.store(true, Ordering::Release);
        Ok(())
    }
}

/// Old process: the sockets it would hand over, and where it listens for a successor.
#[derive(Debug)]
pub(crate) struct HandoverServer {
    listener: UnixListener,
    placement: Arc<Placement>,
    sockets: Vec<(Offered, OwnedFd)>,
    /// This process's state file, which a successor must use too.
    state_file: PathBuf,
}

/// What the handover needs from the running proxy.
#[derive(Debug)]
pub(crate) struct HandoverContext {
    pub(crate) shared: Arc<Shared>,
    /// Cleared while a successor may be taking over, and after it did: the control socket's
    /// file is then not this process's to remove.
    pub(crate) control_owns_path: Arc<AtomicBool>,
    /// Tells the data plane to linger on idle connections while it drains.
    pub(crate) lingering: Arc<AtomicBool>,
    /// Stops the data plane (accepting) once the successor is ready; read to refuse a handover
    /// once shutting down.
    pub(crate) shutdown: watch::Sender<bool>,
    /// The successor's pid, once it took over.
    pub(crate) handed_over: watch::Sender<Option<u32>>,
}

impl HandoverServer {
    /// Bind the upgrade socket for `control` (mode 0600) under a temporary name; with `place`
    /// moved into its path at once, else by [`Placement::place`] later (the new process of an
    /// upgrade, once the old one has its answer).
    pub(crate) fn bind(
        control: &Path,
        sockets: Vec<(Offered, OwnedFd)>,
        state_file: &Path,
        place: bool,
    ) -> std::io::Result<HandoverServer> {
        use std::os::unix::fs::PermissionsExt;
        let path = socket_path(control);
        let (_, tmp) = switchyard_control::server::temp_beside(&path);
        let _ = std::fs::remove_file(&tmp);
        let listener = UnixListener::bind(&tmp)?;
        let placement = Arc::new(Placement {
            tmp: tmp.clone(),
            path,
            placed: AtomicBool::new(false),
            owns: AtomicBool::new(false),
        });
        let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
            .and_then(|_| if place { placement.place() } else { Ok(()) });
        if let Err(e) = placed {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        listener.set_nonblocking(true)?;
        Ok(HandoverServer {
            listener,
            placement,
            sockets,
            state_file: state_file.to_path_buf(),
        })
    }

    /// Its file's placement.
    pub(crate) fn placement(&self) -> Arc<Placement> {
        self.placement.clone()
    }

    /// Serve successors, one at a time, until one takes over (then stop the data plane) or
    /// `stop` becomes true (a shutdown: the sockets are released at once, so the listeners
    /// close when the accept loops let go of them).
    pub(crate) async fn serve(self, ctx: HandoverContext, mut stop: watch::Receiver<bool>) {
        let listener = match self
            .listener
            .try_clone()
            .and_then(tokio::net::UnixListener::from_std)
        {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(path = %self.placement.path.display(), error = %e, "upgrade socket unusable; binary upgrades are off");
                return;
            }
        };
        let me = Arc::new(self);
        let ctx = Arc::new(ctx);
        loop {
            let conn = tokio::select! {
                c = listener.accept() => c,
                _ = stop.wait_for(|s| *s) => return,
            };
            let stream = match conn.and_then(|(s, _)| s.into_std()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "upgrade socket: accept failed");
                    continue;
                }
            };
            let (me2, ctx2) = (me.clone(), ctx.clone());
            let outcome = tokio::task::spawn_blocking(move || me2.hand_over(stream, &ctx2)).await;
            match outcome {
                Ok(Ok(pid)) => {
                    ctx.lingering.store(true, Ordering::Release);
                    let _ = ctx.handed_over.send(Some(pid));
                    let _ = ctx.shutdown.send(true);
                    tracing::info!(successor = pid, "upgrade: the new process serves; no longer accepting, draining in-flight requests");
                    return;
                }
                Ok(Err(why)) => {
                    tracing::warn!(reason = %why, "upgrade failed; this process keeps serving");
                }
                Err(e) => {
                    // A panic: as after any failure, this process goes on, unfrozen. Off this
                    // runtime: thawing takes the writer lock, which a change may hold while it
                    // waits for this runtime (a fleet write).
                    let (me3, ctx3) = (me.clone(), ctx.clone());
                    let _ = tokio::task::spawn_blocking(move || me3.release(&ctx3, false)).await;
                    tracing::error!(error = %e, "upgrade task failed; this process keeps serving");
                }
            }
        }
    }

    /// After the conversation: with `handed_over` the successor owns the socket files (never
    /// remove them); else this process owns them again and accepts changes again.
    fn release(&self, ctx: &HandoverContext, handed_over: bool) {
        self.placement.owns.store(!handed_over, Ordering::Release);
        ctx.control_owns_path.store(!handed_over, Ordering::Release);
        if !handed_over {
            ctx.shared.thaw();
        }
    }

    /// One handover conversation (blocking). `Ok(pid)`: the successor is serving.
    fn hand_over(&self, mut stream: UnixStream, ctx: &HandoverContext) -> Result<u32, String> {
        fn refuse(stream: &mut UnixStream, why: String) -> Result<u32, String> {
            let _ = write_line(stream, &Offer::Refused(why.clone()));
            Err(why)
        }
        stream
            .set_nonblocking(false)
            .and_then(|_| stream.set_write_timeout(Some(HELLO_TIMEOUT)))
            .map_err(|e| e.to_string())?;
        // Only the same user (or root) is handed the listening sockets.
        let cred = rustix::net::sockopt::socket_peercred(&stream)
            .map_err(|e| format!("cannot tell who connected: {e}"))?;
        let me = rustix::process::geteuid();
        let pid = u32::try_from(cred.pid.as_raw_nonzero().get()).unwrap_or(0);
        if cred.uid != me && !cred.uid.is_root() {
            return refuse(
                &mut stream,
                format!(
                    "uid {} may not take over a switchyard running as uid {}",
                    cred.uid.as_raw(),
                    me.as_raw()
                ),
            );
        }
        let stopping = || *ctx.shutdown.borrow();
        let mut reader = BufReader::new(stream.try_clone().map_err(|e| e.to_string())?);
        let hello = read_line(
            &mut reader,
            Instant::now() + HELLO_TIMEOUT,
            MAX_LINE,
            &stopping,
        )
        .map_err(|e| format!("no hello from pid {pid}: {e}"))?;
        if !reader.buffer().is_empty() {
            return refuse(
                &mut stream,
                "nothing may follow the hello before the offer".into(),
            );
        }
        let hello: Hello = match serde_json::from_slice(&hello) {
            Ok(h) => h,
            Err(e) => return refuse(&mut stream, format!("bad hello: {e}")),
        };
        if hello.upgrade != PROTOCOL {
            let why = format!(
                "upgrade protocol {} is not this process's ({PROTOCOL})",
                hello.upgrade
            );
            return refuse(&mut stream, why);
        }
        if stopping() {
            return refuse(&mut stream, "this switchyard is shutting down".into());
        }
        tracing::info!(pid, "upgrade: a new process asks for the sockets");
        // Freeze and persist: what the successor reads is everything acknowledged.
        if let Err(e) = ctx.shared.freeze(&self.state_file) {
            return refuse(&mut stream, format!("cannot write the state file: {e}"));
        }
        // From the offer on the successor may serve these files: never remove them, even on a
        // SIGTERM now, unless the handover fails.
        self.placement.owns.store(false, Ordering::Release);
        ctx.control_owns_path.store(false, Ordering::Release);
        let result = self.offer(&mut stream, &mut reader, ctx, pid, &stopping);
        self.release(ctx, result.is_ok());
        result
    }

    fn offer(
        &self,
        stream: &mut UnixStream,
        reader: &mut BufReader<UnixStream>,
        ctx: &HandoverContext,
        pid: u32,
        stopping: &dyn Fn() -> bool,
    ) -> Result<u32, String> {
        let offer = Offer::Sockets {
            pid: std::process::id(),
            sockets: self.sockets.iter().map(|(o, _)| o.clone()).collect(),
            health: health_records(&ctx.shared),
            state_file: std::fs::canonicalize(&self.state_file)
                .unwrap_or_else(|_| self.state_file.clone()),
        };
        let mut line = serde_json::to_vec(&offer).map_err(|e| e.to_string())?;
        line.push(b'\n');
        let fds: Vec<_> = self.sockets.iter().map(|(_, fd)| fd.as_fd()).collect();
        let mut space =
            vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(&fds)) {
            return Err("too many sockets for one message".into());
        }
        let sent = rustix::net::sendmsg(
            &*stream,
            &[IoSlice::new(&line)],
            &mut control,
            SendFlags::NOSIGNAL,
        )
        .map_err(|e| format!("sending the sockets: {e}"))?;
        if sent < line.len() {
            stream
                .write_all(&line[sent..])
                .map_err(|e| format!("sending the offer: {e}"))?;
        }
        let answer = read_line(reader, Instant::now() + READY_TIMEOUT, MAX_LINE, stopping)
            .map_err(|e| format!("the new process (pid {pid}) did not say it was ready: {e}"))?;
        let answer: Ready =
            serde_json::from_slice(&answer).map_err(|e| format!("bad answer: {e}"))?;
        if answer.ready {
            // Binding from here: the successor serves once it reads this.
            write_line(stream, &Bye { bye: true })
                .map_err(|e| format!("the new process (pid {pid}) went away: {e}"))?;
            Ok(pid)
        } else {
            Err(format!(
                "the new process (pid {pid}) could not start: {}",
                answer.error.unwrap_or_default()
            ))
        }
    }
}

impl Drop for HandoverServer {
    fn drop(&mut self) {
        let p = &self.placement;
        if !p.placed.load(Ordering::Acquire) {
            let _ = std::fs::remove_file(&p.tmp);
        } else if p.owns.load(Ordering::Acquire) {
            let _ = std::fs::remove_file(&p.path);
        }
    }
}

/// Every instance's known health (unknown ones are left out: the successor checks them),
/// with its passive ejection.
fn health_records(shared: &Shared) -> Vec<HealthRecord> {
    let snap = shared.load();
    let now = crate::upstream::health::now_ms();
    let mut out = Vec::new();
    for u in &snap.upstreams {
        for p in &u.pools {
            for i in &p.instances {
                let healthy = match i.health.state() {
                    HealthState::Healthy => true,
                    HealthState::Unhealthy => false,
                    _ => continue,
                };
                let ejected_ms = i
                    .health
                    .ejected_for(now)
                    .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
                    .unwrap_or(0);
                out.push(HealthRecord {
                    upstream: u.name().to_string(),
                    pool: p.pool.name.clone(),
                    instance: i.label.clone(),
                    healthy,
                    ejected_ms,
                });
            }
        }
    }
    out
}

/// The longest ejection carried over (a year: `eject_for` is bounded well below).
const MAX_EJECTION_MS: u64 = 365 * 86_400_000;

/// Start from the predecessor's health: instances it knew are healthy or unhealthy, and
/// ejected for what was left, from the first request (the checks go on as usual).
pub(crate) fn seed_health(shared: &Shared, records: &[HealthRecord]) {
    let snap = shared.load();
    let now = crate::upstream::health::now_ms();
    for r in records {
        let Some(u) = snap.upstreams.iter().find(|u| u.name() == r.upstream) else {
            continue;
        };
        let Some(p) = u.pools.iter().find(|p| p.pool.name == r.pool) else {
            continue;
        };
        for i in p.instances.iter().filter(|i| i.label == r.instance) {
            i.health.force(if r.healthy {
                HealthState::Healthy
            } else {
                HealthState::Unhealthy
            });
            if r.ejected_ms > 0 {
                i.health
                    .eject(now.saturating_add(r.ejected_ms.min(MAX_EJECTION_MS)), now);
            }
        }
    }
}
