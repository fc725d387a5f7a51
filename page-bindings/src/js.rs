//! The JavaScript API that `hearth.js` hands to pages as `Hearth.open(...)`'s result.
//!
//! Values cross as plain JS values: numbers, strings, `null`, `Uint8Array` for blobs and
//! `BigInt` for integers beyond 2^53. Errors are JS `Error`s with a stable `code`.

use hearth_bridge::{ErrorCode, ErrorReply, Rows, Value};
use js_sys::{Array, BigInt, Object, Promise, Reflect, Uint8Array};
use wasm_bindgen::prelude::*;
use wasm_bindgen::JsCast;
use wasm_bindgen_futures::future_to_promise;

use crate::client::Client;

/// The largest integer a JS number holds exactly; beyond it integers cross as `BigInt`.
const JS_SAFE_INTEGER_MAX: i64 = (1 << 53) - 1;

/// Connects this tab to the database `name`, hosted by the SharedWorker script at
/// `worker_url`. `server` is the sync endpoint the worker will use.
#[wasm_bindgen]
pub fn open(worker_url: &str, name: &str, server: &str) -> Result<Database, JsValue> {
    let client = Client::connect(worker_url, name).map_err(js_error)?;
    Ok(Database {
        client,
        name: name.to_owned(),
        server: server.to_owned(),
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
    /// `exec(sql, params?)`: resolves to `{rowsAffected}` once the change is durable on
    /// this device.
    pub fn exec(&self, sql: String, params: JsValue) -> Promise {
        let client = self.client.clone();
        future_to_promise(async move {
            let params = params_from_js(&params).map_err(js_error)?;
            let rows_affected = client.exec(&sql, params).await.map_err(js_error)?;
            let result = Object::new();
            // Row counts never approach 2^53, so a plain number is exact.
            Reflect::set(
                &result,
                &"rowsAffected".into(),
                &(rows_affected as f64).into(),
            )?;
            Ok(result.into())
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
            value_from_js(&value).ok_or_else(|| {
                ErrorReply::new(
                    ErrorCode::InvalidArgument,
                    format!(
                        "parameter {} has a type SQL cannot store (use null, a boolean, \
                         number, bigint, string or Uint8Array)",
                        index + 1
                    ),
                )
            })
        })
        .collect()
}

fn value_from_js(value: &JsValue) -> Option<Value> {
    if value.is_null() || value.is_undefined() {
        Some(Value::Null)
    } else if let Some(b) = value.as_bool() {
        Some(Value::Integer(b.into()))
    } else if let Some(n) = value.as_f64() {
        // Integral numbers are stored as INTEGER, so `id = ?` matches an INTEGER column
        // the way a JS developer expects.
        let integral = n.fract() == 0.0 && n.abs() <= JS_SAFE_INTEGER_MAX as f64;
        Some(if integral {
            Value::Integer(n as i64)
        } else {
            Value::Real(n)
        })
    } else if let Some(s) = value.as_string() {
        Some(Value::Text(s))
    } else if let Some(big) = value.dyn_ref::<BigInt>() {
        i64::try_from(big.clone()).ok().map(Value::Integer)
    } else if let Some(bytes) = value.dyn_ref::<Uint8Array>() {
        Some(Value::Blob(bytes.to_vec()))
    } else {
        value
            .dyn_ref::<js_sys::ArrayBuffer>()
            .map(|buffer| Value::Blob(Uint8Array::new(buffer).to_vec()))
    }
}

fn value_to_js(value: &Value) -> JsValue {
    match value {
        Value::Null => JsValue::NULL,
        Value::Integer(i) if i.abs() <= JS_SAFE_INTEGER_MAX => JsValue::from(*i as f64),
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
