//! Load benchmarks for issue 8: memory stays bounded in bytes and one
//! connection cannot starve the others. Each scenario starts a fresh
//! `hearth serve` process on 127.0.0.1 (so its peak RSS is the server's
//! alone, read from /proc) and drives it over real WebSockets.
//!
//! Run: `cargo build --release && cargo run --release --example bench_load`
//! (it needs `target/release/hearth`); an argument runs only the scenarios
//! whose name contains it (e.g. `flood`). Prints each figure beside its target
//! and writes target/bench/load.json. Every scenario is bounded in time.

use std::time::{Duration, Instant};

use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use hearth::native_client::{self, Ws};
use hearth_engine::protocol::{
    decode_server, encode_client, ClientMsg, ServerMsg, FRAME_BYTES_MAX,
};
use hearth_engine::{ColumnOp, Hlc, Mutation, RowChange, RowOp, Value};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

const SCHEMA: &str = r#"
version = 1
[tables.files]
create = "CREATE TABLE files (id TEXT PRIMARY KEY, data BLOB NOT NULL)"
merge = "lww"
"#;

const MIB: usize = 1024 * 1024;
const RSS_TARGET_MIB: f64 = 512.0;

#[path = "support/served.rs"]
mod served;
use served::Served as Server;

impl Server {
    fn start() -> Server {
        Server::start_with(SCHEMA)
    }

    /// The server process's peak resident set, in MiB.
    fn peak_rss_mib(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map(|kb| kb / 1024.0)
            .unwrap_or(f64::NAN)
    }

    async fn metric(&self, name: &str) -> u64 {
        let body = http_get(&self.addr, "/metrics").await.1;
        body.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }
}

async fn http_get(addr: &str, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return (0, String::new());
    };
    let _ = s
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await;
    let mut out = String::new();
    let _ = s.read_to_string(&mut out).await;
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, body.to_string())
}

/// What a raw connection hears about its own mutations.
#[derive(Debug)]
enum Heard {
    Acked(u64, Instant),
    Refused(String),
    Error(String),
    Closed,
}

/// A raw device: pushes hand-made mutations and hears about them.
struct Raw {
    client_id: u64,
    next_seq: u64,
    sink: SplitSink<Ws, Message>,
    heard: mpsc::UnboundedReceiver<Heard>,
}

impl Raw {
    async fn connect(url: &str) -> Raw {
        let mut ws = native_client::connect(url, Duration::from_secs(10))
            .await
            .unwrap();
        let client_id = native_client::new_client_id();
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
        let (sink, mut stream) = ws.split();
        let (tx, heard) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(Ok(msg)) = stream.next().await {
                let Message::Binary(b) = msg else { continue };
                match decode_server(&b, FRAME_BYTES_MAX) {
                    Ok(ServerMsg::Changes { entries, .. }) => {
                        let now = Instant::now();
                        for e in entries.iter().filter(|e| e.client_id == client_id) {
                            let _ = tx.send(Heard::Acked(e.client_seq, now));
                        }
                    }
                    Ok(ServerMsg::Rejected { code, .. }) => {
                        let _ = tx.send(Heard::Refused(code));
                    }
                    Ok(ServerMsg::Error { code, .. }) => {
                        let _ = tx.send(Heard::Error(code));
                    }
                    _ => {}
                }
            }
            let _ = tx.send(Heard::Closed);
        });
        Raw {
            client_id,
            next_seq: 1,
            sink,
            heard,
        }
    }

    fn mutation(&mut self, bytes: usize) -> Mutation {
        let seq = self.next_seq;
        self.next_seq += 1;
        Mutation {
            base: 0,
            also_seen: Vec::new(),
            seq,
            hlc: Hlc::new(native_client::now_ms(), 0),
            changes: vec![RowChange {
                table: "files".into(),
                pk: Value::Text(format!("{:x}-{seq}", self.client_id)),
                op: RowOp::Upsert {
                    insert: true,
                    columns: vec![(
                        "data".into(),
                        ColumnOp::Set(Value::Blob(vec![seq as u8; bytes])),
                    )],
                },
            }],
            schema_version: 0,
        }
    }

    async fn push(&mut self, mutations: Vec<Mutation>) -> bool {
        let frame = encode_client(&ClientMsg::Push { mutations });
        self.sink.send(Message::Binary(frame.into())).await.is_ok()
    }

    /// Pushes as the native client does: a big message in 256 KiB fragments.
    async fn push_fragmented(&mut self, mutations: Vec<Mutation>) -> bool {
        use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
        use tokio_tungstenite::tungstenite::protocol::frame::Frame;
        let frame = axum_bytes(encode_client(&ClientMsg::Push { mutations }));
        let piece = 256 * 1024;
        let mut offset = 0;
        while offset < frame.len() {
            let end = (offset + piece).min(frame.len());
            let opcode = if offset == 0 {
                OpCode::Data(Data::Binary)
            } else {
                OpCode::Data(Data::Continue)
            };
            let f = Frame::message(frame.slice(offset..end), opcode, end == frame.len());
            if self.sink.feed(Message::Frame(f)).await.is_err() {
                return false;
            }
            offset = end;
        }
        self.sink.flush().await.is_ok()
    }
}

struct Figure {
    name: &'static str,
    value: f64,
    unit: &'static str,
    target: String,
    ok: bool,
}

fn rss_figure(name: &'static str, server: &Server) -> Figure {
    let value = server.peak_rss_mib();
    Figure {
        name,
        value,
        unit: "MiB",
        target: format!("< {RSS_TARGET_MIB}"),
        ok: value < RSS_TARGET_MIB,
    }
}

fn count_figure(name: &'static str, value: usize, want: usize) -> Figure {
    Figure {
        name,
        value: value as f64,
        unit: "",
        target: format!("= {want}"),
        ok: value == want,
    }
}

/// A device that stops reading while 1,200 mutations of 1 MiB are written.
async fn stalled_reader() -> Vec<Figure> {
    let server = Server::start();
    let url = server.url();
    let stalled = native_client::connect(&url, Duration::from_secs(10))
        .await
        .unwrap();
    let mut stalled = stalled;
    let hello = ClientMsg::Hello {
        client_id: 42,
        cursor: 0,
        schema_version: None,
        subscriptions: Vec::new(),
        token: None,
        reloaded: Default::default(),
        first_pending: 0,
    };
    stalled
        .send(Message::Binary(encode_client(&hello).into()))
        .await
        .unwrap();
    // It never reads again.
    let mut writer = Raw::connect(&url).await;
    let total = 1_200;
    let window = 32;
    let (mut sent, mut acked) = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked < total && Instant::now() < deadline {
        while sent < total && sent - acked < window {
            let m = writer.mutation(MIB);
            writer.push(vec![m]).await;
            sent += 1;
        }
        match tokio::time::timeout(Duration::from_secs(10), writer.heard.recv()).await {
            Ok(Some(Heard::Acked(..))) => acked += 1,
            _ => break,
        }
    }
    drop(stalled);
    vec![
        count_figure("stalled_reader.acked", acked, total),
        rss_figure("stalled_reader.peak_rss", &server),
    ]
}

fn axum_bytes(v: Vec<u8>) -> tokio_tungstenite::tungstenite::Bytes {
    v.into()
}

/// Ten connections each push one mutation of `bytes` at once, in one frame
/// (as a browser does) or in fragments (as the native client does).
async fn big_pushes(bytes: usize, expect: &'static str, fragmented: bool) -> Vec<Figure> {
    let server = Server::start();
    let url = server.url();
    let mut raws = Vec::new();
    for _ in 0..10 {
        raws.push(Raw::connect(&url).await);
    }
    let mut tasks = Vec::new();
    for mut raw in raws {
        tasks.push(tokio::spawn(async move {
            let m = raw.mutation(bytes);
            if fragmented {
                raw.push_fragmented(vec![m]).await;
            } else {
                raw.push(vec![m]).await;
            }
            match tokio::time::timeout(Duration::from_secs(60), raw.heard.recv()).await {
                Ok(Some(Heard::Acked(..))) => "applied",
                Ok(Some(Heard::Refused(code))) if code == "TOO_LARGE" => "refused",
                _ => "unanswered",
            }
        }));
    }
    let mut answered = 0;
    for t in tasks {
        if t.await.unwrap() == expect {
            answered += 1;
        }
    }
    let (count_name, rss_name) = match (expect, fragmented) {
        ("applied", true) => (
            "ten_15mib_pushes_fragmented.applied",
            "ten_15mib_pushes_fragmented.peak_rss",
        ),
        ("applied", false) => (
            "ten_15mib_pushes_one_frame.applied",
            "ten_15mib_pushes_one_frame.peak_rss",
        ),
        _ => (
            "ten_30mib_pushes.refused_too_large",
            "ten_30mib_pushes.peak_rss",
        ),
    };
    vec![
        count_figure(count_name, answered, 10),
        rss_figure(rss_name, &server),
    ]
}

/// Write latency of a normal device (one connection, one small write at a
/// time) while `during` runs.
async fn normal_writes(url: &str, duration: Duration) -> Vec<Duration> {
    let mut raw = Raw::connect(url).await;
    let mut latencies = Vec::new();
    let end = Instant::now() + duration;
    while Instant::now() < end {
        let m = raw.mutation(100);
        let seq = m.seq;
        let start = Instant::now();
        raw.push(vec![m]).await;
        let got = tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                match raw.heard.recv().await {
                    Some(Heard::Acked(s, at)) if s == seq => return Some(at),
                    Some(Heard::Closed) | None => return None,
                    _ => continue,
                }
            }
        })
        .await;
        match got {
            Ok(Some(at)) => latencies.push(at - start),
            _ => {
                latencies.push(Duration::from_secs(60));
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    latencies
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::from_secs(3600);
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// One connection pushes valid small mutations as fast as it can for 20 s;
/// another device writes one row at a time and measures each ack.
async fn flood() -> Vec<Figure> {
    let server = Server::start();
    let url = server.url();
    let flood_for = Duration::from_secs(20);
    let mut flooder = Raw::connect(&url).await;
    let flooding = tokio::spawn(async move {
        let end = Instant::now() + flood_for;
        let mut sent = 0usize;
        while Instant::now() < end {
            let batch: Vec<Mutation> = (0..500).map(|_| flooder.mutation(64)).collect();
            if !flooder.push(batch).await {
                break;
            }
            sent += 500;
            // Drain what it hears so it is a well-behaved reader.
            while flooder.heard.try_recv().is_ok() {}
        }
        sent
    });
    let mut latencies = normal_writes(&url, flood_for).await;
    let sent = flooding.await.unwrap();
    let applied = server.metric("hearth_mutations_applied_total").await;
    latencies.sort();
    let p99 = percentile(&latencies, 0.99);
    let p50 = percentile(&latencies, 0.50);
    println!(
        "  flood: flooder pushed {sent} mutations, server applied {applied}; normal device made {} writes",
        latencies.len()
    );
    vec![
        Figure {
            name: "flood.normal_write_ack_p50",
            value: p50.as_secs_f64() * 1e3,
            unit: "ms",
            target: "-".into(),
            ok: true,
        },
        Figure {
            name: "flood.normal_write_ack_p99",
            value: p99.as_secs_f64() * 1e3,
            unit: "ms",
            target: "< 1000".into(),
            ok: p99 < Duration::from_secs(1),
        },
        Figure {
            name: "flood.applied_per_s",
            value: applied as f64 / flood_for.as_secs_f64(),
            unit: "/s",
            target: "-".into(),
            ok: true,
        },
        rss_figure("flood.peak_rss", &server),
    ]
}

/// A 32 MiB push frame holding 11 million empty mutations, while a normal
/// device writes.
async fn empty_mutations() -> Vec<Figure> {
    let server = Server::start();
    let url = server.url();
    let mut hostile = Raw::connect(&url).await;
    let count: u64 = 11_000_000;
    let mut frame = vec![hearth_engine::PROTOCOL_VERSION as u8, 1];
    let mut n = count;
    while n >= 0x80 {
        frame.push((n as u8) | 0x80);
        n >>= 7;
    }
    frame.push(n as u8);
    for _ in 0..count {
        frame.extend_from_slice(&[1, 0, 0]);
    }
    let normal = tokio::spawn({
        let url = url.clone();
        async move { normal_writes(&url, Duration::from_secs(3)).await }
    });
    hostile
        .sink
        .send(Message::Binary(frame.into()))
        .await
        .unwrap();
    let code = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match hostile.heard.recv().await {
                Some(Heard::Error(code)) => return code,
                Some(Heard::Closed) | None => return "closed without a code".to_string(),
                _ => continue,
            }
        }
    })
    .await
    .unwrap_or_else(|_| "no answer".into());
    let mut latencies = normal.await.unwrap();
    latencies.sort();
    let worst = latencies.last().copied().unwrap_or_default();
    println!("  empty mutations: the hostile push was answered {code}");
    vec![
        Figure {
            name: "empty_mutations.refused_with_code",
            value: f64::from(u8::from(code == "TOO_MANY_MUTATIONS")),
            unit: "",
            target: "= 1".into(),
            ok: code == "TOO_MANY_MUTATIONS",
        },
        Figure {
            name: "empty_mutations.other_device_worst_ack",
            value: worst.as_secs_f64() * 1e3,
            unit: "ms",
            target: "< 1000".into(),
            ok: worst < Duration::from_secs(1),
        },
        rss_figure("empty_mutations.peak_rss", &server),
    ]
}

/// 2,000 TCP connections that never send a request: /healthz still answers,
/// and the server closes them after its header-read timeout.
async fn idle_connections() -> Vec<Figure> {
    let server = Server::start();
    let mut idle = Vec::new();
    for _ in 0..2_000 {
        match tokio::net::TcpStream::connect(&server.addr).await {
            Ok(s) => idle.push(s),
            Err(_) => break,
        }
    }
    let opened = idle.len();
    let start = Instant::now();
    let (status, _) =
        tokio::time::timeout(Duration::from_secs(10), http_get(&server.addr, "/healthz"))
            .await
            .unwrap_or((0, String::new()));
    let health_ms = start.elapsed().as_secs_f64() * 1e3;
    // The default header-read timeout is 10 s: all should be closed by 15 s.
    let closed = tokio::time::timeout(Duration::from_secs(15), async {
        let mut closed = 0;
        for mut s in idle {
            use tokio::io::AsyncReadExt;
            let mut buf = [0u8; 256];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => continue,
                }
            }
            closed += 1;
        }
        closed
    })
    .await
    .unwrap_or(0);
    vec![
        count_figure("idle_connections.opened", opened, 2_000),
        Figure {
            name: "idle_connections.healthz",
            value: health_ms,
            unit: "ms",
            target: "200 within 1000".into(),
            ok: status == 200 && health_ms < 1000.0,
        },
        count_figure("idle_connections.closed_by_server", closed, opened),
        rss_figure("idle_connections.peak_rss", &server),
    ]
}

/// Issue 8, item 8: a device whose pushes were applied but never acked
/// re-sends a 24 MiB outbox while the server sends it the same 24 MiB as
/// catch-up. Before, both sides could block in `send` forever.
async fn crossing() -> Vec<Figure> {
    let server = Server::start();
    let url = server.url();
    let dir = tempfile::tempdir().unwrap();
    let mut a = native_client::open_device(
        &dir.path().join("a.db"),
        hearth_engine::ClientConfig::default(),
    )
    .unwrap();
    native_client::sync_once(
        &mut a,
        &url,
        native_client::Goal::Synced,
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let count = 24u64;
    for i in 0..count {
        a.exec(
            "INSERT INTO files (id, data) VALUES (?1, ?2)",
            &[
                Value::Text(format!("f{i}")),
                Value::Blob(vec![i as u8; MIB]),
            ],
            native_client::now_ms(),
        )
        .unwrap();
    }
    let mut ws = native_client::connect(&url, Duration::from_secs(10))
        .await
        .unwrap();
    native_client::send(&mut ws, a.on_connected())
        .await
        .unwrap();
    while !a.status().connected {
        native_client::step(&mut a, &mut ws).await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while server.metric("hearth_mutations_applied_total").await < count && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(ws);
    a.on_disconnected();
    // First as a device that writes its whole outbox before reading (the
    // native client before this change): only the server reading while it
    // writes keeps this from wedging.
    let start = Instant::now();
    let mut ws = native_client::connect(&url, Duration::from_secs(10))
        .await
        .unwrap();
    let writer_first = tokio::time::timeout(Duration::from_secs(10), async {
        native_client::send(&mut ws, a.on_connected()).await?;
        while !(a.status().caught_up && a.status().pending == 0) {
            if native_client::step(&mut a, &mut ws).await?.is_none() {
                break;
            }
        }
        Ok::<(), native_client::SyncError>(())
    })
    .await;
    let writer_first_ok = matches!(writer_first, Ok(Ok(()))) && a.status().pending == 0;
    let writer_first_ms = start.elapsed().as_secs_f64() * 1e3;
    drop(ws);
    a.on_disconnected();
    // Then, after the same vanishing act, with the native client as it is.
    for i in 0..count {
        a.exec(
            "INSERT INTO files (id, data) VALUES (?1, ?2)",
            &[
                Value::Text(format!("h{i}")),
                Value::Blob(vec![i as u8; MIB]),
            ],
            native_client::now_ms(),
        )
        .unwrap();
    }
    // Bounded: against a server that does not read while it writes, this
    // step-by-step push wedges too.
    let setup = tokio::time::timeout(Duration::from_secs(20), async {
        let mut ws = native_client::connect(&url, Duration::from_secs(10)).await?;
        native_client::send(&mut ws, a.on_connected()).await?;
        while !a.status().connected {
            native_client::step(&mut a, &mut ws).await?;
        }
        while server.metric("hearth_mutations_applied_total").await < 2 * count {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok::<_, native_client::SyncError>(ws)
    })
    .await;
    let setup_ok = matches!(setup, Ok(Ok(_)));
    drop(setup);
    a.on_disconnected();
    let start = Instant::now();
    let synced = if setup_ok {
        native_client::sync_once(
            &mut a,
            &url,
            native_client::Goal::Synced,
            Duration::from_secs(10),
        )
        .await
        .map(|_| ())
    } else {
        Err(native_client::SyncError::Closed(
            "the set-up push wedged".into(),
        ))
    };
    let took = start.elapsed();
    vec![
        Figure {
            name: "crossing_24mib.writer_first_ok",
            value: f64::from(u8::from(writer_first_ok)),
            unit: "",
            target: "= 1".into(),
            ok: writer_first_ok,
        },
        Figure {
            name: "crossing_24mib.writer_first_time",
            value: writer_first_ms,
            unit: "ms",
            target: "< 10000 (CLI default)".into(),
            ok: writer_first_ok && writer_first_ms < 10_000.0,
        },
        Figure {
            name: "crossing_24mib.sync_ok",
            value: f64::from(u8::from(synced.is_ok() && a.status().pending == 0)),
            unit: "",
            target: "= 1".into(),
            ok: synced.is_ok() && a.status().pending == 0,
        },
        Figure {
            name: "crossing_24mib.sync_time",
            value: took.as_secs_f64() * 1e3,
            unit: "ms",
            target: "< 10000 (CLI default)".into(),
            ok: synced.is_ok() && took < Duration::from_secs(10),
        },
        rss_figure("crossing_24mib.peak_rss", &server),
    ]
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    // An argument runs only the scenarios whose label contains it.
    let only = std::env::args().nth(1);
    let started = Instant::now();
    let mut figures = Vec::new();
    for (label, scenario) in [
        ("stalled reader, 1,200 x 1 MiB written", 0),
        ("ten 30 MiB pushes at once", 1),
        ("ten 15 MiB pushes at once, one frame each", 2),
        ("ten 15 MiB pushes at once, fragmented", 6),
        ("11 million empty mutations in one push", 3),
        ("one connection floods for 20 s", 4),
        ("2,000 idle TCP connections", 5),
        ("a 24 MiB outbox crossing a 24 MiB catch-up", 7),
    ] {
        if only.as_ref().is_some_and(|o| !label.contains(o.as_str())) {
            continue;
        }
        println!("scenario: {label}");
        let t = Instant::now();
        let run = async {
            match scenario {
                0 => stalled_reader().await,
                1 => big_pushes(30 * MIB, "refused", false).await,
                2 => big_pushes(15 * MIB, "applied", false).await,
                6 => big_pushes(15 * MIB, "applied", true).await,
                7 => crossing().await,
                3 => empty_mutations().await,
                4 => flood().await,
                _ => idle_connections().await,
            }
        };
        // Every scenario is bounded; one that hangs (say, against an older
        // build that deadlocks) is reported as such and its server killed.
        let got = match tokio::time::timeout(Duration::from_secs(90), run).await {
            Ok(got) => got,
            Err(_) => vec![Figure {
                name: "scenario_finished_within_90_s",
                value: 0.0,
                unit: "",
                target: "= 1".into(),
                ok: false,
            }],
        };
        println!("  ({:.1} s)", t.elapsed().as_secs_f64());
        figures.extend(got);
    }
    println!();
    println!(
        "{:<44} {:>12} {:<5} {:<18} ok",
        "figure", "value", "unit", "target"
    );
    let mut json = serde_json::Map::new();
    for f in &figures {
        println!(
            "{:<44} {:>12.1} {:<5} {:<18} {}",
            f.name,
            f.value,
            f.unit,
            f.target,
            if f.ok { "yes" } else { "NO" }
        );
        json.insert(
            f.name.to_string(),
            serde_json::json!({"value": f.value, "unit": f.unit, "target": f.target, "ok": f.ok}),
        );
    }
    println!("total {:.1} s", started.elapsed().as_secs_f64());
    let dir = std::path::Path::new("target/bench");
    let _ = std::fs::create_dir_all(dir);
    let _ = std::fs::write(
        dir.join("load.json"),
        serde_json::to_string_pretty(&serde_json::Value::Object(json)).unwrap(),
    );
}
