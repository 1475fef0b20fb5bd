//! The request head, inspected at the door — before Pingora parses it, before routing and the
//! deny list — with the checks nginx makes (issue 10): what cannot be framed unambiguously or
//! routed safely is refused here and never reaches the app.
//!
//! - The request target is origin-form (`/path?query`), absolute-form (`http(s)://host/path`,
//!   routed on its path), or `*` for OPTIONS; anything else is 400 (`GET x:/actuator`,
//!   `GET actuator/env`, `GET */x` would otherwise slip past path-based rules). No control
//!   bytes or spaces in it.
//! - HTTP/1.1 needs exactly one non-empty, well-formed `Host`; HTTP/1.0 at most one.
//! - `Content-Length` and `Transfer-Encoding` together: 400 (nginx's choice; RFC 9112 allows
//!   dropping the length, but the message is a request-smuggling attempt more often than not).
//! - `Transfer-Encoding` other than one `chunked`: 501 (the coding would otherwise be lost or
//!   misread). On HTTP/1.0: 400.
//! - `Content-Length`: digits only; repeated lines must agree (the proxy forwards one); a
//!   comma list is 400.
//!
//! Pure: bytes in, a verdict out; fuzzed in `fuzz/`.

/// Header lines accepted in one head (Pingora's own limit).
const MAX_HEADERS: usize = 256;

/// How the request's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Body {
    /// No body.
    None,
    /// `Content-Length` bytes.
    Length(u64),
    /// Chunked transfer coding.
    Chunked,
}

/// A head that passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Head {
    /// Empty lines before the request line (allowed by RFC 9112 §2.2; dropped).
    pub(crate) skip: usize,
    /// Bytes of the head after them, up to and including the empty line.
    pub(crate) len: usize,
    /// How the body is delimited.
    pub(crate) body: Body,
    /// A genuine upgrade is asked for: HTTP/1.1, `Upgrade`, `Connection: upgrade` and no body
    /// (the request path applies the same rule, `proxy::genuine_upgrade`, and strips `Upgrade`
    /// from anything else). If the app agrees, the connection stops being HTTP; if it does not,
    /// the request path closes the connection after the answer.
    pub(crate) upgrade: bool,
    /// `Expect: 100-continue`: the client sends its body only once told to go on.
    pub(crate) expect_continue: bool,
}

/// A head that did not pass: the status and a short reason for the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub(crate) status: u16,
    pub(crate) reason: &'static str,
}

const fn refuse(status: u16, reason: &'static str) -> Refusal {
    Refusal { status, reason }
}

/// Inspect a complete request head (`buf` starts at the head and holds at least all of it).
pub(crate) fn inspect(buf: &[u8]) -> Result<Head, Refusal> {
    let skip = buf
        .iter()
        .position(|b| *b != b'\r' && *b != b'\n')
        .unwrap_or(buf.len());
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(&buf[skip..]) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Err(refuse(400, "incomplete request head")),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(refuse(431, "too many header lines"));
        }
        Err(_) => return Err(refuse(400, "malformed request line or header")),
    };
    let http11 = req.version == Some(1);
    let method = req.method.unwrap_or("");
    if method == "CONNECT" {
        return Err(refuse(405, "CONNECT is not supported"));
    }
    let target = req.path.unwrap_or("");
    check_target(method, target)?;

    let mut hosts = 0;
    let mut lengths: Option<u64> = None;
    let mut length_lines = 0;
    let mut codings = 0;
    let mut chunked = false;
    let mut upgrade_header = false;
    let mut connection_upgrade = false;
    let mut expect_continue = false;
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("host") {
            hosts += 1;
            if !valid_authority(h.value) {
                return Err(refuse(400, "invalid Host header"));
            }
        } else if name.eq_ignore_ascii_case("content-length") {
            length_lines += 1;
            let n = content_length(h.value)?;
            if lengths.is_some_and(|prev| prev != n) {
                return Err(refuse(400, "conflicting Content-Length headers"));
            }
            lengths = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            codings += 1;
            chunked = just_chunked(h.value, raw_value(buf, h.value));
        } else if name.eq_ignore_ascii_case("upgrade") {
            upgrade_header = true;
        } else if name.eq_ignore_ascii_case("expect") {
            expect_continue |= h.value.trim_ascii().eq_ignore_ascii_case(b"100-continue");
        } else if name.eq_ignore_ascii_case("connection") {
            connection_upgrade |= h
                .value
                .split(|b| *b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"upgrade"));
        }
    }
    if hosts > 1 {
        return Err(refuse(400, "more than one Host header"));
    }
    if hosts == 0 && http11 {
        return Err(refuse(400, "HTTP/1.1 request without a Host header"));
    }
    // Absolute-form: the Host header must name the same authority (RFC 9112 §3.2.2 lets the
    // target win; a mismatch is how a request claims two hosts at once, so refuse it).
    if let Some(authority) = absolute_authority(target) {
        let host = req
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("host"))
            .map(|h| h.value.trim_ascii());
        if host.is_some_and(|h| !h.eq_ignore_ascii_case(authority)) {
            return Err(refuse(
                400,
                "the Host header differs from the host in the request target",
            ));
        }
    }
    let body = match (codings, length_lines) {
        (0, 0) => Body::None,
        (0, _) => match lengths {
            Some(0) | None => Body::None,
            Some(n) => Body::Length(n),
        },
        (_, 0) if !http11 => {
            return Err(refuse(400, "Transfer-Encoding in an HTTP/1.0 request"));
        }
        (1, 0) if chunked => Body::Chunked,
        (_, 0) => {
            return Err(refuse(
                501,
                "only a single chunked transfer coding is supported",
            ));
        }
        (_, _) => {
            return Err(refuse(400, "both Content-Length and Transfer-Encoding"));
        }
    };
    Ok(Head {
        skip,
        len,
        body,
        upgrade: http11 && upgrade_header && connection_upgrade && body == Body::None,
        expect_continue,
    })
}

/// Origin-form, absolute-form `http(s)://authority[/...]`, or `*` for OPTIONS.
fn check_target(method: &str, target: &str) -> Result<(), Refusal> {
    let t = target.as_bytes();
    if t.is_empty() || t.iter().any(|b| *b <= b' ' || *b == 0x7f) {
        return Err(refuse(
            400,
            "control characters or spaces in the request target",
        ));
    }
    if t[0] == b'/' {
        return Ok(());
    }
    if t == b"*" {
        return if method == "OPTIONS" {
            Ok(())
        } else {
            Err(refuse(400, "\"*\" is a request target for OPTIONS only"))
        };
    }
    let authority = absolute_authority(target).ok_or(refuse(
        400,
        "the request target must be a path (/...) or an absolute http(s) URL",
    ))?;
    if !valid_authority(authority) {
        return Err(refuse(400, "invalid host in the request target"));
    }
    Ok(())
}

/// Where `redirect_https` sends a request whose head (already checked by [`inspect`]) starts
/// `buf`: `https://` + the host without its port (the absolute-form target's, else the Host
/// header's) + the path and query as sent — nginx's `https://$host$request_uri`. `None` when
/// there is no host.
pub(crate) fn https_location(buf: &[u8]) -> Option<String> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let start = buf.iter().position(|b| *b != b'\r' && *b != b'\n')?;
    req.parse(&buf[start..]).ok()?;
    let target = req.path?;
    let (authority, path) = match absolute_authority(target) {
        Some(a) => {
            let scheme_len = target.find("://").map(|i| i + 3).unwrap_or(0);
            (a, &target[scheme_len + a.len()..])
        }
        None => (
            req.headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("host"))?
                .value
                .trim_ascii(),
            target,
        ),
    };
    let host = if authority.first() == Some(&b'[') {
        let end = authority.iter().position(|b| *b == b']')?;
        &authority[..=end]
    } else {
        match authority.iter().rposition(|b| *b == b':') {
            Some(i) => &authority[..i],
            None => authority,
        }
    };
    if host.is_empty() || !valid_authority(host) {
        return None;
    }
    // `http://h?x` has an empty path (`/?x`); `OPTIONS *` is about the server (`/`).
    let path = if path.starts_with('/') {
        path.to_string()
    } else if path.is_empty() || path == "*" {
        "/".to_string()
    } else if path.starts_with('?') {
        format!("/{path}")
    } else {
        return None;
    };
    Some(format!("https://{}{path}", String::from_utf8_lossy(host)))
}

/// The authority of an absolute-form `http(s)://authority[/...]` target.
fn absolute_authority(target: &str) -> Option<&[u8]> {
    let t = target.as_bytes();
    let rest = strip_prefix_ignore_case(t, b"http://")
        .or_else(|| strip_prefix_ignore_case(t, b"https://"))?;
    let end = rest
        .iter()
        .position(|b| matches!(b, b'/' | b'?' | b'#'))
        .unwrap_or(rest.len());
    Some(&rest[..end])
}

fn strip_prefix_ignore_case<'a>(s: &'a [u8], prefix: &[u8]) -> Option<&'a [u8]> {
    (s.len() >= prefix.len() && s[..prefix.len()].eq_ignore_ascii_case(prefix))
        .then(|| &s[prefix.len()..])
}

/// `host[:port]`: a registered name (letters, digits, `-._~`, `%XX` and sub-delims) or a
/// bracketed IP literal, with an optional port of up to 5 digits. No userinfo, no path.
pub(crate) fn valid_authority(a: &[u8]) -> bool {
    let a = a.trim_ascii();
    if a.is_empty() {
        return false;
    }
    let (host, port) = if a[0] == b'[' {
        let Some(close) = a.iter().position(|b| *b == b']') else {
            return false;
        };
        let inner = &a[1..close];
        if inner.is_empty()
            || !inner
                .iter()
                .all(|b| b.is_ascii_hexdigit() || matches!(b, b':' | b'.'))
        {
            return false;
        }
        (&a[..=close], &a[close + 1..])
    } else {
        match a.iter().rposition(|b| *b == b':') {
            Some(i) => (&a[..i], &a[i..]),
            None => (a, &a[a.len()..]),
        }
    };
    let port_ok = port.is_empty()
        || (port.len() <= 6 && port[0] == b':' && port[1..].iter().all(u8::is_ascii_digit));
    let host_ok = host.first() == Some(&b'[')
        || (!host.is_empty()
            && host.iter().all(|b| {
                b.is_ascii_alphanumeric()
                    || matches!(
                        b,
                        b'-' | b'.'
                            | b'_'
                            | b'~'
                            | b'%'
                            | b'!'
                            | b'$'
                            | b'&'
                            | b'\''
                            | b'('
                            | b')'
                            | b'*'
                            | b'+'
                            | b','
                            | b';'
                            | b'='
                    )
            }));
    port_ok && host_ok
}

/// `1*DIGIT`, optionally surrounded by spaces; no lists, no signs, no overflow.
fn content_length(v: &[u8]) -> Result<u64, Refusal> {
    let d = v.trim_ascii();
    if d.is_empty() || d.len() > 19 || !d.iter().all(u8::is_ascii_digit) {
        return Err(refuse(400, "invalid Content-Length"));
    }
    d.iter()
        .try_fold(0u64, |n, b| {
            n.checked_mul(10)?.checked_add(u64::from(b - b'0'))
        })
        .ok_or(refuse(400, "invalid Content-Length"))
}

/// The bytes between a header's colon and the end of its value, as sent (httparse trims the
/// whitespace around a value; a tab there is what nginx refuses).
fn raw_value<'a>(buf: &'a [u8], value: &'a [u8]) -> &'a [u8] {
    // `value` is a slice of `buf` (httparse does not copy); anything else gives `value` back.
    let Some(start) = (value.as_ptr() as usize).checked_sub(buf.as_ptr() as usize) else {
        return value;
    };
    let end = start + value.len();
    if end > buf.len() {
        return value;
    }
    let colon = buf[..start]
        .iter()
        .rposition(|b| *b == b':')
        .map_or(start, |i| i + 1);
    &buf[colon..end]
}

/// Exactly `chunked`, with spaces (not tabs) around it at most.
fn just_chunked(value: &[u8], raw: &[u8]) -> bool {
    value.eq_ignore_ascii_case(b"chunked") && raw.iter().all(|b| *b != b'\t')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(head: &str) -> Result<Head, Refusal> {
        inspect(head.as_bytes())
    }

    fn status(head: &str) -> u16 {
        match check(head) {
            Ok(_) => 200,
            Err(r) => r.status,
        }
    }

    #[test]
    fn ordinary_heads_pass_with_their_framing() {
        let h = check("GET /a?b HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        assert_eq!((h.skip, h.body, h.upgrade), (0, Body::None, false));
        assert_eq!(h.len, 30);
        let h = check("\r\n\r\nPOST / HTTP/1.1\r\nHost: x:8080\r\nContent-Length: 5\r\n\r\nhello")
            .unwrap();
        assert_eq!((h.skip, h.body), (4, Body::Length(5)));
        let h = check("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: Chunked\r\n\r\n").unwrap();
        assert_eq!(h.body, Body::Chunked);
        let h = check("GET /ws HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\r\n").unwrap();
        assert!(h.upgrade);
        // Not genuine upgrades: no Connection token, a body, HTTP/1.0.
        for head in [
            "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n",
            "POST /ws HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: x\r\nContent-Length: 9\r\n\r\n",
            "POST /ws HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: x\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET /ws HTTP/1.0\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
        ] {
            assert!(!check(head).unwrap().upgrade, "{head}");
        }
        assert_eq!(
            status("GET http://example.com/x HTTP/1.1\r\nHost: example.com\r\n\r\n"),
            200
        );
        assert_eq!(
            status("GET HTTPS://[::1]:8443 HTTP/1.1\r\nHost: [::1]:8443\r\n\r\n"),
            200
        );
        assert_eq!(status("OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n"), 200);
        assert_eq!(
            status("GET / HTTP/1.0\r\n\r\n"),
            200,
            "HTTP/1.0 needs no Host"
        );
        assert_eq!(
            status("GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n"),
            200,
            "identical repeats: forwarded once"
        );
    }

    #[test]
    fn odd_targets_are_refused() {
        for t in [
            "x:/actuator/env",
            "foo:bar:/actuator/env",
            "a:/.aws/credentials",
            "*/actuator/env",
            "actuator/env",
            "?/actuator/env",
            "ftp://x/actuator",
            "http:///actuator",
            "http://user@host/actuator",
        ] {
            assert_eq!(
                status(&format!("GET {t} HTTP/1.1\r\nHost: x\r\n\r\n")),
                400,
                "{t}"
            );
        }
        assert_eq!(status("GET * HTTP/1.1\r\nHost: x\r\n\r\n"), 400);
        assert_eq!(status("GET /a\x01b HTTP/1.1\r\nHost: x\r\n\r\n"), 400);
        assert_eq!(status("GET /a\x7fb HTTP/1.1\r\nHost: x\r\n\r\n"), 400);
        assert_eq!(status("GET /a b HTTP/1.1\r\nHost: x\r\n\r\n"), 400);
        assert_eq!(status("CONNECT x:443 HTTP/1.1\r\nHost: x\r\n\r\n"), 405);
    }

    #[test]
    fn host_rules() {
        assert_eq!(status("GET / HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(status("GET / HTTP/1.1\r\nHost:\r\n\r\n"), 400);
        assert_eq!(status("GET / HTTP/1.1\r\nHost: \r\n\r\n"), 400);
        assert_eq!(
            status("GET http://x/ HTTP/1.1\r\n\r\n"),
            400,
            "absolute-form still needs Host"
        );
        assert_eq!(status("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"), 400);
        assert_eq!(status("GET / HTTP/1.0\r\nHost: a\r\nHost: a\r\n\r\n"), 400);
        assert_eq!(status("GET / HTTP/1.1\r\nHost: a/b\r\n\r\n"), 400);
        assert_eq!(status("GET / HTTP/1.1\r\nHost: u@a\r\n\r\n"), 400);
        assert_eq!(status("GET / HTTP/1.1\r\nHost: a:99999999\r\n\r\n"), 400);
        // Found by fuzzing: an empty host before a port panicked.
        assert_eq!(status("GET / HTTP/1.1\r\nHost: :80\r\n\r\n"), 400);
        assert_eq!(status("GET / HTTP/1.1\r\nHost: : chunk t\r\n\r\n"), 400);
    }

    #[test]
    fn framing_rules() {
        let h = "POST / HTTP/1.1\r\nHost: x\r\n";
        assert_eq!(
            status(&format!(
                "{h}Content-Length: 5\r\nContent-Length: 6\r\n\r\n"
            )),
            400
        );
        assert_eq!(status(&format!("{h}Content-Length: 5, 5\r\n\r\n")), 400);
        assert_eq!(status(&format!("{h}Content-Length: +5\r\n\r\n")), 400);
        assert_eq!(
            status(&format!("{h}Content-Length: 99999999999999999999\r\n\r\n")),
            400
        );
        assert_eq!(
            status(&format!(
                "{h}Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
            )),
            400
        );
        for te in [
            "identity, chunked",
            "gzip, chunked",
            "\tchunked",
            "chunked, chunked",
            "gzip",
        ] {
            assert_eq!(
                status(&format!("{h}Transfer-Encoding: {te}\r\n\r\n")),
                501,
                "{te:?}"
            );
        }
        assert_eq!(
            status(&format!(
                "{h}Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"
            )),
            501
        );
        assert_eq!(
            status("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"),
            400
        );
        assert_eq!(
            status(&format!("{h}Transfer-Encoding:  chunked \r\n\r\n")),
            200
        );
    }

    #[test]
    fn malformed_heads_are_400_and_floods_431() {
        assert_eq!(status("GET / HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n"), 400);
        assert_eq!(status("GET / HTTP/3.0\r\nHost: x\r\n\r\n"), 400);
        assert_eq!(
            status("GET / HTTP/1.1\r\nBad Name: x\r\nHost: x\r\n\r\n"),
            400
        );
        let many: String = (0..300).map(|i| format!("X-{i}: v\r\n")).collect();
        assert_eq!(
            status(&format!("GET / HTTP/1.1\r\nHost: x\r\n{many}\r\n")),
            431
        );
    }
}
