//! A validator under `[auth]` knows who wrote: the token's user and the
//! device's client id. Its own test binary, with one test: the server reads
//! its secret from the environment, which is set before any thread starts.

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use hearth_engine::{Event, Schema};
use hearth_server::{Refuse, Server};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;

const SECRET: &str = "a test secret that is long enough for HS256 use";
const SECRET_ENV: &str = "HEARTH_TEST_RULES_SECRET";

const SCHEMA: &str = r#"
version = 1
[auth]
hs256_secret_env = "HEARTH_TEST_RULES_SECRET"
[tables.lists]
create = "CREATE TABLE lists (id TEXT PRIMARY KEY, owner TEXT NOT NULL)"
[tables.lists.rules]
read = "owner = auth.sub"
insert = "owner = auth.sub"
"#;

/// Who a validator saw write: (client id, user).
type Writer = (u64, Option<String>);

fn token_for(sub: &str) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": sub, "exp": exp}),
        &EncodingKey::from_secret(SECRET.as_bytes()).unwrap(),
    )
    .unwrap()
}

#[test]
fn a_validator_sees_the_user_and_the_client_id() {
    // Before the runtime's threads exist: nothing reads the environment meanwhile.
    std::env::set_var(SECRET_ENV, SECRET);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(run());
}

async fn run() {
    let dir = tempfile::tempdir().unwrap();
    let seen: Arc<Mutex<Vec<Writer>>> = Arc::default();
    let log = seen.clone();
    let server = Server::builder()
        .schema(Schema::parse(SCHEMA).unwrap())
        .data_dir(dir.path().join("server"))
        .listen("127.0.0.1:0".parse().unwrap())
        // At most two lists per user: a count by the token's user.
        .validate(move |ctx, _mutation| {
            log.lock()
                .unwrap()
                .push((ctx.client_id(), ctx.user().map(str::to_string)));
            let user = ctx.user().ok_or_else(|| Refuse::failed("no user"))?;
            let lists =
                ctx.query_i64("SELECT count(*) FROM lists WHERE owner = ?1", &[text(user)])?;
            if lists > 2 {
                return Err(Refuse::new(
                    "LIST_QUOTA",
                    format!("{user} already has 2 lists"),
                ));
            }
            Ok(())
        })
        .start()
        .await
        .unwrap();
    let url = url(&server);
    let (mut alice, mut bob) = (device(dir.path(), "alice"), device(dir.path(), "bob"));
    alice.set_token(Some(token_for("alice"))).unwrap();
    bob.set_token(Some(token_for("bob"))).unwrap();
    sync(&mut alice, &url).await;
    sync(&mut bob, &url).await;
    for id in ["a1", "a2", "a3"] {
        exec(
            &mut alice,
            "INSERT INTO lists (id, owner) VALUES (?1, 'alice')",
            &[text(id)],
        );
    }
    exec(
        &mut bob,
        "INSERT INTO lists (id, owner) VALUES ('b1', 'bob')",
        &[],
    );
    let events = sync(&mut alice, &url).await;
    let refused: Vec<(String, String)> = events
        .iter()
        .filter_map(|e| match e {
            Event::Rejected { code, reason, .. } => Some((code.clone(), reason.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(
        refused,
        vec![(
            "LIST_QUOTA".to_string(),
            "alice already has 2 lists".to_string()
        )]
    );
    let events = sync(&mut bob, &url).await;
    assert!(
        !events.iter().any(|e| matches!(e, Event::Rejected { .. })),
        "{events:?}"
    );
    assert_eq!(
        rows(&mut alice, "SELECT id FROM lists ORDER BY id"),
        vec![json!({"id": "a1"}), json!({"id": "a2"})]
    );
    assert_eq!(
        rows(&mut bob, "SELECT id FROM lists ORDER BY id"),
        vec![json!({"id": "b1"})]
    );
    let seen = seen.lock().unwrap().clone();
    let (a, b) = (alice.client_id(), bob.client_id());
    assert_eq!(
        seen,
        vec![
            (a, Some("alice".to_string())),
            (a, Some("alice".to_string())),
            (a, Some("alice".to_string())),
            (b, Some("bob".to_string())),
        ]
    );
    server.shutdown().await;
}
