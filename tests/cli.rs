//! The `hearth client` command line as a user runs it.

mod common;

use std::process::{Command, Output};

use common::cli::{stderr, OFFLINE};
use common::*;
use serde_json::{json, Value as Json};

fn hearth(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hearth"))
        .args(args)
        .output()
        .expect("run hearth")
}

fn exec_on(db: &str, url: &str, sql: &str) -> Output {
    hearth(&["client", "--db", db, "--server", url, "exec", sql])
}

fn sync_on(db: &str, url: &str) -> Output {
    hearth(&["client", "--db", db, "--server", url, "sync"])
}

fn query_on(db: &str, sql: &str) -> Output {
    hearth(&["client", "--db", db, "query", sql])
}

fn json_lines(out: &Output) -> Vec<Json> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_query_and_sync_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path(), ACCOUNTS_SCHEMA).await;
    let url = url(&server);
    let a = dir.path().join("a.db");
    let b = dir.path().join("b.db");
    let (a, b) = (a.to_str().unwrap(), b.to_str().unwrap());

    // A fresh device gets the schema at its first exec and the write applies.
    let out = hearth(&[
        "client",
        "--db",
        a,
        "--server",
        &url,
        "exec",
        "INSERT INTO accounts (id, email, name) VALUES (?1, ?2, ?3)",
        r#"["u1", "ann@example.com", "Ann"]"#,
    ]);
    assert!(out.status.success(), "{out:?}");
    let line = &json_lines(&out)[0];
    assert_eq!(line["status"], "applied");
    assert_eq!(line["mutation"], 1);

    // B syncs and reads it locally, one JSON object per row.
    let out = sync_on(b, &url);
    assert!(out.status.success(), "{out:?}");
    let out = query_on(b, "SELECT id, email, name, score FROM accounts");
    assert_eq!(
        json_lines(&out),
        vec![json!({"id": "u1", "email": "ann@example.com", "name": "Ann", "score": 0})]
    );

    // A write that breaks a constraint on the device itself fails at once,
    // with SQLite's reason, and nothing is queued.
    let out = exec_on(
        b,
        &url,
        "INSERT INTO accounts (id, email) VALUES ('u2', 'ann@example.com')",
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("UNIQUE"),
        "{out:?}"
    );
    let out = exec_on(
        a,
        "ws://127.0.0.1:9/sync",
        "INSERT INTO accounts (id, email) VALUES ('u3', 'bob@example.com')",
    );
    assert!(out.status.success(), "server down: queued, exit 0: {out:?}");
    assert_eq!(json_lines(&out)[0]["status"], "queued");
    let out = exec_on(
        b,
        &url,
        "INSERT INTO accounts (id, email) VALUES ('u4', 'bob@example.com')",
    );
    assert_eq!(json_lines(&out)[0]["status"], "applied");
    // A's queued write now clashes with B's on the server.
    let out = sync_on(a, &url);
    assert!(out.status.success(), "{out:?}");
    let summary = &json_lines(&out)[0];
    assert_eq!(summary["pending"], 0);
    assert_eq!(summary["rejected"][0]["code"], "CONSTRAINT");
    let out = query_on(a, "SELECT id FROM accounts ORDER BY id");
    assert_eq!(
        json_lines(&out),
        vec![json!({"id": "u1"}), json!({"id": "u4"})]
    );

    // exec whose write the server refuses exits 3.
    let c = dir.path().join("c.db");
    let c = c.to_str().unwrap();
    assert!(sync_on(c, &url).status.success());
    let out = exec_on(
        a,
        "ws://127.0.0.1:9/sync",
        "INSERT INTO accounts (id, email) VALUES ('u5', 'cat@example.com')",
    );
    assert_eq!(json_lines(&out)[0]["status"], "queued");
    let out = exec_on(
        c,
        &url,
        "INSERT INTO accounts (id, email) VALUES ('u6', 'cat@example.com')",
    );
    assert_eq!(json_lines(&out)[0]["status"], "applied");
    let out = exec_on(
        a,
        &url,
        "UPDATE accounts SET name = 'Ann B' WHERE id = 'u1'",
    );
    // A's exec pushes its whole outbox; the earlier queued u5 is refused, the
    // new write applies: this exec's own status is applied.
    assert_eq!(json_lines(&out)[0]["status"], "applied", "{out:?}");
    let out = query_on(a, "SELECT id FROM accounts WHERE id = 'u5'");
    assert!(json_lines(&out).is_empty());
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_refused_by_the_server_exits_3_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path(), ACCOUNTS_SCHEMA).await;
    let url = url(&server);
    let a = dir.path().join("a.db");
    let b = dir.path().join("b.db");
    let (a, b) = (a.to_str().unwrap(), b.to_str().unwrap());
    assert!(sync_on(a, &url).status.success());
    assert!(sync_on(b, &url).status.success());
    // A holds an offline write; B takes the same email first.
    let out = exec_on(
        b,
        &url,
        "INSERT INTO accounts (id, email) VALUES ('b1', 'x@example.com')",
    );
    assert_eq!(json_lines(&out)[0]["status"], "applied");
    let out = exec_on(
        a,
        &url,
        "INSERT INTO accounts (id, email) VALUES ('a1', 'x@example.com')",
    );
    // A has not synced B's row yet, so the write passes locally and the
    // server refuses it.
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let line = &json_lines(&out)[0];
    assert_eq!(line["status"], "rejected");
    assert!(
        line["reason"].as_str().unwrap().contains("UNIQUE"),
        "{line}"
    );
    assert_eq!(line["undone"], json!([{"table": "accounts", "key": "a1"}]));
    let out = query_on(a, "SELECT id FROM accounts");
    assert_eq!(json_lines(&out), vec![json!({"id": "b1"})]);
    // The verdict stays readable afterwards, without a server.
    let mutation = line["mutation"].to_string();
    let out = hearth(&["client", "--db", a, "settled", &mutation]);
    assert!(out.status.success(), "{out:?}");
    let settled = &json_lines(&out)[0];
    assert_eq!(settled["status"], "rejected");
    assert_eq!(settled["code"], line["code"]);
    assert_eq!(settled["undone"], line["undone"]);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_writes_are_listed_and_one_can_be_discarded_offline() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path(), ACCOUNTS_SCHEMA).await;
    let url = url(&server);
    let a = dir.path().join("a.db");
    let a = a.to_str().unwrap();
    assert!(sync_on(a, &url).status.success());
    // Offline: two writes queue.
    for (id, email) in [("a1", "one@example.com"), ("a2", "two@example.com")] {
        let sql = format!("INSERT INTO accounts (id, email) VALUES ('{id}', '{email}')");
        let out = exec_on(a, OFFLINE, &sql);
        assert!(out.status.success(), "{out:?}");
        assert_eq!(json_lines(&out)[0]["status"], "queued", "{out:?}");
    }
    let out = hearth(&["client", "--db", a, "pending"]);
    let pending = json_lines(&out);
    assert_eq!(pending.len(), 2, "{out:?}");
    assert_eq!(
        pending[1]["rows"],
        json!([{"table": "accounts", "key": "a2"}])
    );
    assert_eq!(pending[1]["tables"], json!(["accounts"]));
    assert_eq!(
        (&pending[1]["attempts"], &pending[1]["sent"]),
        (&json!(0), &json!(false))
    );
    let second = pending[1]["mutation"].to_string();
    let out = hearth(&["client", "--db", a, "discard", &second]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        json_lines(&out)[0]["undone"],
        json!([{"table": "accounts", "key": "a2"}])
    );
    let out = hearth(&["client", "--db", a, "discard", &second]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(stderr(&out).contains("NOT_PENDING"), "{out:?}");
    let out = hearth(&["client", "--db", a, "settled", &second]);
    assert_eq!(json_lines(&out)[0]["code"], "DISCARDED", "{out:?}");
    let out = hearth(&["client", "--db", a, "settled", "99"]);
    assert!(stderr(&out).contains("UNKNOWN_MUTATION"), "{out:?}");
    // Back online the kept write goes; the discarded one never reaches the server.
    assert!(sync_on(a, &url).status.success());
    let first = pending[0]["mutation"].to_string();
    let out = hearth(&["client", "--db", a, "settled", &first]);
    assert_eq!(json_lines(&out)[0]["status"], "applied", "{out:?}");
    let b = dir.path().join("b.db");
    let b = b.to_str().unwrap();
    assert!(sync_on(b, &url).status.success());
    let out = query_on(b, "SELECT id FROM accounts ORDER BY id");
    assert_eq!(json_lines(&out), vec![json!({"id": "a1"})]);
    server.shutdown().await;
}

#[test]
fn sync_with_no_server_exits_2_and_bad_input_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("a.db");
    let db = db.to_str().unwrap();
    let out = hearth(&[
        "client",
        "--db",
        db,
        "--server",
        "ws://127.0.0.1:9/sync",
        "--timeout-s",
        "2",
        "sync",
    ]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unreachable"),
        "{out:?}"
    );
    let out = query_on(db, "SELECT 1");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no schema yet"),
        "{out:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_parameters_are_stored_exactly_or_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path(), ACCOUNTS_SCHEMA).await;
    let url = url(&server);
    let a = dir.path().join("a.db");
    let a = a.to_str().unwrap();
    let insert = "INSERT INTO accounts (id, email, score) VALUES (?1, ?2, ?3)";
    // Beyond SQLite's 64-bit integers: refused, not turned into an inexact real.
    let out = hearth(&[
        "client",
        "--db",
        a,
        "--server",
        &url,
        "exec",
        insert,
        r#"["u1", "e1", 18446744073709551615]"#,
    ]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("INVALID_ARGUMENT")
            && err.contains("parameter 3")
            && err.contains("18446744073709551615"),
        "{err}"
    );
    // Beyond 2^64 too (JSON readers take those for reals), anywhere in the
    // array, and in a stream's parameters.
    for params in [
        r#"["u1", "e1", 18446744073709551616]"#,
        r#"["u1", "e1", -99999999999999999999999]"#,
    ] {
        let out = hearth(&[
            "client", "--db", a, "--server", &url, "exec", insert, params,
        ]);
        assert_eq!(out.status.code(), Some(1), "{params}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("INVALID_ARGUMENT") && err.contains("outside SQLite's 64-bit range"),
            "{params}: {err}"
        );
    }
    // Parameters that are not JSON, or not an array: the same code.
    for params in ["not json", r#"{"a": 1}"#] {
        let out = hearth(&[
            "client", "--db", a, "--server", &url, "exec", insert, params,
        ]);
        assert_eq!(out.status.code(), Some(1), "{params}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("INVALID_ARGUMENT") && err.contains("PARAMS_JSON"),
            "{params}: {err}"
        );
    }
    // TEXT that is not UTF-8 fails on the device, with its code.
    let out = hearth(&[
        "client",
        "--db",
        a,
        "--server",
        &url,
        "exec",
        "INSERT INTO accounts (id, email) VALUES ('u9', CAST(X'FF' AS TEXT))",
    ]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("SQL_ERROR") && err.contains("not valid UTF-8"),
        "{err}"
    );
    // The extremes that fit are kept to the last bit.
    for (id, score) in [("u2", i64::MIN), ("u3", i64::MAX)] {
        let params = format!(r#"["{id}", "{id}@e", {score}]"#);
        let out = hearth(&[
            "client", "--db", a, "--server", &url, "exec", insert, &params,
        ]);
        assert!(out.status.success(), "{out:?}");
    }
    let b = dir.path().join("b.db");
    let b = b.to_str().unwrap();
    assert!(sync_on(b, &url).status.success());
    assert_eq!(
        json_lines(&query_on(b, "SELECT id, score FROM accounts ORDER BY id")),
        vec![
            json!({"id": "u2", "score": i64::MIN}),
            json!({"id": "u3", "score": i64::MAX})
        ]
    );
    server.shutdown().await;
    // A string that looks like a large number, and reals, are fine.
    let out = hearth(&[
        "client",
        "--db",
        a,
        "query",
        "SELECT ?1 AS s, ?2 AS r",
        r#"["18446744073709551616 \" 99999999999999999999", 1.5e300]"#,
    ]);
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("18446744073709551616 \\\" 99999999999999999999")
            && stdout.contains("1.5e+300"),
        "{stdout}"
    );
}
