//! The web assets the server serves (demo app, `hearth.js`, worker, wasm),
//! built by `build.rs` and embedded in the binary.

include!(concat!(env!("OUT_DIR"), "/assets.rs"));
