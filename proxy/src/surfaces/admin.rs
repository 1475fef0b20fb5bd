//! The admin listener (`admin.listen`, loopback by default): `GET /metrics` (Prometheus text
//! format 0.0.4), `GET /healthz` (200 while the proxy serves, 503 once it is shutting down, so
//! a load balancer in front stops sending), `GET /status` (the `status` document, the same
//! data as `proxyctl status --json`'s `result`). Anything else is 404.
//!
//! It runs on the control runtime, never on the data-plane workers, so a slow scrape cannot
//! delay requests.

use crate::ops::Controller;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use prometheus::Registry;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::watch;

/// What the admin handler needs.
#[derive(Debug, Clone)]
pub(crate) struct Admin {
    pub(crate) controller: Arc<Controller>,
    pub(crate) registry: Registry,
    pub(crate) shutdown: watch::Receiver<bool>,
}

/// Bind the admin address (errors are start errors).
pub(crate) fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let l = std::net::TcpListener::bind(addr)?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// Serve forever (the caller cancels it).
pub(crate) async fn serve(listener: std::net::TcpListener, admin: Admin) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "admin listener unusable");
            return;
        }
    };
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(handle(&admin, req)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn reply(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    r
}

fn handle(admin: &Admin, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "405 only GET\n",
        );
    }
    match req.uri().path() {
        "/metrics" => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            crate::telemetry::metrics::render(&admin.registry),
        ),
        "/healthz" => {
            if *admin.shutdown.borrow() {
                reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "draining\n")
            } else {
                reply(StatusCode::OK, "text/plain", "ok\n")
            }
        }
        "/status" => match serde_json::to_vec_pretty(&admin.controller.status()) {
            Ok(body) => reply(StatusCode::OK, "application/json", body),
            Err(e) => reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                e.to_string(),
            ),
        },
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "404 not found: /metrics /healthz /status\n",
        ),
    }
}
