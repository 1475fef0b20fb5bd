//! Any `Cookie` header: reading the sticky bucket never panics, and a bucket comes back only
//! for a cookie value this key issued. Any sticky header value hashes into 0..100.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "../../proxy/src/routing/sticky.rs"]
#[allow(dead_code, unreachable_pub)]
mod sticky;

fuzz_target!(|data: &[u8]| {
    static KEY: std::sync::OnceLock<sticky::StickyKey> = std::sync::OnceLock::new();
    let key = KEY.get_or_init(|| sticky::StickyKey::new([9; 16]));
    if let Some(b) = key.bucket_in_cookies("switchyard_pool", [data].into_iter()) {
        assert!(b < 100);
        let issued = key.cookie_value(b);
        assert!(
            data.windows(issued.len()).any(|w| w == issued.as_bytes()),
            "bucket {b} from a cookie the key did not issue: {:?}",
            String::from_utf8_lossy(data)
        );
    }
    assert!(key.verify(data).is_none_or(|b| b < 100));
    assert!(sticky::header_bucket(data) < 100);
});
