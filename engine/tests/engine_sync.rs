//! Client and server halves of the engine wired together in memory (no
//! network): capture, push, merge, log, rebase and rollback.

use hearth_engine::{Client, ClientConfig, Event, Outcome, Schema, ServerCore, Value, DEMO_SCHEMA};
use rusqlite::Connection;

mod common;

struct Net {
    server: ServerCore,
}

impl Net {
    fn new() -> Net {
        let schema = Schema::parse(DEMO_SCHEMA).unwrap();
        Net {
            server: ServerCore::open(Connection::open_in_memory().unwrap(), schema).unwrap(),
        }
    }

    /// Runs one full sync of `client`: hello, push, catch up. Returns events.
    fn sync(&mut self, client: &mut Client) -> Vec<Event> {
        common::sync(&mut self.server, client)
    }
}

fn client(id: u64) -> Client {
    Client::open(
        Connection::open_in_memory().unwrap(),
        id,
        ClientConfig::default(),
    )
    .unwrap()
}

fn rows(c: &mut Client, sql: &str) -> Vec<Vec<Value>> {
    c.query(sql, &[]).unwrap().rows
}

fn text(s: &str) -> Value {
    Value::Text(s.into())
}

#[test]
fn two_clients_converge_and_only_changed_columns_travel() {
    let mut net = Net::new();
    let (mut a, mut b) = (client(1), client(2));
    net.sync(&mut a);
    net.sync(&mut b);
    let (outcome, _) = a
        .exec("INSERT INTO todos (id, list_id, title) VALUES ('t1', 'l1', 'milk'), ('t2', 'l1', 'eggs')", &[], 1_000)
        .unwrap();
    assert_eq!(outcome.rows_affected, 2);
    assert_eq!(outcome.mutation, Some(1));
    let events = net.sync(&mut a);
    assert!(
        events.contains(&Event::Applied {
            seq: 1,
            server_seq: 1
        }),
        "{events:?}"
    );
    assert_eq!(a.status().pending, 0);
    net.sync(&mut b);
    assert_eq!(
        rows(&mut b, "SELECT id, title FROM todos ORDER BY id"),
        vec![
            vec![text("t1"), text("milk")],
            vec![text("t2"), text("eggs")]
        ]
    );

    // Offline: A edits the title, B ticks done; both keep their edit.
    a.exec(
        "UPDATE todos SET title = 'oat milk' WHERE id = 't1'",
        &[],
        2_000,
    )
    .unwrap();
    b.exec("UPDATE todos SET done = 1 WHERE id = 't1'", &[], 2_000)
        .unwrap();
    net.sync(&mut a);
    net.sync(&mut b);
    net.sync(&mut a);
    let expect = vec![vec![text("oat milk"), Value::Integer(1)]];
    assert_eq!(
        rows(&mut a, "SELECT title, done FROM todos WHERE id = 't1'"),
        expect
    );
    assert_eq!(
        rows(&mut b, "SELECT title, done FROM todos WHERE id = 't1'"),
        expect
    );
    let log = ServerCore::read_log(net.server.connection(), 0, 100).unwrap();
    let last = log.last().unwrap();
    match &last.changes[0].op {
        hearth_engine::RowOp::Upsert { columns, .. } => {
            assert_eq!(columns.len(), 1, "only 'done' travels")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn same_column_later_clock_wins_on_every_device() {
    let mut net = Net::new();
    let (mut a, mut b) = (client(1), client(2));
    net.sync(&mut a);
    net.sync(&mut b);
    a.exec(
        "INSERT INTO todos (id, list_id, title) VALUES ('t1', 'l1', 'x')",
        &[],
        1_000,
    )
    .unwrap();
    net.sync(&mut a);
    net.sync(&mut b);
    // B writes later by clock but syncs first; A's earlier write must lose.
    b.exec(
        "UPDATE todos SET title = 'from b' WHERE id = 't1'",
        &[],
        5_000,
    )
    .unwrap();
    a.exec(
        "UPDATE todos SET title = 'from a' WHERE id = 't1'",
        &[],
        3_000,
    )
    .unwrap();
    net.sync(&mut b);
    net.sync(&mut a);
    net.sync(&mut b);
    for c in [&mut a, &mut b] {
        assert_eq!(
            rows(c, "SELECT title FROM todos"),
            vec![vec![text("from b")]]
        );
    }
}

#[test]
fn refused_mutation_is_rolled_back_and_later_pending_survive() {
    // A UNIQUE name: a write fine on its device alone is refused when
    // another device took the name first.
    let schema = Schema::parse(
        "version = 1
[tables.tags]
create = \"CREATE TABLE tags (id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE)\"
[tables.notes]
create = \"CREATE TABLE notes (id TEXT PRIMARY KEY, body TEXT)\"
",
    )
    .unwrap();
    let mut net = Net {
        server: ServerCore::open(Connection::open_in_memory().unwrap(), schema).unwrap(),
    };
    let (mut a, mut b) = (client(1), client(2));
    net.sync(&mut a);
    net.sync(&mut b);
    a.exec("INSERT INTO notes VALUES ('n1', 'ok')", &[], 1)
        .unwrap();
    net.sync(&mut a);
    // Offline: B takes the name 'urgent'; A renames its note, then tags with
    // the same name, then writes again.
    b.exec("INSERT INTO tags VALUES ('b1', 'urgent')", &[], 2)
        .unwrap();
    net.sync(&mut b);
    a.exec("UPDATE notes SET body = 'renamed' WHERE id = 'n1'", &[], 2)
        .unwrap();
    a.exec("INSERT INTO tags VALUES ('a1', 'urgent')", &[], 3)
        .unwrap();
    a.exec("INSERT INTO tags VALUES ('a2', 'later')", &[], 4)
        .unwrap();
    let events = net.sync(&mut a);
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::Rejected { seq: 3, code, .. } if code == "CONSTRAINT")),
        "{events:?}"
    );
    // Mutation 3 (the clashing tag) was refused: its effect is gone; 2 and 4 survived.
    assert_eq!(
        rows(&mut a, "SELECT body FROM notes"),
        vec![vec![text("renamed")]]
    );
    assert_eq!(
        rows(&mut a, "SELECT id, name FROM tags ORDER BY id"),
        vec![
            vec![text("a2"), text("later")],
            vec![text("b1"), text("urgent")]
        ]
    );
    assert_eq!(a.status().pending, 0);
}

#[test]
fn delete_wins_over_concurrent_update_and_reinsert_needs_a_later_clock() {
    let mut net = Net::new();
    let (mut a, mut b) = (client(1), client(2));
    net.sync(&mut a);
    net.sync(&mut b);
    a.exec(
        "INSERT INTO todos (id, list_id, title) VALUES ('t1', 'l1', 'x')",
        &[],
        1_000,
    )
    .unwrap();
    net.sync(&mut a);
    net.sync(&mut b);
    a.exec("DELETE FROM todos WHERE id = 't1'", &[], 2_000)
        .unwrap();
    b.exec("UPDATE todos SET title = 'y' WHERE id = 't1'", &[], 9_000)
        .unwrap();
    net.sync(&mut a);
    net.sync(&mut b);
    assert!(rows(&mut b, "SELECT * FROM todos").is_empty());
    assert_eq!(b.status().pending, 0);
}

#[test]
fn capture_handles_upserts_pk_changes_and_noops() {
    let mut net = Net::new();
    let mut a = client(1);
    net.sync(&mut a);
    let (o, _) = a
        .exec(
            "INSERT INTO todos (id, list_id, title) VALUES ('t1', 'l1', 'x')",
            &[],
            1,
        )
        .unwrap();
    assert_eq!(o.mutation, Some(1));
    let (o, _) = a
        .exec("UPDATE todos SET title = 'x' WHERE id = 't1'", &[], 2)
        .unwrap();
    assert_eq!(o.mutation, None, "writing the same value changes nothing");
    let (o, _) = a
        .exec(
            "INSERT INTO todos (id, list_id, title) VALUES (?1, 'l1', 'y') ON CONFLICT(id) DO UPDATE SET title = excluded.title",
            &[text("t1")],
            3,
        )
        .unwrap();
    assert_eq!(o.mutation, Some(2));
    a.exec("UPDATE todos SET id = 't9' WHERE id = 't1'", &[], 4)
        .unwrap();
    let mut b = client(2);
    net.sync(&mut a);
    net.sync(&mut b);
    assert_eq!(
        rows(&mut b, "SELECT id, title FROM todos"),
        vec![vec![text("t9"), text("y")]]
    );
}

#[test]
fn bad_sql_and_transaction_control_are_clear_errors() {
    let mut net = Net::new();
    let mut a = client(1);
    net.sync(&mut a);
    let e = a.exec("INSER INTO todos", &[], 1).unwrap_err();
    assert_eq!(e.code(), "SQL_ERROR");
    let e = a.exec("COMMIT", &[], 1).unwrap_err();
    assert!(e.to_string().contains("one exec is one transaction"), "{e}");
    let e = a.exec("DELETE FROM _hearth_outbox", &[], 1).unwrap_err();
    assert!(e.to_string().contains("Hearth's own"), "{e}");
    let e = a
        .exec(
            "INSERT INTO todos (id, list_id, title) VALUES (?1, ?2, ?3)",
            &[text("a")],
            1,
        )
        .unwrap_err();
    assert!(e.to_string().contains("takes 3 parameters but 1"), "{e}");
    let e = a
        .exec(
            "INSERT INTO todos (id, list_id, title) VALUES (NULL, 'l', 't')",
            &[],
            1,
        )
        .unwrap_err();
    assert!(e.to_string().contains("cannot be NULL"), "{e}");
    assert_eq!(a.status().pending, 0);
    assert!(rows(&mut a, "SELECT * FROM todos").is_empty());
}

#[test]
fn exec_many_is_one_mutation_and_checks_every_parameter_set() {
    let mut net = Net::new();
    let mut a = client(1);
    net.sync(&mut a);
    let sets: Vec<Vec<Value>> = (0..3)
        .map(|i| vec![text(&format!("t{i}")), text(&format!("title {i}"))])
        .collect();
    let (o, _) = a
        .exec_many(
            "INSERT INTO todos (id, list_id, title) VALUES (?1, 'l', ?2)",
            &sets,
            1,
        )
        .unwrap();
    assert_eq!((o.mutation, o.rows_affected), (Some(1), 3));
    let bad = vec![vec![text("t9"), text("x")], vec![text("only one")]];
    let e = a
        .exec_many(
            "INSERT INTO todos (id, list_id, title) VALUES (?1, 'l', ?2)",
            &bad,
            2,
        )
        .unwrap_err();
    assert!(e.to_string().contains("takes 2 parameters but 1"), "{e}");
    assert_eq!(a.status().pending, 1, "the failed call left nothing behind");
    let mut b = client(2);
    net.sync(&mut a);
    net.sync(&mut b);
    assert_eq!(
        rows(&mut b, "SELECT count(*) FROM todos"),
        vec![vec![Value::Integer(3)]]
    );
}

#[test]
fn a_clock_far_ahead_cannot_win_for_hours_and_cannot_crash_anyone() {
    let mut net = Net::new();
    net.server.set_now_ms(1_000_000);
    let (mut a, mut b) = (client(1), client(2));
    net.sync(&mut a);
    net.sync(&mut b);
    a.exec(
        "INSERT INTO todos (id, list_id, title) VALUES ('t1', 'l', 'x')",
        &[],
        1_000_000,
    )
    .unwrap();
    net.sync(&mut a);
    // A device whose clock reads the year 10,000 (or the largest stamp a
    // hostile device can send) writes; its stamp is lowered to the cap.
    let far = hearth_engine::Hlc(u64::MAX);
    let outcomes = net
        .server
        .apply_batch(&[(
            99,
            hearth_engine::Mutation {
                base: 0,
                also_seen: Vec::new(),
                seq: 1,
                hlc: far,
                changes: vec![hearth_engine::RowChange {
                    table: "todos".into(),
                    pk: text("t1"),
                    op: hearth_engine::RowOp::Upsert {
                        insert: false,
                        columns: vec![(
                            "title".into(),
                            hearth_engine::ColumnOp::Set(text("from the future")),
                        )],
                    },
                }],
                schema_version: 0,
            },
        )])
        .unwrap();
    let Outcome::Applied(entry) = &outcomes[0] else {
        panic!("{outcomes:?}")
    };
    let cap = 1_000_000 + hearth_engine::server::CLOCK_AHEAD_MAX_MS;
    assert_eq!(entry.hlc.wall_ms(), cap);
    net.sync(&mut b);
    assert_eq!(
        rows(&mut b, "SELECT title FROM todos"),
        vec![vec![text("from the future")]]
    );
    // Once real time passes the cap, an honest later write wins again.
    net.server.set_now_ms(cap + 10);
    b.exec(
        "UPDATE todos SET title = 'now' WHERE id = 't1'",
        &[],
        cap + 10,
    )
    .unwrap();
    net.sync(&mut b);
    net.sync(&mut a);
    assert_eq!(
        rows(&mut a, "SELECT title FROM todos"),
        vec![vec![text("now")]]
    );
}
