#![no_main]
//! See `hearth_fuzz::token`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| hearth_fuzz::token(data));
