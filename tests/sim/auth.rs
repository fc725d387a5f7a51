//! Identity and permissions under simulation (`SHAPES[10]`, issue 11).
//!
//! In a run under `[auth]` (half the seeds when the shape is on, chosen from
//! the seed alone so that the other half replays exactly as before) the
//! schema is [`schema_text`]: the usual tables with rules that let everyone
//! do everything (`"true"`), shared lists as `tests/permissions.rs` has them
//! (`lists`, `members`, `todos`: a list's owner adds and removes members,
//! members read the list, its members and its todos and may update its
//! todos, only a todo's owner deletes it), and `tasks`, still synced through
//! subscriptions, readable only in the lists its user is a member of. Each
//! device acts for one of a few users (several devices may share one); the
//! hostile device acts for a user of its own. Devices make and share lists,
//! add and remove members, and make, move, edit and delete todos, some of
//! which the rules refuse.
//!
//! The simulator gives each connection its user's [`Access`] at the Hello
//! (`read_grants` at the device's cursor, `bind_device`, `set_access`) and
//! each batch its principals (`set_principal`), as `server/src/connection.rs`
//! and `server/src/store.rs` do; there are no tokens.
//!
//! The oracles never ask the link: [`Auth::history`] holds the server's rows
//! of the ruled tables after every log position, replayed from the merged
//! entries the store returns and compared with the store itself (plain SQL)
//! after every batch. Against it:
//! - every row a frame carries to a device (an upsert in a `Changes` entry,
//!   at the entry's position; a row of a `Rows` chunk, at the chunk's
//!   cursor) is a row the device's user could read at that position, with
//!   the values the server had then ([`World::auth_frame`]);
//! - every applied mutation passed the write rules, restated here in Rust
//!   over the rows before and after it ([`World::auth_applied`]), and
//!   `FORBIDDEN` is answered only to mutations of tables whose rules are
//!   not all `"true"`;
//! - at quiescence each device holds exactly the rows its user may read,
//!   by plain SQL on the server's store, with no re-load left under way and
//!   no row left marked stale ([`permissions_hold_exactly`]).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::Write as _;
use std::rc::Rc;
use std::sync::Arc;

use hearth_engine::protocol::Load;
use hearth_engine::rules::Principal;
use hearth_engine::server::Hello;
use hearth_engine::{ColumnOp, Mutation, Outcome, RowChange, RowOp, ServerMsg, Value};
use rand::seq::SliceRandom;
use rand::Rng;
use rusqlite::Connection;

use super::{pk_key, policies, quote, sql_err, table_rows, Work, World, ROGUE_ID};

/// The users devices act for (a run takes the first two or three).
pub(super) const USERS: [&str; 3] = ["ann", "bob", "cy"];
/// The hostile device's user.
pub(super) const ROGUE_USER: &str = "eve";
/// List ids devices use; `tasks.list` takes the first four. The hostile
/// device makes only `e` and forges writes to the others.
const LISTS: [&str; 5] = ["a", "b", "c", "d", "e"];

/// The tables a read rule filters, in the model's order, and the column
/// holding the list the rule looks up (`id` for `lists`).
pub(super) const RULED: [(&str, usize); 4] =
    [("lists", 0), ("members", 1), ("todos", 1), ("tasks", 1)];
const LISTS_T: usize = 0;
const MEMBERS_T: usize = 1;
/// Tables whose write rules are not all `"true"`: only their writes may be
/// refused `FORBIDDEN`.
const GUARDED: [&str; 3] = ["lists", "members", "todos"];

/// The tables of the usual schema, each allowed everything under `[auth]`.
const OPEN_TABLES: [&str; 12] = [
    "users", "notes", "tags", "vals", "orders", "items", "authors", "books", "slots", "counted",
    "cards", "keeps",
];

const AUTH_SCHEMA: &str = r#"
[auth]
# Never read in the simulation: each link gets its user's access directly.
hs256_secret_env = "HEARTH_SIM_UNUSED_SECRET"

[tables.lists]
create = "CREATE TABLE lists (id TEXT PRIMARY KEY, owner TEXT NOT NULL, title TEXT NOT NULL DEFAULT '')"
[tables.lists.rules]
read = "id IN (SELECT list_id FROM members WHERE user_id = auth.sub)"
insert = "owner = auth.sub"
update = "owner = auth.sub"
delete = "owner = auth.sub"

[tables.members]
create = "CREATE TABLE members (id TEXT PRIMARY KEY, list_id TEXT NOT NULL, user_id TEXT NOT NULL)"
[tables.members.rules]
read = "list_id IN (SELECT list_id FROM members WHERE user_id = auth.sub)"
insert = "EXISTS (SELECT 1 FROM lists WHERE lists.id = list_id AND lists.owner = auth.sub)"
delete = "EXISTS (SELECT 1 FROM lists WHERE lists.id = list_id AND lists.owner = auth.sub)"

[tables.todos]
create = "CREATE TABLE todos (id TEXT PRIMARY KEY, list_id TEXT NOT NULL, owner TEXT NOT NULL, title TEXT NOT NULL DEFAULT '', done INTEGER NOT NULL DEFAULT 0)"
[tables.todos.rules]
read = "list_id IN (SELECT list_id FROM members WHERE user_id = auth.sub)"
insert = "owner = auth.sub AND list_id IN (SELECT list_id FROM members WHERE user_id = auth.sub)"
update = "list_id IN (SELECT list_id FROM members WHERE user_id = auth.sub)"
delete = "owner = auth.sub"

[tables.tasks.rules]
read = "list IN (SELECT list_id FROM members WHERE user_id = auth.sub)"
insert = "true"
update = "true"
delete = "true"
"#;

/// The schema of a run under `[auth]`: [`super::SCHEMA`] without its manual
/// column (not available under `[auth]`), the shared lists, and rules.
pub(super) fn schema_text() -> String {
    let mut s = super::SCHEMA.replace(", price = \"manual\"", "");
    assert!(!s.contains("manual"), "the manual column is left in");
    s.push_str(AUTH_SCHEMA);
    for table in OPEN_TABLES {
        let _ = write!(
            s,
            "\n[tables.{table}.rules]\nread = \"true\"\ninsert = \"true\"\nupdate = \"true\"\ndelete = \"true\"\n"
        );
    }
    s
}

/// A user as a verified token would make it: `sub` and no other claim.
pub(super) fn principal(sub: &str) -> Arc<Principal> {
    Arc::new(Principal {
        sub: sub.to_string(),
        claims: BTreeMap::from([("sub".to_string(), Value::Text(sub.to_string()))]),
        lists: BTreeMap::new(),
    })
}

/// The server's rows of the [`RULED`] tables at one log position, by key
/// (its debug form).
#[derive(Clone, Debug, Default, PartialEq)]
pub(super) struct Ruled {
    tables: [BTreeMap<String, Vec<Value>>; 4],
}

impl Ruled {
    /// The lists `user` is a member of.
    fn lists_of(&self, user: &str) -> BTreeSet<String> {
        self.tables[MEMBERS_T]
            .values()
            .filter(|m| m[2] == Value::Text(user.to_string()))
            .filter_map(|m| match &m[1] {
                Value::Text(l) => Some(l.clone()),
                _ => None,
            })
            .collect()
    }

    /// Whether `user` may read this row of `RULED[t]`: its list is one the
    /// user is a member of (every read rule here says that).
    fn readable(&self, user: &str, t: usize, row: &[Value]) -> bool {
        match &row[RULED[t].1] {
            Value::Text(list) => self.lists_of(user).contains(list),
            _ => false,
        }
    }

    /// Applies one merged change of a log entry, as a device applies it.
    fn apply(
        &mut self,
        t: usize,
        columns: &[String],
        defaults: &[Value],
        c: &RowChange,
    ) -> Result<(), String> {
        let key = pk_key(&c.pk);
        let rows = &mut self.tables[t];
        match &c.op {
            RowOp::Delete => {
                rows.remove(&key);
            }
            RowOp::Evict => return Err(format!("the log holds an eviction: {c:?}")),
            RowOp::Upsert {
                insert,
                columns: set,
            } => {
                if !rows.contains_key(&key) {
                    if !insert {
                        return Ok(()); // An update of a row that is gone.
                    }
                    let mut row = defaults.to_vec();
                    row[0] = c.pk.clone();
                    rows.insert(key.clone(), row);
                }
                let row = rows.get_mut(&key).expect("just made");
                for (name, op) in set {
                    let ColumnOp::Set(v) = op else {
                        return Err(format!(
                            "{}: a merge op on an LWW column: {c:?}",
                            RULED[t].0
                        ));
                    };
                    let i = columns
                        .iter()
                        .position(|n| n == name)
                        .ok_or_else(|| format!("{}: no column {name}", RULED[t].0))?;
                    row[i] = v.clone();
                }
            }
        }
        Ok(())
    }
}

/// What a run under `[auth]` keeps besides the world's state.
pub(super) struct Auth {
    /// The users of this run (a prefix of [`USERS`]).
    pub users: Vec<&'static str>,
    pub rogue: Arc<Principal>,
    /// Per log position (index 0: the empty store), the ruled tables' rows
    /// after it.
    pub history: Vec<Rc<Ruled>>,
    /// Column names of each [`RULED`] table.
    columns: Vec<Vec<String>>,
    /// Per device (None: the hostile one), the rows of the ruled tables
    /// frames have carried to it: the only keys a load's `last` may name.
    sent: HashMap<Option<usize>, HashSet<(usize, String)>>,
    /// Each column's default (what a new row has where an insert names
    /// no value: the hostile device's rows).
    defaults: Vec<Vec<Value>>,
}

impl Auth {
    pub(super) fn new(users: Vec<&'static str>, conn: &Connection) -> Result<Auth, String> {
        let mut columns = Vec::new();
        let mut defaults = Vec::new();
        for (table, _) in RULED {
            let info: Vec<(String, Option<String>)> = conn
                .prepare(&format!("PRAGMA table_info(\"{table}\")"))
                .and_then(|mut stmt| {
                    stmt.query_map([], |r| Ok((r.get(1)?, r.get(4)?)))?
                        .collect::<rusqlite::Result<_>>()
                })
                .map_err(sql_err("columns"))?;
            let mut values = Vec::new();
            for (_, default) in &info {
                values.push(match default {
                    None => Value::Null,
                    Some(expr) => conn
                        .query_row(&format!("SELECT {expr}"), [], |r| r.get(0))
                        .map_err(sql_err("default"))?,
                });
            }
            columns.push(info.into_iter().map(|(name, _)| name).collect());
            defaults.push(values);
        }
        Ok(Auth {
            users,
            rogue: principal(ROGUE_USER),
            history: vec![Rc::new(Ruled::default())],
            columns,
            defaults,
            sent: HashMap::new(),
        })
    }

    /// The ruled tables as the store holds them, by plain SQL.
    fn read_store(conn: &Connection) -> Result<Ruled, String> {
        let mut out = Ruled::default();
        for (t, (table, _)) in RULED.iter().enumerate() {
            for row in table_rows(conn, table, "id")? {
                out.tables[t].insert(pk_key(&row[0]), row);
            }
        }
        Ok(out)
    }
}

/// Whether `user` may write: the write rules of [`AUTH_SCHEMA`] restated
/// over the model. `row` is the row the rule reads (as it was or as
/// written), `after` the store with the whole mutation merged (what the
/// rules' lookups read). None: the table has no rule for the action.
fn allowed(table: &str, action: &str, row: &[Value], after: &Ruled, user: &str) -> Option<bool> {
    let me = Value::Text(user.to_string());
    let member = |list: &Value| match list {
        Value::Text(l) => after.lists_of(user).contains(l),
        _ => false,
    };
    Some(match (table, action) {
        ("lists", _) => row[1] == me,
        ("members", "insert" | "delete") => after.tables[LISTS_T]
            .values()
            .any(|l| l[0] == row[1] && l[1] == me),
        ("members", _) => return None,
        ("todos", "insert") => row[2] == me && member(&row[1]),
        ("todos", "update") => member(&row[1]),
        ("todos", _) => row[2] == me,
        _ => true,
    })
}

impl World {
    /// The user a link's device acts for.
    fn link_user(&self, id: u64) -> Option<Arc<Principal>> {
        let auth = self.auth.as_ref()?;
        let link = self.links.get(&id)?;
        Some(match link.device {
            Some(d) => self.devices[d].user.clone().expect("a user per device"),
            None => auth.rogue.clone(),
        })
    }

    /// After a Hello, as the server does before it greets: the device's
    /// client id bound to its user, and the link given what the user could
    /// read at the device's cursor.
    /// Returns the digest of the user's read rules and claims.
    pub(super) fn auth_bind(&mut self, id: u64, hello: &Hello) -> Result<Option<u64>, String> {
        let Some(who) = self.link_user(id) else {
            return Ok(None);
        };
        let digest = hearth_engine::server::access_digest(&self.schema, Some(&who));
        match self
            .server
            .bind_device(hello.client_id, &who.sub)
            .map_err(|e| format!("bind_device: {e}"))?
        {
            Ok(()) => Ok(Some(digest)),
            Err(owner) => Err(format!(
                "client id {} of link {id} ({}) is bound to user {owner}",
                hello.client_id, who.sub
            )),
        }
    }

    /// The link's access, read as the server reads it (after the greeting,
    /// before the Welcome's messages are taken).
    pub(super) fn auth_access(
        &mut self,
        id: u64,
        hello: &Hello,
        digest: u64,
    ) -> Result<(), String> {
        let Some(who) = self.link_user(id) else {
            return Ok(());
        };
        let conn = self.server.connection();
        let floor =
            hearth_engine::server::log_floor(conn).map_err(|e| format!("log_floor: {e}"))?;
        let (access, at_cursor) = hearth_engine::server::read_access(
            conn,
            &self.schema,
            who.clone(),
            hello.cursor.max(floor),
        )
        .map_err(|e| format!("read_access: {e}"))?;
        let changed = hello.reloaded.access != digest;
        let owed = at_cursor && hello.reloaded.cursor < hello.cursor;
        if let Some(link) = self.links.get_mut(&id) {
            link.conn
                .set_access(access, digest, hello.reloaded, at_cursor);
        }
        self.trace(format!(
            "server: link {id} acts for {}{}",
            who.sub,
            match (hello.cursor > 0, changed, owed) {
                (false, _, _) | (true, false, false) => "",
                (true, true, _) => " (a device new to its user or rules: re-loads)",
                (true, false, true) => " (the entry at its cursor changed its access and the Reload after it was lost: re-loads)",
            }
        ));
        Ok(())
    }

    /// Tells the core who each mutation of the batch acts for, as the store
    /// does with each connection's principal; returns them.
    pub(super) fn auth_principals(
        &mut self,
        batch: &[(u64, Mutation)],
        origins: &[u64],
    ) -> Result<Vec<Arc<Principal>>, String> {
        let Some(auth) = &self.auth else {
            return Ok(Vec::new());
        };
        let mut out = Vec::with_capacity(batch.len());
        for ((client_id, m), origin) in batch.iter().zip(origins) {
            let who = match self.link_user(*origin) {
                Some(who) => who,
                // The rows of `cards` made at the start.
                None if *client_id == ROGUE_ID => auth.rogue.clone(),
                None => {
                    return Err(format!(
                        "mutation {client_id}#{} comes from link {origin}, which has no user",
                        m.seq
                    ))
                }
            };
            if let Some(link) = self.links.get(origin) {
                let told = link.conn.principal().map(|p| p.sub.clone());
                if told.as_deref() != Some(who.sub.as_str()) {
                    return Err(format!(
                        "link {origin} acts for {told:?}, but its device is {}'s",
                        who.sub
                    ));
                }
            }
            self.server.set_principal(*client_id, who.clone());
            out.push(who);
        }
        Ok(out)
    }

    /// After a batch: the model moved over each applied entry, each applied
    /// mutation checked against the write rules, each `FORBIDDEN` against
    /// the tables it wrote, and the model compared with the store.
    pub(super) fn auth_applied(
        &mut self,
        batch: &[(u64, Mutation)],
        outcomes: &[Outcome],
        users: &[Arc<Principal>],
    ) -> Result<(), String> {
        let Some(auth) = &mut self.auth else {
            return Ok(());
        };
        let mut forbidden = 0;
        for (i, outcome) in outcomes.iter().enumerate() {
            let m = &batch[i].1;
            let user = &users[i].sub;
            match outcome {
                Outcome::Applied(entry) => {
                    let before = auth.history.last().expect("position 0").clone();
                    let mut after = (*before).clone();
                    let mut touched = false;
                    for c in &entry.changes {
                        if let Some(t) = RULED.iter().position(|(n, _)| *n == c.table) {
                            after.apply(t, &auth.columns[t], &auth.defaults[t], c)?;
                            touched = true;
                        }
                    }
                    let after = if touched {
                        Rc::new(after)
                    } else {
                        before.clone()
                    };
                    for c in &m.changes {
                        let Some(t) = RULED.iter().position(|(n, _)| *n == c.table) else {
                            continue;
                        };
                        let key = pk_key(&c.pk);
                        let was = before.tables[t].get(&key);
                        let now = after.tables[t].get(&key);
                        let checks: Vec<(&str, &Vec<Value>, &str)> = match (&c.op, was, now) {
                            (RowOp::Delete, Some(was), _) => vec![("delete", was, "as it was")],
                            (RowOp::Upsert { .. }, None, Some(now)) => {
                                vec![("insert", now, "as written")]
                            }
                            (RowOp::Upsert { .. }, Some(was), Some(now)) => {
                                vec![("update", was, "as it was"), ("update", now, "as written")]
                            }
                            _ => Vec::new(),
                        };
                        for (action, row, side) in checks {
                            if allowed(&c.table, action, row, &after, user) != Some(true) {
                                return Err(format!(
                                    "mutation {}#{} of {user} was applied as {}, but its {action} of {}/{key} breaks the write rule for the row {side} {row:?} (the lists {user} was a member of after it: {:?})",
                                    batch[i].0,
                                    m.seq,
                                    entry.server_seq,
                                    c.table,
                                    after.lists_of(user)
                                ));
                            }
                        }
                    }
                    auth.history.push(after);
                    if auth.history.len() as u64 != entry.server_seq + 1 {
                        return Err(format!(
                            "entry {} applied, but the model holds {} positions",
                            entry.server_seq,
                            auth.history.len() - 1
                        ));
                    }
                }
                Outcome::Rejected { code, reason, .. } if code == "FORBIDDEN" => {
                    forbidden += 1;
                    if !m
                        .changes
                        .iter()
                        .any(|c| GUARDED.contains(&c.table.as_str()))
                    {
                        return Err(format!(
                            "mutation {}#{} of {user} was refused FORBIDDEN ({reason}), but it writes only tables every user may write: {:?}",
                            batch[i].0, m.seq, m.changes
                        ));
                    }
                }
                _ => {}
            }
        }
        let store = Auth::read_store(self.server.connection())?;
        let auth = self.auth.as_ref().expect("checked");
        let model = auth.history.last().expect("position 0");
        if **model != store {
            return Err(format!(
                "replaying the log's entries gives other rows than the store holds at {}:\nreplayed {model:?}\nstore    {store:?}",
                auth.history.len() - 1
            ));
        }
        self.stats.forbidden += forbidden;
        Ok(())
    }

    /// The property checked on every frame the server sends: each row it
    /// carries is one the device's user could read at the frame's position,
    /// with the values the server had there.
    pub(super) fn auth_frame(&mut self, id: u64, msg: &ServerMsg) -> Result<(), String> {
        let Some(auth) = &self.auth else {
            return Ok(());
        };
        let Some(who) = self.link_user(id) else {
            return Ok(());
        };
        let device = self.links[&id].device;
        let name = match device {
            Some(d) => self.devices[d].name.clone(),
            None => "the hostile device".to_string(),
        };
        let rows: Vec<(u64, &RowChange)> = match msg {
            ServerMsg::Changes { entries, .. } => entries
                .iter()
                .flat_map(|e| e.changes.iter().map(move |c| (e.server_seq, c)))
                .collect(),
            ServerMsg::Rows { cursor, rows, .. } => rows.iter().map(|c| (*cursor, c)).collect(),
            ServerMsg::Reload { tables, .. } => {
                // One with no tables only records the access digest.
                if !tables.is_empty() {
                    self.stats.reloads += 1;
                }
                return Ok(());
            }
            _ => return Ok(()),
        };
        let mut checked = 0;
        let mut carried = Vec::new();
        for (at, c) in rows {
            let RowOp::Upsert { columns, .. } = &c.op else {
                continue;
            };
            let Some(t) = RULED.iter().position(|(n, _)| *n == c.table) else {
                continue;
            };
            let state = auth
                .history
                .get(at as usize)
                .ok_or_else(|| format!("a frame to {name} at {at}, past the log"))?;
            let key = pk_key(&c.pk);
            let what = match msg {
                ServerMsg::Rows { .. } => "a load chunk",
                _ => "an entry",
            };
            let Some(row) = state.tables[t].get(&key) else {
                return Err(format!(
                    "{name} ({}) was sent {}/{key} in {what} at {at}, but the server had no such row then: {c:?}",
                    who.sub, c.table
                ));
            };
            if !state.readable(&who.sub, t, row) {
                return Err(format!(
                    "{name} was sent {}/{key} in {what} at {at}, but its user {} could not read it then: the row was {row:?}, {} was a member of {:?}",
                    c.table,
                    who.sub,
                    who.sub,
                    state.lists_of(&who.sub)
                ));
            }
            for (col, op) in columns {
                let ColumnOp::Set(v) = op else { continue };
                let i = auth.columns[t].iter().position(|n| n == col);
                if i.is_none_or(|i| row[i] != *v) {
                    return Err(format!(
                        "{name} was sent {}/{key}.{col} = {v:?} in {what} at {at}, but the server then had the row {row:?}",
                        c.table
                    ));
                }
            }
            checked += 1;
            carried.push((t, key));
        }
        self.stats.rows_checked += checked;
        let sent = self
            .auth
            .as_mut()
            .expect("checked")
            .sent
            .entry(device)
            .or_default();
        sent.extend(carried);
        // A load under a read rule names no row the user may not read: the
        // key its progress stops at is one of a row the device was sent.
        if let ServerMsg::Rows {
            id: sub,
            last: Some(last),
            ..
        } = msg
        {
            let table = self.links[&id]
                .conn
                .subscriptions()
                .find(|s| s.id == *sub)
                .and_then(
                    |s| match hearth_engine::protocol::whole_table_of(&s.stream) {
                        Some(t) => Some(t.to_string()),
                        None => self
                            .schema
                            .streams
                            .get(&s.stream)
                            .map(|st| st.table.clone()),
                    },
                );
            let t = table.and_then(|table| RULED.iter().position(|(n, _)| *n == table));
            if let Some(t) = t {
                let key = pk_key(last);
                let sent = &self.auth.as_ref().expect("checked").sent[&device];
                if !sent.contains(&(t, key.clone())) {
                    return Err(format!(
                        "{name} was told a load of {} reached {key}, a row it was never sent",
                        RULED[t].0
                    ));
                }
            }
        }
        Ok(())
    }

    /// A write to the shared lists, as the device's user: lists made (with
    /// the maker's membership, sometimes a todo, in one mutation), shared
    /// and unshared, todos made, moved between lists, edited and deleted;
    /// some break a rule (another user's list, a forged owner, a todo of
    /// another user deleted, a member leaving a list they do not own).
    pub(super) fn auth_work(&mut self, d: usize) -> Work {
        let me = self.devices[d].user.as_ref().expect("a user").sub.clone();
        let users = self.auth.as_ref().expect("auth").users.clone();
        let other = self.pick(&users).to_string();
        let list = self.pick(&LISTS).to_string();
        let todo = Value::Text(format!("T{}", self.rng.gen_range(0..8)));
        let title = Value::Text(format!(
            "{}-{}",
            self.devices[d].name,
            self.rng.gen_range(0..100)
        ));
        let plain = |sql: String, params: Vec<Value>| Work {
            sql,
            params,
            must_fail: false,
            counted_update: None,
            fail_names: "UTF-8",
            call: policies::Call::Exec,
            deltas: Vec::new(),
            policy: false,
        };
        let q = |s: &str| quote(&Value::Text(s.to_string()));
        let member_row = |l: &str, u: &str| {
            format!(
                "INSERT OR IGNORE INTO members (id, list_id, user_id) VALUES ({}, {}, {})",
                q(&format!("{l}:{u}")),
                q(l),
                q(u)
            )
        };
        match self.rng.gen_range(0..20) {
            0..=2 => {
                // A list and its maker's membership (and a todo in it).
                let verb = self.pick(&["INSERT", "INSERT OR IGNORE"]);
                let mut sql = vec![
                    format!(
                        "{verb} INTO lists (id, owner, title) VALUES ({}, {}, {})",
                        q(&list),
                        q(&me),
                        quote(&title)
                    ),
                    member_row(&list, &me),
                ];
                if self.rng.gen_bool(0.4) {
                    sql.push(format!(
                        "INSERT OR REPLACE INTO todos (id, list_id, owner, title) VALUES ({}, {}, {}, 'first')",
                        quote(&todo),
                        q(&list),
                        q(&me)
                    ));
                }
                plain(sql.join("; "), Vec::new())
            }
            3..=5 => plain(member_row(&list, &other), Vec::new()),
            6..=7 => plain(
                "DELETE FROM members WHERE id = ?1".into(),
                vec![Value::Text(format!("{list}:{other}"))],
            ),
            8 => plain(
                "DELETE FROM members WHERE list_id = ?1 AND user_id = ?2".into(),
                vec![Value::Text(list), Value::Text(me)],
            ),
            9..=11 => {
                // Mostly its own todo; sometimes one forged for another user.
                let owner = if self.rng.gen_bool(0.85) { me } else { other };
                plain(
                    "INSERT OR REPLACE INTO todos (id, list_id, owner, title, done) VALUES (?1, ?2, ?3, ?4, 0)".into(),
                    vec![todo, Value::Text(list), Value::Text(owner), title],
                )
            }
            12..=14 => plain(
                "UPDATE todos SET list_id = ?1 WHERE id = ?2".into(),
                vec![Value::Text(list), todo],
            ),
            15 => plain(
                "UPDATE todos SET done = 1 - done, title = ?1 WHERE list_id = ?2".into(),
                vec![title, Value::Text(list)],
            ),
            16..=17 => plain("DELETE FROM todos WHERE id = ?1".into(), vec![todo]),
            18 => plain(
                "UPDATE lists SET title = ?1 WHERE id = ?2".into(),
                vec![title, Value::Text(list)],
            ),
            _ => plain(
                "DELETE FROM lists WHERE id = ?1".into(),
                vec![Value::Text(list)],
            ),
        }
    }

    /// A change of the hostile device to the shared lists. Its own list `e`
    /// (made, shared with users, given todos) may pass; `bad` ones never do:
    /// a todo forged for another user, a membership in a list it never owns.
    pub(super) fn auth_rogue_change(&mut self, bad: bool) -> RowChange {
        let users = self.auth.as_ref().expect("auth").users.clone();
        let user = self.pick(&users).to_string();
        let set = |cols: Vec<(&str, &str)>| -> Vec<(String, ColumnOp)> {
            cols.into_iter()
                .map(|(c, v)| (c.to_string(), ColumnOp::Set(Value::Text(v.to_string()))))
                .collect()
        };
        let upsert = |table: &str, pk: String, columns: Vec<(String, ColumnOp)>| RowChange {
            table: table.into(),
            pk: Value::Text(pk),
            op: RowOp::Upsert {
                insert: true,
                columns,
            },
        };
        if bad {
            let list = self.pick(&LISTS[..4]).to_string();
            return if self.rng.gen_bool(0.5) {
                let id = format!("R{}", self.rng.gen_range(0..4));
                upsert(
                    "todos",
                    id,
                    set(vec![
                        ("list_id", list.as_str()),
                        ("owner", user.as_str()),
                        ("title", "forged"),
                    ]),
                )
            } else {
                upsert(
                    "members",
                    format!("{list}:{ROGUE_USER}"),
                    set(vec![("list_id", list.as_str()), ("user_id", ROGUE_USER)]),
                )
            };
        }
        match self.rng.gen_range(0..4) {
            0 => upsert(
                "lists",
                "e".into(),
                set(vec![("owner", ROGUE_USER), ("title", "eve's")]),
            ),
            1 => {
                let who = if self.rng.gen_bool(0.5) {
                    ROGUE_USER
                } else {
                    user.as_str()
                };
                upsert(
                    "members",
                    format!("e:{who}"),
                    set(vec![("list_id", "e"), ("user_id", who)]),
                )
            }
            2 => RowChange {
                table: "members".into(),
                pk: Value::Text(format!("e:{user}")),
                op: RowOp::Delete,
            },
            _ => {
                let id = format!("E{}", self.rng.gen_range(0..3));
                upsert(
                    "todos",
                    id,
                    set(vec![
                        ("list_id", "e"),
                        ("owner", ROGUE_USER),
                        ("title", "from eve"),
                    ]),
                )
            }
        }
    }
}

/// At quiescence each device holds exactly the rows of the shared lists its
/// user may read, by plain SQL on the server's store; every re-load is done
/// and no row is left marked stale.
pub(super) fn permissions_hold_exactly(w: &World) -> Result<(), String> {
    if w.auth.is_none() {
        return Ok(());
    }
    for dev in &w.devices {
        let user = &dev.user.as_ref().expect("a user").sub;
        let conn = dev.client.connection();
        for (table, col) in [
            ("lists", "id"),
            ("members", "list_id"),
            ("todos", "list_id"),
        ] {
            let sql = format!(
                "SELECT * FROM {table} WHERE {col} IN (SELECT list_id FROM members WHERE user_id = ?1) ORDER BY id"
            );
            let mut stmt = w
                .server
                .connection()
                .prepare(&sql)
                .map_err(sql_err(table))?;
            let width = stmt.column_count();
            let want = stmt
                .query_map([user], |r| {
                    (0..width).map(|i| r.get::<_, Value>(i)).collect()
                })
                .map_err(sql_err(table))?
                .collect::<Result<Vec<Vec<Value>>, _>>()
                .map_err(sql_err(table))?;
            let have = table_rows(conn, table, "id")?;
            if have != want {
                return Err(format!(
                    "{} ({user}) holds {table} {have:?}\nbut {user} may read {want:?}",
                    dev.name
                ));
            }
        }
        let loading: Vec<String> = conn
            .prepare("SELECT stream, load FROM _hearth_subscriptions")
            .and_then(|mut stmt| {
                stmt.query_map([], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()
            })
            .map_err(sql_err("subscriptions"))?
            .into_iter()
            .filter(|(_, load)| postcard::from_bytes::<Load>(load).ok() != Some(Load::Done))
            .map(|(stream, _)| stream)
            .collect();
        if !loading.is_empty() {
            return Err(format!(
                "{} is quiet with loads under way: {loading:?}",
                dev.name
            ));
        }
        let stale: i64 = conn
            .query_row("SELECT count(*) FROM _hearth_stale", [], |r| r.get(0))
            .map_err(sql_err("stale"))?;
        if stale != 0 {
            return Err(format!(
                "{} is quiet with {stale} rows still marked stale",
                dev.name
            ));
        }
    }
    Ok(())
}

/// The condition `tasks` rows must meet to be on a device of `user` (for
/// [`super::subscriptions_hold_exactly`]).
pub(super) fn tasks_readable(w: &World, device: usize) -> Option<String> {
    w.auth.as_ref()?;
    let user = &w.devices[device].user.as_ref()?.sub;
    Some(format!(
        "list IN (SELECT list_id FROM members WHERE user_id = {})",
        quote(&Value::Text(user.clone()))
    ))
}

/// Picks the users of a run and each device's.
pub(super) fn pick_users(rng: &mut impl Rng, devices: usize) -> (Vec<&'static str>, Vec<usize>) {
    let n = rng.gen_range(2..=USERS.len());
    let users = USERS[..n].to_vec();
    let mut of: Vec<usize> = (0..devices).map(|_| rng.gen_range(0..n)).collect();
    // Every user has a device.
    let mut slots: Vec<usize> = (0..devices).collect();
    slots.shuffle(rng);
    for (u, &d) in (0..n).zip(&slots) {
        of[d] = u;
    }
    (users, of)
}
