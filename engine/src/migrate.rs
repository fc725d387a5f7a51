//! Schema changes: bringing a database's synced tables from one version of
//! the schema to a newer one, on the server (at `serve`'s start) and on each
//! device (when a `Welcome` brings the newer schema).
//!
//! A [`Plan`] is read off the database itself (the tables as SQLite holds
//! them) and the new schema (each table's `create` run in a scratch
//! database), so the server and every device take the same steps from the
//! same tables, whatever the version they come from:
//!
//! - a table the schema gains is created; a table the old schema had and the
//!   new one lacks is dropped, with its rows;
//! - a table whose columns or constraints differ is rebuilt: its `create` is
//!   run anew and the columns it keeps are copied across (SQLite's own
//!   procedure for changes `ALTER TABLE` cannot make,
//!   <https://www.sqlite.org/lang_altertable.html#otheralter>), so a new
//!   column takes its `DEFAULT` in every existing row and a dropped one is
//!   gone;
//! - indexes are dropped and created to match.
//!
//! What it refuses, naming the table and column: a type change, a new
//! primary key, a column gone while another arrives in the same table (or a
//! table gone while one with its columns arrives) — a rename, which Hearth
//! cannot tell from a drop and an add and would lose the values of — a new
//! column that is `NOT NULL` without a `DEFAULT` (existing rows have no
//! value for it), and a new column whose default is not a constant (the
//! server and each device would compute it apart and disagree).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use rusqlite::Connection;

use crate::schema::{ident, Schema, Table};
use crate::value::Value;

/// One step of a migration, as `serve` logs it and `serve --check` prints it.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    CreateTable {
        table: String,
    },
    DropTable {
        table: String,
    },
    AddColumn {
        table: String,
        column: String,
        default: Value,
    },
    DropColumn {
        table: String,
        column: String,
    },
    /// The table's constraints changed (its `CREATE TABLE` differs) while
    /// its columns did not: rebuilt to take them.
    Rebuild {
        table: String,
    },
    CreateIndex {
        table: String,
        index: String,
    },
    DropIndex {
        table: String,
        index: String,
    },
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::CreateTable { table } => write!(f, "add table '{table}'"),
            Step::DropTable { table } => write!(f, "drop table '{table}' and its rows"),
            Step::AddColumn {
                table,
                column,
                default,
            } => write!(
                f,
                "add column '{column}' to table '{table}' (existing rows take {})",
                describe(default)
            ),
            Step::DropColumn { table, column } => {
                write!(
                    f,
                    "drop column '{column}' of table '{table}' and its values"
                )
            }
            Step::Rebuild { table } => write!(
                f,
                "rebuild table '{table}' for its new constraints (existing rows must meet them)"
            ),
            Step::CreateIndex { table, index } => {
                write!(f, "add index '{index}' on table '{table}'")
            }
            Step::DropIndex { table, index } => {
                write!(f, "drop index '{index}' of table '{table}'")
            }
        }
    }
}

fn describe(v: &Value) -> String {
    match v {
        Value::Null => "NULL".into(),
        Value::Integer(i) => i.to_string(),
        Value::Real(r) => r.to_string(),
        Value::Text(t) => format!("'{t}'"),
        Value::Blob(b) => format!("a blob of {} bytes", b.len()),
    }
}

/// Why a schema change cannot be made.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum MigrateError {
    #[error(
        "table '{table}', column '{column}': its type changes from {from} to {to}, and Hearth does not change a column's type. \
         Add a new column of the new type, copy the values into it from your app, and drop the old column in a later version"
    )]
    TypeChange {
        table: String,
        column: String,
        from: String,
        to: String,
    },
    #[error(
        "table '{table}': its primary key changes from '{from}' to '{to}', and Hearth does not change a primary key. \
         Create a new table with the new key, copy the rows into it from your app, and drop the old table in a later version"
    )]
    KeyChange {
        table: String,
        from: String,
        to: String,
    },
    #[error(
        "table '{table}': column '{gone}' is gone and column '{new}' is new in the same version. Hearth cannot tell a rename \
         from a drop and an add, and does not rename (the values would be lost). To rename, add '{new}' (one version), copy \
         the values into it from your app, then drop '{gone}' (a later version); to drop one column and add another, make \
         them two versions"
    )]
    Rename {
        table: String,
        gone: String,
        new: String,
    },
    #[error(
        "table '{gone}' is gone and table '{new}' is new with the same columns in the same version. Hearth does not rename \
         tables (the rows would be lost). To rename, add '{new}' (one version), copy the rows into it from your app, then \
         drop '{gone}' (a later version); to drop one table and add another, make them two versions"
    )]
    TableRename { gone: String, new: String },
    #[error("table '{table}', new column '{column}': {problem}")]
    NewColumn {
        table: String,
        column: String,
        problem: String,
    },
    #[error("table '{table}': {message}")]
    Apply { table: String, message: String },
    #[error("schema change: {0}")]
    Sql(String),
}

impl From<rusqlite::Error> for MigrateError {
    fn from(e: rusqlite::Error) -> Self {
        MigrateError::Sql(e.to_string())
    }
}

/// A column as SQLite holds it (`PRAGMA table_info`).
#[derive(Clone, Debug)]
struct ColumnInfo {
    name: String,
    declared_type: String,
    not_null: bool,
    default: Option<String>,
    pk: bool,
}

/// A table as SQLite holds it.
struct TableInfo {
    columns: Vec<ColumnInfo>,
    sql: String,
    /// Its explicit indexes (not those SQLite makes for constraints), by
    /// name, with their `CREATE INDEX` text.
    indexes: BTreeMap<String, String>,
}

fn table_info(conn: &Connection, table: &str) -> rusqlite::Result<Option<TableInfo>> {
    let sql: Option<String> = conn
        .query_row(
            "SELECT sql FROM main.sqlite_schema WHERE type = 'table' AND name = ?1",
            [table],
            |r| r.get(0),
        )
        .ok();
    let Some(sql) = sql else {
        return Ok(None);
    };
    let columns = conn
        .prepare(&format!("PRAGMA main.table_info({})", ident(table)))?
        .query_map([], |r| {
            Ok(ColumnInfo {
                name: r.get(1)?,
                declared_type: r.get(2)?,
                not_null: r.get(3)?,
                default: r.get(4)?,
                pk: r.get::<_, i64>(5)? > 0,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let indexes = conn
        .prepare(
            "SELECT name, sql FROM main.sqlite_schema WHERE type = 'index' AND tbl_name = ?1 AND sql IS NOT NULL",
        )?
        .query_map([table], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<BTreeMap<String, String>, _>>()?;
    Ok(Some(TableInfo {
        columns,
        sql,
        indexes,
    }))
}

/// SQL text compared without its layout: runs of whitespace count as one
/// space.
fn normal(sql: &str) -> String {
    sql.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Whether a column's `DEFAULT` (as `PRAGMA table_info` gives it) is a
/// constant: a number, a string or blob literal, NULL, TRUE or FALSE.
fn constant_default(sql: &str) -> bool {
    let s = sql.trim();
    let upper = s.to_ascii_uppercase();
    if matches!(upper.as_str(), "NULL" | "TRUE" | "FALSE") {
        return true;
    }
    // One string literal: quotes inside it only doubled (`'it''s'`, not
    // `'a' || random() || 'b'`).
    if s.len() >= 2 && s.starts_with('\'') && s.ends_with('\'') {
        return !s[1..s.len() - 1].replace("''", "").contains('\'');
    }
    if upper.len() >= 3 && upper.starts_with("X'") && upper.ends_with('\'') {
        return upper[2..upper.len() - 1]
            .chars()
            .all(|c| c.is_ascii_hexdigit());
    }
    let digits = s.trim_start_matches(['+', '-']);
    !digits.is_empty() && digits.parse::<f64>().is_ok() && !digits.contains(['i', 'I', 'n', 'N'])
}

/// What a migration does, read off a database and a schema by [`plan`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    /// What it does, in the order it does it.
    pub steps: Vec<Step>,
    /// Tables it rebuilds, each with its column names before, in order.
    pub rebuilt: BTreeMap<String, Vec<String>>,
    /// Tables it drops.
    pub dropped_tables: BTreeSet<String>,
    /// Columns it drops, as (table, column).
    pub dropped_columns: BTreeSet<(String, String)>,
    /// The value each added column takes in existing rows, by (table,
    /// column).
    pub defaults: BTreeMap<(String, String), Value>,
    /// A device's plan ([`follow`]): columns of rebuilt tables whose type
    /// changed, which a device sees only when the column was dropped and
    /// added again in versions it skipped: they start at their default.
    pub uncopied: BTreeSet<(String, String)>,
    /// A device's plan: tables whose primary key changed (dropped and made
    /// again in versions it skipped): made anew, empty.
    pub recreated: BTreeSet<String>,
    /// A device's plan: rows that break the rebuilt table's constraints are
    /// left out rather than failing the migration (the device re-loads its
    /// rows from the server after a schema change, and a pending write that
    /// breaks them is refused by the server and rolled back).
    pub lenient: bool,
}

impl Plan {
    /// Whether the database already matches the schema.
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// Whether rows, their columns or tables change (not just indexes):
    /// what the server's log said before no longer fits the tables.
    pub fn reshapes(&self) -> bool {
        !self.rebuilt.is_empty() || !self.dropped_tables.is_empty() || !self.recreated.is_empty()
    }

    /// Whether a rebuilt table's column keeps its values.
    fn copies(&self, table: &str, column: &str) -> bool {
        !self
            .uncopied
            .contains(&(table.to_string(), column.to_string()))
    }

    /// A row of table `table` in its column order before the migration,
    /// in the order of `new` (the table as the schema now has it): dropped
    /// columns left out, added ones at their default. None for a table the
    /// migration drops.
    pub fn remap_row(
        &self,
        new: Option<&Table>,
        table: &str,
        row: Vec<Value>,
    ) -> Option<Vec<Value>> {
        let new = new?;
        let Some(before) = self.rebuilt.get(table) else {
            return Some(row);
        };
        let mut old: BTreeMap<&str, Value> = before
            .iter()
            .map(String::as_str)
            .zip(row)
            .filter(|(c, _)| self.copies(table, c))
            .collect();
        Some(
            new.columns
                .iter()
                .map(|c| {
                    old.remove(c.name.as_str()).unwrap_or_else(|| {
                        self.defaults
                            .get(&(table.to_string(), c.name.clone()))
                            .cloned()
                            .unwrap_or(Value::Null)
                    })
                })
                .collect(),
        )
    }

    /// For a rebuilt table: each old column index's new index (None for a
    /// dropped column).
    pub fn index_map(&self, new: &Table, table: &str) -> Option<Vec<Option<usize>>> {
        let before = self.rebuilt.get(table)?;
        Some(
            before
                .iter()
                .map(|name| new.column_index(name).filter(|_| self.copies(table, name)))
                .collect(),
        )
    }
}

/// The migration that brings the synced tables of `conn` to `new`, from the
/// schema the database was last brought to (`old`; None when it has none,
/// in which case nothing is dropped), refusing what Hearth does not do (see
/// the module's notes). The server's: it decides what a schema change is.
/// Reads; changes nothing.
pub fn plan(conn: &Connection, old: Option<&Schema>, new: &Schema) -> Result<Plan, MigrateError> {
    plan_with(conn, old, new, true)
}

/// The migration a device makes to follow the server to `new`: the server
/// accepted the change already, one version at a time, while the device may
/// come from several versions back, where a column dropped in one version
/// and added again in a later one looks like a type change or a rename. So
/// nothing is refused for being a rename or a type change: the table is
/// rebuilt, and the device re-loads its rows from the server after a
/// schema change anyway (see `Link`'s reload at the Welcome).
pub fn follow(conn: &Connection, old: Option<&Schema>, new: &Schema) -> Result<Plan, MigrateError> {
    plan_with(conn, old, new, false)
}

fn plan_with(
    conn: &Connection,
    old: Option<&Schema>,
    new: &Schema,
    strict: bool,
) -> Result<Plan, MigrateError> {
    let mut plan = Plan {
        lenient: !strict,
        ..Plan::default()
    };
    let mut created: Vec<(String, Vec<String>)> = Vec::new();
    for table in new.tables.values() {
        let scratch = Connection::open_in_memory()?;
        scratch
            .execute_batch(&table.create_sql)
            .map_err(|e| MigrateError::Apply {
                table: table.name.clone(),
                message: format!("create failed: {e}"),
            })?;
        let wanted = table_info(&scratch, &table.name)?.ok_or_else(|| MigrateError::Apply {
            table: table.name.clone(),
            message: "its create makes no such table".into(),
        })?;
        let Some(have) = table_info(conn, &table.name)? else {
            plan.steps.push(Step::CreateTable {
                table: table.name.clone(),
            });
            created.push((
                table.name.clone(),
                wanted.columns.iter().map(|c| c.name.clone()).collect(),
            ));
            continue;
        };
        let pk_of = |t: &TableInfo| {
            t.columns
                .iter()
                .filter(|c| c.pk)
                .map(|c| c.name.clone())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let pk_type = |t: &TableInfo| {
            t.columns
                .iter()
                .filter(|c| c.pk)
                .map(|c| c.declared_type.to_ascii_uppercase())
                .collect::<Vec<_>>()
        };
        if !strict && (pk_of(&have) != pk_of(&wanted) || pk_type(&have) != pk_type(&wanted)) {
            plan.recreated.insert(table.name.clone());
            plan.steps.push(Step::DropTable {
                table: table.name.clone(),
            });
            plan.steps.push(Step::CreateTable {
                table: table.name.clone(),
            });
            continue;
        }
        if pk_of(&have) != pk_of(&wanted) {
            return Err(MigrateError::KeyChange {
                table: table.name.clone(),
                from: pk_of(&have),
                to: pk_of(&wanted),
            });
        }
        let mut gone = Vec::new();
        for c in &have.columns {
            match wanted.columns.iter().find(|w| w.name == c.name) {
                Some(w) if !strict && !w.declared_type.eq_ignore_ascii_case(&c.declared_type) => {
                    plan.uncopied.insert((table.name.clone(), c.name.clone()));
                }
                Some(w) if !w.declared_type.eq_ignore_ascii_case(&c.declared_type) => {
                    return Err(MigrateError::TypeChange {
                        table: table.name.clone(),
                        column: c.name.clone(),
                        from: shown_type(&c.declared_type),
                        to: shown_type(&w.declared_type),
                    });
                }
                Some(_) => {}
                None => gone.push(c.name.clone()),
            }
        }
        let added: Vec<&ColumnInfo> = wanted
            .columns
            .iter()
            .filter(|w| !have.columns.iter().any(|c| c.name == w.name))
            .collect();
        if let (true, Some(gone), Some(new)) = (strict, gone.first(), added.first()) {
            return Err(MigrateError::Rename {
                table: table.name.clone(),
                gone: gone.clone(),
                new: new.name.clone(),
            });
        }
        let new_column = |column: &str, problem: &str| MigrateError::NewColumn {
            table: table.name.clone(),
            column: column.to_string(),
            problem: problem.to_string(),
        };
        for column in &added {
            let default = match &column.default {
                None if column.not_null => {
                    return Err(new_column(
                        &column.name,
                        "it is NOT NULL without a DEFAULT, and rows already stored (on the server and on devices) have no \
                         value for it: give it a constant DEFAULT",
                    ))
                }
                None => Value::Null,
                Some(sql) if strict && !constant_default(sql) => {
                    return Err(new_column(
                        &column.name,
                        &format!(
                            "its DEFAULT {sql} is not a constant: the server and each device would compute it apart for \
                             the rows they hold, and disagree. Give it a constant DEFAULT (a number, a string, NULL)"
                        ),
                    ))
                }
                Some(sql) => scratch.query_row(&format!("SELECT {sql}"), [], |r| r.get::<_, Value>(0))?,
            };
            if column.not_null && default == Value::Null {
                return Err(new_column(
                    &column.name,
                    "it is NOT NULL with a NULL DEFAULT: give it a constant DEFAULT",
                ));
            }
            plan.defaults
                .insert((table.name.clone(), column.name.clone()), default);
        }
        // A device's column whose type changed (dropped and added again in
        // versions it skipped) starts at its default, like an added one.
        for w in &wanted.columns {
            let key = (table.name.clone(), w.name.clone());
            if plan.uncopied.contains(&key) {
                let default = match &w.default {
                    Some(sql) => {
                        scratch.query_row(&format!("SELECT {sql}"), [], |r| r.get::<_, Value>(0))?
                    }
                    None => Value::Null,
                };
                plan.defaults.insert(key, default);
            }
        }
        let same_columns = have.columns.len() == wanted.columns.len()
            && have
                .columns
                .iter()
                .zip(&wanted.columns)
                .all(|(a, b)| a.name == b.name);
        let rebuild = !same_columns || normal(&have.sql) != normal(&wanted.sql);
        if rebuild {
            plan.rebuilt.insert(
                table.name.clone(),
                have.columns.iter().map(|c| c.name.clone()).collect(),
            );
            for column in &gone {
                plan.steps.push(Step::DropColumn {
                    table: table.name.clone(),
                    column: column.clone(),
                });
                plan.dropped_columns
                    .insert((table.name.clone(), column.clone()));
            }
            for column in &added {
                plan.steps.push(Step::AddColumn {
                    table: table.name.clone(),
                    column: column.name.clone(),
                    default: plan.defaults[&(table.name.clone(), column.name.clone())].clone(),
                });
            }
            if gone.is_empty() && added.is_empty() {
                plan.steps.push(Step::Rebuild {
                    table: table.name.clone(),
                });
            }
        }
        for (name, sql) in &have.indexes {
            if wanted.indexes.get(name).map(|s| normal(s)) != Some(normal(sql)) {
                plan.steps.push(Step::DropIndex {
                    table: table.name.clone(),
                    index: name.clone(),
                });
            }
        }
        for (name, sql) in &wanted.indexes {
            if have.indexes.get(name).map(|s| normal(s)) != Some(normal(sql)) {
                plan.steps.push(Step::CreateIndex {
                    table: table.name.clone(),
                    index: name.clone(),
                });
            }
        }
    }
    if let Some(old) = old {
        for name in old.tables.keys() {
            if new.tables.contains_key(name) {
                continue;
            }
            let Some(have) = table_info(conn, name)? else {
                continue;
            };
            let columns: Vec<String> = have.columns.iter().map(|c| c.name.clone()).collect();
            if let Some((new_name, _)) = created.iter().find(|(_, c)| strict && *c == columns) {
                return Err(MigrateError::TableRename {
                    gone: name.clone(),
                    new: new_name.clone(),
                });
            }
            plan.steps.push(Step::DropTable {
                table: name.clone(),
            });
            plan.dropped_tables.insert(name.clone());
        }
    }
    Ok(plan)
}

fn shown_type(t: &str) -> String {
    if t.is_empty() {
        "no type".into()
    } else {
        t.to_string()
    }
}

/// Carries out `plan` (from [`plan`] on the same database and schema):
/// drops, rebuilds and creates tables and indexes. Run it inside a
/// transaction, with foreign key enforcement off (a rebuilt table is
/// briefly absent) and with no trigger of Hearth's own on the tables; the
/// app's triggers on a rebuilt table are made again afterwards, and one
/// that no longer compiles (it named a dropped column) fails the migration
/// naming it.
pub fn apply(conn: &Connection, schema: &Schema, plan: &Plan) -> Result<(), MigrateError> {
    // Renaming a table must not rewrite the foreign keys of other tables
    // that point at it: the rebuilt table takes the name back.
    conn.execute_batch("PRAGMA legacy_alter_table = ON")?;
    let result = apply_steps(conn, schema, plan);
    conn.execute_batch("PRAGMA legacy_alter_table = OFF")?;
    result
}

fn apply_steps(conn: &Connection, schema: &Schema, plan: &Plan) -> Result<(), MigrateError> {
    let apply_error = |table: &str| {
        let table = table.to_string();
        move |e: rusqlite::Error| MigrateError::Apply {
            table: table.clone(),
            message: e.to_string(),
        }
    };
    for table in plan.dropped_tables.iter().chain(&plan.recreated) {
        conn.execute_batch(&format!("DROP TABLE main.{}", ident(table)))
            .map_err(apply_error(table))?;
    }
    for name in &plan.recreated {
        let table = schema
            .table(name)
            .expect("a recreated table is in the schema");
        conn.execute_batch(&table.create_sql)
            .map_err(apply_error(name))?;
    }
    for (name, before) in &plan.rebuilt {
        let table = schema
            .table(name)
            .expect("a rebuilt table is in the schema");
        let triggers: Vec<(String, String)> = conn
            .prepare(
                "SELECT name, sql FROM main.sqlite_schema WHERE type = 'trigger' AND tbl_name = ?1",
            )?
            .query_map([name], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        let indexes: Vec<String> = conn
            .prepare(
                "SELECT name FROM main.sqlite_schema WHERE type = 'index' AND tbl_name = ?1 AND sql IS NOT NULL",
            )?
            .query_map([name], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        for (trigger, _) in &triggers {
            conn.execute_batch(&format!("DROP TRIGGER main.{}", ident(trigger)))?;
        }
        for index in &indexes {
            conn.execute_batch(&format!("DROP INDEX main.{}", ident(index)))?;
        }
        conn.execute_batch(&format!(
            "DROP TABLE IF EXISTS main._hearth_migrating; ALTER TABLE main.{} RENAME TO _hearth_migrating",
            ident(name)
        ))?;
        conn.execute_batch(&table.create_sql)
            .map_err(apply_error(name))?;
        let kept: Vec<String> = before
            .iter()
            .filter(|c| table.column_index(c).is_some() && plan.copies(name, c))
            .map(|c| ident(c))
            .collect();
        let kept = kept.join(", ");
        let or_ignore = if plan.lenient { " OR IGNORE" } else { "" };
        conn.execute_batch(&format!(
            "INSERT{or_ignore} INTO main.{} ({kept}) SELECT {kept} FROM main._hearth_migrating; DROP TABLE main._hearth_migrating",
            ident(name)
        ))
        .map_err(|e| MigrateError::Apply {
            table: name.clone(),
            message: format!("the rows already stored do not fit the new table: {e}"),
        })?;
        if !plan.lenient {
            // A new foreign key must hold for the rows already stored, as a
            // new CHECK or UNIQUE must (those fail the copy above).
            let broken: i64 = conn.query_row(
                "SELECT count(*) FROM pragma_foreign_key_check(?1)",
                [name],
                |r| r.get(0),
            )?;
            if broken > 0 {
                return Err(MigrateError::Apply {
                    table: name.clone(),
                    message: format!(
                        "{broken} stored row(s) break its foreign keys: fix or delete them first, or drop the new REFERENCES"
                    ),
                });
            }
        }
        for (trigger, sql) in &triggers {
            let exists: bool = conn.query_row(
                "SELECT EXISTS (SELECT 1 FROM main.sqlite_schema WHERE type = 'trigger' AND name = ?1)",
                [trigger],
                |r| r.get(0),
            )?;
            if !exists {
                conn.execute_batch(sql).map_err(|e| MigrateError::Apply {
                    table: name.clone(),
                    message: format!("trigger '{trigger}' no longer compiles: {e}"),
                })?;
            }
        }
    }
    for step in &plan.steps {
        match step {
            Step::CreateTable { table } if !plan.recreated.contains(table) => {
                let t = schema
                    .table(table)
                    .expect("a created table is in the schema");
                conn.execute_batch(&t.create_sql)
                    .map_err(apply_error(table))?;
            }
            Step::DropIndex { table, index } if !plan.rebuilt.contains_key(table) => {
                conn.execute_batch(&format!("DROP INDEX main.{}", ident(index)))
                    .map_err(apply_error(table))?;
            }
            Step::CreateIndex { table, index } if !plan.rebuilt.contains_key(table) => {
                let t = schema
                    .table(table)
                    .expect("an indexed table is in the schema");
                let scratch = Connection::open_in_memory()?;
                scratch.execute_batch(&t.create_sql)?;
                let sql: String = scratch.query_row(
                    "SELECT sql FROM sqlite_schema WHERE type = 'index' AND name = ?1",
                    [index],
                    |r| r.get(0),
                )?;
                conn.execute_batch(&sql).map_err(apply_error(table))?;
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema(version: u64, tables: &[(&str, &str)]) -> Schema {
        let mut toml = format!("version = {version}\n");
        for (name, create) in tables {
            toml.push_str(&format!("[tables.{name}]\ncreate = \"\"\"{create}\"\"\"\n"));
        }
        Schema::parse(&toml).unwrap()
    }

    /// A database brought to `from`, then the plan to `to`.
    fn plan_between(from: &Schema, to: &Schema) -> (Connection, Result<Plan, MigrateError>) {
        let conn = Connection::open_in_memory().unwrap();
        let first = plan(&conn, None, from).unwrap();
        apply(&conn, from, &first).unwrap();
        let next = plan(&conn, Some(from), to);
        (conn, next)
    }

    #[test]
    fn constants_are_told_from_expressions() {
        for yes in [
            "0", "-1", "+2.5", "1e3", "'x'", "'it''s'", "NULL", "true", "X'00ff'",
        ] {
            assert!(constant_default(yes), "{yes}");
        }
        for no in [
            "'x' || random() || 'x'",
            "'' || datetime('now') || ''",
            "X'00' || randomblob(2) || X'00'",
            "(1 + 1)",
            "CURRENT_TIMESTAMP",
            "current_date",
            "random()",
            "inf",
            "NaN",
            "",
        ] {
            assert!(!constant_default(no), "{no}");
        }
    }

    #[test]
    fn added_columns_take_their_default_in_existing_rows_and_dropped_ones_go() {
        let v1 = schema(
            1,
            &[(
                "t",
                "CREATE TABLE t (id TEXT PRIMARY KEY, a TEXT, b INTEGER)",
            )],
        );
        let v2 = schema(
            2,
            &[(
                "t",
                "CREATE TABLE t (id TEXT PRIMARY KEY, a TEXT, b INTEGER, c INTEGER NOT NULL DEFAULT 5)",
            )],
        );
        let (conn, p) = plan_between(&v1, &v2);
        conn.execute("INSERT INTO t (id, a, b) VALUES ('k', 'x', 1)", [])
            .unwrap();
        let p = p.unwrap();
        assert_eq!(
            p.steps,
            vec![Step::AddColumn {
                table: "t".into(),
                column: "c".into(),
                default: Value::Integer(5)
            }]
        );
        apply(&conn, &v2, &p).unwrap();
        let c: i64 = conn
            .query_row("SELECT c FROM t WHERE id = 'k'", [], |r| r.get(0))
            .unwrap();
        assert_eq!(c, 5);
        let t = v2.table("t").unwrap();
        assert_eq!(
            p.remap_row(
                Some(t),
                "t",
                vec![Value::Text("k".into()), Value::Null, Value::Integer(1)]
            ),
            Some(vec![
                Value::Text("k".into()),
                Value::Null,
                Value::Integer(1),
                Value::Integer(5)
            ])
        );
        let v3 = schema(
            3,
            &[(
                "t",
                "CREATE TABLE t (id TEXT PRIMARY KEY, b INTEGER, c INTEGER NOT NULL DEFAULT 5)",
            )],
        );
        let p3 = plan(&conn, Some(&v2), &v3).unwrap();
        assert_eq!(
            p3.steps,
            vec![Step::DropColumn {
                table: "t".into(),
                column: "a".into()
            }]
        );
        assert_eq!(
            p3.index_map(v3.table("t").unwrap(), "t"),
            Some(vec![Some(0), None, Some(1), Some(2)])
        );
        apply(&conn, &v3, &p3).unwrap();
        let row: (String, i64, i64) = conn
            .query_row("SELECT * FROM t", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .unwrap();
        assert_eq!(row, ("k".into(), 1, 5));
        // Brought to the schema, the database needs nothing more.
        assert!(plan(&conn, Some(&v3), &v3).unwrap().is_empty());
    }

    #[test]
    fn renames_and_changes_of_type_or_key_are_refused() {
        let v1 = schema(1, &[("t", "CREATE TABLE t (id TEXT PRIMARY KEY, a TEXT)")]);
        let cases = [
            (
                "CREATE TABLE t (id TEXT PRIMARY KEY, b TEXT)",
                "is gone and column 'b' is new",
            ),
            (
                "CREATE TABLE t (id TEXT PRIMARY KEY, a INTEGER)",
                "its type changes from TEXT to INTEGER",
            ),
            (
                "CREATE TABLE t (id TEXT, a TEXT PRIMARY KEY)",
                "its primary key changes from 'id' to 'a'",
            ),
            (
                "CREATE TABLE t (id TEXT PRIMARY KEY, a TEXT, n TEXT NOT NULL)",
                "NOT NULL without a DEFAULT",
            ),
            (
                "CREATE TABLE t (id TEXT PRIMARY KEY, a TEXT, n TEXT NOT NULL DEFAULT NULL)",
                "NULL DEFAULT",
            ),
        ];
        for (create, said) in cases {
            let (_, p) = plan_between(&v1, &schema(2, &[("t", create)]));
            let e = p.unwrap_err().to_string();
            assert!(e.contains(said), "{create}: {e}");
        }
        let (_, p) = plan_between(
            &v1,
            &schema(2, &[("u", "CREATE TABLE u (id TEXT PRIMARY KEY, a TEXT)")]),
        );
        assert_eq!(
            p.unwrap_err(),
            MigrateError::TableRename {
                gone: "t".into(),
                new: "u".into()
            }
        );
    }

    #[test]
    fn a_new_check_is_a_rebuild_that_existing_rows_must_pass() {
        let v1 = schema(
            1,
            &[("t", "CREATE TABLE t (id TEXT PRIMARY KEY, n INTEGER)")],
        );
        let v2 = schema(
            2,
            &[(
                "t",
                "CREATE TABLE t (id TEXT PRIMARY KEY, n INTEGER CHECK (n > 0))",
            )],
        );
        let (conn, p) = plan_between(&v1, &v2);
        let p = p.unwrap();
        assert_eq!(p.steps, vec![Step::Rebuild { table: "t".into() }]);
        conn.execute("INSERT INTO t VALUES ('k', -1)", []).unwrap();
        conn.execute_batch("BEGIN").unwrap();
        let e = apply(&conn, &v2, &p).unwrap_err().to_string();
        conn.execute_batch("ROLLBACK").unwrap();
        assert!(
            e.contains("table 't': the rows already stored do not fit"),
            "{e}"
        );
        let n: i64 = conn.query_row("SELECT n FROM t", [], |r| r.get(0)).unwrap();
        assert_eq!(n, -1, "the rollback kept the row");
    }
}
