//! The request id (SPEC §3 `request_id`, nginx's `$request_id`): one value per request that
//! the client, the access log and the app all see, so a support ticket's id finds the app's
//! log line and the proxy's.
//!
//! A client's id is kept when it is well-formed — 1 to 128 characters of letters, digits and
//! `-_.:+/=@` (UUIDs, ULIDs, trace ids, base64) — because a caller that already has one (a
//! gateway in front, a test harness) wants its id to go through. Anything else (too long,
//! spaces, quotes, control bytes that would forge log fields) is replaced by a generated UUID
//! v4, and the client's value is not forwarded.

use http::HeaderValue;

/// The longest client id kept.
pub(crate) const MAX_LEN: usize = 128;

/// Whether a client's id is kept as it is.
pub(crate) fn well_formed(v: &[u8]) -> bool {
    (1..=MAX_LEN).contains(&v.len())
        && v.iter()
            .all(|c| c.is_ascii_alphanumeric() || b"-_.:+/=@".contains(c))
}

/// A new id: a random (version 4) UUID, lower-case and hyphenated. The randomness is the
/// thread's fast generator — an id must be unique, not secret.
pub(crate) fn generate() -> HeaderValue {
    let mut bytes = [0u8; 16];
    fastrand::fill(&mut bytes);
    let id = uuid::Builder::from_random_bytes(bytes).into_uuid();
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let text = id.hyphenated().encode_lower(&mut buf);
    HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static("-"))
}

/// The id of a request: the client's `sent` value when well-formed, else a new one.
pub(crate) fn of(sent: Option<&HeaderValue>) -> HeaderValue {
    match sent {
        Some(v) if well_formed(v.as_bytes()) => v.clone(),
        _ => generate(),
    }
}

/// [`of`] for a value not yet in a `HeaderValue` (the fast path's parsed head).
pub(crate) fn of_bytes(sent: Option<&[u8]>) -> HeaderValue {
    match sent {
        Some(v) if well_formed(v) => HeaderValue::from_bytes(v).unwrap_or_else(|_| generate()),
        _ => generate(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_well_formed_id_is_kept_and_anything_else_replaced() {
        for kept in [
            "abc",
            "01ARZ3NDEKTSV4RRFFQ69G5FAV",
            "4bf92f3577b34da6a3ce929d0e0e4736",
            "a+b/c=",
            "svc-1:req.42@edge_7",
        ] {
            let v = HeaderValue::from_static(kept);
            assert_eq!(of(Some(&v)), v, "{kept}");
        }
        let long = HeaderValue::from_str(&"a".repeat(MAX_LEN + 1)).unwrap();
        let max = HeaderValue::from_str(&"a".repeat(MAX_LEN)).unwrap();
        assert_eq!(of(Some(&max)), max);
        for replaced in [
            HeaderValue::from_static(""),
            HeaderValue::from_static("a b"),
            HeaderValue::from_static("a\"b"),
            HeaderValue::from_static("x error=forged"),
            HeaderValue::from_bytes(b"caf\xc3\xa9").unwrap(),
            long,
        ] {
            let id = of(Some(&replaced));
            assert_ne!(id, replaced);
            assert!(is_uuid_v4(id.as_bytes()), "{id:?}");
        }
    }

    fn is_uuid_v4(v: &[u8]) -> bool {
        let s = std::str::from_utf8(v).unwrap_or_default();
        uuid::Uuid::parse_str(s).is_ok_and(|u| u.get_version_num() == 4) && s.len() == 36
    }

    #[test]
    fn generated_ids_are_uuid_v4_and_differ() {
        let a = generate();
        let b = generate();
        assert!(is_uuid_v4(a.as_bytes()) && is_uuid_v4(b.as_bytes()));
        assert_ne!(a, b);
    }
}
