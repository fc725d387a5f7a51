//! Foundation benchmarks: capture overhead, server ingest, bytes on the wire.
//!
//! Run: `cargo run --release --example bench_foundation`
//! Prints each figure beside its target and writes target/bench/foundation.json.

use std::time::{Duration, Instant};

use hearth::native_client::{self, Goal};
use hearth_engine::protocol::{
    encode_client, encode_server, ClientMsg, ServerMsg, FRAME_BYTES_MAX,
};
use hearth_engine::server::Hello;
use hearth_engine::{Client, ClientConfig, Schema, Value, DEMO_SCHEMA};
use rusqlite::Connection;

const CAPTURE_ROWS: usize = 100_000;
const INGEST_CLIENTS: usize = 10;
const INGEST_PER_CLIENT: usize = 3_000;

/// The schema these figures have been measured on since the foundation: the
/// demo's todo lists as they were before merge policies, every column
/// last-writer-wins, so figures stay comparable across versions. (The
/// capture figure is also measured on today's demo `todos`, whose counter,
/// set, text and manual columns cost more per inserted row.)
const FOUNDATION_SCHEMA: &str = r#"version = 1
[tables.lists]
create = """
CREATE TABLE lists (
  id         TEXT PRIMARY KEY,
  name       TEXT NOT NULL CHECK (length(name) BETWEEN 1 AND 100),
  created_at INTEGER NOT NULL DEFAULT 0
)"""

[tables.todos]
create = """
CREATE TABLE todos (
  id      TEXT PRIMARY KEY,
  list_id TEXT NOT NULL,
  title   TEXT NOT NULL CHECK (length(title) BETWEEN 1 AND 200),
  done    INTEGER NOT NULL DEFAULT 0,
  position REAL NOT NULL DEFAULT 0
);
CREATE INDEX todos_by_list ON todos (list_id, position)"""
"#;

fn fresh_device(path: &std::path::Path) -> Client {
    fresh_device_on(path, FOUNDATION_SCHEMA)
}

fn fresh_device_on(path: &std::path::Path, schema: &str) -> Client {
    let schema = Schema::parse(schema).unwrap();
    // Install the schema as a device would after its first sync: by letting a
    // server core hand it over in memory.
    let server =
        hearth_engine::ServerCore::open(Connection::open_in_memory().unwrap(), schema).unwrap();
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

fn capture(dir: &std::path::Path) -> serde_json::Value {
    let mut results = serde_json::Map::new();
    for (label, mode, schema) in [
        ("prepared_single_row_inserts", 0, FOUNDATION_SCHEMA),
        ("one_insert_select", 1, FOUNDATION_SCHEMA),
        ("prepared_single_row_inserts_demo_policies", 0, DEMO_SCHEMA),
        ("one_insert_select_demo_policies", 1, DEMO_SCHEMA),
    ] {
        let mut timings = Vec::new();
        for synced in [false, true] {
            let mut c = fresh_device_on(&dir.join(format!("capture-{label}-{synced}.db")), schema);
            // The same table as the schema's `todos` (CHECK and index
            // included), just not synced.
            let todos = &Schema::parse(schema).unwrap().tables["todos"];
            c.exec(&todos.create_sql.replace("todos", "plain"), &[], 1)
                .unwrap();
            let table = if synced { "todos" } else { "plain" };
            let start;
            let (outcome, _) = if mode == 0 {
                // One INSERT statement, run once per row with bound values.
                let sets: Vec<Vec<Value>> = (0..CAPTURE_ROWS)
                    .map(|i| {
                        vec![
                            Value::Text(format!("item-{i:08}")),
                            Value::Text(format!("title {i}")),
                            Value::Real(i as f64),
                        ]
                    })
                    .collect();
                let sql = format!("INSERT INTO {table} (id, list_id, title, position) VALUES (?1, 'list-1', ?2, ?3)");
                start = Instant::now();
                c.exec_many(&sql, &sets, 2).unwrap()
            } else {
                let sql = format!(
                    "WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < {CAPTURE_ROWS})
                     INSERT INTO {table} (id, list_id, title, position) SELECT printf('item-%08d', i), 'list-1', 'title ' || i, i FROM s"
                );
                start = Instant::now();
                c.exec(&sql, &[], 2).unwrap()
            };
            let elapsed = start.elapsed();
            assert_eq!(outcome.rows_affected as usize, CAPTURE_ROWS);
            assert_eq!(outcome.mutation.is_some(), synced);
            timings.push(elapsed);
        }
        let ratio = timings[1].as_secs_f64() / timings[0].as_secs_f64();
        println!(
            "capture ({label}): {CAPTURE_ROWS} inserts in one transaction: plain {:.0} ms, synced {:.0} ms, ratio {ratio:.2}x (target <= 2x)",
            timings[0].as_secs_f64() * 1e3,
            timings[1].as_secs_f64() * 1e3
        );
        results.insert(
            label.to_string(),
            serde_json::json!({"plain_ms": timings[0].as_secs_f64() * 1e3, "synced_ms": timings[1].as_secs_f64() * 1e3, "ratio": ratio, "target_ratio_max": 2.0}),
        );
    }
    serde_json::Value::Object(results)
}

async fn ingest(dir: &std::path::Path) -> serde_json::Value {
    let config = hearth_server::ServerConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        dir.join("ingest-server"),
        Schema::parse(FOUNDATION_SCHEMA).unwrap(),
    );
    // The server runs on its own runtime and threads, as it would in its own
    // process: the devices' SQLite work must not block its tasks.
    let (tx, rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server_thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let server = hearth_server::start(config, &[]).await.unwrap();
            tx.send((server.addr, server.metrics.clone())).unwrap();
            let _ = stop_rx.await;
            server.shutdown().await;
        });
    });
    let (addr, metrics) = rx.recv().unwrap();
    let url = format!("ws://{addr}/sync");
    let mut devices = Vec::new();
    for d in 0..INGEST_CLIENTS {
        let mut c = fresh_device(&dir.join(format!("ingest-{d}.db")));
        for i in 0..INGEST_PER_CLIENT {
            c.exec(
                "INSERT INTO todos (id, list_id, title) VALUES (?1, 'l', 'x')",
                &[Value::Text(format!("d{d}-{i}"))],
                native_client::now_ms(),
            )
            .unwrap();
        }
        devices.push(c);
    }
    let total = INGEST_CLIENTS * INGEST_PER_CLIENT;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for mut c in devices {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            native_client::sync_once(&mut c, &url, Goal::Synced, Duration::from_secs(600))
                .await
                .unwrap();
            c.status().pending
        }));
    }
    // Server-side rate: from the first push to the last mutation applied.
    let mut first_applied: Option<Instant> = None;
    let server_done = loop {
        let applied = hearth_server::Metrics::get(&metrics.mutations_applied) as usize;
        if applied > 0 && first_applied.is_none() {
            first_applied = Some(Instant::now());
        }
        if applied >= total {
            break Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    for t in tasks {
        assert_eq!(t.await.unwrap(), 0);
    }
    let all_synced = start.elapsed();
    let server_secs = server_done.duration_since(start).as_secs_f64();
    let rate = total as f64 / server_secs;
    let end_to_end = total as f64 / all_synced.as_secs_f64();
    println!(
        "ingest: {total} single-row mutations from {INGEST_CLIENTS} concurrent clients: applied in {:.2} s = {rate:.0}/s (target >= 20000/s); \
         every client caught up (incl. applying all {total} changes each) in {:.2} s = {end_to_end:.0}/s",
        server_secs,
        all_synced.as_secs_f64()
    );
    let _ = stop_tx.send(());
    server_thread.join().unwrap();
    serde_json::json!({"mutations": total, "clients": INGEST_CLIENTS, "server_applied_per_s": rate, "target_per_s_min": 20000,
        "all_clients_caught_up_s": all_synced.as_secs_f64()})
}

fn wire() -> serde_json::Value {
    let mut c =
        fresh_device(&std::env::temp_dir().join(format!("hearth-wire-{}.db", std::process::id())));
    c.exec("INSERT INTO todos (id, list_id, title) VALUES ('0b6f1a52-8e2c-4c5e-9f1e-2f3a4b5c6d7e', 'l', 'x')", &[], 1).unwrap();
    let (o, _) = c
        .exec(
            "UPDATE todos SET done = 1 WHERE id = '0b6f1a52-8e2c-4c5e-9f1e-2f3a4b5c6d7e'",
            &[],
            2,
        )
        .unwrap();
    let mut ten = String::new();
    for i in 0..10 {
        ten.push_str(&format!(
            "('{i:08}-8e2c-4c5e-9f1e-2f3a4b5c6d7e', 'list-0001', 'buy item {i}'),"
        ));
    }
    ten.pop();
    let (o10, _) = c
        .exec(
            &format!("INSERT INTO todos (id, list_id, title) VALUES {ten}"),
            &[],
            3,
        )
        .unwrap();
    let hello = Hello::of(&c.on_connected()[0]).unwrap();
    let server = hearth_engine::ServerCore::open(
        Connection::open_in_memory().unwrap(),
        Schema::parse(FOUNDATION_SCHEMA).unwrap(),
    )
    .unwrap();
    let out = c
        .handle(server.greet(&hello, FRAME_BYTES_MAX).unwrap(), 4)
        .unwrap();
    let ClientMsg::Push { mutations } = &out.send[0] else {
        panic!()
    };
    let frame_of = |seq: u64| {
        let m = mutations.iter().find(|m| m.seq == seq).unwrap().clone();
        encode_client(&ClientMsg::Push { mutations: vec![m] }).len()
    };
    let update = frame_of(o.mutation.unwrap());
    let insert10 = frame_of(o10.mutation.unwrap());
    let entry = hearth_engine::LogEntry {
        server_seq: 123_456,
        client_id: c.client_id(),
        client_seq: 2,
        hlc: mutations[1].hlc,
        changes: mutations[1].changes.clone(),
        digest: mutations[1].digest(),
        images: Vec::new(),
    };
    let down = encode_server(&ServerMsg::Changes {
        entries: vec![entry],
        cursor: 123_456,
        hlc: hearth_engine::Hlc(0),
        caught_up: true,
    })
    .len();
    println!("wire: one-column update (36-char UUID key): push frame {update} bytes up, {down} bytes down (target < 100)");
    println!("wire: 10-row insert (5 columns each): push frame {insert10} bytes");
    let _ = std::fs::remove_file(
        std::env::temp_dir().join(format!("hearth-wire-{}.db", std::process::id())),
    );
    serde_json::json!({"one_column_update_up_bytes": update, "one_column_update_down_bytes": down, "ten_row_insert_up_bytes": insert10, "target_update_bytes_max": 100})
}

/// The store alone: the same mutations applied by `ServerCore` in batches,
/// no network and no devices competing for the two cores.
fn store_only(dir: &std::path::Path) -> serde_json::Value {
    let conn = Connection::open(dir.join("store-only.db")).unwrap();
    conn.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;")
        .unwrap();
    let mut core =
        hearth_engine::ServerCore::open(conn, Schema::parse(FOUNDATION_SCHEMA).unwrap()).unwrap();
    let mut device = fresh_device(&dir.join("store-only-device.db"));
    let total = INGEST_CLIENTS * INGEST_PER_CLIENT;
    for i in 0..total {
        device
            .exec(
                "INSERT INTO todos (id, list_id, title) VALUES (?1, 'l', 'x')",
                &[Value::Text(format!("s-{i}"))],
                1,
            )
            .unwrap();
    }
    let hello = Hello::of(&device.on_connected()[0]).unwrap();
    let server = hearth_engine::ServerCore::open(
        Connection::open_in_memory().unwrap(),
        Schema::parse(FOUNDATION_SCHEMA).unwrap(),
    )
    .unwrap();
    let mut mutations = Vec::new();
    let mut out = device
        .handle(server.greet(&hello, FRAME_BYTES_MAX).unwrap(), 1)
        .unwrap()
        .send;
    while !out.is_empty() {
        for msg in out.drain(..) {
            if let ClientMsg::Push { mutations: m } = msg {
                mutations.extend(m);
            }
        }
    }
    // Spread them over ten client ids, as ten devices would send them.
    let batch: Vec<(u64, hearth_engine::Mutation)> = mutations
        .into_iter()
        .enumerate()
        .map(|(i, mut m)| {
            let c = (i % INGEST_CLIENTS) as u64 + 1;
            m.seq = (i / INGEST_CLIENTS) as u64 + 1;
            (c, m)
        })
        .collect();
    let start = Instant::now();
    for chunk in batch.chunks(2_000) {
        core.apply_batch(chunk).unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    let rate = batch.len() as f64 / secs;
    println!(
        "ingest (store only, no network): {} mutations in batches of 2000: {:.2} s = {rate:.0}/s",
        batch.len(),
        secs
    );
    serde_json::json!({"mutations": batch.len(), "per_s": rate})
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    // `BENCH_ONLY=capture` runs just the capture figure (for profiling).
    if std::env::var("BENCH_ONLY").as_deref() == Ok("capture") {
        capture(dir.path());
        return;
    }
    let wire = wire();
    let capture = capture(dir.path());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let store = store_only(dir.path());
    let ingest = runtime.block_on(ingest(dir.path()));
    let report = serde_json::json!({"capture": capture, "ingest": ingest, "store_only": store, "wire": wire});
    std::fs::create_dir_all("target/bench").unwrap();
    std::fs::write(
        "target/bench/foundation.json",
        serde_json::to_string_pretty(&report).unwrap(),
    )
    .unwrap();
    println!("wrote target/bench/foundation.json");
}
