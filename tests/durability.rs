//! Nothing acknowledged is lost: server kills, device restarts, lost acks.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use common::*;
use hearth::native_client;
use hearth_engine::{Event, DEMO_SCHEMA};
use serde_json::json;

/// Starts the real `hearth serve` binary on a free port; returns it and its URL.
fn spawn_server(data: &std::path::Path) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_hearth"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(data)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn hearth serve");
    let mut line = String::new();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    stdout.read_line(&mut line).unwrap();
    // Keep reading so the server never writes into a closed pipe.
    std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
    let addr = line
        .split("http://")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
        .to_string();
    (child, format!("ws://{addr}/sync"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_server_keeps_every_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (mut server, url) = spawn_server(&data);
    let mut a = device(dir.path(), "a");
    sync(&mut a, &url).await;
    for i in 0..50 {
        exec(
            &mut a,
            "INSERT INTO todos (id, list_id, title) VALUES (?1, 'l', 'x')",
            &[text(&format!("t{i}"))],
        );
    }
    sync(&mut a, &url).await; // Returns once every write is acknowledged.
    assert_eq!(a.status().pending, 0);
    server.kill().unwrap(); // SIGKILL: no shutdown code runs.
    server.wait().unwrap();

    let (mut server, url) = spawn_server(&data);
    let mut fresh = device(dir.path(), "fresh");
    sync(&mut fresh, &url).await;
    assert_eq!(
        rows(&mut fresh, "SELECT count(*) AS n FROM todos"),
        vec![json!({"n": 50})]
    );
    // The first device resumes from its cursor: nothing new, nothing twice.
    sync(&mut a, &url).await;
    assert_eq!(a.status().server_seq, 50);
    server.kill().unwrap();
    server.wait().unwrap();

    // The store is the app's real tables, readable by any SQLite tool.
    let conn = rusqlite::Connection::open(data.join("hearth.db")).unwrap();
    let n: i64 = conn
        .query_row("SELECT count(*) FROM todos", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_device_keeps_its_outbox_and_sends_it_once() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path(), DEMO_SCHEMA).await;
    let url = url(&server);
    {
        let mut a = device(dir.path(), "a");
        sync(&mut a, &url).await;
        exec(
            &mut a,
            "INSERT INTO todos (id, list_id, title) VALUES ('t1', 'l', 'offline 1')",
            &[],
        );
        exec(&mut a, "UPDATE todos SET done = 1 WHERE id = 't1'", &[]);
        assert_eq!(a.status().pending, 2);
    } // The device process "exits" with two writes pending.
    let mut a = device(dir.path(), "a");
    assert_eq!(a.status().pending, 2, "the outbox survives a restart");
    sync(&mut a, &url).await;
    assert_eq!(a.status().pending, 0);
    assert_eq!(metric(&server, "hearth_mutations_applied_total").await, 2);
    let mut b = device(dir.path(), "b");
    sync(&mut b, &url).await;
    assert_eq!(
        rows(&mut b, "SELECT title, done FROM todos"),
        vec![json!({"title": "offline 1", "done": 1})]
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_ack_is_found_in_the_catch_up_and_the_write_applied_once() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path(), DEMO_SCHEMA).await;
    let url = url(&server);
    let mut a = device(dir.path(), "a");
    sync(&mut a, &url).await;
    exec(
        &mut a,
        "INSERT INTO todos (id, list_id, title) VALUES ('t1', 'l', 'once')",
        &[],
    );

    // Push, then drop the connection before reading the answer.
    let mut ws = native_client::connect(&url, TIMEOUT).await.unwrap();
    let hello = a.on_connected();
    native_client::send(&mut ws, hello).await.unwrap();
    while !a.status().connected {
        native_client::step(&mut a, &mut ws).await.unwrap();
    }
    let push = a.poll_send().unwrap().send;
    assert!(
        push.is_empty(),
        "the engine sends pending writes as soon as the session is ready"
    );
    drop(ws);
    a.on_disconnected();
    let applied = tokio::time::timeout(TIMEOUT, async {
        while metric(&server, "hearth_mutations_applied_total").await < 1 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert!(applied.is_ok(), "server applied the push");
    assert_eq!(a.status().pending, 1, "the device never heard back");

    let events = sync(&mut a, &url).await;
    assert!(
        events.iter().any(|e| matches!(
            e,
            Event::Applied {
                seq: 1,
                server_seq: 1
            }
        )),
        "{events:?}"
    );
    // The server's Welcome said it had processed number 1, which the device
    // still held pending: the device caught up first, found its ack there,
    // and had nothing left to send again.
    assert_eq!(a.status().pending, 0);
    assert_eq!(metric(&server, "hearth_mutations_applied_total").await, 1);
    assert_eq!(metric(&server, "hearth_mutations_duplicate_total").await, 0);
    assert_eq!(metric(&server, "hearth_server_seq").await, 1);
    server.shutdown().await;
}

#[test]
fn bad_schema_file_stops_serve_with_a_message_naming_table_and_problem() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("[tables.todos]\ncreate = \"CREATE TABLE todos (id TEXT PRIMARY KEY, t TEXT)\"\nmerge = \"fifo\"\n", "unknown merge policy 'fifo'"),
        ("[tables.todos]\ncreate = \"CREATE TABLE todos (id TEXT, t TEXT)\"\n", "PRIMARY KEY"),
        ("[tables.todos]\ncreate = \"CREATE TABLE todos (id TEXT PRIMARY KEY, t TEXT\"\n", "create statement failed"),
        ("[tables.todos]\ncreate = \"CREATE TABLE todos (id TEXT PRIMARY KEY)\"\npolicy = \"lww\"\n", "unknown field `policy`"),
    ];
    for (i, (body, problem)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("bad{i}.toml"));
        std::fs::write(&path, format!("version = 1\n{body}")).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_hearth"))
            .args(["serve", "--listen", "127.0.0.1:0", "--schema"])
            .arg(&path)
            .arg("--data")
            .arg(dir.path().join("data"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "case {i} should fail");
        assert!(stderr.contains(problem), "case {i}: {stderr}");
        if !problem.contains("unknown field") {
            assert!(stderr.contains("table 'todos'"), "case {i}: {stderr}");
        }
    }
}
