//! Faults reported against sync engines and found by review, each kept as
//! the input that showed it (issues 7 and 8): values that must travel
//! exactly, changes that collations hid, transactions valid only as a whole,
//! clocks running ahead, app triggers, SQL that must not reach Hearth's
//! machinery, and devices that lost the end of their history.
//!
//! Every check states what a user expects to read back, not how Hearth
//! gets there.

use hearth_engine::{Client, ClientConfig, Event, ServerCore, Value};
use rusqlite::Connection;

mod common;
use common::{rejected, rows, text, Net};

/// A device on a database file, as a user's device keeps it.
fn device_at(path: &std::path::Path, id: u64) -> Client {
    Client::open(Connection::open(path).unwrap(), id, ClientConfig::default()).unwrap()
}

/// A copy of a device's database file as it is now, as a backup makes it.
fn backup_of(c: &Client, path: &std::path::Path) -> std::path::PathBuf {
    c.connection()
        .execute("VACUUM INTO ?1", [path.to_str().unwrap()])
        .unwrap();
    path.to_path_buf()
}

// ---- 1. values round-trip exactly ---------------------------------------

const NOTES: &str =
    "[tables.notes]\ncreate = \"CREATE TABLE notes (id TEXT PRIMARY KEY, body TEXT)\"\n";

#[test]
fn text_that_is_not_utf8_is_refused_up_front_as_value_and_as_key() {
    let mut net = Net::new(NOTES);
    let mut a = net.device();
    for sql in [
        "INSERT INTO notes VALUES ('n1', CAST(X'4AC3A973FF41' AS TEXT))",
        "INSERT INTO notes VALUES (CAST(X'FF' AS TEXT), 'x')",
    ] {
        let err = a.exec(sql, &[], 1_000).unwrap_err();
        assert_eq!(err.code(), "SQL_ERROR");
        assert!(err.to_string().contains("not valid UTF-8"), "{err}");
    }
    // Nothing of the refused writes is left anywhere, and the device goes on.
    assert!(rows(&a, "SELECT * FROM notes").is_empty());
    assert_eq!(a.status().pending, 0);
    a.exec("INSERT INTO notes VALUES ('n1', 'Jés')", &[], 2_000)
        .unwrap();
    a.exec("UPDATE notes SET body = 'y'", &[], 3_000).unwrap();
    net.sync(&mut a);
    let mut b = net.device();
    for got in [
        rows(&a, "SELECT id, hex(body) FROM notes"),
        rows(&b, "SELECT id, hex(body) FROM notes"),
        net.server_rows("SELECT id, hex(body) FROM notes"),
    ] {
        assert_eq!(got, vec![vec![text("n1"), text("79")]]);
    }
    assert_eq!(a.status().pending, 0);
    let _ = &mut b;
}

const VALUES: &str = "[tables.vals]\ncreate = \"CREATE TABLE vals (id INTEGER PRIMARY KEY, v, r REAL, t TEXT, b BLOB)\"\n";

#[test]
fn extreme_values_read_back_identical_on_every_device() {
    let mut net = Net::new(VALUES);
    let mut a = net.device();
    let every_byte: Vec<u8> = (0..=255).collect();
    let cases: Vec<(i64, Value)> = vec![
        (1, Value::Integer(i64::MIN)),
        (2, Value::Integer(i64::MAX)),
        (3, Value::Integer(-1)),
        (4, Value::Real(f64::MAX)),
        (5, Value::Real(f64::MIN_POSITIVE)),
        (6, Value::Real(5e-324)), // the smallest subnormal
        (7, Value::Real(-0.0)),
        (8, Value::Real(f64::INFINITY)),
        (9, Value::Real(f64::NEG_INFINITY)),
        (10, Value::Real(0.1 + 0.2)),
        (11, Value::Text(String::new())),
        (12, Value::Text("nul \0 inside, emoji 🦀, é".into())),
        (13, Value::Blob(Vec::new())),
        (14, Value::Blob(every_byte.clone())),
        (15, Value::Real(9_007_199_254_740_993.0)),
        (16, Value::Integer(9_007_199_254_740_993)),
    ];
    for (id, v) in &cases {
        a.exec(
            "INSERT INTO vals (id, v) VALUES (?1, ?2)",
            &[Value::Integer(*id), v.clone()],
            1_000,
        )
        .unwrap();
    }
    // NaN has no SQL value: SQLite stores it as NULL, on every device alike.
    a.exec(
        "INSERT INTO vals (id, v) VALUES (17, ?1)",
        &[Value::Real(f64::NAN)],
        1_000,
    )
    .unwrap();
    let written = rows(&a, "SELECT id, v FROM vals ORDER BY id");
    assert_eq!(written.len(), cases.len() + 1);
    for ((id, v), row) in cases.iter().zip(&written) {
        assert_eq!(row, &vec![Value::Integer(*id), v.clone()], "as written");
    }
    assert_eq!(written[cases.len()][1], Value::Null);
    net.sync(&mut a);
    let b = net.device();
    assert_eq!(
        rows(&a, "SELECT id, v FROM vals ORDER BY id"),
        written,
        "writer after the ack"
    );
    assert_eq!(
        rows(&b, "SELECT id, v FROM vals ORDER BY id"),
        written,
        "another device"
    );
    assert_eq!(
        net.server_rows("SELECT id, v FROM vals ORDER BY id"),
        written,
        "the server"
    );
    // Updates carry the same values: flip every row's value to the next case's.
    let mut a = a;
    for (i, (id, _)) in cases.iter().enumerate() {
        let next = cases[(i + 1) % cases.len()].1.clone();
        a.exec(
            "UPDATE vals SET v = ?2 WHERE id = ?1",
            &[Value::Integer(*id), next],
            2_000,
        )
        .unwrap();
    }
    assert_eq!(
        a.status().pending as usize,
        cases.len(),
        "each update is a change"
    );
    net.sync(&mut a);
    let mut b = b;
    net.sync(&mut b);
    let flipped = rows(&a, "SELECT id, v FROM vals ORDER BY id");
    for (i, row) in flipped.iter().take(cases.len()).enumerate() {
        assert_eq!(row[1], cases[(i + 1) % cases.len()].1);
    }
    assert_eq!(rows(&b, "SELECT id, v FROM vals ORDER BY id"), flipped);
}

// ---- 2. change detection is exact ---------------------------------------

#[test]
fn a_change_a_collation_calls_equal_still_syncs() {
    let mut net = Net::new(
        "[tables.products]\ncreate = \"CREATE TABLE products (id TEXT PRIMARY KEY, name TEXT COLLATE NOCASE, n)\"\n",
    );
    let mut a = net.device();
    a.exec(
        "INSERT INTO products VALUES ('p1', 'iphone', 1)",
        &[],
        1_000,
    )
    .unwrap();
    net.sync(&mut a);
    let (outcome, _) = a
        .exec(
            "UPDATE products SET name = 'iPhone' WHERE id = 'p1'",
            &[],
            2_000,
        )
        .unwrap();
    assert!(outcome.mutation.is_some(), "case change is a change");
    // Integer 1 and real 1.0 compare equal in SQL but are different values.
    let (outcome, _) = a
        .exec("UPDATE products SET n = 1.0 WHERE id = 'p1'", &[], 3_000)
        .unwrap();
    assert!(
        outcome.mutation.is_some(),
        "storage class change is a change"
    );
    net.sync(&mut a);
    let b = net.device();
    let want = vec![vec![text("iPhone"), Value::Real(1.0)]];
    assert_eq!(rows(&a, "SELECT name, n FROM products"), want);
    assert_eq!(rows(&b, "SELECT name, n FROM products"), want);
    assert_eq!(net.server_rows("SELECT name, n FROM products"), want);
}

// ---- 3. a transaction valid as a whole applies as a whole -----------------

const SHOP: &str = "[tables.orders]
create = \"CREATE TABLE orders (id TEXT PRIMARY KEY, customer TEXT)\"
[tables.items]
create = \"CREATE TABLE items (id TEXT PRIMARY KEY, order_id TEXT REFERENCES orders(id), sku TEXT)\"
[tables.authors]
create = \"CREATE TABLE authors (id TEXT PRIMARY KEY, name TEXT)\"
[tables.books]
create = \"CREATE TABLE books (id TEXT PRIMARY KEY, author_id TEXT NOT NULL REFERENCES authors(id) ON DELETE CASCADE, title TEXT)\"
";

#[test]
fn parent_and_child_in_one_transaction_apply_in_either_order() {
    let mut net = Net::new(SHOP);
    let mut a = net.device();
    let mut b = net.device();
    // The child's table sorts before the parent's ("items" < "orders").
    a.exec(
        "INSERT INTO orders VALUES ('O1', 'c'); INSERT INTO items VALUES ('I1', 'O1', 's')",
        &[],
        1_000,
    )
    .unwrap();
    // The parent's table sorts first ("authors" < "books").
    a.exec(
        "INSERT INTO authors VALUES ('A1', 'x'); INSERT INTO books VALUES ('B1', 'A1', 't'), ('B2', 'A1', 'u')",
        &[],
        1_000,
    )
    .unwrap();
    let events = net.sync(&mut a);
    assert!(rejected(&events).is_empty(), "{events:?}");
    net.sync(&mut b);
    assert_eq!(rows(&b, "SELECT id FROM items"), vec![vec![text("I1")]]);
    assert_eq!(
        rows(&b, "SELECT count(*) FROM books"),
        vec![vec![Value::Integer(2)]]
    );

    // Children then parent, in one exec, with the parent's table first by name.
    a.exec(
        "DELETE FROM books WHERE author_id = 'A1'; DELETE FROM authors WHERE id = 'A1'",
        &[],
        2_000,
    )
    .unwrap();
    // And the parent first, its children by cascade, captured as data.
    a.exec(
        "DELETE FROM orders WHERE id = 'O1'; DELETE FROM items WHERE order_id = 'O1'",
        &[],
        2_000,
    )
    .unwrap_err(); // SQLite itself refuses this order on the device (no cascade on items).
    a.exec(
        "DELETE FROM items WHERE order_id = 'O1'; DELETE FROM orders WHERE id = 'O1'",
        &[],
        2_000,
    )
    .unwrap();
    let events = net.sync(&mut a);
    assert!(rejected(&events).is_empty(), "{events:?}");
    net.sync(&mut b);
    for c in [&a, &b] {
        assert!(rows(c, "SELECT * FROM authors").is_empty());
        assert!(rows(c, "SELECT * FROM books").is_empty());
        assert!(rows(c, "SELECT * FROM orders").is_empty());
    }
    assert!(net.server_rows("SELECT * FROM books").is_empty());
}

#[test]
fn a_cascade_runs_once_on_the_writer_and_travels_as_data() {
    let mut net = Net::new(SHOP);
    let mut a = net.device();
    let mut b = net.device();
    a.exec(
        "INSERT INTO authors VALUES ('A1', 'x'); INSERT INTO books VALUES ('B1', 'A1', 't')",
        &[],
        1_000,
    )
    .unwrap();
    net.sync(&mut a);
    net.sync(&mut b);
    a.exec("DELETE FROM authors WHERE id = 'A1'", &[], 2_000)
        .unwrap();
    assert!(
        rows(&a, "SELECT * FROM books").is_empty(),
        "cascade on the writer"
    );
    let events = net.sync(&mut a);
    assert!(rejected(&events).is_empty(), "{events:?}");
    net.sync(&mut b);
    assert!(rows(&b, "SELECT * FROM books").is_empty());
    assert!(net.server_rows("SELECT * FROM books").is_empty());
}

#[test]
fn a_child_of_a_parent_deleted_meanwhile_is_refused_and_rolled_back() {
    let mut net = Net::new(SHOP);
    let mut a = net.device();
    let mut b = net.device();
    a.exec("INSERT INTO orders VALUES ('O1', 'c')", &[], 1_000)
        .unwrap();
    net.sync(&mut a);
    net.sync(&mut b);
    // Offline, B adds an item to O1 while A deletes O1.
    b.exec("INSERT INTO items VALUES ('I9', 'O1', 's')", &[], 2_000)
        .unwrap();
    a.exec("DELETE FROM orders WHERE id = 'O1'", &[], 2_000)
        .unwrap();
    net.sync(&mut a);
    let events = net.sync(&mut b);
    let refused = rejected(&events);
    assert_eq!(refused.len(), 1, "{events:?}");
    assert_eq!(refused[0].1, "CONSTRAINT");
    assert!(refused[0].2.contains("FOREIGN KEY"), "{refused:?}");
    assert!(rows(&b, "SELECT * FROM items").is_empty(), "rolled back");
    assert!(rows(&b, "SELECT * FROM orders").is_empty());
    // And the other way round: a parent delete that would orphan a child
    // another device added first is refused.
    a.exec("INSERT INTO orders VALUES ('O2', 'c')", &[], 3_000)
        .unwrap();
    net.sync(&mut a);
    net.sync(&mut b);
    b.exec("INSERT INTO items VALUES ('I2', 'O2', 's')", &[], 4_000)
        .unwrap();
    a.exec("DELETE FROM orders WHERE id = 'O2'", &[], 4_000)
        .unwrap();
    net.sync(&mut b);
    let events = net.sync(&mut a);
    assert_eq!(rejected(&events).len(), 1, "{events:?}");
    net.sync(&mut b);
    for c in [&a, &b] {
        assert_eq!(rows(c, "SELECT id FROM orders"), vec![vec![text("O2")]]);
        assert_eq!(rows(c, "SELECT id FROM items"), vec![vec![text("I2")]]);
    }
}

const SLOTS: &str = "[tables.slots]\ncreate = \"CREATE TABLE slots (id TEXT PRIMARY KEY, pos INTEGER NOT NULL UNIQUE, label TEXT)\"\n";

#[test]
fn unique_values_handed_between_rows_apply_as_a_whole() {
    let mut net = Net::new(SLOTS);
    let mut a = net.device();
    let mut b = net.device();
    a.exec(
        "INSERT INTO slots VALUES ('a', 1, 'A'), ('b', 2, 'B'), ('c', 3, 'C'), ('d', 4, 'D'), ('e', 5, 'E')",
        &[],
        1_000,
    )
    .unwrap();
    net.sync(&mut a);
    net.sync(&mut b);
    // A swap through a temporary value.
    a.exec(
        "UPDATE slots SET pos = -1 WHERE id = 'a'; UPDATE slots SET pos = 1 WHERE id = 'b'; UPDATE slots SET pos = 2 WHERE id = 'a'",
        &[],
        2_000,
    )
    .unwrap();
    // Renumbering: every position moves up one, last first.
    for id in ["e", "d", "c", "b", "a"] {
        a.exec(
            "UPDATE slots SET pos = pos + 10 WHERE id = ?1",
            &[text(id)],
            3_000,
        )
        .unwrap();
    }
    a.exec(
        "UPDATE slots SET pos = pos - 9 WHERE id = 'e'; UPDATE slots SET pos = pos - 9 WHERE id = 'd';
         UPDATE slots SET pos = pos - 9 WHERE id = 'c'; UPDATE slots SET pos = pos - 9 WHERE id = 'b';
         UPDATE slots SET pos = pos - 9 WHERE id = 'a'",
        &[],
        4_000,
    )
    .unwrap();
    // A rotation of three in one transaction.
    a.exec(
        "UPDATE slots SET pos = 0 WHERE id = 'c'; UPDATE slots SET pos = 4 WHERE id = 'd';
         UPDATE slots SET pos = 5 WHERE id = 'e'; UPDATE slots SET pos = 6 WHERE id = 'c'",
        &[],
        5_000,
    )
    .unwrap();
    let want = rows(&a, "SELECT id, pos FROM slots ORDER BY id");
    let events = net.sync(&mut a);
    assert!(rejected(&events).is_empty(), "{events:?}");
    net.sync(&mut b);
    let fresh = net.device();
    assert_eq!(rows(&a, "SELECT id, pos FROM slots ORDER BY id"), want);
    assert_eq!(rows(&b, "SELECT id, pos FROM slots ORDER BY id"), want);
    assert_eq!(rows(&fresh, "SELECT id, pos FROM slots ORDER BY id"), want);
    assert_eq!(
        net.server_rows("SELECT id, pos FROM slots ORDER BY id"),
        want
    );
}

#[test]
fn a_unique_value_taken_by_another_device_is_still_refused() {
    let mut net = Net::new(SLOTS);
    let mut a = net.device();
    let mut b = net.device();
    a.exec("INSERT INTO slots VALUES ('a', 1, 'A')", &[], 1_000)
        .unwrap();
    b.exec("INSERT INTO slots VALUES ('b', 1, 'B')", &[], 1_000)
        .unwrap();
    net.sync(&mut a);
    let events = net.sync(&mut b);
    let refused = rejected(&events);
    assert_eq!(refused.len(), 1, "{events:?}");
    assert_eq!(refused[0].1, "CONSTRAINT");
    assert_eq!(rows(&b, "SELECT id FROM slots"), vec![vec![text("a")]]);
}

// ---- 4. a clock running ahead keeps its own writes in order ---------------

#[test]
fn a_device_far_ahead_keeps_its_later_write() {
    let todos = "[tables.todos]\ncreate = \"CREATE TABLE todos (id TEXT PRIMARY KEY, list_id TEXT, title TEXT)\"\n";
    let mut net = Net::new(todos);
    let now = 1_764_000_000_000;
    net.server.set_now_ms(now);
    let mut a = net.device();
    let mut b = net.device();
    let ahead = now + 3_600_000;
    a.exec(
        "INSERT INTO todos (id, list_id, title) VALUES ('t', 'l', 'v1')",
        &[],
        ahead,
    )
    .unwrap();
    a.exec(
        "UPDATE todos SET title = 'v2' WHERE id = 't'",
        &[],
        ahead + 1,
    )
    .unwrap();
    a.exec(
        "UPDATE todos SET title = 'v3' WHERE id = 't'",
        &[],
        ahead + 1,
    )
    .unwrap();
    net.sync(&mut a);
    net.sync(&mut b);
    let want = vec![vec![text("v3")]];
    assert_eq!(rows(&a, "SELECT title FROM todos"), want);
    assert_eq!(rows(&b, "SELECT title FROM todos"), want);
    assert_eq!(net.server_rows("SELECT title FROM todos"), want);
    // Its next write, in a later push, still wins over its earlier ones.
    a.exec(
        "UPDATE todos SET title = 'v4' WHERE id = 't'",
        &[],
        ahead + 2,
    )
    .unwrap();
    net.sync(&mut a);
    net.sync(&mut b);
    assert_eq!(rows(&b, "SELECT title FROM todos"), vec![vec![text("v4")]]);
    let log = ServerCore::read_log(net.server.connection(), 0, 10).unwrap();
    for pair in log.windows(2) {
        assert!(
            pair[0].hlc < pair[1].hlc,
            "one device's stamps are distinct and ordered"
        );
    }
}

// ---- 5. app triggers run once, on the writer -----------------------------

#[test]
fn an_app_trigger_runs_once_where_the_write_is_made() {
    let mut net = Net::new(
        "[tables.notes]
create = \"\"\"CREATE TABLE notes (id TEXT PRIMARY KEY, body TEXT, edits INTEGER NOT NULL DEFAULT 0);
CREATE TRIGGER count_edits AFTER UPDATE OF body ON notes BEGIN
  UPDATE notes SET edits = edits + 1 WHERE id = NEW.id;
END\"\"\"
",
    );
    let mut a = net.device();
    let mut b = net.device();
    a.exec("INSERT INTO notes (id, body) VALUES ('n', 'a')", &[], 1_000)
        .unwrap();
    net.sync(&mut a);
    net.sync(&mut b);
    a.exec("UPDATE notes SET body = 'b'", &[], 2_000).unwrap();
    assert_eq!(
        rows(&a, "SELECT edits FROM notes"),
        vec![vec![Value::Integer(1)]]
    );
    net.sync(&mut a);
    net.sync(&mut b);
    let fresh = net.device();
    let want = vec![vec![text("b"), Value::Integer(1)]];
    for (who, got) in [
        ("writer", rows(&a, "SELECT body, edits FROM notes")),
        ("other", rows(&b, "SELECT body, edits FROM notes")),
        ("fresh", rows(&fresh, "SELECT body, edits FROM notes")),
        ("server", net.server_rows("SELECT body, edits FROM notes")),
    ] {
        assert_eq!(got, want, "{who}");
    }
    // The trigger still runs for the app's next write on any device.
    b.exec("UPDATE notes SET body = 'c'", &[], 3_000).unwrap();
    assert_eq!(
        rows(&b, "SELECT edits FROM notes"),
        vec![vec![Value::Integer(2)]]
    );
    // And a rebase with a pending write over an incoming change keeps one count.
    a.exec("UPDATE notes SET body = 'd'", &[], 3_500).unwrap();
    net.sync(&mut b);
    net.sync(&mut a);
    net.sync(&mut b);
    assert_eq!(
        rows(&a, "SELECT body, edits FROM notes"),
        rows(&b, "SELECT body, edits FROM notes")
    );
    assert_eq!(rows(&a, "SELECT body FROM notes"), vec![vec![text("d")]]);
}

// ---- 8.1 the app's SQL stays away from Hearth's machinery ------------------

#[test]
fn query_only_reads_and_exec_only_changes_data() {
    let mut net = Net::new(NOTES);
    let mut a = net.device();
    for sql in [
        "BEGIN",
        "COMMIT",
        "ROLLBACK",
        "SAVEPOINT x",
        "RELEASE x",
        "ATTACH ':memory:' AS other",
        "PRAGMA foreign_keys = OFF",
        "PRAGMA user_version = 3",
        "INSERT INTO notes VALUES ('q', 'x')",
        "DELETE FROM _hearth_outbox",
    ] {
        let err = a.query(sql, &[]).unwrap_err();
        assert_eq!(err.code(), "SQL_ERROR", "{sql}: {err}");
        assert!(
            a.connection().is_autocommit(),
            "{sql} left a transaction open"
        );
    }
    for sql in [
        "SELECT * FROM notes",
        "PRAGMA table_info(notes)",
        "PRAGMA user_version",
        "SELECT * FROM pragma_table_info('notes')",
        "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < 3) SELECT x FROM n",
    ] {
        a.query(sql, &[]).unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    for sql in [
        "BEGIN",
        "COMMIT",
        "SAVEPOINT x",
        "ATTACH ':memory:' AS other",
        "PRAGMA foreign_keys = OFF",
        "PRAGMA journal_mode = DELETE",
        "DROP TABLE notes",
        "ALTER TABLE notes ADD COLUMN x",
        "CREATE INDEX notes_body ON notes (body)",
        "CREATE TRIGGER t AFTER INSERT ON notes BEGIN SELECT 1; END",
        "CREATE TEMP TRIGGER t AFTER INSERT ON notes BEGIN SELECT 1; END",
        "DROP TRIGGER temp._hearth_upd_0",
        "DELETE FROM _hearth_outbox",
        "UPDATE _hearth_meta SET value = 1",
        "DELETE FROM temp._hearth_capture",
        "INSERT INTO notes VALUES ('z', 'z'); COMMIT",
    ] {
        let err = a.exec(sql, &[], 1_000).unwrap_err();
        assert_eq!(err.code(), "SQL_ERROR", "{sql}: {err}");
        assert!(
            a.connection().is_autocommit(),
            "{sql} left a transaction open"
        );
    }
    assert!(
        rows(&a, "SELECT * FROM notes").is_empty(),
        "no partial write"
    );
    // Local, unsynced tables are the app's to shape.
    a.exec(
        "CREATE TABLE drafts (id INTEGER PRIMARY KEY, body TEXT)",
        &[],
        1_000,
    )
    .unwrap();
    a.exec("INSERT INTO drafts (body) VALUES ('x')", &[], 1_000)
        .unwrap();
    a.exec("CREATE INDEX drafts_body ON drafts (body)", &[], 1_000)
        .unwrap();
    // Writes still work and reach the server.
    a.exec("INSERT INTO notes VALUES ('n', 'x')", &[], 2_000)
        .unwrap();
    net.sync(&mut a);
    assert_eq!(
        net.server_rows("SELECT id FROM notes"),
        vec![vec![text("n")]]
    );
}

// ---- 8.2 a device that lost its tail loses nothing -------------------------

#[test]
fn a_device_restored_from_an_older_copy_takes_a_new_id_and_keeps_its_writes() {
    let dir = tempfile::tempdir().unwrap();
    let mut net = Net::new(NOTES);
    let path = dir.path().join("a.db");
    let mut a = device_at(&path, 77);
    net.sync(&mut a);
    a.exec("INSERT INTO notes VALUES ('n1', 'first')", &[], 1_000)
        .unwrap();
    net.sync(&mut a);
    // A copy of the device as it was now.
    let backup = backup_of(&a, &dir.path().join("backup.db"));
    a.exec("INSERT INTO notes VALUES ('n2', 'second')", &[], 2_000)
        .unwrap();
    net.sync(&mut a);
    drop(a);
    // The device comes back from the copy: it would number its next write 2,
    // which the server already has from it.
    let mut a = device_at(&backup, 99);
    let (outcome, _) = a
        .exec(
            "INSERT INTO notes VALUES ('n3', 'after restore')",
            &[],
            3_000,
        )
        .unwrap();
    assert_eq!(outcome.mutation, Some(2));
    let events = net.sync(&mut a);
    let rewound: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            Event::Rewound {
                old_client_id,
                new_client_id,
                renumbered,
                ..
            } => Some((*old_client_id, *new_client_id, renumbered.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(rewound.len(), 1, "{events:?}");
    assert_eq!(rewound[0].0, 77);
    assert_ne!(rewound[0].1, 77);
    assert_eq!(rewound[0].2, vec![(2, 1)]);
    assert_eq!(a.client_id(), rewound[0].1);
    let events = net.sync(&mut a);
    assert!(rejected(&events).is_empty(), "{events:?}");
    assert_eq!(a.status().pending, 0);
    let b = net.device();
    let want = vec![
        vec![text("n1"), text("first")],
        vec![text("n2"), text("second")],
        vec![text("n3"), text("after restore")],
    ];
    assert_eq!(rows(&a, "SELECT * FROM notes ORDER BY id"), want);
    assert_eq!(rows(&b, "SELECT * FROM notes ORDER BY id"), want);
    assert_eq!(net.server_rows("SELECT * FROM notes ORDER BY id"), want);
}

// ---- 8.3 a mutation no frame of the server can carry ------------------------

#[test]
fn a_mutation_too_large_for_the_servers_frames_is_refused_on_the_device() {
    let mut net = Net::new(VALUES);
    let mut a = net.device();
    a.exec("INSERT INTO vals (id, v) VALUES (1, 'small')", &[], 1_000)
        .unwrap();
    common::sync_with(&mut net.server, &mut a, &[], 4096);
    a.exec(
        "UPDATE vals SET b = zeroblob(10000) WHERE id = 1",
        &[],
        2_000,
    )
    .unwrap();
    a.exec("INSERT INTO vals (id, v) VALUES (2, 'after')", &[], 3_000)
        .unwrap();
    let events = common::sync_with(&mut net.server, &mut a, &[], 4096);
    let refused = rejected(&events);
    assert_eq!(refused.len(), 1, "{events:?}");
    assert_eq!((refused[0].0, refused[0].1.as_str()), (2, "TOO_LARGE"));
    assert!(refused[0].2.contains("4096"), "{refused:?}");
    assert_eq!(a.status().pending, 0);
    let want = vec![
        vec![Value::Integer(1), Value::Null],
        vec![Value::Integer(2), Value::Null],
    ];
    assert_eq!(rows(&a, "SELECT id, b FROM vals ORDER BY id"), want);
    assert_eq!(net.server_rows("SELECT id, b FROM vals ORDER BY id"), want);
}

#[test]
fn a_tree_in_one_table_and_a_key_to_a_unique_column_apply_as_a_whole() {
    let mut net = Net::new(
        "[tables.folders]
create = \"CREATE TABLE folders (id INTEGER PRIMARY KEY, parent INTEGER REFERENCES folders(id), name TEXT)\"
[tables.users]
create = \"CREATE TABLE users (id TEXT PRIMARY KEY, handle TEXT NOT NULL UNIQUE)\"
[tables.posts]
create = \"CREATE TABLE posts (id TEXT PRIMARY KEY, author TEXT REFERENCES users(handle), body TEXT)\"
",
    );
    let mut a = net.device();
    let mut b = net.device();
    // SQLite needs each parent first on the device; the rows travel in key
    // order, so the children (lower ids) come first.
    a.exec(
        "INSERT INTO folders VALUES (9, NULL, 'root'); INSERT INTO folders VALUES (5, 9, 'docs');
         INSERT INTO folders VALUES (1, 5, 'deep')",
        &[],
        1_000,
    )
    .unwrap();
    a.exec(
        "INSERT INTO users VALUES ('u1', 'ann'); INSERT INTO posts VALUES ('p1', 'ann', 'hi')",
        &[],
        1_000,
    )
    .unwrap();
    let events = net.sync(&mut a);
    assert!(rejected(&events).is_empty(), "{events:?}");
    net.sync(&mut b);
    assert_eq!(
        rows(&b, "SELECT count(*) FROM folders"),
        vec![vec![Value::Integer(3)]]
    );
    // Offline, B re-handles ann while A posts as ann: the server refuses the
    // one that lands second, as SQLite would on one database.
    b.exec(
        "UPDATE users SET handle = 'anna' WHERE id = 'u1'; UPDATE posts SET author = 'anna'",
        &[],
        2_000,
    )
    .unwrap_err(); // posts.author -> users.handle: SQLite itself refuses the first statement.
    a.exec(
        "INSERT INTO posts VALUES ('p2', 'ann', 'again')",
        &[],
        2_000,
    )
    .unwrap();
    net.sync(&mut a);
    b.exec(
        "DELETE FROM posts; UPDATE users SET handle = 'anna' WHERE id = 'u1'",
        &[],
        3_000,
    )
    .unwrap();
    net.sync(&mut a);
    let events = net.sync(&mut b);
    let refused = rejected(&events);
    assert_eq!(refused.len(), 1, "{events:?}");
    assert!(refused[0].2.contains("still reference"), "{refused:?}");
    // B's write is undone; everyone holds A's posts under 'ann'.
    for c in [&a, &b] {
        assert_eq!(rows(c, "SELECT handle FROM users"), vec![vec![text("ann")]]);
        assert_eq!(
            rows(c, "SELECT count(*) FROM posts"),
            vec![vec![Value::Integer(2)]]
        );
    }
}

#[test]
fn a_trigger_that_writes_another_synced_table_writes_it_once() {
    let mut net = Net::new(
        "[tables.notes]
create = \"\"\"CREATE TABLE notes (id TEXT PRIMARY KEY, body TEXT);
CREATE TRIGGER audit_insert AFTER INSERT ON notes BEGIN
  INSERT INTO audit (note, what) VALUES (NEW.id, 'created');
END;
CREATE TRIGGER audit_delete BEFORE DELETE ON notes BEGIN
  INSERT INTO audit (note, what) VALUES (OLD.id, 'deleted');
END\"\"\"
[tables.audit]
create = \"CREATE TABLE audit (id INTEGER PRIMARY KEY, note TEXT, what TEXT)\"
",
    );
    let mut a = net.device();
    let mut b = net.device();
    a.exec("INSERT INTO notes VALUES ('n1', 'x')", &[], 1_000)
        .unwrap();
    a.exec("DELETE FROM notes WHERE id = 'n1'", &[], 2_000)
        .unwrap();
    net.sync(&mut a);
    net.sync(&mut b);
    let fresh = net.device();
    let want = vec![
        vec![text("n1"), text("created")],
        vec![text("n1"), text("deleted")],
    ];
    let sql = "SELECT note, what FROM audit ORDER BY id";
    assert_eq!(rows(&a, sql), want);
    assert_eq!(rows(&b, sql), want);
    assert_eq!(rows(&fresh, sql), want);
    assert_eq!(net.server_rows(sql), want);
}

#[test]
fn the_server_tells_a_reused_number_from_a_re_send() {
    use hearth_engine::{ColumnOp, Hlc, Mutation, Outcome, RowChange, RowOp, ServerMsg};
    let mut net = Net::new(NOTES);
    let write = |seq: u64, body: &str| Mutation {
        base: 0,
        also_seen: Vec::new(),
        seq,
        hlc: Hlc(seq << 16),
        changes: vec![RowChange {
            table: "notes".into(),
            pk: text("n1"),
            op: RowOp::Upsert {
                insert: true,
                columns: vec![("body".into(), ColumnOp::Set(text(body)))],
            },
        }],
        schema_version: 0,
    };
    let out = net
        .server
        .apply_batch(&[(5, write(1, "a")), (5, write(2, "b"))])
        .unwrap();
    assert!(
        out.iter().all(|o| matches!(o, Outcome::Applied(_))),
        "{out:?}"
    );
    // The same mutation again: a duplicate, answered from the record.
    let out = net.server.apply_batch(&[(5, write(2, "b"))]).unwrap();
    assert!(matches!(out[0], Outcome::Duplicate { .. }), "{out:?}");
    // Number 2 with other content, then a new number: the device is rewound,
    // nothing more is taken from its id, and it is told so.
    let out = net
        .server
        .apply_batch(&[(5, write(2, "other")), (5, write(3, "c"))])
        .unwrap();
    for o in &out {
        match o.refusal() {
            Some(ServerMsg::Error { code, .. }) => assert_eq!(code, "DEVICE_REWOUND"),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        net.server_rows("SELECT body FROM notes"),
        vec![vec![text("b")]]
    );
    assert_eq!(net.server.head(), 2);
}

#[test]
fn zero_and_negative_zero_are_different_values() {
    let mut net = Net::new(VALUES);
    let mut a = net.device();
    a.exec(
        "INSERT INTO vals (id, v, r) VALUES (1, 0.0, 0.0)",
        &[],
        1_000,
    )
    .unwrap();
    net.sync(&mut a);
    for (step, z) in [-0.0f64, 0.0, -0.0].into_iter().enumerate() {
        let (outcome, _) = a
            .exec(
                "UPDATE vals SET v = ?1, r = ?1 WHERE id = 1",
                &[Value::Real(z)],
                2_000 + step as u64,
            )
            .unwrap();
        assert!(outcome.mutation.is_some(), "step {step}: {z:?} is a change");
    }
    net.sync(&mut a);
    let b = net.device();
    let want = rows(&a, "SELECT v, r FROM vals");
    assert!(
        matches!(want[0][0], Value::Real(z) if z.to_bits() == (-0.0f64).to_bits()),
        "{want:?}"
    );
    assert_eq!(rows(&b, "SELECT v, r FROM vals"), want);
    assert_eq!(net.server_rows("SELECT v, r FROM vals"), want);
}

#[test]
fn a_restored_device_editing_the_same_row_again_keeps_its_edit() {
    let dir = tempfile::tempdir().unwrap();
    let mut net = Net::new(NOTES);
    let path = dir.path().join("a.db");
    let mut a = device_at(&path, 77);
    net.sync(&mut a);
    a.exec("INSERT INTO notes VALUES ('n1', 'orig')", &[], 1_000)
        .unwrap();
    net.sync(&mut a);
    let backup = backup_of(&a, &dir.path().join("backup.db"));
    a.exec("UPDATE notes SET body = 'edit before restore'", &[], 2_000)
        .unwrap();
    net.sync(&mut a);
    drop(a);
    let mut a = device_at(&backup, 99);
    // The same row as the lost edit, under the same number (2).
    a.exec("UPDATE notes SET body = 'edit after restore'", &[], 3_000)
        .unwrap();
    let events = net.sync(&mut a);
    assert!(
        events.iter().any(|e| matches!(e, Event::Rewound { .. })),
        "{events:?}"
    );
    net.sync(&mut a);
    let b = net.device();
    let want = vec![vec![text("edit after restore")]];
    assert_eq!(rows(&a, "SELECT body FROM notes"), want);
    assert_eq!(rows(&b, "SELECT body FROM notes"), want);
    assert_eq!(net.server_rows("SELECT body FROM notes"), want);
}

#[test]
fn a_write_made_after_seeing_another_wins_when_the_servers_clock_steps_back() {
    let todos =
        "[tables.todos]\ncreate = \"CREATE TABLE todos (id TEXT PRIMARY KEY, title TEXT)\"\n";
    let mut net = Net::new(todos);
    let now = 1_764_000_000_000;
    net.server.set_now_ms(now);
    let mut a = net.device();
    let mut b = net.device();
    // A's clock runs an hour ahead: its write is lowered to now + 5 min.
    a.exec(
        "INSERT INTO todos VALUES ('t', 'from a')",
        &[],
        now + 3_600_000,
    )
    .unwrap();
    net.sync(&mut a);
    net.sync(&mut b);
    // The server's clock steps back ten minutes; B, which has seen A's
    // write, writes the same cell.
    net.server.set_now_ms(now - 600_000);
    b.exec(
        "UPDATE todos SET title = 'from b, later' WHERE id = 't'",
        &[],
        now - 600_000,
    )
    .unwrap();
    net.sync(&mut b);
    net.sync(&mut a);
    let want = vec![vec![text("from b, later")]];
    assert_eq!(rows(&a, "SELECT title FROM todos"), want);
    assert_eq!(rows(&b, "SELECT title FROM todos"), want);
    assert_eq!(net.server_rows("SELECT title FROM todos"), want);
}

/// Found by the simulator (seed 79): a restored device sent again, under its
/// new id, a write the server already had, which then overrode a write made
/// after it.
#[test]
fn a_write_sent_again_after_a_restore_does_not_override_writes_made_after_it() {
    let todos =
        "[tables.todos]\ncreate = \"CREATE TABLE todos (id TEXT PRIMARY KEY, title TEXT)\"\n";
    let mut net = Net::new(todos);
    let now = 1_764_000_000_000u64;
    net.server.set_now_ms(now);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.db");
    let mut a = device_at(&path, 77);
    net.sync(&mut a);
    let mut b = net.device();
    a.exec("INSERT INTO todos VALUES ('t', 'v1')", &[], now + 3_600_000)
        .unwrap();
    let backup = backup_of(&a, &dir.path().join("backup.db")); // A copy with #1 pending.
    net.sync(&mut a);
    a.exec(
        "INSERT INTO todos VALUES ('u', 'tail')",
        &[],
        now + 3_600_001,
    )
    .unwrap();
    net.sync(&mut a);
    net.server.set_now_ms(now + 60_000);
    net.sync(&mut b);
    b.exec(
        "UPDATE todos SET title = 'v2' WHERE id = 't'",
        &[],
        now + 60_000,
    )
    .unwrap();
    net.sync(&mut b);
    drop(a);
    let mut a = device_at(&backup, 99);
    net.server.set_now_ms(now + 20 * 60_000);
    net.sync(&mut a);
    net.sync(&mut a);
    net.sync(&mut b);
    let want = vec![vec![text("v2")]];
    assert_eq!(
        net.server_rows("SELECT title FROM todos WHERE id = 't'"),
        want
    );
    assert_eq!(rows(&b, "SELECT title FROM todos WHERE id = 't'"), want);
    assert_eq!(rows(&a, "SELECT title FROM todos WHERE id = 't'"), want);
    assert_eq!(
        rows(&a, "SELECT title FROM todos WHERE id = 'u'"),
        vec![vec![text("tail")]]
    );
    assert_eq!(a.status().pending, 0);
    // The restored device's next write is numbered past the server's.
    let (outcome, _) = a
        .exec(
            "INSERT INTO todos VALUES ('w', 'next')",
            &[],
            now + 3_600_002,
        )
        .unwrap();
    assert_eq!(outcome.mutation, Some(3));
    let events = net.sync(&mut a);
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::Applied { seq: 3, .. })),
        "{events:?}"
    );
}

/// Found by the simulator (seed 3): a clamped write could be stamped at or
/// below a clamped write its device had seen.
#[test]
fn a_write_made_after_seeing_a_clamped_one_wins() {
    let todos =
        "[tables.todos]\ncreate = \"CREATE TABLE todos (id TEXT PRIMARY KEY, title TEXT)\"\n";
    for step_back_ms in [0, 1_000] {
        let mut net = Net::new(todos);
        let now = 1_764_000_000_000u64;
        net.server.set_now_ms(now);
        // Y gets the smaller client id, so a tie would go to X.
        let mut y = net.device();
        let mut x = net.device();
        x.exec("INSERT INTO todos VALUES ('t', 'x')", &[], now + 86_400_000)
            .unwrap();
        net.sync(&mut x);
        net.sync(&mut y);
        net.server.set_now_ms(now - step_back_ms);
        y.exec(
            "UPDATE todos SET title = 'y' WHERE id = 't'",
            &[],
            now + 86_400_000,
        )
        .unwrap();
        net.sync(&mut y);
        net.sync(&mut x);
        let want = vec![vec![text("y")]];
        assert_eq!(
            net.server_rows("SELECT title FROM todos"),
            want,
            "step back {step_back_ms}"
        );
        assert_eq!(rows(&y, "SELECT title FROM todos"), want);
        assert_eq!(rows(&x, "SELECT title FROM todos"), want);
    }
}

// ---- a number skipped ------------------------------------------------------

const ORDERS: &str = r#"
[tables.orders]
create = "CREATE TABLE orders (id TEXT PRIMARY KEY)"
[tables.items]
create = "CREATE TABLE items (id TEXT PRIMARY KEY, order_id TEXT REFERENCES orders(id) DEFERRABLE INITIALLY DEFERRED)"
"#;

/// Found by the simulator (seed 27): an exec that failed at commit (a
/// deferred foreign key) still used up its number in memory, so the next
/// write skipped one; a device restored from a copy taken before then
/// wrote under the skipped number, which the server took for a re-send it
/// had no record of, and the write never arrived.
#[test]
fn a_write_that_fails_at_commit_uses_no_number_and_a_restored_device_still_syncs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.db");
    let mut net = Net::new(ORDERS);
    let mut a = device_at(&path, 1);
    net.sync(&mut a);
    a.exec("INSERT INTO orders VALUES ('o1')", &[], 1_000)
        .unwrap();
    net.sync(&mut a);
    let copy = backup_of(&a, &dir.path().join("a.copy"));
    a.exec("INSERT INTO items VALUES ('i1', 'nope')", &[], 2_000)
        .unwrap_err();
    let (o, _) = a
        .exec("INSERT INTO orders VALUES ('o2')", &[], 3_000)
        .unwrap();
    assert_eq!(o.mutation, Some(2), "the failed write took no number");
    net.sync(&mut a);
    drop(a);
    std::fs::copy(&copy, &path).unwrap();
    let mut a = device_at(&path, 1);
    a.exec("INSERT INTO orders VALUES ('o3')", &[], 4_000)
        .unwrap();
    net.sync(&mut a);
    net.sync(&mut a);
    assert_eq!(a.status().pending, 0);
    let want = vec![vec![text("o1")], vec![text("o2")], vec![text("o3")]];
    assert_eq!(net.server_rows("SELECT id FROM orders ORDER BY id"), want);
    assert_eq!(rows(&a, "SELECT id FROM orders ORDER BY id"), want);
}

/// Whatever made the gap, a number below the device's last that the server
/// has no record of is answered (the device is told to renumber), never
/// left as a silent duplicate.
#[test]
fn a_number_the_server_has_no_record_of_is_answered() {
    let mut net = Net::new(ORDERS);
    let write = |seq: u64, id: &str| hearth_engine::Mutation {
        base: 0,
        also_seen: Vec::new(),
        seq,
        hlc: hearth_engine::Hlc::new(1_000 + seq, 0),
        changes: vec![hearth_engine::RowChange {
            table: "orders".into(),
            pk: text(id),
            op: hearth_engine::RowOp::Upsert {
                insert: true,
                columns: vec![],
            },
        }],
        schema_version: 0,
    };
    let out = net
        .server
        .apply_batch(&[(7, write(1, "a")), (7, write(3, "c")), (7, write(2, "b"))])
        .unwrap();
    assert!(matches!(out[0], hearth_engine::Outcome::Applied(_)));
    assert!(matches!(out[1], hearth_engine::Outcome::Applied(_)));
    let refusal = out[2].refusal().expect("answered");
    assert!(
        matches!(&refusal, hearth_engine::ServerMsg::Error { code, .. } if code == "DEVICE_REWOUND"),
        "{refusal:?}"
    );
}
