//! The device side: a SQLite database with change capture, a durable outbox
//! of pending mutations, and the sync state machine.
//!
//! The local database always shows the optimistic state: the server's state
//! as of the device's cursor, with every pending mutation applied on top.
//! Each pending mutation keeps the pre-image of the rows it touched, so when
//! server changes arrive (or the server refuses a mutation) the device can
//! undo its pending mutations, apply the server's changes, and redo what is
//! still pending: a rebase, in one SQLite transaction.
//!
//! Capture uses TEMP triggers (re-created on every open, so they never live
//! in the file and always match the schema in use): each touched row is noted
//! once per transaction in `temp._hearth_capture` with a bit mask of changed
//! columns, and its first pre-image is kept in a per-table temp shadow table.
//! When the transaction ends, `exec` turns the notes into one mutation and
//! writes it to the outbox in the same transaction.
//!
//! Layout: this file holds the types, `open` and the app-facing calls
//! (`exec`, `edit_text`, `resolve`, `query`); `capture` turns the app's SQL
//! into a mutation; `rebase` applies changes and keeps the optimistic state
//! (undo, redo, settle); `sync` is the session with the server.

mod capture;
mod rebase;
mod receipts;
mod subscribe;
mod sync;

use receipts::PendingRows;
pub use receipts::{PendingWrite, Settlement, Verdict, DISCARDED, RECEIPTS_KEPT};
pub use subscribe::{subscription_id, SubscriptionInfo};
pub use sync::token_subject;

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use fallible_iterator::FallibleIterator;
use rusqlite::hooks::{AuthAction, AuthContext, Authorization};
use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

use crate::change::{ColumnOp, LogEntry, Mutation, RowChange, RowOp, MUTATION_FORMAT};
use crate::hlc::{Clock, Hlc};
use crate::merge::text::{TextDoc, TextEdit};
use crate::merge::{counter, set};
use crate::protocol::{ClientMsg, ServerMsg};
use crate::rows;
use crate::schema::{ident, MergePolicy, Schema, SchemaError, Table, CONFLICTS_TABLE};
use crate::textcells::{Cell, TextCells, TextFailure};
use crate::value::Value;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("SQL error: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("this database has no schema yet: sync with the server first")]
    NoSchema,
    #[error("bad schema from server: {0}")]
    Schema(#[from] SchemaError),
    #[error("schema mismatch: {0}")]
    SchemaMismatch(String),
    /// The device's schema is newer than the server's (an app whose server
    /// went back to an older schema, or a device that synced with a newer
    /// server): it keeps working offline and sends nothing until the server
    /// has its version.
    #[error("{0}")]
    SchemaAhead(String),
    #[error("{0}")]
    Refused(String),
    #[error("the outbox is full ({max} pending mutations): sync before writing more")]
    OutboxFull { max: usize },
    #[error(
        "the transaction's changes take {size} bytes, over the limit of {max} bytes: split it"
    )]
    MutationTooLarge { size: usize, max: usize },
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("server error {code}: {message}")]
    Server { code: String, message: String },
    /// A call's arguments name something that is not there or does not fit
    /// (an unknown conflict, a column of another policy, an edit past the end).
    #[error("{0}")]
    InvalidArgument(String),
    /// The token names another user than the one this device's database
    /// belongs to: open it with `reset` (which wipes it) to change users.
    #[error("this device's database belongs to user '{stored}', but the token is for '{token}': open it with reset to wipe it and sign in as another user (the CLI: use another --db)")]
    UserChanged { stored: String, token: String },
    /// The server refused the token (`AUTH`) or it expired
    /// (`AUTH_EXPIRED`): the message names the failed check.
    #[error("{code}: {message}")]
    Auth { code: String, message: String },
    /// The device already holds `max` subscriptions (`subscriptions_max`).
    #[error("this device already holds {max} subscriptions, the most it may hold: unsubscribe from one first")]
    TooManySubscriptions { max: usize },
    /// `discard` of a mutation that is not in the outbox (settled already,
    /// or never made).
    #[error(
        "write {0} is not pending: it has settled already (see its verdict) or was never made"
    )]
    NotPending(u64),
    /// `discard` of a mutation that went out on a connection: the server
    /// may have applied it, so only its verdict can tell.
    #[error("write {0} was sent to the server, which may have applied it: wait for its verdict instead of discarding it")]
    Sent(u64),
}

impl ClientError {
    /// A stable code for the JS boundary and the CLI.
    pub fn code(&self) -> &'static str {
        match self {
            ClientError::Sql(_) | ClientError::Refused(_) => "SQL_ERROR",
            ClientError::NoSchema => "NO_SCHEMA",
            ClientError::Schema(_) | ClientError::SchemaMismatch(_) => "SCHEMA",
            ClientError::SchemaAhead(_) => "SCHEMA_AHEAD",
            ClientError::OutboxFull { .. } => "OUTBOX_FULL",
            ClientError::MutationTooLarge { .. } => "TOO_LARGE",
            ClientError::Protocol(_) => "PROTOCOL",
            ClientError::Server { .. } => "SERVER",
            ClientError::InvalidArgument(_) => "INVALID_ARGUMENT",
            ClientError::TooManySubscriptions { .. } => "TOO_MANY_SUBSCRIPTIONS",
            ClientError::UserChanged { .. } => "AUTH_USER_CHANGED",
            ClientError::Auth { code, .. } if code == "AUTH_EXPIRED" => "AUTH_EXPIRED",
            ClientError::Auth { .. } => "AUTH",
            ClientError::NotPending(_) => "NOT_PENDING",
            ClientError::Sent(_) => "SENT",
        }
    }
}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;

#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Most pending mutations the outbox holds before `exec` refuses.
    pub outbox_max: usize,
    /// Largest encoded mutation `exec` accepts (must fit in one frame).
    pub mutation_bytes_max: usize,
    /// Most mutations sent and not yet answered.
    pub in_flight_max: usize,
    /// Largest push frame built.
    pub push_bytes_max: usize,
    /// Most subscriptions the device holds (the server's default bound,
    /// so a device never asks for one the server would refuse for count).
    pub subscriptions_max: usize,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            outbox_max: 100_000,
            mutation_bytes_max: 16 * 1024 * 1024,
            in_flight_max: 2_000,
            push_bytes_max: 1024 * 1024,
            subscriptions_max: 256,
        }
    }
}

/// Something the app may want to react to.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// Rows of these tables changed (a local write, server changes, or a rollback).
    TablesChanged(Vec<String>),
    /// The server applied this pending mutation as `server_seq`.
    Applied { seq: u64, server_seq: u64 },
    /// The server refused this mutation (or the device did: `TOO_LARGE`,
    /// `DISCARDED`); its effects were undone. `undone`: the rows it wrote,
    /// as (table, primary key), each once.
    Rejected {
        seq: u64,
        code: String,
        reason: String,
        undone: Vec<(String, Value)>,
    },
    /// The schema arrived from the server and its tables exist now.
    SchemaInstalled { version: u64 },
    /// Everything the server had when it answered has been applied.
    CaughtUp { server_seq: u64 },
    /// A chunk of a subscription's initial load is in the database (and
    /// durable with it): `rows` so far; `done` when the load is complete.
    Loaded { id: u64, rows: u64, done: bool },
    /// An unsubscribe is complete: the rows no other subscription holds
    /// are evicted (at once offline; while connected, once the server's
    /// `Unsubscribed` says no entry routed by it is still on its way, or
    /// when the connection ends).
    Unsubscribed { id: u64 },
    /// The server refused a subscription (`BAD_SUBSCRIPTION`,
    /// `TOO_MANY_SUBSCRIPTIONS`); the device dropped it.
    SubscriptionRefused {
        id: u64,
        code: String,
        reason: String,
    },
    /// The server had already processed mutation numbers this device was
    /// about to reuse (it lost the end of its history: restored from an
    /// older copy, or storage that dropped its last commits). The device took
    /// a new client id and renumbered its pending writes from 1, losing
    /// none; the connection is over and the driver connects again.
    Rewound {
        old_client_id: u64,
        new_client_id: u64,
        /// (old, new) sequence number of each pending mutation.
        renumbered: Vec<(u64, u64)>,
        reason: String,
    },
}

/// What the driver should send and tell the app after a call.
#[derive(Debug, Default)]
pub struct Output {
    pub send: Vec<ClientMsg>,
    pub events: Vec<Event>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ExecOutcome {
    /// The mutation's sequence number, or None when nothing synced changed.
    pub mutation: Option<u64>,
    pub rows_affected: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct QueryResult {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Value>>,
}

impl QueryResult {
    /// Rows as JSON objects keyed by column name.
    pub fn to_json_objects(&self) -> Vec<serde_json::Value> {
        self.rows
            .iter()
            .map(|row| {
                let map = self
                    .columns
                    .iter()
                    .cloned()
                    .zip(row.iter().map(Value::to_json))
                    .collect();
                serde_json::Value::Object(map)
            })
            .collect()
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Status {
    pub client_id: u64,
    pub connected: bool,
    pub caught_up: bool,
    pub pending: u64,
    pub server_seq: u64,
    pub schema_version: Option<u64>,
}

/// The pre-image of one row a pending mutation touched: the whole row, or
/// None when the row did not exist.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Preimage {
    table: String,
    pk: Value,
    row: Option<Vec<Value>>,
}

/// What a connection learnt about the device having lost the end of its
/// history (restored from an older copy, or storage that dropped its last
/// commits). Such a device may hold pending mutations the server already
/// has (their acks are in the catch-up) beside new ones under numbers the
/// server has taken. So when the server has processed a number the device
/// holds pending or would use next, the device sends nothing until it has
/// caught up: the acks come first (matched by digest), and only then does it
/// take a new identity for what is left under a reused number.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Rewind {
    /// The device's next number is not past the server's last from it:
    /// pushes wait until caught up.
    suspected: bool,
    /// A log entry under this device's id and a pending number applied
    /// another mutation: take a new identity once caught up.
    confirmed: bool,
    /// The last number the server processed from this client id.
    server_last_seq: u64,
    /// The first number found holding another mutation on the server: where
    /// this device's lost history began, so its writes from there on had
    /// seen none of the server's writes under the old id at or past it.
    first_reused: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Session {
    Offline,
    AwaitingWelcome,
    Ready { sent_upto: u64, caught_up: bool },
}

pub struct Client {
    conn: Connection,
    config: ClientConfig,
    client_id: u64,
    clock: Clock,
    schema: Option<Schema>,
    cursor: u64,
    /// While re-loading after compaction moved the cursor to the log's
    /// floor (`meta.reload_seen`): the cursor the device had really reached
    /// before, the `base` of a write to a row no load has brought back yet
    /// (see [`Client::mutation_base`]).
    reload_seen: Option<u64>,
    next_seq: u64,
    pending: u64,
    /// How many pending mutations touch each row (shared with the
    /// `hearth_pending` SQL function, which reads it during app queries).
    pending_rows: PendingRows,
    /// Rows the server moved out of this device's subscriptions while a
    /// pending write touched them (`_hearth_deferred`): evicted once no
    /// pending write does.
    deferred: RefCell<HashSet<RowKey>>,
    /// Whether any table has a foreign key (see `any_foreign_key`).
    foreign_keys: bool,
    /// The database's schema cookie (`PRAGMA schema_version`) when
    /// `foreign_keys` was last worked out: the app may create tables of its
    /// own (with foreign keys to synced ones) at any time.
    foreign_keys_cookie: Option<i64>,
    /// The sequence numbers in the outbox (kept in memory: counting the
    /// ones in flight must not read every pending mutation's row).
    outbox_seqs: BTreeSet<u64>,
    /// Synced tables where one row's values can clash with another's (a
    /// UNIQUE index besides the primary key, or app triggers): acks touching
    /// them always take the full rebase, see [`Client::settle`].
    cross_row_tables: HashSet<String>,
    /// Read by the capture triggers: true only while app SQL runs.
    capturing: Arc<std::sync::atomic::AtomicBool>,
    /// Rows the app inserted into synced rowid tables in this transaction,
    /// as the update hook reports them.
    inserted: Arc<Mutex<InsertLog>>,
    session: Session,
    /// The largest frame the server accepts, from its last `Welcome`.
    server_frame_bytes_max: usize,
    /// Whether this connection found the device rewound, see [`Rewind`].
    rewind: Rewind,
    /// What the app's SQL may do in the call under way.
    gate: Arc<Mutex<Gate>>,
    /// (name, CREATE TRIGGER text) of the app's triggers on synced tables,
    /// dropped and re-created around replicated writes.
    app_triggers: Vec<(String, String)>,
    /// Documents of `text` cells as the server has them (confirmed).
    text: RefCell<TextCells>,
    /// Documents of `text` cells as this device shows them: the confirmed
    /// document plus the pending edits. Rebuilt on demand; dropped on any
    /// rollback and when a pending mutation is refused.
    local_text: RefCell<HashMap<String, TextDoc>>,
    /// While `edit_text` runs: the cell (its key) and the editor's edits,
    /// which capture sends instead of a diff.
    positional: RefCell<Option<(String, Vec<TextEdit>)>>,
    /// The id this session's text edits carry in their CRDT documents: new
    /// on every open (from `open`'s random number), so that a device
    /// restored from a copy never edits under ids its lost future used.
    text_session: u64,
    /// The clock and mutation of an exec whose transaction has not committed
    /// yet (see `record_mutation`).
    staged: Option<(Clock, Mutation)>,
    /// Tables re-loading after the user's read access changed, whose rows
    /// not sent again are evicted when their loads finish (`_hearth_stale`).
    stale_tables: RefCell<BTreeSet<String>>,
    /// Unsubscribes still awaiting an answer when this connection began
    /// (`_hearth_leaving`; its Hello left them out, so no answer comes):
    /// completed at its Welcome. Those made after the Hello are answered.
    leaving_orphans: Vec<u64>,
    /// The token the next Hello carries (see [`Client::set_token`]).
    token: Option<String>,
}

const INTERNAL_TABLES: &str = "
CREATE TABLE IF NOT EXISTS _hearth_meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS _hearth_outbox (
  seq      INTEGER PRIMARY KEY,
  hlc      INTEGER NOT NULL,
  mutation BLOB NOT NULL,
  undo     BLOB NOT NULL,
  format   INTEGER NOT NULL DEFAULT 1,
  attempts INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS _hearth_receipts (
  seq        INTEGER PRIMARY KEY,
  server_seq INTEGER,
  code       TEXT,
  reason     TEXT,
  undone     BLOB
);";

fn meta_get<T: rusqlite::types::FromSql>(
    conn: &Connection,
    key: &str,
) -> rusqlite::Result<Option<T>> {
    conn.query_row(
        "SELECT value FROM _hearth_meta WHERE key = ?1",
        [key],
        |r| r.get(0),
    )
    .optional()
}

fn meta_set(conn: &Connection, key: &str, value: impl rusqlite::ToSql) -> rusqlite::Result<()> {
    conn.prepare_cached("INSERT INTO _hearth_meta (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value")?
        .execute(params![key, value])?;
    Ok(())
}

/// Stores a u64 (sequence numbers, clock readings, random client ids) in an
/// SQLite integer bit for bit; `as u64` on the way back restores it. Values
/// come from the server too, so this must not panic on any of them.
fn to_i64(v: u64) -> i64 {
    v as i64
}

/// What SQLite's authorizer lets the statements being prepared do: set by
/// each public call, read by the one authorizer installed on the
/// connection (see `authorize`).
#[derive(Default)]
struct Gate {
    mode: GateMode,
    /// The synced tables, whose schema the app may not change.
    synced: HashSet<String>,
    /// The first reason a statement was refused in this call.
    refusal: Option<String>,
    /// Tables read by the statements prepared in `GateMode::Query`.
    read: BTreeSet<String>,
    /// True while `resolve` writes: only then may `hearth_conflicts` be written.
    resolving: bool,
}

#[derive(Default, Clone, Copy, PartialEq)]
enum GateMode {
    /// Hearth's own statements.
    #[default]
    Internal,
    /// The app's reads (`query`, live queries).
    Query,
    /// The app's writes (`exec`).
    Exec,
}

impl Client {
    fn install_gate(conn: &mut Connection, gate: Arc<Mutex<Gate>>) -> rusqlite::Result<()> {
        conn.authorizer(Some(move |ctx: AuthContext<'_>| -> Authorization {
            let mut gate = gate.lock().unwrap();
            let why = match gate.mode {
                GateMode::Internal => return Authorization::Allow,
                GateMode::Query => {
                    match ctx.action {
                        AuthAction::Read { table_name, .. } => {
                            gate.read.insert(table_name.to_string());
                        }
                        // Which rows it asks about is known only when it runs: a
                        // query calling it depends on every synced table, so a
                        // live query re-runs whenever any write or verdict lands.
                        AuthAction::Function { function_name }
                            if function_name.eq_ignore_ascii_case("hearth_pending") =>
                        {
                            let synced: Vec<String> = gate.synced.iter().cloned().collect();
                            gate.read.extend(synced);
                        }
                        _ => {}
                    }
                    crate::authorize::query(&ctx)
                }
                GateMode::Exec => match ctx.action {
                    AuthAction::Insert { table_name }
                    | AuthAction::Delete { table_name }
                    | AuthAction::Update { table_name, .. }
                        if table_name == CONFLICTS_TABLE && !gate.resolving =>
                    {
                        Some(format!(
                            "{CONFLICTS_TABLE} is written by the server: resolve a conflict with resolve(id, value)"
                        ))
                    }
                    _ => crate::authorize::exec(&ctx, &gate.synced),
                },
            };
            match why {
                Some(why) => {
                    gate.refusal.get_or_insert(why);
                    Authorization::Deny
                }
                None => Authorization::Allow,
            }
        }))
    }

    /// Runs `f` with the gate in `mode`; returns its result and the gate's
    /// refusal, if any.
    fn gated<T>(&self, mode: GateMode, f: impl FnOnce() -> T) -> (T, Option<String>) {
        {
            let mut gate = self.gate.lock().unwrap();
            gate.mode = mode;
            gate.refusal = None;
            gate.read.clear();
        }
        let value = f();
        let mut gate = self.gate.lock().unwrap();
        gate.mode = GateMode::Internal;
        (value, gate.refusal.take())
    }
}

impl Client {
    /// Opens (or initialises) a device database. `new_client_id`, a random
    /// nonzero number, becomes the device's id when the database has none
    /// yet; it also seeds the id this session's text edits carry, so pass a
    /// fresh one on every open.
    pub fn open(conn: Connection, new_client_id: u64, config: ClientConfig) -> Result<Client> {
        // Foreign keys are enforced for the app's own writes on every device
        // (SQLite builds differ in their default, so it is set here).
        conn.execute_batch(
            "PRAGMA recursive_triggers = ON; PRAGMA temp_store = MEMORY; PRAGMA foreign_keys = ON;",
        )?;
        // Capture, rebase and the app's own statements together need more
        // than rusqlite's default 16 cached statements.
        conn.set_prepared_statement_cache_capacity(256);
        conn.execute_batch(INTERNAL_TABLES)?;
        conn.execute_batch(crate::textcells::TEXT_TABLE)?;
        conn.execute_batch(subscribe::SUBSCRIPTIONS_TABLE)?;
        // Outboxes written before formats were kept hold format 1.
        let has_format: bool = conn.query_row(
            "SELECT EXISTS (SELECT 1 FROM pragma_table_info('_hearth_outbox') WHERE name = 'format')",
            [],
            |r| r.get(0),
        )?;
        if !has_format {
            conn.execute_batch(
                "ALTER TABLE _hearth_outbox ADD COLUMN format INTEGER NOT NULL DEFAULT 1",
            )?;
        }
        // Outboxes written before attempts were counted: none counted.
        let has_attempts: bool = conn.query_row(
            "SELECT EXISTS (SELECT 1 FROM pragma_table_info('_hearth_outbox') WHERE name = 'attempts')",
            [],
            |r| r.get(0),
        )?;
        if !has_attempts {
            conn.execute_batch(
                "ALTER TABLE _hearth_outbox ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0",
            )?;
        }
        let client_id = match meta_get::<i64>(&conn, "client_id")? {
            Some(id) => id as u64,
            None => {
                let id = new_client_id.max(1);
                meta_set(&conn, "client_id", id as i64)?;
                id
            }
        };
        let cursor = meta_get::<i64>(&conn, "cursor")?.unwrap_or(0) as u64;
        let reload_seen = meta_get::<i64>(&conn, "reload_seen")?.map(|v| v as u64);
        let next_seq = meta_get::<i64>(&conn, "next_seq")?.unwrap_or(1) as u64;
        let hlc = meta_get::<i64>(&conn, "hlc")?.unwrap_or(0) as u64;
        let pending: i64 =
            conn.query_row("SELECT count(*) FROM _hearth_outbox", [], |r| r.get(0))?;
        let schema = match meta_get::<String>(&conn, "schema")? {
            Some(src) => Some(Schema::parse(&src)?),
            None => None,
        };
        let deferred = Client::load_deferred(&conn)?;
        let stale_tables = Client::load_stale_tables(&conn)?;
        let mut client = Client {
            conn,
            config,
            client_id,
            clock: Clock::starting_at(Hlc(hlc)),
            schema: None,
            cursor,
            reload_seen,
            next_seq,
            pending: pending as u64,
            pending_rows: PendingRows::default(),
            deferred: RefCell::new(deferred),
            outbox_seqs: BTreeSet::new(),
            foreign_keys: false,
            foreign_keys_cookie: None,
            cross_row_tables: HashSet::new(),
            capturing: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            inserted: Arc::new(Mutex::new(InsertLog::default())),
            session: Session::Offline,
            server_frame_bytes_max: crate::protocol::FRAME_BYTES_MAX,
            rewind: Rewind::default(),
            app_triggers: Vec::new(),
            gate: Arc::new(Mutex::new(Gate::default())),
            text: RefCell::new(TextCells::new(client_id)),
            local_text: RefCell::new(HashMap::new()),
            positional: RefCell::new(None),
            staged: None,
            stale_tables: RefCell::new(stale_tables),
            leaving_orphans: Vec::new(),
            token: None,
            text_session: splitmix64(client_id ^ new_client_id.rotate_left(29)).max(1),
        };
        Self::install_gate(&mut client.conn, client.gate.clone())?;
        if let Some(schema) = schema {
            client.install_capture(&schema)?;
            client.schema = Some(schema);
        }
        client.install_pending_function()?;
        for (seq, mutation, _) in client.load_pending()? {
            count_rows(&mut client.pending_rows.lock(), &mutation);
            client.outbox_seqs.insert(seq);
        }
        Ok(client)
    }

    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    pub fn client_id(&self) -> u64 {
        self.client_id
    }

    pub fn schema(&self) -> Option<&Schema> {
        self.schema.as_ref()
    }

    pub fn status(&self) -> Status {
        Status {
            client_id: self.client_id,
            connected: matches!(self.session, Session::Ready { .. }),
            caught_up: matches!(
                self.session,
                Session::Ready {
                    caught_up: true,
                    ..
                }
            ),
            pending: self.pending,
            server_seq: self.cursor,
            schema_version: self.schema.as_ref().map(|s| s.version),
        }
    }

    /// Sequence numbers of the mutations still waiting for the server.
    pub fn pending_seqs(&self) -> Result<Vec<u64>> {
        let mut stmt = self
            .conn
            .prepare("SELECT seq FROM _hearth_outbox ORDER BY seq")?;
        let seqs = stmt
            .query_map([], |r| r.get::<_, i64>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(seqs.into_iter().map(|s| s as u64).collect())
    }

    /// Runs app SQL as one local transaction. Changes to synced tables become
    /// one pending mutation, written to the outbox in the same transaction.
    pub fn exec(
        &mut self,
        sql: &str,
        params: &[Value],
        now_ms: u64,
    ) -> Result<(ExecOutcome, Output)> {
        self.exec_sets(sql, &[params], now_ms)
    }

    /// Runs one SQL statement once per parameter set, all in one local
    /// transaction (one mutation): the statement is prepared once, which
    /// makes bulk writes fast.
    pub fn exec_many(
        &mut self,
        sql: &str,
        param_sets: &[Vec<Value>],
        now_ms: u64,
    ) -> Result<(ExecOutcome, Output)> {
        let sets: Vec<&[Value]> = param_sets.iter().map(Vec::as_slice).collect();
        if sets.is_empty() {
            return Err(ClientError::Refused(
                "exec_many needs at least one parameter set".into(),
            ));
        }
        self.exec_sets(sql, &sets, now_ms)
    }

    /// Edits a `text` cell by position, the way an editor reports keystrokes
    /// (no diff): at `index` (counted in Unicode scalar values), delete
    /// `delete` of them, then insert `insert`; edits apply in order, each on
    /// the text the previous one left. One pending mutation, like `exec`.
    ///
    /// Errors: `InvalidArgument` for an unknown table or column, a column
    /// that is not `text`, a missing row, or an edit outside the text.
    pub fn edit_text(
        &mut self,
        table: &str,
        key: &Value,
        column: &str,
        edits: &[TextEdit],
        now_ms: u64,
    ) -> Result<(ExecOutcome, Output)> {
        let schema = self.schema.clone().ok_or(ClientError::NoSchema)?;
        let t = schema
            .table(table)
            .ok_or_else(|| ClientError::InvalidArgument(format!("no synced table '{table}'")))?;
        let idx = t.column_index(column).ok_or_else(|| {
            ClientError::InvalidArgument(format!("table '{table}' has no column '{column}'"))
        })?;
        if idx == t.pk {
            return Err(ClientError::InvalidArgument(format!(
                "column '{column}' is the primary key of table '{table}', not a text column"
            )));
        }
        if t.columns[idx].policy != MergePolicy::Text {
            return Err(ClientError::InvalidArgument(format!(
                "column '{column}' of table '{table}' merges as {}, not text: write it with exec",
                t.columns[idx].policy.name()
            )));
        }
        let row = rows::read_row(&self.conn, t, key)?.ok_or_else(|| {
            ClientError::InvalidArgument(format!(
                "table '{table}' has no row with key {}",
                key.to_json()
            ))
        })?;
        let mut text: Vec<char> = text_of(column, &row[idx])
            .unwrap_or_default()
            .chars()
            .collect();
        for e in edits {
            let (index, delete) = (e.index as usize, e.delete as usize);
            if index.checked_add(delete).is_none_or(|end| end > text.len()) {
                return Err(ClientError::InvalidArgument(format!(
                    "edit at {} deleting {} is outside the text ({} characters)",
                    e.index,
                    e.delete,
                    text.len()
                )));
            }
            text.splice(index..index + delete, e.insert.chars());
        }
        let new_text: String = text.into_iter().collect();
        let sql = format!(
            "UPDATE {} SET {} = ?1 WHERE {} = ?2",
            ident(table),
            ident(column),
            ident(t.pk_name())
        );
        *self.positional.borrow_mut() = Some((
            Cell {
                table,
                pk: key,
                column,
            }
            .key(),
            edits.to_vec(),
        ));
        let result = self.exec(&sql, &[Value::Text(new_text), key.clone()], now_ms);
        self.positional.borrow_mut().take();
        result
    }

    /// Resolves an open manual-merge conflict (a row of `hearth_conflicts`)
    /// by writing `value` to its cell: an ordinary pending mutation that
    /// also removes the conflict's row here at once. The server closes the
    /// conflict if this device had seen every candidate; if another write
    /// raced it, the conflict comes back with one more candidate.
    ///
    /// Errors: `InvalidArgument` when no such conflict is open on this device.
    pub fn resolve(
        &mut self,
        conflict_id: &str,
        value: &Value,
        now_ms: u64,
    ) -> Result<(ExecOutcome, Output)> {
        let schema = self.schema.clone().ok_or(ClientError::NoSchema)?;
        let missing = || {
            ClientError::InvalidArgument(format!(
                "no open conflict with id '{conflict_id}' on this device"
            ))
        };
        let conflicts = schema.table(CONFLICTS_TABLE).ok_or_else(missing)?;
        let row = rows::read_row(&self.conn, conflicts, &Value::Text(conflict_id.to_string()))?
            .ok_or_else(missing)?;
        let at = |name: &str| row[conflicts.column_index(name).expect("conflicts column")].clone();
        let (Value::Text(table), Value::Text(key), Value::Text(column)) =
            (at("table_name"), at("row_key"), at("column_name"))
        else {
            return Err(missing());
        };
        let key = serde_json::from_str(&key)
            .ok()
            .and_then(|j| Value::from_json(&j).ok())
            .ok_or_else(missing)?;
        let t = schema.table(&table).ok_or_else(missing)?;
        let sql = format!(
            "UPDATE {} SET {} = ?1 WHERE {} = ?2",
            ident(&table),
            ident(&column),
            ident(t.pk_name())
        );
        self.gate.lock().unwrap().resolving = true;
        let result = self.exec_sets_with(
            &sql,
            &[&[value.clone(), key.clone()]],
            now_ms,
            Some((conflict_id, &table, &key, &column, value)),
        );
        self.gate.lock().unwrap().resolving = false;
        result
    }

    fn exec_sets(
        &mut self,
        sql: &str,
        params: &[&[Value]],
        now_ms: u64,
    ) -> Result<(ExecOutcome, Output)> {
        self.exec_sets_with(sql, params, now_ms, None)
    }

    /// `exec_sets`, for `resolve` with the conflict it resolves: (id,
    /// table, key, column, value).
    fn exec_sets_with(
        &mut self,
        sql: &str,
        params: &[&[Value]],
        now_ms: u64,
        resolving: Option<(&str, &str, &Value, &str, &Value)>,
    ) -> Result<(ExecOutcome, Output)> {
        let schema = self.schema.clone().ok_or(ClientError::NoSchema)?;
        if self.pending as usize >= self.config.outbox_max {
            return Err(ClientError::OutboxFull {
                max: self.config.outbox_max,
            });
        }
        self.assert_idle("exec");
        let result =
            self.atomically(|c| c.exec_in_transaction(&schema, sql, params, now_ms, resolving));
        self.assert_idle("exec");
        match &result {
            Ok(_) => self.commit_staged(),
            Err(_) => self.staged = None,
        }
        let (outcome, tables) = result?;
        let mut out = Output::default();
        if outcome.mutation.is_some() {
            self.pending += 1;
            out.events.push(Event::TablesChanged(tables));
            let sent = self.poll_send()?;
            out.send = sent.send;
            out.events.extend(sent.events);
        }
        Ok((outcome, out))
    }

    /// Runs `f` in a transaction (a savepoint, so calls nest): all of it
    /// lands, or none of it.
    fn atomically<T>(&mut self, f: impl FnOnce(&mut Client) -> Result<T>) -> Result<T> {
        self.conn.execute_batch("SAVEPOINT hearth")?;
        match f(self) {
            Ok(v) => match self.conn.execute_batch("RELEASE hearth") {
                Ok(()) => Ok(v),
                Err(e) => {
                    let _ = self.conn.execute_batch("ROLLBACK");
                    self.forget_text();
                    Err(e.into())
                }
            },
            Err(e) => {
                let _ = self
                    .conn
                    .execute_batch("ROLLBACK TO hearth; RELEASE hearth");
                self.forget_text();
                Err(e)
            }
        }
    }

    /// Whether any table of the database has a foreign key: a synced one,
    /// or one of the app's own pointing at a synced one (whose rows a
    /// replicated write may replace or evict). Worked out again only when
    /// the database's schema changed.
    fn any_foreign_key(&mut self) -> Result<bool> {
        let cookie: i64 = self
            .conn
            .query_row("PRAGMA main.schema_version", [], |r| r.get(0))?;
        if self.foreign_keys_cookie != Some(cookie) {
            self.foreign_keys = self.conn.query_row(
                "SELECT EXISTS (SELECT 1 FROM main.sqlite_schema AS s, pragma_foreign_key_list(s.name) AS f
                 WHERE s.type = 'table')",
                [],
                |r| r.get(0),
            )?;
            self.foreign_keys_cookie = Some(cookie);
        }
        Ok(self.foreign_keys)
    }

    /// Drops every decoded text document (after a rollback, the cached ones
    /// may hold edits the database no longer has).
    fn forget_text(&self) {
        self.text.borrow_mut().clear_cache();
        self.local_text.borrow_mut().clear();
    }

    /// Runs `f` in a transaction like [`Client::atomically`], for writes that
    /// replay what already happened elsewhere (server changes, undo and redo
    /// of pending mutations): with foreign key enforcement and the app's
    /// triggers off. Their effects were captured as data where the write was
    /// made; running them again would apply them twice (a trigger's counter
    /// bumped once per device), and cascades would delete rows that a
    /// pending mutation's undo only removes for a moment.
    fn replicated<T>(&mut self, f: impl FnOnce(&mut Client) -> Result<T>) -> Result<T> {
        // The pragma is a no-op inside a transaction; none is open here.
        // Setting it expires every prepared statement (SQLite recompiles
        // them for the new setting), so it is left alone when no synced
        // table has a foreign key.
        let toggle = self.any_foreign_key()?;
        if toggle {
            self.conn.execute_batch("PRAGMA foreign_keys = OFF")?;
        }
        let triggers = self.app_triggers.clone();
        let result = self.atomically(|c| {
            for (name, _) in &triggers {
                c.conn
                    .execute_batch(&format!("DROP TRIGGER main.{}", ident(name)))?;
            }
            let value = f(c)?;
            for (_, sql) in &triggers {
                c.conn.execute_batch(sql)?;
            }
            Ok(value)
        });
        if toggle {
            self.conn.execute_batch("PRAGMA foreign_keys = ON")?;
        }
        result
    }

    /// Runs a read-only query on the local (optimistic) database.
    pub fn query(&self, sql: &str, params: &[Value]) -> Result<QueryResult> {
        self.assert_idle("query");
        let result = self.query_read_only(sql, params);
        self.assert_idle("query");
        result
    }

    fn query_read_only(&self, sql: &str, params: &[Value]) -> Result<QueryResult> {
        let (prepared, refused) = self.gated(GateMode::Query, || self.conn.prepare(sql));
        let stmt = match (prepared, refused) {
            (_, Some(why)) => return Err(ClientError::Refused(why)),
            (Err(e), None) => return Err(e.into()),
            (Ok(stmt), None) => stmt,
        };
        Self::read_rows(stmt, params)
    }

    fn read_rows(mut stmt: rusqlite::Statement<'_>, params: &[Value]) -> Result<QueryResult> {
        if !stmt.readonly() {
            return Err(ClientError::Refused(
                "query only reads: use exec to write".into(),
            ));
        }
        if stmt.parameter_count() != params.len() {
            return Err(ClientError::Refused(format!(
                "the statement takes {} parameters but {} were given",
                stmt.parameter_count(),
                params.len()
            )));
        }
        let columns: Vec<String> = stmt.column_names().map(String::from).collect();
        let width = columns.len();
        let mut rows = stmt.query(rusqlite::params_from_iter(params))?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            out.push(
                (0..width)
                    .map(|i| row.get::<_, Value>(i))
                    .collect::<Result<Vec<_>, _>>()?,
            );
        }
        Ok(QueryResult { columns, rows: out })
    }

    /// Every public call starts and ends with no transaction open: one left
    /// open would make later writes look durable while nothing commits.
    fn assert_idle(&self, call: &str) {
        assert!(
            self.conn.is_autocommit(),
            "hearth-engine: a transaction is open around Client::{call}"
        );
    }

    /// The tables a query reads, for re-running live queries when they change.
    ///
    /// # Errors
    /// The same as [`Client::query`]'s for SQL that is not a read.
    pub fn tables_read(&mut self, sql: &str) -> Result<Vec<String>> {
        let ((prepared, tables), refused) = self.gated(GateMode::Query, || {
            let prepared = self.conn.prepare(sql).map(|_| ());
            let tables: Vec<String> = self.gate.lock().unwrap().read.iter().cloned().collect();
            (prepared, tables)
        });
        if let Some(why) = refused {
            return Err(ClientError::Refused(why));
        }
        prepared?;
        Ok(tables)
    }

    /// Brings the database to `schema` (see [`crate::migrate`]): creates,
    /// rebuilds and drops tables as the step from the schema it had says,
    /// in one transaction with the pending mutations' pre-images re-shaped
    /// to match. The mutations themselves stay as they were made (their
    /// digests must not change): what they say of a dropped column is
    /// discarded by the server and by their redo here, and a write to a
    /// dropped table is refused by the server (`TABLE_DROPPED`) and undone.
    fn install_schema(&mut self, schema: Schema) -> Result<()> {
        let plan = crate::migrate::follow(&self.conn, self.schema.as_ref(), &schema)
            .map_err(|e| ClientError::SchemaMismatch(e.to_string()))?;
        // Capture's triggers name the tables' columns: made anew below.
        let ours: Vec<String> = self
            .conn
            .prepare("SELECT name FROM temp.sqlite_schema WHERE type = 'trigger' AND name LIKE '\\_hearth\\_%' ESCAPE '\\'")?
            .query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        for name in ours {
            self.conn
                .execute_batch(&format!("DROP TRIGGER temp.{}", ident(&name)))?;
        }
        // Off while tables are rebuilt: with enforcement on, SQLite would
        // rewrite the REFERENCES of the app's own tables to a rebuilt one
        // (to its name while it is set aside) and check rows the device
        // holds only part of.
        self.conn.execute_batch("PRAGMA foreign_keys = OFF")?;
        let migrated = self.atomically(|c| {
            crate::migrate::apply(&c.conn, &schema, &plan)
                .map_err(|e| ClientError::SchemaMismatch(e.to_string()))?;
            c.reshape_outbox(&plan, &schema)?;
            for table in plan.dropped_tables.iter().chain(&plan.recreated) {
                for sql in [
                    "DELETE FROM _hearth_text WHERE tbl = ?1",
                    "DELETE FROM _hearth_stale WHERE tbl = ?1",
                    "DELETE FROM _hearth_deferred WHERE tbl = ?1",
                ] {
                    c.conn.execute(sql, [table])?;
                }
            }
            for (table, column) in &plan.dropped_columns {
                c.conn.execute(
                    "DELETE FROM _hearth_text WHERE tbl = ?1 AND col = ?2",
                    [table, column],
                )?;
            }
            meta_set(&c.conn, "schema", schema.source.as_str())?;
            meta_set(&c.conn, "schema_version", to_i64(schema.version))?;
            if c.cursor > 0 && c.schema.is_some() {
                // The server re-loads a device that synced under another
                // version right after this Welcome; should the connection
                // end first, the next Hello says it is owed.
                let mut mark = c.reloaded()?;
                mark.access = crate::protocol::RELOAD_OWED;
                c.set_reloaded(mark)?;
            }
            Ok(())
        });
        self.conn.execute_batch("PRAGMA foreign_keys = ON")?;
        if let Err(e) = migrated {
            // Back to the schema it had, with its capture.
            if let Some(old) = self.schema.clone() {
                self.install_capture(&old)?;
            }
            return Err(e);
        }
        self.forget_text();
        self.install_capture(&schema)?;
        self.schema = Some(schema);
        Ok(())
    }

    /// The pending mutations' pre-images after a schema change: rows of a
    /// rebuilt table re-shaped to its new columns, those of a dropped table
    /// gone.
    fn reshape_outbox(&mut self, plan: &crate::migrate::Plan, schema: &Schema) -> Result<()> {
        if !plan.reshapes() {
            return Ok(());
        }
        let pending = self.load_pending()?;
        let mut update = self
            .conn
            .prepare("UPDATE _hearth_outbox SET undo = ?2 WHERE seq = ?1")?;
        for (seq, _, undo) in pending {
            let undo: Vec<Preimage> = undo
                .into_iter()
                .filter_map(|pre| {
                    if plan.recreated.contains(&pre.table) {
                        return None;
                    }
                    let table = schema.table(&pre.table)?;
                    let row = match pre.row {
                        Some(row) => Some(plan.remap_row(Some(table), &pre.table, row)?),
                        None => None,
                    };
                    Some(Preimage { row, ..pre })
                })
                .collect();
            let blob = postcard::to_allocvec(&undo).expect("encode pre-images");
            update.execute(params![to_i64(seq), blob])?;
        }
        Ok(())
    }

    /// Whether the schema lacks a table that a pending mutation names: a
    /// schema change dropped it after the mutation was made.
    fn dropped_table(&self, name: &str) -> bool {
        self.schema
            .as_ref()
            .is_some_and(|s| s.table(name).is_none())
    }

    fn schema_ref(&self) -> Result<&Schema> {
        self.schema.as_ref().ok_or(ClientError::NoSchema)
    }

    fn table(&self, name: &str) -> Result<&Table> {
        self.schema_ref()?.table(name).ok_or_else(|| {
            ClientError::SchemaMismatch(format!("server sent a change to unknown table '{name}'"))
        })
    }
}

/// Reads one outbox entry written in `format`.
fn decode_pending(
    seq: u64,
    m: &[u8],
    u: &[u8],
    format: i64,
) -> Result<(u64, Mutation, Vec<Preimage>)> {
    let mutation = Mutation::decode(m, format)
        .map_err(|e| ClientError::Protocol(format!("outbox entry {seq} is unreadable: {e}")))?;
    let undo = postcard::from_bytes(u)
        .map_err(|e| ClientError::Protocol(format!("outbox entry {seq} is unreadable: {e}")))?;
    Ok((seq, mutation, undo))
}

/// A text column's value as a string (NULL reads as empty).
/// A text column's value as a string. A `text` column holds TEXT: NULL is
/// refused like any other non-text value (readers that must cope with a
/// value from outside Hearth take the error as empty text).
fn text_of(column: &str, v: &Value) -> Result<String> {
    match v {
        Value::Text(t) => Ok(t.clone()),
        other => Err(ClientError::Refused(format!(
            "text column '{column}' holds TEXT, not {} (write '' for an empty text)",
            other.type_name()
        ))),
    }
}

fn text_failure(e: TextFailure) -> ClientError {
    match e {
        TextFailure::Sql(e) => ClientError::Sql(e),
        TextFailure::Text(e) => ClientError::Protocol(format!(
            "a text document is unreadable or an edit does not apply: {e}"
        )),
    }
}

/// A row's identity for overlap checks: a hash of table and primary key. Two
/// rows sharing a hash only make `settle` take the full rebase, which is
/// always correct, so a collision costs time, never correctness.
type RowKey = u64;

fn row_key(table: &str, pk: &Value) -> RowKey {
    let h = mix(FNV_START, table.as_bytes());
    match pk {
        Value::Null => mix(h, &[0]),
        Value::Integer(i) => mix(mix(h, &[1]), &i.to_le_bytes()),
        Value::Real(r) => mix(mix(h, &[2]), &r.to_bits().to_le_bytes()),
        Value::Text(t) => mix(mix(h, &[3]), t.as_bytes()),
        Value::Blob(b) => mix(mix(h, &[4]), b),
    }
}

/// A key standing for "some row of this table", counted beside the row keys
/// so that `settle` can ask whether a table has pending rows.
fn table_key(table: &str) -> RowKey {
    mix(mix(FNV_START, table.as_bytes()), &[0xff, 0xfe])
}

/// SplitMix64's finaliser: spreads the bits of `x` (Steele, Lea, Flood,
/// "Fast splittable pseudorandom number generators", OOPSLA 2014).
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

const FNV_START: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a: a collision only costs a full rebase, so a fast hash is enough.
fn mix(mut h: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn keys_of(c: &RowChange) -> [RowKey; 2] {
    [row_key(&c.table, &c.pk), table_key(&c.table)]
}

/// Inserts into synced rowid tables during one exec, in order, as (table
/// number, rowid). The set for lookups is built only when an UPDATE or
/// DELETE trigger asks, so bulk inserts pay for a push and nothing more.
#[derive(Default)]
struct InsertLog {
    order: Vec<(u32, i64)>,
    set: HashSet<(u32, i64)>,
    /// How much of `order` is in `set`.
    indexed: usize,
}

impl InsertLog {
    fn contains(&mut self, key: (u32, i64)) -> bool {
        if self.indexed < self.order.len() {
            self.set.extend(self.order[self.indexed..].iter().copied());
            self.indexed = self.order.len();
        }
        self.set.contains(&key)
    }
}

fn count_rows(rows: &mut HashMap<RowKey, u32>, mutation: &Mutation) {
    for c in &mutation.changes {
        for key in keys_of(c) {
            *rows.entry(key).or_insert(0) += 1;
        }
    }
}
