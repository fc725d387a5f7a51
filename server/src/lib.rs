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
//!
//! Every queue is bounded: the store's command queue (a full queue makes
//! connections wait, which pushes back on devices), the broadcast ring (a
//! device that falls behind re-reads the log from its cursor, nothing is
//! dropped), and the frame size.

mod connection;
mod metrics;
mod store;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::{State, WebSocketUpgrade};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use hearth_engine::{Schema, ServerError};

pub use metrics::Metrics;

/// A static file the server serves: URL path, bytes, MIME type.
pub type Asset = (&'static str, &'static [u8], &'static str);

#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub schema: Schema,
    /// Largest WebSocket message accepted or sent.
    pub frame_bytes_max: usize,
    /// Most mutations applied in one store transaction.
    pub batch_mutations_max: usize,
}

impl ServerConfig {
    pub fn new(listen: SocketAddr, data_dir: PathBuf, schema: Schema) -> ServerConfig {
        ServerConfig {
            listen,
            data_dir,
            schema,
            frame_bytes_max: hearth_engine::protocol::FRAME_BYTES_MAX,
            batch_mutations_max: 2_000,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot use data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open the store: {0}")]
    Store(#[from] ServerError),
    #[error("cannot open the store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

pub(crate) struct AppState {
    pub store: store::StoreHandle,
    /// Turns true when the server shuts down; open connections close then,
    /// because a graceful shutdown waits for every connection to end.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
    pub metrics: Arc<Metrics>,
    pub frame_bytes_max: usize,
    pub assets: &'static [Asset],
}

/// A running server.
pub struct Running {
    pub addr: SocketAddr,
    pub metrics: Arc<Metrics>,
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

/// Opens the store and starts serving. Returns once the socket is bound.
pub async fn start(config: ServerConfig, assets: &'static [Asset]) -> Result<Running, StartError> {
    std::fs::create_dir_all(&config.data_dir).map_err(|source| StartError::DataDir {
        path: config.data_dir.clone(),
        source,
    })?;
    let metrics = Arc::new(Metrics::default());
    let (store, store_thread) = store::open(&config, metrics.clone())?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| StartError::Listen {
            addr: config.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| StartError::Listen {
        addr: config.listen,
        source,
    })?;
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let state = Arc::new(AppState {
        store,
        shutdown: shutdown_rx,
        metrics: metrics.clone(),
        frame_bytes_max: config.frame_bytes_max,
        assets,
    });
    let app = Router::new()
        .route("/sync", get(sync_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics_handler))
        .fallback(asset_handler)
        .with_state(state);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
            let _ = rx.await;
            let _ = shutdown_tx.send(true);
        });
        if let Err(e) = serve.await {
            eprintln!("hearth: server stopped: {e}");
        }
    });
    Ok(Running {
        addr,
        metrics,
        shutdown: Some(tx),
        task,
        store_thread: Some(store_thread),
    })
}

async fn sync_handler(State(state): State<Arc<AppState>>, ws: WebSocketUpgrade) -> Response {
    let max = state.frame_bytes_max;
    ws.max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| connection::run(socket, state))
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
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let path = match uri.path() {
        "/" => "/index.html",
        p => p,
    };
    let Some((_, bytes, mime)) = state.assets.iter().find(|(p, _, _)| *p == path) else {
        return (StatusCode::NOT_FOUND, "not found\n").into_response();
    };
    // Assets are not content-hashed in their names, so browsers revalidate
    // each load; the ETag makes that a cheap 304.
    let etag = format!("\"{:016x}\"", fnv1a(bytes));
    if headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        == Some(etag.as_str())
    {
        return (StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response();
    }
    (
        [
            (header::CONTENT_TYPE, mime.to_string()),
            (header::CACHE_CONTROL, "no-cache".to_string()),
            (header::ETAG, etag),
        ],
        *bytes,
    )
        .into_response()
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}
