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

use crate::change::{ColumnOp, LogEntry, Mutation, RowChange, RowOp};
use crate::fk;
use crate::hlc::{Hlc, Stamp};
use crate::protocol::{ClientMsg, ServerMsg};
use crate::rows;
use crate::schema::{Schema, Table};
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
    /// Sent before and already processed; `rejection` tells how if refused.
    Duplicate {
        client_id: u64,
        client_seq: u64,
        rejection: Option<(String, String)>,
    },
}

impl Outcome {
    /// What the device that sent a refused mutation is told (also when it
    /// sends it again): `Rejected` with the code and reason, or the fatal
    /// `Error` `DEVICE_REWOUND`. None for an applied mutation, whose log
    /// entry reaches every device instead.
    pub fn refusal(&self) -> Option<crate::protocol::ServerMsg> {
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
  digest     INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS _hearth_rows (
  tbl  TEXT NOT NULL,
  pk   NOT NULL,
  meta BLOB NOT NULL,
  PRIMARY KEY (tbl, pk)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS _hearth_clients (
  client_id INTEGER PRIMARY KEY,
  last_seq  INTEGER NOT NULL,
  last_hlc  INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS _hearth_rejections (
  client_id  INTEGER NOT NULL,
  client_seq INTEGER NOT NULL,
  code       TEXT NOT NULL,
  reason     TEXT NOT NULL,
  digest     INTEGER NOT NULL DEFAULT 0,
  PRIMARY KEY (client_id, client_seq)
) WITHOUT ROWID;
";

/// Per-row merge bookkeeping.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct RowMeta {
    alive: bool,
    /// The stamp that created the row (alive) or deleted it (not alive).
    stamp: Stamp,
    /// Last-writer stamp per column index; missing entries are zero.
    columns: Vec<Stamp>,
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
}

struct Refusal {
    code: &'static str,
    reason: String,
}

fn refuse(code: &'static str, reason: impl Into<String>) -> Refusal {
    Refusal {
        code,
        reason: reason.into(),
    }
}

impl From<rusqlite::Error> for Refusal {
    fn from(e: rusqlite::Error) -> Self {
        let code = match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::ConstraintViolation) => "CONSTRAINT",
            _ => "INVALID",
        };
        Refusal {
            code,
            reason: e.to_string(),
        }
    }
}

/// Stores a u64 from the wire (client ids are random 64-bit numbers) in an
/// SQLite integer, bit for bit; `as u64` on the way back restores it.
fn to_i64(v: u64) -> i64 {
    v as i64
}

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
        // ... and mutation digests (0 for older entries: never compared).
        for table in ["_hearth_log", "_hearth_rejections"] {
            let has_digest: bool = conn.query_row(
                "SELECT EXISTS (SELECT 1 FROM pragma_table_info(?1) WHERE name = 'digest')",
                [table],
                |r| r.get(0),
            )?;
            if !has_digest {
                conn.execute_batch(&format!(
                    "ALTER TABLE {table} ADD COLUMN digest INTEGER NOT NULL DEFAULT 0"
                ))?;
            }
        }
        conn.execute_batch(
            "CREATE INDEX IF NOT EXISTS _hearth_log_by_client ON _hearth_log (client_id, client_seq)",
        )?;
        conn.execute_batch("BEGIN")?;
        let prepared = (|| -> Result<()> {
            rows::ensure_tables(&conn, &schema).map_err(ServerError::Schema)?;
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
            conn.execute(
                "INSERT INTO _hearth_meta (key, value) VALUES ('schema', ?1), ('schema_version', ?2)
                 ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                params![schema.source, to_i64(schema.version)],
            )?;
            Ok(())
        })();
        match prepared {
            Ok(()) => conn.execute_batch("COMMIT")?,
            Err(e) => {
                conn.execute_batch("ROLLBACK")?;
                return Err(e);
            }
        }
        let head: i64 =
            conn.query_row("SELECT coalesce(max(seq), 0) FROM _hearth_log", [], |r| {
                r.get(0)
            })?;
        let foreign_keys = fk::ForeignKeys::load(&conn, &schema)?;
        let max_hlc: i64 =
            conn.query_row("SELECT coalesce(max(hlc), 0) FROM _hearth_log", [], |r| {
                r.get(0)
            })?;
        Ok(ServerCore {
            now_ms: None,
            max_hlc: Hlc(max_hlc as u64),
            conn,
            schema,
            head: head as u64,
            last_seqs: HashMap::new(),
            foreign_keys,
            rewound: HashSet::new(),
        })
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
        let result = self.apply_batch_in_transaction(batch);
        let committed = match result {
            Ok(outcomes) => self
                .conn
                .execute_batch("COMMIT")
                .map(|()| outcomes)
                .map_err(ServerError::from),
            Err(e) => Err(e),
        };
        if committed.is_err() {
            let _ = self.conn.execute_batch("ROLLBACK");
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
                let stored = match &rejection {
                    Some((_, _, d)) => Some(*d),
                    None => self
                        .conn
                        .prepare_cached(
                            "SELECT digest FROM _hearth_log WHERE client_id = ?1 AND client_seq = ?2",
                        )?
                        .query_row(params![to_i64(client_id), to_i64(mutation.seq)], |r| r.get(0))
                        .optional()?,
                };
                // Another mutation under a number the server has processed:
                // the device lost the end of its history. Nothing more of
                // this client id is taken; the device starts over under a new
                // one (see `greet`).
                if stored.is_some_and(|d| d != 0 && d != to_i64(digest)) {
                    self.rewound.insert(client_id);
                    outcomes.push(rewound(client_id, mutation.seq));
                    continue;
                }
                outcomes.push(Outcome::Duplicate {
                    client_id,
                    client_seq: mutation.seq,
                    rejection: rejection.map(|(code, reason, _)| (code, reason)),
                });
                continue;
            }
            self.conn
                .prepare_cached("SAVEPOINT hearth_mutation")?
                .execute([])?;
            let hlc = self.effective_hlc(last_hlc, mutation.hlc);
            let mut merged_hlc = last_hlc;
            match self.merge(client_id, hlc, mutation) {
                Ok(changes) => {
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
                    };
                    let blob = postcard::to_allocvec(&entry.changes).expect("encode changes");
                    self.conn
                        .prepare_cached(
                            "INSERT INTO _hearth_log (seq, client_id, client_seq, hlc, changes, digest) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                        )?
                        .execute(params![
                            to_i64(entry.server_seq),
                            to_i64(client_id),
                            to_i64(mutation.seq),
                            to_i64(hlc.0),
                            blob,
                            to_i64(digest)
                        ])?;
                    self.head = entry.server_seq;
                    merged_hlc = hlc;
                    self.max_hlc = self.max_hlc.max(hlc);
                    outcomes.push(Outcome::Applied(entry));
                }
                Err(MergeError::Refused(refusal)) => {
                    self.conn
                        .execute_batch("ROLLBACK TO hearth_mutation; RELEASE hearth_mutation")?;
                    self.conn
                        .prepare_cached(
                            "INSERT OR REPLACE INTO _hearth_rejections (client_id, client_seq, code, reason, digest) VALUES (?1, ?2, ?3, ?4, ?5)",
                        )?
                        .execute(params![to_i64(client_id), to_i64(mutation.seq), refusal.code, refusal.reason, to_i64(digest)])?;
                    outcomes.push(Outcome::Rejected {
                        client_id,
                        client_seq: mutation.seq,
                        code: refusal.code.to_string(),
                        reason: refusal.reason,
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

    fn load_meta(&self, table: &Table, pk: &Value) -> Result<Option<RowMeta>, MergeError> {
        let blob: Option<Vec<u8>> = self
            .conn
            .prepare_cached("SELECT meta FROM _hearth_rows WHERE tbl = ?1 AND pk = ?2")?
            .query_row(params![table.name, pk], |r| r.get(0))
            .optional()?;
        match blob {
            Some(b) => postcard::from_bytes(&b)
                .map(Some)
                .map_err(|e| MergeError::Store(ServerError::Corrupt(format!("row metadata: {e}")))),
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
                "INSERT INTO _hearth_rows (tbl, pk, meta) VALUES (?1, ?2, ?3)
                 ON CONFLICT(tbl, pk) DO UPDATE SET meta = excluded.meta",
            )?
            .execute(params![table.name, pk, blob])?;
        Ok(())
    }

    /// Merges one mutation; returns its effective changes.
    fn merge(
        &self,
        client_id: u64,
        hlc: Hlc,
        mutation: &Mutation,
    ) -> Result<Vec<RowChange>, MergeError> {
        let stamp = Stamp { hlc, client_id };
        let mut effects = Vec::new();
        let mut writes: Vec<rows::Write<'_>> = Vec::with_capacity(mutation.changes.len());
        // A device's capture yields one change per row; a mutation naming a
        // row twice is malformed, and merging it would silently drop the
        // second write (it carries the same stamp, which does not win).
        let mut rows_seen: HashSet<(&str, Result<i64, &str>)> = HashSet::new();
        for change in &mutation.changes {
            let table = self.schema.table(&change.table).ok_or_else(|| {
                refuse("UNKNOWN_TABLE", format!("unknown table '{}'", change.table))
            })?;
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
                    let mut cols = Vec::with_capacity(columns.len());
                    for (name, op) in columns {
                        let idx = table.column_index(name).ok_or_else(|| {
                            refuse(
                                "UNKNOWN_COLUMN",
                                format!("unknown column '{name}' in table '{}'", table.name),
                            )
                        })?;
                        if idx == table.pk {
                            return Err(refuse(
                                "INVALID",
                                format!("column '{name}' is the primary key: it cannot be set"),
                            )
                            .into());
                        }
                        if cols.iter().any(|(i, _, _)| *i == idx) {
                            return Err(refuse(
                                "INVALID",
                                format!("column '{name}' is written twice in one change"),
                            )
                            .into());
                        }
                        let ColumnOp::Set(v) = op;
                        cols.push((idx, name, v));
                    }
                    if !alive {
                        let deleted_later = meta.as_ref().is_some_and(|m| m.stamp > stamp);
                        if !*insert || deleted_later {
                            continue; // A delete wins over this write.
                        }
                        let values: Vec<(usize, &Value)> =
                            cols.iter().map(|(i, _, v)| (*i, *v)).collect();
                        writes.push(rows::Write {
                            table,
                            pk: &change.pk,
                            op: rows::WriteOp::Upsert(values),
                        });
                        let mut fresh = RowMeta {
                            alive: true,
                            stamp,
                            columns: Vec::new(),
                        };
                        for i in 0..table.columns.len() {
                            fresh.set_column(i, stamp);
                        }
                        self.store_meta(table, &change.pk, &fresh)?;
                        effects.push(change.clone());
                    } else {
                        let mut meta = meta.unwrap_or_default();
                        let winners: Vec<(usize, &String, &Value)> = cols
                            .into_iter()
                            .filter(|(i, _, _)| stamp > meta.column(*i))
                            .collect();
                        if *insert && stamp > meta.stamp {
                            meta.stamp = stamp;
                        }
                        if winners.is_empty() {
                            self.store_meta(table, &change.pk, &meta)?;
                            continue;
                        }
                        let values: Vec<(usize, &Value)> =
                            winners.iter().map(|(i, _, v)| (*i, *v)).collect();
                        writes.push(rows::Write {
                            table,
                            pk: &change.pk,
                            op: rows::WriteOp::Update(values),
                        });
                        for (i, _, _) in &winners {
                            meta.set_column(*i, stamp);
                        }
                        self.store_meta(table, &change.pk, &meta)?;
                        effects.push(RowChange {
                            table: change.table.clone(),
                            pk: change.pk.clone(),
                            op: RowOp::Upsert {
                                insert: false,
                                columns: winners
                                    .into_iter()
                                    .map(|(_, n, v)| (n.clone(), ColumnOp::Set(v.clone())))
                                    .collect(),
                            },
                        });
                    }
                }
                RowOp::Delete => {
                    let mut meta = meta.unwrap_or_default();
                    if alive {
                        if meta.stamp > stamp {
                            continue; // The row was re-created later.
                        }
                        writes.push(rows::Write {
                            table,
                            pk: &change.pk,
                            op: rows::WriteOp::Delete,
                        });
                        meta = RowMeta {
                            alive: false,
                            stamp,
                            columns: Vec::new(),
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

    /// Reads log entries after `after`, at most `limit` of them.
    pub fn read_log(conn: &Connection, after: u64, limit: usize) -> Result<Vec<LogEntry>> {
        let mut stmt = conn.prepare_cached(
            "SELECT seq, client_id, client_seq, hlc, changes, digest FROM _hearth_log WHERE seq > ?1 ORDER BY seq LIMIT ?2",
        )?;
        let mut rows = stmt.query(params![to_i64(after), limit as i64])?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
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
            });
        }
        Ok(out)
    }
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
            | Some(rusqlite::ErrorCode::TypeMismatch) => MergeError::Refused(Refusal::from(e)),
            _ => MergeError::Store(ServerError::Sql(e)),
        }
    }
}

impl ServerCore {
    /// The answer to a device's `Hello` (see [`greet`]), from this core's
    /// committed state.
    pub fn greet(&self, hello: &Hello, frame_bytes_max: usize) -> Result<ServerMsg> {
        greet(&self.conn, &self.schema, self.head, hello, frame_bytes_max)
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
            "SELECT seq, length(changes) FROM _hearth_log WHERE seq > ?1 ORDER BY seq LIMIT ?2",
        )?;
        let mut rows = stmt.query(params![to_i64(after), limit as i64])?;
        let mut count = 0;
        let mut bytes = 0usize;
        while let Some(row) = rows.next()? {
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

/// The parts of a device's `Hello` the server answers.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Hello {
    pub client_id: u64,
    pub cursor: u64,
    pub schema_version: Option<u64>,
}

impl Hello {
    /// The fields of a `ClientMsg::Hello`; None for any other message.
    pub fn of(msg: &ClientMsg) -> Option<Hello> {
        match *msg {
            ClientMsg::Hello {
                client_id,
                cursor,
                schema_version,
            } => Some(Hello {
                client_id,
                cursor,
                schema_version,
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
    hello: &Hello,
    frame_bytes_max: usize,
) -> Result<ServerMsg> {
    if hello.client_id == 0 {
        return Ok(ServerMsg::Error {
            code: "HANDSHAKE".into(),
            message: "client id 0 is reserved".into(),
        });
    }
    Ok(ServerMsg::Welcome {
        server_seq: head,
        schema_version: schema.version,
        schema: (hello.schema_version != Some(schema.version)).then(|| schema.source.clone()),
        frame_bytes_max: frame_bytes_max as u64,
        last_seq: last_client_seq(conn, hello.client_id)?,
    })
}

/// The `Error` code a server sends to a device that re-sent a mutation
/// number it has processed with other content: the device lost the end of
/// its history and takes a new client id.
pub const DEVICE_REWOUND: &str = "DEVICE_REWOUND";
