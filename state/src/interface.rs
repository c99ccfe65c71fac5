//! The narrow interface the daemon has to its store: what any backend must do. [`Store`] is
//! redb's; `authkeeper-pgstore` has PostgreSQL's.

use crate::dump::Dump;
use crate::grant::ProfileState;
use crate::links::LinkRecord;
use crate::machine::{ConnKey, Transition};
use crate::store::{Commit, Store, StoreError, Stored};
use std::sync::Arc;

/// What the daemon needs of a store. Kept narrow so that another backend can take redb's place.
pub trait ConnectionStore: Send + Sync + 'static {
    /// Every stored connection, with its pending flow.
    fn load_all(&self) -> Result<Vec<Stored>, StoreError>;
    /// Commit a batch of connections' changes in one durable transaction.
    fn commit(&self, batch: &[Commit]) -> Result<(), StoreError>;
    /// A connection's history, oldest first.
    fn history(&self, key: &ConnKey) -> Result<Vec<Transition>, StoreError>;
    /// Drop a removed connection's state, flow and declared settings; its history stays.
    fn forget(&self, key: &ConnKey) -> Result<(), StoreError>;
    /// Every declared connection's stored settings.
    fn settings(&self) -> Result<Vec<(ConnKey, Vec<u8>)>, StoreError>;
    /// The digest ([`crate::store::declared_digest`]) of the settings stored for each of `keys`,
    /// in their order (`None`: none are).
    fn settings_digests(&self, keys: &[ConnKey]) -> Result<Vec<Option<u64>>, StoreError>;
    /// Record (or with `None` clear) the settings connections are declared with.
    fn set_settings(&self, rows: &[(ConnKey, Option<Arc<[u8]>>)]) -> Result<(), StoreError>;
    /// Every profile's provider state.
    fn profile_states(&self) -> Result<Vec<(ConnKey, ProfileState)>, StoreError>;
    /// Save profiles' provider state, durably, in one transaction, before it is used.
    fn set_profile_states(&self, states: &[(ConnKey, ProfileState)]) -> Result<(), StoreError>;
    fn config_seen(&self, key: &ConnKey) -> Result<Option<Vec<u8>>, StoreError>;
    fn set_config_seen(&self, key: &ConnKey, digest: &[u8]) -> Result<(), StoreError>;
    fn allocate_profile(&self, provider: &str, in_use: u64) -> Result<u64, StoreError>;
    fn note_profiles(&self, provider: &str, in_use: u64) -> Result<(), StoreError>;
    fn compact_history(&self, cutoff: chrono::DateTime<chrono::Utc>) -> Result<u64, StoreError>;
    /// Save a one-time link's record; ends the profile's earlier unopened links.
    fn put_link(&self, id: &str, record: &LinkRecord) -> Result<(), StoreError>;
    fn link(&self, id: &str) -> Result<Option<LinkRecord>, StoreError>;
    /// A link's only use, atomically: `None` when it was already used, has ended, or expired.
    fn claim_link(
        &self,
        id: &str,
        session_hash: [u8; 32],
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<Option<LinkRecord>, StoreError>;
    /// A link's progress, field by field, atomically (see [`Store::progress_link`]).
    fn progress_link(
        &self,
        id: &str,
        started: bool,
        outcome: Option<&str>,
        only_unopened: bool,
    ) -> Result<Option<LinkRecord>, StoreError>;
    fn links(&self) -> Result<Vec<(String, LinkRecord)>, StoreError>;
    /// Add webhook deliveries to the outbox, durably, in one transaction.
    fn put_outbox(&self, rows: &[(String, Vec<u8>)]) -> Result<(), StoreError>;
    /// Every delivery in the outbox, in id order.
    fn outbox(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
    /// Drop a delivered delivery.
    fn remove_outbox(&self, id: &str) -> Result<(), StoreError>;
    /// Everything in the store, as stored (for `store copy`).
    fn export(&self) -> Result<Dump, StoreError>;
    /// Write a dump into this store, which must be empty, in one transaction.
    fn import(&self, dump: &Dump) -> Result<(), StoreError>;
}

impl ConnectionStore for Store {
    fn load_all(&self) -> Result<Vec<Stored>, StoreError> {
        Store::load_all(self)
    }
    fn commit(&self, batch: &[Commit]) -> Result<(), StoreError> {
        Store::commit(self, batch)
    }
    fn history(&self, key: &ConnKey) -> Result<Vec<Transition>, StoreError> {
        Store::history(self, key)
    }
    fn forget(&self, key: &ConnKey) -> Result<(), StoreError> {
        Store::forget(self, key)
    }
    fn settings(&self) -> Result<Vec<(ConnKey, Vec<u8>)>, StoreError> {
        Store::settings(self)
    }
    fn settings_digests(&self, keys: &[ConnKey]) -> Result<Vec<Option<u64>>, StoreError> {
        Store::settings_digests(self, keys)
    }
    fn set_settings(&self, rows: &[(ConnKey, Option<Arc<[u8]>>)]) -> Result<(), StoreError> {
        Store::set_settings(self, rows)
    }
    fn profile_states(&self) -> Result<Vec<(ConnKey, ProfileState)>, StoreError> {
        Store::profile_states(self)
    }
    fn set_profile_states(&self, states: &[(ConnKey, ProfileState)]) -> Result<(), StoreError> {
        Store::set_profile_states(self, states)
    }
    fn config_seen(&self, key: &ConnKey) -> Result<Option<Vec<u8>>, StoreError> {
        Store::config_seen(self, key)
    }
    fn set_config_seen(&self, key: &ConnKey, digest: &[u8]) -> Result<(), StoreError> {
        Store::set_config_seen(self, key, digest)
    }
    fn allocate_profile(&self, provider: &str, in_use: u64) -> Result<u64, StoreError> {
        Store::allocate_profile(self, provider, in_use)
    }
    fn note_profiles(&self, provider: &str, in_use: u64) -> Result<(), StoreError> {
        Store::note_profiles(self, provider, in_use)
    }
    fn compact_history(&self, cutoff: chrono::DateTime<chrono::Utc>) -> Result<u64, StoreError> {
        Store::compact_history(self, cutoff)
    }
    fn put_link(&self, id: &str, record: &LinkRecord) -> Result<(), StoreError> {
        Store::put_link(self, id, record)
    }
    fn link(&self, id: &str) -> Result<Option<LinkRecord>, StoreError> {
        Store::link(self, id)
    }
    fn links(&self) -> Result<Vec<(String, LinkRecord)>, StoreError> {
        Store::links(self)
    }
    fn put_outbox(&self, rows: &[(String, Vec<u8>)]) -> Result<(), StoreError> {
        Store::put_outbox(self, rows)
    }
    fn outbox(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        Store::outbox(self)
    }
    fn remove_outbox(&self, id: &str) -> Result<(), StoreError> {
        Store::remove_outbox(self, id)
    }
    fn export(&self) -> Result<Dump, StoreError> {
        Store::export(self)
    }
    fn import(&self, dump: &Dump) -> Result<(), StoreError> {
        Store::import(self, dump)
    }
    fn claim_link(
        &self,
        id: &str,
        session_hash: [u8; 32],
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<Option<LinkRecord>, StoreError> {
        Store::claim_link(self, id, session_hash, now)
    }
    fn progress_link(
        &self,
        id: &str,
        started: bool,
        outcome: Option<&str>,
        only_unopened: bool,
    ) -> Result<Option<LinkRecord>, StoreError> {
        Store::progress_link(self, id, started, outcome, only_unopened)
    }
}
