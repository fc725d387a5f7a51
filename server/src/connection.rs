//! One WebSocket connection: handshake, catch-up, then live traffic.
//!
//! The socket is split in two. A writer task owns the sending half: it
//! writes queued frames one at a time, each within `write_timeout_ms`, and
//! pings every `ping_interval_ms`. The connection task owns the receiving
//! half and decides everything else, so **it keeps reading while a frame is
//! being written**: a device that re-sends a big outbox while the server
//! sends it a big catch-up cannot wedge both sides in `send`.
//!
//! What the task queues for the writer is bounded in bytes
//! (`send_queue_bytes_max`): live changes and catch-up wait while the queue
//! is full, and the connection stops reading while refusals fill it. What it
//! queues at the store is bounded per connection (`in_flight_mutations_max`,
//! `in_flight_bytes_max`: it stops reading until the store answers) and for
//! all connections (`store_queue_bytes_max`, taken before a push is decoded).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use hearth_engine::fanout::Heard;
use hearth_engine::link::{Link, LinkConfig, Step, LOG_COMPACTED};
use hearth_engine::protocol::{decode_client, encode_server, CodecError, ServerMsg};
use hearth_engine::rooms::Rooms;
use hearth_engine::server::{LoadChunk, LoadRead};
use hearth_engine::{LogEntry, ServerCore};
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite;
use tungstenite::protocol::frame::coding::{Data, OpCode};
use tungstenite::protocol::frame::{CloseFrame, Frame};
use tungstenite::Message;

/// The server's side of a sync WebSocket.
pub(crate) type WebSocket =
    tokio_tungstenite::WebSocketStream<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>>;

/// A message larger than this is sent as WebSocket fragments of this size.
/// tungstenite copies each frame into a per-connection buffer that keeps its
/// largest size for the connection's life; fragments keep that buffer small
/// however large the message (one 12 MiB value broadcast to a thousand
/// devices would otherwise pin 12 GiB).
pub const FRAGMENT_BYTES: usize = 256 * 1024;

use crate::metrics::CloseReason;
use crate::rooms::{RoomLink, RoomOut};
use crate::store::{ApplyCmd, Reply, StoreCmd};
use crate::{AppState, Metrics};

/// Most log entries in one catch-up frame (besides `chunk_bytes_max`).
const CATCH_UP_ENTRIES_MAX: usize = 1_000;
/// What a decoded mutation costs in memory beyond its encoded bytes; a push
/// is charged this per mutation, so a frame of many empty mutations is not
/// cheaper than it is.
const MUTATION_MEMORY_BYTES: usize = 64;

/// Why a connection ends early, said to the device before closing.
struct Fatal {
    code: String,
    message: String,
    reason: CloseReason,
}

enum End {
    /// Tell the device why, then close.
    Fatal(Fatal),
    /// Nothing to say (the device left, or cannot be written to).
    Quiet(CloseReason),
}

fn fatal(code: impl Into<String>, message: impl Into<String>, reason: CloseReason) -> End {
    End::Fatal(Fatal {
        code: code.into(),
        message: message.into(),
        reason,
    })
}

fn bad_input(e: CodecError) -> End {
    let code = match e {
        CodecError::Version { .. } => "PROTOCOL_VERSION",
        CodecError::TooLarge { .. } => "FRAME_TOO_LARGE",
        CodecError::Malformed(_) => "BAD_FRAME",
    };
    fatal(code, e.to_string(), CloseReason::BadInput)
}

/// A receive error: the peer leaving is not a malformed frame.
fn classify(e: tungstenite::Error, frame_bytes_max: usize) -> End {
    match e {
        tungstenite::Error::Capacity(c) => fatal(
            "FRAME_TOO_LARGE",
            format!("{c} (limit {frame_bytes_max} bytes)"),
            CloseReason::BadInput,
        ),
        tungstenite::Error::Protocol(
            tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
        )
        | tungstenite::Error::ConnectionClosed
        | tungstenite::Error::AlreadyClosed
        | tungstenite::Error::Io(_) => End::Quiet(CloseReason::PeerGone),
        tungstenite::Error::Protocol(p) => fatal("BAD_FRAME", p.to_string(), CloseReason::BadInput),
        tungstenite::Error::Utf8(e) => fatal("BAD_FRAME", e, CloseReason::BadInput),
        _ => End::Quiet(CloseReason::PeerGone),
    }
}

/// Sends one message; a binary one larger than [`FRAGMENT_BYTES`] goes out
/// as WebSocket fragments of that size, so that the peer's read buffer (and
/// the sender's write buffer, which keeps the size of the largest frame it
/// wrote) stay small whatever the message. The server and the native client
/// both send through it.
pub async fn send_fragmented<S>(sink: &mut S, message: Message) -> Result<(), tungstenite::Error>
where
    S: futures_util::Sink<Message, Error = tungstenite::Error> + Unpin,
{
    let bytes = match message {
        Message::Binary(bytes) if bytes.len() > FRAGMENT_BYTES => bytes,
        other => return sink.send(other).await,
    };
    let mut offset = 0;
    while offset < bytes.len() {
        let end = (offset + FRAGMENT_BYTES).min(bytes.len());
        let opcode = if offset == 0 {
            OpCode::Data(Data::Binary)
        } else {
            OpCode::Data(Data::Continue)
        };
        let frame = Frame::message(bytes.slice(offset..end), opcode, end == bytes.len());
        sink.feed(Message::Frame(frame)).await?;
        offset = end;
    }
    sink.flush().await
}

/// `n` bytes as semaphore permits, never more than the budget holds (a push
/// larger than the whole budget waits for all of it).
fn permits(n: usize, budget: usize) -> u32 {
    n.clamp(1, budget.max(1)).min(u32::MAX as usize) as u32
}

/// What the connection task hands the writer.
enum Out {
    Frame {
        bytes: Bytes,
        /// A refusal (counts against reading) rather than changes.
        reply: bool,
        /// Catch-up budget held until the frame is written.
        _permit: Option<OwnedSemaphorePermit>,
    },
    Close(CloseFrame),
}

/// Bytes queued for the writer and not yet written.
#[derive(Default)]
struct SendQueue {
    bytes: AtomicUsize,
    reply_bytes: AtomicUsize,
    drained: Notify,
}

impl SendQueue {
    fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Acquire)
    }

    fn reply_bytes(&self) -> usize {
        self.reply_bytes.load(Ordering::Acquire)
    }

    fn release(&self, n: usize, reply: bool) {
        self.bytes.fetch_sub(n, Ordering::AcqRel);
        if reply {
            self.reply_bytes.fetch_sub(n, Ordering::AcqRel);
        }
        self.drained.notify_waiters();
    }

    /// Waits until `room` holds (checked after every write).
    async fn wait(&self, room: impl Fn(&SendQueue) -> bool) {
        loop {
            let drained = self.drained.notified();
            if room(self) {
                return;
            }
            drained.await;
        }
    }
}

enum WriteEnd {
    /// The queue closed (the connection is done), or the close was sent.
    Finished,
    TimedOut,
    Broken,
}

async fn write_loop(
    mut sink: SplitSink<WebSocket, Message>,
    mut rx: mpsc::UnboundedReceiver<Out>,
    queue: Arc<SendQueue>,
    write_timeout: Duration,
    ping_interval: Duration,
) -> WriteEnd {
    let mut ping = tokio::time::interval_at(Instant::now() + ping_interval, ping_interval);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let message = tokio::select! {
            out = rx.recv() => match out {
                None => return WriteEnd::Finished,
                Some(Out::Close(frame)) => {
                    let _ = tokio::time::timeout(write_timeout, sink.send(Message::Close(Some(frame)))).await;
                    return WriteEnd::Finished;
                }
                Some(Out::Frame { bytes, reply, _permit }) => {
                    let n = bytes.len();
                    let sent = tokio::time::timeout(write_timeout, send_fragmented(&mut sink, Message::Binary(bytes))).await;
                    queue.release(n, reply);
                    sent
                }
            },
            _ = ping.tick() => {
                tokio::time::timeout(write_timeout, sink.send(Message::Ping(Bytes::new()))).await
            }
        };
        match message {
            Err(_) => return WriteEnd::TimedOut,
            Ok(Err(_)) => return WriteEnd::Broken,
            Ok(Ok(())) => {}
        }
    }
}

static NEXT_CONN_ID: AtomicU64 = AtomicU64::new(1);

pub(crate) async fn run(socket: WebSocket, state: Arc<AppState>) {
    let metrics = state.metrics.clone();
    Metrics::add(&metrics.connections_total, 1);
    metrics.connections_open.fetch_add(1, Ordering::Relaxed);
    let config = &state.config;
    let (sink, stream) = socket.split();
    let queue = Arc::new(SendQueue::default());
    let (out, rx) = mpsc::unbounded_channel();
    let writer = tokio::spawn(write_loop(
        sink,
        rx,
        queue.clone(),
        Duration::from_millis(config.write_timeout_ms),
        Duration::from_millis(config.ping_interval_ms),
    ));
    let close_timeout = Duration::from_millis(config.close_timeout_ms);
    let mut conn = Conn {
        id: NEXT_CONN_ID.fetch_add(1, Ordering::Relaxed),
        stream,
        out,
        queue,
        writer,
        writer_done: false,
        state: state.clone(),
        link: Link::new(
            state.store.schema.clone(),
            LinkConfig {
                mutation_bytes_max: config.mutation_bytes_max,
                push_mutations_max: config.push_mutations_max,
                subscriptions_max: config.subscriptions_max,
                load_rows_max: config.load_rows_max,
                load_bytes_max: config.chunk_bytes_max,
                chunk_bytes_max: config.chunk_bytes_max,
            },
        ),
        in_flight_mutations: 0,
        in_flight_bytes: 0,
        last_rx: Instant::now(),
        joined: false,
        rooms: None,
        principal: None,
        auth_deadline: None,
        user_slot: None,
        rates: [
            Bucket::new(config.frames_per_s),
            Bucket::new(config.mutations_per_s),
            Bucket::new(config.bytes_per_s),
        ],
    };
    let end = conn.serve().await;
    if conn.joined {
        state.store.ring.leave(conn.id);
    }
    let Conn {
        out,
        writer,
        writer_done,
        ..
    } = conn;
    let reason = match end {
        End::Fatal(f) => {
            if f.reason == CloseReason::BadInput {
                Metrics::add(&metrics.frames_malformed, 1);
            }
            let frame = encode_server(&ServerMsg::Error {
                code: f.code.to_string(),
                message: f.message.clone(),
            });
            metrics.frame_built(frame.len());
            Metrics::add(&metrics.bytes_out, frame.len() as u64);
            let reason: String = format!("{}: {}", f.code, f.message)
                .chars()
                .take(120)
                .collect();
            let _ = out.send(Out::Frame {
                bytes: Bytes::from(frame),
                reply: false,
                _permit: None,
            });
            let _ = out.send(Out::Close(CloseFrame {
                code: tungstenite::protocol::frame::coding::CloseCode::Policy,
                reason: reason.into(),
            }));
            f.reason
        }
        End::Quiet(reason) => reason,
    };
    drop(out);
    // The writer sends what is queued (the error and the close) if it can
    // within the close timeout; past it the socket is simply dropped.
    if !writer_done {
        let abort = writer.abort_handle();
        if tokio::time::timeout(close_timeout, writer).await.is_err() {
            abort.abort();
        }
    }
    Metrics::add(metrics.closed(reason), 1);
    metrics.connections_open.fetch_sub(1, Ordering::Relaxed);
}

/// What `/metrics` reads of a live connection: its cursor and send queue.
struct BacklogGauge {
    cursor: AtomicU64,
    queue: Arc<SendQueue>,
}

impl crate::metrics::ConnectionGauge for BacklogGauge {
    fn cursor(&self) -> u64 {
        self.cursor.load(Ordering::Relaxed)
    }

    fn send_queue_bytes(&self) -> usize {
        self.queue.bytes()
    }
}

struct Conn {
    id: u64,
    stream: SplitStream<WebSocket>,
    out: mpsc::UnboundedSender<Out>,
    queue: Arc<SendQueue>,
    writer: JoinHandle<WriteEnd>,
    /// The writer task has ended (its handle must not be polled again).
    writer_done: bool,
    state: Arc<AppState>,
    /// What this connection sends, filters or refuses (the engine's
    /// sans-io rules); this task does the I/O around it.
    link: Link,
    in_flight_mutations: usize,
    in_flight_bytes: usize,
    /// When something last arrived (or reading last resumed).
    last_rx: Instant,
    /// Whether it joined the store's fan-out (and must leave it).
    joined: bool,
    /// This connection in the room registry, from its Hello on; dropping it
    /// (when the connection ends, however) makes its members leave.
    rooms: Option<RoomLink>,
    /// Under `[auth]`: who the device acts for, and when its token expires
    /// (`exp` plus the leeway), when the connection closes `AUTH_EXPIRED`.
    principal: Option<Arc<hearth_engine::rules::Principal>>,
    auth_deadline: Option<Instant>,
    /// Under `[auth]`, this connection counted against its user's.
    user_slot: Option<UserSlot>,
    /// Frames, mutations and bytes received, against the configured rates.
    rates: [Bucket; 3],
}

/// A token bucket: `per_s` a second, holding at most two seconds' worth.
struct Bucket {
    per_s: u64,
    level: f64,
    at: Instant,
}

impl Bucket {
    fn new(per_s: u64) -> Bucket {
        Bucket {
            per_s,
            level: 2.0 * per_s as f64,
            at: Instant::now(),
        }
    }

    /// Takes `n`; false when the bucket does not hold that many.
    fn take(&mut self, n: u64, now: Instant) -> bool {
        let capacity = 2.0 * self.per_s as f64;
        let refill = now.saturating_duration_since(self.at).as_secs_f64() * self.per_s as f64;
        self.level = (self.level + refill).min(capacity);
        self.at = now;
        if self.level < n as f64 {
            return false;
        }
        self.level -= n as f64;
        true
    }
}

/// The code of a connection past one of its rates, or a user past their
/// connections.
pub(crate) const RATE_LIMITED: &str = "RATE_LIMITED";

/// Counts a user's open connections while it lives.
struct UserSlot {
    state: Arc<AppState>,
    user: String,
}

impl Drop for UserSlot {
    fn drop(&mut self) {
        let mut users = self.state.users.lock().expect("users lock");
        if let Some(n) = users.get_mut(&self.user) {
            *n -= 1;
            if *n == 0 {
                users.remove(&self.user);
            }
        }
    }
}

/// A catch-up read in progress: the entries after the link's cursor, with
/// the catch-up budget they hold.
type CatchUpRead = JoinHandle<Result<(Vec<LogEntry>, OwnedSemaphorePermit), String>>;

/// A chunk of an initial load being read from the store.
type LoadReading = JoinHandle<Result<LoadChunk, String>>;

enum Received {
    Frame(Bytes),
    /// A ping or pong: the peer is alive.
    Control,
    Closed(CloseReason),
}

/// The next message from the peer.
async fn receive(stream: &mut SplitStream<WebSocket>, state: &AppState) -> Result<Received, End> {
    let Some(msg) = stream.next().await else {
        return Ok(Received::Closed(CloseReason::PeerGone));
    };
    match msg.map_err(|e| classify(e, state.config.frame_bytes_max))? {
        Message::Binary(bytes) => {
            Metrics::add(&state.metrics.bytes_in, bytes.len() as u64);
            Ok(Received::Frame(bytes))
        }
        Message::Text(_) => Err(fatal(
            "BAD_FRAME",
            "Hearth speaks binary frames only",
            CloseReason::BadInput,
        )),
        Message::Close(_) => Ok(Received::Closed(CloseReason::ClientClosed)),
        Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => Ok(Received::Control),
    }
}

impl Conn {
    fn queue_frame(&mut self, frame: Bytes, reply: bool, permit: Option<OwnedSemaphorePermit>) {
        let n = frame.len();
        self.state.metrics.frame_built(n);
        Metrics::add(&self.state.metrics.bytes_out, n as u64);
        self.queue.bytes.fetch_add(n, Ordering::AcqRel);
        if reply {
            self.queue.reply_bytes.fetch_add(n, Ordering::AcqRel);
        }
        // A closed writer is noticed by the main loop through its handle.
        let _ = self.out.send(Out::Frame {
            bytes: frame,
            reply,
            _permit: permit,
        });
    }

    fn heard(&mut self) {
        if let Some(rooms) = &mut self.rooms {
            rooms.heard();
        }
    }

    fn queue_msg(&mut self, msg: &ServerMsg, reply: bool) {
        self.queue_frame(Bytes::from(encode_server(msg)), reply, None);
    }

    async fn serve(&mut self) -> End {
        match self.serve_inner().await {
            Ok(reason) => End::Quiet(reason),
            Err(end) => end,
        }
    }

    async fn serve_inner(&mut self) -> Result<CloseReason, End> {
        let config = self.state.config.clone();
        let hello_timeout = Duration::from_millis(config.hello_timeout_ms);
        let state = self.state.clone();
        let stream = &mut self.stream;
        let first = tokio::time::timeout(hello_timeout, async {
            loop {
                match receive(stream, &state).await? {
                    Received::Control => continue,
                    Received::Closed(reason) => return Ok(Err(reason)),
                    Received::Frame(bytes) => return Ok(Ok(bytes)),
                }
            }
        })
        .await
        .map_err(|_| {
            fatal(
                "HANDSHAKE",
                format!("no Hello within {hello_timeout:?}"),
                CloseReason::Handshake,
            )
        })?;
        let first = match first? {
            Err(reason) => return Ok(reason),
            Ok(bytes) => decode_client(&bytes, config.frame_bytes_max).map_err(bad_input)?,
        };
        let token = match &first {
            hearth_engine::ClientMsg::Hello { token, .. } => token.clone(),
            _ => None,
        };
        let hello = self
            .link
            .on_hello(first)
            .map_err(|r| fatal(r.code, r.message, CloseReason::Handshake))?;
        let client_id = hello.client_id;
        // Under [auth]: who the device acts for, bound to its client id.
        let mut identity = None;
        if let Some(verifier) = self.state.auth.clone() {
            let verified = verifier
                .verify(token.as_deref())
                .map_err(|f| fatal(f.code, f.message, CloseReason::Auth))?;
            let schema = self.state.store.schema.clone();
            let digest = hearth_engine::server::access_digest(&schema, Some(&verified.principal));
            let bound = self
                .state
                .store
                .bind(client_id, verified.principal.sub.clone())
                .await
                .map_err(|e| fatal("STORE", e, CloseReason::StoreError))?;
            bound.map_err(|owner| {
                fatal(
                    crate::auth::AUTH_USER_CHANGED,
                    format!(
                        "this device (client id {client_id}) belongs to another user than '{}' (it first synced as '{owner}'): open its database with reset (the CLI: use another --db) to sign in as another user",
                        verified.principal.sub
                    ),
                    CloseReason::Auth,
                )
            })?;
            {
                let mut users = self.state.users.lock().expect("users lock");
                let open = users.entry(verified.principal.sub.clone()).or_insert(0);
                if *open >= self.state.config.connections_per_user_max {
                    return Err(fatal(
                        RATE_LIMITED,
                        format!(
                            "user '{}' already has {} open connections, the most a user may have",
                            verified.principal.sub, self.state.config.connections_per_user_max
                        ),
                        CloseReason::RateLimited,
                    ));
                }
                *open += 1;
            }
            self.user_slot = Some(UserSlot {
                state: self.state.clone(),
                user: verified.principal.sub.clone(),
            });
            let now_s = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let left_s = (verified.exp_s + verifier.leeway_s()).saturating_sub(now_s);
            self.auth_deadline = Some(Instant::now() + Duration::from_secs(left_s));
            self.principal = Some(verified.principal.clone());
            identity = Some((verified.principal, digest));
        }
        let ring = self.state.store.ring.clone();
        // From here the fan-out flags what concerns this connection; what
        // was published before it filters itself (see `Heard`).
        let (mailbox, joined_at) = ring.join(self.id, client_id);
        let mut heard = Heard::joined(joined_at);
        self.joined = true;
        // `/metrics` reads how far behind the head this connection is.
        let gauge = Arc::new(BacklogGauge {
            cursor: AtomicU64::new(self.link.cursor()),
            queue: self.queue.clone(),
        });
        let _tracked = self.state.metrics.track(self.id, gauge.clone());
        if let Some(at) = ring.subscriptions(self.id, self.link.take_sub_events()) {
            heard.subscribed(at);
        }
        // How far the log is known to reach. It can run ahead of what the
        // fan-out has said (`heard`): a chunk or a read of the log may
        // show later entries, which are then routed, never passed over.
        let mut known_head = heard.heard_until();
        let reader = self.state.store.reader.clone();
        let schema = self.state.store.schema.clone();
        let frame_bytes_max = config.frame_bytes_max;
        // Read after the head: the store sets it before it moves the head,
        // so it covers every entry up to that head.
        let max_hlc = ring.max_hlc();
        let answer = tokio::task::spawn_blocking(move || {
            let conn = reader.lock().expect("reader lock");
            // One read transaction: the Welcome's floor and the acks agree.
            conn.execute_batch("BEGIN")?;
            let answer = (|| {
                let welcome = hearth_engine::server::greet(
                    &conn,
                    &schema,
                    known_head,
                    max_hlc,
                    &hello,
                    frame_bytes_max,
                )?;
                let acks = hearth_engine::server::missed_acks(&conn, &hello)?;
                // What the user could read at the device's cursor (or at the
                // floor, from which a device below it re-loads), and whether
                // the entry there changed it (the `Reload` after it may not
                // have reached the device: the link looks at the Hello's
                // `reloaded`).
                let grants = match &identity {
                    Some((who, _)) => {
                        let floor = hearth_engine::server::log_floor(&conn)?;
                        Some(hearth_engine::server::read_access(
                            &conn,
                            &schema,
                            who.clone(),
                            hello.cursor.max(floor),
                        )?)
                    }
                    None => None,
                };
                Ok::<_, hearth_engine::ServerError>((welcome, acks, grants, identity))
            })();
            conn.execute_batch("COMMIT")?;
            answer
        })
        .await
        .map_err(|e| fatal("INTERNAL", e.to_string(), CloseReason::StoreError))?
        .map_err(|e| fatal("STORE", e.to_string(), CloseReason::StoreError))?;
        let (answer, acks, grants, identity) = answer;
        if let ServerMsg::Error { code, message } = answer {
            // A device whose schema is newer than this server's is told so
            // by its own code: it waits for the server instead of failing.
            let code = if code == hearth_engine::server::SCHEMA_AHEAD {
                hearth_engine::server::SCHEMA_AHEAD
            } else {
                "HANDSHAKE"
            };
            return Err(fatal(code, message, CloseReason::Handshake));
        }
        if let (Some((_, digest)), Some((access, at_cursor))) = (identity, grants) {
            self.link
                .set_access(access, digest, hello.reloaded, at_cursor);
        }
        let mut greeting = self.link.on_welcome(answer, known_head);
        // The acks compaction took from the log go right after the Welcome.
        greeting.splice(1..1, acks);
        for msg in greeting {
            self.queue_msg(&msg, false);
        }
        let (rooms, mut room_frames) = RoomLink::new(self.state.rooms.clone(), self.id, client_id);
        self.rooms = Some(rooms);

        let (reply_tx, mut replies) = mpsc::unbounded_channel();
        let mut shutdown = self.state.shutdown.clone();
        let mut catch_up: Option<CatchUpRead> = None;
        let mut loading: Option<LoadReading> = None;
        let peer_timeout = Duration::from_millis(config.peer_timeout_ms);
        let send_max = config.send_queue_bytes_max;
        let mut was_reading = true;
        let queue = self.queue.clone();
        loop {
            gauge
                .cursor
                .store(self.link.cursor(), std::sync::atomic::Ordering::Relaxed);
            let can_read = self.in_flight_mutations < config.in_flight_mutations_max
                && self.in_flight_bytes < config.in_flight_bytes_max
                && self.queue.reply_bytes() < send_max;
            if can_read && !was_reading {
                // Time spent not reading is the server's doing, not the peer's.
                self.last_rx = Instant::now();
            }
            if !can_read {
                // Nor is it for the rooms' liveness.
                self.heard();
            }
            was_reading = can_read;
            if loading.is_none() {
                if let Some(read) = self.link.next_read() {
                    loading = Some(self.read_load(read));
                }
            }
            // A chunk read at a position past the head this connection knows:
            // the entries up to it were committed, and maybe published with
            // flags for this connection not taken yet (or the store commits,
            // then publishes, and has not published yet). The flags are taken
            // with the head, as when the mailbox wakes: a head learned
            // without them would let entries that concern this device be
            // passed over (see `Heard`). Until the published head reaches the
            // chunk, it is looked at again.
            let due_ahead = self.link.due_at().is_some_and(|at| at > known_head);
            if due_ahead {
                let head = ring.head();
                known_head = known_head.max(head);
                let taken = mailbox.take();
                heard.flagged(head, taken.ranges, taken.full_until);
            }
            let due_ahead = self.link.due_at().is_some_and(|at| at > known_head);
            let want_changes = self.link.wants_entries(known_head) && catch_up.is_none();
            let room = queue.bytes() < send_max;
            let idle_deadline = self.last_rx + peer_timeout;
            let reply_full = queue.reply_bytes() >= send_max;
            tokio::select! {
                _ = async { let _ = shutdown.wait_for(|down| *down).await; } => {
                    return Err(fatal("SHUTDOWN", "the server is shutting down", CloseReason::Shutdown));
                }
                ended = &mut self.writer, if !self.writer_done => {
                    self.writer_done = true;
                    return Ok(match ended {
                        Ok(WriteEnd::TimedOut) => CloseReason::WriteTimeout,
                        _ => CloseReason::PeerGone,
                    });
                }
                received = receive(&mut self.stream, &state), if can_read => {
                    self.last_rx = Instant::now();
                    self.heard();
                    match received? {
                        Received::Closed(reason) => return Ok(reason),
                        Received::Control => {}
                        Received::Frame(bytes) => {
                            self.on_frame(bytes, client_id, &reply_tx).await?;
                            if let Some(at) = ring.subscriptions(self.id, self.link.take_sub_events()) {
                                heard.subscribed(at);
                                known_head = known_head.max(at);
                            }
                        }
                    }
                }
                reply = replies.recv() => match reply.expect("this task holds a sender") {
                    // A fatal answer (`DEVICE_REWOUND`: the device re-sent a
                    // number with other content) ends the connection; the
                    // device comes back under a new client id.
                    Reply::Refused(msg) => match self.link.on_refusal(msg) {
                        Step::Close { code, message } => {
                            return Err(fatal(code, message, CloseReason::Rewound));
                        }
                        Step::Send(msg) => self.queue_msg(&msg, true),
                        Step::Apply(_) => unreachable!("a refusal applies nothing"),
                    },
                Reply::Done { mutations, bytes } => {
                        self.in_flight_mutations -= mutations;
                        self.in_flight_bytes -= bytes;
                    }
                    Reply::Failed(message) => {
                        return Err(fatal("STORE", message, CloseReason::StoreError));
                    }
                },
                _ = mailbox.wait() => {
                    // The head first: every chunk up to it that concerns
                    // this connection is flagged by then.
                    let head = ring.head();
                    known_head = known_head.max(head);
                    let taken = mailbox.take();
                    heard.flagged(head, taken.ranges, taken.full_until);
                }
                _ = queue.wait(|q| q.bytes() < send_max && q.reply_bytes() < send_max),
                    if (want_changes && !room) || reply_full => {}
                _ = std::future::ready(()), if want_changes && room => {
                    if let Some(to) = heard.passable(self.link.cursor(), known_head) {
                        // Nothing up to `to` concerns this device.
                        for msg in self.link.skip_to(to, ring.max_hlc(), known_head) {
                            self.queue_msg(&msg, false);
                        }
                        continue;
                    }
                    let next = self.link.cursor() + 1;
                    match ring.find(next) {
                        // A device re-loading whole tables filters their
                        // entries by the keys loaded: never a shared frame.
                        Some(chunk) if chunk.entries.is_none() && self.link.reloading() => {
                            catch_up = Some(self.read_log());
                        }
                        Some(chunk) => match &chunk.entries {
                            Some(entries) if !self.link.passes_whole(entries) => {
                                for msg in self.link.on_entries(entries, known_head) {
                                    self.queue_msg(&msg, false);
                                }
                            }
                            _ => {
                                self.queue_frame(chunk.frame.clone(), false, None);
                                for msg in self.link.sent_whole(chunk.last, chunk.hlc, known_head) {
                                    self.queue_msg(&msg, false);
                                }
                            }
                        },
                        None => catch_up = Some(self.read_log()),
                    }
                }
                read = async { catch_up.as_mut().expect("guarded").await }, if catch_up.is_some() => {
                    catch_up = None;
                    let (entries, permit) = read
                        .map_err(|e| fatal("INTERNAL", e.to_string(), CloseReason::StoreError))?
                        .map_err(|e| fatal("STORE", e, CloseReason::StoreError))?;
                    let floor = self.state.metrics.log_floor.load(Ordering::Relaxed);
                    let next = self.link.cursor() + 1;
                    // Log positions are contiguous: a first entry past `next`
                    // (or none, below the floor) is a compaction gap, whatever
                    // the floor metric says yet.
                    let gap = match entries.first() {
                        Some(e) => e.server_seq > next,
                        None => floor >= next,
                    };
                    if gap {
                        // This connection fell behind its ring and the log was
                        // compacted past it: the device re-loads on reconnect.
                        return Err(fatal(
                            LOG_COMPACTED,
                            format!(
                                "the log no longer holds entries after {} (compacted up to {floor}): reconnect to re-load",
                                next - 1
                            ),
                            CloseReason::LogCompacted,
                        ));
                    }
                    match entries.last().map(|e| e.server_seq) {
                        // The log has nothing past what was sent: wait for the head to move.
                        None => known_head = self.link.cursor(),
                        Some(last) => {
                            known_head = known_head.max(last);
                            let mut permit = Some(permit);
                            for msg in self.link.on_entries(&entries, known_head) {
                                let frame = Bytes::from(encode_server(&msg));
                                self.queue_frame(frame, false, permit.take());
                            }
                        }
                    }
                }
                chunk = async { loading.as_mut().expect("guarded").await }, if loading.is_some() => {
                    loading = None;
                    let chunk = chunk
                        .map_err(|e| fatal("INTERNAL", e.to_string(), CloseReason::StoreError))?
                        .map_err(|e| fatal("STORE", e, CloseReason::StoreError))?;
                    for msg in self.link.on_read(chunk) {
                        self.queue_msg(&msg, false);
                    }
                }
                _ = tokio::time::sleep(Duration::from_millis(2)), if due_ahead => {}
                // The token expired: nothing more goes either way until the
                // device comes back with a new one (its writes stay pending;
                // this is not a refusal).
                _ = tokio::time::sleep_until(self.auth_deadline.unwrap_or_else(Instant::now)), if self.auth_deadline.is_some() => {
                    return Err(fatal(
                        crate::auth::AUTH_EXPIRED,
                        "exp: the token expired; reconnect with a new one (pending writes are kept)",
                        CloseReason::Auth,
                    ));
                }
                _ = tokio::time::sleep_until(idle_deadline), if can_read => {
                    return Ok(CloseReason::PeerTimeout);
                }
                // Presence and broadcasts, ephemeral: they wait for room in
                // the send queue like live changes do.
                room = room_frames.next(), if queue.bytes() < send_max => match room {
                    RoomOut::Frame(frame) => self.queue_frame(frame, false, None),
                    RoomOut::Close => return Ok(CloseReason::PeerTimeout),
                },
            }
        }
    }

    /// Starts reading the log after `last_sent`, within the catch-up budget:
    /// it takes room for twice what it reads (the entries, then their
    /// frame), learning the size of a first entry larger than a chunk before
    /// it reads it.
    fn read_log(&self) -> CatchUpRead {
        let budget = self.state.catch_up_budget.clone();
        let budget_max = self.state.config.catch_up_bytes_max;
        let reader = self.state.store.reader.clone();
        let after = self.link.cursor();
        let chunk_bytes_max = self.state.config.chunk_bytes_max;
        tokio::spawn(async move {
            let sizing = reader.clone();
            let first = tokio::task::spawn_blocking(move || {
                let conn = sizing.lock().expect("reader lock");
                first_entry_bytes(&conn, after)
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
            let need = 2 * chunk_bytes_max.max(first);
            let permit = budget
                .acquire_many_owned(permits(need, budget_max))
                .await
                .map_err(|e| e.to_string())?;
            let entries = tokio::task::spawn_blocking(move || {
                let conn = reader.lock().expect("reader lock");
                ServerCore::read_log_bounded(&conn, after, CATCH_UP_ENTRIES_MAX, chunk_bytes_max)
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
            Ok((entries, permit))
        })
    }

    /// Starts reading a chunk of an initial load on the store's reader.
    fn read_load(&self, read: LoadRead) -> LoadReading {
        let reader = self.state.store.reader.clone();
        let schema = self.state.store.schema.clone();
        tokio::task::spawn_blocking(move || {
            let conn = reader.lock().expect("reader lock");
            hearth_engine::server::read_load(&conn, &schema, &read).map_err(|e| e.to_string())
        })
    }

    /// A frame after the handshake: a push is checked, charged, decoded,
    /// and queued at the store.
    async fn on_frame(
        &mut self,
        bytes: Bytes,
        client_id: u64,
        reply: &mpsc::UnboundedSender<Reply>,
    ) -> Result<(), End> {
        let config = &self.state.config;
        let count = hearth_engine::protocol::push_len(&bytes).unwrap_or(0);
        if count > config.push_mutations_max as u64 {
            return Err(fatal(
                "TOO_MANY_MUTATIONS",
                format!(
                    "a push holds {count} mutations; at most {} per push",
                    config.push_mutations_max
                ),
                CloseReason::BadInput,
            ));
        }
        let now = Instant::now();
        let [frames, mutations, bytes_in] = &mut self.rates;
        for (ok, what, per_s) in [
            (frames.take(1, now), "frames", config.frames_per_s),
            (
                mutations.take(count, now),
                "mutations",
                config.mutations_per_s,
            ),
            (
                bytes_in.take(bytes.len() as u64, now),
                "bytes",
                config.bytes_per_s,
            ),
        ] {
            if !ok {
                return Err(fatal(
                    RATE_LIMITED,
                    format!(
                        "this connection sent more than {per_s} {what} a second (with a burst of twice that): reconnect after a pause"
                    ),
                    CloseReason::RateLimited,
                ));
            }
        }
        // Take room in the store queue before decoding, so that decoded
        // mutations never exceed the budget.
        let charge = bytes.len() + count as usize * MUTATION_MEMORY_BYTES;
        let budget = self.state.store.budget.clone();
        let permit = budget
            .acquire_many_owned(permits(charge, config.store_queue_bytes_max))
            .await
            .map_err(|_| {
                fatal(
                    "SHUTDOWN",
                    "the server is shutting down",
                    CloseReason::Shutdown,
                )
            })?;
        let msg = decode_client(&bytes, config.frame_bytes_max).map_err(bad_input)?;
        drop(bytes);
        if Rooms::handles(&msg) {
            if let Some(rooms) = &mut self.rooms {
                rooms.on_message(msg);
            }
            return Ok(());
        }
        let mut keep = Vec::new();
        for step in self.link.on_message(msg) {
            match step {
                Step::Send(msg) => {
                    if matches!(msg, ServerMsg::Rejected { .. }) {
                        Metrics::add(&self.state.metrics.mutations_rejected, 1);
                    }
                    self.queue_msg(&msg, true);
                }
                Step::Apply(mutations) => keep = mutations,
                Step::Close { code, message } => {
                    let reason = if code == "HANDSHAKE" {
                        CloseReason::Handshake
                    } else {
                        CloseReason::BadInput
                    };
                    return Err(fatal(code, message, reason));
                }
            }
        }
        if keep.is_empty() {
            return Ok(());
        }
        self.in_flight_mutations += keep.len();
        self.in_flight_bytes += charge;
        let cmd = ApplyCmd {
            conn_id: self.id,
            client_id,
            mutations: keep,
            bytes: charge,
            _permit: permit,
            reply: reply.clone(),
            principal: self.principal.clone(),
        };
        if self
            .state
            .store
            .commands
            .send(StoreCmd::Apply(cmd))
            .await
            .is_err()
        {
            return Err(fatal(
                "SHUTDOWN",
                "the server is shutting down",
                CloseReason::Shutdown,
            ));
        }
        Ok(())
    }
}

/// The stored size of the first log entry after `after` (0 if none).
fn first_entry_bytes(conn: &rusqlite::Connection, after: u64) -> rusqlite::Result<usize> {
    use rusqlite::OptionalExtension;
    let len: Option<i64> = conn
        .prepare_cached(
            "SELECT length(changes) FROM _hearth_log WHERE seq > ?1 ORDER BY seq LIMIT 1",
        )?
        .query_row([after as i64], |r| r.get(0))
        .optional()?;
    Ok(len.unwrap_or(0).max(0) as usize)
}
