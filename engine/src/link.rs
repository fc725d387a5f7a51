//! The server's side of one device connection, sans-io: what it sends,
//! filters or refuses.
//!
//! A [`Link`] takes the device's decoded messages, the log entries the
//! store commits and the chunks of initial loads the driver reads for it,
//! and gives back what to do: messages to send, mutations to apply, chunks
//! to read, or the end of the connection. The axum server, the simulator and
//! the engine's test harness all drive this same type, so the rules below
//! run under simulation exactly as they run in production.
//!
//! Selective sync. A table that no stream of the schema names goes whole to
//! every device. A change to a row of a streamed table goes to a device only
//! when one of its subscriptions holds the row before or after the change
//! (decided from the entry's [`RowImage`]s):
//! - held before and after: the change as it is;
//! - held after only (the row moved in): the row whole;
//! - held before only (moved out): [`RowOp::Evict`] (a real delete stays a
//!   delete);
//! - held by none: nothing, unless the device made the change itself, when
//!   its optimistic copy is evicted.
//!
//! A subscription whose initial load is under way holds only the rows up to
//! the last key loaded; the rest arrive in later chunks, each read at a log
//! position `as_of` and sent exactly when the device's cursor reaches it (no
//! entry after `as_of` goes out before it, and while a chunk is being read no
//! entry goes out at all). So a row is never lost between a chunk and the
//! live stream, nor brought back by a chunk older than what the device saw.
//! Entries a device receives nothing of still move its cursor: `Changes`
//! says the cursor explicitly, sent with the next frame, when the device
//! reaches the head for the first time on a connection, and at least every
//! [`CURSOR_LAG_MAX`] entries.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::change::{LogEntry, Mutation, RowChange, RowImage, RowOp};
use crate::filter::Param;
use crate::hlc::Hlc;
use crate::protocol::{whole_table_of, ClientMsg, Load, ServerMsg, Subscription};
use crate::rules::Principal;
use crate::schema::Schema;
use crate::server::{Hello, LoadChunk, LoadRead, DEVICE_REWOUND};
use crate::value::Value;

/// A device whose cursor lags the head by this many entries it received
/// nothing of is told its cursor anyway, so that a reconnect does not
/// re-filter them.
pub const CURSOR_LAG_MAX: u64 = 1_000;

/// The code of a subscription the server refuses: an unknown stream,
/// missing, unknown or mistyped parameters, parameters too large.
pub const BAD_SUBSCRIPTION: &str = "BAD_SUBSCRIPTION";
/// The code of the fatal error that closes a connection whose cursor fell
/// below what compaction left of the log (it was too far behind to be
/// served from memory): the device reconnects and re-loads.
pub const LOG_COMPACTED: &str = "LOG_COMPACTED";
/// The code of a subscription past the per-device bound.
pub const TOO_MANY_SUBSCRIPTIONS: &str = "TOO_MANY_SUBSCRIPTIONS";

/// The bounds a link enforces.
#[derive(Clone, Debug)]
pub struct LinkConfig {
    /// Largest mutation (encoded bytes) taken; larger ones are refused
    /// `TOO_LARGE`.
    pub mutation_bytes_max: usize,
    /// Most mutations in one push (`TOO_MANY_MUTATIONS`, fatal).
    pub push_mutations_max: usize,
    /// Most subscriptions per device (`TOO_MANY_SUBSCRIPTIONS`).
    pub subscriptions_max: usize,
    /// Most rows in one chunk of an initial load.
    pub load_rows_max: usize,
    /// About how many bytes of rows one chunk holds (at least one row).
    pub load_bytes_max: usize,
    /// Most bytes of entries in one `Changes` frame (at least one entry).
    pub chunk_bytes_max: usize,
}

impl Default for LinkConfig {
    fn default() -> Self {
        LinkConfig {
            mutation_bytes_max: 16 * 1024 * 1024,
            push_mutations_max: 4_096,
            subscriptions_max: 256,
            load_rows_max: 1_000,
            load_bytes_max: 1024 * 1024,
            chunk_bytes_max: 1024 * 1024,
        }
    }
}

/// What the driver does next.
#[derive(Debug, PartialEq)]
pub enum Step {
    /// Send this to the device.
    Send(ServerMsg),
    /// Apply these mutations of the device (in order) at the store and give
    /// each outcome's refusal to [`Link::on_refusal`].
    Apply(Vec<Mutation>),
    /// Tell the device why (`ServerMsg::Error`), then close.
    Close { code: String, message: String },
}

/// A fatal end of the handshake: the code and message of the `Error`.
#[derive(Debug, PartialEq)]
pub struct Refused {
    pub code: &'static str,
    pub message: String,
}

struct Sub {
    sub: Subscription,
    table: String,
    /// The key the device last heard its load reached (`Rows.last`). Under
    /// a read rule it is the last row sent, not the last row read: a row
    /// the user may not read is never named, not even by its key.
    told_last: Option<Value>,
}

impl Sub {
    fn new(sub: Subscription, table: String) -> Sub {
        let told_last = match &sub.load {
            Load::After(last) => last.clone(),
            Load::Done => None,
        };
        Sub {
            sub,
            table,
            told_last,
        }
    }
}

pub struct Link {
    schema: Arc<Schema>,
    config: LinkConfig,
    client_id: Option<u64>,
    /// The log position sent up to (the device's cursor once it has
    /// applied what was sent).
    cursor: u64,
    /// The last cursor the device was told (by an entry or explicitly).
    told: u64,
    /// Whether the last `Changes` this connection sent said the device
    /// caught up (a device takes any other as "not caught up": reaching the
    /// head again must be said, even through entries it gets nothing of).
    said_caught_up: bool,
    subs: BTreeMap<u64, Sub>,
    /// The subscription whose chunk the driver is reading.
    reading: Option<u64>,
    /// A chunk read ahead of the cursor, sent when the cursor reaches it.
    due: Option<LoadChunk>,
    /// Refusals of the Hello's subscriptions, sent after the Welcome.
    refused: Vec<ServerMsg>,
    /// The latest stamp of every entry up to the cursor (from the Welcome,
    /// then each entry processed, sent or not).
    hlc: Hlc,
    /// Subscriptions taken or dropped since the driver last asked.
    changed: Vec<SubEvent>,
    /// How many whole-table re-loads are under way (kept with `subs`, so
    /// routing asks no more than a number while there are none).
    reloads: usize,
    /// Under `[auth]`: who the device acts for and what its read rules'
    /// lookups yield for that user at the cursor.
    access: Option<Access>,
    /// Tables to re-load right after the Welcome (the user's access changed
    /// since the device last re-loaded).
    reload_at_welcome: Vec<String>,
    /// The digest of the read rules and the claims they read (0 without
    /// `[auth]`), which every `Reload` carries for the device to keep.
    access_digest: u64,
    /// Whether the device kept another digest: a `Reload` (with no tables,
    /// if nothing needs re-loading) follows the Welcome to record this one.
    tell_access: bool,
}

/// What a connection's user may read, kept at the link's cursor.
#[derive(Clone, Debug)]
pub struct Access {
    who: Arc<Principal>,
    /// Per (table with a read rule, lookup index): the looked-up rows that
    /// match for this user, by key (postcard bytes) → the selected value.
    grants: crate::rules::Grants,
    /// Per table with a read rule: its parameters (claims, lookup lists).
    params: BTreeMap<String, BTreeMap<String, Param>>,
}

impl Access {
    /// `grants` as [`crate::server::read_grants`] reads them at the
    /// link's cursor.
    pub fn new(schema: &Schema, who: Arc<Principal>, grants: crate::rules::Grants) -> Access {
        let mut access = Access {
            who,
            grants,
            params: BTreeMap::new(),
        };
        for table in schema.tables.keys() {
            access.rebuild(schema, table);
        }
        access
    }

    pub fn principal(&self) -> &Arc<Principal> {
        &self.who
    }

    fn rebuild(&mut self, schema: &Schema, table: &str) {
        let Some(rule) = schema.read_rule(table) else {
            return;
        };
        let mut params = rule.claim_params(&self.who);
        for i in 0..rule.lookups.len() {
            let mut values: Vec<Value> = Vec::new();
            for v in self
                .grants
                .get(&(table.to_string(), i))
                .into_iter()
                .flat_map(|g| g.values())
            {
                if !values.contains(v) {
                    values.push(v.clone());
                }
            }
            params.insert(crate::rules::ReadRule::lookup_param(i), Param::Many(values));
        }
        self.params.insert(table.to_string(), params);
    }

    /// Whether the user may read this row of `table` (`row` as a log image
    /// or the stored row: the columns the read rule reads are filled).
    pub fn readable(&self, schema: &Schema, table: &str, row: &[Value]) -> bool {
        if schema.readable_by_none(table) {
            return false;
        }
        match (schema.read_rule(table), self.params.get(table)) {
            (None, _) => true,
            (Some(rule), Some(params)) => rule.filter.matches(row, params),
            (Some(_), None) => false,
        }
    }

    /// The entry's changes to looked-up tables, applied to the grants: the
    /// tables whose readable rows changed.
    pub(crate) fn update(&mut self, schema: &Schema, entry: &LogEntry) -> Vec<String> {
        let mut changed = Vec::new();
        for image in &entry.images {
            let Some(change) = entry.changes.get(image.change as usize) else {
                continue;
            };
            if !schema.looked_up(&change.table) {
                continue;
            }
            for (table, rules) in &schema.rules {
                let Some(rule) = rules.read.as_ref() else {
                    continue;
                };
                let claims = rule.claim_params(&self.who);
                for (i, lookup) in rule.lookups.iter().enumerate() {
                    if lookup.table != change.table {
                        continue;
                    }
                    let matching = |row: &Option<Vec<Value>>| {
                        row.as_ref()
                            .filter(|r| lookup.filter.matches(r, &claims))
                            .map(|r| r[lookup.column].clone())
                    };
                    let was = matching(&image.before);
                    let now = matching(&image.after);
                    if was == now {
                        continue;
                    }
                    let key = postcard::to_allocvec(&change.pk).expect("encode a key");
                    let grants = self.grants.entry((table.clone(), i)).or_default();
                    let values_before: Vec<Value> = distinct(grants.values());
                    match now {
                        Some(v) => {
                            grants.insert(key, v);
                        }
                        None => {
                            grants.remove(&key);
                        }
                    }
                    let values_after: Vec<Value> = distinct(grants.values());
                    let same = values_before.len() == values_after.len()
                        && values_before.iter().all(|v| values_after.contains(v));
                    if !same && !changed.contains(table) {
                        changed.push(table.clone());
                    }
                }
            }
        }
        for table in &changed {
            self.rebuild(schema, table);
        }
        changed
    }
}

fn distinct<'a>(values: impl Iterator<Item = &'a Value>) -> Vec<Value> {
    let mut out: Vec<Value> = Vec::new();
    for v in values {
        if !out.contains(v) {
            out.push(v.clone());
        }
    }
    out
}

/// A change to a link's subscriptions, for the driver's [`Fanout`].
///
/// [`Fanout`]: crate::fanout::Fanout
#[derive(Clone, Debug, PartialEq)]
pub enum SubEvent {
    Taken(Subscription),
    Dropped(u64),
}

impl Link {
    pub fn new(schema: Arc<Schema>, config: LinkConfig) -> Link {
        Link {
            schema,
            config,
            client_id: None,
            cursor: 0,
            told: 0,
            said_caught_up: false,
            subs: BTreeMap::new(),
            reading: None,
            due: None,
            refused: Vec::new(),
            hlc: Hlc(0),
            changed: Vec::new(),
            reloads: 0,
            access: None,
            reload_at_welcome: Vec::new(),
            access_digest: 0,
            tell_access: false,
        }
    }

    /// Under `[auth]`, after the Hello and before the Welcome's messages
    /// are taken: who this device acts for and what its read rules' lookups
    /// yield at the cursor (`access`), the digest of the rules and claims
    /// it reads under (`digest`, [`crate::server::access_digest`]), what
    /// the device last re-loaded for (its Hello's `reloaded`), and whether
    /// the entry at the cursor changed its access (`at_cursor`, see
    /// [`crate::server::read_access`]). A device that holds something
    /// re-loads its filtered tables right after the Welcome when its digest
    /// differs, or when the entry at its cursor changed its access and the
    /// `Reload` after it never reached it (its connection ended between
    /// the two).
    pub fn set_access(
        &mut self,
        access: Access,
        digest: u64,
        reloaded: crate::protocol::Reloaded,
        at_cursor: bool,
    ) {
        self.access = Some(access);
        self.access_digest = digest;
        self.tell_access = reloaded.access != digest;
        let owed = at_cursor && reloaded.cursor < self.cursor;
        if self.cursor > 0 && self.tell_access {
            // Other claims or rules: every table, since one whose rule was
            // widened (to `"true"`, say) has no read rule any more but its
            // rows on the device were chosen by the old one.
            self.reload_at_welcome = self.schema.tables.keys().cloned().collect();
        } else if self.cursor > 0 && owed {
            // A lookup changed: the tables whose read rules look.
            self.reload_at_welcome = self
                .schema
                .tables
                .keys()
                .filter(|t| self.schema.read_rule(t).is_some())
                .cloned()
                .collect();
        }
    }

    /// The principal this link acts for, under `[auth]`.
    pub fn principal(&self) -> Option<&Arc<Principal>> {
        self.access.as_ref().map(|a| a.principal())
    }

    fn readable(&self, table: &str, row: &[Value]) -> bool {
        match &self.access {
            Some(access) => access.readable(&self.schema, table, row),
            // Without [auth] every row is readable; a link under [auth]
            // always has an access (the driver sets it at the Hello).
            None => !self.schema.authed(),
        }
    }

    /// What a chunk of an initial load keeps of the rows it reads.
    fn load_filter(&self, table: &str) -> crate::server::Readable {
        use crate::server::Readable;
        if !self.schema.authed() {
            return Readable::All;
        }
        if self.schema.readable_by_none(table) {
            return Readable::None;
        }
        match (
            self.schema.read_rule(table),
            self.access.as_ref().and_then(|a| a.params.get(table)),
        ) {
            (None, _) => Readable::All,
            (Some(rule), Some(params)) => Readable::Rule(rule.filter.clone(), params.clone()),
            (Some(_), None) => Readable::None,
        }
    }

    /// The user's read access to `tables` changed at the cursor: as the
    /// device does on the `Reload` sent here, their subscriptions load
    /// again from the first row and the whole ones load as `*TABLE`
    /// pseudo-subscriptions.
    fn reload_tables(&mut self, tables: &[String]) {
        for s in self.subs.values_mut() {
            if tables.contains(&s.table) {
                s.sub.load = Load::After(None);
                s.told_last = None;
            }
        }
        if self.due.as_ref().is_some_and(|c| {
            self.subs
                .get(&c.id)
                .is_none_or(|s| tables.contains(&s.table))
        }) {
            self.due = None;
        }
        for table in tables {
            if !self.schema.streamed(table) {
                let sub = crate::protocol::whole_table_load(table);
                self.subs.insert(sub.id, Sub::new(sub, table.clone()));
            }
        }
        self.recount_reloads();
    }

    /// The device's client id, once its Hello was taken.
    pub fn client_id(&self) -> Option<u64> {
        self.client_id
    }

    /// The log position this link has sent up to.
    pub fn cursor(&self) -> u64 {
        self.cursor
    }

    /// The device's subscriptions.
    pub fn subscriptions(&self) -> impl Iterator<Item = &Subscription> {
        self.subs.values().map(|s| &s.sub)
    }

    /// The first message of a connection, which must be `Hello`: what to
    /// greet the device with (see [`crate::server::greet`]). The Hello's
    /// subscriptions are taken; bad ones are refused after the Welcome.
    pub fn on_hello(&mut self, msg: ClientMsg) -> Result<Hello, Refused> {
        let hello = Hello::of(&msg).ok_or_else(|| Refused {
            code: "HANDSHAKE",
            message: "the first message must be Hello".into(),
        })?;
        let ClientMsg::Hello { subscriptions, .. } = msg else {
            unreachable!("Hello::of took it")
        };
        self.client_id = Some(hello.client_id);
        self.cursor = hello.cursor;
        self.told = hello.cursor;
        if !self.schema.authed() {
            // Without [auth] what a device holds changes only with the
            // schema's version: a device that synced under another version
            // re-loads every table once (under [auth], `set_access` does
            // this with the version in its digest), since the rows it
            // migrated itself may differ from the server's where it came
            // from several versions back. A device that took the new schema
            // but lost the `Reload` with its connection says so with its
            // record (`RELOAD_OWED`); one that never re-loaded (0) owes
            // nothing.
            let digest = crate::server::access_digest(&self.schema, None);
            self.access_digest = digest;
            let owed = hello.reloaded.access != 0 && hello.reloaded.access != digest;
            let other_version = hello
                .schema_version
                .is_some_and(|v| v != self.schema.version);
            if self.cursor > 0 && (owed || other_version) {
                self.tell_access = true;
                self.reload_at_welcome = self.schema.tables.keys().cloned().collect();
            }
        }
        for sub in subscriptions {
            if let Some(refusal) = self.subscribe(sub) {
                self.refused.push(refusal);
            }
        }
        Ok(hello)
    }

    /// After the driver's greeting (`Welcome`, or a fatal `Error`) for a
    /// server whose log is at `head`: everything to send.
    pub fn on_welcome(&mut self, welcome: ServerMsg, head: u64) -> Vec<ServerMsg> {
        let fatal = matches!(welcome, ServerMsg::Error { .. });
        let mut reload = std::mem::take(&mut self.reload_at_welcome);
        if let ServerMsg::Welcome { hlc, floor, .. } = &welcome {
            self.hlc = *hlc;
            if *floor > self.cursor {
                self.reload(*floor);
                // Every table loads again anyway.
                reload.clear();
            }
        }
        let mut out = vec![welcome];
        if fatal {
            return out;
        }
        out.append(&mut self.refused);
        if !reload.is_empty() || self.tell_access {
            self.reload_tables(&reload);
            out.push(ServerMsg::Reload {
                cursor: self.cursor,
                tables: reload,
                access: self.access_digest,
            });
        }
        if self.cursor >= head {
            out.push(self.caught_up_frame());
        }
        out
    }

    /// The device's cursor is below the log's floor (compaction removed
    /// what it had not seen): as the device does on the same Welcome, every
    /// subscription loads again from its first row, every whole table loads
    /// as a pseudo-subscription, and the cursor starts at the floor.
    fn reload(&mut self, floor: u64) {
        self.cursor = floor;
        self.told = floor;
        for s in self.subs.values_mut() {
            s.sub.load = Load::After(None);
            s.told_last = None;
        }
        self.due = None;
        for sub in crate::protocol::whole_table_loads(&self.schema) {
            let table = whole_table_of(&sub.stream)
                .expect("a whole-table stream")
                .to_string();
            self.subs.insert(sub.id, Sub::new(sub, table));
        }
        self.recount_reloads();
    }

    /// Whether a whole table's re-load is under way (its entries are then
    /// filtered by the keys loaded so far).
    pub fn reloading(&self) -> bool {
        self.reloads > 0
    }

    /// Counts the whole-table re-loads under way, after `subs` changed.
    fn recount_reloads(&mut self) {
        self.reloads = self
            .subs
            .values()
            .filter(|s| whole_table_of(&s.sub.stream).is_some() && s.sub.load != Load::Done)
            .count();
    }

    fn caught_up_frame(&mut self) -> ServerMsg {
        self.said_caught_up = true;
        self.told = self.cursor;
        ServerMsg::Changes {
            entries: Vec::new(),
            cursor: self.cursor,
            hlc: self.hlc,
            caught_up: true,
        }
    }

    /// A message after the handshake.
    pub fn on_message(&mut self, msg: ClientMsg) -> Vec<Step> {
        match msg {
            ClientMsg::Hello { .. } => vec![Step::Close {
                code: "HANDSHAKE".into(),
                message: "Hello sent twice on one connection".into(),
            }],
            ClientMsg::Push { mutations } => self.on_push(mutations),
            ClientMsg::Subscribe(sub) => self.subscribe(sub).map(Step::Send).into_iter().collect(),
            ClientMsg::Unsubscribe { id } => {
                if self.subs.remove(&id).is_some() {
                    self.recount_reloads();
                    self.changed.push(SubEvent::Dropped(id));
                }
                if self.due.as_ref().is_some_and(|c| c.id == id) {
                    self.due = None;
                }
                // A read under way for it is dropped when it comes back.
                // The answer follows every entry routed by the old
                // subscriptions (see `ServerMsg::Unsubscribed`).
                vec![Step::Send(ServerMsg::Unsubscribed { id })]
            }
            // Rooms are the server's ephemeral lane (`crate::rooms`), which
            // the driver routes before the link: nothing of them reaches
            // the log.
            ClientMsg::Join { .. }
            | ClientMsg::Leave { .. }
            | ClientMsg::Broadcast { .. }
            | ClientMsg::Heartbeat => Vec::new(),
        }
    }

    fn on_push(&mut self, mutations: Vec<Mutation>) -> Vec<Step> {
        if mutations.len() > self.config.push_mutations_max {
            return vec![Step::Close {
                code: "TOO_MANY_MUTATIONS".into(),
                message: format!(
                    "a push holds {} mutations; at most {} per push",
                    mutations.len(),
                    self.config.push_mutations_max
                ),
            }];
        }
        let max = self.config.mutation_bytes_max;
        let mut steps = Vec::new();
        let mut keep = Vec::with_capacity(mutations.len());
        for m in mutations {
            let size = postcard::experimental::serialized_size(&m).unwrap_or(usize::MAX);
            if size > max {
                steps.push(Step::Send(ServerMsg::Rejected {
                    client_seq: m.seq,
                    code: "TOO_LARGE".into(),
                    reason: format!(
                        "the mutation is {size} bytes; the server takes at most {max} \
                         (its effect must reach every device in one frame)"
                    ),
                }));
            } else {
                keep.push(m);
            }
        }
        if !keep.is_empty() {
            steps.push(Step::Apply(keep));
        }
        steps
    }

    /// The store refused (or found rewound) one of this device's mutations:
    /// the refusal is sent, and `DEVICE_REWOUND` ends the connection (the
    /// device comes back under a new client id).
    pub fn on_refusal(&mut self, msg: ServerMsg) -> Step {
        match msg {
            ServerMsg::Error { code, message } if code == DEVICE_REWOUND => {
                Step::Close { code, message }
            }
            other => Step::Send(other),
        }
    }

    /// Takes a subscription, or says why not.
    fn subscribe(&mut self, sub: Subscription) -> Option<ServerMsg> {
        let refuse = |code: &str, reason: String| {
            Some(ServerMsg::SubscriptionRefused {
                id: sub.id,
                code: code.to_string(),
                reason,
            })
        };
        if let Some(table) = whole_table_of(&sub.stream) {
            // A device re-loading a whole table after compaction: one per
            // table, under the number every device gives it, so they are
            // bounded by the schema's tables.
            let expected = crate::client::subscription_id(&sub.stream, &BTreeMap::new());
            if self.schema.table(table).is_none()
                || self.schema.streamed(table)
                || !sub.params.is_empty()
                || sub.id != expected
            {
                return refuse(
                    BAD_SUBSCRIPTION,
                    format!("'{}' names no table that syncs whole", sub.stream),
                );
            }
            let table = table.to_string();
            self.subs.insert(sub.id, Sub::new(sub, table));
            self.recount_reloads();
            return None;
        }
        let Some(stream) = self.schema.streams.get(&sub.stream) else {
            return refuse(
                BAD_SUBSCRIPTION,
                format!("the schema has no stream '{}'", sub.stream),
            );
        };
        if let Err(e) = stream.filter.check_params(&sub.params) {
            return refuse(BAD_SUBSCRIPTION, format!("stream '{}': {e}", sub.stream));
        }
        if let Load::After(Some(key)) = &sub.load {
            if !matches!(key, Value::Integer(_) | Value::Text(_)) {
                return refuse(
                    BAD_SUBSCRIPTION,
                    format!(
                        "stream '{}': a load cannot resume after {key:?}",
                        sub.stream
                    ),
                );
            }
        }
        let counted = self
            .subs
            .values()
            .filter(|s| whole_table_of(&s.sub.stream).is_none())
            .count();
        if !self.subs.contains_key(&sub.id) && counted >= self.config.subscriptions_max {
            return refuse(
                TOO_MANY_SUBSCRIPTIONS,
                format!(
                    "a device may hold at most {} subscriptions",
                    self.config.subscriptions_max
                ),
            );
        }
        if self.due.as_ref().is_some_and(|c| c.id == sub.id) {
            self.due = None;
        }
        let table = stream.table.clone();
        self.changed.push(SubEvent::Taken(sub.clone()));
        self.subs.insert(sub.id, Sub::new(sub, table));
        None
    }

    /// The subscriptions taken and dropped since the last call, in order.
    pub fn take_sub_events(&mut self) -> Vec<SubEvent> {
        std::mem::take(&mut self.changed)
    }

    /// The next chunk of an initial load to read, if one is to be read now
    /// (one at a time; none while a chunk waits for the cursor). While it is
    /// being read, no entries go out, so the chunk is never older than what
    /// the device has.
    pub fn next_read(&mut self) -> Option<LoadRead> {
        if self.reading.is_some() || self.due.is_some() || self.client_id.is_none() {
            return None;
        }
        let sub = self.subs.values().find_map(|s| match &s.sub.load {
            Load::After(after) => Some((&s.sub, after, &s.table)),
            Load::Done => None,
        })?;
        let read = LoadRead {
            id: sub.0.id,
            stream: sub.0.stream.clone(),
            params: sub.0.params.clone(),
            after: sub.1.clone(),
            rows_max: self.config.load_rows_max,
            bytes_max: self.config.load_bytes_max,
            readable: self.load_filter(sub.2),
        };
        self.reading = Some(read.id);
        Some(read)
    }

    /// A chunk the driver read for [`Link::next_read`], with the log head
    /// known now: what to send (the chunk, when the cursor is at its
    /// position; otherwise it waits for the entries up to it).
    pub fn on_read(&mut self, chunk: LoadChunk) -> Vec<ServerMsg> {
        self.reading = None;
        let current = self
            .subs
            .get(&chunk.id)
            .is_some_and(|s| matches!(s.sub.load, Load::After(_)));
        if !current || chunk.as_of < self.cursor {
            // Unsubscribed meanwhile, or (never, since entries wait while a
            // chunk is read) older than the device: read again.
            return Vec::new();
        }
        if chunk.as_of == self.cursor {
            return self.deliver(chunk).into_iter().collect();
        }
        self.due = Some(chunk);
        Vec::new()
    }

    /// A chunk at the cursor: the subscription's load moves on, and the
    /// device gets its rows. Under a read rule the device hears of the
    /// load's progress only through rows it may read: `last` is the last
    /// such row, and a chunk that brings none (and does not finish the
    /// load) is not sent at all, so neither keys nor counts of hidden rows
    /// leak.
    fn deliver(&mut self, chunk: LoadChunk) -> Option<ServerMsg> {
        let mut last = chunk.last.clone();
        if let Some(s) = self.subs.get_mut(&chunk.id) {
            s.sub.load = if chunk.done {
                Load::Done
            } else {
                Load::After(chunk.last.clone())
            };
            if self.schema.read_rule(&s.table).is_some() || self.schema.readable_by_none(&s.table) {
                if let Some(row) = chunk.rows.last() {
                    s.told_last = Some(row.pk.clone());
                }
                last = s.told_last.clone();
                if chunk.rows.is_empty() && !chunk.done {
                    return None;
                }
            } else {
                s.told_last = chunk.last.clone();
            }
            if chunk.done {
                self.recount_reloads();
            }
        }
        self.told = self.cursor;
        Some(ServerMsg::Rows {
            id: chunk.id,
            cursor: chunk.as_of,
            hlc: self.hlc,
            rows: chunk.rows,
            last,
            done: chunk.done,
        })
    }

    /// The log position of a chunk read ahead and waiting for the cursor,
    /// if any (the driver must learn of the entries up to it).
    pub fn due_at(&self) -> Option<u64> {
        self.due.as_ref().map(|c| c.as_of)
    }

    /// Whether entries after the cursor may go out now, with the log at
    /// `head`.
    pub fn wants_entries(&self, head: u64) -> bool {
        self.client_id.is_some() && self.reading.is_none() && self.cursor < head
    }

    /// Whether these entries (the next ones after the cursor) go to this
    /// device exactly as they are, so the driver may send a frame encoded
    /// once for every device: none touches a streamed table, and no chunk
    /// is due inside them.
    pub fn passes_whole(&self, entries: &[LogEntry]) -> bool {
        let last = entries.last().map_or(self.cursor, |e| e.server_seq);
        entries.iter().all(|e| e.images.is_empty())
            && self.due.as_ref().is_none_or(|c| c.as_of >= last)
            && self.reading.is_none()
            && !self.reloading()
    }

    /// After the driver sent a shared frame of the entries up to `last`,
    /// whose latest stamp is `hlc` (see [`Link::passes_whole`]): what else
    /// to send (the caught-up mark, a chunk that became due).
    pub fn sent_whole(&mut self, last: u64, hlc: Hlc, head: u64) -> Vec<ServerMsg> {
        self.cursor = self.cursor.max(last);
        self.hlc = self.hlc.max(hlc);
        self.told = self.cursor;
        // The shared frame says `caught_up: false`.
        self.said_caught_up = false;
        let mut out = Vec::new();
        self.after_entries(head, &mut out);
        out
    }

    fn after_entries(&mut self, head: u64, out: &mut Vec<ServerMsg>) {
        if self.due.as_ref().is_some_and(|c| c.as_of == self.cursor) {
            let chunk = self.due.take().expect("checked");
            out.extend(self.deliver(chunk));
        }
        if self.cursor >= head {
            out.push(self.caught_up_frame());
        }
    }

    /// The next committed entries after the cursor (in order; the log at
    /// `head`): what this device gets of them. Entries past a due chunk's
    /// position are left for after it (the cursor says how far this went).
    pub fn on_entries(&mut self, entries: &[LogEntry], head: u64) -> Vec<ServerMsg> {
        let limit = self.due.as_ref().map_or(u64::MAX, |c| c.as_of);
        let mut frames: Vec<Frame> = Vec::new();
        let mut run = Vec::new();
        let mut run_bytes = 0;
        for entry in entries {
            if entry.server_seq <= self.cursor {
                continue;
            }
            if entry.server_seq > limit {
                break;
            }
            self.cursor = entry.server_seq;
            self.hlc = self.hlc.max(entry.hlc);
            // What the user may read changes at this entry, which is routed
            // by the new access (its rows are as of after it).
            let regranted = match &mut self.access {
                Some(access) if !entry.images.is_empty() => access.update(&self.schema, entry),
                _ => Vec::new(),
            };
            if let Some(e) = self.route(entry) {
                let size = postcard::experimental::serialized_size(&e).unwrap_or(usize::MAX);
                if !run.is_empty() && run_bytes + size > self.config.chunk_bytes_max {
                    frames.push(Frame::Entries(std::mem::take(&mut run)));
                    run_bytes = 0;
                }
                run_bytes += size;
                run.push(e);
            }
            if !regranted.is_empty() {
                // The device takes the entries up to here, then re-loads.
                run_bytes = 0;
                frames.push(Frame::Reload(
                    entry.server_seq,
                    std::mem::take(&mut run),
                    regranted.clone(),
                ));
                self.reload_tables(&regranted);
            }
        }
        let mut out = Vec::new();
        for frame in frames {
            match frame {
                Frame::Entries(entries) => {
                    let Some(cursor) = entries.last().map(|e| e.server_seq) else {
                        continue;
                    };
                    self.said_caught_up = false;
                    out.push(ServerMsg::Changes {
                        entries,
                        cursor,
                        hlc: self.hlc,
                        caught_up: false,
                    });
                }
                Frame::Reload(cursor, entries, tables) => {
                    // The device's cursor is exactly here first.
                    self.said_caught_up = false;
                    out.push(ServerMsg::Changes {
                        entries,
                        cursor,
                        hlc: self.hlc,
                        caught_up: false,
                    });
                    out.push(ServerMsg::Reload {
                        cursor,
                        tables,
                        access: self.access_digest,
                    });
                }
            }
        }
        let reached = self.cursor >= head;
        let lag = self.cursor - self.told >= CURSOR_LAG_MAX;
        if !run.is_empty() || lag || (reached && !self.said_caught_up) {
            self.said_caught_up = reached;
            out.push(ServerMsg::Changes {
                entries: run,
                cursor: self.cursor,
                hlc: self.hlc,
                caught_up: reached,
            });
        }
        if !out.is_empty() {
            self.told = self.cursor;
        }
        if self.due.as_ref().is_some_and(|c| c.as_of == self.cursor) {
            let chunk = self.due.take().expect("checked");
            out.extend(self.deliver(chunk));
        }
        out
    }

    /// Passes over the entries after the cursor up to `seq`, which the
    /// driver knows concern this device not at all (its [`Fanout`] left it
    /// out of each), `hlc` being at least their latest stamp; the log at
    /// `head`. Stops at a due chunk's position and delivers it (call again
    /// for the rest); says the cursor when it reaches the head for the first
    /// time, or lags what the device was told by [`CURSOR_LAG_MAX`].
    ///
    /// [`Fanout`]: crate::fanout::Fanout
    pub fn skip_to(&mut self, seq: u64, hlc: Hlc, head: u64) -> Vec<ServerMsg> {
        let limit = self.due.as_ref().map_or(u64::MAX, |c| c.as_of);
        let to = seq.min(limit);
        let mut out = Vec::new();
        if to <= self.cursor || self.reading.is_some() {
            // While a chunk is read no entry is passed (see the module doc).
            return out;
        }
        self.cursor = to;
        self.hlc = self.hlc.max(hlc);
        let reached = self.cursor >= head;
        if (reached && !self.said_caught_up) || self.cursor - self.told >= CURSOR_LAG_MAX {
            self.said_caught_up = reached;
            self.told = self.cursor;
            out.push(ServerMsg::Changes {
                entries: Vec::new(),
                cursor: self.cursor,
                hlc: self.hlc,
                caught_up: reached,
            });
        }
        if self.due.as_ref().is_some_and(|c| c.as_of == self.cursor) {
            let chunk = self.due.take().expect("checked");
            out.extend(self.deliver(chunk));
        }
        out
    }

    /// What this device gets of one entry, if anything.
    fn route(&self, entry: &LogEntry) -> Option<LogEntry> {
        if entry.images.is_empty() && !self.reloading() {
            return Some(entry.clone());
        }
        let own = Some(entry.client_id) == self.client_id;
        let mut changes = Vec::with_capacity(entry.changes.len());
        let mut images = entry.images.iter().peekable();
        for (i, change) in entry.changes.iter().enumerate() {
            let image = match images.peek() {
                Some(img) if img.change as usize == i => images.next(),
                _ => None,
            };
            if let Some(c) = self.route_change(change, image, own) {
                changes.push(c);
            }
        }
        if changes.is_empty() && !own {
            return None;
        }
        Some(LogEntry {
            server_seq: entry.server_seq,
            client_id: entry.client_id,
            client_seq: entry.client_seq,
            hlc: entry.hlc,
            changes,
            digest: entry.digest,
            images: Vec::new(),
        })
    }

    fn route_change(
        &self,
        change: &RowChange,
        image: Option<&RowImage>,
        own: bool,
    ) -> Option<RowChange> {
        if !self.schema.filtered(&change.table) {
            // A whole table; while it re-loads, only rows up to the last key
            // loaded are the device's (later chunks bring the rest as of
            // after this change).
            let held = !self.reloading()
                || self.subs.values().all(|s| {
                    s.table != change.table
                        || match &s.sub.load {
                            Load::Done => true,
                            Load::After(None) => false,
                            Load::After(Some(last)) => key_le(&change.pk, last),
                        }
                });
            return if held {
                Some(change.clone())
            } else {
                // Its own write to a row not loaded yet: its copy goes, and
                // a later chunk brings the row as the server has it.
                own.then(|| RowChange {
                    table: change.table.clone(),
                    pk: change.pk.clone(),
                    op: RowOp::Evict,
                })
            };
        }
        let Some(image) = image else {
            // A streamed table's change without an image (logged before the
            // table was streamed): only its author gets it.
            return own.then(|| change.clone());
        };
        let streamed = self.schema.streamed(&change.table);
        let held = |row: &Option<Vec<Value>>| {
            row.as_ref().is_some_and(|r| {
                self.readable(&change.table, r)
                    && if streamed {
                        self.holds(&change.table, &change.pk, r)
                    } else {
                        self.whole_loaded(&change.table, &change.pk)
                    }
            })
        };
        let before = held(&image.before);
        let after = held(&image.after);
        let evict = || RowChange {
            table: change.table.clone(),
            pk: change.pk.clone(),
            op: RowOp::Evict,
        };
        if image.after.is_none() {
            // Deleted: a real delete for whoever may hold it.
            return (before || own).then(|| change.clone());
        }
        match (before, after) {
            (true, true) => Some(change.clone()),
            (false, true) => match (&change.op, &image.whole) {
                (RowOp::Upsert { insert: true, .. }, _) | (_, None) => Some(change.clone()),
                (_, Some(whole)) => Some(RowChange {
                    table: change.table.clone(),
                    pk: change.pk.clone(),
                    op: RowOp::Upsert {
                        insert: true,
                        columns: whole.clone(),
                    },
                }),
            },
            (true, false) => Some(evict()),
            (false, false) => own.then(evict),
        }
    }

    /// Whether a row of a table that syncs whole (filtered by a read rule)
    /// is loaded: always, unless the table re-loads and has not reached it.
    fn whole_loaded(&self, table: &str, pk: &Value) -> bool {
        !self.reloading()
            || self.subs.values().all(|s| {
                s.table != table
                    || match &s.sub.load {
                        Load::Done => true,
                        Load::After(None) => false,
                        Load::After(Some(last)) => key_le(pk, last),
                    }
            })
    }

    /// Whether one of this device's subscriptions holds a row of `table`
    /// with these values (a load under way holds the keys it has loaded).
    fn holds(&self, table: &str, pk: &Value, row: &[Value]) -> bool {
        self.subs.values().any(|s| {
            if s.table != table {
                return false;
            }
            let loaded = match &s.sub.load {
                Load::Done => true,
                Load::After(None) => false,
                Load::After(Some(last)) => key_le(pk, last),
            };
            loaded
                && self.schema.streams[&s.sub.stream]
                    .filter
                    .matches(row, &s.sub.params)
        })
    }
}

/// A frame `on_entries` builds: entries, or a re-load at a position.
enum Frame {
    Entries(Vec<LogEntry>),
    /// The entries up to this position (maybe none), then a re-load of
    /// these tables.
    Reload(u64, Vec<LogEntry>, Vec<String>),
}

/// `a <= b` for primary keys in SQLite's order (integers before text, text
/// byte by byte), the order initial loads read in.
pub fn key_le(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Integer(x), Value::Integer(y)) => x <= y,
        (Value::Text(x), Value::Text(y)) => x.as_bytes() <= y.as_bytes(),
        (Value::Integer(_), Value::Text(_)) => true,
        (Value::Text(_), Value::Integer(_)) => false,
        _ => false,
    }
}
