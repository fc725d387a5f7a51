//! Server rules written in Rust: validators the server runs on every
//! mutation, inside the merge transaction, after the mutation merged and
//! passed the schema's write rules.
//!
//! A validator is a function `(&Context, &MutationView) -> Result<(), Refuse>`.
//! It reads the store through [`Context`] (read-only SQL that sees the
//! mutation's own effects) and refuses with [`Refuse::new`]`(code, reason)`:
//! the mutation's savepoint rolls back and its device gets `Rejected` with
//! that code and reason, like any refusal, and undoes it. The other
//! mutations of the batch are unaffected.
//!
//! Codes are the app's, and stable: 1 to [`CODE_BYTES_MAX`] characters of
//! `A-Z`, `0-9` and `_` ([`valid_code`]), except the reserved
//! [`VALIDATOR_FAILED`] and `DEVICE_REWOUND`. A reason is cut to
//! [`REASON_BYTES_MAX`] bytes (at a character boundary).
//!
//! A validator that returns an error (any `std::error::Error` through `?`,
//! or [`Refuse::failed`]), panics, or gives an invalid code refuses the
//! mutation with [`VALIDATOR_FAILED`] and a fixed reason; the detail goes to
//! the server's operator ([`ServerCore::take_validator_failures`]), not to the
//! device. Nothing else is lost and the store keeps running.
//!
//! [`ServerCore::take_validator_failures`]: crate::ServerCore::take_validator_failures

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use rusqlite::Connection;

use crate::change::{ColumnOp, RowChange, RowOp};
use crate::rules::Principal;
use crate::value::Value;

/// The code of a mutation refused because a validator failed (returned an
/// error, panicked, or gave an invalid code).
pub const VALIDATOR_FAILED: &str = "VALIDATOR_FAILED";
/// The longest refusal code a validator may give, in bytes.
pub const CODE_BYTES_MAX: usize = 32;
/// A validator's reason is cut to this many bytes.
pub const REASON_BYTES_MAX: usize = 1024;
/// The most rows one [`Context::query`] returns; more is an error (count
/// or aggregate in SQL instead).
pub const QUERY_ROWS_MAX: usize = 10_000;

/// Codes a validator may not give: they mean something else to a device.
const RESERVED_CODES: [&str; 2] = [VALIDATOR_FAILED, crate::server::DEVICE_REWOUND];

/// A validator as the server keeps it.
pub type Validator =
    Arc<dyn Fn(&Context<'_>, &MutationView<'_>) -> Result<(), Refuse> + Send + Sync>;

/// Whether `code` is a refusal code a validator may give: 1 to
/// [`CODE_BYTES_MAX`] of `A-Z0-9_`, and not reserved.
pub fn valid_code(code: &str) -> bool {
    (1..=CODE_BYTES_MAX).contains(&code.len())
        && code
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
        && !RESERVED_CODES.contains(&code)
}

/// A validator's refusal of a mutation: the app's own (a code and a reason
/// for the device), or a failure of the validator itself.
#[derive(Debug, Clone, PartialEq)]
pub struct Refuse(RefuseKind);

#[derive(Debug, Clone, PartialEq)]
enum RefuseKind {
    App { code: String, reason: String },
    Failed(String),
}

impl Refuse {
    /// Refuses the mutation with the app's `code` (see [`valid_code`]; an
    /// invalid one refuses with [`VALIDATOR_FAILED`] instead) and `reason`,
    /// a sentence for the device's user, cut to [`REASON_BYTES_MAX`] bytes.
    pub fn new(code: impl Into<String>, reason: impl Into<String>) -> Refuse {
        Refuse(RefuseKind::App {
            code: code.into(),
            reason: reason.into(),
        })
    }

    /// The validator could not decide: the mutation is refused
    /// [`VALIDATOR_FAILED`]; `detail` goes to the operator only.
    pub fn failed(detail: impl Into<String>) -> Refuse {
        Refuse(RefuseKind::Failed(detail.into()))
    }
}

/// Any error a validator meets (through `?`) refuses the mutation with
/// [`VALIDATOR_FAILED`]; its text goes to the operator only.
impl<E: std::error::Error + Send + Sync + 'static> From<E> for Refuse {
    fn from(e: E) -> Refuse {
        Refuse::failed(e.to_string())
    }
}

/// An error from a [`Context`] query.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("validator query: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("validator query `{0}` may only read (SELECT, WITH or VALUES)")]
    NotReadOnly(String),
    #[error("validator query returned more than {QUERY_ROWS_MAX} rows: count or aggregate in SQL")]
    TooManyRows,
    #[error("validator query returned no row")]
    NoRow,
    #[error("validator query's first value is {0}, not an integer")]
    NotInteger(String),
}

/// What a validator may know and read while it decides on one mutation.
pub struct Context<'a> {
    conn: &'a Connection,
    client_id: u64,
    principal: Option<&'a Principal>,
}

impl<'a> Context<'a> {
    /// The device's client id.
    pub fn client_id(&self) -> u64 {
        self.client_id
    }

    /// Who the device acts for, when the schema has `[auth]` (the token's
    /// `sub` and claims); None otherwise.
    pub fn principal(&self) -> Option<&'a Principal> {
        self.principal
    }

    /// The user (`sub`), under `[auth]`.
    pub fn user(&self) -> Option<&'a str> {
        self.principal.map(|p| p.sub.as_str())
    }

    /// Runs a read-only statement (`SELECT`, `WITH` or `VALUES`) with
    /// positional parameters (`?1`...) in the merge transaction: it sees
    /// the store with this mutation merged (and the batch's earlier
    /// mutations). Returns every row as values in column order, at most
    /// [`QUERY_ROWS_MAX`].
    pub fn query(&self, sql: &str, params: &[Value]) -> Result<Vec<Vec<Value>>, QueryError> {
        let mut stmt = self.prepare(sql)?;
        let width = stmt.column_count();
        let mut rows = stmt.query(rusqlite::params_from_iter(params.iter()))?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            if out.len() == QUERY_ROWS_MAX {
                return Err(QueryError::TooManyRows);
            }
            out.push(
                (0..width)
                    .map(|i| row.get::<_, Value>(i))
                    .collect::<rusqlite::Result<Vec<Value>>>()?,
            );
        }
        Ok(out)
    }

    /// The first row of a read-only statement, if any (see [`Context::query`]).
    pub fn query_row(&self, sql: &str, params: &[Value]) -> Result<Option<Vec<Value>>, QueryError> {
        let mut stmt = self.prepare(sql)?;
        let width = stmt.column_count();
        let mut rows = stmt.query(rusqlite::params_from_iter(params.iter()))?;
        match rows.next()? {
            Some(row) => Ok(Some(
                (0..width)
                    .map(|i| row.get::<_, Value>(i))
                    .collect::<rusqlite::Result<Vec<Value>>>()?,
            )),
            None => Ok(None),
        }
    }

    /// The first column of the first row as an integer, as from
    /// `SELECT count(*) ...`; an error when there is no row or the value is
    /// not an integer.
    pub fn query_i64(&self, sql: &str, params: &[Value]) -> Result<i64, QueryError> {
        match self
            .query_row(sql, params)?
            .and_then(|r| r.into_iter().next())
        {
            Some(Value::Integer(n)) => Ok(n),
            Some(other) => Err(QueryError::NotInteger(format!("{other:?}"))),
            None => Err(QueryError::NoRow),
        }
    }

    fn prepare(&self, sql: &str) -> Result<rusqlite::CachedStatement<'a>, QueryError> {
        // A validator must not end the merge transaction or write behind
        // the log's back: only queries, and only ones SQLite calls read-only
        // (transaction control is "read-only" to SQLite, hence the keyword).
        let head = sql.trim_start().get(..6).unwrap_or("").to_ascii_uppercase();
        let reads =
            head.starts_with("SELECT") || head.starts_with("WITH") || head.starts_with("VALUES");
        let stmt = self.conn.prepare_cached(sql)?;
        if !reads || !stmt.readonly() {
            return Err(QueryError::NotReadOnly(sql.chars().take(80).collect()));
        }
        Ok(stmt)
    }
}

/// What a row change does, as the device sent it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// The device created the row (every column is present).
    Insert,
    /// The device changed some columns of the row.
    Update,
    /// The device deleted the row.
    Delete,
}

/// One row change of a mutation, as the device sent it (the merge may have
/// kept only part of it: read the store through [`Context`] for the result).
#[derive(Clone, Copy, Debug)]
pub struct Change<'a> {
    change: &'a RowChange,
}

impl<'a> Change<'a> {
    /// The table's name.
    pub fn table(&self) -> &'a str {
        &self.change.table
    }

    /// The row's primary key.
    pub fn key(&self) -> &'a Value {
        &self.change.pk
    }

    pub fn op(&self) -> Op {
        match &self.change.op {
            RowOp::Upsert { insert: true, .. } => Op::Insert,
            RowOp::Upsert { insert: false, .. } => Op::Update,
            // The merge refuses an Evict from a device before validators run.
            RowOp::Delete | RowOp::Evict => Op::Delete,
        }
    }

    /// The columns the device wrote, with their operations (a value for
    /// `lww` and `manual` columns and inserts, a delta for a counter, ...).
    /// Empty for a delete.
    pub fn columns(&self) -> &'a [(String, ColumnOp)] {
        match &self.change.op {
            RowOp::Upsert { columns, .. } => columns,
            RowOp::Delete | RowOp::Evict => &[],
        }
    }

    /// The value the device set `column` to, when it set one (`lww` and
    /// `manual` columns, and every column of an insert).
    pub fn value(&self, column: &str) -> Option<&'a Value> {
        self.columns().iter().find_map(|(name, op)| match op {
            ColumnOp::Set(v) if name == column => Some(v),
            _ => None,
        })
    }
}

/// The mutation a validator decides on.
#[derive(Clone, Copy, Debug)]
pub struct MutationView<'a> {
    seq: u64,
    changes: &'a [RowChange],
}

impl<'a> MutationView<'a> {
    /// The device's sequence number for this mutation.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Every row change, in the device's order.
    pub fn changes(&self) -> impl Iterator<Item = Change<'a>> + 'a {
        self.changes.iter().map(|change| Change { change })
    }

    /// The row changes to one table.
    pub fn changes_to(&self, table: &'a str) -> impl Iterator<Item = Change<'a>> + 'a {
        self.changes().filter(move |c| c.table() == table)
    }
}

/// A validator failure, for the server's operator.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidatorFailure {
    pub client_id: u64,
    pub client_seq: u64,
    /// What went wrong: the error's text, the panic's message, or the
    /// invalid code.
    pub detail: String,
}

/// What the validators decided: None to let the mutation through, else
/// (code, reason, detail for the operator when a validator failed).
pub(crate) fn run(
    validators: &[Validator],
    conn: &Connection,
    client_id: u64,
    principal: Option<&Principal>,
    seq: u64,
    changes: &[RowChange],
) -> Option<(String, String, Option<String>)> {
    let ctx = Context {
        conn,
        client_id,
        principal,
    };
    let view = MutationView { seq, changes };
    let failed = |detail: String| {
        Some((
            VALIDATOR_FAILED.to_string(),
            "the server's rules could not check this change (a validator failed); it was not applied".to_string(),
            Some(detail),
        ))
    };
    for (i, validator) in validators.iter().enumerate() {
        match catch_unwind(AssertUnwindSafe(|| validator(&ctx, &view))) {
            Ok(Ok(())) => {}
            Ok(Err(Refuse(RefuseKind::App { code, reason }))) => {
                if !valid_code(&code) {
                    return failed(format!(
                        "validator {i} refused with the invalid code {:?} (codes are 1 to {CODE_BYTES_MAX} of A-Z, 0-9 and _, not {})",
                        code.chars().take(CODE_BYTES_MAX * 2).collect::<String>(),
                        RESERVED_CODES.join(" or ")
                    ));
                }
                return Some((code, cut(reason, REASON_BYTES_MAX), None));
            }
            Ok(Err(Refuse(RefuseKind::Failed(detail)))) => {
                return failed(format!("validator {i} failed: {detail}"));
            }
            Err(panic) => {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "(a panic without a message)".to_string());
                return failed(format!("validator {i} panicked: {message}"));
            }
        }
    }
    None
}

/// `text` cut to at most `max` bytes at a character boundary.
fn cut(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes() {
        assert!(valid_code("TODO_LIMIT"));
        assert!(valid_code("A1"));
        assert!(valid_code(&"X".repeat(CODE_BYTES_MAX)));
        assert!(!valid_code(""));
        assert!(!valid_code(&"X".repeat(CODE_BYTES_MAX + 1)));
        assert!(!valid_code("todo_limit"));
        assert!(!valid_code("TODO-LIMIT"));
        assert!(!valid_code("VALIDATOR_FAILED"));
        assert!(!valid_code("DEVICE_REWOUND"));
    }

    #[test]
    fn reasons_are_cut_at_a_character_boundary() {
        assert_eq!(cut("ééé".to_string(), 3), "é");
        assert_eq!(cut("abc".to_string(), 3), "abc");
    }

    #[test]
    fn queries_only_read() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1), (2)")
            .unwrap();
        let ctx = Context {
            conn: &conn,
            client_id: 1,
            principal: None,
        };
        assert_eq!(ctx.query_i64("SELECT count(*) FROM t", &[]).unwrap(), 2);
        assert_eq!(
            ctx.query("select x from t where x > ?1", &[Value::Integer(1)])
                .unwrap(),
            vec![vec![Value::Integer(2)]]
        );
        for sql in [
            "DELETE FROM t",
            "WITH a AS (SELECT 1) DELETE FROM t",
            "COMMIT",
            "SAVEPOINT x",
            "PRAGMA query_only = 0",
        ] {
            assert!(
                matches!(ctx.query(sql, &[]), Err(QueryError::NotReadOnly(_))),
                "{sql}"
            );
        }
        assert_eq!(ctx.query_i64("SELECT count(*) FROM t", &[]).unwrap(), 2);
    }
}
