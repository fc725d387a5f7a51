//! One SQLite database on IndexedDB, through rusqlite and sqlite-wasm-vfs's relaxed-idb VFS.
//!
//! relaxed-idb keeps the whole database in memory and, when SQLite commits, queues the
//! changed pages for one IndexedDB transaction. A commit therefore returns before the data
//! is durable. [`Store::flush`] is the barrier that closes that gap; see its docs.

use hearth_bridge::{ErrorCode, ErrorReply, Rows, Value};
use rusqlite::types::{Value as SqlValue, ValueRef};
use rusqlite::{params_from_iter, Connection, OpenFlags};
use sqlite_wasm_vfs::relaxed_idb::{
    self, Preload, RelaxedIdbCfgBuilder, RelaxedIdbError, RelaxedIdbUtil, WaitCommit,
};

/// The SQLite VFS name, which relaxed-idb also uses as the IndexedDB database name. Every
/// Hearth database of an origin is a set of blocks keyed by file name inside it.
pub const VFS_NAME: &str = "hearth";

/// A file name no database ever uses: deleting it is a no-op IndexedDB transaction that
/// serves as the flush barrier (see [`Store::flush`]).
const BARRIER_FILE: &str = "hearth-flush-barrier.never-a-database";

/// Why a database could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("IndexedDB storage failed: {0}")]
    Storage(#[from] RelaxedIdbError),
    #[error("SQLite failed: {0}")]
    Sqlite(#[from] rusqlite::Error),
}

impl From<StoreError> for ErrorReply {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::Storage(_) => ErrorReply::new(ErrorCode::Storage, err.to_string()),
            StoreError::Sqlite(err) => sql_error(err),
        }
    }
}

/// The flush barrier of one relaxed-idb VFS: the part of a [`Store`] that the engine host
/// keeps when the engine owns the connection.
pub struct Durability {
    idb: RelaxedIdbUtil,
}

impl Durability {
    /// Returns a future that resolves once everything committed before this call is
    /// durable in IndexedDB. See [`Store::flush`] for why this works.
    pub fn flush(&self) -> Result<WaitCommit, ErrorReply> {
        self.idb.delete_db(BARRIER_FILE).map_err(|err| {
            ErrorReply::new(
                ErrorCode::Storage,
                format!("cannot queue flush barrier: {err}"),
            )
        })
    }

    /// The committed image of `file` as relaxed-idb holds it in memory.
    pub fn image(&self, file: &str) -> Result<Vec<u8>, ErrorReply> {
        self.idb
            .export_db(file)
            .map_err(|err| ErrorReply::new(ErrorCode::Storage, err.to_string()))
    }
}

/// Opens (creating if needed) the database `file` on IndexedDB, loading its blocks into
/// memory first, because relaxed-idb serves all reads synchronously from memory. The
/// connection runs with `synchronous = off` (relaxed-idb refuses any other level):
/// durability comes from [`Durability::flush`], not fsync.
pub async fn open_connection(file: &str) -> Result<(Connection, Durability), StoreError> {
    // Only this file is preloaded: other databases of the origin belong to other
    // SharedWorkers, and loading them would cost memory and time for nothing.
    let cfg = RelaxedIdbCfgBuilder::new()
        .vfs_name(VFS_NAME)
        .preload(Preload::None)
        .build();
    let idb = relaxed_idb::install::<sqlite_wasm_rs::WasmOsCallback>(&cfg, false).await?;
    idb.preload_db(vec![file.to_owned()]).await?;
    let conn = Connection::open_with_flags_and_vfs(file, OpenFlags::default(), VFS_NAME)?;
    conn.pragma_update(None, "synchronous", "off")?;
    Ok((conn, Durability { idb }))
}

/// An open database. There must be exactly one per file per origin: two connections on
/// the same relaxed-idb file overwrite each other's blocks and corrupt it, which is why
/// only the SharedWorker opens databases.
pub struct Store {
    conn: Connection,
    durability: Durability,
    file: String,
}

impl Store {
    /// Opens (creating if needed) the database `file`, loading its blocks from IndexedDB
    /// into memory first, because relaxed-idb serves all reads synchronously from memory.
    pub async fn open(file: &str) -> Result<Store, StoreError> {
        let (conn, durability) = open_connection(file).await?;
        Ok(Store {
            conn,
            durability,
            file: file.to_owned(),
        })
    }

    /// The database's file name inside the IndexedDB database [`VFS_NAME`].
    pub fn file(&self) -> &str {
        &self.file
    }

    /// Runs SQL that changes the database and commits it in memory; returns the number of
    /// rows changed. The change is durable only once a later [`Store::flush`] resolves.
    ///
    /// With `params`, `sql` must be one statement. Without, it may be several, which run
    /// as one transaction: all or nothing.
    pub fn exec(&mut self, sql: &str, params: &[Value]) -> Result<u64, ErrorReply> {
        let result = self.exec_inner(sql, params);
        // A transaction left open would span several requests, and relaxed-idb could then
        // persist half of it with no journal to undo it after a crash. Each exec is
        // exactly one transaction, so refuse and undo anything that leaves one open.
        if !self.conn.is_autocommit() {
            let _ = self.conn.execute_batch("ROLLBACK");
            return Err(ErrorReply::new(
                ErrorCode::SqlError,
                "exec must not leave a transaction open: each exec is one transaction",
            ));
        }
        result
    }

    fn exec_inner(&mut self, sql: &str, params: &[Value]) -> Result<u64, ErrorReply> {
        match self
            .conn
            .execute(sql, params_from_iter(params.iter().map(to_sql)))
        {
            Ok(rows) => Ok(rows as u64),
            Err(rusqlite::Error::MultipleStatement) if params.is_empty() => {
                let before = self.conn.total_changes();
                let tx = self.conn.unchecked_transaction().map_err(sql_error)?;
                tx.execute_batch(sql).map_err(sql_error)?;
                tx.commit().map_err(sql_error)?;
                Ok(self.conn.total_changes() - before)
            }
            Err(err) => Err(sql_error(err)),
        }
    }

    /// Runs one read-only statement and returns its rows.
    pub fn query(&self, sql: &str, params: &[Value]) -> Result<Rows, ErrorReply> {
        let mut stmt = self.conn.prepare(sql).map_err(sql_error)?;
        // A write through query() would be reported before it is durable, so writes must
        // go through exec(), which waits for the flush.
        if !stmt.readonly() {
            return Err(ErrorReply::new(
                ErrorCode::SqlError,
                "query() only reads; use exec() for statements that change the database",
            ));
        }
        let columns: Vec<String> = stmt.column_names().map(String::from).collect();
        let mut rows = stmt
            .query(params_from_iter(params.iter().map(to_sql)))
            .map_err(sql_error)?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().map_err(sql_error)? {
            let mut values = Vec::with_capacity(columns.len());
            for index in 0..columns.len() {
                values.push(from_sql(row.get_ref(index).map_err(sql_error)?)?);
            }
            out.push(values);
        }
        Ok(Rows { columns, rows: out })
    }

    /// Returns a future that resolves once everything committed before this call is
    /// durable in IndexedDB.
    ///
    /// Why this works: relaxed-idb sends each commit's page writes to one queue, drained by
    /// one task that awaits each IndexedDB transaction's completion before starting the
    /// next. A commit enqueues its write synchronously (from SQLite's
    /// `SQLITE_FCNTL_SYNC`/`COMMIT_PHASETWO` file control), or joins an already queued,
    /// not yet started write of the same file. `delete_db` of a file that does not exist
    /// enqueues an (empty) IndexedDB transaction behind those writes and hands back a
    /// `WaitCommit`, which resolves once the queue has reached it. The cost is one empty
    /// IndexedDB transaction per call, and one barrier covers any number of commits.
    pub fn flush(&self) -> Result<WaitCommit, ErrorReply> {
        self.durability.flush()
    }

    /// The committed image of the database as relaxed-idb holds it in memory; tests
    /// compare it with what IndexedDB holds.
    pub fn image(&self) -> Result<Vec<u8>, ErrorReply> {
        self.durability.image(&self.file)
    }

    /// Closes the connection, reporting any error SQLite has on the way.
    pub fn close(self) -> Result<(), ErrorReply> {
        self.conn.close().map_err(|(_, err)| sql_error(err))
    }
}

fn to_sql(value: &Value) -> SqlValue {
    match value {
        Value::Null => SqlValue::Null,
        Value::Integer(i) => SqlValue::Integer(*i),
        Value::Real(f) => SqlValue::Real(*f),
        Value::Text(s) => SqlValue::Text(s.clone()),
        Value::Blob(b) => SqlValue::Blob(b.clone()),
    }
}

fn from_sql(value: ValueRef<'_>) -> Result<Value, ErrorReply> {
    Ok(match value {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(i) => Value::Integer(i),
        ValueRef::Real(f) => Value::Real(f),
        // SQLite does not check that TEXT is UTF-8; the engine refuses such TEXT rather
        // than change its bytes, and so does this path.
        ValueRef::Text(t) => Value::Text(
            hearth_engine::Value::from_sql_ref(ValueRef::Text(t))
                .map(|v| match v {
                    hearth_engine::Value::Text(s) => s,
                    _ => unreachable!("TEXT reads as TEXT"),
                })
                .map_err(|e| ErrorReply::new(ErrorCode::SqlError, e.to_string()))?,
        ),
        ValueRef::Blob(b) => Value::Blob(b.to_vec()),
    })
}

/// Maps a rusqlite error to the page-visible code: storage failures are not the
/// statement's fault, everything else is.
fn sql_error(err: rusqlite::Error) -> ErrorReply {
    use rusqlite::ErrorCode as C;
    let code = match err.sqlite_error_code() {
        Some(C::SystemIoFailure | C::DiskFull | C::CannotOpen | C::DatabaseCorrupt) => {
            ErrorCode::Storage
        }
        _ => ErrorCode::SqlError,
    };
    ErrorReply::new(code, err.to_string())
}
