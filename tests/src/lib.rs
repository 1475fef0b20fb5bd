//! The end-to-end harness: real proxies (real Pingora, real sockets) started in-process on
//! ports chosen at run time, fake upstreams, explicit keep-alive clients, and bounded polling.
//!
//! ```ignore
//! let blue = FakeUpstream::start("blue").await?;
//! let px = TestProxy::start(&app_yaml(&[("blue", &[blue.addr()])], "blue", "")).await;
//! let r = px.get("/").await;
//! assert_eq!(r.status, 200);
//! eventually(|| blue.hits() == 1).await;
//! px.shutdown().await;
//! ```
#![allow(
    clippy::unwrap_used,
    missing_docs,
    unreachable_pub,
    missing_debug_implementations
)]

pub mod etcd;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::sync::{Arc, Once};
use std::time::Duration;
use switchyard_proxy::{Handle, StartOptions};

pub use switchyard_proxy::demo::upstream::{FakeUpstream, HealthReply, Mode};

/// Install a test log subscriber once (`RUST_LOG=debug cargo test` to see the proxy's logs).
pub fn trace_init() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    });
}

/// Poll `cond` every 10 ms until it holds; panic after 10 s. Never a bare sleep.
pub async fn eventually(mut cond: impl FnMut() -> bool) {
    eventually_within(Duration::from_secs(10), &mut cond).await
}

/// As [`eventually`] with an explicit deadline.
pub async fn eventually_within(limit: Duration, cond: &mut impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if cond() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A config with one upstream `app` and route `/`, listening on `127.0.0.1:0`, admin and
/// access log off, runtime files in `{dir}` (filled in by [`TestProxy::start`]), and health
/// checks every 100 ms (unless `extra` has its own `health:`), so instances settle fast.
/// `extra` is YAML inserted under `upstreams.app` (indented by the caller with 4 spaces).
pub fn app_yaml(pools: &[(&str, &[SocketAddr])], active: &str, extra: &str) -> String {
    let pools: String = pools
        .iter()
        .map(|(name, addrs)| {
            let list: Vec<String> = addrs.iter().map(|a| format!("\"{a}\"")).collect();
            format!("      {name}: [{}]\n", list.join(", "))
        })
        .collect();
    app_yaml_pools(&pools, active, extra)
}

/// As [`app_yaml`] with the pool lines written by the caller (for DNS names), e.g.
/// `"      blue: [\"app-blue:8080\"]\n"`.
pub fn app_yaml_pools(pools: &str, active: &str, extra: &str) -> String {
    let health = if extra.contains("    health:") {
        ""
    } else {
        "    health: {interval: 100ms, timeout: 100ms}\n"
    };
    let extra = format!("{health}{extra}");
    format!(
        "listen:\n  - addr: \"127.0.0.1:0\"\nthreads: 2\ngrace_period: 5s\ncontrol:\n  socket: \"{{dir}}/control.sock\"\nadmin:\n  listen: \"off\"\nstate_file: \"{{dir}}/state.json\"\naccess_log: \"off\"\nupstreams:\n  app:\n    pools:\n{pools}    active: {active}\n{extra}routes:\n  - path_prefix: /\n    upstream: app\n"
    )
}

/// A fake upstream that keeps no request log (for tests that only count).
pub async fn quiet_upstream(name: &str) -> FakeUpstream {
    FakeUpstream::builder(name)
        .record(false)
        .start()
        .await
        .unwrap()
}

/// Two fake upstreams, `blue` and `green`, and a settled proxy in front of them with blue
/// active (`extra` as for [`app_yaml`]). `record`: whether the upstreams log requests.
pub async fn blue_green(record: bool, extra: &str) -> (FakeUpstream, FakeUpstream, TestProxy) {
    let blue = FakeUpstream::builder("blue")
        .record(record)
        .start()
        .await
        .unwrap();
    let green = FakeUpstream::builder("green")
        .record(record)
        .start()
        .await
        .unwrap();
    let px = TestProxy::start(&app_yaml(
        &[("blue", &[blue.addr()]), ("green", &[green.addr()])],
        "blue",
        extra,
    ))
    .await;
    (blue, green, px)
}

/// A proxy running in this process.
pub struct TestProxy {
    handle: Option<Handle>,
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
}

impl TestProxy {
    /// Start from YAML (`{dir}` is replaced by a fresh temporary directory) and wait until
    /// every instance has a settled health state (healthy or unhealthy, not unknown).
    pub async fn start(yaml: &str) -> TestProxy {
        Self::start_with(yaml, StartOptions::default()).await
    }

    pub async fn start_with(yaml: &str, opts: StartOptions) -> TestProxy {
        let px = Self::start_unsettled(yaml, opts);
        px.wait_settled().await;
        px
    }

    /// Wait until no instance is `unknown` (bounded).
    pub async fn wait_settled(&self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let st = self.handle().status();
            let unknown: Vec<String> = st
                .upstreams
                .iter()
                .flat_map(|u| &u.pools)
                .flat_map(|p| &p.instances)
                .filter(|i| i.health == switchyard_control::HealthState::Unknown)
                .map(|i| i.addr.clone())
                .collect();
            if unknown.is_empty() {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "instances still unknown: {unknown:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The health of one instance of upstream `app`.
    pub fn health(&self, pool: &str, addr: SocketAddr) -> switchyard_control::HealthState {
        self.handle()
            .status()
            .upstream("app")
            .and_then(|u| u.pool(pool))
            .and_then(|p| {
                p.instances
                    .iter()
                    .find(|i| i.addr == addr.to_string())
                    .map(|i| i.health)
            })
            .unwrap()
    }

    /// Start from a config *file* (`{dir}/switchyard.yaml`), so `reload` and SIGHUP have a file
    /// to re-read; [`Self::write_config`] changes it. Waits until instances are settled.
    pub async fn start_from_file(yaml: &str) -> TestProxy {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("switchyard.yaml");
        let opts = StartOptions::default().with_config_path(&path);
        let px = Self::start_in(dir, yaml, opts);
        px.write_config(yaml);
        px.wait_settled().await;
        px
    }

    /// Write the config file of a proxy started with [`Self::start_from_file`] (`{dir}` is
    /// replaced).
    pub fn write_config(&self, yaml: &str) {
        let yaml = yaml.replace("{dir}", &self.dir.path().display().to_string());
        std::fs::write(self.dir.path().join("switchyard.yaml"), yaml).unwrap();
    }

    /// Start without waiting for health checks (instances stay `unknown` for a while).
    pub fn start_unsettled(yaml: &str, opts: StartOptions) -> TestProxy {
        Self::start_in(tempfile::tempdir().unwrap(), yaml, opts)
    }

    fn start_in(dir: tempfile::TempDir, yaml: &str, opts: StartOptions) -> TestProxy {
        let yaml = yaml.replace("{dir}", &dir.path().display().to_string());
        let config = switchyard_config::parse(&yaml)
            .unwrap_or_else(|e| panic!("test config invalid:\n{e}\n{yaml}"));
        let handle = switchyard_proxy::start(config, opts).expect("proxy starts");
        let addr = handle.listen_addrs()[0];
        TestProxy {
            handle: Some(handle),
            addr,
            dir,
        }
    }

    pub fn handle(&self) -> &Handle {
        self.handle.as_ref().unwrap()
    }

    /// The control socket path.
    pub fn socket(&self) -> std::path::PathBuf {
        self.dir.path().join("control.sock")
    }

    /// A control client on the real socket.
    pub async fn ctl(&self) -> switchyard_control::ControlClient {
        switchyard_control::ControlClient::connect(&self.socket())
            .await
            .unwrap()
    }

    /// Send one control request over the socket; panics if the socket fails.
    pub async fn ctl_call(&self, req: switchyard_control::Request) -> switchyard_control::Reply {
        self.ctl().await.request(&req).await.unwrap()
    }

    /// In-flight count of a pool of upstream `app`.
    pub fn inflight(&self, pool: &str) -> i64 {
        self.handle()
            .status()
            .upstream("app")
            .and_then(|u| u.pool(pool).map(|p| p.inflight))
            .unwrap()
    }

    /// Stop and keep the directory (state file) for a restart. Nothing is written at
    /// shutdown, so for the state file this is the same as a crash.
    pub async fn stop_keep_dir(mut self) -> tempfile::TempDir {
        self.handle.take().unwrap().shutdown().await;
        self.dir
    }

    /// Start again on the same directory (state file, socket).
    pub async fn restart_in(dir: tempfile::TempDir, yaml: &str) -> TestProxy {
        let yaml = yaml.replace("{dir}", &dir.path().display().to_string());
        let config = switchyard_config::parse(&yaml).unwrap();
        let handle =
            switchyard_proxy::start(config, StartOptions::default()).expect("proxy starts");
        let addr = handle.listen_addrs()[0];
        TestProxy {
            handle: Some(handle),
            addr,
            dir,
        }
    }

    /// Binary upgrade, in this process: a new proxy started from `yaml` (`{dir}` is this
    /// proxy's directory) takes over this one's sockets and state. `Ok`: the old handle (it
    /// stopped accepting and drains; `shutdown` waits for the end) and the new proxy. `Err`:
    /// this proxy, still serving, and why.
    pub async fn upgrade(
        mut self,
        yaml: &str,
    ) -> Result<(Handle, TestProxy), (TestProxy, switchyard_proxy::UpgradeError)> {
        let yaml = yaml.replace("{dir}", &self.dir.path().display().to_string());
        let config = switchyard_config::parse(&yaml).unwrap();
        let opts =
            StartOptions::default().with_config_path(self.dir.path().join("switchyard.yaml"));
        // Blocking (a Unix-socket handshake and a start); off this runtime, which may be
        // driving a load meanwhile.
        let started = tokio::task::spawn_blocking(move || switchyard_proxy::upgrade(config, opts))
            .await
            .unwrap();
        match started {
            Ok(handle) => {
                let old = self.handle.take().unwrap();
                let addr = handle.listen_addrs()[0];
                let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
                Ok((
                    old,
                    TestProxy {
                        handle: Some(handle),
                        addr,
                        dir,
                    },
                ))
            }
            Err(e) => Err((self, e)),
        }
    }

    /// GET on a fresh connection.
    pub async fn get(&self, path: &str) -> Reply {
        request(self.addr, "GET", path, &[], Bytes::new())
            .await
            .unwrap()
    }

    /// Stop gracefully and wait.
    pub async fn shutdown(mut self) -> switchyard_proxy::DrainReport {
        self.handle.take().unwrap().shutdown().await
    }
}

/// A response, fully read.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// One request on a new connection.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Result<Reply, String> {
    let mut c = Conn::open(addr).await?;
    c.send(method, path, headers, body).await
}

/// One client keep-alive connection (hyper HTTP/1.1), so tests control exactly which
/// requests share a connection.
pub struct Conn {
    sender: SendRequest<Full<Bytes>>,
    host: String,
    _task: tokio::task::JoinHandle<()>,
}

impl Conn {
    pub async fn open(addr: SocketAddr) -> Result<Conn, String> {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let task = tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Conn {
            sender,
            host: format!("test.local:{}", addr.port()),
            _task: task,
        })
    }

    pub async fn get(&mut self, path: &str) -> Result<Reply, String> {
        self.send("GET", path, &[], Bytes::new()).await
    }

    pub async fn send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Result<Reply, String> {
        self.sender
            .ready()
            .await
            .map_err(|e| format!("connection not ready: {e}"))?;
        let mut b = http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", &self.host);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let req = b.body(Full::new(body)).map_err(|e| e.to_string())?;
        let resp = self
            .sender
            .send_request(req)
            .await
            .map_err(|e| format!("request: {e}"))?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?
            .to_bytes();
        Ok(Reply {
            status,
            headers,
            body,
        })
    }

    /// Whether the server has closed this connection.
    pub fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }
}

/// `switch POOL`, with `--wait-healthy` when `wait_ms` is given (no drain, default gate).
pub fn switch_req(pool: &str, wait_ms: Option<u64>) -> switchyard_control::Request {
    switchyard_control::Request::Switch {
        upstream: None,
        pool: pool.into(),
        drain: false,
        drain_ms: None,
        min_healthy: Default::default(),
        wait_healthy_ms: wait_ms,
        force: false,
    }
}

/// `switch POOL --drain` with a drain bound.
pub fn switch_drain_req(pool: &str, drain_ms: u64) -> switchyard_control::Request {
    switchyard_control::Request::Switch {
        upstream: None,
        pool: pool.into(),
        drain: true,
        drain_ms: Some(drain_ms),
        min_healthy: Default::default(),
        wait_healthy_ms: None,
        force: false,
    }
}

/// `weights a=N b=M` with the default health gate.
pub fn weights_req(weights: &[(&str, u32)]) -> switchyard_control::Request {
    switchyard_control::Request::Weights {
        upstream: None,
        weights: weights.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        min_healthy: Default::default(),
        force: false,
    }
}

/// A resolver whose answers the test changes at run time.
#[derive(Debug, Default)]
pub struct MapResolver {
    map: std::sync::Mutex<std::collections::HashMap<String, SocketAddr>>,
}

impl MapResolver {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }
    pub fn set(&self, name: &str, addr: SocketAddr) {
        self.map.lock().unwrap().insert(name.to_string(), addr);
    }
    /// Make lookups of `name` fail.
    pub fn remove(&self, name: &str) {
        self.map.lock().unwrap().remove(name);
    }
}

#[async_trait::async_trait]
impl switchyard_proxy::Resolve for MapResolver {
    async fn resolve(&self, host: &str, _port: u16) -> std::io::Result<Vec<SocketAddr>> {
        match self.map.lock().unwrap().get(host) {
            Some(a) => Ok(vec![*a]),
            None => Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{host}: no such host"),
            )),
        }
    }
}

/// A local port that was free a moment ago (bind :0, drop). For the binary smoke tests,
/// which pass addresses on the command line; callers retry on a bind conflict.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// How a [`RawUpstream`] misbehaves on ordinary requests (health checks always pass).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// A proper `200` with a 5-byte body.
    None,
    /// Headers promising 1000 bytes, 10 of them, then a reset.
    ResetMidBody,
    /// Headers promising 100 bytes, then nothing (the connection stays open).
    StallAfterHeaders,
    /// A status line that is not HTTP.
    BadStatusLine,
    /// Headers promising 100 bytes, 10 of them, then a clean close.
    ShortBody,
    /// 1 MiB of response headers.
    HugeHeaders,
    /// Close without answering.
    CloseAtOnce,
}

/// An app on raw sockets, for answers no well-behaved server gives: binds a free loopback
/// port and hands each accepted connection, numbered from 1, to `serve` in a task of its own.
/// Returns the address and the accept loop (abort it to stop accepting).
pub async fn raw_app<F, Fut>(serve: F) -> (SocketAddr, tokio::task::JoinHandle<()>)
where
    F: Fn(u32, tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut n = 0u32;
        loop {
            let Ok((s, _)) = listener.accept().await else {
                return;
            };
            n += 1;
            tokio::spawn(serve(n, s));
        }
    });
    (addr, task)
}

/// The lines of a log file written so far (none if it does not exist yet).
pub fn log_lines(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// The next request head on a raw keep-alive connection, taken out of `buf` (what was read
/// beyond it stays there); `None` when the peer closed first.
pub async fn read_request_head(s: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    buf.drain(..end);
    Some(head)
}

/// An upstream written on raw sockets, for faults no well-behaved HTTP server makes.
pub struct RawUpstream {
    pub addr: SocketAddr,
    fault: Arc<std::sync::Mutex<Fault>>,
    /// The last request head received (health checks excluded), byte for byte.
    last_head: Arc<std::sync::Mutex<String>>,
    hits: Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl RawUpstream {
    pub async fn start() -> RawUpstream {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let fault = Arc::new(std::sync::Mutex::new(Fault::None));
        let hits = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let last_head: Arc<std::sync::Mutex<String>> = Arc::default();
        let (f, h, lh) = (fault.clone(), hits.clone(), last_head.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    continue;
                };
                let (f, h, lh) = (f.clone(), h.clone(), lh.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    loop {
                        // One request head at a time (keep-alive).
                        let Some(head) = read_request_head(&mut s, &mut buf).await else {
                            return;
                        };
                        if head.starts_with("GET /actuator/health ") {
                            let body = r#"{"status":"UP"}"#;
                            let resp = format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len());
                            if s.write_all(resp.as_bytes()).await.is_err() {
                                return;
                            }
                            continue;
                        }
                        *lh.lock().unwrap() = head;
                        h.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                        let fault = *f.lock().unwrap();
                        let w = match fault {
                            Fault::None => {
                                s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
                                    .await
                            }
                            Fault::ResetMidBody => {
                                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789").await;
                                // A zero linger makes the close a reset, and does not block.
                                #[allow(deprecated)]
                                let _ = s.set_linger(Some(Duration::ZERO));
                                return;
                            }
                            Fault::StallAfterHeaders => {
                                let _ = s
                                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
                                    .await;
                                tokio::time::sleep(Duration::from_secs(3600)).await;
                                return;
                            }
                            Fault::BadStatusLine => {
                                let _ = s.write_all(b"HTTP/1.1 two hundred\r\n\r\n").await;
                                return;
                            }
                            Fault::ShortBody => {
                                let _ = s
                                    .write_all(
                                        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789",
                                    )
                                    .await;
                                return;
                            }
                            Fault::HugeHeaders => {
                                let mut r = b"HTTP/1.1 200 OK\r\n".to_vec();
                                for i in 0..16_384 {
                                    r.extend_from_slice(
                                        format!("X-H{i}: {}\r\n", "v".repeat(58)).as_bytes(),
                                    );
                                }
                                r.extend_from_slice(b"Content-Length: 0\r\n\r\n");
                                let _ = s.write_all(&r).await;
                                return;
                            }
                            Fault::CloseAtOnce => return,
                        };
                        if w.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        RawUpstream {
            addr,
            fault,
            last_head,
            hits,
            task,
        }
    }

    pub fn set(&self, f: Fault) {
        *self.fault.lock().unwrap() = f;
    }

    /// The last request head received (health checks excluded), as sent on the wire.
    pub fn last_head(&self) -> String {
        self.last_head.lock().unwrap().clone()
    }

    /// Requests received, health checks excluded.
    pub fn hits(&self) -> u64 {
        self.hits.load(std::sync::atomic::Ordering::Acquire)
    }
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}
