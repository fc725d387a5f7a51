//! Merge policies: one module per policy, each a set of pure functions of a
//! cell's stored state and one incoming operation (no SQL here), used by the
//! device's capture and local replay and by the server's merge.
//!
//! | policy | device captures | server keeps | log carries |
//! |---|---|---|---|
//! | `lww` | `Set(new)` | a stamp per column | `Set(winner)` |
//! | `counter` | `Add(new - old)` | the value | `Set(total)` |
//! | `set` | `SetOps{add, remove}` | a dot per concurrent add of each element | `Set(array)` |
//! | `text` | `Text(yrs update)` | the yrs document | `Text(update)` |
//! | `manual` | `Set(new)` | who wrote the value last, at which sequence | `Set(value)` and the conflict row |
//!
//! Adding a policy is a new module here, a variant of
//! [`crate::schema::MergePolicy`] and its arms in capture, local replay and
//! the server's merge.

pub mod counter;
pub mod manual;
pub mod set;
pub mod text;

use serde::{Deserialize, Serialize};

/// Who wrote an operation, and what they had seen: the context the server
/// merges a cell's operation in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Writer<'a> {
    pub client_id: u64,
    /// The device's number for the mutation.
    pub client_seq: u64,
    /// The server sequence the device had applied when it wrote (its cursor).
    pub base: u64,
    /// The server sequence number this mutation's log entry gets.
    pub server_seq: u64,
    /// Earlier identities of the device, (client id, last number seen), see
    /// `Mutation::also_seen`.
    pub also_seen: &'a [(u64, u64)],
}

/// One write the server merged, as set and manual cells remember it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dot {
    pub server_seq: u64,
    pub client_id: u64,
    pub client_seq: u64,
}

impl Dot {
    pub fn of(w: &Writer<'_>) -> Dot {
        Dot {
            server_seq: w.server_seq,
            client_id: w.client_id,
            client_seq: w.client_seq,
        }
    }

    /// Whether the writer had seen this write when it wrote: it was in the
    /// log prefix the writer had applied, or it was the writer's own earlier
    /// mutation (a device applies its own writes before sending them).
    pub fn seen_by(&self, w: &Writer<'_>) -> bool {
        self.server_seq <= w.base
            || (self.client_id == w.client_id && self.client_seq < w.client_seq)
            || w.also_seen
                .iter()
                .any(|(id, upto)| self.client_id == *id && self.client_seq <= *upto)
    }
}

/// Why the server refuses an operation: a stable code and a reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub code: &'static str,
    pub reason: String,
}

pub(crate) fn refusal(code: &'static str, reason: impl Into<String>) -> Refusal {
    Refusal {
        code,
        reason: reason.into(),
    }
}
