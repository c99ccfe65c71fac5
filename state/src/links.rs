//! One-time login links: what the store keeps of each. Never the link's token itself, only a
//! hash of its secret part (and of the browser session it became), so that a copy of the
//! database opens no login page.

use crate::store::{LINKS, Store, StoreError, db};
use chrono::{DateTime, Utc};
use redb::{ReadableDatabase, ReadableTable};
use serde::{Deserialize, Serialize};

/// A link's record, by the link's public id.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LinkRecord {
    pub provider: String,
    /// The profile it logs in: an owner id (`discord:123456`) or a config profile.
    pub profile: String,
    /// SHA-256 of the link's secret part.
    pub secret_hash: [u8; 32],
    pub expires_at: DateTime<Utc>,
    /// SHA-256 of the browser session the link became when it was opened (its only use).
    pub session_hash: Option<[u8; 32]>,
    /// A flow was started for it: a connection that is no longer pending means it failed.
    pub started: bool,
    /// `linked`, `failed` or `expired` once it has ended.
    pub outcome: Option<String>,
}

impl LinkRecord {
    /// Whether saving `new` (another link) ends this one: it is the same profile's and was
    /// never opened (one pending link per owner and provider), or it ended more than a day
    /// before `new` would.
    pub fn ended_by(&self, new: &LinkRecord) -> bool {
        let old = new.expires_at - chrono::TimeDelta::days(1) - chrono::TimeDelta::hours(1);
        let same = self.provider == new.provider && self.profile == new.profile;
        (same && self.session_hash.is_none()) || self.expires_at < old
    }

    /// This link as claimed by `session_hash` at `now`: `None` when it was already used, has
    /// ended, or expired.
    pub fn claimed(self, session_hash: [u8; 32], now: DateTime<Utc>) -> Option<LinkRecord> {
        if self.session_hash.is_some() || self.outcome.is_some() || now >= self.expires_at {
            return None;
        }
        Some(LinkRecord { session_hash: Some(session_hash), ..self })
    }

    /// Progress: `started` only ever turns on, and an outcome is set once (with
    /// `only_unopened`, only on a link never opened).
    pub fn progress(&mut self, started: bool, outcome: Option<&str>, only_unopened: bool) {
        self.started |= started;
        if let Some(outcome) = outcome
            && self.outcome.is_none()
            && !(only_unopened && self.session_hash.is_some())
        {
            self.outcome = Some(outcome.to_owned());
        }
    }
}

/// A link's stored value (JSON).
pub fn encode(record: &LinkRecord) -> Vec<u8> {
    serde_json::to_vec(record).expect("a link record serializes")
}

/// The inverse of [`encode`]; `id` names the row in the error.
pub fn decode(id: &str, bytes: &[u8]) -> Result<LinkRecord, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt { key: format!("link {id}"), source: e.into() })
}

impl Store {
    /// Save `record` under `id`. A new link for a profile ends the same profile's earlier
    /// links that were never opened (one pending link per owner and provider); links that
    /// ended more than a day ago go too.
    pub fn put_link(&self, id: &str, record: &LinkRecord) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(db)?;
        {
            let mut table = txn.open_table(LINKS).map_err(db)?;
            let mut stale = Vec::new();
            for row in table.iter().map_err(db)? {
                let (key, value) = row.map_err(db)?;
                if key.value() == id {
                    continue;
                }
                // A record that does not read is left for a human, not a reason to refuse links.
                let Ok(other) = decode(key.value(), value.value()) else { continue };
                if other.ended_by(record) {
                    stale.push(key.value().to_owned());
                }
            }
            for key in stale {
                table.remove(key.as_str()).map_err(db)?;
            }
            table.insert(id, encode(record).as_slice()).map_err(db)?;
        }
        txn.commit().map_err(db)
    }

    /// The link's only use: give it `session_hash` if it has none yet, in one write, so that
    /// two browsers opening it at once cannot both get in. `None` when it was already used
    /// (or is gone).
    pub fn claim_link(
        &self,
        id: &str,
        session_hash: [u8; 32],
        now: DateTime<Utc>,
    ) -> Result<Option<LinkRecord>, StoreError> {
        let txn = self.db.begin_write().map_err(db)?;
        let claimed = {
            let mut table = txn.open_table(LINKS).map_err(db)?;
            let current = match table.get(id).map_err(db)? {
                Some(v) => decode(id, v.value())?,
                None => return Ok(None),
            };
            let Some(claimed) = current.claimed(session_hash, now) else { return Ok(None) };
            table.insert(id, encode(&claimed).as_slice()).map_err(db)?;
            claimed
        };
        txn.commit().map_err(db)?;
        Ok(Some(claimed))
    }

    /// Change one link's progress in one write: `started` only ever turns on, and an outcome
    /// is set once (with `only_unopened`, only on a link never opened). The record after, if
    /// the link exists.
    pub fn progress_link(
        &self,
        id: &str,
        started: bool,
        outcome: Option<&str>,
        only_unopened: bool,
    ) -> Result<Option<LinkRecord>, StoreError> {
        let txn = self.db.begin_write().map_err(db)?;
        let after = {
            let mut table = txn.open_table(LINKS).map_err(db)?;
            let mut record = match table.get(id).map_err(db)? {
                Some(v) => decode(id, v.value())?,
                None => return Ok(None),
            };
            record.progress(started, outcome, only_unopened);
            table.insert(id, encode(&record).as_slice()).map_err(db)?;
            record
        };
        txn.commit().map_err(db)?;
        Ok(Some(after))
    }

    pub fn link(&self, id: &str) -> Result<Option<LinkRecord>, StoreError> {
        let txn = self.db.begin_read().map_err(db)?;
        let table = match txn.open_table(LINKS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(db(e)),
        };
        match table.get(id).map_err(db)? {
            Some(v) => decode(id, v.value()).map(Some),
            None => Ok(None),
        }
    }

    /// Every link, for the watcher that publishes their outcomes.
    pub fn links(&self) -> Result<Vec<(String, LinkRecord)>, StoreError> {
        let rows = self.all_rows(LINKS)?;
        rows.into_iter().map(|(id, value)| Ok((id.clone(), decode(&id, &value)?))).collect()
    }
}
