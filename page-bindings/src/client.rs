//! The typed Rust API: a tab's connection to the device's SharedWorker.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::{Rc, Weak};

use hearth_bridge::{
    decode, encode, DecodeError, ErrorCode, ErrorReply, PageMessage, Reply, Request, Rows, Value,
    WorkerMessage,
};
use js_sys::{Array, Uint8Array};
use tokio::sync::oneshot;
use wasm_bindgen::prelude::*;
use wasm_bindgen::JsCast;
use web_sys::{MessageEvent, MessagePort, SharedWorker, WorkerOptions, WorkerType};

/// Requests one tab may have in flight. Past this, calls fail with BUSY at once instead
/// of piling up behind a stalled worker.
pub const PENDING_REQUESTS_MAX: usize = 10_000;

/// Must match `hearth_worker::host::WORKER_NAME_PREFIX`: the worker derives its database
/// file from the name this side gives it.
const WORKER_NAME_PREFIX: &str = "hearth:";

type Waiter = oneshot::Sender<Result<Reply, ErrorReply>>;

/// A connection from this tab to the SharedWorker hosting database `name`. Cheap to
/// clone; all clones share one port. Dropping the last clone closes the port.
#[derive(Clone)]
pub struct Client {
    inner: Rc<Inner>,
}

struct Inner {
    port: MessagePort,
    // Kept so that the worker is not collected while the tab uses it.
    _worker: SharedWorker,
    pending: RefCell<HashMap<u32, Waiter>>,
    next_id: Cell<u32>,
    /// Set once the connection can no longer work (version mismatch, worker failed to
    /// start); later calls fail at once with this error.
    broken: RefCell<Option<ErrorReply>>,
    on_message: Closure<dyn Fn(MessageEvent)>,
    on_error: Closure<dyn Fn(JsValue)>,
}

impl Client {
    /// Connects to (starting if needed) the SharedWorker at `worker_url` that hosts the
    /// database `name`. Every tab of the origin that names the same database reaches the
    /// same worker, because the browser shares a SharedWorker per (URL, name).
    pub fn connect(worker_url: &str, name: &str) -> Result<Client, ErrorReply> {
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
            Inner {
                port: port.clone(),
                _worker: worker.clone(),
                pending: RefCell::new(HashMap::new()),
                next_id: Cell::new(1),
                broken: RefCell::new(None),
                on_message,
                on_error,
            }
        });
        worker.set_onerror(Some(inner.on_error.as_ref().unchecked_ref()));
        // Assigning onmessage starts the port.
        port.set_onmessage(Some(inner.on_message.as_ref().unchecked_ref()));
        Ok(Client { inner })
    }

    /// Runs SQL that changes the database; resolves with the number of rows changed once
    /// the change is durable on this device.
    pub async fn exec(&self, sql: &str, params: Vec<Value>) -> Result<u64, ErrorReply> {
        let request = Request::Exec {
            sql: sql.to_owned(),
            params,
        };
        match self.inner.request(request)?.await {
            Ok(Ok(Reply::Exec { rows_affected })) => Ok(rows_affected),
            Ok(Ok(other)) => Err(unexpected(&other)),
            Ok(Err(error)) => Err(error),
            Err(_) => Err(closed()),
        }
    }

    /// Runs one read-only statement; resolves with its rows.
    pub async fn query(&self, sql: &str, params: Vec<Value>) -> Result<Rows, ErrorReply> {
        let request = Request::Query {
            sql: sql.to_owned(),
            params,
        };
        match self.inner.request(request)?.await {
            Ok(Ok(Reply::Query(rows))) => Ok(rows),
            Ok(Ok(other)) => Err(unexpected(&other)),
            Ok(Err(error)) => Err(error),
            Err(_) => Err(closed()),
        }
    }

    /// Closes this tab's port; pending and later calls fail with CLOSED. The worker and
    /// other tabs are not affected.
    pub fn close(&self) {
        self.inner.break_with(closed());
        self.inner.port.close();
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
        let frame = encode(&PageMessage::Request { id, request })
            .map_err(|err| ErrorReply::new(ErrorCode::InvalidArgument, err.to_string()))?;
        let (waiter, reply) = oneshot::channel();
        self.pending.borrow_mut().insert(id, waiter);
        let array = Uint8Array::from(frame.as_slice());
        if let Err(err) = self
            .port
            .post_message_with_transferable(&array, &Array::of1(&array.buffer()))
        {
            self.pending.borrow_mut().remove(&id);
            return Err(ErrorReply::new(
                ErrorCode::Closed,
                format!("cannot send to the Hearth worker: {err:?}"),
            ));
        }
        Ok(reply)
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
                if let Some(waiter) = self.pending.borrow_mut().remove(&id) {
                    // The caller may have stopped waiting; nothing to do then.
                    let _ = waiter.send(result);
                }
            }
            Err(err @ DecodeError::VersionMismatch { .. }) => self.break_with(err.into()),
            Err(err) => self.fail_all(&err.into()),
        }
    }

    fn fail_all(&self, error: &ErrorReply) {
        let waiters: Vec<Waiter> = self.pending.borrow_mut().drain().map(|(_, w)| w).collect();
        for waiter in waiters {
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
        self.port.set_onmessage(None);
        self._worker.set_onerror(None);
        self.port.close();
    }
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
