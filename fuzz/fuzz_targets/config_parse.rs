//! Any bytes as a config file: parsing and validation return errors, never panic; a file that
//! validates has a summary.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(cfg) = switchyard_config::parse(text) {
            let _ = cfg.summary();
        }
    }
});
