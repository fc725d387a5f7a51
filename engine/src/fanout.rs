//! Which connections a log entry concerns, so a server wakes only those:
//! the index behind "a change costs O(matching subscriptions), not
//! O(connections)".
//!
//! [`Fanout`] keeps every connection's client id and subscriptions. For
//! an entry, [`Fanout::concerned`] says [`Concerned::Everyone`] when it
//! changes a table no stream names (such tables go whole to every device)
//! or changes nothing (it goes to every device as it is), and otherwise lists the connections that may get something of it: its
//! author (who gets the acknowledgement), and every connection with a
//! subscription that may hold one of the entry's row images before or after
//! the change. A stream whose condition has an indexable key (`col = :p`,
//! see [`Filter::key`]) is looked up by the image's value of `col`; other
//! streams list their subscribers by table, who are all concerned by any
//! change to it.
//!
//! The answer is a superset of what [`crate::link::Link`] sends: a
//! connection left out gets nothing of the entry and may pass over it with
//! [`crate::link::Link::skip_to`]. It ignores how far an initial load got
//! (a load under way holds fewer rows, never more).
//!
//! [`Heard`] is the other end, one per connection: the flags it took, the
//! head it took them at, and so how far it may pass over entries. It never
//! passes an entry the fan-out has not yet said it may (a later head
//! learned otherwise, say from a chunk of a load read ahead, is not enough).
//!
//! [`Filter::key`]: crate::filter::Filter::key

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use crate::change::LogEntry;
use crate::filter::Param;
use crate::protocol::Subscription;
use crate::schema::Schema;
use crate::value::Value;

/// Who an entry concerns.
#[derive(Debug, PartialEq)]
pub enum Concerned<C> {
    /// Every connection (it changes a table that syncs whole).
    Everyone,
    /// Only these (sorted, each once).
    Only(Vec<C>),
}

/// A value as an index key, with SQLite's `=`: numbers equal when their
/// values are (`1 = 1.0`, `0.0 = -0.0`), text and blobs bytewise.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Key {
    Int(i64),
    Real(u64),
    Text(String),
    Blob(Vec<u8>),
}

impl Key {
    /// None for NULL (and NaN), which equal nothing.
    fn of(v: &Value) -> Option<Key> {
        // 2^63 is exact in f64; reals in [-2^63, 2^63) with no fraction are
        // exactly some i64.
        const TWO_63: f64 = 9_223_372_036_854_775_808.0;
        Some(match v {
            Value::Null => return None,
            Value::Integer(i) => Key::Int(*i),
            Value::Real(r) if r.is_nan() => return None,
            Value::Real(r) if r.fract() == 0.0 && *r >= -TWO_63 && *r < TWO_63 => {
                Key::Int(*r as i64)
            }
            Value::Real(r) => Key::Real(r.to_bits()),
            Value::Text(t) => Key::Text(t.clone()),
            Value::Blob(b) => Key::Blob(b.clone()),
        })
    }
}

/// Where one subscription is filed.
#[derive(Clone, Debug)]
enum Filed {
    /// Under (stream, key value): a condition `col = :p` whose parameter
    /// had this value. None for a NULL parameter, which holds no row.
    Keyed(String, Option<Key>),
    /// Under its table: every change to it concerns the connection.
    Table(String),
}

struct Conn {
    client_id: u64,
    subs: BTreeMap<u64, Filed>,
}

/// The index of connections by what they subscribed to. `C` names a
/// connection (the driver's own id).
pub struct Fanout<C> {
    schema: Arc<Schema>,
    conns: BTreeMap<C, Conn>,
    by_client: HashMap<u64, BTreeSet<C>>,
    /// (stream, key) → connection → how many of its subscriptions.
    keyed: HashMap<(String, Key), BTreeMap<C, u32>>,
    /// table → connection → how many of its unkeyed subscriptions.
    by_table: HashMap<String, BTreeMap<C, u32>>,
    /// stream name → (its table, the key column's index), for the streams
    /// with an indexable key; built from the schema once.
    keys: HashMap<String, (String, usize)>,
}

fn bump<C: Ord>(map: &mut BTreeMap<C, u32>, c: C) {
    *map.entry(c).or_insert(0) += 1;
}

fn drop_one<C: Ord>(map: &mut BTreeMap<C, u32>, c: &C) {
    if let Some(n) = map.get_mut(c) {
        *n -= 1;
        if *n == 0 {
            map.remove(c);
        }
    }
}

impl<C: Ord + Copy> Fanout<C> {
    pub fn new(schema: Arc<Schema>) -> Fanout<C> {
        let keys = schema
            .streams
            .iter()
            .filter_map(|(name, s)| {
                s.filter
                    .key()
                    .map(|(col, _)| (name.clone(), (s.table.clone(), col)))
            })
            .collect();
        Fanout {
            schema,
            conns: BTreeMap::new(),
            by_client: HashMap::new(),
            keyed: HashMap::new(),
            by_table: HashMap::new(),
            keys,
        }
    }

    /// A connection whose device is `client_id`.
    pub fn connect(&mut self, c: C, client_id: u64) {
        self.disconnect(&c);
        self.conns.insert(
            c,
            Conn {
                client_id,
                subs: BTreeMap::new(),
            },
        );
        self.by_client.entry(client_id).or_default().insert(c);
    }

    /// A connection gone, with its subscriptions.
    pub fn disconnect(&mut self, c: &C) {
        let Some(conn) = self.conns.remove(c) else {
            return;
        };
        for filed in conn.subs.values() {
            self.unfile(c, filed);
        }
        if let Some(set) = self.by_client.get_mut(&conn.client_id) {
            set.remove(c);
            if set.is_empty() {
                self.by_client.remove(&conn.client_id);
            }
        }
    }

    /// A subscription a connection's link took (again, for the same id:
    /// it replaces the earlier one). Unknown connections and streams are
    /// ignored (the link refuses unknown streams).
    pub fn subscribe(&mut self, c: C, sub: &Subscription) {
        let schema = self.schema.clone();
        let Some(stream) = schema.streams.get(&sub.stream) else {
            return;
        };
        if !self.conns.contains_key(&c) {
            return;
        }
        self.unsubscribe(c, sub.id);
        let filed = match stream.filter.key() {
            Some((_, param)) => Filed::Keyed(
                sub.stream.clone(),
                match sub.params.get(param) {
                    Some(Param::One(v)) => Key::of(v),
                    _ => None,
                },
            ),
            None => Filed::Table(stream.table.clone()),
        };
        match &filed {
            Filed::Keyed(stream, Some(key)) => bump(
                self.keyed.entry((stream.clone(), key.clone())).or_default(),
                c,
            ),
            Filed::Keyed(_, None) => {}
            Filed::Table(table) => bump(self.by_table.entry(table.clone()).or_default(), c),
        }
        self.conns
            .get_mut(&c)
            .expect("checked")
            .subs
            .insert(sub.id, filed);
    }

    /// A subscription a connection dropped.
    pub fn unsubscribe(&mut self, c: C, id: u64) {
        let Some(filed) = self
            .conns
            .get_mut(&c)
            .and_then(|conn| conn.subs.remove(&id))
        else {
            return;
        };
        self.unfile(&c, &filed);
    }

    fn unfile(&mut self, c: &C, filed: &Filed) {
        match filed {
            Filed::Keyed(stream, Some(key)) => {
                let k = (stream.clone(), key.clone());
                if let Some(map) = self.keyed.get_mut(&k) {
                    drop_one(map, c);
                    if map.is_empty() {
                        self.keyed.remove(&k);
                    }
                }
            }
            Filed::Keyed(_, None) => {}
            Filed::Table(table) => {
                if let Some(map) = self.by_table.get_mut(table) {
                    drop_one(map, c);
                    if map.is_empty() {
                        self.by_table.remove(table);
                    }
                }
            }
        }
    }

    /// The connections an entry may concern (see the module doc).
    pub fn concerned(&self, entry: &LogEntry) -> Concerned<C> {
        // An entry with no changes (an empty mutation) goes to every device
        // as it is, like one to a whole table (see `Link::route`).
        if entry.changes.is_empty()
            || entry
                .changes
                .iter()
                .any(|ch| !self.schema.streamed(&ch.table) || self.schema.looked_up(&ch.table))
        {
            // A change to a table a read rule looks up may change what any
            // device may read: every link follows it.
            return Concerned::Everyone;
        }
        let mut out: BTreeSet<C> = self
            .by_client
            .get(&entry.client_id)
            .cloned()
            .unwrap_or_default();
        for image in &entry.images {
            let Some(change) = entry.changes.get(image.change as usize) else {
                continue;
            };
            if let Some(conns) = self.by_table.get(&change.table) {
                out.extend(conns.keys().copied());
            }
            for (stream, (table, col)) in &self.keys {
                if *table != change.table {
                    continue;
                }
                for row in [&image.before, &image.after].into_iter().flatten() {
                    let Some(key) = row.get(*col).and_then(Key::of) else {
                        continue;
                    };
                    // A lookup by reference would need a borrowed key type;
                    // the clone is one value per stream and image.
                    if let Some(conns) = self.keyed.get(&(stream.clone(), key)) {
                        out.extend(conns.keys().copied());
                    }
                }
            }
        }
        Concerned::Only(out.into_iter().collect())
    }

    /// How many connections it knows.
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }
}

/// What one connection has heard from the fan-out, and so which entries
/// after its cursor it may pass over without reading them
/// ([`crate::link::Link::skip_to`]).
///
/// The fan-out decides at publish time which connections an entry
/// concerns, and flags them ([`Fanout::concerned`]); a connection takes
/// its flags later, reading the published head first, so that every entry
/// up to that head that concerns it is among the flags it took. That head
/// is `heard_until`, and it is the one bound on passing over: a driver may
/// know the log goes further (a chunk of an initial load was read at a
/// later position, a read of the log returned later entries, the head was
/// looked at without taking the flags), but an entry past `heard_until` may
/// concern the connection in flags not yet taken, so it goes through the
/// link, never around it. (Passing over such entries up to a load chunk
/// read ahead lost the rows they inserted below the load's position: both
/// the live stream and the chunk, which starts after that position, missed
/// them.)
///
/// Entries up to `full_until` (published before the connection or one of
/// its subscriptions was registered, or flags past the mailbox's bound) are
/// not known to the flags at all: the link filters them too.
#[derive(Debug, Default)]
pub struct Heard {
    /// Every entry up to here that concerns the connection is in `ranges`
    /// or at most `full_until`.
    heard_until: u64,
    /// Flagged runs of entries (first, last), in order.
    ranges: VecDeque<(u64, u64)>,
    full_until: u64,
}

/// Most flagged runs a connection keeps; past it, it filters every entry up
/// to the last one itself.
pub const HEARD_RANGES_MAX: usize = 4_096;

impl Heard {
    /// A connection registered with the fan-out when the head was `head`:
    /// what was published before, the link filters itself.
    pub fn joined(head: u64) -> Heard {
        Heard {
            heard_until: head,
            ranges: VecDeque::new(),
            full_until: head,
        }
    }

    /// The connection took subscriptions when the head was `head`: entries
    /// up to it were flagged without them.
    pub fn subscribed(&mut self, head: u64) {
        self.full_until = self.full_until.max(head);
        self.heard_until = self.heard_until.max(head);
    }

    /// The flags the connection took (runs of entries it may get
    /// something of, and the mailbox's own `full_until`), having read the
    /// published head `head` before taking them.
    pub fn flagged(
        &mut self,
        head: u64,
        ranges: impl IntoIterator<Item = (u64, u64)>,
        full_until: u64,
    ) {
        self.heard_until = self.heard_until.max(head);
        self.full_until = self.full_until.max(full_until);
        self.ranges.extend(ranges);
        if self.ranges.len() > HEARD_RANGES_MAX {
            // Far behind: filter everything up to the last flag.
            let last = self.ranges.back().map_or(0, |r| r.1);
            self.full_until = self.full_until.max(last);
            self.ranges.clear();
        }
    }

    /// The head as of the flags taken last: every entry up to it that
    /// concerns the connection is known.
    pub fn heard_until(&self) -> u64 {
        self.heard_until
    }

    /// How far the entries after `cursor` may be passed over, the log
    /// being known to reach `head`: up to the returned position (at least
    /// `cursor + 1`), or None when the next entry goes through the link
    /// (it may concern the connection, or the fan-out has not said yet).
    pub fn passable(&mut self, cursor: u64, head: u64) -> Option<u64> {
        let next = cursor + 1;
        while self.ranges.front().is_some_and(|r| r.1 < next) {
            self.ranges.pop_front();
        }
        if next <= self.full_until || self.ranges.front().is_some_and(|r| r.0 <= next) {
            return None;
        }
        let to = self
            .ranges
            .front()
            .map_or(self.heard_until, |r| r.0 - 1)
            .min(self.heard_until)
            .min(head);
        (to >= next).then_some(to)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::{RowChange, RowImage, RowOp};
    use crate::hlc::Hlc;
    use crate::protocol::Load;

    const SCHEMA: &str = r#"
version = 1
[tables.todos]
create = "CREATE TABLE todos (id TEXT PRIMARY KEY, list_id TEXT, score REAL, done INTEGER NOT NULL DEFAULT 0)"
merge = "lww"
[tables.tags]
create = "CREATE TABLE tags (id TEXT PRIMARY KEY, name TEXT)"
merge = "lww"
[streams.by_list]
table = "todos"
where = "list_id = :list AND done = 0"
[streams.by_score]
table = "todos"
where = "score = :s"
[streams.open]
table = "todos"
where = "done = 0 OR list_id IN :lists"
"#;

    fn fanout() -> Fanout<u32> {
        Fanout::new(Arc::new(Schema::parse(SCHEMA).expect("schema")))
    }

    fn sub(id: u64, stream: &str, param: &str, v: Value) -> Subscription {
        Subscription {
            id,
            stream: stream.into(),
            params: [(param.to_string(), Param::One(v))].into(),
            load: Load::Done,
        }
    }

    /// An update of a todos row by device `client`: its list and score
    /// before (None: inserted) and after (None: deleted).
    fn todo(client: u64, before: Option<(&str, f64)>, after: Option<(&str, f64)>) -> LogEntry {
        let row = |r: Option<(&str, f64)>| {
            r.map(|(list, score)| {
                vec![
                    Value::Null,
                    Value::Text(list.into()),
                    Value::Real(score),
                    Value::Integer(0),
                ]
            })
        };
        LogEntry {
            server_seq: 1,
            client_id: client,
            client_seq: 1,
            hlc: Hlc(1),
            changes: vec![RowChange {
                table: "todos".into(),
                pk: Value::Text("t1".into()),
                op: RowOp::Delete,
            }],
            digest: 0,
            images: vec![RowImage {
                change: 0,
                before: row(before),
                after: row(after),
                whole: None,
            }],
        }
    }

    #[test]
    fn a_change_concerns_its_author_and_the_subscribers_before_and_after() {
        let mut f = fanout();
        for (c, list) in [(1, "a"), (2, "b"), (3, "c")] {
            f.connect(c, 100 + u64::from(c));
            f.subscribe(c, &sub(1, "by_list", "list", Value::Text(list.into())));
        }
        f.connect(4, 104);
        // Moved from list a to list b, by device 104, which subscribed to
        // neither: a loses it, b gains it, 104 gets its acknowledgement, c
        // nothing.
        assert_eq!(
            f.concerned(&todo(104, Some(("a", 0.0)), Some(("b", 0.0)))),
            Concerned::Only(vec![1, 2, 4])
        );
        assert_eq!(
            f.concerned(&todo(103, None, Some(("c", 0.0)))),
            Concerned::Only(vec![3])
        );
        f.unsubscribe(3, 1);
        assert_eq!(
            f.concerned(&todo(101, None, Some(("c", 0.0)))),
            Concerned::Only(vec![1])
        );
        f.disconnect(&1);
        assert_eq!(
            f.concerned(&todo(101, Some(("a", 0.0)), None)),
            Concerned::Only(vec![])
        );
    }

    #[test]
    fn numbers_are_keyed_by_sqlite_equality() {
        let mut f = fanout();
        f.connect(1, 11);
        f.subscribe(1, &sub(1, "by_score", "s", Value::Integer(3)));
        f.connect(2, 12);
        f.subscribe(2, &sub(1, "by_score", "s", Value::Real(-0.0)));
        f.connect(3, 13);
        f.subscribe(3, &sub(1, "by_score", "s", Value::Real(2.5)));
        f.connect(4, 14);
        f.subscribe(4, &sub(1, "by_score", "s", Value::Null));
        let at = |score| f.concerned(&todo(99, None, Some(("x", score))));
        assert_eq!(at(3.0), Concerned::Only(vec![1]));
        assert_eq!(at(0.0), Concerned::Only(vec![2]));
        assert_eq!(at(2.5), Concerned::Only(vec![3]));
        assert_eq!(at(2.0), Concerned::Only(vec![]));
        // 2^63 is no i64: no integer subscription equals it.
        assert_eq!(at(9_223_372_036_854_775_808.0), Concerned::Only(vec![]));
    }

    #[test]
    fn unkeyed_streams_and_whole_tables() {
        let mut f = fanout();
        f.connect(1, 11);
        f.subscribe(
            1,
            &Subscription {
                id: 7,
                stream: "open".into(),
                params: [("lists".to_string(), Param::Many(vec![]))].into(),
                load: Load::After(None),
            },
        );
        f.connect(2, 12);
        // An unkeyed stream's subscriber hears of every change to its table.
        assert_eq!(
            f.concerned(&todo(12, None, Some(("z", 1.0)))),
            Concerned::Only(vec![1, 2])
        );
        // A table no stream names goes to everyone.
        let mut tag = todo(12, None, None);
        tag.changes[0].table = "tags".into();
        tag.images.clear();
        assert_eq!(f.concerned(&tag), Concerned::Everyone);
        // So does an entry that changes nothing, which every device gets.
        let mut empty = todo(12, None, None);
        empty.changes.clear();
        empty.images.clear();
        assert_eq!(f.concerned(&empty), Concerned::Everyone);
        // Subscribing again under the same id replaces, and one unsubscribe
        // removes it.
        f.subscribe(1, &sub(7, "by_list", "list", Value::Text("q".into())));
        f.unsubscribe(1, 7);
        assert_eq!(
            f.concerned(&todo(12, None, Some(("q", 1.0)))),
            Concerned::Only(vec![2])
        );
        assert_eq!(f.len(), 2);
    }

    #[test]
    fn entries_are_passed_over_only_up_to_the_head_the_flags_were_taken_at() {
        // Joined at 10: entries up to it are filtered by the link.
        let mut heard = Heard::joined(10);
        assert_eq!(heard.passable(5, 10), None);
        // Flags taken at head 20: entry 15 concerns the connection.
        heard.flagged(20, [(15, 15)], 0);
        assert_eq!(heard.passable(10, 20), Some(14));
        assert_eq!(heard.passable(14, 20), None);
        assert_eq!(heard.passable(15, 20), Some(20));
        // The log is known to reach 30 (a chunk read there), but nothing
        // was heard past 20: entries 21.. go through the link.
        assert_eq!(heard.passable(20, 30), None);
        // Until the flags up to 30 are taken.
        heard.flagged(30, [(25, 26)], 0);
        assert_eq!(heard.passable(20, 30), Some(24));
        assert_eq!(heard.passable(26, 30), Some(30));
        // A subscription taken at 40: entries up to it are filtered.
        heard.subscribed(40);
        assert_eq!(heard.passable(30, 40), None);
        assert_eq!(heard.passable(40, 50), None);
        // Past the bound on runs, everything up to the last is filtered.
        let runs: Vec<(u64, u64)> = (0..=HEARD_RANGES_MAX as u64)
            .map(|i| (100 + 2 * i, 100 + 2 * i))
            .collect();
        let last = runs.last().expect("runs").1;
        heard.flagged(last + 10, runs, 0);
        assert_eq!(heard.passable(last - 1, last + 10), None);
        assert_eq!(heard.passable(last, last + 10), Some(last + 10));
    }
}
