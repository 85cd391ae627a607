//! `cargo +nightly fuzz run publish_body`: see herald_fuzz::publish_body.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| herald_fuzz::publish_body(data));
