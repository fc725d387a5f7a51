//! The deterministic simulator behind `tests/simulation.rs`.
//!
//! One seeded random generator drives everything: 3 to 8 devices (each a real
//! [`Client`] on its own SQLite file), the server's logic ([`ServerCore`] on
//! its own store file) routed the way the network driver routes it, and a
//! simulated network between them that delays, reorders across connections,
//! drops, half-closes and partitions. Devices and the server crash and restart
//! from their files; device clocks are skewed and jump backwards. At
//! quiescent points (every partition healed, every message delivered, every
//! device caught up) the properties in [`PROPERTIES`] are checked against the
//! server's store and a ledger of everything that happened.
//!
//! Nothing here reads the wall clock or the OS's randomness, so a seed and a
//! step count replay the exact same run.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use hearth_engine::protocol::{
    decode_client, decode_server, encode_client, encode_server, FRAME_BYTES_MAX,
};
use hearth_engine::server::Hello;
use hearth_engine::{
    Client, ClientConfig, ClientMsg, ColumnOp, Event, Hlc, LogEntry, Mutation, Outcome, RowChange,
    RowOp, Schema, ServerCore, ServerMsg, Value,
};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rusqlite::Connection;

/// The app schema the simulated devices use. `users.email` is UNIQUE so that
/// two offline devices can pick the same address and the server must refuse
/// one of them; the CHECKs let the hostile device send rows the server must
/// refuse (devices enforce them locally, so they never send such rows).
pub const SCHEMA: &str = r#"
version = 1

[tables.users]
create = "CREATE TABLE users (id TEXT PRIMARY KEY, email TEXT UNIQUE, name TEXT NOT NULL, age INTEGER CHECK (age >= 0))"

[tables.notes]
create = "CREATE TABLE notes (id INTEGER PRIMARY KEY, owner TEXT, title TEXT, body TEXT, pinned INTEGER NOT NULL DEFAULT 0 CHECK (pinned IN (0, 1)))"

[tables.tags]
create = "CREATE TABLE tags (id TEXT PRIMARY KEY, label TEXT, weight REAL, data BLOB)"
"#;

/// Synced tables and their primary key column, in a fixed order.
const TABLES: [(&str, &str); 3] = [("notes", "id"), ("tags", "id"), ("users", "id")];

/// The hostile device: it speaks the protocol directly, with no database and
/// no local checks, and sends some mutations the server must refuse.
const ROGUE_ID: u64 = 0x0BAD_C0DE;
const HOUR_MS: i64 = 3_600_000;
const START_MS: u64 = 1_764_000_000_000;
/// Deliveries allowed to reach a quiescent point before calling it a hang.
const QUIESCE_DELIVERIES_MAX: u64 = 200_000;
const TRACE_TAIL: usize = 60;

thread_local! {
    /// The last trace lines, kept outside the world so that a panic inside
    /// the engine still leaves them for the failure report.
    static TRACE: RefCell<VecDeque<String>> = const { RefCell::new(VecDeque::new()) };
    static STEP: Cell<u64> = const { Cell::new(0) };
}

/// The step being run and the last trace lines of this thread's simulation.
pub fn last_trace() -> (u64, Vec<String>) {
    (
        STEP.with(Cell::get),
        TRACE.with(|t| t.borrow().iter().cloned().collect()),
    )
}

#[derive(Clone, Debug)]
pub struct Options {
    pub seed: u64,
    pub steps: u64,
    /// Print every trace line as it happens (for replaying one seed).
    pub verbose: bool,
}

#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub quiescent_points: u64,
    pub mutations: u64,
    pub applied: u64,
    pub refused: u64,
    pub duplicates: u64,
    pub device_crashes: u64,
    pub server_crashes: u64,
    pub drops: u64,
    pub partitions: u64,
    pub clock_jumps: u64,
}

type Key = (u64, u64);

/// One simulated connection. Frames in each direction arrive in order (it is
/// a WebSocket over TCP); different connections have their own latencies, so
/// frames reorder between connections.
struct Link {
    /// The device at the client end; None for the hostile device.
    device: Option<usize>,
    /// The device still listens. A closed client end drops frames to it.
    client_open: bool,
    /// The server still reads. After the client end closes, the frames it
    /// already sent may still arrive (a half-closed TCP stream), and then
    /// the server closes too.
    server_open: bool,
    /// Set when the server has processed Hello: the client id it named.
    hello: Option<u64>,
    latency_max_ms: u64,
    up: VecDeque<(u64, Vec<u8>)>,
    down: VecDeque<(u64, Vec<u8>)>,
}

struct Device {
    name: String,
    client_id: u64,
    path: PathBuf,
    client: Client,
    link: Option<u64>,
    /// This device's wall clock minus the true time.
    skew_ms: i64,
    /// Partitioned away until this true time.
    offline_until_ms: u64,
}

/// Everything that happened, as seen from outside the engine.
#[derive(Default)]
struct Ledger {
    /// Each mutation as the server first received it (re-sends must match).
    received: HashMap<Key, Mutation>,
    /// Mutations devices made (exec returned a sequence number), with stamps.
    made: BTreeMap<Key, Hlc>,
    /// `Event::Applied` and `Event::Rejected` as devices reported them.
    applied_events: HashMap<Key, u64>,
    rejected_events: HashMap<Key, String>,
    /// What the server refused.
    refused: HashMap<Key, String>,
    /// For each log position (server_seq - 1), the largest stamp up to it.
    log_hlc_max: Vec<Hlc>,
}

pub struct World {
    rng: StdRng,
    verbose: bool,
    now_ms: u64,
    /// Holds the database files; removed when the world is dropped.
    _dir: tempfile::TempDir,
    schema: Schema,
    server_path: PathBuf,
    server: ServerCore,
    devices: Vec<Device>,
    links: BTreeMap<u64, Link>,
    next_link: u64,
    rogue_link: Option<u64>,
    rogue_next_seq: u64,
    rogue_sent: Vec<Mutation>,
    ledger: Ledger,
    pub stats: Stats,
}

/// A named property checked at every quiescent point. Adding one is a
/// function and a line in [`PROPERTIES`].
pub struct Property {
    pub name: &'static str,
    pub check: fn(&World) -> Result<(), String>,
}

pub const PROPERTIES: &[Property] = &[
    Property {
        name: "server store passes integrity_check",
        check: server_integrity,
    },
    Property {
        name: "caught-up devices hold the server's rows",
        check: convergence,
    },
    Property {
        name: "the log is gapless and applies each mutation at most once",
        check: log_at_most_once,
    },
    Property {
        name: "acknowledged mutations are in the log",
        check: acked_in_log,
    },
    Property {
        name: "every mutation made has exactly one fate, told to its device",
        check: one_fate_each,
    },
    Property {
        name: "refused mutations leave no trace",
        check: refused_leave_no_trace,
    },
    Property {
        name: "LWW outcomes follow the clocks",
        check: lww_follows_clocks,
    },
];

fn sql_err(what: &str) -> impl Fn(rusqlite::Error) -> String + '_ {
    move |e| format!("{what}: {e}")
}

fn open_sqlite(path: &Path) -> Result<Connection, String> {
    let conn = Connection::open(path).map_err(sql_err("open"))?;
    // Crashes here are process crashes, not power cuts: the data handed to
    // the OS survives, so fsync only slows the simulation down.
    conn.execute_batch("PRAGMA synchronous = OFF")
        .map_err(sql_err("pragma"))?;
    Ok(conn)
}

fn integrity(conn: &Connection, who: &str) -> Result<(), String> {
    let verdict: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .map_err(sql_err("integrity_check"))?;
    if verdict == "ok" {
        Ok(())
    } else {
        Err(format!("{who}: PRAGMA integrity_check says {verdict}"))
    }
}

fn table_rows(conn: &Connection, table: &str, pk: &str) -> Result<Vec<Vec<Value>>, String> {
    let mut stmt = conn
        .prepare(&format!("SELECT * FROM \"{table}\" ORDER BY \"{pk}\""))
        .map_err(sql_err("select"))?;
    let width = stmt.column_count();
    let rows = stmt
        .query_map([], |r| {
            (0..width)
                .map(|i| r.get::<_, Value>(i))
                .collect::<rusqlite::Result<Vec<_>>>()
        })
        .map_err(sql_err("select"))?;
    rows.collect::<Result<_, _>>().map_err(sql_err("select"))
}

fn all_rows(conn: &Connection) -> Result<Vec<Vec<Vec<Value>>>, String> {
    TABLES
        .iter()
        .map(|(t, pk)| table_rows(conn, t, pk))
        .collect()
}

fn read_whole_log(conn: &Connection) -> Result<Vec<LogEntry>, String> {
    ServerCore::read_log(conn, 0, 1 << 40).map_err(|e| format!("read_log: {e}"))
}

fn quote(v: &Value) -> String {
    match v {
        Value::Null => "NULL".into(),
        Value::Integer(i) => i.to_string(),
        Value::Real(r) => format!("{r:?}"),
        Value::Text(s) => format!("'{}'", s.replace('\'', "''")),
        Value::Blob(b) => format!(
            "x'{}'",
            b.iter().map(|x| format!("{x:02x}")).collect::<String>()
        ),
    }
}

fn short(msg: &ServerMsg) -> String {
    match msg {
        ServerMsg::Welcome { server_seq, .. } => format!("Welcome(head {server_seq})"),
        ServerMsg::Changes { entries, caught_up } => {
            let seqs: Vec<String> = entries
                .iter()
                .map(|e| format!("{}={}#{}", e.server_seq, e.client_id, e.client_seq))
                .collect();
            format!(
                "Changes[{}]{}",
                seqs.join(" "),
                if *caught_up { " caught_up" } else { "" }
            )
        }
        ServerMsg::Rejected {
            client_seq, code, ..
        } => format!("Rejected(#{client_seq} {code})"),
        ServerMsg::Error { code, .. } => format!("Error({code})"),
    }
}

fn short_client(msg: &ClientMsg) -> String {
    match msg {
        ClientMsg::Hello {
            client_id, cursor, ..
        } => format!("Hello({client_id} cursor {cursor})"),
        ClientMsg::Push { mutations } => {
            let seqs: Vec<String> = mutations.iter().map(|m| format!("#{}", m.seq)).collect();
            format!("Push[{}]", seqs.join(" "))
        }
    }
}

impl World {
    pub fn new(seed: u64, verbose: bool) -> Result<World, String> {
        TRACE.with(|t| t.borrow_mut().clear());
        STEP.with(|s| s.set(0));
        let mut rng = StdRng::seed_from_u64(seed);
        let dir = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
        let schema = Schema::parse(SCHEMA).map_err(|e| format!("schema: {e}"))?;
        let server_path = dir.path().join("server.db");
        let server = ServerCore::open(open_sqlite(&server_path)?, schema.clone())
            .map_err(|e| format!("server: {e}"))?;
        let count = rng.gen_range(3..=8);
        // Some devices share an exact skew so that equal clock readings, and
        // with them the client-id tie break, really happen.
        let skews: Vec<i64> = vec![
            0,
            0,
            rng.gen_range(-HOUR_MS..=HOUR_MS),
            rng.gen_range(-HOUR_MS..=HOUR_MS),
        ];
        let mut devices = Vec::with_capacity(count);
        for i in 0..count {
            let path = dir.path().join(format!("device{i}.db"));
            // Small ids collide in the tie break order with the hostile one.
            let client_id = 1 + i as u64 * 7 + rng.gen_range(0..7);
            let client = Client::open(open_sqlite(&path)?, client_id, ClientConfig::default())
                .map_err(|e| format!("device open: {e}"))?;
            let skew_ms = if rng.gen_bool(0.5) {
                *skews.choose(&mut rng).unwrap()
            } else {
                rng.gen_range(-HOUR_MS..=HOUR_MS)
            };
            devices.push(Device {
                name: format!("d{i}"),
                client_id,
                path,
                client,
                link: None,
                skew_ms,
                offline_until_ms: 0,
            });
        }
        let world = World {
            rng,
            verbose,
            now_ms: START_MS,
            _dir: dir,
            schema,
            server_path,
            server,
            devices,
            links: BTreeMap::new(),
            next_link: 1,
            rogue_link: None,
            rogue_next_seq: 1,
            rogue_sent: Vec::new(),
            ledger: Ledger::default(),
            stats: Stats::default(),
        };
        let setup: Vec<String> = world
            .devices
            .iter()
            .map(|d| format!("{}=client {} skew {}ms", d.name, d.client_id, d.skew_ms))
            .collect();
        world.trace(format!(
            "seed {seed}: {count} devices: {}",
            setup.join(", ")
        ));
        Ok(world)
    }

    fn trace(&self, line: String) {
        let line = format!("[{:>7}ms] {line}", self.now_ms - START_MS);
        if self.verbose {
            println!("{line}");
        }
        TRACE.with(|t| {
            let mut t = t.borrow_mut();
            if t.len() == TRACE_TAIL {
                t.pop_front();
            }
            t.push_back(line);
        });
    }

    fn wall_ms(&self, d: usize) -> u64 {
        (self.now_ms as i64 + self.devices[d].skew_ms) as u64
    }

    /// Runs `steps` random steps with quiescent checks at random points,
    /// then a final quiescent check.
    pub fn run(&mut self, steps: u64) -> Result<(), String> {
        let mut next_quiet = self.rng.gen_range(60..250);
        for step in 1..=steps {
            STEP.with(|s| s.set(step));
            self.step()?;
            if step == next_quiet {
                self.quiesce_and_check()?;
                next_quiet = step + self.rng.gen_range(60..250);
            }
        }
        self.quiesce_and_check()
    }

    fn step(&mut self) -> Result<(), String> {
        self.now_ms += [0, 0, 0, 1, 2, 5, 10, 20, 50][self.rng.gen_range(0..9)];
        let roll = self.rng.gen_range(0..1000);
        let d = self.rng.gen_range(0..self.devices.len());
        match roll {
            0..=379 => self.device_exec(d),
            380..=739 => self.deliver_one(),
            740..=809 => {
                if self.devices[d].link.is_none() && self.devices[d].offline_until_ms <= self.now_ms
                {
                    self.connect(d);
                }
                Ok(())
            }
            810..=844 => {
                let ids: Vec<u64> = self.links.keys().copied().collect();
                if let Some(&id) = ids.choose(&mut self.rng) {
                    let half = self.rng.gen_bool(0.5);
                    self.drop_link(id, half, "network drop");
                }
                Ok(())
            }
            845..=854 => {
                self.partition(d);
                Ok(())
            }
            855..=874 => self.crash_device(d),
            875..=879 => self.crash_server(),
            880..=894 => {
                self.clock_jump(d);
                Ok(())
            }
            895..=929 => self.rogue_push(),
            _ => self.device_read(d),
        }
    }

    // ---- the network ----------------------------------------------------

    fn arrival(&mut self, queue_last: Option<u64>, latency_max_ms: u64) -> u64 {
        let at = self.now_ms + self.rng.gen_range(0..=latency_max_ms);
        at.max(queue_last.unwrap_or(0))
    }

    fn send_up(&mut self, id: u64, msgs: Vec<ClientMsg>) {
        for msg in msgs {
            self.trace(format!("  link {id} up   {}", short_client(&msg)));
            let Some(link) = self.links.get(&id) else {
                return;
            };
            if !link.client_open || !link.server_open {
                return;
            }
            let (last, max) = (link.up.back().map(|m| m.0), link.latency_max_ms);
            let at = self.arrival(last, max);
            self.links
                .get_mut(&id)
                .unwrap()
                .up
                .push_back((at, encode_client(&msg)));
        }
    }

    fn send_down(&mut self, id: u64, msg: &ServerMsg) {
        let Some(link) = self.links.get(&id) else {
            return;
        };
        if !link.client_open || !link.server_open {
            return;
        }
        let (last, max) = (link.down.back().map(|m| m.0), link.latency_max_ms);
        let at = self.arrival(last, max);
        self.links
            .get_mut(&id)
            .unwrap()
            .down
            .push_back((at, encode_server(msg)));
    }

    fn connect(&mut self, d: usize) {
        let id = self.next_link;
        self.next_link += 1;
        let latency_max_ms = [1, 5, 30, 200, 1000][self.rng.gen_range(0..5)];
        self.links.insert(
            id,
            Link {
                device: Some(d),
                client_open: true,
                server_open: true,
                hello: None,
                latency_max_ms,
                up: VecDeque::new(),
                down: VecDeque::new(),
            },
        );
        self.devices[d].link = Some(id);
        self.trace(format!(
            "{} connects on link {id} (latency up to {latency_max_ms}ms)",
            self.devices[d].name
        ));
        let hello = self.devices[d].client.on_connected();
        self.send_up(id, hello);
    }

    /// Closes a link's client end. Frames to the device are lost; frames
    /// already sent to the server are lost too unless `half`, in which case
    /// the server still reads them before it notices the close.
    fn drop_link(&mut self, id: u64, half: bool, why: &str) {
        let Some(link) = self.links.get_mut(&id) else {
            return;
        };
        link.client_open = false;
        link.down.clear();
        if !half {
            link.up.clear();
            link.server_open = false;
        }
        let device = link.device;
        self.retire_link(id);
        self.stats.drops += 1;
        match device {
            Some(d) => {
                if self.devices[d].link == Some(id) {
                    self.devices[d].link = None;
                    self.devices[d].client.on_disconnected();
                }
                self.trace(format!(
                    "{} link {id} dropped ({why}{})",
                    self.devices[d].name,
                    if half { ", half-closed" } else { "" }
                ));
            }
            None => {
                self.rogue_link = None;
                self.trace(format!("rogue link {id} dropped ({why})"));
            }
        }
    }

    fn retire_link(&mut self, id: u64) {
        if let Some(link) = self.links.get(&id) {
            if !link.client_open && link.up.is_empty() {
                self.links.remove(&id);
            }
        }
    }

    fn partition(&mut self, d: usize) {
        let until = self.now_ms + self.rng.gen_range(5_000..120_000);
        self.devices[d].offline_until_ms = until;
        self.stats.partitions += 1;
        self.trace(format!(
            "{} partitioned away for {}ms",
            self.devices[d].name,
            until - self.now_ms
        ));
        if let Some(id) = self.devices[d].link {
            self.drop_link(id, false, "partition");
        }
    }

    fn due(&self) -> Vec<(u64, bool)> {
        let mut out = Vec::new();
        for (id, link) in &self.links {
            if link.up.front().is_some_and(|m| m.0 <= self.now_ms) {
                out.push((*id, true));
            }
            if link.down.front().is_some_and(|m| m.0 <= self.now_ms) {
                out.push((*id, false));
            }
        }
        out
    }

    fn next_arrival(&self) -> Option<u64> {
        self.links
            .values()
            .flat_map(|l| l.up.front().into_iter().chain(l.down.front()))
            .map(|m| m.0)
            .min()
    }

    fn deliver_one(&mut self) -> Result<(), String> {
        let due = self.due();
        let Some(&(id, up)) = due.choose(&mut self.rng) else {
            return Ok(());
        };
        if up {
            self.server_receive(id, &due)
        } else {
            self.device_receive(id, true)
        }
    }

    // ---- the server, routed as the network driver routes ----------------

    fn server_receive(&mut self, id: u64, due: &[(u64, bool)]) -> Result<(), String> {
        let link = self.links.get_mut(&id).unwrap();
        let frame = link.up.pop_front().unwrap().1;
        let hello = link.hello;
        let msg = decode_client(&frame, FRAME_BYTES_MAX)
            .map_err(|e| format!("server got a bad frame: {e}"))?;
        self.retire_link(id);
        match msg {
            ClientMsg::Hello {
                client_id, cursor, ..
            } => {
                self.trace(format!(
                    "server: link {id} Hello from {client_id}, cursor {cursor}"
                ));
                let hello = Hello::of(&msg).expect("a Hello");
                let welcome = self
                    .server
                    .greet(&hello, FRAME_BYTES_MAX)
                    .map_err(|e| format!("greet: {e}"))?;
                let refused = matches!(welcome, ServerMsg::Error { .. });
                self.send_down(id, &welcome);
                if refused {
                    return Ok(());
                }
                // Catch-up in chunks of random size, the last marked caught_up;
                // from then on the link gets every new entry as it is made.
                let chunk = self.rng.gen_range(1..=40);
                let mut after = cursor;
                loop {
                    let entries = ServerCore::read_log(self.server.connection(), after, chunk)
                        .map_err(|e| format!("read_log: {e}"))?;
                    let last = entries.last().map(|e| e.server_seq);
                    let caught_up = last.is_none_or(|s| s >= self.server.head());
                    self.send_down(id, &ServerMsg::Changes { entries, caught_up });
                    match last {
                        Some(s) if !caught_up => after = s,
                        _ => break,
                    }
                }
                if let Some(link) = self.links.get_mut(&id) {
                    link.hello = Some(client_id);
                }
            }
            ClientMsg::Push { mutations } => {
                let origin = hello.ok_or("Push before Hello")?;
                let mut streams: Vec<(u64, u64, VecDeque<Mutation>)> =
                    vec![(id, origin, mutations.into())];
                // Sometimes the driver applies pushes from several connections
                // in one batch, interleaved but in order per connection.
                if self.rng.gen_bool(0.3) {
                    for &(other, other_up) in due {
                        if other == id || !other_up || self.rng.gen_bool(0.5) {
                            continue;
                        }
                        let Some(link) = self.links.get(&other) else {
                            continue;
                        };
                        let Some(client_id) = link.hello else {
                            continue;
                        };
                        let Some((_, frame)) = link.up.front() else {
                            continue;
                        };
                        let Ok(ClientMsg::Push { mutations }) =
                            decode_client(frame, FRAME_BYTES_MAX)
                        else {
                            continue;
                        };
                        self.links.get_mut(&other).unwrap().up.pop_front();
                        self.retire_link(other);
                        streams.push((other, client_id, mutations.into()));
                    }
                }
                let mut batch = Vec::new();
                let mut origins = Vec::new();
                while !streams.is_empty() {
                    let i = self.rng.gen_range(0..streams.len());
                    match streams[i].2.pop_front() {
                        Some(m) => {
                            origins.push(streams[i].0);
                            batch.push((streams[i].1, m));
                        }
                        None => {
                            streams.swap_remove(i);
                        }
                    }
                }
                self.server_apply(&batch, &origins)?;
            }
        }
        Ok(())
    }

    fn server_apply(&mut self, batch: &[(u64, Mutation)], origins: &[u64]) -> Result<(), String> {
        for (client_id, m) in batch {
            let key = (*client_id, m.seq);
            match self.ledger.received.get(&key) {
                Some(first) if first != m => {
                    return Err(format!(
                        "mutation {key:?} was re-sent with different content: {first:?} then {m:?}"
                    ))
                }
                Some(_) => {}
                None => {
                    self.ledger.received.insert(key, m.clone());
                }
            }
        }
        let outcomes = self
            .server
            .apply_batch(batch)
            .map_err(|e| format!("apply_batch failed: {e}"))?;
        if outcomes.len() != batch.len() {
            return Err(format!(
                "apply_batch gave {} outcomes for {} mutations",
                outcomes.len(),
                batch.len()
            ));
        }
        let one_message = self.rng.gen_bool(0.5);
        let mut applied = Vec::new();
        for (outcome, &origin) in outcomes.into_iter().zip(origins) {
            match outcome {
                Outcome::Applied(entry) => {
                    self.trace(format!(
                        "server: applied {}#{} as {} ({} changes)",
                        entry.client_id,
                        entry.client_seq,
                        entry.server_seq,
                        entry.changes.len()
                    ));
                    self.stats.applied += 1;
                    let len = self.ledger.log_hlc_max.len() as u64;
                    if entry.server_seq != len + 1 {
                        return Err(format!(
                            "server applied as {} but the log had {len} entries",
                            entry.server_seq
                        ));
                    }
                    let max = self
                        .ledger
                        .log_hlc_max
                        .last()
                        .copied()
                        .unwrap_or_default()
                        .max(entry.hlc);
                    self.ledger.log_hlc_max.push(max);
                    if one_message {
                        applied.push(entry);
                    } else {
                        self.broadcast(vec![entry]);
                    }
                }
                Outcome::Rejected {
                    client_id,
                    client_seq,
                    code,
                    reason,
                } => {
                    self.trace(format!(
                        "server: refused {client_id}#{client_seq}: {code} {reason}"
                    ));
                    self.stats.refused += 1;
                    self.ledger
                        .refused
                        .insert((client_id, client_seq), code.clone());
                    self.send_down(
                        origin,
                        &ServerMsg::Rejected {
                            client_seq,
                            code,
                            reason,
                        },
                    );
                }
                Outcome::Duplicate {
                    client_id,
                    client_seq,
                    rejection,
                } => {
                    self.trace(format!(
                        "server: duplicate {client_id}#{client_seq} (refused before: {})",
                        rejection.is_some()
                    ));
                    self.stats.duplicates += 1;
                    if let Some((code, reason)) = rejection {
                        self.send_down(
                            origin,
                            &ServerMsg::Rejected {
                                client_seq,
                                code,
                                reason,
                            },
                        );
                    }
                }
            }
        }
        if !applied.is_empty() {
            self.broadcast(applied);
        }
        // The connection dies right after the server applied, before the
        // acknowledgement could leave.
        if self.rng.gen_bool(0.04) {
            let origin = origins[0];
            self.drop_link(origin, false, "after apply, before ack");
        }
        Ok(())
    }

    fn broadcast(&mut self, entries: Vec<LogEntry>) {
        let msg = ServerMsg::Changes {
            entries,
            caught_up: true,
        };
        let live: Vec<u64> = self
            .links
            .iter()
            .filter(|(_, l)| l.hello.is_some())
            .map(|(id, _)| *id)
            .collect();
        for id in live {
            self.send_down(id, &msg);
        }
    }

    fn crash_server(&mut self) -> Result<(), String> {
        let head = self.server.head();
        self.trace(format!("SERVER CRASH at head {head}"));
        self.stats.server_crashes += 1;
        for id in self.links.keys().copied().collect::<Vec<_>>() {
            self.drop_link(id, false, "server crash");
        }
        let log_before = read_whole_log(self.server.connection())?;
        // Opening a second handle and then dropping the old core closes the
        // store as a killed process leaves it: every apply_batch either
        // committed or never happened. The new core must rebuild its
        // in-memory state (head, per-client sequence cache) from the file.
        let fresh = ServerCore::open(open_sqlite(&self.server_path)?, self.schema.clone())
            .map_err(|e| format!("server reopen: {e}"))?;
        drop(std::mem::replace(&mut self.server, fresh));
        integrity(self.server.connection(), "server after restart")?;
        if self.server.head() != head {
            return Err(format!(
                "server head was {head} before the crash and {} after",
                self.server.head()
            ));
        }
        if read_whole_log(self.server.connection())? != log_before {
            return Err("the server's log changed across a restart".into());
        }
        Ok(())
    }

    // ---- devices --------------------------------------------------------

    fn device_receive(&mut self, id: u64, may_crash: bool) -> Result<(), String> {
        let link = self.links.get_mut(&id).unwrap();
        let frame = link.down.pop_front().unwrap().1;
        let Some(d) = link.device else { return Ok(()) }; // The hostile device ignores answers.
        let msg = decode_server(&frame, FRAME_BYTES_MAX)
            .map_err(|e| format!("device got a bad frame: {e}"))?;
        self.trace(format!("{} <- {}", self.devices[d].name, short(&msg)));
        let now = self.wall_ms(d);
        let shown = format!("{msg:?}");
        let out = self.devices[d].client.handle(msg, now).map_err(|e| {
            let dev = &self.devices[d];
            let rows = all_rows(dev.client.connection()).unwrap_or_default();
            let pending = dev.client.pending_seqs().unwrap_or_default();
            format!(
                "{} failed to handle a server message: {e}\nmessage: {shown}\ndevice rows (notes, tags, users): {rows:?}\npending: {pending:?}",
                dev.name
            )
        })?;
        self.record_events(d, &out.events)?;
        // The device dies after handling the message but before its driver
        // wrote what the engine wanted to send.
        if may_crash && self.rng.gen_bool(0.01) {
            return self.crash_device(d);
        }
        self.send_up(id, out.send);
        Ok(())
    }

    fn record_events(&mut self, d: usize, events: &[Event]) -> Result<(), String> {
        let client_id = self.devices[d].client_id;
        for event in events {
            match event {
                Event::Applied { seq, server_seq } => {
                    if let Some(before) = self
                        .ledger
                        .applied_events
                        .insert((client_id, *seq), *server_seq)
                    {
                        return Err(format!(
                            "{}: mutation #{seq} reported applied twice (as {before}, then {server_seq})",
                            self.devices[d].name
                        ));
                    }
                }
                Event::Rejected { seq, code, .. } => {
                    self.trace(format!(
                        "{}: mutation #{seq} rolled back ({code})",
                        self.devices[d].name
                    ));
                    if self
                        .ledger
                        .rejected_events
                        .insert((client_id, *seq), code.clone())
                        .is_some()
                    {
                        return Err(format!(
                            "{}: mutation #{seq} reported refused twice",
                            self.devices[d].name
                        ));
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn crash_device(&mut self, d: usize) -> Result<(), String> {
        self.stats.device_crashes += 1;
        let has_schema = self.devices[d].client.schema().is_some();
        let before = if has_schema {
            all_rows(self.devices[d].client.connection())?
        } else {
            Vec::new()
        };
        let pending = self.devices[d]
            .client
            .pending_seqs()
            .map_err(|e| format!("pending_seqs: {e}"))?;
        let cursor = self.devices[d].client.status().server_seq;
        self.trace(format!(
            "{} CRASH (pending {pending:?}, cursor {cursor})",
            self.devices[d].name
        ));
        if let Some(id) = self.devices[d].link {
            let half = self.rng.gen_bool(0.5);
            self.drop_link(id, half, "device crash");
        }
        let conn = open_sqlite(&self.devices[d].path)?;
        let fresh = Client::open(conn, 999_999, ClientConfig::default())
            .map_err(|e| format!("device reopen: {e}"))?;
        // The old client is dropped here, closing its file as a killed
        // process would; everything it committed must come back.
        self.devices[d].client = fresh;
        let dev = &self.devices[d];
        integrity(
            dev.client.connection(),
            &format!("{} after restart", dev.name),
        )?;
        if dev.client.client_id() != dev.client_id {
            return Err(format!(
                "{} came back with client id {}",
                dev.name,
                dev.client.client_id()
            ));
        }
        let after = if has_schema {
            all_rows(dev.client.connection())?
        } else {
            Vec::new()
        };
        if dev.client.schema().is_some() != has_schema {
            return Err(format!(
                "{} schema presence changed across a crash",
                dev.name
            ));
        }
        if after != before {
            return Err(format!(
                "{} rows changed across a crash:\nbefore {before:?}\nafter  {after:?}",
                dev.name
            ));
        }
        let pending_after = dev
            .client
            .pending_seqs()
            .map_err(|e| format!("pending_seqs: {e}"))?;
        if pending_after != pending || dev.client.status().server_seq != cursor {
            return Err(format!(
                "{} outbox or cursor changed across a crash: {pending:?}@{cursor} became {pending_after:?}@{}",
                dev.name,
                dev.client.status().server_seq
            ));
        }
        Ok(())
    }

    fn clock_jump(&mut self, d: usize) {
        self.stats.clock_jumps += 1;
        let old = self.devices[d].skew_ms;
        // Mostly backwards, as NTP corrections and manual changes do; forward
        // too so the skew keeps moving within the hour.
        let new = if self.rng.gen_bool(0.7) {
            self.rng.gen_range(-HOUR_MS..=old)
        } else {
            self.rng.gen_range(old..=HOUR_MS)
        };
        self.devices[d].skew_ms = new;
        self.trace(format!(
            "{} clock jumps by {}ms",
            self.devices[d].name,
            new - old
        ));
    }

    fn device_read(&mut self, d: usize) -> Result<(), String> {
        let (table, pk) = *TABLES.choose(&mut self.rng).unwrap();
        if self.devices[d].client.schema().is_none() {
            return Ok(());
        }
        self.devices[d]
            .client
            .query(
                &format!("SELECT count(*) FROM \"{table}\" WHERE \"{pk}\" IS NOT NULL"),
                &[],
            )
            .map(|_| ())
            .map_err(|e| format!("{}: read failed: {e}", self.devices[d].name))
    }

    fn device_exec(&mut self, d: usize) -> Result<(), String> {
        if self.devices[d].client.schema().is_none() {
            return Ok(()); // No schema until the first Welcome.
        }
        let (sql, params) = self.random_sql();
        let now = self.wall_ms(d);
        let pending_before = self.devices[d].client.status().pending;
        let cursor = self.devices[d].client.status().server_seq;
        let result = self.devices[d].client.exec(&sql, &params, now);
        let name = self.devices[d].name.clone();
        let client_id = self.devices[d].client_id;
        match result {
            Ok((outcome, out)) => {
                let Some(seq) = outcome.mutation else {
                    self.trace(format!("{name} exec (no change): {sql}"));
                    return Ok(());
                };
                self.stats.mutations += 1;
                let hlc: i64 = self.devices[d]
                    .client
                    .query(
                        "SELECT hlc FROM _hearth_outbox WHERE seq = ?1",
                        &[Value::Integer(seq as i64)],
                    )
                    .map_err(|e| format!("outbox read: {e}"))?
                    .rows
                    .first()
                    .and_then(|r| match r[0] {
                        Value::Integer(h) => Some(h),
                        _ => None,
                    })
                    .ok_or_else(|| {
                        format!("{name}: mutation #{seq} is not in its outbox right after exec")
                    })?;
                let hlc = Hlc(hlc as u64);
                self.trace(format!(
                    "{name} exec #{seq} hlc {}.{}: {sql} {params:?}",
                    hlc.wall_ms(),
                    hlc.counter()
                ));
                // Causality: a write made after seeing others stamps later than
                // all of them, and a device's own stamps only grow, whatever its
                // wall clock does.
                let seen = cursor
                    .checked_sub(1)
                    .map(|i| self.ledger.log_hlc_max[i as usize])
                    .unwrap_or_default();
                if hlc <= seen {
                    return Err(format!("{name}: mutation #{seq} stamped {hlc:?}, not after {seen:?} which it had seen"));
                }
                if let Some((&(_, prev_seq), &prev)) = self
                    .ledger
                    .made
                    .range((client_id, 0)..(client_id, u64::MAX))
                    .next_back()
                {
                    if seq <= prev_seq || hlc <= prev {
                        return Err(format!(
                            "{name}: mutation #{seq} {hlc:?} does not follow #{prev_seq} {prev:?}"
                        ));
                    }
                }
                self.ledger.made.insert((client_id, seq), hlc);
                if self.rng.gen_bool(0.02) {
                    // Dies after the commit, before the driver sent anything.
                    return self.crash_device(d);
                }
                match self.devices[d].link {
                    Some(id) => self.send_up(id, out.send),
                    None if !out.send.is_empty() => {
                        return Err(format!("{name} wants to send while offline"))
                    }
                    None => {}
                }
            }
            Err(e) => {
                self.trace(format!("{name} exec failed: {sql}: {e}"));
                if e.code() != "SQL_ERROR" {
                    return Err(format!("{name}: exec failed with {e} ({})", e.code()));
                }
                if self.devices[d].client.status().pending != pending_before {
                    return Err(format!("{name}: a failed exec changed the outbox"));
                }
            }
        }
        Ok(())
    }

    // ---- workloads --------------------------------------------------------

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        *items.choose(&mut self.rng).unwrap()
    }

    fn user_id(&mut self) -> String {
        format!("u{}", self.rng.gen_range(0..8))
    }

    fn note_id(&mut self) -> i64 {
        self.rng.gen_range(1..=10)
    }

    fn tag_id(&mut self) -> String {
        format!("t{}", self.rng.gen_range(0..6))
    }

    fn email(&mut self) -> Value {
        if self.rng.gen_bool(0.15) {
            Value::Null
        } else {
            Value::Text(format!("e{}@x", self.rng.gen_range(0..12)))
        }
    }

    fn text(&mut self, prefix: &str) -> Value {
        match self.rng.gen_range(0..10) {
            0 => Value::Null,
            1 => Value::Text(format!("{prefix} it's \"quoted\"")),
            _ => Value::Text(format!("{prefix}{}", self.rng.gen_range(0..10))),
        }
    }

    fn age(&mut self) -> Value {
        Value::Integer(if self.rng.gen_bool(0.03) {
            -1
        } else {
            self.rng.gen_range(0..100)
        })
    }

    fn weight(&mut self) -> Value {
        match self.rng.gen_range(0..4) {
            0 => Value::Null,
            1 => Value::Integer(self.rng.gen_range(0..5)),
            _ => Value::Real(f64::from(self.rng.gen_range(-40..40)) / 8.0),
        }
    }

    fn blob(&mut self) -> Value {
        match self.rng.gen_range(0..3) {
            0 => Value::Null,
            _ => Value::Blob(
                (0..self.rng.gen_range(0..5))
                    .map(|_| self.rng.gen())
                    .collect(),
            ),
        }
    }

    fn random_statement(&mut self) -> String {
        match self.rng.gen_range(0..22) {
            0..=2 => {
                let verb = self.pick(&[
                    "INSERT INTO",
                    "INSERT OR REPLACE INTO",
                    "INSERT OR IGNORE INTO",
                ]);
                let (id, email, name, age) =
                    (self.user_id(), self.email(), self.text("n"), self.age());
                let name = if name == Value::Null {
                    Value::Text("anon".into())
                } else {
                    name
                };
                format!(
                    "{verb} users (id, email, name, age) VALUES ('{id}', {}, {}, {})",
                    quote(&email),
                    quote(&name),
                    quote(&age)
                )
            }
            3 => {
                let (id, name, age) = (self.user_id(), self.text("n"), self.age());
                let name = if name == Value::Null {
                    Value::Text("anon".into())
                } else {
                    name
                };
                format!(
                    "INSERT INTO users (id, name, age) VALUES ('{id}', {}, {}) ON CONFLICT (id) DO UPDATE SET name = excluded.name",
                    quote(&name),
                    quote(&age)
                )
            }
            4..=5 => {
                let (id, owner, title, body) = (
                    self.note_id(),
                    self.user_id(),
                    self.text("title"),
                    self.text("body"),
                );
                let pinned = self.rng.gen_range(0..2);
                format!(
                    "INSERT INTO notes (id, owner, title, body, pinned) VALUES ({id}, '{owner}', {}, {}, {pinned})",
                    quote(&title),
                    quote(&body)
                )
            }
            6 => {
                let (id, label, weight, data) = (
                    self.tag_id(),
                    self.text("label"),
                    self.weight(),
                    self.blob(),
                );
                format!(
                    "INSERT OR REPLACE INTO tags (id, label, weight, data) VALUES ('{id}', {}, {}, {})",
                    quote(&label),
                    quote(&weight),
                    quote(&data)
                )
            }
            7..=8 => {
                let (id, name) = (self.user_id(), self.text("n"));
                let name = if name == Value::Null {
                    Value::Text("anon".into())
                } else {
                    name
                };
                format!("UPDATE users SET name = {} WHERE id = '{id}'", quote(&name))
            }
            9 => {
                let (id, email) = (self.user_id(), self.email());
                format!(
                    "UPDATE users SET email = {} WHERE id = '{id}'",
                    quote(&email)
                )
            }
            10..=11 => {
                let (id, title, body) = (self.note_id(), self.text("title"), self.text("body"));
                format!(
                    "UPDATE notes SET title = {}, body = {} WHERE id = {id}",
                    quote(&title),
                    quote(&body)
                )
            }
            12 => {
                let (id, label, weight, data) = (
                    self.tag_id(),
                    self.text("label"),
                    self.weight(),
                    self.blob(),
                );
                format!(
                    "UPDATE tags SET label = {}, weight = {}, data = {} WHERE id = '{id}'",
                    quote(&label),
                    quote(&weight),
                    quote(&data)
                )
            }
            13 => format!(
                "UPDATE notes SET pinned = 1 - pinned WHERE id <= {}",
                self.note_id()
            ),
            14 => {
                let age = self.age();
                format!(
                    "UPDATE users SET age = {} WHERE id = '{}'",
                    quote(&age),
                    self.user_id()
                )
            }
            15 => "UPDATE users SET age = age + 1 WHERE age < 50".to_string(),
            16 => format!("DELETE FROM notes WHERE id = {}", self.note_id()),
            17 => format!("DELETE FROM tags WHERE id = '{}'", self.tag_id()),
            18 => format!("DELETE FROM users WHERE id = '{}'", self.user_id()),
            19 => format!(
                "DELETE FROM notes WHERE pinned = 1 AND id > {}",
                self.note_id()
            ),
            20 => format!(
                "UPDATE tags SET id = '{}' WHERE id = '{}'",
                self.tag_id(),
                self.tag_id()
            ),
            _ => format!(
                "UPDATE notes SET owner = '{}' WHERE owner = '{}'",
                self.user_id(),
                self.user_id()
            ),
        }
    }

    fn random_sql(&mut self) -> (String, Vec<Value>) {
        match self.rng.gen_range(0..10) {
            // One statement with bound parameters.
            0 => {
                let (id, name) = (self.user_id(), self.text("p"));
                let name = if name == Value::Null {
                    Value::Text("anon".into())
                } else {
                    name
                };
                (
                    "UPDATE users SET name = ?1 WHERE id = ?2".into(),
                    vec![name, Value::Text(id)],
                )
            }
            1 => {
                let (id, label, weight) = (self.tag_id(), self.text("label"), self.weight());
                (
                    "INSERT INTO tags (id, label, weight) VALUES (?1, ?2, ?3) ON CONFLICT (id) DO UPDATE SET weight = excluded.weight".into(),
                    vec![Value::Text(id), label, weight],
                )
            }
            // A multi-statement transaction: all of it or none of it.
            2..=3 => {
                let n = self.rng.gen_range(2..=4);
                let statements: Vec<String> = (0..n).map(|_| self.random_statement()).collect();
                (statements.join("; "), Vec::new())
            }
            _ => (self.random_statement(), Vec::new()),
        }
    }

    // ---- the hostile device ---------------------------------------------

    fn rogue_push(&mut self) -> Result<(), String> {
        let id = match self.rogue_link {
            Some(id) => id,
            None => {
                let id = self.next_link;
                self.next_link += 1;
                self.links.insert(
                    id,
                    Link {
                        device: None,
                        client_open: true,
                        server_open: true,
                        hello: None,
                        latency_max_ms: 50,
                        up: VecDeque::new(),
                        down: VecDeque::new(),
                    },
                );
                self.rogue_link = Some(id);
                let hello = ClientMsg::Hello {
                    client_id: ROGUE_ID,
                    cursor: self.server.head(),
                    schema_version: Some(1),
                    next_seq: u64::MAX,
                };
                self.send_up(id, vec![hello]);
                id
            }
        };
        let mutation = if !self.rogue_sent.is_empty() && self.rng.gen_bool(0.15) {
            // A stale re-send: the server must answer it as a duplicate.
            self.rogue_sent.choose(&mut self.rng).unwrap().clone()
        } else {
            let n = self.rng.gen_range(1..=3);
            let mut changes: Vec<RowChange> = (0..n).map(|_| self.rogue_change(false)).collect();
            if self.rng.gen_bool(0.5) {
                // The last change breaks a rule: the whole mutation must go.
                changes.push(self.rogue_change(true));
            }
            let skew = self.rng.gen_range(-HOUR_MS..=HOUR_MS);
            let hlc = Hlc::new((self.now_ms as i64 + skew) as u64, self.rng.gen_range(0..3));
            let m = Mutation {
                seq: self.rogue_next_seq,
                hlc,
                changes,
            };
            self.rogue_next_seq += 1;
            self.rogue_sent.push(m.clone());
            m
        };
        self.trace(format!(
            "rogue sends #{} hlc {}.{}: {:?}",
            mutation.seq,
            mutation.hlc.wall_ms(),
            mutation.hlc.counter(),
            mutation.changes
        ));
        self.send_up(
            id,
            vec![ClientMsg::Push {
                mutations: vec![mutation],
            }],
        );
        Ok(())
    }

    fn rogue_change(&mut self, bad: bool) -> RowChange {
        let set = |cols: Vec<(&str, Value)>| {
            cols.into_iter()
                .map(|(c, v)| (c.to_string(), ColumnOp::Set(v)))
                .collect()
        };
        if bad {
            let (table, pk, op) = match self.rng.gen_range(0..6) {
                0 => (
                    "users",
                    Value::Text(self.user_id()),
                    RowOp::Upsert {
                        insert: false,
                        columns: set(vec![("age", Value::Integer(-5))]),
                    },
                ),
                1 => (
                    "notes",
                    Value::Integer(self.note_id()),
                    RowOp::Upsert {
                        insert: true,
                        columns: set(vec![
                            ("owner", Value::Null),
                            ("title", Value::Null),
                            ("body", Value::Null),
                            ("pinned", Value::Integer(7)),
                        ]),
                    },
                ),
                2 => (
                    "users",
                    Value::Text(format!("r{}", self.rng.gen_range(0..4))),
                    RowOp::Upsert {
                        insert: true,
                        columns: set(vec![
                            ("email", Value::Null),
                            ("name", Value::Null),
                            ("age", Value::Integer(1)),
                        ]),
                    },
                ),
                3 => (
                    "tags",
                    Value::Text(self.tag_id()),
                    RowOp::Upsert {
                        insert: false,
                        columns: set(vec![("nope", Value::Integer(1))]),
                    },
                ),
                4 => ("ghosts", Value::Text("g".into()), RowOp::Delete),
                _ => ("notes", Value::Text("not-an-integer".into()), RowOp::Delete),
            };
            return RowChange {
                table: table.into(),
                pk,
                op,
            };
        }
        match self.rng.gen_range(0..6) {
            0 => {
                let (name, age) = (
                    self.text("rogue"),
                    Value::Integer(self.rng.gen_range(0..100)),
                );
                let name = if name == Value::Null {
                    Value::Text("r".into())
                } else {
                    name
                };
                let id = self.user_id();
                RowChange {
                    table: "users".into(),
                    pk: Value::Text(id),
                    op: RowOp::Upsert {
                        insert: false,
                        columns: set(vec![("name", name), ("age", age)]),
                    },
                }
            }
            1 => {
                let (email, age) = (self.email(), Value::Integer(self.rng.gen_range(0..100)));
                let id = format!("r{}", self.rng.gen_range(0..4));
                RowChange {
                    table: "users".into(),
                    pk: Value::Text(id),
                    op: RowOp::Upsert {
                        insert: true,
                        columns: set(vec![
                            ("email", email),
                            ("name", Value::Text("rogue".into())),
                            ("age", age),
                        ]),
                    },
                }
            }
            2 => {
                let (title, id) = (self.text("rt"), self.note_id());
                RowChange {
                    table: "notes".into(),
                    pk: Value::Integer(id),
                    op: RowOp::Upsert {
                        insert: false,
                        columns: set(vec![("title", title)]),
                    },
                }
            }
            3 => {
                let (label, weight, data, id) =
                    (self.text("rl"), self.weight(), self.blob(), self.tag_id());
                RowChange {
                    table: "tags".into(),
                    pk: Value::Text(id),
                    op: RowOp::Upsert {
                        insert: true,
                        columns: set(vec![("label", label), ("weight", weight), ("data", data)]),
                    },
                }
            }
            4 => RowChange {
                table: "tags".into(),
                pk: Value::Text(self.tag_id()),
                op: RowOp::Delete,
            },
            _ => RowChange {
                table: "users".into(),
                pk: Value::Text(format!("r{}", self.rng.gen_range(0..4))),
                op: RowOp::Delete,
            },
        }
    }

    // ---- quiescent points ----------------------------------------------------

    /// Heals every partition, reconnects every device and delivers until no
    /// frame is in flight and every device is caught up with nothing
    /// pending; then checks every property.
    fn quiesce_and_check(&mut self) -> Result<(), String> {
        self.trace("-- quiescing".into());
        if let Some(id) = self.rogue_link {
            // The hostile device leaves; what it sent is still delivered.
            self.drop_link(id, true, "rogue leaves");
        }
        for d in 0..self.devices.len() {
            self.devices[d].offline_until_ms = 0;
        }
        let mut deliveries = 0u64;
        loop {
            for d in 0..self.devices.len() {
                if self.devices[d].link.is_none() {
                    self.connect(d);
                }
            }
            let due = self.due();
            if let Some(&(id, up)) = due.choose(&mut self.rng) {
                deliveries += 1;
                if deliveries > QUIESCE_DELIVERIES_MAX {
                    return Err(format!(
                        "no quiescence after {QUIESCE_DELIVERIES_MAX} deliveries"
                    ));
                }
                if up {
                    self.server_receive(id, &due)?;
                } else {
                    self.device_receive(id, false)?;
                }
                continue;
            }
            if let Some(at) = self.next_arrival() {
                self.now_ms = at;
                continue;
            }
            break;
        }
        let mut stuck = Vec::new();
        for dev in &self.devices {
            let s = dev.client.status();
            if !s.connected || !s.caught_up || s.pending != 0 {
                stuck.push(format!("{}: {s:?}", dev.name));
            }
        }
        if !stuck.is_empty() {
            return Err(format!(
                "the network is quiet but devices are not in sync: {}",
                stuck.join("; ")
            ));
        }
        self.stats.quiescent_points += 1;
        let head = self.server.head();
        self.trace(format!(
            "-- quiescent at head {head}; checking {} properties",
            PROPERTIES.len()
        ));
        for property in PROPERTIES {
            (property.check)(self)
                .map_err(|e| format!("property '{}' failed: {e}", property.name))?;
        }
        Ok(())
    }

    pub fn summary(&self) -> String {
        let mut s = String::new();
        let _ = write!(
            s,
            "{} devices, head {}, {:?}",
            self.devices.len(),
            self.server.head(),
            self.stats
        );
        s
    }
}

// ---- properties -------------------------------------------------------------

fn server_integrity(w: &World) -> Result<(), String> {
    integrity(w.server.connection(), "server store")
}

fn convergence(w: &World) -> Result<(), String> {
    for (table, pk) in TABLES {
        let server = table_rows(w.server.connection(), table, pk)?;
        for dev in &w.devices {
            let local = table_rows(dev.client.connection(), table, pk)?;
            if local != server {
                return Err(format!("{} table {table} differs from the server:\ndevice {local:?}\nserver {server:?}", dev.name));
            }
        }
    }
    Ok(())
}

fn log_at_most_once(w: &World) -> Result<(), String> {
    let log = read_whole_log(w.server.connection())?;
    let mut seen = BTreeSet::new();
    for (i, entry) in log.iter().enumerate() {
        if entry.server_seq != i as u64 + 1 {
            return Err(format!(
                "log position {} holds server_seq {}",
                i + 1,
                entry.server_seq
            ));
        }
        if !seen.insert((entry.client_id, entry.client_seq)) {
            return Err(format!(
                "{}#{} is in the log twice",
                entry.client_id, entry.client_seq
            ));
        }
        let Some(sent) = w.ledger.received.get(&(entry.client_id, entry.client_seq)) else {
            return Err(format!(
                "log entry {} is for a mutation nobody sent",
                entry.server_seq
            ));
        };
        if sent.hlc != entry.hlc {
            return Err(format!(
                "log entry {} carries another stamp than the mutation",
                entry.server_seq
            ));
        }
    }
    if log.len() as u64 != w.server.head() || log.len() != w.ledger.log_hlc_max.len() {
        return Err(format!(
            "log has {} entries, head says {}, {} were applied",
            log.len(),
            w.server.head(),
            w.ledger.log_hlc_max.len()
        ));
    }
    Ok(())
}

fn log_index(w: &World) -> Result<HashMap<Key, u64>, String> {
    Ok(read_whole_log(w.server.connection())?
        .into_iter()
        .map(|e| ((e.client_id, e.client_seq), e.server_seq))
        .collect())
}

fn acked_in_log(w: &World) -> Result<(), String> {
    let index = log_index(w)?;
    for (key, server_seq) in &w.ledger.applied_events {
        if index.get(key) != Some(server_seq) {
            return Err(format!(
                "{key:?} was acknowledged as {server_seq} but the log has it at {:?}",
                index.get(key)
            ));
        }
    }
    Ok(())
}

fn one_fate_each(w: &World) -> Result<(), String> {
    let index = log_index(w)?;
    for key in w.ledger.made.keys() {
        let in_log = index.contains_key(key);
        let refused = w.ledger.refused.contains_key(key);
        if in_log == refused {
            return Err(format!(
                "mutation {key:?}: in the log {in_log}, refused {refused}"
            ));
        }
        let told_applied = w.ledger.applied_events.contains_key(key);
        let told_refused = w.ledger.rejected_events.contains_key(key);
        if told_applied != in_log || told_refused != refused {
            return Err(format!(
                "mutation {key:?}: in the log {in_log}, refused {refused}, but its device was told applied {told_applied}, refused {told_refused}"
            ));
        }
    }
    for key in w
        .ledger
        .applied_events
        .keys()
        .chain(w.ledger.rejected_events.keys())
    {
        if !w.ledger.made.contains_key(key) {
            return Err(format!(
                "a device was told about {key:?}, which it never made"
            ));
        }
    }
    Ok(())
}

fn refused_leave_no_trace(w: &World) -> Result<(), String> {
    let index = log_index(w)?;
    let log = read_whole_log(w.server.connection())?;
    let mut touched: BTreeSet<(String, String)> = BTreeSet::new();
    for entry in &log {
        let m = &w.ledger.received[&(entry.client_id, entry.client_seq)];
        for c in &m.changes {
            touched.insert((c.table.clone(), format!("{:?}", c.pk)));
        }
    }
    for key in w.ledger.refused.keys() {
        if index.contains_key(key) {
            return Err(format!("refused mutation {key:?} is in the log"));
        }
        let Some(m) = w.ledger.received.get(key) else {
            continue;
        };
        for c in &m.changes {
            // A row only a refused mutation ever wrote must not exist anywhere.
            let Some(table) = w.schema.table(&c.table) else {
                continue;
            };
            if touched.contains(&(c.table.clone(), format!("{:?}", c.pk))) {
                continue;
            }
            let exists: bool = w
                .server
                .connection()
                .query_row(
                    &format!(
                        "SELECT count(*) FROM \"{}\" WHERE \"{}\" = ?1",
                        table.name,
                        table.pk_name()
                    ),
                    [&c.pk],
                    |r| r.get::<_, i64>(0),
                )
                .map_err(sql_err("select"))?
                > 0;
            if exists {
                return Err(format!(
                    "row {}/{:?} exists but only refused mutation {key:?} wrote it",
                    c.table, c.pk
                ));
            }
        }
    }
    Ok(())
}

/// Replays the log against the documented merge rules, for rows that were
/// never deleted: the row exists from its first applied insert on, an update
/// before that does nothing, and each column holds the value of the write
/// with the largest (hlc, client id) among those that counted.
fn lww_follows_clocks(w: &World) -> Result<(), String> {
    #[derive(Default)]
    struct RowModel {
        born: bool,
        deleted: bool,
        columns: BTreeMap<String, ((Hlc, u64), Value)>,
    }
    let mut model: BTreeMap<(String, String), (Value, RowModel)> = BTreeMap::new();
    for entry in read_whole_log(w.server.connection())? {
        let m = &w.ledger.received[&(entry.client_id, entry.client_seq)];
        let stamp = (m.hlc, entry.client_id);
        for c in &m.changes {
            let (_, row) = model
                .entry((c.table.clone(), format!("{:?}", c.pk)))
                .or_insert_with(|| (c.pk.clone(), RowModel::default()));
            match &c.op {
                RowOp::Delete => row.deleted = true,
                RowOp::Upsert { insert, columns } => {
                    if *insert {
                        row.born = true;
                    }
                    if !row.born {
                        continue;
                    }
                    for (name, ColumnOp::Set(v)) in columns {
                        let slot = row
                            .columns
                            .entry(name.clone())
                            .or_insert_with(|| (stamp, v.clone()));
                        if stamp >= slot.0 {
                            *slot = (stamp, v.clone());
                        }
                    }
                }
            }
        }
    }
    for ((table_name, _), (pk, row)) in &model {
        if row.deleted || !row.born {
            continue;
        }
        let table = w
            .schema
            .table(table_name)
            .ok_or("model row in unknown table")?;
        let mut stmt = w
            .server
            .connection()
            .prepare(&format!(
                "SELECT * FROM \"{}\" WHERE \"{}\" = ?1",
                table.name,
                table.pk_name()
            ))
            .map_err(sql_err("select"))?;
        let names: Vec<String> = stmt.column_names().map(String::from).collect();
        let values: Option<Vec<Value>> = stmt
            .query_row([pk], |r| {
                (0..names.len()).map(|i| r.get::<_, Value>(i)).collect()
            })
            .map(Some)
            .or_else(|e| {
                if e == rusqlite::Error::QueryReturnedNoRows {
                    Ok(None)
                } else {
                    Err(e)
                }
            })
            .map_err(sql_err("select"))?;
        let Some(values) = values else {
            return Err(format!(
                "row {table_name}/{pk:?} was inserted and never deleted, but is missing"
            ));
        };
        for (name, (stamp, expected)) in &row.columns {
            let i = names
                .iter()
                .position(|n| n == name)
                .ok_or("unknown column in model")?;
            if !same_stored_value(&values[i], expected) {
                return Err(format!(
                    "{table_name}/{pk:?}.{name} is {:?} but the latest write by the clocks ({}.{} by client {}) wrote {expected:?}",
                    values[i],
                    stamp.0.wall_ms(),
                    stamp.0.counter(),
                    stamp.1
                ));
            }
        }
    }
    Ok(())
}

/// Whether a stored value is what a write wrote, allowing for the column's
/// type affinity (an integer written to a REAL column reads back as a real;
/// the hostile device writes raw values that did not go through SQL first).
fn same_stored_value(stored: &Value, written: &Value) -> bool {
    match (stored, written) {
        (Value::Real(r), Value::Integer(i)) | (Value::Integer(i), Value::Real(r)) => {
            *r == *i as f64
        }
        _ => stored == written,
    }
}
