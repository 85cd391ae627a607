//! `cargo +nightly fuzz run frame`: see herald_fuzz::frame.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| herald_fuzz::frame(data));
