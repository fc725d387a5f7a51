//! The app's schema: which tables sync and how they merge.
//!
//! A schema is one TOML file (see the README for the format). It is checked
//! by really running each table's `CREATE` statement in a scratch in-memory
//! SQLite database and reading back what SQLite made of it, so the column
//! list and the primary key are SQLite's own view, not a parse of ours.

use std::collections::BTreeMap;

use rusqlite::{Connection, OptionalExtension};
use serde::Deserialize;

use crate::filter::Filter;

/// How concurrent writes to one column are merged.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum MergePolicy {
    /// Last writer wins, by hybrid logical clock, ties broken by client id.
    Lww,
    /// Concurrent increments add up.
    Counter,
    /// A JSON array merged as an add-wins set.
    Set,
    /// Collaborative text merged character by character.
    Text,
    /// Concurrent edits become a conflict the app resolves.
    Manual,
}

impl MergePolicy {
    const NAMES: &'static str = "lww, counter, set, text, manual";

    fn parse(name: &str) -> Option<MergePolicy> {
        Some(match name {
            "lww" => MergePolicy::Lww,
            "counter" => MergePolicy::Counter,
            "set" => MergePolicy::Set,
            "text" => MergePolicy::Text,
            "manual" => MergePolicy::Manual,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            MergePolicy::Lww => "lww",
            MergePolicy::Counter => "counter",
            MergePolicy::Set => "set",
            MergePolicy::Text => "text",
            MergePolicy::Manual => "manual",
        }
    }

    /// Whether a column of this SQLite declared type can hold what the
    /// policy merges (by SQLite's affinity rules: INT means INTEGER
    /// affinity; CHAR, CLOB or TEXT mean TEXT affinity). `None` if it fits.
    fn misfit(self, declared_type: &str) -> Option<&'static str> {
        let t = declared_type.to_ascii_uppercase();
        let integer = t.contains("INT");
        let text = !integer && (t.contains("CHAR") || t.contains("CLOB") || t.contains("TEXT"));
        match self {
            MergePolicy::Counter if !integer => {
                Some("a counter needs a column of INTEGER type (it adds whole numbers)")
            }
            MergePolicy::Set if !text => {
                Some("a set needs a column of TEXT type (it holds a JSON array)")
            }
            MergePolicy::Text if !text => Some("text needs a column of TEXT type"),
            _ => None,
        }
    }
}

/// What a concurrent update does to a deleted row, per table.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub enum OnDelete {
    /// An update made without having seen the delete does nothing.
    #[default]
    DeleteWins,
    /// An update made without having seen the delete brings the row back,
    /// with the updated columns and the last values of the others; a delete
    /// made without having seen the row's latest update does nothing.
    UpdateWins,
}

impl OnDelete {
    pub fn name(self) -> &'static str {
        match self {
            OnDelete::DeleteWins => "delete-wins",
            OnDelete::UpdateWins => "update-wins",
        }
    }
}

/// The table the server records manual-merge conflicts in; every device
/// receives it. Present in a schema exactly when a column is `manual`.
pub const CONFLICTS_TABLE: &str = "hearth_conflicts";

const CONFLICTS_CREATE: &str = "CREATE TABLE hearth_conflicts (
  id          TEXT PRIMARY KEY,
  table_name  TEXT NOT NULL,
  row_key     TEXT NOT NULL,
  column_name TEXT NOT NULL,
  candidates  TEXT NOT NULL,
  base_value  TEXT,
  opened_at   INTEGER NOT NULL
)";

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SchemaError {
    #[error("schema file is not valid TOML or has an unknown key: {0}")]
    Toml(String),
    #[error("[auth]: {0}")]
    Auth(String),
    #[error("schema has no tables: add at least one [tables.NAME] section")]
    NoTables,
    #[error("table '{table}': {problem}")]
    Table { table: String, problem: String },
    #[error("stream '{stream}': {message}")]
    Stream { stream: String, message: String },
    #[error("schema has {count} streams; at most {max} are allowed", max = STREAMS_MAX)]
    TooManyStreams { count: usize },
}

fn stream_error(stream: &str, message: impl Into<String>) -> SchemaError {
    SchemaError::Stream {
        stream: stream.to_string(),
        message: message.into(),
    }
}

/// The most streams a schema may declare.
pub const STREAMS_MAX: usize = 64;
/// The longest stream name, in bytes.
pub const STREAM_NAME_MAX: usize = 64;

fn table_error(table: &str, problem: impl Into<String>) -> SchemaError {
    SchemaError::Table {
        table: table.to_string(),
        problem: problem.into(),
    }
}

/// The most columns a synced table may have: change capture keeps a bit mask
/// of changed columns in one SQLite integer.
pub const COLUMNS_MAX: usize = 63;

#[derive(Clone, Debug, PartialEq)]
pub struct Column {
    pub name: String,
    /// SQLite's declared type, as written in the `CREATE` statement.
    pub declared_type: String,
    pub policy: MergePolicy,
    /// Bounds of a `counter` column (inclusive); `None` is unbounded.
    pub min: Option<i64>,
    pub max: Option<i64>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Table {
    pub name: String,
    /// The table's statements exactly as the schema file gives them.
    pub create_sql: String,
    pub policy: MergePolicy,
    /// Columns in SQLite's order (`PRAGMA table_info`).
    pub columns: Vec<Column>,
    /// Index of the primary key column in `columns`.
    pub pk: usize,
    pub on_delete: OnDelete,
}

impl Table {
    pub fn pk_name(&self) -> &str {
        &self.columns[self.pk].name
    }

    pub fn column_index(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c.name == name)
    }

    /// Whether every synced column is last-writer-wins.
    pub fn all_lww(&self) -> bool {
        self.columns.iter().all(|c| c.policy == MergePolicy::Lww)
    }

    /// Whether this is Hearth's conflicts table, which only the server writes.
    pub fn is_conflicts(&self) -> bool {
        self.name == CONFLICTS_TABLE
    }
}

/// A named, parameterised subscription to some rows of one table
/// (`[streams.NAME]` in the schema file).
#[derive(Clone, Debug, PartialEq)]
pub struct Stream {
    pub name: String,
    /// The table's name as the schema's `tables` spells it.
    pub table: String,
    /// Which rows: the stream's `where` (every row when it has none).
    pub filter: Filter,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Schema {
    pub version: u64,
    /// Tables by name; the map's order is the order capture numbers them in.
    pub tables: BTreeMap<String, Table>,
    /// Streams by name. A table that a stream names syncs only through
    /// subscriptions ([`Schema::streamed`]).
    pub streams: BTreeMap<String, Stream>,
    /// The TOML text this schema was parsed from; it is what the server sends
    /// to a device that needs the schema.
    pub source: String,
    /// How tokens are checked (`[auth]`); None: no identity, everyone may
    /// read and write everything.
    pub auth: Option<crate::rules::Auth>,
    /// Per table, its `rules` (only under `[auth]`); a table missing here
    /// has none, which denies every action under `[auth]`.
    pub rules: BTreeMap<String, crate::rules::TableRules>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSchema {
    version: u64,
    #[serde(default)]
    tables: BTreeMap<String, RawTable>,
    /// Read per stream, so that an error names the stream.
    #[serde(default)]
    streams: BTreeMap<String, toml::Value>,
    #[serde(default)]
    auth: Option<crate::rules::Auth>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStream {
    table: String,
    #[serde(default, rename = "where")]
    condition: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTable {
    create: String,
    #[serde(default = "default_merge")]
    merge: String,
    #[serde(default)]
    on_delete: Option<String>,
    /// Per column: a policy name, or a table `{ merge = NAME, min, max }`.
    #[serde(default)]
    columns: BTreeMap<String, toml::Value>,
    #[serde(default)]
    rules: Option<crate::rules::RawRules>,
}

fn default_merge() -> String {
    "lww".to_string()
}

/// Quotes an SQL identifier.
pub fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

impl Schema {
    pub fn parse(source: &str) -> Result<Schema, SchemaError> {
        let raw: RawSchema =
            toml::from_str(source).map_err(|e| SchemaError::Toml(e.to_string()))?;
        if raw.tables.is_empty() {
            return Err(SchemaError::NoTables);
        }
        let mut tables = BTreeMap::new();
        let mut raw_rules = BTreeMap::new();
        for (name, mut raw_table) in raw.tables {
            if let Some(rules) = raw_table.rules.take() {
                raw_rules.insert(name.clone(), rules);
            }
            if name.eq_ignore_ascii_case(CONFLICTS_TABLE) {
                return Err(table_error(
                    &name,
                    "this name is reserved for the conflicts of manual-merge columns",
                ));
            }
            let table = check_table(&name, raw_table)?;
            tables.insert(name, table);
        }
        let manual = tables
            .values()
            .any(|t| t.columns.iter().any(|c| c.policy == MergePolicy::Manual));
        if manual {
            let raw = RawTable {
                create: CONFLICTS_CREATE.to_string(),
                merge: default_merge(),
                on_delete: None,
                columns: BTreeMap::new(),
                rules: None,
            };
            tables.insert(
                CONFLICTS_TABLE.to_string(),
                check_table(CONFLICTS_TABLE, raw)?,
            );
        }
        check_foreign_keys(&tables)?;
        if raw.streams.len() > STREAMS_MAX {
            return Err(SchemaError::TooManyStreams {
                count: raw.streams.len(),
            });
        }
        let mut streams = BTreeMap::new();
        for (name, raw_stream) in raw.streams {
            let stream = check_stream(&name, raw_stream, &tables)?;
            streams.insert(name, stream);
        }
        let rules = check_rules(raw.auth.as_ref(), raw_rules, &tables)?;
        Ok(Schema {
            version: raw.version,
            tables,
            streams,
            source: source.to_string(),
            auth: raw.auth,
            rules,
        })
    }

    /// Whether a stream names the table: such a table syncs only through
    /// subscriptions to its streams.
    pub fn streamed(&self, table: &str) -> bool {
        self.streams_of(table).next().is_some()
    }

    /// The streams over a table, by name.
    pub fn streams_of<'a>(&'a self, table: &'a str) -> impl Iterator<Item = &'a Stream> + 'a {
        self.streams.values().filter(move |s| s.table == table)
    }

    /// Whether the server checks identity (`[auth]`).
    pub fn authed(&self) -> bool {
        self.auth.is_some()
    }

    /// The read rule that filters a table's rows, if one does (under
    /// `[auth]`, every table but those whose read rule is TRUE; a table with
    /// no read rule is filtered to nothing, see [`Schema::readable_by_none`]).
    pub fn read_rule(&self, table: &str) -> Option<&crate::rules::ReadRule> {
        self.rules
            .get(table)
            .and_then(|r| r.read.as_ref())
            .filter(|r| !r.is_true())
    }

    /// Under `[auth]`, a table no device may read (it has no read rule).
    pub fn readable_by_none(&self, table: &str) -> bool {
        self.authed() && self.rules.get(table).is_none_or(|r| r.read.is_none())
    }

    /// Whether a table's rows are routed row by row (a stream names it, or
    /// a read rule filters it) rather than sent whole to every device.
    pub fn filtered(&self, table: &str) -> bool {
        self.streamed(table) || self.read_rule(table).is_some() || self.readable_by_none(table)
    }

    /// Whether some read rule looks rows of this table up: its changes can
    /// change what a device may read.
    pub fn looked_up(&self, table: &str) -> bool {
        self.rules
            .values()
            .filter_map(|r| r.read.as_ref())
            .any(|r| r.lookups.iter().any(|l| l.table == table))
    }

    pub fn table(&self, name: &str) -> Option<&Table> {
        self.tables.get(name)
    }

    /// Tables in capture order, with their capture number.
    pub fn numbered(&self) -> impl Iterator<Item = (usize, &Table)> {
        self.tables.values().enumerate()
    }
}

/// A foreign key must point at a synced table (the server and every device
/// hold only those), at columns SQLite can use as a parent key (the primary
/// key, or columns with a UNIQUE index), or every write to the table would
/// fail on the device.
/// Compiles the tables' rules: read rules in the condition language with
/// claims and lookups, write rules prepared as SQLite statements against
/// every table (so a rule naming an unknown column or table, or with bad
/// syntax, stops `serve` naming its table and action).
fn check_rules(
    auth: Option<&crate::rules::Auth>,
    raw: BTreeMap<String, crate::rules::RawRules>,
    tables: &BTreeMap<String, Table>,
) -> Result<BTreeMap<String, crate::rules::TableRules>, SchemaError> {
    use crate::rules::{Action, ReadRule, TableRules, WriteRule};
    let Some(auth) = auth else {
        if let Some(table) = raw.keys().next() {
            return Err(table_error(
                table,
                "has rules, but the schema has no [auth] section: rules need identity (add [auth] with hs256_secret_env or jwks_file)",
            ));
        }
        return Ok(BTreeMap::new());
    };
    if auth.hs256_secret_env.is_some() == auth.jwks_file.is_some() {
        return Err(SchemaError::Auth(
            "needs exactly one of hs256_secret_env (the environment variable holding an HS256 secret) or jwks_file (a JSON Web Key Set for RS256, ES256 or EdDSA)".into(),
        ));
    }
    for table in tables.values() {
        if let Some(column) = table
            .columns
            .iter()
            .find(|c| c.policy == MergePolicy::Manual)
        {
            return Err(table_error(
                &table.name,
                format!(
                    "column '{}' merges manually, which is not available under [auth] yet: the conflicts table would show every device the values of rows it may not read",
                    column.name
                ),
            ));
        }
    }
    let scratch = Connection::open_in_memory().map_err(|e| SchemaError::Toml(e.to_string()))?;
    for table in tables.values() {
        scratch
            .execute_batch(&table.create_sql)
            .map_err(|e| table_error(&table.name, format!("create statement failed: {e}")))?;
    }
    let mut out = BTreeMap::new();
    for (name, raw) in raw {
        let Some(table) = tables.get(&name) else {
            continue;
        };
        let read = raw
            .read
            .as_deref()
            .map(|src| ReadRule::compile(src, table, tables))
            .transpose()
            .map_err(|e| table_error(&name, format!("read rule: {e}")))?;
        let rules = TableRules {
            read,
            insert: raw.insert,
            update: raw.update,
            delete: raw.delete,
        };
        for action in [Action::Insert, Action::Update, Action::Delete] {
            let Some(src) = rules.write(action) else {
                continue;
            };
            let rule = WriteRule::new(src, table);
            scratch.prepare(&rule.sql).map_err(|e| {
                table_error(
                    &name,
                    format!("{} rule `{src}` cannot be evaluated: {e}", action.name()),
                )
            })?;
        }
        // Kept as written; the server prepares them again on its store.
        out.insert(name, rules);
    }
    Ok(out)
}

fn check_foreign_keys(tables: &BTreeMap<String, Table>) -> Result<(), SchemaError> {
    let scratch = Connection::open_in_memory().map_err(|e| SchemaError::Toml(e.to_string()))?;
    for table in tables.values() {
        scratch
            .execute_batch(&table.create_sql)
            .map_err(|e| table_error(&table.name, format!("create statement failed: {e}")))?;
    }
    for table in tables.values() {
        let parents: Vec<String> = scratch
            .prepare("SELECT DISTINCT \"table\" FROM pragma_foreign_key_list(?1)")
            .and_then(|mut stmt| {
                stmt.query_map([&table.name], |r| r.get(0))?
                    .collect::<Result<_, _>>()
            })
            .map_err(|e| table_error(&table.name, e.to_string()))?;
        for parent in parents {
            if !tables.contains_key(&parent) {
                return Err(table_error(
                    &table.name,
                    format!("has a foreign key to '{parent}', which is not a table of this schema"),
                ));
            }
        }
        scratch
            .prepare(&format!("PRAGMA foreign_key_check({})", ident(&table.name)))
            .and_then(|mut stmt| stmt.query([]).map(|_| ()))
            .map_err(|e| table_error(&table.name, format!("bad foreign key: {e}")))?;
    }
    Ok(())
}

fn check_stream(
    name: &str,
    raw: toml::Value,
    tables: &BTreeMap<String, Table>,
) -> Result<Stream, SchemaError> {
    let name_ok = (1..=STREAM_NAME_MAX).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-:.".contains(&b));
    if !name_ok {
        return Err(stream_error(
            name,
            format!("a stream name is 1 to {STREAM_NAME_MAX} ASCII letters, digits, '_', '-', ':' or '.'"),
        ));
    }
    let raw: RawStream = raw
        .try_into()
        .map_err(|e: toml::de::Error| stream_error(name, e.message().trim().to_string()))?;
    let lower = raw.table.to_ascii_lowercase();
    if lower == CONFLICTS_TABLE || lower.starts_with("_hearth") || lower.starts_with("sqlite_") {
        return Err(stream_error(
            name,
            format!(
                "table '{}' is Hearth's own (every device gets all of it): it cannot be streamed",
                raw.table
            ),
        ));
    }
    // SQLite's table names ignore ASCII case.
    let Some(table) = tables
        .values()
        .find(|t| t.name.eq_ignore_ascii_case(&raw.table))
    else {
        return Err(stream_error(
            name,
            format!(
                "unknown table '{}' (the schema's tables are {})",
                raw.table,
                tables
                    .keys()
                    .map(String::as_str)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    };
    let filter = Filter::compile(raw.condition.as_deref().unwrap_or("TRUE"), table)
        .map_err(|e| stream_error(name, format!("where: {e}")))?;
    Ok(Stream {
        name: name.to_string(),
        table: table.name.clone(),
        filter,
    })
}

fn check_table(name: &str, raw: RawTable) -> Result<Table, SchemaError> {
    // SQLite's table names ignore ASCII case.
    let lower = name.to_ascii_lowercase();
    if lower.starts_with("_hearth") || lower.starts_with("sqlite_") {
        return Err(table_error(
            name,
            "names starting with '_hearth' or 'sqlite_' are reserved",
        ));
    }
    let policy = MergePolicy::parse(&raw.merge).ok_or_else(|| {
        table_error(
            name,
            format!(
                "unknown merge policy '{}' (expected one of {})",
                raw.merge,
                MergePolicy::NAMES
            ),
        )
    })?;
    let on_delete = match raw.on_delete.as_deref() {
        None | Some("delete-wins") => OnDelete::DeleteWins,
        Some("update-wins") => OnDelete::UpdateWins,
        Some(other) => {
            return Err(table_error(
                name,
                format!("unknown on_delete rule '{other}' (expected delete-wins or update-wins)"),
            ))
        }
    };

    let scratch = Connection::open_in_memory().map_err(|e| table_error(name, e.to_string()))?;
    scratch
        .execute_batch(&raw.create)
        .map_err(|e| table_error(name, format!("create statement failed: {e}")))?;
    let created: Vec<String> = {
        let mut stmt = scratch
            .prepare("SELECT name FROM sqlite_schema WHERE type = 'table' ORDER BY name")
            .map_err(|e| table_error(name, e.to_string()))?;
        let rows = stmt
            .query_map([], |r| r.get(0))
            .map_err(|e| table_error(name, e.to_string()))?;
        rows.collect::<Result<_, _>>()
            .map_err(|e| table_error(name, e.to_string()))?
    };
    if created != [name.to_string()] {
        return Err(table_error(
            name,
            format!("create must make exactly one table named '{name}' (indexes are fine); it made {created:?}"),
        ));
    }

    let mut columns = Vec::new();
    let mut pks = Vec::new();
    {
        let mut stmt = scratch
            .prepare(&format!("PRAGMA table_info({})", ident(name)))
            .map_err(|e| table_error(name, e.to_string()))?;
        let mut rows = stmt
            .query([])
            .map_err(|e| table_error(name, e.to_string()))?;
        while let Some(row) = rows.next().map_err(|e| table_error(name, e.to_string()))? {
            let col_name: String = row.get(1).map_err(|e| table_error(name, e.to_string()))?;
            let declared_type: String = row.get(2).map_err(|e| table_error(name, e.to_string()))?;
            let pk_pos: i64 = row.get(5).map_err(|e| table_error(name, e.to_string()))?;
            if pk_pos > 0 {
                pks.push(columns.len());
            }
            columns.push(Column {
                name: col_name,
                declared_type,
                policy: if pk_pos > 0 { MergePolicy::Lww } else { policy },
                min: None,
                max: None,
            });
        }
    }
    let pk = match pks.as_slice() {
        [one] => *one,
        [] => return Err(table_error(name, "a synced table needs a one-column PRIMARY KEY")),
        _ => {
            return Err(table_error(
                name,
                "composite primary keys are not supported: use a one-column PRIMARY KEY (INTEGER or TEXT)",
            ))
        }
    };
    let pk_type = columns[pk].declared_type.to_ascii_uppercase();
    if !(pk_type.contains("INT") || pk_type.contains("TEXT") || pk_type.contains("CHAR")) {
        return Err(table_error(
            name,
            format!(
                "primary key '{}' has type '{}': supported primary key types are INTEGER and TEXT",
                columns[pk].name, columns[pk].declared_type
            ),
        ));
    }
    // Rows are told apart by their key's bytes on every device and in the
    // server's bookkeeping; a key collation (NOCASE, RTRIM) would make SQLite
    // take two keys Hearth keeps apart for one row.
    let key_collation: Option<String> = scratch
        .query_row(
            "SELECT x.coll FROM pragma_index_list(?1) l, pragma_index_xinfo(l.name) x
             WHERE l.origin = 'pk' AND x.key AND x.cid >= 0",
            [name],
            |r| r.get(0),
        )
        .optional()
        .map_err(|e| table_error(name, e.to_string()))?;
    if let Some(coll) = key_collation.filter(|c| !c.eq_ignore_ascii_case("BINARY")) {
        return Err(table_error(
            name,
            format!(
                "primary key '{}' has collation {coll}: keys are compared byte for byte, so the primary key must use the default BINARY collation",
                columns[pk].name
            ),
        ));
    }
    if columns.len() > COLUMNS_MAX {
        return Err(table_error(
            name,
            format!(
                "has {} columns; a synced table may have at most {COLUMNS_MAX}",
                columns.len()
            ),
        ));
    }

    for (col_name, entry) in &raw.columns {
        // SQLite's column names ignore ASCII case.
        let Some(idx) = columns
            .iter()
            .position(|c| c.name.eq_ignore_ascii_case(col_name))
        else {
            return Err(table_error(
                name,
                format!("columns names '{col_name}', which the table does not have"),
            ));
        };
        let column_error =
            |problem: String| table_error(name, format!("column '{col_name}': {problem}"));
        let (policy_name, min, max) = match entry {
            toml::Value::String(s) => (s.clone(), None, None),
            toml::Value::Table(t) => {
                let mut policy_name = None;
                let (mut min, mut max) = (None, None);
                for (key, value) in t {
                    match (key.as_str(), value) {
                        ("merge", toml::Value::String(s)) => policy_name = Some(s.clone()),
                        ("min", toml::Value::Integer(i)) => min = Some(*i),
                        ("max", toml::Value::Integer(i)) => max = Some(*i),
                        ("merge" | "min" | "max", other) => {
                            return Err(column_error(format!(
                                "'{key}' must be {}, not {}",
                                if key == "merge" {
                                    "a policy name"
                                } else {
                                    "an integer"
                                },
                                other.type_str()
                            )))
                        }
                        _ => {
                            return Err(column_error(format!(
                                "unknown option '{key}' (expected merge, min, max)"
                            )))
                        }
                    }
                }
                let policy_name = policy_name.ok_or_else(|| {
                    column_error(
                        "options need a policy too, e.g. { merge = \"counter\", min = 0 }".into(),
                    )
                })?;
                (policy_name, min, max)
            }
            other => {
                return Err(column_error(format!(
                    "expected a policy name or {{ merge = NAME, ... }}, not {}",
                    other.type_str()
                )))
            }
        };
        let col_policy = MergePolicy::parse(&policy_name).ok_or_else(|| {
            column_error(format!(
                "unknown merge policy '{policy_name}' (expected one of {})",
                MergePolicy::NAMES
            ))
        })?;
        if idx == pk {
            return Err(column_error(
                "it is the primary key, which cannot have a merge policy".into(),
            ));
        }
        if (min.is_some() || max.is_some()) && col_policy != MergePolicy::Counter {
            return Err(column_error(format!(
                "min and max apply to counters only, not to {}",
                col_policy.name()
            )));
        }
        if let (Some(lo), Some(hi)) = (min, max) {
            if lo > hi {
                return Err(column_error(format!("min {lo} is greater than max {hi}")));
            }
        }
        columns[idx].policy = col_policy;
        columns[idx].min = min;
        columns[idx].max = max;
    }
    for (i, column) in columns.iter().enumerate() {
        if i == pk {
            continue;
        }
        if let Some(why) = column.policy.misfit(&column.declared_type) {
            return Err(table_error(
                name,
                format!(
                    "column '{}' ({}) cannot be {}: {why}",
                    column.name,
                    if column.declared_type.is_empty() {
                        "no declared type"
                    } else {
                        &column.declared_type
                    },
                    column.policy.name()
                ),
            ));
        }
    }

    Ok(Table {
        name: name.to_string(),
        create_sql: raw.create,
        policy,
        columns,
        pk,
        on_delete,
    })
}

/// The demo app's schema, built into the `hearth` binary.
pub const DEMO_SCHEMA: &str = r#"# Hearth demo schema: shared todo lists.
# Version 2: todos gained likes (a counter), tags (a set), notes (text edited together)
# and due (merged by hand: concurrent edits open a conflict).
version = 2

[tables.lists]
create = """
CREATE TABLE lists (
  id         TEXT PRIMARY KEY,
  name       TEXT NOT NULL CHECK (length(name) BETWEEN 1 AND 100),
  created_at INTEGER NOT NULL DEFAULT 0
)"""
merge = "lww"

[tables.todos]
create = """
CREATE TABLE todos (
  id      TEXT PRIMARY KEY,
  list_id TEXT NOT NULL,
  title   TEXT NOT NULL CHECK (length(title) BETWEEN 1 AND 200),
  done    INTEGER NOT NULL DEFAULT 0,
  position REAL NOT NULL DEFAULT 0,
  likes   INTEGER NOT NULL DEFAULT 0,
  tags    TEXT NOT NULL DEFAULT '[]',
  notes   TEXT NOT NULL DEFAULT '',
  due     TEXT
);
CREATE INDEX todos_by_list ON todos (list_id, position)"""
merge = "lww"
columns = { likes = { merge = "counter", min = 0 }, tags = "set", notes = "text", due = "manual" }
"#;

#[cfg(test)]
mod tests {
    use super::*;

    fn err(src: &str) -> String {
        Schema::parse(src).unwrap_err().to_string()
    }

    #[test]
    fn demo_schema_parses() {
        let s = Schema::parse(DEMO_SCHEMA).unwrap();
        assert_eq!(s.version, 2);
        let todos = s.table("todos").unwrap();
        assert_eq!(todos.pk_name(), "id");
        assert_eq!(todos.columns.len(), 9);
        assert_eq!(todos.columns[3].name, "done");
    }

    #[test]
    fn bad_schemas_name_the_table_and_problem() {
        let e = err("version = 1\n[tables.t]\ncreate = \"CREATE TABLE t (id TEXT PRIMARY KEY, x)\"\nmerge = \"fancy\"\n");
        assert!(
            e.contains("table 't'") && e.contains("unknown merge policy 'fancy'"),
            "{e}"
        );

        let e = err("version = 1\n[tables.t]\ncreate = \"CREATE TABLE t (id TEXT, x)\"\n");
        assert!(e.contains("table 't'") && e.contains("PRIMARY KEY"), "{e}");

        let e = err("version = 1\n[tables.t]\ncreate = \"CREATE TABLE t (id TEXT PRIMARY KEY,\"\n");
        assert!(
            e.contains("table 't'") && e.contains("create statement failed"),
            "{e}"
        );

        let e = err("version = 1\n[tables.t]\ncreate = \"CREATE TABLE t (id TEXT PRIMARY KEY)\"\ncolour = 1\n");
        assert!(e.contains("unknown field") && e.contains("colour"), "{e}");

        let e = err("version = 1\n[tables.t]\ncreate = \"CREATE TABLE u (id TEXT PRIMARY KEY)\"\n");
        assert!(e.contains("exactly one table named 't'"), "{e}");

        let e = err("version = 1\n[tables.t]\ncreate = \"CREATE TABLE t (a TEXT, b TEXT, PRIMARY KEY (a, b))\"\n");
        assert!(e.contains("composite"), "{e}");

        let e = err("version = 1\n[tables.t]\ncreate = \"CREATE TABLE t (id TEXT PRIMARY KEY, n INTEGER)\"\ncolumns = { m = \"lww\" }\n");
        assert!(e.contains("'m'"), "{e}");

        let e = err("version = 1\n[tables.t]\ncreate = \"CREATE TABLE t (id INTEGER PRIMARY KEY, o INTEGER REFERENCES other(id))\"\n");
        assert!(e.contains("table 't'") && e.contains("'other'"), "{e}");

        let e = err("version = 1\n[tables.p]\ncreate = \"CREATE TABLE p (id INTEGER PRIMARY KEY, x)\"\n[tables.t]\ncreate = \"CREATE TABLE t (id INTEGER PRIMARY KEY, o INTEGER REFERENCES p(x))\"\n");
        assert!(
            e.contains("table 't'") && e.contains("foreign key mismatch"),
            "{e}"
        );

        let e = err("version = 1\n[tables.t]\ncreate = \"CREATE TABLE t (id TEXT PRIMARY KEY COLLATE NOCASE, n INTEGER)\"\n");
        assert!(e.contains("collation NOCASE"), "{e}");

        assert_eq!(Schema::parse("version = 1\n"), Err(SchemaError::NoTables));
    }

    const CARDS: &str = "CREATE TABLE cards (id TEXT PRIMARY KEY, title TEXT NOT NULL, likes INTEGER NOT NULL DEFAULT 0, stock INTEGER NOT NULL DEFAULT 0, tags TEXT NOT NULL DEFAULT '[]', body TEXT NOT NULL DEFAULT '', price REAL)";

    fn cards(extra: &str) -> Result<Schema, SchemaError> {
        Schema::parse(&format!(
            "version = 1\n[tables.cards]\ncreate = \"{CARDS}\"\n{extra}\n"
        ))
    }

    #[test]
    fn policies_are_declared_per_column_with_options() {
        let s = cards("merge = \"lww\"\non_delete = \"update-wins\"\ncolumns = { likes = \"counter\", stock = { merge = \"counter\", min = 0 }, tags = \"set\", body = \"text\", price = \"manual\" }").unwrap();
        let t = s.table("cards").unwrap();
        let policy = |c: &str| t.columns[t.column_index(c).unwrap()].policy;
        assert_eq!(policy("likes"), MergePolicy::Counter);
        assert_eq!(policy("tags"), MergePolicy::Set);
        assert_eq!(policy("body"), MergePolicy::Text);
        assert_eq!(policy("price"), MergePolicy::Manual);
        assert_eq!(policy("title"), MergePolicy::Lww);
        let stock = &t.columns[t.column_index("stock").unwrap()];
        assert_eq!((stock.min, stock.max), (Some(0), None));
        assert_eq!(t.on_delete, OnDelete::UpdateWins);
        // A manual column brings the conflicts table, which every device gets.
        let conflicts = s.table(CONFLICTS_TABLE).unwrap();
        assert!(conflicts.is_conflicts() && conflicts.pk_name() == "id");
        assert!(cards("").unwrap().table(CONFLICTS_TABLE).is_none());
    }

    #[test]
    fn policies_that_do_not_fit_name_table_column_and_problem() {
        for (extra, want) in [
            (
                "columns = { title = \"counter\" }",
                "column 'title' (TEXT) cannot be counter",
            ),
            (
                "columns = { likes = \"set\" }",
                "column 'likes' (INTEGER) cannot be set",
            ),
            (
                "columns = { likes = \"text\" }",
                "column 'likes' (INTEGER) cannot be text",
            ),
            (
                "columns = { stock = { merge = \"counter\", min = 5, max = 1 } }",
                "min 5 is greater than max 1",
            ),
            (
                "columns = { id = \"counter\" }",
                "column 'id': it is the primary key",
            ),
            (
                "columns = { tags = { merge = \"set\", min = 0 } }",
                "min and max apply to counters only",
            ),
            (
                "columns = { stock = { merge = \"counter\", floor = 0 } }",
                "unknown option 'floor'",
            ),
            (
                "columns = { stock = { min = 0 } }",
                "options need a policy too",
            ),
            ("columns = { stock = 3 }", "expected a policy name"),
            (
                "columns = { stock = \"sum\" }",
                "unknown merge policy 'sum'",
            ),
            (
                "merge = \"counter\"",
                "column 'title' (TEXT) cannot be counter",
            ),
            ("on_delete = \"maybe\"", "unknown on_delete rule 'maybe'"),
        ] {
            let e = cards(extra).unwrap_err().to_string();
            assert!(
                e.contains("table 'cards'") && e.contains(want),
                "{extra}: {e}"
            );
        }
        // Reserved names, in any case (SQLite's names ignore ASCII case).
        for name in [
            "hearth_conflicts",
            "HEARTH_CONFLICTS",
            "_HEARTH_TEXT",
            "Sqlite_x",
        ] {
            let e = err(&format!(
                "version = 1\n[tables.{name}]\ncreate = \"CREATE TABLE {name} (id TEXT PRIMARY KEY)\"\n"
            ));
            assert!(e.contains("reserved"), "{name}: {e}");
        }
        // Column names too ignore case.
        let s = cards("columns = { LIKES = \"counter\" }").unwrap();
        let t = s.table("cards").unwrap();
        assert_eq!(
            t.columns[t.column_index("likes").unwrap()].policy,
            MergePolicy::Counter
        );
    }
}
