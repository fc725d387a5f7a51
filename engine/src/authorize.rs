//! What the app's SQL may do, as allow lists for SQLite's authorizer.
//!
//! `query` may only read. `exec` may change the data of the app's tables
//! and make, change or drop its own local (unsynced) tables, views and
//! indexes, but never control the transaction (one exec is one
//! transaction, and Hearth's outbox depends on it), attach databases,
//! change the schema of a synced table (that comes from the schema file),
//! set pragmas that change behaviour, or touch Hearth's own tables and
//! triggers, temp ones included. Everything not listed is refused, so an
//! action SQLite adds later is refused until it is thought about.

use std::collections::HashSet;

use rusqlite::hooks::{AuthAction, AuthContext};

/// Pragmas that only describe the database, with or without an argument
/// (the argument names a table or an index).
const INTROSPECTION_PRAGMAS: &[&str] = &[
    "table_info",
    "table_xinfo",
    "table_list",
    "index_list",
    "index_info",
    "index_xinfo",
    "foreign_key_list",
    "foreign_key_check",
    "integrity_check",
    "quick_check",
    "database_list",
    "collation_list",
    "function_list",
    "module_list",
    "pragma_list",
    "compile_options",
];

/// Pragmas that are settings: reading one is fine, setting one is not.
const SETTING_PRAGMAS: &[&str] = &[
    "application_id",
    "auto_vacuum",
    "busy_timeout",
    "cache_size",
    "data_version",
    "encoding",
    "foreign_keys",
    "freelist_count",
    "journal_mode",
    "page_count",
    "page_size",
    "recursive_triggers",
    "schema_version",
    "synchronous",
    "user_version",
];

fn pragma(name: &str, value: Option<&str>) -> Option<String> {
    let name = name.to_ascii_lowercase();
    if INTROSPECTION_PRAGMAS.contains(&name.as_str())
        || (value.is_none() && SETTING_PRAGMAS.contains(&name.as_str()))
    {
        None
    } else if value.is_some() {
        Some(format!(
            "PRAGMA {name} with an argument changes the database or how it behaves, which Hearth manages"
        ))
    } else {
        Some(format!("PRAGMA {name} is not one Hearth lets the app run"))
    }
}

fn hearths(name: &str) -> bool {
    name.starts_with("_hearth")
}

/// Why `query` must not run this, or None when it only reads.
pub(crate) fn query(ctx: &AuthContext<'_>) -> Option<String> {
    match ctx.action {
        AuthAction::Read { .. }
        | AuthAction::Select
        | AuthAction::Function { .. }
        | AuthAction::Recursive => None,
        AuthAction::Pragma {
            pragma_name,
            pragma_value,
        } => pragma(pragma_name, pragma_value),
        AuthAction::Transaction { .. } | AuthAction::Savepoint { .. } => Some(
            "query only reads: transaction control is Hearth's (one exec is one transaction)"
                .into(),
        ),
        _ => Some("query only reads: use exec to write".into()),
    }
}

/// Why `exec` must not run this, or None when it may. `synced` names the
/// schema's tables.
pub(crate) fn exec(ctx: &AuthContext<'_>, synced: &HashSet<String>) -> Option<String> {
    // Hearth's own capture triggers run inside the app's statements and
    // write Hearth's temp tables; they are the one accessor allowed to.
    if ctx.accessor.is_some_and(hearths) {
        return None;
    }
    let schema_change = |table: &str, what: &str| -> Option<String> {
        if hearths(table) {
            Some(format!("{table} is Hearth's own: {what} is refused"))
        } else if synced.contains(table) {
            Some(format!(
                "table {table} is synced: its schema comes from the schema file ({what} is refused)"
            ))
        } else {
            None
        }
    };
    match ctx.action {
        AuthAction::Read { .. }
        | AuthAction::Select
        | AuthAction::Function { .. }
        | AuthAction::Recursive
        | AuthAction::Analyze { .. }
        | AuthAction::Reindex { .. } => None,
        AuthAction::Insert { table_name }
        | AuthAction::Update { table_name, .. }
        | AuthAction::Delete { table_name } => {
            if hearths(table_name) {
                Some(format!(
                    "table {table_name} is Hearth's own and cannot be written"
                ))
            } else {
                None
            }
        }
        AuthAction::CreateTable { table_name }
        | AuthAction::CreateTempTable { table_name }
        | AuthAction::DropTable { table_name }
        | AuthAction::DropTempTable { table_name } => {
            schema_change(table_name, "creating or dropping it")
        }
        AuthAction::AlterTable { table_name, .. } => schema_change(table_name, "ALTER TABLE"),
        AuthAction::CreateIndex {
            index_name,
            table_name,
        }
        | AuthAction::CreateTempIndex {
            index_name,
            table_name,
        }
        | AuthAction::DropIndex {
            index_name,
            table_name,
        }
        | AuthAction::DropTempIndex {
            index_name,
            table_name,
        } => schema_change(table_name, "changing its indexes")
            .or_else(|| hearths(index_name).then(|| format!("index {index_name} is Hearth's own"))),
        AuthAction::CreateTrigger {
            trigger_name,
            table_name,
        }
        | AuthAction::CreateTempTrigger {
            trigger_name,
            table_name,
        }
        | AuthAction::DropTrigger {
            trigger_name,
            table_name,
        }
        | AuthAction::DropTempTrigger {
            trigger_name,
            table_name,
        } => {
            if hearths(trigger_name) {
                Some(format!("trigger {trigger_name} is Hearth's own"))
            } else {
                schema_change(table_name, "changing its triggers")
            }
        }
        AuthAction::CreateView { view_name }
        | AuthAction::CreateTempView { view_name }
        | AuthAction::DropView { view_name }
        | AuthAction::DropTempView { view_name } => {
            hearths(view_name).then(|| format!("{view_name} is Hearth's own"))
        }
        AuthAction::Pragma {
            pragma_name,
            pragma_value,
        } => pragma(pragma_name, pragma_value),
        AuthAction::Transaction { .. } | AuthAction::Savepoint { .. } => {
            Some("transaction control is Hearth's: one exec is one transaction".into())
        }
        AuthAction::Attach { .. } | AuthAction::Detach { .. } => {
            Some("attaching databases is refused: Hearth syncs this database only".into())
        }
        _ => Some("this kind of statement is not one Hearth lets the app run".into()),
    }
}
