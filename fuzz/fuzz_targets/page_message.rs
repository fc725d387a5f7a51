#![no_main]
//! See `hearth_fuzz::bridge_frame`: a frame from a tab, as the worker decodes it.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    hearth_fuzz::bridge_frame::<hearth_bridge::PageMessage>(data)
});
