//! Stream conditions against their oracle, SQLite itself: random rows of
//! every storage class in a real table, random well-typed conditions and
//! parameters; the rows `Filter::matches` accepts must be exactly the rows
//! SQLite selects with `Filter::to_sql`, and (where the condition is also
//! plain SQLite SQL: no list parameters) exactly the rows SQLite selects
//! with the condition as written. Then the schema's `[streams]` sections:
//! what parses, and that each bad stream is refused naming it.

use std::collections::BTreeMap;

use hearth_engine::filter::{Filter, Param};
use hearth_engine::{Schema, SchemaError, Value};
use proptest::prelude::*;
use rusqlite::Connection;

const CREATE: &str = "CREATE TABLE t (pk INTEGER PRIMARY KEY, i INTEGER, r REAL, n NUMERIC, s TEXT, b BLOB, u);
CREATE INDEX t_i ON t (i); CREATE INDEX t_r ON t (r); CREATE INDEX t_s ON t (s); CREATE INDEX t_u ON t (u)";

/// The filterable columns, their index in the table, and whether they take
/// numbers (n), text (t) or anything (a).
const COLUMNS: [(&str, usize, char); 6] = [
    ("i", 1, 'n'),
    ("r", 2, 'n'),
    ("n", 3, 'n'),
    ("s", 4, 't'),
    ("b", 5, 'a'),
    ("u", 6, 'a'),
];

fn table() -> hearth_engine::schema::Table {
    let schema = Schema::parse(&format!(
        "version = 1\n[tables.t]\ncreate = \"\"\"{CREATE}\"\"\"\n"
    ))
    .unwrap();
    schema.table("t").unwrap().clone()
}

fn integer() -> impl Strategy<Value = i64> {
    prop_oneof![
        Just(i64::MIN),
        Just(i64::MAX),
        Just(i64::MIN + 1),
        Just(i64::MAX - 1),
        Just(9_007_199_254_740_993), // 2^53 + 1: no f64 holds it
        -3i64..4,
        any::<i64>(),
    ]
}

fn real() -> impl Strategy<Value = f64> {
    prop_oneof![
        Just(-0.0),
        Just(0.0),
        Just(9_223_372_036_854_775_808.0), // 2^63
        Just(-9_223_372_036_854_775_808.0),
        Just(9_007_199_254_740_992.0),
        Just(f64::INFINITY),
        Just(f64::NEG_INFINITY),
        Just(1e300),
        (-12i32..12).prop_map(|k| f64::from(k) / 4.0),
        any::<f64>().prop_filter("SQLite has no NaN", |f| !f.is_nan()),
    ]
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "",
            "a",
            "A",
            "ab",
            "b",
            "é",
            "it's",
            "1",
            "1.5",
            " 2",
            "-0",
            "9223372036854775808",
            "a\u{0}b"
        ])
        .prop_map(str::to_string),
        "[abAB']{0,3}",
    ]
}

fn value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        integer().prop_map(Value::Integer),
        real().prop_map(Value::Real),
        text().prop_map(Value::Text),
        prop::collection::vec(0u8..3, 0..3).prop_map(Value::Blob),
    ]
}

fn number_or_null() -> impl Strategy<Value = Value> {
    prop_oneof![
        1 => Just(Value::Null),
        3 => integer().prop_map(Value::Integer),
        3 => real().prop_map(Value::Real),
    ]
}

fn text_or_null() -> impl Strategy<Value = Value> {
    prop_oneof![1 => Just(Value::Null), 4 => text().prop_map(Value::Text)]
}

fn fitting(kind: char) -> BoxedStrategy<Value> {
    match kind {
        'n' => number_or_null().boxed(),
        't' => text_or_null().boxed(),
        _ => value().boxed(),
    }
}

/// A literal's source text for a column of this kind. Reals are ones every
/// decimal parser reads exactly (the oracle reads the source too).
fn literal(kind: char) -> BoxedStrategy<String> {
    let number = prop_oneof![
        integer().prop_map(|i| i.to_string()),
        (-12i32..12).prop_map(|k| format!("{:?}", f64::from(k) / 4.0)),
        prop::sample::select(vec![
            "-0.0",
            "9223372036854775808",
            "9.223372036854775807e18",
            "1e300",
            "-1E3",
            ".5",
            "+2",
            "TRUE",
            "false",
        ])
        .prop_map(str::to_string),
    ];
    // (No NUL in source text: SQLite's tokenizer would stop at it.)
    let quoted = text()
        .prop_filter("no NUL", |s| !s.contains('\0'))
        .prop_map(|s| format!("'{}'", s.replace('\'', "''")));
    match kind {
        'n' => prop_oneof![1 => Just("NULL".to_string()), 6 => number].boxed(),
        't' => prop_oneof![1 => Just("NULL".to_string()), 6 => quoted].boxed(),
        _ => prop_oneof![1 => Just("NULL".to_string()), 3 => number, 3 => quoted].boxed(),
    }
}

/// A column reference as written: any case, sometimes quoted.
fn column_ref(name: &'static str) -> impl Strategy<Value = String> + Clone {
    (any::<bool>(), any::<bool>()).prop_map(move |(upper, quoted)| {
        let n = if upper {
            name.to_ascii_uppercase()
        } else {
            name.to_string()
        };
        if quoted {
            format!("\"{n}\"")
        } else {
            n
        }
    })
}

/// A value operand for column `c`: a literal or one of its parameters
/// (`:num` is shared by the numeric columns).
fn operand(c: usize) -> BoxedStrategy<String> {
    let (name, _, kind) = COLUMNS[c];
    let mut params = vec![format!(":{name}1"), format!(":{name}2")];
    if kind == 'n' {
        params.push(":num".to_string());
    }
    prop_oneof![literal(kind), prop::sample::select(params)].boxed()
}

fn kw(word: &'static str) -> impl Strategy<Value = String> {
    any::<bool>().prop_map(move |lower| {
        if lower {
            word.to_ascii_lowercase()
        } else {
            word.to_string()
        }
    })
}

fn leaf() -> BoxedStrategy<String> {
    (0..COLUMNS.len())
        .prop_flat_map(|c| {
            let (name, _, _) = COLUMNS[c];
            let col = column_ref(name);
            let op = prop::sample::select(vec!["=", "==", "!=", "<>", "<", "<=", ">", ">="]);
            prop_oneof![
                4 => (col.clone(), op, operand(c), any::<bool>()).prop_map(|(col, op, v, flip)| {
                    if flip {
                        // The same comparison written value-first.
                        let op = match op {
                            "<" => ">",
                            "<=" => ">=",
                            ">" => "<",
                            ">=" => "<=",
                            o => o,
                        };
                        format!("{v} {op} {col}")
                    } else {
                        format!("{col} {op} {v}")
                    }
                }),
                2 => (col.clone(), any::<bool>(), prop::collection::vec(operand(c), 0..4))
                    .prop_map(|(col, not, items)| {
                        format!("{col} {}IN ({})", if not { "NOT " } else { "" }, items.join(", "))
                    }),
                1 => (col.clone(), any::<bool>())
                    .prop_map(move |(col, not)| format!("{col} {}in :{name}l", if not { "not " } else { "" })),
                1 => (col, kw("IS"), any::<bool>(), kw("NULL"))
                    .prop_map(|(col, is, not, null)| format!("{col} {is} {}{null}", if not { "NOT " } else { "" })),
            ]
        })
        .boxed()
}

fn condition() -> impl Strategy<Value = String> {
    prop_oneof![
        20 => leaf(),
        1 => prop::sample::select(vec!["TRUE", "false", "NULL"]).prop_map(str::to_string),
    ]
    .prop_recursive(4, 24, 4, |inner| {
        prop_oneof![
            (inner.clone(), kw("AND"), inner.clone()).prop_map(|(a, k, b)| format!("{a} {k} {b}")),
            (inner.clone(), kw("OR"), inner.clone()).prop_map(|(a, k, b)| format!("{a} {k} {b}")),
            (kw("NOT"), inner.clone()).prop_map(|(k, a)| format!("{k} {a}")),
            inner.prop_map(|a| format!("({a})")),
        ]
    })
}

/// Values for every parameter a condition may name.
fn all_params() -> impl Strategy<Value = BTreeMap<String, Param>> {
    let per_column: Vec<_> = COLUMNS
        .iter()
        .map(|&(name, _, kind)| {
            (
                fitting(kind),
                fitting(kind),
                prop::collection::vec(fitting(kind), 0..4),
            )
                .prop_map(move |(one, two, list)| {
                    vec![
                        (format!("{name}1"), Param::One(one)),
                        (format!("{name}2"), Param::One(two)),
                        (format!("{name}l"), Param::Many(list)),
                    ]
                })
        })
        .collect();
    (per_column, number_or_null()).prop_map(|(cols, num)| {
        let mut out: BTreeMap<String, Param> = cols.into_iter().flatten().collect();
        out.insert("num".into(), Param::One(num));
        out
    })
}

fn rows() -> impl Strategy<Value = Vec<[Value; 6]>> {
    prop::collection::vec(
        [value(), value(), value(), value(), value(), value()],
        0..12,
    )
}

/// The rows' keys SQLite selects with `sql`, binding `bind`.
fn select(conn: &Connection, sql: &str, bind: impl Fn(&mut rusqlite::Statement)) -> Vec<i64> {
    let mut stmt = conn
        .prepare(&format!("SELECT pk FROM t WHERE {sql} ORDER BY pk"))
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    bind(&mut stmt);
    let mut rows = stmt.raw_query();
    let mut out = Vec::new();
    while let Some(row) = rows.next().unwrap() {
        out.push(row.get(0).unwrap());
    }
    out
}

fn check(
    cond: &str,
    rows: &[[Value; 6]],
    all: &BTreeMap<String, Param>,
) -> Result<(), TestCaseError> {
    let table = table();
    let filter =
        Filter::compile(cond, &table).map_err(|e| TestCaseError::fail(format!("{cond}: {e}")))?;
    let params: BTreeMap<String, Param> = all
        .iter()
        .filter(|(k, _)| filter.params().contains_key(*k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    filter.check_params(&params).map_err(TestCaseError::fail)?;

    let conn = Connection::open_in_memory().unwrap();
    conn.execute_batch(CREATE).unwrap();
    for (k, row) in rows.iter().enumerate() {
        conn.execute(
            "INSERT INTO t VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            rusqlite::params![k as i64, row[0], row[1], row[2], row[3], row[4], row[5]],
        )
        .unwrap();
    }
    // The rows as SQLite stores them (each column's affinity applied).
    let stored: Vec<Vec<Value>> = conn
        .prepare("SELECT pk, i, r, n, s, b, u FROM t ORDER BY pk")
        .unwrap()
        .query_map([], |r| (0..7).map(|i| r.get::<_, Value>(i)).collect())
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();

    let ours: Vec<i64> = stored
        .iter()
        .filter(|row| filter.matches(row, &params))
        .map(|row| match row[0] {
            Value::Integer(k) => k,
            _ => unreachable!(),
        })
        .collect();
    // Only the columns the condition reads matter.
    for row in &stored {
        let mut projected = vec![Value::Null; row.len()];
        for &c in filter.columns() {
            projected[c] = row[c].clone();
        }
        prop_assert_eq!(
            filter.matches_by(|i| &projected[i], &params),
            filter.matches(row, &params)
        );
    }

    let (sql, values) = filter.to_sql(&params);
    let theirs = select(&conn, &sql, |stmt| {
        for (i, v) in values.iter().enumerate() {
            stmt.raw_bind_parameter(i + 1, v).unwrap();
        }
    });
    prop_assert_eq!(
        &ours,
        &theirs,
        "condition {} as {} {:?}, rows {:?}",
        cond,
        sql,
        values,
        stored
    );

    // With no list parameter the condition is SQLite's SQL as written.
    if filter.params().values().all(|t| !t.list) {
        let direct = select(&conn, cond, |stmt| {
            for (name, p) in &params {
                let Param::One(v) = p else { unreachable!() };
                let i = stmt.parameter_index(&format!(":{name}")).unwrap().unwrap();
                stmt.raw_bind_parameter(i, v).unwrap();
            }
        });
        prop_assert_eq!(
            &ours,
            &direct,
            "condition {} as written, rows {:?}",
            cond,
            stored
        );
    }

    // A key column equals the key parameter in every matching row.
    if let Some((col, p)) = filter.key() {
        let Param::One(key) = &params[p] else {
            unreachable!()
        };
        for row in stored.iter().filter(|row| filter.matches(row, &params)) {
            prop_assert_eq!(
                hearth_engine::filter::compare(&row[col], key),
                Some(std::cmp::Ordering::Equal)
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn filter_matches_what_sqlite_selects(cond in condition(), rows in rows(), params in all_params()) {
        prop_assume!(cond.len() <= hearth_engine::filter::SOURCE_BYTES_MAX);
        check(&cond, &rows, &params)?;
    }
}

#[test]
fn filter_edge_cases_agree_with_sqlite() {
    let all: BTreeMap<String, Param> = [
        ("i1", Param::One(Value::Integer(i64::MAX))),
        ("r1", Param::One(Value::Integer(i64::MAX))),
        ("num", Param::One(Value::Real(-0.0))),
        ("s1", Param::One(Value::Text("a".into()))),
        ("il", Param::Many(vec![])),
        (
            "sl",
            Param::Many(vec![Value::Null, Value::Text("b".into())]),
        ),
        (
            "ul",
            Param::Many(vec![Value::Blob(vec![1]), Value::Integer(1)]),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let rows = vec![
        [
            Value::Null,
            Value::Null,
            Value::Null,
            Value::Null,
            Value::Null,
            Value::Null,
        ],
        [
            Value::Integer(i64::MAX),
            Value::Real(9_223_372_036_854_775_808.0),
            Value::Text("0".into()),
            Value::Text("b".into()),
            Value::Text("a".into()),
            Value::Real(1.0),
        ],
        [
            Value::Integer(0),
            Value::Integer(i64::MAX),
            Value::Real(-0.0),
            Value::Text("a".into()),
            Value::Blob(b"a".to_vec()),
            Value::Blob(vec![1]),
        ],
        [
            Value::Text("x".into()),
            Value::Real(f64::INFINITY),
            Value::Blob(vec![]),
            Value::Text(String::new()),
            Value::Integer(1),
            Value::Text("1".into()),
        ],
    ];
    for cond in [
        "i = :i1",
        "r = :r1",
        "r < :r1",
        "i = :num OR n = :num OR r = :num",
        "i IN :il",
        "i NOT IN :il",
        "s IN :sl",
        "s NOT IN :sl",
        "u IN :ul",
        "i > 9223372036854775807",
        "r >= 9223372036854775807",
        "i < 9.223372036854775807e18",
        "n = 0",
        "n > 0",
        "b = 'a'",
        "b < 1",
        "u = 1",
        "s >= ''",
        "NOT (s = :s1)",
        "i IN ()",
        "i NOT IN ()",
        "i IN (NULL)",
        "i NOT IN (1, NULL)",
        "NULL",
        "NOT NULL",
        "TRUE AND NULL",
        "FALSE AND NULL",
        "TRUE OR NULL",
        "s = :s1 AND i IS NOT NULL",
    ] {
        check(cond, &rows, &all).unwrap_or_else(|e| panic!("{cond}: {e}"));
    }
}

// ---------------------------------------------------------------- schemas

const TABLES: &str = r#"version = 1
[tables.lists]
create = "CREATE TABLE lists (id TEXT PRIMARY KEY, name TEXT NOT NULL)"

[tables.todos]
create = """CREATE TABLE todos (id TEXT PRIMARY KEY, list_id TEXT NOT NULL, title TEXT COLLATE NOCASE,
  done INTEGER NOT NULL DEFAULT 0, position REAL, due);
CREATE INDEX todos_by_list ON todos (list_id)"""
columns = { due = "manual" }

[tables.settings]
create = "CREATE TABLE settings (id TEXT PRIMARY KEY, value TEXT)"
"#;

fn with_streams(streams: &str) -> Result<Schema, SchemaError> {
    Schema::parse(&format!("{TABLES}\n{streams}"))
}

#[test]
fn filter_schema_streams_parse() {
    let s = with_streams(
        r#"
[streams.list_todos]
table = "todos"
where = "list_id = :list AND done = FALSE"

[streams."open-todos:v1.2"]
table = "TODOS"
where = "true"

[streams.all_lists]
table = "lists"
"#,
    )
    .unwrap();
    assert_eq!(s.streams.len(), 3);
    let list_todos = &s.streams["list_todos"];
    assert_eq!(list_todos.name, "list_todos");
    assert_eq!(list_todos.table, "todos");
    assert_eq!(list_todos.filter.key(), Some((1, "list")));
    assert_eq!(list_todos.filter.columns(), &[1, 3]);
    // The table as the schema spells it, whatever the stream wrote.
    assert_eq!(s.streams["open-todos:v1.2"].table, "todos");
    assert!(s.streams["all_lists"].filter.params().is_empty());
    assert!(s.streamed("todos") && s.streamed("lists"));
    assert!(!s.streamed("settings") && !s.streamed("nope"));
    let names: Vec<&str> = s.streams_of("todos").map(|st| st.name.as_str()).collect();
    assert_eq!(names, ["list_todos", "open-todos:v1.2"]);
    // The conflicts table exists (a manual column) and is nobody's stream.
    assert!(!s.streamed("hearth_conflicts"));
    // A schema without streams has none.
    assert!(with_streams("").unwrap().streams.is_empty());
    assert!(Schema::parse(hearth_engine::DEMO_SCHEMA)
        .unwrap()
        .streams
        .is_empty());
}

#[test]
fn filter_schema_bad_streams_are_refused_by_name() {
    let stream = |name: &str, body: &str| format!("[streams.{name}]\n{body}\n");
    for (streams, name, want) in [
        (
            stream("s1", "table = \"nope\""),
            "s1",
            "unknown table 'nope'",
        ),
        (
            stream("s2", "table = \"todos\"\nwhere = \"colour = 'red'\""),
            "s2",
            "unknown column 'colour'",
        ),
        (
            stream("s3", "table = \"todos\"\nwhere = \"done = 1 AND AND\""),
            "s3",
            "syntax error at position 14",
        ),
        (
            stream(
                "s4",
                "table = \"todos\"\nwhere = \"list_id = :p OR done = :p\"",
            ),
            "s4",
            "parameter :p is compared with column 'list_id' (TEXT) and column 'done' (INTEGER)",
        ),
        (
            stream("s5", "table = \"todos\"\nwhere = \"done = 'yes'\""),
            "s5",
            "text 'yes' does not fit column 'done' (INTEGER)",
        ),
        (
            stream("s6", "table = \"todos\"\nwhere = \"title = :t\""),
            "s6",
            "column 'title' has collation NOCASE",
        ),
        (
            stream("s7", "table = \"hearth_conflicts\""),
            "s7",
            "cannot be streamed",
        ),
        (
            stream("s8", "table = \"_hearth_log\""),
            "s8",
            "cannot be streamed",
        ),
        (
            stream("s9", "table = \"todos\"\nfilter = \"done = 1\""),
            "s9",
            "unknown field `filter`",
        ),
        (
            stream("s10", "where = \"TRUE\""),
            "s10",
            "missing field `table`",
        ),
        (
            stream("s11", "table = \"todos\"\nwhere = \"lower(title) = 'x'\""),
            "s11",
            "functions (lower(...)) are not supported",
        ),
        (
            stream("\"has space\"", "table = \"todos\""),
            "has space",
            "a stream name is 1 to 64",
        ),
        (
            stream(&format!("\"{}\"", "x".repeat(65)), "table = \"todos\""),
            &"x".repeat(65),
            "a stream name is 1 to 64",
        ),
        (
            stream("\"\"", "table = \"todos\""),
            "",
            "a stream name is 1 to 64",
        ),
        (stream("s12", "table = 3"), "s12", "invalid type"),
    ] {
        let e = with_streams(&streams).unwrap_err();
        let text = e.to_string();
        assert!(
            matches!(&e, SchemaError::Stream { stream, .. } if stream == name)
                && text.starts_with(&format!("stream '{name}': "))
                && text.contains(want),
            "{streams}: {text}"
        );
    }
    // A 64-character name is fine; 65 streams are not.
    with_streams(&stream(&"x".repeat(64), "table = \"todos\"")).unwrap();
    let many: String = (0..65)
        .map(|i| stream(&format!("s{i}"), "table = \"todos\""))
        .collect();
    let e = with_streams(&many).unwrap_err();
    assert_eq!(e, SchemaError::TooManyStreams { count: 65 });
    assert!(e.to_string().contains("at most 64"), "{e}");
    let sixty_four: String = (0..64)
        .map(|i| stream(&format!("s{i}"), "table = \"todos\""))
        .collect();
    assert_eq!(with_streams(&sixty_four).unwrap().streams.len(), 64);
}
