//! The in-memory harness the engine tests share: a device and a
//! `ServerCore` talking without a network, with the server's side of the
//! connection decided by the engine's `Link`, as in the real server.

use std::sync::Arc;

use hearth_engine::link::{Link, LinkConfig, Step};
use hearth_engine::protocol::{ClientMsg, ServerMsg};
use hearth_engine::{Client, ClientConfig, Event, Schema, ServerCore, Value};
use rusqlite::Connection;

/// A server and any number of devices on one schema, in memory.
#[allow(dead_code)] // Not every test file uses it.
pub struct Net {
    pub server: ServerCore,
    next_id: u64,
}

#[allow(dead_code)]
impl Net {
    /// A server on the schema whose `[tables...]` sections are `tables`.
    pub fn new(tables: &str) -> Net {
        let schema = Schema::parse(&format!("version = 1\n{tables}")).unwrap();
        Net {
            server: ServerCore::open(Connection::open_in_memory().unwrap(), schema).unwrap(),
            next_id: 1,
        }
    }

    /// A fresh device that has synced once (so it has the schema).
    pub fn device(&mut self) -> Client {
        let mut c = Client::open(
            Connection::open_in_memory().unwrap(),
            self.next_id,
            ClientConfig::default(),
        )
        .unwrap();
        self.next_id += 1;
        self.sync(&mut c);
        c
    }

    pub fn sync(&mut self, c: &mut Client) -> Vec<Event> {
        sync(&mut self.server, c)
    }

    /// Syncs every device twice over, so that each has sent what it had
    /// pending and seen what the others sent.
    pub fn settle(&mut self, devices: &mut [&mut Client]) {
        for _ in 0..2 {
            for d in devices.iter_mut() {
                self.sync(d);
            }
        }
    }

    /// What the server's store holds, read the way a user reads a device.
    pub fn server_rows(&self, sql: &str) -> Vec<Vec<Value>> {
        let mut stmt = self.server.connection().prepare(sql).unwrap();
        let width = stmt.column_count();
        stmt.query_map([], |r| (0..width).map(|i| r.get(i)).collect())
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }
}

#[allow(dead_code)]
pub fn rows(c: &Client, sql: &str) -> Vec<Vec<Value>> {
    c.query(sql, &[]).unwrap().rows
}

#[allow(dead_code)]
pub fn text(s: &str) -> Value {
    Value::Text(s.into())
}

/// The refusals among `events`: (mutation, code, reason).
#[allow(dead_code)]
pub fn rejected(events: &[Event]) -> Vec<(u64, String, String)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Rejected {
                seq, code, reason, ..
            } => Some((*seq, code.clone(), reason.clone())),
            _ => None,
        })
        .collect()
}

/// One full sync, routed as the network driver routes: Welcome and catch-up,
/// then each push's outcomes back to the device.
pub fn sync(server: &mut ServerCore, client: &mut Client) -> Vec<Event> {
    sync_refusing(server, client, &[])
}

/// Like [`sync`], but the mutations numbered in `refuse` are answered with
/// `Rejected` (code `CONSTRAINT`) instead of reaching the server, as a
/// server rule refusing them would answer.
#[allow(dead_code)] // Not every test file refuses.
pub fn sync_refusing(server: &mut ServerCore, client: &mut Client, refuse: &[u64]) -> Vec<Event> {
    sync_with(
        server,
        client,
        refuse,
        hearth_engine::protocol::FRAME_BYTES_MAX,
    )
}

/// Like [`sync_refusing`], with a server whose `Welcome` names this frame limit.
///
/// The server's side of the connection is the engine's [`Link`], exactly as
/// the real server drives it: Hello and Welcome, pushes applied as they
/// come, then every log entry and initial-load chunk the link lets through.
pub fn sync_with(
    server: &mut ServerCore,
    client: &mut Client,
    refuse: &[u64],
    frame_bytes_max: usize,
) -> Vec<Event> {
    let mut events = Vec::new();
    let mut link = Link::new(Arc::new(server.schema().clone()), LinkConfig::default());
    let mut to_server = client.on_connected();
    let mut welcomed = false;
    loop {
        let mut to_client = Vec::new();
        for msg in to_server.drain(..) {
            if !welcomed {
                welcomed = true;
                let hello = link.on_hello(msg).unwrap();
                let answer = server.greet(&hello, frame_bytes_max).unwrap();
                to_client.extend(link.on_welcome(answer, server.head()));
                continue;
            }
            let msg = match msg {
                ClientMsg::Push { mutations } => {
                    let (refused, taken): (Vec<_>, Vec<_>) =
                        mutations.into_iter().partition(|m| refuse.contains(&m.seq));
                    to_client.extend(refused.into_iter().map(|m| ServerMsg::Rejected {
                        client_seq: m.seq,
                        code: "CONSTRAINT".into(),
                        reason: "refused by the test".into(),
                    }));
                    ClientMsg::Push { mutations: taken }
                }
                other => other,
            };
            for step in link.on_message(msg) {
                match step {
                    Step::Send(msg) => to_client.push(msg),
                    Step::Apply(mutations) => {
                        let batch: Vec<_> = mutations
                            .into_iter()
                            .map(|m| (client.client_id(), m))
                            .collect();
                        for outcome in server.apply_batch(&batch).unwrap() {
                            if let Some(refusal) = outcome.refusal() {
                                match link.on_refusal(refusal) {
                                    Step::Send(msg) => to_client.push(msg),
                                    Step::Close { code, message } => {
                                        to_client.push(ServerMsg::Error { code, message })
                                    }
                                    Step::Apply(_) => unreachable!(),
                                }
                            }
                        }
                    }
                    Step::Close { code, message } => {
                        to_client.push(ServerMsg::Error { code, message })
                    }
                }
            }
        }
        loop {
            if let Some(read) = link.next_read() {
                let chunk =
                    hearth_engine::server::read_load(server.connection(), server.schema(), &read)
                        .unwrap();
                to_client.extend(link.on_read(chunk));
                continue;
            }
            if link.wants_entries(server.head()) {
                let entries =
                    ServerCore::read_log(server.connection(), link.cursor(), 10_000).unwrap();
                to_client.extend(link.on_entries(&entries, server.head()));
                continue;
            }
            break;
        }
        if to_client.is_empty() {
            break;
        }
        for msg in to_client {
            let fatal = matches!(msg, ServerMsg::Error { .. });
            let out = match client.handle(msg, 0) {
                Ok(out) => out,
                Err(_) if fatal => {
                    client.on_disconnected();
                    return events;
                }
                Err(e) => panic!("the device failed on a server message: {e}"),
            };
            let rewound = out
                .events
                .iter()
                .any(|e| matches!(e, Event::Rewound { .. }));
            events.extend(out.events);
            if rewound {
                // The device took a new identity: the connection is over.
                client.on_disconnected();
                return events;
            }
            to_server.extend(out.send);
        }
    }
    client.on_disconnected();
    events
}
