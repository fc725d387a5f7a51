//! Foreign keys as the server checks them: once per mutation, on the rows it
//! wrote, after all of them are written.
//!
//! The server writes replicated changes with SQLite's own enforcement off:
//! SQLite would check each statement alone (so a parent and its child sent in
//! one transaction could fail in one order), and it would run `ON DELETE`
//! actions again on rows whose fate the writer already captured. Instead,
//! after a mutation's rows are written, every foreign key those rows take
//! part in is checked with indexed lookups: a written child must have its
//! parent, and a parent that was deleted or re-keyed must have no children
//! left. A failure refuses the mutation with `CONSTRAINT`, as SQLite would
//! have refused it on the device had it seen the server's state.

use rusqlite::{params_from_iter, Connection, OptionalExtension};

use crate::rows::{self, Write, WriteOp};
use crate::schema::{ident, Schema, Table};
use crate::value::Value;

/// One foreign key of a synced table.
#[derive(Clone, Debug)]
struct Fk {
    child: String,
    child_cols: Vec<usize>,
    parent: String,
    parent_cols: Vec<usize>,
}

#[derive(Debug, Default)]
pub(crate) struct ForeignKeys {
    fks: Vec<Fk>,
}

pub(crate) enum CheckError {
    Violation(String),
    Sql(rusqlite::Error),
}

impl From<rusqlite::Error> for CheckError {
    fn from(e: rusqlite::Error) -> Self {
        CheckError::Sql(e)
    }
}

fn names(table: &Table, cols: &[usize]) -> String {
    cols.iter()
        .map(|c| table.columns[*c].name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

fn show(values: &[Value]) -> String {
    values
        .iter()
        .map(|v| match v {
            Value::Text(s) => format!("'{s}'"),
            Value::Integer(i) => i.to_string(),
            other => format!("{other:?}"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

impl ForeignKeys {
    /// The foreign keys among the schema's tables, as SQLite reads them from
    /// each table's `CREATE` (keys to tables outside the schema are not
    /// checked: the server does not hold such tables).
    pub(crate) fn load(conn: &Connection, schema: &Schema) -> rusqlite::Result<ForeignKeys> {
        let mut fks = Vec::new();
        for child in schema.tables.values() {
            let mut stmt = conn.prepare(
                "SELECT id, \"table\", \"from\", \"to\" FROM pragma_foreign_key_list(?1) ORDER BY id, seq",
            )?;
            let rows: Vec<(i64, String, String, Option<String>)> = stmt
                .query_map([&child.name], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                })?
                .collect::<Result<_, _>>()?;
            let mut i = 0;
            while i < rows.len() {
                let id = rows[i].0;
                let group: Vec<_> = rows[i..].iter().take_while(|r| r.0 == id).collect();
                i += group.len();
                let Some(parent) = schema.table(&group[0].1) else {
                    continue;
                };
                let child_cols: Option<Vec<usize>> =
                    group.iter().map(|r| child.column_index(&r.2)).collect();
                let parent_cols: Option<Vec<usize>> = group
                    .iter()
                    .map(|r| match &r.3 {
                        Some(to) => parent.column_index(to),
                        None => Some(parent.pk),
                    })
                    .collect();
                if let (Some(child_cols), Some(parent_cols)) = (child_cols, parent_cols) {
                    fks.push(Fk {
                        child: child.name.clone(),
                        child_cols,
                        parent: parent.name.clone(),
                        parent_cols,
                    });
                }
            }
        }
        Ok(ForeignKeys { fks })
    }

    /// The rows, before writing, of each write to a table some foreign key
    /// points at (None elsewhere): what children may still reference.
    pub(crate) fn read_parents(
        &self,
        conn: &Connection,
        writes: &[Write<'_>],
    ) -> rusqlite::Result<Vec<Option<Vec<Value>>>> {
        writes
            .iter()
            .map(|w| {
                if self.fks.iter().any(|fk| fk.parent == w.table.name) {
                    rows::read_row(conn, w.table, w.pk)
                } else {
                    Ok(None)
                }
            })
            .collect()
    }

    /// Checks every foreign key the written rows take part in.
    pub(crate) fn check(
        &self,
        conn: &Connection,
        schema: &Schema,
        writes: &[Write<'_>],
        before: &[Option<Vec<Value>>],
    ) -> Result<(), CheckError> {
        if self.fks.is_empty() {
            return Ok(());
        }
        for (w, old) in writes.iter().zip(before) {
            let now = match w.op {
                WriteOp::Delete => None,
                _ if self.fks.iter().any(|fk| fk.child == w.table.name) || old.is_some() => {
                    rows::read_row(conn, w.table, w.pk)?
                }
                _ => None,
            };
            for fk in &self.fks {
                if fk.child == w.table.name {
                    if let Some(row) = &now {
                        self.check_child(conn, schema, fk, row)?;
                    }
                }
                if fk.parent == w.table.name {
                    if let Some(old) = old {
                        let kept = now
                            .as_ref()
                            .is_some_and(|row| fk.parent_cols.iter().all(|c| row[*c] == old[*c]));
                        if !kept {
                            self.check_orphans(conn, schema, fk, old)?;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// A child row's key must name an existing parent (unless part of it is NULL).
    fn check_child(
        &self,
        conn: &Connection,
        schema: &Schema,
        fk: &Fk,
        row: &[Value],
    ) -> Result<(), CheckError> {
        let values: Vec<Value> = fk.child_cols.iter().map(|c| row[*c].clone()).collect();
        if values.contains(&Value::Null) {
            return Ok(());
        }
        let parent = schema.table(&fk.parent).expect("loaded from the schema");
        if !exists(conn, parent, &fk.parent_cols, &values)? {
            let child = schema.table(&fk.child).expect("loaded from the schema");
            return Err(CheckError::Violation(format!(
                "FOREIGN KEY constraint failed: {}({}) = ({}) has no row in {}({})",
                fk.child,
                names(child, &fk.child_cols),
                show(&values),
                fk.parent,
                names(parent, &fk.parent_cols),
            )));
        }
        Ok(())
    }

    /// No child may still point at a parent key that is gone.
    fn check_orphans(
        &self,
        conn: &Connection,
        schema: &Schema,
        fk: &Fk,
        old: &[Value],
    ) -> Result<(), CheckError> {
        let values: Vec<Value> = fk.parent_cols.iter().map(|c| old[*c].clone()).collect();
        if values.contains(&Value::Null) {
            return Ok(());
        }
        let child = schema.table(&fk.child).expect("loaded from the schema");
        if exists(conn, child, &fk.child_cols, &values)? {
            let parent = schema.table(&fk.parent).expect("loaded from the schema");
            return Err(CheckError::Violation(format!(
                "FOREIGN KEY constraint failed: rows of {}({}) still reference {}({}) = ({}), which this change removes",
                fk.child,
                names(child, &fk.child_cols),
                fk.parent,
                names(parent, &fk.parent_cols),
                show(&values),
            )));
        }
        Ok(())
    }
}

/// Whether some row of `table` has these values in these columns.
fn exists(
    conn: &Connection,
    table: &Table,
    cols: &[usize],
    values: &[Value],
) -> rusqlite::Result<bool> {
    let condition: Vec<String> = cols
        .iter()
        .enumerate()
        .map(|(i, c)| format!("{} = ?{}", ident(&table.columns[*c].name), i + 1))
        .collect();
    let sql = format!(
        "SELECT 1 FROM main.{} WHERE {} LIMIT 1",
        ident(&table.name),
        condition.join(" AND ")
    );
    Ok(conn
        .prepare_cached(&sql)?
        .query_row(params_from_iter(values), |_| Ok(()))
        .optional()?
        .is_some())
}
