//! Merge-policy benchmarks (issue 9): collaborative text through the engine
//! against yrs alone, counter increments through the real server, and the
//! capture overhead of plain inserts.
//!
//! Run: `HEARTH_SKIP_WASM=1 cargo build --release --bin hearth --example bench_foundation
//! && HEARTH_SKIP_WASM=1 cargo run --release --example bench_merge`
//! (the counter figure starts `target/release/hearth serve`; the capture figure
//! runs `target/release/examples/bench_foundation` with `BENCH_ONLY=capture`,
//! the measurement that program makes). An argument runs only the sections
//! whose name contains it (`text`, `counter`, `capture`). `TEXT_PATCHES=N`
//! replays only the trace's first N patches. Prints each figure beside its
//! target and writes target/bench/merge.json.
//!
//! The text trace is `automerge-paper` from josephg/editing-traces (CC BY 4.0),
//! copied in `tests/fixtures/editing-traces/`.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hearth::native_client::{self, Goal};
use hearth_engine::merge::text::TextDoc;
use hearth_engine::protocol::{encode_client, encode_server, ClientMsg, ServerMsg};
use hearth_engine::server::Hello;
use hearth_engine::{Client, ClientConfig, Event, Outcome, Schema, ServerCore, TextEdit, Value};
use rusqlite::Connection;

const TRACES: &str = "tests/fixtures/editing-traces";

const TEXT_SCHEMA: &str = r#"
version = 1
[tables.docs]
create = "CREATE TABLE docs (id TEXT PRIMARY KEY, body TEXT NOT NULL DEFAULT '')"
columns = { body = "text" }
"#;

/// The counter's table; `{policy}` is `counter`, or `lww` for the control
/// run (the same writes merged last-writer-wins, as LWW ingest).
const COUNTER_SCHEMA: &str = r#"
version = 1
[tables.cells]
create = "CREATE TABLE cells (id TEXT PRIMARY KEY, n INTEGER NOT NULL DEFAULT 0)"
columns = { n = "{policy}" }
"#;

/// Patches typed between two deliveries to the server and the follower.
const TEXT_ROUND: usize = 1_000;

/// Patches replayed by default. The whole trace (259,778) takes far more
/// than two minutes through the engine (each keystroke rewrites the whole
/// text cell in SQLite on the writer, the server and the follower, so the
/// cost per keystroke grows with the text), so a run measures this prefix
/// and says so; `TEXT_PATCHES=all` replays everything.
const TEXT_PATCHES_DEFAULT: usize = 30_000;

const COUNTER_CLIENTS: usize = 10;
const COUNTER_PER_CLIENT: usize = 3_000;

struct Figure {
    name: String,
    value: f64,
    unit: &'static str,
    target: String,
    ok: bool,
}

impl Figure {
    fn info(name: &str, value: f64, unit: &'static str) -> Figure {
        Figure {
            name: name.into(),
            value,
            unit,
            target: "-".into(),
            ok: true,
        }
    }
}

// ---------- text ----------

/// CPU time this thread has run, from /proc (the machine is shared, so wall
/// time alone overstates what a run costs when others are busy).
fn thread_cpu() -> Duration {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .map(Duration::from_nanos)
        .unwrap_or_default()
}

/// A sequential trace: the patches `(pos, del, ins)` in order, positions in chars.
struct Trace {
    start: String,
    end: String,
    patches: Vec<(u64, u64, String)>,
}

fn load_trace(name: &str) -> Trace {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(TRACES)
        .join(format!("{name}.json.gz"));
    // gzip(1) rather than a decompression crate: the root package's examples
    // have no gzip dependency.
    let out = Command::new("gzip")
        .arg("-dc")
        .arg(&path)
        .output()
        .unwrap_or_else(|e| panic!("gzip -dc {}: {e}", path.display()));
    assert!(out.status.success(), "gzip -dc {} failed", path.display());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut patches = Vec::new();
    for t in v["txns"].as_array().unwrap() {
        for p in t["patches"].as_array().unwrap() {
            patches.push((
                p[0].as_u64().unwrap(),
                p[1].as_u64().unwrap(),
                p[2].as_str().unwrap().to_owned(),
            ));
        }
    }
    Trace {
        start: v["startContent"].as_str().unwrap_or("").to_owned(),
        end: v["endContent"].as_str().unwrap().to_owned(),
        patches,
    }
}

fn splice(start: &str, patches: &[(u64, u64, String)]) -> String {
    let mut chars: Vec<char> = start.chars().collect();
    for (pos, del, ins) in patches {
        let pos = *pos as usize;
        chars.splice(pos..pos + *del as usize, ins.chars());
    }
    chars.into_iter().collect()
}

/// Where the engine's time goes, and what crosses the wire.
#[derive(Default)]
struct Tally {
    edit: Duration,
    server: Duration,
    acks: Duration,
    follow: Duration,
    push_frames: usize,
    push_bytes: usize,
    mutations: usize,
    ack_bytes: usize,
    follow_bytes: usize,
}

/// A connected device: Hello, Welcome and catch-up, through `server`;
/// returns what the device sends then (its pending mutations).
fn connect(server: &ServerCore, c: &mut Client) -> Vec<ClientMsg> {
    let hello = c.on_connected();
    let hello = Hello::of(&hello[0]).unwrap();
    let cursor = hello.cursor;
    let mut send = c
        .handle(
            server
                .greet(&hello, hearth_engine::protocol::FRAME_BYTES_MAX)
                .unwrap(),
            0,
        )
        .unwrap()
        .send;
    let entries = ServerCore::read_log(server.connection(), cursor, 100_000).unwrap();
    send.extend(
        c.handle(
            ServerMsg::Changes {
                entries,
                cursor: 0,
                hlc: hearth_engine::Hlc(0),
                caught_up: true,
            },
            0,
        )
        .unwrap()
        .send,
    );
    send
}

/// The server takes `pushes` as one batch (as its driver batches what has
/// arrived) and sends the resulting log entries to the writer (its acks) and
/// to the follower, one `Changes` frame each.
fn deliver(
    server: &mut ServerCore,
    writer: &mut Client,
    follower: &mut Client,
    pushes: Vec<ClientMsg>,
    tally: &mut Tally,
) {
    if pushes.is_empty() {
        return;
    }
    let mut batch = Vec::new();
    for push in pushes {
        tally.push_frames += 1;
        tally.push_bytes += encode_client(&push).len();
        let ClientMsg::Push { mutations } = push else {
            panic!("not a push: {push:?}")
        };
        batch.extend(mutations.into_iter().map(|m| (writer.client_id(), m)));
    }
    tally.mutations += batch.len();
    let started = Instant::now();
    let outcomes = server.apply_batch(&batch).unwrap();
    tally.server += started.elapsed();
    let entries: Vec<_> = outcomes
        .into_iter()
        .map(|o| match o {
            Outcome::Applied(e) => e,
            other => panic!("refused: {:?}", other.refusal()),
        })
        .collect();
    let changes = ServerMsg::Changes {
        entries,
        cursor: 0,
        hlc: hearth_engine::Hlc(0),
        caught_up: true,
    };
    let bytes = encode_server(&changes).len();
    tally.ack_bytes += bytes;
    tally.follow_bytes += bytes;
    let started = Instant::now();
    let out = writer.handle(changes.clone(), 0).unwrap();
    assert!(
        !out.events
            .iter()
            .any(|e| matches!(e, Event::Rejected { .. })),
        "{:?}",
        out.events
    );
    tally.acks += started.elapsed();
    let started = Instant::now();
    follower.handle(changes, 0).unwrap();
    tally.follow += started.elapsed();
}

fn body(c: &Client) -> String {
    match c
        .query("SELECT body FROM docs WHERE id = 'paper'", &[])
        .unwrap()
        .rows
        .remove(0)
        .remove(0)
    {
        Value::Text(s) => s,
        other => panic!("body is {other:?}"),
    }
}

fn crdt_bytes(conn: &Connection) -> (i64, i64) {
    conn.query_row(
        "SELECT count(*), coalesce(sum(length(data)), 0) FROM _hearth_text WHERE tbl = 'docs' AND col = 'body'",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .unwrap()
}

fn text(dir: &std::path::Path) -> (Vec<Figure>, serde_json::Value) {
    let trace = load_trace("automerge-paper");
    let n = match std::env::var("TEXT_PATCHES").as_deref() {
        Ok("all") => trace.patches.len(),
        Ok(v) => v.parse().expect("TEXT_PATCHES: a number or `all`"),
        Err(_) => TEXT_PATCHES_DEFAULT,
    }
    .min(trace.patches.len());
    let patches = &trace.patches[..n];
    let expected = if n == trace.patches.len() {
        trace.end.clone()
    } else {
        splice(&trace.start, patches)
    };
    let edits: Vec<TextEdit> = patches
        .iter()
        .map(|(index, delete, insert)| TextEdit {
            index: *index,
            delete: *delete,
            insert: insert.clone(),
        })
        .collect();

    // yrs alone: one document, each patch through `edit`, which encodes the
    // patch's update.
    let (started, cpu) = (Instant::now(), thread_cpu());
    let mut doc = TextDoc::from_text(&trace.start, 1);
    let mut yrs_bytes = 0usize;
    for e in &edits {
        yrs_bytes += doc.edit(std::slice::from_ref(e)).unwrap().len();
    }
    let yrs_time = started.elapsed();
    let yrs_cpu = thread_cpu() - cpu;
    assert_eq!(doc.text(), expected);
    let yrs_state = doc.state().len();
    drop(doc);

    // The engine: device A types, one `edit_text` per patch, connected (each
    // call returns its push); every TEXT_ROUND patches the server applies what
    // arrived and device B follows. Server and devices store in files, WAL,
    // as `hearth serve` and the native client do.
    let schema = Schema::parse(TEXT_SCHEMA).unwrap();
    let conn = Connection::open(dir.join("text-server.db")).unwrap();
    conn.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;")
        .unwrap();
    let mut server = ServerCore::open(conn, schema).unwrap();
    let config = ClientConfig {
        outbox_max: 1_000_000,
        in_flight_max: 1_000_000,
        ..Default::default()
    };
    let mut a = native_client::open_device(&dir.join("text-a.db"), config.clone()).unwrap();
    let mut b = native_client::open_device(&dir.join("text-b.db"), config).unwrap();
    let mut tally = Tally::default();
    connect(&server, &mut a);
    let (_, out) = a
        .exec(
            "INSERT INTO docs (id, body) VALUES ('paper', ?1)",
            &[Value::Text(trace.start.clone())],
            1,
        )
        .unwrap();
    connect(&server, &mut b);
    deliver(&mut server, &mut a, &mut b, out.send, &mut tally);
    let mut tally = Tally::default();
    let key = Value::Text("paper".into());
    let (started, cpu) = (Instant::now(), thread_cpu());
    let mut pushes = Vec::new();
    // Wall time per keystroke of each round (typing + delivery).
    let mut rounds = Vec::new();
    for round in edits.chunks(TEXT_ROUND) {
        let t = Instant::now();
        for e in round {
            let (outcome, out) = a
                .edit_text("docs", &key, "body", std::slice::from_ref(e), 2)
                .unwrap();
            assert!(outcome.mutation.is_some());
            pushes.extend(out.send);
        }
        tally.edit += t.elapsed();
        deliver(
            &mut server,
            &mut a,
            &mut b,
            std::mem::take(&mut pushes),
            &mut tally,
        );
        rounds.push(t.elapsed().as_secs_f64() * 1e6 / round.len() as f64);
    }
    let engine_time = started.elapsed();
    let engine_cpu = thread_cpu() - cpu;
    assert_eq!(a.status().pending, 0);
    assert_eq!(body(&a), expected);
    assert_eq!(body(&b), expected);
    let (server_rows, server_crdt) = crdt_bytes(server.connection());
    let (a_rows, a_crdt) = crdt_bytes(a.connection());

    let keystrokes = n as f64;
    let ratio = engine_time.as_secs_f64() / yrs_time.as_secs_f64();
    let cpu_ratio = engine_cpu.as_secs_f64() / yrs_cpu.as_secs_f64();
    let up = tally.push_bytes as f64 / keystrokes;
    let per = |d: Duration| d.as_secs_f64() * 1e6 / keystrokes;
    let scope = if n == trace.patches.len() {
        format!("all {n} patches")
    } else {
        format!(
            "the first {n} of {} patches (a prefix: TEXT_PATCHES=all replays the whole trace, which takes far more than 2 minutes)",
            trace.patches.len()
        )
    };
    println!(
        "text: automerge-paper, {scope}, one edit_text per patch, follower synced every {TEXT_ROUND} patches:"
    );
    println!(
        "  yrs alone (TextDoc::edit + encode): {:.2} s = {:.2} us/keystroke; engine total {:.2} s = {:.1} us/keystroke",
        yrs_time.as_secs_f64(),
        per(yrs_time),
        engine_time.as_secs_f64(),
        per(engine_time)
    );
    println!(
        "  CPU time (this thread): yrs alone {:.2} s, engine {:.2} s, ratio {cpu_ratio:.0}x",
        yrs_cpu.as_secs_f64(),
        engine_cpu.as_secs_f64()
    );
    println!(
        "  engine wall us/keystroke by round of {TEXT_ROUND}: first {:.0}, middle {:.0}, last {:.0} (the text grows from {} to {} chars)",
        rounds[0],
        rounds[rounds.len() / 2],
        rounds[rounds.len() - 1],
        trace.start.chars().count(),
        expected.chars().count()
    );
    println!(
        "  engine per keystroke: edit_text {:.1} us, server apply {:.1} us, writer acks {:.1} us, follower apply {:.1} us",
        per(tally.edit),
        per(tally.server),
        per(tally.acks),
        per(tally.follow)
    );
    println!(
        "  wire up: {} push frames, {} mutations, {} bytes = {up:.1} bytes/keystroke, of which the yrs update {:.1} and the envelope (frame, seq, base, HLC, table/key/column names, op tags) {:.1}; down to each device {:.1} bytes/keystroke",
        tally.push_frames,
        tally.mutations,
        tally.push_bytes,
        yrs_bytes as f64 / keystrokes,
        up - yrs_bytes as f64 / keystrokes,
        tally.follow_bytes as f64 / keystrokes
    );
    println!(
        "  CRDT state: text {} bytes; server stores {server_crdt} bytes in {server_rows} rows ({:.2}x the text), device A {a_crdt} bytes in {a_rows} rows; one TextDoc state {yrs_state} bytes ({:.2}x)",
        expected.len(),
        server_crdt as f64 / expected.len().max(1) as f64,
        yrs_state as f64 / expected.len().max(1) as f64
    );
    let figures = vec![
        Figure {
            name: "text.engine_vs_yrs_alone".into(),
            value: ratio,
            unit: "x",
            target: "<= 2".into(),
            ok: ratio <= 2.0,
        },
        Figure {
            name: "text.push_bytes_per_keystroke".into(),
            value: up,
            unit: "B",
            target: "<= 40".into(),
            ok: up <= 40.0,
        },
        Figure::info(
            "text.server_crdt_bytes_per_text_byte",
            server_crdt as f64 / expected.len().max(1) as f64,
            "x",
        ),
    ];
    let json = serde_json::json!({
        "trace": "automerge-paper", "patches": n, "patches_in_trace": trace.patches.len(), "round": TEXT_ROUND,
        "yrs_alone_s": yrs_time.as_secs_f64(), "engine_s": engine_time.as_secs_f64(), "ratio": ratio,
        "yrs_alone_cpu_s": yrs_cpu.as_secs_f64(), "engine_cpu_s": engine_cpu.as_secs_f64(), "cpu_ratio": cpu_ratio,
        "engine_wall_us_per_keystroke_by_round": rounds, "target_ratio_max": 2.0,
        "engine_us_per_keystroke": {"edit_text": per(tally.edit), "server_apply": per(tally.server), "writer_acks": per(tally.acks), "follower_apply": per(tally.follow)},
        "push_frames": tally.push_frames, "push_bytes": tally.push_bytes, "push_bytes_per_keystroke": up, "target_bytes_max": 40,
        "yrs_update_bytes_per_keystroke": yrs_bytes as f64 / keystrokes,
        "down_bytes_per_keystroke": tally.follow_bytes as f64 / keystrokes,
        "text_bytes": expected.len(), "server_crdt_bytes": server_crdt, "server_crdt_rows": server_rows,
        "device_crdt_bytes": a_crdt, "textdoc_state_bytes": yrs_state,
    });
    (figures, json)
}

// ---------- counter ----------

/// A `hearth serve` child process on 127.0.0.1 (as bench_load starts one).
struct Server {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Server {
    fn start(schema: &str) -> Server {
        let exe = std::env::current_exe().unwrap();
        let bin = std::env::var_os("HEARTH_BIN")
            .map(std::path::PathBuf::from)
            .or_else(|| {
                exe.parent()
                    .and_then(|p| p.parent())
                    .map(|p| p.join("hearth"))
            })
            .filter(|p| p.exists())
            .expect(
                "target/release/hearth is missing: run `cargo build --release --bin hearth` first",
            );
        let dir = tempfile::tempdir().unwrap();
        let schema_path = dir.path().join("schema.toml");
        std::fs::write(&schema_path, schema).unwrap();
        let mut child = Command::new(bin)
            .args(["serve", "--listen", "127.0.0.1:0", "--schema"])
            .arg(&schema_path)
            .arg("--data")
            .arg(dir.path().join("data"))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        let stdout = child.stdout.take().unwrap();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).unwrap();
        // "hearth: serving http://ADDR (sync at ws://ADDR/sync)"
        let addr = line
            .split("http://")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .unwrap_or_else(|| panic!("unexpected first line: {line}"))
            .to_string();
        Server {
            child,
            addr,
            _dir: dir,
        }
    }

    async fn metric(&self, name: &str) -> u64 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let Ok(mut s) = tokio::net::TcpStream::connect(&self.addr).await else {
            return 0;
        };
        let _ = s
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
            .await;
        let mut out = String::new();
        let _ = s.read_to_string(&mut out).await;
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn counter_value(c: &Client) -> i64 {
    match c
        .query("SELECT n FROM cells WHERE id = 'c'", &[])
        .unwrap()
        .rows
        .remove(0)
        .remove(0)
    {
        Value::Integer(n) => n,
        other => panic!("n is {other:?}"),
    }
}

/// Ten devices each make COUNTER_PER_CLIENT increments of one cell offline,
/// then push at once: the server's rate and every device's final value.
async fn increments(dir: &std::path::Path, policy: &str) -> (f64, Duration, Vec<i64>) {
    let server = Server::start(&COUNTER_SCHEMA.replace("{policy}", policy));
    let dir = dir.join(policy);
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("ws://{}/sync", server.addr);
    let timeout = Duration::from_secs(600);
    let config = ClientConfig {
        outbox_max: 1_000_000,
        in_flight_max: 1_000_000,
        ..Default::default()
    };
    let mut devices = Vec::new();
    for d in 0..COUNTER_CLIENTS {
        let mut c =
            native_client::open_device(&dir.join(format!("counter-{d}.db")), config.clone())
                .unwrap();
        if d == 0 {
            native_client::sync_once(&mut c, &url, Goal::Synced, timeout)
                .await
                .unwrap();
            c.exec(
                "INSERT INTO cells (id, n) VALUES ('c', 0)",
                &[],
                native_client::now_ms(),
            )
            .unwrap();
        }
        native_client::sync_once(&mut c, &url, Goal::Synced, timeout)
            .await
            .unwrap();
        assert_eq!(counter_value(&c), 0);
        devices.push(c);
    }
    // Each device increments offline, one mutation per increment, then all
    // push at once.
    for c in devices.iter_mut() {
        for _ in 0..COUNTER_PER_CLIENT {
            c.exec(
                "UPDATE cells SET n = n + 1 WHERE id = 'c'",
                &[],
                native_client::now_ms(),
            )
            .unwrap();
        }
    }
    let before = server.metric("hearth_mutations_applied_total").await;
    let total = COUNTER_CLIENTS * COUNTER_PER_CLIENT;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for mut c in devices {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            native_client::sync_once(&mut c, &url, Goal::Synced, timeout)
                .await
                .unwrap();
            c
        }));
    }
    // Server-side rate: from the start of the pushes to the last increment
    // applied, read from the server's metrics.
    let server_done = loop {
        let applied = server.metric("hearth_mutations_applied_total").await - before;
        if applied as usize >= total {
            break Instant::now();
        }
        assert!(
            start.elapsed() < timeout,
            "only {applied} of {total} applied"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let mut devices = Vec::new();
    for t in tasks {
        let c = t.await.unwrap();
        assert_eq!(c.status().pending, 0);
        devices.push(c);
    }
    let all_synced = start.elapsed();
    // Everyone catches up with everyone else's increments.
    let mut finals = Vec::new();
    for c in devices.iter_mut() {
        native_client::sync_once(c, &url, Goal::Synced, timeout)
            .await
            .unwrap();
        finals.push(counter_value(c));
    }
    let server_secs = server_done.duration_since(start).as_secs_f64();
    (total as f64 / server_secs, all_synced, finals)
}

/// The store alone: the same increments applied by `ServerCore` in batches
/// of 2,000 spread over ten client ids, no network, no devices competing for
/// the cores (as bench_foundation's `store_only`).
fn increments_store_only(dir: &std::path::Path, policy: &str) -> f64 {
    let schema = Schema::parse(&COUNTER_SCHEMA.replace("{policy}", policy)).unwrap();
    let conn = Connection::open(dir.join(format!("store-only-{policy}.db"))).unwrap();
    conn.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;")
        .unwrap();
    let mut core = ServerCore::open(conn, schema.clone()).unwrap();
    let mut device = Client::open(
        Connection::open_in_memory().unwrap(),
        1,
        ClientConfig {
            outbox_max: 1_000_000,
            in_flight_max: 1_000_000,
            ..Default::default()
        },
    )
    .unwrap();
    connect(&core, &mut device);
    let (_, out) = device
        .exec("INSERT INTO cells (id, n) VALUES ('c', 0)", &[], 1)
        .unwrap();
    let first: Vec<_> = out
        .send
        .into_iter()
        .flat_map(|m| match m {
            ClientMsg::Push { mutations } => mutations,
            other => panic!("{other:?}"),
        })
        .map(|m| (device.client_id(), m))
        .collect();
    let entries = core
        .apply_batch(&first)
        .unwrap()
        .into_iter()
        .map(|o| match o {
            Outcome::Applied(e) => e,
            other => panic!("{other:?}"),
        })
        .collect();
    device
        .handle(
            ServerMsg::Changes {
                entries,
                cursor: 0,
                hlc: hearth_engine::Hlc(0),
                caught_up: true,
            },
            2,
        )
        .unwrap();
    // Offline, as the devices of the real run: a connected device counts
    // its in-flight mutations on every write.
    device.on_disconnected();
    let total = COUNTER_CLIENTS * COUNTER_PER_CLIENT;
    for _ in 0..total {
        device
            .exec("UPDATE cells SET n = n + 1 WHERE id = 'c'", &[], 3)
            .unwrap();
    }
    let mut mutations = Vec::new();
    for msg in connect(&core, &mut device) {
        if let ClientMsg::Push { mutations: m } = msg {
            mutations.extend(m);
        }
    }
    assert_eq!(mutations.len(), total);
    let batch: Vec<(u64, hearth_engine::Mutation)> = mutations
        .into_iter()
        .enumerate()
        .map(|(i, mut m)| {
            m.seq = (i / COUNTER_CLIENTS) as u64 + 1;
            ((i % COUNTER_CLIENTS) as u64 + 100, m)
        })
        .collect();
    let start = Instant::now();
    for chunk in batch.chunks(2_000) {
        for o in core.apply_batch(chunk).unwrap() {
            assert!(matches!(o, Outcome::Applied(_)), "{o:?}");
        }
    }
    batch.len() as f64 / start.elapsed().as_secs_f64()
}

async fn counter(dir: &std::path::Path) -> (Vec<Figure>, serde_json::Value) {
    let total = COUNTER_CLIENTS * COUNTER_PER_CLIENT;
    let store_counter = increments_store_only(dir, "counter");
    let store_lww = increments_store_only(dir, "lww");
    println!(
        "counter (store only, no network): {total} increments in batches of 2000: counter {store_counter:.0}/s, the same writes to an lww column {store_lww:.0}/s"
    );
    let (rate, all_synced, finals) = increments(dir, "counter").await;
    let exact = finals.iter().all(|&v| v == total as i64);
    println!(
        "counter: {total} increments of one cell from {COUNTER_CLIENTS} concurrent clients through `hearth serve`: applied {rate:.0}/s (target >= 20000/s); \
         all pushes acked in {:.2} s; final value on every device {finals:?} (want {total})",
        all_synced.as_secs_f64()
    );
    // Control: the very same writes to an LWW column, on this machine now.
    let (lww_rate, _, lww_finals) = increments(dir, "lww").await;
    println!(
        "counter control: the same {total} writes to the cell declared lww: applied {lww_rate:.0}/s (counter/lww {:.2}); final values {lww_finals:?} (last writer wins)",
        rate / lww_rate
    );
    let figures = vec![
        Figure {
            name: "counter.applied_per_s".into(),
            value: rate,
            unit: "/s",
            target: ">= 20000".into(),
            ok: rate >= 20_000.0,
        },
        Figure::info("counter.lww_control_applied_per_s", lww_rate, "/s"),
        Figure::info("counter.store_only_per_s", store_counter, "/s"),
        Figure::info("counter.lww_store_only_per_s", store_lww, "/s"),
        Figure {
            name: "counter.final_value_exact".into(),
            value: f64::from(u8::from(exact)),
            unit: "",
            target: "= 1".into(),
            ok: exact,
        },
    ];
    let json = serde_json::json!({"increments": total, "clients": COUNTER_CLIENTS, "server_applied_per_s": rate,
        "target_per_s_min": 20000, "lww_control_applied_per_s": lww_rate,
        "store_only_per_s": store_counter, "lww_store_only_per_s": store_lww, "all_acked_s": all_synced.as_secs_f64(), "final_values": finals});
    (figures, json)
}

// ---------- capture ----------

/// Runs bench_foundation's capture measurement (`BENCH_ONLY=capture`) and
/// passes its lines through.
fn capture() -> (Vec<Figure>, serde_json::Value) {
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().join("bench_foundation");
    if !bin.exists() {
        println!(
            "capture: {} is missing: run `cargo build --release --example bench_foundation` first",
            bin.display()
        );
        return (Vec::new(), serde_json::Value::Null);
    }
    let out = Command::new(&bin)
        .env("BENCH_ONLY", "capture")
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success(), "bench_foundation failed");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut figures = Vec::new();
    for line in text.lines() {
        println!("{line} [from bench_foundation]");
        // "... ratio 1.23x (target <= 2x)"
        let label = line
            .split(['(', ')'])
            .nth(1)
            .unwrap_or("capture")
            .to_string();
        if let Some(ratio) = line
            .split("ratio ")
            .nth(1)
            .and_then(|r| r.split('x').next())
            .and_then(|r| r.parse::<f64>().ok())
        {
            figures.push(Figure {
                name: format!("capture.{label}.synced_vs_plain"),
                value: ratio,
                unit: "x",
                target: "<= 2".into(),
                ok: ratio <= 2.0,
            });
        }
    }
    (figures, serde_json::Value::String(text))
}

fn main() {
    let only = std::env::args().nth(1).unwrap_or_default();
    let wanted = |name: &str| name.contains(only.as_str());
    let dir = tempfile::tempdir().unwrap();
    let mut figures = Vec::new();
    let mut report = serde_json::Map::new();
    if wanted("text") {
        let (f, j) = text(dir.path());
        figures.extend(f);
        report.insert("text".into(), j);
    }
    if wanted("counter") {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        let (f, j) = runtime.block_on(counter(dir.path()));
        figures.extend(f);
        report.insert("counter".into(), j);
    }
    if wanted("capture") {
        let (f, j) = capture();
        figures.extend(f);
        report.insert("capture".into(), j);
    }
    println!("\n{:<48} {:>14} {:>10}  ok", "figure", "value", "target");
    for f in &figures {
        println!(
            "{:<48} {:>12.2}{:<2} {:>10}  {}",
            f.name,
            f.value,
            f.unit,
            f.target,
            if f.ok { "yes" } else { "NO" }
        );
    }
    std::fs::create_dir_all("target/bench").unwrap();
    std::fs::write(
        "target/bench/merge.json",
        serde_json::to_string_pretty(&serde_json::Value::Object(report)).unwrap(),
    )
    .unwrap();
    println!("wrote target/bench/merge.json");
}
