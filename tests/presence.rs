//! Rooms and presence over real sockets: a real server on a loopback port,
//! devices as raw WebSockets speaking the protocol (as the browser worker
//! does), each keeping the member list the way the worker keeps it.
//!
//! What a user relies on: who is present is what the server says; a device
//! whose socket drops, or that goes silent without closing (a dead device, a
//! network gone without a FIN), leaves within 5 s; a reconnect rejoins
//! without a duplicate; a fast broadcast stream arrives coalesced, latest
//! last; bounds are refused with their codes; and none of it reaches the
//! log or the store.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use hearth::native_client::{self, Ws};
use hearth_engine::protocol::{
    decode_server, encode_client, ClientMsg, Member, MemberId, ServerMsg, FRAME_BYTES_MAX,
};
use hearth_engine::rooms::HEARTBEAT_INTERVAL_MS;
use tokio_tungstenite::tungstenite::Message;

/// The issue's promise: a device that is gone leaves within this.
const LEAVE_WITHIN: Duration = Duration::from_secs(5);

const ROOM: &str = "doc:42";

const ANN: u64 = 0xA11;
const BOB: u64 = 0xB0B;
const CAT: u64 = 0xCA7;

fn mid(client_id: u64, tab: u64) -> MemberId {
    MemberId { client_id, tab }
}

/// One device on one socket, with the room's member list as it learnt it.
struct Peer {
    ws: Ws,
    members: BTreeMap<MemberId, Member>,
    relayed: Vec<(MemberId, String)>,
    refused: Vec<(String, u64, String)>,
    last_beat: Instant,
}

impl Peer {
    async fn connect(url: &str, client_id: u64) -> Peer {
        let mut ws = native_client::connect(url, common::TIMEOUT).await.unwrap();
        let hello = ClientMsg::Hello {
            client_id,
            cursor: 0,
            schema_version: None,
            subscriptions: Vec::new(),
            token: None,
            reloaded: Default::default(),
            first_pending: 0,
        };
        ws.send(frame(&hello)).await.unwrap();
        let mut peer = Peer {
            ws,
            members: BTreeMap::new(),
            relayed: Vec::new(),
            refused: Vec::new(),
            last_beat: Instant::now(),
        };
        // Past the handshake before anything else.
        peer.until(|msg| matches!(msg, ServerMsg::Welcome { .. }))
            .await;
        peer
    }

    async fn send(&mut self, msg: ClientMsg) {
        self.ws.send(frame(&msg)).await.unwrap();
    }

    async fn join(&mut self, tab: u64, state: &str) {
        let msg = ClientMsg::Join {
            room: ROOM.into(),
            tab,
            state: state.into(),
        };
        self.send(msg).await;
    }

    /// Reads frames, keeping the member list, saying `Heartbeat` as the
    /// worker does, until `done` holds for one; panics past the timeout.
    async fn until(&mut self, mut done: impl FnMut(&ServerMsg) -> bool) -> ServerMsg {
        let deadline = tokio::time::Instant::now() + common::TIMEOUT;
        loop {
            let beat = tokio::time::sleep(Duration::from_millis(HEARTBEAT_INTERVAL_MS));
            let msg = tokio::select! {
                msg = self.ws.next() => msg,
                _ = beat => {
                    self.send(ClientMsg::Heartbeat).await;
                    continue;
                }
                _ = tokio::time::sleep_until(deadline) => panic!("nothing expected arrived in time"),
            };
            let msg = msg.expect("the connection stays open").expect("a frame");
            if self.last_beat.elapsed() >= Duration::from_millis(HEARTBEAT_INTERVAL_MS) {
                self.last_beat = Instant::now();
                self.send(ClientMsg::Heartbeat).await;
            }
            let Message::Binary(bytes) = msg else {
                continue;
            };
            let msg = decode_server(&bytes, FRAME_BYTES_MAX).unwrap();
            match &msg {
                ServerMsg::Presence {
                    room,
                    full,
                    members,
                    left,
                } if room == ROOM => {
                    if *full {
                        self.members.clear();
                    }
                    for m in members {
                        self.members.insert(m.id, m.clone());
                    }
                    for id in left {
                        self.members.remove(id);
                    }
                }
                ServerMsg::Relay { from, message, .. } => {
                    self.relayed.push((*from, message.clone()))
                }
                ServerMsg::RoomRefused {
                    room, tab, code, ..
                } => self.refused.push((room.clone(), *tab, code.clone())),
                _ => {}
            }
            if done(&msg) {
                return msg;
            }
        }
    }
}

fn frame(msg: &ClientMsg) -> Message {
    Message::Binary(encode_client(msg).into())
}

/// Waits until `peer`'s member list is exactly `ids` (sorted); returns how
/// long it took.
async fn wait_members(peer: &mut Peer, ids: &[MemberId]) -> Duration {
    let started = Instant::now();
    let mut want = ids.to_vec();
    want.sort();
    let matches = |p: &BTreeMap<MemberId, Member>| p.keys().copied().collect::<Vec<_>>() == want;
    if matches(&peer.members) {
        return started.elapsed();
    }
    loop {
        let deadline = tokio::time::Instant::now() + common::TIMEOUT;
        let beat = tokio::time::sleep(Duration::from_millis(HEARTBEAT_INTERVAL_MS));
        let msg = tokio::select! {
            msg = peer.ws.next() => msg,
            _ = beat => {
                peer.send(ClientMsg::Heartbeat).await;
                continue;
            }
            _ = tokio::time::sleep_until(deadline) => panic!(
                "members stayed {:?}, expected {want:?}",
                peer.members.keys().collect::<Vec<_>>()
            ),
        };
        let Message::Binary(bytes) = msg.expect("open").expect("a frame") else {
            continue;
        };
        let msg = decode_server(&bytes, FRAME_BYTES_MAX).unwrap();
        if peer.last_beat.elapsed() >= Duration::from_millis(HEARTBEAT_INTERVAL_MS) {
            peer.last_beat = Instant::now();
            peer.send(ClientMsg::Heartbeat).await;
        }
        if let ServerMsg::Presence {
            room,
            full,
            members,
            left,
        } = msg
        {
            assert_eq!(room, ROOM);
            if full {
                peer.members.clear();
            }
            for m in members {
                peer.members.insert(m.id, m);
            }
            for id in left {
                peer.members.remove(&id);
            }
            if matches(&peer.members) {
                return started.elapsed();
            }
        }
    }
}

/// A socket that drops leaves at once; a device that goes silent without
/// closing leaves within 5 s (its connection is closed, not kept as a
/// ghost); the states and join times are the ones each device set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_socket_or_a_silent_device_leaves_within_5_s() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start_server(dir.path(), common::ACCOUNTS_SCHEMA).await;
    let url = common::url(&server);
    let mut ann = Peer::connect(&url, ANN).await;
    let mut bob = Peer::connect(&url, BOB).await;
    ann.join(1, r#"{"name":"ann","cursor":[1,2]}"#).await;
    wait_members(&mut ann, &[mid(ANN, 1)]).await;
    bob.join(7, r#"{"name":"bob"}"#).await;
    let everyone = [mid(ANN, 1), mid(BOB, 7)];
    wait_members(&mut bob, &everyone).await;
    wait_members(&mut ann, &everyone).await;
    let ann_seen = &bob.members[&mid(ANN, 1)];
    assert_eq!(ann_seen.state, r#"{"name":"ann","cursor":[1,2]}"#);
    let now_ms = native_client::now_ms();
    assert!(
        ann_seen.since_ms <= now_ms && now_ms - ann_seen.since_ms < 60_000,
        "since is the join time: {} vs now {now_ms}",
        ann_seen.since_ms
    );

    // A socket that drops (the TCP connection closes, no close frame).
    let Peer { ws, .. } = ann;
    let dropped = Instant::now();
    drop(ws);
    wait_members(&mut bob, &[mid(BOB, 7)]).await;
    let took = dropped.elapsed();
    eprintln!("a dropped socket left after {took:?}");
    assert!(
        took < LEAVE_WITHIN,
        "a dropped socket took {took:?} to leave"
    );

    // A device that dies: its socket stays open but it says nothing more.
    let mut cat = Peer::connect(&url, CAT).await;
    cat.join(3, r#"{"name":"cat"}"#).await;
    wait_members(&mut bob, &[mid(BOB, 7), mid(CAT, 3)]).await;
    let silent_since = Instant::now();
    let took = wait_members(&mut bob, &[mid(BOB, 7)]).await;
    let silent_for = silent_since.elapsed();
    eprintln!("a silent device left after {silent_for:?} ({took:?} after bob saw it join)");
    assert!(
        silent_for < LEAVE_WITHIN,
        "a silent device stayed {silent_for:?}"
    );
    // The server closed the silent connection (the device reconnects and
    // rejoins), rather than keeping it half alive.
    let closed = tokio::time::timeout(common::TIMEOUT, async {
        loop {
            match cat.ws.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the silent connection is closed");
    // A heartbeating member was never dropped.
    assert!(bob.members.contains_key(&mid(BOB, 7)));

    // Nothing of it reached the log or the store.
    assert_eq!(common::metric(&server, "hearth_server_seq").await, 0);
    let store = rusqlite::Connection::open(dir.path().join("server").join("hearth.db")).unwrap();
    let logged: i64 = store
        .query_row("SELECT count(*) FROM _hearth_log", [], |r| r.get(0))
        .unwrap();
    assert_eq!(logged, 0, "room traffic is never logged");
    server.shutdown().await;
}

/// A device that reconnects (its old socket not yet noticed gone) and joins
/// again is one member, not two; its old connection ending later does not
/// take the member away; two tabs of one device are two members.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_rejoins_without_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start_server(dir.path(), common::ACCOUNTS_SCHEMA).await;
    let url = common::url(&server);
    let mut ann = Peer::connect(&url, ANN).await;
    let mut bob = Peer::connect(&url, BOB).await;
    bob.join(7, "{}").await;
    wait_members(&mut bob, &[mid(BOB, 7)]).await;
    ann.join(1, r#"{"n":1}"#).await;
    ann.join(2, r#"{"n":2}"#).await;
    wait_members(&mut bob, &[mid(ANN, 1), mid(ANN, 2), mid(BOB, 7)]).await;
    let since = bob.members[&mid(ANN, 1)].since_ms;

    let mut again = Peer::connect(&url, ANN).await;
    again.join(1, r#"{"n":1}"#).await;
    again.join(2, r#"{"n":2}"#).await;
    let all = [mid(ANN, 1), mid(ANN, 2), mid(BOB, 7)];
    wait_members(&mut again, &all).await;
    assert_eq!(again.members.len(), 3, "{:?}", again.members.keys());
    // Bob still sees three, and the old socket's end changes nothing.
    let Peer { ws, .. } = ann;
    drop(ws);
    again.join(2, r#"{"n":"changed"}"#).await;
    wait_members(&mut bob, &all).await;
    bob.until(|msg| {
        matches!(msg, ServerMsg::Presence { members, .. }
            if members.iter().any(|m| m.state == r#"{"n":"changed"}"#))
    })
    .await;
    assert_eq!(bob.members.len(), 3, "{:?}", bob.members.keys());
    assert_eq!(bob.members[&mid(ANN, 1)].since_ms, since, "the same member");
    // A tab that leaves is gone from everyone's list.
    again
        .send(ClientMsg::Leave {
            room: ROOM.into(),
            tab: 2,
        })
        .await;
    wait_members(&mut bob, &[mid(ANN, 1), mid(BOB, 7)]).await;
    server.shutdown().await;
}

/// A fast stream of broadcasts (a cursor at 1 kHz) reaches the other device
/// coalesced at the relay rate, the latest one last; bounds are refused
/// with their codes and the connection carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcasts_coalesce_and_bounds_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start_server(dir.path(), common::ACCOUNTS_SCHEMA).await;
    let url = common::url(&server);
    let mut ann = Peer::connect(&url, ANN).await;
    let mut bob = Peer::connect(&url, BOB).await;
    ann.join(1, "{}").await;
    bob.join(7, "{}").await;
    wait_members(&mut ann, &[mid(ANN, 1), mid(BOB, 7)]).await;

    let sent = 500;
    let started = Instant::now();
    for i in 0..sent {
        let msg = ClientMsg::Broadcast {
            room: ROOM.into(),
            tab: 1,
            message: format!("{{\"x\":{i}}}"),
        };
        ann.send(msg).await;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let last = format!("{{\"x\":{}}}", sent - 1);
    bob.until(|msg| matches!(msg, ServerMsg::Relay { message, .. } if *message == last))
        .await;
    let elapsed = started.elapsed();
    let got = bob.relayed.len();
    // 20 per second by default, plus the first and the last.
    let most = (elapsed.as_millis() as usize / 50) + 3;
    eprintln!("{sent} broadcasts in {elapsed:?} arrived as {got}");
    assert!(got <= most, "{got} relayed in {elapsed:?}");
    assert!(got >= 2, "{got} relayed");
    assert!(bob.relayed.iter().all(|(from, _)| *from == mid(ANN, 1)));
    assert!(ann.relayed.is_empty(), "a sender never hears itself");

    for (msg, code) in [
        (
            ClientMsg::Join {
                room: "x".repeat(129),
                tab: 1,
                state: "{}".into(),
            },
            "BAD_ROOM",
        ),
        (
            ClientMsg::Join {
                room: ROOM.into(),
                tab: 2,
                state: format!("\"{}\"", "y".repeat(4_000)),
            },
            "PRESENCE_TOO_LARGE",
        ),
        (
            ClientMsg::Broadcast {
                room: "elsewhere".into(),
                tab: 1,
                message: "1".into(),
            },
            "NOT_IN_ROOM",
        ),
    ] {
        ann.send(msg).await;
        let refused = ann
            .until(|m| matches!(m, ServerMsg::RoomRefused { .. }))
            .await;
        let ServerMsg::RoomRefused { code: got, .. } = refused else {
            unreachable!()
        };
        assert_eq!(got, code);
    }
    // 64 memberships per connection.
    for tab in 10..80u64 {
        let msg = ClientMsg::Join {
            room: format!("r{tab}"),
            tab,
            state: "{}".into(),
        };
        ann.send(msg).await;
    }
    ann.until(|m| matches!(m, ServerMsg::RoomRefused { code, .. } if code == "TOO_MANY_ROOMS"))
        .await;
    // Still connected and present.
    ann.join(1, r#"{"still":"here"}"#).await;
    bob.until(|msg| {
        matches!(msg, ServerMsg::Presence { members, .. }
            if members.iter().any(|m| m.state == r#"{"still":"here"}"#))
    })
    .await;
    server.shutdown().await;
}
