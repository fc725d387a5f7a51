//! A hostile or broken peer gets a clear error and its connection closes;
//! everyone else keeps working and nothing is lost.

mod common;

use common::*;
use futures_util::{SinkExt, StreamExt};
use hearth_engine::protocol::{
    decode_server, encode_client, ClientMsg, ServerMsg, FRAME_BYTES_MAX,
};
use hearth_engine::DEMO_SCHEMA;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

/// Sends one raw frame on a fresh connection; returns the server's error.
async fn error_for(url: &str, frames: Vec<Message>) -> (String, String) {
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    for f in frames {
        if ws.send(f).await.is_err() {
            break;
        }
    }
    let answer = tokio::time::timeout(TIMEOUT, async {
        while let Some(Ok(msg)) = ws.next().await {
            if let Message::Binary(b) = msg {
                if let Ok(ServerMsg::Error { code, message }) = decode_server(&b, FRAME_BYTES_MAX) {
                    return Some((code, message));
                }
            }
        }
        None
    })
    .await
    .expect("server answers in time");
    answer.expect("an Error message before the close")
}

fn hello() -> Message {
    Message::Binary(
        encode_client(&ClientMsg::Hello {
            client_id: 7,
            cursor: 0,
            schema_version: None,
            subscriptions: Vec::new(),
            token: None,
            reloaded: Default::default(),
            first_pending: 0,
        })
        .into(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_get_an_error_and_others_are_unaffected() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server_with(dir.path(), DEMO_SCHEMA, |c| {
        c.set_frame_bytes_max(64 * 1024)
    })
    .await;
    let url = url(&server);
    // A healthy device stays connected through all of it.
    let mut good = device(dir.path(), "good");
    sync(&mut good, &url).await;
    let mut ws = hearth::native_client::connect(&url, TIMEOUT).await.unwrap();
    let mut events = Vec::new();
    hearth::native_client::run_session(
        &mut good,
        &mut ws,
        hearth::native_client::Goal::Synced,
        TIMEOUT,
        &mut events,
    )
    .await
    .unwrap();

    let (code, _) = error_for(
        &url,
        vec![Message::Binary(
            vec![
                hearth_engine::PROTOCOL_VERSION as u8,
                0xff,
                0xfe,
                0x00,
                0x13,
            ]
            .into(),
        )],
    )
    .await;
    assert_eq!(code, "BAD_FRAME");
    let (code, msg) = error_for(&url, vec![Message::Text("hello?".into())]).await;
    assert_eq!(code, "BAD_FRAME");
    assert!(msg.contains("binary"), "{msg}");
    let mut future_version = encode_client(&ClientMsg::Hello {
        client_id: 7,
        cursor: 0,
        schema_version: None,
        subscriptions: Vec::new(),
        token: None,
        reloaded: Default::default(),
        first_pending: 0,
    });
    future_version[0] = 9;
    let (code, msg) = error_for(&url, vec![Message::Binary(future_version.into())]).await;
    assert_eq!(code, "PROTOCOL_VERSION");
    assert!(
        msg.contains("version 9")
            && msg.contains(&format!("version {}", hearth_engine::PROTOCOL_VERSION)),
        "{msg}"
    );
    let (code, _) = error_for(
        &url,
        vec![hello(), Message::Binary(vec![0u8; 100 * 1024].into())],
    )
    .await;
    assert_eq!(code, "FRAME_TOO_LARGE");
    let (code, _) = error_for(
        &url,
        vec![Message::Binary(
            encode_client(&ClientMsg::Push { mutations: vec![] }).into(),
        )],
    )
    .await;
    assert_eq!(code, "HANDSHAKE");
    let (code, _) = error_for(&url, vec![hello(), hello()]).await;
    assert_eq!(code, "HANDSHAKE");
    assert!(metric(&server, "hearth_frames_malformed_total").await >= 4);

    // The healthy device's connection is still live: a change reaches it.
    let mut other = device(dir.path(), "other");
    sync(&mut other, &url).await;
    exec(
        &mut other,
        "INSERT INTO lists (id, name) VALUES ('l1', 'still fine')",
        &[],
    );
    sync(&mut other, &url).await;
    tokio::time::timeout(TIMEOUT, async {
        while good.status().server_seq < 1 {
            hearth::native_client::step(&mut good, &mut ws)
                .await
                .unwrap()
                .expect("still connected");
        }
    })
    .await
    .expect("the healthy device gets the change");
    assert_eq!(
        rows(&mut good, "SELECT name FROM lists"),
        vec![json!({"name": "still fine"})]
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_mutations_are_refused_with_reasons_and_nothing_else_is_lost() {
    use hearth_engine::{ColumnOp, Hlc, Mutation, RowChange, RowOp, Value};
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path(), DEMO_SCHEMA).await;
    let url = url(&server);
    let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    ws.send(hello()).await.unwrap();
    let change = |table: &str, pk: Value, columns: Vec<(&str, Value)>| RowChange {
        table: table.into(),
        pk,
        op: RowOp::Upsert {
            insert: true,
            columns: columns
                .into_iter()
                .map(|(c, v)| (c.to_string(), ColumnOp::Set(v)))
                .collect(),
        },
    };
    let t = |s: &str| Value::Text(s.into());
    let mutations = vec![
        Mutation {
            base: 0,
            also_seen: Vec::new(),
            seq: 1,
            hlc: Hlc(1),
            changes: vec![change("nope", t("x"), vec![])],
            schema_version: 0,
        },
        Mutation {
            base: 0,
            also_seen: Vec::new(),
            seq: 2,
            hlc: Hlc(2),
            changes: vec![change("todos", t("x"), vec![("colour", t("red"))])],
            schema_version: 0,
        },
        Mutation {
            base: 0,
            also_seen: Vec::new(),
            seq: 3,
            hlc: Hlc(3),
            changes: vec![change(
                "todos",
                t("x"),
                vec![("list_id", t("l")), ("title", t(""))],
            )],
            schema_version: 0,
        },
        Mutation {
            base: 0,
            also_seen: Vec::new(),
            seq: 4,
            hlc: Hlc(4),
            changes: vec![change(
                "todos",
                Value::Integer(5),
                vec![("list_id", t("l")), ("title", t("a"))],
            )],
            schema_version: 0,
        },
        Mutation {
            base: 0,
            also_seen: Vec::new(),
            seq: 5,
            hlc: Hlc(5),
            changes: vec![change(
                "todos",
                t("ok"),
                vec![("list_id", t("l")), ("title", t("fine"))],
            )],
            schema_version: 0,
        },
    ];
    ws.send(Message::Binary(
        encode_client(&ClientMsg::Push { mutations }).into(),
    ))
    .await
    .unwrap();
    let mut rejected = Vec::new();
    let mut applied = Vec::new();
    tokio::time::timeout(TIMEOUT, async {
        while rejected.len() + applied.len() < 5 {
            let Some(Ok(Message::Binary(b))) = ws.next().await else {
                panic!("connection closed")
            };
            match decode_server(&b, FRAME_BYTES_MAX).unwrap() {
                ServerMsg::Rejected {
                    client_seq,
                    code,
                    reason,
                } => rejected.push((client_seq, code, reason)),
                ServerMsg::Changes { entries, .. } => {
                    applied.extend(entries.iter().map(|e| e.client_seq))
                }
                _ => {}
            }
        }
    })
    .await
    .expect("every mutation answered");
    let codes: Vec<(u64, &str)> = rejected.iter().map(|(s, c, _)| (*s, c.as_str())).collect();
    assert_eq!(
        codes,
        vec![
            (1, "UNKNOWN_TABLE"),
            (2, "UNKNOWN_COLUMN"),
            (3, "CONSTRAINT"),
            (4, "INVALID")
        ]
    );
    assert!(rejected[2].2.contains("CHECK"), "{:?}", rejected[2]);
    assert_eq!(applied, vec![5]);
    let mut reader = device(dir.path(), "reader");
    sync(&mut reader, &url).await;
    assert_eq!(
        rows(&mut reader, "SELECT id, title FROM todos"),
        vec![json!({"id": "ok", "title": "fine"})]
    );
    server.shutdown().await;
}

/// Static files: a POST (or PUT, DELETE) to one is refused 405 with `Allow`,
/// not answered with the file; a revalidation whose `If-None-Match` names
/// the file's tag weakly, in a list, or as `*` gets 304 without the body,
/// and another tag gets the file.
#[tokio::test]
async fn files_refuse_writes_and_revalidate_as_http_says() {
    let dir = tempfile::tempdir().unwrap();
    let config = hearth_server::ServerConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        dir.path().join("server"),
        hearth_engine::Schema::parse(DEMO_SCHEMA).unwrap(),
    );
    // The files `hearth serve` embeds.
    let server = hearth_server::start(config, hearth::assets::ASSETS)
        .await
        .expect("server starts");
    for method in ["POST", "PUT", "DELETE"] {
        let (status, headers, _) = common::http_request(&server, method, "/hearth.js", &[]).await;
        assert_eq!(status, 405, "{method}");
        assert!(
            headers
                .iter()
                .any(|(n, v)| n == "allow" && v == "GET, HEAD"),
            "{method}: {headers:?}"
        );
    }
    let (status, headers, body) = common::http_request(&server, "GET", "/hearth.js", &[]).await;
    assert_eq!(status, 200);
    assert!(body.contains("window.Hearth"), "the file itself");
    let etag = headers
        .iter()
        .find(|(n, _)| n == "etag")
        .map(|(_, v)| v.clone())
        .expect("an ETag");
    let weak = format!("W/{etag}");
    let listed = format!("\"elsewhere\", {weak}");
    for tag in [etag.as_str(), weak.as_str(), listed.as_str(), "*"] {
        let (status, _, body) =
            common::http_request(&server, "GET", "/hearth.js", &[("If-None-Match", tag)]).await;
        assert_eq!((status, body.as_str()), (304, ""), "If-None-Match: {tag}");
    }
    let (status, _, _) = common::http_request(
        &server,
        "GET",
        "/hearth.js",
        &[("If-None-Match", "\"elsewhere\"")],
    )
    .await;
    assert_eq!(status, 200);
    // A HEAD is still answered.
    let (status, _, _) = common::http_request(&server, "HEAD", "/hearth.js", &[]).await;
    assert_eq!(status, 200);
}
