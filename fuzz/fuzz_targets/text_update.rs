#![no_main]
//! See `hearth_fuzz::text_update`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| hearth_fuzz::text_update(data));
