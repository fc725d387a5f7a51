//! Upgrades over files written by older Hearth (issue 9): the fixtures in
//! `tests/fixtures/store-v1` were written by the code of commit d4db136,
//! before persisted encodings carried a version. An upgraded server keeps
//! serving that store, and an upgraded device sends the writes that were
//! waiting in its outbox, each applied once.

use hearth_engine::{Client, ClientConfig, Schema, ServerCore, Value};
use rusqlite::Connection;

mod common;

fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/store-v1")
        .join(name)
}

fn rows(conn: &Connection, sql: &str) -> Vec<Vec<Value>> {
    let mut stmt = conn.prepare(sql).unwrap();
    let width = stmt.column_count();
    stmt.query_map([], |r| (0..width).map(|i| r.get(i)).collect())
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

fn text(s: &str) -> Value {
    Value::Text(s.into())
}

#[test]
fn an_old_store_and_an_old_outbox_keep_working() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("hearth.db");
    let device = dir.path().join("device.db");
    std::fs::copy(fixture("hearth.db"), &store).unwrap();
    std::fs::copy(fixture("device.db"), &device).unwrap();
    let schema = Schema::parse(&std::fs::read_to_string(fixture("schema.toml")).unwrap()).unwrap();
    let mut server = ServerCore::open(Connection::open(&store).unwrap(), schema).unwrap();
    assert_eq!(server.head(), 5);

    // The device's two writes made offline under the old code go through.
    let mut d = Client::open(
        Connection::open(&device).unwrap(),
        99,
        ClientConfig::default(),
    )
    .unwrap();
    assert_eq!(d.status().pending, 2);
    let events = common::sync(&mut server, &mut d);
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, hearth_engine::Event::Rejected { .. })),
        "{events:?}"
    );
    assert_eq!(d.status().pending, 0);
    let want = vec![
        vec![text("t1"), text("Oat milk"), Value::Integer(1)],
        vec![text("t2"), text("Free-range eggs"), Value::Integer(1)],
        vec![text("t4"), text("Call Sam"), Value::Integer(0)],
    ];
    let sql = "SELECT id, title, done FROM todos ORDER BY id";
    assert_eq!(rows(server.connection(), sql), want);
    assert_eq!(d.query(sql, &[]).unwrap().rows, want);
    // Sent again (a lost ack), nothing is applied twice.
    common::sync(&mut server, &mut d);
    assert_eq!(server.head(), 7);

    // Rows whose merge records are in the old format merge with new writes,
    // by their old stamps: a new device's update wins, the deleted row stays
    // deleted.
    let mut fresh = Client::open(
        Connection::open_in_memory().unwrap(),
        7,
        ClientConfig::default(),
    )
    .unwrap();
    common::sync(&mut server, &mut fresh);
    assert_eq!(fresh.query(sql, &[]).unwrap().rows, want);
    fresh
        .exec(
            "UPDATE todos SET title = 'Milk again' WHERE id = 't1'",
            &[],
            u64::MAX >> 20,
        )
        .unwrap();
    fresh
        .exec(
            "UPDATE todos SET title = 'Back?' WHERE id = 't3'",
            &[],
            u64::MAX >> 20,
        )
        .unwrap();
    common::sync(&mut server, &mut fresh);
    common::sync(&mut server, &mut d);
    let sql = "SELECT id, title FROM todos ORDER BY id";
    let want = vec![
        vec![text("t1"), text("Milk again")],
        vec![text("t2"), text("Free-range eggs")],
        vec![text("t4"), text("Call Sam")],
    ];
    assert_eq!(rows(server.connection(), sql), want);
    assert_eq!(d.query(sql, &[]).unwrap().rows, want);
    assert_eq!(fresh.query(sql, &[]).unwrap().rows, want);
}

#[test]
fn a_write_the_old_server_took_is_answered_as_a_resend_after_the_upgrade() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("hearth.db");
    let device = dir.path().join("device.db");
    std::fs::copy(fixture("hearth-acked.db"), &store).unwrap();
    std::fs::copy(fixture("device.db"), &device).unwrap();
    let schema = Schema::parse(&std::fs::read_to_string(fixture("schema.toml")).unwrap()).unwrap();
    let mut server = ServerCore::open(Connection::open(&store).unwrap(), schema).unwrap();
    assert_eq!(server.head(), 7);
    let mut d = Client::open(
        Connection::open(&device).unwrap(),
        99,
        ClientConfig::default(),
    )
    .unwrap();
    let id = d.client_id();
    assert_eq!(d.status().pending, 2);
    let events = common::sync(&mut server, &mut d);
    // Its acks are in the log: taken as such, nothing applied again, and the
    // device keeps its identity (no rewind).
    assert!(
        !events.iter().any(|e| matches!(
            e,
            hearth_engine::Event::Rewound { .. } | hearth_engine::Event::Rejected { .. }
        )),
        "{events:?}"
    );
    assert_eq!(d.status().pending, 0);
    assert_eq!(d.client_id(), id);
    assert_eq!(server.head(), 7);
    let sql = "SELECT id, title FROM todos ORDER BY id";
    assert_eq!(
        d.query(sql, &[]).unwrap().rows,
        rows(server.connection(), sql)
    );
}
