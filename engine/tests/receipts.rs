//! What an app sees of its own writes: the verdict on each (kept across a
//! restart), which rows still wait for the server (`hearth_pending` in
//! SQL), the outbox as a list, and dropping a queued write on purpose.

use std::sync::Arc;

use hearth_engine::link::{Link, LinkConfig};
use hearth_engine::{
    Client, ClientConfig, ClientError, Event, Schema, ServerCore, Settlement, Value, Verdict,
    DEMO_SCHEMA,
};
use rusqlite::Connection;

mod common;

fn server() -> ServerCore {
    let schema = Schema::parse(DEMO_SCHEMA).unwrap();
    ServerCore::open(Connection::open_in_memory().unwrap(), schema).unwrap()
}

fn device(path: &std::path::Path, id: u64) -> Client {
    Client::open(Connection::open(path).unwrap(), id, ClientConfig::default()).unwrap()
}

fn text(s: &str) -> Value {
    Value::Text(s.into())
}

fn exec(c: &mut Client, sql: &str, now_ms: u64) -> u64 {
    c.exec(sql, &[], now_ms).unwrap().0.mutation.unwrap()
}

fn rows(c: &Client, sql: &str) -> Vec<Vec<Value>> {
    c.query(sql, &[]).unwrap().rows
}

/// Connects, lets the device send what it has pending, and loses the
/// connection before any answer: the server never sees those pushes.
fn send_and_lose(server: &mut ServerCore, c: &mut Client) -> usize {
    let mut link = Link::new(Arc::new(server.schema().clone()), LinkConfig::default());
    let hello = c.on_connected().remove(0);
    let hello = link.on_hello(hello).unwrap();
    let answer = server
        .greet(&hello, hearth_engine::protocol::FRAME_BYTES_MAX)
        .unwrap();
    let mut pushes = 0;
    let mut inbox = link.on_welcome(answer, server.head());
    while link.wants_entries(server.head()) {
        let entries = ServerCore::read_log(server.connection(), link.cursor(), 1000).unwrap();
        inbox.extend(link.on_entries(&entries, server.head()));
    }
    for msg in inbox {
        let out = c.handle(msg, 0).unwrap();
        pushes += out
            .send
            .iter()
            .filter(|m| matches!(m, hearth_engine::ClientMsg::Push { .. }))
            .count();
    }
    c.on_disconnected();
    pushes
}

#[test]
fn each_write_settles_with_a_verdict_that_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("device.db");
    let mut srv = server();
    let mut a = device(&path, 1);
    common::sync(&mut srv, &mut a);
    let kept = exec(
        &mut a,
        "INSERT INTO lists (id, name) VALUES ('l1', 'groceries')",
        1_000,
    );
    let refused = exec(
        &mut a,
        "INSERT INTO todos (id, list_id, title) VALUES ('t1', 'l1', 'milk'), ('t2', 'l1', 'eggs')",
        1_001,
    );
    assert_eq!(a.settlement(kept).unwrap(), Settlement::Pending);
    assert_eq!(a.settlement(refused).unwrap(), Settlement::Pending);
    let events = common::sync_refusing(&mut srv, &mut a, &[refused]);
    let undone = vec![
        ("todos".to_string(), text("t1")),
        ("todos".to_string(), text("t2")),
    ];
    assert!(
        events.contains(&Event::Rejected {
            seq: refused,
            code: "CONSTRAINT".into(),
            reason: "refused by the test".into(),
            undone: undone.clone(),
        }),
        "{events:?}"
    );
    let applied = Settlement::Settled(Verdict::Applied {
        server_seq: srv.head(),
    });
    let rejected = Settlement::Settled(Verdict::Rejected {
        code: "CONSTRAINT".into(),
        reason: "refused by the test".into(),
        undone,
    });
    assert_eq!(a.settlement(kept).unwrap(), applied);
    assert_eq!(a.settlement(refused).unwrap(), rejected);
    assert_eq!(a.settlement(99).unwrap(), Settlement::Unknown);
    // The app restarts: the verdicts are still there.
    drop(a);
    let a = device(&path, 7);
    assert_eq!(a.settlement(kept).unwrap(), applied);
    assert_eq!(a.settlement(refused).unwrap(), rejected);
}

#[test]
fn hearth_pending_is_true_until_the_last_write_to_the_row_settles() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("device.db");
    let mut srv = server();
    let mut a = device(&path, 1);
    let mut b = device(&dir.path().join("b.db"), 2);
    common::sync(&mut srv, &mut a);
    common::sync(&mut srv, &mut b);
    exec(
        &mut b,
        "INSERT INTO todos (id, list_id, title) VALUES ('theirs', 'l1', 'from b')",
        1_000,
    );
    common::sync(&mut srv, &mut b);
    common::sync(&mut srv, &mut a);
    exec(
        &mut a,
        "INSERT INTO todos (id, list_id, title) VALUES ('mine', 'l1', 'from a')",
        1_001,
    );
    exec(&mut a, "UPDATE todos SET done = 1 WHERE id = 'mine'", 1_002);
    let query = "SELECT id, hearth_pending('todos', id) FROM todos ORDER BY id";
    let marks = |c: &Client| rows(c, query);
    let expect = |mine: i64| {
        vec![
            vec![text("mine"), Value::Integer(mine)],
            vec![text("theirs"), Value::Integer(0)],
        ]
    };
    assert_eq!(marks(&a), expect(1));
    // Also a key that no row has, and another table's row with the same key.
    assert_eq!(
        rows(
            &a,
            "SELECT hearth_pending('todos', 'nope'), hearth_pending('lists', 'mine')"
        ),
        vec![vec![Value::Integer(0), Value::Integer(0)]]
    );
    // After a restart the outbox still marks the row.
    drop(a);
    let mut a = device(&path, 9);
    assert_eq!(marks(&a), expect(1));
    // The first write settles; the second still holds the row.
    let first = a.pending_seqs().unwrap()[0];
    let events = common::sync_refusing(&mut srv, &mut a, &[first + 1]);
    assert!(events
        .iter()
        .any(|e| matches!(e, Event::Rejected { seq, .. } if *seq == first + 1)));
    assert_eq!(marks(&a), expect(0));
    assert_eq!(
        rows(&a, "SELECT done FROM todos WHERE id = 'mine'"),
        vec![vec![Value::Integer(0)]]
    );
}

#[test]
fn the_outbox_lists_each_write_and_a_queued_one_can_be_discarded() {
    let dir = tempfile::tempdir().unwrap();
    let mut srv = server();
    let mut a = device(&dir.path().join("a.db"), 1);
    common::sync(&mut srv, &mut a);
    // Offline: three writes, the second and third to the same row.
    let made_at = 1_700_000_000_000;
    let one = exec(
        &mut a,
        "INSERT INTO todos (id, list_id, title) VALUES ('t1', 'l1', 'milk'); INSERT INTO lists (id, name) VALUES ('l1', 'home')",
        made_at,
    );
    let two = exec(
        &mut a,
        "UPDATE todos SET title = 'oat milk' WHERE id = 't1'",
        made_at + 5,
    );
    let three = exec(
        &mut a,
        "UPDATE todos SET done = 1 WHERE id = 't1'",
        made_at + 9,
    );
    let pending = a.pending_writes().unwrap();
    assert_eq!(
        pending.iter().map(|w| w.seq).collect::<Vec<_>>(),
        vec![one, two, three]
    );
    assert_eq!(pending[0].tables, vec!["lists".to_string(), "todos".into()]);
    let mut written = pending[0].rows.clone();
    written.sort_by(|x, y| x.0.cmp(&y.0));
    assert_eq!(
        written,
        vec![
            ("lists".to_string(), text("l1")),
            ("todos".to_string(), text("t1"))
        ]
    );
    assert_eq!(pending[1].made_at_ms, made_at + 5);
    assert!(pending.iter().all(|w| w.attempts == 0 && !w.sent));
    // The app drops the rename: it is undone, the later write stays.
    let (undone, out) = a.discard(two).unwrap();
    assert_eq!(undone, vec![("todos".to_string(), text("t1"))]);
    assert!(out.events.iter().any(|e| matches!(e,
        Event::Rejected { seq, code, .. } if *seq == two && code == "DISCARDED")));
    assert!(out
        .events
        .iter()
        .any(|e| matches!(e, Event::TablesChanged(t) if t.contains(&"todos".to_string()))));
    assert_eq!(
        rows(&a, "SELECT title, done FROM todos"),
        vec![vec![text("milk"), Value::Integer(1)]]
    );
    assert!(matches!(
        a.settlement(two).unwrap(),
        Settlement::Settled(Verdict::Rejected { code, .. }) if code == "DISCARDED"
    ));
    assert!(matches!(a.discard(two), Err(ClientError::NotPending(n)) if n == two));
    assert!(matches!(a.discard(42), Err(ClientError::NotPending(42))));
    // Back online: the server gets the others, never the rename.
    common::sync(&mut srv, &mut a);
    let on_server: Vec<(String, i64)> = srv
        .connection()
        .prepare("SELECT title, done FROM todos")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(on_server, vec![("milk".to_string(), 1)]);
    assert!(a.pending_writes().unwrap().is_empty());
    assert!(matches!(
        a.settlement(three).unwrap(),
        Settlement::Settled(Verdict::Applied { .. })
    ));
    assert!(matches!(a.discard(three), Err(ClientError::NotPending(_))));
}

#[test]
fn a_write_that_went_out_cannot_be_discarded() {
    let dir = tempfile::tempdir().unwrap();
    let mut srv = server();
    let mut a = device(&dir.path().join("a.db"), 1);
    common::sync(&mut srv, &mut a);
    let seq = exec(
        &mut a,
        "INSERT INTO lists (id, name) VALUES ('l1', 'home')",
        1_000,
    );
    assert_eq!(send_and_lose(&mut srv, &mut a), 1);
    let pending = a.pending_writes().unwrap();
    assert_eq!((pending[0].attempts, pending[0].sent), (1, true));
    let err = a.discard(seq).unwrap_err();
    assert!(matches!(err, ClientError::Sent(n) if n == seq));
    assert_eq!(err.code(), "SENT");
    // Still pending, still shown; the next connection delivers it.
    assert_eq!(rows(&a, "SELECT name FROM lists"), vec![vec![text("home")]]);
    common::sync(&mut srv, &mut a);
    assert!(matches!(
        a.settlement(seq).unwrap(),
        Settlement::Settled(Verdict::Applied { .. })
    ));
}
