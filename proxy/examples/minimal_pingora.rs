//! The smallest Pingora reverse proxy: the reference point of `costbench` (issue 14). What
//! Pingora itself costs per request, with nothing of switchyard's (no routing, no headers, no
//! metrics, no access log), on the same allocator (mimalloc), one worker thread.
//!
//! ```sh
//! cargo build --release --example minimal_pingora -p switchyard-proxy
//! target/release/examples/minimal_pingora 127.0.0.1:8090 127.0.0.1:8081
//! ```

#![allow(clippy::unwrap_used, clippy::expect_used)]

use async_trait::async_trait;
use pingora::prelude::*;
use std::net::SocketAddr;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Minimal {
    upstream: SocketAddr,
}

#[async_trait]
impl ProxyHttp for Minimal {
    type CTX = ();
    fn new_ctx(&self) {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(self.upstream, false, String::new())))
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (listen, upstream) = match (args.next(), args.next()) {
        (Some(l), Some(u)) => (l, u.parse::<SocketAddr>().expect("upstream is ip:port")),
        _ => {
            eprintln!("usage: minimal_pingora LISTEN_ADDR UPSTREAM_ADDR");
            std::process::exit(2);
        }
    };
    let mut server = Server::new(None).expect("server");
    if let Some(conf) = std::sync::Arc::get_mut(&mut server.configuration) {
        conf.threads = 1;
        conf.upstream_keepalive_pool_size = 4096;
    }
    server.bootstrap();
    let mut svc = http_proxy_service(&server.configuration, Minimal { upstream });
    svc.add_tcp(&listen);
    server.add_service(svc);
    server.run_forever();
}
