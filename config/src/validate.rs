//! Semantic checks: `raw::Config` -> `Config`. Every problem is collected with its path
//! (pingap stops at the first one; users then fix one error per run). Defaults are filled in
//! here and nowhere else, so the defaults documented on `raw` are the ones in effect.

use crate::error::{ConfigError, Errors, FieldPath};
use crate::model::*;
use crate::raw;
use ipnet::IpNet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Validate a parsed file. All problems are returned together in `ConfigError::Invalid`.
pub fn validate(raw: raw::Config) -> Result<Config, ConfigError> {
    let mut errs = Errors::default();
    let root = FieldPath::root();

    let listen = listeners(&raw.listen, &root.key("listen"), &mut errs);

    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let threads = ranged(raw.threads, &root.key("threads"), cpus, 1..=1024, &mut errs);
    let grace_period = duration(
        raw.grace_period.as_deref(),
        &root.key("grace_period"),
        Duration::from_secs(30),
        true,
        &mut errs,
    );
    let keepalive_timeout = duration(
        raw.keepalive_timeout.as_deref(),
        &root.key("keepalive_timeout"),
        Duration::from_secs(75),
        true,
        &mut errs,
    );

    let max_connections = ranged(
        raw.max_connections,
        &root.key("max_connections"),
        10_000,
        1..=1_000_000,
        &mut errs,
    );
    let client_header_timeout = duration(
        raw.client_header_timeout.as_deref(),
        &root.key("client_header_timeout"),
        Duration::from_secs(10),
        false,
        &mut errs,
    );

    let client_max_body_size = size(
        raw.client_max_body_size.as_ref(),
        &root.key("client_max_body_size"),
        10 << 20,
        &mut errs,
    );

    let control = control(raw.control.as_ref(), &root.key("control"), &mut errs);
    let admin = admin(raw.admin.as_ref(), &root.key("admin"), &mut errs);

    let state_file = match raw.state_file.as_deref() {
        None => PathBuf::from("./switchyard.state.json"),
        Some("") => {
            errs.push(root.key("state_file"), "must not be empty");
            PathBuf::new()
        }
        Some(p) => PathBuf::from(p),
    };
    let request_id = raw
        .request_id
        .clone()
        .unwrap_or_else(|| "X-Request-Id".into());
    if !is_token(&request_id) {
        errs.push(
            root.key("request_id"),
            format!("{request_id:?} is not a valid header name"),
        );
    } else if let Some(r) = RESERVED_FOR_REQUEST_ID
        .iter()
        .find(|r| r.eq_ignore_ascii_case(&request_id))
    {
        errs.push(
            root.key("request_id"),
            format!(
                "{r} is a header the proxy or HTTP itself sets; name another (e.g. X-Request-Id)"
            ),
        );
    }
    let sticky_key_file = match raw.sticky_key_file.as_deref() {
        None => None,
        Some("") => {
            errs.push(root.key("sticky_key_file"), "must not be empty");
            None
        }
        Some(p) => Some(PathBuf::from(p)),
    };
    let access_log = match raw.access_log.as_deref() {
        None | Some("stdout") => AccessLog::Stdout,
        Some("off") => AccessLog::Off,
        Some("") => {
            errs.push(root.key("access_log"), "must be stdout, off or a file path");
            AccessLog::Off
        }
        Some(p) => AccessLog::File(PathBuf::from(p)),
    };
    let access_log_format = match raw.access_log_format.as_deref() {
        None | Some("combined") => AccessLogFormat::Combined,
        Some("json") => AccessLogFormat::Json,
        Some(other) => {
            errs.push(
                root.key("access_log_format"),
                format!("unknown format {other:?} (expected combined or json)"),
            );
            AccessLogFormat::Combined
        }
    };

    let upath = root.key("upstreams");
    if raw.upstreams.is_empty() {
        errs.push(upath.clone(), "at least one upstream is required");
    }
    let upstreams: Vec<UpstreamConfig> = raw
        .upstreams
        .iter()
        .map(|(name, u)| upstream(name, u, &upath.key(name), &mut errs))
        .collect();

    let known = || {
        raw.upstreams
            .keys()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let rpath = root.key("routes");
    if raw.routes.is_empty() {
        errs.push(rpath.clone(), "at least one route is required");
    }
    let mut routes: Vec<RouteConfig> = Vec::with_capacity(raw.routes.len());
    let hosts: Vec<Option<HostMatch>> = raw
        .routes
        .iter()
        .map(|r| r.host.as_deref().and_then(|h| HostMatch::parse(h).ok()))
        .collect();
    for (i, r) in raw.routes.iter().enumerate() {
        let p = rpath.index(i);
        if let Some(Err(e)) = r.host.as_deref().map(HostMatch::parse) {
            errs.push(p.key("host"), e);
        }
        if !r.path_prefix.starts_with('/') {
            errs.push(
                p.key("path_prefix"),
                format!("{:?} must start with /", r.path_prefix),
            );
        }
        if !raw.upstreams.contains_key(&r.upstream) {
            errs.push(
                p.key("upstream"),
                format!("unknown upstream {:?} (known: {})", r.upstream, known()),
            );
        }
        // Shadowed: an earlier route takes every request this one would (its host covers
        // this one's, and its prefix is a prefix of this one's).
        // (A route whose host is invalid is reported for that alone.)
        let bad = |k: usize| raw.routes[k].host.is_some() && hosts[k].is_none();
        let covers = |j: usize| {
            !bad(i)
                && !bad(j)
                && match (&hosts[j], &hosts[i]) {
                    (None, _) => true,
                    (Some(_), None) => false,
                    (Some(a), Some(b)) => a.covers(b),
                }
        };
        if let Some(j) =
            (0..i).find(|&j| covers(j) && r.path_prefix.starts_with(&raw.routes[j].path_prefix))
        {
            let earlier = &raw.routes[j];
            let what = |h: &Option<HostMatch>, prefix: &str| match h {
                Some(h) => format!("host {h}, {prefix:?}"),
                None => format!("{prefix:?}"),
            };
            let msg = if hosts[j] == hosts[i] && earlier.path_prefix == r.path_prefix {
                format!(
                    "duplicates routes[{j}] ({}): it can never match",
                    what(&hosts[j], &earlier.path_prefix)
                )
            } else {
                format!(
                    "{} can never match: routes[{j}] ({}) comes first and matches everything it would",
                    what(&hosts[i], &r.path_prefix),
                    what(&hosts[j], &earlier.path_prefix)
                )
            };
            errs.push(p.key("path_prefix"), msg);
        }
        routes.push(RouteConfig {
            host: hosts[i].clone(),
            path_prefix: r.path_prefix.clone(),
            upstream: r.upstream.clone(),
            strip_prefix: r.strip_prefix.unwrap_or(false),
        });
    }

    let deny = deny(raw.deny.as_ref(), &root.key("deny"), &mut errs);
    let fleet = raw
        .fleet
        .as_ref()
        .map(|f| fleet(f, &root.key("fleet"), &mut errs));

    errs.finish()?;
    Ok(Config {
        listen,
        threads,
        grace_period,
        keepalive_timeout,
        max_connections,
        client_header_timeout,
        client_max_body_size,
        request_id,
        control,
        admin,
        state_file,
        sticky_key_file,
        access_log,
        access_log_format,
        upstreams,
        routes,
        deny,
        fleet,
    })
}

/// The longest fleet name and the lease bounds (etcd's own minimum TTL is about 2 s).
const MAX_FLEET_NAME: usize = 128;
const MIN_LEASE: Duration = Duration::from_secs(2);
const MAX_LEASE: Duration = Duration::from_secs(300);

fn fleet(raw: &raw::Fleet, path: &FieldPath, errs: &mut Errors) -> FleetConfig {
    if raw.etcd.is_empty() {
        errs.push(path.key("etcd"), "at least one etcd endpoint is needed");
    }
    for (i, e) in raw.etcd.iter().enumerate() {
        let rest = e
            .strip_prefix("http://")
            .or_else(|| e.strip_prefix("https://"));
        let ok = rest.is_some_and(|r| {
            let hostport = r.trim_end_matches('/');
            !hostport.is_empty()
                && !hostport.contains('/')
                && hostport
                    .rsplit_once(':')
                    .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0))
        });
        if ok && e.starts_with("https://") {
            errs.push(
                path.key("etcd").index(i),
                format!("{e:?}: TLS to etcd is not supported yet; use http:// on a private network or a local etcd proxy"),
            );
        } else if !ok {
            errs.push(
                path.key("etcd").index(i),
                format!("{e:?} is not an etcd endpoint such as \"http://127.0.0.1:2379\""),
            );
        }
    }
    let prefix = match raw.prefix.as_deref() {
        None => {
            errs.push(
                path.key("prefix"),
                "is required (e.g. \"/switchyard/prod/\"): it names the fleet's key space",
            );
            String::new()
        }
        Some(p) if p.len() < 2 || !p.starts_with('/') || !p.ends_with('/') => {
            errs.push(
                path.key("prefix"),
                format!("{p:?} must start and end with \"/\", e.g. \"/switchyard/prod/\""),
            );
            String::new()
        }
        Some(p) => p.to_string(),
    };
    let name = match raw.name.as_deref() {
        Some(n) => n.to_string(),
        None => hostname(),
    };
    if name.is_empty()
        || name.len() > MAX_FLEET_NAME
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
    {
        let what = if raw.name.is_some() {
            ""
        } else {
            " (the host name)"
        };
        errs.push(
            path.key("name"),
            format!("{name:?}{what} is not a fleet name: 1 to {MAX_FLEET_NAME} letters, digits, '.', '_' or '-'"),
        );
    }
    let lease_ttl = duration(
        raw.lease_ttl.as_deref(),
        &path.key("lease_ttl"),
        Duration::from_secs(10),
        false,
        errs,
    );
    if !(MIN_LEASE..=MAX_LEASE).contains(&lease_ttl) {
        errs.push(
            path.key("lease_ttl"),
            format!(
                "{} is out of range 2s..=5m",
                humantime::format_duration(lease_ttl)
            ),
        );
    }
    FleetConfig {
        etcd: raw.etcd.clone(),
        prefix,
        name,
        lease_ttl,
    }
}

/// This host's name (the default fleet name), from the kernel.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Headers `request_id` must not name: framing and hop-by-hop headers (replacing them would
/// break the connection), the host, cookies, and the forwarding headers the proxy sets
/// (a client's "id" would overwrite the address the app sees).
const RESERVED_FOR_REQUEST_ID: [&str; 17] = [
    "Host",
    "Content-Length",
    "Transfer-Encoding",
    "Connection",
    "Keep-Alive",
    "Upgrade",
    "TE",
    "Trailer",
    "Proxy-Connection",
    "Cookie",
    "Set-Cookie",
    "Authorization",
    "X-Forwarded-For",
    "X-Forwarded-Proto",
    "X-Forwarded-Host",
    "X-Real-IP",
    "Content-Type",
];

/// Listeners at most: with the admin listener and the control socket they travel in one
/// SCM_RIGHTS message at a binary upgrade (the kernel takes up to 253 descriptors; the new
/// process makes room for 64).
const MAX_LISTENERS: usize = 60;

fn listeners(raw: &[raw::Listen], path: &FieldPath, errs: &mut Errors) -> Vec<ListenConfig> {
    if raw.is_empty() {
        errs.push(path.clone(), "at least one listener is required");
    }
    if raw.len() > MAX_LISTENERS {
        errs.push(
            path.clone(),
            format!("at most {MAX_LISTENERS} listeners (a binary upgrade hands them over in one message)"),
        );
    }
    let mut out: Vec<ListenConfig> = Vec::new();
    for (i, l) in raw.iter().enumerate() {
        let p = path.index(i);
        let addr = match l.addr.parse::<SocketAddr>() {
            Ok(a) => a,
            Err(_) => {
                errs.push(p.key("addr"), format!("{:?} is not ip:port", l.addr));
                continue;
            }
        };
        if addr.port() != 0 && out.iter().any(|o| o.addr == addr) {
            errs.push(p.key("addr"), format!("{addr} is listed twice"));
        }
        let tls = l.tls.as_ref().map(|t| {
            let tp = p.key("tls");
            let mut certs = Vec::new();
            let mut pair = |cert: &str, key: &str, at: &FieldPath| {
                for (k, file) in [("cert", cert), ("key", key)] {
                    if file.is_empty() {
                        errs.push(at.key(k), "must not be empty");
                    }
                }
                certs.push(CertPair {
                    cert: PathBuf::from(cert),
                    key: PathBuf::from(key),
                });
            };
            match (&t.cert, &t.key, &t.certs) {
                (Some(c), Some(k), None) => pair(c, k, &tp),
                (None, None, Some(list)) if !list.is_empty() => {
                    for (j, c) in list.iter().enumerate() {
                        pair(&c.cert, &c.key, &tp.key("certs").index(j));
                    }
                }
                (None, None, Some(_)) => errs.push(tp.key("certs"), "at least one certificate"),
                (_, _, Some(_)) => errs.push(
                    tp.clone(),
                    "either cert and key, or certs: [{cert, key}, ...], not both",
                ),
                (Some(_), None, None) => errs.push(tp.key("key"), "cert needs its key"),
                (None, Some(_), None) => errs.push(tp.key("cert"), "key needs its cert"),
                (None, None, None) => errs.push(tp.clone(), "cert and key are required"),
            }
            TlsConfig { certs }
        });
        let redirect_https = l.redirect_https.unwrap_or(false);
        if redirect_https && tls.is_some() {
            errs.push(
                p.key("redirect_https"),
                "is for a plain listener: this one already serves https",
            );
        }
        if l.http2 == Some(true) && tls.is_none() {
            errs.push(
                p.key("http2"),
                "HTTP/2 is offered by TLS ALPN; set tls on this listener or remove http2",
            );
        }
        let http2 = tls.is_some() && l.http2.unwrap_or(true);
        out.push(ListenConfig {
            addr,
            tls,
            http2,
            redirect_https,
        });
    }
    out
}

fn control(raw: Option<&raw::Control>, path: &FieldPath, errs: &mut Errors) -> ControlConfig {
    let socket = match raw.and_then(|c| c.socket.as_deref()) {
        None => PathBuf::from("./switchyard.sock"),
        Some("") => {
            errs.push(path.key("socket"), "must not be empty");
            PathBuf::new()
        }
        Some(s) => PathBuf::from(s),
    };
    let mode = match raw.and_then(|c| c.mode.as_deref()) {
        None => 0o600,
        Some(m) => match u32::from_str_radix(m.trim_start_matches("0o"), 8) {
            Ok(v) if v <= 0o777 => v,
            _ => {
                errs.push(
                    path.key("mode"),
                    format!("{m:?} is not an octal file mode such as \"0600\""),
                );
                0o600
            }
        },
    };
    ControlConfig { socket, mode }
}

fn admin(raw: Option<&raw::Admin>, path: &FieldPath, errs: &mut Errors) -> AdminConfig {
    let listen = match raw.and_then(|a| a.listen.as_deref()) {
        None => Some(SocketAddr::from(([127, 0, 0, 1], 9091))),
        Some("off") => None,
        Some(s) => match s.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                errs.push(path.key("listen"), format!("{s:?} is not ip:port (or off)"));
                None
            }
        },
    };
    AdminConfig { listen }
}

fn upstream(name: &str, u: &raw::Upstream, path: &FieldPath, errs: &mut Errors) -> UpstreamConfig {
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
        || name.is_empty()
    {
        errs.push(
            path.clone(),
            format!("upstream name {name:?} may only contain letters, digits, '_', '-', '.'"),
        );
    }
    let ppath = path.key("pools");
    if u.pools.is_empty() {
        errs.push(ppath.clone(), "at least one pool is required");
    }
    let mut pools = Vec::new();
    for (pname, addrs) in &u.pools {
        let pp = ppath.key(pname);
        if !is_pool_name(pname) {
            errs.push(
                pp.clone(),
                format!("pool name {pname:?} may only contain letters, digits, '_', '-'"),
            );
        }
        let mut instances: Vec<InstanceAddr> = Vec::new();
        for (i, a) in addrs.iter().enumerate() {
            match a.parse::<InstanceAddr>() {
                Ok(ia) if instances.contains(&ia) => {
                    errs.push(pp.index(i), format!("{a:?} is listed twice in this pool"));
                }
                Ok(ia) => instances.push(ia),
                Err(e) => errs.push(pp.index(i), e.to_string()),
            }
        }
        pools.push(PoolConfig {
            name: pname.clone(),
            instances,
        });
    }
    let pool_names = || {
        u.pools
            .keys()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let active = match (&u.active, u.pools.len()) {
        (Some(a), _) if u.pools.contains_key(a) => {
            if u.pools[a].is_empty() {
                errs.push(
                    ppath.key(a),
                    format!("the active pool {a:?} has no instances"),
                );
            }
            a.clone()
        }
        (Some(a), _) => {
            errs.push(
                path.key("active"),
                format!("unknown pool {a:?} (pools: {})", pool_names()),
            );
            a.clone()
        }
        (None, 1) => {
            let only = u.pools.keys().next().cloned().unwrap_or_default();
            if u.pools[&only].is_empty() {
                errs.push(ppath.key(&only), "the only pool has no instances");
            }
            only
        }
        (None, 0) => String::new(),
        (None, _) => {
            errs.push(
                path.key("active"),
                format!(
                    "required when there is more than one pool (pools: {})",
                    pool_names()
                ),
            );
            String::new()
        }
    };

    let d = |key: &str, v: &Option<String>, default: Duration, errs: &mut Errors| {
        duration(v.as_deref(), &path.key(key), default, false, errs)
    };
    let resolve_interval = d("resolve_interval", &u.resolve_interval, secs(5), errs);
    let connect_timeout = d("connect_timeout", &u.connect_timeout, secs(2), errs);
    let read_timeout = d("read_timeout", &u.read_timeout, secs(60), errs);
    let idle_timeout = d("idle_timeout", &u.idle_timeout, secs(15), errs);
    let drain_timeout = d("drain_timeout", &u.drain_timeout, secs(30), errs);
    let balance = match u.balance.as_deref() {
        None | Some("round_robin") => Balance::RoundRobin,
        Some("least_requests") => Balance::LeastRequests,
        Some(other) => {
            errs.push(
                path.key("balance"),
                format!("unknown balance {other:?} (expected round_robin or least_requests)"),
            );
            Balance::RoundRobin
        }
    };
    let retries = ranged(u.retries, &path.key("retries"), 1, 0..=10, errs);

    UpstreamConfig {
        name: name.to_string(),
        pools,
        active,
        resolve_interval,
        balance,
        connect_timeout,
        read_timeout,
        idle_timeout,
        retries,
        drain_timeout,
        health: health(u.health.as_ref(), &path.key("health"), errs),
        passive: passive(u.passive.as_ref(), &path.key("passive"), errs),
        canary: canary(u.canary.as_ref(), &path.key("canary"), errs),
        preview: preview(u.preview.as_ref(), &path.key("preview"), errs),
        steps: match &u.steps {
            None => DEFAULT_STEPS.to_vec(),
            Some(list) => {
                if let Err(e) = check_steps(list) {
                    errs.push(path.key("steps"), e);
                }
                list.clone()
            }
        },
        step_interval: d("step_interval", &u.step_interval, secs(600), errs),
    }
}

/// The steps of a rollout when none are configured.
pub const DEFAULT_STEPS: [u32; 4] = [5, 25, 50, 100];

/// The rules for rollout steps (config `steps` and `proxyctl canary --steps`): at least one,
/// each 1..=100, strictly increasing, the last 100 — a rollout ends with the canary taking all
/// the traffic (to hold at a share, use `proxyctl weight`).
pub fn check_steps(steps: &[u32]) -> Result<(), String> {
    let shown = || {
        steps
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    if steps.is_empty() {
        return Err("no steps: give at least one, ending at 100 (e.g. 5,25,50,100)".into());
    }
    if steps.len() > 100 {
        return Err(format!("{} steps; at most 100", steps.len()));
    }
    if let Some(s) = steps.iter().find(|s| !(1..=100).contains(*s)) {
        return Err(format!("step {s} in [{}] is not in 1..=100", shown()));
    }
    if steps.windows(2).any(|w| w[1] <= w[0]) {
        return Err(format!("steps [{}] must be strictly increasing", shown()));
    }
    if steps.last() != Some(&100) {
        return Err(format!(
            "steps [{}] must end at 100: a rollout ends with the canary taking all traffic",
            shown()
        ));
    }
    Ok(())
}

fn health(raw: Option<&raw::Health>, path: &FieldPath, errs: &mut Errors) -> HealthConfig {
    let def = raw::Health::default();
    let h = raw.unwrap_or(&def);
    let hpath = match h.path.as_deref() {
        None => "/actuator/health".to_string(),
        Some(p) if p.starts_with('/') && !p.contains(char::is_whitespace) => p.to_string(),
        Some(p) => {
            errs.push(
                path.key("path"),
                format!("{p:?} must start with / and contain no spaces"),
            );
            String::new()
        }
    };
    let interval = duration(
        h.interval.as_deref(),
        &path.key("interval"),
        secs(2),
        false,
        errs,
    );
    let timeout = duration(
        h.timeout.as_deref(),
        &path.key("timeout"),
        secs(1),
        false,
        errs,
    );
    if timeout > interval {
        errs.push(
            path.key("timeout"),
            format!(
                "{} is longer than interval {}",
                humantime::format_duration(timeout),
                humantime::format_duration(interval)
            ),
        );
    }
    let threshold = |key: &str, v: Option<u32>, default: u32, errs: &mut Errors| {
        ranged(v, &path.key(key), default, 1..=100, errs)
    };
    let healthy_threshold = threshold("healthy_threshold", h.healthy_threshold, 2, errs);
    let unhealthy_threshold = threshold("unhealthy_threshold", h.unhealthy_threshold, 3, errs);
    let expect_status = h.expect_status.clone().unwrap_or_else(|| vec![200]);
    if expect_status.is_empty() {
        errs.push(
            path.key("expect_status"),
            "at least one status code is required",
        );
    }
    for (i, s) in expect_status.iter().enumerate() {
        if !(100..=599).contains(s) {
            errs.push(
                path.key("expect_status").index(i),
                format!("{s} is not an HTTP status (100..=599)"),
            );
        }
    }
    HealthConfig {
        path: hpath,
        interval,
        timeout,
        healthy_threshold,
        unhealthy_threshold,
        expect_status,
        expect_json_status: h
            .expect_json_status
            .clone()
            .unwrap_or_else(|| vec!["UP".to_string()]),
    }
}

fn passive(raw: Option<&raw::Passive>, path: &FieldPath, errs: &mut Errors) -> PassiveConfig {
    PassiveConfig {
        consecutive_failures: ranged(
            raw.and_then(|p| p.consecutive_failures),
            &path.key("consecutive_failures"),
            5,
            0..=1000,
            errs,
        ),
        eject_for: duration(
            raw.and_then(|p| p.eject_for.as_deref()),
            &path.key("eject_for"),
            secs(30),
            false,
            errs,
        ),
    }
}

fn canary(raw: Option<&raw::Canary>, path: &FieldPath, errs: &mut Errors) -> CanaryConfig {
    let def = raw::Canary::default();
    let c = raw.unwrap_or(&def);
    let sticky = match c.sticky.as_deref() {
        None | Some("cookie") => Sticky::Cookie,
        Some("none") => Sticky::None,
        Some(s) => match s.strip_prefix("header:") {
            Some(h) if is_token(h) => Sticky::Header(h.to_string()),
            _ => {
                errs.push(
                    path.key("sticky"),
                    format!("{s:?} is not none, cookie or header:<Name>"),
                );
                Sticky::None
            }
        },
    };
    let cookie = c.cookie.clone().unwrap_or_else(|| "switchyard_pool".into());
    if !is_token(&cookie) {
        errs.push(
            path.key("cookie"),
            format!("{cookie:?} is not a valid cookie name"),
        );
    }
    let force_header = c.force_header.clone().unwrap_or_else(|| "X-Canary".into());
    if !is_token(&force_header) {
        errs.push(
            path.key("force_header"),
            format!("{force_header:?} is not a valid header name"),
        );
    }
    let def = raw::AutoRollback::default();
    let a = c.auto_rollback.as_ref().unwrap_or(&def);
    let apath = path.key("auto_rollback");
    let error_rate = a.error_rate.unwrap_or(0.05);
    if !(0.0..=1.0).contains(&error_rate) {
        errs.push(
            apath.key("error_rate"),
            format!("{error_rate} is out of range 0..=1"),
        );
    }
    let hold_for = duration(a.for_.as_deref(), &apath.key("for"), secs(120), false, errs);
    let window = duration(
        a.window.as_deref(),
        &apath.key("window"),
        secs(60),
        false,
        errs,
    );
    if window < Duration::from_millis(100) {
        errs.push(
            apath.key("window"),
            format!("{window:?} is shorter than 100ms; the window is measured in sixths"),
        );
    }
    let latency_p99 = a
        .latency_p99
        .as_deref()
        .map(|s| duration(Some(s), &apath.key("latency_p99"), secs(1), false, errs));
    CanaryConfig {
        sticky,
        cookie,
        force_header,
        analysis: AnalysisConfig {
            error_rate,
            relative_to_main: c.relative_to_main.unwrap_or(false),
            hold_for,
            window,
            min_requests: a.min_requests.unwrap_or(20),
            latency_p99,
        },
        auto_rollback: a.enabled != Some(false),
    }
}

fn preview(raw: Option<&raw::Preview>, path: &FieldPath, errs: &mut Errors) -> PreviewConfig {
    let header = raw
        .and_then(|p| p.header.clone())
        .unwrap_or_else(|| "X-Switchyard-Pool".into());
    if !is_token(&header) {
        errs.push(
            path.key("header"),
            format!("{header:?} is not a valid header name"),
        );
    }
    let allow_from = match raw.and_then(|p| p.allow_from.as_ref()) {
        None => vec![
            "127.0.0.0/8".parse::<IpNet>().map_err(|_| ()),
            "::1/128".parse::<IpNet>().map_err(|_| ()),
        ]
        .into_iter()
        .flatten()
        .collect(),
        Some(list) => list
            .iter()
            .enumerate()
            .filter_map(|(i, s)| match s.parse::<IpNet>() {
                Ok(n) => Some(n),
                Err(_) => match s.parse::<std::net::IpAddr>() {
                    Ok(ip) => Some(IpNet::from(ip)),
                    Err(_) => {
                        errs.push(
                            path.key("allow_from").index(i),
                            format!("{s:?} is not a network (CIDR such as 10.0.0.0/8) or an IP"),
                        );
                        None
                    }
                },
            })
            .collect(),
    };
    PreviewConfig { header, allow_from }
}

fn deny(raw: Option<&raw::Deny>, path: &FieldPath, errs: &mut Errors) -> DenyConfig {
    let status = match raw.and_then(|d| d.status) {
        None => 403,
        Some(s @ 400..=599) => s,
        Some(s) => {
            errs.push(
                path.key("status"),
                format!("{s} is not an error status (400..=599)"),
            );
            403
        }
    };
    let paths = raw
        .map(|d| d.paths.as_slice())
        .unwrap_or_default()
        .iter()
        .enumerate()
        .filter_map(|(i, p)| match regex::Regex::new(p) {
            Ok(r) => Some(r),
            Err(e) => {
                // The regex error is multi-line (pattern, caret, message); keep its last line.
                let msg = e.to_string();
                let why = msg.lines().last().unwrap_or("").trim().to_string();
                errs.push(
                    path.key("paths").index(i),
                    format!("invalid regex {p:?}: {why}"),
                );
                None
            }
        })
        .collect();
    DenyConfig { status, paths }
}

/// No duration is longer: deadlines are computed as `now + duration`, which must not overflow.
const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// A size in bytes: a number, or a number with `k`, `m` or `g` (nginx's units, powers of 1024,
/// either case).
fn size(v: Option<&crate::raw::Size>, path: &FieldPath, default: u64, errs: &mut Errors) -> u64 {
    use crate::raw::Size;
    let text = match v {
        None => return default,
        Some(Size::Bytes(n)) => return *n,
        Some(Size::Text(t)) => t.trim(),
    };
    let (digits, shift) = match text.as_bytes().last() {
        Some(b'k' | b'K') => (&text[..text.len() - 1], 10),
        Some(b'm' | b'M') => (&text[..text.len() - 1], 20),
        Some(b'g' | b'G') => (&text[..text.len() - 1], 30),
        _ => (text, 0),
    };
    let digits_only = !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit());
    match digits
        .parse::<u64>()
        .ok()
        .filter(|_| digits_only)
        .and_then(|n| n.checked_mul(1u64 << shift))
    {
        Some(n) => n,
        None => {
            errs.push(
                path.clone(),
                format!("{text:?} is not a size such as 1048576, 512k, 10m or 1g (0 = unlimited)"),
            );
            default
        }
    }
}

/// Parse a duration such as `500ms`, `2s`, `5m`, `1h 30m`.
fn duration(
    v: Option<&str>,
    path: &FieldPath,
    default: Duration,
    zero_ok: bool,
    errs: &mut Errors,
) -> Duration {
    let Some(s) = v else { return default };
    match humantime::parse_duration(s) {
        Ok(d) if d > MAX_DURATION => {
            errs.push(
                path.clone(),
                format!("{s:?} is longer than the longest duration accepted, 365 days"),
            );
            default
        }
        Ok(d) if d.is_zero() && !zero_ok => {
            errs.push(path.clone(), format!("{s:?} must be greater than zero"));
            default
        }
        Ok(d) => d,
        Err(_) => {
            errs.push(
                path.clone(),
                format!("{s:?} is not a duration such as 500ms, 2s or 5m"),
            );
            default
        }
    }
}

/// A number within `range`, `default` when absent; out of range is an error (the default is
/// used so validation can go on and report everything).
fn ranged<T: PartialOrd + Copy + std::fmt::Display>(
    v: Option<T>,
    path: &FieldPath,
    default: T,
    range: std::ops::RangeInclusive<T>,
    errs: &mut Errors,
) -> T {
    match v {
        None => default,
        Some(n) if range.contains(&n) => n,
        Some(n) => {
            errs.push(
                path.clone(),
                format!("{n} is out of range {}..={}", range.start(), range.end()),
            );
            default
        }
    }
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn is_pool_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// An HTTP token (header or cookie name).
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}
