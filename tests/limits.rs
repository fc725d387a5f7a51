//! Frames and memory are bounded in bytes: no frame the server builds is
//! larger than its peers accept, a mutation whose effect could not travel to
//! a device is refused, limits that do not fit stop the server at start, and
//! a push of millions of mutations is refused before it is decoded.

mod common;

use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use hearth::native_client::{self, Goal};
use hearth_engine::protocol::{
    decode_server, encode_client, ClientMsg, ServerMsg, FRAME_BYTES_MAX, PROTOCOL_VERSION,
};
use hearth_engine::{ColumnOp, Event, Hlc, Mutation, RowChange, RowOp, Schema, Value};
use tokio_tungstenite::tungstenite::Message;

fn blob(bytes: usize, fill: u8) -> Value {
    Value::Blob(vec![fill; bytes])
}

/// A raw connection that has said Hello and read the Welcome.
async fn raw_session(url: &str, client_id: u64) -> native_client::Ws {
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let hello = ClientMsg::Hello {
        client_id,
        cursor: 0,
        schema_version: None,
        subscriptions: Vec::new(),
        token: None,
        reloaded: Default::default(),
        first_pending: 0,
    };
    ws.send(Message::Binary(encode_client(&hello).into()))
        .await
        .unwrap();
    match next_msg(&mut ws).await {
        Some(ServerMsg::Welcome { .. }) => ws,
        other => panic!("expected Welcome, got {other:?}"),
    }
}

/// The next server message on a raw connection, None once it closes.
async fn next_msg(ws: &mut native_client::Ws) -> Option<ServerMsg> {
    tokio::time::timeout(TIMEOUT, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Binary(b))) => {
                    return Some(decode_server(&b, FRAME_BYTES_MAX).unwrap())
                }
                Some(Ok(_)) => continue,
                _ => return None,
            }
        }
    })
    .await
    .expect("the server answers in time")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_writers_of_12_mib_each_reach_everyone_in_frames_within_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path(), FILES_SCHEMA).await;
    let url = url(&server);
    let mut devices = Vec::new();
    for i in 0..6 {
        let mut d = device(dir.path(), &format!("d{i}"));
        sync(&mut d, &url).await;
        devices.push(d);
    }
    // Each device writes one 12 MiB value; all six push at the same moment.
    let mut tasks = Vec::new();
    for (i, mut d) in devices.into_iter().enumerate() {
        let seq = exec(
            &mut d,
            "INSERT INTO files (id, data) VALUES (?1, ?2)",
            &[text(&format!("f{i}")), blob(12 * MIB, i as u8)],
        )
        .unwrap();
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let events = native_client::sync_once(&mut d, &url, Goal::Resolved(seq), TIMEOUT)
                .await
                .expect("the writer hears back");
            (d, seq, events)
        }));
    }
    let mut devices = Vec::new();
    for task in tasks {
        let (d, seq, events) = task.await.unwrap();
        assert!(
            events
                .iter()
                .any(|e| matches!(e, Event::Applied { seq: s, .. } if *s == seq)),
            "writer told its write applied: {events:?}"
        );
        devices.push(d);
    }
    for d in &mut devices {
        eprintln!("before {:?}", d.status());
        let evs = sync(d, &url).await;
        eprintln!(
            "after {:?} {:?}",
            d.status(),
            evs.iter()
                .map(|e| format!("{e:?}").chars().take(80).collect::<String>())
                .collect::<Vec<_>>()
        );
        assert_eq!(
            rows(
                d,
                "SELECT count(*) AS n, sum(length(data)) AS bytes FROM files"
            ),
            vec![serde_json::json!({"n": 6, "bytes": 6 * 12 * MIB})]
        );
    }
    let largest = metric(&server, "hearth_frame_bytes_largest").await;
    assert!(largest > 12 * MIB as u64, "the values travelled: {largest}");
    assert!(
        largest <= FRAME_BYTES_MAX as u64,
        "largest frame built {largest} exceeds the {FRAME_BYTES_MAX} devices accept"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mutation_too_large_to_travel_is_refused_and_every_device_still_syncs() {
    let dir = tempfile::tempdir().unwrap();
    let frame_max = MIB;
    let server = start_server_with(dir.path(), FILES_SCHEMA, |c| {
        c.set_frame_bytes_max(frame_max)
    })
    .await;
    let url = url(&server);

    // A device's write over the server's mutation limit: refused, undone.
    let mut a = device(dir.path(), "a");
    sync(&mut a, &url).await;
    let seq = exec(
        &mut a,
        "INSERT INTO files (id, data) VALUES ('big', ?1)",
        &[blob(frame_max * 3 / 4, 1)],
    )
    .unwrap();
    let events = native_client::sync_once(&mut a, &url, Goal::Resolved(seq), TIMEOUT)
        .await
        .unwrap();
    assert!(
        events.iter().any(
            |e| matches!(e, Event::Rejected { seq: s, code, .. } if *s == seq && code == "TOO_LARGE")
        ),
        "{events:?}"
    );
    assert_eq!(
        rows(&mut a, "SELECT id FROM files"),
        Vec::<serde_json::Value>::new()
    );

    // A hostile push: one frame of the frame limit minus 4 bytes, one mutation.
    let mut ws = raw_session(&url, 77).await;
    let mutation = |data: usize| Mutation {
        base: 0,
        also_seen: Vec::new(),
        seq: 1,
        hlc: Hlc::new(1_000, 0),
        changes: vec![RowChange {
            table: "files".into(),
            pk: text("hostile"),
            op: RowOp::Upsert {
                insert: true,
                columns: vec![("data".into(), ColumnOp::Set(blob(data, 2)))],
            },
        }],
        schema_version: 0,
    };
    let size_of = |data: usize| {
        encode_client(&ClientMsg::Push {
            mutations: vec![mutation(data)],
        })
        .len()
    };
    let mut data = frame_max - 4 - (size_of(0) + 4);
    while size_of(data) < frame_max - 4 {
        data += 1;
    }
    let frame = encode_client(&ClientMsg::Push {
        mutations: vec![mutation(data)],
    });
    assert_eq!(frame.len(), frame_max - 4);
    ws.send(Message::Binary(frame.into())).await.unwrap();
    loop {
        match next_msg(&mut ws).await {
            Some(ServerMsg::Rejected {
                client_seq, code, ..
            }) => {
                assert_eq!((client_seq, code.as_str()), (1, "TOO_LARGE"));
                break;
            }
            Some(ServerMsg::Changes { entries, .. }) => assert!(entries.is_empty()),
            other => panic!("expected Rejected, got {other:?}"),
        }
    }

    // The log holds nothing that cannot travel: a fresh device and the
    // writer both sync, and a normal write goes through.
    exec(
        &mut a,
        "INSERT INTO files (id, data) VALUES ('small', ?1)",
        &[blob(1000, 3)],
    );
    sync(&mut a, &url).await;
    let mut fresh = device(dir.path(), "fresh");
    sync(&mut fresh, &url).await;
    assert_eq!(
        rows(&mut fresh, "SELECT id FROM files"),
        vec![serde_json::json!({"id": "small"})]
    );
    assert!(metric(&server, "hearth_frame_bytes_largest").await <= frame_max as u64);
    server.shutdown().await;
}

#[tokio::test]
async fn limits_that_do_not_fit_stop_the_server_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = || {
        hearth_server::ServerConfig::new(
            "127.0.0.1:0".parse().unwrap(),
            dir.path().join("server"),
            Schema::parse(FILES_SCHEMA).unwrap(),
        )
    };
    assert_eq!(config().check(), Ok(()));
    type Tweak = Box<dyn Fn(&mut hearth_server::ServerConfig)>;
    let cases: [(&str, Tweak); 4] = [
        (
            "log_entry_bytes_max",
            Box::new(|c| c.mutation_bytes_max = c.log_entry_bytes_max),
        ),
        (
            "frame_bytes_max",
            Box::new(|c| c.log_entry_bytes_max = c.frame_bytes_max),
        ),
        (
            "a device accepts",
            Box::new(|c| c.frame_bytes_max = FRAME_BYTES_MAX + 1),
        ),
        (
            "room for /healthz",
            Box::new(|c| c.sync_connections_max = c.connections_max),
        ),
    ];
    for (words, tweak) in cases {
        let mut c = config();
        tweak(&mut c);
        match hearth_server::start(c, &[]).await {
            Err(e @ hearth_server::StartError::Limits(_)) => {
                assert!(e.to_string().contains(words), "{e}")
            }
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("started with limits that do not fit ({words})"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_of_millions_of_empty_mutations_is_refused_before_decoding() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path(), FILES_SCHEMA).await;
    let url = url(&server);
    let mut ws = raw_session(&url, 78).await;
    // The frame as the issue measured it: 11 million empty mutations in
    // 32 MiB (version, `Push`, the count, then seq 1, hlc 0, no changes).
    let count: u64 = 11_000_000;
    let mut frame = vec![PROTOCOL_VERSION as u8, 1];
    let mut n = count;
    while n >= 0x80 {
        frame.push((n as u8) | 0x80);
        n >>= 7;
    }
    frame.push(n as u8);
    frame.reserve(count as usize * 3);
    for _ in 0..count {
        frame.extend_from_slice(&[1, 0, 0]);
    }
    assert!(frame.len() <= FRAME_BYTES_MAX);
    ws.send(Message::Binary(frame.into())).await.unwrap();
    loop {
        match next_msg(&mut ws).await {
            Some(ServerMsg::Error { code, message }) => {
                assert_eq!(code, "TOO_MANY_MUTATIONS");
                assert!(message.contains("11000000"), "{message}");
                break;
            }
            Some(ServerMsg::Changes { .. }) => continue,
            other => panic!("expected Error, got {other:?}"),
        }
    }
    assert_eq!(metric(&server, "hearth_frames_malformed_total").await, 1);

    // Everyone else is unaffected.
    let mut a = device(dir.path(), "a");
    sync(&mut a, &url).await;
    exec(
        &mut a,
        "INSERT INTO files (id, data) VALUES ('x', x'00')",
        &[],
    );
    let events = native_client::sync_once(&mut a, &url, Goal::Synced, Duration::from_secs(20))
        .await
        .unwrap();
    assert!(events.iter().any(|e| matches!(e, Event::Applied { .. })));
    server.shutdown().await;
}
