//! The server's one room registry ([`hearth_engine::rooms::Rooms`], sans-io)
//! behind a mutex, and the plumbing around it: each connection in the
//! ephemeral lane has a bounded queue of room frames its task writes, a
//! ticker drives the registry's clock, and a connection the registry finds
//! silent is told to close. Nothing here reaches the store.
//!
//! A connection's room queue is bounded ([`ROOM_QUEUE_FRAMES`]). When it is
//! full (the device reads slower than its rooms talk), a relayed broadcast
//! for it is dropped (broadcasts are latest-wins anyway; counted in
//! `hearth_room_frames_dropped_total`) and a presence diff it missed is
//! made good: the connection gets every room's whole list once its queue
//! has room again.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use hearth_engine::protocol::{encode_server, ClientMsg, ServerMsg};
use hearth_engine::rooms::{ConnId, Out, Rooms, RoomsConfig};
use tokio::sync::mpsc;

use crate::Metrics;

/// Room frames queued for one connection's task.
pub const ROOM_QUEUE_FRAMES: usize = 1_024;

/// How often the registry's clock is driven (expiry, held-back broadcasts).
pub const TICK_MS: u64 = 25;

/// What the registry tells a connection's task.
pub(crate) enum RoomOut {
    Frame(Bytes),
    /// The device was silent past `member_timeout_ms`: its members left;
    /// close the connection (it reconnects and rejoins).
    Close,
}

struct Inner {
    rooms: Rooms,
    queues: HashMap<ConnId, mpsc::Sender<RoomOut>>,
    /// Connections that missed a presence diff.
    resync: HashSet<ConnId>,
}

pub(crate) struct RoomHub {
    inner: Mutex<Inner>,
    metrics: Arc<Metrics>,
    /// Wall-clock milliseconds at `started`: times are monotonic from there
    /// (a clock step never expires everyone) yet read as dates by devices.
    epoch_ms: u64,
    started: Instant,
}

impl RoomHub {
    pub fn new(config: RoomsConfig, metrics: Arc<Metrics>) -> RoomHub {
        let epoch_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        RoomHub {
            inner: Mutex::new(Inner {
                rooms: Rooms::new(config),
                queues: HashMap::new(),
                resync: HashSet::new(),
            }),
            metrics,
            epoch_ms,
            started: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch_ms + self.started.elapsed().as_millis() as u64
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The registry's methods do not panic on input; a poisoned lock
        // means a bug, and the rooms are only ephemeral: carry on.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A connection past its Hello; the receiver carries its room frames.
    pub fn connect(&self, conn: ConnId, client_id: u64) -> mpsc::Receiver<RoomOut> {
        let (tx, rx) = mpsc::channel(ROOM_QUEUE_FRAMES);
        let now = self.now_ms();
        let mut inner = self.lock();
        inner.rooms.connect(conn, client_id, now);
        inner.queues.insert(conn, tx);
        rx
    }

    /// Something arrived from `conn` (a frame, a pong): it is alive.
    pub fn heard(&self, conn: ConnId) {
        let now = self.now_ms();
        self.lock().rooms.heard(conn, now);
    }

    pub fn on_message(&self, conn: ConnId, msg: ClientMsg) {
        let now = self.now_ms();
        let mut inner = self.lock();
        let out = inner.rooms.on_message(conn, msg, now);
        self.dispatch(&mut inner, out);
    }

    /// `conn` ended: its members leave now.
    pub fn gone(&self, conn: ConnId) {
        let now = self.now_ms();
        let mut inner = self.lock();
        inner.queues.remove(&conn);
        inner.resync.remove(&conn);
        let out = inner.rooms.gone(conn, now);
        self.dispatch(&mut inner, out);
    }

    pub fn tick(&self) {
        let now = self.now_ms();
        let mut inner = self.lock();
        let tick = inner.rooms.tick(now);
        for conn in tick.expired {
            if let Some(queue) = inner.queues.get(&conn) {
                // A full queue is a stalled connection; its own peer timeout
                // or write timeout ends it.
                let _ = queue.try_send(RoomOut::Close);
            }
        }
        self.dispatch(&mut inner, tick.out);
        let resync: Vec<ConnId> = inner.resync.iter().copied().collect();
        for conn in resync {
            let room_for_all = inner
                .queues
                .get(&conn)
                .is_some_and(|q| q.capacity() >= inner.rooms.memberships(conn).max(1));
            if room_for_all {
                inner.resync.remove(&conn);
                let lists = inner.rooms.full_lists(conn);
                self.dispatch(&mut inner, lists);
            }
        }
    }

    fn dispatch(&self, inner: &mut Inner, out: Vec<Out>) {
        for Out { to, msg } in out {
            let frame = Bytes::from(encode_server(&msg));
            let presence = matches!(msg, ServerMsg::Presence { .. });
            for conn in to {
                let Some(queue) = inner.queues.get(&conn) else {
                    continue;
                };
                if inner.resync.contains(&conn) && presence {
                    // The whole list follows; a diff before it is moot.
                    continue;
                }
                if queue.try_send(RoomOut::Frame(frame.clone())).is_err() {
                    Metrics::add(&self.metrics.room_frames_dropped, 1);
                    if presence {
                        inner.resync.insert(conn);
                    }
                }
            }
        }
    }
}

/// Drives the registry's clock until the server shuts down.
pub(crate) fn spawn_ticker(hub: Arc<RoomHub>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_millis(TICK_MS));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = every.tick() => hub.tick(),
                _ = shutdown.wait_for(|down| *down) => return,
            }
        }
    });
}

/// One connection's end of the hub, and a throttle on how often it reports
/// that its peer is alive. Dropping it (the connection ended, however) makes
/// the connection's members leave.
pub(crate) struct RoomLink {
    hub: Arc<RoomHub>,
    conn: ConnId,
    told: Instant,
}

/// A connection's queue of room frames.
pub(crate) struct RoomRx(mpsc::Receiver<RoomOut>);

/// How often a connection tells the hub its peer is alive, at most.
const HEARD_EVERY: Duration = Duration::from_millis(250);

impl RoomLink {
    pub fn new(hub: Arc<RoomHub>, conn: ConnId, client_id: u64) -> (RoomLink, RoomRx) {
        let rx = hub.connect(conn, client_id);
        let link = RoomLink {
            hub,
            conn,
            told: Instant::now(),
        };
        (link, RoomRx(rx))
    }

    /// The peer is alive (or the server is not reading it, which is not the
    /// peer's fault).
    pub fn heard(&mut self) {
        if self.told.elapsed() >= HEARD_EVERY {
            self.told = Instant::now();
            self.hub.heard(self.conn);
        }
    }

    /// A room message from the peer (`Rooms::handles` said so).
    pub fn on_message(&mut self, msg: ClientMsg) {
        self.told = Instant::now();
        self.hub.on_message(self.conn, msg);
    }
}

impl RoomRx {
    /// The next room frame for this connection; never ends while the
    /// connection is registered.
    pub async fn next(&mut self) -> RoomOut {
        match self.0.recv().await {
            Some(out) => out,
            None => std::future::pending().await,
        }
    }
}

impl Drop for RoomLink {
    fn drop(&mut self) {
        self.hub.gone(self.conn);
    }
}
