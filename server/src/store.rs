//! The store thread: the one owner of the store's write connection.
//!
//! Connections send pushed mutations here through a bounded queue. The
//! thread takes everything queued (up to a batch limit), applies it in one
//! transaction, commits, and only then answers: refusals to the device that
//! sent them, applied entries to every connection through the broadcast.
//! Committing many devices' mutations together is what makes ingest fast;
//! answering after the commit is what makes an ack mean "stored".

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use hearth_engine::protocol::ServerMsg;
use hearth_engine::{LogEntry, Mutation, Outcome, Schema, ServerCore};
use rusqlite::Connection;
use tokio::sync::{broadcast, mpsc};

use crate::{Metrics, ServerConfig, StartError};

pub(crate) struct ApplyCmd {
    pub client_id: u64,
    pub mutations: Vec<Mutation>,
    /// Where refusals for this device go.
    pub reply: mpsc::UnboundedSender<ServerMsg>,
}

/// One committed batch as every connection receives it: the entries, and
/// the frame that carries them, encoded once for all connections.
pub(crate) struct Broadcast {
    pub entries: Vec<LogEntry>,
    pub frame: Vec<u8>,
}

pub(crate) struct StoreHandle {
    pub commands: mpsc::Sender<ApplyCmd>,
    pub changes: broadcast::Sender<Arc<Broadcast>>,
    /// A read-only connection for catch-up reads (WAL lets it read while
    /// the store thread writes).
    pub reader: Arc<Mutex<Connection>>,
    pub schema: Schema,
}

const COMMAND_QUEUE: usize = 1_024;
const BROADCAST_RING: usize = 1_024;

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

pub(crate) fn open(
    config: &ServerConfig,
    metrics: Arc<Metrics>,
) -> Result<(StoreHandle, std::thread::JoinHandle<()>), StartError> {
    let path = config.data_dir.join("hearth.db");
    let core = ServerCore::open(open_connection(&path)?, config.schema.clone())?;
    let reader = open_connection(&path)?;
    reader.execute_batch("PRAGMA query_only = ON;")?;
    metrics.server_seq.store(core.head(), Ordering::Relaxed);

    let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
    let (changes, _) = broadcast::channel(BROADCAST_RING);
    let handle = StoreHandle {
        commands: tx,
        changes: changes.clone(),
        reader: Arc::new(Mutex::new(reader)),
        schema: config.schema.clone(),
    };
    let batch_max = config.batch_mutations_max;
    let thread = std::thread::Builder::new()
        .name("hearth-store".into())
        .spawn(move || run(core, rx, changes, metrics, batch_max))
        .expect("spawn store thread");
    Ok((handle, thread))
}

fn run(
    mut core: ServerCore,
    mut rx: mpsc::Receiver<ApplyCmd>,
    changes: broadcast::Sender<Arc<Broadcast>>,
    metrics: Arc<Metrics>,
    batch_max: usize,
) {
    while let Some(first) = rx.blocking_recv() {
        let mut cmds = vec![first];
        let mut count = cmds[0].mutations.len();
        while count < batch_max {
            match rx.try_recv() {
                Ok(cmd) => {
                    count += cmd.mutations.len();
                    cmds.push(cmd);
                }
                Err(_) => break,
            }
        }
        let mut batch = Vec::with_capacity(count);
        let mut owner = Vec::with_capacity(count);
        for (i, cmd) in cmds.iter_mut().enumerate() {
            for m in cmd.mutations.drain(..) {
                batch.push((cmd.client_id, m));
                owner.push(i);
            }
        }
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        core.set_now_ms(now_ms);
        match core.apply_batch(&batch) {
            Ok(outcomes) => {
                let mut entries = Vec::new();
                for (i, outcome) in outcomes.into_iter().enumerate() {
                    let reply = &cmds[owner[i]].reply;
                    let counter = match &outcome {
                        Outcome::Applied(_) => &metrics.mutations_applied,
                        Outcome::Rejected { .. } => &metrics.mutations_rejected,
                        Outcome::Duplicate { .. } => &metrics.mutations_duplicate,
                    };
                    Metrics::add(counter, 1);
                    if let Some(msg) = outcome.refusal() {
                        let _ = reply.send(msg);
                    } else if let Outcome::Applied(entry) = outcome {
                        entries.push(entry);
                    }
                }
                metrics.server_seq.store(core.head(), Ordering::Relaxed);
                if !entries.is_empty() {
                    // No receivers (no device connected) is fine: the log has it.
                    let msg = ServerMsg::Changes {
                        entries,
                        caught_up: true,
                    };
                    let frame = hearth_engine::protocol::encode_server(&msg);
                    let ServerMsg::Changes { entries, .. } = msg else {
                        unreachable!()
                    };
                    let _ = changes.send(Arc::new(Broadcast { entries, frame }));
                }
            }
            Err(e) => {
                eprintln!(
                    "hearth: store error, batch of {} mutations not applied: {e}",
                    batch.len()
                );
                for cmd in &cmds {
                    let _ = cmd.reply.send(ServerMsg::Error {
                        code: "STORE".into(),
                        message: format!(
                            "the server could not store your changes ({e}); they stay pending"
                        ),
                    });
                }
            }
        }
    }
}
