//! The collaborative-text module (`engine/src/merge/text.rs`) on its own:
//! concurrent edits converge with both sides' intent kept, positions count
//! chars, errors leave the document as it was, and real editing traces replay
//! to their recorded end.
//!
//! The traces are josephg/editing-traces (CC BY 4.0), in
//! `tests/fixtures/editing-traces/` (see its README.md).

#[path = "../src/merge/text.rs"]
mod text;

use std::collections::HashSet;
use std::io::Read as _;
use std::path::Path;
use std::time::{Duration, Instant};

use text::{TextDoc, TextEdit, TextError};
use yrs::updates::decoder::Decode;
use yrs::{GetString, ReadTxn, Text, Transact, Update};

fn ins(index: u64, s: &str) -> TextEdit {
    TextEdit {
        index,
        delete: 0,
        insert: s.to_owned(),
    }
}

fn del(index: u64, n: u64) -> TextEdit {
    TextEdit {
        index,
        delete: n,
        insert: String::new(),
    }
}

/// Two devices (client ids 2 and 3) that both start from `base`, as made by
/// client 1.
fn fork(base: &str) -> (TextDoc, TextDoc) {
    let seed = TextDoc::from_text(base, 1).state();
    (
        TextDoc::load(&seed, 2).unwrap(),
        TextDoc::load(&seed, 3).unwrap(),
    )
}

/// `a` and `b` made one update each from the same base; deliver them both
/// ways, each twice, and to a third copy of the base in the other order.
/// Returns the text all three agree on.
fn exchange(base: &str, a: &mut TextDoc, ua: &[u8], b: &mut TextDoc, ub: &[u8]) -> String {
    a.apply_update(ub).unwrap();
    a.apply_update(ub).unwrap();
    a.apply_update(ua).unwrap(); // its own update again: a no-op
    b.apply_update(ua).unwrap();
    b.apply_update(ua).unwrap();
    let mut c = TextDoc::load(&TextDoc::from_text(base, 1).state(), 4).unwrap();
    c.apply_update(ub).unwrap();
    c.apply_update(ua).unwrap();
    c.apply_update(ub).unwrap();
    assert_eq!(a.text(), b.text());
    assert_eq!(a.text(), c.text());
    assert_eq!(a.len_chars(), a.text().chars().count() as u64);
    assert_eq!(b.len_chars(), a.len_chars());
    a.text()
}

#[test]
fn disjoint_concurrent_edits_both_survive() {
    let base = "The quick brown fox jumps over the lazy dog.";
    let (mut a, mut b) = fork(base);
    let ua = a.edit(&[del(4, 6), ins(4, "slow ")]).unwrap(); // quick -> slow
    let ub = b.edit(&[del(35, 4), ins(35, "sleepy")]).unwrap(); // lazy -> sleepy
    let merged = exchange(base, &mut a, &ua, &mut b, &ub);
    assert_eq!(merged, "The slow brown fox jumps over the sleepy dog.");
}

#[test]
fn overlapping_deletes_delete_once_and_inserts_survive() {
    let base = "0123456789";
    let (mut a, mut b) = fork(base);
    let ua = a.edit(&[del(2, 5), ins(2, "A")]).unwrap(); // 23456 -> A
    let ub = b.edit(&[del(4, 5), ins(4, "B")]).unwrap(); // 45678 -> B
    let merged = exchange(base, &mut a, &ua, &mut b, &ub);
    // 2..=8 are gone (deleted by one side or both), both inserts are there.
    assert!(
        merged.starts_with("01") && merged.ends_with('9'),
        "{merged}"
    );
    let middle = &merged[2..merged.len() - 1];
    assert!(middle == "AB" || middle == "BA", "{merged}");
}

#[test]
fn inserts_at_the_same_position_both_survive_unmixed() {
    let base = "Hello world";
    let (mut a, mut b) = fork(base);
    let ua = a.edit(&[ins(5, ", dear")]).unwrap();
    let ub = b.edit(&[ins(5, " there,")]).unwrap();
    let merged = exchange(base, &mut a, &ua, &mut b, &ub);
    assert!(
        merged == "Hello, dear there, world" || merged == "Hello there,, dear world",
        "each insert stays one run: {merged}"
    );
    // Typed one keystroke at a time, the runs still do not interleave.
    let (mut a, mut b) = fork(base);
    let ua: Vec<Vec<u8>> = ", dear"
        .chars()
        .enumerate()
        .map(|(i, c)| a.edit(&[ins(5 + i as u64, &c.to_string())]).unwrap())
        .collect();
    let ub: Vec<Vec<u8>> = " there,"
        .chars()
        .enumerate()
        .map(|(i, c)| b.edit(&[ins(5 + i as u64, &c.to_string())]).unwrap())
        .collect();
    for u in &ub {
        a.apply_update(u).unwrap();
    }
    for u in ua.iter().rev().chain(&ua) {
        // Reversed first: all but the first keystroke are missing their base.
        let _ = b.apply_update(u);
    }
    assert_eq!(a.text(), b.text());
    let merged = a.text();
    assert!(
        merged == "Hello, dear there, world" || merged == "Hello there,, dear world",
        "{merged}"
    );
}

#[test]
fn insert_inside_a_concurrently_deleted_range_survives() {
    let base = "keep [delete this part] keep";
    let (mut a, mut b) = fork(base);
    let ua = a.edit(&[del(5, 18)]).unwrap(); // "[delete this part]"
    let ub = b.edit(&[ins(13, "NEW ")]).unwrap(); // inside, before "this"
    let merged = exchange(base, &mut a, &ua, &mut b, &ub);
    assert_eq!(merged, "keep NEW  keep");
}

#[test]
fn concurrent_replace_with_keeps_both_changes_without_duplicates() {
    let base = "The cat sat on the mat. It was a sunny day in the garden.";
    let (mut a, mut b) = fork(base);
    let ua = a.replace_with("The dog sat on the mat. It was a sunny day in the garden.");
    let ub = b.replace_with("The cat sat on the mat. It was a rainy day in the garden.");
    let merged = exchange(base, &mut a, &ua, &mut b, &ub);
    assert_eq!(
        merged,
        "The dog sat on the mat. It was a rainy day in the garden."
    );

    // One rewrite that changes two far-apart places, against a change between
    // them: the diff is two edits, so the middle change is kept.
    let (mut a, mut b) = fork(base);
    let ua = a.replace_with("A cat sat on the mat. It was a sunny day in the park.");
    let ub = b.replace_with("The cat sat on the mat. It was a very sunny day in the garden.");
    let merged = exchange(base, &mut a, &ua, &mut b, &ub);
    assert_eq!(
        merged,
        "A cat sat on the mat. It was a very sunny day in the park."
    );

    // Equal text: nothing to send.
    let mut c = TextDoc::from_text(base, 1);
    assert!(c.replace_with(base).is_empty());
    assert_eq!(c.state(), TextDoc::from_text(base, 1).state());
}

#[test]
fn replace_with_reaches_the_new_text_in_every_shape() {
    let cases = [
        ("", "abc"),
        ("abc", ""),
        ("abc", "abc"),
        ("abcdef", "abXYef"),
        ("aaaa", "aa"),
        ("kitten", "sitting"),
        ("e\u{301}cole 👋🏽", "école 👋🏾!"),
        ("日本語のテキスト", "日本のテキストです"),
    ];
    for (old, new) in cases {
        let mut a = TextDoc::from_text(old, 1);
        let u = a.replace_with(new);
        assert_eq!(a.text(), new, "{old:?} -> {new:?}");
        assert_eq!(u.is_empty(), old == new);
        let mut b = TextDoc::from_text(old, 1);
        b.apply_update(&u).unwrap();
        assert_eq!(b.text(), new);
    }
    // A long middle (beyond the Myers bound) is replaced whole, still right.
    let old: String = (0..5000)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let new: String = (0..5000)
        .map(|i| char::from(b'a' + (i % 7) as u8))
        .collect();
    let mut a = TextDoc::from_text(&old, 1);
    a.replace_with(&new);
    assert_eq!(a.text(), new);
}

#[test]
fn positions_count_chars_not_bytes() {
    // 👋🏽 is two scalars (hand + skin tone); é here is e + a combining accent.
    let mut d = TextDoc::from_text("a👋🏽b日本e\u{301}z", 7);
    assert_eq!(d.len_chars(), 9);
    let u = d.edit(&[ins(3, "-"), del(0, 1), ins(8, "!")]).unwrap();
    assert_eq!(d.text(), "👋🏽-b日本e\u{301}!z");
    let mut other = TextDoc::from_text("a👋🏽b日本e\u{301}z", 7);
    other.apply_update(&u).unwrap();
    assert_eq!(other.text(), d.text());
    // Delete the combining mark alone, then the skin tone alone.
    d.edit(&[del(7, 1), del(1, 1)]).unwrap();
    assert_eq!(d.text(), "👋-b日本e!z");
    assert_eq!(d.len_chars(), 8);
    // Insert at the very end.
    d.edit(&[ins(8, "末")]).unwrap();
    assert_eq!(d.text(), "👋-b日本e!z末");
}

#[test]
fn out_of_range_edits_change_nothing() {
    let mut d = TextDoc::from_text("日本語", 1);
    let before = (d.state(), d.text());
    assert_eq!(
        d.edit(&[del(2, 2)]),
        Err(TextError::OutOfRange {
            index: 2,
            delete: 2,
            len: 3
        })
    );
    assert_eq!(
        d.edit(&[ins(4, "x")]),
        Err(TextError::OutOfRange {
            index: 4,
            delete: 0,
            len: 3
        })
    );
    assert!(matches!(
        d.edit(&[del(0, u64::MAX), ins(u64::MAX, "")]),
        Err(TextError::OutOfRange { .. })
    ));
    // A valid first edit does not run when a later one is out of range; the
    // later one's length is the text's length after the first.
    assert_eq!(
        d.edit(&[ins(0, "ab"), del(4, 2)]),
        Err(TextError::OutOfRange {
            index: 4,
            delete: 2,
            len: 5
        })
    );
    assert_eq!((d.state(), d.text()), before);
    assert_eq!(d.len_chars(), 3);
    // Edits in one call see the text as the previous edit left it.
    d.edit(&[ins(0, "ab"), del(4, 1)]).unwrap();
    assert_eq!(d.text(), "ab日本");
}

#[test]
fn no_op_edits_send_nothing() {
    let mut d = TextDoc::from_text("abc", 1);
    let before = d.state();
    assert!(d.edit(&[]).unwrap().is_empty());
    assert!(d.edit(&[ins(1, ""), del(3, 0)]).unwrap().is_empty());
    assert_eq!(d.state(), before);
    // An empty update, and the empty "no change", apply as nothing.
    d.apply_update(Update::EMPTY_V1).unwrap();
    d.apply_update(&[]).unwrap();
    assert_eq!(d.state(), before);
    assert_eq!(
        TextDoc::merge_updates(&[&[], Update::EMPTY_V1]).map(|u| u.len()),
        Ok(2)
    );
}

#[test]
fn garbage_is_malformed_and_changes_nothing() {
    let mut d = TextDoc::from_text("hello", 1);
    let before = d.state();
    for bad in [
        &b"not an update"[..],
        &[0xff, 0xff, 0xff, 0xff, 0xff],
        &[1, 1, 5],
        &[0],
    ] {
        assert!(
            matches!(d.apply_update(bad), Err(TextError::Malformed(_))),
            "{bad:?}"
        );
        assert!(matches!(
            TextDoc::load(bad, 2),
            Err(TextError::Malformed(_))
        ));
    }
    // A real update cut short.
    let mut e = TextDoc::from_text("hello", 1);
    let u = e.edit(&[ins(5, " world")]).unwrap();
    assert!(matches!(
        d.apply_update(&u[..u.len() - 3]),
        Err(TextError::Malformed(_))
    ));
    assert_eq!(d.state(), before);
    assert!(matches!(
        TextDoc::merge_updates(&[&u, b"junk"]),
        Err(TextError::Malformed(_))
    ));

    // A yrs update that is not plain text under the root "t".
    let other = yrs::Doc::with_client_id(9);
    let map = other.get_or_insert_map("t2");
    {
        let mut txn = other.transact_mut();
        yrs::Map::insert(&map, &mut txn, "k", 1);
    }
    let foreign = other
        .transact()
        .encode_state_as_update_v1(&yrs::StateVector::default());
    assert!(matches!(
        d.apply_update(&foreign),
        Err(TextError::Malformed(_))
    ));
    let other = yrs::Doc::with_client_id(9);
    let t = other.get_or_insert_text("body");
    t.insert(&mut other.transact_mut(), 0, "x");
    let foreign = other
        .transact()
        .encode_state_as_update_v1(&yrs::StateVector::default());
    assert!(matches!(
        d.apply_update(&foreign),
        Err(TextError::Malformed(_))
    ));
    assert_eq!(d.state(), before);
    assert_eq!(d.text(), "hello");
}

/// Found by `fuzz/` (target `text_update`): updates of a few bytes that claim
/// billions of things. yrs's decoder reserves memory for what is claimed
/// before reading any of it (71 GB and 97 GB here: an abort under a strict
/// allocator; a smaller claim is simply granted). The block walk runs first,
/// reads what it counts and decodes only text content, so they are refused
/// for their length or kind before anything is reserved.
#[test]
fn fuzz_updates_claiming_more_than_their_bytes_are_refused_before_reserving() {
    let cases: [(&str, &[u8]); 2] = [
        // One client with 2,977,361,371 blocks.
        (
            "blocks",
            &[
                0x01, 0x8b, 0x8b, 0x8b, 0x8b, 0x8b, 0x8b, 0x8b, 0x8b, 0x01, 0x01, 0x00, 0x04, 0x01,
                0x01, 0x01, 0x74, 0x0c, 0x41, 0x01,
            ],
        ),
        // An item of `Any` content claiming billions of values.
        (
            "any values",
            &[
                0x01, 0xff, 0xff, 0x29, 0xff, 0xfc, 0x31, 0xff, 0xfe, 0x3b, 0x88, 0x31, 0xff, 0xfe,
                0x3b, 0x88, 0xfa, 0xfc, 0x80, 0xdf, 0x3c, 0x73,
            ],
        ),
    ];
    for (what, update) in cases {
        let mut d = TextDoc::from_text("hello wörld", 1);
        let before = d.state();
        for result in [
            d.apply_update(update),
            TextDoc::load(update, 7).map(|_| ()),
            TextDoc::merge_updates(&[update]).map(|_| ()),
        ] {
            match result {
                Err(TextError::Malformed(why)) => assert!(!why.contains("memory"), "{what}: {why}"),
                other => panic!("{what}: {other:?}"),
            }
        }
        assert_eq!(d.state(), before, "{what}");
    }
}

/// Found by `fuzz/` (target `text_update`): updates yrs decodes by panicking
/// in a debug build (an overflow, a `debug_assert`), or leaves pending. Each
/// is refused and changes nothing.
#[test]
fn fuzz_updates_that_broke_decoding_are_refused() {
    // 2^53 as a varint: one bit past yrs's 53-bit client ids.
    let client_2_53 = [0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x10];
    let u32_max = [0xff, 0xff, 0xff, 0xff, 0x0f];
    let cases: [(&str, Vec<u8>, bool); 6] = [
        // No blocks; deletes of client 1: one range [0, 0), then stray bytes.
        // yrs keeps an empty range of a client it has not seen pending.
        ("empty delete range", vec![0, 1, 1, 1, 0, 0, 8, 11], false),
        // A delete range [u32::MAX, u32::MAX + 1).
        (
            "delete range past u32",
            [&[0, 1, 1, 1][..], &u32_max, &[1]].concat(),
            true,
        ),
        // The same with the range's client past 53 bits.
        (
            "delete of a client past 53 bits",
            [&[0, 1][..], &client_2_53, &[1, 0, 1]].concat(),
            true,
        ),
        // One client past 53 bits, with one GC block of length 1 at clock 0.
        (
            "block of a client past 53 bits",
            [&[1, 1][..], &client_2_53, &[0, 0, 1, 0]].concat(),
            true,
        ),
        // Client 1 from clock u32::MAX: a skip of 1, then a GC block.
        (
            "skip past u32",
            [&[1, 2, 1][..], &u32_max, &[10, 1, 0, 1, 0]].concat(),
            true,
        ),
        // Client 1's GC block [0, 257) twice, in two lists of its blocks (yrs
        // overflowed integrating the second), an empty list of client 108
        // between them; no deletes, then stray bytes.
        (
            "a client listed twice",
            vec![
                0x03, 0x01, 0x01, 0x00, 0x00, 0x81, 0x82, 0x00, 0x00, 0x6c, 0x00, 0x01, 0x01, 0x00,
                0x00, 0x81, 0x82, 0x00, 0x00, 0x6c, 0x00, 0x00,
            ],
            true,
        ),
    ];
    for (what, update, malformed) in cases {
        // Made by client 2: these updates name client 1, which it has not seen.
        let mut d = TextDoc::from_text("hello", 2);
        let before = d.state();
        for result in [
            d.apply_update(&update),
            TextDoc::load(&update, 7).map(|_| ()),
        ] {
            match result {
                Err(TextError::Malformed(_)) if malformed => {}
                Err(TextError::MissingBase) if !malformed => {}
                other => panic!("{what}: {other:?}"),
            }
        }
        assert_eq!(d.state(), before, "{what}");
    }
}

/// What plain yrs does with `update` on a document at `state`: whether it
/// keeps something pending.
fn yrs_leaves_pending(state: &[u8], update: &[u8]) -> bool {
    let doc = yrs::Doc::new();
    let mut txn = doc.transact_mut();
    txn.apply_update(Update::decode_v1(state).unwrap()).unwrap();
    txn.apply_update(Update::decode_v1(update).unwrap())
        .unwrap();
    txn.has_missing_updates()
}

#[test]
fn an_update_without_its_base_is_refused_until_the_base_arrives() {
    let seed = TextDoc::from_text("base", 1).state();
    let mut a = TextDoc::load(&seed, 2).unwrap();
    let mut b = TextDoc::load(&seed, 3).unwrap();
    let u1 = a.edit(&[ins(4, " one")]).unwrap();
    let u2 = a.edit(&[ins(8, " two")]).unwrap();
    let u3 = a.edit(&[del(0, 5)]).unwrap();

    // A gap in a's clock.
    let before = b.state();
    assert!(yrs_leaves_pending(&before, &u2));
    assert_eq!(b.apply_update(&u2), Err(TextError::MissingBase));
    assert_eq!(b.state(), before);
    assert_eq!(b.text(), "base");
    // A delete of text b has not seen (a's " one", deleted by a third client).
    let u_del = {
        let mut c = TextDoc::load(&seed, 4).unwrap();
        c.apply_update(&u1).unwrap();
        c.edit(&[del(4, 4)]).unwrap() // deletes " one", a's text
    };
    assert!(yrs_leaves_pending(&before, &u_del));
    assert_eq!(b.apply_update(&u_del), Err(TextError::MissingBase));
    assert_eq!(b.state(), before);
    // An insert by a third client next to a's text: no gap in any clock the
    // update carries, only an origin b does not have.
    let u_next = {
        let mut c = TextDoc::load(&seed, 5).unwrap();
        c.apply_update(&u1).unwrap();
        c.edit(&[ins(6, "+")]).unwrap() // inside " one"
    };
    assert!(yrs_leaves_pending(&before, &u_next));
    assert_eq!(b.apply_update(&u_next), Err(TextError::MissingBase));
    assert_eq!(b.state(), before);
    assert_eq!(b.text(), "base");

    // With the base, everything applies, in any order after it.
    b.apply_update(&u1).unwrap();
    b.apply_update(&u_next).unwrap();
    b.apply_update(&u2).unwrap();
    b.apply_update(&u3).unwrap();
    b.apply_update(&u_del).unwrap();
    a.apply_update(&u_next).unwrap();
    a.apply_update(&u_del).unwrap();
    assert_eq!(a.text(), b.text());
    // "base " (u3) and " one" (u_del) are gone; "+", typed inside " one"
    // while it was being deleted, and " two" remain.
    assert_eq!(a.text(), "+ two");
    // And loading a state that lacks the seed is refused too.
    assert_eq!(TextDoc::load(&u1, 6).err(), Some(TextError::MissingBase));
}

#[test]
fn from_text_is_deterministic_and_devices_converge_from_it() {
    let s = "Shared 👋🏽 start\nline two";
    let x = TextDoc::from_text(s, 42);
    let y = TextDoc::from_text(s, 42);
    assert_eq!(x.state(), y.state());
    assert_eq!(x.text(), s);
    assert_eq!(TextDoc::from_text("", 42).state(), TextDoc::new(42).state());
    assert_ne!(x.state(), TextDoc::from_text(s, 43).state());
    // Client ids above 53 bits reduce deterministically, and never to 0.
    assert_eq!(
        TextDoc::from_text(s, u64::MAX).state(),
        TextDoc::from_text(s, u64::MAX).state()
    );
    assert_ne!(text::yrs_client_id(0), 0);
    assert_ne!(text::yrs_client_id(1 << 53), 0);
    assert_eq!(text::yrs_client_id(12345), 12345);

    // Server and two devices each build the seed on their own; the devices
    // edit under their own ids; everybody converges.
    let mut server = TextDoc::from_text(s, 42);
    let mut d1 = TextDoc::load(&TextDoc::from_text(s, 42).state(), 1001).unwrap();
    let mut d2 = TextDoc::load(&TextDoc::from_text(s, 42).state(), 1002).unwrap();
    let u1 = d1.edit(&[ins(0, ">> ")]).unwrap();
    let u2 = d2.replace_with("Shared 👋🏽 start\nline 2");
    for u in [&u1, &u2] {
        server.apply_update(u).unwrap();
    }
    d1.apply_update(&u2).unwrap();
    d2.apply_update(&u1).unwrap();
    assert_eq!(d1.text(), ">> Shared 👋🏽 start\nline 2");
    assert_eq!(d2.text(), d1.text());
    assert_eq!(server.text(), d1.text());
}

#[test]
fn merged_updates_apply_like_all_of_them() {
    let mut a = TextDoc::from_text("", 1);
    let mut outbox = Vec::new();
    for (i, c) in "hello, 世界".chars().enumerate() {
        outbox.push(a.edit(&[ins(i as u64, &c.to_string())]).unwrap());
    }
    outbox.push(a.edit(&[del(0, 1), ins(0, "H")]).unwrap());
    let refs: Vec<&[u8]> = outbox.iter().map(|u| u.as_slice()).collect();
    let merged = TextDoc::merge_updates(&refs).unwrap();
    let total: usize = outbox.iter().map(|u| u.len()).sum();
    assert!(merged.len() < total, "{} >= {}", merged.len(), total);
    let mut b = TextDoc::new(2);
    b.apply_update(&merged).unwrap();
    assert_eq!(b.text(), "Hello, 世界");
    assert_eq!(
        TextDoc::merge_updates(&[]).map(|u| TextDoc::load(&u, 3).unwrap().text()),
        Ok(String::new())
    );
}

/// A small deterministic generator (xorshift), so failures reproduce.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
}

#[test]
fn random_concurrent_edits_converge_in_any_delivery_order() {
    let alphabet: Vec<char> = "ab é日👋🏽\n".chars().collect();
    for seed in 1..=20u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let base = TextDoc::from_text("start text", 1).state();
        let mut docs: Vec<TextDoc> = (0..3)
            .map(|i| TextDoc::load(&base, 10 + i).unwrap())
            .collect();
        let mut log: Vec<Vec<u8>> = Vec::new();
        for _ in 0..60 {
            let who = rng.below(3) as usize;
            let d = &mut docs[who];
            let len = d.len_chars();
            let u = if rng.below(4) == 0 {
                // A whole-text rewrite through the diff.
                let mut chars: Vec<char> = d.text().chars().collect();
                let at = rng.below(chars.len() as u64 + 1) as usize;
                chars.insert(at, alphabet[rng.below(alphabet.len() as u64) as usize]);
                if chars.len() > 3 {
                    chars.remove(rng.below(chars.len() as u64) as usize);
                }
                d.replace_with(&chars.into_iter().collect::<String>())
            } else {
                let index = rng.below(len + 1);
                let delete = rng.below((len - index).min(3) + 1);
                let n = rng.below(3) as usize;
                let insert: String = (0..n)
                    .map(|_| alphabet[rng.below(alphabet.len() as u64) as usize])
                    .collect();
                d.edit(&[TextEdit {
                    index,
                    delete,
                    insert,
                }])
                .unwrap()
            };
            if !u.is_empty() {
                log.push(u);
            }
            // Sometimes a doc catches up on a random prefix of the log.
            if rng.below(3) == 0 {
                let target = rng.below(3) as usize;
                let upto = rng.below(log.len() as u64 + 1) as usize;
                for u in &log[..upto] {
                    // Refused updates (missing base) are simply retried later.
                    let _ = docs[target].apply_update(u);
                }
            }
        }
        // Deliver everything, shuffled, retrying refused ones, with duplicates.
        for d in docs.iter_mut() {
            let mut order: Vec<usize> = (0..log.len()).chain(0..log.len() / 4).collect();
            for i in (1..order.len()).rev() {
                order.swap(i, rng.below(i as u64 + 1) as usize);
            }
            let mut pending: Vec<usize> = order;
            while !pending.is_empty() {
                let before = pending.len();
                pending.retain(|&i| d.apply_update(&log[i]) == Err(TextError::MissingBase));
                assert!(pending.len() < before, "seed {seed}: stuck");
            }
        }
        let t = docs[0].text();
        for d in &docs {
            assert_eq!(d.text(), t, "seed {seed}");
            assert_eq!(d.len_chars(), t.chars().count() as u64);
        }
        // States differ in encoding order at most; a reload gives the same text.
        let reloaded = TextDoc::load(&docs[1].state(), 99).unwrap();
        assert_eq!(reloaded.text(), t);
    }
}

// ---------- editing traces ----------

const TRACES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/fixtures/editing-traces"
);

/// A patch: at `pos` (chars) delete `del` chars, then insert `ins`.
type Patch = (u64, u64, String);

struct Txn {
    parents: Vec<usize>,
    agent: usize,
    patches: Vec<Patch>,
}

struct Trace {
    start: String,
    end: String,
    txns: Vec<Txn>,
}

/// Reads a gzip JSON trace (sequential or concurrent format).
fn load_trace(name: &str) -> Trace {
    let path = Path::new(TRACES).join(format!("{name}.json.gz"));
    let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut json = String::new();
    flate2::read::GzDecoder::new(file)
        .read_to_string(&mut json)
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let txns = v["txns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| Txn {
            parents: t["parents"]
                .as_array()
                .map(|p| p.iter().map(|i| i.as_u64().unwrap() as usize).collect())
                .unwrap_or_default(),
            agent: t["agent"].as_u64().unwrap_or(0) as usize,
            patches: t["patches"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| {
                    (
                        p[0].as_u64().unwrap(),
                        p[1].as_u64().unwrap(),
                        p[2].as_str().unwrap().to_owned(),
                    )
                })
                .collect(),
        })
        .collect();
    Trace {
        start: v["startContent"].as_str().unwrap_or("").to_owned(),
        end: v["endContent"].as_str().unwrap().to_owned(),
        txns,
    }
}

fn to_edits(patches: &[Patch]) -> Vec<TextEdit> {
    patches
        .iter()
        .map(|(index, delete, insert)| TextEdit {
            index: *index,
            delete: *delete,
            insert: insert.clone(),
        })
        .collect()
}

/// The expected text after the first `n` transactions of a sequential trace.
fn splice_prefix(trace: &Trace, n: usize) -> String {
    let mut chars: Vec<char> = trace.start.chars().collect();
    for t in &trace.txns[..n] {
        for (pos, del, ins) in &t.patches {
            let pos = *pos as usize;
            chars.splice(pos..pos + *del as usize, ins.chars());
        }
    }
    chars.into_iter().collect()
}

/// How many transactions of a sequential trace the debug build replays. yrs
/// finds a position by walking its block list from the start (cost grows with
/// the document's history), so unoptimised yrs would take minutes on the full
/// 260k-edit trace; the release build (`cargo test --release`) replays all of
/// it and checks `endContent`.
fn replay_len(total: usize) -> usize {
    if cfg!(debug_assertions) {
        total.min(50_000)
    } else {
        total
    }
}

#[test]
fn automerge_paper_replays_keystroke_by_keystroke_to_a_second_device() {
    let trace = load_trace("automerge-paper");
    let n = replay_len(trace.txns.len());
    let mut a = TextDoc::from_text(&trace.start, 1);
    let mut b = TextDoc::load(&a.state(), 2).unwrap();
    // Plain yrs first, the same keystrokes: edit + encode each update. The
    // trace is ASCII, so its char positions are byte offsets here.
    let doc = yrs::Doc::with_client_id(1);
    let root = doc.get_or_insert_text("t");
    let started = Instant::now();
    let mut yrs_bytes = 0usize;
    for t in &trace.txns[..n] {
        let mut txn = doc.transact_mut();
        for (pos, del, ins) in &t.patches {
            if *del > 0 {
                root.remove_range(&mut txn, *pos as u32, *del as u32);
            }
            if !ins.is_empty() {
                root.insert(&mut txn, *pos as u32, ins);
            }
        }
        yrs_bytes += txn.encode_update_v1().len();
    }
    let yrs_time = started.elapsed();

    // Each keystroke's update goes to the second device at once, as it would
    // over the wire. (Keeping all 260k updates alive instead scatters yrs's
    // blocks over the heap and makes its list walks several times slower.)
    let mut bytes = 0usize;
    let mut keystrokes = 0usize;
    let mut edit_time = Duration::ZERO;
    let mut apply_time = Duration::ZERO;
    let mut first_updates = Vec::new();
    for t in &trace.txns[..n] {
        let edits = to_edits(&t.patches);
        let started = Instant::now();
        let u = a.edit(&edits).unwrap();
        let edited = Instant::now();
        b.apply_update(&u).unwrap();
        apply_time += edited.elapsed();
        edit_time += edited - started;
        bytes += u.len();
        keystrokes += t.patches.len();
        if first_updates.len() < 1000 {
            first_updates.push(u);
        }
    }
    let expected = if n == trace.txns.len() {
        trace.end.clone()
    } else {
        splice_prefix(&trace, n)
    };
    assert_eq!(root.get_string(&doc.transact()), expected);
    assert_eq!(a.text(), expected);
    assert_eq!(b.text(), expected);
    let state = a.state();
    assert_eq!(TextDoc::load(&state, 3).unwrap().text(), expected);
    // An outbox of the first 1000 keystrokes, compacted.
    let outbox: Vec<&[u8]> = first_updates.iter().map(|u| u.as_slice()).collect();
    let outbox_bytes: usize = outbox.iter().map(|u| u.len()).sum();
    let compacted = TextDoc::merge_updates(&outbox).unwrap().len();

    println!(
        "automerge-paper ({} build), {n} of {} txns, {keystrokes} keystrokes:\n  \
         TextDoc::edit + encode: {:?} ({:.2} us/keystroke); apply on the 2nd device: {:?}\n  \
         yrs alone, edit + encode: {:?} ({:.2} us/keystroke)\n  \
         update bytes: {bytes} total, {:.1} bytes/keystroke (yrs alone: {yrs_bytes})\n  \
         final state {} bytes vs text {} bytes ({:.2}x)\n  \
         the first {} updates ({outbox_bytes} bytes) merged: {compacted} bytes",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        trace.txns.len(),
        edit_time,
        edit_time.as_secs_f64() * 1e6 / keystrokes as f64,
        apply_time,
        yrs_time,
        yrs_time.as_secs_f64() * 1e6 / keystrokes as f64,
        bytes as f64 / keystrokes as f64,
        state.len(),
        expected.len(),
        state.len() as f64 / expected.len().max(1) as f64,
        outbox.len(),
    );
}

/// Replays a concurrent trace: one document per agent; before an agent's
/// transaction, its document receives every transaction in the transaction's
/// history (its parents, transitively) that it has not seen yet, in trace
/// order; the transaction then runs on exactly that version. At the end every
/// document receives everything.
fn replay_concurrent(name: &str) {
    let trace = load_trace(name);
    let n = trace.txns.len();
    let agents = trace.txns.iter().map(|t| t.agent).max().unwrap() + 1;
    let mut docs: Vec<TextDoc> = (0..agents).map(|a| TextDoc::new(a as u64 + 1)).collect();
    let mut seen: Vec<HashSet<usize>> = vec![HashSet::new(); agents];
    let mut updates: Vec<Vec<u8>> = Vec::with_capacity(n);
    let started = Instant::now();
    for (i, t) in trace.txns.iter().enumerate() {
        // The history not yet seen by this agent: walk back from the parents,
        // stopping at transactions it has (its seen set is closed downwards).
        let mut missing = Vec::new();
        let mut stack: Vec<usize> = t.parents.clone();
        let mut visited = HashSet::new();
        while let Some(p) = stack.pop() {
            if seen[t.agent].contains(&p) || !visited.insert(p) {
                continue;
            }
            missing.push(p);
            stack.extend(&trace.txns[p].parents);
        }
        missing.sort_unstable();
        for p in missing {
            docs[t.agent].apply_update(&updates[p]).unwrap();
            seen[t.agent].insert(p);
        }
        let u = docs[t.agent].edit(&to_edits(&t.patches)).unwrap();
        updates.push(u);
        seen[t.agent].insert(i);
    }
    for d in docs.iter_mut() {
        for u in &updates {
            d.apply_update(u).unwrap();
        }
    }
    for d in &docs {
        assert_eq!(d.text(), trace.end, "{name}");
    }
    // The merged log replays to the same end on a fresh device.
    let refs: Vec<&[u8]> = updates.iter().map(|u| u.as_slice()).collect();
    let merged = TextDoc::merge_updates(&refs).unwrap();
    assert_eq!(TextDoc::load(&merged, 99).unwrap().text(), trace.end);
    println!(
        "{name}: {n} txns by {agents} agents replayed in {:?}; final state {} bytes, text {} bytes",
        started.elapsed(),
        docs[0].state().len(),
        trace.end.len()
    );
}

#[test]
fn friendsforever_concurrent_trace_replays_to_its_end() {
    replay_concurrent("friendsforever");
}

#[test]
fn clownschool_concurrent_trace_replays_to_its_end() {
    replay_concurrent("clownschool");
}

/// Found by `fuzz/` (target `text_update`), not fixed: an update may hold
/// blocks of any client, so one device can push another's clock to near
/// `u32::MAX` with a GC block of a few bytes; the victim's next local insert
/// then overflows yrs's clock (a panic in a debug build, wrapped ids in a
/// release build). Refusing it takes a rule on whose blocks, or how far, an
/// update may carry (say, only its author's; or clocks with headroom).
#[test]
#[ignore = "known: a remote update can push a client's clock to u32::MAX (see the comment)"]
fn fuzz_update_pushing_a_clients_clock_to_the_end_leaves_it_able_to_edit() {
    // Client 2's GC block [0, u32::MAX - 2), no deletes.
    let update = [1, 1, 2, 0, 0, 0xfd, 0xff, 0xff, 0xff, 0x0f, 0];
    let mut d = TextDoc::load(&TextDoc::from_text("hello", 1).state(), 2).unwrap();
    if d.apply_update(&update).is_ok() {
        let _ = d.edit(&[ins(0, "abc")]);
    }
}

/// Found by `fuzz/` (target `text_update`), not fixed: an item whose right
/// origin is not after its left origin in the document (the same character
/// for both, or crossed ones) integrates between them in the live document,
/// but after the whole text when the document is re-loaded from its own
/// state. No editor makes such an item; a hostile device can, and then the
/// server's folded state (and each device's) disagrees with what it showed,
/// and with its peers. Refusing it takes the origins' order in the document,
/// not just the update's bytes.
#[test]
#[ignore = "known: crossed origins diverge on reload (see the comment)"]
fn fuzz_update_with_crossed_origins_reloads_to_the_text_it_made() {
    // Client 3 inserts "1" with left origin (1, l) and right origin (1, r).
    for (l, r) in [(5, 5), (6, 5), (7, 3)] {
        let update = [1, 1, 3, 0, 0xc4, 1, l, 1, r, 1, b'1', 0];
        let mut d = TextDoc::from_text("hello wörld", 1);
        if d.apply_update(&update).is_ok() {
            let reloaded = TextDoc::load(&d.state(), 9).unwrap();
            assert_eq!(reloaded.text(), d.text(), "origins {l}, {r}");
        }
    }
}
