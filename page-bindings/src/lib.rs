//! Hearth's page side: connects a tab to the device's SharedWorker and forwards requests.
//!
//! The tab never touches SQLite: it sends `hearth-bridge` frames through a `MessagePort`
//! to the SharedWorker (`hearth-worker`), which owns the database for every tab.
//!
//! Layout:
//! - [`client`]: the typed Rust API ([`client::Client`]) for Rust web apps, and the port
//!   plumbing: request ids, pending replies (bounded), failure of a whole port.
//! - [`js`]: the JavaScript API that `web/hearth.js` exposes as `Hearth.open(...)`,
//!   converting JS values to SQL values and errors to JS `Error`s with a stable `code`.
//!
//! Everything here is wasm32-only; on other targets the crate is empty.

#[cfg(target_arch = "wasm32")]
pub mod client;
#[cfg(target_arch = "wasm32")]
pub mod js;
