//! The SharedWorker host: one [`hearth_engine::Client`] on the IndexedDB connection, the
//! one WebSocket to the server, and every tab's port.
//!
//! Everything runs on the worker's one thread, as callbacks into one [`Host`] behind an
//! `Rc<RefCell<_>>`: a tab's message, a socket event, a timer, a flush barrier resolving.
//! Each callback runs to completion and none calls back into the host synchronously
//! (posting to a port, sending on a socket and starting a timer all deliver later), so
//! the `RefCell` is never borrowed twice.
//!
//! The engine is driven like `src/native_client.rs` drives it: on open, `on_connected`'s
//! Hello; every server frame through `handle`; its `send` out on the socket; on close,
//! `on_disconnected` and a reconnect with exponential backoff and jitter (at once when
//! the browser says the network is back).
//!
//! **Nothing leaves the device before it is durable on the device.** A commit in
//! relaxed-idb reaches IndexedDB later, so after every change the host queues a flush
//! barrier (a ticket) and parks what depends on it: the reply to an `exec`, the pushes it
//! made, the answer to `sync`. When the barrier resolves, everything parked up to that
//! ticket goes out, in order. A push sent before its mutation was durable could, after a
//! crash, reach the server while the device forgot it and reused its sequence number for
//! a different write, which the server would then drop as a duplicate.
//!
//! **Stream subscriptions are the device's, held by tabs.** The engine keeps them (they
//! survive restarts); the worker counts each tab's holds. A tab's `SubscribeStream` takes
//! a hold (the same stream and parameters are one subscription, one id, whichever tab asks);
//! its `UnsubscribeStream` releases one, and releasing the last hold of all tabs
//! unsubscribes the engine, which evicts the rows no other subscription holds. A tab that
//! goes away only drops its holds: when no tab is left holding a subscription, it stays in
//! the engine, exactly as after a restart, until a tab claims it again and lets it go.
//! Load progress (`Notice::Loaded`) waits for the flush barrier like a reply, so a tab
//! told that a load is done can rely on the rows being durable.
//!
//! **Rooms are ephemeral and never touch the database.** The worker keeps which tab is in
//! which room with which presence state (a member is this device's client id and the
//! tab's port number), joins them all again after every Hello (the server keys members by
//! (client id, tab), so a rejoin never doubles one), leaves a tab's rooms when the tab is
//! gone, says `Heartbeat` every `HEARTBEAT_INTERVAL_MS` while in a room (the server drops
//! a silent device's members within its `member_timeout_ms`), keeps the server's member
//! lists and hands each tab in a room the whole list on every change (empty while
//! offline), and relays broadcasts to the room's tabs other than the sender.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::rc::{Rc, Weak};

use hearth_bridge::{
    decode, encode, frame_version, ErrorCode, ErrorReply, Notice, PageMessage, PendingWrite, Reply,
    Request, RoomMember, RowRef, Rows, StreamParam, StreamSubscription, SyncStatus, Value, Verdict,
    WorkerMessage, PROTOCOL_VERSION,
};
use hearth_engine::client::SubscriptionInfo;
use hearth_engine::protocol::{
    decode_server, encode_client, ClientMsg, Member, MemberId, ServerMsg, FRAME_BYTES_MAX,
};
use hearth_engine::rooms::{self, RoomsConfig, HEARTBEAT_INTERVAL_MS};
use hearth_engine::{Client, ClientConfig, ClientError, Event, Param};
use js_sys::{Array, Function, Reflect, Uint8Array};
use wasm_bindgen::prelude::*;
use wasm_bindgen::JsCast;
use web_sys::{BinaryType, MessageEvent, MessagePort, SharedWorkerGlobalScope, WebSocket};

use crate::store::{open_connection, Durability};

/// Messages that may wait while the database opens, across all tabs. Past this, requests
/// are refused with BUSY at once rather than queued without limit.
pub const REQUEST_QUEUE_MAX: usize = 4096;

/// Live queries one tab may hold; past this, `Subscribe` fails with BUSY.
pub const LIVE_QUERIES_PER_TAB_MAX: usize = 1024;

/// The prefix a page puts before the database name in the SharedWorker's name, so that a
/// SharedWorker is shared per (origin, database name) and knows which file to open.
pub const WORKER_NAME_PREFIX: &str = "hearth:";

/// Bytes the socket may hold unsent before a room broadcast is dropped (they are
/// latest-wins: the next one says it again).
const ROOM_SEND_BUFFERED_MAX: u32 = 1024 * 1024;

/// Reconnect backoff: the first retry waits about this long, each failure doubles it.
const RECONNECT_BASE_MS: f64 = 250.0;
/// ... up to this.
const RECONNECT_MAX_MS: f64 = 15_000.0;

/// Starts serving. Called once by the worker entry script after the wasm has loaded, with
/// the `connect` events that arrived while it loaded.
#[wasm_bindgen]
pub fn run(pending_connects: Array) -> Result<(), JsValue> {
    // A panic is a bug: say what it was in the worker's console, not just "unreachable".
    std::panic::set_hook(Box::new(|info| {
        web_sys::console::error_1(&format!("hearth-worker panicked: {info}").into());
    }));
    let scope: SharedWorkerGlobalScope = js_sys::global().dyn_into().map_err(|_| {
        JsValue::from(js_sys::Error::new(
            "hearth-worker must run in a SharedWorker",
        ))
    })?;
    let file = database_file(&scope.name());
    let host = Rc::new_cyclic(|weak| RefCell::new(Host::new(weak.clone())));

    let on_connect = {
        let weak = Rc::downgrade(&host);
        Closure::<dyn Fn(MessageEvent)>::new(move |event: MessageEvent| {
            if let Some(host) = weak.upgrade() {
                host.borrow_mut().attach_ports(&event);
            }
        })
    };
    // Set the handler before handling the buffered events, in the same synchronous run, so
    // no connect can fall between the two.
    scope.set_onconnect(Some(on_connect.as_ref().unchecked_ref()));
    for event in pending_connects.iter() {
        if let Ok(event) = event.dyn_into::<MessageEvent>() {
            host.borrow_mut().attach_ports(&event);
        }
    }
    // The worker's own view of the network, besides what tabs report.
    for (name, online) in [("online", true), ("offline", false)] {
        let weak = Rc::downgrade(&host);
        let listener = Closure::<dyn Fn()>::new(move || {
            if let Some(host) = weak.upgrade() {
                host.borrow_mut().on_network(online);
            }
        });
        scope.add_event_listener_with_callback(name, listener.as_ref().unchecked_ref())?;
        listener.forget();
    }
    // The handler lives as long as the worker does, and so does the host.
    on_connect.forget();
    let opening = Rc::clone(&host);
    std::mem::forget(host);

    wasm_bindgen_futures::spawn_local(async move {
        let opened = open_connection(&file).await.map_err(|err| {
            ErrorReply::new(
                ErrorCode::Closed,
                format!("cannot open database {file}: {err}"),
            )
        });
        let opened = opened.and_then(|(conn, durability)| {
            let client = Client::open(conn, random_client_id(), ClientConfig::default())
                .map_err(|err| engine_error(&err))?;
            Ok((client, durability))
        });
        opening.borrow_mut().on_opened(opened);
    });
    Ok(())
}

/// The database file a SharedWorker named `worker_name` hosts.
pub fn database_file(worker_name: &str) -> String {
    let name = worker_name
        .strip_prefix(WORKER_NAME_PREFIX)
        .unwrap_or(worker_name);
    let name = if name.is_empty() { "default" } else { name };
    format!("{name}.sqlite3")
}

/// A random nonzero client id from the browser's CSPRNG; used only when the database has
/// none yet.
fn random_client_id() -> u64 {
    let mut bytes = [0u8; 8];
    let filled = js_sys::global()
        .dyn_into::<web_sys::WorkerGlobalScope>()
        .ok()
        .and_then(|scope| scope.crypto().ok())
        .and_then(|crypto| crypto.get_random_values_with_u8_array(&mut bytes).ok());
    if filled.is_none() {
        // No crypto (never in a browser that has SharedWorker): Math.random still gives
        // two devices different ids with overwhelming probability.
        for byte in &mut bytes {
            *byte = (js_sys::Math::random() * 256.0) as u8;
        }
    }
    u64::from_le_bytes(bytes).max(1)
}

fn now_ms() -> u64 {
    js_sys::Date::now() as u64
}

/// Runs `f` after `ms` milliseconds.
fn set_timeout(ms: f64, f: impl FnOnce() + 'static) {
    let Ok(scope) = js_sys::global().dyn_into::<web_sys::WorkerGlobalScope>() else {
        return;
    };
    let callback = Closure::once_into_js(f);
    let _ = scope.set_timeout_with_callback_and_timeout_and_arguments_0(
        callback.unchecked_ref(),
        ms.clamp(0.0, i32::MAX as f64) as i32,
    );
}

/// Requests the Web Lock `name` and runs `f` when it is granted. Returns false when the
/// browser has no Web Locks (an insecure context).
fn when_lock_granted(name: &str, f: impl FnOnce() + 'static) -> bool {
    let locks = Reflect::get(&js_sys::global(), &"navigator".into())
        .and_then(|navigator| Reflect::get(&navigator, &"locks".into()))
        .ok()
        .filter(|locks| !locks.is_undefined() && !locks.is_null());
    let Some(locks) = locks else {
        return false;
    };
    let Some(request) = Reflect::get(&locks, &"request".into())
        .ok()
        .and_then(|f| f.dyn_into::<Function>().ok())
    else {
        return false;
    };
    // Returning from the callback releases the lock at once: the worker only wants to
    // know that it could be had.
    let callback = Closure::once_into_js(move |_lock: JsValue| f());
    request
        .call2(&locks, &JsValue::from_str(name), &callback)
        .is_ok()
}

type PortId = u32;

struct Tab {
    port: MessagePort,
    _on_message: Closure<dyn Fn(MessageEvent)>,
}

struct Live {
    port: PortId,
    live_id: u32,
    sql: String,
    params: Vec<hearth_engine::Value>,
    tables: Vec<String>,
    last: Rows,
}

/// What waits for a flush barrier.
enum Parked {
    Reply {
        port: PortId,
        id: u32,
        result: Result<Reply, ErrorReply>,
    },
    Send {
        socket_gen: u64,
        messages: Vec<ClientMsg>,
    },
    /// A notice for every tab about what the barrier makes durable (load progress), or
    /// that must not overtake the replies parked before it (a refused subscription).
    Broadcast(Notice),
}

struct Socket {
    ws: WebSocket,
    gen: u64,
    _handlers: [Closure<dyn Fn(JsValue)>; 3],
}

enum Db {
    Opening(Vec<(PortId, PageMessage)>),
    Open {
        client: Box<Client>,
        durability: Durability,
    },
    Failed(ErrorReply),
}

struct Host {
    me: Weak<RefCell<Host>>,
    db: Db,
    tabs: HashMap<PortId, Tab>,
    next_port: PortId,
    lives: Vec<Live>,
    /// Holds on the engine's stream subscriptions: subscription id -> tab -> how many
    /// `SubscribeStream`s of that tab are not yet released.
    holds: HashMap<u64, HashMap<PortId, u32>>,
    /// Tabs whose `Open` waits for the schema.
    open_waiters: Vec<(PortId, u32)>,
    /// Tabs whose `Sync` waits, keyed by a waiter number for the timeout.
    sync_waiters: Vec<(u64, PortId, u32)>,
    /// Tabs whose `Settled` waits for the verdict on a pending write, by its number.
    settle_waiters: HashMap<u64, Vec<(PortId, u32)>>,
    /// Tabs waiting for an unsubscribe to complete (the server's
    /// `Unsubscribed`, or the end of the connection), by subscription id.
    unsubscribe_waiters: HashMap<u64, Vec<(PortId, u32)>>,
    next_waiter: u64,
    server: Option<String>,
    socket: Option<Socket>,
    /// Bumped for every socket, so events of a replaced socket are ignored.
    socket_gen: u64,
    failed_attempts: u32,
    /// Bumped whenever a scheduled reconnect is made obsolete.
    reconnect_gen: u64,
    reconnect_scheduled: bool,
    network_online: bool,
    next_ticket: u64,
    durable_ticket: u64,
    last_change_ticket: u64,
    parked: VecDeque<(u64, Parked)>,
    last_status: SyncStatus,
    /// The tabs' rooms: room -> tab -> presence state (JSON text). Never stored.
    rooms: BTreeMap<String, BTreeMap<PortId, String>>,
    /// The server's member list of each room this device is in, on this connection.
    room_members: HashMap<String, BTreeMap<MemberId, Member>>,
    heartbeat_scheduled: bool,
    /// The server refused or expired the token: no connection until a tab sends a new
    /// one (`Request::SetToken`).
    auth_blocked: bool,
    /// The server answered the last Hello with `SCHEMA_AHEAD` (its schema is
    /// older than this device's); cleared by the next Welcome.
    schema_ahead: bool,
    /// The token the server refused, and why: the same token is not tried again, and
    /// the tabs are asked again after a backoff.
    refused: Option<(String, String, String)>,
}

impl Host {
    fn new(me: Weak<RefCell<Host>>) -> Host {
        Host {
            me,
            db: Db::Opening(Vec::new()),
            tabs: HashMap::new(),
            next_port: 1,
            lives: Vec::new(),
            holds: HashMap::new(),
            open_waiters: Vec::new(),
            sync_waiters: Vec::new(),
            settle_waiters: HashMap::new(),
            unsubscribe_waiters: HashMap::new(),
            next_waiter: 1,
            server: None,
            socket: None,
            socket_gen: 0,
            failed_attempts: 0,
            reconnect_gen: 0,
            reconnect_scheduled: false,
            network_online: true,
            auth_blocked: false,
            schema_ahead: false,
            refused: None,
            next_ticket: 1,
            durable_ticket: 0,
            last_change_ticket: 0,
            parked: VecDeque::new(),
            last_status: SyncStatus::default(),
            rooms: BTreeMap::new(),
            room_members: HashMap::new(),
            heartbeat_scheduled: false,
        }
    }

    /// A callback that runs `f` on the host, if it is still there.
    fn later<A: 'static>(&self, f: impl FnOnce(&mut Host, A) + 'static) -> impl FnOnce(A) {
        let me = self.me.clone();
        move |arg| {
            if let Some(host) = me.upgrade() {
                f(&mut host.borrow_mut(), arg);
            }
        }
    }

    // --- tabs -----------------------------------------------------------------------

    fn attach_ports(&mut self, event: &MessageEvent) {
        for port in event.ports().iter() {
            let Ok(port) = port.dyn_into::<MessagePort>() else {
                continue;
            };
            let port_id = self.next_port;
            self.next_port = self.next_port.wrapping_add(1).max(1);
            let me = self.me.clone();
            let on_message = Closure::<dyn Fn(MessageEvent)>::new(move |event: MessageEvent| {
                if let Some(host) = me.upgrade() {
                    host.borrow_mut().on_port_message(port_id, &event.data());
                }
            });
            // Assigning onmessage also starts the port, delivering messages it queued.
            port.set_onmessage(Some(on_message.as_ref().unchecked_ref()));
            self.tabs.insert(
                port_id,
                Tab {
                    port,
                    _on_message: on_message,
                },
            );
        }
    }

    fn on_port_message(&mut self, port_id: PortId, data: &JsValue) {
        let Some(bytes) = data.dyn_ref::<Uint8Array>().map(Uint8Array::to_vec) else {
            self.post(
                port_id,
                &undecodable(ErrorReply::new(
                    ErrorCode::Protocol,
                    "expected a Uint8Array frame",
                )),
            );
            return;
        };
        let message = match decode::<PageMessage>(&bytes) {
            Ok(message) => message,
            Err(err) => {
                let theirs = frame_version(&bytes).unwrap_or(0);
                web_sys::console::warn_1(
                    &format!("hearth-worker: unreadable frame (page protocol {theirs}, ours {PROTOCOL_VERSION}): {err}").into(),
                );
                self.post(port_id, &undecodable(err.into()));
                return;
            }
        };
        if let Db::Opening(queue) = &mut self.db {
            if queue.len() >= REQUEST_QUEUE_MAX {
                if let PageMessage::Request { id, .. } = message {
                    let error = ErrorReply::new(
                        ErrorCode::Busy,
                        format!("{REQUEST_QUEUE_MAX} requests are already waiting"),
                    );
                    self.respond(port_id, id, Err(error));
                }
            } else {
                queue.push((port_id, message));
            }
            return;
        }
        self.on_page_message(port_id, message);
    }

    fn on_page_message(&mut self, port_id: PortId, message: PageMessage) {
        match message {
            PageMessage::Request { id, request } => self.on_request(port_id, id, request),
            PageMessage::Bye => self.on_tab_gone(port_id),
            PageMessage::Network { online } => self.on_network(online),
        }
    }

    fn on_tab_gone(&mut self, port_id: PortId) {
        if let Some(tab) = self.tabs.remove(&port_id) {
            tab.port.set_onmessage(None);
            tab.port.close();
        }
        self.lives.retain(|live| live.port != port_id);
        // Its holds go; the subscriptions stay in the engine (see the module doc).
        self.holds.retain(|_, tabs| {
            tabs.remove(&port_id);
            !tabs.is_empty()
        });
        self.open_waiters.retain(|(port, _)| *port != port_id);
        self.sync_waiters.retain(|(_, port, _)| *port != port_id);
        self.settle_waiters.retain(|_, waiters| {
            waiters.retain(|(port, _)| *port != port_id);
            !waiters.is_empty()
        });
        self.unsubscribe_waiters.retain(|_, waiters| {
            waiters.retain(|(port, _)| *port != port_id);
            !waiters.is_empty()
        });
        let rooms: Vec<String> = self
            .rooms
            .iter()
            .filter(|(_, tabs)| tabs.contains_key(&port_id))
            .map(|(room, _)| room.clone())
            .collect();
        for room in rooms {
            self.leave_room(&room, port_id);
        }
        self.parked.retain(
            |(_, parked)| !matches!(parked, Parked::Reply { port, .. } if *port == port_id),
        );
    }

    fn on_opened(&mut self, opened: Result<(Client, Durability), ErrorReply>) {
        let queued = match std::mem::replace(&mut self.db, Db::Opening(Vec::new())) {
            Db::Opening(queued) => queued,
            other => {
                self.db = other;
                return;
            }
        };
        self.db = match opened {
            Ok((client, durability)) => Db::Open {
                client: Box::new(client),
                durability,
            },
            Err(error) => {
                web_sys::console::error_1(&format!("hearth-worker: {error}").into());
                Db::Failed(error)
            }
        };
        for (port_id, message) in queued {
            self.on_page_message(port_id, message);
        }
        self.update_status();
    }

    fn on_request(&mut self, port_id: PortId, id: u32, request: Request) {
        let client = match &mut self.db {
            Db::Open { client, .. } => client,
            Db::Failed(error) => {
                let error = error.clone();
                return self.respond(port_id, id, Err(error));
            }
            Db::Opening(_) => unreachable!("requests wait in the queue while the database opens"),
        };
        match request {
            Request::Open {
                server,
                tab_lock,
                token,
                reset,
            } => {
                if self.server.is_none() {
                    self.server = Some(server);
                }
                if token.is_some() {
                    match client.set_token(token.clone()) {
                        Ok(()) => {}
                        Err(ClientError::UserChanged { .. }) if reset => {
                            // Another user signs in on this device: the database starts
                            // anew for them (the app asked for it with `reset`).
                            let Db::Open { client, durability } =
                                std::mem::replace(&mut self.db, Db::Opening(Vec::new()))
                            else {
                                unreachable!("matched above")
                            };
                            self.drop_socket();
                            let reopened = client
                                .reset(random_client_id())
                                .and_then(|mut c| c.set_token(token).map(|()| c));
                            match reopened {
                                Ok(client) => {
                                    self.db = Db::Open {
                                        client: Box::new(client),
                                        durability,
                                    };
                                    self.lives.clear();
                                    self.holds.clear();
                                }
                                Err(err) => {
                                    let error = engine_error(&err);
                                    self.db = Db::Failed(error.clone());
                                    return self.respond(port_id, id, Err(error));
                                }
                            }
                            self.broadcast(&Notice::Changed { tables: Vec::new() });
                            return self.on_request(
                                port_id,
                                id,
                                Request::Open {
                                    server: String::new(),
                                    tab_lock,
                                    token: None,
                                    reset: false,
                                },
                            );
                        }
                        Err(err) => return self.respond(port_id, id, Err(engine_error(&err))),
                    }
                    if self.auth_blocked {
                        self.auth_blocked = false;
                        self.failed_attempts = 0;
                    }
                }
                let has_schema = client.schema().is_some();
                if !tab_lock.is_empty() {
                    let gone = self.later(move |host, ()| host.on_tab_gone(port_id));
                    when_lock_granted(&tab_lock, move || gone(()));
                }
                if has_schema {
                    let status = self.status();
                    self.respond(port_id, id, Ok(Reply::Opened(status)));
                } else {
                    self.open_waiters.push((port_id, id));
                }
                self.connect();
            }
            Request::SetToken { token } => {
                if let Some((refused, code, message)) = self.refused.clone() {
                    if refused == token && self.auth_blocked {
                        // The app gave the token the server just refused: ask again later
                        // rather than hammer the server with it.
                        let error = ErrorReply::new(
                            ErrorCode::from_engine(&code),
                            format!("the server refused this token already ({message}): the token function must return a new one"),
                        );
                        self.respond(port_id, id, Err(error));
                        return self.ask_token_later(code, message);
                    }
                }
                let result = client
                    .set_token(Some(token))
                    .map(|()| Reply::TokenSet)
                    .map_err(|err| engine_error(&err));
                let taken = result.is_ok();
                self.respond(port_id, id, result);
                if taken {
                    self.auth_blocked = false;
                    self.failed_attempts = 0;
                    self.reconnect_gen += 1;
                    self.reconnect_scheduled = false;
                    self.drop_socket();
                    self.connect();
                }
            }
            Request::Exec { sql, params } => {
                let params = to_engine_values(params);
                let written = client.exec(&sql, &params, now_ms());
                self.after_write(port_id, id, written);
            }
            Request::EditText {
                table,
                key,
                column,
                edits,
            } => {
                let key = to_engine_value(key);
                let edits: Vec<hearth_engine::TextEdit> = edits
                    .into_iter()
                    .map(|e| hearth_engine::TextEdit {
                        index: e.index,
                        delete: e.delete,
                        insert: e.insert,
                    })
                    .collect();
                let written = client.edit_text(&table, &key, &column, &edits, now_ms());
                self.after_write(port_id, id, written);
            }
            Request::Resolve { conflict_id, value } => {
                let value = to_engine_value(value);
                let written = client.resolve(&conflict_id, &value, now_ms());
                self.after_write(port_id, id, written);
            }
            Request::Query { sql, params } => {
                let result = client
                    .query(&sql, &to_engine_values(params))
                    .map(|result| Reply::Query(to_rows(result)))
                    .map_err(|err| engine_error(&err));
                self.respond(port_id, id, result);
            }
            Request::Subscribe { sql, params } => {
                let count = self.lives.iter().filter(|l| l.port == port_id).count();
                if count >= LIVE_QUERIES_PER_TAB_MAX {
                    let error = ErrorReply::new(
                        ErrorCode::Busy,
                        format!("this tab already has {LIVE_QUERIES_PER_TAB_MAX} live queries"),
                    );
                    return self.respond(port_id, id, Err(error));
                }
                let params = to_engine_values(params);
                let started = client.tables_read(&sql).and_then(|tables| {
                    let rows = to_rows(client.query(&sql, &params)?);
                    Ok((tables, rows))
                });
                match started {
                    Ok((tables, rows)) => {
                        self.lives
                            .retain(|l| !(l.port == port_id && l.live_id == id));
                        self.lives.push(Live {
                            port: port_id,
                            live_id: id,
                            sql,
                            params,
                            tables,
                            last: rows.clone(),
                        });
                        self.respond(port_id, id, Ok(Reply::Subscribed(rows)));
                    }
                    Err(err) => self.respond(port_id, id, Err(engine_error(&err))),
                }
            }
            Request::Unsubscribe { live_id } => {
                self.lives
                    .retain(|l| !(l.port == port_id && l.live_id == live_id));
                self.respond(port_id, id, Ok(Reply::Unsubscribed));
            }
            Request::SubscribeStream { stream, params } => {
                let params: BTreeMap<String, Param> = params
                    .into_iter()
                    .map(|(name, param)| (name, to_engine_param(param)))
                    .collect();
                let subscribed = client
                    .subscribe(&stream, params)
                    .and_then(|(sub_id, output)| {
                        let info = client
                            .subscriptions()?
                            .into_iter()
                            .find(|s| s.id == sub_id)
                            .ok_or_else(|| {
                                ClientError::Protocol(format!(
                                    "subscription {sub_id} was not stored"
                                ))
                            })?;
                        Ok((info, output))
                    });
                match subscribed {
                    Ok((info, output)) => {
                        *self
                            .holds
                            .entry(info.id)
                            .or_default()
                            .entry(port_id)
                            .or_default() += 1;
                        // The reply says "loaded" only once that state is durable, and the
                        // Subscribe goes out only once the subscription is.
                        let ticket = self.barrier();
                        let reply = Reply::StreamSubscribed(self.to_stream_subscription(info));
                        self.park(
                            ticket,
                            Parked::Reply {
                                port: port_id,
                                id,
                                result: Ok(reply),
                            },
                        );
                        self.park_send(ticket, output.send);
                        self.on_events(output.events);
                    }
                    Err(err) => self.respond(port_id, id, Err(engine_error(&err))),
                }
            }
            Request::UnsubscribeStream { id: sub_id } => {
                let Some(tabs) = self.holds.get_mut(&sub_id) else {
                    let reply = Reply::StreamUnsubscribed { dropped: false };
                    return self.respond(port_id, id, Ok(reply));
                };
                let Some(count) = tabs.get_mut(&port_id) else {
                    let reply = Reply::StreamUnsubscribed { dropped: false };
                    return self.respond(port_id, id, Ok(reply));
                };
                *count -= 1;
                if *count == 0 {
                    tabs.remove(&port_id);
                }
                if !tabs.is_empty() {
                    let reply = Reply::StreamUnsubscribed { dropped: false };
                    return self.respond(port_id, id, Ok(reply));
                }
                self.holds.remove(&sub_id);
                match client.unsubscribe(sub_id) {
                    Ok(output) => {
                        // Answered once the eviction is done and durable: at once
                        // offline, else when the server's answer arrives (entries
                        // routed by the subscription may still be on their way), see
                        // `Event::Unsubscribed` in `on_events`.
                        self.unsubscribe_waiters
                            .entry(sub_id)
                            .or_default()
                            .push((port_id, id));
                        let ticket = self.barrier();
                        self.park_send(ticket, output.send);
                        self.on_events(output.events);
                    }
                    Err(err) => self.respond(port_id, id, Err(engine_error(&err))),
                }
            }
            Request::Subscriptions => {
                let result = client
                    .subscriptions()
                    .map(|subs| {
                        let subs = subs.into_iter().map(|s| self.to_stream_subscription(s));
                        Reply::Subscriptions(subs.collect())
                    })
                    .map_err(|err| engine_error(&err));
                self.respond(port_id, id, result);
            }
            Request::Status => {
                let status = self.status();
                self.respond(port_id, id, Ok(Reply::Status(status)));
            }
            Request::JoinRoom { room, state } => {
                let result = self.join_room(room, port_id, state);
                self.respond(port_id, id, result.map(|()| Reply::RoomJoined));
            }
            Request::LeaveRoom { room } => {
                self.leave_room(&room, port_id);
                self.respond(port_id, id, Ok(Reply::RoomLeft));
            }
            Request::SendToRoom { room, message } => {
                let result = self.send_to_room(room, port_id, message);
                self.respond(port_id, id, result.map(|()| Reply::RoomSent));
            }
            Request::Settled { mutation } => match client.settlement(mutation) {
                Ok(hearth_engine::Settlement::Pending) => {
                    self.settle_waiters
                        .entry(mutation)
                        .or_default()
                        .push((port_id, id));
                }
                Ok(hearth_engine::Settlement::Settled(verdict)) => {
                    self.respond(port_id, id, Ok(Reply::Settled(to_verdict(verdict))));
                }
                Ok(hearth_engine::Settlement::Unknown) => self.respond(
                    port_id,
                    id,
                    Err(ErrorReply::new(
                        ErrorCode::UnknownMutation,
                        format!(
                            "this device knows no write {mutation}: it was never made here, or settled more than {} writes ago",
                            hearth_engine::client::RECEIPTS_KEPT
                        ),
                    )),
                ),
                Err(err) => self.respond(port_id, id, Err(engine_error(&err))),
            },
            Request::Pending => {
                let result = client
                    .pending_writes()
                    .map(|writes| Reply::Pending(writes.into_iter().map(to_pending_write).collect()))
                    .map_err(|err| engine_error(&err));
                self.respond(port_id, id, result);
            }
            Request::Discard { mutation } => match client.discard(mutation) {
                Ok((undone, output)) => {
                    let ticket = self.barrier();
                    self.park(
                        ticket,
                        Parked::Reply {
                            port: port_id,
                            id,
                            result: Ok(Reply::Discarded {
                                undone: to_row_refs(undone),
                            }),
                        },
                    );
                    self.park_send(ticket, output.send);
                    self.on_events(output.events);
                }
                Err(err) => self.respond(port_id, id, Err(engine_error(&err))),
            },
            Request::Sync { timeout_ms } => {
                let waiter = self.next_waiter;
                self.next_waiter += 1;
                self.sync_waiters.push((waiter, port_id, id));
                let expire = self.later(move |host, ()| host.on_sync_timeout(waiter, timeout_ms));
                set_timeout(f64::from(timeout_ms), move || expire(()));
                self.connect();
                self.check_sync_waiters();
            }
        }
    }

    /// What every local write (`exec`, `editText`, `resolve`) does next: its reply and
    /// the pushes it made wait for a flush barrier; tabs and live queries hear of it now
    /// (they read the same worker's database, so they need not wait for the flush).
    fn after_write(
        &mut self,
        port_id: PortId,
        id: u32,
        written: Result<(hearth_engine::ExecOutcome, hearth_engine::Output), ClientError>,
    ) {
        match written {
            Ok((outcome, output)) => {
                let ticket = self.barrier();
                self.park(
                    ticket,
                    Parked::Reply {
                        port: port_id,
                        id,
                        result: Ok(Reply::Exec {
                            mutation: outcome.mutation,
                            rows_affected: outcome.rows_affected,
                        }),
                    },
                );
                self.park_send(ticket, output.send);
                self.on_events(output.events);
            }
            Err(err) => self.respond(port_id, id, Err(engine_error(&err))),
        }
    }

    // --- rooms (ephemeral) ------------------------------------------------------------

    /// The socket, if it is open (past `onopen`, so its Hello went first).
    fn open_socket(&self) -> Option<&WebSocket> {
        self.socket
            .as_ref()
            .map(|s| &s.ws)
            .filter(|ws| ws.ready_state() == WebSocket::OPEN)
    }

    fn join_room(
        &mut self,
        room: String,
        port_id: PortId,
        state: String,
    ) -> Result<(), ErrorReply> {
        // The server checks again, against its own limits; these are the defaults.
        let limits = RoomsConfig::default();
        let refuse =
            |(code, reason): (&str, String)| ErrorReply::new(ErrorCode::from_engine(code), reason);
        rooms::check_room_name(&room, limits.room_name_bytes_max).map_err(refuse)?;
        if state.len() > limits.state_bytes_max {
            return Err(ErrorReply::new(
                ErrorCode::PresenceTooLarge,
                format!(
                    "the presence state is {} bytes of JSON; at most {}",
                    state.len(),
                    limits.state_bytes_max
                ),
            ));
        }
        let memberships: usize = self.rooms.values().map(BTreeMap::len).sum();
        let already = self
            .rooms
            .get(&room)
            .is_some_and(|t| t.contains_key(&port_id));
        if !already && memberships >= limits.rooms_per_connection_max {
            return Err(ErrorReply::new(
                ErrorCode::TooManyRooms,
                format!(
                    "this device's tabs are in {memberships} rooms; at most {}",
                    limits.rooms_per_connection_max
                ),
            ));
        }
        self.rooms
            .entry(room.clone())
            .or_default()
            .insert(port_id, state.clone());
        self.room_send(ClientMsg::Join {
            room,
            tab: u64::from(port_id),
            state,
        });
        self.schedule_heartbeat();
        Ok(())
    }

    fn leave_room(&mut self, room: &str, port_id: PortId) {
        let Some(tabs) = self.rooms.get_mut(room) else {
            return;
        };
        if tabs.remove(&port_id).is_none() {
            return;
        }
        if tabs.is_empty() {
            self.rooms.remove(room);
            self.room_members.remove(room);
        }
        self.room_send(ClientMsg::Leave {
            room: room.to_owned(),
            tab: u64::from(port_id),
        });
    }

    fn send_to_room(
        &mut self,
        room: String,
        port_id: PortId,
        message: String,
    ) -> Result<(), ErrorReply> {
        let limits = RoomsConfig::default();
        if !self
            .rooms
            .get(&room)
            .is_some_and(|t| t.contains_key(&port_id))
        {
            return Err(ErrorReply::new(
                ErrorCode::NotInRoom,
                format!("this tab has not joined room {room:?} (call setPresence first)"),
            ));
        }
        if message.len() > limits.message_bytes_max {
            return Err(ErrorReply::new(
                ErrorCode::MessageTooLarge,
                format!(
                    "the message is {} bytes of JSON; at most {}",
                    message.len(),
                    limits.message_bytes_max
                ),
            ));
        }
        let backed_up = self
            .open_socket()
            .is_some_and(|ws| ws.buffered_amount() > ROOM_SEND_BUFFERED_MAX);
        if !backed_up {
            self.room_send(ClientMsg::Broadcast {
                room,
                tab: u64::from(port_id),
                message,
            });
        }
        Ok(())
    }

    /// Sends a room message now if the socket is open; otherwise the next Hello's rejoin
    /// says what matters (broadcasts made offline are gone, as fire-and-forget is).
    fn room_send(&mut self, message: ClientMsg) {
        if self.open_socket().is_some() {
            self.ws_send(vec![message]);
        }
    }

    /// After a Hello: every tab's rooms again.
    fn rejoin_rooms(&mut self) {
        let joins: Vec<ClientMsg> = self
            .rooms
            .iter()
            .flat_map(|(room, tabs)| {
                tabs.iter().map(|(port, state)| ClientMsg::Join {
                    room: room.clone(),
                    tab: u64::from(*port),
                    state: state.clone(),
                })
            })
            .collect();
        if !joins.is_empty() {
            self.ws_send(joins);
            self.schedule_heartbeat();
        }
    }

    fn schedule_heartbeat(&mut self) {
        if self.heartbeat_scheduled || self.rooms.is_empty() {
            return;
        }
        self.heartbeat_scheduled = true;
        let beat = self.later(|host, ()| {
            host.heartbeat_scheduled = false;
            if host.rooms.is_empty() {
                return;
            }
            host.room_send(ClientMsg::Heartbeat);
            host.schedule_heartbeat();
        });
        set_timeout(HEARTBEAT_INTERVAL_MS as f64, move || beat(()));
    }

    /// The connection is gone: so are the server's lists; the tabs see nobody until the
    /// next Hello's rejoin brings them back.
    fn rooms_offline(&mut self) {
        self.room_members.clear();
        let rooms: Vec<String> = self.rooms.keys().cloned().collect();
        for room in rooms {
            self.post_members(&room);
        }
    }

    fn on_room_message(&mut self, message: ServerMsg) {
        match message {
            ServerMsg::Presence {
                room,
                full,
                members,
                left,
            } => {
                if !self.rooms.contains_key(&room) {
                    return; // Every tab left meanwhile.
                }
                let list = self.room_members.entry(room.clone()).or_default();
                if full {
                    list.clear();
                }
                for member in members {
                    list.insert(member.id, member);
                }
                for id in left {
                    list.remove(&id);
                }
                self.post_members(&room);
            }
            ServerMsg::Relay {
                room,
                from,
                message,
            } => {
                let me = self.client_id();
                let Some(tabs) = self.rooms.get(&room) else {
                    return;
                };
                let notice = WorkerMessage::Notice(Notice::RoomMessage {
                    room: room.clone(),
                    client_id: from.client_id,
                    tab: from.tab,
                    message,
                });
                for port in tabs.keys() {
                    if !(from.client_id == me && from.tab == u64::from(*port)) {
                        self.post(*port, &notice);
                    }
                }
            }
            ServerMsg::RoomRefused {
                room,
                tab,
                code,
                reason,
            } => {
                let Ok(port) = PortId::try_from(tab) else {
                    return;
                };
                let joined = self.rooms.get(&room).is_some_and(|t| t.contains_key(&port));
                if !joined {
                    return;
                }
                // These refuse the join itself: the server has no such member.
                if [rooms::ROOM_FULL, rooms::TOO_MANY_ROOMS, rooms::BAD_ROOM]
                    .contains(&code.as_str())
                {
                    if let Some(tabs) = self.rooms.get_mut(&room) {
                        tabs.remove(&port);
                        if tabs.is_empty() {
                            self.rooms.remove(&room);
                            self.room_members.remove(&room);
                        }
                    }
                }
                let notice = WorkerMessage::Notice(Notice::RoomRefused { room, code, reason });
                self.post(port, &notice);
            }
            _ => {}
        }
    }

    fn client_id(&self) -> u64 {
        match &self.db {
            Db::Open { client, .. } => client.client_id(),
            _ => 0,
        }
    }

    /// Hands each tab in `room` the whole member list as this worker knows it.
    fn post_members(&self, room: &str) {
        let Some(tabs) = self.rooms.get(room) else {
            return;
        };
        let me = self.client_id();
        let list = self.room_members.get(room);
        for port in tabs.keys() {
            let members = list
                .into_iter()
                .flat_map(|l| l.values())
                .map(|m| RoomMember {
                    client_id: m.id.client_id,
                    tab: m.id.tab,
                    state: m.state.clone(),
                    since_ms: m.since_ms,
                    me: m.id.client_id == me && m.id.tab == u64::from(*port),
                })
                .collect();
            let notice = Notice::RoomMembers {
                room: room.to_owned(),
                members,
            };
            self.post(*port, &WorkerMessage::Notice(notice));
        }
    }

    /// A subscription as tabs see it, with how many tabs hold it.
    fn to_stream_subscription(&self, info: SubscriptionInfo) -> StreamSubscription {
        let tabs = self.holds.get(&info.id).map_or(0, |tabs| tabs.len() as u32);
        to_stream_subscription(info, tabs)
    }

    // --- durability -----------------------------------------------------------------

    /// Queues a flush barrier behind every commit so far; returns its ticket.
    fn barrier(&mut self) -> u64 {
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        self.last_change_ticket = ticket;
        let Db::Open { durability, .. } = &self.db else {
            return ticket;
        };
        let done = self.later(move |host, result| host.on_durable(ticket, result));
        match durability.flush() {
            Ok(wait) => wasm_bindgen_futures::spawn_local(async move {
                let result = wait.await.map_err(|err| {
                    ErrorReply::new(
                        ErrorCode::Storage,
                        format!("committed in memory but not saved to IndexedDB: {err}"),
                    )
                });
                done(result);
            }),
            Err(error) => {
                // Resolve on a later turn, like a barrier would, so callers see one order.
                set_timeout(0.0, move || done(Err(error)));
            }
        }
        ticket
    }

    fn park(&mut self, ticket: u64, parked: Parked) {
        self.parked.push_back((ticket, parked));
    }

    fn park_send(&mut self, ticket: u64, messages: Vec<ClientMsg>) {
        if !messages.is_empty() {
            let socket_gen = self.socket_gen;
            self.park(
                ticket,
                Parked::Send {
                    socket_gen,
                    messages,
                },
            );
        }
    }

    fn on_durable(&mut self, ticket: u64, result: Result<(), ErrorReply>) {
        // Barriers resolve in the order they were queued, so a later one covers every
        // earlier one, whatever order their futures are woken in.
        self.durable_ticket = self.durable_ticket.max(ticket);
        while self
            .parked
            .front()
            .is_some_and(|(t, _)| *t <= self.durable_ticket)
        {
            let Some((_, parked)) = self.parked.pop_front() else {
                break;
            };
            match parked {
                Parked::Reply {
                    port,
                    id,
                    result: reply,
                } => {
                    let reply = match &result {
                        Ok(()) => reply,
                        Err(error) => Err(error.clone()),
                    };
                    self.respond(port, id, reply);
                }
                Parked::Broadcast(notice) => {
                    // Progress not durable is no progress: a later barrier's notice says it.
                    if result.is_ok() || matches!(notice, Notice::SubscriptionRefused { .. }) {
                        self.broadcast(&notice);
                    }
                }
                Parked::Send {
                    socket_gen,
                    messages,
                } => {
                    if result.is_err() {
                        // Not durable, so not sent: a reconnect sends the outbox again
                        // once a later barrier succeeds.
                        self.drop_socket();
                        self.schedule_reconnect();
                    } else if socket_gen == self.socket_gen {
                        self.ws_send(messages);
                    }
                }
            }
        }
        if let Err(error) = &result {
            web_sys::console::error_1(&format!("hearth-worker: {error}").into());
        }
        self.update_status();
    }

    // --- the server connection ------------------------------------------------------

    fn connect(&mut self) {
        if self.socket.is_some()
            || self.auth_blocked
            || !self.network_online
            || self.reconnect_scheduled
            || !matches!(self.db, Db::Open { .. })
        {
            return;
        }
        let Some(url) = self.server.clone() else {
            return;
        };
        let ws = match WebSocket::new(&url) {
            Ok(ws) => ws,
            Err(err) => {
                web_sys::console::error_2(
                    &format!("hearth-worker: cannot open a WebSocket to {url}").into(),
                    &err,
                );
                self.schedule_reconnect();
                return;
            }
        };
        ws.set_binary_type(BinaryType::Arraybuffer);
        self.socket_gen += 1;
        let gen = self.socket_gen;
        let on_open = {
            let f = self.me.clone();
            Closure::<dyn Fn(JsValue)>::new(move |_| {
                if let Some(host) = f.upgrade() {
                    host.borrow_mut().on_ws_open(gen);
                }
            })
        };
        let on_message = {
            let f = self.me.clone();
            Closure::<dyn Fn(JsValue)>::new(move |event: JsValue| {
                let data = event
                    .dyn_ref::<MessageEvent>()
                    .map(MessageEvent::data)
                    .unwrap_or_default();
                if let Some(host) = f.upgrade() {
                    host.borrow_mut().on_ws_frame(gen, &data);
                }
            })
        };
        let on_close = {
            let f = self.me.clone();
            Closure::<dyn Fn(JsValue)>::new(move |_| {
                if let Some(host) = f.upgrade() {
                    host.borrow_mut().on_ws_closed(gen);
                }
            })
        };
        ws.set_onopen(Some(on_open.as_ref().unchecked_ref()));
        ws.set_onmessage(Some(on_message.as_ref().unchecked_ref()));
        // An error is always followed by close; close alone decides what happens next.
        ws.set_onclose(Some(on_close.as_ref().unchecked_ref()));
        self.socket = Some(Socket {
            ws,
            gen,
            _handlers: [on_open, on_message, on_close],
        });
    }

    fn on_ws_open(&mut self, gen: u64) {
        if gen != self.socket_gen {
            return;
        }
        let Db::Open { client, .. } = &mut self.db else {
            return;
        };
        let hello = client.on_connected();
        self.ws_send(hello);
        self.rejoin_rooms();
    }

    fn on_ws_frame(&mut self, gen: u64, data: &JsValue) {
        if gen != self.socket_gen {
            return;
        }
        let Db::Open { client, .. } = &mut self.db else {
            return;
        };
        let Some(buffer) = data.dyn_ref::<js_sys::ArrayBuffer>() else {
            web_sys::console::warn_1(&"hearth-worker: the server sent a text frame".into());
            return self.reconnect_after_failure();
        };
        let bytes = Uint8Array::new(buffer).to_vec();
        let handled = match decode_server(&bytes, FRAME_BYTES_MAX) {
            Ok(
                message @ (ServerMsg::Presence { .. }
                | ServerMsg::Relay { .. }
                | ServerMsg::RoomRefused { .. }),
            ) => return self.on_room_message(message),
            Ok(message) => client.handle(message, now_ms()),
            Err(err) => Err(ClientError::Protocol(err.to_string())),
        };
        match handled {
            Ok(output) => {
                if client.status().connected {
                    self.failed_attempts = 0;
                    self.schema_ahead = false;
                }
                let rewound = output
                    .events
                    .iter()
                    .any(|e| matches!(e, Event::Rewound { .. }));
                let ticket = self.barrier();
                self.park_send(ticket, output.send);
                self.on_events(output.events);
                if rewound {
                    // The engine took a new client id; this connection is over. Say
                    // Hello again under the new id, soon.
                    self.failed_attempts = 0;
                    return self.reconnect_after_failure();
                }
                self.update_status();
            }
            Err(ClientError::Server { code, message })
                if matches!(code.as_str(), "AUTH" | "AUTH_EXPIRED" | "AUTH_USER_CHANGED") =>
            {
                // Not a refusal of any write: they stay pending until a tab gives a new
                // token, and nothing is tried before that.
                let token = client.token().unwrap_or_default().to_string();
                self.drop_socket();
                self.auth_blocked = true;
                self.refused = Some((token, code.clone(), message.clone()));
                self.broadcast(&Notice::TokenNeeded { code, message });
                self.update_status();
            }
            Err(ClientError::SchemaAhead(message)) => {
                // Nothing is sent: the writes wait, the tabs see `schemaAhead`, and
                // the worker asks again with backoff until the server catches up.
                web_sys::console::warn_1(&format!("hearth-worker: SCHEMA_AHEAD: {message}").into());
                self.schema_ahead = true;
                self.reconnect_after_failure();
            }
            Err(err) => {
                web_sys::console::error_1(
                    &format!("hearth-worker: sync with the server failed: {err}").into(),
                );
                self.reconnect_after_failure();
            }
        }
    }

    fn on_ws_closed(&mut self, gen: u64) {
        if gen != self.socket_gen {
            return;
        }
        self.drop_socket();
        self.schedule_reconnect();
        self.update_status();
    }

    fn reconnect_after_failure(&mut self) {
        self.drop_socket();
        self.schedule_reconnect();
        self.update_status();
    }

    /// Forgets the socket at once (its late events are ignored) and tells the engine.
    fn drop_socket(&mut self) {
        if let Some(socket) = self.socket.take() {
            socket.ws.set_onopen(None);
            socket.ws.set_onmessage(None);
            socket.ws.set_onclose(None);
            let _ = socket.ws.close();
            debug_assert_eq!(socket.gen, self.socket_gen);
            // Sends parked for this socket must never reach the next one, which starts
            // with a Hello of its own.
            self.socket_gen += 1;
        }
        let events = match &mut self.db {
            Db::Open { client, .. } => client.on_disconnected().events,
            _ => Vec::new(),
        };
        if !events.is_empty() {
            // Unsubscribes that awaited this connection's answer completed.
            self.barrier();
            self.on_events(events);
        }
        self.rooms_offline();
    }

    fn schedule_reconnect(&mut self) {
        if self.reconnect_scheduled || !self.network_online {
            return;
        }
        let exponent = self.failed_attempts.min(16) as i32;
        let ceiling = (RECONNECT_BASE_MS * 2f64.powi(exponent)).min(RECONNECT_MAX_MS);
        // Full jitter on the upper half: tabs of many devices that lost the same server
        // do not all come back in the same millisecond.
        let delay = ceiling * (0.5 + 0.5 * js_sys::Math::random());
        self.failed_attempts = self.failed_attempts.saturating_add(1);
        self.reconnect_scheduled = true;
        let scheduled = self.reconnect_gen;
        let fire = self.later(move |host, ()| {
            if host.reconnect_gen == scheduled {
                host.reconnect_scheduled = false;
                host.connect();
            }
        });
        set_timeout(delay, move || fire(()));
    }

    /// Asks the tabs for a token again after the reconnect backoff, while the worker
    /// still has none the server takes.
    fn ask_token_later(&mut self, code: String, message: String) {
        let exponent = self.failed_attempts.min(16) as i32;
        let delay = (RECONNECT_BASE_MS * 2f64.powi(exponent)).min(RECONNECT_MAX_MS);
        self.failed_attempts = self.failed_attempts.saturating_add(1);
        let fire = self.later(move |host, ()| {
            if host.auth_blocked {
                host.broadcast(&Notice::TokenNeeded {
                    code: code.clone(),
                    message: message.clone(),
                });
            }
        });
        set_timeout(delay, move || fire(()));
    }

    fn on_network(&mut self, online: bool) {
        self.network_online = online;
        if online {
            // Back online: try now, not when the backoff timer says.
            self.reconnect_gen += 1;
            self.reconnect_scheduled = false;
            self.failed_attempts = 0;
            self.connect();
        } else {
            self.reconnect_gen += 1;
            self.reconnect_scheduled = false;
            self.drop_socket();
        }
        self.update_status();
    }

    fn ws_send(&mut self, messages: Vec<ClientMsg>) {
        let Some(socket) = &self.socket else {
            return;
        };
        for message in &messages {
            if let Err(err) = socket.ws.send_with_u8_array(&encode_client(message)) {
                web_sys::console::warn_2(&"hearth-worker: cannot send to the server".into(), &err);
                return self.reconnect_after_failure();
            }
        }
    }

    // --- events, live queries, status -------------------------------------------------

    fn on_events(&mut self, events: Vec<Event>) {
        for event in events {
            match event {
                Event::TablesChanged(tables) => {
                    self.rerun_live(&tables);
                    self.broadcast(&Notice::Changed { tables });
                }
                Event::Rejected {
                    seq,
                    code,
                    reason,
                    undone,
                } => {
                    let undone = to_row_refs(undone);
                    self.settle(
                        seq,
                        Verdict::Rejected {
                            code: code.clone(),
                            reason: reason.clone(),
                            undone: undone.clone(),
                        },
                    );
                    self.broadcast(&Notice::Rejected {
                        mutation: seq,
                        code,
                        reason,
                        undone,
                    });
                }
                Event::Applied { seq, server_seq } => {
                    self.settle(seq, Verdict::Applied { server_seq });
                }
                Event::SchemaInstalled { .. } => {
                    let status = self.status();
                    for (port, id) in std::mem::take(&mut self.open_waiters) {
                        self.respond(port, id, Ok(Reply::Opened(status)));
                    }
                    // Every live query may read a table that exists only now.
                    let all: Vec<String> =
                        self.lives.iter().flat_map(|l| l.tables.clone()).collect();
                    self.rerun_live(&all);
                }
                Event::Rewound {
                    reason, renumbered, ..
                } => {
                    // Waiters follow their writes to the new numbers.
                    let mut moved = HashMap::new();
                    for (old, new) in renumbered {
                        if let Some(waiters) = self.settle_waiters.remove(&old) {
                            moved.insert(new, waiters);
                        }
                    }
                    self.settle_waiters.extend(moved);
                    web_sys::console::warn_1(
                        &format!("hearth-worker: took a new client id: {reason}").into(),
                    );
                }
                Event::Loaded { id, rows, done } => {
                    // Behind the barrier that covers the chunk's commit.
                    let ticket = self.last_change_ticket;
                    self.park(ticket, Parked::Broadcast(Notice::Loaded { id, rows, done }));
                }
                Event::SubscriptionRefused { id, code, reason } => {
                    self.holds.remove(&id);
                    let ticket = self.last_change_ticket;
                    let notice = Notice::SubscriptionRefused { id, code, reason };
                    self.park(ticket, Parked::Broadcast(notice));
                }
                Event::Unsubscribed { id } => {
                    // Behind the barrier that covers the eviction's commit.
                    let ticket = self.last_change_ticket;
                    for (port, request) in self.unsubscribe_waiters.remove(&id).unwrap_or_default()
                    {
                        self.park(
                            ticket,
                            Parked::Reply {
                                port,
                                id: request,
                                result: Ok(Reply::StreamUnsubscribed { dropped: true }),
                            },
                        );
                    }
                }
                Event::CaughtUp { .. } => {}
            }
        }
    }

    /// Answers the tabs waiting for the verdict on write `seq`.
    fn settle(&mut self, seq: u64, verdict: Verdict) {
        for (port, id) in self.settle_waiters.remove(&seq).unwrap_or_default() {
            self.respond(port, id, Ok(Reply::Settled(verdict.clone())));
        }
    }

    fn rerun_live(&mut self, changed: &[String]) {
        let Db::Open { client, .. } = &self.db else {
            return;
        };
        let mut notices = Vec::new();
        for live in &mut self.lives {
            if !live.tables.iter().any(|t| changed.contains(t)) {
                continue;
            }
            let result = client
                .query(&live.sql, &live.params)
                .map(to_rows)
                .map_err(|err| engine_error(&err));
            if let Ok(rows) = &result {
                if *rows == live.last {
                    continue;
                }
                live.last = rows.clone();
            }
            notices.push((
                live.port,
                Notice::LiveRows {
                    live_id: live.live_id,
                    result,
                },
            ));
        }
        for (port, notice) in notices {
            self.post(port, &WorkerMessage::Notice(notice));
        }
    }

    fn status(&self) -> SyncStatus {
        match &self.db {
            Db::Open { client, .. } => {
                let status = client.status();
                SyncStatus {
                    online: status.connected,
                    caught_up: status.caught_up,
                    pending: status.pending,
                    server_seq: status.server_seq,
                    schema_version: status.schema_version,
                    schema_ahead: self.schema_ahead,
                }
            }
            _ => SyncStatus::default(),
        }
    }

    fn update_status(&mut self) {
        let status = self.status();
        if status != self.last_status {
            self.last_status = status;
            self.broadcast(&Notice::Status(status));
        }
        self.check_sync_waiters();
    }

    fn check_sync_waiters(&mut self) {
        if self.sync_waiters.is_empty() {
            return;
        }
        let status = self.status();
        let synced = status.online
            && status.caught_up
            && status.pending == 0
            && self.durable_ticket >= self.last_change_ticket;
        if synced {
            for (_, port, id) in std::mem::take(&mut self.sync_waiters) {
                self.respond(port, id, Ok(Reply::Synced(status)));
            }
        }
    }

    fn on_sync_timeout(&mut self, waiter: u64, timeout_ms: u32) {
        let Some(index) = self.sync_waiters.iter().position(|(w, _, _)| *w == waiter) else {
            return;
        };
        let (_, port, id) = self.sync_waiters.remove(index);
        let status = self.status();
        let message = if status.online {
            format!(
                "not synced within {timeout_ms} ms: {} writes still pending, caught up: {}",
                status.pending, status.caught_up
            )
        } else {
            format!("the server could not be reached within {timeout_ms} ms")
        };
        self.respond(port, id, Err(ErrorReply::new(ErrorCode::Offline, message)));
    }

    // --- posting --------------------------------------------------------------------

    fn broadcast(&self, notice: &Notice) {
        let message = WorkerMessage::Notice(notice.clone());
        let Ok(frame) = encode(&message) else {
            return;
        };
        for tab in self.tabs.values() {
            post_frame(&tab.port, &frame);
        }
    }

    fn respond(&self, port: PortId, id: u32, result: Result<Reply, ErrorReply>) {
        self.post(port, &WorkerMessage::Response { id, result });
    }

    fn post(&self, port: PortId, message: &WorkerMessage) {
        let Some(tab) = self.tabs.get(&port) else {
            return; // The tab is gone; so is its interest in the answer.
        };
        let frame = match encode(message) {
            Ok(frame) => frame,
            Err(err) => {
                let error = ErrorReply::new(ErrorCode::Protocol, err.to_string());
                let fallback = match message {
                    WorkerMessage::Response { id, .. } => WorkerMessage::Response {
                        id: *id,
                        result: Err(error),
                    },
                    WorkerMessage::Notice(Notice::LiveRows { live_id, .. }) => {
                        WorkerMessage::Notice(Notice::LiveRows {
                            live_id: *live_id,
                            result: Err(error),
                        })
                    }
                    WorkerMessage::Notice(_) => return,
                };
                encode(&fallback).expect("a short error reply always encodes")
            }
        };
        post_frame(&tab.port, &frame);
    }
}

fn post_frame(port: &MessagePort, frame: &[u8]) {
    let array = Uint8Array::from(frame);
    // Transferring the buffer hands it over instead of copying it.
    if let Err(err) = port.post_message_with_transferable(&array, &Array::of1(&array.buffer())) {
        web_sys::console::warn_2(&"hearth-worker: cannot post to a tab".into(), &err);
    }
}

fn undecodable(error: ErrorReply) -> WorkerMessage {
    // Id 0 is never used for a request, so the page reads this as "fail everything on
    // this port": without an id, the worker cannot say which request was unreadable.
    WorkerMessage::Response {
        id: 0,
        result: Err(error),
    }
}

/// The page-visible error for an engine error.
pub fn engine_error(err: &ClientError) -> ErrorReply {
    ErrorReply::new(ErrorCode::from_engine(err.code()), err.to_string())
}

pub fn to_engine_values(values: Vec<Value>) -> Vec<hearth_engine::Value> {
    values.into_iter().map(to_engine_value).collect()
}

pub fn to_engine_value(value: Value) -> hearth_engine::Value {
    match value {
        Value::Null => hearth_engine::Value::Null,
        Value::Integer(i) => hearth_engine::Value::Integer(i),
        Value::Real(f) => hearth_engine::Value::Real(f),
        Value::Text(s) => hearth_engine::Value::Text(s),
        Value::Blob(b) => hearth_engine::Value::Blob(b),
    }
}

pub fn to_engine_param(param: StreamParam) -> Param {
    match param {
        StreamParam::One(value) => Param::One(to_engine_value(value)),
        StreamParam::Many(values) => Param::Many(to_engine_values(values)),
    }
}

/// A subscription as tabs see it. The engine gives its parameters as JSON (a list as an
/// array); each value becomes the SQL value the engine's `params_from_json` would make of
/// it.
pub fn to_stream_subscription(info: SubscriptionInfo, tabs: u32) -> StreamSubscription {
    let params = match info.params {
        serde_json::Value::Object(object) => object
            .into_iter()
            .map(|(name, value)| {
                let param = match value {
                    serde_json::Value::Array(items) => {
                        StreamParam::Many(items.iter().map(json_to_value).collect())
                    }
                    other => StreamParam::One(json_to_value(&other)),
                };
                (name, param)
            })
            .collect(),
        _ => Vec::new(),
    };
    StreamSubscription {
        id: info.id,
        stream: info.stream,
        params,
        loaded: info.loaded,
        rows: info.rows,
        tabs,
    }
}

fn json_to_value(json: &serde_json::Value) -> Value {
    match json {
        serde_json::Value::Null => Value::Null,
        serde_json::Value::Bool(b) => Value::Integer(i64::from(*b)),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => Value::Integer(i),
            None => Value::Real(n.as_f64().unwrap_or(f64::NAN)),
        },
        serde_json::Value::String(s) => Value::Text(s.clone()),
        // Not made by the engine for a parameter; shown as its JSON text.
        other => Value::Text(other.to_string()),
    }
}

pub fn to_value(value: hearth_engine::Value) -> Value {
    match value {
        hearth_engine::Value::Null => Value::Null,
        hearth_engine::Value::Integer(i) => Value::Integer(i),
        hearth_engine::Value::Real(f) => Value::Real(f),
        hearth_engine::Value::Text(s) => Value::Text(s),
        hearth_engine::Value::Blob(b) => Value::Blob(b),
    }
}

pub fn to_row_refs(rows: Vec<(String, hearth_engine::Value)>) -> Vec<RowRef> {
    rows.into_iter()
        .map(|(table, key)| RowRef {
            table,
            key: to_value(key),
        })
        .collect()
}

pub fn to_verdict(verdict: hearth_engine::Verdict) -> Verdict {
    match verdict {
        hearth_engine::Verdict::Applied { server_seq } => Verdict::Applied { server_seq },
        hearth_engine::Verdict::Rejected {
            code,
            reason,
            undone,
        } => Verdict::Rejected {
            code,
            reason,
            undone: to_row_refs(undone),
        },
    }
}

pub fn to_pending_write(write: hearth_engine::PendingWrite) -> PendingWrite {
    PendingWrite {
        mutation: write.seq,
        tables: write.tables,
        rows: to_row_refs(write.rows),
        made_at_ms: write.made_at_ms,
        attempts: write.attempts,
        sent: write.sent,
    }
}

pub fn to_rows(result: hearth_engine::QueryResult) -> Rows {
    Rows {
        columns: result.columns,
        rows: result
            .rows
            .into_iter()
            .map(|row| row.into_iter().map(to_value).collect())
            .collect(),
    }
}
