//! The JavaScript API that `hearth.js` hands to pages as `Hearth.open(...)`'s result.
//!
//! Values cross as plain JS values: numbers, strings, `null`, `Uint8Array` for blobs and
//! `BigInt` for integers beyond 2^53. Errors are JS `Error`s with a stable `code`.

use hearth_bridge::{ErrorCode, ErrorReply, Notice, Rows, SyncStatus, TextEdit, Value};
use js_sys::{Array, BigInt, Function, Object, Promise, Reflect, Uint8Array};
use wasm_bindgen::prelude::*;
use wasm_bindgen::JsCast;
use wasm_bindgen_futures::future_to_promise;

use crate::client::{Client, ExecResult, SYNC_TIMEOUT_MS_DEFAULT};

/// The largest integer a JS number holds exactly; beyond it integers cross as `BigInt`.
const JS_SAFE_INTEGER_MAX: i64 = (1 << 53) - 1;

/// Connects this tab to the database `name`, hosted by the SharedWorker script at
/// `worker_url`, syncing with `server`. Resolves to a [`Database`] once the database has
/// a schema (at once on a device that synced before; after the first sync on a new one).
#[wasm_bindgen]
pub fn open(worker_url: String, name: String, server: String) -> Promise {
    future_to_promise(async move {
        let client = Client::open(&worker_url, &name, &server)
            .await
            .map_err(js_error)?;
        Ok(Database {
            client,
            name,
            server,
        }
        .into())
    })
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
    /// `exec(sql, params?)`: resolves to `{mutation, rowsAffected}` once the change is
    /// durable on this device. `mutation` is the sequence number of the write queued for
    /// the server, or `null` when no synced table changed.
    pub fn exec(&self, sql: String, params: JsValue) -> Promise {
        let client = self.client.clone();
        future_to_promise(async move {
            let params = params_from_js(&params).map_err(js_error)?;
            let done = client.exec(&sql, params).await.map_err(js_error)?;
            exec_result_to_js(&done)
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
            exec_result_to_js(&done)
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
            exec_result_to_js(&done)
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

    /// `status()`: `{online, pending, serverSeq, caughtUp, schemaVersion}` as the worker
    /// last pushed it (a plain value, not a promise).
    pub fn status(&self) -> JsValue {
        status_to_js(&self.client.status())
    }

    /// `on(kind, callback)` with kind "status" (`callback(status)`), "change"
    /// (`callback({tables})`) or "rejected" (`callback(error)`, an Error with code
    /// REJECTED and `mutation`, `serverCode`, `reason`). Returns a function that removes
    /// the callback.
    pub fn on(&self, kind: String, callback: Function) -> Result<Function, JsValue> {
        if !matches!(kind.as_str(), "status" | "change" | "rejected") {
            return Err(js_error(ErrorReply::new(
                ErrorCode::InvalidArgument,
                format!("unknown event {kind:?}: use \"status\", \"change\" or \"rejected\""),
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
                    },
                ) => {
                    let error = js_error(ErrorReply::new(
                        ErrorCode::Rejected,
                        format!("the server refused write {mutation}: {reason}"),
                    ));
                    let _ = Reflect::set(&error, &"mutation".into(), &(*mutation as f64).into());
                    let _ = Reflect::set(&error, &"serverCode".into(), &code.as_str().into());
                    let _ = Reflect::set(&error, &"reason".into(), &reason.as_str().into());
                    error
                }
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

fn exec_result_to_js(done: &ExecResult) -> Result<JsValue, JsValue> {
    let result = Object::new();
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
