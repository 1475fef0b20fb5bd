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
use switchyard_control::{EventSender, Peer};

fn err(code: ErrorCode, msg: impl Into<String>) -> ControlError {
    ControlError::new(code, msg)
}

/// Carry out one protocol request (the socket's and `Handle::execute`'s entry point).
pub(crate) async fn execute(
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
            if let (Some(ms), false) = (wait_healthy_ms, force) {
                if let Err(e) = this
                    .wait_healthy(
                        upstream.as_deref(),
                        &pool,
                        min_healthy,
                        Duration::from_millis(ms),
                        events,
                    )
                    .await
                {
                    return Reply::err(e);
                }
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
        } => {
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
