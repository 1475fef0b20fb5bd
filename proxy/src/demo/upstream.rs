//! A small Spring-like origin server: the demo's blue and green apps, the tests' upstreams and
//! the benchmarks' origin, written once.
//!
//! Endpoints:
//! - `GET /actuator/health`: `{"status":"UP"}` (programmable: status, body, hang);
//! - `GET /slow?ms=N`: answers after N ms;
//! - `GET /bytes?n=N`: N bytes of a fixed pattern ([`pattern_byte`]), streamed in 64 KiB chunks;
//! - `ANY /sha256`: reads the request body as a stream, answers `{"bytes":N,"sha256":"..."}`;
//! - `GET /status/NNN`: answers with that status;
//! - `GET /hello`: `hello` (5 bytes, for throughput benchmarks);
//! - `GET /public`: the color answer with `Cache-Control: public, max-age=60` (a page a CDN
//!   may keep);
//! - `GET /ws`: a raw upgrade (101) that echoes bytes until either side closes;
//! - `ANY /demo/fail?percent=N`: from now on answer N% of requests with `500` (the demo's bad
//!   canary; `percent=0` heals it);
//! - anything else: `{"color":"blue","requests":N,"path":"..."}`.
//!
//! Knobs for tests: [`Mode`] (fail with a status, hang, reset the connection), the health
//! answer, stopping (connection refused, open connections cut) and restarting on the same
//! port, and a log of every request with its connection number and arrival time.

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::task::AbortHandle;

type RespBody = BoxBody<Bytes, std::io::Error>;

/// How the upstream answers ordinary requests (the health endpoint has its own setting).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Answer normally.
    Normal,
    /// Answer every request with this status.
    Status(u16),
    /// Never answer (until stopped).
    Hang,
    /// Close the connection without answering.
    Reset,
    /// Answer this share of requests (percent, spread evenly) with `500`, the rest normally.
    FailShare(u8),
}

/// What the health endpoint answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthReply {
    /// This status and body.
    Answer(u16, String),
    /// Never answer.
    Hang,
}

impl HealthReply {
    /// `200 {"status":"UP"}`.
    pub fn up() -> Self {
        HealthReply::Answer(200, r#"{"status":"UP"}"#.into())
    }
    /// `503 {"status":"DOWN"}` (what Spring answers while not ready).
    pub fn down() -> Self {
        HealthReply::Answer(503, r#"{"status":"DOWN"}"#.into())
    }
}

/// One request as the upstream saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// Connection number (1, 2, ... in accept order), to tell keep-alive reuse apart.
    pub conn: u64,
    /// Method.
    pub method: String,
    /// The request target as received: path and query, or the whole URL if the proxy
    /// forwarded absolute-form.
    pub path: String,
    /// Request headers.
    pub headers: http::HeaderMap,
    /// When the request head arrived.
    pub at: Instant,
}

#[derive(Debug)]
struct State {
    name: String,
    hits: AtomicU64,
    health_hits: AtomicU64,
    conns: AtomicU64,
    open: std::sync::atomic::AtomicI64,
    open_ids: Mutex<std::collections::HashSet<u64>>,
    record: bool,
    mode: Mutex<Mode>,
    health: Mutex<HealthReply>,
    seen: Mutex<Vec<Seen>>,
    health_seen: Mutex<Vec<Instant>>,
    stopped: AtomicBool,
}

/// A running fake upstream. Dropping it stops it.
#[derive(Debug)]
pub struct FakeUpstream {
    addr: SocketAddr,
    state: Arc<State>,
    tasks: Arc<Mutex<Vec<AbortHandle>>>,
}

/// Builder for [`FakeUpstream`].
#[derive(Debug)]
pub struct Builder {
    name: String,
    addr: SocketAddr,
    record: bool,
}

impl Builder {
    /// Bind this address instead of `127.0.0.1:0`.
    pub fn addr(mut self, addr: SocketAddr) -> Self {
        self.addr = addr;
        self
    }

    /// Keep a log of every request (default true; off for benchmarks and the demo).
    pub fn record(mut self, on: bool) -> Self {
        self.record = on;
        self
    }

    /// Bind and start serving on the current tokio runtime.
    pub async fn start(self) -> std::io::Result<FakeUpstream> {
        let listener = TcpListener::bind(self.addr).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            name: self.name,
            hits: AtomicU64::new(0),
            health_hits: AtomicU64::new(0),
            conns: AtomicU64::new(0),
            open: std::sync::atomic::AtomicI64::new(0),
            open_ids: Mutex::new(Default::default()),
            record: self.record,
            mode: Mutex::new(Mode::Normal),
            health: Mutex::new(HealthReply::up()),
            seen: Mutex::new(Vec::new()),
            health_seen: Mutex::new(Vec::new()),
            stopped: AtomicBool::new(false),
        });
        let up = FakeUpstream {
            addr,
            state,
            tasks: Arc::new(Mutex::new(Vec::new())),
        };
        up.spawn_accept(listener);
        Ok(up)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A test thread that panicked while holding the lock must not wedge the server.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl FakeUpstream {
    /// A builder for an upstream called `name` (the demo's `blue`/`green`).
    pub fn builder(name: &str) -> Builder {
        Builder {
            name: name.to_string(),
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            record: true,
        }
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its name (the color in its answers).
    pub fn name(&self) -> &str {
        &self.state.name
    }

    /// Change how ordinary requests are answered.
    pub fn set_mode(&self, mode: Mode) {
        *lock(&self.state.mode) = mode;
    }

    /// Change the health endpoint's answer.
    pub fn set_health(&self, reply: HealthReply) {
        *lock(&self.state.health) = reply;
    }

    /// Cut every task: the listener and every connection.
    fn abort_tasks(&self) {
        self.state.stopped.store(true, Ordering::Release);
        for t in lock(&self.tasks).drain(..) {
            t.abort();
        }
    }

    fn spawn_accept(&self, listener: TcpListener) {
        let state = self.state.clone();
        let tasks = self.tasks.clone();
        let tasks2 = self.tasks.clone();
        let handle = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let conn = state.conns.fetch_add(1, Ordering::AcqRel) + 1;
                let st = state.clone();
                let open = OpenGuard::new(state.clone(), conn);
                let task = tokio::spawn(async move {
                    let _open = open;
                    let svc = service_fn(move |req| handle(st.clone(), conn, req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .keep_alive(true)
                        .serve_connection(TokioIo::new(stream), svc)
                        .with_upgrades()
                        .await;
                });
                let mut t = lock(&tasks);
                t.retain(|h| !h.is_finished());
                t.push(task.abort_handle());
            }
        });
        lock(&tasks2).push(handle.abort_handle());
    }
}

/// What tests look at and change (feature `test-util`).
#[cfg(feature = "test-util")]
impl FakeUpstream {
    /// Start an upstream called `name` on `127.0.0.1:0`, recording requests.
    pub async fn start(name: &str) -> std::io::Result<FakeUpstream> {
        Self::builder(name).start().await
    }

    /// Requests served, not counting health checks.
    pub fn hits(&self) -> u64 {
        self.state.hits.load(Ordering::Acquire)
    }

    /// Health checks served.
    pub fn health_hits(&self) -> u64 {
        self.state.health_hits.load(Ordering::Acquire)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.state.conns.load(Ordering::Acquire)
    }

    /// Connections open right now.
    pub fn open_connections(&self) -> i64 {
        self.state.open.load(Ordering::Acquire)
    }

    /// Whether connection number `conn` (see [`Seen::conn`]) is still open.
    pub fn is_open(&self, conn: u64) -> bool {
        lock(&self.state.open_ids).contains(&conn)
    }

    /// Every request seen so far (health checks excluded), if recording.
    pub fn seen(&self) -> Vec<Seen> {
        lock(&self.state.seen).clone()
    }

    /// Arrival times of health checks, if recording.
    pub fn health_seen(&self) -> Vec<Instant> {
        lock(&self.state.health_seen).clone()
    }

    /// Forget recorded requests.
    pub fn clear_seen(&self) {
        lock(&self.state.seen).clear();
    }

    /// Stop: close the listening socket (new connections are refused) and cut every open
    /// connection, as a crashed container would.
    pub fn stop(&self) {
        self.abort_tasks();
    }

    /// Listen again on the same address after [`Self::stop`].
    pub async fn restart(&self) -> std::io::Result<()> {
        let listener = TcpListener::bind(self.addr).await?;
        self.state.stopped.store(false, Ordering::Release);
        self.spawn_accept(listener);
        Ok(())
    }
}

/// Counts an open connection until dropped (also when the task is aborted).
struct OpenGuard(Arc<State>, u64);

impl OpenGuard {
    fn new(st: Arc<State>, conn: u64) -> Self {
        st.open.fetch_add(1, Ordering::AcqRel);
        lock(&st.open_ids).insert(conn);
        OpenGuard(st, conn)
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        lock(&self.0.open_ids).remove(&self.1);
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.abort_tasks();
    }
}

/// The byte at offset `i` of every `/bytes` body: a pattern whose checksum a test can compute.
pub fn pattern_byte(i: u64) -> u8 {
    (i % 251) as u8
}

fn query_u64(uri: &http::Uri, key: &str) -> Option<u64> {
    uri.query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| v.parse().ok()).flatten()
    })
}

fn full(status: u16, content_type: &str, body: impl Into<Bytes>) -> Response<RespBody> {
    let mut r = Response::new(
        Full::new(body.into())
            .map_err(|never: Infallible| match never {})
            .boxed(),
    );
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if let Ok(v) = http::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    r
}

async fn handle(
    st: Arc<State>,
    conn: u64,
    req: Request<Incoming>,
) -> Result<Response<RespBody>, std::io::Error> {
    let path = req.uri().path().to_string();
    let target = req
        .uri()
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    if path == "/actuator/health" {
        st.health_hits.fetch_add(1, Ordering::AcqRel);
        if st.record {
            lock(&st.health_seen).push(Instant::now());
        }
        let reply = lock(&st.health).clone();
        return match reply {
            HealthReply::Answer(code, body) => Ok(full(code, "application/json", body)),
            HealthReply::Hang => {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Ok(full(503, "application/json", r#"{"status":"DOWN"}"#))
            }
        };
    }
    if path == "/demo/fail" {
        let percent = query_u64(req.uri(), "percent").unwrap_or(100).min(100) as u8;
        *lock(&st.mode) = if percent == 0 {
            Mode::Normal
        } else {
            Mode::FailShare(percent)
        };
        return Ok(full(
            200,
            "application/json",
            format!(r#"{{"color":"{}","fail_percent":{percent}}}"#, st.name),
        ));
    }
    let n = st.hits.fetch_add(1, Ordering::AcqRel) + 1;
    if st.record {
        lock(&st.seen).push(Seen {
            conn,
            method: req.method().to_string(),
            path: if req.uri().authority().is_some() {
                req.uri().to_string()
            } else {
                req.uri()
                    .path_and_query()
                    .map(|p| p.to_string())
                    .unwrap_or_default()
            },
            headers: req.headers().clone(),
            at: Instant::now(),
        });
    }
    let mode = *lock(&st.mode);
    match mode {
        Mode::Normal => {}
        Mode::Status(code) => {
            return Ok(full(
                code,
                "text/plain",
                format!("{} says {code}\n", st.name),
            ))
        }
        Mode::Hang => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
        Mode::Reset => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "reset by test",
            ))
        }
        // Request n fails when n * p / 100 steps up: exactly p in every 100, evenly spread.
        Mode::FailShare(p) if (n * u64::from(p)) / 100 != ((n - 1) * u64::from(p)) / 100 => {
            return Ok(full(
                500,
                "text/plain",
                format!("{} fails {p}% of requests\n", st.name),
            ))
        }
        Mode::FailShare(_) => {}
    }
    match path.as_str() {
        "/hello" => Ok(full(200, "text/plain", "hello")),
        "/public" => {
            let mut r = color(&st, n, &target);
            r.headers_mut().insert(
                http::header::CACHE_CONTROL,
                http::HeaderValue::from_static("public, max-age=60"),
            );
            Ok(r)
        }
        "/slow" => {
            let ms = query_u64(req.uri(), "ms").unwrap_or(1000).min(3_600_000);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok(color(&st, n, &target))
        }
        "/bytes" => {
            let total = query_u64(req.uri(), "n").unwrap_or(0);
            let mut r = Response::new(BoxBody::new(PatternBody { offset: 0, total }));
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/octet-stream"),
            );
            r.headers_mut()
                .insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(total));
            Ok(r)
        }
        "/sha256" => {
            let mut body = req.into_body();
            let mut hasher = Sha256::new();
            let mut bytes = 0u64;
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(std::io::Error::other)?;
                if let Some(d) = frame.data_ref() {
                    bytes += d.len() as u64;
                    hasher.update(d);
                }
            }
            let hex: String = hasher
                .finalize()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            Ok(full(
                200,
                "application/json",
                format!(r#"{{"bytes":{bytes},"sha256":"{hex}"}}"#),
            ))
        }
        "/ws" => {
            let mut resp = full(101, "text/plain", "");
            resp.headers_mut().insert(
                http::header::UPGRADE,
                http::HeaderValue::from_static("websocket"),
            );
            resp.headers_mut().insert(
                http::header::CONNECTION,
                http::HeaderValue::from_static("upgrade"),
            );
            tokio::spawn(async move {
                if let Ok(up) = hyper::upgrade::on(req).await {
                    let mut io = TokioIo::new(up);
                    let (mut r, mut w) = tokio::io::split(&mut io);
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                }
            });
            Ok(resp)
        }
        p if p.starts_with("/status/") => {
            let code = p["/status/".len()..].parse().unwrap_or(500);
            Ok(full(code, "text/plain", format!("status {code}\n")))
        }
        _ => Ok(color(&st, n, &target)),
    }
}

fn color(st: &State, n: u64, path: &str) -> Response<RespBody> {
    let body = serde_json::json!({ "color": st.name, "requests": n, "path": path });
    let mut r = full(200, "application/json", body.to_string());
    if let Ok(v) = http::HeaderValue::from_str(&st.name) {
        r.headers_mut().insert("x-color", v);
    }
    r
}

/// A streamed body of `total` pattern bytes in 64 KiB frames, never held in memory at once.
struct PatternBody {
    offset: u64,
    total: u64,
}

const CHUNK: u64 = 64 * 1024;

impl Body for PatternBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        if self.offset >= self.total {
            return Poll::Ready(None);
        }
        let n = CHUNK.min(self.total - self.offset);
        let start = self.offset;
        let chunk: Vec<u8> = (start..start + n).map(pattern_byte).collect();
        self.offset += n;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(chunk)))))
    }

    fn is_end_stream(&self) -> bool {
        self.offset >= self.total
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.total - self.offset)
    }
}
