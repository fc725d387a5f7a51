//! Merge policies as a user sees them (issue 9): devices write plain SQL
//! offline, sync in some order, and every device and the server end with
//! what the policy promises: counters add up, sets keep concurrent adds,
//! text keeps both edits, manual columns show a conflict until someone
//! resolves it, and a table's delete rule decides updates of deleted rows.

use hearth_engine::{Client, ClientConfig, Schema, ServerCore, TextEdit, Value};
use rusqlite::Connection;

mod common;
use common::{rejected, rows, text, Net};

const CARDS: &str = r#"
[tables.cards]
create = """CREATE TABLE cards (id TEXT PRIMARY KEY, title TEXT NOT NULL DEFAULT '',
  likes INTEGER NOT NULL DEFAULT 0, stock INTEGER NOT NULL DEFAULT 0,
  tags TEXT NOT NULL DEFAULT '[]', body TEXT NOT NULL DEFAULT '', price REAL)"""
columns = { likes = "counter", stock = { merge = "counter", min = 0, max = 100 }, tags = "set", body = "text", price = "manual" }

[tables.notes]
create = "CREATE TABLE notes (id TEXT PRIMARY KEY, title TEXT, body TEXT, pinned INTEGER NOT NULL DEFAULT 0)"
on_delete = "update-wins"

[tables.memos]
create = "CREATE TABLE memos (id TEXT PRIMARY KEY, title TEXT)"

[tables.docs]
create = "CREATE TABLE docs (id TEXT PRIMARY KEY, body TEXT)"
columns = { body = "text" }
"#;

fn one(c: &Client, sql: &str) -> Value {
    rows(c, sql).remove(0).remove(0)
}

/// The same query on every device and on the server gives `want`.
fn everywhere(net: &Net, devices: &[&Client], sql: &str, want: Vec<Vec<Value>>) {
    for (i, d) in devices.iter().enumerate() {
        assert_eq!(rows(d, sql), want, "device {i}: {sql}");
    }
    assert_eq!(net.server_rows(sql), want, "server: {sql}");
}

fn new_card(net: &mut Net) -> (Client, Client, Client) {
    let mut a = net.device();
    a.exec(
        "INSERT INTO cards (id, title) VALUES ('c1', 'Card')",
        &[],
        1_000,
    )
    .unwrap();
    net.sync(&mut a);
    let b = net.device();
    let c = net.device();
    (a, b, c)
}

// ---- counter -------------------------------------------------------------

#[test]
fn concurrent_increments_add_up_on_every_device() {
    let mut net = Net::new(CARDS);
    let (mut a, mut b, mut c) = new_card(&mut net);
    // Offline, each device likes the card its own way.
    a.exec(
        "UPDATE cards SET likes = likes + 1 WHERE id = 'c1'",
        &[],
        2_000,
    )
    .unwrap();
    a.exec(
        "UPDATE cards SET likes = likes + 2 WHERE id = 'c1'",
        &[],
        2_001,
    )
    .unwrap();
    // "SET likes = 1" on a device that saw 0 is +1, not "make it 1".
    b.exec("UPDATE cards SET likes = 1 WHERE id = 'c1'", &[], 2_002)
        .unwrap();
    c.exec(
        "UPDATE cards SET likes = likes - 5 WHERE id = 'c1'",
        &[],
        2_003,
    )
    .unwrap();
    assert_eq!(one(&a, "SELECT likes FROM cards"), Value::Integer(3));
    net.sync(&mut c);
    net.sync(&mut b);
    net.sync(&mut a);
    // Syncing again (a re-send) applies nothing twice.
    net.settle(&mut [&mut a, &mut b, &mut c]);
    everywhere(
        &net,
        &[&a, &b, &c],
        "SELECT likes FROM cards",
        vec![vec![Value::Integer(3 + 1 - 5)]],
    );
}

#[test]
fn a_bounded_counter_refuses_what_would_cross_its_bound_and_rolls_it_back() {
    let mut net = Net::new(CARDS);
    let (mut a, mut b, mut c) = new_card(&mut net);
    a.exec(
        "UPDATE cards SET stock = stock + 1 WHERE id = 'c1'",
        &[],
        2_000,
    )
    .unwrap();
    net.sync(&mut a);
    net.sync(&mut b);
    net.sync(&mut c);
    // One item left; two devices take it offline.
    b.exec(
        "UPDATE cards SET stock = stock - 1 WHERE id = 'c1'",
        &[],
        3_000,
    )
    .unwrap();
    c.exec(
        "UPDATE cards SET stock = stock - 1 WHERE id = 'c1'",
        &[],
        3_001,
    )
    .unwrap();
    assert_eq!(one(&c, "SELECT stock FROM cards"), Value::Integer(0));
    assert!(rejected(&net.sync(&mut b)).is_empty());
    let refused = rejected(&net.sync(&mut c));
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0].1, "BOUND");
    assert!(
        refused[0].2.contains("minimum 0") && refused[0].2.contains("current value 0"),
        "{}",
        refused[0].2
    );
    net.settle(&mut [&mut a, &mut b, &mut c]);
    everywhere(
        &net,
        &[&a, &b, &c],
        "SELECT stock FROM cards",
        vec![vec![Value::Integer(0)]],
    );
    assert_eq!(c.status().pending, 0);
    // The maximum too, and an initial value out of bounds.
    a.exec("UPDATE cards SET stock = 101 WHERE id = 'c1'", &[], 4_000)
        .unwrap();
    a.exec(
        "INSERT INTO cards (id, stock) VALUES ('c2', -1)",
        &[],
        4_001,
    )
    .unwrap();
    let refused = rejected(&net.sync(&mut a));
    assert_eq!(
        refused.iter().map(|r| r.1.as_str()).collect::<Vec<_>>(),
        ["BOUND", "BOUND"]
    );
    assert!(refused[0].2.contains("maximum 100"), "{}", refused[0].2);
    assert_eq!(
        rows(&a, "SELECT id, stock FROM cards"),
        vec![vec![text("c1"), Value::Integer(0)]]
    );
}

#[test]
fn a_counter_refuses_overflow_and_non_integers() {
    let mut net = Net::new(CARDS);
    let (mut a, _, _) = new_card(&mut net);
    a.exec(
        "UPDATE cards SET likes = 9223372036854775807 WHERE id = 'c1'",
        &[],
        2_000,
    )
    .unwrap();
    net.sync(&mut a);
    let mut b = net.device();
    b.exec(
        "UPDATE cards SET likes = likes - 1 WHERE id = 'c1'",
        &[],
        3_000,
    )
    .unwrap();
    a.exec(
        "UPDATE cards SET likes = likes + 1 WHERE id = 'c1'",
        &[],
        2_001,
    )
    .unwrap_err();
    net.sync(&mut b);
    // b's -1 applied; a device that saw MAX-1 adding 2 overflows at the server.
    net.sync(&mut a);
    a.exec(
        "UPDATE cards SET likes = likes + 1 WHERE id = 'c1'",
        &[],
        4_000,
    )
    .unwrap();
    let mut c = net.device();
    c.exec(
        "UPDATE cards SET likes = likes + 1 WHERE id = 'c1'",
        &[],
        4_001,
    )
    .unwrap();
    net.sync(&mut c);
    let refused = rejected(&net.sync(&mut a));
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0].1, "OVERFLOW");
    assert_eq!(one(&a, "SELECT likes FROM cards"), Value::Integer(i64::MAX));
    let e = a
        .exec(
            "UPDATE cards SET likes = 'many' WHERE id = 'c1'",
            &[],
            5_000,
        )
        .unwrap_err();
    assert!(e.to_string().contains("whole numbers"), "{e}");
    assert_eq!(a.status().pending, 0);
}

// ---- set -----------------------------------------------------------------

#[test]
fn a_set_keeps_concurrent_adds_and_removes_only_what_was_seen() {
    let mut net = Net::new(CARDS);
    let (mut a, mut b, mut c) = new_card(&mut net);
    a.exec(
        r#"UPDATE cards SET tags = '["urgent","home"]' WHERE id = 'c1'"#,
        &[],
        2_000,
    )
    .unwrap();
    net.sync(&mut a);
    net.sync(&mut b);
    // The device stores the canonical order at once.
    assert_eq!(
        one(&a, "SELECT tags FROM cards"),
        text(r#"["home","urgent"]"#)
    );
    // Offline: b removes "urgent" (it saw it); c, which never saw it, adds
    // it itself, and adds "work"; a removes "home" and adds "work" too.
    b.exec(
        r#"UPDATE cards SET tags = '["home"]' WHERE id = 'c1'"#,
        &[],
        3_000,
    )
    .unwrap();
    c.exec(
        r#"UPDATE cards SET tags = json_insert(tags, '$[#]', 'urgent', '$[#]', 'work') WHERE id = 'c1'"#,
        &[],
        3_001,
    )
    .unwrap();
    a.exec(
        r#"UPDATE cards SET tags = '["work","urgent"]' WHERE id = 'c1'"#,
        &[],
        3_002,
    )
    .unwrap();
    net.sync(&mut b);
    net.sync(&mut c);
    net.sync(&mut a);
    net.settle(&mut [&mut a, &mut b, &mut c]);
    // "urgent": b's remove took only the add it saw; c's concurrent add stays.
    // "home": a removed it having seen it: gone. "work": added twice, once.
    everywhere(
        &net,
        &[&a, &b, &c],
        "SELECT tags FROM cards",
        vec![vec![text(r#"["urgent","work"]"#)]],
    );
    // A remove by a device that has seen every add takes it away everywhere.
    b.exec(
        r#"UPDATE cards SET tags = '["work"]' WHERE id = 'c1'"#,
        &[],
        4_000,
    )
    .unwrap();
    net.settle(&mut [&mut a, &mut b, &mut c]);
    everywhere(
        &net,
        &[&a, &b, &c],
        "SELECT tags FROM cards",
        vec![vec![text(r#"["work"]"#)]],
    );
}

#[test]
fn a_set_refuses_values_that_are_not_arrays_of_scalars_locally() {
    let mut net = Net::new(CARDS);
    let (mut a, _, _) = new_card(&mut net);
    for bad in [r#"{"a":1}"#, r#"[["nested"]]"#, "not json", "7"] {
        let e = a
            .exec(
                "UPDATE cards SET tags = ?1 WHERE id = 'c1'",
                &[text(bad)],
                2_000,
            )
            .unwrap_err();
        assert_eq!(e.code(), "SQL_ERROR");
        assert!(e.to_string().contains("set column 'tags'"), "{bad}: {e}");
    }
    let too_many = format!(
        "[{}]",
        (0..1001)
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(",")
    );
    let e = a
        .exec(
            "UPDATE cards SET tags = ?1 WHERE id = 'c1'",
            &[text(&too_many)],
            2_000,
        )
        .unwrap_err();
    assert!(e.to_string().contains("more than the 1000"), "{e}");
    assert_eq!(a.status().pending, 0);
    assert_eq!(one(&a, "SELECT tags FROM cards"), text("[]"));
    // Mixed scalars in the documented order.
    a.exec(
        r#"UPDATE cards SET tags = '["b", 2, "a", null, true, 10, false, 1.5]' WHERE id = 'c1'"#,
        &[],
        3_000,
    )
    .unwrap();
    net.sync(&mut a);
    let b = net.device();
    assert_eq!(
        one(&b, "SELECT tags FROM cards"),
        text(r#"[null,false,true,1.5,2,10,"a","b"]"#)
    );
}

// ---- text ----------------------------------------------------------------

#[test]
fn concurrent_text_edits_both_survive_character_by_character() {
    let mut net = Net::new(CARDS);
    let (mut a, mut b, mut c) = new_card(&mut net);
    a.exec(
        "UPDATE cards SET body = 'The cat sat.' WHERE id = 'c1'",
        &[],
        2_000,
    )
    .unwrap();
    net.settle(&mut [&mut a, &mut b, &mut c]);
    // Offline, a plain UPDATE on each: one changes the start, one the end.
    a.exec(
        "UPDATE cards SET body = 'The black cat sat.' WHERE id = 'c1'",
        &[],
        3_000,
    )
    .unwrap();
    b.exec(
        "UPDATE cards SET body = replace(body, 'sat.', 'sat on the mat.') WHERE id = 'c1'",
        &[],
        3_001,
    )
    .unwrap();
    // c uses the editor API, with an emoji: positions count characters.
    c.edit_text(
        "cards",
        &text("c1"),
        "body",
        &[TextEdit {
            index: 0,
            delete: 0,
            insert: "🐈 ".into(),
        }],
        3_002,
    )
    .unwrap();
    assert_eq!(one(&c, "SELECT body FROM cards"), text("🐈 The cat sat."));
    c.edit_text(
        "cards",
        &text("c1"),
        "body",
        &[TextEdit {
            index: 2,
            delete: 3,
            insert: "A".into(),
        }],
        3_003,
    )
    .unwrap();
    net.sync(&mut b);
    net.sync(&mut a);
    net.sync(&mut c);
    net.settle(&mut [&mut a, &mut b, &mut c]);
    everywhere(
        &net,
        &[&a, &b, &c],
        "SELECT body FROM cards",
        vec![vec![text("🐈 A black cat sat on the mat.")]],
    );
    // The column is plain TEXT: LIKE works on it.
    assert_eq!(
        rows(&b, "SELECT id FROM cards WHERE body LIKE '%black cat%'"),
        vec![vec![text("c1")]]
    );
    // Bad editor calls are refused with a clear error and change nothing.
    for (table, column, edit, want) in [
        (
            "cards",
            "body",
            TextEdit {
                index: 99,
                delete: 0,
                insert: "x".into(),
            },
            "outside the text",
        ),
        (
            "cards",
            "title",
            TextEdit {
                index: 0,
                delete: 0,
                insert: "x".into(),
            },
            "not text",
        ),
        (
            "nope",
            "body",
            TextEdit {
                index: 0,
                delete: 0,
                insert: "x".into(),
            },
            "no synced table",
        ),
    ] {
        let e = a
            .edit_text(table, &text("c1"), column, &[edit], 4_000)
            .unwrap_err();
        assert_eq!(e.code(), "INVALID_ARGUMENT");
        assert!(e.to_string().contains(want), "{e}");
    }
    assert_eq!(a.status().pending, 0);
}

#[test]
fn a_refused_text_edit_is_undone_and_later_edits_still_sync() {
    let mut net = Net::new(CARDS);
    let (mut a, mut b, _) = new_card(&mut net);
    a.exec(
        "UPDATE cards SET body = 'hello' WHERE id = 'c1'",
        &[],
        2_000,
    )
    .unwrap();
    net.sync(&mut a);
    net.sync(&mut b);
    // One mutation edits the text and breaks the stock bound: refused whole.
    a.exec(
        "UPDATE cards SET body = 'hello world', stock = stock - 1 WHERE id = 'c1'",
        &[],
        3_000,
    )
    .unwrap();
    let refused = rejected(&net.sync(&mut a));
    assert_eq!(refused.len(), 1);
    assert_eq!(one(&a, "SELECT body FROM cards"), text("hello"));
    a.exec(
        "UPDATE cards SET body = 'hello there' WHERE id = 'c1'",
        &[],
        4_000,
    )
    .unwrap();
    assert!(rejected(&net.sync(&mut a)).is_empty());
    net.sync(&mut b);
    everywhere(
        &net,
        &[&a, &b],
        "SELECT body FROM cards",
        vec![vec![text("hello there")]],
    );
}

// ---- manual --------------------------------------------------------------

fn conflicts(c: &Client) -> Vec<Vec<Value>> {
    rows(
        c,
        "SELECT id, table_name, row_key, column_name, base_value FROM hearth_conflicts",
    )
}

#[test]
fn concurrent_writes_to_a_manual_column_open_a_conflict_every_device_sees() {
    let mut net = Net::new(CARDS);
    let (mut a, mut b, mut c) = new_card(&mut net);
    // Sequential edits make no conflict.
    a.exec("UPDATE cards SET price = 10 WHERE id = 'c1'", &[], 2_000)
        .unwrap();
    net.settle(&mut [&mut a, &mut b, &mut c]);
    b.exec("UPDATE cards SET price = 12 WHERE id = 'c1'", &[], 3_000)
        .unwrap();
    net.settle(&mut [&mut a, &mut b, &mut c]);
    assert!(conflicts(&a).is_empty());
    // Concurrent: a and c change it offline.
    a.exec("UPDATE cards SET price = 15 WHERE id = 'c1'", &[], 4_000)
        .unwrap();
    c.exec("UPDATE cards SET price = 9.5 WHERE id = 'c1'", &[], 4_001)
        .unwrap();
    net.sync(&mut a);
    net.sync(&mut c);
    net.settle(&mut [&mut a, &mut b, &mut c]);
    let open = conflicts(&a);
    assert_eq!(open.len(), 1, "{open:?}");
    assert_eq!(
        &open[0][1..],
        &[text("cards"), text("\"c1\""), text("price"), text("12.0")]
    );
    for d in [&b, &c] {
        assert_eq!(conflicts(d), open);
    }
    assert_eq!(net.server_rows("SELECT id FROM hearth_conflicts").len(), 1);
    // The provisional winner is the later write, everywhere.
    everywhere(
        &net,
        &[&a, &b, &c],
        "SELECT price FROM cards",
        vec![vec![Value::Real(9.5)]],
    );
    let candidates: serde_json::Value =
        serde_json::from_str(match &one(&b, "SELECT candidates FROM hearth_conflicts") {
            Value::Text(t) => t,
            other => panic!("{other:?}"),
        })
        .unwrap();
    let values: Vec<f64> = candidates
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["value"].as_f64().unwrap())
        .collect();
    assert_eq!(values, [15.0, 9.5]);
    // The app may not write the conflicts table itself.
    let e = b
        .exec("DELETE FROM hearth_conflicts", &[], 5_000)
        .unwrap_err();
    assert!(e.to_string().contains("resolve"), "{e}");
    // b resolves it: gone from b at once, then from every device.
    let Value::Text(id) = open[0][0].clone() else {
        panic!()
    };
    b.resolve(&id, &Value::Real(11.0), 5_001).unwrap();
    assert!(conflicts(&b).is_empty());
    net.settle(&mut [&mut a, &mut b, &mut c]);
    everywhere(
        &net,
        &[&a, &b, &c],
        "SELECT price FROM cards",
        vec![vec![Value::Real(11.0)]],
    );
    for d in [&a, &b, &c] {
        assert!(conflicts(d).is_empty());
    }
    assert!(net
        .server_rows("SELECT id FROM hearth_conflicts")
        .is_empty());
    let e = a.resolve(&id, &Value::Real(1.0), 6_000).unwrap_err();
    assert_eq!(e.code(), "INVALID_ARGUMENT");
}

#[test]
fn a_resolution_raced_by_another_write_reopens_the_conflict() {
    let mut net = Net::new(CARDS);
    let (mut a, mut b, mut c) = new_card(&mut net);
    a.exec("UPDATE cards SET price = 1 WHERE id = 'c1'", &[], 2_000)
        .unwrap();
    b.exec("UPDATE cards SET price = 2 WHERE id = 'c1'", &[], 2_001)
        .unwrap();
    net.sync(&mut a);
    net.sync(&mut b);
    net.settle(&mut [&mut a, &mut b, &mut c]);
    let Value::Text(id) = conflicts(&a)[0][0].clone() else {
        panic!()
    };
    // a resolves, picking the value already shown; c, offline, writes 3.
    let shown = one(&a, "SELECT price FROM cards");
    a.resolve(&id, &shown, 3_000).unwrap();
    c.exec("UPDATE cards SET price = 3 WHERE id = 'c1'", &[], 3_001)
        .unwrap();
    net.sync(&mut a);
    assert!(net
        .server_rows("SELECT id FROM hearth_conflicts")
        .is_empty());
    net.sync(&mut c);
    net.settle(&mut [&mut a, &mut b, &mut c]);
    // c had not seen the resolution: the conflict is open again, everywhere.
    for d in [&a, &b, &c] {
        assert_eq!(conflicts(d).len(), 1);
    }
    let Value::Text(id) = conflicts(&b)[0][0].clone() else {
        panic!()
    };
    b.resolve(&id, &Value::Real(4.0), 4_000).unwrap();
    net.settle(&mut [&mut a, &mut b, &mut c]);
    everywhere(
        &net,
        &[&a, &b, &c],
        "SELECT price FROM cards",
        vec![vec![Value::Real(4.0)]],
    );
    assert!(conflicts(&c).is_empty());
}

// ---- delete rules --------------------------------------------------------

#[test]
fn update_wins_brings_a_concurrently_deleted_row_back_in_either_order() {
    for delete_first in [true, false] {
        let mut net = Net::new(CARDS);
        let mut a = net.device();
        a.exec(
            "INSERT INTO notes VALUES ('n1', 'Title', 'Body', 0)",
            &[],
            1_000,
        )
        .unwrap();
        net.sync(&mut a);
        let mut b = net.device();
        a.exec("DELETE FROM notes WHERE id = 'n1'", &[], 2_000)
            .unwrap();
        b.exec("UPDATE notes SET pinned = 1 WHERE id = 'n1'", &[], 2_001)
            .unwrap();
        if delete_first {
            net.sync(&mut a);
            net.sync(&mut b);
        } else {
            net.sync(&mut b);
            net.sync(&mut a);
        }
        net.settle(&mut [&mut a, &mut b]);
        everywhere(
            &net,
            &[&a, &b],
            "SELECT * FROM notes",
            vec![vec![
                text("n1"),
                text("Title"),
                text("Body"),
                Value::Integer(1),
            ]],
        );
        // A delete made after seeing the update deletes it for good.
        a.exec("DELETE FROM notes WHERE id = 'n1'", &[], 3_000)
            .unwrap();
        net.settle(&mut [&mut a, &mut b]);
        everywhere(&net, &[&a, &b], "SELECT * FROM notes", vec![]);
    }
}

/// Found by the simulation (seed 2312): a device whose cursor log
/// compaction passed re-loads every row, and until the load brings a row
/// back it shows only its own pending writes to it. A delete it makes then
/// has not seen the updates in the entries it skipped, and under
/// `update-wins` the row stays, as it would without compaction; the delete
/// used to carry the log's floor as what its device had seen, and removed
/// the row.
#[test]
fn update_wins_keeps_a_row_deleted_while_reloading_after_compaction() {
    use hearth_engine::link::{Link, LinkConfig};
    use hearth_engine::protocol::{ServerMsg, FRAME_BYTES_MAX};

    let mut net = Net::new(CARDS);
    let mut a = net.device();
    let mut b = net.device();
    // Offline, b writes n1: it will be on b only through this pending write.
    b.exec(
        "INSERT OR IGNORE INTO notes VALUES ('n1', 'from b', '', 0)",
        &[],
        1_000,
    )
    .unwrap();
    // Meanwhile a makes n1 (later: b's insert will change nothing) and
    // pins it; b sees neither, and compaction removes both entries.
    net.server.set_now_ms(2_000);
    a.exec(
        "INSERT INTO notes VALUES ('n1', 'Title', 'Body', 0)",
        &[],
        2_000,
    )
    .unwrap();
    net.sync(&mut a);
    net.server.set_now_ms(3_000);
    a.exec("UPDATE notes SET pinned = 1 WHERE id = 'n1'", &[], 3_000)
        .unwrap();
    net.sync(&mut a);
    let floor = net.server.compact(5_000, u64::MAX).unwrap().floor;
    assert_eq!(floor, net.server.head());
    // b connects, takes the Welcome (its cursor moves to the floor, its
    // rows are to re-load) and loses the connection before any row comes.
    let mut link = Link::new(
        std::sync::Arc::new(net.server.schema().clone()),
        LinkConfig::default(),
    );
    let hello = link.on_hello(b.on_connected().remove(0)).unwrap();
    let answer = net.server.greet(&hello, FRAME_BYTES_MAX).unwrap();
    let welcome = link
        .on_welcome(answer, net.server.head())
        .into_iter()
        .find(|m| matches!(m, ServerMsg::Welcome { .. }))
        .unwrap();
    b.handle(welcome, 0).unwrap();
    b.on_disconnected();
    assert_eq!(b.status().server_seq, floor);
    assert_eq!(
        rows(&b, "SELECT id, title FROM notes"),
        vec![vec![text("n1"), text("from b")]]
    );
    // The user deletes the note b shows: a's pin was never on b.
    b.exec("DELETE FROM notes WHERE id = 'n1'", &[], 4_000)
        .unwrap();
    net.server.set_now_ms(4_000);
    net.settle(&mut [&mut a, &mut b]);
    everywhere(
        &net,
        &[&a, &b],
        "SELECT * FROM notes",
        vec![vec![
            text("n1"),
            text("Title"),
            text("Body"),
            Value::Integer(1),
        ]],
    );
    // Re-loaded, b has seen the pin: its delete now deletes.
    b.exec("DELETE FROM notes WHERE id = 'n1'", &[], 5_000)
        .unwrap();
    net.settle(&mut [&mut a, &mut b]);
    everywhere(&net, &[&a, &b], "SELECT * FROM notes", vec![]);
}

#[test]
fn delete_wins_by_default_and_an_update_never_creates_a_row() {
    let mut net = Net::new(CARDS);
    let mut a = net.device();
    a.exec("INSERT INTO memos VALUES ('m1', 'x')", &[], 1_000)
        .unwrap();
    net.sync(&mut a);
    let mut b = net.device();
    a.exec("DELETE FROM memos WHERE id = 'm1'", &[], 2_000)
        .unwrap();
    b.exec("UPDATE memos SET title = 'y' WHERE id = 'm1'", &[], 2_001)
        .unwrap();
    net.sync(&mut a);
    net.sync(&mut b);
    net.settle(&mut [&mut a, &mut b]);
    everywhere(&net, &[&a, &b], "SELECT * FROM memos", vec![]);
    // An INSERT made later recreates the key.
    b.exec("INSERT INTO memos VALUES ('m1', 'again')", &[], 3_000)
        .unwrap();
    net.settle(&mut [&mut a, &mut b]);
    everywhere(
        &net,
        &[&a, &b],
        "SELECT * FROM memos",
        vec![vec![text("m1"), text("again")]],
    );
}

#[test]
fn a_merge_whose_log_entry_would_outgrow_a_frame_is_refused_too_large() {
    let mut net = Net::new(CARDS);
    net.server.set_entry_bytes_max(4_096);
    let (mut a, _, _) = new_card(&mut net);
    let elements = |from: usize| {
        format!(
            "[{}]",
            (from..from + 200)
                .map(|i| format!("\"tag-{i:05}\""))
                .collect::<Vec<_>>()
                .join(",")
        )
    };
    // 200 tags: the mutation and its entry fit.
    a.exec(
        "UPDATE cards SET tags = ?1 WHERE id = 'c1'",
        &[text(&elements(0))],
        2_000,
    )
    .unwrap();
    assert!(rejected(&net.sync(&mut a)).is_empty());
    // 200 more: the mutation (the added tags) fits, but its entry carries
    // the whole array of 400, which does not.
    a.exec(
        "UPDATE cards SET tags = json_insert(tags, '$[#]', 'x') WHERE id = 'c1'",
        &[],
        3_000,
    )
    .unwrap();
    let all: Vec<String> = (0..400).map(|i| format!("tag-{i:05}")).collect();
    a.exec(
        "UPDATE cards SET tags = ?1 WHERE id = 'c1'",
        &[text(&serde_json::to_string(&all).unwrap())],
        3_001,
    )
    .unwrap();
    let refused = rejected(&net.sync(&mut a));
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0].1, "TOO_LARGE");
    assert!(
        refused[0].2.contains("over the limit of 4096"),
        "{}",
        refused[0].2
    );
    // The first (small) write went through; the refused one is undone.
    let tags = one(&a, "SELECT json_array_length(tags) FROM cards");
    assert_eq!(tags, Value::Integer(201));
}

#[test]
fn a_text_cell_whose_insert_lost_keeps_editing_from_the_winner() {
    let mut net = Net::new(CARDS);
    let mut a = net.device();
    let mut b = net.device();
    // Both make card c9 offline; b's insert is later and wins whole.
    a.exec(
        "INSERT INTO cards (id, body) VALUES ('c9', 'from a')",
        &[],
        1_000,
    )
    .unwrap();
    b.exec(
        "INSERT INTO cards (id, body) VALUES ('c9', 'from b')",
        &[],
        9_000,
    )
    .unwrap();
    net.sync(&mut b);
    net.sync(&mut a);
    net.settle(&mut [&mut a, &mut b]);
    everywhere(
        &net,
        &[&a, &b],
        "SELECT body FROM cards WHERE id = 'c9'",
        vec![vec![text("from b")]],
    );
    // Edits made on the losing device after that build on the winner's text.
    a.exec(
        "UPDATE cards SET body = 'from b, edited by a' WHERE id = 'c9'",
        &[],
        10_000,
    )
    .unwrap();
    b.edit_text(
        "cards",
        &text("c9"),
        "body",
        &[TextEdit {
            index: 0,
            delete: 0,
            insert: "[b] ".into(),
        }],
        10_001,
    )
    .unwrap();
    let refused = rejected(&net.sync(&mut a));
    assert!(refused.is_empty(), "{refused:?}");
    net.settle(&mut [&mut a, &mut b]);
    everywhere(
        &net,
        &[&a, &b],
        "SELECT body FROM cards WHERE id = 'c9'",
        vec![vec![text("[b] from b, edited by a")]],
    );
}

#[test]
fn a_text_column_refuses_null_and_a_counter_says_overflow() {
    let mut net = Net::new(CARDS);
    let (mut a, _, _) = new_card(&mut net);
    // A nullable text column still holds text: NULL is refused, on insert
    // and on update, rather than turning into '' later.
    let e = a
        .exec("INSERT INTO docs (id) VALUES ('d1')", &[], 2_000)
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("text column 'body' holds TEXT, not null"),
        "{e}"
    );
    a.exec("INSERT INTO docs VALUES ('d1', 'x')", &[], 2_000)
        .unwrap();
    let e = a
        .exec("UPDATE docs SET body = NULL WHERE id = 'd1'", &[], 2_000)
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("text column 'body' holds TEXT, not null"),
        "{e}"
    );
    a.exec(
        "UPDATE cards SET likes = 9223372036854775807 WHERE id = 'c1'",
        &[],
        2_001,
    )
    .unwrap();
    // SQLite turns the overflowing sum into a real; the device says why.
    let e = a
        .exec(
            "UPDATE cards SET likes = likes + 1 WHERE id = 'c1'",
            &[],
            2_002,
        )
        .unwrap_err();
    assert!(
        e.to_string().contains("past what a 64-bit integer holds"),
        "{e}"
    );
    assert_eq!(a.status().pending, 2);
    // A new row out of bounds says what it would start at, not a "current" value.
    a.exec(
        "INSERT INTO cards (id, stock) VALUES ('c2', 500)",
        &[],
        2_003,
    )
    .unwrap();
    let refused = rejected(&net.sync(&mut a));
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert!(
        refused[0]
            .2
            .contains("a new row's counter 'stock' would start at 500, above its maximum 100"),
        "{}",
        refused[0].2
    );
}

#[test]
fn tighter_counter_bounds_are_refused_while_stored_values_break_them() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store.db");
    let schema = |bounds: &str| {
        Schema::parse(&format!(
            "version = 1\n[tables.x]\ncreate = \"CREATE TABLE x (id TEXT PRIMARY KEY, n INTEGER NOT NULL DEFAULT 0)\"\ncolumns = {{ n = {bounds} }}\n"
        ))
        .unwrap()
    };
    {
        let mut server =
            ServerCore::open(Connection::open(&store).unwrap(), schema("\"counter\"")).unwrap();
        let mut a = Client::open(
            Connection::open_in_memory().unwrap(),
            1,
            ClientConfig::default(),
        )
        .unwrap();
        common::sync(&mut server, &mut a);
        a.exec("INSERT INTO x VALUES ('p', 5)", &[], 1_000).unwrap();
        common::sync(&mut server, &mut a);
    }
    let e = ServerCore::open(
        Connection::open(&store).unwrap(),
        schema("{ merge = \"counter\", min = 100 }"),
    )
    .err()
    .expect("refused");
    let e = e.to_string();
    assert!(
        e.contains("table 'x', column 'n'")
            && e.contains("1 stored row(s) hold a value outside them"),
        "{e}"
    );
    // Bounds every stored value meets are fine.
    ServerCore::open(
        Connection::open(&store).unwrap(),
        schema("{ merge = \"counter\", min = 0, max = 10 }"),
    )
    .unwrap();
}

#[test]
fn a_policy_change_over_stored_rows_is_refused_naming_table_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store.db");
    let schema = |policy: &str| {
        Schema::parse(&format!(
            "version = 1\n[tables.x]\ncreate = \"CREATE TABLE x (id TEXT PRIMARY KEY, n INTEGER NOT NULL DEFAULT 0)\"\ncolumns = {{ n = \"{policy}\" }}\n"
        ))
        .unwrap()
    };
    // An empty store takes any change.
    drop(ServerCore::open(Connection::open(&store).unwrap(), schema("lww")).unwrap());
    {
        let mut server =
            ServerCore::open(Connection::open(&store).unwrap(), schema("counter")).unwrap();
        let mut a = Client::open(
            Connection::open_in_memory().unwrap(),
            1,
            ClientConfig::default(),
        )
        .unwrap();
        common::sync(&mut server, &mut a);
        a.exec("INSERT INTO x VALUES ('p', 5)", &[], 1_000).unwrap();
        common::sync(&mut server, &mut a);
    }
    for policy in ["lww", "manual"] {
        let e = ServerCore::open(Connection::open(&store).unwrap(), schema(policy))
            .err()
            .expect("refused")
            .to_string();
        assert!(
            e.contains("table 'x', column 'n'") && e.contains(&format!("from counter to {policy}")),
            "{e}"
        );
    }
    // The store is untouched: the old schema still opens and holds the row.
    let server = ServerCore::open(Connection::open(&store).unwrap(), schema("counter")).unwrap();
    let n: i64 = server
        .connection()
        .query_row("SELECT n FROM x", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 5);
}

#[test]
fn writes_that_each_fit_a_set_are_refused_bound_when_merged_past_its_limit() {
    let mut net = Net::new(CARDS);
    let (mut a, mut b, _) = new_card(&mut net);
    let tags = |prefix: &str| {
        let all: Vec<String> = (0..600).map(|i| format!("{prefix}{i}")).collect();
        text(&serde_json::to_string(&all).unwrap())
    };
    a.exec(
        "UPDATE cards SET tags = ?1 WHERE id = 'c1'",
        &[tags("a")],
        2_000,
    )
    .unwrap();
    b.exec(
        "UPDATE cards SET tags = ?1 WHERE id = 'c1'",
        &[tags("b")],
        2_001,
    )
    .unwrap();
    assert!(rejected(&net.sync(&mut a)).is_empty());
    let refused = rejected(&net.sync(&mut b));
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0].1, "BOUND");
    assert!(
        refused[0].2.contains("1200 elements, more than the 1000"),
        "{}",
        refused[0].2
    );
    net.settle(&mut [&mut a, &mut b]);
    everywhere(
        &net,
        &[&a, &b],
        "SELECT json_array_length(tags) FROM cards",
        vec![vec![Value::Integer(600)]],
    );
}
