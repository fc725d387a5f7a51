//! A native device: the engine's [`Client`] driven over a real WebSocket by
//! tokio. The CLI, the integration tests and the benchmarks use it; the
//! browser's SharedWorker drives the same engine the same way.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use hearth_engine::protocol::{decode_server, encode_client, ClientMsg, FRAME_BYTES_MAX};
use hearth_engine::{Client, ClientConfig, ClientError, Event};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("server unreachable at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("{0}")]
    Client(#[from] ClientError),
    #[error("connection closed: {0}")]
    Closed(String),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
}

impl SyncError {
    /// The server's own error code, when it sent one.
    pub fn server_code(&self) -> Option<&str> {
        match self {
            SyncError::Client(ClientError::Server { code, .. }) => Some(code),
            SyncError::Client(e @ ClientError::SchemaAhead(_)) => Some(e.code()),
            _ => None,
        }
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A random nonzero client id for a new device database.
pub fn new_client_id() -> u64 {
    rand::random::<u64>().max(1)
}

/// Opens a device database file (WAL, so readers never block the writer).
pub fn open_device(path: &std::path::Path, config: ClientConfig) -> Result<Client, ClientError> {
    let conn = rusqlite::Connection::open(path)?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA busy_timeout = 5000;",
    )?;
    Client::open(conn, new_client_id(), config)
}

pub async fn connect(url: &str, timeout: Duration) -> Result<Ws, SyncError> {
    let unreachable = |reason: String| SyncError::Unreachable {
        url: url.to_string(),
        reason,
    };
    // A small read buffer: tungstenite zeroes it before every read.
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(Some(FRAME_BYTES_MAX))
        .max_frame_size(Some(FRAME_BYTES_MAX))
        .read_buffer_size(hearth_server::READ_BUFFER_BYTES);
    match tokio::time::timeout(
        timeout,
        tokio_tungstenite::connect_async_with_config(url, Some(config), false),
    )
    .await
    {
        Err(_) => Err(unreachable(format!("no answer within {timeout:?}"))),
        Ok(Err(e)) => Err(unreachable(e.to_string())),
        Ok(Ok((ws, _))) => Ok(ws),
    }
}

/// What a sync session should reach before it returns.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Goal {
    /// The outbox is empty, every change the server had is applied, and
    /// every subscription's initial load is complete.
    Synced,
    /// This mutation has been applied or refused by the server.
    Resolved(u64),
}

pub async fn send(ws: &mut Ws, msgs: Vec<ClientMsg>) -> Result<(), SyncError> {
    for msg in msgs {
        ws.send(Message::Binary(encode_client(&msg).into()))
            .await
            .map_err(|e| SyncError::Closed(e.to_string()))?;
    }
    Ok(())
}

/// Receives one server message and hands it to the engine; returns the
/// engine's events. `Ok(None)` when the server closed the connection.
pub async fn step(client: &mut Client, ws: &mut Ws) -> Result<Option<Vec<Event>>, SyncError> {
    loop {
        let Some(frame) = ws.next().await else {
            return Ok(None);
        };
        let frame = frame.map_err(|e| SyncError::Closed(e.to_string()))?;
        let bytes = match frame {
            Message::Binary(b) => b,
            Message::Close(f) => {
                return Err(SyncError::Closed(
                    f.map(|f| f.reason.to_string()).unwrap_or_default(),
                ));
            }
            Message::Text(_) => return Err(SyncError::Closed("server sent a text frame".into())),
            _ => continue,
        };
        let msg = decode_server(&bytes, FRAME_BYTES_MAX)
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let out = client.handle(msg, now_ms())?;
        send(ws, out.send).await?;
        return Ok(Some(out.events));
    }
}

fn reached(client: &Client, goal: Goal, events: &[Event]) -> Result<bool, ClientError> {
    let status = client.status();
    if !status.connected {
        return Ok(false);
    }
    Ok(match goal {
        Goal::Synced => {
            status.caught_up
                && status.pending == 0
                && client.loads_done()?
        }
        Goal::Resolved(seq) => {
            events.iter().any(|e| {
                matches!(e, Event::Applied { seq: s, .. } | Event::Rejected { seq: s, .. } if *s == seq)
            }) || !client.pending_seqs()?.contains(&seq)
        }
    })
}

/// Connects (already connected: pass the socket), says Hello, and exchanges
/// messages until `goal` is reached. Every engine event is appended to `events`.
///
/// The socket is split: frames to send go through a queue to a writer that
/// runs beside the reader, so this side **keeps reading while it writes**
/// (a big outbox re-sent while the server sends a big catch-up cannot wedge
/// both sides in `send`). What is queued is what the engine released, which
/// its in-flight window bounds by what the server has answered. The whole
/// session ends within `timeout`.
pub async fn run_session(
    client: &mut Client,
    ws: &mut Ws,
    goal: Goal,
    timeout: Duration,
    events: &mut Vec<Event>,
) -> Result<(), SyncError> {
    let (mut sink, mut stream) = ws.split();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Message>();
    let writer = async move {
        while let Some(frame) = rx.recv().await {
            hearth_server::send_fragmented(&mut sink, frame)
                .await
                .map_err(|e| SyncError::Closed(e.to_string()))?;
        }
        Ok::<(), SyncError>(())
    };
    let queue = |msgs: Vec<ClientMsg>| {
        for msg in msgs {
            // The writer only stops on an error, which ends the session first.
            let _ = tx.send(Message::Binary(encode_client(&msg).into()));
        }
    };
    let reader = async {
        queue(client.on_connected());
        loop {
            let Some(frame) = stream.next().await else {
                return Err(SyncError::Closed("server closed the connection".into()));
            };
            let bytes = match frame.map_err(|e| SyncError::Closed(e.to_string()))? {
                Message::Binary(b) => b,
                Message::Close(f) => {
                    return Err(SyncError::Closed(
                        f.map(|f| f.reason.to_string()).unwrap_or_default(),
                    ));
                }
                Message::Text(_) => {
                    return Err(SyncError::Closed("server sent a text frame".into()))
                }
                _ => continue,
            };
            let msg = decode_server(&bytes, FRAME_BYTES_MAX)
                .map_err(|e| ClientError::Protocol(e.to_string()))?;
            drop(bytes);
            let out = client.handle(msg, now_ms())?;
            queue(out.send);
            let rewound = out
                .events
                .iter()
                .any(|e| matches!(e, Event::Rewound { .. }));
            events.extend(out.events);
            if rewound || reached(client, goal, events)? {
                return Ok(());
            }
        }
    };
    let deadline = tokio::time::Instant::now() + timeout;
    let mut writer = std::pin::pin!(writer);
    let work = async {
        tokio::select! {
            done = reader => done,
            failed = &mut writer => Err(failed.err().unwrap_or_else(|| SyncError::Closed("writer stopped".into()))),
        }
    };
    let result = match tokio::time::timeout_at(deadline, work).await {
        Err(_) => Err(SyncError::Timeout(timeout)),
        Ok(r) => r,
    };
    if result.is_ok() {
        // Frames the engine released before the goal was reached still go
        // out (the server answers them next time), within the close bound.
        drop(tx);
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let _ = tokio::time::timeout(left.min(CLOSE_TIMEOUT), writer).await;
    }
    result
}

/// The longest a polite close may take after a session; past it (or past
/// the session's deadline) the socket is dropped, so no close ever hangs on
/// a peer that stopped reading.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// The number a mutation made as `seq` has now: a device that found itself
/// rewound renumbers its pending mutations ([`Event::Rewound`]).
pub fn renumbered(mut seq: u64, events: &[Event]) -> u64 {
    for event in events {
        if let Event::Rewound { renumbered, .. } = event {
            if let Some((_, new)) = renumbered.iter().find(|(old, _)| *old == seq) {
                seq = *new;
            }
        }
    }
    seq
}

/// Connects, syncs to `goal`, and disconnects. A device that finds itself
/// rewound (it takes a new client id, see [`Event::Rewound`]) connects once
/// more under its new id, within the same `timeout`.
pub async fn sync_once(
    client: &mut Client,
    url: &str,
    goal: Goal,
    timeout: Duration,
) -> Result<Vec<Event>, SyncError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut events = Vec::new();
    let mut goal = goal;
    for _attempt in 0..2 {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let mut ws = connect(url, left.min(Duration::from_secs(5))).await?;
        let seen = events.len();
        let result = run_session(client, &mut ws, goal, left, &mut events).await;
        client.on_disconnected();
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let _ = tokio::time::timeout(left.min(CLOSE_TIMEOUT), ws.close(None)).await;
        drop(ws);
        let rewound = events[seen..]
            .iter()
            .any(|e| matches!(e, Event::Rewound { .. }));
        if !rewound {
            return result.map(|()| events);
        }
        if let Goal::Resolved(seq) = goal {
            goal = Goal::Resolved(renumbered(seq, &events[seen..]));
        }
    }
    Err(SyncError::Closed(
        "the server said this device was rewound twice in a row".into(),
    ))
}
