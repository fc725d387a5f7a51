//! Subscriptions: which streams of the schema this device follows, their
//! initial loads, and eviction of the rows none of them holds.
//!
//! Subscriptions are the device's (`_hearth_subscriptions`): they survive
//! restarts, go to the server in every `Hello`, and a load cut by a dropped
//! connection resumes after the last key it stored. A table that streams
//! name holds, once caught up, exactly the rows its subscriptions match plus
//! the rows pending writes touch: after each change the server sends, each
//! chunk, each settled write and each unsubscribe, the rows involved that no
//! subscription matches (by the same conditions the server evaluates, on the
//! device's copy of the server's row) and no pending write touches are
//! removed, locally only (never captured as a delete).

use std::collections::BTreeMap;

use super::*;
use crate::filter::Param;
use crate::protocol::{Load, Subscription};

/// A subscription as the app sees it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SubscriptionInfo {
    pub id: u64,
    pub stream: String,
    /// The parameters as a JSON object (a list parameter as an array).
    pub params: serde_json::Value,
    /// Whether its initial load is complete.
    pub loaded: bool,
    /// Rows its initial load has brought so far.
    pub rows: u64,
}

pub(super) const SUBSCRIPTIONS_TABLE: &str = "
CREATE TABLE IF NOT EXISTS _hearth_subscriptions (
  id     INTEGER PRIMARY KEY,
  stream TEXT NOT NULL,
  params BLOB NOT NULL,
  load   BLOB NOT NULL,
  rows   INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS _hearth_leaving (
  id     INTEGER PRIMARY KEY,
  stream TEXT NOT NULL,
  params BLOB NOT NULL,
  load   BLOB NOT NULL,
  rows   INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS _hearth_stale (
  tbl TEXT NOT NULL,
  pk  NOT NULL,
  PRIMARY KEY (tbl, pk)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS _hearth_deferred (
  tbl TEXT NOT NULL,
  pk  NOT NULL,
  PRIMARY KEY (tbl, pk)
) WITHOUT ROWID;";

/// The device's number for a stream with these parameters: the same
/// subscription always gets the same number (FNV-1a of its encoding).
pub fn subscription_id(stream: &str, params: &BTreeMap<String, Param>) -> u64 {
    let bytes = postcard::to_allocvec(&(stream, params)).expect("encode subscription");
    let h = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    });
    (h & (i64::MAX as u64)).max(1)
}

/// Parameters as JSON, the way apps give them.
pub fn params_json(params: &BTreeMap<String, Param>) -> serde_json::Value {
    serde_json::Value::Object(
        params
            .iter()
            .map(|(name, p)| {
                let v = match p {
                    Param::One(v) => v.to_json(),
                    Param::Many(vs) => {
                        serde_json::Value::Array(vs.iter().map(Value::to_json).collect())
                    }
                };
                (name.clone(), v)
            })
            .collect(),
    )
}

impl Client {
    /// The server moved a row out of this device's subscriptions while a
    /// pending write still touches it: it stays until the write settles,
    /// and then goes whatever its local copy says (see `evict_unheld`).
    pub(super) fn defer_eviction(&self, table: &str, pk: &Value) -> Result<()> {
        if self.deferred.borrow_mut().insert(row_key(table, pk)) {
            self.conn
                .prepare_cached("INSERT OR IGNORE INTO _hearth_deferred (tbl, pk) VALUES (?1, ?2)")?
                .execute(params![table, pk])?;
        }
        Ok(())
    }

    /// The server sent the row again (or it is gone): no eviction waits.
    pub(super) fn forget_deferred(&self, table: &str, pk: &Value) -> Result<()> {
        let mut deferred = self.deferred.borrow_mut();
        if !deferred.is_empty() && deferred.remove(&row_key(table, pk)) {
            self.conn
                .prepare_cached("DELETE FROM _hearth_deferred WHERE tbl = ?1 AND pk = ?2")?
                .execute(params![table, pk])?;
        }
        Ok(())
    }

    /// The keys of deferred evictions, for `open`.
    pub(super) fn load_deferred(conn: &Connection) -> Result<HashSet<RowKey>> {
        let mut stmt = conn.prepare("SELECT tbl, pk FROM _hearth_deferred")?;
        let keys = stmt
            .query_map([], |r| {
                Ok(row_key(&r.get::<_, String>(0)?, &r.get::<_, Value>(1)?))
            })?
            .collect::<rusqlite::Result<_>>()?;
        Ok(keys)
    }

    /// The device's subscriptions, in id order.
    pub fn subscriptions(&self) -> Result<Vec<SubscriptionInfo>> {
        Ok(self
            .load_subscriptions()?
            .into_iter()
            // Whole tables re-loading after compaction are the engine's own.
            .filter(|(sub, _)| crate::protocol::whole_table_of(&sub.stream).is_none())
            .map(|(sub, rows)| SubscriptionInfo {
                id: sub.id,
                loaded: sub.load == Load::Done,
                stream: sub.stream,
                params: params_json(&sub.params),
                rows,
            })
            .collect())
    }

    /// Whether every load is complete: the subscriptions' initial loads and
    /// the whole tables re-loading after compaction (which
    /// [`Client::subscriptions`] does not list).
    pub fn loads_done(&self) -> Result<bool> {
        Ok(self
            .load_subscriptions()?
            .iter()
            .all(|(sub, _)| sub.load == Load::Done))
    }

    pub(super) fn load_subscriptions(&self) -> Result<Vec<(Subscription, u64)>> {
        self.load_subscriptions_of("_hearth_subscriptions")
    }

    /// The subscriptions whose rows stay on the device: the device's, and
    /// those it unsubscribed from while connected whose `Unsubscribed` has
    /// not come yet (entries routed by them may still arrive).
    pub(super) fn load_holding(&self) -> Result<Vec<(Subscription, u64)>> {
        let mut subs = self.load_subscriptions()?;
        subs.extend(self.load_subscriptions_of("_hearth_leaving")?);
        Ok(subs)
    }

    fn load_subscriptions_of(&self, table: &str) -> Result<Vec<(Subscription, u64)>> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT id, stream, params, load, rows FROM {table} ORDER BY id"
        ))?;
        let mut rows = stmt.query([])?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            let id: i64 = row.get(0)?;
            let params: Vec<u8> = row.get(2)?;
            let load: Vec<u8> = row.get(3)?;
            let bad = |e: postcard::Error| {
                ClientError::Protocol(format!("subscription {id} is unreadable: {e}"))
            };
            out.push((
                Subscription {
                    id: id as u64,
                    stream: row.get(1)?,
                    params: postcard::from_bytes(&params).map_err(bad)?,
                    load: postcard::from_bytes(&load).map_err(bad)?,
                },
                row.get::<_, i64>(4)? as u64,
            ));
        }
        Ok(out)
    }

    /// Follows a stream of the schema with these parameters: the server
    /// sends its rows (an initial load in chunks, [`Event::Loaded`] as they
    /// arrive) and from then on every change to them. Returns the
    /// subscription's id (the same for the same stream and parameters, so
    /// subscribing twice is one subscription) and what to send now, if
    /// connected. Works offline: the subscription is stored and starts on
    /// the next connection.
    ///
    /// Errors: `InvalidArgument` for an unknown stream or parameters that
    /// are missing, unknown, mistyped or too large (checked here when the
    /// device has the schema, and by the server, which refuses with
    /// `BAD_SUBSCRIPTION`).
    pub fn subscribe(
        &mut self,
        stream: &str,
        params: BTreeMap<String, Param>,
    ) -> Result<(u64, Output)> {
        self.assert_idle("subscribe");
        if let Some(schema) = &self.schema {
            let s = schema.streams.get(stream).ok_or_else(|| {
                ClientError::InvalidArgument(format!("the schema has no stream '{stream}'"))
            })?;
            s.filter
                .check_params(&params)
                .map_err(|e| ClientError::InvalidArgument(format!("stream '{stream}': {e}")))?;
        }
        let id = subscription_id(stream, &params);
        let mut out = Output::default();
        let known: bool = self.conn.query_row(
            "SELECT EXISTS (SELECT 1 FROM _hearth_subscriptions WHERE id = ?1)",
            [to_i64(id)],
            |r| r.get(0),
        )?;
        if known {
            return Ok((id, out));
        }
        let held: i64 = self.conn.query_row(
            "SELECT count(*) FROM _hearth_subscriptions WHERE stream NOT LIKE '*%'",
            [],
            |r| r.get(0),
        )?;
        if held as usize >= self.config.subscriptions_max {
            return Err(ClientError::TooManySubscriptions {
                max: self.config.subscriptions_max,
            });
        }
        let sub = Subscription {
            id,
            stream: stream.to_string(),
            params,
            load: Load::After(None),
        };
        self.conn.execute(
            "INSERT INTO _hearth_subscriptions (id, stream, params, load) VALUES (?1, ?2, ?3, ?4)",
            params![
                to_i64(id),
                sub.stream,
                postcard::to_allocvec(&sub.params).expect("encode params"),
                postcard::to_allocvec(&sub.load).expect("encode load"),
            ],
        )?;
        if self.session != Session::Offline {
            out.send.push(ClientMsg::Subscribe(sub));
        }
        Ok((id, out))
    }

    /// Stops following a subscription: rows no other subscription holds
    /// leave the device (locally; rows with pending writes stay until those
    /// settle). Unknown ids are ignored.
    pub fn unsubscribe(&mut self, id: u64) -> Result<Output> {
        self.assert_idle("unsubscribe");
        let mut out = Output::default();
        let stream: Option<String> = self
            .conn
            .query_row(
                "SELECT stream FROM _hearth_subscriptions WHERE id = ?1",
                [to_i64(id)],
                |r| r.get(0),
            )
            .optional()?;
        let Some(stream) = stream else {
            return Ok(out);
        };
        if self.session != Session::Offline {
            // Entries routed by it may be on their way: its rows stay until
            // the server's answer (`Unsubscribed`) or the end of the
            // connection.
            self.atomically(|c| {
                c.conn.execute(
                    "INSERT OR REPLACE INTO _hearth_leaving (id, stream, params, load, rows)
                     SELECT id, stream, params, load, rows FROM _hearth_subscriptions WHERE id = ?1",
                    [to_i64(id)],
                )?;
                c.conn.execute(
                    "DELETE FROM _hearth_subscriptions WHERE id = ?1",
                    [to_i64(id)],
                )?;
                Ok(())
            })?;
            out.send.push(ClientMsg::Unsubscribe { id });
            return Ok(out);
        }
        self.conn.execute(
            "DELETE FROM _hearth_subscriptions WHERE id = ?1",
            [to_i64(id)],
        )?;
        self.evict_stream(&stream, &mut out)?;
        out.events.push(Event::Unsubscribed { id });
        Ok(out)
    }

    /// Completes the unsubscribes awaiting the server's answer: `Some(id)`
    /// on its `Unsubscribed`, every one (`None`) when the connection they
    /// were sent on is over. Their rows no other subscription holds are
    /// evicted.
    pub(super) fn finish_leaving(&mut self, id: Option<u64>, out: &mut Output) -> Result<()> {
        let leaving: Vec<(u64, String)> = {
            let mut stmt = self.conn.prepare_cached(
                "SELECT id, stream FROM _hearth_leaving WHERE ?1 IS NULL OR id = ?1",
            )?;
            let rows = stmt.query_map([id.map(to_i64)], |r| {
                Ok((r.get::<_, i64>(0)? as u64, r.get::<_, String>(1)?))
            })?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        for (id, stream) in leaving {
            self.conn
                .execute("DELETE FROM _hearth_leaving WHERE id = ?1", [to_i64(id)])?;
            self.evict_stream(&stream, out)?;
            out.events.push(Event::Unsubscribed { id });
        }
        Ok(())
    }

    /// The unsubscribes awaiting the server's answer.
    pub(super) fn leaving_ids(&self) -> Result<Vec<u64>> {
        let mut stmt = self.conn.prepare_cached("SELECT id FROM _hearth_leaving")?;
        let ids = stmt
            .query_map([], |r| r.get::<_, i64>(0).map(|id| id as u64))?
            .collect::<rusqlite::Result<_>>()?;
        Ok(ids)
    }

    /// Evicts the rows of `stream`'s table that nothing holds any more.
    fn evict_stream(&mut self, stream: &str, out: &mut Output) -> Result<()> {
        let table = self
            .schema
            .as_ref()
            .and_then(|s| s.streams.get(stream))
            .map(|s| s.table.clone());
        if let Some(table) = table {
            self.evict_table(&table, out)?;
        }
        Ok(())
    }

    /// Drops a subscription the server refused.
    pub(super) fn subscription_refused(
        &mut self,
        id: u64,
        code: String,
        reason: String,
        out: &mut Output,
    ) -> Result<()> {
        let stream: Option<String> = self
            .conn
            .query_row(
                "SELECT stream FROM _hearth_subscriptions WHERE id = ?1",
                [to_i64(id)],
                |r| r.get(0),
            )
            .optional()?;
        self.conn.execute(
            "DELETE FROM _hearth_subscriptions WHERE id = ?1",
            [to_i64(id)],
        )?;
        let table = stream.as_ref().and_then(|stream| {
            self.schema
                .as_ref()
                .and_then(|s| s.streams.get(stream))
                .map(|s| s.table.clone())
        });
        match table {
            Some(table) => self.evict_table(&table, out)?,
            // The stream is gone from the schema (a schema change): its
            // table is unknown here, so every streamed table drops the rows
            // no remaining subscription holds.
            None => {
                let streamed: Vec<String> = self
                    .schema
                    .as_ref()
                    .map(|s| s.tables.keys().filter(|t| s.streamed(t)).cloned().collect())
                    .unwrap_or_default();
                for table in streamed {
                    self.evict_table(&table, out)?;
                }
            }
        }
        out.events
            .push(Event::SubscriptionRefused { id, code, reason });
        Ok(())
    }

    /// A chunk of an initial load: its rows become part of the confirmed
    /// state (pending writes are redone over them), and the subscription
    /// remembers how far it got, in the same transaction.
    pub(super) fn on_rows(
        &mut self,
        id: u64,
        cursor: u64,
        rows: Vec<RowChange>,
        last: Option<Value>,
        done: bool,
        out: &mut Output,
    ) -> Result<()> {
        let known: Option<i64> = self
            .conn
            .query_row(
                "SELECT rows FROM _hearth_subscriptions WHERE id = ?1",
                [to_i64(id)],
                |r| r.get(0),
            )
            .optional()?;
        if cursor < self.cursor {
            return Err(ClientError::Protocol(format!(
                "a chunk of subscription {id} read at {cursor} reached a device already at {}",
                self.cursor
            )));
        }
        let Some(count) = known else {
            return Ok(()); // Unsubscribed since it was asked for.
        };
        let count = count as u64 + rows.len() as u64;
        let load = if done { Load::Done } else { Load::After(last) };
        let tables: BTreeSet<String> = rows.iter().map(|r| r.table.clone()).collect();
        // A chunk read past the device's cursor comes after entries that held
        // nothing for it: the cursor moves with the rows.
        let saved_cursor = self.cursor;
        let settled = self.settle(&[], &[], rows.iter(), |c| {
            c.cursor = cursor;
            c.apply_changes(&rows, Some(0))?;
            c.conn
                .prepare_cached(
                    "UPDATE _hearth_subscriptions SET load = ?1, rows = ?2 WHERE id = ?3",
                )?
                .execute(params![
                    postcard::to_allocvec(&load).expect("encode load"),
                    to_i64(count),
                    to_i64(id)
                ])?;
            Ok(())
        });
        if let Err(e) = settled {
            self.cursor = saved_cursor;
            return Err(e);
        }
        if done {
            if let Some(stream) = self.stream_of(id)? {
                let table = match crate::protocol::whole_table_of(&stream) {
                    Some(table) => {
                        // A whole table is whole again: it syncs as before.
                        self.conn.execute(
                            "DELETE FROM _hearth_subscriptions WHERE id = ?1",
                            [to_i64(id)],
                        )?;
                        Some(table.to_string())
                    }
                    None => self
                        .schema
                        .as_ref()
                        .and_then(|s| s.streams.get(&stream))
                        .map(|s| s.table.clone()),
                };
                if let Some(table) = table {
                    self.sweep_if_loaded(&table, out)?;
                }
            }
        }
        if done && self.reload_seen.is_some() && self.loads_done()? {
            // Every row is back: the cursor is what the device has seen.
            self.conn
                .execute("DELETE FROM _hearth_meta WHERE key = 'reload_seen'", [])?;
            self.reload_seen = None;
        }
        if !tables.is_empty() {
            out.events
                .push(Event::TablesChanged(tables.into_iter().collect()));
        }
        out.events.push(Event::Loaded {
            id,
            rows: count,
            done,
        });
        Ok(())
    }

    fn stream_of(&self, id: u64) -> Result<Option<String>> {
        Ok(self
            .conn
            .prepare_cached("SELECT stream FROM _hearth_subscriptions WHERE id = ?1")?
            .query_row([to_i64(id)], |r| r.get(0))
            .optional()?)
    }

    /// The server's log no longer reaches this device's cursor: compaction
    /// removed entries it never saw (`Welcome.floor` above its cursor). What
    /// it holds of the server may be stale in ways no entry will tell, so
    /// the confirmed state is emptied under the pending writes (undone, then
    /// redone over it; locally, never captured), every subscription loads
    /// again from its first row, every whole table
    /// loads as a pseudo-subscription (`*TABLE`, hidden from
    /// [`Client::subscriptions`]), and the cursor starts at the floor.
    /// Pending writes stay and are sent as usual; the server answers those
    /// it already applied with `Acked`. The link on the server does the same
    /// on the same Welcome.
    ///
    /// The cursor at the floor does not mean the device has seen the
    /// entries up to it: until a load brings a row back, a write to it
    /// carries as its `base` the cursor the device had reached before
    /// (`reload_seen`, see [`Client::mutation_base`]).
    pub(super) fn reload_after_compaction(&mut self, floor: u64, out: &mut Output) -> Result<()> {
        let Some(schema) = self.schema.clone() else {
            return Ok(());
        };
        let mut tables = BTreeSet::new();
        let saved_cursor = self.cursor;
        let saved_seen = self.reload_seen;
        // An earlier re-load still under way brought back only some rows:
        // the others were seen no further than before it.
        let seen = saved_seen.map_or(saved_cursor, |s| s.min(saved_cursor));
        // Under the pending writes (undone, then redone over what is left),
        // the confirmed state becomes empty: the loads fill it again.
        self.rebase(|c| {
            let mut gone = Vec::new();
            for (name, table) in &schema.tables {
                let mut stmt = c.conn.prepare(&format!(
                    "SELECT {} FROM main.{}",
                    crate::schema::ident(table.pk_name()),
                    crate::schema::ident(name)
                ))?;
                let keys = stmt
                    .query_map([], |r| r.get::<_, Value>(0))?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                if !keys.is_empty() {
                    tables.insert(name.clone());
                }
                // A delete, not an eviction: an eviction waits for the
                // pending writes, which here are undone and redone around it.
                gone.extend(keys.into_iter().map(|pk| RowChange {
                    table: name.clone(),
                    pk,
                    op: RowOp::Delete,
                }));
            }
            c.apply_changes(&gone, Some(0))?;
            let restart = postcard::to_allocvec(&Load::After(None)).expect("encode load");
            c.conn.execute(
                "UPDATE _hearth_subscriptions SET load = ?1, rows = 0",
                [&restart],
            )?;
            for sub in crate::protocol::whole_table_loads(&schema) {
                c.conn
                    .prepare_cached(
                        "INSERT OR REPLACE INTO _hearth_subscriptions (id, stream, params, load, rows)
                         VALUES (?1, ?2, ?3, ?4, 0)",
                    )?
                    .execute(params![
                        to_i64(sub.id),
                        sub.stream,
                        postcard::to_allocvec(&sub.params).expect("encode params"),
                        &restart
                    ])?;
            }
            c.cursor = floor;
            c.reload_seen = Some(seen);
            meta_set(&c.conn, "reload_seen", to_i64(seen))?;
            // Everything loads again at the floor: whatever changed the
            // user's access up to it is re-loaded for too.
            meta_set(&c.conn, "reloaded_cursor", to_i64(floor))?;
            Ok(())
        })
        .inspect_err(|_| {
            self.cursor = saved_cursor;
            self.reload_seen = saved_seen;
        })?;
        if !tables.is_empty() {
            out.events
                .push(Event::TablesChanged(tables.into_iter().collect()));
        }
        Ok(())
    }

    /// The `base` of a new mutation: the cursor, the log prefix the device
    /// has applied. After compaction moved the cursor to the log's floor over
    /// entries the device never applied, a row no load has brought back yet
    /// (its table's load has not passed its key) shows only what the device
    /// saw before and its own pending writes: a mutation writing such a row
    /// has seen the log no further than the cursor before the re-load, so
    /// that, say, its delete does not remove under `update-wins` a row
    /// another device updated in the entries it skipped.
    pub(super) fn mutation_base(&self, changes: &[RowChange]) -> Result<u64> {
        let (Some(seen), Some(schema)) = (self.reload_seen, &self.schema) else {
            return Ok(self.cursor);
        };
        let subs = self.load_subscriptions()?;
        let unloaded = changes.iter().any(|c| {
            subs.iter().any(|(sub, _)| {
                let Load::After(last) = &sub.load else {
                    return false;
                };
                let table = match crate::protocol::whole_table_of(&sub.stream) {
                    Some(t) => t,
                    None => match schema.streams.get(&sub.stream) {
                        Some(s) => s.table.as_str(),
                        None => return false,
                    },
                };
                table == c.table
                    && last
                        .as_ref()
                        .is_none_or(|last| !crate::link::key_le(&c.pk, last))
            })
        });
        Ok(if unloaded {
            seen.min(self.cursor)
        } else {
            self.cursor
        })
    }

    /// Whether one of the device's subscriptions holds a row of `table`
    /// with these values (a load under way counts: its rows are coming).
    fn held(&self, subs: &[(Subscription, u64)], table: &str, row: &[Value]) -> bool {
        let Some(schema) = &self.schema else {
            return true;
        };
        subs.iter().any(|(sub, _)| {
            schema
                .streams
                .get(&sub.stream)
                .is_some_and(|s| s.table == table && s.filter.matches(row, &sub.params))
        })
    }

    /// Removes, locally, the rows among `candidates` (table, key) of
    /// streamed tables that no subscription holds and no pending write
    /// touches.
    pub(super) fn evict_unheld(
        &mut self,
        candidates: Vec<(String, Value)>,
        out: &mut Output,
    ) -> Result<()> {
        let Some(schema) = &self.schema else {
            return Ok(());
        };
        // A row of a table that syncs whole goes only when the server said
        // so (a deferred eviction: its read rule no longer lets it stay).
        let candidates: Vec<(String, Value)> = candidates
            .into_iter()
            .filter(|(t, pk)| {
                (schema.streamed(t) || self.deferred.borrow().contains(&row_key(t, pk)))
                    && !self.pending_rows.contains(&row_key(t, pk))
            })
            .collect();
        if candidates.is_empty() {
            return Ok(());
        }
        let subs = self.load_holding()?;
        let mut gone = Vec::new();
        for (table, pk) in candidates {
            if self.dropped_table(&table) {
                continue;
            }
            let t = self.table(&table)?;
            let deferred = self.deferred.borrow().contains(&row_key(&table, &pk));
            if let Some(row) = rows::read_row(&self.conn, t, &pk)? {
                let streamed = self.schema.as_ref().is_some_and(|s| s.streamed(&table));
                if deferred || (streamed && !self.held(&subs, &table, &row)) {
                    gone.push((table, pk));
                }
            }
        }
        self.evict_rows(gone, out)
    }

    /// Evicts the rows of `table` no subscription holds (after an
    /// unsubscribe or a refused subscription).
    fn evict_table(&mut self, table: &str, out: &mut Output) -> Result<()> {
        let Some(t) = self.schema.as_ref().and_then(|s| s.table(table)).cloned() else {
            return Ok(());
        };
        let subs = self.load_holding()?;
        let mut gone = Vec::new();
        {
            let cols: Vec<String> = t.columns.iter().map(|c| ident(&c.name)).collect();
            let mut stmt = self.conn.prepare(&format!(
                "SELECT {} FROM main.{}",
                cols.join(", "),
                ident(table)
            ))?;
            let mut rows = stmt.query([])?;
            while let Some(row) = rows.next()? {
                let values: Vec<Value> = (0..t.columns.len())
                    .map(|i| row.get::<_, Value>(i))
                    .collect::<rusqlite::Result<_>>()?;
                let pk = values[t.pk].clone();
                if !self.pending_rows.contains(&row_key(table, &pk))
                    && !self.held(&subs, table, &values)
                {
                    gone.push((table.to_string(), pk));
                }
            }
        }
        self.evict_rows(gone, out)
    }

    /// What this device's user may read of `tables` changed (`Reload`, see
    /// [`crate::protocol::ServerMsg::Reload`]): every row of them is marked
    /// stale (`_hearth_stale`), every subscription to them loads again from
    /// its first row, and each that syncs whole loads as a `*TABLE`
    /// pseudo-subscription. A row the server sends from here on (a chunk
    /// or an entry) is unmarked; when a table has no load left under way,
    /// its rows still marked are evicted. So rows the user may still read
    /// never leave the app's view, and the others go once the loads say so.
    pub(super) fn reload_tables(&mut self, tables: &[String], out: &mut Output) -> Result<()> {
        let Some(schema) = self.schema.clone() else {
            return Ok(());
        };
        let restart = postcard::to_allocvec(&Load::After(None)).expect("encode load");
        // Rows a pending write touches are marked too, present or not (a
        // pending delete hides one that comes back if the write is refused).
        let pending: Vec<(String, Value)> = if self.pending > 0 {
            self.load_pending()?
                .into_iter()
                .flat_map(|(_, m, _)| m.changes.into_iter().map(|c| (c.table, c.pk)))
                .filter(|(t, _)| tables.contains(t))
                .collect()
        } else {
            Vec::new()
        };
        for (table, pk) in &pending {
            self.conn
                .prepare_cached("INSERT OR IGNORE INTO _hearth_stale (tbl, pk) VALUES (?1, ?2)")?
                .execute(params![table, pk])?;
        }
        let mut known = Vec::new();
        for name in tables {
            let Some(table) = schema.table(name) else {
                continue;
            };
            known.push(name.clone());
            self.conn.execute(
                &format!(
                    "INSERT OR IGNORE INTO _hearth_stale (tbl, pk) SELECT ?1, {} FROM main.{}",
                    ident(table.pk_name()),
                    ident(name)
                ),
                [name],
            )?;
            self.stale_tables.borrow_mut().insert(name.clone());
            if schema.streamed(name) {
                for stream in schema.streams_of(name) {
                    self.conn.execute(
                        "UPDATE _hearth_subscriptions SET load = ?1, rows = 0 WHERE stream = ?2",
                        params![&restart, stream.name],
                    )?;
                }
            } else {
                let sub = crate::protocol::whole_table_load(name);
                self.conn
                    .prepare_cached(
                        "INSERT OR REPLACE INTO _hearth_subscriptions (id, stream, params, load, rows)
                         VALUES (?1, ?2, ?3, ?4, 0)",
                    )?
                    .execute(params![
                        to_i64(sub.id),
                        sub.stream,
                        postcard::to_allocvec(&sub.params).expect("encode params"),
                        &restart
                    ])?;
            }
        }
        for name in known {
            self.sweep_if_loaded(&name, out)?;
        }
        Ok(())
    }

    /// What this device last re-loaded for (zeros if never), for the Hello.
    pub(super) fn reloaded(&self) -> Result<crate::protocol::Reloaded> {
        let get =
            |key| -> Result<u64> { Ok(meta_get::<i64>(&self.conn, key)?.map_or(0, |v| v as u64)) };
        Ok(crate::protocol::Reloaded {
            cursor: get("reloaded_cursor")?,
            access: get("reloaded_access")?,
        })
    }

    pub(super) fn set_reloaded(&self, mark: crate::protocol::Reloaded) -> Result<()> {
        meta_set(&self.conn, "reloaded_cursor", to_i64(mark.cursor))?;
        meta_set(&self.conn, "reloaded_access", to_i64(mark.access))?;
        Ok(())
    }

    /// When no load of `table` is under way any more, evicts its rows still
    /// marked stale by a [`Client::reload_tables`].
    pub(super) fn sweep_if_loaded(&mut self, table: &str, out: &mut Output) -> Result<()> {
        if !self.stale_tables.borrow().contains(table) {
            return Ok(());
        }
        let Some(schema) = self.schema.clone() else {
            return Ok(());
        };
        let loading = self.load_subscriptions()?.into_iter().any(|(sub, _)| {
            sub.load != Load::Done
                && match crate::protocol::whole_table_of(&sub.stream) {
                    Some(t) => t == table,
                    None => schema
                        .streams
                        .get(&sub.stream)
                        .is_some_and(|s| s.table == table),
                }
        });
        if loading {
            return Ok(());
        }
        let gone: Vec<(String, Value)> = self
            .conn
            .prepare("SELECT pk FROM _hearth_stale WHERE tbl = ?1")?
            .query_map([table], |r| r.get::<_, Value>(0))?
            .map(|pk| pk.map(|pk| (table.to_string(), pk)))
            .collect::<rusqlite::Result<_>>()?;
        // The eviction first (it unmarks each row it removes, in its own
        // transaction), then the marks of what it kept: a device stopped in
        // between still has the marks of rows not yet evicted, and sweeps
        // again at its next Welcome (`sweep_stale`).
        self.evict_rows(gone, out)?;
        self.conn
            .execute("DELETE FROM _hearth_stale WHERE tbl = ?1", [table])?;
        self.stale_tables.borrow_mut().remove(table);
        Ok(())
    }

    /// Sweeps every table still marked stale whose loads are done: a device
    /// stopped after a load finished and before its sweep (or during it)
    /// does it at the next Welcome.
    pub(super) fn sweep_stale(&mut self, out: &mut Output) -> Result<()> {
        let tables: Vec<String> = self.stale_tables.borrow().iter().cloned().collect();
        for table in tables {
            self.sweep_if_loaded(&table, out)?;
        }
        Ok(())
    }

    /// The server sent this row (it is still the device's): not stale.
    pub(super) fn unmark_stale(&self, table: &str, pk: &Value) -> Result<()> {
        if self.stale_tables.borrow().contains(table) {
            self.conn
                .prepare_cached("DELETE FROM _hearth_stale WHERE tbl = ?1 AND pk = ?2")?
                .execute(params![table, pk])?;
        }
        Ok(())
    }

    pub(super) fn load_stale_tables(conn: &Connection) -> Result<BTreeSet<String>> {
        Ok(conn
            .prepare("SELECT DISTINCT tbl FROM _hearth_stale")?
            .query_map([], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?)
    }

    fn evict_rows(&mut self, gone: Vec<(String, Value)>, out: &mut Output) -> Result<()> {
        if gone.is_empty() {
            return Ok(());
        }
        let changes: Vec<RowChange> = gone
            .into_iter()
            .map(|(table, pk)| RowChange {
                table,
                pk,
                op: RowOp::Evict,
            })
            .collect();
        let tables: BTreeSet<String> = changes.iter().map(|c| c.table.clone()).collect();
        self.replicated(|c| {
            c.apply_changes(&changes, Some(0))?;
            c.clear_capture()
        })?;
        out.events
            .push(Event::TablesChanged(tables.into_iter().collect()));
        Ok(())
    }
}
