//! The control socket's handler: one protocol request (SPEC §5) carried out by the
//! [`Controller`], with the socket peer as the actor. [`execute`] is also what
//! `Handle::execute` calls, so the library and the socket behave identically.
//!
//! Commands: `status`, `switch` (with `--wait-healthy` and `--drain`), `rollback`, `weight`,
//! `weights`, `drain`, `pool_set`, `pool_add`, `pool_remove`, `reload`, `canary` (with
//! `--wait`), `canary_status`, `canary_pause`, `canary_resume`, `canary_abort`,
//! `canary_promote`, `events`.

use crate::ops::{drain_timeout_error, Actor, Controller, Gate};
use std::sync::Arc;
use std::time::Duration;
use switchyard_control::protocol::{ControlError, ErrorCode, Event, Reply, Request};
use switchyard_control::{EventSender, MinHealthy, Peer};

fn err(code: ErrorCode, msg: impl Into<String>) -> ControlError {
    ControlError::new(code, msg)
}

/// Whether a request changes routing (and so, in a fleet, the fleet's desired state).
fn is_change(req: &Request) -> bool {
    matches!(
        req,
        Request::Switch { .. }
            | Request::Rollback { .. }
            | Request::Weight { .. }
            | Request::Weights { .. }
            | Request::PoolSet { .. }
            | Request::PoolAdd { .. }
            | Request::PoolRemove { .. }
            | Request::Canary { .. }
            | Request::CanaryPause { .. }
            | Request::CanaryResume { .. }
            | Request::CanaryAbort { .. }
            | Request::CanaryPromote { .. }
    )
}

/// Carry out one protocol request (the socket's and `Handle::execute`'s entry point). On a
/// fleet proxy a change returns once every live proxy reports it (SPEC §9), `--fleet` or not.
pub(crate) async fn execute(
    this: &Arc<Controller>,
    req: Request,
    actor: Actor,
    events: &EventSender,
) -> Reply {
    let (req, timeout, explicit) = match req {
        Request::Fleet {
            timeout_ms,
            request,
        } => (*request, timeout_ms.map(Duration::from_millis), true),
        other => (other, None, false),
    };
    let Some(fleet) = this.fleet.clone() else {
        if explicit {
            return Reply::err(err(
                ErrorCode::Invalid,
                "this proxy is not in a fleet (its config has no `fleet:` section): run the command without --fleet",
            ));
        }
        return execute_one(this, req, actor, events).await;
    };
    match req {
        Request::Status if explicit => Reply::ok(fleet.status()),
        Request::Fleet { .. } => Reply::err(err(ErrorCode::BadRequest, "a fleet command inside a fleet command")),
        req if is_change(&req) => {
            let hint = upstream_of(&req);
            let reply = execute_one(this, req, actor, events).await;
            if !reply.ok {
                return reply;
            }
            let named = reply.result.as_ref().and_then(|r| {
                r.get("upstream")
                    .or_else(|| r.get("change").and_then(|c| c.get("upstream")))
                    .and_then(|u| u.as_str())
                    .map(str::to_string)
            });
            let Ok(u) = Controller::upstream(&this.shared.load(), named.as_deref().or(hint.as_deref()))
            else {
                return reply;
            };
            let timeout = timeout.unwrap_or(crate::fleet::DEFAULT_ACK_TIMEOUT);
            let revision = fleet.served_revision(u.name());
            match fleet
                .wait_applied(u.name(), u.generation, revision, timeout)
                .await
            {
                Ok(acks) => {
                    let mut reply = reply;
                    if let Some(serde_json::Value::Object(m)) = reply.result.as_mut() {
                        m.insert(
                            "fleet".into(),
                            serde_json::to_value(&acks).unwrap_or_default(),
                        );
                    }
                    reply
                }
                Err(e) => Reply::err(e),
            }
        }
        req if explicit => Reply::err(err(
            ErrorCode::BadRequest,
            format!(
                "--fleet applies to `status` and to changes; `{}` acts on this proxy only (run it without --fleet)",
                req.name()
            ),
        )),
        req => execute_one(this, req, actor, events).await,
    }
}

/// The upstream a request names, if it names one.
fn upstream_of(req: &Request) -> Option<String> {
    match req {
        Request::Switch { upstream, .. }
        | Request::Rollback { upstream }
        | Request::Weight { upstream, .. }
        | Request::Weights { upstream, .. }
        | Request::PoolSet { upstream, .. }
        | Request::PoolAdd { upstream, .. }
        | Request::PoolRemove { upstream, .. }
        | Request::Canary { upstream, .. }
        | Request::CanaryPause { upstream }
        | Request::CanaryResume { upstream }
        | Request::CanaryAbort { upstream }
        | Request::CanaryPromote { upstream, .. } => upstream.clone(),
        _ => None,
    }
}

/// `--wait-healthy` of `switch` and `canary`: first wait up to `ms` for `pool` to pass the
/// health gate (nothing to wait for without it).
async fn wait_first(
    this: &Arc<Controller>,
    upstream: Option<&str>,
    pool: &str,
    min: MinHealthy,
    ms: Option<u64>,
    events: &EventSender,
) -> Result<(), ControlError> {
    match ms {
        Some(ms) => {
            this.wait_healthy(upstream, pool, min, Duration::from_millis(ms), events)
                .await
        }
        None => Ok(()),
    }
}

/// Carry out one request on this proxy.
async fn execute_one(
    this: &Arc<Controller>,
    req: Request,
    actor: Actor,
    events: &EventSender,
) -> Reply {
    fn reply<T: serde::Serialize>(r: Result<T, ControlError>) -> Reply {
        match r {
            Ok(v) => Reply::ok(v),
            Err(e) => Reply::err(e),
        }
    }
    let ms = Duration::from_millis;
    match req {
        Request::Status => Reply::ok(this.status()),
        Request::Switch {
            upstream,
            pool,
            drain,
            drain_ms,
            min_healthy,
            wait_healthy_ms,
            force,
        } => {
            let wait = wait_healthy_ms.filter(|_| !force);
            if let Err(e) =
                wait_first(this, upstream.as_deref(), &pool, min_healthy, wait, events).await
            {
                return Reply::err(e);
            }
            let gate = Gate { min_healthy, force };
            let (u, p) = (upstream.clone(), pool.clone());
            let change = match this
                .off_runtime(move |c| c.switch(u.as_deref(), &p, gate, actor))
                .await
            {
                Ok(c) => c,
                Err(e) => return Reply::err(e),
            };
            if !drain && drain_ms.is_none() {
                return Reply::ok(change);
            }
            events
                .send(Event::Applied {
                    change: change.clone(),
                })
                .await;
            let lost: Vec<String> = change
                .old_weights
                .iter()
                .filter(|(p, w)| **w > 0 && change.new_weights.get(*p) == Some(&0))
                .map(|(p, _)| p.clone())
                .collect();
            let timeout = drain_ms.map(ms).unwrap_or_else(|| {
                Controller::upstream(&this.shared.load(), Some(&change.upstream))
                    .map(|u| u.config.drain_timeout)
                    .unwrap_or(Duration::from_secs(30))
            });
            let r = this
                .wait_drained(&change.upstream, &lost, timeout, events)
                .await;
            let mut change = change;
            change.drain = Some(r.clone());
            if r.drained {
                Reply::ok(change)
            } else {
                Reply::err(drain_timeout_error(&r, timeout, Some(&change)))
            }
        }
        Request::Rollback { upstream } => reply(
            this.off_runtime(move |c| c.rollback(upstream.as_deref(), actor))
                .await,
        ),
        Request::Weight {
            upstream,
            pool,
            weight,
            min_healthy,
            force,
        } => reply(
            this.off_runtime(move |c| {
                let gate = Gate { min_healthy, force };
                c.set_weight(upstream.as_deref(), &pool, weight, gate, actor)
            })
            .await,
        ),
        Request::Weights {
            upstream,
            weights,
            min_healthy,
            force,
        } => reply(
            this.off_runtime(move |c| {
                let gate = Gate { min_healthy, force };
                c.set_weights(upstream.as_deref(), &weights, gate, actor)
            })
            .await,
        ),
        Request::Drain {
            upstream,
            pool,
            timeout_ms,
        } => reply(
            this.drain(upstream.as_deref(), &pool, timeout_ms.map(ms), events)
                .await,
        ),
        Request::PoolSet {
            upstream,
            pool,
            instances,
        } => reply(this.pool_set(upstream, pool, &instances, actor).await),
        Request::PoolAdd {
            upstream,
            pool,
            instance,
        } => reply(
            this.pool_member(upstream, pool, &instance, true, actor)
                .await,
        ),
        Request::PoolRemove {
            upstream,
            pool,
            instance,
        } => reply(
            this.pool_member(upstream, pool, &instance, false, actor)
                .await,
        ),
        Request::Reload => reply(this.reload(actor).await),
        Request::Canary {
            upstream,
            pool,
            steps,
            interval_ms,
            wait,
            min_healthy,
            wait_healthy_ms,
        } => {
            let waited = wait_first(
                this,
                upstream.as_deref(),
                &pool,
                min_healthy,
                wait_healthy_ms,
                events,
            );
            if let Err(e) = waited.await {
                return Reply::err(e);
            }
            let started = this
                .off_runtime(move |c| {
                    c.canary_start(
                        upstream.as_deref(),
                        &pool,
                        steps,
                        interval_ms.map(ms),
                        min_healthy,
                        actor,
                    )
                })
                .await;
            match started {
                Ok(s) if wait => reply(this.canary_wait(s, events).await),
                other => reply(other),
            }
        }
        Request::CanaryStatus { upstream } => {
            let snap = this.shared.load();
            reply(
                Controller::upstream(&snap, upstream.as_deref())
                    .map(|u| crate::ops::upstream_status(&u, this.observed.get().get(u.name()))),
            )
        }
        Request::CanaryPause { upstream } => reply(
            this.off_runtime(move |c| c.canary_pause(upstream.as_deref(), true, actor))
                .await,
        ),
        Request::CanaryResume { upstream } => reply(
            this.off_runtime(move |c| c.canary_pause(upstream.as_deref(), false, actor))
                .await,
        ),
        Request::CanaryAbort { upstream } => reply(
            this.off_runtime(move |c| c.canary_abort(upstream.as_deref(), actor))
                .await,
        ),
        Request::CanaryPromote { upstream, force } => reply(
            this.off_runtime(move |c| c.canary_promote(upstream.as_deref(), force, actor))
                .await,
        ),
        Request::Events { follow, limit } => {
            // Subscribe first so nothing falls between the history and the stream.
            let mut rx = this.events.subscribe();
            let history = this.events.recent(limit.unwrap_or(100));
            if !follow {
                return Reply::ok(history);
            }
            for r in history {
                if !events.send(Event::Record { record: r }).await {
                    return Reply::ok(Vec::<()>::new());
                }
            }
            loop {
                match rx.recv().await {
                    Ok(r) => {
                        if !events.send(Event::Record { record: r }).await {
                            return Reply::ok(Vec::<()>::new());
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                        return Reply::ok(Vec::<()>::new())
                    }
                }
            }
        }
        _ => Reply::err(err(
            ErrorCode::BadRequest,
            "command not supported by this proxy",
        )),
    }
}

/// The control socket's handler: the controller, with the peer as the actor.
#[derive(Debug)]
pub(crate) struct SocketHandler(pub(crate) Arc<Controller>);

#[async_trait::async_trait]
impl switchyard_control::ControlHandler for SocketHandler {
    async fn handle(&self, req: Request, peer: Peer, events: EventSender) -> Reply {
        let name = req.name();
        let reply = execute(&self.0, req, Actor::Socket(peer), &events).await;
        if let Some(e) = &reply.error {
            tracing::info!(cmd = name, uid = peer.uid, pid = ?peer.pid, code = ?e.code, error = %e.message, "control request refused");
        }
        reply
    }
}
