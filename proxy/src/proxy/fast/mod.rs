//! switchyard's own forwarder for the request most traffic is: HTTP/1.1, `GET` or `HEAD`, no
//! body, nothing hop-by-hop but `Connection: keep-alive`/`close`, an origin-form target.
//!
//! Why: Pingora's request path, even reduced to one loop (third_party/PATCHES.md 5), costs
//! ~52,000 instructions and 61 heap allocations per request for the smallest proxy built on it,
//! 2.8 times nginx's whole request (docs/BENCHMARKS-cost.md): it parses the head into a header
//! map (and a second, case-preserving one), clones it for the upstream, keeps a pooled
//! connection in an `Arc<Mutex>` with a task watching it, and runs a ~35 KiB state machine with
//! a dozen boxed hooks. This forwarder parses the head once with `httparse` into an array on
//! the stack, writes the upstream request straight from the client's bytes, takes an upstream
//! connection from a per-thread list ([`pool`]), and writes the response head straight from
//! the app's bytes.
//!
//! It does what the `ProxyHttp` hooks do, with the same functions where they are not tied to
//! Pingora's session: the routing decision and in-flight accounting (`Switchyard::route`),
//! instance choice and passive health (`passive`), the retry policy (`retry`), the forwarding
//! headers and path rewrite (as `forward`), the request id, the sticky cookie, the failure
//! answers (`reply`), and the access log and stats (`log::record`). A request it does not take
//! — anything else, or a route that answers by itself (deny, no route) — goes to Pingora as
//! before, untouched: nothing is read, counted or sent before the decision.
//!
//! The app sees the same request head either way (header names spelled as Pingora writes them,
//! [`TITLED`]). Where the response differs from the Pingora path (README, "The fast path"):
//! - the app's header names reach the client as the app spelled them, `Keep-Alive` is dropped
//!   (hop-by-hop, as nginx does);
//! - interim (1xx) responses of the app are not forwarded (as nginx; a request without a body
//!   has nothing to continue);
//! - a response is flushed to the client as each read of it arrives, so a head or a streamed
//!   `Content-Length` body is not held back.

mod pool;

pub(crate) use pool::set_capacity;

use super::choose::ReqHeaders;
use super::ctx::{ActiveGuard, InstanceGuard, RequestCtx};
use super::log::{record, Finished};
use super::{passive, reply, retry, Decision, Switchyard, SEND_TIMEOUT};
use crate::listen::chunked::Chunked;
use crate::listen::Conn;
use crate::routing::normalize::normalize;
use crate::routing::sticky;
use crate::upstream::health::now_ms;
use crate::upstream::Candidates;
use pingora::protocols::IO;
use pingora::server::ShutdownWatch;
use std::borrow::Cow;
use std::future::poll_fn;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Header lines a request may have to be taken (more: Pingora serves it).
const MAX_REQ_HEADERS: usize = 64;
/// Header lines of a response head read from the app (Pingora's limit).
const MAX_RESP_HEADERS: usize = 256;
/// The largest response head read from the app (Pingora's limit).
const MAX_RESP_HEAD: usize = 1024 * 1024 - 1;
/// Bytes asked for by one read of the app's response.
const READ_CHUNK: usize = 16 * 1024;

/// How a request offered to the fast path ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Served {
    /// Not taken: the head is back in the buffer, Pingora serves the request.
    Declined,
    /// Answered; the connection may carry the next request.
    KeepAlive,
    /// Answered or abandoned; close the connection.
    Close,
}

/// What the proxy knows of the client's connection.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Peer {
    pub(crate) client: Option<IpAddr>,
    pub(crate) tls: bool,
}

/// Why an upstream attempt failed, as Pingora's error types name it (the same words reach the
/// client and the access log, `reply::describe`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UpFail {
    ConnectRefused,
    ConnectTimedout,
    ConnectNoRoute,
    ConnectError,
    ReadTimedout,
    WriteTimedout,
    /// Closed, reset, or a read or write error.
    Closed,
    /// A response head or body framing the proxy cannot accept.
    Invalid,
}

impl UpFail {
    fn describe(self) -> &'static str {
        match self {
            UpFail::ConnectRefused => "connection refused",
            UpFail::ConnectTimedout => "connect timeout",
            UpFail::ConnectNoRoute => "no route to host",
            UpFail::ConnectError => "cannot connect",
            UpFail::ReadTimedout => "upstream read timeout",
            UpFail::WriteTimedout => "upstream write timeout",
            UpFail::Closed => "upstream closed the connection",
            UpFail::Invalid => "upstream error",
        }
    }

    /// The status a client gets (`reply::failure_status`).
    fn status(self) -> u16 {
        match self {
            UpFail::ReadTimedout | UpFail::WriteTimedout => 504,
            _ => 502,
        }
    }

    fn connect(e: &io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::ConnectionRefused => UpFail::ConnectRefused,
            io::ErrorKind::TimedOut => UpFail::ConnectTimedout,
            io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => {
                UpFail::ConnectNoRoute
            }
            _ => UpFail::ConnectError,
        }
    }
}

/// The end of an exchange with the app that produced no usable response head.
enum Exchange {
    /// The client went away while the app worked.
    ClientGone,
    /// The attempt failed; `broke`: before any response byte, on a closed or broken
    /// connection (a retry may help).
    Upstream { fail: UpFail, broke: bool },
}

/// How the app's response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    None,
    Length(u64),
    Chunked,
    /// Until the app closes: re-chunked for the client (as Pingora does), so the client's
    /// connection stays open.
    Close,
    /// Until the app closes, under a transfer coding other than chunked: passed as it is, and
    /// the client's connection ends with it.
    Raw,
}

/// A request the fast path takes, as read from its head.
struct Taken<'h> {
    method: &'h str,
    target: &'h str,
    headers: &'h [httparse::Header<'h>],
    /// The client asked for `Connection: close`.
    close: bool,
}

/// Whether the fast path takes this parsed head (see the module docs), and what it needs.
fn take<'h>(req: &'h httparse::Request<'h, 'h>) -> Option<Taken<'h>> {
    if req.version != Some(1) {
        return None;
    }
    let method = req.method?;
    if method != "GET" && method != "HEAD" {
        return None;
    }
    let target = req.path?;
    // Origin-form, and only bytes `http::Uri` takes as they are (so the path routed here is
    // the path Pingora's `uri.path()` would give).
    if !target.starts_with('/')
        || !target.bytes().all(|b| {
            (0x21..0x7f).contains(&b)
                && !matches!(
                    b,
                    b'"' | b'#' | b'<' | b'>' | b'\\' | b'^' | b'`' | b'{' | b'|' | b'}'
                )
        })
    {
        return None;
    }
    let mut close = false;
    for h in req.headers.iter() {
        let n = h.name.as_bytes();
        if n.contains(&b'_') {
            return None; // dropped by `forward`: let it do that
        }
        if n.eq_ignore_ascii_case(b"connection") {
            for t in h.value.split(|b| *b == b',').map(<[u8]>::trim_ascii) {
                if t.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if !t.eq_ignore_ascii_case(b"keep-alive") && !t.is_empty() {
                    return None; // nominates a header to drop
                }
            }
        } else if [
            &b"keep-alive"[..],
            b"proxy-connection",
            b"proxy-authorization",
            b"proxy-authenticate",
            b"te",
            b"trailer",
            b"transfer-encoding",
            b"upgrade",
            b"http2-settings",
            b"content-length",
            b"expect",
        ]
        .iter()
        .any(|hop| n.eq_ignore_ascii_case(hop))
        {
            return None;
        }
    }
    Some(Taken {
        method,
        target,
        headers: req.headers,
        close,
    })
}

fn utf8(v: Option<&[u8]>) -> Option<&str> {
    v.and_then(|v| std::str::from_utf8(v).ok())
}

/// Offer the request whose head `h` is buffered in `conn` to the fast path.
pub(crate) async fn serve<S: IO>(
    sy: &Switchyard,
    conn: &mut Conn<S>,
    h: &crate::listen::head::Head,
    peer: Peer,
    shutdown: &ShutdownWatch,
) -> Served {
    let raw = conn.take_head(h);
    let mut headers = [httparse::EMPTY_HEADER; MAX_REQ_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let parsed = matches!(req.parse(&raw[h.skip..]), Ok(httparse::Status::Complete(_)));
    let Some(t) = parsed.then(|| take(&req)).flatten() else {
        conn.put_back(raw);
        return Served::Declined;
    };
    // Routing, as `request_filter`: on the normalized path, by host when some route names one.
    let path = &t.target[..t.target.find('?').unwrap_or(t.target.len())];
    let normalized = match normalize(path) {
        Cow::Owned(p) => Some(p),
        Cow::Borrowed(_) => None,
    };
    let host = t.headers.value(&http::header::HOST);
    let (snap, decision) = sy.route(
        normalized.as_deref().unwrap_or(path),
        host,
        t.headers,
        peer.client,
    );
    let Decision::Pool {
        route,
        upstream,
        choice,
        guard,
    } = decision
    else {
        drop(decision);
        conn.put_back(raw);
        return Served::Declined;
    };
    // Taken: counted before anything reaches the client.
    sy.fast_served
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    if choice.preview_refused {
        sy.metrics
            .preview_refused
            .with_label_values(&[upstream.name()])
            .inc();
    }
    let ka = snap.config.keepalive_timeout;
    let keepalive = !t.close && !ka.is_zero();
    let id = super::request_id::of_bytes(t.headers.value(&snap.request_id));
    let mut ctx = RequestCtx {
        _active: Some(ActiveGuard::new(&sy.active)),
        started: Some(std::time::Instant::now()),
        request_id: Some((snap.request_id_spelled.clone(), id)),
        set_cookie: choice.set_cookie,
        normalized,
        pool: Some(choice.pool),
        pool_guard: Some(guard),
        route: Some(route),
        upstream: Some(upstream.clone()),
        snapshot: Some(snap.clone()),
        ..Default::default()
    };
    let request = upstream_request(&t, &ctx, peer);
    let mut out = Outcome::default();
    let keep = proxy(
        sy, conn, &t, &request, &mut ctx, peer, keepalive, shutdown, &mut out,
    )
    .await;
    let error = out.error.map(|e| match e {
        LogError::Client => Cow::Borrowed("client_error"),
        LogError::Cause(c) => Cow::Owned(c.replace(' ', "_")),
    });
    let f = Finished {
        status: out.status,
        bytes: out.bytes,
        error: error.as_deref(),
        app_had_it: ctx.request_sent || out.from_upstream,
        client: peer.client,
        method: t.method,
        target: t.target,
        version: "HTTP/1.1",
        referer: utf8(t.headers.value(&http::header::REFERER)),
        user_agent: utf8(t.headers.value(&http::header::USER_AGENT)),
        host: utf8(host),
    };
    record(&f, &mut ctx, &sy.metrics.unrouted, &sy.access_log);
    tracing::trace!(
        method = t.method,
        target = t.target,
        status = out.status,
        bytes = out.bytes,
        instance = ctx.instance.as_ref().map(|i| i.label.as_str()),
        error = f.error,
        keep,
        "fast path: request done"
    );
    if keep {
        Served::KeepAlive
    } else {
        Served::Close
    }
}

/// The access log's `error` for a request that failed.
#[derive(Debug, Clone, Copy)]
enum LogError {
    Client,
    Cause(&'static str),
}

/// What the client got.
#[derive(Debug)]
struct Outcome {
    /// The status sent (499: none).
    status: u16,
    /// Body bytes sent.
    bytes: usize,
    error: Option<LogError>,
    /// It failed at an instance (a connect or an exchange), not for want of one: the canary
    /// analysis counts its whole time as the app's (`log::record`), as Pingora's
    /// `ErrorSource::Upstream`.
    from_upstream: bool,
}

impl Default for Outcome {
    fn default() -> Self {
        Outcome {
            status: 499,
            bytes: 0,
            error: None,
            from_upstream: false,
        }
    }
}

/// The request head as it goes upstream (`forward::upstream_request`'s rules): origin-form on
/// the routed path (normalized, the route's rewrite applied), the client's headers in their
/// order and spelling but for `Connection` and those set here, then the forwarding headers and
/// the request id.
fn upstream_request(t: &Taken<'_>, ctx: &RequestCtx, peer: Peer) -> Vec<u8> {
    let mut target: Cow<'_, [u8]> = Cow::Borrowed(t.target.as_bytes());
    if let Some(norm) = &ctx.normalized {
        let mut v = norm.as_bytes().to_vec();
        if let Some(q) = t.target.find('?') {
            v.extend_from_slice(&t.target.as_bytes()[q..]);
        }
        target = Cow::Owned(v);
    }
    if let (Some(snap), Some(ri)) = (&ctx.snapshot, ctx.route) {
        if let Some(path) = snap.routes.get(ri).and_then(|r| r.rewrite(&target)) {
            target = Cow::Owned(path);
        }
    }
    let id_name = ctx.snapshot.as_ref().map(|s| s.request_id.as_str());
    let mut out = Vec::with_capacity(t.target.len() + 64 * t.headers.len().max(4) + 256);
    out.extend_from_slice(t.method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(&target);
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut host: Option<&[u8]> = None;
    let mut prior_xff = false;
    for h in t.headers {
        let n = h.name;
        if n.eq_ignore_ascii_case("host") {
            host = Some(h.value);
        }
        if n.eq_ignore_ascii_case("connection")
            || n.eq_ignore_ascii_case("x-forwarded-for")
            || n.eq_ignore_ascii_case("x-real-ip")
            || n.eq_ignore_ascii_case("x-forwarded-proto")
            || n.eq_ignore_ascii_case("x-forwarded-host")
            || id_name.is_some_and(|id| n.eq_ignore_ascii_case(id))
        {
            continue;
        }
        name_as_pingora_writes_it(&mut out, n);
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value);
        out.extend_from_slice(b"\r\n");
    }
    if let Some(ip) = peer.client {
        let mut buf = [0u8; super::forward::IPV4_TEXT_MAX];
        let v6;
        let text: &[u8] = match ip {
            IpAddr::V4(v4) => super::forward::ipv4_text(v4, &mut buf),
            IpAddr::V6(v6_ip) => {
                v6 = v6_ip.to_string();
                v6.as_bytes()
            }
        };
        // Appended to what the client sent, never its list alone (fail closed).
        out.extend_from_slice(b"x-forwarded-for: ");
        for v in t
            .headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("x-forwarded-for"))
            .map(|h| h.value.trim_ascii())
            .filter(|v| !v.is_empty())
        {
            if prior_xff {
                out.extend_from_slice(b", ");
            }
            out.extend_from_slice(v);
            prior_xff = true;
        }
        if prior_xff {
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(text);
        out.extend_from_slice(b"\r\nx-real-ip: ");
        out.extend_from_slice(text);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(if peer.tls {
        b"x-forwarded-proto: https\r\n"
    } else {
        b"x-forwarded-proto: http\r\n"
    });
    if let Some(h) = host {
        out.extend_from_slice(b"x-forwarded-host: ");
        out.extend_from_slice(h);
        out.extend_from_slice(b"\r\n");
    }
    if let (Some((_, value)), Some(name)) = (&ctx.request_id, id_name) {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// Header names Pingora writes titled; it writes every other name of a request it rebuilt
/// lowercase (`forward`). The fast path writes them the same way, so the app sees one spelling
/// whichever path a request took.
const TITLED: [&str; 12] = [
    "Accept-Ranges",
    "Age",
    "Cache-Control",
    "Connection",
    "Content-Type",
    "Content-Encoding",
    "Content-Length",
    "Date",
    "Transfer-Encoding",
    "Host",
    "Server",
    "Set-Cookie",
];

fn name_as_pingora_writes_it(out: &mut Vec<u8>, name: &str) {
    match TITLED.iter().find(|t| t.eq_ignore_ascii_case(name)) {
        Some(t) => out.extend_from_slice(t.as_bytes()),
        None => out.extend(name.bytes().map(|b| b.to_ascii_lowercase())),
    }
}

/// Connect to an instance within `limit`.
async fn connect(addr: SocketAddr, limit: Duration) -> Result<TcpStream, UpFail> {
    match tokio::time::timeout(limit, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(s)
        }
        Ok(Err(e)) => Err(UpFail::connect(&e)),
        Err(_) => Err(UpFail::ConnectTimedout),
    }
}

/// A response head read from the app: where it ends in the buffer, and what the proxy needs
/// of it.
struct RespHead {
    len: usize,
    status: u16,
    framing: Framing,
    /// The app keeps the connection open after this response.
    reusable: bool,
}

/// The response parser, as lenient as Pingora's with an app's answer: a space before a header's
/// colon, and obsolete line folding (unfolded when the head is copied, `response_head`).
fn response_parser() -> httparse::ParserConfig {
    let mut p = httparse::ParserConfig::default();
    p.allow_spaces_after_header_name_in_responses(true)
        .allow_obsolete_multiline_headers_in_responses(true);
    p
}

/// Parse a response head at the start of `buf`. `Ok(None)`: incomplete.
fn parse_response(buf: &[u8], head_request: bool) -> Result<Option<RespHead>, UpFail> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_RESP_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let len = match response_parser().parse_response(&mut resp, buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(UpFail::Invalid),
    };
    let status = resp.code.ok_or(UpFail::Invalid)?;
    let http11 = resp.version == Some(1);
    let mut length: Option<u64> = None;
    let mut te = false;
    let mut chunked = false;
    let mut close = !http11;
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            // Identical duplicates and comma lists of one value are accepted, as Pingora does.
            for v in h.value.split(|b| *b == b',').map(<[u8]>::trim_ascii) {
                let n = std::str::from_utf8(v)
                    .ok()
                    .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|s| s.parse::<u64>().ok())
                    .ok_or(UpFail::Invalid)?;
                if length.is_some_and(|l| l != n) {
                    return Err(UpFail::Invalid);
                }
                length = Some(n);
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            te = true;
            chunked = h
                .value
                .rsplit(|b| *b == b',')
                .next()
                .is_some_and(|c| c.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if h.name.eq_ignore_ascii_case("connection") {
            for t in h.value.split(|b| *b == b',').map(<[u8]>::trim_ascii) {
                if t.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if t.eq_ignore_ascii_case(b"keep-alive") && !http11 {
                    close = false;
                }
            }
        }
    }
    let framing = if head_request || status == 204 || status == 304 || (100..200).contains(&status)
    {
        Framing::None
    } else if te {
        if chunked {
            Framing::Chunked
        } else {
            // Another coding last: the body ends with the connection.
            Framing::Raw
        }
    } else {
        match length {
            Some(0) => Framing::None,
            Some(n) => Framing::Length(n),
            None => Framing::Close,
        }
    };
    Ok(Some(RespHead {
        len,
        status,
        // (A `Transfer-Encoding` in an HTTP/1.0 answer: read as it says, never reused,
        // RFC 9112 §6.1.)
        reusable: !close && (http11 || !te) && !matches!(framing, Framing::Close | Framing::Raw),
        framing,
    }))
}

/// Write `data` to the client within [`SEND_TIMEOUT`], and flush.
async fn send<S: IO>(conn: &mut Conn<S>, data: &[u8]) -> bool {
    let w = async {
        conn.write_all(data).await?;
        conn.flush().await
    };
    matches!(tokio::time::timeout(SEND_TIMEOUT, w).await, Ok(Ok(())))
}

/// Read from the app within `limit`, appending to `buf`; watch the client meanwhile.
/// `Ok(0)`: the app closed.
async fn read_up<S: IO>(
    up: &mut TcpStream,
    buf: &mut Vec<u8>,
    limit: Duration,
    conn: &mut Conn<S>,
) -> Result<usize, Exchange> {
    if buf.capacity() - buf.len() < READ_CHUNK / 2 {
        buf.reserve(READ_CHUNK);
    }
    let read = tokio::time::timeout(limit, up.read_buf(buf));
    tokio::pin!(read);
    let gone = poll_fn(|cx| conn.poll_gone(cx));
    tokio::select! {
        biased;
        r = &mut read => match r {
            Ok(Ok(n)) => Ok(n),
            Ok(Err(_)) => Err(Exchange::Upstream { fail: UpFail::Closed, broke: true }),
            Err(_) => Err(Exchange::Upstream { fail: UpFail::ReadTimedout, broke: false }),
        },
        () = gone => Err(Exchange::ClientGone),
    }
}

/// One attempt: send the request, read the response head (skipping interim ones) into `buf`.
async fn exchange<S: IO>(
    up: &mut TcpStream,
    request: &[u8],
    limit: Duration,
    head_request: bool,
    conn: &mut Conn<S>,
    ctx: &mut RequestCtx,
    buf: &mut Vec<u8>,
) -> Result<RespHead, Exchange> {
    match tokio::time::timeout(limit, up.write_all(request)).await {
        Ok(Ok(())) => {}
        Ok(Err(_)) => {
            return Err(Exchange::Upstream {
                fail: UpFail::Closed,
                broke: true,
            })
        }
        Err(_) => {
            return Err(Exchange::Upstream {
                fail: UpFail::WriteTimedout,
                broke: false,
            })
        }
    }
    ctx.request_sent = true;
    // Bytes of `buf` known to hold no end of a head: a head trickled in small reads is parsed
    // once it can be complete, not after every read (that would be quadratic in its size).
    let mut scanned = 0;
    loop {
        // A close or a broken connection before the client has anything counts as broken
        // before the response (a retry may help), also after part of a head (as Pingora's
        // `retry::broke_before_response`).
        if read_up(up, buf, limit, conn).await? == 0 {
            return Err(Exchange::Upstream {
                fail: UpFail::Closed,
                broke: true,
            });
        }
        if !may_end_a_head(buf, scanned) {
            scanned = buf.len();
            if buf.len() >= MAX_RESP_HEAD {
                return Err(Exchange::Upstream {
                    fail: UpFail::Invalid,
                    broke: false,
                });
            }
            continue;
        }
        loop {
            match parse_response(buf, head_request) {
                Ok(Some(h)) if (100..200).contains(&h.status) => {
                    if h.status == 101 {
                        return Err(Exchange::Upstream {
                            fail: UpFail::Invalid,
                            broke: false,
                        });
                    }
                    // Interim: not forwarded (see the module docs); the real head follows.
                    buf.drain(..h.len);
                }
                Ok(Some(h)) => return Ok(h),
                Ok(None) if buf.len() >= MAX_RESP_HEAD => {
                    return Err(Exchange::Upstream {
                        fail: UpFail::Invalid,
                        broke: false,
                    })
                }
                Ok(None) => {
                    scanned = buf.len();
                    break;
                }
                Err(fail) => return Err(Exchange::Upstream { fail, broke: false }),
            }
        }
    }
}

/// Whether `buf` may hold the end of a head (an empty line: `\n\n` or `\n\r\n`) that was not
/// in its first `scanned` bytes.
fn may_end_a_head(buf: &[u8], scanned: usize) -> bool {
    let tail = &buf[scanned.saturating_sub(2).min(buf.len())..];
    tail.windows(2).any(|w| w == b"\n\n") || tail.windows(3).any(|w| w == b"\n\r\n")
}

/// The client's response head: the app's status line and headers but for `Connection`,
/// `Keep-Alive` and `Date` (and the request id's name), then `Date`, `Connection`, the request
/// id and the sticky cookie — what `response_filter` and Pingora's response writer add.
fn response_head(
    app: &[u8],
    framing: Framing,
    keepalive: bool,
    ctx: &RequestCtx,
    tls: bool,
) -> Result<Vec<u8>, UpFail> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_RESP_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    response_parser()
        .parse_response(&mut resp, app)
        .map_err(|_| UpFail::Invalid)?;
    let status = resp.code.ok_or(UpFail::Invalid)?;
    // With a transfer coding the length is not the body's: it is not passed on (as Pingora
    // does), or a cache or balancer in front framing by it would fall out of step.
    let te = resp
        .headers
        .iter()
        .any(|h| h.name.eq_ignore_ascii_case("transfer-encoding"));
    let id_name = ctx.snapshot.as_ref().map(|s| s.request_id.as_str());
    let mut out = Vec::with_capacity(app.len() + 160);
    // An HTTP/1.0 app's answer goes out as HTTP/1.1: the client talks to this proxy.
    out.extend_from_slice(b"HTTP/1.1 ");
    let mut code = itoa::Buffer::new();
    out.extend_from_slice(code.format(status).as_bytes());
    out.push(b' ');
    match resp.reason {
        Some(r) if !r.is_empty() => out.extend_from_slice(r.as_bytes()),
        _ => out.extend_from_slice(reply::reason(status).as_bytes()),
    }
    out.extend_from_slice(b"\r\n");
    let mut cache_control_shared = false;
    for h in resp.headers.iter() {
        let n = h.name;
        if n.eq_ignore_ascii_case("connection")
            || n.eq_ignore_ascii_case("keep-alive")
            || n.eq_ignore_ascii_case("date")
            || (te && n.eq_ignore_ascii_case("content-length"))
            || id_name.is_some_and(|id| n.eq_ignore_ascii_case(id))
        {
            continue;
        }
        if n.eq_ignore_ascii_case("cache-control") {
            cache_control_shared |= sticky::shared_cacheable(std::iter::once(h.value));
        }
        out.extend_from_slice(n.as_bytes());
        out.extend_from_slice(b": ");
        if h.value.iter().any(|b| matches!(b, b'\r' | b'\n')) {
            // A folded value (obs-fold): one line, the folds as spaces (RFC 9112 §5.2).
            out.extend(h.value.iter().map(|b| match b {
                b'\r' | b'\n' => b' ',
                b => *b,
            }));
        } else {
            out.extend_from_slice(h.value);
        }
        out.extend_from_slice(b"\r\n");
    }
    if framing == Framing::Close {
        out.extend_from_slice(b"Transfer-Encoding: chunked\r\n");
    }
    out.extend_from_slice(b"Date: ");
    out.extend_from_slice(pingora::protocols::http::date::get_cached_date().as_bytes());
    out.extend_from_slice(if keepalive {
        b"\r\nConnection: keep-alive\r\n"
    } else {
        b"\r\nConnection: close\r\n"
    });
    if let Some((name, value)) = &ctx.request_id {
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if let (Some(bucket), Some(snap), Some(up)) = (ctx.set_cookie, &ctx.snapshot, &ctx.upstream) {
        // Not on a response a shared cache may keep (see `response_filter`).
        if !cache_control_shared {
            let cookie = snap
                .sticky
                .set_cookie(&up.config.canary.cookie, bucket, tls);
            out.extend_from_slice(b"Set-Cookie: ");
            out.extend_from_slice(cookie.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }
    out.extend_from_slice(b"\r\n");
    Ok(out)
}

/// Answer a failure ourselves (`fail_to_proxy`), and close.
async fn fail<S: IO>(
    conn: &mut Conn<S>,
    code: u16,
    cause: &'static str,
    head_request: bool,
    ctx: &RequestCtx,
    out: &mut Outcome,
) -> bool {
    out.from_upstream = false;
    let text = reply::failure_text(code, cause);
    let mut resp = Vec::with_capacity(256 + text.len());
    resp.extend_from_slice(b"HTTP/1.1 ");
    resp.extend_from_slice(itoa::Buffer::new().format(code).as_bytes());
    resp.push(b' ');
    resp.extend_from_slice(reply::reason(code).as_bytes());
    resp.extend_from_slice(b"\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: ");
    resp.extend_from_slice(itoa::Buffer::new().format(text.len() + 1).as_bytes());
    resp.extend_from_slice(b"\r\nCache-Control: no-store\r\n");
    if let Some((name, value)) = &ctx.request_id {
        resp.extend_from_slice(name);
        resp.extend_from_slice(b": ");
        resp.extend_from_slice(value.as_bytes());
        resp.extend_from_slice(b"\r\n");
    }
    resp.extend_from_slice(b"Date: ");
    resp.extend_from_slice(pingora::protocols::http::date::get_cached_date().as_bytes());
    resp.extend_from_slice(b"\r\nConnection: close\r\n\r\n");
    if !head_request {
        resp.extend_from_slice(text.as_bytes());
        resp.push(b'\n');
    }
    out.error = Some(LogError::Cause(cause));
    if send(conn, &resp).await {
        out.status = code;
        out.bytes = if head_request { 0 } else { text.len() + 1 };
    }
    false
}

/// Proxy the request: attempts (with retries) until a response head, then the response.
/// Returns whether the client's connection may carry another request.
#[allow(clippy::too_many_arguments)]
async fn proxy<S: IO>(
    sy: &Switchyard,
    conn: &mut Conn<S>,
    t: &Taken<'_>,
    request: &[u8],
    ctx: &mut RequestCtx,
    peer: Peer,
    keepalive: bool,
    shutdown: &ShutdownWatch,
    out: &mut Outcome,
) -> bool {
    let head_request = t.method == "HEAD";
    let (Some(up), Some(pool_idx)) = (ctx.upstream.clone(), ctx.pool) else {
        return fail(conn, 500, "request was not routed", head_request, ctx, out).await;
    };
    let pool = &up.pools[pool_idx];
    let cfg = &up.config;
    let mut buf: Vec<u8> = Vec::new();
    let (mut stream, head, key) = loop {
        // `upstream_peer`.
        let inst = match pool.pick(cfg.balance, &ctx.tried, now_ms()) {
            Candidates::Found { inst, fail_open } => {
                passive::note_fail_open(&sy.events, &up, pool, fail_open);
                inst.clone()
            }
            Candidates::Exhausted => {
                let cause = ctx.cause.unwrap_or("upstream error");
                return fail(conn, 502, cause, head_request, ctx, out).await;
            }
            Candidates::Unresolved => {
                ctx.cause = Some("upstream address could not be resolved");
                return fail(
                    conn,
                    502,
                    "upstream address could not be resolved",
                    head_request,
                    ctx,
                    out,
                )
                .await;
            }
            Candidates::Empty => {
                ctx.cause = Some("no instances configured");
                return fail(conn, 502, "no instances configured", head_request, ctx, out).await;
            }
        };
        let Some(addr) = inst.current_addr() else {
            ctx.cause = Some("upstream address could not be resolved");
            return fail(
                conn,
                502,
                "upstream address could not be resolved",
                head_request,
                ctx,
                out,
            )
            .await;
        };
        ctx.attempts += 1;
        ctx.tried.push(inst.id);
        ctx.guard = Some(InstanceGuard::new(inst.clone()));
        ctx.instance = Some(inst.clone());
        let key = (
            pool.epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ inst.id,
            addr,
        );
        let (mut stream, reused) = match pool::take(key) {
            Some(s) => (s, true),
            None => match connect(addr, cfg.connect_timeout).await {
                Ok(s) => (s, false),
                Err(f) => {
                    // `fail_to_connect`.
                    tracing::warn!(upstream = %up.name(), instance = %inst.label, error = f.describe(), "connect failed");
                    ctx.cause = Some(f.describe());
                    passive::failure(&sy.events, ctx);
                    if retry::after_connect_failure(ctx) {
                        continue;
                    }
                    let keep = fail(conn, f.status(), f.describe(), head_request, ctx, out).await;
                    out.from_upstream = true;
                    return keep;
                }
            },
        };
        buf.clear();
        match exchange(
            &mut stream,
            request,
            cfg.read_timeout,
            head_request,
            conn,
            ctx,
            &mut buf,
        )
        .await
        {
            Ok(h) => break (stream, h, key),
            Err(Exchange::ClientGone) => {
                out.error = Some(LogError::Client);
                return false;
            }
            Err(Exchange::Upstream { fail: f, broke }) => {
                // `error_while_proxy`.
                ctx.cause = Some(f.describe());
                if !(reused && broke) {
                    tracing::warn!(upstream = %up.name(), instance = %inst.label, error = f.describe(), "upstream failed");
                    passive::failure(&sy.events, ctx);
                }
                if retry::after_upstream_error(broke, true, ctx, reused) {
                    continue;
                }
                let keep = fail(conn, f.status(), f.describe(), head_request, ctx, out).await;
                out.from_upstream = true;
                return keep;
            }
        }
    };
    // `upstream_response_filter`.
    passive::response(&sy.events, ctx, head.status);
    ctx.response_at = Some(std::time::Instant::now());
    // Draining since the request began: this answer says `Connection: close`. A body under a
    // coding this proxy cannot re-frame ends with the connection.
    let shutting_down = *shutdown.borrow();
    let keepalive = keepalive && !shutting_down && head.framing != Framing::Raw;
    let client_head = match response_head(&buf[..head.len], head.framing, keepalive, ctx, peer.tls)
    {
        Ok(h) => h,
        Err(f) => {
            ctx.cause = Some(f.describe());
            passive::failure(&sy.events, ctx);
            let keep = fail(conn, 502, f.describe(), head_request, ctx, out).await;
            out.from_upstream = true;
            return keep;
        }
    };
    buf.drain(..head.len);
    match forward_body(
        head.framing,
        head.status,
        &mut stream,
        buf,
        client_head,
        cfg.read_timeout,
        conn,
        out,
    )
    .await
    {
        Ok(clean) => {
            if head.reusable && clean && !*shutdown.borrow() {
                pool::put(key, stream, cfg.idle_timeout);
            }
            keepalive
        }
        Err(e) => {
            match e {
                Exchange::ClientGone => out.error = Some(LogError::Client),
                Exchange::Upstream { fail: f, .. } => {
                    // A response cut short: the instance's fault, not retried.
                    ctx.cause = Some(f.describe());
                    out.error = Some(LogError::Cause(f.describe()));
                    tracing::warn!(upstream = %up.name(), error = f.describe(), "upstream failed mid-response");
                    passive::failure(&sy.events, ctx);
                    if out.status == 499 {
                        // Broken before its head went out (a malformed first chunk): the
                        // client gets the 502 it would have got for a broken head.
                        fail(conn, 502, f.describe(), head_request, ctx, out).await;
                    }
                    out.from_upstream = true;
                }
            }
            false
        }
    }
}

/// Send the client's response `head` and the body: what of it `buf` holds already, then what
/// the app sends, each read passed on (and flushed) as it arrives — the head together with the
/// first of the body, in one `send` when it is small. `Ok(true)`: complete, and the app sent
/// nothing after it (its connection can be reused).
#[allow(clippy::too_many_arguments)]
async fn forward_body<S: IO>(
    framing: Framing,
    status: u16,
    up: &mut TcpStream,
    mut buf: Vec<u8>,
    head: Vec<u8>,
    limit: Duration,
    conn: &mut Conn<S>,
    out: &mut Outcome,
) -> Result<bool, Exchange> {
    let mut head = Some(head);
    let mut left = match framing {
        Framing::Length(n) => n,
        _ => 0,
    };
    let mut chunked = Chunked::default();
    loop {
        // How much of `buf` is body, and whether the body is complete with it.
        let (n, done) = match framing {
            Framing::None => (0, true),
            Framing::Length(_) => {
                let n = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                left -= n as u64;
                (n, left == 0)
            }
            Framing::Chunked => {
                let n = chunked.advance(&buf).map_err(|_| Exchange::Upstream {
                    fail: UpFail::Invalid,
                    broke: false,
                })?;
                (n, chunked.done())
            }
            Framing::Close | Framing::Raw => (buf.len(), false),
        };
        let extra = buf.len() > n;
        let data = &buf[..n];
        let sent = if framing == Framing::Close && n > 0 {
            // Re-chunked: the size line, the data, CRLF.
            let mut v = head.take().unwrap_or_default();
            let mut size = [0u8; 16];
            v.extend_from_slice(hex(n, &mut size));
            v.extend_from_slice(b"\r\n");
            v.extend_from_slice(data);
            v.extend_from_slice(b"\r\n");
            send(conn, &v).await
        } else if let Some(mut h) = head.take() {
            h.extend_from_slice(data);
            send(conn, &h).await
        } else if n > 0 {
            send(conn, data).await
        } else {
            true
        };
        if !sent {
            return Err(Exchange::ClientGone);
        }
        out.status = status;
        // Body bytes the client was sent (of a chunked body: its bytes as forwarded, framing
        // included, bounded by the chunks' data announced so far).
        out.bytes = out.bytes.saturating_add(n);
        if framing == Framing::Chunked {
            out.bytes = out
                .bytes
                .min(usize::try_from(chunked.declared()).unwrap_or(usize::MAX));
        }
        if done {
            return Ok(!extra);
        }
        buf.clear();
        match read_up(up, &mut buf, limit, conn).await? {
            0 if matches!(framing, Framing::Close | Framing::Raw) => {
                if framing == Framing::Close && !send(conn, b"0\r\n\r\n").await {
                    return Err(Exchange::ClientGone);
                }
                return Ok(false);
            }
            0 => {
                return Err(Exchange::Upstream {
                    fail: UpFail::Closed,
                    broke: false,
                })
            }
            _ => {}
        }
    }
}

/// `n` in lower-case hex.
fn hex(mut n: usize, buf: &mut [u8; 16]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b"0123456789abcdef"[n & 0xf];
        n >>= 4;
        if n == 0 {
            return &buf[i..];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(head: &str, f: impl FnOnce(Option<Taken<'_>>)) {
        let mut headers = [httparse::EMPTY_HEADER; MAX_REQ_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        assert!(matches!(
            req.parse(head.as_bytes()),
            Ok(httparse::Status::Complete(_))
        ));
        f(take(&req));
    }

    #[test]
    fn only_plain_requests_without_body_are_taken() {
        parsed("GET /a?b=c HTTP/1.1\r\nHost: x\r\n\r\n", |t| {
            let t = t.expect("taken");
            assert_eq!(t.target, "/a?b=c");
            assert!(!t.close);
        });
        parsed(
            "HEAD / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            |t| assert!(t.expect("taken").close),
        );
        for declined in [
            "GET / HTTP/1.0\r\nHost: x\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\n\r\n",
            "DELETE / HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET http://x/ HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET /{x} HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, x-secret\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nX_Forwarded_For: 1.2.3.4\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nTE: trailers\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nProxy-Authorization: x\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n\r\n",
        ] {
            parsed(declined, |t| assert!(t.is_none(), "{declined:?} was taken"));
        }
    }

    #[test]
    fn response_framing_follows_rfc_9112() {
        let f = |head: &str, head_req: bool| {
            parse_response(head.as_bytes(), head_req)
                .map(|h| h.map(|h| (h.status, h.framing, h.reusable)))
        };
        assert_eq!(
            f("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", false),
            Ok(Some((200, Framing::Length(5), true)))
        );
        assert_eq!(
            f("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", true),
            Ok(Some((200, Framing::None, true)))
        );
        assert_eq!(
            f(
                "HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\nConnection: close\r\n\r\n",
                false
            ),
            Ok(Some((200, Framing::Length(5), false)))
        );
        assert_eq!(
            f(
                "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
                false
            ),
            Err(UpFail::Invalid)
        );
        assert_eq!(
            f("HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", false),
            Err(UpFail::Invalid)
        );
        assert_eq!(
            f(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 3\r\n\r\n",
                false
            ),
            Ok(Some((200, Framing::Chunked, true)))
        );
        assert_eq!(
            f("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", false),
            Ok(Some((200, Framing::Raw, false)))
        );
        assert_eq!(
            f("HTTP/1.0 200 OK\r\n\r\n", false),
            Ok(Some((200, Framing::Close, false)))
        );
        assert_eq!(
            f(
                "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\n",
                false
            ),
            Ok(Some((200, Framing::Length(1), true)))
        );
        assert_eq!(
            f(
                "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n",
                false
            ),
            Ok(Some((200, Framing::Chunked, false)))
        );
        assert_eq!(
            f(
                "HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n",
                false
            ),
            Ok(Some((304, Framing::None, true)))
        );
        assert_eq!(f("HTTP/1.1 200 OK\r\nContent-Le", false), Ok(None));
        assert_eq!(f("HTTP/9 200 OK\r\n\r\n", false), Err(UpFail::Invalid));
    }

    #[test]
    fn the_client_head_drops_a_length_beside_a_coding_and_unfolds_lines() {
        let ctx = RequestCtx::default();
        let app = b"HTTP/1.0 200 Fine\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\nX-Long: a\r\n b\r\nConnection: close\r\nKeep-Alive: timeout=5\r\nDate: then\r\nX-Spaced : v\r\n\r\n";
        let head = response_head(app, Framing::Chunked, true, &ctx, false).unwrap();
        let head = String::from_utf8(head).unwrap();
        assert!(head.starts_with("HTTP/1.1 200 Fine\r\n"), "{head}");
        assert!(head.ends_with("\r\n\r\n"), "{head}");
        let lines: Vec<&str> = head.trim_end().split("\r\n").collect();
        for l in &lines {
            assert!(!l.contains(['\r', '\n']), "a bare line break in {l:?}");
        }
        assert!(lines.contains(&"Transfer-Encoding: chunked"), "{head}");
        assert!(lines.contains(&"X-Long: a   b"), "{head}");
        assert!(lines.contains(&"X-Spaced: v"), "{head}");
        assert!(lines.contains(&"Connection: keep-alive"), "{head}");
        let lower = head.to_ascii_lowercase();
        assert!(!lower.contains("content-length"), "{head}");
        assert!(!lower.contains("keep-alive: "), "{head}");
        assert!(!lower.contains("connection: close"), "{head}");
        assert_eq!(lower.matches("\r\ndate: ").count(), 1, "{head}");
        assert!(!head.contains("then"), "{head}");
        // Without a coding the length stays.
        let app = b"HTTP/1.1 404 Not Found\r\nContent-Length: 3\r\n\r\n";
        let head = response_head(app, Framing::Length(3), false, &ctx, false).unwrap();
        let head = String::from_utf8(head).unwrap();
        assert!(head.contains("\r\nContent-Length: 3\r\n"), "{head}");
        assert!(head.contains("\r\nConnection: close\r\n"), "{head}");
    }

    #[test]
    fn a_head_end_is_found_across_reads() {
        let head = b"HTTP/1.1 200 OK\r\nA: b\r\n\r\n";
        assert!(may_end_a_head(head, 0));
        // Split anywhere: the check of the second part (from where the first ended) finds it
        // exactly when the whole head is there.
        for cut in 0..head.len() {
            assert!(
                !may_end_a_head(&head[..cut], 0) || cut == head.len(),
                "{cut}"
            );
            assert!(may_end_a_head(head, cut), "cut at {cut}");
        }
        assert!(may_end_a_head(b"HTTP/1.1 200 OK\n\n", 0));
        assert!(!may_end_a_head(b"HTTP/1.1 200 OK\r\nA: b\r\n", 0));
    }

    #[test]
    fn hex_is_lower_case_without_leading_zeros() {
        for n in [0usize, 1, 15, 16, 255, 4096, 0xdead_beef, usize::MAX] {
            let mut b = [0u8; 16];
            assert_eq!(hex(n, &mut b), format!("{n:x}").as_bytes());
        }
    }
}
