//! The access log: one line per request, nginx `combined` with switchyard's fields appended, or
//! one JSON object per line.
//!
//! Lines are formatted on the worker thread and handed to a writer thread through a bounded
//! channel (`try_send`): when the writer falls behind (a slow disk, a blocked stdout pipe) the
//! line is dropped and counted in `switchyard_access_log_dropped_total` — logging never stalls
//! a request. A file log is reopened on SIGUSR1 ([`AccessLog::reopen`]), the logrotate
//! convention.
//!
//! Combined format (the first part is byte-compatible with nginx's `combined`):
//!
//! ```text
//! 127.0.0.1 - - [28/Nov/2026:06:33:10 +0000] "GET /users?id=1 HTTP/1.1" 200 41 "-" "curl/8.0"
//!   rt=0.002 upstream=app pool=blue instance=127.0.0.1:8081 error=- rid=4bf92f35-77b3-...
//! ```
//! (one line; `rt` in seconds; `upstream`/`pool`/`instance` are `-` for requests answered by
//! the proxy itself; `error` names what went wrong upstream, e.g. `connection_refused`; `rid`
//! is the request id, `-` only for a request refused before its head was read).

use arc_swap::ArcSwap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use switchyard_config::{AccessLog as Destination, AccessLogFormat};

/// Lines buffered between the workers and the writer.
const QUEUE: usize = 16 * 1024;

/// One finished request.
#[derive(Debug)]
pub(crate) struct Entry<'a> {
    pub(crate) time: SystemTime,
    pub(crate) client: Option<std::net::IpAddr>,
    pub(crate) method: &'a str,
    pub(crate) target: &'a str,
    pub(crate) version: &'a str,
    pub(crate) status: u16,
    pub(crate) bytes: usize,
    pub(crate) referer: Option<&'a str>,
    pub(crate) user_agent: Option<&'a str>,
    pub(crate) host: Option<&'a str>,
    pub(crate) duration: Duration,
    pub(crate) upstream: Option<&'a str>,
    pub(crate) pool: Option<&'a str>,
    pub(crate) instance: Option<&'a str>,
    pub(crate) error: Option<&'a str>,
    /// The request id (`request_id`).
    pub(crate) request_id: Option<&'a str>,
}

/// The request-path side of the access log. A reload may change the destination or the
/// format: the sink is swapped atomically; the old writer thread ends once its queue drains.
#[derive(Debug)]
pub(crate) struct AccessLog {
    sink: ArcSwap<Sink>,
    dropped: prometheus::IntCounter,
}

/// One destination and format, with its writer thread.
#[derive(Debug)]
struct Sink {
    dest: Destination,
    tx: Option<SyncSender<String>>,
    format: AccessLogFormat,
    reopen: Arc<AtomicBool>,
}

impl Sink {
    fn start(dest: &Destination, format: AccessLogFormat) -> std::io::Result<Sink> {
        let reopen = Arc::new(AtomicBool::new(false));
        let tx = match dest {
            Destination::Off => None,
            Destination::Stdout => Some(spawn_writer(None, reopen.clone())?),
            Destination::File(p) => {
                open(p)?; // fail now, not at the first request
                Some(spawn_writer(Some(p.clone()), reopen.clone())?)
            }
        };
        Ok(Sink {
            dest: dest.clone(),
            tx,
            format,
            reopen,
        })
    }
}

impl AccessLog {
    /// Start the writer thread for `dest` (nothing for `off`).
    pub(crate) fn start(
        dest: &Destination,
        format: AccessLogFormat,
        dropped: prometheus::IntCounter,
    ) -> std::io::Result<AccessLog> {
        Ok(AccessLog {
            sink: ArcSwap::from_pointee(Sink::start(dest, format)?),
            dropped,
        })
    }

    /// Switch to `dest` and `format` (a reload). A new destination gets a new writer thread;
    /// an error (the file cannot be opened) leaves the current one in place.
    pub(crate) fn reconfigure(
        &self,
        dest: &Destination,
        format: AccessLogFormat,
    ) -> std::io::Result<()> {
        let cur = self.sink.load();
        if cur.dest == *dest && cur.format == format {
            return Ok(());
        }
        let next = if cur.dest == *dest {
            Sink {
                dest: dest.clone(),
                tx: cur.tx.clone(),
                format,
                reopen: cur.reopen.clone(),
            }
        } else {
            Sink::start(dest, format)?
        };
        self.sink.store(Arc::new(next));
        Ok(())
    }

    /// Whether lines are written at all.
    pub(crate) fn enabled(&self) -> bool {
        self.sink.load().tx.is_some()
    }

    /// Log one request (never blocks).
    pub(crate) fn log(&self, e: &Entry<'_>) {
        let sink = self.sink.load();
        let Some(tx) = &sink.tx else { return };
        let line = match sink.format {
            AccessLogFormat::Combined => combined(e),
            AccessLogFormat::Json => json(e),
        };
        if tx.try_send(line).is_err() {
            self.dropped.inc();
        }
    }

    /// Reopen the file (after logrotate moved it).
    pub(crate) fn reopen(&self) {
        self.sink.load().reopen.store(true, Ordering::Release);
    }
}

/// Check that `dest` can be written (a reload checks before it applies anything).
pub(crate) fn check(dest: &Destination) -> std::io::Result<()> {
    match dest {
        Destination::File(p) => open(p).map(drop),
        _ => Ok(()),
    }
}

fn open(p: &std::path::Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(p)
}

fn spawn_writer(
    path: Option<PathBuf>,
    reopen: Arc<AtomicBool>,
) -> std::io::Result<SyncSender<String>> {
    let (tx, rx) = sync_channel::<String>(QUEUE);
    std::thread::Builder::new()
        .name("switchyard-access-log".into())
        .spawn(move || writer(rx, path, reopen))?;
    Ok(tx)
}

fn writer(rx: Receiver<String>, path: Option<PathBuf>, reopen: Arc<AtomicBool>) {
    let mut out: Box<dyn Write> = match &path {
        None => Box::new(std::io::stdout()),
        Some(p) => match open(p) {
            Ok(f) => Box::new(f),
            Err(e) => {
                tracing::error!(path = %p.display(), error = %e, "cannot open the access log");
                return;
            }
        },
    };
    let mut buf = Vec::with_capacity(64 * 1024);
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                buf.extend_from_slice(line.as_bytes());
                buf.push(b'\n');
                while buf.len() < 60 * 1024 {
                    let Ok(more) = rx.try_recv() else { break };
                    buf.extend_from_slice(more.as_bytes());
                    buf.push(b'\n');
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                let _ = out.write_all(&buf);
                let _ = out.flush();
                return;
            }
        }
        if !buf.is_empty() {
            if let Err(e) = out.write_all(&buf).and_then(|_| out.flush()) {
                tracing::warn!(error = %e, "cannot write the access log");
            }
            buf.clear();
        }
        if reopen.swap(false, Ordering::AcqRel) {
            if let Some(p) = &path {
                match open(p) {
                    Ok(f) => {
                        out = Box::new(f);
                        tracing::info!(path = %p.display(), "access log reopened");
                    }
                    Err(e) => {
                        tracing::error!(path = %p.display(), error = %e, "cannot reopen the access log; keeping the old file")
                    }
                }
            }
        }
    }
}

/// `28/Nov/2026:06:33:10 +0000`-style time (UTC), from the RFC 3339 rendering.
fn time_local(t: SystemTime) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let s = humantime::format_rfc3339_seconds(t).to_string(); // 2026-11-28T06:33:10Z
    let (y, rest) = s.split_at(4.min(s.len()));
    let m: usize = rest.get(1..3).and_then(|m| m.parse().ok()).unwrap_or(1);
    let d = rest.get(4..6).unwrap_or("01");
    let hms = rest.get(7..15).unwrap_or("00:00:00");
    format!(
        "{d}/{}/{y}:{hms} +0000",
        MONTHS.get(m.wrapping_sub(1)).copied().unwrap_or("Jan")
    )
}

thread_local! {
    /// The formatted time of the current second, per worker thread: formatting a date for
    /// every request is most of a combined line's cost.
    static TIME_CACHE: std::cell::RefCell<(u64, String, String)> =
        const { std::cell::RefCell::new((u64::MAX, String::new(), String::new())) };
}

/// Append the second-resolution time of `t`: nginx style, or RFC 3339 (the cached part) with
/// milliseconds added by the caller.
fn push_time(t: SystemTime, nginx: bool, out: &mut String) {
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    TIME_CACHE.with(|c| {
        let mut c = c.borrow_mut();
        if c.0 != secs {
            let whole = std::time::UNIX_EPOCH + Duration::from_secs(secs);
            c.1 = time_local(whole);
            let rfc = humantime::format_rfc3339_seconds(whole).to_string();
            c.2 = rfc.trim_end_matches('Z').to_string();
            c.0 = secs;
        }
        out.push_str(if nginx { &c.1 } else { &c.2 });
    });
}

/// nginx-style escaping of a quoted field: `"` and `\` and non-printable bytes as `\xHH`.
fn escape(s: &str, out: &mut String) {
    use std::fmt::Write;
    for b in s.bytes() {
        if b == b'"' || b == b'\\' || !(0x20..0x7f).contains(&b) {
            let _ = write!(out, "\\x{b:02X}");
        } else {
            out.push(b as char);
        }
    }
}

fn dash(v: Option<&str>) -> &str {
    v.filter(|s| !s.is_empty()).unwrap_or("-")
}

/// Unquoted `key=value` fields must not contain spaces or quotes.
fn token(v: Option<&str>, out: &mut String) {
    for c in dash(v).chars() {
        out.push(if c == ' ' || c == '"' { '_' } else { c });
    }
}

pub(crate) fn combined(e: &Entry<'_>) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(256);
    match e.client {
        Some(c) => {
            let _ = write!(s, "{c}");
        }
        None => s.push('-'),
    }
    s.push_str(" - - [");
    push_time(e.time, true, &mut s);
    s.push_str("] \"");
    escape(e.method, &mut s);
    s.push(' ');
    escape(e.target, &mut s);
    s.push(' ');
    escape(e.version, &mut s);
    let _ = write!(s, "\" {} {} \"", e.status, e.bytes);
    escape(dash(e.referer), &mut s);
    s.push_str("\" \"");
    escape(dash(e.user_agent), &mut s);
    let _ = write!(s, "\" rt={:.3} upstream=", e.duration.as_secs_f64());
    token(e.upstream, &mut s);
    s.push_str(" pool=");
    token(e.pool, &mut s);
    s.push_str(" instance=");
    token(e.instance, &mut s);
    s.push_str(" error=");
    token(e.error, &mut s);
    s.push_str(" rid=");
    token(e.request_id, &mut s);
    s
}

/// A JSON string (or null), escaped per RFC 8259.
fn json_str(v: Option<&str>, out: &mut String) {
    use std::fmt::Write;
    let Some(v) = v else {
        out.push_str("null");
        return;
    };
    out.push('"');
    for c in v.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

pub(crate) fn json(e: &Entry<'_>) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(320);
    s.push_str("{\"time\":\"");
    push_time(e.time, false, &mut s);
    let millis = e
        .time
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_millis())
        .unwrap_or(0);
    let _ = write!(s, ".{millis:03}Z\",\"client\":");
    match e.client {
        Some(c) => {
            let _ = write!(s, "\"{c}\"");
        }
        None => s.push_str("null"),
    }
    s.push_str(",\"method\":");
    json_str(Some(e.method), &mut s);
    s.push_str(",\"path\":");
    json_str(Some(e.target), &mut s);
    s.push_str(",\"protocol\":");
    json_str(Some(e.version), &mut s);
    let _ = write!(
        s,
        ",\"status\":{},\"bytes\":{},\"duration_ms\":{:.3},\"host\":",
        e.status,
        e.bytes,
        e.duration.as_secs_f64() * 1000.0
    );
    json_str(e.host, &mut s);
    for (k, v) in [
        ("referer", e.referer),
        ("user_agent", e.user_agent),
        ("upstream", e.upstream),
        ("pool", e.pool),
        ("instance", e.instance),
        ("error", e.error),
        ("request_id", e.request_id),
    ] {
        let _ = write!(s, ",\"{k}\":");
        json_str(v, &mut s);
    }
    s.push('}');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry<'static> {
        Entry {
            time: SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_847_590),
            client: Some("127.0.0.1".parse().unwrap()),
            method: "GET",
            target: "/users?id=\"1\"",
            version: "HTTP/1.1",
            status: 200,
            bytes: 41,
            referer: None,
            user_agent: Some("curl/8.0"),
            host: Some("shop.example"),
            duration: Duration::from_millis(2),
            upstream: Some("app"),
            pool: Some("blue"),
            instance: Some("127.0.0.1:8081"),
            error: None,
            request_id: Some("4bf92f35-77b3-4da6-a3ce-929d0e0e4736"),
        }
    }

    #[test]
    fn combined_is_nginx_compatible_with_fields_appended() {
        let line = combined(&entry());
        assert_eq!(
            line,
            r#"127.0.0.1 - - [28/Nov/2026:06:33:10 +0000] "GET /users?id=\x221\x22 HTTP/1.1" 200 41 "-" "curl/8.0" rt=0.002 upstream=app pool=blue instance=127.0.0.1:8081 error=- rid=4bf92f35-77b3-4da6-a3ce-929d0e0e4736"#
        );
    }

    #[test]
    fn json_has_every_field() {
        let line = json(&entry());
        let v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line}: {e}"));
        assert_eq!(v["status"], 200);
        assert_eq!(v["path"], "/users?id=\"1\"");
        assert_eq!(v["pool"], "blue");
        assert_eq!(v["duration_ms"], 2.0);
        assert_eq!(v["time"], "2026-11-28T06:33:10.000Z");
        assert!(v["error"].is_null());
        assert_eq!(v["host"], "shop.example");
        assert_eq!(v["request_id"], "4bf92f35-77b3-4da6-a3ce-929d0e0e4736");
        let mut odd = entry();
        odd.user_agent = Some("a\"b\\c\n\u{1}é");
        let v: serde_json::Value = serde_json::from_str(&json(&odd)).unwrap();
        assert_eq!(v["user_agent"], "a\"b\\c\n\u{1}é");
    }
}
