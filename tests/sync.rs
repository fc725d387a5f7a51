//! Devices converging through a real server over real WebSockets.

mod common;

use common::*;
use hearth::native_client::{self, Goal};
use hearth_engine::{Event, DEMO_SCHEMA};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_devices_converge_through_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path(), DEMO_SCHEMA).await;
    let url = url(&server);
    let (mut a, mut b) = (device(dir.path(), "a"), device(dir.path(), "b"));
    sync(&mut a, &url).await;
    sync(&mut b, &url).await;

    exec(
        &mut a,
        "INSERT INTO lists (id, name) VALUES ('l1', 'Groceries')",
        &[],
    );
    exec(
        &mut a,
        "INSERT INTO todos (id, list_id, title) VALUES (?1, 'l1', ?2)",
        &[text("t1"), text("milk")],
    );
    let events = sync(&mut a, &url).await;
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::Applied { seq: 2, .. })),
        "{events:?}"
    );
    sync(&mut b, &url).await;
    assert_eq!(
        rows(&mut b, "SELECT id, title, done FROM todos"),
        vec![json!({"id": "t1", "title": "milk", "done": 0})]
    );
    assert_eq!(metric(&server, "hearth_mutations_applied_total").await, 2);
    assert_eq!(metric(&server, "hearth_server_seq").await, 2);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_edits_on_both_sides_merge_by_column() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path(), DEMO_SCHEMA).await;
    let url = url(&server);
    let (mut a, mut b) = (device(dir.path(), "a"), device(dir.path(), "b"));
    sync(&mut a, &url).await;
    exec(
        &mut a,
        "INSERT INTO todos (id, list_id, title) VALUES ('t1', 'l1', 'milk')",
        &[],
    );
    sync(&mut a, &url).await;
    sync(&mut b, &url).await;

    // Both offline: different columns of one row, and the same column of another.
    exec(
        &mut a,
        "UPDATE todos SET title = 'oat milk' WHERE id = 't1'",
        &[],
    );
    exec(&mut b, "UPDATE todos SET done = 1 WHERE id = 't1'", &[]);
    exec(
        &mut a,
        "INSERT INTO lists (id, name) VALUES ('l1', 'from a')",
        &[],
    );
    std::thread::sleep(std::time::Duration::from_millis(5)); // B's clock reads later.
    exec(
        &mut b,
        "INSERT INTO lists (id, name) VALUES ('l1', 'from b')",
        &[],
    );
    // The later writer (B) syncs first; A's earlier write must still lose.
    sync(&mut b, &url).await;
    sync(&mut a, &url).await;
    sync(&mut b, &url).await;
    for d in [&mut a, &mut b] {
        assert_eq!(
            rows(d, "SELECT title, done FROM todos"),
            vec![json!({"title": "oat milk", "done": 1})]
        );
        assert_eq!(
            rows(d, "SELECT name FROM lists"),
            vec![json!({"name": "from b"})]
        );
        assert_eq!(d.status().pending, 0);
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_changes_stream_to_a_connected_device() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path(), DEMO_SCHEMA).await;
    let url = url(&server);
    let (mut a, mut b) = (device(dir.path(), "a"), device(dir.path(), "b"));
    sync(&mut a, &url).await;
    // B stays connected and waits for the change to arrive by itself.
    let mut ws = native_client::connect(&url, TIMEOUT).await.unwrap();
    let mut events = Vec::new();
    native_client::run_session(&mut b, &mut ws, Goal::Synced, TIMEOUT, &mut events)
        .await
        .unwrap();
    exec(
        &mut a,
        "INSERT INTO todos (id, list_id, title) VALUES ('t1', 'l1', 'live')",
        &[],
    );
    sync(&mut a, &url).await;
    let arrived = tokio::time::timeout(TIMEOUT, async {
        loop {
            let evs = native_client::step(&mut b, &mut ws)
                .await
                .unwrap()
                .expect("open");
            if evs
                .iter()
                .any(|e| matches!(e, Event::TablesChanged(t) if t.contains(&"todos".to_string())))
            {
                return;
            }
        }
    })
    .await;
    assert!(arrived.is_ok(), "B never saw A's write");
    assert_eq!(
        rows(&mut b, "SELECT title FROM todos"),
        vec![json!({"title": "live"})]
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_write_is_rolled_back_with_a_reason_and_others_survive() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path(), ACCOUNTS_SCHEMA).await;
    let url = url(&server);
    let (mut a, mut b) = (device(dir.path(), "a"), device(dir.path(), "b"));
    sync(&mut a, &url).await;
    sync(&mut b, &url).await;
    exec(
        &mut a,
        "INSERT INTO accounts (id, email) VALUES ('a1', 'same@example.com')",
        &[],
    );
    let clash = exec(
        &mut b,
        "INSERT INTO accounts (id, email) VALUES ('b1', 'same@example.com')",
        &[],
    )
    .unwrap();
    exec(
        &mut b,
        "INSERT INTO accounts (id, email) VALUES ('b2', 'other@example.com')",
        &[],
    );
    sync(&mut a, &url).await;
    let events = sync(&mut b, &url).await;
    let reason = events
        .iter()
        .find_map(|e| match e {
            Event::Rejected {
                seq, code, reason, ..
            } if *seq == clash => Some((code.clone(), reason.clone())),
            _ => None,
        })
        .expect("B's clashing insert is refused");
    assert_eq!(reason.0, "CONSTRAINT");
    assert!(reason.1.contains("UNIQUE"), "{reason:?}");
    assert_eq!(
        rows(&mut b, "SELECT id FROM accounts ORDER BY id"),
        vec![json!({"id": "a1"}), json!({"id": "b2"})],
        "b1 is gone, A's row arrived, b2 kept"
    );
    assert_eq!(metric(&server, "hearth_mutations_rejected_total").await, 1);
    server.shutdown().await;
}
