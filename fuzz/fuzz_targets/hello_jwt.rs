//! `cargo +nightly fuzz run hello_jwt`: see herald_fuzz::hello_jwt.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| herald_fuzz::hello_jwt(data));
