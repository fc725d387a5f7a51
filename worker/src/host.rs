//! The SharedWorker glue: accepts tabs' ports, decodes their requests, runs them one at a
//! time against the [`Store`], and answers each on the port it came from.
//!
//! All requests of all tabs go through one bounded queue into one task. SQLite has one
//! connection, so running requests in arrival order is both the simplest and the fairest
//! schedule. An `exec` is answered only after its flush barrier resolves; the barrier is
//! awaited in a separate task so that the next request need not wait for IndexedDB.

use std::cell::RefCell;
use std::rc::Rc;

use hearth_bridge::{
    decode, encode, frame_version, ErrorCode, ErrorReply, PageMessage, Reply, Request,
    WorkerMessage, PROTOCOL_VERSION,
};
use js_sys::{Array, Uint8Array};
use tokio::sync::mpsc;
use wasm_bindgen::prelude::*;
use wasm_bindgen::JsCast;
use web_sys::{MessageEvent, MessagePort, SharedWorkerGlobalScope};

use crate::store::Store;

/// Requests waiting for the database, across all tabs. Past this, requests are refused
/// with BUSY at once rather than queued without limit.
pub const REQUEST_QUEUE_MAX: usize = 4096;

/// The prefix a page puts before the database name in the SharedWorker's name, so that a
/// SharedWorker is shared per (origin, database name) and knows which file to open.
pub const WORKER_NAME_PREFIX: &str = "hearth:";

struct Job {
    port: MessagePort,
    id: u32,
    request: Request,
}

/// Starts serving. Called once by the worker entry script after the wasm has loaded, with
/// the `connect` events that arrived while it loaded.
#[wasm_bindgen]
pub fn run(pending_connects: Array) -> Result<(), JsValue> {
    let scope: SharedWorkerGlobalScope = js_sys::global().dyn_into().map_err(|_| {
        JsValue::from(js_sys::Error::new(
            "hearth-worker must run in a SharedWorker",
        ))
    })?;
    let worker_name = scope.name();
    let file = database_file(&worker_name);

    let (queue, jobs) = mpsc::channel::<Job>(REQUEST_QUEUE_MAX);
    // One message handler serves every port: `event.target` tells which port a message
    // came from, so no closure has to be created (and leaked) per tab.
    let on_message = Closure::<dyn Fn(MessageEvent)>::new(move |event: MessageEvent| {
        if let Some(port) = event
            .target()
            .and_then(|t| t.dyn_into::<MessagePort>().ok())
        {
            accept_message(&queue, port, &event.data());
        }
    });
    let on_message = Rc::new(on_message);

    let on_connect = {
        let on_message = Rc::clone(&on_message);
        Closure::<dyn Fn(MessageEvent)>::new(move |event: MessageEvent| {
            attach_ports(&event, &on_message);
        })
    };
    // Set the handler before handling the buffered events, in the same synchronous run, so
    // no connect can fall between the two.
    scope.set_onconnect(Some(on_connect.as_ref().unchecked_ref()));
    for event in pending_connects.iter() {
        if let Ok(event) = event.dyn_into::<MessageEvent>() {
            attach_ports(&event, &on_message);
        }
    }
    // Both handlers live as long as the worker does.
    on_connect.forget();
    std::mem::forget(on_message);

    wasm_bindgen_futures::spawn_local(serve(file, jobs));
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

fn attach_ports(event: &MessageEvent, on_message: &Closure<dyn Fn(MessageEvent)>) {
    for port in event.ports().iter() {
        if let Ok(port) = port.dyn_into::<MessagePort>() {
            // Assigning onmessage also starts the port, delivering messages it queued.
            port.set_onmessage(Some(on_message.as_ref().unchecked_ref()));
        }
    }
}

fn accept_message(queue: &mpsc::Sender<Job>, port: MessagePort, data: &JsValue) {
    let Some(bytes) = data.dyn_ref::<Uint8Array>().map(Uint8Array::to_vec) else {
        post(
            &port,
            &undecodable(ErrorReply::new(
                ErrorCode::Protocol,
                "expected a Uint8Array frame",
            )),
        );
        return;
    };
    match decode::<PageMessage>(&bytes) {
        Ok(PageMessage::Request { id, request }) => {
            let job = Job { port, id, request };
            if let Err(
                mpsc::error::TrySendError::Full(job) | mpsc::error::TrySendError::Closed(job),
            ) = queue.try_send(job)
            {
                let error = ErrorReply::new(
                    ErrorCode::Busy,
                    format!("{REQUEST_QUEUE_MAX} requests are already waiting"),
                );
                respond(&job.port, job.id, Err(error));
            }
        }
        Err(err) => {
            let theirs = frame_version(&bytes).unwrap_or(0);
            web_sys::console::warn_1(
                &format!("hearth-worker: unreadable frame (page protocol {theirs}, ours {PROTOCOL_VERSION}): {err}").into(),
            );
            post(&port, &undecodable(err.into()));
        }
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

async fn serve(file: String, mut jobs: mpsc::Receiver<Job>) {
    let store = Store::open(&file).await.map_err(|err| {
        let error = ErrorReply::new(
            ErrorCode::Closed,
            format!("cannot open database {file}: {err}"),
        );
        web_sys::console::error_1(&format!("hearth-worker: {error}").into());
        error
    });
    let store = store.map(|store| Rc::new(RefCell::new(store)));

    while let Some(Job { port, id, request }) = jobs.recv().await {
        let store = match &store {
            Ok(store) => store,
            Err(error) => {
                respond(&port, id, Err(error.clone()));
                continue;
            }
        };
        match request {
            Request::Query { sql, params } => {
                let result = store.borrow().query(&sql, &params).map(Reply::Query);
                respond(&port, id, result);
            }
            Request::Exec { sql, params } => {
                let executed = store.borrow_mut().exec(&sql, &params);
                let barrier =
                    executed.and_then(|rows_affected| Ok((rows_affected, store.borrow().flush()?)));
                match barrier {
                    Ok((rows_affected, barrier)) => {
                        wasm_bindgen_futures::spawn_local(async move {
                            let result = match barrier.await {
                                Ok(()) => Ok(Reply::Exec { rows_affected }),
                                Err(err) => Err(ErrorReply::new(
                                    ErrorCode::Storage,
                                    format!(
                                        "committed in memory but not saved to IndexedDB: {err}"
                                    ),
                                )),
                            };
                            respond(&port, id, result);
                        });
                    }
                    Err(error) => respond(&port, id, Err(error)),
                }
            }
        }
    }
}

fn respond(port: &MessagePort, id: u32, result: Result<Reply, ErrorReply>) {
    post(port, &WorkerMessage::Response { id, result });
}

fn post(port: &MessagePort, message: &WorkerMessage) {
    let frame = match encode(message) {
        Ok(frame) => frame,
        Err(err) => {
            let WorkerMessage::Response { id, .. } = message;
            let fallback = WorkerMessage::Response {
                id: *id,
                result: Err(ErrorReply::new(ErrorCode::Protocol, err.to_string())),
            };
            encode(&fallback).expect("a short error reply always encodes")
        }
    };
    let array = Uint8Array::from(frame.as_slice());
    // Transferring the buffer hands it over instead of copying it; a port whose tab has
    // closed drops the message, which is all a closed tab needs.
    if let Err(err) = port.post_message_with_transferable(&array, &Array::of1(&array.buffer())) {
        web_sys::console::warn_2(&"hearth-worker: cannot post reply".into(), &err);
    }
}
