//! `cargo +nightly fuzz run lifecycle`: see herald_fuzz::lifecycle.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| herald_fuzz::lifecycle(data));
