//! SQL values as they travel between devices and the server.

use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSql, ToSqlOutput, ValueRef};
use serde::{Deserialize, Serialize};

/// One SQLite value. The wire form is postcard's encoding of this enum, so the
/// variant order is part of the protocol: append, never reorder.
///
/// Values cross every boundary exactly: an integer keeps all 64 bits, a real
/// its bit pattern (`-0.0` stays negative where SQLite keeps it; SQLite itself
/// stores NaN as NULL), a blob its bytes. TEXT is UTF-8: SQLite does not check
/// that, so reading TEXT that is not valid UTF-8 is an error
/// ([`InvalidText`]), never a silent replacement of the bad bytes.
///
/// Equality is exact too: same storage class and same bits (`Real(0.0)` and
/// `Real(-0.0)` differ, `Integer(1)` and `Real(1.0)` differ), which is what
/// "this column changed" means to a device and to the server.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub enum Value {
    #[default]
    Null,
    Integer(i64),
    Real(f64),
    Text(String),
    Blob(Vec<u8>),
}

impl PartialEq for Value {
    fn eq(&self, other: &Value) -> bool {
        match (self, other) {
            (Value::Null, Value::Null) => true,
            (Value::Integer(a), Value::Integer(b)) => a == b,
            (Value::Real(a), Value::Real(b)) => a.to_bits() == b.to_bits(),
            (Value::Text(a), Value::Text(b)) => a == b,
            (Value::Blob(a), Value::Blob(b)) => a == b,
            _ => false,
        }
    }
}

/// TEXT read from SQLite that is not valid UTF-8.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error(
    "TEXT value {hex} is not valid UTF-8: Hearth keeps TEXT as UTF-8 on every device, \
     so store such bytes as a BLOB (X'...' or CAST(... AS BLOB))"
)]
pub struct InvalidText {
    /// The bytes in hex, the first 32 of them.
    pub hex: String,
}

impl InvalidText {
    fn of(bytes: &[u8]) -> InvalidText {
        let mut hex: String = bytes.iter().take(32).map(|b| format!("{b:02X}")).collect();
        if bytes.len() > 32 {
            hex.push_str("...");
        }
        InvalidText {
            hex: format!("X'{hex}'"),
        }
    }
}

/// A JSON parameter that has no exact SQL value.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0} cannot be stored exactly as an SQL value")]
pub struct InvalidJson(String);

impl Value {
    /// SQLite's name for the value's storage class (`typeof()`).
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Integer(_) => "integer",
            Value::Real(_) => "real",
            Value::Text(_) => "text",
            Value::Blob(_) => "blob",
        }
    }

    /// Reads a value from SQLite exactly; TEXT must be valid UTF-8.
    pub fn from_sql_ref(v: ValueRef<'_>) -> Result<Value, InvalidText> {
        Ok(match v {
            ValueRef::Null => Value::Null,
            ValueRef::Integer(i) => Value::Integer(i),
            ValueRef::Real(r) => Value::Real(r),
            ValueRef::Text(t) => Value::Text(
                std::str::from_utf8(t)
                    .map_err(|_| InvalidText::of(t))?
                    .to_owned(),
            ),
            ValueRef::Blob(b) => Value::Blob(b.to_vec()),
        })
    }

    /// Converts a JSON value given by an app (CLI arguments, page calls) into a
    /// SQL parameter. Booleans become 0/1 as SQLite has no boolean type, and
    /// arrays or objects are stored as their JSON text.
    ///
    /// # Errors
    /// A number that is neither an `i64` nor a finite `f64` (say
    /// 18446744073709551615, which would otherwise become an inexact real).
    pub fn from_json(json: &serde_json::Value) -> Result<Value, InvalidJson> {
        Ok(match json {
            serde_json::Value::Null => Value::Null,
            serde_json::Value::Bool(b) => Value::Integer(i64::from(*b)),
            serde_json::Value::Number(n) => {
                if let Some(i) = n.as_i64() {
                    Value::Integer(i)
                } else if n.is_f64() {
                    Value::Real(n.as_f64().ok_or_else(|| InvalidJson(n.to_string()))?)
                } else {
                    return Err(InvalidJson(format!(
                        "integer {n} is outside SQLite's 64-bit range and"
                    )));
                }
            }
            serde_json::Value::String(s) => Value::Text(s.clone()),
            other => Value::Text(other.to_string()),
        })
    }

    /// Converts to JSON for display and for the page API. A blob becomes an
    /// array of byte values, because JSON has no byte string.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Value::Null => serde_json::Value::Null,
            Value::Integer(i) => (*i).into(),
            Value::Real(r) => serde_json::Number::from_f64(*r)
                .map(serde_json::Value::Number)
                .unwrap_or(serde_json::Value::Null),
            Value::Text(s) => serde_json::Value::String(s.clone()),
            Value::Blob(b) => serde_json::Value::Array(b.iter().map(|x| (*x).into()).collect()),
        }
    }
}

impl ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self {
            Value::Null => ToSqlOutput::Borrowed(ValueRef::Null),
            Value::Integer(i) => ToSqlOutput::Borrowed(ValueRef::Integer(*i)),
            Value::Real(r) => ToSqlOutput::Borrowed(ValueRef::Real(*r)),
            Value::Text(s) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
            Value::Blob(b) => ToSqlOutput::Borrowed(ValueRef::Blob(b)),
        })
    }
}

impl FromSql for Value {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        Value::from_sql_ref(value).map_err(|e| FromSqlError::Other(Box::new(e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trip_keeps_scalars() {
        for json in [
            serde_json::json!(null),
            serde_json::json!(42),
            serde_json::json!(-1.5),
            serde_json::json!("héllo"),
        ] {
            assert_eq!(Value::from_json(&json).unwrap().to_json(), json);
        }
        assert_eq!(
            Value::from_json(&serde_json::json!(true)),
            Ok(Value::Integer(1))
        );
        assert_eq!(
            Value::from_json(&serde_json::json!(["a", 1])),
            Ok(Value::Text("[\"a\",1]".into()))
        );
    }

    #[test]
    fn json_numbers_convert_exactly_or_not_at_all() {
        assert_eq!(
            Value::from_json(&serde_json::json!(i64::MIN)),
            Ok(Value::Integer(i64::MIN))
        );
        assert_eq!(
            Value::from_json(&serde_json::json!(i64::MAX)),
            Ok(Value::Integer(i64::MAX))
        );
        assert!(Value::from_json(&serde_json::json!(u64::MAX)).is_err());
        assert_eq!(
            Value::from_json(&serde_json::json!(-0.0)),
            Ok(Value::Real(-0.0))
        );
    }

    #[test]
    fn equality_is_storage_class_and_bits() {
        assert_ne!(Value::Real(0.0), Value::Real(-0.0));
        assert_ne!(Value::Integer(1), Value::Real(1.0));
        assert_eq!(Value::Real(f64::MAX), Value::Real(f64::MAX));
        assert_ne!(Value::Text("a".into()), Value::Blob(b"a".to_vec()));
    }

    #[test]
    fn text_that_is_not_utf8_is_an_error_not_a_replacement() {
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        let got: rusqlite::Result<Value> =
            conn.query_row("SELECT CAST(X'4AC3A973FF41' AS TEXT)", [], |r| r.get(0));
        let err = got.unwrap_err().to_string();
        assert!(
            err.contains("X'4AC3A973FF41'") && err.contains("not valid UTF-8"),
            "{err}"
        );
        let ok: Value = conn
            .query_row("SELECT CAST(X'4AC3A973' AS TEXT)", [], |r| r.get(0))
            .unwrap();
        assert_eq!(ok, Value::Text("Jés".into()));
    }
}
