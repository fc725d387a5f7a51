//! Where `text` cells keep their CRDT documents: beside the rows, in
//! `_hearth_text`, on the server and on every device.
//!
//! A cell's document is stored as a state (`n = 0`) plus the updates applied
//! since (`n = 1, 2, ...`), so an edit appends a few bytes instead of
//! rewriting the document; after [`COMPACT_AFTER`] updates they are folded
//! into a new state. Decoded documents are cached in memory; the cache is
//! dropped whenever a transaction that may have touched it rolls back.
//! yrs garbage-collects deleted text, so a state holds the live text plus
//! compact ranges for deleted items (see `merge::text`).

use std::collections::HashMap;

use rusqlite::{params, Connection};

use crate::merge::text::{TextDoc, TextError};
use crate::value::Value;

pub(crate) const TEXT_TABLE: &str = "
CREATE TABLE IF NOT EXISTS _hearth_text (
  tbl  TEXT NOT NULL,
  pk   NOT NULL,
  col  TEXT NOT NULL,
  n    INTEGER NOT NULL,
  data BLOB NOT NULL,
  PRIMARY KEY (tbl, pk, col, n)
) WITHOUT ROWID;";

/// Updates stored after a cell's state before they are folded into it.
pub(crate) const COMPACT_AFTER: i64 = 256;

/// A text cell: table, primary key, column.
#[derive(Clone, Copy)]
pub(crate) struct Cell<'a> {
    pub table: &'a str,
    pub pk: &'a Value,
    pub column: &'a str,
}

impl Cell<'_> {
    pub fn key(&self) -> String {
        format!("{}\0{}\0{}", self.table, self.pk.to_json(), self.column)
    }
}

/// Stored documents, with a cache of decoded ones.
#[derive(Default)]
pub(crate) struct TextCells {
    /// key -> (document, number of the next update row).
    cache: HashMap<String, (TextDoc, i64)>,
    /// The client id this side's own edits carry (0 on the server).
    own: u64,
}

/// A store error, or a refused update.
pub(crate) enum TextFailure {
    Sql(rusqlite::Error),
    Text(TextError),
}

impl From<rusqlite::Error> for TextFailure {
    fn from(e: rusqlite::Error) -> Self {
        TextFailure::Sql(e)
    }
}

impl TextCells {
    pub fn new(own: u64) -> TextCells {
        TextCells {
            cache: HashMap::new(),
            own,
        }
    }

    pub fn set_own(&mut self, own: u64) {
        if self.own != own {
            self.own = own;
            self.cache.clear();
        }
    }

    /// Forgets every decoded document (after a rollback).
    pub fn clear_cache(&mut self) {
        self.cache.clear();
    }

    /// The cell's document, if it has one.
    pub fn get(
        &mut self,
        conn: &Connection,
        cell: Cell<'_>,
    ) -> Result<Option<&mut TextDoc>, TextFailure> {
        let key = cell.key();
        if !self.cache.contains_key(&key) {
            let mut stmt = conn.prepare_cached(
                "SELECT n, data FROM _hearth_text WHERE tbl = ?1 AND pk = ?2 AND col = ?3 ORDER BY n",
            )?;
            let mut rows = stmt.query(params![cell.table, cell.pk, cell.column])?;
            let mut doc: Option<TextDoc> = None;
            let mut next = 1;
            while let Some(row) = rows.next()? {
                let n: i64 = row.get(0)?;
                let data: Vec<u8> = row.get(1)?;
                match doc.as_mut() {
                    None => doc = Some(TextDoc::load(&data, self.own).map_err(TextFailure::Text)?),
                    Some(d) => d.apply_update(&data).map_err(TextFailure::Text)?,
                }
                next = n + 1;
            }
            let Some(doc) = doc else { return Ok(None) };
            self.cache.insert(key.clone(), (doc, next));
        }
        Ok(self.cache.get_mut(&key).map(|(d, _)| d))
    }

    /// Makes the cell's document hold exactly `text`, as written by
    /// `author` (an inserted row): every side builds the same document.
    pub fn reset(
        &mut self,
        conn: &Connection,
        cell: Cell<'_>,
        text: &str,
        author: u64,
    ) -> rusqlite::Result<()> {
        let doc = TextDoc::from_text(text, author);
        let doc = TextDoc::load(&doc.state(), self.own).expect("a state we just encoded");
        self.store_state(conn, cell, &doc)?;
        self.cache.insert(cell.key(), (doc, 1));
        Ok(())
    }

    fn store_state(
        &self,
        conn: &Connection,
        cell: Cell<'_>,
        doc: &TextDoc,
    ) -> rusqlite::Result<()> {
        self.remove(conn, cell)?;
        conn.prepare_cached(
            "INSERT INTO _hearth_text (tbl, pk, col, n, data) VALUES (?1, ?2, ?3, 0, ?4)",
        )?
        .execute(params![cell.table, cell.pk, cell.column, doc.state()])?;
        Ok(())
    }

    /// Drops the cell's document (its row is gone).
    pub fn remove(&self, conn: &Connection, cell: Cell<'_>) -> rusqlite::Result<()> {
        conn.prepare_cached("DELETE FROM _hearth_text WHERE tbl = ?1 AND pk = ?2 AND col = ?3")?
            .execute(params![cell.table, cell.pk, cell.column])?;
        Ok(())
    }

    /// Applies an update to the cell's document, starting it from `current`
    /// (the column's plain text) when it has none; returns the new text.
    pub fn apply(
        &mut self,
        conn: &Connection,
        cell: Cell<'_>,
        update: &[u8],
        current: &str,
    ) -> Result<String, TextFailure> {
        if self.get(conn, cell)?.is_none() {
            self.reset(conn, cell, current, 0)?;
        }
        let key = cell.key();
        let (doc, next) = self.cache.get_mut(&key).expect("loaded above");
        doc.apply_update(update).map_err(TextFailure::Text)?;
        let text = doc.text();
        if *next > COMPACT_AFTER {
            let (doc, _) = self.cache.remove(&key).expect("present");
            self.store_state(conn, cell, &doc)?;
            self.cache.insert(key, (doc, 1));
        } else {
            conn.prepare_cached(
                "INSERT INTO _hearth_text (tbl, pk, col, n, data) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![cell.table, cell.pk, cell.column, *next, update])?;
            *next += 1;
        }
        Ok(text)
    }
}
