//! Server rules in Rust, as an app developer uses them: a server built with
//! `hearth_server::Server::builder()` and the `todo_limit` example's
//! validator, real devices over real WebSockets.

mod common;

// The example's rule itself, not a copy of it.
#[allow(dead_code)]
#[path = "../examples/todo_limit.rs"]
mod todo_limit;

use std::sync::{Arc, Mutex};

use common::*;
use hearth_engine::{Client, Event, Schema, DEMO_SCHEMA};
use hearth_server::{Refuse, Server, VALIDATOR_FAILED};
use serde_json::json;

/// The example's rule, plus a rule that panics on a todo titled `boom`,
/// one that fails through `?` on a todo titled `bad sql` and one that
/// refuses a todo titled `bad code` with an invalid code.
async fn start(dir: &std::path::Path) -> hearth_server::Running {
    Server::builder()
        .schema(Schema::parse(DEMO_SCHEMA).unwrap())
        .data_dir(dir.join("server"))
        .listen("127.0.0.1:0".parse().unwrap())
        .validate(todo_limit::todo_limit)
        .validate(|_ctx, mutation| {
            for todo in mutation.changes_to("todos") {
                if todo.value("title") == Some(&text("boom")) {
                    panic!("a bug in the app's rule");
                }
            }
            Ok(())
        })
        .validate(|ctx, mutation| {
            for todo in mutation.changes_to("todos") {
                if todo.value("title") == Some(&text("bad sql")) {
                    ctx.query_i64("SELECT count(*) FROM no_such_table", &[])?;
                }
            }
            Ok::<(), Refuse>(())
        })
        .validate(|_ctx, mutation| {
            for todo in mutation.changes_to("todos") {
                if todo.value("title") == Some(&text("bad code")) {
                    return Err(Refuse::new("not a code", "codes are A-Z0-9_"));
                }
            }
            Ok(())
        })
        .start()
        .await
        .expect("server starts")
}

/// A log in memory.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Log {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn refusals(events: &[Event]) -> Vec<(u64, String, String)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Rejected {
                seq, code, reason, ..
            } => Some((*seq, code.clone(), reason.clone())),
            _ => None,
        })
        .collect()
}

fn count(device: &mut Client, list: &str) -> serde_json::Value {
    rows(
        device,
        &format!("SELECT count(*) AS n FROM todos WHERE list_id = '{list}'"),
    )[0]["n"]
        .clone()
}

fn add_todo(device: &mut Client, id: &str, list: &str, title: &str) -> u64 {
    exec(
        device,
        "INSERT INTO todos (id, list_id, title) VALUES (?1, ?2, ?3)",
        &[text(id), text(list), text(title)],
    )
    .expect("a mutation")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_101st_todo_of_a_list_is_refused_and_rolled_back() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let url = url(&server);
    let (mut a, mut b) = (device(dir.path(), "a"), device(dir.path(), "b"));
    sync(&mut a, &url).await;
    sync(&mut b, &url).await;

    exec(
        &mut a,
        "INSERT INTO lists (id, name) VALUES ('full', 'Full'), ('other', 'Other')",
        &[],
    );
    for i in 0..todo_limit::TODOS_PER_LIST_MAX {
        add_todo(&mut a, &format!("f{i}"), "full", &format!("todo {i}"));
    }
    let events = sync(&mut a, &url).await;
    assert_eq!(refusals(&events), vec![], "100 todos fit");

    // The 101st, then a todo in another list, pushed together.
    let over = add_todo(&mut a, "f100", "full", "one too many");
    let elsewhere = add_todo(&mut a, "o1", "other", "fine");
    assert_eq!(
        count(&mut a, "full"),
        json!(101),
        "optimistic until the server decides"
    );
    let events = sync(&mut a, &url).await;
    let refused = refusals(&events);
    assert_eq!(refused.len(), 1, "{refused:?}");
    let (seq, code, reason) = &refused[0];
    assert_eq!((*seq, code.as_str()), (over, todo_limit::TODO_LIMIT));
    assert_eq!(
        reason,
        "list full already has 100 todos, the most a list may hold"
    );
    assert!(elsewhere > over);
    // The device names what the refusal undid: the 101st todo's row.
    let undone = events.iter().find_map(|e| match e {
        Event::Rejected { seq, undone, .. } if *seq == over => Some(undone.clone()),
        _ => None,
    });
    assert_eq!(undone, Some(vec![("todos".to_string(), text("f100"))]));
    assert_eq!(
        count(&mut a, "full"),
        json!(100),
        "rolled back on the device"
    );
    assert!(rows(&mut a, "SELECT id FROM todos WHERE id = 'f100'").is_empty());
    assert_eq!(count(&mut a, "other"), json!(1));

    // Another device: it sees the server's state, and its own writes to
    // other lists go through; its 101st in the full list is refused too.
    add_todo(&mut b, "o2", "other", "also fine");
    let b_over = add_todo(&mut b, "f101", "full", "from b");
    let events = sync(&mut b, &url).await;
    let refused = refusals(&events);
    assert_eq!(
        refused
            .iter()
            .map(|(s, c, _)| (*s, c.as_str()))
            .collect::<Vec<_>>(),
        vec![(b_over, todo_limit::TODO_LIMIT)]
    );
    assert_eq!(count(&mut b, "full"), json!(100));
    assert_eq!(count(&mut b, "other"), json!(2));

    // Deleting one makes room again, and moving a todo into the full list
    // counts like adding one.
    exec(&mut a, "DELETE FROM todos WHERE id = 'f0'", &[]);
    add_todo(&mut a, "f100", "full", "now it fits");
    let moved = exec(
        &mut a,
        "UPDATE todos SET list_id = 'full' WHERE id = 'o1'",
        &[],
    )
    .unwrap();
    let events = sync(&mut a, &url).await;
    assert_eq!(
        refusals(&events)
            .iter()
            .map(|(s, c, _)| (*s, c.as_str()))
            .collect::<Vec<_>>(),
        vec![(moved, todo_limit::TODO_LIMIT)]
    );
    assert_eq!(count(&mut a, "full"), json!(100));
    assert_eq!(
        rows(&mut a, "SELECT list_id FROM todos WHERE id = 'o1'"),
        vec![json!({"list_id": "other"})],
        "the move is undone"
    );
    sync(&mut b, &url).await;
    assert_eq!(
        rows(&mut b, "SELECT title FROM todos WHERE id = 'f100'"),
        vec![json!({"title": "now it fits"})]
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_validator_refuses_only_its_mutation() {
    // The server's log, as JSON lines, into a buffer (the store thread logs).
    let log = Log::default();
    let writer = log.clone();
    tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_writer(move || writer.clone())
        .try_init()
        .expect("the only subscriber of this test binary");
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let url = url(&server);
    let (mut a, mut b) = (device(dir.path(), "a"), device(dir.path(), "b"));
    sync(&mut a, &url).await;
    exec(
        &mut a,
        "INSERT INTO lists (id, name) VALUES ('l', 'L')",
        &[],
    );
    let before = add_todo(&mut a, "t1", "l", "before");
    let boom = add_todo(&mut a, "t2", "l", "boom");
    let between = add_todo(&mut a, "t3", "l", "between");
    let bad = add_todo(&mut a, "t4", "l", "bad sql");
    let bad_code = add_todo(&mut a, "t7", "l", "bad code");
    let after = add_todo(&mut a, "t5", "l", "after");
    let events = sync(&mut a, &url).await;
    let refused = refusals(&events);
    assert_eq!(
        refused
            .iter()
            .map(|(s, c, _)| (*s, c.as_str()))
            .collect::<Vec<_>>(),
        vec![
            (boom, VALIDATOR_FAILED),
            (bad, VALIDATOR_FAILED),
            (bad_code, VALIDATOR_FAILED)
        ],
        "{refused:?}"
    );
    // The device is told the server's rules failed, not the panic's text
    // or the SQL error (those are for the operator's log).
    for (_, _, reason) in &refused {
        assert!(reason.contains("validator failed"), "{reason}");
        assert!(
            !reason.contains("no_such_table") && !reason.contains("a bug"),
            "{reason}"
        );
    }
    assert_eq!(
        rows(&mut a, "SELECT title FROM todos ORDER BY id"),
        vec![
            json!({"title": "before"}),
            json!({"title": "between"}),
            json!({"title": "after"})
        ]
    );
    assert!(before < boom && boom < between && between < bad && bad_code < after);

    // The store is still writing for everyone.
    sync(&mut b, &url).await;
    add_todo(&mut b, "t6", "l", "later");
    assert_eq!(refusals(&sync(&mut b, &url).await), vec![]);
    assert_eq!(count(&mut b, "l"), json!(4));
    assert_eq!(metric(&server, "hearth_mutations_rejected_total").await, 3);
    // The operator's log has what the device was not told.
    let log = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
    let failures: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|l| l["level"] == "ERROR")
        .collect();
    assert_eq!(failures.len(), 3, "{log}");
    for (line, (seq, needle)) in failures.iter().zip([
        (boom, "panicked: a bug in the app's rule"),
        (bad, "no_such_table"),
        (bad_code, "invalid code \"not a code\""),
    ]) {
        assert_eq!(line["client_seq"], seq, "{line}");
        assert_eq!(line["client_id"], a.client_id(), "{line}");
        assert!(line["detail"].as_str().unwrap().contains(needle), "{line}");
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_builder_needs_a_schema() {
    let error = Server::builder().start().await.err().expect("no schema");
    assert!(error.to_string().contains("schema"), "{error}");
}
