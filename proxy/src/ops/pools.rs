//! Pool membership changes: `pool set`, `pool add`, `pool remove`. A new DNS-named instance
//! is resolved before the change is acknowledged, so it is usable at once.

use super::{err, Actor, Controller};
use crate::checks::dns;
use std::sync::Arc;
use std::time::Duration;
use switchyard_config::InstanceAddr;
use switchyard_control::protocol::{Change, ControlError, ErrorCode};

impl Controller {
    /// `pool set`: replace a pool's instances.
    pub(crate) async fn pool_set(
        self: &Arc<Self>,
        upstream: Option<String>,
        pool: String,
        instances: &[String],
        actor: Actor,
    ) -> Result<Change, ControlError> {
        let list = Self::parse_addrs(instances)?;
        if list.is_empty() {
            return Err(err(
                ErrorCode::Invalid,
                "pool set needs at least one instance",
            ));
        }
        self.pool_change(upstream, pool, actor, "pool_set", |_| Ok(list))
            .await
    }

    /// `pool add` (`add`) or `pool remove`: one instance in or out of a pool.
    pub(crate) async fn pool_member(
        self: &Arc<Self>,
        upstream: Option<String>,
        pool: String,
        instance: &str,
        add: bool,
        actor: Actor,
    ) -> Result<Change, ControlError> {
        let addr: InstanceAddr =
            instance
                .parse()
                .map_err(|e: switchyard_config::AddrParseError| {
                    err(ErrorCode::Invalid, e.to_string())
                })?;
        let cmd = if add { "pool_add" } else { "pool_remove" };
        let name = pool.clone();
        self.pool_change(upstream, pool, actor, cmd, move |cur| {
            match (add, cur.contains(&addr)) {
                (true, true) => Err(err(
                    ErrorCode::Invalid,
                    format!("{addr} is already in pool {name}"),
                )),
                (false, false) => Err(err(
                    ErrorCode::Invalid,
                    format!("{addr} is not in pool {name}"),
                )),
                (true, false) => Ok(cur.iter().cloned().chain([addr.clone()]).collect()),
                (false, true) => Ok(cur.iter().filter(|a| **a != addr).cloned().collect()),
            }
        })
        .await
    }

    /// Parse instance addresses given on the wire.
    pub(crate) fn parse_addrs(list: &[String]) -> Result<Vec<InstanceAddr>, ControlError> {
        let mut out: Vec<InstanceAddr> = Vec::new();
        for s in list {
            let a: InstanceAddr = s.parse().map_err(|e: switchyard_config::AddrParseError| {
                err(ErrorCode::Invalid, e.to_string())
            })?;
            if out.contains(&a) {
                return Err(err(ErrorCode::Invalid, format!("{s:?} is listed twice")));
            }
            out.push(a);
        }
        Ok(out)
    }

    /// Replace a pool's instances; `edit` computes the new list from the current one.
    pub(crate) async fn pool_change(
        self: &Arc<Self>,
        upstream: Option<String>,
        pool: String,
        actor: Actor,
        cmd: &'static str,
        edit: impl FnOnce(&[InstanceAddr]) -> Result<Vec<InstanceAddr>, ControlError> + Send + 'static,
    ) -> Result<Change, ControlError> {
        let p2 = pool.clone();
        let mut change = self
            .off_runtime(move |c| c.edit_pool(upstream.as_deref(), &p2, actor, cmd, edit))
            .await?;
        let pool = pool.as_str();
        // New DNS-named instances get their first address now, not at the next refresh.
        let snap = self.shared.load();
        if let Some(u) = snap.upstream(&change.upstream) {
            let fresh: Vec<_> = u
                .pools
                .iter()
                .filter(|p| p.pool.name == pool)
                .flat_map(|p| p.instances.iter())
                .filter(|i| i.current_addr().is_none())
                .cloned()
                .collect();
            for i in fresh {
                let _ =
                    tokio::time::timeout(Duration::from_secs(3), dns::refresh(&*self.resolver, &i))
                        .await;
            }
            change.instances = Some(
                u.pools
                    .iter()
                    .map(|p| {
                        (
                            p.pool.name.clone(),
                            p.instances.iter().map(|i| i.label.clone()).collect(),
                        )
                    })
                    .collect(),
            );
        }
        Ok(change)
    }

    /// The change itself (blocking: it persists).
    fn edit_pool(
        &self,
        upstream: Option<&str>,
        pool: &str,
        actor: Actor,
        cmd: &str,
        edit: impl FnOnce(&[InstanceAddr]) -> Result<Vec<InstanceAddr>, ControlError>,
    ) -> Result<Change, ControlError> {
        self.apply(upstream, actor, cmd, |u| {
            Self::check_pool(u, pool)?;
            let p = u
                .pool(pool)
                .ok_or_else(|| err(ErrorCode::UnknownPool, pool))?;
            let current: Vec<InstanceAddr> = p.instances.iter().map(|i| i.addr.clone()).collect();
            let next = edit(&current)?;
            if next.is_empty() && p.weight > 0 {
                return Err(err(
                    ErrorCode::Invalid,
                    format!(
                        "pool {pool} has weight {} and would be left without instances",
                        p.weight
                    ),
                ));
            }
            if next == current {
                return Ok(None);
            }
            Ok(Some(u.with_changes(None, Some((pool, next)))))
        })
    }
}
