//! The validated configuration. Every value here has been checked, defaults are filled in and
//! cross-references (route -> upstream, `active` -> pool) are known to resolve, so the proxy
//! builds its runtime state from it without further checks.

use ipnet::IpNet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// A validated switchyard configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Listening sockets (at least one).
    pub listen: Vec<ListenConfig>,
    /// Data-plane worker threads.
    pub threads: usize,
    /// Bound on the graceful-shutdown wait.
    pub grace_period: Duration,
    /// Idle client keep-alive timeout (zero disables client keep-alive).
    pub keepalive_timeout: Duration,
    /// Client connections open at once (per process).
    pub max_connections: usize,
    /// Deadline for a whole request head.
    pub client_header_timeout: Duration,
    /// The largest request body accepted, in bytes; 0 = unlimited.
    pub client_max_body_size: u64,
    /// The request-id header name.
    pub request_id: String,
    /// Control socket.
    pub control: ControlConfig,
    /// Admin listener.
    pub admin: AdminConfig,
    /// Runtime state file.
    pub state_file: PathBuf,
    /// Shared secret for sticky cookies; `None`: a random key per proxy.
    pub sticky_key_file: Option<PathBuf>,
    /// Where the access log goes.
    pub access_log: AccessLog,
    /// Access log line format.
    pub access_log_format: AccessLogFormat,
    /// Upstreams, sorted by name.
    pub upstreams: Vec<UpstreamConfig>,
    /// Routes in file order (first match wins).
    pub routes: Vec<RouteConfig>,
    /// Paths answered by the proxy itself.
    pub deny: DenyConfig,
    /// The fleet this proxy belongs to; `None`: standalone.
    pub fleet: Option<FleetConfig>,
}

/// A fleet of proxies following one desired state in etcd (SPEC §9).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetConfig {
    /// etcd endpoints (`http://host:port`).
    pub etcd: Vec<String>,
    /// Key space, starting and ending with `/`.
    pub prefix: String,
    /// This proxy's id in the fleet.
    pub name: String,
    /// How long a silent proxy still counts as live.
    pub lease_ttl: Duration,
}

impl Config {
    /// The upstream with this name.
    pub fn upstream(&self, name: &str) -> Option<&UpstreamConfig> {
        self.upstreams.iter().find(|u| u.name == name)
    }
}

/// One listening socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenConfig {
    /// Address to bind.
    pub addr: SocketAddr,
    /// TLS termination, if any.
    pub tls: Option<TlsConfig>,
    /// Offer h2 by ALPN (TLS listeners only).
    pub http2: bool,
    /// Answer 308 to `https://` instead of proxying (plain listeners only).
    pub redirect_https: bool,
}

/// The certificates of a TLS listener: at least one; chosen by SNI, the first by default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// Certificate and key files, in config order.
    pub certs: Vec<CertPair>,
}

/// Certificate and key files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertPair {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

/// The control socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlConfig {
    /// Socket path.
    pub socket: PathBuf,
    /// File mode, e.g. `0o600`.
    pub mode: u32,
}

/// The admin listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    /// Address, or `None` when disabled (`listen: off`).
    pub listen: Option<SocketAddr>,
}

/// Access log destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessLog {
    /// Standard output.
    Stdout,
    /// No access log.
    Off,
    /// Appended to this file (reopened on SIGUSR1).
    File(PathBuf),
}

/// Access log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessLogFormat {
    /// nginx `combined` with switchyard's fields appended as `key=value`.
    Combined,
    /// One JSON object per line.
    Json,
}

/// One upstream (an app with colored pools).
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamConfig {
    /// Name, as referenced by routes and `proxyctl --upstream`.
    pub name: String,
    /// Pools, sorted by name.
    pub pools: Vec<PoolConfig>,
    /// The pool with 100% of the traffic at first start.
    pub active: String,
    /// Re-resolution interval of DNS-named instances.
    pub resolve_interval: Duration,
    /// Instance selection within a pool.
    pub balance: Balance,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// Per-read upstream timeout.
    pub read_timeout: Duration,
    /// Idle upstream keep-alive timeout.
    pub idle_timeout: Duration,
    /// Retries on another instance of the same pool.
    pub retries: u32,
    /// Default drain wait.
    pub drain_timeout: Duration,
    /// Active health checks.
    pub health: HealthConfig,
    /// Passive ejection.
    pub passive: PassiveConfig,
    /// Canary behaviour.
    pub canary: CanaryConfig,
    /// Preview routing.
    pub preview: PreviewConfig,
    /// Default steps of a rollout (weights in percent, strictly increasing, ending at 100).
    pub steps: Vec<u32>,
    /// Default time at each step.
    pub step_interval: Duration,
}

impl UpstreamConfig {
    /// The pool with this name.
    pub fn pool(&self, name: &str) -> Option<&PoolConfig> {
        self.pools.iter().find(|p| p.name == name)
    }
}

/// One pool of instances.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolConfig {
    /// Pool name (`blue`, `green`, `canary`, ...).
    pub name: String,
    /// Its instances, in file order.
    pub instances: Vec<InstanceAddr>,
}

/// How an instance is chosen within a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    /// Each instance in turn.
    RoundRobin,
    /// The instance with the fewest requests in flight.
    LeastRequests,
}

/// Active health check settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthConfig {
    /// Path requested with GET.
    pub path: String,
    /// Time between checks of one instance.
    pub interval: Duration,
    /// Timeout of one check.
    pub timeout: Duration,
    /// Consecutive passes to become healthy.
    pub healthy_threshold: u32,
    /// Consecutive failures to become unhealthy.
    pub unhealthy_threshold: u32,
    /// Status codes that pass.
    pub expect_status: Vec<u16>,
    /// Accepted values of the JSON body's `status`; empty = body not inspected.
    pub expect_json_status: Vec<String>,
}

/// Passive outlier ejection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PassiveConfig {
    /// Failures in a row that eject an instance (0 = never).
    pub consecutive_failures: u32,
    /// Ejection period.
    pub eject_for: Duration,
}

/// What keeps a client on its canary assignment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sticky {
    /// Every request is assigned independently.
    None,
    /// A cookie carries the assignment.
    Cookie,
    /// The value of this request header is hashed.
    Header(String),
}

/// Canary behaviour.
#[derive(Debug, Clone, PartialEq)]
pub struct CanaryConfig {
    /// Stickiness.
    pub sticky: Sticky,
    /// Cookie name for `Sticky::Cookie`.
    pub cookie: String,
    /// `<force_header>: true` sends a request to the canary.
    pub force_header: String,
    /// What makes a canary bad: judged for rollout steps always, acted on automatically when
    /// `auto_rollback` is on.
    pub analysis: AnalysisConfig,
    /// Roll a bad canary back without a human.
    pub auto_rollback: bool,
}

/// When a canary is bad (SPEC §3 `canary.auto_rollback`).
#[derive(Debug, Clone, PartialEq)]
pub struct AnalysisConfig {
    /// 5xx share above which the canary is bad (or the allowed excess over the main pool's
    /// share, with `relative_to_main`).
    pub error_rate: f64,
    /// Compare with the main pool's 5xx share.
    pub relative_to_main: bool,
    /// How long the condition must hold before an automatic rollback.
    pub hold_for: Duration,
    /// The sliding window measured.
    pub window: Duration,
    /// Fewer canary requests than this in the window: no verdict.
    pub min_requests: u64,
    /// Optional p99 latency bound.
    pub latency_p99: Option<Duration>,
}

/// Preview routing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreviewConfig {
    /// Header naming a pool.
    pub header: String,
    /// Client networks allowed to use it.
    pub allow_from: Vec<IpNet>,
}

/// One route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteConfig {
    /// The host it is for; any when `None`.
    pub host: Option<HostMatch>,
    /// Path prefix (starts with `/`).
    pub path_prefix: String,
    /// Upstream name (known to exist).
    pub upstream: String,
    /// Strip the prefix before forwarding.
    pub strip_prefix: bool,
}

/// A route's `host` (nginx's `server_name`): exact, or a leading wildcard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMatch {
    /// `api.example.com`: this name only (lower case, no trailing dot).
    Exact(String),
    /// `*.example.com`, kept as `.example.com`: any name ending in it, with one label or more
    /// before it (`a.example.com`, `a.b.example.com`; not `example.com`), as nginx has it.
    Suffix(String),
}

impl HostMatch {
    /// Parse `api.example.com` or `*.example.com` (case-insensitive, no port).
    pub fn parse(s: &str) -> Result<HostMatch, String> {
        let bad = || {
            format!("{s:?} is not a host name: write it without port or scheme, exact (api.example.com) or with a leading wildcard (*.example.com)")
        };
        let lower = s.strip_suffix('.').unwrap_or(s).to_ascii_lowercase();
        let (name, wildcard) = match lower.strip_prefix("*.") {
            Some(rest) => (rest, true),
            None => (lower.as_str(), false),
        };
        if name.is_empty() || name.contains('*') || !is_dns_name(name) {
            return Err(bad());
        }
        Ok(if wildcard {
            HostMatch::Suffix(format!(".{name}"))
        } else {
            HostMatch::Exact(name.to_string())
        })
    }

    /// Whether a request for `host` (lower case, no port, no trailing dot) matches.
    pub fn matches(&self, host: &[u8]) -> bool {
        match self {
            HostMatch::Exact(n) => host == n.as_bytes(),
            HostMatch::Suffix(s) => host.len() > s.len() && host.ends_with(s.as_bytes()),
        }
    }

    /// Whether every host `other` matches, this matches too.
    pub fn covers(&self, other: &HostMatch) -> bool {
        match (self, other) {
            (HostMatch::Exact(a), HostMatch::Exact(b)) => a == b,
            (HostMatch::Exact(_), HostMatch::Suffix(_)) => false,
            (HostMatch::Suffix(_), HostMatch::Exact(b)) => self.matches(b.as_bytes()),
            (HostMatch::Suffix(a), HostMatch::Suffix(b)) => b.ends_with(a.as_str()),
        }
    }
}

impl std::fmt::Display for HostMatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HostMatch::Exact(n) => f.write_str(n),
            HostMatch::Suffix(s) => write!(f, "*{s}"),
        }
    }
}

/// Paths answered by the proxy.
#[derive(Debug, Clone)]
pub struct DenyConfig {
    /// Status of the answer.
    pub status: u16,
    /// Compiled patterns.
    pub paths: Vec<regex::Regex>,
}

impl PartialEq for DenyConfig {
    fn eq(&self, other: &Self) -> bool {
        self.status == other.status
            && self.paths.len() == other.paths.len()
            && self
                .paths
                .iter()
                .zip(&other.paths)
                .all(|(a, b)| a.as_str() == b.as_str())
    }
}

/// The host part of an instance address.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Host {
    /// A literal IP address.
    Ip(IpAddr),
    /// A DNS name (resolved off the request path and re-resolved periodically).
    Name(String),
}

/// An instance address as written in the config: `host:port`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InstanceAddr {
    /// IP or DNS name.
    pub host: Host,
    /// TCP port (1..=65535).
    pub port: u16,
}

impl InstanceAddr {
    /// The socket address when the host is a literal IP.
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        match &self.host {
            Host::Ip(ip) => Some(SocketAddr::new(*ip, self.port)),
            Host::Name(_) => None,
        }
    }
}

impl fmt::Display for InstanceAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]:{}", self.port),
            Host::Ip(ip) => write!(f, "{ip}:{}", self.port),
            Host::Name(n) => write!(f, "{n}:{}", self.port),
        }
    }
}

/// Why a string is not an instance address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{input:?} is not host:port{}", reason.map(|r| format!(" ({r})")).unwrap_or_default())]
pub struct AddrParseError {
    /// The rejected input.
    pub input: String,
    /// More detail, if there is any.
    pub reason: Option<&'static str>,
}

impl FromStr for InstanceAddr {
    type Err = AddrParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| AddrParseError {
            input: s.to_string(),
            reason,
        };
        if let Ok(sa) = s.parse::<SocketAddr>() {
            if sa.port() == 0 {
                return Err(err(Some("port 0")));
            }
            return Ok(InstanceAddr {
                host: Host::Ip(sa.ip()),
                port: sa.port(),
            });
        }
        let (host, port) = s.rsplit_once(':').ok_or_else(|| err(None))?;
        let port: u16 = port
            .parse()
            .map_err(|_| err(Some("port must be 1..65535")))?;
        if port == 0 {
            return Err(err(Some("port 0")));
        }
        if host.parse::<IpAddr>().is_ok() || host.contains(':') || host.starts_with('[') {
            return Err(err(Some("IPv6 addresses need brackets: [::1]:8080")));
        }
        if !is_dns_name(host) {
            return Err(err(Some("invalid host name")));
        }
        Ok(InstanceAddr {
            host: Host::Name(host.to_ascii_lowercase()),
            port,
        })
    }
}

/// RFC 1123 host name: labels of letters, digits and hyphens (underscores are accepted too,
/// because docker-compose service names use them), not starting or ending with a hyphen.
fn is_dns_name(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host.trim_end_matches('.').split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_instance_addresses() {
        let a: InstanceAddr = "127.0.0.1:8081".parse().unwrap();
        assert_eq!(a.socket_addr(), Some("127.0.0.1:8081".parse().unwrap()));
        let b: InstanceAddr = "App_Green:8080".parse().unwrap();
        assert_eq!(b.host, Host::Name("app_green".into()));
        assert_eq!(b.to_string(), "app_green:8080");
        let c: InstanceAddr = "[::1]:80".parse().unwrap();
        assert_eq!(c.to_string(), "[::1]:80");
        for bad in [
            "10.0.0.5",
            "host",
            ":80",
            "host:0",
            "host:99999",
            "::1:80",
            "-bad-:1",
            "a b:1",
        ] {
            assert!(bad.parse::<InstanceAddr>().is_err(), "{bad} accepted");
        }
        assert_eq!(
            "10.0.0.5".parse::<InstanceAddr>().unwrap_err().to_string(),
            "\"10.0.0.5\" is not host:port"
        );
    }
}
