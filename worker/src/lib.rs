//! Hearth's browser host: the SharedWorker that owns a device's database.
//!
//! Every tab of an app connects to one SharedWorker per (origin, database name) through a
//! `MessagePort`. The worker is the only place that opens the database, because two
//! connections to the same IndexedDB-backed file would corrupt it.
//!
//! Layout:
//! - [`store`]: SQLite through rusqlite on sqlite-wasm-vfs's relaxed-idb VFS (IndexedDB),
//!   and the flush barrier that makes `exec` durable before it is answered.
//! - [`host`]: the SharedWorker glue: ports, the bounded request queue, replies. Its
//!   `run` is the entry point that `web/hearth-worker.js` calls.
//!
//! Messages are the enums of `hearth-bridge`. Everything here is wasm32-only; on other
//! targets the crate is empty so native workspace builds stay cheap.

#[cfg(target_arch = "wasm32")]
pub mod host;
#[cfg(target_arch = "wasm32")]
pub mod store;
