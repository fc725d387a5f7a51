//! What an operator sees: `/metrics` after real traffic, and `hearth serve
//! --log-format json` log lines.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};

use common::*;
use hearth_engine::{Event, Schema, DEMO_SCHEMA};
use hearth_server::{Refuse, Server};

/// The value of the `/metrics` line that starts with `series` (a name with
/// its labels).
fn series(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("{series} ")))
        .map(|v| v.trim().parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_tables_refusal_codes_backlog_and_commit_time() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::builder()
        .schema(Schema::parse(DEMO_SCHEMA).unwrap())
        .data_dir(dir.path().join("server"))
        .listen("127.0.0.1:0".parse().unwrap())
        .validate(|_ctx, mutation| {
            for todo in mutation.changes_to("todos") {
                if todo.value("title") == Some(&text("nope")) {
                    return Err(Refuse::new("NO_NOPE", "nope is not a todo"));
                }
            }
            Ok(())
        })
        .start()
        .await
        .unwrap();
    let url = url(&server);
    let mut a = device(dir.path(), "a");
    sync(&mut a, &url).await;
    exec(
        &mut a,
        "INSERT INTO lists (id, name) VALUES ('l', 'L')",
        &[],
    );
    exec(
        &mut a,
        "INSERT INTO todos (id, list_id, title) VALUES ('t1', 'l', 'one'), ('t2', 'l', 'two')",
        &[],
    );
    // One mutation writing both tables.
    exec(
        &mut a,
        "UPDATE lists SET name = 'L2'; UPDATE todos SET done = 1 WHERE id = 't1'",
        &[],
    );
    exec(
        &mut a,
        "INSERT INTO todos (id, list_id, title) VALUES ('t3', 'l', 'nope')",
        &[],
    );
    let events = sync(&mut a, &url).await;
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::Rejected { code, .. } if code == "NO_NOPE")),
        "{events:?}"
    );

    let body = http_get(&server, "/metrics").await;
    let get = |s: &str| series(&body, s).unwrap_or_else(|| panic!("no {s} in\n{body}"));
    assert_eq!(
        get("hearth_table_mutations_applied_total{table=\"lists\"}"),
        2.0
    );
    assert_eq!(
        get("hearth_table_mutations_applied_total{table=\"todos\"}"),
        2.0
    );
    assert_eq!(get("hearth_mutations_applied_total"), 3.0);
    assert_eq!(get("hearth_mutations_refused_total{code=\"NO_NOPE\"}"), 1.0);
    assert!(body.contains("# TYPE hearth_mutations_refused_total counter"));
    // At least one store transaction, timed; every bucket cumulative.
    assert!(body.contains("# TYPE hearth_store_commit_seconds histogram"));
    let count = get("hearth_store_commit_seconds_count");
    assert!(count >= 1.0, "{body}");
    assert_eq!(
        get("hearth_store_commit_seconds_bucket{le=\"+Inf\"}"),
        count
    );
    assert!(get("hearth_store_commit_seconds_sum") > 0.0);
    let buckets: Vec<f64> = body
        .lines()
        .filter(|l| l.starts_with("hearth_store_commit_seconds_bucket"))
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "{buckets:?}");
    // The device has disconnected: no connection is behind.
    assert_eq!(get("hearth_connection_backlog_entries_max"), 0.0);
    assert_eq!(
        get("hearth_connections_by_backlog_entries{le=\"+Inf\"}"),
        0.0
    );

    // A connected device counts in the backlog buckets (a raw WebSocket
    // that says Hello from cursor 0 and then reads nothing).
    let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .unwrap();
    use futures_util::SinkExt;
    let hello = hearth_engine::ClientMsg::Hello {
        client_id: 777,
        cursor: 0,
        schema_version: None,
        subscriptions: Vec::new(),
        token: None,
        reloaded: Default::default(),
        first_pending: 0,
    };
    ws.send(tokio_tungstenite::tungstenite::Message::Binary(
        hearth_engine::protocol::encode_client(&hello).into(),
    ))
    .await
    .unwrap();
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        let body = http_get(&server, "/metrics").await;
        if series(&body, "hearth_connections_by_backlog_entries{le=\"+Inf\"}") == Some(1.0) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{body}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    drop(ws);
    server.shutdown().await;
}

#[test]
fn json_logs_are_one_object_per_line_with_level_message_and_target() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_hearth"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
            "--data",
        ])
        .arg(dir.path().join("data"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.starts_with("hearth: serving"), "{first:?}");
    // SIGTERM, by this child's own pid: it logs its shutdown and exits.
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(child.wait().unwrap().success());
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
        .collect();
    for line in &lines {
        for field in ["level", "message", "target", "timestamp"] {
            assert!(line[field].is_string(), "no {field} in {line}");
        }
    }
    let find = |needle: &str| {
        lines
            .iter()
            .find(|l| l["message"].as_str().unwrap().contains(needle))
            .unwrap_or_else(|| panic!("no {needle:?} in {stderr}"))
    };
    let warn = find("no [auth] section");
    assert_eq!(warn["level"], "WARN");
    assert_eq!(warn["target"], "hearth_server");
    let serving = find("serving http://");
    assert_eq!(serving["level"], "INFO");
    assert_eq!(serving["schema_version"], 2);
    find("shutting down");
}

#[test]
fn an_unknown_log_format_is_refused() {
    let out = Command::new(env!("CARGO_BIN_EXE_hearth"))
        .args(["serve", "--log-format", "yaml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("yaml") && stderr.contains("json"),
        "{stderr}"
    );
}
