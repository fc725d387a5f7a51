//! Collaborative text: a TEXT column whose concurrent edits merge character by
//! character, through the [yrs] CRDT (the Rust port of Yjs).
//!
//! A [`TextDoc`] holds one yrs document with one root text, named [`ROOT`]. Its
//! wire and storage form is a yrs **v1 update**: [`TextDoc::state`] is the whole
//! document as one update, [`TextDoc::edit`] returns the update of one local
//! change, and [`TextDoc::apply_update`] takes any of them.
//!
//! Shapes and units:
//! - Positions and lengths ([`TextEdit`], [`TextDoc::len_chars`]) count Unicode
//!   scalar values (Rust `char`s), never bytes or UTF-16 units. yrs 0.28 only
//!   counts UTF-8 bytes or UTF-16 units (`OffsetKind::Bytes` / `Utf16`; there is no
//!   code-point kind), so the document runs with the default `Bytes` kind and this
//!   module converts char positions to byte offsets against a mirror of the text
//!   it keeps (see [`TextDoc`]). Internally yrs clocks count UTF-16 units.
//! - yrs addresses text with `u32`, so a text is limited to 4 GiB of UTF-8.
//! - Client ids are any `u64`; yrs wants 53 bits (see [`yrs_client_id`]).
//!
//! Garbage collection: yrs garbage-collects by default (`Options::skip_gc` is
//! `false`): when a transaction that deleted text commits, the deleted
//! characters are dropped and only their ids stay, as `GC`/`Deleted` ranges of a
//! few bytes each. So [`TextDoc::state`] stays near the text's own size plus
//! metadata per run of insertions and deletions, not the size of everything
//! ever typed.
//!
//! Missing bases: yrs silently parks an update whose dependencies it has not
//! seen (a gap in a client's clock, an item next to text it does not know, a
//! delete of an unknown id) as "pending" and applies it later. Hearth wants an
//! explicit answer instead, so [`TextDoc::apply_update`] first walks the
//! update's blocks against the document's state vector, the way yrs orders
//! them, and refuses with [`TextError::MissingBase`] before touching anything.
//! The walk costs time linear in the update's size, not the document's.
//!
//! This module depends on `std`, `yrs` and `similar` only (no `crate::` paths),
//! so tests can include it by `#[path]`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;

use yrs::block::ItemContent;
use yrs::encoding::read::{Cursor, Read};
use yrs::updates::decoder::{Decode, Decoder, DecoderV1};
use yrs::{
    ClientID, Doc, GetString, Options, ReadTxn, StateVector, Text, TextRef, Transact, Update, ID,
};

/// The name of the one root text every Hearth text document uses.
pub const ROOT: &str = "t";

/// Myers diff in [`TextDoc::replace_with`] runs only when the changed middle
/// (old plus new chars, after the common prefix and suffix) is at most this
/// long; above it, the middle is replaced as one edit. Myers costs
/// O((N+M)·D), so this bounds one call to about 16 M steps.
const MAX_DIFF_CHARS: usize = 4096;

/// One edit by position: at `index` (counted in Unicode scalar values, i.e. Rust
/// `char`s), delete `delete` chars, then insert `insert`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TextEdit {
    /// Position in chars, in the text as it is when this edit runs.
    pub index: u64,
    /// Number of chars deleted at `index`.
    pub delete: u64,
    /// Text inserted at `index` after the deletion.
    pub insert: String,
}

/// Why a [`TextDoc`] refused an update or an edit. The document is unchanged
/// after any error.
#[derive(Debug, PartialEq, Eq)]
pub enum TextError {
    /// The bytes are not a yrs v1 update/state (or are one that holds something
    /// other than plain text under the root [`ROOT`]).
    Malformed(String),
    /// The update builds on edits this document has not seen (yrs would hold it
    /// as pending); it was NOT applied.
    MissingBase,
    /// An edit's range falls outside the text (`index + delete > len`, in chars).
    OutOfRange {
        /// The edit's index, in chars.
        index: u64,
        /// The edit's delete count, in chars.
        delete: u64,
        /// The text's length in chars when the edit was to run.
        len: u64,
    },
}

impl fmt::Display for TextError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TextError::Malformed(why) => write!(f, "malformed text update: {why}"),
            TextError::MissingBase => {
                write!(f, "text update builds on edits this document has not seen")
            }
            TextError::OutOfRange { index, delete, len } => write!(
                f,
                "text edit out of range: index {index} + delete {delete} > length {len} (chars)"
            ),
        }
    }
}

impl std::error::Error for TextError {}

/// Reduces any `u64` to a yrs client id (53 bits, as Yjs's are JavaScript
/// numbers), deterministically: ids in `1..2^53` map to themselves; higher
/// bits are dropped; a result of 0 becomes `2^52 | (id >> 53)`, never 0.
pub fn yrs_client_id(client_id: u64) -> u64 {
    const MASK: u64 = (1 << 53) - 1;
    let low = client_id & MASK;
    if low != 0 {
        low
    } else {
        (1 << 52) | (client_id >> 53)
    }
}

/// One collaborative text: a yrs document with the root text [`ROOT`].
///
/// Besides the yrs document it keeps the current text as a `String` (with its
/// length in chars), so that char positions become byte offsets by scanning
/// one contiguous string, and in O(1) when the text is ASCII. The mirror is
/// refreshed lazily after remote updates, at the next call that needs it.
pub struct TextDoc {
    doc: Doc,
    text: TextRef,
    /// The current text and its length in chars, when known.
    mirror: Option<(String, u64)>,
}

impl TextDoc {
    /// An empty document whose own edits carry `client_id` (any `u64`, reduced
    /// by [`yrs_client_id`]).
    pub fn new(client_id: u64) -> TextDoc {
        let mut options = Options::with_client_id(ClientID::new(yrs_client_id(client_id)));
        // Stated, though it is yrs's default: deleted content is collected.
        options.skip_gc = false;
        let doc = Doc::with_options(options);
        let text = doc.get_or_insert_text(ROOT);
        TextDoc {
            doc,
            text,
            mirror: Some((String::new(), 0)),
        }
    }

    /// A document from `state` (what [`TextDoc::state`] returned, or any v1
    /// update) whose own edits carry `client_id`.
    ///
    /// Errors: [`TextError::Malformed`] for bytes that are not an update,
    /// [`TextError::MissingBase`] for an update that needs earlier ones.
    pub fn load(state: &[u8], client_id: u64) -> Result<TextDoc, TextError> {
        let mut doc = TextDoc::new(client_id);
        doc.apply_update(state)?;
        Ok(doc)
    }

    /// A document holding exactly `text` as made by `client_id`, for a text
    /// column that already holds a plain string (an inserted row, a value
    /// written outside Hearth).
    ///
    /// Deterministic: the same `(text, client_id)` gives byte-identical
    /// [`TextDoc::state`] on every machine (one insertion at clock 0 by that
    /// client), so the server and devices may each build it and then exchange
    /// updates. Because of that, `client_id` here should name the *value*
    /// (one id reserved for seeding), not a device that also edits: two
    /// documents that edit under the same client id diverge.
    pub fn from_text(text: &str, client_id: u64) -> TextDoc {
        let mut doc = TextDoc::new(client_id);
        if !text.is_empty() {
            let mut txn = doc.doc.transact_mut();
            doc.text.insert(&mut txn, 0, text);
        }
        doc.mirror = Some((text.to_owned(), text.chars().count() as u64));
        doc
    }

    /// The whole state as a yrs v1 update (against an empty state vector).
    pub fn state(&self) -> Vec<u8> {
        self.doc
            .transact()
            .encode_state_as_update_v1(&StateVector::default())
    }

    /// The current text.
    pub fn text(&self) -> String {
        match &self.mirror {
            Some((text, _)) => text.clone(),
            None => self.text.get_string(&self.doc.transact()),
        }
    }

    /// Length in chars.
    pub fn len_chars(&self) -> u64 {
        match &self.mirror {
            Some((_, chars)) => *chars,
            None => self.text.get_string(&self.doc.transact()).chars().count() as u64,
        }
    }

    /// Applies a remote update. Idempotent and commutative: applying the same
    /// updates in any order, any number of times, gives the same text. An
    /// empty slice (what [`TextDoc::edit`] returns for no change) is no update.
    ///
    /// Errors, with the document unchanged: [`TextError::Malformed`] for bytes
    /// that are not a v1 update of plain text under [`ROOT`];
    /// [`TextError::MissingBase`] when the update depends on blocks or deletes
    /// ids this document has not seen (apply the missing updates first).
    pub fn apply_update(&mut self, update: &[u8]) -> Result<(), TextError> {
        if update.is_empty() {
            return Ok(());
        }
        // The walk first, so that yrs decodes only what it has checked (found by fuzz/,
        // target text_update): it reads every block and delete range it counts, so an
        // update claiming more than its bytes hold is refused before yrs reserves memory
        // for the claimed counts (a 20-byte update asked for 71 GB); and it refuses the
        // values yrs's decoder would panic on in a debug build (a client id past 53 bits,
        // a clock past u32).
        let scanned = scan_blocks(update)?;
        let decoded = Update::decode_v1(update).map_err(|e| TextError::Malformed(e.to_string()))?;
        {
            let txn = self.doc.transact();
            check_integrable(&txn.state_vector(), scanned)?;
        }
        if decoded.is_empty() {
            return Ok(());
        }
        let mut txn = self.doc.transact_mut();
        txn.apply_update(decoded)
            .map_err(|e| TextError::Malformed(e.to_string()))?;
        // The walk above mirrors yrs's own dependency rules, so nothing can be
        // left pending; this is only a guard against the two drifting apart.
        debug_assert!(
            !txn.has_missing_updates(),
            "yrs kept part of an update pending"
        );
        drop(txn);
        self.mirror = None;
        Ok(())
    }

    /// Applies local edits in order (each index relative to the text after the
    /// previous edit) as one yrs transaction, and returns the v1 update of just
    /// this change. No edits, or only no-op edits (nothing deleted, nothing
    /// inserted), return an empty `Vec` and change nothing.
    ///
    /// Errors: [`TextError::OutOfRange`] if any edit's range falls outside the
    /// text as it would be then; nothing is applied.
    pub fn edit(&mut self, edits: &[TextEdit]) -> Result<Vec<u8>, TextError> {
        let (text, mut len) = self.mirror();
        // Validate every edit before touching anything, on lengths alone.
        let mut max_bytes = text.len() as u64;
        let mut any = false;
        for e in edits {
            let inserted = e.insert.chars().count() as u64;
            max_bytes += e.insert.len() as u64;
            let end = e.index.checked_add(e.delete);
            // yrs addresses text with u32 byte offsets.
            if end.is_none_or(|end| end > len) || max_bytes > u64::from(u32::MAX) {
                return Err(TextError::OutOfRange {
                    index: e.index,
                    delete: e.delete,
                    len,
                });
            }
            len = len - e.delete + inserted;
            any |= e.delete > 0 || inserted > 0;
        }
        if !any {
            return Ok(Vec::new());
        }
        let (mut mirror, mut chars) = self.mirror.take().expect("mirror refreshed above");
        let update = {
            let mut txn = self.doc.transact_mut();
            for e in edits {
                if e.delete == 0 && e.insert.is_empty() {
                    continue;
                }
                let ascii = mirror.len() as u64 == chars;
                let (start, end) = if ascii {
                    (e.index as usize, (e.index + e.delete) as usize)
                } else {
                    let start = advance_chars(&mirror, 0, e.index);
                    (start, advance_chars(&mirror, start, e.delete))
                };
                // Both fit in u32: checked above against the largest the text can get.
                if end > start {
                    self.text
                        .remove_range(&mut txn, start as u32, (end - start) as u32);
                }
                if !e.insert.is_empty() {
                    self.text.insert(&mut txn, start as u32, &e.insert);
                }
                mirror.replace_range(start..end, &e.insert);
                chars = chars - e.delete + e.insert.chars().count() as u64;
            }
            txn.encode_update_v1()
        };
        self.mirror = Some((mirror, chars));
        Ok(update)
    }

    /// Turns the current text into `new` by a character diff, applied as
    /// edits; returns the update as [`TextDoc::edit`] does (empty if equal).
    ///
    /// The common prefix and suffix are trimmed first (linear time), so typing
    /// one char into a long text costs O(n). The changed middle is diffed with
    /// Myers's algorithm when it is at most a few thousand chars, so a rewrite
    /// that changes two separate places becomes two edits and merges with
    /// concurrent edits between them; a longer middle is replaced whole.
    pub fn replace_with(&mut self, new: &str) -> Vec<u8> {
        let (old, _) = self.mirror();
        let edits = diff(old, new);
        self.edit(&edits)
            .expect("a diff against the current text is always in range")
    }

    /// Merges several updates into one (yrs `merge_updates_v1`), to compact an
    /// outbox or a log. The result applies like all of them together.
    ///
    /// Empty slices (no change) are skipped.
    ///
    /// Errors: [`TextError::Malformed`] if any input is not a v1 update of plain
    /// text under [`ROOT`] (as [`TextDoc::apply_update`] takes).
    pub fn merge_updates(updates: &[&[u8]]) -> Result<Vec<u8>, TextError> {
        let updates: Vec<&[u8]> = updates.iter().copied().filter(|u| !u.is_empty()).collect();
        for u in &updates {
            // As in `apply_update`: checked before yrs decodes it.
            scan_blocks(u)?;
            Update::decode_v1(u).map_err(|e| TextError::Malformed(e.to_string()))?;
        }
        yrs::merge_updates_v1(&updates).map_err(|e| TextError::Malformed(e.to_string()))
    }

    /// The mirror, read back from yrs if a remote update made it stale.
    fn mirror(&mut self) -> (&str, u64) {
        if self.mirror.is_none() {
            let text = self.text.get_string(&self.doc.transact());
            let chars = text.chars().count() as u64;
            self.mirror = Some((text, chars));
        }
        let (text, chars) = self.mirror.as_ref().expect("just set");
        (text, *chars)
    }
}

/// The byte offset `n` chars after byte offset `from` in `s` (or `s.len()`).
/// Counts whole 64-byte chunks at a time (a char starts at every byte that is
/// not a UTF-8 continuation byte), then finishes byte by byte.
fn advance_chars(s: &str, from: usize, n: u64) -> usize {
    let bytes = &s.as_bytes()[from..];
    let is_start = |b: &u8| (*b as i8) >= -64;
    let mut remaining = n;
    let mut pos = 0;
    while pos + 64 <= bytes.len() {
        let starts = bytes[pos..pos + 64].iter().filter(|b| is_start(b)).count() as u64;
        if starts > remaining {
            break;
        }
        remaining -= starts;
        pos += 64;
    }
    while pos < bytes.len() {
        if is_start(&bytes[pos]) {
            if remaining == 0 {
                break;
            }
            remaining -= 1;
        }
        pos += 1;
    }
    from + pos
}

/// The edits that turn `old` into `new`: common prefix and suffix trimmed,
/// then a Myers diff of the middle if it is small (see [`MAX_DIFF_CHARS`]).
fn diff(old: &str, new: &str) -> Vec<TextEdit> {
    let (mut prefix_bytes, mut prefix_chars) = (0usize, 0u64);
    for (a, b) in old.chars().zip(new.chars()) {
        if a != b {
            break;
        }
        prefix_bytes += a.len_utf8();
        prefix_chars += 1;
    }
    let (old_rest, new_rest) = (&old[prefix_bytes..], &new[prefix_bytes..]);
    let mut suffix_bytes = 0usize;
    for (a, b) in old_rest.chars().rev().zip(new_rest.chars().rev()) {
        if a != b {
            break;
        }
        suffix_bytes += a.len_utf8();
    }
    let old_mid = &old_rest[..old_rest.len() - suffix_bytes];
    let new_mid = &new_rest[..new_rest.len() - suffix_bytes];
    if old_mid.is_empty() && new_mid.is_empty() {
        return Vec::new();
    }
    let old_chars: Vec<char> = old_mid.chars().collect();
    let new_chars: Vec<char> = new_mid.chars().collect();
    if old_chars.is_empty()
        || new_chars.is_empty()
        || old_chars.len() + new_chars.len() > MAX_DIFF_CHARS
    {
        return vec![TextEdit {
            index: prefix_chars,
            delete: old_chars.len() as u64,
            insert: new_mid.to_owned(),
        }];
    }
    let slice = |at: usize, len: usize| new_chars[at..at + len].iter().collect::<String>();
    // Each op's `new_index` is where it lands once the ops before it ran.
    similar::capture_diff_slices(similar::Algorithm::Myers, &old_chars, &new_chars)
        .into_iter()
        .filter_map(|op| match op {
            similar::DiffOp::Equal { .. } => None,
            similar::DiffOp::Delete {
                old_len, new_index, ..
            } => Some(TextEdit {
                index: prefix_chars + new_index as u64,
                delete: old_len as u64,
                insert: String::new(),
            }),
            similar::DiffOp::Insert {
                new_index, new_len, ..
            } => Some(TextEdit {
                index: prefix_chars + new_index as u64,
                delete: 0,
                insert: slice(new_index, new_len),
            }),
            similar::DiffOp::Replace {
                old_len,
                new_index,
                new_len,
                ..
            } => Some(TextEdit {
                index: prefix_chars + new_index as u64,
                delete: old_len as u64,
                insert: slice(new_index, new_len),
            }),
        })
        .collect()
}

/// One block of an update, as far as integration order cares: its clock
/// range and the ids it must find already present.
struct ScannedBlock {
    clock: u32,
    len: u32,
    /// Origin, right origin and parent item, when the block names them.
    deps: Vec<ID>,
}

// Block kinds and flags of the v1 encoding (lib0 / Yjs), as yrs reads them.
const BLOCK_GC: u8 = 0;
const BLOCK_SKIP: u8 = 10;
const HAS_ORIGIN: u8 = 0b1000_0000;
const HAS_RIGHT_ORIGIN: u8 = 0b0100_0000;
const HAS_PARENT_SUB: u8 = 0b0010_0000;
// Content kinds (an item's info & 0b1111), as yrs's `ItemContent::decode` reads them.
const CONTENT_DELETED: u8 = 1;
const CONTENT_STRING: u8 = 4;

/// A v1 update as [`scan_blocks`] reads it.
struct Scanned {
    /// Its blocks, per client in clock order.
    blocks: Vec<(ClientID, VecDeque<ScannedBlock>)>,
    /// Its delete set: (client, clocks) ranges.
    deletes: Vec<(ClientID, std::ops::Range<u32>)>,
}

/// Reads the blocks and the delete set of a v1 update, the way yrs decodes
/// them. Only plain text under [`ROOT`] is accepted: string and deleted
/// content, GC and skip ranges. Client ids past 53 bits, clocks past `u32` and
/// a client's blocks listed twice are malformed (yrs's decoder would
/// `debug_assert` on the first, overflow on the second, and integrate the third
/// out of order).
fn scan_blocks(update: &[u8]) -> Result<Scanned, TextError> {
    let bad = |e: yrs::encoding::read::Error| TextError::Malformed(e.to_string());
    let past_u32 = || TextError::Malformed("clock overflow".into());
    let mut decoder = DecoderV1::new(Cursor::new(update));
    // yrs's `read_client` and `read_id`, with the client id checked first.
    let read_client = |decoder: &mut DecoderV1| -> Result<ClientID, TextError> {
        let client: u64 = decoder.read_var().map_err(bad)?;
        if client >> 53 != 0 {
            return Err(TextError::Malformed(format!(
                "client id {client} is over 53 bits"
            )));
        }
        Ok(ClientID::new(client))
    };
    let read_id = |decoder: &mut DecoderV1| -> Result<ID, TextError> {
        let client = read_client(decoder)?;
        Ok(ID::new(client, decoder.read_var().map_err(bad)?))
    };
    let clients: u32 = decoder.read_var().map_err(bad)?;
    let mut out: Vec<(ClientID, VecDeque<ScannedBlock>)> = Vec::new();
    let mut listed = HashSet::new();
    for _ in 0..clients {
        let count: u32 = decoder.read_var().map_err(bad)?;
        let client = read_client(&mut decoder)?;
        // yrs appends a second list of the same client's blocks to the first, out of
        // clock order, and trips over it when integrating; no encoder writes one.
        if !listed.insert(client) {
            return Err(TextError::Malformed(format!(
                "client {} listed twice",
                client.get()
            )));
        }
        let mut clock: u32 = decoder.read_var().map_err(bad)?;
        let mut blocks = VecDeque::new();
        for _ in 0..count {
            let info = decoder.read_info().map_err(bad)?;
            // The whole info byte, as yrs matches it: a GC or skip block has no
            // flags (with flags, the same low bits start an item).
            let (len, deps) = match info {
                BLOCK_SKIP => {
                    let len: u32 = decoder.read_var().map_err(bad)?;
                    // A hole: nothing to integrate, the clock moves on.
                    clock = clock.checked_add(len).ok_or_else(past_u32)?;
                    continue;
                }
                BLOCK_GC => (decoder.read_len().map_err(bad)?, Vec::new()),
                _ => {
                    let mut deps = Vec::new();
                    if info & HAS_ORIGIN != 0 {
                        deps.push(read_id(&mut decoder)?);
                    }
                    if info & HAS_RIGHT_ORIGIN != 0 {
                        deps.push(read_id(&mut decoder)?);
                    }
                    if info & (HAS_ORIGIN | HAS_RIGHT_ORIGIN) == 0 {
                        if decoder.read_parent_info().map_err(bad)? {
                            let name = decoder.read_string().map_err(bad)?;
                            if name != ROOT {
                                return Err(TextError::Malformed(format!(
                                    "an item under root {name:?}, not {ROOT:?}"
                                )));
                            }
                        } else {
                            return Err(TextError::Malformed(
                                "an item inside a nested type".into(),
                            ));
                        }
                        if info & HAS_PARENT_SUB != 0 {
                            return Err(TextError::Malformed("a map entry, not text".into()));
                        }
                    }
                    // Only string and deleted content are decoded: yrs reserves memory
                    // for the claimed length of other kinds before reading them.
                    let content_ref = info & 0b1111;
                    if content_ref != CONTENT_DELETED && content_ref != CONTENT_STRING {
                        return Err(TextError::Malformed(format!(
                            "content other than plain text (kind {content_ref})"
                        )));
                    }
                    let content = ItemContent::decode(&mut decoder, info).map_err(bad)?;
                    (content.len_utf16(), deps)
                }
            };
            if len == 0 {
                // yrs drops empty blocks without moving the clock.
                continue;
            }
            blocks.push_back(ScannedBlock { clock, len, deps });
            clock = clock.checked_add(len).ok_or_else(past_u32)?;
        }
        out.push((client, blocks));
    }
    // The delete set (yrs's `IdSet::decode`): per client, (clock, length) ranges.
    let mut deletes = Vec::new();
    let delete_clients: u32 = decoder.read_var().map_err(bad)?;
    for _ in 0..delete_clients {
        decoder.reset_ds_cur_val();
        let client = read_client(&mut decoder)?;
        let ranges: u32 = decoder.read_var().map_err(bad)?;
        for _ in 0..ranges {
            let start = decoder.read_ds_clock().map_err(bad)?;
            let len = decoder.read_ds_len().map_err(bad)?;
            let end = start.checked_add(len).ok_or_else(past_u32)?;
            deletes.push((client, start..end));
        }
    }
    Ok(Scanned {
        blocks: out,
        deletes,
    })
}

/// Whether yrs could integrate every block and delete of `update` into a
/// document at `state`, leaving nothing pending. Blocks integrate in clock
/// order per client once their clock meets the client's state (no gap) and
/// every id they name is present; blocks of one client may wait for another
/// client's blocks of the same update, so this runs to a fixed point.
fn check_integrable(state: &StateVector, scanned: Scanned) -> Result<(), TextError> {
    let Scanned {
        mut blocks,
        deletes,
    } = scanned;
    let mut seen: HashMap<ClientID, u32> = HashMap::new();
    let clock_of = |seen: &HashMap<ClientID, u32>, c: &ClientID| {
        seen.get(c).copied().unwrap_or_else(|| state.get(c))
    };
    loop {
        let mut progress = false;
        for (client, queue) in blocks.iter_mut() {
            while let Some(b) = queue.front() {
                let have = clock_of(&seen, client);
                let known = b.clock + b.len <= have;
                let ready =
                    b.clock <= have && b.deps.iter().all(|d| d.clock < clock_of(&seen, &d.client));
                if !known && !ready {
                    break;
                }
                if !known {
                    seen.insert(*client, b.clock + b.len);
                }
                queue.pop_front();
                progress = true;
            }
        }
        if !progress {
            break;
        }
    }
    if blocks.iter().any(|(_, q)| !q.is_empty()) {
        return Err(TextError::MissingBase);
    }
    // yrs applies a delete range that starts below the client's clock and ends
    // at or below it; any other (even an empty one) it keeps pending.
    for (client, range) in &deletes {
        let have = clock_of(&seen, client);
        if range.start >= have || range.end > have {
            return Err(TextError::MissingBase);
        }
    }
    Ok(())
}
