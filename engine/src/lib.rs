//! # hearth-engine
//!
//! The sans-io heart of Hearth, a local-first sync engine. It does no I/O but
//! SQLite: time, randomness and the network come in from the caller, so the
//! same code runs in the native CLI, in the browser's SharedWorker and in a
//! deterministic simulation of many devices.
//!
//! Layout:
//! - [`value`], [`hlc`]: SQL values and hybrid logical clock stamps.
//! - [`schema`]: the app's schema file, checked by SQLite itself.
//! - [`filter`]: stream conditions (`where`), evaluated as SQLite would.
//! - [`change`]: the change model (mutations, row and column changes, log entries).
//! - [`protocol`]: client/server messages and their versioned binary codec.
//! - [`client`]: the device: change capture, outbox, rebase and rollback.
//! - [`server`]: the server's merge, dedup and change log over its store.
//! - [`link`]: the server's side of one device connection (what it sends,
//!   filters or refuses); [`fanout`]: which connections a log entry concerns.
//! - [`rooms`]: rooms, presence and broadcast: the server's ephemeral
//!   registry, never in the log or a database.
//! - [`validate`]: the app's server rules in Rust (validators run in the
//!   merge transaction) and the context they read the store through.
//! - [`merge`]: the merge policies (lww, counter, set, text, manual), pure functions
//!   used by device capture and the server's merge.
//! - `rows`: row-level SQL shared by both halves; `textcells`: where text
//!   cells keep their CRDT documents.

mod authorize;
pub mod change;
pub mod client;
pub mod fanout;
pub mod filter;
mod fk;
pub mod hlc;
pub mod link;
pub mod merge;
pub mod migrate;
pub mod protocol;
pub mod rooms;
mod rows;
pub mod rules;
pub mod schema;
pub mod server;
mod textcells;
pub mod validate;
pub mod value;

pub use change::{ColumnOp, LogEntry, Mutation, RowChange, RowOp};
pub use client::{
    Client, ClientConfig, ClientError, Event, ExecOutcome, Output, PendingWrite, QueryResult,
    Settlement, Status, Verdict,
};
pub use filter::{Filter, Param};
pub use hlc::{Clock, Hlc, Stamp};
pub use merge::text::TextEdit;
pub use protocol::{ClientMsg, ServerMsg, PROTOCOL_VERSION};
pub use schema::{Schema, SchemaError, Stream, DEMO_SCHEMA};
pub use server::{Outcome, ServerCore, ServerError};
pub use value::Value;
