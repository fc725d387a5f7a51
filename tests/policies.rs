//! Merge policies as a user of the command line sees them: `hearth serve`
//! with a schema file declaring them, three devices (`hearth client` on
//! their own SQLite files) that write plain SQL while offline, then sync in
//! some order. Every device and the server's store end with what the policy
//! promises.

mod common;

use common::cli::{json_line, stderr, Device, Served, OFFLINE};
use serde_json::{json, Value as Json};

const SCHEMA: &str = r#"
version = 1

[tables.cards]
create = """CREATE TABLE cards (id TEXT PRIMARY KEY, title TEXT NOT NULL DEFAULT '',
  likes INTEGER NOT NULL DEFAULT 0, stock INTEGER NOT NULL DEFAULT 0,
  tags TEXT NOT NULL DEFAULT '[]', body TEXT NOT NULL DEFAULT '', price REAL)"""
merge = "lww"
columns = { likes = "counter", stock = { merge = "counter", min = 0 }, tags = "set", body = "text", price = "manual" }

[tables.notes]
create = "CREATE TABLE notes (id TEXT PRIMARY KEY, title TEXT, body TEXT, pinned INTEGER NOT NULL DEFAULT 0)"
merge = "lww"
on_delete = "update-wins"
"#;

/// A server and three devices that have its schema, and whatever `setup`
/// wrote on device A, synced everywhere.
struct World {
    server: Served,
    devices: [Device; 3],
    _dir: tempfile::TempDir,
}

impl World {
    fn new(setup: &[&str]) -> World {
        let dir = tempfile::tempdir().unwrap();
        let server = Served::start(dir.path(), SCHEMA);
        let devices = ["a", "b", "c"].map(|name| Device::new(dir.path(), name, &server.url));
        for sql in setup {
            let out = devices[0].exec(sql);
            assert_eq!(json_line(&out)["status"], "applied", "{out:?}");
        }
        for d in &devices {
            d.sync();
        }
        World {
            server,
            devices,
            _dir: dir,
        }
    }

    /// Syncs every device in the given order, then every one again, so each
    /// has pushed its outbox and pulled what the others pushed.
    fn settle(&self, order: [usize; 3]) -> Vec<Json> {
        let mut summaries = Vec::new();
        for _round in 0..2 {
            for &i in &order {
                summaries.push(self.devices[i].sync());
            }
        }
        summaries
    }

    /// The same query gives `want` on every device and on the server's store.
    fn everywhere(&self, sql: &str, want: Json) {
        for (d, name) in self.devices.iter().zip(["A", "B", "C"]) {
            assert_eq!(Json::from(d.query(sql)), want, "device {name}: {sql}");
        }
        assert_eq!(Json::from(self.server.query(sql)), want, "server: {sql}");
    }
}

// ---- counter -------------------------------------------------------------

#[test]
fn counter_increments_made_offline_add_up_once_and_a_bound_refuses_the_second_last_take() {
    let w = World::new(&["INSERT INTO cards (id, title, stock) VALUES ('c1', 'Card', 1)"]);
    let [a, b, c] = &w.devices;

    // Offline, each device likes the card its own way.
    a.exec_offline("UPDATE cards SET likes = likes + 1 WHERE id = 'c1'");
    a.exec_offline("UPDATE cards SET likes = likes + 2 WHERE id = 'c1'");
    // B saw 0: "SET likes = 1" is +1, not "make it 1".
    b.exec_offline("UPDATE cards SET likes = 1 WHERE id = 'c1'");
    c.exec_offline("UPDATE cards SET likes = likes + 5 WHERE id = 'c1'");
    let summaries = w.settle([2, 0, 1]);
    assert!(
        summaries
            .iter()
            .all(|s| s["pending"] == 0 && s["rejected"] == json!([])),
        "{summaries:?}"
    );
    w.everywhere("SELECT likes FROM cards", json!([{"likes": 9}]));

    // Syncing again applies nothing twice: the server has nothing new.
    let seq = summaries.last().unwrap()["serverSeq"].clone();
    for d in &w.devices {
        let again = d.sync();
        assert_eq!(again["serverSeq"], seq, "{again}");
        assert_eq!(again["pending"], 0);
    }
    w.everywhere("SELECT likes FROM cards", json!([{"likes": 9}]));

    // The last item: B and C take it offline, each seeing stock 1.
    b.exec_offline("UPDATE cards SET stock = stock - 1 WHERE id = 'c1'");
    c.exec_offline("UPDATE cards SET stock = stock - 1 WHERE id = 'c1'");
    assert_eq!(b.sync()["rejected"], json!([]), "the first to sync gets it");
    // C's take would go below the minimum: refused, and undone on C.
    let summary = c.sync();
    assert_eq!(summary["pending"], 0, "{summary}");
    let rejected = summary["rejected"].as_array().unwrap();
    assert_eq!(rejected.len(), 1, "{summary}");
    assert_eq!(rejected[0]["code"], "BOUND", "{summary}");
    let reason = rejected[0]["reason"].as_str().unwrap();
    assert!(
        reason.contains("minimum 0") && reason.contains("current value 0"),
        "the reason names the bound and the value: {reason}"
    );
    assert_eq!(c.query("SELECT stock FROM cards"), [json!({"stock": 0})]);

    // A has not synced since: it still sees 1, takes it online, and its
    // exec reports the refusal (exit 3) with code and reason.
    assert_eq!(a.query("SELECT stock FROM cards"), [json!({"stock": 1})]);
    let out = a.exec("UPDATE cards SET stock = stock - 1 WHERE id = 'c1'");
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let line = json_line(&out);
    assert_eq!(line["status"], "rejected", "{line}");
    assert_eq!(line["code"], "BOUND", "{line}");
    assert!(
        line["reason"].as_str().unwrap().contains("minimum 0"),
        "{line}"
    );

    w.settle([0, 1, 2]);
    w.everywhere(
        "SELECT likes, stock FROM cards",
        json!([{"likes": 9, "stock": 0}]),
    );
}

// ---- set -----------------------------------------------------------------

#[test]
fn set_keeps_an_add_the_remove_had_not_seen_in_canonical_order_and_refuses_non_arrays() {
    let w = World::new(&["INSERT INTO cards (id, tags) VALUES ('c1', '[\"b\",\"a\"]')"]);
    let [a, b, c] = &w.devices;
    w.everywhere("SELECT tags FROM cards", json!([{"tags": r#"["a","b"]"#}]));

    // A clears the tags it saw (a, b); B adds "c" and C adds null, true
    // and 2, neither seen by A's clear.
    a.exec_offline("UPDATE cards SET tags = '[]' WHERE id = 'c1'");
    b.exec_offline(r#"UPDATE cards SET tags = '["a","b","c"]' WHERE id = 'c1'"#);
    c.exec_offline(r#"UPDATE cards SET tags = '["b", 2, "a", true, null]' WHERE id = 'c1'"#);
    let summaries = w.settle([1, 0, 2]);
    assert!(
        summaries.iter().all(|s| s["rejected"] == json!([])),
        "{summaries:?}"
    );
    // The adds survive, a and b are gone; null, booleans, numbers, strings.
    w.everywhere(
        "SELECT tags FROM cards",
        json!([{"tags": r#"[null,true,2,"c"]"#}]),
    );

    // A value that is not a JSON array is refused on the device: exit 1,
    // nothing written, nothing queued.
    let seq = b.sync()["serverSeq"].clone();
    for bad in [r#"'{"a":1}'"#, "'5'", "'not json'"] {
        let out = b.run_at(
            OFFLINE,
            &[
                "exec",
                &format!("UPDATE cards SET tags = {bad} WHERE id = 'c1'"),
            ],
        );
        assert_eq!(out.status.code(), Some(1), "{bad}: {out:?}");
        let err = stderr(&out);
        assert!(
            err.contains("hearth: SQL_ERROR") && err.contains("set column 'tags'"),
            "{bad}: {err}"
        );
        assert!(out.stdout.is_empty(), "{out:?}");
    }
    let after = b.sync();
    assert_eq!(after["pending"], 0, "{after}");
    assert_eq!(
        after["serverSeq"], seq,
        "nothing reached the server: {after}"
    );
    w.everywhere(
        "SELECT tags FROM cards",
        json!([{"tags": r#"[null,true,2,"c"]"#}]),
    );
}

// ---- text ----------------------------------------------------------------

#[test]
fn text_edits_made_offline_on_three_devices_all_survive() {
    let w = World::new(&["INSERT INTO cards (id, body) VALUES ('c1', 'The quick fox')"]);
    let [a, b, c] = &w.devices;

    // Two plain UPDATEs (captured as diffs) and one positional edit.
    a.exec_offline("UPDATE cards SET body = 'The quick brown fox' WHERE id = 'c1'");
    b.exec_offline("UPDATE cards SET body = 'The quick fox jumps' WHERE id = 'c1'");
    let out = c.run_at(
        OFFLINE,
        &[
            "edit-text",
            "cards",
            r#""c1""#,
            "body",
            r#"[{"index":0,"delete":3,"insert":"A"}]"#,
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let line = json_line(&out);
    assert_eq!(line["status"], "queued", "{line}");
    assert_eq!(line["rowsAffected"], 1, "{line}");
    assert_eq!(
        c.query("SELECT body FROM cards"),
        [json!({"body": "A quick fox"})]
    );

    let summaries = w.settle([2, 0, 1]);
    assert!(
        summaries.iter().all(|s| s["rejected"] == json!([])),
        "{summaries:?}"
    );
    w.everywhere(
        "SELECT body FROM cards",
        json!([{"body": "A quick brown fox jumps"}]),
    );

    // edit-text online syncs like exec: applied at once, then seen everywhere.
    let out = b.run(&[
        "edit-text",
        "cards",
        r#""c1""#,
        "body",
        r#"[{"index":23,"insert":"!"},{"index":0,"delete":1,"insert":"One"}]"#,
    ]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(json_line(&out)["status"], "applied", "{out:?}");
    w.settle([0, 1, 2]);
    w.everywhere(
        "SELECT body FROM cards",
        json!([{"body": "One quick brown fox jumps!"}]),
    );

    // Bad arguments fail on the device with INVALID_ARGUMENT, exit 1.
    for (args, says) in [
        (
            ["cards", r#""c1""#, "body", r#"[{"index":99}]"#],
            "outside the text",
        ),
        (["cards", r#""c1""#, "title", "[]"], "not text"),
        (["cards", r#""nope""#, "body", "[]"], "no row"),
        (["cards", "c1", "body", "[]"], "KEY_JSON"),
        (["cards", r#""c1""#, "body", r#"{"index":0}"#], "EDITS_JSON"),
        (["cards", r#""c1""#, "body", r#"[{"idx":0}]"#], "idx"),
    ] {
        let mut all = vec!["edit-text"];
        all.extend(args);
        let out = b.run(&all);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {out:?}");
        let err = stderr(&out);
        assert!(
            err.starts_with("hearth: INVALID_ARGUMENT: ") && err.contains(says),
            "{args:?}: {err}"
        );
    }
}

// ---- manual --------------------------------------------------------------

#[test]
fn manual_conflict_shows_on_every_device_until_one_resolves_it() {
    let w = World::new(&["INSERT INTO cards (id, price) VALUES ('c1', 10.0)"]);
    let [a, b, c] = &w.devices;
    let conflicts = "SELECT id, table_name, row_key, column_name FROM hearth_conflicts";

    // Two devices reprice the card offline, neither seeing the other.
    a.exec_offline("UPDATE cards SET price = 11.5 WHERE id = 'c1'");
    b.exec_offline("UPDATE cards SET price = 12.0 WHERE id = 'c1'");
    w.settle([0, 1, 2]);

    // Exactly one open conflict, the same on every device and the server.
    let open = c.query(conflicts);
    assert_eq!(open.len(), 1, "{open:?}");
    assert_eq!(open[0]["table_name"], "cards");
    assert_eq!(open[0]["row_key"], r#""c1""#);
    assert_eq!(open[0]["column_name"], "price");
    w.everywhere(conflicts, Json::from(open.clone()));
    let id = open[0]["id"].as_str().unwrap().to_string();
    // Both candidates are listed; the cell holds one of them meanwhile.
    let candidates: Json = serde_json::from_str(
        c.query("SELECT candidates FROM hearth_conflicts")[0]["candidates"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    let mut values: Vec<f64> = candidates
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["value"].as_f64().unwrap())
        .collect();
    values.sort_by(f64::total_cmp);
    assert_eq!(values, [11.5, 12.0], "{candidates}");
    let provisional = c.query("SELECT price FROM cards");
    w.everywhere("SELECT price FROM cards", Json::from(provisional));

    // A bad value or an unknown conflict: INVALID_ARGUMENT, exit 1.
    for (conflict, value, says) in [
        ("no-such-conflict", "12.25", "no open conflict"),
        (id.as_str(), "{oops", "VALUE_JSON"),
    ] {
        let out = a.run(&["resolve", conflict, value]);
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        let err = stderr(&out);
        assert!(
            err.starts_with("hearth: INVALID_ARGUMENT: ") && err.contains(says),
            "{err}"
        );
    }

    // C, which saw both candidates, settles it.
    let out = c.run(&["resolve", &id, "12.25"]);
    assert!(out.status.success(), "{out:?}");
    let line = json_line(&out);
    assert_eq!(line["status"], "applied", "{line}");
    assert_eq!(line["code"], Json::Null, "{line}");
    w.settle([0, 1, 2]);
    w.everywhere(conflicts, json!([]));
    w.everywhere("SELECT price FROM cards", json!([{"price": 12.25}]));

    // Once closed, the conflict cannot be resolved again.
    let out = b.run(&["resolve", &id, "1"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        stderr(&out).contains("INVALID_ARGUMENT"),
        "{}",
        stderr(&out)
    );
}

// ---- on_delete = "update-wins" -------------------------------------------

#[test]
fn update_wins_brings_a_deleted_row_back_with_the_update_and_last_values() {
    let w = World::new(&[
        "INSERT INTO notes (id, title, body) VALUES ('n1', 'T', 'B')",
        "INSERT INTO notes (id, title, body) VALUES ('n2', 'U', 'V')",
    ]);
    let [a, b, c] = &w.devices;
    // C retitles n1 online; A sees it, B (offline from now on) does not.
    assert_eq!(
        json_line(&c.exec("UPDATE notes SET title = 'T2' WHERE id = 'n1'"))["status"],
        "applied"
    );
    a.sync();

    // Offline: A deletes n1; B pins n1 and edits n2's body.
    a.exec_offline("DELETE FROM notes WHERE id = 'n1'");
    b.exec_offline("UPDATE notes SET pinned = 1 WHERE id = 'n1'");
    b.exec_offline("UPDATE notes SET body = 'V2' WHERE id = 'n2'");
    // A's delete reaches the server first; then, offline again, A deletes
    // n2 without having seen B's edit of it.
    assert_eq!(a.sync()["rejected"], json!([]));
    a.exec_offline("DELETE FROM notes WHERE id = 'n2'");
    assert_eq!(a.query("SELECT id FROM notes"), Vec::<Json>::new());
    // B's pin had not seen the delete: n1 comes back, with the pin and the
    // other columns' last values (C's title, not the one B saw).
    // A's delete of n2 had not seen B's edit: it does nothing.
    let summaries = w.settle([1, 0, 2]);
    assert!(
        summaries.iter().all(|s| s["rejected"] == json!([])),
        "{summaries:?}"
    );
    w.everywhere(
        "SELECT id, title, body, pinned FROM notes ORDER BY id",
        json!([
            {"id": "n1", "title": "T2", "body": "B", "pinned": 1},
            {"id": "n2", "title": "U", "body": "V2", "pinned": 0},
        ]),
    );
}
