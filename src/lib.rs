//! # hearth
//!
//! The `hearth` binary's library: the native client driver (the engine's
//! client state machine over a real WebSocket) and the web assets the server
//! embeds. `src/main.rs` is the command line on top (`serve`, `client`).

pub mod assets;
pub mod native_client;
