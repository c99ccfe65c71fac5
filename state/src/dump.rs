//! A store's whole content, backend-neutral: what `authkeeper store copy` moves between redb
//! and PostgreSQL. Values are copied as stored: sealed rows stay sealed with the key that sealed
//! them (every backend binds a sealed row to the same table and key names), so a copy needs no
//! key and never holds a secret in the clear that was not already clear.

use crate::history::{self, HISTORY_LOG, HISTORY_ORPHANS, HistoryRef};
use crate::sealed_store::existing;
use crate::store::{
    CONFIG_SEEN, CONNECTIONS, FLOWS, LINKS, META, OUTBOX, PROFILE_STATE, SETTINGS, Store, StoreError, db,
};
use redb::{Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use std::fmt;

/// A row of a keyed table: its key and its value as stored.
pub type Row = (String, Vec<u8>);

/// The keyed tables every backend has, by the names sealed rows are bound to. Connection rows
/// are the record alone (a backend's own bookkeeping, such as redb's history reference, is not
/// part of a dump).
pub const TABLES: [&str; 7] = ["connections", "flows", "settings", "profile_state", "config_seen", "links", "outbox"];

/// Everything in a store except its schema version.
#[derive(Clone, Default, PartialEq)]
pub struct Dump {
    /// The rows of each of [`TABLES`], in that order, each in key order.
    pub tables: Vec<Vec<Row>>,
    /// History: each row's connection key and transition record, oldest first.
    pub history: Vec<Row>,
    /// `meta` without `schema_version`: profile numbers, the sealing key's id.
    pub meta: Vec<(String, u64)>,
}

/// Counts only: a dump holds credentials.
impl fmt::Debug for Dump {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Dump");
        for (name, rows) in TABLES.iter().zip(&self.tables) {
            d.field(name, &rows.len());
        }
        d.field("history", &self.history.len()).field("meta", &self.meta.len()).finish()
    }
}

impl Dump {
    /// The rows of table `name` (one of [`TABLES`]).
    pub fn table(&self, name: &str) -> &[Row] {
        TABLES.iter().position(|t| *t == name).and_then(|i| self.tables.get(i)).map_or(&[], Vec::as_slice)
    }

    /// How many rows it holds, all tables together.
    pub fn rows(&self) -> usize {
        self.tables.iter().map(Vec::len).sum::<usize>() + self.history.len() + self.meta.len()
    }
}

fn definition(name: &str) -> TableDefinition<'static, &'static str, &'static [u8]> {
    match name {
        "connections" => CONNECTIONS,
        "flows" => FLOWS,
        "settings" => SETTINGS,
        "profile_state" => PROFILE_STATE,
        "config_seen" => CONFIG_SEEN,
        "links" => LINKS,
        _ => OUTBOX,
    }
}

impl Store {
    /// Everything in the store, as stored.
    pub fn export(&self) -> Result<Dump, StoreError> {
        let mut dump = Dump::default();
        for name in TABLES {
            let mut rows = self.all_rows(definition(name))?;
            if name == "connections" {
                for (key, value) in &mut rows {
                    let record = HistoryRef::split(key, value)?.1.to_vec();
                    *value = record;
                }
            }
            dump.tables.push(rows);
        }
        let txn = self.db.begin_read().map_err(db)?;
        if let Some(log) = existing(txn.open_table(HISTORY_LOG))? {
            for row in log.iter().map_err(db)? {
                let (seq, value) = row.map_err(db)?;
                let (conn, transition) = history::split_row(seq.value(), value.value())?;
                dump.history.push((conn.to_owned(), transition.to_vec()));
            }
        }
        for row in txn.open_table(META).map_err(db)?.iter().map_err(db)? {
            let (name, value) = row.map_err(db)?;
            if name.value() != "schema_version" {
                dump.meta.push((name.value().to_owned(), value.value()));
            }
        }
        Ok(dump)
    }

    /// Write `dump` into this store, which must hold nothing yet, in one durable transaction.
    pub fn import(&self, dump: &Dump) -> Result<(), StoreError> {
        if !self.is_empty()? {
            return Err(StoreError::NotEmpty);
        }
        let mut txn = self.db.begin_write().map_err(db)?;
        txn.set_durability(Durability::Immediate).map_err(db)?;
        {
            let mut refs = std::collections::BTreeMap::<&str, HistoryRef>::new();
            let mut log = txn.open_table(HISTORY_LOG).map_err(db)?;
            for (seq, (conn, transition)) in (1..).zip(&dump.history) {
                let r = refs.entry(conn).or_default();
                log.insert(seq, history::join_row(r.head, conn, transition).as_slice()).map_err(db)?;
                *r = HistoryRef { head: seq, count: r.count + 1 };
            }
            for (name, rows) in TABLES.iter().zip(&dump.tables) {
                let mut table = txn.open_table(definition(name)).map_err(db)?;
                for (key, value) in rows {
                    let value = match *name == "connections" {
                        true => refs.remove(key.as_str()).unwrap_or_default().join(value),
                        false => value.clone(),
                    };
                    table.insert(key.as_str(), value.as_slice()).map_err(db)?;
                }
            }
            // History of connections that were forgotten.
            let mut orphans = txn.open_table(HISTORY_ORPHANS).map_err(db)?;
            for (conn, r) in refs {
                orphans.insert(conn, r.encode().as_slice()).map_err(db)?;
            }
            let mut meta = txn.open_table(META).map_err(db)?;
            for (name, value) in &dump.meta {
                meta.insert(name.as_str(), *value).map_err(db)?;
            }
        }
        txn.commit().map_err(db)
    }

    /// Whether the store holds no row besides its schema version.
    fn is_empty(&self) -> Result<bool, StoreError> {
        let txn = self.db.begin_read().map_err(db)?;
        for name in TABLES {
            if existing(txn.open_table(definition(name)))?
                .map_or(Ok(false), |t| t.is_empty().map(|e| !e))
                .map_err(db)?
            {
                return Ok(false);
            }
        }
        let log = existing(txn.open_table(HISTORY_LOG))?.map_or(Ok(true), |t| t.is_empty()).map_err(db)?;
        Ok(log && txn.open_table(META).map_err(db)?.len().map_err(db)? <= 1)
    }
}
