//! One WebSocket connection: handshake, catch-up, then live traffic.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use hearth_engine::protocol::{decode_client, encode_server, ClientMsg, CodecError, ServerMsg};
use hearth_engine::server::Hello;
use hearth_engine::{LogEntry, ServerCore};
use tokio::sync::{broadcast, mpsc};

use crate::store::{ApplyCmd, Broadcast};
use crate::{AppState, Metrics};

const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
const CATCH_UP_ENTRIES_MAX: usize = 1_000;

/// Why a connection ends early, said to the device before closing.
struct Fatal {
    code: &'static str,
    message: String,
}

fn fatal(code: &'static str, message: impl Into<String>) -> Fatal {
    Fatal {
        code,
        message: message.into(),
    }
}

impl From<CodecError> for Fatal {
    fn from(e: CodecError) -> Self {
        let code = match e {
            CodecError::Version { .. } => "PROTOCOL_VERSION",
            CodecError::TooLarge { .. } => "FRAME_TOO_LARGE",
            CodecError::Malformed(_) => "BAD_FRAME",
        };
        fatal(code, e.to_string())
    }
}

pub(crate) async fn run(socket: WebSocket, state: Arc<AppState>) {
    Metrics::add(&state.metrics.connections_total, 1);
    state
        .metrics
        .connections_open
        .fetch_add(1, Ordering::Relaxed);
    let mut conn = Conn {
        socket,
        state: state.clone(),
        last_sent: 0,
    };
    if let Err(f) = conn.serve().await {
        if matches!(f.code, "BAD_FRAME" | "FRAME_TOO_LARGE" | "PROTOCOL_VERSION") {
            Metrics::add(&state.metrics.frames_malformed, 1);
        }
        let _ = conn
            .send(&ServerMsg::Error {
                code: f.code.to_string(),
                message: f.message.clone(),
            })
            .await;
        let reason = format!("{}: {}", f.code, f.message);
        let reason: String = reason.chars().take(120).collect();
        let _ = conn
            .socket
            .send(Message::Close(Some(CloseFrame {
                code: 1008,
                reason: reason.into(),
            })))
            .await;
    }
    state
        .metrics
        .connections_open
        .fetch_sub(1, Ordering::Relaxed);
}

struct Conn {
    socket: WebSocket,
    state: Arc<AppState>,
    /// The newest log entry sent to this device.
    last_sent: u64,
}

enum Incoming {
    Msg(ClientMsg),
    Closed,
}

impl Conn {
    async fn send(&mut self, msg: &ServerMsg) -> Result<(), Fatal> {
        let frame = encode_server(msg);
        Metrics::add(&self.state.metrics.bytes_out, frame.len() as u64);
        self.socket
            .send(Message::Binary(frame.into()))
            .await
            .map_err(|e| fatal("CLOSED", e.to_string()))
    }

    async fn recv(&mut self) -> Result<Incoming, Fatal> {
        loop {
            let Some(msg) = self.socket.recv().await else {
                return Ok(Incoming::Closed);
            };
            let msg = msg.map_err(|e| {
                let text = e.to_string();
                if text.contains("too long") || text.contains("too big") || text.contains("size") {
                    fatal(
                        "FRAME_TOO_LARGE",
                        format!("{text} (limit {} bytes)", self.state.frame_bytes_max),
                    )
                } else {
                    fatal("BAD_FRAME", text)
                }
            })?;
            match msg {
                Message::Binary(bytes) => {
                    Metrics::add(&self.state.metrics.bytes_in, bytes.len() as u64);
                    return Ok(Incoming::Msg(decode_client(
                        &bytes,
                        self.state.frame_bytes_max,
                    )?));
                }
                Message::Text(_) => {
                    return Err(fatal("BAD_FRAME", "Hearth speaks binary frames only"))
                }
                Message::Close(_) => return Ok(Incoming::Closed),
                Message::Ping(_) | Message::Pong(_) => continue,
            }
        }
    }

    async fn serve(&mut self) -> Result<(), Fatal> {
        let hello = match tokio::time::timeout(HELLO_TIMEOUT, self.recv()).await {
            Err(_) => return Err(fatal("HANDSHAKE", "no Hello within 10 seconds")),
            Ok(incoming) => match incoming? {
                Incoming::Closed => return Ok(()),
                Incoming::Msg(msg) => Hello::of(&msg)
                    .ok_or_else(|| fatal("HANDSHAKE", "the first message must be Hello"))?,
            },
        };
        let client_id = hello.client_id;
        // Subscribe before reading the log so that nothing committed in
        // between is missed; entries seen twice are skipped by `last_sent`.
        let mut live = self.state.store.changes.subscribe();
        let head = self.state.metrics.server_seq.load(Ordering::Relaxed);
        let reader = self.state.store.reader.clone();
        let schema = self.state.store.schema.clone();
        let frame_bytes_max = self.state.frame_bytes_max;
        let answer = tokio::task::spawn_blocking(move || {
            let conn = reader.lock().expect("reader lock");
            hearth_engine::server::greet(&conn, &schema, head, &hello, frame_bytes_max)
        })
        .await
        .map_err(|e| fatal("INTERNAL", e.to_string()))?
        .map_err(|e| fatal("STORE", e.to_string()))?;
        if let ServerMsg::Error { code, message } = answer {
            let code = if code == hearth_engine::server::DEVICE_REWOUND {
                hearth_engine::server::DEVICE_REWOUND
            } else {
                "HANDSHAKE"
            };
            return Err(fatal(code, message));
        }
        self.send(&answer).await?;
        let cursor = hello.cursor;
        self.last_sent = cursor;
        self.catch_up().await?;

        let (reply_tx, mut replies) = mpsc::unbounded_channel();
        let mut shutdown = self.state.shutdown.clone();
        loop {
            tokio::select! {
                _ = shutdown.changed() => {
                    return Err(fatal("SHUTDOWN", "the server is shutting down"));
                }
                incoming = self.recv() => match incoming? {
                    Incoming::Closed => return Ok(()),
                    Incoming::Msg(ClientMsg::Hello { .. }) => {
                        return Err(fatal("HANDSHAKE", "Hello sent twice on one connection"));
                    }
                    Incoming::Msg(ClientMsg::Push { mutations }) => {
                        if mutations.is_empty() {
                            continue;
                        }
                        let cmd = ApplyCmd { client_id, mutations, reply: reply_tx.clone() };
                        if self.state.store.commands.send(cmd).await.is_err() {
                            return Err(fatal("SHUTDOWN", "the server is shutting down"));
                        }
                    }
                },
                entries = live.recv() => match entries {
                    Ok(batch) => self.send_batch(&batch).await?,
                    Err(broadcast::error::RecvError::Lagged(_)) => self.catch_up().await?,
                    Err(broadcast::error::RecvError::Closed) => {
                        return Err(fatal("SHUTDOWN", "the server is shutting down"));
                    }
                },
                Some(reply) = replies.recv() => {
                    let is_error = matches!(reply, ServerMsg::Error { .. });
                    self.send(&reply).await?;
                    if is_error {
                        return Ok(());
                    }
                }
            }
        }
    }

    async fn send_batch(&mut self, batch: &Broadcast) -> Result<(), Fatal> {
        let Some(last) = batch.entries.last().map(|e| e.server_seq) else {
            return Ok(());
        };
        if batch.entries[0].server_seq > self.last_sent {
            // The common case: the shared, already encoded frame fits as is.
            Metrics::add(&self.state.metrics.bytes_out, batch.frame.len() as u64);
            self.socket
                .send(Message::Binary(batch.frame.clone().into()))
                .await
                .map_err(|e| fatal("CLOSED", e.to_string()))?;
        } else {
            let fresh: Vec<LogEntry> = batch
                .entries
                .iter()
                .filter(|e| e.server_seq > self.last_sent)
                .cloned()
                .collect();
            if fresh.is_empty() {
                return Ok(());
            }
            self.send(&ServerMsg::Changes {
                entries: fresh,
                caught_up: true,
            })
            .await?;
        }
        self.last_sent = last;
        Ok(())
    }

    /// Sends the log from `last_sent` to the head, in frames that fit.
    async fn catch_up(&mut self) -> Result<(), Fatal> {
        loop {
            let reader = self.state.store.reader.clone();
            let after = self.last_sent;
            let bytes_max = self.state.frame_bytes_max / 2;
            let entries = tokio::task::spawn_blocking(move || {
                let conn = reader.lock().expect("reader lock");
                ServerCore::read_log_bounded(&conn, after, CATCH_UP_ENTRIES_MAX, bytes_max)
            })
            .await
            .map_err(|e| fatal("INTERNAL", e.to_string()))?
            .map_err(|e| fatal("STORE", e.to_string()))?;
            let head = self.state.metrics.server_seq.load(Ordering::Relaxed);
            if let Some(last) = entries.last().map(|e| e.server_seq) {
                self.last_sent = last;
            }
            // Entries committed after this point reach the device through the
            // broadcast, so "caught up" is relative to the head read here.
            let done = entries.is_empty() || self.last_sent >= head;
            self.send(&ServerMsg::Changes {
                entries,
                caught_up: done,
            })
            .await?;
            if done {
                return Ok(());
            }
        }
    }
}
