//! Rooms, presence and broadcast: the server's ephemeral lane, sans-io.
//!
//! A room is a name a device's tabs join (`ClientMsg::Join`); each member is
//! a (client id, tab) pair with a JSON presence state and the time it joined.
//! The server's [`Rooms`] registry is the one authority on who is present: it
//! takes the connections' room messages, their liveness and the passing of
//! time, and gives back the frames to send ([`Out`]) and the connections to
//! close. **Nothing here touches the log, the outbox or any database**: a
//! server restart forgets every room, and devices join again when they
//! reconnect.
//!
//! - Membership is keyed by (client id, tab), not by connection: a device
//!   that reconnects and joins again takes its members over from the old
//!   connection, so a reconnect never shows a member twice.
//! - A connection with members must be heard from (any frame; the browser
//!   worker sends `Heartbeat` every [`HEARTBEAT_INTERVAL_MS`]) within
//!   `member_timeout_ms`, or [`Rooms::tick`] drops all its members and asks
//!   the driver to close it (a device that died, a network that vanished
//!   without a FIN). A connection that ends ([`Rooms::gone`]) leaves at once.
//! - Presence goes out as diffs per room (`ServerMsg::Presence`): the
//!   members that joined or changed and the ones that left; a connection
//!   whose first tab joins a room gets the whole list (`full`).
//! - Broadcasts and presence updates are coalesced per sender, latest wins:
//!   a member's next one goes out no sooner than `1000 / relay_per_s` ms
//!   after its last, and meanwhile only the latest waits. A fast cursor
//!   stream costs one slot per member, never a queue.
//! - Every input is bounded: room name length, state and message size (and
//!   they must be JSON), memberships per connection, members per room. A
//!   refusal is `ServerMsg::RoomRefused` with a stable code, never a silent
//!   drop, and never ends the connection.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::protocol::{ClientMsg, Member, MemberId, ServerMsg};

/// A connection, as the driver numbers them.
pub type ConnId = u64;

/// How often the browser worker says `Heartbeat` while it is in a room.
pub const HEARTBEAT_INTERVAL_MS: u64 = 1_000;

/// A room name that is empty, too long or holds control characters.
pub const BAD_ROOM: &str = "BAD_ROOM";
/// A presence state over `state_bytes_max`.
pub const PRESENCE_TOO_LARGE: &str = "PRESENCE_TOO_LARGE";
/// A broadcast message over `message_bytes_max`.
pub const MESSAGE_TOO_LARGE: &str = "MESSAGE_TOO_LARGE";
/// A state or message that is not JSON.
pub const BAD_JSON: &str = "BAD_JSON";
/// A connection already in `rooms_per_connection_max` (room, tab) pairs.
pub const TOO_MANY_ROOMS: &str = "TOO_MANY_ROOMS";
/// A room already holding `members_per_room_max` members.
pub const ROOM_FULL: &str = "ROOM_FULL";
/// A broadcast from a tab that is not in the room.
pub const NOT_IN_ROOM: &str = "NOT_IN_ROOM";

/// The registry's bounds and timings.
#[derive(Clone, Debug)]
pub struct RoomsConfig {
    /// Longest room name, in bytes (`BAD_ROOM`).
    pub room_name_bytes_max: usize,
    /// Largest presence state, in bytes of JSON (`PRESENCE_TOO_LARGE`).
    pub state_bytes_max: usize,
    /// Largest broadcast message, in bytes of JSON (`MESSAGE_TOO_LARGE`).
    pub message_bytes_max: usize,
    /// Most (room, tab) memberships one connection holds (`TOO_MANY_ROOMS`).
    pub rooms_per_connection_max: usize,
    /// Most members in one room (`ROOM_FULL`).
    pub members_per_room_max: usize,
    /// Most broadcasts, and presence updates, relayed per member per second;
    /// faster ones are coalesced, the latest kept.
    pub relay_per_s: u32,
    /// A connection with members that says nothing for this long is gone.
    pub member_timeout_ms: u64,
}

impl Default for RoomsConfig {
    fn default() -> Self {
        RoomsConfig {
            room_name_bytes_max: 128,
            state_bytes_max: 2_048,
            message_bytes_max: 4_096,
            rooms_per_connection_max: 64,
            members_per_room_max: 256,
            relay_per_s: 20,
            member_timeout_ms: 4_000,
        }
    }
}

/// One message for several connections (encoded once by the driver).
#[derive(Clone, Debug, PartialEq)]
pub struct Out {
    pub to: Vec<ConnId>,
    pub msg: ServerMsg,
}

/// What a tick decided besides the frames.
#[derive(Debug, Default, PartialEq)]
pub struct Tick {
    pub out: Vec<Out>,
    /// Connections not heard from within `member_timeout_ms`: their members
    /// left; the driver closes them (the device reconnects and rejoins).
    pub expired: Vec<ConnId>,
}

/// Checks a room name: 1 to `max` bytes, no control characters.
pub fn check_room_name(room: &str, max: usize) -> Result<(), (&'static str, String)> {
    if room.is_empty() || room.len() > max || room.chars().any(char::is_control) {
        return Err((
            BAD_ROOM,
            format!(
                "a room name is 1 to {max} bytes without control characters; got {} bytes",
                room.len()
            ),
        ));
    }
    Ok(())
}

fn check_json(
    text: &str,
    max: usize,
    what: &str,
    too_large: &'static str,
) -> Result<(), (&'static str, String)> {
    if text.len() > max {
        return Err((
            too_large,
            format!("the {what} is {} bytes of JSON; at most {max}", text.len()),
        ));
    }
    if serde_json::from_str::<serde::de::IgnoredAny>(text).is_err() {
        return Err((BAD_JSON, format!("the {what} is not JSON")));
    }
    Ok(())
}

struct ConnState {
    client_id: u64,
    heard_ms: u64,
    /// (room, tab) pairs this connection owns a member for.
    joined: BTreeSet<(String, u64)>,
}

struct Slot {
    conn: ConnId,
    state: String,
    since_ms: u64,
    /// The state changed and the change has not gone out yet.
    state_waiting: bool,
    /// Earliest time the next presence update of this member goes out.
    state_due_ms: u64,
    /// The latest broadcast not yet relayed.
    message: Option<String>,
    /// Earliest time its next broadcast goes out.
    message_due_ms: u64,
}

#[derive(Default)]
struct Room {
    members: BTreeMap<MemberId, Slot>,
    /// Members whose state (or membership) goes out at the next flush.
    changed: BTreeSet<MemberId>,
    left: BTreeSet<MemberId>,
    /// Connections that get the whole list at the next flush.
    fresh: BTreeSet<ConnId>,
}

impl Room {
    fn conns(&self) -> BTreeSet<ConnId> {
        self.members.values().map(|s| s.conn).collect()
    }
}

/// The server's rooms: see the module doc.
pub struct Rooms {
    config: RoomsConfig,
    conns: HashMap<ConnId, ConnState>,
    rooms: HashMap<String, Room>,
    /// Rooms with something to send at the next flush.
    dirty: BTreeSet<String>,
    /// Members with a presence update or broadcast held back by the rate.
    waiting: BTreeSet<(String, MemberId)>,
}

impl Rooms {
    pub fn new(config: RoomsConfig) -> Rooms {
        assert!(config.relay_per_s > 0, "relay_per_s must be positive");
        assert!(
            config.member_timeout_ms > 0,
            "member_timeout_ms must be positive"
        );
        Rooms {
            config,
            conns: HashMap::new(),
            rooms: HashMap::new(),
            dirty: BTreeSet::new(),
            waiting: BTreeSet::new(),
        }
    }

    pub fn config(&self) -> &RoomsConfig {
        &self.config
    }

    fn interval_ms(&self) -> u64 {
        (1_000 / u64::from(self.config.relay_per_s)).max(1)
    }

    /// A connection past its Hello, as device `client_id`.
    pub fn connect(&mut self, conn: ConnId, client_id: u64, now_ms: u64) {
        self.conns.insert(
            conn,
            ConnState {
                client_id,
                heard_ms: now_ms,
                joined: BTreeSet::new(),
            },
        );
    }

    /// Something arrived from `conn`: it is alive.
    pub fn heard(&mut self, conn: ConnId, now_ms: u64) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.heard_ms = c.heard_ms.max(now_ms);
        }
    }

    /// How many members `conn` holds.
    pub fn memberships(&self, conn: ConnId) -> usize {
        self.conns.get(&conn).map_or(0, |c| c.joined.len())
    }

    /// The members of `room` (for tests and metrics).
    pub fn members(&self, room: &str) -> Vec<Member> {
        self.rooms.get(room).map_or_else(Vec::new, |r| {
            r.members.iter().map(|(id, s)| member(*id, s)).collect()
        })
    }

    /// Whether `msg` belongs to the ephemeral lane (and so to [`Rooms::on_message`]).
    pub fn handles(msg: &ClientMsg) -> bool {
        matches!(
            msg,
            ClientMsg::Join { .. }
                | ClientMsg::Leave { .. }
                | ClientMsg::Broadcast { .. }
                | ClientMsg::Heartbeat
        )
    }

    /// A room message from `conn` (see [`Rooms::handles`]); what to send now.
    pub fn on_message(&mut self, conn: ConnId, msg: ClientMsg, now_ms: u64) -> Vec<Out> {
        self.heard(conn, now_ms);
        let refused = match msg {
            ClientMsg::Join { room, tab, state } => self
                .join(conn, &room, tab, state, now_ms)
                .err()
                .map(|e| (room, tab, e)),
            ClientMsg::Leave { room, tab } => {
                self.leave(conn, &room, tab);
                None
            }
            ClientMsg::Broadcast { room, tab, message } => self
                .broadcast(conn, &room, tab, message, now_ms)
                .err()
                .map(|e| (room, tab, e)),
            _ => None,
        };
        let mut out = self.flush(now_ms);
        if let Some((room, tab, (code, reason))) = refused {
            out.push(Out {
                to: vec![conn],
                msg: ServerMsg::RoomRefused {
                    room,
                    tab,
                    code: code.into(),
                    reason,
                },
            });
        }
        out
    }

    fn join(
        &mut self,
        conn: ConnId,
        room: &str,
        tab: u64,
        state: String,
        now_ms: u64,
    ) -> Result<(), (&'static str, String)> {
        let config = &self.config;
        check_room_name(room, config.room_name_bytes_max)?;
        check_json(
            &state,
            config.state_bytes_max,
            "presence state",
            PRESENCE_TOO_LARGE,
        )?;
        let interval = self.interval_ms();
        let Some(c) = self.conns.get(&conn) else {
            return Err((BAD_ROOM, "Join before Hello".into()));
        };
        let id = MemberId {
            client_id: c.client_id,
            tab,
        };
        let key = (room.to_string(), tab);
        let owned = c.joined.contains(&key);
        if !owned && c.joined.len() >= config.rooms_per_connection_max {
            return Err((
                TOO_MANY_ROOMS,
                format!(
                    "a connection is in at most {} rooms (counting each tab)",
                    config.rooms_per_connection_max
                ),
            ));
        }
        let r = self.rooms.entry(room.to_string()).or_default();
        let existing = r.members.get(&id).map(|s| s.conn);
        if existing.is_none() && r.members.len() >= config.members_per_room_max {
            if r.members.is_empty() {
                self.rooms.remove(room);
            }
            return Err((
                ROOM_FULL,
                format!(
                    "room {room:?} already has {} members",
                    config.members_per_room_max
                ),
            ));
        }
        let first_of_conn = !r.members.values().any(|s| s.conn == conn);
        if first_of_conn {
            r.fresh.insert(conn);
        }
        match r.members.get_mut(&id) {
            Some(slot) => {
                // A rejoin (the device reconnected) takes the member over:
                // one member, never two.
                let old = slot.conn;
                slot.conn = conn;
                if slot.state != state {
                    slot.state = state;
                    slot.state_waiting = true;
                }
                if old != conn {
                    if let Some(oc) = self.conns.get_mut(&old) {
                        oc.joined.remove(&key);
                    }
                }
                if slot.state_waiting {
                    if now_ms >= slot.state_due_ms {
                        slot.state_waiting = false;
                        slot.state_due_ms = now_ms + interval;
                        r.changed.insert(id);
                        self.dirty.insert(room.to_string());
                    } else {
                        self.waiting.insert((room.to_string(), id));
                    }
                }
                if first_of_conn {
                    self.dirty.insert(room.to_string());
                }
            }
            None => {
                r.members.insert(
                    id,
                    Slot {
                        conn,
                        state,
                        since_ms: now_ms,
                        state_waiting: false,
                        state_due_ms: now_ms + interval,
                        message: None,
                        message_due_ms: now_ms,
                    },
                );
                r.left.remove(&id);
                r.changed.insert(id);
                self.dirty.insert(room.to_string());
            }
        }
        self.conns
            .get_mut(&conn)
            .expect("checked above")
            .joined
            .insert(key);
        Ok(())
    }

    /// Removes member (`room`, the connection's client, `tab`) if `conn` owns it.
    fn leave(&mut self, conn: ConnId, room: &str, tab: u64) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if !c.joined.remove(&(room.to_string(), tab)) {
            return;
        }
        let id = MemberId {
            client_id: c.client_id,
            tab,
        };
        self.remove_member(room, id);
    }

    fn remove_member(&mut self, room: &str, id: MemberId) {
        let Some(r) = self.rooms.get_mut(room) else {
            return;
        };
        if r.members.remove(&id).is_none() {
            return;
        }
        r.changed.remove(&id);
        r.left.insert(id);
        self.waiting.remove(&(room.to_string(), id));
        self.dirty.insert(room.to_string());
    }

    fn broadcast(
        &mut self,
        conn: ConnId,
        room: &str,
        tab: u64,
        message: String,
        now_ms: u64,
    ) -> Result<(), (&'static str, String)> {
        check_json(
            &message,
            self.config.message_bytes_max,
            "message",
            MESSAGE_TOO_LARGE,
        )?;
        let client_id = self.conns.get(&conn).map(|c| c.client_id);
        let slot = client_id.and_then(|client_id| {
            let id = MemberId { client_id, tab };
            let slot = self.rooms.get_mut(room)?.members.get_mut(&id)?;
            (slot.conn == conn).then_some((id, slot))
        });
        let Some((id, slot)) = slot else {
            return Err((
                NOT_IN_ROOM,
                format!("tab {tab} sent a message to room {room:?} without joining it"),
            ));
        };
        // Latest wins: a message not yet relayed is replaced.
        slot.message = Some(message);
        if now_ms >= slot.message_due_ms {
            self.dirty.insert(room.to_string());
        } else {
            self.waiting.insert((room.to_string(), id));
        }
        Ok(())
    }

    /// `conn` ended: its members leave now.
    pub fn gone(&mut self, conn: ConnId, now_ms: u64) -> Vec<Out> {
        let Some(c) = self.conns.remove(&conn) else {
            return Vec::new();
        };
        for (room, tab) in c.joined {
            self.remove_member(
                &room,
                MemberId {
                    client_id: c.client_id,
                    tab,
                },
            );
        }
        self.flush(now_ms)
    }

    /// Time passes: silent connections expire, held-back updates and
    /// broadcasts whose time came go out.
    pub fn tick(&mut self, now_ms: u64) -> Tick {
        let timeout = self.config.member_timeout_ms;
        let expired: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| !c.joined.is_empty() && now_ms.saturating_sub(c.heard_ms) > timeout)
            .map(|(id, _)| *id)
            .collect();
        for conn in &expired {
            if let Some(c) = self.conns.get_mut(conn) {
                for (room, tab) in std::mem::take(&mut c.joined) {
                    let id = MemberId {
                        client_id: c.client_id,
                        tab,
                    };
                    self.waiting.remove(&(room.clone(), id));
                    if let Some(r) = self.rooms.get_mut(&room) {
                        if r.members.remove(&id).is_some() {
                            r.changed.remove(&id);
                            r.left.insert(id);
                            self.dirty.insert(room);
                        }
                    }
                }
            }
        }
        let interval = self.interval_ms();
        let waiting = std::mem::take(&mut self.waiting);
        for (room, id) in waiting {
            let Some(slot) = self
                .rooms
                .get_mut(&room)
                .and_then(|r| r.members.get_mut(&id))
            else {
                continue;
            };
            let mut still = false;
            if slot.state_waiting {
                if now_ms >= slot.state_due_ms {
                    slot.state_waiting = false;
                    slot.state_due_ms = now_ms + interval;
                    self.rooms
                        .get_mut(&room)
                        .expect("looked up above")
                        .changed
                        .insert(id);
                    self.dirty.insert(room.clone());
                } else {
                    still = true;
                }
            }
            let slot = self
                .rooms
                .get_mut(&room)
                .and_then(|r| r.members.get_mut(&id))
                .expect("looked up above");
            if slot.message.is_some() {
                if now_ms >= slot.message_due_ms {
                    self.dirty.insert(room.clone());
                } else {
                    still = true;
                }
            }
            if still {
                self.waiting.insert((room, id));
            }
        }
        Tick {
            out: self.flush(now_ms),
            expired,
        }
    }

    /// Whether a tick could change anything before `member_timeout_ms` (for a
    /// driver that ticks only when needed).
    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.conns.values().all(|c| c.joined.is_empty())
    }

    /// The whole member list of every room `conn` is in (for a connection
    /// whose queue overflowed and missed diffs).
    pub fn full_lists(&self, conn: ConnId) -> Vec<Out> {
        let Some(c) = self.conns.get(&conn) else {
            return Vec::new();
        };
        let rooms: BTreeSet<&String> = c.joined.iter().map(|(room, _)| room).collect();
        rooms
            .into_iter()
            .filter_map(|room| {
                let r = self.rooms.get(room)?;
                Some(Out {
                    to: vec![conn],
                    msg: ServerMsg::Presence {
                        room: room.clone(),
                        full: true,
                        members: r.members.iter().map(|(id, s)| member(*id, s)).collect(),
                        left: Vec::new(),
                    },
                })
            })
            .collect()
    }

    /// Sends what the dirty rooms hold: diffs to the connections that had
    /// the list, whole lists to new ones, due broadcasts to every other
    /// member's connection.
    fn flush(&mut self, now_ms: u64) -> Vec<Out> {
        let interval = self.interval_ms();
        let mut out = Vec::new();
        for name in std::mem::take(&mut self.dirty) {
            let Some(r) = self.rooms.get_mut(&name) else {
                continue;
            };
            let conns = r.conns();
            let fresh = std::mem::take(&mut r.fresh);
            let changed = std::mem::take(&mut r.changed);
            let left: Vec<MemberId> = std::mem::take(&mut r.left).into_iter().collect();
            if !changed.is_empty() || !left.is_empty() {
                let to: Vec<ConnId> = conns.difference(&fresh).copied().collect();
                let members: Vec<Member> = changed
                    .iter()
                    .filter_map(|id| r.members.get(id).map(|s| member(*id, s)))
                    .collect();
                if !to.is_empty() {
                    out.push(Out {
                        to,
                        msg: ServerMsg::Presence {
                            room: name.clone(),
                            full: false,
                            members,
                            left,
                        },
                    });
                }
            }
            let fresh: Vec<ConnId> = fresh.intersection(&conns).copied().collect();
            if !fresh.is_empty() {
                out.push(Out {
                    to: fresh,
                    msg: ServerMsg::Presence {
                        room: name.clone(),
                        full: true,
                        members: r.members.iter().map(|(id, s)| member(*id, s)).collect(),
                        left: Vec::new(),
                    },
                });
            }
            let mut due = Vec::new();
            for (id, slot) in r.members.iter_mut() {
                if slot.message.is_some() && now_ms >= slot.message_due_ms {
                    slot.message_due_ms = now_ms + interval;
                    due.push((*id, slot.message.take().expect("checked")));
                }
            }
            for (id, message) in due {
                // Every member's connection but the sender's own member: a
                // connection with another tab in the room gets it (the
                // worker hands it to the other tabs only).
                let to: Vec<ConnId> = r
                    .members
                    .iter()
                    .filter(|(other, _)| **other != id)
                    .map(|(_, s)| s.conn)
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect();
                if !to.is_empty() {
                    out.push(Out {
                        to,
                        msg: ServerMsg::Relay {
                            room: name.clone(),
                            from: id,
                            message,
                        },
                    });
                }
            }
            if r.members.is_empty() {
                self.rooms.remove(&name);
            }
        }
        out
    }
}

fn member(id: MemberId, slot: &Slot) -> Member {
    Member {
        id,
        state: slot.state.clone(),
        since_ms: slot.since_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn join(room: &str, tab: u64, state: &str) -> ClientMsg {
        ClientMsg::Join {
            room: room.into(),
            tab,
            state: state.into(),
        }
    }

    fn send(room: &str, tab: u64, message: &str) -> ClientMsg {
        ClientMsg::Broadcast {
            room: room.into(),
            tab,
            message: message.into(),
        }
    }

    /// The member list connection `conn` would hold after `outs`, starting
    /// from `list`, applied as a device applies them.
    fn apply(list: &mut BTreeMap<MemberId, Member>, conn: ConnId, room: &str, outs: &[Out]) {
        for o in outs.iter().filter(|o| o.to.contains(&conn)) {
            if let ServerMsg::Presence {
                room: r,
                full,
                members,
                left,
            } = &o.msg
            {
                if r != room {
                    continue;
                }
                if *full {
                    list.clear();
                }
                for m in members {
                    list.insert(m.id, m.clone());
                }
                for id in left {
                    list.remove(id);
                }
            }
        }
    }

    fn ids(list: &BTreeMap<MemberId, Member>) -> Vec<(u64, u64)> {
        list.keys().map(|id| (id.client_id, id.tab)).collect()
    }

    fn refusal(outs: &[Out]) -> Option<String> {
        outs.iter().find_map(|o| match &o.msg {
            ServerMsg::RoomRefused { code, .. } => Some(code.clone()),
            _ => None,
        })
    }

    #[test]
    fn members_see_each_other_join_change_and_leave() {
        let mut rooms = Rooms::new(RoomsConfig::default());
        rooms.connect(1, 100, 0);
        rooms.connect(2, 200, 0);
        let (mut a, mut b) = (BTreeMap::new(), BTreeMap::new());
        let out = rooms.on_message(1, join("doc", 7, r#"{"name":"ann"}"#), 10);
        apply(&mut a, 1, "doc", &out);
        assert_eq!(ids(&a), vec![(100, 7)]);
        let out = rooms.on_message(2, join("doc", 3, r#"{"name":"bob"}"#), 20);
        apply(&mut a, 1, "doc", &out);
        apply(&mut b, 2, "doc", &out);
        assert_eq!(ids(&a), vec![(100, 7), (200, 3)]);
        assert_eq!(ids(&b), ids(&a));
        assert_eq!(
            b[&MemberId {
                client_id: 100,
                tab: 7
            }]
                .since_ms,
            10
        );
        // Bob's new state goes out once the rate allows.
        let out = rooms.on_message(2, join("doc", 3, r#"{"name":"bobby"}"#), 30);
        assert!(out.is_empty(), "held back by the rate: {out:?}");
        let out = rooms.tick(80).out;
        apply(&mut a, 1, "doc", &out);
        assert_eq!(
            a[&MemberId {
                client_id: 200,
                tab: 3
            }]
                .state,
            r#"{"name":"bobby"}"#
        );
        let out = rooms.on_message(
            2,
            ClientMsg::Leave {
                room: "doc".into(),
                tab: 3,
            },
            90,
        );
        apply(&mut a, 1, "doc", &out);
        assert_eq!(ids(&a), vec![(100, 7)]);
        assert!(
            out.iter().all(|o| !o.to.contains(&2)),
            "the leaver hears nothing more"
        );
        let out = rooms.gone(1, 100);
        assert!(out.is_empty());
        assert!(rooms.members("doc").is_empty());
        assert!(rooms.rooms.is_empty(), "an empty room is forgotten");
    }

    #[test]
    fn a_connection_that_ends_leaves_at_once() {
        let mut rooms = Rooms::new(RoomsConfig::default());
        rooms.connect(1, 100, 0);
        rooms.connect(2, 200, 0);
        rooms.on_message(1, join("doc", 1, "{}"), 0);
        rooms.on_message(1, join("doc", 2, "{}"), 0);
        rooms.on_message(1, join("other", 1, "{}"), 0);
        let mut b = BTreeMap::new();
        let out = rooms.on_message(2, join("doc", 1, "{}"), 0);
        apply(&mut b, 2, "doc", &out);
        assert_eq!(ids(&b), vec![(100, 1), (100, 2), (200, 1)]);
        let out = rooms.gone(1, 5);
        apply(&mut b, 2, "doc", &out);
        assert_eq!(ids(&b), vec![(200, 1)]);
        assert!(rooms.members("other").is_empty());
    }

    #[test]
    fn a_silent_connection_expires_and_a_heard_one_stays() {
        let config = RoomsConfig::default();
        let timeout = config.member_timeout_ms;
        let mut rooms = Rooms::new(config);
        rooms.connect(1, 100, 0);
        rooms.connect(2, 200, 0);
        rooms.connect(3, 300, 0);
        rooms.on_message(1, join("doc", 1, "{}"), 0);
        let mut b = BTreeMap::new();
        let out = rooms.on_message(2, join("doc", 1, "{}"), 0);
        apply(&mut b, 2, "doc", &out);
        let mut t = 0;
        while t <= timeout + 1 {
            t += HEARTBEAT_INTERVAL_MS;
            rooms.on_message(2, ClientMsg::Heartbeat, t);
            let tick = rooms.tick(t);
            apply(&mut b, 2, "doc", &tick.out);
            if t <= timeout {
                assert!(tick.expired.is_empty());
            }
        }
        let tick = rooms.tick(timeout + 1);
        apply(&mut b, 2, "doc", &tick.out);
        assert_eq!(ids(&b), vec![(200, 1)], "connection 1 is gone");
        assert_eq!(rooms.memberships(1), 0);
        // A connection in no room is never expired: it has nothing to lose.
        assert!(!rooms.tick(10 * timeout).expired.contains(&3));
    }

    #[test]
    fn a_reconnect_takes_its_members_over_without_duplicates() {
        let mut rooms = Rooms::new(RoomsConfig::default());
        rooms.connect(1, 100, 0);
        rooms.connect(2, 200, 0);
        let mut b = BTreeMap::new();
        apply(
            &mut b,
            2,
            "doc",
            &rooms.on_message(2, join("doc", 1, "{}"), 0),
        );
        apply(
            &mut b,
            2,
            "doc",
            &rooms.on_message(1, join("doc", 5, r#"{"n":1}"#), 0),
        );
        // Device 100 reconnects before its old connection is noticed gone.
        rooms.connect(3, 100, 10);
        let out = rooms.on_message(3, join("doc", 5, r#"{"n":1}"#), 10);
        let mut a = BTreeMap::new();
        apply(&mut a, 3, "doc", &out);
        apply(&mut b, 2, "doc", &out);
        assert_eq!(ids(&a), vec![(100, 5), (200, 1)]);
        assert_eq!(ids(&b), vec![(100, 5), (200, 1)]);
        assert_eq!(rooms.members("doc").len(), 2);
        // The old connection's end does not take the member with it.
        let out = rooms.gone(1, 20);
        apply(&mut b, 2, "doc", &out);
        assert_eq!(ids(&b), vec![(100, 5), (200, 1)]);
        assert_eq!(rooms.memberships(3), 1);
        // Joining twice on one connection is one member too.
        rooms.on_message(3, join("doc", 5, r#"{"n":2}"#), 200);
        assert_eq!(rooms.members("doc").len(), 2);
    }

    #[test]
    fn bounds_are_refused_with_their_codes() {
        let config = RoomsConfig {
            rooms_per_connection_max: 2,
            members_per_room_max: 2,
            ..RoomsConfig::default()
        };
        let mut rooms = Rooms::new(config.clone());
        rooms.connect(1, 100, 0);
        rooms.connect(2, 200, 0);
        let long = "x".repeat(config.room_name_bytes_max + 1);
        let big = format!("\"{}\"", "y".repeat(config.state_bytes_max));
        for (msg, code) in [
            (join("", 1, "{}"), BAD_ROOM),
            (join(&long, 1, "{}"), BAD_ROOM),
            (join("a\nb", 1, "{}"), BAD_ROOM),
            (join("doc", 1, &big), PRESENCE_TOO_LARGE),
            (join("doc", 1, "{not json"), BAD_JSON),
            (send("doc", 1, "{}"), NOT_IN_ROOM),
        ] {
            let out = rooms.on_message(1, msg.clone(), 0);
            assert_eq!(refusal(&out).as_deref(), Some(code), "{msg:?}");
        }
        assert_eq!(rooms.memberships(1), 0);
        assert!(refusal(&rooms.on_message(1, join("a", 1, "{}"), 0)).is_none());
        assert!(refusal(&rooms.on_message(1, join("a", 2, "{}"), 0)).is_none());
        // Setting the state of a member it has is not a new room.
        assert!(refusal(&rooms.on_message(1, join("a", 2, "[]"), 0)).is_none());
        let out = rooms.on_message(1, join("b", 1, "{}"), 0);
        assert_eq!(refusal(&out).as_deref(), Some(TOO_MANY_ROOMS));
        let out = rooms.on_message(2, join("a", 1, "{}"), 0);
        assert_eq!(refusal(&out).as_deref(), Some(ROOM_FULL));
        let huge = format!("\"{}\"", "z".repeat(config.message_bytes_max));
        let out = rooms.on_message(1, send("a", 1, &huge), 0);
        assert_eq!(refusal(&out).as_deref(), Some(MESSAGE_TOO_LARGE));
        // A refusal goes to the sender only, and the members are as they were.
        assert!(out.iter().all(|o| o.to == vec![1]));
        assert_eq!(rooms.members("a").len(), 2);
    }

    #[test]
    fn broadcasts_coalesce_latest_wins_at_the_rate() {
        let config = RoomsConfig::default();
        let interval = 1_000 / u64::from(config.relay_per_s);
        let mut rooms = Rooms::new(config);
        rooms.connect(1, 100, 0);
        rooms.connect(2, 200, 0);
        rooms.on_message(1, join("doc", 1, "{}"), 0);
        rooms.on_message(1, join("doc", 2, "{}"), 0);
        rooms.on_message(2, join("doc", 1, "{}"), 0);
        let mut relayed = Vec::new();
        let mut keep = |outs: Vec<Out>| {
            for o in outs {
                if let ServerMsg::Relay { from, message, .. } = o.msg {
                    relayed.push((from, message, o.to));
                }
            }
        };
        // A cursor at 1 kHz for one second: one message per millisecond.
        for t in 0..1_000u64 {
            keep(rooms.on_message(1, send("doc", 1, &t.to_string()), t));
            keep(rooms.tick(t).out);
        }
        keep(rooms.tick(1_000 + interval).out);
        let n = relayed.len() as u64;
        assert!(
            (1_000 / interval..=1_000 / interval + 2).contains(&n),
            "{n} relayed for one second at {interval} ms"
        );
        // Latest wins: the last one sent is the last one relayed.
        assert_eq!(relayed.last().unwrap().1, "999");
        // To the other device and to this device's other tab, never back.
        for (from, _, to) in &relayed {
            assert_eq!(
                *from,
                MemberId {
                    client_id: 100,
                    tab: 1
                }
            );
            assert_eq!(to, &vec![1, 2]);
        }
        // Nothing waits once it is all out.
        assert!(rooms.waiting.is_empty());
    }

    #[test]
    fn a_member_alone_in_a_room_relays_to_nobody() {
        let mut rooms = Rooms::new(RoomsConfig::default());
        rooms.connect(1, 100, 0);
        rooms.on_message(1, join("doc", 1, "{}"), 0);
        let out = rooms.on_message(1, send("doc", 1, "1"), 0);
        assert!(out
            .iter()
            .all(|o| !matches!(o.msg, ServerMsg::Relay { .. })));
    }
}
