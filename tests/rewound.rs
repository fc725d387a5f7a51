//! A device that lost the end of its history (restored from an older copy of
//! its database file) loses none of its later writes, through the real
//! server and the `hearth client` command line as a user runs them.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::*;
use serde_json::{json, Value as Json};

fn hearth(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hearth"))
        .args(args)
        .output()
        .expect("run hearth")
}

fn json_lines(out: &Output) -> Vec<Json> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
        .collect()
}

fn exec(db: &Path, url: &str, sql: &str) -> Json {
    let out = hearth(&[
        "client",
        "--db",
        db.to_str().unwrap(),
        "--server",
        url,
        "exec",
        sql,
    ]);
    assert!(out.status.success(), "{out:?}");
    json_lines(&out).remove(0)
}

fn query(db: &Path, sql: &str) -> Vec<Json> {
    let out = hearth(&["client", "--db", db.to_str().unwrap(), "query", sql]);
    assert!(out.status.success(), "{out:?}");
    json_lines(&out)
}

/// Copies a device database as a backup tool would (the file and its WAL).
fn copy_db(from: &Path, to: &Path) {
    for suffix in ["", "-wal"] {
        let src = format!("{}{suffix}", from.display());
        let dst = format!("{}{suffix}", to.display());
        let _ = std::fs::remove_file(&dst);
        if Path::new(&src).exists() {
            std::fs::copy(&src, &dst).unwrap();
        }
    }
    let _ = std::fs::remove_file(format!("{}-shm", to.display()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_restored_from_a_backup_keeps_every_later_write() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path(), ACCOUNTS_SCHEMA).await;
    let url = url(&server);
    let a = dir.path().join("a.db");
    let backup = dir.path().join("backup.db");
    let insert = |id: &str| {
        format!(
            "INSERT INTO accounts (id, email, name) VALUES ('{id}', '{id}@example.com', '{id}')"
        )
    };

    assert_eq!(exec(&a, &url, &insert("u1"))["status"], "applied");
    copy_db(&a, &backup);
    let original_id = query(
        &backup,
        "SELECT value FROM _hearth_meta WHERE key = 'client_id'",
    );
    assert_eq!(exec(&a, &url, &insert("u2"))["status"], "applied");
    assert_eq!(exec(&a, &url, &insert("u3"))["status"], "applied");

    // The device comes back from the backup and writes again: its next
    // mutation number (2) is one the server already holds from it.
    copy_db(&backup, &a);
    let line = exec(&a, &url, &insert("u4"));
    assert_eq!(line["status"], "applied", "{line}");
    assert_eq!(line["mutation"], 1, "renumbered under the new client id");
    // A restored device that only syncs is told too, and catches up.
    copy_db(&backup, &backup.with_extension("2.db"));
    let b = dir.path().join("b.db");
    let out = hearth(&[
        "client",
        "--db",
        b.to_str().unwrap(),
        "--server",
        &url,
        "sync",
    ]);
    assert!(out.status.success(), "{out:?}");
    let c = backup.with_extension("2.db");
    let out = hearth(&[
        "client",
        "--db",
        c.to_str().unwrap(),
        "--server",
        &url,
        "sync",
    ]);
    assert!(out.status.success(), "{out:?}");

    let want: Vec<Json> = ["u1", "u2", "u3", "u4"]
        .iter()
        .map(|id| json!({ "id": id }))
        .collect();
    for db in [&a, &b, &c] {
        assert_eq!(
            query(db, "SELECT id FROM accounts ORDER BY id"),
            want,
            "{db:?}"
        );
        let pending = query(db, "SELECT count(*) AS n FROM _hearth_outbox");
        assert_eq!(pending, vec![json!({"n": 0})]);
    }
    // The restored device that wrote under a reused number took a new client
    // id; the one that only synced keeps its id and numbers past the server's.
    let id_of = |db: &Path| query(db, "SELECT value FROM _hearth_meta WHERE key = 'client_id'");
    assert_ne!(id_of(&a), original_id);
    assert_eq!(id_of(&c), original_id);
    let line = exec(&c, &url, &insert("u5"));
    assert_eq!(
        (&line["status"], &line["mutation"]),
        (&json!("applied"), &json!(4)),
        "{line}"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_refuses_transaction_control_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path(), ACCOUNTS_SCHEMA).await;
    let url = url(&server);
    let a = dir.path().join("a.db");
    exec(
        &a,
        &url,
        "INSERT INTO accounts (id, email) VALUES ('u1', 'e1')",
    );
    for sql in [
        "BEGIN",
        "ATTACH 'x.db' AS x",
        "PRAGMA foreign_keys = OFF",
        "SAVEPOINT s",
    ] {
        let out = hearth(&["client", "--db", a.to_str().unwrap(), "query", sql]);
        assert!(!out.status.success(), "{sql}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("Hearth") || err.contains("only reads"),
            "{sql}: {err}"
        );
    }
    let line = exec(
        &a,
        &url,
        "INSERT INTO accounts (id, email) VALUES ('u2', 'e2')",
    );
    assert_eq!(line["status"], "applied");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_device_reusing_a_number_with_other_content_keeps_its_write() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path(), ACCOUNTS_SCHEMA).await;
    let url = url(&server);
    let a = dir.path().join("a.db");
    let backup = dir.path().join("backup.db");
    let insert = |id: &str| {
        format!(
            "INSERT INTO accounts (id, email, name) VALUES ('{id}', '{id}@example.com', '{id}')"
        )
    };
    assert_eq!(exec(&a, &url, &insert("u1"))["status"], "applied");
    copy_db(&a, &backup);
    assert_eq!(exec(&a, &url, &insert("u2"))["status"], "applied");
    copy_db(&backup, &a);
    // Offline, the restored device writes twice: numbers 2 (taken on the
    // server by u2) and 3 (new to it), so its Hello alone looks fine.
    let offline = "ws://127.0.0.1:9/sync";
    assert_eq!(exec(&a, offline, &insert("u3"))["status"], "queued");
    assert_eq!(exec(&a, offline, &insert("u4"))["status"], "queued");
    let out = hearth(&[
        "client",
        "--db",
        a.to_str().unwrap(),
        "--server",
        &url,
        "sync",
    ]);
    assert!(out.status.success(), "{out:?}");
    let want: Vec<Json> = ["u1", "u2", "u3", "u4"]
        .iter()
        .map(|id| json!({ "id": id }))
        .collect();
    assert_eq!(query(&a, "SELECT id FROM accounts ORDER BY id"), want);
    let b = dir.path().join("b.db");
    let out = hearth(&[
        "client",
        "--db",
        b.to_str().unwrap(),
        "--server",
        &url,
        "sync",
    ]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(query(&b, "SELECT id FROM accounts ORDER BY id"), want);
    server.shutdown().await;
}
