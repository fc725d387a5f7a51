//! The JavaScript API that `hearth.js` hands to pages as `Hearth.open(...)`'s result.
//!
//! Values cross as plain JS values: numbers, strings, `null`, `Uint8Array` for blobs and
//! `BigInt` for integers beyond 2^53. Errors are JS `Error`s with a stable `code`.

use std::cell::RefCell;
use std::rc::Rc;

use hearth_bridge::{
    ErrorCode, ErrorReply, Notice, PendingWrite, RoomMember, RowRef, Rows, StreamParam,
    StreamSubscription, SyncStatus, TextEdit, Value, Verdict,
};
use js_sys::{Array, BigInt, Function, Object, Promise, Reflect, Uint8Array};
use wasm_bindgen::prelude::*;
use wasm_bindgen::JsCast;
use wasm_bindgen_futures::future_to_promise;

use crate::client::{Client, ExecResult, ProgressCallback, StreamHold, SYNC_TIMEOUT_MS_DEFAULT};

/// The largest integer a JS number holds exactly; beyond it integers cross as `BigInt`.
const JS_SAFE_INTEGER_MAX: i64 = (1 << 53) - 1;

/// Connects this tab to the database `name`, hosted by the SharedWorker script at
/// `worker_url`, syncing with `server`. Resolves to a [`Database`] once the database has
/// a schema (at once on a device that synced before; after the first sync on a new one).
///
/// `token` is undefined, a string, or a function returning a string or a promise of one:
/// the user's token (a JWT) for a server whose schema has `[auth]`. A function is called
/// again whenever the server refuses the token or says it expired (the worker waits,
/// pending writes kept, until it has a new one). `reset` lets a token for another user
/// wipe this device's database and start it anew for that user (AUTH_USER_CHANGED
/// without it).
#[wasm_bindgen]
pub fn open(
    worker_url: String,
    name: String,
    server: String,
    token: JsValue,
    reset: bool,
) -> Promise {
    future_to_promise(async move {
        let provider = token.dyn_ref::<Function>().cloned();
        let first = match &provider {
            Some(f) => Some(call_token(f).await.map_err(js_error)?),
            None if token.is_undefined() || token.is_null() => None,
            None => Some(token.as_string().ok_or_else(|| {
                js_error(ErrorReply::new(
                    ErrorCode::InvalidArgument,
                    "token must be a string or a function returning one",
                ))
            })?),
        };
        let client = Client::open(&worker_url, &name, &server, first, reset)
            .await
            .map_err(js_error)?;
        if let Some(provider) = provider {
            // The server refused or expired the token: ask the app again, once at a time.
            let asking = Rc::new(std::cell::Cell::new(false));
            let again = client.clone();
            client.on(move |notice| {
                if !matches!(notice, Notice::TokenNeeded { .. }) || asking.get() {
                    return;
                }
                asking.set(true);
                let (provider, client, asking) =
                    (provider.clone(), again.clone(), Rc::clone(&asking));
                wasm_bindgen_futures::spawn_local(async move {
                    match call_token(&provider).await {
                        Ok(token) => {
                            if let Err(err) = client.set_token(token).await {
                                web_sys::console::error_1(
                                    &format!("Hearth: the new token was not taken: {err}").into(),
                                );
                            }
                        }
                        Err(err) => web_sys::console::error_1(
                            &format!("Hearth: the token function failed: {err}").into(),
                        ),
                    }
                    asking.set(false);
                });
            });
        }
        Ok(Database {
            client,
            name,
            server,
        }
        .into())
    })
}

/// Calls the app's token function; its result may be a string or a promise of one.
async fn call_token(provider: &Function) -> Result<String, ErrorReply> {
    let bad = |why: String| ErrorReply::new(ErrorCode::Auth, format!("the token function {why}"));
    let value = provider
        .call0(&JsValue::UNDEFINED)
        .map_err(|e| bad(format!("threw: {e:?}")))?;
    let value = match value.dyn_into::<Promise>() {
        Ok(promise) => wasm_bindgen_futures::JsFuture::from(promise)
            .await
            .map_err(|e| bad(format!("rejected: {e:?}")))?,
        Err(value) => value,
    };
    value
        .as_string()
        .ok_or_else(|| bad("returned something other than a string".into()))
}

/// A database handle for one tab.
#[wasm_bindgen]
pub struct Database {
    client: Client,
    name: String,
    server: String,
}

#[wasm_bindgen]
impl Database {
    /// `exec(sql, params?)`: resolves to `{mutation, rowsAffected, settled}` once the change is
    /// durable on this device. `mutation` is the sequence number of the write queued for
    /// the server, or `null` when no synced table changed.
    pub fn exec(&self, sql: String, params: JsValue) -> Promise {
        let client = self.client.clone();
        future_to_promise(async move {
            let params = params_from_js(&params).map_err(js_error)?;
            let done = client.exec(&sql, params).await.map_err(js_error)?;
            exec_result_to_js(&done, &client)
        })
    }

    /// `editText(table, key, column, edits)`: edits the `text` column `column` of the row
    /// whose primary key is `key`, by position. `edits` is an array of
    /// `{index, delete, insert}`: at `index` delete `delete` characters (default 0), then
    /// insert the string `insert` (default ""); each edit applies to the text the previous
    /// one left. **Positions and counts are Unicode code points**, not UTF-16 units (a JS
    /// string index): "🦀" is one. Resolves like `exec`, to `{mutation, rowsAffected}`
    /// once durable on this device; INVALID_ARGUMENT for an unknown table, column or row,
    /// a column that does not merge as `text`, or an edit outside the text.
    #[wasm_bindgen(js_name = editText)]
    pub fn edit_text(
        &self,
        table: JsValue,
        key: JsValue,
        column: JsValue,
        edits: JsValue,
    ) -> Promise {
        let client = self.client.clone();
        future_to_promise(async move {
            let table = string_arg("table", &table).map_err(js_error)?;
            let column = string_arg("column", &column).map_err(js_error)?;
            let key = value_from_js(&key).map_err(|why| {
                js_error(ErrorReply::new(
                    ErrorCode::InvalidArgument,
                    format!("key: {why}"),
                ))
            })?;
            let edits = edits_from_js(&edits).map_err(js_error)?;
            let done = client
                .edit_text(&table, key, &column, edits)
                .await
                .map_err(js_error)?;
            exec_result_to_js(&done, &client)
        })
    }

    /// `resolve(conflictId, value)`: resolves the open manual-merge conflict `conflictId`
    /// (the `id` of a `hearth_conflicts` row) by writing `value` to its cell. Resolves like
    /// `exec`, to `{mutation, rowsAffected}` once durable on this device; INVALID_ARGUMENT
    /// when no such conflict is open here.
    pub fn resolve(&self, conflict_id: JsValue, value: JsValue) -> Promise {
        let client = self.client.clone();
        future_to_promise(async move {
            let conflict_id = string_arg("conflictId", &conflict_id).map_err(js_error)?;
            let value = value_from_js(&value).map_err(|why| {
                js_error(ErrorReply::new(
                    ErrorCode::InvalidArgument,
                    format!("value: {why}"),
                ))
            })?;
            let done = client
                .resolve(&conflict_id, value)
                .await
                .map_err(js_error)?;
            exec_result_to_js(&done, &client)
        })
    }

    /// `query(sql, params?)`: resolves to an array of row objects keyed by column name.
    pub fn query(&self, sql: String, params: JsValue) -> Promise {
        let client = self.client.clone();
        future_to_promise(async move {
            let params = params_from_js(&params).map_err(js_error)?;
            let rows = client.query(&sql, params).await.map_err(js_error)?;
            rows_to_js(&rows)
        })
    }

    /// `live(sql, params, callback, onError?)`: calls `callback(rows)` at once and after
    /// every change to a table the query reads, from any tab or the server. Returns a
    /// function that stops it. A failing query calls `onError(error)` (or logs) once.
    pub fn live(
        &self,
        sql: String,
        params: JsValue,
        callback: Function,
        on_error: JsValue,
    ) -> Result<Function, JsValue> {
        let params = params_from_js(&params).map_err(js_error)?;
        let on_error = on_error.dyn_into::<Function>().ok();
        let live = self.client.live(&sql, params, move |result| match result {
            Ok(rows) => match rows_to_js(&rows) {
                Ok(rows) => {
                    if let Err(err) = callback.call1(&JsValue::UNDEFINED, &rows) {
                        web_sys::console::error_2(&"Hearth live callback threw".into(), &err);
                    }
                }
                Err(err) => web_sys::console::error_1(&err),
            },
            Err(error) => {
                let error = js_error(error);
                match &on_error {
                    Some(on_error) => {
                        let _ = on_error.call1(&JsValue::UNDEFINED, &error);
                    }
                    None => web_sys::console::error_2(&"Hearth live query failed".into(), &error),
                }
            }
        });
        let stop = Closure::once_into_js(move || live.stop());
        Ok(stop.unchecked_into())
    }

    /// `status()`: `{online, pending, serverSeq, caughtUp, schemaVersion, schemaAhead}` as the worker
    /// last pushed it (a plain value, not a promise).
    pub fn status(&self) -> JsValue {
        status_to_js(&self.client.status())
    }

    /// `on(kind, callback)` with kind "status" (`callback(status)`), "change"
    /// (`callback({tables})`) or "rejected" (`callback(error)`, an Error with code
    /// REJECTED and `mutation`, `serverCode`, `reason`). Returns a function that removes
    /// the callback.
    pub fn on(&self, kind: String, callback: Function) -> Result<Function, JsValue> {
        if !matches!(kind.as_str(), "status" | "change" | "rejected" | "auth") {
            return Err(js_error(ErrorReply::new(
                ErrorCode::InvalidArgument,
                format!(
                    "unknown event {kind:?}: use \"status\", \"change\", \"rejected\" or \"auth\""
                ),
            )));
        }
        let id = self.client.on(move |notice| {
            let value = match (kind.as_str(), notice) {
                ("status", Notice::Status(status)) => status_to_js(status),
                ("change", Notice::Changed { tables }) => {
                    let object = Object::new();
                    let list: Array = tables.iter().map(|t| JsValue::from_str(t)).collect();
                    let _ = Reflect::set(&object, &"tables".into(), &list);
                    object.into()
                }
                (
                    "rejected",
                    Notice::Rejected {
                        mutation,
                        code,
                        reason,
                        undone,
                    },
                ) => {
                    let error = js_error(ErrorReply::new(
                        ErrorCode::Rejected,
                        format!("the server refused write {mutation}: {reason}"),
                    ));
                    let _ = Reflect::set(&error, &"mutation".into(), &(*mutation as f64).into());
                    let _ = Reflect::set(&error, &"serverCode".into(), &code.as_str().into());
                    let _ = Reflect::set(&error, &"reason".into(), &reason.as_str().into());
                    if let Ok(undone) = row_refs_to_js(undone) {
                        let _ = Reflect::set(&error, &"undone".into(), &undone);
                    }
                    error
                }
                ("auth", Notice::TokenNeeded { code, message }) => js_error(ErrorReply::new(
                    ErrorCode::from_engine(code),
                    message.clone(),
                )),
                _ => return,
            };
            if let Err(err) = callback.call1(&JsValue::UNDEFINED, &value) {
                web_sys::console::error_2(&"Hearth event callback threw".into(), &err);
            }
        });
        let client = self.client.clone();
        let off = Closure::once_into_js(move || client.off(id));
        Ok(off.unchecked_into())
    }

    /// `settled(mutation)`: resolves to the server's verdict on local write `mutation` (the
    /// `mutation` of an exec result, also after a page reload): `{status: "applied",
    /// serverSeq}` or `{status: "rejected", code, reason, undone: [{table, key}]}` (a
    /// discarded write: code DISCARDED). Waits while the write is pending. Rejects with
    /// UNKNOWN_MUTATION for a write this device does not know (never made here, or
    /// settled more than 10,000 writes ago).
    pub fn settled(&self, mutation: JsValue) -> Promise {
        let client = self.client.clone();
        future_to_promise(async move {
            let mutation = mutation_arg(&mutation).map_err(js_error)?;
            let verdict = client.settled(mutation).await.map_err(js_error)?;
            verdict_to_js(&verdict)
        })
    }

    /// `pending()`: resolves to the outbox, oldest first: `[{mutation, tables, rows:
    /// [{table, key}], madeAt (ms since the epoch), attempts, sent}]`.
    pub fn pending(&self) -> Promise {
        let client = self.client.clone();
        future_to_promise(async move {
            let writes = client.pending().await.map_err(js_error)?;
            let out = Array::new();
            for write in &writes {
                out.push(&pending_write_to_js(write)?);
            }
            Ok(out.into())
        })
    }

    /// `discard(mutation)`: drops pending write `mutation` on purpose: undone on this
    /// device, never sent; its `settled` resolves as rejected with code DISCARDED and every
    /// tab gets the "rejected" event. Resolves to `{undone: [{table, key}]}` once durable.
    /// Rejects with NOT_PENDING (settled already, or never made) or SENT (it went out to
    /// the server, which may have applied it: wait for `settled` instead).
    pub fn discard(&self, mutation: JsValue) -> Promise {
        let client = self.client.clone();
        future_to_promise(async move {
            let mutation = mutation_arg(&mutation).map_err(js_error)?;
            let undone = client.discard(mutation).await.map_err(js_error)?;
            let object = Object::new();
            Reflect::set(&object, &"undone".into(), &row_refs_to_js(&undone)?)?;
            Ok(object.into())
        })
    }

    /// `sync({timeoutMs}?)`: resolves to the status once every local write reached the
    /// server and the device caught up; rejects with code OFFLINE after the timeout
    /// (default 10 s).
    pub fn sync(&self, options: JsValue) -> Promise {
        let client = self.client.clone();
        let timeout_ms = Reflect::get(&options, &"timeoutMs".into())
            .ok()
            .and_then(|v| v.as_f64())
            .map_or(SYNC_TIMEOUT_MS_DEFAULT, |ms| {
                ms.clamp(0.0, u32::MAX as f64) as u32
            });
        future_to_promise(async move {
            let status = client.sync(timeout_ms).await.map_err(js_error)?;
            Ok(status_to_js(&status))
        })
    }

    /// `subscribe(stream, params?, {onProgress}?)`: subscribes the device to the schema's
    /// stream `stream` with `params` (an object of name to value; an array for
    /// `IN :name`). Resolves to a [`Subscription`] once the stream's rows as of now are in
    /// the local database and durable (at once when already loaded); `onProgress({rows,
    /// done})` is called as the initial load's chunks land, and so is every callback given
    /// to the returned promise's `on("progress", callback)`. Subscriptions are the
    /// device's: tabs asking for the same stream and parameters share one (the same `id`),
    /// and it stays until every tab that subscribed has called `unsubscribe()`. Rejects
    /// with code INVALID_ARGUMENT (unknown stream or bad parameters, checked on the
    /// device), BAD_SUBSCRIPTION or TOO_MANY_SUBSCRIPTIONS (the server refused it).
    pub fn subscribe(&self, stream: JsValue, params: JsValue, options: JsValue) -> Promise {
        let listeners: Rc<RefCell<Vec<Function>>> = Rc::default();
        if let Some(on_progress) = Reflect::get(&options, &"onProgress".into())
            .ok()
            .and_then(|f| f.dyn_into::<Function>().ok())
        {
            listeners.borrow_mut().push(on_progress);
        }
        let client = self.client.clone();
        let progress: ProgressCallback = {
            let listeners = Rc::clone(&listeners);
            Rc::new(move |rows, done| {
                let callbacks: Vec<Function> = listeners.borrow().clone();
                call_progress(&callbacks, rows, done);
            })
        };
        let promise = future_to_promise(async move {
            let stream = string_arg("stream", &stream).map_err(js_error)?;
            let params = stream_params_from_js(&params).map_err(js_error)?;
            let hold = client
                .subscribe(&stream, params, Some(progress))
                .await
                .map_err(js_error)?;
            Ok(Subscription {
                hold: Rc::new(hold),
            }
            .into())
        });
        // `pending.on("progress", callback)` before awaiting it.
        let on = Closure::<dyn Fn(JsValue, JsValue) -> Result<(), JsValue>>::new(
            move |kind: JsValue, callback: JsValue| {
                let callback = progress_args(&kind, callback)?;
                listeners.borrow_mut().push(callback);
                Ok(())
            },
        );
        let _ = Reflect::set(&promise, &"on".into(), &on.into_js_value());
        promise
    }

    /// `subscriptions()`: resolves to the device's subscriptions, `[{id, stream, params,
    /// loaded, rows, tabs}]`: every tab's, and any that no tab holds (`tabs` 0: since a
    /// restart, or since the tabs that held it closed).
    pub fn subscriptions(&self) -> Promise {
        let client = self.client.clone();
        future_to_promise(async move {
            let subs = client.subscriptions().await.map_err(js_error)?;
            let list = Array::new();
            for sub in &subs {
                list.push(&subscription_to_js(sub)?);
            }
            Ok(list.into())
        })
    }

    /// `room(name)`: a handle on room `name` for this tab (nothing is sent until
    /// `setPresence`). Presence and messages are ephemeral: never stored, on the device
    /// or the server.
    pub fn room(&self, name: JsValue) -> Result<Room, JsValue> {
        let name = string_arg("room", &name).map_err(js_error)?;
        let shared: Rc<RefCell<RoomShared>> = Rc::default();
        let listener = {
            let shared = Rc::clone(&shared);
            let room = name.clone();
            self.client
                .on(move |notice| on_room_notice(&shared, &room, notice))
        };
        Ok(Room {
            client: self.client.clone(),
            name,
            shared,
            listener,
        })
    }

    /// Closes this tab's connection; other tabs keep theirs.
    pub fn close(&self) {
        self.client.close();
    }

    #[wasm_bindgen(getter)]
    pub fn name(&self) -> String {
        self.name.clone()
    }

    #[wasm_bindgen(getter)]
    pub fn server(&self) -> String {
        self.server.clone()
    }
}

/// This tab's hold on one of the device's stream subscriptions, as `db.subscribe` resolves
/// it.
#[wasm_bindgen]
pub struct Subscription {
    hold: Rc<StreamHold>,
}

#[wasm_bindgen]
impl Subscription {
    /// The device's id for this stream and parameters, as a decimal string (the same in
    /// every tab, and in `db.subscriptions()`).
    #[wasm_bindgen(getter)]
    pub fn id(&self) -> String {
        self.hold.id().to_string()
    }

    #[wasm_bindgen(getter)]
    pub fn stream(&self) -> String {
        self.hold.subscription().stream.clone()
    }

    #[wasm_bindgen(getter)]
    pub fn params(&self) -> Result<JsValue, JsValue> {
        stream_params_to_js(&self.hold.subscription().params)
    }

    /// `unsubscribe()`: releases this tab's hold (once; later calls do nothing). When no
    /// other hold is left, the device unsubscribes and the rows no other subscription
    /// holds leave it; resolves once that is durable.
    pub fn unsubscribe(&self) -> Promise {
        let hold = Rc::clone(&self.hold);
        future_to_promise(async move {
            hold.unsubscribe().await.map_err(js_error)?;
            Ok(JsValue::UNDEFINED)
        })
    }

    /// `on("progress", callback)`: `callback({rows, done})` for each later chunk of this
    /// subscription's load (a load the server repeats). Returns a function that removes
    /// it.
    pub fn on(&self, kind: JsValue, callback: JsValue) -> Result<Function, JsValue> {
        let callback = progress_args(&kind, callback)?;
        let id = self.hold.on_progress(Rc::new(move |rows, done| {
            call_progress(std::slice::from_ref(&callback), rows, done);
        }));
        let hold = Rc::downgrade(&self.hold);
        let off = Closure::once_into_js(move || {
            if let Some(hold) = hold.upgrade() {
                hold.off(id);
            }
        });
        Ok(off.unchecked_into())
    }
}

/// What a [`Room`] knows and who listens to it.
#[derive(Default)]
struct RoomShared {
    /// The last member list, as JS values.
    members: Option<JsValue>,
    presence: Vec<(u32, Function)>,
    message: Vec<(u32, Function)>,
    error: Vec<(u32, Function)>,
    next: u32,
}

fn on_room_notice(shared: &Rc<RefCell<RoomShared>>, name: &str, notice: &Notice) {
    let (callbacks, args): (Vec<Function>, Vec<JsValue>) = match notice {
        Notice::RoomMembers { room, members } if room == name => {
            let list = members_to_js(members);
            let mut shared = shared.borrow_mut();
            shared.members = Some(list.clone());
            let callbacks = shared.presence.iter().map(|(_, f)| f.clone()).collect();
            (callbacks, vec![list])
        }
        Notice::RoomMessage {
            room,
            client_id,
            tab,
            message,
        } if room == name => {
            let from = Object::new();
            let _ = Reflect::set(&from, &"clientId".into(), &client_id.to_string().into());
            let _ = Reflect::set(&from, &"tab".into(), &(*tab as f64).into());
            let callbacks = shared
                .borrow()
                .message
                .iter()
                .map(|(_, f)| f.clone())
                .collect();
            (callbacks, vec![parse_json(message), from.into()])
        }
        Notice::RoomRefused { room, code, reason } if room == name => {
            let error = js_error(ErrorReply::new(
                ErrorCode::from_engine(code),
                format!("room {room:?}: {reason}"),
            ));
            let callbacks = shared
                .borrow()
                .error
                .iter()
                .map(|(_, f)| f.clone())
                .collect();
            (callbacks, vec![error])
        }
        _ => return,
    };
    // Called with nothing borrowed, so a callback may add or remove callbacks.
    for callback in callbacks {
        let args: Array = args.iter().collect();
        if let Err(err) = callback.apply(&JsValue::UNDEFINED, &args) {
            web_sys::console::error_2(&"Hearth room callback threw".into(), &err);
        }
    }
}

/// JSON text as a JS value (a server checks that it is JSON; anything else shows as the
/// text itself rather than throwing in a callback).
fn parse_json(text: &str) -> JsValue {
    js_sys::JSON::parse(text).unwrap_or_else(|_| JsValue::from_str(text))
}

fn members_to_js(members: &[RoomMember]) -> JsValue {
    let list = Array::new();
    for m in members {
        let object = Object::new();
        for (key, value) in [
            ("clientId", JsValue::from_str(&m.client_id.to_string())),
            ("tab", (m.tab as f64).into()),
            ("state", parse_json(&m.state)),
            ("since", (m.since_ms as f64).into()),
            ("me", m.me.into()),
        ] {
            let _ = Reflect::set(&object, &key.into(), &value);
        }
        list.push(&object);
    }
    list.into()
}

/// A value as JSON text, or INVALID_ARGUMENT (`undefined`, a function, a cycle, a BigInt).
fn json_arg(name: &str, value: &JsValue) -> Result<String, ErrorReply> {
    js_sys::JSON::stringify(value)
        .ok()
        .and_then(|s| s.as_string())
        .ok_or_else(|| {
            ErrorReply::new(
                ErrorCode::InvalidArgument,
                format!("{name} must be a JSON value (no undefined, functions, cycles or BigInt)"),
            )
        })
}

/// A room as `db.room(name)` returns it: this tab's presence in it, the members' list and
/// the room's messages.
#[wasm_bindgen]
pub struct Room {
    client: Client,
    name: String,
    shared: Rc<RefCell<RoomShared>>,
    listener: u32,
}

#[wasm_bindgen]
impl Room {
    #[wasm_bindgen(getter)]
    pub fn name(&self) -> String {
        self.name.clone()
    }

    /// `setPresence(state)`: joins the room with `state` (any JSON value), or changes this
    /// tab's state in it. Resolves once handed to the connection (offline: it joins on
    /// reconnect). Rejects with BAD_ROOM, PRESENCE_TOO_LARGE, TOO_MANY_ROOMS or
    /// INVALID_ARGUMENT; the server's refusal (ROOM_FULL) comes as an `error` event.
    #[wasm_bindgen(js_name = setPresence)]
    pub fn set_presence(&self, state: JsValue) -> Promise {
        let client = self.client.clone();
        let name = self.name.clone();
        let state = json_arg("the presence state", &state);
        future_to_promise(async move {
            client
                .join_room(&name, state.map_err(js_error)?)
                .await
                .map_err(js_error)?;
            Ok(JsValue::UNDEFINED)
        })
    }

    /// `send(message)`: broadcasts `message` (any JSON value) to the room's other members,
    /// fire and forget; the server relays a bounded rate per sender, latest wins (meant
    /// for cursors and reactions). Rejects with NOT_IN_ROOM, MESSAGE_TOO_LARGE or
    /// INVALID_ARGUMENT.
    pub fn send(&self, message: JsValue) -> Promise {
        let client = self.client.clone();
        let name = self.name.clone();
        let message = json_arg("the message", &message);
        future_to_promise(async move {
            client
                .send_to_room(&name, message.map_err(js_error)?)
                .await
                .map_err(js_error)?;
            Ok(JsValue::UNDEFINED)
        })
    }

    /// `leave()`: this tab leaves the room; its callbacks stay until removed.
    pub fn leave(&self) -> Promise {
        let client = self.client.clone();
        let name = self.name.clone();
        future_to_promise(async move {
            client.leave_room(&name).await.map_err(js_error)?;
            Ok(JsValue::UNDEFINED)
        })
    }

    /// `on(kind, callback)`: "presence" → `callback(members)`, each
    /// `{clientId, tab, state, since, me}` (called at once with the last list, if any);
    /// "message" → `callback(message, {clientId, tab})`; "error" → `callback(error)`.
    /// Returns a function that removes the callback.
    pub fn on(&self, kind: String, callback: JsValue) -> Result<Function, JsValue> {
        let callback: Function = callback.dyn_into().map_err(|_| {
            js_error(ErrorReply::new(
                ErrorCode::InvalidArgument,
                "the callback must be a function",
            ))
        })?;
        let (id, last) = {
            let mut shared = self.shared.borrow_mut();
            let id = shared.next;
            shared.next += 1;
            let last = shared.members.clone();
            let list = match kind.as_str() {
                "presence" => &mut shared.presence,
                "message" => &mut shared.message,
                "error" => &mut shared.error,
                _ => {
                    return Err(js_error(ErrorReply::new(
                        ErrorCode::InvalidArgument,
                        format!(
                            "unknown event {kind:?}: a room has \"presence\", \"message\" and \"error\""
                        ),
                    )))
                }
            };
            list.push((id, callback.clone()));
            (id, last.filter(|_| kind == "presence"))
        };
        if let Some(members) = last {
            if let Err(err) = callback.call1(&JsValue::UNDEFINED, &members) {
                web_sys::console::error_2(&"Hearth room callback threw".into(), &err);
            }
        }
        let shared = Rc::downgrade(&self.shared);
        let off = Closure::once_into_js(move || {
            if let Some(shared) = shared.upgrade() {
                let mut shared = shared.borrow_mut();
                shared.presence.retain(|(i, _)| *i != id);
                shared.message.retain(|(i, _)| *i != id);
                shared.error.retain(|(i, _)| *i != id);
            }
        });
        Ok(off.unchecked_into())
    }
}

impl Drop for Room {
    fn drop(&mut self) {
        self.client.off(self.listener);
    }
}

/// The callback of `on("progress", callback)`, or INVALID_ARGUMENT.
fn progress_args(kind: &JsValue, callback: JsValue) -> Result<Function, JsValue> {
    if kind.as_string().as_deref() != Some("progress") {
        return Err(js_error(ErrorReply::new(
            ErrorCode::InvalidArgument,
            format!("unknown event {kind:?}: a subscription has \"progress\""),
        )));
    }
    callback.dyn_into::<Function>().map_err(|_| {
        js_error(ErrorReply::new(
            ErrorCode::InvalidArgument,
            "the progress callback must be a function",
        ))
    })
}

fn call_progress(callbacks: &[Function], rows: u64, done: bool) {
    let event = Object::new();
    let _ = Reflect::set(&event, &"rows".into(), &(rows as f64).into());
    let _ = Reflect::set(&event, &"done".into(), &done.into());
    for callback in callbacks {
        if let Err(err) = callback.call1(&JsValue::UNDEFINED, &event) {
            web_sys::console::error_2(&"Hearth progress callback threw".into(), &err);
        }
    }
}

/// A stream's parameters from a JS object: each value as an SQL parameter, an array as a
/// list.
fn stream_params_from_js(params: &JsValue) -> Result<Vec<(String, StreamParam)>, ErrorReply> {
    if params.is_undefined() || params.is_null() {
        return Ok(Vec::new());
    }
    if !params.is_object() || Array::is_array(params) {
        return Err(ErrorReply::new(
            ErrorCode::InvalidArgument,
            "params must be an object of parameter name to value",
        ));
    }
    let entries = Object::entries(params.unchecked_ref());
    entries
        .iter()
        .map(|entry| {
            let entry: Array = entry.unchecked_into();
            let name = entry.get(0).as_string().unwrap_or_default();
            let value = entry.get(1);
            let bad = |why: &str| {
                ErrorReply::new(
                    ErrorCode::InvalidArgument,
                    format!("parameter :{name}: {why}"),
                )
            };
            let param = if let Some(items) = value.dyn_ref::<Array>() {
                StreamParam::Many(
                    items
                        .iter()
                        .map(|item| value_from_js(&item).map_err(bad))
                        .collect::<Result<_, _>>()?,
                )
            } else {
                StreamParam::One(value_from_js(&value).map_err(bad)?)
            };
            Ok((name, param))
        })
        .collect()
}

fn stream_params_to_js(params: &[(String, StreamParam)]) -> Result<JsValue, JsValue> {
    let object = Object::new();
    for (name, param) in params {
        let value = match param {
            StreamParam::One(value) => value_to_js(value),
            StreamParam::Many(values) => values.iter().map(value_to_js).collect::<Array>().into(),
        };
        Reflect::set(&object, &name.into(), &value)?;
    }
    Ok(object.into())
}

fn subscription_to_js(sub: &StreamSubscription) -> Result<JsValue, JsValue> {
    let object = Object::new();
    Reflect::set(&object, &"id".into(), &sub.id.to_string().into())?;
    Reflect::set(&object, &"stream".into(), &sub.stream.as_str().into())?;
    Reflect::set(
        &object,
        &"params".into(),
        &stream_params_to_js(&sub.params)?,
    )?;
    Reflect::set(&object, &"loaded".into(), &sub.loaded.into())?;
    Reflect::set(&object, &"rows".into(), &(sub.rows as f64).into())?;
    Reflect::set(&object, &"tabs".into(), &sub.tabs.into())?;
    Ok(object.into())
}

/// `{mutation, rowsAffected, settled}`: `settled` is a promise of the server's verdict
/// (`{status: "local"}` at once for a write that changed no synced row).
fn exec_result_to_js(done: &ExecResult, client: &Client) -> Result<JsValue, JsValue> {
    let result = Object::new();
    let settled = match done.mutation {
        Some(mutation) => {
            let client = client.clone();
            future_to_promise(async move {
                let verdict = client.settled(mutation).await.map_err(js_error)?;
                verdict_to_js(&verdict)
            })
        }
        None => {
            let local = Object::new();
            Reflect::set(&local, &"status".into(), &"local".into())?;
            let local: JsValue = local.into();
            future_to_promise(async move { Ok(local) })
        }
    };
    Reflect::set(&result, &"settled".into(), &settled)?;
    let mutation = done
        .mutation
        .map_or(JsValue::NULL, |m| JsValue::from(m as f64));
    Reflect::set(&result, &"mutation".into(), &mutation)?;
    // Row counts never approach 2^53, so a plain number is exact.
    Reflect::set(
        &result,
        &"rowsAffected".into(),
        &(done.rows_affected as f64).into(),
    )?;
    Ok(result.into())
}

fn row_refs_to_js(rows: &[RowRef]) -> Result<JsValue, JsValue> {
    let out = Array::new();
    for row in rows {
        let object = Object::new();
        Reflect::set(&object, &"table".into(), &row.table.as_str().into())?;
        Reflect::set(&object, &"key".into(), &value_to_js(&row.key))?;
        out.push(&object);
    }
    Ok(out.into())
}

/// `{status: "applied", serverSeq}` or `{status: "rejected", code, reason, undone}`.
fn verdict_to_js(verdict: &Verdict) -> Result<JsValue, JsValue> {
    let object = Object::new();
    match verdict {
        Verdict::Applied { server_seq } => {
            Reflect::set(&object, &"status".into(), &"applied".into())?;
            Reflect::set(&object, &"serverSeq".into(), &(*server_seq as f64).into())?;
        }
        Verdict::Rejected {
            code,
            reason,
            undone,
        } => {
            Reflect::set(&object, &"status".into(), &"rejected".into())?;
            Reflect::set(&object, &"code".into(), &code.as_str().into())?;
            Reflect::set(&object, &"reason".into(), &reason.as_str().into())?;
            Reflect::set(&object, &"undone".into(), &row_refs_to_js(undone)?)?;
        }
    }
    Ok(object.into())
}

/// `{mutation, tables, rows, madeAt, attempts, sent}`.
fn pending_write_to_js(write: &PendingWrite) -> Result<JsValue, JsValue> {
    let object = Object::new();
    Reflect::set(&object, &"mutation".into(), &(write.mutation as f64).into())?;
    let tables: Array = write.tables.iter().map(|t| JsValue::from_str(t)).collect();
    Reflect::set(&object, &"tables".into(), &tables)?;
    Reflect::set(&object, &"rows".into(), &row_refs_to_js(&write.rows)?)?;
    Reflect::set(&object, &"madeAt".into(), &(write.made_at_ms as f64).into())?;
    Reflect::set(&object, &"attempts".into(), &(write.attempts as f64).into())?;
    Reflect::set(&object, &"sent".into(), &write.sent.into())?;
    Ok(object.into())
}

/// A write's number (the `mutation` of an exec result), or INVALID_ARGUMENT.
fn mutation_arg(value: &JsValue) -> Result<u64, ErrorReply> {
    match value.as_f64() {
        Some(n) if n >= 1.0 && n.fract() == 0.0 && n <= JS_SAFE_INTEGER_MAX as f64 => Ok(n as u64),
        _ => Err(ErrorReply::new(
            ErrorCode::InvalidArgument,
            "mutation must be a write's number: the `mutation` of an exec result (a positive integer)",
        )),
    }
}

/// A string argument, or INVALID_ARGUMENT naming it.
fn string_arg(name: &str, value: &JsValue) -> Result<String, ErrorReply> {
    match value.dyn_ref::<js_sys::JsString>() {
        Some(s) if s.is_valid_utf16() => Ok(String::from(s)),
        Some(_) => Err(ErrorReply::new(
            ErrorCode::InvalidArgument,
            format!("{name} holds a lone UTF-16 surrogate"),
        )),
        None => Err(ErrorReply::new(
            ErrorCode::InvalidArgument,
            format!("{name} must be a string"),
        )),
    }
}

/// A count or position of an edit: a non-negative integral number (default 0 when
/// absent, for `delete`).
fn count_arg(
    edit: usize,
    name: &str,
    value: &JsValue,
    default: Option<u64>,
) -> Result<u64, ErrorReply> {
    if value.is_undefined() {
        if let Some(default) = default {
            return Ok(default);
        }
    }
    match value.as_f64() {
        Some(n) if n >= 0.0 && n.fract() == 0.0 && n <= JS_SAFE_INTEGER_MAX as f64 => Ok(n as u64),
        _ => Err(ErrorReply::new(
            ErrorCode::InvalidArgument,
            format!("edit {edit}: {name} must be a non-negative integer (code points)"),
        )),
    }
}

fn edits_from_js(edits: &JsValue) -> Result<Vec<TextEdit>, ErrorReply> {
    let Some(array) = edits.dyn_ref::<Array>() else {
        return Err(ErrorReply::new(
            ErrorCode::InvalidArgument,
            "edits must be an array of {index, delete, insert}",
        ));
    };
    array
        .iter()
        .enumerate()
        .map(|(n, edit)| {
            let n = n + 1;
            if !edit.is_object() {
                return Err(ErrorReply::new(
                    ErrorCode::InvalidArgument,
                    format!("edit {n} must be an object {{index, delete, insert}}"),
                ));
            }
            let field = |name: &str| Reflect::get(&edit, &name.into()).unwrap_or_default();
            let index = count_arg(n, "index", &field("index"), None)?;
            let delete = count_arg(n, "delete", &field("delete"), Some(0))?;
            let insert = field("insert");
            let insert = if insert.is_undefined() {
                String::new()
            } else {
                string_arg(&format!("edit {n}: insert"), &insert)?
            };
            Ok(TextEdit {
                index,
                delete,
                insert,
            })
        })
        .collect()
}

fn status_to_js(status: &SyncStatus) -> JsValue {
    let object = Object::new();
    let schema_version = status
        .schema_version
        .map_or(JsValue::NULL, |v| JsValue::from(v as f64));
    for (key, value) in [
        ("online", JsValue::from(status.online)),
        ("caughtUp", JsValue::from(status.caught_up)),
        ("pending", JsValue::from(status.pending as f64)),
        ("serverSeq", JsValue::from(status.server_seq as f64)),
        ("schemaVersion", schema_version),
        ("schemaAhead", JsValue::from(status.schema_ahead)),
    ] {
        let _ = Reflect::set(&object, &key.into(), &value);
    }
    object.into()
}

/// Turns an error into a JS `Error` whose `code` is the stable [`ErrorCode`] spelling.
pub fn js_error(error: ErrorReply) -> JsValue {
    let js = js_sys::Error::new(&error.message);
    js.set_name("HearthError");
    // Setting a property on a fresh Error object cannot fail.
    let _ = Reflect::set(&js, &"code".into(), &error.code.as_str().into());
    js.into()
}

fn params_from_js(params: &JsValue) -> Result<Vec<Value>, ErrorReply> {
    if params.is_undefined() || params.is_null() {
        return Ok(Vec::new());
    }
    let Some(array) = params.dyn_ref::<Array>() else {
        return Err(ErrorReply::new(
            ErrorCode::InvalidArgument,
            "params must be an array",
        ));
    };
    array
        .iter()
        .enumerate()
        .map(|(index, value)| {
            value_from_js(&value).map_err(|why| {
                ErrorReply::new(
                    ErrorCode::InvalidArgument,
                    format!("parameter {}: {why}", index + 1),
                )
            })
        })
        .collect()
}

/// Converts one parameter exactly, or says why it cannot be.
fn value_from_js(value: &JsValue) -> Result<Value, &'static str> {
    if value.is_null() || value.is_undefined() {
        Ok(Value::Null)
    } else if let Some(b) = value.as_bool() {
        Ok(Value::Integer(b.into()))
    } else if let Some(n) = value.as_f64() {
        // Integral numbers are stored as INTEGER, so `id = ?` matches an INTEGER column
        // the way a JS developer expects; -0 stays a REAL so its sign is kept.
        let integral = n.fract() == 0.0
            && n.abs() <= JS_SAFE_INTEGER_MAX as f64
            && !(n == 0.0 && n.is_sign_negative());
        Ok(if integral {
            Value::Integer(n as i64)
        } else {
            Value::Real(n)
        })
    } else if let Some(s) = value.dyn_ref::<js_sys::JsString>() {
        // A JS string may hold lone surrogates, which UTF-8 cannot encode; converting
        // would replace them, so such a string is refused instead.
        if !s.is_valid_utf16() {
            return Err(
                "the string holds a lone UTF-16 surrogate, which SQL TEXT (UTF-8) cannot store",
            );
        }
        Ok(Value::Text(String::from(s)))
    } else if let Some(big) = value.dyn_ref::<BigInt>() {
        i64::try_from(big.clone())
            .map(Value::Integer)
            .map_err(|_| "the BigInt is outside SQLite's 64-bit integer range")
    } else if let Some(bytes) = value.dyn_ref::<Uint8Array>() {
        Ok(Value::Blob(bytes.to_vec()))
    } else if let Some(buffer) = value.dyn_ref::<js_sys::ArrayBuffer>() {
        Ok(Value::Blob(Uint8Array::new(buffer).to_vec()))
    } else {
        Err("it has a type SQL cannot store (use null, a boolean, number, bigint, string or Uint8Array)")
    }
}

fn value_to_js(value: &Value) -> JsValue {
    match value {
        Value::Null => JsValue::NULL,
        Value::Integer(i) if i.unsigned_abs() <= JS_SAFE_INTEGER_MAX as u64 => {
            JsValue::from(*i as f64)
        }
        Value::Integer(i) => BigInt::from(*i).into(),
        Value::Real(f) => JsValue::from(*f),
        Value::Text(s) => JsValue::from_str(s),
        Value::Blob(b) => Uint8Array::from(b.as_slice()).into(),
    }
}

fn rows_to_js(rows: &Rows) -> Result<JsValue, JsValue> {
    let keys: Vec<JsValue> = rows.columns.iter().map(|c| JsValue::from_str(c)).collect();
    let out = Array::new_with_length(rows.rows.len() as u32);
    for (index, row) in rows.rows.iter().enumerate() {
        let object = Object::new();
        for (key, value) in keys.iter().zip(row) {
            Reflect::set(&object, key, &value_to_js(value))?;
        }
        out.set(index as u32, object.into());
    }
    Ok(out.into())
}
