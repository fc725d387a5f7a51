#![no_main]
//! See `hearth_fuzz::client_frame`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| hearth_fuzz::client_frame(data));
