//! The sync state machine: the session with the server, pushes, and what
//! arrives (log entries, acks, refusals, a rewound device's new identity).

use super::*;

impl Client {
    /// The connection to the server is up: what to say first.
    pub fn on_connected(&mut self) -> Vec<ClientMsg> {
        self.session = Session::AwaitingWelcome;
        self.rewind = Rewind::default();
        self.leaving_orphans = self.leaving_ids().unwrap_or_default();
        // Subscriptions unreadable here (a newer format) are left out rather
        // than failing the connection; the server sends nothing for them.
        let subscriptions = self
            .load_subscriptions()
            .map(|subs| subs.into_iter().map(|(s, _)| s).collect())
            .unwrap_or_default();
        vec![ClientMsg::Hello {
            client_id: self.client_id,
            cursor: self.cursor,
            schema_version: self.schema.as_ref().map(|s| s.version),
            subscriptions,
            token: self.token.clone(),
            reloaded: self.reloaded().unwrap_or_default(),
            first_pending: self.outbox_seqs.first().copied().unwrap_or(0),
        }]
    }

    /// The token the next Hello carries (None for a server without
    /// `[auth]`). A device's database belongs to one user: a token whose
    /// `sub` differs from the user this database first synced as is
    /// refused here ([`ClientError::UserChanged`], `AUTH_USER_CHANGED`);
    /// the app wipes the database to change users. The token is not
    /// verified here (the server does that); its `sub` is only read.
    pub fn set_token(&mut self, token: Option<String>) -> Result<()> {
        if let Some(sub) = token.as_deref().and_then(token_subject) {
            if let Some(stored) = meta_get::<String>(&self.conn, "user")? {
                if stored != sub {
                    return Err(ClientError::UserChanged { stored, token: sub });
                }
            }
        }
        self.token = token;
        Ok(())
    }

    /// Wipes this device's database (every table, Hearth's and the app's:
    /// pending writes included) and opens it anew under `new_client_id`:
    /// what an app does to sign in as another user on a device (see
    /// [`Client::set_token`]).
    pub fn reset(self, new_client_id: u64) -> Result<Client> {
        let Client { conn, config, .. } = self;
        let objects: Vec<(String, String)> = conn
            .prepare(
                "SELECT type, name FROM main.sqlite_schema WHERE type IN ('table', 'view') AND name NOT LIKE 'sqlite_%'",
            )?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        conn.execute_batch("PRAGMA foreign_keys = OFF")?;
        for (kind, name) in objects {
            let kind = if kind == "view" { "VIEW" } else { "TABLE" };
            conn.execute_batch(&format!(
                "DROP {kind} IF EXISTS main.{}",
                crate::schema::ident(&name)
            ))?;
        }
        Client::open(conn, new_client_id, config)
    }

    /// The token the next Hello carries.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// The user this device's database belongs to (the `sub` of the first
    /// token a server accepted from it), if any.
    pub fn user(&self) -> Result<Option<String>> {
        Ok(meta_get::<String>(&self.conn, "user")?)
    }

    /// The connection is gone. Everything unanswered will be sent again.
    ///
    /// Unsubscribes still awaiting the server's answer complete here (no
    /// entry of the old connection comes any more): the returned output
    /// carries their evictions' events. Should they fail, the next Welcome
    /// completes them.
    pub fn on_disconnected(&mut self) -> Output {
        self.session = Session::Offline;
        let mut out = Output::default();
        let _ = self.finish_leaving(None, &mut out);
        out
    }

    /// Pending mutations not yet sent on this connection, in order, within
    /// the in-flight window, in frames that fit the server's frame limit.
    ///
    /// A mutation too large for one frame of this server (its `Welcome` says
    /// how large a frame it takes) could never be delivered: it is refused
    /// here, undone like a refusal from the server, and reported as
    /// [`Event::Rejected`] with code `TOO_LARGE`.
    pub fn poll_send(&mut self) -> Result<Output> {
        let mut out = Output::default();
        let oversized = self.poll_send_into(&mut out.send)?;
        for (seq, size) in oversized {
            let reason = format!(
                "the mutation takes {size} bytes, more than one frame of this server carries ({} bytes): split the transaction",
                self.server_frame_bytes_max
            );
            self.apply_rejection(seq, "TOO_LARGE", &reason, &mut out)?;
        }
        if !out.events.is_empty() {
            let more = self.poll_send_into(&mut out.send)?;
            debug_assert!(more.is_empty(), "oversized mutations were refused");
        }
        Ok(out)
    }

    /// Room a push frame leaves for mutations: its header and framing.
    const PUSH_FRAME_OVERHEAD_BYTES: usize = 64;

    /// Appends push frames to `send`; returns the (sequence number, size) of
    /// mutations too large to send.
    pub(super) fn poll_send_into(
        &mut self,
        send: &mut Vec<ClientMsg>,
    ) -> Result<Vec<(u64, usize)>> {
        let Session::Ready {
            sent_upto,
            caught_up,
        } = self.session
        else {
            return Ok(Vec::new());
        };
        if self.rewind.suspected {
            return Ok(Vec::new()); // Until caught up, see `Rewind`.
        }
        let frame_room = self
            .server_frame_bytes_max
            .saturating_sub(Self::PUSH_FRAME_OVERHEAD_BYTES);
        let batch_max = self.config.push_bytes_max.min(frame_room);
        let mut oversized = Vec::new();
        let in_flight = self.outbox_seqs.range(..=sent_upto).count();
        debug_assert_eq!(
            in_flight as i64,
            self.conn.query_row(
                "SELECT count(*) FROM _hearth_outbox WHERE seq <= ?1",
                [to_i64(sent_upto)],
                |r| r.get::<_, i64>(0),
            )?
        );
        let room = self.config.in_flight_max.saturating_sub(in_flight);
        if room == 0 {
            return Ok(oversized);
        }
        let mut stmt = self.conn.prepare_cached(
            "SELECT seq, mutation, format FROM _hearth_outbox WHERE seq > ?1 ORDER BY seq",
        )?;
        // No `LIMIT ?`: SQLite re-prepares a statement whenever a bound
        // LIMIT changes; the loop stops after `room` rows instead.
        let mut rows = stmt.query(params![to_i64(sent_upto)])?;
        let mut taken = 0;
        let mut frames = Vec::new();
        let mut batch = Vec::new();
        let mut batch_bytes = 0;
        let mut last = sent_upto;
        while taken < room {
            let Some(row) = rows.next()? else { break };
            taken += 1;
            let seq: i64 = row.get(0)?;
            let stored: Vec<u8> = row.get(1)?;
            let format: i64 = row.get(2)?;
            let mutation = Mutation::decode(&stored, format).map_err(|e| {
                ClientError::Protocol(format!("outbox entry {seq} is unreadable: {e}"))
            })?;
            // What goes on the wire is today's encoding.
            let blob = if format == MUTATION_FORMAT {
                stored
            } else {
                mutation.encode()
            };
            if blob.len() > frame_room {
                oversized.push((seq as u64, blob.len()));
                last = seq as u64;
                continue;
            }
            if !batch.is_empty() && batch_bytes + blob.len() > batch_max {
                frames.push(ClientMsg::Push {
                    mutations: std::mem::take(&mut batch),
                });
                batch_bytes = 0;
            }
            batch_bytes += blob.len();
            batch.push(mutation);
            last = seq as u64;
        }
        if !batch.is_empty() {
            frames.push(ClientMsg::Push { mutations: batch });
        }
        drop(rows);
        drop(stmt);
        if last > sent_upto {
            // From here on the server may have them (`PendingWrite::sent`).
            self.conn
                .prepare_cached(
                    "UPDATE _hearth_outbox SET attempts = attempts + 1 WHERE seq > ?1 AND seq <= ?2",
                )?
                .execute(params![to_i64(sent_upto), to_i64(last)])?;
        }
        self.session = Session::Ready {
            sent_upto: last,
            caught_up,
        };
        send.extend(frames);
        Ok(oversized)
    }

    /// Handles one message from the server.
    pub fn handle(&mut self, msg: ServerMsg, now_ms: u64) -> Result<Output> {
        self.assert_idle("handle");
        let result = self.handle_message(msg, now_ms);
        self.assert_idle("handle");
        result
    }

    pub(super) fn handle_message(&mut self, msg: ServerMsg, now_ms: u64) -> Result<Output> {
        let mut out = Output::default();
        match msg {
            ServerMsg::Welcome {
                server_seq,
                floor,
                schema_version,
                schema,
                frame_bytes_max,
                last_seq,
                hlc,
            } => {
                self.clock.observe(hlc);
                self.server_frame_bytes_max =
                    usize::try_from(frame_bytes_max).unwrap_or(usize::MAX);
                // The server has processed a number this device still holds
                // pending (a lost ack, or a lost history) or would use next
                // (a lost history): catch up before sending anything.
                let first_unacked: Option<i64> =
                    self.conn
                        .query_row("SELECT min(seq) FROM _hearth_outbox", [], |r| r.get(0))?;
                let first_unacked = first_unacked.map_or(self.next_seq, |s| s as u64);
                self.rewind = Rewind {
                    suspected: first_unacked <= last_seq,
                    confirmed: false,
                    server_last_seq: last_seq,
                    first_reused: None,
                };
                if self.session != Session::AwaitingWelcome {
                    return Err(ClientError::Protocol(
                        "Welcome outside the handshake".into(),
                    ));
                }
                if self.cursor > server_seq {
                    return Err(ClientError::SchemaMismatch(format!(
                        "this device has seen server sequence {} but the server's head is {server_seq}: \
                         it is a different server, or the server lost data",
                        self.cursor
                    )));
                }
                if let Some(own) = self.schema.as_ref().map(|s| s.version) {
                    if schema_version < own {
                        return Err(schema_ahead(own, schema_version));
                    }
                }
                match schema {
                    Some(source) => {
                        let schema = Schema::parse(&source)?;
                        if schema.version != schema_version {
                            return Err(ClientError::Protocol(
                                "Welcome's schema version disagrees with its schema".into(),
                            ));
                        }
                        if self.schema.as_ref() != Some(&schema) {
                            self.install_schema(schema)?;
                            out.events.push(Event::SchemaInstalled {
                                version: schema_version,
                            });
                        }
                    }
                    None if self.schema.is_none() => {
                        return Err(ClientError::Protocol(
                            "server sent no schema to a device without one".into(),
                        ));
                    }
                    None => {}
                }
                if floor > self.cursor {
                    self.reload_after_compaction(floor, &mut out)?;
                }
                // Unsubscribes whose answer an earlier connection never
                // brought: this one's Hello left them out. (One made since
                // the Hello is answered on this connection.)
                for id in std::mem::take(&mut self.leaving_orphans) {
                    self.finish_leaving(Some(id), &mut out)?;
                }
                self.sweep_stale(&mut out)?;
                // The server took the token: the database is this user's.
                if let Some(sub) = self.token.as_deref().and_then(token_subject) {
                    if meta_get::<String>(&self.conn, "user")?.is_none() {
                        meta_set(&self.conn, "user", sub)?;
                    }
                }
                self.session = Session::Ready {
                    sent_upto: 0,
                    caught_up: false,
                };
            }
            ServerMsg::Changes {
                entries,
                cursor,
                hlc,
                caught_up,
            } => {
                let Session::Ready { sent_upto, .. } = self.session else {
                    return Err(ClientError::Protocol("Changes before Welcome".into()));
                };
                self.apply_entries(&entries, &mut out)?;
                if cursor > self.cursor || hlc > self.clock.last() {
                    // Entries that held nothing for this device's
                    // subscriptions were passed over: the cursor moves past
                    // them and the clock past their stamps.
                    self.cursor = self.cursor.max(cursor);
                    self.clock.observe(hlc);
                    meta_set(&self.conn, "cursor", to_i64(self.cursor))?;
                    meta_set(&self.conn, "hlc", to_i64(self.clock.last().0))?;
                }
                self.session = Session::Ready {
                    sent_upto,
                    caught_up,
                };
                if caught_up && self.rewind.suspected {
                    // Every ack the server had for this device is in: what
                    // is still pending under a taken number is not the
                    // server's.
                    if self.rewind.confirmed {
                        let reason =
                            "the server holds other mutations under numbers this device reused";
                        out.events.push(self.rewind(now_ms, reason.into())?);
                        return Ok(out);
                    }
                    // No reused number turned up: numbers from here on
                    // start past the server's; pending ones it may have
                    // refused are sent and answered from its record.
                    self.skip_seqs_to(self.rewind.server_last_seq + 1)?;
                    self.rewind = Rewind::default();
                }
                if caught_up {
                    out.events.push(Event::CaughtUp {
                        server_seq: self.cursor,
                    });
                }
            }
            ServerMsg::Rejected {
                client_seq,
                code,
                reason,
            } => {
                self.apply_rejection(client_seq, &code, &reason, &mut out)?;
            }
            ServerMsg::Acked {
                client_seq,
                server_seq,
                digest,
            } => {
                self.apply_compacted_ack(client_seq, server_seq, digest, &mut out)?;
            }
            ServerMsg::Rows {
                id,
                cursor,
                hlc,
                rows,
                last,
                done,
            } => {
                if !matches!(self.session, Session::Ready { .. }) {
                    return Err(ClientError::Protocol("Rows before Welcome".into()));
                }
                self.clock.observe(hlc);
                self.on_rows(id, cursor, rows, last, done, &mut out)?;
            }
            ServerMsg::Reload {
                cursor,
                tables,
                access,
            } => {
                if !matches!(self.session, Session::Ready { .. }) {
                    return Err(ClientError::Protocol("Reload before Welcome".into()));
                }
                if cursor != self.cursor {
                    return Err(ClientError::Protocol(format!(
                        "a Reload at {cursor} reached a device at {}",
                        self.cursor
                    )));
                }
                // The re-load first, then the record of it: a crash between
                // the two re-loads again, never loses one.
                self.reload_tables(&tables, &mut out)?;
                self.set_reloaded(crate::protocol::Reloaded { cursor, access })?;
            }
            ServerMsg::Unsubscribed { id } => {
                self.finish_leaving(Some(id), &mut out)?;
            }
            ServerMsg::SubscriptionRefused { id, code, reason } => {
                self.subscription_refused(id, code, reason, &mut out)?;
            }
            ServerMsg::Error { code, message } if code == crate::server::DEVICE_REWOUND => {
                out.events.push(self.rewind(now_ms, message)?);
                return Ok(out);
            }
            ServerMsg::Error { code, message } if code == crate::server::SCHEMA_AHEAD => {
                return Err(ClientError::SchemaAhead(message))
            }
            ServerMsg::Error { code, message } => {
                return Err(ClientError::Server { code, message })
            }
            // The ephemeral lane is the driver's (the browser worker keeps
            // its tabs' rooms); the database never hears of it.
            ServerMsg::Presence { .. }
            | ServerMsg::Relay { .. }
            | ServerMsg::RoomRefused { .. } => {
                return Ok(out);
            }
        }
        let sent = self.poll_send()?;
        out.send = sent.send;
        out.events.extend(sent.events);
        Ok(out)
    }

    /// Numbers the next mutation at least `next` (the numbers before it are
    /// the server's, from a history this device lost).
    pub(super) fn skip_seqs_to(&mut self, next: u64) -> Result<()> {
        if self.next_seq < next {
            meta_set(&self.conn, "next_seq", to_i64(next))?;
            self.next_seq = next;
        }
        Ok(())
    }

    /// The device lost the end of its history: it takes a new identity and
    /// this connection is over (see [`Event::Rewound`]).
    pub(super) fn rewind(&mut self, now_ms: u64, reason: String) -> Result<Event> {
        let old_client_id = self.client_id;
        let renumbered = self.take_new_identity(now_ms)?;
        self.session = Session::Offline;
        Ok(Event::Rewound {
            old_client_id,
            new_client_id: self.client_id,
            renumbered,
            reason,
        })
    }

    /// Takes a new client id and renumbers the pending mutations 1, 2, ...
    /// in their order, in one transaction (see [`Event::Rewound`]). The new
    /// id is derived from the old one, the next sequence number and the
    /// time, so the engine needs no randomness of its own.
    pub(super) fn take_new_identity(&mut self, now_ms: u64) -> Result<Vec<(u64, u64)>> {
        let mut new_id =
            splitmix64(self.client_id ^ splitmix64(self.next_seq ^ now_ms.rotate_left(32)));
        if new_id == 0 || new_id == self.client_id {
            new_id = splitmix64(new_id.wrapping_add(1)).max(1);
        }
        let pending = self.load_pending()?;
        let next_seq = pending.len() as u64 + 1;
        // Every number of the old id below the first still pending is this
        // device's own write (it lost only the end of its history), so the
        // renumbered mutations, made after them, had seen them.
        let old_id = self.client_id;
        let first_pending = pending.first().map_or(1, |(seq, _, _)| *seq);
        // A renumbered mutation had seen this device's own earlier writes:
        // every number below its own, or, when the device knows where its
        // lost history began (a number the server holds other content
        // under), below that. Without it, below the first still pending.
        let first_reused = self.rewind.first_reused;
        let seen_upto = |seq: u64| match first_reused {
            Some(reused) => seq.min(reused) - 1,
            None => first_pending - 1,
        };
        let renumbered: Vec<(u64, u64)> = pending
            .iter()
            .enumerate()
            .map(|(i, (seq, _, _))| (*seq, i as u64 + 1))
            .collect();
        self.atomically(|c| {
            c.conn.execute("DELETE FROM _hearth_outbox", [])?;
            // Receipts name the old numbers, which mean nothing any more.
            c.conn.execute("DELETE FROM _hearth_receipts", [])?;
            let mut insert = c.conn.prepare_cached(
                "INSERT INTO _hearth_outbox (seq, hlc, mutation, undo, format) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            for (i, (old_seq, mut mutation, undo)) in pending.into_iter().enumerate() {
                mutation.seq = i as u64 + 1;
                let seen = seen_upto(old_seq);
                if seen > 0 {
                    mutation.also_seen.push((old_id, seen));
                }
                insert.execute(params![
                    to_i64(mutation.seq),
                    to_i64(mutation.hlc.0),
                    mutation.encode(),
                    postcard::to_allocvec(&undo).expect("encode undo"),
                    MUTATION_FORMAT,
                ])?;
            }
            drop(insert);
            meta_set(&c.conn, "client_id", to_i64(new_id))?;
            meta_set(&c.conn, "next_seq", to_i64(next_seq))?;
            Ok(())
        })?;
        self.client_id = new_id;
        self.next_seq = next_seq;
        // Text edits made from here on carry the new identity.
        self.text.borrow_mut().set_own(new_id);
        self.text_session = splitmix64(new_id ^ self.text_session).max(1);
        self.local_text.borrow_mut().clear();
        self.pending_rows.lock().clear();
        self.outbox_seqs.clear();
        for (seq, mutation, _) in self.load_pending()? {
            count_rows(&mut self.pending_rows.lock(), &mutation);
            self.outbox_seqs.insert(seq);
        }
        Ok(renumbered)
    }

    pub(super) fn apply_entries(&mut self, entries: &[LogEntry], out: &mut Output) -> Result<()> {
        let fresh: Vec<&LogEntry> = entries
            .iter()
            .filter(|e| e.server_seq > self.cursor)
            .collect();
        if fresh.is_empty() {
            return Ok(());
        }
        // This device's own entries by sequence number: each acks its
        // pending mutation (looked up once per acked mutation below).
        let mine: HashMap<u64, &LogEntry> = fresh
            .iter()
            .filter(|e| e.client_id == self.client_id)
            .map(|e| (e.client_seq, *e))
            .collect();
        let mine_seqs: Vec<u64> = mine.keys().copied().collect();
        let mut acked = self.load_pending_subset(&mine_seqs)?;
        // An entry under this device's id and a pending sequence number is
        // its ack only if it applied that very mutation: the digests agree
        // (entries stored before digests were kept carry 0, and then the
        // rows it wrote must be rows the mutation wrote). Anything else means
        // the server holds another mutation under that number: this device
        // lost the end of its history without the server noticing at Hello.
        // The entry is applied as another device's, and the device takes a
        // new identity so its own write is not taken for done.
        let mut impostor = false;
        let mut first_reused = self.rewind.first_reused;
        acked.retain(|(seq, mutation, _)| {
            let entry = mine[seq];
            let matches = if entry.digest != 0 {
                entry.digest == mutation.digest()
            } else {
                let written: HashSet<RowKey> = mutation
                    .changes
                    .iter()
                    .map(|c| row_key(&c.table, &c.pk))
                    .collect();
                entry
                    .changes
                    .iter()
                    .all(|c| written.contains(&row_key(&c.table, &c.pk)))
            };
            if !matches {
                impostor = true;
                first_reused = Some(first_reused.map_or(*seq, |r| r.min(*seq)));
            }
            matches
        });
        self.rewind.first_reused = first_reused;
        if !impostor && self.acked_as_sent(&fresh, &acked)? {
            return self.confirm_as_sent(&fresh, &acked, out);
        }
        // A text cell whose acked edit the server did not apply as sent (an
        // insert that lost to a later one, say) has a local document that
        // no longer matches: rebuild it from the confirmed one.
        for (seq, mutation, _) in &acked {
            let entry = mine[seq];
            for change in &mutation.changes {
                let RowOp::Upsert { columns, .. } = &change.op else {
                    continue;
                };
                if self.dropped_table(&change.table) {
                    continue;
                }
                let table = self.table(&change.table)?;
                for (name, op) in columns {
                    let is_text = table
                        .column_index(name)
                        .is_some_and(|i| table.columns[i].policy == MergePolicy::Text);
                    if !is_text {
                        continue;
                    }
                    let same = entry.changes.iter().any(|c| {
                        c.table == change.table
                            && c.pk == change.pk
                            && matches!(&c.op, RowOp::Upsert { columns, .. } if columns.iter().any(|(n, o)| n == name && o == op))
                    });
                    if !same {
                        let cell = Cell {
                            table: &change.table,
                            pk: &change.pk,
                            column: name,
                        };
                        self.local_text.borrow_mut().remove(&cell.key());
                    }
                }
            }
        }
        let saved_cursor = self.cursor;
        let saved_clock = self.clock.clone();
        let mut tables = BTreeSet::new();
        let verdicts: Vec<Verdict> = acked
            .iter()
            .map(|(seq, _, _)| Verdict::Applied {
                server_seq: mine[seq].server_seq,
            })
            .collect();
        let result = self.settle(
            &acked,
            &verdicts,
            fresh.iter().flat_map(|e| e.changes.iter()),
            |c| {
                for entry in &fresh {
                    c.apply_changes(&entry.changes, Some(entry.client_id))?;
                    tables.extend(entry.changes.iter().map(|change| change.table.clone()));
                    c.clock.observe(entry.hlc);
                    c.cursor = entry.server_seq;
                }
                Ok(())
            },
        );
        if let Err(e) = result {
            self.cursor = saved_cursor;
            self.clock = saved_clock;
            return Err(e);
        }
        let candidates: Vec<(String, Value)> = fresh
            .iter()
            .flat_map(|e| e.changes.iter())
            .chain(acked.iter().flat_map(|(_, m, _)| m.changes.iter()))
            .map(|c| (c.table.clone(), c.pk.clone()))
            .collect();
        self.evict_unheld(candidates, out)?;
        let acked_seqs: HashSet<u64> = acked.iter().map(|(s, _, _)| *s).collect();
        for entry in fresh
            .iter()
            .filter(|e| e.client_id == self.client_id && acked_seqs.contains(&e.client_seq))
        {
            out.events.push(Event::Applied {
                seq: entry.client_seq,
                server_seq: entry.server_seq,
            });
        }
        if !tables.is_empty() {
            out.events
                .push(Event::TablesChanged(tables.into_iter().collect()));
        }
        if impostor {
            self.rewind.suspected = true;
            self.rewind.confirmed = true;
        }
        Ok(())
    }

    /// Whether these entries are all acks of this device's oldest pending
    /// mutations, each applied exactly as sent: then the confirmed state
    /// plus the remaining pending mutations is what the device already
    /// shows, and their pre-images still hold.
    fn acked_as_sent(
        &self,
        fresh: &[&LogEntry],
        acked: &[(u64, Mutation, Vec<Preimage>)],
    ) -> Result<bool> {
        if acked.len() != fresh.len() {
            return Ok(false);
        }
        let same = acked.iter().all(|(seq, mutation, _)| {
            fresh
                .iter()
                .find(|e| e.client_id == self.client_id && e.client_seq == *seq)
                .is_some_and(|e| e.changes == mutation.changes)
        });
        if !same {
            return Ok(false);
        }
        // A text edit confirms onto the cell's confirmed document; without
        // one (a row from before the policy) the full path rebuilds it.
        for (_, mutation, _) in acked {
            for change in &mutation.changes {
                let RowOp::Upsert { columns, .. } = &change.op else {
                    continue;
                };
                for (name, op) in columns {
                    if matches!(op, ColumnOp::Text(_)) {
                        let cell = Cell {
                            table: &change.table,
                            pk: &change.pk,
                            column: name,
                        };
                        if self
                            .text
                            .borrow_mut()
                            .get(&self.conn, cell)
                            .map_err(text_failure)?
                            .is_none()
                        {
                            return Ok(false);
                        }
                    }
                }
            }
        }
        let last = acked.iter().map(|(s, _, _)| *s).max().unwrap_or(0);
        Ok(self.outbox_seqs.range(..=last).count() == acked.len())
    }

    /// Takes acks applied as sent (see `acked_as_sent`) in O(their
    /// changes): the mutations leave the outbox, the confirmed text
    /// documents take their edits, the cursor moves; no row changes.
    fn confirm_as_sent(
        &mut self,
        fresh: &[&LogEntry],
        acked: &[(u64, Mutation, Vec<Preimage>)],
        out: &mut Output,
    ) -> Result<()> {
        let saved_cursor = self.cursor;
        let saved_clock = self.clock.clone();
        let result = self.atomically(|c| {
            for entry in fresh {
                for change in &entry.changes {
                    let table = c.table(&change.table)?;
                    let texts = table
                        .columns
                        .iter()
                        .filter(|col| col.policy == MergePolicy::Text);
                    for column in texts {
                        let cell = Cell {
                            table: &table.name,
                            pk: &change.pk,
                            column: &column.name,
                        };
                        match &change.op {
                            RowOp::Delete | RowOp::Evict => {
                                c.text.borrow().remove(&c.conn, cell)?
                            }
                            RowOp::Upsert { columns, .. } => {
                                for (_, op) in columns.iter().filter(|(n, _)| *n == column.name) {
                                    match op {
                                        ColumnOp::Text(u) => {
                                            c.text
                                                .borrow_mut()
                                                .apply(&c.conn, cell, u, "")
                                                .map_err(text_failure)?;
                                        }
                                        ColumnOp::Set(v) => {
                                            let text = text_of(&column.name, v).unwrap_or_default();
                                            c.text.borrow_mut().reset(
                                                &c.conn,
                                                cell,
                                                &text,
                                                entry.client_id,
                                            )?;
                                        }
                                        _ => {}
                                    }
                                }
                            }
                        }
                    }
                }
                let mut stmt = c
                    .conn
                    .prepare_cached("DELETE FROM _hearth_outbox WHERE seq = ?1")?;
                stmt.execute([to_i64(entry.client_seq)])?;
                receipts::record(
                    &c.conn,
                    entry.client_seq,
                    &Verdict::Applied {
                        server_seq: entry.server_seq,
                    },
                )?;
                c.clock.observe(entry.hlc);
                c.cursor = entry.server_seq;
            }
            meta_set(&c.conn, "cursor", to_i64(c.cursor))?;
            meta_set(&c.conn, "hlc", to_i64(c.clock.last().0))?;
            Ok(())
        });
        if let Err(e) = result {
            self.cursor = saved_cursor;
            self.clock = saved_clock;
            return Err(e);
        }
        self.pending -= acked.len() as u64;
        for (seq, mutation, _) in acked {
            self.outbox_seqs.remove(seq);
            let mut pending_rows = self.pending_rows.lock();
            for change in &mutation.changes {
                for key in keys_of(change) {
                    if let Some(n) = pending_rows.get_mut(&key) {
                        *n -= 1;
                        if *n == 0 {
                            pending_rows.remove(&key);
                        }
                    }
                }
            }
        }
        // The server says these rows are (still) this device's: an eviction
        // deferred for them is void, as when the entries apply in full.
        for entry in fresh {
            for change in &entry.changes {
                if change.op != RowOp::Evict {
                    self.forget_deferred(&change.table, &change.pk)?;
                }
            }
        }
        // A row this device wrote outside its subscriptions (or whose
        // subscription it dropped while the write was pending) goes once
        // no pending write holds it.
        let candidates: Vec<(String, Value)> = acked
            .iter()
            .flat_map(|(_, m, _)| m.changes.iter())
            .map(|c| (c.table.clone(), c.pk.clone()))
            .collect();
        self.evict_unheld(candidates, out)?;
        let mut tables = BTreeSet::new();
        for entry in fresh {
            out.events.push(Event::Applied {
                seq: entry.client_seq,
                server_seq: entry.server_seq,
            });
            tables.extend(entry.changes.iter().map(|c| c.table.clone()));
        }
        if !tables.is_empty() {
            out.events
                .push(Event::TablesChanged(tables.into_iter().collect()));
        }
        Ok(())
    }

    pub(super) fn apply_rejection(
        &mut self,
        seq: u64,
        code: &str,
        reason: &str,
        out: &mut Output,
    ) -> Result<()> {
        let verdict = |undone| Verdict::Rejected {
            code: code.to_string(),
            reason: reason.to_string(),
            undone,
        };
        if let Some(undone) = self.drop_pending(seq, verdict, out)? {
            out.events.push(Event::Rejected {
                seq,
                code: code.to_string(),
                reason: reason.to_string(),
                undone,
            });
        }
        Ok(())
    }

    /// The server applied pending mutation `seq` as entry `server_seq`,
    /// which compaction removed (`ServerMsg::Acked`): its effect is in the
    /// rows this device re-loads, so it leaves the outbox with its optimistic
    /// copy undone, as the entry itself would have replaced it.
    pub(super) fn apply_compacted_ack(
        &mut self,
        seq: u64,
        server_seq: u64,
        digest: u64,
        out: &mut Output,
    ) -> Result<()> {
        let pending = self.load_pending_subset(&[seq])?;
        if pending
            .first()
            .is_some_and(|(_, m, _)| digest != 0 && m.digest() != digest)
        {
            // The server applied other content under this number: this
            // device lost the end of its history (see `Rewind`). It takes a
            // new client id once caught up, and its own write goes again
            // under a new number.
            self.rewind.suspected = true;
            self.rewind.confirmed = true;
            self.rewind.first_reused = Some(self.rewind.first_reused.map_or(seq, |r| r.min(seq)));
            return Ok(());
        }
        if self
            .drop_pending(seq, |_| Verdict::Applied { server_seq }, out)?
            .is_some()
        {
            out.events.push(Event::Applied { seq, server_seq });
        }
        Ok(())
    }

    /// Takes pending mutation `seq` out: undone, the rest redone over the
    /// confirmed state, its text cells rebuilt, its rows evicted if no
    /// subscription holds them; its receipt is `verdict(rows it wrote)`.
    /// The rows it wrote, or None when it was no longer pending.
    fn drop_pending(
        &mut self,
        seq: u64,
        verdict: impl FnOnce(Vec<(String, Value)>) -> Verdict,
        out: &mut Output,
    ) -> Result<Option<Vec<(String, Value)>>> {
        let rejected = self.load_pending_subset(&[seq])?;
        let Some((_, mutation, _)) = rejected.first() else {
            return Ok(None); // Already handled before a reconnect.
        };
        let undone = receipts::rows_of(mutation);
        let verdicts = [verdict(undone.clone())];
        let tables: BTreeSet<String> = mutation.changes.iter().map(|c| c.table.clone()).collect();
        // The device's text documents hold the refused edits: rebuild them
        // from the confirmed ones and what stays pending, and show that.
        let text_cells: Vec<(String, Value, String)> = mutation
            .changes
            .iter()
            .flat_map(|c| match &c.op {
                RowOp::Upsert { columns, .. } => columns
                    .iter()
                    .filter(|(_, op)| matches!(op, ColumnOp::Text(_)))
                    .map(|(n, _)| (c.table.clone(), c.pk.clone(), n.clone()))
                    .collect(),
                RowOp::Delete | RowOp::Evict => Vec::new(),
            })
            .collect();
        let candidates: Vec<(String, Value)> = mutation
            .changes
            .iter()
            .map(|c| (c.table.clone(), c.pk.clone()))
            .collect();
        self.settle(&rejected, &verdicts, std::iter::empty(), |c| {
            c.local_text.borrow_mut().clear();
            for (table, pk, column) in &text_cells {
                let t = c.table(table)?;
                let Some(idx) = t.column_index(column) else {
                    continue;
                };
                let cell = Cell { table, pk, column };
                let text = c.with_local_doc(cell, "", |doc| doc.text())?;
                rows::update_columns(&c.conn, t, pk, &[(idx, &Value::Text(text))])?;
            }
            Ok(())
        })?;
        self.evict_unheld(candidates, out)?;
        out.events
            .push(Event::TablesChanged(tables.into_iter().collect()));
        Ok(Some(undone))
    }
}

/// The `sub` claim of a JWT, read without verifying it (the server does);
/// None when the token is not a JWT with a string `sub`.
pub fn token_subject(token: &str) -> Option<String> {
    use base64::Engine as _;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    Some(claims.get("sub")?.as_str()?.to_string())
}

/// The error of a device whose schema (version `own`) is newer than the
/// server's (`server`).
fn schema_ahead(own: u64, server: u64) -> ClientError {
    ClientError::SchemaAhead(crate::server::schema_ahead_message(own, server))
}
