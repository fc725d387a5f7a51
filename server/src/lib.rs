//! # hearth-server
//!
//! The sync server: an axum app with the WebSocket endpoint `/sync`,
//! `/healthz`, `/metrics` (Prometheus text) and the web assets, over an
//! embedded SQLite store driven by the engine's [`ServerCore`].
//!
//! Layout:
//! - `store`: one thread owns the store's write connection and applies
//!   pushed mutations in batches (group commit), then acks and broadcasts.
//! - `connection`: one task per WebSocket: handshake, catch-up from the
//!   device's cursor, then live changes, pushes and replies.
//! - `metrics`: counters behind `/metrics`.
//! - `rooms`: the one room registry (presence and broadcast, ephemeral:
//!   never in the store) and each connection's queue of room frames.
//!
//! - `builder`: [`Server::builder`], the library's front door (a schema, a
//!   data directory, an address, validators), ending in [`start`].
//! - `lib.rs` (here): the limits ([`ServerConfig`]), the accept loop (a
//!   connection cap, a timeout on the request head), `/healthz`.
//!
//! As a library:
//!
//! ```no_run
//! # async fn run(schema: hearth_engine::Schema) -> Result<(), hearth_server::StartError> {
//! use hearth_server::{Refuse, Server};
//! let running = Server::builder()
//!     .schema(schema)
//!     .data_dir("hearth-data")
//!     .listen("127.0.0.1:8787".parse().unwrap())
//!     .validate(|ctx, mutation| {
//!         for todo in mutation.changes_to("todos") {
//!             let n = ctx.query_i64("SELECT count(*) FROM todos", &[])?;
//!             if n > 10_000 {
//!                 return Err(Refuse::new("TOO_MANY_TODOS", format!("{:?} is one too many", todo.key())));
//!             }
//!         }
//!         Ok(())
//!     })
//!     .start()
//!     .await?;
//! running.wait().await;
//! # Ok(())
//! # }
//! ```
//!
//! Every queue is bounded in bytes: the store's command queue (a full queue
//! makes connections wait, which pushes back on devices), each connection's
//! in-flight mutations and send queue, the broadcast ring (a device that
//! falls behind re-reads the log from its cursor, nothing is dropped), the
//! catch-up reads, and the frame size.

pub mod auth;
mod builder;
mod connection;
mod metrics;
mod rooms;
mod store;
pub mod web;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use hearth_engine::{Schema, ServerError};

pub use builder::{Server, ServerBuilder};
pub use connection::{send_fragmented, FRAGMENT_BYTES};
pub use hearth_engine::validate::{
    Change, Context, MutationView, Op, QueryError, Refuse, Validator, CODE_BYTES_MAX,
    REASON_BYTES_MAX, VALIDATOR_FAILED,
};
pub use metrics::{CloseReason, Metrics};
pub use store::check;

/// A static file the server serves: URL path, bytes, MIME type.
pub type Asset = (&'static str, &'static [u8], &'static str);

/// Everything the server can be told. Every queue and buffer has a limit in
/// bytes (and, where items can be tiny, in count); [`ServerConfig::check`]
/// asserts at start-up that the limits that depend on each other fit.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub schema: Schema,
    /// Largest WebSocket message accepted or built, both ways. Devices accept
    /// [`hearth_engine::protocol::FRAME_BYTES_MAX`], so it may not exceed that;
    /// the Welcome tells each device this value.
    pub frame_bytes_max: usize,
    /// Largest log entry (one applied mutation's effect, encoded). An entry
    /// always travels in one frame, so it must fit in one with headroom.
    pub log_entry_bytes_max: usize,
    /// Largest mutation (encoded) the server applies; a larger one is refused
    /// with `TOO_LARGE`, because its effect could not travel to a device.
    pub mutation_bytes_max: usize,
    /// Log entries are sent in `Changes` frames of at most this many bytes of
    /// entries (live broadcast and catch-up alike); an entry larger than this
    /// travels alone.
    pub chunk_bytes_max: usize,
    /// Most subscriptions one device may hold (`TOO_MANY_SUBSCRIPTIONS`).
    pub subscriptions_max: usize,
    /// Most rows in one chunk of a subscription's initial load (which also
    /// stops at `chunk_bytes_max` bytes, after at least one row).
    pub load_rows_max: usize,
    /// Most mutations applied in one store transaction.
    pub batch_mutations_max: usize,
    /// Most mutation bytes applied in one store transaction.
    pub batch_bytes_max: usize,
    /// Most mutations in one push frame; a frame with more closes the
    /// connection with `TOO_MANY_MUTATIONS`, checked before it is decoded.
    pub push_mutations_max: usize,
    /// Bytes of pushed mutations waiting for or in the store, all connections
    /// together. A connection that cannot get room waits (and stops reading).
    pub store_queue_bytes_max: usize,
    /// Mutations one connection may have queued at the store; it stops
    /// reading its socket until they are answered.
    pub in_flight_mutations_max: usize,
    /// Bytes of mutations one connection may have queued at the store.
    pub in_flight_bytes_max: usize,
    /// Bytes of recent broadcast frames kept for live connections; one that
    /// falls further behind re-reads the log from its cursor.
    pub broadcast_bytes_max: usize,
    /// Bytes of log entries read for catch-up and not yet sent, all
    /// connections together.
    pub catch_up_bytes_max: usize,
    /// Bytes queued for one connection's socket: live changes wait above it,
    /// and above it in replies (refusals) the connection stops reading.
    pub send_queue_bytes_max: usize,
    /// A frame that cannot be written within this closes the connection
    /// (the peer stopped reading); it catches up from its cursor later.
    pub write_timeout_ms: u64,
    /// How often the server pings each WebSocket.
    pub ping_interval_ms: u64,
    /// A connection from which nothing (not even a pong) arrives for this
    /// long is closed as gone.
    pub peer_timeout_ms: u64,
    /// A device must say Hello within this after the upgrade.
    pub hello_timeout_ms: u64,
    /// An HTTP connection must send its request head within this.
    pub header_read_timeout_ms: u64,
    /// How long a closing connection may take to send its last words.
    pub close_timeout_ms: u64,
    /// Open TCP connections; more are closed as soon as they are accepted.
    /// Lowered at start to fit the open-file limit.
    pub connections_max: usize,
    /// Open WebSocket sync sessions; more get 503. Below `connections_max`,
    /// so that `/healthz` and `/metrics` always find room.
    pub sync_connections_max: usize,
    /// Log compaction (`hearth serve --log-retention`): log entries merged
    /// longer ago than this are removed (their effect is in the store); a
    /// device whose cursor is older re-loads its subscriptions and whole
    /// tables. None (the default) keeps the whole log.
    pub log_retention_ms: Option<u64>,
    /// How often compaction looks for entries past the retention.
    pub compact_every_ms: u64,
    /// Rooms and presence: bounds (room name, state and message sizes,
    /// rooms per connection, members per room), the relay rate per member,
    /// and how long a connection in a room may be silent.
    pub rooms: hearth_engine::rooms::RoomsConfig,
    /// Per connection, frames received per second (a burst of twice as
    /// many is taken); past it the connection closes `RATE_LIMITED`.
    pub frames_per_s: u64,
    /// Per connection, mutations pushed per second (burst twice).
    pub mutations_per_s: u64,
    /// Per connection, bytes received per second (burst twice).
    pub bytes_per_s: u64,
    /// Under `[auth]`, open sync connections per user; one more is refused
    /// `RATE_LIMITED` at its Hello.
    pub connections_per_user_max: usize,
    /// The app's server rules in Rust, run in order on every mutation inside
    /// the merge transaction (see [`Server::builder`] and
    /// [`hearth_engine::validate`]). None by default.
    pub validators: Validators,
    /// The app's static files, served at `/` in place of the demo app (Hearth's own files
    /// stay served beside them; see [`web`]). Must be a directory; `start` refuses to
    /// start otherwise.
    pub app_dir: Option<PathBuf>,
}

/// The validators of a [`ServerConfig`], in the order they run.
#[derive(Clone, Default)]
pub struct Validators(pub Vec<Validator>);

impl std::fmt::Debug for Validators {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Validators({} validators)", self.0.len())
    }
}

const MIB: usize = 1024 * 1024;

/// Bytes a log entry adds around its changes, at most (four varints), and a
/// frame around its entries (version, message tag, flags, lengths).
pub const ENTRY_OVERHEAD_BYTES: usize = 64;
pub const FRAME_OVERHEAD_BYTES: usize = 64;
/// The WebSocket read buffer per connection (see `sync_handler`).
pub const READ_BUFFER_BYTES: usize = 8 * 1024;
/// Bytes a room member adds to a presence list besides its state, at most
/// (its ids and join time as varints, the state's length).
pub const ROOM_MEMBER_OVERHEAD_BYTES: usize = 64;

impl ServerConfig {
    pub fn new(listen: SocketAddr, data_dir: PathBuf, schema: Schema) -> ServerConfig {
        let mut config = ServerConfig {
            listen,
            data_dir,
            schema,
            frame_bytes_max: 0,
            log_entry_bytes_max: 0,
            mutation_bytes_max: 0,
            chunk_bytes_max: 0,
            subscriptions_max: 256,
            load_rows_max: 1_000,
            log_retention_ms: None,
            compact_every_ms: 60_000,
            batch_mutations_max: 2_000,
            batch_bytes_max: 32 * MIB,
            push_mutations_max: 4_096,
            store_queue_bytes_max: 32 * MIB,
            in_flight_mutations_max: 2_000,
            in_flight_bytes_max: 16 * MIB,
            broadcast_bytes_max: 64 * MIB,
            catch_up_bytes_max: 32 * MIB,
            send_queue_bytes_max: 4 * MIB,
            write_timeout_ms: 30_000,
            ping_interval_ms: 15_000,
            peer_timeout_ms: 45_000,
            hello_timeout_ms: 10_000,
            header_read_timeout_ms: 10_000,
            close_timeout_ms: 2_000,
            connections_max: 10_000,
            sync_connections_max: 9_936,
            rooms: hearth_engine::rooms::RoomsConfig::default(),
            frames_per_s: 10_000,
            mutations_per_s: 100_000,
            bytes_per_s: 64 * MIB as u64,
            connections_per_user_max: 64,
            validators: Validators::default(),
            app_dir: None,
        };
        config.set_frame_bytes_max(hearth_engine::protocol::FRAME_BYTES_MAX);
        config
    }

    /// Sets the frame limit and the limits that depend on it: a log entry
    /// at most 3/4 of a frame, a mutation at most half, chunks at most 4 MiB
    /// or an eighth of a frame.
    pub fn set_frame_bytes_max(&mut self, frame_bytes_max: usize) {
        self.frame_bytes_max = frame_bytes_max;
        self.log_entry_bytes_max = frame_bytes_max / 4 * 3;
        self.mutation_bytes_max = frame_bytes_max / 2;
        self.chunk_bytes_max = (4 * MIB).min(frame_bytes_max / 8);
        // A room's whole member list travels in one frame.
        let per_member = self.rooms.state_bytes_max + ROOM_MEMBER_OVERHEAD_BYTES;
        let room_list_max = frame_bytes_max
            .saturating_sub(self.rooms.room_name_bytes_max + FRAME_OVERHEAD_BYTES)
            / per_member;
        self.rooms.members_per_room_max = self.rooms.members_per_room_max.min(room_list_max).max(1);
    }

    /// Checks that the limits fit together; the server refuses to start
    /// otherwise.
    pub fn check(&self) -> Result<(), String> {
        let device_max = hearth_engine::protocol::FRAME_BYTES_MAX;
        let rooms = &self.rooms;
        let rules: [(bool, String); 13] = [
            (
                self.bytes_per_s.saturating_mul(2) >= self.frame_bytes_max as u64,
                format!(
                    "bytes_per_s {} takes a burst of twice that, which must hold one frame of frame_bytes_max {}",
                    self.bytes_per_s, self.frame_bytes_max
                ),
            ),
            (
                self.mutations_per_s.saturating_mul(2) >= self.push_mutations_max as u64,
                format!(
                    "mutations_per_s {} takes a burst of twice that, which must hold one push of push_mutations_max {}",
                    self.mutations_per_s, self.push_mutations_max
                ),
            ),
            (
                self.frames_per_s > 0 && self.connections_per_user_max > 0,
                "frames_per_s and connections_per_user_max must be at least 1".to_string(),
            ),
            (
                self.frame_bytes_max <= device_max,
                format!(
                    "frame_bytes_max {} exceeds {device_max}, the largest frame a device accepts",
                    self.frame_bytes_max
                ),
            ),
            (
                self.mutation_bytes_max + ENTRY_OVERHEAD_BYTES <= self.log_entry_bytes_max,
                format!(
                    "mutation_bytes_max {} + {ENTRY_OVERHEAD_BYTES} must not exceed log_entry_bytes_max {}: \
                     a mutation's effect must fit in a log entry",
                    self.mutation_bytes_max, self.log_entry_bytes_max
                ),
            ),
            (
                self.log_entry_bytes_max + FRAME_OVERHEAD_BYTES <= self.frame_bytes_max,
                format!(
                    "log_entry_bytes_max {} + {FRAME_OVERHEAD_BYTES} must not exceed frame_bytes_max {}: \
                     every log entry must travel in one frame",
                    self.log_entry_bytes_max, self.frame_bytes_max
                ),
            ),
            (
                self.chunk_bytes_max > 0
                    && self.chunk_bytes_max + FRAME_OVERHEAD_BYTES <= self.frame_bytes_max,
                format!(
                    "chunk_bytes_max {} must be positive and fit in frame_bytes_max {}",
                    self.chunk_bytes_max, self.frame_bytes_max
                ),
            ),
            (
                self.push_mutations_max > 0
                    && self.batch_mutations_max > 0
                    && self.in_flight_mutations_max > 0,
                "push_mutations_max, batch_mutations_max and in_flight_mutations_max must be positive"
                    .to_string(),
            ),
            (
                self.store_queue_bytes_max > 0
                    && self.in_flight_bytes_max > 0
                    && self.batch_bytes_max > 0
                    && self.broadcast_bytes_max > 0
                    && self.catch_up_bytes_max > 0
                    && self.send_queue_bytes_max > 0,
                "every byte budget must be positive".to_string(),
            ),
            (
                self.write_timeout_ms > 0
                    && self.hello_timeout_ms > 0
                    && self.header_read_timeout_ms > 0
                    && self.close_timeout_ms > 0,
                "every timeout must be positive".to_string(),
            ),
            (
                self.ping_interval_ms > 0 && self.ping_interval_ms < self.peer_timeout_ms,
                format!(
                    "ping_interval_ms {} must be positive and below peer_timeout_ms {}",
                    self.ping_interval_ms, self.peer_timeout_ms
                ),
            ),
            (
                self.sync_connections_max > 0 && self.sync_connections_max < self.connections_max,
                format!(
                    "sync_connections_max {} must be positive and below connections_max {}, \
                     to keep room for /healthz",
                    self.sync_connections_max, self.connections_max
                ),
            ),
            (
                rooms.relay_per_s > 0
                    && rooms.member_timeout_ms > hearth_engine::rooms::HEARTBEAT_INTERVAL_MS
                    && rooms.room_name_bytes_max > 0
                    && rooms.rooms_per_connection_max > 0
                    && rooms.members_per_room_max > 0
                    && rooms.members_per_room_max * (rooms.state_bytes_max + ROOM_MEMBER_OVERHEAD_BYTES)
                        + rooms.room_name_bytes_max
                        + FRAME_OVERHEAD_BYTES
                        <= self.frame_bytes_max
                    && rooms.message_bytes_max + rooms.room_name_bytes_max + FRAME_OVERHEAD_BYTES
                        <= self.frame_bytes_max,
                format!(
                    "rooms: relay_per_s, the name length and the counts must be positive, \
                     member_timeout_ms above the devices' heartbeat ({} ms), and a room's whole \
                     list ({} members of {} bytes plus {ROOM_MEMBER_OVERHEAD_BYTES} each) must fit \
                     in frame_bytes_max {}",
                    hearth_engine::rooms::HEARTBEAT_INTERVAL_MS,
                    rooms.members_per_room_max,
                    rooms.state_bytes_max,
                    self.frame_bytes_max
                ),
            ),
        ];
        match rules.into_iter().find(|(ok, _)| !ok) {
            Some((_, why)) => Err(why),
            None => Ok(()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("the server's limits do not fit together: {0}")]
    Limits(String),
    /// The builder lacks a setting that has no default (the schema).
    #[error("the server builder needs {0}")]
    Missing(&'static str),
    // The causes are part of each message and deliberately not `source()`:
    // `{:#}` would print them twice.
    #[error("cannot use data directory {path}: {error}")]
    DataDir {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("cannot open the store: {0}")]
    Store(ServerError),
    #[error("{0}")]
    Auth(String),
    #[error("cannot open the store: {0}")]
    Sqlite(rusqlite::Error),
    #[error("cannot serve the app directory {path}: {error}")]
    AppDir {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("cannot listen on {addr}: {error}")]
    Listen {
        addr: SocketAddr,
        error: std::io::Error,
    },
}

impl From<ServerError> for StartError {
    fn from(e: ServerError) -> Self {
        StartError::Store(e)
    }
}

impl From<rusqlite::Error> for StartError {
    fn from(e: rusqlite::Error) -> Self {
        StartError::Sqlite(e)
    }
}

pub(crate) struct AppState {
    pub store: store::StoreHandle,
    /// Turns true when the server shuts down; open connections close then.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
    pub metrics: Arc<Metrics>,
    pub config: ServerConfig,
    /// Log bytes read for catch-up and not yet written, all connections.
    pub catch_up_budget: Arc<tokio::sync::Semaphore>,
    pub assets: &'static [Asset],
    /// Who is in which room (ephemeral: never in the store).
    pub rooms: Arc<rooms::RoomHub>,
    /// Token checks, when the schema has `[auth]`.
    pub auth: Option<Arc<auth::Verifier>>,
    /// Open sync connections per user (under `[auth]`).
    pub users: std::sync::Mutex<std::collections::HashMap<String, usize>>,
}

/// A running server.
pub struct Running {
    pub addr: SocketAddr,
    pub metrics: Arc<Metrics>,
    /// The connection cap in force (`connections_max`, lowered to fit the
    /// open-file limit when needed).
    pub connections_max: usize,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    store_thread: Option<std::thread::JoinHandle<()>>,
}

impl Running {
    /// Stops accepting, closes connections, and waits for the store to
    /// finish its last batch.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.task).await;
        if let Some(t) = self.store_thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }

    /// Waits until the server stops (it runs until shut down).
    pub async fn wait(mut self) {
        let _ = (&mut self.task).await;
    }
}

/// Open file descriptors the server keeps for itself (the store, its WAL,
/// the listener, the runtime) when it fits `connections_max` to the limit.
const FILES_RESERVED: u64 = 64;

/// Raises the open-file soft limit to the hard limit (where the OS allows)
/// and returns the soft limit in force, if known.
fn raise_open_file_limit() -> Option<u64> {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => Some(limit),
        Err(_) => rlimit::getrlimit(rlimit::Resource::NOFILE)
            .ok()
            .map(|(soft, _)| soft),
    }
}

/// Opens the store and starts serving. Returns once the socket is bound.
pub async fn start(config: ServerConfig, assets: &'static [Asset]) -> Result<Running, StartError> {
    config.check().map_err(StartError::Limits)?;
    let mut config = config;
    if let Some(files) = raise_open_file_limit() {
        let fit = usize::try_from(files.saturating_sub(FILES_RESERVED)).unwrap_or(usize::MAX);
        if fit < config.connections_max {
            tracing::warn!(
                open_files = files,
                connections_max = fit,
                "the open-file limit is {files}: at most {fit} connections (not {})",
                config.connections_max
            );
            config.connections_max = fit.max(2);
            config.sync_connections_max = config
                .sync_connections_max
                .min(config.connections_max * 15 / 16)
                .max(1);
        }
    }
    if let Some(dir) = &config.app_dir {
        let app_dir = |error| StartError::AppDir {
            path: dir.clone(),
            error,
        };
        let canonical = std::fs::canonicalize(dir).map_err(app_dir)?;
        if !canonical.is_dir() {
            return Err(app_dir(std::io::Error::other("not a directory")));
        }
        config.app_dir = Some(canonical);
    }
    std::fs::create_dir_all(&config.data_dir).map_err(|error| StartError::DataDir {
        path: config.data_dir.clone(),
        error,
    })?;
    let auth = match &config.schema.auth {
        Some(auth) => Some(Arc::new(
            auth::Verifier::new(auth).map_err(StartError::Auth)?,
        )),
        None => {
            tracing::warn!(
                "the schema has no [auth] section: anyone who reaches /sync can read and write every row"
            );
            None
        }
    };
    let metrics = Arc::new(Metrics::new(&config.schema));
    let (store, store_thread) = store::open(&config, metrics.clone())?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|error| StartError::Listen {
            addr: config.listen,
            error,
        })?;
    let addr = listener.local_addr().map_err(|error| StartError::Listen {
        addr: config.listen,
        error,
    })?;
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let connections_max = config.connections_max;
    if config.log_retention_ms.is_some() {
        store.spawn_compaction(config.compact_every_ms, shutdown_rx.clone());
    }
    let room_hub = Arc::new(rooms::RoomHub::new(config.rooms.clone(), metrics.clone()));
    rooms::spawn_ticker(room_hub.clone(), shutdown_rx.clone());
    let state = Arc::new(AppState {
        auth,
        users: Default::default(),
        rooms: room_hub,
        store,
        shutdown: shutdown_rx.clone(),
        metrics: metrics.clone(),
        catch_up_budget: Arc::new(tokio::sync::Semaphore::new(config.catch_up_bytes_max)),
        config,
        assets,
    });
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(serve(listener, state, rx, shutdown_tx));
    Ok(Running {
        addr,
        metrics,
        connections_max,
        shutdown: Some(tx),
        task,
        store_thread: Some(store_thread),
    })
}

/// The accept loop: every TCP connection is counted (until its socket is
/// dropped, WebSocket included), capped, and served by hyper with a timeout
/// on reading the request head.
async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
    shutdown_tx: tokio::sync::watch::Sender<bool>,
) {
    let open = Arc::new(OpenCount::default());
    let app = Router::new()
        .route("/sync", get(sync_handler))
        .route("/healthz", get(health_handler))
        .route("/metrics", get(metrics_handler))
        .fallback(asset_handler)
        .with_state(state.clone());
    let header_timeout = Duration::from_millis(state.config.header_read_timeout_ms);
    loop {
        let accepted = tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors (or another transient error): wait
                // a little for connections to close rather than spin.
                if !matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionAborted | std::io::ErrorKind::ConnectionReset
                ) {
                    tracing::warn!(error = %e, "accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                continue;
            }
        };
        if open.count.load(Ordering::Relaxed) >= state.config.connections_max {
            Metrics::add(&state.metrics.connections_refused, 1);
            drop(stream);
            continue;
        }
        let _ = stream.set_nodelay(true);
        let io = counted::Counted::new(stream, open.clone());
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let mut shutdown = state.shutdown.clone();
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(hyper_util::rt::TokioIo::new(io), service)
                .with_upgrades();
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = async { let _ = shutdown.wait_for(|down| *down).await; } => conn.as_mut().graceful_shutdown(),
            }
            let _ = conn.await;
        });
    }
    drop(listener);
    let _ = shutdown_tx.send(true);
    drop(app);
    // Connections close themselves on shutdown; wait for them, but not forever.
    let close_wait = Duration::from_millis(state.config.close_timeout_ms + 1_000);
    drop(state);
    let _ = tokio::time::timeout(close_wait, open.wait_zero()).await;
}

/// Open TCP connections (HTTP and WebSocket alike).
#[derive(Default)]
struct OpenCount {
    count: AtomicUsize,
    zero: tokio::sync::Notify,
}

impl OpenCount {
    async fn wait_zero(&self) {
        loop {
            let notified = self.zero.notified();
            if self.count.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }
}

mod counted {
    //! A TCP stream that counts itself open until dropped.
    use std::pin::Pin;
    use std::sync::atomic::Ordering;
    use std::sync::Arc;
    use std::task::{Context, Poll};

    use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
    use tokio::net::TcpStream;

    pub(super) struct Counted {
        inner: TcpStream,
        open: Arc<super::OpenCount>,
    }

    impl Counted {
        pub(super) fn new(inner: TcpStream, open: Arc<super::OpenCount>) -> Counted {
            open.count.fetch_add(1, Ordering::AcqRel);
            Counted { inner, open }
        }
    }

    impl Drop for Counted {
        fn drop(&mut self) {
            if self.open.count.fetch_sub(1, Ordering::AcqRel) == 1 {
                self.open.zero.notify_waiters();
            }
        }
    }

    impl AsyncRead for Counted {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Counted {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            Pin::new(&mut self.inner).poll_write(cx, buf)
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.inner).poll_flush(cx)
        }

        fn poll_shutdown(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            bufs: &[std::io::IoSlice<'_>],
        ) -> Poll<std::io::Result<usize>> {
            Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
        }

        fn is_write_vectored(&self) -> bool {
            self.inner.is_write_vectored()
        }
    }
}

/// The WebSocket upgrade, by hand rather than through axum's extractor:
/// the connection then speaks tungstenite directly, which lets it send a big
/// message as several WebSocket fragments (see `connection`).
async fn sync_handler(State(state): State<Arc<AppState>>, mut req: Request) -> Response {
    let open = state.metrics.connections_open.load(Ordering::Relaxed);
    if open >= state.config.sync_connections_max as u64 {
        Metrics::add(&state.metrics.connections_refused, 1);
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "5")],
            format!("too many sync connections ({open}); try again later\n"),
        )
            .into_response();
    }
    let headers = req.headers();
    let has = |name: header::HeaderName, token: &str| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|v| v.trim().eq_ignore_ascii_case(token))
    };
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .map(|k| k.as_bytes().to_vec());
    let (Some(key), true, true, true) = (
        key,
        has(header::CONNECTION, "upgrade"),
        has(header::UPGRADE, "websocket"),
        has(header::SEC_WEBSOCKET_VERSION, "13"),
    ) else {
        return (
            StatusCode::BAD_REQUEST,
            "/sync is a WebSocket endpoint (version 13)\n",
        )
            .into_response();
    };
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else {
            return;
        };
        let max = state.config.frame_bytes_max;
        // tungstenite zeroes its read buffer (128 KiB by default) before
        // every socket read, even one that finds nothing; devices send
        // little, so a small buffer halves the server's fan-out CPU
        // (measured by examples/bench_streams.rs).
        let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
            .max_message_size(Some(max))
            .max_frame_size(Some(max))
            .read_buffer_size(READ_BUFFER_BYTES);
        let socket = tokio_tungstenite::WebSocketStream::from_raw_socket(
            hyper_util::rt::TokioIo::new(upgraded),
            tokio_tungstenite::tungstenite::protocol::Role::Server,
            Some(config),
        )
        .await;
        connection::run(socket, state).await;
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "websocket")
        .header(
            header::SEC_WEBSOCKET_ACCEPT,
            tokio_tungstenite::tungstenite::handshake::derive_accept_key(&key),
        )
        .body(axum::body::Body::empty())
        .expect("a valid response")
}

/// `ok` while the store can write: the last store write (a batch, or a
/// probe made now when none was recent) succeeded; else 503 with its error.
async fn health_handler(State(state): State<Arc<AppState>>) -> Response {
    match state.store.health().await {
        Ok(()) => (StatusCode::OK, "ok\n").into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("store failing: {e}\n"),
        )
            .into_response(),
    }
}

async fn metrics_handler(State(state): State<Arc<AppState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

async fn asset_handler(
    State(state): State<Arc<AppState>>,
    method: axum::http::Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    // Files are read, never written: a POST (or any other method) to one is refused
    // rather than answered with the file.
    if method != axum::http::Method::GET && method != axum::http::Method::HEAD {
        return (
            StatusCode::METHOD_NOT_ALLOWED,
            [(header::ALLOW, "GET, HEAD")],
            format!("{method} is not allowed here: files are served with GET and HEAD\n"),
        )
            .into_response();
    }
    web::serve(
        state.assets,
        state.config.app_dir.as_deref(),
        &uri,
        &headers,
    )
    .await
}
