#![no_main]
//! See `hearth_fuzz::filter`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| hearth_fuzz::filter(data));
