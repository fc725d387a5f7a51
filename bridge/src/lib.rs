//! The page <-> worker protocol of Hearth, defined once for both sides.
//!
//! Every tab talks to the device's one SharedWorker through a `MessagePort`. Both ends are
//! Rust compiled to wasm (`hearth-page` in the tab, `hearth-worker` in the worker), so the
//! messages are plain Rust enums here and nothing is mirrored by hand in JavaScript.
//!
//! Layout:
//! - [`Value`], [`Rows`]: SQL values and result sets as they cross the port.
//! - [`PageMessage`] / [`Request`]: what a tab asks; [`WorkerMessage`] / [`Reply`]: answers.
//! - [`ErrorReply`] / [`ErrorCode`]: failures, with the stable code the JS API exposes.
//! - [`encode`] / [`decode`]: the frame format. A frame is postcard bytes of
//!   `(PROTOCOL_VERSION, message)`. Postcard has no schema, so a peer built from other
//!   sources would misread fields silently; the version prefix turns that into a clear
//!   [`DecodeError::VersionMismatch`]. **The prefix stays a `u16` forever**, so that any two
//!   versions can at least tell that they disagree.
//!
//! This crate knows nothing about the browser, so it builds and is tested natively.

use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// Bump on any change to the messages below that an older peer would misread.
pub const PROTOCOL_VERSION: u16 = 1;

/// The largest frame either side accepts. A bound keeps one runaway query result from
/// exhausting a tab's memory; hitting it is a clear error, never a silent truncation.
pub const FRAME_BYTES_MAX: usize = 64 * 1024 * 1024;

/// An SQLite value, as it crosses the port.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Value {
    Null,
    Integer(i64),
    Real(f64),
    Text(String),
    Blob(Vec<u8>),
}

/// A result set: column names once, then one `Vec<Value>` per row in column order.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Rows {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Value>>,
}

/// A message from a tab to the worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum PageMessage {
    /// `id` is chosen by the tab and echoed in the [`WorkerMessage::Response`]; it is unique
    /// only per port, so the worker never compares ids across tabs.
    Request { id: u32, request: Request },
}

/// What a tab can ask of the worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// Run statements that change the database. The reply comes only once the change is
    /// durable in the device's storage, not merely committed in memory.
    Exec { sql: String, params: Vec<Value> },
    /// Run one read-only statement and return its rows.
    Query { sql: String, params: Vec<Value> },
}

/// A message from the worker to a tab.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum WorkerMessage {
    Response {
        id: u32,
        result: Result<Reply, ErrorReply>,
    },
}

/// A successful answer to a [`Request`] of the same kind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Reply {
    Exec { rows_affected: u64 },
    Query(Rows),
}

/// A failed request: the stable code the page turns into `Error.code`, and a message
/// for humans.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorReply {
    pub code: ErrorCode,
    pub message: String,
}

/// Failure classes that a page can act on. Their [`ErrorCode::as_str`] spellings are part
/// of the public JS API and never change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// SQLite refused the statement: syntax, unknown table, constraint, parameter count.
    SqlError,
    /// The device's storage failed (IndexedDB unavailable, quota, flush failed).
    Storage,
    /// A frame could not be decoded, or broke a bound.
    Protocol,
    /// The tab and the worker were built from different protocol versions; reloading
    /// every tab of the app fixes it.
    VersionMismatch,
    /// The worker's request queue is full; the request was not run.
    Busy,
    /// The database is not open (opening failed or it was closed).
    Closed,
    /// The page passed something the API cannot take, such as an object as an SQL
    /// parameter.
    InvalidArgument,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::SqlError => "SQL_ERROR",
            ErrorCode::Storage => "STORAGE",
            ErrorCode::Protocol => "PROTOCOL",
            ErrorCode::VersionMismatch => "VERSION_MISMATCH",
            ErrorCode::Busy => "BUSY",
            ErrorCode::Closed => "CLOSED",
            ErrorCode::InvalidArgument => "INVALID_ARGUMENT",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl ErrorReply {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorReply {
            code,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for ErrorReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for ErrorReply {}

/// Why bytes from the other side could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("protocol version mismatch: this side speaks {ours}, the peer speaks {theirs}; reload every tab of this app")]
    VersionMismatch { ours: u16, theirs: u16 },
    #[error("frame of {frame_bytes} bytes is over the limit of {FRAME_BYTES_MAX} bytes")]
    TooLarge { frame_bytes: usize },
    #[error("malformed frame: {0}")]
    Malformed(#[from] postcard::Error),
}

impl From<DecodeError> for ErrorReply {
    fn from(err: DecodeError) -> Self {
        let code = match err {
            DecodeError::VersionMismatch { .. } => ErrorCode::VersionMismatch,
            DecodeError::TooLarge { .. } | DecodeError::Malformed(_) => ErrorCode::Protocol,
        };
        ErrorReply::new(code, err.to_string())
    }
}

/// Why a message could not be turned into a frame.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("message of {frame_bytes} bytes is over the limit of {FRAME_BYTES_MAX} bytes")]
    TooLarge { frame_bytes: usize },
    #[error("cannot encode message: {0}")]
    Postcard(#[from] postcard::Error),
}

/// Encodes `message` as one frame, prefixed with [`PROTOCOL_VERSION`].
pub fn encode<T: Serialize>(message: &T) -> Result<Vec<u8>, EncodeError> {
    let frame = postcard::to_allocvec(&(PROTOCOL_VERSION, message))?;
    if frame.len() > FRAME_BYTES_MAX {
        return Err(EncodeError::TooLarge {
            frame_bytes: frame.len(),
        });
    }
    Ok(frame)
}

/// Reads only the version prefix of a frame, so a side can report a mismatch even when it
/// cannot read the rest.
pub fn frame_version(frame: &[u8]) -> Result<u16, DecodeError> {
    let (version, _) = postcard::take_from_bytes::<u16>(frame)?;
    Ok(version)
}

/// Decodes one frame made by [`encode`] on a peer of the same [`PROTOCOL_VERSION`].
pub fn decode<T: DeserializeOwned>(frame: &[u8]) -> Result<T, DecodeError> {
    if frame.len() > FRAME_BYTES_MAX {
        return Err(DecodeError::TooLarge {
            frame_bytes: frame.len(),
        });
    }
    let (theirs, rest) = postcard::take_from_bytes::<u16>(frame)?;
    if theirs != PROTOCOL_VERSION {
        return Err(DecodeError::VersionMismatch {
            ours: PROTOCOL_VERSION,
            theirs,
        });
    }
    let (message, trailing) = postcard::take_from_bytes::<T>(rest)?;
    if !trailing.is_empty() {
        // Trailing bytes mean the peer's message has fields we do not know: a version
        // bump was forgotten. Refuse rather than act on half a message.
        return Err(DecodeError::Malformed(
            postcard::Error::DeserializeBadEncoding,
        ));
    }
    Ok(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trips() {
        let message = PageMessage::Request {
            id: 7,
            request: Request::Exec {
                sql: "INSERT INTO t VALUES (?, ?, ?, ?, ?)".into(),
                params: vec![
                    Value::Null,
                    Value::Integer(i64::MIN),
                    Value::Real(1.5),
                    Value::Text("héllo".into()),
                    Value::Blob(vec![0, 255]),
                ],
            },
        };
        let frame = encode(&message).unwrap();
        assert_eq!(decode::<PageMessage>(&frame).unwrap(), message);
        assert_eq!(frame_version(&frame).unwrap(), PROTOCOL_VERSION);
    }

    #[test]
    fn response_round_trips() {
        let ok = WorkerMessage::Response {
            id: 1,
            result: Ok(Reply::Query(Rows {
                columns: vec!["a".into()],
                rows: vec![vec![Value::Integer(1)], vec![Value::Null]],
            })),
        };
        let err = WorkerMessage::Response {
            id: 2,
            result: Err(ErrorReply::new(ErrorCode::SqlError, "no such table: x")),
        };
        for message in [ok, err] {
            let frame = encode(&message).unwrap();
            assert_eq!(decode::<WorkerMessage>(&frame).unwrap(), message);
        }
    }

    #[test]
    fn other_version_is_a_clear_error() {
        let frame = postcard::to_allocvec(&(PROTOCOL_VERSION + 1, 0u8)).unwrap();
        let err = decode::<PageMessage>(&frame).unwrap_err();
        assert!(
            matches!(err, DecodeError::VersionMismatch { theirs, .. } if theirs == PROTOCOL_VERSION + 1)
        );
        assert_eq!(ErrorReply::from(err).code, ErrorCode::VersionMismatch);
    }

    #[test]
    fn garbage_and_trailing_bytes_are_refused() {
        assert!(matches!(
            decode::<PageMessage>(&[]),
            Err(DecodeError::Malformed(_))
        ));
        let mut frame = encode(&PageMessage::Request {
            id: 1,
            request: Request::Query {
                sql: "SELECT 1".into(),
                params: vec![],
            },
        })
        .unwrap();
        frame.push(0);
        assert!(matches!(
            decode::<PageMessage>(&frame),
            Err(DecodeError::Malformed(_))
        ));
    }

    #[test]
    fn error_codes_are_stable() {
        assert_eq!(ErrorCode::SqlError.as_str(), "SQL_ERROR");
        assert_eq!(ErrorCode::VersionMismatch.as_str(), "VERSION_MISMATCH");
    }
}
