//! Identity and permissions (issue 11) over real sockets: a real `hearth
//! serve` child process whose schema has `[auth]` and rules, devices as
//! `hearth client` commands on SQLite files with `--token`, and raw
//! WebSockets for hostile tokens.
//!
//! Oracles are what a user expects, stated independently of the rule
//! engine: who wrote what and who was made a member, read back from the
//! server's store with plain SQL or from the devices' files.

mod common;

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use common::cli::{hearth, json_line, stderr, Served};
use futures_util::{SinkExt, StreamExt};
use hearth::native_client;
use hearth_engine::protocol::{
    decode_server, encode_client, ClientMsg, ServerMsg, FRAME_BYTES_MAX,
};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value as Json};
use tokio_tungstenite::tungstenite::Message;

const SECRET: &str = "a test secret that is long enough for HS256 use";
const SECRET_ENV: &str = "HEARTH_TEST_JWT_SECRET";
const ISSUER: &str = "https://auth.example.test";

/// Shared lists: a list's owner adds members; members read the list, its
/// members and its todos, and may update its todos; only a todo's owner may
/// delete it. `notes` has no rules at all (denied to everyone).
const SCHEMA: &str = r#"
version = 1

[auth]
hs256_secret_env = "HEARTH_TEST_JWT_SECRET"
issuer = "https://auth.example.test"
audience = "hearth"
leeway_s = 0

[tables.lists]
create = "CREATE TABLE lists (id TEXT PRIMARY KEY, owner TEXT NOT NULL, title TEXT NOT NULL DEFAULT '')"
[tables.lists.rules]
read = "id IN (SELECT list_id FROM members WHERE user_id = auth.sub)"
insert = "owner = auth.sub"
update = "owner = auth.sub"
delete = "owner = auth.sub"

[tables.members]
create = "CREATE TABLE members (id TEXT PRIMARY KEY, list_id TEXT NOT NULL, user_id TEXT NOT NULL)"
[tables.members.rules]
read = "list_id IN (SELECT list_id FROM members WHERE user_id = auth.sub)"
insert = "EXISTS (SELECT 1 FROM lists WHERE lists.id = list_id AND lists.owner = auth.sub)"
delete = "EXISTS (SELECT 1 FROM lists WHERE lists.id = list_id AND lists.owner = auth.sub)"

[tables.todos]
create = "CREATE TABLE todos (id TEXT PRIMARY KEY, list_id TEXT NOT NULL, owner TEXT NOT NULL, title TEXT NOT NULL DEFAULT '', done INTEGER NOT NULL DEFAULT 0)"
[tables.todos.rules]
read = "list_id IN (SELECT list_id FROM members WHERE user_id = auth.sub)"
insert = "owner = auth.sub AND list_id IN (SELECT list_id FROM members WHERE user_id = auth.sub)"
update = "list_id IN (SELECT list_id FROM members WHERE user_id = auth.sub)"
delete = "owner = auth.sub"

[tables.notes]
create = "CREATE TABLE notes (id TEXT PRIMARY KEY, body TEXT)"
"#;

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn sign(claims: &Json) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(SECRET.as_bytes()).unwrap(),
    )
    .unwrap()
}

/// A good token for `sub`, valid for an hour.
fn token_for(sub: &str) -> String {
    sign(&json!({"sub": sub, "iss": ISSUER, "aud": "hearth", "exp": now_s() + 3600}))
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn serve(dir: &Path) -> Served {
    Served::start_env(dir, SCHEMA, &[], &[(SECRET_ENV, SECRET)])
}

/// A device as a user runs it: `hearth client --db FILE --server URL
/// --token T ...`.
struct User {
    db: String,
    url: String,
    token: String,
}

impl User {
    fn new(dir: &Path, name: &str, server: &Served) -> User {
        User {
            db: dir.join(format!("{name}.db")).to_str().unwrap().to_string(),
            url: server.url.clone(),
            token: token_for(name),
        }
    }

    fn run(&self, args: &[&str]) -> std::process::Output {
        let mut all = vec![
            "client",
            "--db",
            &self.db,
            "--server",
            &self.url,
            "--timeout-s",
            "10",
            "--token",
            &self.token,
        ];
        all.extend_from_slice(args);
        hearth(&all)
    }

    fn exec(&self, sql: &str) -> Json {
        let out = self.run(&["exec", sql]);
        json_line(&out)
    }

    fn exec_ok(&self, sql: &str) {
        let line = self.exec(sql);
        assert_eq!(line["status"], "applied", "{sql}: {line}");
    }

    /// A write the server refuses `FORBIDDEN`; the CLI exits 3.
    fn exec_forbidden(&self, sql: &str) -> String {
        let out = self.run(&["exec", sql]);
        assert_eq!(out.status.code(), Some(3), "{sql}: {out:?}");
        let line = json_line(&out);
        assert_eq!(line["status"], "rejected", "{line}");
        assert_eq!(line["code"], "FORBIDDEN", "{line}");
        line["reason"].as_str().unwrap().to_string()
    }

    fn sync(&self) {
        let out = self.run(&["sync"]);
        assert!(out.status.success(), "sync: {out:?}");
    }

    fn ids(&self, table: &str) -> Vec<String> {
        let out = hearth(&[
            "client",
            "--db",
            &self.db,
            "query",
            &format!("SELECT id FROM {table} ORDER BY id"),
        ]);
        assert!(out.status.success(), "{out:?}");
        common::cli::json_lines(&out)
            .iter()
            .map(|r| r["id"].as_str().unwrap().to_string())
            .collect()
    }
}

/// The first message the server answers a Hello carrying `token` with.
async fn hello_answer(url: &str, client_id: u64, token: Option<String>) -> ServerMsg {
    let mut ws = native_client::connect(url, Duration::from_secs(5))
        .await
        .unwrap();
    let hello = ClientMsg::Hello {
        client_id,
        cursor: 0,
        schema_version: None,
        subscriptions: Vec::new(),
        token,
        reloaded: Default::default(),
        first_pending: 0,
    };
    ws.send(Message::Binary(encode_client(&hello).into()))
        .await
        .unwrap();
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("an answer")
            .expect("a frame")
            .expect("a frame");
        if let Message::Binary(bytes) = frame {
            return decode_server(&bytes, FRAME_BYTES_MAX).unwrap();
        }
    }
}

fn assert_refused(msg: &ServerMsg, code: &str, check: &str) {
    match msg {
        ServerMsg::Error { code: c, message } => {
            assert_eq!(c, code, "{message}");
            assert!(
                message.contains(check),
                "the message names the check {check:?}: {message}"
            );
        }
        other => panic!("expected Error {code}, got {other:?}"),
    }
}

/// Every bad token is refused at the handshake with `AUTH` (or
/// `AUTH_EXPIRED`) naming the failed check; nothing is applied, and a good
/// device keeps working beside them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_are_refused_naming_the_check() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path());
    let url = server.url.clone();
    let exp = now_s() + 3600;
    let good = json!({"sub": "mallory", "iss": ISSUER, "aud": "hearth", "exp": exp});
    let with = |k: &str, v: Json| {
        let mut c = good.clone();
        c[k] = v;
        c
    };
    let header_none = b64(br#"{"alg":"none","typ":"JWT"}"#);
    let payload = b64(good.to_string().as_bytes());
    let cases: Vec<(&str, Option<String>, &str, &str)> = vec![
        ("missing", None, "AUTH", "none was sent"),
        ("garbage", Some("not a token".into()), "AUTH", "not a JWT"),
        (
            "four parts",
            Some(format!("{}.extra", token_for("mallory"))),
            "AUTH",
            "not a JWT",
        ),
        (
            "alg none",
            Some(format!("{header_none}.{payload}.")),
            "AUTH",
            "alg",
        ),
        (
            "RS256 header (HMAC/RSA confusion)",
            Some(format!(
                "{}.{payload}.{}",
                b64(br#"{"alg":"RS256","typ":"JWT"}"#),
                b64(b"not a signature")
            )),
            "AUTH",
            "alg",
        ),
        (
            "wrong secret",
            Some(
                jsonwebtoken::encode(
                    &Header::new(Algorithm::HS256),
                    &good,
                    &EncodingKey::from_secret(b"another secret, also long enough to sign").unwrap(),
                )
                .unwrap(),
            ),
            "AUTH",
            "signature",
        ),
        (
            "wrong audience",
            Some(sign(&with("aud", json!("other")))),
            "AUTH",
            "aud",
        ),
        (
            "wrong issuer",
            Some(sign(&with("iss", json!("https://evil.test")))),
            "AUTH",
            "iss",
        ),
        (
            "no issuer",
            Some(sign(&{
                let mut c = good.clone();
                c.as_object_mut().unwrap().remove("iss");
                c
            })),
            "AUTH",
            "iss",
        ),
        (
            "expired",
            Some(sign(&with("exp", json!(now_s() - 60)))),
            "AUTH_EXPIRED",
            "exp",
        ),
        (
            "not yet valid",
            Some(sign(&with("nbf", json!(now_s() + 3600)))),
            "AUTH",
            "nbf",
        ),
        (
            "no sub",
            Some(sign(&{
                let mut c = good.clone();
                c.as_object_mut().unwrap().remove("sub");
                c
            })),
            "AUTH",
            "sub",
        ),
        (
            "number sub",
            Some(sign(&with("sub", json!(42)))),
            "AUTH",
            "sub: the claim has the wrong type",
        ),
        (
            "text exp",
            Some(sign(&with("exp", json!("soon")))),
            "AUTH",
            "exp: the claim has the wrong type",
        ),
        (
            "oversized",
            Some(format!("{}.{}.x", "a".repeat(20_000), "b")),
            "AUTH",
            "bytes",
        ),
    ];
    for (i, (name, token, code, check)) in cases.into_iter().enumerate() {
        let answer = hello_answer(&url, 1000 + i as u64, token).await;
        match &answer {
            ServerMsg::Error { .. } => assert_refused(&answer, code, check),
            other => panic!("{name}: expected a refusal, got {other:?}"),
        }
    }
    // Nothing of theirs bound a device or reached the log, and a good
    // device works beside them.
    let alice = User::new(dir.path(), "alice", &server);
    alice.exec_ok("INSERT INTO lists (id, owner, title) VALUES ('l1', 'alice', 'groceries')");
    let devices = server.query("SELECT user FROM _hearth_devices ORDER BY user");
    assert_eq!(devices, vec![json!({"user": "alice"})]);
    // The CLI says a refused token on stderr and exits non-zero.
    let mut mallory = User::new(dir.path(), "mallory", &server);
    mallory.token = sign(&with("aud", json!("other")));
    let out = mallory.run(&["sync"]);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    assert!(stderr(&out).contains("AUTH: aud"), "{}", stderr(&out));
}

/// Write rules: a list created with its membership and first todo in one
/// transaction passes (the lookup sees the mutation's own rows); forged
/// owners, take-overs, foreign deletes and writes to rule-less tables are
/// refused `FORBIDDEN`, naming table and rule, and rolled back on the
/// device; nothing of them reaches the server.
#[test]
fn write_rules_refuse_forged_and_foreign_writes() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path());
    let alice = User::new(dir.path(), "alice", &server);
    let bob = User::new(dir.path(), "bob", &server);
    alice.exec_ok(
        "INSERT INTO lists (id, owner, title) VALUES ('l1', 'alice', 'groceries'); \
         INSERT INTO members (id, list_id, user_id) VALUES ('m1', 'l1', 'alice'); \
         INSERT INTO todos (id, list_id, owner, title) VALUES ('t1', 'l1', 'alice', 'milk')",
    );
    // Bob: a todo in alice's list, as alice (forged owner), before he is a
    // member.
    let reason = bob.exec_forbidden(
        "INSERT INTO todos (id, list_id, owner, title) VALUES ('t2', 'l1', 'alice', 'forged')",
    );
    assert!(reason.contains("insert on 'todos'"), "{reason}");
    assert!(reason.contains("owner = auth.sub"), "{reason}");
    assert_eq!(bob.ids("todos"), Vec::<String>::new(), "rolled back");
    // Adding himself as a member of it.
    bob.exec_forbidden("INSERT INTO members (id, list_id, user_id) VALUES ('m2', 'l1', 'bob')");
    // A table without rules denies everything.
    let reason = bob.exec_forbidden("INSERT INTO notes (id, body) VALUES ('n1', 'hi')");
    assert!(reason.contains("no insert rule"), "{reason}");

    // Alice shares the list: bob may now update its todos (the rule holds
    // for the row as it was and as written) but not delete alice's.
    alice.exec_ok("INSERT INTO members (id, list_id, user_id) VALUES ('m2', 'l1', 'bob')");
    bob.sync();
    assert_eq!(bob.ids("todos"), ["t1"]);
    // A list he reads but may not write: taking it over is refused on the
    // row as it was.
    let reason = bob.exec_forbidden("UPDATE lists SET owner = 'bob' WHERE id = 'l1'");
    assert!(reason.contains("as it was"), "{reason}");
    bob.exec_ok("UPDATE todos SET done = 1 WHERE id = 't1'");
    let reason = bob.exec_forbidden("DELETE FROM todos WHERE id = 't1'");
    assert!(reason.contains("delete on 'todos'"), "{reason}");
    assert_eq!(
        bob.ids("todos"),
        ["t1"],
        "the delete is undone on the device"
    );
    // Moving the todo to a list he is no member of fails on the row as
    // written.
    alice.exec_ok(
        "INSERT INTO lists (id, owner) VALUES ('l2', 'alice'); \
         INSERT INTO members (id, list_id, user_id) VALUES ('m3', 'l2', 'alice')",
    );
    let reason = bob.exec_forbidden("UPDATE todos SET list_id = 'l2' WHERE id = 't1'");
    assert!(reason.contains("as written"), "{reason}");

    let todos = server.query("SELECT id, list_id, owner, done FROM todos ORDER BY id");
    assert_eq!(
        todos,
        vec![json!({"id": "t1", "list_id": "l1", "owner": "alice", "done": 1})]
    );
    let lists = server.query("SELECT id, owner FROM lists ORDER BY id");
    assert_eq!(
        lists,
        vec![
            json!({"id": "l1", "owner": "alice"}),
            json!({"id": "l2", "owner": "alice"})
        ]
    );
    assert!(server.query("SELECT id FROM notes").is_empty());
}

/// A read rule widened (or narrowed) in a new schema: a device that
/// synced under the old one re-loads, so it holds what the new rule lets
/// its user read, not what the old one chose. Widening to `"true"` leaves
/// the table with no read rule at all, which must still re-load it.
#[test]
fn a_changed_read_rule_re_loads_the_devices_that_synced_under_the_old() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path());
    let alice = User::new(dir.path(), "alice", &server);
    let bob = User::new(dir.path(), "bob", &server);
    alice.exec_ok(
        "INSERT INTO lists (id, owner, title) VALUES ('l1', 'alice', 'groceries'); \
         INSERT INTO members (id, list_id, user_id) VALUES ('m1', 'l1', 'alice'); \
         INSERT INTO todos (id, list_id, owner, title) VALUES ('t1', 'l1', 'alice', 'milk')",
    );
    bob.sync();
    assert_eq!(bob.ids("todos"), Vec::<String>::new());
    drop(server);

    // Version 2: everyone reads every todo.
    let widened = SCHEMA.replace("version = 1", "version = 2").replace(
        "[tables.todos.rules]\nread = \"list_id IN (SELECT list_id FROM members WHERE user_id = auth.sub)\"",
        "[tables.todos.rules]\nread = \"true\"",
    );
    assert_ne!(widened, SCHEMA.replace("version = 1", "version = 2"));
    let server = Served::start_env(dir.path(), &widened, &[], &[(SECRET_ENV, SECRET)]);
    let bob = User::new(dir.path(), "bob", &server);
    bob.sync();
    assert_eq!(bob.ids("todos"), ["t1"], "widened: the row arrives");
    drop(server);

    // Version 3: back to members only; the row leaves.
    let narrowed = SCHEMA.replace("version = 1", "version = 3");
    let server = Served::start_env(dir.path(), &narrowed, &[], &[(SECRET_ENV, SECRET)]);
    let bob = User::new(dir.path(), "bob", &server);
    bob.sync();
    assert_eq!(
        bob.ids("todos"),
        Vec::<String>::new(),
        "narrowed: the row leaves"
    );
}

/// Read rules: a device holds exactly what its user may read. Sharing a
/// list brings it (list, members, todos) to the other user's device;
/// unsharing takes it away; the owner's other list never reaches it.
#[test]
fn devices_hold_only_what_their_user_may_read() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path());
    let alice = User::new(dir.path(), "alice", &server);
    let bob = User::new(dir.path(), "bob", &server);
    alice.exec_ok(
        "INSERT INTO lists (id, owner, title) VALUES ('shared', 'alice', 'groceries'), ('private', 'alice', 'diary'); \
         INSERT INTO members (id, list_id, user_id) VALUES ('m1', 'shared', 'alice'), ('m2', 'private', 'alice'); \
         INSERT INTO todos (id, list_id, owner, title) VALUES ('t1', 'shared', 'alice', 'milk'), ('t2', 'private', 'alice', 'secret')",
    );
    bob.sync();
    assert_eq!(bob.ids("lists"), Vec::<String>::new());
    assert_eq!(bob.ids("todos"), Vec::<String>::new());

    alice.exec_ok("INSERT INTO members (id, list_id, user_id) VALUES ('m3', 'shared', 'bob')");
    bob.sync();
    assert_eq!(bob.ids("lists"), ["shared"]);
    assert_eq!(bob.ids("members"), ["m1", "m3"]);
    assert_eq!(bob.ids("todos"), ["t1"]);

    // A todo added later reaches bob live; one in the private list never.
    alice.exec_ok(
        "INSERT INTO todos (id, list_id, owner, title) VALUES ('t3', 'shared', 'alice', 'eggs'), ('t4', 'private', 'alice', 'more')",
    );
    bob.sync();
    assert_eq!(bob.ids("todos"), ["t1", "t3"]);

    // Moving a todo into the private list takes it off bob's device.
    alice.exec_ok("UPDATE todos SET list_id = 'private' WHERE id = 't3'");
    bob.sync();
    assert_eq!(bob.ids("todos"), ["t1"]);

    // Unsharing takes the whole list away.
    alice.exec_ok("DELETE FROM members WHERE id = 'm3'");
    bob.sync();
    assert_eq!(bob.ids("lists"), Vec::<String>::new());
    assert_eq!(bob.ids("members"), Vec::<String>::new());
    assert_eq!(bob.ids("todos"), Vec::<String>::new());

    // A fresh device of bob's, and alice's own, agree.
    let bob2 = User {
        db: dir.path().join("bob2.db").to_str().unwrap().to_string(),
        ..User::new(dir.path(), "bob", &server)
    };
    bob2.sync();
    assert_eq!(bob2.ids("todos"), Vec::<String>::new());
    assert_eq!(alice.ids("todos"), ["t1", "t2", "t3", "t4"]);
}

/// A device's database belongs to one user: another user's token on it is
/// refused by the device, and a socket claiming another user's client id
/// is refused by the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_belongs_to_one_user() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path());
    let alice = User::new(dir.path(), "alice", &server);
    alice.sync();
    let mut as_bob = User::new(dir.path(), "alice", &server);
    as_bob.token = token_for("bob");
    let out = as_bob.run(&["sync"]);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    assert!(
        stderr(&out).contains("AUTH_USER_CHANGED"),
        "{}",
        stderr(&out)
    );
    // A raw socket claiming alice's client id with bob's token.
    let client_id = server.query("SELECT client_id FROM _hearth_devices WHERE user = 'alice'")[0]
        ["client_id"]
        .as_i64()
        .unwrap() as u64;
    let answer = hello_answer(&server.url, client_id, Some(token_for("bob"))).await;
    assert_refused(&answer, "AUTH_USER_CHANGED", "alice");
    // Alice herself still syncs.
    alice.sync();
}

/// A test Ed25519 key pair (generated for this test with `openssl genpkey
/// -algorithm ed25519`): the private key as PKCS#8 DER, the public key as a
/// JWK's `x`.
const ED25519_PKCS8_HEX: &str = "302e020100300506032b65700422042030a3a3a587ee07ca06c31b6b2eaabee2e834ba6e57e18729a75783509272a190";
const ED25519_X: &str = "43jcV39GjaUhB1wIsy0HKlV9IV6mcJKH6aldcXcO0ns";

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// A key set file: keys are picked by `kid`, an unknown `kid` is refused
/// naming it, and a token signed with HS256 using the public key as the
/// secret (the HMAC/RSA confusion attack) is refused on its algorithm.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_set_picks_keys_by_kid_and_refuses_confusion() {
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(
        &jwks,
        json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "x": ED25519_X, "kid": "k1", "use": "sig"}]})
            .to_string(),
    )
    .unwrap();
    let schema = SCHEMA.replace(
        "hs256_secret_env = \"HEARTH_TEST_JWT_SECRET\"",
        &format!("jwks_file = {:?}", jwks.to_str().unwrap()),
    );
    let server = Served::start_env(dir.path(), &schema, &[], &[]);
    let claims = json!({"sub": "alice", "iss": ISSUER, "aud": "hearth", "exp": now_s() + 3600});
    let ed = |kid: Option<&str>| {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = kid.map(str::to_string);
        jsonwebtoken::encode(
            &header,
            &claims,
            &EncodingKey::from_ed_der(&hex(ED25519_PKCS8_HEX)),
        )
        .unwrap()
    };
    let welcome = hello_answer(&server.url, 1, Some(ed(Some("k1")))).await;
    assert!(matches!(welcome, ServerMsg::Welcome { .. }), "{welcome:?}");
    // One key and no kid: that key.
    let welcome = hello_answer(&server.url, 2, Some(ed(None))).await;
    assert!(matches!(welcome, ServerMsg::Welcome { .. }), "{welcome:?}");
    let answer = hello_answer(&server.url, 3, Some(ed(Some("k9")))).await;
    assert_refused(&answer, "AUTH", "unknown key id");
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("k1".into());
    let confused = jsonwebtoken::encode(
        &header,
        &claims,
        &EncodingKey::from_secret(ED25519_X.as_bytes()).unwrap(),
    )
    .unwrap();
    let answer = hello_answer(&server.url, 4, Some(confused)).await;
    assert_refused(&answer, "AUTH", "alg");
}

/// A token that expires while connected closes the connection with
/// `AUTH_EXPIRED`, which is not a refusal: a write made with an expired
/// token is queued (never rolled back) and applied once a new token comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_keeps_pending_writes() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path());
    let mut alice = User::new(dir.path(), "alice", &server);
    alice.exec_ok(
        "INSERT INTO lists (id, owner) VALUES ('l1', 'alice'); \
         INSERT INTO members (id, list_id, user_id) VALUES ('m1', 'l1', 'alice')",
    );

    // A live connection whose token has two seconds left.
    let short = sign(&json!({"sub": "alice", "iss": ISSUER, "aud": "hearth", "exp": now_s() + 2}));
    let mut ws = native_client::connect(&server.url, Duration::from_secs(5))
        .await
        .unwrap();
    let hello = ClientMsg::Hello {
        client_id: 77,
        cursor: 0,
        schema_version: None,
        subscriptions: Vec::new(),
        token: Some(short),
        reloaded: Default::default(),
        first_pending: 0,
    };
    ws.send(Message::Binary(encode_client(&hello).into()))
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut welcomed = false;
    let ended = loop {
        let frame = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("the server ends the connection")
            .expect("a frame")
            .expect("a frame");
        if let Message::Binary(bytes) = frame {
            match decode_server(&bytes, FRAME_BYTES_MAX).unwrap() {
                ServerMsg::Welcome { .. } => welcomed = true,
                ServerMsg::Error { code, message } => break (code, message),
                _ => {}
            }
        }
    };
    assert!(welcomed);
    assert_eq!(ended.0, "AUTH_EXPIRED", "{}", ended.1);
    let after = started.elapsed();
    assert!(
        after >= Duration::from_millis(500) && after <= Duration::from_secs(4),
        "closed {after:?} after the Hello, for a token with 2 s left"
    );

    // The CLI with an expired token: the write is kept and queued.
    alice.token =
        sign(&json!({"sub": "alice", "iss": ISSUER, "aud": "hearth", "exp": now_s() - 10}));
    let out = alice.run(&[
        "exec",
        "INSERT INTO todos (id, list_id, owner, title) VALUES ('t1', 'l1', 'alice', 'offline')",
    ]);
    assert!(out.status.success(), "{out:?}");
    let line = json_line(&out);
    assert_eq!(line["status"], "queued", "{line}");
    assert_eq!(line["code"], "AUTH_EXPIRED", "{line}");
    assert_eq!(alice.ids("todos"), ["t1"]);
    assert!(server.query("SELECT id FROM todos").is_empty());
    // A new token: the queued write goes through.
    alice.token = token_for("alice");
    alice.sync();
    assert_eq!(
        server.query("SELECT id, title FROM todos"),
        vec![json!({"id": "t1", "title": "offline"})]
    );
}

/// An in-process server under a key set file, with small rates: a flood of
/// frames closes its own connection `RATE_LIMITED`, a user past their
/// connections is refused, and other users carry on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_and_too_many_connections_are_rate_limited() {
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(
        &jwks,
        json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "x": ED25519_X, "kid": "k1"}]})
            .to_string(),
    )
    .unwrap();
    let schema = SCHEMA.replace(
        "hs256_secret_env = \"HEARTH_TEST_JWT_SECRET\"",
        &format!("jwks_file = {:?}", jwks.to_str().unwrap()),
    );
    let server = common::start_server_with(dir.path(), &schema, |c| {
        c.frames_per_s = 50;
        c.connections_per_user_max = 2;
        // One frame of the largest size still fits the byte burst.
        c.set_frame_bytes_max(1024 * 1024);
        c.bytes_per_s = 1024 * 1024;
    })
    .await;
    let url = common::url(&server);
    let token = |sub: &str| {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some("k1".into());
        jsonwebtoken::encode(
            &header,
            &json!({"sub": sub, "iss": ISSUER, "aud": "hearth", "exp": now_s() + 3600}),
            &EncodingKey::from_ed_der(&hex(ED25519_PKCS8_HEX)),
        )
        .unwrap()
    };
    let session = |client_id: u64, sub: &str| {
        let (url, token) = (url.clone(), token(sub));
        async move {
            let mut ws = native_client::connect(&url, Duration::from_secs(5))
                .await
                .unwrap();
            let hello = ClientMsg::Hello {
                client_id,
                cursor: 0,
                schema_version: None,
                subscriptions: Vec::new(),
                token: Some(token),
                reloaded: Default::default(),
                first_pending: 0,
            };
            ws.send(Message::Binary(encode_client(&hello).into()))
                .await
                .unwrap();
            let first = loop {
                let frame = tokio::time::timeout(Duration::from_secs(5), ws.next())
                    .await
                    .expect("an answer")
                    .expect("a frame")
                    .expect("a frame");
                if let Message::Binary(bytes) = frame {
                    break decode_server(&bytes, FRAME_BYTES_MAX).unwrap();
                }
            };
            (ws, first)
        }
    };
    // A flood of heartbeats: past 100 frames at once (two seconds' worth).
    let (mut flood, first) = session(1, "mallory").await;
    assert!(matches!(first, ServerMsg::Welcome { .. }), "{first:?}");
    for _ in 0..300 {
        if flood
            .send(Message::Binary(encode_client(&ClientMsg::Heartbeat).into()))
            .await
            .is_err()
        {
            break;
        }
    }
    let ended = loop {
        match tokio::time::timeout(Duration::from_secs(5), flood.next()).await {
            Ok(Some(Ok(Message::Binary(bytes)))) => {
                if let ServerMsg::Error { code, message } =
                    decode_server(&bytes, FRAME_BYTES_MAX).unwrap()
                {
                    break (code, message);
                }
            }
            Ok(Some(Ok(_))) => continue,
            other => panic!("the flood's connection ended without an error: {other:?}"),
        }
    };
    assert_eq!(ended.0, "RATE_LIMITED", "{}", ended.1);
    assert!(ended.1.contains("frames"), "{}", ended.1);

    // Two connections for alice are fine, a third is refused; bob's is not.
    let (a1, first) = session(10, "alice").await;
    assert!(matches!(first, ServerMsg::Welcome { .. }), "{first:?}");
    let (_a2, first) = session(11, "alice").await;
    assert!(matches!(first, ServerMsg::Welcome { .. }), "{first:?}");
    let (_a3, first) = session(12, "alice").await;
    assert_refused(&first, "RATE_LIMITED", "alice");
    let (_b, first) = session(20, "bob").await;
    assert!(matches!(first, ServerMsg::Welcome { .. }), "{first:?}");
    // One of alice's ends: she may connect again.
    drop(a1);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (_a4, first) = session(13, "alice").await;
        if matches!(first, ServerMsg::Welcome { .. }) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "alice's slot was not given back: {first:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A user removed from a list while their device holds pending writes to
/// its rows: the writes are refused and rolled back, and the rows leave the
/// device once they settle (none stays behind, seen or hidden by a write).
#[test]
fn rows_with_pending_writes_leave_once_the_writes_settle() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path());
    let alice = User::new(dir.path(), "alice", &server);
    let bob = User::new(dir.path(), "bob", &server);
    alice.exec_ok(
        "INSERT INTO lists (id, owner) VALUES ('l1', 'alice'); \
         INSERT INTO members (id, list_id, user_id) VALUES ('m1', 'l1', 'alice'), ('m2', 'l1', 'bob'); \
         INSERT INTO todos (id, list_id, owner, title) VALUES ('t1', 'l1', 'alice', 'milk'), ('t2', 'l1', 'alice', 'eggs')",
    );
    bob.sync();
    assert_eq!(bob.ids("members"), ["m1", "m2"]);
    assert_eq!(bob.ids("todos"), ["t1", "t2"]);
    // Offline, bob deletes a membership (hiding its row on his device) and
    // edits a todo.
    let offline = User {
        url: common::cli::OFFLINE.to_string(),
        ..User::new(dir.path(), "bob", &server)
    };
    for sql in [
        "DELETE FROM members WHERE id = 'm1'",
        "UPDATE todos SET title = 'oat milk' WHERE id = 't1'",
    ] {
        let line = offline.exec(sql);
        assert_eq!(line["status"], "queued", "{line}");
    }
    alice.exec_ok("DELETE FROM members WHERE id = 'm2'");
    bob.sync();
    bob.sync();
    assert_eq!(bob.ids("members"), Vec::<String>::new());
    assert_eq!(bob.ids("todos"), Vec::<String>::new());
    assert_eq!(bob.ids("lists"), Vec::<String>::new());
    assert_eq!(
        server.query("SELECT id, title FROM todos ORDER BY id"),
        vec![
            json!({"id": "t1", "title": "milk"}),
            json!({"id": "t2", "title": "eggs"})
        ]
    );
}

/// An initial load under a read rule names no row the user may not read:
/// not by a row, and not by the key a chunk says it reached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_never_names_a_hidden_row() {
    let dir = tempfile::tempdir().unwrap();
    let schema =
        format!("{SCHEMA}\n[streams.list_todos]\ntable = \"todos\"\nwhere = \"list_id = :list\"\n");
    let server = Served::start_env(dir.path(), &schema, &[], &[(SECRET_ENV, SECRET)]);
    let alice = User::new(dir.path(), "alice", &server);
    alice.exec_ok(
        "INSERT INTO lists (id, owner) VALUES ('l1', 'alice'); \
         INSERT INTO members (id, list_id, user_id) VALUES ('m1', 'l1', 'alice'); \
         INSERT INTO todos (id, list_id, owner, title) VALUES ('t1', 'l1', 'alice', 'a'), ('t2', 'l1', 'alice', 'b'), ('t3', 'l1', 'alice', 'c')",
    );
    // Zed, a member of nothing, subscribes to alice's list on a raw socket
    // and reads every frame until the load is done.
    let mut ws = native_client::connect(&server.url, Duration::from_secs(5))
        .await
        .unwrap();
    let mut params = std::collections::BTreeMap::new();
    params.insert(
        "list".to_string(),
        hearth_engine::filter::Param::One(hearth_engine::Value::Text("l1".into())),
    );
    let hello = ClientMsg::Hello {
        client_id: 4242,
        cursor: 0,
        schema_version: None,
        subscriptions: vec![hearth_engine::protocol::Subscription {
            id: 1,
            stream: "list_todos".into(),
            params,
            load: hearth_engine::protocol::Load::After(None),
        }],
        token: Some(token_for("zed")),
        reloaded: Default::default(),
        first_pending: 0,
    };
    ws.send(Message::Binary(encode_client(&hello).into()))
        .await
        .unwrap();
    let mut everything = String::new();
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("the load ends")
            .expect("a frame")
            .expect("a frame");
        let Message::Binary(bytes) = frame else {
            continue;
        };
        let msg = decode_server(&bytes, FRAME_BYTES_MAX).unwrap();
        everything.push_str(&format!("{msg:?}\n"));
        if matches!(msg, ServerMsg::Rows { done: true, .. }) {
            break;
        }
    }
    for hidden in ["t1", "t2", "t3", "l1"] {
        assert!(
            !everything.contains(&format!("\"{hidden}\"")),
            "zed heard of {hidden}:\n{everything}"
        );
    }
}

/// Claims named like columns, and array claims: `tenant_id =
/// auth.tenant_id` in a write rule compares the row's column with the
/// claim, and `grp IN auth.groups` in a read rule reads the array.
#[test]
fn claims_named_like_columns_and_array_claims() {
    let schema = r#"
version = 1
[auth]
hs256_secret_env = "HEARTH_TEST_JWT_SECRET"
leeway_s = 0
[tables.docs]
create = "CREATE TABLE docs (id TEXT PRIMARY KEY, tenant_id TEXT NOT NULL, grp TEXT NOT NULL, body TEXT)"
[tables.docs.rules]
read = "grp IN auth.groups"
insert = "tenant_id = auth.tenant_id"
update = "tenant_id = auth.tenant_id"
delete = "false"
"#;
    let dir = tempfile::tempdir().unwrap();
    let server = Served::start_env(dir.path(), schema, &[], &[(SECRET_ENV, SECRET)]);
    let token = |sub: &str, groups: Json| {
        sign(&json!({"sub": sub, "tenant_id": "acme", "groups": groups, "exp": now_s() + 3600}))
    };
    let mut alice = User::new(dir.path(), "alice", &server);
    alice.token = token("alice", json!(["g1", "g2"]));
    let mut bob = User::new(dir.path(), "bob", &server);
    bob.token = token("bob", json!(["g2"]));
    alice.exec_ok(
        "INSERT INTO docs (id, tenant_id, grp, body) VALUES ('d1', 'acme', 'g1', 'a'), ('d2', 'acme', 'g2', 'b'), ('d3', 'acme', 'g3', 'c')",
    );
    let reason =
        alice.exec_forbidden("INSERT INTO docs (id, tenant_id, grp) VALUES ('d4', 'other', 'g1')");
    assert!(reason.contains("tenant_id = auth.tenant_id"), "{reason}");
    // Alice's own device keeps what her groups read; d3 (g3) leaves it.
    alice.sync();
    assert_eq!(alice.ids("docs"), ["d1", "d2"]);
    bob.sync();
    assert_eq!(bob.ids("docs"), ["d2"]);
    assert_eq!(
        server.query("SELECT count(*) AS n FROM docs"),
        vec![json!({"n": 3})]
    );
}
