//! Change capture: the triggers and notes that turn the app's SQL into a
//! mutation, each column as its merge policy captures it, and the outbox write.

use super::*;

fn shadow_table(n: usize) -> String {
    format!("temp._hearth_old_{n}")
}

/// Temp capture tables and triggers for one synced table.
///
/// The first pre-image of a row is kept with `INSERT ... WHERE NOT EXISTS`,
/// not `INSERT OR IGNORE`: SQLite lets the conflict policy of the statement
/// that fired a trigger override the trigger's own, so under an app's
/// `INSERT OR REPLACE` the shadow row would be replaced by a later image, and
/// under an upsert (`ON CONFLICT DO UPDATE`, also used by rebase) the shadow
/// insert would fail with a UNIQUE error.
fn capture_sql(n: usize, table: &Table, rowid: bool) -> String {
    let t = ident(&table.name);
    let pk = ident(table.pk_name());
    let cols: Vec<String> = table.columns.iter().map(|c| ident(&c.name)).collect();
    let old_values: Vec<String> = cols.iter().map(|c| format!("OLD.{c}")).collect();
    let mask: Vec<String> = cols
        .iter()
        .enumerate()
        // Exact: the column's collation (say NOCASE) and affinity must not
        // hide a change, so compare bytes and storage class. SQL compares
        // reals by value (0.0 = -0.0), so a real column is always marked and
        // the exact comparison of old and new values decides.
        .map(|(i, c)| {
            format!("((OLD.{c} IS NOT NEW.{c} COLLATE BINARY OR typeof(OLD.{c}) <> typeof(NEW.{c}) OR typeof(OLD.{c}) = 'real') << {i})")
        })
        .collect();
    let shadow = shadow_table(n);
    // Rowid tables note inserts through the update hook, not a trigger (a
    // trigger makes every INSERT statement open a statement journal and run a
    // sub-program, which tripled the cost of a bulk insert). UPDATE and
    // DELETE triggers then ask the hook's log whether a row was made in this
    // transaction, because such a row did not exist before it.
    let made_here = if rowid {
        format!("hearth_inserted({n}, OLD.rowid)")
    } else {
        "0".to_string()
    };
    let insert_trigger = if rowid {
        String::new()
    } else {
        format!(
            "CREATE TEMP TRIGGER _hearth_ins_{n} AFTER INSERT ON main.{t} WHEN hearth_capturing() BEGIN
  INSERT INTO temp._hearth_capture (tbl, pk, mask, inserted, existed) VALUES ({n}, NEW.{pk}, -1, 1, 0)
    ON CONFLICT (tbl, pk) DO UPDATE SET mask = -1, inserted = 1;
END;"
        )
    };
    format!(
        "DROP TABLE IF EXISTS {shadow};
CREATE TEMP TABLE _hearth_old_{n} ({cols_list}, PRIMARY KEY ({pk}));
DROP TRIGGER IF EXISTS temp._hearth_ins_{n};
DROP TRIGGER IF EXISTS temp._hearth_upd_{n};
DROP TRIGGER IF EXISTS temp._hearth_del_{n};
{insert_trigger}
CREATE TEMP TRIGGER _hearth_upd_{n} AFTER UPDATE ON main.{t} WHEN hearth_capturing() BEGIN
  INSERT INTO {shadow} SELECT {old_values} WHERE NOT EXISTS (SELECT 1 FROM {shadow} WHERE {pk} IS OLD.{pk});
  INSERT INTO temp._hearth_capture (tbl, pk, mask, inserted, existed)
    SELECT {n}, OLD.{pk}, 0, 0, NOT {made_here} WHERE OLD.{pk} IS NOT NEW.{pk}
    ON CONFLICT (tbl, pk) DO NOTHING;
  INSERT INTO temp._hearth_capture (tbl, pk, mask, inserted, existed)
    SELECT {n}, NEW.{pk},
      CASE WHEN OLD.{pk} IS NOT NEW.{pk} THEN -1 ELSE ({mask}) END,
      OLD.{pk} IS NOT NEW.{pk},
      OLD.{pk} IS NEW.{pk} AND NOT {made_here}
    WHERE true
    ON CONFLICT (tbl, pk) DO UPDATE SET mask = mask | excluded.mask, inserted = inserted | excluded.inserted;
END;
CREATE TEMP TRIGGER _hearth_del_{n} AFTER DELETE ON main.{t} WHEN hearth_capturing() BEGIN
  INSERT INTO {shadow} SELECT {old_values} WHERE NOT EXISTS (SELECT 1 FROM {shadow} WHERE {pk} IS OLD.{pk});
  INSERT INTO temp._hearth_capture (tbl, pk, mask, inserted, existed) VALUES ({n}, OLD.{pk}, 0, 0, NOT {made_here})
    ON CONFLICT (tbl, pk) DO NOTHING;
END;",
        cols_list = cols.join(", "),
        old_values = old_values.join(", "),
        mask = mask.join(" | "),
    )
}

const CAPTURE_TABLE: &str = "
DROP TABLE IF EXISTS temp._hearth_capture;
CREATE TEMP TABLE _hearth_capture (
  tbl      INTEGER NOT NULL,
  pk       NOT NULL,
  mask     INTEGER NOT NULL,
  inserted INTEGER NOT NULL,
  existed  INTEGER NOT NULL,
  PRIMARY KEY (tbl, pk)
) WITHOUT ROWID;";

/// Runs one prepared app statement once per parameter set; returns the rows
/// it changed.
fn run_statement(
    conn: &Connection,
    stmt: &mut rusqlite::Statement<'_>,
    param_sets: &[&[Value]],
) -> Result<u64> {
    let readonly = stmt.readonly();
    let mut rows_affected = 0;
    for params in param_sets {
        if stmt.parameter_count() != params.len() {
            return Err(ClientError::Refused(format!(
                "the statement takes {} parameters but {} were given",
                stmt.parameter_count(),
                params.len()
            )));
        }
        for (i, p) in params.iter().enumerate() {
            stmt.raw_bind_parameter(i + 1, p)?;
        }
        let mut rows = stmt.raw_query();
        while rows.next()?.is_some() {}
        drop(rows);
        if !readonly {
            rows_affected += conn.changes();
        }
    }
    Ok(rows_affected)
}

impl Client {
    pub(super) fn install_capture(&mut self, schema: &Schema) -> Result<()> {
        // Capture runs only while app SQL runs: applying server changes and
        // rebasing write the same tables but must not be recorded, and
        // skipping the triggers' work there keeps remote changes cheap.
        let capturing = self.capturing.clone();
        self.conn.create_scalar_function(
            "hearth_capturing",
            0,
            rusqlite::functions::FunctionFlags::SQLITE_UTF8,
            move |_| Ok(capturing.load(std::sync::atomic::Ordering::Relaxed)),
        )?;
        let log = self.inserted.clone();
        self.conn.create_scalar_function(
            "hearth_inserted",
            2,
            rusqlite::functions::FunctionFlags::SQLITE_UTF8,
            move |ctx| {
                let key = (ctx.get::<i64>(0)? as u32, ctx.get::<i64>(1)?);
                Ok(log.lock().unwrap().contains(key))
            },
        )?;
        let mut rowid_tables = HashMap::new();
        let mut sql = String::from(CAPTURE_TABLE);
        for (n, table) in schema.numbered() {
            let without_rowid: bool = self.conn.query_row(
                "SELECT coalesce((SELECT wr FROM pragma_table_list(?1) WHERE schema = 'main'), 0)",
                [&table.name],
                |r| r.get(0),
            )?;
            if !without_rowid {
                rowid_tables.insert(table.name.clone(), n as u32);
            }
            sql.push_str(&capture_sql(n, table, !without_rowid));
        }
        self.conn.execute_batch(&sql)?;
        let log = self.inserted.clone();
        let capturing = self.capturing.clone();
        self.conn.update_hook(Some(
            move |action: rusqlite::hooks::Action, db: &str, table: &str, rowid: i64| {
                if action == rusqlite::hooks::Action::SQLITE_INSERT
                    && db == "main"
                    && capturing.load(std::sync::atomic::Ordering::Relaxed)
                {
                    if let Some(n) = rowid_tables.get(table) {
                        log.lock().unwrap().order.push((*n, rowid));
                    }
                }
            },
        ))?;
        self.gate.lock().unwrap().synced = schema.tables.keys().cloned().collect();
        self.app_triggers.clear();
        {
            let mut stmt = self.conn.prepare(
                "SELECT name, sql FROM main.sqlite_schema WHERE type = 'trigger' AND tbl_name = ?1 ORDER BY name",
            )?;
            for table in schema.tables.values() {
                let found = stmt
                    .query_map([&table.name], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect::<Result<Vec<(String, String)>, _>>()?;
                self.app_triggers.extend(found);
            }
        }
        self.foreign_keys_cookie = None;
        self.cross_row_tables.clear();
        for table in schema.tables.values() {
            let unique_index: bool = self.conn.query_row(
                "SELECT EXISTS (SELECT 1 FROM pragma_index_list(?1) WHERE \"unique\" AND origin <> 'pk')",
                [&table.name],
                |r| r.get(0),
            )?;
            let app_trigger: bool = self.conn.query_row(
                "SELECT EXISTS (SELECT 1 FROM main.sqlite_schema WHERE type = 'trigger' AND tbl_name = ?1)",
                [&table.name],
                |r| r.get(0),
            )?;
            if unique_index || app_trigger {
                self.cross_row_tables.insert(table.name.clone());
            }
        }
        Ok(())
    }

    pub(super) fn clear_capture(&self) -> Result<()> {
        *self.inserted.lock().unwrap() = InsertLog::default();
        self.conn.execute("DELETE FROM temp._hearth_capture", [])?;
        if let Some(schema) = &self.schema {
            for (n, _) in schema.numbered() {
                self.conn
                    .execute(&format!("DELETE FROM {}", shadow_table(n)), [])?;
            }
        }
        Ok(())
    }

    /// Runs the app's statements with an authorizer that keeps transaction
    /// control and Hearth's own tables out of reach.
    pub(super) fn run_app_sql(&mut self, sql: &str, params: &[&[Value]]) -> Result<u64> {
        *self.inserted.lock().unwrap() = InsertLog::default();
        self.capturing
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let (result, refused) = self.gated(GateMode::Exec, || self.run_statements(sql, params));
        self.capturing
            .store(false, std::sync::atomic::Ordering::Relaxed);
        result.map_err(|e| match refused {
            Some(why) => ClientError::Refused(why),
            // The capture note's NOT NULL key stands in for a check in every
            // trigger run (cheaper): say what it means in the app's terms.
            None if e.to_string().contains("_hearth_capture.pk") => {
                ClientError::Refused("the primary key of a synced table cannot be NULL".into())
            }
            None => e,
        })
    }

    pub(super) fn run_statements(&self, sql: &str, param_sets: &[&[Value]]) -> Result<u64> {
        if sql.trim().is_empty() {
            return Err(ClientError::Refused("no SQL statement given".into()));
        }
        // A single statement (the common case) goes through the statement
        // cache, so an app repeating one write does not re-parse it. The key
        // is marked so that app SQL can never pick up one of Hearth's own
        // statements, which were prepared without the authorizer.
        // Anything else (a script, or an error, which may come from a later
        // statement naming a table an earlier one creates) takes the
        // statement-by-statement path, which also reports errors precisely.
        if let Ok(mut stmt) = self.conn.prepare_cached(&format!("/* app */ {sql}")) {
            return run_statement(&self.conn, &mut stmt, param_sets);
        }
        let with_params = param_sets.len() > 1 || param_sets.iter().any(|p| !p.is_empty());
        // SQLite copies the rest of a script before parsing each statement
        // unless the text ends in a NUL inside the length it is given; with
        // the NUL, a script of n statements parses in O(n), not O(n^2).
        let script = format!("{sql}\0");
        let mut batch = rusqlite::Batch::new(&self.conn, &script);
        let mut rows_affected = 0u64;
        let mut statements = 0;
        while let Some(mut stmt) = batch.next()? {
            statements += 1;
            if with_params && statements > 1 {
                return Err(ClientError::Refused(
                    "parameters can only be given with a single SQL statement".into(),
                ));
            }
            rows_affected += run_statement(&self.conn, &mut stmt, param_sets)?;
        }
        Ok(rows_affected)
    }

    pub(super) fn exec_in_transaction(
        &mut self,
        schema: &Schema,
        sql: &str,
        params: &[&[Value]],
        now_ms: u64,
        resolving: Option<(&str, &str, &Value, &str, &Value)>,
    ) -> Result<(ExecOutcome, Vec<String>)> {
        let rows_affected = self.run_app_sql(sql, params)?;
        if let Some((id, ..)) = resolving {
            // The conflict's own row is not one of the app's rows.
            self.run_app_sql(
                &format!("DELETE FROM {CONFLICTS_TABLE} WHERE id = ?1"),
                &[&[Value::Text(id.to_string())]],
            )?;
        }
        let (mut changes, mut undo, mut tables) =
            self.collect_capture(schema).map_err(|e| match e {
                ClientError::Sql(rusqlite::Error::FromSqlConversionFailure(_, _, why)) => {
                    ClientError::Refused(format!(
                        "this write gives a synced table a value that cannot travel exactly: {why}"
                    ))
                }
                e => e,
            })?;
        if let Some((_, table, key, column, value)) = resolving {
            // Picking the value the cell already shows is a resolution too:
            // the server must see the write to close the conflict.
            let found = changes
                .iter_mut()
                .find(|c| c.table == table && c.pk == *key);
            match found {
                Some(RowChange {
                    op: RowOp::Upsert { columns, .. },
                    ..
                }) => {
                    if !columns.iter().any(|(n, _)| n == column) {
                        columns.push((column.to_string(), ColumnOp::Set(value.clone())));
                    }
                }
                Some(_) => {}
                None => {
                    let t = schema.table(table).expect("resolve checked the table");
                    let Some(row) = rows::read_row(&self.conn, t, key)? else {
                        return Err(ClientError::InvalidArgument(format!(
                            "the row of this conflict ({table} {}) is gone",
                            key.to_json()
                        )));
                    };
                    undo.push(Preimage {
                        table: table.to_string(),
                        pk: key.clone(),
                        row: Some(row),
                    });
                    changes.push(RowChange {
                        table: table.to_string(),
                        pk: key.clone(),
                        op: RowOp::Upsert {
                            insert: false,
                            columns: vec![(column.to_string(), ColumnOp::Set(value.clone()))],
                        },
                    });
                    if !tables.iter().any(|t| t == table) {
                        tables.push(table.to_string());
                    }
                }
            }
        }
        if changes.is_empty() {
            return Ok((
                ExecOutcome {
                    mutation: None,
                    rows_affected,
                },
                Vec::new(),
            ));
        }
        let seq = self.record_mutation(changes, undo, now_ms)?;
        Ok((
            ExecOutcome {
                mutation: Some(seq),
                rows_affected,
            },
            tables,
        ))
    }

    /// Writes a new pending mutation to the outbox (inside the caller's
    /// transaction); returns its sequence number.
    pub(super) fn record_mutation(
        &mut self,
        changes: Vec<RowChange>,
        undo: Vec<Preimage>,
        now_ms: u64,
    ) -> Result<u64> {
        let seq = self.next_seq;
        let mut clock = self.clock.clone();
        let hlc = clock.now(now_ms);
        let base = self.mutation_base(&changes)?;
        let mutation = Mutation {
            seq,
            hlc,
            base,
            also_seen: Vec::new(),
            changes,
            schema_version: self.schema.as_ref().map_or(0, |s| s.version),
        };
        let blob = mutation.encode();
        if blob.len() > self.config.mutation_bytes_max {
            return Err(ClientError::MutationTooLarge {
                size: blob.len(),
                max: self.config.mutation_bytes_max,
            });
        }
        let undo_blob = postcard::to_allocvec(&undo).expect("encode undo");
        self.conn
            .prepare_cached(
                "INSERT INTO _hearth_outbox (seq, hlc, mutation, undo, format) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![to_i64(seq), to_i64(hlc.0), blob, undo_blob, MUTATION_FORMAT])?;
        meta_set(&self.conn, "next_seq", to_i64(seq + 1))?;
        meta_set(&self.conn, "hlc", to_i64(hlc.0))?;
        // In-memory state moves only once the transaction commits (the
        // release itself can fail, say on a deferred foreign key): the
        // caller applies this with `commit_staged`.
        self.staged = Some((clock, mutation));
        Ok(seq)
    }

    /// Moves the in-memory state past the mutation `record_mutation` wrote,
    /// now that its transaction committed.
    pub(super) fn commit_staged(&mut self) {
        if let Some((clock, mutation)) = self.staged.take() {
            self.next_seq = mutation.seq + 1;
            self.clock = clock;
            count_rows(&mut self.pending_rows.lock(), &mutation);
            self.outbox_seqs.insert(mutation.seq);
        }
    }

    /// Turns the capture notes of the current transaction into row changes
    /// and pre-images, and clears the notes.
    pub(super) fn collect_capture(
        &self,
        schema: &Schema,
    ) -> Result<(Vec<RowChange>, Vec<Preimage>, Vec<String>)> {
        let mut changes = Vec::new();
        let mut undo = Vec::new();
        let mut tables = Vec::new();
        // Cells whose stored text is not what every device will show (a
        // set written in another order): (table, key, column, value).
        let mut rewrites: Vec<(&Table, Value, usize, Value)> = Vec::new();
        for (n, table) in schema.numbered() {
            let width = table.columns.len();
            let cur: Vec<String> = table
                .columns
                .iter()
                .map(|c| format!("t.{}", ident(&c.name)))
                .collect();
            let old: Vec<String> = table
                .columns
                .iter()
                .map(|c| format!("o.{}", ident(&c.name)))
                .collect();
            let pk = ident(table.pk_name());
            let sql = format!(
                "SELECT c.pk, c.mask, c.inserted, c.existed, t.{pk} IS NOT NULL, {}, {}
                 FROM temp._hearth_capture c
                 LEFT JOIN main.{} t ON t.{pk} = c.pk
                 LEFT JOIN {} o ON o.{pk} = c.pk
                 WHERE c.tbl = {n}",
                cur.join(", "),
                old.join(", "),
                ident(&table.name),
                shadow_table(n),
            );
            // Rows the update hook saw inserted, as they are now, in insert
            // order (a reused rowid is read once). A row also noted by a
            // trigger (say replaced, or updated after its insert) is handled
            // with its note, marked inserted; the rest are plain inserts with
            // no pre-image.
            let mut made: Vec<(Value, Vec<Value>)> = Vec::new();
            let mut made_index: HashMap<RowKey, usize> = HashMap::new();
            let rowids: Vec<i64> = {
                let log = self.inserted.lock().unwrap();
                log.order
                    .iter()
                    .filter(|(t, _)| *t as usize == n)
                    .map(|(_, r)| *r)
                    .collect()
            };
            if !rowids.is_empty() {
                let sql = format!(
                    "SELECT {} FROM main.{} WHERE rowid = ?1",
                    table
                        .columns
                        .iter()
                        .map(|c| ident(&c.name))
                        .collect::<Vec<_>>()
                        .join(", "),
                    ident(&table.name)
                );
                let mut stmt = self.conn.prepare_cached(&sql)?;
                for rowid in rowids {
                    let mut rows = stmt.query([rowid])?;
                    let Some(row) = rows.next()? else { continue }; // Deleted again.
                    let values: Vec<Value> =
                        (0..width).map(|i| row.get(i)).collect::<Result<_, _>>()?;
                    let pk = values[table.pk].clone();
                    if pk == Value::Null {
                        return Err(ClientError::Refused(format!(
                            "the primary key of synced table {} cannot be NULL",
                            table.name
                        )));
                    }
                    if let std::collections::hash_map::Entry::Vacant(e) =
                        made_index.entry(row_key(&table.name, &pk))
                    {
                        e.insert(made.len());
                        made.push((pk, values));
                    }
                }
            }
            let mut consumed = vec![false; made.len()];
            let mut stmt = self.conn.prepare_cached(&sql)?;
            // The table's number is written into the SQL, not bound: SQLite
            // re-prepares a join with a bound parameter on every run.
            let mut rows = stmt.query([])?;
            let before = changes.len();
            while let Some(row) = rows.next()? {
                let pk: Value = row.get(0)?;
                let made_here = made_index
                    .get(&row_key(&table.name, &pk))
                    .map(|i| consumed[*i] = true)
                    .is_some();
                let mask: i64 = row.get(1)?;
                let inserted: bool = row.get::<_, bool>(2)? || made_here;
                let existed: bool = row.get(3)?;
                let exists: bool = row.get(4)?;
                let current: Vec<Value> = (0..width)
                    .map(|i| row.get(5 + i))
                    .collect::<Result<_, _>>()?;
                let previous: Vec<Value> = (0..width)
                    .map(|i| row.get(5 + width + i))
                    .collect::<Result<_, _>>()?;
                let pre = existed.then(|| previous.clone());
                let op = if !exists {
                    if !existed {
                        continue; // Created and deleted within the transaction.
                    }
                    RowOp::Delete
                } else if inserted || !existed {
                    RowOp::Upsert {
                        insert: true,
                        columns: self.capture_insert(table, &pk, current, &mut rewrites)?,
                    }
                } else {
                    let changed: Vec<usize> = (0..width)
                        .filter(|i| {
                            *i != table.pk && mask & (1 << i) != 0 && current[*i] != previous[*i]
                        })
                        .collect();
                    let columns = self.capture_update(
                        table,
                        &pk,
                        &changed,
                        &previous,
                        &current,
                        &mut rewrites,
                    )?;
                    if columns.is_empty() {
                        continue; // Written back to the values it had.
                    }
                    RowOp::Upsert {
                        insert: false,
                        columns,
                    }
                };
                undo.push(Preimage {
                    table: table.name.clone(),
                    pk: pk.clone(),
                    row: pre,
                });
                changes.push(RowChange {
                    table: table.name.clone(),
                    pk,
                    op,
                });
            }
            drop(rows);
            drop(stmt);
            for (i, (pk, values)) in made.into_iter().enumerate() {
                if consumed[i] {
                    continue;
                }
                let columns = self.capture_insert(table, &pk, values, &mut rewrites)?;
                undo.push(Preimage {
                    table: table.name.clone(),
                    pk: pk.clone(),
                    row: None,
                });
                changes.push(RowChange {
                    table: table.name.clone(),
                    pk,
                    op: RowOp::Upsert {
                        insert: true,
                        columns,
                    },
                });
            }
            if changes.len() > before {
                tables.push(table.name.clone());
            }
        }
        self.clear_capture()?;
        for (table, pk, i, value) in rewrites {
            rows::update_columns(&self.conn, table, &pk, &[(i, &value)])?;
        }
        Ok((changes, undo, tables))
    }

    /// The column values of a row this transaction made, checked against
    /// their policies: a counter holds an integer, a set a JSON array of
    /// scalars (stored in canonical order), a text column starts its
    /// document.
    pub(super) fn capture_insert<'t>(
        &self,
        table: &'t Table,
        pk: &Value,
        values: Vec<Value>,
        rewrites: &mut Vec<(&'t Table, Value, usize, Value)>,
    ) -> Result<Vec<(String, ColumnOp)>> {
        let mut columns = Vec::with_capacity(values.len());
        for (i, v) in values.into_iter().enumerate() {
            if i == table.pk {
                continue;
            }
            let column = &table.columns[i];
            let v = match column.policy {
                MergePolicy::Counter => {
                    counter::capture(&column.name, &Value::Null, &v)
                        .map_err(ClientError::Refused)?;
                    v
                }
                MergePolicy::Set => {
                    let (_, _, canonical) = set::capture(&column.name, &Value::Null, &v)
                        .map_err(ClientError::Refused)?;
                    if canonical != v {
                        rewrites.push((table, pk.clone(), i, canonical.clone()));
                    }
                    canonical
                }
                MergePolicy::Text => {
                    text_of(&column.name, &v)?;
                    // The cell's document is built when first needed, from
                    // this pending insert (see `with_local_doc`); one cached
                    // for an earlier row under this key is stale.
                    if !self.local_text.borrow().is_empty() {
                        let cell = Cell {
                            table: &table.name,
                            pk,
                            column: &column.name,
                        };
                        self.local_text.borrow_mut().remove(&cell.key());
                    }
                    v
                }
                MergePolicy::Lww | MergePolicy::Manual => v,
            };
            columns.push((column.name.clone(), ColumnOp::Set(v)));
        }
        Ok(columns)
    }

    /// The column changes of an update, each as its policy captures it.
    pub(super) fn capture_update<'t>(
        &self,
        table: &'t Table,
        pk: &Value,
        changed: &[usize],
        previous: &[Value],
        current: &[Value],
        rewrites: &mut Vec<(&'t Table, Value, usize, Value)>,
    ) -> Result<Vec<(String, ColumnOp)>> {
        let mut columns = Vec::with_capacity(changed.len());
        for &i in changed {
            let column = &table.columns[i];
            let op = match column.policy {
                MergePolicy::Lww | MergePolicy::Manual => ColumnOp::Set(current[i].clone()),
                MergePolicy::Counter => {
                    match counter::capture(&column.name, &previous[i], &current[i])
                        .map_err(ClientError::Refused)?
                    {
                        Some(delta) => ColumnOp::Add(delta),
                        None => continue,
                    }
                }
                MergePolicy::Set => {
                    let (add, remove, canonical) =
                        set::capture(&column.name, &previous[i], &current[i])
                            .map_err(ClientError::Refused)?;
                    if canonical != current[i] {
                        rewrites.push((table, pk.clone(), i, canonical));
                    }
                    if add.is_empty() && remove.is_empty() {
                        continue;
                    }
                    ColumnOp::SetOps { add, remove }
                }
                MergePolicy::Text => {
                    let old = text_of(&column.name, &previous[i]).unwrap_or_default();
                    let new = text_of(&column.name, &current[i])?;
                    let cell = Cell {
                        table: &table.name,
                        pk,
                        column: &column.name,
                    };
                    let positional = self
                        .positional
                        .borrow()
                        .as_ref()
                        .filter(|(key, _)| *key == cell.key())
                        .map(|(_, edits)| edits.clone());
                    let update = match positional {
                        // `edit_text`: the editor's own positions, no diff.
                        Some(edits) => self
                            .with_local_doc(cell, &old, |doc| {
                                let update = doc.edit(&edits);
                                update.map(|u| (u, doc.text()))
                            })?
                            .map(|(u, text)| {
                                if text != new {
                                    rewrites.push((table, pk.clone(), i, Value::Text(text)));
                                }
                                u
                            })
                            .map_err(|e| ClientError::InvalidArgument(e.to_string()))?,
                        None => self.with_local_doc(cell, &old, |doc| doc.replace_with(&new))?,
                    };
                    if update.is_empty() {
                        continue;
                    }
                    ColumnOp::Text(update)
                }
            };
            columns.push((column.name.clone(), op));
        }
        Ok(columns)
    }

    /// The same document, its own edits carrying this session's text id.
    fn editable(&self, doc: TextDoc) -> TextDoc {
        TextDoc::load(&doc.state(), self.text_session).expect("a state just encoded")
    }

    /// Runs `f` on the cell's document as this device shows it: the
    /// confirmed document with the pending edits replayed (built on first
    /// use, then kept). `fallback` is the text to start from when the cell
    /// has no document at all (a value that never went through Hearth).
    pub(super) fn with_local_doc<T>(
        &self,
        cell: Cell<'_>,
        fallback: &str,
        f: impl FnOnce(&mut TextDoc) -> T,
    ) -> Result<T> {
        let key = cell.key();
        if !self.local_text.borrow().contains_key(&key) {
            let confirmed = self
                .text
                .borrow_mut()
                .get(&self.conn, cell)
                .map_err(text_failure)?
                .map(|d| d.state());
            let mut doc = confirmed
                .map(|state| TextDoc::load(&state, self.text_session).expect("a stored state"));
            for (_, mutation, _) in self.load_pending()? {
                for change in mutation
                    .changes
                    .iter()
                    .filter(|c| c.table == cell.table && c.pk == *cell.pk)
                {
                    match &change.op {
                        RowOp::Delete | RowOp::Evict => doc = None,
                        RowOp::Upsert { insert, columns } => {
                            for (name, op) in columns.iter().filter(|(n, _)| n == cell.column) {
                                match op {
                                    ColumnOp::Set(v) if *insert => {
                                        let text = text_of(name, v).unwrap_or_default();
                                        doc =
                                            Some(self.editable(TextDoc::from_text(
                                                &text,
                                                self.client_id,
                                            )));
                                    }
                                    ColumnOp::Text(u) => {
                                        if let Some(d) = doc.as_mut() {
                                            let _ = d.apply_update(u);
                                        }
                                    }
                                    _ => {}
                                }
                            }
                        }
                    }
                }
            }
            let doc = doc.unwrap_or_else(|| {
                let start = TextDoc::from_text(fallback, 0);
                self.editable(start)
            });
            self.local_text.borrow_mut().insert(key.clone(), doc);
        }
        let mut local = self.local_text.borrow_mut();
        Ok(f(local.get_mut(&key).expect("inserted above")))
    }
}
