//! The serde mirror of the YAML file: every key of SPEC §3, all optional where the spec gives a
//! default, unknown keys rejected (`deny_unknown_fields`) so a typo is an error, not a silent
//! default. Nothing outside this crate sees these types; [`crate::validate`] turns them into
//! [`crate::Config`]. Each field's doc is the reference for that key (units, default, range).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The whole file.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Listening sockets; at least one. Each is `addr: "ip:port"`, optionally with `tls` and `http2`.
    #[serde(default)]
    pub listen: Vec<Listen>,
    /// Worker threads of the data plane. Default: the number of CPUs. Range 1..=1024.
    pub threads: Option<usize>,
    /// On SIGTERM/SIGINT: how long in-flight requests may take to finish before the process
    /// exits anyway. Default `30s`. The process exits as soon as nothing is in flight.
    pub grace_period: Option<String>,
    /// Idle client keep-alive connections are closed after this long. Default `75s` (nginx's).
    pub keepalive_timeout: Option<String>,
    /// Client connections open at once, per process. Default 10000, range 1..=1000000. At the
    /// limit new connections wait in the listen backlog until one closes.
    pub max_connections: Option<usize>,
    /// A client must send its whole request head (request line and headers) within this long
    /// — one deadline, not per read (nginx's `client_header_timeout`). On a new connection it
    /// counts from the accept (TLS handshake included); on a keep-alive connection from the
    /// first byte of the next request. Default `10s`.
    pub client_header_timeout: Option<String>,
    /// The largest request body accepted: bytes, or with a unit `k`, `m`, `g` (nginx's
    /// `client_max_body_size`; 1k = 1024). `0` = unlimited. Default `10m` (Spring's
    /// `max-request-size`). Above it the answer is 413 and the app gets nothing.
    pub client_max_body_size: Option<Size>,
    /// The request-id header: kept if the client sent a well-formed one, else generated;
    /// forwarded to the app, returned on the response, logged. Default `X-Request-Id`.
    pub request_id: Option<String>,
    /// The Unix control socket `proxyctl` talks to.
    pub control: Option<Control>,
    /// The admin HTTP listener (`/metrics`, `/healthz`, `/status`).
    pub admin: Option<Admin>,
    /// Where runtime state (weights, pool members) is persisted. Default `./switchyard.state.json`.
    pub state_file: Option<String>,
    /// A file holding the secret behind sticky canary cookies (at least 16 characters). Give
    /// every proxy behind one load balancer the same file so a cookie one issued is honored by
    /// all. Default: a random key per proxy, kept in its state file.
    pub sticky_key_file: Option<String>,
    /// Access log: `stdout`, `off`, or a file path. Default `stdout`.
    pub access_log: Option<String>,
    /// Access log format: `combined` (nginx's combined format plus switchyard fields) or `json`.
    /// Default `combined`.
    pub access_log_format: Option<String>,
    /// The apps behind the proxy, by name. Each has colored pools of instances.
    #[serde(default)]
    pub upstreams: BTreeMap<String, Upstream>,
    /// Path-prefix routes, first match wins, in file order.
    #[serde(default)]
    pub routes: Vec<Route>,
    /// Paths the proxy answers itself (never forwarded).
    pub deny: Option<Deny>,
    /// Several proxies following one desired state in etcd (SPEC §9). Absent: standalone.
    pub fleet: Option<Fleet>,
}

/// A fleet: the etcd cluster holding the desired state, and this proxy's place in it.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Fleet {
    /// etcd endpoints, `http://host:port` (v3 API). At least one.
    #[serde(default)]
    pub etcd: Vec<String>,
    /// The fleet's key space, e.g. `/switchyard/prod/` (must start and end with `/`).
    pub prefix: Option<String>,
    /// This proxy's id in the fleet. Default: the host name.
    pub name: Option<String>,
    /// A proxy silent this long is no longer counted as live. Default `10s`, range 2s..=5m.
    pub lease_ttl: Option<String>,
}

/// One listening socket.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    /// `ip:port` to bind, e.g. `0.0.0.0:8080`. Port 0 picks a free port (tests, embedding).
    pub addr: String,
    /// Terminate TLS on this listener with this certificate chain and key (PEM files).
    pub tls: Option<Tls>,
    /// Offer HTTP/2 by ALPN. Default: true on TLS listeners; ignored without TLS.
    pub http2: Option<bool>,
    /// Answer every request on this (plain) listener with `308` to the same host, path and
    /// query over `https://` instead of proxying it (nginx's `return 308 https://$host$request_uri`).
    pub redirect_https: Option<bool>,
}

/// PEM files for a TLS listener.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    /// Certificate chain (leaf first), PEM.
    pub cert: Option<String>,
    /// Private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key: Option<String>,
    /// Instead of `cert`/`key`: several certificates, chosen by the client's SNI among the
    /// names each certificate holds; the first is the default (no SNI, or no name matches).
    pub certs: Option<Vec<CertFiles>>,
}

/// One certificate of a TLS listener with several.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CertFiles {
    /// Certificate chain (leaf first), PEM.
    pub cert: String,
    /// Private key, PEM.
    pub key: String,
}

/// The control socket.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Control {
    /// Path of the Unix socket. Default `./switchyard.sock`.
    pub socket: Option<String>,
    /// Octal file mode of the socket, as a string. Default `"0600"`: only the owner may switch.
    pub mode: Option<String>,
}

/// The admin listener.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    /// `ip:port` for `/metrics`, `/healthz`, `/status`. Default `127.0.0.1:9091` (loopback only).
    /// `off` disables the admin listener.
    pub listen: Option<String>,
}

/// One upstream: a deployable app with named pools (blue/green/canary are conventions).
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    /// Pool name -> instances (`host:port`; host may be an IP or a DNS name). At least one pool;
    /// a pool may be empty only if it is not `active`.
    #[serde(default)]
    pub pools: BTreeMap<String, Vec<String>>,
    /// How often DNS names among the instances are re-resolved. Default `5s`.
    pub resolve_interval: Option<String>,
    /// The pool that gets 100% of the traffic at first start (the state file wins afterwards).
    /// Required when there is more than one pool.
    pub active: Option<String>,
    /// `round_robin` (default) or `least_requests`.
    pub balance: Option<String>,
    /// TCP connect timeout per attempt. Default `2s`.
    pub connect_timeout: Option<String>,
    /// Timeout of each read from the upstream (response header, each body chunk). Default `60s`.
    pub read_timeout: Option<String>,
    /// Idle upstream keep-alive connections are closed after this. Default `15s`; keep it below
    /// the app server's own keep-alive timeout (Tomcat: `server.tomcat.keep-alive-timeout`).
    pub idle_timeout: Option<String>,
    /// Retries on another instance of the same pool. Default 1, range 0..=10.
    pub retries: Option<u32>,
    /// Default wait of `proxyctl switch --drain` / `proxyctl drain`. Default `30s`.
    pub drain_timeout: Option<String>,
    /// Active health checks.
    pub health: Option<Health>,
    /// Passive outlier ejection from live traffic.
    pub passive: Option<Passive>,
    /// Canary behaviour (stickiness, forcing, automatic rollback).
    pub canary: Option<Canary>,
    /// Explicit pool selection by header, for testing the idle color.
    pub preview: Option<Preview>,
    /// Weights of `proxyctl canary POOL` when `--steps` is not given. Default `[5, 25, 50, 100]`;
    /// strictly increasing, each 1..=100, ending at 100.
    pub steps: Option<Vec<u32>>,
    /// Time at each step; a step advances only if its analysis passed. Default `10m`.
    pub step_interval: Option<String>,
}

/// Active health check settings.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Health {
    /// Path requested with GET. Default `/actuator/health`.
    pub path: Option<String>,
    /// Time between checks of one instance. Default `2s`.
    pub interval: Option<String>,
    /// Timeout of one check. Default `1s`; must be below `interval`.
    pub timeout: Option<String>,
    /// Consecutive passes to become healthy. Default 2, range 1..=100.
    pub healthy_threshold: Option<u32>,
    /// Consecutive failures to become unhealthy. Default 3, range 1..=100.
    pub unhealthy_threshold: Option<u32>,
    /// Status codes that pass. Default `[200]`.
    pub expect_status: Option<Vec<u16>>,
    /// The JSON body's `status` must be one of these (Spring Actuator). Default `[UP]`;
    /// `[]` means the body is not looked at.
    pub expect_json_status: Option<Vec<String>>,
}

/// Passive outlier ejection.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Passive {
    /// Connect errors or 502/503/504 answers in a row that eject an instance. Default 5;
    /// 0 disables passive ejection.
    pub consecutive_failures: Option<u32>,
    /// How long an ejected instance gets no traffic. Default `30s`.
    pub eject_for: Option<String>,
}

/// Canary settings.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Canary {
    /// `none`, `cookie` (default) or `header:<Name>`: what keeps a client on its pool.
    pub sticky: Option<String>,
    /// Cookie name used by `sticky: cookie`. Default `switchyard_pool`.
    pub cookie: Option<String>,
    /// A request with this header set to `true` goes to the canary pool. Default `X-Canary`.
    pub force_header: Option<String>,
    /// Automatic rollback of a bad canary.
    pub auto_rollback: Option<AutoRollback>,
    /// `true`: `error_rate` is the allowed excess of the canary's 5xx share over the main
    /// pool's, so an outage hitting both pools does not blame the canary. Default false.
    pub relative_to_main: Option<bool>,
}

/// Automatic rollback thresholds.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AutoRollback {
    /// Roll back when the canary's 5xx share is above this (0..1). Default 0.05.
    pub error_rate: Option<f64>,
    /// ... continuously for this long. Default `2m`.
    #[serde(rename = "for")]
    pub for_: Option<String>,
    /// ... with at least this many canary requests per `window`. Default 20.
    pub min_requests: Option<u64>,
    /// The sliding window the share, the request count and the p99 are measured over.
    /// Default `1m` (switchyard's addition; the SPEC fixes it at one minute).
    pub window: Option<String>,
    /// Optional p99 latency bound, e.g. `800ms`. Default: none.
    pub latency_p99: Option<String>,
    /// `false` disables automatic rollback. Default true.
    pub enabled: Option<bool>,
}

/// Preview routing.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Preview {
    /// Header naming the pool to use. Default `X-Switchyard-Pool`.
    pub header: Option<String>,
    /// Client networks allowed to use the header (CIDR). Default loopback only.
    pub allow_from: Option<Vec<String>>,
}

/// One route.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Only requests for this host (nginx's `server_name`): exact (`api.example.com`) or a
    /// leading wildcard (`*.example.com`), matched on the Host header without its port. Any
    /// host when left out.
    pub host: Option<String>,
    /// Requests whose path starts with this go to `upstream`. Must start with `/`.
    pub path_prefix: String,
    /// Name of an upstream.
    pub upstream: String,
    /// Remove the prefix before forwarding (`/backend/x` -> `/x`). Default false.
    pub strip_prefix: Option<bool>,
}

/// Paths answered by the proxy itself.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Deny {
    /// Status code of the answer. Default 403, range 400..=599.
    pub status: Option<u16>,
    /// Regular expressions (Rust `regex` syntax, `(?i)` for case-insensitive) searched in the
    /// request path, both as sent and percent-decoded.
    #[serde(default)]
    pub paths: Vec<String>,
}

/// A size as written: a number of bytes, or text such as `10m`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum Size {
    /// Bytes.
    Bytes(u64),
    /// With a unit.
    Text(String),
}
