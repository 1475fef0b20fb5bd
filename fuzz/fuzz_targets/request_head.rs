//! Any bytes as what a client sends: the door's head check and the chunked-body follower
//! never panic; a head that passes has a length within the input; the chunked follower gives
//! the same answer however the body is split.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "../../proxy/src/listen/chunked.rs"]
#[allow(dead_code, unreachable_pub)]
mod chunked;
#[path = "../../proxy/src/listen/head.rs"]
#[allow(dead_code, unreachable_pub)]
mod head;

fn follow(pieces: &[&[u8]]) -> Result<(usize, bool), chunked::Malformed> {
    let mut c = chunked::Chunked::default();
    let mut taken = 0;
    for p in pieces {
        taken += c.advance(p)?;
        if c.done() {
            break;
        }
    }
    Ok((taken, c.done()))
}

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = head::inspect(data) {
        assert!(h.skip + h.len <= data.len());
        if h.body == head::Body::Chunked {
            let body = &data[h.skip + h.len..];
            let whole = follow(&[body]);
            let cut = body
                .first()
                .map_or(0, |b| usize::from(*b) % (body.len() + 1));
            let split = follow(&[&body[..cut], &body[cut..]]);
            assert_eq!(whole, split, "split at {cut}");
            if let Ok((n, _)) = whole {
                assert!(n <= body.len());
            }
        }
    }
});
