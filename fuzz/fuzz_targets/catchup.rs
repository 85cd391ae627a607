//! `cargo +nightly fuzz run catchup`: see herald_fuzz::catchup.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| herald_fuzz::catchup(data));
