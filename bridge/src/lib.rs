//! The page <-> worker protocol of Hearth, defined once for both sides.
//!
//! Every tab talks to the device's one SharedWorker through a `MessagePort`. Both ends are
//! Rust compiled to wasm (`hearth-page` in the tab, `hearth-worker` in the worker), so the
//! messages are plain Rust enums here and nothing is mirrored by hand in JavaScript.
//!
//! Layout:
//! - [`Value`], [`Rows`]: SQL values and result sets as they cross the port.
//! - [`PageMessage`] / [`Request`]: what a tab asks; [`WorkerMessage`] / [`Reply`]: answers.
//! - [`Notice`]: what the worker pushes unasked: live query results, status, changes,
//!   rejected writes.
//! - [`ErrorReply`] / [`ErrorCode`]: failures, with the stable code the JS API exposes.
//! - [`encode`] / [`decode`]: the frame format. A frame is postcard bytes of
//!   `(PROTOCOL_VERSION, message)`. Postcard has no schema, so a peer built from other
//!   sources would misread fields silently; the version prefix turns that into a clear
//!   [`DecodeError::VersionMismatch`]. **The prefix stays a `u16` forever**, so that any two
//!   versions can at least tell that they disagree.
//!
//! This crate knows nothing about the browser, so it builds and is tested natively.

use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// Bump on any change to the messages below that an older peer would misread.
/// 3: `Request::EditText` and `Request::Resolve`, `ErrorCode` learns `INVALID_ARGUMENT`
/// from the engine.
/// 4: stream subscriptions: `Request::SubscribeStream`, `UnsubscribeStream`,
/// `Subscriptions`; `Notice::Loaded`, `Notice::SubscriptionRefused`; `Reply::StreamSubscribed`,
/// `StreamUnsubscribed`, `Subscriptions`; `ErrorCode::BadSubscription`,
/// `TooManySubscriptions`; rooms: `Request::JoinRoom`, `LeaveRoom`, `SendToRoom`;
/// `Notice::RoomMembers`, `RoomMessage`, `RoomRefused`; `Reply::RoomJoined`, `RoomLeft`,
/// `RoomSent`; `ErrorCode::BadRoom` .. `NotInRoom`.
/// 5: identity: `Request::Open`'s `token` and `reset`, `Request::SetToken`,
/// `Notice::TokenNeeded`, `ErrorCode::Auth`, `AuthExpired`, `AuthUserChanged`.
/// 6: the outbox as the app sees it: `Request::Settled`, `Pending`, `Discard`;
/// `Reply::Settled`, `Pending`, `Discarded`; `Notice::Rejected`'s `undone`;
/// `ErrorCode::NotPending`, `Sent`, `UnknownMutation`.
pub const PROTOCOL_VERSION: u16 = 6;

/// The largest frame either side accepts. A bound keeps one runaway query result from
/// exhausting a tab's memory; hitting it is a clear error, never a silent truncation.
pub const FRAME_BYTES_MAX: usize = 64 * 1024 * 1024;

/// An SQLite value, as it crosses the port.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Value {
    Null,
    Integer(i64),
    Real(f64),
    Text(String),
    Blob(Vec<u8>),
}

/// A result set: column names once, then one `Vec<Value>` per row in column order.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Rows {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Value>>,
}

/// One positional edit of a `text` column, as an editor reports it: at `index`, delete
/// `delete` characters, then insert `insert`. Positions and counts are in Unicode scalar
/// values (code points), not UTF-16 units nor bytes; each edit applies to the text the
/// previous one left.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TextEdit {
    pub index: u64,
    pub delete: u64,
    pub insert: String,
}

/// A stream parameter: one value, or a list (for a condition `col IN :name`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum StreamParam {
    One(Value),
    Many(Vec<Value>),
}

/// One of the device's stream subscriptions, as tabs see it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamSubscription {
    /// The device's number for this stream and these parameters: the same for every tab
    /// that subscribes to them.
    pub id: u64,
    pub stream: String,
    /// By parameter name.
    pub params: Vec<(String, StreamParam)>,
    /// Whether its initial load is complete (and durable on the device).
    pub loaded: bool,
    /// Rows its initial load has brought so far.
    pub rows: u64,
    /// How many tabs hold it now. 0: no tab has claimed it since the worker started (a
    /// restart) or since the tabs that held it went away; it stays on the device.
    pub tabs: u32,
}

/// A row, named by its table and primary key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RowRef {
    pub table: String,
    pub key: Value,
}

/// The server's verdict on one local write ([`Request::Settled`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Verdict {
    /// Applied as the server's log entry `server_seq`.
    Applied { server_seq: u64 },
    /// Refused by the server (or `TOO_LARGE`, or `DISCARDED` by the app); its effects
    /// were undone on the device: `undone` lists the rows it had written.
    Rejected {
        code: String,
        reason: String,
        undone: Vec<RowRef>,
    },
}

/// One write of the outbox ([`Request::Pending`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PendingWrite {
    pub mutation: u64,
    /// The tables it writes, sorted.
    pub tables: Vec<String>,
    /// The rows it writes, each once.
    pub rows: Vec<RowRef>,
    /// When it was made, in milliseconds since the Unix epoch (the device's hybrid
    /// logical clock).
    pub made_at_ms: u64,
    /// How many times it went out to the server.
    pub attempts: u64,
    /// It went out at least once, so the server may have it: it can no longer be
    /// discarded.
    pub sent: bool,
}

/// A message from a tab to the worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum PageMessage {
    /// `id` is chosen by the tab and echoed in the [`WorkerMessage::Response`]; it is unique
    /// only per port, so the worker never compares ids across tabs.
    Request { id: u32, request: Request },
    /// The tab is going away (pagehide): drop its live queries and waiters now. A tab that
    /// dies without saying so is found through its Web Lock (see [`Request::Open`]).
    Bye,
    /// The tab's browser says the network came back (`true`) or went away (`false`). The
    /// worker reconnects at once on `true`, and on `false` closes its socket until a tab
    /// (or its own `online` event) says the network is back.
    Network { online: bool },
}

/// What a tab can ask of the worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// The first message of every tab. `server` is the sync endpoint (the first tab's
    /// choice wins for the worker's lifetime). `tab_lock` names a Web Lock the tab holds
    /// for as long as it lives: when the worker is granted it, the tab is gone. The reply,
    /// [`Reply::Opened`], comes once the database has a schema (from storage at once, or
    /// from the server's first Welcome on a fresh device).
    ///
    /// `token` is the user's token (a JWT) for a server whose schema has `[auth]`; a
    /// database belongs to the user it first synced as, and a token for another user is
    /// refused ([`ErrorCode::AuthUserChanged`]) unless `reset`, which wipes the database
    /// (pending writes included) and starts it anew for the new user.
    Open {
        server: String,
        tab_lock: String,
        token: Option<String>,
        reset: bool,
    },
    /// A new token (after [`Notice::TokenNeeded`]): the worker connects with it at once.
    SetToken { token: String },
    /// Run statements that change the database, as one transaction. The reply comes only
    /// once the change is durable in the device's storage, not merely committed in memory.
    Exec { sql: String, params: Vec<Value> },
    /// Run one read-only statement and return its rows.
    Query { sql: String, params: Vec<Value> },
    /// Start a live query: the reply carries the first rows, and after every change to a
    /// table the query reads the worker sends [`Notice::LiveRows`] tagged with this
    /// request's id, until [`Request::Unsubscribe`] or the tab goes away.
    Subscribe { sql: String, params: Vec<Value> },
    /// Stop the live query started by request `live_id` of this tab.
    Unsubscribe { live_id: u32 },
    /// Resolve once the outbox is empty, the device has caught up with the server and that
    /// state is durable; fail with [`ErrorCode::Offline`] after `timeout_ms`.
    Sync { timeout_ms: u32 },
    /// The current [`SyncStatus`].
    Status,
    /// Edit the `text` column `column` of the row of `table` whose primary key is `key`,
    /// by position. Like [`Request::Exec`]: one local transaction, answered with
    /// [`Reply::Exec`] once durable; `InvalidArgument` for an unknown table, column or row,
    /// a column that is not `text`, or an edit outside the text.
    EditText {
        table: String,
        key: Value,
        column: String,
        edits: Vec<TextEdit>,
    },
    /// Resolve the open manual-merge conflict `conflict_id` (a row of `hearth_conflicts`)
    /// by writing `value` to its cell. Like [`Request::Exec`]: answered with
    /// [`Reply::Exec`] once durable; `InvalidArgument` when no such conflict is open.
    Resolve { conflict_id: String, value: Value },
    /// Follow the schema's stream `stream` with these parameters (a device subscription,
    /// shared by its tabs: see [`Reply::StreamSubscribed`]). The tab holds it until
    /// [`Request::UnsubscribeStream`]; the worker counts holds across tabs and
    /// unsubscribes the engine when the last hold is released. A tab that goes away
    /// releases its holds without unsubscribing the engine (the subscription stays, as
    /// after a restart). `InvalidArgument` for an unknown stream or bad parameters.
    SubscribeStream {
        stream: String,
        params: Vec<(String, StreamParam)>,
    },
    /// Release one hold this tab took on subscription `id` with
    /// [`Request::SubscribeStream`]. Answered with [`Reply::StreamUnsubscribed`] (whether
    /// the engine unsubscribed: this was the last hold) once the eviction is durable; a tab
    /// holding none of `id` changes nothing.
    UnsubscribeStream { id: u64 },
    /// The device's stream subscriptions: [`Reply::Subscriptions`].
    Subscriptions,
    /// Join room `room` as this tab with presence `state` (JSON text), or set this tab's
    /// state in it. Ephemeral: nothing of it is stored. Answered with [`Reply::RoomJoined`]
    /// once checked against the bounds and handed to the socket (or kept for the next
    /// connection while offline); the worker rejoins on every reconnect. The member list
    /// arrives as [`Notice::RoomMembers`]; a server refusal as [`Notice::RoomRefused`].
    JoinRoom { room: String, state: String },
    /// This tab leaves `room` ([`Reply::RoomLeft`]).
    LeaveRoom { room: String },
    /// A fire-and-forget `message` (JSON text) for the room's other members
    /// ([`Reply::RoomSent`]); the server relays them coalesced, latest wins per sender.
    SendToRoom { room: String, message: String },
    /// The verdict on local write `mutation` (the `mutation` of a [`Reply::Exec`]), as
    /// [`Reply::Settled`] once the server gave it (at once if it has). `UnknownMutation`
    /// for a write this device does not know.
    Settled { mutation: u64 },
    /// The outbox: [`Reply::Pending`].
    Pending,
    /// Drop pending write `mutation` on purpose: undone, never sent, settled as rejected
    /// with code `DISCARDED` (every tab hears it as [`Notice::Rejected`]). Answered with
    /// [`Reply::Discarded`] once durable; `NotPending` or `Sent` otherwise.
    Discard { mutation: u64 },
}

/// A member of a room, as a tab sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomMember {
    /// The member's device.
    pub client_id: u64,
    /// The tab on that device (the worker's number for it).
    pub tab: u64,
    /// Its presence state, JSON text.
    pub state: String,
    /// When it joined, in the server's milliseconds since the Unix epoch.
    pub since_ms: u64,
    /// This is the tab the notice is for.
    pub me: bool,
}

/// A message from the worker to a tab.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum WorkerMessage {
    Response {
        id: u32,
        result: Result<Reply, ErrorReply>,
    },
    /// Something the tab did not ask for this time.
    Notice(Notice),
}

/// What the worker pushes to tabs unasked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Notice {
    /// New rows of the live query started by this tab's request `live_id`, or the error
    /// re-running it gave.
    LiveRows {
        live_id: u32,
        result: Result<Rows, ErrorReply>,
    },
    /// The sync status changed. Sent to every tab.
    Status(SyncStatus),
    /// Rows of these tables changed (a local write from any tab, server changes, or a
    /// rollback). Sent to every tab.
    Changed { tables: Vec<String> },
    /// The server refused mutation `mutation`; its effects were undone on this device.
    /// Sent to every tab.
    Rejected {
        mutation: u64,
        code: String,
        reason: String,
        /// The rows the write had written, now as the server has them.
        undone: Vec<RowRef>,
    },
    /// A chunk of the initial load of subscription `id` is in the database and durable:
    /// `rows` so far; `done` when the load is complete. Sent to every tab.
    Loaded { id: u64, rows: u64, done: bool },
    /// The server refused subscription `id` (`code` is its `BAD_SUBSCRIPTION` or
    /// `TOO_MANY_SUBSCRIPTIONS`); the device dropped it and every tab's holds on it. Sent
    /// to every tab.
    SubscriptionRefused {
        id: u64,
        code: String,
        reason: String,
    },
    /// Who is in `room` now (this tab included while the server has it), sent to each tab
    /// in the room whenever it changes; empty while the device is offline.
    RoomMembers {
        room: String,
        members: Vec<RoomMember>,
    },
    /// A message another member broadcast to `room` (never the tab's own).
    RoomMessage {
        room: String,
        client_id: u64,
        tab: u64,
        message: String,
    },
    /// The server refused this tab's join or message for `room` (`code` is one of the
    /// room codes of [`ErrorCode`]); after a refused join the tab is not in the room.
    RoomRefused {
        room: String,
        code: String,
        reason: String,
    },
    /// The server refused the token (`code` AUTH, naming the failed check) or it expired
    /// (AUTH_EXPIRED): the worker does not connect again until a tab sends
    /// [`Request::SetToken`]. Pending writes stay. Sent to every tab.
    TokenNeeded { code: String, message: String },
}

/// The device's sync state as tabs see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SyncStatus {
    /// Connected to the server and past the handshake.
    pub online: bool,
    /// Connected and every change the server had when it last answered is applied.
    pub caught_up: bool,
    /// Local mutations the server has not yet applied or refused.
    pub pending: u64,
    /// The last server sequence number applied on this device.
    pub server_seq: u64,
    /// The schema version this device has, if any.
    pub schema_version: Option<u64>,
    /// The server's schema is older than this device's (`SCHEMA_AHEAD`):
    /// the worker sends nothing (the writes wait) and tries again with
    /// backoff until the server has the device's version.
    pub schema_ahead: bool,
}

/// A successful answer to a [`Request`] of the same kind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Reply {
    Opened(SyncStatus),
    /// `mutation` is the sequence number of the mutation the exec made, or `None` when it
    /// changed no synced row.
    Exec {
        mutation: Option<u64>,
        rows_affected: u64,
    },
    Query(Rows),
    /// The first rows of a live query.
    Subscribed(Rows),
    Unsubscribed,
    /// The worker took a new token ([`Request::SetToken`]).
    TokenSet,
    Synced(SyncStatus),
    Status(SyncStatus),
    /// The subscription a [`Request::SubscribeStream`] holds, as of now (durable). When
    /// `loaded` is false, [`Notice::Loaded`] with `done` (or
    /// [`Notice::SubscriptionRefused`]) follows for its id.
    StreamSubscribed(StreamSubscription),
    /// `dropped`: this was the last hold, so the device unsubscribed (rows no other
    /// subscription holds are gone, durably).
    StreamUnsubscribed {
        dropped: bool,
    },
    Subscriptions(Vec<StreamSubscription>),
    RoomJoined,
    RoomLeft,
    RoomSent,
    Settled(Verdict),
    Pending(Vec<PendingWrite>),
    /// The rows the discarded write had written.
    Discarded {
        undone: Vec<RowRef>,
    },
}

/// A failed request: the stable code the page turns into `Error.code`, and a message
/// for humans.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorReply {
    pub code: ErrorCode,
    pub message: String,
}

/// Failure classes that a page can act on. Their [`ErrorCode::as_str`] spellings are part
/// of the public JS API and never change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// SQLite refused the statement: syntax, unknown table, constraint, parameter count.
    SqlError,
    /// The device's storage failed (IndexedDB unavailable, quota, flush failed).
    Storage,
    /// A frame could not be decoded, or broke a bound.
    Protocol,
    /// The tab and the worker were built from different protocol versions; reloading
    /// every tab of the app fixes it.
    VersionMismatch,
    /// The worker's request queue is full; the request was not run.
    Busy,
    /// The database is not open (opening failed or it was closed).
    Closed,
    /// The page passed something the API cannot take, such as an object as an SQL
    /// parameter, or `editText`/`resolve` named a table, column, row or conflict that is
    /// not there (or a column of another merge policy, an edit outside the text).
    InvalidArgument,
    /// The server could not be reached in time (`sync`).
    Offline,
    /// The server refused a write; its effects were undone (the `rejected` event).
    Rejected,
    /// The database has no schema yet: it arrives with the first sync.
    NoSchema,
    /// The outbox holds as many pending writes as it may: sync before writing more.
    OutboxFull,
    /// One transaction's changes are too large for one mutation.
    TooLarge,
    /// The server's schema does not fit this device's database.
    Schema,
    /// The server reported an error.
    Server,
    /// The server refused a subscription: an unknown stream, or parameters missing,
    /// unknown, mistyped or too large for its schema.
    BadSubscription,
    /// The server refused a subscription: the device holds as many as it may.
    TooManySubscriptions,
    /// A room name that is empty, too long, or holds control characters.
    BadRoom,
    /// A presence state larger than the server takes.
    PresenceTooLarge,
    /// A room message larger than the server takes.
    MessageTooLarge,
    /// A presence state or room message that is not JSON.
    BadJson,
    /// The device is in as many rooms (counting each tab) as it may be.
    TooManyRooms,
    /// The room holds as many members as it may.
    RoomFull,
    /// A message to a room the tab has not joined.
    NotInRoom,
    /// `discard` of a write that is not pending: it settled already, or was never made.
    NotPending,
    /// `discard` of a write that went out to the server, which may have applied it: wait
    /// for its verdict (`settled`) instead.
    Sent,
    /// `settled` of a write this device does not know: never made, or settled more than
    /// `RECEIPTS_KEPT` writes ago.
    UnknownMutation,
    /// The server refused the token (the message names the failed check).
    Auth,
    /// The token expired; a new one is needed (pending writes stay).
    AuthExpired,
    /// The database belongs to another user than the token's: open it with `reset`.
    AuthUserChanged,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::SqlError => "SQL_ERROR",
            ErrorCode::Storage => "STORAGE",
            ErrorCode::Protocol => "PROTOCOL",
            ErrorCode::VersionMismatch => "VERSION_MISMATCH",
            ErrorCode::Busy => "BUSY",
            ErrorCode::Closed => "CLOSED",
            ErrorCode::InvalidArgument => "INVALID_ARGUMENT",
            ErrorCode::Offline => "OFFLINE",
            ErrorCode::Rejected => "REJECTED",
            ErrorCode::NoSchema => "NO_SCHEMA",
            ErrorCode::OutboxFull => "OUTBOX_FULL",
            ErrorCode::TooLarge => "TOO_LARGE",
            ErrorCode::Schema => "SCHEMA",
            ErrorCode::Server => "SERVER",
            ErrorCode::BadSubscription => "BAD_SUBSCRIPTION",
            ErrorCode::TooManySubscriptions => "TOO_MANY_SUBSCRIPTIONS",
            ErrorCode::BadRoom => "BAD_ROOM",
            ErrorCode::PresenceTooLarge => "PRESENCE_TOO_LARGE",
            ErrorCode::MessageTooLarge => "MESSAGE_TOO_LARGE",
            ErrorCode::BadJson => "BAD_JSON",
            ErrorCode::TooManyRooms => "TOO_MANY_ROOMS",
            ErrorCode::RoomFull => "ROOM_FULL",
            ErrorCode::NotInRoom => "NOT_IN_ROOM",
            ErrorCode::NotPending => "NOT_PENDING",
            ErrorCode::Sent => "SENT",
            ErrorCode::UnknownMutation => "UNKNOWN_MUTATION",
            ErrorCode::Auth => "AUTH",
            ErrorCode::AuthExpired => "AUTH_EXPIRED",
            ErrorCode::AuthUserChanged => "AUTH_USER_CHANGED",
        }
    }
}

impl ErrorCode {
    /// The code for one of `hearth_engine::ClientError::code()`'s spellings; anything it
    /// does not know is a protocol error, so a new engine code is noticed, not hidden.
    pub fn from_engine(code: &str) -> ErrorCode {
        match code {
            "SQL_ERROR" => ErrorCode::SqlError,
            "NO_SCHEMA" => ErrorCode::NoSchema,
            "OUTBOX_FULL" => ErrorCode::OutboxFull,
            "TOO_LARGE" => ErrorCode::TooLarge,
            "SCHEMA" => ErrorCode::Schema,
            "SERVER" => ErrorCode::Server,
            "INVALID_ARGUMENT" => ErrorCode::InvalidArgument,
            "BAD_SUBSCRIPTION" => ErrorCode::BadSubscription,
            "TOO_MANY_SUBSCRIPTIONS" => ErrorCode::TooManySubscriptions,
            "BAD_ROOM" => ErrorCode::BadRoom,
            "PRESENCE_TOO_LARGE" => ErrorCode::PresenceTooLarge,
            "MESSAGE_TOO_LARGE" => ErrorCode::MessageTooLarge,
            "BAD_JSON" => ErrorCode::BadJson,
            "TOO_MANY_ROOMS" => ErrorCode::TooManyRooms,
            "ROOM_FULL" => ErrorCode::RoomFull,
            "NOT_IN_ROOM" => ErrorCode::NotInRoom,
            "NOT_PENDING" => ErrorCode::NotPending,
            "SENT" => ErrorCode::Sent,
            "UNKNOWN_MUTATION" => ErrorCode::UnknownMutation,
            "AUTH" => ErrorCode::Auth,
            "AUTH_EXPIRED" => ErrorCode::AuthExpired,
            "AUTH_USER_CHANGED" => ErrorCode::AuthUserChanged,
            _ => ErrorCode::Protocol,
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl ErrorReply {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorReply {
            code,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for ErrorReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for ErrorReply {}

/// Why bytes from the other side could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("protocol version mismatch: this side speaks {ours}, the peer speaks {theirs}; reload every tab of this app")]
    VersionMismatch { ours: u16, theirs: u16 },
    #[error("frame of {frame_bytes} bytes is over the limit of {FRAME_BYTES_MAX} bytes")]
    TooLarge { frame_bytes: usize },
    #[error("malformed frame: {0}")]
    Malformed(#[from] postcard::Error),
}

impl From<DecodeError> for ErrorReply {
    fn from(err: DecodeError) -> Self {
        let code = match err {
            DecodeError::VersionMismatch { .. } => ErrorCode::VersionMismatch,
            DecodeError::TooLarge { .. } | DecodeError::Malformed(_) => ErrorCode::Protocol,
        };
        ErrorReply::new(code, err.to_string())
    }
}

/// Why a message could not be turned into a frame.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("message of {frame_bytes} bytes is over the limit of {FRAME_BYTES_MAX} bytes")]
    TooLarge { frame_bytes: usize },
    #[error("cannot encode message: {0}")]
    Postcard(#[from] postcard::Error),
}

/// Encodes `message` as one frame, prefixed with [`PROTOCOL_VERSION`].
pub fn encode<T: Serialize>(message: &T) -> Result<Vec<u8>, EncodeError> {
    let frame = postcard::to_allocvec(&(PROTOCOL_VERSION, message))?;
    if frame.len() > FRAME_BYTES_MAX {
        return Err(EncodeError::TooLarge {
            frame_bytes: frame.len(),
        });
    }
    Ok(frame)
}

/// Reads only the version prefix of a frame, so a side can report a mismatch even when it
/// cannot read the rest.
pub fn frame_version(frame: &[u8]) -> Result<u16, DecodeError> {
    let (version, _) = postcard::take_from_bytes::<u16>(frame)?;
    Ok(version)
}

/// Decodes one frame made by [`encode`] on a peer of the same [`PROTOCOL_VERSION`].
pub fn decode<T: DeserializeOwned>(frame: &[u8]) -> Result<T, DecodeError> {
    if frame.len() > FRAME_BYTES_MAX {
        return Err(DecodeError::TooLarge {
            frame_bytes: frame.len(),
        });
    }
    let (theirs, rest) = postcard::take_from_bytes::<u16>(frame)?;
    if theirs != PROTOCOL_VERSION {
        return Err(DecodeError::VersionMismatch {
            ours: PROTOCOL_VERSION,
            theirs,
        });
    }
    let (message, trailing) = postcard::take_from_bytes::<T>(rest)?;
    if !trailing.is_empty() {
        // Trailing bytes mean the peer's message has fields we do not know: a version
        // bump was forgotten. Refuse rather than act on half a message.
        return Err(DecodeError::Malformed(
            postcard::Error::DeserializeBadEncoding,
        ));
    }
    Ok(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trips() {
        let message = PageMessage::Request {
            id: 7,
            request: Request::Exec {
                sql: "INSERT INTO t VALUES (?, ?, ?, ?, ?)".into(),
                params: vec![
                    Value::Null,
                    Value::Integer(i64::MIN),
                    Value::Real(1.5),
                    Value::Text("héllo".into()),
                    Value::Blob(vec![0, 255]),
                ],
            },
        };
        let frame = encode(&message).unwrap();
        assert_eq!(decode::<PageMessage>(&frame).unwrap(), message);
        assert_eq!(frame_version(&frame).unwrap(), PROTOCOL_VERSION);
    }

    #[test]
    fn edit_text_and_resolve_round_trip() {
        let edit = PageMessage::Request {
            id: 3,
            request: Request::EditText {
                table: "todos".into(),
                key: Value::Text("t1".into()),
                column: "notes".into(),
                edits: vec![
                    TextEdit {
                        index: 2,
                        delete: 1,
                        insert: "é🦀".into(),
                    },
                    TextEdit {
                        index: 0,
                        delete: 0,
                        insert: String::new(),
                    },
                ],
            },
        };
        let resolve = PageMessage::Request {
            id: 4,
            request: Request::Resolve {
                conflict_id: "c1".into(),
                value: Value::Text("2026-01-01".into()),
            },
        };
        for message in [edit, resolve] {
            let frame = encode(&message).unwrap();
            assert_eq!(decode::<PageMessage>(&frame).unwrap(), message);
        }
    }

    #[test]
    fn response_round_trips() {
        let ok = WorkerMessage::Response {
            id: 1,
            result: Ok(Reply::Query(Rows {
                columns: vec!["a".into()],
                rows: vec![vec![Value::Integer(1)], vec![Value::Null]],
            })),
        };
        let err = WorkerMessage::Response {
            id: 2,
            result: Err(ErrorReply::new(ErrorCode::SqlError, "no such table: x")),
        };
        let notice = WorkerMessage::Notice(Notice::Status(SyncStatus {
            online: true,
            caught_up: false,
            pending: 3,
            server_seq: 42,
            schema_version: Some(1),
            schema_ahead: false,
        }));
        let live = WorkerMessage::Notice(Notice::LiveRows {
            live_id: 9,
            result: Ok(Rows::default()),
        });
        for message in [ok, err, notice, live] {
            let frame = encode(&message).unwrap();
            assert_eq!(decode::<WorkerMessage>(&frame).unwrap(), message);
        }
    }

    #[test]
    fn stream_subscriptions_round_trip() {
        let params = vec![
            (
                "list".to_string(),
                StreamParam::One(Value::Text("groceries".into())),
            ),
            (
                "states".to_string(),
                StreamParam::Many(vec![Value::Integer(1), Value::Null]),
            ),
        ];
        let requests = [
            Request::SubscribeStream {
                stream: "list_todos".into(),
                params: params.clone(),
            },
            Request::UnsubscribeStream { id: u64::MAX },
            Request::Subscriptions,
        ];
        for (id, request) in requests.into_iter().enumerate() {
            let message = PageMessage::Request {
                id: id as u32 + 1,
                request,
            };
            let frame = encode(&message).unwrap();
            assert_eq!(decode::<PageMessage>(&frame).unwrap(), message);
        }
        let sub = StreamSubscription {
            id: 42,
            stream: "list_todos".into(),
            params,
            loaded: false,
            rows: 7,
            tabs: 2,
        };
        let messages = [
            WorkerMessage::Response {
                id: 1,
                result: Ok(Reply::StreamSubscribed(sub.clone())),
            },
            WorkerMessage::Response {
                id: 2,
                result: Ok(Reply::StreamUnsubscribed { dropped: true }),
            },
            WorkerMessage::Response {
                id: 3,
                result: Ok(Reply::Subscriptions(vec![sub])),
            },
            WorkerMessage::Notice(Notice::Loaded {
                id: 42,
                rows: 1000,
                done: false,
            }),
            WorkerMessage::Notice(Notice::SubscriptionRefused {
                id: 42,
                code: "BAD_SUBSCRIPTION".into(),
                reason: "no".into(),
            }),
        ];
        for message in messages {
            let frame = encode(&message).unwrap();
            assert_eq!(decode::<WorkerMessage>(&frame).unwrap(), message);
        }
        for code in ["BAD_SUBSCRIPTION", "TOO_MANY_SUBSCRIPTIONS"] {
            assert_eq!(ErrorCode::from_engine(code).as_str(), code);
        }
    }

    #[test]
    fn rooms_round_trip() {
        let requests = [
            Request::JoinRoom {
                room: "doc:42".into(),
                state: r#"{"name":"ann"}"#.into(),
            },
            Request::SendToRoom {
                room: "doc:42".into(),
                message: "[1,2]".into(),
            },
            Request::LeaveRoom {
                room: "doc:42".into(),
            },
        ];
        for (id, request) in requests.into_iter().enumerate() {
            let message = PageMessage::Request {
                id: id as u32 + 1,
                request,
            };
            assert_eq!(
                decode::<PageMessage>(&encode(&message).unwrap()).unwrap(),
                message
            );
        }
        let messages = [
            WorkerMessage::Notice(Notice::RoomMembers {
                room: "doc:42".into(),
                members: vec![RoomMember {
                    client_id: u64::MAX,
                    tab: 3,
                    state: "{}".into(),
                    since_ms: 1_764_000_000_000,
                    me: true,
                }],
            }),
            WorkerMessage::Notice(Notice::RoomMessage {
                room: "doc:42".into(),
                client_id: 9,
                tab: 1,
                message: "\"hi\"".into(),
            }),
            WorkerMessage::Notice(Notice::RoomRefused {
                room: "doc:42".into(),
                code: "ROOM_FULL".into(),
                reason: "full".into(),
            }),
            WorkerMessage::Response {
                id: 4,
                result: Ok(Reply::RoomJoined),
            },
        ];
        for message in messages {
            let frame = encode(&message).unwrap();
            assert_eq!(decode::<WorkerMessage>(&frame).unwrap(), message);
        }
        for code in [
            "BAD_ROOM",
            "PRESENCE_TOO_LARGE",
            "MESSAGE_TOO_LARGE",
            "BAD_JSON",
            "TOO_MANY_ROOMS",
            "ROOM_FULL",
            "NOT_IN_ROOM",
        ] {
            assert_eq!(ErrorCode::from_engine(code).as_str(), code);
        }
    }

    #[test]
    fn other_version_is_a_clear_error() {
        let frame = postcard::to_allocvec(&(PROTOCOL_VERSION + 1, 0u8)).unwrap();
        let err = decode::<PageMessage>(&frame).unwrap_err();
        assert!(
            matches!(err, DecodeError::VersionMismatch { theirs, .. } if theirs == PROTOCOL_VERSION + 1)
        );
        assert_eq!(ErrorReply::from(err).code, ErrorCode::VersionMismatch);
    }

    #[test]
    fn garbage_and_trailing_bytes_are_refused() {
        assert!(matches!(
            decode::<PageMessage>(&[]),
            Err(DecodeError::Malformed(_))
        ));
        let mut frame = encode(&PageMessage::Request {
            id: 1,
            request: Request::Query {
                sql: "SELECT 1".into(),
                params: vec![],
            },
        })
        .unwrap();
        frame.push(0);
        assert!(matches!(
            decode::<PageMessage>(&frame),
            Err(DecodeError::Malformed(_))
        ));
    }

    #[test]
    fn error_codes_are_stable() {
        assert_eq!(ErrorCode::SqlError.as_str(), "SQL_ERROR");
        assert_eq!(ErrorCode::VersionMismatch.as_str(), "VERSION_MISMATCH");
        assert_eq!(ErrorCode::Offline.as_str(), "OFFLINE");
        assert_eq!(ErrorCode::Rejected.as_str(), "REJECTED");
        assert_eq!(ErrorCode::from_engine("NO_SCHEMA"), ErrorCode::NoSchema);
        assert_eq!(ErrorCode::from_engine("SQL_ERROR"), ErrorCode::SqlError);
        assert_eq!(
            ErrorCode::from_engine("INVALID_ARGUMENT"),
            ErrorCode::InvalidArgument
        );
    }
}
