#![no_main]
//! See `hearth_fuzz::server_frame`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| hearth_fuzz::server_frame(data));
