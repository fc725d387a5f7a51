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

/// What happened to one column. Variants are only ever appended (postcard
/// encodes the variant's index), so older encodings stay readable.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ColumnOp {
    /// The column now holds this value: a `lww` or `manual` column, any
    /// column of an inserted row, and in the server's log the merged value
    /// of `counter` and `set` columns.
    Set(Value),
    /// A `counter` column changed by this much (from the device's view).
    Add(i64),
    /// A `set` column gained and lost these elements, each the canonical
    /// JSON text of a scalar (see `merge::set`), against what the device saw.
    SetOps {
        add: Vec<String>,
        remove: Vec<String>,
    },
    /// A `text` column's edit: a yrs v1 update (see `merge::text`).
    Text(Vec<u8>),
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
    /// Server to device only: the row left this device's subscriptions (a
    /// write moved it out of every stream the device follows, or the device's
    /// own write put it outside them). The device removes its copy locally;
    /// this is never a delete, never captured, never sent back. A device
    /// that still has pending writes to the row keeps it until they settle.
    Evict,
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
    /// The server sequence number the device had applied when it made the
    /// mutation (its cursor): what the device had seen of other devices'
    /// writes. Observed-remove sets and manual-merge conflicts use it.
    pub base: u64,
    /// Earlier identities of this device whose writes it had seen, as
    /// (client id, last sequence number): a device that lost the end of its
    /// history takes a new client id and renumbers its pending mutations
    /// (see `Event::Rewound`); they were made after its own writes under the
    /// old id up to that number, which their new id alone would not say.
    pub also_seen: Vec<(u64, u64)>,
    pub changes: Vec<RowChange>,
    /// The schema version the device had when it made the mutation (0:
    /// unknown, an outbox entry written before it was kept). The server
    /// reads the mutation against it: values for columns dropped since are
    /// discarded, even when a later version added a column of that name
    /// again, and a write to a table dropped since is refused.
    pub schema_version: u64,
}

/// A mutation as encoded before mutations carried `base` (format 1 of the
/// outbox); it reads as a mutation with base 0.
#[derive(Deserialize)]
struct MutationV1 {
    seq: u64,
    hlc: Hlc,
    changes: Vec<RowChange>,
}

/// A mutation as encoded before mutations carried their schema version
/// (format 2 of the outbox).
#[derive(Deserialize)]
struct MutationV2 {
    seq: u64,
    hlc: Hlc,
    base: u64,
    also_seen: Vec<(u64, u64)>,
    changes: Vec<RowChange>,
}

/// The version of the encodings Hearth writes to its files (outbox
/// mutations and pre-images, the log's changes, the server's row records).
/// Each row holding such a blob records the format it was written in, and
/// every format ever written stays readable.
pub const FORMAT: i64 = 2;

/// The version of the encoding of outbox mutations (`_hearth_outbox.format`):
/// 1 before `base`, 2 before `schema_version`. Every one stays readable.
pub const MUTATION_FORMAT: i64 = 3;

impl Mutation {
    /// Encodes the mutation as the outbox and the wire hold it.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).expect("encode mutation")
    }

    /// Reads a mutation written in `format` ([`MUTATION_FORMAT`]; 1: before
    /// `base`, 2: before `schema_version`).
    pub fn decode(bytes: &[u8], format: i64) -> Result<Mutation, String> {
        match format {
            1 => postcard::from_bytes::<MutationV1>(bytes)
                .map(|m| Mutation {
                    seq: m.seq,
                    hlc: m.hlc,
                    base: 0,
                    also_seen: Vec::new(),
                    changes: m.changes,
                    schema_version: 0,
                })
                .map_err(|e| e.to_string()),
            2 => postcard::from_bytes::<MutationV2>(bytes)
                .map(|m| Mutation {
                    seq: m.seq,
                    hlc: m.hlc,
                    base: m.base,
                    also_seen: m.also_seen,
                    changes: m.changes,
                    schema_version: 0,
                })
                .map_err(|e| e.to_string()),
            MUTATION_FORMAT => postcard::from_bytes(bytes).map_err(|e| e.to_string()),
            other => Err(format!(
                "written in format {other}, newer than this version of Hearth reads ({MUTATION_FORMAT})"
            )),
        }
    }

    /// A 64-bit FNV-1a digest of the mutation's wire encoding: the server
    /// keeps it per processed mutation, so that a re-sent number with other
    /// content (a device that lost the end of its history and reused it) is
    /// told apart from a true re-send. Not a defence against a hostile device,
    /// which can only confuse the server about its own writes.
    ///
    /// It covers the number, the stamp and the changes, not `base` or
    /// `schema_version`, so a mutation has the same digest in every format: a device upgraded with a
    /// mutation the server processed before the upgrade re-sends it and is
    /// answered as a re-send.
    pub fn digest(&self) -> u64 {
        let bytes =
            postcard::to_allocvec(&(self.seq, self.hlc, &self.changes)).expect("encode mutation");
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
    /// Server-side only, never on the wire: for each change to a table that
    /// streams name, what the row looked like around it (see [`RowImage`]).
    /// Each connection decides from these which of its subscriptions held
    /// the row before and hold it after.
    #[serde(skip)]
    pub images: Vec<RowImage>,
}

/// A row of a streamed table around one change of a log entry, kept in the
/// server's log beside the entry (never sent): enough to evaluate every
/// stream's condition on the row before and after the change.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RowImage {
    /// The change this describes: its index in the entry's `changes`.
    pub change: u32,
    /// The row before the change, full width in the table's column order,
    /// with only the columns some stream reads filled (the others Null);
    /// None when the row did not exist.
    pub before: Option<Vec<Value>>,
    /// The row after the change, the same way; None when it is gone.
    pub after: Option<Vec<Value>>,
    /// The whole row after the change, as the columns of an inserting
    /// upsert (text columns as their document's full state), kept when a
    /// column some stream reads changed and the change itself does not carry
    /// every column: a device that gains the row receives it whole.
    pub whole: Option<Vec<(String, ColumnOp)>>,
}
