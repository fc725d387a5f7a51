//! The outbox as the app sees it: each write's verdict (a receipt), which
//! rows a pending write holds (`hearth_pending` in SQL), the queue itself,
//! and dropping a queued write on purpose.
//!
//! - A receipt is written in the same transaction that takes a mutation out
//!   of the outbox, so a device that restarts still knows how each of its
//!   recent writes ended: `_hearth_receipts` keeps the last
//!   [`RECEIPTS_KEPT`] (by sequence number). A rewound device (see
//!   `Event::Rewound`) forgets them with its old numbers.
//! - `hearth_pending(table, key)` reads the in-memory count of pending
//!   writes per row, the same one settling uses; it is true from the
//!   commit of a local write until the server's verdict on the last
//!   pending write to that row is applied on the device.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use rusqlite::{params, OptionalExtension};
use serde::Serialize;

use super::{row_key, to_i64, Client, ClientError, Event, Output, Result, RowKey};
use crate::change::{Mutation, RowChange};
use crate::Value;

/// How many receipts a device keeps: the verdicts on its last this many
/// mutations (by sequence number) stay readable through [`Client::settlement`].
pub const RECEIPTS_KEPT: u64 = 10_000;

/// The code and reason of a write the app dropped with [`Client::discard`].
pub const DISCARDED: &str = "DISCARDED";

/// How many pending mutations touch each row, shared between the client and
/// the `hearth_pending` SQL function. Not `Clone`: a copy of the counts is
/// taken with `snapshot`, never a second handle by accident.
#[derive(Default)]
pub(super) struct PendingRows(Arc<Mutex<HashMap<RowKey, u32>>>);

impl PendingRows {
    pub(super) fn lock(&self) -> MutexGuard<'_, HashMap<RowKey, u32>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn snapshot(&self) -> HashMap<RowKey, u32> {
        self.lock().clone()
    }

    /// Replaces the counts; returns the previous ones.
    pub(super) fn replace(&self, counts: HashMap<RowKey, u32>) -> HashMap<RowKey, u32> {
        std::mem::replace(&mut *self.lock(), counts)
    }

    pub(super) fn contains(&self, key: &RowKey) -> bool {
        self.lock().contains_key(key)
    }
}

/// The server's verdict on one of this device's mutations.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum Verdict {
    /// Applied as the server's log entry `server_seq`.
    Applied { server_seq: u64 },
    /// Refused (by the server, or `TOO_LARGE` / [`DISCARDED`] on the
    /// device); its effects were undone on the device. `undone` lists the
    /// rows it wrote, as (table, primary key), each once.
    Rejected {
        code: String,
        reason: String,
        undone: Vec<(String, Value)>,
    },
}

/// Where one of this device's mutations stands ([`Client::settlement`]).
#[derive(Clone, Debug, PartialEq)]
pub enum Settlement {
    /// In the outbox: no verdict yet.
    Pending,
    Settled(Verdict),
    /// Never made under this number, or settled so long ago that its
    /// receipt is gone (more than [`RECEIPTS_KEPT`] mutations since), or
    /// made before the device was rewound.
    Unknown,
}

/// One mutation of the outbox ([`Client::pending_writes`]).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PendingWrite {
    pub seq: u64,
    /// The tables it writes, sorted.
    pub tables: Vec<String>,
    /// The rows it writes, as (table, primary key), each once.
    pub rows: Vec<(String, Value)>,
    /// When it was made: the wall-clock part of its hybrid logical clock, in
    /// milliseconds since the Unix epoch (the device's clock, or later when
    /// the device had seen a later time from the server).
    pub made_at_ms: u64,
    /// How many times it went out on a connection.
    pub attempts: u64,
    /// Whether the server may have it (it went out at least once): such a
    /// write can no longer be discarded, only waited for.
    pub sent: bool,
}

/// The rows a mutation writes, each once, in the order of its changes.
pub(super) fn rows_of(mutation: &Mutation) -> Vec<(String, Value)> {
    let mut seen = std::collections::HashSet::new();
    mutation
        .changes
        .iter()
        .filter(|c| seen.insert(row_key(&c.table, &c.pk)))
        .map(|c: &RowChange| (c.table.clone(), c.pk.clone()))
        .collect()
}

/// Writes the receipt of mutation `seq` (inside the caller's transaction)
/// and forgets those older than [`RECEIPTS_KEPT`].
pub(super) fn record(conn: &rusqlite::Connection, seq: u64, verdict: &Verdict) -> Result<()> {
    let mut insert = conn.prepare_cached(
        "INSERT OR REPLACE INTO _hearth_receipts (seq, server_seq, code, reason, undone) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    match verdict {
        Verdict::Applied { server_seq } => insert.execute(params![
            to_i64(seq),
            to_i64(*server_seq),
            None::<String>,
            None::<String>,
            None::<Vec<u8>>
        ])?,
        Verdict::Rejected {
            code,
            reason,
            undone,
        } => {
            let blob = postcard::to_allocvec(undone)
                .map_err(|e| ClientError::Protocol(format!("cannot encode a receipt: {e}")))?;
            insert.execute(params![to_i64(seq), None::<i64>, code, reason, blob])?
        }
    };
    if seq > RECEIPTS_KEPT && seq.is_multiple_of(256) {
        conn.prepare_cached("DELETE FROM _hearth_receipts WHERE seq <= ?1")?
            .execute([to_i64(seq - RECEIPTS_KEPT)])?;
    }
    Ok(())
}

impl Client {
    /// Registers `hearth_pending(table, key)`: 1 while a local write to the
    /// row of `table` whose primary key is `key` awaits the server's
    /// verdict, else 0. Usable in any query and live query; a live query
    /// that reads `table` runs again when a verdict arrives.
    pub(super) fn install_pending_function(&mut self) -> Result<()> {
        let rows = PendingRows(self.pending_rows.0.clone());
        self.conn.create_scalar_function(
            "hearth_pending",
            2,
            rusqlite::functions::FunctionFlags::SQLITE_UTF8,
            move |ctx| {
                let table: String = ctx.get(0)?;
                let key = match ctx.get_raw(1) {
                    rusqlite::types::ValueRef::Null => Value::Null,
                    rusqlite::types::ValueRef::Integer(i) => Value::Integer(i),
                    rusqlite::types::ValueRef::Real(r) => Value::Real(r),
                    rusqlite::types::ValueRef::Text(t) => {
                        Value::Text(String::from_utf8_lossy(t).into_owned())
                    }
                    rusqlite::types::ValueRef::Blob(b) => Value::Blob(b.to_vec()),
                };
                Ok(rows.contains(&row_key(&table, &key)))
            },
        )?;
        Ok(())
    }

    /// Where mutation `seq` stands: pending, settled (with its verdict), or
    /// unknown to this device.
    pub fn settlement(&self, seq: u64) -> Result<Settlement> {
        if self.outbox_seqs.contains(&seq) {
            return Ok(Settlement::Pending);
        }
        let row = self
            .conn
            .prepare_cached(
                "SELECT server_seq, code, reason, undone FROM _hearth_receipts WHERE seq = ?1",
            )?
            .query_row([to_i64(seq)], |r| {
                Ok((
                    r.get::<_, Option<i64>>(0)?,
                    r.get::<_, Option<String>>(1)?,
                    r.get::<_, Option<String>>(2)?,
                    r.get::<_, Option<Vec<u8>>>(3)?,
                ))
            })
            .optional()?;
        Ok(match row {
            None => Settlement::Unknown,
            Some((Some(server_seq), _, _, _)) => Settlement::Settled(Verdict::Applied {
                server_seq: server_seq as u64,
            }),
            Some((None, code, reason, undone)) => {
                let undone = match undone {
                    Some(blob) => postcard::from_bytes(&blob).map_err(|e| {
                        ClientError::Protocol(format!("receipt {seq} is unreadable: {e}"))
                    })?,
                    None => Vec::new(),
                };
                Settlement::Settled(Verdict::Rejected {
                    code: code.unwrap_or_default(),
                    reason: reason.unwrap_or_default(),
                    undone,
                })
            }
        })
    }

    /// The outbox, oldest first.
    pub fn pending_writes(&self) -> Result<Vec<PendingWrite>> {
        let attempts: HashMap<u64, u64> = {
            let mut stmt = self
                .conn
                .prepare_cached("SELECT seq, attempts FROM _hearth_outbox")?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))?;
            rows.map(|r| r.map(|(s, a)| (s as u64, a.max(0) as u64)))
                .collect::<rusqlite::Result<_>>()?
        };
        Ok(self
            .load_pending()?
            .into_iter()
            .map(|(seq, mutation, _)| {
                let attempts = attempts.get(&seq).copied().unwrap_or(0);
                let tables: BTreeSet<String> =
                    mutation.changes.iter().map(|c| c.table.clone()).collect();
                PendingWrite {
                    seq,
                    tables: tables.into_iter().collect(),
                    rows: rows_of(&mutation),
                    made_at_ms: mutation.hlc.wall_ms(),
                    attempts,
                    sent: attempts > 0,
                }
            })
            .collect())
    }

    /// Drops pending mutation `seq` on purpose: its effects are undone (the
    /// later pending writes are redone over what is left), it is never sent,
    /// and it settles as [`Verdict::Rejected`] with code [`DISCARDED`]
    /// (reported as [`Event::Rejected`], so every view hears of it).
    ///
    /// Errors: `NotPending` when `seq` is not in the outbox (settled, or
    /// never made); `Sent` when it already went out on a connection, so the
    /// server may have applied it: wait for its verdict instead.
    pub fn discard(&mut self, seq: u64) -> Result<(Vec<(String, Value)>, Output)> {
        self.assert_idle("discard");
        if !self.outbox_seqs.contains(&seq) {
            return Err(ClientError::NotPending(seq));
        }
        let attempts: i64 = self.conn.query_row(
            "SELECT attempts FROM _hearth_outbox WHERE seq = ?1",
            [to_i64(seq)],
            |r| r.get(0),
        )?;
        let in_flight =
            matches!(self.session, super::Session::Ready { sent_upto, .. } if seq <= sent_upto);
        if attempts > 0 || in_flight {
            return Err(ClientError::Sent(seq));
        }
        let mut out = Output::default();
        self.apply_rejection(
            seq,
            DISCARDED,
            "the app discarded this write before it was sent",
            &mut out,
        )?;
        let undone = out
            .events
            .iter()
            .find_map(|e| match e {
                Event::Rejected { seq: s, undone, .. } if *s == seq => Some(undone.clone()),
                _ => None,
            })
            .unwrap_or_default();
        Ok((undone, out))
    }
}
