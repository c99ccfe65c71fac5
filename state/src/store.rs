//! The redb store: connections, their history, pending flows, the settings each connection was
//! last declared with, per-profile provider state, and metadata. Values are the versioned
//! records of [`crate::records`].
//!
//! Every write of connections is a batch ([`Store::commit`]): one write transaction,
//! `Durability::Immediate`, carrying any number of connections' new states and history rows, so
//! the daemon can group commits. Nothing is acknowledged before `commit` returns.
//!
//! The daemon sees the store through [`crate::interface::ConnectionStore`], a narrow interface
//! that a second backend can implement.

use crate::grant::ProfileState;
use crate::history::{self, HISTORY_LOG, HISTORY_ORPHANS, HistoryRef, OLD_HISTORY};
use crate::machine::StateName;
use crate::machine::{ConnKey, Machine, Transition};
use crate::records::{self, RecordError};
use crate::seal::{SealError, Sealer};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use std::collections::HashMap;
use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;

mod load;

/// `provider/profile` → the connection's [`HistoryRef`], then its record (state and data,
/// flow excluded).
pub(crate) const CONNECTIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("connections");
/// `provider/profile` → the pending flow's record, present exactly while a flow is pending.
pub(crate) const FLOWS: TableDefinition<&str, &[u8]> = TableDefinition::new("flows");
/// `schema_version`; `profiles/<provider>`: the highest profile number ever allocated;
/// `secrets_key_id`: the id of the key that sealed the secrets, when they are sealed.
pub(crate) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// `provider/profile` → a digest of the credential last read from or written to config.json,
/// so that only a credential the user changed there counts as newly supplied.
pub(crate) const CONFIG_SEEN: TableDefinition<&str, &[u8]> = TableDefinition::new("config_seen");
/// `provider/profile` → the settings the config last declared it with (opaque bytes), present
/// exactly for connections a config declared. They stay in force while no good config is read.
pub(crate) const SETTINGS: TableDefinition<&str, &[u8]> = TableDefinition::new("settings");
/// `provider/profile` → the provider's [`ProfileState`] record; outlives the connection.
pub(crate) const PROFILE_STATE: TableDefinition<&str, &[u8]> = TableDefinition::new("profile_state");
/// A one-time login link's public id → its [`crate::links::LinkRecord`].
pub(crate) const LINKS: TableDefinition<&str, &[u8]> = TableDefinition::new("links");
/// Webhook deliveries not yet acknowledged, by a time-ordered id (see `outbox.rs`).
pub(crate) const OUTBOX: TableDefinition<&str, &[u8]> = TableDefinition::new("outbox");

/// The schema this build writes. Older files are migrated on open; newer ones are refused.
/// 1: tables; 2: `config_seen`; 3: versioned records, `settings`, `profile_state`;
/// 4: the append-ordered history log.
pub const SCHEMA_VERSION: u64 = 4;
pub use crate::history::HISTORY_LIMIT;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("cannot create the database file {path}: {source}")]
    File { path: String, source: std::io::Error },
    #[error("database error: {0}")]
    Db(#[from] redb::Error),
    #[error("the database was written by a newer authkeeper (schema {found}, this build knows {supported})")]
    TooNew { found: u64, supported: u64 },
    #[error("every {0} profile number is taken: the highest one in use is the largest there is")]
    NoProfileNumber(String),
    #[error("stored row for {key} is unreadable: {source}")]
    Corrupt { key: String, source: RecordError },
    #[error(
        "the store's secrets are encrypted (key {id}): give that key with --secrets-key-file, \
         AUTHKEEPER_SECRETS_KEY or the systemd credential secrets_key; nothing was changed"
    )]
    KeyNeeded { id: String },
    #[error(
        "the store's secrets were encrypted with key {found}, not with the key given ({given}): give \
         key {found} (as the previous key, to rotate to the new one); nothing was changed"
    )]
    WrongKey { found: String, given: String },
    #[error("stored row for {key}: {source}")]
    Sealed { key: String, source: SealError },
    #[error("the store has a table this build does not know ({0}): it cannot be resealed; nothing was changed")]
    UnknownTable(String),
    #[error("the store to copy into is not empty: nothing was changed")]
    NotEmpty,
    #[error("another authkeeper is using the store: stop it first")]
    InUse,
    #[error(
        "this authkeeper no longer holds the store (its claim's connection was lost, or another \
         daemon took it over): it writes nothing more; restart it"
    )]
    NotOwner,
    /// Connections whose lease another daemon holds: their changes were not written (the rest
    /// of the batch was).
    #[error("another daemon holds the lease of {}: its changes were not written", .0.join(", "))]
    NotOwnerOf(Vec<String>),
    /// Another backend's own error (PostgreSQL's).
    #[error("{0}")]
    Backend(Box<dyn std::error::Error + Send + Sync>),
}

/// A stored connection: its machine. The settings a config declared it with are asked for
/// apart ([`crate::ConnectionStore::settings_digests`], [`crate::ConnectionStore::settings`]):
/// a start reads them for the few connections whose fate depends on them, and compares the
/// rest once it answers.
/// The machine is on the heap from the start: the daemon keeps it there, and a start at scale
/// should not move 100,000 machines of 320 bytes through one vector after another.
pub struct Stored {
    /// The machine's key, copied beside it: matching 100,000 connections to their profiles
    /// then reads one vector in order instead of 100,000 machines scattered over the heap.
    pub key: crate::ConnKey,
    pub machine: std::sync::Arc<Machine>,
}

/// A digest of a profile's declared settings, to tell in this process whether a config
/// declares what the store holds without keeping the settings in memory. Never stored: a
/// digest that must agree across processes or releases is [`settings_digest`]'s.
pub fn declared_digest(bytes: &[u8]) -> u64 {
    use std::hash::BuildHasher;
    foldhash::fast::FixedState::with_seed(0).hash_one(bytes)
}

/// A digest (FNV-1a) that every daemon and release computes alike: it picks lease shares and
/// history limits, so it must not change. Settings compared within one process use the faster
/// [`declared_digest`].
pub fn settings_digest(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

/// A `provider/profile` row key as a connection key.
pub fn parse_key(key: &str) -> ConnKey {
    let (provider, profile) = key.split_once('/').unwrap_or((key, ""));
    ConnKey::new(provider, profile)
}

pub(crate) fn db<E: Into<redb::Error>>(e: E) -> StoreError {
    StoreError::Db(e.into())
}

/// One connection's committed change: its new machine and, if the step made one, a history row.
pub struct Commit {
    pub machine: Machine,
    pub transition: Option<Transition>,
}

/// The store. Cheap to clone; redb serialises writers, readers never block.
#[derive(Clone)]
pub struct Store {
    pub(crate) db: Arc<Database>,
    /// Seals the secret-holding rows, when the store is encrypted.
    pub(crate) sealer: Option<Arc<Sealer>>,
}

/// redb's page cache. Its default (a gigabyte) would keep every page read at start-up resident
/// for good; the daemon reads the whole store once, then serves reads from memory, so a small
/// cache costs nothing and keeps memory flat as connections grow.
const CACHE_BYTES: usize = 8 << 20;

impl Store {
    /// Every row of a `&str → bytes` table, in key order (none when it was never created).
    pub(crate) fn all_rows(&self, def: TableDefinition<&str, &[u8]>) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let txn = self.db.begin_read().map_err(db)?;
        let table = match txn.open_table(def) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(db(e)),
        };
        let mut out = Vec::new();
        for row in table.iter().map_err(db)? {
            let (key, value) = row.map_err(db)?;
            out.push((key.value().to_owned(), value.value().to_vec()));
        }
        Ok(out)
    }

    /// Open (or create, mode 0600) the database at `path` and migrate it.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_sealed(path, None)
    }

    /// [`Store::open`], with the secrets sealed by `sealer`. A store sealed with a previous key
    /// of `sealer` is resealed with its current key, and a clear one sealed, by writing a new
    /// file and renaming it over the old one (so no page of the old file survives, clear text
    /// or old key); a store sealed with a key not given, or holding secrets sealed while no key
    /// is given, is refused and left as it was.
    pub fn open_sealed(path: &Path, sealer: Option<Sealer>) -> Result<Self, StoreError> {
        let store = Self::open_file(path, sealer.clone())?;
        if !store.needs_reseal()? {
            return Ok(store);
        }
        store.reseal_into(path)?;
        drop(store);
        let store = Self::open_file(path, sealer)?;
        debug_assert!(!store.needs_reseal()?);
        Ok(store)
    }

    /// Open (or create) the file and migrate it, leaving sealed rows as they are and checking no
    /// key: for `store copy`, which moves rows as stored.
    pub fn open_as_is(path: &Path) -> Result<Self, StoreError> {
        Self::open_file(path, None)
    }

    /// Open (or create) the file and migrate it; sealing is left to the caller.
    pub(crate) fn open_file(path: &Path, sealer: Option<Sealer>) -> Result<Self, StoreError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(|source| StoreError::File { path: path.display().to_string(), source })?;
        let backend = redb::backends::FileBackend::new(file).map_err(db)?;
        let db = Database::builder().set_cache_size(CACHE_BYTES).create_with_backend(backend).map_err(db)?;
        Self::init(db, sealer)
    }

    /// A store that lives in memory only (tests and benchmarks).
    pub fn in_memory() -> Result<Self, StoreError> {
        let db = Database::builder().create_with_backend(redb::backends::InMemoryBackend::new()).map_err(db)?;
        Self::init(db, None)
    }

    fn init(db: Database, sealer: Option<Sealer>) -> Result<Self, StoreError> {
        let store = Self { db: Arc::new(db), sealer: sealer.map(Arc::new) };
        store.migrate()?;
        Ok(store)
    }

    /// The schema version in the file (0 for a new file).
    pub fn schema_version(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_read().map_err(db)?;
        match txn.open_table(META) {
            Ok(meta) => Ok(meta.get("schema_version").map_err(db)?.map_or(0, |v| v.value())),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(0),
            Err(e) => Err(db(e)),
        }
    }

    fn migrate(&self) -> Result<(), StoreError> {
        let found = self.schema_version()?;
        if found > SCHEMA_VERSION {
            return Err(StoreError::TooNew { found, supported: SCHEMA_VERSION });
        }
        if found == SCHEMA_VERSION {
            return Ok(());
        }
        // Each step migrates from the version before it, all in one transaction.
        let txn = self.db.begin_write().map_err(db)?;
        if found < 1 {
            txn.open_table(CONNECTIONS).map_err(db)?;
            txn.open_table(OLD_HISTORY).map_err(db)?;
            txn.open_table(FLOWS).map_err(db)?;
        }
        if found < 2 {
            txn.open_table(CONFIG_SEEN).map_err(db)?;
        }
        if found < 3 {
            txn.open_table(SETTINGS).map_err(db)?;
            txn.open_table(PROFILE_STATE).map_err(db)?;
            rewrite_records(&txn)?;
        }
        if found < 4 {
            txn.open_table(HISTORY_ORPHANS).map_err(db)?;
            let mut refs = history::migrate(&txn)?;
            let mut conns = txn.open_table(CONNECTIONS).map_err(db)?;
            let mut rows = Vec::new();
            for row in conns.iter().map_err(db)? {
                let (k, v) = row.map_err(db)?;
                let r = refs.remove(k.value()).unwrap_or_default();
                rows.push((k.value().to_owned(), r.join(v.value())));
            }
            for (key, row) in rows {
                conns.insert(key.as_str(), row.as_slice()).map_err(db)?;
            }
            // History of connections that were forgotten.
            let mut orphans = txn.open_table(HISTORY_ORPHANS).map_err(db)?;
            for (key, r) in refs {
                orphans.insert(key.as_str(), r.encode().as_slice()).map_err(db)?;
            }
        }
        txn.open_table(META).map_err(db)?.insert("schema_version", SCHEMA_VERSION).map_err(db)?;
        txn.commit().map_err(db)?;
        Ok(())
    }

    /// Commit a batch of connections' changes in one durable write transaction.
    pub fn commit(&self, batch: &[Commit]) -> Result<(), StoreError> {
        let mut txn = self.db.begin_write().map_err(db)?;
        txn.set_durability(Durability::Immediate).map_err(db)?;
        {
            let mut conns = txn.open_table(CONNECTIONS).map_err(db)?;
            let mut flows = txn.open_table(FLOWS).map_err(db)?;
            let mut log = txn.open_table(HISTORY_LOG).map_err(db)?;
            let mut orphans = txn.open_table(HISTORY_ORPHANS).map_err(db)?;
            let mut seq = history::next_sequence(&log)?;
            for c in batch {
                let key = c.machine.key().to_string();
                let was = match conns.get(key.as_str()).map_err(db)? {
                    Some(row) => HistoryRef::split(&key, row.value())?.0,
                    // A new connection, or one forgotten earlier whose history is kept.
                    None => match orphans.remove(key.as_str()).map_err(db)? {
                        Some(r) => HistoryRef::split(&key, r.value())?.0,
                        None => HistoryRef::default(),
                    },
                };
                let now = match &c.transition {
                    Some(t) => {
                        seq += 1;
                        history::append(&mut log, seq - 1, &key, was, t)?
                    }
                    None => was,
                };
                let record = self.seal_row(CONNECTIONS, &key, records::encode_connection(&c.machine));
                conns.insert(key.as_str(), now.join(&record).as_slice()).map_err(db)?;
                match &c.machine.connection().flow {
                    Some(flow) => {
                        let row = self.seal_row(FLOWS, &key, records::encode_flow(flow));
                        flows.insert(key.as_str(), row.as_slice()).map_err(db)?;
                    }
                    // A flow ends only with a step out of pending.
                    None if c.transition.as_ref().is_some_and(|t| t.from == StateName::Pending) => {
                        flows.remove(key.as_str()).map_err(db)?;
                    }
                    None => {}
                }
            }
        }
        txn.commit().map_err(db)?;
        Ok(())
    }

    /// Drop a removed connection's state and flow; its history stays.
    pub fn forget(&self, key: &ConnKey) -> Result<(), StoreError> {
        let key = key.to_string();
        let txn = self.db.begin_write().map_err(db)?;
        let row =
            txn.open_table(CONNECTIONS).map_err(db)?.remove(key.as_str()).map_err(db)?.map(|r| r.value().to_vec());
        if let Some(row) = row {
            let (r, _) = HistoryRef::split(&key, &row)?;
            if r.head != 0 {
                txn.open_table(HISTORY_ORPHANS).map_err(db)?.insert(key.as_str(), r.encode().as_slice()).map_err(db)?;
            }
        }
        txn.open_table(FLOWS).map_err(db)?.remove(key.as_str()).map_err(db)?;
        txn.open_table(CONFIG_SEEN).map_err(db)?.remove(key.as_str()).map_err(db)?;
        txn.open_table(SETTINGS).map_err(db)?.remove(key.as_str()).map_err(db)?;
        txn.commit().map_err(db)?;
        Ok(())
    }

    /// Every declared connection's stored settings.
    pub fn settings(&self) -> Result<Vec<(ConnKey, Vec<u8>)>, StoreError> {
        let txn = self.db.begin_read().map_err(db)?;
        let table = txn.open_table(SETTINGS).map_err(db)?;
        let mut out = Vec::new();
        for row in table.iter().map_err(db)? {
            let (k, v) = row.map_err(db)?;
            out.push((parse_key(k.value()), self.open_row(SETTINGS, k.value(), v.value())?.into_owned()));
        }
        Ok(out)
    }

    /// The digest ([`declared_digest`]) of the settings stored for each of `keys`, in their
    /// order (`None`: none are).
    pub fn settings_digests(&self, keys: &[ConnKey]) -> Result<Vec<Option<u64>>, StoreError> {
        let txn = self.db.begin_read().map_err(db)?;
        let table = txn.open_table(SETTINGS).map_err(db)?;
        keys.iter()
            .map(|key| {
                let key = key.to_string();
                match table.get(key.as_str()).map_err(db)? {
                    Some(v) => Ok(Some(declared_digest(&self.open_row(SETTINGS, &key, v.value())?))),
                    None => Ok(None),
                }
            })
            .collect()
    }

    /// Record (or with `None` clear) the settings connections are declared with, durably.
    pub fn set_settings(&self, rows: &[(ConnKey, Option<Arc<[u8]>>)]) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        let txn = self.db.begin_write().map_err(db)?;
        {
            let mut table = txn.open_table(SETTINGS).map_err(db)?;
            for (key, value) in rows {
                let key = key.to_string();
                match value {
                    Some(v) => {
                        table.insert(key.as_str(), self.seal_row(SETTINGS, &key, v.to_vec()).as_slice()).map_err(db)?
                    }
                    None => table.remove(key.as_str()).map_err(db)?,
                };
            }
        }
        txn.commit().map_err(db)?;
        Ok(())
    }

    /// Every profile's provider state.
    pub fn profile_states(&self) -> Result<Vec<(ConnKey, ProfileState)>, StoreError> {
        let txn = self.db.begin_read().map_err(db)?;
        let table = txn.open_table(PROFILE_STATE).map_err(db)?;
        let mut out = Vec::new();
        for row in table.iter().map_err(db)? {
            let (k, v) = row.map_err(db)?;
            let state = records::decode_profile_state(&self.open_row(PROFILE_STATE, k.value(), v.value())?)
                .map_err(|source| StoreError::Corrupt { key: k.value().to_owned(), source })?;
            out.push((parse_key(k.value()), state));
        }
        Ok(out)
    }

    /// Save profiles' provider state, durably, in one transaction.
    pub fn set_profile_states(&self, states: &[(ConnKey, ProfileState)]) -> Result<(), StoreError> {
        let mut txn = self.db.begin_write().map_err(db)?;
        txn.set_durability(Durability::Immediate).map_err(db)?;
        {
            let mut table = txn.open_table(PROFILE_STATE).map_err(db)?;
            for (key, state) in states {
                let key = key.to_string();
                let row = self.seal_row(PROFILE_STATE, &key, records::encode_profile_state(state));
                table.insert(key.as_str(), row.as_slice()).map_err(db)?;
            }
        }
        txn.commit().map_err(db)?;
        Ok(())
    }

    /// The digest of the credential last seen in config.json for `key`.
    pub fn config_seen(&self, key: &ConnKey) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.db.begin_read().map_err(db)?;
        let table = txn.open_table(CONFIG_SEEN).map_err(db)?;
        Ok(table.get(key.to_string().as_str()).map_err(db)?.map(|v| v.value().to_vec()))
    }

    pub fn set_config_seen(&self, key: &ConnKey, digest: &[u8]) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(db)?;
        txn.open_table(CONFIG_SEEN).map_err(db)?.insert(key.to_string().as_str(), digest).map_err(db)?;
        txn.commit().map_err(db)?;
        Ok(())
    }

    /// Allocate the next profile number for `provider`: one above both the highest ever
    /// allocated and `in_use` (the highest the config holds). Never reused.
    pub fn allocate_profile(&self, provider: &str, in_use: u64) -> Result<u64, StoreError> {
        let name = format!("profiles/{provider}");
        let txn = self.db.begin_write().map_err(db)?;
        let next = {
            let mut meta = txn.open_table(META).map_err(db)?;
            let highest = meta.get(name.as_str()).map_err(db)?.map_or(0, |v| v.value());
            let next =
                highest.max(in_use).checked_add(1).ok_or_else(|| StoreError::NoProfileNumber(provider.to_owned()))?;
            meta.insert(name.as_str(), next).map_err(db)?;
            next
        };
        txn.commit().map_err(db)?;
        Ok(next)
    }

    /// Record that profile numbers up to `in_use` exist (the user added them by hand).
    pub fn note_profiles(&self, provider: &str, in_use: u64) -> Result<(), StoreError> {
        let name = format!("profiles/{provider}");
        let txn = self.db.begin_write().map_err(db)?;
        {
            let mut meta = txn.open_table(META).map_err(db)?;
            let highest = meta.get(name.as_str()).map_err(db)?.map_or(0, |v| v.value());
            if in_use <= highest {
                return Ok(());
            }
            meta.insert(name.as_str(), in_use).map_err(db)?;
        }
        txn.commit().map_err(db)?;
        Ok(())
    }

    /// Drop history rows older than `cutoff`, keeping each connection's newest row. Returns
    /// how many rows went.
    pub fn compact_history(&self, cutoff: chrono::DateTime<chrono::Utc>) -> Result<u64, StoreError> {
        let txn = self.db.begin_write().map_err(db)?;
        let removed = history::compact(&mut txn.open_table(HISTORY_LOG).map_err(db)?, cutoff)?;
        txn.commit().map_err(db)?;
        Ok(removed)
    }

    /// Read every connection row without decoding it: (rows, bytes). A baseline for benchmarks.
    pub fn scan_rows(&self) -> Result<(u64, u64), StoreError> {
        let txn = self.db.begin_read().map_err(db)?;
        let conns = txn.open_table(CONNECTIONS).map_err(db)?;
        let (mut rows, mut bytes) = (0, 0);
        for row in conns.iter().map_err(db)? {
            let (k, v) = row.map_err(db)?;
            rows += 1;
            bytes += (k.value().len() + v.value().len()) as u64;
        }
        Ok((rows, bytes))
    }

    /// A connection's history, oldest first.
    pub fn history(&self, key: &ConnKey) -> Result<Vec<Transition>, StoreError> {
        let key = key.to_string();
        let txn = self.db.begin_read().map_err(db)?;
        let from = match txn.open_table(CONNECTIONS).map_err(db)?.get(key.as_str()).map_err(db)? {
            Some(row) => HistoryRef::split(&key, row.value())?.0,
            None => match txn.open_table(HISTORY_ORPHANS).map_err(db)?.get(key.as_str()).map_err(db)? {
                Some(r) => HistoryRef::split(&key, r.value())?.0,
                None => return Ok(Vec::new()),
            },
        };
        history::read(&txn.open_table(HISTORY_LOG).map_err(db)?, &key, from)
    }
}

/// Schema 2 → 3: every connection, flow and history value becomes a format-3 record.
fn rewrite_records(txn: &redb::WriteTransaction) -> Result<(), StoreError> {
    let corrupt = |key: &str| {
        let key = key.to_owned();
        move |source| StoreError::Corrupt { key, source }
    };
    let mut flows = txn.open_table(FLOWS).map_err(db)?;
    let mut conns = txn.open_table(CONNECTIONS).map_err(db)?;
    let mut history = txn.open_table(OLD_HISTORY).map_err(db)?;
    let mut new_flows = HashMap::new();
    for row in flows.iter().map_err(db)? {
        let (k, v) = row.map_err(db)?;
        let flow = records::decode_flow(v.value()).map_err(corrupt(k.value()))?;
        new_flows.insert(k.value().to_owned(), flow);
    }
    let mut new_conns = Vec::new();
    for row in conns.iter().map_err(db)? {
        let (k, v) = row.map_err(db)?;
        let flow = new_flows.get(k.value()).cloned();
        let machine = records::decode_connection(k.value(), v.value(), flow).map_err(corrupt(k.value()))?;
        new_conns.push((k.value().to_owned(), records::encode_connection(&machine)));
    }
    let mut new_history = Vec::new();
    for row in history.iter().map_err(db)? {
        let (k, v) = row.map_err(db)?;
        let (conn, seq) = k.value();
        let t = records::decode_transition(v.value()).map_err(corrupt(conn))?;
        new_history.push((conn.to_owned(), seq, records::encode_transition(&t)));
    }
    for (key, flow) in &new_flows {
        flows.insert(key.as_str(), records::encode_flow(flow).as_slice()).map_err(db)?;
    }
    for (key, row) in &new_conns {
        conns.insert(key.as_str(), row.as_slice()).map_err(db)?;
    }
    for (conn, seq, row) in &new_history {
        history.insert((conn.as_str(), *seq), row.as_slice()).map_err(db)?;
    }
    Ok(())
}
