//! Bugs the deterministic simulation (`tests/simulation.rs` at the root)
//! found, each pinned down as the smallest engine-level case. The simulation
//! keeps its own seed-based regression cases too.

use hearth_engine::{
    Client, ClientConfig, ColumnOp, Event, Hlc, Mutation, Outcome, RowChange, RowOp, Schema,
    ServerCore, Value,
};
use rusqlite::Connection;

mod common;
use common::{sync, sync_refusing};

const SCHEMA: &str = r#"
version = 1
[tables.users]
create = "CREATE TABLE users (id TEXT PRIMARY KEY, email TEXT UNIQUE, name TEXT NOT NULL)"
"#;

fn server() -> ServerCore {
    ServerCore::open(
        Connection::open_in_memory().unwrap(),
        Schema::parse(SCHEMA).unwrap(),
    )
    .unwrap()
}

fn client(id: u64) -> Client {
    Client::open(
        Connection::open_in_memory().unwrap(),
        id,
        ClientConfig::default(),
    )
    .unwrap()
}

fn users(c: &Client) -> Vec<Vec<Value>> {
    c.query("SELECT id, email, name FROM users ORDER BY id", &[])
        .unwrap()
        .rows
}

fn text(s: &str) -> Value {
    Value::Text(s.into())
}

/// Found by the simulation (seed 1): an upsert of a row an earlier statement
/// of the same transaction had updated failed with "UNIQUE constraint failed:
/// _hearth_old_0.id", because SQLite applies the firing statement's conflict
/// policy to the capture trigger's `INSERT OR IGNORE` into the pre-image table.
#[test]
fn upsert_after_update_in_one_transaction_is_captured() {
    let mut srv = server();
    let mut a = client(1);
    sync(&mut srv, &mut a);
    a.exec(
        "INSERT INTO users (id, email, name) VALUES ('u1', 'e1', 'first')",
        &[],
        1_000,
    )
    .unwrap();
    sync(&mut srv, &mut a);
    let (outcome, _) = a
        .exec(
            "UPDATE users SET name = 'second' WHERE id = 'u1'; \
             INSERT INTO users (id, email, name) VALUES ('u1', 'e1', 'third') ON CONFLICT (id) DO UPDATE SET name = excluded.name",
            &[],
            2_000,
        )
        .unwrap();
    assert_eq!(outcome.mutation, Some(2));
    sync(&mut srv, &mut a);
    assert_eq!(users(&a), vec![vec![text("u1"), text("e1"), text("third")]]);
}

/// Same cause under `INSERT OR REPLACE`: the trigger's pre-image was replaced
/// by a later one, so rolling back a refused mutation restored an
/// intermediate state of its own transaction instead of the row before it.
#[test]
fn refused_replace_restores_the_row_as_it_was_before_the_transaction() {
    let mut srv = server();
    let mut a = client(1);
    sync(&mut srv, &mut a);
    a.exec(
        "INSERT INTO users (id, email, name) VALUES ('u1', 'e1', 'before')",
        &[],
        1_000,
    )
    .unwrap();
    sync(&mut srv, &mut a);
    a.exec(
        "UPDATE users SET name = 'intermediate' WHERE id = 'u1'; \
         INSERT OR REPLACE INTO users (id, email, name) VALUES ('u1', 'e1', 'after')",
        &[],
        2_000,
    )
    .unwrap();
    let events = sync_refusing(&mut srv, &mut a, &[2]);
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::Rejected { seq: 2, .. })),
        "{events:?}"
    );
    assert_eq!(
        users(&a),
        vec![vec![text("u1"), text("e1"), text("before")]]
    );
}

/// Found by the simulation (seed 3): an `INSERT OR REPLACE` that displaced
/// another row holding the same UNIQUE value could not be undone (the device
/// restored the displaced row first, while the new row still held the
/// value), so every later server message failed on that device for good.
#[test]
fn undo_of_a_replace_that_displaced_a_unique_value_succeeds() {
    let mut srv = server();
    let mut a = client(1);
    sync(&mut srv, &mut a);
    a.exec(
        "INSERT INTO users (id, email, name) VALUES ('u5', 'e1', 'old owner')",
        &[],
        1_000,
    )
    .unwrap();
    sync(&mut srv, &mut a);
    a.exec(
        "INSERT OR REPLACE INTO users (id, email, name) VALUES ('u1', 'e1', 'new owner')",
        &[],
        2_000,
    )
    .unwrap();
    assert_eq!(
        users(&a),
        vec![vec![text("u1"), text("e1"), text("new owner")]]
    );
    let events = sync_refusing(&mut srv, &mut a, &[2]);
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::Rejected { seq: 2, .. })),
        "{events:?}"
    );
    assert_eq!(
        users(&a),
        vec![vec![text("u5"), text("e1"), text("old owner")]]
    );
}

/// Found by the simulation (seed 1, through its hostile device): a mutation
/// naming the same row twice was applied in part, the second write silently
/// lost (it carried the same stamp, which does not beat itself). The server
/// now refuses such a malformed mutation as a whole.
#[test]
fn a_mutation_writing_one_row_twice_is_refused_whole() {
    let mut srv = server();
    let insert = |email: &str| RowChange {
        table: "users".into(),
        pk: text("u1"),
        op: RowOp::Upsert {
            insert: true,
            columns: vec![
                ("email".into(), ColumnOp::Set(text(email))),
                ("name".into(), ColumnOp::Set(text("n"))),
            ],
        },
    };
    let m = Mutation {
        base: 0,
        also_seen: Vec::new(),
        seq: 1,
        hlc: Hlc(10),
        changes: vec![insert("e1"), insert("e2")],
        schema_version: 0,
    };
    let outcomes = srv.apply_batch(&[(7, m)]).unwrap();
    assert!(
        matches!(&outcomes[0], Outcome::Rejected { code, .. } if code == "INVALID"),
        "{outcomes:?}"
    );
    let count: i64 = srv
        .connection()
        .query_row("SELECT count(*) FROM users", [], |r| r.get(0))
        .unwrap();
    assert_eq!(count, 0);
}
