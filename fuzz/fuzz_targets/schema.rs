#![no_main]
//! See `hearth_fuzz::schema`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| hearth_fuzz::schema(data));
