//! Connections have a lifecycle and every wait ends: idle HTTP connections
//! are closed, a cap keeps room for health checks, dead peers are found by
//! pings, a device that stops reading is dropped (and catches up later),
//! `/healthz` and the metrics tell the truth, and a big outbox crossing a
//! big catch-up cannot wedge either side.

mod common;

use std::time::Duration;

use common::*;
use futures_util::SinkExt;
use hearth::native_client::{self, Goal, SyncError};
use hearth_engine::protocol::{encode_client, encode_server, ClientMsg, ServerMsg};
use hearth_engine::{Event, Value};
use tokio::io::AsyncReadExt;
use tokio_tungstenite::tungstenite::Message;

async fn closed(server: &hearth_server::Running, reason: &str) -> u64 {
    metric(
        server,
        &format!("hearth_connections_closed_total{{reason=\"{reason}\"}}"),
    )
    .await
}

/// Waits (within the test timeout) until a metric reaches `at_least`.
async fn await_closed(server: &hearth_server::Running, reason: &str, at_least: u64) {
    tokio::time::timeout(TIMEOUT, async {
        while closed(server, reason).await < at_least {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no connection closed as {reason}"));
}

fn hello(client_id: u64) -> Message {
    Message::Binary(
        encode_client(&ClientMsg::Hello {
            client_id,
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
async fn connections_that_never_send_a_request_are_closed_and_health_checks_get_through() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server_with(dir.path(), FILES_SCHEMA, |c| {
        c.header_read_timeout_ms = 300;
    })
    .await;
    let mut idle = Vec::new();
    for _ in 0..50 {
        idle.push(tokio::net::TcpStream::connect(server.addr).await.unwrap());
    }
    assert_eq!(http(&server, "/healthz").await, (200, "ok\n".to_string()));
    // Every idle connection is closed by the server: reading gives EOF.
    tokio::time::timeout(TIMEOUT, async {
        for mut s in idle {
            let mut buf = [0u8; 512];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => continue, // a 408 answer, then the close
                }
            }
        }
    })
    .await
    .expect("the server closes connections that send no request");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_raises_its_open_file_limit_and_fits_its_cap_to_it() {
    let (_, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap();
    let low = hard.min(512);
    rlimit::setrlimit(rlimit::Resource::NOFILE, low, hard).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path(), FILES_SCHEMA).await;
    let (soft, _) = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap();
    assert_eq!(soft, hard, "the soft limit is raised to the hard limit");
    assert!(server.connections_max as u64 <= soft.saturating_sub(64).max(2));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_cap_keeps_room_for_health_checks() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server_with(dir.path(), FILES_SCHEMA, |c| {
        c.connections_max = 8;
        c.sync_connections_max = 3;
    })
    .await;
    let url = url(&server);
    let mut sessions = Vec::new();
    for i in 0..3 {
        let mut d = device(dir.path(), &format!("d{i}"));
        let mut ws = native_client::connect(&url, TIMEOUT).await.unwrap();
        let mut events = Vec::new();
        native_client::run_session(&mut d, &mut ws, Goal::Synced, TIMEOUT, &mut events)
            .await
            .unwrap();
        sessions.push((d, ws));
    }
    let refused = native_client::connect(&url, TIMEOUT).await;
    match refused {
        Err(SyncError::Unreachable { reason, .. }) => assert!(reason.contains("503"), "{reason}"),
        other => panic!(
            "a fourth sync session should get 503: {:?}",
            other.map(|_| ())
        ),
    }
    assert_eq!(http(&server, "/healthz").await, (200, "ok\n".to_string()));
    assert!(metric(&server, "hearth_connections_refused_total").await >= 1);
    // A session that ends frees its place.
    let (mut d, mut ws) = sessions.pop().unwrap();
    ws.close(None).await.unwrap();
    d.on_disconnected();
    await_closed(&server, "client_closed", 1).await;
    sync(&mut d, &url).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_answering_pings_is_closed_as_gone() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server_with(dir.path(), FILES_SCHEMA, |c| {
        c.ping_interval_ms = 100;
        c.peer_timeout_ms = 500;
    })
    .await;
    // Says Hello, then is never polled again: it answers no ping.
    let (mut ws, _) = tokio_tungstenite::connect_async(url(&server))
        .await
        .unwrap();
    ws.send(hello(5)).await.unwrap();
    await_closed(&server, "peer_timeout", 1).await;
    // A device that keeps reading answers the pings and stays.
    let mut d = device(dir.path(), "d");
    let mut ws2 = native_client::connect(&url(&server), TIMEOUT)
        .await
        .unwrap();
    let mut events = Vec::new();
    native_client::run_session(&mut d, &mut ws2, Goal::Synced, TIMEOUT, &mut events)
        .await
        .unwrap();
    assert_eq!(closed(&server, "peer_timeout").await, 1);
    drop(ws);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaving_without_a_close_frame_is_not_a_malformed_frame() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path(), FILES_SCHEMA).await;
    for i in 0..3 {
        let (mut ws, _) = tokio_tungstenite::connect_async(url(&server))
            .await
            .unwrap();
        ws.send(hello(10 + i)).await.unwrap();
        drop(ws); // the TCP connection closes with no WebSocket close frame
    }
    await_closed(&server, "peer_gone", 3).await;
    assert_eq!(metric(&server, "hearth_frames_malformed_total").await, 0);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_stops_reading_is_dropped_and_catches_up_later() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server_with(dir.path(), FILES_SCHEMA, |c| {
        c.write_timeout_ms = 300;
    })
    .await;
    let url = url(&server);
    // The stalled device syncs once, then keeps its socket and reads nothing.
    let mut stalled = device(dir.path(), "stalled");
    let mut ws = native_client::connect(&url, TIMEOUT).await.unwrap();
    let mut events = Vec::new();
    native_client::run_session(&mut stalled, &mut ws, Goal::Synced, TIMEOUT, &mut events)
        .await
        .unwrap();
    // Another device writes far more than socket buffers hold.
    let mut writer = device(dir.path(), "writer");
    sync(&mut writer, &url).await;
    for i in 0..40 {
        exec(
            &mut writer,
            "INSERT INTO files (id, data) VALUES (?1, ?2)",
            &[text(&format!("f{i}")), Value::Blob(vec![i as u8; MIB])],
        );
    }
    sync(&mut writer, &url).await;
    await_closed(&server, "write_timeout", 1).await;
    drop(ws);
    stalled.on_disconnected();
    sync(&mut stalled, &url).await;
    assert_eq!(
        rows(&mut stalled, "SELECT count(*) AS n FROM files"),
        vec![serde_json::json!({"n": 40})]
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_reports_a_store_that_cannot_write_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path(), FILES_SCHEMA).await;
    assert_eq!(http(&server, "/healthz").await, (200, "ok\n".to_string()));
    // Another process holds the store's write lock: the store cannot write.
    let lock = rusqlite::Connection::open(dir.path().join("server/hearth.db")).unwrap();
    lock.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let (status, body) = tokio::time::timeout(TIMEOUT, async {
        loop {
            let (status, body) = http(&server, "/healthz").await;
            if status != 200 {
                return (status, body);
            }
        }
    })
    .await
    .expect("healthz notices");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("store"), "{body}");
    // The probe's own failure (the lock's busy timeout) is counted when it ends.
    tokio::time::timeout(TIMEOUT, async {
        while metric(&server, "hearth_store_errors_total").await < 1 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the store error is counted");
    lock.execute_batch("ROLLBACK").unwrap();
    tokio::time::timeout(TIMEOUT, async {
        while http(&server, "/healthz").await.0 != 200 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("healthz recovers once the store can write");
    server.shutdown().await;
}

/// A store whose batches fail while a small probe would still succeed (a
/// full disk with a few free pages) must not look healthy: the failed batch
/// is reported until a batch commits again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_reports_a_failed_batch_until_a_batch_commits() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path(), FILES_SCHEMA).await;
    let url = url(&server);
    let mut a = device(dir.path(), "a");
    sync(&mut a, &url).await;
    exec(
        &mut a,
        "INSERT INTO files (id, data) VALUES ('f1', x'00')",
        &[],
    );
    let lock = rusqlite::Connection::open(dir.path().join("server/hearth.db")).unwrap();
    lock.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let failed = native_client::sync_once(&mut a, &url, Goal::Synced, TIMEOUT).await;
    assert_eq!(
        failed.as_ref().err().and_then(SyncError::server_code),
        Some("STORE"),
        "{failed:?}"
    );
    lock.execute_batch("ROLLBACK").unwrap();
    // The store could write a probe now, but its last batch failed. Past the
    // one second in which /healthz reuses the last write's result (so that it
    // would probe), the failed batch must still be what it reports.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let (status, body) = http(&server, "/healthz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("last batch"), "{body}");
    assert_eq!(a.status().pending, 1, "the write waits in the outbox");
    sync(&mut a, &url).await;
    assert_eq!(http(&server, "/healthz").await, (200, "ok\n".to_string()));
    server.shutdown().await;
}

/// Issue 8, item 8: a device whose pushes were applied but whose acks never
/// arrived reconnects and re-sends a big outbox while the server sends it
/// the same entries as a big catch-up. Both sides must keep reading while
/// they write, or both block in `send` with full socket buffers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_outbox_crossing_a_big_catch_up_does_not_wedge() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path(), FILES_SCHEMA).await;
    let url = url(&server);
    let mut a = device(dir.path(), "a");
    sync(&mut a, &url).await;
    let count = 24;
    for i in 0..count {
        exec(
            &mut a,
            "INSERT INTO files (id, data) VALUES (?1, ?2)",
            &[text(&format!("f{i}")), Value::Blob(vec![i as u8; MIB])],
        );
    }
    // Push everything, then vanish before reading a single ack.
    let mut ws = native_client::connect(&url, TIMEOUT).await.unwrap();
    native_client::send(&mut ws, a.on_connected())
        .await
        .unwrap();
    while !a.status().connected {
        native_client::step(&mut a, &mut ws).await.unwrap();
    }
    tokio::time::timeout(TIMEOUT, async {
        while metric(&server, "hearth_mutations_applied_total").await < count {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the server applies the pushes");
    drop(ws);
    a.on_disconnected();
    assert_eq!(a.status().pending, count);

    // Now ~24 MiB go each way at once.
    let events = tokio::time::timeout(
        TIMEOUT * 2,
        native_client::sync_once(&mut a, &url, Goal::Synced, TIMEOUT),
    )
    .await
    .expect("the sync returns, close included")
    .expect("the sync succeeds");
    let applied = events
        .iter()
        .filter(|e| matches!(e, Event::Applied { .. }))
        .count();
    assert_eq!(applied, count as usize);
    assert_eq!(a.status().pending, 0);
    assert_eq!(
        metric(&server, "hearth_mutations_applied_total").await,
        count
    );
    server.shutdown().await;
}

/// The server's half alone: a device that writes its whole outbox before it
/// reads anything (as the native client did before it read while writing)
/// still gets through, because the server keeps reading while it sends the
/// catch-up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_reads_while_it_writes_even_to_a_device_that_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path(), FILES_SCHEMA).await;
    let url = url(&server);
    let mut a = device(dir.path(), "a");
    sync(&mut a, &url).await;
    let count = 24u64;
    for i in 0..count {
        exec(
            &mut a,
            "INSERT INTO files (id, data) VALUES (?1, ?2)",
            &[text(&format!("f{i}")), Value::Blob(vec![i as u8; MIB])],
        );
    }
    // Another device already pushed the same amount: a big catch-up for `a`.
    let mut b = device(dir.path(), "b");
    sync(&mut b, &url).await;
    for i in 0..count {
        exec(
            &mut b,
            "INSERT INTO files (id, data) VALUES (?1, ?2)",
            &[text(&format!("g{i}")), Value::Blob(vec![i as u8; MIB])],
        );
    }
    sync(&mut b, &url).await;
    // `step` reads one message, then writes everything the engine releases
    // before reading again.
    let mut ws = native_client::connect(&url, TIMEOUT).await.unwrap();
    tokio::time::timeout(TIMEOUT, async {
        native_client::send(&mut ws, a.on_connected())
            .await
            .unwrap();
        while !(a.status().caught_up && a.status().pending == 0) {
            native_client::step(&mut a, &mut ws)
                .await
                .unwrap()
                .expect("connected");
        }
    })
    .await
    .expect("no deadlock");
    assert_eq!(
        rows(&mut a, "SELECT count(*) AS n FROM files"),
        vec![serde_json::json!({"n": 2 * count})]
    );
    server.shutdown().await;
}

/// Issue 8, item 5: while one connection pushes as fast as it can, another
/// device's write is applied (not left `queued` by a session timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_flooding_does_not_starve_another_device() {
    use futures_util::StreamExt;
    use hearth_engine::{ColumnOp, Hlc, Mutation, RowChange, RowOp};
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path(), FILES_SCHEMA).await;
    let url = url(&server);
    let (ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let (mut sink, mut stream) = ws.split();
    sink.send(hello(99)).await.unwrap();
    tokio::spawn(async move { while let Some(Ok(_)) = stream.next().await {} });
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flooding = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut seq = 0u64;
            // Bounded: at most 2,000 frames of 500 mutations.
            for _ in 0..2_000 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let mutations = (0..500)
                    .map(|_| {
                        seq += 1;
                        Mutation {
                            base: 0,
                            also_seen: Vec::new(),
                            seq,
                            hlc: Hlc::new(native_client::now_ms(), 0),
                            changes: vec![RowChange {
                                table: "files".into(),
                                pk: text(&format!("flood-{seq}")),
                                op: RowOp::Upsert {
                                    insert: true,
                                    columns: vec![(
                                        "data".into(),
                                        ColumnOp::Set(Value::Blob(vec![1; 32])),
                                    )],
                                },
                            }],
                            schema_version: 0,
                        }
                    })
                    .collect();
                let frame = encode_client(&ClientMsg::Push { mutations });
                if sink.send(Message::Binary(frame.into())).await.is_err() {
                    break;
                }
            }
            seq
        }
    });
    // Let the flood start before the normal device writes.
    tokio::time::timeout(TIMEOUT, async {
        while metric(&server, "hearth_mutations_applied_total").await < 5_000 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the flood is applied");
    let mut d = device(dir.path(), "normal");
    sync(&mut d, &url).await;
    let seq = exec(
        &mut d,
        "INSERT INTO files (id, data) VALUES ('mine', x'01')",
        &[],
    )
    .unwrap();
    let result =
        native_client::sync_once(&mut d, &url, Goal::Resolved(seq), Duration::from_secs(10)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let events = result.expect("the write is answered while the flood goes on");
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::Applied { seq: s, .. } if *s == seq)),
        "{events:?}"
    );
    let flooded = flooding.await.unwrap();
    assert!(flooded > 5_000);
    server.shutdown().await;
}

/// A server that takes the device's hello, welcomes it, and then never
/// reads again: the device's big push fills the socket; its sync must still
/// end at its timeout, close included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_against_a_server_that_stops_reading_ends_at_its_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path(), FILES_SCHEMA).await;
    let mut a = device(dir.path(), "a");
    sync(&mut a, &url(&server)).await;
    server.shutdown().await;
    for i in 0..16 {
        exec(
            &mut a,
            "INSERT INTO files (id, data) VALUES (?1, ?2)",
            &[text(&format!("f{i}")), Value::Blob(vec![1; MIB])],
        );
    }

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (held_tx, held_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
        let _hello = futures_util::StreamExt::next(&mut ws).await;
        let welcome = ServerMsg::Welcome {
            floor: 0,
            server_seq: 0,
            schema_version: 1,
            schema: None,
            frame_bytes_max: hearth_engine::protocol::FRAME_BYTES_MAX as u64,
            last_seq: 0,
            hlc: hearth_engine::Hlc(0),
        };
        ws.send(Message::Binary(encode_server(&welcome).into()))
            .await
            .unwrap();
        // Hold the socket without ever reading it again.
        let _ = held_tx.send(ws);
    });
    let result = tokio::time::timeout(
        TIMEOUT,
        native_client::sync_once(
            &mut a,
            &format!("ws://{addr}/sync"),
            Goal::Synced,
            Duration::from_secs(2),
        ),
    )
    .await
    .expect("the sync ends, close included");
    assert!(matches!(result, Err(SyncError::Timeout(_))), "{result:?}");
    drop(held_rx);
    assert_eq!(a.status().pending, 16, "nothing is lost");
}
