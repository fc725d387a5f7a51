//! Server rules in Rust, as an app developer uses them: a server built with
//! `hearth_server::Server::builder()` and the `todo_limit` example's
//! validator, real devices over real WebSockets.

mod common;

// The example's rule itself, not a copy of it.
#[allow(dead_code)]
#[path = "../examples/todo_limit.rs"]
mod todo_limit;

use common::*;
use hearth_engine::{Client, Event, Schema, DEMO_SCHEMA};
use hearth_server::{Refuse, Server, VALIDATOR_FAILED};
use serde_json::json;

/// The example's rule, plus a rule that panics on a todo titled `boom`
/// and one that fails through `?` on a todo titled `bad sql`.
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
        .start()
        .await
        .expect("server starts")
}

fn refusals(events: &[Event]) -> Vec<(u64, String, String)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Rejected { seq, code, reason } => Some((*seq, code.clone(), reason.clone())),
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
    let after = add_todo(&mut a, "t5", "l", "after");
    let events = sync(&mut a, &url).await;
    let refused = refusals(&events);
    assert_eq!(
        refused
            .iter()
            .map(|(s, c, _)| (*s, c.as_str()))
            .collect::<Vec<_>>(),
        vec![(boom, VALIDATOR_FAILED), (bad, VALIDATOR_FAILED)],
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
    assert!(before < boom && boom < between && between < bad && bad < after);

    // The store is still writing for everyone.
    sync(&mut b, &url).await;
    add_todo(&mut b, "t6", "l", "later");
    assert_eq!(refusals(&sync(&mut b, &url).await), vec![]);
    assert_eq!(count(&mut b, "l"), json!(4));
    assert_eq!(metric(&server, "hearth_mutations_rejected_total").await, 2);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_builder_needs_a_schema() {
    let error = Server::builder().start().await.err().expect("no schema");
    assert!(error.to_string().contains("schema"), "{error}");
}
