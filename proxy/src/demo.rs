//! `switchyard demo` (SPEC §8): the whole idea on one machine with nothing else installed.
//!
//! Starts two built-in upstreams (blue and green, [`crate::fake_upstream`]) on loopback, a
//! proxy in front of them, and prints a walkthrough. Everything runs in this process; Ctrl-C
//! stops it.

use crate::fake_upstream::FakeUpstream;
use crate::{start, Handle, StartOptions};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// What the demo started.
#[derive(Debug)]
pub struct Demo {
    /// The proxy.
    pub proxy: Handle,
    /// The blue app.
    pub blue: FakeUpstream,
    /// The green app.
    pub green: FakeUpstream,
    /// Directory holding the control socket and state file.
    pub dir: PathBuf,
}

/// The demo's config: route `/` to the app (blue active), the SPEC's deny list, runtime files
/// in `dir`.
pub fn config_yaml(listen: SocketAddr, blue: SocketAddr, green: SocketAddr, dir: &Path) -> String {
    format!(
        r#"listen:
  - addr: "{listen}"
threads: 2
grace_period: 5s
control:
  socket: "{dir}/control.sock"
admin:
  listen: "off"
state_file: "{dir}/state.json"
access_log: "off"
upstreams:
  app:
    pools:
      blue: ["{blue}"]
      green: ["{green}"]
    active: blue
    health:
      interval: 1s
      timeout: 500ms
routes:
  - path_prefix: /
    upstream: app
deny:
  status: 403
  paths: ["(?i)/(phpinfo|actuator|solr|portal|redlion|druid|manager|systembc|\\.aws|\\.docker)"]
"#,
        dir = dir.display()
    )
}

/// Start the demo: two upstreams on the current tokio runtime, the proxy on `listen`.
pub async fn run(listen: SocketAddr, dir: PathBuf) -> anyhow::Result<Demo> {
    std::fs::create_dir_all(&dir)?;
    let blue = FakeUpstream::builder("blue").record(false).start().await?;
    let green = FakeUpstream::builder("green").record(false).start().await?;
    let yaml = config_yaml(listen, blue.addr(), green.addr(), &dir);
    let config = switchyard_config::parse(&yaml)?;
    let proxy = start(config, StartOptions::default())?;
    Ok(Demo {
        proxy,
        blue,
        green,
        dir,
    })
}

/// The walkthrough printed after start.
pub fn walkthrough(d: &Demo) -> String {
    let proxy = d
        .proxy
        .listen_addrs()
        .first()
        .map(|a| a.to_string())
        .unwrap_or_default();
    format!(
        r#"switchyard demo: one app in two colors behind one proxy.

  blue   http://{blue}   the app, current version
  green  http://{green}   the app, next version
  proxy  http://{proxy}   -> blue (100%)

Try, in another terminal:

  curl -s http://{proxy}/                 # {{"color":"blue",...}}: answered by blue
  curl -s http://{proxy}/slow?ms=2000     # a slow request, also on blue
  curl -si http://{proxy}/actuator/env    # 403: denied paths never reach the app
  curl -s http://{green}/actuator/health  # green is up: {{"status":"UP"}}

Ctrl-C stops everything.
"#,
        blue = d.blue.addr(),
        green = d.green.addr(),
    )
}
