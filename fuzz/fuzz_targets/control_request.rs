//! Any bytes as a control-socket line: decoding returns an error or a request, never panics;
//! a request survives the wire (serialize, parse again, same value).
#![no_main]
use libfuzzer_sys::fuzz_target;
use switchyard_control::Request;

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = serde_json::from_slice::<Request>(data) {
        let line = serde_json::to_vec(&req).expect("a request serializes");
        let back: Request = serde_json::from_slice(&line).expect("and parses again");
        assert_eq!(back, req);
        let _ = req.name();
    }
});
