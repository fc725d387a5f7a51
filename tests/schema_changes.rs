//! Schema changes as an app's developer makes them: `hearth serve` restarted
//! on the same store with a bumped `version`, while a device (`hearth
//! client`) is offline holding writes made under the older schema. Every
//! device and the store end with the same rows, new columns at their
//! defaults, dropped ones gone, and what cannot be done is refused by name.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::cli::{hearth, json_line, json_lines, stderr, Device, Served};
use serde_json::{json, Value as Json};

const V1: &str = r#"
version = 1
[tables.todos]
create = "CREATE TABLE todos (id TEXT PRIMARY KEY, title TEXT NOT NULL, notes TEXT)"
[tables.tags]
create = "CREATE TABLE tags (id TEXT PRIMARY KEY, name TEXT)"
"#;

/// Adds two columns with defaults and an index.
const V2: &str = r#"
version = 2
[tables.todos]
create = """CREATE TABLE todos (id TEXT PRIMARY KEY, title TEXT NOT NULL, notes TEXT,
  done INTEGER NOT NULL DEFAULT 0, prio TEXT DEFAULT 'normal');
CREATE INDEX todos_by_done ON todos (done)"""
[tables.tags]
create = "CREATE TABLE tags (id TEXT PRIMARY KEY, name TEXT)"
"#;

/// Drops a column (`notes`) and a table (`tags`).
const V3: &str = r#"
version = 3
[tables.todos]
create = """CREATE TABLE todos (id TEXT PRIMARY KEY, title TEXT NOT NULL,
  done INTEGER NOT NULL DEFAULT 0, prio TEXT DEFAULT 'normal');
CREATE INDEX todos_by_done ON todos (done)"""
"#;

fn rows(d: &Device, sql: &str) -> Json {
    Json::from(d.query(sql))
}

/// `hearth serve --check` on `dir`'s store with `schema`.
fn check(dir: &Path, schema: &str) -> std::process::Output {
    let file = dir.join("check.toml");
    std::fs::write(&file, schema).unwrap();
    let data = dir.join("data");
    hearth(&[
        "serve",
        "--check",
        "--schema",
        file.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
    ])
}

/// Starts `hearth serve` with `schema` on `dir`'s store, expecting it to
/// refuse: its exit status and stderr (it must exit within 20 s).
fn serve_refused(dir: &Path, schema: &str) -> String {
    let file = dir.join("refused.toml");
    std::fs::write(&file, schema).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_hearth"))
        .args(["serve", "--listen", "127.0.0.1:0", "--schema"])
        .arg(&file)
        .arg("--data")
        .arg(dir.join("data"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(!status.success(), "serve started with {schema}");
            let out = child.wait_with_output().unwrap();
            return String::from_utf8_lossy(&out.stderr).into_owned();
        }
        if started.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!("serve started (it should refuse) with {schema}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn an_offline_device_keeps_its_writes_across_added_and_dropped_columns_and_tables() {
    let dir = tempfile::tempdir().unwrap();
    let a;
    let b;
    {
        let v1 = Served::start(dir.path(), V1);
        a = Device::new(dir.path(), "a", &v1.url);
        b = Device::new(dir.path(), "b", &v1.url);
        a.exec("INSERT INTO todos VALUES ('t1', 'one', 'first')");
        b.sync();
    }
    // B, offline, writes under version 1.
    b.exec_offline("INSERT INTO todos (id, title, notes) VALUES ('t2', 'two', 'second')");
    b.exec_offline("UPDATE todos SET title = 'ONE', notes = 'edited' WHERE id = 't1'");
    b.exec_offline("INSERT INTO tags VALUES ('g1', 'red')");

    // --check says what starting would do, and does nothing.
    let out = check(dir.path(), V2);
    assert!(out.status.success(), "{out:?}");
    let said = String::from_utf8_lossy(&out.stdout);
    for step in [
        "the store in",
        "is at schema version 1",
        "add column 'done' to table 'todos' (existing rows take 0)",
        "add column 'prio' to table 'todos' (existing rows take 'normal')",
        "add index 'todos_by_done' on table 'todos'",
        "nothing was changed",
    ] {
        assert!(said.contains(step), "--check should say {step:?}: {said}");
    }
    {
        let store = rusqlite::Connection::open(dir.path().join("data/hearth.db")).unwrap();
        let columns: i64 = store
            .query_row("SELECT count(*) FROM pragma_table_info('todos')", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(columns, 3, "--check changed the store");
    }

    // Version 2: both devices migrate at their next contact; B's writes
    // made under version 1 apply, with the new columns at their defaults.
    {
        let v2 = Served::start(dir.path(), V2);
        let b_sync = json_line(&b.run_at(&v2.url, &["sync"]));
        assert_eq!(b_sync["pending"], 0, "{b_sync}");
        assert_eq!(b_sync["rejected"], json!([]), "{b_sync}");
        assert!(a.run_at(&v2.url, &["sync"]).status.success());
        let want = json!([
            {"id": "t1", "title": "ONE", "notes": "edited", "done": 0, "prio": "normal"},
            {"id": "t2", "title": "two", "notes": "second", "done": 0, "prio": "normal"},
        ]);
        let sql = "SELECT id, title, notes, done, prio FROM todos ORDER BY id";
        assert_eq!(rows(&a, sql), want, "device A");
        assert_eq!(rows(&b, sql), want, "device B");
        assert_eq!(Json::from(v2.query(sql)), want, "server");
        assert_eq!(
            rows(&a, "SELECT * FROM tags"),
            json!([{"id": "g1", "name": "red"}])
        );
        // The new columns sync like the others.
        let out = a.run_at(
            &v2.url,
            &[
                "exec",
                "UPDATE todos SET done = 1, prio = 'high' WHERE id = 't2'",
            ],
        );
        assert_eq!(json_line(&out)["status"], "applied", "{out:?}");
        assert!(b.run_at(&v2.url, &["sync"]).status.success());
        assert_eq!(
            rows(&b, "SELECT done, prio FROM todos WHERE id = 't2'"),
            json!([{"done": 1, "prio": "high"}])
        );
    }

    // B, offline again, writes to the column and the table version 3 drops.
    b.exec_offline("UPDATE todos SET notes = 'lost', title = 'kept' WHERE id = 't1'");
    b.exec_offline("INSERT INTO tags VALUES ('g2', 'blue')");
    {
        let v3 = Served::start(dir.path(), V3);
        let out = b.run_at(&v3.url, &["sync"]);
        assert!(out.status.success(), "{out:?}");
        let b_sync = json_line(&out);
        assert_eq!(b_sync["pending"], 0, "{b_sync}");
        // The write to the dropped table is refused, by name, and undone.
        let rejected = b_sync["rejected"].as_array().unwrap();
        assert_eq!(rejected.len(), 1, "{b_sync}");
        assert_eq!(rejected[0]["code"], "TABLE_DROPPED", "{b_sync}");
        let reason = rejected[0]["reason"].as_str().unwrap();
        assert!(
            reason.contains("'tags'") && reason.contains("version 3"),
            "{reason}"
        );
        assert_eq!(
            rejected[0]["undone"],
            json!([{"table": "tags", "key": "g2"}])
        );
        assert!(a.run_at(&v3.url, &["sync"]).status.success());
        // The rest of the write to the dropped column applied.
        let want = json!([
            {"id": "t1", "title": "kept", "done": 0, "prio": "normal"},
            {"id": "t2", "title": "two", "done": 1, "prio": "high"},
        ]);
        let sql = "SELECT * FROM todos ORDER BY id";
        assert_eq!(rows(&a, sql), want, "device A");
        assert_eq!(rows(&b, sql), want, "device B");
        assert_eq!(Json::from(v3.query(sql)), want, "server");
        let tables = "SELECT name FROM sqlite_schema WHERE type = 'table' AND name = 'tags'";
        assert_eq!(rows(&a, tables), json!([]), "device A still has tags");
        assert_eq!(rows(&b, tables), json!([]), "device B still has tags");
        assert_eq!(
            Json::from(v3.query(tables)),
            json!([]),
            "the store still has tags"
        );
    }

    // A type change is refused, naming the table and the column, by
    // --check and by serve; so is a rename.
    let v4_type = V3
        .replace("version = 3", "version = 4")
        .replace("prio TEXT", "prio INTEGER");
    let out = check(dir.path(), &v4_type);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    for said in [stderr(&out), serve_refused(dir.path(), &v4_type)] {
        assert!(
            said.contains("table 'todos', column 'prio': its type changes from TEXT to INTEGER")
                && said.contains("Add a new column"),
            "{said}"
        );
    }
    let v4_rename = V3
        .replace("version = 3", "version = 4")
        .replace("prio TEXT", "priority TEXT");
    let said = serve_refused(dir.path(), &v4_rename);
    assert!(
        said.contains("column 'prio' is gone and column 'priority' is new"),
        "{said}"
    );
    // Going back to an older schema is refused too.
    let said = serve_refused(dir.path(), V2);
    assert!(
        said.contains("the store is at schema version 3 and this schema is version 2"),
        "{said}"
    );
    // Changing tables without bumping the version is refused.
    let said = serve_refused(dir.path(), &V3.replace("prio TEXT", "prio TEXT, due TEXT"));
    assert!(said.contains("bump `version`"), "{said}");
    // Nothing of that touched the store: version 3 still serves it.
    let v3 = Served::start(dir.path(), V3);
    assert_eq!(
        Json::from(v3.query("SELECT count(*) AS n FROM todos")),
        json!([{"n": 2}])
    );
}

#[test]
fn a_new_column_without_a_usable_default_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    {
        let _v1 = Served::start(dir.path(), V1);
    }
    for (column, why) in [
        ("due TEXT NOT NULL", "NOT NULL without a DEFAULT"),
        ("made INTEGER DEFAULT (unixepoch())", "is not a constant"),
        ("seen TEXT DEFAULT CURRENT_TIMESTAMP", "is not a constant"),
    ] {
        let v2 = V1
            .replace("version = 1", "version = 2")
            .replace("notes TEXT)", &format!("notes TEXT, {column})"));
        let name = column.split(' ').next().unwrap();
        let said = serve_refused(dir.path(), &v2);
        assert!(
            said.contains(&format!("table 'todos', new column '{name}'")) && said.contains(why),
            "{column}: {said}"
        );
    }
}

#[test]
fn a_device_with_a_newer_schema_than_its_server_holds_its_writes_with_schema_ahead() {
    let newer = tempfile::tempdir().unwrap();
    let older = tempfile::tempdir().unwrap();
    // The device learns version 2 from one server...
    let d;
    {
        let v2 = Served::start(newer.path(), V2);
        d = Device::new(newer.path(), "d", &v2.url);
        d.sync();
    }
    d.exec_offline("INSERT INTO todos (id, title, prio) VALUES ('t1', 'one', 'high')");
    // ... and meets a server still at version 1 (an app deployed before its
    // server): it sends nothing, says why, and keeps its write.
    {
        let v1 = Served::start(older.path(), V1);
        let out = d.run_at(&v1.url, &["sync"]);
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        let said = stderr(&out);
        assert!(
            said.contains("SCHEMA_AHEAD")
                && said.contains("version 2, newer than the server's version 1"),
            "{said}"
        );
        let out = d.run_at(&v1.url, &["exec", "UPDATE todos SET title = 'ONE'"]);
        assert!(out.status.success(), "{out:?}");
        let line = json_line(&out);
        assert_eq!(line["status"], "queued", "{line}");
        assert_eq!(line["code"], "SCHEMA_AHEAD", "{line}");
        assert_eq!(
            json_lines(&d.run(&["pending"])).len(),
            2,
            "both writes wait"
        );
        assert_eq!(Json::from(v1.query("SELECT * FROM todos")), json!([]));
    }
    // Once the server has version 2, the writes go through.
    let v2 = Served::start(older.path(), V2);
    let out = d.run_at(&v2.url, &["sync"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(json_line(&out)["pending"], 0);
    assert_eq!(
        Json::from(v2.query("SELECT id, title, prio FROM todos")),
        json!([{"id": "t1", "title": "ONE", "prio": "high"}])
    );
}

/// Found by a new user's trial: a device whose pending write breaks a
/// constraint that a schema change adds, one offline across a column and a
/// table dropped and added again with other types, and one whose own
/// (unsynced) table points at a synced table that gets rebuilt, all migrate
/// and converge; a new foreign key that stored rows break is refused.
#[test]
fn devices_migrate_past_new_constraints_and_columns_dropped_and_added_again() {
    const U1: &str = r#"
version = 1
[tables.u]
create = "CREATE TABLE u (id TEXT PRIMARY KEY, email TEXT, b TEXT)"
[tables.q]
create = "CREATE TABLE q (id TEXT PRIMARY KEY, x TEXT)"
"#;
    const U2: &str = r#"
version = 2
[tables.u]
create = """CREATE TABLE u (id TEXT PRIMARY KEY, email TEXT);
CREATE UNIQUE INDEX u_email ON u (email)"""
"#;
    const U3: &str = r#"
version = 3
[tables.u]
create = """CREATE TABLE u (id TEXT PRIMARY KEY, email TEXT, b INTEGER NOT NULL DEFAULT 7);
CREATE UNIQUE INDEX u_email ON u (email)"""
[tables.q]
create = "CREATE TABLE q (id INTEGER PRIMARY KEY, x TEXT)"
"#;
    let dir = tempfile::tempdir().unwrap();
    let (a, b);
    {
        let v1 = Served::start(dir.path(), U1);
        a = Device::new(dir.path(), "a", &v1.url);
        b = Device::new(dir.path(), "b", &v1.url);
        a.exec("INSERT INTO u VALUES ('1', 'x@example.com', NULL)");
        a.exec("INSERT INTO q VALUES ('q1', 'one')");
        b.sync();
    }
    // B, offline: a write that the next version's UNIQUE index refuses, and
    // a table of its own pointing at a synced one.
    b.exec_offline("INSERT INTO u VALUES ('2', 'x@example.com', 'dup')");
    for sql in [
        "CREATE TABLE mine (id TEXT PRIMARY KEY, uid TEXT REFERENCES u(id))",
        "INSERT INTO mine VALUES ('m1', '1')",
    ] {
        // Not synced: nothing to queue.
        let out = b.run_at(common::cli::OFFLINE, &["exec", sql]);
        assert!(out.status.success(), "{out:?}");
    }
    // Versions 2 and 3 go by while B is away: `b` and `q` are dropped, then
    // added again with other types and a NOT NULL default.
    {
        let v2 = Served::start(dir.path(), U2);
        assert!(a.run_at(&v2.url, &["sync"]).status.success());
    }
    let v3 = Served::start(dir.path(), U3);
    assert!(a.run_at(&v3.url, &["sync"]).status.success());
    let out = b.run_at(&v3.url, &["sync"]);
    assert!(out.status.success(), "B is stuck: {out:?}");
    let line = json_line(&out);
    assert_eq!(line["pending"], 0, "{line}");
    let rejected = line["rejected"].as_array().unwrap();
    assert_eq!(rejected.len(), 1, "{line}");
    assert_eq!(rejected[0]["code"], "CONSTRAINT", "{line}");
    assert_eq!(
        rejected[0]["undone"],
        json!([{"table": "u", "key": "2"}]),
        "{line}"
    );
    for sql in ["SELECT * FROM u ORDER BY id", "SELECT * FROM q ORDER BY id"] {
        let want = Json::from(v3.query(sql));
        assert_eq!(rows(&a, sql), want, "device A: {sql}");
        assert_eq!(rows(&b, sql), want, "device B: {sql}");
    }
    assert_eq!(
        Json::from(v3.query("SELECT * FROM u")),
        json!([{"id": "1", "email": "x@example.com", "b": 7}])
    );
    assert_eq!(Json::from(v3.query("SELECT * FROM q")), json!([]));
    // B's own table still works, pointing at the rebuilt `u`.
    let out = b.run_at(&v3.url, &["exec", "INSERT INTO mine VALUES ('m2', '1')"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        rows(&b, "SELECT count(*) AS n FROM mine"),
        json!([{"n": 2}])
    );
    drop(v3);
    // A foreign key that a stored row breaks is refused, naming the table.
    let v4 = U3.replace("version = 3", "version = 4").replace(
        "CREATE TABLE q (id INTEGER PRIMARY KEY, x TEXT)",
        "CREATE TABLE q (id INTEGER PRIMARY KEY, x TEXT REFERENCES u(id))",
    );
    {
        let v3 = Served::start(dir.path(), U3);
        let out = a.run_at(&v3.url, &["exec", "INSERT INTO q VALUES (1, 'nobody')"]);
        assert_eq!(json_line(&out)["status"], "applied", "{out:?}");
    }
    let said = serve_refused(dir.path(), &v4);
    assert!(
        said.contains("table 'q': 1 stored row(s) break its foreign keys"),
        "{said}"
    );
}

/// Found by a new user's trial: a column and a table dropped in one
/// version and added again (as new ones) in a later one do not take the
/// writes a device made to the old ones while it was offline.
#[test]
fn a_write_to_a_column_or_table_dropped_then_added_again_does_not_reach_the_new_one() {
    const P1: &str = r#"
version = 1
[tables.p]
create = "CREATE TABLE p (id TEXT PRIMARY KEY, a TEXT, secret TEXT)"
[tables.q]
create = "CREATE TABLE q (id TEXT PRIMARY KEY, x INTEGER)"
"#;
    const P2: &str = r#"
version = 2
[tables.p]
create = "CREATE TABLE p (id TEXT PRIMARY KEY, a TEXT)"
"#;
    const P3: &str = r#"
version = 3
[tables.p]
create = "CREATE TABLE p (id TEXT PRIMARY KEY, a TEXT, secret INTEGER NOT NULL DEFAULT 0)"
[tables.q]
create = "CREATE TABLE q (id TEXT PRIMARY KEY, x TEXT)"
"#;
    let dir = tempfile::tempdir().unwrap();
    let (a, c);
    {
        let v1 = Served::start(dir.path(), P1);
        a = Device::new(dir.path(), "a", &v1.url);
        c = Device::new(dir.path(), "c", &v1.url);
        a.exec("INSERT INTO p VALUES ('p1', 'x', 's')");
        c.sync();
    }
    c.exec_offline("UPDATE p SET secret = 'hunter2', a = 'y' WHERE id = 'p1'");
    c.exec_offline("INSERT INTO q VALUES ('q1', 42)");
    {
        let v2 = Served::start(dir.path(), P2);
        assert!(a.run_at(&v2.url, &["sync"]).status.success());
    }
    let v3 = Served::start(dir.path(), P3);
    // A takes version 3 and writes the new table: that row is the one kept.
    assert!(a.run_at(&v3.url, &["sync"]).status.success());
    let out = a.run_at(&v3.url, &["exec", "INSERT INTO q VALUES ('q2', 'new')"]);
    assert_eq!(json_line(&out)["status"], "applied", "{out:?}");
    let out = c.run_at(&v3.url, &["sync"]);
    assert!(out.status.success(), "{out:?}");
    let line = json_line(&out);
    let rejected = line["rejected"].as_array().unwrap();
    assert_eq!(rejected.len(), 1, "{line}");
    assert_eq!(rejected[0]["code"], "TABLE_DROPPED", "{line}");
    assert!(
        rejected[0]["reason"]
            .as_str()
            .unwrap()
            .contains("made anew by schema version 3"),
        "{line}"
    );
    assert!(a.run_at(&v3.url, &["sync"]).status.success());
    for sql in ["SELECT * FROM p", "SELECT * FROM q ORDER BY id"] {
        let want = Json::from(v3.query(sql));
        assert_eq!(rows(&a, sql), want, "device A: {sql}");
        assert_eq!(rows(&c, sql), want, "device C: {sql}");
    }
    assert_eq!(
        Json::from(v3.query("SELECT * FROM p")),
        json!([{"id": "p1", "a": "y", "secret": 0}]),
        "the old write's other column applies; the new column keeps its default"
    );
    assert_eq!(
        Json::from(v3.query("SELECT * FROM q")),
        json!([{"id": "q2", "x": "new"}])
    );
    // A write made under version 3 does set the new column.
    let out = c.run_at(&v3.url, &["exec", "UPDATE p SET secret = 5"]);
    assert_eq!(json_line(&out)["status"], "applied", "{out:?}");
    assert_eq!(
        Json::from(v3.query("SELECT secret FROM p")),
        json!([{"secret": 5}])
    );
}
