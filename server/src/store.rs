//! The store thread: the one owner of the store's write connection.
//!
//! Connections send pushed mutations here through a queue bounded in bytes
//! (each command holds its share of `store_queue_bytes_max` until it is
//! answered). The thread takes what is queued and builds a batch **round
//! robin across connections** (one push from each in turn, up to the batch
//! limits), so one connection flooding cannot delay another's write by more
//! than a batch. It applies the batch in one transaction, commits, and only
//! then answers: refusals and a `Done` to the connection that sent them,
//! applied entries to every connection through the broadcast [`Ring`], in
//! `Changes` frames of at most `chunk_bytes_max` bytes of entries.
//! Committing many devices' mutations together is what makes ingest fast;
//! answering after the commit is what makes an ack mean "stored".

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use hearth_engine::fanout::{Concerned, Fanout};
use hearth_engine::link::SubEvent;
use hearth_engine::protocol::ServerMsg;
use hearth_engine::{LogEntry, Mutation, Outcome, Schema, ServerCore};
use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot, watch, Notify, OwnedSemaphorePermit, Semaphore};

use crate::{Metrics, ServerConfig, StartError, FRAME_OVERHEAD_BYTES};

/// One push frame's mutations from one connection.
pub(crate) struct ApplyCmd {
    /// Which connection sent it (the unit of round robin).
    pub conn_id: u64,
    pub client_id: u64,
    pub mutations: Vec<Mutation>,
    /// Bytes charged to the store queue and to the connection's in-flight
    /// budget; released when the command is answered.
    pub bytes: usize,
    pub _permit: OwnedSemaphorePermit,
    /// Where this connection's answers go. Unbounded in type, bounded in
    /// fact: each queued mutation yields at most one refusal, and each
    /// command one `Done`, and a connection has few mutations queued.
    pub reply: mpsc::UnboundedSender<Reply>,
    /// Who the device acts for (under `[auth]`): its write rules' `auth`.
    pub principal: Option<Arc<hearth_engine::rules::Principal>>,
}

pub(crate) enum StoreCmd {
    Apply(ApplyCmd),
    /// Binds a device's client id to its user (see
    /// `ServerCore::bind_device`): Ok, or Err(the user the id belongs to).
    Bind {
        client_id: u64,
        user: String,
        answer: oneshot::Sender<Result<Result<(), String>, String>>,
    },
    /// A small write, to learn whether the store can still write.
    Probe(oneshot::Sender<Result<(), String>>),
    /// Remove log entries past the retention (`log_retention_ms`).
    Compact,
}

/// The store's answers to one connection.
pub(crate) enum Reply {
    /// A refusal for the device (`Rejected`).
    Refused(ServerMsg),
    /// A command was processed: its mutations and bytes leave the
    /// connection's in-flight count.
    Done { mutations: usize, bytes: usize },
    /// The batch holding the connection's command could not be stored.
    Failed(String),
}

/// A run of log entries encoded once for every connection: the entries
/// `first..=last`, in one `Changes` frame.
pub(crate) struct Chunk {
    pub first: u64,
    pub last: u64,
    pub frame: Bytes,
    /// The entries themselves, with their row images, when some touch a
    /// streamed table (each connection then filters them).
    pub entries: Option<Vec<LogEntry>>,
    /// The latest stamp among the entries.
    pub hlc: hearth_engine::Hlc,
}

impl Chunk {
    /// What the chunk holds in memory, about: its frame, and its decoded
    /// entries counted at twice the frame.
    fn bytes(&self) -> usize {
        self.frame.len() * if self.entries.is_some() { 3 } else { 1 }
    }
}

/// The recent broadcast chunks, bounded in bytes and count. Connections look
/// up the chunk that starts right after what they sent; one that fell behind
/// further than the ring reads the log instead.
pub(crate) struct Ring {
    inner: Mutex<RingInner>,
    /// Which connections each entry concerns, and their mailboxes: a
    /// commit wakes only the connections it concerns (see
    /// [`hearth_engine::fanout`]). Locked around publishing and around
    /// (un)registering subscriptions, so that every entry after the head a
    /// registration saw is flagged with that registration in place.
    hub: Mutex<Hub>,
    head: watch::Sender<u64>,
    /// The latest stamp merged (`Welcome.hlc`), set before the head moves.
    max_hlc: std::sync::atomic::AtomicU64,
}

struct RingInner {
    chunks: VecDeque<Arc<Chunk>>,
    bytes: usize,
    bytes_max: usize,
}

const RING_CHUNKS_MAX: usize = 4_096;

/// Log entries one compaction transaction removes at most, and how many
/// such transactions one compaction runs.
const COMPACT_BATCH: u64 = 10_000;
const COMPACT_BATCHES_MAX: usize = 100;

/// Most ranges a mailbox keeps; past it, the connection filters everything
/// up to the last flagged entry itself.
const MAILBOX_RANGES_MAX: usize = 4_096;

struct Hub {
    fanout: Fanout<u64>,
    mailboxes: HashMap<u64, Arc<Mailbox>>,
}

/// Where a connection learns which published chunks concern it.
#[derive(Default)]
pub(crate) struct Mailbox {
    notify: Notify,
    inner: Mutex<Flags>,
}

/// Published chunks that concern a connection, as (first, last) log
/// positions in order; entries after the cursor that fall in none of them
/// concern it not at all, except those up to `full_until`, which it must
/// filter itself (published before its registration, or past an overflow).
#[derive(Default)]
pub(crate) struct Flags {
    pub ranges: VecDeque<(u64, u64)>,
    pub full_until: u64,
}

impl Mailbox {
    fn flag(&self, first: u64, last: u64) {
        let mut inner = self.inner.lock().expect("mailbox lock");
        if inner.ranges.back() == Some(&(first, last)) {
            return;
        }
        if inner.ranges.len() >= MAILBOX_RANGES_MAX {
            inner.ranges.clear();
            inner.full_until = inner.full_until.max(last);
        } else {
            inner.ranges.push_back((first, last));
        }
    }

    /// The flags since the last call (read the head before, so every entry
    /// up to it that concerns the connection is flagged).
    pub fn take(&self) -> Flags {
        std::mem::take(&mut *self.inner.lock().expect("mailbox lock"))
    }

    /// Until something published concerns the connection (or its cursor
    /// is due to be told).
    pub async fn wait(&self) {
        self.notify.notified().await
    }
}

impl Ring {
    /// The chunk whose first entry is `first`, if the ring still holds it.
    pub fn find(&self, first: u64) -> Option<Arc<Chunk>> {
        let inner = self.inner.lock().expect("ring lock");
        let i = inner.chunks.partition_point(|c| c.first < first);
        inner
            .chunks
            .get(i)
            .filter(|c| c.first == first)
            .map(Arc::clone)
    }

    /// The latest stamp merged as of the published head (at least).
    pub fn max_hlc(&self) -> hearth_engine::Hlc {
        hearth_engine::Hlc(self.max_hlc.load(Ordering::Acquire))
    }

    /// The newest committed (and published) log sequence number.
    pub fn head(&self) -> u64 {
        *self.head.borrow()
    }

    /// A connection of device `client_id` joins the fan-out: its mailbox,
    /// and the head as of now (entries up to it are not flagged).
    pub fn join(&self, conn: u64, client_id: u64) -> (Arc<Mailbox>, u64) {
        let mut hub = self.hub.lock().expect("hub lock");
        hub.fanout.connect(conn, client_id);
        let mailbox = Arc::new(Mailbox::default());
        hub.mailboxes.insert(conn, mailbox.clone());
        (mailbox, self.head())
    }

    /// A connection's link took or dropped subscriptions: the head as of
    /// now when it took some (entries up to it were flagged without them).
    pub fn subscriptions(&self, conn: u64, events: Vec<SubEvent>) -> Option<u64> {
        if events.is_empty() {
            return None;
        }
        let mut hub = self.hub.lock().expect("hub lock");
        let mut taken = false;
        for event in events {
            match event {
                SubEvent::Taken(sub) => {
                    taken = true;
                    hub.fanout.subscribe(conn, &sub);
                }
                SubEvent::Dropped(id) => hub.fanout.unsubscribe(conn, id),
            }
        }
        taken.then(|| self.head())
    }

    /// A connection gone.
    pub fn leave(&self, conn: u64) {
        let mut hub = self.hub.lock().expect("hub lock");
        hub.fanout.disconnect(&conn);
        hub.mailboxes.remove(&conn);
    }

    fn publish(&self, chunks: Vec<Chunk>, head: u64, max_hlc: hearth_engine::Hlc) {
        self.max_hlc.fetch_max(max_hlc.0, Ordering::AcqRel);
        let hub = self.hub.lock().expect("hub lock");
        let mut wake: HashMap<u64, Arc<Mailbox>> = HashMap::new();
        let mut everyone = false;
        for chunk in &chunks {
            let mut flag = |c: u64| {
                if let Some(mailbox) = hub.mailboxes.get(&c) {
                    mailbox.flag(chunk.first, chunk.last);
                    wake.entry(c).or_insert_with(|| mailbox.clone());
                }
            };
            let concerned = match &chunk.entries {
                None => Concerned::Everyone,
                Some(entries) => {
                    let mut only = Vec::new();
                    let mut all = false;
                    for entry in entries {
                        match hub.fanout.concerned(entry) {
                            Concerned::Everyone => {
                                all = true;
                                break;
                            }
                            Concerned::Only(conns) => only.extend(conns),
                        }
                    }
                    if all {
                        Concerned::Everyone
                    } else {
                        Concerned::Only(only)
                    }
                }
            };
            match concerned {
                Concerned::Everyone => {
                    everyone = true;
                    for mailbox in hub.mailboxes.values() {
                        mailbox.flag(chunk.first, chunk.last);
                    }
                }
                Concerned::Only(conns) => conns.into_iter().for_each(&mut flag),
            }
        }
        let old = self.head();
        {
            let mut inner = self.inner.lock().expect("ring lock");
            for chunk in chunks {
                inner.bytes += chunk.bytes();
                inner.chunks.push_back(Arc::new(chunk));
            }
            while inner.chunks.len() > 1
                && (inner.bytes > inner.bytes_max || inner.chunks.len() > RING_CHUNKS_MAX)
            {
                let old = inner.chunks.pop_front().expect("not empty");
                inner.bytes -= old.bytes();
            }
        }
        self.head.send_replace(head);
        // Every connection hears of the head at least every CURSOR_LAG_MAX
        // entries, so that it can tell its device how far it got.
        // The connections the entries concern first: a wake-up of every
        // connection to tell cursors must not delay their deliveries.
        for mailbox in wake.values() {
            mailbox.notify.notify_one();
        }
        let lag = hearth_engine::link::CURSOR_LAG_MAX;
        if everyone || head / lag != old / lag {
            for (c, mailbox) in &hub.mailboxes {
                if !wake.contains_key(c) {
                    mailbox.notify.notify_one();
                }
            }
        }
    }
}

/// What `/healthz` reports: the result of the store's last write, and
/// whether the last batch of devices' mutations failed.
#[derive(Default)]
struct Health {
    last: Mutex<Option<(Instant, Result<(), String>)>>,
    /// The error of the last batch, until a batch commits again. A probe's
    /// small write can still fit where a batch no longer does (a full disk
    /// with a few free pages), so its success does not clear this.
    failed_batch: Mutex<Option<String>>,
}

impl Health {
    fn record(&self, result: Result<(), String>) {
        *self.last.lock().expect("health lock") = Some((Instant::now(), result));
    }

    fn record_batch(&self, result: Result<(), String>) {
        *self.failed_batch.lock().expect("health lock") = result.clone().err();
        self.record(result);
    }

    /// The last write's result, when it is recent enough to speak for now;
    /// a failed batch speaks until a batch commits.
    fn recent(&self, within: Duration) -> Option<Result<(), String>> {
        if let Some(error) = &*self.failed_batch.lock().expect("health lock") {
            return Some(Err(format!(
                "the last batch of mutations could not be stored: {error}"
            )));
        }
        let last = self.last.lock().expect("health lock");
        match &*last {
            Some((at, result)) if at.elapsed() < within => Some(result.clone()),
            _ => None,
        }
    }
}

pub(crate) struct StoreHandle {
    pub commands: mpsc::Sender<StoreCmd>,
    /// `store_queue_bytes_max`: a push takes its bytes before it is decoded
    /// and gives them back when answered.
    pub budget: Arc<Semaphore>,
    pub ring: Arc<Ring>,
    /// A read-only connection for catch-up reads (WAL lets it read while
    /// the store thread writes).
    pub reader: Arc<Mutex<Connection>>,
    pub schema: Arc<Schema>,
    health: Arc<Health>,
}

/// A probe is skipped when a store write succeeded or failed this recently.
const HEALTH_FRESH: Duration = Duration::from_secs(1);
/// A store that does not answer a probe within this is reported failing.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Commands waiting to be taken by the store thread. The thread drains the
/// channel into per-connection queues at every batch; the byte budget is
/// the real bound.
const COMMAND_QUEUE: usize = 1_024;

impl StoreHandle {
    /// Asks the store to compact its log now and every `every_ms` after.
    pub fn spawn_compaction(&self, every_ms: u64, mut shutdown: watch::Receiver<bool>) {
        let commands = self.commands.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(every_ms.max(1)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        if commands.send(StoreCmd::Compact).await.is_err() {
                            return;
                        }
                    }
                    _ = async { let _ = shutdown.wait_for(|down| *down).await; } => return,
                }
            }
        });
    }

    /// Binds a device's client id to its user (under `[auth]`): Ok, or
    /// Err(the user the id belongs to); the outer error is a store failure.
    pub async fn bind(&self, client_id: u64, user: String) -> Result<Result<(), String>, String> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(StoreCmd::Bind {
                client_id,
                user,
                answer: tx,
            })
            .await
            .map_err(|_| "the store has stopped".to_string())?;
        rx.await.map_err(|_| "the store has stopped".to_string())?
    }

    /// Whether the store can write: its last write if recent, else a probe.
    pub async fn health(&self) -> Result<(), String> {
        if let Some(result) = self.health.recent(HEALTH_FRESH) {
            return result;
        }
        let (tx, rx) = oneshot::channel();
        let asked = tokio::time::timeout(PROBE_TIMEOUT, async {
            self.commands
                .send(StoreCmd::Probe(tx))
                .await
                .map_err(|_| "the store has stopped".to_string())?;
            rx.await.map_err(|_| "the store has stopped".to_string())?
        })
        .await;
        match asked {
            Ok(result) => result,
            Err(_) => Err(format!(
                "the store did not answer a write probe within {PROBE_TIMEOUT:?}"
            )),
        }
    }
}

fn open_connection(path: &std::path::Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    // WAL with synchronous=NORMAL keeps every committed transaction across a
    // killed process (the OS has the WAL pages); only a power loss can take
    // the last commits. The busy timeout covers the reader's checkpoints.
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA busy_timeout = 5000;",
    )?;
    Ok(conn)
}

/// What the store in `data_dir` would go through to reach `schema` (what
/// `hearth serve --check` prints): the schema version it is at now (None
/// without a store) and the steps, or the error that would stop `serve`.
/// Changes nothing: the steps are tried in a transaction that is rolled
/// back, and a missing store is not created.
pub fn check(
    data_dir: &std::path::Path,
    schema: &hearth_engine::Schema,
) -> Result<(Option<u64>, hearth_engine::migrate::Plan), StartError> {
    let path = data_dir.join("hearth.db");
    if !path.exists() {
        let fresh = Connection::open_in_memory()?;
        return Ok((None, ServerCore::check(&fresh, schema)?));
    }
    let conn = Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE)?;
    conn.execute_batch("PRAGMA busy_timeout = 5000")?;
    let version: Option<i64> = conn
        .query_row(
            "SELECT value FROM _hearth_meta WHERE key = 'schema_version'",
            [],
            |r| r.get(0),
        )
        .ok();
    let plan = ServerCore::check(&conn, schema)?;
    Ok((version.map(|v| v as u64), plan))
}

struct Limits {
    batch_mutations_max: usize,
    batch_bytes_max: usize,
    chunk_bytes_max: usize,
    frame_bytes_max: usize,
    log_entry_bytes_max: usize,
    log_retention_ms: Option<u64>,
}

pub(crate) fn open(
    config: &ServerConfig,
    metrics: Arc<Metrics>,
) -> Result<(StoreHandle, std::thread::JoinHandle<()>), StartError> {
    let path = config.data_dir.join("hearth.db");
    let mut core = ServerCore::open(open_connection(&path)?, config.schema.clone())?;
    for step in &core.migration().steps {
        tracing::info!(
            schema_version = config.schema.version,
            "schema change: {step}"
        );
    }
    core.set_entry_bytes_max(config.log_entry_bytes_max);
    for validator in &config.validators.0 {
        core.add_validator(validator.clone());
    }
    let reader = open_connection(&path)?;
    reader.execute_batch("PRAGMA query_only = ON;")?;
    metrics.server_seq.store(core.head(), Ordering::Relaxed);
    metrics.log_floor.store(
        hearth_engine::server::log_floor(core.connection())?,
        Ordering::Relaxed,
    );

    let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
    let (head, _) = watch::channel(core.head());
    let ring = Arc::new(Ring {
        inner: Mutex::new(RingInner {
            chunks: VecDeque::new(),
            bytes: 0,
            bytes_max: config.broadcast_bytes_max,
        }),
        hub: Mutex::new(Hub {
            fanout: Fanout::new(Arc::new(config.schema.clone())),
            mailboxes: HashMap::new(),
        }),
        head,
        max_hlc: std::sync::atomic::AtomicU64::new(core.max_hlc().0),
    });
    let health = Arc::new(Health::default());
    let handle = StoreHandle {
        commands: tx,
        budget: Arc::new(Semaphore::new(config.store_queue_bytes_max)),
        ring: ring.clone(),
        reader: Arc::new(Mutex::new(reader)),
        schema: Arc::new(config.schema.clone()),
        health: health.clone(),
    };
    let limits = Limits {
        batch_mutations_max: config.batch_mutations_max,
        batch_bytes_max: config.batch_bytes_max,
        chunk_bytes_max: config.chunk_bytes_max,
        frame_bytes_max: config.frame_bytes_max,
        log_entry_bytes_max: config.log_entry_bytes_max,
        log_retention_ms: config.log_retention_ms,
    };
    let thread = std::thread::Builder::new()
        .name("hearth-store".into())
        .spawn(move || {
            Store {
                core,
                ring,
                metrics,
                health,
                limits,
                queues: HashMap::new(),
                turns: VecDeque::new(),
            }
            .run(rx)
        })
        .expect("spawn store thread");
    Ok((handle, thread))
}

struct Store {
    core: ServerCore,
    ring: Arc<Ring>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    limits: Limits,
    /// Commands taken from the channel, per connection, in arrival order.
    queues: HashMap<u64, VecDeque<ApplyCmd>>,
    /// Connections with queued commands, in round-robin order.
    turns: VecDeque<u64>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Store {
    fn run(mut self, mut rx: mpsc::Receiver<StoreCmd>) {
        loop {
            if self.turns.is_empty() {
                match rx.blocking_recv() {
                    Some(cmd) => self.take(cmd),
                    None => return,
                }
            }
            while let Ok(cmd) = rx.try_recv() {
                self.take(cmd);
            }
            let cmds = self.next_batch();
            if !cmds.is_empty() {
                self.apply(cmds);
            }
        }
    }

    fn take(&mut self, cmd: StoreCmd) {
        match cmd {
            StoreCmd::Probe(answer) => {
                let result = self.probe();
                let _ = answer.send(result);
            }
            StoreCmd::Compact => self.compact(),
            StoreCmd::Bind {
                client_id,
                user,
                answer,
            } => {
                let conn = self.core.connection();
                let result = conn
                    .execute_batch("BEGIN IMMEDIATE")
                    .map_err(hearth_engine::ServerError::from)
                    .and_then(|()| self.core.bind_device(client_id, &user));
                let result = match result {
                    Ok(bound) => match self.core.connection().execute_batch("COMMIT") {
                        Ok(()) => Ok(bound),
                        Err(e) => Err(e.to_string()),
                    },
                    Err(e) => Err(e.to_string()),
                };
                if result.is_err() {
                    let _ = self.core.connection().execute_batch("ROLLBACK");
                    Metrics::add(&self.metrics.store_errors, 1);
                }
                let _ = answer.send(result);
            }
            StoreCmd::Apply(cmd) => {
                let queue = self.queues.entry(cmd.conn_id).or_default();
                if queue.is_empty() {
                    self.turns.push_back(cmd.conn_id);
                }
                queue.push_back(cmd);
            }
        }
    }

    /// One push from each connection in turn, until the batch is full.
    fn next_batch(&mut self) -> Vec<ApplyCmd> {
        let mut cmds = Vec::new();
        let (mut count, mut bytes) = (0, 0);
        while count < self.limits.batch_mutations_max && bytes < self.limits.batch_bytes_max {
            let Some(conn_id) = self.turns.pop_front() else {
                break;
            };
            let queue = self.queues.get_mut(&conn_id).expect("a turn has a queue");
            let cmd = queue.pop_front().expect("a turn has a command");
            if queue.is_empty() {
                self.queues.remove(&conn_id);
            } else {
                self.turns.push_back(conn_id);
            }
            count += cmd.mutations.len();
            bytes += cmd.bytes;
            cmds.push(cmd);
        }
        cmds
    }

    /// Removes the log entries merged before now minus the retention, in
    /// transactions of at most `COMPACT_BATCH` entries (writes wait between
    /// them no longer than one such transaction).
    fn compact(&mut self) {
        let Some(retention) = self.limits.log_retention_ms else {
            return;
        };
        let before = now_ms().saturating_sub(retention);
        let mut removed = 0;
        let mut floor = 0;
        for _ in 0..COMPACT_BATCHES_MAX {
            match self.core.compact(before, COMPACT_BATCH) {
                Ok(done) => {
                    removed += done.entries;
                    floor = done.floor;
                    // At once, for connections reading the log behind it.
                    self.metrics.log_floor.store(floor, Ordering::Relaxed);
                    if done.entries < COMPACT_BATCH {
                        break;
                    }
                }
                Err(e) => {
                    Metrics::add(&self.metrics.store_errors, 1);
                    tracing::error!(error = %e, "log compaction failed: {e}");
                    return;
                }
            }
        }
        if removed > 0 {
            Metrics::add(&self.metrics.log_compacted, removed);
            tracing::info!(
                removed,
                before_ms = before,
                floor,
                "log compaction removed {removed} entries merged before {before} ms; the log now starts after {floor}"
            );
        }
    }

    /// A small committed write, so `/healthz` knows the disk takes writes.
    fn probe(&mut self) -> Result<(), String> {
        let conn = self.core.connection();
        let result = (|| -> rusqlite::Result<()> {
            conn.execute_batch("BEGIN IMMEDIATE")?;
            let written = conn.execute(
                "INSERT INTO _hearth_meta (key, value) VALUES ('health_probe_ms', ?1)
                 ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                [now_ms() as i64],
            );
            match written.and_then(|_| conn.execute_batch("COMMIT")) {
                Ok(()) => Ok(()),
                Err(e) => {
                    let _ = conn.execute_batch("ROLLBACK");
                    Err(e)
                }
            }
        })()
        .map_err(|e| format!("write probe failed: {e}"));
        if result.is_err() {
            Metrics::add(&self.metrics.store_errors, 1);
        }
        self.health.record(result.clone());
        result
    }

    fn apply(&mut self, mut cmds: Vec<ApplyCmd>) {
        let counts: Vec<usize> = cmds.iter().map(|c| c.mutations.len()).collect();
        let count: usize = counts.iter().sum();
        let mut batch = Vec::with_capacity(count);
        let mut owner = Vec::with_capacity(count);
        for (i, cmd) in cmds.iter_mut().enumerate() {
            if let Some(who) = &cmd.principal {
                self.core.set_principal(cmd.client_id, who.clone());
            }
            for m in cmd.mutations.drain(..) {
                batch.push((cmd.client_id, m));
                owner.push(i);
            }
        }
        self.core.set_now_ms(now_ms());
        let started = Instant::now();
        let result = self.core.apply_batch(&batch);
        self.metrics.store_commit_seconds.observe(started.elapsed());
        // A failing validator refused its mutation with VALIDATOR_FAILED;
        // why it failed is for the operator, not the device.
        for failure in self.core.take_validator_failures() {
            tracing::error!(
                client_id = failure.client_id,
                client_seq = failure.client_seq,
                detail = %failure.detail,
                "validator failed on mutation {} of client {} (refused VALIDATOR_FAILED): {}",
                failure.client_seq,
                failure.client_id,
                failure.detail
            );
        }
        match result {
            Ok(outcomes) => {
                self.health.record_batch(Ok(()));
                let mut entries = Vec::new();
                for (i, outcome) in outcomes.into_iter().enumerate() {
                    let counter = match &outcome {
                        Outcome::Applied(_) => {
                            self.metrics.applied_to(&batch[i].1);
                            &self.metrics.mutations_applied
                        }
                        Outcome::Rejected { code, .. } => {
                            self.metrics.refused(code);
                            &self.metrics.mutations_rejected
                        }
                        Outcome::Duplicate { .. } => &self.metrics.mutations_duplicate,
                    };
                    Metrics::add(counter, 1);
                    if let Some(msg) = outcome.refusal() {
                        let _ = cmds[owner[i]].reply.send(Reply::Refused(msg));
                    } else if let Outcome::Applied(entry) = outcome {
                        entries.push(entry);
                    }
                }
                drop(batch);
                let head = self.core.head();
                // Publish before answering `Done`, so that a connection told
                // its mutations are done finds their entries in the ring.
                let chunks = self.chunk(entries);
                self.ring.publish(chunks, head, self.core.max_hlc());
                self.metrics.server_seq.store(head, Ordering::Relaxed);
            }
            Err(e) => {
                drop(batch);
                tracing::error!(
                    mutations = count,
                    error = %e,
                    "store error, batch of {count} mutations not applied: {e}"
                );
                Metrics::add(&self.metrics.store_errors, 1);
                self.health.record_batch(Err(e.to_string()));
                for cmd in &cmds {
                    let _ = cmd.reply.send(Reply::Failed(format!(
                        "the server could not store your changes ({e}); they stay pending"
                    )));
                }
            }
        }
        // Dropping each command gives its bytes back to the store queue.
        for (cmd, mutations) in cmds.into_iter().zip(counts) {
            let _ = cmd.reply.send(Reply::Done {
                mutations,
                bytes: cmd.bytes,
            });
        }
    }

    /// Splits a batch's entries into frames of at most `chunk_bytes_max`
    /// bytes of entries (an entry larger than that alone). Shared frames say
    /// `caught_up: false`: whether a device is caught up depends on how far
    /// behind it is, so each connection adds a small empty `caught_up`
    /// frame when it reaches the head.
    fn chunk(&self, entries: Vec<LogEntry>) -> Vec<Chunk> {
        let mut chunks = Vec::new();
        let mut run: Vec<LogEntry> = Vec::new();
        let mut run_bytes = 0;
        let total = entries.len();
        for (i, entry) in entries.into_iter().enumerate() {
            let size = postcard::experimental::serialized_size(&entry).expect("sizing an entry");
            assert!(
                size <= self.limits.log_entry_bytes_max,
                "log entry {} is {size} bytes, over log_entry_bytes_max {}: \
                 the mutation size check should have refused it",
                entry.server_seq,
                self.limits.log_entry_bytes_max
            );
            if !run.is_empty() && run_bytes + size > self.limits.chunk_bytes_max {
                chunks.push(self.encode(std::mem::take(&mut run)));
                run_bytes = 0;
            }
            run_bytes += size;
            run.push(entry);
            if i + 1 == total {
                chunks.push(self.encode(std::mem::take(&mut run)));
            }
        }
        chunks
    }

    fn encode(&self, entries: Vec<LogEntry>) -> Chunk {
        let first = entries.first().expect("a chunk has entries").server_seq;
        let last = entries.last().expect("a chunk has entries").server_seq;
        // Entries that touch streamed tables are filtered per connection
        // (see `hearth_engine::link`), which needs their row images; the
        // frame, encoded once, serves every connection they pass whole.
        let filtered = entries.iter().any(|e| !e.images.is_empty());
        let hlc = entries.iter().map(|e| e.hlc).max().unwrap_or_default();
        let msg = ServerMsg::Changes {
            entries,
            cursor: last,
            hlc,
            caught_up: false,
        };
        let frame = hearth_engine::protocol::encode_server(&msg);
        let ServerMsg::Changes { entries, .. } = msg else {
            unreachable!("built above")
        };
        let entries = filtered.then_some(entries);
        assert!(
            frame.len() <= self.limits.frame_bytes_max,
            "a broadcast frame of {} bytes exceeds frame_bytes_max {} (chunk limit + {FRAME_OVERHEAD_BYTES})",
            frame.len(),
            self.limits.frame_bytes_max
        );
        self.metrics.frame_built(frame.len());
        Chunk {
            first,
            last,
            frame: Bytes::from(frame),
            entries,
            hlc,
        }
    }
}
