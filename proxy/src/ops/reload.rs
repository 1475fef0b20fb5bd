//! `reload` (and SIGHUP): re-read the config file, validate all of it, and swap it in under the
//! writer lock; on any problem the running config stays and every problem is returned.

use super::{err, Actor, Controller};
use crate::checks::dns;
use crate::routing::weights::fmt_weights;
use crate::state::{CommitError, Snapshot};
use crate::telemetry::events;
use std::sync::Arc;
use switchyard_control::protocol::{ControlError, ErrorCode, ReloadResult};

impl Controller {
    /// `reload`: re-read the config file; keep the running config on any problem.
    pub(crate) async fn reload(
        self: &Arc<Self>,
        actor: Actor,
    ) -> Result<ReloadResult, ControlError> {
        let Some(path) = self.config_path.clone() else {
            return Err(err(
                ErrorCode::Invalid,
                "this proxy was started without a config file; nothing to reload",
            ));
        };
        let result = self.reload_from(&path, actor).await;
        let label = if result.is_ok() { "ok" } else { "error" };
        self.metrics.reloads.with_label_values(&[label]).inc();
        if let Err(e) = &result {
            let mut r = events::record(
                "reload",
                actor.kind(),
                format!(
                    "reload refused, the running config stays: {}",
                    e.message.lines().next().unwrap_or("")
                ),
            );
            r.uid = actor.uid();
            r.pid = actor.pid();
            self.events.record(r);
        }
        result
    }

    async fn reload_from(
        self: &Arc<Self>,
        path: &std::path::Path,
        actor: Actor,
    ) -> Result<ReloadResult, ControlError> {
        let file = path.to_path_buf();
        let config = self.off_runtime(move |_| load_checked(&file)).await?;
        let summary = config.summary();
        let (needs_restart, warnings) = self.off_runtime(move |c| c.install_config(config)).await?;
        if let Some(f) = &self.fleet {
            // The config is this host's own; the routing state is the fleet's: serve the
            // desired state again on top of the new config (and try one that did not fit).
            f.resync();
        }
        dns::refresh_all(&self.shared, &*self.resolver).await;
        let mut r = events::record(
            "reload",
            actor.kind(),
            format!("config reloaded from {}: {summary}", path.display()),
        );
        r.uid = actor.uid();
        r.pid = actor.pid();
        self.events.record(r);
        tracing::info!(
            target: "switchyard::audit",
            cmd = "reload",
            actor = actor.kind(),
            uid = ?actor.uid(),
            pid = ?actor.pid(),
            path = %path.display(),
            ?needs_restart,
            ?warnings,
            "config reloaded"
        );
        Ok(ReloadResult {
            summary,
            needs_restart,
            warnings,
        })
    }

    /// Swap in a new config (under the writer lock, persisted). Returns the settings that
    /// changed but only take effect after a restart, and warnings.
    pub(crate) fn install_config(
        &self,
        config: switchyard_config::Config,
    ) -> Result<(Vec<String>, Vec<String>), ControlError> {
        let guard = self.shared.lock();
        let old = self.shared.load();
        let o = &old.config;
        // Certificates are reloaded in place (below); anything else about a listener needs a
        // restart (or a binary upgrade).
        let shape = |l: &switchyard_config::ListenConfig| {
            (l.addr, l.tls.is_some(), l.http2, l.redirect_https)
        };
        let needs_restart: Vec<String> = [
            (
                "listen",
                !o.listen
                    .iter()
                    .map(shape)
                    .eq(config.listen.iter().map(shape)),
            ),
            ("threads", o.threads != config.threads),
            ("control", o.control != config.control),
            ("admin", o.admin != config.admin),
            ("state_file", o.state_file != config.state_file),
            // The etcd session is built at start (a binary upgrade applies a new one).
            ("fleet", o.fleet != config.fleet),
        ]
        .into_iter()
        .filter(|(_, changed)| *changed)
        .map(|(k, _)| k.to_string())
        .collect();
        let (dest, format) = (config.access_log.clone(), config.access_log_format);
        // Certificates of the listeners that stay TLS, read again (renewed files at the same
        // paths, or other files): all load, or nothing changes.
        // A listener is the running one at the same index with the same address (several
        // may share `127.0.0.1:0`), else the first unused one with that address.
        let mut certs = Vec::new();
        let mut used = vec![false; self.tls.len()];
        for (i, l) in config.listen.iter().enumerate() {
            let Some(t) = &l.tls else { continue };
            let pick = self
                .tls
                .iter()
                .position(|(j, addr, _)| *j == i && *addr == l.addr)
                .filter(|k| !used[*k])
                .or_else(|| {
                    self.tls
                        .iter()
                        .enumerate()
                        .position(|(k, (_, addr, _))| *addr == l.addr && !used[k])
                });
            let Some(k) = pick else { continue };
            used[k] = true;
            let resolver = &self.tls[k].2;
            let prepared = crate::listen::CertResolver::prepare(t).map_err(|e| {
                err(
                    ErrorCode::Invalid,
                    format!("listen[{i}].tls: {e}; the running config stays"),
                )
            })?;
            certs.push((resolver.clone(), prepared));
        }
        // Read again under the lock (preflight read it before): a changed secret takes effect
        // now; an unreadable one leaves everything as it was.
        let sticky = match &config.sticky_key_file {
            Some(path) => Some(crate::routing::sticky::StickyKey::from_file(path).map_err(
                |e| {
                    err(
                        ErrorCode::Invalid,
                        format!("sticky_key_file: {e}; the running config stays"),
                    )
                },
            )?),
            // The file left the config: this proxy gets a key of its own (kept in its state
            // file from now on), not the shared one forever.
            None if old.sticky.shared => Some(crate::routing::sticky::StickyKey::generate()),
            None => None,
        };
        let mut new_snap = Snapshot::build(
            Arc::new(config),
            &crate::state::Restored::default(),
            Some(&old),
            crate::routing::sticky::StickyKey::generate,
        );
        if let Some(key) = sticky {
            new_snap.sticky = Arc::new(key);
        }
        let mut warnings = reset_weights(&old, &new_snap);
        self.shared
            .commit(&guard, new_snap, &self.state_file)
            .map_err(|e| {
                let code = match e {
                    CommitError::Frozen => ErrorCode::Busy,
                    CommitError::Io(_) => ErrorCode::Internal,
                };
                err(code, format!("not applied: {e}"))
            })?;
        for (resolver, prepared) in certs {
            resolver.install(prepared);
        }
        // Under the writer lock, so two reloads cannot leave the log of one and the config of
        // the other. The file was checked to open before anything was applied; only a race
        // with the file system ends here.
        if let Err(e) = self.access_log.reconfigure(&dest, format) {
            warnings.push(format!(
                "the access log could not be switched to the new access_log ({e}); the previous one stays"
            ));
        }
        for w in &warnings {
            tracing::warn!("{w}");
        }
        Ok((needs_restart, warnings))
    }
}

/// Upstreams whose run-time weights a reload could not keep (a pool with weight left the
/// file), said in words: the reload moved their traffic.
fn reset_weights(old: &Snapshot, new: &Snapshot) -> Vec<String> {
    new.upstreams
        .iter()
        .filter_map(|u| {
            let o = old.upstream(u.name())?;
            let (before, after) = (o.weights(), u.weights());
            let kept = before
                .iter()
                .filter(|(_, w)| **w > 0)
                .all(|(p, w)| after.get(p) == Some(w));
            (!kept).then(|| {
                format!(
                    "{}: run-time weights {} could not be kept (a pool with weight is no longer in the file, or has no instances left); now {}",
                    u.name(),
                    fmt_weights(&before),
                    fmt_weights(&after)
                )
            })
        })
        .collect()
}

/// Read, validate and preflight the config file (blocking: it reads files). Every problem is
/// in the error.
fn load_checked(path: &std::path::Path) -> Result<switchyard_config::Config, ControlError> {
    let config = match switchyard_config::load(path) {
        Ok(c) => c,
        Err(e) => {
            let problems = e.field_errors();
            tracing::warn!(path = %path.display(), problems = problems.len(), "reload refused; the running config stays");
            return Err(err(
                ErrorCode::Invalid,
                format!(
                    "{} has {} problem(s); the running config stays:\n{}",
                    path.display(),
                    problems.len(),
                    problems
                        .iter()
                        .map(|p| p.to_string())
                        .collect::<Vec<_>>()
                        .join("\n")
                ),
            )
            .with_details(serde_json::to_value(&problems).unwrap_or_default()));
        }
    };
    let mut problems = crate::listen::preflight(&config);
    if let Err(e) = crate::telemetry::access_log::check(&config.access_log) {
        problems.push(switchyard_config::FieldError {
            path: switchyard_config::FieldPath::root().key("access_log"),
            message: format!("cannot open it: {e}"),
        });
    }
    if !problems.is_empty() {
        return Err(err(
            ErrorCode::Invalid,
            problems
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join("\n"),
        )
        .with_details(serde_json::to_value(&problems).unwrap_or_default()));
    }
    Ok(config)
}
