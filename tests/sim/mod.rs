//! The deterministic simulator behind `tests/simulation.rs`.
//!
//! One seeded random generator drives everything: 3 to 8 devices (each a real
//! [`Client`] on its own SQLite file), the server's logic ([`ServerCore`] on
//! its own store file, its wall clock set from the simulated time) routed the
//! way the network driver routes it, and a simulated network between them
//! that delays, reorders across connections, drops, half-closes and
//! partitions. Devices and the server crash and restart from their files;
//! devices are restored from older copies of their database; device clocks
//! are skewed (some hours or days ahead) and jump. At quiescent points (every
//! partition healed, every message delivered, every device caught up) the
//! properties in [`PROPERTIES`] are checked against the server's store, the
//! devices and a ledger of everything that happened.
//!
//! The ledger records what each device's SQL really did, read from the
//! device's tables before and after each `exec` (not from what capture
//! recorded), so the properties state what a user expects, not what the
//! engine's merge rules say.
//!
//! Nothing here reads the wall clock or the OS's randomness, so a seed and a
//! step count replay the exact same run.

mod auth;
mod policies;

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use hearth_engine::fanout::{Concerned, Fanout};
use hearth_engine::link::{Link as ServerLink, LinkConfig, Step, SubEvent};
use hearth_engine::protocol::{
    decode_client, decode_server, encode_client, encode_server, Load, FRAME_BYTES_MAX,
};
use hearth_engine::{
    Client, ClientConfig, ClientMsg, ColumnOp, Event, Hlc, LogEntry, Mutation, Outcome, RowChange,
    RowOp, Schema, ServerCore, ServerMsg, Value,
};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rusqlite::Connection;

/// The app schema the simulated devices use.
/// - `users.email` is UNIQUE so that two offline devices can pick the same
///   address and the server must refuse one of them; the CHECKs let the
///   hostile device send rows the server must refuse.
/// - `vals` takes values at the extremes of every storage class, in an
///   untyped column and in typed ones; `t` is `COLLATE NOCASE`, so case-only
///   updates are changes the collation calls equal.
/// - `orders`/`items` (the child's table sorts first; the key is deferred, so
///   a child may be written before its parent in one transaction) and
///   `authors`/`books` (the parent's table sorts first; deletes cascade) are
///   foreign keys written together, deleted children first, and raced by
///   other devices.
/// - `slots.pos` is UNIQUE and handed between rows inside one transaction
///   (swaps through a temporary value, renumbering, rotations).
/// - `counted` has an app trigger counting edits of `body`.
/// - `cards` has a column of each merge policy but `lww` (see
///   [`policies`]): a counter, a counter bounded to 0..=12, a set, a text
///   and a manual column; its rows are made once, at the start.
/// - `keeps` is plain LWW but its updates win over concurrent deletes.
/// - `tasks` syncs only through subscriptions to two streams: a list's
///   tasks (equality) and urgent ones (a comparison OR a NULL test); devices
///   subscribe and unsubscribe while writes move rows between lists and
///   priorities (see [`SHAPE_STREAMS`]).
pub const SCHEMA: &str = r#"
version = 1

[tables.users]
create = "CREATE TABLE users (id TEXT PRIMARY KEY, email TEXT UNIQUE, name TEXT NOT NULL, age INTEGER CHECK (age >= 0))"

[tables.notes]
create = "CREATE TABLE notes (id INTEGER PRIMARY KEY, owner TEXT, title TEXT, body TEXT, pinned INTEGER NOT NULL DEFAULT 0 CHECK (pinned IN (0, 1)))"

[tables.tags]
create = "CREATE TABLE tags (id TEXT PRIMARY KEY, label TEXT, weight REAL, data BLOB)"

[tables.vals]
create = "CREATE TABLE vals (id INTEGER PRIMARY KEY, v, r REAL, t TEXT COLLATE NOCASE, b BLOB)"

[tables.orders]
create = "CREATE TABLE orders (id TEXT PRIMARY KEY, customer TEXT)"

[tables.items]
create = "CREATE TABLE items (id TEXT PRIMARY KEY, order_id TEXT REFERENCES orders(id) DEFERRABLE INITIALLY DEFERRED, sku TEXT)"

[tables.authors]
create = "CREATE TABLE authors (id TEXT PRIMARY KEY, name TEXT)"

[tables.books]
create = "CREATE TABLE books (id TEXT PRIMARY KEY, author_id TEXT NOT NULL REFERENCES authors(id) ON DELETE CASCADE, title TEXT)"

[tables.slots]
create = "CREATE TABLE slots (id TEXT PRIMARY KEY, pos INTEGER NOT NULL UNIQUE, label TEXT)"

[tables.counted]
create = """CREATE TABLE counted (id TEXT PRIMARY KEY, body TEXT, edits INTEGER NOT NULL DEFAULT 0);
CREATE TRIGGER count_edits AFTER UPDATE OF body ON counted BEGIN
  UPDATE counted SET edits = edits + 1 WHERE id = NEW.id;
END"""

[tables.cards]
create = "CREATE TABLE cards (id TEXT PRIMARY KEY, likes INTEGER NOT NULL DEFAULT 0, stock INTEGER NOT NULL DEFAULT 0, tags TEXT NOT NULL DEFAULT '[]', body TEXT NOT NULL DEFAULT '', price REAL)"
columns = { likes = "counter", stock = { merge = "counter", min = 0, max = 12 }, tags = "set", body = "text", price = "manual" }

[tables.keeps]
create = "CREATE TABLE keeps (id TEXT PRIMARY KEY, label TEXT, n INTEGER)"
on_delete = "update-wins"

[tables.tasks]
create = "CREATE TABLE tasks (id TEXT PRIMARY KEY, list TEXT NOT NULL, prio INTEGER, title TEXT)"

[streams.list_tasks]
table = "tasks"
where = "list = :list"

[streams.urgent]
table = "tasks"
where = "prio >= :min OR prio IS NULL"
"#;

/// Synced tables whose columns all merge last-writer-wins, and their primary
/// key column (always the first column), in a fixed order (`keeps`, added
/// with its shape, last). `cards` and `hearth_conflicts` are checked by
/// [`policies`].
const TABLES: [(&str, &str); 11] = [
    ("authors", "id"),
    ("books", "id"),
    ("counted", "id"),
    ("items", "id"),
    ("notes", "id"),
    ("orders", "id"),
    ("slots", "id"),
    ("tags", "id"),
    ("users", "id"),
    ("vals", "id"),
    ("keeps", "id"),
];
/// The tables the workloads before `keeps` read from.
const TABLES_FIRST: usize = 10;
const KEEPS: usize = 10;
const COUNTED: usize = 2;

/// The hostile device: it speaks the protocol directly, with no database and
/// no local checks, and sends some mutations the server must refuse.
const ROGUE_ID: u64 = 0x0BAD_C0DE;
/// The writer index the ledger uses for the hostile device.
const ROGUE: usize = usize::MAX;
const MINUTE_MS: i64 = 60_000;
const HOUR_MS: i64 = 60 * MINUTE_MS;
const DAY_MS: i64 = 24 * HOUR_MS;
/// The server lowers stamps further ahead of its clock than this.
const CLOCK_AHEAD_MAX_MS: u64 = 5 * 60 * 1000;
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
    /// Which of the [`SHAPES`] that showed engine bugs are generated: bit
    /// `i` for `SHAPES[i]`. [`SHAPES_DEFAULT`] has those whose bug is fixed.
    pub shapes: u32,
}

impl Options {
    pub fn new(seed: u64, steps: u64) -> Options {
        Options {
            seed,
            steps,
            verbose: false,
            shapes: SHAPES_DEFAULT,
        }
    }
}

/// Shapes that showed engine bugs, each behind a bit of [`Options::shapes`]
/// (`SIM_OPEN_BUGS=<mask>` adds bits): while a bug is open the default run
/// holds its shape back; once it is fixed the shape joins [`SHAPES_DEFAULT`].
/// A regression case runs the seed that found a bug with the bits it was
/// found with, which replays that run exactly.
/// - 0, fixed in 87c068e: capture took a real changed from `-0.0` to `0.0`
///   (or back) for no change, its trigger comparing with `IS NOT` (by
///   value): the writer kept its value, every other device the old one.
///   Shape: `-0.0` among the extreme values.
/// - 1, fixed (the device catches up before sending when the server has
///   processed a number it holds pending): a device restored from a copy that had pending mutations, and
///   then found rewound, sends those again under its new id even when the
///   server already applied them; a far-ahead clock's clamp then stamps the
///   copy later than writes other devices made after seeing the original,
///   and it overrides them. Shape: copies taken with pending mutations.
/// - 2, fixed in 87c068e: a device restored from a copy that wrote before it
///   reconnected reused the numbers of its lost tail, so its Hello passed;
///   the catch-up then carried the lost tail's entries under those numbers,
///   and the device took one whose effect was empty or touched the same rows
///   as the acknowledgement of its new write: told applied, the write was
///   lost. Shape: a restored device writes before it has caught up.
/// - 3, fixed (the limit is at least one past the latest merged stamp): the
///   clamp lowers a far-ahead stamp to the server's clock + 5
///   minutes, which can be at or below a stamp the server already gave a
///   write the device has seen (the same millisecond, or the server's clock
///   stepped back): a write made after seeing another then ties with it (the
///   client id decides) or loses to it. Shape: the server's clock jumps.
///
/// Workloads added later sit behind bits too, so that the seeds found
/// before them replay exactly with their old bits:
/// - 4: the merge policies of `cards` (counters, a bounded counter, a set,
///   text through SQL and the editor API, a manual column and its
///   resolutions), see [`policies`].
/// - 5: the update-wins table `keeps`.
/// - 6, fixed (the next number and the clock move only once the exec's
///   transaction commits; the server answers a number below its last that
///   it has no record of with `DEVICE_REWOUND`): an exec that failed when
///   its transaction committed (a deferred foreign key) still moved the
///   device's next sequence number in memory, not in its file; a copy of the
///   file taken then, once restored, numbered its next write with the
///   skipped number, which the server took for a duplicate and never
///   answered: the write was never applied and the device stayed pending for
///   ever. Shape: a device restored from a copy taken before a failed exec
///   and its next write.
/// - 7: selective sync: the `tasks` table through subscriptions.
/// - 8: the server's fan-out index: links pass over the entries it says
///   concern them not at all (`Link::skip_to`) instead of filtering them.
/// - 9: log compaction: a random prefix of the server's log removed, under
///   lagging and offline devices.
/// - 10: identity and permissions (see [`auth`]): half the seeds, chosen
///   from the seed alone (the other half replay as before), run under
///   `[auth]` with a user per device, shared lists whose membership rows
///   change at random, and read and write rules.
pub const SHAPES: [&str; 11] = [
    "-0.0 among the extreme values",
    "copies of a device's database taken with pending mutations",
    "a restored device writing before it has caught up",
    "the server's clock stepping back",
    "merge policies: counters, a bounded counter, a set, text, a manual column",
    "a table whose updates win over concurrent deletes",
    "a device restored from a copy taken before an exec that failed and its next write",
    "selective sync: subscriptions to streams of the tasks table, rows moving in and out",
    "the server's fan-out index: entries that concern a link not at all passed over",
    "log compaction under lagging and offline devices",
    "identity and permissions: a user per device, membership rows changing, read and write rules",
];
const BUG_NEGATIVE_ZERO: usize = 0;
const BUG_PENDING_APPLIED_TWICE: usize = 1;
const BUG_RESTORED_WRITE_TAKEN_AS_ACKED: usize = 2;
const BUG_CLAMP_BELOW_SEEN: usize = 3;
const SHAPE_POLICIES: usize = 4;
const SHAPE_UPDATE_WINS: usize = 5;
const BUG_SKIPPED_SEQ_REUSED: usize = 6;
const SHAPE_STREAMS: usize = 7;
const SHAPE_FANOUT: usize = 8;
const SHAPE_COMPACTION: usize = 9;
const SHAPE_AUTH: usize = 10;
/// The permissions shape's bit in [`Options::shapes`].
pub const SHAPE_AUTH_BIT: u32 = 1 << SHAPE_AUTH;
/// The shapes generated by default: every workload whose engine bug is
/// fixed.
pub const SHAPES_DEFAULT: u32 = 1 << BUG_NEGATIVE_ZERO
    | 1 << BUG_PENDING_APPLIED_TWICE
    | 1 << BUG_RESTORED_WRITE_TAKEN_AS_ACKED
    | 1 << BUG_CLAMP_BELOW_SEEN
    | 1 << SHAPE_POLICIES
    | 1 << SHAPE_UPDATE_WINS
    | 1 << BUG_SKIPPED_SEQ_REUSED
    | 1 << SHAPE_STREAMS
    | 1 << SHAPE_FANOUT
    | 1 << SHAPE_COMPACTION
    | 1 << SHAPE_AUTH;

#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub quiescent_points: u64,
    pub mutations: u64,
    pub applied: u64,
    pub refused: u64,
    pub duplicates: u64,
    pub device_crashes: u64,
    pub server_crashes: u64,
    /// Log compactions (a random prefix of the server's log removed).
    pub compactions: u64,
    pub drops: u64,
    pub partitions: u64,
    pub clock_jumps: u64,
    /// Mutations the server merged with a stamp below the device's.
    pub clamped: u64,
    pub restores: u64,
    pub rewinds: u64,
    /// Execs SQLite refused on the device (constraints, bad UTF-8).
    pub local_failures: u64,
    /// Mutations writing `cards` or `keeps`.
    pub policy_writes: u64,
    /// Counter changes the server refused (`BOUND`, `OVERFLOW`).
    pub counter_refusals: u64,
    /// Edits through `Client::edit_text`, resolutions through
    /// `Client::resolve`.
    pub text_edits: u64,
    pub resolutions: u64,
    /// Conflicts open at quiescent points (summed over them).
    pub open_conflicts: u64,
    /// Runs under `[auth]` (see [`auth`]).
    pub auth_runs: u64,
    /// Mutations the server refused `FORBIDDEN`.
    pub forbidden: u64,
    /// `Reload` frames sent (what a user may read changed).
    pub reloads: u64,
    /// Rows in frames checked against what their device's user could read.
    pub rows_checked: u64,
}

impl Stats {
    /// Adds another run's counts (for a total over many seeds).
    pub fn add(&mut self, o: &Stats) {
        self.quiescent_points += o.quiescent_points;
        self.mutations += o.mutations;
        self.applied += o.applied;
        self.refused += o.refused;
        self.duplicates += o.duplicates;
        self.device_crashes += o.device_crashes;
        self.server_crashes += o.server_crashes;
        self.drops += o.drops;
        self.partitions += o.partitions;
        self.clock_jumps += o.clock_jumps;
        self.clamped += o.clamped;
        self.restores += o.restores;
        self.rewinds += o.rewinds;
        self.local_failures += o.local_failures;
        self.policy_writes += o.policy_writes;
        self.counter_refusals += o.counter_refusals;
        self.text_edits += o.text_edits;
        self.resolutions += o.resolutions;
        self.open_conflicts += o.open_conflicts;
        self.compactions += o.compactions;
        self.auth_runs += o.auth_runs;
        self.forbidden += o.forbidden;
        self.reloads += o.reloads;
        self.rows_checked += o.rows_checked;
    }
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
    /// The server's side of the connection: the engine's rules, which the
    /// real server drives the same way.
    conn: ServerLink,
    /// The log position up to which this link filters every entry itself;
    /// past it, entries the world's fan-out leaves it out of are passed
    /// over (`skip_to`), as the real server does.
    full_until: u64,
    latency_max_ms: u64,
    up: VecDeque<(u64, Vec<u8>)>,
    down: VecDeque<(u64, Vec<u8>)>,
}

/// A copy of a device's database file, to restore it from later.
struct Snap {
    path: PathBuf,
    client_id: u64,
    next_seq: u64,
    pending: Vec<u64>,
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
    snapshot: Option<Snap>,
    /// How many times it was restored from an older copy.
    epoch: u32,
    /// In a single-writer run, only one device writes.
    writes: bool,
    /// Restored and not caught up with the server since.
    restored_unsynced: bool,
    /// An exec failed since its last mutation.
    failed_exec: bool,
    /// Under `[auth]`: the user it acts for.
    user: Option<std::sync::Arc<hearth_engine::rules::Principal>>,
}

/// The rows of every synced table: per table, key (its debug form) to row.
type Tables = Vec<BTreeMap<String, Vec<Value>>>;

/// What one exec really did to the device's tables, read from the tables.
#[derive(Clone, Debug, PartialEq)]
enum Did {
    /// Column `col` of row `pk` now holds `value` (a new row: every column).
    Cell {
        table: usize,
        pk: Value,
        col: usize,
        value: Value,
    },
    Deleted {
        table: usize,
        pk: Value,
    },
}

/// SQL a device runs, and what the simulator knows of it up front.
struct Work {
    sql: String,
    params: Vec<Value>,
    /// It stores TEXT that is not valid UTF-8: the exec must fail.
    must_fail: bool,
    /// It is one `UPDATE counted SET body` of this row.
    counted_update: Option<String>,
    /// What the failure's message must name when it must fail.
    fail_names: &'static str,
    /// Not SQL: the editor API or a resolution (`sql` describes it).
    call: policies::Call,
    /// Counter columns of `cards` this work must change by exactly this
    /// much on a row the device holds: (row id, column, delta).
    deltas: Vec<(String, usize, i64)>,
    /// It writes `cards` or `keeps`.
    policy: bool,
}

/// One mutation a device made, as the device made it.
#[derive(Clone, Debug)]
struct Made {
    device: usize,
    /// The write's identity; a renumbered copy keeps it.
    origin: u64,
    /// The device's restore count when it was made.
    epoch: u32,
    /// Lost with the tail of a restored device: the device no longer has it.
    lost: bool,
    /// The device's cursor when it was made: it had seen the log up to here.
    cursor: u64,
    /// Ledger tick when it was made.
    tick: u64,
    mutation: Mutation,
    /// How many more times the server may apply it: once per restore that
    /// brought it back as pending (a renumbered re-send after a rewind).
    copies_allowed: u32,
    /// What it did to the merge-policy columns of `cards`, read from the
    /// device's table before and after.
    policy: policies::Effect,
}

/// Everything that happened, as seen from outside the engine.
#[derive(Default)]
struct Ledger {
    /// Each mutation as the server first received it under its key.
    received: HashMap<Key, Mutation>,
    /// Mutations devices made (exec returned a sequence number), by the key
    /// the device now knows them under.
    made: BTreeMap<Key, Made>,
    /// Mutations a device no longer knows under that key: the lost tail of
    /// a restored device, or the old number of a renumbered mutation. The
    /// server may hold them; their device is not told.
    gone: HashMap<Key, Made>,
    /// `Event::Applied` and `Event::Rejected` as devices reported them (the
    /// refusal with the tick it was told at).
    applied_events: HashMap<Key, u64>,
    rejected_events: HashMap<Key, (String, u64)>,
    /// What the server refused.
    refused: HashMap<Key, String>,
    /// For each log position (server_seq - 1), the largest stamp up to it,
    /// and the server's clock when it was applied.
    log_hlc_max: Vec<Hlc>,
    log_now: Vec<u64>,
    /// Rows of `counted` (debug form) as their writer read them right after
    /// its write.
    counted_seen: HashSet<String>,
    /// The log entries compaction removed from the server, in order: the
    /// oracles read the whole history.
    compacted: Vec<LogEntry>,
    next_origin: u64,
    tick: u64,
}

pub struct World {
    rng: StdRng,
    verbose: bool,
    shapes: u32,
    now_ms: u64,
    /// Holds the database files; removed when the world is dropped.
    _dir: tempfile::TempDir,
    schema: Schema,
    /// Column names of each table in [`TABLES`].
    columns: Vec<Vec<String>>,
    server_path: PathBuf,
    server: ServerCore,
    devices: Vec<Device>,
    links: BTreeMap<u64, Link>,
    /// Which links each log entry concerns (the real server's index).
    fanout: Fanout<u64>,
    next_link: u64,
    rogue_link: Option<u64>,
    rogue_next_seq: u64,
    rogue_sent: Vec<Mutation>,
    /// One device writes, no hostile device: no mutation may be refused
    /// unless the writer's own lost tail explains it.
    solo: bool,
    /// The server's wall clock minus the true time.
    server_skew_ms: i64,
    /// A run under `[auth]` (see [`auth`]).
    auth: Option<auth::Auth>,
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
        name: "a caught-up device holds exactly the server's rows its subscriptions match",
        check: subscriptions_hold_exactly,
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
        name: "LWW outcomes follow the merged stamps",
        check: lww_follows_clocks,
    },
    Property {
        name: "a write is never overridden by one made before it (the device's own or one it had seen)",
        check: later_write_wins,
    },
    Property {
        name: "a cell one device alone wrote reads back byte-identical",
        check: sole_writer_reads_back,
    },
    Property {
        name: "the server refuses only what another device's write explains",
        check: refusals_explained,
    },
    Property {
        name: "an app trigger's effect is counted once",
        check: trigger_counted_once,
    },
    Property {
        name: "every write reaches the server once (after a restore too)",
        check: writes_reach_server_once,
    },
    Property {
        name: "a counter is its start plus the deltas the server applied, on every device, within its bounds",
        check: policies::counters_add_up,
    },
    Property {
        name: "a set is a replay of observed-remove, add-wins over the log",
        check: policies::sets_replay,
    },
    Property {
        name: "text is the same on every device and the server",
        check: policies::text_converges,
    },
    Property {
        name: "every open conflict is on every device once, between writes that had not seen each other",
        check: policies::conflicts_everywhere,
    },
    Property {
        name: "an update-wins table is a replay of its delete rule",
        check: policies::delete_rule_replay,
    },
    Property {
        name: "a device holds exactly the rows its user may read",
        check: auth::permissions_hold_exactly,
    },
];

fn sql_err(what: &str) -> impl Fn(rusqlite::Error) -> String + '_ {
    move |e| format!("{what}: {e}")
}

fn open_sqlite(path: &Path) -> Result<Connection, String> {
    let conn = Connection::open(path).map_err(sql_err("open"))?;
    // Crashes here are process crashes between engine calls, not power cuts:
    // no transaction is open then and the data handed to the OS survives, so
    // fsync and an on-disk journal only slow the simulation down.
    conn.execute_batch("PRAGMA synchronous = OFF; PRAGMA journal_mode = MEMORY")
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

/// A value as an SQL literal (what a device's SQL text would say).
fn quote(v: &Value) -> String {
    match v {
        Value::Null => "NULL".into(),
        Value::Integer(i) => i.to_string(),
        Value::Real(r) if r.is_nan() => "(9e999 - 9e999)".into(),
        Value::Real(r) if r.is_infinite() => {
            if *r > 0.0 {
                "9e999".into()
            } else {
                "-9e999".into()
            }
        }
        Value::Real(r) => format!("{r:?}"),
        Value::Text(s) => format!("'{}'", s.replace('\'', "''").replace('\0', "")),
        Value::Blob(b) => format!(
            "x'{}'",
            b.iter().map(|x| format!("{x:02x}")).collect::<String>()
        ),
    }
}

/// A key as the ledger's maps hold it.
fn pk_key(v: &Value) -> String {
    format!("{v:?}")
}

/// Every synced table's rows, read directly from a connection.
fn read_tables(conn: &Connection) -> Result<Tables, String> {
    let mut out = Vec::with_capacity(TABLES.len());
    for (table, _) in TABLES {
        let mut stmt = conn
            .prepare_cached(&format!("SELECT * FROM \"{table}\""))
            .map_err(sql_err("select"))?;
        let width = stmt.column_count();
        let rows = stmt
            .query_map([], |r| {
                (0..width)
                    .map(|i| r.get::<_, Value>(i))
                    .collect::<rusqlite::Result<Vec<_>>>()
            })
            .map_err(sql_err("select"))?;
        let mut map = BTreeMap::new();
        for row in rows {
            let row = row.map_err(sql_err("select"))?;
            map.insert(pk_key(&row[0]), row);
        }
        out.push(map);
    }
    Ok(out)
}

/// What changed between two readings of a device's tables.
fn diff_tables(before: &Tables, after: &Tables) -> Vec<Did> {
    let mut did = Vec::new();
    for (t, (b, a)) in before.iter().zip(after).enumerate() {
        for (k, row) in b {
            if !a.contains_key(k) {
                did.push(Did::Deleted {
                    table: t,
                    pk: row[0].clone(),
                });
            }
        }
        for (k, row) in a {
            let old = b.get(k);
            for (col, value) in row.iter().enumerate() {
                if old.is_none_or(|o| o[col] != *value) {
                    did.push(Did::Cell {
                        table: t,
                        pk: row[0].clone(),
                        col,
                        value: value.clone(),
                    });
                }
            }
        }
    }
    did
}

/// Decodes an outbox entry (the postcard form of a [`Mutation`]) through the
/// wire codec: a push frame is the version, the variant, a count, and then
/// the mutations in that same form.
fn decode_outbox(blob: &[u8]) -> Result<Mutation, String> {
    let empty = encode_client(&ClientMsg::Push { mutations: vec![] });
    let mut frame = empty[..empty.len() - 1].to_vec();
    frame.push(1);
    frame.extend_from_slice(blob);
    match decode_client(&frame, FRAME_BYTES_MAX) {
        Ok(ClientMsg::Push { mut mutations }) if mutations.len() == 1 => {
            Ok(mutations.pop().unwrap())
        }
        other => Err(format!("outbox entry does not decode: {other:?}")),
    }
}

fn short(msg: &ServerMsg) -> String {
    match msg {
        ServerMsg::Welcome { server_seq, .. } => format!("Welcome(head {server_seq})"),
        ServerMsg::Changes {
            entries,
            cursor,
            caught_up,
            ..
        } => {
            let seqs: Vec<String> = entries
                .iter()
                .map(|e| format!("{}={}#{}", e.server_seq, e.client_id, e.client_seq))
                .collect();
            format!(
                "Changes[{}] to {cursor}{}",
                seqs.join(" "),
                if *caught_up { " caught_up" } else { "" }
            )
        }
        ServerMsg::Rows {
            id,
            cursor,
            rows,
            done,
            ..
        } => format!(
            "Rows(sub {id} at {cursor}: {} rows{})",
            rows.len(),
            if *done { ", done" } else { "" }
        ),
        ServerMsg::SubscriptionRefused { id, code, .. } => {
            format!("SubscriptionRefused({id} {code})")
        }
        ServerMsg::Rejected {
            client_seq, code, ..
        } => format!("Rejected(#{client_seq} {code})"),
        ServerMsg::Error { code, .. } => format!("Error({code})"),
        ServerMsg::Reload { cursor, tables, .. } => format!("Reload({tables:?} at {cursor})"),
        ServerMsg::Presence { room, .. } => format!("Presence({room})"),
        ServerMsg::Relay { room, .. } => format!("Relay({room})"),
        ServerMsg::RoomRefused { room, code, .. } => format!("RoomRefused({room} {code})"),
        ServerMsg::Unsubscribed { id } => format!("Unsubscribed({id})"),
        ServerMsg::Acked {
            client_seq,
            server_seq,
            ..
        } => format!("Acked(#{client_seq} as {server_seq})"),
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
        ClientMsg::Subscribe(sub) => format!("Subscribe({} {} {:?})", sub.id, sub.stream, sub.load),
        ClientMsg::Unsubscribe { id } => format!("Unsubscribe({id})"),
        ClientMsg::Join { room, tab, .. } => format!("Join({room} {tab})"),
        ClientMsg::Leave { room, tab } => format!("Leave({room} {tab})"),
        ClientMsg::Broadcast { room, tab, .. } => format!("Broadcast({room} {tab})"),
        ClientMsg::Heartbeat => "Heartbeat".into(),
    }
}

impl World {
    pub fn new(opts: &Options) -> Result<World, String> {
        let (seed, verbose) = (opts.seed, opts.verbose);
        TRACE.with(|t| t.borrow_mut().clear());
        STEP.with(|s| s.set(0));
        let mut rng = StdRng::seed_from_u64(seed);
        // Chosen apart from the run's generator, so that the runs without
        // [auth] replay exactly as they did before the shape existed.
        let authed = opts.shapes & (1 << SHAPE_AUTH) != 0
            && StdRng::seed_from_u64(seed ^ 0x0A07_5EED_0A07_5EED).gen_bool(0.5);
        let dir = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
        let schema = if authed {
            Schema::parse(&auth::schema_text())
        } else {
            Schema::parse(SCHEMA)
        }
        .map_err(|e| format!("schema: {e}"))?;
        let server_path = dir.path().join("server.db");
        let server = ServerCore::open(open_sqlite(&server_path)?, schema.clone())
            .map_err(|e| format!("server: {e}"))?;
        let mut columns = Vec::new();
        for (table, _) in TABLES {
            let stmt = server
                .connection()
                .prepare(&format!("SELECT * FROM \"{table}\""))
                .map_err(sql_err("columns"))?;
            columns.push(stmt.column_names().map(String::from).collect());
        }
        let count = rng.gen_range(3..=8);
        // One run in six has a single writer and no hostile device: then the
        // server must accept everything SQLite accepted on the device.
        let solo = rng.gen_range(0..6) == 0;
        // Some devices share an exact skew so that equal clock readings, and
        // with them the client-id tie break, really happen; some run hours
        // or days ahead, so the server's clamp lowers their stamps.
        let skews: Vec<i64> = vec![
            0,
            0,
            rng.gen_range(-2 * MINUTE_MS..=2 * MINUTE_MS),
            rng.gen_range(2 * HOUR_MS..=3 * DAY_MS),
        ];
        let mut devices = Vec::with_capacity(count);
        for i in 0..count {
            let path = dir.path().join(format!("device{i}.db"));
            // Small ids collide in the tie break order with the hostile one.
            let client_id = 1 + i as u64 * 7 + rng.gen_range(0..7);
            let client = Client::open(open_sqlite(&path)?, client_id, ClientConfig::default())
                .map_err(|e| format!("device open: {e}"))?;
            let skew_ms = match rng.gen_range(0..8) {
                0..=2 => *skews.choose(&mut rng).unwrap(),
                3 => rng.gen_range(10 * MINUTE_MS..=3 * DAY_MS),
                4..=5 => rng.gen_range(-HOUR_MS..=HOUR_MS),
                _ => rng.gen_range(-2 * MINUTE_MS..=2 * MINUTE_MS),
            };
            devices.push(Device {
                name: format!("d{i}"),
                client_id,
                path,
                client,
                link: None,
                skew_ms,
                offline_until_ms: 0,
                snapshot: None,
                epoch: 0,
                writes: !solo || i == 0,
                restored_unsynced: false,
                failed_exec: false,
                user: None,
            });
        }
        let auth = if authed {
            let (users, of) = auth::pick_users(&mut rng, count);
            for (dev, u) in devices.iter_mut().zip(of) {
                dev.user = Some(auth::principal(users[u]));
            }
            Some(auth::Auth::new(users, server.connection())?)
        } else {
            None
        };
        let fanout = Fanout::new(std::sync::Arc::new(schema.clone()));
        let mut world = World {
            fanout,
            rng,
            verbose,
            shapes: opts.shapes,
            now_ms: START_MS,
            _dir: dir,
            schema,
            columns,
            server_path,
            server,
            devices,
            links: BTreeMap::new(),
            next_link: 1,
            rogue_link: None,
            rogue_next_seq: 1,
            rogue_sent: Vec::new(),
            solo,
            server_skew_ms: 0,
            auth,
            ledger: Ledger::default(),
            stats: Stats::default(),
        };
        let setup: Vec<String> = world
            .devices
            .iter()
            .map(|d| {
                let user = d.user.as_ref().map(|u| format!(" user {}", u.sub));
                format!(
                    "{}=client {} skew {}ms{}",
                    d.name,
                    d.client_id,
                    d.skew_ms,
                    user.unwrap_or_default()
                )
            })
            .collect();
        world.trace(format!(
            "seed {seed}: {count} devices{}{}: {}",
            if solo { " (one writer)" } else { "" },
            if authed { " under [auth]" } else { "" },
            setup.join(", ")
        ));
        if authed {
            world.stats.auth_runs = 1;
        }
        if world.open(SHAPE_POLICIES) {
            // The rows of `cards`, made once by the hostile device's id so
            // that every device writes rows that exist from the start.
            let setup = policies::setup_mutation();
            world.server_apply(&[(ROGUE_ID, setup)], &[0])?;
            world.rogue_next_seq = 2;
        }
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
            // In a single-writer run the writer writes as much as all do.
            0..=379 if self.solo => self.device_exec(0),
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
            895..=929 if !self.solo => self.rogue_push(),
            930..=949 => self.take_snapshot(d),
            950..=955 => self.restore_device(d),
            956..=958 => {
                self.server_clock_jump();
                Ok(())
            }
            959..=961 if self.open(SHAPE_COMPACTION) => self.compact_log(),
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

    fn send_down(&mut self, id: u64, msg: &ServerMsg) -> Result<(), String> {
        self.auth_frame(id, msg)?;
        let Some(link) = self.links.get(&id) else {
            return Ok(());
        };
        if !link.client_open || !link.server_open {
            return Ok(());
        }
        let (last, max) = (link.down.back().map(|m| m.0), link.latency_max_ms);
        let at = self.arrival(last, max);
        self.links
            .get_mut(&id)
            .unwrap()
            .down
            .push_back((at, encode_server(msg)));
        Ok(())
    }

    fn connect(&mut self, d: usize) {
        let id = self.next_link;
        self.next_link += 1;
        let latency_max_ms = [1, 5, 30, 200, 1000][self.rng.gen_range(0..5)];
        let conn = self.server_link();
        self.links.insert(
            id,
            Link {
                device: Some(d),
                client_open: true,
                server_open: true,
                hello: None,
                conn,
                full_until: 0,
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
                self.fanout.disconnect(&id);
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

    /// A new connection's server side, with small load chunks so that
    /// initial loads span many frames (and get cut by dropped links).
    fn server_link(&mut self) -> ServerLink {
        ServerLink::new(
            std::sync::Arc::new(self.schema.clone()),
            LinkConfig {
                load_rows_max: self.rng.gen_range(1..=7),
                ..LinkConfig::default()
            },
        )
    }

    fn server_receive(&mut self, id: u64, due: &[(u64, bool)]) -> Result<(), String> {
        let link = self.links.get_mut(&id).unwrap();
        let frame = link.up.pop_front().unwrap().1;
        let hello = link.hello;
        let msg = decode_client(&frame, FRAME_BYTES_MAX)
            .map_err(|e| format!("server got a bad frame: {e}"))?;
        self.retire_link(id);
        if hello.is_none() {
            let Some(link) = self.links.get_mut(&id) else {
                return Ok(());
            };
            let hello = match link.conn.on_hello(msg) {
                Ok(hello) => hello,
                Err(refused) => {
                    return Err(format!("the server refused a Hello: {refused:?}"));
                }
            };
            self.trace(format!(
                "server: link {id} Hello from {}, cursor {}",
                hello.client_id, hello.cursor
            ));
            let bound = self.auth_bind(id, &hello)?;
            let welcome = self
                .server
                .greet(&hello, FRAME_BYTES_MAX)
                .map_err(|e| format!("greet: {e}"))?;
            let refused = matches!(welcome, ServerMsg::Error { .. });
            if let (Some(digest), false) = (bound, refused) {
                self.auth_access(id, &hello, digest)?;
            }
            let head = self.server.head();
            let acks = if refused {
                Vec::new()
            } else {
                hearth_engine::server::missed_acks(self.server.connection(), &hello)
                    .map_err(|e| format!("missed_acks: {e}"))?
            };
            let mut msgs = self
                .links
                .get_mut(&id)
                .unwrap()
                .conn
                .on_welcome(welcome, head);
            // The acks compaction took from the log go right after the Welcome.
            msgs.splice(1..1, acks);
            for msg in &msgs {
                self.send_down(id, msg)?;
            }
            if refused {
                return Ok(());
            }
            if let Some(link) = self.links.get_mut(&id) {
                link.hello = Some(hello.client_id);
                link.full_until = head;
                self.fanout.connect(id, hello.client_id);
                let events = link.conn.take_sub_events();
                self.register(id, events);
            }
            return self.pump(id);
        }
        let origin = hello.expect("checked");
        let mutations = match self.steps(id, msg)? {
            Some(mutations) => mutations,
            None => return self.pump(id),
        };
        let mut streams: Vec<(u64, u64, VecDeque<Mutation>)> = vec![(id, origin, mutations.into())];
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
                let Ok(msg @ ClientMsg::Push { .. }) = decode_client(frame, FRAME_BYTES_MAX) else {
                    continue;
                };
                self.links.get_mut(&other).unwrap().up.pop_front();
                self.retire_link(other);
                if let Some(mutations) = self.steps(other, msg)? {
                    streams.push((other, client_id, mutations.into()));
                }
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
        self.server_apply(&batch, &origins)
    }

    /// A message after Hello, through the link's rules: what it sends goes
    /// down; the mutations it takes are returned for the store.
    fn steps(&mut self, id: u64, msg: ClientMsg) -> Result<Option<Vec<Mutation>>, String> {
        let Some(link) = self.links.get_mut(&id) else {
            return Ok(None);
        };
        let mut apply = None;
        let steps = link.conn.on_message(msg);
        let events = link.conn.take_sub_events();
        self.register(id, events);
        for step in steps {
            match step {
                Step::Send(msg) => self.send_down(id, &msg)?,
                Step::Apply(mutations) => apply = Some(mutations),
                Step::Close { code, message } => {
                    return Err(format!("the server closed link {id}: {code}: {message}"));
                }
            }
        }
        Ok(apply)
    }

    /// Files a link's new and dropped subscriptions in the fan-out; entries
    /// logged before it took one are filtered by the link itself.
    fn register(&mut self, id: u64, events: Vec<SubEvent>) {
        let head = self.server.head();
        for event in events {
            match event {
                SubEvent::Taken(sub) => {
                    self.fanout.subscribe(id, &sub);
                    if let Some(link) = self.links.get_mut(&id) {
                        link.full_until = link.full_until.max(head);
                    }
                }
                SubEvent::Dropped(sub) => self.fanout.unsubscribe(id, sub),
            }
        }
    }

    /// Lets a link send what it may now: initial-load chunks (read at once
    /// from the store) and log entries past its cursor, in reads of random
    /// size, as the real server reads them from its ring or its log.
    fn pump(&mut self, id: u64) -> Result<(), String> {
        loop {
            let head = self.server.head();
            let Some(link) = self.links.get_mut(&id) else {
                return Ok(());
            };
            if !link.server_open || link.hello.is_none() {
                return Ok(());
            }
            let msgs = if let Some(read) = link.conn.next_read() {
                let chunk =
                    hearth_engine::server::read_load(self.server.connection(), &self.schema, &read)
                        .map_err(|e| format!("read_load: {e}"))?;
                link.conn.on_read(chunk)
            } else if link.conn.wants_entries(head) {
                let n = self.rng.gen_range(1..=40);
                let cursor = link.conn.cursor();
                let entries = ServerCore::read_log(self.server.connection(), cursor, n)
                    .map_err(|e| format!("read_log: {e}"))?;
                if entries.first().is_none_or(|e| e.server_seq > cursor + 1) {
                    // Compaction passed this link: the server closes it.
                    self.drop_link(id, false, "LOG_COMPACTED");
                    return Ok(());
                }
                let link = self.links.get_mut(&id).unwrap();
                if self.shapes & (1 << SHAPE_FANOUT) == 0 || self.rng.gen_bool(0.25) {
                    link.conn.on_entries(&entries, head)
                } else {
                    // As the real server: runs of entries the fan-out leaves
                    // this link out of are passed over unread.
                    let mut msgs = Vec::new();
                    let mut i = 0;
                    while i < entries.len() {
                        let skip = |e: &LogEntry| {
                            e.server_seq > link.full_until
                                && match self.fanout.concerned(e) {
                                    Concerned::Everyone => false,
                                    Concerned::Only(conns) => !conns.contains(&id),
                                }
                        };
                        let skipping = skip(&entries[i]);
                        let mut j = i + 1;
                        while j < entries.len() && skip(&entries[j]) == skipping {
                            j += 1;
                        }
                        let run = &entries[i..j];
                        let last = run.last().expect("a run").server_seq;
                        if skipping {
                            let hlc = run.iter().map(|e| e.hlc).max().expect("a run");
                            msgs.extend(link.conn.skip_to(last, hlc, head));
                        } else {
                            msgs.extend(link.conn.on_entries(run, head));
                        }
                        if link.conn.cursor() < last {
                            // Stopped at a due chunk: the rest is read again.
                            break;
                        }
                        i = j;
                    }
                    msgs
                }
            } else {
                return Ok(());
            };
            for msg in &msgs {
                self.send_down(id, msg)?;
            }
        }
    }

    fn server_apply(&mut self, batch: &[(u64, Mutation)], origins: &[u64]) -> Result<(), String> {
        // A re-sent number with other content is a device that lost the end
        // of its history: the server must not take it for a duplicate.
        let mut reused = Vec::with_capacity(batch.len());
        for (client_id, m) in batch {
            let key = (*client_id, m.seq);
            reused.push(match self.ledger.received.get(&key) {
                Some(first) => first != m,
                None => {
                    self.ledger.received.insert(key, m.clone());
                    false
                }
            });
        }
        let users = self.auth_principals(batch, origins)?;
        self.server.set_now_ms(self.server_now_ms());
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
        self.auth_applied(batch, &outcomes, &users)?;
        let one_message = self.rng.gen_bool(0.5);
        for ((outcome, &origin), ((client_id, m), reused)) in outcomes
            .into_iter()
            .zip(origins)
            .zip(batch.iter().zip(reused))
        {
            let rewound =
                matches!(&outcome, Outcome::Rejected { code, .. } if code == "DEVICE_REWOUND");
            if reused && !rewound {
                return Err(format!(
                    "mutation {client_id}#{} came with other content than the one the server processed under that number, and the server answered {outcome:?}",
                    m.seq
                ));
            }
            if let Some(refusal) = outcome.refusal() {
                if let Some(link) = self.links.get_mut(&origin) {
                    let msg = match link.conn.on_refusal(refusal) {
                        Step::Send(msg) => msg,
                        Step::Close { code, message } => ServerMsg::Error { code, message },
                        Step::Apply(_) => unreachable!("a refusal applies nothing"),
                    };
                    self.send_down(origin, &msg)?;
                }
            }
            match outcome {
                Outcome::Applied(entry) => {
                    self.trace(format!(
                        "server: applied {}#{} as {} ({} changes, stamp {}.{})",
                        entry.client_id,
                        entry.client_seq,
                        entry.server_seq,
                        entry.changes.len(),
                        entry.hlc.wall_ms(),
                        entry.hlc.counter()
                    ));
                    self.stats.applied += 1;
                    if entry.hlc < m.hlc {
                        self.stats.clamped += 1;
                    }
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
                    self.ledger.log_now.push(self.server_now_ms());
                    // Entries go out at once (the whole committed batch,
                    // before the refusals that follow), or after the loop.
                    if !one_message {
                        self.broadcast()?;
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
                    if rewound {
                        // Neither applied nor refused: it comes back renumbered.
                        continue;
                    }
                    self.stats.refused += 1;
                    if code == "BOUND" || code == "OVERFLOW" {
                        self.stats.counter_refusals += 1;
                    }
                    self.ledger
                        .refused
                        .insert((client_id, client_seq), code.clone());
                }
                Outcome::Duplicate {
                    client_id,
                    client_seq,
                    rejection,
                    ..
                } => {
                    self.trace(format!(
                        "server: duplicate {client_id}#{client_seq} (refused before: {})",
                        rejection.is_some()
                    ));
                    self.stats.duplicates += 1;
                }
            }
        }
        self.broadcast()?;
        // The connection dies right after the server applied, before the
        // acknowledgement could leave.
        if self.rng.gen_bool(0.04) {
            let origin = origins[0];
            self.drop_link(origin, false, "after apply, before ack");
        }
        Ok(())
    }

    /// After a commit: every connected link sends what it may of the new
    /// entries.
    fn broadcast(&mut self) -> Result<(), String> {
        let mut live: Vec<u64> = self
            .links
            .iter()
            .filter(|(_, l)| l.hello.is_some())
            .map(|(id, _)| *id)
            .collect();
        live.sort_unstable();
        for id in live {
            self.pump(id)?;
        }
        Ok(())
    }

    /// Log compaction: a random prefix of the log goes, whoever lags. A
    /// device whose cursor it passes re-loads when it next connects; a link
    /// that reads past the floor is closed (`LOG_COMPACTED`).
    fn compact_log(&mut self) -> Result<(), String> {
        let head = self.server.head();
        let floor = hearth_engine::server::log_floor(self.server.connection())
            .map_err(|e| format!("log_floor: {e}"))?;
        if head <= floor {
            return Ok(());
        }
        let n = self.rng.gen_range(1..=head - floor);
        let gone = ServerCore::read_log(self.server.connection(), floor, n as usize)
            .map_err(|e| format!("read_log: {e}"))?;
        // Every entry is older than "now" at the end of time: position decides.
        let done = self
            .server
            .compact(u64::MAX >> 16, n)
            .map_err(|e| format!("compact: {e}"))?;
        if done.entries != gone.len() as u64 || done.floor != floor + n {
            return Err(format!(
                "compacting {n} entries after {floor} removed {} and left the floor at {}",
                done.entries, done.floor
            ));
        }
        self.trace(format!("server: log compacted up to {}", done.floor));
        self.stats.compactions += 1;
        self.ledger.compacted.extend(gone);
        Ok(())
    }

    /// The server's whole history: what compaction removed, then its log.
    pub(crate) fn whole_log(&self) -> Result<Vec<LogEntry>, String> {
        let mut log = self.ledger.compacted.clone();
        log.extend(read_whole_log(self.server.connection())?);
        Ok(log)
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
            let rows = read_tables(dev.client.connection()).unwrap_or_default();
            let pending = dev.client.pending_seqs().unwrap_or_default();
            format!(
                "{} failed to handle a server message: {e}\nmessage: {shown}\ndevice rows: {rows:?}\npending: {pending:?}",
                dev.name
            )
        })?;
        if out
            .events
            .iter()
            .any(|e| matches!(e, Event::CaughtUp { .. }))
        {
            self.devices[d].restored_unsynced = false;
        }
        if self.record_events(d, &out.events)? {
            // Rewound: the engine says this connection is over.
            if !out.send.is_empty() {
                return Err(format!(
                    "{} wants to send on a connection it was told is over",
                    self.devices[d].name
                ));
            }
            self.drop_link(id, false, "rewound");
            return Ok(());
        }
        // The device dies after handling the message but before its driver
        // wrote what the engine wanted to send.
        if may_crash && self.rng.gen_bool(0.01) {
            return self.crash_device(d);
        }
        self.send_up(id, out.send);
        Ok(())
    }

    /// Notes what a device was told; true when it found itself rewound.
    fn record_events(&mut self, d: usize, events: &[Event]) -> Result<bool, String> {
        let mut rewound = false;
        for event in events {
            let client_id = self.devices[d].client_id;
            let name = self.devices[d].name.clone();
            match event {
                Event::Applied { seq, server_seq } => {
                    if let Some(before) = self
                        .ledger
                        .applied_events
                        .insert((client_id, *seq), *server_seq)
                    {
                        return Err(format!(
                            "{name}: mutation #{seq} reported applied twice (as {before}, then {server_seq})"
                        ));
                    }
                }
                Event::Rejected { seq, code, .. } => {
                    self.trace(format!("{name}: mutation #{seq} rolled back ({code})"));
                    self.ledger.tick += 1;
                    if self
                        .ledger
                        .rejected_events
                        .insert((client_id, *seq), (code.clone(), self.ledger.tick))
                        .is_some()
                    {
                        return Err(format!("{name}: mutation #{seq} reported refused twice"));
                    }
                }
                Event::Rewound {
                    old_client_id,
                    new_client_id,
                    renumbered,
                    reason,
                } => {
                    self.trace(format!(
                        "{name} REWOUND: client {old_client_id} -> {new_client_id}, renumbered {renumbered:?}: {reason}"
                    ));
                    self.stats.rewinds += 1;
                    rewound = true;
                    if self.devices[d].epoch == 0 {
                        return Err(format!(
                            "{name} was told it is rewound, but it never lost any of its history: {reason}"
                        ));
                    }
                    if *old_client_id != client_id || *new_client_id == client_id {
                        return Err(format!(
                            "{name}: rewound from client {old_client_id} to {new_client_id}, but it was {client_id}"
                        ));
                    }
                    if self.devices.iter().any(|o| o.client_id == *new_client_id)
                        || *new_client_id == ROGUE_ID
                    {
                        return Err(format!(
                            "{name} took client id {new_client_id}, which another device has"
                        ));
                    }
                    self.devices[d].client_id = *new_client_id;
                    self.devices[d].snapshot = None;
                    let pending: BTreeSet<u64> = self
                        .ledger
                        .made
                        .range((client_id, 0)..=(client_id, u64::MAX))
                        .filter(|(k, _)| {
                            !self.ledger.applied_events.contains_key(k)
                                && !self.ledger.rejected_events.contains_key(k)
                        })
                        .map(|(k, _)| k.1)
                        .collect();
                    let moved: BTreeSet<u64> = renumbered.iter().map(|r| r.0).collect();
                    if pending != moved {
                        return Err(format!(
                            "{name}: its pending mutations were {pending:?} but it renumbered {moved:?}"
                        ));
                    }
                    for (old, new) in renumbered {
                        let mut m = self.ledger.made.remove(&(client_id, *old)).unwrap();
                        // The old number keeps a write the server may hold
                        // under it, unless a lost one already owns it.
                        self.ledger
                            .gone
                            .entry((client_id, *old))
                            .or_insert_with(|| m.clone());
                        m.mutation.seq = *new;
                        self.ledger.made.insert((*new_client_id, *new), m);
                    }
                }
                _ => {}
            }
        }
        Ok(rewound)
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
        // too, sometimes by hours or days (a wrong date), and back again.
        let new = match self.rng.gen_range(0..10) {
            0..=5 => self.rng.gen_range(-HOUR_MS..=old.max(-HOUR_MS)),
            6..=7 => self.rng.gen_range(old.min(HOUR_MS)..=HOUR_MS),
            8 => old + self.rng.gen_range(HOUR_MS..=2 * DAY_MS),
            _ => self.rng.gen_range(-HOUR_MS..=HOUR_MS),
        };
        self.devices[d].skew_ms = new;
        self.trace(format!(
            "{} clock jumps by {}ms",
            self.devices[d].name,
            new - old
        ));
    }

    /// The server's wall clock steps, mostly backwards (an NTP step or a
    /// restart on another host), by up to ten seconds.
    fn server_clock_jump(&mut self) {
        let by = self.rng.gen_range(-10_000..=2_000);
        if !self.open(BUG_CLAMP_BELOW_SEEN) {
            return; // Held back: see SHAPES.
        }
        self.server_skew_ms += by;
        self.trace(format!("server clock jumps by {by}ms"));
    }

    /// Whether `SHAPES[bug]` is generated.
    fn open(&self, bug: usize) -> bool {
        self.shapes & (1 << bug) != 0
    }

    /// The server's wall clock.
    fn server_now_ms(&self) -> u64 {
        (self.now_ms as i64 + self.server_skew_ms) as u64
    }

    fn device_read(&mut self, d: usize) -> Result<(), String> {
        let (table, pk) = *TABLES[..TABLES_FIRST].choose(&mut self.rng).unwrap();
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

    /// Copies the device's database file, as a backup or a synced folder
    /// would, to restore the device from later.
    fn take_snapshot(&mut self, d: usize) -> Result<(), String> {
        let dev = &self.devices[d];
        if dev.client.schema().is_none() {
            return Ok(());
        }
        if !self.open(BUG_PENDING_APPLIED_TWICE) && dev.client.status().pending > 0 {
            return Ok(());
        }
        if !self.open(BUG_SKIPPED_SEQ_REUSED) && dev.failed_exec {
            return Ok(()); // Held back: see SHAPES.
        }
        let path = dev.path.with_extension("copy");
        std::fs::copy(&dev.path, &path).map_err(|e| format!("copy: {e}"))?;
        let next_seq: i64 = dev
            .client
            .connection()
            .query_row(
                "SELECT coalesce((SELECT value FROM _hearth_meta WHERE key = 'next_seq'), 1)",
                [],
                |r| r.get(0),
            )
            .map_err(sql_err("next_seq"))?;
        let pending = dev
            .client
            .pending_seqs()
            .map_err(|e| format!("pending_seqs: {e}"))?;
        self.trace(format!(
            "{} database copied (client {}, next #{next_seq}, pending {pending:?})",
            dev.name, dev.client_id
        ));
        self.devices[d].snapshot = Some(Snap {
            path,
            client_id: dev.client_id,
            next_seq: next_seq as u64,
            pending,
        });
        Ok(())
    }

    /// Replaces the device's database with its older copy: the device lost
    /// the end of its history. Writes made after the copy are gone from the
    /// device (the server may hold those it received); the mutations pending
    /// in the copy come back and are sent again.
    fn restore_device(&mut self, d: usize) -> Result<(), String> {
        let Some(snap) = &self.devices[d].snapshot else {
            return Ok(());
        };
        if snap.client_id != self.devices[d].client_id {
            return Ok(());
        }
        let (snap_path, client_id, next_seq, pending) = (
            snap.path.clone(),
            snap.client_id,
            snap.next_seq,
            snap.pending.clone(),
        );
        self.stats.restores += 1;
        self.trace(format!(
            "{} RESTORED from its copy (client {client_id}, next #{next_seq}, pending {pending:?})",
            self.devices[d].name
        ));
        if let Some(id) = self.devices[d].link {
            let half = self.rng.gen_bool(0.5);
            self.drop_link(id, half, "device restored");
        }
        // Close the database, put the copy in its place, open it again.
        let placeholder = Client::open(
            Connection::open_in_memory().map_err(sql_err("open"))?,
            1,
            ClientConfig::default(),
        )
        .map_err(|e| format!("placeholder: {e}"))?;
        drop(std::mem::replace(&mut self.devices[d].client, placeholder));
        std::fs::copy(&snap_path, &self.devices[d].path).map_err(|e| format!("copy: {e}"))?;
        let conn = open_sqlite(&self.devices[d].path)?;
        self.devices[d].client = Client::open(conn, 999_999, ClientConfig::default())
            .map_err(|e| format!("device reopen: {e}"))?;
        self.devices[d].epoch += 1;
        self.devices[d].restored_unsynced = true;
        let dev = &self.devices[d];
        integrity(
            dev.client.connection(),
            &format!("{} after restore", dev.name),
        )?;
        let now_pending = dev
            .client
            .pending_seqs()
            .map_err(|e| format!("pending_seqs: {e}"))?;
        if dev.client.client_id() != client_id || now_pending != pending {
            return Err(format!(
                "{} restored as client {} with pending {now_pending:?}, its copy had {client_id} with {pending:?}",
                dev.name,
                dev.client.client_id()
            ));
        }
        // What the device made after the copy is its lost tail.
        let tail: Vec<Key> = self
            .ledger
            .made
            .range((client_id, next_seq)..=(client_id, u64::MAX))
            .map(|(k, _)| *k)
            .collect();
        for key in tail {
            // What it was told of them went with them; the numbers are free.
            self.ledger.applied_events.remove(&key);
            self.ledger.rejected_events.remove(&key);
            let mut m = self.ledger.made.remove(&key).unwrap();
            m.lost = true;
            // A key lost twice (restored from the same copy again) keeps the
            // write the server received under it, if it received one.
            let received = |g: &Made| {
                self.ledger
                    .received
                    .get(&key)
                    .is_some_and(|r| r.hlc == g.mutation.hlc && r.changes == g.mutation.changes)
            };
            if !self.ledger.gone.get(&key).is_some_and(received) {
                self.ledger.gone.insert(key, m);
            }
        }
        // What was pending in the copy is pending again: its fate is told
        // again, and a renumbered copy may reach the server once more.
        for seq in pending {
            let key = (client_id, seq);
            self.ledger.applied_events.remove(&key);
            self.ledger.rejected_events.remove(&key);
            if let Some(m) = self.ledger.made.get_mut(&key) {
                m.copies_allowed += 1;
            }
        }
        Ok(())
    }

    fn device_exec(&mut self, d: usize) -> Result<(), String> {
        if self.devices[d].client.schema().is_none() || !self.devices[d].writes {
            return Ok(()); // No schema until the first Welcome.
        }
        let policies = self.open(SHAPE_POLICIES) || self.open(SHAPE_UPDATE_WINS);
        let shared_lists = self.auth.is_some() && self.rng.gen_bool(0.35);
        let streams = !shared_lists && self.open(SHAPE_STREAMS) && self.rng.gen_bool(0.2);
        if streams && self.rng.gen_bool(0.3) {
            return self.change_subscriptions(d);
        }
        let work = if shared_lists {
            self.auth_work(d)
        } else if streams {
            self.tasks_work()
        } else if policies && self.rng.gen_bool(0.3) {
            self.policy_work(d)?
        } else {
            self.random_sql(d)?
        };
        if self.devices[d].restored_unsynced && !self.open(BUG_RESTORED_WRITE_TAKEN_AS_ACKED) {
            return Ok(()); // Held back: see SHAPES.
        }
        let now = self.wall_ms(d);
        let pending_before = self.devices[d].client.status().pending;
        let cursor = self.devices[d].client.status().server_seq;
        let before = read_tables(self.devices[d].client.connection())?;
        let cards_before = policies::read_cards(self.devices[d].client.connection())?;
        let client = &mut self.devices[d].client;
        let result = match &work.call {
            policies::Call::Exec => client.exec(&work.sql, &work.params, now),
            policies::Call::EditText { key, edits } => {
                client.edit_text("cards", key, "body", edits, now)
            }
            policies::Call::Resolve { id, value } => client.resolve(id, value, now),
        };
        let after = read_tables(self.devices[d].client.connection())?;
        let cards_after = policies::read_cards(self.devices[d].client.connection())?;
        let did = diff_tables(&before, &after);
        let effect = policies::effect(&cards_before, &cards_after)?;
        let name = self.devices[d].name.clone();
        let client_id = self.devices[d].client_id;
        let (sql, params) = (&work.sql, &work.params);
        match result {
            Ok((outcome, out)) => {
                if work.must_fail {
                    return Err(format!(
                        "{name}: exec stored a value it must refuse ({}) and succeeded: {sql}",
                        work.fail_names
                    ));
                }
                policies::check_deltas(&name, &work, &cards_before, &cards_after)?;
                let Some(seq) = outcome.mutation else {
                    if !did.is_empty() || cards_before != cards_after {
                        return Err(format!(
                            "{name}: exec changed synced rows but made no mutation: {sql} {params:?}\nchanged: {did:?}"
                        ));
                    }
                    self.trace(format!("{name} exec (no change): {sql}"));
                    return Ok(());
                };
                self.stats.mutations += 1;
                let (hlc, blob): (i64, Vec<u8>) = self.devices[d]
                    .client
                    .connection()
                    .query_row(
                        "SELECT hlc, mutation FROM _hearth_outbox WHERE seq = ?1",
                        [seq as i64],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .map_err(|e| {
                        format!(
                            "{name}: mutation #{seq} is not in its outbox right after exec: {e}"
                        )
                    })?;
                let hlc = Hlc(hlc as u64);
                let mutation = decode_outbox(&blob)?;
                self.trace(format!(
                    "{name} exec #{seq} hlc {}.{}: {sql} {params:?}",
                    hlc.wall_ms(),
                    hlc.counter()
                ));
                if mutation.seq != seq || mutation.hlc != hlc {
                    return Err(format!("{name}: outbox entry #{seq} holds {mutation:?}"));
                }
                self.check_captured(&name, &mutation, &did)?;
                // The app trigger ran once, on this device: one more edit.
                if let Some(id) = &work.counted_update {
                    let k = pk_key(&Value::Text(id.clone()));
                    if let (Some(b), Some(a)) = (before[COUNTED].get(&k), after[COUNTED].get(&k)) {
                        let want = match b[2] {
                            Value::Integer(n) => Value::Integer(n + 1),
                            _ => Value::Null,
                        };
                        if a[2] != want {
                            return Err(format!(
                                "{name}: one update of counted/{id} took edits from {:?} to {:?}",
                                b[2], a[2]
                            ));
                        }
                    }
                }
                for item in &did {
                    if let Did::Cell {
                        table: COUNTED, pk, ..
                    } = item
                    {
                        if let Some(row) = after[COUNTED].get(&pk_key(pk)) {
                            self.ledger.counted_seen.insert(format!("{row:?}"));
                        }
                    }
                }
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
                if let Some((&(_, prev_seq), prev)) = self
                    .ledger
                    .made
                    .range((client_id, 0)..(client_id, u64::MAX))
                    .next_back()
                {
                    if seq <= prev_seq || hlc <= prev.mutation.hlc {
                        return Err(format!(
                            "{name}: mutation #{seq} {hlc:?} does not follow #{prev_seq} {:?}",
                            prev.mutation.hlc
                        ));
                    }
                }
                self.ledger.next_origin += 1;
                self.ledger.tick += 1;
                // A device re-loading a table after compaction has not seen
                // what that load has yet to bring, whatever its cursor says.
                // A row it loaded (key up to the load's last) it has seen;
                // another row of a table whose rows constrain each other
                // (UNIQUE, foreign keys) may be one it has not.
                let reloading: Vec<(String, Load)> = self.devices[d]
                    .client
                    .connection()
                    .prepare("SELECT substr(stream, 2), load FROM _hearth_subscriptions WHERE stream LIKE '*%'")
                    .and_then(|mut stmt| {
                        stmt.query_map([], |r| {
                            let load: Vec<u8> = r.get(1)?;
                            Ok((r.get(0)?, postcard::from_bytes(&load).unwrap_or(Load::After(None))))
                        })?
                        .collect::<rusqlite::Result<Vec<_>>>()
                    })
                    .map_err(sql_err("reloading"))?;
                let unseen = mutation.changes.iter().any(|c| {
                    let row_unloaded = reloading.iter().any(|(t, load)| {
                        *t == c.table
                            && match load {
                                Load::Done => false,
                                Load::After(None) => true,
                                Load::After(Some(last)) => {
                                    !hearth_engine::link::key_le(&c.pk, last)
                                }
                            }
                    });
                    // Foreign-key partners, and the table itself when a
                    // UNIQUE column ties its rows together.
                    let mut constrained: Vec<&str> = related_tables(&c.table)
                        .into_iter()
                        .filter(|t| *t != c.table)
                        .collect();
                    if c.table == "users" || c.table == "slots" {
                        constrained.push(&c.table);
                    }
                    let cross_row = constrained
                        .iter()
                        .any(|t| reloading.iter().any(|(r, _)| r == t));
                    row_unloaded || cross_row
                });
                let made = Made {
                    device: d,
                    origin: self.ledger.next_origin,
                    epoch: self.devices[d].epoch,
                    lost: false,
                    cursor: if unseen { 0 } else { cursor },
                    tick: self.ledger.tick,
                    mutation,
                    copies_allowed: 0,
                    policy: effect,
                };
                if work.policy {
                    self.stats.policy_writes += 1;
                }
                match work.call {
                    policies::Call::EditText { .. } => self.stats.text_edits += 1,
                    policies::Call::Resolve { .. } => self.stats.resolutions += 1,
                    policies::Call::Exec => {}
                }
                self.ledger.made.insert((client_id, seq), made);
                self.devices[d].failed_exec = false;
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
                self.devices[d].failed_exec = true;
                if !self.open(BUG_SKIPPED_SEQ_REUSED) {
                    // Held back (see SHAPES): no copy from before the skipped
                    // number is restored, none is taken until the next write.
                    self.devices[d].snapshot = None;
                }
                self.stats.local_failures += 1;
                if e.code() != "SQL_ERROR" || !matches!(work.call, policies::Call::Exec) {
                    return Err(format!("{name}: exec failed with {e} ({})", e.code()));
                }
                if self.devices[d].client.status().pending != pending_before {
                    return Err(format!("{name}: a failed exec changed the outbox"));
                }
                if !did.is_empty() || cards_before != cards_after {
                    return Err(format!(
                        "{name}: a failed exec left changes behind: {sql}\n{did:?}"
                    ));
                }
                // (In a transaction another statement may fail first.)
                if work.must_fail && !sql.contains("; ") && !e.to_string().contains(work.fail_names)
                {
                    return Err(format!(
                        "{name}: a value that must be refused was refused without naming {:?}: {e}",
                        work.fail_names
                    ));
                }
            }
        }
        Ok(())
    }

    /// Every change the SQL made (read from the tables) is in the mutation,
    /// with the exact value: capture missed nothing, whatever the column's
    /// collation or affinity.
    fn check_captured(&self, name: &str, m: &Mutation, did: &[Did]) -> Result<(), String> {
        for item in did {
            let (table, pk) = match item {
                Did::Cell { table, pk, .. } | Did::Deleted { table, pk } => (*table, pk),
            };
            let tname = TABLES[table].0;
            let change = m.changes.iter().find(|c| c.table == tname && c.pk == *pk);
            let ok = match (item, change.map(|c| &c.op)) {
                (Did::Deleted { .. }, Some(RowOp::Delete)) => true,
                (Did::Cell { col: 0, .. }, Some(RowOp::Upsert { .. })) => true,
                (Did::Cell { col, value, .. }, Some(RowOp::Upsert { columns, .. })) => {
                    let cname = &self.columns[table][*col];
                    columns
                        .iter()
                        .any(|(c, op)| c == cname && *op == ColumnOp::Set(value.clone()))
                }
                _ => false,
            };
            if !ok {
                return Err(format!(
                    "{name}: the SQL made this change but the mutation does not carry it: {item:?}\nmutation: {m:?}"
                ));
            }
        }
        Ok(())
    }

    // ---- workloads --------------------------------------------------------

    /// Subscribes the device to a random stream of `tasks` (mostly), or
    /// drops one of its subscriptions.
    fn change_subscriptions(&mut self, d: usize) -> Result<(), String> {
        let name = self.devices[d].name.clone();
        let out = if self.rng.gen_bool(0.7) {
            let (stream, params) = if self.rng.gen_bool(0.7) {
                let list = self.pick(&["a", "b", "c", "d"]);
                ("list_tasks", serde_json::json!({ "list": list }))
            } else {
                let min = self.rng.gen_range(0..5);
                ("urgent", serde_json::json!({ "min": min }))
            };
            let schema = self.devices[d].client.schema().expect("checked").clone();
            let params = schema.streams[stream]
                .filter
                .params_from_json(&params)
                .map_err(|e| format!("{name}: params for {stream}: {e}"))?;
            let (id, out) = self.devices[d]
                .client
                .subscribe(stream, params.clone())
                .map_err(|e| format!("{name}: subscribe {stream}: {e}"))?;
            self.trace(format!("{name} subscribes to {stream} {params:?} as {id}"));
            out
        } else {
            let subs = self.devices[d]
                .client
                .subscriptions()
                .map_err(|e| format!("{name}: subscriptions: {e}"))?;
            let Some(sub) = subs.choose(&mut self.rng) else {
                return Ok(());
            };
            self.trace(format!(
                "{name} unsubscribes from {} {} ({})",
                sub.stream, sub.params, sub.id
            ));
            self.devices[d]
                .client
                .unsubscribe(sub.id)
                .map_err(|e| format!("{name}: unsubscribe: {e}"))?
        };
        if let Some(id) = self.devices[d].link {
            self.send_up(id, out.send);
        }
        Ok(())
    }

    /// A write to `tasks`: rows made, moved between lists, reprioritised
    /// (in and out of the urgent stream), retitled and deleted.
    fn tasks_work(&mut self) -> Work {
        let key = Value::Text(format!("k{}", self.rng.gen_range(0..12)));
        let list = Value::Text(self.pick(&["a", "b", "c", "d"]).to_string());
        let prio = match self.rng.gen_range(0..6) {
            5 => Value::Null,
            p => Value::Integer(p),
        };
        let title = Value::Text(format!("t{}", self.rng.gen_range(0..100)));
        let (sql, params) = match self.rng.gen_range(0..6) {
            0 | 1 => (
                "INSERT OR REPLACE INTO tasks (id, list, prio, title) VALUES (?1, ?2, ?3, ?4)",
                vec![key, list, prio, title],
            ),
            2 => ("UPDATE tasks SET list = ?2 WHERE id = ?1", vec![key, list]),
            3 => ("UPDATE tasks SET prio = ?2 WHERE id = ?1", vec![key, prio]),
            4 => (
                "UPDATE tasks SET title = ?2 WHERE list = ?1",
                vec![list, title],
            ),
            _ => ("DELETE FROM tasks WHERE id = ?1", vec![key]),
        };
        Work {
            sql: sql.into(),
            params,
            must_fail: false,
            counted_update: None,
            fail_names: "UTF-8",
            call: policies::Call::Exec,
            deltas: Vec::new(),
            policy: false,
        }
    }

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
        } else if self.rng.gen_bool(0.03) {
            i64::MAX
        } else {
            self.rng.gen_range(0..100)
        })
    }

    fn weight(&mut self) -> Value {
        match self.rng.gen_range(0..6) {
            0 => Value::Null,
            1 => Value::Integer(self.rng.gen_range(0..5)),
            2 => self.extreme(),
            _ => Value::Real(f64::from(self.rng.gen_range(-40..40)) / 8.0),
        }
    }

    fn blob(&mut self) -> Value {
        match self.rng.gen_range(0..5) {
            0 => Value::Null,
            1 => Value::Blob((0..=255).collect()),
            _ => Value::Blob(
                (0..self.rng.gen_range(0..5))
                    .map(|_| self.rng.gen())
                    .collect(),
            ),
        }
    }

    /// A value at an extreme of its storage class.
    fn extreme(&mut self) -> Value {
        match self.rng.gen_range(0..26) {
            0 => Value::Integer(i64::MIN),
            1 => Value::Integer(i64::MAX),
            2 => Value::Integer(0),
            3 => Value::Integer(-1),
            4 => Value::Integer(1 << 53 | 1),
            5 => Value::Real(f64::MAX),
            6 => Value::Real(f64::MIN),
            7 => Value::Real(f64::MIN_POSITIVE),
            8 => Value::Real(f64::from_bits(1)), // the smallest subnormal
            9 if self.open(BUG_NEGATIVE_ZERO) => Value::Real(-0.0),
            10 => Value::Real(0.0),
            11 => Value::Real(f64::INFINITY),
            12 => Value::Real(f64::NEG_INFINITY),
            13 => Value::Real(f64::NAN), // SQLite stores NULL
            14 => Value::Real(0.1),
            15 => Value::Real(9_007_199_254_740_993.0),
            16 => Value::Real(1.0),
            17 => Value::Text(String::new()),
            18 => Value::Text("Jés ✓ 日本語 🦀 \u{200d}".into()),
            19 => Value::Text("a\0b".into()),
            20 => Value::Text("1e3".into()),
            21 => Value::Text(" 42 ".into()),
            22 => Value::Blob(Vec::new()),
            23 => Value::Blob((0..=255).collect()),
            24 => Value::Blob(vec![0xff, 0xfe, 0x00]),
            _ => Value::Null,
        }
    }

    /// A word in several cases: NOCASE calls them equal, a user does not.
    fn cased(&mut self) -> Value {
        Value::Text(
            self.pick(&[
                "iphone", "iPhone", "IPHONE", "Straße", "STRAßE", "é", "É", "",
            ])
            .to_string(),
        )
    }

    fn order_id(&mut self) -> String {
        format!("O{}", self.rng.gen_range(0..4))
    }

    fn item_id(&mut self) -> String {
        format!("I{}", self.rng.gen_range(0..6))
    }

    fn author_id(&mut self) -> String {
        format!("A{}", self.rng.gen_range(0..3))
    }

    fn book_id(&mut self) -> String {
        format!("B{}", self.rng.gen_range(0..5))
    }

    fn val_id(&mut self) -> i64 {
        self.rng.gen_range(1..=6)
    }

    /// A statement of the newer shapes: extreme values, collations, foreign
    /// keys, TEXT that is not UTF-8 (true: SQLite stores it, Hearth must
    /// refuse the exec).
    fn shaped_statement(&mut self, d: usize) -> Result<(String, bool), String> {
        Ok(match self.rng.gen_range(0..16) {
            0 => {
                let id = self.val_id();
                let (v, r, t, b) = (
                    self.extreme(),
                    self.extreme(),
                    self.extreme(),
                    self.extreme(),
                );
                (
                    format!(
                        "INSERT OR REPLACE INTO vals (id, v, r, t, b) VALUES ({id}, {}, {}, {}, {})",
                        quote(&v),
                        quote(&r),
                        quote(&t),
                        quote(&b)
                    ),
                    false,
                )
            }
            1 => {
                let (id, t) = (self.val_id(), self.cased());
                (
                    format!("UPDATE vals SET t = {} WHERE id = {id}", quote(&t)),
                    false,
                )
            }
            2 => {
                let f = self.pick(&["upper", "lower"]);
                (
                    format!("UPDATE vals SET t = {f}(t) WHERE id = {}", self.val_id()),
                    false,
                )
            }
            3 => (
                format!("UPDATE vals SET v = v + 1 WHERE id = {}", self.val_id()),
                false,
            ),
            4 => {
                // TEXT that is not valid UTF-8, as a value or as a key.
                let bad = self.pick(&["4AC3A973FF41", "FF", "C0AF", "ED9FBF80", "E28228"]);
                let sql = match self.rng.gen_range(0..3) {
                    0 => format!(
                        "INSERT OR REPLACE INTO vals (id, t) VALUES ({}, CAST(X'{bad}' AS TEXT))",
                        self.val_id()
                    ),
                    1 => format!(
                        "INSERT OR REPLACE INTO vals (id, v) VALUES ({}, CAST(X'{bad}' AS TEXT))",
                        self.val_id()
                    ),
                    _ => format!(
                        "INSERT OR REPLACE INTO tags (id, label) VALUES (CAST(X'{bad}' AS TEXT), 'x')"
                    ),
                };
                (sql, true)
            }
            5 => {
                // A parent and its children in one transaction, either order.
                let (o, i1, i2) = (self.order_id(), self.item_id(), self.item_id());
                let parent = format!("INSERT OR IGNORE INTO orders VALUES ('{o}', 'c{d}')");
                let children = format!(
                    "INSERT OR REPLACE INTO items VALUES ('{i1}', '{o}', 's'); INSERT OR REPLACE INTO items VALUES ('{i2}', '{o}', 't')"
                );
                if self.rng.gen_bool(0.5) {
                    (format!("{parent}; {children}"), false)
                } else {
                    (format!("{children}; {parent}"), false)
                }
            }
            6 => (
                format!(
                    "INSERT OR REPLACE INTO items VALUES ('{}', '{}', 'x')",
                    self.item_id(),
                    self.order_id()
                ),
                false,
            ),
            7 => {
                let o = self.order_id();
                (
                    format!(
                        "DELETE FROM items WHERE order_id = '{o}'; DELETE FROM orders WHERE id = '{o}'"
                    ),
                    false,
                )
            }
            8 => (
                format!("DELETE FROM orders WHERE id = '{}'", self.order_id()),
                false,
            ),
            9 => (
                format!(
                    "UPDATE items SET order_id = '{}' WHERE id = '{}'",
                    self.order_id(),
                    self.item_id()
                ),
                false,
            ),
            10 => {
                let (a, b1, b2) = (self.author_id(), self.book_id(), self.book_id());
                (
                    format!(
                        "INSERT OR IGNORE INTO authors VALUES ('{a}', 'n{d}'); INSERT OR REPLACE INTO books VALUES ('{b1}', '{a}', 't'); INSERT OR REPLACE INTO books VALUES ('{b2}', '{a}', 'u')"
                    ),
                    false,
                )
            }
            11 => {
                let a = self.author_id();
                if self.rng.gen_bool(0.5) {
                    (format!("DELETE FROM authors WHERE id = '{a}'"), false) // cascades
                } else {
                    (
                        format!(
                            "DELETE FROM books WHERE author_id = '{a}'; DELETE FROM authors WHERE id = '{a}'"
                        ),
                        false,
                    )
                }
            }
            12 => (
                format!(
                    "INSERT OR REPLACE INTO books VALUES ('{}', '{}', 'v')",
                    self.book_id(),
                    self.author_id()
                ),
                false,
            ),
            _ => (self.slots_statement(d)?, false),
        })
    }

    /// UNIQUE positions handed between rows in one transaction, planned on
    /// the positions this device sees now.
    fn slots_statement(&mut self, d: usize) -> Result<String, String> {
        let mut slots: Vec<(String, i64)> = Vec::new();
        {
            let conn = self.devices[d].client.connection();
            let mut stmt = conn
                .prepare_cached("SELECT id, pos FROM slots ORDER BY pos")
                .map_err(sql_err("slots"))?;
            let rows = stmt
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .map_err(sql_err("slots"))?;
            for row in rows {
                slots.push(row.map_err(sql_err("slots"))?);
            }
        }
        let free_id = (0..5)
            .map(|i| format!("s{i}"))
            .find(|id| !slots.iter().any(|s| s.0 == *id));
        let set = |id: &str, pos: i64| format!("UPDATE slots SET pos = {pos} WHERE id = '{id}'");
        let roll = self.rng.gen_range(0..6);
        Ok(match roll {
            _ if slots.len() < 2 || (roll < 2 && free_id.is_some()) => {
                let id = free_id.unwrap_or_else(|| "s0".into());
                let pos = self.rng.gen_range(1..=6);
                format!("INSERT INTO slots VALUES ('{id}', {pos}, 'L{d}')")
            }
            0..=2 => {
                // A swap through a temporary value.
                let mut two: Vec<_> = slots.choose_multiple(&mut self.rng, 2).cloned().collect();
                let (b, a) = (two.pop().unwrap(), two.pop().unwrap());
                [set(&a.0, -1), set(&b.0, a.1), set(&a.0, b.1)].join("; ")
            }
            3 => {
                // Renumbering: everyone up one, the last first.
                let ups: Vec<String> = slots.iter().rev().map(|(id, p)| set(id, p + 1)).collect();
                ups.join("; ")
            }
            4 => {
                // Compacting to 1.., the first first (may pass through a
                // position another row still holds, then SQLite refuses).
                let downs: Vec<String> = slots
                    .iter()
                    .enumerate()
                    .map(|(i, (id, _))| set(id, i as i64 + 1))
                    .collect();
                downs.join("; ")
            }
            _ => {
                // A rotation of up to three through a temporary value.
                let n = slots.len().min(3);
                let mut some: Vec<_> = slots.choose_multiple(&mut self.rng, n).cloned().collect();
                some.sort();
                let mut sql = vec![set(&some[0].0, 0)];
                for i in 1..n {
                    sql.push(set(&some[i].0, some[i - 1].1));
                }
                sql.push(set(&some[0].0, some[n - 1].1));
                sql.join("; ")
            }
        })
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

    fn random_sql(&mut self, d: usize) -> Result<Work, String> {
        let plain = |sql: String, params: Vec<Value>| Work {
            sql,
            params,
            must_fail: false,
            counted_update: None,
            fail_names: "UTF-8",
            call: policies::Call::Exec,
            deltas: Vec::new(),
            policy: false,
        };
        Ok(match self.rng.gen_range(0..12) {
            // One statement with bound parameters.
            0 => {
                let (id, name) = (self.user_id(), self.text("p"));
                let name = if name == Value::Null {
                    Value::Text("anon".into())
                } else {
                    name
                };
                plain(
                    "UPDATE users SET name = ?1 WHERE id = ?2".into(),
                    vec![name, Value::Text(id)],
                )
            }
            1 => {
                let (id, label, weight) = (self.tag_id(), self.text("label"), self.weight());
                plain(
                    "INSERT INTO tags (id, label, weight) VALUES (?1, ?2, ?3) ON CONFLICT (id) DO UPDATE SET weight = excluded.weight".into(),
                    vec![Value::Text(id), label, weight],
                )
            }
            // Extreme values bound exactly (NaN, infinities, NUL in text).
            2 => {
                let id = Value::Integer(self.val_id());
                let vals = vec![
                    id,
                    self.extreme(),
                    self.extreme(),
                    self.extreme(),
                    self.extreme(),
                ];
                plain(
                    "INSERT OR REPLACE INTO vals (id, v, r, t, b) VALUES (?1, ?2, ?3, ?4, ?5)"
                        .into(),
                    vals,
                )
            }
            3 => {
                let vals = vec![
                    self.extreme(),
                    self.extreme(),
                    self.extreme(),
                    Value::Integer(self.val_id()),
                ];
                plain(
                    "UPDATE vals SET v = ?1, r = ?2, b = ?3 WHERE id = ?4".into(),
                    vals,
                )
            }
            // The table with an app trigger, one statement at a time.
            4 => {
                let id = match self.rng.gen_range(0..3) {
                    0 => format!("c{d}"),
                    n => format!("k{n}"),
                };
                let body = Value::Text(format!(
                    "{}-{}",
                    self.devices[d].name,
                    self.rng.gen::<u32>()
                ));
                match self.rng.gen_range(0..10) {
                    0..=2 => plain(
                        "INSERT OR IGNORE INTO counted (id, body) VALUES (?1, ?2)".into(),
                        vec![Value::Text(id), body],
                    ),
                    3 => plain(
                        "DELETE FROM counted WHERE id = ?1".into(),
                        vec![Value::Text(id)],
                    ),
                    _ => Work {
                        sql: "UPDATE counted SET body = ?1 WHERE id = ?2".into(),
                        params: vec![body, Value::Text(id.clone())],
                        must_fail: false,
                        counted_update: Some(id),
                        fail_names: "UTF-8",
                        call: policies::Call::Exec,
                        deltas: Vec::new(),
                        policy: false,
                    },
                }
            }
            // A multi-statement transaction: all of it or none of it.
            5..=6 => {
                let n = self.rng.gen_range(2..=4);
                let mut statements = Vec::new();
                let mut bad_text = Vec::new();
                for _ in 0..n {
                    if self.rng.gen_bool(0.5) {
                        match self.shaped_statement(d)? {
                            (sql, true) => bad_text.push(sql),
                            (sql, false) => statements.push(sql),
                        }
                    } else {
                        statements.push(self.random_statement());
                    }
                }
                // Bad TEXT last, so no later statement overwrites it.
                let must_fail = !bad_text.is_empty();
                statements.extend(bad_text);
                Work {
                    sql: statements.join("; "),
                    params: Vec::new(),
                    must_fail,
                    counted_update: None,
                    fail_names: "UTF-8",
                    call: policies::Call::Exec,
                    deltas: Vec::new(),
                    policy: false,
                }
            }
            7..=8 => {
                let (sql, must_fail) = self.shaped_statement(d)?;
                Work {
                    sql,
                    params: Vec::new(),
                    must_fail,
                    counted_update: None,
                    fail_names: "UTF-8",
                    call: policies::Call::Exec,
                    deltas: Vec::new(),
                    policy: false,
                }
            }
            _ => plain(self.random_statement(), Vec::new()),
        })
    }

    // ---- the hostile device ---------------------------------------------

    fn rogue_push(&mut self) -> Result<(), String> {
        let id = match self.rogue_link {
            Some(id) => id,
            None => {
                let id = self.next_link;
                self.next_link += 1;
                let conn = self.server_link();
                self.links.insert(
                    id,
                    Link {
                        device: None,
                        client_open: true,
                        server_open: true,
                        hello: None,
                        conn,
                        full_until: 0,
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
                    subscriptions: Vec::new(),
                    token: None,
                    reloaded: Default::default(),
                    first_pending: 0,
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
            if self.auth.is_some() && self.rng.gen_bool(0.5) {
                // Writes to the shared lists, some of them forged.
                changes = (0..self.rng.gen_range(1..=2))
                    .map(|_| self.auth_rogue_change(false))
                    .collect();
                if self.rng.gen_bool(0.5) {
                    changes.push(self.auth_rogue_change(true));
                }
                // One change per row: the server refuses a row written twice.
                let mut seen = HashSet::new();
                changes.retain(|c| seen.insert((c.table.clone(), pk_key(&c.pk))));
            }
            let skew = self.rng.gen_range(-HOUR_MS..=HOUR_MS);
            let hlc = Hlc::new((self.now_ms as i64 + skew) as u64, self.rng.gen_range(0..3));
            let m = Mutation {
                base: 0,
                also_seen: Vec::new(),
                seq: self.rogue_next_seq,
                hlc,
                changes,
                schema_version: 0,
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
            let loading = dev
                .client
                .subscriptions()
                .map_err(|e| format!("{}: subscriptions: {e}", dev.name))?
                .into_iter()
                .filter(|s| !s.loaded)
                .count();
            if !s.connected || !s.caught_up || s.pending != 0 || loading != 0 {
                stuck.push(format!("{}: {s:?}, {loading} loads under way", dev.name));
            }
        }
        if !stuck.is_empty() {
            return Err(format!(
                "the network is quiet but devices are not in sync: {}",
                stuck.join("; ")
            ));
        }
        self.stats.quiescent_points += 1;
        if self.auth.is_none() {
            self.stats.open_conflicts += self
                .server
                .connection()
                .query_row("SELECT count(*) FROM hearth_conflicts", [], |r| {
                    r.get::<_, i64>(0)
                })
                .map_err(sql_err("conflicts"))? as u64;
        }
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

/// Selective sync as a user sees it: at quiescence (nothing pending) each
/// device's `tasks` are exactly the server's rows that its subscriptions
/// match, value for value. The oracle is SQL on the server's store written
/// here from each subscription's parameters, not the engine's filter.
fn subscriptions_hold_exactly(w: &World) -> Result<(), String> {
    for (d, dev) in w.devices.iter().enumerate() {
        let subs = dev
            .client
            .subscriptions()
            .map_err(|e| format!("{}: subscriptions: {e}", dev.name))?;
        let mut conds = Vec::new();
        for sub in &subs {
            let cond = match sub.stream.as_str() {
                "list_tasks" => match &sub.params["list"] {
                    serde_json::Value::String(list) => format!("list = '{list}'"),
                    other => return Err(format!("list_tasks with list {other}")),
                },
                "urgent" => match sub.params["min"].as_i64() {
                    Some(min) => format!("(prio >= {min} OR prio IS NULL)"),
                    None => return Err(format!("urgent with min {}", sub.params["min"])),
                },
                other => return Err(format!("{}: unknown stream {other}", dev.name)),
            };
            conds.push(cond);
        }
        if conds.is_empty() {
            conds.push("0".into());
        }
        // Under [auth], only those its user may read.
        let readable = auth::tasks_readable(w, d).unwrap_or_else(|| "1".into());
        let sql = format!(
            "SELECT id, list, prio, title FROM tasks WHERE ({}) AND {readable} ORDER BY id",
            conds.join(" OR ")
        );
        let read = |conn: &Connection, sql: &str| -> Result<Vec<Vec<Value>>, String> {
            let mut stmt = conn.prepare(sql).map_err(sql_err("tasks"))?;
            let rows = stmt
                .query_map([], |r| (0..4).map(|i| r.get(i)).collect())
                .map_err(sql_err("tasks"))?
                .collect::<Result<Vec<Vec<Value>>, _>>()
                .map_err(sql_err("tasks"));
            rows
        };
        let want = read(w.server.connection(), &sql)?;
        let have = read(
            dev.client.connection(),
            "SELECT id, list, prio, title FROM tasks ORDER BY id",
        )?;
        if have != want {
            return Err(format!(
                "{} holds tasks {have:?}\nbut its subscriptions ({}) match on the server {want:?}",
                dev.name,
                subs.iter()
                    .map(|s| format!("{} {}", s.stream, s.params))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    }
    Ok(())
}

fn log_at_most_once(w: &World) -> Result<(), String> {
    let log = w.whole_log()?;
    let mut seen = BTreeSet::new();
    let mut last_stamp: HashMap<u64, Hlc> = HashMap::new();
    let mut merged_max = Hlc(0);
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
        // The merged stamp is the device's, lowered when it runs further
        // ahead than the server's clock plus the allowance (but never below
        // one past the latest stamp merged before it, so a write made after
        // seeing every other still wins), and raised only to keep the
        // device's writes in their order.
        let prev = last_stamp.get(&entry.client_id).copied().unwrap_or(Hlc(0));
        let floor = Hlc(prev.0 + 1);
        let now = w.ledger.log_now[i];
        let cap = Hlc::new(now + CLOCK_AHEAD_MAX_MS, u16::MAX).max(Hlc(merged_max.0 + 1));
        if entry.hlc < floor
            || entry.hlc > sent.hlc.max(floor)
            || (entry.hlc != floor && entry.hlc > cap)
        {
            return Err(format!(
                "log entry {} of client {} is stamped {:?}: the device said {:?}, its previous entry has {prev:?}, the server's clock was {now}",
                entry.server_seq, entry.client_id, entry.hlc, sent.hlc
            ));
        }
        last_stamp.insert(entry.client_id, entry.hlc);
        merged_max = merged_max.max(entry.hlc);
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
    Ok(w.whole_log()?
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
    // A lost tail or an old number: the server may hold it, at most once.
    for key in w.ledger.gone.keys() {
        if index.contains_key(key) && w.ledger.refused.contains_key(key) {
            return Err(format!("mutation {key:?} is both in the log and refused"));
        }
    }
    for key in w
        .ledger
        .applied_events
        .keys()
        .chain(w.ledger.rejected_events.keys())
    {
        if !w.ledger.made.contains_key(key) && !w.ledger.gone.contains_key(key) {
            return Err(format!(
                "a device was told about {key:?}, which it never made"
            ));
        }
    }
    Ok(())
}

fn refused_leave_no_trace(w: &World) -> Result<(), String> {
    let index = log_index(w)?;
    let log = w.whole_log()?;
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
/// with the largest merged stamp (the log entry's hlc, then client id) among
/// those that counted. This restates the implementation; the properties
/// after it state what a user expects instead.
fn lww_follows_clocks(w: &World) -> Result<(), String> {
    #[derive(Default)]
    struct RowModel {
        born: bool,
        deleted: bool,
        columns: BTreeMap<String, ((Hlc, u64), Value)>,
    }
    let mut model: BTreeMap<(String, String), (Value, RowModel)> = BTreeMap::new();
    for entry in w.whole_log()? {
        let m = &w.ledger.received[&(entry.client_id, entry.client_seq)];
        // The stamp the server merged with (lowered when the device's clock
        // ran far ahead, kept in the device's order).
        let stamp = (entry.hlc, entry.client_id);
        for c in &m.changes {
            let (_, row) = model
                .entry((c.table.clone(), format!("{:?}", c.pk)))
                .or_insert_with(|| (c.pk.clone(), RowModel::default()));
            match &c.op {
                RowOp::Evict => unreachable!("a device's mutation never evicts"),
                RowOp::Delete => row.deleted = true,
                RowOp::Upsert { insert, columns } => {
                    if *insert {
                        row.born = true;
                    }
                    if !row.born {
                        continue;
                    }
                    for (name, op) in columns {
                        let ColumnOp::Set(v) = op else { continue };
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
        if row.deleted || !row.born || !TABLES.iter().any(|(t, _)| t == table_name) {
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
        // A REAL column stores -0.0 as 0.0 (an integral real is kept as an
        // integer on disk).
        (Value::Real(a), Value::Real(b)) => a == b,
        // SQLite stores NaN as NULL.
        (Value::Null, Value::Real(r)) => r.is_nan(),
        // REAL affinity turns text that reads as a number into one.
        (Value::Real(r), Value::Text(t)) => t.trim().parse::<f64>().ok() == Some(*r),
        _ => stored == written,
    }
}

// ---- what a user expects ------------------------------------------------------

/// Who made an applied write, as far as a user can tell.
#[derive(Clone, Debug)]
struct Writer {
    /// Device index, or [`ROGUE`].
    device: usize,
    /// The write's identity (a renumbered copy keeps it; the hostile
    /// device's sequence number).
    origin: u64,
    epoch: u32,
    lost: bool,
    /// The device had seen the log up to here when it wrote.
    cursor: u64,
    /// The first log position holding it.
    pos: u64,
}

impl Writer {
    /// `self` happened before `other`: `other`'s device had seen it, or the
    /// same device wrote it earlier and still had it (not lost with a tail).
    fn before(&self, other: &Writer) -> bool {
        if self.pos <= other.cursor {
            return true;
        }
        self.device == other.device
            && self.origin < other.origin
            && (self.device == ROGUE || !self.lost || self.epoch == other.epoch)
    }

    /// Writes a user would call one writer's: same device, same history.
    fn same_hand(&self, other: &Writer) -> bool {
        self.device == other.device && self.device != ROGUE && !self.lost && !other.lost
    }
}

/// Every applied write to each cell of a row never deleted, in log order
/// (renumbered copies of one write count once, at their first position):
/// (table, key) -> column -> [(writer, value)].
type CellWrites = BTreeMap<(usize, String), BTreeMap<String, Vec<(Writer, Value)>>>;

/// The writer of each log entry (by position - 1), and the writes to cells.
fn applied_writes(w: &World) -> Result<(Vec<Writer>, CellWrites), String> {
    let log = w.whole_log()?;
    let mut writers = Vec::with_capacity(log.len());
    let mut cells: CellWrites = BTreeMap::new();
    let mut deleted: HashSet<(usize, String)> = HashSet::new();
    let mut origins_seen: HashSet<(usize, u64)> = HashSet::new();
    for entry in &log {
        let key = (entry.client_id, entry.client_seq);
        let m = &w.ledger.received[&key];
        let writer = match w.ledger.made.get(&key).or_else(|| w.ledger.gone.get(&key)) {
            Some(made) => Writer {
                device: made.device,
                origin: made.origin,
                epoch: made.epoch,
                lost: made.lost,
                cursor: made.cursor,
                pos: entry.server_seq,
            },
            None if entry.client_id == ROGUE_ID => Writer {
                device: ROGUE,
                origin: entry.client_seq,
                epoch: 0,
                lost: false,
                cursor: 0,
                pos: entry.server_seq,
            },
            None => {
                return Err(format!(
                    "log entry {} is {key:?}, which no device made",
                    entry.server_seq
                ))
            }
        };
        writers.push(writer.clone());
        if !origins_seen.insert((writer.device, writer.origin)) {
            continue; // A renumbered copy of a write already applied.
        }
        for c in &m.changes {
            let Some(t) = TABLES.iter().position(|(name, _)| *name == c.table) else {
                continue;
            };
            let row = (t, pk_key(&c.pk));
            match &c.op {
                RowOp::Evict => unreachable!("a device's mutation never evicts"),
                RowOp::Delete => {
                    deleted.insert(row);
                }
                RowOp::Upsert { columns, .. } => {
                    let slot = cells.entry(row).or_default();
                    for (name, op) in columns {
                        let ColumnOp::Set(v) = op else { continue };
                        slot.entry(name.clone())
                            .or_default()
                            .push((writer.clone(), v.clone()));
                    }
                }
            }
        }
    }
    cells.retain(|row, _| !deleted.contains(row));
    Ok((writers, cells))
}

/// Whether the value a cell holds is the value `writer` wrote (the hostile
/// device's raw values went through the column's affinity on the server).
fn holds(stored: &Value, writer: &Writer, wrote: &Value) -> bool {
    if writer.device == ROGUE {
        same_stored_value(stored, wrote)
    } else {
        stored == wrote
    }
}

/// (a) For every cell of a row that was never deleted, the value it ends
/// with is one some write left standing: a write no other write was made
/// after (by the same device, or by a device that had seen it). So a
/// device's later write is never overridden by its own earlier one, nor by a
/// write it had seen before making its own, whatever the clocks said.
fn later_write_wins(w: &World) -> Result<(), String> {
    let (_, cells) = applied_writes(w)?;
    let server = read_tables(w.server.connection())?;
    for ((t, k), columns) in &cells {
        let Some(row) = server[*t].get(k) else {
            continue;
        };
        for (name, writes) in columns {
            let col = w.columns[*t].iter().position(|c| c == name).unwrap();
            let stored = &row[col];
            let standing: Vec<&(Writer, Value)> = writes
                .iter()
                .filter(|(a, _)| {
                    !writes
                        .iter()
                        .any(|(b, _)| (b.origin, b.device) != (a.origin, a.device) && a.before(b))
                })
                .collect();
            if !standing.iter().any(|(a, v)| holds(stored, a, v)) {
                return Err(format!(
                    "{}/{k}.{name} holds {stored:?}, but the writes left standing wrote {:?}\nall writes, in log order: {writes:?}\nthe row in the log: {}",
                    TABLES[*t].0,
                    standing.iter().map(|(a, v)| (a.device, a.pos, v)).collect::<Vec<_>>(),
                    row_history(w, *t, k)?
                ));
            }
        }
    }
    Ok(())
}

/// Every log entry touching a row: position, client, merged stamp, effect.
fn row_history(w: &World, t: usize, k: &str) -> Result<String, String> {
    let mut out = String::new();
    for entry in w.whole_log()? {
        for c in &entry.changes {
            if c.table == TABLES[t].0 && pk_key(&c.pk) == k {
                let _ = write!(
                    out,
                    "\n  {} {}#{} {}.{} {:?}",
                    entry.server_seq,
                    entry.client_id,
                    entry.client_seq,
                    entry.hlc.wall_ms(),
                    entry.hlc.counter(),
                    c.op
                );
            }
        }
    }
    Ok(out)
}

/// (b) A cell only one device ever wrote (in one history) holds, on the
/// server and read back on that device, byte for byte what the device's own
/// newest write left there: same storage class, same bytes.
fn sole_writer_reads_back(w: &World) -> Result<(), String> {
    let (_, cells) = applied_writes(w)?;
    let server = read_tables(w.server.connection())?;
    for ((t, k), columns) in &cells {
        let Some(row) = server[*t].get(k) else {
            continue;
        };
        for (name, writes) in columns {
            let first = &writes[0].0;
            if !writes.iter().all(|(a, _)| a.same_hand(first)) {
                continue;
            }
            let (last, want) = writes.iter().max_by_key(|(a, _)| a.origin).unwrap();
            let col = w.columns[*t].iter().position(|c| c == name).unwrap();
            if row[col] != *want {
                return Err(format!(
                    "{}/{k}.{name}: {} alone wrote it, last {want:?}, but the server holds {:?}",
                    TABLES[*t].0, w.devices[last.device].name, row[col]
                ));
            }
            let conn = w.devices[last.device].client.connection();
            let read = |sql: &str, p: &Value| -> Result<(String, String), String> {
                conn.query_row(sql, [p], |r| Ok((r.get(0)?, r.get(1)?)))
                    .map_err(sql_err("read back"))
            };
            let got = read(
                &format!(
                    "SELECT typeof(\"{name}\"), hex(\"{name}\") FROM \"{}\" WHERE id = ?1",
                    TABLES[*t].0
                ),
                &row[0],
            )?;
            let expected = read("SELECT typeof(?1), hex(?1)", want)?;
            if got != expected {
                return Err(format!(
                    "{}/{k}.{name}: {} wrote {want:?} ({expected:?}) and reads back {got:?}",
                    TABLES[*t].0, w.devices[last.device].name
                ));
            }
        }
    }
    Ok(())
}

/// (c) A device sends only what SQLite accepted on it, so the server may
/// refuse a device's mutation only for a constraint, and only when something
/// the device had not seen explains it: a write of another device (or of
/// its own lost tail) to a table the mutation wrote or one a foreign key
/// ties to it, which the device had not seen when it wrote, or an earlier
/// mutation of its own refused after it wrote. In single-writer runs that
/// leaves only the lost tail.
fn refusals_explained(w: &World) -> Result<(), String> {
    let (writers, _) = applied_writes(w)?;
    let log_tables: Vec<BTreeSet<String>> = w
        .whole_log()?
        .iter()
        .map(|e| {
            w.ledger.received[&(e.client_id, e.client_seq)]
                .changes
                .iter()
                .map(|c| c.table.clone())
                .collect()
        })
        .collect();
    for (key, code) in &w.ledger.refused {
        let Some(m) = w.ledger.made.get(key).or_else(|| w.ledger.gone.get(key)) else {
            continue; // The hostile device.
        };
        if policies::counter_refusal(m, code) {
            continue; // Checked by the counter property.
        }
        if code == "TEXT_BASE" {
            if policies::text_base_explained(w, m) {
                continue;
            }
            return Err(format!(
                "{}'s mutation {key:?} was refused with TEXT_BASE, but no refused edit of that text explains it: {:?}",
                w.devices[m.device].name, m.mutation
            ));
        }
        if code == "FORBIDDEN" && w.auth.is_some() {
            // Only writes to the guarded tables (checked as they happen).
            continue;
        }
        if code != "CONSTRAINT" {
            return Err(format!(
                "{}'s mutation {key:?} was refused with {code}, but SQLite accepted it on the device",
                w.devices[m.device].name
            ));
        }
        let touched: BTreeSet<&str> = m
            .mutation
            .changes
            .iter()
            .flat_map(|c| related_tables(&c.table))
            .collect();
        let unseen_other = writers
            .iter()
            .zip(&log_tables)
            .enumerate()
            // Entries past the device's cursor: the ones it had not seen.
            .filter(|(i, _)| *i >= m.cursor as usize)
            .any(|(_, (o, tables))| {
                (o.device != m.device || (o.lost && o.epoch != m.epoch))
                    && tables.iter().any(|t| touched.contains(t.as_str()))
            });
        let own_refused_later = w.ledger.refused.keys().any(|k| {
            w.ledger
                .made
                .get(k)
                .or_else(|| w.ledger.gone.get(k))
                .is_some_and(|e| {
                    e.device == m.device
                        && e.tick < m.tick
                        && w.ledger
                            .rejected_events
                            .get(k)
                            .is_none_or(|(_, told)| *told > m.tick)
                })
        });
        if !unseen_other && !own_refused_later {
            return Err(format!(
                "{}'s mutation {key:?} was refused ({code}) though no write it had not seen explains it{}: {:?}",
                w.devices[m.device].name,
                if w.solo { " (single-writer run)" } else { "" },
                m.mutation
            ));
        }
    }
    Ok(())
}

/// A table and those a constraint ties it to (its foreign-key partners):
/// a write to one can make a write to another fail.
fn related_tables(table: &str) -> Vec<&'static str> {
    match table {
        "orders" | "items" => vec!["orders", "items"],
        "authors" | "books" => vec!["authors", "books"],
        _ => TABLES
            .iter()
            .map(|(t, _)| *t)
            .filter(|t| *t == table)
            .collect(),
    }
}

/// (d) The app trigger counts edits on the device that makes them, once:
/// every `counted` row the server holds is a row some device read back
/// right after its own write (a trigger run again anywhere would make a
/// count no device ever showed).
fn trigger_counted_once(w: &World) -> Result<(), String> {
    let server = read_tables(w.server.connection())?;
    for row in server[COUNTED].values() {
        if !w.ledger.counted_seen.contains(&format!("{row:?}")) {
            return Err(format!(
                "counted row {row:?} is on the server, but no device ever read it back after its write"
            ));
        }
    }
    Ok(())
}

/// (e) Each write reaches the server once: a device's mutation, under the
/// number it now has, is in the log with the content the device made, and
/// no other entry of that device carries the same content, except a copy a
/// restore brought back as pending (sent again under a new number). So
/// nothing written after a restore is lost or applied twice, and no old
/// entry is taken for it.
fn writes_reach_server_once(w: &World) -> Result<(), String> {
    let log = w.whole_log()?;
    let mut copies: HashMap<(usize, String), u32> = HashMap::new();
    for entry in &log {
        let key = (entry.client_id, entry.client_seq);
        let Some(m) = w.ledger.made.get(&key).or_else(|| w.ledger.gone.get(&key)) else {
            continue;
        };
        let sent = &w.ledger.received[&key];
        *copies
            .entry((m.device, format!("{:?}{:?}", sent.hlc, sent.changes)))
            .or_default() += 1;
    }
    let index = log_index(w)?;
    for (key, m) in &w.ledger.made {
        let content = format!("{:?}{:?}", m.mutation.hlc, m.mutation.changes);
        if index.contains_key(key) {
            let sent = &w.ledger.received[key];
            if sent.hlc != m.mutation.hlc || sent.changes != m.mutation.changes {
                return Err(format!(
                    "{}'s mutation {key:?} is acknowledged by a log entry of other content: made {:?}, the log holds {sent:?}",
                    w.devices[m.device].name, m.mutation
                ));
            }
        }
        let n = copies.get(&(m.device, content)).copied().unwrap_or(0);
        let want_min = u32::from(index.contains_key(key));
        if n < want_min || n > want_min + m.copies_allowed {
            return Err(format!(
                "{}'s mutation {key:?} (made in history {}) is in the log {n} times: {:?}",
                w.devices[m.device].name, m.epoch, m.mutation
            ));
        }
    }
    Ok(())
}
