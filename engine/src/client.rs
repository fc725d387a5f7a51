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

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use fallible_iterator::FallibleIterator;
use rusqlite::hooks::{AuthAction, AuthContext, Authorization};
use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

use std::cell::RefCell;

use crate::change::{ColumnOp, LogEntry, Mutation, RowChange, RowOp, FORMAT};
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
}

impl ClientError {
    /// A stable code for the JS boundary and the CLI.
    pub fn code(&self) -> &'static str {
        match self {
            ClientError::Sql(_) | ClientError::Refused(_) => "SQL_ERROR",
            ClientError::NoSchema => "NO_SCHEMA",
            ClientError::Schema(_) | ClientError::SchemaMismatch(_) => "SCHEMA",
            ClientError::OutboxFull { .. } => "OUTBOX_FULL",
            ClientError::MutationTooLarge { .. } => "TOO_LARGE",
            ClientError::Protocol(_) => "PROTOCOL",
            ClientError::Server { .. } => "SERVER",
            ClientError::InvalidArgument(_) => "INVALID_ARGUMENT",
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
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            outbox_max: 100_000,
            mutation_bytes_max: 16 * 1024 * 1024,
            in_flight_max: 2_000,
            push_bytes_max: 1024 * 1024,
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
    /// The server refused this mutation; its effects were undone.
    Rejected {
        seq: u64,
        code: String,
        reason: String,
    },
    /// The schema arrived from the server and its tables exist now.
    SchemaInstalled { version: u64 },
    /// Everything the server had when it answered has been applied.
    CaughtUp { server_seq: u64 },
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
    next_seq: u64,
    pending: u64,
    /// How many pending mutations touch each row.
    pending_rows: HashMap<RowKey, u32>,
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
}

const INTERNAL_TABLES: &str = "
CREATE TABLE IF NOT EXISTS _hearth_meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS _hearth_outbox (
  seq      INTEGER PRIMARY KEY,
  hlc      INTEGER NOT NULL,
  mutation BLOB NOT NULL,
  undo     BLOB NOT NULL,
  format   INTEGER NOT NULL DEFAULT 1
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

fn shadow_table(n: usize) -> String {
    format!("temp._hearth_old_{n}")
}

/// Temp capture tables and triggers for one synced table.
///
/// The first pre-image of a row is kept with `INSERT ... WHERE NOT EXISTS`,
/// not `INSERT OR IGNORE`: SQLite lets the conflict policy of the statement
/// that fired a trigger override the trigger's own, so under an app's
/// `INSERT OR REPLACE` the shadow row would be replaced by a later image, and
/// under an upsert (`ON CONFLICT DO UPDATE`, also used by rebase) the shadow
/// insert would fail with a UNIQUE error.
fn capture_sql(n: usize, table: &Table, rowid: bool) -> String {
    let t = ident(&table.name);
    let pk = ident(table.pk_name());
    let cols: Vec<String> = table.columns.iter().map(|c| ident(&c.name)).collect();
    let old_values: Vec<String> = cols.iter().map(|c| format!("OLD.{c}")).collect();
    let mask: Vec<String> = cols
        .iter()
        .enumerate()
        // Exact: the column's collation (say NOCASE) and affinity must not
        // hide a change, so compare bytes and storage class. SQL compares
        // reals by value (0.0 = -0.0), so a real column is always marked and
        // the exact comparison of old and new values decides.
        .map(|(i, c)| {
            format!("((OLD.{c} IS NOT NEW.{c} COLLATE BINARY OR typeof(OLD.{c}) <> typeof(NEW.{c}) OR typeof(OLD.{c}) = 'real') << {i})")
        })
        .collect();
    let shadow = shadow_table(n);
    // Rowid tables note inserts through the update hook, not a trigger (a
    // trigger makes every INSERT statement open a statement journal and run a
    // sub-program, which tripled the cost of a bulk insert). UPDATE and
    // DELETE triggers then ask the hook's log whether a row was made in this
    // transaction, because such a row did not exist before it.
    let made_here = if rowid {
        format!("hearth_inserted({n}, OLD.rowid)")
    } else {
        "0".to_string()
    };
    let insert_trigger = if rowid {
        String::new()
    } else {
        format!(
            "CREATE TEMP TRIGGER _hearth_ins_{n} AFTER INSERT ON main.{t} WHEN hearth_capturing() BEGIN
  INSERT INTO temp._hearth_capture (tbl, pk, mask, inserted, existed) VALUES ({n}, NEW.{pk}, -1, 1, 0)
    ON CONFLICT (tbl, pk) DO UPDATE SET mask = -1, inserted = 1;
END;"
        )
    };
    format!(
        "DROP TABLE IF EXISTS {shadow};
CREATE TEMP TABLE _hearth_old_{n} ({cols_list}, PRIMARY KEY ({pk}));
DROP TRIGGER IF EXISTS temp._hearth_ins_{n};
DROP TRIGGER IF EXISTS temp._hearth_upd_{n};
DROP TRIGGER IF EXISTS temp._hearth_del_{n};
{insert_trigger}
CREATE TEMP TRIGGER _hearth_upd_{n} AFTER UPDATE ON main.{t} WHEN hearth_capturing() BEGIN
  INSERT INTO {shadow} SELECT {old_values} WHERE NOT EXISTS (SELECT 1 FROM {shadow} WHERE {pk} IS OLD.{pk});
  INSERT INTO temp._hearth_capture (tbl, pk, mask, inserted, existed)
    SELECT {n}, OLD.{pk}, 0, 0, NOT {made_here} WHERE OLD.{pk} IS NOT NEW.{pk}
    ON CONFLICT (tbl, pk) DO NOTHING;
  INSERT INTO temp._hearth_capture (tbl, pk, mask, inserted, existed)
    SELECT {n}, NEW.{pk},
      CASE WHEN OLD.{pk} IS NOT NEW.{pk} THEN -1 ELSE ({mask}) END,
      OLD.{pk} IS NOT NEW.{pk},
      OLD.{pk} IS NEW.{pk} AND NOT {made_here}
    WHERE true
    ON CONFLICT (tbl, pk) DO UPDATE SET mask = mask | excluded.mask, inserted = inserted | excluded.inserted;
END;
CREATE TEMP TRIGGER _hearth_del_{n} AFTER DELETE ON main.{t} WHEN hearth_capturing() BEGIN
  INSERT INTO {shadow} SELECT {old_values} WHERE NOT EXISTS (SELECT 1 FROM {shadow} WHERE {pk} IS OLD.{pk});
  INSERT INTO temp._hearth_capture (tbl, pk, mask, inserted, existed) VALUES ({n}, OLD.{pk}, 0, 0, NOT {made_here})
    ON CONFLICT (tbl, pk) DO NOTHING;
END;",
        cols_list = cols.join(", "),
        old_values = old_values.join(", "),
        mask = mask.join(" | "),
    )
}

const CAPTURE_TABLE: &str = "
DROP TABLE IF EXISTS temp._hearth_capture;
CREATE TEMP TABLE _hearth_capture (
  tbl      INTEGER NOT NULL,
  pk       NOT NULL,
  mask     INTEGER NOT NULL,
  inserted INTEGER NOT NULL,
  existed  INTEGER NOT NULL,
  PRIMARY KEY (tbl, pk)
) WITHOUT ROWID;";

/// Runs one prepared app statement once per parameter set; returns the rows
/// it changed.
fn run_statement(
    conn: &Connection,
    stmt: &mut rusqlite::Statement<'_>,
    param_sets: &[&[Value]],
) -> Result<u64> {
    let readonly = stmt.readonly();
    let mut rows_affected = 0;
    for params in param_sets {
        if stmt.parameter_count() != params.len() {
            return Err(ClientError::Refused(format!(
                "the statement takes {} parameters but {} were given",
                stmt.parameter_count(),
                params.len()
            )));
        }
        for (i, p) in params.iter().enumerate() {
            stmt.raw_bind_parameter(i + 1, p)?;
        }
        let mut rows = stmt.raw_query();
        while rows.next()?.is_some() {}
        drop(rows);
        if !readonly {
            rows_affected += conn.changes();
        }
    }
    Ok(rows_affected)
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
                    if let AuthAction::Read { table_name, .. } = ctx.action {
                        gate.read.insert(table_name.to_string());
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
    /// Opens (or initialises) a device database. `new_client_id` is used only
    /// when the database has no client id yet; pass a random nonzero number.
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
        let client_id = match meta_get::<i64>(&conn, "client_id")? {
            Some(id) => id as u64,
            None => {
                let id = new_client_id.max(1);
                meta_set(&conn, "client_id", id as i64)?;
                id
            }
        };
        let cursor = meta_get::<i64>(&conn, "cursor")?.unwrap_or(0) as u64;
        let next_seq = meta_get::<i64>(&conn, "next_seq")?.unwrap_or(1) as u64;
        let hlc = meta_get::<i64>(&conn, "hlc")?.unwrap_or(0) as u64;
        let pending: i64 =
            conn.query_row("SELECT count(*) FROM _hearth_outbox", [], |r| r.get(0))?;
        let schema = match meta_get::<String>(&conn, "schema")? {
            Some(src) => Some(Schema::parse(&src)?),
            None => None,
        };
        let mut client = Client {
            conn,
            config,
            client_id,
            clock: Clock::starting_at(Hlc(hlc)),
            schema: None,
            cursor,
            next_seq,
            pending: pending as u64,
            pending_rows: HashMap::new(),
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
        };
        Self::install_gate(&mut client.conn, client.gate.clone())?;
        if let Some(schema) = schema {
            client.install_capture(&schema)?;
            client.schema = Some(schema);
        }
        for (_, mutation, _) in client.load_pending()? {
            count_rows(&mut client.pending_rows, &mutation);
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

    fn install_capture(&mut self, schema: &Schema) -> Result<()> {
        // Capture runs only while app SQL runs: applying server changes and
        // rebasing write the same tables but must not be recorded, and
        // skipping the triggers' work there keeps remote changes cheap.
        let capturing = self.capturing.clone();
        self.conn.create_scalar_function(
            "hearth_capturing",
            0,
            rusqlite::functions::FunctionFlags::SQLITE_UTF8,
            move |_| Ok(capturing.load(std::sync::atomic::Ordering::Relaxed)),
        )?;
        let log = self.inserted.clone();
        self.conn.create_scalar_function(
            "hearth_inserted",
            2,
            rusqlite::functions::FunctionFlags::SQLITE_UTF8,
            move |ctx| {
                let key = (ctx.get::<i64>(0)? as u32, ctx.get::<i64>(1)?);
                Ok(log.lock().unwrap().contains(key))
            },
        )?;
        let mut rowid_tables = HashMap::new();
        let mut sql = String::from(CAPTURE_TABLE);
        for (n, table) in schema.numbered() {
            let without_rowid: bool = self.conn.query_row(
                "SELECT coalesce((SELECT wr FROM pragma_table_list(?1) WHERE schema = 'main'), 0)",
                [&table.name],
                |r| r.get(0),
            )?;
            if !without_rowid {
                rowid_tables.insert(table.name.clone(), n as u32);
            }
            sql.push_str(&capture_sql(n, table, !without_rowid));
        }
        self.conn.execute_batch(&sql)?;
        let log = self.inserted.clone();
        let capturing = self.capturing.clone();
        self.conn.update_hook(Some(
            move |action: rusqlite::hooks::Action, db: &str, table: &str, rowid: i64| {
                if action == rusqlite::hooks::Action::SQLITE_INSERT
                    && db == "main"
                    && capturing.load(std::sync::atomic::Ordering::Relaxed)
                {
                    if let Some(n) = rowid_tables.get(table) {
                        log.lock().unwrap().order.push((*n, rowid));
                    }
                }
            },
        ))?;
        self.gate.lock().unwrap().synced = schema.tables.keys().cloned().collect();
        self.app_triggers.clear();
        {
            let mut stmt = self.conn.prepare(
                "SELECT name, sql FROM main.sqlite_schema WHERE type = 'trigger' AND tbl_name = ?1 ORDER BY name",
            )?;
            for table in schema.tables.values() {
                let found = stmt
                    .query_map([&table.name], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect::<Result<Vec<(String, String)>, _>>()?;
                self.app_triggers.extend(found);
            }
        }
        self.cross_row_tables.clear();
        for table in schema.tables.values() {
            let unique_index: bool = self.conn.query_row(
                "SELECT EXISTS (SELECT 1 FROM pragma_index_list(?1) WHERE \"unique\" AND origin <> 'pk')",
                [&table.name],
                |r| r.get(0),
            )?;
            let app_trigger: bool = self.conn.query_row(
                "SELECT EXISTS (SELECT 1 FROM main.sqlite_schema WHERE type = 'trigger' AND tbl_name = ?1)",
                [&table.name],
                |r| r.get(0),
            )?;
            if unique_index || app_trigger {
                self.cross_row_tables.insert(table.name.clone());
            }
        }
        Ok(())
    }

    fn clear_capture(&self) -> Result<()> {
        *self.inserted.lock().unwrap() = InsertLog::default();
        self.conn.execute("DELETE FROM temp._hearth_capture", [])?;
        if let Some(schema) = &self.schema {
            for (n, _) in schema.numbered() {
                self.conn
                    .execute(&format!("DELETE FROM {}", shadow_table(n)), [])?;
            }
        }
        Ok(())
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
        let mut text: Vec<char> = text_of(column, &row[idx])?.chars().collect();
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
        self.conn.execute_batch("PRAGMA foreign_keys = OFF")?;
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
        self.conn.execute_batch("PRAGMA foreign_keys = ON")?;
        result
    }

    /// Runs the app's statements with an authorizer that keeps transaction
    /// control and Hearth's own tables out of reach.
    fn run_app_sql(&mut self, sql: &str, params: &[&[Value]]) -> Result<u64> {
        *self.inserted.lock().unwrap() = InsertLog::default();
        self.capturing
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let (result, refused) = self.gated(GateMode::Exec, || self.run_statements(sql, params));
        self.capturing
            .store(false, std::sync::atomic::Ordering::Relaxed);
        result.map_err(|e| match refused {
            Some(why) => ClientError::Refused(why),
            // The capture note's NOT NULL key stands in for a check in every
            // trigger run (cheaper): say what it means in the app's terms.
            None if e.to_string().contains("_hearth_capture.pk") => {
                ClientError::Refused("the primary key of a synced table cannot be NULL".into())
            }
            None => e,
        })
    }

    fn run_statements(&self, sql: &str, param_sets: &[&[Value]]) -> Result<u64> {
        if sql.trim().is_empty() {
            return Err(ClientError::Refused("no SQL statement given".into()));
        }
        // A single statement (the common case) goes through the statement
        // cache, so an app repeating one write does not re-parse it. The key
        // is marked so that app SQL can never pick up one of Hearth's own
        // statements, which were prepared without the authorizer.
        // Anything else (a script, or an error, which may come from a later
        // statement naming a table an earlier one creates) takes the
        // statement-by-statement path, which also reports errors precisely.
        if let Ok(mut stmt) = self.conn.prepare_cached(&format!("/* app */ {sql}")) {
            return run_statement(&self.conn, &mut stmt, param_sets);
        }
        let with_params = param_sets.len() > 1 || param_sets.iter().any(|p| !p.is_empty());
        // SQLite copies the rest of a script before parsing each statement
        // unless the text ends in a NUL inside the length it is given; with
        // the NUL, a script of n statements parses in O(n), not O(n^2).
        let script = format!("{sql}\0");
        let mut batch = rusqlite::Batch::new(&self.conn, &script);
        let mut rows_affected = 0u64;
        let mut statements = 0;
        while let Some(mut stmt) = batch.next()? {
            statements += 1;
            if with_params && statements > 1 {
                return Err(ClientError::Refused(
                    "parameters can only be given with a single SQL statement".into(),
                ));
            }
            rows_affected += run_statement(&self.conn, &mut stmt, param_sets)?;
        }
        Ok(rows_affected)
    }

    fn exec_in_transaction(
        &mut self,
        schema: &Schema,
        sql: &str,
        params: &[&[Value]],
        now_ms: u64,
        resolving: Option<(&str, &str, &Value, &str, &Value)>,
    ) -> Result<(ExecOutcome, Vec<String>)> {
        let mut rows_affected = self.run_app_sql(sql, params)?;
        if let Some((id, ..)) = resolving {
            rows_affected += self.run_app_sql(
                &format!("DELETE FROM {CONFLICTS_TABLE} WHERE id = ?1"),
                &[&[Value::Text(id.to_string())]],
            )?;
        }
        let (mut changes, mut undo, mut tables) =
            self.collect_capture(schema).map_err(|e| match e {
                ClientError::Sql(rusqlite::Error::FromSqlConversionFailure(_, _, why)) => {
                    ClientError::Refused(format!(
                        "this write gives a synced table a value that cannot travel exactly: {why}"
                    ))
                }
                e => e,
            })?;
        if let Some((_, table, key, column, value)) = resolving {
            // Picking the value the cell already shows is a resolution too:
            // the server must see the write to close the conflict.
            let found = changes
                .iter_mut()
                .find(|c| c.table == table && c.pk == *key);
            match found {
                Some(RowChange {
                    op: RowOp::Upsert { columns, .. },
                    ..
                }) => {
                    if !columns.iter().any(|(n, _)| n == column) {
                        columns.push((column.to_string(), ColumnOp::Set(value.clone())));
                    }
                }
                Some(_) => {}
                None => {
                    let t = schema.table(table).expect("resolve checked the table");
                    let Some(row) = rows::read_row(&self.conn, t, key)? else {
                        return Err(ClientError::InvalidArgument(format!(
                            "the row of this conflict ({table} {}) is gone",
                            key.to_json()
                        )));
                    };
                    undo.push(Preimage {
                        table: table.to_string(),
                        pk: key.clone(),
                        row: Some(row),
                    });
                    changes.push(RowChange {
                        table: table.to_string(),
                        pk: key.clone(),
                        op: RowOp::Upsert {
                            insert: false,
                            columns: vec![(column.to_string(), ColumnOp::Set(value.clone()))],
                        },
                    });
                    if !tables.iter().any(|t| t == table) {
                        tables.push(table.to_string());
                    }
                }
            }
        }
        if changes.is_empty() {
            return Ok((
                ExecOutcome {
                    mutation: None,
                    rows_affected,
                },
                Vec::new(),
            ));
        }
        let seq = self.record_mutation(changes, undo, now_ms)?;
        Ok((
            ExecOutcome {
                mutation: Some(seq),
                rows_affected,
            },
            tables,
        ))
    }

    /// Writes a new pending mutation to the outbox (inside the caller's
    /// transaction); returns its sequence number.
    fn record_mutation(
        &mut self,
        changes: Vec<RowChange>,
        undo: Vec<Preimage>,
        now_ms: u64,
    ) -> Result<u64> {
        let seq = self.next_seq;
        let mut clock = self.clock.clone();
        let hlc = clock.now(now_ms);
        let mutation = Mutation {
            seq,
            hlc,
            base: self.cursor,
            changes,
        };
        let blob = mutation.encode();
        if blob.len() > self.config.mutation_bytes_max {
            return Err(ClientError::MutationTooLarge {
                size: blob.len(),
                max: self.config.mutation_bytes_max,
            });
        }
        let undo_blob = postcard::to_allocvec(&undo).expect("encode undo");
        self.conn
            .prepare_cached(
                "INSERT INTO _hearth_outbox (seq, hlc, mutation, undo, format) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![to_i64(seq), to_i64(hlc.0), blob, undo_blob, FORMAT])?;
        meta_set(&self.conn, "next_seq", to_i64(seq + 1))?;
        meta_set(&self.conn, "hlc", to_i64(hlc.0))?;
        // In-memory state moves only with the commit: the caller's savepoint
        // is released right after this returns Ok.
        self.next_seq = seq + 1;
        self.clock = clock;
        count_rows(&mut self.pending_rows, &mutation);
        Ok(seq)
    }

    /// Turns the capture notes of the current transaction into row changes
    /// and pre-images, and clears the notes.
    fn collect_capture(
        &self,
        schema: &Schema,
    ) -> Result<(Vec<RowChange>, Vec<Preimage>, Vec<String>)> {
        let mut changes = Vec::new();
        let mut undo = Vec::new();
        let mut tables = Vec::new();
        // Cells whose stored text is not what every device will show (a
        // set written in another order): (table, key, column, value).
        let mut rewrites: Vec<(&Table, Value, usize, Value)> = Vec::new();
        for (n, table) in schema.numbered() {
            let width = table.columns.len();
            let cur: Vec<String> = table
                .columns
                .iter()
                .map(|c| format!("t.{}", ident(&c.name)))
                .collect();
            let old: Vec<String> = table
                .columns
                .iter()
                .map(|c| format!("o.{}", ident(&c.name)))
                .collect();
            let pk = ident(table.pk_name());
            let sql = format!(
                "SELECT c.pk, c.mask, c.inserted, c.existed, t.{pk} IS NOT NULL, {}, {}
                 FROM temp._hearth_capture c
                 LEFT JOIN main.{} t ON t.{pk} = c.pk
                 LEFT JOIN {} o ON o.{pk} = c.pk
                 WHERE c.tbl = ?1",
                cur.join(", "),
                old.join(", "),
                ident(&table.name),
                shadow_table(n),
            );
            // Rows the update hook saw inserted, as they are now, in insert
            // order (a reused rowid is read once). A row also noted by a
            // trigger (say replaced, or updated after its insert) is handled
            // with its note, marked inserted; the rest are plain inserts with
            // no pre-image.
            let mut made: Vec<(Value, Vec<Value>)> = Vec::new();
            let mut made_index: HashMap<RowKey, usize> = HashMap::new();
            let rowids: Vec<i64> = {
                let log = self.inserted.lock().unwrap();
                log.order
                    .iter()
                    .filter(|(t, _)| *t as usize == n)
                    .map(|(_, r)| *r)
                    .collect()
            };
            if !rowids.is_empty() {
                let sql = format!(
                    "SELECT {} FROM main.{} WHERE rowid = ?1",
                    table
                        .columns
                        .iter()
                        .map(|c| ident(&c.name))
                        .collect::<Vec<_>>()
                        .join(", "),
                    ident(&table.name)
                );
                let mut stmt = self.conn.prepare_cached(&sql)?;
                for rowid in rowids {
                    let mut rows = stmt.query([rowid])?;
                    let Some(row) = rows.next()? else { continue }; // Deleted again.
                    let values: Vec<Value> =
                        (0..width).map(|i| row.get(i)).collect::<Result<_, _>>()?;
                    let pk = values[table.pk].clone();
                    if pk == Value::Null {
                        return Err(ClientError::Refused(format!(
                            "the primary key of synced table {} cannot be NULL",
                            table.name
                        )));
                    }
                    if let std::collections::hash_map::Entry::Vacant(e) =
                        made_index.entry(row_key(&table.name, &pk))
                    {
                        e.insert(made.len());
                        made.push((pk, values));
                    }
                }
            }
            let mut consumed = vec![false; made.len()];
            let mut stmt = self.conn.prepare_cached(&sql)?;
            let mut rows = stmt.query([n as i64])?;
            let before = changes.len();
            while let Some(row) = rows.next()? {
                let pk: Value = row.get(0)?;
                let made_here = made_index
                    .get(&row_key(&table.name, &pk))
                    .map(|i| consumed[*i] = true)
                    .is_some();
                let mask: i64 = row.get(1)?;
                let inserted: bool = row.get::<_, bool>(2)? || made_here;
                let existed: bool = row.get(3)?;
                let exists: bool = row.get(4)?;
                let current: Vec<Value> = (0..width)
                    .map(|i| row.get(5 + i))
                    .collect::<Result<_, _>>()?;
                let previous: Vec<Value> = (0..width)
                    .map(|i| row.get(5 + width + i))
                    .collect::<Result<_, _>>()?;
                let pre = existed.then(|| previous.clone());
                let op = if !exists {
                    if !existed {
                        continue; // Created and deleted within the transaction.
                    }
                    RowOp::Delete
                } else if inserted || !existed {
                    RowOp::Upsert {
                        insert: true,
                        columns: self.capture_insert(table, &pk, current, &mut rewrites)?,
                    }
                } else {
                    let changed: Vec<usize> = (0..width)
                        .filter(|i| {
                            *i != table.pk && mask & (1 << i) != 0 && current[*i] != previous[*i]
                        })
                        .collect();
                    let columns = self.capture_update(
                        table,
                        &pk,
                        &changed,
                        &previous,
                        &current,
                        &mut rewrites,
                    )?;
                    if columns.is_empty() {
                        continue; // Written back to the values it had.
                    }
                    RowOp::Upsert {
                        insert: false,
                        columns,
                    }
                };
                undo.push(Preimage {
                    table: table.name.clone(),
                    pk: pk.clone(),
                    row: pre,
                });
                changes.push(RowChange {
                    table: table.name.clone(),
                    pk,
                    op,
                });
            }
            drop(rows);
            drop(stmt);
            for (i, (pk, values)) in made.into_iter().enumerate() {
                if consumed[i] {
                    continue;
                }
                let columns = self.capture_insert(table, &pk, values, &mut rewrites)?;
                undo.push(Preimage {
                    table: table.name.clone(),
                    pk: pk.clone(),
                    row: None,
                });
                changes.push(RowChange {
                    table: table.name.clone(),
                    pk,
                    op: RowOp::Upsert {
                        insert: true,
                        columns,
                    },
                });
            }
            if changes.len() > before {
                tables.push(table.name.clone());
            }
        }
        self.clear_capture()?;
        for (table, pk, i, value) in rewrites {
            rows::update_columns(&self.conn, table, &pk, &[(i, &value)])?;
        }
        Ok((changes, undo, tables))
    }

    /// The column values of a row this transaction made, checked against
    /// their policies: a counter holds an integer, a set a JSON array of
    /// scalars (stored in canonical order), a text column starts its
    /// document.
    fn capture_insert<'t>(
        &self,
        table: &'t Table,
        pk: &Value,
        values: Vec<Value>,
        rewrites: &mut Vec<(&'t Table, Value, usize, Value)>,
    ) -> Result<Vec<(String, ColumnOp)>> {
        let mut columns = Vec::with_capacity(values.len());
        for (i, v) in values.into_iter().enumerate() {
            if i == table.pk {
                continue;
            }
            let column = &table.columns[i];
            let v = match column.policy {
                MergePolicy::Counter => {
                    counter::capture(&column.name, &Value::Null, &v)
                        .map_err(ClientError::Refused)?;
                    v
                }
                MergePolicy::Set => {
                    let (_, _, canonical) = set::capture(&column.name, &Value::Null, &v)
                        .map_err(ClientError::Refused)?;
                    if canonical != v {
                        rewrites.push((table, pk.clone(), i, canonical.clone()));
                    }
                    canonical
                }
                MergePolicy::Text => {
                    let text = text_of(&column.name, &v)?;
                    let doc = TextDoc::from_text(&text, self.client_id);
                    let cell = Cell {
                        table: &table.name,
                        pk,
                        column: &column.name,
                    };
                    self.local_text.borrow_mut().insert(cell.key(), doc);
                    v
                }
                MergePolicy::Lww | MergePolicy::Manual => v,
            };
            columns.push((column.name.clone(), ColumnOp::Set(v)));
        }
        Ok(columns)
    }

    /// The column changes of an update, each as its policy captures it.
    fn capture_update<'t>(
        &self,
        table: &'t Table,
        pk: &Value,
        changed: &[usize],
        previous: &[Value],
        current: &[Value],
        rewrites: &mut Vec<(&'t Table, Value, usize, Value)>,
    ) -> Result<Vec<(String, ColumnOp)>> {
        let mut columns = Vec::with_capacity(changed.len());
        for &i in changed {
            let column = &table.columns[i];
            let op = match column.policy {
                MergePolicy::Lww | MergePolicy::Manual => ColumnOp::Set(current[i].clone()),
                MergePolicy::Counter => {
                    match counter::capture(&column.name, &previous[i], &current[i])
                        .map_err(ClientError::Refused)?
                    {
                        Some(delta) => ColumnOp::Add(delta),
                        None => continue,
                    }
                }
                MergePolicy::Set => {
                    let (add, remove, canonical) =
                        set::capture(&column.name, &previous[i], &current[i])
                            .map_err(ClientError::Refused)?;
                    if canonical != current[i] {
                        rewrites.push((table, pk.clone(), i, canonical));
                    }
                    if add.is_empty() && remove.is_empty() {
                        continue;
                    }
                    ColumnOp::SetOps { add, remove }
                }
                MergePolicy::Text => {
                    let old = text_of(&column.name, &previous[i]).unwrap_or_default();
                    let new = text_of(&column.name, &current[i])?;
                    let cell = Cell {
                        table: &table.name,
                        pk,
                        column: &column.name,
                    };
                    let positional = self
                        .positional
                        .borrow()
                        .as_ref()
                        .filter(|(key, _)| *key == cell.key())
                        .map(|(_, edits)| edits.clone());
                    let update = match positional {
                        // `edit_text`: the editor's own positions, no diff.
                        Some(edits) => self
                            .with_local_doc(cell, &old, |doc| {
                                let update = doc.edit(&edits);
                                update.map(|u| (u, doc.text()))
                            })?
                            .map(|(u, text)| {
                                if text != new {
                                    rewrites.push((table, pk.clone(), i, Value::Text(text)));
                                }
                                u
                            })
                            .map_err(|e| ClientError::InvalidArgument(e.to_string()))?,
                        None => self.with_local_doc(cell, &old, |doc| doc.replace_with(&new))?,
                    };
                    if update.is_empty() {
                        continue;
                    }
                    ColumnOp::Text(update)
                }
            };
            columns.push((column.name.clone(), op));
        }
        Ok(columns)
    }

    /// Runs `f` on the cell's document as this device shows it: the
    /// confirmed document with the pending edits replayed (built on first
    /// use, then kept). `fallback` is the text to start from when the cell
    /// has no document at all (a value that never went through Hearth).
    fn with_local_doc<T>(
        &self,
        cell: Cell<'_>,
        fallback: &str,
        f: impl FnOnce(&mut TextDoc) -> T,
    ) -> Result<T> {
        let key = cell.key();
        if !self.local_text.borrow().contains_key(&key) {
            let confirmed = self
                .text
                .borrow_mut()
                .get(&self.conn, cell)
                .map_err(text_failure)?
                .map(|d| d.state());
            let mut doc = confirmed
                .map(|state| TextDoc::load(&state, self.client_id).expect("a stored state"));
            for (_, mutation, _) in self.load_pending()? {
                for change in mutation
                    .changes
                    .iter()
                    .filter(|c| c.table == cell.table && c.pk == *cell.pk)
                {
                    match &change.op {
                        RowOp::Delete => doc = None,
                        RowOp::Upsert { insert, columns } => {
                            for (name, op) in columns.iter().filter(|(n, _)| n == cell.column) {
                                match op {
                                    ColumnOp::Set(v) if *insert => {
                                        let text = text_of(name, v).unwrap_or_default();
                                        doc = Some(TextDoc::from_text(&text, self.client_id));
                                    }
                                    ColumnOp::Text(u) => {
                                        if let Some(d) = doc.as_mut() {
                                            let _ = d.apply_update(u);
                                        }
                                    }
                                    _ => {}
                                }
                            }
                        }
                    }
                }
            }
            let doc = doc.unwrap_or_else(|| {
                let start = TextDoc::from_text(fallback, 0);
                TextDoc::load(&start.state(), self.client_id).expect("a state just encoded")
            });
            self.local_text.borrow_mut().insert(key.clone(), doc);
        }
        let mut local = self.local_text.borrow_mut();
        Ok(f(local.get_mut(&key).expect("inserted above")))
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

    /// The connection to the server is up: what to say first.
    pub fn on_connected(&mut self) -> Vec<ClientMsg> {
        self.session = Session::AwaitingWelcome;
        self.rewind = Rewind::default();
        vec![ClientMsg::Hello {
            client_id: self.client_id,
            cursor: self.cursor,
            schema_version: self.schema.as_ref().map(|s| s.version),
        }]
    }

    /// The connection is gone. Everything unanswered will be sent again.
    pub fn on_disconnected(&mut self) {
        self.session = Session::Offline;
    }

    /// Pending mutations not yet sent on this connection, in order, within
    /// the in-flight window, in frames that fit the server's frame limit.
    ///
    /// A mutation too large for one frame of this server (its `Welcome` says
    /// how large a frame it takes) could never be delivered: it is refused
    /// here, undone like a refusal from the server, and reported as
    /// [`Event::Rejected`] with code `TOO_LARGE`.
    pub fn poll_send(&mut self) -> Result<Output> {
        let mut out = Output::default();
        let oversized = self.poll_send_into(&mut out.send)?;
        for (seq, size) in oversized {
            let reason = format!(
                "the mutation takes {size} bytes, more than one frame of this server carries ({} bytes): split the transaction",
                self.server_frame_bytes_max
            );
            self.apply_rejection(seq, "TOO_LARGE", &reason, &mut out)?;
        }
        if !out.events.is_empty() {
            let more = self.poll_send_into(&mut out.send)?;
            debug_assert!(more.is_empty(), "oversized mutations were refused");
        }
        Ok(out)
    }

    /// Room a push frame leaves for mutations: its header and framing.
    const PUSH_FRAME_OVERHEAD_BYTES: usize = 64;

    /// Appends push frames to `send`; returns the (sequence number, size) of
    /// mutations too large to send.
    fn poll_send_into(&mut self, send: &mut Vec<ClientMsg>) -> Result<Vec<(u64, usize)>> {
        let Session::Ready {
            sent_upto,
            caught_up,
        } = self.session
        else {
            return Ok(Vec::new());
        };
        if self.rewind.suspected {
            return Ok(Vec::new()); // Until caught up, see `Rewind`.
        }
        let frame_room = self
            .server_frame_bytes_max
            .saturating_sub(Self::PUSH_FRAME_OVERHEAD_BYTES);
        let batch_max = self.config.push_bytes_max.min(frame_room);
        let mut oversized = Vec::new();
        let in_flight: i64 = self.conn.query_row(
            "SELECT count(*) FROM _hearth_outbox WHERE seq <= ?1",
            [to_i64(sent_upto)],
            |r| r.get(0),
        )?;
        let room = self.config.in_flight_max.saturating_sub(in_flight as usize);
        if room == 0 {
            return Ok(oversized);
        }
        let mut stmt = self.conn.prepare_cached(
            "SELECT seq, mutation, format FROM _hearth_outbox WHERE seq > ?1 ORDER BY seq LIMIT ?2",
        )?;
        let mut rows = stmt.query(params![to_i64(sent_upto), room as i64])?;
        let mut frames = Vec::new();
        let mut batch = Vec::new();
        let mut batch_bytes = 0;
        let mut last = sent_upto;
        while let Some(row) = rows.next()? {
            let seq: i64 = row.get(0)?;
            let stored: Vec<u8> = row.get(1)?;
            let format: i64 = row.get(2)?;
            let mutation = Mutation::decode(&stored, format).map_err(|e| {
                ClientError::Protocol(format!("outbox entry {seq} is unreadable: {e}"))
            })?;
            // What goes on the wire is today's encoding.
            let blob = if format == FORMAT {
                stored
            } else {
                mutation.encode()
            };
            if blob.len() > frame_room {
                oversized.push((seq as u64, blob.len()));
                last = seq as u64;
                continue;
            }
            if !batch.is_empty() && batch_bytes + blob.len() > batch_max {
                frames.push(ClientMsg::Push {
                    mutations: std::mem::take(&mut batch),
                });
                batch_bytes = 0;
            }
            batch_bytes += blob.len();
            batch.push(mutation);
            last = seq as u64;
        }
        if !batch.is_empty() {
            frames.push(ClientMsg::Push { mutations: batch });
        }
        self.session = Session::Ready {
            sent_upto: last,
            caught_up,
        };
        send.extend(frames);
        Ok(oversized)
    }

    /// Handles one message from the server.
    pub fn handle(&mut self, msg: ServerMsg, now_ms: u64) -> Result<Output> {
        self.assert_idle("handle");
        let result = self.handle_message(msg, now_ms);
        self.assert_idle("handle");
        result
    }

    fn handle_message(&mut self, msg: ServerMsg, now_ms: u64) -> Result<Output> {
        let mut out = Output::default();
        match msg {
            ServerMsg::Welcome {
                server_seq,
                schema_version,
                schema,
                frame_bytes_max,
                last_seq,
            } => {
                self.server_frame_bytes_max =
                    usize::try_from(frame_bytes_max).unwrap_or(usize::MAX);
                // The server has processed a number this device still holds
                // pending (a lost ack, or a lost history) or would use next
                // (a lost history): catch up before sending anything.
                let first_unacked: Option<i64> =
                    self.conn
                        .query_row("SELECT min(seq) FROM _hearth_outbox", [], |r| r.get(0))?;
                let first_unacked = first_unacked.map_or(self.next_seq, |s| s as u64);
                self.rewind = Rewind {
                    suspected: first_unacked <= last_seq,
                    confirmed: false,
                    server_last_seq: last_seq,
                };
                if self.session != Session::AwaitingWelcome {
                    return Err(ClientError::Protocol(
                        "Welcome outside the handshake".into(),
                    ));
                }
                if self.cursor > server_seq {
                    return Err(ClientError::SchemaMismatch(format!(
                        "this device has seen server sequence {} but the server's head is {server_seq}: \
                         it is a different server, or the server lost data",
                        self.cursor
                    )));
                }
                match schema {
                    Some(source) => {
                        let schema = Schema::parse(&source)?;
                        if schema.version != schema_version {
                            return Err(ClientError::Protocol(
                                "Welcome's schema version disagrees with its schema".into(),
                            ));
                        }
                        if self.schema.as_ref() != Some(&schema) {
                            self.install_schema(schema)?;
                            out.events.push(Event::SchemaInstalled {
                                version: schema_version,
                            });
                        }
                    }
                    None if self.schema.is_none() => {
                        return Err(ClientError::Protocol(
                            "server sent no schema to a device without one".into(),
                        ));
                    }
                    None => {}
                }
                self.session = Session::Ready {
                    sent_upto: 0,
                    caught_up: false,
                };
            }
            ServerMsg::Changes { entries, caught_up } => {
                let Session::Ready { sent_upto, .. } = self.session else {
                    return Err(ClientError::Protocol("Changes before Welcome".into()));
                };
                self.apply_entries(&entries, &mut out)?;
                self.session = Session::Ready {
                    sent_upto,
                    caught_up,
                };
                if caught_up && self.rewind.suspected {
                    // Every ack the server had for this device is in: what
                    // is still pending under a taken number is not the
                    // server's.
                    if self.rewind.confirmed {
                        let reason =
                            "the server holds other mutations under numbers this device reused";
                        out.events.push(self.rewind(now_ms, reason.into())?);
                        return Ok(out);
                    }
                    // No reused number turned up: numbers from here on
                    // start past the server's; pending ones it may have
                    // refused are sent and answered from its record.
                    self.skip_seqs_to(self.rewind.server_last_seq + 1)?;
                    self.rewind = Rewind::default();
                }
                if caught_up {
                    out.events.push(Event::CaughtUp {
                        server_seq: self.cursor,
                    });
                }
            }
            ServerMsg::Rejected {
                client_seq,
                code,
                reason,
            } => {
                self.apply_rejection(client_seq, &code, &reason, &mut out)?;
            }
            ServerMsg::Error { code, message } if code == crate::server::DEVICE_REWOUND => {
                out.events.push(self.rewind(now_ms, message)?);
                return Ok(out);
            }
            ServerMsg::Error { code, message } => {
                return Err(ClientError::Server { code, message })
            }
        }
        let sent = self.poll_send()?;
        out.send = sent.send;
        out.events.extend(sent.events);
        Ok(out)
    }

    /// Numbers the next mutation at least `next` (the numbers before it are
    /// the server's, from a history this device lost).
    fn skip_seqs_to(&mut self, next: u64) -> Result<()> {
        if self.next_seq < next {
            meta_set(&self.conn, "next_seq", to_i64(next))?;
            self.next_seq = next;
        }
        Ok(())
    }

    /// The device lost the end of its history: it takes a new identity and
    /// this connection is over (see [`Event::Rewound`]).
    fn rewind(&mut self, now_ms: u64, reason: String) -> Result<Event> {
        let old_client_id = self.client_id;
        let renumbered = self.take_new_identity(now_ms)?;
        self.session = Session::Offline;
        Ok(Event::Rewound {
            old_client_id,
            new_client_id: self.client_id,
            renumbered,
            reason,
        })
    }

    /// Takes a new client id and renumbers the pending mutations 1, 2, ...
    /// in their order, in one transaction (see [`Event::Rewound`]). The new
    /// id is derived from the old one, the next sequence number and the
    /// time, so the engine needs no randomness of its own.
    fn take_new_identity(&mut self, now_ms: u64) -> Result<Vec<(u64, u64)>> {
        let mut new_id =
            splitmix64(self.client_id ^ splitmix64(self.next_seq ^ now_ms.rotate_left(32)));
        if new_id == 0 || new_id == self.client_id {
            new_id = splitmix64(new_id.wrapping_add(1)).max(1);
        }
        let pending = self.load_pending()?;
        let next_seq = pending.len() as u64 + 1;
        let renumbered: Vec<(u64, u64)> = pending
            .iter()
            .enumerate()
            .map(|(i, (seq, _, _))| (*seq, i as u64 + 1))
            .collect();
        self.atomically(|c| {
            c.conn.execute("DELETE FROM _hearth_outbox", [])?;
            let mut insert = c.conn.prepare_cached(
                "INSERT INTO _hearth_outbox (seq, hlc, mutation, undo, format) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            for (i, (_, mut mutation, undo)) in pending.into_iter().enumerate() {
                mutation.seq = i as u64 + 1;
                insert.execute(params![
                    to_i64(mutation.seq),
                    to_i64(mutation.hlc.0),
                    mutation.encode(),
                    postcard::to_allocvec(&undo).expect("encode undo"),
                    FORMAT,
                ])?;
            }
            drop(insert);
            meta_set(&c.conn, "client_id", to_i64(new_id))?;
            meta_set(&c.conn, "next_seq", to_i64(next_seq))?;
            Ok(())
        })?;
        self.client_id = new_id;
        self.next_seq = next_seq;
        // Text edits made from here on carry the new identity.
        self.text.borrow_mut().set_own(new_id);
        self.local_text.borrow_mut().clear();
        self.pending_rows.clear();
        for (_, mutation, _) in self.load_pending()? {
            count_rows(&mut self.pending_rows, &mutation);
        }
        Ok(renumbered)
    }

    fn install_schema(&mut self, schema: Schema) -> Result<()> {
        self.atomically(|c| {
            rows::ensure_tables(&c.conn, &schema).map_err(ClientError::SchemaMismatch)?;
            meta_set(&c.conn, "schema", schema.source.as_str())?;
            meta_set(&c.conn, "schema_version", to_i64(schema.version))?;
            Ok(())
        })?;
        self.install_capture(&schema)?;
        self.schema = Some(schema);
        Ok(())
    }

    fn schema_ref(&self) -> Result<&Schema> {
        self.schema.as_ref().ok_or(ClientError::NoSchema)
    }

    fn table(&self, name: &str) -> Result<&Table> {
        self.schema_ref()?.table(name).ok_or_else(|| {
            ClientError::SchemaMismatch(format!("server sent a change to unknown table '{name}'"))
        })
    }

    /// Writes one transaction's changes as a whole, see
    /// [`rows::write_all`]: a log entry written by `author` (`Some`), or a
    /// pending mutation being redone (`None`). Operations of counters, sets
    /// and text apply over the row as it is; text edits go to the cells'
    /// documents (the confirmed one too, for a log entry), and the column
    /// shows the device's document.
    fn apply_changes(&self, changes: &[RowChange], author: Option<u64>) -> Result<()> {
        struct Planned<'t> {
            table: &'t Table,
            pk: &'t Value,
            /// None: delete; Some((insert, columns)).
            op: Option<(bool, Vec<(usize, Value)>)>,
        }
        let mut planned = Vec::with_capacity(changes.len());
        for change in changes {
            let table = self.table(&change.table)?;
            let op = match &change.op {
                RowOp::Delete => {
                    for column in table
                        .columns
                        .iter()
                        .filter(|c| c.policy == MergePolicy::Text)
                    {
                        let cell = Cell {
                            table: &table.name,
                            pk: &change.pk,
                            column: &column.name,
                        };
                        if author.is_some() {
                            self.text.borrow().remove(&self.conn, cell)?;
                        }
                        self.local_text.borrow_mut().remove(&cell.key());
                    }
                    None
                }
                RowOp::Upsert { insert, columns } => {
                    let needs_row = columns
                        .iter()
                        .any(|(_, op)| !matches!(op, ColumnOp::Set(_)));
                    let row = if needs_row {
                        match rows::read_row(&self.conn, table, &change.pk)? {
                            Some(row) => Some(row),
                            // An update of a row this device does not have.
                            None if !*insert => continue,
                            None => None,
                        }
                    } else {
                        None
                    };
                    let mut cols = Vec::with_capacity(columns.len());
                    for (name, op) in columns {
                        let idx = table.column_index(name).ok_or_else(|| {
                            ClientError::SchemaMismatch(format!(
                                "unknown column '{name}' in table '{}'",
                                table.name
                            ))
                        })?;
                        let current = row.as_ref().map(|r| &r[idx]).unwrap_or(&Value::Null);
                        let cell = Cell {
                            table: &table.name,
                            pk: &change.pk,
                            column: name,
                        };
                        let value = match op {
                            ColumnOp::Set(v) => {
                                if table.columns[idx].policy == MergePolicy::Text {
                                    if let Some(author) = author {
                                        // A whole text value from the server (a new
                                        // row): every side starts the same document.
                                        let text = text_of(name, v).unwrap_or_default();
                                        self.text
                                            .borrow_mut()
                                            .reset(&self.conn, cell, &text, author)?;
                                        self.local_text.borrow_mut().remove(&cell.key());
                                    }
                                }
                                v.clone()
                            }
                            ColumnOp::Add(delta) => counter::apply(name, current, *delta)
                                .map_err(ClientError::Refused)?,
                            ColumnOp::SetOps { add, remove } => {
                                set::apply(name, current, add, remove)
                            }
                            ColumnOp::Text(update) => {
                                let now = text_of(name, current).unwrap_or_default();
                                if author.is_some() {
                                    self.text
                                        .borrow_mut()
                                        .apply(&self.conn, cell, update, &now)
                                        .map_err(text_failure)?;
                                }
                                let cached = self.local_text.borrow().contains_key(&cell.key());
                                let text = if cached || author.is_none() {
                                    self.with_local_doc(cell, &now, |doc| {
                                        doc.apply_update(update).map(|()| doc.text())
                                    })?
                                    .map_err(|e| {
                                        ClientError::Refused(format!("text column '{name}': {e}"))
                                    })?
                                } else {
                                    let mut cells = self.text.borrow_mut();
                                    let doc = cells.get(&self.conn, cell).map_err(text_failure)?;
                                    doc.map(|d| d.text()).unwrap_or(now)
                                };
                                Value::Text(text)
                            }
                        };
                        cols.push((idx, value));
                    }
                    Some((*insert, cols))
                }
            };
            planned.push(Planned {
                table,
                pk: &change.pk,
                op,
            });
        }
        let writes: Vec<rows::Write<'_>> = planned
            .iter()
            .map(|p| rows::Write {
                table: p.table,
                pk: p.pk,
                op: match &p.op {
                    None => rows::WriteOp::Delete,
                    Some((true, cols)) => {
                        rows::WriteOp::Upsert(cols.iter().map(|(i, v)| (*i, v)).collect())
                    }
                    Some((false, cols)) => {
                        rows::WriteOp::Update(cols.iter().map(|(i, v)| (*i, v)).collect())
                    }
                },
            })
            .collect();
        rows::write_all(&self.conn, &writes)?;
        Ok(())
    }

    fn apply_undo(&self, undo: &[Preimage]) -> Result<()> {
        // Remove every row the mutation touched, then put the pre-images
        // back. Restoring row by row in place can clash on a UNIQUE value
        // that another touched row still holds (say an INSERT OR REPLACE
        // that displaced a row); the pre-images plus the untouched rows are
        // the state before the mutation, which SQLite accepted, so no subset
        // of it can clash.
        for pre in undo {
            rows::delete_row(&self.conn, self.table(&pre.table)?, &pre.pk)?;
        }
        for pre in undo {
            if let Some(values) = &pre.row {
                rows::restore_row(&self.conn, self.table(&pre.table)?, values)?;
            }
        }
        Ok(())
    }

    fn load_pending(&self) -> Result<Vec<(u64, Mutation, Vec<Preimage>)>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT seq, mutation, undo, format FROM _hearth_outbox ORDER BY seq",
        )?;
        let mut rows = stmt.query([])?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            let seq: i64 = row.get(0)?;
            let m: Vec<u8> = row.get(1)?;
            let u: Vec<u8> = row.get(2)?;
            out.push(decode_pending(seq as u64, &m, &u, row.get(3)?)?);
        }
        Ok(out)
    }

    /// Undoes every pending mutation, runs `between` on the confirmed state,
    /// then redoes the mutations still pending, recording fresh pre-images.
    fn rebase(&mut self, between: impl FnOnce(&mut Client) -> Result<()>) -> Result<()> {
        let remaining = self.replicated(|c| c.rebase_in_transaction(between))?;
        self.pending = remaining;
        Ok(())
    }

    fn rebase_in_transaction(
        &mut self,
        between: impl FnOnce(&mut Client) -> Result<()>,
    ) -> Result<u64> {
        let pending = self.load_pending()?;
        for (_, _, undo) in pending.iter().rev() {
            self.apply_undo(undo)?;
        }
        between(self)?;
        let still: HashSet<u64> = self.pending_seqs()?.into_iter().collect();
        for (seq, mutation, _) in pending.iter().filter(|(s, _, _)| still.contains(s)) {
            let mut undo = Vec::with_capacity(mutation.changes.len());
            for change in &mutation.changes {
                let table = self.table(&change.table)?;
                undo.push(Preimage {
                    table: change.table.clone(),
                    pk: change.pk.clone(),
                    row: rows::read_row(&self.conn, table, &change.pk)?,
                });
            }
            // A pending write that no longer fits the confirmed state (say a
            // UNIQUE clash with a row another device made) is left out of the
            // local view; the server will refuse or apply it and say so.
            self.conn.execute_batch("SAVEPOINT hearth_redo")?;
            match self.apply_changes(&mutation.changes, None) {
                Ok(()) => self.conn.execute_batch("RELEASE hearth_redo")?,
                Err(_) => {
                    self.conn
                        .execute_batch("ROLLBACK TO hearth_redo; RELEASE hearth_redo")?;
                    self.forget_text();
                    undo.clear();
                }
            }
            let blob = postcard::to_allocvec(&undo).expect("encode undo");
            self.conn
                .prepare_cached("UPDATE _hearth_outbox SET undo = ?1 WHERE seq = ?2")?
                .execute(params![blob, to_i64(*seq)])?;
        }
        self.clear_capture()?;
        meta_set(&self.conn, "cursor", to_i64(self.cursor))?;
        meta_set(&self.conn, "hlc", to_i64(self.clock.last().0))?;
        Ok(still.len() as u64)
    }

    fn apply_entries(&mut self, entries: &[LogEntry], out: &mut Output) -> Result<()> {
        let fresh: Vec<&LogEntry> = entries
            .iter()
            .filter(|e| e.server_seq > self.cursor)
            .collect();
        if fresh.is_empty() {
            return Ok(());
        }
        let mine: Vec<u64> = fresh
            .iter()
            .filter(|e| e.client_id == self.client_id)
            .map(|e| e.client_seq)
            .collect();
        let mut acked = self.load_pending_subset(&mine)?;
        // An entry under this device's id and a pending sequence number is
        // its ack only if it applied that very mutation: the digests agree
        // (entries stored before digests were kept carry 0, and then the
        // rows it wrote must be rows the mutation wrote). Anything else means
        // the server holds another mutation under that number: this device
        // lost the end of its history without the server noticing at Hello.
        // The entry is applied as another device's, and the device takes a
        // new identity so its own write is not taken for done.
        let mut impostor = false;
        acked.retain(|(seq, mutation, _)| {
            let entry = fresh
                .iter()
                .find(|e| e.client_id == self.client_id && e.client_seq == *seq)
                .expect("acked mutations come from fresh entries");
            let matches = if entry.digest != 0 {
                entry.digest == mutation.digest()
            } else {
                let written: HashSet<RowKey> = mutation
                    .changes
                    .iter()
                    .map(|c| row_key(&c.table, &c.pk))
                    .collect();
                entry
                    .changes
                    .iter()
                    .all(|c| written.contains(&row_key(&c.table, &c.pk)))
            };
            impostor |= !matches;
            matches
        });
        let saved_cursor = self.cursor;
        let saved_clock = self.clock.clone();
        let mut tables = BTreeSet::new();
        let result = self.settle(&acked, fresh.iter().flat_map(|e| e.changes.iter()), |c| {
            for entry in &fresh {
                c.apply_changes(&entry.changes, Some(entry.client_id))?;
                tables.extend(entry.changes.iter().map(|change| change.table.clone()));
                c.clock.observe(entry.hlc);
                c.cursor = entry.server_seq;
            }
            Ok(())
        });
        if let Err(e) = result {
            self.cursor = saved_cursor;
            self.clock = saved_clock;
            return Err(e);
        }
        let acked_seqs: HashSet<u64> = acked.iter().map(|(s, _, _)| *s).collect();
        for entry in fresh
            .iter()
            .filter(|e| e.client_id == self.client_id && acked_seqs.contains(&e.client_seq))
        {
            out.events.push(Event::Applied {
                seq: entry.client_seq,
                server_seq: entry.server_seq,
            });
        }
        if !tables.is_empty() {
            out.events
                .push(Event::TablesChanged(tables.into_iter().collect()));
        }
        if impostor {
            self.rewind.suspected = true;
            self.rewind.confirmed = true;
        }
        Ok(())
    }

    fn apply_rejection(
        &mut self,
        seq: u64,
        code: &str,
        reason: &str,
        out: &mut Output,
    ) -> Result<()> {
        let rejected = self.load_pending_subset(&[seq])?;
        let Some((_, mutation, _)) = rejected.first() else {
            return Ok(()); // Already handled before a reconnect.
        };
        let tables: BTreeSet<String> = mutation.changes.iter().map(|c| c.table.clone()).collect();
        // The device's text documents hold the refused edits: rebuild them
        // from the confirmed ones and what stays pending, and show that.
        let text_cells: Vec<(String, Value, String)> = mutation
            .changes
            .iter()
            .flat_map(|c| match &c.op {
                RowOp::Upsert { columns, .. } => columns
                    .iter()
                    .filter(|(_, op)| matches!(op, ColumnOp::Text(_)))
                    .map(|(n, _)| (c.table.clone(), c.pk.clone(), n.clone()))
                    .collect(),
                RowOp::Delete => Vec::new(),
            })
            .collect();
        self.settle(&rejected, std::iter::empty(), |c| {
            c.local_text.borrow_mut().clear();
            for (table, pk, column) in &text_cells {
                let t = c.table(table)?;
                let Some(idx) = t.column_index(column) else {
                    continue;
                };
                let cell = Cell { table, pk, column };
                let text = c.with_local_doc(cell, "", |doc| doc.text())?;
                rows::update_columns(&c.conn, t, pk, &[(idx, &Value::Text(text))])?;
            }
            Ok(())
        })?;
        out.events.push(Event::Rejected {
            seq,
            code: code.to_string(),
            reason: reason.to_string(),
        });
        out.events
            .push(Event::TablesChanged(tables.into_iter().collect()));
        Ok(())
    }

    /// The pending mutations with these sequence numbers, in order.
    fn load_pending_subset(&self, seqs: &[u64]) -> Result<Vec<(u64, Mutation, Vec<Preimage>)>> {
        let mut out = Vec::new();
        let mut stmt = self
            .conn
            .prepare_cached("SELECT mutation, undo, format FROM _hearth_outbox WHERE seq = ?1")?;
        let mut sorted = seqs.to_vec();
        sorted.sort_unstable();
        for seq in sorted {
            let found: Option<(Vec<u8>, Vec<u8>, i64)> = stmt
                .query_row([to_i64(seq)], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .optional()?;
            if let Some((m, u, format)) = found {
                out.push(decode_pending(seq, &m, &u, format)?);
            }
        }
        Ok(out)
    }

    /// Removes `done` (acked or refused) from the pending mutations and runs
    /// `apply` (server changes touching `incoming`) on the confirmed state.
    ///
    /// When no mutation that stays pending touches a row that `done` or the
    /// incoming changes touch, undoing just `done` is enough: the rows the
    /// remaining mutations touch are not involved. That is the common case
    /// (acks of a device's own writes) and costs O(changes). Otherwise every
    /// pending mutation is undone and redone (a full rebase).
    fn settle<'a>(
        &mut self,
        done: &[(u64, Mutation, Vec<Preimage>)],
        incoming: impl Iterator<Item = &'a RowChange>,
        mut apply: impl FnMut(&mut Client) -> Result<()>,
    ) -> Result<()> {
        let mut remaining = self.pending_rows.clone();
        for (_, m, _) in done {
            for c in &m.changes {
                for key in keys_of(c) {
                    if let Some(n) = remaining.get_mut(&key) {
                        *n -= 1;
                        if *n == 0 {
                            remaining.remove(&key);
                        }
                    }
                }
            }
        }
        // Pre-images of the remaining mutations stay valid when the rows they
        // cover are untouched, as long as no other row can constrain them.
        // Through a UNIQUE index it can: a row the server changed may now
        // hold a value that a remaining mutation's pre-image also holds
        // (found by the simulator, `regression_settle_fast_path_stale_preimage`).
        let cross_row = |table: &str| self.cross_row_tables.contains(table);
        let touches = |c: &RowChange| {
            remaining.contains_key(&row_key(&c.table, &c.pk)) || cross_row(&c.table)
        };
        let overlaps = done
            .iter()
            .flat_map(|(_, m, _)| m.changes.iter())
            .any(touches)
            || incoming.into_iter().any(touches)
            || (!self.cross_row_tables.is_empty()
                && self
                    .cross_row_tables
                    .iter()
                    .any(|t| remaining.contains_key(&table_key(t))));
        let remove = |c: &mut Client| -> Result<()> {
            let mut stmt = c
                .conn
                .prepare_cached("DELETE FROM _hearth_outbox WHERE seq = ?1")?;
            for (seq, _, _) in done {
                stmt.execute([to_i64(*seq)])?;
            }
            Ok(())
        };
        // A remote row can also clash with a pending row it does not share a
        // key with (a UNIQUE column): then the fast path fails, rolls back,
        // and the full rebase, which leaves such a pending write out of the
        // local view until the server decides, takes over.
        let fast = !overlaps
            && self
                .replicated(|c| {
                    for (_, _, undo) in done.iter().rev() {
                        c.apply_undo(undo)?;
                    }
                    remove(c)?;
                    apply(c)?;
                    c.clear_capture()?;
                    meta_set(&c.conn, "cursor", to_i64(c.cursor))?;
                    meta_set(&c.conn, "hlc", to_i64(c.clock.last().0))?;
                    Ok(())
                })
                .is_ok();
        if fast {
            self.pending -= done.len() as u64;
        } else {
            self.rebase(|c| {
                remove(c)?;
                apply(c)
            })?;
        }
        self.pending_rows = remaining;
        Ok(())
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
fn text_of(column: &str, v: &Value) -> Result<String> {
    match v {
        Value::Text(t) => Ok(t.clone()),
        Value::Null => Ok(String::new()),
        other => Err(ClientError::Refused(format!(
            "text column '{column}' holds TEXT, not {}",
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
