//! Seed inputs: a few real messages per target, small, covering each message kind once.

use std::collections::BTreeMap;

use hearth_bridge as bridge;
use hearth_engine::change::{ColumnOp, LogEntry, Mutation, RowChange, RowOp};
use hearth_engine::filter::Param;
use hearth_engine::protocol::{self, ClientMsg, Load, Member, MemberId, ServerMsg, Subscription};
use hearth_engine::{Hlc, Value, DEMO_SCHEMA};

type Seeds = Vec<(&'static str, Vec<u8>)>;

/// Every target's seeds, by target name.
pub fn all() -> Vec<(&'static str, Seeds)> {
    vec![
        ("client_frame", client()),
        ("server_frame", server()),
        ("push_len", push_len()),
        ("page_message", page()),
        ("worker_message", worker()),
        ("schema", schema()),
        ("filter", filter()),
        ("text_update", text_update()),
        ("token", token()),
    ]
}

/// The private half of `crate::ED25519_X`, as PKCS#8 DER (a test key).
const ED25519_PKCS8_HEX: &str = "302e020100300506032b65700422042030a3a3a587ee07ca06c31b6b2eaabee2e834ba6e57e18729a75783509272a190";

fn token() -> Seeds {
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
    let claims = serde_json::json!({
        "sub": "alice", "iss": "https://auth.example.test", "aud": "hearth",
        "exp": 4_000_000_000u64, "nbf": 1_000, "role": ["admin"], "n": 1.5
    });
    let hs = encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(crate::TOKEN_SECRET.as_bytes()).unwrap(),
    )
    .unwrap();
    let der: Vec<u8> = (0..ED25519_PKCS8_HEX.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&ED25519_PKCS8_HEX[i..i + 2], 16).unwrap())
        .collect();
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some("k1".into());
    let ed = encode(&header, &claims, &EncodingKey::from_ed_der(&der)).unwrap();
    let b64 = |s: &str| {
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
    };
    let none = format!(
        "{}.{}.",
        b64(r#"{"alg":"none","typ":"JWT"}"#),
        b64(&claims.to_string())
    );
    vec![
        ("hs256", hs.into_bytes()),
        ("eddsa", ed.into_bytes()),
        ("none", none.into_bytes()),
    ]
}

fn todo_change() -> RowChange {
    RowChange {
        table: "todos".into(),
        pk: Value::Text("t1".into()),
        op: RowOp::Upsert {
            insert: false,
            columns: vec![
                ("done".into(), ColumnOp::Set(Value::Integer(1))),
                ("position".into(), ColumnOp::Set(Value::Real(-0.5))),
                ("likes".into(), ColumnOp::Add(-2)),
                (
                    "tags".into(),
                    ColumnOp::SetOps {
                        add: vec!["\"red\"".into()],
                        remove: vec!["1".into()],
                    },
                ),
                ("notes".into(), ColumnOp::Text(vec![1, 0])),
                ("due".into(), ColumnOp::Set(Value::Null)),
            ],
        },
    }
}

fn subscription() -> Subscription {
    Subscription {
        id: 42,
        stream: "list_todos".into(),
        params: BTreeMap::from([
            ("list".into(), Param::One(Value::Text("l1".into()))),
            (
                "ids".into(),
                Param::Many(vec![Value::Integer(3), Value::Blob(vec![0xff])]),
            ),
        ]),
        load: Load::After(Some(Value::Text("t0".into()))),
    }
}

fn push() -> ClientMsg {
    ClientMsg::Push {
        mutations: vec![
            Mutation {
                seq: 7,
                hlc: Hlc::new(1_764_000_000_000, 3),
                base: 5,
                also_seen: vec![(9, 2)],
                changes: vec![todo_change()],
                schema_version: 0,
            },
            Mutation {
                seq: 8,
                hlc: Hlc::new(1_764_000_000_001, 0),
                base: 5,
                also_seen: Vec::new(),
                changes: vec![RowChange {
                    table: "lists".into(),
                    pk: Value::Text("l1".into()),
                    op: RowOp::Delete,
                }],
                schema_version: 0,
            },
        ],
    }
}

fn client() -> Seeds {
    let frames = [
        (
            "hello",
            ClientMsg::Hello {
                client_id: 0x1234_5678_9abc,
                cursor: 17,
                schema_version: Some(2),
                subscriptions: vec![subscription()],
                token: Some("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhIn0.c2ln".into()),
                reloaded: hearth_engine::protocol::Reloaded {
                    cursor: 7,
                    access: 42,
                },
                first_pending: 11,
            },
        ),
        ("push", push()),
        ("subscribe", ClientMsg::Subscribe(subscription())),
        ("unsubscribe", ClientMsg::Unsubscribe { id: 42 }),
        (
            "join",
            ClientMsg::Join {
                room: "doc:1".into(),
                tab: 1,
                state: "{\"x\":1}".into(),
            },
        ),
        (
            "leave",
            ClientMsg::Leave {
                room: "doc:1".into(),
                tab: 1,
            },
        ),
        (
            "broadcast",
            ClientMsg::Broadcast {
                room: "doc:1".into(),
                tab: 1,
                message: "\"hi\"".into(),
            },
        ),
        ("heartbeat", ClientMsg::Heartbeat),
    ];
    frames
        .into_iter()
        .map(|(name, msg)| (name, protocol::encode_client(&msg)))
        .collect()
}

fn server() -> Seeds {
    let hlc = Hlc::new(1_764_000_000_000, 1);
    let member = MemberId {
        client_id: 9,
        tab: 2,
    };
    let frames = [
        (
            "welcome",
            ServerMsg::Welcome {
                server_seq: 100,
                floor: 10,
                schema_version: 2,
                schema: Some("version = 2\n".into()),
                frame_bytes_max: protocol::FRAME_BYTES_MAX as u64,
                last_seq: 7,
                hlc,
            },
        ),
        (
            "changes",
            ServerMsg::Changes {
                entries: vec![LogEntry {
                    server_seq: 101,
                    client_id: 9,
                    client_seq: 7,
                    hlc,
                    changes: vec![
                        todo_change(),
                        RowChange {
                            table: "todos".into(),
                            pk: Value::Text("t2".into()),
                            op: RowOp::Evict,
                        },
                    ],
                    digest: 0xdead_beef,
                    images: Vec::new(),
                }],
                cursor: 103,
                hlc,
                caught_up: true,
            },
        ),
        (
            "rejected",
            ServerMsg::Rejected {
                client_seq: 8,
                code: "CONSTRAINT".into(),
                reason: "CHECK failed".into(),
            },
        ),
        (
            "error",
            ServerMsg::Error {
                code: "PROTOCOL".into(),
                message: "bad frame".into(),
            },
        ),
        (
            "rows",
            ServerMsg::Rows {
                id: 42,
                cursor: 100,
                hlc,
                rows: vec![RowChange {
                    table: "todos".into(),
                    pk: Value::Text("t3".into()),
                    op: RowOp::Upsert {
                        insert: true,
                        columns: vec![("title".into(), ColumnOp::Set(Value::Text("x".into())))],
                    },
                }],
                last: Some(Value::Text("t3".into())),
                done: false,
            },
        ),
        (
            "reload",
            ServerMsg::Reload {
                cursor: 9,
                tables: vec!["todos".into(), "lists".into()],
                access: 0xfeed,
            },
        ),
        ("unsubscribed", ServerMsg::Unsubscribed { id: 7 }),
        (
            "subscription-refused",
            ServerMsg::SubscriptionRefused {
                id: 42,
                code: "BAD_SUBSCRIPTION".into(),
                reason: "unknown stream".into(),
            },
        ),
        (
            "presence",
            ServerMsg::Presence {
                room: "doc:1".into(),
                full: false,
                members: vec![Member {
                    id: member,
                    state: "{}".into(),
                    since_ms: 1_764_000_000_000,
                }],
                left: vec![MemberId {
                    client_id: 3,
                    tab: 0,
                }],
            },
        ),
        (
            "relay",
            ServerMsg::Relay {
                room: "doc:1".into(),
                from: member,
                message: "[1,2]".into(),
            },
        ),
        (
            "room-refused",
            ServerMsg::RoomRefused {
                room: "doc:1".into(),
                tab: 2,
                code: "ROOM_FULL".into(),
                reason: "full".into(),
            },
        ),
        (
            "acked",
            ServerMsg::Acked {
                client_seq: 7,
                server_seq: 101,
                digest: 0xdead_beef,
            },
        ),
    ];
    frames
        .into_iter()
        .map(|(name, msg)| (name, protocol::encode_server(&msg)))
        .collect()
}

fn push_len() -> Seeds {
    let empty = ClientMsg::Push {
        mutations: Vec::new(),
    };
    vec![
        ("push", protocol::encode_client(&push())),
        ("push-empty", protocol::encode_client(&empty)),
        ("heartbeat", protocol::encode_client(&ClientMsg::Heartbeat)),
    ]
    .into_iter()
    // push_len reads a header only; keep the seeds that have one.
    .filter(|(_, frame)| protocol::push_len(frame).is_some())
    .collect()
}

fn values() -> Vec<bridge::Value> {
    vec![
        bridge::Value::Null,
        bridge::Value::Integer(i64::MIN),
        bridge::Value::Real(1.5),
        bridge::Value::Text("héllo".into()),
        bridge::Value::Blob(vec![0, 255]),
    ]
}

fn page() -> Seeds {
    use bridge::{PageMessage, Request};
    let request = |id, request| PageMessage::Request { id, request };
    let frames = [
        (
            "open",
            request(
                1,
                Request::Open {
                    server: "ws://localhost/sync".into(),
                    tab_lock: "tab-1".into(),
                    token: Some("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhIn0.c2ln".into()),
                    reset: true,
                },
            ),
        ),
        (
            "exec",
            request(
                2,
                Request::Exec {
                    sql: "INSERT INTO t VALUES (?, ?, ?, ?, ?)".into(),
                    params: values(),
                },
            ),
        ),
        (
            "edit-text",
            request(
                3,
                Request::EditText {
                    table: "todos".into(),
                    key: bridge::Value::Text("t1".into()),
                    column: "notes".into(),
                    edits: vec![bridge::TextEdit {
                        index: 2,
                        delete: 1,
                        insert: "é🦀".into(),
                    }],
                },
            ),
        ),
        (
            "subscribe-stream",
            request(
                4,
                Request::SubscribeStream {
                    stream: "list_todos".into(),
                    params: vec![
                        (
                            "list".into(),
                            bridge::StreamParam::One(bridge::Value::Text("l1".into())),
                        ),
                        ("ids".into(), bridge::StreamParam::Many(values())),
                    ],
                },
            ),
        ),
        (
            "send-to-room",
            request(
                5,
                Request::SendToRoom {
                    room: "doc:1".into(),
                    message: "{}".into(),
                },
            ),
        ),
        ("sync", request(6, Request::Sync { timeout_ms: 5000 })),
        (
            "set-token",
            request(
                7,
                Request::SetToken {
                    token: "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhIn0.c2ln".into(),
                },
            ),
        ),
        ("bye", PageMessage::Bye),
        ("network", PageMessage::Network { online: true }),
    ];
    frames
        .into_iter()
        .map(|(name, msg)| (name, bridge::encode(&msg).unwrap()))
        .collect()
}

fn worker() -> Seeds {
    use bridge::{ErrorCode, ErrorReply, Notice, Reply, Rows, SyncStatus, WorkerMessage};
    let status = SyncStatus {
        online: true,
        caught_up: false,
        pending: 3,
        server_seq: 100,
        schema_version: Some(2),
        schema_ahead: true,
    };
    let rows = Rows {
        columns: vec!["a".into(), "b".into(), "c".into(), "d".into(), "e".into()],
        rows: vec![values()],
    };
    let frames = [
        (
            "query",
            WorkerMessage::Response {
                id: 2,
                result: Ok(Reply::Query(rows.clone())),
            },
        ),
        (
            "error",
            WorkerMessage::Response {
                id: 3,
                result: Err(ErrorReply::new(ErrorCode::SqlError, "no such table: x")),
            },
        ),
        (
            "stream-subscribed",
            WorkerMessage::Response {
                id: 4,
                result: Ok(Reply::StreamSubscribed(bridge::StreamSubscription {
                    id: 42,
                    stream: "list_todos".into(),
                    params: vec![(
                        "list".into(),
                        bridge::StreamParam::One(bridge::Value::Integer(1)),
                    )],
                    loaded: false,
                    rows: 10,
                    tabs: 1,
                })),
            },
        ),
        (
            "live-rows",
            WorkerMessage::Notice(Notice::LiveRows {
                live_id: 5,
                result: Ok(rows),
            }),
        ),
        ("status", WorkerMessage::Notice(Notice::Status(status))),
        (
            "token-needed",
            WorkerMessage::Notice(Notice::TokenNeeded {
                code: "AUTH_EXPIRED".into(),
                message: "exp: the token expired".into(),
            }),
        ),
        (
            "changed",
            WorkerMessage::Notice(Notice::Changed {
                tables: vec!["todos".into()],
            }),
        ),
        (
            "room-members",
            WorkerMessage::Notice(Notice::RoomMembers {
                room: "doc:1".into(),
                members: vec![bridge::RoomMember {
                    client_id: 9,
                    tab: 2,
                    state: "{}".into(),
                    since_ms: 1_764_000_000_000,
                    me: true,
                }],
            }),
        ),
    ];
    frames
        .into_iter()
        .map(|(name, msg)| (name, bridge::encode(&msg).unwrap()))
        .collect()
}

const STREAMS_SCHEMA: &str = r#"version = 1

[tables.lists]
create = "CREATE TABLE lists (id TEXT PRIMARY KEY, name TEXT NOT NULL)"

[tables.todos]
create = """
CREATE TABLE todos (
  id      INTEGER PRIMARY KEY,
  list_id TEXT REFERENCES lists (id),
  done    INTEGER NOT NULL DEFAULT 0,
  n       INTEGER NOT NULL DEFAULT 0
)"""
on_delete = "update-wins"
columns = { n = { merge = "counter", min = 0, max = 10 } }

[streams.list_todos]
table = "todos"
where = "list_id = :list AND done = FALSE"

[streams.all_lists]
table = "lists"
"#;

const AUTH_SCHEMA: &str = r#"version = 1
[auth]
hs256_secret_env = "X"
issuer = "https://auth.example.test"
[tables.members]
create = "CREATE TABLE members (id TEXT PRIMARY KEY, list_id TEXT NOT NULL, user_id TEXT NOT NULL)"
rules = { read = "user_id = auth.sub OR list_id IN (SELECT list_id FROM members WHERE user_id = auth.sub)", insert = "true" }
[tables.todos]
create = "CREATE TABLE todos (id TEXT PRIMARY KEY, list_id TEXT NOT NULL, owner TEXT)"
[tables.todos.rules]
read = "list_id NOT IN (SELECT list_id FROM members WHERE user_id = auth.sub AND id <> 'x') AND owner IS NOT NULL"
update = "owner = auth.sub AND EXISTS (SELECT 1 FROM members m WHERE m.list_id = list_id)"
delete = "false"
"#;

fn schema() -> Seeds {
    vec![
        ("demo", DEMO_SCHEMA.as_bytes().to_vec()),
        ("streams", STREAMS_SCHEMA.as_bytes().to_vec()),
        ("auth", AUTH_SCHEMA.as_bytes().to_vec()),
    ]
}

/// A `filter` input: the table's index in the demo schema (0 `hearth_conflicts`, 1
/// `lists`, 2 `todos`), the condition, a 0 byte, then bytes for the row and parameters.
fn filter_input(table: u8, condition: &str, rest: &[u8]) -> Vec<u8> {
    let mut out = vec![table];
    out.extend_from_slice(condition.as_bytes());
    out.push(0);
    out.extend_from_slice(rest);
    out
}

fn filter() -> Seeds {
    let rest: Vec<u8> = (0u8..64).map(|b| b.wrapping_mul(37)).collect();
    vec![
        (
            "key-and",
            filter_input(2, "list_id = :list AND done = FALSE", &rest),
        ),
        (
            "in-list",
            filter_input(2, "NOT (position >= 1.5 OR likes IN :ids)", &rest),
        ),
        (
            "null-text",
            filter_input(
                1,
                "name IS NOT NULL AND created_at NOT IN (1, -2.5, NULL) OR name < 'm'",
                &rest,
            ),
        ),
        ("true", filter_input(0, "TRUE", &rest)),
    ]
}

fn text_update() -> Seeds {
    use crate::text_base;
    use hearth_engine::merge::text::{TextDoc, TextEdit};
    let edit = |client, index, delete, insert: &str| {
        let mut doc = TextDoc::load(&text_base().state(), client).unwrap();
        doc.edit(&[TextEdit {
            index,
            delete,
            insert: insert.into(),
        }])
        .unwrap()
    };
    vec![
        ("state", text_base().state()),
        ("insert", edit(3, 5, 0, ",")),
        ("replace", edit(4, 6, 5, "🦀 crab")),
        ("delete-all", edit(5, 0, 11, "")),
    ]
}
