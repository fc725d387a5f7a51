//! The server's half of the engine: validate a device's mutations, merge
//! them into the store, and keep the ordered change log.
//!
//! The store is the app's real tables plus Hearth's bookkeeping in the same
//! SQLite database:
//! - `_hearth_log`: every applied mutation's effect, by global sequence.
//! - `_hearth_rows`: per row, whether it lives, the stamp that created or
//!   deleted it, and each column's last-writer stamp.
//! - `_hearth_clients`: per device, the last mutation sequence it processed
//!   and the stamp that mutation was merged with,
//!   so a mutation sent twice is applied once.
//! - `_hearth_rejections`: why a mutation was refused, to answer a re-send.
//!
//! Merge rules (last-writer-wins by [`Stamp`]):
//! - an update writes each column whose stored stamp is older;
//! - an update of a row that does not exist (deleted, or never made) does
//!   nothing: a delete wins over concurrent updates;
//! - a delete removes the row unless the row was (re)created by a later
//!   stamp; an insert creates the row unless a later delete is recorded, and
//!   merges into the row column by column when it exists.

use std::collections::{HashMap, HashSet};

use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

use std::cell::RefCell;

use crate::change::{ColumnOp, LogEntry, Mutation, RowChange, RowImage, RowOp, FORMAT};
use crate::fk;
use crate::hlc::{Hlc, Stamp};
use crate::merge::manual::{self, Conflict, ManualState};
use crate::merge::set::SetState;
use crate::merge::text::TextError;
use crate::merge::{counter, Dot, Refusal, Writer};
use crate::protocol::{ClientMsg, ServerMsg};
use crate::rows;
use crate::schema::{MergePolicy, OnDelete, Schema, Table, CONFLICTS_TABLE};
use crate::textcells::{Cell, TextCells, TextFailure};
use crate::value::Value;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("store error: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("{0}")]
    Schema(String),
    #[error("store is corrupt: {0}")]
    Corrupt(String),
}

pub type Result<T, E = ServerError> = std::result::Result<T, E>;

/// What became of one pushed mutation.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Applied(LogEntry),
    Rejected {
        client_id: u64,
        client_seq: u64,
        code: String,
        reason: String,
    },
    /// Sent before and already processed; `rejection` tells how if refused,
    /// `compacted` where it was applied when its log entry (the device's
    /// ack) is gone to compaction.
    Duplicate {
        client_id: u64,
        client_seq: u64,
        rejection: Option<(String, String)>,
        /// (log position, digest).
        compacted: Option<(u64, u64)>,
    },
}

impl Outcome {
    /// What the device that sent a refused mutation is told (also when it
    /// sends it again): `Rejected` with the code and reason, or the fatal
    /// `Error` `DEVICE_REWOUND`. None for an applied mutation, whose log
    /// entry reaches every device instead.
    pub fn refusal(&self) -> Option<crate::protocol::ServerMsg> {
        if let Outcome::Duplicate {
            client_seq,
            rejection: None,
            compacted: Some((server_seq, digest)),
            ..
        } = self
        {
            // Applied, and its log entry compacted away: the ack is said.
            return Some(ServerMsg::Acked {
                client_seq: *client_seq,
                server_seq: *server_seq,
                digest: *digest,
            });
        }
        let (client_seq, code, reason) = match self {
            Outcome::Rejected {
                client_seq,
                code,
                reason,
                ..
            } => (client_seq, code, reason),
            Outcome::Duplicate {
                client_seq,
                rejection: Some((code, reason)),
                ..
            } => (client_seq, code, reason),
            _ => return None,
        };
        if code == DEVICE_REWOUND {
            return Some(ServerMsg::Error {
                code: code.clone(),
                message: reason.clone(),
            });
        }
        Some(ServerMsg::Rejected {
            client_seq: *client_seq,
            code: code.clone(),
            reason: reason.clone(),
        })
    }
}

/// The outcome for a mutation of a device found rewound: `Rejected` with
/// code [`DEVICE_REWOUND`], which [`Outcome::refusal`] turns into the fatal
/// `Error` the device answers by taking a new client id. It leaves no record:
/// the mutation is neither applied nor refused, and comes back renumbered.
fn rewound(client_id: u64, client_seq: u64) -> Outcome {
    Outcome::Rejected {
        client_id,
        client_seq,
        code: DEVICE_REWOUND.into(),
        reason: format!(
            "mutation {client_seq} of client {client_id} differs from the one the server processed under that number: \
             the device lost the end of its history and must take a new client id"
        ),
    }
}

const INTERNAL_TABLES: &str = "
CREATE TABLE IF NOT EXISTS _hearth_meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS _hearth_log (
  seq        INTEGER PRIMARY KEY,
  client_id  INTEGER NOT NULL,
  client_seq INTEGER NOT NULL,
  hlc        INTEGER NOT NULL,
  changes    BLOB NOT NULL,
  digest     INTEGER NOT NULL DEFAULT 0,
  format     INTEGER NOT NULL DEFAULT 1,
  images     BLOB
);
CREATE TABLE IF NOT EXISTS _hearth_rows (
  tbl    TEXT NOT NULL,
  pk     NOT NULL,
  meta   BLOB NOT NULL,
  format INTEGER NOT NULL DEFAULT 1,
  PRIMARY KEY (tbl, pk)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS _hearth_clients (
  client_id INTEGER PRIMARY KEY,
  last_seq  INTEGER NOT NULL,
  last_hlc  INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS _hearth_log_times (
  seq INTEGER PRIMARY KEY,
  ms  INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS _hearth_compacted (
  client_id  INTEGER NOT NULL,
  client_seq INTEGER NOT NULL,
  digest     INTEGER NOT NULL,
  seq        INTEGER NOT NULL,
  PRIMARY KEY (client_id, client_seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS _hearth_rejections (
  client_id  INTEGER NOT NULL,
  client_seq INTEGER NOT NULL,
  code       TEXT NOT NULL,
  reason     TEXT NOT NULL,
  digest     INTEGER NOT NULL DEFAULT 0,
  PRIMARY KEY (client_id, client_seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS _hearth_devices (
  client_id INTEGER PRIMARY KEY,
  user      TEXT NOT NULL,
  access    INTEGER NOT NULL
);
";

/// Per-row merge bookkeeping, as written before merge policies (format 1).
#[derive(Deserialize)]
struct RowMetaV1 {
    alive: bool,
    stamp: Stamp,
    columns: Vec<Stamp>,
}

/// Per-row merge bookkeeping (format 2).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct RowMeta {
    alive: bool,
    /// The stamp that created the row (alive) or deleted it (not alive).
    stamp: Stamp,
    /// Last-writer stamp per column index; missing entries are zero.
    columns: Vec<Stamp>,
    /// The last write to the row that changed it (creation, update or
    /// delete): an `update-wins` table lets an update that had not seen a
    /// delete bring the row back, and ignores a delete that had not seen
    /// the latest update.
    last_write: Dot,
    /// `update-wins` tables: the row as it was deleted.
    last_values: Option<Vec<Value>>,
    /// State of `set` and `manual` cells, by column index.
    cells: Vec<(u32, CellState)>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
enum CellState {
    Set(SetState),
    Manual(ManualState),
}

impl RowMeta {
    fn column(&self, i: usize) -> Stamp {
        self.columns.get(i).copied().unwrap_or_default()
    }

    fn set_column(&mut self, i: usize, stamp: Stamp) {
        if self.columns.len() <= i {
            self.columns.resize(i + 1, Stamp::default());
        }
        self.columns[i] = stamp;
    }

    fn cell(&self, i: usize) -> Option<&CellState> {
        self.cells
            .iter()
            .find(|(c, _)| *c as usize == i)
            .map(|(_, s)| s)
    }

    fn set_cell(&mut self, i: usize, state: CellState) {
        match self.cells.iter_mut().find(|(c, _)| *c as usize == i) {
            Some(slot) => slot.1 = state,
            None => self.cells.push((i as u32, state)),
        }
    }
}

/// A row write the merge of one mutation decided on, applied with the
/// others once the whole mutation is merged.
struct Plan<'t> {
    table: &'t Table,
    pk: Value,
    op: PlanOp,
}

/// What merging a row's columns decided: the values to write (by column
/// index) and the column changes for the log.
type MergedColumns = (Vec<(usize, Value)>, Vec<(String, ColumnOp)>);

enum PlanOp {
    Upsert(Vec<(usize, Value)>),
    Update(Vec<(usize, Value)>),
    Delete,
}

fn refuse(code: &'static str, reason: impl Into<String>) -> Refusal {
    Refusal {
        code,
        reason: reason.into(),
    }
}

fn sql_refusal(e: rusqlite::Error) -> Refusal {
    let code = match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::ConstraintViolation) => "CONSTRAINT",
        _ => "INVALID",
    };
    Refusal {
        code,
        reason: e.to_string(),
    }
}

/// Stores a u64 from the wire (client ids are random 64-bit numbers) in an
/// SQLite integer, bit for bit; `as u64` on the way back restores it.
/// An integer of `_hearth_meta`, 0 when unset.
fn meta_i64(conn: &Connection, key: &str) -> rusqlite::Result<i64> {
    Ok(conn
        .prepare_cached("SELECT value FROM _hearth_meta WHERE key = ?1")?
        .query_row([key], |r| r.get::<_, i64>(0))
        .optional()?
        .unwrap_or(0))
}

/// The log position up to which compaction removed the log's entries
/// (0: never compacted). A device whose cursor is below it re-loads.
pub fn log_floor(conn: &Connection) -> rusqlite::Result<u64> {
    Ok(meta_i64(conn, "log_floor")? as u64)
}

/// What one [`ServerCore::compact`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Compacted {
    /// Entries removed.
    pub entries: u64,
    /// The log's floor after it.
    pub floor: u64,
}

/// A primary key as a reason shows it.
fn show_key(pk: &Value) -> String {
    match pk {
        Value::Integer(i) => i.to_string(),
        Value::Text(t) => format!("'{}'", t.replace('\'', "''")),
        other => format!("{other:?}"),
    }
}

fn to_i64(v: u64) -> i64 {
    v as i64
}

/// Validator failures kept for the driver to take (see
/// [`ServerCore::take_validator_failures`]).
pub const VALIDATOR_FAILURES_MAX: usize = 1_000;

/// How far ahead of the server's clock a device's stamp may be. A stamp
/// beyond it is lowered to it, so one device with a wrong (or hostile) clock
/// cannot win every later write for hours.
pub const CLOCK_AHEAD_MAX_MS: u64 = 5 * 60 * 1000;

pub struct ServerCore {
    /// The server's wall clock as of the batch being applied, when the
    /// driver gives one (the simulator does not, to keep its skew model).
    now_ms: Option<u64>,
    /// The latest stamp merged so far.
    max_hlc: Hlc,
    conn: Connection,
    schema: Schema,
    head: u64,
    /// Per device: the last sequence number processed and the stamp its
    /// last applied mutation was merged with (cached from `_hearth_clients`).
    last_seqs: HashMap<u64, (u64, Hlc)>,
    /// Checked per mutation (the store runs with SQLite's enforcement off).
    foreign_keys: fk::ForeignKeys,
    /// Client ids found rewound since start: their mutations are not taken.
    rewound: HashSet<u64>,
    /// Documents of `text` cells.
    text: RefCell<TextCells>,
    /// The largest log entry (encoded) a merge may produce, see
    /// [`ServerCore::set_entry_bytes_max`].
    entry_bytes_max: usize,
    /// Per table that streams name: the columns their conditions read
    /// (sorted). Changes to these tables keep [`RowImage`]s in the log.
    stream_columns: HashMap<String, Vec<usize>>,
    /// Who each device of the batch being applied acts for (under
    /// `[auth]`), set by the driver with [`ServerCore::set_principal`].
    principals: HashMap<u64, std::sync::Arc<crate::rules::Principal>>,
    /// The write rules as statements, by (table, action).
    write_rules: HashMap<(String, &'static str), crate::rules::WriteRule>,
    /// The app's validators (see [`crate::validate`]), run in order.
    validators: Vec<crate::validate::Validator>,
    /// Validator failures since the driver last took them.
    validator_failures: Vec<crate::validate::ValidatorFailure>,
    /// What `open` did to bring the store to the schema.
    migration: crate::migrate::Plan,
    /// What the store's earlier schemas say of writes made under them: a
    /// write to a dropped table is refused `TABLE_DROPPED`, its values for
    /// dropped columns are discarded.
    eras: Eras,
}

/// A row of a streamed table before a mutation merges: (table, key, the
/// row as stream conditions read it; None when it did not exist).
type Before = (String, Value, Option<Vec<Value>>);

/// Per table routed row by row (streamed, filtered by a read rule, or
/// looked up by one), the columns its streams' conditions, its read rule
/// and the lookups into it read.
pub fn stream_columns(schema: &Schema) -> HashMap<String, Vec<usize>> {
    let mut out: HashMap<String, Vec<usize>> = HashMap::new();
    let mut add = |table: &str, columns: &[usize]| {
        let cols = out.entry(table.to_string()).or_default();
        cols.extend_from_slice(columns);
        cols.sort_unstable();
        cols.dedup();
    };
    for stream in schema.streams.values() {
        add(&stream.table, stream.filter.columns());
    }
    for table in schema.tables.keys() {
        if let Some(rule) = schema.read_rule(table) {
            add(table, rule.filter.columns());
            for lookup in &rule.lookups {
                add(&lookup.table, &lookup.columns());
            }
        } else if schema.readable_by_none(table) {
            add(table, &[]);
        }
    }
    out
}

/// A row with only `columns` kept (the others Null): what a stream's
/// condition reads of it.
fn project(row: Vec<Value>, columns: &[usize]) -> Vec<Value> {
    let mut row = row;
    let mut keep = columns.iter().peekable();
    for (i, v) in row.iter_mut().enumerate() {
        if keep.peek() == Some(&&i) {
            keep.next();
        } else {
            *v = Value::Null;
        }
    }
    row
}

impl ServerCore {
    /// Opens the store: creates missing app tables and Hearth's bookkeeping,
    /// and checks existing tables against the schema.
    ///
    /// Replicated changes are written with SQLite's foreign key enforcement
    /// off (they are checked per mutation instead, see `fk`), and the store
    /// keeps no app triggers: a trigger ran on the device that made the
    /// write, and its effects arrive as data.
    pub fn open(conn: Connection, schema: Schema) -> Result<ServerCore> {
        conn.set_prepared_statement_cache_capacity(256);
        conn.execute_batch("PRAGMA foreign_keys = OFF")?;
        conn.execute_batch("BEGIN")?;
        match prepare_store(&conn, &schema) {
            Ok(plan) => {
                conn.execute_batch("COMMIT")?;
                let mut core = ServerCore::opened(conn, schema)?;
                core.migration = plan;
                Ok(core)
            }
            Err(e) => {
                conn.execute_batch("ROLLBACK")?;
                Err(e)
            }
        }
    }

    /// What [`ServerCore::open`] would do to the store to bring it to
    /// `schema` (`serve --check`): the migration's steps, or the error that
    /// would stop `serve`. Everything is tried in a transaction that is
    /// then rolled back, so rows that break a new constraint are found, and
    /// nothing changes.
    pub fn check(conn: &Connection, schema: &Schema) -> Result<crate::migrate::Plan> {
        conn.execute_batch("PRAGMA foreign_keys = OFF")?;
        conn.execute_batch("BEGIN")?;
        let result = prepare_store(conn, schema);
        conn.execute_batch("ROLLBACK")?;
        result
    }

    /// The migration `open` made of the store (empty when it already
    /// matched the schema): what `serve` logs.
    pub fn migration(&self) -> &crate::migrate::Plan {
        &self.migration
    }

    fn opened(conn: Connection, schema: Schema) -> Result<ServerCore> {
        let eras = Eras::read(&conn, &schema)?;
        let floor = log_floor(&conn)?;
        let head: i64 =
            conn.query_row("SELECT coalesce(max(seq), 0) FROM _hearth_log", [], |r| {
                r.get(0)
            })?;
        let head = head.max(to_i64(floor));
        let foreign_keys = fk::ForeignKeys::load(&conn, &schema)?;
        let mut write_rules = HashMap::new();
        for (name, rules) in &schema.rules {
            let table = schema
                .table(name)
                .ok_or_else(|| ServerError::Schema(format!("rules for unknown table '{name}'")))?;
            for action in [
                crate::rules::Action::Insert,
                crate::rules::Action::Update,
                crate::rules::Action::Delete,
            ] {
                if let Some(src) = rules.write(action) {
                    let rule = crate::rules::WriteRule::new(src, table);
                    conn.prepare_cached(&rule.sql).map_err(|e| {
                        ServerError::Schema(format!(
                            "table '{name}': {} rule `{src}` cannot be evaluated: {e}",
                            action.name()
                        ))
                    })?;
                    write_rules.insert((name.clone(), action.name()), rule);
                }
            }
        }
        let max_hlc: i64 =
            conn.query_row("SELECT coalesce(max(hlc), 0) FROM _hearth_log", [], |r| {
                r.get(0)
            })?;
        let max_hlc = max_hlc.max(meta_i64(&conn, "log_floor_hlc")?);
        Ok(ServerCore {
            now_ms: None,
            max_hlc: Hlc(max_hlc as u64),
            conn,
            head: head as u64,
            last_seqs: HashMap::new(),
            foreign_keys,
            rewound: HashSet::new(),
            text: RefCell::new(TextCells::new(0)),
            entry_bytes_max: crate::protocol::FRAME_BYTES_MAX / 4 * 3,
            stream_columns: stream_columns(&schema),
            principals: HashMap::new(),
            write_rules,
            validators: Vec::new(),
            validator_failures: Vec::new(),
            migration: crate::migrate::Plan::default(),
            eras,
            schema,
        })
    }

    /// Binds a device to its user (under `[auth]`): a client id belongs to
    /// the first user that used it. Returns `Err(user)` when the id belongs
    /// to another user. (`_hearth_devices.access`, the digest protocol 5
    /// kept here, is written 0: a device keeps its own since protocol 6, see
    /// [`crate::protocol::Reloaded`].)
    pub fn bind_device(
        &mut self,
        client_id: u64,
        user: &str,
    ) -> Result<std::result::Result<(), String>> {
        let known: Option<String> = self
            .conn
            .prepare_cached("SELECT user FROM _hearth_devices WHERE client_id = ?1")?
            .query_row([to_i64(client_id)], |r| r.get(0))
            .optional()?;
        match known {
            Some(owner) if owner != user => Ok(Err(owner)),
            Some(_) => Ok(Ok(())),
            None => {
                self.conn
                    .prepare_cached(
                        "INSERT INTO _hearth_devices (client_id, user, access) VALUES (?1, ?2, 0)",
                    )?
                    .execute(params![to_i64(client_id), user])?;
                Ok(Ok(()))
            }
        }
    }

    /// Who `client_id` acts for in the next [`ServerCore::apply_batch`]
    /// (under `[auth]`, a mutation of a device with no principal is refused
    /// `FORBIDDEN`). Forgotten after the batch.
    pub fn set_principal(
        &mut self,
        client_id: u64,
        principal: std::sync::Arc<crate::rules::Principal>,
    ) {
        self.principals.insert(client_id, principal);
    }

    /// Checks every row a mutation names against its table's write rules,
    /// in the merge transaction after the whole mutation merged: `insert`
    /// on a row that did not exist, on the row as written; `delete` on the
    /// row as it was; `update` on the row as it was and as written. A
    /// change to a row that exists neither before nor after (an update of a
    /// deleted row, a delete of a missing one) has no effect and is not
    /// checked. The first failure refuses the mutation `FORBIDDEN`.
    fn check_write_rules(
        &self,
        client_id: u64,
        mutation: &Mutation,
        before: &[Option<Vec<Value>>],
    ) -> Result<(), MergeError> {
        use crate::rules::{Action, FORBIDDEN};
        let who = self.principals.get(&client_id).ok_or_else(|| {
            refuse(
                FORBIDDEN,
                "the server has no identity for this device's connection",
            )
        })?;
        for (change, was) in mutation.changes.iter().zip(before) {
            let table = self.schema.table(&change.table).ok_or_else(|| {
                refuse("UNKNOWN_TABLE", format!("unknown table '{}'", change.table))
            })?;
            let now = rows::read_row(&self.conn, table, &change.pk)?;
            let checks: Vec<(Action, &Vec<Value>, &str)> = match (&change.op, was, &now) {
                (RowOp::Delete, Some(was), _) => vec![(Action::Delete, was, "as it was")],
                (RowOp::Upsert { .. }, None, Some(now)) => {
                    vec![(Action::Insert, now, "as written")]
                }
                (RowOp::Upsert { .. }, Some(was), Some(now)) => vec![
                    (Action::Update, was, "as it was"),
                    (Action::Update, now, "as written"),
                ],
                // An upsert that left no row (deleted meanwhile, or a delete
                // won) wrote nothing; a delete of a missing row removes
                // nothing.
                _ => Vec::new(),
            };
            for (action, row, side) in checks {
                let key = (change.table.clone(), action.name());
                let Some(rule) = self.write_rules.get(&key) else {
                    return Err(refuse(
                        FORBIDDEN,
                        format!(
                            "{} on '{}' is denied: the table has no {} rule (under [auth], an action without a rule is denied)",
                            action.name(),
                            change.table,
                            action.name()
                        ),
                    )
                    .into());
                };
                let claims: Vec<Value> = rule.claims.iter().map(|c| who.claim(c)).collect();
                let allowed: bool = self.conn.prepare_cached(&rule.sql)?.query_row(
                    rusqlite::params_from_iter(row.iter().chain(claims.iter())),
                    |r| r.get(0),
                )?;
                if !allowed {
                    return Err(refuse(
                        FORBIDDEN,
                        format!(
                            "{} on '{}' (row {}) is denied: the {} rule `{}` is not true for the row {side}",
                            action.name(),
                            change.table,
                            show_key(&change.pk),
                            action.name(),
                            rule.source
                        ),
                    )
                    .into());
                }
            }
        }
        Ok(())
    }

    /// Adds a validator: it runs on every mutation after the validators
    /// added before it, inside the merge transaction, after the mutation
    /// merged and passed the write rules (see [`crate::validate`]).
    pub fn add_validator(&mut self, validator: crate::validate::Validator) {
        self.validators.push(validator);
    }

    /// The validator failures (errors, panics, invalid codes) since the
    /// last call, oldest first, for the operator's log. Each refused its
    /// mutation with `VALIDATOR_FAILED`. Kept at most
    /// [`VALIDATOR_FAILURES_MAX`] (the oldest are dropped).
    pub fn take_validator_failures(&mut self) -> Vec<crate::validate::ValidatorFailure> {
        std::mem::take(&mut self.validator_failures)
    }

    /// Runs the validators on a merged mutation: Err refuses it.
    fn run_validators(&mut self, client_id: u64, mutation: &Mutation) -> Result<(), MergeError> {
        let principal = self.principals.get(&client_id).map(|p| &**p);
        let Some((code, reason, detail)) = crate::validate::run(
            &self.validators,
            &self.conn,
            client_id,
            principal,
            mutation.seq,
            &mutation.changes,
        ) else {
            return Ok(());
        };
        if let Some(detail) = detail {
            if self.validator_failures.len() == VALIDATOR_FAILURES_MAX {
                self.validator_failures.remove(0);
            }
            self.validator_failures
                .push(crate::validate::ValidatorFailure {
                    client_id,
                    client_seq: mutation.seq,
                    detail,
                });
        }
        Err(MergeError::RefusedBy { code, reason })
    }

    /// Sets the largest encoded log entry a mutation may merge into (the
    /// driver's frame budget). A merged effect can be larger than its
    /// mutation (a set's whole array for one added element, a conflict's
    /// candidates, a revived row): such a mutation is refused `TOO_LARGE`
    /// rather than making an entry no frame can carry.
    pub fn set_entry_bytes_max(&mut self, bytes: usize) {
        self.entry_bytes_max = bytes;
    }

    /// Tells the core the server's wall clock, before applying a batch.
    pub fn set_now_ms(&mut self, now_ms: u64) {
        self.now_ms = Some(now_ms);
    }

    /// The stamp a mutation's clock reading is merged with (see
    /// [`CLOCK_AHEAD_MAX_MS`]).
    ///
    /// A device's mutations keep their order after lowering: each is merged
    /// with a stamp later than the device's previous one, so a device whose
    /// clock runs far ahead never has its later write lose to its own
    /// earlier one, and no two of its writes share a stamp.
    ///
    /// The limit never moves back, even when the server's own clock does:
    /// it is at least one past the latest stamp the server has merged, so a
    /// write made after seeing every other write still wins over them.
    fn effective_hlc(&self, previous: Hlc, hlc: Hlc) -> Hlc {
        let capped = match self.now_ms {
            Some(now) => {
                let cap = Hlc::new(now + CLOCK_AHEAD_MAX_MS, u16::MAX)
                    .max(Hlc(self.max_hlc.0.saturating_add(1)));
                hlc.min(cap)
            }
            None => hlc,
        };
        capped.max(Hlc(previous.0.saturating_add(1)))
    }

    pub fn schema(&self) -> &Schema {
        &self.schema
    }

    /// The global sequence number of the newest log entry.
    pub fn head(&self) -> u64 {
        self.head
    }

    /// Log compaction: removes, oldest first and at most `max_entries` of
    /// them, the log entries merged before `before_ms` (the server's wall
    /// clock, in ms, when it committed their batch, as given by
    /// [`ServerCore::set_now_ms`]; entries of a batch merged without a clock
    /// go with the next batch that had one). The store's tables already hold their effect; what
    /// is kept of each is its mutation's digest and position
    /// (`_hearth_compacted`, about 30 bytes), so a device re-sending it is
    /// still answered exactly once (`ServerMsg::Acked`). Entries go as a
    /// prefix of the log: the first batch merged at or after `before_ms`
    /// stops it. A device whose cursor falls below the new floor re-loads
    /// its subscriptions and whole tables from the store (see
    /// `ServerMsg::Welcome::floor`). One transaction.
    pub fn compact(&mut self, before_ms: u64, max_entries: u64) -> Result<Compacted> {
        let floor = log_floor(&self.conn)?;
        // The last batch the server merged before the cutoff (by its own
        // clock, recorded per batch): everything up to it may go.
        let last: Option<i64> = self.conn.query_row(
            "SELECT max(seq) FROM _hearth_log_times WHERE ms < ?1",
            [to_i64(before_ms.min(i64::MAX as u64))],
            |r| r.get(0),
        )?;
        let last = last.map_or(floor, |seq| seq as u64);
        let upto = last.min(floor.saturating_add(max_entries));
        if upto <= floor {
            return Ok(Compacted { entries: 0, floor });
        }
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        let result = compact_upto(&self.conn, upto);
        match result {
            Ok(entries) => {
                self.conn.execute_batch("COMMIT")?;
                Ok(Compacted {
                    entries,
                    floor: upto,
                })
            }
            Err(e) => {
                self.conn.execute_batch("ROLLBACK")?;
                Err(e)
            }
        }
    }

    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    fn last_seq(&mut self, client_id: u64) -> Result<(u64, Hlc)> {
        if let Some(s) = self.last_seqs.get(&client_id) {
            return Ok(*s);
        }
        let found: Option<(i64, i64)> = self
            .conn
            .prepare_cached("SELECT last_seq, last_hlc FROM _hearth_clients WHERE client_id = ?1")?
            .query_row([to_i64(client_id)], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        let s = found.map_or((0, Hlc(0)), |(seq, hlc)| (seq as u64, Hlc(hlc as u64)));
        self.last_seqs.insert(client_id, s);
        Ok(s)
    }

    /// Applies a batch of mutations (from any devices, in arrival order) in
    /// one store transaction, each all or nothing.
    pub fn apply_batch(&mut self, batch: &[(u64, Mutation)]) -> Result<Vec<Outcome>> {
        let saved_head = self.head;
        let saved_max_hlc = self.max_hlc;
        let saved_seqs = self.last_seqs.clone();
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        let result = self.apply_batch_in_transaction(batch).and_then(|outcomes| {
            // When this batch's entries were merged, by the server's clock:
            // what compaction goes by (a device's stamps can be far older).
            if self.head > saved_head {
                if let Some(now) = self.now_ms {
                    self.conn
                        .prepare_cached(
                            "INSERT OR REPLACE INTO _hearth_log_times (seq, ms) VALUES (?1, ?2)",
                        )?
                        .execute(params![to_i64(self.head), to_i64(now)])?;
                }
            }
            Ok(outcomes)
        });
        let committed = match result {
            Ok(outcomes) => self
                .conn
                .execute_batch("COMMIT")
                .map(|()| outcomes)
                .map_err(ServerError::from),
            Err(e) => Err(e),
        };
        self.principals.clear();
        if committed.is_err() {
            let _ = self.conn.execute_batch("ROLLBACK");
            self.text.borrow_mut().clear_cache();
            self.head = saved_head;
            self.max_hlc = saved_max_hlc;
            self.last_seqs = saved_seqs;
        }
        committed
    }

    fn apply_batch_in_transaction(&mut self, batch: &[(u64, Mutation)]) -> Result<Vec<Outcome>> {
        let mut outcomes = Vec::with_capacity(batch.len());
        let mut touched_clients = std::collections::BTreeSet::new();
        for (client_id, mutation) in batch {
            let client_id = *client_id;
            if mutation.seq == 0 || mutation.seq > i64::MAX as u64 {
                outcomes.push(Outcome::Rejected {
                    client_id,
                    client_seq: mutation.seq,
                    code: "INVALID".into(),
                    reason: format!("mutation sequence number {} is out of range", mutation.seq),
                });
                continue;
            }
            let (last_seq, last_hlc) = self.last_seq(client_id)?;
            let digest = mutation.digest();
            if self.rewound.contains(&client_id) {
                outcomes.push(rewound(client_id, mutation.seq));
                continue;
            }
            if mutation.seq <= last_seq {
                let rejection: Option<(String, String, i64)> = self
                    .conn
                    .prepare_cached(
                        "SELECT code, reason, digest FROM _hearth_rejections WHERE client_id = ?1 AND client_seq = ?2",
                    )?
                    .query_row(params![to_i64(client_id), to_i64(mutation.seq)], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                    })
                    .optional()?;
                let mut compacted = None;
                let stored = match &rejection {
                    Some((_, _, d)) => Some(*d),
                    None => match self
                        .conn
                        .prepare_cached(
                            "SELECT digest FROM _hearth_log WHERE client_id = ?1 AND client_seq = ?2",
                        )?
                        .query_row(params![to_i64(client_id), to_i64(mutation.seq)], |r| r.get(0))
                        .optional()?
                    {
                        Some(d) => Some(d),
                        // Its entry was compacted away: the record kept says
                        // what it was and where it went.
                        None => self
                            .conn
                            .prepare_cached(
                                "SELECT digest, seq FROM _hearth_compacted WHERE client_id = ?1 AND client_seq = ?2",
                            )?
                            .query_row(params![to_i64(client_id), to_i64(mutation.seq)], |r| {
                                Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))
                            })
                            .optional()?
                            .map(|(d, seq)| {
                                compacted = Some((seq as u64, d as u64));
                                d
                            }),
                    },
                };
                // Another mutation under a number the server has processed:
                // the device lost the end of its history. Nothing more of
                // this client id is taken; the device starts over under a new
                // one (see `greet`).
                // A number the server has no record of at all, below its last
                // one, was skipped by the device: its history has a gap the
                // server cannot answer from, so it is treated the same way.
                if stored.is_none_or(|d| d != 0 && d != to_i64(digest)) {
                    self.rewound.insert(client_id);
                    outcomes.push(rewound(client_id, mutation.seq));
                    continue;
                }
                outcomes.push(Outcome::Duplicate {
                    client_id,
                    client_seq: mutation.seq,
                    rejection: rejection.map(|(code, reason, _)| (code, reason)),
                    compacted,
                });
                continue;
            }
            self.conn
                .prepare_cached("SAVEPOINT hearth_mutation")?
                .execute([])?;
            let hlc = self.effective_hlc(last_hlc, mutation.hlc);
            let mut merged_hlc = last_hlc;
            let writer = Writer {
                client_id,
                client_seq: mutation.seq,
                // A device cannot have seen past the head.
                base: mutation.base.min(self.head),
                server_seq: self.head + 1,
                also_seen: &mutation.also_seen,
            };
            let before = self.images_before(mutation)?;
            let rules_before = if self.schema.authed() {
                let mut rows_before = Vec::with_capacity(mutation.changes.len());
                for change in &mutation.changes {
                    rows_before.push(match self.schema.table(&change.table) {
                        Some(table) => rows::read_row(&self.conn, table, &change.pk)?,
                        None => None,
                    });
                }
                Some(rows_before)
            } else {
                None
            };
            let merged = self.merge(&writer, hlc, mutation).and_then(|changes| {
                if let Some(rows_before) = &rules_before {
                    self.check_write_rules(client_id, mutation, rows_before)?;
                }
                if !self.validators.is_empty() {
                    self.run_validators(client_id, mutation)?;
                }
                let images = self.images_after(&changes, before)?;
                let whole_bytes: usize = images
                    .iter()
                    .filter_map(|i| i.whole.as_ref())
                    .map(|w| postcard::experimental::serialized_size(w).expect("sizing a row"))
                    .sum();
                let size = postcard::experimental::serialized_size(&(
                    self.head + 1,
                    client_id,
                    mutation.seq,
                    hlc,
                    &changes,
                    digest,
                ))
                .expect("sizing an entry")
                    + whole_bytes;
                if size > self.entry_bytes_max {
                    return Err(refuse(
                        "TOO_LARGE",
                        format!(
                            "merged, this mutation makes a log entry of {size} bytes (a whole set, a conflict's candidates or a revived row travel), over the limit of {} bytes",
                            self.entry_bytes_max
                        ),
                    )
                    .into());
                }
                Ok((changes, images))
            });
            match merged {
                Ok((changes, images)) => {
                    self.conn
                        .prepare_cached("RELEASE hearth_mutation")?
                        .execute([])?;
                    let entry = LogEntry {
                        server_seq: self.head + 1,
                        client_id,
                        client_seq: mutation.seq,
                        hlc,
                        changes,
                        digest,
                        images,
                    };
                    let blob = postcard::to_allocvec(&entry.changes).expect("encode changes");
                    let images = (!entry.images.is_empty())
                        .then(|| postcard::to_allocvec(&entry.images).expect("encode images"));
                    self.conn
                        .prepare_cached(
                            "INSERT INTO _hearth_log (seq, client_id, client_seq, hlc, changes, digest, format, images) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                        )?
                        .execute(params![
                            to_i64(entry.server_seq),
                            to_i64(client_id),
                            to_i64(mutation.seq),
                            to_i64(hlc.0),
                            blob,
                            to_i64(digest),
                            FORMAT,
                            images
                        ])?;
                    self.head = entry.server_seq;
                    merged_hlc = hlc;
                    self.max_hlc = self.max_hlc.max(hlc);
                    outcomes.push(Outcome::Applied(entry));
                }
                Err(refused @ (MergeError::Refused(_) | MergeError::RefusedBy { .. })) => {
                    let (code, reason) = match refused {
                        MergeError::Refused(r) => (r.code.to_string(), r.reason),
                        MergeError::RefusedBy { code, reason } => (code, reason),
                        MergeError::Store(_) => unreachable!("matched above"),
                    };
                    self.conn
                        .execute_batch("ROLLBACK TO hearth_mutation; RELEASE hearth_mutation")?;
                    self.text.borrow_mut().clear_cache();
                    self.conn
                        .prepare_cached(
                            "INSERT OR REPLACE INTO _hearth_rejections (client_id, client_seq, code, reason, digest) VALUES (?1, ?2, ?3, ?4, ?5)",
                        )?
                        .execute(params![to_i64(client_id), to_i64(mutation.seq), code, reason, to_i64(digest)])?;
                    outcomes.push(Outcome::Rejected {
                        client_id,
                        client_seq: mutation.seq,
                        code,
                        reason,
                    });
                }
                Err(MergeError::Store(e)) => return Err(e),
            }
            self.last_seqs.insert(client_id, (mutation.seq, merged_hlc));
            touched_clients.insert(client_id);
        }
        // One bookkeeping write per device per batch, in the same transaction.
        for client_id in touched_clients {
            self.conn
                .prepare_cached(
                    "INSERT INTO _hearth_clients (client_id, last_seq, last_hlc) VALUES (?1, ?2, ?3)
                     ON CONFLICT(client_id) DO UPDATE SET last_seq = excluded.last_seq, last_hlc = excluded.last_hlc",
                )?
                .execute(params![
                    to_i64(client_id),
                    to_i64(self.last_seqs[&client_id].0),
                    to_i64(self.last_seqs[&client_id].1 .0)
                ])?;
        }
        Ok(outcomes)
    }

    /// The rows of streamed tables a mutation names, as stream conditions
    /// read them, before it merges: (table, key) → projected row.
    fn images_before(&self, mutation: &Mutation) -> rusqlite::Result<Vec<Before>> {
        let mut out = Vec::new();
        if self.stream_columns.is_empty() {
            return Ok(out);
        }
        for change in &mutation.changes {
            let (Some(columns), Some(table)) = (
                self.stream_columns.get(&change.table),
                self.schema.table(&change.table),
            ) else {
                continue;
            };
            let row = rows::read_row(&self.conn, table, &change.pk)?;
            out.push((
                change.table.clone(),
                change.pk.clone(),
                row.map(|r| project(r, columns)),
            ));
        }
        Ok(out)
    }

    /// The [`RowImage`]s of a merged mutation's effects on streamed tables.
    fn images_after(
        &self,
        effects: &[RowChange],
        before: Vec<Before>,
    ) -> Result<Vec<RowImage>, MergeError> {
        let mut images = Vec::new();
        if self.stream_columns.is_empty() {
            return Ok(images);
        }
        for (i, change) in effects.iter().enumerate() {
            let (Some(columns), Some(table)) = (
                self.stream_columns.get(&change.table),
                self.schema.table(&change.table),
            ) else {
                continue;
            };
            let was = before
                .iter()
                .find(|(t, pk, _)| *t == change.table && *pk == change.pk)
                .and_then(|(_, _, row)| row.clone());
            let now = rows::read_row(&self.conn, table, &change.pk)?;
            let inserting = matches!(change.op, RowOp::Upsert { insert: true, .. });
            let after = now.as_ref().map(|r| project(r.clone(), columns));
            let whole = match (&now, &was, &after) {
                (Some(row), Some(was), Some(after)) if !inserting && was != after => {
                    Some(self.whole_row(table, &change.pk, row.clone())?)
                }
                _ => None,
            };
            images.push(RowImage {
                change: i as u32,
                before: was,
                after,
                whole,
            });
        }
        Ok(images)
    }

    /// A row as the columns of an inserting upsert: text columns carry
    /// their document's whole state (a device that starts the row from it
    /// shares the document's history, so later edits apply), the others
    /// their value.
    fn whole_row(
        &self,
        table: &Table,
        pk: &Value,
        row: Vec<Value>,
    ) -> Result<Vec<(String, ColumnOp)>, MergeError> {
        whole_row(&self.conn, &mut self.text.borrow_mut(), table, pk, row).map_err(|e| match e {
            TextFailure::Sql(e) => MergeError::Store(ServerError::Sql(e)),
            TextFailure::Text(e) => MergeError::Store(ServerError::Corrupt(format!(
                "text document of a row of '{}': {e}",
                table.name
            ))),
        })
    }

    fn load_meta(&self, table: &Table, pk: &Value) -> Result<Option<RowMeta>, MergeError> {
        let blob: Option<(Vec<u8>, i64)> = self
            .conn
            .prepare_cached("SELECT meta, format FROM _hearth_rows WHERE tbl = ?1 AND pk = ?2")?
            .query_row(params![table.name, pk], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        let corrupt = |e: String| MergeError::Store(ServerError::Corrupt(e));
        match blob {
            Some((b, format)) => decode_meta(&b, format).map(Some).map_err(corrupt),
            // A row written to the table outside Hearth (say with sqlite3)
            // has no bookkeeping yet: it lives, and any stamp beats it.
            None if rows::row_exists(&self.conn, table, pk)? => Ok(Some(RowMeta {
                alive: true,
                ..Default::default()
            })),
            None => Ok(None),
        }
    }

    fn store_meta(&self, table: &Table, pk: &Value, meta: &RowMeta) -> Result<(), MergeError> {
        let blob = postcard::to_allocvec(meta).expect("encode row meta");
        self.conn
            .prepare_cached(
                "INSERT INTO _hearth_rows (tbl, pk, meta, format) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(tbl, pk) DO UPDATE SET meta = excluded.meta, format = excluded.format",
            )?
            .execute(params![table.name, pk, blob, FORMAT])?;
        Ok(())
    }

    /// Merges one mutation written by `w`; returns its effective changes.
    fn merge(
        &self,
        w: &Writer,
        hlc: Hlc,
        mutation: &Mutation,
    ) -> Result<Vec<RowChange>, MergeError> {
        let stamp = Stamp {
            hlc,
            client_id: w.client_id,
        };
        let mut effects = Vec::new();
        let mut plans: Vec<Plan<'_>> = Vec::with_capacity(mutation.changes.len());
        // A device's capture yields one change per row; a mutation naming a
        // row twice is malformed, and merging it would silently drop the
        // second write (it carries the same stamp, which does not win).
        let mut rows_seen: HashSet<(&str, Result<i64, &str>)> = HashSet::new();
        for change in &mutation.changes {
            let table = self.schema.table(&change.table).ok_or_else(|| {
                match self.eras.gone_tables.get(&change.table) {
                    Some(version) => refuse(
                        "TABLE_DROPPED",
                        format!(
                            "table '{}' was dropped in schema version {version}; this write was made under an older schema and is undone",
                            change.table
                        ),
                    ),
                    None => refuse("UNKNOWN_TABLE", format!("unknown table '{}'", change.table)),
                }
            })?;
            // The version the write was made under: as its device says, or
            // for a mutation from before devices said it, the newest one
            // its device can have had (from its base).
            let era = match mutation.schema_version {
                0 => self.eras.version_at(w.base),
                v => Some(v),
            };
            if let Some(version) = self.eras.table_made_again(&change.table, era) {
                return Err(refuse(
                    "TABLE_DROPPED",
                    format!(
                        "table '{}' was dropped and made anew by schema version {version}, after this write was made under an older schema: it is undone",
                        change.table
                    ),
                )
                .into());
            }
            if table.is_conflicts() {
                // A device deletes a conflict's row when it resolves it, to
                // show the resolution at once; whether the conflict closes
                // is the server's call, from the write to the cell.
                if change.op == RowOp::Delete {
                    continue;
                }
                return Err(refuse(
                    "INVALID",
                    format!("{CONFLICTS_TABLE} is written by the server: resolve a conflict by writing its cell"),
                )
                .into());
            }
            check_pk(table, &change.pk)?;
            let row_key = match &change.pk {
                Value::Integer(i) => Ok(*i),
                Value::Text(s) => Err(s.as_str()),
                other => unreachable!("check_pk admits only integer and text keys, not {other:?}"),
            };
            if !rows_seen.insert((table.name.as_str(), row_key)) {
                return Err(refuse(
                    "INVALID",
                    format!(
                        "row {:?} of table '{}' is written twice in one mutation",
                        change.pk, table.name
                    ),
                )
                .into());
            }
            let meta = self.load_meta(table, &change.pk)?;
            let alive = meta.as_ref().is_some_and(|m| m.alive);
            match &change.op {
                RowOp::Upsert { insert, columns } => {
                    let cols = check_columns(table, *insert, columns, |column, exists| {
                        self.eras.discards(&table.name, column, exists, era)
                    })?;
                    if !alive {
                        let dead = meta.unwrap_or_default();
                        let resurrect = !*insert
                            && table.on_delete == OnDelete::UpdateWins
                            && dead.last_values.is_some()
                            && !dead.last_write.seen_by(w);
                        if *insert {
                            if dead.stamp > stamp {
                                continue; // A later delete wins over this insert.
                            }
                            let mut fresh = RowMeta {
                                alive: true,
                                stamp,
                                last_write: Dot::of(w),
                                ..Default::default()
                            };
                            let blank = vec![Value::Null; table.columns.len()];
                            let (values, _) = self.merge_columns(
                                table,
                                &change.pk,
                                &blank,
                                &mut fresh,
                                &cols,
                                w,
                                stamp,
                                true,
                                &mut plans,
                                &mut effects,
                            )?;
                            for i in 0..table.columns.len() {
                                fresh.set_column(i, stamp);
                            }
                            self.store_meta(table, &change.pk, &fresh)?;
                            write_whole_row(table, &change.pk, values, &mut plans, &mut effects);
                        } else if resurrect {
                            // An update that had not seen the delete brings
                            // the row back: its columns over the last values.
                            let mut back = dead;
                            let last = back.last_values.take().expect("checked above");
                            let (changed, _) = self.merge_columns(
                                table,
                                &change.pk,
                                &last,
                                &mut back,
                                &cols,
                                w,
                                stamp,
                                false,
                                &mut plans,
                                &mut effects,
                            )?;
                            let mut row = last;
                            for (i, v) in changed {
                                row[i] = v;
                            }
                            back.alive = true;
                            back.stamp = stamp;
                            back.last_write = Dot::of(w);
                            for i in 0..table.columns.len() {
                                back.set_column(i, stamp);
                            }
                            // Every side starts the row's text documents
                            // anew from the values, as a device does on an
                            // insert it receives.
                            for (i, column) in table.columns.iter().enumerate() {
                                if column.policy == MergePolicy::Text {
                                    let text = match &row[i] {
                                        Value::Text(t) => t.clone(),
                                        _ => String::new(),
                                    };
                                    self.text.borrow_mut().reset(
                                        &self.conn,
                                        Cell {
                                            table: &table.name,
                                            pk: &change.pk,
                                            column: &column.name,
                                        },
                                        &text,
                                        w.client_id,
                                    )?;
                                }
                            }
                            self.store_meta(table, &change.pk, &back)?;
                            let values: Vec<(usize, Value)> = row
                                .into_iter()
                                .enumerate()
                                .filter(|(i, _)| *i != table.pk)
                                .collect();
                            write_whole_row(table, &change.pk, values, &mut plans, &mut effects);
                        } else {
                            continue; // A delete wins over this update.
                        }
                    } else {
                        let mut meta = meta.unwrap_or_default();
                        let current = rows::read_row(&self.conn, table, &change.pk)?
                            .unwrap_or_else(|| vec![Value::Null; table.columns.len()]);
                        if *insert && stamp > meta.stamp {
                            meta.stamp = stamp;
                        }
                        let (changed, column_effects) = self.merge_columns(
                            table,
                            &change.pk,
                            &current,
                            &mut meta,
                            &cols,
                            w,
                            stamp,
                            false,
                            &mut plans,
                            &mut effects,
                        )?;
                        if !changed.is_empty() {
                            meta.last_write = Dot::of(w);
                        }
                        self.store_meta(table, &change.pk, &meta)?;
                        if column_effects.is_empty() {
                            continue;
                        }
                        effects.push(RowChange {
                            table: change.table.clone(),
                            pk: change.pk.clone(),
                            op: RowOp::Upsert {
                                insert: false,
                                columns: column_effects,
                            },
                        });
                        plans.push(Plan {
                            table,
                            pk: change.pk.clone(),
                            op: PlanOp::Update(changed),
                        });
                    }
                }
                RowOp::Evict => {
                    return Err(refuse(
                        "INVALID",
                        format!(
                            "row {:?} of table '{}': Evict is a server's message, not a device's write",
                            change.pk, table.name
                        ),
                    )
                    .into());
                }
                RowOp::Delete => {
                    let mut meta = meta.unwrap_or_default();
                    if alive {
                        if meta.stamp > stamp {
                            continue; // The row was re-created later.
                        }
                        let update_wins = table.on_delete == OnDelete::UpdateWins;
                        if update_wins && !meta.last_write.seen_by(w) {
                            continue; // An update this device had not seen wins.
                        }
                        let last_values = if update_wins {
                            rows::read_row(&self.conn, table, &change.pk)?
                        } else {
                            None
                        };
                        for column in &table.columns {
                            if column.policy == MergePolicy::Text && !update_wins {
                                self.text.borrow().remove(
                                    &self.conn,
                                    Cell {
                                        table: &table.name,
                                        pk: &change.pk,
                                        column: &column.name,
                                    },
                                )?;
                            }
                            if column.policy == MergePolicy::Manual {
                                let id = manual::conflict_id(&table.name, &change.pk, &column.name);
                                if self.read_conflict(&id)?.is_some() {
                                    self.close_conflict(id, &mut plans, &mut effects)?;
                                }
                            }
                        }
                        plans.push(Plan {
                            table,
                            pk: change.pk.clone(),
                            op: PlanOp::Delete,
                        });
                        meta = RowMeta {
                            alive: false,
                            stamp,
                            columns: Vec::new(),
                            last_write: Dot::of(w),
                            last_values,
                            cells: if update_wins {
                                std::mem::take(&mut meta.cells)
                            } else {
                                Vec::new()
                            },
                        };
                        self.store_meta(table, &change.pk, &meta)?;
                        effects.push(change.clone());
                    } else if stamp > meta.stamp {
                        meta.stamp = stamp;
                        self.store_meta(table, &change.pk, &meta)?;
                    }
                }
            }
        }
        // Rows are written only now, all together, so that the order they
        // are listed in cannot make a valid transaction fail (see
        // `rows::write_all`); foreign keys are then checked on the result.
        let writes: Vec<rows::Write<'_>> = plans
            .iter()
            .map(|p| rows::Write {
                table: p.table,
                pk: &p.pk,
                op: match &p.op {
                    PlanOp::Upsert(v) => {
                        rows::WriteOp::Upsert(v.iter().map(|(i, v)| (*i, v)).collect())
                    }
                    PlanOp::Update(v) => {
                        rows::WriteOp::Update(v.iter().map(|(i, v)| (*i, v)).collect())
                    }
                    PlanOp::Delete => rows::WriteOp::Delete,
                },
            })
            .collect();
        let parents_before = self.foreign_keys.read_parents(&self.conn, &writes)?;
        rows::write_all(&self.conn, &writes)?;
        self.foreign_keys
            .check(&self.conn, &self.schema, &writes, &parents_before)
            .map_err(|e| match e {
                fk::CheckError::Violation(why) => refuse("CONSTRAINT", why).into(),
                fk::CheckError::Sql(e) => MergeError::from(e),
            })?;
        Ok(effects)
    }

    /// Merges one row's column operations over its `current` values (a
    /// whole row; `creating` when the row is being made). Returns the column
    /// values to write and the column changes for the log; conflict rows it
    /// opens or closes go to `plans` and `effects`.
    #[allow(clippy::too_many_arguments)]
    fn merge_columns<'t>(
        &'t self,
        table: &'t Table,
        pk: &Value,
        current: &[Value],
        meta: &mut RowMeta,
        cols: &[(usize, &ColumnOp)],
        w: &Writer,
        stamp: Stamp,
        creating: bool,
        plans: &mut Vec<Plan<'t>>,
        effects: &mut Vec<RowChange>,
    ) -> Result<MergedColumns, MergeError> {
        let mut values = Vec::with_capacity(cols.len());
        let mut column_effects = Vec::with_capacity(cols.len());
        for (i, op) in cols {
            let i = *i;
            let column = &table.columns[i];
            let wins = creating || stamp > meta.column(i);
            let cell = Cell {
                table: &table.name,
                pk,
                column: &column.name,
            };
            let (value, effect) = match (column.policy, op) {
                (MergePolicy::Manual, ColumnOp::Set(v)) if !creating => {
                    let state = match meta.cell(i) {
                        Some(CellState::Manual(s)) => s.clone(),
                        _ => ManualState {
                            // A value the server holds without state (from
                            // outside Hearth) counts as seen by everyone.
                            last: Dot::default(),
                            before: Value::Null,
                        },
                    };
                    let mut state = state;
                    let id = manual::conflict_id(&table.name, pk, &column.name);
                    let open = self.read_conflict(&id)?;
                    let was_open = open.is_some();
                    let now = self.now_ms.unwrap_or(stamp.hlc.wall_ms());
                    let decision = manual::merge(
                        &mut state,
                        open,
                        &current[i],
                        meta.column(i),
                        v,
                        stamp,
                        w,
                        now,
                    );
                    meta.set_cell(i, CellState::Manual(state));
                    match decision.conflict {
                        Some(c) => {
                            self.write_conflict(id, table, pk, &column.name, &c, plans, effects)?
                        }
                        None if was_open => self.close_conflict(id, plans, effects)?,
                        None => {}
                    }
                    if !decision.write {
                        continue;
                    }
                    meta.set_column(i, stamp.max(meta.column(i)));
                    ((*v).clone(), ColumnOp::Set((*v).clone()))
                }
                (policy, ColumnOp::Set(v)) => {
                    if !wins {
                        continue;
                    }
                    meta.set_column(i, stamp);
                    match policy {
                        MergePolicy::Counter => counter::check_initial(column, v)?,
                        MergePolicy::Set => {
                            let state = SetState::from_value(&column.name, v, Dot::of(w))
                                .map_err(|why| refuse("INVALID", why))?;
                            let canonical = state.value();
                            meta.set_cell(i, CellState::Set(state));
                            values.push((i, canonical.clone()));
                            column_effects.push((column.name.clone(), ColumnOp::Set(canonical)));
                            continue;
                        }
                        MergePolicy::Text => {
                            let text = match v {
                                Value::Text(t) => t.as_str(),
                                other => {
                                    return Err(refuse(
                                        "INVALID",
                                        format!(
                                            "text column '{}' holds TEXT, not {}",
                                            column.name,
                                            other.type_name()
                                        ),
                                    )
                                    .into())
                                }
                            };
                            self.text
                                .borrow_mut()
                                .reset(&self.conn, cell, text, w.client_id)?;
                        }
                        MergePolicy::Manual => meta.set_cell(
                            i,
                            CellState::Manual(ManualState {
                                last: Dot::of(w),
                                before: Value::Null,
                            }),
                        ),
                        MergePolicy::Lww => {}
                    }
                    ((*v).clone(), ColumnOp::Set((*v).clone()))
                }
                (MergePolicy::Counter, ColumnOp::Add(delta)) => {
                    let total = counter::merge(column, &current[i], *delta)?;
                    meta.set_column(i, stamp.max(meta.column(i)));
                    (Value::Integer(total), ColumnOp::Set(Value::Integer(total)))
                }
                (MergePolicy::Set, ColumnOp::SetOps { add, remove }) => {
                    let mut state = match meta.cell(i) {
                        Some(CellState::Set(s)) => s.clone(),
                        _ => SetState::from_value(&column.name, &current[i], Dot::default())
                            .unwrap_or_default(),
                    };
                    state.merge(&column.name, add, remove, w)?;
                    let value = state.value();
                    meta.set_cell(i, CellState::Set(state));
                    meta.set_column(i, stamp.max(meta.column(i)));
                    if value == current[i] {
                        continue;
                    }
                    (value.clone(), ColumnOp::Set(value))
                }
                (MergePolicy::Text, ColumnOp::Text(update)) => {
                    let now = match &current[i] {
                        Value::Text(t) => t.as_str(),
                        _ => "",
                    };
                    let text = self.text.borrow_mut().apply(&self.conn, cell, update, now).map_err(|e| match e {
                        TextFailure::Sql(e) => MergeError::from(e),
                        TextFailure::Text(TextError::MissingBase) => refuse(
                            "TEXT_BASE",
                            format!(
                                "the edit of text column '{}' builds on an edit the server does not have (one it refused)",
                                column.name
                            ),
                        )
                        .into(),
                        TextFailure::Text(e) => refuse("INVALID", format!("text column '{}': {e}", column.name)).into(),
                    })?;
                    meta.set_column(i, stamp.max(meta.column(i)));
                    (Value::Text(text), ColumnOp::Text(update.clone()))
                }
                (policy, op) => {
                    return Err(refuse(
                        "INVALID",
                        format!(
                            "column '{}' of table '{}' merges as {}: {} does not apply to it{}",
                            column.name,
                            table.name,
                            policy.name(),
                            op_name(op),
                            if matches!(op, ColumnOp::Set(_)) {
                                " in an update"
                            } else {
                                ""
                            }
                        ),
                    )
                    .into())
                }
            };
            values.push((i, value));
            column_effects.push((column.name.clone(), effect));
        }
        Ok((values, column_effects))
    }

    fn read_conflict(&self, id: &str) -> Result<Option<Conflict>, MergeError> {
        let Some(table) = self.schema.table(CONFLICTS_TABLE) else {
            return Ok(None);
        };
        let Some(row) = rows::read_row(&self.conn, table, &Value::Text(id.to_string()))? else {
            return Ok(None);
        };
        let at = |name: &str| &row[table.column_index(name).expect("conflicts column")];
        Ok(Conflict::from_columns(
            at("candidates"),
            at("base_value"),
            at("opened_at"),
        ))
    }

    #[allow(clippy::too_many_arguments)]
    fn write_conflict<'t>(
        &'t self,
        id: String,
        table: &Table,
        pk: &Value,
        column: &str,
        conflict: &Conflict,
        plans: &mut Vec<Plan<'t>>,
        effects: &mut Vec<RowChange>,
    ) -> Result<(), MergeError> {
        let conflicts = self
            .schema
            .table(CONFLICTS_TABLE)
            .expect("a manual column brings the table");
        let [candidates, base_value, opened_at] = conflict.columns();
        let named = [
            ("table_name", Value::Text(table.name.clone())),
            ("row_key", Value::Text(manual::row_key(pk))),
            ("column_name", Value::Text(column.to_string())),
            ("candidates", candidates),
            ("base_value", base_value),
            ("opened_at", opened_at),
        ];
        let values: Vec<(usize, Value)> = named
            .iter()
            .map(|(n, v)| {
                (
                    conflicts.column_index(n).expect("conflicts column"),
                    v.clone(),
                )
            })
            .collect();
        effects.push(RowChange {
            table: CONFLICTS_TABLE.to_string(),
            pk: Value::Text(id.clone()),
            op: RowOp::Upsert {
                insert: true,
                columns: named
                    .into_iter()
                    .map(|(n, v)| (n.to_string(), ColumnOp::Set(v)))
                    .collect(),
            },
        });
        plans.push(Plan {
            table: conflicts,
            pk: Value::Text(id),
            op: PlanOp::Upsert(values),
        });
        Ok(())
    }

    fn close_conflict<'t>(
        &'t self,
        id: String,
        plans: &mut Vec<Plan<'t>>,
        effects: &mut Vec<RowChange>,
    ) -> Result<(), MergeError> {
        let conflicts = self
            .schema
            .table(CONFLICTS_TABLE)
            .expect("a manual column brings the table");
        effects.push(RowChange {
            table: CONFLICTS_TABLE.to_string(),
            pk: Value::Text(id.clone()),
            op: RowOp::Delete,
        });
        plans.push(Plan {
            table: conflicts,
            pk: Value::Text(id),
            op: PlanOp::Delete,
        });
        Ok(())
    }

    /// Reads log entries after `after`, at most `limit` of them.
    pub fn read_log(conn: &Connection, after: u64, limit: usize) -> Result<Vec<LogEntry>> {
        let mut stmt = conn.prepare_cached(
            "SELECT seq, client_id, client_seq, hlc, changes, digest, images FROM _hearth_log WHERE seq > ?1 ORDER BY seq",
        )?;
        // No `LIMIT ?`: SQLite re-prepares a statement whenever a bound
        // LIMIT changes; stopping the scan early costs nothing.
        let mut rows = stmt.query(params![to_i64(after)])?;
        let mut out = Vec::new();
        while out.len() < limit {
            let Some(row) = rows.next()? else { break };
            let blob: Vec<u8> = row.get(4)?;
            let changes = postcard::from_bytes(&blob)
                .map_err(|e| ServerError::Corrupt(format!("log entry: {e}")))?;
            out.push(LogEntry {
                server_seq: row.get::<_, i64>(0)? as u64,
                client_id: row.get::<_, i64>(1)? as u64,
                client_seq: row.get::<_, i64>(2)? as u64,
                hlc: crate::hlc::Hlc(row.get::<_, i64>(3)? as u64),
                changes,
                digest: row.get::<_, i64>(5)? as u64,
                images: match row.get::<_, Option<Vec<u8>>>(6)? {
                    None => Vec::new(),
                    Some(blob) => postcard::from_bytes(&blob)
                        .map_err(|e| ServerError::Corrupt(format!("log entry images: {e}")))?,
                },
            });
        }
        Ok(out)
    }
}

/// A stored row as the columns of an inserting upsert, see
/// [`ServerCore::whole_row`]; `text` reads documents through `conn`.
fn whole_row(
    conn: &Connection,
    text: &mut TextCells,
    table: &Table,
    pk: &Value,
    row: Vec<Value>,
) -> std::result::Result<Vec<(String, ColumnOp)>, TextFailure> {
    let mut columns = Vec::with_capacity(row.len());
    for (i, value) in row.into_iter().enumerate() {
        if i == table.pk {
            continue;
        }
        let column = &table.columns[i];
        let op = if column.policy == MergePolicy::Text {
            let cell = Cell {
                table: &table.name,
                pk,
                column: &column.name,
            };
            match text.get(conn, cell)? {
                Some(doc) => ColumnOp::Text(doc.state()),
                None => ColumnOp::Set(value),
            }
        } else {
            ColumnOp::Set(value)
        };
        columns.push((column.name.clone(), op));
    }
    Ok(columns)
}

/// Plans a row written whole (created, or revived by an update) and logs it
/// as an insert giving every column its value.
fn write_whole_row<'t>(
    table: &'t Table,
    pk: &Value,
    values: Vec<(usize, Value)>,
    plans: &mut Vec<Plan<'t>>,
    effects: &mut Vec<RowChange>,
) {
    effects.push(RowChange {
        table: table.name.clone(),
        pk: pk.clone(),
        op: RowOp::Upsert {
            insert: true,
            columns: values
                .iter()
                .map(|(i, v)| (table.columns[*i].name.clone(), ColumnOp::Set(v.clone())))
                .collect(),
        },
    });
    plans.push(Plan {
        table,
        pk: pk.clone(),
        op: PlanOp::Upsert(values),
    });
}

/// What the schemas a store served (`_hearth_schemas`) say of the writes
/// made under them: a write is read against the version its device had
/// when it made it, known from its `base` (a device takes a new version
/// only at a Welcome whose floor is past every position it had seen, see
/// `prepare_store`).
#[derive(Default)]
struct Eras {
    /// (version, the log position it starts at), oldest first.
    starts: Vec<(u64, u64)>,
    /// Tables an earlier schema had and this one lacks, each with the first
    /// version without it.
    gone_tables: HashMap<String, u64>,
    /// Columns an earlier schema had and this one lacks, as (table, column).
    gone_columns: HashSet<(String, String)>,
    /// Per table of this schema, the first version of the run of versions
    /// up to this one that all have it: a write made under an older version
    /// wrote a table of that name that was dropped since.
    table_since: HashMap<String, u64>,
    /// The same per column of this schema's tables.
    column_since: HashMap<(String, String), u64>,
}

impl Eras {
    fn read(conn: &Connection, schema: &Schema) -> Result<Eras> {
        let history: Vec<(i64, String, i64)> = conn
            .prepare("SELECT version, source, since FROM _hearth_schemas ORDER BY version")?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<Result<_, _>>()?;
        let mut eras = Eras::default();
        // A schema this version of Hearth no longer reads names nothing.
        let parsed: Vec<(u64, Schema)> = history
            .iter()
            .filter_map(|(v, source, since)| {
                eras.starts.push((*v as u64, *since as u64));
                Schema::parse(source).ok().map(|s| (*v as u64, s))
            })
            .collect();
        let mut seen: HashSet<String> = HashSet::new();
        for (version, old) in &parsed {
            for name in &seen {
                if !old.tables.contains_key(name) && !schema.tables.contains_key(name) {
                    eras.gone_tables.entry(name.clone()).or_insert(*version);
                }
            }
            for table in old.tables.values() {
                seen.insert(table.name.clone());
                if let Some(now) = schema.table(&table.name) {
                    for c in &table.columns {
                        if now.column_index(&c.name).is_none() {
                            eras.gone_columns
                                .insert((table.name.clone(), c.name.clone()));
                        }
                    }
                }
            }
        }
        for name in seen {
            if !schema.tables.contains_key(&name) {
                eras.gone_tables.entry(name).or_insert(schema.version);
            }
        }
        // Walking back from this version, where each table and column's
        // unbroken run of versions begins.
        for table in schema.tables.values() {
            let mut since = schema.version;
            let mut columns: HashMap<&str, u64> = table
                .columns
                .iter()
                .map(|c| (c.name.as_str(), schema.version))
                .collect();
            let mut alive: HashSet<&str> = columns.keys().copied().collect();
            for (version, old) in parsed.iter().rev() {
                let Some(then) = old.table(&table.name) else {
                    break;
                };
                since = *version;
                alive.retain(|c| then.column_index(c).is_some());
                for c in &alive {
                    columns.insert(c, *version);
                }
            }
            eras.table_since.insert(table.name.clone(), since);
            for (c, v) in columns {
                eras.column_since
                    .insert((table.name.clone(), c.to_string()), v);
            }
        }
        Ok(eras)
    }

    /// The newest version a device can have had when it wrote with `base`.
    fn version_at(&self, base: u64) -> Option<u64> {
        self.starts
            .iter()
            .rev()
            .find(|(_, start)| *start <= base)
            .map(|(v, _)| *v)
    }

    /// Why a write to `table` (of this schema) made under `version` is
    /// refused: the table of that name was dropped and made again since.
    fn table_made_again(&self, table: &str, version: Option<u64>) -> Option<u64> {
        let since = *self.table_since.get(table)?;
        version.filter(|v| *v < since).map(|_| since)
    }

    /// Whether a write made under `version` gives `column` a value to
    /// discard: a column an earlier schema had, dropped since (and maybe
    /// added again, as another column).
    fn discards(&self, table: &str, column: &str, exists: bool, version: Option<u64>) -> bool {
        let key = (table.to_string(), column.to_string());
        if !exists {
            return self.gone_columns.contains(&key);
        }
        match (self.column_since.get(&key), version) {
            (Some(since), Some(v)) => v < *since,
            _ => false,
        }
    }
}

/// Brings the store to `schema`, inside the caller's transaction: Hearth's
/// own tables (and their upgrades from older stores), then the app's tables
/// (a [`crate::migrate::Plan`]), with the bookkeeping a migration needs.
/// Returns the plan it carried out.
fn prepare_store(conn: &Connection, schema: &Schema) -> Result<crate::migrate::Plan> {
    conn.execute_batch(INTERNAL_TABLES)?;
    // Stores made before devices' stamps were kept in order lack the column.
    let has_last_hlc: bool = conn.query_row(
            "SELECT EXISTS (SELECT 1 FROM pragma_table_info('_hearth_clients') WHERE name = 'last_hlc')",
            [],
            |r| r.get(0),
        )?;
    if !has_last_hlc {
        conn.execute_batch(
            "ALTER TABLE _hearth_clients ADD COLUMN last_hlc INTEGER NOT NULL DEFAULT 0",
        )?;
    }
    // ... and mutation digests (0 for older entries: never compared),
    // and the format their blobs were written in (1 before it was kept).
    for (table, column, default) in [
        ("_hearth_log", "digest", 0),
        ("_hearth_rejections", "digest", 0),
        ("_hearth_log", "format", 1),
        ("_hearth_rows", "format", 1),
    ] {
        let has: bool = conn.query_row(
            "SELECT EXISTS (SELECT 1 FROM pragma_table_info(?1) WHERE name = ?2)",
            [table, column],
            |r| r.get(0),
        )?;
        if !has {
            conn.execute_batch(&format!(
                "ALTER TABLE {table} ADD COLUMN {column} INTEGER NOT NULL DEFAULT {default}"
            ))?;
        }
    }
    let has_images: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM pragma_table_info('_hearth_log') WHERE name = 'images')",
        [],
        |r| r.get(0),
    )?;
    if !has_images {
        conn.execute_batch("ALTER TABLE _hearth_log ADD COLUMN images BLOB")?;
    }
    conn.execute_batch(crate::textcells::TEXT_TABLE)?;
    conn.execute_batch(
        "CREATE INDEX IF NOT EXISTS _hearth_log_by_client ON _hearth_log (client_id, client_seq)",
    )?;
    let stored: Option<String> = conn
        .query_row(
            "SELECT value FROM _hearth_meta WHERE key = 'schema'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    let stored_version: Option<i64> = conn
        .query_row(
            "SELECT value FROM _hearth_meta WHERE key = 'schema_version'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    let stored_version = stored_version.map(|v| v as u64);
    let old = stored.as_deref().and_then(|s| Schema::parse(s).ok());
    if let Some(v) = stored_version.filter(|v| schema.version < *v) {
        return Err(ServerError::Schema(format!(
            "the store is at schema version {v} and this schema is version {}, older: a server does not go back to an \
             older schema (devices that synced version {v} would stop syncing, with SCHEMA_AHEAD). Serve a schema of \
             version {v} or later; to undo a change, make it again as a new version",
            schema.version
        )));
    }
    check_policy_changes(conn, schema)?;
    let plan = crate::migrate::plan(conn, old.as_ref(), schema)
        .map_err(|e| ServerError::Schema(e.to_string()))?;
    if let (Some(v), Some(first)) = (stored_version, plan.steps.first()) {
        if v == schema.version && old.is_some() {
            return Err(ServerError::Schema(format!(
                "the schema changes the tables ({first}{more}) but its version is still {v}: bump `version` so that \
                 devices migrate too",
                more = if plan.steps.len() > 1 { ", ..." } else { "" }
            )));
        }
    }
    // Text documents of dropped cells go with them.
    for table in &plan.dropped_tables {
        conn.execute("DELETE FROM _hearth_text WHERE tbl = ?1", [table])?;
        conn.execute("DELETE FROM _hearth_rows WHERE tbl = ?1", [table])?;
    }
    for (table, column) in &plan.dropped_columns {
        conn.execute(
            "DELETE FROM _hearth_text WHERE tbl = ?1 AND col = ?2",
            [table, column],
        )?;
    }
    crate::migrate::apply(conn, schema, &plan).map_err(|e| ServerError::Schema(e.to_string()))?;
    for table in plan.rebuilt.keys() {
        remap_row_meta(conn, schema, &plan, table)?;
    }
    let bumped = stored_version.is_some_and(|v| v != schema.version);
    if bumped {
        // The log's entries and their row images were written for the old
        // tables: compact all of it, so that no device is sent a change to
        // a column or table that is gone, and move the floor one past the
        // head. Every device re-loads its rows from the migrated tables (as
        // below the floor), and takes the new version with a cursor past
        // every position a device could have had under the old one: the
        // `base` of a mutation tells the versions apart (`Eras`).
        let head: i64 =
            conn.query_row("SELECT coalesce(max(seq), 0) FROM _hearth_log", [], |r| {
                r.get(0)
            })?;
        let head = (head as u64).max(log_floor(conn)?);
        compact_upto(conn, head)?;
        conn.execute(
            "UPDATE _hearth_meta SET value = ?1 WHERE key = 'log_floor'",
            [to_i64(head + 1)],
        )?;
    }
    let triggers: Vec<String> = conn
        .prepare("SELECT name FROM main.sqlite_schema WHERE type = 'trigger'")?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    for name in triggers {
        conn.execute_batch(&format!(
            "DROP TRIGGER main.{}",
            crate::schema::ident(&name)
        ))?;
    }
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS _hearth_schemas (
           version INTEGER PRIMARY KEY,
           source  TEXT NOT NULL,
           since   INTEGER NOT NULL DEFAULT 0
         )",
    )?;
    if let (Some(v), Some(source)) = (stored_version, stored.as_deref()) {
        conn.execute(
            "INSERT OR IGNORE INTO _hearth_schemas (version, source, since) VALUES (?1, ?2, 0)",
            params![to_i64(v), source],
        )?;
    }
    let since = if bumped { log_floor(conn)? } else { 0 };
    conn.execute(
        "INSERT INTO _hearth_schemas (version, source, since) VALUES (?1, ?2, ?3)
         ON CONFLICT(version) DO UPDATE SET source = excluded.source",
        params![to_i64(schema.version), schema.source, to_i64(since)],
    )?;
    conn.execute(
        "INSERT INTO _hearth_meta (key, value) VALUES ('schema', ?1), ('schema_version', ?2)
         ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        params![schema.source, to_i64(schema.version)],
    )?;
    Ok(plan)
}

/// A rebuilt table's row bookkeeping, re-indexed by column name: per-column
/// stamps, an `update-wins` row's last values and `set`/`manual` cell
/// states move with their columns; those of dropped columns go.
fn remap_row_meta(
    conn: &Connection,
    schema: &Schema,
    plan: &crate::migrate::Plan,
    name: &str,
) -> Result<()> {
    let table = schema
        .table(name)
        .expect("a rebuilt table is in the schema");
    let Some(map) = plan.index_map(table, name) else {
        return Ok(());
    };
    let rows: Vec<(Value, Vec<u8>, i64)> = conn
        .prepare("SELECT pk, meta, format FROM _hearth_rows WHERE tbl = ?1")?
        .query_map([name], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<Result<_, _>>()?;
    let mut update =
        conn.prepare("UPDATE _hearth_rows SET meta = ?3, format = ?4 WHERE tbl = ?1 AND pk = ?2")?;
    for (pk, blob, format) in rows {
        let meta = decode_meta(&blob, format).map_err(ServerError::Corrupt)?;
        let mut columns = vec![Stamp::default(); table.columns.len()];
        for (old, stamp) in meta.columns.iter().enumerate() {
            if let Some(Some(new)) = map.get(old) {
                columns[*new] = *stamp;
            }
        }
        let cells = meta
            .cells
            .into_iter()
            .filter_map(|(old, state)| match map.get(old as usize) {
                Some(Some(new)) => Some((*new as u32, state)),
                _ => None,
            })
            .collect();
        let remapped = RowMeta {
            columns,
            last_values: meta
                .last_values
                .and_then(|row| plan.remap_row(Some(table), name, row)),
            cells,
            ..meta
        };
        let blob = postcard::to_allocvec(&remapped).expect("encode row meta");
        update.execute(params![name, pk, blob, FORMAT])?;
    }
    Ok(())
}

/// Decodes a row's bookkeeping written in `format`.
fn decode_meta(blob: &[u8], format: i64) -> std::result::Result<RowMeta, String> {
    match format {
        1 => postcard::from_bytes::<RowMetaV1>(blob)
            .map(|m| RowMeta {
                alive: m.alive,
                stamp: m.stamp,
                columns: m.columns,
                ..Default::default()
            })
            .map_err(|e| format!("row metadata: {e}")),
        FORMAT => postcard::from_bytes(blob).map_err(|e| format!("row metadata: {e}")),
        other => Err(format!(
            "row metadata written in format {other}, newer than this version of Hearth reads ({FORMAT})"
        )),
    }
}

/// Removes the log's entries up to `upto` (their acks stay, see
/// `_hearth_compacted`) and moves the floor there. Inside the caller's
/// transaction. Returns how many entries went.
fn compact_upto(conn: &Connection, upto: u64) -> Result<u64> {
    let gone_hlc: i64 = conn.query_row(
        "SELECT coalesce(max(hlc), 0) FROM _hearth_log WHERE seq <= ?1",
        [to_i64(upto)],
        |r| r.get(0),
    )?;
    conn.execute(
        "INSERT OR IGNORE INTO _hearth_compacted (client_id, client_seq, digest, seq)
         SELECT client_id, client_seq, digest, seq FROM _hearth_log WHERE seq <= ?1",
        [to_i64(upto)],
    )?;
    let n = conn.execute("DELETE FROM _hearth_log WHERE seq <= ?1", [to_i64(upto)])?;
    conn.execute(
        "DELETE FROM _hearth_log_times WHERE seq < ?1",
        [to_i64(upto)],
    )?;
    let floor_hlc = meta_i64(conn, "log_floor_hlc")?.max(gone_hlc);
    let floor = log_floor(conn)?.max(upto);
    conn.execute(
        "INSERT INTO _hearth_meta (key, value) VALUES ('log_floor', ?1), ('log_floor_hlc', ?2)
         ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        params![to_i64(floor), floor_hlc],
    )?;
    Ok(n as u64)
}

/// Refuses a schema that changes the merge policy of a column whose table
/// already holds rows: the stored state of one policy means nothing to
/// another.
fn check_policy_changes(conn: &Connection, schema: &Schema) -> Result<()> {
    let stored: Option<String> = conn
        .query_row(
            "SELECT value FROM _hearth_meta WHERE key = 'schema'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    let Some(old) = stored.and_then(|s| Schema::parse(&s).ok()) else {
        return Ok(());
    };
    for table in schema.tables.values() {
        let Some(before) = old.table(&table.name) else {
            continue;
        };
        for column in &table.columns {
            let Some(was) = before.columns.iter().find(|c| c.name == column.name) else {
                continue;
            };
            if was.policy == column.policy {
                // New or tighter bounds must hold for the stored values, or
                // those rows could never change again.
                if column.policy == MergePolicy::Counter
                    && (was.min, was.max) != (column.min, column.max)
                {
                    let c = crate::schema::ident(&column.name);
                    let outside: i64 = conn.query_row(
                        &format!(
                            "SELECT count(*) FROM main.{} WHERE coalesce({c}, 0) < ?1 OR coalesce({c}, 0) > ?2",
                            crate::schema::ident(&table.name)
                        ),
                        params![column.min.unwrap_or(i64::MIN), column.max.unwrap_or(i64::MAX)],
                        |r| r.get(0),
                    )?;
                    if outside > 0 {
                        return Err(ServerError::Schema(format!(
                            "table '{}', column '{}': the schema changes the counter's bounds to min {} / max {}, but {outside} stored row(s) hold a value outside them; \
                             widen the bounds or change those values first",
                            table.name,
                            column.name,
                            column.min.map_or("none".to_string(), |m| m.to_string()),
                            column.max.map_or("none".to_string(), |m| m.to_string()),
                        )));
                    }
                }
                continue;
            }
            let has_rows: bool = conn
                .query_row(
                    &format!(
                        "SELECT EXISTS (SELECT 1 FROM main.{})",
                        crate::schema::ident(&table.name)
                    ),
                    [],
                    |r| r.get(0),
                )
                .unwrap_or(false);
            if has_rows {
                return Err(ServerError::Schema(format!(
                    "table '{}', column '{}': the schema changes its merge policy from {} to {}, but the store already holds rows of this table, \
                     and writes made under {} (pending on devices) could not be merged under {}. Keep {}; to change it, add a column with the \
                     new policy, copy the values into it from your app, and drop the old column in a later version",
                    table.name, column.name, was.policy.name(), column.policy.name(), was.policy.name(), column.policy.name(), was.policy.name()
                )));
            }
        }
    }
    Ok(())
}

fn op_name(op: &ColumnOp) -> &'static str {
    match op {
        ColumnOp::Set(_) => "a whole value (Set)",
        ColumnOp::Add(_) => "a counter delta (Add)",
        ColumnOp::SetOps { .. } => "set element adds and removes (SetOps)",
        ColumnOp::Text(_) => "a text edit (Text)",
    }
}

/// The columns a change writes, by index: each known, not the primary key,
/// written once, and for a new row given as values (Set).
/// `discard(column, exists)`: whether a value for it was written under a
/// schema that had a column of that name since dropped (the value goes with
/// it, even when a later version added a column of that name again).
fn check_columns<'c>(
    table: &Table,
    insert: bool,
    columns: &'c [(String, ColumnOp)],
    discard: impl Fn(&str, bool) -> bool,
) -> Result<Vec<(usize, &'c ColumnOp)>, Refusal> {
    let mut cols = Vec::with_capacity(columns.len());
    for (name, op) in columns {
        if discard(name, table.column_index(name).is_some()) {
            continue;
        }
        let Some(idx) = table.column_index(name) else {
            return Err(refuse(
                "UNKNOWN_COLUMN",
                format!("unknown column '{name}' in table '{}'", table.name),
            ));
        };
        if idx == table.pk {
            return Err(refuse(
                "INVALID",
                format!("column '{name}' is the primary key: it cannot be set"),
            ));
        }
        if cols.iter().any(|(i, _)| *i == idx) {
            return Err(refuse(
                "INVALID",
                format!("column '{name}' is written twice in one change"),
            ));
        }
        if insert && !matches!(op, ColumnOp::Set(_)) {
            return Err(refuse(
                "INVALID",
                format!(
                    "a new row gives each column a value, but column '{name}' has {}",
                    op_name(op)
                ),
            ));
        }
        cols.push((idx, op));
    }
    Ok(cols)
}

fn check_pk(table: &Table, pk: &Value) -> Result<(), Refusal> {
    let declared = table.columns[table.pk].declared_type.to_ascii_uppercase();
    let ok = match pk {
        Value::Integer(_) => declared.contains("INT"),
        Value::Text(_) => !declared.contains("INT"),
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(refuse(
            "INVALID",
            format!(
                "primary key of table '{}' must be {}, got {pk:?}",
                table.name, table.columns[table.pk].declared_type
            ),
        ))
    }
}

enum MergeError {
    Refused(Refusal),
    /// A validator's refusal (the app's code).
    RefusedBy {
        code: String,
        reason: String,
    },
    Store(ServerError),
}

impl From<Refusal> for MergeError {
    fn from(r: Refusal) -> Self {
        MergeError::Refused(r)
    }
}

impl From<rusqlite::Error> for MergeError {
    fn from(e: rusqlite::Error) -> Self {
        // Constraint failures are the app's data being refused; anything
        // else (I/O, corruption) is the store failing.
        match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::ConstraintViolation)
            | Some(rusqlite::ErrorCode::TypeMismatch) => MergeError::Refused(sql_refusal(e)),
            _ => MergeError::Store(ServerError::Sql(e)),
        }
    }
}

impl ServerCore {
    /// The answer to a device's `Hello` (see [`greet`]), from this core's
    /// committed state.
    pub fn greet(&self, hello: &Hello, frame_bytes_max: usize) -> Result<ServerMsg> {
        greet(
            &self.conn,
            &self.schema,
            self.head,
            self.max_hlc,
            hello,
            frame_bytes_max,
        )
    }

    /// The latest stamp merged so far (what `Welcome.hlc` says).
    pub fn max_hlc(&self) -> Hlc {
        self.max_hlc
    }
}

impl ServerCore {
    /// Like [`ServerCore::read_log`], but also stops once the entries read
    /// hold about `bytes_max` bytes of changes, so a catch-up batch fits in
    /// one frame. Always returns at least one entry when there is one.
    pub fn read_log_bounded(
        conn: &Connection,
        after: u64,
        limit: usize,
        bytes_max: usize,
    ) -> Result<Vec<LogEntry>> {
        let mut stmt = conn.prepare_cached(
            "SELECT seq, length(changes) FROM _hearth_log WHERE seq > ?1 ORDER BY seq",
        )?;
        let mut rows = stmt.query(params![to_i64(after)])?;
        let mut count = 0;
        let mut bytes = 0usize;
        while count < limit {
            let Some(row) = rows.next()? else { break };
            let len: i64 = row.get(1)?;
            if count > 0 && bytes + len as usize > bytes_max {
                break;
            }
            bytes += len as usize;
            count += 1;
        }
        Self::read_log(conn, after, count)
    }
}

/// The code of the fatal error for a device whose schema is newer than the
/// server's: it sends nothing (its writes may name columns this server does
/// not know) and keeps working offline until the server catches up.
pub const SCHEMA_AHEAD: &str = "SCHEMA_AHEAD";

/// What a device whose schema is at version `device` is told by a server at
/// `server`, older.
pub fn schema_ahead_message(device: u64, server: u64) -> String {
    format!(
        "this device's schema is version {device}, newer than the server's version {server}: the device keeps \
         working offline and holds its writes until the server runs schema version {device} or later"
    )
}

/// The parts of a device's `Hello` the server answers.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Hello {
    pub client_id: u64,
    pub cursor: u64,
    pub schema_version: Option<u64>,
    /// What the device last re-loaded for.
    pub reloaded: crate::protocol::Reloaded,
    /// The device's first pending mutation number (0: none).
    pub first_pending: u64,
}

impl Hello {
    /// The fields of a `ClientMsg::Hello`; None for any other message.
    pub fn of(msg: &ClientMsg) -> Option<Hello> {
        match *msg {
            ClientMsg::Hello {
                client_id,
                cursor,
                schema_version,
                reloaded,
                first_pending,
                ..
            } => Some(Hello {
                client_id,
                cursor,
                schema_version,
                reloaded,
                first_pending,
            }),
            _ => None,
        }
    }
}

/// The last mutation sequence number the store processed from a device.
pub fn last_client_seq(conn: &Connection, client_id: u64) -> Result<u64> {
    let s: Option<i64> = conn
        .prepare_cached("SELECT last_seq FROM _hearth_clients WHERE client_id = ?1")?
        .query_row([to_i64(client_id)], |r| r.get(0))
        .optional()?;
    Ok(s.unwrap_or(0) as u64)
}

/// The answer to a device's `Hello` for a server at `head` with `schema`,
/// reading the device's record through `conn`: `Welcome` (with the schema
/// when the device does not have this version, the frame limit, and the last
/// mutation number processed from the device), or the fatal `Error`
/// `HANDSHAKE` for client id 0, which is reserved.
pub fn greet(
    conn: &Connection,
    schema: &Schema,
    head: u64,
    max_hlc: Hlc,
    hello: &Hello,
    frame_bytes_max: usize,
) -> Result<ServerMsg> {
    if hello.client_id == 0 {
        return Ok(ServerMsg::Error {
            code: "HANDSHAKE".into(),
            message: "client id 0 is reserved".into(),
        });
    }
    if let Some(own) = hello.schema_version.filter(|v| *v > schema.version) {
        return Ok(ServerMsg::Error {
            code: SCHEMA_AHEAD.into(),
            message: schema_ahead_message(own, schema.version),
        });
    }
    Ok(ServerMsg::Welcome {
        server_seq: head,
        floor: log_floor(conn)?,
        schema_version: schema.version,
        schema: (hello.schema_version != Some(schema.version)).then(|| schema.source.clone()),
        frame_bytes_max: frame_bytes_max as u64,
        last_seq: last_client_seq(conn, hello.client_id)?,
        hlc: max_hlc,
    })
}

/// For a device that holds pending mutations (`Hello.first_pending`):
/// `Acked` for each of its mutations from that number on whose entry
/// compaction removed (acks it may never have seen), in order, to send
/// right after the `Welcome`. A device that still holds one pending learns
/// its fate before it decides anything from the log (a re-send, or a rewind
/// that would renumber it and apply it twice); one that does not ignores
/// it. Keyed by the pending numbers, not the cursor: a device whose cursor
/// the Welcome moved to the floor and whose connection ended before these
/// acks arrived has its cursor at the floor next time, and still needs
/// them (simulation seed 5014). Empty when nothing is pending. At most
/// 10,000 (the oldest): a device holding more pending writes than that
/// hears of the rest when it sends them again.
pub fn missed_acks(conn: &Connection, hello: &Hello) -> Result<Vec<ServerMsg>> {
    if hello.first_pending == 0 {
        return Ok(Vec::new());
    }
    let mut stmt = conn.prepare_cached(
        "SELECT client_seq, seq, digest FROM _hearth_compacted WHERE client_id = ?1 AND client_seq >= ?2
         ORDER BY client_seq LIMIT 10000",
    )?;
    let acks = stmt
        .query_map(
            params![to_i64(hello.client_id), to_i64(hello.first_pending)],
            |r| {
                Ok(ServerMsg::Acked {
                    client_seq: r.get::<_, i64>(0)? as u64,
                    server_seq: r.get::<_, i64>(1)? as u64,
                    digest: r.get::<_, i64>(2)? as u64,
                })
            },
        )?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(acks)
}

/// The `Error` code a server sends to a device that re-sent a mutation
/// number it has processed with other content: the device lost the end of
/// its history and takes a new client id.
pub const DEVICE_REWOUND: &str = "DEVICE_REWOUND";

/// A chunk of a subscription's initial load to read from the store: the
/// stream's rows with a key after `after`, in key order, at most `rows_max`
/// of them and about `bytes_max` bytes (always at least one row).
#[derive(Clone, Debug, PartialEq)]
pub struct LoadRead {
    pub id: u64,
    pub stream: String,
    pub params: std::collections::BTreeMap<String, crate::filter::Param>,
    pub after: Option<Value>,
    pub rows_max: usize,
    pub bytes_max: usize,
    /// Which of the rows read the device's user may read.
    pub readable: Readable,
}

/// Which rows of a table a user may read, for a chunk of a load.
#[derive(Clone, Debug, PartialEq)]
pub enum Readable {
    All,
    None,
    /// The rows the table's read rule matches with these parameters
    /// (claims and lookup lists).
    Rule(
        crate::filter::Filter,
        std::collections::BTreeMap<String, crate::filter::Param>,
    ),
}

impl Readable {
    fn admits(&self, row: &[Value]) -> bool {
        match self {
            Readable::All => true,
            Readable::None => false,
            Readable::Rule(filter, params) => filter.matches(row, params),
        }
    }
}

/// What a [`LoadRead`] found, as of log sequence `as_of` (read in one
/// transaction with the rows).
#[derive(Clone, Debug, PartialEq)]
pub struct LoadChunk {
    pub id: u64,
    pub as_of: u64,
    /// Inserting upserts with every column (text columns as their
    /// document's state).
    pub rows: Vec<RowChange>,
    /// The key of the last row read.
    pub last: Option<Value>,
    /// No row of the stream comes after `last`.
    pub done: bool,
}

/// Reads one chunk of a subscription's initial load from the store through
/// `conn` (the store's connection, or a reader of it), in one read
/// transaction, so the rows are exactly the state at the log head it reports.
pub fn read_load(conn: &Connection, schema: &Schema, read: &LoadRead) -> Result<LoadChunk> {
    let (table_name, (cond, mut values)) = match crate::protocol::whole_table_of(&read.stream) {
        // A whole table re-loaded after compaction.
        Some(table) => (table, ("1".to_string(), Vec::new())),
        None => {
            let stream = schema
                .streams
                .get(&read.stream)
                .ok_or_else(|| ServerError::Schema(format!("no stream '{}'", read.stream)))?;
            (stream.table.as_str(), stream.filter.to_sql(&read.params))
        }
    };
    let table = schema
        .table(table_name)
        .ok_or_else(|| ServerError::Schema(format!("no table '{table_name}'")))?;
    let pk = crate::schema::ident(table.pk_name());
    let mut sql = format!(
        "SELECT {} FROM main.{} WHERE ({cond})",
        table
            .columns
            .iter()
            .map(|c| crate::schema::ident(&c.name))
            .collect::<Vec<_>>()
            .join(", "),
        crate::schema::ident(&table.name)
    );
    if let Some(after) = &read.after {
        values.push(after.clone());
        sql.push_str(&format!(" AND {pk} > ?{}", values.len()));
    }
    // The limit is inlined: a bound LIMIT makes SQLite re-prepare.
    sql.push_str(&format!(
        " ORDER BY {pk} LIMIT {}",
        read.rows_max.max(1) + 1
    ));
    conn.execute_batch("BEGIN")?;
    let result = (|| -> Result<LoadChunk> {
        let as_of: i64 =
            conn.query_row("SELECT coalesce(max(seq), 0) FROM _hearth_log", [], |r| {
                r.get(0)
            })?;
        let as_of = as_of.max(to_i64(log_floor(conn)?));
        let mut text = TextCells::new(0);
        let mut stmt = conn.prepare_cached(&sql)?;
        let mut rows = stmt.query(rusqlite::params_from_iter(values.iter()))?;
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let mut done = true;
        let width = table.columns.len();
        // Rows read, kept or not (a read rule may keep few): the bound.
        let mut scanned = 0usize;
        let mut last = None;
        while let Some(row) = rows.next()? {
            if scanned >= read.rows_max.max(1) || (!out.is_empty() && bytes >= read.bytes_max) {
                done = false;
                break;
            }
            scanned += 1;
            let values: Vec<Value> = (0..width)
                .map(|i| row.get::<_, Value>(i))
                .collect::<rusqlite::Result<_>>()?;
            let key = values[table.pk].clone();
            last = Some(key.clone());
            if !read.readable.admits(&values) {
                continue;
            }
            let columns = whole_row(conn, &mut text, table, &key, values).map_err(|e| match e {
                TextFailure::Sql(e) => ServerError::Sql(e),
                TextFailure::Text(e) => {
                    ServerError::Corrupt(format!("text document of a row of '{}': {e}", table.name))
                }
            })?;
            let change = RowChange {
                table: table.name.clone(),
                pk: key,
                op: RowOp::Upsert {
                    insert: true,
                    columns,
                },
            };
            bytes += postcard::experimental::serialized_size(&change).expect("sizing a row");
            out.push(change);
        }
        Ok(LoadChunk {
            id: read.id,
            as_of: as_of as u64,
            last,
            rows: out,
            done,
        })
    })();
    conn.execute_batch("COMMIT")?;
    result
}

/// What the read rules' lookups yield for `who` at log position `at`
/// (`at` ≤ the head; read in the caller's read transaction): per (table,
/// lookup index), the matching looked-up rows by key (postcard bytes) →
/// the selected value. Read at the head with SQL, then taken back to `at`
/// through the row images of the log entries after it, newest first (a
/// link must start from what its device could read at its cursor).
pub fn read_grants(
    conn: &Connection,
    schema: &Schema,
    who: &crate::rules::Principal,
    at: u64,
) -> Result<crate::rules::Grants> {
    let mut out = crate::rules::Grants::new();
    let mut any = false;
    for (table, rules) in &schema.rules {
        let Some(rule) = &rules.read else { continue };
        let claims = rule.claim_params(who);
        for (i, lookup) in rule.lookups.iter().enumerate() {
            any = true;
            let looked = schema
                .table(&lookup.table)
                .ok_or_else(|| ServerError::Schema(format!("no table '{}'", lookup.table)))?;
            let (cond, values) = lookup.filter.to_sql(&claims);
            let sql = format!(
                "SELECT {}, {} FROM main.{} WHERE ({cond})",
                crate::schema::ident(looked.pk_name()),
                crate::schema::ident(&looked.columns[lookup.column].name),
                crate::schema::ident(&looked.name)
            );
            let mut stmt = conn.prepare_cached(&sql)?;
            let mut rows = stmt.query(rusqlite::params_from_iter(values.iter()))?;
            let grants = out.entry((table.clone(), i)).or_default();
            while let Some(row) = rows.next()? {
                let pk: Value = row.get(0)?;
                let v: Value = row.get(1)?;
                grants.insert(postcard::to_allocvec(&pk).expect("encode a key"), v);
            }
        }
    }
    if !any {
        return Ok(out);
    }
    // Back from the head to `at`: undo each later change to a looked-up
    // table (the row before it matched or not).
    let mut stmt = conn.prepare_cached(
        "SELECT changes, images FROM _hearth_log WHERE seq > ?1 AND images IS NOT NULL ORDER BY seq DESC",
    )?;
    let mut rows = stmt.query([to_i64(at)])?;
    while let Some(row) = rows.next()? {
        let images: Vec<u8> = row.get(1)?;
        let images: Vec<RowImage> = postcard::from_bytes(&images)
            .map_err(|e| ServerError::Corrupt(format!("log entry images: {e}")))?;
        let changes: Vec<u8> = row.get(0)?;
        let changes: Vec<RowChange> = postcard::from_bytes(&changes)
            .map_err(|e| ServerError::Corrupt(format!("log entry: {e}")))?;
        for image in images.iter().rev() {
            let Some(change) = changes.get(image.change as usize) else {
                continue;
            };
            if !schema.looked_up(&change.table) {
                continue;
            }
            for (table, rules) in &schema.rules {
                let Some(rule) = &rules.read else { continue };
                let claims = rule.claim_params(who);
                for (i, lookup) in rule.lookups.iter().enumerate() {
                    if lookup.table != change.table {
                        continue;
                    }
                    let key = postcard::to_allocvec(&change.pk).expect("encode a key");
                    let grants = out.entry((table.clone(), i)).or_default();
                    match image
                        .before
                        .as_ref()
                        .filter(|r| lookup.filter.matches(r, &claims))
                    {
                        Some(r) => {
                            grants.insert(key, r[lookup.column].clone());
                        }
                        None => {
                            grants.remove(&key);
                        }
                    }
                }
            }
        }
    }
    Ok(out)
}

/// What `who` may read at log position `at` (the lookups of
/// [`read_grants`], as a link's [`crate::link::Access`]), and whether the
/// entry at `at` changed it.
///
/// A link sends a `Reload` right after the entries up to the one that
/// changed what its user may read; a device whose connection ended between
/// the two has its cursor at that entry and never re-loaded, while the
/// access read at its cursor is already the new one. So when the entry at
/// the cursor changed the access (or was compacted away, which leaves it
/// unknown) and the device's Hello says it has not re-loaded at that
/// cursor ([`crate::protocol::Reloaded`]), the link re-loads the device's
/// filtered tables at the Welcome ([`crate::link::Link::set_access`]).
pub fn read_access(
    conn: &Connection,
    schema: &Schema,
    who: std::sync::Arc<crate::rules::Principal>,
    at: u64,
) -> Result<(crate::link::Access, bool)> {
    use crate::link::Access;
    if at == 0 {
        let grants = read_grants(conn, schema, &who, 0)?;
        return Ok((Access::new(schema, who, grants), false));
    }
    match ServerCore::read_log(conn, at - 1, 1)?.pop() {
        Some(entry) if entry.server_seq == at => {
            let grants = read_grants(conn, schema, &who, at - 1)?;
            let mut access = Access::new(schema, who, grants);
            let changed = !entry.images.is_empty() && !access.update(schema, &entry).is_empty();
            Ok((access, changed))
        }
        _ => {
            let grants = read_grants(conn, schema, &who, at)?;
            let compacted = at <= log_floor(conn)?;
            Ok((Access::new(schema, who, grants), compacted))
        }
    }
}

/// A digest of what decides which rows a device holds, besides the data:
/// the schema's version, and under `[auth]` the read rules and the claims
/// of `who` they read. A device whose digest changed since its last
/// connection re-loads its tables ([`crate::link::Link::set_access`]; the
/// link itself without `[auth]`).
pub fn access_digest(schema: &Schema, who: Option<&crate::rules::Principal>) -> u64 {
    // FNV-1a over the rules' text and the claims' encodings: stable across
    // builds, which is all it needs to be.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0100_0000_01b3);
    };
    eat(&schema.version.to_le_bytes());
    let Some(who) = who else {
        return h;
    };
    for (table, rules) in &schema.rules {
        if let Some(rule) = &rules.read {
            eat(table.as_bytes());
            eat(rule.source.as_bytes());
            for claim in &rule.claims {
                eat(claim.as_bytes());
                eat(&postcard::to_allocvec(&who.claim(claim)).expect("encode a claim"));
            }
        }
    }
    h
}
