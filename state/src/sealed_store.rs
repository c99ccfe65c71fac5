//! Sealing the store's secret-holding rows: which tables, the key id kept in `meta`, and
//! resealing on open (a clear store sealed, a previous key's rows rotated to the current key).
//! The free functions are the rules every backend follows, so that a sealed row reads the same
//! whichever store holds it (`store copy` moves sealed rows as they are).

use crate::history::{HISTORY_LOG, HISTORY_ORPHANS, HistoryRef};
use crate::seal::{SealError, Sealer, is_sealed};
use crate::store::{
    CONFIG_SEEN, CONNECTIONS, FLOWS, LINKS, META, OUTBOX, PROFILE_STATE, SETTINGS, Store, StoreError, db,
};
use redb::{Durability, ReadableDatabase, ReadableTable, TableDefinition, TableHandle};
use std::borrow::Cow;
use std::collections::BTreeSet;
use std::path::Path;

/// The tables whose rows hold secrets: sealed when the store has a key.
const SEALED_TABLES: [TableDefinition<&str, &[u8]>; 5] = [CONNECTIONS, FLOWS, SETTINGS, PROFILE_STATE, OUTBOX];
/// Their names, which every backend uses for the same rows.
pub const SEALED_TABLE_NAMES: [&str; 5] = ["connections", "flows", "settings", "profile_state", "outbox"];
/// The `meta` row that holds the id of the key that sealed the store.
pub const KEY_ID: &str = "secrets_key_id";

/// What a sealed row is bound to: its table and key, so no row passes for another.
fn row_id(table: &str, key: &str) -> String {
    format!("{table}/{key}")
}

/// Whether a store whose secrets were sealed with key `found` (`None`: clear) must be resealed
/// before use with `sealer`. Errors when it cannot be used at all with the keys given.
pub fn reseal_needed(found: Option<u64>, sealer: Option<&Sealer>) -> Result<bool, StoreError> {
    match (found, sealer) {
        (None, None) => Ok(false),
        (Some(id), None) => Err(StoreError::KeyNeeded { id: format!("{id:016x}") }),
        (Some(id), Some(s)) if id == s.current.id() => Ok(false),
        (Some(id), Some(s)) if s.key(id).is_none() => {
            Err(StoreError::WrongKey { found: format!("{id:016x}"), given: s.current.id_hex() })
        }
        (_, Some(_)) => Ok(true),
    }
}

/// Row `key` of `table` as written: sealed when there is a sealer.
pub fn seal_value(sealer: Option<&Sealer>, table: &str, key: &str, plain: Vec<u8>) -> Vec<u8> {
    match sealer {
        Some(s) => s.seal(&row_id(table, key), &plain),
        None => plain,
    }
}

/// Row `key` of `table` as read: opened when sealed.
pub fn open_value<'a>(
    sealer: Option<&Sealer>,
    table: &str,
    key: &str,
    value: &'a [u8],
) -> Result<Cow<'a, [u8]>, StoreError> {
    if !is_sealed(value) {
        return Ok(Cow::Borrowed(value));
    }
    let sealed = |source| StoreError::Sealed { key: key.to_owned(), source };
    match sealer {
        Some(s) => s.open(&row_id(table, key), value).map(Cow::Owned).map_err(sealed),
        None => Err(sealed(SealError::UnknownKey { found: "(none given)".into() })),
    }
}

/// A table of the old file, or `None` when it was never created.
pub(crate) fn existing<T>(opened: Result<T, redb::TableError>) -> Result<Option<T>, StoreError> {
    match opened {
        Ok(table) => Ok(Some(table)),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(db(e)),
    }
}

impl Store {
    /// The id of the key that sealed the store's secrets, if they are sealed.
    pub fn sealed_with(&self) -> Result<Option<u64>, StoreError> {
        let txn = self.db.begin_read().map_err(db)?;
        Ok(txn.open_table(META).map_err(db)?.get(KEY_ID).map_err(db)?.map(|v| v.value()))
    }

    /// Whether the store must be resealed before use: it is clear, or sealed with a previous
    /// key. Errors when it cannot be used at all with the keys given.
    pub(crate) fn needs_reseal(&self) -> Result<bool, StoreError> {
        reseal_needed(self.sealed_with()?, self.sealer.as_deref())
    }

    /// Copy every table into a new file beside `path`, the secret-holding rows sealed with the
    /// current key, then rename it over `path`. A table this build does not know stops it (the
    /// old file is kept): nothing is left behind.
    pub(crate) fn reseal_into(&self, path: &Path) -> Result<(), StoreError> {
        let sealer = self.sealer.as_deref().expect("resealing needs a key");
        let known: BTreeSet<&str> = SEALED_TABLES
            .iter()
            .chain([&CONFIG_SEEN, &LINKS, &HISTORY_ORPHANS])
            .map(|d| d.name())
            .chain([HISTORY_LOG.name(), META.name()])
            .collect();
        let old = self.db.begin_read().map_err(db)?;
        for table in old.list_tables().map_err(db)? {
            if !known.contains(table.name()) {
                return Err(StoreError::UnknownTable(table.name().to_owned()));
            }
        }
        let tmp = path.with_extension("redb.sealing");
        // Left by an earlier attempt that died: this daemon's own file.
        let _ = std::fs::remove_file(&tmp);
        let new = Store::open_file(&tmp, None)?;
        let mut txn = new.db.begin_write().map_err(db)?;
        txn.set_durability(Durability::Immediate).map_err(db)?;
        for def in SEALED_TABLES.into_iter().chain([CONFIG_SEEN, LINKS, HISTORY_ORPHANS]) {
            let seal = SEALED_TABLES.iter().any(|d| d.name() == def.name());
            let mut to = txn.open_table(def).map_err(db)?;
            let Some(from) = existing(old.open_table(def))? else { continue };
            for row in from.iter().map_err(db)? {
                let (k, v) = row.map_err(db)?;
                let key = k.value();
                // A connection row starts with its clear history reference.
                let (history, record) = match def.name() == CONNECTIONS.name() {
                    true => {
                        let (r, record) = HistoryRef::split(key, v.value())?;
                        (Some(r), record)
                    }
                    false => (None, v.value()),
                };
                let value = match seal {
                    true => sealer.seal(&row_id(def.name(), key), &self.open_row(def, key, record)?),
                    false => record.to_vec(),
                };
                let value = history.map_or(value.clone(), |r| r.join(&value));
                to.insert(key, value.as_slice()).map_err(db)?;
            }
        }
        let mut to = txn.open_table(HISTORY_LOG).map_err(db)?;
        if let Some(from) = existing(old.open_table(HISTORY_LOG))? {
            for row in from.iter().map_err(db)? {
                let (k, v) = row.map_err(db)?;
                to.insert(k.value(), v.value()).map_err(db)?;
            }
        }
        drop(to);
        let mut to = txn.open_table(META).map_err(db)?;
        if let Some(from) = existing(old.open_table(META))? {
            for row in from.iter().map_err(db)? {
                let (k, v) = row.map_err(db)?;
                to.insert(k.value(), v.value()).map_err(db)?;
            }
        }
        to.insert(KEY_ID, sealer.current.id()).map_err(db)?;
        drop(to);
        txn.commit().map_err(db)?;
        drop(new);
        let io = |source| StoreError::File { path: path.display().to_string(), source };
        std::fs::rename(&tmp, path).map_err(io)?;
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
        }
        Ok(())
    }

    /// A secret-holding row's value as written: sealed when the store has a key.
    pub(crate) fn seal_row(&self, def: TableDefinition<&str, &[u8]>, key: &str, plain: Vec<u8>) -> Vec<u8> {
        seal_value(self.sealer.as_deref(), def.name(), key, plain)
    }

    /// A secret-holding row's value as read: opened when sealed.
    pub(crate) fn open_row<'a>(
        &self,
        def: TableDefinition<&str, &[u8]>,
        key: &str,
        value: &'a [u8],
    ) -> Result<Cow<'a, [u8]>, StoreError> {
        open_value(self.sealer.as_deref(), def.name(), key, value)
    }
}
