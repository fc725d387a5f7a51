//! Identity and permissions as the schema declares them: the `[auth]`
//! section (how the server checks tokens) and each table's `rules` (who may
//! read and write which rows).
//!
//! ```toml
//! [auth]
//! hs256_secret_env = "HEARTH_JWT_SECRET"   # or jwks_file = "jwks.json"
//! issuer = "https://auth.example.test"      # optional, checked when set
//! audience = "hearth"                        # optional, checked when set
//! leeway_s = 30
//!
//! [tables.todos.rules]
//! read   = "list_id IN (SELECT list_id FROM members WHERE user_id = auth.sub)"
//! insert = "owner = auth.sub"
//! update = "list_id IN (SELECT list_id FROM members WHERE user_id = auth.sub)"
//! delete = "owner = auth.sub"
//! ```
//!
//! A rule is an SQL boolean expression over one row of its table, with the
//! token's claims as `auth.<claim>`; only TRUE allows (FALSE and NULL deny).
//! Under `[auth]`, an action a table has no rule for is denied; without
//! `[auth]`, no table may have rules and everyone may do everything.
//!
//! **Write rules** (`insert`, `update`, `delete`) are SQLite expressions,
//! evaluated by the server inside the merge transaction (see
//! [`WriteRules`]): `insert` on the row as written, `delete` on the row as it
//! was, `update` on both (the row as it was, so nobody takes over a row they
//! may not update, and the row as written, so nobody moves a row where they
//! may not write). Lookups into other tables see the store with the whole
//! mutation applied, so a mutation that creates a list, its membership row
//! and a todo in it passes a rule that looks the membership up.
//!
//! **Read rules** decide which rows the server sends to a device, for every
//! entry of the log at its position, so they are evaluated per row and per
//! connection without SQL: a read rule is written in the stream condition
//! language of [`crate::filter`] (SQL's syntax and semantics, over the row's
//! own columns) plus `auth.<claim>` and lookups of the form
//! `col [NOT] IN (SELECT c FROM other_table WHERE condition)`, where the
//! condition reads `other_table`'s columns, literals and claims. Each
//! connection keeps the values each lookup yields for its user, updated
//! from the log as the looked-up table changes ([`ReadRule`]).

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::filter::{Filter, Param};
use crate::schema::{ident, Table};
use crate::value::Value;

/// What the read rules' lookups yield for one user: per (table with a read
/// rule, lookup index), the looked-up rows that match, by key (the key's
/// postcard bytes) → the selected value.
pub type Grants = BTreeMap<(String, usize), BTreeMap<Vec<u8>, Value>>;

/// The code of a write a rule refuses.
pub const FORBIDDEN: &str = "FORBIDDEN";

/// How the server checks tokens (`[auth]` in the schema file). The secret
/// itself never appears in the file (it is sent to every device): only the
/// name of the environment variable holding it, or a JWKS file's path.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Auth {
    /// The environment variable holding the HS256 secret.
    #[serde(default)]
    pub hs256_secret_env: Option<String>,
    /// A JSON Web Key Set file (RS256, ES256, EdDSA keys, chosen by `kid`).
    #[serde(default)]
    pub jwks_file: Option<String>,
    /// The `iss` a token must carry, when set.
    #[serde(default)]
    pub issuer: Option<String>,
    /// The `aud` a token must carry, when set.
    #[serde(default)]
    pub audience: Option<String>,
    /// Seconds of clock difference allowed on `exp` and `nbf`.
    #[serde(default = "default_leeway_s")]
    pub leeway_s: u64,
}

fn default_leeway_s() -> u64 {
    30
}

/// A table's `rules` as written.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRules {
    #[serde(default)]
    pub read: Option<String>,
    #[serde(default)]
    pub insert: Option<String>,
    #[serde(default)]
    pub update: Option<String>,
    #[serde(default)]
    pub delete: Option<String>,
}

/// A table's compiled rules. `None` denies the action (under `[auth]`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TableRules {
    pub read: Option<ReadRule>,
    pub insert: Option<String>,
    pub update: Option<String>,
    pub delete: Option<String>,
}

/// The writes a rule governs.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Insert,
    Update,
    Delete,
}

impl Action {
    pub fn name(self) -> &'static str {
        match self {
            Action::Insert => "insert",
            Action::Update => "update",
            Action::Delete => "delete",
        }
    }
}

impl TableRules {
    pub fn write(&self, action: Action) -> Option<&str> {
        match action {
            Action::Insert => self.insert.as_deref(),
            Action::Update => self.update.as_deref(),
            Action::Delete => self.delete.as_deref(),
        }
    }
}

/// Who a connection acts for: the token's `sub` and its claims as SQL
/// values (strings as TEXT, integers as INTEGER, other numbers as REAL,
/// booleans as 1/0, arrays and objects as their JSON text).
#[derive(Clone, Debug, PartialEq)]
pub struct Principal {
    pub sub: String,
    pub claims: BTreeMap<String, Value>,
    /// The claims that are arrays of strings, numbers or booleans, as lists
    /// (for a read rule's `col IN auth.groups`).
    pub lists: BTreeMap<String, Vec<Value>>,
}

impl Principal {
    /// From a token's verified claims (a JSON object with a string `sub`).
    pub fn from_claims(claims: &serde_json::Map<String, serde_json::Value>) -> Option<Principal> {
        let sub = claims.get("sub")?.as_str()?.to_string();
        let lists = claims
            .iter()
            .filter_map(|(k, v)| {
                let items = v.as_array()?;
                items
                    .iter()
                    .all(|i| i.is_string() || i.is_number() || i.is_boolean())
                    .then(|| (k.clone(), items.iter().map(claim_value).collect()))
            })
            .collect();
        let claims = claims
            .iter()
            .map(|(k, v)| (k.clone(), claim_value(v)))
            .collect();
        Some(Principal { sub, claims, lists })
    }

    /// A claim's value, NULL when the token has none.
    pub fn claim(&self, name: &str) -> Value {
        self.claims.get(name).cloned().unwrap_or(Value::Null)
    }
}

fn claim_value(v: &serde_json::Value) -> Value {
    match v {
        serde_json::Value::Null => Value::Null,
        serde_json::Value::Bool(b) => Value::Integer(i64::from(*b)),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => Value::Integer(i),
            None => Value::Real(n.as_f64().unwrap_or(f64::NAN)),
        },
        serde_json::Value::String(s) => Value::Text(s.clone()),
        other => Value::Text(other.to_string()),
    }
}

/// The prefix of the condition parameters standing for claims.
const AUTH_PARAM: &str = "__auth_";
/// The prefix of the list parameters standing for lookups.
const LOOKUP_PARAM: &str = "__lookup_";

/// A compiled read rule over one table.
#[derive(Clone, Debug, PartialEq)]
pub struct ReadRule {
    pub source: String,
    /// The rule with each claim a parameter and each lookup a list
    /// parameter.
    pub filter: Filter,
    /// The claims the rule and its lookups read.
    pub claims: Vec<String>,
    pub lookups: Vec<Lookup>,
}

/// `SELECT column FROM table WHERE filter`, per user.
#[derive(Clone, Debug, PartialEq)]
pub struct Lookup {
    pub table: String,
    /// Index of the selected column in the table's columns.
    pub column: usize,
    pub filter: Filter,
}

impl Lookup {
    /// The columns of its table a lookup reads (sorted).
    pub fn columns(&self) -> Vec<usize> {
        let mut cols = self.filter.columns().to_vec();
        cols.push(self.column);
        cols.sort_unstable();
        cols.dedup();
        cols
    }
}

impl ReadRule {
    /// Whether the rule is the constant TRUE (every row readable).
    pub fn is_true(&self) -> bool {
        self.lookups.is_empty()
            && self.claims.is_empty()
            && self.filter.source().trim().eq_ignore_ascii_case("true")
    }

    /// The parameters of the claims, for [`Filter::matches`] (lookups are
    /// added by the caller with [`ReadRule::lookup_param`]). A claim whose
    /// type does not fit the columns it is compared with reads as NULL, so
    /// it matches nothing.
    pub fn claim_params(&self, who: &Principal) -> BTreeMap<String, Param> {
        let mut out = BTreeMap::new();
        for name in &self.claims {
            let param = format!("{AUTH_PARAM}{name}");
            let filters =
                || std::iter::once(&self.filter).chain(self.lookups.iter().map(|l| &l.filter));
            let fits = |v: &Value| {
                filters().all(|f| f.params().get(&param).is_none_or(|t| t.affinity.admits(v)))
            };
            let list = filters().any(|f| f.params().get(&param).is_some_and(|t| t.list));
            let value = if list {
                // `col IN auth.groups`: the array's items that fit (a claim
                // that is no array is an empty list).
                let items = who.lists.get(name).cloned().unwrap_or_default();
                Param::Many(items.into_iter().filter(|v| fits(v)).collect())
            } else {
                let v = who.claim(name);
                Param::One(if fits(&v) { v } else { Value::Null })
            };
            out.insert(param, value);
        }
        out
    }

    /// The name of lookup `i`'s list parameter.
    pub fn lookup_param(i: usize) -> String {
        format!("{LOOKUP_PARAM}{i}")
    }

    /// Compiles `source` as the read rule of `table` (`tables` for the
    /// lookups); the error says what is wrong.
    pub fn compile(
        source: &str,
        table: &Table,
        tables: &BTreeMap<String, Table>,
    ) -> Result<ReadRule, String> {
        let mut lookups = Vec::new();
        let mut claims = Vec::new();
        let text = rewrite(source, &mut claims, Some((&mut lookups, tables)))?;
        let filter = Filter::compile(&text, table).map_err(|e| e.replace(AUTH_PARAM, "auth."))?;
        for name in filter.params().keys() {
            if let Some(claim) = name.strip_prefix(AUTH_PARAM) {
                if !claims.iter().any(|c| c == claim) {
                    claims.push(claim.to_string());
                }
            }
        }
        for l in &lookups {
            for name in l.filter.params().keys() {
                if let Some(claim) = name.strip_prefix(AUTH_PARAM) {
                    if !claims.iter().any(|c| c == claim) {
                        claims.push(claim.to_string());
                    }
                }
            }
        }
        Ok(ReadRule {
            source: source.to_string(),
            filter,
            claims,
            lookups,
        })
    }
}

fn is_ident(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// Skips a quoted string or identifier starting at `i` (its quote), giving
/// the index after its closing quote.
fn skip_quoted(bytes: &[u8], i: usize) -> Result<usize, String> {
    let q = bytes[i];
    let mut j = i + 1;
    loop {
        match bytes.get(j) {
            None => return Err(format!("unterminated {} at {}", q as char, i + 1)),
            Some(&b) if b == q => {
                if bytes.get(j + 1) == Some(&q) {
                    j += 2;
                } else {
                    return Ok(j + 1);
                }
            }
            Some(_) => j += 1,
        }
    }
}

/// Rewrites a read rule into the condition language: `auth.x` becomes the
/// parameter `:__auth_x`, `(SELECT c FROM t WHERE ...)` the list parameter
/// `:__lookup_N` (when lookups are allowed here). Quoted text is left alone.
fn rewrite(
    source: &str,
    claims: &mut Vec<String>,
    mut lookups: Option<(&mut Vec<Lookup>, &BTreeMap<String, Table>)>,
) -> Result<String, String> {
    let bytes = source.as_bytes();
    let mut out = String::with_capacity(source.len() + 16);
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        let word_start = i == 0 || !is_ident(bytes[i - 1]);
        match b {
            b'\'' | b'"' => {
                let end = skip_quoted(bytes, i)?;
                out.push_str(&source[i..end]);
                i = end;
            }
            b':' => {
                return Err(
                    "a rule takes no :parameters; a token's claims are auth.<claim>".to_string(),
                )
            }
            b'a' | b'A'
                if word_start
                    && source.len() >= i + 5
                    && source[i..i + 5].eq_ignore_ascii_case("auth.") =>
            {
                let start = i + 5;
                let mut j = start;
                while j < bytes.len() && is_ident(bytes[j]) {
                    j += 1;
                }
                if j == start {
                    return Err(format!(
                        "'auth.' at {} must be followed by a claim's name (letters, digits, _)",
                        i + 1
                    ));
                }
                let claim = &source[start..j];
                if !claims.iter().any(|c| c == claim) {
                    claims.push(claim.to_string());
                }
                out.push_str(&format!(":{AUTH_PARAM}{claim}"));
                i = j;
            }
            b'(' => {
                let mut j = i + 1;
                while j < bytes.len() && bytes[j].is_ascii_whitespace() {
                    j += 1;
                }
                let is_select = source.len() >= j + 6
                    && source[j..j + 6].eq_ignore_ascii_case("select")
                    && bytes.get(j + 6).is_none_or(|b| !is_ident(*b));
                if !is_select {
                    out.push('(');
                    i += 1;
                    continue;
                }
                let Some((lookups, tables)) = lookups.as_mut() else {
                    return Err("a lookup's condition cannot hold another lookup".to_string());
                };
                // The matching parenthesis, skipping quotes.
                let mut depth = 0usize;
                let mut k = i;
                let end = loop {
                    match bytes.get(k) {
                        None => return Err(format!("unclosed '(' at {}", i + 1)),
                        Some(b'\'') | Some(b'"') => k = skip_quoted(bytes, k)?,
                        Some(b'(') => {
                            depth += 1;
                            k += 1;
                        }
                        Some(b')') => {
                            depth -= 1;
                            k += 1;
                            if depth == 0 {
                                break k;
                            }
                        }
                        Some(_) => k += 1,
                    }
                };
                let inner = &source[j + 6..end - 1];
                let lookup = compile_lookup(inner, claims, tables)?;
                out.push_str(&format!(":{}", ReadRule::lookup_param(lookups.len())));
                lookups.push(lookup);
                i = end;
            }
            _ => {
                // Copy one character (the source is UTF-8).
                let ch = source[i..].chars().next().expect("in bounds");
                out.push(ch);
                i += ch.len_utf8();
            }
        }
    }
    Ok(out)
}

/// Reads one identifier (bare, or "double-quoted") at the start of `s`:
/// (name, rest).
fn take_ident(s: &str) -> Option<(String, &str)> {
    let s = s.trim_start();
    if let Some(rest) = s.strip_prefix('"') {
        let end = rest.find('"')?;
        return Some((rest[..end].to_string(), &rest[end + 1..]));
    }
    let end = s.bytes().position(|b| !is_ident(b)).unwrap_or(s.len());
    (end > 0).then(|| (s[..end].to_string(), &s[end..]))
}

fn take_keyword<'s>(s: &'s str, kw: &str) -> Option<&'s str> {
    let s = s.trim_start();
    (s.len() >= kw.len()
        && s[..kw.len()].eq_ignore_ascii_case(kw)
        && s.as_bytes().get(kw.len()).is_none_or(|b| !is_ident(*b)))
    .then(|| &s[kw.len()..])
}

/// `c FROM t [WHERE condition]` (after SELECT).
fn compile_lookup(
    text: &str,
    claims: &mut Vec<String>,
    tables: &BTreeMap<String, Table>,
) -> Result<Lookup, String> {
    let shape = "a lookup is (SELECT column FROM table WHERE condition)";
    let (column, rest) = take_ident(text).ok_or_else(|| shape.to_string())?;
    let rest = take_keyword(rest, "from").ok_or_else(|| shape.to_string())?;
    let (table_name, rest) = take_ident(rest).ok_or_else(|| shape.to_string())?;
    let table = tables
        .values()
        .find(|t| t.name.eq_ignore_ascii_case(&table_name))
        .ok_or_else(|| format!("a lookup names unknown table '{table_name}'"))?;
    let column = table
        .columns
        .iter()
        .position(|c| c.name.eq_ignore_ascii_case(&column))
        .ok_or_else(|| format!("table '{}' has no column '{column}'", table.name))?;
    let condition = if rest.trim().is_empty() {
        "TRUE".to_string()
    } else {
        let cond = take_keyword(rest, "where")
            .ok_or_else(|| format!("{shape}; found '{}'", rest.trim()))?;
        rewrite(cond, claims, None)?
    };
    let filter = Filter::compile(&condition, table)
        .map_err(|e| format!("in the lookup of '{}': {}", table.name, e))
        .map_err(|e| e.replace(AUTH_PARAM, "auth."))?;
    Ok(Lookup {
        table: table.name.clone(),
        column,
        filter,
    })
}

/// A write rule made into one SQLite statement per table and action:
/// `SELECT coalesce((rule), 0) IS 1 FROM (SELECT ?1 AS "col", ...) AS
/// "table"`, each `auth.<claim>` in the rule replaced by a parameter; the
/// row's values are bound first (in the table's column order), then the
/// claims the rule names (arrays and objects as their JSON text, so
/// `x IN (SELECT value FROM json_each(auth.groups))` reads an array claim).
#[derive(Clone, Debug, PartialEq)]
pub struct WriteRule {
    pub source: String,
    pub sql: String,
    pub claims: Vec<String>,
}

impl WriteRule {
    pub fn new(source: &str, table: &Table) -> WriteRule {
        let n = table.columns.len();
        let mut claims: Vec<String> = Vec::new();
        // Each `auth.<claim>` outside quotes becomes a bound parameter (the
        // row's values are ?1..?n, the claims follow), so a claim named like
        // a column is never ambiguous with it.
        let bytes = source.as_bytes();
        let mut text = String::with_capacity(source.len());
        let mut i = 0;
        let mut copied = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'\'' | b'"' => i = skip_quoted(bytes, i).unwrap_or(bytes.len()),
                b'a' | b'A'
                    if (i == 0 || !is_ident(bytes[i - 1]))
                        && source.len() >= i + 5
                        && source[i..i + 5].eq_ignore_ascii_case("auth.") =>
                {
                    let start = i + 5;
                    let mut j = start;
                    while j < bytes.len() && is_ident(bytes[j]) {
                        j += 1;
                    }
                    let name = &source[start..j];
                    if name.is_empty() {
                        i += 1;
                        continue;
                    }
                    let at = match claims.iter().position(|c| c == name) {
                        Some(at) => at,
                        None => {
                            claims.push(name.to_string());
                            claims.len() - 1
                        }
                    };
                    text.push_str(&source[copied..i]);
                    text.push_str(&format!("?{}", n + at + 1));
                    copied = j;
                    i = j;
                }
                _ => i += 1,
            }
        }
        text.push_str(&source[copied..]);
        let row = table
            .columns
            .iter()
            .enumerate()
            .map(|(i, c)| format!("?{} AS {}", i + 1, ident(&c.name)))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "SELECT coalesce(({text}\n), 0) IS 1 FROM (SELECT {row}) AS {}",
            ident(&table.name)
        );
        WriteRule {
            source: source.to_string(),
            sql,
            claims,
        }
    }
}
