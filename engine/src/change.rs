//! The change model: what one mutation says happened to which rows.
//!
//! A mutation is one local transaction. It lists row changes; a row change
//! names a table and a primary key and says either "these columns now hold
//! these values" or "the row is gone". Column changes are an enum so that
//! counter deltas, set add/remove and text CRDT updates fit as new variants
//! (appended at the end, which keeps old frames decodable).

use serde::{Deserialize, Serialize};

use crate::hlc::Hlc;
use crate::value::Value;

/// What happened to one column.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ColumnOp {
    /// The column now holds this value (last-writer-wins columns).
    Set(Value),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum RowOp {
    /// Columns written. `insert` is true when the row was created by this
    /// change, in which case every column is present.
    Upsert {
        insert: bool,
        columns: Vec<(String, ColumnOp)>,
    },
    /// The row was deleted.
    Delete,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RowChange {
    pub table: String,
    pub pk: Value,
    pub op: RowOp,
}

/// One local transaction, as a device sends it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Mutation {
    /// The device's own sequence number for it: 1, 2, 3, ... per client id.
    pub seq: u64,
    /// When it was made, by the device's hybrid logical clock.
    pub hlc: Hlc,
    pub changes: Vec<RowChange>,
}

impl Mutation {
    /// A 64-bit FNV-1a digest of the mutation's wire encoding: the server
    /// keeps it per processed mutation, so that a re-sent number with other
    /// content (a device that lost the end of its history and reused it) is
    /// told apart from a true re-send. Not a defence against a hostile device,
    /// which can only confuse the server about its own writes.
    pub fn digest(&self) -> u64 {
        let bytes = postcard::to_allocvec(self).expect("encode mutation");
        bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
        })
    }
}

/// One entry of the server's change log: the effect a mutation really had
/// after merging, which is what every other device applies.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LogEntry {
    /// The server's global sequence number, 1, 2, 3, ...
    pub server_seq: u64,
    /// The device and its sequence number that made the mutation.
    pub client_id: u64,
    pub client_seq: u64,
    pub hlc: Hlc,
    pub changes: Vec<RowChange>,
    /// The [`Mutation::digest`] of the mutation this entry applied (0 for
    /// entries stored before digests were kept). Its device takes the entry
    /// as the ack of a pending mutation only when the digests agree.
    pub digest: u64,
}
