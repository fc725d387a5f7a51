//! The optimistic state: applying changes (a log entry, or a pending
//! mutation redone), undo by pre-images, the outbox's pending mutations, and
//! rebase / settle.

use super::*;

impl Client {
    /// Writes one transaction's changes as a whole, see
    /// [`rows::write_all`]: a log entry written by `author` (`Some`), or a
    /// pending mutation being redone (`None`). Operations of counters, sets
    /// and text apply over the row as it is; text edits go to the cells'
    /// documents (the confirmed one too, for a log entry), and the column
    /// shows the device's document.
    pub(super) fn apply_changes(&self, changes: &[RowChange], author: Option<u64>) -> Result<()> {
        struct Planned<'t> {
            table: &'t Table,
            pk: &'t Value,
            /// None: delete; Some((insert, columns)).
            op: Option<(bool, Vec<(usize, Value)>)>,
        }
        let mut planned = Vec::with_capacity(changes.len());
        for change in changes {
            // A pending mutation made under an older schema may name a table
            // or columns that a schema change dropped since: the server
            // refuses the one and discards the others, and so does its redo.
            if author.is_none() && self.dropped_table(&change.table) {
                continue;
            }
            let table = self.table(&change.table)?;
            if author.is_some() {
                self.unmark_stale(&table.name, &change.pk)?;
            }
            let op = match &change.op {
                // A row that left this device's subscriptions: gone locally,
                // unless a pending write still touches it (it stays until
                // that settles, then `evict_unheld` looks again).
                RowOp::Evict
                    if self
                        .pending_rows
                        .contains(&row_key(&table.name, &change.pk)) =>
                {
                    self.defer_eviction(&table.name, &change.pk)?;
                    continue;
                }
                RowOp::Delete | RowOp::Evict => {
                    if author.is_some() {
                        self.forget_deferred(&table.name, &change.pk)?;
                    }
                    for column in table
                        .columns
                        .iter()
                        .filter(|c| c.policy == MergePolicy::Text)
                    {
                        let cell = Cell {
                            table: &table.name,
                            pk: &change.pk,
                            column: &column.name,
                        };
                        if author.is_some() || change.op == RowOp::Evict {
                            self.text.borrow().remove(&self.conn, cell)?;
                        }
                        self.local_text.borrow_mut().remove(&cell.key());
                    }
                    None
                }
                RowOp::Upsert { insert, columns } => {
                    if author.is_some() {
                        // The server says the row is (still) this device's.
                        self.forget_deferred(&table.name, &change.pk)?;
                    }
                    let needs_row = columns
                        .iter()
                        .any(|(_, op)| !matches!(op, ColumnOp::Set(_)));
                    let row = if needs_row {
                        match rows::read_row(&self.conn, table, &change.pk)? {
                            Some(row) => Some(row),
                            // An update of a row this device does not have.
                            None if !*insert => continue,
                            None => None,
                        }
                    } else {
                        None
                    };
                    let mut cols = Vec::with_capacity(columns.len());
                    for (name, op) in columns {
                        if author.is_none() && table.column_index(name).is_none() {
                            continue;
                        }
                        let idx = table.column_index(name).ok_or_else(|| {
                            ClientError::SchemaMismatch(format!(
                                "unknown column '{name}' in table '{}'",
                                table.name
                            ))
                        })?;
                        let current = row.as_ref().map(|r| &r[idx]).unwrap_or(&Value::Null);
                        let cell = Cell {
                            table: &table.name,
                            pk: &change.pk,
                            column: name,
                        };
                        let value = match op {
                            ColumnOp::Set(v) => {
                                if table.columns[idx].policy == MergePolicy::Text {
                                    if let Some(author) = author {
                                        // A whole text value from the server (a new
                                        // row): every side starts the same document.
                                        let text = text_of(name, v).unwrap_or_default();
                                        self.text
                                            .borrow_mut()
                                            .reset(&self.conn, cell, &text, author)?;
                                        self.local_text.borrow_mut().remove(&cell.key());
                                    }
                                }
                                v.clone()
                            }
                            ColumnOp::Add(delta) => counter::apply(name, current, *delta)
                                .map_err(ClientError::Refused)?,
                            ColumnOp::SetOps { add, remove } => {
                                set::apply(name, current, add, remove)
                            }
                            ColumnOp::Text(update) => {
                                let now = text_of(name, current).unwrap_or_default();
                                if author.is_some() {
                                    self.text
                                        .borrow_mut()
                                        .apply(&self.conn, cell, update, &now)
                                        .map_err(text_failure)?;
                                }
                                let cached = self.local_text.borrow().contains_key(&cell.key());
                                let text = if cached || author.is_none() {
                                    self.with_local_doc(cell, &now, |doc| {
                                        doc.apply_update(update).map(|()| doc.text())
                                    })?
                                    .map_err(|e| {
                                        ClientError::Refused(format!("text column '{name}': {e}"))
                                    })?
                                } else {
                                    let mut cells = self.text.borrow_mut();
                                    let doc = cells.get(&self.conn, cell).map_err(text_failure)?;
                                    doc.map(|d| d.text()).unwrap_or(now)
                                };
                                Value::Text(text)
                            }
                        };
                        cols.push((idx, value));
                    }
                    Some((*insert, cols))
                }
            };
            planned.push(Planned {
                table,
                pk: &change.pk,
                op,
            });
        }
        let writes: Vec<rows::Write<'_>> = planned
            .iter()
            .map(|p| rows::Write {
                table: p.table,
                pk: p.pk,
                op: match &p.op {
                    None => rows::WriteOp::Delete,
                    Some((true, cols)) => {
                        rows::WriteOp::Upsert(cols.iter().map(|(i, v)| (*i, v)).collect())
                    }
                    Some((false, cols)) => {
                        rows::WriteOp::Update(cols.iter().map(|(i, v)| (*i, v)).collect())
                    }
                },
            })
            .collect();
        rows::write_all(&self.conn, &writes)?;
        Ok(())
    }

    pub(super) fn apply_undo(&self, undo: &[Preimage]) -> Result<()> {
        // Remove every row the mutation touched, then put the pre-images
        // back. Restoring row by row in place can clash on a UNIQUE value
        // that another touched row still holds (say an INSERT OR REPLACE
        // that displaced a row); the pre-images plus the untouched rows are
        // the state before the mutation, which SQLite accepted, so no subset
        // of it can clash.
        for pre in undo {
            rows::delete_row(&self.conn, self.table(&pre.table)?, &pre.pk)?;
        }
        for pre in undo {
            if let Some(values) = &pre.row {
                // (A schema change re-shaped the pre-images of the tables it
                // rebuilt and dropped those of the tables it dropped.)
                rows::restore_row(&self.conn, self.table(&pre.table)?, values)?;
            }
        }
        Ok(())
    }

    pub(super) fn load_pending(&self) -> Result<Vec<(u64, Mutation, Vec<Preimage>)>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT seq, mutation, undo, format FROM _hearth_outbox ORDER BY seq",
        )?;
        let mut rows = stmt.query([])?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            let seq: i64 = row.get(0)?;
            let m: Vec<u8> = row.get(1)?;
            let u: Vec<u8> = row.get(2)?;
            out.push(decode_pending(seq as u64, &m, &u, row.get(3)?)?);
        }
        Ok(out)
    }

    /// Undoes every pending mutation, runs `between` on the confirmed state,
    /// then redoes the mutations still pending, recording fresh pre-images.
    pub(super) fn rebase(&mut self, between: impl FnOnce(&mut Client) -> Result<()>) -> Result<()> {
        let remaining = self.replicated(|c| c.rebase_in_transaction(between))?;
        self.pending = remaining;
        Ok(())
    }

    pub(super) fn rebase_in_transaction(
        &mut self,
        between: impl FnOnce(&mut Client) -> Result<()>,
    ) -> Result<u64> {
        let pending = self.load_pending()?;
        for (_, _, undo) in pending.iter().rev() {
            self.apply_undo(undo)?;
        }
        between(self)?;
        let still: HashSet<u64> = self.pending_seqs()?.into_iter().collect();
        for (seq, mutation, _) in pending.iter().filter(|(s, _, _)| still.contains(s)) {
            let mut undo = Vec::with_capacity(mutation.changes.len());
            for change in &mutation.changes {
                if self.dropped_table(&change.table) {
                    continue;
                }
                let table = self.table(&change.table)?;
                undo.push(Preimage {
                    table: change.table.clone(),
                    pk: change.pk.clone(),
                    row: rows::read_row(&self.conn, table, &change.pk)?,
                });
            }
            // A pending write that no longer fits the confirmed state (say a
            // UNIQUE clash with a row another device made) is left out of the
            // local view; the server will refuse or apply it and say so.
            self.conn.execute_batch("SAVEPOINT hearth_redo")?;
            match self.apply_changes(&mutation.changes, None) {
                Ok(()) => self.conn.execute_batch("RELEASE hearth_redo")?,
                Err(_) => {
                    self.conn
                        .execute_batch("ROLLBACK TO hearth_redo; RELEASE hearth_redo")?;
                    self.forget_text();
                    undo.clear();
                }
            }
            let blob = postcard::to_allocvec(&undo).expect("encode undo");
            self.conn
                .prepare_cached("UPDATE _hearth_outbox SET undo = ?1 WHERE seq = ?2")?
                .execute(params![blob, to_i64(*seq)])?;
        }
        self.clear_capture()?;
        meta_set(&self.conn, "cursor", to_i64(self.cursor))?;
        meta_set(&self.conn, "hlc", to_i64(self.clock.last().0))?;
        Ok(still.len() as u64)
    }

    /// The pending mutations with these sequence numbers, in order.
    pub(super) fn load_pending_subset(
        &self,
        seqs: &[u64],
    ) -> Result<Vec<(u64, Mutation, Vec<Preimage>)>> {
        let mut out = Vec::new();
        let mut stmt = self
            .conn
            .prepare_cached("SELECT mutation, undo, format FROM _hearth_outbox WHERE seq = ?1")?;
        let mut sorted = seqs.to_vec();
        sorted.sort_unstable();
        for seq in sorted {
            let found: Option<(Vec<u8>, Vec<u8>, i64)> = stmt
                .query_row([to_i64(seq)], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .optional()?;
            if let Some((m, u, format)) = found {
                out.push(decode_pending(seq, &m, &u, format)?);
            }
        }
        Ok(out)
    }

    /// Removes `done` (acked or refused) from the pending mutations and runs
    /// `apply` (server changes touching `incoming`) on the confirmed state.
    ///
    /// When no mutation that stays pending touches a row that `done` or the
    /// incoming changes touch, undoing just `done` is enough: the rows the
    /// remaining mutations touch are not involved. That is the common case
    /// (acks of a device's own writes) and costs O(changes). Otherwise every
    /// pending mutation is undone and redone (a full rebase).
    ///
    /// `verdicts` (one per mutation of `done`, in the same order) become
    /// their receipts, in the same transaction that takes them out.
    pub(super) fn settle<'a>(
        &mut self,
        done: &[(u64, Mutation, Vec<Preimage>)],
        verdicts: &[Verdict],
        incoming: impl Iterator<Item = &'a RowChange>,
        mut apply: impl FnMut(&mut Client) -> Result<()>,
    ) -> Result<()> {
        debug_assert_eq!(done.len(), verdicts.len());
        let mut remaining = self.pending_rows.snapshot();
        for (_, m, _) in done {
            for c in &m.changes {
                for key in keys_of(c) {
                    if let Some(n) = remaining.get_mut(&key) {
                        *n -= 1;
                        if *n == 0 {
                            remaining.remove(&key);
                        }
                    }
                }
            }
        }
        // Pre-images of the remaining mutations stay valid when the rows they
        // cover are untouched, as long as no other row can constrain them.
        // Through a UNIQUE index it can: a row the server changed may now
        // hold a value that a remaining mutation's pre-image also holds
        // (found by the simulator, `regression_settle_fast_path_stale_preimage`).
        let cross_row = |table: &str| self.cross_row_tables.contains(table);
        let touches = |c: &RowChange| {
            remaining.contains_key(&row_key(&c.table, &c.pk)) || cross_row(&c.table)
        };
        let overlaps = done
            .iter()
            .flat_map(|(_, m, _)| m.changes.iter())
            .any(touches)
            || incoming.into_iter().any(touches)
            || (!self.cross_row_tables.is_empty()
                && self
                    .cross_row_tables
                    .iter()
                    .any(|t| remaining.contains_key(&table_key(t))));
        let remove = |c: &mut Client| -> Result<()> {
            let mut stmt = c
                .conn
                .prepare_cached("DELETE FROM _hearth_outbox WHERE seq = ?1")?;
            for ((seq, _, _), verdict) in done.iter().zip(verdicts) {
                stmt.execute([to_i64(*seq)])?;
                receipts::record(&c.conn, *seq, verdict)?;
            }
            Ok(())
        };
        // A remote row can also clash with a pending row it does not share a
        // key with (a UNIQUE column): then the fast path fails, rolls back,
        // and the full rebase, which leaves such a pending write out of the
        // local view until the server decides, takes over.
        // From here on, "pending" means what stays pending: an eviction in
        // `apply` keeps a row only for a write that is still waiting.
        let previous = self.pending_rows.replace(remaining);
        let fast = !overlaps
            && self
                .replicated(|c| {
                    for (_, _, undo) in done.iter().rev() {
                        c.apply_undo(undo)?;
                    }
                    remove(c)?;
                    apply(c)?;
                    c.clear_capture()?;
                    meta_set(&c.conn, "cursor", to_i64(c.cursor))?;
                    meta_set(&c.conn, "hlc", to_i64(c.clock.last().0))?;
                    Ok(())
                })
                .is_ok();
        if fast {
            self.pending -= done.len() as u64;
        } else if let Err(e) = self.rebase(|c| {
            remove(c)?;
            apply(c)
        }) {
            self.pending_rows.replace(previous);
            return Err(e);
        }
        for (seq, _, _) in done {
            self.outbox_seqs.remove(seq);
        }
        Ok(())
    }
}
