//! The path the deny list and the routes look at: percent-encoded unreserved characters
//! decoded (`%2e` is `.`), runs of slashes merged, and `.`/`..` segments resolved (RFC 3986
//! §5.2.4), as nginx does before it matches locations. Without it `/public/../admin` is routed
//! by the `/public/` rule while the app serves `/admin`. When normalizing changes the path,
//! the normalized path is what goes upstream, so the app serves what was routed and checked.
//!
//! Pure and allocation-free for the common path that needs nothing (one scan).

use std::borrow::Cow;

/// Whether `b` is an unreserved character (RFC 3986 §2.3), safe to decode.
fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// Whether a character appended to `out` could complete an escape (`out` ends in `%` or in
/// `%` and a hex digit).
fn completes_escape(out: &[u8]) -> bool {
    match out {
        [.., b'%'] => true,
        [.., b'%', h] => h.is_ascii_hexdigit(),
        _ => false,
    }
}

/// Whether `path` needs any normalization (a quick scan for `%`, `//`, `/.`).
fn needs_work(path: &[u8]) -> bool {
    path.iter().enumerate().any(|(i, b)| match b {
        b'%' => true,
        b'/' => matches!(path.get(i + 1), Some(b'/') | Some(b'.')),
        _ => false,
    })
}

/// The normalized form of `path` (which starts with `/`; no query). Normalizing again changes
/// nothing (an escape is left alone where decoding it would complete a new one, as in
/// `%2%65`, which would become `%2e`), so the app's own decoding finds no `..` the routing
/// did not see.
pub(crate) fn normalize(path: &str) -> Cow<'_, str> {
    once(path)
}

/// One pass of normalization.
fn once(path: &str) -> Cow<'_, str> {
    if !needs_work(path.as_bytes()) {
        return Cow::Borrowed(path);
    }
    // Decode percent-encoded unreserved characters; keep every other escape as sent.
    let b = path.as_bytes();
    let mut decoded = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && !completes_escape(&decoded) {
            if let (Some(h), Some(l)) = (
                b.get(i + 1).copied().and_then(hex),
                b.get(i + 2).copied().and_then(hex),
            ) {
                let c = h * 16 + l;
                if unreserved(c) {
                    decoded.push(c);
                    i += 3;
                    continue;
                }
            }
        }
        decoded.push(b[i]);
        i += 1;
    }
    // Merge slashes and resolve dot segments.
    let mut out: Vec<&[u8]> = Vec::new();
    let segments: Vec<&[u8]> = decoded.split(|c| *c == b'/').collect();
    let last = segments.len().saturating_sub(1);
    let mut trailing_slash = false;
    for (n, seg) in segments.iter().enumerate().skip(1) {
        match *seg {
            b"" => trailing_slash = n == last,
            b"." => trailing_slash = true,
            b".." => {
                out.pop();
                trailing_slash = true;
            }
            s => {
                out.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut norm = Vec::with_capacity(decoded.len());
    for s in &out {
        norm.push(b'/');
        norm.extend_from_slice(s);
    }
    if out.is_empty() || trailing_slash {
        norm.push(b'/');
    }
    // Only ASCII unreserved bytes were decoded and the rest copied as is, so this is UTF-8
    // whenever `path` was; if not, keep the path as sent.
    match String::from_utf8(norm) {
        Ok(s) if s == path => Cow::Borrowed(path),
        Ok(s) => Cow::Owned(s),
        Err(_) => Cow::Borrowed(path),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_dots_merges_slashes_and_decodes_unreserved() {
        for (input, want) in [
            ("/", "/"),
            ("/a/b", "/a/b"),
            ("/a/b/", "/a/b/"),
            ("//actuator//env", "/actuator/env"),
            ("/public/../admin", "/admin"),
            ("/public/%2e%2e/admin", "/admin"),
            ("/public/%2E%2e/%2e/admin", "/admin"),
            ("/a/./b/.", "/a/b/"),
            ("/../../etc", "/etc"),
            ("/a/..", "/"),
            ("/%61ctuator", "/actuator"),
            ("/a%2Fb", "/a%2Fb"),
            ("/a%20b", "/a%20b"),
            ("/%zz", "/%zz"),
            ("/caf%C3%A9", "/caf%C3%A9"),
            ("/.well-known/x", "/.well-known/x"),
            ("/a/...", "/a/..."),
            // Where decoding would complete a new escape, the escape stays.
            ("/public/%2%65%2%65/admin", "/public/%2%65%2%65/admin"),
            ("/%%43e", "/%%43e"),
        ] {
            assert_eq!(normalize(input), want, "{input}");
        }
        for p in [
            "/%%43e%2%653%2%e4%.",
            "/a%2%2565",
            "/x/%252e%252e/y",
            "/3%2%e4%%%%%%%%%3333%%%%%%%\u{5}%%%%[/}%2%3%2%.",
        ] {
            let n = normalize(p);
            assert_eq!(normalize(&n), n, "idempotent: {p}");
        }
        assert!(matches!(normalize("/plain/path"), Cow::Borrowed(_)));
        assert!(matches!(normalize("/.well-known/x"), Cow::Borrowed(_)));
    }
}
