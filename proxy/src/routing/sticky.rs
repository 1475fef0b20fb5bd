//! Sticky buckets (SPEC §4): what keeps a client on its pool while the weights don't move it.
//!
//! A client's bucket (0..100) comes from
//! - its cookie (`sticky: cookie`): assigned on first sight — the pool by the weights (exact
//!   over every 100 new clients), a bucket of that pool at random — and sent back as
//!   `<bucket>.<tag>`, where the tag is the first 12 hex digits of SHA-256 over the proxy's
//!   secret key and the bucket. A value the proxy did not issue (hand-edited, garbled, from
//!   another key) is treated as absent: the client gets a new bucket. The cookie only carries
//!   a bucket, not a credential: a client may copy another client's cookie, which gives it
//!   nothing `X-Canary` would not. The tags of the 100 buckets are computed once, so checking
//!   a cookie is a parse and a 12-byte compare.
//! - a request header (`sticky: header:<Name>`): FNV-1a, 64 bit (offset basis
//!   0xcbf29ce484222325, prime 0x100000001b3), over the header value's bytes, modulo 100. Fixed
//!   function, fixed seed: every proxy of every version puts a client in the same bucket.
//!
//! The key lives in the state file, so a restart keeps every issued cookie valid.

use sha2::{Digest, Sha256};

/// Hex digits of the tag.
const TAG_LEN: usize = 12;

/// The secret behind cookie tags, with the 100 tags it yields.
#[derive(Clone)]
pub(crate) struct StickyKey {
    key: [u8; 16],
    tags: [[u8; TAG_LEN]; 100],
    /// Derived from a `sticky_key_file`: the file is its home, so the state file does not
    /// keep it (a proxy whose config drops the file gets a key of its own at the next start).
    pub(crate) shared: bool,
}

impl std::fmt::Debug for StickyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StickyKey(..)")
    }
}

impl StickyKey {
    /// A key from its 16 bytes.
    pub(crate) fn new(key: [u8; 16]) -> Self {
        let mut tags = [[0u8; TAG_LEN]; 100];
        for (b, tag) in tags.iter_mut().enumerate() {
            let mut h = Sha256::new();
            h.update(b"switchyard sticky bucket\0");
            h.update(key);
            h.update([b as u8]);
            let digest = h.finalize();
            for (i, byte) in digest.iter().take(TAG_LEN / 2).enumerate() {
                tag[2 * i] = HEX[usize::from(byte >> 4)];
                tag[2 * i + 1] = HEX[usize::from(byte & 0xf)];
            }
        }
        StickyKey {
            key,
            tags,
            shared: false,
        }
    }

    /// The key several proxies derive from one shared secret (`sticky_key_file`): the first
    /// 16 bytes of SHA-256 over the secret, surrounding whitespace ignored. At least 16
    /// characters, so a placeholder like `changeme` is refused rather than trusted.
    pub(crate) fn from_secret(secret: &[u8]) -> Result<Self, String> {
        let secret = secret.trim_ascii();
        if secret.len() < 16 {
            return Err(format!(
                "the secret is {} bytes; at least 16 are needed",
                secret.len()
            ));
        }
        let mut h = Sha256::new();
        h.update(b"switchyard sticky key\0");
        h.update(secret);
        let d = h.finalize();
        let mut key = [0u8; 16];
        key.copy_from_slice(&d[..16]);
        Ok(StickyKey {
            shared: true,
            ..StickyKey::new(key)
        })
    }

    /// The key from a `sticky_key_file`; the error names the file. Only a regular file of at
    /// most 8 KiB is read (a secret is short; a path mistaken for `/dev/urandom` or a FIFO
    /// must not hang a start, or a reload that holds the writer lock); the secret itself,
    /// surrounding whitespace trimmed, is 16 to 4096 bytes.
    pub(crate) fn from_file(path: &std::path::Path) -> Result<Self, String> {
        const MAX_FILE: u64 = 8192;
        const MAX_SECRET: usize = 4096;
        let meta =
            std::fs::metadata(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        if !meta.is_file() {
            return Err(format!("{}: not a regular file", path.display()));
        }
        if meta.len() > MAX_FILE {
            return Err(format!(
                "{}: {} bytes; a secret file is at most {MAX_FILE}",
                path.display(),
                meta.len()
            ));
        }
        let bytes =
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        if bytes.trim_ascii().len() > MAX_SECRET {
            return Err(format!(
                "{}: the secret is longer than {MAX_SECRET} bytes",
                path.display()
            ));
        }
        StickyKey::from_secret(&bytes).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// A fresh random key.
    pub(crate) fn random() -> std::io::Result<Self> {
        let mut key = [0u8; 16];
        getrandom::fill(&mut key).map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(StickyKey::new(key))
    }

    /// A fresh key: random, or — should the OS have no randomness to give — derived from the
    /// time and the process id (cookies are then guessable, which costs nothing `X-Canary`
    /// does not give away anyway), said loudly.
    pub(crate) fn generate() -> Self {
        StickyKey::random().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "no randomness for the sticky-cookie key; deriving it from the time");
            let mut h = Sha256::new();
            h.update(format!("{:?} {}", std::time::SystemTime::now(), std::process::id()));
            let d = h.finalize();
            let mut key = [0u8; 16];
            key.copy_from_slice(&d[..16]);
            StickyKey::new(key)
        })
    }

    /// The key as 32 hex digits (state file).
    pub(crate) fn to_hex(&self) -> String {
        self.key
            .iter()
            .flat_map(|b| [HEX[usize::from(b >> 4)], HEX[usize::from(b & 0xf)]])
            .map(char::from)
            .collect()
    }

    /// The key from 32 hex digits.
    pub(crate) fn from_hex(s: &str) -> Option<Self> {
        let bytes = s.as_bytes();
        if bytes.len() != 32 {
            return None;
        }
        let mut key = [0u8; 16];
        for (i, k) in key.iter_mut().enumerate() {
            *k = (hex_val(bytes[2 * i])? << 4) | hex_val(bytes[2 * i + 1])?;
        }
        Some(StickyKey::new(key))
    }

    /// The cookie value for `bucket`: `<bucket>.<tag>`.
    pub(crate) fn cookie_value(&self, bucket: u8) -> String {
        let b = usize::from(bucket) % 100;
        let tag = std::str::from_utf8(&self.tags[b]).unwrap_or_default();
        format!("{b}.{tag}")
    }

    /// The `Set-Cookie` header giving a client `bucket`: a session cookie for the whole site,
    /// out of scripts' reach, sent on same-site requests and top-level navigations; `Secure`
    /// when the client came over TLS so it never travels in clear text afterwards.
    pub(crate) fn set_cookie(&self, name: &str, bucket: u8, tls: bool) -> String {
        let secure = if tls { "; Secure" } else { "" };
        format!(
            "{name}={}; Path=/; HttpOnly; SameSite=Lax{secure}",
            self.cookie_value(bucket)
        )
    }

    /// The bucket of a cookie value this key issued; `None` for anything else.
    pub(crate) fn verify(&self, value: &[u8]) -> Option<u8> {
        let dot = value.iter().position(|c| *c == b'.')?;
        let (num, tag) = (&value[..dot], &value[dot + 1..]);
        if num.is_empty() || num.len() > 2 || !num.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let b = num.iter().fold(0u8, |acc, d| acc * 10 + (d - b'0'));
        // "07" is not how the proxy writes 7.
        if num.len() == 2 && num[0] == b'0' {
            return None;
        }
        (self.tags[usize::from(b)] == tag).then_some(b)
    }

    /// The bucket carried by cookie `name` in the request's `Cookie` headers, if this key
    /// issued it.
    pub(crate) fn bucket_in_cookies<'a>(
        &self,
        name: &str,
        cookie_headers: impl Iterator<Item = &'a [u8]>,
    ) -> Option<u8> {
        let name = name.as_bytes();
        for header in cookie_headers {
            for pair in header.split(|c| *c == b';') {
                let pair = pair.trim_ascii();
                let Some(eq) = pair.iter().position(|c| *c == b'=') else {
                    continue;
                };
                if pair[..eq].trim_ascii() == name {
                    let value = pair[eq + 1..].trim_ascii();
                    let value = value
                        .strip_prefix(b"\"")
                        .and_then(|v| v.strip_suffix(b"\""))
                        .unwrap_or(value);
                    // The first cookie of that name decides (the most specific path comes
                    // first, RFC 6265 §5.4); a bad one is not rescued by a later one.
                    return self.verify(value);
                }
            }
        }
        None
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// The bucket of a sticky header value: FNV-1a 64 modulo 100 (documented; never change it).
pub(crate) fn header_bucket(value: &[u8]) -> u8 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in value {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % 100) as u8
}

/// What keeps a client on its pool, with the header name resolved.
#[derive(Debug, Clone)]
pub(crate) enum StickyBy {
    None,
    Cookie,
    Header(http::HeaderName),
}

/// The header names an upstream's pool decision reads, parsed once per state (not per
/// request).
#[derive(Debug, Clone)]
pub(crate) struct HeaderNames {
    pub(crate) preview: Option<http::HeaderName>,
    pub(crate) force: Option<http::HeaderName>,
    pub(crate) sticky: StickyBy,
}

impl HeaderNames {
    /// From the upstream's config (validated as header names, so parsing cannot fail; if it
    /// somehow did, that rule is off).
    pub(crate) fn new(cfg: &switchyard_config::UpstreamConfig) -> Self {
        let name = |s: &str| http::HeaderName::from_bytes(s.as_bytes()).ok();
        HeaderNames {
            preview: name(&cfg.preview.header),
            force: name(&cfg.canary.force_header),
            sticky: match &cfg.canary.sticky {
                switchyard_config::Sticky::None => StickyBy::None,
                switchyard_config::Sticky::Cookie => StickyBy::Cookie,
                switchyard_config::Sticky::Header(h) => {
                    name(h).map_or(StickyBy::None, StickyBy::Header)
                }
            },
        }
    }
}

/// Whether a response's `Cache-Control` values let a shared cache (a CDN, a corporate proxy)
/// store it: `public` or `s-maxage`. Such a response must not carry a client's sticky cookie,
/// or the cache hands that one bucket to everyone it serves the response to.
pub(crate) fn shared_cacheable<'a>(cache_control: impl IntoIterator<Item = &'a [u8]>) -> bool {
    cache_control.into_iter().any(|value| {
        value.split(|c| *c == b',').any(|directive| {
            let d = directive.trim_ascii();
            let name = d
                .split(|c| *c == b'=')
                .next()
                .unwrap_or_default()
                .trim_ascii();
            name.eq_ignore_ascii_case(b"public") || name.eq_ignore_ascii_case(b"s-maxage")
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_a_shared_cache_may_store_get_no_sticky_cookie() {
        let cc = |v: &[&'static str]| shared_cacheable(v.iter().map(|s| s.as_bytes()));
        assert!(cc(&["public, max-age=60"]));
        assert!(cc(&["max-age=0", "S-MAXAGE = 30"]));
        assert!(cc(&["Public"]));
        assert!(!cc(&["private, max-age=60"]));
        assert!(!cc(&["no-store"]));
        assert!(
            !cc(&["max-age=60"]),
            "browser-only caching keeps the cookie"
        );
        assert!(!cc(&[]));
        assert!(!cc(&["publicity"]));
    }

    #[test]
    fn proxies_sharing_a_secret_issue_the_same_cookies() {
        let a = StickyKey::from_secret(b"0123456789abcdef-shared\n").unwrap();
        let b = StickyKey::from_secret(b"  0123456789abcdef-shared").unwrap();
        assert_eq!(a.to_hex(), b.to_hex());
        let cookie = a.cookie_value(42);
        assert_eq!(b.verify(cookie.as_bytes()), Some(42));
        let other = StickyKey::from_secret(b"another secret, 16+ bytes").unwrap();
        assert_eq!(other.verify(cookie.as_bytes()), None);
        let short = StickyKey::from_secret(b"changeme\n").unwrap_err();
        assert!(short.contains("8 bytes; at least 16"), "{short}");
        // Files: a directory, /dev/urandom (not regular), too long; 4096 + newline is fine.
        let dir = tempfile::tempdir().unwrap();
        assert!(StickyKey::from_file(dir.path())
            .unwrap_err()
            .contains("not a regular file"));
        let urandom = std::path::Path::new("/dev/urandom");
        if urandom.exists() {
            assert!(StickyKey::from_file(urandom)
                .unwrap_err()
                .contains("not a regular file"));
        }
        let f = dir.path().join("secret");
        std::fs::write(&f, format!("{}\n", "s".repeat(4096))).unwrap();
        assert!(StickyKey::from_file(&f).is_ok());
        std::fs::write(&f, "s".repeat(4097)).unwrap();
        assert!(StickyKey::from_file(&f)
            .unwrap_err()
            .contains("longer than 4096"));
    }

    #[test]
    fn the_cookie_is_secure_over_tls() {
        let key = StickyKey::new([7; 16]);
        let plain = key.set_cookie("sy_canary", 3, false);
        assert!(plain.starts_with("sy_canary=3."), "{plain}");
        assert!(
            plain.ends_with("; Path=/; HttpOnly; SameSite=Lax"),
            "{plain}"
        );
        let tls = key.set_cookie("sy_canary", 3, true);
        assert!(tls.ends_with("; SameSite=Lax; Secure"), "{tls}");
    }

    #[test]
    fn issued_cookies_verify_and_anything_else_is_absent() {
        let k = StickyKey::new([7; 16]);
        for b in 0..100u8 {
            let v = k.cookie_value(b);
            assert_eq!(k.verify(v.as_bytes()), Some(b), "{v}");
        }
        let v = k.cookie_value(42);
        let tag = v.split_once('.').unwrap().1;
        for bad in [
            String::new(),
            "42".into(),
            "42.".into(),
            format!("43.{tag}"),
            format!("042.{tag}"),
            format!("-42.{tag}"),
            format!("142.{tag}"),
            format!("42.{}", &tag[..11]),
            format!("42.{tag}0"),
            format!("42.{}", tag.to_uppercase()),
            "99999999999999999999.0".into(),
        ] {
            assert_eq!(k.verify(bad.as_bytes()), None, "{bad:?}");
        }
        let other = StickyKey::new([8; 16]);
        assert_eq!(other.verify(v.as_bytes()), None, "another key's cookie");
    }

    #[test]
    fn the_cookie_is_found_among_others() {
        let k = StickyKey::new([1; 16]);
        let v = k.cookie_value(3);
        let hdr = format!("a=1; switchyard_pool={v}; b=2");
        let hdrs = [b"x=y".as_slice(), hdr.as_bytes()];
        assert_eq!(
            k.bucket_in_cookies("switchyard_pool", hdrs.iter().copied()),
            Some(3)
        );
        let quoted = format!("switchyard_pool=\"{v}\"");
        assert_eq!(
            k.bucket_in_cookies("switchyard_pool", [quoted.as_bytes()].into_iter()),
            Some(3)
        );
        assert_eq!(
            k.bucket_in_cookies("switchyard_pool_x", [hdr.as_bytes()].into_iter()),
            None
        );
        assert_eq!(
            k.bucket_in_cookies(
                "switchyard_pool",
                [b";;=;==; switchyard_pool".as_slice()].into_iter()
            ),
            None
        );
    }

    #[test]
    fn the_key_survives_hex() {
        let k = StickyKey::random().unwrap();
        let back = StickyKey::from_hex(&k.to_hex()).unwrap();
        assert_eq!(back.cookie_value(9), k.cookie_value(9));
        assert!(StickyKey::from_hex("zz").is_none());
        assert!(StickyKey::from_hex(&"g".repeat(32)).is_none());
    }

    #[test]
    fn header_hash_is_the_documented_fnv1a() {
        // FNV-1a 64 of "" is the offset basis; of "a" is 0xaf63dc4c8601ec8c (published
        // test vectors).
        assert_eq!(header_bucket(b""), (0xcbf2_9ce4_8422_2325u64 % 100) as u8);
        assert_eq!(header_bucket(b"a"), (0xaf63_dc4c_8601_ec8cu64 % 100) as u8);
        assert_eq!(
            header_bucket(b"foobar"),
            (0x8594_4171_f739_67e8u64 % 100) as u8
        );
        // Spread: 10k user ids land in every bucket.
        let mut seen = [0u32; 100];
        for i in 0..10_000 {
            seen[usize::from(header_bucket(format!("user-{i}").as_bytes()))] += 1;
        }
        assert!(seen.iter().all(|n| (50..=150).contains(n)), "{seen:?}");
    }
}
