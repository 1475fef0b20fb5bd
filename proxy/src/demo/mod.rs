//! `switchyard demo` (SPEC §8): the whole idea on one machine with nothing else installed.
//!
//! Starts two built-in upstreams (blue and green, [`upstream`]) on loopback, a
//! proxy in front of them, and prints a walkthrough. Everything runs in this process; Ctrl-C
//! stops it.

pub mod upstream;

use crate::{start, Handle, StartOptions};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use upstream::FakeUpstream;

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
  listen: "127.0.0.1:0"
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
    # Short enough to watch: a bad canary is rolled back after 10 s of a 5xx share above 5%
    # over the last 30 s (the defaults are 2m and 1m).
    canary:
      auto_rollback: {{error_rate: 0.05, for: 10s, window: 30s, min_requests: 10}}
    step_interval: 20s
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

/// The walkthrough printed after start. `bin_dir` is where `proxyctl` was built next to
/// `switchyard`, if it is there.
pub fn walkthrough(d: &Demo, bin_dir: Option<&Path>) -> String {
    let proxy = d
        .proxy
        .listen_addrs()
        .first()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let path_line = match bin_dir {
        Some(dir) => format!("  export PATH=\"{}:$PATH\"\n", dir.display()),
        None => "  # proxyctl: cargo build --release -p switchyard-control, then put target/release on PATH\n".to_string(),
    };
    format!(
        r#"switchyard demo: one app in two colors behind one proxy.

  blue   http://{blue}   the app, current version
  green  http://{green}   the app, next version
  proxy  http://{proxy}   -> blue (100%)

Try, in another terminal:

{path_line}  export SWITCHYARD_SOCKET="{socket}"

  curl -s http://{proxy}/                 # {{"color":"blue",...}}: answered by blue
  curl -si http://{proxy}/actuator/env    # 403: denied paths never reach the app
  proxyctl status                          # weights, in-flight requests, generation

  proxyctl switch green                    # every new request goes to green, atomically
  curl -s http://{proxy}/                 # {{"color":"green",...}}
  proxyctl rollback                        # back to blue, instantly

  curl -s "http://{proxy}/slow?ms=5000" &  # a slow request on blue...
  proxyctl switch green --drain 30s        # ...finishes; proxyctl waits until blue has drained

  proxyctl weight blue 10                  # canary: 10% back to blue, 90% green
  for i in $(seq 10); do curl -s http://{proxy}/; echo; done

Canary releases, run by the proxy (green is the next version again):

  proxyctl switch blue
  curl -s -H 'X-Canary: true' http://{proxy}/   # testers can reach the canary on purpose
  curl -s "http://{green}/demo/fail?percent=30"     # ...but this green fails 30% of requests
  proxyctl canary green --steps 10,50,100 --wait &  # 10% now, the next step every 20s
  for i in $(seq 400); do curl -s -o /dev/null http://{proxy}/; sleep 0.05; done
  # ~10s after green's 5xx share passed 5%: "rolled back automatically ... 5xx 30.0% ...",
  # exit code 5, green back to 0, and nothing but a human command gives it traffic again.
  proxyctl status                          # the split, the rollout, and why it was rolled back
  curl -s "http://{green}/demo/fail?percent=0"      # heal green and try again:
  proxyctl canary green --steps 10,50,100 --interval 5s --wait   # needs traffic to advance

  proxyctl events                          # who switched what, health changes
  curl -s http://{admin}/metrics | grep ^switchyard_http_requests_total

Ctrl-C stops everything.
"#,
        blue = d.blue.addr(),
        green = d.green.addr(),
        socket = d.dir.join("control.sock").display(),
        admin = d
            .proxy
            .admin_addr()
            .map(|a| a.to_string())
            .unwrap_or_default(),
    )
}
