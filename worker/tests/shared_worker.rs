//! The store on IndexedDB, inside a real SharedWorker in headless Chromium.
//!
//! Run: `CHROMEDRIVER=/usr/bin/chromedriver cargo test -p hearth-worker --target
//! wasm32-unknown-unknown` (the runner comes from `.cargo/config.toml`).
//!
//! To see what a later browser session would load, these tests read IndexedDB directly
//! through a second IndexedDB connection, not through relaxed-idb, whose in-memory copy
//! would answer from memory whatever IndexedDB holds.
#![cfg(target_arch = "wasm32")]

use hearth_bridge::{ErrorCode, Value};
use hearth_worker::store::{Store, VFS_NAME};
use js_sys::{Array, Reflect, Uint8Array};
use rusqlite::{Connection, MAIN_DB};
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::JsFuture;
use wasm_bindgen_test::*;

wasm_bindgen_test_configure!(run_in_shared_worker);

#[wasm_bindgen(inline_js = r#"
export function idb_open(name) {
    return new Promise((resolve, reject) => {
        const request = indexedDB.open(name);
        request.onsuccess = () => resolve(request.result);
        request.onerror = () => reject(request.error);
    });
}

// Creates the read transaction synchronously, before the returned promise is awaited:
// IndexedDB orders transactions by creation, so this read sees exactly what was durable
// at the moment of the call.
export function idb_blocks(db, file) {
    const tx = db.transaction("blocks", "readonly");
    const request = tx.objectStore("blocks").getAll(IDBKeyRange.bound([file, 0], [file, Infinity]));
    return new Promise((resolve, reject) => {
        request.onsuccess = () => resolve(request.result);
        request.onerror = () => reject(request.error);
    });
}
"#)]
extern "C" {
    fn idb_open(name: &str) -> js_sys::Promise;
    fn idb_blocks(db: &JsValue, file: &str) -> js_sys::Promise;
}

/// Assembles the database file from its IndexedDB blocks (`{path, offset, data}`).
async fn durable_image(idb: &JsValue, file: &str) -> Vec<u8> {
    image_of(JsFuture::from(idb_blocks(idb, file)).await.unwrap()).await
}

async fn image_of(blocks: JsValue) -> Vec<u8> {
    let mut image = Vec::new();
    for block in Array::from(&blocks).iter() {
        let offset = Reflect::get(&block, &"offset".into())
            .unwrap()
            .as_f64()
            .unwrap() as usize;
        let data = Uint8Array::new(&Reflect::get(&block, &"data".into()).unwrap()).to_vec();
        if image.len() < offset + data.len() {
            image.resize(offset + data.len(), 0);
        }
        image[offset..offset + data.len()].copy_from_slice(&data);
    }
    image
}

/// Counts the rows of `table` in a database image, opened as a separate in-memory copy.
fn count_rows(image: &[u8], table: &str) -> i64 {
    if image.is_empty() {
        return -1;
    }
    let mut conn = Connection::open_in_memory().unwrap();
    conn.deserialize_read_exact(MAIN_DB, image, image.len(), true)
        .unwrap();
    conn.query_row(&format!("SELECT count(*) FROM {table}"), [], |row| {
        row.get(0)
    })
    .unwrap_or(-1)
}

async fn flush(store: &Store) {
    store.flush().unwrap().await.unwrap();
}

fn ints(rows: &hearth_bridge::Rows) -> Vec<i64> {
    rows.rows
        .iter()
        .map(|row| match row[0] {
            Value::Integer(i) => i,
            ref other => panic!("expected an integer, got {other:?}"),
        })
        .collect()
}

#[wasm_bindgen_test]
async fn rows_survive_close_and_reopen() {
    let file = "reopen.sqlite3";
    let mut store = Store::open(file).await.unwrap();
    store
        .exec(
            "CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, body TEXT)",
            &[],
        )
        .unwrap();
    for id in 1..=100 {
        store
            .exec(
                "INSERT INTO t (id, body) VALUES (?, ?)",
                &[Value::Integer(id), Value::Text(format!("row {id}"))],
            )
            .unwrap();
    }
    flush(&store).await;
    store.close().unwrap();

    let store = Store::open(file).await.unwrap();
    let rows = store.query("SELECT id FROM t ORDER BY id", &[]).unwrap();
    assert_eq!(ints(&rows), (1..=100).collect::<Vec<_>>());
    let rows = store
        .query("SELECT body FROM t WHERE id = ?", &[Value::Integer(42)])
        .unwrap();
    assert_eq!(rows.rows, vec![vec![Value::Text("row 42".into())]]);

    // What the next browser session will preload: the same 100 rows.
    let idb = JsFuture::from(idb_open(VFS_NAME)).await.unwrap();
    assert_eq!(count_rows(&durable_image(&idb, file).await, "t"), 100);
    store.close().unwrap();
}

#[wasm_bindgen_test]
async fn flush_barrier_resolves_only_once_writes_are_in_indexeddb() {
    let file = "barrier.sqlite3";
    let mut store = Store::open(file).await.unwrap();
    store
        .exec("CREATE TABLE t (id INTEGER PRIMARY KEY, body BLOB)", &[])
        .unwrap();
    flush(&store).await;
    let idb = JsFuture::from(idb_open(VFS_NAME)).await.unwrap();
    assert_eq!(count_rows(&durable_image(&idb, file).await, "t"), 0);

    // Many commits, several pages each, queued back to back with no await in between.
    for id in 1..=50 {
        store
            .exec(
                "INSERT INTO t (id, body) VALUES (?, zeroblob(3000))",
                &[Value::Integer(id)],
            )
            .unwrap();
    }
    // Control: at this instant the writes are committed in memory but not yet in
    // IndexedDB. Without this, the test below could pass without any barrier at all.
    let before = JsFuture::from(idb_blocks(&idb, file));
    let barrier = store.flush().unwrap();
    assert_eq!(count_rows(&image_of(before.await.unwrap()).await, "t"), 0);

    barrier.await.unwrap();
    // After the barrier, and before yielding to anything else, IndexedDB holds exactly
    // the committed image.
    let durable = durable_image(&idb, file).await;
    assert_eq!(count_rows(&durable, "t"), 50);
    assert_eq!(durable, store.image().unwrap());
    store.close().unwrap();
}

#[wasm_bindgen_test]
async fn bad_sql_is_a_clear_error_and_the_store_keeps_working() {
    let mut store = Store::open("errors.sqlite3").await.unwrap();
    store
        .exec("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY)", &[])
        .unwrap();

    let syntax = store.exec("INSERT INTO t VALUS (1)", &[]).unwrap_err();
    assert_eq!(syntax.code, ErrorCode::SqlError);
    assert!(syntax.message.contains("syntax error"), "{syntax}");

    let unknown = store.query("SELECT * FROM nope", &[]).unwrap_err();
    assert_eq!(unknown.code, ErrorCode::SqlError);
    assert!(unknown.message.contains("no such table"), "{unknown}");

    let count = store
        .exec(
            "INSERT INTO t (id) VALUES (?)",
            &[Value::Integer(1), Value::Integer(2)],
        )
        .unwrap_err();
    assert_eq!(count.code, ErrorCode::SqlError);

    let write_via_query = store.query("DELETE FROM t", &[]).unwrap_err();
    assert_eq!(write_via_query.code, ErrorCode::SqlError);

    let open_tx = store.exec("BEGIN", &[]).unwrap_err();
    assert!(open_tx.message.contains("transaction"), "{open_tx}");

    // A failing batch is all or nothing.
    store
        .exec(
            "INSERT INTO t (id) VALUES (10); INSERT INTO t (id) VALUES (10);",
            &[],
        )
        .unwrap_err();
    let rows = store.query("SELECT id FROM t WHERE id = 10", &[]).unwrap();
    assert!(rows.rows.is_empty());

    assert_eq!(
        store
            .exec(
                "INSERT INTO t (id) VALUES (20); INSERT INTO t (id) VALUES (21);",
                &[]
            )
            .unwrap(),
        2
    );
    flush(&store).await;
    store.close().unwrap();
}

/// The engine itself on the IndexedDB VFS: a device with the demo schema writes while
/// offline, closes, reopens from IndexedDB and finds both its rows and its outbox.
#[wasm_bindgen_test]
async fn engine_rows_and_outbox_survive_close_and_reopen() {
    use hearth_engine::protocol::FRAME_BYTES_MAX;
    use hearth_engine::{Client, ClientConfig, ServerMsg, Value as EngineValue, DEMO_SCHEMA};
    use hearth_worker::store::open_connection;

    const DEMO_VERSION: u64 = 2;
    assert_eq!(
        hearth_engine::Schema::parse(DEMO_SCHEMA).unwrap().version,
        DEMO_VERSION
    );
    let file = "engine-reopen.sqlite3";
    let (conn, durability) = open_connection(file).await.unwrap();
    let mut client = Client::open(conn, 7, ClientConfig::default()).unwrap();
    // The schema arrives as it would from a server's Welcome.
    client.on_connected();
    client
        .handle(
            ServerMsg::Welcome {
                floor: 0,
                server_seq: 0,
                schema_version: DEMO_VERSION,
                schema: Some(DEMO_SCHEMA.to_string()),
                frame_bytes_max: FRAME_BYTES_MAX as u64,
                last_seq: 0,
                hlc: hearth_engine::Hlc(0),
            },
            1,
        )
        .unwrap();
    client.on_disconnected();
    for n in 0..20 {
        let (outcome, _) = client
            .exec(
                "INSERT INTO lists (id, name) VALUES (?, ?)",
                &[
                    EngineValue::Text(format!("l{n}")),
                    EngineValue::Text(format!("list {n}")),
                ],
                1_000 + n,
            )
            .unwrap();
        assert_eq!(outcome.mutation, Some(n + 1));
    }
    assert_eq!(client.status().pending, 20);
    durability.flush().unwrap().await.unwrap();
    drop(client);

    let (conn, _durability) = open_connection(file).await.unwrap();
    let mut client = Client::open(conn, 99, ClientConfig::default()).unwrap();
    assert_eq!(client.client_id(), 7, "the client id is the stored one");
    let status = client.status();
    assert_eq!(status.pending, 20, "the outbox survived");
    assert_eq!(status.schema_version, Some(DEMO_VERSION));
    assert_eq!(
        client.pending_seqs().unwrap(),
        (1..=20).collect::<Vec<u64>>()
    );
    let rows = client
        .query("SELECT count(*) FROM lists WHERE name LIKE 'list %'", &[])
        .unwrap();
    assert_eq!(rows.rows, vec![vec![EngineValue::Integer(20)]]);
    // On reconnect the outbox goes out in order, as one push.
    client.on_connected();
    let out = client
        .handle(
            ServerMsg::Welcome {
                floor: 0,
                server_seq: 0,
                schema_version: DEMO_VERSION,
                schema: None,
                frame_bytes_max: FRAME_BYTES_MAX as u64,
                last_seq: 0,
                hlc: hearth_engine::Hlc(0),
            },
            2,
        )
        .unwrap();
    let pushed: Vec<u64> = out
        .send
        .iter()
        .flat_map(|m| match m {
            hearth_engine::ClientMsg::Push { mutations } => {
                mutations.iter().map(|m| m.seq).collect::<Vec<_>>()
            }
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(pushed, (1..=20).collect::<Vec<u64>>());
    // And the next write continues the sequence.
    let (outcome, _) = client
        .exec(
            "UPDATE lists SET name = 'renamed' WHERE id = 'l0'",
            &[],
            5_000,
        )
        .unwrap();
    assert_eq!(outcome.mutation, Some(21));
}
