//! The typed Rust API: a tab's connection to the device's SharedWorker.
//!
//! [`Client::open`] connects (starting the worker if this is the first tab), waits until
//! the database has a schema and returns a handle with the same operations the JS API
//! has: [`Client::exec`], [`Client::edit_text`], [`Client::resolve`], [`Client::query`],
//! [`Client::live`], [`Client::status`], [`Client::on`], [`Client::sync`], and the
//! device's stream subscriptions: [`Client::subscribe`] (a [`StreamHold`]),
//! [`Client::subscriptions`]; and rooms (presence and broadcast, ephemeral):
//! [`Client::join_room`], [`Client::leave_room`], [`Client::send_to_room`], whose member
//! lists and messages arrive through [`Client::on`] as `Notice::RoomMembers`,
//! `RoomMessage` and `RoomRefused`.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::{Rc, Weak};

use hearth_bridge::{
    decode, encode, DecodeError, ErrorCode, ErrorReply, Notice, PageMessage, PendingWrite, Reply,
    Request, RowRef, Rows, StreamParam, StreamSubscription, SyncStatus, TextEdit, Value, Verdict,
    WorkerMessage,
};
use js_sys::{Array, Function, Promise, Reflect, Uint8Array};
use tokio::sync::oneshot;
use wasm_bindgen::prelude::*;
use wasm_bindgen::JsCast;
use wasm_bindgen_futures::JsFuture;
use web_sys::{MessageEvent, MessagePort, SharedWorker, WorkerOptions, WorkerType};

/// Requests one tab may have in flight. Past this, calls fail with BUSY at once instead
/// of piling up behind a stalled worker.
pub const PENDING_REQUESTS_MAX: usize = 10_000;

/// How long [`Client::sync`] waits by default before failing with OFFLINE.
pub const SYNC_TIMEOUT_MS_DEFAULT: u32 = 10_000;

/// Must match `hearth_worker::host::WORKER_NAME_PREFIX`: the worker derives its database
/// file from the name this side gives it.
const WORKER_NAME_PREFIX: &str = "hearth:";

type Waiter = oneshot::Sender<Result<Reply, ErrorReply>>;
type LiveCallback = Box<dyn FnMut(Result<Rows, ErrorReply>)>;
type Listener = Rc<dyn Fn(&Notice)>;
type WindowHandler = (&'static str, Closure<dyn Fn()>);
/// Called with (rows loaded so far, done) as a subscription's initial load progresses.
pub type ProgressCallback = Rc<dyn Fn(u64, bool)>;
type LoadWaiter = oneshot::Sender<Result<(), ErrorReply>>;

/// What this tab knows of one stream subscription it asked for.
#[derive(Default)]
struct StreamState {
    rows: u64,
    done: bool,
    /// Set when the server refused it; cleared by the next subscribe reply.
    refused: Option<ErrorReply>,
    /// Subscribe calls waiting for the load to be done.
    waiters: Vec<LoadWaiter>,
    /// (listener id, callback) for progress notices.
    progress: Vec<(u32, ProgressCallback)>,
}

/// What an `exec` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExecResult {
    /// The sequence number of the mutation it queued for the server, or `None` when it
    /// changed no synced row.
    pub mutation: Option<u64>,
    pub rows_affected: u64,
}

/// A connection from this tab to the SharedWorker hosting database `name`. Cheap to
/// clone; all clones share one port. Dropping the last clone closes the port.
#[derive(Clone)]
pub struct Client {
    inner: Rc<Inner>,
}

struct Inner {
    port: MessagePort,
    // Kept so that the worker is not collected while the tab uses it.
    worker: SharedWorker,
    pending: RefCell<HashMap<u32, Waiter>>,
    lives: RefCell<HashMap<u32, LiveCallback>>,
    /// Stream subscriptions this tab asked for, by id.
    streams: RefCell<HashMap<u64, StreamState>>,
    listeners: RefCell<Vec<(u32, Listener)>>,
    next_listener: Cell<u32>,
    status: Cell<SyncStatus>,
    next_id: Cell<u32>,
    /// Set once the connection can no longer work (version mismatch, worker failed to
    /// start); later calls fail at once with this error.
    broken: RefCell<Option<ErrorReply>>,
    on_message: Closure<dyn Fn(MessageEvent)>,
    on_error: Closure<dyn Fn(JsValue)>,
    /// (event name, handler) on `window`: pagehide says Bye, online/offline are forwarded.
    window_handlers: Vec<WindowHandler>,
}

/// A running live query; [`LiveQuery::stop`] (or dropping every clone of the
/// [`Client`]) ends it. Dropping a `LiveQuery` does not stop it.
pub struct LiveQuery {
    inner: Weak<Inner>,
    live_id: u32,
}

impl LiveQuery {
    /// Stops the callbacks; the worker drops the query.
    pub fn stop(&self) {
        if let Some(inner) = self.inner.upgrade() {
            if inner.lives.borrow_mut().remove(&self.live_id).is_some() {
                // The answer does not matter: nothing waits for it.
                let _ = inner.request(Request::Unsubscribe {
                    live_id: self.live_id,
                });
            }
        }
    }
}

/// This tab's hold on one of the device's stream subscriptions, from
/// [`Client::subscribe`]. The subscription stays while any tab holds it;
/// [`StreamHold::unsubscribe`] releases this hold. Dropping a `StreamHold` does not
/// release it.
pub struct StreamHold {
    inner: Weak<Inner>,
    sub: StreamSubscription,
    released: Cell<bool>,
    listeners: RefCell<Vec<u32>>,
}

impl StreamHold {
    /// The device's number for this stream and parameters (the same in every tab).
    pub fn id(&self) -> u64 {
        self.sub.id
    }

    /// The subscription as it was when the hold was taken.
    pub fn subscription(&self) -> &StreamSubscription {
        &self.sub
    }

    /// Calls `callback(rows, done)` with each later progress of the subscription's load
    /// (after a resumed or repeated load). Returns an id for [`StreamHold::off`].
    pub fn on_progress(&self, callback: ProgressCallback) -> u32 {
        let Some(inner) = self.inner.upgrade() else {
            return 0;
        };
        let id = inner.add_progress(self.sub.id, callback);
        self.listeners.borrow_mut().push(id);
        id
    }

    /// Removes a progress callback added by [`StreamHold::on_progress`].
    pub fn off(&self, listener: u32) {
        if let Some(inner) = self.inner.upgrade() {
            inner.remove_progress(self.sub.id, listener);
        }
        self.listeners.borrow_mut().retain(|l| *l != listener);
    }

    /// Releases this hold (once; later calls do nothing). Resolves to whether the device
    /// unsubscribed (no tab holds it any more), once its rows that no other subscription
    /// holds are gone, durably.
    pub async fn unsubscribe(&self) -> Result<bool, ErrorReply> {
        if self.released.replace(true) {
            return Ok(false);
        }
        let Some(inner) = self.inner.upgrade() else {
            return Err(closed());
        };
        for listener in self.listeners.borrow_mut().drain(..) {
            inner.remove_progress(self.sub.id, listener);
        }
        let reply = inner.request(Request::UnsubscribeStream { id: self.sub.id })?;
        drop(inner);
        match reply.await {
            Ok(Ok(Reply::StreamUnsubscribed { dropped })) => Ok(dropped),
            Ok(Ok(other)) => Err(unexpected(&other)),
            Ok(Err(error)) => Err(error),
            Err(_) => Err(closed()),
        }
    }
}

impl Client {
    /// Connects to (starting if needed) the SharedWorker at `worker_url` that hosts the
    /// database `name`, syncing with `server` (a `ws:`/`wss:` URL; the first tab's choice
    /// wins). Resolves once the database has a schema: at once on a device that has synced
    /// before, after the first contact with the server on a fresh one.
    ///
    /// `token` is the user's token for a server whose schema has `[auth]` (see
    /// [`Request::Open`]); `reset` lets a token for another user wipe the database.
    pub async fn open(
        worker_url: &str,
        name: &str,
        server: &str,
        token: Option<String>,
        reset: bool,
    ) -> Result<Client, ErrorReply> {
        let tab_lock = hold_tab_lock().await;
        let client = Client::connect(worker_url, name)?;
        let request = Request::Open {
            server: server.to_owned(),
            tab_lock,
            token,
            reset,
        };
        match client.inner.request(request)?.await {
            Ok(Ok(Reply::Opened(status))) => {
                client.inner.status.set(status);
                Ok(client)
            }
            Ok(Ok(other)) => Err(unexpected(&other)),
            Ok(Err(error)) => Err(error),
            Err(_) => Err(closed()),
        }
    }

    fn connect(worker_url: &str, name: &str) -> Result<Client, ErrorReply> {
        let options = WorkerOptions::new();
        options.set_type(WorkerType::Module);
        options.set_name(&format!("{WORKER_NAME_PREFIX}{name}"));
        let worker =
            SharedWorker::new_with_worker_options(worker_url, &options).map_err(|err| {
                ErrorReply::new(
                    ErrorCode::Closed,
                    format!("cannot start the Hearth worker at {worker_url}: {err:?}"),
                )
            })?;
        let port = worker.port();

        let inner = Rc::new_cyclic(|weak: &Weak<Inner>| {
            // The handlers hold a Weak so that dropping the last Client frees everything.
            let on_message = {
                let weak = weak.clone();
                Closure::<dyn Fn(MessageEvent)>::new(move |event: MessageEvent| {
                    if let Some(inner) = weak.upgrade() {
                        inner.on_frame(&event.data());
                    }
                })
            };
            let on_error = {
                let weak = weak.clone();
                Closure::<dyn Fn(JsValue)>::new(move |_event: JsValue| {
                    if let Some(inner) = weak.upgrade() {
                        inner.break_with(ErrorReply::new(
                            ErrorCode::Closed,
                            "the Hearth worker failed to start (see the worker's console)",
                        ));
                    }
                })
            };
            let window_message = |message: PageMessage| {
                let weak = weak.clone();
                Closure::<dyn Fn()>::new(move || {
                    if let Some(inner) = weak.upgrade() {
                        // A closed port has nothing left to tell.
                        let _ = inner.post(&message);
                    }
                })
            };
            let window_handlers = vec![
                ("pagehide", window_message(PageMessage::Bye)),
                (
                    "online",
                    window_message(PageMessage::Network { online: true }),
                ),
                (
                    "offline",
                    window_message(PageMessage::Network { online: false }),
                ),
            ];
            Inner {
                port: port.clone(),
                worker: worker.clone(),
                pending: RefCell::new(HashMap::new()),
                lives: RefCell::new(HashMap::new()),
                streams: RefCell::new(HashMap::new()),
                listeners: RefCell::new(Vec::new()),
                next_listener: Cell::new(1),
                status: Cell::new(SyncStatus::default()),
                next_id: Cell::new(1),
                broken: RefCell::new(None),
                on_message,
                on_error,
                window_handlers,
            }
        });
        worker.set_onerror(Some(inner.on_error.as_ref().unchecked_ref()));
        // Assigning onmessage starts the port.
        port.set_onmessage(Some(inner.on_message.as_ref().unchecked_ref()));
        if let Some(window) = web_sys::window() {
            for (name, handler) in &inner.window_handlers {
                let _ =
                    window.add_event_listener_with_callback(name, handler.as_ref().unchecked_ref());
            }
        }
        Ok(Client { inner })
    }

    /// Runs SQL that changes the database, as one transaction; resolves once the change is
    /// durable on this device. The write reaches the server in the background.
    pub async fn exec(&self, sql: &str, params: Vec<Value>) -> Result<ExecResult, ErrorReply> {
        let request = Request::Exec {
            sql: sql.to_owned(),
            params,
        };
        self.write(request).await
    }

    /// Edits the `text` column `column` of the row of `table` with primary key `key` by
    /// position (see [`TextEdit`]: positions count Unicode scalar values); each edit applies
    /// to the text the previous one left. Like [`Client::exec`]: one local transaction,
    /// resolved once durable on this device. Fails with INVALID_ARGUMENT for an unknown
    /// table, column or row, a column that does not merge as `text`, or an edit outside
    /// the text.
    pub async fn edit_text(
        &self,
        table: &str,
        key: Value,
        column: &str,
        edits: Vec<TextEdit>,
    ) -> Result<ExecResult, ErrorReply> {
        let request = Request::EditText {
            table: table.to_owned(),
            key,
            column: column.to_owned(),
            edits,
        };
        self.write(request).await
    }

    /// Resolves the open manual-merge conflict `conflict_id` (the `id` of a row of
    /// `hearth_conflicts`) by writing `value` to its cell. Like [`Client::exec`]: resolved
    /// once durable on this device; the server closes the conflict, or reopens it with one
    /// more candidate if a write this device had not seen raced it. Fails with
    /// INVALID_ARGUMENT when no such conflict is open on this device.
    pub async fn resolve(&self, conflict_id: &str, value: Value) -> Result<ExecResult, ErrorReply> {
        let request = Request::Resolve {
            conflict_id: conflict_id.to_owned(),
            value,
        };
        self.write(request).await
    }

    async fn write(&self, request: Request) -> Result<ExecResult, ErrorReply> {
        match self.call(request).await? {
            Reply::Exec {
                mutation,
                rows_affected,
            } => Ok(ExecResult {
                mutation,
                rows_affected,
            }),
            other => Err(unexpected(&other)),
        }
    }

    /// Runs one read-only statement; resolves with its rows.
    pub async fn query(&self, sql: &str, params: Vec<Value>) -> Result<Rows, ErrorReply> {
        let request = Request::Query {
            sql: sql.to_owned(),
            params,
        };
        match self.call(request).await? {
            Reply::Query(rows) => Ok(rows),
            other => Err(unexpected(&other)),
        }
    }

    /// Runs `sql` now and again after every change (by any tab, or from the server) to a
    /// table it reads, calling `callback` with the rows each time they differ. An error
    /// (bad SQL) is passed to `callback` once and ends the query.
    pub fn live(
        &self,
        sql: &str,
        params: Vec<Value>,
        mut callback: impl FnMut(Result<Rows, ErrorReply>) + 'static,
    ) -> LiveQuery {
        let request = Request::Subscribe {
            sql: sql.to_owned(),
            params,
        };
        let live_id = self.inner.next_id.get();
        match self.inner.request(request) {
            Ok(_reply) => {
                // The reply is routed to the callback, not to the dropped receiver: see
                // `Inner::on_frame`.
                self.inner.pending.borrow_mut().remove(&live_id);
                self.inner
                    .lives
                    .borrow_mut()
                    .insert(live_id, Box::new(callback));
            }
            Err(error) => callback(Err(error)),
        }
        LiveQuery {
            inner: Rc::downgrade(&self.inner),
            live_id,
        }
    }

    /// The sync status as the worker last reported it.
    pub fn status(&self) -> SyncStatus {
        self.inner.status.get()
    }

    /// Calls `listener` with every notice the worker pushes to all tabs: status changes,
    /// changed tables, rejected writes. Returns an id for [`Client::off`].
    pub fn on(&self, listener: impl Fn(&Notice) + 'static) -> u32 {
        let id = self.inner.next_listener.get();
        self.inner.next_listener.set(id.wrapping_add(1));
        self.inner
            .listeners
            .borrow_mut()
            .push((id, Rc::new(listener)));
        id
    }

    /// Removes a listener added by [`Client::on`].
    pub fn off(&self, id: u32) {
        self.inner.listeners.borrow_mut().retain(|(i, _)| *i != id);
    }

    /// The server's verdict on local write `mutation` (the `mutation` of an
    /// [`ExecResult`]): resolves once the server applied or refused it, at once if it has.
    /// Fails with UNKNOWN_MUTATION for a write this device does not know (never made, or
    /// settled more than `RECEIPTS_KEPT` writes ago).
    pub async fn settled(&self, mutation: u64) -> Result<Verdict, ErrorReply> {
        match self.call(Request::Settled { mutation }).await? {
            Reply::Settled(verdict) => Ok(verdict),
            other => Err(unexpected(&other)),
        }
    }

    /// The outbox: the writes waiting for the server, oldest first.
    pub async fn pending(&self) -> Result<Vec<PendingWrite>, ErrorReply> {
        match self.call(Request::Pending).await? {
            Reply::Pending(writes) => Ok(writes),
            other => Err(unexpected(&other)),
        }
    }

    /// Drops pending write `mutation` on purpose: undone on the device (the later pending
    /// writes redone over what is left), never sent, settled as rejected with code
    /// DISCARDED; every tab hears it as a rejection. Resolves, once durable, to the rows
    /// it had written. Fails with NOT_PENDING (settled already, or never made) or SENT (it
    /// went out to the server, which may have applied it: wait for its verdict).
    pub async fn discard(&self, mutation: u64) -> Result<Vec<RowRef>, ErrorReply> {
        match self.call(Request::Discard { mutation }).await? {
            Reply::Discarded { undone } => Ok(undone),
            other => Err(unexpected(&other)),
        }
    }

    /// Gives the worker a new token (after `Notice::TokenNeeded`): it connects with it at
    /// once. Fails with AUTH_USER_CHANGED for another user's token.
    pub async fn set_token(&self, token: String) -> Result<(), ErrorReply> {
        match self.call(Request::SetToken { token }).await? {
            Reply::TokenSet => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// Resolves once every local write has reached the server, the device has caught up
    /// and that is durable; fails with OFFLINE after `timeout_ms`.
    pub async fn sync(&self, timeout_ms: u32) -> Result<SyncStatus, ErrorReply> {
        match self.call(Request::Sync { timeout_ms }).await? {
            Reply::Synced(status) => Ok(status),
            other => Err(unexpected(&other)),
        }
    }

    /// Subscribes the device to the schema's stream `stream` with `params` (by name; a
    /// list for `IN :name`), taking a hold for this tab. Resolves once the stream's rows
    /// as of now are in the local database and durable: at once when the subscription was
    /// already loaded. Until then `progress(rows, done)` is called as chunks arrive. A
    /// subscription made offline waits for the connection.
    ///
    /// Fails with INVALID_ARGUMENT for an unknown stream or bad parameters (checked on
    /// the device), or the server's BAD_SUBSCRIPTION / TOO_MANY_SUBSCRIPTIONS.
    pub async fn subscribe(
        &self,
        stream: &str,
        params: Vec<(String, StreamParam)>,
        progress: Option<ProgressCallback>,
    ) -> Result<StreamHold, ErrorReply> {
        let request = Request::SubscribeStream {
            stream: stream.to_owned(),
            params,
        };
        // `Inner::on_frame` records the reply's state before this resumes, so no notice
        // that follows it can be missed.
        let sub = match self.call(request).await? {
            Reply::StreamSubscribed(sub) => sub,
            other => return Err(unexpected(&other)),
        };
        let hold = StreamHold {
            inner: Rc::downgrade(&self.inner),
            sub,
            released: Cell::new(false),
            listeners: RefCell::new(Vec::new()),
        };
        let id = hold.sub.id;
        let waiting = {
            let mut streams = self.inner.streams.borrow_mut();
            let state = streams.entry(id).or_default();
            if let Some(error) = state.refused.clone() {
                Err(error)
            } else if state.done {
                Ok(None)
            } else {
                let (waiter, done) = oneshot::channel();
                state.waiters.push(waiter);
                Ok(Some(done))
            }
        };
        let progress_id = progress.map(|callback| hold.on_progress(callback));
        let waited = match waiting {
            Err(error) => Err(error),
            Ok(None) => Ok(()),
            Ok(Some(done)) => done.await.unwrap_or_else(|_| Err(closed())),
        };
        if let Some(listener) = progress_id {
            hold.off(listener);
        }
        waited.map(|()| hold)
    }

    /// The device's stream subscriptions (every tab's, and those no tab holds since a
    /// restart).
    pub async fn subscriptions(&self) -> Result<Vec<StreamSubscription>, ErrorReply> {
        match self.call(Request::Subscriptions).await? {
            Reply::Subscriptions(subs) => Ok(subs),
            other => Err(unexpected(&other)),
        }
    }

    /// Joins room `room` as this tab with presence `state` (JSON text), or sets this tab's
    /// state in it. Resolves once checked (BAD_ROOM, PRESENCE_TOO_LARGE, BAD_JSON,
    /// TOO_MANY_ROOMS) and handed to the connection; offline, the worker joins when it
    /// reconnects (and rejoins after every reconnect). Member lists arrive as
    /// `Notice::RoomMembers`; a refusal by the server (ROOM_FULL) as `Notice::RoomRefused`.
    pub async fn join_room(&self, room: &str, state: String) -> Result<(), ErrorReply> {
        let request = Request::JoinRoom {
            room: room.to_owned(),
            state,
        };
        match self.call(request).await? {
            Reply::RoomJoined => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// This tab leaves `room` (nothing happens if it was not in it).
    pub async fn leave_room(&self, room: &str) -> Result<(), ErrorReply> {
        let request = Request::LeaveRoom {
            room: room.to_owned(),
        };
        match self.call(request).await? {
            Reply::RoomLeft => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// Broadcasts `message` (JSON text) to the other members of `room`, fire and forget:
    /// the server relays at most `relay_per_s` per member and second, the latest winning.
    /// Fails with NOT_IN_ROOM, MESSAGE_TOO_LARGE or BAD_JSON; offline, it is dropped.
    pub async fn send_to_room(&self, room: &str, message: String) -> Result<(), ErrorReply> {
        let request = Request::SendToRoom {
            room: room.to_owned(),
            message,
        };
        match self.call(request).await? {
            Reply::RoomSent => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// Closes this tab's port; pending and later calls fail with CLOSED. The worker and
    /// other tabs are not affected.
    pub fn close(&self) {
        let _ = self.inner.post(&PageMessage::Bye);
        self.inner.break_with(closed());
        self.inner.lives.borrow_mut().clear();
        self.inner.port.close();
    }

    async fn call(&self, request: Request) -> Result<Reply, ErrorReply> {
        match self.inner.request(request)?.await {
            Ok(result) => result,
            Err(_) => Err(closed()),
        }
    }
}

impl Inner {
    fn request(
        &self,
        request: Request,
    ) -> Result<oneshot::Receiver<Result<Reply, ErrorReply>>, ErrorReply> {
        if let Some(error) = self.broken.borrow().clone() {
            return Err(error);
        }
        if self.pending.borrow().len() >= PENDING_REQUESTS_MAX {
            return Err(ErrorReply::new(
                ErrorCode::Busy,
                format!("{PENDING_REQUESTS_MAX} requests are already in flight from this tab"),
            ));
        }
        let id = self.next_id.get();
        // Id 0 is reserved for worker errors that concern the whole port.
        self.next_id.set(id.checked_add(1).unwrap_or(1));
        let (waiter, reply) = oneshot::channel();
        self.pending.borrow_mut().insert(id, waiter);
        if let Err(error) = self.post(&PageMessage::Request { id, request }) {
            self.pending.borrow_mut().remove(&id);
            return Err(error);
        }
        Ok(reply)
    }

    fn post(&self, message: &PageMessage) -> Result<(), ErrorReply> {
        let frame = encode(message)
            .map_err(|err| ErrorReply::new(ErrorCode::InvalidArgument, err.to_string()))?;
        let array = Uint8Array::from(frame.as_slice());
        self.port
            .post_message_with_transferable(&array, &Array::of1(&array.buffer()))
            .map_err(|err| {
                ErrorReply::new(
                    ErrorCode::Closed,
                    format!("cannot send to the Hearth worker: {err:?}"),
                )
            })
    }

    fn on_frame(&self, data: &JsValue) {
        let Some(frame) = data.dyn_ref::<Uint8Array>().map(Uint8Array::to_vec) else {
            return;
        };
        match decode::<WorkerMessage>(&frame) {
            Ok(WorkerMessage::Response { id: 0, result }) => {
                let error = result.err().unwrap_or_else(|| {
                    ErrorReply::new(ErrorCode::Protocol, "reply without a request id")
                });
                self.fail_all(&error);
            }
            Ok(WorkerMessage::Response { id, result }) => {
                if let Ok(Reply::StreamSubscribed(sub)) = &result {
                    // Recorded now, before the caller resumes and before any later notice.
                    let mut streams = self.streams.borrow_mut();
                    let state = streams.entry(sub.id).or_default();
                    state.refused = None;
                    state.rows = sub.rows;
                    state.done = sub.loaded;
                }
                let waiter = self.pending.borrow_mut().remove(&id);
                if let Some(waiter) = waiter {
                    // The caller may have stopped waiting; nothing to do then.
                    let _ = waiter.send(result);
                } else {
                    // The first answer of a live query.
                    let rows = match result {
                        Ok(Reply::Subscribed(rows)) => Ok(rows),
                        Ok(other) => Err(unexpected(&other)),
                        Err(error) => Err(error),
                    };
                    let ends = rows.is_err();
                    self.deliver_live(id, rows, ends);
                }
            }
            Ok(WorkerMessage::Notice(notice)) => self.on_notice(notice),
            Err(err @ DecodeError::VersionMismatch { .. }) => self.break_with(err.into()),
            Err(err) => self.fail_all(&err.into()),
        }
    }

    fn on_notice(&self, notice: Notice) {
        match notice {
            Notice::LiveRows { live_id, result } => {
                let ends = result.is_err();
                self.deliver_live(live_id, result, ends);
                return;
            }
            Notice::Status(status) => self.status.set(status),
            Notice::Loaded { id, rows, done } => self.on_loaded(id, rows, done),
            Notice::SubscriptionRefused {
                id,
                ref code,
                ref reason,
            } => self.on_refused(id, code, reason),
            Notice::Changed { .. }
            | Notice::Rejected { .. }
            | Notice::RoomMembers { .. }
            | Notice::RoomMessage { .. }
            | Notice::RoomRefused { .. }
            | Notice::TokenNeeded { .. } => {}
        }
        // Listeners may add or remove listeners: call a snapshot.
        let listeners: Vec<Listener> = self
            .listeners
            .borrow()
            .iter()
            .map(|(_, l)| Rc::clone(l))
            .collect();
        for listener in listeners {
            listener(&notice);
        }
    }

    fn on_loaded(&self, id: u64, rows: u64, done: bool) {
        let (waiters, callbacks) = {
            let mut streams = self.streams.borrow_mut();
            let Some(state) = streams.get_mut(&id) else {
                return; // Another tab's subscription.
            };
            state.rows = rows;
            state.done = done;
            let waiters = if done {
                std::mem::take(&mut state.waiters)
            } else {
                Vec::new()
            };
            let callbacks: Vec<ProgressCallback> =
                state.progress.iter().map(|(_, c)| Rc::clone(c)).collect();
            (waiters, callbacks)
        };
        // Callbacks run with nothing borrowed, so they may subscribe or unsubscribe.
        for callback in callbacks {
            callback(rows, done);
        }
        for waiter in waiters {
            let _ = waiter.send(Ok(()));
        }
    }

    fn on_refused(&self, id: u64, code: &str, reason: &str) {
        let waiters = {
            let mut streams = self.streams.borrow_mut();
            let Some(state) = streams.get_mut(&id) else {
                return;
            };
            let error = ErrorReply::new(ErrorCode::from_engine(code), reason.to_owned());
            state.refused = Some(error);
            state.done = false;
            std::mem::take(&mut state.waiters)
        };
        let error = ErrorReply::new(ErrorCode::from_engine(code), reason.to_owned());
        for waiter in waiters {
            let _ = waiter.send(Err(error.clone()));
        }
    }

    fn add_progress(&self, id: u64, callback: ProgressCallback) -> u32 {
        let listener = self.next_listener.get();
        self.next_listener.set(listener.wrapping_add(1));
        self.streams
            .borrow_mut()
            .entry(id)
            .or_default()
            .progress
            .push((listener, callback));
        listener
    }

    fn remove_progress(&self, id: u64, listener: u32) {
        if let Some(state) = self.streams.borrow_mut().get_mut(&id) {
            state.progress.retain(|(l, _)| *l != listener);
        }
    }

    fn deliver_live(&self, live_id: u32, rows: Result<Rows, ErrorReply>, ends: bool) {
        // Taken out while it runs, so the callback may start or stop live queries.
        let Some(mut callback) = self.lives.borrow_mut().remove(&live_id) else {
            return; // Stopped meanwhile.
        };
        callback(rows);
        if !ends {
            self.lives.borrow_mut().entry(live_id).or_insert(callback);
        }
    }

    fn fail_all(&self, error: &ErrorReply) {
        let waiters: Vec<Waiter> = self.pending.borrow_mut().drain().map(|(_, w)| w).collect();
        for waiter in waiters {
            let _ = waiter.send(Err(error.clone()));
        }
        let loads: Vec<LoadWaiter> = self
            .streams
            .borrow_mut()
            .values_mut()
            .flat_map(|s| s.waiters.drain(..))
            .collect();
        for waiter in loads {
            let _ = waiter.send(Err(error.clone()));
        }
    }

    fn break_with(&self, error: ErrorReply) {
        self.broken.borrow_mut().get_or_insert(error.clone());
        self.fail_all(&error);
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The handlers are about to be freed; detach them first so the browser never
        // calls into a dropped closure.
        let _ = self.post(&PageMessage::Bye);
        self.port.set_onmessage(None);
        self.worker.set_onerror(None);
        if let Some(window) = web_sys::window() {
            for (name, handler) in &self.window_handlers {
                let _ = window
                    .remove_event_listener_with_callback(name, handler.as_ref().unchecked_ref());
            }
        }
        self.port.close();
    }
}

/// Takes a Web Lock with a fresh random name and holds it for as long as this page lives;
/// returns its name ("" when the browser has no Web Locks). The worker asks for the same
/// lock: when it gets it, this tab is gone, however it went (closed, crashed, killed).
async fn hold_tab_lock() -> String {
    let locks = web_sys::window()
        .map(|w| JsValue::from(w.navigator()))
        .and_then(|navigator| Reflect::get(&navigator, &"locks".into()).ok())
        .filter(|locks| !locks.is_undefined() && !locks.is_null());
    let Some(locks) = locks else {
        return String::new();
    };
    let Some(request) = Reflect::get(&locks, &"request".into())
        .ok()
        .and_then(|f| f.dyn_into::<Function>().ok())
    else {
        return String::new();
    };
    let name = format!(
        "hearth-tab-{:016x}{:016x}",
        (js_sys::Math::random() * 2f64.powi(53)) as u64,
        (js_sys::Math::random() * 2f64.powi(53)) as u64
    );
    let mut granted_resolve: Option<Function> = None;
    let granted = Promise::new(&mut |resolve, _reject| granted_resolve = Some(resolve));
    let Some(granted_resolve) = granted_resolve else {
        return String::new();
    };
    // The callback tells us the lock is ours, then returns a promise that never settles:
    // the lock is released only when the page goes away.
    let hold = Closure::once_into_js(move |_lock: JsValue| -> JsValue {
        let _ = granted_resolve.call0(&JsValue::UNDEFINED);
        Promise::new(&mut |_, _| {}).into()
    });
    if request
        .call2(&locks, &JsValue::from_str(&name), &hold)
        .is_err()
    {
        return String::new();
    }
    // Only once the lock is ours may the worker ask for it; otherwise it could be granted
    // to the worker first and the tab would look gone at once.
    if JsFuture::from(granted).await.is_err() {
        return String::new();
    }
    name
}

fn closed() -> ErrorReply {
    ErrorReply::new(
        ErrorCode::Closed,
        "the connection to the Hearth worker is closed",
    )
}

fn unexpected(reply: &Reply) -> ErrorReply {
    ErrorReply::new(
        ErrorCode::Protocol,
        format!("the worker answered with the wrong kind of reply: {reply:?}"),
    )
}
