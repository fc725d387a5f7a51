//! `manual`: concurrent writes to a column become a conflict a person
//! resolves.
//!
//! A write made without having seen the cell's latest write by another
//! device (that write's server sequence is past the writer's base) opens a
//! conflict, unless it writes the value the cell already holds. The cell
//! keeps a provisional winner by last-writer-wins, so the app keeps working,
//! and the server records the conflict as a row of `hearth_conflicts`, which
//! every device receives. A write that has seen every candidate of an open
//! conflict (a resolution, or any later write made after seeing them)
//! closes it and wins; one that has not becomes one more candidate.
//! Sequential writes (each had seen the other) make no conflict.
//!
//! A conflict keeps at most [`CANDIDATES_MAX`] candidates: past that, the
//! oldest candidate that is not the provisional winner is dropped (its value
//! stays in the log).

use serde::{Deserialize, Serialize};

use super::{Dot, Writer};
use crate::hlc::Stamp;
use crate::value::Value;

/// The most candidates one conflict lists.
pub const CANDIDATES_MAX: usize = 16;

/// The server's state of one manual cell: the write its value came from and
/// the value it replaced.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ManualState {
    pub last: Dot,
    pub before: Value,
}

/// One value of an open conflict, with who wrote it and when.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    pub value: Value,
    pub dot: Dot,
    pub stamp: Stamp,
}

/// An open conflict on one cell.
#[derive(Clone, Debug, PartialEq)]
pub struct Conflict {
    /// In the order they were written.
    pub candidates: Vec<Candidate>,
    /// The value the cell held before the conflicting writes.
    pub base_value: Value,
    /// When it opened: wall milliseconds of the server (or of the write's stamp).
    pub opened_at: u64,
}

/// What merging one write into a manual cell decided.
#[derive(Debug, PartialEq)]
pub struct Decision {
    /// Whether the incoming value becomes the cell's value.
    pub write: bool,
    /// The conflict after the write: `None` when there is none (or it closed).
    pub conflict: Option<Conflict>,
}

/// Merges `incoming` (written by `w` with `stamp`) into a cell holding
/// `current` (written with `current_stamp`), with `conflict` open or not.
#[allow(clippy::too_many_arguments)]
pub fn merge(
    state: &mut ManualState,
    conflict: Option<Conflict>,
    current: &Value,
    current_stamp: Stamp,
    incoming: &Value,
    stamp: Stamp,
    w: &Writer<'_>,
    now_ms: u64,
) -> Decision {
    let never_written = state.last == Dot::default();
    let mine = Candidate {
        value: incoming.clone(),
        dot: Dot::of(w),
        stamp,
    };
    let take = |state: &mut ManualState| {
        state.before = current.clone();
        state.last = Dot::of(w);
    };
    match conflict {
        Some(mut open) => {
            if open.candidates.iter().all(|c| c.dot.seen_by(w)) {
                take(state);
                return Decision {
                    write: true,
                    conflict: None,
                };
            }
            let write = stamp > current_stamp;
            if write {
                take(state);
            }
            open.candidates.push(mine);
            while open.candidates.len() > CANDIDATES_MAX {
                let winner = open
                    .candidates
                    .iter()
                    .map(|c| c.stamp)
                    .max()
                    .unwrap_or_default();
                let drop = open
                    .candidates
                    .iter()
                    .position(|c| c.stamp != winner)
                    .unwrap_or(0);
                open.candidates.remove(drop);
            }
            Decision {
                write,
                conflict: Some(open),
            }
        }
        None if never_written || state.last.seen_by(w) || incoming == current => {
            take(state);
            Decision {
                write: true,
                conflict: None,
            }
        }
        None => {
            let theirs = Candidate {
                value: current.clone(),
                dot: state.last,
                stamp: current_stamp,
            };
            let open = Conflict {
                candidates: vec![theirs, mine],
                base_value: state.before.clone(),
                opened_at: now_ms,
            };
            let write = stamp > current_stamp;
            if write {
                state.last = Dot::of(w);
            }
            Decision {
                write,
                conflict: Some(open),
            }
        }
    }
}

impl Candidate {
    fn to_json(&self) -> serde_json::Value {
        // 64-bit numbers travel as strings: JavaScript numbers hold 53 bits.
        serde_json::json!({
            "value": self.value.to_json(),
            "client_id": self.dot.client_id.to_string(),
            "client_seq": self.dot.client_seq,
            "server_seq": self.dot.server_seq,
            "hlc": self.stamp.hlc.0.to_string(),
            "at_ms": self.stamp.hlc.wall_ms(),
        })
    }

    fn from_json(j: &serde_json::Value) -> Option<Candidate> {
        let num = |k: &str| -> Option<u64> {
            match j.get(k)? {
                serde_json::Value::String(s) => s.parse().ok(),
                other => other.as_u64(),
            }
        };
        Some(Candidate {
            value: Value::from_json(j.get("value")?).ok()?,
            dot: Dot {
                server_seq: num("server_seq")?,
                client_id: num("client_id")?,
                client_seq: num("client_seq")?,
            },
            stamp: Stamp {
                hlc: crate::hlc::Hlc(num("hlc")?),
                client_id: num("client_id")?,
            },
        })
    }
}

/// The `hearth_conflicts` id of a cell's conflict: 16 hex digits of a hash
/// of table, row key and column (one open conflict per cell).
pub fn conflict_id(table: &str, pk: &Value, column: &str) -> String {
    let key = row_key(pk);
    let h = [table, "\0", &key, "\0", column]
        .iter()
        .flat_map(|s| s.bytes())
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
    format!("{h:016x}")
}

/// A row's key as `hearth_conflicts.row_key` holds it: its JSON.
pub fn row_key(pk: &Value) -> String {
    pk.to_json().to_string()
}

impl Conflict {
    /// The `hearth_conflicts` columns after `id, table_name, row_key,
    /// column_name`: `candidates` (JSON array of `{value, client_id,
    /// client_seq, server_seq, hlc, at_ms}`, ids and stamps as decimal
    /// strings), `base_value` (JSON), `opened_at` (wall ms).
    pub fn columns(&self) -> [Value; 3] {
        let candidates: Vec<serde_json::Value> =
            self.candidates.iter().map(Candidate::to_json).collect();
        [
            Value::Text(serde_json::Value::Array(candidates).to_string()),
            Value::Text(self.base_value.to_json().to_string()),
            Value::Integer(self.opened_at as i64),
        ]
    }

    /// Reads a conflict back from its `candidates`, `base_value` and
    /// `opened_at` columns; `None` if they are not what [`Conflict::columns`] wrote.
    pub fn from_columns(
        candidates: &Value,
        base_value: &Value,
        opened_at: &Value,
    ) -> Option<Conflict> {
        let (Value::Text(c), Value::Text(b), Value::Integer(at)) =
            (candidates, base_value, opened_at)
        else {
            return None;
        };
        let list: Vec<serde_json::Value> = serde_json::from_str(c).ok()?;
        Some(Conflict {
            candidates: list
                .iter()
                .map(Candidate::from_json)
                .collect::<Option<_>>()?,
            base_value: Value::from_json(&serde_json::from_str(b).ok()?).ok()?,
            opened_at: *at as u64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hlc::Hlc;

    fn w(client_id: u64, client_seq: u64, base: u64, server_seq: u64) -> Writer<'static> {
        Writer {
            client_id,
            client_seq,
            base,
            server_seq,
            also_seen: &[],
        }
    }

    fn stamp(ms: u64, client_id: u64) -> Stamp {
        Stamp {
            hlc: Hlc::new(ms, 0),
            client_id,
        }
    }

    #[test]
    fn sequential_writes_make_no_conflict_and_concurrent_ones_do() {
        let mut s = ManualState::default();
        let d = merge(
            &mut s,
            None,
            &Value::Null,
            stamp(0, 0),
            &Value::Integer(1),
            stamp(10, 1),
            &w(1, 1, 0, 1),
            0,
        );
        assert_eq!(
            d,
            Decision {
                write: true,
                conflict: None
            }
        );
        // Device 2 saw entry 1: sequential.
        let d = merge(
            &mut s,
            None,
            &Value::Integer(1),
            stamp(10, 1),
            &Value::Integer(2),
            stamp(20, 2),
            &w(2, 1, 1, 2),
            0,
        );
        assert!(d.write && d.conflict.is_none());
        // Device 1 writes without having seen entry 2: a conflict, and its
        // later stamp makes it the provisional winner.
        let d = merge(
            &mut s,
            None,
            &Value::Integer(2),
            stamp(20, 2),
            &Value::Integer(3),
            stamp(30, 1),
            &w(1, 2, 1, 3),
            99,
        );
        let open = d.conflict.clone().unwrap();
        assert!(d.write);
        assert_eq!(open.candidates.len(), 2);
        assert_eq!(open.base_value, Value::Integer(1));
        // Round trip through the table's columns.
        let [c, b, at] = open.columns();
        assert_eq!(Conflict::from_columns(&c, &b, &at), Some(open.clone()));
        // A write that saw only one candidate joins the conflict.
        let d = merge(
            &mut s,
            Some(open.clone()),
            &Value::Integer(3),
            stamp(30, 1),
            &Value::Integer(4),
            stamp(25, 3),
            &w(3, 1, 2, 4),
            0,
        );
        assert!(!d.write);
        assert_eq!(d.conflict.as_ref().unwrap().candidates.len(), 3);
        // A write that saw every candidate resolves it.
        let d = merge(
            &mut s,
            d.conflict,
            &Value::Integer(3),
            stamp(30, 1),
            &Value::Integer(7),
            stamp(5, 2),
            &w(2, 2, 4, 5),
            0,
        );
        assert_eq!(
            d,
            Decision {
                write: true,
                conflict: None
            }
        );
    }

    #[test]
    fn candidates_are_bounded_keeping_the_provisional_winner() {
        let mut s = ManualState {
            last: Dot {
                server_seq: 1,
                client_id: 1,
                client_seq: 1,
            },
            before: Value::Null,
        };
        let mut conflict = None;
        let mut current_stamp = stamp(1_000, 1);
        for i in 0..40u64 {
            let st = stamp(if i == 3 { 1_000_000 } else { 2_000 + i }, 100 + i);
            let d = merge(
                &mut s,
                conflict,
                &Value::Integer(0),
                current_stamp,
                &Value::Integer(i as i64),
                st,
                &w(100 + i, 1, 0, 2 + i),
                0,
            );
            if d.write {
                current_stamp = st;
            }
            conflict = d.conflict;
        }
        let c = conflict.unwrap();
        assert_eq!(c.candidates.len(), CANDIDATES_MAX);
        assert!(c.candidates.iter().any(|x| x.stamp == current_stamp));
    }
}
