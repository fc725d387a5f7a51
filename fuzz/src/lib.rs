//! Fuzz targets for every Hearth decoder that reads bytes from the network or from a page.
//!
//! Each target in `fuzz_targets/` is one line calling a function here, so that the same
//! checks run under libFuzzer (`cargo fuzz run TARGET`, or `scripts/fuzz.sh`) and in this
//! crate's own tests over the checked-in seeds (`cargo test` in `fuzz/`). The property
//! everywhere: bad input returns an error, never panics; what decodes re-encodes to a frame
//! that decodes to the same message.
//!
//! [`seeds`] builds the seed corpora (`corpus/TARGET/seed-*`) from real messages; the test
//! `seeds_are_written_and_pass` (re)writes them.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::OnceLock;

use hearth_engine::filter::{Filter, Param};
use hearth_engine::merge::text::TextDoc;
use hearth_engine::protocol::{self, FRAME_BYTES_MAX};
use hearth_engine::{Schema, Value, DEMO_SCHEMA};
use libfuzzer_sys::arbitrary::{Result as ArbResult, Unstructured};
use serde::{de::DeserializeOwned, Serialize};

pub mod seeds;

/// `client_frame`: what the server reads from a device.
pub fn client_frame(data: &[u8]) {
    let Ok(msg) = protocol::decode_client(data, FRAME_BYTES_MAX) else {
        return;
    };
    let frame = protocol::encode_client(&msg);
    let again = protocol::decode_client(&frame, FRAME_BYTES_MAX).expect("re-encoded frame");
    assert_eq!(again, msg);
    assert_eq!(protocol::encode_client(&again), frame);
}

/// `server_frame`: what a device reads from the server.
pub fn server_frame(data: &[u8]) {
    let Ok(msg) = protocol::decode_server(data, FRAME_BYTES_MAX) else {
        return;
    };
    let frame = protocol::encode_server(&msg);
    let again = protocol::decode_server(&frame, FRAME_BYTES_MAX).expect("re-encoded frame");
    assert_eq!(again, msg);
    assert_eq!(protocol::encode_server(&again), frame);
}

/// `push_len`: the server reads a push's header before decoding it.
pub fn push_len(data: &[u8]) {
    let len = protocol::push_len(data);
    // When the whole frame decodes as a push, the header told the truth.
    if let Ok(hearth_engine::ClientMsg::Push { mutations }) =
        protocol::decode_client(data, FRAME_BYTES_MAX)
    {
        assert_eq!(len, Some(mutations.len() as u64));
    }
}

/// `page_message` / `worker_message`: a bridge frame, round-tripped.
///
/// The bridge's `Value::Real` derives `PartialEq` on `f64`, so a NaN never equals
/// itself: then the messages must at least print and encode the same.
pub fn bridge_frame<T: Serialize + DeserializeOwned + PartialEq + Debug>(data: &[u8]) {
    let _ = hearth_bridge::frame_version(data);
    let Ok(msg) = hearth_bridge::decode::<T>(data) else {
        return;
    };
    let frame = hearth_bridge::encode(&msg).expect("a decoded message encodes");
    let again: T = hearth_bridge::decode(&frame).expect("re-encoded frame");
    if again != msg {
        assert_eq!(format!("{again:?}"), format!("{msg:?}"));
    }
    assert_eq!(hearth_bridge::encode(&again).unwrap(), frame);
}

/// `schema`: a schema's TOML text (a device parses the server's, the server its file).
pub fn schema(data: &[u8]) {
    if let Ok(source) = std::str::from_utf8(data) {
        let _ = Schema::parse(source);
    }
}

/// The HS256 secret of the `token` target's server, and its Ed25519 key set (the public
/// half of `seeds::ED25519_PKCS8_HEX`).
pub const TOKEN_SECRET: &str = "the fuzz target's secret, long enough for HS256";
pub const ED25519_X: &str = "43jcV39GjaUhB1wIsy0HKlV9IV6mcJKH6aldcXcO0ns";

fn verifiers() -> &'static [hearth_server::auth::Verifier; 2] {
    static VERIFIERS: OnceLock<[hearth_server::auth::Verifier; 2]> = OnceLock::new();
    VERIFIERS.get_or_init(|| {
        // Set once, before any verifier reads it, in this one process.
        std::env::set_var("HEARTH_FUZZ_JWT_SECRET", TOKEN_SECRET);
        let jwks = std::env::temp_dir().join(format!("hearth-fuzz-jwks-{}.json", std::process::id()));
        std::fs::write(
            &jwks,
            format!(r#"{{"keys": [{{"kty": "OKP", "crv": "Ed25519", "x": "{ED25519_X}", "kid": "k1"}}]}}"#),
        )
        .expect("write the key set");
        let auth = |hs256: bool| hearth_engine::rules::Auth {
            hs256_secret_env: hs256.then(|| "HEARTH_FUZZ_JWT_SECRET".to_string()),
            jwks_file: (!hs256).then(|| jwks.to_str().unwrap().to_string()),
            issuer: Some("https://auth.example.test".into()),
            audience: Some("hearth".into()),
            leeway_s: 30,
        };
        [
            hearth_server::auth::Verifier::new(&auth(true)).expect("an HS256 verifier"),
            hearth_server::auth::Verifier::new(&auth(false)).expect("a key set verifier"),
        ]
    })
}

/// `token`: a Hello's token, as the server checks it (with an HS256 secret, and with an
/// Ed25519 key set) and as a device reads its `sub`: errors, never panics; a token the
/// server takes has a non-empty `sub`.
pub fn token(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    for verifier in verifiers() {
        if let Ok(verified) = verifier.verify(Some(&text)) {
            assert!(!verified.principal.sub.is_empty());
        }
    }
    let _ = hearth_engine::client::token_subject(&text);
}

/// `text_update`: a yrs v1 update, as the server merges a device's `ColumnOp::Text` and a
/// device applies the server's, into a document holding some text; when it applied, the
/// document's state must load back. Also the bytes as a whole state (`TextDoc::load`) and
/// through `TextDoc::merge_updates`.
///
/// Two known issues, each an ignored test in `engine/tests/text_crdt.rs`, would stop every
/// run within seconds, so they are not checked here: the reloaded text can differ from the
/// live one (`fuzz_update_with_crossed_origins_reloads_to_the_text_it_made`), and a local
/// edit after an update can overflow yrs's clock
/// (`fuzz_update_pushing_a_clients_clock_to_the_end_leaves_it_able_to_edit`).
pub fn text_update(data: &[u8]) {
    let mut doc = text_base();
    if doc.apply_update(data).is_ok() {
        let _ = doc.text();
        TextDoc::load(&doc.state(), 9).expect("a document's own state loads");
    }
    let _ = TextDoc::load(data, 7);
    let _ = TextDoc::merge_updates(&[data]);
}

/// The document `text_update` applies updates to (its seeds are edits of it).
pub fn text_base() -> TextDoc {
    TextDoc::from_text("hello wörld", 1)
}

/// The demo schema, parsed once.
pub fn demo_schema() -> &'static Schema {
    static DEMO: OnceLock<Schema> = OnceLock::new();
    DEMO.get_or_init(|| Schema::parse(DEMO_SCHEMA).expect("demo schema"))
}

/// `filter`: a stream's condition compiled against one of the demo schema's tables, then
/// evaluated on an arbitrary row with arbitrary parameters.
///
/// Input layout: one byte picks the table (by index in `Schema::tables`), then the
/// condition's text up to a 0 byte, then bytes that [`Unstructured`] turns into the row and
/// the parameters.
pub fn filter(data: &[u8]) {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let (source, rest) = match rest.iter().position(|&b| b == 0) {
        Some(end) => (&rest[..end], &rest[end + 1..]),
        None => (rest, &[][..]),
    };
    let Ok(source) = std::str::from_utf8(source) else {
        return;
    };
    let schema = demo_schema();
    let table = schema
        .tables
        .values()
        .nth(usize::from(which) % schema.tables.len())
        .expect("a table");
    let Ok(filter) = Filter::compile(source, table) else {
        return;
    };
    let mut u = Unstructured::new(rest);
    // `matches` reads the row by the table's column indices: the row is full width.
    let row: Vec<Value> = (0..table.columns.len())
        .map(|_| value(&mut u).unwrap_or(Value::Null))
        .collect();
    let params = params(&filter, &mut u).unwrap_or_default();
    let _ = filter.matches(&row, &params);
    let _ = filter.check_params(&params);
    let _ = filter.to_sql(&params);
    let _ = filter.key();
}

fn value(u: &mut Unstructured) -> ArbResult<Value> {
    Ok(match u.int_in_range(0..=4u8)? {
        0 => Value::Null,
        1 => Value::Integer(u.arbitrary()?),
        2 => Value::Real(u.arbitrary()?),
        3 => Value::Text(u.arbitrary()?),
        _ => Value::Blob(u.arbitrary()?),
    })
}

/// Values for the filter's own parameters (each one absent, one value or a list), plus
/// now and then one it does not take.
fn params(filter: &Filter, u: &mut Unstructured) -> ArbResult<BTreeMap<String, Param>> {
    let mut names: Vec<String> = filter.params().keys().cloned().collect();
    if u.ratio(1, 8)? {
        names.push(u.arbitrary()?);
    }
    let mut out = BTreeMap::new();
    for name in names {
        let param = match u.int_in_range(0..=2u8)? {
            0 => continue,
            1 => Param::One(value(u)?),
            _ => {
                let n = u.int_in_range(0..=8usize)?;
                Param::Many((0..n).map(|_| value(u)).collect::<ArbResult<_>>()?)
            }
        };
        out.insert(name, param);
    }
    Ok(out)
}

/// One target's check of one input.
pub type Check = fn(&[u8]);

/// The targets by name, as `fuzz_targets/` and the corpus directories spell them.
pub const TARGETS: &[(&str, Check)] = &[
    ("client_frame", client_frame),
    ("server_frame", server_frame),
    ("push_len", push_len),
    ("page_message", bridge_frame::<hearth_bridge::PageMessage>),
    (
        "worker_message",
        bridge_frame::<hearth_bridge::WorkerMessage>,
    ),
    ("schema", schema),
    ("filter", filter),
    ("text_update", text_update),
    ("token", token),
];

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn corpus(target: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("corpus")
            .join(target)
    }

    /// Writes every seed to `corpus/TARGET/seed-NAME`, then runs each target over every
    /// file of its corpus directory (seeds and anything a local run added).
    #[test]
    fn seeds_are_written_and_pass() {
        for (target, seeds) in seeds::all() {
            let dir = corpus(target);
            std::fs::create_dir_all(&dir).unwrap();
            for (name, bytes) in seeds {
                std::fs::write(dir.join(format!("seed-{name}")), bytes).unwrap();
            }
        }
        for (target, run) in TARGETS {
            let mut files = 0;
            for entry in std::fs::read_dir(corpus(target)).unwrap() {
                run(&std::fs::read(entry.unwrap().path()).unwrap());
                files += 1;
            }
            assert!(files > 0, "{target} has no seeds");
        }
    }

    /// Every seed is a valid input: it decodes (or compiles) rather than being refused at
    /// once, so the fuzzer starts from inside the format.
    #[test]
    fn seeds_are_valid() {
        use hearth_bridge::{PageMessage, WorkerMessage};
        for (target, seeds) in seeds::all() {
            for (name, bytes) in seeds {
                let ok = match target {
                    "client_frame" => protocol::decode_client(&bytes, FRAME_BYTES_MAX).is_ok(),
                    "server_frame" => protocol::decode_server(&bytes, FRAME_BYTES_MAX).is_ok(),
                    "push_len" => protocol::push_len(&bytes).is_some(),
                    "page_message" => hearth_bridge::decode::<PageMessage>(&bytes).is_ok(),
                    "worker_message" => hearth_bridge::decode::<WorkerMessage>(&bytes).is_ok(),
                    "schema" => Schema::parse(std::str::from_utf8(&bytes).unwrap()).is_ok(),
                    "text_update" => text_base().apply_update(&bytes).is_ok(),
                    // Every token seed has the shape of a JWT (some are refused: alg
                    // none, a wrong key, expired), so the fuzzer starts inside the format.
                    "token" => bytes.iter().filter(|&&b| b == b'.').count() == 2,
                    "filter" => {
                        let tables = &demo_schema().tables;
                        let table = tables.values().nth(bytes[0] as usize % tables.len());
                        let end = 1 + bytes[1..].iter().position(|&b| b == 0).unwrap();
                        let source = std::str::from_utf8(&bytes[1..end]).unwrap();
                        Filter::compile(source, table.unwrap()).is_ok()
                    }
                    other => panic!("no target {other}"),
                };
                assert!(ok, "seed {target}/{name} does not decode");
            }
        }
    }
}
