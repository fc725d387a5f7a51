//! The in-memory harness the engine tests share: a device and a
//! `ServerCore` talking without a network, routed as the server's driver
//! routes (Welcome and catch-up on Hello, log entries for applied pushes,
//! `Rejected` for refused ones).

use hearth_engine::protocol::{ClientMsg, ServerMsg};
use hearth_engine::{Client, Event, Outcome, ServerCore};

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
pub fn sync_with(
    server: &mut ServerCore,
    client: &mut Client,
    refuse: &[u64],
    frame_bytes_max: usize,
) -> Vec<Event> {
    let mut events = Vec::new();
    let mut to_server = client.on_connected();
    while !to_server.is_empty() {
        let mut to_client = Vec::new();
        for msg in to_server.drain(..) {
            match msg {
                ClientMsg::Hello { cursor, .. } => {
                    let hello = hearth_engine::server::Hello::of(&msg).unwrap();
                    let answer = server.greet(&hello, frame_bytes_max).unwrap();
                    if matches!(answer, ServerMsg::Error { .. }) {
                        to_client.push(answer);
                        continue;
                    }
                    to_client.push(answer);
                    let entries =
                        ServerCore::read_log(server.connection(), cursor, 10_000).unwrap();
                    to_client.push(ServerMsg::Changes {
                        entries,
                        caught_up: true,
                    });
                }
                ClientMsg::Push { mutations } => {
                    let (refused, taken): (Vec<_>, Vec<_>) =
                        mutations.into_iter().partition(|m| refuse.contains(&m.seq));
                    to_client.extend(refused.into_iter().map(|m| ServerMsg::Rejected {
                        client_seq: m.seq,
                        code: "CONSTRAINT".into(),
                        reason: "refused by the test".into(),
                    }));
                    let batch: Vec<_> =
                        taken.into_iter().map(|m| (client.client_id(), m)).collect();
                    for outcome in server.apply_batch(&batch).unwrap() {
                        match outcome {
                            Outcome::Applied(entry) => to_client.push(ServerMsg::Changes {
                                entries: vec![entry],
                                caught_up: true,
                            }),
                            refused => to_client.extend(refused.refusal()),
                        }
                    }
                }
            }
        }
        for msg in to_client {
            let out = client.handle(msg, 0).unwrap();
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
