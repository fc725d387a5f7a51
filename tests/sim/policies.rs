//! Merge policies in the simulation (issue 9): the workloads that write the
//! `cards` table (a counter, a bounded counter, a set, a text and a manual
//! column) and the update-wins table `keeps`, and one property per policy.
//!
//! The properties come from the ledger, never from the engine's merge code:
//! what each exec did to `cards` is read from the device's table before and
//! after it (a counter's delta, a set's added and removed elements), and the
//! oracles replay the log with those, deciding "had seen" the way a user
//! would ([`Writer::before`]: the log prefix the device had applied, or its
//! own earlier write).

use super::*;
use hearth_engine::TextEdit;

/// Not SQL: the editor API or a resolution.
pub(super) enum Call {
    Exec,
    EditText { key: Value, edits: Vec<TextEdit> },
    Resolve { id: String, value: Value },
}

/// The rows of `cards`, made once at the start by the setup mutation.
const ROWS: [&str; 3] = ["c0", "c1", "c2"];
const LIKES: usize = 1;
const STOCK: usize = 2;
const TAGS: usize = 3;
const BODY: usize = 4;
const PRICE: usize = 5;
const STOCK_START: i64 = 5;
const STOCK_MIN: i64 = 0;
const STOCK_MAX: i64 = 12;
/// Set elements (JSON), several of each kind so that canonical order shows.
const ELEMENTS: [&str; 11] = [
    r#""a""#, r#""b""#, r#""ü""#, r#""Z""#, "1", "2", "10", "-1", "1.5", "true", "null",
];
/// Values of the manual column.
const PRICES: [f64; 4] = [0.5, 1.5, 2.0, 3.25];

/// What one exec did to the merge-policy columns of `cards`, read from the
/// device's table: counter deltas (row, column, delta), set elements added
/// and removed (row, element as canonical JSON).
#[derive(Clone, Debug, Default)]
pub(super) struct Effect {
    deltas: Vec<(String, usize, i64)>,
    adds: Vec<(String, String)>,
    removes: Vec<(String, String)>,
}

/// `cards` on one database: id -> row.
pub(super) type Cards = BTreeMap<String, Vec<Value>>;

pub(super) fn read_cards(conn: &Connection) -> Result<Cards, String> {
    Ok(table_rows(conn, "cards", "id")?
        .into_iter()
        .map(|row| (text_of(&row[0]), row))
        .collect())
}

fn text_of(v: &Value) -> String {
    match v {
        Value::Text(t) => t.clone(),
        other => format!("{other:?}"),
    }
}

fn int_of(v: &Value) -> i64 {
    match v {
        Value::Integer(i) => *i,
        _ => 0,
    }
}

/// The row inserts of the setup mutation: likes 0, stock 5, `c0` tagged
/// "a", a body each, no price.
pub(super) fn setup_mutation() -> Mutation {
    let changes = ROWS
        .iter()
        .enumerate()
        .map(|(i, id)| RowChange {
            table: "cards".into(),
            pk: Value::Text(id.to_string()),
            op: RowOp::Upsert {
                insert: true,
                columns: vec![
                    ("likes".into(), ColumnOp::Set(Value::Integer(0))),
                    ("stock".into(), ColumnOp::Set(Value::Integer(STOCK_START))),
                    (
                        "tags".into(),
                        ColumnOp::Set(Value::Text(start_tags(id).into())),
                    ),
                    (
                        "body".into(),
                        ColumnOp::Set(Value::Text(format!("note {i}"))),
                    ),
                    ("price".into(), ColumnOp::Set(Value::Null)),
                ],
            },
        })
        .collect();
    Mutation {
        base: 0,
        also_seen: Vec::new(),
        seq: 1,
        hlc: Hlc::new(START_MS, 0),
        changes,
        schema_version: 0,
    }
}

fn start_tags(id: &str) -> &'static str {
    if id == "c0" {
        r#"["a"]"#
    } else {
        "[]"
    }
}

/// A set cell's elements as canonical JSON texts, in canonical order: null,
/// false, true, numbers by value, strings by code point.
fn elements(v: &Value) -> Result<Vec<String>, String> {
    let Value::Text(t) = v else {
        return Err(format!("a set cell holds {v:?}"));
    };
    let json: serde_json::Value =
        serde_json::from_str(t).map_err(|e| format!("a set cell holds {t:?}: {e}"))?;
    let serde_json::Value::Array(items) = json else {
        return Err(format!("a set cell holds {t:?}"));
    };
    let mut out: Vec<serde_json::Value> = Vec::new();
    for item in items {
        if !out.contains(&item) {
            out.push(item);
        }
    }
    out.sort_by(canonical_order);
    Ok(out.iter().map(|v| v.to_string()).collect())
}

fn canonical_order(a: &serde_json::Value, b: &serde_json::Value) -> std::cmp::Ordering {
    use serde_json::Value as J;
    let rank = |v: &J| match v {
        J::Null => 0,
        J::Bool(false) => 1,
        J::Bool(true) => 2,
        J::Number(_) => 3,
        _ => 4,
    };
    rank(a).cmp(&rank(b)).then_with(|| match (a, b) {
        (J::Number(x), J::Number(y)) => x.as_f64().unwrap().total_cmp(&y.as_f64().unwrap()),
        (J::String(x), J::String(y)) => x.chars().cmp(y.chars()),
        _ => std::cmp::Ordering::Equal,
    })
}

fn sorted_text(mut present: Vec<String>) -> String {
    let mut parsed: Vec<serde_json::Value> = present
        .drain(..)
        .map(|e| serde_json::from_str(&e).unwrap())
        .collect();
    parsed.sort_by(canonical_order);
    let texts: Vec<String> = parsed.iter().map(|v| v.to_string()).collect();
    format!("[{}]", texts.join(","))
}

/// What an exec did to `cards`, from the table before and after it.
pub(super) fn effect(before: &Cards, after: &Cards) -> Result<Effect, String> {
    let mut e = Effect::default();
    for (id, a) in after {
        let Some(b) = before.get(id) else {
            continue;
        };
        for col in [LIKES, STOCK] {
            let delta = int_of(&a[col])
                .checked_sub(int_of(&b[col]))
                .ok_or("a counter changed by more than 64 bits hold")?;
            if delta != 0 {
                e.deltas.push((id.clone(), col, delta));
            }
        }
        if a[TAGS] != b[TAGS] {
            let (old, new) = (elements(&b[TAGS])?, elements(&a[TAGS])?);
            for x in new.iter().filter(|x| !old.contains(x)) {
                e.adds.push((id.clone(), x.clone()));
            }
            for x in old.iter().filter(|x| !new.contains(x)) {
                e.removes.push((id.clone(), x.clone()));
            }
        }
    }
    Ok(e)
}

/// The counters changed by exactly what the workload meant (on a row the
/// device holds): `SET n = n + k` and `SET n = <seen + k>` alike.
pub(super) fn check_deltas(
    name: &str,
    work: &Work,
    before: &Cards,
    after: &Cards,
) -> Result<(), String> {
    for (id, col, k) in &work.deltas {
        let (Some(b), Some(a)) = (before.get(id), after.get(id)) else {
            continue;
        };
        let got = int_of(&a[*col]).wrapping_sub(int_of(&b[*col]));
        if got != *k {
            return Err(format!(
                "{name}: {} took cards/{id} column {col} from {:?} to {:?}, not by {k}",
                work.sql, b[*col], a[*col]
            ));
        }
    }
    Ok(())
}

/// A refusal the counter property accounts for: `BOUND` or `OVERFLOW` of a
/// mutation that changed a counter.
pub(super) fn counter_refusal(m: &Made, code: &str) -> bool {
    !m.policy.deltas.is_empty() && (code == "BOUND" || code == "OVERFLOW")
}

/// The text cells a mutation edits: (row key, column).
fn text_cells(m: &Mutation) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for c in &m.changes {
        if let RowOp::Upsert { columns, .. } = &c.op {
            for (name, op) in columns {
                if matches!(op, ColumnOp::Text(_)) {
                    out.push((pk_key(&c.pk), name.clone()));
                }
            }
        }
    }
    out
}

/// A text edit built on an edit the server refused is refused too
/// (`TEXT_BASE`, documented): explained when an earlier mutation of the same
/// device edited the same text cell and was refused after this one was made
/// (its device still showed that edit).
pub(super) fn text_base_explained(w: &World, m: &Made) -> bool {
    let cells = text_cells(&m.mutation);
    w.ledger.refused.keys().any(|k| {
        w.ledger
            .made
            .get(k)
            .or_else(|| w.ledger.gone.get(k))
            .is_some_and(|e| {
                e.device == m.device
                    && e.tick < m.tick
                    && w.ledger
                        .rejected_events
                        .get(k)
                        .is_none_or(|(_, told)| *told > m.tick)
                    && text_cells(&e.mutation).iter().any(|c| cells.contains(c))
            })
    })
}

// ---- workloads ------------------------------------------------------------

fn work(sql: String, params: Vec<Value>) -> Work {
    Work {
        sql,
        params,
        must_fail: false,
        counted_update: None,
        fail_names: "",
        call: Call::Exec,
        deltas: Vec::new(),
        policy: true,
    }
}

impl World {
    /// Work on `cards` or `keeps`, whichever shapes are on.
    pub(super) fn policy_work(&mut self, d: usize) -> Result<Work, String> {
        let keeps = self.open(SHAPE_UPDATE_WINS);
        if keeps && (!self.open(SHAPE_POLICIES) || self.rng.gen_bool(0.3)) {
            return Ok(self.keeps_work(d));
        }
        self.cards_work(d)
    }

    fn keeps_work(&mut self, d: usize) -> Work {
        let id = format!("k{}", self.rng.gen_range(0..4));
        let label = Value::Text(format!(
            "{}-{}",
            self.devices[d].name,
            self.rng.gen_range(0..100)
        ));
        let n = Value::Integer(self.rng.gen_range(0..10));
        let key = Value::Text(id.clone());
        match self.rng.gen_range(0..9) {
            0..=1 => work(
                "INSERT OR IGNORE INTO keeps (id, label, n) VALUES (?1, ?2, ?3)".into(),
                vec![key, label, n],
            ),
            2 => work(
                "INSERT OR REPLACE INTO keeps (id, label, n) VALUES (?1, ?2, ?3)".into(),
                vec![key, label, n],
            ),
            3..=4 => work(
                "UPDATE keeps SET label = ?1 WHERE id = ?2".into(),
                vec![label, key],
            ),
            5 => work("UPDATE keeps SET n = n + 1 WHERE id = ?1".into(), vec![key]),
            6..=7 => work("DELETE FROM keeps WHERE id = ?1".into(), vec![key]),
            _ => {
                let other = format!("k{}", self.rng.gen_range(0..4));
                work(
                    format!(
                        "DELETE FROM keeps WHERE id = '{id}'; UPDATE keeps SET label = 'x{d}', n = n + 1 WHERE id = '{other}'"
                    ),
                    Vec::new(),
                )
            }
        }
    }

    fn cards_work(&mut self, d: usize) -> Result<Work, String> {
        let id = self.pick(&ROWS).to_string();
        let key = Value::Text(id.clone());
        let row = read_cards(self.devices[d].client.connection())?.remove(&id);
        let seen = |col: usize| row.as_ref().map_or(0, |r| int_of(&r[col]));
        let roll = self.rng.gen_range(0..20);
        Ok(match roll {
            0..=1 => {
                let k = self.rng.gen_range(-2..=4);
                Work {
                    deltas: vec![(id.clone(), LIKES, k)],
                    ..work(
                        format!("UPDATE cards SET likes = likes + {k} WHERE id = '{id}'"),
                        Vec::new(),
                    )
                }
            }
            2 => {
                // A value computed from the one seen: sometimes near the top
                // of the 64-bit range (another device's increment then
                // overflows), sometimes back to 0.
                let s = seen(LIKES);
                let k = match self.rng.gen_range(0..8) {
                    0 if s >= 0 => i64::MAX - s - self.rng.gen_range(0..3),
                    1 => -s,
                    _ => self.rng.gen_range(-3..=3),
                };
                let k = if s.checked_add(k).is_some() { k } else { 1 };
                Work {
                    deltas: vec![(id.clone(), LIKES, k)],
                    ..work(
                        "UPDATE cards SET likes = ?1 WHERE id = ?2".into(),
                        vec![Value::Integer(s.wrapping_add(k)), key],
                    )
                }
            }
            3..=5 => {
                let k = self.rng.gen_range(-3..=3);
                let w = if self.rng.gen_bool(0.5) {
                    work(
                        format!("UPDATE cards SET stock = stock + {k} WHERE id = '{id}'"),
                        Vec::new(),
                    )
                } else {
                    work(
                        "UPDATE cards SET stock = ?1 WHERE id = ?2".into(),
                        vec![Value::Integer(seen(STOCK) + k), key],
                    )
                };
                Work {
                    deltas: vec![(id.clone(), STOCK, k)],
                    ..w
                }
            }
            6..=7 => self.tag_insert(&id),
            8 => {
                let n = match row.as_ref().map(|r| &r[TAGS]) {
                    Some(Value::Text(t)) => serde_json::from_str::<Vec<serde_json::Value>>(t)
                        .map(|v| v.len())
                        .unwrap_or(0),
                    _ => 0,
                };
                if n == 0 {
                    self.tag_insert(&id)
                } else {
                    let i = self.rng.gen_range(0..n);
                    work(
                        format!(
                            "UPDATE cards SET tags = json_remove(tags, '$[{i}]') WHERE id = '{id}'"
                        ),
                        Vec::new(),
                    )
                }
            }
            9 => {
                // The whole array, unsorted, maybe with a duplicate.
                let n = self.rng.gen_range(0..=4);
                let mut items: Vec<&str> = (0..n).map(|_| self.pick(&ELEMENTS)).collect();
                items.shuffle(&mut self.rng);
                work(
                    "UPDATE cards SET tags = ?1 WHERE id = ?2".into(),
                    vec![Value::Text(format!("[{}]", items.join(", "))), key],
                )
            }
            10 if row.is_some() => {
                let bad = self.pick(&[r#"{"a":1}"#, "[[1]]", r#"[{"x":1}]"#, "nope", "3"]);
                Work {
                    must_fail: true,
                    fail_names: "set column 'tags'",
                    ..work(
                        "UPDATE cards SET tags = ?1 WHERE id = ?2".into(),
                        vec![Value::Text(bad.into()), key],
                    )
                }
            }
            11..=12 => {
                let body = row.as_ref().map_or(String::new(), |r| text_of(&r[BODY]));
                let edit = self.text_edit(&body);
                let mut chars: Vec<char> = body.chars().collect();
                let at = edit.index as usize;
                chars.splice(at..at + edit.delete as usize, edit.insert.chars());
                let new: String = chars.into_iter().collect();
                work(
                    "UPDATE cards SET body = ?1 WHERE id = ?2".into(),
                    vec![Value::Text(new), key],
                )
            }
            13..=14 if row.is_some() => {
                let mut body = text_of(&row.as_ref().unwrap()[BODY]);
                let mut edits = Vec::new();
                for _ in 0..self.rng.gen_range(1..=2) {
                    let edit = self.text_edit(&body);
                    let mut chars: Vec<char> = body.chars().collect();
                    let at = edit.index as usize;
                    chars.splice(at..at + edit.delete as usize, edit.insert.chars());
                    body = chars.into_iter().collect();
                    edits.push(edit);
                }
                Work {
                    call: Call::EditText {
                        key: key.clone(),
                        edits: edits.clone(),
                    },
                    ..work(format!("edit_text cards/{id}.body {edits:?}"), Vec::new())
                }
            }
            15..=16 => self.price_write(&id),
            // No manual column under [auth].
            17 if self.auth.is_some() => self.price_write(&id),
            17 => {
                let open = self.open_conflicts(d)?;
                match open.choose(&mut self.rng).cloned() {
                    None => self.price_write(&id),
                    Some((cid, candidates)) => {
                        let value = match candidates.choose(&mut self.rng) {
                            Some(v) if self.rng.gen_bool(0.7) => v.clone(),
                            _ => Value::Real(self.pick(&PRICES)),
                        };
                        Work {
                            call: Call::Resolve {
                                id: cid.clone(),
                                value: value.clone(),
                            },
                            ..work(format!("resolve {cid} with {value:?}"), Vec::new())
                        }
                    }
                }
            }
            18 => {
                // One statement over three policies: a refused stock change
                // takes the like and the price with it.
                let k = self.rng.gen_range(0..=4);
                let price = Value::Real(self.pick(&PRICES));
                Work {
                    deltas: vec![(id.clone(), LIKES, 1), (id.clone(), STOCK, -k)],
                    ..work(
                        format!("UPDATE cards SET likes = likes + 1, stock = stock - {k}, price = ?1 WHERE id = ?2"),
                        vec![price, key],
                    )
                }
            }
            _ => {
                // Text and a bounded counter in one mutation: when the
                // server refuses it, the text edit goes with it, and the
                // device's later edits must still sync.
                let k = self.rng.gen_range(1..=6);
                let add = self.pick(&["!", "?", "ß"]);
                Work {
                    deltas: vec![(id.clone(), STOCK, -k)],
                    ..work(
                        format!(
                            "UPDATE cards SET stock = stock - {k}, body = body || ?1 WHERE id = ?2"
                        ),
                        vec![Value::Text(add.into()), key],
                    )
                }
            }
        })
    }

    fn tag_insert(&mut self, id: &str) -> Work {
        let e = self.pick(&ELEMENTS);
        work(
            "UPDATE cards SET tags = json_insert(tags, '$[#]', json(?1)) WHERE id = ?2".into(),
            vec![Value::Text(e.into()), Value::Text(id.into())],
        )
    }

    fn price_write(&mut self, id: &str) -> Work {
        let price = if self.rng.gen_bool(0.1) {
            Value::Null
        } else {
            Value::Real(self.pick(&PRICES))
        };
        work(
            "UPDATE cards SET price = ?1 WHERE id = ?2".into(),
            vec![price, Value::Text(id.into())],
        )
    }

    /// A small edit of `body` at a random place (in chars); long texts
    /// mostly shrink.
    fn text_edit(&mut self, body: &str) -> TextEdit {
        let len = body.chars().count();
        let index = self.rng.gen_range(0..=len);
        let room = len - index;
        let long = len > 40;
        let delete = self.rng.gen_range(0..=room.min(if long { 10 } else { 3 }));
        let insert = if long && self.rng.gen_bool(0.7) {
            ""
        } else {
            self.pick(&["x", "yz", "é", "🦀 ", "", "\n", "日本"])
        };
        TextEdit {
            index: index as u64,
            delete: delete as u64,
            insert: insert.into(),
        }
    }

    /// The conflicts open on a device: id and candidate values.
    fn open_conflicts(&self, d: usize) -> Result<Vec<(String, Vec<Value>)>, String> {
        let rows = table_rows(
            self.devices[d].client.connection(),
            "hearth_conflicts",
            "id",
        )?;
        let mut out = Vec::new();
        for row in rows {
            let candidates = candidates(&row)?;
            out.push((
                text_of(&row[0]),
                candidates.into_iter().map(|c| c.value).collect(),
            ));
        }
        Ok(out)
    }
}

// ---- properties -----------------------------------------------------------

/// One candidate of a conflict as its row lists it.
struct Candidate {
    value: Value,
    client_id: u64,
    client_seq: u64,
}

fn json_u64(v: &serde_json::Value) -> Option<u64> {
    v.as_u64()
        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
}

/// The candidates of a `hearth_conflicts` row (id, table_name, row_key,
/// column_name, candidates, ...).
fn candidates(row: &[Value]) -> Result<Vec<Candidate>, String> {
    let text = text_of(&row[4]);
    let json: Vec<serde_json::Value> = serde_json::from_str(&text)
        .map_err(|e| format!("conflict {:?} has candidates {text:?}: {e}", row[0]))?;
    json.iter()
        .map(|c| {
            let value = Value::from_json(&c["value"])
                .map_err(|_| format!("candidate value {:?}", c["value"]))?;
            match (json_u64(&c["client_id"]), json_u64(&c["client_seq"])) {
                (Some(client_id), Some(client_seq)) => Ok(Candidate {
                    value,
                    client_id,
                    client_seq,
                }),
                _ => Err(format!("conflict {:?} has a candidate {c}", row[0])),
            }
        })
        .collect()
}

/// The log entries with what made each: (entry, writer, effect on `cards`;
/// None for the hostile device's writes).
fn log_with_effects(w: &World) -> Result<Vec<(LogEntry, Writer, Option<Effect>)>, String> {
    let (writers, _) = applied_writes(w)?;
    let log = w.whole_log()?;
    Ok(log
        .into_iter()
        .zip(writers)
        .map(|(e, writer)| {
            let key = (e.client_id, e.client_seq);
            let effect = w
                .ledger
                .made
                .get(&key)
                .or_else(|| w.ledger.gone.get(&key))
                .map(|m| m.policy.clone());
            (e, writer, effect)
        })
        .collect())
}

fn is_setup(e: &LogEntry) -> bool {
    e.client_id == ROGUE_ID && e.client_seq == 1
}

/// Every database that must show the server's view: the server's and each
/// caught-up device's `cards`, by name.
fn every_cards(w: &World) -> Result<Vec<(String, Cards)>, String> {
    let mut out = vec![("the server".to_string(), read_cards(w.server.connection())?)];
    for dev in &w.devices {
        out.push((dev.name.clone(), read_cards(dev.client.connection())?));
    }
    Ok(out)
}

/// Counter: on the server and every caught-up device, each counter holds its
/// start plus the deltas of the mutations the server applied (each delta as
/// the device's SQL made it); the bounded one stays within its bounds after
/// every applied mutation; a refusal of a counter change says `BOUND` (only
/// for the bounded one) or `OVERFLOW`.
pub(super) fn counters_add_up(w: &World) -> Result<(), String> {
    if !w.open(SHAPE_POLICIES) {
        return Ok(());
    }
    let mut value: BTreeMap<(String, usize), i64> = BTreeMap::new();
    for id in ROWS {
        value.insert((id.to_string(), LIKES), 0);
        value.insert((id.to_string(), STOCK), STOCK_START);
    }
    for (entry, _, effect) in log_with_effects(w)? {
        let Some(effect) = effect else { continue };
        for (id, col, delta) in &effect.deltas {
            let v = value.get_mut(&(id.clone(), *col)).unwrap();
            *v = v.checked_add(*delta).ok_or_else(|| {
                format!(
                    "log entry {} adds {delta} to cards/{id} column {col} holding {v}: past 64 bits",
                    entry.server_seq
                )
            })?;
            if *col == STOCK && !(STOCK_MIN..=STOCK_MAX).contains(v) {
                return Err(format!(
                    "log entry {} ({}#{}) took cards/{id}.stock to {v}, outside {STOCK_MIN}..={STOCK_MAX}",
                    entry.server_seq, entry.client_id, entry.client_seq
                ));
            }
        }
    }
    for (who, cards) in every_cards(w)? {
        for ((id, col), want) in &value {
            let got = cards.get(id).map(|r| r[*col].clone());
            if got != Some(Value::Integer(*want)) {
                return Err(format!(
                    "{who}: cards/{id} column {col} holds {got:?}, but its start plus the applied deltas is {want}"
                ));
            }
        }
    }
    for (key, code) in &w.ledger.refused {
        let Some(m) = w.ledger.made.get(key).or_else(|| w.ledger.gone.get(key)) else {
            continue;
        };
        let stock = m.policy.deltas.iter().any(|(_, c, _)| *c == STOCK);
        let ok = match code.as_str() {
            "BOUND" => stock,
            "OVERFLOW" => !m.policy.deltas.is_empty(),
            _ => true, // The other properties judge other refusals.
        };
        if !ok {
            return Err(format!(
                "mutation {key:?} was refused with {code}, but it changed no counter that could: {:?}",
                m.policy
            ));
        }
    }
    Ok(())
}

/// Set: a replay of observed-remove, add-wins over the log. Every add is a
/// tag of its own; a remove takes away the tags of that element its device
/// had seen (adds in the log prefix it had applied, or its own earlier
/// ones); an element is present while it has a tag. Every device and the
/// server show the present elements in canonical order, as compact JSON.
pub(super) fn sets_replay(w: &World) -> Result<(), String> {
    if !w.open(SHAPE_POLICIES) {
        return Ok(());
    }
    // (row, element) -> the log positions (0-based) of its live adds.
    let mut tags: BTreeMap<(String, String), Vec<usize>> = BTreeMap::new();
    let log = log_with_effects(w)?;
    for (i, (entry, writer, effect)) in log.iter().enumerate() {
        if is_setup(entry) {
            for id in ROWS {
                for e in elements(&Value::Text(start_tags(id).into()))? {
                    tags.entry((id.to_string(), e)).or_default().push(i);
                }
            }
            continue;
        }
        let Some(effect) = effect else { continue };
        for (id, e) in &effect.removes {
            if let Some(live) = tags.get_mut(&(id.clone(), e.clone())) {
                live.retain(|&t| !log[t].1.before(writer));
            }
        }
        for (id, e) in &effect.adds {
            tags.entry((id.clone(), e.clone())).or_default().push(i);
        }
    }
    for id in ROWS {
        let present: Vec<String> = tags
            .iter()
            .filter(|((row, _), live)| row == id && !live.is_empty())
            .map(|((_, e), _)| e.clone())
            .collect();
        let want = Value::Text(sorted_text(present));
        for (who, cards) in every_cards(w)? {
            let got = &cards[id][TAGS];
            if *got != want {
                let history: Vec<String> = log
                    .iter()
                    .filter_map(|(e, wr, ef)| {
                        let ef = ef.as_ref()?;
                        let adds: Vec<_> =
                            ef.adds.iter().filter(|a| a.0 == id).map(|a| &a.1).collect();
                        let rms: Vec<_> = ef
                            .removes
                            .iter()
                            .filter(|a| a.0 == id)
                            .map(|a| &a.1)
                            .collect();
                        (!adds.is_empty() || !rms.is_empty()).then(|| {
                            format!(
                                "{} {}#{} (device {}, cursor {}): add {adds:?} remove {rms:?}",
                                e.server_seq, e.client_id, e.client_seq, wr.device, wr.cursor
                            )
                        })
                    })
                    .collect();
                return Err(format!(
                    "{who}: cards/{id}.tags is {got:?}, but observed-remove over the log gives {want:?}\n  {}",
                    history.join("\n  ")
                ));
            }
        }
    }
    Ok(())
}

/// Text: every caught-up device shows the server's text.
pub(super) fn text_converges(w: &World) -> Result<(), String> {
    if !w.open(SHAPE_POLICIES) {
        return Ok(());
    }
    let server = read_cards(w.server.connection())?;
    for dev in &w.devices {
        let local = read_cards(dev.client.connection())?;
        for id in ROWS {
            if local[id][BODY] != server[id][BODY] {
                return Err(format!(
                    "{}: cards/{id}.body is {:?}, the server's {:?}",
                    dev.name, local[id][BODY], server[id][BODY]
                ));
            }
        }
    }
    Ok(())
}

/// Manual: every conflict open on the server is on every caught-up device,
/// once, and a closed one on none (their `hearth_conflicts` are the
/// server's); one conflict per cell; the cell shows one of its candidates;
/// the candidates are applied writes to that cell, two of which had not seen
/// each other (sequential writes make no conflict); the cell's value on
/// every device is the server's.
pub(super) fn conflicts_everywhere(w: &World) -> Result<(), String> {
    if !w.open(SHAPE_POLICIES) || w.auth.is_some() {
        return Ok(());
    }
    let server = table_rows(w.server.connection(), "hearth_conflicts", "id")?;
    for dev in &w.devices {
        let local = table_rows(dev.client.connection(), "hearth_conflicts", "id")?;
        if local != server {
            return Err(format!(
                "{}: hearth_conflicts differs from the server's:\ndevice {local:?}\nserver {server:?}",
                dev.name
            ));
        }
    }
    let cards = read_cards(w.server.connection())?;
    for dev in &w.devices {
        let local = read_cards(dev.client.connection())?;
        for id in ROWS {
            if local[id][PRICE] != cards[id][PRICE] {
                return Err(format!(
                    "{}: cards/{id}.price is {:?}, the server's {:?}",
                    dev.name, local[id][PRICE], cards[id][PRICE]
                ));
            }
        }
    }
    let log = log_with_effects(w)?;
    let at: HashMap<Key, usize> = log
        .iter()
        .enumerate()
        .map(|(i, (e, _, _))| ((e.client_id, e.client_seq), i))
        .collect();
    let mut cells = BTreeSet::new();
    for row in &server {
        let (table, key, column) = (text_of(&row[1]), text_of(&row[2]), text_of(&row[3]));
        if table != "cards" || column != "price" || !cells.insert(key.clone()) {
            return Err(format!("conflict row {row:?} names a cell that has another conflict, or is not a manual column"));
        }
        let id: String = serde_json::from_str(&key).map_err(|e| format!("row_key {key}: {e}"))?;
        let list = candidates(row)?;
        let held = &cards[&id][PRICE];
        if !list.iter().any(|c| same_stored_value(held, &c.value)) {
            return Err(format!(
                "cards/{id}.price holds {held:?}, none of its conflict's candidates: {row:?}"
            ));
        }
        let mut writers = Vec::new();
        for c in &list {
            let Some(&i) = at.get(&(c.client_id, c.client_seq)) else {
                return Err(format!(
                    "conflict on cards/{id}.price lists {}#{}, which is not in the log",
                    c.client_id, c.client_seq
                ));
            };
            writers.push(&log[i].1);
        }
        let concurrent = writers.iter().enumerate().any(|(i, a)| {
            writers[i + 1..]
                .iter()
                .any(|b| !a.before(b) && !b.before(a))
        });
        if !concurrent {
            let shown: Vec<String> = writers
                .iter()
                .map(|wr| {
                    format!(
                        "pos {} device {} cursor {} origin {} epoch {} lost {}",
                        wr.pos, wr.device, wr.cursor, wr.origin, wr.epoch, wr.lost
                    )
                })
                .collect();
            return Err(format!(
                "conflict on cards/{id}.price is between writes each made after seeing the ones before: {}",
                shown.join("; ")
            ));
        }
    }
    Ok(())
}

/// Delete rule of `keeps` (update-wins): a replay of the log. An insert
/// makes the row unless a delete stamped later removed the key; an update
/// of a deleted row brings it back (its columns over the last values) when
/// its device had not seen the delete, and does nothing otherwise; a delete
/// does nothing when its device had not seen the row's latest update (or
/// insert), or when the row was made again with a later stamp. Columns
/// merge by stamp. The server's `keeps` is the replay's.
pub(super) fn delete_rule_replay(w: &World) -> Result<(), String> {
    if !w.open(SHAPE_UPDATE_WINS) {
        return Ok(());
    }
    type Stamp = (Hlc, u64);
    struct Row {
        alive: bool,
        /// The stamp of its latest insert or delete.
        stamp: Stamp,
        /// Log position of the write that last changed it.
        last_write: Option<usize>,
        /// Deleted while alive: it has last values to come back with.
        was_alive: bool,
        /// label, n: (stamp, value).
        cols: [(Stamp, Value); 2],
    }
    let names = ["label", "n"];
    let mut rows: BTreeMap<String, Row> = BTreeMap::new();
    let log = log_with_effects(w)?;
    for (i, (entry, writer, _)) in log.iter().enumerate() {
        let m = &w.ledger.received[&(entry.client_id, entry.client_seq)];
        let stamp = (entry.hlc, entry.client_id);
        let seen = |at: Option<usize>| at.is_none_or(|a| log[a].1.before(writer));
        for c in m.changes.iter().filter(|c| c.table == "keeps") {
            let row = rows.entry(pk_key(&c.pk)).or_insert(Row {
                alive: false,
                stamp: (Hlc(0), 0),
                last_write: None,
                was_alive: false,
                cols: [((Hlc(0), 0), Value::Null), ((Hlc(0), 0), Value::Null)],
            });
            match &c.op {
                RowOp::Upsert { insert, columns } => {
                    let value = |n: &str| {
                        columns
                            .iter()
                            .find(|(c, _)| c == n)
                            .map(|(_, op)| match op {
                                ColumnOp::Set(v) => v.clone(),
                                other => panic!("keeps column written with {other:?}"),
                            })
                    };
                    if !row.alive {
                        if *insert {
                            if row.stamp > stamp {
                                continue;
                            }
                            for (k, n) in names.iter().enumerate() {
                                row.cols[k] = (stamp, value(n).unwrap_or(Value::Null));
                            }
                        } else if row.was_alive && !seen(row.last_write) {
                            for (k, n) in names.iter().enumerate() {
                                row.cols[k].0 = stamp;
                                if let Some(v) = value(n) {
                                    row.cols[k].1 = v;
                                }
                            }
                        } else {
                            continue;
                        }
                        row.alive = true;
                        row.stamp = stamp;
                        row.last_write = Some(i);
                    } else {
                        if *insert && stamp > row.stamp {
                            row.stamp = stamp;
                        }
                        let mut changed = false;
                        for (k, n) in names.iter().enumerate() {
                            if let Some(v) = value(n) {
                                if stamp > row.cols[k].0 {
                                    row.cols[k] = (stamp, v);
                                    changed = true;
                                }
                            }
                        }
                        if changed {
                            row.last_write = Some(i);
                        }
                    }
                }
                RowOp::Evict => unreachable!("a device's mutation never evicts"),
                RowOp::Delete => {
                    if row.alive {
                        if row.stamp > stamp || !seen(row.last_write) {
                            continue;
                        }
                        row.alive = false;
                        row.was_alive = true;
                        row.stamp = stamp;
                        row.last_write = Some(i);
                    } else if stamp > row.stamp {
                        row.stamp = stamp;
                    }
                }
            }
        }
    }
    let server = read_tables(w.server.connection())?;
    let keeps = &server[KEEPS];
    let want: BTreeMap<String, Vec<Value>> = rows
        .iter()
        .filter(|(_, r)| r.alive)
        .map(|(k, r)| {
            let id = keeps.get(k).map_or(Value::Null, |row| row[0].clone());
            (
                k.clone(),
                vec![id, r.cols[0].1.clone(), r.cols[1].1.clone()],
            )
        })
        .collect();
    let got: BTreeSet<&String> = keeps.keys().collect();
    if got != want.keys().collect() {
        return Err(format!(
            "keeps on the server has rows {got:?}, the delete rule's replay {:?}\n{}",
            want.keys().collect::<Vec<_>>(),
            keeps_history(w, &log)
        ));
    }
    for (k, row) in keeps {
        if row[1..] != want[k][1..] {
            return Err(format!(
                "keeps/{k} is {row:?} on the server, the replay's {:?}\n{}",
                want[k],
                keeps_history(w, &log)
            ));
        }
    }
    Ok(())
}

fn keeps_history(w: &World, log: &[(LogEntry, Writer, Option<Effect>)]) -> String {
    let mut out = String::new();
    for (e, wr, _) in log {
        let m = &w.ledger.received[&(e.client_id, e.client_seq)];
        for c in m.changes.iter().filter(|c| c.table == "keeps") {
            let _ = write!(
                out,
                "\n  {} {}#{} {}.{} device {} cursor {}: {:?} {:?}",
                e.server_seq,
                e.client_id,
                e.client_seq,
                e.hlc.wall_ms(),
                e.hlc.counter(),
                wr.device,
                wr.cursor,
                c.pk,
                c.op
            );
        }
    }
    out
}
