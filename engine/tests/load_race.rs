//! A resumed initial load against the fan-out's flags, driven step by step
//! in the order the server's connection task can take them (sans-io: the
//! store, the links, the fan-out and the devices in one thread).

use std::collections::BTreeMap;
use std::sync::Arc;

use hearth_engine::fanout::{Concerned, Fanout, Heard};
use hearth_engine::filter::Param;
use hearth_engine::link::{Link, LinkConfig};
use hearth_engine::protocol::ServerMsg;
use hearth_engine::{Client, LogEntry, ServerCore, Value};

mod common;

const TABLES: &str = r#"
[tables.todos]
create = "CREATE TABLE todos (id TEXT PRIMARY KEY, list_id TEXT NOT NULL, title TEXT NOT NULL DEFAULT '')"
merge = "lww"

[streams.list_todos]
table = "todos"
where = "list_id = :list"
"#;

/// The server's side of one connection of the loading device, as
/// `server/src/connection.rs` drives it: its link, its registration in the
/// fan-out, the flags published for it and not yet taken (its mailbox), and
/// what it has heard of them.
struct Conn {
    id: u32,
    link: Link,
    mailbox: Vec<(u64, u64)>,
    heard: Heard,
    /// How far the connection knows the log reaches.
    known_head: u64,
}

impl Conn {
    /// A connection of `device`: Hello, registration in the fan-out (with
    /// the Hello's subscriptions) and Welcome, delivered.
    fn open(
        id: u32,
        server: &ServerCore,
        fanout: &mut Fanout<u32>,
        device: &mut Client,
        config: LinkConfig,
    ) -> Conn {
        let mut link = Link::new(Arc::new(server.schema().clone()), config);
        let mut hello = device.on_connected();
        assert_eq!(hello.len(), 1);
        let hello = link.on_hello(hello.remove(0)).unwrap();
        let head = server.head();
        fanout.connect(id, hello.client_id);
        for event in link.take_sub_events() {
            if let hearth_engine::link::SubEvent::Taken(sub) = event {
                fanout.subscribe(id, &sub);
            }
        }
        let mut heard = Heard::joined(head);
        heard.subscribed(head);
        let welcome = server.greet(&hello, 1 << 20).unwrap();
        let msgs = link.on_welcome(welcome, head);
        deliver(device, msgs);
        Conn {
            id,
            link,
            mailbox: Vec::new(),
            heard,
            known_head: head,
        }
    }

    /// Reads the next chunk of the load and gives it to the link (sent now
    /// if the cursor is at its position, otherwise due later).
    fn read_chunk(&mut self, server: &ServerCore, device: &mut Client) -> bool {
        let Some(read) = self.link.next_read() else {
            return false;
        };
        let chunk =
            hearth_engine::server::read_load(server.connection(), server.schema(), &read).unwrap();
        let msgs = self.link.on_read(chunk);
        deliver(device, msgs);
        true
    }

    /// The mailbox wakes: the published head, then the flags.
    fn take_flags(&mut self, head: u64) {
        self.known_head = self.known_head.max(head);
        let taken = std::mem::take(&mut self.mailbox);
        self.heard.flagged(head, taken, 0);
    }

    /// One turn of sending entries: passed over when the fan-out said
    /// nothing up to them concerns this connection, otherwise read from the
    /// log and routed by the link.
    fn send_entries(&mut self, server: &ServerCore, device: &mut Client) -> bool {
        if !self.link.wants_entries(self.known_head) {
            return false;
        }
        let msgs = match self.heard.passable(self.link.cursor(), self.known_head) {
            Some(to) => self.link.skip_to(to, server.max_hlc(), self.known_head),
            None => {
                let entries =
                    ServerCore::read_log(server.connection(), self.link.cursor(), 1_000).unwrap();
                self.link.on_entries(&entries, self.known_head)
            }
        };
        deliver(device, msgs);
        true
    }
}

fn deliver(device: &mut Client, msgs: Vec<ServerMsg>) {
    for msg in msgs {
        let out = device.handle(msg, 0).unwrap();
        assert!(out.send.is_empty(), "the device has nothing to push");
    }
}

/// The store publishes the entries after `after`: the fan-out flags the
/// connections they concern, in their mailboxes (taken later).
fn publish(server: &ServerCore, fanout: &Fanout<u32>, conns: &mut [&mut Conn], after: u64) {
    let entries: Vec<LogEntry> = ServerCore::read_log(server.connection(), after, 1_000).unwrap();
    for entry in &entries {
        for conn in conns.iter_mut() {
            let flagged = match fanout.concerned(entry) {
                Concerned::Everyone => true,
                Concerned::Only(ids) => ids.contains(&conn.id),
            };
            if flagged {
                conn.mailbox.push((entry.server_seq, entry.server_seq));
            }
        }
    }
}

fn list_a() -> BTreeMap<String, Param> {
    BTreeMap::from([("list".to_string(), Param::One(Value::Text("a".into())))])
}

/// Guards the data-loss race of `interrupted_initial_load_resumes_under_
/// concurrent_writes` (tests/subscriptions.rs): a device resumes its load of
/// list "a" after key `t08`; another device inserts `t02b` into the list
/// (a key the load has passed), and the store commits and publishes it with
/// a flag for the loading connection that the connection has not taken yet.
/// The next chunk is read at that entry's position, so the connection learns
/// of a later head than its flags cover. The entry must still reach the
/// device through the link: passing over it (as if the fan-out had said it
/// concerns nothing here) loses `t02b` for good, since the chunk starts
/// after `t08` and the live stream never sent it. The server's connection
/// task did exactly that when a chunk came back ahead of the head it knew.
#[test]
fn a_row_written_below_a_resumed_load_is_not_passed_over_by_a_chunk_read_ahead_of_the_flags() {
    let mut net = common::Net::new(TABLES);
    let mut writer = net.device();
    let values: Vec<String> = (1..=12)
        .map(|i| format!("('t{i:02}', 'a', 'todo {i}')"))
        .collect();
    writer
        .exec(
            &format!(
                "INSERT INTO todos (id, list_id, title) VALUES {}",
                values.join(", ")
            ),
            &[],
            1_000,
        )
        .unwrap();
    net.sync(&mut writer);

    let mut device = net.device();
    device.subscribe("list_todos", list_a()).unwrap();
    let config = LinkConfig {
        load_rows_max: 4,
        ..LinkConfig::default()
    };
    let mut fanout: Fanout<u32> = Fanout::new(Arc::new(net.server.schema().clone()));

    // First connection: one chunk (t01..t04), then it is cut.
    let mut conn = Conn::open(1, &net.server, &mut fanout, &mut device, config.clone());
    assert!(conn.read_chunk(&net.server, &mut device));
    fanout.disconnect(&1);
    device.on_disconnected();

    // Second connection: the load resumes after t04, goes on to t08.
    let mut conn = Conn::open(2, &net.server, &mut fanout, &mut device, config);
    assert!(conn.read_chunk(&net.server, &mut device));
    let ids = |device: &Client| -> Vec<Value> {
        common::rows(device, "SELECT id FROM todos ORDER BY id")
            .into_iter()
            .map(|mut r| r.remove(0))
            .collect()
    };
    assert_eq!(ids(&device).len(), 8, "two chunks of four");

    // The other device inserts t02b, below the load's position; the store
    // commits and publishes it, flagging the loading connection.
    let before = net.server.head();
    writer
        .exec(
            "INSERT INTO todos (id, list_id, title) VALUES ('t02b', 'a', 'between')",
            &[],
            2_000,
        )
        .unwrap();
    net.sync(&mut writer);
    publish(&net.server, &fanout, &mut [&mut conn], before);
    assert_eq!(conn.mailbox.len(), 1, "the insert concerns the device");

    // The next chunk is read at the insert's position, before the
    // connection took its flags; it learns the head from the chunk.
    assert!(conn.read_chunk(&net.server, &mut device));
    assert_eq!(conn.link.due_at(), Some(net.server.head()));
    conn.known_head = net.server.head();
    while conn.send_entries(&net.server, &mut device) {}
    // The flags come in afterwards; the load goes on to the end.
    conn.take_flags(net.server.head());
    loop {
        let read = conn.read_chunk(&net.server, &mut device);
        let sent = conn.send_entries(&net.server, &mut device);
        if !read && !sent {
            break;
        }
    }
    assert!(device.loads_done().unwrap());

    let expected: Vec<Value> = net
        .server_rows("SELECT id FROM todos WHERE list_id = 'a' ORDER BY id")
        .into_iter()
        .map(|mut r| r.remove(0))
        .collect();
    assert!(expected.contains(&Value::Text("t02b".into())));
    assert_eq!(
        ids(&device),
        expected,
        "the device holds exactly the server's list"
    );
}
