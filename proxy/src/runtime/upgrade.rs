//! Binary upgrade (SPEC §10): a running switchyard hands its listening sockets to a new one.
//!
//! Every running proxy listens on a second Unix socket next to the control socket
//! (`<control.socket>.upgrade`, same file mode). `switchyard --upgrade -c FILE`:
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
use std::time::Duration;
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

/// How long the old process waits for the hello after a connection.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

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
    /// The sockets (attached, in this order) and the health to start from.
    Sockets {
        pid: u32,
        sockets: Vec<Offered>,
        health: Vec<HealthRecord>,
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

/// One instance's active health state at the handover.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct HealthRecord {
    pub(crate) upstream: String,
    pub(crate) pool: String,
    pub(crate) instance: String,
    pub(crate) healthy: bool,
}

/// The new process's verdict.
#[derive(Debug, Serialize, Deserialize)]
struct Ready {
    ready: bool,
    #[serde(default)]
    error: Option<String>,
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
}

impl Takeover {
    /// The listener handed over for this configured `listen[].addr`, if any.
    pub(crate) fn take_listener(
        &mut self,
        configured: SocketAddr,
    ) -> Option<std::net::TcpListener> {
        let i = self.listeners.iter().position(|(a, _)| *a == configured)?;
        Some(self.listeners.swap_remove(i).1)
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

    /// Tell the old process how the start went. `Ok`: it stops accepting and drains.
    pub(crate) fn answer(mut self, result: Result<(), String>) -> Result<(), UpgradeError> {
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
            .map_err(|e| UpgradeError::Handshake(format!("cannot answer: {e}")))
    }
}

fn write_line(stream: &mut UnixStream, value: &impl Serialize) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(value).map_err(std::io::Error::other)?;
    line.push(b'\n');
    stream.write_all(&line)
}

/// Read one line of at most [`MAX_MESSAGE`] bytes.
fn read_line(r: &mut impl BufRead) -> std::io::Result<Vec<u8>> {
    let mut line = Vec::new();
    r.take(MAX_MESSAGE as u64).read_until(b'\n', &mut line)?;
    if line.last() != Some(&b'\n') {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            if line.is_empty() {
                "the other side closed the connection".to_string()
            } else {
                format!("a message over {MAX_MESSAGE} bytes or cut short")
            },
        ));
    }
    line.pop();
    Ok(line)
}

/// New process: connect to the running switchyard's upgrade socket, and receive its sockets.
pub(crate) fn take_over(control_socket: &Path) -> Result<Takeover, UpgradeError> {
    let path = socket_path(control_socket);
    let mut stream = UnixStream::connect(&path).map_err(|source| UpgradeError::NotRunning {
        path: path.clone(),
        source,
    })?;
    let shake = |e: std::io::Error| UpgradeError::Handshake(e.to_string());
    stream
        .set_read_timeout(Some(READY_TIMEOUT))
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
    let offer = if first.ends_with(b"\n") {
        first.pop();
        first
    } else {
        let mut rest = BufReader::new(&mut stream);
        let mut tail = read_line(&mut rest).map_err(shake)?;
        first.append(&mut tail);
        first
    };
    let offer: Offer = serde_json::from_slice(&offer)
        .map_err(|e| UpgradeError::Handshake(format!("unreadable offer: {e}")))?;
    let (predecessor, sockets, health) = match offer {
        Offer::Refused(why) => return Err(UpgradeError::Refused(why)),
        Offer::Sockets {
            pid,
            sockets,
            health,
        } => (pid, sockets, health),
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

/// Old process: the sockets it would hand over, and where it listens for a successor.
#[derive(Debug)]
pub(crate) struct HandoverServer {
    listener: UnixListener,
    path: PathBuf,
    /// Cleared once a successor serves the path: dropping the server must not remove it.
    owns_path: Arc<AtomicBool>,
    sockets: Vec<(Offered, OwnedFd)>,
}

/// What the handover needs from the running proxy.
#[derive(Debug)]
pub(crate) struct HandoverContext {
    pub(crate) shared: Arc<Shared>,
    pub(crate) state_file: PathBuf,
    /// Set once the successor is ready: the control socket file is its now.
    pub(crate) control_owns_path: Arc<AtomicBool>,
    /// Tells the data plane to linger on idle connections while it drains.
    pub(crate) lingering: Arc<AtomicBool>,
    /// Stops the data plane (accepting) once the successor is ready.
    pub(crate) shutdown: watch::Sender<bool>,
    /// The successor's pid, once it took over.
    pub(crate) handed_over: watch::Sender<Option<u32>>,
}

impl HandoverServer {
    /// Bind the upgrade socket for `control` with `mode`, replacing a predecessor's (the new
    /// process of an upgrade binds it after taking the old one's sockets).
    pub(crate) fn bind(
        control: &Path,
        mode: u32,
        sockets: Vec<(Offered, OwnedFd)>,
    ) -> std::io::Result<HandoverServer> {
        use std::os::unix::fs::PermissionsExt;
        let path = socket_path(control);
        let (_, tmp) = switchyard_control::server::temp_beside(&path);
        let _ = std::fs::remove_file(&tmp);
        let listener = UnixListener::bind(&tmp)?;
        let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
            .and_then(|_| std::fs::rename(&tmp, &path));
        if let Err(e) = placed {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        listener.set_nonblocking(true)?;
        Ok(HandoverServer {
            listener,
            path,
            owns_path: Arc::new(AtomicBool::new(true)),
            sockets,
        })
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
                tracing::error!(path = %self.path.display(), error = %e, "upgrade socket unusable; binary upgrades are off");
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
                    me.owns_path.store(false, Ordering::Release);
                    ctx.control_owns_path.store(false, Ordering::Release);
                    ctx.lingering.store(true, Ordering::Release);
                    let _ = ctx.handed_over.send(Some(pid));
                    let _ = ctx.shutdown.send(true);
                    tracing::info!(successor = pid, "upgrade: the new process serves; no longer accepting, draining in-flight requests");
                    return;
                }
                Ok(Err(why)) => {
                    tracing::warn!(reason = %why, "upgrade failed; this process keeps serving");
                }
                Err(e) => tracing::error!(error = %e, "upgrade task failed"),
            }
        }
    }

    /// One handover conversation (blocking). `Ok(pid)`: the successor is serving.
    fn hand_over(&self, mut stream: UnixStream, ctx: &HandoverContext) -> Result<u32, String> {
        stream
            .set_nonblocking(false)
            .and_then(|_| stream.set_read_timeout(Some(HELLO_TIMEOUT)))
            .and_then(|_| stream.set_write_timeout(Some(HELLO_TIMEOUT)))
            .map_err(|e| e.to_string())?;
        let mut reader = BufReader::new(stream.try_clone().map_err(|e| e.to_string())?);
        let hello = read_line(&mut reader).map_err(|e| format!("no hello: {e}"))?;
        let hello: Hello = serde_json::from_slice(&hello).map_err(|e| format!("bad hello: {e}"))?;
        if hello.upgrade != PROTOCOL {
            let why = format!(
                "upgrade protocol {} is not this process's ({PROTOCOL})",
                hello.upgrade
            );
            let _ = write_line(&mut stream, &Offer::Refused(why.clone()));
            return Err(why);
        }
        tracing::info!(
            pid = hello.pid,
            "upgrade: a new process asks for the sockets"
        );
        // Freeze and persist: what the successor reads is everything acknowledged.
        if let Err(e) = ctx.shared.freeze(&ctx.state_file) {
            let why = format!("cannot write the state file: {e}");
            let _ = write_line(&mut stream, &Offer::Refused(why.clone()));
            return Err(why);
        }
        let result = self.offer(&mut stream, &mut reader, ctx, hello.pid);
        if result.is_err() {
            ctx.shared.thaw();
        }
        result
    }

    fn offer(
        &self,
        stream: &mut UnixStream,
        reader: &mut BufReader<UnixStream>,
        ctx: &HandoverContext,
        pid: u32,
    ) -> Result<u32, String> {
        let offer = Offer::Sockets {
            pid: std::process::id(),
            sockets: self.sockets.iter().map(|(o, _)| o.clone()).collect(),
            health: health_records(&ctx.shared),
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
        stream
            .set_read_timeout(Some(READY_TIMEOUT))
            .map_err(|e| e.to_string())?;
        let answer = read_line(reader).map_err(|e| {
            format!("the new process (pid {pid}) went away before it was ready: {e}")
        })?;
        let answer: Ready =
            serde_json::from_slice(&answer).map_err(|e| format!("bad answer: {e}"))?;
        if answer.ready {
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
        if self.owns_path.load(Ordering::Acquire) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Every instance's known active health (unknown ones are left out: the successor checks them).
fn health_records(shared: &Shared) -> Vec<HealthRecord> {
    let snap = shared.load();
    let mut out = Vec::new();
    for u in &snap.upstreams {
        for p in &u.pools {
            for i in &p.instances {
                let healthy = match i.health.state() {
                    HealthState::Healthy => true,
                    HealthState::Unhealthy => false,
                    _ => continue,
                };
                out.push(HealthRecord {
                    upstream: u.name().to_string(),
                    pool: p.pool.name.clone(),
                    instance: i.label.clone(),
                    healthy,
                });
            }
        }
    }
    out
}

/// Start from the predecessor's health: instances it knew are healthy or unhealthy from the
/// first request (the checks go on as usual).
pub(crate) fn seed_health(shared: &Shared, records: &[HealthRecord]) {
    let snap = shared.load();
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
        }
    }
}
