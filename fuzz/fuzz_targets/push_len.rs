#![no_main]
//! See `hearth_fuzz::push_len`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| hearth_fuzz::push_len(data));
