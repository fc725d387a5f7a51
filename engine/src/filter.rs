//! Stream conditions: the `where` of a `[streams.NAME]` section.
//!
//! A stream is a named, parameterised subscription to the rows of one table
//! (`where = "list_id = :list"`). Its condition is written in a small
//! language of our own, parsed here; no SQL text from a device ever reaches
//! SQLite. It reads only the row's own columns:
//!
//! - comparisons of a column with a literal or a `:parameter`, either way
//!   round: `=` / `==`, `!=` / `<>`, `<`, `<=`, `>`, `>=`;
//! - `col IN (item, ...)`, `col NOT IN (...)` (items are literals or
//!   parameters), `col IN :list`, `col NOT IN :list` (a list parameter);
//! - `col IS NULL`, `col IS NOT NULL`;
//! - `AND`, `OR`, `NOT`, parentheses, and `TRUE`, `FALSE`, `NULL` alone;
//! - literals: integers, reals (`1.5`, `-2e3`), `'text'` (`''` is a quote),
//!   `TRUE` / `FALSE` (1 / 0), `NULL`.
//!
//! Keywords ignore case; column names ignore ASCII case as SQLite's do and
//! may be `"double-quoted"` (a column named like a keyword must be).
//!
//! **Semantics are SQLite's, made exact by typing.** Every literal or
//! parameter compared with a column must fit the column's affinity
//! (INTEGER, REAL and NUMERIC columns take numbers, TEXT columns text, BLOB
//! or untyped columns anything; NULL fits all), and filtered columns must
//! use the BINARY collation. Then SQLite applies no conversion, and a
//! comparison is its storage-class order: NULL < numbers (integers and
//! reals compared exactly) < TEXT (bytewise) < BLOB (bytewise), with SQL's
//! three-valued logic. [`Filter::matches`] evaluates that in Rust, and
//! [`Filter::to_sql`] gives the same condition to SQLite; the property test
//! in `engine/tests/filter.rs` checks that they agree.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::schema::{ident, Table};
use crate::value::Value;

/// The longest condition, in bytes.
pub const SOURCE_BYTES_MAX: usize = 4096;
/// The deepest nesting of parentheses and `NOT`s in a condition.
pub const DEPTH_MAX: usize = 32;
/// The most items a list parameter may hold.
pub const LIST_ITEMS_MAX: usize = 1000;
/// The most bytes a subscription's parameters may take, encoded (postcard's
/// encoding of the `BTreeMap<String, Param>`).
pub const PARAMS_BYTES_MAX: usize = 4096;

const SUPPORTED: &str = "supported: a column compared with a literal or :parameter \
(=, ==, !=, <>, <, <=, >, >=), col [NOT] IN (items), col [NOT] IN :list, \
col IS [NOT] NULL, AND, OR, NOT, parentheses; literals are numbers, 'text', TRUE, FALSE, NULL";

/// A stream parameter's value: one value, or a list (for `IN :name`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Param {
    One(Value),
    Many(Vec<Value>),
}

/// A column's type affinity, by SQLite's rules on its declared type.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Affinity {
    Integer,
    Text,
    /// BLOB, or no declared type: values are stored as given.
    Blob,
    Real,
    Numeric,
}

impl Affinity {
    /// SQLite's rules (section 3.1 of "Datatypes In SQLite"), in order: INT
    /// → INTEGER; CHAR, CLOB or TEXT → TEXT; BLOB or nothing → BLOB; REAL,
    /// FLOA or DOUB → REAL; anything else NUMERIC.
    pub fn of(declared_type: &str) -> Affinity {
        let t = declared_type.to_ascii_uppercase();
        if t.contains("INT") {
            Affinity::Integer
        } else if t.contains("CHAR") || t.contains("CLOB") || t.contains("TEXT") {
            Affinity::Text
        } else if t.contains("BLOB") || t.trim().is_empty() {
            Affinity::Blob
        } else if t.contains("REAL") || t.contains("FLOA") || t.contains("DOUB") {
            Affinity::Real
        } else {
            Affinity::Numeric
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Affinity::Integer => "INTEGER",
            Affinity::Text => "TEXT",
            Affinity::Blob => "BLOB",
            Affinity::Real => "REAL",
            Affinity::Numeric => "NUMERIC",
        }
    }

    /// Whether a value compared with a column of this affinity is compared
    /// as it is (no conversion): numbers for numeric columns, text for TEXT
    /// columns, anything for BLOB ones; NULL always. A real NaN never fits
    /// (SQLite has no NaN: it binds one as NULL).
    pub fn admits(self, value: &Value) -> bool {
        match (self.kind(), value) {
            (_, Value::Real(r)) if r.is_nan() => false,
            (_, Value::Null) | (Kind::Any, _) => true,
            (Kind::Number, Value::Integer(_) | Value::Real(_)) => true,
            (Kind::Text, Value::Text(_)) => true,
            _ => false,
        }
    }

    fn kind(self) -> Kind {
        match self {
            Affinity::Integer | Affinity::Real | Affinity::Numeric => Kind::Number,
            Affinity::Text => Kind::Text,
            Affinity::Blob => Kind::Any,
        }
    }

    /// What values of this affinity's columns take, for messages.
    pub fn takes(self) -> &'static str {
        match self.kind() {
            Kind::Number => "numbers (integers or reals) or NULL",
            Kind::Text => "'text' or NULL",
            Kind::Any => "any value",
        }
    }
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Kind {
    Number,
    Text,
    Any,
}

/// What a parameter of a condition expects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamType {
    /// The affinity of the (first) column it is compared with; every column
    /// it is compared with takes the same kind of value.
    pub affinity: Affinity,
    /// A list (`IN :name`) rather than one value.
    pub list: bool,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl Op {
    /// The same comparison with its operands swapped.
    fn flip(self) -> Op {
        match self {
            Op::Lt => Op::Gt,
            Op::Le => Op::Ge,
            Op::Gt => Op::Lt,
            Op::Ge => Op::Le,
            other => other,
        }
    }

    fn holds(self, o: Ordering) -> bool {
        match self {
            Op::Eq => o == Ordering::Equal,
            Op::Ne => o != Ordering::Equal,
            Op::Lt => o == Ordering::Less,
            Op::Le => o != Ordering::Greater,
            Op::Gt => o == Ordering::Greater,
            Op::Ge => o != Ordering::Less,
        }
    }

    fn sql(self) -> &'static str {
        match self {
            Op::Eq => "=",
            Op::Ne => "<>",
            Op::Lt => "<",
            Op::Le => "<=",
            Op::Gt => ">",
            Op::Ge => ">=",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
enum Operand {
    Lit(Value),
    Param(String),
}

/// A compiled condition. Columns are indices in the table's `columns`.
#[derive(Clone, Debug, PartialEq)]
enum Node {
    /// TRUE, FALSE or NULL.
    Const(Option<bool>),
    Cmp {
        col: usize,
        op: Op,
        rhs: Operand,
    },
    In {
        col: usize,
        not: bool,
        items: Vec<Operand>,
    },
    InList {
        col: usize,
        not: bool,
        param: String,
    },
    IsNull {
        col: usize,
        not: bool,
    },
    Not(Box<Node>),
    And(Vec<Node>),
    Or(Vec<Node>),
}

/// A stream's compiled condition over one table's rows.
#[derive(Clone, Debug, PartialEq)]
pub struct Filter {
    source: String,
    root: Node,
    /// Indices of the columns read, sorted, deduplicated.
    columns: Vec<usize>,
    /// Their names, in the same order (for [`Filter::to_sql`]).
    names: Vec<String>,
    params: BTreeMap<String, ParamType>,
}

static NULL: Value = Value::Null;

/// SQLite's comparison of two values with the BINARY collation and no
/// affinity conversion: `None` if either is NULL (or a NaN real, which
/// SQLite cannot hold), else their order by storage class (numbers < TEXT <
/// BLOB), numbers compared exactly (an integer and a real too), text and
/// blobs bytewise. Two values are "equal" here exactly when SQLite's `=`
/// says so (`1 = 1.0`, `0.0 = -0.0`): callers indexing subscriptions by a
/// [`Filter::key`] parameter's value must key numbers by this equality.
pub fn compare(a: &Value, b: &Value) -> Option<Ordering> {
    fn rank(v: &Value) -> Option<u8> {
        match v {
            Value::Null => None,
            Value::Real(r) if r.is_nan() => None,
            Value::Integer(_) | Value::Real(_) => Some(1),
            Value::Text(_) => Some(2),
            Value::Blob(_) => Some(3),
        }
    }
    let (ra, rb) = (rank(a)?, rank(b)?);
    if ra != rb {
        return Some(ra.cmp(&rb));
    }
    Some(match (a, b) {
        (Value::Integer(x), Value::Integer(y)) => x.cmp(y),
        (Value::Real(x), Value::Real(y)) => x.partial_cmp(y)?,
        (Value::Integer(x), Value::Real(y)) => int_real(*x, *y),
        (Value::Real(x), Value::Integer(y)) => int_real(*y, *x).reverse(),
        (Value::Text(x), Value::Text(y)) => x.as_bytes().cmp(y.as_bytes()),
        (Value::Blob(x), Value::Blob(y)) => x.cmp(y),
        _ => unreachable!("same storage class"),
    })
}

/// An integer against a (non-NaN) real, exactly.
fn int_real(i: i64, r: f64) -> Ordering {
    // 2^63 is exact in f64; every i64 is below it and at or above -2^63.
    const TWO_63: f64 = 9_223_372_036_854_775_808.0;
    if r >= TWO_63 {
        return Ordering::Less;
    }
    if r < -TWO_63 {
        return Ordering::Greater;
    }
    // r is in [-2^63, 2^63): its integer part fits an i64 exactly.
    let whole = r.trunc();
    match i.cmp(&(whole as i64)) {
        Ordering::Equal => {
            let frac = r - whole;
            if frac > 0.0 {
                Ordering::Less
            } else if frac < 0.0 {
                Ordering::Greater
            } else {
                Ordering::Equal
            }
        }
        other => other,
    }
}

impl Filter {
    /// Compiles `source` as a condition on `table`'s rows. The message of an
    /// error says what is wrong, where (a 1-based character position for
    /// syntax), and what is supported.
    pub fn compile(source: &str, table: &Table) -> Result<Filter, String> {
        if source.len() > SOURCE_BYTES_MAX {
            return Err(format!(
                "the condition is {} bytes long; at most {SOURCE_BYTES_MAX} are allowed",
                source.len()
            ));
        }
        let toks = lex(source)?;
        let mut p = Parser {
            src: source,
            toks,
            i: 0,
            depth: 0,
            table,
            columns: Vec::new(),
            params: BTreeMap::new(),
            first_use: BTreeMap::new(),
        };
        if p.peek() == &Tok::Eof {
            return Err("the condition is empty: write TRUE for every row".into());
        }
        let root = p.or()?;
        if p.peek() != &Tok::Eof {
            return Err(p.unexpected("AND, OR or the end of the condition"));
        }
        let mut columns = p.columns;
        columns.sort_unstable();
        columns.dedup();
        check_collations(table, &columns)?;
        let names = columns
            .iter()
            .map(|&c| table.columns[c].name.clone())
            .collect();
        Ok(Filter {
            source: source.to_string(),
            root,
            columns,
            names,
            params: p.params,
        })
    }

    /// The condition as written.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Indices (in the table's `columns`) of the columns the condition
    /// reads, sorted and deduplicated.
    pub fn columns(&self) -> &[usize] {
        &self.columns
    }

    /// The parameters the condition takes, by name.
    pub fn params(&self) -> &BTreeMap<String, ParamType> {
        &self.params
    }

    /// When the condition is `col = :p`, or an AND with such a conjunct (at
    /// any depth of ANDs), the column's index and the parameter's name: a
    /// row matches only if its `col` equals the parameter's value (as
    /// [`compare`] says: `1` equals `1.0`), so callers can index
    /// subscriptions by that value. The first such conjunct, in source order.
    pub fn key(&self) -> Option<(usize, &str)> {
        fn find(node: &Node) -> Option<(usize, &str)> {
            match node {
                Node::Cmp {
                    col,
                    op: Op::Eq,
                    rhs: Operand::Param(p),
                } => Some((*col, p.as_str())),
                Node::And(items) => items.iter().find_map(find),
                _ => None,
            }
        }
        find(&self.root)
    }

    /// Whether a row matches: the condition is TRUE (not FALSE, not NULL).
    ///
    /// `row` is indexed like the table's `columns` (the row as SQLite stores
    /// it, after the column's affinity applied); only the indices
    /// [`columns`] lists are read, so a row with the other columns Null will
    /// do. `params` should have passed [`check_params`]; a missing
    /// parameter, or one of the wrong shape, reads as NULL (and [`to_sql`]
    /// does the same). Allocates nothing.
    ///
    /// [`columns`]: Filter::columns
    /// [`check_params`]: Filter::check_params
    /// [`to_sql`]: Filter::to_sql
    pub fn matches(&self, row: &[Value], params: &BTreeMap<String, Param>) -> bool {
        self.matches_by(|i| &row[i], params)
    }

    /// [`matches`](Filter::matches) with the row's values given by a
    /// function: `value_of(i)` is the value of column `i` (an index in the
    /// table's `columns`), asked only for the indices
    /// [`columns`](Filter::columns) lists.
    pub fn matches_by<'v, F>(&self, value_of: F, params: &BTreeMap<String, Param>) -> bool
    where
        F: Fn(usize) -> &'v Value,
    {
        eval(&self.root, &value_of, params) == Some(true)
    }

    /// The condition as an SQL expression over the table's columns (quoted
    /// identifiers, unqualified), with placeholders `?1`, `?2`, ... and the
    /// values to bind to them, in order. It selects exactly the rows
    /// [`matches`](Filter::matches) accepts. A list parameter becomes one
    /// placeholder per item (`col IN (?2, ?3)`); `col = :p` becomes
    /// `col = ?N`, which SQLite answers from an index on `col`.
    pub fn to_sql(&self, params: &BTreeMap<String, Param>) -> (String, Vec<Value>) {
        let mut sql = String::new();
        let mut values = Vec::new();
        self.emit(&self.root, params, &mut sql, &mut values);
        (sql, values)
    }

    fn column_sql(&self, col: usize) -> String {
        let at = self
            .columns
            .binary_search(&col)
            .expect("a column the condition reads");
        ident(&self.names[at])
    }

    fn emit(
        &self,
        node: &Node,
        params: &BTreeMap<String, Param>,
        sql: &mut String,
        values: &mut Vec<Value>,
    ) {
        let mut bind = |v: &Value, sql: &mut String| {
            values.push(v.clone());
            sql.push_str(&format!("?{}", values.len()));
        };
        match node {
            Node::Const(Some(true)) => sql.push('1'),
            Node::Const(Some(false)) => sql.push('0'),
            Node::Const(None) => sql.push_str("NULL"),
            Node::Cmp { col, op, rhs } => {
                sql.push_str(&format!("{} {} ", self.column_sql(*col), op.sql()));
                bind(operand(rhs, params), sql);
            }
            Node::In { col, not, items } => {
                sql.push_str(&format!(
                    "{} {}IN (",
                    self.column_sql(*col),
                    if *not { "NOT " } else { "" }
                ));
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        sql.push_str(", ");
                    }
                    bind(operand(item, params), sql);
                }
                sql.push(')');
            }
            Node::InList { col, not, param } => match params.get(param) {
                Some(Param::Many(list)) => {
                    sql.push_str(&format!(
                        "{} {}IN (",
                        self.column_sql(*col),
                        if *not { "NOT " } else { "" }
                    ));
                    for (i, v) in list.iter().enumerate() {
                        if i > 0 {
                            sql.push_str(", ");
                        }
                        bind(v, sql);
                    }
                    sql.push(')');
                }
                _ => sql.push_str("NULL"),
            },
            Node::IsNull { col, not } => sql.push_str(&format!(
                "{} IS {}NULL",
                self.column_sql(*col),
                if *not { "NOT " } else { "" }
            )),
            Node::Not(inner) => {
                sql.push_str("NOT (");
                self.emit(inner, params, sql, values);
                sql.push(')');
            }
            Node::And(items) | Node::Or(items) => {
                let join = if matches!(node, Node::And(_)) {
                    " AND "
                } else {
                    " OR "
                };
                sql.push('(');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        sql.push_str(join);
                    }
                    self.emit(item, params, sql, values);
                }
                sql.push(')');
            }
        }
    }

    /// Checks a subscription's parameters against the condition: each one
    /// present, none unknown, a list exactly where `IN :name` wants one,
    /// every value fitting the columns it is compared with, at most
    /// [`LIST_ITEMS_MAX`] items in a list and [`PARAMS_BYTES_MAX`] bytes in
    /// all. The message names the parameter.
    pub fn check_params(&self, params: &BTreeMap<String, Param>) -> Result<(), String> {
        for name in params.keys() {
            if !self.params.contains_key(name) {
                return Err(if self.params.is_empty() {
                    format!("unknown parameter :{name}: this stream takes no parameters")
                } else {
                    format!(
                        "unknown parameter :{name}: this stream takes {}",
                        self.param_list()
                    )
                });
            }
        }
        for (name, ty) in &self.params {
            let Some(param) = params.get(name) else {
                return Err(format!(
                    "parameter :{name} is missing (this stream takes {})",
                    self.param_list()
                ));
            };
            let fits = |v: &Value| -> Result<(), String> {
                if let Value::Real(r) = v {
                    if r.is_nan() {
                        return Err(format!(
                            "parameter :{name} is NaN, which SQL has no value for"
                        ));
                    }
                }
                if ty.affinity.admits(v) {
                    Ok(())
                } else {
                    Err(format!(
                        "parameter :{name} is {}, but it is compared with a column of {} affinity, which takes {}",
                        show(v),
                        ty.affinity.name(),
                        ty.affinity.takes()
                    ))
                }
            };
            match (param, ty.list) {
                (Param::One(v), false) => fits(v)?,
                (Param::Many(list), true) => {
                    if list.len() > LIST_ITEMS_MAX {
                        return Err(format!(
                            "parameter :{name} has {} items; a list may have at most {LIST_ITEMS_MAX}",
                            list.len()
                        ));
                    }
                    for v in list {
                        fits(v)?;
                    }
                }
                (Param::One(_), true) => {
                    return Err(format!(
                        "parameter :{name} must be a list (it is used as IN :{name}), not one value"
                    ))
                }
                (Param::Many(_), false) => {
                    return Err(format!(
                    "parameter :{name} must be one value, not a list (only IN :name takes a list)"
                ))
                }
            }
        }
        let size = params_size(params);
        if size > PARAMS_BYTES_MAX {
            let (biggest, _) = params
                .iter()
                .max_by_key(|(n, p)| param_size(n, p))
                .expect("a non-empty map");
            return Err(format!(
                "the parameters take {size} bytes, more than the {PARAMS_BYTES_MAX} allowed \
                 (the largest is :{biggest})"
            ));
        }
        Ok(())
    }

    fn param_list(&self) -> String {
        self.params
            .keys()
            .map(|n| format!(":{n}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Parameters given as a JSON object (as the CLI and JavaScript pass
    /// them), converted and checked by [`check_params`](Filter::check_params):
    /// a number is an integer if it is whole and fits an i64, else a real; a
    /// string is text; `true` / `false` are 1 / 0; `null` is NULL; an array
    /// (of those) is a list. Nested arrays and objects are refused.
    pub fn params_from_json(
        &self,
        json: &serde_json::Value,
    ) -> Result<BTreeMap<String, Param>, String> {
        let serde_json::Value::Object(object) = json else {
            return Err(format!(
                "parameters must be a JSON object of name to value, not {}",
                json_kind(json)
            ));
        };
        let mut out = BTreeMap::new();
        for (name, value) in object {
            let param = match value {
                serde_json::Value::Array(items) => Param::Many(
                    items
                        .iter()
                        .map(|item| {
                            json_scalar(item).ok_or_else(|| {
                                format!(
                                    "parameter :{name}: a list holds numbers, strings, booleans or null, not {}",
                                    json_kind(item)
                                )
                            })
                        })
                        .collect::<Result<_, _>>()?,
                ),
                other => Param::One(json_scalar(other).ok_or_else(|| {
                    format!(
                        "parameter :{name} is {}: give a number, a string, a boolean, null or a list",
                        json_kind(other)
                    )
                })?),
            };
            out.insert(name.clone(), param);
        }
        self.check_params(&out)?;
        Ok(out)
    }
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

fn json_scalar(v: &serde_json::Value) -> Option<Value> {
    Some(match v {
        serde_json::Value::Null => Value::Null,
        serde_json::Value::Bool(b) => Value::Integer(i64::from(*b)),
        serde_json::Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::Integer(i)
            } else {
                let f = n.as_f64()?;
                const TWO_63: f64 = 9_223_372_036_854_775_808.0;
                if f.fract() == 0.0 && (-TWO_63..TWO_63).contains(&f) {
                    Value::Integer(f as i64)
                } else {
                    Value::Real(f)
                }
            }
        }
        serde_json::Value::String(s) => Value::Text(s.clone()),
        _ => return None,
    })
}

/// Bytes of an unsigned LEB128 varint, as postcard writes lengths.
fn varint_len(mut n: u64) -> usize {
    let mut len = 1;
    while n >= 0x80 {
        n >>= 7;
        len += 1;
    }
    len
}

/// Postcard's size of one value.
fn value_size(v: &Value) -> usize {
    1 + match v {
        Value::Null => 0,
        Value::Integer(i) => varint_len(((i << 1) ^ (i >> 63)) as u64),
        Value::Real(_) => 8,
        Value::Text(s) => varint_len(s.len() as u64) + s.len(),
        Value::Blob(b) => varint_len(b.len() as u64) + b.len(),
    }
}

fn param_size(name: &str, p: &Param) -> usize {
    varint_len(name.len() as u64)
        + name.len()
        + 1
        + match p {
            Param::One(v) => value_size(v),
            Param::Many(list) => {
                varint_len(list.len() as u64) + list.iter().map(value_size).sum::<usize>()
            }
        }
}

/// Postcard's size of a parameter map, computed without encoding it.
fn params_size(params: &BTreeMap<String, Param>) -> usize {
    varint_len(params.len() as u64) + params.iter().map(|(n, p)| param_size(n, p)).sum::<usize>()
}

fn operand<'a>(o: &'a Operand, params: &'a BTreeMap<String, Param>) -> &'a Value {
    match o {
        Operand::Lit(v) => v,
        Operand::Param(name) => match params.get(name) {
            Some(Param::One(v)) => v,
            _ => &NULL,
        },
    }
}

fn is_null(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Real(r) => r.is_nan(),
        _ => false,
    }
}

/// `x IN list` by SQL's rules: true if x equals an item; NULL if none does
/// and x is NULL or an item is; false otherwise; an empty list is false.
fn in_list<'a>(x: &Value, items: impl Iterator<Item = &'a Value>) -> Option<bool> {
    let mut empty = true;
    let mut saw_null = false;
    for item in items {
        empty = false;
        match compare(x, item) {
            Some(Ordering::Equal) => return Some(true),
            Some(_) => {}
            None => saw_null = true,
        }
    }
    if empty {
        Some(false)
    } else if saw_null || is_null(x) {
        None
    } else {
        Some(false)
    }
}

fn eval<'v, F>(node: &Node, value_of: &F, params: &BTreeMap<String, Param>) -> Option<bool>
where
    F: Fn(usize) -> &'v Value,
{
    match node {
        Node::Const(c) => *c,
        Node::Cmp { col, op, rhs } => {
            compare(value_of(*col), operand(rhs, params)).map(|o| op.holds(o))
        }
        Node::In { col, not, items } => {
            let x = value_of(*col);
            in_list(x, items.iter().map(|i| operand(i, params))).map(|b| b != *not)
        }
        Node::InList { col, not, param } => match params.get(param) {
            Some(Param::Many(list)) => in_list(value_of(*col), list.iter()).map(|b| b != *not),
            _ => None,
        },
        Node::IsNull { col, not } => Some(is_null(value_of(*col)) != *not),
        Node::Not(inner) => eval(inner, value_of, params).map(|b| !b),
        Node::And(items) => {
            let mut result = Some(true);
            for item in items {
                match eval(item, value_of, params) {
                    Some(false) => return Some(false),
                    None => result = None,
                    Some(true) => {}
                }
            }
            result
        }
        Node::Or(items) => {
            let mut result = Some(false);
            for item in items {
                match eval(item, value_of, params) {
                    Some(true) => return Some(true),
                    None => result = None,
                    Some(false) => {}
                }
            }
            result
        }
    }
}

/// A value for a message.
fn show(v: &Value) -> String {
    match v {
        Value::Null => "NULL".into(),
        Value::Integer(i) => format!("integer {i}"),
        Value::Real(r) => format!("real {r:?}"),
        Value::Text(s) => {
            let mut short: String = s.chars().take(40).collect();
            if short.len() < s.len() {
                short.push_str("...");
            }
            format!("text '{}'", short.replace('\'', "''"))
        }
        Value::Blob(b) => format!("a blob of {} bytes", b.len()),
    }
}

/// Filtered columns must compare text byte for byte as `compare` does: the
/// BINARY collation. SQLite keeps a column's collation only in its CREATE,
/// so it is read back the way SQLite sees it: an index on the columns in a
/// scratch database takes each column's own collation.
fn check_collations(table: &Table, columns: &[usize]) -> Result<(), String> {
    if columns.is_empty() {
        return Ok(());
    }
    let fail = |e: rusqlite::Error| format!("cannot read the columns' collations: {e}");
    let scratch = rusqlite::Connection::open_in_memory().map_err(fail)?;
    scratch.execute_batch(&table.create_sql).map_err(fail)?;
    let probe = "hearth filter collation probe";
    let list = columns
        .iter()
        .map(|&c| ident(&table.columns[c].name))
        .collect::<Vec<_>>()
        .join(", ");
    scratch
        .execute_batch(&format!(
            "CREATE INDEX {} ON {} ({list})",
            ident(probe),
            ident(&table.name)
        ))
        .map_err(fail)?;
    let mut stmt = scratch
        .prepare("SELECT coll FROM pragma_index_xinfo(?1) WHERE key ORDER BY seqno")
        .map_err(fail)?;
    let colls: Vec<String> = stmt
        .query_map([probe], |r| r.get(0))
        .map_err(fail)?
        .collect::<Result<_, _>>()
        .map_err(fail)?;
    for (&c, coll) in columns.iter().zip(&colls) {
        if !coll.eq_ignore_ascii_case("BINARY") {
            return Err(format!(
                "column '{}' has collation {coll}: stream conditions compare text byte for byte, \
                 so the columns they read must use the default BINARY collation",
                table.columns[c].name
            ));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- lexing

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    /// A bare word: a keyword or a column name.
    Word(String),
    /// A "double-quoted" column name.
    Quoted(String),
    /// An unsigned number as written.
    Num(String),
    Str(String),
    Param(String),
    LParen,
    RParen,
    Comma,
    Op(Op),
    /// An arithmetic or bitwise operator: `+ - * / % || & | ~ << >>`.
    Arith(&'static str),
    Eof,
}

fn position(src: &str, at: usize) -> usize {
    src[..at].chars().count() + 1
}

fn lex(src: &str) -> Result<Vec<(Tok, usize)>, String> {
    let bytes = src.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    let err =
        |at: usize, msg: String| format!("syntax error at position {}: {msg}", position(src, at));
    while i < bytes.len() {
        let c = bytes[i];
        let start = i;
        let word_char = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b >= 0x80;
        let tok = match c {
            b' ' | b'\t' | b'\n' | b'\r' | 0x0c => {
                i += 1;
                continue;
            }
            b'(' => {
                i += 1;
                Tok::LParen
            }
            b')' => {
                i += 1;
                Tok::RParen
            }
            b',' => {
                i += 1;
                Tok::Comma
            }
            b'=' => {
                i += if bytes.get(i + 1) == Some(&b'=') {
                    2
                } else {
                    1
                };
                Tok::Op(Op::Eq)
            }
            b'!' if bytes.get(i + 1) == Some(&b'=') => {
                i += 2;
                Tok::Op(Op::Ne)
            }
            b'<' => match bytes.get(i + 1) {
                Some(b'>') => {
                    i += 2;
                    Tok::Op(Op::Ne)
                }
                Some(b'=') => {
                    i += 2;
                    Tok::Op(Op::Le)
                }
                Some(b'<') => {
                    i += 2;
                    Tok::Arith("<<")
                }
                _ => {
                    i += 1;
                    Tok::Op(Op::Lt)
                }
            },
            b'>' => match bytes.get(i + 1) {
                Some(b'=') => {
                    i += 2;
                    Tok::Op(Op::Ge)
                }
                Some(b'>') => {
                    i += 2;
                    Tok::Arith(">>")
                }
                _ => {
                    i += 1;
                    Tok::Op(Op::Gt)
                }
            },
            b'|' if bytes.get(i + 1) == Some(&b'|') => {
                i += 2;
                Tok::Arith("||")
            }
            b'+' | b'-' | b'*' | b'/' | b'%' | b'&' | b'|' | b'~' => {
                i += 1;
                Tok::Arith(match c {
                    b'+' => "+",
                    b'-' => "-",
                    b'*' => "*",
                    b'/' => "/",
                    b'%' => "%",
                    b'&' => "&",
                    b'|' => "|",
                    _ => "~",
                })
            }
            b'\'' => {
                let mut s = String::new();
                i += 1;
                loop {
                    let Some(rel) = src[i..].find('\'') else {
                        return Err(err(
                            start,
                            "unterminated 'text' (a quote is written '')".into(),
                        ));
                    };
                    s.push_str(&src[i..i + rel]);
                    i += rel + 1;
                    if bytes.get(i) == Some(&b'\'') {
                        s.push('\'');
                        i += 1;
                    } else {
                        break;
                    }
                }
                Tok::Str(s)
            }
            b'"' => {
                let mut s = String::new();
                i += 1;
                loop {
                    let Some(rel) = src[i..].find('"') else {
                        return Err(err(start, "unterminated \"column name\"".into()));
                    };
                    s.push_str(&src[i..i + rel]);
                    i += rel + 1;
                    if bytes.get(i) == Some(&b'"') {
                        s.push('"');
                        i += 1;
                    } else {
                        break;
                    }
                }
                Tok::Quoted(s)
            }
            b':' => {
                i += 1;
                while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                    i += 1;
                }
                if i == start + 1 {
                    return Err(err(
                        start,
                        "a parameter is ':' then its name (letters, digits, _)".into(),
                    ));
                }
                Tok::Param(src[start + 1..i].to_string())
            }
            b'0'..=b'9' | b'.' => {
                if c == b'.' && !bytes.get(i + 1).is_some_and(u8::is_ascii_digit) {
                    return Err(err(start, format!("unexpected '.' ({SUPPORTED})")));
                }
                while i < bytes.len() && bytes[i].is_ascii_digit() {
                    i += 1;
                }
                if bytes.get(i) == Some(&b'.') {
                    i += 1;
                    while i < bytes.len() && bytes[i].is_ascii_digit() {
                        i += 1;
                    }
                }
                if matches!(bytes.get(i), Some(b'e' | b'E')) {
                    i += 1;
                    if matches!(bytes.get(i), Some(b'+' | b'-')) {
                        i += 1;
                    }
                    let digits = i;
                    while i < bytes.len() && bytes[i].is_ascii_digit() {
                        i += 1;
                    }
                    if i == digits {
                        return Err(err(
                            start,
                            "malformed number: no digits after its exponent".into(),
                        ));
                    }
                }
                if i < bytes.len() && (word_char(bytes[i]) || bytes[i] == b'.') {
                    return Err(err(
                        start,
                        "malformed number (numbers are decimal: 12, -3, 1.5, 2e10)".into(),
                    ));
                }
                Tok::Num(src[start..i].to_string())
            }
            _ if word_char(c) && !c.is_ascii_digit() => {
                while i < bytes.len() && word_char(bytes[i]) {
                    i += 1;
                }
                Tok::Word(src[start..i].to_string())
            }
            _ => {
                let ch = src[start..].chars().next().expect("a character");
                let hint = match ch {
                    '?' | '@' | '$' => " (parameters are written :name)",
                    '`' | '[' => " (quote a column name with \"double quotes\")",
                    ';' => " (a condition is one expression)",
                    _ => "",
                };
                return Err(err(start, format!("unexpected character '{ch}'{hint}")));
            }
        };
        out.push((tok, start));
    }
    out.push((Tok::Eof, src.len()));
    Ok(out)
}

// ---------------------------------------------------------------- parsing

/// Keywords that end or join conditions; never a bare column name.
const RESERVED: &[&str] = &["AND", "OR", "NOT", "IN", "IS", "NULL", "TRUE", "FALSE"];
/// SQL we recognise only to refuse clearly.
const UNSUPPORTED: &[&str] = &[
    "LIKE", "GLOB", "REGEXP", "MATCH", "BETWEEN", "EXISTS", "SELECT", "CASE", "CAST", "COLLATE",
    "ESCAPE", "ISNULL", "NOTNULL", "WHEN", "THEN", "ELSE", "END", "FROM", "WHERE", "DISTINCT",
];

enum Side {
    Col(usize),
    Val(Operand),
    /// TRUE, FALSE or NULL: a value, or a whole condition alone.
    Kw(Option<bool>),
}

struct Parser<'a> {
    src: &'a str,
    toks: Vec<(Tok, usize)>,
    i: usize,
    depth: usize,
    table: &'a Table,
    columns: Vec<usize>,
    params: BTreeMap<String, ParamType>,
    /// The first column each parameter was compared with.
    first_use: BTreeMap<String, usize>,
}

impl Parser<'_> {
    fn peek(&self) -> &Tok {
        &self.toks[self.i].0
    }

    fn peek_at(&self, ahead: usize) -> &Tok {
        &self.toks[(self.i + ahead).min(self.toks.len() - 1)].0
    }

    fn at(&self) -> usize {
        self.toks[self.i].1
    }

    fn bump(&mut self) -> Tok {
        let t = self.toks[self.i].0.clone();
        if self.i + 1 < self.toks.len() {
            self.i += 1;
        }
        t
    }

    fn is_kw(&self, kw: &str) -> bool {
        matches!(self.peek(), Tok::Word(w) if w.eq_ignore_ascii_case(kw))
    }

    fn error_at(&self, at: usize, msg: impl std::fmt::Display) -> String {
        format!("syntax error at position {}: {msg}", position(self.src, at))
    }

    /// A message for the token at hand where `expected` was wanted, naming
    /// unsupported SQL as such.
    fn unexpected(&self, expected: &str) -> String {
        let at = self.at();
        let msg = match self.peek() {
            Tok::Arith(op) => format!("arithmetic and bitwise operators ({op}) are not supported"),
            Tok::Word(w) if self.peek_at(1) == &Tok::LParen => {
                format!("functions ({w}(...)) are not supported")
            }
            Tok::Word(w) if UNSUPPORTED.iter().any(|k| w.eq_ignore_ascii_case(k)) => {
                format!("{} is not supported", w.to_ascii_uppercase())
            }
            Tok::Eof => format!("the condition ends where {expected} was expected"),
            Tok::Word(w) => format!("expected {expected}, found '{w}'"),
            Tok::Quoted(w) => format!("expected {expected}, found \"{w}\""),
            Tok::Num(n) => format!("expected {expected}, found {n}"),
            Tok::Str(s) => format!("expected {expected}, found '{s}'"),
            Tok::Param(p) => format!("expected {expected}, found :{p}"),
            Tok::LParen => format!("expected {expected}, found '('"),
            Tok::RParen => format!("expected {expected}, found ')'"),
            Tok::Comma => format!("expected {expected}, found ','"),
            Tok::Op(op) => format!("expected {expected}, found '{}'", op.sql()),
        };
        self.error_at(at, format!("{msg} ({SUPPORTED})"))
    }

    fn enter(&mut self) -> Result<(), String> {
        self.depth += 1;
        if self.depth > DEPTH_MAX {
            return Err(self.error_at(
                self.at(),
                format!(
                    "the condition nests deeper than {DEPTH_MAX} levels of parentheses and NOT"
                ),
            ));
        }
        Ok(())
    }

    fn or(&mut self) -> Result<Node, String> {
        let mut items = vec![self.and()?];
        while self.is_kw("OR") {
            self.bump();
            items.push(self.and()?);
        }
        Ok(if items.len() == 1 {
            items.pop().expect("one")
        } else {
            Node::Or(items)
        })
    }

    fn and(&mut self) -> Result<Node, String> {
        let mut items = vec![self.not()?];
        while self.is_kw("AND") {
            self.bump();
            items.push(self.not()?);
        }
        Ok(if items.len() == 1 {
            items.pop().expect("one")
        } else {
            Node::And(items)
        })
    }

    fn not(&mut self) -> Result<Node, String> {
        if self.is_kw("NOT") {
            self.enter()?;
            self.bump();
            let inner = self.not()?;
            self.depth -= 1;
            return Ok(Node::Not(Box::new(inner)));
        }
        self.predicate()
    }

    fn predicate(&mut self) -> Result<Node, String> {
        if self.peek() == &Tok::LParen {
            self.enter()?;
            self.bump();
            let inner = self.or()?;
            if self.peek() != &Tok::RParen {
                return Err(self.unexpected("')'"));
            }
            self.bump();
            self.depth -= 1;
            return Ok(inner);
        }
        let left_at = self.at();
        let left = self.operand()?;
        match self.peek().clone() {
            Tok::Op(op) => {
                self.bump();
                let right_at = self.at();
                let right = self.operand()?;
                match (left, right) {
                    (Side::Col(col), value) => self.comparison(col, op, value, right_at),
                    (value, Side::Col(col)) => self.comparison(col, op.flip(), value, left_at),
                    _ => Err(self.error_at(
                        left_at,
                        format!("a comparison needs a column on one side ({SUPPORTED})"),
                    )),
                }
            }
            Tok::Word(w) if w.eq_ignore_ascii_case("IS") => {
                self.bump();
                let not = self.is_kw("NOT");
                if not {
                    self.bump();
                }
                if !self.is_kw("NULL") {
                    return Err(self.error_at(
                        self.at(),
                        format!("IS is supported only as IS NULL and IS NOT NULL ({SUPPORTED})"),
                    ));
                }
                self.bump();
                let Side::Col(col) = left else {
                    return Err(self.error_at(left_at, "IS NULL needs a column on its left"));
                };
                Ok(Node::IsNull { col, not })
            }
            Tok::Word(w)
                if w.eq_ignore_ascii_case("IN")
                    || (w.eq_ignore_ascii_case("NOT")
                        && matches!(self.peek_at(1), Tok::Word(v) if v.eq_ignore_ascii_case("IN"))) =>
            {
                let not = w.eq_ignore_ascii_case("NOT");
                self.bump();
                if not {
                    self.bump();
                }
                let Side::Col(col) = left else {
                    return Err(self.error_at(left_at, "IN needs a column on its left"));
                };
                self.in_rest(col, not)
            }
            _ if !(matches!(self.peek(), Tok::Eof | Tok::RParen)
                || self.is_kw("AND")
                || self.is_kw("OR")) =>
            {
                Err(self.unexpected("a comparison (=, <, IN, IS NULL, ...)"))
            }
            _ => match left {
                Side::Kw(c) => Ok(Node::Const(c)),
                Side::Col(_) => Err(self.error_at(
                    left_at,
                    "a column alone is not a condition: compare it (done = 1, name IS NOT NULL)",
                )),
                Side::Val(_) => Err(self.unexpected("a comparison")),
            },
        }
    }

    fn in_rest(&mut self, col: usize, not: bool) -> Result<Node, String> {
        match self.peek().clone() {
            Tok::Param(name) => {
                let at = self.at();
                self.bump();
                self.use_param(&name, col, true, at)?;
                Ok(Node::InList {
                    col,
                    not,
                    param: name,
                })
            }
            Tok::LParen => {
                self.bump();
                let mut items = Vec::new();
                if self.peek() == &Tok::RParen {
                    self.bump();
                    return Ok(Node::In { col, not, items });
                }
                loop {
                    let at = self.at();
                    let item = match self.operand()? {
                        Side::Col(_) => {
                            return Err(self.error_at(
                                at,
                                "an IN list holds literals and :parameters, not columns",
                            ))
                        }
                        Side::Kw(c) => Operand::Lit(kw_value(c)),
                        Side::Val(v) => v,
                    };
                    items.push(self.typed(col, item, at)?);
                    match self.peek() {
                        Tok::Comma => {
                            self.bump();
                        }
                        Tok::RParen => {
                            self.bump();
                            break;
                        }
                        _ => return Err(self.unexpected("',' or ')'")),
                    }
                }
                Ok(Node::In { col, not, items })
            }
            _ => Err(self.unexpected("'(' or a :list parameter after IN")),
        }
    }

    fn comparison(&mut self, col: usize, op: Op, value: Side, at: usize) -> Result<Node, String> {
        let rhs = match value {
            Side::Kw(c) => Operand::Lit(kw_value(c)),
            Side::Val(v) => v,
            Side::Col(_) => {
                return Err(self.error_at(
                    at,
                    format!("comparing two columns is not supported ({SUPPORTED})"),
                ))
            }
        };
        let rhs = self.typed(col, rhs, at)?;
        Ok(Node::Cmp { col, op, rhs })
    }

    /// Checks a literal against the column it is compared with, or records
    /// a parameter's use.
    fn typed(&mut self, col: usize, value: Operand, at: usize) -> Result<Operand, String> {
        match &value {
            Operand::Lit(v) => {
                let column = &self.table.columns[col];
                let affinity = Affinity::of(&column.declared_type);
                if !affinity.admits(v) {
                    return Err(format!(
                        "at position {}: {} does not fit column '{}' ({}), which takes {}",
                        position(self.src, at),
                        show(v),
                        column.name,
                        affinity.name(),
                        affinity.takes()
                    ));
                }
            }
            Operand::Param(name) => {
                let name = name.clone();
                self.use_param(&name, col, false, at)?;
            }
        }
        Ok(value)
    }

    fn use_param(&mut self, name: &str, col: usize, list: bool, at: usize) -> Result<(), String> {
        let affinity = Affinity::of(&self.table.columns[col].declared_type);
        if let Some(ty) = self.params.get(name) {
            let first = &self.table.columns[self.first_use[name]];
            if ty.list != list {
                return Err(format!(
                    "at position {}: parameter :{name} is used both as a list (IN :{name}) and as one value",
                    position(self.src, at)
                ));
            }
            if ty.affinity.kind() != affinity.kind() {
                let column = &self.table.columns[col];
                return Err(format!(
                    "at position {}: parameter :{name} is compared with column '{}' ({}) and column '{}' ({}), \
                     which take different types of value: use two parameters",
                    position(self.src, at),
                    first.name,
                    ty.affinity.name(),
                    column.name,
                    affinity.name()
                ));
            }
            return Ok(());
        }
        self.params
            .insert(name.to_string(), ParamType { affinity, list });
        self.first_use.insert(name.to_string(), col);
        Ok(())
    }

    fn operand(&mut self) -> Result<Side, String> {
        let at = self.at();
        match self.peek().clone() {
            Tok::Word(w) => {
                let upper = w.to_ascii_uppercase();
                match upper.as_str() {
                    "NULL" => {
                        self.bump();
                        return Ok(Side::Kw(None));
                    }
                    "TRUE" => {
                        self.bump();
                        return Ok(Side::Kw(Some(true)));
                    }
                    "FALSE" => {
                        self.bump();
                        return Ok(Side::Kw(Some(false)));
                    }
                    _ => {}
                }
                if self.peek_at(1) == &Tok::LParen
                    || RESERVED.contains(&upper.as_str())
                    || UNSUPPORTED.contains(&upper.as_str())
                {
                    return Err(self.unexpected("a column, a literal or a :parameter"));
                }
                self.bump();
                Ok(Side::Col(self.column(&w, at)?))
            }
            Tok::Quoted(name) => {
                self.bump();
                Ok(Side::Col(self.column(&name, at)?))
            }
            Tok::Num(n) => {
                self.bump();
                Ok(Side::Val(Operand::Lit(number(&n, false))))
            }
            Tok::Arith(sign @ ("-" | "+")) if matches!(self.peek_at(1), Tok::Num(_)) => {
                self.bump();
                let Tok::Num(n) = self.bump() else {
                    unreachable!("checked")
                };
                Ok(Side::Val(Operand::Lit(number(&n, sign == "-"))))
            }
            Tok::Str(s) => {
                self.bump();
                Ok(Side::Val(Operand::Lit(Value::Text(s))))
            }
            Tok::Param(p) => {
                self.bump();
                Ok(Side::Val(Operand::Param(p)))
            }
            _ => Err(self.unexpected("a column, a literal or a :parameter")),
        }
    }

    fn column(&mut self, name: &str, at: usize) -> Result<usize, String> {
        let Some(idx) = self
            .table
            .columns
            .iter()
            .position(|c| c.name.eq_ignore_ascii_case(name))
        else {
            return Err(format!(
                "at position {}: unknown column '{name}': table '{}' has {}",
                position(self.src, at),
                self.table.name,
                self.table
                    .columns
                    .iter()
                    .map(|c| c.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        };
        self.columns.push(idx);
        Ok(idx)
    }
}

fn kw_value(c: Option<bool>) -> Value {
    match c {
        Some(b) => Value::Integer(i64::from(b)),
        None => Value::Null,
    }
}

/// A numeric literal as SQLite reads it: an integer if it has neither a
/// point nor an exponent and fits an i64, else a real.
fn number(text: &str, negative: bool) -> Value {
    let signed = if negative {
        format!("-{text}")
    } else {
        text.to_string()
    };
    if text.bytes().all(|b| b.is_ascii_digit()) {
        if let Ok(i) = signed.parse::<i64>() {
            return Value::Integer(i);
        }
    }
    // The lexer only lets through what f64's parser reads.
    Value::Real(signed.parse::<f64>().unwrap_or(f64::NAN))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::Schema;

    const CREATE: &str = "CREATE TABLE t (id TEXT PRIMARY KEY, a INTEGER, b REAL, s TEXT, x BLOB, u, n NUMERIC, \"in\" TEXT, ci TEXT COLLATE NOCASE)";

    fn table() -> Table {
        let schema = Schema::parse(&format!("version = 1\n[tables.t]\ncreate = '{CREATE}'\n"))
            .expect("schema");
        schema.table("t").expect("t").clone()
    }

    fn compile(src: &str) -> Result<Filter, String> {
        Filter::compile(src, &table())
    }

    fn err(src: &str) -> String {
        compile(src).expect_err(src)
    }

    fn one(pairs: &[(&str, Value)]) -> BTreeMap<String, Param> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), Param::One(v.clone())))
            .collect()
    }

    #[test]
    fn affinity_follows_sqlite_rules() {
        for (t, a) in [
            ("INTEGER", Affinity::Integer),
            ("BIGINT", Affinity::Integer),
            ("VARCHAR(10)", Affinity::Text),
            ("CLOB", Affinity::Text),
            ("BLOB", Affinity::Blob),
            ("", Affinity::Blob),
            ("DOUBLE PRECISION", Affinity::Real),
            ("FLOAT", Affinity::Real),
            ("DECIMAL(10,5)", Affinity::Numeric),
            ("BOOLEAN", Affinity::Numeric),
            ("CHARINT", Affinity::Integer),
        ] {
            assert_eq!(Affinity::of(t), a, "{t}");
        }
    }

    #[test]
    fn filter_parses_keywords_in_any_case_and_quoted_columns() {
        let f =
            compile("A = :p aNd \"S\" IS not null Or NoT (b >= 1.5) AND \"in\" in ('x', 'it''s')")
                .unwrap();
        assert_eq!(f.columns(), &[1, 2, 3, 7]);
        assert_eq!(
            f.params().get("p"),
            Some(&ParamType {
                affinity: Affinity::Integer,
                list: false
            })
        );
        let (sql, values) = f.to_sql(&one(&[("p", Value::Integer(4))]));
        assert_eq!(
            sql,
            "((\"a\" = ?1 AND \"s\" IS NOT NULL) OR (NOT (\"b\" >= ?2) AND \"in\" IN (?3, ?4)))"
        );
        assert_eq!(
            values,
            vec![
                Value::Integer(4),
                Value::Real(1.5),
                Value::Text("x".into()),
                Value::Text("it's".into())
            ]
        );
        for src in ["TRUE", "true", "FALSE", "NULL", "NOT TRUE", "(TRUE)"] {
            compile(src).unwrap();
        }
        let f = compile("a == -9223372036854775808 AND b <> -1e3 AND a != +3").unwrap();
        let (_, values) = f.to_sql(&BTreeMap::new());
        assert_eq!(
            values,
            vec![
                Value::Integer(i64::MIN),
                Value::Real(-1000.0),
                Value::Integer(3)
            ]
        );
        // Past i64, an integer literal is a real, as in SQLite.
        let f = compile("a < 9223372036854775808").unwrap();
        assert_eq!(
            f.to_sql(&BTreeMap::new()).1,
            vec![Value::Real(9_223_372_036_854_775_808.0)]
        );
    }

    #[test]
    fn filter_value_on_the_left_is_normalised() {
        let f = compile("3 < a").unwrap();
        assert_eq!(f.to_sql(&BTreeMap::new()).0, "\"a\" > ?1");
        let row = |a: Value| {
            vec![
                Value::Text("k".into()),
                a,
                Value::Null,
                Value::Null,
                Value::Null,
                Value::Null,
                Value::Null,
                Value::Null,
                Value::Null,
            ]
        };
        assert!(f.matches(&row(Value::Integer(4)), &BTreeMap::new()));
        assert!(!f.matches(&row(Value::Integer(3)), &BTreeMap::new()));
        assert!(!f.matches(&row(Value::Null), &BTreeMap::new()));
        // TEXT sorts after every number in a numeric column.
        assert!(f.matches(&row(Value::Text("1".into())), &BTreeMap::new()));
    }

    #[test]
    fn filter_key_is_the_indexable_equality() {
        assert_eq!(compile("a = :p AND b > 3").unwrap().key(), Some((1, "p")));
        assert_eq!(compile(":p = a").unwrap().key(), Some((1, "p")));
        assert_eq!(
            compile("b > 3 AND (s IS NULL AND s = :q)").unwrap().key(),
            Some((3, "q"))
        );
        assert_eq!(compile("a = :p OR b = 1").unwrap().key(), None);
        assert_eq!(compile("a = 1").unwrap().key(), None);
        assert_eq!(compile("NOT a = :p").unwrap().key(), None);
        assert_eq!(compile("a != :p").unwrap().key(), None);
    }

    #[test]
    fn filter_refusals_say_what_and_where() {
        for (src, want) in [
            ("lower(s) = 'a'", "functions (lower(...)) are not supported"),
            ("s LIKE 'a%'", "LIKE is not supported"),
            ("a BETWEEN 1 AND 2", "BETWEEN is not supported"),
            ("a = 1 + 2", "arithmetic"),
            ("a + 1 = 2", "arithmetic"),
            ("a = b", "comparing two columns is not supported"),
            ("1 = 1", "needs a column on one side"),
            ("a IN (SELECT id FROM t)", "SELECT is not supported"),
            ("zz = 1", "unknown column 'zz'"),
            ("a = 'x'", "text 'x' does not fit column 'a' (INTEGER)"),
            ("s = 1", "integer 1 does not fit column 's' (TEXT)"),
            ("s IN ('a', 2)", "integer 2 does not fit column 's'"),
            ("s = TRUE", "does not fit column 's'"),
            ("a = :p AND s = :p", "parameter :p is compared with column 'a' (INTEGER) and column 's' (TEXT)"),
            ("a = :p OR a IN :p", "parameter :p is used both as a list"),
            ("ci = 'a'", "column 'ci' has collation NOCASE"),
            ("a = 1 AND", "syntax error at position 10"),
            ("a = 'open", "syntax error at position 5: unterminated"),
            ("a = ?", "syntax error at position 5: unexpected character '?' (parameters are written :name)"),
            ("a = :", "syntax error at position 5"),
            ("a", "a column alone is not a condition"),
            ("a IS 3", "IS is supported only as IS NULL"),
            ("a = 1 a = 2", "syntax error at position 7"),
            ("(a = 1", "')' was expected"),
            ("a = 0x10", "malformed number"),
            ("", "empty"),
            ("in = 1", "syntax error at position 1"),
            ("a IN (b)", "not columns"),
            ("a = 1; DROP TABLE t", "unexpected character ';'"),
        ] {
            let e = err(src);
            assert!(e.contains(want), "{src}: {e}");
        }
        // Unsupported constructs list what is supported.
        assert!(err("s LIKE 'a'").contains("supported: a column compared with"));
        // Positions count characters, not bytes.
        let e = err("s = 'é' AND AND");
        assert!(e.contains("position 13"), "{e}");
    }

    #[test]
    fn filter_bounds_source_and_nesting() {
        let deep = |n: usize| format!("{}a = 1{}", "(".repeat(n), ")".repeat(n));
        compile(&deep(DEPTH_MAX)).unwrap();
        assert!(err(&deep(DEPTH_MAX + 1)).contains("nests deeper than 32"));
        let nots = format!("{}a = 1", "NOT ".repeat(DEPTH_MAX + 1));
        assert!(err(&nots).contains("nests deeper"));
        compile(&format!("{}a = 1", "NOT ".repeat(DEPTH_MAX))).unwrap();
        let long = format!("s IN ({})", vec!["'abcdefgh'"; 500].join(", "));
        assert!(err(&long).contains("at most 4096"));
    }

    #[test]
    fn filter_params_are_checked_by_name() {
        let f = compile("a = :n AND s IN :tags AND x = :any").unwrap();
        let ok = |extra: &[(&str, Param)]| {
            let mut p: BTreeMap<String, Param> = [
                ("n".to_string(), Param::One(Value::Real(2.0))),
                (
                    "tags".to_string(),
                    Param::Many(vec![Value::Text("a".into()), Value::Null]),
                ),
                ("any".to_string(), Param::One(Value::Blob(vec![1]))),
            ]
            .into_iter()
            .collect();
            for (k, v) in extra {
                p.insert(k.to_string(), v.clone());
            }
            f.check_params(&p)
        };
        ok(&[]).unwrap();
        for (extra, want) in [
            (
                vec![("zz", Param::One(Value::Null))],
                "unknown parameter :zz",
            ),
            (
                vec![("n", Param::One(Value::Text("1".into())))],
                "parameter :n is text '1', but it is compared with a column of INTEGER affinity",
            ),
            (
                vec![("n", Param::Many(vec![]))],
                "parameter :n must be one value, not a list",
            ),
            (
                vec![("tags", Param::One(Value::Text("a".into())))],
                "parameter :tags must be a list",
            ),
            (
                vec![("tags", Param::Many(vec![Value::Integer(1)]))],
                "parameter :tags is integer 1",
            ),
            (
                vec![("tags", Param::Many(vec![Value::Null; LIST_ITEMS_MAX + 1]))],
                "parameter :tags has 1001 items",
            ),
            (
                vec![("any", Param::One(Value::Blob(vec![0; 5000])))],
                "largest is :any",
            ),
            (
                vec![("n", Param::One(Value::Real(f64::NAN)))],
                "parameter :n is NaN",
            ),
        ] {
            let e = ok(&extra).unwrap_err();
            assert!(e.contains(want), "{extra:?}: {e}");
        }
        let mut missing = BTreeMap::new();
        missing.insert("n".to_string(), Param::One(Value::Integer(1)));
        let e = f.check_params(&missing).unwrap_err();
        assert!(e.contains("parameter :any is missing"), "{e}");
        let none = compile("TRUE").unwrap();
        assert!(none
            .check_params(&one(&[("x", Value::Null)]))
            .unwrap_err()
            .contains("takes no parameters"));
    }

    #[test]
    fn filter_params_size_is_postcards() {
        let params: BTreeMap<String, Param> = [
            ("a".to_string(), Param::One(Value::Integer(i64::MIN))),
            ("bb".to_string(), Param::One(Value::Integer(-1))),
            ("c".to_string(), Param::One(Value::Real(1.5))),
            ("d".repeat(200), Param::One(Value::Text("é".repeat(100)))),
            (
                "e".to_string(),
                Param::Many(vec![
                    Value::Null,
                    Value::Blob(vec![7; 300]),
                    Value::Integer(1 << 40),
                ]),
            ),
        ]
        .into_iter()
        .collect();
        assert_eq!(
            params_size(&params),
            postcard::to_allocvec(&params).unwrap().len()
        );
    }

    #[test]
    fn filter_params_from_json() {
        let f = compile("a = :n AND b = :r AND s IN :tags AND u = :u").unwrap();
        let p = f
            .params_from_json(&serde_json::json!({
                "n": 3, "r": 2.5, "tags": ["a", "b"], "u": true
            }))
            .unwrap();
        assert_eq!(p["n"], Param::One(Value::Integer(3)));
        assert_eq!(p["r"], Param::One(Value::Real(2.5)));
        assert_eq!(
            p["tags"],
            Param::Many(vec![Value::Text("a".into()), Value::Text("b".into())])
        );
        assert_eq!(p["u"], Param::One(Value::Integer(1)));
        let p = f
            .params_from_json(&serde_json::json!({
                "n": 4.0, "r": 1e300, "tags": [], "u": null
            }))
            .unwrap();
        assert_eq!(p["n"], Param::One(Value::Integer(4)));
        assert_eq!(p["r"], Param::One(Value::Real(1e300)));
        assert_eq!(p["u"], Param::One(Value::Null));
        let p = f
            .params_from_json(&serde_json::json!({
                "n": 18446744073709551615u64, "r": 1, "tags": [], "u": "x"
            }))
            .unwrap();
        assert_eq!(p["n"], Param::One(Value::Real(18446744073709551615.0)));
        for (json, want) in [
            (serde_json::json!([1]), "must be a JSON object"),
            (
                serde_json::json!({"n": {"x": 1}, "r": 1, "tags": [], "u": 1}),
                "parameter :n is an object",
            ),
            (
                serde_json::json!({"n": 1, "r": 1, "tags": [[1]], "u": 1}),
                "parameter :tags: a list holds",
            ),
            (
                serde_json::json!({"n": "1", "r": 1, "tags": [], "u": 1}),
                "parameter :n is text '1'",
            ),
        ] {
            let e = f.params_from_json(&json).unwrap_err();
            assert!(e.contains(want), "{json}: {e}");
        }
    }

    #[test]
    fn filter_compare_is_sqlites_order() {
        use Value::*;
        let ord = |a: Value, b: Value| compare(&a, &b);
        assert_eq!(ord(Integer(1), Real(1.0)), Some(Ordering::Equal));
        assert_eq!(ord(Real(-0.0), Integer(0)), Some(Ordering::Equal));
        assert_eq!(
            ord(Integer(i64::MAX), Real(9_223_372_036_854_775_808.0)),
            Some(Ordering::Less)
        );
        assert_eq!(
            ord(Integer(i64::MIN), Real(-9_223_372_036_854_775_808.0)),
            Some(Ordering::Equal)
        );
        assert_eq!(ord(Integer(2), Real(2.5)), Some(Ordering::Less));
        assert_eq!(ord(Integer(-2), Real(-2.5)), Some(Ordering::Greater));
        assert_eq!(
            ord(Real(f64::INFINITY), Text(String::new())),
            Some(Ordering::Less)
        );
        assert_eq!(ord(Text("b".into()), Blob(vec![0])), Some(Ordering::Less));
        assert_eq!(
            ord(Text("B".into()), Text("a".into())),
            Some(Ordering::Less)
        );
        assert_eq!(ord(Null, Null), None);
        assert_eq!(ord(Real(f64::NAN), Integer(1)), None);
    }
}
