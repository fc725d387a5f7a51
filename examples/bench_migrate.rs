//! Schema-change benchmark: how long a migration holds the server's start
//! and a device's database, for a table of 100,000 rows.
//!
//! Run: `cargo run --release --example bench_migrate`
//! Prints each figure beside its target and writes target/bench/migrate.json.
//!
//! - server: `ServerCore::open` on a store of 100,000 rows (each written
//!   through a merge, so each has its row record) with a schema that adds a
//!   column (the table is rebuilt, its row records re-indexed, the log
//!   compacted), then with one that drops a column. `serve` does not answer
//!   while it migrates. Target: at most 10 s per 100,000 rows.
//! - device: a device holding the same 100,000 rows and 1,000 pending writes
//!   migrates when a `Welcome` brings the new schema (its rows rebuilt, the
//!   pending writes' pre-images re-shaped). Every tab waits meanwhile.
//!   Target: at most 3 s per 100,000 rows.

use std::time::Instant;

use hearth::native_client;
use hearth_engine::protocol::{ClientMsg, FRAME_BYTES_MAX};
use hearth_engine::server::Hello;
use hearth_engine::{Client, ClientConfig, Schema, ServerCore, Value};
use rusqlite::Connection;

const ROWS: usize = 100_000;
const PENDING: usize = 1_000;
const SERVER_TARGET_S: f64 = 10.0;
const DEVICE_TARGET_S: f64 = 3.0;

fn schema(version: u64, columns: &str) -> Schema {
    Schema::parse(&format!(
        "version = {version}\n[tables.items]\ncreate = \"\"\"CREATE TABLE items (id TEXT PRIMARY KEY, name TEXT NOT NULL, qty INTEGER NOT NULL DEFAULT 0{columns});\nCREATE INDEX items_by_name ON items (name)\"\"\"\n"
    ))
    .unwrap()
}

fn open_store(path: &std::path::Path, schema: Schema) -> ServerCore {
    let conn = Connection::open(path).unwrap();
    conn.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;")
        .unwrap();
    ServerCore::open(conn, schema).unwrap()
}

fn device(path: &std::path::Path, server: &ServerCore) -> Client {
    let mut c = native_client::open_device(
        path,
        ClientConfig {
            outbox_max: 1_000_000,
            in_flight_max: 1_000_000,
            ..Default::default()
        },
    )
    .unwrap();
    let hello = Hello::of(&c.on_connected()[0]).unwrap();
    c.handle(server.greet(&hello, FRAME_BYTES_MAX).unwrap(), 0)
        .unwrap();
    c.on_disconnected();
    c
}

/// Everything the device pushes on its next connection to `server`.
fn pushed(c: &mut Client, server: &ServerCore) -> Vec<hearth_engine::Mutation> {
    let hello = Hello::of(&c.on_connected()[0]).unwrap();
    let out = c
        .handle(server.greet(&hello, FRAME_BYTES_MAX).unwrap(), 1)
        .unwrap();
    c.on_disconnected();
    out.send
        .into_iter()
        .flat_map(|m| match m {
            ClientMsg::Push { mutations } => mutations,
            _ => Vec::new(),
        })
        .collect()
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store.db");
    let v1 = schema(1, "");
    let v2 = schema(2, ", note TEXT DEFAULT 'none'");
    let v3 = schema(3, "");
    let mut server = open_store(&store, v1.clone());
    // The rows, written on a device in batches of 5,000 and merged by the
    // server (so each has its row record and its log entry).
    let mut writer = device(&dir.path().join("writer.db"), &server);
    for start in (0..ROWS).step_by(5_000) {
        writer
            .exec(
                "WITH RECURSIVE n(i) AS (SELECT ?1 UNION ALL SELECT i + 1 FROM n WHERE i + 1 < ?2)
                 INSERT INTO items (id, name, qty) SELECT 'item-' || i, 'name ' || (i % 977), i FROM n",
                &[Value::Integer(start as i64), Value::Integer((start + 5_000) as i64)],
                1,
            )
            .unwrap();
    }
    let mutations = pushed(&mut writer, &server);
    let batch: Vec<_> = mutations
        .into_iter()
        .map(|m| (writer.client_id(), m))
        .collect();
    server.apply_batch(&batch).unwrap();
    // A second device holds every row (a fresh one, as a whole-table load
    // would leave it) and 1,000 pending updates, then meets the server at
    // version 2.
    let mut follower = device(&dir.path().join("follower.db"), &server);
    {
        let hello = Hello::of(&follower.on_connected()[0]).unwrap();
        let mut inbox = vec![server.greet(&hello, FRAME_BYTES_MAX).unwrap()];
        inbox.extend(
            ServerCore::read_log(server.connection(), 0, ROWS)
                .unwrap()
                .into_iter()
                .map(|entry| hearth_engine::ServerMsg::Changes {
                    cursor: entry.server_seq,
                    hlc: entry.hlc,
                    caught_up: false,
                    entries: vec![entry],
                }),
        );
        for msg in inbox {
            follower.handle(msg, 2).unwrap();
        }
        follower.on_disconnected();
    }
    let held: i64 = follower
        .query("SELECT count(*) FROM items", &[])
        .map(|r| match r.rows[0][0] {
            Value::Integer(n) => n,
            _ => 0,
        })
        .unwrap();
    assert_eq!(held as usize, ROWS, "the follower holds every row");
    for i in 0..PENDING {
        follower
            .exec(
                "UPDATE items SET qty = qty + 1 WHERE id = ?1",
                &[Value::Text(format!("item-{}", i * 97))],
                3,
            )
            .unwrap();
    }
    drop(server);

    let start = Instant::now();
    let server = open_store(&store, v2.clone());
    let add_s = start.elapsed().as_secs_f64();
    let steps: Vec<String> = server
        .migration()
        .steps
        .iter()
        .map(|s| s.to_string())
        .collect();
    println!(
        "server: add a column to {ROWS} rows ({}): {add_s:.2} s (target <= {SERVER_TARGET_S} s)",
        steps.join("; ")
    );

    let hello = Hello::of(&follower.on_connected()[0]).unwrap();
    let welcome = server.greet(&hello, FRAME_BYTES_MAX).unwrap();
    let start = Instant::now();
    follower.handle(welcome, 4).unwrap();
    let device_s = start.elapsed().as_secs_f64();
    follower.on_disconnected();
    let pending = follower.status().pending;
    println!(
        "device: migrate {ROWS} rows with {pending} pending writes to version 2: {device_s:.2} s (target <= {DEVICE_TARGET_S} s)"
    );
    drop(server);

    let start = Instant::now();
    let server = open_store(&store, v3);
    let drop_s = start.elapsed().as_secs_f64();
    println!("server: drop a column of {ROWS} rows: {drop_s:.2} s (target <= {SERVER_TARGET_S} s)");
    drop(server);

    let json = serde_json::json!({
        "rows": ROWS,
        "server_add_column_s": add_s,
        "server_drop_column_s": drop_s,
        "device_migrate_s": device_s,
        "device_pending": pending,
        "targets": {"server_s": SERVER_TARGET_S, "device_s": DEVICE_TARGET_S},
    });
    let out = std::path::Path::new("target/bench");
    std::fs::create_dir_all(out).unwrap();
    std::fs::write(
        out.join("migrate.json"),
        serde_json::to_string_pretty(&json).unwrap(),
    )
    .unwrap();
    let met = add_s <= SERVER_TARGET_S && drop_s <= SERVER_TARGET_S && device_s <= DEVICE_TARGET_S;
    println!(
        "{}",
        if met {
            "all targets met"
        } else {
            "a target was missed"
        }
    );
}
