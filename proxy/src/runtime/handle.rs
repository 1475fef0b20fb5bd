//! The [`Handle`] of a running proxy: every control operation as a method.

use crate::listen::DrainReport;
use crate::ops::{Actor, Controller, Gate};
use crate::upstream::Weights;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use switchyard_control::protocol::{ReloadResult, Reply, Request};
use switchyard_control::{Change, ControlError, DrainResult, EventSender, Status};
use tokio::sync::{oneshot, watch};

/// A running proxy. Every control operation is a method here; the control socket is a thin
/// adapter over it. Dropping the handle stops the proxy (gracefully, within `grace_period`).
#[derive(Debug)]
pub struct Handle {
    pub(super) controller: Arc<Controller>,
    pub(super) addrs: Vec<SocketAddr>,
    pub(super) admin_addr: Option<SocketAddr>,
    pub(super) registry: prometheus::Registry,
    pub(super) access_log: Arc<crate::telemetry::access_log::AccessLog>,
    pub(super) shutdown: watch::Sender<bool>,
    pub(super) data_done: Option<oneshot::Receiver<DrainReport>>,
    pub(super) threads: Vec<std::thread::JoinHandle<()>>,
    /// The pid of the process that took over (binary upgrade), once it did.
    pub(super) handed_over: watch::Receiver<Option<u32>>,
    /// The pid of the process this one took over from, if it was started by `upgrade`.
    pub(super) predecessor: Option<u32>,
    /// The upgrade socket's file (none when it could not be created).
    pub(super) upgrade_placement: Option<Arc<super::upgrade::Placement>>,
    /// Whether dropping the control server removes the control socket's file.
    pub(super) control_owns_path: Arc<std::sync::atomic::AtomicBool>,
    /// Requests the fast path took (`proxy::fast`); read by tests (`fast_path_requests`).
    #[cfg_attr(not(feature = "test-util"), allow(dead_code))]
    pub(super) fast_served: Arc<std::sync::atomic::AtomicU64>,
}

impl Handle {
    /// The addresses the listeners are bound to, in config order (real ports when the config
    /// said port 0).
    pub fn listen_addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// The current state of every upstream, pool and instance.
    pub fn status(&self) -> Status {
        self.controller.status()
    }

    /// Give `pool` 100% of `upstream` (`None`: the only upstream), if all its instances are
    /// healthy (error `unhealthy` otherwise). Every request that starts after this returns is
    /// routed by the new weights. [`Self::execute`] with `Request::Switch` offers
    /// `--min-healthy`, `--wait-healthy`, `--force` and `--drain`.
    pub fn switch(&self, upstream: Option<&str>, pool: &str) -> Result<Change, ControlError> {
        self.controller
            .switch(upstream, pool, Gate::default(), Actor::Library)
    }

    /// Set one pool's weight; the main pool absorbs the difference. A pool that gets traffic
    /// for the first time must be healthy.
    pub fn set_weight(
        &self,
        upstream: Option<&str>,
        pool: &str,
        weight: u32,
    ) -> Result<Change, ControlError> {
        self.controller
            .set_weight(upstream, pool, weight, Gate::default(), Actor::Library)
    }

    /// Set every pool's weight (unnamed pools get 0; the sum must be 100). Pools that get
    /// traffic for the first time must be healthy.
    pub fn set_weights(
        &self,
        upstream: Option<&str>,
        weights: &Weights,
    ) -> Result<Change, ControlError> {
        self.controller
            .set_weights(upstream, weights, Gate::default(), Actor::Library)
    }

    /// The latest `limit` audit records, oldest first.
    pub fn events(&self, limit: usize) -> Vec<switchyard_control::AuditRecord> {
        self.controller.events.recent(limit)
    }

    /// Restore the weights from before the last weight change.
    pub fn rollback(&self, upstream: Option<&str>) -> Result<Change, ControlError> {
        self.controller.rollback(upstream, Actor::Library)
    }

    /// Wait until `pool` (at weight 0) has no request in flight, at most `timeout` (default:
    /// the upstream's `drain_timeout`). A timeout is an error of code `timeout`.
    pub async fn drain(
        &self,
        upstream: Option<&str>,
        pool: &str,
        timeout: Option<Duration>,
    ) -> Result<DrainResult, ControlError> {
        self.controller
            .drain(upstream, pool, timeout, &EventSender::discard())
            .await
    }

    /// Replace a pool's instances (`host:port` each). In-flight requests on removed
    /// instances finish.
    pub async fn pool_set(
        &self,
        upstream: Option<&str>,
        pool: &str,
        instances: &[&str],
    ) -> Result<Change, ControlError> {
        self.execute_change(Request::PoolSet {
            upstream: upstream.map(str::to_string),
            pool: pool.to_string(),
            instances: instances.iter().map(|s| s.to_string()).collect(),
        })
        .await
    }

    /// Re-read the config file given in [`StartOptions::config_path`]; on any problem the
    /// running config stays and every problem is returned.
    pub async fn reload(&self) -> Result<ReloadResult, ControlError> {
        self.controller.reload(Actor::Library).await
    }

    /// Reload because of SIGHUP (logged as such).
    #[doc(hidden)]
    pub async fn reload_on_signal(&self) -> Result<ReloadResult, ControlError> {
        self.controller.reload(Actor::Signal).await
    }

    /// Carry out a control-protocol request, exactly as the control socket would.
    pub async fn execute(&self, req: Request) -> Reply {
        crate::surfaces::control::execute(
            &self.controller,
            req,
            Actor::Library,
            &EventSender::discard(),
        )
        .await
    }

    async fn execute_change(&self, req: Request) -> Result<Change, ControlError> {
        let reply = self.execute(req).await;
        match (reply.error, reply.result) {
            (Some(e), _) => Err(e),
            (None, Some(v)) => serde_json::from_value(v).map_err(|e| {
                ControlError::new(switchyard_control::ErrorCode::Internal, e.to_string())
            }),
            (None, None) => Err(ControlError::new(
                switchyard_control::ErrorCode::Internal,
                "empty reply",
            )),
        }
    }

    /// Where the admin listener is bound (`None` with `admin.listen: off`).
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// The metrics in the Prometheus text format (what `GET /metrics` answers).
    pub fn metrics_text(&self) -> String {
        crate::telemetry::metrics::render(&self.registry)
    }

    /// Reopen the access log file (SIGUSR1; logrotate's convention).
    pub fn reopen_logs(&self) {
        self.access_log.reopen();
    }

    /// Resolves with the successor's pid once a new process took over (binary upgrade): this
    /// one has stopped accepting and is draining; call [`Self::shutdown`] to wait for the end.
    pub async fn handed_over(&self) -> u32 {
        let mut rx = self.handed_over.clone();
        let pid = match rx.wait_for(|p| p.is_some()).await {
            Ok(p) => (*p).unwrap_or_default(),
            Err(_) => return std::future::pending().await,
        };
        pid
    }

    /// The pid of the process this one took over from, if it was started by
    /// [`crate::upgrade`].
    pub fn predecessor(&self) -> Option<u32> {
        self.predecessor
    }

    /// Tests: pause every fleet change between reading the revision it builds on and writing
    /// (two changes on two proxies then meet at the compare-and-swap).
    #[cfg(feature = "test-util")]
    #[doc(hidden)]
    pub fn set_fleet_write_delay(&self, delay: Duration) {
        if let Some(f) = &self.controller.fleet {
            *f.cas_delay.lock().unwrap_or_else(|p| p.into_inner()) = delay;
        }
    }

    /// Tests: how many requests switchyard's own forwarder (`proxy::fast`) took, rather than
    /// Pingora's request path (counted when taken, before anything reaches the client).
    #[cfg(feature = "test-util")]
    #[doc(hidden)]
    pub fn fast_path_requests(&self) -> u64 {
        self.fast_served.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The control socket path.
    pub fn control_socket(&self) -> &Path {
        &self.controller.control_socket
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
