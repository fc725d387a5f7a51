//! Row-level SQL shared by the client and the server: read a row, write
//! some of its columns, delete it. Statements are built from the schema's
//! names (quoted) and cached by SQLite's statement cache.

use rusqlite::{params_from_iter, Connection, OptionalExtension};

use crate::schema::{ident, Table};
use crate::value::Value;

/// The whole row with this primary key, in column order, if it exists.
pub fn read_row(
    conn: &Connection,
    table: &Table,
    pk: &Value,
) -> rusqlite::Result<Option<Vec<Value>>> {
    let cols: Vec<String> = table.columns.iter().map(|c| ident(&c.name)).collect();
    let sql = format!(
        "SELECT {} FROM main.{} WHERE {} = ?1",
        cols.join(", "),
        ident(&table.name),
        ident(table.pk_name())
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    stmt.query_row([pk], |row| {
        (0..cols.len()).map(|i| row.get::<_, Value>(i)).collect()
    })
    .optional()
}

pub fn row_exists(conn: &Connection, table: &Table, pk: &Value) -> rusqlite::Result<bool> {
    let sql = format!(
        "SELECT 1 FROM main.{} WHERE {} = ?1",
        ident(&table.name),
        ident(table.pk_name())
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    Ok(stmt.query_row([pk], |_| Ok(())).optional()?.is_some())
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
    let mut names = vec![ident(table.pk_name())];
    names.extend(columns.iter().map(|(i, _)| ident(&table.columns[*i].name)));
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
    let sql = format!(
        "INSERT INTO main.{} ({}) VALUES ({}) ON CONFLICT({}) {}",
        ident(&table.name),
        names.join(", "),
        placeholders.join(", "),
        ident(table.pk_name()),
        on_conflict
    );
    let mut stmt = conn.prepare_cached(&sql)?;
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
    let sets: Vec<String> = columns
        .iter()
        .enumerate()
        .map(|(n, (i, _))| format!("{} = ?{}", ident(&table.columns[*i].name), n + 2))
        .collect();
    let sql = format!(
        "UPDATE main.{} SET {} WHERE {} = ?1",
        ident(&table.name),
        sets.join(", "),
        ident(table.pk_name())
    );
    let mut stmt = conn.prepare_cached(&sql)?;
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
    let sql = format!(
        "DELETE FROM main.{} WHERE {} = ?1",
        ident(&table.name),
        ident(table.pk_name())
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    stmt.execute([pk])?;
    Ok(())
}

/// Column names of an existing table in the database, in SQLite's order.
pub fn existing_columns(conn: &Connection, table: &str) -> rusqlite::Result<Option<Vec<String>>> {
    let mut stmt = conn.prepare(&format!("PRAGMA main.table_info({})", ident(table)))?;
    let names: Vec<String> = stmt
        .query_map([], |r| r.get(1))?
        .collect::<Result<_, _>>()?;
    Ok(if names.is_empty() { None } else { Some(names) })
}

/// Creates the schema's tables that are missing, and checks that the ones
/// already there have the schema's columns (migrations are not supported
/// yet, so a difference is an error that names the table).
pub fn ensure_tables(conn: &Connection, schema: &crate::schema::Schema) -> Result<(), String> {
    for table in schema.tables.values() {
        match existing_columns(conn, &table.name).map_err(|e| e.to_string())? {
            None => conn
                .execute_batch(&table.create_sql)
                .map_err(|e| format!("table '{}': create failed: {e}", table.name))?,
            Some(existing) => {
                let wanted: Vec<String> = table.columns.iter().map(|c| c.name.clone()).collect();
                if existing != wanted {
                    return Err(format!(
                        "table '{}' already exists with columns {existing:?} but the schema says {wanted:?}; \
                         schema migrations are not supported yet",
                        table.name
                    ));
                }
            }
        }
    }
    Ok(())
}
