//! Server rules in Rust: at most 100 todos per list.
//!
//! A CHECK constraint sees one row; this rule counts the other rows of the
//! list, so it is a validator: it runs on every mutation inside the server's
//! merge transaction, after the mutation merged, and its queries see the
//! mutation's own effects. A mutation that would put a 101st todo in a list
//! is refused with the code `TODO_LIMIT`; its device rolls it back and shows
//! the reason. Other lists and other devices are not affected.
//!
//! Run it (the demo app, with the rule): `cargo run --release --example
//! todo_limit [-- ADDR [DATA_DIR]]`, then open http://127.0.0.1:8787.
//! `tests/server_rules.rs` runs this very rule against real devices.

use hearth_engine::{Schema, Value, DEMO_SCHEMA};
use hearth_server::{Context, MutationView, Op, Refuse, Server};

/// Most todos one list may hold.
pub const TODOS_PER_LIST_MAX: i64 = 100;
/// The refusal code devices see.
pub const TODO_LIMIT: &str = "TODO_LIMIT";

/// The rule: no list that this mutation adds a todo to (by inserting it,
/// or by moving it there) holds more than [`TODOS_PER_LIST_MAX`] todos once
/// the mutation merged.
pub fn todo_limit(ctx: &Context<'_>, mutation: &MutationView<'_>) -> Result<(), Refuse> {
    for todo in mutation.changes_to("todos") {
        let adds = match todo.op() {
            Op::Insert => true,
            Op::Update => todo.value("list_id").is_some(),
            Op::Delete => false,
        };
        if !adds {
            continue;
        }
        // Where the todo is now, as merged (a concurrent delete may have won).
        let Some(row) = ctx.query_row(
            "SELECT list_id FROM todos WHERE id = ?1",
            &[todo.key().clone()],
        )?
        else {
            continue;
        };
        let list = row.into_iter().next().unwrap_or(Value::Null);
        // `todos_by_list` makes this an index range count.
        let count = ctx.query_i64(
            "SELECT count(*) FROM todos WHERE list_id = ?1",
            std::slice::from_ref(&list),
        )?;
        if count > TODOS_PER_LIST_MAX {
            let name = match &list {
                Value::Text(id) => id.clone(),
                other => format!("{other:?}"),
            };
            return Err(Refuse::new(
                TODO_LIMIT,
                format!(
                    "list {name} already has {TODOS_PER_LIST_MAX} todos, the most a list may hold"
                ),
            ));
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The server logs through `tracing` (a failed validator is an ERROR).
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    // Arguments: LISTEN_ADDR DATA_DIR (`skip(1)` passes over the program's
    // own name; nothing here is a skipped test).
    let mut args = std::env::args().skip(1);
    let listen = args
        .next()
        .unwrap_or_else(|| "127.0.0.1:8787".into())
        .parse()?;
    let data_dir = args
        .next()
        .unwrap_or_else(|| "hearth-data-todo-limit".into());
    let running = Server::builder()
        .schema(Schema::parse(DEMO_SCHEMA)?)
        .data_dir(&data_dir)
        .listen(listen)
        .assets(hearth::assets::ASSETS)
        .validate(todo_limit)
        .start()
        .await?;
    println!(
        "todo_limit: serving http://{} (at most {TODOS_PER_LIST_MAX} todos per list); data in {data_dir}",
        running.addr
    );
    tokio::signal::ctrl_c().await?;
    running.shutdown().await;
    Ok(())
}
