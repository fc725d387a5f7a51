//! The wire protocol between a device and the server.
//!
//! Each WebSocket binary message is one frame: the protocol version as a
//! varint, then the postcard encoding of a [`ClientMsg`] or [`ServerMsg`].
//! The version comes first and outside the message so that a peer of another
//! version can always be told, in words, which two versions met.
//!
//! The conversation: the device says `Hello` (its id, its cursor, its schema
//! version); the server answers `Welcome` (with the schema if the device
//! needs it), then streams `Changes` from the device's cursor, marking the
//! batch that reaches the head `caught_up`, then every new entry as it is
//! made. The device sends `Push` with its pending mutations, in order, at any
//! time after `Welcome`. An applied mutation comes back as a log entry naming
//! its origin; a refused one as `Rejected`.
//!
//! Selective sync: `Hello` lists the device's subscriptions (named streams
//! of the schema with their parameters, and how far each one's initial load
//! got); `Subscribe` and `Unsubscribe` change them later. The server sends a
//! device only the changes to rows its subscriptions hold (tables no stream
//! names go to everyone), a row that moves in whole, a row that moves out as
//! [`crate::RowOp::Evict`], and each subscription's initial load as `Rows`
//! chunks. Because filtered entries are not sent, `Changes` says the cursor
//! the device has reached explicitly.

use serde::{Deserialize, Serialize};

use std::collections::BTreeMap;

use crate::change::{LogEntry, Mutation, RowChange};
use crate::filter::Param;
use crate::hlc::Hlc;
use crate::value::Value;

/// 2: `Welcome` names the largest frame the server accepts and builds and
/// the last mutation number it processed from the device; a log entry
/// carries the digest of the mutation it applied.
/// 3: a mutation carries its `base` (the device's cursor when made), and
/// column changes may be counter deltas, set element adds and removes, and
/// text edits.
/// 4: subscriptions (`Hello.subscriptions`, `Subscribe`, `Unsubscribe`,
/// `Rows`, `SubscriptionRefused`), `Changes.cursor`, `RowOp::Evict`; rooms
/// (`Join`, `Leave`, `Broadcast`, `Heartbeat`; `Presence`, `Relay`,
/// `RoomRefused`).
/// 5: identity and read rules (`Hello.token`, `Reload`).
/// 6: `Hello.reloaded` and `Reload.access`, so that a `Reload` lost with its
/// connection is made good on the next one; `Hello.first_pending`, so that
/// acks of compacted entries lost with a connection are sent again;
/// `Unsubscribed`, so that a device evicts an unsubscribed stream's rows
/// only after the entries routed by it.
/// 7: `Mutation.schema_version` (schema changes), `SCHEMA_AHEAD`.
pub const PROTOCOL_VERSION: u16 = 7;

/// What a device last re-loaded for (see [`ServerMsg::Reload`]), as it
/// tells the server in its `Hello`. Zeros for a device that never got a
/// `Reload`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reloaded {
    /// The cursor of the last `Reload` the device took.
    pub cursor: u64,
    /// That `Reload`'s `access`: the digest of the schema's version, and
    /// under `[auth]` of the read rules and the claims they read
    /// ([`crate::server::access_digest`]).
    pub access: u64,
}

/// The `access` a device records when it took a newer schema at a Welcome
/// and the server's `Reload` after it has not come yet: it differs from
/// every digest, so the device re-loads at its next connection if this one
/// ends first.
pub const RELOAD_OWED: u64 = 1;

/// A device's subscription to a stream of the schema, as it tells the
/// server (in `Hello`, and in `Subscribe`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Subscription {
    /// The device's own number for it (the same stream and parameters
    /// always get the same number on a device).
    pub id: u64,
    /// The stream's name in the schema (`[streams.NAME]`).
    pub stream: String,
    /// The stream's parameters by name.
    pub params: BTreeMap<String, Param>,
    /// How far its initial load got.
    pub load: Load,
}

/// The progress of a subscription's initial load, which reads the
/// stream's rows in primary-key order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Load {
    /// Rows with a key after this one (all rows, for None) are still to
    /// come; the ones up to it are on the device and kept current.
    After(Option<Value>),
    /// Every row is on the device and kept current.
    Done,
}

/// Default largest frame either side accepts.
pub const FRAME_BYTES_MAX: usize = 32 * 1024 * 1024;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ClientMsg {
    Hello {
        client_id: u64,
        /// The last server sequence number this device has applied.
        cursor: u64,
        /// The schema version this device has, if any.
        schema_version: Option<u64>,
        /// The device's subscriptions: the server sends their rows' changes
        /// from `cursor` on, and continues their initial loads.
        subscriptions: Vec<Subscription>,
        /// The device user's token (a JWT), for a server under `[auth]`.
        /// It travels here, in the first frame, never in the URL.
        token: Option<String>,
        /// What the device last re-loaded for: the server re-loads it at
        /// the Welcome when its user's claims or the read rules changed
        /// since (`access`), or when the entry at `cursor` changed what
        /// its user may read and the `Reload` after it never arrived.
        reloaded: Reloaded,
        /// The device's first pending mutation number (0: none pending). The
        /// server acks, right after the Welcome, every one from it on whose
        /// log entry compaction removed (`Acked`), so a device that lost
        /// those acks with a connection (they follow the Welcome that moved
        /// its cursor to the log's floor) still hears of them.
        first_pending: u64,
    },
    Push {
        mutations: Vec<Mutation>,
    },
    /// Starts (or resumes) a subscription.
    Subscribe(Subscription),
    /// Ends a subscription; the device evicts the rows no other one holds.
    Unsubscribe {
        id: u64,
    },
    /// Joins `room` as this device's tab `tab` with presence `state` (JSON
    /// text), or sets the state of that member. Ephemeral, as are the three
    /// below: never in the log, the outbox or a database (see `rooms`).
    Join {
        room: String,
        tab: u64,
        state: String,
    },
    /// Tab `tab` leaves `room`.
    Leave {
        room: String,
        tab: u64,
    },
    /// A fire-and-forget `message` (JSON text) for the room's other members,
    /// coalesced latest-wins per sender by the server.
    Broadcast {
        room: String,
        tab: u64,
        message: String,
    },
    /// Nothing but "this device is alive": a device in a room says something
    /// at least every `rooms::HEARTBEAT_INTERVAL_MS`.
    Heartbeat,
}

/// A room member: a device's tab.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct MemberId {
    pub client_id: u64,
    pub tab: u64,
}

/// A room member as the server tells it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Member {
    pub id: MemberId,
    /// Its presence state, JSON text.
    pub state: String,
    /// When it joined, in the server's milliseconds since the Unix epoch.
    pub since_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ServerMsg {
    Welcome {
        server_seq: u64,
        /// The log's floor: compaction removed every entry up to it (0:
        /// none). A device whose cursor is below it cannot catch up from the
        /// log: it drops (locally) every row its pending writes do not touch,
        /// restarts the load of each subscription, loads every whole table as
        /// the pseudo-subscription `*TABLE` (see [`whole_table_stream`]), and
        /// takes the floor as its cursor (a write to a row no load has
        /// brought back yet carries as its `base` the cursor it had before).
        /// The server's link does the same.
        floor: u64,
        schema_version: u64,
        /// The schema's TOML text, sent when the device's version differs.
        schema: Option<String>,
        /// The largest frame, in bytes, the server accepts from this device
        /// and builds for it. A device keeps its pushes under it.
        frame_bytes_max: u64,
        /// The last mutation sequence number the server has processed from
        /// this client id. A device whose own next number is not past it has
        /// lost the end of its history (restored from an older copy, or
        /// storage that dropped its last commits): it catches up before it
        /// sends anything, so that the acks of the mutations the server
        /// already has reach it first.
        last_seq: u64,
        /// The latest stamp the server has merged: the device's clock
        /// observes it, so that its next writes stamp later than every write
        /// up to its cursor, including those it was sent nothing of (rows
        /// outside its subscriptions, which may later reach it whole).
        hlc: Hlc,
    },
    Changes {
        entries: Vec<LogEntry>,
        /// The server sequence number the device has reached with these
        /// entries: past the last one when later entries held nothing for it.
        cursor: u64,
        /// At least the latest stamp of every entry up to `cursor`, sent or
        /// not; the device's clock observes it.
        hlc: Hlc,
        /// True when these entries reach the server's head as of sending.
        caught_up: bool,
    },
    Rejected {
        client_seq: u64,
        code: String,
        reason: String,
    },
    /// A fatal error; the server closes the connection after it.
    Error { code: String, message: String },
    /// A chunk of a subscription's initial load: rows of the stream as of
    /// `cursor` (the device has every change up to it), each an inserting
    /// upsert with every column, in primary-key order.
    Rows {
        id: u64,
        cursor: u64,
        /// At least the latest stamp of the writes these rows hold.
        hlc: Hlc,
        rows: Vec<RowChange>,
        /// The key of the last row read (None when the chunk is empty).
        last: Option<Value>,
        /// True when the load is complete.
        done: bool,
    },
    /// What this device's user may read of `tables` changed at `cursor` (a
    /// lookup a read rule makes, such as a membership, gained or lost rows;
    /// or, right after the Welcome, the user's claims, the read rules or
    /// the schema's version, with or without `[auth]`):
    /// right after the entries up to `cursor`, the device re-loads those
    /// tables. Every subscription to them loads again from its first row
    /// and each of them that syncs whole loads as a `*TABLE`
    /// pseudo-subscription; the rows the device holds stay until their
    /// tables' loads finish, then those no load brought back are evicted.
    /// The server's link does the same at the same point. The device keeps
    /// `cursor` and `access` (the digest of the schema version, rules and
    /// claims it now reads under) and says them in its next `Hello` ([`Reloaded`]), so a
    /// `Reload` lost with its connection happens on the next one: the
    /// server sees that the entry at the device's cursor changed its access
    /// ([`crate::server::read_access`]) and that the device has not
    /// re-loaded since. `tables` may be empty: the device just records
    /// `access` (a device with nothing yet, or one re-loading everything
    /// after compaction).
    Reload {
        cursor: u64,
        tables: Vec<String>,
        access: u64,
    },
    /// The server refused a subscription (`BAD_SUBSCRIPTION`, `LIMIT`):
    /// the device drops it.
    SubscriptionRefused {
        id: u64,
        code: String,
        reason: String,
    },
    /// Who is in `room`: with `full`, the whole list (replacing what the
    /// device had), otherwise the members that joined or changed state and
    /// the ones that left. Sent while the device has a tab in the room.
    Presence {
        room: String,
        full: bool,
        members: Vec<Member>,
        left: Vec<MemberId>,
    },
    /// A member's broadcast, relayed to the room's other members.
    Relay {
        room: String,
        from: MemberId,
        message: String,
    },
    /// The server refused a room message (`BAD_ROOM`, `PRESENCE_TOO_LARGE`,
    /// `MESSAGE_TOO_LARGE`, `BAD_JSON`, `TOO_MANY_ROOMS`, `ROOM_FULL`,
    /// `NOT_IN_ROOM`); for a `Join`, the tab is not (or no longer) in the room.
    RoomRefused {
        room: String,
        tab: u64,
        code: String,
        reason: String,
    },
    /// The mutation `client_seq` of this device was applied as log entry
    /// `server_seq`, which compaction has since removed: the answer to a
    /// re-send of it, in place of the entry. Its effect is in the rows the
    /// device (re-)loads.
    /// `digest` is the applied mutation's [`Mutation::digest`]: a device
    /// holding other content under that number lost the end of its history
    /// and takes a new client id, as for an entry of other content.
    ///
    /// [`Mutation::digest`]: crate::change::Mutation::digest
    Acked {
        client_seq: u64,
        server_seq: u64,
        digest: u64,
    },
    /// The answer to `Unsubscribe { id }`, in order with the changes: every
    /// entry sent before it was routed by the device's subscriptions with
    /// `id` among them, every entry after it without. A device unsubscribing
    /// while connected keeps the stream's rows until this arrives, then
    /// evicts those no other subscription holds; evicting earlier would lose
    /// a row that an entry already on its way moves into another stream the
    /// device keeps (sent as the change alone, for a row the device would no
    /// longer have).
    Unsubscribed { id: u64 },
}

/// The name of the pseudo-subscription a device re-loading after
/// compaction uses for a table no stream names: `*` and the table's name
/// (no stream name can start with `*`).
pub fn whole_table_stream(table: &str) -> String {
    format!("*{table}")
}

/// The table of a [`whole_table_stream`] name.
pub fn whole_table_of(stream: &str) -> Option<&str> {
    stream.strip_prefix('*')
}

/// The pseudo-subscriptions that re-load every table no stream names, from
/// its first row, as a device and its link both make them when the device's
/// cursor is below the log's floor.
pub fn whole_table_loads(schema: &crate::schema::Schema) -> Vec<Subscription> {
    schema
        .tables
        .keys()
        .filter(|t| !schema.streamed(t))
        .map(|t| whole_table_load(t))
        .collect()
}

/// The `*TABLE` pseudo-subscription that loads one whole table from its
/// first row, under the id every device gives it.
pub fn whole_table_load(table: &str) -> Subscription {
    let stream = whole_table_stream(table);
    Subscription {
        id: crate::client::subscription_id(&stream, &BTreeMap::new()),
        stream,
        params: BTreeMap::new(),
        load: Load::After(None),
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CodecError {
    #[error("frame of {size} bytes exceeds the limit of {max} bytes")]
    TooLarge { size: usize, max: usize },
    #[error(
        "protocol version mismatch: peer speaks version {theirs}, this side speaks version {ours}"
    )]
    Version { ours: u16, theirs: u16 },
    #[error("malformed frame: {0}")]
    Malformed(String),
}

fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    write_varint(&mut out, u64::from(PROTOCOL_VERSION));
    // Serializing our own in-memory types into a Vec cannot fail.
    postcard::to_extend(msg, out).expect("postcard encoding into a Vec")
}

fn decode<'a, T: Deserialize<'a>>(frame: &'a [u8], max: usize) -> Result<T, CodecError> {
    if frame.len() > max {
        return Err(CodecError::TooLarge {
            size: frame.len(),
            max,
        });
    }
    let (version, rest) = read_varint(frame)
        .ok_or_else(|| CodecError::Malformed("empty or truncated header".into()))?;
    if version != u64::from(PROTOCOL_VERSION) {
        let theirs = u16::try_from(version).unwrap_or(u16::MAX);
        return Err(CodecError::Version {
            ours: PROTOCOL_VERSION,
            theirs,
        });
    }
    let (msg, tail) =
        postcard::take_from_bytes(rest).map_err(|e| CodecError::Malformed(e.to_string()))?;
    if !tail.is_empty() {
        return Err(CodecError::Malformed(format!(
            "{} trailing bytes",
            tail.len()
        )));
    }
    Ok(msg)
}

pub fn encode_client(msg: &ClientMsg) -> Vec<u8> {
    encode(msg)
}

pub fn encode_server(msg: &ServerMsg) -> Vec<u8> {
    encode(msg)
}

pub fn decode_client(frame: &[u8], max: usize) -> Result<ClientMsg, CodecError> {
    decode(frame, max)
}

pub fn decode_server(frame: &[u8], max: usize) -> Result<ServerMsg, CodecError> {
    decode(frame, max)
}

/// The number of mutations a `Push` frame says it holds, read from its
/// header without decoding it (so a server can refuse a push of millions of
/// mutations before building them): the protocol version (varint), the
/// message's variant index (a postcard varint; `Push` is 1), then the
/// vector's length (varint). None for any other message or a short frame.
pub fn push_len(frame: &[u8]) -> Option<u64> {
    let (_, rest) = read_varint(frame)?;
    let (variant, rest) = read_varint(rest)?;
    if variant != 1 {
        return None;
    }
    read_varint(rest).map(|(len, _)| len)
}

fn write_varint(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn read_varint(bytes: &[u8]) -> Option<(u64, &[u8])> {
    let mut v = 0u64;
    for (i, b) in bytes.iter().enumerate().take(10) {
        v |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((v, &bytes[i + 1..]));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::{ColumnOp, RowChange, RowOp};
    use crate::hlc::Hlc;
    use crate::value::Value;
    use proptest::prelude::*;

    fn one_column_update() -> ClientMsg {
        ClientMsg::Push {
            mutations: vec![Mutation {
                base: 0,
                also_seen: Vec::new(),
                seq: 12_345,
                hlc: Hlc::new(1_764_000_000_000, 3),
                changes: vec![RowChange {
                    table: "todos".into(),
                    pk: Value::Text("0b6f1a52-8e2c-4c5e-9f1e-2f3a4b5c6d7e".into()),
                    op: RowOp::Upsert {
                        insert: false,
                        columns: vec![("done".into(), ColumnOp::Set(Value::Integer(1)))],
                    },
                }],
                schema_version: 0,
            }],
        }
    }

    #[test]
    fn one_column_update_is_small() {
        let frame = encode_client(&one_column_update());
        assert!(
            frame.len() < 100,
            "one-column update takes {} bytes",
            frame.len()
        );
        assert_eq!(
            decode_client(&frame, FRAME_BYTES_MAX).unwrap(),
            one_column_update()
        );
    }

    #[test]
    fn push_len_reads_the_count_from_the_header() {
        let push = |n: usize| {
            encode_client(&ClientMsg::Push {
                mutations: (0..n)
                    .map(|i| Mutation {
                        base: 0,
                        also_seen: Vec::new(),
                        seq: i as u64 + 1,
                        hlc: Hlc(7),
                        changes: Vec::new(),
                        schema_version: 0,
                    })
                    .collect(),
            })
        };
        for n in [0, 1, 3, 127, 128, 300] {
            assert_eq!(push_len(&push(n)), Some(n as u64));
        }
        let hello = encode_client(&ClientMsg::Hello {
            client_id: 1,
            cursor: 0,
            schema_version: None,
            subscriptions: Vec::new(),
            token: None,
            reloaded: Default::default(),
            first_pending: 0,
        });
        assert_eq!(push_len(&hello), None);
        assert_eq!(push_len(&[]), None);
    }

    #[test]
    fn version_mismatch_names_both_versions() {
        let mut frame = encode_client(&one_column_update());
        frame[0] = 9;
        let err = decode_client(&frame, FRAME_BYTES_MAX).unwrap_err();
        assert_eq!(
            err,
            CodecError::Version {
                ours: PROTOCOL_VERSION,
                theirs: 9
            }
        );
        assert!(
            err.to_string().contains("version 9")
                && err
                    .to_string()
                    .contains(&format!("version {PROTOCOL_VERSION}"))
        );
    }

    #[test]
    fn oversized_and_garbage_frames_are_errors() {
        let frame = encode_client(&one_column_update());
        assert!(matches!(
            decode_client(&frame, 10),
            Err(CodecError::TooLarge { .. })
        ));
        assert!(matches!(
            decode_client(&[], 100),
            Err(CodecError::Malformed(_))
        ));
        assert!(matches!(
            decode_client(&[PROTOCOL_VERSION as u8, 0xff, 0xff, 0xff], 100),
            Err(CodecError::Malformed(_))
        ));
        let mut trailing = frame.clone();
        trailing.push(0);
        assert!(matches!(
            decode_client(&trailing, FRAME_BYTES_MAX),
            Err(CodecError::Malformed(_))
        ));
    }

    fn value() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<i64>().prop_map(Value::Integer),
            any::<f64>()
                .prop_filter("NaN never equals itself", |f| !f.is_nan())
                .prop_map(Value::Real),
            ".{0,20}".prop_map(Value::Text),
            proptest::collection::vec(any::<u8>(), 0..20).prop_map(Value::Blob),
        ]
    }

    fn row_change() -> impl Strategy<Value = RowChange> {
        (
            "[a-z]{1,8}",
            value(),
            proptest::option::of(proptest::collection::vec(("[a-z]{1,6}", value()), 0..4)),
            any::<bool>(),
        )
            .prop_map(|(table, pk, cols, insert)| RowChange {
                table,
                pk,
                op: match cols {
                    None => RowOp::Delete,
                    Some(cols) => RowOp::Upsert {
                        insert,
                        columns: cols
                            .into_iter()
                            .map(|(c, v)| (c, ColumnOp::Set(v)))
                            .collect(),
                    },
                },
            })
    }

    proptest! {
        #[test]
        fn server_messages_round_trip(
            entries in proptest::collection::vec(
                (any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>(), proptest::collection::vec(row_change(), 0..4)),
                0..4),
            caught_up in any::<bool>(),
            s_max in any::<u64>(),
        ) {
            let msg = ServerMsg::Changes {
                entries: entries.into_iter().map(|(s, c, cs, h, changes)| LogEntry {
                    server_seq: s, client_id: c, client_seq: cs, hlc: Hlc(h), changes, digest: h ^ s, images: Vec::new(),
                }).collect(),
                cursor: s_max,
                hlc: Hlc(s_max),
                caught_up,
            };
            prop_assert_eq!(decode_server(&encode_server(&msg), FRAME_BYTES_MAX).unwrap(), msg);
        }

        #[test]
        fn client_messages_round_trip(seq in any::<u64>(), h in any::<u64>(), changes in proptest::collection::vec(row_change(), 0..6)) {
            let msg = ClientMsg::Push { mutations: vec![Mutation { seq, hlc: Hlc(h), base: 0, also_seen: Vec::new(), changes, schema_version: 0  }] };
            prop_assert_eq!(decode_client(&encode_client(&msg), FRAME_BYTES_MAX).unwrap(), msg);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode_client(&bytes, FRAME_BYTES_MAX);
            let _ = decode_server(&bytes, FRAME_BYTES_MAX);
        }
    }
}
