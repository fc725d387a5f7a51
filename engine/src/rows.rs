//! Row-level SQL shared by the client and the server: read a row, write
//! some of its columns, delete it. Statements are built from the schema's
//! names (quoted), kept in a small per-thread cache (building the text anew
//! for every row cost more than running it), and prepared through SQLite's
//! statement cache.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use rusqlite::{params_from_iter, Connection, OptionalExtension};

use crate::schema::{ident, Table};
use crate::value::Value;

#[derive(Clone, Copy, Hash, PartialEq, Eq)]
enum Kind {
    Read,
    Exists,
    Upsert,
    Update,
    Delete,
}

/// (kind, table name, the table's CREATE text, column indexes): the CREATE
/// text keeps two schemas' tables of one name apart.
type SqlKey = (Kind, String, String, Vec<usize>);

/// Entries kept at most; a peer sending ever new column sets cannot grow it
/// without bound.
const SQL_CACHE_MAX: usize = 512;

thread_local! {
    static SQL_CACHE: RefCell<HashMap<SqlKey, Rc<str>>> = RefCell::new(HashMap::new());
}

/// The SQL text for `kind` on `table` with these column indexes.
fn sql_for(kind: Kind, table: &Table, columns: &[usize]) -> Rc<str> {
    SQL_CACHE.with(|cache| {
        let mut cache = cache.borrow_mut();
        // Look up without building a key: the common case is a hit.
        if let Some(sql) = cache
            .iter()
            .find(|((k, t, create, c), _)| {
                *k == kind && t == &table.name && c == columns && create == &table.create_sql
            })
            .map(|(_, sql)| sql.clone())
        {
            return sql;
        }
        let sql: Rc<str> = build_sql(kind, table, columns).into();
        if cache.len() >= SQL_CACHE_MAX {
            cache.clear();
        }
        cache.insert(
            (
                kind,
                table.name.clone(),
                table.create_sql.clone(),
                columns.to_vec(),
            ),
            sql.clone(),
        );
        sql
    })
}

fn build_sql(kind: Kind, table: &Table, columns: &[usize]) -> String {
    let t = ident(&table.name);
    let pk = ident(table.pk_name());
    let name = |i: &usize| ident(&table.columns[*i].name);
    match kind {
        Kind::Read => {
            let cols: Vec<String> = table.columns.iter().map(|c| ident(&c.name)).collect();
            format!("SELECT {} FROM main.{t} WHERE {pk} = ?1", cols.join(", "))
        }
        Kind::Exists => format!("SELECT 1 FROM main.{t} WHERE {pk} = ?1"),
        Kind::Delete => format!("DELETE FROM main.{t} WHERE {pk} = ?1"),
        Kind::Upsert => {
            let mut names = vec![pk.clone()];
            names.extend(columns.iter().map(name));
            let placeholders: Vec<String> = (1..=names.len()).map(|i| format!("?{i}")).collect();
            let on_conflict = if columns.is_empty() {
                "DO NOTHING".to_string()
            } else {
                let sets: Vec<String> = names[1..]
                    .iter()
                    .map(|n| format!("{n} = excluded.{n}"))
                    .collect();
                format!("DO UPDATE SET {}", sets.join(", "))
            };
            format!(
                "INSERT INTO main.{t} ({}) VALUES ({}) ON CONFLICT({pk}) {on_conflict}",
                names.join(", "),
                placeholders.join(", ")
            )
        }
        Kind::Update => {
            let sets: Vec<String> = columns
                .iter()
                .enumerate()
                .map(|(n, i)| format!("{} = ?{}", name(i), n + 2))
                .collect();
            format!("UPDATE main.{t} SET {} WHERE {pk} = ?1", sets.join(", "))
        }
    }
}

/// The whole row with this primary key, in column order, if it exists.
pub fn read_row(
    conn: &Connection,
    table: &Table,
    pk: &Value,
) -> rusqlite::Result<Option<Vec<Value>>> {
    let mut stmt = conn.prepare_cached(&sql_for(Kind::Read, table, &[]))?;
    let width = table.columns.len();
    stmt.query_row([pk], |row| {
        (0..width).map(|i| row.get::<_, Value>(i)).collect()
    })
    .optional()
}

pub fn row_exists(conn: &Connection, table: &Table, pk: &Value) -> rusqlite::Result<bool> {
    let mut stmt = conn.prepare_cached(&sql_for(Kind::Exists, table, &[]))?;
    Ok(stmt.query_row([pk], |_| Ok(())).optional()?.is_some())
}

fn indexes(columns: &[(usize, &Value)]) -> Vec<usize> {
    columns.iter().map(|(i, _)| *i).collect()
}

/// Inserts the row with these columns, or updates just these columns when a
/// row with this primary key already exists. `columns` are indexes into
/// `table.columns` and exclude the primary key.
pub fn upsert_columns(
    conn: &Connection,
    table: &Table,
    pk: &Value,
    columns: &[(usize, &Value)],
) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare_cached(&sql_for(Kind::Upsert, table, &indexes(columns)))?;
    stmt.execute(params_from_iter(
        std::iter::once(pk).chain(columns.iter().map(|(_, v)| *v)),
    ))?;
    Ok(())
}

/// Updates these columns of an existing row; does nothing if it is missing.
pub fn update_columns(
    conn: &Connection,
    table: &Table,
    pk: &Value,
    columns: &[(usize, &Value)],
) -> rusqlite::Result<()> {
    if columns.is_empty() {
        return Ok(());
    }
    let mut stmt = conn.prepare_cached(&sql_for(Kind::Update, table, &indexes(columns)))?;
    stmt.execute(params_from_iter(
        std::iter::once(pk).chain(columns.iter().map(|(_, v)| *v)),
    ))?;
    Ok(())
}

/// Puts back a whole row as it was (`values` in column order).
pub fn restore_row(conn: &Connection, table: &Table, values: &[Value]) -> rusqlite::Result<()> {
    let pk = &values[table.pk];
    let cols: Vec<(usize, &Value)> = values
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != table.pk)
        .collect();
    upsert_columns(conn, table, pk, &cols)
}

pub fn delete_row(conn: &Connection, table: &Table, pk: &Value) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare_cached(&sql_for(Kind::Delete, table, &[]))?;
    stmt.execute([pk])?;
    Ok(())
}

/// One row write of a change set, resolved against its table.
pub struct Write<'a> {
    pub table: &'a Table,
    pub pk: &'a Value,
    pub op: WriteOp<'a>,
}

pub enum WriteOp<'a> {
    /// Insert the row, or update these columns of the existing row.
    Upsert(Vec<(usize, &'a Value)>),
    /// Update these columns of the row if it exists.
    Update(Vec<(usize, &'a Value)>),
    Delete,
}

fn write_one(conn: &Connection, w: &Write<'_>) -> rusqlite::Result<()> {
    match &w.op {
        WriteOp::Upsert(cols) => upsert_columns(conn, w.table, w.pk, cols),
        WriteOp::Update(cols) => update_columns(conn, w.table, w.pk, cols),
        WriteOp::Delete => delete_row(conn, w.table, w.pk),
    }
}

/// A failure that another order of the same writes may avoid: a UNIQUE
/// value (or a key) that one row of the set hands to another.
fn order_dependent(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error().map(|e| e.extended_code),
        Some(rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE | rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY)
    )
}

/// Writes one transaction's row changes as a whole: the result is the state
/// SQLite accepted on the device that made them, whatever order the rows are
/// listed in.
///
/// SQLite checks UNIQUE constraints row by row, so a set that hands a value
/// from one row to another (a swap, positions renumbered under a UNIQUE
/// index) can fail in one order and pass in another. Writes failing that way
/// are retried after the others, alternating direction so that a chain
/// listed backwards needs two rounds, not one per link. When a round makes no
/// progress (a cycle, such as a swap), the rows still stuck are vacated (the
/// existing ones deleted) and written whole with their final values. Only a
/// set that fails even then returns the error of that round.
///
/// The caller runs this inside a savepoint and rolls it back on error, and
/// runs it with foreign key enforcement and app triggers off: replicated
/// changes carry the effects of actions and triggers as data.
pub fn write_all(conn: &Connection, writes: &[Write<'_>]) -> rusqlite::Result<()> {
    let mut pending: Vec<usize> = (0..writes.len()).collect();
    let mut forward = true;
    loop {
        let mut stuck = Vec::new();
        let mut round_error = None;
        let mut attempt = |i: usize| -> rusqlite::Result<()> {
            match write_one(conn, &writes[i]) {
                Ok(()) => Ok(()),
                Err(e) if order_dependent(&e) => {
                    stuck.push(i);
                    round_error.get_or_insert(e);
                    Ok(())
                }
                Err(e) => Err(e),
            }
        };
        if forward {
            pending.iter().try_for_each(|&i| attempt(i))?;
        } else {
            pending.iter().rev().try_for_each(|&i| attempt(i))?;
            stuck.reverse();
        }
        let Some(error) = round_error else {
            return Ok(());
        };
        if stuck.len() == pending.len() {
            return vacate_and_write(conn, writes, &stuck).map_err(|_| error);
        }
        pending = stuck;
        forward = !forward;
    }
}

/// Deletes the existing rows among `stuck`, then writes each with its final
/// values.
fn vacate_and_write(
    conn: &Connection,
    writes: &[Write<'_>],
    stuck: &[usize],
) -> rusqlite::Result<()> {
    let mut finals: Vec<(usize, Option<Vec<Value>>)> = Vec::with_capacity(stuck.len());
    for &i in stuck {
        let w = &writes[i];
        let cols = match &w.op {
            WriteOp::Upsert(cols) | WriteOp::Update(cols) => cols,
            WriteOp::Delete => {
                finals.push((i, None));
                continue;
            }
        };
        let current = read_row(conn, w.table, w.pk)?;
        let row = current.map(|mut row| {
            for (c, v) in cols {
                row[*c] = (*v).clone();
            }
            row
        });
        if row.is_some() {
            delete_row(conn, w.table, w.pk)?;
        }
        finals.push((i, row));
    }
    for (i, row) in finals {
        match row {
            Some(values) => restore_row(conn, writes[i].table, &values)?,
            None => write_one(conn, &writes[i])?,
        }
    }
    Ok(())
}
