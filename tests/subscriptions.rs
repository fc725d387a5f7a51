//! Selective sync (issue 10) over real sockets: a real `hearth serve` child
//! process with a schema that has streams, devices as `hearth client`
//! commands on SQLite files (and, where a test must cut a connection in the
//! middle of a load, the library's native client on a real WebSocket).
//!
//! Every oracle is what a user expects, computed independently of the
//! engine's filter code: the server's store read with rusqlite (a plain
//! `WHERE list_id = 'a'`), or the rows the test itself wrote.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::cli::{json_line, stderr, Device, Served};
use futures_util::{SinkExt, StreamExt};
use hearth::native_client::{self, Goal};
use hearth_engine::filter::Param;
use hearth_engine::protocol::{
    decode_server, encode_client, ClientMsg, Load, ServerMsg, Subscription, FRAME_BYTES_MAX,
};
use hearth_engine::{ClientConfig, Event, Value};
use serde_json::{json, Value as Json};
use tokio_tungstenite::tungstenite::Message;

/// `todos` is streamed (by list, and by id for tests that need a few rows
/// of any list); `tags` is named by no stream, so it syncs whole.
const SCHEMA: &str = r#"
version = 1
[tables.todos]
create = """
CREATE TABLE todos (
  id      TEXT PRIMARY KEY,
  list_id TEXT NOT NULL,
  title   TEXT NOT NULL DEFAULT '',
  done    INTEGER NOT NULL DEFAULT 0,
  note    TEXT
)"""
merge = "lww"

[tables.tags]
create = "CREATE TABLE tags (id TEXT PRIMARY KEY, name TEXT NOT NULL)"
merge = "lww"

[streams.list_todos]
table = "todos"
where = "list_id = :list"

[streams.todo_by_id]
table = "todos"
where = "id IN :ids"
"#;

const ALL_COLUMNS: &str = "SELECT id, list_id, title, done, note FROM todos";

fn list(name: &str) -> String {
    json!({ "list": name }).to_string()
}

/// The server's rows of one list, read from its store file.
fn server_list(server: &Served, name: &str) -> Vec<Json> {
    server.query(&format!(
        "{ALL_COLUMNS} WHERE list_id = '{name}' ORDER BY id"
    ))
}

fn device_todos(device: &Device) -> Vec<Json> {
    device.query(&format!("{ALL_COLUMNS} ORDER BY id"))
}

fn ids(rows: &[Json]) -> Vec<String> {
    rows.iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect()
}

fn exec_ok(device: &Device, sql: &str) {
    let out = device.exec(sql);
    assert!(out.status.success(), "{sql}: {out:?}");
    assert_eq!(json_line(&out)["status"], "applied", "{sql}: {out:?}");
}

fn subscribe_ok(device: &Device, stream: &str, params: &str) -> Json {
    let out = device.subscribe(stream, params);
    assert!(out.status.success(), "subscribe {stream} {params}: {out:?}");
    let line = json_line(&out);
    assert_eq!(line["status"], "loaded", "{line}");
    assert_eq!(line["loaded"], true, "{line}");
    line
}

/// (1) Rows move in (whole) and out (evicted, locally only) as writes change
/// which list they are in; edits outside a device's lists never reach it.
#[test]
fn rows_move_in_whole_and_out_locally() {
    let dir = tempfile::tempdir().unwrap();
    let server = Served::start(dir.path(), SCHEMA);
    let a = Device::new(dir.path(), "a", &server.url);
    let b = Device::new(dir.path(), "b", &server.url);
    let c = Device::new(dir.path(), "c", &server.url);
    // A follows both lists, so it holds every row it writes.
    a.sync();
    subscribe_ok(&a, "list_todos", &list("a"));
    subscribe_ok(&a, "list_todos", &list("b"));
    exec_ok(
        &a,
        "INSERT INTO todos (id, list_id, title, done, note) VALUES \
         ('t1', 'b', 'milk', 1, 'semi-skimmed'), ('t2', 'a', 'eggs', 0, NULL), \
         ('t3', 'b', 'bread', 0, 'rye')",
    );
    let line = subscribe_ok(&b, "list_todos", &list("a"));
    assert_eq!(line["rows"], 1, "{line}");
    subscribe_ok(&c, "list_todos", &list("b"));
    assert_eq!(ids(&device_todos(&b)), ["t2"]);
    assert_eq!(ids(&device_todos(&c)), ["t1", "t3"]);

    // Move in: B gains t1 whole (every column as the server has it, not
    // just the list_id that changed).
    exec_ok(&a, "UPDATE todos SET list_id = 'a' WHERE id = 't1'");
    b.sync();
    c.sync();
    assert_eq!(device_todos(&b), server_list(&server, "a"));
    assert_eq!(
        device_todos(&b)[0],
        json!({"id": "t1", "list_id": "a", "title": "milk", "done": 1, "note": "semi-skimmed"})
    );
    assert_eq!(ids(&device_todos(&c)), ["t3"], "C lost t1");

    // Move out: B loses it, C gains it back.
    exec_ok(&a, "UPDATE todos SET list_id = 'b' WHERE id = 't1'");
    let status = b.sync();
    assert_eq!(status["pending"], 0, "an eviction is not a write: {status}");
    c.sync();
    assert_eq!(ids(&device_todos(&b)), ["t2"]);
    assert_eq!(device_todos(&c), server_list(&server, "b"));

    // An edit while it is in "b" never reaches B.
    exec_ok(&a, "UPDATE todos SET title = 'oat milk' WHERE id = 't1'");
    let status = b.sync();
    assert_eq!(status["pending"], 0, "{status}");
    c.sync();
    a.sync();
    assert_eq!(ids(&device_todos(&b)), ["t2"]);
    assert!(b
        .query("SELECT * FROM todos WHERE title = 'oat milk'")
        .is_empty());

    // Each device holds exactly the rows of its lists; the evictions were
    // never deletes: the row is still on the server and on C.
    assert_eq!(device_todos(&b), server_list(&server, "a"));
    assert_eq!(device_todos(&c), server_list(&server, "b"));
    assert_eq!(
        device_todos(&a),
        server.query(&format!("{ALL_COLUMNS} ORDER BY id"))
    );
    assert_eq!(
        server.query(&format!("{ALL_COLUMNS} WHERE id = 't1'")),
        [
            json!({"id": "t1", "list_id": "b", "title": "oat milk", "done": 1, "note": "semi-skimmed"})
        ]
    );
    assert_eq!(server.query("SELECT id FROM todos").len(), 3);
}

/// One batch of a concurrent writer's work on lists "a" and "b": new rows in
/// "a" spread over the key range, rows moved out of "a" and into it, and
/// real deletes of rows of "a". Device `w` follows list "b".
fn writer_batch(w: &Device, k: u64) {
    let spread = |j: u64| (k * 7919 + j * 4999) % 100_000 + 1;
    // New rows of "a", keys between the loaded ones.
    let values: Vec<String> = (0..20)
        .map(|j| format!("('t{:06}.{k}', 'a', 'new {k}.{j}', 0, NULL)", spread(j)))
        .collect();
    exec_ok(
        w,
        &format!(
            "INSERT INTO todos (id, list_id, title, done, note) VALUES {}",
            values.join(", ")
        ),
    );
    // Moved out of "a": W has no copy, so it writes the row whole (the
    // server takes the newer write, so the row is in "b" afterwards).
    let out_ids: Vec<String> = (20..40).map(|j| format!("t{:06}", spread(j))).collect();
    let values: Vec<String> = out_ids
        .iter()
        .map(|id| format!("('{id}', 'b', 'moved out {k}', 0, NULL)"))
        .collect();
    exec_ok(
        w,
        &format!(
            "INSERT INTO todos (id, list_id, title, done, note) VALUES {} \
             ON CONFLICT (id) DO UPDATE SET list_id = excluded.list_id, title = excluded.title",
            values.join(", ")
        ),
    );
    // Moved into "a": rows of "b" that W holds.
    exec_ok(
        w,
        &format!(
            "UPDATE todos SET list_id = 'a', title = 'moved in {k}' WHERE id IN \
             (SELECT id FROM todos WHERE list_id = 'b' AND id LIKE 'u%' ORDER BY id LIMIT 10)"
        ),
    );
    // Real deletes of rows of "a": W follows them by id, then deletes them.
    let del_ids: Vec<String> = (40..50).map(|j| format!("t{:06}", spread(j))).collect();
    subscribe_ok(w, "todo_by_id", &json!({ "ids": del_ids }).to_string());
    let quoted: Vec<String> = del_ids.iter().map(|id| format!("'{id}'")).collect();
    exec_ok(
        w,
        &format!("DELETE FROM todos WHERE id IN ({})", quoted.join(", ")),
    );
    let out = w.unsubscribe("todo_by_id", &json!({ "ids": del_ids }).to_string());
    assert!(out.status.success(), "{out:?}");
}

/// Receives until `stop` says so (given each event), the goal is reached, or
/// the time runs out. Returns the rows counts of the `Loaded` events seen.
async fn drive(
    client: &mut hearth_engine::Client,
    ws: &mut native_client::Ws,
    mut stop: impl FnMut(&Event, &[u64]) -> bool,
) -> Vec<u64> {
    let mut loaded = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let events = tokio::time::timeout_at(deadline, native_client::step(client, ws))
            .await
            .expect("the load goes on in time")
            .expect("the session works")
            .expect("the server keeps the connection open");
        for e in &events {
            if let Event::Loaded { rows, .. } = e {
                loaded.push(*rows);
            }
            if stop(e, &loaded) {
                return loaded;
            }
        }
    }
}

/// (2) A 100k-row initial load, cut twice and resumed (not restarted) while
/// another device inserts into the stream, moves rows in and out, and
/// deletes some; at the end the device holds exactly the server's rows of
/// its list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_initial_load_resumes_under_concurrent_writes() {
    let dir = tempfile::tempdir().unwrap();
    let server = Served::start(dir.path(), SCHEMA);
    let url = server.url.clone();
    // 100k rows in "a" and 100 in "b", written in a few transactions.
    let (seed_, w_) = (
        Device::new(dir.path(), "seed", &url),
        Device::new(dir.path(), "w", &url),
    );
    tokio::task::spawn_blocking(move || {
        for part in 0..4u64 {
            let (from, to) = (part * 25_000 + 1, (part + 1) * 25_000);
            // 25,000 rows a write: on a busy two-core machine its ack can
            // take longer than the CLI's usual 10 s.
            let out = seed_.run_within(
                &seed_.url,
                60,
                &["exec", &format!(
                    "WITH RECURSIVE n(i) AS (SELECT {from} UNION ALL SELECT i + 1 FROM n WHERE i < {to}) \
                     INSERT INTO todos (id, list_id, title, done, note) \
                     SELECT printf('t%06d', i), 'a', 'title ' || i, i % 2, \
                            CASE WHEN i % 3 = 0 THEN NULL ELSE 'note ' || i END FROM n"
                )],
            );
            assert!(out.status.success(), "seed part {part}: {out:?}");
            assert_eq!(json_line(&out)["status"], "applied", "seed part {part}: {out:?}");
        }
        exec_ok(
            &seed_,
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 100) \
             INSERT INTO todos (id, list_id, title) SELECT printf('u%06d', i), 'b', 'b ' || i FROM n",
        );
        w_.sync();
        subscribe_ok(&w_, "list_todos", &list("b"));
    })
    .await
    .unwrap();
    assert_eq!(server_list(&server, "a").len(), 100_000);

    let mut b =
        native_client::open_device(&dir.path().join("b.db"), ClientConfig::default()).unwrap();
    native_client::sync_once(&mut b, &url, Goal::Synced, common::TIMEOUT)
        .await
        .expect("first sync brings the schema");
    let params = BTreeMap::from([("list".to_string(), Param::One(Value::Text("a".into())))]);
    let (id, _) = b.subscribe("list_todos", params).unwrap();

    let batch = |k: u64| {
        let w = Device::new(dir.path(), "w", &url);
        tokio::task::spawn_blocking(move || writer_batch(&w, k))
    };

    // First connection: writes land while the load is under way; cut after
    // 25 chunks.
    let mut ws = native_client::connect(&url, common::TIMEOUT).await.unwrap();
    native_client::send(&mut ws, b.on_connected())
        .await
        .unwrap();
    let first = drive(&mut b, &mut ws, |e, loaded| {
        matches!(e, Event::Loaded { .. }) && loaded.len() == 10
    })
    .await;
    batch(1).await.unwrap();
    let more = drive(&mut b, &mut ws, |e, loaded| {
        matches!(e, Event::Loaded { .. }) && loaded.len() == 15
    })
    .await;
    drop(ws); // no close: the connection just goes
    b.on_disconnected();
    let cut1 = *more.last().unwrap();
    assert!(first.iter().chain(&more).all(|r| *r < 100_000), "{more:?}");
    let sub = &b.subscriptions().unwrap()[0];
    assert_eq!((sub.id, sub.rows, sub.loaded), (id, cut1, false));

    // Offline: more writes.
    batch(2).await.unwrap();

    // Second connection: resumes where it was, writes meanwhile, cut again.
    let mut ws = native_client::connect(&url, common::TIMEOUT).await.unwrap();
    native_client::send(&mut ws, b.on_connected())
        .await
        .unwrap();
    let resumed = drive(&mut b, &mut ws, |e, loaded| {
        matches!(e, Event::Loaded { .. }) && loaded.len() == 10
    })
    .await;
    assert!(
        resumed[0] > cut1 && resumed[0] <= cut1 + 1_000,
        "the count goes on from {cut1}, by one chunk: {resumed:?}"
    );
    batch(3).await.unwrap();
    let more = drive(&mut b, &mut ws, |e, loaded| {
        matches!(e, Event::Loaded { .. }) && loaded.len() == 20
    })
    .await;
    drop(ws);
    b.on_disconnected();
    let cut2 = *more.last().unwrap();
    assert!(cut2 > cut1);
    assert_eq!(b.subscriptions().unwrap()[0].rows, cut2);

    // Third connection: to the end, with a writer running beside it.
    let writer = {
        let w = Device::new(dir.path(), "w", &url);
        tokio::task::spawn_blocking(move || {
            for k in 4..7 {
                writer_batch(&w, k);
            }
        })
    };
    let events = native_client::sync_once(&mut b, &url, Goal::Synced, Duration::from_secs(120))
        .await
        .expect("the load completes");
    let resumed: Vec<u64> = events
        .iter()
        .filter_map(|e| match e {
            Event::Loaded { rows, .. } => Some(*rows),
            _ => None,
        })
        .collect();
    assert!(
        resumed[0] > cut2 && resumed[0] <= cut2 + 1_000,
        "{resumed:?}"
    );
    writer.await.unwrap();
    native_client::sync_once(&mut b, &url, Goal::Synced, common::TIMEOUT)
        .await
        .expect("catches up");
    let sub = &b.subscriptions().unwrap()[0];
    assert!(sub.loaded);
    // Restarting would have counted the first 25 chunks again.
    assert!(
        sub.rows < 100_000 + 7 * 20 + 7 * 10 + 1_000,
        "loaded {} rows in all: the load started over",
        sub.rows
    );

    let on_b = Device::new(dir.path(), "b", &url);
    drop(b);
    let expected = server_list(&server, "a");
    let got = device_todos(&on_b);
    assert_eq!(got.len(), expected.len());
    assert!(got == expected, "B differs from the server's list 'a'");
}

/// (3) Unsubscribing offline evicts the list's rows but keeps one with a
/// pending write, which leaves once the write has synced.
#[test]
fn eviction_keeps_rows_with_pending_writes() {
    let dir = tempfile::tempdir().unwrap();
    let server = Served::start(dir.path(), SCHEMA);
    let a = Device::new(dir.path(), "a", &server.url);
    let b = Device::new(dir.path(), "b", &server.url);
    a.sync();
    subscribe_ok(&a, "list_todos", &list("a"));
    subscribe_ok(&a, "list_todos", &list("b"));
    exec_ok(
        &a,
        "INSERT INTO todos (id, list_id, title) VALUES \
         ('t1', 'a', 'one'), ('t2', 'a', 'two'), ('t3', 'a', 'three'), ('t9', 'b', 'nine')",
    );
    subscribe_ok(&b, "list_todos", &list("a"));
    assert_eq!(ids(&device_todos(&b)), ["t1", "t2", "t3"]);

    // Offline: edit t2, then unsubscribe (which needs no server).
    b.exec_offline("UPDATE todos SET title = 'two, edited offline' WHERE id = 't2'");
    let out = b.unsubscribe("list_todos", &list("a"));
    assert!(out.status.success(), "unsubscribe works offline: {out:?}");
    assert_eq!(json_line(&out)["unsubscribed"], true, "{out:?}");
    assert!(b.subscriptions().is_empty());
    assert_eq!(
        device_todos(&b),
        [
            json!({"id": "t2", "list_id": "a", "title": "two, edited offline", "done": 0, "note": null})
        ],
        "only the row with a pending write stays"
    );

    // The write syncs; then the row leaves too. Nothing was deleted.
    let status = b.sync();
    assert_eq!(status["pending"], 0, "{status}");
    assert!(device_todos(&b).is_empty(), "{:?}", device_todos(&b));
    assert_eq!(
        server.query("SELECT id, title FROM todos ORDER BY id"),
        [
            json!({"id": "t1", "title": "one"}),
            json!({"id": "t2", "title": "two, edited offline"}),
            json!({"id": "t3", "title": "three"}),
            json!({"id": "t9", "title": "nine"}),
        ]
    );
    a.sync();
    assert_eq!(device_todos(&a).len(), 4);
    // A later sync brings nothing of list "a" back.
    exec_ok(&a, "INSERT INTO todos (id, list_id) VALUES ('t4', 'a')");
    b.sync();
    assert!(device_todos(&b).is_empty());
}

/// (4a) The CLI refuses bad subscriptions before anything is stored, naming
/// the stream or the parameter.
#[test]
fn cli_refuses_bad_subscriptions_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let server = Served::start(dir.path(), SCHEMA);
    let b = Device::new(dir.path(), "b", &server.url);
    b.sync();
    let cases: [(&str, &str, &[&str]); 7] = [
        ("no_such_stream", "{}", &["no_such_stream", "list_todos"]),
        ("list_todos", "{}", &[":list", "missing"]),
        (
            "list_todos",
            r#"{"list":"a","owner":"me"}"#,
            &[":owner", "unknown"],
        ),
        ("list_todos", r#"{"list":5}"#, &[":list", "TEXT"]),
        ("list_todos", r#"{"list":["a"]}"#, &[":list", "one value"]),
        ("todo_by_id", r#"{"ids":"t1"}"#, &[":ids", "list"]),
        ("list_todos", "not json", &["PARAMS_JSON"]),
    ];
    for (stream, params, words) in cases {
        let out = b.subscribe(stream, params);
        assert!(!out.status.success(), "{stream} {params}: {out:?}");
        let err = stderr(&out);
        for word in words {
            assert!(
                err.contains(word),
                "{stream} {params}: {word:?} not in {err:?}"
            );
        }
        if stream != "no_such_stream" && params != "not json" {
            assert!(err.contains(stream), "{stream} {params}: {err:?}");
        }
        let out = b.unsubscribe(stream, params);
        assert!(
            !out.status.success(),
            "unsubscribe {stream} {params}: {out:?}"
        );
    }
    assert!(b.subscriptions().is_empty());
}

fn frame(msg: &ClientMsg) -> Message {
    Message::Binary(encode_client(msg).into())
}

/// The next server message on a raw socket.
async fn next_msg(ws: &mut native_client::Ws) -> ServerMsg {
    loop {
        let msg = tokio::time::timeout(common::TIMEOUT, ws.next())
            .await
            .expect("the server answers in time")
            .expect("the connection stays open")
            .expect("a frame");
        if let Message::Binary(b) = msg {
            return decode_server(&b, FRAME_BYTES_MAX).unwrap();
        }
    }
}

fn sub(id: u64, stream: &str, params: &[(&str, Param)]) -> Subscription {
    Subscription {
        id,
        stream: stream.to_string(),
        params: params
            .iter()
            .map(|(n, p)| (n.to_string(), p.clone()))
            .collect(),
        load: Load::After(None),
    }
}

/// (4b) Over a raw WebSocket: a bad subscription is refused with
/// `BAD_SUBSCRIPTION` and the connection goes on (a push after it is
/// acked); the 257th subscription is refused with `TOO_MANY_SUBSCRIPTIONS`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_refuses_bad_subscriptions_and_keeps_the_connection() {
    let dir = tempfile::tempdir().unwrap();
    let server = Served::start(dir.path(), SCHEMA);
    let url = server.url.clone();
    let mut d =
        native_client::open_device(&dir.path().join("d.db"), ClientConfig::default()).unwrap();
    native_client::sync_once(&mut d, &url, Goal::Synced, common::TIMEOUT)
        .await
        .unwrap();

    // The device's own session, with raw subscriptions slipped in.
    let mut ws = native_client::connect(&url, common::TIMEOUT).await.unwrap();
    native_client::send(&mut ws, d.on_connected())
        .await
        .unwrap();
    let bad = [
        sub(11, "no_such_stream", &[]),
        sub(12, "list_todos", &[]),
        sub(13, "list_todos", &[("list", Param::One(Value::Integer(5)))]),
        sub(
            14,
            "list_todos",
            &[
                ("list", Param::One(Value::Text("a".into()))),
                ("owner", Param::One(Value::Text("me".into()))),
            ],
        ),
    ];
    for s in &bad {
        ws.send(frame(&ClientMsg::Subscribe(s.clone())))
            .await
            .unwrap();
    }
    let mut refused = BTreeMap::new();
    while refused.len() < bad.len() {
        match next_msg(&mut ws).await {
            ServerMsg::SubscriptionRefused { id, code, reason } => {
                refused.insert(id, (code, reason));
            }
            other => {
                let out = d.handle(other, native_client::now_ms()).unwrap();
                native_client::send(&mut ws, out.send).await.unwrap();
            }
        }
    }
    for (id, words) in [
        (11, ["no_such_stream", "no_such_stream"]),
        (12, ["list_todos", ":list"]),
        (13, ["list_todos", ":list"]),
        (14, ["list_todos", ":owner"]),
    ] {
        let (code, reason) = &refused[&id];
        assert_eq!(code, "BAD_SUBSCRIPTION", "{id}: {reason}");
        for w in words {
            assert!(reason.contains(w), "{id}: {w:?} not in {reason:?}");
        }
    }
    // The same connection still takes a push, and acks it.
    let (_, out) = d
        .exec(
            "INSERT INTO tags (id, name) VALUES ('g1', 'after the refusals')",
            &[],
            native_client::now_ms(),
        )
        .unwrap();
    let seq = d.pending_seqs().unwrap()[0];
    native_client::send(&mut ws, out.send).await.unwrap();
    let mut acked = false;
    while !acked {
        let msg = next_msg(&mut ws).await;
        let out = d.handle(msg, native_client::now_ms()).unwrap();
        acked = out
            .events
            .iter()
            .any(|e| matches!(e, Event::Applied { seq: s, .. } if *s == seq));
        native_client::send(&mut ws, out.send).await.unwrap();
    }
    assert_eq!(
        server.query("SELECT name FROM tags"),
        [json!({"name": "after the refusals"})]
    );
    drop(ws);

    // 257 subscriptions on one connection: the 257th is refused.
    let (mut raw, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    raw.send(frame(&ClientMsg::Hello {
        client_id: 4242,
        cursor: 0,
        schema_version: None,
        subscriptions: Vec::new(),
        token: None,
        reloaded: Default::default(),
        first_pending: 0,
    }))
    .await
    .unwrap();
    for i in 0..257u64 {
        let s = sub(
            1_000 + i,
            "list_todos",
            &[("list", Param::One(Value::Text(format!("list {i}"))))],
        );
        raw.send(frame(&ClientMsg::Subscribe(s))).await.unwrap();
    }
    let mut loads_done = 0;
    let refusal = loop {
        match next_msg(&mut raw).await {
            ServerMsg::SubscriptionRefused { id, code, reason } => break (id, code, reason),
            ServerMsg::Rows { done: true, .. } => loads_done += 1,
            _ => {}
        }
    };
    assert_eq!(refusal.0, 1_256, "{refusal:?}");
    assert_eq!(refusal.1, "TOO_MANY_SUBSCRIPTIONS", "{refusal:?}");
    assert!(refusal.2.contains("256"), "{refusal:?}");
    // The 256 others load (each list is empty: one chunk each).
    while loads_done < 256 {
        match next_msg(&mut raw).await {
            ServerMsg::Rows { done: true, .. } => loads_done += 1,
            ServerMsg::SubscriptionRefused { id, .. } => panic!("{id} refused too"),
            _ => {}
        }
    }
}

/// (5) A table no stream names syncs whole to every device, beside a
/// streamed table in the same schema.
#[test]
fn unstreamed_table_syncs_whole_beside_a_streamed_one() {
    let dir = tempfile::tempdir().unwrap();
    let server = Served::start(dir.path(), SCHEMA);
    let a = Device::new(dir.path(), "a", &server.url);
    let b = Device::new(dir.path(), "b", &server.url);
    let c = Device::new(dir.path(), "c", &server.url);
    a.sync();
    subscribe_ok(&a, "list_todos", &list("a"));
    subscribe_ok(&b, "list_todos", &list("b"));
    c.sync(); // no subscriptions at all
    exec_ok(
        &a,
        "INSERT INTO tags (id, name) VALUES ('g1', 'home'), ('g2', 'work')",
    );
    exec_ok(
        &a,
        "INSERT INTO todos (id, list_id) VALUES ('t1', 'a'), ('t2', 'b')",
    );
    exec_ok(&b, "UPDATE tags SET name = 'office' WHERE id = 'g2'");
    exec_ok(&c, "INSERT INTO tags (id, name) VALUES ('g3', 'garden')");
    for d in [&a, &b, &c] {
        d.sync();
    }
    let tags = server.query("SELECT id, name FROM tags ORDER BY id");
    assert_eq!(tags.len(), 3);
    for d in [&a, &b, &c] {
        assert_eq!(
            d.query("SELECT id, name FROM tags ORDER BY id"),
            tags,
            "{}",
            d.db
        );
    }
    assert_eq!(ids(&device_todos(&a)), ["t1"]);
    assert_eq!(ids(&device_todos(&b)), ["t2"]);
    assert!(device_todos(&c).is_empty());
}

/// (6) A subscription persists: later plain `sync`s keep the device's lists
/// current, and bring nothing of other lists.
#[test]
fn subscriptions_persist_across_syncs() {
    let dir = tempfile::tempdir().unwrap();
    let server = Served::start(dir.path(), SCHEMA);
    let a = Device::new(dir.path(), "a", &server.url);
    let b = Device::new(dir.path(), "b", &server.url);
    a.sync();
    subscribe_ok(&a, "list_todos", &list("a"));
    subscribe_ok(&a, "list_todos", &list("b"));
    exec_ok(
        &a,
        "INSERT INTO todos (id, list_id, title) VALUES ('t1', 'a', 'one'), ('t2', 'b', 'two')",
    );
    subscribe_ok(&b, "list_todos", &list("a"));
    let subs = b.subscriptions();
    assert_eq!(subs.len(), 1, "{subs:?}");
    assert_eq!(subs[0]["stream"], "list_todos");
    assert_eq!(subs[0]["params"], json!({"list": "a"}));
    assert_eq!(subs[0]["loaded"], true);

    for round in 0..3 {
        exec_ok(
            &a,
            &format!(
                "INSERT INTO todos (id, list_id, title) VALUES ('a{round}', 'a', 'new'), ('b{round}', 'b', 'new')"
            ),
        );
        exec_ok(
            &a,
            &format!("UPDATE todos SET title = 'round {round}' WHERE id = 't1'"),
        );
        b.sync();
        assert_eq!(device_todos(&b), server_list(&server, "a"), "round {round}");
    }
    assert_eq!(ids(&device_todos(&b)), ["a0", "a1", "a2", "t1"]);
    assert_eq!(
        b.query("SELECT title FROM todos WHERE id = 't1'"),
        [json!({"title": "round 2"})]
    );
    assert_eq!(b.subscriptions(), subs);
}

/// (2b) The smallest case of what breaks the interrupted load above: a device
/// that has caught up on a live connection, then a write it gets nothing of
/// (a row of another list), then a subscription on the same connection. The
/// load's chunk is read at the log head, past the cursor the device was
/// last told, and must still be taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribing_on_a_live_connection_after_a_filtered_write() {
    let dir = tempfile::tempdir().unwrap();
    let server = Served::start(dir.path(), SCHEMA);
    let url = server.url.clone();
    let a = Device::new(dir.path(), "a", &url);
    let a = tokio::task::spawn_blocking(move || {
        exec_ok(&a, "INSERT INTO todos (id, list_id) VALUES ('t1', 'a')");
        a
    })
    .await
    .unwrap();
    let mut b =
        native_client::open_device(&dir.path().join("b.db"), ClientConfig::default()).unwrap();
    native_client::sync_once(&mut b, &url, Goal::Synced, common::TIMEOUT)
        .await
        .unwrap();

    let mut ws = native_client::connect(&url, common::TIMEOUT).await.unwrap();
    native_client::send(&mut ws, b.on_connected())
        .await
        .unwrap();
    drive(&mut b, &mut ws, |e, _| matches!(e, Event::CaughtUp { .. })).await;
    // A row of list "b": nothing of it is for B.
    tokio::task::spawn_blocking(move || {
        exec_ok(&a, "INSERT INTO todos (id, list_id) VALUES ('t2', 'b')")
    })
    .await
    .unwrap();
    let params = BTreeMap::from([("list".to_string(), Param::One(Value::Text("a".into())))]);
    let (_, out) = b.subscribe("list_todos", params).unwrap();
    native_client::send(&mut ws, out.send).await.unwrap();
    let mut result = Ok(());
    let deadline = tokio::time::Instant::now() + common::TIMEOUT;
    'session: loop {
        let step = tokio::time::timeout_at(deadline, native_client::step(&mut b, &mut ws))
            .await
            .expect("the load comes in time");
        match step {
            Err(e) => {
                result = Err(e);
                break;
            }
            Ok(None) => panic!("the server closed the connection"),
            Ok(Some(events)) => {
                for e in events {
                    if matches!(e, Event::Loaded { done: true, .. }) {
                        break 'session;
                    }
                }
            }
        }
    }
    result.expect("the chunk is taken");
    let on_b = Device::new(dir.path(), "b", &url);
    drop(b);
    assert_eq!(ids(&device_todos(&on_b)), ["t1"]);
    assert_eq!(device_todos(&on_b), server_list(&server, "a"));
}

/// (3b) A device's own writes and the rows it holds: a row the server moves
/// out while the device has a pending write on it leaves once the write is
/// in; a row the device moves out (or writes into a list it doesn't follow)
/// leaves once acknowledged; a row two subscriptions hold stays when one of
/// them ends.
#[test]
fn own_writes_and_overlapping_subscriptions() {
    let dir = tempfile::tempdir().unwrap();
    let server = Served::start(dir.path(), SCHEMA);
    let a = Device::new(dir.path(), "a", &server.url);
    let b = Device::new(dir.path(), "b", &server.url);
    a.sync();
    subscribe_ok(&a, "list_todos", &list("a"));
    subscribe_ok(&a, "list_todos", &list("b"));
    exec_ok(
        &a,
        "INSERT INTO todos (id, list_id, title) VALUES \
         ('t1', 'a', 'one'), ('t2', 'a', 'two'), ('t3', 'a', 'three'), ('t4', 'a', 'four')",
    );
    subscribe_ok(&b, "list_todos", &list("a"));
    subscribe_ok(&b, "todo_by_id", &json!({"ids": ["t4"]}).to_string());

    // The server moves t1 out while B's edit of it waits offline.
    b.exec_offline("UPDATE todos SET title = 'one, by B' WHERE id = 't1'");
    exec_ok(&a, "UPDATE todos SET list_id = 'b' WHERE id = 't1'");
    let status = b.sync();
    assert_eq!(status["pending"], 0, "{status}");
    assert_eq!(ids(&device_todos(&b)), ["t2", "t3", "t4"]);
    assert_eq!(
        server.query("SELECT list_id, title FROM todos WHERE id = 't1'"),
        [json!({"list_id": "b", "title": "one, by B"})],
        "B's edit is in, and the move too"
    );

    // B moves t2 out of its list itself, and writes a row into a list it
    // doesn't follow: both leave once acknowledged, and stay on the server.
    exec_ok(&b, "UPDATE todos SET list_id = 'b' WHERE id = 't2'");
    exec_ok(&b, "INSERT INTO todos (id, list_id) VALUES ('t5', 'c')");
    b.sync();
    assert_eq!(ids(&device_todos(&b)), ["t3", "t4"]);
    assert_eq!(
        ids(&server.query("SELECT id FROM todos ORDER BY id")),
        ["t1", "t2", "t3", "t4", "t5"]
    );

    // t4 is held twice: ending the list subscription keeps it.
    let out = b.unsubscribe("list_todos", &list("a"));
    assert!(out.status.success(), "{out:?}");
    assert_eq!(ids(&device_todos(&b)), ["t4"]);
    b.sync();
    assert_eq!(
        device_todos(&b),
        server.query(&format!("{ALL_COLUMNS} WHERE id = 't4'"))
    );
    // And it stays current through the other one.
    exec_ok(&a, "UPDATE todos SET title = 'four, again' WHERE id = 't4'");
    b.sync();
    assert_eq!(
        b.query("SELECT title FROM todos"),
        [json!({"title": "four, again"})]
    );
}

/// The log position up to which the server's log was compacted.
fn log_floor(server: &Served) -> i64 {
    server
        .query("SELECT value FROM _hearth_meta WHERE key = 'log_floor'")
        .first()
        .and_then(|r| r["value"].as_i64())
        .unwrap_or(0)
}

fn head(server: &Served) -> i64 {
    server.query("SELECT coalesce(max(seq), 0) AS head FROM _hearth_log")[0]["head"]
        .as_i64()
        .unwrap()
}

/// (6) Log compaction (`--log-retention`): a device offline while the log it
/// had not seen was compacted away re-loads its subscriptions and the whole
/// tables from the store, keeping its pending writes (applied once), with
/// nothing lost and nothing deleted brought back; a fresh device after the
/// compaction gets the same.
#[test]
fn a_device_older_than_the_retained_log_reloads_and_keeps_its_pending_writes() {
    let dir = tempfile::tempdir().unwrap();
    let server = Served::start_with(dir.path(), SCHEMA, &["--log-retention", "1s"]);
    let a = Device::new(dir.path(), "a", &server.url);
    let b = Device::new(dir.path(), "b", &server.url);
    // E only reads: no pending write keeps its sync open after the catch-up.
    let e = Device::new(dir.path(), "e", &server.url);
    a.sync();
    subscribe_ok(&a, "list_todos", &list("a"));
    b.sync();
    subscribe_ok(&b, "list_todos", &list("a"));
    subscribe_ok(&b, "list_todos", &list("b"));
    exec_ok(
        &b,
        "INSERT INTO todos (id, list_id, title, note) VALUES \
         ('t1', 'a', 'milk', 'semi'), ('t2', 'a', 'eggs', NULL), ('t3', 'a', 'bread', NULL)",
    );
    exec_ok(
        &b,
        "INSERT INTO tags (id, name) VALUES ('g1', 'red'), ('g2', 'blue')",
    );
    a.sync();
    e.sync();
    assert_eq!(ids(&device_todos(&a)), ["t1", "t2", "t3"]);
    assert_eq!(e.query("SELECT id FROM tags ORDER BY id").len(), 2);

    // A goes offline and writes; meanwhile B deletes, moves, edits, adds.
    a.exec_offline("UPDATE todos SET title = 'oat milk' WHERE id = 't1'");
    a.exec_offline("INSERT INTO todos (id, list_id, title) VALUES ('t9', 'a', 'made offline')");
    exec_ok(&b, "DELETE FROM todos WHERE id = 't2'");
    exec_ok(&b, "UPDATE todos SET list_id = 'b' WHERE id = 't3'");
    exec_ok(&b, "UPDATE todos SET note = 'whole' WHERE id = 't1'");
    exec_ok(
        &b,
        "INSERT INTO todos (id, list_id, title) VALUES ('t4', 'a', 'jam')",
    );
    exec_ok(&b, "DELETE FROM tags WHERE id = 'g2'");
    exec_ok(&b, "INSERT INTO tags (id, name) VALUES ('g3', 'green')");
    let written = head(&server);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while log_floor(&server) < written {
        assert!(
            std::time::Instant::now() < deadline,
            "the log was not compacted past {written} within 30 s (floor {})",
            log_floor(&server)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        server.query("SELECT count(*) AS n FROM _hearth_log WHERE seq <= 2")[0]["n"],
        0,
        "entries older than the retention are gone"
    );

    let status = a.sync();
    assert_eq!(status["pending"], 0, "{status}");
    assert!(
        status["rejected"].as_array().unwrap().is_empty(),
        "{status}"
    );
    // Exactly the server's list "a", which holds A's offline writes once.
    assert_eq!(device_todos(&a), server_list(&server, "a"));
    assert_eq!(ids(&device_todos(&a)), ["t1", "t4", "t9"]);
    assert_eq!(
        device_todos(&a)[0],
        json!({"id": "t1", "list_id": "a", "title": "oat milk", "done": 0, "note": "whole"})
    );
    assert_eq!(
        server.query("SELECT count(*) AS n FROM todos WHERE id = 't9'")[0]["n"],
        1
    );
    // The whole table too: g2's delete is not undone.
    assert_eq!(
        a.query("SELECT id, name FROM tags ORDER BY id"),
        server.query("SELECT id, name FROM tags ORDER BY id")
    );
    assert_eq!(
        a.query("SELECT id FROM tags ORDER BY id"),
        [json!({"id": "g1"}), json!({"id": "g3"})]
    );
    // A device with nothing pending re-loads in one sync as well, and one
    // that never synced gets the whole tables from the store.
    e.sync();
    assert_eq!(
        e.query("SELECT id, name FROM tags ORDER BY id"),
        server.query("SELECT id, name FROM tags ORDER BY id")
    );
    let fresh = Device::new(dir.path(), "fresh", &server.url);
    fresh.sync();
    assert_eq!(
        fresh.query("SELECT id, name FROM tags ORDER BY id"),
        server.query("SELECT id, name FROM tags ORDER BY id")
    );
    // A's subscriptions are as it made them (the re-load is the engine's own).
    let subs = a.subscriptions();
    assert_eq!(subs.len(), 1, "{subs:?}");
    assert_eq!(subs[0]["loaded"], true, "{subs:?}");

    // Later changes reach A live again, and a device that never synced
    // before the compaction gets the same rows.
    exec_ok(&b, "UPDATE todos SET done = 1 WHERE id = 't4'");
    a.sync();
    assert_eq!(device_todos(&a), server_list(&server, "a"));
    let c = Device::new(dir.path(), "c", &server.url);
    c.sync();
    subscribe_ok(&c, "list_todos", &list("a"));
    assert_eq!(device_todos(&c), server_list(&server, "a"));
    assert_eq!(
        c.query("SELECT id, name FROM tags ORDER BY id"),
        server.query("SELECT id, name FROM tags ORDER BY id")
    );
}

/// (7) A device holds at most 256 subscriptions: the 257th is refused on
/// the device itself (`TOO_MANY_SUBSCRIPTIONS`, CLI exit 3), and the ones it
/// holds, with their rows, are untouched.
#[test]
fn the_257th_subscription_is_refused_and_the_others_stay() {
    let dir = tempfile::tempdir().unwrap();
    let server = Served::start(dir.path(), SCHEMA);
    let a = Device::new(dir.path(), "a", &server.url);
    exec_ok(
        &a,
        "INSERT INTO todos (id, list_id, title) VALUES ('t1', 'l0', 'first'), ('t2', 'l255', 'last')",
    );
    {
        let mut device = common::device(dir.path(), "a");
        for i in 0..256 {
            device
                .subscribe(
                    "list_todos",
                    [("list".to_string(), Param::One(Value::Text(format!("l{i}"))))].into(),
                )
                .unwrap();
        }
        let err = device
            .subscribe(
                "list_todos",
                [("list".to_string(), Param::One(Value::Text("l256".into())))].into(),
            )
            .unwrap_err();
        assert_eq!(err.code(), "TOO_MANY_SUBSCRIPTIONS", "{err}");
    }
    a.sync();
    let out = a.subscribe("list_todos", &list("one-more"));
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(stderr(&out).contains("TOO_MANY_SUBSCRIPTIONS"), "{out:?}");
    assert_eq!(json_line(&out)["status"], "refused", "{out:?}");
    let subs = a.subscriptions();
    assert_eq!(subs.len(), 256);
    assert!(subs.iter().all(|s| s["loaded"] == true), "{subs:?}");
    assert_eq!(ids(&device_todos(&a)), ["t1", "t2"]);
    // Re-subscribing to one it holds is no new subscription.
    subscribe_ok(&a, "list_todos", &list("l7"));
}

/// (8) A schema change that removes a stream: a device subscribed to it
/// drops the subscription (the server refuses it, `BAD_SUBSCRIPTION`) and
/// the rows only that stream held leave it, locally.
#[test]
fn a_stream_removed_from_the_schema_takes_its_rows_off_devices() {
    let dir = tempfile::tempdir().unwrap();
    let server = Served::start(dir.path(), SCHEMA);
    let a = Device::new(dir.path(), "a", &server.url);
    let w = Device::new(dir.path(), "w", &server.url);
    exec_ok(
        &w,
        "INSERT INTO todos (id, list_id, title) VALUES ('t1', 'a', 'in a'), ('t2', 'b', 'only by id')",
    );
    a.sync();
    subscribe_ok(&a, "list_todos", &list("a"));
    subscribe_ok(&a, "todo_by_id", r#"{"ids": ["t2"]}"#);
    assert_eq!(ids(&device_todos(&a)), ["t1", "t2"]);
    drop(server);

    let v2 = SCHEMA.replacen("version = 1", "version = 2", 1).replace(
        "[streams.todo_by_id]\ntable = \"todos\"\nwhere = \"id IN :ids\"\n",
        "",
    );
    assert!(!v2.contains("todo_by_id"), "{v2}");
    let server = Served::start(dir.path(), &v2);
    let a = Device::new(dir.path(), "a", &server.url);
    a.sync();
    let subs = a.subscriptions();
    assert_eq!(subs.len(), 1, "{subs:?}");
    assert_eq!(subs[0]["stream"], "list_todos");
    assert_eq!(ids(&device_todos(&a)), ["t1"]);
    assert_eq!(server.query("SELECT count(*) AS n FROM todos")[0]["n"], 2);
}
